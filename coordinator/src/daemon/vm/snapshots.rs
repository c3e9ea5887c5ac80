//! `ftvm snapshot create|list|delete|revert VM [NAME]` (`docs/ARCHITECTURE.md`,
//! "Snapshots"): on the primary, sent to each of the VM's disk daemons, which take each
//! snapshot on both copies through the mirror; the answer goes back to `ftvm` once every
//! disk has answered. A revert stops the VM first and starts it again afterwards.
//!
//! An application-consistent create (`--app-consistent`, or the VM's
//! `snapshot_consistency`) first has the guest agent freeze the guest's file systems
//! (`guest_agent.rs`), then takes the snapshot as above, and always thaws them afterwards:
//! also when the snapshot failed, and also when the freeze did not answer in time (it may
//! have frozen some). `ftvm` hears the answer once the thaw has answered.

use std::sync::mpsc::Sender;

use control_protocol::disk::{self, Consistency, SnapshotOrder};

use super::{Context, VmRunner};
use crate::daemon::control::{DiskSnapshots, Reply, SnapshotCommand, SnapshotConsistency};
use crate::daemon::guest_agent::{FreezeFailed, Frozen};
use crate::host::{Mode, Role};

/// What a disk daemon answered to a snapshot command.
#[derive(Debug)]
pub(super) enum SnapshotDone {
    Done(String),
    Listed(disk::Snapshots),
}

/// A snapshot command waiting for the disk daemons (and, for a revert, for QEMU to stop).
#[derive(Debug)]
pub(super) struct SnapshotJob {
    order: SnapshotOrder,
    answer: Sender<Reply>,
    /// A revert waits for QEMU's agent to report the VM stopped.
    waiting_for_vm_stop: bool,
    /// The VM ran before a revert: start it again afterwards.
    restart_vm: bool,
    /// A snapshot of several disks waits for QEMU's agent to pause the guest (QMP `stop`
    /// drains every request the disk daemons accepted), so that every disk is taken at the
    /// same point of the guest's writes.
    waiting_for_pause: bool,
    /// The guest was paused for the snapshot: resume it afterwards.
    resume_vm: bool,
    /// `--app-consistent=auto`: without an agent, a crash-consistent snapshot.
    fall_back: bool,
    /// The guest agent is freezing the file systems.
    waiting_for_freeze: bool,
    /// The file systems are frozen, or may be: thaw them at the end.
    thaw: bool,
    /// What the freeze (or its absence) adds to the answer.
    notes: Vec<String>,
    /// Refused before any disk was asked (the freeze failed), with the reason.
    refused: Option<String>,
    results: Vec<Option<Result<SnapshotDone, String>>>,
}

/// The answer to `ftvm snapshot create`, waiting for the thaw.
#[derive(Debug)]
pub(super) struct ThawAnswer {
    answer: Sender<Reply>,
    reply: Reply,
}

impl ThawAnswer {
    /// Sends the snapshot's answer with the thaw's outcome: a thaw that failed makes it an
    /// error, whatever the snapshot did.
    pub fn send(self, thaw: Result<String, String>) {
        let reply = match (self.reply, thaw) {
            (Reply::Done(done), Ok(thawed)) => Reply::Done(format!("{done}; {thawed}")),
            (Reply::Done(done), Err(error)) => Reply::Error(format!("{done}; but {error}")),
            (Reply::Error(failed), Ok(thawed)) => Reply::Error(format!("{failed}; {thawed}")),
            (Reply::Error(failed), Err(error)) => Reply::Error(format!("{failed}; {error}")),
            (other, _) => other,
        };
        let _ = self.answer.send(reply);
    }
}

impl VmRunner {
    /// Starts `command`; the answer goes to `answer` (at once when it is refused).
    pub fn snapshot(
        &mut self,
        command: SnapshotCommand,
        answer: Sender<Reply>,
        context: &mut Context<'_>,
    ) {
        let consistency = match &command {
            SnapshotCommand::Create { consistency, .. } => {
                consistency.unwrap_or(self.snapshot_consistency)
            }
            _ => SnapshotConsistency::Crash,
        };
        let checked = command
            .order()
            .and_then(|order| self.check_snapshot(order))
            .and_then(|order| Ok((self.check_freeze(consistency)?, order)));
        let (freeze, order) = match checked {
            Ok(checked) => checked,
            Err(error) => {
                let _ = answer.send(Reply::Error(error));
                return;
            }
        };
        let mut notes = Vec::new();
        let freeze = match freeze {
            Ok(freeze) => freeze,
            Err(fall_back) => {
                context
                    .events
                    .info(&self.name, format!("{order}: {fall_back}"));
                notes.push(fall_back);
                false
            }
        };
        let revert = matches!(order, SnapshotOrder::Revert(_));
        let restart_vm = revert && self.guest.present();
        self.snapshot = Some(SnapshotJob {
            order,
            answer,
            waiting_for_vm_stop: restart_vm,
            restart_vm,
            waiting_for_pause: false,
            resume_vm: false,
            fall_back: consistency == SnapshotConsistency::Auto,
            waiting_for_freeze: freeze,
            thaw: false,
            notes,
            refused: None,
            results: self.disks.iter().map(|_| None).collect(),
        });
        if restart_vm {
            self.stop_vm(context.events, "snapshot revert");
        } else if freeze {
            self.guest_agent.freeze();
        } else {
            self.take_snapshot(context);
        }
    }

    /// Whether a create freezes the guest's file systems first: `Ok(true)` to freeze,
    /// `Ok(Err(why))` for a crash-consistent snapshot that `auto` falls back to, `Err` for
    /// a refusal with the reason.
    fn check_freeze(
        &self,
        consistency: SnapshotConsistency,
    ) -> Result<Result<bool, String>, String> {
        let why_not = if consistency == SnapshotConsistency::Crash {
            return Ok(Ok(false));
        } else if self.vm_spec.domain.is_some() {
            "it is a libvirt domain, whose guest agent ftvm does not reach (libvirt holds \
             its channel): `virsh domfsfreeze`, then a crash-consistent snapshot, then \
             `virsh domfsthaw`"
        } else if !self.guest.present() || self.guest.launching() {
            "the VM is not running here"
        } else if self.guest.paused {
            "the guest is paused: its agent cannot answer"
        } else {
            return Ok(Ok(true));
        };
        match consistency {
            SnapshotConsistency::Auto => Ok(Err(format!("crash-consistent: {why_not}"))),
            _ => Err(format!(
                "no application-consistent snapshot of {}: {why_not}",
                self.name
            )),
        }
    }

    /// Takes the snapshot now, or once the guest is paused when it has several disks.
    fn take_snapshot(&mut self, context: &mut Context<'_>) {
        let Some(job) = &self.snapshot else {
            return;
        };
        let several = matches!(job.order, SnapshotOrder::Create(..)) && self.disks.len() > 1;
        let resume_vm = several && !self.guest.paused && self.guest.pause();
        if resume_vm {
            context.events.info(
                &self.name,
                format!(
                    "guest paused for a snapshot of its {} disks at one point",
                    self.disks.len()
                ),
            );
            if let Some(job) = &mut self.snapshot {
                job.waiting_for_pause = true;
                job.resume_vm = true;
            }
        } else {
            self.send_snapshot_order();
        }
    }

    /// The guest agent's freeze answered: the snapshot goes on (application-consistent,
    /// or crash-consistent for `auto` when the guest runs no agent), or fails with the
    /// reason; file systems that may be frozen are thawed in the end either way.
    pub(super) fn on_guest_frozen(
        &mut self,
        result: Result<Frozen, FreezeFailed>,
        context: &mut Context<'_>,
    ) {
        let Some(job) = self.snapshot.as_mut().filter(|job| job.waiting_for_freeze) else {
            if result
                .as_ref()
                .map_or_else(|failed| failed.maybe_frozen, |_| true)
            {
                self.guest_agent.thaw(); // no snapshot waits for it (cannot happen)
            }
            return;
        };
        job.waiting_for_freeze = false;
        match result {
            Ok(frozen) => {
                job.thaw = true;
                if let SnapshotOrder::Create(_, consistency) = &mut job.order {
                    *consistency = Consistency::Application;
                }
                let text = format!(
                    "the guest agent froze {} file system(s) (guest-fsfreeze-status: {})",
                    frozen.file_systems, frozen.status
                );
                context
                    .events
                    .info(&self.name, format!("{}: {text}", job.order));
                job.notes.push(text);
                self.take_snapshot(context);
            }
            Err(failed) => {
                job.thaw = failed.maybe_frozen;
                let error = crate::error_chain(&failed.error);
                if job.fall_back && !failed.maybe_frozen {
                    let text = format!("crash-consistent: {error}");
                    context
                        .events
                        .info(&self.name, format!("{}: {text}", job.order));
                    job.notes.push(text);
                    self.take_snapshot(context);
                    return;
                }
                job.refused = Some(format!(
                    "not application-consistent, no snapshot taken: {error}"
                ));
                self.finish_snapshot(Some(context));
            }
        }
    }

    /// Refuses what cannot be done here, with the reason and the remedy.
    fn check_snapshot(&self, order: SnapshotOrder) -> Result<SnapshotOrder, String> {
        if self.snapshot.is_some() || self.thaw_answer.is_some() {
            return Err(format!("a snapshot command on {} is under way", self.name));
        }
        if order == SnapshotOrder::List {
            return Ok(order); // this host's copies, whatever its role
        }
        let action = order.action();
        if self.state.role != Role::Primary {
            return Err(format!(
                "{} is not primary here; run `ftvm snapshot {action} {} …` on {}",
                self.name, self.name, self.pair.peer
            ));
        }
        if !self.state.protected || self.host.mode() != Mode::Mirrored || !self.serving {
            return Err(format!(
                "both copies of {} must be in sync (Protected) for a snapshot of both; it is \
                 {} (see `ftvm status`)",
                self.name,
                self.state_word()
            ));
        }
        if self.level >= 3 {
            return Err(format!(
                "{} runs at Level 3, where the secondary's disk waits for checkpoints: \
                 `ftvm protect {} --level 2 --peer {}` first",
                self.name, self.name, self.pair.peer
            ));
        }
        if self.migrating() {
            return Err(format!("{} is moving to {}", self.name, self.pair.peer));
        }
        Ok(order)
    }

    fn send_snapshot_order(&mut self) {
        let Some(job) = &self.snapshot else {
            return;
        };
        let order = job.order.clone();
        for disk in &mut self.disks {
            disk.snapshot(order.clone());
        }
        if self.disks.is_empty() {
            self.finish_snapshot(None);
        }
    }

    /// QEMU's agent stopped the VM: a revert waiting for it goes on.
    pub(super) fn on_vm_stopped(&mut self) {
        let waiting = self
            .snapshot
            .as_ref()
            .is_some_and(|job| job.waiting_for_vm_stop);
        if waiting {
            if let Some(job) = &mut self.snapshot {
                job.waiting_for_vm_stop = false;
            }
            self.send_snapshot_order();
        }
    }

    /// QEMU's agent answered the pause asked for a snapshot of several disks.
    pub(super) fn on_guest_paused(
        &mut self,
        result: Result<(), String>,
        context: &mut Context<'_>,
    ) {
        let Some(job) = self.snapshot.as_mut().filter(|job| job.waiting_for_pause) else {
            return;
        };
        job.waiting_for_pause = false;
        match result {
            Ok(()) => self.send_snapshot_order(),
            Err(error) => {
                let error = format!("the guest could not be paused, no snapshot taken: {error}");
                for slot in &mut job.results {
                    *slot = Some(Err(error.clone()));
                }
                self.finish_snapshot(Some(context));
            }
        }
    }

    /// One disk daemon's answer; once all have answered, `ftvm` gets its answer.
    pub(super) fn on_snapshot_result(
        &mut self,
        index: usize,
        result: Result<SnapshotDone, String>,
        context: &mut Context<'_>,
    ) {
        let Some(job) = &mut self.snapshot else {
            return;
        };
        if let Some(slot) = job.results.get_mut(index) {
            *slot = Some(result);
        }
        if job.results.iter().all(Option::is_some) {
            self.finish_snapshot(Some(context));
        }
    }

    fn finish_snapshot(&mut self, context: Option<&mut Context<'_>>) {
        let Some(job) = self.snapshot.take() else {
            return;
        };
        let mut listed = Vec::new();
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut took = Vec::new();
        for (index, (disk, result)) in self.disks.iter().zip(job.results).enumerate() {
            let serial = &disk.spec.serial;
            match result {
                Some(Ok(SnapshotDone::Listed(snapshots))) => listed.push(DiskSnapshots {
                    disk: serial.clone(),
                    image: snapshots.image,
                    snapshots: snapshots.snapshots,
                }),
                Some(Ok(SnapshotDone::Done(what))) => {
                    took.push(index);
                    done.push(format!("{serial}: {what}"));
                }
                Some(Err(error)) => failed.push(format!("{serial}: {error}")),
                None if job.refused.is_some() => {}
                None => failed.push(format!("{serial}: no answer")),
            }
        }
        failed.extend(job.refused);
        let reply = if !failed.is_empty() {
            // A snapshot of several disks is all or nothing: the disks that took it drop it.
            if let SnapshotOrder::Create(name, _) = &job.order {
                if !done.is_empty() {
                    for &index in &took {
                        if let Some(disk) = self.disks.get_mut(index) {
                            disk.snapshot(SnapshotOrder::Delete(name.clone()));
                        }
                    }
                    failed.push(format!(
                        "the {} disk(s) that took it drop it again",
                        done.len()
                    ));
                }
            }
            Reply::Error([job.notes, failed].concat().join("; "))
        } else if job.order == SnapshotOrder::List {
            Reply::Snapshots(listed)
        } else {
            Reply::Done([job.notes, done].concat().join("; "))
        };
        if let Some(context) = context {
            let what = format!("{}", job.order);
            match &reply {
                Reply::Done(result) => context.events.info(&self.name, format!("{what}: {result}")),
                Reply::Error(error) => context.events.warn(
                    &self.name,
                    format!("{what} failed: {error}"),
                    "see the disk daemons' logs",
                ),
                _ => {}
            }
            if job.restart_vm {
                self.start_vm(context);
            }
            if job.resume_vm {
                self.resume_guest(context.events, "snapshot taken");
            }
        }
        if job.thaw {
            // Behind the resume: a paused guest's agent answers once it runs again.
            self.guest_agent.thaw();
            self.thaw_answer = Some(ThawAnswer {
                answer: job.answer,
                reply,
            });
        } else {
            let _ = job.answer.send(reply);
        }
    }
}
