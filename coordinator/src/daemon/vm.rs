//! One protected VM on this host: the coordinator's [`Host`] state machine, wired to the
//! VM's disk daemons, its NIC daemons, its QEMU and the witness.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::events::Events;
use super::links::{PeerLink, VmBeat, WitnessLink};
use super::nics::{Need, NicStatus, Nics, Readiness};
use super::processes::{
    disk_command, disk_order, touch, DiskProcess, DiskSpec, NicSpec, RunningVm, VmLauncher, VmSpec,
};
use super::state::{StateFile, VmState};
use crate::host::{Action, DiskCommand, DiskView, Host, HostConfig, Mode, Role};
use crate::witness::{Claim, Grant, Verdict};
use crate::witness_daemon::{HostPair, WitnessRequest};
use crate::{Generation, HostId, Millis};

/// How often the disk daemons are asked for their status.
const DISK_POLL: Duration = Duration::from_millis(100);
/// Least time between two restarts of a crashed disk daemon.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);

/// What the daemon passes to a VM for one step.
pub struct Context<'a> {
    pub now: Millis,
    pub events: &'a mut Events,
    pub peer: &'a PeerLink,
    pub witness: &'a WitnessLink,
    pub launcher: &'a dyn VmLauncher,
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
    /// Each disk daemon's process id while it runs.
    pub disk_pids: Vec<Option<u32>>,
    /// The disk daemons' own `status`, for detail.
    pub disks: Vec<serde_json::Value>,
    /// Each NIC: its daemon here and the path the guest's frames take.
    #[serde(default)]
    pub nics: Vec<NicStatus>,
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

pub struct VmRunner {
    pub name: String,
    pub level: u8,
    first_primary: String,
    pair: Pair,
    host: Host,
    state_file: StateFile,
    state: VmState,
    disk_specs: Vec<DiskSpec>,
    disks: Vec<Option<DiskProcess>>,
    last_restart: Option<Instant>,
    /// The NIC daemons run where the VM runs, from just before it starts until it stops;
    /// those of NICs with a redundant uplink also in standby while the VM is protected.
    nics: Nics,
    /// QEMU is to start here as soon as the NIC daemons answer.
    start_pending: bool,
    /// When to announce the VM's MACs again (a RARP from each NIC's TAP) after it started.
    announce_at: Vec<Instant>,
    vm_spec: VmSpec,
    vm: Option<Box<dyn RunningVm>>,
    /// The disks run as primary and the VM should run here.
    serving: bool,
    disk_status: Vec<Option<serde_json::Value>>,
    last_poll: Option<Instant>,
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
        now: Millis,
        events: &mut Events,
    ) -> Result<VmRunner, String> {
        std::fs::create_dir_all(&dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
        let state_file = StateFile::new(&dir);
        let state = match state_file.load().map_err(|error| error.to_string())? {
            Some(state) => state,
            None => {
                let state = VmState {
                    role: if first_primary == pair.me {
                        Role::Primary
                    } else {
                        Role::Secondary
                    },
                    generation: 1,
                    protected: true,
                };
                state_file
                    .save(&state)
                    .map_err(|error| format!("cannot save the state of {name}: {error}"))?;
                state
            }
        };
        touch(&vm_spec.console)
            .map_err(|error| format!("cannot create {}: {error}", vm_spec.console.display()))?;
        let host = Host::start(pair.my_id(), host_config, state.role, state.generation, now);
        let nics = Nics::new(&name, nic_specs);
        let runner = VmRunner {
            disks: disk_specs.iter().map(|_| None).collect(),
            disk_status: disk_specs.iter().map(|_| None).collect(),
            name,
            level,
            first_primary,
            pair,
            host,
            state_file,
            state,
            disk_specs,
            last_restart: None,
            nics,
            start_pending: false,
            announce_at: Vec::new(),
            vm_spec,
            vm: None,
            serving: false,
            last_poll: None,
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
        match state.role {
            _ if !state.protected => events.warn(
                &runner.name,
                format!(
                    "not protected (ftvm unprotect): {}",
                    if state.role == Role::Primary {
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
                    &runner.name,
                    format!(
                        "starting as secondary at generation {}: disks wait for the primary",
                        state.generation
                    ),
                );
            }
            Role::Primary => events.info(
                &runner.name,
                format!(
                    "starting as primary at generation {}: the VM starts once the peer is \
                     heard or the witness confirms",
                    state.generation
                ),
            ),
        }
        Ok(runner)
    }

    /// One step: supervise the processes, read the disks, run the state machine.
    pub fn tick(&mut self, context: &mut Context<'_>) {
        self.announce_due();
        self.nics.poll();
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
        if self.start_pending && self.serving {
            self.try_start_vm(context);
        }
    }

    /// Unprotected: the primary runs its disks alone (degraded, every write recorded for
    /// the resync that protecting again will need) and the VM; the secondary runs nothing.
    /// No claims: the witness refuses the other host's anyway.
    fn tick_unprotected(&mut self, context: &mut Context<'_>) {
        if self.state.role == Role::Secondary {
            if self.disks.iter().any(Option::is_some) || self.nics.any_running() {
                self.shutdown(context.events);
            }
            return;
        }
        self.supervise(context.events);
        self.poll_disks();
        if !self.serving {
            self.serve(None, context);
            return;
        }
        if self.start_pending {
            self.try_start_vm(context);
        }
        if !self.reconcile_due() {
            return;
        }
        for index in 0..self.disk_specs.len() {
            let waiting = self.replication(index).is_some_and(|replication| {
                matches!(replication["mode"].as_str(), Some("Holding" | "Connecting"))
            });
            if waiting {
                if let Err(error) = disk_order(&self.disk_specs[index].control, "continue-degraded")
                {
                    log::debug!("{}: {error}", self.name);
                }
            }
        }
    }

    /// `ftvm unprotect`, on the primary: the witness first records that this host runs the
    /// VM alone (then no other host can claim it), then the peer stops its copy.
    pub fn unprotect(&mut self, context: &mut Context<'_>) -> Result<String, String> {
        if !self.state.protected {
            return Ok(format!("{} is already unprotected", self.name));
        }
        self.check_primary_for("unprotect", context)?;
        self.ask_standalone(true, context)?;
        Ok(format!(
            "unprotecting {}: the witness is asked; `ftvm status` shows Unprotected once done",
            self.name
        ))
    }

    /// `ftvm protect` of an unprotected VM, on its primary: the witness grants this host
    /// the next generation and lets the peer claim again; the peer's copy then resyncs
    /// what was written alone.
    pub fn protect(&mut self, level: u8, context: &mut Context<'_>) -> Result<String, String> {
        if let Some(mac) = self.nics.redundant_uplink().filter(|_| level < 2) {
            return Err(format!(
                "{}'s NIC {mac} has a redundant uplink, which is Level 2 only: remove uplink \
                 and link_port from its [[vm.nic]] on both hosts (and restart ftvmd) first",
                self.name
            ));
        }
        if self.state.protected {
            if self.level == level {
                return Ok(format!(
                    "{} is already protected at level {level} with {}",
                    self.name, self.pair.peer
                ));
            }
            self.level = level;
            context
                .events
                .info(&self.name, format!("protection level set to {level}"));
            return Ok(format!(
                "{} now protected at level {level} with {}",
                self.name, self.pair.peer
            ));
        }
        self.check_primary_for("protect", context)?;
        self.level = level;
        self.ask_standalone(false, context)?;
        Ok(format!(
            "protecting {} at level {level} with {}: the witness is asked; the peer's copy \
             resyncs next",
            self.name, self.pair.peer
        ))
    }

    fn check_primary_for(&self, what: &str, context: &Context<'_>) -> Result<(), String> {
        if self.state.role != Role::Primary {
            return Err(format!(
                "{} is not primary here; run `ftvm {what} {}` on {}",
                self.name, self.name, self.pair.peer
            ));
        }
        if !self.serving {
            return Err(format!(
                "{} is not running here ({}); try again once it runs",
                self.name,
                self.state_word()
            ));
        }
        if !context.witness.reachable() {
            return Err(format!(
                "the witness is unreachable: {what} needs it, so that the two hosts never \
                 both run {}",
                self.name
            ));
        }
        Ok(())
    }

    fn ask_standalone(
        &mut self,
        standalone: bool,
        context: &mut Context<'_>,
    ) -> Result<(), String> {
        let sent = context.witness.send(&WitnessRequest::Standalone {
            pair: self.host_pair(),
            vm: self.name.clone(),
            generation: self.state.generation,
            standalone,
        });
        if sent {
            Ok(())
        } else {
            Err("cannot send to the witness; try again".into())
        }
    }

    /// The witness's answer to `Standalone`.
    pub fn on_standalone(
        &mut self,
        standalone: bool,
        generation: Generation,
        context: &mut Context<'_>,
    ) {
        if self.state.role != Role::Primary || self.state.protected != standalone {
            return; // nothing to change (a repeated answer)
        }
        if standalone {
            if self.save_state(Role::Primary, self.state.generation, false, context.events) {
                context.events.warn(
                    &self.name,
                    format!(
                        "unprotected: runs on {} alone; the witness refuses {}'s claims",
                        self.pair.me, self.pair.peer
                    ),
                    "`ftvm protect` to protect it again (a delta resync follows)",
                );
            }
            return;
        }
        if !self.save_state(Role::Primary, generation, true, context.events) {
            return;
        }
        for spec in &self.disk_specs {
            let order = format!("continue-degraded {generation}");
            if let Err(error) = disk_order(&spec.control, &order) {
                log::warn!("{}: {error}", self.name);
            }
        }
        // A fresh state machine: primary at the new generation, waiting to hear its
        // secondary (or claiming the next generation if it does not come).
        self.host = Host::start(
            self.pair.my_id(),
            self.host_config,
            Role::Primary,
            generation,
            context.now,
        );
        context.events.info(
            &self.name,
            format!(
                "protected again at generation {generation}: {} resyncs its copy",
                self.pair.peer
            ),
        );
    }

    /// A secondary follows its primary's protection (announced in its heartbeat).
    fn follow_protection(&mut self, beat: &VmBeat, context: &mut Context<'_>) {
        if self.state.role != Role::Secondary
            || beat.role != Role::Primary
            || beat.protected == self.state.protected
        {
            return;
        }
        let generation = self.state.generation.max(beat.generation);
        if !self.save_state(Role::Secondary, generation, beat.protected, context.events) {
            return;
        }
        if beat.protected {
            self.host = Host::start(
                self.pair.my_id(),
                self.host_config,
                Role::Secondary,
                self.host.generation().max(beat.generation),
                context.now,
            );
            context.events.info(
                &self.name,
                format!(
                    "{} protects the VM again: this copy resyncs",
                    self.pair.peer
                ),
            );
        } else {
            self.shutdown(context.events);
            context.events.warn(
                &self.name,
                format!(
                    "{} runs the VM unprotected: this copy is stopped",
                    self.pair.peer
                ),
                "`ftvm protect` on the primary to protect it again",
            );
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

    /// Brings the disks in line with the state machine: the generation the witness
    /// granted, and running alone when degraded (a `continue-degraded` can be refused when
    /// it races the disk's own detection of the lost peer, so it is repeated here). Also
    /// notices disks that lost the peer while its heartbeats still arrive.
    fn reconcile(&mut self, context: &mut Context<'_>) {
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

    pub fn on_beat(&mut self, beat: VmBeat, context: &mut Context<'_>) {
        self.follow_protection(&beat, context);
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

    /// Planned failover, asked on the primary: stops the VM, fences the disks, and lets
    /// the peer take over. Refused unless both copies are in sync.
    pub fn hand_over(&mut self, context: &mut Context<'_>) -> Result<String, String> {
        if self.host.role() != Role::Primary {
            return Err(format!(
                "{} is not primary here; run `ftvm failover {}` on {}",
                self.name, self.name, self.pair.peer
            ));
        }
        if self.host.mode() != Mode::Mirrored || self.state_word() != "Protected" {
            return Err(format!(
                "{} is {}: a planned failover needs both copies in sync (Protected); wait \
                 for the resync or the peer",
                self.name,
                self.state_word()
            ));
        }
        let peer_ready = self
            .fresh_peer_beat(context.now)
            .is_some_and(|beat| beat.role == Role::Secondary && beat.state == "Protected");
        if !peer_ready {
            return Err(format!(
                "{} has not reported its copy of {} as in sync; try again in a moment",
                self.pair.peer, self.name
            ));
        }
        self.stop_vm(context.events, "planned failover");
        let actions = self.host.hand_over(context.now);
        self.execute(actions, context);
        context.peer.send(
            &super::links::PeerMessage::TakeOver {
                vm: self.name.clone(),
            },
            true,
        );
        context.events.info(
            &self.name,
            format!(
                "planned failover: VM stopped and disks fenced here; {} takes over",
                self.pair.peer
            ),
        );
        Ok(format!("{} hands over to {}", self.name, self.pair.peer))
    }

    /// A planned failover of this VM is under way (this primary stopped and fenced it).
    pub fn handing_over(&self) -> bool {
        self.host.role() == Role::Primary && self.host.mode() == Mode::Fenced
    }

    pub fn take_over(&mut self, context: &mut Context<'_>) {
        if !self.state.protected {
            return;
        }
        context.events.info(
            &self.name,
            format!(
                "{} handed the VM over: claiming it from the witness",
                self.pair.peer
            ),
        );
        let view = self.disk_view();
        let actions = self.host.take_over(context.now, view);
        self.execute(actions, context);
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
            vm_pid: self.vm.as_ref().map(|vm| vm.pid()),
            disk_pids: self
                .disks
                .iter()
                .map(|disk| disk.as_ref().map(|disk| disk.process.pid()))
                .collect(),
            disks: self
                .disk_status
                .iter()
                .map(|status| status.clone().unwrap_or(serde_json::Value::Null))
                .collect(),
            nics: self.nics.status(),
        }
    }

    /// Stops the VM, its NIC daemons and its disk daemons (daemon shutdown, host disabled,
    /// the peer unprotected the VM).
    pub fn shutdown(&mut self, events: &mut Events) {
        self.stop_vm(events, "ftvmd stopping");
        self.nics.stop_unwanted(Need::Nothing);
        self.serving = false;
        for slot in &mut self.disks {
            if let Some(mut disk) = slot.take() {
                disk.process.stop();
            }
        }
        self.disk_status
            .iter_mut()
            .for_each(|status| *status = None);
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

    fn replication(&self, index: usize) -> Option<&serde_json::Value> {
        self.disk_status
            .get(index)
            .and_then(Option::as_ref)
            .map(|status| &status["replication"])
    }

    /// The worst disk state, as one word.
    fn state_word(&self) -> String {
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

    fn own_sync_percent(&self) -> Option<f64> {
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

    fn disk_view(&self) -> DiskView {
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
            let generation = replication["generation"].as_u64().unwrap_or(0);
            let consistent = match replication["role"].as_str() {
                Some("primary") => true,
                Some("secondary") => replication["disk_state"] == "UpToDate",
                _ => false,
            };
            view.consistent &= consistent;
            view.data_generation = view.data_generation.min(generation);
        }
        view
    }

    fn poll_disks(&mut self) {
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

    fn supervise(&mut self, events: &mut Events) {
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
                Action::Disk(command) => {
                    self.apply(command, context);
                    // The disks changed: the next look at them must ask again.
                    self.last_poll = None;
                }
            }
        }
    }

    /// Whether a reconciliation of the disks is due (at most one per poll period).
    fn reconcile_due(&mut self) -> bool {
        if self
            .last_reconcile
            .is_some_and(|last| last.elapsed() < DISK_POLL)
        {
            return false;
        }
        self.last_reconcile = Some(Instant::now());
        true
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

    fn apply(&mut self, command: DiskCommand, context: &mut Context<'_>) {
        let events = &mut *context.events;
        match command {
            DiskCommand::Hold => {
                self.holding_since = Some(context.now);
                events.warn(
                    &self.name,
                    format!(
                        "{} lost on every A-link: writes held, asking the witness",
                        self.pair.peer
                    ),
                    "",
                );
            }
            DiskCommand::Resume { generation } => {
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
            DiskCommand::ContinueDegraded { generation } => {
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
            DiskCommand::Fence => {
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
            DiskCommand::Promote { generation } => {
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
            DiskCommand::Demote { generation } => {
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
                            context.events.warn(
                                &self.name,
                                format!("demote of disk {} failed ({error}): restarting it as secondary", spec.serial),
                                "",
                            );
                            if let Some(mut disk) = self.disks[index].take() {
                                disk.process.stop();
                            }
                        }
                    }
                }
                self.start_disks(Role::Secondary, context.events);
            }
        }
    }

    /// Runs the disks as primary (at `generation` after a grant) and the VM.
    fn serve(&mut self, generation: Option<Generation>, context: &mut Context<'_>) {
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

    /// Starts QEMU here once the NIC daemons answer: at once, or in a later step
    /// ([`VmRunner::tick`] retries while `start_pending`), so that the main loop never waits.
    fn start_vm(&mut self, context: &mut Context<'_>) {
        self.start_pending = true;
        self.try_start_vm(context);
    }

    fn try_start_vm(&mut self, context: &mut Context<'_>) {
        if self.vm.is_some() {
            self.start_pending = false;
            return;
        }
        match self.nics.start_for_vm(context.events) {
            Readiness::Ready => self.start_pending = false,
            Readiness::Waiting => return,
            Readiness::Failed => {
                self.start_pending = false;
                return;
            }
        }
        match context.launcher.launch(&self.vm_spec) {
            Ok(vm) => {
                context.events.info(
                    &self.name,
                    format!("VM started on {} (pid {})", self.pair.me, vm.pid()),
                );
                self.vm = Some(vm);
                // The LAN must learn at once that the VM's MACs are here now; repeated,
                // as QEMU's announce-self does, in case the first frames are lost.
                let now = Instant::now();
                self.announce_at = [0, 1000, 3000]
                    .iter()
                    .map(|&ms| now + Duration::from_millis(ms))
                    .collect();
                self.announce_due();
            }
            Err(error) => context.events.error(
                &self.name,
                format!("cannot start the VM: {error}"),
                "check the qemu setting and the VM's qemu_args",
            ),
        }
    }

    /// Sends the announcements that are due.
    fn announce_due(&mut self) {
        let now = Instant::now();
        if !self.announce_at.iter().any(|&at| at <= now) {
            return;
        }
        self.announce_at.retain(|&at| at > now);
        self.nics.announce();
    }

    /// Which NIC daemons the VM needs here now.
    fn nic_need(&self) -> Need {
        if self.vm.is_some() || self.start_pending {
            Need::Vm
        } else if self.state.protected {
            Need::Standby
        } else {
            Need::Nothing
        }
    }

    fn stop_vm(&mut self, events: &mut Events, why: &str) {
        self.start_pending = false;
        self.nics.cancel_start();
        if let Some(mut vm) = self.vm.take() {
            vm.stop();
            events.info(
                &self.name,
                format!("VM stopped on {} ({why})", self.pair.me),
            );
        }
        self.announce_at.clear();
        // The standby daemons stay: they relay for the peer, and serve QEMU if the VM
        // comes back here.
        self.nics.stop_unwanted(self.nic_need());
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
        "Inconsistent" => 5,
        "Unknown" => 6,
        _ => 7,
    }
}
