//! `replication-link`: the replication link layer shared by the ftvm daemons.
//!
//! A daemon on host A and its counterpart on host B exchange messages over up to two A-links
//! (TCP connections to different addresses) with mutual authentication (pre-shared key),
//! every frame after the handshake encrypted and authenticated (AES-256-GCM, a key per
//! connection and direction, a per-direction frame counter in the nonce: tampered, replayed,
//! reordered, reflected or dropped frames fail), and reliable, exactly-once, in-order delivery
//! across link failures.
//!
//! Layers, each knowing only its neighbours:
//! - [`frame`]: the sealed wire format; pure decoder [`frame::decode_frame`] (fuzzed).
//! - [`handshake_frame`]: the clear framing of the handshake; pure decoder (fuzzed).
//! - [`header`]: the link-level headers carried in frames.
//! - [`handshake`]: authentication of one connection.
//! - [`key_ring`]: the pair's keys (one or more, rotated without a restart).
//! - `reliability`: retransmit and reorder buffers (pure state, no I/O).
//! - `shared` + `link`: a session's state and the reader/writer threads of one connection.
//! - [`Session`] (client: [`Session::connect`]) and [`LinkListener`] (server): the API.
//!
//! See README.md for the wire format and the guarantees.

pub mod config;
pub mod frame;
pub mod handshake;
pub mod handshake_frame;
pub mod header;
pub mod key_ring;
pub mod listener;
pub mod psk;
pub mod session;
pub mod stats;

mod admission;
mod client;
mod link;
mod log_limit;
mod reliability;
mod shared;

pub use config::{ConfigError, LinkConfig, DEFAULT_MAX_FRAME_BYTES};
pub use header::FrameProtection;
pub use key_ring::{KeyRing, KeyRingError};
pub use listener::{LinkListener, ListenerError, ListenerEvent};
pub use log_limit::error_chain;
pub use psk::{KeyId, Psk, PskError};
pub use reliability::Message;
pub use session::{CloseReason, Session, SessionError, SessionEvent};
pub use shared::{Delivery, InlineHandler};
pub use stats::{LinkStats, ListenerAddressStats, ListenerStats, SessionStats};
