//! `vhost-blk-mirror`'s control socket: its commands and its status.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::CommandError;

/// The generation is a fencing token: the one the witness granted.
pub type Generation = u64;

/// A command to a disk daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Answered with [`Status`].
    Status,
    /// `dirty-pages` (Level 3): answered with [`DirtyPages`], the guest pages the daemon
    /// wrote since the previous `dirty-pages`, which this call clears.
    DirtyPages,
    /// Answered with [`Done`].
    Order(Order),
}

/// A command that changes the disk (ftvmd's, and `repair`, the operator's), answered with
/// [`Done`] or a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// `continue-degraded [GEN]`: a primary stops waiting for its lost peer, at `GEN` if
    /// given (never lower than its own).
    ContinueDegraded(Option<Generation>),
    /// `fence`: a primary never completes another request.
    Fence,
    /// `promote [GEN]`: a secondary becomes primary, at `GEN` if given (else the next one).
    Promote(Option<Generation>),
    /// `demote`: a primary fences itself and becomes secondary.
    Demote,
    /// `repair`: rebuild this host's failed copy from the peer's.
    Repair,
}

impl Command {
    /// The commands, as `--help` and the error for an unknown one list them.
    pub const SYNOPSIS: &'static str =
        "status, promote [GENERATION], demote, continue-degraded [GENERATION], fence, repair, \
         dirty-pages";
}

impl Order {
    /// The command's first word.
    pub fn name(self) -> &'static str {
        match self {
            Order::ContinueDegraded(_) => "continue-degraded",
            Order::Fence => "fence",
            Order::Promote(_) => "promote",
            Order::Demote => "demote",
            Order::Repair => "repair",
        }
    }

    fn generation(self) -> Option<Generation> {
        match self {
            Order::ContinueDegraded(generation) | Order::Promote(generation) => generation,
            Order::Fence | Order::Demote | Order::Repair => None,
        }
    }
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        match self.generation() {
            Some(generation) => write!(f, " {generation}"),
            None => Ok(()),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Status => f.write_str("status"),
            Command::DirtyPages => f.write_str("dirty-pages"),
            Command::Order(order) => order.fmt(f),
        }
    }
}

impl FromStr for Command {
    type Err = CommandError;

    /// Parses a command line: words separated by white space.
    fn from_str(line: &str) -> Result<Command, CommandError> {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else {
            return Err(CommandError::Empty {
                commands: Command::SYNOPSIS,
            });
        };
        let command = match first {
            "status" => Command::Status,
            "dirty-pages" => Command::DirtyPages,
            "continue-degraded" => Command::Order(Order::ContinueDegraded(None)),
            "fence" => Command::Order(Order::Fence),
            "promote" => Command::Order(Order::Promote(None)),
            "demote" => Command::Order(Order::Demote),
            "repair" => Command::Order(Order::Repair),
            other => {
                return Err(CommandError::Unknown {
                    word: other.to_owned(),
                    commands: Command::SYNOPSIS,
                })
            }
        };
        let name = match command {
            Command::Status => "status",
            Command::DirtyPages => "dirty-pages",
            Command::Order(order) => order.name(),
        };
        let generation = match words.next() {
            None => None,
            Some(word) => {
                Some(
                    word.parse::<Generation>()
                        .map_err(|_| CommandError::NotANumber {
                            command: name,
                            word: word.to_owned(),
                        })?,
                )
            }
        };
        let command = match (command, generation) {
            (command, None) => command,
            (Command::Order(Order::ContinueDegraded(_)), generation) => {
                Command::Order(Order::ContinueDegraded(generation))
            }
            (Command::Order(Order::Promote(_)), generation) => {
                Command::Order(Order::Promote(generation))
            }
            (_, Some(_)) => return Err(CommandError::TooManyArguments { command: name }),
        };
        if words.next().is_some() {
            return Err(CommandError::TooManyArguments { command: name });
        }
        Ok(command)
    }
}

/// The answer to an [`Order`] the daemon carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Done {
    /// Always `true` (a refusal is a [`crate::Reply::Refused`]).
    pub ok: bool,
    /// What was done, in words ("degraded", "already primary", …).
    pub result: String,
}

/// The answer to `dirty-pages`: the pages of guest RAM the daemon wrote since the previous
/// `dirty-pages` (the first call: since it mapped guest memory), as byte ranges of the files
/// guest RAM is mapped from (`docs/LEVEL3.md`, "Interfaces").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirtyPages {
    /// The ranges' granularity: every offset and length is a multiple of it.
    pub page_size: u64,
    /// One entry per file, sorted by `dev` then `ino` (a file with nothing written is left
    /// out). The NIC daemon's `dirty-pages` answers the same shape.
    pub files: Vec<DirtyFile>,
}

/// The written pages of one file guest RAM is mapped from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirtyFile {
    /// `st_dev` and `st_ino` of the file (the vhost-user memory region's fd).
    pub dev: u64,
    pub ino: u64,
    /// `[offset, len]` byte ranges of the file (the region's `mmap_offset` plus the offset
    /// within the region), page-aligned, sorted, merged (none overlap or touch).
    pub ranges: Vec<[u64; 2]>,
}

/// What kind of storage backs the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageKind {
    File,
    BlockDevice,
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub image: String,
    pub image_kind: ImageKind,
    pub size_bytes: u64,
    pub read_only: bool,
    pub serial: String,
    pub queues: usize,
    pub read_requests: u64,
    pub write_requests: u64,
    pub flush_requests: u64,
    pub discard_requests: u64,
    pub write_zeroes_requests: u64,
    pub get_id_requests: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    /// Requests refused for bad guest input (malformed chain, out of range, read-only, …).
    pub rejected_requests: u64,
    /// Requests that failed on the image (EIO, ENOSPC, …).
    pub io_errors: u64,
    /// Frontend connections accepted since start.
    pub connections: u64,
    pub connected: bool,
    /// Role, generation, disk state, peer and links, resync progress.
    pub replication: Replication,
}

/// What the daemon is for its disk, with that role's state: `{"role": "primary", …}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase", deny_unknown_fields)]
pub enum Replication {
    /// The local image alone, no replication.
    Standalone {},
    Primary(PrimaryStatus),
    Secondary(SecondaryStatus),
}

/// The primary's replication mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// No peer yet: writes are held.
    Connecting,
    Mirrored,
    /// The peer is lost: writes are held until `continue-degraded` or `fence`.
    Holding,
    /// Running alone; every write is recorded for resync.
    Degraded,
    /// Nothing completes any more.
    Fenced,
}

/// The state of a primary's own copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalDisk {
    Healthy,
    /// The image returned an error: all I/O is served by the peer (RemoteOnly).
    Failed,
    /// After `repair`: being rebuilt from the peer; reads still come from the peer.
    Rebuilding,
}

/// The primary's disk state, as one word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrimaryDiskState {
    UpToDate,
    SyncSource,
    Holding,
    Degraded,
    Fenced,
    RemoteOnly,
    Rebuilding,
}

/// The secondary's disk state, as one word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecondaryDiskState {
    UpToDate,
    Inconsistent,
    SyncTarget,
    /// Its disk failed: Inconsistent, and nothing is applied until `repair`.
    Failed,
}

/// Progress of a copy between the hosts (a resync, or a rebuild after `repair`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncProgress {
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// Compare mode: bytes whose chunk differed and was sent (the rest was identical).
    pub bytes_sent: u64,
    pub rate_bytes_per_second: u64,
    #[serde(deserialize_with = "crate::required")]
    pub eta_seconds: Option<u64>,
    /// Wall time of the copy, in seconds (so far, or in total once finished).
    pub seconds: f64,
}

/// The primary's part of `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrimaryStatus {
    pub mode: Mode,
    pub disk_state: PrimaryDiskState,
    pub local_disk: LocalDisk,
    /// Progress of the rebuild of the local disk after `repair`.
    pub rebuild: ResyncProgress,
    pub generation: Generation,
    pub peer_reachable: bool,
    /// The replication link's own counters (opaque here: see the crate's documentation).
    pub links: serde_json::Value,
    pub in_flight_requests: usize,
    pub out_of_sync_bytes: u64,
    /// Extents marked active: where the copies may differ after a crash of this host.
    pub active_extents: u64,
    /// Guest writes under way (between marking their extents and their end).
    pub writes_active: u64,
    pub resync: ResyncProgress,
    /// Why the secondary's copy failed (it counts as lost until repaired); `None` while
    /// it works.
    #[serde(deserialize_with = "crate::required")]
    pub peer_disk_failed: Option<String>,
}

/// The secondary's part of `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecondaryStatus {
    pub disk_state: SecondaryDiskState,
    pub generation: Generation,
    pub peer_reachable: bool,
    /// The replication link's own counters (opaque here: see the crate's documentation).
    pub links: serde_json::Value,
    pub applied_writes: u64,
    pub applied_bytes: u64,
    pub resync_bytes_received: u64,
    pub refused_requests: u64,
    /// Why this copy's disk failed (it is Inconsistent and applies nothing until
    /// `repair`); `None` while it works.
    #[serde(deserialize_with = "crate::required")]
    pub disk_failed: Option<String>,
    pub disk_failures: u64,
}

#[cfg(test)]
mod tests;
