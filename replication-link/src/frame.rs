//! Frames on the wire: `u32 LE body_len | body | 16-byte tag`, with
//! `body = u16 LE header_len | header (postcard LinkHeader) | payload (raw bytes)` and
//! `tag = keyed_hash(key, direction byte || counter u64 LE || body)[..16]`.
//!
//! Lengths are checked against their limits before anything is allocated; the tag is checked
//! before the header is decoded. [`decode_frame`] is pure (fuzz target `frame_decoder`);
//! `FrameOpener` and `FrameSealer` (crate-internal) do the same on a byte stream.

use std::fmt;
use std::io::{self, Read, Write};

use crate::header::{LinkHeader, MAX_HEADER_BYTES};

/// Bytes of the body length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;
/// Bytes of the header length field at the start of the body.
pub const HEADER_LENGTH_BYTES: usize = 2;
/// Bytes of the MAC tag after the body.
pub const TAG_BYTES: usize = 16;
/// Largest frame body during the handshake (a header, no payload).
pub const HANDSHAKE_MAX_FRAME_BYTES: usize = HEADER_LENGTH_BYTES + MAX_HEADER_BYTES;

const HANDSHAKE_KEY_CONTEXT: &str = "ftvm replication handshake v1";

/// Which way a frame travels; part of the MAC input, so a frame cannot be reflected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

impl Direction {
    fn byte(self) -> u8 {
        match self {
            Direction::ClientToServer => 0,
            Direction::ServerToClient => 1,
        }
    }
}

/// A frame MAC key. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct FrameKey([u8; 32]);

impl FrameKey {
    /// The public key of handshake frames: their tag is a checksum only; the handshake itself
    /// authenticates both sides.
    pub fn handshake() -> FrameKey {
        FrameKey(blake3::derive_key(HANDSHAKE_KEY_CONTEXT, b""))
    }

    pub fn from_bytes(key: [u8; 32]) -> FrameKey {
        FrameKey(key)
    }
}

impl fmt::Debug for FrameKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("FrameKey(<redacted>)")
    }
}

/// Errors of this module. Every one of them ends the connection it happened on.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame body of {length} bytes exceeds the limit of {limit}")]
    TooLarge { length: usize, limit: usize },
    #[error("frame body of {length} bytes is shorter than its header length field")]
    BodyTooShort { length: usize },
    #[error("frame header of {length} bytes exceeds the limit of {limit}")]
    HeaderTooLarge { length: usize, limit: usize },
    #[error("frame header of {header} bytes overruns the body of {body} bytes")]
    HeaderOverrun { header: usize, body: usize },
    #[error("frame truncated: {needed} bytes needed, {available} available")]
    Truncated { needed: usize, available: usize },
    #[error("frame failed its integrity check (tampered, replayed or wrong key)")]
    BadTag,
    #[error("cannot decode frame header")]
    Decode(#[source] postcard::Error),
    #[error("frame header has {extra} trailing bytes")]
    TrailingHeaderBytes { extra: usize },
    #[error("cannot encode frame header")]
    Encode(#[source] postcard::Error),
    #[error("connection closed by the peer")]
    Closed,
    #[error("connection I/O failed")]
    Io(#[source] io::Error),
}

impl FrameError {
    /// True when a read timed out (the peer went silent).
    pub fn is_timeout(&self) -> bool {
        matches!(self, FrameError::Io(error)
            if matches!(error.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock))
    }
}

/// A frame decoded from a byte slice.
#[derive(Debug)]
pub struct DecodedFrame<'a> {
    pub header: LinkHeader,
    pub payload: &'a [u8],
    /// Bytes of `bytes` the frame occupied (prefix + body + tag).
    pub frame_bytes: usize,
}

/// Decodes the frame at the start of `bytes` (more bytes may follow). `counter` is the number
/// of frames received before this one in `direction` on this connection.
pub fn decode_frame<'a>(
    bytes: &'a [u8],
    key: &FrameKey,
    direction: Direction,
    counter: u64,
    max_frame_bytes: usize,
) -> Result<DecodedFrame<'a>, FrameError> {
    let prefix = bytes
        .get(..LENGTH_PREFIX_BYTES)
        .ok_or(FrameError::Truncated {
            needed: LENGTH_PREFIX_BYTES,
            available: bytes.len(),
        })?;
    let body_length = read_u32_le(prefix) as usize;
    check_body_length(body_length, max_frame_bytes)?;
    let frame_bytes = LENGTH_PREFIX_BYTES + body_length + TAG_BYTES;
    let frame = bytes.get(..frame_bytes).ok_or(FrameError::Truncated {
        needed: frame_bytes,
        available: bytes.len(),
    })?;
    let (body, tag) = frame
        .get(LENGTH_PREFIX_BYTES..)
        .and_then(|rest| rest.split_at_checked(body_length))
        .ok_or(FrameError::Truncated {
            needed: frame_bytes,
            available: bytes.len(),
        })?;
    let (length_field, rest) =
        body.split_at_checked(HEADER_LENGTH_BYTES)
            .ok_or(FrameError::BodyTooShort {
                length: body_length,
            })?;
    let header_length = read_u16_le(length_field) as usize;
    check_header_length(header_length, body_length)?;
    let (header_bytes, payload) =
        rest.split_at_checked(header_length)
            .ok_or(FrameError::HeaderOverrun {
                header: header_length,
                body: body_length,
            })?;
    let expected = compute_tag(key, direction, counter, &[body]);
    if !tags_equal(&expected, tag) {
        return Err(FrameError::BadTag);
    }
    Ok(DecodedFrame {
        header: decode_header(header_bytes)?,
        payload,
        frame_bytes,
    })
}

/// Encodes one frame (for tests, tools and fuzzing; daemons use the session).
pub fn encode_frame(
    header: &LinkHeader,
    payload: &[u8],
    key: &FrameKey,
    direction: Direction,
    counter: u64,
) -> Result<Vec<u8>, FrameError> {
    let header_bytes = encode_header(header, Vec::new())?;
    let mut body = Vec::with_capacity(HEADER_LENGTH_BYTES + header_bytes.len() + payload.len());
    body.extend_from_slice(&(header_bytes.len() as u16).to_le_bytes());
    body.extend_from_slice(&header_bytes);
    body.extend_from_slice(payload);
    Ok(seal_body(&body, key, direction, counter))
}

/// Frames an arbitrary body with a valid length prefix and tag: lets tests and the fuzz target
/// reach the header decoder with malformed bodies.
pub fn seal_body(body: &[u8], key: &FrameKey, direction: Direction, counter: u64) -> Vec<u8> {
    let mut frame = Vec::with_capacity(LENGTH_PREFIX_BYTES + body.len() + TAG_BYTES);
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(body);
    frame.extend_from_slice(&compute_tag(key, direction, counter, &[body]));
    frame
}

fn check_body_length(body_length: usize, max_frame_bytes: usize) -> Result<(), FrameError> {
    if body_length > max_frame_bytes {
        return Err(FrameError::TooLarge {
            length: body_length,
            limit: max_frame_bytes,
        });
    }
    if body_length < HEADER_LENGTH_BYTES {
        return Err(FrameError::BodyTooShort {
            length: body_length,
        });
    }
    Ok(())
}

fn check_header_length(header_length: usize, body_length: usize) -> Result<(), FrameError> {
    if header_length > MAX_HEADER_BYTES {
        return Err(FrameError::HeaderTooLarge {
            length: header_length,
            limit: MAX_HEADER_BYTES,
        });
    }
    if header_length > body_length - HEADER_LENGTH_BYTES {
        return Err(FrameError::HeaderOverrun {
            header: header_length,
            body: body_length,
        });
    }
    Ok(())
}

fn compute_tag(
    key: &FrameKey,
    direction: Direction,
    counter: u64,
    body_parts: &[&[u8]],
) -> [u8; TAG_BYTES] {
    let mut hasher = blake3::Hasher::new_keyed(&key.0);
    hasher.update(&[direction.byte()]);
    hasher.update(&counter.to_le_bytes());
    for part in body_parts {
        hasher.update(part);
    }
    let mut tag = [0u8; TAG_BYTES];
    hasher.finalize_xof().fill(&mut tag);
    tag
}

/// Constant-time comparison.
fn tags_equal(expected: &[u8; TAG_BYTES], received: &[u8]) -> bool {
    if received.len() != TAG_BYTES {
        return false;
    }
    let difference = expected
        .iter()
        .zip(received)
        .fold(0u8, |accumulated, (a, b)| accumulated | (a ^ b));
    difference == 0
}

fn decode_header(bytes: &[u8]) -> Result<LinkHeader, FrameError> {
    let (header, rest) =
        postcard::take_from_bytes::<LinkHeader>(bytes).map_err(FrameError::Decode)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingHeaderBytes { extra: rest.len() });
    }
    Ok(header)
}

fn encode_header(header: &LinkHeader, buffer: Vec<u8>) -> Result<Vec<u8>, FrameError> {
    let bytes = postcard::to_extend(header, buffer).map_err(FrameError::Encode)?;
    if bytes.len() > MAX_HEADER_BYTES {
        return Err(FrameError::HeaderTooLarge {
            length: bytes.len(),
            limit: MAX_HEADER_BYTES,
        });
    }
    Ok(bytes)
}

fn read_u32_le(bytes: &[u8]) -> u32 {
    let mut array = [0u8; 4];
    for (target, source) in array.iter_mut().zip(bytes) {
        *target = *source;
    }
    u32::from_le_bytes(array)
}

fn read_u16_le(bytes: &[u8]) -> u16 {
    let mut array = [0u8; 2];
    for (target, source) in array.iter_mut().zip(bytes) {
        *target = *source;
    }
    u16::from_le_bytes(array)
}

/// A frame read from a stream.
#[derive(Debug)]
pub(crate) struct ReadFrame {
    pub(crate) header: LinkHeader,
    pub(crate) payload: Vec<u8>,
    pub(crate) frame_bytes: usize,
}

/// Reads and checks the frames of one direction of a connection, counting them.
pub(crate) struct FrameOpener {
    key: FrameKey,
    direction: Direction,
    counter: u64,
    max_frame_bytes: usize,
    header_buffer: Vec<u8>,
}

impl FrameOpener {
    pub(crate) fn new(key: FrameKey, direction: Direction, max_frame_bytes: usize) -> Self {
        FrameOpener {
            key,
            direction,
            counter: 0,
            max_frame_bytes,
            header_buffer: Vec::with_capacity(MAX_HEADER_BYTES),
        }
    }

    /// Frames read so far; the next handshake stage continues from here.
    pub(crate) fn counter(&self) -> u64 {
        self.counter
    }

    pub(crate) fn read_frame<R: Read>(&mut self, input: &mut R) -> Result<ReadFrame, FrameError> {
        let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
        read_prefix(input, &mut prefix)?;
        let body_length = u32::from_le_bytes(prefix) as usize;
        check_body_length(body_length, self.max_frame_bytes)?;
        let mut length_field = [0u8; HEADER_LENGTH_BYTES];
        read_exact(input, &mut length_field)?;
        let header_length = u16::from_le_bytes(length_field) as usize;
        check_header_length(header_length, body_length)?;
        self.header_buffer.resize(header_length, 0);
        read_exact(input, &mut self.header_buffer)?;
        // Bounded by max_frame_bytes, checked above.
        let mut payload = vec![0u8; body_length - HEADER_LENGTH_BYTES - header_length];
        read_exact(input, &mut payload)?;
        let mut tag = [0u8; TAG_BYTES];
        read_exact(input, &mut tag)?;
        let parts: [&[u8]; 3] = [&length_field, &self.header_buffer, &payload];
        let expected = compute_tag(&self.key, self.direction, self.counter, &parts);
        if !tags_equal(&expected, &tag) {
            return Err(FrameError::BadTag);
        }
        let header = decode_header(&self.header_buffer)?;
        self.counter += 1;
        Ok(ReadFrame {
            header,
            payload,
            frame_bytes: LENGTH_PREFIX_BYTES + body_length + TAG_BYTES,
        })
    }
}

/// Writes the frames of one direction of a connection, counting them.
pub(crate) struct FrameSealer {
    key: FrameKey,
    direction: Direction,
    counter: u64,
    max_frame_bytes: usize,
    header_buffer: Vec<u8>,
}

impl FrameSealer {
    pub(crate) fn new(key: FrameKey, direction: Direction, max_frame_bytes: usize) -> Self {
        FrameSealer {
            key,
            direction,
            counter: 0,
            max_frame_bytes,
            header_buffer: Vec::with_capacity(MAX_HEADER_BYTES),
        }
    }

    /// Writes one frame to `output` (buffer it: the frame is written in pieces). Returns the
    /// frame's size in bytes.
    pub(crate) fn write_frame<W: Write>(
        &mut self,
        output: &mut W,
        header: &LinkHeader,
        payload: &[u8],
    ) -> Result<usize, FrameError> {
        let mut buffer = std::mem::take(&mut self.header_buffer);
        buffer.clear();
        let header_bytes = encode_header(header, buffer)?;
        let body_length = HEADER_LENGTH_BYTES + header_bytes.len() + payload.len();
        if body_length > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                length: body_length,
                limit: self.max_frame_bytes,
            });
        }
        let length_field = (header_bytes.len() as u16).to_le_bytes();
        let parts: [&[u8]; 3] = [&length_field, &header_bytes, payload];
        let tag = compute_tag(&self.key, self.direction, self.counter, &parts);
        let pieces: [&[u8]; 5] = [
            &(body_length as u32).to_le_bytes(),
            &length_field,
            &header_bytes,
            payload,
            &tag,
        ];
        for piece in pieces {
            output.write_all(piece).map_err(FrameError::Io)?;
        }
        self.header_buffer = header_bytes;
        self.counter += 1;
        Ok(LENGTH_PREFIX_BYTES + body_length + TAG_BYTES)
    }
}

/// Reads the length prefix; a clean end of stream before it is `Closed`.
fn read_prefix<R: Read>(input: &mut R, prefix: &mut [u8]) -> Result<(), FrameError> {
    let mut filled = 0;
    while let Some(rest) = prefix.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        match input.read(rest) {
            Ok(0) if filled == 0 => return Err(FrameError::Closed),
            Ok(0) => {
                return Err(FrameError::Truncated {
                    needed: LENGTH_PREFIX_BYTES,
                    available: filled,
                })
            }
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(FrameError::Io(error)),
        }
    }
    Ok(())
}

fn read_exact<R: Read>(input: &mut R, buffer: &mut [u8]) -> Result<(), FrameError> {
    input.read_exact(buffer).map_err(|error| {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Truncated {
                needed: buffer.len(),
                available: 0,
            }
        } else {
            FrameError::Io(error)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> FrameKey {
        FrameKey::from_bytes([7; 32])
    }

    fn data_header(seq: u64) -> LinkHeader {
        LinkHeader::Data {
            session_seq: seq,
            payload_crc32c: 1,
            ack_up_to: 0,
            app_header: vec![1, 2, 3],
        }
    }

    #[test]
    fn slice_and_stream_decoders_agree() {
        let direction = Direction::ClientToServer;
        let mut stream = Vec::new();
        let mut sealer = FrameSealer::new(key(), direction, 1 << 20);
        for seq in 0..3u64 {
            sealer
                .write_frame(&mut stream, &data_header(seq), &[seq as u8; 100])
                .expect("write");
        }
        let first = encode_frame(&data_header(0), &[0; 100], &key(), direction, 0).expect("encode");
        assert_eq!(stream.get(..first.len()), Some(first.as_slice()));

        let mut rest = stream.as_slice();
        let mut opener = FrameOpener::new(key(), direction, 1 << 20);
        let mut input = stream.as_slice();
        for seq in 0..3u64 {
            let decoded = decode_frame(rest, &key(), direction, seq, 1 << 20).expect("decode");
            assert_eq!(decoded.header, data_header(seq));
            assert_eq!(decoded.payload, &[seq as u8; 100]);
            rest = rest.get(decoded.frame_bytes..).expect("more");
            let read = opener.read_frame(&mut input).expect("read");
            assert_eq!(read.header, data_header(seq));
            assert_eq!(read.payload, vec![seq as u8; 100]);
        }
        assert!(rest.is_empty());
        assert!(matches!(
            opener.read_frame(&mut input),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn wrong_counter_direction_or_key_fails_the_tag() {
        let frame = encode_frame(&data_header(1), b"x", &key(), Direction::ClientToServer, 5)
            .expect("encode");
        let decode = |key: &FrameKey, direction, counter| {
            decode_frame(&frame, key, direction, counter, 1 << 20).map(|_| ())
        };
        decode(&key(), Direction::ClientToServer, 5).expect("genuine");
        assert!(matches!(
            decode(&key(), Direction::ClientToServer, 4),
            Err(FrameError::BadTag)
        ));
        assert!(matches!(
            decode(&key(), Direction::ServerToClient, 5),
            Err(FrameError::BadTag)
        ));
        let other = FrameKey::from_bytes([8; 32]);
        assert!(matches!(
            decode(&other, Direction::ClientToServer, 5),
            Err(FrameError::BadTag)
        ));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let frame = encode_frame(
            &data_header(1),
            b"payload",
            &key(),
            Direction::ClientToServer,
            0,
        )
        .expect("encode");
        for index in 0..frame.len() {
            for bit in 0..8 {
                let mut damaged = frame.clone();
                if let Some(byte) = damaged.get_mut(index) {
                    *byte ^= 1 << bit;
                }
                let result = decode_frame(&damaged, &key(), Direction::ClientToServer, 0, 1 << 20);
                assert!(result.is_err(), "flip at byte {index} bit {bit} passed");
            }
        }
    }

    #[test]
    fn oversized_and_truncated_frames_are_refused() {
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 32]);
        assert!(matches!(
            decode_frame(&huge, &key(), Direction::ClientToServer, 0, 1 << 20),
            Err(FrameError::TooLarge { .. })
        ));
        let mut opener = FrameOpener::new(key(), Direction::ClientToServer, 1 << 20);
        assert!(matches!(
            opener.read_frame(&mut huge.as_slice()),
            Err(FrameError::TooLarge { .. })
        ));

        let frame = encode_frame(
            &data_header(1),
            &[9; 50],
            &key(),
            Direction::ClientToServer,
            0,
        )
        .expect("encode");
        for length in 0..frame.len() {
            let cut = frame.get(..length).expect("prefix");
            assert!(matches!(
                decode_frame(cut, &key(), Direction::ClientToServer, 0, 1 << 20),
                Err(FrameError::Truncated { .. })
            ));
            let mut opener = FrameOpener::new(key(), Direction::ClientToServer, 1 << 20);
            let result = opener.read_frame(&mut &cut[..]);
            if length == 0 {
                assert!(matches!(result, Err(FrameError::Closed)));
            } else {
                assert!(
                    matches!(result, Err(FrameError::Truncated { .. })),
                    "{length}"
                );
            }
        }
    }

    #[test]
    fn malformed_authenticated_bodies_are_errors() {
        let cases: [&[u8]; 5] = [
            &[],              // shorter than the header length field
            &[0xff, 0xff],    // header length above the limit
            &[10, 0, 1],      // header overruns the body
            &[1, 0, 200],     // unknown variant
            &[3, 0, 5, 7, 0], // valid Ack with a trailing byte
        ];
        for body in cases {
            let frame = seal_body(body, &key(), Direction::ClientToServer, 0);
            let result = decode_frame(&frame, &key(), Direction::ClientToServer, 0, 1 << 20);
            assert!(result.is_err(), "{body:?} decoded");
        }
        let ack = seal_body(&[2, 0, 5, 7], &key(), Direction::ClientToServer, 0);
        let decoded =
            decode_frame(&ack, &key(), Direction::ClientToServer, 0, 1 << 20).expect("ack");
        assert_eq!(decoded.header, LinkHeader::Ack { up_to: 7 });
    }

    /// A deterministic stand-in for the fuzz target, run on every `cargo test`.
    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let length = (next() % 300) as usize;
            let mut bytes: Vec<u8> = (0..length).map(|_| next() as u8).collect();
            if let Some(first) = bytes.get_mut(..4) {
                // Small length prefixes reach further than random 32-bit ones.
                first.copy_from_slice(&((next() % 320) as u32).to_le_bytes());
            }
            let _ = decode_frame(&bytes, &key(), Direction::ClientToServer, 0, 1 << 20);
            let sealed = seal_body(&bytes, &key(), Direction::ClientToServer, 0);
            let _ = decode_frame(&sealed, &key(), Direction::ClientToServer, 0, 1 << 20);
            let mut opener = FrameOpener::new(key(), Direction::ClientToServer, 1 << 20);
            let _ = opener.read_frame(&mut sealed.as_slice());
        }
    }

    #[test]
    fn sealer_refuses_frames_above_the_limit() {
        let mut sealer = FrameSealer::new(key(), Direction::ClientToServer, 100);
        let mut output = Vec::new();
        let result = sealer.write_frame(&mut output, &data_header(1), &[0; 200]);
        assert!(matches!(result, Err(FrameError::TooLarge { .. })));
        assert!(output.is_empty());
    }
}
