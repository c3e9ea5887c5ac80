//! The checkpoint stream between the primary's and the secondary's engines, carried by
//! `replication-link` (service [`service_name`]`(vm)`), which authenticates, orders and
//! retransmits the messages.
//!
//! Every message is one link message: a postcard [`Message`] as the application header
//! (at most [`MAX_HEADER_BYTES`]) and raw bytes as the payload (only `PageBatch` and
//! `DeviceState` have one).
//!
//! ```text
//! primary                                   secondary
//! Hello {protocol, vm, generation, stream, ram_bytes} ->
//!                                           <- Welcome {replica's generation, stream,
//!                                                       committed epoch, full copy done}
//! EpochStart {epoch, generation, full, pages, state_len,
//!             state_encoding, state_wire_len} ->
//! PageBatch {epoch, entries} + entries     -> (any number)
//! DeviceState {epoch, offset} + chunk      -> (state_wire_len bytes in order)
//! EpochEnd {epoch, crc32c}                 ->
//!                                           <- Ack {epoch} | Refused {epoch, reason}
//! ```
//!
//! `Hello` names the stream's [`PROTOCOL_VERSION`]; a secondary of another version refuses
//! the session ([`Refusal::Protocol`]).
//!
//! A `PageBatch` payload is `entries` records, back to back:
//! `page_index u64 LE | encoding u8 | length u16 LE | length bytes` ([`crate::delta`]),
//! at most [`MAX_BATCH_BYTES`] in all. The `DeviceState` chunks carry the device state of
//! `state_len` bytes as `state_encoding` says ([`crate::state_delta`]: raw, LZ4, or LZ4 of
//! the delta against the state of the replica's committed epoch, which it names), in
//! `state_wire_len` bytes. `EpochEnd`'s CRC32C covers, in send order, each page's index
//! (u64 LE) and its *decoded* 4096 bytes, then the *decoded* device state: so it also
//! catches a primary's shadow (or base state) that differs from the replica's copy.
//!
//! Every count, length and index is checked against the limits here and the RAM size before
//! anything is allocated or staged; a message that does not decode is a [`WireError`].

use serde::{Deserialize, Serialize};

use crate::delta::{Encoded, Encoding, PAGE_BYTES};
use crate::state_delta::StateEncoding;

/// The version of this stream's format, in `Hello`. Version 2: the device state as a delta
/// (`EpochStart`'s `state_encoding`); the stream before it had no version.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest postcard header of a checkpoint message (the link allows 4032).
pub const MAX_HEADER_BYTES: usize = 1024;
/// Largest `PageBatch` payload: about 256 raw pages, far below the link's 4 MiB message.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Bytes of an entry's fixed part (index, encoding, length).
pub const ENTRY_HEADER_BYTES: usize = 8 + 1 + 2;
/// Most entries in a batch (every entry takes at least its fixed part).
pub const MAX_BATCH_ENTRIES: u32 = (MAX_BATCH_BYTES / ENTRY_HEADER_BYTES) as u32;
/// Largest `DeviceState` chunk.
pub const MAX_STATE_CHUNK_BYTES: usize = 1024 * 1024;
/// Largest device state of an epoch (QEMU's is 0.3 to 0.7 MB without RAM).
pub const MAX_DEVICE_STATE_BYTES: u64 = 64 * 1024 * 1024;
/// Longest VM name.
pub const MAX_VM_NAME_BYTES: usize = 200;
/// Longest reason text in a refusal (longer texts are cut).
pub const MAX_REASON_BYTES: usize = 400;
/// Largest guest RAM the protocol describes (1 TiB).
pub const MAX_RAM_BYTES: u64 = 1 << 40;

/// The link service of a VM's checkpoint stream.
pub fn service_name(vm: &str) -> String {
    format!("checkpoint:{vm}")
}

/// Messages of the checkpoint stream. Variant order is the wire format: add at the end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Primary → secondary, first message of a session.
    Hello {
        /// [`PROTOCOL_VERSION`] of the primary.
        protocol: u32,
        vm: String,
        generation: u64,
        /// Random id of the primary engine's instance (its shadow): incremental epochs build
        /// only on a copy made by the same stream.
        stream: u64,
        ram_bytes: u64,
        page_bytes: u32,
    },
    /// Secondary → primary: the answer to `Hello`, the replica's committed state.
    Welcome {
        vm: String,
        generation: u64,
        stream: u64,
        committed_epoch: u64,
        full_copy_complete: bool,
        ram_bytes: u64,
        page_bytes: u32,
    },
    /// An epoch begins: `pages` entries and a device state of `state_len` bytes follow,
    /// the state encoded as `state_encoding` says in `state_wire_len` bytes.
    EpochStart {
        epoch: u64,
        generation: u64,
        full: bool,
        pages: u64,
        state_len: u64,
        state_encoding: StateEncoding,
        state_wire_len: u64,
    },
    /// Page entries of `epoch`; the payload holds `entries` entries.
    PageBatch { epoch: u64, entries: u32 },
    /// Device state bytes at `offset`; the payload is the chunk.
    DeviceState { epoch: u64, offset: u64 },
    /// The epoch is complete; `crc32c` as in the module documentation.
    EpochEnd { epoch: u64, crc32c: u32 },
    /// Secondary → primary: `epoch` is applied and durable.
    Ack { epoch: u64 },
    /// Secondary → primary: `epoch` was discarded (the replica is unchanged).
    Refused { epoch: u64, reason: Refusal },
}

/// Why the secondary discarded an epoch or a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The sender's generation is lower than the replica's: a newer primary exists.
    StaleGeneration { ours: u64 },
    /// The VM, RAM size or page size differ from the replica's.
    Mismatch {
        ours_vm: String,
        ours_ram_bytes: u64,
    },
    /// The epoch does not follow the replica's committed state (`expected` is the next
    /// incremental epoch the replica would take).
    OutOfOrder { expected: u64 },
    /// An incremental epoch, but the replica has no complete copy from this stream.
    NeedFullCopy,
    /// The epoch's content did not add up (counts, lengths, checksum).
    Incomplete(String),
    /// The checksum of the decoded epoch does not match.
    Checksum,
    /// A message that does not decode or does not belong here.
    Malformed(String),
    /// The replica could not apply the epoch to its files.
    Io(String),
    /// This host is not ready to commit the epoch (its disk did not seal it).
    NotReady(String),
    /// The primary speaks another [`PROTOCOL_VERSION`] (`ours` is the secondary's).
    Protocol { ours: u32 },
    /// The device state is a delta against another state than the one the replica
    /// committed (that of `committed_epoch`, if it holds one): the replica is unchanged.
    StateBase { committed_epoch: u64 },
}

impl Refusal {
    /// A refusal with a text, cut to [`MAX_REASON_BYTES`].
    pub fn malformed(error: &dyn std::error::Error) -> Refusal {
        Refusal::Malformed(bounded_text(&error.to_string()))
    }
}

/// `text` cut to at most [`MAX_REASON_BYTES`] bytes at a character boundary.
pub fn bounded_text(text: &str) -> String {
    let mut end = text.len().min(MAX_REASON_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("header of {length} bytes exceeds {MAX_HEADER_BYTES}")]
    HeaderTooLarge { length: usize },
    #[error("header does not decode")]
    Header(#[source] postcard::Error),
    #[error("{trailing} bytes after the header")]
    TrailingHeaderBytes { trailing: usize },
    #[error("{message} carries a payload of {length} bytes")]
    UnexpectedPayload {
        message: &'static str,
        length: usize,
    },
    #[error("payload of {length} bytes exceeds {limit}")]
    PayloadTooLarge { length: usize, limit: usize },
    #[error("{field} is too long")]
    TooLong { field: &'static str },
    #[error("batch of {entries} entries exceeds {MAX_BATCH_ENTRIES}")]
    TooManyEntries { entries: u32 },
    #[error("batch entry {entry} is truncated")]
    Truncated { entry: u32 },
    #[error("batch has {trailing} bytes after its last entry")]
    TrailingEntryBytes { trailing: usize },
    #[error("page {index} is beyond the RAM's {ram_pages} pages")]
    PageOutOfRange { index: u64, ram_pages: u64 },
    #[error("bad page entry")]
    Entry(#[source] crate::delta::DeltaError),
}

impl Message {
    fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::EpochStart { .. } => "EpochStart",
            Message::PageBatch { .. } => "PageBatch",
            Message::DeviceState { .. } => "DeviceState",
            Message::EpochEnd { .. } => "EpochEnd",
            Message::Ack { .. } => "Ack",
            Message::Refused { .. } => "Refused",
        }
    }

    /// Encodes the header for the link.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let bytes = postcard::to_allocvec(self).map_err(WireError::Header)?;
        if bytes.len() > MAX_HEADER_BYTES {
            return Err(WireError::HeaderTooLarge {
                length: bytes.len(),
            });
        }
        Ok(bytes)
    }

    /// Decodes a link message's header and checks the payload's size against it.
    pub fn decode(header: &[u8], payload: &[u8]) -> Result<Message, WireError> {
        if header.len() > MAX_HEADER_BYTES {
            return Err(WireError::HeaderTooLarge {
                length: header.len(),
            });
        }
        let (message, rest) =
            postcard::take_from_bytes::<Message>(header).map_err(WireError::Header)?;
        if !rest.is_empty() {
            return Err(WireError::TrailingHeaderBytes {
                trailing: rest.len(),
            });
        }
        message.check(payload.len())?;
        Ok(message)
    }

    fn check(&self, payload_len: usize) -> Result<(), WireError> {
        let limit = match self {
            Message::PageBatch { entries, .. } => {
                if *entries > MAX_BATCH_ENTRIES {
                    return Err(WireError::TooManyEntries { entries: *entries });
                }
                MAX_BATCH_BYTES
            }
            Message::DeviceState { .. } => MAX_STATE_CHUNK_BYTES,
            Message::Hello { vm, .. } | Message::Welcome { vm, .. } => {
                if vm.len() > MAX_VM_NAME_BYTES {
                    return Err(WireError::TooLong { field: "vm name" });
                }
                0
            }
            _ => 0,
        };
        if limit == 0 && payload_len > 0 {
            return Err(WireError::UnexpectedPayload {
                message: self.name(),
                length: payload_len,
            });
        }
        if payload_len > limit {
            return Err(WireError::PayloadTooLarge {
                length: payload_len,
                limit,
            });
        }
        Ok(())
    }
}

/// One page entry of a batch, borrowed from the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub index: u64,
    pub encoding: Encoding,
    pub bytes: &'a [u8],
}

/// Builds a `PageBatch` payload.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    payload: Vec<u8>,
    entries: u32,
}

impl BatchBuilder {
    pub fn new() -> BatchBuilder {
        BatchBuilder::default()
    }

    /// Whether an entry of `encoded` fits; if not, send the batch first.
    pub fn has_room(&self, encoded: &Encoded<'_>) -> bool {
        self.payload.len() + ENTRY_HEADER_BYTES + encoded.bytes.len() <= MAX_BATCH_BYTES
            && self.entries < MAX_BATCH_ENTRIES
    }

    /// Appends an entry; the caller checked [`BatchBuilder::has_room`].
    pub fn push(&mut self, index: u64, encoded: &Encoded<'_>) {
        if self.payload.capacity() == 0 {
            self.payload.reserve(MAX_BATCH_BYTES);
        }
        self.payload.extend_from_slice(&index.to_le_bytes());
        self.payload.push(encoded.encoding.as_byte());
        // Encoded pages are at most PAGE_BYTES long (4096 fits in u16).
        let length = encoded.bytes.len().min(PAGE_BYTES) as u16;
        self.payload.extend_from_slice(&length.to_le_bytes());
        self.payload.extend_from_slice(encoded.bytes);
        self.entries += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// The message and payload of the batch; the builder is empty again.
    pub fn take(&mut self, epoch: u64) -> (Message, Vec<u8>) {
        let entries = std::mem::take(&mut self.entries);
        let payload = std::mem::take(&mut self.payload);
        (Message::PageBatch { epoch, entries }, payload)
    }
}

/// The entries of a `PageBatch` payload, each checked: index below `ram_pages`, known
/// encoding, length allowed for it and present. The iterator ends after the first error; the
/// whole payload must be used by exactly `entries` entries.
#[derive(Debug)]
pub struct BatchEntries<'a> {
    rest: &'a [u8],
    remaining: u32,
    read: u32,
    ram_pages: u64,
    failed: bool,
}

impl<'a> BatchEntries<'a> {
    pub fn new(payload: &'a [u8], entries: u32, ram_pages: u64) -> BatchEntries<'a> {
        BatchEntries {
            rest: payload,
            remaining: entries,
            read: 0,
            ram_pages,
            failed: false,
        }
    }

    fn next_entry(&mut self) -> Result<Entry<'a>, WireError> {
        let entry = self.read;
        let truncated = WireError::Truncated { entry };
        let (fixed, rest) = self
            .rest
            .split_at_checked(ENTRY_HEADER_BYTES)
            .ok_or(truncated)?;
        let mut index = [0u8; 8];
        index.copy_from_slice(&fixed[..8]);
        let index = u64::from_le_bytes(index);
        let encoding = Encoding::from_byte(fixed[8]).map_err(WireError::Entry)?;
        let length = usize::from(u16::from_le_bytes([fixed[9], fixed[10]]));
        if index >= self.ram_pages {
            return Err(WireError::PageOutOfRange {
                index,
                ram_pages: self.ram_pages,
            });
        }
        if !encoding.length_allowed(length) {
            return Err(WireError::Entry(crate::delta::DeltaError::Length {
                encoding,
                length,
            }));
        }
        let (bytes, rest) = rest
            .split_at_checked(length)
            .ok_or(WireError::Truncated { entry })?;
        self.rest = rest;
        self.read += 1;
        Ok(Entry {
            index,
            encoding,
            bytes,
        })
    }
}

impl<'a> Iterator for BatchEntries<'a> {
    type Item = Result<Entry<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if self.remaining == 0 {
            if self.rest.is_empty() {
                return None;
            }
            self.failed = true;
            return Some(Err(WireError::TrailingEntryBytes {
                trailing: self.rest.len(),
            }));
        }
        self.remaining -= 1;
        let result = self.next_entry();
        self.failed = result.is_err();
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::{Encoder, ZERO_PAGE};

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello {
                protocol: PROTOCOL_VERSION,
                vm: "vm1".into(),
                generation: 3,
                stream: 99,
                ram_bytes: 1 << 28,
                page_bytes: 4096,
            },
            Message::Welcome {
                vm: "vm1".into(),
                generation: 3,
                stream: 99,
                committed_epoch: 17,
                full_copy_complete: true,
                ram_bytes: 1 << 28,
                page_bytes: 4096,
            },
            Message::EpochStart {
                epoch: 18,
                generation: 3,
                full: false,
                pages: 12,
                state_len: 365_000,
                state_encoding: StateEncoding::XorLz4 { base_epoch: 17 },
                state_wire_len: 2_000,
            },
            Message::EpochEnd {
                epoch: 18,
                crc32c: 0xdead_beef,
            },
            Message::Ack { epoch: 18 },
            Message::Refused {
                epoch: 18,
                reason: Refusal::StaleGeneration { ours: 4 },
            },
            Message::Refused {
                epoch: 18,
                reason: Refusal::StateBase {
                    committed_epoch: 16,
                },
            },
            Message::Refused {
                epoch: 0,
                reason: Refusal::Protocol { ours: 2 },
            },
        ]
    }

    #[test]
    fn messages_round_trip() {
        for message in all_messages() {
            let bytes = message.encode().expect("encode");
            assert_eq!(Message::decode(&bytes, &[]).expect("decode"), message);
        }
        let batch = Message::PageBatch {
            epoch: 1,
            entries: 2,
        };
        let bytes = batch.encode().expect("encode");
        assert_eq!(Message::decode(&bytes, &[0; 22]).expect("decode"), batch);
    }

    #[test]
    fn hostile_headers_are_errors() {
        assert!(Message::decode(&[0xff, 0xff, 0xff], &[]).is_err());
        assert!(Message::decode(&[], &[]).is_err());
        let mut bytes = Message::Ack { epoch: 1 }.encode().expect("encode");
        bytes.push(0);
        assert!(matches!(
            Message::decode(&bytes, &[]),
            Err(WireError::TrailingHeaderBytes { trailing: 1 })
        ));
        let ack = Message::Ack { epoch: 1 }.encode().expect("encode");
        assert!(matches!(
            Message::decode(&ack, &[1]),
            Err(WireError::UnexpectedPayload { .. })
        ));
        let big = Message::DeviceState {
            epoch: 1,
            offset: 0,
        }
        .encode()
        .expect("encode");
        assert!(matches!(
            Message::decode(&big, &vec![0; MAX_STATE_CHUNK_BYTES + 1]),
            Err(WireError::PayloadTooLarge { .. })
        ));
        let many = Message::PageBatch {
            epoch: 1,
            entries: MAX_BATCH_ENTRIES + 1,
        }
        .encode()
        .expect("encode");
        assert!(matches!(
            Message::decode(&many, &[]),
            Err(WireError::TooManyEntries { .. })
        ));
        let long_name = Message::Hello {
            protocol: PROTOCOL_VERSION,
            vm: "x".repeat(MAX_VM_NAME_BYTES + 1),
            generation: 1,
            stream: 1,
            ram_bytes: 4096,
            page_bytes: 4096,
        }
        .encode()
        .expect("encode");
        assert!(matches!(
            Message::decode(&long_name, &[]),
            Err(WireError::TooLong { .. })
        ));
        // A header claiming a huge string length must fail without allocating it.
        let mut huge = vec![0u8];
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(Message::decode(&huge, &[]).is_err());
    }

    #[test]
    fn largest_header_fits() {
        let hello = Message::Hello {
            protocol: u32::MAX,
            vm: "x".repeat(MAX_VM_NAME_BYTES),
            generation: u64::MAX,
            stream: u64::MAX,
            ram_bytes: u64::MAX,
            page_bytes: u32::MAX,
        };
        assert!(hello.encode().expect("encode").len() <= MAX_HEADER_BYTES);
        let refused = Message::Refused {
            epoch: u64::MAX,
            reason: Refusal::Mismatch {
                ours_vm: "x".repeat(MAX_VM_NAME_BYTES),
                ours_ram_bytes: u64::MAX,
            },
        };
        assert!(refused.encode().expect("encode").len() <= MAX_HEADER_BYTES);
        let text = "é".repeat(MAX_REASON_BYTES);
        let reason = Message::Refused {
            epoch: u64::MAX,
            reason: Refusal::Io(bounded_text(&text)),
        };
        assert!(reason.encode().expect("encode").len() <= MAX_HEADER_BYTES);
        let link_limit = replication_link::header::MAX_APP_HEADER_BYTES;
        assert!(MAX_HEADER_BYTES <= link_limit);
    }

    fn sample_batch() -> (Vec<u8>, u32) {
        let mut encoder = Encoder::new();
        let mut builder = BatchBuilder::new();
        let mut page = [0u8; PAGE_BYTES];
        page[10] = 1;
        for (index, base) in [(0u64, &ZERO_PAGE), (5, &page)] {
            let encoded = encoder.encode(&page, base);
            assert!(builder.has_room(&encoded));
            builder.push(index, &encoded);
        }
        let mut random = [0u8; PAGE_BYTES];
        crate::delta::tests::random_bytes(1, &mut random);
        let encoded = encoder.encode(&random, &ZERO_PAGE);
        builder.push(7, &encoded);
        let (message, payload) = builder.take(4);
        assert!(builder.is_empty());
        match message {
            Message::PageBatch { epoch: 4, entries } => (payload, entries),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn batch_entries_round_trip() {
        let (payload, entries) = sample_batch();
        assert_eq!(entries, 3);
        let parsed: Vec<Entry<'_>> = BatchEntries::new(&payload, entries, 8)
            .collect::<Result<_, _>>()
            .expect("parse");
        let summary: Vec<(u64, Encoding, usize)> = parsed
            .iter()
            .map(|entry| (entry.index, entry.encoding, entry.bytes.len()))
            .collect();
        assert_eq!(summary[1], (5, Encoding::Same, 0));
        assert_eq!(summary[2], (7, Encoding::Raw, PAGE_BYTES));
        assert_eq!(summary[0].1, Encoding::XorSparse);
    }

    #[test]
    fn hostile_batches_are_errors() {
        let (payload, entries) = sample_batch();
        let first_error = |payload: &[u8], entries: u32, ram_pages: u64| {
            BatchEntries::new(payload, entries, ram_pages)
                .find_map(Result::err)
                .map(|error| error.to_string())
        };
        // Every truncation fails.
        for cut in 0..payload.len() {
            assert!(
                first_error(&payload[..cut], entries, 8).is_some(),
                "cut {cut}"
            );
        }
        // A page beyond the RAM.
        assert!(first_error(&payload, entries, 7)
            .expect("error")
            .contains("beyond"));
        // Fewer entries than bytes, more entries than bytes.
        assert!(first_error(&payload, entries - 1, 8)
            .expect("error")
            .contains("after its last entry"));
        assert!(first_error(&payload, entries + 1, 8)
            .expect("error")
            .contains("truncated"));
        // An unknown encoding, a wrong length for an encoding.
        let mut bad = payload.clone();
        bad[8] = 9;
        assert!(first_error(&bad, entries, 8).is_some());
        let mut bad = payload.clone();
        bad[9] = 0;
        bad[10] = 0;
        assert!(first_error(&bad, entries, 8)
            .expect("error")
            .contains("bad page entry"));
        // The iterator stops after an error.
        assert_eq!(BatchEntries::new(&payload[..3], entries, 8).count(), 1);
    }
}
