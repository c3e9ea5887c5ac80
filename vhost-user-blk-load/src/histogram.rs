//! A log-linear latency histogram: 64 buckets per power of two (under 1.6 % error), fixed
//! memory however long the run, mergeable across queue threads.

use std::time::Duration;

const SUB_BUCKET_BITS: u32 = 6;
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;
const BUCKETS: usize = (SUB_BUCKETS + (64 - SUB_BUCKET_BITS as u64) * SUB_BUCKETS) as usize;

/// Counts of nanosecond values.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum_ns: u128,
    min_ns: u64,
    max_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
            sum_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }
}

fn bucket_of(value: u64) -> usize {
    if value < SUB_BUCKETS {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros();
    let shift = exponent - SUB_BUCKET_BITS;
    let sub = (value >> shift) - SUB_BUCKETS;
    (SUB_BUCKETS + u64::from(shift) * SUB_BUCKETS + sub) as usize
}

/// The middle of the value range bucket `index` counts.
fn bucket_middle(index: usize) -> u64 {
    let index = index as u64;
    if index < SUB_BUCKETS {
        return index;
    }
    let shift = (index - SUB_BUCKETS) / SUB_BUCKETS;
    let sub = (index - SUB_BUCKETS) % SUB_BUCKETS;
    let low = (SUB_BUCKETS + sub) << shift;
    low + ((1_u64 << shift) >> 1)
}

impl Histogram {
    /// Counts one value.
    pub fn record(&mut self, latency: Duration) {
        let value = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(value)] += 1;
        self.total += 1;
        self.sum_ns += u128::from(value);
        self.min_ns = self.min_ns.min(value);
        self.max_ns = self.max_ns.max(value);
    }

    /// Adds all counts of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (count, other_count) in self.counts.iter_mut().zip(&other.counts) {
            *count += other_count;
        }
        self.total += other.total;
        self.sum_ns += other.sum_ns;
        self.min_ns = self.min_ns.min(other.min_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// Number of values.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value at `quantile` (0.0..=1.0) in nanoseconds, 0 when empty; exact at the ends.
    pub fn quantile_ns(&self, quantile: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((quantile.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return bucket_middle(index).clamp(self.min_ns, self.max_ns);
            }
        }
        self.max_ns
    }

    /// Mean in nanoseconds.
    pub fn mean_ns(&self) -> u64 {
        match self.total {
            0 => 0,
            total => (self.sum_ns / u128::from(total)) as u64,
        }
    }

    /// Largest value in nanoseconds.
    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// Smallest value in nanoseconds, 0 when empty.
    pub fn min_ns(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min_ns
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut previous = 0;
        for value in [
            0_u64,
            1,
            63,
            64,
            65,
            127,
            128,
            1000,
            123_456,
            10_000_000,
            u64::MAX,
        ] {
            let index = bucket_of(value);
            assert!(index >= previous);
            assert!(index < BUCKETS);
            previous = index;
            let middle = bucket_middle(index);
            let error = middle.abs_diff(value) as f64 / value.max(1) as f64;
            assert!(error < 0.016, "value {value} middle {middle}");
        }
    }

    #[test]
    fn quantiles_of_a_uniform_spread() {
        let mut histogram = Histogram::default();
        for micros in 1..=1000 {
            histogram.record(Duration::from_micros(micros));
        }
        let p50 = histogram.quantile_ns(0.5) as f64;
        let p99 = histogram.quantile_ns(0.99) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.02, "{p50}");
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.02, "{p99}");
        assert_eq!(histogram.quantile_ns(1.0), 1_000_000);
        assert_eq!(histogram.max_ns(), 1_000_000);
        assert_eq!(histogram.min_ns(), 1000);
        assert_eq!(histogram.mean_ns(), 500_500);
    }

    #[test]
    fn merge_adds_counts() {
        let mut left = Histogram::default();
        let mut right = Histogram::default();
        left.record(Duration::from_micros(10));
        right.record(Duration::from_micros(20));
        left.merge(&right);
        assert_eq!(left.count(), 2);
        assert_eq!(left.max_ns(), 20_000);
        assert_eq!(Histogram::default().quantile_ns(0.5), 0);
    }
}
