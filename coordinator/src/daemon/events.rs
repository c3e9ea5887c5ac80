//! The daemon's event list: what happened to which VM, and what the operator should do
//! about it. Every event is also logged; the list keeps the latest ones for `ftvm events`.

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{error, info, warn};
use serde::{Deserialize, Serialize};

/// Events kept for `ftvm events`.
const KEPT: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Severity {
    Info,
    Warning,
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    pub severity: Severity,
    /// The VM concerned, or empty for the host.
    pub vm: String,
    pub what: String,
    /// What to do about it; empty when nothing is needed.
    pub advice: String,
}

#[derive(Debug, Default)]
pub struct Events {
    list: VecDeque<Event>,
}

impl Events {
    pub fn push(&mut self, severity: Severity, vm: &str, what: String, advice: &str) {
        let prefix = if vm.is_empty() {
            String::new()
        } else {
            format!("{vm}: ")
        };
        let suffix = if advice.is_empty() {
            String::new()
        } else {
            format!(" ({advice})")
        };
        match severity {
            Severity::Info => info!("{prefix}{what}{suffix}"),
            Severity::Warning => warn!("{prefix}{what}{suffix}"),
            Severity::Error => error!("{prefix}{what}{suffix}"),
        }
        if self.list.len() == KEPT {
            self.list.pop_front();
        }
        self.list.push_back(Event {
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_millis() as u64),
            severity,
            vm: vm.to_owned(),
            what,
            advice: advice.to_owned(),
        });
    }

    pub fn info(&mut self, vm: &str, what: String) {
        self.push(Severity::Info, vm, what, "");
    }

    pub fn warn(&mut self, vm: &str, what: String, advice: &str) {
        self.push(Severity::Warning, vm, what, advice);
    }

    pub fn error(&mut self, vm: &str, what: String, advice: &str) {
        self.push(Severity::Error, vm, what, advice);
    }

    pub fn all(&self) -> Vec<Event> {
        self.list.iter().cloned().collect()
    }
}
