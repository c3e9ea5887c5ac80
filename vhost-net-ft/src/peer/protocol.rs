//! The peer link's wire format and the pure decisions: the messages, the check of a frame
//! from the peer, and the choice of the path.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::frame::{validate_tx, FrameError, TxOffloads, VnetHeader, VNET_HDR_LEN};

/// How long the uplink must be up again before traffic moves back to it (a flapping port
/// does not move the MAC back and forth).
pub const FAILBACK: Duration = Duration::from_millis(500);

/// What the two daemons of a NIC send each other (the postcard application header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// The sender's state; every [`STATE_INTERVAL`] and at once on a change.
    State(PeerState),
    /// The payload is a 12-byte virtio-net header and an Ethernet frame.
    Frame(Direction),
    /// The payload is several frames, each a `u32` little-endian length and that many bytes
    /// (a 12-byte virtio-net header and an Ethernet frame), in order: what the guest queued
    /// in one go (see [`FrameBatch`]). One message instead of one per frame.
    Frames(Direction),
}

/// The length before each frame of a [`PeerMessage::Frames`] payload.
pub const BATCH_LENGTH_BYTES: usize = 4;

/// A [`PeerMessage::Frames`] payload that does not split into whole frames.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("a batch of frames from the peer is cut short at byte {offset}: {needed} bytes announced, {left} left")]
pub struct BatchError {
    pub offset: usize,
    pub needed: usize,
    pub left: usize,
}

/// The frames of a [`PeerMessage::Frames`] payload, in order, as slices of it (no copy).
/// After a cut-short frame it yields that error and then nothing. Pure; fuzzed.
pub fn split_batch(payload: &[u8]) -> BatchFrames<'_> {
    BatchFrames {
        payload,
        offset: 0,
        failed: false,
    }
}

/// The iterator of [`split_batch`].
#[derive(Debug)]
pub struct BatchFrames<'a> {
    payload: &'a [u8],
    offset: usize,
    failed: bool,
}

impl<'a> Iterator for BatchFrames<'a> {
    type Item = Result<&'a [u8], BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.payload.get(self.offset..).unwrap_or_default();
        if self.failed || rest.is_empty() {
            return None;
        }
        let cut = |needed| BatchError {
            offset: self.offset,
            needed,
            left: rest.len(),
        };
        let Some((length, frames)) = rest.split_first_chunk::<BATCH_LENGTH_BYTES>() else {
            self.failed = true;
            return Some(Err(cut(BATCH_LENGTH_BYTES)));
        };
        let length = u32::from_le_bytes(*length) as usize;
        let Some(frame) = frames.get(..length) else {
            self.failed = true;
            return Some(Err(cut(BATCH_LENGTH_BYTES.saturating_add(length))));
        };
        self.offset += BATCH_LENGTH_BYTES + length;
        Some(Ok(frame))
    }
}

/// Builds a [`PeerMessage::Frames`] payload: frames are appended in place (a caller can read
/// a frame straight into [`FrameBatch::append`]'s buffer), the payload taken whole.
#[derive(Debug, Default)]
pub struct FrameBatch {
    bytes: Vec<u8>,
    frames: usize,
}

impl FrameBatch {
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Payload bytes so far.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }

    /// Appends one frame of `length` bytes that `fill` writes into the slice it is given
    /// (zeroed first); `fill` returning an error leaves the batch as it was.
    pub fn append<E>(
        &mut self,
        length: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let start = self.bytes.len();
        let prefix = u32::try_from(length).unwrap_or(u32::MAX).to_le_bytes();
        self.bytes.extend_from_slice(&prefix);
        self.bytes.resize(start + BATCH_LENGTH_BYTES + length, 0);
        match fill(&mut self.bytes[start + BATCH_LENGTH_BYTES..]) {
            Ok(()) => {
                self.frames += 1;
                Ok(())
            }
            Err(error) => {
                self.bytes.truncate(start);
                Err(error)
            }
        }
    }

    /// The payload and the number of frames in it; the batch is empty afterwards.
    pub fn take(&mut self) -> (Vec<u8>, usize) {
        let frames = std::mem::take(&mut self.frames);
        (std::mem::take(&mut self.bytes), frames)
    }
}

/// Where a frame from the peer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// A frame of the peer's guest, for our TAP (we relay for the peer).
    ToLan,
    /// A frame our peer's TAP received for our guest.
    ToGuest,
    /// A frame the peer's TAP received for the guest while it was stopped there for a move
    /// (`handover on`): queued until the guest runs here (`handover`).
    Handover,
}

/// A daemon's state as its peer needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerState {
    /// The sender's uplink: up, down, or not watched (`None`).
    pub uplink_up: Option<bool>,
    /// A frontend (the VM) is attached to the sender.
    pub guest_attached: bool,
    /// The sender's guest uses the receiver's uplink: relay for it.
    pub want_relay: bool,
    /// The `TUN_F_*` offloads the sender's guest takes: what the relaying TAP may hand over.
    pub offloads: u32,
}

/// Why a frame from the peer was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PeerFrameError {
    #[error("a frame for our guest, but no guest is attached here")]
    NoGuest,
    #[error("a frame for our LAN, but we are not relaying for the peer (our guest is attached here, or the peer did not ask)")]
    NotRelaying,
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Checks a frame from the peer (12-byte header and Ethernet frame) against this daemon's
/// state: a `ToGuest` frame needs an attached guest and may only use the offloads the guest
/// negotiated (`acked_features`); a `ToLan` frame needs no guest here and a relay the peer
/// asked for (`relaying`: a late frame from before is not put on the LAN), and may use any
/// offload the TAP takes; a `Handover` frame is taken with or without a guest (one that
/// does not run yet takes it later) and may use any offload here: it is checked against
/// the guest's at delivery. Pure; fuzzed with the frame parser.
pub fn check_frame_from_peer(
    direction: Direction,
    payload: &[u8],
    guest_attached: bool,
    relaying: bool,
    acked_features: u64,
) -> Result<VnetHeader, PeerFrameError> {
    let offloads = match direction {
        Direction::ToGuest if guest_attached => TxOffloads::guest_receive(acked_features),
        Direction::ToGuest => return Err(PeerFrameError::NoGuest),
        // Checked against the guest's offloads when it is delivered (a frontend may have
        // acked features before its guest runs, and acks them again when it does).
        Direction::Handover => TxOffloads::ALL,
        Direction::ToLan if relaying && !guest_attached => TxOffloads::ALL,
        Direction::ToLan => return Err(PeerFrameError::NotRelaying),
    };
    Ok(validate_tx(payload, VNET_HDR_LEN, offloads)?)
}

/// The path the guest's frames take (a word of the control protocol's status).
pub use control_protocol::nic::Path;

/// Decides the path from the uplink's state and the peer's usability. Pure.
#[derive(Debug, Default)]
pub struct PathChooser {
    via_peer: bool,
    /// Since when the local uplink is up again, while on the peer path.
    local_up_since: Option<Instant>,
}

impl PathChooser {
    pub fn path(&self) -> Path {
        if self.via_peer {
            Path::Peer
        } else {
            Path::Local
        }
    }

    /// `local_up`: our uplink (`None`: not watched, taken as up). `peer_usable`: the peer is
    /// reachable, fresh, has no guest and its uplink is not down. Returns the new path on a
    /// switch.
    pub fn decide(
        &mut self,
        local_up: Option<bool>,
        peer_usable: bool,
        now: Instant,
    ) -> Option<Path> {
        let local_ok = local_up != Some(false);
        if !self.via_peer {
            if !local_ok && peer_usable {
                self.via_peer = true;
                self.local_up_since = None;
                return Some(Path::Peer);
            }
            return None;
        }
        if !local_ok {
            self.local_up_since = None;
        } else if self.local_up_since.is_none() {
            self.local_up_since = Some(now);
        }
        let failback = self
            .local_up_since
            .is_some_and(|since| now.saturating_duration_since(since) >= FAILBACK);
        if failback || !peer_usable {
            self.via_peer = false;
            self.local_up_since = None;
            return Some(Path::Local);
        }
        None
    }

    /// No guest: no path to choose; back to local.
    pub fn reset(&mut self) -> Option<Path> {
        let was = self.via_peer;
        *self = PathChooser::default();
        was.then_some(Path::Local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FLAG_NEEDS_CSUM, GSO_TCPV4};
    use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4};

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn uplink_loss_moves_to_the_peer_only_if_it_can_relay() {
        let start = Instant::now();
        let mut chooser = PathChooser::default();
        assert_eq!(chooser.decide(Some(true), true, start), None);
        assert_eq!(chooser.decide(None, true, start), None, "unwatched is up");
        assert_eq!(chooser.decide(Some(false), false, start), None);
        assert_eq!(chooser.path(), Path::Local);
        assert_eq!(
            chooser.decide(Some(false), true, at(start, 20)),
            Some(Path::Peer)
        );
        assert_eq!(chooser.decide(Some(false), true, at(start, 40)), None);
        assert_eq!(chooser.path(), Path::Peer);
    }

    #[test]
    fn failback_waits_until_the_uplink_stayed_up() {
        let start = Instant::now();
        let mut chooser = PathChooser::default();
        chooser.decide(Some(false), true, start);
        // Up, down again before FAILBACK: stays on the peer, and the wait starts over.
        assert_eq!(chooser.decide(Some(true), true, at(start, 100)), None);
        assert_eq!(chooser.decide(Some(false), true, at(start, 300)), None);
        assert_eq!(chooser.decide(Some(true), true, at(start, 400)), None);
        assert_eq!(chooser.decide(Some(true), true, at(start, 800)), None);
        assert_eq!(
            chooser.decide(Some(true), true, at(start, 900)),
            Some(Path::Local)
        );
        assert_eq!(chooser.path(), Path::Local);
    }

    #[test]
    fn a_lost_peer_ends_the_peer_path() {
        let start = Instant::now();
        let mut chooser = PathChooser::default();
        chooser.decide(Some(false), true, start);
        assert_eq!(
            chooser.decide(Some(false), false, at(start, 20)),
            Some(Path::Local)
        );
        // And it comes back when the peer does.
        assert_eq!(
            chooser.decide(Some(false), true, at(start, 40)),
            Some(Path::Peer)
        );
        assert_eq!(chooser.reset(), Some(Path::Local));
        assert_eq!(chooser.reset(), None);
    }

    fn frame(header: VnetHeader, len: usize) -> Vec<u8> {
        let mut bytes = header.encode().to_vec();
        bytes.extend(std::iter::repeat_n(0x5a, len));
        bytes
    }

    #[test]
    fn frames_from_the_peer_must_fit_our_state() {
        let plain = frame(VnetHeader::default(), 60);
        assert!(check_frame_from_peer(Direction::ToGuest, &plain, true, false, 0).is_ok());
        assert!(check_frame_from_peer(Direction::ToLan, &plain, false, true, 0).is_ok());
        assert_eq!(
            check_frame_from_peer(Direction::ToGuest, &plain, false, true, 0),
            Err(PeerFrameError::NoGuest)
        );
        assert_eq!(
            check_frame_from_peer(Direction::ToLan, &plain, true, true, 0),
            Err(PeerFrameError::NotRelaying)
        );
        // A late frame for the LAN, from a relay the peer no longer asks for.
        assert_eq!(
            check_frame_from_peer(Direction::ToLan, &plain, false, false, 0),
            Err(PeerFrameError::NotRelaying)
        );
        let short = frame(VnetHeader::default(), 4);
        assert!(matches!(
            check_frame_from_peer(Direction::ToLan, &short, false, true, 0),
            Err(PeerFrameError::Frame(FrameError::ShortFrame { .. }))
        ));
        assert!(check_frame_from_peer(Direction::ToLan, &[1, 2], false, true, 0).is_err());
    }

    #[test]
    fn a_guest_gets_segmentation_offload_only_if_it_negotiated_it() {
        let tso = frame(
            VnetHeader {
                flags: FLAG_NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: 54,
                gso_size: 1448,
                csum_start: 34,
                csum_offset: 16,
                num_buffers: 0,
            },
            3000,
        );
        assert!(check_frame_from_peer(Direction::ToGuest, &tso, true, false, 0).is_err());
        let features = (1u64 << VIRTIO_NET_F_GUEST_CSUM) | (1u64 << VIRTIO_NET_F_GUEST_TSO4);
        assert!(check_frame_from_peer(Direction::ToGuest, &tso, true, false, features).is_ok());
        // The relaying TAP takes any offload.
        assert!(check_frame_from_peer(Direction::ToLan, &tso, false, true, 0).is_ok());
    }

    #[test]
    fn a_batch_splits_into_its_frames_and_a_cut_one_is_an_error() {
        let mut batch = FrameBatch::default();
        for fill in [1u8, 2, 3] {
            batch
                .append(usize::from(fill) * 10, |bytes| {
                    bytes.fill(fill);
                    Ok::<(), ()>(())
                })
                .expect("append");
        }
        assert_eq!(batch.append(5, |_| Err("refused")), Err("refused"));
        assert_eq!(batch.frames(), 3);
        let (payload, frames) = batch.take();
        assert_eq!((frames, batch.frames(), batch.len()), (3, 0, 0));
        assert_eq!(payload.len(), 3 * BATCH_LENGTH_BYTES + 60);
        let split: Vec<_> = split_batch(&payload)
            .collect::<Result<_, _>>()
            .expect("whole");
        assert_eq!(split, vec![&[1u8; 10][..], &[2u8; 20][..], &[3u8; 30][..]]);
        assert_eq!(split_batch(&[]).count(), 0);
        // Cut in the third frame, then in a length prefix: the whole frames, then the error.
        let cut: Vec<_> = split_batch(&payload[..payload.len() - 1]).collect();
        assert_eq!(cut.len(), 3);
        assert_eq!(
            cut[2],
            Err(BatchError {
                offset: 38,
                needed: 34,
                left: 33
            })
        );
        let cut: Vec<_> = split_batch(&payload[..16]).collect();
        assert_eq!(cut.len(), 2);
        assert!(cut[1].is_err());
        // A length of 4 GiB is only an error, nothing is allocated.
        let huge = [0xff, 0xff, 0xff, 0xff, 0];
        assert!(matches!(split_batch(&huge).next(), Some(Err(_))));
    }

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let state = PeerMessage::State(PeerState {
            uplink_up: Some(false),
            guest_attached: true,
            want_relay: true,
            offloads: 7,
        });
        let bytes = postcard::to_allocvec(&state).expect("encode");
        assert_eq!(
            postcard::from_bytes::<PeerMessage>(&bytes).expect("decode"),
            state
        );
        let frames = PeerMessage::Frames(Direction::ToLan);
        let bytes = postcard::to_allocvec(&frames).expect("encode");
        assert_eq!(
            postcard::from_bytes::<PeerMessage>(&bytes).expect("decode"),
            frames
        );
        for garbage in [&[][..], &[9], &[0, 2], &[1, 7], &[3]] {
            assert!(
                postcard::from_bytes::<PeerMessage>(garbage).is_err(),
                "{garbage:?}"
            );
        }
    }
}
