//! Where validated guest frames go: the seam for Level 3 output commit.
//!
//! Each queue pair's worker owns one [`TxSink`] and hands it every frame it accepted from the
//! guest, in the order the guest queued them: an [`EpochSink`], which sends at once (on the TAP,
//! or to the peer host while the uplink is down: [`send_now`]) while Level 3 output commit is
//! off, and otherwise keeps the frames of epoch N (they are owned, see [`TxFrame`]) in the
//! NIC's [`crate::output::OutputCommit`] until checkpoint N has committed on the secondary.
//! The guest's TX buffers are returned as soon as `send` returns; only a full buffer makes
//! the worker leave frames in the guest's ring ([`TxSink::has_room`]).
//!
//! On the peer path with output commit off, the worker reads the guest's frames straight
//! into the sink's [`FrameBatch`] ([`TxSink::peer_batch`]) and the sink sends each pass's
//! frames to the peer host as one link message ([`TxSink::flush`]), so a deep TX queue costs
//! one message, one link hand-off and one wake-up of the peer's daemon, not one per frame.
//! A single frame is sent at the end of its pass as before: no wait is added.

use std::io;
use std::sync::Arc;

use thiserror::Error;

use crate::device::Device;
use crate::frame::{convert_header, MAX_FRAME_BYTES, VNET_HDR_LEN};
use crate::metrics::Metrics;
use crate::peer::{FrameBatch, BATCH_BYTES, BATCH_LENGTH_BYTES};
use replication_link::error_chain;

/// One frame as the TAP takes it: a virtio-net header (already checked and normalised) and
/// the Ethernet frame, in one owned buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxFrame {
    bytes: Vec<u8>,
    header_len: usize,
}

impl TxFrame {
    /// `bytes` starts with a `header_len`-byte header (callers pass validated frames).
    pub fn new(bytes: Vec<u8>, header_len: usize) -> TxFrame {
        TxFrame { bytes, header_len }
    }

    /// Header and frame, as written to the TAP.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The Ethernet frame without the header.
    pub fn frame(&self) -> &[u8] {
        self.bytes.get(self.header_len..).unwrap_or_default()
    }

    /// The length of the virtio-net header in [`TxFrame::bytes`].
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// The bytes (header and frame) and the header's length.
    pub fn into_parts(self) -> (Vec<u8>, usize) {
        (self.bytes, self.header_len)
    }
}

#[derive(Debug, Error)]
pub enum SinkError {
    #[error("cannot write a frame to TAP device {tap}")]
    Tap {
        tap: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot send a frame to the peer host")]
    Peer(#[source] replication_link::SessionError),
}

/// Takes the frames one queue pair's guest sends, in order.
pub trait TxSink: Send {
    /// Sends (or, for a buffering sink, holds) one frame; counts and logs what became of it.
    fn send(&mut self, frame: TxFrame);

    /// Whether the sink takes another frame now. `false`: the worker leaves the guest's
    /// frames in its TX ring until the sink wakes the pair (see [`crate::output`]).
    fn has_room(&self) -> bool {
        true
    }

    /// The worker stopped taking frames because [`TxSink::has_room`] said no.
    fn count_full_wait(&self) {}

    /// Where the worker may put the next frame (a 12-byte header first) straight from the
    /// guest, while frames go to the peer host at once; `None`: use [`TxSink::send`].
    /// Frames put there leave at the next [`TxSink::flush`], before any later frame.
    fn peer_batch(&mut self) -> Option<&mut FrameBatch> {
        None
    }

    /// Sends what [`TxSink::peer_batch`] collected (the worker calls it at the end of every
    /// pass over the guest's TX ring).
    fn flush(&mut self) {}
}

/// Sends each frame at once on the NIC's current path: one queue of our TAP, or the peer
/// host's uplink while ours is down (see [`crate::peer`]).
#[derive(Debug)]
pub struct UplinkSink {
    device: Arc<Device>,
    queue: usize,
}

impl UplinkSink {
    pub fn new(device: Arc<Device>, queue: usize) -> UplinkSink {
        UplinkSink { device, queue }
    }
}

impl TxSink for UplinkSink {
    fn send(&mut self, frame: TxFrame) {
        send_now(&self.device, self.queue, frame);
    }
}

/// Holds the frames while Level 3 output commit is on (in the NIC's shared
/// [`crate::output::OutputCommit`]), sends them at once while it is off; batches them on the
/// peer path.
#[derive(Debug)]
pub struct EpochSink {
    device: Arc<Device>,
    queue: usize,
    batch: FrameBatch,
}

impl EpochSink {
    pub fn new(device: Arc<Device>, queue: usize) -> EpochSink {
        EpochSink {
            device,
            queue,
            batch: FrameBatch::default(),
        }
    }
}

impl TxSink for EpochSink {
    fn send(&mut self, frame: TxFrame) {
        // Frames batched earlier go first.
        self.flush();
        let device = &self.device;
        let queue = self.queue;
        device
            .output
            .send(queue, frame, |frame| send_now(device, queue, frame));
    }

    fn has_room(&self) -> bool {
        self.device.output.has_room()
    }

    fn count_full_wait(&self) {
        self.device.output.count_full_wait();
    }

    fn peer_batch(&mut self) -> Option<&mut FrameBatch> {
        if !self.device.redundancy.via_peer() || self.device.output.holding() {
            return None;
        }
        // Room for the largest frame, or the batch leaves first.
        if self.batch.len() + BATCH_LENGTH_BYTES + VNET_HDR_LEN + MAX_FRAME_BYTES > BATCH_BYTES {
            self.flush();
        }
        Some(&mut self.batch)
    }

    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let (payload, frames) = self.batch.take();
        let metrics = &self.device.metrics;
        // Every frame has a 12-byte header and a length before it.
        let frame_bytes = payload.len() - frames * (BATCH_LENGTH_BYTES + VNET_HDR_LEN);
        match self.device.redundancy.send_batch_to_lan(payload) {
            Ok(()) => {
                Metrics::add(&metrics.tx_packets, frames as u64);
                Metrics::add(&metrics.tx_bytes, frame_bytes as u64);
                Metrics::add(&metrics.peer_tx_packets, frames as u64);
                Metrics::add(&metrics.peer_tx_messages, 1);
            }
            // The link's window is full (or it is down): dropped, like a full TAP queue.
            Err(_) => Metrics::add(&metrics.peer_tx_dropped, frames as u64),
        }
    }
}

/// Sends one frame on queue pair `queue`'s current path and counts it: `tx_packets` and
/// `tx_bytes` when it left, `peer_tx_dropped` or `tap_write_errors` when it was lost.
pub fn send_now(device: &Device, queue: usize, frame: TxFrame) {
    let metrics = &device.metrics;
    let frame_len = frame.frame().len() as u64;
    let via_peer = device.redundancy.via_peer();
    let sent = if via_peer {
        device
            .redundancy
            .send_to_lan(frame)
            .map_err(SinkError::Peer)
    } else {
        let tap = &device.tap;
        // A frame held across a reconnection may carry the header length of the previous
        // frontend's features.
        let bytes = match tap.header_len() {
            header_len if header_len == frame.header_len() => frame.into_parts().0,
            header_len => {
                let (bytes, from) = frame.into_parts();
                convert_header(bytes, from, header_len)
            }
        };
        tap.write_frame(queue, &bytes)
            .map_err(|source| SinkError::Tap {
                tap: tap.name().to_owned(),
                source,
            })
    };
    match sent {
        Ok(()) => {
            Metrics::add(&metrics.tx_packets, 1);
            Metrics::add(&metrics.tx_bytes, frame_len);
            if via_peer {
                Metrics::add(&metrics.peer_tx_packets, 1);
                Metrics::add(&metrics.peer_tx_messages, 1);
            }
        }
        // The link's window is full (or it is down): dropped, like a full TAP queue.
        Err(SinkError::Peer(_)) => Metrics::add(&metrics.peer_tx_dropped, 1),
        Err(error) => {
            Metrics::add(&metrics.tap_write_errors, 1);
            device.log_fault(format_args!("queue pair {queue}: {}", error_chain(&error)));
        }
    }
}
