//! The VM's guest agent (`qemu-ga`) as the deciding thread sees it, for application-
//! consistent snapshots (`snapshots.rs`): the freeze and the thaw run on their own thread,
//! in the order asked (a thaw always after the freeze it ends), each bounded by its
//! timeouts. Never on QEMU's agent thread: its pause is what fences a guest, and a hung
//! guest agent must not delay it.
//!
//! A thaw that fails is tried again every [`THAW_RETRY`] for as long as the VM runs here:
//! a frozen file system is an outage for the guest.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use super::{Context, VmRunner};

use crate::daemon::agent::Agent;
use crate::daemon::guest_agent::{self, AgentError, FreezeFailed, Frozen, Timeouts};
use crate::daemon::wake;

/// How long a guest may take to show it runs an agent, and the freeze and thaw to finish
/// (TCG guests on a loaded host are slow; a guest that runs no agent costs the first).
pub const TIMEOUTS: Timeouts = Timeouts {
    ping: Duration::from_secs(5),
    freeze: Duration::from_secs(30),
};
/// The wait between two tries of a thaw that failed.
const THAW_RETRY: Duration = Duration::from_secs(5);

/// What one job of the guest agent's thread did.
#[derive(Debug)]
pub(super) enum AgentReport {
    Frozen(Result<Frozen, FreezeFailed>),
    Thawed(Result<(u64, String), AgentError>),
}

/// The guest agent's channel and its thread.
#[derive(Debug)]
pub(super) struct GuestAgent {
    agent: Agent<Infallible, AgentReport>,
    results: Receiver<AgentReport>,
    path: PathBuf,
    /// Thaws queued and not reported yet.
    thaws_queued: usize,
    /// A thaw failed: when to try again, and how many tries failed.
    retry_thaw: Option<(Instant, u32)>,
}

impl GuestAgent {
    pub fn new(vm: &str, path: PathBuf) -> Result<GuestAgent, String> {
        let (sender, results) = wake::channel();
        let agent = Agent::start(&format!("{vm}-qga"), sender, |_, _| {
            unreachable!("the guest agent's thread has no child process")
        })
        .map_err(|error| format!("cannot start a thread: {error}"))?;
        Ok(GuestAgent {
            agent,
            results,
            path,
            thaws_queued: 0,
            retry_thaw: None,
        })
    }

    /// Queues a freeze of the guest's file systems.
    pub fn freeze(&mut self) {
        let path = self.path.clone();
        self.agent.run("freeze", move |_| {
            AgentReport::Frozen(guest_agent::freeze(&path, TIMEOUTS))
        });
    }

    /// Queues a thaw of the guest's file systems (behind a freeze under way).
    pub fn thaw(&mut self) {
        let path = self.path.clone();
        self.thaws_queued += 1;
        self.agent.run("thaw", move |_| {
            AgentReport::Thawed(guest_agent::thaw(&path, TIMEOUTS))
        });
    }

    /// Waits for the queued jobs and ends the thread (ftvmd stops).
    pub fn finish(self) {
        self.agent.finish();
    }
}

impl VmRunner {
    /// Takes the reports of the guest agent's thread; tries a failed thaw again when due.
    pub(super) fn take_guest_agent_reports(&mut self, context: &mut Context<'_>) {
        while let Ok(report) = self.guest_agent.results.try_recv() {
            match report {
                AgentReport::Frozen(result) => self.on_guest_frozen(result, context),
                AgentReport::Thawed(result) => {
                    self.guest_agent.thaws_queued = self.guest_agent.thaws_queued.saturating_sub(1);
                    self.on_thawed(result, context);
                }
            }
        }
        let due = self
            .guest_agent
            .retry_thaw
            .is_some_and(|(at, _)| Instant::now() >= at);
        if due && self.guest_agent.thaws_queued == 0 {
            if self.guest.present() {
                self.guest_agent.thaw();
            } else {
                // The VM stopped here: no file system of it stays frozen.
                self.guest_agent.retry_thaw = None;
            }
        }
    }

    /// A thaw's outcome: an event either way; a failure is tried again.
    fn on_thawed(&mut self, result: Result<(u64, String), AgentError>, context: &mut Context<'_>) {
        let answer = self.thaw_answer.take();
        match result {
            Ok((count, status)) => {
                let retried = self.guest_agent.retry_thaw.take();
                let after = retried.map_or(String::new(), |(_, failures)| {
                    format!(" after {failures} failed tries")
                });
                let text = format!(
                    "the guest agent thawed {count} file system(s){after} \
                     (guest-fsfreeze-status: {status})"
                );
                context.events.info(&self.name, text.clone());
                if let Some(answer) = answer {
                    answer.send(Ok(text));
                }
            }
            Err(error) => {
                let failures = self
                    .guest_agent
                    .retry_thaw
                    .map_or(0, |(_, failures)| failures)
                    + 1;
                self.guest_agent.retry_thaw = Some((Instant::now() + THAW_RETRY, failures));
                let text = format!(
                    "cannot thaw the guest's file systems: {}",
                    crate::error_chain(&error)
                );
                if failures == 1 {
                    context.events.error(
                        &self.name,
                        format!(
                            "{text}; they may stay frozen (the guest's writes to them wait): \
                             ftvmd tries again every {} s",
                            THAW_RETRY.as_secs()
                        ),
                        "check qemu-guest-agent in the guest; `guest-fsfreeze-thaw` through \
                         the agent's socket ends the freeze too",
                    );
                } else {
                    log::debug!("{}: thaw try {failures} failed: {text}", self.name);
                }
                if let Some(answer) = answer {
                    answer.send(Err(format!("{text} (ftvmd keeps trying)")));
                }
            }
        }
    }
}
