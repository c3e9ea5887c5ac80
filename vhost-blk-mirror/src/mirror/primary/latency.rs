//! The latency of mirrored guest writes, from their registration to the secondary's
//! acknowledgement, as a histogram of lock-free counters (`status`: `write_latency`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use control_protocol::disk::LatencyHistogram;

/// Upper bounds of the buckets, in microseconds: 100 µs to 10 s, about three per decade.
const BOUNDS_US: [u64; 15] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000,
];

#[derive(Debug, Default)]
pub(super) struct WriteLatency {
    /// One more than the bounds: the last counts what is above them.
    counts: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl WriteLatency {
    pub(super) fn observe(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_US
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(BOUNDS_US.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    pub(super) fn histogram(&self) -> LatencyHistogram {
        LatencyHistogram {
            bounds_us: BOUNDS_US.to_vec(),
            counts: self
                .counts
                .iter()
                .map(|count| count.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_latency_lands_in_the_first_bucket_that_holds_it() {
        let latency = WriteLatency::default();
        for micros in [50, 100, 101, 3_000, 20_000_000] {
            latency.observe(Duration::from_micros(micros));
        }
        let histogram = latency.histogram();
        assert_eq!(histogram.count(), 5);
        assert_eq!(histogram.sum_us, 20_003_251);
        let buckets = histogram.buckets_seconds().expect("well formed");
        assert_eq!(buckets[0], (0.0001, 2));
        assert_eq!(buckets[1], (0.00025, 1));
        assert_eq!(buckets[5], (0.005, 1));
        assert_eq!(buckets[15], (f64::INFINITY, 1));
        assert_eq!(buckets.iter().map(|(_, count)| count).sum::<u64>(), 5);
    }
}
