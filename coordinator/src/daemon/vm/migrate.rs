//! `ftvm migrate`: the running VM moves to the peer without a reboot, its memory, devices
//! and TCP sessions with it, for host maintenance.
//!
//! A move is a planned Level 3 failover with a final checkpoint, so it runs through the
//! same code as the failover after a host loss:
//!
//! 1. **Preparing.** A VM below Level 3 is raised to it for the move (the peer follows the
//!    level in the heartbeat and keeps a replica); the primary engine copies the RAM once
//!    and then checkpoints as usual. Nothing about the guest changes meanwhile except
//!    that its output waits for each checkpoint's commit.
//! 2. **Final checkpoint.** Once checkpoints commit, the engine is asked to `handover`:
//!    it takes one last checkpoint with the guest left stopped (every request the disk and
//!    NIC daemons accepted is drained at `GET_VRING_BASE`) and answers when the peer
//!    committed it: every frame the guest sent has gone out and the peer's replica and
//!    disks hold the guest's state here, nothing newer exists.
//!    Then its disks `settle` (each flushes its copy, has the secondary flush its own and
//!    forgets its active extents: the copies are equal there), so that the peer resyncs
//!    nothing after the move; after [`SETTLE_WAIT`] the move goes on without them (the
//!    peer then resyncs the extents they still mark).
//! 3. **Handed over.** This host holds ([`Host::hand_over_live`]): the stopped QEMU and the
//!    disks are kept, and the peer is told to take over (`TakeOver` with the level to go
//!    back to). The peer claims the next generation from the witness, promotes its disks at
//!    the final checkpoint (nothing is dropped: it is the last one) and restores the VM
//!    as after a host loss, into the QEMU it started while the move prepared (see
//!    [`VmRunner::tick_prestart`]); its heartbeat as primary then makes
//!    this host its secondary (QEMU stopped here, disks demoted, a delta resync of nothing
//!    but what the demotion finds).
//!
//! A move called off before the final checkpoint (`ftvm migrate --cancel`, the peer lost,
//! a copy out of sync, the time limit) leaves the VM running here at its level. After
//! it, the witness decides as after any loss: a peer that never takes over lets this host
//! resume the stopped guest (heard as secondary once the handover window ends, or granted
//! the next generation when it stays silent); a peer that took over and died leaves the
//! VM to the peer's return, as any failover does.
//!
//! [`Host::hand_over_live`]: crate::host::Host::hand_over_live

use std::time::{Duration, Instant};

use control_protocol::disk;

use super::level3::Restore;
use super::{Context, VmRunner};
use crate::daemon::links::PeerMessage;
use crate::host::{Mode, Role};

/// How long the guest, stopped at the final checkpoint, waits for the disks to `settle`
/// before the peer is told to take over without it. A settle costs two flushes and a
/// round trip (under 2 ms on the test rig at load 12) and adds that to the move's
/// downtime; a disk slower than this is resynced after the move instead.
pub(super) const SETTLE_WAIT: Duration = Duration::from_millis(500);

/// How long the peer may take to run the VM once it took the generation over.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest ftvmd steps fast for one switchover (a final checkpoint that takes longer
/// under load, then the rest of the move, steps at the normal pace again).
pub(super) const SWITCHOVER_WINDOW: Duration = Duration::from_secs(5);
/// How long a move for maintenance may prepare.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest `ftvm migrate --timeout` accepted.
pub const MOST_TIMEOUT: Duration = Duration::from_secs(3600);

/// A move of the VM to the peer, on its primary.
#[derive(Clone, Debug)]
pub(super) struct Migration {
    phase: Phase,
    /// The level to go back to once moved (or called off).
    level_before: u8,
    started: Instant,
    /// Preparing longer than this calls the move off.
    timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Level 3 runs until checkpoints commit.
    Preparing,
    /// The engine takes the final checkpoint.
    Finalizing,
    /// The final checkpoint (its epoch) committed; the disks settle (`waiting` of them
    /// have not answered) until `until`.
    Settling {
        epoch: u64,
        waiting: usize,
        until: Instant,
    },
    /// The final checkpoint (its epoch) committed; the peer takes over.
    HandedOver { epoch: u64 },
}

impl Phase {
    fn word(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::Finalizing => "final-checkpoint",
            Phase::Settling { .. } => "settling",
            Phase::HandedOver { .. } => "handed-over",
        }
    }
}

impl VmRunner {
    /// `ftvm migrate`, on the primary: starts moving the VM to the peer. Refused unless
    /// both copies are in sync and Level 3 can run here.
    pub fn migrate(
        &mut self,
        timeout: Duration,
        context: &mut Context<'_>,
    ) -> Result<String, String> {
        if let Some(migration) = &self.migration {
            return Err(format!(
                "{} is already moving to {} ({}, for {} s); `ftvm migrate --cancel {}` calls it off",
                self.name,
                self.pair.peer,
                migration.phase.word(),
                migration.started.elapsed().as_secs(),
                self.name
            ));
        }
        self.check_move("migrate", context)?;
        if self.guest.pid.is_none() || self.guest.paused {
            return Err(format!(
                "{} does not run here (its QEMU ended, or it is paused): nothing to move \
                 live; `ftvm failover {}` starts it on {}",
                self.name, self.name, self.pair.peer
            ));
        }
        self.check_level3()
            .map_err(|error| format!("{} cannot move without a reboot: {error}", self.name))?;
        let level_before = self.level;
        self.migration = Some(Migration {
            phase: Phase::Preparing,
            level_before,
            started: Instant::now(),
            timeout: timeout.min(MOST_TIMEOUT),
        });
        // Not saved: a restarted ftvmd forgets the move and runs the VM at its own level
        // again (the peer follows).
        self.level = 3;
        let how = if level_before == 3 {
            "final checkpoint next".to_owned()
        } else {
            format!("Level 3 until its RAM is copied (it was at level {level_before}), then the final checkpoint")
        };
        context.events.info(
            &self.name,
            format!("migration to {} started: {how}", self.pair.peer),
        );
        Ok(format!(
            "moving {} to {}: {how}; `ftvm status` shows the progress",
            self.name, self.pair.peer
        ))
    }

    /// `ftvm host disable`: moves the VM live, or where it cannot (or `restart`), hands it
    /// over stopped (it reboots on the peer), saying why.
    pub fn move_for_maintenance(
        &mut self,
        restart: bool,
        context: &mut Context<'_>,
    ) -> Result<String, String> {
        if restart {
            return self.hand_over(context);
        }
        self.check_move("host disable", context)?;
        if self.guest.pid.is_none() {
            // Nothing runs to move: the peer starts it.
            return self.hand_over(context);
        }
        match self.check_level3() {
            Ok(()) => self.migrate(DEFAULT_TIMEOUT, context),
            Err(why) => {
                context.events.warn(
                    &self.name,
                    format!(
                        "cannot move without a reboot ({why}): it restarts on {}",
                        self.pair.peer
                    ),
                    "give the VM a checkpoint_port (and bin_dir the engine) to move it live",
                );
                self.hand_over(context)
            }
        }
    }

    /// `ftvm migrate --cancel`: calls off a move that has not reached its final checkpoint.
    pub fn cancel_migration(&mut self, context: &mut Context<'_>) -> Result<String, String> {
        match self.migration.as_ref().map(|migration| migration.phase) {
            None => Err(format!("{} is not moving", self.name)),
            Some(Phase::Preparing) => {
                self.call_off_migration("cancelled by the operator", context);
                Ok(format!(
                    "migration of {} cancelled: it runs on {} at level {}",
                    self.name, self.pair.me, self.level
                ))
            }
            Some(phase) => Err(format!(
                "{} is past its final checkpoint ({}): the move completes or the witness \
                 decides; it cannot be cancelled now",
                self.name,
                phase.word()
            )),
        }
    }

    /// A move (or planned failover) needs this host primary, running the VM, both copies
    /// in sync and the peer saying so.
    pub(super) fn check_move(&self, what: &str, context: &Context<'_>) -> Result<(), String> {
        if self.host.role() != Role::Primary {
            return Err(format!(
                "{} is not primary here; run `ftvm {what} {}` on {}",
                self.name, self.name, self.pair.peer
            ));
        }
        if !self.state.protected {
            return Err(format!(
                "{} is not protected: `ftvm protect {} --level 2 --peer {}` first",
                self.name, self.name, self.pair.peer
            ));
        }
        if self.state_word() != "Protected" {
            return Err(format!(
                "{} is {}: a move needs both copies in sync (Protected); wait for the \
                 resync or the peer",
                self.name,
                self.state_word()
            ));
        }
        if self.host.mode() != Mode::Mirrored {
            // Both copies are in sync, but this host has not yet heard the peer as its
            // secondary since it took the VM over (or it holds for the witness).
            return Err(format!(
                "{} does not mirror to {} yet ({:?}); try again in a moment",
                self.name,
                self.pair.peer,
                self.host.mode()
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
        Ok(())
    }

    /// The move is under way on this host (it is the source), until the VM runs on the
    /// peer or the move is called off.
    pub fn migrating(&self) -> bool {
        self.migration.is_some()
    }

    /// The guest runs nowhere, or is about to stop for it, and the next step is this
    /// host's: a move's final checkpoint, the disks' settle and the `TakeOver` here (the
    /// source, until it sent `TakeOver`), the claim, the freeze and the promotion there
    /// (the destination, or any Level 3 restore, until the restore is asked). Each of these
    /// steps waited for the next turn of ftvmd's main loop (10 ms) to go on, so the loop
    /// turns every millisecond meanwhile (for at most [`SWITCHOVER_WINDOW`] per
    /// switchover): the guest's downtime is the work, not the waits between. Not while
    /// QEMU restores and warms up: the loop's turns would take its CPU.
    pub fn switching_over(&self) -> bool {
        matches!(
            self.restore,
            Some(Restore::Freezing { .. } | Restore::Promoting { .. })
        ) || self
            .switchover_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// A switchover starts here ([`VmRunner::switching_over`]).
    pub(super) fn begin_switchover(&mut self) {
        self.switchover_until = Some(Instant::now() + SWITCHOVER_WINDOW);
    }

    /// The switchover is over here: the VM runs (there or here), or the move was called off.
    pub(super) fn end_switchover(&mut self) {
        self.switchover_until = None;
    }

    /// `ftvm status`: the move's phase and how long it has run.
    pub(super) fn migration_status(&self) -> Option<serde_json::Value> {
        self.migration.as_ref().map(|migration| {
            serde_json::json!({
                "to": self.pair.peer,
                "phase": migration.phase.word(),
                "seconds": migration.started.elapsed().as_secs_f64(),
                "level_before": migration.level_before,
            })
        })
    }

    /// One step of a move under way.
    pub(super) fn tick_migration(&mut self, context: &mut Context<'_>) {
        let Some(migration) = self.migration.clone() else {
            return;
        };
        match migration.phase {
            Phase::Preparing => {
                let problem =
                    if self.host.role() != Role::Primary || self.host.mode() != Mode::Mirrored {
                        Some(format!("{} is lost or took over", self.pair.peer))
                    } else if !self.state.protected {
                        Some("the VM was unprotected".to_owned())
                    } else if self.guest.pid.is_none() {
                        Some("the VM's QEMU ended".to_owned())
                    } else if self.level3_suspended() {
                        Some("a disk of this host failed (it reads from the peer)".to_owned())
                    } else if migration.started.elapsed() > migration.timeout {
                        Some(format!(
                            "checkpoints did not commit within {} s",
                            migration.timeout.as_secs()
                        ))
                    } else {
                        None
                    };
                if let Some(problem) = problem {
                    self.call_off_migration(&problem, context);
                    return;
                }
                let committing = self.engine.role() == Some(Role::Primary)
                    && self.engine.status.as_ref().is_some_and(|status| {
                        status["state"] == "protected"
                            && status["problem"].is_null()
                            && status["stats"]["committed_epoch"].as_u64().is_some()
                    });
                let replica_kept = self
                    .fresh_peer_beat(context.now)
                    .is_some_and(|beat| beat.role == Role::Secondary && beat.checkpoints);
                if committing && replica_kept && !self.guest.paused {
                    self.set_migration_phase(Phase::Finalizing);
                    self.begin_switchover();
                    self.engine.hand_over();
                    context.events.info(
                        &self.name,
                        format!(
                            "migration to {}: checkpoints commit; taking the final one",
                            self.pair.peer
                        ),
                    );
                }
            }
            // Waits for the engine's answer (`on_handed_over`).
            Phase::Finalizing => {}
            Phase::Settling { epoch, until, .. } => {
                if Instant::now() >= until {
                    log::warn!(
                        "{}: the disks did not settle within {} ms: {} will resync the \
                         extents they marked",
                        self.name,
                        SETTLE_WAIT.as_millis(),
                        self.pair.peer
                    );
                    self.hand_over_to_peer(epoch, context);
                }
            }
            Phase::HandedOver { epoch } => match (self.host.role(), self.host.mode()) {
                (Role::Secondary, _) => {
                    // The peer took the generation over; the move is done once the VM runs
                    // there (restored, or booted if the restore failed: its events say).
                    let running_there = self
                        .fresh_peer_beat(context.now)
                        .is_some_and(|beat| beat.role == Role::Primary && beat.running);
                    let seconds = migration.started.elapsed().as_secs_f64();
                    if running_there {
                        self.migration = None;
                        context.events.info(
                            &self.name,
                            format!(
                                "migration done in {seconds:.1} s: {} runs the VM from \
                                 checkpoint {epoch}; this host is its secondary",
                                self.pair.peer
                            ),
                        );
                    } else if migration.started.elapsed() > migration.timeout + RUN_TIMEOUT {
                        self.migration = None;
                        context.events.error(
                            &self.name,
                            format!(
                                "migration: {} took the VM over but does not report it \
                                 running after {seconds:.0} s",
                                self.pair.peer
                            ),
                            &format!("see `ftvm events` on {}", self.pair.peer),
                        );
                    }
                }
                (Role::Primary, Mode::Mirrored | Mode::Degraded) => {
                    // The peer never took over and the witness let this host go on: the
                    // stopped guest resumes here (`apply_resume`, `serve`).
                    self.engine.end_after_handover();
                    self.call_off_migration(
                        &format!(
                            "{} did not take over; the VM resumes here from where it stopped",
                            self.pair.peer
                        ),
                        context,
                    );
                }
                (Role::Primary, Mode::Fenced) => {
                    self.migration = None;
                    self.level = migration.level_before;
                    context.events.error(
                        &self.name,
                        format!(
                            "migration to {} failed after the final checkpoint: the witness \
                             gave the VM to {}, which is lost; the VM is stopped here",
                            self.pair.peer, self.pair.peer
                        ),
                        &format!(
                            "bring {} back: it runs the VM from the final checkpoint",
                            self.pair.peer
                        ),
                    );
                }
                (Role::Primary, Mode::Holding) => {}
            },
        }
    }

    /// The engine's answer to `handover`.
    pub(super) fn on_handed_over(
        &mut self,
        result: Result<u64, String>,
        context: &mut Context<'_>,
    ) {
        if self.migration.as_ref().map(|migration| migration.phase) != Some(Phase::Finalizing) {
            if let Ok(epoch) = result {
                // Called off meanwhile (the peer lost): the engine stopped the guest for a
                // handover nobody follows; a new engine starts and the guest resumes.
                log::warn!(
                    "{}: final checkpoint {epoch} arrived after the move was called off",
                    self.name
                );
                self.engine.end_after_handover();
                self.guest.paused = true;
                self.resume_guest(context.events, "migration called off");
            }
            return;
        }
        match result {
            Ok(epoch) => {
                // The engine left the guest stopped (QEMU postmigrate).
                self.guest.paused = true;
                for disk in &mut self.disks {
                    disk.order(disk::Order::Settle);
                }
                self.set_migration_phase(Phase::Settling {
                    epoch,
                    waiting: self.disks.len(),
                    until: Instant::now() + SETTLE_WAIT,
                });
            }
            Err(error) => self.call_off_migration(&format!("final checkpoint: {error}"), context),
        }
    }

    /// A disk's answer to `settle`: once every disk answered, the peer takes over.
    pub(super) fn on_settled(
        &mut self,
        serial: &str,
        result: Result<String, String>,
        context: &mut Context<'_>,
    ) {
        match &result {
            Ok(result) => log::info!("{}: disk {serial}: {result}", self.name),
            Err(error) => log::warn!(
                "{}: disk {serial}: {error}: {} will resync the extents it marked",
                self.name,
                self.pair.peer
            ),
        }
        let Some(migration) = self.migration.as_mut() else {
            return;
        };
        if let Phase::Settling { epoch, waiting, .. } = &mut migration.phase {
            *waiting = waiting.saturating_sub(1);
            if *waiting == 0 {
                let epoch = *epoch;
                self.hand_over_to_peer(epoch, context);
            }
        }
    }

    /// The disks settled (or [`SETTLE_WAIT`] passed): this host holds and the peer takes
    /// over.
    fn hand_over_to_peer(&mut self, epoch: u64, context: &mut Context<'_>) {
        self.set_migration_phase(Phase::HandedOver { epoch });
        // The next steps are the peer's.
        self.end_switchover();
        self.plan_role_change();
        let actions = self.host.hand_over_live(context.now);
        self.execute(actions, context);
        let level = self
            .migration
            .as_ref()
            .map_or(self.level, |migration| migration.level_before);
        context.peer.send(
            &PeerMessage::TakeOver {
                vm: self.name.clone(),
                live: Some(level),
            },
            true,
        );
        context.events.info(
            &self.name,
            format!(
                "migration to {}: final checkpoint {epoch} committed, guest stopped \
                 here; {} takes over",
                self.pair.peer, self.pair.peer
            ),
        );
    }

    fn set_migration_phase(&mut self, phase: Phase) {
        if let Some(migration) = &mut self.migration {
            migration.phase = phase;
        }
    }

    /// The move stops before the peer took over: the VM runs on here at its level.
    fn call_off_migration(&mut self, why: &str, context: &mut Context<'_>) {
        let Some(migration) = self.migration.take() else {
            return;
        };
        self.end_switchover();
        if self.host.role() == Role::Primary && self.level != migration.level_before {
            self.level = migration.level_before;
        }
        context.events.warn(
            &self.name,
            format!(
                "migration to {} called off: {why}; the VM runs on {} at level {}",
                self.pair.peer, self.pair.me, self.level
            ),
            "`ftvm migrate` again once `ftvm status` shows Protected",
        );
    }
}

/// The destination's side of a move: its QEMU is started while the move prepares, so that
/// the switchover is only the promotion and the restore (`migrate-incoming`, `cont`).
///
/// While the peer, primary, says it moves the VM here (`VmBeat::moving`) and this host
/// keeps the replica (its secondary engine runs: the replica RAM file exists at its size,
/// and the engine never replaces it), ftvmd starts QEMU with `-incoming defer` on the
/// replica RAM file, as a restore does. QEMU maps the file and reads none of it before
/// `migrate-incoming`; it connects to the disk daemons, still secondaries, and to the NIC
/// daemons, in standby, and negotiates with them, but sends no memory table and no ring
/// until its restored guest runs (`cont`); the disk daemons pop no request before they are
/// promoted and the NIC daemons move no frame before the device starts. Nothing is
/// announced for it and the guest is not paused (it does not run).
///
/// It ends (by its pid, through QEMU's agent) as soon as it is no longer wanted: the move
/// called off, the peer silent (a host loss takes today's path: a fresh QEMU after the
/// promotion), the replica dropped, or this host's role changed without a move's takeover.
impl VmRunner {
    /// One step of the destination's side of a move.
    pub(super) fn tick_prestart(&mut self, context: &mut Context<'_>) {
        let moving_here = self
            .fresh_peer_beat(context.now)
            .is_some_and(|beat| beat.role == Role::Primary && beat.moving);
        if !moving_here {
            self.prestart_tried = false;
        }
        if self.restore.is_some() {
            // A takeover under way decides (`launch_for_restore`).
            return;
        }
        let wanted = moving_here
            && self.host.role() == Role::Secondary
            && self.state.protected
            && self.vm_spec.domain.is_none()
            && self.engine.role() == Some(Role::Secondary)
            && self.engine.pid().is_some();
        if self.prestarted && !wanted {
            let why = if moving_here {
                "this host no longer keeps the replica"
            } else {
                "the move was called off or the peer is silent"
            };
            self.end_prestart(context, why);
        } else if wanted && !self.prestart_tried && !self.guest.present() {
            self.prestart_tried = true;
            self.prestarted = true;
            self.vm_spec.incoming = true;
            context.events.info(
                &self.name,
                format!(
                    "{} moves the VM here: starting QEMU ahead of the final checkpoint \
                     (-incoming defer on the replica)",
                    self.pair.peer
                ),
            );
            self.start_vm(context);
        }
    }

    /// Stops the QEMU started ahead of a move (through its agent, by its pid).
    pub(super) fn end_prestart(&mut self, context: &mut Context<'_>, why: &str) {
        if !self.prestarted {
            return;
        }
        self.stop_vm(
            context.events,
            &format!("the QEMU started ahead of the move is not needed: {why}"),
        );
    }

    /// The takeover promoted the disks: a move's takeover restores into the QEMU started
    /// ahead (`true`); any other (a host loss while the move prepared) stops it and starts
    /// a fresh one, as without a move (`false`).
    pub(super) fn use_prestarted(&mut self, context: &mut Context<'_>) -> bool {
        if !self.prestarted {
            return false;
        }
        if self.incoming_migration.is_none() || !self.guest.present() {
            self.end_prestart(context, "the peer was lost, not handed over");
            return false;
        }
        self.prestarted = false;
        if let Some(pid) = self.guest.pid {
            context.events.info(
                &self.name,
                format!("restoring into the QEMU started ahead of the move (pid {pid})"),
            );
        }
        true
    }
}
