//! Fuzz target: the virtio-blk request parser (`vhost_blk_mirror::request`) on untrusted
//! guest bytes.
//!
//! `cd vhost-blk-mirror/fuzz && cargo +nightly fuzz run request_parser` (see README.md).
//!
//! Every input is a structured [`Input`] built by `arbitrary` from the fuzzer's bytes: header
//! bytes, a data length, disk limits and a segment list. Header and segments come either as
//! raw bytes (any length, any content) or built from fields whose sectors may be given
//! relative to the end of the disk, so that the fuzzer reaches the boundary cases (a range
//! ending exactly at, or one sector past, the last sector) instead of only random 64-bit
//! sectors far outside any disk. Each parser must not panic, and its verdict must agree with a
//! small reference model written here in `u128` arithmetic (so the model itself cannot
//! overflow): a request is accepted exactly when the model accepts it, and every accepted
//! range lies inside the disk.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vhost_blk_mirror::config::disk_limits;
use vhost_blk_mirror::request::{
    check_data_range, id_bytes, parse_header, parse_segments, DiskLimits, Header, RequestError,
    RequestKind, Status, HEADER_LEN, ID_LEN, SECTOR_SHIFT, SECTOR_SIZE, SEGMENT_LEN,
};

#[derive(Clone, Copy, Debug, Arbitrary)]
enum Kind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

impl From<Kind> for RequestKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Read => RequestKind::Read,
            Kind::Write => RequestKind::Write,
            Kind::Flush => RequestKind::Flush,
            Kind::GetId => RequestKind::GetId,
            Kind::Discard => RequestKind::Discard,
            Kind::WriteZeroes => RequestKind::WriteZeroes,
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Limits {
    /// The disk size in bytes; the capacity is `size_bytes >> 9`, as `config::disk_limits`
    /// computes it (so `capacity * 512` always fits in a `u64`, as for a real image).
    size_bytes: u64,
    read_only: bool,
    /// Use the daemon's own limits (`config::disk_limits`) instead of the two below.
    daemon_limits: bool,
    max_discard_segments: u32,
    max_discard_sectors: u32,
}

impl Limits {
    fn disk_limits(&self) -> DiskLimits {
        if self.daemon_limits {
            disk_limits(self.size_bytes, self.read_only)
        } else {
            DiskLimits {
                capacity_sectors: self.size_bytes >> SECTOR_SHIFT,
                read_only: self.read_only,
                max_discard_segments: self.max_discard_segments,
                max_discard_sectors: self.max_discard_sectors,
            }
        }
    }
}

/// A sector number: any 64-bit value, or near the end of the disk.
#[derive(Debug, Arbitrary)]
enum Sector {
    Absolute(u64),
    /// `capacity - n` (saturating).
    FromEnd(u16),
}

impl Sector {
    fn resolve(&self, capacity_sectors: u64) -> u64 {
        match *self {
            Sector::Absolute(sector) => sector,
            Sector::FromEnd(n) => capacity_sectors.saturating_sub(u64::from(n)),
        }
    }
}

/// A count of sectors: small, or any 32-bit value.
#[derive(Debug, Arbitrary)]
enum Count {
    Small(u8),
    Any(u32),
}

impl Count {
    fn resolve(&self) -> u32 {
        match *self {
            Count::Small(n) => u32::from(n),
            Count::Any(n) => n,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum HeaderInput {
    /// The bytes the guest put in the header descriptor(s); any length.
    Raw(Vec<u8>),
    /// A well-formed 16-byte header: type (any value), ioprio, sector.
    Built {
        request_type: u32,
        ioprio: u32,
        sector: Sector,
    },
}

#[derive(Debug, Arbitrary)]
enum DataLen {
    /// Any length, aligned or not.
    Any(u64),
    /// `sectors * 512`.
    Sectors(Count),
}

#[derive(Debug, Arbitrary)]
struct SegmentInput {
    sector: Sector,
    sectors: Count,
    flags: u32,
}

#[derive(Debug, Arbitrary)]
enum SegmentsInput {
    /// A discard / write-zeroes segment list as raw bytes; any length.
    Raw(Vec<u8>),
    /// Whole segments (`le64 sector, le32 num_sectors, le32 flags` each).
    Built(Vec<SegmentInput>),
}

#[derive(Debug, Arbitrary)]
struct Input {
    limits: Limits,
    header: HeaderInput,
    /// Used when the header does not parse, so the range checks still see every kind.
    fallback_kind: Kind,
    fallback_sector: Sector,
    /// Data bytes of the chain (the sum of the data descriptors' lengths).
    data_len: DataLen,
    segments: SegmentsInput,
    /// The serial an operator configured (`--serial`).
    serial: String,
}

impl Input {
    fn header_bytes(&self, capacity_sectors: u64) -> Vec<u8> {
        match &self.header {
            HeaderInput::Raw(bytes) => bytes.clone(),
            HeaderInput::Built {
                request_type,
                ioprio,
                sector,
            } => {
                let mut bytes = request_type.to_le_bytes().to_vec();
                bytes.extend_from_slice(&ioprio.to_le_bytes());
                bytes.extend_from_slice(&sector.resolve(capacity_sectors).to_le_bytes());
                bytes
            }
        }
    }

    fn data_len(&self) -> u64 {
        match &self.data_len {
            DataLen::Any(len) => *len,
            DataLen::Sectors(count) => u64::from(count.resolve()) * SECTOR_SIZE,
        }
    }

    fn segment_bytes(&self, capacity_sectors: u64) -> Vec<u8> {
        match &self.segments {
            SegmentsInput::Raw(bytes) => bytes.clone(),
            SegmentsInput::Built(segments) => segments
                .iter()
                .flat_map(|segment| {
                    let mut bytes = segment
                        .sector
                        .resolve(capacity_sectors)
                        .to_le_bytes()
                        .to_vec();
                    bytes.extend_from_slice(&segment.sectors.resolve().to_le_bytes());
                    bytes.extend_from_slice(&segment.flags.to_le_bytes());
                    bytes
                })
                .collect(),
        }
    }
}

fuzz_target!(|input: Input| {
    let limits = input.limits.disk_limits();
    let capacity_bytes = u128::from(limits.capacity_sectors) * u128::from(SECTOR_SIZE);
    let header_bytes = input.header_bytes(limits.capacity_sectors);
    let data_len_bytes = input.data_len();
    let segment_bytes = input.segment_bytes(limits.capacity_sectors);

    // 1. The header.
    let header = match parse_header(&header_bytes) {
        Ok(header) => {
            let bytes = &header_bytes;
            assert!(
                bytes.len() >= HEADER_LEN,
                "accepted a {}-byte header",
                bytes.len()
            );
            let raw_type = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&bytes[8..16]);
            assert_eq!(header.sector, u64::from_le_bytes(sector));
            let expected = match raw_type {
                0 => RequestKind::Read,
                1 => RequestKind::Write,
                4 => RequestKind::Flush,
                8 => RequestKind::GetId,
                11 => RequestKind::Discard,
                13 => RequestKind::WriteZeroes,
                other => panic!("accepted unknown request type {other}"),
            };
            assert_eq!(header.kind, expected);
            header
        }
        Err(error) => {
            match error {
                RequestError::ShortHeader(len) => {
                    assert!(header_bytes.len() < HEADER_LEN);
                    assert_eq!(len, header_bytes.len());
                    assert_eq!(error.status(), Status::IoError);
                }
                RequestError::UnsupportedType(_) => {
                    assert!(header_bytes.len() >= HEADER_LEN);
                    assert_eq!(error.status(), Status::Unsupported);
                }
                other => panic!("parse_header returned an unexpected error: {other:?}"),
            }
            Header {
                kind: input.fallback_kind.into(),
                sector: input.fallback_sector.resolve(limits.capacity_sectors),
            }
        }
    };

    // 2. The data range of a read or write.
    let sector = u128::from(header.sector);
    let data_len = u128::from(data_len_bytes);
    let model_accepts = !(header.kind == RequestKind::Write && limits.read_only)
        && data_len % u128::from(SECTOR_SIZE) == 0
        && sector + data_len / u128::from(SECTOR_SIZE) <= u128::from(limits.capacity_sectors);
    match check_data_range(&header, data_len_bytes, &limits) {
        Ok(offset) => {
            assert!(
                model_accepts,
                "accepted {header:?} + {} bytes on {limits:?}",
                data_len_bytes
            );
            assert_eq!(u128::from(offset), sector * u128::from(SECTOR_SIZE));
            assert!(
                u128::from(offset) + data_len <= capacity_bytes,
                "range {offset}+{} is outside a disk of {capacity_bytes} bytes",
                data_len_bytes
            );
        }
        Err(error) => {
            assert!(!model_accepts, "refused a valid range: {error}");
            assert_eq!(error.status(), Status::IoError);
        }
    }

    // 3. The segment list of a discard or write-zeroes request (checked for any kind: the
    // parser must be safe whatever the caller passes).
    let allowed_flags = if header.kind == RequestKind::WriteZeroes {
        1
    } else {
        0
    };
    let raw_segments: Vec<(u64, u32, u32)> = segment_bytes
        .chunks_exact(SEGMENT_LEN)
        .map(|raw| {
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&raw[0..8]);
            (
                u64::from_le_bytes(sector),
                u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
                u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]),
            )
        })
        .collect();
    let model_accepts = !limits.read_only
        && !segment_bytes.is_empty()
        && segment_bytes.len().is_multiple_of(SEGMENT_LEN)
        && raw_segments.len() <= limits.max_discard_segments as usize
        && raw_segments.iter().all(|&(sector, sectors, flags)| {
            flags & !allowed_flags == 0
                && sectors <= limits.max_discard_sectors
                && u128::from(sector) + u128::from(sectors) <= u128::from(limits.capacity_sectors)
        });
    match parse_segments(header.kind, &segment_bytes, &limits) {
        Ok(segments) => {
            assert!(
                model_accepts,
                "accepted segments {raw_segments:?} on {limits:?}"
            );
            assert_eq!(segments.len(), raw_segments.len());
            for (segment, &(sector, sectors, flags)) in segments.iter().zip(&raw_segments) {
                assert_eq!(
                    u128::from(segment.offset),
                    u128::from(sector) * u128::from(SECTOR_SIZE)
                );
                assert_eq!(segment.len, u64::from(sectors) * SECTOR_SIZE);
                assert_eq!(segment.unmap, flags & 1 != 0);
                assert!(
                    u128::from(segment.offset) + u128::from(segment.len) <= capacity_bytes,
                    "segment {segment:?} is outside a disk of {capacity_bytes} bytes"
                );
            }
        }
        Err(error) => {
            assert!(
                !model_accepts,
                "refused valid segments {raw_segments:?}: {error}"
            );
            assert_eq!(error.status(), Status::IoError);
        }
    }

    // 4. The GET_ID serial: always 20 bytes, a prefix of the configured serial.
    let id = id_bytes(&input.serial);
    assert_eq!(id.len(), ID_LEN);
    let prefix = input.serial.len().min(ID_LEN);
    assert_eq!(&id[..prefix], &input.serial.as_bytes()[..prefix]);
    assert!(id[prefix..].iter().all(|&byte| byte == 0));
});
