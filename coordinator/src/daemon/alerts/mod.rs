//! Alert agents, in the manner of Pacemaker's: on every event of warning or worse, and on
//! the clearing of a raised condition ([`super::events`]), ftvmd runs each configured
//! agent (`[[alert]]`), an executable that gets the alert in `FTVM_ALERT_*` environment
//! variables and delivers it (webhook, SNMP trap, mail: `packaging/alerts/`).
//!
//! Each agent has a thread of its own and a queue of [`QUEUE_LENGTH`] alerts: the main
//! loop only puts an alert in each queue and never waits for an agent, so a slow or hung
//! agent delays neither the heartbeats nor the other agents. A run that fails (exit status
//! not 0, or killed at its `timeout_ms`, with its whole process group) is retried once.
//! When an agent's queue is full (its agent is slower than the events), the new alert is
//! dropped for that agent, counted (`ftvm_alerts_dropped_total`) and logged.

mod run;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use self::run::Outcome;
use super::control::Reply;
use super::events::{utc_time, Change, Event, Severity};

/// Alerts waiting per agent; more are dropped for that agent.
pub const QUEUE_LENGTH: usize = 64;
/// Most `[[alert]]` sections.
const MAX_AGENTS: usize = 16;
/// Longest `timeout_ms`.
const MAX_TIMEOUT_MS: u64 = 120_000;
/// How long `ftvm alert test` waits for the agents (the CLI waits 30 s for an answer).
const TEST_WAIT: Duration = Duration::from_secs(25);

/// One `[[alert]]` section of ftvmd's configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AlertSection {
    /// The agent's name in logs, metrics and `ftvm alert test`; default: the file name of
    /// `path`.
    #[serde(default)]
    pub name: Option<String>,
    /// The agent: an executable, by absolute path.
    pub path: PathBuf,
    /// Where the agent sends the alert, as the agent understands it (a URL, a mail
    /// address, a trap receiver): `FTVM_ALERT_RECIPIENT`.
    #[serde(default)]
    pub recipient: String,
    /// An agent still running after this long is killed (with its process group).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// The least severity sent to this agent: "warning" (default) or "error". Clearings
    /// go to the agents that got the condition.
    #[serde(default = "default_severity")]
    pub severity: String,
    /// More environment variables for the agent (like `FTVM_SNMP_COMMUNITY`).
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
}

fn default_timeout() -> u64 {
    10_000
}

fn default_severity() -> String {
    "warning".into()
}

impl AlertSection {
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.path
                .file_name()
                .map_or_else(String::new, |name| name.to_string_lossy().into_owned())
        })
    }

    fn least_severity(&self) -> Option<Severity> {
        match self.severity.as_str() {
            "warning" => Some(Severity::Warning),
            "error" => Some(Severity::Error),
            _ => None,
        }
    }
}

/// Checks the `[[alert]]` sections: a reason for the first mistake.
pub fn validate(sections: &[AlertSection]) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if sections.len() > MAX_AGENTS {
        return Err(format!(
            "{} [[alert]] sections: at most {MAX_AGENTS}",
            sections.len()
        ));
    }
    let mut names = BTreeSet::new();
    for section in sections {
        let name = section.name();
        let what = format!("[[alert]] {name:?}");
        if name.is_empty() || !names.insert(name.clone()) {
            return Err(format!(
                "{what}: each agent needs a name of its own (set name = \"…\")"
            ));
        }
        if !section.path.is_absolute() {
            return Err(format!(
                "{what}: path {} is not absolute",
                section.path.display()
            ));
        }
        let metadata = std::fs::metadata(&section.path)
            .map_err(|error| format!("{what}: {}: {error}", section.path.display()))?;
        let mode = metadata.permissions().mode();
        if !metadata.is_file() || mode & 0o111 == 0 {
            return Err(format!(
                "{what}: {} is not an executable file",
                section.path.display()
            ));
        }
        // ftvmd runs it with its own rights (root): nobody else may change it.
        if mode & 0o022 != 0 {
            return Err(format!(
                "{what}: {} is writable by group or others (mode {:o}): chmod go-w it",
                section.path.display(),
                mode & 0o7777
            ));
        }
        if !(1..=MAX_TIMEOUT_MS).contains(&section.timeout_ms) {
            return Err(format!(
                "{what}: timeout_ms {} is not 1 to {MAX_TIMEOUT_MS}",
                section.timeout_ms
            ));
        }
        if section.least_severity().is_none() {
            return Err(format!(
                "{what}: severity {:?} is not \"warning\" or \"error\"",
                section.severity
            ));
        }
        let valid_key = |key: &str| {
            !key.is_empty()
                && !key.starts_with("FTVM_ALERT_")
                && key
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
        };
        if let Some(key) = section.environment.keys().find(|key| !valid_key(key)) {
            return Err(format!(
                "{what}: environment variable {key:?} must be letters, digits and '_', and \
                 not start with FTVM_ALERT_"
            ));
        }
    }
    Ok(())
}

/// What an agent is told: the event, or a test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    /// The condition's key, `event` for a one-off event, `test` for `ftvm alert test`.
    pub kind: String,
    /// `warning`, `error`, `cleared` (a raised condition is over) or `info` (a test).
    pub severity: String,
    pub vm: String,
    pub description: String,
    pub remedy: String,
    pub sequence: u64,
    pub unix_ms: u64,
    /// The severity compared with an agent's `severity`: the event's, or for a clearing
    /// that of the condition it clears (so that an agent gets the clearing of what it got).
    filter: Severity,
}

impl Alert {
    fn from_event(event: &Event, raised: Severity) -> Alert {
        let (kind, severity, filter) = match event.change {
            Change::None => ("event", event.severity.name(), event.severity),
            Change::Raised(condition) => (condition.key(), event.severity.name(), event.severity),
            Change::Cleared(condition) => (condition.key(), "cleared", raised),
        };
        Alert {
            kind: kind.to_owned(),
            severity: severity.to_owned(),
            vm: event.vm.clone(),
            description: event.what.clone(),
            remedy: event.advice.clone(),
            sequence: event.sequence,
            unix_ms: event.unix_ms,
            filter,
        }
    }

    /// The environment of a run of `agent` for host `host`.
    fn environment(&self, agent: &Agent, host: &str, attempt: u32) -> Vec<(String, String)> {
        let mut environment: Vec<(String, String)> = agent
            .section
            .environment
            .iter()
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        for (key, value) in [
            ("KIND", self.kind.clone()),
            ("SEVERITY", self.severity.clone()),
            ("VM", self.vm.clone()),
            ("HOST", host.to_owned()),
            ("DESCRIPTION", self.description.clone()),
            ("REMEDY", self.remedy.clone()),
            ("SEQUENCE", self.sequence.to_string()),
            ("TIMESTAMP", utc_time(self.unix_ms)),
            ("TIMESTAMP_MS", self.unix_ms.to_string()),
            ("RECIPIENT", agent.section.recipient.clone()),
            ("AGENT", agent.name.clone()),
            ("ATTEMPT", attempt.to_string()),
            ("VERSION", env!("CARGO_PKG_VERSION").to_owned()),
        ] {
            environment.push((format!("FTVM_ALERT_{key}"), value));
        }
        environment
    }
}

/// One agent's counts, for `ftvm status --json` and `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub name: String,
    /// Alerts the agent took (exit status 0), on the first run or the retry.
    pub delivered: u64,
    /// Alerts not delivered after the retry.
    pub failed: u64,
    /// Runs killed at the timeout (each run counts).
    pub timed_out: u64,
    /// Alerts dropped because the agent's queue was full.
    pub dropped: u64,
    /// Alerts waiting in its queue.
    pub queued: u64,
}

#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
    dropped: AtomicU64,
    queued: AtomicU64,
}

/// An alert for an agent's thread; a test alert comes with where to say how it went.
struct Job {
    alert: Arc<Alert>,
    test: Option<Sender<(String, Result<String, String>)>>,
}

#[derive(Debug)]
struct Agent {
    name: String,
    section: AlertSection,
    least: Severity,
    counters: Counters,
}

#[derive(Debug)]
struct Queue {
    agent: Arc<Agent>,
    jobs: SyncSender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Job")
            .field("alert", &self.alert)
            .finish()
    }
}

/// The configured agents, each with its thread and queue.
#[derive(Debug)]
pub struct Alerts {
    host: String,
    queues: Vec<Queue>,
    tests: AtomicU64,
}

impl Alerts {
    /// Starts a thread per agent of `sections` (already validated) for host `host`.
    pub fn start(sections: &[AlertSection], host: &str) -> Result<Alerts, String> {
        let mut queues = Vec::new();
        for section in sections {
            let agent = Arc::new(Agent {
                name: section.name(),
                section: section.clone(),
                least: section.least_severity().unwrap_or(Severity::Warning),
                counters: Counters::default(),
            });
            let (jobs, receiver) = mpsc::sync_channel(QUEUE_LENGTH);
            let worker = Arc::clone(&agent);
            let host = host.to_owned();
            thread::Builder::new()
                .name(format!("alert-{}", agent.name))
                .spawn(move || serve(&worker, &host, &receiver))
                .map_err(|error| format!("cannot start a thread: {error}"))?;
            info!(
                "alert agent {}: {} (recipient {:?}, timeout {} ms, {} and worse)",
                agent.name,
                section.path.display(),
                section.recipient,
                section.timeout_ms,
                agent.least.name()
            );
            queues.push(Queue { agent, jobs });
        }
        Ok(Alerts {
            host: host.to_owned(),
            queues,
            tests: AtomicU64::new(0),
        })
    }

    /// Queues `event` for every agent whose severity it meets; never waits. `raised`: for
    /// a clearing, the severity of the condition it clears.
    pub fn send(&self, event: &Event, raised: Severity) {
        let alert = Arc::new(Alert::from_event(event, raised));
        for queue in &self.queues {
            if alert.filter < queue.agent.least {
                continue;
            }
            queue.offer(Job {
                alert: Arc::clone(&alert),
                test: None,
            });
        }
    }

    /// `ftvm alert test`: a test alert through every agent; answers on `answer` with each
    /// agent's result once all have run (or after [`TEST_WAIT`]). Never waits itself.
    pub fn test(&self, answer: Sender<Reply>) {
        if self.queues.is_empty() {
            let _ = answer.send(Reply::Error(
                "no alert agents configured: add [[alert]] sections to ftvmd's configuration \
                 (docs/OPERATIONS.md, \"Alerts\") and restart ftvmd"
                    .into(),
            ));
            return;
        }
        let number = self.tests.fetch_add(1, Ordering::Relaxed) + 1;
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis() as u64);
        let alert = Arc::new(Alert {
            kind: "test".into(),
            severity: "info".into(),
            vm: String::new(),
            description: format!(
                "test alert {number} from ftvmd on {} (ftvm alert test)",
                self.host
            ),
            remedy: "nothing to do: this only checks that alerts arrive".into(),
            sequence: 0,
            unix_ms,
            filter: Severity::Info,
        });
        let (results, collected) = mpsc::channel();
        let mut waiting = Vec::new();
        for queue in &self.queues {
            waiting.push(queue.agent.name.clone());
            if !queue.offer(Job {
                alert: Arc::clone(&alert),
                test: Some(results.clone()),
            }) {
                let _ = results.send((
                    queue.agent.name.clone(),
                    Err("its queue is full (it is slower than the events): not sent".into()),
                ));
            }
        }
        drop(results);
        let spawned = thread::Builder::new()
            .name("alert-test".into())
            .spawn(move || {
                let _ = answer.send(collect_test(waiting, &collected));
            });
        if let Err(error) = spawned {
            warn!("ftvm alert test: cannot start a thread: {error}");
        }
    }

    pub fn status(&self) -> Vec<AgentStatus> {
        self.queues
            .iter()
            .map(|queue| {
                let counters = &queue.agent.counters;
                AgentStatus {
                    name: queue.agent.name.clone(),
                    delivered: counters.delivered.load(Ordering::Relaxed),
                    failed: counters.failed.load(Ordering::Relaxed),
                    timed_out: counters.timed_out.load(Ordering::Relaxed),
                    dropped: counters.dropped.load(Ordering::Relaxed),
                    queued: counters.queued.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

impl Queue {
    /// Puts `job` in the queue unless it is full (then counts and logs the drop).
    fn offer(&self, job: Job) -> bool {
        let counters = &self.agent.counters;
        counters.queued.fetch_add(1, Ordering::Relaxed);
        match self.jobs.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                counters.queued.fetch_sub(1, Ordering::Relaxed);
                let dropped = counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // Logged on the first drop and then every 100th: a flood stays readable.
                if dropped % 100 == 1 {
                    warn!(
                        "alert agent {}: its queue of {QUEUE_LENGTH} is full: alert {} ({}) \
                         dropped for it ({dropped} dropped so far); check the agent and its \
                         timeout_ms",
                        self.agent.name, job.alert.sequence, job.alert.kind
                    );
                }
                false
            }
        }
    }
}

/// The thread of one agent: runs each alert, retried once.
fn serve(agent: &Agent, host: &str, jobs: &Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        agent.counters.queued.fetch_sub(1, Ordering::Relaxed);
        let attempts = if job.test.is_some() { 1 } else { 2 };
        let mut result = Err(String::new());
        for attempt in 1..=attempts {
            result = run_once(agent, host, &job.alert, attempt);
            if result.is_ok() {
                break;
            }
        }
        let counter = if result.is_ok() {
            &agent.counters.delivered
        } else {
            &agent.counters.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(test) = job.test {
            let _ = test.send((agent.name.clone(), result));
        }
    }
}

/// One run of the agent; logs how it went. `Ok`: its output.
fn run_once(agent: &Agent, host: &str, alert: &Alert, attempt: u32) -> Result<String, String> {
    let timeout = Duration::from_millis(agent.section.timeout_ms);
    let environment = alert.environment(agent, host, attempt);
    let started = Instant::now();
    let (outcome, output) = run::run(&agent.section.path, &environment, timeout);
    let took_ms = started.elapsed().as_millis();
    let said = if output.is_empty() {
        String::new()
    } else {
        format!(": {}", output.lines().last().unwrap_or_default())
    };
    let what = format!(
        "alert agent {} ({} {} {}, attempt {attempt})",
        agent.name, alert.kind, alert.severity, alert.sequence
    );
    let failure = match outcome {
        Outcome::Delivered => {
            info!("{what}: delivered in {took_ms} ms{said}");
            return Ok(output);
        }
        Outcome::TimedOut => {
            agent.counters.timed_out.fetch_add(1, Ordering::Relaxed);
            format!(
                "killed at its timeout of {} ms{said}",
                agent.section.timeout_ms
            )
        }
        Outcome::Failed(how) => format!("failed ({how}) after {took_ms} ms{said}"),
        Outcome::NotStarted(error) => {
            format!("cannot run {}: {error}", agent.section.path.display())
        }
    };
    warn!("{what}: {failure}");
    Err(failure)
}

/// Waits for each agent's test result until [`TEST_WAIT`]; one line per agent.
fn collect_test(
    waiting: Vec<String>,
    results: &Receiver<(String, Result<String, String>)>,
) -> Reply {
    let deadline = Instant::now() + TEST_WAIT;
    let mut lines: BTreeMap<String, Result<String, String>> = BTreeMap::new();
    while lines.len() < waiting.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match results.recv_timeout(left) {
            Ok((name, result)) => {
                lines.insert(name, result);
            }
            Err(_) => break,
        }
    }
    let mut failed = false;
    let mut text = Vec::new();
    for name in &waiting {
        let line = match lines.get(name) {
            Some(Ok(output)) if output.is_empty() => format!("{name}: delivered"),
            Some(Ok(output)) => format!(
                "{name}: delivered ({})",
                output.lines().last().unwrap_or_default()
            ),
            Some(Err(error)) => {
                failed = true;
                format!("{name}: FAILED: {error}")
            }
            None => {
                failed = true;
                format!(
                    "{name}: no result within {} s (still queued or running); see ftvmd's log",
                    TEST_WAIT.as_secs()
                )
            }
        };
        text.push(line);
    }
    let text = text.join("\n");
    if failed {
        Reply::Error(format!("not every agent delivered the test alert:\n{text}"))
    } else {
        Reply::Done(text)
    }
}

#[cfg(test)]
mod tests;
