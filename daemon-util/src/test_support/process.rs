//! Processes started by a test, ended by PID when the test ends (never by name), with their
//! output kept in a log that is printed if the test fails.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::wait::Wait;

/// How long a process gets to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// Bytes of an unnamed log read back at the most.
const UNNAMED_LOG_MAX_BYTES: usize = 1 << 20;

/// Where a process's output goes.
#[derive(Debug)]
enum Log {
    /// A file the test named (appended to).
    Path(PathBuf),
    /// An unnamed temporary file, gone with the process guard.
    Unnamed(File),
    /// The test reads the output itself (a guest's console).
    Caller,
}

/// A child process owned by a test: SIGTERM, then SIGKILL after a grace period, when
/// dropped; its log on stderr when the test is failing.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
    log: Log,
}

impl Process {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, command: Command, log: &Path) -> Process {
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|error| panic!("cannot open log {}: {error}", log.display()));
        Process::spawn_logged(name, command, &file, Log::Path(log.to_owned()))
    }

    /// Starts `command` with stdout and stderr kept in an unnamed temporary file.
    pub fn start(name: &str, command: Command) -> Process {
        let file = tempfile::tempfile().expect("create an unnamed log file");
        let reader = file.try_clone().expect("clone log handle");
        Process::spawn_logged(name, command, &file, Log::Unnamed(reader))
    }

    /// Owns a child the test started itself because it reads the child's output (a guest's
    /// console): ended by PID like any other.
    pub fn adopt(name: &str, child: Child) -> Process {
        Process {
            name: name.to_owned(),
            child: Some(child),
            log: Log::Caller,
        }
    }

    fn spawn_logged(name: &str, mut command: Command, file: &File, log: Log) -> Process {
        let out = file.try_clone().expect("clone log handle");
        let err = file.try_clone().expect("clone log handle");
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name} ({command:?}): {error}"));
        Process {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id; 0 once the process was reaped.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Its output so far (empty for an adopted process).
    pub fn log(&self) -> String {
        match &self.log {
            Log::Path(path) => std::fs::read_to_string(path).unwrap_or_default(),
            Log::Unnamed(file) => {
                let mut bytes = vec![0; UNNAMED_LOG_MAX_BYTES];
                let length = file.read_at(&mut bytes, 0).unwrap_or(0);
                bytes.truncate(length);
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Log::Caller => String::new(),
        }
    }

    /// Returns the exit status if the process has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten())
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// Panics with the log unless the process still runs.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_wait() {
            panic!("{} exited ({status}):\n{}", self.name, self.log());
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let what = format!("{} to exit", self.name);
        let status = Wait::up_to(timeout)
            .poll(|| self.try_wait())
            .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}"));
        self.child = None;
        status
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, …) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(child) = &self.child {
            self::signal(child.id(), signal);
        }
    }

    /// Sends SIGKILL and reaps the process: a crash, as far as the process can tell.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for a clean exit; kills after a grace period. `None` if the
    /// process was already reaped.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        signal(child.id(), libc::SIGTERM);
        let exited = Wait::up_to(TERM_GRACE).poll(|| child.try_wait().ok().flatten());
        if exited.is_some() {
            return exited;
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.terminate();
        if std::thread::panicking() && !matches!(self.log, Log::Caller) {
            eprintln!("---- log of {} ----\n{}", self.name, self.log());
        }
    }
}

/// Sends `signal` to one process by PID (one of the test's own children, or a process the
/// system under test reported).
pub fn signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 0 {
        return;
    }
    // SAFETY: kill(2) only takes integers and touches no memory of ours; `pid` is positive,
    // so it names one process, never a process group.
    unsafe {
        libc::kill(pid, signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_of_an_unnamed_process_is_kept() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo out; echo err >&2"]);
        let mut process = Process::start("echo", command);
        assert!(process.wait_exit(Duration::from_secs(10)).success());
        let log = process.log();
        assert!(log.contains("out") && log.contains("err"), "{log:?}");
    }

    #[test]
    fn terminate_ends_a_running_process() {
        let mut command = Command::new("sleep");
        command.arg("30");
        let mut process = Process::start("sleep", command);
        assert!(process.is_running());
        let status = process.terminate().expect("it ran");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM)
        );
        assert!(!process.is_running());
    }
}
