//! One protected VM on this host: the coordinator's [`Host`] state machine, wired to the
//! VM's disk daemons, its NIC daemons, its QEMU and the witness.

mod commands;
mod disk_daemons;
mod disks;
mod domain;
mod guest_agent;
mod level3;
mod migrate;
mod qemu;
mod snapshots;

use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use control_protocol::disk;
use serde::{Deserialize, Serialize};

use super::events::Events;
use super::links::{PeerLink, VmBeat, WitnessLink};
use super::nics::{NicStatus, Nics};
use super::processes::{touch, DiskSpec, EngineSpec, NicSpec, VmLauncher, VmSpec};
use super::state::{StateFile, VmState};

use crate::daemon::wake;
use crate::host::{Action, DiskView, Host, HostConfig, Mode, Role};
use crate::witness::{Claim, Grant, Verdict};
use crate::witness_daemon::{HostPair, WitnessRequest};
use crate::{Generation, HostId, Millis};
use disk_daemons::{DiskDaemon, DiskReport};
use guest_agent::GuestAgent;
use level3::{Engine, Restore};
use migrate::Migration;
pub use migrate::MOST_TIMEOUT as MOST_MIGRATION_TIMEOUT;
use qemu::Guest;

/// How often the disk daemons are asked for their status.
const DISK_POLL: Duration = Duration::from_millis(100);
/// Least time between two restarts of a crashed disk daemon.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
/// A disk daemon busy this long with one job is reported as not answering.
const SILENT_AFTER: Duration = Duration::from_millis(1500);

/// What the daemon passes to a VM for one step.
pub struct Context<'a> {
    pub now: Millis,
    pub events: &'a mut Events,
    pub peer: &'a PeerLink,
    pub witness: &'a WitnessLink,
    pub launcher: &'a Arc<dyn VmLauncher>,
}

/// One VM in `ftvm status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub level: u8,
    /// This host's role.
    pub role: Role,
    /// Protected, Syncing, Holding, Degraded, Fenced, RemoteOnly, Waiting, Standby, …
    pub state: String,
    pub primary: Option<String>,
    pub secondary: Option<String>,
    pub generation: Generation,
    pub sync_percent: Option<f64>,
    /// QEMU's process id while the VM runs here.
    pub vm_pid: Option<u32>,
    /// The QEMU here (`vm_pid`) was started ahead of the peer's move and waits for its
    /// final checkpoint (`-incoming defer`): no guest runs here yet.
    #[serde(default)]
    pub vm_prestarted: bool,
    /// ftvmd paused the guest here (this host holds its writes for the witness).
    #[serde(default)]
    pub vm_paused: bool,
    /// An operator stopped the VM's libvirt domain (`virsh shutdown`/`destroy`): a
    /// planned stop, no failover.
    #[serde(default)]
    pub stopped_by_operator: bool,
    /// A libvirt domain protected with `ftvm protect --domain`.
    #[serde(default)]
    pub domain: bool,
    /// Each disk daemon's process id while it runs.
    pub disk_pids: Vec<Option<u32>>,
    /// The disk daemons' own `status`, for detail (`null`: none, or not understood).
    pub disks: Vec<Option<disk::Status>>,
    /// Each NIC: its daemon here and the path the guest's frames take.
    #[serde(default)]
    pub nics: Vec<NicStatus>,
    /// Level 3: the checkpoint engine's own `status` here (epochs, pauses, the replica),
    /// while one runs.
    #[serde(default)]
    pub checkpoint: Option<serde_json::Value>,
    /// `ftvm migrate` under way from this host: `to`, `phase` (`preparing`,
    /// `final-checkpoint`, `handed-over`), `seconds`, `level_before`.
    #[serde(default)]
    pub migration: Option<serde_json::Value>,
    /// Times this host took the VM over (a failover after the peer's loss, `ftvm
    /// failover`, `ftvm migrate`) since ftvmd started.
    pub takeovers: u64,
    /// How long the last takeover took: from the last heartbeat heard from the peer (or
    /// the grant, if none) to the VM running here.
    pub last_takeover_ms: Option<u64>,
}

/// Names of the two hosts and which [`HostId`] each is (by name order).
#[derive(Clone, Debug)]
pub struct Pair {
    pub me: String,
    pub peer: String,
}

impl Pair {
    fn my_id(&self) -> HostId {
        if self.me < self.peer {
            HostId::A
        } else {
            HostId::B
        }
    }

    fn name(&self, id: HostId) -> String {
        if id == self.my_id() {
            self.me.clone()
        } else {
            self.peer.clone()
        }
    }
}

/// Creates the VM's state directory and loads its state, or saves the first one (`role` at
/// generation 1, protected) when there is none yet.
/// A request to all disk daemons that something waits for: the VM starts only once every
/// daemon has answered (a promotion, or a serve as primary).
#[derive(Debug)]
struct Pending {
    ticket: u64,
    /// Daemons that have not answered yet.
    waiting: usize,
    /// The first failure, if any.
    failure: Option<String>,
    what: PendingKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PendingKind {
    Promote,
    Serve,
}

fn open_state(dir: &Path, name: &str, role: Role) -> Result<(StateFile, VmState), String> {
    std::fs::create_dir_all(dir)
        .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    let state_file = StateFile::new(dir);
    let state = match state_file.load().map_err(|error| error.to_string())? {
        Some(state) => state,
        None => {
            let state = VmState {
                role,
                generation: 1,
                protected: true,
                level: None,
            };
            state_file
                .save(&state)
                .map_err(|error| format!("cannot save the state of {name}: {error}"))?;
            state
        }
    };
    Ok((state_file, state))
}

pub struct VmRunner {
    pub name: String,
    pub level: u8,
    first_primary: String,
    pair: Pair,
    host: Host,
    state_file: StateFile,
    state: VmState,
    /// The disk daemons, each with its agent thread.
    disks: Vec<DiskDaemon>,
    disk_reports: Receiver<DiskReport>,
    /// A serve or promotion waiting for the disk daemons' answers.
    pending: Option<Pending>,
    next_ticket: u64,
    last_restart: Option<Instant>,
    /// The NIC daemons run where the VM runs, from just before it starts until it stops;
    /// those of NICs with a redundant uplink also in standby while the VM is protected.
    nics: Nics,
    /// QEMU is to start here as soon as the NIC daemons answer.
    start_pending: bool,
    /// When to announce the VM's MACs again (a RARP from each NIC's TAP) after it started.
    announce_at: Vec<Instant>,
    vm_spec: VmSpec,
    /// QEMU, with its agent thread.
    guest: Guest,
    /// The disks run as primary and the VM should run here.
    serving: bool,
    registered: bool,
    peer_beat: Option<(VmBeat, Millis)>,
    peer_timeout: Millis,
    host_config: HostConfig,
    /// Since when this primary holds writes for a lost peer.
    holding_since: Option<Millis>,
    /// Since when the disks hold writes while the coordinator still hears the peer.
    disk_holding_since: Option<Millis>,
    last_reconcile: Option<Instant>,
    /// Warned that the primary is lost while this copy cannot take over.
    warned_cannot_take_over: bool,
    started_at: Millis,
    /// Per disk, the copy failure last reported as an event (so each is reported once).
    reported_failures: Vec<Option<String>>,
    /// The Level 3 checkpoint engine, with its agent thread.
    engine: Engine,
    /// A Level 3 failover (restore from the replica) under way.
    restore: Option<Restore>,
    /// Level 3 was suspended at the last step (a disk reads from the peer).
    level3_was_suspended: bool,
    /// `ftvm migrate` under way from here.
    migration: Option<Migration>,
    /// The peer handed the VM over live (`ftvm migrate`): the level to run it at once
    /// restored here.
    incoming_migration: Option<u8>,
    /// A switchover (a move's final checkpoint here, or the peer's handover to here) runs
    /// until at most then: ftvmd steps faster meanwhile ([`VmRunner::switching_over`]).
    switchover_until: Option<Instant>,
    /// The QEMU here was started ahead of the peer's move (`-incoming defer`, attached to the
    /// secondary disks and standby NIC daemons) and waits for the final checkpoint.
    prestarted: bool,
    /// A QEMU was started ahead of the peer's current move already (one try per move).
    prestart_tried: bool,
    /// `ftvm snapshot` under way.
    snapshot: Option<snapshots::SnapshotJob>,
    /// The answer to an application-consistent `ftvm snapshot create`, sent once the
    /// guest's file systems are thawed.
    thaw_answer: Option<snapshots::ThawAnswer>,
    /// The guest agent in the VM, with its thread (application-consistent snapshots).
    guest_agent: GuestAgent,
    /// `ftvm snapshot create` without `--app-consistent` (the VM's `snapshot_consistency`).
    snapshot_consistency: crate::daemon::control::SnapshotConsistency,
    takeovers: Takeovers,
    /// Until when the role change under way was asked for (`ftvm failover`, `ftvm
    /// migrate`, a host disabled): its events are information, not warnings, and the one
    /// copy the new primary runs on meanwhile is not an alert.
    planned_until: Option<Instant>,
}

/// How long a planned role change may take before the one copy the new primary runs on
/// is a lost redundancy again (the old primary rejoins as secondary within a second or two
/// in the tests).
pub(super) const PLANNED_GRACE: Duration = Duration::from_secs(30);

/// This host's takeovers of the VM, for `/metrics`.
#[derive(Debug, Default)]
struct Takeovers {
    count: u64,
    last_ms: Option<u64>,
    /// A takeover under way: since when (the last heartbeat heard from the peer).
    since: Option<Millis>,
}

impl VmRunner {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        level: u8,
        first_primary: String,
        pair: Pair,
        dir: PathBuf,
        host_config: HostConfig,
        disk_specs: Vec<DiskSpec>,
        nic_specs: Vec<NicSpec>,
        vm_spec: VmSpec,
        engine_spec: EngineSpec,
        now: Millis,
        events: &mut Events,
    ) -> Result<VmRunner, String> {
        let first_role = if first_primary == pair.me {
            Role::Primary
        } else {
            Role::Secondary
        };
        let (state_file, state) = open_state(&dir, &name, first_role)?;
        // `ftvm protect --level` outlives restarts.
        let level = state.level.unwrap_or(level);
        touch(&vm_spec.console)
            .map_err(|error| format!("cannot create {}: {error}", vm_spec.console.display()))?;
        let host = Host::start(pair.my_id(), host_config, state.role, state.generation, now);
        let nics = Nics::new(&name, nic_specs)?;
        let (sender, disk_reports) = wake::channel();
        let disks = disk_specs
            .into_iter()
            .enumerate()
            .map(|(index, spec)| DiskDaemon::new(&name, index, spec, sender.clone()))
            .collect::<Result<Vec<_>, String>>()?;
        let runner = VmRunner {
            reported_failures: disks.iter().map(|_| None).collect(),
            disks,
            disk_reports,
            pending: None,
            next_ticket: 0,
            guest: Guest::new(&name)?,
            engine: Engine::new(&name, engine_spec)?,
            restore: None,
            level3_was_suspended: false,
            migration: None,
            incoming_migration: None,
            switchover_until: None,
            prestarted: false,
            prestart_tried: false,
            planned_until: None,
            snapshot: None,
            thaw_answer: None,
            guest_agent: GuestAgent::new(&name, vm_spec.guest_agent.clone())?,
            snapshot_consistency: crate::daemon::control::SnapshotConsistency::Crash,
            takeovers: Takeovers::default(),
            name,
            level,
            first_primary,
            pair,
            host,
            state_file,
            state,
            last_restart: None,
            nics,
            start_pending: false,
            announce_at: Vec::new(),
            vm_spec,
            serving: false,
            registered: false,
            peer_beat: None,
            peer_timeout: host_config.peer_timeout,
            host_config,
            holding_since: None,
            disk_holding_since: None,
            last_reconcile: None,
            warned_cannot_take_over: false,
            started_at: now,
        };
        runner.report_start(events);
        Ok(runner)
    }

    /// `ftvm snapshot create` without `--app-consistent` takes snapshots of this
    /// consistency (the VM's `snapshot_consistency`).
    pub fn with_snapshot_consistency(
        mut self,
        consistency: crate::daemon::control::SnapshotConsistency,
    ) -> VmRunner {
        self.snapshot_consistency = consistency;
        self
    }

    /// The start-up event: the role this host starts in, or that the VM is unprotected.
    fn report_start(&self, events: &mut Events) {
        match self.state.role {
            _ if !self.state.protected => events.warn(
                &self.name,
                format!(
                    "not protected (ftvm unprotect): {}",
                    if self.state.role == Role::Primary {
                        "the VM runs here alone"
                    } else {
                        "nothing runs here"
                    }
                ),
                "`ftvm protect` on the primary to protect it again",
            ),
            Role::Secondary => {
                // The first step starts the disk daemons (`supervise`): none start while
                // the host is disabled.
                events.info(
                    &self.name,
                    format!(
                        "starting as secondary at generation {}: disks wait for the primary",
                        self.state.generation
                    ),
                );
            }
            Role::Primary => events.info(
                &self.name,
                format!(
                    "starting as primary at generation {}: the VM starts once the peer is \
                     heard or the witness confirms",
                    self.state.generation
                ),
            ),
        }
    }

    /// One step: supervise the processes, read the disks, run the state machine.
    pub fn tick(&mut self, context: &mut Context<'_>) {
        self.take_guest_reports(context);
        self.take_guest_agent_reports(context);
        self.take_disk_reports(context);
        self.tick_level3(context);
        self.tick_migration(context);
        self.tick_prestart(context);
        self.announce_due();
        self.nics.poll(context.events);
        if !self.state.protected {
            self.tick_unprotected(context);
            return;
        }
        self.supervise(context.events);
        self.poll_disks();
        if !self.registered && context.witness.reachable() {
            self.registered = context.witness.send(&WitnessRequest::Register {
                pair: self.host_pair(),
                vm: self.name.clone(),
                grant: Grant {
                    generation: 1,
                    holder: self.first_primary.clone(),
                },
            });
        }
        let view = self.disk_view();
        self.warn_if_stranded(view, context);
        let actions = self.host.tick(context.now, view);
        self.execute(actions, context);
        self.reconcile(context);
        if self.start_pending && (self.serving || self.prestarted) {
            self.try_start_vm(context);
        }
    }

    /// Unprotected: the primary runs its disks alone (degraded, every write recorded for
    /// the resync that protecting again will need) and the VM; the secondary runs nothing.
    /// No claims: the witness refuses the other host's anyway.
    fn tick_unprotected(&mut self, context: &mut Context<'_>) {
        if self.state.role == Role::Secondary {
            let running = self.disks.iter().any(|disk| disk.process.is_some());
            if running || self.nics.any_running() {
                self.shutdown(context.events);
            }
            return;
        }
        self.supervise(context.events);
        self.poll_disks();
        if !self.serving {
            if self.pending.is_none() {
                self.serve(None);
            }
            return;
        }
        if self.start_pending {
            self.try_start_vm(context);
        }
        if !self.reconcile_due() {
            return;
        }
        for index in 0..self.disks.len() {
            let waiting = matches!(
                self.replication(index),
                Some(disk::Replication::Primary(disk::PrimaryStatus {
                    mode: disk::Mode::Holding | disk::Mode::Connecting,
                    ..
                }))
            );
            if waiting && self.disks[index].idle() {
                self.disks[index].order(disk::Order::ContinueDegraded(None));
            }
        }
    }

    /// A secondary whose primary is lost but whose copy is not UpToDate (its sync had not
    /// finished) never takes over; the operator must know the VM is down and why.
    fn warn_if_stranded(&mut self, view: DiskView, context: &mut Context<'_>) {
        let heard = self
            .peer_beat
            .as_ref()
            .map_or(self.started_at, |(_, heard)| *heard);
        let silent = context.now.saturating_sub(heard) > 2 * self.peer_timeout;
        if self.host.role() != Role::Secondary || !silent || view.consistent {
            self.warned_cannot_take_over = false;
            return;
        }
        if self.warned_cannot_take_over {
            return;
        }
        self.warned_cannot_take_over = true;
        context.events.error(
            &self.name,
            format!(
                "{} is not heard, and this host's copy is not UpToDate (its sync has not \
                 finished): the VM cannot be restarted here without losing data",
                self.pair.peer
            ),
            &format!("bring {} back; the VM restarts there", self.pair.peer),
        );
    }

    pub fn on_beat(&mut self, beat: VmBeat, context: &mut Context<'_>) {
        self.follow_protection(&beat, context);
        self.follow_level(&beat, context);
        if !self.state.protected {
            self.peer_beat = Some((beat, context.now));
            return;
        }
        let actions = self.host.on_heartbeat(
            context.now,
            crate::host::Heartbeat {
                from: self.peer_id(),
                role: beat.role,
                generation: beat.generation,
            },
        );
        self.peer_beat = Some((beat, context.now));
        self.execute(actions, context);
    }

    pub fn on_verdict(&mut self, verdict: Verdict<String>, context: &mut Context<'_>) {
        if !self.state.protected {
            return;
        }
        let verdict = match verdict {
            Verdict::Granted { generation } => Verdict::Granted { generation },
            Verdict::Refused { current, holder } => {
                if self.host.mode() == Mode::Holding || self.host.role() == Role::Secondary {
                    context.events.info(
                        &self.name,
                        format!("the witness refused: generation {current} is held by {holder}"),
                    );
                }
                Verdict::Refused {
                    current,
                    holder: if holder == self.pair.me {
                        self.pair.my_id()
                    } else {
                        self.peer_id()
                    },
                }
            }
        };
        let actions = self.host.on_verdict(verdict);
        self.execute(actions, context);
    }

    pub fn on_registered(&mut self, grant: Option<Grant<String>>, context: &mut Context<'_>) {
        if let Some(grant) = grant {
            context.events.info(
                &self.name,
                format!(
                    "registered with the witness: generation {} held by {}",
                    grant.generation, grant.holder
                ),
            );
        }
    }

    /// This VM's line in the heartbeat.
    pub fn beat(&self) -> VmBeat {
        VmBeat {
            vm: self.name.clone(),
            role: self.host.role(),
            generation: self.host.generation(),
            state: self.state_word(),
            sync_percent: self.own_sync_percent(),
            protected: self.state.protected,
            level: self.level,
            checkpoints: self.beat_checkpoints(),
            running: self.guest.pid.is_some()
                && !self.guest.paused
                && self.restore.is_none()
                && !self.prestarted,
            moving: self.host.role() == Role::Primary && self.migrating(),
        }
    }

    pub fn status(&self, now: Millis) -> VmStatus {
        let role = self.host.role();
        let peer_beat = self.fresh_peer_beat(now);
        let (primary, secondary) = match role {
            Role::Primary => (Some(self.pair.me.clone()), Some(self.pair.peer.clone())),
            Role::Secondary => {
                let peer_is_primary = peer_beat.is_some_and(|beat| beat.role == Role::Primary);
                (
                    peer_is_primary.then(|| self.pair.peer.clone()),
                    Some(self.pair.me.clone()),
                )
            }
        };
        let (state, sync_percent) = match (role, peer_beat) {
            (Role::Secondary, Some(beat)) if beat.role == Role::Primary => {
                (beat.state.clone(), beat.sync_percent)
            }
            _ => (self.state_word(), self.own_sync_percent()),
        };
        VmStatus {
            name: self.name.clone(),
            level: self.level,
            role,
            state,
            primary,
            secondary,
            generation: self.host.generation(),
            sync_percent,
            vm_pid: self.guest.pid,
            vm_prestarted: self.prestarted,
            vm_paused: self.guest.pid.is_some() && self.guest.paused,
            stopped_by_operator: self.guest.stopped_by_operator,
            domain: self.is_domain(),
            disk_pids: self.disks.iter().map(DiskDaemon::pid).collect(),
            disks: self.disks.iter().map(|disk| disk.status.clone()).collect(),
            nics: self.nics.status(),
            checkpoint: self.level3_status(),
            migration: self.migration_status(),
            takeovers: self.takeovers.count,
            last_takeover_ms: self.takeovers.last_ms,
        }
    }

    /// Called while the witness is unreachable: a primary that has held writes for a lost
    /// peer for a whole timeout is cut from everything, and stops (fenced) rather than
    /// hold its VM for ever while the peer may be taking over.
    pub fn isolated(&mut self, context: &mut Context<'_>) {
        let Some(since) = self.holding_since else {
            return;
        };
        if context.now.saturating_sub(since) < self.peer_timeout {
            return;
        }
        self.holding_since = None;
        context.events.error(
            &self.name,
            format!(
                "cut from {} and from the witness: fencing this host's copy",
                self.pair.peer
            ),
            "restore the links; this host follows the peer, or resumes if nobody took over",
        );
        let actions = self.host.fence_isolated();
        self.execute(actions, context);
    }

    /// The witness granted this host the VM: a takeover begins, dated from the last
    /// heartbeat heard from the peer (about when it was lost).
    fn takeover_began(&mut self, now: Millis) {
        let since = self.peer_beat.as_ref().map_or(now, |(_, heard)| *heard);
        self.takeovers.since = Some(since.min(now));
    }

    /// The VM runs here (booted, or restored from its replica): the takeover is done.
    fn takeover_done(&mut self, now: Millis) {
        if let Some(since) = self.takeovers.since.take() {
            self.takeovers.count += 1;
            self.takeovers.last_ms = Some(now.saturating_sub(since));
        }
    }

    fn host_pair(&self) -> HostPair {
        HostPair::new(&self.pair.me, &self.pair.peer)
    }

    fn peer_id(&self) -> HostId {
        self.pair.my_id().peer()
    }

    fn fresh_peer_beat(&self, now: Millis) -> Option<&VmBeat> {
        self.peer_beat
            .as_ref()
            .filter(|(_, heard)| now.saturating_sub(*heard) <= self.peer_timeout)
            .map(|(beat, _)| beat)
    }

    fn save_state(
        &mut self,
        role: Role,
        generation: Generation,
        protected: bool,
        events: &mut Events,
    ) -> bool {
        let state = VmState {
            role,
            generation,
            protected,
            level: Some(self.level),
        };
        match self.state_file.save(&state) {
            Ok(()) => {
                self.state = state;
                true
            }
            Err(error) => {
                events.error(
                    &self.name,
                    format!("cannot save the VM's state: {error}"),
                    "check the state directory's disk",
                );
                false
            }
        }
    }

    fn execute(&mut self, actions: Vec<Action>, context: &mut Context<'_>) {
        for action in actions {
            match action {
                // The daemon sends one heartbeat for all its VMs.
                Action::SendHeartbeat(_) => {}
                Action::AskWitness(claim) => self.ask_witness(claim, context),
                Action::Disk(command) => self.apply(command, context),
            }
        }
    }

    fn ask_witness(&mut self, claim: Claim, context: &mut Context<'_>) {
        let sent = context.witness.send(&WitnessRequest::Claim {
            pair: self.host_pair(),
            vm: self.name.clone(),
            claim: Claim {
                host: self.pair.name(claim.host),
                generation: claim.generation,
                data_generation: claim.data_generation,
            },
        });
        if !sent {
            log::debug!("{}: witness unreachable, claim not sent", self.name);
        }
    }
}
