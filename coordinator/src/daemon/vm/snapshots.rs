//! `ftvm snapshot create|list|delete|revert VM [NAME]` (`docs/ARCHITECTURE.md`,
//! "Snapshots"): on the primary, sent to each of the VM's disk daemons, which take each
//! snapshot on both copies through the mirror; the answer goes back to `ftvm` once every
//! disk has answered. A revert stops the VM first and starts it again afterwards.

use std::sync::mpsc::Sender;

use control_protocol::disk::{self, SnapshotOrder};

use super::{Context, VmRunner};
use crate::daemon::control::{DiskSnapshots, Reply, SnapshotCommand};
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
    results: Vec<Option<Result<SnapshotDone, String>>>,
}

impl VmRunner {
    /// Starts `command`; the answer goes to `answer` (at once when it is refused).
    pub fn snapshot(
        &mut self,
        command: SnapshotCommand,
        answer: Sender<Reply>,
        context: &mut Context<'_>,
    ) {
        let order = match command.order().and_then(|order| self.check_snapshot(order)) {
            Ok(order) => order,
            Err(error) => {
                let _ = answer.send(Reply::Error(error));
                return;
            }
        };
        let revert = matches!(order, SnapshotOrder::Revert(_));
        let restart_vm = revert && self.guest.present();
        let several = matches!(order, SnapshotOrder::Create(_)) && self.disks.len() > 1;
        let resume_vm = several && !self.guest.paused && self.guest.pause();
        if resume_vm {
            context.events.info(
                &self.name,
                format!(
                    "guest paused for a snapshot of its {} disks at one point",
                    self.disks.len()
                ),
            );
        }
        self.snapshot = Some(SnapshotJob {
            order,
            answer,
            waiting_for_vm_stop: restart_vm,
            restart_vm,
            waiting_for_pause: resume_vm,
            resume_vm,
            results: self.disks.iter().map(|_| None).collect(),
        });
        if restart_vm {
            self.stop_vm(context.events, "snapshot revert");
        } else if !resume_vm {
            self.send_snapshot_order();
        }
    }

    /// Refuses what cannot be done here, with the reason and the remedy.
    fn check_snapshot(&self, order: SnapshotOrder) -> Result<SnapshotOrder, String> {
        if self.snapshot.is_some() {
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
        for (disk, result) in self.disks.iter().zip(job.results) {
            let serial = &disk.spec.serial;
            match result {
                Some(Ok(SnapshotDone::Listed(snapshots))) => listed.push(DiskSnapshots {
                    disk: serial.clone(),
                    image: snapshots.image,
                    snapshots: snapshots.snapshots,
                }),
                Some(Ok(SnapshotDone::Done(what))) => done.push(format!("{serial}: {what}")),
                Some(Err(error)) => failed.push(format!("{serial}: {error}")),
                None => failed.push(format!("{serial}: no answer")),
            }
        }
        let reply = if !failed.is_empty() {
            // A snapshot of several disks is all or nothing: the disks that took it drop it.
            if let SnapshotOrder::Create(name) = &job.order {
                if !done.is_empty() {
                    for (disk, _) in self.disks.iter_mut().zip(&done) {
                        disk.snapshot(SnapshotOrder::Delete(name.clone()));
                    }
                    failed.push(format!(
                        "the {} disk(s) that took it drop it again",
                        done.len()
                    ));
                }
            }
            Reply::Error(failed.join("; "))
        } else if job.order == SnapshotOrder::List {
            Reply::Snapshots(listed)
        } else {
            Reply::Done(done.join("; "))
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
        let _ = job.answer.send(reply);
    }
}
