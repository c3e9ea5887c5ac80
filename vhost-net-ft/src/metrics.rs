//! Per-NIC counters, updated lock-free by the queue workers and read by the control socket.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

/// Counters of one NIC. "rx" is towards the guest, "tx" from the guest. Units are last.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Frames put into the guest's receive buffers.
    pub rx_packets: AtomicU64,
    /// Bytes of those frames (without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// Frames from the TAP dropped because the guest's buffers cannot hold them (a frame
    /// larger than one buffer without MRG_RXBUF, or than the whole ring with it). Frames that
    /// merely wait for the guest to post buffers are not dropped.
    pub rx_dropped_no_buffers: AtomicU64,
    /// Times reception paused because the guest had no free receive buffers.
    pub rx_waits_for_buffers: AtomicU64,
    /// Receive buffers returned unused because they were malformed (outside guest memory,
    /// smaller than the header).
    pub rx_bad_buffers: AtomicU64,
    /// Reads from the TAP that failed with something else than "nothing to read".
    pub tap_read_errors: AtomicU64,
    /// Frames sent to the TAP.
    pub tx_packets: AtomicU64,
    /// Bytes of those frames (without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// Guest TX chains dropped as malformed (see `frame::FrameError`).
    pub tx_dropped_malformed: AtomicU64,
    /// Frames the TAP refused (device down, out of memory, …); dropped.
    pub tap_write_errors: AtomicU64,
    /// Control virtqueue commands answered.
    pub ctrl_commands: AtomicU64,
    /// Announcements made (`announce` on the control socket).
    pub announcements: AtomicU64,
    /// Frontend connections accepted since start.
    pub connections: AtomicU64,
    pub connected: AtomicBool,
    /// Guest frames sent to the peer host (our uplink is down).
    pub peer_tx_packets: AtomicU64,
    /// Guest frames for the peer host dropped: the link's send window was full or closed.
    pub peer_tx_dropped: AtomicU64,
    /// Frames from the peer host put on the guest's receive queue.
    pub peer_rx_packets: AtomicU64,
    /// Messages from the peer host dropped: malformed, not for this daemon's state (a frame
    /// for a guest we do not have), or the guest's receive queue full.
    pub peer_rx_dropped: AtomicU64,
    /// Relaying for the peer: its guest's frames written to our TAP.
    pub relay_to_lan_packets: AtomicU64,
    /// Relaying for the peer: frames for its guest read from our TAP and sent to it.
    pub relay_to_peer_packets: AtomicU64,
}

/// A point-in-time copy of [`Metrics`], as served by `status`.
#[derive(Debug, Serialize, Clone, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_dropped_no_buffers: u64,
    pub rx_waits_for_buffers: u64,
    pub rx_bad_buffers: u64,
    pub tap_read_errors: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_dropped_malformed: u64,
    pub tap_write_errors: u64,
    pub ctrl_commands: u64,
    pub announcements: u64,
    pub connections: u64,
    pub connected: bool,
    pub peer_tx_packets: u64,
    pub peer_tx_dropped: u64,
    pub peer_rx_packets: u64,
    pub peer_rx_dropped: u64,
    pub relay_to_lan_packets: u64,
    pub relay_to_peer_packets: u64,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        MetricsSnapshot {
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped_no_buffers: get(&self.rx_dropped_no_buffers),
            rx_waits_for_buffers: get(&self.rx_waits_for_buffers),
            rx_bad_buffers: get(&self.rx_bad_buffers),
            tap_read_errors: get(&self.tap_read_errors),
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped_malformed: get(&self.tx_dropped_malformed),
            tap_write_errors: get(&self.tap_write_errors),
            ctrl_commands: get(&self.ctrl_commands),
            announcements: get(&self.announcements),
            connections: get(&self.connections),
            connected: self.connected.load(Ordering::Relaxed),
            peer_tx_packets: get(&self.peer_tx_packets),
            peer_tx_dropped: get(&self.peer_tx_dropped),
            peer_rx_packets: get(&self.peer_rx_packets),
            peer_rx_dropped: get(&self.peer_rx_dropped),
            relay_to_lan_packets: get(&self.relay_to_lan_packets),
            relay_to_peer_packets: get(&self.relay_to_peer_packets),
        }
    }
}

pub use daemon_util::RateLimitedLog;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reads_counters() {
        let metrics = Metrics::default();
        Metrics::add(&metrics.tx_dropped_malformed, 3);
        Metrics::add(&metrics.rx_bytes, 1500);
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.tx_dropped_malformed, 3);
        assert_eq!(snapshot.rx_bytes, 1500);
        assert!(!snapshot.connected);
    }
}
