//! The operator's commands on one VM (`ftvm protect`, `unprotect`, `failover`) and the
//! answers that complete them: the witness's `Standalone`, the peer's protection and
//! `TakeOver`.

use std::time::Instant;

use control_protocol::disk;

use super::{Context, VmRunner};
use crate::daemon::links::{PeerMessage, VmBeat};
use crate::host::{Host, Mode, Role};
use crate::witness_daemon::WitnessRequest;
use crate::Generation;

impl VmRunner {
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
        if self.migrating() {
            return Err(format!(
                "{} is moving to {}: change its level once it runs there (or after \
                 `ftvm migrate --cancel {}`)",
                self.name, self.pair.peer, self.name
            ));
        }
        if level == 3 {
            self.check_level3()?;
        }
        if self.state.protected {
            if self.level == level {
                return Ok(format!(
                    "{} is already protected at level {level} with {}",
                    self.name, self.pair.peer
                ));
            }
            if self.state.role != Role::Primary {
                return Err(format!(
                    "{} is not primary here; run `ftvm protect {} --level {level}` on {}",
                    self.name, self.name, self.pair.peer
                ));
            }
            let before = self.level;
            self.set_level_durably(level, context);
            let how = match (before, level) {
                (_, 3) => {
                    "checkpoints start once both copies are in sync (`ftvm status` shows them)"
                }
                (3, _) => "checkpoints stop; the guest's held output is released",
                _ => "nothing to restart",
            };
            return Ok(format!(
                "{} now protected at level {level} with {} ({how})",
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

    /// Level 3 needs the engine's port, the engine and QEMU's RAM tracking.
    pub(super) fn check_level3(&self) -> Result<(), String> {
        if self.engine.spec.port.is_none() {
            return Err(format!(
                "{} has no checkpoint_port: add one to its [[vm]] section on both hosts (a \
                 free port on the A-links, like 7460) and restart ftvmd",
                self.name
            ));
        }
        if !self.engine.spec.binary.exists() {
            return Err(format!(
                "{} is missing: Level 3 needs the checkpoint engine (see bin_dir)",
                self.engine.spec.binary.display()
            ));
        }
        if self.vm_spec.ram_track.is_none() {
            return Err(
                "libftvm_ram_track.so is missing from bin_dir: QEMU runs without the RAM \
                 tracking Level 3 needs (install it, restart ftvmd and the VM)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Sets and saves the level (the secondary follows it in the heartbeat).
    pub(super) fn set_level(&mut self, level: u8, context: &mut Context<'_>) {
        self.level = level;
        // Saved in the background, so that a slow sync of the state directory does not
        // hold up the main loop and its heartbeats. Nothing waits for it: a secondary
        // started again takes the primary's level from its heartbeat; a new primary whose
        // save a crash cut short runs at the level it had saved before (the one its
        // secondary followed during the move), until the operator sets it again.
        self.state.level = Some(level);
        self.state_file.save_in_background(self.state);
        context
            .events
            .info(&self.name, format!("protection level set to {level}"));
    }

    /// [`VmRunner::set_level`], durable before it returns (`ftvm protect --level`).
    fn set_level_durably(&mut self, level: u8, context: &mut Context<'_>) {
        self.level = level;
        let (role, generation, protected) =
            (self.state.role, self.state.generation, self.state.protected);
        self.save_state(role, generation, protected, context.events);
        context
            .events
            .info(&self.name, format!("protection level set to {level}"));
    }

    /// A secondary follows its primary's level (announced in its heartbeat).
    pub(super) fn follow_level(&mut self, beat: &VmBeat, context: &mut Context<'_>) {
        if self.state.role == Role::Secondary
            && beat.role == Role::Primary
            && beat.level != self.level
        {
            self.set_level(beat.level, context);
        }
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
        for disk in &mut self.disks {
            disk.order(disk::Order::ContinueDegraded(Some(generation)));
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
    pub(super) fn follow_protection(&mut self, beat: &VmBeat, context: &mut Context<'_>) {
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

    /// Planned failover, asked on the primary: stops the VM, fences the disks, and lets
    /// the peer take over. Refused unless both copies are in sync.
    pub fn hand_over(&mut self, context: &mut Context<'_>) -> Result<String, String> {
        if self.migrating() {
            return Err(format!(
                "{} is moving to {} (`ftvm migrate`); `ftvm migrate --cancel {}` first",
                self.name, self.pair.peer, self.name
            ));
        }
        self.check_move("failover", context)?;
        self.plan_role_change();
        self.stop_vm(context.events, "planned failover");
        let actions = self.host.hand_over(context.now);
        self.execute(actions, context);
        context.peer.send(
            &PeerMessage::TakeOver {
                vm: self.name.clone(),
                live: None,
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

    /// The role change under way was asked for (see [`VmRunner::planned`]).
    pub(super) fn plan_role_change(&mut self) {
        self.planned_until = Some(Instant::now() + super::PLANNED_GRACE);
    }

    /// A role change asked for (a planned failover or a move, on either host) began less
    /// than [`super::PLANNED_GRACE`] ago: its steps are no cause for an alert.
    pub fn planned(&self) -> bool {
        self.planned_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// A planned failover or a move of this VM is under way (this primary stopped and
    /// fenced it, or it moves it live).
    pub fn handing_over(&self) -> bool {
        self.host.role() == Role::Primary && (self.host.mode() == Mode::Fenced || self.migrating())
    }

    /// The peer handed the VM over: `live` (`ftvm migrate`, with the level to run it at)
    /// after its final checkpoint, else stopped (`ftvm failover`).
    pub fn take_over(&mut self, live: Option<u8>, context: &mut Context<'_>) {
        if !self.state.protected {
            return;
        }
        let view = self.disk_view();
        let actions = self.host.take_over(context.now, view);
        if actions.is_empty() {
            return; // the same handover on the other A-link, or nothing to take over
        }
        self.incoming_migration = live;
        if live.is_some() {
            self.begin_switchover();
        }
        self.plan_role_change();
        context.events.info(
            &self.name,
            format!(
                "{} handed the VM over: claiming it from the witness",
                self.pair.peer
            ),
        );
        self.execute(actions, context);
    }
}
