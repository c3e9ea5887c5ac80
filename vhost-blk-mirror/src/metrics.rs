//! Per-disk counters, updated lock-free by the queue workers and read by the control socket.

use std::sync::atomic::{AtomicBool, AtomicU64};

daemon_util::metrics! {
    /// Counters of one disk. Units are last in every name.
    pub struct Metrics {
        pub read_requests: AtomicU64,
        pub write_requests: AtomicU64,
        pub flush_requests: AtomicU64,
        pub discard_requests: AtomicU64,
        pub write_zeroes_requests: AtomicU64,
        pub get_id_requests: AtomicU64,
        pub read_bytes: AtomicU64,
        pub written_bytes: AtomicU64,
        /// Requests refused for bad guest input (malformed chain, out of range, read-only, …).
        pub rejected_requests: AtomicU64,
        /// Requests that failed on the image (EIO, ENOSPC, …).
        pub io_errors: AtomicU64,
        /// Frontend connections accepted since start.
        pub connections: AtomicU64,
        pub connected: AtomicBool,
        /// Queue kicks that arrived while this copy served no guest: nothing was popped.
        pub held_kicks: AtomicU64,
    }
    snapshot MetricsSnapshot;
}

pub use daemon_util::RateLimitedLog;
