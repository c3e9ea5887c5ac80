//! The secondary side of the mirror: applies the primary's writes to the local image (which
//! may be a different kind of storage than the primary's) and acknowledges each once its own
//! write has completed. Refuses a sender whose generation is lower than its own.

use std::io;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use control_protocol::disk::{SecondaryDiskState, SecondaryEpochs, SecondaryStatus};
use log::{error, info, warn};

use super::epochs::{EpochOptions, Epochs};
use super::protocol::{
    Message, Payload, Received, Refusal, Replier, Transport, MAX_SUSPECT_RANGES,
};
use crate::image::Image;
use crate::metadata::{DataState, Metadata};

const RECEIVE_TIMEOUT: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
struct State {
    /// See `Message::Welcome::lost_unflushed`; reported until a resync completes.
    lost_unflushed: bool,
    /// The data state this copy had before its host went down under it (it is durably
    /// Inconsistent since): tells the primary whether a delta of its recently written
    /// regions is enough.
    state_before_crash: Option<DataState>,
    /// Why this copy's disk failed: from then on nothing is applied until `repair`.
    disk_failed: Option<String>,
    /// Requests that failed on this copy's disk.
    disk_failures: u64,
    /// The current session's primary said `Hello` and was welcomed.
    welcomed: bool,
    resyncing: bool,
    promoted: bool,
    applied_writes: u64,
    applied_bytes: u64,
    resync_bytes: u64,
    refused: u64,
    /// Tests of a restart: the receiver stops as a killed process would, applying nothing
    /// more, not even what it was receiving.
    stopped_for_test: bool,
    /// The receiver's loop returned.
    applier_exited: bool,
}

pub struct Secondary {
    image: Arc<Image>,
    metadata: Arc<Metadata>,
    transport: Arc<dyn Transport>,
    state: Mutex<State>,
    /// Level 3: the epoch journal and the unapplied epochs.
    epochs: Mutex<Epochs>,
    /// The epochs' part of the last `status`: given again while `epochs` is held (a commit
    /// records its epoch durably under it), so that `status` never waits for a sync.
    epochs_status: Mutex<SecondaryEpochs>,
    /// Signalled when an epoch is sealed or a commit frees journal space.
    epochs_changed: Condvar,
    /// Held while buffered epochs are applied to the image (a commit, `EpochOff`, a
    /// promotion): one at a time, in order.
    applying: Mutex<()>,
    /// What the receiver read while it waited for journal space (looking for an
    /// `EpochOff`), handled before anything new.
    ahead: Mutex<level3::ReadAhead>,
    /// The highest epoch `commit` asked for; the epoch applier applies up to it.
    commit_target: Mutex<Option<u64>>,
    commit_requested: Condvar,
    /// Level 2 `Flush`es for the flusher thread, so that the receiver applies later writes
    /// while the image syncs (a sync after a busy second can take hundreds of ms).
    flushes: Mutex<Sender<FlushJob>>,
}

/// A `Flush` to answer once the image is synced: every write applied before it was taken
/// is covered by that sync.
struct FlushJob {
    id: u64,
    reply: Replier,
}

impl std::fmt::Debug for Secondary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secondary").finish_non_exhaustive()
    }
}

impl Secondary {
    /// Starts applying what arrives on `transport` (the listening side of the link).
    /// `boot_id_path` names the file that identifies this boot of the host (see
    /// [`host_restarted_under`]).
    pub fn start(
        image: Arc<Image>,
        metadata: Arc<Metadata>,
        transport: Arc<dyn Transport>,
        boot_id_path: &Path,
        epoch_options: EpochOptions,
    ) -> io::Result<Arc<Secondary>> {
        let epochs = match Epochs::recover(epoch_options.clone(), &metadata) {
            Ok(epochs) => epochs,
            Err(error) => {
                // Writes this copy acknowledged are gone with the journal: it is not
                // UpToDate any more, durably, and starts over without buffered epochs.
                error!(
                    "cannot read the epoch journal back ({error}): its buffered writes are \
                     lost; this copy is Inconsistent until resynced"
                );
                let header = metadata.header();
                metadata
                    .set_header(header.generation, DataState::Inconsistent)
                    .and_then(|()| metadata.set_applied_epoch(header.applied_epoch, None))
                    .map_err(io::Error::other)?;
                Epochs::recover(epoch_options, &metadata).map_err(io::Error::other)?
            }
        };
        let lost_unflushed = host_restarted_under(&metadata, boot_id_path)?;
        let mut state_before_crash = None;
        if lost_unflushed {
            // Writes this copy acknowledged but had not flushed may be gone: it is not
            // UpToDate any more, durably, before anyone can ask it.
            let header = metadata.header();
            state_before_crash = Some(header.data_state);
            metadata
                .set_header(header.generation, DataState::Inconsistent)
                .map_err(io::Error::other)?;
            warn!(
                "this host restarted while the secondary was running: writes not yet flushed \
                 may be lost; this copy is Inconsistent until the primary resyncs its \
                 recently written regions"
            );
        }
        let (flush_sender, flush_receiver) = mpsc::channel();
        let secondary = Arc::new(Secondary {
            image,
            metadata,
            transport,
            state: Mutex::new(State {
                lost_unflushed,
                state_before_crash,
                ..State::default()
            }),
            epochs_status: Mutex::new(epochs.status()),
            epochs: Mutex::new(epochs),
            epochs_changed: Condvar::new(),
            applying: Mutex::new(()),
            ahead: Mutex::new(level3::ReadAhead::default()),
            commit_target: Mutex::new(None),
            commit_requested: Condvar::new(),
            flushes: Mutex::new(flush_sender),
        });
        let applier = secondary.clone();
        thread::Builder::new()
            .name("mirror-applier".into())
            .spawn(move || applier.apply_loop())?;
        let committer = secondary.clone();
        thread::Builder::new()
            .name("epoch-applier".into())
            .spawn(move || committer.commit_loop())?;
        let flusher = secondary.clone();
        thread::Builder::new()
            .name("mirror-flusher".into())
            .spawn(move || flusher.flush_loop(flush_receiver))?;
        Ok(secondary)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn lock_epochs(&self) -> MutexGuard<'_, Epochs> {
        self.epochs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn apply_loop(self: Arc<Self>) {
        self.receive_and_apply();
        self.lock().applier_exited = true;
    }

    fn receive_and_apply(&self) {
        loop {
            if self.lock().promoted {
                return;
            }
            let next = match self.take_ahead() {
                Some(received) => Ok(Some(received)),
                None => self.transport.recv(RECEIVE_TIMEOUT),
            };
            if self.lock().stopped_for_test {
                return;
            }
            match next {
                Ok(Some(Received::Message(message, payload))) => {
                    if let Some(reply) = self.apply_received(message, &payload) {
                        if let Err(error) = self.transport.send(&reply, Vec::new()) {
                            warn!("cannot answer the primary: {error}");
                        }
                    }
                }
                Ok(Some(Received::PeerRestarted)) => {
                    info!("the primary started a new session");
                    self.lock().welcomed = false;
                }
                Ok(None) => {}
                Err(error) => {
                    log::debug!("replication receive: {error}");
                    thread::sleep(RECEIVE_TIMEOUT);
                }
            }
        }
    }

    /// Tests: applies a message whose payload's checksum nobody checked yet.
    #[cfg(test)]
    fn apply(&self, message: Message, payload: &[u8]) -> Option<Message> {
        self.apply_received(message, &Payload::unchecked(payload.to_vec()))
    }

    /// Applies one message; returns the answer to send.
    fn apply_received(&self, message: Message, payload: &Payload) -> Option<Message> {
        let ours = self.metadata.header().generation;
        let refuse = |id, reason: Refusal| {
            self.lock().refused += 1;
            warn!("refused request {id} from the primary: {reason:?}");
            Some(Message::Failed { id, reason })
        };
        // Every request that changes this copy carries the sender's generation: a lower one
        // than ours means a newer primary exists (fencing token).
        let mut ours = ours;
        if let Some((id, generation)) = message.id_and_generation() {
            if generation < ours {
                return refuse(id, Refusal::StaleGeneration { ours });
            }
            // The primary adopted a newer generation within this session (the witness
            // granted it while we stayed connected). Every earlier message of the session
            // reached us in order, so this copy is as complete at the new generation as
            // it was at the old one: record it, keeping the data state, before applying.
            if generation > ours {
                let state = self.metadata.header().data_state;
                if let Err(error) = self.metadata.set_header(generation, state) {
                    error!("cannot record generation {generation}: {error}");
                    return refuse(id, Refusal::StaleGeneration { ours });
                }
                info!("the primary moved to generation {generation}");
                ours = generation;
            }
        }
        if let (Some((id, _)), Some(reason)) =
            (message.id_and_generation(), self.lock().disk_failed.clone())
        {
            return Some(Message::Failed {
                id,
                reason: Refusal::Io(format!("this copy's disk failed earlier: {reason}")),
            });
        }
        if let Message::Snapshot {
            id, name, action, ..
        } = &message
        {
            return Some(self.snapshot(*id, name, *action));
        }
        if let Some(answer) = self.level3(&message, payload, ours) {
            return answer;
        }
        match message {
            Message::Hello {
                generation,
                size_bytes,
            } => self.hello(generation, size_bytes),
            Message::Write {
                id, offset, crc32c, ..
            }
            | Message::ResyncBlock {
                id, offset, crc32c, ..
            } => {
                if !payload.matches(crc32c) {
                    // Nothing was written: the primary sends the block again and the
                    // guest's write completes only once a copy of it is applied.
                    return refuse(id, Refusal::Checksum);
                }
                let resync = matches!(message, Message::ResyncBlock { .. });
                Some(self.write(id, offset, payload, resync))
            }
            Message::Zero {
                id,
                offset,
                len,
                deallocate,
                ..
            } => Some(self.zero(id, offset, len, deallocate)),
            Message::Flush { id, .. } => self.flush(id),
            Message::Read { id, offset, len } => self.read(id, offset, len),
            Message::ResyncCompare {
                id,
                offset,
                len,
                hash,
                ..
            } => Some(self.compare(id, offset, len, &hash)),
            Message::ResyncStart { id, .. } => {
                self.lock().resyncing = true;
                let result = self.metadata.set_header(ours, DataState::Inconsistent);
                Some(self.result(id, result.map_err(io::Error::other)))
            }
            Message::ResyncDone { id, .. } => {
                let result = self.resync_complete(ours);
                Some(self.result(id, result))
            }
            other => {
                warn!("unexpected message from the primary: {other:?}");
                None
            }
        }
    }

    /// The resync ended (at Level 2 on `ResyncDone`, at Level 3 when the epoch holding it
    /// is applied): our suspect regions were part of it, so this copy now equals the
    /// primary's, and `generation` is where both last agreed.
    pub(super) fn resync_complete(&self, generation: u64) -> io::Result<()> {
        let result = self.image.flush().and_then(|()| {
            self.metadata
                .clear_suspect()
                .and_then(|()| self.metadata.set_base_generation(generation))
                .and_then(|()| self.metadata.set_header(generation, DataState::UpToDate))
                .map_err(io::Error::other)
        });
        if result.is_ok() {
            let mut state = self.lock();
            state.resyncing = false;
            state.lost_unflushed = false;
            state.state_before_crash = None;
            info!("resync complete: this copy is UpToDate");
            // The resync's large writes left the image's page cache in large folios, and
            // ext4 walks every buffer head of a folio on each write into it: a 4 KiB write
            // into a 1 MiB folio cost the secondary about three times a write into a page of
            // its own (`docs/BENCHMARKS.md`, issue 12). The cache is clean after the flush
            // and of little use to a secondary: dropped, later writes get small folios.
            if let Err(error) = self.image.drop_clean_cache() {
                log::debug!("cannot drop the image's page cache after the resync: {error}");
            }
        }
        result
    }

    /// Whether a resync runs in this session (its blocks go to the image at once).
    pub(super) fn resyncing(&self) -> bool {
        self.lock().resyncing
    }

    pub(super) fn end_resync_session(&self) {
        self.lock().resyncing = false;
    }

    /// Whether this secondary was promoted (its receiver stops).
    pub(super) fn promoted(&self) -> bool {
        self.lock().promoted
    }

    pub(super) fn image(&self) -> &Image {
        &self.image
    }

    pub(super) fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    pub(super) fn epochs_changed(&self) -> &Condvar {
        &self.epochs_changed
    }

    pub(super) fn applying(&self) -> MutexGuard<'_, ()> {
        self.applying.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn hello(&self, generation: u64, size_bytes: u64) -> Option<Message> {
        let header = self.metadata.header();
        if size_bytes != self.image.size_bytes() {
            error!(
                "the primary's disk has {size_bytes} bytes, ours {}: refusing it",
                self.image.size_bytes()
            );
            return Some(Message::Failed {
                id: 0,
                reason: Refusal::SizeMismatch {
                    ours: self.image.size_bytes(),
                },
            });
        }
        if generation < header.generation {
            error!(
                "refusing a primary with generation {generation}: ours is {}",
                header.generation
            );
            return Some(Message::Failed {
                id: 0,
                reason: Refusal::StaleGeneration {
                    ours: header.generation,
                },
            });
        }
        if generation > header.generation {
            // A newer primary: this copy lacks what it wrote since our generation, so it is
            // Inconsistent until that primary's resync finishes (`ResyncDone`). Claiming
            // the new generation's data before then would let a failover lose writes.
            if let Err(error) = self
                .metadata
                .set_header(generation, DataState::Inconsistent)
            {
                error!("cannot record generation {generation}: {error}");
                return None;
            }
        }
        self.lock_epochs().session_started();
        self.lock().welcomed = true;
        info!(
            "primary connected at generation {generation}; this copy is {:?}",
            header.data_state
        );
        // Our generation from before this primary, and where this copy may hold writes the
        // primary never saw (it was a primary itself): the primary resyncs those regions
        // and its own out-of-sync ones, or everything if our generation is too old.
        let ranges = self.metadata.suspect_ranges();
        let suspect_listed = ranges.len() <= MAX_SUSPECT_RANGES;
        let payload = if suspect_listed {
            postcard::to_allocvec(&ranges).unwrap_or_default()
        } else {
            Vec::new()
        };
        if !ranges.is_empty() {
            info!(
                "this copy may differ from the primary's in {} region(s); asking for their resync",
                ranges.len()
            );
        }
        let (lost_unflushed, state_before_crash, disk_failed) = {
            let state = self.lock();
            (
                state.lost_unflushed,
                state.state_before_crash,
                state.disk_failed.is_some(),
            )
        };
        let data_state = match (disk_failed, state_before_crash) {
            (true, _) => DataState::Inconsistent,
            (false, Some(before)) => before,
            (false, None) => header.data_state,
        };
        let welcome = Message::Welcome {
            generation: header.generation,
            data_state,
            lost_unflushed,
            suspect_listed,
            disk_failed,
        };
        if let Err(error) = self.transport.send(&welcome, payload) {
            warn!("cannot answer the primary: {error}");
        }
        None
    }

    fn write(&self, id: u64, offset: u64, data: &[u8], resync: bool) -> Message {
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > self.image.size_bytes())
        {
            self.disk_failed("a write past the end of this copy");
            return Message::Failed {
                id,
                reason: Refusal::OutOfRange,
            };
        }
        let result = self.image.write_at(data, offset);
        if result.is_ok() {
            let mut state = self.lock();
            if resync {
                state.resync_bytes += data.len() as u64;
            } else {
                state.applied_writes += 1;
                state.applied_bytes += data.len() as u64;
            }
        }
        self.result(id, result)
    }

    /// Serves the primary's read when its own disk failed (ComputeThru): the data goes back
    /// as the payload of `ReadData` (sent here); a failure is returned as the answer.
    fn read(&self, id: u64, offset: u64, len: u64) -> Option<Message> {
        let in_range = offset
            .checked_add(len)
            .is_some_and(|end| end <= self.image.size_bytes());
        if !in_range || len > super::primary::MAX_BLOCK_BYTES as u64 {
            return Some(Message::Failed {
                id,
                reason: Refusal::OutOfRange,
            });
        }
        let mut data = vec![0u8; len as usize];
        if let Err(error) = self.image.read_at(&mut data, offset) {
            return Some(self.result(id, Err(error)));
        }
        let crc32c = crc32c::crc32c(&data);
        if let Err(error) = self.transport.send(&Message::ReadData { id, crc32c }, data) {
            warn!("cannot send read data to the primary: {error}");
        }
        None
    }

    /// Compare-mode resync: answers `Done` when the range already holds what the primary has.
    fn compare(&self, id: u64, offset: u64, len: u64, hash: &[u8; 32]) -> Message {
        let in_range = offset
            .checked_add(len)
            .is_some_and(|end| end <= self.image.size_bytes());
        if !in_range || len > super::primary::MAX_BLOCK_BYTES as u64 {
            return Message::Failed {
                id,
                reason: Refusal::OutOfRange,
            };
        }
        let mut data = vec![0u8; len as usize];
        match self.image.read_at(&mut data, offset) {
            Ok(()) if blake3::hash(&data).as_bytes() == hash => Message::Done { id },
            // A range we cannot read is one we need rewritten.
            Ok(()) | Err(_) => Message::Differs { id },
        }
    }

    fn zero(&self, id: u64, offset: u64, len: u64, deallocate: bool) -> Message {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.image.size_bytes())
        {
            return Message::Failed {
                id,
                reason: Refusal::OutOfRange,
            };
        }
        let result = if deallocate {
            self.image.discard(offset, len)
        } else {
            self.image.write_zeroes(offset, len, false)
        };
        self.result(id, result)
    }

    /// A Level 2 `Flush`: handed to the flusher thread with a sender bound to this
    /// session, and answered from there; synchronously where the transport has no such
    /// sender.
    fn flush(&self, id: u64) -> Option<Message> {
        if let Some(reply) = self.transport.session_replier() {
            let queued = self
                .flushes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .send(FlushJob { id, reply });
            if queued.is_ok() {
                return None;
            }
        }
        Some(self.result(id, self.image.flush()))
    }

    /// The flusher thread: one sync of the image for every `Flush` queued meanwhile.
    fn flush_loop(self: Arc<Self>, jobs: Receiver<FlushJob>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = vec![first];
            batch.extend(jobs.try_iter());
            let result = self.image.flush();
            for job in batch {
                let answer = self.result(
                    job.id,
                    match &result {
                        Ok(()) => Ok(()),
                        Err(error) => Err(io::Error::new(error.kind(), error.to_string())),
                    },
                );
                if let Err(error) = (job.reply)(&answer) {
                    // The session ended: the primary sends the flush again in the next one.
                    warn!("cannot answer flush {}: {error}", job.id);
                }
            }
        }
    }

    /// The answer to a request that changed (or tried to change) this copy. A failure
    /// leaves the copy durably Inconsistent before the primary hears of it.
    pub(super) fn result(&self, id: u64, result: io::Result<()>) -> Message {
        match result {
            Ok(()) => Message::Done { id },
            Err(error) => {
                error!("request {id} failed on this copy: {error}");
                self.disk_failed(&error.to_string());
                Message::Failed {
                    id,
                    reason: Refusal::Io(error.to_string()),
                }
            }
        }
    }

    /// This copy missed a write: it is Inconsistent (durably, if the metadata can still be
    /// written) and applies nothing until `repair`. The primary goes on without it, at a
    /// generation this copy does not hold, so the witness can never choose it.
    pub(super) fn disk_failed(&self, cause: &str) {
        let first = {
            let mut state = self.lock();
            state.disk_failures += 1;
            let first = state.disk_failed.is_none();
            if first {
                state.disk_failed = Some(cause.to_owned());
            }
            first
        };
        let generation = self.metadata.header().generation;
        if let Err(error) = self
            .metadata
            .set_header(generation, DataState::Inconsistent)
        {
            error!(
                "cannot record that this copy is Inconsistent: {error}; the primary's next \
                 generation still excludes it"
            );
        }
        if first {
            error!(
                "this copy's disk failed ({cause}): it is Inconsistent and applies nothing \
                 until it is repaired; remedy: fix the disk holding {}, then send `repair` \
                 to this daemon (a full resync follows)",
                self.image.path().display()
            );
        }
    }

    /// The operator repaired the disk: apply the primary's requests again. The copy stays
    /// Inconsistent until the primary's resync ends.
    pub fn repair(&self) -> Result<&'static str, String> {
        let mut state = self.lock();
        if state.disk_failed.take().is_none() {
            return Ok("the disk has not failed; nothing to repair");
        }
        info!("repair: this copy applies requests again; it is Inconsistent until resynced");
        Ok("repaired: Inconsistent until the primary's resync ends")
    }

    /// A clean stop: everything applied is flushed, so nothing acknowledged can be lost.
    pub fn shutdown(&self) {
        if let Err(error) = self.lock_epochs().sync() {
            warn!("cannot sync the epoch journal: {error}");
        }
        let flushed = self.image.flush();
        match flushed.map_err(|error| error.to_string()).and_then(|()| {
            self.metadata
                .mark_open(None)
                .map(|_| ())
                .map_err(|error| error.to_string())
        }) {
            Ok(()) => info!("secondary stopped cleanly"),
            Err(error) => warn!("unclean stop of the secondary: {error}"),
        }
    }

    /// Takes over as primary at `generation` (default: the next one): refused while this
    /// copy is Inconsistent. Returns the new generation.
    pub fn promote(&self, generation: Option<u64>) -> Result<u64, String> {
        let generation = self.check_promotable(generation)?;
        if self.lock_epochs().buffered() {
            // A Level 2 takeover (the replica's memory is not restored): every write the
            // primary acknowledged counts, those of checkpoints that never committed too.
            // A restore promotes with the replica's epoch instead (`promote GEN EPOCH`).
            self.leave_level3()?;
            warn!(
                "event: promotion without a checkpoint: every buffered Level 3 write applied \
                 (the VM boots from this disk)"
            );
        }
        let header = self.metadata.header();
        if header.data_state == DataState::Inconsistent {
            return Err(
                "this copy is Inconsistent (a resync did not finish); promoting it would \
                 serve stale or mixed data"
                    .into(),
            );
        }
        // This copy held everything of its generation: that is where the old primary's
        // copy and ours last agreed (outside the regions the old primary will list).
        self.metadata
            .set_base_generation(header.generation)
            .and_then(|()| self.metadata.set_header(generation, DataState::UpToDate))
            .map_err(|error| error.to_string())?;
        self.lock().promoted = true;
        self.transport.close();
        info!("promoted to primary at generation {generation}");
        Ok(generation)
    }

    /// The generation a promotion takes (`generation`, default the next one), if this copy
    /// may be promoted apart from its data state.
    pub(super) fn check_promotable(&self, generation: Option<u64>) -> Result<u64, String> {
        if let Some(reason) = self.lock().disk_failed.clone() {
            return Err(format!(
                "this copy's disk failed ({reason}); it misses writes and cannot be promoted"
            ));
        }
        let header = self.metadata.header();
        let generation = generation.unwrap_or(header.generation + 1);
        if generation <= header.generation {
            return Err(format!(
                "generation {generation} is not above this copy's {}",
                header.generation
            ));
        }
        Ok(generation)
    }

    /// Stops the receiver as a killed process would stop (tests of a restart).
    #[cfg(test)]
    pub(crate) fn stop_for_test(&self) {
        {
            let mut state = self.lock();
            state.promoted = true;
            state.stopped_for_test = true;
        }
        daemon_util::test_support::poll_until(
            Duration::from_secs(30),
            "the receiver to stop",
            || self.lock().applier_exited,
        );
    }

    /// The secondary's part of `status`.
    pub fn status(&self) -> SecondaryStatus {
        // Not under the state's lock: the epochs' lock is taken first where both are held.
        // Never waited for: a commit holds it while it records the applied epoch durably
        // (a sync, which a busy disk can stretch past the coordinator's patience, 1.5 s);
        // the status taken last time stands in meanwhile.
        let held = match self.epochs.try_lock() {
            Ok(epochs) => Some(epochs),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        let epochs = match held {
            Some(epochs) => {
                let status = epochs.status();
                *self
                    .epochs_status
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = status.clone();
                status
            }
            None => self
                .epochs_status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        };
        let header = self.metadata.header();
        let state = self.lock();
        let disk_state = match (header.data_state, state.resyncing) {
            _ if state.disk_failed.is_some() => SecondaryDiskState::Failed,
            (DataState::Inconsistent, true) => SecondaryDiskState::SyncTarget,
            (DataState::Inconsistent, false) => SecondaryDiskState::Inconsistent,
            (DataState::UpToDate, _) => SecondaryDiskState::UpToDate,
        };
        SecondaryStatus {
            disk_state,
            generation: header.generation,
            peer_reachable: self.transport.peer_reachable(),
            links: self.transport.links(),
            applied_writes: state.applied_writes,
            applied_bytes: state.applied_bytes,
            resync_bytes_received: state.resync_bytes,
            refused_requests: state.refused,
            disk_failed: state.disk_failed.clone(),
            disk_failures: state.disk_failures,
            epochs,
        }
    }
}

/// The kernel's identity of this boot of the host.
pub const KERNEL_BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// This boot of the host, from `path` (normally [`KERNEL_BOOT_ID`]; test hosts that share
/// one kernel emulate a power loss with a file of their own), if it can be read.
fn current_boot_id(path: &Path) -> Option<u128> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_boot_id(&text)
}

/// Durably records that this copy is in use in this boot of the host; returns whether the
/// host went down under its last user (recorded in another boot and never stopped
/// cleanly): writes that were acknowledged but not flushed may be gone from the image.
pub fn host_restarted_under(metadata: &Metadata, boot_id_path: &Path) -> io::Result<bool> {
    let current = current_boot_id(boot_id_path);
    if current.is_none() {
        warn!(
            "cannot read the boot id from {}: a crash of this host will not be detected",
            boot_id_path.display()
        );
    }
    let previous = metadata.mark_open(current).map_err(io::Error::other)?;
    Ok(matches!((previous, current), (Some(before), Some(now)) if before != now))
}

fn parse_boot_id(text: &str) -> Option<u128> {
    let hex: String = text.trim().chars().filter(|c| *c != '-').collect();
    (hex.len() == 32).then(|| u128::from_str_radix(&hex, 16).ok())?
}

mod level3;
mod snapshot;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_ids_parse_and_garbage_does_not() {
        assert_eq!(
            parse_boot_id("0f4e3c7a-1b2c-4d5e-8f90-a1b2c3d4e5f6\n"),
            Some(0x0f4e3c7a_1b2c_4d5e_8f90_a1b2c3d4e5f6)
        );
        assert_eq!(parse_boot_id("not a boot id"), None);
        assert!(
            current_boot_id(Path::new(KERNEL_BOOT_ID)).is_some(),
            "this kernel exposes its boot id"
        );
    }

    /// A transport that delivers nothing; `apply` is driven directly.
    struct Silent;

    impl Transport for Silent {
        fn send(&self, _message: &Message, _payload: Vec<u8>) -> io::Result<()> {
            Ok(())
        }
        fn recv(&self, _timeout: Duration) -> io::Result<Option<Received>> {
            Ok(None)
        }
        fn peer_reachable(&self) -> bool {
            false
        }
        fn links(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
        fn close(&self) {}
    }

    fn secondary_at_generation(dir: &std::path::Path, generation: u64) -> Secondary {
        let image_path = dir.join("image");
        std::fs::File::create(&image_path)
            .and_then(|file| file.set_len(1 << 20))
            .expect("image");
        let image = Image::open(&image_path, false).expect("open image");
        let metadata = Metadata::open_or_create(&dir.join("meta"), 1 << 20, DataState::UpToDate)
            .expect("metadata");
        metadata
            .set_header(generation, DataState::UpToDate)
            .expect("generation");
        let metadata = Arc::new(metadata);
        let epochs = Epochs::recover(EpochOptions::default(), &metadata).expect("epochs");
        Secondary {
            image: Arc::new(image),
            metadata,
            transport: Arc::new(Silent),
            state: Mutex::new(State::default()),
            epochs_status: Mutex::new(epochs.status()),
            epochs: Mutex::new(epochs),
            epochs_changed: Condvar::new(),
            applying: Mutex::new(()),
            ahead: Mutex::new(level3::ReadAhead::default()),
            commit_target: Mutex::new(None),
            commit_requested: Condvar::new(),
            flushes: Mutex::new(std::sync::mpsc::channel().0),
        }
    }

    fn write(id: u64, generation: u64, crc32c: u32) -> Message {
        Message::Write {
            id,
            generation,
            offset: 4096,
            crc32c,
        }
    }

    #[test]
    fn lower_generations_and_bad_checksums_are_refused_and_write_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secondary = secondary_at_generation(dir.path(), 5);
        let data = vec![0xabu8; 4096];
        let crc = crc32c::crc32c(&data);
        let stale = secondary.apply(write(1, 4, crc), &data);
        assert_eq!(
            stale,
            Some(Message::Failed {
                id: 1,
                reason: Refusal::StaleGeneration { ours: 5 }
            })
        );
        let corrupt = secondary.apply(write(2, 5, crc ^ 1), &data);
        assert_eq!(
            corrupt,
            Some(Message::Failed {
                id: 2,
                reason: Refusal::Checksum
            })
        );
        let mut back = vec![0u8; 4096];
        secondary.image.read_at(&mut back, 4096).expect("read");
        assert!(
            back.iter().all(|&b| b == 0),
            "a refused write reached the image"
        );
        let hello = secondary.apply(
            Message::Hello {
                generation: 3,
                size_bytes: 1 << 20,
            },
            &[],
        );
        assert!(matches!(
            hello,
            Some(Message::Failed {
                reason: Refusal::StaleGeneration { ours: 5 },
                ..
            })
        ));
        assert_eq!(
            secondary.apply(write(3, 5, crc), &data),
            Some(Message::Done { id: 3 })
        );
        secondary.image.read_at(&mut back, 4096).expect("read");
        assert_eq!(back, data);
        let past_end = Message::Write {
            id: 4,
            generation: 5,
            offset: (1 << 20) - 512,
            crc32c: crc,
        };
        assert!(matches!(
            secondary.apply(past_end, &data),
            Some(Message::Failed {
                reason: Refusal::OutOfRange,
                ..
            })
        ));
    }

    #[test]
    fn a_failed_write_makes_the_copy_durably_inconsistent_until_repaired_and_resynced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut secondary = secondary_at_generation(dir.path(), 5);
        // Every write to this image fails, as a failed disk's would.
        secondary.image =
            Arc::new(Image::open(&dir.path().join("image"), true).expect("read-only image"));
        let data = vec![0xabu8; 4096];
        let crc = crc32c::crc32c(&data);
        let answer = secondary.apply(write(1, 5, crc), &data);
        assert!(
            matches!(
                answer,
                Some(Message::Failed {
                    reason: Refusal::Io(_),
                    ..
                })
            ),
            "{answer:?}"
        );
        let reopened =
            Metadata::open_or_create(&dir.path().join("meta"), 1 << 20, DataState::UpToDate)
                .expect("reopen");
        assert_eq!(
            reopened.header().data_state,
            DataState::Inconsistent,
            "recorded durably before the answer"
        );
        assert_eq!(secondary.status().disk_state, SecondaryDiskState::Failed);
        // Nothing is applied any more, not even the end of a resync.
        let done = secondary.apply(
            Message::ResyncDone {
                id: 2,
                generation: 5,
            },
            &[],
        );
        assert!(matches!(done, Some(Message::Failed { .. })), "{done:?}");
        assert_eq!(
            secondary.metadata.header().data_state,
            DataState::Inconsistent
        );
        assert!(secondary.promote(None).is_err());
        // Repaired, it applies again, and only a resync makes it UpToDate.
        secondary.image = Arc::new(Image::open(&dir.path().join("image"), false).expect("image"));
        secondary.repair().expect("repair");
        assert_eq!(
            secondary.status().disk_state,
            SecondaryDiskState::Inconsistent
        );
        assert!(secondary.promote(None).is_err());
        for (id, message) in [
            (
                3,
                Message::ResyncStart {
                    id: 3,
                    generation: 5,
                },
            ),
            (4, write(4, 5, crc)),
            (
                5,
                Message::ResyncDone {
                    id: 5,
                    generation: 5,
                },
            ),
        ] {
            assert_eq!(secondary.apply(message, &data), Some(Message::Done { id }));
        }
        assert_eq!(secondary.status().disk_state, SecondaryDiskState::UpToDate);
    }

    #[test]
    fn a_recorded_boot_id_survives_until_a_clean_stop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta");
        let metadata = Metadata::open_or_create(&path, 1 << 20, DataState::UpToDate).expect("m");
        assert_eq!(metadata.mark_open(Some(7)).expect("open"), None);
        drop(metadata);
        // An unclean stop leaves it set; the next start finds it.
        let metadata = Metadata::open_or_create(&path, 1 << 20, DataState::UpToDate).expect("m");
        assert_eq!(metadata.mark_open(Some(8)).expect("open"), Some(7));
        assert_eq!(metadata.mark_open(None).expect("close"), Some(8));
    }

    /// How many pages of the file at `path` are in the page cache (`mincore` of a mapping).
    fn cached_pages(path: &std::path::Path) -> usize {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(path).expect("open");
        let length = usize::try_from(file.metadata().expect("metadata").len()).expect("length");
        // SAFETY: a read-only shared mapping of an open file, unmapped below; nothing reads
        // through it.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            map,
            libc::MAP_FAILED,
            "mmap: {}",
            io::Error::last_os_error()
        );
        let mut resident = vec![0u8; length.div_ceil(4096)];
        // SAFETY: `map` is a live mapping of `length` bytes; `resident` has a byte per page.
        let ret = unsafe { libc::mincore(map, length, resident.as_mut_ptr()) };
        let error = io::Error::last_os_error();
        // SAFETY: unmaps the mapping made above, used no more.
        unsafe { libc::munmap(map, length) };
        assert_eq!(ret, 0, "mincore: {error}");
        resident.iter().filter(|&&byte| byte & 1 == 1).count()
    }

    /// A resync's large writes leave the image's page cache in large folios, which make every
    /// later small write cost ext4 a walk over a whole folio: once the resync completes (and
    /// the image is synced), the secondary drops its clean cache. The image lives on the
    /// disk the build is on (a tmpfs keeps its pages whatever one advises).
    #[test]
    fn a_completed_resync_leaves_no_page_of_the_image_cached() {
        let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
        std::fs::create_dir_all(&target).expect("target dir");
        let dir = tempfile::Builder::new()
            .prefix("resync-cache-")
            .tempdir_in(&target)
            .expect("temp dir");
        let secondary = secondary_at_generation(dir.path(), 3);
        let block = vec![0x5au8; 1 << 20];
        let answer = secondary.write(1, 0, &block, true);
        assert!(
            matches!(answer, Message::Done { id: 1 }),
            "unexpected answer {answer:?}"
        );
        let image = dir.path().join("image");
        assert_eq!(
            cached_pages(&image),
            256,
            "the resync block is in the cache"
        );
        secondary.resync_complete(3).expect("resync complete");
        assert_eq!(cached_pages(&image), 0, "pages left in the cache");
        let mut back = vec![0u8; 1 << 20];
        secondary.image().read_at(&mut back, 0).expect("read");
        assert!(back == block, "the resynced data reads back from the disk");
        assert_eq!(
            secondary.metadata().header().data_state,
            DataState::UpToDate
        );
    }
}
