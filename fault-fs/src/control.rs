//! The state the FUSE glue and the control socket share, and the control socket's answers:
//! one JSON line per command, `{"ok":true,...}` or `{"ok":false,"error":"..."}`.

use std::sync::Mutex;

use daemon_util::lock;
use log::{info, warn};
use serde::Serialize;

use crate::command::{parse, Command};
use crate::faults::{FailRule, Faults, InjectedCounts};
use crate::store::Store;

/// The files and the faults. Lock order: `store` before `faults` where both are held.
#[derive(Debug)]
pub struct Shared {
    pub store: Mutex<Store>,
    pub faults: Mutex<Faults>,
}

#[derive(Debug, Serialize)]
struct Status {
    ok: bool,
    dirty_bytes: u64,
    max_dirty_bytes: u64,
    writeback_bytes: u64,
    lost_bytes: u64,
    power_losses: u64,
    injected: InjectedCounts,
    rules: Vec<FailRule>,
    write_budget_bytes: Option<u64>,
    full: bool,
    delay_ms: u64,
    fallocate_supported: bool,
}

#[derive(Debug, Serialize)]
struct PowerLoss {
    ok: bool,
    lost_bytes: u64,
}

#[derive(Debug, Serialize)]
struct Done {
    ok: bool,
}

#[derive(Debug, Serialize)]
struct Failed {
    ok: bool,
    error: String,
}

fn json<T: Serialize>(answer: &T) -> String {
    serde_json::to_string(answer)
        .unwrap_or_else(|error| format!("{{\"ok\":false,\"error\":\"cannot encode: {error}\"}}"))
}

fn failed(error: String) -> String {
    json(&Failed { ok: false, error })
}

impl Shared {
    pub fn new(store: Store) -> Shared {
        Shared {
            store: Mutex::new(store),
            faults: Mutex::new(Faults::default()),
        }
    }

    /// Answers one control command line.
    pub fn answer(&self, line: &str) -> String {
        let command = match parse(line) {
            Ok(command) => command,
            Err(error) => return failed(error.to_string()),
        };
        info!("control: {line}");
        let done = json(&Done { ok: true });
        match command {
            Command::Fail(rule) => {
                lock(&self.faults).rules.push(rule);
                done
            }
            Command::EnospcAfter(bytes) => {
                lock(&self.faults).set_write_budget(bytes);
                done
            }
            Command::Delay(delay) => {
                lock(&self.faults).delay = delay;
                done
            }
            Command::Fallocate { supported } => {
                lock(&self.faults).fallocate_supported = supported;
                done
            }
            Command::Clear => {
                lock(&self.faults).clear();
                done
            }
            Command::PowerLoss => match lock(&self.store).power_loss() {
                Ok(lost_bytes) => json(&PowerLoss {
                    ok: true,
                    lost_bytes,
                }),
                Err(error) => {
                    warn!("power loss: {error}");
                    failed(format!("power loss failed: {error}"))
                }
            },
            Command::Sync => match lock(&self.store).sync_all() {
                Ok(()) => done,
                Err(error) => failed(format!("sync failed: {error}")),
            },
            Command::Status => json(&self.status()),
        }
    }

    fn status(&self) -> Status {
        let store = lock(&self.store);
        let faults = lock(&self.faults);
        let counts = store.counts();
        Status {
            ok: true,
            dirty_bytes: store.dirty_bytes(),
            max_dirty_bytes: store.max_dirty_bytes(),
            writeback_bytes: counts.writeback_bytes,
            lost_bytes: counts.lost_bytes,
            power_losses: counts.power_losses,
            injected: faults.injected,
            rules: faults.rules.clone(),
            write_budget_bytes: faults.write_budget_bytes,
            full: faults.full,
            delay_ms: u64::try_from(faults.delay.as_millis()).unwrap_or(u64::MAX),
            fallocate_supported: faults.fallocate_supported,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(answer: &str) -> serde_json::Value {
        serde_json::from_str(answer).expect("one JSON answer")
    }

    #[test]
    fn commands_change_the_status_and_bad_ones_are_answered_with_an_error() {
        let directory = tempfile::tempdir().expect("directory");
        let shared = Shared::new(Store::open(directory.path(), 1 << 20).expect("store"));
        assert_eq!(
            value(&shared.answer("fail read file=x offset=0 len=1"))["ok"],
            true
        );
        assert_eq!(value(&shared.answer("enospc-after 10"))["ok"], true);
        assert_eq!(value(&shared.answer("delay-ms 3"))["ok"], true);
        assert_eq!(value(&shared.answer("fallocate unsupported"))["ok"], true);
        let status = value(&shared.answer("status"));
        assert_eq!(status["rules"][0]["access"], "read");
        assert_eq!(status["rules"][0]["errno"], "EIO");
        assert_eq!(status["write_budget_bytes"], 10);
        assert_eq!(status["delay_ms"], 3);
        assert_eq!(status["fallocate_supported"], false);
        assert_eq!(value(&shared.answer("power-loss"))["lost_bytes"], 0);
        assert_eq!(value(&shared.answer("clear"))["ok"], true);
        let status = value(&shared.answer("status"));
        assert_eq!(status["rules"], serde_json::json!([]));
        assert_eq!(status["power_losses"], 1);
        let bad = value(&shared.answer("fail sideways"));
        assert_eq!(bad["ok"], false);
        assert!(bad["error"].as_str().expect("text").contains("fail takes"));
    }
}
