//! The mirror protocol: messages between a primary's and a secondary's `vhost-blk-mirror`,
//! carried by the replication link (which authenticates, orders and retransmits them).
//!
//! Every message that changes the secondary's disk carries the sender's generation; the
//! secondary refuses a generation lower than its own (fencing token). Block data travels as
//! the message payload, with its CRC32C in the header, checked before the block is written.

use std::io;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use control_protocol::disk::SnapshotName;

use crate::metadata::DataState;

/// Most suspect ranges a secondary lists in its `Welcome` (beyond, a full resync).
pub const MAX_SUSPECT_RANGES: usize = 65_536;

/// Messages of the mirror protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Primary → secondary, first message of a session.
    Hello { generation: u64, size_bytes: u64 },
    /// Secondary → primary: the answer to `Hello`.
    Welcome {
        generation: u64,
        data_state: DataState,
        /// The secondary's host went down under it since the last resync: writes it had
        /// acknowledged but not flushed may be lost, so recently written regions must be
        /// resynced.
        lost_unflushed: bool,
        /// The payload lists, as postcard `Vec<(offset, len)>`, the regions where this
        /// copy may differ from what the primaries before agreed (its out-of-sync chunks
        /// and active extents); `false` when they were too many to list.
        suspect_listed: bool,
        /// The secondary's disk failed a write (or cannot record its state) and it applies
        /// nothing until the operator repairs it: the primary keeps running without it.
        disk_failed: bool,
    },
    /// A guest write; the payload is the data.
    Write {
        id: u64,
        generation: u64,
        offset: u64,
        crc32c: u32,
    },
    /// A discard or write-zeroes of a range.
    Zero {
        id: u64,
        generation: u64,
        offset: u64,
        len: u64,
        deallocate: bool,
    },
    /// Make every acknowledged write durable.
    Flush { id: u64, generation: u64 },
    /// A resync is starting: the secondary's copy is Inconsistent until `ResyncDone`.
    ResyncStart { id: u64, generation: u64 },
    /// One resynced block; the payload is the data.
    ResyncBlock {
        id: u64,
        generation: u64,
        offset: u64,
        crc32c: u32,
    },
    /// Compare mode: the secondary answers `Done` if its range has this BLAKE3 hash, else
    /// `Differs` (and the primary sends the block).
    ResyncCompare {
        id: u64,
        generation: u64,
        offset: u64,
        len: u64,
        hash: [u8; 32],
    },
    /// Secondary → primary: the range of `ResyncCompare` `id` differs.
    Differs { id: u64 },
    /// Every out-of-sync region has been copied: the secondary's copy is UpToDate.
    ResyncDone { id: u64, generation: u64 },
    /// Primary → secondary: read a range (the primary's own disk failed).
    Read { id: u64, offset: u64, len: u64 },
    /// Secondary → primary: the data of `Read` `id`; the payload is the data.
    ReadData { id: u64, crc32c: u32 },
    /// Secondary → primary: request `id` is done on the secondary's disk.
    Done { id: u64 },
    /// Secondary → primary: request `id` failed or was refused.
    Failed { id: u64, reason: Refusal },
    /// Level 3: from here on, writes belong to `epoch` and are buffered until it commits.
    /// `resumed`: sent again in a new session (the epoch may be one the secondary already
    /// holds); else the engine's `epoch on`, which must be above every epoch before it.
    EpochStart {
        id: u64,
        generation: u64,
        epoch: u64,
        resumed: bool,
    },
    /// Level 3: every write of `epoch` came before this marker; later ones belong to
    /// `epoch + 1`. Answered with `Sealed` once the epoch is durable on the secondary.
    EpochEnd {
        id: u64,
        generation: u64,
        epoch: u64,
    },
    /// Level 3 ends: apply everything buffered, in order, and apply on arrival again.
    EpochOff { id: u64, generation: u64 },
    /// Secondary → primary: `EpochEnd` `id` is in the journal and synced.
    Sealed { id: u64, epoch: u64 },
    /// Primary → secondary: a barrier. Every write before it is on both copies and none
    /// comes after it until it is answered (`Done`, or `SnapshotFailed` when nothing
    /// changed): take snapshot `name` of this copy, revert this copy to it, or delete it.
    /// The name is checked again on arrival (decoding refuses path characters).
    Snapshot {
        id: u64,
        generation: u64,
        name: SnapshotName,
        action: SnapshotAction,
    },
    /// Secondary → primary: `Snapshot` `id` was not carried out; this copy is unchanged.
    SnapshotFailed { id: u64, reason: String },
}

/// What a `Snapshot` barrier does on the secondary's copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotAction {
    /// Take it, recorded as of this consistency (the guest's file systems frozen or not).
    Create(control_protocol::disk::Consistency),
    Revert,
    Delete,
}

impl Message {
    /// The id and generation of a request that changes the secondary's copy.
    pub fn id_and_generation(&self) -> Option<(u64, u64)> {
        match *self {
            Message::Write { id, generation, .. }
            | Message::Zero { id, generation, .. }
            | Message::Flush { id, generation }
            | Message::ResyncStart { id, generation }
            | Message::ResyncBlock { id, generation, .. }
            | Message::ResyncCompare { id, generation, .. }
            | Message::ResyncDone { id, generation }
            | Message::EpochStart { id, generation, .. }
            | Message::EpochEnd { id, generation, .. }
            | Message::EpochOff { id, generation }
            | Message::Snapshot { id, generation, .. } => Some((id, generation)),
            Message::Hello { .. }
            | Message::Welcome { .. }
            | Message::Read { .. }
            | Message::ReadData { .. }
            | Message::Differs { .. }
            | Message::Done { .. }
            | Message::Failed { .. }
            | Message::Sealed { .. }
            | Message::SnapshotFailed { .. } => None,
        }
    }
}

/// Why a secondary did not apply a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The sender's generation is lower than the secondary's: a newer primary exists.
    StaleGeneration { ours: u64 },
    /// The disks have different sizes.
    SizeMismatch { ours: u64 },
    /// The block's CRC32C did not match its data.
    Checksum,
    /// The secondary's image returned an error, or an earlier one left its disk failed:
    /// its copy is durably Inconsistent (it applies nothing until repaired).
    Io(String),
    /// The request does not fit the disk.
    OutOfRange,
    /// A Level 3 marker out of turn (an `EpochEnd` for another epoch than the current
    /// one, an `EpochStart` behind what is sealed); nothing changed.
    EpochOutOfTurn { receiving: Option<u64> },
}

/// A message's payload as it arrived.
#[derive(Debug)]
pub struct Payload {
    pub bytes: Vec<u8>,
    /// The CRC32C of `bytes`, when the transport checked it against them on arrival (the
    /// replication link does): the sender's checksum is compared with it instead of hashing
    /// the data a second time.
    pub checked_crc32c: Option<u32>,
}

impl Payload {
    /// A payload whose checksum nobody checked yet.
    pub fn unchecked(bytes: Vec<u8>) -> Payload {
        Payload {
            bytes,
            checked_crc32c: None,
        }
    }

    /// Whether `crc32c` (the sender's, from the message header) is the CRC32C of the data.
    pub fn matches(&self, crc32c: u32) -> bool {
        self.checked_crc32c
            .unwrap_or_else(|| crc32c::crc32c(&self.bytes))
            == crc32c
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

/// The CRC32C of a message's payload: the one its header carries, computed where the data
/// was read (it follows the data to the secondary's disk), else computed here.
pub fn payload_crc32c(message: &Message, payload: &[u8]) -> u32 {
    match message {
        Message::Write { crc32c, .. }
        | Message::ResyncBlock { crc32c, .. }
        | Message::ReadData { crc32c, .. } => *crc32c,
        _ => crc32c::crc32c(payload),
    }
}

/// What arrives from the replication link.
#[derive(Debug)]
pub enum Received {
    Message(Message, Payload),
    /// The peer's process restarted (or the session was replaced): messages not yet
    /// answered may never be; the sender must start over with `Hello`.
    PeerRestarted,
}

/// What the mirror needs from the replication link.
pub trait Transport: Send + Sync {
    /// Queues a message for exactly-once, in-order delivery; blocks while the send window is
    /// full.
    fn send(&self, message: &Message, payload: Vec<u8>) -> io::Result<()>;
    /// The next message from the peer, if one arrives within `timeout`.
    fn recv(&self, timeout: Duration) -> io::Result<Option<Received>>;
    /// Whether the peer was heard from within the link timeout on some link.
    fn peer_reachable(&self) -> bool;
    /// Per-link state for `status`.
    fn links(&self) -> serde_json::Value;
    /// Stops the session's threads.
    fn close(&self);
    /// A sender bound to the current session, for an answer given after the receiving
    /// thread moved on: once a newer session (a restarted primary, whose request ids
    /// start over) replaced this one, what it sends never reaches the newer one. `None`
    /// where the transport has none: then answers come from the receiving thread.
    fn session_replier(&self) -> Option<Replier> {
        None
    }
    /// Lets the link's receiving threads run `handler` on each message `inline` accepts,
    /// in order with the others (which still come out of `recv`): the receiving thread's
    /// wake-up per message is saved. `inline` must accept only messages whose handling
    /// never waits for the link (window space, an answer). Transports without receiving
    /// threads of their own ignore it.
    fn set_inline_handler(&self, _inline: fn(&Message) -> bool, _handler: InlineHandler) {}
}

/// Handles a message on the link's receiving thread (see `Transport::set_inline_handler`).
pub type InlineHandler = Box<dyn Fn(Message, Payload) + Send + Sync>;

/// Sends one answer on the session it was taken from (see `Transport::session_replier`).
pub type Replier = Box<dyn Fn(&Message) -> io::Result<()> + Send>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_postcard() {
        let messages = [
            Message::Write {
                id: 7,
                generation: 3,
                offset: 4096,
                crc32c: 0xdead_beef,
            },
            Message::Failed {
                id: 9,
                reason: Refusal::StaleGeneration { ours: 4 },
            },
            Message::Welcome {
                generation: 2,
                data_state: DataState::Inconsistent,
                lost_unflushed: true,
                suspect_listed: true,
                disk_failed: false,
            },
        ];
        for message in messages {
            let bytes = postcard::to_allocvec(&message).expect("encode");
            let back: Message = postcard::from_bytes(&bytes).expect("decode");
            assert_eq!(back, message);
        }
    }

    /// The wire keeps its variants' order: a new message is added at the end, so an older
    /// peer's messages decode as they did.
    #[test]
    fn the_level3_messages_come_after_the_level2_ones() {
        let failed = postcard::to_allocvec(&Message::Failed {
            id: 1,
            reason: Refusal::OutOfRange,
        })
        .expect("encode");
        assert_eq!(failed[0], 13, "Failed stays the 14th variant");
        let expectations = [
            (
                Message::EpochStart {
                    id: 1,
                    generation: 2,
                    epoch: 3,
                    resumed: true,
                },
                14,
            ),
            (
                Message::EpochEnd {
                    id: 1,
                    generation: 2,
                    epoch: 3,
                },
                15,
            ),
            (
                Message::EpochOff {
                    id: 1,
                    generation: 2,
                },
                16,
            ),
            (Message::Sealed { id: 1, epoch: 3 }, 17),
        ];
        for (message, tag) in expectations {
            let bytes = postcard::to_allocvec(&message).expect("encode");
            assert_eq!(bytes[0], tag, "{message:?}");
            assert_eq!(
                postcard::from_bytes::<Message>(&bytes).expect("decode"),
                message
            );
        }
        let refusal =
            postcard::to_allocvec(&Refusal::EpochOutOfTurn { receiving: Some(4) }).expect("encode");
        assert_eq!(refusal[0], 5);
    }

    /// The snapshot messages come after the Level 3 ones, and a name with path characters
    /// from the peer does not decode.
    #[test]
    fn the_snapshot_messages_come_last_and_check_their_name() {
        let snapshot = Message::Snapshot {
            id: 1,
            generation: 2,
            name: SnapshotName::new("s1").expect("valid"),
            action: SnapshotAction::Revert,
        };
        let bytes = postcard::to_allocvec(&snapshot).expect("encode");
        assert_eq!(bytes[0], 18);
        assert_eq!(
            postcard::from_bytes::<Message>(&bytes).expect("decode"),
            snapshot
        );
        let failed = Message::SnapshotFailed {
            id: 1,
            reason: "no snapshot named s1 on this copy".into(),
        };
        let bytes = postcard::to_allocvec(&failed).expect("encode");
        assert_eq!(bytes[0], 19);
        // The same frame with the name "../x" (same length as "s1" + 2): refused.
        let mut hostile = postcard::to_allocvec(&Message::Snapshot {
            id: 1,
            generation: 2,
            name: SnapshotName::new("abcd").expect("valid"),
            action: SnapshotAction::Create(control_protocol::disk::Consistency::Crash),
        })
        .expect("encode");
        let at = hostile
            .windows(4)
            .position(|window| window == b"abcd")
            .expect("name in the frame");
        hostile[at..at + 4].copy_from_slice(b"../x");
        assert!(postcard::from_bytes::<Message>(&hostile).is_err());
    }

    #[test]
    fn garbage_does_not_decode_into_a_message() {
        assert!(postcard::from_bytes::<Message>(&[0xff, 0xff, 0xff]).is_err());
    }
}
