//! The ftvm coordinator's quorum protocol: who may acknowledge a VM's writes, decided by the
//! two hosts and a witness.
//!
//! Everything here is a pure, deterministic state machine driven by events (messages,
//! ticks) and producing actions (messages to send, commands for the disk daemons), generic
//! over nothing but time, so that [`sim`] can run it under seeded partitions, message loss,
//! reordering, crashes and clock skew, and check the safety properties after every step.
//! The daemons (`ftvmd`, `ftvm-witness`) wrap these machines with real sockets, clocks and
//! files.

pub mod api;
pub mod check;
pub mod cli;
pub mod collect;
pub mod config;
pub mod daemon;
pub mod domain_cli;
pub mod host;
pub mod key_rotation;
pub mod keygen;
pub mod libvirt;
pub mod manual;
pub mod sim;
pub mod witness;
pub mod witness_daemon;
pub mod witness_store;

pub use replication_link::error_chain;

/// The nice value `ftvmd` and `ftvm-witness` run at: above the guests (QEMU and the
/// daemons they start run at 0), so that a host busy with its VMs still sends and hears the
/// heartbeats on time. Under TCG guests at full load, ftvmd at the guests' priority missed
/// its peer for over a second and claimed a generation it did not need (safe, but a
/// needless degraded moment); corosync runs at real-time priority for the same reason.
pub const DAEMON_NICE: i32 = -10;

/// Raises the calling thread, and every thread it starts afterwards, to [`DAEMON_NICE`];
/// call first thing in `main`. An error (not root) is only logged: the daemon works, with
/// less margin under load.
pub fn raise_priority(daemon: &str) {
    // SAFETY: setpriority(2) on the calling thread (who = 0); no memory is passed.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, DAEMON_NICE) };
    if result == -1 {
        log::warn!(
            "{daemon}: cannot raise its priority to nice {DAEMON_NICE} ({}): heartbeats have \
             less margin on a busy host",
            std::io::Error::last_os_error()
        );
    }
}

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
