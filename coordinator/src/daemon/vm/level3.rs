//! Level 3 on this host: the VM's checkpoint engine (`ftvm-checkpoint`) and the failover
//! that restores the VM from its replica instead of booting it.
//!
//! - The primary runs the engine as `primary` while the VM runs here mirrored and both
//!   copies are in sync; the secondary runs it as `secondary` (the replica) while the VM is
//!   protected.
//! - A primary engine is stopped gracefully (`SIGTERM`: the output it holds goes out, the
//!   VM runs on at Level 2) only when that output may go out: the operator lowered the
//!   level, or the witness granted this host the VM without its peer. Anywhere else (fenced,
//!   the VM stopped or handed over) it is killed: frames of checkpoints the peer never
//!   acknowledged must never reach the LAN, the peer may be restoring an older one.
//! - After the witness's grant, a secondary with a restorable replica `freeze`s it, promotes
//!   the disks at its epoch (`promote GEN EPOCH`: later epochs dropped, so the disks match
//!   the memory), starts QEMU with `-incoming defer` on the replica RAM file and has the
//!   engine `restore` into it: the guest goes on from the checkpoint. Without a restorable
//!   replica (its first full copy never finished) the VM boots from its disk as at Level 2.
//!
//! The engine has its own agent thread: its process and control socket never hold up the
//! deciding thread.

use std::path::Path;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use control_protocol::disk;
use serde_json::Value;

use super::{Context, PendingKind, VmRunner};

use crate::daemon::agent::Agent;
use crate::daemon::control_client::{self, AskError};
use crate::daemon::events::Events;
use crate::daemon::processes::{start_engine, EngineSpec, Supervised};
use crate::daemon::wake;
use crate::host::{Mode, Role};
use crate::Generation;

/// How often a running engine is asked for its status.
const POLL: Duration = Duration::from_millis(500);
/// Least time between two starts of the engine, doubled after each failure up to the most.
const RESTART_BACKOFF: Duration = Duration::from_secs(2);
const MOST_BACKOFF: Duration = Duration::from_secs(30);
/// How long `status` and `freeze` may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a restore may take (device state and the replica's pages into a new QEMU).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a `handover` may take (the engine's own limit is 20 s).
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(25);
/// How long the engine's control socket, and QEMU's monitor for it, may take to appear.
const SOCKET_WAIT: Duration = Duration::from_secs(20);

/// What one job of the engine's agent did.
#[derive(Debug)]
pub(super) enum EngineReport {
    Started(Result<(u32, Role), String>),
    Polled(Result<Value, String>),
    /// `freeze`: the replica's checkpoint (epoch) if it is restorable, or why not.
    Frozen(Result<u64, String>),
    Restored(Result<Value, String>),
    /// `handover` (`ftvm migrate`): the final checkpoint's epoch, committed by the peer,
    /// with the guest left stopped; or why not (the guest runs on).
    HandedOver(Result<u64, String>),
    Stopped,
    Ended(u32, String),
}

/// The VM's checkpoint engine as the deciding thread sees it.
#[derive(Debug)]
pub(super) struct Engine {
    pub spec: EngineSpec,
    agent: Agent<Supervised, EngineReport>,
    results: Receiver<EngineReport>,
    /// The running engine's pid and role.
    running: Option<(u32, Role)>,
    /// A start is queued and not reported yet.
    starting: Option<Role>,
    last_start: Option<Instant>,
    /// Starts that failed (or engines that ended) in a row.
    failures: u32,
    /// The last failure reported as an event (the same one is not reported again).
    last_failure: Option<String>,
    last_poll: Option<Instant>,
    /// The engine's last `status`.
    pub status: Option<Value>,
}

/// A Level 3 failover under way on this host (the former secondary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Restore {
    /// `freeze` asked; the disks are promoted at the answer's epoch.
    Freezing { generation: Generation },
    /// The disks are being promoted at `epoch`.
    Promoting { epoch: u64 },
    /// QEMU is started with `-incoming defer`; then the engine restores into it.
    Launching { epoch: u64 },
    /// `restore` asked.
    Restoring { epoch: u64 },
}

impl Engine {
    pub fn new(vm: &str, spec: EngineSpec) -> Result<Engine, String> {
        let (sender, results) = wake::channel();
        let agent = Agent::start(&format!("{vm}-checkpoint"), sender, EngineReport::Ended)
            .map_err(|error| format!("cannot start a thread: {error}"))?;
        Ok(Engine {
            spec,
            agent,
            results,
            running: None,
            starting: None,
            last_start: None,
            failures: 0,
            last_failure: None,
            last_poll: None,
            status: None,
        })
    }

    /// The role of the engine running here or being started.
    pub fn role(&self) -> Option<Role> {
        self.starting.or(self.running.map(|(_, role)| role))
    }

    pub fn pid(&self) -> Option<u32> {
        self.running.map(|(pid, _)| pid)
    }

    fn start(&mut self, role: Role, generation: Generation) {
        let backoff = RESTART_BACKOFF
            .saturating_mul(1 << self.failures.min(4))
            .min(MOST_BACKOFF);
        if self.last_start.is_some_and(|last| last.elapsed() < backoff) {
            return;
        }
        self.last_start = Some(Instant::now());
        self.starting = Some(role);
        self.status = None;
        let spec = self.spec.clone();
        self.agent.run("start", move |child| {
            if let Some(mut old) = child.take() {
                old.stop();
            }
            // A control socket left by a killed engine would be taken for the new one's.
            let _ = std::fs::remove_file(&spec.control);
            if let Some(dir) = spec.ram_file.parent() {
                if let Err(error) = std::fs::create_dir_all(dir) {
                    return EngineReport::Started(Err(format!(
                        "cannot create {}: {error}",
                        dir.display()
                    )));
                }
            }
            match start_engine(&spec, role, generation) {
                Ok(mut process) => {
                    let pid = process.pid();
                    let deadline = Instant::now() + SOCKET_WAIT;
                    while !spec.control.exists() && Instant::now() < deadline {
                        if let Some(status) = process.exited() {
                            return EngineReport::Started(Err(format!(
                                "it ended at once ({status}); see {}",
                                spec.log.display()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    *child = Some(process);
                    EngineReport::Started(Ok((pid, role)))
                }
                Err(error) => EngineReport::Started(Err(error.to_string())),
            }
        });
    }

    /// Stops the engine: `graceful` with SIGTERM (a primary releases the output it holds),
    /// else SIGKILL (nothing it holds goes out).
    fn stop(&mut self, graceful: bool) {
        if self.role().is_none() {
            return;
        }
        self.running = None;
        self.starting = None;
        self.status = None;
        self.agent.run("stop", move |child| {
            if let Some(mut process) = child.take() {
                if graceful {
                    process.stop();
                } else {
                    process.kill();
                }
            }
            EngineReport::Stopped
        });
    }

    fn poll(&mut self) {
        if self.running.is_none()
            || !self.agent.idle()
            || self.last_poll.is_some_and(|last| last.elapsed() < POLL)
        {
            return;
        }
        self.last_poll = Some(Instant::now());
        let control = self.spec.control.clone();
        self.agent.run("status", move |_| {
            EngineReport::Polled(ask(&control, "status", ASK_TIMEOUT))
        });
    }

    /// Whether `failure` is news (an event), or the same as last time (a log line).
    fn failed(&mut self, failure: &str) -> bool {
        self.failures = self.failures.saturating_add(1);
        let news = self.last_failure.as_deref() != Some(failure);
        self.last_failure = Some(failure.to_owned());
        news
    }

    fn freeze(&mut self) {
        let control = self.spec.control.clone();
        self.agent.run("freeze", move |_| {
            let frozen = ask(&control, "freeze", ASK_TIMEOUT).and_then(|answer| {
                let epoch = answer["epoch"].as_u64();
                match (answer["restorable"].as_bool(), epoch) {
                    (Some(true), Some(epoch)) => Ok(epoch),
                    _ => Err(format!("the replica is not restorable: {answer}")),
                }
            });
            EngineReport::Frozen(frozen)
        });
    }

    fn restore(&mut self) {
        let control = self.spec.control.clone();
        let qmp = self.spec.qmp.clone();
        self.agent.run("restore", move |_| {
            wait_for_socket(&qmp);
            let command = format!("restore {}", qmp.display());
            EngineReport::Restored(ask(&control, &command, RESTORE_TIMEOUT))
        });
    }

    /// Stops a secondary engine whose primary no longer checkpoints (the level lowered, the
    /// VM unprotected or its QEMU ended) and drops the replica: the engine first makes its
    /// record durably not restorable (`drop`), so that no later engine on this host opens
    /// it as a checkpoint of a VM that has run on since (with its output released), and
    /// the RAM file goes, which holds the guest's RAM size in `ram_dir` (memory, on a
    /// tmpfs; a record whose RAM file is missing is not restorable either).
    fn drop_replica(&mut self) {
        let control = self.spec.control.clone();
        let ram = self.spec.ram_file.clone();
        self.running = None;
        self.starting = None;
        self.status = None;
        self.agent.run("drop replica", move |child| {
            if let Err(error) = ask(&control, "drop", ASK_TIMEOUT) {
                log::warn!("the checkpoint engine did not drop its replica ({error}): removing its RAM file");
            }
            if let Some(mut process) = child.take() {
                process.stop();
            }
            match std::fs::remove_file(&ram) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => log::warn!("cannot remove {}: {error}", ram.display()),
            }
            EngineReport::Stopped
        });
    }

    /// Asks a primary engine for the final checkpoint of a live migration.
    pub(super) fn hand_over(&mut self) {
        let control = self.spec.control.clone();
        self.agent.run("handover", move |_| {
            let epoch = ask(&control, "handover", HANDOVER_TIMEOUT).and_then(|answer| {
                match (answer["epoch"].as_u64(), answer["error"].as_str()) {
                    (Some(epoch), _) => Ok(epoch),
                    (None, Some(error)) => Err(error.to_owned()),
                    (None, None) => Err(format!("unexpected answer: {answer}")),
                }
            });
            EngineReport::HandedOver(epoch)
        });
    }

    /// Ends a primary engine that handed over (it takes no more epochs) with SIGTERM: it
    /// holds no output (the final checkpoint released all of it). A new one starts when
    /// wanted.
    pub(super) fn end_after_handover(&mut self) {
        self.stop(true);
    }

    /// Waits for the queued jobs, stops the engine and ends the agent (ftvmd stops).
    pub fn finish(self) {
        self.agent.finish();
    }
}

fn ask(control: &Path, command: &str, timeout: Duration) -> Result<Value, String> {
    control_client::ask::<Value>(control, &command, timeout)
        .map_err(|error: AskError| error.describe())
}

/// Waits (bounded) for a socket a process just started will create.
fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + SOCKET_WAIT;
    while !path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl VmRunner {
    /// The engine this host should run now, if any.
    ///
    /// The two hosts agree through the heartbeat (`VmBeat::checkpoints`): the secondary
    /// keeps a replica only while its primary says it checkpoints, and a primary that stops
    /// checkpointing (the level lowered, a disk reading from the peer) keeps its engine,
    /// and so holds the guest's output, until the secondary says it dropped its replica:
    /// once output of an uncommitted checkpoint is out, no host may restore that replica.
    fn engine_wanted(&self) -> Option<Role> {
        if self.restore.is_some() {
            return Some(Role::Secondary);
        }
        if self.level != 3 || !self.state.protected || self.engine.spec.port.is_none() {
            return self.keep_primary_engine();
        }
        match self.host.role() {
            Role::Secondary => self
                .peer_beat
                .as_ref()
                .is_some_and(|(beat, _)| beat.role == Role::Primary && beat.checkpoints)
                .then_some(Role::Secondary),
            Role::Primary => {
                let running = self.serving
                    && self.guest.pid.is_some()
                    && !self.guest.paused
                    && self.vm_spec.ram_track.is_some()
                    && !self.level3_suspended();
                match self.host.mode() {
                    // Started once both copies are in sync (a checkpoint needs the disks').
                    Mode::Mirrored if running && self.state_word() == "Protected" => {
                        Some(Role::Primary)
                    }
                    _ => self.keep_primary_engine(),
                }
            }
        }
    }

    /// A running primary engine stays while the peer may still restore its replica (its
    /// last heartbeat says it keeps one) or while the peer is lost and the witness asked.
    fn keep_primary_engine(&self) -> Option<Role> {
        if self.engine.role() != Some(Role::Primary) || self.host.role() != Role::Primary {
            return None;
        }
        let peer_keeps_replica = self
            .peer_beat
            .as_ref()
            .is_some_and(|(beat, _)| beat.role == Role::Secondary && beat.checkpoints);
        match self.host.mode() {
            Mode::Holding => Some(Role::Primary),
            Mode::Mirrored if peer_keeps_replica => Some(Role::Primary),
            _ => None,
        }
    }

    /// Level 3 is suspended while a disk of this primary reads from the peer (its local
    /// copy failed, RemoteOnly): that disk ended its epochs, so no checkpoint can commit.
    pub(super) fn level3_suspended(&self) -> bool {
        self.host.role() == Role::Primary
            && (0..self.disks.len()).any(|index| {
                matches!(
                    self.replication(index),
                    Some(disk::Replication::Primary(primary))
                        if primary.local_disk != disk::LocalDisk::Healthy
                )
            })
    }

    /// What this host says in its heartbeat: a primary that it takes checkpoints (or
    /// wants to: the VM runs or starts here), a secondary that it keeps a replica. A VM
    /// whose QEMU ended (a guest that powered off) has nothing to checkpoint, and no
    /// replica of it may be restored.
    pub(super) fn beat_checkpoints(&self) -> bool {
        match self.host.role() {
            Role::Primary => {
                self.level == 3
                    && self.state.protected
                    && !self.level3_suspended()
                    && (self.guest.present() || self.start_pending)
            }
            Role::Secondary => self.engine.role() == Some(Role::Secondary),
        }
    }

    /// One step of Level 3: the engine's reports, then the engine this host should run.
    pub(super) fn tick_level3(&mut self, context: &mut Context<'_>) {
        self.take_engine_reports(context);
        let suspended = self.level == 3 && self.level3_suspended();
        if suspended != self.level3_was_suspended {
            self.level3_was_suspended = suspended;
            if suspended {
                context.events.warn(
                    &self.name,
                    "Level 3 suspended: a disk reads from the peer (its local copy failed), \
                     so no checkpoint can commit; the VM is protected at Level 2 meanwhile"
                        .into(),
                    "repair the disk (`ftvm status` names it); checkpoints resume once both \
                     copies are in sync",
                );
            } else {
                context.events.info(
                    &self.name,
                    "Level 3 resumes: checkpoints start once both copies are in sync".into(),
                );
            }
        }
        let wanted = self.engine_wanted();
        let current = self.engine.role();
        if current != wanted {
            if let Some(current) = current {
                // Output held by a primary goes out only where nobody else can run the VM
                // from an older checkpoint: the level was lowered, or the witness granted
                // this host the VM alone.
                // (Mirrored: the peer said it keeps no replica; Degraded: the witness
                // granted this host the VM alone; unprotected: the witness refuses the
                // peer. Fenced or holding: the peer may be restoring.)
                let graceful = current == Role::Secondary
                    || (self.host.role() == Role::Primary
                        && (!self.state.protected
                            || matches!(self.host.mode(), Mode::Mirrored | Mode::Degraded)));
                let dropped = current == Role::Secondary
                    && wanted.is_none()
                    && self.host.role() == Role::Secondary
                    && self.restore.is_none();
                if dropped {
                    self.engine.drop_replica();
                } else {
                    self.engine.stop(graceful);
                }
                let why = match (wanted, graceful) {
                    (Some(_), _) => "its role changes",
                    (None, true) => "Level 3 ends here; held output released",
                    (None, false) => "held output dropped",
                };
                context.events.info(
                    &self.name,
                    format!("checkpoint engine ({current:?}) stopped: {why}"),
                );
            }
            if let Some(wanted) = wanted {
                self.engine.start(wanted, self.host.generation());
            }
        }
        self.engine.poll();
    }

    fn take_engine_reports(&mut self, context: &mut Context<'_>) {
        while let Ok(report) = self.engine.results.try_recv() {
            match report {
                EngineReport::Started(Ok((pid, role))) => {
                    if self.engine.starting != Some(role) {
                        continue;
                    }
                    self.engine.starting = None;
                    self.engine.running = Some((pid, role));
                    self.engine.failures = 0;
                    context.events.info(
                        &self.name,
                        format!("checkpoint engine started as {role:?} (pid {pid})"),
                    );
                }
                EngineReport::Started(Err(error)) => {
                    self.engine.starting = None;
                    if !self.engine.failed(&error) {
                        log::warn!("{}: cannot start the checkpoint engine: {error}", self.name);
                        continue;
                    }
                    context.events.error(
                        &self.name,
                        format!("cannot start the checkpoint engine: {error}"),
                        "check bin_dir (ftvm-checkpoint) and checkpoint_port",
                    );
                }
                EngineReport::Polled(Ok(status)) => {
                    if self.engine.running.is_some() {
                        self.engine.status = Some(status);
                    }
                }
                EngineReport::Polled(Err(error)) => {
                    log::debug!("{}: checkpoint engine status: {error}", self.name);
                }
                EngineReport::Frozen(result) => self.on_frozen(result, context),
                EngineReport::Restored(result) => self.on_restored(result, context),
                EngineReport::HandedOver(result) => self.on_handed_over(result, context),
                EngineReport::Stopped => {}
                EngineReport::Ended(pid, status) => {
                    if self.engine.pid() != Some(pid) {
                        continue;
                    }
                    self.engine.running = None;
                    self.engine.status = None;
                    match self.restore {
                        Some(Restore::Freezing { .. }) => {
                            self.on_frozen(Err(format!("the engine ended ({status})")), context)
                        }
                        Some(Restore::Launching { .. } | Restore::Restoring { .. }) => {
                            self.on_restored(Err(format!("the engine ended ({status})")), context)
                        }
                        // Restarted, it reopens the frozen replica (no primary feeds it).
                        Some(Restore::Promoting { .. }) | None => {}
                    }
                    if !self.engine.failed(&status) {
                        log::warn!("{}: the checkpoint engine ended again: {status}", self.name);
                        continue;
                    }
                    context.events.warn(
                        &self.name,
                        format!("the checkpoint engine ended: {status}"),
                        &format!("see {}", self.engine.spec.log.display()),
                    );
                }
            }
        }
    }

    /// The witness granted `generation`: restore the VM from the replica if there is one,
    /// else `false` (the caller promotes the disks and boots the VM as at Level 2).
    pub(super) fn begin_restore(&mut self, generation: Generation, events: &mut Events) -> bool {
        if self.level != 3 || self.engine.running.map(|(_, role)| role) != Some(Role::Secondary) {
            return false;
        }
        events.info(
            &self.name,
            "Level 3: freezing the replica to restore the VM from its last checkpoint".into(),
        );
        self.restore = Some(Restore::Freezing { generation });
        self.engine.freeze();
        true
    }

    fn on_frozen(&mut self, result: Result<u64, String>, context: &mut Context<'_>) {
        let Some(Restore::Freezing { generation }) = self.restore else {
            return;
        };
        match result {
            Ok(epoch) => {
                context.events.info(
                    &self.name,
                    format!("replica frozen at checkpoint {epoch}: promoting the disks at it"),
                );
                self.restore = Some(Restore::Promoting { epoch });
                let ticket = self.begin(PendingKind::Promote);
                for disk in &mut self.disks {
                    disk.promote_at(ticket, generation, epoch);
                }
            }
            Err(error) => {
                self.restore = None;
                if let Some(level) = self.incoming_migration.take() {
                    if level != self.level {
                        self.set_level(level, context);
                    }
                }
                context.events.error(
                    &self.name,
                    format!("Level 3 restore impossible ({error}): the VM boots from its disk"),
                    "the guest restarts as at Level 2; nothing acknowledged is lost",
                );
                self.promote_disks(generation);
            }
        }
    }

    /// The disks were promoted at the replica's epoch: start QEMU to receive it, or (a
    /// move) restore into the one started ahead.
    pub(super) fn launch_for_restore(&mut self, context: &mut Context<'_>) -> bool {
        let Some(Restore::Promoting { epoch }) = self.restore else {
            return false;
        };
        // QEMU restores (and starts) from here on: ftvmd's fast steps would take its CPU.
        self.end_switchover();
        if self.use_prestarted(context) {
            if self.guest.pid.is_some() {
                self.restore = Some(Restore::Restoring { epoch });
                self.vm_spec.incoming = false;
                self.engine.restore();
            } else {
                // Still starting: its launch report hands it to the engine.
                self.restore = Some(Restore::Launching { epoch });
            }
            return true;
        }
        self.restore = Some(Restore::Launching { epoch });
        self.vm_spec.incoming = true;
        self.start_vm(context);
        true
    }

    /// QEMU for the restore runs: the engine restores into it.
    pub(super) fn on_launched_for_restore(&mut self) -> bool {
        let Some(Restore::Launching { epoch }) = self.restore else {
            return false;
        };
        self.vm_spec.incoming = false;
        self.restore = Some(Restore::Restoring { epoch });
        self.engine.restore();
        true
    }

    fn on_restored(&mut self, result: Result<Value, String>, context: &mut Context<'_>) {
        let Some(Restore::Restoring { epoch } | Restore::Launching { epoch }) = self.restore else {
            return;
        };
        self.restore = None;
        self.vm_spec.incoming = false;
        match result {
            Ok(answer) => {
                self.takeover_done(context.now);
                if let Some(level) = self.incoming_migration.take() {
                    context.events.info(
                        &self.name,
                        format!(
                            "migrated: the VM runs on {} from {}'s final checkpoint {epoch}, \
                             without a reboot; {answer}",
                            self.pair.me, self.pair.peer
                        ),
                    );
                    if level != self.level {
                        self.set_level(level, context);
                    }
                } else {
                    context.events.warn(
                        &self.name,
                        format!(
                            "VM restored on {} from checkpoint {epoch} (Level 3): it runs on \
                             with its memory and sessions; {answer}",
                            self.pair.me
                        ),
                        &format!(
                            "bring {} back; protection returns by itself",
                            self.pair.peer
                        ),
                    );
                }
                self.announce_again();
            }
            Err(error) => {
                if let Some(level) = self.incoming_migration.take() {
                    if level != self.level {
                        self.set_level(level, context);
                    }
                }
                context.events.error(
                    &self.name,
                    format!("Level 3 restore failed ({error}): the VM boots from its disk"),
                    &format!(
                        "see {} and {}",
                        self.engine.spec.log.display(),
                        self.vm_spec.log.display()
                    ),
                );
                self.stop_vm(context.events, "restore failed");
                self.start_vm(context);
            }
        }
    }

    /// QEMU could not be started for the restore: the VM boots from its disk instead.
    pub(super) fn on_launch_failed_during_restore(
        &mut self,
        error: String,
        context: &mut Context<'_>,
    ) {
        if matches!(self.restore, Some(Restore::Launching { .. })) {
            self.on_restored(Err(error), context);
        }
    }

    /// Kills the engine (ftvmd stops, the VM stops here): nothing it holds goes out.
    pub(super) fn stop_engine_now(&mut self) {
        self.restore = None;
        self.engine.stop(false);
    }

    /// `ftvm status`'s Level 3 part: the engine's own status.
    pub(super) fn level3_status(&self) -> Option<Value> {
        self.engine.status.clone()
    }
}
