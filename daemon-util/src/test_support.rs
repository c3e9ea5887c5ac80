//! Helpers for the daemons' integration tests (feature `test-support`): the daemon as a
//! child process, waiting with a timeout, the control socket, one-line errors.

use std::path::Path;
use std::process::{Child, ExitStatus, Output};
use std::time::{Duration, Instant};

/// How long a test waits for a daemon.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A daemon started by a test, ended by PID when dropped.
#[derive(Debug)]
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.0.id()).expect("pid");
        // SAFETY: kill(2) takes integers only; `pid` is our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let mut status = None;
        wait_until("daemon exit", || {
            status = self.0.try_wait().expect("try_wait");
            status.is_some()
        });
        status.expect("exited")
    }
}

/// Polls `condition` until it holds; panics after [`TIMEOUT`].
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends one control command; `None` if the socket does not answer (yet).
pub fn control(path: &Path, command: &str) -> Option<String> {
    crate::request(path, command).ok()
}

/// The stderr of a daemon that failed, which must be one line.
pub fn one_line_error(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "expected failure, got {:?}",
        output.status
    );
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr:?}"
    );
    stderr
}
