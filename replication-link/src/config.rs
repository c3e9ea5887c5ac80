//! Configuration shared by both ends of a link.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::frame::HEADER_LENGTH_BYTES;
use crate::header::{FrameProtection, DATA_HEADER_OVERHEAD_BYTES, MAX_ID_BYTES};
use crate::key_ring::KeyRing;
use crate::psk::Psk;

/// Default largest frame: a 4 MiB payload plus room for the headers.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 4 * 1024 * 1024 + 4 * 1024;
/// Smallest accepted `max_frame_bytes`.
const MIN_MAX_FRAME_BYTES: usize = 64 * 1024;
/// Largest accepted `max_frame_bytes` (the length prefix is a u32; stay far below it).
const MAX_MAX_FRAME_BYTES: usize = 1024 * 1024 * 1024;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("local id must be 1 to {MAX_ID_BYTES} bytes, is {length}")]
    LocalId { length: usize },
    #[error("max_frame_bytes must be {MIN_MAX_FRAME_BYTES} to {MAX_MAX_FRAME_BYTES}, is {value}")]
    MaxFrameBytes { value: usize },
    #[error("heartbeat_interval_ms must be at least 1 and below link_timeout_ms")]
    Heartbeat,
    #[error("{name} must be at least 1")]
    Zero { name: &'static str },
    #[error("reconnect_min_ms must not exceed reconnect_max_ms")]
    Reconnect,
}

/// Tunables of a session or listener. Both hosts of a pair must share a key of `keys` and
/// use the same `max_frame_bytes` and `protection` (the handshake refuses a peer whose
/// `max_frame_bytes` or `protection` differs).
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// Pre-shared keys of the host pair, the preferred first (a client offers them all, a
    /// server takes the first offered that it holds). Clones of a config share the ring.
    pub keys: KeyRing,
    /// Server side, instead of `keys`: a key per client id (the client's `local_id`), so that
    /// no client can authenticate under another's id. A client whose id has no key here
    /// fails authentication like one with a wrong key.
    pub client_keys: Option<Arc<BTreeMap<String, Psk>>>,
    /// This host's name as the peer sees it (e.g. its hostname), 1 to 256 bytes.
    pub local_id: String,
    /// Largest frame accepted or sent (length prefix value: header length + header + payload).
    pub max_frame_bytes: usize,
    /// How frames after the handshake are protected: encrypted (the default), or only
    /// authenticated, the data in clear, for measurements and trusted links.
    pub protection: FrameProtection,
    /// Heartbeat period on each link.
    pub heartbeat_interval_ms: u64,
    /// A link that received nothing for this long is declared down and closed.
    pub link_timeout_ms: u64,
    /// A connection that has not completed its handshake after this long is dropped.
    pub handshake_timeout_ms: u64,
    /// Client: limit of one TCP connect attempt.
    pub connect_timeout_ms: u64,
    /// Client: first delay between reconnect attempts; doubles up to `reconnect_max_ms`.
    pub reconnect_min_ms: u64,
    /// Client: longest delay between reconnect attempts.
    pub reconnect_max_ms: u64,
    /// Longest delay before a delivered message is acknowledged when no frame carries the ack.
    pub ack_delay_ms: u64,
    /// Send window: unacknowledged messages; also the receive window offered to the peer.
    pub max_unacked_messages: usize,
    /// Send window in bytes (application headers + payloads); also the receive window.
    pub max_unacked_bytes: usize,
    /// How long [`crate::Session::send`] blocks while the send window is full.
    pub send_timeout_ms: u64,
    /// Listener: connections in their handshake at once. A newer connection closes the oldest
    /// handshake of the source holding the most (see `max_pending_handshakes_per_source`).
    pub max_pending_handshakes: usize,
    /// Listener: connections in their handshake at once from one source (IPv4 address or
    /// IPv6 /64). A newer connection from a source at its limit closes that source's oldest.
    pub max_pending_handshakes_per_source: usize,
    /// Listener: the services it serves (e.g. `blk:vm1-disk0`). A client naming another is
    /// refused before the challenge (`Refused{"service not served here"}`). `None`: any.
    pub allowed_services: Option<Vec<String>>,
    /// Listener: the client ids (the clients' `local_id`) it serves; another is refused
    /// before the challenge (`Refused{"client not allowed here"}`). `None`: any client that
    /// authenticates.
    pub allowed_clients: Option<Vec<String>>,
}

impl LinkConfig {
    /// Configuration with the defaults (heartbeat 100 ms, link timeout 1000 ms, ...): `keys`
    /// one [`Psk`] or a [`KeyRing`].
    pub fn new(keys: impl Into<KeyRing>, local_id: impl Into<String>) -> LinkConfig {
        LinkConfig {
            keys: keys.into(),
            client_keys: None,
            local_id: local_id.into(),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            protection: FrameProtection::Encrypted,
            heartbeat_interval_ms: 100,
            link_timeout_ms: 1000,
            handshake_timeout_ms: 2000,
            connect_timeout_ms: 1000,
            reconnect_min_ms: 50,
            reconnect_max_ms: 1000,
            ack_delay_ms: 2,
            max_unacked_messages: 4096,
            max_unacked_bytes: 64 * 1024 * 1024,
            send_timeout_ms: 10_000,
            max_pending_handshakes: 32,
            max_pending_handshakes_per_source: 8,
            allowed_services: None,
            allowed_clients: None,
        }
    }

    /// Largest application header plus payload that [`crate::Session::send`] accepts.
    pub fn max_message_bytes(&self) -> usize {
        self.max_frame_bytes
            .saturating_sub(HEADER_LENGTH_BYTES + DATA_HEADER_OVERHEAD_BYTES)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.local_id.is_empty() || self.local_id.len() > MAX_ID_BYTES {
            return Err(ConfigError::LocalId {
                length: self.local_id.len(),
            });
        }
        if !(MIN_MAX_FRAME_BYTES..=MAX_MAX_FRAME_BYTES).contains(&self.max_frame_bytes) {
            return Err(ConfigError::MaxFrameBytes {
                value: self.max_frame_bytes,
            });
        }
        if self.heartbeat_interval_ms == 0 || self.heartbeat_interval_ms >= self.link_timeout_ms {
            return Err(ConfigError::Heartbeat);
        }
        let must_be_positive = [
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("reconnect_min_ms", self.reconnect_min_ms),
            ("max_unacked_messages", self.max_unacked_messages as u64),
            ("max_unacked_bytes", self.max_unacked_bytes as u64),
            ("max_pending_handshakes", self.max_pending_handshakes as u64),
            (
                "max_pending_handshakes_per_source",
                self.max_pending_handshakes_per_source as u64,
            ),
        ];
        if let Some((name, _)) = must_be_positive.iter().find(|(_, value)| *value == 0) {
            return Err(ConfigError::Zero { name });
        }
        if self.reconnect_min_ms > self.reconnect_max_ms {
            return Err(ConfigError::Reconnect);
        }
        Ok(())
    }

    pub(crate) fn link_timeout(&self) -> Duration {
        Duration::from_millis(self.link_timeout_ms)
    }

    pub(crate) fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub(crate) fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// Listener: whether it serves `service` (all do when `allowed_services` is `None`).
    pub(crate) fn serves(&self, service: &str) -> bool {
        self.allowed_services
            .as_ref()
            .is_none_or(|services| services.iter().any(|allowed| allowed == service))
    }

    /// Listener: whether `client_id` may connect (all may when `allowed_clients` is `None`).
    pub(crate) fn allows_client(&self, client_id: &str) -> bool {
        self.allowed_clients
            .as_ref()
            .is_none_or(|clients| clients.iter().any(|allowed| allowed == client_id))
    }

    /// Receive window offered to the peer, clamped to the wire types.
    pub(crate) fn receive_limits(&self) -> crate::header::LinkLimits {
        crate::header::LinkLimits {
            window_messages: u32::try_from(self.max_unacked_messages).unwrap_or(u32::MAX),
            window_bytes: self.max_unacked_bytes as u64,
            max_frame_bytes: u32::try_from(self.max_frame_bytes).unwrap_or(u32::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LinkConfig {
        LinkConfig::new(Psk::from_bytes(b"0123456789abcdef").expect("key"), "host-a")
    }

    #[test]
    fn defaults_are_valid() {
        let config = config();
        config.validate().expect("valid");
        assert!(config.max_message_bytes() >= 4 * 1024 * 1024 + 4000);
    }

    #[test]
    fn bad_values_are_refused() {
        let mut bad = config();
        bad.heartbeat_interval_ms = bad.link_timeout_ms;
        assert!(matches!(bad.validate(), Err(ConfigError::Heartbeat)));
        let mut bad = config();
        bad.local_id.clear();
        assert!(matches!(bad.validate(), Err(ConfigError::LocalId { .. })));
        let mut bad = config();
        bad.max_unacked_messages = 0;
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Zero {
                name: "max_unacked_messages"
            })
        ));
        let mut bad = config();
        bad.max_frame_bytes = 100;
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::MaxFrameBytes { .. })
        ));
    }
}
