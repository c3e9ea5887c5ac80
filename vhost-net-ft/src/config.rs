//! The virtio-net feature set, configuration space and MAC address this daemon offers, and
//! the TAP offloads a negotiated feature set implies. Pure functions.

use std::path::Path;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// `VHOST_F_LOG_ALL`: the frontend may ask us to log every guest page we write (migration).
pub const VHOST_F_LOG_ALL: u32 = 26;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// Largest virtqueue the guest may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Most queue pairs (`--queues`).
pub const MAX_QUEUE_PAIRS: usize = 16;
/// `struct virtio_net_config` up to `max_virtqueue_pairs`: mac, status, pairs.
pub const CONFIG_SPACE_LEN: usize = 10;
/// Config status bit: link up.
pub const STATUS_LINK_UP: u16 = VIRTIO_NET_S_LINK_UP as u16;
/// Config status bit: the device asks the driver to announce itself (GUEST_ANNOUNCE).
pub const STATUS_ANNOUNCE: u16 = VIRTIO_NET_S_ANNOUNCE as u16;

/// Every feature bit we know by name, for `status` and logs.
const FEATURE_NAMES: &[(u32, &str)] = &[
    (VIRTIO_NET_F_CSUM, "CSUM"),
    (VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM"),
    (VIRTIO_NET_F_MAC, "MAC"),
    (VIRTIO_NET_F_GUEST_TSO4, "GUEST_TSO4"),
    (VIRTIO_NET_F_GUEST_TSO6, "GUEST_TSO6"),
    (VIRTIO_NET_F_GUEST_ECN, "GUEST_ECN"),
    (VIRTIO_NET_F_HOST_TSO4, "HOST_TSO4"),
    (VIRTIO_NET_F_HOST_TSO6, "HOST_TSO6"),
    (VIRTIO_NET_F_HOST_ECN, "HOST_ECN"),
    (VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"),
    (VIRTIO_NET_F_STATUS, "STATUS"),
    (VIRTIO_NET_F_CTRL_VQ, "CTRL_VQ"),
    (VIRTIO_NET_F_GUEST_ANNOUNCE, "GUEST_ANNOUNCE"),
    (VIRTIO_NET_F_MQ, "MQ"),
    (VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
    (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
    (VHOST_F_LOG_ALL, "LOG_ALL"),
    (VHOST_USER_F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
    (VIRTIO_F_VERSION_1, "VERSION_1"),
];

/// The virtio features offered for a NIC with `queue_pairs` queue pairs.
pub fn virtio_features(queue_pairs: usize) -> u64 {
    let mut bits = FEATURE_NAMES
        .iter()
        .filter(|(bit, _)| *bit != VIRTIO_NET_F_MQ)
        .fold(0u64, |acc, (bit, _)| acc | (1u64 << bit));
    if queue_pairs > 1 {
        bits |= 1 << VIRTIO_NET_F_MQ;
    }
    bits
}

/// Names of the bits set in `features`, unknown bits as `bit N`.
pub fn feature_names(features: u64) -> Vec<String> {
    (0..64u32)
        .filter(|bit| features & (1u64 << bit) != 0)
        .map(|bit| {
            FEATURE_NAMES
                .iter()
                .find(|(known, _)| *known == bit)
                .map(|(_, name)| (*name).to_owned())
                .unwrap_or_else(|| format!("bit {bit}"))
        })
        .collect()
}

/// The queue pairs the guest may use: several only with MQ negotiated.
pub fn usable_queue_pairs(features: u64, queue_pairs: usize) -> usize {
    if features & (1u64 << VIRTIO_NET_F_MQ) != 0 {
        queue_pairs
    } else {
        1
    }
}

/// The `TUN_F_*` offloads for `TUNSETOFFLOAD`: what the TAP may hand us for the guest,
/// i.e. the guest's receive offloads. TSO needs checksum offload, as in the kernel.
pub fn tap_offloads(features: u64) -> u32 {
    let has = |bit: u32| features & (1u64 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut offloads = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        offloads |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        offloads |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && offloads & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        offloads |= libc::TUN_F_TSO_ECN;
    }
    offloads
}

/// Builds `struct virtio_net_config` (little endian) up to `max_virtqueue_pairs`.
pub fn config_space(mac: [u8; 6], status: u16, queue_pairs: u16) -> [u8; CONFIG_SPACE_LEN] {
    let mut config = [0u8; CONFIG_SPACE_LEN];
    config[0..6].copy_from_slice(&mac);
    config[6..8].copy_from_slice(&status.to_le_bytes());
    config[8..10].copy_from_slice(&queue_pairs.to_le_bytes());
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

/// Parses `52:54:00:12:34:56`; refuses multicast addresses (a NIC cannot own one).
pub fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let invalid = || format!("{text:?} is not a MAC address like 52:54:00:12:34:56");
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next().ok_or_else(invalid)?;
        // Exactly two hex digits (`from_str_radix` alone would take "+f").
        if part.len() != 2 || !part.bytes().all(|digit| digit.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
    }
    if parts.next().is_some() {
        return Err(invalid());
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{text} is a multicast address"));
    }
    Ok(mac)
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A locally administered unicast MAC derived from the socket path: the same path gives the
/// same MAC on every start and every host (64-bit FNV-1a of the path's bytes).
pub fn default_mac(socket: &Path) -> [u8; 6] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in socket.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let bytes = hash.to_be_bytes();
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&bytes[..6]);
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has(features: u64, bit: u32) -> bool {
        features & (1u64 << bit) != 0
    }

    #[test]
    fn offered_features_match_the_design() {
        let features = virtio_features(1);
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_GUEST_ANNOUNCE,
            VIRTIO_RING_F_EVENT_IDX,
            VHOST_USER_F_PROTOCOL_FEATURES,
        ] {
            assert!(has(features, bit), "bit {bit} missing");
        }
        assert!(
            !has(features, VIRTIO_NET_F_MQ),
            "MQ only with several pairs"
        );
        assert!(has(virtio_features(2), VIRTIO_NET_F_MQ));
        // Never offered: UFO (gone from Linux), USO, MTU, CTRL_RX/VLAN/MAC_ADDR.
        for bit in [10, 14, 56, 3, 18, 19, 23] {
            assert!(!has(virtio_features(4), bit), "bit {bit} offered");
        }
    }

    #[test]
    fn feature_names_cover_the_offer() {
        let names = feature_names(virtio_features(2));
        assert!(names.contains(&"MQ".to_owned()));
        assert!(!names.iter().any(|name| name.starts_with("bit ")));
        assert_eq!(feature_names(1 << 40), vec!["bit 40".to_owned()]);
    }

    #[test]
    fn only_mq_unlocks_several_pairs() {
        assert_eq!(usable_queue_pairs(virtio_features(4), 4), 4);
        assert_eq!(usable_queue_pairs(1 << VIRTIO_F_VERSION_1, 4), 1);
    }

    #[test]
    fn tap_offloads_follow_guest_features() {
        assert_eq!(tap_offloads(0), 0);
        // TSO without GUEST_CSUM is meaningless: no offloads.
        assert_eq!(tap_offloads(1 << VIRTIO_NET_F_GUEST_TSO4), 0);
        assert_eq!(tap_offloads(1 << VIRTIO_NET_F_GUEST_CSUM), libc::TUN_F_CSUM);
        let all = tap_offloads(virtio_features(1));
        assert_eq!(
            all,
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
        let ecn_alone = (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_ECN);
        assert_eq!(tap_offloads(ecn_alone), libc::TUN_F_CSUM);
        // Host-side (TX) offloads do not change what the TAP sends us.
        let host_only = (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4);
        assert_eq!(tap_offloads(host_only), 0);
    }

    #[test]
    fn config_space_layout() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let config = config_space(mac, STATUS_LINK_UP | STATUS_ANNOUNCE, 4);
        assert_eq!(config[0..6], mac);
        assert_eq!(config[6..8], [3, 0]);
        assert_eq!(config[8..10], [4, 0]);
    }

    #[test]
    fn config_slice_has_exactly_the_requested_length() {
        let config = config_space([2, 0, 0, 0, 0, 1], STATUS_LINK_UP, 1);
        assert_eq!(config_slice(&config, 0, 6), vec![2, 0, 0, 0, 0, 1]);
        assert_eq!(config_slice(&config, 6, 2), vec![1, 0]);
        assert_eq!(config_slice(&config, 8, 8), vec![1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(config_slice(&config, 1000, 4), vec![0; 4]);
        assert_eq!(config_slice(&config, u32::MAX, 4), vec![0; 4]);
        assert_eq!(config_slice(&config, 0, 0), Vec::<u8>::new());
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:AB:cd:ef"),
            Ok([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "525400abcdef",
            "52:54:00:ab:cd:eg",
            "52:54:00:ab:cd:e",
            "52:54:00:ab:cd:+f",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_mac("01:00:5e:00:00:01")
            .expect_err("multicast")
            .contains("multicast"));
        assert_eq!(
            format_mac([0x52, 0x54, 0, 0xab, 0xcd, 0xef]),
            "52:54:00:ab:cd:ef"
        );
    }

    #[test]
    fn default_mac_is_stable_local_and_unicast() {
        let a = default_mac(Path::new("/run/ftvm/vm1-net0.sock"));
        assert_eq!(a, default_mac(Path::new("/run/ftvm/vm1-net0.sock")));
        assert_ne!(a, default_mac(Path::new("/run/ftvm/vm2-net0.sock")));
        assert_eq!(a[0] & 0x03, 0x02, "locally administered unicast");
        // The value is part of the contract (a VM keeps its MAC across daemon versions).
        assert_eq!(
            format_mac(default_mac(Path::new("/tmp/net.sock"))),
            "b6:9c:d0:9e:8b:31"
        );
    }
}
