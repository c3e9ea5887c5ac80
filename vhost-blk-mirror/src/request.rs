//! Pure virtio-blk request parsing and validation.
//!
//! Nothing here touches guest memory or descriptor chains: the glue layer copies the request
//! header and any discard/write-zeroes segments out of the chain, and this module decides what
//! the request means and whether it is allowed. Every input is untrusted guest data.

use thiserror::Error;

/// Size of a virtio-blk sector in bytes; the unit of every sector number on the wire.
pub const SECTOR_SIZE: u64 = 512;
/// Shift for [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_LEN: usize = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
pub const SEGMENT_LEN: usize = 16;
/// Length of the serial returned by `GET_ID` (`VIRTIO_BLK_ID_BYTES`).
pub const ID_LEN: usize = 20;

/// Request types (`VIRTIO_BLK_T_*`).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Flag of a write-zeroes segment: the device may deallocate the range.
const SEGMENT_FLAG_UNMAP: u32 = 1;

/// Status byte written back to the guest (`VIRTIO_BLK_S_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoError = 1,
    Unsupported = 2,
}

/// What the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

/// A parsed request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: RequestKind,
    pub sector: u64,
}

/// One range of a discard or write-zeroes request, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

/// Why a request is refused. Each maps to one virtio status in [`RequestError::status`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("request header is {0} bytes, expected {HEADER_LEN}")]
    ShortHeader(usize),
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    #[error("data length {0} is not a multiple of the sector size")]
    UnalignedLength(u64),
    #[error("sectors {sector}+{sectors} are beyond the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("segment list is {0} bytes, not a whole number of segments")]
    BadSegmentList(usize),
    #[error("{count} segments exceed the limit of {limit}")]
    TooManySegments { count: usize, limit: u32 },
    #[error("segment of {sectors} sectors exceeds the limit of {limit}")]
    SegmentTooLarge { sectors: u32, limit: u32 },
    #[error("unknown flags {0:#x} in a discard or write-zeroes segment")]
    BadSegmentFlags(u32),
    #[error("request of {0} bytes exceeds the largest accepted request")]
    TooLarge(usize),
    #[error("descriptor chain has no writable status byte")]
    NoStatus,
    #[error("descriptor chain layout does not fit the request: {0}")]
    BadChain(&'static str),
}

impl RequestError {
    /// The status the guest sees for this refusal.
    pub fn status(&self) -> Status {
        match self {
            RequestError::UnsupportedType(_) => Status::Unsupported,
            RequestError::ShortHeader(_)
            | RequestError::UnalignedLength(_)
            | RequestError::OutOfRange { .. }
            | RequestError::ReadOnly
            | RequestError::BadSegmentList(_)
            | RequestError::TooManySegments { .. }
            | RequestError::SegmentTooLarge { .. }
            | RequestError::BadSegmentFlags(_)
            | RequestError::TooLarge(_)
            | RequestError::NoStatus
            | RequestError::BadChain(_) => Status::IoError,
        }
    }
}

/// Limits of the disk a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct DiskLimits {
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub max_discard_segments: u32,
    pub max_discard_sectors: u32,
}

/// Parses a `virtio_blk_outhdr` (type, reserved/ioprio, sector; little endian).
pub fn parse_header(bytes: &[u8]) -> Result<Header, RequestError> {
    let header: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or(RequestError::ShortHeader(bytes.len()))?;
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let kind = match request_type {
        T_IN => RequestKind::Read,
        T_OUT => RequestKind::Write,
        T_FLUSH => RequestKind::Flush,
        T_GET_ID => RequestKind::GetId,
        T_DISCARD => RequestKind::Discard,
        T_WRITE_ZEROES => RequestKind::WriteZeroes,
        other => return Err(RequestError::UnsupportedType(other)),
    };
    Ok(Header { kind, sector })
}

/// Checks a read or write of `data_len` bytes at `sector` and returns its byte offset.
pub fn check_data_range(
    header: &Header,
    data_len: u64,
    limits: &DiskLimits,
) -> Result<u64, RequestError> {
    if header.kind == RequestKind::Write && limits.read_only {
        return Err(RequestError::ReadOnly);
    }
    if !data_len.is_multiple_of(SECTOR_SIZE) {
        return Err(RequestError::UnalignedLength(data_len));
    }
    check_sectors(
        header.sector,
        data_len >> SECTOR_SHIFT,
        limits.capacity_sectors,
    )?;
    // Cannot overflow: sector < capacity, and capacity * 512 fits the image size in u64.
    Ok(header.sector << SECTOR_SHIFT)
}

fn check_sectors(sector: u64, sectors: u64, capacity: u64) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

/// Parses and checks the segment list of a discard or write-zeroes request.
pub fn parse_segments(
    kind: RequestKind,
    bytes: &[u8],
    limits: &DiskLimits,
) -> Result<Vec<Segment>, RequestError> {
    if limits.read_only {
        return Err(RequestError::ReadOnly);
    }
    if bytes.is_empty() || !bytes.len().is_multiple_of(SEGMENT_LEN) {
        return Err(RequestError::BadSegmentList(bytes.len()));
    }
    let count = bytes.len() / SEGMENT_LEN;
    if count > limits.max_discard_segments as usize {
        return Err(RequestError::TooManySegments {
            count,
            limit: limits.max_discard_segments,
        });
    }
    let allowed_flags = match kind {
        RequestKind::WriteZeroes => SEGMENT_FLAG_UNMAP,
        _ => 0,
    };
    bytes
        .chunks_exact(SEGMENT_LEN)
        .map(|raw| {
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&raw[0..8]);
            let sector = u64::from_le_bytes(sector);
            let sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
            let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
            if flags & !allowed_flags != 0 {
                return Err(RequestError::BadSegmentFlags(flags));
            }
            if sectors > limits.max_discard_sectors {
                return Err(RequestError::SegmentTooLarge {
                    sectors,
                    limit: limits.max_discard_sectors,
                });
            }
            check_sectors(sector, u64::from(sectors), limits.capacity_sectors)?;
            Ok(Segment {
                offset: sector << SECTOR_SHIFT,
                len: u64::from(sectors) << SECTOR_SHIFT,
                unmap: flags & SEGMENT_FLAG_UNMAP != 0,
            })
        })
        .collect()
}

/// Builds the 20-byte serial for `GET_ID`: the ASCII id, zero padded, truncated to 20 bytes.
pub fn id_bytes(serial: &str) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    for (slot, byte) in id.iter_mut().zip(serial.bytes()) {
        *slot = byte;
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: DiskLimits = DiskLimits {
        capacity_sectors: 2048,
        read_only: false,
        max_discard_segments: 4,
        max_discard_sectors: 1024,
    };

    fn header_bytes(request_type: u32, sector: u64) -> Vec<u8> {
        let mut bytes = request_type.to_le_bytes().to_vec();
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&sector.to_le_bytes());
        bytes
    }

    fn segment_bytes(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
        let mut bytes = sector.to_le_bytes().to_vec();
        bytes.extend_from_slice(&sectors.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes
    }

    #[test]
    fn parses_every_supported_type() {
        let cases = [
            (T_IN, RequestKind::Read),
            (T_OUT, RequestKind::Write),
            (T_FLUSH, RequestKind::Flush),
            (T_GET_ID, RequestKind::GetId),
            (T_DISCARD, RequestKind::Discard),
            (T_WRITE_ZEROES, RequestKind::WriteZeroes),
        ];
        for (raw, kind) in cases {
            let header = parse_header(&header_bytes(raw, 7)).expect("valid header");
            assert_eq!(header, Header { kind, sector: 7 });
        }
    }

    #[test]
    fn unknown_type_is_unsupported() {
        let error = parse_header(&header_bytes(99, 0)).expect_err("type 99");
        assert_eq!(error, RequestError::UnsupportedType(99));
        assert_eq!(error.status(), Status::Unsupported);
    }

    #[test]
    fn short_header_is_an_io_error() {
        let error = parse_header(&[0u8; 15]).expect_err("short");
        assert_eq!(error, RequestError::ShortHeader(15));
        assert_eq!(error.status(), Status::IoError);
    }

    #[test]
    fn range_check_catches_end_and_overflow() {
        let read = Header {
            kind: RequestKind::Read,
            sector: 2047,
        };
        assert_eq!(check_data_range(&read, 512, &LIMITS), Ok(2047 * 512));
        assert!(matches!(
            check_data_range(&read, 1024, &LIMITS),
            Err(RequestError::OutOfRange { .. })
        ));
        let huge = Header {
            kind: RequestKind::Read,
            sector: u64::MAX,
        };
        assert!(matches!(
            check_data_range(&huge, 512, &LIMITS),
            Err(RequestError::OutOfRange { .. })
        ));
        assert_eq!(
            check_data_range(&read, 100, &LIMITS),
            Err(RequestError::UnalignedLength(100))
        );
    }

    #[test]
    fn writes_to_read_only_disk_are_refused() {
        let limits = DiskLimits {
            read_only: true,
            ..LIMITS
        };
        let write = Header {
            kind: RequestKind::Write,
            sector: 0,
        };
        assert_eq!(
            check_data_range(&write, 512, &limits),
            Err(RequestError::ReadOnly)
        );
        let segments = segment_bytes(0, 8, 0);
        assert_eq!(
            parse_segments(RequestKind::Discard, &segments, &limits),
            Err(RequestError::ReadOnly)
        );
    }

    #[test]
    fn segments_are_checked() {
        let mut bytes = segment_bytes(8, 8, 0);
        bytes.extend(segment_bytes(100, 16, 0));
        let segments = parse_segments(RequestKind::Discard, &bytes, &LIMITS).expect("valid");
        assert_eq!(
            segments[1],
            Segment {
                offset: 100 * 512,
                len: 16 * 512,
                unmap: false
            }
        );
        let unmap = segment_bytes(0, 8, SEGMENT_FLAG_UNMAP);
        assert_eq!(
            parse_segments(RequestKind::Discard, &unmap, &LIMITS),
            Err(RequestError::BadSegmentFlags(1))
        );
        let zeroes = parse_segments(RequestKind::WriteZeroes, &unmap, &LIMITS).expect("valid");
        assert!(zeroes[0].unmap);
        assert_eq!(
            parse_segments(RequestKind::Discard, &bytes[..20], &LIMITS),
            Err(RequestError::BadSegmentList(20))
        );
        let too_big = segment_bytes(0, 2000, 0);
        assert!(matches!(
            parse_segments(RequestKind::Discard, &too_big, &LIMITS),
            Err(RequestError::SegmentTooLarge { .. })
        ));
        let many: Vec<u8> = (0..5).flat_map(|i| segment_bytes(i * 8, 8, 0)).collect();
        assert!(matches!(
            parse_segments(RequestKind::Discard, &many, &LIMITS),
            Err(RequestError::TooManySegments { .. })
        ));
    }

    #[test]
    fn id_is_padded_and_truncated() {
        assert_eq!(&id_bytes("disk0")[..6], b"disk0\0");
        assert_eq!(
            id_bytes("abcdefghijklmnopqrstuvwxyz"),
            *b"abcdefghijklmnopqrst"
        );
    }
}
