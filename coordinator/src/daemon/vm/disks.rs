//! The VM's disk daemons: poll and supervise them, read their state, and carry out the
//! state machine's disk commands. Every call to a daemon is a job for its agent thread
//! ([`super::disk_daemons`]); the answers come back as reports at a later step.

use std::time::Instant;

use control_protocol::disk::{
    self, LocalDisk, PrimaryDiskState, PrimaryStatus, Replication, SecondaryDiskState,
    SecondaryStatus,
};

use super::disk_daemons::{DiskReport, Done, Heard};
use super::{Context, Pending, PendingKind, VmRunner, DISK_POLL, RESTART_BACKOFF, SILENT_AFTER};
use crate::daemon::events::Events;
use crate::host::{DiskCommand, DiskView, Mode, Role};
use crate::Generation;

impl VmRunner {
    /// Brings the disks in line with the state machine: the generation the witness
    /// granted, and running alone when degraded (a `continue-degraded` can be refused when
    /// it races the disk's own detection of the lost peer, so it is repeated here). Also
    /// notices disks that lost the peer while its heartbeats still arrive.
    pub(super) fn reconcile(&mut self, context: &mut Context<'_>) {
        if self.host.role() != Role::Primary || !self.serving {
            self.disk_holding_since = None;
            return;
        }
        if !self.reconcile_due() {
            return;
        }
        let generation = self.host.generation();
        let mode = self.host.mode();
        let mut disk_holding = false;
        for index in 0..self.disks.len() {
            // A daemon whose status is unknown, or not (yet) a primary's, gets no order.
            let Some(Replication::Primary(primary)) = self.replication(index) else {
                continue;
            };
            let waiting = matches!(primary.mode, disk::Mode::Holding | disk::Mode::Connecting);
            disk_holding |= waiting;
            // Only a generation the witness granted is adopted here. A degraded primary
            // whose disks hold again (they had re-mirrored the peer) must not simply go on
            // alone at the same generation: the peer, UpToDate at it, could win the next
            // one. It claims the next generation instead (below).
            let behind = primary.generation < generation && primary.mode != disk::Mode::Fenced;
            // Only a daemon with no job queued: its status then reflects every order sent.
            if behind && self.disks[index].idle() {
                self.disks[index].order(disk::Order::ContinueDegraded(Some(generation)));
            }
        }
        if matches!(mode, Mode::Mirrored | Mode::Degraded) && disk_holding {
            let since = *self.disk_holding_since.get_or_insert(context.now);
            if mode == Mode::Degraded || context.now.saturating_sub(since) > self.peer_timeout {
                self.disk_holding_since = None;
                context.events.warn(
                    &self.name,
                    format!(
                        "the disks lost {}'s copy although its host answers: asking the \
                         witness to continue without it",
                        self.pair.peer
                    ),
                    &format!(
                        "check vhost-blk-mirror on {} and the replication ports",
                        self.pair.peer
                    ),
                );
                let actions = self.host.on_disk_lost_peer();
                self.execute(actions, context);
            }
        } else {
            self.disk_holding_since = None;
        }
    }

    /// The replication part of a disk daemon's last status (`None`: unknown).
    pub(super) fn replication(&self, index: usize) -> Option<&Replication> {
        self.disks
            .get(index)
            .and_then(|disk| disk.status.as_ref())
            .map(|status| &status.replication)
    }

    /// The worst disk state, as one word.
    pub(super) fn state_word(&self) -> String {
        if !self.state.protected {
            return "Unprotected".into();
        }
        match (self.host.role(), self.host.mode()) {
            (Role::Primary, Mode::Fenced) => return "Fenced".into(),
            (Role::Primary, _) if !self.serving => return "Waiting".into(),
            _ => {}
        }
        let mut worst = "Protected";
        for index in 0..self.disks.len() {
            let word = state_word(self.replication(index));
            if rank(word) > rank(worst) {
                worst = word;
            }
        }
        worst.to_owned()
    }

    pub(super) fn own_sync_percent(&self) -> Option<f64> {
        if self.host.role() != Role::Primary {
            return None;
        }
        let mut total = 0u64;
        let mut done = 0u64;
        let mut syncing = false;
        for index in 0..self.disks.len() {
            let Some(Replication::Primary(primary)) = self.replication(index) else {
                continue;
            };
            let out_of_sync = primary.out_of_sync_bytes;
            if primary.disk_state == PrimaryDiskState::SyncSource || out_of_sync > 0 {
                syncing = true;
            }
            let bytes_total = primary.resync.bytes_total;
            total += bytes_total.max(out_of_sync);
            done += primary.resync.bytes_done.min(bytes_total);
        }
        match (syncing, total) {
            (false, _) => Some(100.0),
            (true, 0) => Some(0.0),
            (true, total) => Some((done as f64 * 100.0 / total as f64).min(100.0)),
        }
    }

    pub(super) fn disk_view(&self) -> DiskView {
        let role = self.host.role();
        if role == Role::Primary && !self.serving {
            // Not started yet (or fenced): this host's copy is the reference of its
            // generation, as it was when the disks last ran as primary.
            return DiskView {
                consistent: true,
                data_generation: self.state.generation,
            };
        }
        let mut view = DiskView {
            consistent: true,
            data_generation: Generation::MAX,
        };
        for index in 0..self.disks.len() {
            let copy = copy_view(self.replication(index));
            view.consistent &= copy.consistent;
            view.data_generation = view.data_generation.min(copy.data_generation);
        }
        view
    }

    /// Asks each idle disk daemon for its status, once per poll period.
    pub(super) fn poll_disks(&mut self) {
        for disk in &mut self.disks {
            disk.poll(DISK_POLL);
        }
    }

    /// Takes the disk agents' reports: the daemons' processes and status, the results of
    /// orders, promotions and serves; and reports daemons that stopped answering.
    pub(super) fn take_disk_reports(&mut self, context: &mut Context<'_>) {
        while let Ok(report) = self.disk_reports.try_recv() {
            let Some(disk) = self.disks.get_mut(report.index) else {
                continue;
            };
            let before = disk.pid();
            disk.update(&report, &self.name, context.events);
            self.on_disk_report(report, before, context);
        }
        for disk in &mut self.disks {
            let Some((what, running)) = disk.busy() else {
                continue;
            };
            if running < SILENT_AFTER || disk.silent {
                continue;
            }
            disk.silent = true;
            let pid = disk
                .pid()
                .map_or(String::new(), |pid| format!(" (pid {pid})"));
            context.events.error(
                &self.name,
                format!(
                    "disk daemon {}{pid} does not answer on {}: `{what}` unanswered for {} ms; \
                     it may be hung (heartbeats and the other daemons go on)",
                    disk.spec.serial,
                    disk.spec.control.display(),
                    running.as_millis()
                ),
                &format!(
                    "see {}; a daemon stopped with SIGSTOP resumes with SIGCONT, a dead one \
                     is restarted",
                    disk.spec.log.display()
                ),
            );
        }
    }

    fn on_disk_report(
        &mut self,
        report: DiskReport,
        before: Option<u32>,
        context: &mut Context<'_>,
    ) {
        let index = report.index;
        let spec = &self.disks[index].spec;
        let (serial, log) = (spec.serial.clone(), spec.log.display().to_string());
        let answered = !matches!(report.status, Heard::Nothing);
        if answered && std::mem::take(&mut self.disks[index].silent) {
            context
                .events
                .info(&self.name, format!("disk daemon {serial} answers again"));
        }
        let started = report.process.filter(|(pid, _)| before != Some(*pid));
        if let Some((pid, role)) = started {
            context.events.info(
                &self.name,
                format!("disk daemon {serial} started as {role:?} (pid {pid})"),
            );
        }
        match report.done {
            Done::Polled(Err(error)) => {
                log::debug!("{}: disk {serial}: status: {error}", self.name);
            }
            Done::Polled(Ok(())) | Done::Stopped => {}
            Done::Started(Err(error)) => context.events.error(
                &self.name,
                format!("cannot start disk daemon {serial}: {error}"),
                "check bin_dir in the configuration",
            ),
            Done::Started(Ok(())) => {}
            Done::Ordered {
                order: disk::Order::Settle,
                result,
            } => self.on_settled(&serial, result, context),
            Done::Ordered { order, result } => match result {
                Ok(result) => log::info!("{}: disk {serial}: {order}: {result}", self.name),
                Err(error) => log::debug!("{}: disk {serial}: {error}", self.name),
            },
            Done::Demoted(Some(warning)) => context.events.warn(
                &self.name,
                format!("demote of disk {serial} failed ({warning}): restarted as secondary"),
                "",
            ),
            Done::Demoted(None) => {}
            Done::Ended(status) => context.events.error(
                &self.name,
                format!("disk daemon {serial} ended: {status}"),
                &format!("see {log}"),
            ),
            Done::Ticket { ticket, result } => self.on_ticket(ticket, result, &serial, context),
            Done::Snapshot(result) => self.on_snapshot_result(index, result, context),
        }
    }

    /// One disk daemon's answer to a promotion or a serve: once all have answered, the
    /// disks serve and the VM starts (or resumes), or the failure is reported.
    fn on_ticket(
        &mut self,
        ticket: u64,
        result: Result<(), String>,
        serial: &str,
        context: &mut Context<'_>,
    ) {
        let Some(pending) = self
            .pending
            .as_mut()
            .filter(|pending| pending.ticket == ticket)
        else {
            return; // overtaken by a later decision (a fence, a demotion)
        };
        pending.waiting = pending.waiting.saturating_sub(1);
        if let Err(error) = result {
            pending
                .failure
                .get_or_insert(format!("disk {serial}: {error}"));
        }
        if pending.waiting > 0 {
            return;
        }
        let Some(pending) = self.pending.take() else {
            return;
        };
        if pending.failure.is_some() {
            // The restore waited for this promotion.
            self.restore = None;
        }
        match (pending.what, pending.failure) {
            (PendingKind::Promote, Some(error)) => context.events.error(
                &self.name,
                format!("cannot promote {error}"),
                "the VM cannot start here; see the disk daemon's log",
            ),
            (PendingKind::Serve, Some(error)) => context.events.error(
                &self.name,
                format!("the disk daemons did not come up ({error})"),
                "see the disk daemons' logs",
            ),
            (_, None) => {
                self.serving = true;
                // A restore first: a move's QEMU, started ahead, is present already.
                if !self.launch_for_restore(context) {
                    // No restore: a QEMU started ahead of a move waits for one in vain.
                    self.end_prestart(context, "the VM starts here without a restore");
                    if self.guest.present() {
                        self.resume_guest(context.events, "its disks serve again");
                    } else {
                        self.start_vm(context);
                    }
                }
            }
        }
    }

    /// Starts a request to every disk daemon that the VM waits for.
    pub(super) fn begin(&mut self, what: PendingKind) -> u64 {
        self.next_ticket += 1;
        self.pending = Some(Pending {
            ticket: self.next_ticket,
            waiting: self.disks.len(),
            failure: None,
            what,
        });
        self.next_ticket
    }

    /// Reports, once each, a copy that failed: this host's own (a secondary's disk, or a
    /// primary's local disk) or the peer's as the primary sees it.
    fn report_copy_failures(&mut self, events: &mut Events) {
        for index in 0..self.disks.len() {
            let failure = match self.replication(index) {
                None | Some(Replication::Standalone {}) => None,
                Some(Replication::Secondary(SecondaryStatus { disk_failed, .. })) => {
                    disk_failed.as_ref().map(|reason| {
                        format!("this host's copy failed ({reason}): it is Inconsistent")
                    })
                }
                Some(Replication::Primary(primary)) => {
                    let remote_only =
                        (primary.disk_state == PrimaryDiskState::RemoteOnly).then(|| {
                            "this host's local disk failed: the VM's I/O is served by the \
                             peer's copy"
                                .to_owned()
                        });
                    let peer = primary.peer_disk_failed.as_ref().map(|reason| {
                        format!(
                            "{}'s copy failed ({reason}): running without it",
                            self.pair.peer
                        )
                    });
                    remote_only.or(peer)
                }
            };
            if failure.is_some() && failure != self.reported_failures[index] {
                if let Some(description) = &failure {
                    let spec = &self.disks[index].spec;
                    events.error(
                        &self.name,
                        format!("disk {}: {description}", spec.serial),
                        &format!(
                            "repair the failed disk, then `repair` on its disk daemon ({}); \
                             see {}",
                            spec.control.display(),
                            spec.log.display()
                        ),
                    );
                }
            }
            self.reported_failures[index] = failure;
        }
    }

    pub(super) fn supervise(&mut self, events: &mut Events) {
        self.report_copy_failures(events);
        let missing = self
            .disks
            .iter()
            .any(|disk| disk.process.is_none() && disk.idle());
        let wanted = match self.host.role() {
            Role::Secondary => Some(Role::Secondary),
            Role::Primary if self.serving => Some(Role::Primary),
            Role::Primary => None,
        };
        if let Some(role) = wanted.filter(|_| missing && self.pending.is_none()) {
            if self
                .last_restart
                .is_none_or(|last| last.elapsed() >= RESTART_BACKOFF)
            {
                self.start_disks(role);
            }
        }
        self.nics.supervise(self.nic_need(), events);
    }

    fn start_disks(&mut self, role: Role) {
        self.last_restart = Some(Instant::now());
        for disk in &mut self.disks {
            if disk.process.is_none() && disk.idle() {
                disk.start(role);
            }
        }
    }

    /// Whether a reconciliation of the disks is due (at most one per poll period).
    pub(super) fn reconcile_due(&mut self) -> bool {
        if self
            .last_reconcile
            .is_some_and(|last| last.elapsed() < DISK_POLL)
        {
            return false;
        }
        self.last_reconcile = Some(Instant::now());
        true
    }

    /// Carries out one of the state machine's disk commands.
    pub(super) fn apply(&mut self, command: DiskCommand, context: &mut Context<'_>) {
        match command {
            DiskCommand::Hold => self.apply_hold(context),
            DiskCommand::Resume { generation } => self.apply_resume(generation, context),
            DiskCommand::ContinueDegraded { generation } => {
                self.apply_continue_degraded(generation, context)
            }
            DiskCommand::Fence => self.apply_fence(context.events),
            DiskCommand::Promote { generation } => self.apply_promote(generation, context),
            DiskCommand::Demote { generation } => self.apply_demote(generation, context),
        }
    }

    /// The peer is lost on every A-link: the disks hold writes while the witness is asked,
    /// and the guest pauses at once, so that it sends nothing while the peer may be taking
    /// over with the same MAC and IP.
    fn apply_hold(&mut self, context: &mut Context<'_>) {
        self.holding_since = Some(context.now);
        if self.migrating() {
            // `ftvm migrate` handed the VM over: the guest stays stopped until the peer
            // runs it (or the witness gives it back).
            self.pause_guest(context.events, "handed over to the peer");
            return;
        }
        context.events.warn(
            &self.name,
            format!(
                "{} lost on every A-link: writes held, asking the witness",
                self.pair.peer
            ),
            "",
        );
        self.pause_guest(context.events, "writes held until the witness decides");
    }

    /// The peer is heard again: mirror to it, or start the VM here if it is not running yet.
    fn apply_resume(&mut self, generation: Generation, context: &mut Context<'_>) {
        let events = &mut *context.events;
        self.holding_since = None;
        if generation > self.state.generation {
            self.save_state(Role::Primary, generation, true, events);
        }
        if self.serving {
            events.info(&self.name, format!("{} is back: mirroring", self.pair.peer));
            self.resume_guest(context.events, "mirrored again");
        } else if self.restore.is_some() {
            // A Level 3 restore is under way (the peer handed the VM over and follows as
            // secondary): it starts the VM from the replica; booting it here would not.
            events.info(
                &self.name,
                format!(
                    "{} heard as secondary: the VM starts here once restored",
                    self.pair.peer
                ),
            );
        } else {
            events.info(
                &self.name,
                format!(
                    "{} heard as secondary: starting the VM here",
                    self.pair.peer
                ),
            );
            self.serve(None);
        }
    }

    /// The witness granted `generation` without the peer: run alone, recording writes.
    fn apply_continue_degraded(&mut self, generation: Generation, context: &mut Context<'_>) {
        let events = &mut *context.events;
        self.holding_since = None;
        if !self.save_state(Role::Primary, generation, true, events) {
            return;
        }
        events.warn(
            &self.name,
            format!(
                "the witness granted generation {generation}: running without {} \
                 (degraded); writes are recorded for resync",
                self.pair.peer
            ),
            "bring the peer back; protection returns by itself",
        );
        self.serve(Some(generation));
    }

    /// Another host may run the VM: fence the disks and stop the VM here. The `fence`
    /// is queued behind every order sent before it, and a serve or promotion still
    /// waiting is forgotten, so nothing sent earlier can undo it.
    fn apply_fence(&mut self, events: &mut Events) {
        self.holding_since = None;
        self.pending = None;
        self.restore = None;
        for disk in &mut self.disks {
            disk.order(disk::Order::Fence);
        }
        self.stop_vm(events, "fenced");
        self.serving = false;
        events.error(
            &self.name,
            "fenced: another host may run this VM; nothing is acknowledged here".into(),
            "nothing to do: this host follows the primary when it hears it",
        );
    }

    /// The witness granted `generation` to this host: promote the disks, then (once every
    /// daemon has answered) start the VM.
    fn apply_promote(&mut self, generation: Generation, context: &mut Context<'_>) {
        let events = &mut *context.events;
        if !self.save_state(Role::Primary, generation, true, events) {
            return;
        }
        self.takeover_began(context.now);
        let what = format!(
            "the witness granted generation {generation}: taking over from {}",
            self.pair.peer
        );
        if self.planned() {
            events.info(&self.name, format!("{what}, as it asked"));
        } else {
            events.warn(&self.name, what, "");
        }
        if !self.begin_restore(generation, context.events) {
            self.promote_disks(generation);
        }
    }

    /// Promotes every disk at `generation`; the VM starts once all have answered.
    pub(super) fn promote_disks(&mut self, generation: Generation) {
        let ticket = self.begin(PendingKind::Promote);
        for disk in &mut self.disks {
            disk.promote(ticket, generation);
        }
    }

    /// The peer is primary at `generation`: stop the VM and follow it as secondary.
    fn apply_demote(&mut self, generation: Generation, context: &mut Context<'_>) {
        let events = &mut *context.events;
        self.stop_vm(events, "another host is primary");
        self.serving = false;
        self.pending = None;
        self.restore = None;
        self.save_state(Role::Secondary, generation, true, events);
        let what = format!(
            "{} is primary at generation {generation}: this host becomes its secondary",
            self.pair.peer
        );
        if self.planned() {
            events.info(&self.name, format!("{what}, as planned"));
        } else {
            events.warn(&self.name, format!("{what} (resync follows)"), "");
        }
        // Each daemon running as primary is demoted (restarted as secondary if it
        // refuses); a missing one is started as secondary.
        self.last_restart = Some(Instant::now());
        for disk in &mut self.disks {
            disk.demote();
        }
    }

    /// Runs the disks as primary (at `generation` after a grant) and then the VM: a fenced
    /// daemon is replaced (it never acknowledges again), a missing one started. The VM
    /// starts, or resumes, once every daemon has answered.
    pub(super) fn serve(&mut self, generation: Option<Generation>) {
        let ticket = self.begin(PendingKind::Serve);
        for disk in &mut self.disks {
            disk.serve(ticket, generation);
        }
    }
}

/// One copy's state, as one word of `ftvm status` (`None`: its status is unknown).
fn state_word(replication: Option<&Replication>) -> &'static str {
    match replication {
        None | Some(Replication::Standalone {}) => "Unknown",
        Some(Replication::Primary(PrimaryStatus { disk_state, .. })) => match disk_state {
            PrimaryDiskState::UpToDate => "Protected",
            PrimaryDiskState::SyncSource => "Syncing",
            PrimaryDiskState::Holding => "Holding",
            PrimaryDiskState::Degraded => "Degraded",
            PrimaryDiskState::Fenced => "Fenced",
            PrimaryDiskState::RemoteOnly => "RemoteOnly",
            PrimaryDiskState::Rebuilding => "Rebuilding",
        },
        Some(Replication::Secondary(secondary)) => match secondary.disk_state {
            SecondaryDiskState::UpToDate if !secondary.peer_reachable => "Standby",
            SecondaryDiskState::UpToDate => "Protected",
            SecondaryDiskState::SyncTarget => "Syncing",
            SecondaryDiskState::Inconsistent => "Inconsistent",
            SecondaryDiskState::Failed => "Failed",
        },
    }
}

/// What one copy holds, from its daemon's status. An unknown status (none, or one that was
/// not understood) and an Inconsistent copy hold no generation completely: they claim none,
/// so the witness can never grant them even if a claim were made.
fn copy_view(replication: Option<&Replication>) -> DiskView {
    let (consistent, generation) = match replication {
        None | Some(Replication::Standalone {}) => (false, 0),
        // A primary whose own copy failed serves from the peer (RemoteOnly): its copy
        // holds nothing complete.
        Some(Replication::Primary(primary)) => {
            (primary.local_disk == LocalDisk::Healthy, primary.generation)
        }
        Some(Replication::Secondary(secondary)) => (
            secondary.disk_state == SecondaryDiskState::UpToDate,
            secondary.generation,
        ),
    };
    DiskView {
        consistent,
        data_generation: if consistent { generation } else { 0 },
    }
}

/// Worse states rank higher.
fn rank(word: &str) -> u8 {
    match word {
        "Protected" => 0,
        "Standby" => 1,
        "Syncing" => 2,
        "Holding" => 3,
        "Degraded" | "RemoteOnly" | "Rebuilding" => 4,
        "Inconsistent" | "Failed" => 5,
        "Unknown" => 6,
        _ => 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn primary(local_disk: LocalDisk, disk_state: PrimaryDiskState) -> Replication {
        Replication::Primary(PrimaryStatus {
            mode: disk::Mode::Mirrored,
            disk_state,
            local_disk,
            rebuild: disk::ResyncProgress::default(),
            generation: 9,
            peer_reachable: true,
            links: serde_json::Value::Null,
            in_flight_requests: 0,
            out_of_sync_bytes: 0,
            active_extents: 0,
            writes_active: 0,
            resync: disk::ResyncProgress::default(),
            peer_disk_failed: None,
            epochs: Default::default(),
            write_latency: Default::default(),
        })
    }

    fn secondary(disk_state: SecondaryDiskState, peer_reachable: bool) -> Replication {
        Replication::Secondary(SecondaryStatus {
            disk_state,
            generation: 9,
            peer_reachable,
            links: serde_json::Value::Null,
            applied_writes: 0,
            applied_bytes: 0,
            resync_bytes_received: 0,
            refused_requests: 0,
            disk_failed: None,
            disk_failures: 0,
            epochs: Default::default(),
        })
    }

    #[test]
    fn an_unknown_or_inconsistent_copy_holds_no_generation() {
        let unknown = DiskView {
            consistent: false,
            data_generation: 0,
        };
        assert_eq!(
            copy_view(None),
            unknown,
            "a status not understood is unknown"
        );
        assert_eq!(copy_view(Some(&Replication::Standalone {})), unknown);
        let up_to_date = DiskView {
            consistent: true,
            data_generation: 9,
        };
        let healthy = primary(LocalDisk::Healthy, PrimaryDiskState::UpToDate);
        assert_eq!(copy_view(Some(&healthy)), up_to_date);
        let remote_only = primary(LocalDisk::Failed, PrimaryDiskState::RemoteOnly);
        assert_eq!(copy_view(Some(&remote_only)), unknown);
        let current = secondary(SecondaryDiskState::UpToDate, true);
        assert_eq!(copy_view(Some(&current)), up_to_date);
        for state in [
            SecondaryDiskState::Inconsistent,
            SecondaryDiskState::SyncTarget,
            SecondaryDiskState::Failed,
        ] {
            assert_eq!(
                copy_view(Some(&secondary(state, true))),
                unknown,
                "{state:?}"
            );
        }
    }

    #[test]
    fn each_disk_state_has_its_word() {
        assert_eq!(state_word(None), "Unknown");
        let healthy = |state| primary(LocalDisk::Healthy, state);
        assert_eq!(
            state_word(Some(&healthy(PrimaryDiskState::UpToDate))),
            "Protected"
        );
        assert_eq!(
            state_word(Some(&healthy(PrimaryDiskState::SyncSource))),
            "Syncing"
        );
        assert_eq!(
            state_word(Some(&healthy(PrimaryDiskState::Holding))),
            "Holding"
        );
        let standby = secondary(SecondaryDiskState::UpToDate, false);
        assert_eq!(state_word(Some(&standby)), "Standby");
        let failed = secondary(SecondaryDiskState::Failed, true);
        assert_eq!(state_word(Some(&failed)), "Failed");
        assert!(rank("Unknown") > rank("Failed") && rank("Failed") > rank("Degraded"));
    }
}
