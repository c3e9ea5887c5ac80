//! `vhost-net-ft`'s control socket: its commands and its status.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::CommandError;

/// A command to a NIC daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Answered with [`Status`].
    Status,
    /// Moves the LAN's view of the guest's MAC to where its frames leave now; answered
    /// with [`Announced`].
    Announce,
}

impl Command {
    /// The commands, as the error for an unknown one lists them.
    pub const SYNOPSIS: &'static str = "status, announce";

    fn name(self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::Announce => "announce",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Command {
    type Err = CommandError;

    fn from_str(line: &str) -> Result<Command, CommandError> {
        let mut words = line.split_whitespace();
        let command = match words.next() {
            None => {
                return Err(CommandError::Empty {
                    commands: Command::SYNOPSIS,
                })
            }
            Some("status") => Command::Status,
            Some("announce") => Command::Announce,
            Some(other) => {
                return Err(CommandError::Unknown {
                    word: other.to_owned(),
                    commands: Command::SYNOPSIS,
                })
            }
        };
        match words.next() {
            None => Ok(command),
            Some(_) => Err(CommandError::TooManyArguments {
                command: command.name(),
            }),
        }
    }
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
    /// Frames put into the guest's receive buffers.
    pub rx_packets: u64,
    /// Bytes of those frames (without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames from the TAP dropped because the guest's buffers cannot hold them.
    pub rx_dropped_no_buffers: u64,
    /// Times reception paused because the guest had no free receive buffers.
    pub rx_waits_for_buffers: u64,
    /// Receive buffers returned unused because they were malformed.
    pub rx_bad_buffers: u64,
    /// Reads from the TAP that failed with something else than "nothing to read".
    pub tap_read_errors: u64,
    /// Frames sent to the TAP.
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
}

#[cfg(test)]
mod tests;
