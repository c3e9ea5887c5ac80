//! `vhost-blk-mirror`'s control socket: its commands and its status.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::CommandError;

/// The generation is a fencing token: the one the witness granted.
pub type Generation = u64;

/// A Level 3 epoch number (`docs/LEVEL3.md`, "Disk writes at Level 3").
pub type Epoch = u64;

/// A command to a disk daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Answered with [`Status`].
    Status,
    /// `dirty-pages` (Level 3): answered with [`DirtyPages`], the guest pages the daemon
    /// wrote since the previous `dirty-pages`, which this call clears.
    DirtyPages,
    /// Answered with [`Done`].
    Order(Order),
    /// The checkpoint engine's Level 3 commands; answered with [`Done`].
    Epoch(EpochOrder),
    /// `snapshot create|delete|revert NAME`, `snapshot list` (on a primary): answered with
    /// [`Done`], `list` with [`Snapshots`].
    Snapshot(SnapshotOrder),
}

/// The start of a disk daemon's refusal of `snapshot revert` while a guest is attached
/// (ftvmd asks again until the stopped QEMU's connection is gone).
pub const GUEST_ATTACHED: &str = "a guest is attached to this disk";

/// The most bytes in a snapshot's name.
pub const MAX_SNAPSHOT_NAME_BYTES: usize = 64;

/// A snapshot's name: 1 to [`MAX_SNAPSHOT_NAME_BYTES`] ASCII letters, digits, `-`, `_` and
/// `.`, not starting with `.` (it names a file next to the image: no path characters).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SnapshotName(String);

impl SnapshotName {
    /// Checks `name`; the error says what is wrong with it.
    pub fn new(name: &str) -> Result<SnapshotName, ParseError> {
        let bad = |why: &'static str| ParseError::SnapshotName {
            name: name.chars().take(MAX_SNAPSHOT_NAME_BYTES + 8).collect(),
            why,
        };
        if name.is_empty() {
            return Err(bad("it is empty"));
        }
        if name.len() > MAX_SNAPSHOT_NAME_BYTES {
            return Err(bad("it is longer than 64 bytes"));
        }
        if name.starts_with('.') {
            return Err(bad("it starts with a dot"));
        }
        let allowed = |byte: u8| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.');
        if !name.bytes().all(allowed) {
            return Err(bad("only letters, digits, '-', '_' and '.' are allowed"));
        }
        Ok(SnapshotName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for SnapshotName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        SnapshotName::new(&name).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for SnapshotName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a snapshot holds of the guest's file systems (`docs/OPERATIONS.md`, "Snapshots").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// The disk as after a power cut at that instant: a journaling file system replays its
    /// journal when it mounts it, and data the guest had not synced is not in it.
    Crash,
    /// Taken while the guest agent held the guest's file systems frozen
    /// (`guest-fsfreeze-freeze`): everything written before is in it, and the file systems
    /// are clean (no journal to replay).
    Application,
}

impl Consistency {
    /// The word in a `snapshot create` command and in `ftvm snapshot list`.
    pub fn word(self) -> &'static str {
        match self {
            Consistency::Crash => "crash",
            Consistency::Application => "application",
        }
    }
}

/// A snapshot command (`docs/ARCHITECTURE.md`, "Snapshots"), to a primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotOrder {
    /// `snapshot create NAME [crash|application]`: both copies, at the same point of the
    /// write stream, recorded as of that consistency (crash when not said).
    Create(SnapshotName, Consistency),
    /// `snapshot delete NAME`: from both copies.
    Delete(SnapshotName),
    /// `snapshot revert NAME`: both copies back to the snapshot (no guest may be attached).
    Revert(SnapshotName),
    /// `snapshot list`: this copy's snapshots, answered with [`Snapshots`].
    List,
}

impl SnapshotOrder {
    /// The command's second word.
    pub fn action(&self) -> &'static str {
        match self {
            SnapshotOrder::Create(..) => "create",
            SnapshotOrder::Delete(_) => "delete",
            SnapshotOrder::Revert(_) => "revert",
            SnapshotOrder::List => "list",
        }
    }

    pub fn name(&self) -> Option<&SnapshotName> {
        match self {
            SnapshotOrder::Create(name, _)
            | SnapshotOrder::Delete(name)
            | SnapshotOrder::Revert(name) => Some(name),
            SnapshotOrder::List => None,
        }
    }
}

impl fmt::Display for SnapshotOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "snapshot {}", self.action())?;
        match self {
            SnapshotOrder::Create(name, consistency) => write!(f, " {name} {}", consistency.word()),
            SnapshotOrder::Delete(name) | SnapshotOrder::Revert(name) => write!(f, " {name}"),
            SnapshotOrder::List => Ok(()),
        }
    }
}

/// One snapshot of a copy, as `snapshot list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfo {
    pub name: SnapshotName,
    /// When it was taken (the snapshot file's modification time), seconds since 1970.
    pub created_unix_s: u64,
    /// The disk's size (a snapshot is a whole image).
    pub size_bytes: u64,
    /// Space the snapshot alone holds: its extents that the file system does not share
    /// with any other file (the image, another snapshot). Deleting it frees about this.
    pub unshared_bytes: u64,
    /// Whether the guest's file systems were frozen for it.
    pub consistency: Consistency,
}

/// The answer to `snapshot list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshots {
    /// The image the snapshots are of.
    pub image: String,
    /// Sorted by name.
    pub snapshots: Vec<SnapshotInfo>,
}

/// A Level 3 command (`docs/LEVEL3.md`, "Disk writes at Level 3"): the first three to a
/// primary, the last two to a secondary. Answered with [`Done`] or a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochOrder {
    /// `epoch on EPOCH`: the writes from now on belong to `EPOCH` and the secondary buffers
    /// them until their epoch commits.
    On(Epoch),
    /// `epoch-end N`: `N` must be the current epoch; later writes belong to `N + 1`.
    End(Epoch),
    /// `epoch off`: the secondary applies everything buffered and applies on arrival again.
    Off,
    /// `commit N`: the secondary applies every sealed epoch up to `N`, in arrival order.
    Commit(Epoch),
    /// `wait-sealed N [TIMEOUT_MS]`: answered once epoch `N` is sealed (complete and durable
    /// in the secondary's journal); refused after the timeout (default
    /// [`EpochOrder::DEFAULT_WAIT_MS`], at most [`EpochOrder::MAX_WAIT_MS`]).
    WaitSealed { epoch: Epoch, timeout_ms: u64 },
}

impl EpochOrder {
    /// `wait-sealed` without a timeout waits this long.
    pub const DEFAULT_WAIT_MS: u64 = 500;
    /// The longest `wait-sealed` accepted: the daemon's control socket serves one client at
    /// a time, and ftvmd's `status` must still be answered within its 2 s (the engine asks
    /// again after a refusal).
    pub const MAX_WAIT_MS: u64 = 1_000;

    /// The command's first word.
    pub fn name(self) -> &'static str {
        match self {
            EpochOrder::On(_) | EpochOrder::Off => "epoch",
            EpochOrder::End(_) => "epoch-end",
            EpochOrder::Commit(_) => "commit",
            EpochOrder::WaitSealed { .. } => "wait-sealed",
        }
    }
}

impl fmt::Display for EpochOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        match self {
            EpochOrder::On(epoch) => write!(f, " on {epoch}"),
            EpochOrder::Off => f.write_str(" off"),
            EpochOrder::End(epoch) | EpochOrder::Commit(epoch) => write!(f, " {epoch}"),
            EpochOrder::WaitSealed { epoch, timeout_ms } => write!(f, " {epoch} {timeout_ms}"),
        }
    }
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
    /// `promote GEN EPOCH` (Level 3 failover): a secondary applies its sealed epochs up to
    /// `EPOCH` (the replica's last durable one), discards every later one, then becomes
    /// primary at `GEN`.
    PromoteAtEpoch {
        generation: Generation,
        epoch: Epoch,
    },
    /// `settle` (a planned handover, the guest stopped): a mirroring primary with no write
    /// under way flushes its copy, has the secondary flush its own, and forgets its active
    /// extents: the copies are equal, so the host that takes over resyncs nothing for them.
    Settle,
}

impl Command {
    /// The commands, as `--help` and the error for an unknown one list them.
    pub const SYNOPSIS: &'static str =
        "status, promote [GENERATION [EPOCH]], demote, continue-degraded [GENERATION], fence, \
         repair, settle, dirty-pages, epoch on EPOCH, epoch off, epoch-end EPOCH, commit EPOCH, \
         wait-sealed EPOCH [TIMEOUT_MS], snapshot create NAME [crash|application], snapshot delete|revert NAME, snapshot list";
}

impl Order {
    /// The command's first word.
    pub fn name(self) -> &'static str {
        match self {
            Order::ContinueDegraded(_) => "continue-degraded",
            Order::Fence => "fence",
            Order::Promote(_) | Order::PromoteAtEpoch { .. } => "promote",
            Order::Demote => "demote",
            Order::Repair => "repair",
            Order::Settle => "settle",
        }
    }

    fn generation(self) -> Option<Generation> {
        match self {
            Order::ContinueDegraded(generation) | Order::Promote(generation) => generation,
            Order::PromoteAtEpoch { generation, .. } => Some(generation),
            Order::Fence | Order::Demote | Order::Repair | Order::Settle => None,
        }
    }
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        if let Some(generation) = self.generation() {
            write!(f, " {generation}")?;
        }
        match self {
            Order::PromoteAtEpoch { epoch, .. } => write!(f, " {epoch}"),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Status => f.write_str("status"),
            Command::DirtyPages => f.write_str("dirty-pages"),
            Command::Order(order) => order.fmt(f),
            Command::Epoch(order) => order.fmt(f),
            Command::Snapshot(order) => order.fmt(f),
        }
    }
}

/// Why a disk command line was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("{command}: missing {what}")]
    Missing {
        command: &'static str,
        what: &'static str,
    },
    #[error("{command}: {what} {word:?} is not a number")]
    NotANumber {
        command: &'static str,
        what: &'static str,
        word: String,
    },
    #[error("epoch: {word:?} is neither \"on\" nor \"off\"")]
    NotOnOrOff { word: String },
    #[error("wait-sealed: a timeout of {0} ms is above the most, {max} ms", max = EpochOrder::MAX_WAIT_MS)]
    TimeoutTooLong(u64),
    #[error("snapshot: {word:?} is none of create, delete, revert, list")]
    SnapshotAction { word: String },
    #[error("snapshot create: {word:?} is neither \"crash\" nor \"application\"")]
    Consistency { word: String },
    #[error("invalid snapshot name {name:?}: {why}")]
    SnapshotName { name: String, why: &'static str },
}

/// `snapshot ACTION [NAME]`, after its first word.
fn snapshot_order<'a>(
    words: &mut impl Iterator<Item = &'a str>,
) -> Result<SnapshotOrder, ParseError> {
    let missing_name = || ParseError::Missing {
        command: "snapshot",
        what: "the snapshot's name",
    };
    let order = match words.next() {
        Some("create") => {
            let name = SnapshotName::new(words.next().ok_or_else(missing_name)?)?;
            let consistency = match words.next() {
                None | Some("crash") => Consistency::Crash,
                Some("application") => Consistency::Application,
                Some(other) => {
                    return Err(ParseError::Consistency {
                        word: other.to_owned(),
                    })
                }
            };
            SnapshotOrder::Create(name, consistency)
        }
        Some("delete") => {
            SnapshotOrder::Delete(SnapshotName::new(words.next().ok_or_else(missing_name)?)?)
        }
        Some("revert") => {
            SnapshotOrder::Revert(SnapshotName::new(words.next().ok_or_else(missing_name)?)?)
        }
        Some("list") => SnapshotOrder::List,
        Some(other) => {
            return Err(ParseError::SnapshotAction {
                word: other.to_owned(),
            })
        }
        None => {
            return Err(ParseError::Missing {
                command: "snapshot",
                what: "create, delete, revert or list",
            })
        }
    };
    if words.next().is_some() {
        return Err(CommandError::TooManyArguments {
            command: "snapshot",
        }
        .into());
    }
    Ok(order)
}

/// A decimal number argument (no sign, no other base).
fn number(
    command: &'static str,
    what: &'static str,
    word: Option<&str>,
) -> Result<u64, ParseError> {
    let word = word.ok_or(ParseError::Missing { command, what })?;
    let digits = !word.is_empty() && word.bytes().all(|byte| byte.is_ascii_digit());
    match word.parse::<u64>() {
        Ok(value) if digits => Ok(value),
        _ => Err(ParseError::NotANumber {
            command,
            what,
            word: word.to_owned(),
        }),
    }
}

/// The Level 3 commands' arguments, after their first word.
fn epoch_order<'a>(
    first: &str,
    words: &mut impl Iterator<Item = &'a str>,
) -> Result<Option<EpochOrder>, ParseError> {
    let order = match first {
        "epoch" => match words.next() {
            Some("on") => EpochOrder::On(number("epoch", "the epoch", words.next())?),
            Some("off") => EpochOrder::Off,
            Some(other) => {
                return Err(ParseError::NotOnOrOff {
                    word: other.to_owned(),
                })
            }
            None => {
                return Err(ParseError::Missing {
                    command: "epoch",
                    what: "\"on EPOCH\" or \"off\"",
                })
            }
        },
        "epoch-end" => EpochOrder::End(number("epoch-end", "the epoch", words.next())?),
        "commit" => EpochOrder::Commit(number("commit", "the epoch", words.next())?),
        "wait-sealed" => {
            let epoch = number("wait-sealed", "the epoch", words.next())?;
            let timeout_ms = match words.next() {
                None => EpochOrder::DEFAULT_WAIT_MS,
                Some(word) => number("wait-sealed", "the timeout", Some(word))?,
            };
            if timeout_ms > EpochOrder::MAX_WAIT_MS {
                return Err(ParseError::TimeoutTooLong(timeout_ms));
            }
            EpochOrder::WaitSealed { epoch, timeout_ms }
        }
        _ => return Ok(None),
    };
    Ok(Some(order))
}

impl FromStr for Command {
    type Err = ParseError;

    /// Parses a command line: words separated by white space.
    fn from_str(line: &str) -> Result<Command, ParseError> {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else {
            return Err(CommandError::Empty {
                commands: Command::SYNOPSIS,
            }
            .into());
        };
        if let Some(order) = epoch_order(first, &mut words)? {
            if words.next().is_some() {
                return Err(CommandError::TooManyArguments {
                    command: order.name(),
                }
                .into());
            }
            return Ok(Command::Epoch(order));
        }
        if first == "snapshot" {
            return snapshot_order(&mut words).map(Command::Snapshot);
        }
        let command = match first {
            "status" => Command::Status,
            "dirty-pages" => Command::DirtyPages,
            "continue-degraded" => Command::Order(Order::ContinueDegraded(None)),
            "fence" => Command::Order(Order::Fence),
            "promote" => Command::Order(Order::Promote(None)),
            "demote" => Command::Order(Order::Demote),
            "repair" => Command::Order(Order::Repair),
            "settle" => Command::Order(Order::Settle),
            other => {
                return Err(CommandError::Unknown {
                    word: other.to_owned(),
                    commands: Command::SYNOPSIS,
                }
                .into())
            }
        };
        let name = match &command {
            Command::Status => "status",
            Command::DirtyPages => "dirty-pages",
            Command::Order(order) => order.name(),
            Command::Epoch(order) => order.name(),
            Command::Snapshot(_) => "snapshot",
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
            (Command::Order(Order::Promote(_)), Some(generation)) => match words.next() {
                None => Command::Order(Order::Promote(Some(generation))),
                Some(word) => Command::Order(Order::PromoteAtEpoch {
                    generation,
                    epoch: number("promote", "the epoch", Some(word))?,
                }),
            },
            (_, Some(_)) => return Err(CommandError::TooManyArguments { command: name }.into()),
        };
        if words.next().is_some() {
            return Err(CommandError::TooManyArguments { command: name }.into());
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
    /// Queue kicks that arrived while this copy served no guest (a frontend connected to a
    /// secondary, e.g. a destination QEMU started ahead of a move): nothing was popped.
    pub held_kicks: u64,
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
    /// Level 3: the epochs this primary cuts its writes into.
    pub epochs: PrimaryEpochs,
    /// Guest writes mirrored since the daemon started: from their registration to the
    /// secondary's acknowledgement.
    pub write_latency: LatencyHistogram,
}

/// A latency histogram: how many observations fell in each bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyHistogram {
    /// The buckets' upper bounds in microseconds, ascending; one more bucket above them.
    pub bounds_us: Vec<u64>,
    /// Observations per bucket (not cumulative): one more than `bounds_us`.
    pub counts: Vec<u64>,
    /// The sum of all observations, in microseconds.
    pub sum_us: u64,
}

impl LatencyHistogram {
    /// Each bucket's upper bound in seconds (the last at infinity) with its count (not
    /// cumulative); `None` when the shape is wrong (counts and bounds do not match, bounds
    /// not ascending).
    pub fn buckets_seconds(&self) -> Option<Vec<(f64, u64)>> {
        let ascending = self.bounds_us.windows(2).all(|pair| pair[0] < pair[1]);
        if self.counts.len() != self.bounds_us.len() + 1 || !ascending {
            return None;
        }
        let bounds = self
            .bounds_us
            .iter()
            .map(|bound| *bound as f64 / 1e6)
            .chain(std::iter::once(f64::INFINITY));
        Some(bounds.zip(self.counts.iter().copied()).collect())
    }

    /// All observations.
    pub fn count(&self) -> u64 {
        self.counts
            .iter()
            .fold(0, |sum, count| sum.saturating_add(*count))
    }
}

/// A primary's Level 3 state (`epoch on|off`, `epoch-end`). `Default` is Level 2 (off).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrimaryEpochs {
    /// Writes are cut into epochs (`epoch on`), buffered by the secondary until committed.
    pub enabled: bool,
    /// The epoch the guest's writes belong to now (`null` while off).
    #[serde(deserialize_with = "crate::required")]
    pub current_epoch: Option<Epoch>,
    /// The last epoch the secondary reported sealed (`null`: none since `epoch on`).
    #[serde(deserialize_with = "crate::required")]
    pub sealed_epoch: Option<Epoch>,
    /// Why Level 3 ended without `epoch off` ("RemoteOnly", "degraded", "fenced"); `null`
    /// otherwise.
    #[serde(deserialize_with = "crate::required")]
    pub off_reason: Option<String>,
    /// The highest epoch ever given to `epoch on` or begun by `epoch-end` (`null`: none):
    /// a new `epoch on` must be above it.
    #[serde(default)]
    pub last_epoch: Option<Epoch>,
}

/// A secondary's Level 3 state: its epoch journal and what it applied. `Default` is Level 2
/// with no journal.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecondaryEpochs {
    /// Writes are buffered in the journal (the primary's `EpochStart` until `EpochOff`).
    pub enabled: bool,
    /// The epoch arriving writes are filed under (`null` while off).
    #[serde(deserialize_with = "crate::required")]
    pub receiving_epoch: Option<Epoch>,
    /// The last epoch sealed (complete and durable in the journal).
    #[serde(deserialize_with = "crate::required")]
    pub sealed_epoch: Option<Epoch>,
    /// The last epoch applied to the image (recorded in the metadata).
    #[serde(deserialize_with = "crate::required")]
    pub applied_epoch: Option<Epoch>,
    /// Records waiting in the journal for their epoch's commit, and their data bytes.
    pub buffered_records: u64,
    pub buffered_bytes: u64,
    /// Of those bytes, the ones also held in memory.
    pub memory_bytes: u64,
    pub journal_used_bytes: u64,
    pub journal_size_bytes: u64,
    /// The journal is full: the secondary stops acknowledging until a commit frees room.
    pub journal_full: bool,
    /// Times a record met a full journal.
    pub journal_full_waits: u64,
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
    /// Level 3: the epoch journal.
    pub epochs: SecondaryEpochs,
}

#[cfg(test)]
mod tests;
