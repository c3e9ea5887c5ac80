//! The secondary at Level 3 (`docs/LEVEL3.md`, "Disk writes at Level 3"): between the
//! primary's `EpochStart` and `EpochOff` its writes are filed in the epoch journal and
//! acknowledged on receipt; `commit N` applies the sealed epochs up to N, `wait-sealed N`
//! answers once N is sealed, `promote GEN N*` applies up to N* and discards the rest.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use log::{info, warn};

use super::Secondary;
use crate::mirror::epochs::{self, Applied, Batch, Entry, Receiving};
use crate::mirror::journal::{Kind, Reader, Record};
use crate::mirror::primary::MAX_BLOCK_BYTES;
use crate::mirror::protocol::{Message, Payload, Received, Refusal};

/// How often a receiver waiting for journal space looks whether it should stop.
const FULL_WAIT: Duration = Duration::from_millis(100);
/// While waiting for journal space, the receiver reads ahead (for an `EpochOff`) at most
/// this many payload bytes and messages; then it only waits.
const AHEAD_MAX_BYTES: usize = 64 << 20;
const AHEAD_MAX_MESSAGES: usize = 4096;

/// Messages read ahead of a record that waits for journal space, in arrival order.
#[derive(Default)]
pub(super) struct ReadAhead {
    received: VecDeque<Received>,
    bytes: usize,
}

/// How a wait for journal space ended.
enum Room {
    /// Try filing again.
    Retry,
    /// An `EpochOff` is behind the waiting record: Level 3 ends before it.
    OffAhead,
    /// Promoted meanwhile.
    Stopped,
}

/// Where a record went.
enum Filed {
    Journal,
    /// Level 3 ended behind it (`EpochOff` read ahead): everything buffered was applied;
    /// the record is to be applied as at Level 2.
    Level2,
    /// Promoted meanwhile: nothing to answer.
    Stopped,
}

impl Secondary {
    /// Handles `message` when Level 3 concerns it (a marker, or a change while epochs are
    /// on); `None` leaves it to the Level 2 path. `generation` is ours, already checked.
    pub(super) fn level3(
        &self,
        message: &Message,
        payload: &Payload,
        generation: u64,
    ) -> Option<Option<Message>> {
        let receiving = self.lock_epochs().receiving();
        let answer = match (message, receiving) {
            (
                Message::EpochStart {
                    id, epoch, resumed, ..
                },
                _,
            ) => Some(self.epoch_start(*id, *epoch, *resumed)),
            (Message::EpochEnd { id, epoch, .. }, _) => self.epoch_end(*id, *epoch, generation),
            (Message::EpochOff { id, .. }, _) => Some(self.epoch_off(*id)),
            (_, Receiving::Off) => {
                if changes_or_reads(message) && self.lock_epochs().buffered() {
                    // The primary went back to Level 2 without `EpochOff` (a restart): what
                    // it sends now must come after what it sent before.
                    warn!("a Level 2 request with epochs still buffered: applying them first");
                    if let Err(error) = self.leave_level3() {
                        warn!("cannot apply the buffered epochs: {error}");
                    }
                }
                return None;
            }
            (Message::Read { id, .. }, Receiving::Epoch(_) | Receiving::Repeat(_)) => {
                // The image lacks the buffered epochs: a read would miss recent writes.
                Some(Message::Failed {
                    id: *id,
                    reason: Refusal::EpochOutOfTurn {
                        receiving: receiving_epoch(receiving),
                    },
                })
            }
            (
                Message::Write {
                    id, offset, crc32c, ..
                },
                _,
            ) => Some(self.file_write(*id, *offset, *crc32c, payload, generation)),
            (
                Message::ResyncBlock {
                    id, offset, crc32c, ..
                },
                _,
            ) if !self.resyncing() => {
                // Not part of a resync: a guest write sent again after a restart.
                Some(self.file_write(*id, *offset, *crc32c, payload, generation))
            }
            (
                Message::Zero {
                    id,
                    offset,
                    len,
                    deallocate,
                    ..
                },
                _,
            ) => Some(self.file_zero(*id, *offset, *len, *deallocate, generation)),
            (Message::Flush { id, .. }, _) => {
                let synced = self.lock_epochs().sync().map_err(io::Error::other);
                Some(self.result(*id, synced))
            }
            (Message::ResyncDone { id, .. }, _) => {
                // The resync's blocks are in the image; the copy is UpToDate once the
                // epoch this record belongs to is applied.
                let record = record(generation, Kind::ResyncDone, 0, 0);
                let filed = self
                    .image()
                    .flush()
                    .and_then(|()| self.file_waiting(record, &[]));
                match filed {
                    Ok(Filed::Level2) => {
                        let done = self.resync_complete(generation);
                        Some(self.result(*id, done))
                    }
                    filed => {
                        if filed.is_ok() {
                            self.end_resync_session();
                        }
                        answer_filed(self, *id, filed)
                    }
                }
            }
            _ => return None,
        };
        Some(answer)
    }

    fn epoch_start(&self, id: u64, epoch: u64, resumed: bool) -> Message {
        let leftovers = {
            let epochs = self.lock_epochs();
            !resumed && epochs.receiving() == Receiving::Off && epochs.buffered()
        };
        if leftovers {
            // A new `epoch on` after epochs this copy never heard end: they are the old
            // run's, and applied first, as a Level 2 request would have them.
            if let Err(error) = self.leave_level3() {
                return Message::Failed {
                    id,
                    reason: Refusal::Io(error),
                };
            }
        }
        let started = self.lock_epochs().start(epoch, resumed, self.metadata());
        match started {
            Ok(true) => {
                info!("Level 3: writes are buffered as epoch {epoch}");
                Message::Done { id }
            }
            Ok(false) => self.out_of_turn(id, "EpochStart", epoch),
            Err(error) => self.result(id, Err(io::Error::other(error))),
        }
    }

    /// `EpochEnd`: answered `Sealed` once the epoch is durable here.
    fn epoch_end(&self, id: u64, epoch: u64, generation: u64) -> Option<Message> {
        let mut counted = false;
        loop {
            let ended = self.lock_epochs().end(epoch, generation);
            match ended {
                Ok(Some(true)) => {
                    self.epochs_changed().notify_all();
                    return Some(Message::Sealed { id, epoch });
                }
                Ok(None) => return Some(self.out_of_turn(id, "EpochEnd", epoch)),
                Ok(Some(false)) => match self.wait_for_room(&mut counted) {
                    Room::Retry => {}
                    Room::Stopped => return None,
                    Room::OffAhead => {
                        // Level 3 ends right behind this end: the epoch is applied, durably.
                        return Some(match self.leave_level3() {
                            Ok(()) => Message::Sealed { id, epoch },
                            Err(error) => Message::Failed {
                                id,
                                reason: Refusal::Io(error),
                            },
                        });
                    }
                },
                Err(error) => return Some(self.result(id, Err(io::Error::other(error)))),
            }
        }
    }

    fn epoch_off(&self, id: u64) -> Message {
        match self.leave_level3() {
            Ok(()) => {
                info!("Level 3 ends: everything buffered is applied; applying on arrival");
                Message::Done { id }
            }
            Err(error) => Message::Failed {
                id,
                reason: Refusal::Io(error),
            },
        }
    }

    fn out_of_turn(&self, id: u64, what: &str, epoch: u64) -> Message {
        let receiving = receiving_epoch(self.lock_epochs().receiving());
        warn!("refused {what} for epoch {epoch}: out of turn (receiving {receiving:?})");
        Message::Failed {
            id,
            reason: Refusal::EpochOutOfTurn { receiving },
        }
    }

    fn file_write(
        &self,
        id: u64,
        offset: u64,
        crc32c: u32,
        payload: &Payload,
        generation: u64,
    ) -> Message {
        let data: &[u8] = payload;
        if data.len() > MAX_BLOCK_BYTES {
            // The primary never sends more in one message: refused before anything is kept.
            return Message::Failed {
                id,
                reason: Refusal::OutOfRange,
            };
        }
        if !payload.matches(crc32c) {
            return Message::Failed {
                id,
                reason: Refusal::Checksum,
            };
        }
        if !self.in_range(offset, data.len() as u64) {
            self.disk_failed("a write past the end of this copy");
            return Message::Failed {
                id,
                reason: Refusal::OutOfRange,
            };
        }
        let record = record(generation, Kind::Write, offset, data.len() as u64);
        match self.file_waiting(record, data) {
            Ok(Filed::Level2) => self.write(id, offset, data, false),
            filed => answer_filed(self, id, filed).unwrap_or(Message::Failed {
                id,
                reason: Refusal::Io("stopped while the journal was full".into()),
            }),
        }
    }

    fn file_zero(
        &self,
        id: u64,
        offset: u64,
        len: u64,
        deallocate: bool,
        generation: u64,
    ) -> Message {
        if !self.in_range(offset, len) {
            return Message::Failed {
                id,
                reason: Refusal::OutOfRange,
            };
        }
        let record = record(generation, Kind::Zero { deallocate }, offset, len);
        match self.file_waiting(record, &[]) {
            Ok(Filed::Level2) => self.zero(id, offset, len, deallocate),
            filed => answer_filed(self, id, filed).unwrap_or(Message::Failed {
                id,
                reason: Refusal::Io("stopped while the journal was full".into()),
            }),
        }
    }

    fn in_range(&self, offset: u64, len: u64) -> bool {
        offset
            .checked_add(len)
            .is_some_and(|end| end <= self.image().size_bytes())
    }

    /// Files a record, waiting while the journal is full: the primary hears nothing until
    /// a commit frees room (its writes wait; none is dropped), or until an `EpochOff` read
    /// ahead ends Level 3 (then everything buffered is applied, and the record is to be
    /// applied as at Level 2).
    fn file_waiting(&self, record: Record, data: &[u8]) -> io::Result<Filed> {
        let mut counted = false;
        loop {
            let filed = self.lock_epochs().file(record, data);
            match filed {
                Ok(true) => {
                    if counted {
                        self.lock_epochs().full = false;
                        info!("the epoch journal has room again: acknowledging");
                    }
                    return Ok(Filed::Journal);
                }
                Ok(false) => match self.wait_for_room(&mut counted) {
                    Room::Retry => {}
                    Room::Stopped => return Ok(Filed::Stopped),
                    Room::OffAhead => {
                        self.leave_level3().map_err(io::Error::other)?;
                        self.lock_epochs().full = false;
                        warn!("Level 3 ended behind a full journal: applying on arrival");
                        return Ok(Filed::Level2);
                    }
                },
                Err(error) => return Err(io::Error::other(error)),
            }
        }
    }

    /// Waits a little for a commit to free journal space, reading ahead meanwhile (within
    /// bounds) to find an `EpochOff`; counts and reports the first wait of a record.
    fn wait_for_room(&self, counted: &mut bool) -> Room {
        {
            let mut epochs = self.lock_epochs();
            if !*counted {
                *counted = true;
                epochs.full_waits += 1;
                if !epochs.full {
                    let status = epochs.status();
                    warn!(
                        "event: epoch journal full ({} of {} bytes used): not acknowledging \
                         the primary until a commit frees room",
                        status.journal_used_bytes, status.journal_size_bytes
                    );
                }
                epochs.full = true;
            }
        }
        if self.off_ahead() {
            return Room::OffAhead;
        }
        let room_ahead = {
            let ahead = self.lock_ahead();
            ahead.bytes < AHEAD_MAX_BYTES && ahead.received.len() < AHEAD_MAX_MESSAGES
        };
        if room_ahead {
            match self.transport.recv(FULL_WAIT) {
                Ok(Some(received)) => {
                    let mut ahead = self.lock_ahead();
                    if let Received::Message(_, payload) = &received {
                        ahead.bytes += payload.len();
                    }
                    ahead.received.push_back(received);
                }
                Ok(None) => {}
                Err(_) => std::thread::sleep(FULL_WAIT),
            }
        } else {
            let epochs = self.lock_epochs();
            drop(
                match self.epochs_changed().wait_timeout(epochs, FULL_WAIT) {
                    Ok((guard, _)) => guard,
                    Err(poisoned) => poisoned.into_inner().0,
                },
            );
        }
        if self.promoted() {
            Room::Stopped
        } else if self.off_ahead() {
            Room::OffAhead
        } else {
            Room::Retry
        }
    }

    /// Whether an `EpochOff` waits among the messages read ahead.
    fn off_ahead(&self) -> bool {
        self.lock_ahead()
            .received
            .iter()
            .any(|received| matches!(received, Received::Message(Message::EpochOff { .. }, _)))
    }

    fn lock_ahead(&self) -> std::sync::MutexGuard<'_, ReadAhead> {
        self.ahead
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The oldest message read ahead, if any: the receiver handles these first.
    pub(super) fn take_ahead(&self) -> Option<Received> {
        let mut ahead = self.lock_ahead();
        let received = ahead.received.pop_front()?;
        if let Received::Message(_, payload) = &received {
            ahead.bytes = ahead.bytes.saturating_sub(payload.len());
        }
        Some(received)
    }

    /// `commit N` from the control socket: refused unless `N` is sealed, then applied by
    /// the epoch applier while the guest runs (`status` shows `applied_epoch` once done).
    pub fn commit_in_background(&self, epoch: u64) -> Result<String, String> {
        {
            let epochs = self.lock_epochs();
            if epochs.applied().is_some_and(|applied| epoch <= applied) {
                return Ok(format!("epoch {epoch} was applied already"));
            }
            if epochs.sealed().is_none_or(|sealed| sealed < epoch) {
                return Err(epochs::EpochError::NotSealed {
                    epoch,
                    sealed: epochs.sealed(),
                }
                .to_string());
            }
        }
        let mut target = self.lock_commit_target();
        *target = (*target).max(Some(epoch));
        self.commit_requested.notify_all();
        Ok(format!(
            "committing through epoch {epoch}: applied in the background"
        ))
    }

    fn lock_commit_target(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        self.commit_target
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The epoch applier: applies up to the latest `commit` target until promoted.
    pub(super) fn commit_loop(&self) {
        loop {
            if self.promoted() {
                return;
            }
            let target = {
                let target = self.lock_commit_target();
                let (mut target, _) = match self.commit_requested.wait_timeout(target, FULL_WAIT) {
                    Ok(woken) => woken,
                    Err(poisoned) => poisoned.into_inner(),
                };
                target.take()
            };
            let Some(epoch) = target else {
                continue;
            };
            if let Err(error) = self.commit(epoch) {
                warn!("commit of epoch {epoch} failed: {error}");
            }
        }
    }

    /// `commit N`: applies every sealed epoch up to `N`, in arrival order, syncs the image,
    /// records `applied_epoch = N`, then frees their journal space.
    pub fn commit(&self, epoch: u64) -> Result<String, String> {
        let _applying = self.applying();
        let (batch, reader) = self.batch(|epochs| epochs.sealed_through(epoch))?;
        if batch.is_empty() {
            return Ok(format!("epoch {epoch} was applied already"));
        }
        let applied = self.apply_batch(&batch, reader.as_ref())?;
        self.record_applied(Some(epoch), false)?;
        info!(
            "event: epoch commit: epochs through {epoch} applied ({} record(s))",
            applied.records
        );
        Ok(format!(
            "applied through epoch {epoch}: {} record(s)",
            applied.records
        ))
    }

    /// `wait-sealed N`: answers once epoch `N` is sealed (or applied) here; refused after
    /// `timeout`.
    pub fn wait_sealed(&self, epoch: u64, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut epochs = self.lock_epochs();
        loop {
            if epochs.done().is_some_and(|done| done >= epoch) {
                return Ok(format!("epoch {epoch} is sealed"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "epoch {epoch} is not sealed after {} ms (sealed through {:?})",
                    timeout.as_millis(),
                    epochs.sealed()
                ));
            }
            epochs = match self.epochs_changed().wait_timeout(epochs, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// `promote GEN N*`: applies the sealed epochs up to `N*`, discards every later one and
    /// the unsealed tail, records `applied_epoch = N*` and an empty journal, then promotes
    /// as `promote GEN` does (refused if the copy is not UpToDate then).
    pub fn promote_at(&self, generation: u64, epoch: u64) -> Result<u64, String> {
        self.check_promotable(Some(generation))?;
        {
            let _applying = self.applying();
            let (batch, reader) = self.batch(|epochs| {
                if epochs.done().is_none_or(|done| done < epoch) {
                    return Err(epochs::EpochError::NotSealed {
                        epoch,
                        sealed: epochs.sealed(),
                    });
                }
                epochs.sealed_through(epoch)
            })?;
            let applied = self.apply_batch(&batch, reader.as_ref())?;
            let (dropped, ranges) = {
                let epochs = self.lock_epochs();
                let dropped = epochs
                    .status()
                    .buffered_records
                    .saturating_sub(applied.records);
                (dropped, epochs.ranges_after(epoch))
            };
            // The old primary's image holds the dropped writes: marked out of sync here,
            // the resync when it returns as secondary copies ours over them (its own list
            // of suspect regions does not name them: to it they were mirrored).
            let size = self.image().size_bytes();
            for (offset, len) in ranges {
                let end = offset.saturating_add(len).min(size);
                if offset < end {
                    self.metadata()
                        .mark_out_of_sync(offset, end - offset)
                        .map_err(|error| {
                            format!("cannot mark a dropped write out of sync: {error}")
                        })?;
                }
            }
            self.record_applied(Some(epoch), true)?;
            warn!(
                "event: promotion at epoch {epoch}: {} record(s) applied, {dropped} record(s) of \
                 later or unsealed epochs discarded",
                applied.records
            );
        }
        self.promote(Some(generation))
    }

    /// Applies everything buffered, sealed or not, in order, and goes back to Level 2.
    pub(super) fn leave_level3(&self) -> Result<(), String> {
        let _applying = self.applying();
        let (batch, reader) = self.batch(|epochs| Ok(epochs.everything()))?;
        let applied = self.apply_batch(&batch, reader.as_ref())?;
        self.record_applied(applied.last_epoch, true)
    }

    fn batch(
        &self,
        take: impl FnOnce(&epochs::Epochs) -> Result<Batch, epochs::EpochError>,
    ) -> Result<(Batch, Option<Reader>), String> {
        let epochs = self.lock_epochs();
        let batch = take(&epochs).map_err(|error| error.to_string())?;
        let reader = epochs.reader().map_err(|error| error.to_string())?;
        Ok((batch, reader))
    }

    /// Applies a batch to the image (synced); a failure leaves this copy durably
    /// Inconsistent, as a failed write does at Level 2.
    fn apply_batch(
        &self,
        batch: &[(u64, Vec<Entry>)],
        reader: Option<&Reader>,
    ) -> Result<Applied, String> {
        let applied = epochs::apply(self.image(), reader, batch).map_err(|error| {
            let text = describe(&error);
            self.disk_failed(&text);
            text
        })?;
        if applied.resync_done {
            let generation = self.metadata().header().generation;
            self.resync_complete(generation).map_err(|error| {
                self.disk_failed(&error.to_string());
                error.to_string()
            })?;
        }
        Ok(applied)
    }

    fn record_applied(&self, epoch: Option<u64>, discard_rest: bool) -> Result<(), String> {
        let recorded = self
            .lock_epochs()
            .applied_through(epoch, discard_rest, self.metadata());
        self.epochs_changed().notify_all();
        recorded.map_err(|error| error.to_string())
    }
}

fn record(generation: u64, kind: Kind, offset: u64, len: u64) -> Record {
    Record {
        sequence: 0,
        generation,
        epoch: 0,
        kind,
        offset,
        len,
    }
}

/// The answer to a filed record: `Done`, a failure (the journal's disk: this copy is
/// Inconsistent), or `None` when promoted while waiting for room.
fn answer_filed(secondary: &Secondary, id: u64, filed: io::Result<Filed>) -> Option<Message> {
    match filed {
        Ok(Filed::Journal) => Some(Message::Done { id }),
        // The caller applies it at Level 2 and answers; never reached with it.
        Ok(Filed::Level2) => Some(Message::Failed {
            id,
            reason: Refusal::Io("Level 3 ended before this record was filed".into()),
        }),
        Ok(Filed::Stopped) => None,
        Err(error) => Some(secondary.result(id, Err(error))),
    }
}

fn receiving_epoch(receiving: Receiving) -> Option<u64> {
    match receiving {
        Receiving::Off => None,
        Receiving::Epoch(epoch) | Receiving::Repeat(epoch) => Some(epoch),
    }
}

/// Requests that change this copy or read it: at Level 2 they must see every buffered
/// epoch applied first.
fn changes_or_reads(message: &Message) -> bool {
    matches!(
        message,
        Message::Write { .. }
            | Message::Zero { .. }
            | Message::ResyncBlock { .. }
            | Message::ResyncCompare { .. }
            | Message::Read { .. }
    )
}

/// An error with its sources, for a log line and a refusal.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::{Arc, Condvar, Mutex};

    use super::*;
    use crate::image::Image;
    use crate::metadata::{DataState, Metadata};
    use crate::mirror::epochs::{EpochOptions, Epochs};
    use crate::mirror::journal::MIN_JOURNAL_BYTES;
    use crate::mirror::protocol::{Received, Transport};

    const DISK_BYTES: u64 = 1 << 20;

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

    fn secondary(dir: &Path) -> Secondary {
        let image_path = dir.join("image");
        std::fs::File::create(&image_path)
            .and_then(|file| file.set_len(DISK_BYTES))
            .expect("image");
        let metadata = Metadata::open_or_create(&dir.join("meta"), DISK_BYTES, DataState::UpToDate)
            .expect("metadata");
        metadata
            .set_header(5, DataState::UpToDate)
            .expect("generation");
        let options = EpochOptions {
            journal_path: dir.join("journal"),
            journal_bytes: MIN_JOURNAL_BYTES,
            memory_bytes: 1 << 20,
        };
        let epochs = Epochs::recover(options, &metadata).expect("epochs");
        Secondary {
            image: Arc::new(Image::open(&image_path, false).expect("open image")),
            metadata: Arc::new(metadata),
            transport: Arc::new(Silent),
            state: Mutex::new(super::super::State::default()),
            epochs_status: Mutex::new(epochs.status()),
            epochs: Mutex::new(epochs),
            epochs_changed: Condvar::new(),
            applying: Mutex::new(()),
            ahead: Mutex::new(ReadAhead::default()),
            commit_target: Mutex::new(None),
            commit_requested: Condvar::new(),
            flushes: Mutex::new(std::sync::mpsc::channel().0),
        }
    }

    fn out_of_turn(answer: Option<Message>) -> bool {
        matches!(
            answer,
            Some(Message::Failed {
                reason: Refusal::EpochOutOfTurn { .. },
                ..
            })
        )
    }

    fn write(id: u64, offset: u64, data: &[u8]) -> Message {
        Message::Write {
            id,
            generation: 5,
            offset,
            crc32c: crc32c::crc32c(data),
        }
    }

    /// `status` never waits for the epochs (a commit holds them while it records its epoch
    /// durably) nor for a header change's sync: it answers from what it saw last.
    #[test]
    fn status_answers_while_a_commit_holds_the_epochs_and_the_metadata() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secondary = Arc::new(secondary(dir.path()));
        let before = secondary.status();
        let (answered, answer) = std::sync::mpsc::channel();
        let held = secondary.lock_epochs();
        let metadata_held = secondary.metadata().lock_for_test();
        let asking = Arc::clone(&secondary);
        let thread = std::thread::spawn(move || {
            let _ = answered.send(asking.status());
        });
        let status = answer
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("status answered while the locks are held");
        assert_eq!(status.epochs, before.epochs);
        assert_eq!(status.generation, before.generation);
        drop(metadata_held);
        drop(held);
        thread.join().expect("join");
    }

    /// A resync while epochs run: its blocks go to the image at once, its end is filed in
    /// the epoch it arrives in, and the copy is UpToDate only once that epoch is applied;
    /// a promotion at an earlier epoch is refused.
    #[test]
    fn a_resync_ends_with_the_epoch_that_holds_its_end() {
        for promote_at in [1, 2] {
            let dir = tempfile::tempdir().expect("tempdir");
            let secondary = secondary(dir.path());
            let message = |message: Message| secondary.apply(message, &[]);
            let start = Message::EpochStart {
                id: 1,
                generation: 5,
                epoch: 1,
                resumed: false,
            };
            assert_eq!(message(start), Some(Message::Done { id: 1 }));
            let resync_start = Message::ResyncStart {
                id: 2,
                generation: 5,
            };
            assert_eq!(message(resync_start), Some(Message::Done { id: 2 }));
            let data = vec![0x5au8; 4096];
            let block = Message::ResyncBlock {
                id: 3,
                generation: 5,
                offset: 8192,
                crc32c: crc32c::crc32c(&data),
            };
            assert_eq!(secondary.apply(block, &data), Some(Message::Done { id: 3 }));
            let mut back = vec![0u8; 4096];
            secondary.image.read_at(&mut back, 8192).expect("read");
            assert_eq!(back, data, "a resync block goes to the image at once");
            let end = |id, epoch| Message::EpochEnd {
                id,
                generation: 5,
                epoch,
            };
            assert_eq!(
                message(end(4, 1)),
                Some(Message::Sealed { id: 4, epoch: 1 })
            );
            let resync_done = Message::ResyncDone {
                id: 5,
                generation: 5,
            };
            assert_eq!(message(resync_done), Some(Message::Done { id: 5 }));
            assert_eq!(
                message(end(6, 2)),
                Some(Message::Sealed { id: 6, epoch: 2 })
            );
            assert_eq!(
                secondary.metadata.header().data_state,
                DataState::Inconsistent,
                "the resync's end is not applied yet"
            );
            let promoted = secondary.promote_at(6, promote_at);
            if promote_at == 1 {
                assert!(
                    promoted.is_err(),
                    "promoted without the epoch that ends the resync"
                );
                assert_eq!(
                    secondary.metadata.header().data_state,
                    DataState::Inconsistent
                );
            } else {
                assert_eq!(promoted, Ok(6));
                assert_eq!(secondary.metadata.header().data_state, DataState::UpToDate);
            }
        }
    }

    #[test]
    fn markers_out_of_turn_and_hostile_requests_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secondary = secondary(dir.path());
        let end = |id, epoch| Message::EpochEnd {
            id,
            generation: 5,
            epoch,
        };
        let start = |id, epoch| Message::EpochStart {
            id,
            generation: 5,
            epoch,
            resumed: false,
        };
        let resume = |id, epoch| Message::EpochStart {
            id,
            generation: 5,
            epoch,
            resumed: true,
        };
        // No epoch is receiving: an end is refused, and no journal is created for it.
        assert!(out_of_turn(secondary.apply(end(1, 4), &[])));
        assert!(!dir.path().join("journal").exists());
        // A marker from an older generation is a stale primary's.
        assert!(matches!(
            secondary.apply(
                Message::EpochStart {
                    id: 2,
                    generation: 4,
                    epoch: 1,
                    resumed: false,
                },
                &[]
            ),
            Some(Message::Failed {
                reason: Refusal::StaleGeneration { ours: 5 },
                ..
            })
        ));
        assert_eq!(
            secondary.apply(start(3, 1), &[]),
            Some(Message::Done { id: 3 })
        );
        let data = vec![0x42u8; 4096];
        assert_eq!(
            secondary.apply(write(4, 0, &data), &data),
            Some(Message::Done { id: 4 })
        );
        // The end of another epoch than the receiving one, a jump to another epoch.
        assert!(out_of_turn(secondary.apply(end(5, 2), &[])));
        assert!(out_of_turn(secondary.apply(end(6, 0), &[])));
        assert!(out_of_turn(secondary.apply(start(7, 9), &[])));
        // Ranges and lengths that do not fit, and a bad checksum: refused, nothing filed.
        let refused = |answer: Option<Message>| matches!(answer, Some(Message::Failed { .. }));
        let huge = vec![0u8; MAX_BLOCK_BYTES + 1];
        assert!(refused(secondary.apply(write(9, 0, &huge), &huge)));
        let zero = Message::Zero {
            id: 10,
            generation: 5,
            offset: 4096,
            len: u64::MAX,
            deallocate: false,
        };
        assert!(refused(secondary.apply(zero, &[])));
        let mut damaged = write(11, 0, &data);
        if let Message::Write { crc32c, .. } = &mut damaged {
            *crc32c ^= 1;
        }
        assert!(refused(secondary.apply(damaged, &data)));
        // A read would miss the buffered writes.
        let read = Message::Read {
            id: 12,
            offset: 0,
            len: 4096,
        };
        assert!(out_of_turn(secondary.apply(read, &[])));
        assert_eq!(secondary.lock_epochs().status().buffered_records, 1);
        // Commands for epochs that are not sealed.
        assert!(secondary.commit(1).is_err());
        assert!(secondary.wait_sealed(1, Duration::from_millis(20)).is_err());
        assert!(secondary.promote_at(6, 1).is_err());
        let mut back = vec![0u8; 4096];
        secondary.image.read_at(&mut back, 0).expect("read");
        assert!(
            back.iter().all(|&byte| byte == 0),
            "applied before a commit"
        );
        // The right end seals it; the same end sent again (a new session) is answered
        // again and files nothing twice.
        assert_eq!(
            secondary.apply(end(13, 1), &[]),
            Some(Message::Sealed { id: 13, epoch: 1 })
        );
        assert!(
            out_of_turn(secondary.apply(start(20, 1), &[])),
            "a new `epoch on` must be above the epochs this copy holds"
        );
        assert_eq!(
            secondary.apply(resume(14, 1), &[]),
            Some(Message::Done { id: 14 })
        );
        assert_eq!(
            secondary.apply(write(15, 0, &data), &data),
            Some(Message::Done { id: 15 })
        );
        assert_eq!(
            secondary.apply(end(16, 1), &[]),
            Some(Message::Sealed { id: 16, epoch: 1 })
        );
        assert_eq!(secondary.lock_epochs().status().buffered_records, 2);
        assert_eq!(secondary.lock_epochs().receiving(), Receiving::Epoch(2));
        assert!(secondary.status().disk_failed.is_none());
        secondary.commit(1).expect("commit");
        secondary.image.read_at(&mut back, 0).expect("read");
        assert_eq!(back, data);
        // A write past the end is refused and, as at Level 2, leaves this copy failed (it
        // cannot hold what the primary wrote).
        assert!(refused(
            secondary.apply(write(17, u64::MAX - 10, &data), &data)
        ));
        assert!(secondary.status().disk_failed.is_some());
    }
}
