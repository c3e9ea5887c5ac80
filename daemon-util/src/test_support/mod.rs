//! The test framework of the workspace (feature `test-support`, for dev-dependencies):
//! child processes ended by PID with their logs kept ([`process`]), waits with a deadline
//! ([`wait`]), network namespaces ([`netns`]), the root check, a daemon's control socket
//! and one-line errors. It lives here, in the crate every daemon already depends on and which
//! depends on no other crate of the workspace, so that any crate's tests can use it; the
//! end-to-end rig (`ftvm_tests`) re-exports it and adds hosts, guests and daemons.

pub mod netns;
pub mod process;
pub mod wait;

use std::path::Path;
use std::process::Output;

pub use netns::{in_namespace, namespace_pids, Namespace};
pub use process::{signal, Process};
pub use wait::{poll_for, poll_until, Wait, TIMEOUT};

/// Whether the tests run as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails the calling test at once, with the reason, unless it runs as root: a test that
/// needs root (`needs`: namespaces, mounts, a TAP) never passes without having run.
pub fn require_root(needs: &str) {
    assert!(
        is_root(),
        "this test needs root for {needs}: run the tests as root (ci/test.sh does), \
         or skip it by name"
    );
}

/// Sends one control command; `None` if the socket does not answer (yet).
pub fn control(path: &Path, command: &str) -> Option<String> {
    crate::request(path, command).ok()
}

/// Sends one control command and parses its JSON answer; `None` if the socket does not
/// answer (yet) or the answer is not JSON.
pub fn control_json(path: &Path, command: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&control(path, command)?).ok()
}

/// A daemon's `status` answer; `None` if its control socket does not answer (yet).
pub fn status_json(path: &Path) -> Option<serde_json::Value> {
    control_json(path, "status")
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
