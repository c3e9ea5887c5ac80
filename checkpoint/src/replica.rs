//! The secondary's replica of a VM: the replica RAM file, the epoch being received, and the
//! committed-state record.
//!
//! - **RAM file** (`ram_path`): the same size as the VM's RAM, mapped shared read-write
//!   ([`crate::mapped_file`]). After a restore QEMU runs on it (`memory-backend-file`).
//! - **Staging** ([`StagedEpoch`]): an epoch's pages are decoded as they arrive (against the
//!   replica's current page, or the zero page in a full copy, as [`crate::delta`] says) and
//!   kept in memory, with the device state, until `EpochEnd`. The device state is decoded
//!   once its last byte arrived ([`crate::state_delta`]); a delta is decoded against the
//!   record's device state and is refused unless it names the record's committed epoch as
//!   its base. An epoch that is incomplete, out of order, of an older generation, from
//!   another stream without a full copy, with a delta against another state, or whose
//!   checksum differs is dropped without touching either file. A full copy stages the whole
//!   RAM (zero pages take no memory); an incremental epoch only its dirty pages.
//! - **Record** (`record_path`): the committed state: VM, RAM size, generation, stream,
//!   epoch, whether the full copy completed, the device state of that epoch, and whether it
//!   is `Committed` or `Applying`. Written whole to a temporary file, fsynced, renamed over
//!   the record, then the directory fsynced; the file carries a CRC32C, so a torn or foreign
//!   file is refused at open.
//!
//! **Crash safety: the "applying" mark.** Applying epoch N first makes the record durably
//! say `Applying N` (no device state, not restorable), then copies the staged pages into
//! the RAM file, syncs it (`fdatasync`), and only then writes `Committed N` with N's device
//! state; the `Ack` follows. A crash anywhere in between leaves a record that says
//! `Applying`: the RAM file may be partly N, and the record claims nothing restorable. The
//! replica then reports itself without a complete copy and takes only a full copy, so a
//! crash of the secondary during an apply costs a full copy but never yields a replica whose
//! RAM is newer (or mixed) while its record names an older restorable epoch. (A durable
//! journal of the staged epoch would let it redo the apply instead; not built.)
//!
//! The record and the RAM file must live on filesystems with the same lifetime (both on
//! tmpfs, or both on disk). A RAM file found missing at open while the record claims a
//! complete copy (a tmpfs RAM file after a reboot) makes the record durably not restorable
//! before anything else happens.
//!
//! A replica is [`Replica::restorable`] only when its record is `Committed`, its first full
//! copy completed, and it holds a device state (a full copy read while the guest runs has
//! none; the first incremental epoch after it, taken while stopped, does).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::delta::{decode, Page, PAGE_BYTES, ZERO_PAGE};
use crate::mapped_file::{try_lock_exclusive, MappedFile};
use crate::state_delta::{self, StateEncoding};
use crate::wire::{
    bounded_text, BatchEntries, Refusal, MAX_DEVICE_STATE_BYTES, MAX_RAM_BYTES, MAX_VM_NAME_BYTES,
};

const RECORD_MAGIC: &[u8; 8] = b"FTVMCKP1";
/// Largest record file: the device state and a few hundred bytes of fields.
const MAX_RECORD_BYTES: u64 = MAX_DEVICE_STATE_BYTES + 64 * 1024;

/// Errors of opening a replica or writing its files.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error(
        "RAM size {ram_bytes} is not a non-zero multiple of {PAGE_BYTES} up to {MAX_RAM_BYTES}"
    )]
    RamSize { ram_bytes: u64 },
    #[error("VM name must be 1 to {MAX_VM_NAME_BYTES} bytes")]
    VmName,
    #[error("cannot open the replica RAM file {path}")]
    RamFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the replica RAM file {path} is {actual} bytes, its record says {expected}")]
    RamFileSize {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("cannot read the record {path}")]
    ReadRecord {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the record {path} is damaged: {what}")]
    BadRecord { path: PathBuf, what: &'static str },
    #[error("the record {path} belongs to VM {vm:?} with {ram_bytes} bytes of RAM")]
    ForeignRecord {
        path: PathBuf,
        vm: String,
        ram_bytes: u64,
    },
    #[error("cannot write the record {path}")]
    WriteRecord {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot sync the replica RAM file")]
    SyncRam(#[source] io::Error),
    #[error("the replica RAM file {path} is in use by another process")]
    InUse { path: PathBuf },
}

/// Where a replica lives and what it replicates.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub vm: String,
    pub ram_bytes: u64,
    pub ram_path: PathBuf,
    pub record_path: PathBuf,
}

/// Whether the record describes a finished apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordState {
    /// The RAM file holds exactly epoch `epoch`.
    Committed,
    /// Epoch `epoch` was being applied: the RAM file may be mixed; not restorable.
    Applying,
}

/// The committed-state record, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    vm: String,
    ram_bytes: u64,
    generation: u64,
    stream: u64,
    epoch: u64,
    state: RecordState,
    full_copy_complete: bool,
    device_state: Vec<u8>,
}

/// The replica's committed state, as the secondary reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommittedState {
    pub generation: u64,
    pub stream: u64,
    pub epoch: u64,
    /// A full copy completed and nothing was left half-applied since.
    pub full_copy_complete: bool,
}

/// What an `EpochStart` announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpochHeader {
    pub epoch: u64,
    pub generation: u64,
    pub stream: u64,
    pub full: bool,
    pub pages: u64,
    pub state_len: u64,
    pub state_encoding: StateEncoding,
    pub state_wire_len: u64,
}

/// The secondary's replica: RAM file, record, RAM geometry.
#[derive(Debug)]
pub struct Replica {
    config: ReplicaConfig,
    ram: MappedFile,
    ram_pages: u64,
    record: Record,
}

impl Replica {
    /// Opens (or creates) the replica files. A record of another VM or RAM size is an error;
    /// so is a restorable record whose RAM file has the wrong size.
    pub fn open(config: ReplicaConfig) -> Result<Replica, ReplicaError> {
        let ram_bytes = config.ram_bytes;
        if ram_bytes == 0
            || !ram_bytes.is_multiple_of(PAGE_BYTES as u64)
            || ram_bytes > MAX_RAM_BYTES
        {
            return Err(ReplicaError::RamSize { ram_bytes });
        }
        if config.vm.is_empty() || config.vm.len() > MAX_VM_NAME_BYTES {
            return Err(ReplicaError::VmName);
        }
        let (file, created) = open_ram_file(&config.ram_path)?;
        let mut record = match read_record(&config.record_path)? {
            Some(record) if record.vm != config.vm || record.ram_bytes != ram_bytes => {
                return Err(ReplicaError::ForeignRecord {
                    path: config.record_path.clone(),
                    vm: record.vm,
                    ram_bytes: record.ram_bytes,
                })
            }
            Some(record) => record,
            None => Record {
                vm: config.vm.clone(),
                ram_bytes,
                generation: 0,
                stream: 0,
                epoch: 0,
                state: RecordState::Committed,
                full_copy_complete: false,
                device_state: Vec::new(),
            },
        };
        let ram_error = |source| ReplicaError::RamFile {
            path: config.ram_path.clone(),
            source,
        };
        if created && record.full_copy_complete {
            // The RAM file is gone (a tmpfs after a reboot, an operator's rm) but the record
            // survived: whatever it says about the RAM is no longer true.
            log::warn!(
                "replica RAM file {} was missing: the record's epoch {} is not restorable",
                config.ram_path.display(),
                record.epoch
            );
            record.full_copy_complete = false;
            record.device_state.clear();
            write_record(&config.record_path, &record)?;
        }
        let actual = file.metadata().map_err(ram_error)?.len();
        if actual != ram_bytes {
            if record.full_copy_complete {
                return Err(ReplicaError::RamFileSize {
                    path: config.ram_path.clone(),
                    actual,
                    expected: ram_bytes,
                });
            }
            file.set_len(ram_bytes).map_err(ram_error)?;
        }
        let length = usize::try_from(ram_bytes).map_err(|_| ReplicaError::RamSize { ram_bytes })?;
        let ram = MappedFile::map(file, length).map_err(ram_error)?;
        Ok(Replica {
            ram_pages: ram_bytes / PAGE_BYTES as u64,
            config,
            ram,
            record,
        })
    }

    pub fn vm(&self) -> &str {
        &self.config.vm
    }

    pub fn ram_bytes(&self) -> u64 {
        self.config.ram_bytes
    }

    pub fn ram_pages(&self) -> u64 {
        self.ram_pages
    }

    pub fn ram_path(&self) -> &Path {
        &self.config.ram_path
    }

    /// The committed state (an interrupted apply shows as no complete copy).
    pub fn committed(&self) -> CommittedState {
        let record = &self.record;
        CommittedState {
            generation: record.generation,
            stream: record.stream,
            epoch: record.epoch,
            full_copy_complete: record.full_copy_complete && record.state == RecordState::Committed,
        }
    }

    /// Whether a restore may use this replica: a completed full copy, a committed epoch, and
    /// that epoch's device state.
    pub fn restorable(&self) -> bool {
        self.committed().full_copy_complete && !self.record.device_state.is_empty()
    }

    /// The committed epoch's device state, only when [`Replica::restorable`].
    pub fn device_state(&self) -> Option<&[u8]> {
        self.restorable()
            .then_some(self.record.device_state.as_slice())
    }

    /// Hands the replica to a restore: returns the committed device state and first makes
    /// the record durably not restorable, since the restored QEMU runs on the RAM file
    /// (it is the running VM's memory from then on, no checkpoint). Without this a later
    /// replica of this host would open a record calling that memory a checkpoint, and a
    /// failover before its first full copy completed would restore it. `None` when not
    /// restorable.
    pub fn take_for_restore(&mut self) -> Result<Option<Vec<u8>>, ReplicaError> {
        if !self.restorable() {
            return Ok(None);
        }
        let state = std::mem::take(&mut self.record.device_state);
        self.record.full_copy_complete = false;
        if let Err(error) = write_record(&self.config.record_path, &self.record) {
            self.record.device_state = state;
            self.record.full_copy_complete = true;
            return Err(error);
        }
        Ok(Some(state))
    }

    /// The replica's current copy of page `index`.
    pub fn page(&self, index: u64) -> Option<&Page> {
        let start = usize::try_from(index.checked_mul(PAGE_BYTES as u64)?).ok()?;
        let bytes = self
            .ram
            .as_slice()
            .get(start..start.checked_add(PAGE_BYTES)?)?;
        bytes.try_into().ok()
    }

    /// The whole replica RAM (for tests and restore checks).
    pub fn ram(&self) -> &[u8] {
        self.ram.as_slice()
    }

    /// Whether an epoch with this header may start; nothing changes either way.
    pub fn check_start(&self, header: &EpochHeader) -> Result<(), Refusal> {
        let record = &self.record;
        if header.generation < record.generation {
            return Err(Refusal::StaleGeneration {
                ours: record.generation,
            });
        }
        let next = record.epoch.saturating_add(1);
        if header.full {
            if header.generation == record.generation && header.epoch <= record.epoch {
                return Err(Refusal::OutOfOrder { expected: next });
            }
            if header.pages != self.ram_pages {
                return Err(Refusal::Incomplete(format!(
                    "a full copy has {} pages, not {}",
                    self.ram_pages, header.pages
                )));
            }
        } else {
            let base = self.committed();
            if !base.full_copy_complete
                || base.stream != header.stream
                || base.generation != header.generation
            {
                return Err(Refusal::NeedFullCopy);
            }
            if header.epoch != next {
                return Err(Refusal::OutOfOrder { expected: next });
            }
            if header.pages > self.ram_pages {
                return Err(Refusal::Incomplete(format!(
                    "{} pages in a RAM of {}",
                    header.pages, self.ram_pages
                )));
            }
        }
        if header.state_len > MAX_DEVICE_STATE_BYTES {
            return Err(Refusal::Incomplete(format!(
                "device state of {} bytes exceeds {MAX_DEVICE_STATE_BYTES}",
                header.state_len
            )));
        }
        if !header
            .state_encoding
            .wire_len_allowed(header.state_wire_len, header.state_len)
        {
            return Err(Refusal::Malformed(format!(
                "{} bytes are not a {:?} device state of {} bytes",
                header.state_wire_len, header.state_encoding, header.state_len
            )));
        }
        if header.full && header.state_encoding.base_epoch().is_some() {
            return Err(Refusal::Malformed(
                "a full copy's device state is a delta".into(),
            ));
        }
        self.state_base(header.state_encoding)?;
        Ok(())
    }

    /// The base a device state sent as `encoding` is decoded against: for a delta, the
    /// committed record's device state, which must be that of the epoch the delta names.
    fn state_base(&self, encoding: StateEncoding) -> Result<Option<&[u8]>, Refusal> {
        let Some(base_epoch) = encoding.base_epoch() else {
            return Ok(None);
        };
        let record = &self.record;
        let holds = record.state == RecordState::Committed && !record.device_state.is_empty();
        if !holds || record.epoch != base_epoch {
            return Err(Refusal::StateBase {
                committed_epoch: record.epoch,
            });
        }
        Ok(Some(&record.device_state))
    }

    /// Applies a complete, checked epoch atomically (see the module documentation) and makes
    /// it durable. On error the replica claims no complete copy until the next full copy.
    pub fn apply(&mut self, staged: StagedEpoch, crc32c: u32) -> Result<(), Refusal> {
        staged.check_complete(crc32c)?;
        self.check_start(&staged.header)?;
        let header = staged.header;
        let applying = Record {
            generation: header.generation,
            stream: header.stream,
            epoch: header.epoch,
            state: RecordState::Applying,
            full_copy_complete: false,
            device_state: Vec::new(),
            ..self.record.clone()
        };
        // From here on the in-memory record says Applying whatever happens on disk.
        self.record = applying;
        let io_refusal = |error: ReplicaError| Refusal::Io(bounded_text(&error_text(&error)));
        write_record(&self.config.record_path, &self.record).map_err(io_refusal)?;
        let ram = self.ram.as_mut_slice();
        for (index, page) in &staged.pages {
            // Indices were checked against the RAM size when staged.
            let start = *index as usize * PAGE_BYTES;
            if let Some(target) = ram.get_mut(start..start + PAGE_BYTES) {
                match page {
                    StagedPage::Zero => target.fill(0),
                    StagedPage::Data(bytes) => target.copy_from_slice(&bytes[..]),
                }
            }
        }
        self.ram
            .sync()
            .map_err(ReplicaError::SyncRam)
            .map_err(io_refusal)?;
        let committed = Record {
            state: RecordState::Committed,
            full_copy_complete: true,
            device_state: staged.device_state,
            ..self.record.clone()
        };
        write_record(&self.config.record_path, &committed).map_err(io_refusal)?;
        self.record = committed;
        Ok(())
    }
}

/// Opens (or creates: then `true`) the RAM file and locks it against a second engine.
fn open_ram_file(path: &Path) -> Result<(File, bool), ReplicaError> {
    let ram_error = |source| ReplicaError::RamFile {
        path: path.to_path_buf(),
        source,
    };
    let mut options = OpenOptions::new();
    options.read(true).write(true).mode(0o600);
    let (file, created) = match options.clone().create_new(true).open(path) {
        Ok(file) => (file, true),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            (options.open(path).map_err(ram_error)?, false)
        }
        Err(error) => return Err(ram_error(error)),
    };
    if !try_lock_exclusive(&file).map_err(ram_error)? {
        return Err(ReplicaError::InUse {
            path: path.to_path_buf(),
        });
    }
    Ok((file, created))
}

fn error_text(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A page of a staged epoch.
#[derive(Debug)]
enum StagedPage {
    Zero,
    Data(Box<Page>),
}

/// An epoch being received: decoded pages and device state, kept until `EpochEnd`.
#[derive(Debug)]
pub struct StagedEpoch {
    header: EpochHeader,
    /// One bit per RAM page: already staged in this epoch.
    seen: Vec<u64>,
    pages: Vec<(u64, StagedPage)>,
    /// The device state's bytes as sent, until the last arrived.
    state_wire: Vec<u8>,
    state_received: u64,
    /// The decoded device state, once every byte of it arrived.
    device_state: Vec<u8>,
    crc: u32,
}

impl StagedEpoch {
    /// Starts staging an epoch the replica accepted ([`Replica::check_start`]).
    pub fn new(replica: &Replica, header: EpochHeader) -> Result<StagedEpoch, Refusal> {
        replica.check_start(&header)?;
        Ok(StagedEpoch {
            header,
            seen: vec![0; replica.ram_pages.div_ceil(64) as usize],
            pages: Vec::new(),
            state_wire: Vec::new(),
            state_received: 0,
            device_state: Vec::new(),
            crc: 0,
        })
    }

    pub fn epoch(&self) -> u64 {
        self.header.epoch
    }

    pub fn header(&self) -> &EpochHeader {
        &self.header
    }

    /// Decodes and stages a batch's entries; any bad entry refuses the epoch.
    pub fn add_batch(
        &mut self,
        replica: &Replica,
        entries: BatchEntries<'_>,
    ) -> Result<(), Refusal> {
        for entry in entries {
            let entry = entry.map_err(|error| Refusal::malformed(&error))?;
            if self.pages.len() as u64 >= self.header.pages {
                return Err(Refusal::Incomplete(format!(
                    "more than the {} pages announced",
                    self.header.pages
                )));
            }
            let word = self.seen.get_mut((entry.index / 64) as usize);
            let bit = 1u64 << (entry.index % 64);
            match word {
                Some(word) if *word & bit == 0 => *word |= bit,
                _ => {
                    return Err(Refusal::Malformed(format!(
                        "page {} twice in one epoch",
                        entry.index
                    )))
                }
            }
            let base = if self.header.full {
                &ZERO_PAGE
            } else {
                replica
                    .page(entry.index)
                    .ok_or_else(|| Refusal::Malformed(format!("no page {}", entry.index)))?
            };
            let mut page = Box::new([0u8; PAGE_BYTES]);
            decode(entry.encoding, entry.bytes, base, &mut page)
                .map_err(|error| Refusal::malformed(&error))?;
            self.crc = crc32c::crc32c_append(self.crc, &entry.index.to_le_bytes());
            self.crc = crc32c::crc32c_append(self.crc, &page[..]);
            let staged = if page[..] == ZERO_PAGE[..] {
                StagedPage::Zero
            } else {
                StagedPage::Data(page)
            };
            self.pages.push((entry.index, staged));
        }
        Ok(())
    }

    /// Appends a device state chunk, which must start where the previous one ended; the
    /// last one decodes the state (against `replica`'s committed device state for a delta).
    pub fn add_state(
        &mut self,
        replica: &Replica,
        offset: u64,
        chunk: &[u8],
    ) -> Result<(), Refusal> {
        let received = self.state_received;
        if offset != received || chunk.is_empty() {
            return Err(Refusal::Malformed(format!(
                "device state chunk of {} bytes at {offset}, expected one at {received}",
                chunk.len()
            )));
        }
        let wire_len = self.header.state_wire_len;
        let end = received.saturating_add(chunk.len() as u64);
        if end > wire_len {
            return Err(Refusal::Incomplete(format!(
                "device state beyond the {wire_len} bytes announced"
            )));
        }
        if self.state_wire.capacity() == 0 {
            // Bounded in check_start: at most the state's length, itself at most
            // MAX_DEVICE_STATE_BYTES.
            self.state_wire.reserve_exact(wire_len as usize);
        }
        self.state_wire.extend_from_slice(chunk);
        self.state_received = end;
        if end < wire_len {
            return Ok(());
        }
        let encoding = self.header.state_encoding;
        if encoding == StateEncoding::Raw {
            self.device_state = std::mem::take(&mut self.state_wire);
            return Ok(());
        }
        let base = replica.state_base(encoding)?;
        let decoded = state_delta::decode(
            encoding,
            &self.state_wire,
            self.header.state_len as usize,
            base,
            &mut self.device_state,
        );
        self.state_wire = Vec::new();
        decoded.map_err(|error| Refusal::malformed(&error))
    }

    /// Everything announced arrived and the checksum matches.
    pub fn check_complete(&self, crc32c: u32) -> Result<(), Refusal> {
        if self.pages.len() as u64 != self.header.pages {
            return Err(Refusal::Incomplete(format!(
                "{} pages of {} announced",
                self.pages.len(),
                self.header.pages
            )));
        }
        if self.state_received != self.header.state_wire_len {
            return Err(Refusal::Incomplete(format!(
                "{} bytes of device state of {} announced",
                self.state_received, self.header.state_wire_len
            )));
        }
        if self.device_state.len() as u64 != self.header.state_len {
            return Err(Refusal::Incomplete(format!(
                "device state of {} bytes decoded, {} announced",
                self.device_state.len(),
                self.header.state_len
            )));
        }
        let crc = crc32c::crc32c_append(self.crc, &self.device_state);
        if crc != crc32c {
            return Err(Refusal::Checksum);
        }
        Ok(())
    }
}

/// Reads the record; `None` when there is none yet.
fn read_record(path: &Path) -> Result<Option<Record>, ReplicaError> {
    let read_error = |source| ReplicaError::ReadRecord {
        path: path.to_path_buf(),
        source,
    };
    let bad = |what| ReplicaError::BadRecord {
        path: path.to_path_buf(),
        what,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(read_error(error)),
    };
    let length = file.metadata().map_err(read_error)?.len();
    if length > MAX_RECORD_BYTES {
        return Err(bad("too large"));
    }
    let mut bytes = Vec::with_capacity(length as usize);
    io::Read::read_to_end(&mut io::Read::take(file, MAX_RECORD_BYTES), &mut bytes)
        .map_err(read_error)?;
    let (magic, rest) = bytes.split_at_checked(8).ok_or(bad("truncated"))?;
    if magic != RECORD_MAGIC {
        return Err(bad("not a checkpoint record"));
    }
    let (body, crc) = rest
        .split_at_checked(rest.len().saturating_sub(4))
        .ok_or(bad("truncated"))?;
    let crc: [u8; 4] = crc.try_into().map_err(|_| bad("truncated"))?;
    if crc32c::crc32c(body) != u32::from_le_bytes(crc) {
        return Err(bad("checksum mismatch"));
    }
    let (record, trailing) =
        postcard::take_from_bytes::<Record>(body).map_err(|_| bad("fields do not decode"))?;
    if !trailing.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(Some(record))
}

/// Writes the record durably: temporary file, fsync, rename, fsync of the directory.
fn write_record(path: &Path, record: &Record) -> Result<(), ReplicaError> {
    let write_error = |source| ReplicaError::WriteRecord {
        path: path.to_path_buf(),
        source,
    };
    let body = postcard::to_allocvec(record)
        .map_err(|error| write_error(io::Error::new(io::ErrorKind::InvalidData, error)))?;
    let mut bytes = Vec::with_capacity(body.len() + 12);
    bytes.extend_from_slice(RECORD_MAGIC);
    bytes.extend_from_slice(&body);
    bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(write_error)?;
    file.write_all(&bytes).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    drop(file);
    fs::rename(&temporary, path).map_err(write_error)?;
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(directory)
        .and_then(|directory| directory.sync_all())
        .map_err(write_error)
}

#[cfg(test)]
mod tests;
