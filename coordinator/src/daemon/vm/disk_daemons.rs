//! The VM's disk daemons as the deciding thread sees them. Each daemon has an agent
//! thread ([`Agent`]) that starts and stops it and does every control-socket call; the
//! deciding thread queues jobs and reads [`DiskReport`]s at its next step. A report carries
//! the job's result and what the agent knows after it: the daemon's pid and role and, for
//! jobs that talk to it, a fresh `status`.

use std::path::Path;
use std::time::{Duration, Instant};

use control_protocol::disk;

use super::snapshots::SnapshotDone;

use crate::daemon::agent::Agent;
use crate::daemon::control_client::{
    disk_order, disk_snapshot, disk_snapshots, disk_status, AskError, COMMAND_TIMEOUT,
};
use crate::daemon::events::Events;
use crate::daemon::processes::{DiskProcess, DiskSpec};
use crate::daemon::wake;
use crate::host::Role;
use crate::Generation;

/// How long a `status` question may take before the daemon counts as not answering.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a revert waits for the daemon to see the stopped QEMU's connection end.
const DETACH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a newly started daemon gets to answer on its control socket.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What one job did.
#[derive(Debug)]
pub(super) enum Done {
    /// `status` answered (or why not).
    Polled(Result<(), String>),
    Started(Result<(), String>),
    Ordered {
        order: disk::Order,
        result: Result<String, String>,
    },
    /// A `promote` or a serve ([`DiskDaemon::serve`]), for the request `ticket`.
    Ticket {
        ticket: u64,
        result: Result<(), String>,
    },
    /// `snapshot …` answered (or why not).
    Snapshot(Result<SnapshotDone, String>),
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
    /// Its `status` after the job.
    pub status: Heard,
    pub done: Done,
}

/// What a job heard of the daemon's `status`.
#[derive(Debug)]
pub(super) enum Heard {
    /// The job did not ask, or the daemon did not answer.
    Nothing,
    Status(Box<disk::Status>),
    /// It answered something that is not the protocol's status (why): its copy's state is
    /// unknown.
    NotUnderstood(String),
}

impl Heard {
    fn from(result: Result<disk::Status, AskError>) -> Heard {
        match result {
            Ok(status) => Heard::Status(Box::new(status)),
            Err(error @ AskError::NotUnderstood { .. }) => Heard::NotUnderstood(error.describe()),
            Err(AskError::NoAnswer { .. } | AskError::Refused(_)) => Heard::Nothing,
        }
    }
}

/// One disk daemon: its agent and the last things its reports said.
#[derive(Debug)]
pub(super) struct DiskDaemon {
    pub spec: DiskSpec,
    agent: Agent<DiskProcess, DiskReport>,
    index: usize,
    pub process: Option<(u32, Role)>,
    /// Its last status, as understood (`None`: unknown).
    pub status: Option<disk::Status>,
    /// Reported as not answering (until it answers again).
    pub silent: bool,
    /// Reported as answering a status that is not understood (until one is).
    pub not_understood: bool,
    last_poll: Option<Instant>,
}

impl DiskDaemon {
    pub fn new(
        vm: &str,
        index: usize,
        spec: DiskSpec,
        results: wake::Sender<DiskReport>,
    ) -> Result<DiskDaemon, String> {
        let agent = Agent::start(
            &format!("{vm}-disk{index}"),
            results,
            move |_pid, status| DiskReport {
                index,
                process: None,
                status: Heard::Nothing,
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
            not_understood: false,
            last_poll: None,
        })
    }

    /// Takes what a report says about the daemon (its process and status). A status that
    /// is not understood makes the copy's state unknown (never a default such as generation
    /// 0) and is reported as an error event naming the daemon, once until one is understood.
    pub fn update(&mut self, report: &DiskReport, vm: &str, events: &mut Events) {
        self.process = report.process;
        self.status = match &report.status {
            Heard::Nothing => None,
            Heard::Status(status) => {
                if std::mem::take(&mut self.not_understood) {
                    events.info(
                        vm,
                        format!(
                            "disk daemon {}: its status is understood again",
                            self.spec.serial
                        ),
                    );
                }
                Some(disk::Status::clone(status))
            }
            Heard::NotUnderstood(why) => {
                if !std::mem::replace(&mut self.not_understood, true) {
                    events.error(
                        vm,
                        format!(
                            "disk daemon {} answers a status ftvmd does not understand ({why}): \
                             its copy counts as unknown and not consistent",
                            self.spec.serial
                        ),
                        &format!(
                            "run the vhost-blk-mirror of the same build as ftvmd ({})",
                            self.spec.binary.display()
                        ),
                    );
                }
                None
            }
        };
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
            let (status, result) = match child {
                None => (Heard::Nothing, Ok(())),
                Some(_) => {
                    let result = disk_status(&control, STATUS_TIMEOUT);
                    let error = result.as_ref().err().map(AskError::describe);
                    (Heard::from(result), error.map_or(Ok(()), Err))
                }
            };
            report(index, child, status, Done::Polled(result))
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
            report(index, child, Heard::Nothing, Done::Started(result))
        });
    }

    /// Sends `order` (`fence`, `continue-degraded GEN`, …) to the running daemon.
    pub fn order(&mut self, order: disk::Order) {
        let (index, control) = (self.index, self.spec.control.clone());
        self.agent.run(&order.to_string(), move |child| {
            let Some(process) = child.as_mut() else {
                let result = Err(format!("{order}: the daemon does not run"));
                return report(
                    index,
                    child,
                    Heard::Nothing,
                    Done::Ordered { order, result },
                );
            };
            let result = disk_order(&control, order);
            if order == disk::Order::Fence {
                // Fenced even if it did not answer: it is never trusted to serve again.
                process.fenced = true;
            }
            let status = fresh_status(&control);
            report(index, child, status, Done::Ordered { order, result })
        });
    }

    /// `snapshot create|delete|revert NAME` or `snapshot list`; the result comes back as
    /// `Done::Snapshot`. A revert is asked again for a few seconds while the daemon still
    /// sees the stopped QEMU attached (it notices the disconnect a moment later).
    pub fn snapshot(&mut self, order: disk::SnapshotOrder) {
        let (index, control) = (self.index, self.spec.control.clone());
        self.agent.run(&order.to_string(), move |child| {
            let result = match child {
                None => Err("the daemon does not run".to_owned()),
                Some(_) if order == disk::SnapshotOrder::List => {
                    disk_snapshots(&control).map(SnapshotDone::Listed)
                }
                Some(_) => {
                    let deadline = Instant::now() + DETACH_TIMEOUT;
                    loop {
                        match disk_snapshot(&control, &order) {
                            Err(error)
                                if error.contains(disk::GUEST_ATTACHED)
                                    && Instant::now() < deadline =>
                            {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            other => break other.map(SnapshotDone::Done),
                        }
                    }
                }
            };
            let status = fresh_status(&control);
            report(index, child, status, Done::Snapshot(result))
        });
    }

    /// `promote GEN`; the result comes back as `Done::Ticket`.
    pub fn promote(&mut self, ticket: u64, generation: Generation) {
        self.promote_with(ticket, disk::Order::Promote(Some(generation)));
    }

    /// As [`DiskDaemon::promote`], at a Level 3 checkpoint: the epochs the copy buffered
    /// up to `epoch` are applied, the later ones dropped (`promote GEN EPOCH`).
    pub fn promote_at(&mut self, ticket: u64, generation: Generation, epoch: u64) {
        self.promote_with(ticket, disk::Order::PromoteAtEpoch { generation, epoch });
    }

    fn promote_with(&mut self, ticket: u64, order: disk::Order) {
        let (index, control) = (self.index, self.spec.control.clone());
        self.agent.run("promote", move |child| {
            let result = match child.as_mut() {
                None => Err("the daemon does not run".to_owned()),
                Some(process) => disk_order(&control, order).map(|_| process.role = Role::Primary),
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
                match disk_order(&spec.control, disk::Order::Demote) {
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
            report(index, child, Heard::Nothing, Done::Stopped)
        });
    }

    /// Waits for the queued jobs, stops the daemon and ends the agent (ftvmd stops).
    pub fn finish(self) {
        self.agent.finish();
    }
}

fn report(index: usize, child: &Option<DiskProcess>, status: Heard, done: Done) -> DiskReport {
    DiskReport {
        index,
        process: child
            .as_ref()
            .map(|process| (process.process.pid(), process.role)),
        status,
        done,
    }
}

fn fresh_status(control: &Path) -> Heard {
    Heard::from(disk_status(control, STATUS_TIMEOUT))
}

fn serve_job(
    child: &mut Option<DiskProcess>,
    spec: &DiskSpec,
    generation: Option<Generation>,
) -> Result<(), String> {
    let fenced = child.as_ref().is_some_and(|process| {
        process.fenced
            || disk_status(&spec.control, STATUS_TIMEOUT).is_ok_and(|status| {
                matches!(
                    status.replication,
                    disk::Replication::Primary(disk::PrimaryStatus {
                        mode: disk::Mode::Fenced,
                        ..
                    })
                )
            })
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
    // Up once it answers a status ftvmd understands; one it does not is not served.
    while let Err(error) = disk_status(&spec.control, COMMAND_TIMEOUT) {
        if !matches!(error, AskError::NoAnswer { .. }) {
            return Err(error.describe());
        }
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
        let order = disk::Order::ContinueDegraded(Some(generation));
        if let Err(error) = disk_order(&spec.control, order) {
            log::warn!("{}: {error}", spec.serial);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::daemon::events::Severity;

    fn daemon(dir: &Path) -> DiskDaemon {
        let spec = DiskSpec {
            binary: "/usr/bin/vhost-blk-mirror".into(),
            image: dir.join("disk0.img"),
            queues: 1,
            serial: "vm1-disk0".into(),
            socket: dir.join("disk0.sock"),
            control: dir.join("disk0.ctl"),
            log: dir.join("disk0.log"),
            peer: Vec::new(),
            listen: Vec::new(),
            psk_file: dir.join("pair.psk"),
            host_name: "hostA".into(),
            resync_rate_limit: None,
        };
        let (sender, _) = wake::channel();
        DiskDaemon::new("vm1", 0, spec, sender).expect("daemon")
    }

    fn secondary(generation: u64) -> disk::Status {
        disk::Status {
            image: "/i".into(),
            image_kind: disk::ImageKind::File,
            size_bytes: 1 << 20,
            read_only: false,
            serial: "vm1-disk0".into(),
            queues: 1,
            read_requests: 0,
            write_requests: 0,
            flush_requests: 0,
            discard_requests: 0,
            write_zeroes_requests: 0,
            get_id_requests: 0,
            read_bytes: 0,
            written_bytes: 0,
            rejected_requests: 0,
            io_errors: 0,
            connections: 0,
            held_kicks: 0,
            connected: false,
            replication: disk::Replication::Secondary(disk::SecondaryStatus {
                disk_state: disk::SecondaryDiskState::UpToDate,
                generation,
                peer_reachable: true,
                links: serde_json::Value::Null,
                applied_writes: 0,
                applied_bytes: 0,
                resync_bytes_received: 0,
                refused_requests: 0,
                disk_failed: None,
                disk_failures: 0,
                epochs: Default::default(),
            }),
        }
    }

    fn polled(status: Heard) -> DiskReport {
        DiskReport {
            index: 0,
            process: Some((42, Role::Secondary)),
            status,
            done: Done::Polled(Ok(())),
        }
    }

    /// A status ftvmd cannot read (a renamed field, a newer daemon) is never taken for a
    /// default: the daemon's last status is forgotten (its copy is unknown, so not
    /// consistent and at no generation) and an error event names it, once.
    #[test]
    fn a_status_not_understood_makes_the_copy_unknown_and_is_reported_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut daemon = daemon(dir.path());
        let mut events = Events::default();
        daemon.update(
            &polled(Heard::Status(Box::new(secondary(7)))),
            "vm1",
            &mut events,
        );
        assert!(daemon.status.is_some());
        assert!(events.all().is_empty());
        let why = "unknown field `gen`, expected one of `disk_state`, `generation`, …";
        for _ in 0..3 {
            daemon.update(
                &polled(Heard::NotUnderstood(why.into())),
                "vm1",
                &mut events,
            );
            assert_eq!(daemon.status, None, "unknown, never a default");
        }
        let reported = events.all();
        assert_eq!(reported.len(), 1, "{reported:?}");
        assert_eq!(reported[0].severity, Severity::Error);
        assert!(reported[0].what.contains("vm1-disk0"), "{reported:?}");
        assert!(
            reported[0].what.contains("unknown field `gen`"),
            "{reported:?}"
        );
        daemon.update(
            &polled(Heard::Status(Box::new(secondary(8)))),
            "vm1",
            &mut events,
        );
        assert!(daemon.status.is_some());
        let reported = events.all();
        assert_eq!(reported.len(), 2);
        assert!(
            reported[1].what.contains("understood again"),
            "{reported:?}"
        );
    }

    #[test]
    fn only_an_unreadable_answer_is_not_understood() {
        let path = PathBuf::from("/run/ftvm/vm1-disk0.ctl");
        let not_understood = Heard::from(Err(AskError::NotUnderstood {
            path: path.clone(),
            source: control_protocol::Reply::<disk::Status>::from_line("{}")
                .expect_err("not a status"),
        }));
        assert!(
            matches!(not_understood, Heard::NotUnderstood(why) if why.contains("missing field"))
        );
        let gone = Heard::from(Err(AskError::NoAnswer {
            path,
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }));
        assert!(matches!(gone, Heard::Nothing));
    }
}
