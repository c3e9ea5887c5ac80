//! Link-level frame headers (postcard-encoded). The variant order is part of the wire format:
//! add new variants at the end only, and bump [`PROTOCOL_VERSION`] on any other change.

use serde::{Deserialize, Serialize};

use crate::psk::KeyId;

/// Version carried in `Hello` and `Challenge`; a peer with another version is refused.
/// 4: `Hello` and `Challenge` name the frame protection ([`FrameProtection`]); 3: the `Hello` offers the ids of the client's keys and the `Challenge` names the one the
/// server chose (key rotation); 2: frames after the handshake are sealed with AES-256-GCM
/// (1: in clear, BLAKE3 MAC).
pub const PROTOCOL_VERSION: u16 = 4;
/// Largest encoded header, in bytes.
pub const MAX_HEADER_BYTES: usize = 4096;
/// Bytes a `Data` header needs beyond its application header (at most 28: variant, varints,
/// vector length), rounded up.
pub const DATA_HEADER_OVERHEAD_BYTES: usize = 64;
/// Largest application header carried in a `Data` frame, in bytes (the rest of the header
/// budget holds the link fields).
pub const MAX_APP_HEADER_BYTES: usize = MAX_HEADER_BYTES - DATA_HEADER_OVERHEAD_BYTES;
/// Largest client id, server id or service name, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Most links (A-links) per session.
pub const MAX_LINKS: usize = 2;
/// Size of the handshake nonces.
pub const NONCE_BYTES: usize = 32;

/// Receive limits each side announces in the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkLimits {
    /// Messages the sender may have beyond the last acknowledged one.
    pub window_messages: u32,
    /// Bytes (application headers + payloads) the sender may have unacknowledged.
    pub window_bytes: u64,
    /// Largest frame either side may send; both sides must agree.
    pub max_frame_bytes: u32,
}

/// How the frames after the handshake are protected. Both ends of a link must be configured
/// alike: each names its own in the handshake (covered by the proofs and the keys), and a
/// server or client whose peer names the other is refused, so that no one on the network can
/// turn encryption off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FrameProtection {
    /// AES-256-GCM over the body: confidential and authenticated (the default).
    #[default]
    Encrypted,
    /// The body in clear, authenticated by AES-256-GCM with the body as additional data and
    /// nothing encrypted (GMAC): tampering, replay and reordering are still refused, but
    /// anyone on the link reads the guest's data. For measurements and trusted links only.
    AuthenticatedOnly,
}

impl FrameProtection {
    /// For logs and errors: "encryption on" / "encryption off".
    pub fn describe(self) -> &'static str {
        match self {
            FrameProtection::Encrypted => "encryption on",
            FrameProtection::AuthenticatedOnly => "encryption off (authenticated only)",
        }
    }
}

/// First frame of a connection, client to server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    /// The client host's name (its `local_id`).
    pub client_id: String,
    /// What the session is for, e.g. `blk:vm1-disk0`.
    pub service: String,
    /// Chosen at random by the client for the life of its `Session`.
    pub session_id: u128,
    /// Which of the client's links this connection is (0 or 1): a new connection replaces
    /// the session's previous connection of the same link.
    pub link: u8,
    pub client_nonce: [u8; NONCE_BYTES],
    /// Every message the client sent up to this one was acknowledged by the server.
    pub send_base: u64,
    pub limits: LinkLimits,
    /// The ids of the keys the client holds, the one it prefers first (1 to
    /// [`crate::key_ring::MAX_KEYS`]).
    pub key_ids: Vec<KeyId>,
    /// How the client protects the frames after the handshake (its configuration).
    pub protection: FrameProtection,
}

/// The server's part of the handshake transcript.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerParams {
    pub protocol_version: u16,
    /// The server host's name (its `local_id`).
    pub server_id: String,
    pub server_nonce: [u8; NONCE_BYTES],
    /// Identifies the server's session state; a new value tells the client the server lost
    /// it (restarted) and message numbering from the server starts again at `send_base + 1`.
    pub instance: u128,
    /// Every message the server sent up to this one was acknowledged by the client.
    pub send_base: u64,
    pub limits: LinkLimits,
    /// The key both sides prove and derive with: the first of the client's `key_ids` that
    /// the server holds.
    pub key_id: KeyId,
    /// How the server protects the frames after the handshake (its configuration).
    pub protection: FrameProtection,
}

/// Optional echo of the peer's last heartbeat time, for round-trip estimates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    /// The peer's `time_us` as received.
    pub time_us: u64,
    /// How long this side held it before echoing, in microseconds.
    pub hold_us: u64,
}

/// Header of every frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkHeader {
    /// Client → server, unauthenticated.
    Hello(Hello),
    /// Server → client: `server_proof = keyed_hash(psk, "server" || transcript)`.
    Challenge {
        params: ServerParams,
        server_proof: [u8; 32],
    },
    /// Client → server: `client_proof = keyed_hash(psk, "client" || transcript)`.
    Proof { client_proof: [u8; 32] },
    /// Either side, during the handshake: the connection is refused, with a reason.
    Refused { reason: String },
    /// An application message; its payload follows the header.
    Data {
        session_seq: u64,
        payload_crc32c: u32,
        /// Piggybacked cumulative acknowledgement (see `Ack`).
        ack_up_to: u64,
        /// The application's own header, opaque to the link (postcard by convention).
        app_header: Vec<u8>,
    },
    /// Cumulative acknowledgement: every message up to `up_to` was delivered to the app.
    Ack { up_to: u64 },
    /// Liveness and round-trip time, every heartbeat interval on each link.
    Heartbeat {
        ack_up_to: u64,
        /// Sender's monotonic clock, microseconds since its session started.
        time_us: u64,
        echo: Option<Echo>,
    },
    /// Server → client on an established link: the server no longer holds the key this
    /// connection was authenticated with (retired). The client connects again with its
    /// current keys; the new connection replaces this one, which the server closes itself
    /// one link timeout after asking.
    Rekey,
}

/// The `Hello` of protocol versions 1 and 2 (no `key_ids`) and 3 (no `protection`): decoded
/// only so that such a peer is refused with its version named, not as a malformed frame.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum LegacyHeader {
    Hello(LegacyHello),
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct LegacyHello {
    pub(crate) protocol_version: u16,
    pub(crate) client_id: String,
    pub(crate) service: String,
    pub(crate) session_id: u128,
    pub(crate) link: u8,
    pub(crate) client_nonce: [u8; NONCE_BYTES],
    pub(crate) send_base: u64,
    pub(crate) limits: LinkLimits,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum LegacyHeaderV3 {
    Hello(LegacyHello, Vec<KeyId>),
}

/// `bytes` as an older version's `Hello` (exactly), as a `Hello` with what it lacks empty.
pub(crate) fn decode_legacy_hello(bytes: &[u8]) -> Option<LinkHeader> {
    let (hello, key_ids) = match postcard::take_from_bytes::<LegacyHeader>(bytes) {
        Ok((LegacyHeader::Hello(hello), [])) => (hello, Vec::new()),
        _ => match postcard::take_from_bytes::<LegacyHeaderV3>(bytes).ok()? {
            (LegacyHeaderV3::Hello(hello, key_ids), []) => (hello, key_ids),
            _ => return None,
        },
    };
    if hello.protocol_version >= PROTOCOL_VERSION {
        return None;
    }
    Some(LinkHeader::Hello(Hello {
        protocol_version: hello.protocol_version,
        client_id: hello.client_id,
        service: hello.service,
        session_id: hello.session_id,
        link: hello.link,
        client_nonce: hello.client_nonce,
        send_base: hello.send_base,
        limits: hello.limits,
        key_ids,
        protection: FrameProtection::Encrypted,
    }))
}

impl LinkHeader {
    /// Short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            LinkHeader::Hello(_) => "hello",
            LinkHeader::Challenge { .. } => "challenge",
            LinkHeader::Proof { .. } => "proof",
            LinkHeader::Refused { .. } => "refused",
            LinkHeader::Data { .. } => "data",
            LinkHeader::Ack { .. } => "ack",
            LinkHeader::Heartbeat { .. } => "heartbeat",
            LinkHeader::Rekey => "rekey",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_data_header_fits_the_budget() {
        let header = LinkHeader::Data {
            session_seq: u64::MAX,
            payload_crc32c: u32::MAX,
            ack_up_to: u64::MAX,
            app_header: vec![0xff; MAX_APP_HEADER_BYTES],
        };
        let bytes = postcard::to_allocvec(&header).expect("encode");
        assert!(bytes.len() <= MAX_HEADER_BYTES, "{}", bytes.len());
        assert!(bytes.len() <= MAX_APP_HEADER_BYTES + 28, "{}", bytes.len());
    }

    #[test]
    fn largest_hello_fits_the_budget() {
        let header = LinkHeader::Hello(Hello {
            protocol_version: u16::MAX,
            client_id: "c".repeat(MAX_ID_BYTES),
            service: "s".repeat(MAX_ID_BYTES),
            session_id: u128::MAX,
            link: u8::MAX,
            client_nonce: [0xff; NONCE_BYTES],
            send_base: u64::MAX,
            limits: LinkLimits {
                window_messages: u32::MAX,
                window_bytes: u64::MAX,
                max_frame_bytes: u32::MAX,
            },
            key_ids: vec![KeyId([0xff; crate::psk::KEY_ID_BYTES]); crate::key_ring::MAX_KEYS],
            protection: FrameProtection::AuthenticatedOnly,
        });
        let bytes = postcard::to_allocvec(&header).expect("encode");
        assert!(bytes.len() <= MAX_HEADER_BYTES, "{}", bytes.len());
    }
}
