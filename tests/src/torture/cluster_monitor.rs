//! The cluster rows' split-brain monitor: a thread that asks both hosts' `ftvmd`
//! (`ftvm status --json`) and reads the witness's record every 50 ms for the whole run.
//! A sample is a split brain when both hosts act as the VM's primary (the test of
//! `Cluster::acting_primaries`: role Primary, not Fenced, Waiting nor Holding), or when a
//! host acts as primary at the witness's current generation (or a later one) although the
//! witness granted it to the other host. It also keeps the witness's grants in order, to
//! tell a failover from a restart in place.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use crate::cluster::HOSTS;

const SAMPLE_INTERVAL: Duration = Duration::from_millis(50);

/// What the monitor saw.
#[derive(Debug, Clone, Default)]
pub struct ClusterFindings {
    pub samples: u64,
    pub split_brain_samples: u64,
    pub first_split_brain: Option<String>,
    /// The witness's grants as `holder@generation`, in the order seen.
    pub grants: Vec<String>,
}

/// Where the monitor looks.
#[derive(Debug, Clone)]
pub struct Sources {
    /// The `ftvm` client.
    pub ftvm: PathBuf,
    /// Each host's `ftvmd` control socket, in `HOSTS` order.
    pub sockets: [PathBuf; 2],
    /// The witness's record of the VM (a JSON file).
    pub witness_record: PathBuf,
}

#[derive(Debug)]
pub struct ClusterMonitor {
    stop: Arc<AtomicBool>,
    findings: Arc<Mutex<ClusterFindings>>,
    thread: Option<JoinHandle<()>>,
}

impl ClusterMonitor {
    pub fn start(sources: Sources) -> ClusterMonitor {
        let stop = Arc::new(AtomicBool::new(false));
        let findings = Arc::new(Mutex::new(ClusterFindings::default()));
        let thread = {
            let stop = stop.clone();
            let findings = findings.clone();
            std::thread::spawn(move || sample(&stop, &findings, &sources))
        };
        ClusterMonitor {
            stop,
            findings,
            thread: Some(thread),
        }
    }

    pub fn findings(&self) -> ClusterFindings {
        self.findings.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

impl Drop for ClusterMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The VM's line of a host's `ftvm status --json`, if its `ftvmd` answers.
fn vm_status(ftvm: &PathBuf, socket: &PathBuf) -> Option<Value> {
    let output = Command::new(ftvm)
        .arg("--socket")
        .arg(socket)
        .args(["status", "--json"])
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let status: Value = serde_json::from_slice(&output.stdout).ok()?;
    Some(status["vms"][0].clone())
}

/// The generation at which a host acts as primary (acknowledges writes), if it does.
pub fn acting_generation(vm: &Value) -> Option<u64> {
    let acting = vm["role"] == "Primary"
        && !matches!(vm["state"].as_str(), Some("Fenced" | "Waiting" | "Holding"));
    acting.then(|| vm["generation"].as_u64().unwrap_or(0))
}

/// Why a sample is a split brain, if it is one.
pub fn split_brain(acting: [Option<u64>; 2], witness: Option<&Value>) -> Option<String> {
    if let [Some(first), Some(second)] = acting {
        return Some(format!(
            "both hosts act as primary (generations {first} and {second})"
        ));
    }
    let witness = witness?;
    let granted = witness["generation"].as_u64()?;
    let holder = witness["holder"].as_str()?;
    acting
        .iter()
        .zip(HOSTS)
        .find_map(|(generation, host)| {
            let generation = (*generation)?;
            (generation >= granted && host != holder).then(|| {
                format!("{host} acts as primary at generation {generation}, the witness granted {granted} to {holder}")
            })
        })
}

fn sample(stop: &AtomicBool, findings: &Mutex<ClusterFindings>, sources: &Sources) {
    while !stop.load(Ordering::SeqCst) {
        let statuses = sources
            .sockets
            .clone()
            .map(|socket| vm_status(&sources.ftvm, &socket));
        let witness: Option<Value> = std::fs::read(&sources.witness_record)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        let acting = [0, 1].map(|host| statuses[host].as_ref().and_then(acting_generation));
        if let Ok(mut findings) = findings.lock() {
            findings.samples += 1;
            if let Some(witness) = &witness {
                let grant =
                    format!("{}@{}", witness["holder"], witness["generation"]).replace('"', "");
                if findings.grants.last() != Some(&grant) {
                    findings.grants.push(grant);
                }
            }
            if let Some(why) = split_brain(acting, witness.as_ref()) {
                findings.split_brain_samples += 1;
                findings.first_split_brain.get_or_insert_with(|| {
                    format!(
                        "{why}\nhostA: {:?}\nhostB: {:?}\nwitness: {:?}",
                        statuses[0], statuses[1], witness
                    )
                });
            }
        }
        std::thread::sleep(SAMPLE_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn two_acting_primaries_or_an_ungranted_one_are_a_split_brain() {
        let primary = json!({"role": "Primary", "state": "Degraded", "generation": 3});
        let holding = json!({"role": "Primary", "state": "Holding", "generation": 3});
        let secondary = json!({"role": "Secondary", "state": "Protected", "generation": 3});
        assert_eq!(acting_generation(&primary), Some(3));
        assert_eq!(acting_generation(&holding), None);
        assert_eq!(acting_generation(&secondary), None);
        let witness = json!({"holder": "hostB", "generation": 3});
        assert!(split_brain([Some(2), Some(3)], None).is_some());
        assert!(split_brain([Some(3), None], Some(&witness)).is_some());
        // An old primary not yet fenced, below the new grant, is the other check's business.
        assert!(split_brain([Some(2), None], Some(&witness)).is_none());
        assert!(split_brain([None, Some(3)], Some(&witness)).is_none());
        assert!(split_brain([None, None], None).is_none());
    }
}
