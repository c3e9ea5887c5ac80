//! `vhost-net-ft`'s control socket: its commands and its status.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::CommandError;

/// An epoch number of Level 3 output commit (see `docs/LEVEL3.md`).
pub type Epoch = u64;

/// A command to a NIC daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Answered with [`Status`].
    Status,
    /// Moves the LAN's view of the guest's MAC to where its frames leave now; answered
    /// with [`Announced`].
    Announce,
    /// `dirty-pages`: the pages of guest RAM the daemon wrote since the previous
    /// `dirty-pages` (read and cleared in one call); answered with [`DirtyPages`].
    DirtyPages,
    /// `output-commit on EPOCH`: hold the frames the guest sends from now on, as frames of
    /// `EPOCH`; answered with [`OutputCommitted`].
    OutputCommitOn(Epoch),
    /// `output-commit off`: release every held frame in order and stop holding; answered
    /// with [`OutputCommitted`].
    OutputCommitOff,
    /// `epoch-end N`: `N` must be the current epoch; frames sent from now on belong to
    /// `N + 1`. Answered with [`OutputCommitted`].
    EpochEnd(Epoch),
    /// `commit N`: release, in order, every held frame of the epochs up to `N` (`N` must
    /// have ended). Answered with [`OutputCommitted`].
    Commit(Epoch),
    /// `handover on|off` (`ftvm migrate`): the guest stays stopped here for a move, so the
    /// frames the TAP receives for it go to the peer's daemon, which hands them to the
    /// guest once it runs there (`on`), or no longer (`off`). Answered with [`Handover`].
    Handover(bool),
}

impl Command {
    /// The commands, as the error for an unknown one lists them.
    pub const SYNOPSIS: &'static str = "status, announce, dirty-pages, output-commit on EPOCH, \
         output-commit off, epoch-end EPOCH, commit EPOCH, handover on|off";

    fn name(self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Announce => "announce",
            Command::DirtyPages => "dirty-pages",
            Command::OutputCommitOn(_) | Command::OutputCommitOff => "output-commit",
            Command::EpochEnd(_) => "epoch-end",
            Command::Commit(_) => "commit",
            Command::Handover(_) => "handover",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        match self {
            Command::Status | Command::Announce | Command::DirtyPages => Ok(()),
            Command::OutputCommitOn(epoch) => write!(f, " on {epoch}"),
            Command::OutputCommitOff => f.write_str(" off"),
            Command::EpochEnd(epoch) | Command::Commit(epoch) => write!(f, " {epoch}"),
            Command::Handover(on) => f.write_str(if *on { " on" } else { " off" }),
        }
    }
}

/// Why a NIC command line was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("{command}: missing {what}")]
    Missing {
        command: &'static str,
        what: &'static str,
    },
    #[error("{command}: epoch {word:?} is not a number")]
    EpochNotANumber { command: &'static str, word: String },
    #[error("{command}: {word:?} is neither \"on\" nor \"off\"")]
    NotOnOrOff { command: &'static str, word: String },
}

impl FromStr for Command {
    type Err = ParseError;

    fn from_str(line: &str) -> Result<Command, ParseError> {
        let mut words = line.split_whitespace();
        let command = match words.next() {
            None => {
                return Err(CommandError::Empty {
                    commands: Command::SYNOPSIS,
                }
                .into())
            }
            Some("status") => Command::Status,
            Some("announce") => Command::Announce,
            Some("dirty-pages") => Command::DirtyPages,
            Some("output-commit") => match words.next() {
                Some("on") => Command::OutputCommitOn(epoch("output-commit", words.next())?),
                Some("off") => Command::OutputCommitOff,
                Some(other) => {
                    return Err(ParseError::NotOnOrOff {
                        command: "output-commit",
                        word: other.to_owned(),
                    })
                }
                None => {
                    return Err(ParseError::Missing {
                        command: "output-commit",
                        what: "\"on EPOCH\" or \"off\"",
                    })
                }
            },
            Some("epoch-end") => Command::EpochEnd(epoch("epoch-end", words.next())?),
            Some("commit") => Command::Commit(epoch("commit", words.next())?),
            Some("handover") => match words.next() {
                Some("on") => Command::Handover(true),
                Some("off") => Command::Handover(false),
                Some(other) => {
                    return Err(ParseError::NotOnOrOff {
                        command: "handover",
                        word: other.to_owned(),
                    })
                }
                None => {
                    return Err(ParseError::Missing {
                        command: "handover",
                        what: "\"on\" or \"off\"",
                    })
                }
            },
            Some(other) => {
                return Err(CommandError::Unknown {
                    word: other.to_owned(),
                    commands: Command::SYNOPSIS,
                }
                .into())
            }
        };
        match words.next() {
            None => Ok(command),
            Some(_) => Err(CommandError::TooManyArguments {
                command: command.name(),
            }
            .into()),
        }
    }
}

/// An epoch argument: a decimal number (no sign, no other base).
fn epoch(command: &'static str, word: Option<&str>) -> Result<Epoch, ParseError> {
    let word = word.ok_or(ParseError::Missing {
        command,
        what: "the epoch",
    })?;
    let digits = !word.is_empty() && word.bytes().all(|byte| byte.is_ascii_digit());
    match word.parse::<Epoch>() {
        Ok(epoch) if digits => Ok(epoch),
        _ => Err(ParseError::EpochNotANumber {
            command,
            word: word.to_owned(),
        }),
    }
}

/// The answer to `dirty-pages`: the same type as the disk daemon's (`docs/LEVEL3.md`,
/// "Interfaces").
pub use crate::disk::{DirtyFile, DirtyPages};

/// Level 3 output commit as the daemon holds it (in [`Status`] and in the answers to the
/// output-commit commands).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputCommit {
    /// Frames the guest sends are held (`output-commit on`).
    pub enabled: bool,
    /// The epoch the guest's frames belong to now (`null` while off).
    #[serde(deserialize_with = "crate::required")]
    pub current_epoch: Option<Epoch>,
    /// The last epoch committed since `output-commit on` (`null`: none yet, or off).
    #[serde(deserialize_with = "crate::required")]
    pub committed_epoch: Option<Epoch>,
    /// Frames held now, waiting for their epoch's commit.
    pub held_frames: u64,
    /// Bytes of those frames (with their virtio-net headers).
    pub held_bytes: u64,
    /// The buffer's limit (`--output-buffer-bytes`): at or above it, the guest's frames wait
    /// in its TX ring.
    pub buffer_limit_bytes: u64,
    /// Times a queue pair stopped taking frames from the guest's TX ring because the buffer
    /// was full (the frames wait in the ring until a commit frees room; none is dropped).
    pub buffer_full_waits: u64,
    /// Frames released (by `commit` or `output-commit off`) since the daemon started.
    pub released_frames: u64,
}

/// The answer to `output-commit on|off`, `epoch-end` and `commit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputCommitted {
    /// Always `true` (a refusal is a [`crate::Reply::Refused`]).
    pub ok: bool,
    /// Frames this command released (in the order the guest sent them).
    pub released_frames: u64,
    /// The state after the command.
    pub output_commit: OutputCommit,
}

/// The answer to `announce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Announced {
    /// Always `true` (a refusal is a [`crate::Reply::Refused`]).
    pub ok: bool,
    /// A RARP from the guest's MAC went out.
    pub rarp_sent: bool,
    /// `VIRTIO_NET_S_ANNOUNCE` was set: the guest negotiated GUEST_ANNOUNCE.
    pub guest_asked: bool,
}

/// The link as the guest and the host see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// A frontend (QEMU) is connected.
    pub frontend_connected: bool,
    /// `VIRTIO_NET_S_LINK_UP` in the config status.
    pub guest_link_up: bool,
    /// `VIRTIO_NET_S_ANNOUNCE` is set and not yet acknowledged.
    pub announce_pending: bool,
    /// The TAP is administratively up.
    pub tap_up: bool,
    /// The TAP has carrier (we hold it open).
    pub tap_carrier: bool,
    /// The bridge the TAP is a port of now (`null`: none).
    #[serde(deserialize_with = "crate::required")]
    pub tap_master: Option<String>,
}

/// Feature bits, as numbers and names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Features {
    pub offered: String,
    pub acked: String,
    pub acked_names: Vec<String>,
    /// The `TUN_F_*` offloads set on the TAP.
    pub tap_offloads: String,
    /// Length of the virtio-net header on the TAP.
    pub header_len_bytes: usize,
}

/// The path the guest's frames take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// Our own TAP and uplink.
    Local,
    /// The peer host's TAP and uplink, over the A-links.
    Peer,
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Path::Local => "local",
            Path::Peer => "peer",
        })
    }
}

/// The uplink watch and the path through the peer host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redundancy {
    pub path: Path,
    /// The bridge port watched for link loss (`null`: none, no redundant uplink).
    #[serde(deserialize_with = "crate::required")]
    pub uplink: Option<String>,
    /// `null` while the uplink is not watched.
    #[serde(deserialize_with = "crate::required")]
    pub uplink_up: Option<bool>,
    pub peer_configured: bool,
    pub peer_reachable: bool,
    #[serde(deserialize_with = "crate::required")]
    pub peer_uplink_up: Option<bool>,
    pub peer_guest_attached: bool,
    pub relaying_for_peer: bool,
    pub path_switches: u64,
    pub frames_queued_for_guest: usize,
    /// `handover on`: the guest is stopped here for a move and the frames the TAP receives
    /// for it go to the peer's daemon (until the LAN moved the MAC, `handover off`, a guest
    /// started here, or 10 s).
    pub handover_relaying: bool,
    /// Frames the peer's daemon relayed during a move, waiting for the guest to run here.
    pub handover_frames_queued: usize,
    /// The outgoing session's links (opaque here: see the crate's documentation).
    #[serde(deserialize_with = "crate::required")]
    pub peer_session: Option<serde_json::Value>,
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub mac: String,
    pub tap: String,
    #[serde(deserialize_with = "crate::required")]
    pub bridge: Option<String>,
    pub queues: usize,
    pub link: Link,
    pub features: Features,
    pub redundancy: Redundancy,
    /// Level 3 output commit.
    pub output_commit: OutputCommit,
    /// Frames put into the guest's receive buffers.
    pub rx_packets: u64,
    /// Bytes of those frames (without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames from the TAP dropped because the guest's buffers cannot hold them.
    pub rx_dropped_no_buffers: u64,
    /// Times reception paused because the guest had no free receive buffers.
    pub rx_waits_for_buffers: u64,
    /// Times used entries were added while the frontend had no call fd set (a ring
    /// starting again): the guest was interrupted once the fd came.
    pub interrupts_deferred: u64,
    /// Receive buffers returned unused because they were malformed.
    pub rx_bad_buffers: u64,
    /// Reads from the TAP that failed with something else than "nothing to read".
    pub tap_read_errors: u64,
    /// Frames sent to the TAP (or the peer host); a frame held for output commit counts
    /// when it is released.
    pub tx_packets: u64,
    /// Bytes of those frames (without the virtio-net header).
    pub tx_bytes: u64,
    /// Guest TX chains dropped as malformed.
    pub tx_dropped_malformed: u64,
    /// Frames the TAP refused; dropped.
    pub tap_write_errors: u64,
    /// Control virtqueue commands answered.
    pub ctrl_commands: u64,
    /// Announcements made (`announce` on the control socket).
    pub announcements: u64,
    /// Frontend connections accepted since start.
    pub connections: u64,
    pub connected: bool,
    /// Guest frames sent to the peer host (our uplink is down).
    pub peer_tx_packets: u64,
    /// Link messages those frames took: several frames the guest queued at once share one.
    pub peer_tx_messages: u64,
    /// Guest frames for the peer host dropped: the link's send window was full or closed.
    pub peer_tx_dropped: u64,
    /// Frames from the peer host put on the guest's receive queue.
    pub peer_rx_packets: u64,
    /// Messages from the peer host dropped.
    pub peer_rx_dropped: u64,
    /// Relaying for the peer: its guest's frames written to our TAP.
    pub relay_to_lan_packets: u64,
    /// Relaying for the peer: frames for its guest read from our TAP and sent to it.
    pub relay_to_peer_packets: u64,
    /// A move's source (`handover on`): frames for the stopped guest read from our TAP and
    /// sent to the peer's daemon.
    pub handover_relayed_packets: u64,
    /// A move's source: such frames the link's send window refused (dropped).
    pub handover_relay_dropped: u64,
    /// A move's destination: frames the peer relayed during the move, passed to the
    /// guest's receive queue once it ran here.
    pub handover_rx_packets: u64,
    /// A move's destination: frames the peer relayed during the move, dropped (the queue
    /// was full, oldest first; older than 2 s; not valid for the guest's features).
    pub handover_rx_dropped: u64,
}

/// The answer to `handover on|off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handover {
    /// Frames for the guest go to the peer's daemon now.
    pub relaying: bool,
}

#[cfg(test)]
mod tests;
