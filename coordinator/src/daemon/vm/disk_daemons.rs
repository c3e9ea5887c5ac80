//! The VM's disk daemons as the deciding thread sees them. Each daemon has an agent
//! thread ([`Agent`]) that starts and stops it and does every control-socket call; the
//! deciding thread queues jobs and reads [`DiskReport`]s at its next step. A report carries
//! the job's result and what the agent knows after it: the daemon's pid and role and, for
//! jobs that talk to it, a fresh `status`.

use std::path::Path;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use crate::daemon::agent::Agent;
use crate::daemon::processes::{control_command, disk_command, disk_order, DiskProcess, DiskSpec};
use crate::host::Role;
use crate::Generation;

/// How long a `status` question may take before the daemon counts as not answering.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a newly started daemon gets to answer on its control socket.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What one job did.
#[derive(Debug)]
pub(super) enum Done {
    /// `status` answered (or why not).
    Polled(Result<(), String>),
    Started(Result<(), String>),
    Ordered {
        order: String,
        result: Result<String, String>,
    },
    /// A `promote` or a serve ([`DiskDaemon::serve`]), for the request `ticket`.
    Ticket {
        ticket: u64,
        result: Result<(), String>,
    },
    /// Now a secondary; `Some(warning)` if the daemon refused to demote and was restarted.
    Demoted(Option<String>),
    Stopped,
    /// The daemon ended by itself (its exit status).
    Ended(String),
}

#[derive(Debug)]
pub(super) struct DiskReport {
    pub index: usize,
    /// The daemon's pid and role after the job (`None`: none runs).
    pub process: Option<(u32, Role)>,
    /// Its `status` after the job, if the job asked for it and it answered.
    pub status: Option<serde_json::Value>,
    pub done: Done,
}

/// One disk daemon: its agent and the last things its reports said.
#[derive(Debug)]
pub(super) struct DiskDaemon {
    pub spec: DiskSpec,
    agent: Agent<DiskProcess, DiskReport>,
    index: usize,
    pub process: Option<(u32, Role)>,
    pub status: Option<serde_json::Value>,
    /// Reported as not answering (until it answers again).
    pub silent: bool,
    last_poll: Option<Instant>,
}

impl DiskDaemon {
    pub fn new(
        vm: &str,
        index: usize,
        spec: DiskSpec,
        results: Sender<DiskReport>,
    ) -> Result<DiskDaemon, String> {
        let agent = Agent::start(
            &format!("{vm}-disk{index}"),
            results,
            move |_pid, status| DiskReport {
                index,
                process: None,
                status: None,
                done: Done::Ended(status),
            },
        )
        .map_err(|error| format!("cannot start a thread: {error}"))?;
        Ok(DiskDaemon {
            spec,
            agent,
            index,
            process: None,
            status: None,
            silent: false,
            last_poll: None,
        })
    }

    /// Takes what a report says about the daemon (its process and status).
    pub fn update(&mut self, report: &DiskReport) {
        self.process = report.process;
        self.status = report.status.clone();
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.map(|(pid, _)| pid)
    }

    /// No job is queued or under way: the status is as fresh as the last job.
    pub fn idle(&self) -> bool {
        self.agent.idle()
    }

    /// The job under way and for how long.
    pub fn busy(&self) -> Option<(String, Duration)> {
        self.agent.busy()
    }

    /// Asks for the daemon's status, if the last question is older than `interval` and
    /// no job is waiting (a hung daemon gets no pile of questions).
    pub fn poll(&mut self, interval: Duration) {
        if !self.idle() || self.last_poll.is_some_and(|last| last.elapsed() < interval) {
            return;
        }
        self.last_poll = Some(Instant::now());
        let (index, control) = (self.index, self.spec.control.clone());
        self.agent.run("status", move |child| {
            let result = match child {
                None => Ok(None),
                Some(_) => control_command(&control, "status", STATUS_TIMEOUT)
                    .map(Some)
                    .map_err(|error| error.to_string()),
            };
            let status = result.as_ref().ok().cloned().flatten();
            report(index, child, status, Done::Polled(result.map(drop)))
        });
    }

    /// Starts the daemon in `role` unless one runs.
    pub fn start(&mut self, role: Role) {
        let (index, spec) = (self.index, self.spec.clone());
        self.agent.run("start", move |child| {
            let result = match child {
                Some(_) => Ok(()),
                None => DiskProcess::start(&spec, role)
                    .map(|process| *child = Some(process))
                    .map_err(|error| error.to_string()),
            };
            report(index, child, None, Done::Started(result))
        });
    }

    /// Sends `order` (`fence`, `continue-degraded GEN`, …) to the running daemon.
    pub fn order(&mut self, order: String) {
        let (index, control) = (self.index, self.spec.control.clone());
        self.agent.run(&order.clone(), move |child| {
            let Some(process) = child.as_mut() else {
                let result = Err(format!("{order}: the daemon does not run"));
                return report(index, child, None, Done::Ordered { order, result });
            };
            let result = disk_order(&control, &order);
            if order == "fence" {
                // Fenced even if it did not answer: it is never trusted to serve again.
                process.fenced = true;
            }
            let status = fresh_status(&control);
            report(index, child, status, Done::Ordered { order, result })
        });
    }

    /// `promote GEN`; the result comes back as `Done::Ticket`.
    pub fn promote(&mut self, ticket: u64, generation: Generation) {
        let (index, control) = (self.index, self.spec.control.clone());
        self.agent.run("promote", move |child| {
            let result = match child.as_mut() {
                None => Err("the daemon does not run".to_owned()),
                Some(process) => {
                    let order = format!("promote {generation}");
                    disk_order(&control, &order).map(|_| process.role = Role::Primary)
                }
            };
            let status = fresh_status(&control);
            report(index, child, status, Done::Ticket { ticket, result })
        });
    }

    /// Runs the daemon as primary: a fenced one is replaced, a missing one started; waits
    /// until it answers, then `continue-degraded GEN` if `generation` is given. The result
    /// comes back as `Done::Ticket`.
    pub fn serve(&mut self, ticket: u64, generation: Option<Generation>) {
        let (index, spec) = (self.index, self.spec.clone());
        self.agent.run("start as primary", move |child| {
            let result = serve_job(child, &spec, generation);
            let status = fresh_status(&spec.control);
            report(index, child, status, Done::Ticket { ticket, result })
        });
    }

    /// Makes the daemon a secondary: `demote` if it runs as primary (restarted as
    /// secondary if it refuses), started as secondary if none runs.
    pub fn demote(&mut self) {
        let (index, spec) = (self.index, self.spec.clone());
        self.agent.run("demote", move |child| {
            let mut warning = None;
            if let Some(process) = child
                .as_mut()
                .filter(|process| process.role == Role::Primary)
            {
                match disk_order(&spec.control, "demote") {
                    Ok(_) => process.role = Role::Secondary,
                    Err(error) => {
                        warning = Some(error);
                        process.process.stop();
                        *child = None;
                    }
                }
            }
            if child.is_none() {
                match DiskProcess::start(&spec, Role::Secondary) {
                    Ok(process) => *child = Some(process),
                    Err(error) => warning = Some(format!("cannot start it: {error}")),
                }
            }
            let status = fresh_status(&spec.control);
            report(index, child, status, Done::Demoted(warning))
        });
    }

    /// Stops the daemon (SIGTERM, SIGKILL after a grace period).
    pub fn stop(&mut self) {
        let index = self.index;
        self.agent.run("stop", move |child| {
            if let Some(mut process) = child.take() {
                process.process.stop();
            }
            report(index, child, None, Done::Stopped)
        });
    }

    /// Waits for the queued jobs, stops the daemon and ends the agent (ftvmd stops).
    pub fn finish(self) {
        self.agent.finish();
    }
}

fn report(
    index: usize,
    child: &Option<DiskProcess>,
    status: Option<serde_json::Value>,
    done: Done,
) -> DiskReport {
    DiskReport {
        index,
        process: child
            .as_ref()
            .map(|process| (process.process.pid(), process.role)),
        status,
        done,
    }
}

fn fresh_status(control: &Path) -> Option<serde_json::Value> {
    control_command(control, "status", STATUS_TIMEOUT).ok()
}

fn serve_job(
    child: &mut Option<DiskProcess>,
    spec: &DiskSpec,
    generation: Option<Generation>,
) -> Result<(), String> {
    let fenced = child.as_ref().is_some_and(|process| {
        process.fenced
            || fresh_status(&spec.control)
                .is_some_and(|status| status["replication"]["mode"] == "Fenced")
    });
    if fenced {
        if let Some(mut process) = child.take() {
            process.process.stop();
        }
    }
    if child.is_none() {
        let process = DiskProcess::start(spec, Role::Primary)
            .map_err(|error| format!("cannot start it: {error}"))?;
        *child = Some(process);
    }
    let deadline = Instant::now() + READY_TIMEOUT;
    while disk_command(&spec.control, "status").is_err() {
        if let Some(status) = child.as_mut().and_then(|process| process.process.exited()) {
            *child = None;
            return Err(format!("it ended: {status}"));
        }
        if Instant::now() >= deadline {
            return Err(format!("no answer in {} s", READY_TIMEOUT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(generation) = generation {
        let order = format!("continue-degraded {generation}");
        if let Err(error) = disk_order(&spec.control, &order) {
            log::warn!("{}: {error}", spec.serial);
        }
    }
    Ok(())
}
