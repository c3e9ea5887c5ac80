//! One thread per child process of `ftvmd` (a disk daemon, a NIC daemon, the VM's QEMU):
//! the only place that starts it, stops it and talks to its sockets. The deciding thread
//! hands it jobs and reads their results from a channel later, so a daemon that accepts
//! its control socket and then hangs, or a QEMU that takes its time to stop, delays only
//! its own jobs: never the heartbeats, the witness or the other daemons.
//!
//! Jobs run one at a time in the order given (a `fence` sent after a `continue-degraded`
//! is carried out after it). While idle, the agent watches its child and reports when it
//! ends. The child is spawned by the agent's own thread; its `PR_SET_PDEATHSIG` then fires
//! when that thread ends, which it does only after stopping the child.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};

use super::wake;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::processes::{DiskProcess, RunningVm, Supervised};

/// How often an idle agent looks whether its child ended.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// A child process an agent owns.
pub trait Child: Send + 'static {
    fn pid(&self) -> u32;
    /// `Some(description)` once it has ended (and is reaped).
    fn exited(&mut self) -> Option<String>;
    /// Stops it (SIGTERM, then SIGKILL after a grace period) and reaps it.
    fn stop(&mut self);
}

impl Child for Supervised {
    fn pid(&self) -> u32 {
        Supervised::pid(self)
    }

    fn exited(&mut self) -> Option<String> {
        Supervised::exited(self)
    }

    fn stop(&mut self) {
        Supervised::stop(self);
    }
}

impl Child for DiskProcess {
    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn exited(&mut self) -> Option<String> {
        self.process.exited()
    }

    fn stop(&mut self) {
        self.process.stop();
    }
}

impl Child for Box<dyn RunningVm> {
    fn pid(&self) -> u32 {
        self.as_ref().pid()
    }

    fn exited(&mut self) -> Option<String> {
        self.as_mut().exited()
    }

    fn stop(&mut self) {
        self.as_mut().stop();
    }
}

/// An agent without a child process (the guest agent's: it only talks to a socket).
impl Child for std::convert::Infallible {
    fn pid(&self) -> u32 {
        match *self {}
    }

    fn exited(&mut self) -> Option<String> {
        match *self {}
    }

    fn stop(&mut self) {
        match *self {}
    }
}

type Job<C, R> = Box<dyn FnOnce(&mut Option<C>) -> R + Send>;

/// What the deciding thread can see of an agent without waiting for it.
#[derive(Debug, Default)]
struct Shared {
    /// Jobs given and not finished.
    pending: AtomicUsize,
    /// The job under way and since when.
    busy: Mutex<Option<(String, Instant)>>,
}

/// The handle of one agent thread. Dropping it lets the thread stop its child and end
/// (without waiting for it); [`Agent::finish`] waits.
pub struct Agent<C: Child, R: Send + 'static> {
    jobs: Option<Sender<(String, Job<C, R>)>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl<C: Child, R: Send + 'static> Agent<C, R> {
    /// Starts the thread `name`. Results go to `results`; a child that ends by itself is
    /// reported as `ended(pid, description)`.
    pub fn start(
        name: &str,
        results: wake::Sender<R>,
        ended: impl Fn(u32, String) -> R + Send + 'static,
    ) -> std::io::Result<Agent<C, R>> {
        let (jobs, receiver) = mpsc::channel::<(String, Job<C, R>)>();
        let shared = Arc::new(Shared::default());
        let seen = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut child: Option<C> = None;
                loop {
                    match receiver.recv_timeout(WATCH_INTERVAL) {
                        Ok((what, job)) => {
                            *lock(&seen.busy) = Some((what, Instant::now()));
                            let result = job(&mut child);
                            *lock(&seen.busy) = None;
                            seen.pending.fetch_sub(1, Ordering::SeqCst);
                            let _ = results.send(result);
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            let ended_now = child.as_mut().and_then(|child| {
                                let pid = child.pid();
                                child.exited().map(|status| (pid, status))
                            });
                            if let Some((pid, status)) = ended_now {
                                child = None;
                                let _ = results.send(ended(pid, status));
                            }
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                if let Some(mut child) = child.take() {
                    child.stop();
                }
            })?;
        Ok(Agent {
            jobs: Some(jobs),
            thread: Some(thread),
            shared,
        })
    }

    /// Queues `job` (named `what` while it runs) behind the jobs given before; never waits.
    pub fn run(&self, what: &str, job: impl FnOnce(&mut Option<C>) -> R + Send + 'static) {
        let Some(jobs) = &self.jobs else {
            return;
        };
        self.shared.pending.fetch_add(1, Ordering::SeqCst);
        if jobs.send((what.to_owned(), Box::new(job))).is_err() {
            self.shared.pending.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// No job is queued or under way.
    pub fn idle(&self) -> bool {
        self.shared.pending.load(Ordering::SeqCst) == 0
    }

    /// The job under way and how long it has run.
    pub fn busy(&self) -> Option<(String, Duration)> {
        lock(&self.shared.busy)
            .as_ref()
            .map(|(what, since)| (what.clone(), since.elapsed()))
    }

    /// Lets the queued jobs run, stops the child and waits for the thread to end.
    pub fn finish(mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl<C: Child, R: Send + 'static> std::fmt::Debug for Agent<C, R> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Agent")
            .field("pending", &self.shared.pending.load(Ordering::SeqCst))
            .field("busy", &self.busy())
            .finish()
    }
}

/// A poisoned lock only means a job panicked; the value is still a plain record.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::mpsc::Receiver;

    use super::*;

    #[derive(Debug, PartialEq)]
    enum Report {
        Done(u32),
        Ended(u32),
    }

    fn agent() -> (Agent<Supervised, Report>, Receiver<Report>) {
        let (sender, receiver) = wake::channel();
        let agent = Agent::start("test-agent", sender, |pid, _| Report::Ended(pid)).expect("agent");
        (agent, receiver)
    }

    #[test]
    fn a_job_that_hangs_never_holds_up_the_caller_and_jobs_keep_their_order() {
        let (agent, results) = agent();
        // The slow job runs until the test lets it go: nothing here depends on timing, so a
        // loaded machine cannot make it fail (a fixed 100 ms wait for the job to start did).
        let (release, hold) = std::sync::mpsc::channel::<()>();
        agent.run("slow", move |_| {
            let _ = hold.recv_timeout(Duration::from_secs(30));
            Report::Done(1)
        });
        for number in 2..=5 {
            agent.run("quick", move |_| Report::Done(number));
        }
        // The caller got here while the slow job still holds: it was not held up.
        assert!(!agent.idle());
        let deadline = Instant::now() + Duration::from_secs(10);
        let (what, running) = loop {
            match agent.busy() {
                Some((what, running)) if running >= Duration::from_millis(50) => {
                    break (what, running)
                }
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                other => panic!("the slow job does not run: {other:?}"),
            }
        };
        assert_eq!(what, "slow");
        assert!(running >= Duration::from_millis(50), "{running:?}");
        assert!(
            results.try_recv().is_err(),
            "a job finished before the slow one"
        );
        release.send(()).expect("the slow job waits");
        let order: Vec<Report> = (0..5)
            .map(|_| {
                results
                    .recv_timeout(Duration::from_secs(5))
                    .expect("result")
            })
            .collect();
        assert_eq!(order, (1..=5).map(Report::Done).collect::<Vec<_>>());
        assert!(agent.idle() && agent.busy().is_none());
    }

    #[test]
    fn a_child_that_ends_is_reported_and_finish_stops_a_running_one() {
        let (agent, results) = agent();
        agent.run("start", |child| {
            let process = crate::daemon::processes::spawn_for_test(Command::new("true"));
            let pid = process.pid();
            *child = Some(process);
            Report::Done(pid)
        });
        let Ok(Report::Done(pid)) = results.recv_timeout(Duration::from_secs(5)) else {
            panic!("not started");
        };
        assert_eq!(
            results.recv_timeout(Duration::from_secs(5)),
            Ok(Report::Ended(pid))
        );
        agent.run("start", |child| {
            let mut command = Command::new("sleep");
            command.arg("60");
            let process = crate::daemon::processes::spawn_for_test(command);
            let pid = process.pid();
            *child = Some(process);
            Report::Done(pid)
        });
        let Ok(Report::Done(pid)) = results.recv_timeout(Duration::from_secs(5)) else {
            panic!("not started");
        };
        let started = Instant::now();
        agent.finish();
        assert!(started.elapsed() < Duration::from_secs(4));
        // SAFETY: kill(2) with signal 0 only checks whether the pid exists.
        let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
        assert!(!alive, "the child outlived its agent");
    }
}
