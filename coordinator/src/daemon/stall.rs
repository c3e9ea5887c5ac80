//! Telling why `ftvmd` went quiet. The peer fails a host over when it hears nothing for a
//! peer timeout, so a daemon that stalls for that long causes a needless failover. Two
//! watches say which kind of stall it was:
//! - [`StepClock`]: a step of the main loop that took long is logged with its slowest part
//!   (a state file's `fsync` on a busy disk, a VM's tick, the control requests);
//! - [`watch_scheduling`]: a thread that only sleeps and notices when the whole process
//!   was not run (every thread of it stood still: CPU, memory or I/O pressure on the host,
//!   or the process was stopped); it logs the kernel's pressure figures with it.

use std::time::{Duration, Instant};

/// How often the scheduling watch wakes up.
const WATCH_TICK: Duration = Duration::from_millis(50);

/// Times the parts of one step of the main loop.
#[derive(Debug)]
pub struct StepClock {
    started: Instant,
    lap: Instant,
    slowest: Option<(String, Duration)>,
}

impl StepClock {
    pub fn start() -> StepClock {
        let now = Instant::now();
        StepClock {
            started: now,
            lap: now,
            slowest: None,
        }
    }

    /// Ends the part `part` (of VM `vm`, or of the host when empty) that ran since the
    /// last lap.
    pub fn lap(&mut self, part: &str, vm: &str) {
        let now = Instant::now();
        let took = now.duration_since(self.lap);
        self.lap = now;
        if self
            .slowest
            .as_ref()
            .is_none_or(|(_, slowest)| took > *slowest)
        {
            let name = if vm.is_empty() {
                part.to_owned()
            } else {
                format!("{part} of {vm}")
            };
            self.slowest = Some((name, took));
        }
    }

    /// The step's description when it took `limit` or longer.
    pub fn slow(&self, limit: Duration) -> Option<String> {
        let took = self.started.elapsed();
        if took < limit {
            return None;
        }
        let slowest = self
            .slowest
            .as_ref()
            .map_or(String::new(), |(part, slowest)| {
                format!(", of which {} ms in {part}", slowest.as_millis())
            });
        Some(format!(
            "a step of the main loop took {} ms{slowest}",
            took.as_millis()
        ))
    }
}

/// Starts the thread that logs (a warning) every time the process was not run for
/// `limit` or longer.
pub fn watch_scheduling(limit: Duration) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("stall-watch".into())
        .spawn(move || loop {
            let before = Instant::now();
            std::thread::sleep(WATCH_TICK);
            let late = before.elapsed().saturating_sub(WATCH_TICK);
            if late >= limit {
                log::warn!(
                    "ftvmd as a whole was not run for {} ms (host pressure, share of the last \
                     10 s some task waited: {}); heartbeats to the peer stop meanwhile",
                    late.as_millis(),
                    pressure()
                );
            }
        })
        .map(drop)
}

/// `cpu 12.5% io 0.0% memory 0.0%` from `/proc/pressure` (Linux 4.20 and later, with
/// PSI enabled), or a note that the kernel does not report it.
fn pressure() -> String {
    let parts: Vec<String> = ["cpu", "io", "memory"]
        .iter()
        .filter_map(|resource| {
            let text = std::fs::read_to_string(format!("/proc/pressure/{resource}")).ok()?;
            some_avg10(&text).map(|share| format!("{resource} {share}%"))
        })
        .collect();
    if parts.is_empty() {
        "not reported by this kernel".into()
    } else {
        parts.join(" ")
    }
}

/// The `avg10` of the `some` line of a `/proc/pressure` file.
fn some_avg10(text: &str) -> Option<&str> {
    text.lines()
        .find(|line| line.starts_with("some "))?
        .split_whitespace()
        .find_map(|field| field.strip_prefix("avg10="))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_step_names_its_slowest_part() {
        let mut clock = StepClock::start();
        clock.lap("peer messages", "");
        std::thread::sleep(Duration::from_millis(30));
        clock.lap("tick", "vm1");
        clock.lap("heartbeat", "");
        assert_eq!(clock.slow(Duration::from_secs(5)), None);
        let report = clock.slow(Duration::from_millis(30)).expect("slow");
        assert!(report.contains("in tick of vm1"), "{report}");
    }

    #[test]
    fn pressure_lines_are_read_and_garbage_is_ignored() {
        let text = "some avg10=12.50 avg60=3.00 avg300=1.00 total=5\n\
                    full avg10=1.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(some_avg10(text), Some("12.50"));
        assert_eq!(some_avg10("full avg10=1.00\n"), None);
        assert_eq!(some_avg10("some total=5\n"), None);
        assert_eq!(some_avg10(""), None);
    }
}
