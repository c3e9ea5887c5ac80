//! The epoch journal of a Level 3 secondary (`docs/LEVEL3.md`, "Disk writes at Level 3"):
//! the file where the primary's writes wait, durable, until their epoch commits. This module
//! is the file format and its ring; `super::epochs` files the secondary's epochs in it.
//!
//! The file is preallocated (fully written when created, so an append never needs new
//! space) and used as a ring of records in arrival order. A record is a 64-byte header
//! (magic, sequence number, generation, epoch, kind, disk offset and length, data length,
//! CRC32C of header and data) followed by its data, padded to [`ALIGN`] bytes. A record
//! never straddles the end of the file: when it does not fit, a wrap record (or, with less
//! than a header left, nothing) sends the reader back to the start.
//!
//! Reading after a restart starts where the caller says the oldest record it still needs
//! is (offset and sequence number, kept in its metadata) and follows the sequence numbers:
//! the first record with a bad magic or checksum, or a sequence number out of turn (one
//! from an earlier lap around the ring), ends the journal. A write torn by a crash is
//! therefore cut off with everything after it, which is what `fdatasync` promised: only
//! what was synced is sure to be there.
//!
//! The file is our own, but a corrupt one must not crash the daemon: every length read
//! from it is bounded before anything is allocated.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::MAX_REQUEST_BYTES;

const MAGIC: &[u8; 8] = b"FTVMJRNL";
const HEADER_BYTES: u64 = 64;
/// Records start on multiples of this.
pub const ALIGN: u64 = 64;
/// The smallest journal: room for a largest request and its header, twice.
pub const MIN_JOURNAL_BYTES: u64 = 2 * (MAX_REQUEST_BYTES as u64 + HEADER_BYTES);

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("journal {path}: I/O error")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal {path} is {found} bytes; it must be a multiple of {ALIGN} and at least {MIN_JOURNAL_BYTES}")]
    BadSize { path: PathBuf, found: u64 },
    #[error("journal full: {needed} bytes needed, {free} free until earlier epochs are applied")]
    Full { needed: u64, free: u64 },
    #[error("a journal record holds at most {MAX_REQUEST_BYTES} bytes of data, not {0}")]
    TooLarge(usize),
    #[error("journal position {offset} (record {sequence}) is not a record start")]
    BadStart { offset: u64, sequence: u64 },
}

/// What a record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A guest write; the data follows.
    Write,
    /// A discard (`deallocate`) or write-zeroes of `len` bytes.
    Zero { deallocate: bool },
    /// The resync finished: the copy is UpToDate once this record's epoch is applied.
    ResyncDone,
    /// Every record of the epoch came before this one.
    EpochEnd,
}

/// A record's header, as appended and as read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub sequence: u64,
    pub generation: u64,
    pub epoch: u64,
    pub kind: Kind,
    /// Where on the disk (write, zero).
    pub offset: u64,
    /// Bytes on the disk the record covers (a write's data length, a zero's range).
    pub len: u64,
}

/// A record found in the file, and where its data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    pub record: Record,
    /// Offset of the record (its header) in the journal file.
    pub position: u64,
    data_len: u32,
}

const KIND_WRITE: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_RESYNC_DONE: u8 = 3;
const KIND_EPOCH_END: u8 = 4;
/// Not a record: the rest of the file is unused, the next record is at offset 0 (it has
/// the same sequence number as the wrap).
const KIND_WRAP: u8 = 5;

/// The live records, oldest first: what `release_through` frees.
#[derive(Debug)]
struct Live {
    sequence: u64,
    position: u64,
    bytes: u64,
}

/// An open journal, positioned to append after its last valid record.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    size_bytes: u64,
    /// Where the next record goes.
    tail: u64,
    next_sequence: u64,
    /// Records not yet released, with the wrap gaps charged to the record after them.
    live: VecDeque<Live>,
    used_bytes: u64,
}

impl Journal {
    /// Creates (or replaces) a journal of `size_bytes` of zeroes (allocated, not written
    /// where the file system can), synced with its directory entry. Its first record will be
    /// number `first_sequence`, at offset 0.
    pub fn create(
        path: &Path,
        size_bytes: u64,
        first_sequence: u64,
    ) -> Result<Journal, JournalError> {
        let io_error = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        check_size(path, size_bytes)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_error)?;
        allocate_zeroed(&file, size_bytes)
            .and_then(|()| file.sync_all())
            .and_then(|()| sync_directory(path))
            .map_err(io_error)?;
        Ok(Journal {
            path: path.to_owned(),
            file,
            size_bytes,
            tail: 0,
            next_sequence: first_sequence,
            live: VecDeque::new(),
            used_bytes: 0,
        })
    }

    /// Opens a journal and reads it from record `sequence` at `position` (the oldest record
    /// the caller still needs, or where the next one was to go) to its end. Returns the
    /// journal, positioned after the last valid record, and the records found, oldest first.
    pub fn open(
        path: &Path,
        position: u64,
        sequence: u64,
    ) -> Result<(Journal, Vec<Found>), JournalError> {
        let io_error = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_error)?;
        let size_bytes = file.metadata().map_err(io_error)?.len();
        check_size(path, size_bytes)?;
        if !position.is_multiple_of(ALIGN) || position >= size_bytes {
            return Err(JournalError::BadStart {
                offset: position,
                sequence,
            });
        }
        let mut journal = Journal {
            path: path.to_owned(),
            file,
            size_bytes,
            tail: position,
            next_sequence: sequence,
            live: VecDeque::new(),
            used_bytes: 0,
        };
        let mut found = Vec::new();
        while let Some(record) = journal.read_next().map_err(io_error)? {
            found.push(record);
        }
        Ok((journal, found))
    }

    fn io_error(&self, source: io::Error) -> JournalError {
        JournalError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Bytes not yet taken by live records.
    pub fn free_bytes(&self) -> u64 {
        self.size_bytes - self.used_bytes
    }

    /// Where the next record goes and its number (what the caller records as the start
    /// once everything before is released).
    pub fn next_position(&self) -> (u64, u64) {
        (self.tail, self.next_sequence)
    }

    /// The oldest live record's position and number, if any.
    pub fn oldest(&self) -> Option<(u64, u64)> {
        self.live.front().map(|live| (live.position, live.sequence))
    }

    /// Appends a record (to the page cache: [`Journal::sync`] makes it durable) and returns
    /// it. `data` is a write's data, empty for the other kinds.
    pub fn append(
        &mut self,
        generation: u64,
        epoch: u64,
        kind: Kind,
        offset: u64,
        len: u64,
        data: &[u8],
    ) -> Result<Record, JournalError> {
        let record = Record {
            sequence: self.next_sequence,
            generation,
            epoch,
            kind,
            offset,
            len,
        };
        self.append_record(record, data).map(|found| found.record)
    }

    /// Appends `record` (its sequence number is replaced by the next one) with `data`, and
    /// returns where it is, for [`Reader::read_data`].
    pub fn append_record(&mut self, record: Record, data: &[u8]) -> Result<Found, JournalError> {
        if data.len() > MAX_REQUEST_BYTES {
            return Err(JournalError::TooLarge(data.len()));
        }
        let bytes = record_bytes(data.len() as u64);
        let room_at_end = self.size_bytes - self.tail;
        let (position, needed) = if bytes <= room_at_end {
            (self.tail, bytes)
        } else {
            (0, bytes + room_at_end)
        };
        if needed > self.free_bytes() {
            return Err(JournalError::Full {
                needed,
                free: self.free_bytes(),
            });
        }
        if position == 0 && self.tail != 0 && room_at_end >= HEADER_BYTES {
            let wrap = encode_header(&wrap_record(self.next_sequence), (KIND_WRAP, 0), &[]);
            self.file
                .write_all_at(&wrap, self.tail)
                .map_err(|e| self.io_error(e))?;
        }
        let record = Record {
            sequence: self.next_sequence,
            ..record
        };
        let mut block = Vec::with_capacity(bytes as usize);
        block.extend_from_slice(&encode_header(&record, raw_kind(record.kind), data));
        block.extend_from_slice(data);
        block.resize(bytes as usize, 0);
        self.file
            .write_all_at(&block, position)
            .map_err(|e| self.io_error(e))?;
        self.live.push_back(Live {
            sequence: record.sequence,
            position,
            bytes: needed,
        });
        self.used_bytes += needed;
        self.tail = wrap_offset(position + bytes, self.size_bytes);
        self.next_sequence += 1;
        Ok(Found {
            record,
            position,
            data_len: data.len() as u32,
        })
    }

    /// The file's size, and the bytes live records take.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// A second handle on the file that reads records back while this one appends.
    pub fn reader(&self) -> Result<Reader, JournalError> {
        let file = self.file.try_clone().map_err(|e| self.io_error(e))?;
        Ok(Reader {
            path: self.path.clone(),
            file,
        })
    }

    /// Makes every appended record durable.
    pub fn sync(&self) -> Result<(), JournalError> {
        self.file.sync_data().map_err(|e| self.io_error(e))
    }

    /// Frees the space of every record up to and including `sequence` (applied to the image
    /// and synced there).
    pub fn release_through(&mut self, sequence: u64) {
        while let Some(live) = self.live.front() {
            if live.sequence > sequence {
                break;
            }
            self.used_bytes -= live.bytes;
            self.live.pop_front();
        }
    }

    /// Reads a found record's data back, checking its checksum again.
    pub fn read_data(&self, found: &Found) -> Result<Vec<u8>, JournalError> {
        read_data(&self.path, &self.file, found)
    }

    /// Reads the record at the tail, if it is the next one, and moves past it.
    fn read_next(&mut self) -> io::Result<Option<Found>> {
        let mut skipped = 0;
        let mut position = self.tail;
        let (record, data_len) = loop {
            if self.size_bytes - position < HEADER_BYTES {
                // Too little room for a header: the writer went back to the start.
                skipped += self.size_bytes - position;
                position = 0;
            }
            let mut header = [0u8; HEADER_BYTES as usize];
            self.file.read_exact_at(&mut header, position)?;
            let Some(data_len) = header_data_len(&header, self.size_bytes - position) else {
                return Ok(None);
            };
            let mut data = vec![0u8; data_len as usize];
            self.file
                .read_exact_at(&mut data, position + HEADER_BYTES)?;
            let Some((record, raw_kind)) = decode_header(&header, &data) else {
                return Ok(None);
            };
            if record.sequence != self.next_sequence {
                return Ok(None);
            }
            if raw_kind == KIND_WRAP {
                if position == 0 || skipped > 0 {
                    return Ok(None);
                }
                skipped += self.size_bytes - position;
                position = 0;
                continue;
            }
            break (record, data_len);
        };
        let bytes = record_bytes(u64::from(data_len));
        if self.used_bytes + skipped + bytes > self.size_bytes {
            // Around the ring and back to the start: nothing more is ours.
            return Ok(None);
        }
        self.live.push_back(Live {
            sequence: record.sequence,
            position,
            bytes: skipped + bytes,
        });
        self.used_bytes += skipped + bytes;
        self.tail = wrap_offset(position + bytes, self.size_bytes);
        self.next_sequence += 1;
        Ok(Some(Found {
            record,
            position,
            data_len,
        }))
    }
}

/// Reads the records of a journal while its [`Journal`] appends.
#[derive(Debug)]
pub struct Reader {
    path: PathBuf,
    file: File,
}

impl Reader {
    /// Reads a found record's data back, checking its checksum again.
    pub fn read_data(&self, found: &Found) -> Result<Vec<u8>, JournalError> {
        read_data(&self.path, &self.file, found)
    }
}

fn io_error_at(path: &Path, source: io::Error) -> JournalError {
    JournalError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read_data(path: &Path, file: &File, found: &Found) -> Result<Vec<u8>, JournalError> {
    let mut data = vec![0u8; found.data_len as usize];
    file.read_exact_at(&mut data, found.position + HEADER_BYTES)
        .map_err(|source| JournalError::Io {
            path: path.to_owned(),
            source,
        })?;
    let mut header = [0u8; HEADER_BYTES as usize];
    file.read_exact_at(&mut header, found.position)
        .map_err(|source| JournalError::Io {
            path: path.to_owned(),
            source,
        })?;
    match decode_header(&header, &data) {
        Some((record, _)) if record == found.record => Ok(data),
        _ => Err(io_error_at(
            path,
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("record {} changed since it was read", found.record.sequence),
            ),
        )),
    }
}

fn check_size(path: &Path, size_bytes: u64) -> Result<(), JournalError> {
    if !size_bytes.is_multiple_of(ALIGN) || size_bytes < MIN_JOURNAL_BYTES {
        return Err(JournalError::BadSize {
            path: path.to_owned(),
            found: size_bytes,
        });
    }
    Ok(())
}

fn record_bytes(data_len: u64) -> u64 {
    (HEADER_BYTES + data_len).div_ceil(ALIGN) * ALIGN
}

fn wrap_offset(offset: u64, size_bytes: u64) -> u64 {
    if offset >= size_bytes {
        0
    } else {
        offset
    }
}

/// The header fields of a wrap (its kind is [`KIND_WRAP`] on disk).
fn wrap_record(sequence: u64) -> Record {
    Record {
        sequence,
        generation: 0,
        epoch: 0,
        kind: Kind::EpochEnd,
        offset: 0,
        len: 0,
    }
}

fn raw_kind(kind: Kind) -> (u8, u8) {
    match kind {
        Kind::Write => (KIND_WRITE, 0),
        Kind::Zero { deallocate } => (KIND_ZERO, u8::from(deallocate)),
        Kind::ResyncDone => (KIND_RESYNC_DONE, 0),
        Kind::EpochEnd => (KIND_EPOCH_END, 0),
    }
}

/// The header of `record` of raw kind and flags `kind` with `data`.
fn encode_header(record: &Record, kind: (u8, u8), data: &[u8]) -> [u8; HEADER_BYTES as usize] {
    let mut header = [0u8; HEADER_BYTES as usize];
    // A record's data is at most MAX_REQUEST_BYTES (checked by `append`), well within u32.
    let data_len = data.len() as u32;
    let (kind, flags) = kind;
    header[0..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&record.sequence.to_le_bytes());
    header[16..24].copy_from_slice(&record.generation.to_le_bytes());
    header[24..32].copy_from_slice(&record.epoch.to_le_bytes());
    header[32..40].copy_from_slice(&record.offset.to_le_bytes());
    header[40..48].copy_from_slice(&record.len.to_le_bytes());
    header[48..52].copy_from_slice(&data_len.to_le_bytes());
    header[52] = kind;
    header[53] = flags;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..60]), data);
    header[60..64].copy_from_slice(&crc.to_le_bytes());
    header
}

fn field(header: &[u8; HEADER_BYTES as usize], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&header[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// The data length a header announces, if it is plausible: magic right, at most
/// [`MAX_REQUEST_BYTES`], and the record within the `room` left in the file.
fn header_data_len(header: &[u8; HEADER_BYTES as usize], room: u64) -> Option<u32> {
    if &header[0..8] != MAGIC {
        return None;
    }
    let data_len = u32::from_le_bytes([header[48], header[49], header[50], header[51]]);
    let fits = data_len as usize <= MAX_REQUEST_BYTES && record_bytes(data_len.into()) <= room;
    fits.then_some(data_len)
}

/// The record a header and its data describe, and its raw kind, if the checksum holds.
fn decode_header(header: &[u8; HEADER_BYTES as usize], data: &[u8]) -> Option<(Record, u8)> {
    let crc = u32::from_le_bytes([header[60], header[61], header[62], header[63]]);
    if crc32c::crc32c_append(crc32c::crc32c(&header[..60]), data) != crc {
        return None;
    }
    let raw = header[52];
    let kind = match (raw, header[53]) {
        (KIND_WRITE, 0) => Kind::Write,
        (KIND_ZERO, flags @ (0 | 1)) => Kind::Zero {
            deallocate: flags == 1,
        },
        (KIND_RESYNC_DONE, 0) => Kind::ResyncDone,
        (KIND_EPOCH_END | KIND_WRAP, 0) => Kind::EpochEnd,
        _ => return None,
    };
    let record = Record {
        sequence: field(header, 8),
        generation: field(header, 16),
        epoch: field(header, 24),
        kind,
        offset: field(header, 32),
        len: field(header, 40),
    };
    Some((record, raw))
}

/// Reserves `len` bytes of zeroes for a journal just truncated to nothing: `fallocate`,
/// which reserves the space (no ENOSPC later) and reads as zeroes without writing them (a
/// metadata change on ext4, XFS and tmpfs), or writes them where it is not supported.
/// Writing 1 GiB of zeroes took 4 s on the secondary's receive path here, each time a
/// disk daemon began Level 3, and held the guest's mirrored writes (and the daemon's
/// control socket) that long.
fn allocate_zeroed(file: &File, len: u64) -> io::Result<()> {
    let Ok(signed_len) = libc::off_t::try_from(len) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("journal size {len} too large"),
        ));
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is owned by `file`, open
    // for writing, for the whole call.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, signed_len) };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOSYS) => write_zeroes(file, len),
        _ => Err(error),
    }
}

fn write_zeroes(file: &File, len: u64) -> io::Result<()> {
    let zeroes = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < len {
        let chunk = (len - offset).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..chunk], offset)?;
        offset += chunk as u64;
    }
    Ok(())
}

fn sync_directory(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => File::open(parent)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

#[cfg(test)]
mod tests;
