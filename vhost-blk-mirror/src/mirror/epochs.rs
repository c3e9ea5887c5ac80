//! A Level 3 secondary's epochs (`docs/LEVEL3.md`, "Disk writes at Level 3"): the writes
//! that arrive between the primary's `EpochStart` and `EpochOff` are filed in the epoch
//! journal (and, up to a bound, in memory) instead of the image, acknowledged on receipt,
//! and applied to the image, in arrival order, only when their epoch commits (`commit N`)
//! or at a promotion (`promote GEN N*`, which discards every later epoch).
//!
//! The durable state is the journal plus two fields of the metadata header, written
//! together after the image was synced: `applied_epoch` and `journal_start` (the oldest
//! record still needed). A restart reads the journal from there: sealed epochs above
//! `applied_epoch` are kept for a commit or a promotion, and so is an unsealed tail.
//!
//! Epochs follow each other in arrival order and never interleave: the records of epoch N
//! all come before N's `EpochEnd` record, and those of N + 1 after it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use control_protocol::disk::SecondaryEpochs;
use log::{info, warn};
use thiserror::Error;

use super::journal::{Found, Journal, JournalError, Kind, Reader, Record};
use crate::image::Image;
use crate::metadata::{JournalStart, Metadata, MetadataError};

/// Where the journal is and how much it may hold (`--epoch-journal-bytes`,
/// `--epoch-memory-bytes`).
#[derive(Clone, Debug)]
pub struct EpochOptions {
    /// The journal file (default: the image's path with `.ftvm-journal` appended).
    pub journal_path: PathBuf,
    /// The journal's size, preallocated when Level 3 first starts.
    pub journal_bytes: u64,
    /// Data of unapplied epochs also kept in memory (beyond it, applying reads the
    /// journal back).
    pub memory_bytes: u64,
}

/// Default `--epoch-journal-bytes`.
pub const DEFAULT_JOURNAL_BYTES: u64 = 1 << 30;
/// Default `--epoch-memory-bytes`.
pub const DEFAULT_MEMORY_BYTES: u64 = 256 << 20;

impl Default for EpochOptions {
    fn default() -> EpochOptions {
        EpochOptions {
            journal_path: PathBuf::new(),
            journal_bytes: DEFAULT_JOURNAL_BYTES,
            memory_bytes: DEFAULT_MEMORY_BYTES,
        }
    }
}

#[derive(Debug, Error)]
pub enum EpochError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("image I/O error while applying epoch {epoch}")]
    Image {
        epoch: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("epoch {epoch} is not sealed (the last sealed is {sealed:?}): nothing applied")]
    NotSealed { epoch: u64, sealed: Option<u64> },
    #[error("no epoch journal is open")]
    NoJournal,
    #[error("a journal record at {offset} (+{len}) is outside the disk")]
    OutOfRange { offset: u64, len: u64 },
}

/// One buffered record.
#[derive(Debug, Clone)]
pub struct Entry {
    found: Found,
    /// The data, when kept in memory; else it is read back from the journal.
    data: Option<Arc<Vec<u8>>>,
}

/// An epoch not yet applied.
#[derive(Debug)]
struct Epoch {
    number: u64,
    sealed: bool,
    entries: Vec<Entry>,
}

/// What arrives now, while Level 3 is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receiving {
    /// Level 2: applied on arrival.
    Off,
    /// Filed under this epoch.
    Epoch(u64),
    /// Sent again after a restart, for an epoch this copy already sealed (or applied):
    /// already in the journal, acknowledged and not filed twice.
    Repeat(u64),
}

/// Epochs to apply: each epoch's number and its records, in arrival order.
pub type Batch = Vec<(u64, Vec<Entry>)>;

/// What a commit or a promotion applied: the caller acts on a `ResyncDone` among them.
#[derive(Debug, Default)]
pub struct Applied {
    pub last_epoch: Option<u64>,
    pub records: u64,
    pub resync_done: bool,
}

/// The secondary's epochs and their journal. Not thread-safe by itself: the secondary
/// keeps it under a mutex, and applies (which read the journal without that mutex) one at
/// a time.
#[derive(Debug)]
pub struct Epochs {
    options: EpochOptions,
    journal: Option<Journal>,
    receiving: Receiving,
    /// Unapplied epochs, oldest first.
    epochs: VecDeque<Epoch>,
    sealed: Option<u64>,
    applied: Option<u64>,
    memory_bytes: u64,
    /// A record met a full journal and waits for a commit.
    pub full: bool,
    pub full_waits: u64,
}

impl Epochs {
    /// The state found at start: the journal named in the metadata, read from its oldest
    /// record still needed.
    pub fn recover(options: EpochOptions, metadata: &Metadata) -> Result<Epochs, EpochError> {
        let header = metadata.header();
        let mut epochs = Epochs {
            options,
            journal: None,
            receiving: Receiving::Off,
            epochs: VecDeque::new(),
            sealed: header.applied_epoch,
            applied: header.applied_epoch,
            memory_bytes: 0,
            full: false,
            full_waits: 0,
        };
        let Some(start) = header.journal_start else {
            return Ok(epochs);
        };
        let (journal, found) =
            Journal::open(&epochs.options.journal_path, start.position, start.sequence)?;
        epochs.journal = Some(journal);
        let mut skipped = 0;
        for record in found {
            let number = record.record.epoch;
            if epochs.applied.is_some_and(|applied| number <= applied) {
                // Applied and synced: only its space is still to be released.
                skipped += 1;
                continue;
            }
            epochs.file_found(record, None);
        }
        if let Some(last) = epochs.epochs.back() {
            if !last.sealed {
                epochs.receiving = Receiving::Epoch(last.number);
            }
        }
        info!(
            "epoch journal: {} unapplied epoch(s) found (sealed up to {:?}, applied up to \
             {:?}){}",
            epochs.epochs.len(),
            epochs.sealed,
            epochs.applied,
            if skipped > 0 {
                format!(", {skipped} record(s) of applied epochs skipped")
            } else {
                String::new()
            }
        );
        Ok(epochs)
    }

    pub fn receiving(&self) -> Receiving {
        self.receiving
    }

    /// Whether anything waits to be applied.
    pub fn buffered(&self) -> bool {
        !self.epochs.is_empty()
    }

    pub fn sealed(&self) -> Option<u64> {
        self.sealed
    }

    pub fn applied(&self) -> Option<u64> {
        self.applied
    }

    /// A new session of the primary starts at Level 2: it says `EpochStart` again if its
    /// epochs are on. What is buffered stays (sealed epochs wait for a commit).
    pub fn session_started(&mut self) {
        self.receiving = Receiving::Off;
    }

    /// `EpochStart { epoch }`: writes from now on are filed under `epoch`. The journal is
    /// created (preallocated) the first time. A new start (`resumed` false) must come at
    /// Level 2 and be above every epoch this copy sealed or applied. Resumed, an epoch this
    /// copy already sealed or applied is a repeat (a session that starts over sends again what it had not heard answered):
    /// its writes are acknowledged, not filed twice. `Ok(false)`: out of turn (another epoch
    /// is receiving and not sealed), nothing changed.
    pub fn start(
        &mut self,
        epoch: u64,
        resumed: bool,
        metadata: &Metadata,
    ) -> Result<bool, EpochError> {
        if !resumed {
            // The engine's `epoch on`: only after `EpochOff` (nothing buffered), and above
            // every epoch before, so that no commit or promotion mistakes it for an old one.
            let grows = self.done().is_none_or(|done| epoch > done);
            if self.receiving != Receiving::Off || self.buffered() || !grows {
                return Ok(false);
            }
            self.open_journal(metadata)?;
            self.receiving = Receiving::Epoch(epoch);
            return Ok(true);
        }
        if self.done().is_some_and(|done| epoch <= done) {
            self.receiving = Receiving::Repeat(epoch);
            return Ok(true);
        }
        if let Some(tail) = self.unsealed_tail() {
            if epoch != tail {
                return Ok(false);
            }
        }
        if let Receiving::Epoch(current) = self.receiving {
            if epoch != current {
                return Ok(false);
            }
        }
        self.open_journal(metadata)?;
        self.receiving = Receiving::Epoch(epoch);
        Ok(true)
    }

    /// The last epoch sealed or applied.
    pub fn done(&self) -> Option<u64> {
        self.sealed.max(self.applied)
    }

    /// The epoch whose records are filed but whose end has not arrived.
    fn unsealed_tail(&self) -> Option<u64> {
        self.epochs
            .back()
            .filter(|epoch| !epoch.sealed)
            .map(|epoch| epoch.number)
    }

    fn open_journal(&mut self, metadata: &Metadata) -> Result<(), EpochError> {
        if self.journal.is_some() {
            return Ok(());
        }
        info!(
            "Level 3: creating the epoch journal {} ({} bytes)",
            self.options.journal_path.display(),
            self.options.journal_bytes
        );
        let journal = Journal::create(&self.options.journal_path, self.options.journal_bytes, 1)?;
        let (position, sequence) = journal.next_position();
        metadata.set_applied_epoch(self.applied, Some(JournalStart { position, sequence }))?;
        self.journal = Some(journal);
        Ok(())
    }

    /// Files a write (`data`), a zeroing or a resync's end under the receiving epoch (to the
    /// page cache). `Ok(false)`: the journal is full, nothing was filed; try again after a
    /// commit. A repeat of a sealed epoch is not filed again.
    pub fn file(&mut self, record: Record, data: &[u8]) -> Result<bool, EpochError> {
        let epoch = match self.receiving {
            Receiving::Epoch(epoch) => epoch,
            Receiving::Repeat(_) | Receiving::Off => return Ok(true),
        };
        let journal = self.journal.as_mut().ok_or(EpochError::NoJournal)?;
        let record = Record { epoch, ..record };
        let found = match journal.append_record(record, data) {
            Ok(found) => found,
            Err(JournalError::Full { .. }) => return Ok(false),
            Err(error) => return Err(error.into()),
        };
        let in_memory =
            !data.is_empty() && self.memory_bytes + data.len() as u64 <= self.options.memory_bytes;
        let data = in_memory.then(|| {
            self.memory_bytes += data.len() as u64;
            Arc::new(data.to_vec())
        });
        self.file_found(found, data);
        Ok(true)
    }

    fn file_found(&mut self, found: Found, data: Option<Arc<Vec<u8>>>) {
        let number = found.record.epoch;
        let end = found.record.kind == Kind::EpochEnd;
        if self.epochs.back().is_none_or(|last| last.number != number) {
            self.epochs.push_back(Epoch {
                number,
                sealed: false,
                entries: Vec::new(),
            });
        }
        if let Some(last) = self.epochs.back_mut() {
            last.entries.push(Entry { found, data });
            if end {
                last.sealed = true;
                self.sealed = self.sealed.max(Some(number));
            }
        }
    }

    /// `Flush`: everything filed is durable.
    pub fn sync(&self) -> Result<(), EpochError> {
        if let Some(journal) = &self.journal {
            journal.sync()?;
        }
        Ok(())
    }

    /// `EpochEnd { epoch }`: appends the end record and syncs the journal; `epoch + 1`
    /// receives from now on. `Ok(None)`: out of turn, nothing changed. `Ok(Some(false))`:
    /// the journal is full.
    pub fn end(&mut self, epoch: u64, generation: u64) -> Result<Option<bool>, EpochError> {
        match self.receiving {
            Receiving::Repeat(repeated) if repeated == epoch => {
                let next = epoch.saturating_add(1);
                self.receiving = if self.done().is_some_and(|done| next <= done) {
                    Receiving::Repeat(next)
                } else {
                    Receiving::Epoch(next)
                };
                return Ok(Some(true));
            }
            Receiving::Epoch(current) if current == epoch => {}
            Receiving::Epoch(_) | Receiving::Repeat(_) | Receiving::Off => return Ok(None),
        }
        let record = Record {
            sequence: 0,
            generation,
            epoch,
            kind: Kind::EpochEnd,
            offset: 0,
            len: 0,
        };
        if !self.file(record, &[])? {
            return Ok(Some(false));
        }
        self.sync()?;
        // `file` made the (possibly empty) epoch's entry and sealed it.
        self.receiving = Receiving::Epoch(epoch.saturating_add(1));
        Ok(Some(true))
    }

    /// The records of the sealed epochs up to `through`, to apply in order, and the epoch
    /// they end with. Refused when `through` is above the last sealed epoch.
    pub fn sealed_through(&self, through: u64) -> Result<Batch, EpochError> {
        if self.applied.is_some_and(|applied| through <= applied) {
            return Ok(Vec::new());
        }
        if self.sealed.is_none_or(|sealed| sealed < through) {
            return Err(EpochError::NotSealed {
                epoch: through,
                sealed: self.sealed,
            });
        }
        Ok(self
            .epochs
            .iter()
            .take_while(|epoch| epoch.number <= through && epoch.sealed)
            .map(|epoch| (epoch.number, epoch.entries.clone()))
            .collect())
    }

    /// The disk ranges (offset, length) of the writes and zeroes buffered in epochs after
    /// `epoch`, sealed or not: what a promotion at `epoch` drops, and what the old
    /// primary's image holds but this copy will not.
    pub fn ranges_after(&self, epoch: u64) -> Vec<(u64, u64)> {
        self.epochs
            .iter()
            .filter(|buffered| buffered.number > epoch)
            .flat_map(|buffered| &buffered.entries)
            .filter(|entry| matches!(entry.found.record.kind, Kind::Write | Kind::Zero { .. }))
            .map(|entry| (entry.found.record.offset, entry.found.record.len))
            .collect()
    }

    /// Every buffered record, sealed or not (for `EpochOff`).
    pub fn everything(&self) -> Batch {
        self.epochs
            .iter()
            .map(|epoch| (epoch.number, epoch.entries.clone()))
            .collect()
    }

    /// A reader of the journal, for applying without the lock.
    pub fn reader(&self) -> Result<Option<Reader>, EpochError> {
        Ok(self.journal.as_ref().map(Journal::reader).transpose()?)
    }

    /// After the image holds the epochs up to `epoch` (and was synced): records that, with
    /// where the journal starts now, and frees their space. `discard_rest` (a promotion, or
    /// `EpochOff`) drops every later epoch and the unsealed tail too.
    pub fn applied_through(
        &mut self,
        epoch: Option<u64>,
        discard_rest: bool,
        metadata: &Metadata,
    ) -> Result<(), EpochError> {
        let mut last_sequence = None;
        while let Some(front) = self.epochs.front() {
            let keep = !discard_rest && epoch.is_none_or(|epoch| front.number > epoch);
            if keep {
                break;
            }
            if let Some(front) = self.epochs.pop_front() {
                for entry in &front.entries {
                    last_sequence = Some(entry.found.record.sequence);
                    if let Some(data) = &entry.data {
                        self.memory_bytes = self.memory_bytes.saturating_sub(data.len() as u64);
                    }
                }
            }
        }
        let applied = self.applied.max(epoch);
        if discard_rest {
            self.receiving = Receiving::Off;
            self.sealed = applied;
        }
        let start = self.journal.as_ref().map(|journal| {
            let (position, sequence) = self
                .epochs
                .front()
                .and_then(|epoch| epoch.entries.first())
                .map(|entry| (entry.found.position, entry.found.record.sequence))
                .unwrap_or_else(|| journal.next_position());
            JournalStart { position, sequence }
        });
        metadata.set_applied_epoch(applied, start)?;
        self.applied = applied;
        if let (Some(journal), Some(sequence)) = (self.journal.as_mut(), last_sequence) {
            journal.release_through(sequence);
        }
        if discard_rest {
            if let Some(journal) = self.journal.as_mut() {
                journal.release_through(u64::MAX);
            }
        }
        self.full = false;
        Ok(())
    }

    /// The secondary's Level 3 part of `status`.
    pub fn status(&self) -> SecondaryEpochs {
        let (buffered_records, buffered_bytes) = self
            .epochs
            .iter()
            .flat_map(|epoch| epoch.entries.iter())
            .fold((0, 0), |(records, bytes), entry| {
                let data = match entry.found.record.kind {
                    Kind::Write => entry.found.record.len,
                    Kind::Zero { .. } | Kind::ResyncDone | Kind::EpochEnd => 0,
                };
                (records + 1, bytes + data)
            });
        let (receiving_epoch, enabled) = match self.receiving {
            Receiving::Off => (None, false),
            Receiving::Epoch(epoch) | Receiving::Repeat(epoch) => (Some(epoch), true),
        };
        SecondaryEpochs {
            enabled,
            receiving_epoch,
            sealed_epoch: self.sealed,
            applied_epoch: self.applied,
            buffered_records,
            buffered_bytes,
            memory_bytes: self.memory_bytes,
            journal_used_bytes: self.journal.as_ref().map_or(0, Journal::used_bytes),
            journal_size_bytes: self.journal.as_ref().map_or(0, Journal::size_bytes),
            journal_full: self.full,
            journal_full_waits: self.full_waits,
        }
    }
}

/// Applies `epochs` (from [`Epochs::sealed_through`] or [`Epochs::everything`]) to the
/// image in order, then syncs it. Idempotent: applying the same records again (after a
/// crash before their epoch was recorded as applied) leaves the same image.
pub fn apply(
    image: &Image,
    reader: Option<&Reader>,
    epochs: &[(u64, Vec<Entry>)],
) -> Result<Applied, EpochError> {
    let mut applied = Applied::default();
    for (number, entries) in epochs {
        for entry in entries {
            apply_entry(image, reader, entry).map_err(|error| match error {
                EpochError::Image { source, .. } => EpochError::Image {
                    epoch: *number,
                    source,
                },
                other => other,
            })?;
            applied.records += 1;
            if entry.found.record.kind == Kind::ResyncDone {
                applied.resync_done = true;
            }
        }
        applied.last_epoch = Some(*number);
    }
    if applied.records > 0 {
        image.flush().map_err(|source| EpochError::Image {
            epoch: applied.last_epoch.unwrap_or_default(),
            source,
        })?;
    }
    Ok(applied)
}

fn apply_entry(image: &Image, reader: Option<&Reader>, entry: &Entry) -> Result<(), EpochError> {
    let record = &entry.found.record;
    let image_error = |source| EpochError::Image {
        epoch: record.epoch,
        source,
    };
    let in_range = record
        .offset
        .checked_add(record.len)
        .is_some_and(|end| end <= image.size_bytes());
    match record.kind {
        Kind::ResyncDone | Kind::EpochEnd => Ok(()),
        Kind::Write | Kind::Zero { .. } if !in_range => Err(EpochError::OutOfRange {
            offset: record.offset,
            len: record.len,
        }),
        Kind::Write => {
            let data = match (&entry.data, reader) {
                (Some(data), _) => data.clone(),
                (None, Some(reader)) => Arc::new(reader.read_data(&entry.found)?),
                (None, None) => {
                    warn!("record {} has no data to apply", record.sequence);
                    return Err(EpochError::NoJournal);
                }
            };
            image.write_at(&data, record.offset).map_err(image_error)
        }
        Kind::Zero { deallocate: true } => image
            .discard(record.offset, record.len)
            .map_err(image_error),
        Kind::Zero { deallocate: false } => image
            .write_zeroes(record.offset, record.len, false)
            .map_err(image_error),
    }
}
