//! The ftvm coordinator's quorum protocol: who may acknowledge a VM's writes, decided by the
//! two hosts and a witness.
//!
//! Everything here is a pure, deterministic state machine driven by events (messages,
//! ticks) and producing actions (messages to send, commands for the disk daemons), generic
//! over nothing but time, so that [`sim`] can run it under seeded partitions, message loss,
//! reordering, crashes and clock skew, and check the safety properties after every step.
//! The daemons (`ftvmd`, `ftvm-witness`) wrap these machines with real sockets, clocks and
//! files.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod host;
pub mod keygen;
pub mod manual;
pub mod sim;
pub mod witness;
pub mod witness_daemon;
pub mod witness_store;

pub use replication_link::error_chain;

/// Milliseconds on some clock (each host's clock may drift from the others').
pub type Millis = u64;

/// A VM's generation: grows by one at each change of the host allowed to acknowledge
/// writes (the fencing token).
pub type Generation = u64;

/// A host of the pair.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum HostId {
    A,
    B,
}

impl HostId {
    pub fn peer(self) -> HostId {
        match self {
            HostId::A => HostId::B,
            HostId::B => HostId::A,
        }
    }
}
