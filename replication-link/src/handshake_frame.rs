//! Handshake frames. Before a connection has its keys, frames travel in clear, in the framing
//! of every protocol version so far, so that a peer of another version still reads why it is
//! refused:
//!
//! ```text
//! u32 LE body_len | body | 16-byte checksum
//! body     = u16 LE header_len | header (postcard LinkHeader)
//! checksum = BLAKE3-keyed(public key, direction byte || frame counter u64 LE || body)[..16]
//! ```
//!
//! The key is public: the checksum catches damage, not forgery; the handshake's proofs
//! authenticate both sides (see [`crate::handshake`]). A handshake frame is one header and no
//! payload, at most [`HANDSHAKE_MAX_FRAME_BYTES`] long: lengths are checked before anything is
//! allocated, the checksum before the header is decoded. [`decode_handshake_frame`] is pure
//! (fuzz target `frame_decoder`).

use std::io::Read;

use crate::frame::{check_body_length, check_header_length, decode_header, encode_header};
use crate::frame::{read_exact, read_prefix, read_u16_le, split_frame};
use crate::frame::{Direction, FrameError, HEADER_LENGTH_BYTES, LENGTH_PREFIX_BYTES, TAG_BYTES};
use crate::header::{LinkHeader, MAX_HEADER_BYTES};

/// Largest handshake frame body (a header, no payload).
pub const HANDSHAKE_MAX_FRAME_BYTES: usize = HEADER_LENGTH_BYTES + MAX_HEADER_BYTES;

const HANDSHAKE_KEY_CONTEXT: &str = "ftvm replication handshake v1";

/// A handshake frame decoded from a byte slice.
#[derive(Debug)]
pub struct DecodedHandshakeFrame {
    pub header: LinkHeader,
    /// Bytes of the input the frame occupied (prefix + body + checksum).
    pub frame_bytes: usize,
}

/// Decodes the handshake frame at the start of `bytes` (more bytes may follow). `counter` is
/// the number of frames received before this one in `direction` on this connection.
pub fn decode_handshake_frame(
    bytes: &[u8],
    direction: Direction,
    counter: u64,
) -> Result<DecodedHandshakeFrame, FrameError> {
    let parts = split_frame(bytes, HANDSHAKE_MAX_FRAME_BYTES)?;
    Ok(DecodedHandshakeFrame {
        header: open_body(direction, counter, parts.body, parts.tag)?,
        frame_bytes: parts.frame_bytes,
    })
}

/// Encodes one handshake frame (for tests and tools; the handshake has its own).
pub fn encode_handshake_frame(
    header: &LinkHeader,
    direction: Direction,
    counter: u64,
) -> Result<Vec<u8>, FrameError> {
    let header_bytes = encode_header(header, Vec::new())?;
    let mut body = Vec::with_capacity(HEADER_LENGTH_BYTES + header_bytes.len());
    body.extend_from_slice(&(header_bytes.len() as u16).to_le_bytes());
    body.extend_from_slice(&header_bytes);
    Ok(checksum_body(&body, direction, counter))
}

/// Frames an arbitrary body with a valid length prefix and checksum: lets tests and the fuzz
/// target reach the header decoder with malformed bodies.
pub fn checksum_body(body: &[u8], direction: Direction, counter: u64) -> Vec<u8> {
    let mut frame = Vec::with_capacity(LENGTH_PREFIX_BYTES + body.len() + TAG_BYTES);
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(body);
    frame.extend_from_slice(&checksum(direction, counter, body));
    frame
}

fn checksum(direction: Direction, counter: u64, body: &[u8]) -> [u8; TAG_BYTES] {
    let key = blake3::derive_key(HANDSHAKE_KEY_CONTEXT, b"");
    let mut hasher = blake3::Hasher::new_keyed(&key);
    hasher.update(&[direction.byte()]);
    hasher.update(&counter.to_le_bytes());
    hasher.update(body);
    let mut checksum = [0u8; TAG_BYTES];
    hasher.finalize_xof().fill(&mut checksum);
    checksum
}

/// Checks the checksum, then decodes the body's header; the body must hold nothing else.
fn open_body(
    direction: Direction,
    counter: u64,
    body: &[u8],
    received: &[u8],
) -> Result<LinkHeader, FrameError> {
    if checksum(direction, counter, body).as_slice() != received {
        return Err(FrameError::BadTag);
    }
    let (length_field, rest) = body
        .split_at_checked(HEADER_LENGTH_BYTES)
        .ok_or(FrameError::BodyTooShort { length: body.len() })?;
    let header_length = read_u16_le(length_field) as usize;
    check_header_length(header_length, body.len())?;
    let (header_bytes, payload) =
        rest.split_at_checked(header_length)
            .ok_or(FrameError::HeaderOverrun {
                header: header_length,
                body: body.len(),
            })?;
    if !payload.is_empty() {
        return Err(FrameError::HandshakePayload {
            length: payload.len(),
        });
    }
    // A version-2 peer's Hello has no key ids: read it anyway, to refuse it by its version.
    decode_header(header_bytes)
        .or_else(|error| crate::header::decode_legacy_hello(header_bytes).ok_or(error))
}

/// The handshake frames of one connection, both directions, counted.
pub(crate) struct HandshakeFrames {
    sending: Direction,
    receiving: Direction,
    sent: u64,
    received: u64,
    body: Vec<u8>,
}

impl HandshakeFrames {
    pub(crate) fn new(sending: Direction, receiving: Direction) -> Self {
        HandshakeFrames {
            sending,
            receiving,
            sent: 0,
            received: 0,
            body: Vec::with_capacity(HANDSHAKE_MAX_FRAME_BYTES),
        }
    }

    /// Frames received so far.
    pub(crate) fn received(&self) -> u64 {
        self.received
    }

    /// The next frame to send.
    pub(crate) fn encode(&mut self, header: &LinkHeader) -> Result<Vec<u8>, FrameError> {
        let frame = encode_handshake_frame(header, self.sending, self.sent)?;
        self.sent += 1;
        Ok(frame)
    }

    /// Reads the next frame from `input` (byte by byte as it needs them: nothing after the
    /// frame is consumed).
    pub(crate) fn read<R: Read>(&mut self, input: &mut R) -> Result<LinkHeader, FrameError> {
        let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
        read_prefix(input, &mut prefix)?;
        let body_length = u32::from_le_bytes(prefix) as usize;
        check_body_length(body_length, HANDSHAKE_MAX_FRAME_BYTES)?;
        self.body.resize(body_length, 0);
        read_exact(input, &mut self.body)?;
        let mut received = [0u8; TAG_BYTES];
        read_exact(input, &mut received)?;
        let header = open_body(self.receiving, self.received, &self.body, &received)?;
        self.received += 1;
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello_like() -> LinkHeader {
        LinkHeader::Refused {
            reason: "unsupported protocol version".into(),
        }
    }

    /// A version-2 peer (its Hello has no key ids) or version-3 one (no frame protection) is read, so that the handshake can refuse
    /// it by its version instead of as a malformed frame; a current Hello cut short is not.
    #[test]
    fn a_version_2_or_3_hello_is_read_to_be_refused_by_its_version() {
        use crate::header::{LegacyHeader, LegacyHello, LinkLimits};
        let limits = LinkLimits {
            window_messages: 1,
            window_bytes: 1,
            max_frame_bytes: 1,
        };
        let legacy = LegacyHeader::Hello(LegacyHello {
            protocol_version: 2,
            client_id: "host-a".into(),
            service: "blk:x".into(),
            session_id: 5,
            link: 0,
            client_nonce: [9; 32],
            send_base: 0,
            limits,
        });
        let header = postcard::to_allocvec(&legacy).expect("encode");
        let mut body = (header.len() as u16).to_le_bytes().to_vec();
        body.extend_from_slice(&header);
        let direction = Direction::ClientToServer;
        let frame = checksum_body(&body, direction, 0);
        let decoded = decode_handshake_frame(&frame, direction, 0).expect("decoded");
        let LinkHeader::Hello(hello) = decoded.header else {
            panic!("not a hello: {:?}", decoded.header);
        };
        assert_eq!((hello.protocol_version, hello.key_ids.len()), (2, 0));

        // Version 3: key ids, no frame protection.
        let LegacyHeader::Hello(mut v3) =
            postcard::from_bytes::<LegacyHeader>(&header[..]).expect("decode");
        v3.protocol_version = 3;
        let key_ids = vec![crate::psk::KeyId([4; crate::psk::KEY_ID_BYTES])];
        let v3 = crate::header::LegacyHeaderV3::Hello(v3, key_ids.clone());
        let v3_header = postcard::to_allocvec(&v3).expect("encode");
        let mut body = (v3_header.len() as u16).to_le_bytes().to_vec();
        body.extend_from_slice(&v3_header);
        let frame = checksum_body(&body, direction, 0);
        let decoded = decode_handshake_frame(&frame, direction, 0).expect("decoded");
        let LinkHeader::Hello(hello) = decoded.header else {
            panic!("not a hello: {:?}", decoded.header);
        };
        assert_eq!((hello.protocol_version, hello.key_ids), (3, key_ids));

        let LegacyHeader::Hello(mut current) = legacy;
        current.protocol_version = crate::header::PROTOCOL_VERSION;
        let header = postcard::to_allocvec(&LegacyHeader::Hello(current)).expect("encode");
        let mut body = (header.len() as u16).to_le_bytes().to_vec();
        body.extend_from_slice(&header);
        let frame = checksum_body(&body, direction, 0);
        assert!(decode_handshake_frame(&frame, direction, 0).is_err());
    }

    #[test]
    fn slice_and_stream_decoders_agree() {
        let direction = Direction::ServerToClient;
        let mut frames = HandshakeFrames::new(direction, direction);
        let mut stream = Vec::new();
        for _ in 0..3 {
            stream.extend(frames.encode(&hello_like()).expect("encode"));
        }
        let mut rest = stream.as_slice();
        let mut input = stream.as_slice();
        for counter in 0..3 {
            let decoded = decode_handshake_frame(rest, direction, counter).expect("decode");
            assert_eq!(decoded.header, hello_like());
            rest = rest.get(decoded.frame_bytes..).expect("more");
            assert_eq!(frames.read(&mut input).expect("read"), hello_like());
        }
        assert!(rest.is_empty());
        assert!(matches!(frames.read(&mut input), Err(FrameError::Closed)));
    }

    #[test]
    fn damage_wrong_counter_or_direction_fails_the_checksum() {
        let frame =
            encode_handshake_frame(&hello_like(), Direction::ClientToServer, 0).expect("encode");
        for index in 0..frame.len() {
            let mut damaged = frame.clone();
            if let Some(byte) = damaged.get_mut(index) {
                *byte ^= 0x10;
            }
            let result = decode_handshake_frame(&damaged, Direction::ClientToServer, 0);
            assert!(result.is_err(), "flip at byte {index} passed");
        }
        for (direction, counter) in [
            (Direction::ClientToServer, 1),
            (Direction::ServerToClient, 0),
        ] {
            let result = decode_handshake_frame(&frame, direction, counter);
            assert!(matches!(result, Err(FrameError::BadTag)), "{result:?}");
        }
    }

    #[test]
    fn payloads_oversized_and_malformed_bodies_are_refused() {
        let mut with_payload = 2u16.to_le_bytes().to_vec();
        with_payload.extend_from_slice(&[5, 7, 0xaa]); // an Ack, then a payload byte
        type Expected = fn(&FrameError) -> bool;
        let cases: [(&[u8], Expected); 4] = [
            (&with_payload, |error| {
                matches!(error, FrameError::HandshakePayload { length: 1 })
            }),
            (&[], |error| {
                matches!(error, FrameError::BodyTooShort { .. })
            }),
            (&[0xff, 0xff], |error| {
                matches!(error, FrameError::HeaderTooLarge { .. })
            }),
            (&[10, 0, 1], |error| {
                matches!(error, FrameError::HeaderOverrun { .. })
            }),
        ];
        for (body, expected) in cases {
            let frame = checksum_body(body, Direction::ClientToServer, 0);
            let error =
                decode_handshake_frame(&frame, Direction::ClientToServer, 0).expect_err("refused");
            assert!(expected(&error), "{body:?}: {error:?}");
        }
        let mut huge = ((HANDSHAKE_MAX_FRAME_BYTES + 1) as u32)
            .to_le_bytes()
            .to_vec();
        huge.extend_from_slice(&[0; 64]);
        let mut frames = HandshakeFrames::new(Direction::ClientToServer, Direction::ClientToServer);
        assert!(matches!(
            frames.read(&mut huge.as_slice()),
            Err(FrameError::TooLarge { .. })
        ));
    }
}
