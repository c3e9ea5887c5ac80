//! Snapshots of both copies at the same point of the write stream (`docs/ARCHITECTURE.md`,
//! "Snapshots").
//!
//! A barrier, like Level 3's epoch markers: new requests stop being registered, the ones in
//! flight complete on both copies (each is acknowledged only once both have it), and then
//! one `Snapshot` message goes down the stream. The secondary, which applies the stream in
//! order, acts on it with every earlier write applied; this side acts on its own copy at the
//! same time. Requests resume when the secondary has answered. The guest only sees a few
//! milliseconds of latency on the requests that arrive meanwhile.

use std::time::{Duration, Instant};

use control_protocol::disk::{Consistency, SnapshotName};
use log::{error, info, warn};

use super::{InFlight, Kind, LocalDisk, Mode, Primary};
use crate::mirror::protocol::{Message, SnapshotAction};
use crate::snapshot;

/// How long the barrier waits for the requests in flight to complete on both copies.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the barrier waits for the secondary's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
const WAIT_STEP: Duration = Duration::from_millis(5);

/// Why the secondary's answer to a barrier is not a success.
#[derive(Debug)]
enum NotDone {
    /// It refused: its copy is unchanged.
    Refused(String),
    /// No answer came (peer lost, restarted, too slow): its copy may have changed.
    Missing(String),
}

impl std::fmt::Display for NotDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotDone::Refused(reason) => write!(f, "the peer's copy: {reason}"),
            NotDone::Missing(why) => write!(f, "the peer's copy did not answer ({why})"),
        }
    }
}

/// Lowers the barrier when the command ends, however it ends.
struct Barrier<'a>(&'a Primary);

impl Drop for Barrier<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.barrier = false;
        self.0.changed.notify_all();
    }
}

impl Primary {
    /// `snapshot create|revert|delete NAME` on both copies. Refused, with nothing changed,
    /// unless both copies are in sync and mirrored at Level 2. Returns what was done and
    /// how long requests were held.
    pub fn snapshot(&self, name: &SnapshotName, action: SnapshotAction) -> Result<String, String> {
        self.check_snapshot_allowed()?;
        let image = self.image.path();
        match action {
            SnapshotAction::Create(_) if snapshot::exists(image, name) => {
                return Err(format!("a snapshot named {name} exists already"))
            }
            SnapshotAction::Revert if !snapshot::exists(image, name) => {
                return Err(format!("no snapshot named {name} on this copy"))
            }
            _ => {}
        }
        if action != SnapshotAction::Delete {
            snapshot::check_reflinks(&self.image)?;
        }
        if matches!(action, SnapshotAction::Create(_)) {
            // Most of the clone's cost is the `fdatasync` of recent writes before it: done
            // here on both copies, outside the barrier, the one inside finds little to do.
            let flushed = self.image.flush().is_ok()
                && self.control_round_trip(|id, generation| Message::Flush { id, generation });
            if !flushed {
                warn!("snapshot {name}: the flush ahead of the barrier failed; going on");
            }
        }
        let started = Instant::now();
        let (_barrier, id, generation) = self.raise_barrier()?;
        let drained = started.elapsed();
        let message = Message::Snapshot {
            id,
            generation,
            name: name.clone(),
            action,
        };
        self.send_or_hold(&message, Vec::new());
        let result = match action {
            SnapshotAction::Create(consistency) => self.create_both(name, consistency, id),
            // Also when only the peer's copy has it (left by a create that failed here).
            SnapshotAction::Delete => {
                let here = snapshot::exists(image, name);
                let local = snapshot::delete(image, name);
                let peer = self.snapshot_answer(id).map_err(|error| error.to_string());
                match (here, local, peer) {
                    (_, Ok(()), Ok(())) | (false, Err(_), Ok(())) => Ok(()),
                    (true, Err(error), _) | (false, Err(error), Err(_)) => Err(error),
                    (_, Ok(()), Err(error)) => {
                        Err(format!("deleted here, not on the peer's copy: {error}"))
                    }
                }
            }
            SnapshotAction::Revert => self.revert_both(name, id),
        };
        let paused = started.elapsed();
        result?;
        let done = match action {
            SnapshotAction::Create(consistency) => format!(
                "{} snapshot {name} taken on both copies",
                consistency.word()
            ),
            SnapshotAction::Revert => format!("both copies reverted to snapshot {name}"),
            SnapshotAction::Delete => format!("snapshot {name} deleted from both copies"),
        };
        info!(
            "{done}: requests held {:.1} ms (of which {:.1} ms draining the ones in flight)",
            paused.as_secs_f64() * 1e3,
            drained.as_secs_f64() * 1e3
        );
        Ok(format!(
            "{done} (requests held {:.1} ms)",
            paused.as_secs_f64() * 1e3
        ))
    }

    /// Whether a snapshot barrier is up (tests of its order).
    #[cfg(test)]
    pub(crate) fn barrier_up(&self) -> bool {
        self.lock().barrier
    }

    /// Both copies must be the same and stay so: mirrored, in sync, at Level 2.
    fn check_snapshot_allowed(&self) -> Result<(), String> {
        if self.image.read_only() {
            return Err("the disk is read-only".into());
        }
        let state = self.lock();
        if state.mode != Mode::Mirrored || !state.welcomed {
            return Err(format!(
                "both copies must be in sync (Protected) for a snapshot of both; this primary \
                 is {:?}",
                state.mode
            ));
        }
        if state.local != LocalDisk::Healthy {
            return Err(format!(
                "this host's copy is {:?}: a snapshot of both copies needs both",
                state.local
            ));
        }
        if let Some(reason) = &state.peer_disk_failed {
            return Err(format!("the peer's copy failed ({reason})"));
        }
        if state.resync_started || state.resync_forced || self.metadata.out_of_sync_bytes() > 0 {
            return Err(
                "a resync is under way: both copies must be in sync (Protected) for a \
                 snapshot; try again once it is done"
                    .into(),
            );
        }
        if state.epoch.is_some() {
            return Err(
                "snapshots are taken at Level 2 (at Level 3 the secondary's writes wait for \
                 checkpoints): `ftvm protect VM --level 2` first"
                    .into(),
            );
        }
        if state.barrier {
            return Err("another snapshot command is under way".into());
        }
        Ok(())
    }

    /// Stops registering requests, waits until every one in flight completed on both
    /// copies, and registers the barrier's own entry; returns it with its id and generation.
    fn raise_barrier(&self) -> Result<(Barrier<'_>, u64, u64), String> {
        let mut state = self.lock();
        if state.barrier {
            return Err("another snapshot command is under way".into());
        }
        state.barrier = true;
        let barrier = Barrier(self);
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !state.in_flight.is_empty() {
            if state.mode != Mode::Mirrored {
                return Err(format!(
                    "the peer was lost while writes drained ({:?}): no snapshot",
                    state.mode
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} request(s) did not complete on both copies within {} s: no snapshot",
                    state.in_flight.len(),
                    DRAIN_TIMEOUT.as_secs()
                ));
            }
            state = self.wait(state, WAIT_STEP);
        }
        let id = state.next_id;
        state.next_id += 1;
        let mut entry = InFlight::new(Kind::Snapshot, 0, 0, None);
        entry.epoch = state.epoch;
        state.in_flight.insert(id, entry);
        Ok((barrier, id, state.generation))
    }

    /// The secondary's answer to barrier `id`; `Err` if it refused, or the answer did not
    /// come (peer lost, restarted, too slow).
    fn snapshot_answer(&self, id: u64) -> Result<(), NotDone> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let mut state = self.lock();
        loop {
            if let Some(result) = state.snapshot_results.remove(&id) {
                return result.map_err(NotDone::Refused);
            }
            if !state.in_flight.contains_key(&id) {
                return Err(NotDone::Missing("the session changed".into()));
            }
            if !matches!(state.mode, Mode::Mirrored | Mode::Holding) {
                state.in_flight.remove(&id);
                return Err(NotDone::Missing(format!("{:?}", state.mode)));
            }
            if Instant::now() >= deadline {
                state.in_flight.remove(&id);
                self.changed.notify_all();
                return Err(NotDone::Missing(format!(
                    "not within {} s",
                    ANSWER_TIMEOUT.as_secs()
                )));
            }
            state = self.wait(state, WAIT_STEP);
        }
    }

    /// The secondary answered barrier `id` (`Done` goes through `complete`).
    pub(super) fn snapshot_answered(&self, id: u64, result: Result<(), String>) {
        let mut state = self.lock();
        if state.in_flight.remove(&id).is_some() {
            state.snapshot_results.insert(id, result);
        }
        self.changed.notify_all();
    }

    /// Takes the snapshot here while the secondary takes its own; a snapshot that exists
    /// on one copy only is removed again.
    fn create_both(
        &self,
        name: &SnapshotName,
        consistency: Consistency,
        id: u64,
    ) -> Result<(), String> {
        let local = snapshot::create(&self.image, name, consistency);
        let peer = self.snapshot_answer(id).map_err(|error| error.to_string());
        match (local, peer) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(error), peer) => {
                if peer.is_ok() {
                    self.delete_on_peer(name);
                }
                Err(error)
            }
            (Ok(()), Err(error)) => {
                if let Err(cleanup) = snapshot::delete(self.image.path(), name) {
                    warn!("cannot remove the one-sided snapshot {name}: {cleanup}");
                }
                Err(error)
            }
        }
    }

    /// Removes snapshot `name` from the secondary's copy (after a one-sided create).
    fn delete_on_peer(&self, name: &SnapshotName) {
        let Ok((_barrier, id, generation)) = self.raise_barrier() else {
            warn!("snapshot {name} may remain on the peer's copy: delete it there");
            return;
        };
        let message = Message::Snapshot {
            id,
            generation,
            name: name.clone(),
            action: SnapshotAction::Delete,
        };
        self.send_or_hold(&message, Vec::new());
        if let Err(error) = self.snapshot_answer(id) {
            warn!("snapshot {name} may remain on the peer's copy ({error}): delete it there");
        }
    }

    /// The secondary reverts first (it refuses, unchanged, without the snapshot); then this
    /// copy. Whatever goes wrong after the secondary may have reverted leaves no two copies
    /// that differ unknown to the mirror: without its answer the whole disk is resynced
    /// from this copy; a failed revert here makes this copy failed (served from the peer,
    /// which has reverted, until `repair`).
    fn revert_both(&self, name: &SnapshotName, id: u64) -> Result<(), String> {
        let snapshot_file = snapshot::open_for_revert(&self.image, name)?;
        match self.snapshot_answer(id) {
            Ok(()) => {}
            Err(error @ NotDone::Refused(_)) => return Err(error.to_string()),
            Err(error @ NotDone::Missing(_)) => {
                // It may have reverted: copy this one over it.
                self.mark_out_of_sync(0, self.image.size_bytes());
                let mut state = self.lock();
                state.resync_forced = true;
                self.changed.notify_all();
                return Err(format!(
                    "{error}: not reverted here; the peer's copy is resynced from this one in \
                     full"
                ));
            }
        }
        if let Err(error) = snapshot::revert_from(&self.image, &snapshot_file) {
            error!("reverting this copy failed after the peer's reverted: {error}");
            self.local_failed(&error);
            return Err(format!(
                "the peer's copy was reverted, this one failed ({error}): it is served from \
                 the peer until `repair`"
            ));
        }
        Ok(())
    }
}
