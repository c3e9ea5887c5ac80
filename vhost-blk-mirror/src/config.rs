//! The virtio-blk feature set and configuration space this daemon offers.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::request::{DiskLimits, SECTOR_SHIFT};

/// `VHOST_F_LOG_ALL`: the frontend may ask us to log every guest page we write (migration).
pub const VHOST_F_LOG_ALL: u32 = 26;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// Largest virtqueue the guest may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Most data segments in one request (QEMU's default for a 128-entry queue).
pub const SEG_MAX: u32 = 126;
/// Largest single data segment in bytes; with SEG_MAX it keeps a request under 16 MiB.
pub const SIZE_MAX_BYTES: u32 = 128 * 1024;
/// Logical block size reported to the guest.
pub const BLOCK_SIZE_BYTES: u32 = 512;
/// Physical block exponent: 2^3 logical blocks = 4 KiB physical blocks.
const PHYSICAL_BLOCK_EXP: u8 = 3;
/// Most segments in one discard or write-zeroes request.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Most sectors in one discard or write-zeroes segment (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Size of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding.
pub const CONFIG_SPACE_LEN: usize = 60;

/// The virtio features offered for a disk.
pub fn virtio_features(read_only: bool) -> u64 {
    let mut bits = [
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_MQ,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_F_VERSION_1,
        VHOST_F_LOG_ALL,
        VHOST_USER_F_PROTOCOL_FEATURES,
    ]
    .iter()
    .fold(0u64, |acc, bit| acc | (1u64 << bit));
    if read_only {
        bits |= 1 << VIRTIO_BLK_F_RO;
    } else {
        bits |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    bits
}

/// The limits requests are checked against, for a disk of `size_bytes`.
pub fn disk_limits(size_bytes: u64, read_only: bool) -> DiskLimits {
    DiskLimits {
        capacity_sectors: size_bytes >> SECTOR_SHIFT,
        read_only,
        max_discard_segments: MAX_DISCARD_SEGMENTS,
        max_discard_sectors: MAX_DISCARD_SECTORS,
    }
}

/// Builds `struct virtio_blk_config` (little endian) for a disk.
pub fn config_space(limits: &DiskLimits, num_queues: u16) -> [u8; CONFIG_SPACE_LEN] {
    let mut config = [0u8; CONFIG_SPACE_LEN];
    let mut put = |offset: usize, bytes: &[u8]| {
        config[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0, &limits.capacity_sectors.to_le_bytes());
    put(8, &SIZE_MAX_BYTES.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    // 16..20: geometry, left zero (the guest does not need CHS).
    put(20, &BLOCK_SIZE_BYTES.to_le_bytes());
    put(24, &[PHYSICAL_BLOCK_EXP, 0]);
    put(26, &1u16.to_le_bytes()); // min_io_size, in logical blocks
    put(28, &0u32.to_le_bytes()); // opt_io_size
                                  // 32: writeback, 33: unused.
    put(34, &num_queues.to_le_bytes());
    put(36, &limits.max_discard_sectors.to_le_bytes());
    put(40, &limits.max_discard_segments.to_le_bytes());
    put(44, &8u32.to_le_bytes()); // discard_sector_alignment: 4 KiB
    put(48, &limits.max_discard_sectors.to_le_bytes());
    put(52, &limits.max_discard_segments.to_le_bytes());
    put(56, &[1]); // write_zeroes_may_unmap
    config
}

/// Returns exactly `size` bytes of the config space from `offset`, zero padded past its end;
/// QEMU refuses a reply of any other length.
pub fn config_slice(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut reply = vec![0u8; size as usize];
    let start = (offset as usize).min(config.len());
    let end = (offset as usize)
        .saturating_add(size as usize)
        .min(config.len());
    if let Some(source) = config.get(start..end) {
        reply[..source.len()].copy_from_slice(source);
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_fields_are_in_place() {
        let limits = disk_limits(64 << 20, false);
        let config = config_space(&limits, 2);
        assert_eq!(config[0..8], (131072u64).to_le_bytes());
        assert_eq!(config[12..16], SEG_MAX.to_le_bytes());
        assert_eq!(config[20..24], 512u32.to_le_bytes());
        assert_eq!(config[34..36], 2u16.to_le_bytes());
    }

    #[test]
    fn config_slice_has_exactly_the_requested_length() {
        let config = [1u8; CONFIG_SPACE_LEN];
        assert_eq!(config_slice(&config, 0, 60).len(), 60);
        let padded = config_slice(&config, 56, 8);
        assert_eq!(padded, vec![1, 1, 1, 1, 0, 0, 0, 0]);
        assert_eq!(config_slice(&config, 1000, 4), vec![0; 4]);
        assert_eq!(config_slice(&config, u32::MAX, 4), vec![0; 4]);
    }

    #[test]
    fn read_only_disks_offer_ro_and_no_discard() {
        let features = virtio_features(true);
        assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(virtio_features(false) & (1 << VIRTIO_BLK_F_RO), 0);
    }
}
