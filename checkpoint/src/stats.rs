//! The engine's figures, as `ftvm status` and `ci/bench-checkpoint.sh` show them: epochs
//! per second, the guest's pause per epoch (p50, p99, max), dirty pages and wire bytes per
//! epoch, and how far the replica lags behind (epochs sent but not yet acknowledged, and
//! the age of the last commit).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How many recent epochs the percentiles and rates are taken over.
const WINDOW: usize = 1024;

/// One epoch, as measured by the primary.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EpochSample {
    /// From `stop` to `cont`'s reply.
    pub pause: Duration,
    /// Pages sent in the epoch (QEMU's and the daemons' writes, merged).
    pub dirty_pages: u64,
    /// Bytes of pages and device state on the wire, after encoding.
    pub wire_bytes: u64,
    /// Bytes of the device state alone, and of it on the wire (a delta, compressed).
    pub device_state_bytes: u64,
    pub device_state_wire_bytes: u64,
}

/// The figures of the last 1024 epochs and the totals since the start.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    recent: VecDeque<(Instant, EpochSample)>,
    epochs: u64,
    committed: Option<u64>,
    committed_at: Option<Instant>,
    sent: Option<u64>,
    wire_bytes: u64,
}

/// What the engine's `status` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsReport {
    /// Epochs taken since the engine started.
    pub epochs: u64,
    /// Over the last epochs (up to 1024) or the last 10 s, whichever is shorter.
    pub epochs_per_second: f64,
    pub pause_p50_ms: f64,
    pub pause_p99_ms: f64,
    pub pause_max_ms: f64,
    pub dirty_pages_per_epoch: f64,
    pub wire_bytes_per_epoch: f64,
    pub device_state_bytes_per_epoch: f64,
    pub device_state_wire_bytes_per_epoch: f64,
    /// The last epoch the secondary acknowledged (committed), if any.
    pub committed_epoch: Option<u64>,
    /// Epochs sent and not yet acknowledged.
    pub lag_epochs: u64,
    /// Milliseconds since the last commit (since the start before the first).
    pub since_commit_ms: u64,
    pub wire_bytes_total: u64,
}

impl Stats {
    pub fn new(now: Instant) -> Stats {
        Stats {
            started: now,
            recent: VecDeque::with_capacity(WINDOW),
            epochs: 0,
            committed: None,
            committed_at: None,
            sent: None,
            wire_bytes: 0,
        }
    }

    /// Epoch `epoch` was taken (its pause is over) and handed to the sender.
    pub fn taken(&mut self, now: Instant, epoch: u64, sample: EpochSample) {
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back((now, sample));
        self.epochs += 1;
        self.sent = Some(self.sent.map_or(epoch, |sent| sent.max(epoch)));
        self.wire_bytes += sample.wire_bytes;
    }

    /// The secondary acknowledged `epoch`.
    pub fn committed(&mut self, now: Instant, epoch: u64) {
        if self.committed.is_none_or(|committed| epoch > committed) {
            self.committed = Some(epoch);
            self.committed_at = Some(now);
        }
    }

    pub fn committed_epoch(&self) -> Option<u64> {
        self.committed
    }

    pub fn report(&self, now: Instant) -> StatsReport {
        let horizon = now.checked_sub(Duration::from_secs(10));
        let window: Vec<&(Instant, EpochSample)> = self
            .recent
            .iter()
            .filter(|(at, _)| horizon.is_none_or(|horizon| *at >= horizon))
            .collect();
        let mut pauses: Vec<f64> = window
            .iter()
            .map(|(_, sample)| sample.pause.as_secs_f64() * 1000.0)
            .collect();
        pauses.sort_by(f64::total_cmp);
        let mean = |value: fn(&EpochSample) -> u64| {
            if window.is_empty() {
                0.0
            } else {
                window.iter().map(|(_, sample)| value(sample)).sum::<u64>() as f64
                    / window.len() as f64
            }
        };
        let epochs_per_second = match (window.first(), window.last()) {
            (Some((first, _)), Some((last, _))) if window.len() > 1 => {
                let span = last.duration_since(*first).as_secs_f64();
                if span > 0.0 {
                    (window.len() - 1) as f64 / span
                } else {
                    0.0
                }
            }
            _ => 0.0,
        };
        let lag_epochs = match (self.sent, self.committed) {
            (Some(sent), Some(committed)) => sent.saturating_sub(committed),
            (Some(sent), None) => sent + 1,
            _ => 0,
        };
        StatsReport {
            epochs: self.epochs,
            epochs_per_second,
            pause_p50_ms: percentile(&pauses, 0.50),
            pause_p99_ms: percentile(&pauses, 0.99),
            pause_max_ms: pauses.last().copied().unwrap_or(0.0),
            dirty_pages_per_epoch: mean(|sample| sample.dirty_pages),
            wire_bytes_per_epoch: mean(|sample| sample.wire_bytes),
            device_state_bytes_per_epoch: mean(|sample| sample.device_state_bytes),
            device_state_wire_bytes_per_epoch: mean(|sample| sample.device_state_wire_bytes),
            committed_epoch: self.committed,
            lag_epochs,
            since_commit_ms: now
                .duration_since(self.committed_at.unwrap_or(self.started))
                .as_millis() as u64,
            wire_bytes_total: self.wire_bytes,
        }
    }
}

/// The `fraction` percentile of sorted `values` (nearest rank); 0 when empty.
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pause_ms: u64, pages: u64) -> EpochSample {
        EpochSample {
            pause: Duration::from_millis(pause_ms),
            dirty_pages: pages,
            wire_bytes: pages * 100,
            device_state_bytes: 10,
            device_state_wire_bytes: 2,
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&values, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn a_report_shows_rate_pauses_and_lag() {
        let start = Instant::now();
        let mut stats = Stats::new(start);
        for epoch in 0..10u64 {
            let at = start + Duration::from_millis(100 * epoch);
            stats.taken(at, epoch, sample(epoch + 1, 10 * epoch));
        }
        stats.committed(start + Duration::from_millis(850), 7);
        let report = stats.report(start + Duration::from_millis(950));
        assert_eq!(report.epochs, 10);
        assert!((report.epochs_per_second - 10.0).abs() < 0.01, "{report:?}");
        assert_eq!(report.pause_p50_ms, 5.0);
        assert_eq!(report.pause_max_ms, 10.0);
        assert_eq!(report.committed_epoch, Some(7));
        assert_eq!(report.lag_epochs, 2);
        assert_eq!(report.since_commit_ms, 100);
        assert_eq!(report.dirty_pages_per_epoch, 45.0);
        assert_eq!(report.device_state_wire_bytes_per_epoch, 2.0);
        // An older acknowledgement never moves the commit back.
        stats.committed(start + Duration::from_millis(900), 3);
        assert_eq!(stats.committed_epoch(), Some(7));
    }

    #[test]
    fn before_any_commit_everything_sent_lags() {
        let start = Instant::now();
        let mut stats = Stats::new(start);
        assert_eq!(stats.report(start).lag_epochs, 0);
        stats.taken(start, 0, sample(3, 1));
        let report = stats.report(start + Duration::from_secs(2));
        assert_eq!(report.lag_epochs, 1);
        assert_eq!(report.committed_epoch, None);
        assert_eq!(report.since_commit_ms, 2000);
    }
}
