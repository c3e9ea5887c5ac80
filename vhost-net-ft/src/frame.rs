//! The virtio-net header and the frames a guest transmits: pure parsing and validation, no I/O.
//!
//! Every frame on a TX queue passes [`check_chain`] (the shape of its descriptor chain) and
//! [`validate_tx`] (the header against the frame and the offloads the guest negotiated)
//! before a byte of it reaches the TAP. Both work on plain values and slices, so unit tests
//! and the `frame_parser` fuzz target call them directly. The daemon validates a private copy
//! of the guest's bytes, so the guest cannot change a frame after it was checked.

use thiserror::Error;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MRG_RXBUF,
};

/// `struct virtio_net_hdr_v1` (and the legacy `virtio_net_hdr_mrg_rxbuf`): the header with
/// `num_buffers`, used with VERSION_1 or MRG_RXBUF.
pub const VNET_HDR_LEN: usize = 12;
/// The legacy `struct virtio_net_hdr`, without `num_buffers`.
pub const LEGACY_VNET_HDR_LEN: usize = 10;
/// An Ethernet header: destination, source, EtherType.
pub const ETH_HLEN: usize = 14;
/// An 802.1Q tag.
pub const VLAN_HLEN: usize = 4;
/// Longest frame a guest may send: a 64 KiB segmentation-offload packet behind an Ethernet
/// header and one VLAN tag (an IP packet is at most 65535 bytes).
pub const MAX_FRAME_BYTES: usize = 64 * 1024 + ETH_HLEN + VLAN_HLEN;

/// `flags`: the device must complete the checksum at `csum_start + csum_offset`.
pub const FLAG_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum is known good (device to driver only; tolerated and cleared on TX).
pub const FLAG_DATA_VALID: u8 = 2;
/// `gso_type` values.
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
/// `gso_type` bit: the TCP packet has ECN's CWR set.
pub const GSO_ECN: u8 = 0x80;

/// Why a TX chain was dropped. Every variant is the guest's fault.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("descriptor {index} of a TX chain is write-only")]
    WriteOnlyDescriptor { index: usize },
    #[error("TX chain of {len} bytes is shorter than the {header_len}-byte virtio-net header")]
    ShortChain { len: u64, header_len: usize },
    #[error("TX chain of {len} bytes is longer than {max} bytes")]
    LongChain { len: u64, max: usize },
    #[error("{len}-byte frame is shorter than an Ethernet header")]
    ShortFrame { len: usize },
    #[error("unknown header flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("checksum offload requested but VIRTIO_NET_F_CSUM was not negotiated")]
    CsumNotNegotiated,
    #[error("checksum field at {start}+{offset} lies outside the {frame_len}-byte frame")]
    CsumOutsideFrame {
        start: u16,
        offset: u16,
        frame_len: usize,
    },
    #[error("hdr_len {hdr_len} exceeds the {frame_len}-byte frame")]
    HdrLenBeyondFrame { hdr_len: u16, frame_len: usize },
    #[error("unknown gso_type {0:#04x}")]
    UnknownGsoType(u8),
    #[error("gso_type {0:#04x} needs an offload that was not negotiated")]
    GsoNotNegotiated(u8),
    #[error("segmentation offload without checksum offload (NEEDS_CSUM unset)")]
    GsoWithoutCsum,
    #[error("segmentation offload with gso_size 0")]
    ZeroGsoSize,
}

/// The virtio-net header, fields in host order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    /// Only in the 12-byte header; 0 when parsed from a 10-byte one.
    pub num_buffers: u16,
}

impl VnetHeader {
    /// Parses a little-endian header from the start of `bytes`; `None` if shorter than the
    /// legacy 10-byte header.
    pub fn parse(bytes: &[u8]) -> Option<VnetHeader> {
        let le16 = |at: usize| -> Option<u16> {
            let pair = bytes.get(at..at + 2)?;
            Some(u16::from_le_bytes([pair[0], pair[1]]))
        };
        Some(VnetHeader {
            flags: *bytes.first()?,
            gso_type: *bytes.get(1)?,
            hdr_len: le16(2)?,
            gso_size: le16(4)?,
            csum_start: le16(6)?,
            csum_offset: le16(8)?,
            num_buffers: le16(10).unwrap_or(0),
        })
    }

    /// The 12-byte little-endian encoding (callers use the first 10 for a legacy header).
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut out = [0u8; VNET_HDR_LEN];
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        out[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        out
    }

    /// The header as the TAP gets it: only NEEDS_CSUM kept, `num_buffers` zero.
    pub fn for_tap(&self) -> VnetHeader {
        VnetHeader {
            flags: self.flags & FLAG_NEEDS_CSUM,
            num_buffers: 0,
            ..*self
        }
    }
}

/// The device-side offloads the guest negotiated: what a TX header may ask of us.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxOffloads {
    /// VIRTIO_NET_F_CSUM: partial checksums.
    pub csum: bool,
    /// VIRTIO_NET_F_HOST_TSO4.
    pub tso4: bool,
    /// VIRTIO_NET_F_HOST_TSO6.
    pub tso6: bool,
    /// VIRTIO_NET_F_HOST_ECN.
    pub ecn: bool,
}

impl TxOffloads {
    /// Everything: what a TAP accepts in a written frame's header.
    pub const ALL: TxOffloads = TxOffloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
    };

    /// The driver-side offloads the guest negotiated (GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN):
    /// what a header of a frame *for* the guest may carry. Frames from the peer host are
    /// checked against these with [`validate_tx`] before they reach the guest.
    pub fn guest_receive(features: u64) -> TxOffloads {
        let has = |bit: u32| features & (1u64 << bit) != 0;
        TxOffloads {
            csum: has(VIRTIO_NET_F_GUEST_CSUM),
            tso4: has(VIRTIO_NET_F_GUEST_TSO4),
            tso6: has(VIRTIO_NET_F_GUEST_TSO6),
            ecn: has(VIRTIO_NET_F_GUEST_ECN),
        }
    }

    pub fn from_features(features: u64) -> TxOffloads {
        let has = |bit: u32| features & (1u64 << bit) != 0;
        TxOffloads {
            csum: has(VIRTIO_NET_F_CSUM),
            tso4: has(VIRTIO_NET_F_HOST_TSO4),
            tso6: has(VIRTIO_NET_F_HOST_TSO6),
            ecn: has(VIRTIO_NET_F_HOST_ECN),
        }
    }
}

/// The header length the negotiated features imply: 12 bytes with VERSION_1 or MRG_RXBUF,
/// else the legacy 10.
pub fn header_len(features: u64) -> usize {
    let modern = features & ((1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_NET_F_MRG_RXBUF));
    if modern != 0 {
        VNET_HDR_LEN
    } else {
        LEGACY_VNET_HDR_LEN
    }
}

/// Checks the shape of a TX descriptor chain from its descriptors' `(len, write_only)` and
/// returns its length in bytes. Stops at the first fault, so a long hostile chain costs no
/// more than the descriptors up to it.
pub fn check_chain(
    descriptors: impl IntoIterator<Item = (u32, bool)>,
    header_len: usize,
) -> Result<usize, FrameError> {
    let max = header_len + MAX_FRAME_BYTES;
    let mut total: u64 = 0;
    for (index, (len, write_only)) in descriptors.into_iter().enumerate() {
        if write_only {
            return Err(FrameError::WriteOnlyDescriptor { index });
        }
        total = total.saturating_add(u64::from(len));
        if total > max as u64 {
            return Err(FrameError::LongChain { len: total, max });
        }
    }
    if total < header_len as u64 {
        return Err(FrameError::ShortChain {
            len: total,
            header_len,
        });
    }
    // total <= max, which fits a usize.
    Ok(total as usize)
}

/// Validates a TX chain's bytes (`header_len` bytes of header, then the frame) against the
/// negotiated offloads, and returns the parsed header.
pub fn validate_tx(
    bytes: &[u8],
    header_len: usize,
    offloads: TxOffloads,
) -> Result<VnetHeader, FrameError> {
    let max = header_len + MAX_FRAME_BYTES;
    if bytes.len() > max {
        return Err(FrameError::LongChain {
            len: bytes.len() as u64,
            max,
        });
    }
    let short = || FrameError::ShortChain {
        len: bytes.len() as u64,
        header_len,
    };
    let (header_bytes, frame) = bytes.split_at_checked(header_len).ok_or_else(short)?;
    let header = VnetHeader::parse(header_bytes).ok_or_else(short)?;
    let frame_len = frame.len();
    if frame_len < ETH_HLEN {
        return Err(FrameError::ShortFrame { len: frame_len });
    }
    if header.flags & !(FLAG_NEEDS_CSUM | FLAG_DATA_VALID) != 0 {
        return Err(FrameError::UnknownFlags(header.flags));
    }
    let needs_csum = header.flags & FLAG_NEEDS_CSUM != 0;
    if needs_csum {
        if !offloads.csum {
            return Err(FrameError::CsumNotNegotiated);
        }
        let end = u32::from(header.csum_start) + u32::from(header.csum_offset) + 2;
        if end as usize > frame_len {
            return Err(FrameError::CsumOutsideFrame {
                start: header.csum_start,
                offset: header.csum_offset,
                frame_len,
            });
        }
    }
    if usize::from(header.hdr_len) > frame_len {
        return Err(FrameError::HdrLenBeyondFrame {
            hdr_len: header.hdr_len,
            frame_len,
        });
    }
    check_gso(&header, offloads, needs_csum)?;
    Ok(header)
}

fn check_gso(
    header: &VnetHeader,
    offloads: TxOffloads,
    needs_csum: bool,
) -> Result<(), FrameError> {
    let ecn = header.gso_type & GSO_ECN != 0;
    let negotiated = match header.gso_type & !GSO_ECN {
        GSO_NONE if ecn => return Err(FrameError::UnknownGsoType(header.gso_type)),
        GSO_NONE => return Ok(()),
        GSO_TCPV4 => offloads.tso4,
        GSO_TCPV6 => offloads.tso6,
        // Never offered: HOST_UFO and HOST_USO.
        GSO_UDP | GSO_UDP_L4 => false,
        _ => return Err(FrameError::UnknownGsoType(header.gso_type)),
    };
    if !negotiated || (ecn && !offloads.ecn) {
        return Err(FrameError::GsoNotNegotiated(header.gso_type));
    }
    if !needs_csum {
        return Err(FrameError::GsoWithoutCsum);
    }
    if header.gso_size == 0 {
        return Err(FrameError::ZeroGsoSize);
    }
    Ok(())
}

/// Sets `num_buffers` in an RX header (no-op for a legacy 10-byte header).
pub fn set_num_buffers(header: &mut [u8], num_buffers: u16) {
    if let Some(field) = header.get_mut(10..12) {
        field.copy_from_slice(&num_buffers.to_le_bytes());
    }
}

/// Length of a RARP frame as QEMU builds it for an announcement (padded to the Ethernet
/// minimum without FCS).
pub const RARP_FRAME_LEN: usize = 60;

/// A reverse-ARP "request reverse" broadcast from `mac`: what QEMU sends (and asks vhost-user
/// backends to send with VHOST_USER_SEND_RARP) so that switches learn where `mac` now is.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; RARP_FRAME_LEN] {
    let mut frame = [0u8; RARP_FRAME_LEN];
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // EtherType RARP
    frame[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    frame[18] = 6; // hardware address length
    frame[19] = 4; // protocol address length
    frame[20..22].copy_from_slice(&3u16.to_be_bytes()); // opcode: request reverse
    frame[22..28].copy_from_slice(&mac); // sender hardware address
    frame[32..38].copy_from_slice(&mac); // target hardware address
    frame
}

/// Whether a frame for `mac` passes a NIC's receive filter: addressed to it, or to a group
/// (broadcast or multicast). `frame` starts with the Ethernet header.
pub fn addressed_to(frame: &[u8], mac: [u8; 6]) -> bool {
    match frame.get(..6) {
        Some(destination) => destination[0] & 1 != 0 || destination == mac,
        None => false,
    }
}

/// Whether a frame is addressed to `mac` itself (not to a group). `frame` starts with the
/// Ethernet header.
pub fn unicast_to(frame: &[u8], mac: [u8; 6]) -> bool {
    frame.get(..6) == Some(&mac[..])
}

/// Whether a frame was sent from `mac` (its source address). `frame` starts with the
/// Ethernet header.
pub fn sent_from(frame: &[u8], mac: [u8; 6]) -> bool {
    frame.get(6..12) == Some(&mac[..])
}

/// Rewrites `bytes` (a `from`-byte header, then the frame) to carry a `to`-byte header
/// (10 or 12 bytes); `num_buffers` is zero in a header made longer.
pub fn convert_header(mut bytes: Vec<u8>, from: usize, to: usize) -> Vec<u8> {
    match from.cmp(&to) {
        std::cmp::Ordering::Equal => bytes,
        std::cmp::Ordering::Less => {
            let extra = to - from;
            let at = from.min(bytes.len());
            bytes.splice(at..at, std::iter::repeat_n(0u8, extra));
            bytes
        }
        std::cmp::Ordering::Greater => {
            let end = from.min(bytes.len());
            let start = to.min(end);
            bytes.drain(start..end);
            bytes
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: TxOffloads = TxOffloads::ALL;

    #[test]
    fn receive_filter_takes_own_and_group_frames_only() {
        let mac = [0x52, 0x54, 0, 0x77, 0, 0x10];
        let mut frame = [0u8; 60];
        frame[..6].copy_from_slice(&mac);
        assert!(addressed_to(&frame, mac));
        frame[..6].copy_from_slice(&[0xff; 6]);
        assert!(addressed_to(&frame, mac));
        frame[..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 1]);
        assert!(addressed_to(&frame, mac));
        frame[..6].copy_from_slice(&[0x52, 0x54, 0, 0x77, 0, 0x11]);
        assert!(!addressed_to(&frame, mac));
        assert!(!addressed_to(&frame[..5], mac));
    }

    #[test]
    fn a_move_relays_frames_for_the_mac_itself_and_stops_at_one_from_it() {
        let mac = [0x52, 0x54, 0, 0x77, 0, 0x10];
        let mut frame = [0u8; 60];
        frame[..6].copy_from_slice(&mac);
        assert!(unicast_to(&frame, mac));
        assert!(!sent_from(&frame, mac));
        frame[..6].copy_from_slice(&[0xff; 6]);
        frame[6..12].copy_from_slice(&mac);
        assert!(!unicast_to(&frame, mac), "a broadcast is not relayed");
        assert!(sent_from(&frame, mac));
        assert!(!unicast_to(&frame[..5], mac));
        assert!(!sent_from(&frame[..11], mac));
    }

    #[test]
    fn header_conversion_keeps_the_frame() {
        let legacy: Vec<u8> = (0..10).chain(100..160).collect();
        let modern = convert_header(legacy.clone(), 10, 12);
        assert_eq!(modern.len(), 72);
        assert_eq!(modern[..10], legacy[..10]);
        assert_eq!(modern[10..12], [0, 0]);
        assert_eq!(modern[12..], legacy[10..]);
        assert_eq!(convert_header(modern.clone(), 12, 10), legacy);
        assert_eq!(convert_header(modern.clone(), 12, 12), modern);
        // Shorter than a header: nothing to panic about.
        assert_eq!(convert_header(vec![1, 2, 3], 12, 10), vec![1, 2, 3]);
        assert_eq!(convert_header(vec![1, 2, 3], 10, 12), vec![1, 2, 3, 0, 0]);
    }

    #[test]
    fn guest_receive_offloads_follow_guest_features() {
        assert_eq!(TxOffloads::guest_receive(0), TxOffloads::default());
        let features = (1u64 << VIRTIO_NET_F_GUEST_CSUM) | (1u64 << VIRTIO_NET_F_GUEST_TSO4);
        let offloads = TxOffloads::guest_receive(features);
        assert!(offloads.csum && offloads.tso4 && !offloads.tso6 && !offloads.ecn);
        // Host (TX) features do not count.
        assert_eq!(
            TxOffloads::guest_receive(1u64 << VIRTIO_NET_F_HOST_TSO4),
            TxOffloads::default()
        );
    }

    fn chain(header: VnetHeader, frame_len: usize) -> Vec<u8> {
        let mut bytes = header.encode().to_vec();
        bytes.extend(std::iter::repeat_n(0xabu8, frame_len));
        bytes
    }

    fn tso4(hdr_len: u16, gso_size: u16) -> VnetHeader {
        VnetHeader {
            flags: FLAG_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len,
            gso_size,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        }
    }

    #[test]
    fn plain_frame_passes() {
        let header = validate_tx(&chain(VnetHeader::default(), 60), 12, TxOffloads::default());
        assert_eq!(header, Ok(VnetHeader::default()));
    }

    #[test]
    fn tso_frame_passes_with_offloads() {
        let bytes = chain(tso4(54, 1448), 54 + 3 * 1448);
        assert_eq!(validate_tx(&bytes, 12, ALL), Ok(tso4(54, 1448)));
    }

    #[test]
    fn chain_shorter_than_the_header_is_refused() {
        for len in 0..12 {
            assert_eq!(
                validate_tx(&vec![0; len], 12, ALL),
                Err(FrameError::ShortChain {
                    len: len as u64,
                    header_len: 12
                })
            );
        }
        assert!(matches!(
            validate_tx(&[0; 9], 10, ALL),
            Err(FrameError::ShortChain { .. })
        ));
    }

    #[test]
    fn frame_shorter_than_ethernet_header_is_refused() {
        assert_eq!(
            validate_tx(&chain(VnetHeader::default(), 13), 12, ALL),
            Err(FrameError::ShortFrame { len: 13 })
        );
        assert_eq!(
            validate_tx(&[0; 12], 12, ALL),
            Err(FrameError::ShortFrame { len: 0 })
        );
    }

    #[test]
    fn oversized_chain_is_refused() {
        let max = 12 + MAX_FRAME_BYTES;
        assert!(validate_tx(&chain(VnetHeader::default(), MAX_FRAME_BYTES), 12, ALL).is_ok());
        assert_eq!(
            validate_tx(&chain(VnetHeader::default(), MAX_FRAME_BYTES + 1), 12, ALL),
            Err(FrameError::LongChain {
                len: max as u64 + 1,
                max
            })
        );
    }

    #[test]
    fn unknown_flags_are_refused_and_data_valid_is_cleared() {
        let header = VnetHeader {
            flags: 4,
            ..VnetHeader::default()
        };
        assert_eq!(
            validate_tx(&chain(header, 60), 12, ALL),
            Err(FrameError::UnknownFlags(4))
        );
        let header = VnetHeader {
            flags: FLAG_DATA_VALID,
            num_buffers: 7,
            ..VnetHeader::default()
        };
        let parsed = validate_tx(&chain(header, 60), 12, ALL).expect("tolerated");
        assert_eq!(parsed.for_tap(), VnetHeader::default());
    }

    #[test]
    fn checksum_needs_the_feature_and_must_lie_inside_the_frame() {
        let header = VnetHeader {
            flags: FLAG_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..VnetHeader::default()
        };
        assert_eq!(
            validate_tx(&chain(header, 60), 12, TxOffloads::default()),
            Err(FrameError::CsumNotNegotiated)
        );
        assert!(validate_tx(&chain(header, 42), 12, ALL).is_ok());
        assert_eq!(
            validate_tx(&chain(header, 41), 12, ALL),
            Err(FrameError::CsumOutsideFrame {
                start: 34,
                offset: 6,
                frame_len: 41
            })
        );
        let far = VnetHeader {
            csum_start: u16::MAX,
            csum_offset: u16::MAX,
            ..header
        };
        assert!(matches!(
            validate_tx(&chain(far, 60), 12, ALL),
            Err(FrameError::CsumOutsideFrame { .. })
        ));
    }

    #[test]
    fn hdr_len_beyond_the_frame_is_refused() {
        let bytes = chain(tso4(200, 1448), 100);
        assert_eq!(
            validate_tx(&bytes, 12, ALL),
            Err(FrameError::HdrLenBeyondFrame {
                hdr_len: 200,
                frame_len: 100
            })
        );
        let plain = VnetHeader {
            hdr_len: 61,
            ..VnetHeader::default()
        };
        assert!(matches!(
            validate_tx(&chain(plain, 60), 12, ALL),
            Err(FrameError::HdrLenBeyondFrame { .. })
        ));
    }

    #[test]
    fn unknown_or_unnegotiated_gso_types_are_refused() {
        for gso_type in [2u8, 6, 7, 0x7f, 0xff, GSO_ECN] {
            let header = VnetHeader {
                gso_type,
                ..tso4(54, 1448)
            };
            assert_eq!(
                validate_tx(&chain(header, 2000), 12, ALL),
                Err(FrameError::UnknownGsoType(gso_type)),
                "gso_type {gso_type:#x}"
            );
        }
        for gso_type in [GSO_UDP, GSO_UDP_L4] {
            let header = VnetHeader {
                gso_type,
                ..tso4(42, 1000)
            };
            assert_eq!(
                validate_tx(&chain(header, 2000), 12, ALL),
                Err(FrameError::GsoNotNegotiated(gso_type))
            );
        }
        let only_csum = TxOffloads {
            csum: true,
            ..TxOffloads::default()
        };
        assert_eq!(
            validate_tx(&chain(tso4(54, 1448), 2000), 12, only_csum),
            Err(FrameError::GsoNotNegotiated(GSO_TCPV4))
        );
        let ecn = VnetHeader {
            gso_type: GSO_TCPV4 | GSO_ECN,
            ..tso4(54, 1448)
        };
        let no_ecn = TxOffloads { ecn: false, ..ALL };
        assert_eq!(
            validate_tx(&chain(ecn, 2000), 12, no_ecn),
            Err(FrameError::GsoNotNegotiated(GSO_TCPV4 | GSO_ECN))
        );
        assert!(validate_tx(&chain(ecn, 2000), 12, ALL).is_ok());
    }

    #[test]
    fn gso_needs_checksum_offload_and_a_segment_size() {
        let header = VnetHeader {
            flags: 0,
            ..tso4(54, 1448)
        };
        assert_eq!(
            validate_tx(&chain(header, 2000), 12, ALL),
            Err(FrameError::GsoWithoutCsum)
        );
        assert_eq!(
            validate_tx(&chain(tso4(54, 0), 2000), 12, ALL),
            Err(FrameError::ZeroGsoSize)
        );
    }

    #[test]
    fn legacy_header_has_no_num_buffers() {
        let mut bytes = tso4(54, 1448).encode()[..10].to_vec();
        bytes.extend([0u8; 2000]);
        let header = validate_tx(&bytes, 10, ALL).expect("valid");
        assert_eq!(header.num_buffers, 0);
        assert_eq!(header.gso_size, 1448);
    }

    #[test]
    fn chain_shape_refuses_write_only_long_and_short_chains() {
        assert_eq!(check_chain([(12, false), (60, false)], 12), Ok(72));
        assert_eq!(
            check_chain([(12, false), (60, true)], 12),
            Err(FrameError::WriteOnlyDescriptor { index: 1 })
        );
        assert_eq!(
            check_chain([(11, false)], 12),
            Err(FrameError::ShortChain {
                len: 11,
                header_len: 12
            })
        );
        assert_eq!(
            check_chain(std::iter::empty(), 12),
            Err(FrameError::ShortChain {
                len: 0,
                header_len: 12
            })
        );
        let max = 12 + MAX_FRAME_BYTES;
        assert_eq!(
            check_chain([(u32::MAX, false), (u32::MAX, false)], 12),
            Err(FrameError::LongChain {
                len: u64::from(u32::MAX),
                max
            })
        );
        assert_eq!(check_chain([(max as u32, false)], 12), Ok(max));
        // A fault after the limit was passed is not reached: the chain is already refused.
        assert!(matches!(
            check_chain([(max as u32 + 1, false), (1, true)], 12),
            Err(FrameError::LongChain { .. })
        ));
    }

    #[test]
    fn header_round_trips_and_num_buffers_is_set_in_place() {
        let header = VnetHeader {
            flags: 1,
            gso_type: 4,
            hdr_len: 0x1234,
            gso_size: 0x5678,
            csum_start: 0x9abc,
            csum_offset: 0xdef0,
            num_buffers: 3,
        };
        assert_eq!(VnetHeader::parse(&header.encode()), Some(header));
        assert_eq!(VnetHeader::parse(&[0; 9]), None);
        let mut bytes = header.encode();
        set_num_buffers(&mut bytes, 0x0102);
        assert_eq!(bytes[10..12], [0x02, 0x01]);
        let mut legacy = [0u8; 10];
        set_num_buffers(&mut legacy, 5);
        assert_eq!(legacy, [0; 10]);
    }

    #[test]
    fn header_length_follows_features() {
        assert_eq!(header_len(0), LEGACY_VNET_HDR_LEN);
        assert_eq!(header_len(1 << VIRTIO_F_VERSION_1), VNET_HDR_LEN);
        assert_eq!(header_len(1 << VIRTIO_NET_F_MRG_RXBUF), VNET_HDR_LEN);
    }

    #[test]
    fn rarp_frame_is_a_broadcast_from_the_mac() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let frame = rarp_frame(mac);
        assert_eq!(frame[0..6], [0xff; 6]);
        assert_eq!(frame[6..12], mac);
        assert_eq!(frame[12..14], [0x80, 0x35]);
        assert_eq!(frame[20..22], [0, 3]);
        assert_eq!(frame[22..28], mac);
        assert_eq!(frame[32..38], mac);
    }
}
