//! Per-NIC counters, updated lock-free by the queue workers and read by the control socket.

use std::sync::atomic::{AtomicBool, AtomicU64};

daemon_util::metrics! {
    /// Counters of one NIC. "rx" is towards the guest, "tx" from the guest. Units are last.
    pub struct Metrics {
        /// Frames put into the guest's receive buffers.
        pub rx_packets: AtomicU64,
        /// Bytes of those frames (without the virtio-net header).
        pub rx_bytes: AtomicU64,
        /// Frames from the TAP dropped because the guest's buffers cannot hold them (a frame
        /// larger than one buffer without MRG_RXBUF, or than the whole ring with it). Frames
        /// that merely wait for the guest to post buffers are not dropped.
        pub rx_dropped_no_buffers: AtomicU64,
        /// Times reception paused because the guest had no free receive buffers.
        pub rx_waits_for_buffers: AtomicU64,
        /// Receive buffers returned unused because they were malformed (outside guest memory,
        /// smaller than the header).
        pub rx_bad_buffers: AtomicU64,
        /// Times the daemon added used entries to a ring while the frontend had no call fd
        /// set (a ring starting again after a stop sees its kick before its call fd): the
        /// guest was interrupted once the fd came, instead of not at all.
        pub interrupts_deferred: AtomicU64,
        /// Reads from the TAP that failed with something else than "nothing to read".
        pub tap_read_errors: AtomicU64,
        /// Frames sent to the TAP (or the peer host); a frame held for output commit counts
        /// when it is released.
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
        /// Link messages those frames took (several frames the guest queued at once share
        /// one).
        pub peer_tx_messages: AtomicU64,
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
        /// A move's source (`handover on`): frames for the stopped guest read from our TAP
        /// and sent to the peer's daemon.
        pub handover_relayed_packets: AtomicU64,
        /// A move's source: such frames the link's send window refused (dropped).
        pub handover_relay_dropped: AtomicU64,
        /// A move's destination: frames the peer relayed during the move, passed to the
        /// guest's receive queue once it ran here.
        pub handover_rx_packets: AtomicU64,
        /// A move's destination: relayed frames dropped (the queue full, oldest first;
        /// older than 2 s; not valid for the guest's offloads).
        pub handover_rx_dropped: AtomicU64,
    }
    snapshot MetricsSnapshot;
}

pub use daemon_util::RateLimitedLog;
