//! virtio-blk: the config space, request headers and status bytes. Pure code, no I/O.

use virtio_bindings::virtio_blk;

/// Bytes per virtio-blk sector (fixed by the spec, whatever blk_size says).
pub const SECTOR_BYTES: u64 = 512;
/// Length of the GET_ID answer.
pub const ID_BYTES: u32 = virtio_blk::VIRTIO_BLK_ID_BYTES;
/// Length of the request header (type, ioprio, sector).
pub const HEADER_BYTES: u32 = 16;
/// Length of one discard / write-zeroes segment.
pub const SEGMENT_BYTES: u32 = 16;
/// Config bytes read by default: every field up to `write_zeroes_may_unmap` and its padding.
pub const CONFIG_BYTES: u32 = 60;

/// Status byte: success.
pub const STATUS_OK: u8 = virtio_blk::VIRTIO_BLK_S_OK as u8;
/// Status byte: I/O error.
pub const STATUS_IOERR: u8 = virtio_blk::VIRTIO_BLK_S_IOERR as u8;
/// Status byte: request type not supported.
pub const STATUS_UNSUPP: u8 = virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;
/// What we write into the status byte before submitting, to see whether the device wrote it.
pub const STATUS_UNWRITTEN: u8 = 0xff;

/// Request type: read.
pub const TYPE_IN: u32 = virtio_blk::VIRTIO_BLK_T_IN;
/// Request type: write.
pub const TYPE_OUT: u32 = virtio_blk::VIRTIO_BLK_T_OUT;
/// Request type: flush.
pub const TYPE_FLUSH: u32 = virtio_blk::VIRTIO_BLK_T_FLUSH;
/// Request type: get the device id string.
pub const TYPE_GET_ID: u32 = virtio_blk::VIRTIO_BLK_T_GET_ID;
/// Request type: discard.
pub const TYPE_DISCARD: u32 = virtio_blk::VIRTIO_BLK_T_DISCARD;
/// Request type: write zeroes.
pub const TYPE_WRITE_ZEROES: u32 = virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES;

/// virtio-blk feature bits (bit numbers).
pub mod feature {
    use virtio_bindings::virtio_blk;
    pub const SIZE_MAX: u32 = virtio_blk::VIRTIO_BLK_F_SIZE_MAX;
    pub const SEG_MAX: u32 = virtio_blk::VIRTIO_BLK_F_SEG_MAX;
    pub const GEOMETRY: u32 = virtio_blk::VIRTIO_BLK_F_GEOMETRY;
    pub const RO: u32 = virtio_blk::VIRTIO_BLK_F_RO;
    pub const BLK_SIZE: u32 = virtio_blk::VIRTIO_BLK_F_BLK_SIZE;
    pub const FLUSH: u32 = virtio_blk::VIRTIO_BLK_F_FLUSH;
    pub const TOPOLOGY: u32 = virtio_blk::VIRTIO_BLK_F_TOPOLOGY;
    pub const CONFIG_WCE: u32 = virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;
    pub const MQ: u32 = virtio_blk::VIRTIO_BLK_F_MQ;
    pub const DISCARD: u32 = virtio_blk::VIRTIO_BLK_F_DISCARD;
    pub const WRITE_ZEROES: u32 = virtio_blk::VIRTIO_BLK_F_WRITE_ZEROES;
    /// VHOST_F_LOG_ALL: the backend logs the pages it writes.
    pub const LOG_ALL: u32 = 26;
    /// VIRTIO_RING_F_INDIRECT_DESC.
    pub const INDIRECT_DESC: u32 = 28;
    /// VIRTIO_RING_F_EVENT_IDX.
    pub const EVENT_IDX: u32 = 29;
    /// VHOST_USER_F_PROTOCOL_FEATURES.
    pub const PROTOCOL_FEATURES: u32 = 30;
    /// VIRTIO_F_VERSION_1.
    pub const VERSION_1: u32 = 32;
}

/// The mask of one feature bit.
pub const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// Names of the virtio-blk, ring and vhost feature bits set in `features` (unknown bits as
/// `bit N`).
pub fn feature_names(features: u64) -> Vec<String> {
    (0..64)
        .filter(|number| features & (1 << number) != 0)
        .map(|number| {
            let name = match number {
                feature::SIZE_MAX => "SIZE_MAX",
                feature::SEG_MAX => "SEG_MAX",
                feature::GEOMETRY => "GEOMETRY",
                feature::RO => "RO",
                feature::BLK_SIZE => "BLK_SIZE",
                feature::FLUSH => "FLUSH",
                feature::TOPOLOGY => "TOPOLOGY",
                feature::CONFIG_WCE => "CONFIG_WCE",
                feature::MQ => "MQ",
                feature::DISCARD => "DISCARD",
                feature::WRITE_ZEROES => "WRITE_ZEROES",
                24 => "NOTIFY_ON_EMPTY",
                feature::LOG_ALL => "LOG_ALL",
                feature::INDIRECT_DESC => "INDIRECT_DESC",
                feature::EVENT_IDX => "EVENT_IDX",
                feature::PROTOCOL_FEATURES => "PROTOCOL_FEATURES",
                feature::VERSION_1 => "VERSION_1",
                _ => return format!("bit {number}"),
            };
            name.to_string()
        })
        .collect()
}

/// A readable name for a status byte.
pub fn status_name(status: u8) -> &'static str {
    match status {
        STATUS_OK => "OK",
        STATUS_IOERR => "IOERR",
        STATUS_UNSUPP => "UNSUPP",
        STATUS_UNWRITTEN => "unwritten",
        _ => "unknown",
    }
}

/// Disk geometry from the config space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
}

/// `struct virtio_blk_config`, parsed (little-endian; fields past the returned length are 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub geometry: Geometry,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub wce: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn bytes<const N: usize>(&self, offset: usize) -> [u8; N] {
        let mut value = [0; N];
        if let Some(source) = self.0.get(offset..offset + N) {
            value.copy_from_slice(source);
        }
        value
    }
    fn u8(&self, offset: usize) -> u8 {
        self.0.get(offset).copied().unwrap_or(0)
    }
    fn u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes(self.bytes(offset))
    }
    fn u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.bytes(offset))
    }
    fn u64(&self, offset: usize) -> u64 {
        u64::from_le_bytes(self.bytes(offset))
    }
}

impl BlkConfig {
    /// Parses a config space of any length; missing or truncated fields read as 0.
    pub fn parse(bytes: &[u8]) -> Self {
        let fields = Fields(bytes);
        Self {
            capacity: fields.u64(0),
            size_max: fields.u32(8),
            seg_max: fields.u32(12),
            geometry: Geometry {
                cylinders: fields.u16(16),
                heads: fields.u8(18),
                sectors: fields.u8(19),
            },
            blk_size: fields.u32(20),
            physical_block_exp: fields.u8(24),
            alignment_offset: fields.u8(25),
            min_io_size: fields.u16(26),
            opt_io_size: fields.u32(28),
            wce: fields.u8(32),
            num_queues: fields.u16(34),
            max_discard_sectors: fields.u32(36),
            max_discard_seg: fields.u32(40),
            discard_sector_alignment: fields.u32(44),
            max_write_zeroes_sectors: fields.u32(48),
            max_write_zeroes_seg: fields.u32(52),
            write_zeroes_may_unmap: fields.u8(56),
        }
    }

    /// Capacity in bytes (saturating).
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.saturating_mul(SECTOR_BYTES)
    }
}

/// A typed virtio-blk request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// VIRTIO_BLK_T_IN of `len` bytes at `sector`.
    Read { sector: u64, len: u32 },
    /// VIRTIO_BLK_T_OUT of `data` at `sector`.
    Write { sector: u64, data: Vec<u8> },
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID (20 bytes back).
    GetId,
    /// VIRTIO_BLK_T_DISCARD of one segment.
    Discard { sector: u64, sectors: u32 },
    /// VIRTIO_BLK_T_WRITE_ZEROES of one segment.
    WriteZeroes {
        sector: u64,
        sectors: u32,
        unmap: bool,
    },
}

impl Request {
    /// The request type field.
    pub fn request_type(&self) -> u32 {
        match self {
            Request::Read { .. } => TYPE_IN,
            Request::Write { .. } => TYPE_OUT,
            Request::Flush => TYPE_FLUSH,
            Request::GetId => TYPE_GET_ID,
            Request::Discard { .. } => TYPE_DISCARD,
            Request::WriteZeroes { .. } => TYPE_WRITE_ZEROES,
        }
    }

    fn sector(&self) -> u64 {
        match self {
            Request::Read { sector, .. } | Request::Write { sector, .. } => *sector,
            Request::Flush
            | Request::GetId
            | Request::Discard { .. }
            | Request::WriteZeroes { .. } => 0,
        }
    }

    /// The 16-byte header: type, ioprio 0, sector.
    pub fn header(&self) -> [u8; 16] {
        encode_header(self.request_type(), self.sector())
    }

    /// Device-readable payload after the header (write data or one segment).
    pub fn out_payload(&self) -> Option<Vec<u8>> {
        match self {
            Request::Write { data, .. } => Some(data.clone()),
            Request::Discard { sector, sectors } => Some(encode_segment(*sector, *sectors, 0)),
            Request::WriteZeroes {
                sector,
                sectors,
                unmap,
            } => Some(encode_segment(*sector, *sectors, u32::from(*unmap))),
            Request::Read { .. } | Request::Flush | Request::GetId => None,
        }
    }

    /// Bytes of device-writable data before the status byte.
    pub fn in_len(&self) -> u32 {
        match self {
            Request::Read { len, .. } => *len,
            Request::GetId => ID_BYTES,
            Request::Write { .. }
            | Request::Flush
            | Request::Discard { .. }
            | Request::WriteZeroes { .. } => 0,
        }
    }
}

/// A request header of any type (raw tests use unknown types).
pub fn encode_header(request_type: u32, sector: u64) -> [u8; 16] {
    let mut header = [0; 16];
    header[0..4].copy_from_slice(&request_type.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    header
}

/// A discard / write-zeroes segment (`flags` bit 0 = unmap).
pub fn encode_segment(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut segment = Vec::with_capacity(SEGMENT_BYTES as usize);
    segment.extend_from_slice(&sector.to_le_bytes());
    segment.extend_from_slice(&sectors.to_le_bytes());
    segment.extend_from_slice(&flags.to_le_bytes());
    segment
}

/// What the device answered to a typed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The status byte the device wrote ([`STATUS_UNWRITTEN`] if it wrote none).
    pub status: u8,
    /// Data read (IN and GET_ID), empty otherwise; the whole buffer, whatever `used_len` says.
    pub data: Vec<u8>,
    /// The length the device put in the used ring (data written plus the status byte).
    pub used_len: u32,
}

impl Response {
    /// Whether the status is VIRTIO_BLK_S_OK.
    pub fn is_ok(&self) -> bool {
        self.status == STATUS_OK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_little_endian_fields() {
        let mut bytes = vec![0; 60];
        bytes[0..8].copy_from_slice(&131072_u64.to_le_bytes());
        bytes[12..16].copy_from_slice(&126_u32.to_le_bytes());
        bytes[20..24].copy_from_slice(&512_u32.to_le_bytes());
        bytes[34..36].copy_from_slice(&4_u16.to_le_bytes());
        bytes[56] = 1;
        let config = BlkConfig::parse(&bytes);
        assert_eq!(config.capacity, 131072);
        assert_eq!(config.capacity_bytes(), 64 << 20);
        assert_eq!(config.seg_max, 126);
        assert_eq!(config.blk_size, 512);
        assert_eq!(config.num_queues, 4);
        assert_eq!(config.write_zeroes_may_unmap, 1);
    }

    #[test]
    fn short_config_reads_missing_fields_as_zero() {
        let config = BlkConfig::parse(&[1, 0, 0, 0, 0, 0, 0, 0, 9]);
        assert_eq!(config.capacity, 1);
        assert_eq!(config.size_max, 0);
        assert_eq!(BlkConfig::parse(&[]), BlkConfig::default());
    }

    #[test]
    fn feature_names_cover_known_and_unknown_bits() {
        let names = feature_names(bit(feature::FLUSH) | bit(feature::VERSION_1) | bit(40));
        assert_eq!(names, ["FLUSH", "VERSION_1", "bit 40"]);
    }

    #[test]
    fn headers_and_segments_encode() {
        let header = Request::Write {
            sector: 7,
            data: vec![1; 512],
        }
        .header();
        assert_eq!(&header[0..4], &TYPE_OUT.to_le_bytes());
        assert_eq!(&header[8..16], &7_u64.to_le_bytes());
        let segment = Request::WriteZeroes {
            sector: 3,
            sectors: 2,
            unmap: true,
        }
        .out_payload()
        .expect("segment");
        assert_eq!(segment.len(), 16);
        assert_eq!(&segment[12..16], &1_u32.to_le_bytes());
        assert_eq!(Request::GetId.in_len(), 20);
        assert_eq!(Request::Flush.header()[8..16], [0; 8]);
    }
}
