//! A rate limit for log lines caused by guest, QEMU or network input.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lets through at most `burst` log lines per interval and counts the rest, so a guest that
/// floods bad requests cannot flood the log.
#[derive(Debug)]
pub struct RateLimitedLog {
    interval: Duration,
    burst: u64,
    start: Instant,
    window: AtomicU64,
    in_window: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    pub fn new(interval: Duration, burst: u64) -> RateLimitedLog {
        RateLimitedLog {
            interval,
            burst,
            start: Instant::now(),
            window: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns `Some(suppressed_since_last)` when a line may be logged now, `None` otherwise.
    pub fn admit(&self) -> Option<u64> {
        let interval_ms = self.interval.as_millis().max(1) as u64;
        let window = self.start.elapsed().as_millis() as u64 / interval_ms;
        if self.window.swap(window, Ordering::Relaxed) != window {
            self.in_window.store(0, Ordering::Relaxed);
        }
        if self.in_window.fetch_add(1, Ordering::Relaxed) < self.burst {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_admits_a_burst_then_counts() {
        let log = RateLimitedLog::new(Duration::from_secs(3600), 2);
        assert_eq!(log.admit(), Some(0));
        assert_eq!(log.admit(), Some(0));
        assert_eq!(log.admit(), None);
        assert_eq!(log.admit(), None);
        assert_eq!(log.suppressed.load(Ordering::Relaxed), 2);
    }
}
