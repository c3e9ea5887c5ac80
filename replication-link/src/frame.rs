//! Frames on the wire after the handshake, sealed with AES-256-GCM (`ring`'s, whose assembly
//! uses AES-NI and carry-less multiplication where the CPU has them):
//!
//! ```text
//! u32 LE body_len | AES-256-GCM(key of the direction, nonce, aad = the 4 prefix bytes, body) | 16-byte tag
//! body  = payload (raw bytes) || header (postcard LinkHeader) || u16 LE header_len
//! nonce = direction byte || 3 zero bytes || frame counter u64 LE
//! ```
//!
//! With encryption off ([`FrameProtection::AuthenticatedOnly`], both ends configured so, agreed
//! in the handshake) the body travels in clear and the tag is AES-256-GCM's over nothing, with
//! the body as the additional data (GMAC): `u32 LE body_len | body | tag`. The tag covers the
//! body's length as well (GCM hashes the length of the additional data), so the prefix is
//! authenticated as in the encrypted form; same keys, nonces and checks otherwise. Such a
//! connection's keys differ from an encrypted one's (the mode is in the handshake transcript
//! they are derived from).
//!
//! Each direction of a connection has its own key (`ConnectionKeys`, derived by the
//! handshake), and the frame counter (frames sent before this one in that direction on that
//! connection) is never sent: a tampered, forged, replayed, reordered, dropped or reflected
//! frame fails its tag, and nothing of it is decoded or delivered. The header travels at the
//! end of the body so that the reader decrypts the body where it landed and keeps the front
//! of that buffer as the payload, without moving it.
//!
//! The length prefix is checked against its limit before anything is allocated, the tag before
//! anything of the body is decoded or delivered. [`decode_frame`] is pure (fuzz target `frame_decoder`);
//! `FrameOpener` and `FrameSealer` (crate-internal) do the same on a byte stream. Handshake
//! frames, before the keys exist, are [`crate::handshake_frame`]'s.

use std::fmt;
use std::io::{self, Read};

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM, NONCE_LEN};

pub use crate::header::FrameProtection;
use crate::header::{LinkHeader, MAX_HEADER_BYTES};

/// Bytes of the body length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;
/// Bytes of the header length field in the body.
pub const HEADER_LENGTH_BYTES: usize = 2;
/// Bytes of the authentication tag after the body.
pub const TAG_BYTES: usize = 16;
/// Bytes a frame adds to its encoded header and payload.
pub const FRAME_OVERHEAD_BYTES: usize = LENGTH_PREFIX_BYTES + HEADER_LENGTH_BYTES + TAG_BYTES;

/// Which way a frame travels. Each direction has its own key, and the direction is part of
/// the nonce as well, so a frame cannot be reflected back to its sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

impl Direction {
    pub(crate) fn byte(self) -> u8 {
        match self {
            Direction::ClientToServer => 0,
            Direction::ServerToClient => 1,
        }
    }
}

/// The AES-256-GCM key of one direction of one connection, and how it protects the frames.
/// `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct FrameKey {
    key: [u8; 32],
    protection: FrameProtection,
}

impl FrameKey {
    /// A key that encrypts ([`FrameProtection::Encrypted`]).
    pub fn from_bytes(key: [u8; 32]) -> FrameKey {
        FrameKey {
            key,
            protection: FrameProtection::Encrypted,
        }
    }

    /// The same key protecting frames as `protection` says.
    pub fn with_protection(self, protection: FrameProtection) -> FrameKey {
        FrameKey { protection, ..self }
    }

    pub fn protection(&self) -> FrameProtection {
        self.protection
    }

    fn cipher(&self) -> FrameCipher {
        let key = UnboundKey::new(&AES_256_GCM, &self.key);
        FrameCipher {
            key: LessSafeKey::new(key.expect("AES-256-GCM takes a 32-byte key")),
            protection: self.protection,
        }
    }
}

impl fmt::Debug for FrameKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "FrameKey(<redacted>, {:?})", self.protection)
    }
}

/// A direction's expanded key and its protection.
struct FrameCipher {
    key: LessSafeKey,
    protection: FrameProtection,
}

/// The two keys of one connection, one per direction, derived from its handshake (see
/// [`crate::handshake`]): fresh on every connection, so a new connection starting its frame
/// counters at 0 never repeats a key and nonce pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionKeys {
    client_to_server: FrameKey,
    server_to_client: FrameKey,
}

impl ConnectionKeys {
    pub fn new(client_to_server: FrameKey, server_to_client: FrameKey) -> ConnectionKeys {
        ConnectionKeys {
            client_to_server,
            server_to_client,
        }
    }

    /// Both keys protecting frames as `protection` says.
    pub fn with_protection(self, protection: FrameProtection) -> ConnectionKeys {
        ConnectionKeys {
            client_to_server: self.client_to_server.with_protection(protection),
            server_to_client: self.server_to_client.with_protection(protection),
        }
    }

    pub fn protection(&self) -> FrameProtection {
        self.client_to_server.protection
    }

    /// The key of the frames travelling in `direction`.
    pub fn key(&self, direction: Direction) -> &FrameKey {
        match direction {
            Direction::ClientToServer => &self.client_to_server,
            Direction::ServerToClient => &self.server_to_client,
        }
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
    #[error("frame failed its integrity check (tampered, replayed, reordered or wrong key)")]
    BadTag,
    #[error("handshake frame carries a payload of {length} bytes")]
    HandshakePayload { length: usize },
    #[error("frame counter exhausted: the connection must be replaced")]
    CounterExhausted,
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
pub struct DecodedFrame {
    pub header: LinkHeader,
    pub payload: Vec<u8>,
    /// Bytes of the input the frame occupied (prefix + body + tag).
    pub frame_bytes: usize,
}

/// Decodes the frame at the start of `bytes` (more bytes may follow). `counter` is the number
/// of frames received before this one in `direction` on this connection.
pub fn decode_frame(
    bytes: &[u8],
    key: &FrameKey,
    direction: Direction,
    counter: u64,
    max_frame_bytes: usize,
) -> Result<DecodedFrame, FrameError> {
    let parts = split_frame(bytes, max_frame_bytes)?;
    let mut body = parts.body.to_vec();
    let cipher = key.cipher();
    open_body(
        &cipher,
        direction,
        counter,
        parts.prefix,
        &mut body,
        parts.tag,
    )?;
    let header = split_body(&mut body)?;
    Ok(DecodedFrame {
        header,
        payload: body,
        frame_bytes: parts.frame_bytes,
    })
}

/// The pieces of the frame at the start of a byte slice.
pub(crate) struct FrameParts<'a> {
    pub(crate) prefix: &'a [u8],
    pub(crate) body: &'a [u8],
    pub(crate) tag: &'a [u8],
    /// Bytes the frame occupies (prefix + body + tag).
    pub(crate) frame_bytes: usize,
}

/// Splits the frame at the start of `bytes` (more bytes may follow), its body length checked
/// against `max_frame_bytes` first.
pub(crate) fn split_frame(
    bytes: &[u8],
    max_frame_bytes: usize,
) -> Result<FrameParts<'_>, FrameError> {
    let prefix = bytes
        .get(..LENGTH_PREFIX_BYTES)
        .ok_or(FrameError::Truncated {
            needed: LENGTH_PREFIX_BYTES,
            available: bytes.len(),
        })?;
    let body_length = read_u32_le(prefix) as usize;
    check_body_length(body_length, max_frame_bytes)?;
    let frame_bytes = LENGTH_PREFIX_BYTES + body_length + TAG_BYTES;
    let (body, tag) = bytes
        .get(LENGTH_PREFIX_BYTES..frame_bytes)
        .and_then(|rest| rest.split_at_checked(body_length))
        .ok_or(FrameError::Truncated {
            needed: frame_bytes,
            available: bytes.len(),
        })?;
    Ok(FrameParts {
        prefix,
        body,
        tag,
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
    let mut sealer = FrameSealer {
        cipher: key.cipher(),
        direction,
        counter,
        max_frame_bytes: u32::MAX as usize,
        header_buffer: Vec::new(),
    };
    let mut frame = Vec::new();
    sealer.write_frame(&mut frame, header, payload)?;
    Ok(frame)
}

/// Seals an arbitrary body with a valid length prefix and tag: lets tests and the fuzz target
/// reach the body decoder with malformed bodies.
pub fn seal_body(
    body: &[u8],
    key: &FrameKey,
    direction: Direction,
    counter: u64,
) -> Result<Vec<u8>, FrameError> {
    let length = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
        length: body.len(),
        limit: u32::MAX as usize,
    })?;
    let mut frame = Vec::with_capacity(LENGTH_PREFIX_BYTES + body.len() + TAG_BYTES);
    frame.extend_from_slice(&length.to_le_bytes());
    frame.extend_from_slice(body);
    seal_in_place(&key.cipher(), direction, counter, &mut frame, 0)?;
    Ok(frame)
}

/// Encrypts the body of the frame starting at `start` in `frame` (its prefix written, its body
/// following to the end) and appends the tag.
fn seal_in_place(
    cipher: &FrameCipher,
    direction: Direction,
    counter: u64,
    frame: &mut Vec<u8>,
    start: usize,
) -> Result<(), FrameError> {
    let body_start = start + LENGTH_PREFIX_BYTES;
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
    if let Some(written) = frame.get(start..body_start) {
        prefix.copy_from_slice(written);
    }
    let nonce = nonce(direction, counter);
    let body_length = frame.len().saturating_sub(body_start);
    // Fails only for a body above 64 GiB; bodies are limited to `u32`.
    let sealed = match cipher.protection {
        FrameProtection::Encrypted => {
            let body = frame.get_mut(body_start..).unwrap_or_default();
            cipher
                .key
                .seal_in_place_separate_tag(nonce, Aad::from(prefix), body)
        }
        FrameProtection::AuthenticatedOnly => {
            let body = frame.get(body_start..).unwrap_or_default();
            cipher
                .key
                .seal_in_place_separate_tag(nonce, Aad::from(body), &mut [])
        }
    };
    match sealed {
        Ok(tag) => {
            frame.extend_from_slice(tag.as_ref());
            Ok(())
        }
        Err(_) => {
            frame.truncate(start);
            Err(FrameError::TooLarge {
                length: body_length,
                limit: u32::MAX as usize,
            })
        }
    }
}

/// Checks the tag of a sealed body and decrypts it in place. On failure nothing of `body` may
/// be used (it may be partly decrypted).
fn open_body(
    cipher: &FrameCipher,
    direction: Direction,
    counter: u64,
    prefix: &[u8],
    body: &mut [u8],
    tag: &[u8],
) -> Result<(), FrameError> {
    let tag = Tag::try_from(tag).map_err(|_| FrameError::BadTag)?;
    let nonce = nonce(direction, counter);
    let opened = match cipher.protection {
        FrameProtection::Encrypted => {
            cipher
                .key
                .open_in_place_separate_tag(nonce, Aad::from(prefix), tag, body, 0..)
        }
        FrameProtection::AuthenticatedOnly => {
            cipher
                .key
                .open_in_place_separate_tag(nonce, Aad::from(&*body), tag, &mut [], 0..)
        }
    };
    opened.map(|_| ()).map_err(|_| FrameError::BadTag)
}

/// `direction byte || 3 zero bytes || counter u64 LE`: unique per key as long as the counter
/// does not wrap, which the sealer and the opener refuse.
fn nonce(direction: Direction, counter: u64) -> Nonce {
    let mut nonce = [0u8; NONCE_LEN];
    let (direction_part, counter_part) = nonce.split_at_mut(NONCE_LEN - 8);
    if let Some(first) = direction_part.first_mut() {
        *first = direction.byte();
    }
    counter_part.copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(nonce)
}

/// Splits an opened body: decodes the header at its end and leaves the payload in `body`.
fn split_body(body: &mut Vec<u8>) -> Result<LinkHeader, FrameError> {
    let body_length = body.len();
    let field_start =
        body_length
            .checked_sub(HEADER_LENGTH_BYTES)
            .ok_or(FrameError::BodyTooShort {
                length: body_length,
            })?;
    let header_length = read_u16_le(body.get(field_start..).unwrap_or_default()) as usize;
    check_header_length(header_length, body_length)?;
    let header_start = field_start - header_length;
    let header = decode_header(body.get(header_start..field_start).unwrap_or_default())?;
    body.truncate(header_start);
    Ok(header)
}

pub(crate) fn check_body_length(
    body_length: usize,
    max_frame_bytes: usize,
) -> Result<(), FrameError> {
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

pub(crate) fn check_header_length(
    header_length: usize,
    body_length: usize,
) -> Result<(), FrameError> {
    if header_length > MAX_HEADER_BYTES {
        return Err(FrameError::HeaderTooLarge {
            length: header_length,
            limit: MAX_HEADER_BYTES,
        });
    }
    if header_length > body_length.saturating_sub(HEADER_LENGTH_BYTES) {
        return Err(FrameError::HeaderOverrun {
            header: header_length,
            body: body_length,
        });
    }
    Ok(())
}

pub(crate) fn decode_header(bytes: &[u8]) -> Result<LinkHeader, FrameError> {
    let (header, rest) =
        postcard::take_from_bytes::<LinkHeader>(bytes).map_err(FrameError::Decode)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingHeaderBytes { extra: rest.len() });
    }
    Ok(header)
}

pub(crate) fn encode_header(header: &LinkHeader, buffer: Vec<u8>) -> Result<Vec<u8>, FrameError> {
    let bytes = postcard::to_extend(header, buffer).map_err(FrameError::Encode)?;
    if bytes.len() > MAX_HEADER_BYTES {
        return Err(FrameError::HeaderTooLarge {
            length: bytes.len(),
            limit: MAX_HEADER_BYTES,
        });
    }
    Ok(bytes)
}

pub(crate) fn read_u32_le(bytes: &[u8]) -> u32 {
    let mut array = [0u8; 4];
    for (target, source) in array.iter_mut().zip(bytes) {
        *target = *source;
    }
    u32::from_le_bytes(array)
}

pub(crate) fn read_u16_le(bytes: &[u8]) -> u16 {
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

/// Reads, checks and opens the frames of one direction of a connection, counting them.
pub(crate) struct FrameOpener {
    cipher: FrameCipher,
    direction: Direction,
    counter: u64,
    max_frame_bytes: usize,
}

impl FrameOpener {
    pub(crate) fn new(keys: &ConnectionKeys, direction: Direction, max_frame_bytes: usize) -> Self {
        FrameOpener {
            cipher: keys.key(direction).cipher(),
            direction,
            counter: 0,
            max_frame_bytes,
        }
    }

    #[cfg(test)]
    pub(crate) fn skip_to(&mut self, counter: u64) {
        self.counter = counter;
    }

    pub(crate) fn read_frame<R: Read>(&mut self, input: &mut R) -> Result<ReadFrame, FrameError> {
        if self.counter == u64::MAX {
            return Err(FrameError::CounterExhausted);
        }
        let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
        read_prefix(input, &mut prefix)?;
        let body_length = u32::from_le_bytes(prefix) as usize;
        check_body_length(body_length, self.max_frame_bytes)?;
        // Bounded by max_frame_bytes, checked above.
        let mut body = vec![0u8; body_length];
        read_exact(input, &mut body)?;
        let mut tag = [0u8; TAG_BYTES];
        read_exact(input, &mut tag)?;
        open_body(
            &self.cipher,
            self.direction,
            self.counter,
            &prefix,
            &mut body,
            &tag,
        )?;
        self.counter += 1;
        let header = split_body(&mut body)?;
        Ok(ReadFrame {
            header,
            payload: body,
            frame_bytes: LENGTH_PREFIX_BYTES + body_length + TAG_BYTES,
        })
    }
}

/// Seals the frames of one direction of a connection, counting them.
pub(crate) struct FrameSealer {
    cipher: FrameCipher,
    direction: Direction,
    counter: u64,
    max_frame_bytes: usize,
    header_buffer: Vec<u8>,
}

impl FrameSealer {
    pub(crate) fn new(keys: &ConnectionKeys, direction: Direction, max_frame_bytes: usize) -> Self {
        FrameSealer {
            cipher: keys.key(direction).cipher(),
            direction,
            counter: 0,
            max_frame_bytes,
            header_buffer: Vec::with_capacity(MAX_HEADER_BYTES),
        }
    }

    /// Appends one sealed frame to `output`: the payload is copied once, into `output`, and
    /// encrypted there. Returns the frame's size in bytes; on error `output` is as it was.
    /// After 2^64 - 1 frames every call fails: the connection must end (its successor has
    /// new keys).
    pub(crate) fn write_frame(
        &mut self,
        output: &mut Vec<u8>,
        header: &LinkHeader,
        payload: &[u8],
    ) -> Result<usize, FrameError> {
        if self.counter == u64::MAX {
            return Err(FrameError::CounterExhausted);
        }
        let mut buffer = std::mem::take(&mut self.header_buffer);
        buffer.clear();
        let header_bytes = encode_header(header, buffer)?;
        let body_length = payload.len() + header_bytes.len() + HEADER_LENGTH_BYTES;
        if body_length > self.max_frame_bytes {
            self.header_buffer = header_bytes;
            return Err(FrameError::TooLarge {
                length: body_length,
                limit: self.max_frame_bytes,
            });
        }
        let start = output.len();
        output.reserve(LENGTH_PREFIX_BYTES + body_length + TAG_BYTES);
        output.extend_from_slice(&(body_length as u32).to_le_bytes());
        output.extend_from_slice(payload);
        output.extend_from_slice(&header_bytes);
        output.extend_from_slice(&(header_bytes.len() as u16).to_le_bytes());
        let sealed = seal_in_place(&self.cipher, self.direction, self.counter, output, start);
        self.header_buffer = header_bytes;
        sealed?;
        self.counter += 1;
        Ok(LENGTH_PREFIX_BYTES + body_length + TAG_BYTES)
    }

    #[cfg(test)]
    pub(crate) fn skip_to(&mut self, counter: u64) {
        self.counter = counter;
    }
}

/// Reads the length prefix; a clean end of stream before it is `Closed`.
pub(crate) fn read_prefix<R: Read>(input: &mut R, prefix: &mut [u8]) -> Result<(), FrameError> {
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

pub(crate) fn read_exact<R: Read>(input: &mut R, buffer: &mut [u8]) -> Result<(), FrameError> {
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
mod tests;
