//! The VM's disk daemons: start, poll and supervise them, read their state, and carry out
//! the state machine's disk commands.

use std::time::{Duration, Instant};

use super::{Context, VmRunner, DISK_POLL, RESTART_BACKOFF};
use crate::daemon::events::Events;
use crate::daemon::processes::{disk_command, disk_order, DiskProcess};
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
        // Fresh answers if a command was sent in this step (`execute` invalidates them).
        self.poll_disks();
        let generation = self.host.generation();
        let mode = self.host.mode();
        let mut disk_holding = false;
        for index in 0..self.disk_specs.len() {
            let Some(replication) = self.replication(index) else {
                continue;
            };
            let disk_mode = replication["mode"].as_str().unwrap_or_default();
            let disk_generation = replication["generation"].as_u64().unwrap_or(0);
            let waiting = matches!(disk_mode, "Holding" | "Connecting");
            disk_holding |= waiting;
            // Only a generation the witness granted is adopted here. A degraded primary
            // whose disks hold again (they had re-mirrored the peer) must not simply go on
            // alone at the same generation: the peer, UpToDate at it, could win the next
            // one. It claims the next generation instead (below).
            let behind = disk_generation < generation && disk_mode != "Fenced";
            if behind {
                let order = format!("continue-degraded {generation}");
                match disk_order(&self.disk_specs[index].control, &order) {
                    Ok(result) => log::info!("{}: {order}: {result}", self.name),
                    Err(error) => log::debug!("{}: {error}", self.name),
                }
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

    pub(super) fn replication(&self, index: usize) -> Option<&serde_json::Value> {
        self.disk_status
            .get(index)
            .and_then(Option::as_ref)
            .map(|status| &status["replication"])
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
        for index in 0..self.disk_specs.len() {
            let word = match self.replication(index) {
                None => "Unknown",
                Some(replication) => match replication["disk_state"].as_str() {
                    Some("UpToDate")
                        if replication["role"] == "secondary"
                            && replication["peer_reachable"] != true =>
                    {
                        "Standby"
                    }
                    Some("UpToDate") => "Protected",
                    Some("SyncSource" | "SyncTarget") => "Syncing",
                    Some(other) => other,
                    None => "Unknown",
                },
            };
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
        for index in 0..self.disk_specs.len() {
            let Some(replication) = self.replication(index) else {
                continue;
            };
            let resync = &replication["resync"];
            let out_of_sync = replication["out_of_sync_bytes"].as_u64().unwrap_or(0);
            if replication["disk_state"] == "SyncSource" || out_of_sync > 0 {
                syncing = true;
            }
            let bytes_total = resync["bytes_total"].as_u64().unwrap_or(0);
            total += bytes_total.max(out_of_sync);
            done += resync["bytes_done"].as_u64().unwrap_or(0).min(bytes_total);
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
        for index in 0..self.disk_specs.len() {
            let Some(replication) = self.replication(index) else {
                return DiskView {
                    consistent: false,
                    data_generation: 0,
                };
            };
            let consistent = match replication["role"].as_str() {
                // A primary whose own copy failed serves from the peer (RemoteOnly): its
                // copy holds nothing complete.
                Some("primary") => replication["local_disk"] == "Healthy",
                Some("secondary") => replication["disk_state"] == "UpToDate",
                _ => false,
            };
            // An Inconsistent copy holds no generation completely: it claims none, so the
            // witness can never grant it even if a claim were made.
            let generation = match consistent {
                true => replication["generation"].as_u64().unwrap_or(0),
                false => 0,
            };
            view.consistent &= consistent;
            view.data_generation = view.data_generation.min(generation);
        }
        view
    }

    pub(super) fn poll_disks(&mut self) {
        if self
            .last_poll
            .is_some_and(|last| last.elapsed() < DISK_POLL)
        {
            return;
        }
        self.last_poll = Some(Instant::now());
        for (index, spec) in self.disk_specs.iter().enumerate() {
            self.disk_status[index] = match &self.disks[index] {
                Some(_) => disk_command(&spec.control, "status").ok(),
                None => None,
            };
        }
    }

    /// Reports, once each, a copy that failed: this host's own (a secondary's disk, or a
    /// primary's local disk) or the peer's as the primary sees it.
    fn report_copy_failures(&mut self, events: &mut Events) {
        for index in 0..self.disk_specs.len() {
            let failure = self.replication(index).and_then(|replication| {
                let own = replication["disk_failed"].as_str().map(|reason| {
                    format!("this host's copy failed ({reason}): it is Inconsistent")
                });
                let remote_only = (replication["disk_state"] == "RemoteOnly").then(|| {
                    "this host's local disk failed: the VM's I/O is served by the peer's copy"
                        .to_owned()
                });
                let peer = replication["peer_disk_failed"].as_str().map(|reason| {
                    format!(
                        "{}'s copy failed ({reason}): running without it",
                        self.pair.peer
                    )
                });
                own.or(remote_only).or(peer)
            });
            if failure.is_some() && failure != self.reported_failures[index] {
                if let Some(description) = &failure {
                    let spec = &self.disk_specs[index];
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
        for index in 0..self.disks.len() {
            let Some(disk) = self.disks[index].as_mut() else {
                continue;
            };
            let Some(status) = disk.process.exited() else {
                continue;
            };
            let role = disk.role;
            self.disks[index] = None;
            self.disk_status[index] = None;
            events.error(
                &self.name,
                format!(
                    "disk daemon {} ({role:?}) ended: {status}",
                    self.disk_specs[index].serial
                ),
                &format!("see {}", self.disk_specs[index].log.display()),
            );
        }
        let missing = self.disks.iter().any(Option::is_none);
        let wanted = match self.host.role() {
            Role::Secondary => Some(Role::Secondary),
            Role::Primary if self.serving => Some(Role::Primary),
            Role::Primary => None,
        };
        if let Some(role) = wanted.filter(|_| missing) {
            if self
                .last_restart
                .is_none_or(|last| last.elapsed() >= RESTART_BACKOFF)
            {
                self.start_disks(role, events);
            }
        }
        if let Some(vm) = self.vm.as_mut() {
            if let Some(status) = vm.exited() {
                events.warn(
                    &self.name,
                    format!("the VM's QEMU ended: {status}"),
                    &format!("see {}", self.vm_spec.log.display()),
                );
                self.vm = None;
                self.announce_at.clear();
            }
        }
        self.nics.supervise(self.nic_need(), events);
    }

    fn start_disks(&mut self, role: Role, events: &mut Events) {
        self.last_restart = Some(Instant::now());
        for (index, spec) in self.disk_specs.iter().enumerate() {
            if self.disks[index].is_some() {
                continue;
            }
            match DiskProcess::start(spec, role) {
                Ok(process) => {
                    events.info(
                        &self.name,
                        format!(
                            "disk daemon {} started as {role:?} (pid {})",
                            spec.serial,
                            process.process.pid()
                        ),
                    );
                    self.disks[index] = Some(process);
                }
                Err(error) => events.error(
                    &self.name,
                    format!("cannot start disk daemon {}: {error}", spec.serial),
                    "check bin_dir in the configuration",
                ),
            }
        }
        self.last_poll = None;
    }

    /// Waits (briefly) until every disk daemon answers on its control socket.
    fn wait_disks_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = self
                .disk_specs
                .iter()
                .all(|spec| disk_command(&spec.control, "status").is_ok());
            if ready {
                return true;
            }
            if Instant::now() >= deadline
                || self
                    .disks
                    .iter_mut()
                    .flatten()
                    .any(|disk| disk.process.exited().is_some())
            {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
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

    /// The peer is lost on every A-link: the disks hold writes while the witness is asked.
    fn apply_hold(&mut self, context: &mut Context<'_>) {
        self.holding_since = Some(context.now);
        context.events.warn(
            &self.name,
            format!(
                "{} lost on every A-link: writes held, asking the witness",
                self.pair.peer
            ),
            "",
        );
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
        } else {
            events.info(
                &self.name,
                format!(
                    "{} heard as secondary: starting the VM here",
                    self.pair.peer
                ),
            );
            self.serve(None, context);
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
        self.serve(Some(generation), context);
    }

    /// Another host may run the VM: fence the disks and stop the VM here.
    fn apply_fence(&mut self, events: &mut Events) {
        self.holding_since = None;
        for spec in &self.disk_specs {
            if let Err(error) = disk_order(&spec.control, "fence") {
                log::debug!("{}: {error}", self.name);
            }
        }
        self.stop_vm(events, "fenced");
        self.serving = false;
        events.error(
            &self.name,
            "fenced: another host may run this VM; nothing is acknowledged here".into(),
            "nothing to do: this host follows the primary when it hears it",
        );
    }

    /// The witness granted `generation` to this host: promote the disks and start the VM.
    fn apply_promote(&mut self, generation: Generation, context: &mut Context<'_>) {
        let events = &mut *context.events;
        if !self.save_state(Role::Primary, generation, true, events) {
            return;
        }
        events.warn(
            &self.name,
            format!(
                "the witness granted generation {generation}: taking over from {}",
                self.pair.peer
            ),
            "",
        );
        for spec in &self.disk_specs {
            let order = format!("promote {generation}");
            if let Err(error) = disk_order(&spec.control, &order) {
                context.events.error(
                    &self.name,
                    format!("cannot promote disk {}: {error}", spec.serial),
                    "the VM cannot start here; see the disk daemon's log",
                );
                return;
            }
        }
        for disk in self.disks.iter_mut().flatten() {
            disk.role = Role::Primary;
        }
        self.serving = true;
        self.start_vm(context);
    }

    /// The peer is primary at `generation`: stop the VM and follow it as secondary.
    fn apply_demote(&mut self, generation: Generation, context: &mut Context<'_>) {
        let events = &mut *context.events;
        self.stop_vm(events, "another host is primary");
        self.serving = false;
        self.save_state(Role::Secondary, generation, true, events);
        events.warn(
            &self.name,
            format!(
                "{} is primary at generation {generation}: this host becomes its \
                 secondary (resync follows)",
                self.pair.peer
            ),
            "",
        );
        self.demote_disks(events);
        self.start_disks(Role::Secondary, events);
    }

    /// Demotes the disk daemons running as primary; one that refuses is stopped, to be
    /// restarted as secondary.
    fn demote_disks(&mut self, events: &mut Events) {
        for index in 0..self.disk_specs.len() {
            let running_primary = self.disks[index]
                .as_ref()
                .is_some_and(|disk| disk.role == Role::Primary);
            if !running_primary {
                continue;
            }
            let spec = &self.disk_specs[index];
            match disk_order(&spec.control, "demote") {
                Ok(_) => {
                    if let Some(disk) = self.disks[index].as_mut() {
                        disk.role = Role::Secondary;
                    }
                }
                Err(error) => {
                    events.warn(
                        &self.name,
                        format!(
                            "demote of disk {} failed ({error}): restarting it as secondary",
                            spec.serial
                        ),
                        "",
                    );
                    if let Some(mut disk) = self.disks[index].take() {
                        disk.process.stop();
                    }
                }
            }
        }
    }

    /// Runs the disks as primary (at `generation` after a grant) and the VM.
    pub(super) fn serve(&mut self, generation: Option<Generation>, context: &mut Context<'_>) {
        // A fenced disk daemon never acknowledges again: resuming needs a fresh one.
        for index in 0..self.disks.len() {
            let fenced = self
                .replication(index)
                .is_some_and(|replication| replication["mode"] == "Fenced");
            if fenced {
                if let Some(mut disk) = self.disks[index].take() {
                    disk.process.stop();
                }
                self.disk_status[index] = None;
            }
        }
        if self.disks.iter().any(Option::is_none) {
            self.start_disks(Role::Primary, context.events);
            if !self.wait_disks_ready() {
                context.events.error(
                    &self.name,
                    "the disk daemons did not come up".into(),
                    "see the disk daemons' logs",
                );
                return;
            }
        }
        if let Some(generation) = generation {
            for spec in &self.disk_specs {
                let order = format!("continue-degraded {generation}");
                if let Err(error) = disk_order(&spec.control, &order) {
                    log::warn!("{}: {error}", self.name);
                }
            }
        }
        self.serving = true;
        if self.vm.is_none() {
            self.start_vm(context);
        }
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
