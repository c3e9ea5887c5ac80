//! Where validated guest frames go: the seam for Level 3 output commit.
//!
//! Each queue pair's worker owns one [`TxSink`] and hands it every frame it accepted from the
//! guest, in the order the guest queued them. Today the sink sends at once ([`UplinkSink`]:
//! to the TAP, or to the peer host while the uplink is down). Level 3 puts an epoch buffer in
//! front of it: it keeps the frames of epoch N (they are owned, see [`TxFrame`]) and passes
//! them on, in order, once checkpoint N has committed on the secondary. The guest's TX buffers are returned as soon as `send` returns, so holding
//! frames never stalls the guest's ring.

use std::io;
use std::sync::Arc;

use thiserror::Error;

use crate::device::Device;

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
    /// Sends (or, for a buffering sink, accepts) one frame. An error means the frame is lost.
    fn send(&mut self, frame: TxFrame) -> Result<(), SinkError>;
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
    fn send(&mut self, frame: TxFrame) -> Result<(), SinkError> {
        if self.device.redundancy.via_peer() {
            return self
                .device
                .redundancy
                .send_to_lan(frame)
                .map_err(SinkError::Peer);
        }
        let tap = &self.device.tap;
        tap.write_frame(self.queue, frame.bytes())
            .map_err(|source| SinkError::Tap {
                tap: tap.name().to_owned(),
                source,
            })
    }
}
