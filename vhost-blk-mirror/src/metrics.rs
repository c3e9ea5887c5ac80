//! Per-disk counters, updated lock-free by the queue workers and read by the control socket.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

/// Counters of one disk. Units are last in every name.
#[derive(Debug, Default)]
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
}

/// A point-in-time copy of [`Metrics`], as served by `status`.
#[derive(Debug, Serialize, Clone, PartialEq, Eq)]
pub struct MetricsSnapshot {
    pub read_requests: u64,
    pub write_requests: u64,
    pub flush_requests: u64,
    pub discard_requests: u64,
    pub write_zeroes_requests: u64,
    pub get_id_requests: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub rejected_requests: u64,
    pub io_errors: u64,
    pub connections: u64,
    pub connected: bool,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        MetricsSnapshot {
            read_requests: get(&self.read_requests),
            write_requests: get(&self.write_requests),
            flush_requests: get(&self.flush_requests),
            discard_requests: get(&self.discard_requests),
            write_zeroes_requests: get(&self.write_zeroes_requests),
            get_id_requests: get(&self.get_id_requests),
            read_bytes: get(&self.read_bytes),
            written_bytes: get(&self.written_bytes),
            rejected_requests: get(&self.rejected_requests),
            io_errors: get(&self.io_errors),
            connections: get(&self.connections),
            connected: self.connected.load(Ordering::Relaxed),
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
        Metrics::add(&metrics.read_bytes, 4096);
        Metrics::add(&metrics.read_requests, 1);
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.read_bytes, 4096);
        assert_eq!(snapshot.read_requests, 1);
        assert!(!snapshot.connected);
    }
}
