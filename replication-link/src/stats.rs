//! Counters and snapshots for `status` and metrics.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Per-link counters, updated without the session lock.
#[derive(Debug, Default)]
pub(crate) struct LinkCounters {
    pub(crate) frames_sent: AtomicU64,
    pub(crate) direct_writes: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) frames_received: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) retransmits: AtomicU64,
    pub(crate) auth_failures: AtomicU64,
    pub(crate) crc_errors: AtomicU64,
    pub(crate) frame_errors: AtomicU64,
    pub(crate) connects: AtomicU64,
}

/// Adds one to a counter.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `amount` to a counter.
pub(crate) fn add(counter: &AtomicU64, amount: usize) {
    counter.fetch_add(amount as u64, Ordering::Relaxed);
}

fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// One link (A-link) of a session.
#[derive(Clone, Debug, Serialize)]
pub struct LinkStats {
    /// 0 or 1: the address's position in `connect` or `bind`.
    pub index: usize,
    /// The peer's address (client: as configured; server: of the last connection).
    pub address: Option<SocketAddr>,
    /// This side's address of the last connection.
    pub local_address: Option<SocketAddr>,
    /// Authenticated and not declared down.
    pub up: bool,
    /// Round-trip estimate from heartbeats.
    pub rtt_us: Option<u64>,
    /// Time since the last frame from the peer, while up.
    pub last_heard_ms: Option<u64>,
    /// The id (16 hex digits, [`crate::Psk::id`]) of the pre-shared key the connection was
    /// authenticated with, while connected: shows when both hosts use a new key.
    pub key: Option<String>,
    pub last_error: Option<String>,
    pub frames_sent: u64,
    /// Writes a sender made itself on this link, found idle (the others went through the
    /// link's writer thread: retransmits, acks, heartbeats, and sends while it was busy).
    pub direct_writes: u64,
    pub bytes_sent: u64,
    pub frames_received: u64,
    pub bytes_received: u64,
    /// Messages sent again because the link that carried them first went down.
    pub retransmits: u64,
    /// Handshakes that failed authentication and frames whose tag failed.
    pub auth_failures: u64,
    /// Payloads whose CRC32C did not match.
    pub crc_errors: u64,
    /// Other malformed frames and protocol violations.
    pub frame_errors: u64,
    /// Successful handshakes.
    pub connects: u64,
}

impl LinkStats {
    pub(crate) fn from_counters(index: usize, counters: &LinkCounters) -> LinkStats {
        LinkStats {
            index,
            address: None,
            local_address: None,
            up: false,
            rtt_us: None,
            last_heard_ms: None,
            key: None,
            last_error: None,
            frames_sent: read(&counters.frames_sent),
            direct_writes: read(&counters.direct_writes),
            bytes_sent: read(&counters.bytes_sent),
            frames_received: read(&counters.frames_received),
            bytes_received: read(&counters.bytes_received),
            retransmits: read(&counters.retransmits),
            auth_failures: read(&counters.auth_failures),
            crc_errors: read(&counters.crc_errors),
            frame_errors: read(&counters.frame_errors),
            connects: read(&counters.connects),
        }
    }
}

/// A session: both directions and every link.
#[derive(Clone, Debug, Serialize)]
pub struct SessionStats {
    /// As 32 hex digits, as in the logs (a JSON number cannot hold a u128: with it as a
    /// number, `serde_json::to_value` of these statistics failed and the daemons' status
    /// showed no links).
    #[serde(serialize_with = "hex_u128")]
    pub session_id: u128,
    pub service: String,
    pub peer_id: Option<String>,
    pub peer_reachable: bool,
    pub links: Vec<LinkStats>,
    /// Messages given to `send`.
    pub sent: u64,
    pub unacked_messages: usize,
    pub unacked_bytes: usize,
    /// Messages handed to the application by `recv`.
    pub delivered: u64,
    /// Messages received but not yet taken by `recv` (in order or waiting for a gap).
    pub buffered_messages: usize,
    /// Messages from a peer incarnation that restarted before they were taken.
    pub discarded_on_peer_restart: u64,
}

fn hex_u128<S: serde::Serializer>(value: &u128, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&format_args!("{value:032x}"))
}

/// Per-address counters of a listener.
#[derive(Debug, Default)]
pub(crate) struct ListenerCounters {
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) handshakes_completed: AtomicU64,
    pub(crate) auth_failures: AtomicU64,
    pub(crate) handshake_errors: AtomicU64,
    pub(crate) refused_overload: AtomicU64,
    pub(crate) evicted_handshakes: AtomicU64,
    pub(crate) refused_not_served: AtomicU64,
}

/// One listening address.
#[derive(Clone, Debug, Serialize)]
pub struct ListenerAddressStats {
    pub address: SocketAddr,
    pub connections_accepted: u64,
    pub handshakes_completed: u64,
    /// Clients refused because they failed authentication.
    pub auth_failures: u64,
    /// Garbage, timeouts, refused versions and other failed handshakes.
    pub handshake_errors: u64,
    /// Connections dropped at once because twice `max_pending_handshakes` handshake threads
    /// were still running.
    pub refused_overload: u64,
    /// Unauthenticated connections closed to make room for a newer one (per-source or global
    /// limit of handshakes in progress).
    pub evicted_handshakes: u64,
    /// Clients refused because they named a service or client id this listener does not serve.
    pub refused_not_served: u64,
}

impl ListenerAddressStats {
    pub(crate) fn from_counters(address: SocketAddr, counters: &ListenerCounters) -> Self {
        ListenerAddressStats {
            address,
            connections_accepted: read(&counters.connections_accepted),
            handshakes_completed: read(&counters.handshakes_completed),
            auth_failures: read(&counters.auth_failures),
            handshake_errors: read(&counters.handshake_errors),
            refused_overload: read(&counters.refused_overload),
            evicted_handshakes: read(&counters.evicted_handshakes),
            refused_not_served: read(&counters.refused_not_served),
        }
    }
}

/// A listener: its addresses and live sessions.
#[derive(Clone, Debug, Serialize)]
pub struct ListenerStats {
    pub addresses: Vec<ListenerAddressStats>,
    pub sessions: usize,
    /// Unauthenticated connections counted against `max_pending_handshakes` now.
    pub handshakes_in_progress: usize,
}
