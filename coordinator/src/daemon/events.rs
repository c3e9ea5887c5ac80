//! The daemon's event list: what happened to which VM, and what the operator should do
//! about it. Every event is also logged; the list keeps the latest ones for `ftvm events`;
//! every event of warning or worse, and every clearing of a raised condition, goes to the
//! alert agents ([`super::alerts`]).
//!
//! A *condition* is a lasting fault with a key (like [`Condition::ALinkDown`]): an event
//! raises it, later events while it lasts may raise it again (it got worse), and one
//! event clears it (same key, same VM), so that an alert receiver can pair the two.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{error, info, warn};
use serde::{Deserialize, Serialize};

use super::alerts::Alerts;

/// Events kept for `ftvm events`.
const KEPT: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// The lasting faults that events raise and clear; the key names them in alerts
/// (`FTVM_ALERT_KIND`) and in `ftvm events --json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Condition {
    /// One or more A-links to the peer are down (raised again, worse, when all are).
    ALinkDown,
    /// The witness cannot be reached: no failover can happen.
    WitnessUnreachable,
    /// A protected VM whose copies were in sync is no longer Protected on its primary
    /// (Degraded, Syncing, Holding, …): one more fault may lose it.
    VmUnprotected,
}

impl Condition {
    pub fn key(self) -> &'static str {
        match self {
            Condition::ALinkDown => "a-link-down",
            Condition::WitnessUnreachable => "witness-unreachable",
            Condition::VmUnprotected => "vm-unprotected",
        }
    }
}

/// Whether an event raises or clears a condition, or stands alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    /// A one-off event.
    None,
    Raised(Condition),
    Cleared(Condition),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Grows by one with every event of this run of ftvmd.
    pub sequence: u64,
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    pub severity: Severity,
    /// The VM concerned, or empty for the host.
    pub vm: String,
    pub what: String,
    /// What to do about it; empty when nothing is needed.
    pub advice: String,
    pub change: Change,
}

#[derive(Debug, Default)]
pub struct Events {
    list: VecDeque<Event>,
    sequence: u64,
    /// The conditions raised and not cleared yet, by condition and VM, with the severity
    /// of their worst raise.
    raised: BTreeMap<(Condition, String), Severity>,
    alerts: Option<Alerts>,
}

impl Events {
    /// Events whose warnings, errors and clearings also go to `alerts`.
    pub fn with_alerts(alerts: Alerts) -> Events {
        Events {
            alerts: Some(alerts),
            ..Events::default()
        }
    }

    pub fn push(&mut self, severity: Severity, vm: &str, what: String, advice: &str) {
        self.record(severity, vm, what, advice, Change::None, severity);
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

    /// `condition` holds for `vm` (empty: the host), first or again (worse, or another
    /// part of it): a warning or an error.
    pub fn raise(
        &mut self,
        condition: Condition,
        severity: Severity,
        vm: &str,
        what: String,
        advice: &str,
    ) {
        let severity = severity.max(Severity::Warning);
        // The worst severity it was raised with, for the agents that get its clearing.
        let worst = self
            .raised
            .entry((condition, vm.to_owned()))
            .or_insert(severity);
        *worst = (*worst).max(severity);
        self.record(
            severity,
            vm,
            what,
            advice,
            Change::Raised(condition),
            severity,
        );
    }

    /// `condition` is over for `vm`: an info event that says it clears the condition, or a
    /// plain info event when the condition was not raised.
    pub fn clear(&mut self, condition: Condition, vm: &str, what: String) {
        let (change, raised) = match self.raised.remove(&(condition, vm.to_owned())) {
            Some(severity) => (Change::Cleared(condition), severity),
            None => (Change::None, Severity::Info),
        };
        self.record(Severity::Info, vm, what, "", change, raised);
    }

    /// Whether `condition` is raised for `vm`.
    pub fn is_raised(&self, condition: Condition, vm: &str) -> bool {
        self.raised.contains_key(&(condition, vm.to_owned()))
    }

    /// Logs, keeps and alerts an event; `raised`: for a clearing, the severity of the
    /// condition it clears (an agent gets the clearing of what it got).
    fn record(
        &mut self,
        severity: Severity,
        vm: &str,
        what: String,
        advice: &str,
        change: Change,
        raised: Severity,
    ) {
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
        self.sequence += 1;
        let event = Event {
            sequence: self.sequence,
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_millis() as u64),
            severity,
            vm: vm.to_owned(),
            what,
            advice: advice.to_owned(),
            change,
        };
        if let Some(alerts) = &self.alerts {
            if severity >= Severity::Warning || matches!(change, Change::Cleared(_)) {
                alerts.send(&event, raised);
            }
        }
        self.list.push_back(event);
    }

    pub fn all(&self) -> Vec<Event> {
        self.list.iter().cloned().collect()
    }

    /// The alert agents, if any are configured.
    pub fn alerts(&self) -> Option<&Alerts> {
        self.alerts.as_ref()
    }
}

/// `unix_ms` as UTC in RFC 3339 with milliseconds, like `2026-12-07T09:15:02.125Z`.
pub fn utc_time(unix_ms: u64) -> String {
    let since = Duration::from_millis(unix_ms);
    let seconds = since.as_secs();
    let days = seconds / 86_400;
    let (hour, minute, second) = (seconds / 3600 % 24, seconds / 60 % 60, seconds % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{:03}Z",
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clearing_names_the_condition_it_clears_once() {
        let mut events = Events::default();
        events.raise(
            Condition::ALinkDown,
            Severity::Warning,
            "",
            "1 of 2 A-links up".into(),
            "repair it",
        );
        assert!(events.is_raised(Condition::ALinkDown, ""));
        assert!(!events.is_raised(Condition::ALinkDown, "vm1"));
        events.clear(Condition::ALinkDown, "", "all 2 A-links up".into());
        events.clear(Condition::ALinkDown, "", "all 2 A-links up".into());
        let changes: Vec<Change> = events.all().iter().map(|event| event.change).collect();
        assert_eq!(
            changes,
            [
                Change::Raised(Condition::ALinkDown),
                Change::Cleared(Condition::ALinkDown),
                Change::None
            ]
        );
        let sequences: Vec<u64> = events.all().iter().map(|event| event.sequence).collect();
        assert_eq!(sequences, [1, 2, 3]);
    }

    #[test]
    fn utc_time_is_rfc_3339() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_time(1_796_633_702_125), "2026-12-07T08:55:02.125Z");
    }
}
