//! Fuzz target: the virtio-net TX frame checks (`vhost_net_ft::frame`), the control-queue
//! parser (`vhost_net_ft::ctrl`) on untrusted guest bytes, and the peer host's messages and
//! frames (`vhost_net_ft::peer`) on untrusted network bytes.
//!
//! `cd vhost-net-ft/fuzz && cargo +nightly fuzz run frame_parser` (see README.md).
//!
//! Every input is a structured [`Input`] built by `arbitrary`: the offloads the guest
//! negotiated, a TX chain's descriptor shapes, and the chain's bytes either raw (any length,
//! any content) or built from header fields whose offsets may be given relative to the end
//! of the frame, so that the fuzzer reaches the boundaries (a checksum field ending exactly
//! at, or one byte past, the end of the frame; a frame of exactly the maximum length) instead
//! of only random 16-bit values far outside a 60-byte frame. Each function must not panic,
//! and its verdict must match what the properties below say about the same bytes.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vhost_net_ft::ctrl::{self, Effect, ACK_ERR, ACK_OK};
use vhost_net_ft::peer::{
    check_frame_from_peer, split_batch, Direction, PeerFrameError, PeerMessage,
    BATCH_LENGTH_BYTES,
};
use vhost_net_ft::frame::{
    check_chain, convert_header, set_num_buffers, validate_tx, FrameError, TxOffloads,
    VnetHeader, ETH_HLEN,
    FLAG_DATA_VALID, FLAG_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, LEGACY_VNET_HDR_LEN,
    MAX_FRAME_BYTES, VNET_HDR_LEN,
};

#[derive(Debug, Arbitrary)]
struct Offloads {
    csum: bool,
    tso4: bool,
    tso6: bool,
    ecn: bool,
}

/// An offset into the frame: any 16-bit value, or counted back from the frame's end.
#[derive(Debug, Arbitrary)]
enum Offset {
    Absolute(u16),
    FromEnd(u8),
}

impl Offset {
    fn resolve(&self, frame_len: usize) -> u16 {
        match *self {
            Offset::Absolute(value) => value,
            Offset::FromEnd(back) => {
                u16::try_from(frame_len.saturating_sub(usize::from(back))).unwrap_or(u16::MAX)
            }
        }
    }
}

/// A frame length: small, near the maximum, or anything up to a little past it.
#[derive(Debug, Arbitrary)]
enum FrameLen {
    Small(u8),
    NearMax(i8),
    Any(u16),
}

impl FrameLen {
    fn resolve(&self) -> usize {
        match *self {
            FrameLen::Small(len) => usize::from(len),
            FrameLen::NearMax(delta) => MAX_FRAME_BYTES.saturating_add_signed(isize::from(delta)),
            FrameLen::Any(len) => usize::from(len) * 2,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Chain {
    /// The bytes the guest put in its TX descriptors; any length.
    Raw(Vec<u8>),
    /// A header built from fields, then `frame_len` frame bytes.
    Built {
        flags: u8,
        gso_type: u8,
        hdr_len: Offset,
        gso_size: u16,
        csum_start: Offset,
        csum_offset: u8,
        num_buffers: u16,
        frame_len: FrameLen,
    },
}

#[derive(Debug, Arbitrary)]
struct Input {
    offloads: Offloads,
    /// A legacy 10-byte header instead of the 12-byte one.
    legacy: bool,
    chain: Chain,
    /// Descriptor shapes `(len, write_only)` of a TX chain.
    descriptors: Vec<(u32, bool)>,
    /// Bytes of an RX header and the `num_buffers` to set in it.
    rx_header: Vec<u8>,
    num_buffers: u16,
    /// A control command and the number of queue pairs.
    ctrl_command: Vec<u8>,
    queue_pairs: u16,
    /// A message header from the peer host's daemon; its frame is `chain`'s bytes.
    peer_header: Vec<u8>,
    /// Whether a guest is attached here, whether we relay, and the features it acked.
    attached: bool,
    relaying: bool,
    acked_features: u64,
}

impl Chain {
    fn bytes(&self, header_len: usize) -> Vec<u8> {
        match self {
            Chain::Raw(bytes) => bytes.clone(),
            Chain::Built {
                flags,
                gso_type,
                hdr_len,
                gso_size,
                csum_start,
                csum_offset,
                num_buffers,
                frame_len,
            } => {
                let frame_len = frame_len.resolve();
                let header = VnetHeader {
                    flags: *flags,
                    gso_type: *gso_type,
                    hdr_len: hdr_len.resolve(frame_len),
                    gso_size: *gso_size,
                    csum_start: csum_start.resolve(frame_len),
                    csum_offset: u16::from(*csum_offset),
                    num_buffers: *num_buffers,
                };
                let mut bytes = header.encode()[..header_len].to_vec();
                bytes.resize(header_len + frame_len, 0x5a);
                bytes
            }
        }
    }
}

/// What the checks must conclude about a header of a frame of `frame_len` bytes, written
/// from the virtio spec's rules rather than from the code.
fn header_acceptable(header: &VnetHeader, frame_len: usize, offloads: &Offloads) -> bool {
    let needs_csum = header.flags & FLAG_NEEDS_CSUM != 0;
    let flags_known = header.flags & !(FLAG_NEEDS_CSUM | FLAG_DATA_VALID) == 0;
    let csum_ok = !needs_csum
        || (offloads.csum
            && u128::from(header.csum_start) + u128::from(header.csum_offset) + 2
                <= frame_len as u128);
    let hdr_len_ok = usize::from(header.hdr_len) <= frame_len;
    let ecn = header.gso_type & GSO_ECN != 0;
    let gso_ok = match header.gso_type & !GSO_ECN {
        GSO_NONE => !ecn,
        base @ (GSO_TCPV4 | GSO_TCPV6) => {
            let negotiated = if base == GSO_TCPV4 {
                offloads.tso4
            } else {
                offloads.tso6
            };
            negotiated && (!ecn || offloads.ecn) && needs_csum && header.gso_size > 0
        }
        _ => false,
    };
    frame_len >= ETH_HLEN && flags_known && csum_ok && hdr_len_ok && gso_ok
}

fn check_frame(input: &Input) {
    let header_len = if input.legacy {
        LEGACY_VNET_HDR_LEN
    } else {
        VNET_HDR_LEN
    };
    let offloads = TxOffloads {
        csum: input.offloads.csum,
        tso4: input.offloads.tso4,
        tso6: input.offloads.tso6,
        ecn: input.offloads.ecn,
    };
    let bytes = input.chain.bytes(header_len);
    let max = header_len + MAX_FRAME_BYTES;
    let verdict = validate_tx(&bytes, header_len, offloads);
    if bytes.len() < header_len {
        assert!(
            matches!(verdict, Err(FrameError::ShortChain { .. })),
            "{verdict:?}"
        );
        return;
    }
    if bytes.len() > max {
        assert!(
            matches!(verdict, Err(FrameError::LongChain { .. })),
            "{verdict:?}"
        );
        return;
    }
    let mut full = bytes[..header_len].to_vec();
    full.resize(VNET_HDR_LEN, 0);
    let header = VnetHeader::parse(&full).expect("10 bytes parse");
    let expected = VnetHeader {
        num_buffers: if input.legacy { 0 } else { header.num_buffers },
        ..header
    };
    let frame_len = bytes.len() - header_len;
    let acceptable = header_acceptable(&expected, frame_len, &input.offloads);
    match verdict {
        Ok(parsed) => {
            assert!(
                acceptable,
                "accepted {parsed:?} for a {frame_len}-byte frame"
            );
            assert_eq!(parsed, expected);
            // What goes to the TAP: NEEDS_CSUM at most, no num_buffers, fields kept.
            let tap = parsed.for_tap();
            assert_eq!(tap.flags & !FLAG_NEEDS_CSUM, 0);
            assert_eq!(tap.num_buffers, 0);
            assert_eq!(VnetHeader::parse(&tap.encode()), Some(tap));
        }
        Err(error) => assert!(!acceptable, "refused an acceptable frame: {error}"),
    }
}

fn check_descriptors(input: &Input) {
    let header_len = if input.legacy {
        LEGACY_VNET_HDR_LEN
    } else {
        VNET_HDR_LEN
    };
    let max = (header_len + MAX_FRAME_BYTES) as u128;
    let lens: Vec<u128> = input
        .descriptors
        .iter()
        .map(|(len, _)| u128::from(*len))
        .collect();
    let prefix = |end: usize| lens[..end].iter().sum::<u128>();
    match check_chain(input.descriptors.iter().copied(), header_len) {
        Ok(total) => {
            assert!(input.descriptors.iter().all(|(_, write_only)| !write_only));
            assert_eq!(total as u128, prefix(lens.len()));
            assert!(total >= header_len && total as u128 <= max);
        }
        Err(FrameError::WriteOnlyDescriptor { index }) => {
            assert!(input.descriptors[index].1);
            assert!(input.descriptors[..index].iter().all(|(_, w)| !w));
            assert!(
                prefix(index) <= max,
                "a long chain must be refused as long first"
            );
        }
        Err(FrameError::LongChain { .. }) => {
            let first_long = (1..=lens.len())
                .find(|&end| prefix(end) > max)
                .expect("some prefix is too long");
            assert!(input.descriptors[..first_long].iter().all(|(_, w)| !w));
        }
        Err(FrameError::ShortChain { len, .. }) => {
            assert!(input.descriptors.iter().all(|(_, w)| !w));
            assert_eq!(u128::from(len), prefix(lens.len()));
            assert!(u128::from(len) < header_len as u128);
        }
        Err(other) => panic!("check_chain returned {other:?}"),
    }
}

fn check_rx_header(input: &Input) {
    let mut header = input.rx_header.clone();
    set_num_buffers(&mut header, input.num_buffers);
    assert_eq!(header.len(), input.rx_header.len());
    if header.len() >= VNET_HDR_LEN {
        assert_eq!(header[10..12], input.num_buffers.to_le_bytes());
        assert_eq!(header[..10], input.rx_header[..10]);
        assert_eq!(header[12..], input.rx_header[12..]);
    } else {
        assert_eq!(header, input.rx_header);
    }
}

fn check_ctrl(input: &Input) {
    let answer = ctrl::answer(&input.ctrl_command, input.queue_pairs);
    assert!(answer.ack == ACK_OK || answer.ack == ACK_ERR);
    match answer.effect {
        Effect::None => {}
        Effect::AnnounceAcked => {
            assert_eq!(answer.ack, ACK_OK);
            assert_eq!(input.ctrl_command.get(..2), Some(&[3u8, 0][..]));
        }
        Effect::QueuePairs(pairs) => {
            assert_eq!(answer.ack, ACK_OK);
            assert!(pairs >= 1 && pairs <= input.queue_pairs);
            assert_eq!(input.ctrl_command.len(), 4);
        }
    }
    if answer.ack == ACK_ERR {
        assert_eq!(answer.effect, Effect::None);
    }
}

fn check_peer(input: &Input) {
    let Ok(message) = postcard::from_bytes::<PeerMessage>(&input.peer_header) else {
        return;
    };
    let direction = match message {
        PeerMessage::Frame(direction) => direction,
        PeerMessage::Frames(direction) => {
            check_batch(input, direction);
            return;
        }
        PeerMessage::State(_) => return,
    };
    let bytes = input.chain.bytes(VNET_HDR_LEN);
    let verdict = check_frame_from_peer(
        direction,
        &bytes,
        input.attached,
        input.relaying,
        input.acked_features,
    );
    match (direction, input.attached) {
        (Direction::ToGuest, false) => assert_eq!(verdict, Err(PeerFrameError::NoGuest)),
        (Direction::ToLan, true) => assert_eq!(verdict, Err(PeerFrameError::NotRelaying)),
        (Direction::ToLan, false) if !input.relaying => {
            assert_eq!(verdict, Err(PeerFrameError::NotRelaying))
        }
        (Direction::ToGuest, true) => {
            let offloads = TxOffloads::guest_receive(input.acked_features);
            let expected = validate_tx(&bytes, VNET_HDR_LEN, offloads);
            assert_eq!(verdict, expected.map_err(PeerFrameError::Frame));
        }
        (Direction::ToLan, false) => {
            let expected = validate_tx(&bytes, VNET_HDR_LEN, TxOffloads::ALL);
            assert_eq!(verdict, expected.map_err(PeerFrameError::Frame));
        }
        (Direction::Handover, _) => {
            let expected = validate_tx(&bytes, VNET_HDR_LEN, TxOffloads::ALL);
            assert_eq!(verdict, expected.map_err(PeerFrameError::Frame));
        }
    }
    // Headers converted for a legacy guest and back keep the frame.
    if bytes.len() >= VNET_HDR_LEN {
        let legacy = convert_header(bytes.clone(), VNET_HDR_LEN, LEGACY_VNET_HDR_LEN);
        assert_eq!(legacy.len(), bytes.len() - 2);
        assert_eq!(legacy[LEGACY_VNET_HDR_LEN..], bytes[VNET_HDR_LEN..]);
    }
}

/// A batch payload splits into frames that exactly tile it, or into whole frames and then
/// one error for the cut-short rest; each frame is checked like a single one.
fn check_batch(input: &Input, direction: Direction) {
    let payload = input.chain.bytes(VNET_HDR_LEN);
    let mut consumed = 0usize;
    let mut failed = false;
    for frame in split_batch(&payload) {
        assert!(!failed, "nothing follows an error");
        match frame {
            Ok(frame) => {
                consumed += BATCH_LENGTH_BYTES + frame.len();
                assert!(consumed <= payload.len());
                assert_eq!(&payload[consumed - frame.len()..consumed], frame);
                let _ = check_frame_from_peer(
                    direction,
                    frame,
                    input.attached,
                    input.relaying,
                    input.acked_features,
                );
            }
            Err(error) => {
                assert_eq!(error.offset, consumed);
                assert_eq!(error.left, payload.len() - consumed);
                assert!(error.needed > error.left);
                failed = true;
            }
        }
    }
    assert!(failed || consumed == payload.len());
}

fuzz_target!(|input: Input| {
    check_frame(&input);
    check_peer(&input);
    check_descriptors(&input);
    check_rx_header(&input);
    check_ctrl(&input);
});
