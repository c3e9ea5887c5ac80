//! A thread that samples both daemons' `status` every 50 ms for the whole run: it counts
//! samples where two copies accept guest writes at the same generation (split brain), and
//! adds up `rejected_requests` over the restarts of each daemon (a restart starts its
//! counters from zero).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use crate::blk::status_json;

const SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// What the monitor saw.
#[derive(Debug, Clone, Default)]
pub struct Findings {
    pub samples: u64,
    /// Samples in which both daemons were primaries that may complete writes, at one
    /// generation.
    pub split_brain_samples: u64,
    pub first_split_brain: Option<String>,
    /// `rejected_requests` of both daemons, summed over their restarts.
    pub rejected_requests: u64,
}

#[derive(Debug, Default)]
struct Counter {
    carried: u64,
    last: u64,
}

impl Counter {
    fn update(&mut self, now: u64) {
        if now < self.last {
            self.carried += self.last;
        }
        self.last = now;
    }

    fn total(&self) -> u64 {
        self.carried + self.last
    }
}

#[derive(Debug)]
pub struct Monitor {
    stop: Arc<AtomicBool>,
    findings: Arc<Mutex<Findings>>,
    thread: Option<JoinHandle<()>>,
}

impl Monitor {
    pub fn start(primary: PathBuf, secondary: PathBuf) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let findings = Arc::new(Mutex::new(Findings::default()));
        let thread = {
            let stop = stop.clone();
            let findings = findings.clone();
            std::thread::spawn(move || sample(&stop, &findings, [primary, secondary]))
        };
        Monitor {
            stop,
            findings,
            thread: Some(thread),
        }
    }

    pub fn findings(&self) -> Findings {
        self.findings.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A primary that may complete guest writes (not fenced), and its generation.
fn writing_generation(status: &Value) -> Option<u64> {
    let replication = &status["replication"];
    (replication["role"] == "primary" && replication["mode"] != "Fenced")
        .then(|| replication["generation"].as_u64())
        .flatten()
}

fn sample(stop: &AtomicBool, findings: &Mutex<Findings>, controls: [PathBuf; 2]) {
    let mut rejected = [Counter::default(), Counter::default()];
    while !stop.load(Ordering::SeqCst) {
        let statuses = controls.clone().map(|control| status_json(&control));
        if let Ok(mut findings) = findings.lock() {
            findings.samples += 1;
            for (counter, status) in rejected.iter_mut().zip(&statuses) {
                if let Some(count) = status
                    .as_ref()
                    .and_then(|s| s["rejected_requests"].as_u64())
                {
                    counter.update(count);
                }
            }
            findings.rejected_requests = rejected.iter().map(Counter::total).sum();
            if let [Some(first), Some(second)] = &statuses {
                let both = (writing_generation(first), writing_generation(second));
                if let (Some(a), Some(b)) = both {
                    if a == b {
                        findings.split_brain_samples += 1;
                        findings
                            .first_split_brain
                            .get_or_insert_with(|| format!("{first}\n{second}"));
                    }
                }
            }
        }
        std::thread::sleep(SAMPLE_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_carries_the_count_over() {
        let mut counter = Counter::default();
        for now in [0, 2, 5, 0, 1] {
            counter.update(now);
        }
        assert_eq!(counter.total(), 6);
    }

    #[test]
    fn only_unfenced_primaries_write() {
        let primary = serde_json::json!({"replication": {"role": "primary", "mode": "Degraded", "generation": 3}});
        let fenced = serde_json::json!({"replication": {"role": "primary", "mode": "Fenced", "generation": 3}});
        let secondary = serde_json::json!({"replication": {"role": "secondary", "generation": 3}});
        assert_eq!(writing_generation(&primary), Some(3));
        assert_eq!(writing_generation(&fenced), None);
        assert_eq!(writing_generation(&secondary), None);
    }
}
