//! Where validated guest frames go: the seam for Level 3 output commit.
//!
//! Each queue pair's worker owns one [`TxSink`] and hands it every frame it accepted from the
//! guest, in the order the guest queued them. Today the sink is the TAP ([`TapSink`]). Level 3
//! puts an epoch buffer here instead: it keeps the frames of epoch N (they are owned, see
//! [`TxFrame`]) and writes them to the TAP, in order, once checkpoint N has committed on the
//! secondary. The guest's TX buffers are returned as soon as `send` returns, so holding
//! frames never stalls the guest's ring.

use std::io;
use std::sync::Arc;

use thiserror::Error;

use crate::tap::Tap;

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
}

#[derive(Debug, Error)]
pub enum SinkError {
    #[error("cannot write a frame to TAP device {tap}")]
    Tap {
        tap: String,
        #[source]
        source: io::Error,
    },
}

/// Takes the frames one queue pair's guest sends, in order.
pub trait TxSink: Send {
    /// Sends (or, for a buffering sink, accepts) one frame. An error means the frame is lost.
    fn send(&mut self, frame: TxFrame) -> Result<(), SinkError>;
}

/// Writes each frame to one queue of the TAP at once.
#[derive(Debug)]
pub struct TapSink {
    tap: Arc<Tap>,
    queue: usize,
}

impl TapSink {
    pub fn new(tap: Arc<Tap>, queue: usize) -> TapSink {
        TapSink { tap, queue }
    }
}

impl TxSink for TapSink {
    fn send(&mut self, frame: TxFrame) -> Result<(), SinkError> {
        self.tap
            .write_frame(self.queue, frame.bytes())
            .map_err(|source| SinkError::Tap {
                tap: self.tap.name().to_owned(),
                source,
            })
    }
}
