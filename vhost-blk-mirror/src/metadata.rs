//! Replication metadata kept beside each image: generation, disk state, and two persistent
//! bitmaps.
//!
//! - **out-of-sync** (one bit per `chunk_bytes`, default 64 KiB): regions the peer does not
//!   have. Set (durably, before the guest's write completes) while degraded; cleared as the
//!   resync copies them.
//! - **activity** (one bit per `extent_bytes`, default 4 MiB): regions with writes in flight.
//!   Set durably before the first write into an extent, cleared lazily once the extent has
//!   been idle. After a crash every active extent is resynced, so a write that reached only
//!   one side before the crash cannot leave the copies silently different.
//!
//! File layout: two 4 KiB header slots (magic, sequence number, postcard header, CRC32C),
//! then the out-of-sync bitmap, then the activity bitmap, each starting on a 4 KiB
//! boundary. A header update writes the older slot with the next sequence number and syncs
//! it; opening takes the valid slot with the higher number, so a write torn by a crash
//! leaves the previous header in force. The file is fully written when created, so setting
//! a bit never needs new space (a full file system cannot keep a failure from being
//! recorded).
//!
//! Every change is made in memory only after its durable write succeeded: what the
//! daemon believes is never better than what a restart would find.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

const MAGIC: &[u8; 8] = b"FTVMMETA";
/// 2: the header gained `base_generation`. 3: two header slots with sequence numbers.
/// 4: Level 3, `applied_epoch` and `journal_start` (a format 3 file is migrated on open).
const FORMAT_VERSION: u32 = 4;
/// The previous format, still opened (and rewritten as the current one).
const FORMAT_VERSION_3: u32 = 3;
const HEADER_BLOCK: u64 = 4096;
/// The header slots, then the bitmaps.
const HEADER_SLOTS: u64 = 2;
pub const DEFAULT_CHUNK_BYTES: u32 = 64 * 1024;
pub const DEFAULT_EXTENT_BYTES: u32 = 4 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum MetadataError {
    #[error("cannot open metadata file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "metadata file {0} is not an ftvm metadata file of format {FORMAT_VERSION} (bad magic, \
         checksum or version; a file of an older ftvm must be removed, which costs a full resync)"
    )]
    Corrupt(PathBuf),
    #[error(
        "metadata file {path} is of format {found}, which this ftvm does not know (it reads \
         formats {FORMAT_VERSION_3} and {FORMAT_VERSION}): it was written by a newer ftvm"
    )]
    UnknownFormat { path: PathBuf, found: u32 },
    #[error("metadata file {path} is for a disk of {found} bytes, the image has {expected}")]
    SizeMismatch {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("I/O error on metadata file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Whether this copy of the disk can be trusted as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataState {
    /// Complete and current as of `generation`.
    UpToDate,
    /// Being (re)built by a resync; never to be promoted.
    Inconsistent,
}

/// The durable header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub version: u32,
    pub generation: u64,
    pub data_state: DataState,
    pub size_bytes: u64,
    pub chunk_bytes: u32,
    pub extent_bytes: u32,
    /// Boot id of the host while a secondary runs on this copy; cleared on a clean stop.
    /// Found set with another boot id, it means the host went down under the secondary,
    /// and writes it had acknowledged but not yet flushed may be gone.
    pub open_boot_id: Option<u128>,
    /// The latest generation at which this copy and its peer's were known identical
    /// (outside the regions both bitmaps record). A peer that returns at this generation
    /// or later needs only a delta resync; an older one needs a full one.
    pub base_generation: u64,
    /// Level 3: the last epoch whose buffered writes were applied to this image (`None`:
    /// none yet). Recorded together with `journal_start`, after the image was synced.
    pub applied_epoch: Option<u64>,
    /// Level 3: where the epoch journal's oldest record still needed is (`None`: no
    /// journal in use).
    pub journal_start: Option<JournalStart>,
}

/// A record's place in the epoch journal: its offset in the file and its sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalStart {
    pub position: u64,
    pub sequence: u64,
}

/// The header of format 3, read to migrate it.
#[derive(Clone, Copy, Debug, Deserialize)]
struct HeaderV3 {
    version: u32,
    generation: u64,
    data_state: DataState,
    size_bytes: u64,
    chunk_bytes: u32,
    extent_bytes: u32,
    open_boot_id: Option<u128>,
    base_generation: u64,
}

impl HeaderV3 {
    fn migrate(self) -> Header {
        Header {
            version: FORMAT_VERSION,
            generation: self.generation,
            data_state: self.data_state,
            size_bytes: self.size_bytes,
            chunk_bytes: self.chunk_bytes,
            extent_bytes: self.extent_bytes,
            open_boot_id: self.open_boot_id,
            base_generation: self.base_generation,
            applied_epoch: None,
            journal_start: None,
        }
    }
}

/// What a header slot holds.
enum Slot {
    Valid(Header, u64),
    /// Intact, but of a format this code does not know.
    Unknown(u32, u64),
}

/// An in-memory bitmap mirrored to a region of the metadata file.
#[derive(Debug)]
struct Bitmap {
    file_offset: u64,
    unit_bytes: u64,
    words: Vec<u64>,
    bits: u64,
}

impl Bitmap {
    fn new(file_offset: u64, unit_bytes: u32, size_bytes: u64) -> Bitmap {
        let bits = size_bytes.div_ceil(u64::from(unit_bytes));
        Bitmap {
            file_offset,
            unit_bytes: u64::from(unit_bytes),
            words: vec![0; bits.div_ceil(64) as usize],
            bits,
        }
    }

    fn file_len(&self) -> u64 {
        (self.words.len() as u64 * 8).div_ceil(HEADER_BLOCK) * HEADER_BLOCK
    }

    /// Units covering `[offset, offset + len)`.
    fn units(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let first = offset / self.unit_bytes;
        let end = offset.saturating_add(len.max(1)).div_ceil(self.unit_bytes);
        first.min(self.bits)..end.min(self.bits)
    }

    /// The set units, in order (skipping clear words: cheap on a large, mostly clear map).
    fn set_units(&self) -> impl Iterator<Item = u64> + '_ {
        self.words
            .iter()
            .enumerate()
            .filter(|(_, word)| **word != 0)
            .flat_map(|(index, &word)| {
                (0..64u64)
                    .filter(move |bit| word & (1 << bit) != 0)
                    .map(move |bit| index as u64 * 64 + bit)
            })
    }

    fn get(&self, unit: u64) -> bool {
        self.words
            .get((unit / 64) as usize)
            .is_some_and(|word| word & (1 << (unit % 64)) != 0)
    }

    /// Sets or clears a unit; returns the index of the changed word, if any.
    fn put(&mut self, unit: u64, value: bool) -> Option<usize> {
        let index = (unit / 64) as usize;
        let word = self.words.get_mut(index)?;
        let mask = 1u64 << (unit % 64);
        let old = *word;
        if value {
            *word |= mask;
        } else {
            *word &= !mask;
        }
        (old != *word).then_some(index)
    }

    fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|word| u64::from(word.count_ones()))
            .sum()
    }

    fn write_words(&self, file: &File, first: usize, last: usize) -> io::Result<()> {
        let bytes: Vec<u8> = self.words[first..=last]
            .iter()
            .flat_map(|word| word.to_le_bytes())
            .collect();
        file.write_all_at(&bytes, self.file_offset + first as u64 * 8)
    }

    fn read_from(&mut self, file: &File) -> io::Result<()> {
        let mut bytes = vec![0u8; self.words.len() * 8];
        file.read_exact_at(&mut bytes, self.file_offset)?;
        for (word, raw) in self.words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut le = [0u8; 8];
            le.copy_from_slice(raw);
            *word = u64::from_le_bytes(le);
        }
        Ok(())
    }
}

#[derive(Debug)]
struct State {
    header: Header,
    /// Sequence number of the header slot written last.
    sequence: u64,
    out_of_sync: Bitmap,
    activity: Bitmap,
    /// Counts `mark_active` calls.
    activity_epoch: u64,
    /// For each active extent, its latest mark: a clear spares extents marked after its
    /// snapshot, and extents still in use (marked less than the clear's idle time ago).
    extent_marked: HashMap<u64, Mark>,
    /// Counts writes of the activity bitmap to the file.
    activity_writes: u64,
    /// Active extents whose bit is written but not yet synced, with the number of the
    /// write (`activity_writes`) that set it: a write into one of them waits for a sync
    /// that covers that write.
    activity_unsynced: HashMap<u64, u64>,
}

impl State {
    /// Whether active extent `unit` may be cleared by a clear that snapshotted `epoch`.
    fn clearable(&self, unit: u64, epoch: u64, idle_for: Duration) -> bool {
        self.activity.get(unit)
            && !self.activity_unsynced.contains_key(&unit)
            && self
                .extent_marked
                .get(&unit)
                .is_none_or(|mark| mark.epoch <= epoch && mark.at.elapsed() >= idle_for)
    }
}

/// When an active extent was last marked.
#[derive(Clone, Copy, Debug)]
struct Mark {
    epoch: u64,
    at: Instant,
}

/// The metadata of one disk. All methods are safe to call from several threads.
#[derive(Debug)]
pub struct Metadata {
    path: PathBuf,
    file: File,
    state: Mutex<State>,
    /// The last activity bitmap write (`State::activity_writes`) known durable. Held while
    /// the activity bitmap is synced, not the state's lock: writes into extents already
    /// durably active never wait for another extent's sync, and writes that wait for one
    /// share it (group commit).
    activity_synced: Mutex<u64>,
    /// The durable header, for readers: a header change holds the state's lock while it
    /// syncs (hundreds of ms on a busy disk), and `header()` (every `status`, every
    /// replicated request's generation check) must not wait for that.
    published: Mutex<Header>,
}

impl Metadata {
    /// Opens `path`, creating it for a disk of `size_bytes` in `initial_state` if missing.
    pub fn open_or_create(
        path: &Path,
        size_bytes: u64,
        initial_state: DataState,
    ) -> Result<Metadata, MetadataError> {
        let open_error = |source| MetadataError::Open {
            path: path.to_owned(),
            source,
        };
        let exists = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_error)?;
        let existing = exists && file.metadata().map_err(open_error)?.len() > 0;
        let mut migrated = false;
        let (header, sequence) = if existing {
            match read_header(&file) {
                Some(Slot::Valid(header, sequence)) => {
                    migrated = header.version != FORMAT_VERSION;
                    (
                        Header {
                            version: FORMAT_VERSION,
                            ..header
                        },
                        sequence,
                    )
                }
                Some(Slot::Unknown(found, _)) => {
                    return Err(MetadataError::UnknownFormat {
                        path: path.to_owned(),
                        found,
                    })
                }
                None => return Err(MetadataError::Corrupt(path.to_owned())),
            }
        } else {
            let header = Header {
                version: FORMAT_VERSION,
                generation: 0,
                data_state: initial_state,
                size_bytes,
                chunk_bytes: DEFAULT_CHUNK_BYTES,
                extent_bytes: DEFAULT_EXTENT_BYTES,
                open_boot_id: None,
                base_generation: 0,
                applied_epoch: None,
                journal_start: None,
            };
            (header, 0)
        };
        if header.size_bytes != size_bytes {
            return Err(MetadataError::SizeMismatch {
                path: path.to_owned(),
                found: header.size_bytes,
                expected: size_bytes,
            });
        }
        let bitmaps_offset = HEADER_SLOTS * HEADER_BLOCK;
        let out_of_sync = Bitmap::new(bitmaps_offset, header.chunk_bytes, size_bytes);
        let activity = Bitmap::new(
            bitmaps_offset + out_of_sync.file_len(),
            header.extent_bytes,
            size_bytes,
        );
        let mut state = State {
            header,
            sequence,
            out_of_sync,
            activity,
            activity_epoch: 0,
            extent_marked: HashMap::new(),
            activity_writes: 0,
            activity_unsynced: HashMap::new(),
        };
        let metadata_io = |source| MetadataError::Io {
            path: path.to_owned(),
            source,
        };
        if existing {
            state.out_of_sync.read_from(&file).map_err(metadata_io)?;
            state.activity.read_from(&file).map_err(metadata_io)?;
            if migrated {
                // The layout after the header is the same in both formats: only the
                // header is rewritten, into the older slot, so a crash keeps one of them.
                state.sequence += 1;
                write_header(&file, &state.header, state.sequence).map_err(metadata_io)?;
                file.sync_data().map_err(metadata_io)?;
            }
        } else {
            // Written out in full (not sparse), so that later bit updates need no space.
            let len = state.activity.file_offset + state.activity.file_len();
            write_zeroes(&file, len).map_err(metadata_io)?;
            write_header(&file, &state.header, 1).map_err(metadata_io)?;
            state.sequence = 1;
            file.sync_all().map_err(metadata_io)?;
            sync_directory(path).map_err(metadata_io)?;
        }
        Ok(Metadata {
            path: path.to_owned(),
            file,
            published: Mutex::new(state.header),
            state: Mutex::new(state),
            activity_synced: Mutex::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tests: holds the state's lock, as a change being synced does.
    #[cfg(test)]
    pub(crate) fn lock_for_test(&self) -> impl Drop + '_ {
        self.lock()
    }

    fn io_error(&self, source: io::Error) -> MetadataError {
        MetadataError::Io {
            path: self.path.clone(),
            source,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The durable header: the last one written and synced (a change under way shows
    /// once it is durable), without waiting for a change's sync.
    pub fn header(&self) -> Header {
        *self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes `change` of the header durably (into the older slot), and only then makes it
    /// the header in memory.
    fn change_header(&self, change: impl FnOnce(&mut Header)) -> Result<(), MetadataError> {
        let mut state = self.lock();
        let mut header = state.header;
        change(&mut header);
        if header == state.header {
            return Ok(());
        }
        let sequence = state.sequence + 1;
        write_header(&self.file, &header, sequence).map_err(|e| self.io_error(e))?;
        self.file.sync_data().map_err(|e| self.io_error(e))?;
        state.header = header;
        state.sequence = sequence;
        *self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = header;
        Ok(())
    }

    /// Durably replaces generation and data state.
    pub fn set_header(&self, generation: u64, data_state: DataState) -> Result<(), MetadataError> {
        self.change_header(|header| {
            header.generation = generation;
            header.data_state = data_state;
        })
    }

    /// Durably records, in one header write, the last epoch applied to the image and where
    /// the journal's oldest record still needed is.
    pub fn set_applied_epoch(
        &self,
        applied_epoch: Option<u64>,
        journal_start: Option<JournalStart>,
    ) -> Result<(), MetadataError> {
        self.change_header(|header| {
            header.applied_epoch = applied_epoch;
            header.journal_start = journal_start;
        })
    }

    /// Durably records the generation at which both copies were last identical.
    pub fn set_base_generation(&self, base_generation: u64) -> Result<(), MetadataError> {
        self.change_header(|header| header.base_generation = base_generation)
    }

    /// Regions where this copy may differ from what its peer last agreed with: its
    /// out-of-sync chunks and its active extents, as sorted, merged `(offset, len)` ranges.
    pub fn suspect_ranges(&self) -> Vec<(u64, u64)> {
        let state = self.lock();
        let size = state.header.size_bytes;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for bitmap in [&state.out_of_sync, &state.activity] {
            let unit = bitmap.unit_bytes;
            for bit in (0..bitmap.bits).filter(|&bit| bitmap.get(bit)) {
                let offset = bit * unit;
                ranges.push((offset, unit.min(size.saturating_sub(offset))));
            }
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (offset, len) in ranges {
            match merged.last_mut() {
                Some((start, length)) if offset <= *start + *length => {
                    *length = (*length).max(offset + len - *start);
                }
                _ => merged.push((offset, len)),
            }
        }
        merged
    }

    /// Forgets both bitmaps (this copy was just made identical to its primary's).
    pub fn clear_suspect(&self) -> Result<(), MetadataError> {
        let size = self.lock().header.size_bytes;
        self.update(|state| &mut state.out_of_sync, 0, size, false, true)?;
        self.clear_activity()
    }

    /// Durably records that this copy is in use on the host with `boot_id`; returns the
    /// boot id recorded before (set when the last user did not stop cleanly).
    pub fn mark_open(&self, boot_id: Option<u128>) -> Result<Option<u128>, MetadataError> {
        let previous = self.lock().header.open_boot_id;
        self.change_header(|header| header.open_boot_id = boot_id)?;
        Ok(previous)
    }

    pub fn chunk_bytes(&self) -> u64 {
        u64::from(self.lock().header.chunk_bytes)
    }

    /// Durably marks a byte range out of sync. Returns once the bits are on disk.
    pub fn mark_out_of_sync(&self, offset: u64, len: u64) -> Result<(), MetadataError> {
        self.update(|state| &mut state.out_of_sync, offset, len, true, true)
    }

    /// Marks the whole disk out of sync (first protection of a new peer).
    pub fn mark_all_out_of_sync(&self) -> Result<(), MetadataError> {
        let size = self.lock().header.size_bytes;
        self.mark_out_of_sync(0, size)
    }

    /// Clears one chunk after the peer has it. Not synced: losing a clear costs a re-copy.
    pub fn clear_out_of_sync_chunk(&self, chunk: u64) -> Result<(), MetadataError> {
        self.clear_out_of_sync_chunks(chunk, 1)
    }

    /// Clears `count` out-of-sync chunks from `first` on (one resync block).
    pub fn clear_out_of_sync_chunks(&self, first: u64, count: u64) -> Result<(), MetadataError> {
        let unit_bytes = self.chunk_bytes();
        self.update(
            |state| &mut state.out_of_sync,
            first * unit_bytes,
            count * unit_bytes,
            false,
            false,
        )
    }

    /// Durably marks the extents of a range active before a write into them. Extents
    /// already durably active cost no I/O; new ones cost one bitmap write and one sync,
    /// which other writes waiting for a sync share. The state's lock is not held over the
    /// sync.
    pub fn mark_active(&self, offset: u64, len: u64) -> Result<(), MetadataError> {
        let wait_for = {
            let mut state = self.lock();
            let state = &mut *state;
            state.activity_epoch += 1;
            let mark = Mark {
                epoch: state.activity_epoch,
                at: Instant::now(),
            };
            let units = state.activity.units(offset, len);
            for unit in units.clone() {
                state.extent_marked.insert(unit, mark);
            }
            if !units.clone().all(|unit| state.activity.get(unit)) {
                let first = (units.start / 64) as usize;
                let last = ((units.end - 1) / 64) as usize;
                let before: Vec<u64> = state.activity.words[first..=last].to_vec();
                let newly: Vec<u64> = units
                    .clone()
                    .filter(|&unit| state.activity.put(unit, true).is_some())
                    .collect();
                if let Err(error) = state.activity.write_words(&self.file, first, last) {
                    // Set bits are not believed until durable.
                    state.activity.words[first..=last].copy_from_slice(&before);
                    return Err(self.io_error(error));
                }
                state.activity_writes += 1;
                for unit in newly {
                    state.activity_unsynced.insert(unit, state.activity_writes);
                }
            }
            units
                .filter_map(|unit| state.activity_unsynced.get(&unit).copied())
                .max()
        };
        match wait_for {
            Some(write) => self.sync_activity(write),
            None => Ok(()),
        }
    }

    /// Returns once activity bitmap write number `write` is durable, syncing the file if
    /// no other caller did since.
    fn sync_activity(&self, write: u64) -> Result<(), MetadataError> {
        let mut synced = self
            .activity_synced
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *synced >= write {
            return Ok(());
        }
        let covered = self.lock().activity_writes;
        self.file
            .sync_data()
            .map_err(|error| self.io_error(error))?;
        *synced = covered;
        self.lock()
            .activity_unsynced
            .retain(|_, set_by| *set_by > covered);
        Ok(())
    }

    /// Clears every activity bit (called when no write is in flight and the peer has all).
    pub fn clear_activity(&self) -> Result<(), MetadataError> {
        let size = self.lock().header.size_bytes;
        self.update(|state| &mut state.activity, 0, size, false, true)?;
        let mut state = self.lock();
        let state = &mut *state;
        let activity = &state.activity;
        state.extent_marked.retain(|&unit, _| activity.get(unit));
        state
            .activity_unsynced
            .retain(|&unit, _| activity.get(unit));
        Ok(())
    }

    /// The current mark epoch, if `idle` holds: checked under the lock that marking
    /// takes, so a write counted by `idle` after this marks at a later epoch.
    pub fn activity_snapshot(&self, idle: impl Fn() -> bool) -> Option<u64> {
        let state = self.lock();
        idle().then_some(state.activity_epoch)
    }

    pub fn has_activity(&self) -> bool {
        self.active_extents() > 0
    }

    pub fn active_extents(&self) -> u64 {
        let state = self.lock();
        state.activity.set_units().count() as u64
    }

    /// Active extents a clear would take now: durably active, and not marked for at least
    /// `idle_for` (an extent still in use stays active: marking it again would cost a sync).
    pub fn clearable_extents(&self, idle_for: Duration) -> u64 {
        let state = self.lock();
        state
            .activity
            .set_units()
            .filter(|&unit| state.clearable(unit, u64::MAX, idle_for))
            .count() as u64
    }

    /// Clears, durably, every active extent last marked at or before `epoch` and at least
    /// `idle_for` ago. The caller took `epoch` with no write under way and then flushed
    /// the image on both copies, so every write to those extents is durable on both.
    /// The state's lock is not held over the sync: a write marking a cleared extent again
    /// meanwhile writes its bit after this clear and waits for a sync that covers it.
    pub fn clear_activity_marked_before(
        &self,
        epoch: u64,
        idle_for: Duration,
    ) -> Result<u64, MetadataError> {
        let (write, cleared) = {
            let mut state = self.lock();
            let state = &mut *state;
            let cleared: Vec<u64> = state
                .activity
                .set_units()
                .filter(|&unit| state.clearable(unit, epoch, idle_for))
                .collect();
            let (Some(&first_unit), Some(&last_unit)) = (cleared.first(), cleared.last()) else {
                return Ok(0);
            };
            let (first, last) = ((first_unit / 64) as usize, (last_unit / 64) as usize);
            for &unit in &cleared {
                state.activity.put(unit, false);
                state.extent_marked.remove(&unit);
            }
            if let Err(error) = state.activity.write_words(&self.file, first, last) {
                // Still set, as they may still be on disk: cleared only once durable.
                for &unit in &cleared {
                    state.activity.put(unit, true);
                }
                return Err(self.io_error(error));
            }
            state.activity_writes += 1;
            (state.activity_writes, cleared)
        };
        if let Err(error) = self.sync_activity(write) {
            // The clear may or may not be on disk: believe the bits set again (a write
            // marking one of them syncs again).
            let mut state = self.lock();
            let state = &mut *state;
            for &unit in &cleared {
                state.activity.put(unit, true);
            }
            let first = (cleared.first().copied().unwrap_or(0) / 64) as usize;
            let last = (cleared.last().copied().unwrap_or(0) / 64) as usize;
            if state.activity.write_words(&self.file, first, last).is_ok() {
                state.activity_writes += 1;
                for &unit in &cleared {
                    state
                        .activity_unsynced
                        .entry(unit)
                        .or_insert(state.activity_writes);
                }
            }
            return Err(error);
        }
        Ok(cleared.len() as u64)
    }

    /// Folds the activity bitmap into out-of-sync: after a crash, every extent that had
    /// writes in flight may differ between the copies.
    pub fn activity_to_out_of_sync(&self) -> Result<u64, MetadataError> {
        let (extent_bytes, active) = {
            let state = self.lock();
            let active: Vec<u64> = state.activity.set_units().collect();
            (state.activity.unit_bytes, active)
        };
        for extent in &active {
            self.mark_out_of_sync(extent * extent_bytes, extent_bytes)?;
        }
        Ok(active.len() as u64)
    }

    /// Out-of-sync chunks, in order.
    pub fn out_of_sync_chunks(&self) -> Vec<u64> {
        let state = self.lock();
        (0..state.out_of_sync.bits)
            .filter(|&unit| state.out_of_sync.get(unit))
            .collect()
    }

    pub fn out_of_sync_bytes(&self) -> u64 {
        let state = self.lock();
        state.out_of_sync.count() * state.out_of_sync.unit_bytes
    }

    pub fn is_out_of_sync(&self, offset: u64, len: u64) -> bool {
        let state = self.lock();
        let units = state.out_of_sync.units(offset, len);
        units.clone().any(|unit| state.out_of_sync.get(unit))
    }

    fn update(
        &self,
        bitmap: impl Fn(&mut State) -> &mut Bitmap,
        offset: u64,
        len: u64,
        value: bool,
        sync: bool,
    ) -> Result<(), MetadataError> {
        let mut state = self.lock();
        let map = bitmap(&mut state);
        let units = map.units(offset, len);
        if units.is_empty() {
            return Ok(());
        }
        // `units` ends at most at `bits`, which the words cover.
        let first = (units.start / 64) as usize;
        let last = ((units.end - 1) / 64) as usize;
        let before: Vec<u64> = map.words[first..=last].to_vec();
        let mut changed = false;
        for unit in units {
            changed |= map.put(unit, value).is_some();
        }
        if !changed {
            return Ok(());
        }
        let written = map.write_words(&self.file, first, last).and_then(|()| {
            if sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(error) = written {
            // Set bits are not believed until durable; cleared ones stay set.
            map.words[first..=last].copy_from_slice(&before);
            return Err(self.io_error(error));
        }
        Ok(())
    }
}

/// Bytes before the postcard header in a slot: magic, sequence number, body length.
const SLOT_PREFIX: usize = 8 + 8 + 2;

/// Writes `header` with `sequence` into slot `sequence % 2` (the older one).
fn write_header(file: &File, header: &Header, sequence: u64) -> io::Result<()> {
    let encoded = postcard::to_allocvec(header).map_err(io::Error::other)?;
    let block_len = HEADER_BLOCK as usize;
    if SLOT_PREFIX + encoded.len() + 4 > block_len {
        return Err(io::Error::other("metadata header does not fit its slot"));
    }
    let mut block = vec![0u8; block_len];
    block[..8].copy_from_slice(MAGIC);
    block[8..16].copy_from_slice(&sequence.to_le_bytes());
    block[16..SLOT_PREFIX].copy_from_slice(&(encoded.len() as u16).to_le_bytes());
    block[SLOT_PREFIX..SLOT_PREFIX + encoded.len()].copy_from_slice(&encoded);
    let crc = crc32c::crc32c(&block[..SLOT_PREFIX + encoded.len()]);
    block[block_len - 4..].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&block, (sequence % HEADER_SLOTS) * HEADER_BLOCK)
}

/// The intact header slot with the higher sequence number: its header and number, or, if
/// that slot is of an unknown format, that format.
fn read_header(file: &File) -> Option<Slot> {
    (0..HEADER_SLOTS)
        .filter_map(|slot| read_slot(file, slot))
        .max_by_key(|slot| match slot {
            Slot::Valid(_, sequence) | Slot::Unknown(_, sequence) => *sequence,
        })
}

fn read_slot(file: &File, slot: u64) -> Option<Slot> {
    let mut block = vec![0u8; HEADER_BLOCK as usize];
    file.read_exact_at(&mut block, slot * HEADER_BLOCK).ok()?;
    if block.get(..8)? != MAGIC {
        return None;
    }
    let sequence = u64::from_le_bytes(block.get(8..16)?.try_into().ok()?);
    let len = usize::from(u16::from_le_bytes(
        block.get(16..SLOT_PREFIX)?.try_into().ok()?,
    ));
    let body = block.get(..SLOT_PREFIX.checked_add(len)?)?;
    let stored = block.get(HEADER_BLOCK as usize - 4..)?;
    if crc32c::crc32c(body).to_le_bytes() != stored {
        return None;
    }
    let encoded = body.get(SLOT_PREFIX..)?;
    // Every format starts with its version.
    let (version, _) = postcard::take_from_bytes::<u32>(encoded).ok()?;
    let header = match version {
        FORMAT_VERSION => postcard::from_bytes::<Header>(encoded).ok()?,
        FORMAT_VERSION_3 => postcard::from_bytes::<HeaderV3>(encoded)
            .ok()
            .filter(|old| old.version == FORMAT_VERSION_3)?
            .migrate(),
        other => return Some(Slot::Unknown(other, sequence)),
    };
    (header.chunk_bytes > 0 && header.extent_bytes > 0).then_some(Slot::Valid(header, sequence))
}

/// Writes `len` zero bytes from the start of `file`.
fn write_zeroes(file: &File, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; 64 * 1024];
    let mut offset = 0;
    while offset < len {
        let chunk = (len - offset).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..chunk], offset)?;
        offset += chunk as u64;
    }
    Ok(())
}

/// Makes a newly created file's directory entry durable.
fn sync_directory(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_is_cleared_only_where_nothing_was_marked_since() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m");
        let meta = Metadata::open_or_create(&path, 64 << 20, DataState::UpToDate).expect("create");
        meta.mark_active(0, 4096).expect("active");
        // A write under way: no snapshot.
        assert_eq!(meta.activity_snapshot(|| false), None);
        let epoch = meta.activity_snapshot(|| true).expect("idle");
        // A write marked after the snapshot keeps its extent.
        meta.mark_active(8 << 20, 4096).expect("active");
        assert_eq!(
            meta.clear_activity_marked_before(epoch, Duration::ZERO)
                .expect("clear"),
            1
        );
        assert_eq!(meta.active_extents(), 1);
        assert_eq!(meta.suspect_ranges(), vec![(8 << 20, 4 << 20)]);
        let epoch = meta.activity_snapshot(|| true).expect("idle");
        assert_eq!(
            meta.clear_activity_marked_before(epoch, Duration::ZERO)
                .expect("clear"),
            1
        );
        assert!(!meta.has_activity());
        drop(meta);
        let meta = Metadata::open_or_create(&path, 64 << 20, DataState::UpToDate).expect("reopen");
        assert!(!meta.has_activity());
        assert!(meta.suspect_ranges().is_empty());
    }

    #[test]
    fn extents_in_use_stay_active_and_cost_no_sync_when_written_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m");
        let meta = Metadata::open_or_create(&path, 64 << 20, DataState::UpToDate).expect("create");
        meta.mark_active(0, 4096).expect("active");
        assert_eq!(meta.lock().activity_writes, 1);
        assert!(
            meta.lock().activity_unsynced.is_empty(),
            "returned before durable"
        );
        // Marked again: no bitmap write (and so no sync).
        meta.mark_active(4096, 4096).expect("active again");
        assert_eq!(meta.lock().activity_writes, 1);
        // Written within the idle time: not cleared.
        let epoch = meta.activity_snapshot(|| true).expect("idle");
        assert_eq!(meta.clearable_extents(Duration::from_secs(3600)), 0);
        assert_eq!(
            meta.clear_activity_marked_before(epoch, Duration::from_secs(3600))
                .expect("clear"),
            0
        );
        assert_eq!(meta.active_extents(), 1);
        // Idle long enough (here: no idle time asked): cleared, durably.
        assert_eq!(meta.clearable_extents(Duration::ZERO), 1);
        assert_eq!(
            meta.clear_activity_marked_before(epoch, Duration::ZERO)
                .expect("clear"),
            1
        );
        drop(meta);
        let meta = Metadata::open_or_create(&path, 64 << 20, DataState::UpToDate).expect("reopen");
        assert!(!meta.has_activity());
    }

    #[test]
    fn marks_racing_a_clear_are_durable_once_they_return() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m");
        let meta = std::sync::Arc::new(
            Metadata::open_or_create(&path, 64 << 20, DataState::UpToDate).expect("create"),
        );
        let extent = u64::from(DEFAULT_EXTENT_BYTES);
        for round in 0..50u64 {
            let epoch = meta.activity_snapshot(|| true).expect("idle");
            let marker = {
                let meta = std::sync::Arc::clone(&meta);
                std::thread::spawn(move || {
                    for unit in 0..16 {
                        meta.mark_active(((unit + round) % 16) * extent, 4096)
                            .expect("mark");
                    }
                })
            };
            meta.clear_activity_marked_before(epoch, Duration::ZERO)
                .expect("clear");
            marker.join().expect("marker");
            // Every extent marked after the snapshot is set on disk.
            let on_disk =
                Metadata::open_or_create(&path, 64 << 20, DataState::UpToDate).expect("reopen");
            assert_eq!(on_disk.active_extents(), 16, "round {round}");
        }
    }

    #[test]
    fn suspect_ranges_merge_chunks_and_extents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = Metadata::open_or_create(&dir.path().join("m"), 64 << 20, DataState::UpToDate)
            .expect("create");
        meta.mark_active(5 << 20, 4096).expect("active");
        meta.mark_out_of_sync(6 << 20, 4096).expect("mark");
        meta.mark_out_of_sync(20 << 20, 4096).expect("mark");
        let chunk = meta.chunk_bytes();
        assert_eq!(
            meta.suspect_ranges(),
            vec![(4 << 20, 4 << 20), (20 << 20, chunk)]
        );
        meta.clear_suspect().expect("clear");
        assert!(meta.suspect_ranges().is_empty());
    }

    #[test]
    fn bits_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m");
        let size = 64 << 20;
        {
            let meta = Metadata::open_or_create(&path, size, DataState::UpToDate).expect("create");
            meta.mark_out_of_sync(100_000, 200_000).expect("mark");
            meta.mark_active(10 << 20, 4096).expect("active");
            meta.set_header(7, DataState::Inconsistent).expect("header");
        }
        let meta = Metadata::open_or_create(&path, size, DataState::UpToDate).expect("reopen");
        assert_eq!(meta.header().generation, 7);
        assert_eq!(meta.header().data_state, DataState::Inconsistent);
        assert_eq!(meta.out_of_sync_chunks(), vec![1, 2, 3, 4]);
        assert_eq!(meta.activity_to_out_of_sync().expect("fold"), 1);
        assert_eq!(meta.out_of_sync_bytes(), (4 + 64) * 64 * 1024);
        meta.clear_out_of_sync_chunk(1).expect("clear");
        assert!(!meta.is_out_of_sync(65536, 1));
        assert!(meta.is_out_of_sync(2 * 65536, 1));
    }

    #[test]
    fn size_mismatch_and_garbage_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m");
        Metadata::open_or_create(&path, 1 << 20, DataState::UpToDate).expect("create");
        assert!(matches!(
            Metadata::open_or_create(&path, 2 << 20, DataState::UpToDate),
            Err(MetadataError::SizeMismatch { .. })
        ));
        std::fs::write(&path, b"garbage").expect("write");
        assert!(matches!(
            Metadata::open_or_create(&path, 1 << 20, DataState::UpToDate),
            Err(MetadataError::Corrupt(_))
        ));
    }

    #[test]
    fn a_torn_header_write_leaves_the_previous_header_in_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m");
        let meta = Metadata::open_or_create(&path, 1 << 20, DataState::UpToDate).expect("create");
        meta.set_header(4, DataState::UpToDate).expect("header");
        meta.set_header(5, DataState::Inconsistent).expect("header");
        let newest_slot = meta.lock().sequence % HEADER_SLOTS;
        drop(meta);
        // A crash in the middle of the next header write: its slot is half old, half new.
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.write_all_at(&[0xa5; 100], newest_slot * HEADER_BLOCK + 20)
            .expect("tear");
        let meta = Metadata::open_or_create(&path, 1 << 20, DataState::UpToDate).expect("reopen");
        assert_eq!(meta.header().generation, 4, "the older, intact slot wins");
        assert_eq!(meta.header().data_state, DataState::UpToDate);
        // And the next update goes to the torn slot, never over the intact one.
        meta.set_header(6, DataState::Inconsistent).expect("header");
        drop(meta);
        let meta = Metadata::open_or_create(&path, 1 << 20, DataState::UpToDate).expect("reopen");
        assert_eq!(meta.header().generation, 6);
        assert_eq!(meta.header().data_state, DataState::Inconsistent);
    }

    #[test]
    fn the_file_is_fully_allocated_when_created() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m");
        Metadata::open_or_create(&path, 64 << 30, DataState::UpToDate).expect("create");
        let info = std::fs::metadata(&path).expect("stat");
        assert!(
            info.blocks() * 512 >= info.len(),
            "sparse metadata: a full disk could keep a failure from being recorded"
        );
    }

    #[test]
    fn a_failed_bitmap_write_changes_nothing_in_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m");
        let meta = Metadata::open_or_create(&path, 1 << 20, DataState::UpToDate).expect("create");
        // The same metadata, reopened on a read-only descriptor: every write fails.
        let read_only = Metadata {
            path: path.clone(),
            file: File::open(&path).expect("open read-only"),
            state: Mutex::new(State {
                header: meta.header(),
                sequence: meta.lock().sequence,
                out_of_sync: Bitmap::new(2 * HEADER_BLOCK, DEFAULT_CHUNK_BYTES, 1 << 20),
                activity: Bitmap::new(3 * HEADER_BLOCK, DEFAULT_EXTENT_BYTES, 1 << 20),
                activity_epoch: 0,
                extent_marked: HashMap::new(),
                activity_writes: 0,
                activity_unsynced: HashMap::new(),
            }),
            activity_synced: Mutex::new(0),
            published: Mutex::new(meta.header()),
        };
        assert!(read_only.mark_out_of_sync(0, 4096).is_err());
        assert!(
            read_only.out_of_sync_chunks().is_empty(),
            "a bit believed set that is not on disk"
        );
        assert!(read_only.set_header(9, DataState::Inconsistent).is_err());
        assert_eq!(read_only.header().generation, 0);
        assert_eq!(read_only.header().data_state, DataState::UpToDate);
    }

    /// Writes a header of any shape into slot `sequence % 2`, as an older (or newer) ftvm
    /// would have.
    fn write_raw_header(path: &Path, encoded: &[u8], sequence: u64) {
        let file = OpenOptions::new().write(true).open(path).expect("open");
        let mut block = vec![0u8; HEADER_BLOCK as usize];
        block[..8].copy_from_slice(MAGIC);
        block[8..16].copy_from_slice(&sequence.to_le_bytes());
        block[16..SLOT_PREFIX].copy_from_slice(&(encoded.len() as u16).to_le_bytes());
        block[SLOT_PREFIX..SLOT_PREFIX + encoded.len()].copy_from_slice(encoded);
        let crc = crc32c::crc32c(&block[..SLOT_PREFIX + encoded.len()]);
        block[HEADER_BLOCK as usize - 4..].copy_from_slice(&crc.to_le_bytes());
        file.write_all_at(&block, (sequence % HEADER_SLOTS) * HEADER_BLOCK)
            .expect("write");
    }

    #[derive(Serialize)]
    struct OldHeader {
        version: u32,
        generation: u64,
        data_state: DataState,
        size_bytes: u64,
        chunk_bytes: u32,
        extent_bytes: u32,
        open_boot_id: Option<u128>,
        base_generation: u64,
    }

    #[test]
    fn a_format_3_file_is_migrated_and_an_unknown_format_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m");
        let meta = Metadata::open_or_create(&path, 1 << 20, DataState::UpToDate).expect("create");
        meta.mark_out_of_sync(0, 4096).expect("mark");
        drop(meta);
        let old = OldHeader {
            version: 3,
            generation: 6,
            data_state: DataState::UpToDate,
            size_bytes: 1 << 20,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            extent_bytes: DEFAULT_EXTENT_BYTES,
            open_boot_id: Some(5),
            base_generation: 4,
        };
        write_raw_header(&path, &postcard::to_allocvec(&old).expect("encode"), 10);
        let meta = Metadata::open_or_create(&path, 1 << 20, DataState::Inconsistent).expect("v3");
        let header = meta.header();
        assert_eq!(header.version, FORMAT_VERSION);
        assert_eq!(
            (
                header.generation,
                header.base_generation,
                header.open_boot_id
            ),
            (6, 4, Some(5))
        );
        assert_eq!((header.applied_epoch, header.journal_start), (None, None));
        assert_eq!(meta.out_of_sync_chunks(), vec![0], "the bitmaps are kept");
        meta.set_applied_epoch(
            Some(9),
            Some(JournalStart {
                position: 128,
                sequence: 3,
            }),
        )
        .expect("record");
        drop(meta);
        let meta = Metadata::open_or_create(&path, 1 << 20, DataState::Inconsistent).expect("v4");
        assert_eq!(meta.header().applied_epoch, Some(9));
        assert_eq!(meta.header().generation, 6);
        drop(meta);
        // A newer format than this code knows is never read as something else.
        let mut newer = postcard::to_allocvec(&old).expect("encode");
        newer[0] = 5;
        write_raw_header(&path, &newer, 100);
        assert!(matches!(
            Metadata::open_or_create(&path, 1 << 20, DataState::UpToDate),
            Err(MetadataError::UnknownFormat { found: 5, .. })
        ));
        // Nor is a format 3 body that claims to be format 4.
        let mut claimed = postcard::to_allocvec(&old).expect("encode");
        claimed[0] = 4;
        write_raw_header(&path, &claimed, 101);
        let opened = Metadata::open_or_create(&path, 1 << 20, DataState::UpToDate);
        assert!(
            !matches!(&opened, Ok(meta) if meta.header().generation == 6 && meta.header().applied_epoch.is_some()),
            "{opened:?}"
        );
    }

    #[test]
    fn whole_disk_marking_counts_partial_last_chunk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = Metadata::open_or_create(&dir.path().join("m"), 100_000, DataState::UpToDate)
            .expect("create");
        meta.mark_all_out_of_sync().expect("mark");
        assert_eq!(meta.out_of_sync_chunks(), vec![0, 1]);
    }
}
