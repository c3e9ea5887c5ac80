//! Shared helpers of the integration tests: the daemon as a child process, a throwaway
//! network namespace for the TAP, the control socket.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const BINARY: &str = env!("CARGO_BIN_EXE_vhost-net-ft");
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A daemon started by a test, ended by PID when dropped.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
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

/// Runs the daemon to completion (for argument errors).
pub fn run(args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(args)
        .output()
        .expect("run vhost-net-ft")
}

pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends one control command; `None` if the socket does not answer (yet).
pub fn control(path: &Path, command: &str) -> Option<String> {
    let mut stream = UnixStream::connect(path).ok()?;
    stream.write_all(format!("{command}\n").as_bytes()).ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    Some(line)
}

/// `status`, parsed.
pub fn status(path: &Path) -> serde_json::Value {
    serde_json::from_str(&control(path, "status").expect("status")).expect("status is JSON")
}

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

pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A network namespace `nettest-vnft-<pid>-<n>` with IPv6 off (so the kernel sends no
/// unsolicited frames to our TAP); deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// `None` (with a note on stderr) when not root: TAPs and namespaces need root.
    pub fn new() -> Option<Netns> {
        if !is_root() {
            eprintln!("skipped: needs root for a network namespace and a TAP");
            return None;
        }
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "nettest-vnft-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        let netns = Netns { name };
        netns.ip(&["netns", "add", &netns.name]);
        netns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        netns.exec_ok(&[
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; \
             echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
        ]);
        Some(netns)
    }

    fn ip(&self, args: &[&str]) {
        let status = Command::new("ip").args(args).status().expect("run ip");
        assert!(status.success(), "ip {args:?} failed");
    }

    /// Runs a command inside the namespace and returns its output.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("run ip netns exec")
    }

    /// Runs a command inside the namespace; it must succeed.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let output = self.exec(args);
        assert!(
            output.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts the daemon inside the namespace (`ip netns exec` execs it: same PID).
    pub fn start_daemon(&self, args: &[&str]) -> Daemon {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, BINARY])
            .args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start vhost-net-ft");
        Daemon(child)
    }

    /// A counter of an interface in the namespace.
    pub fn statistic(&self, interface: &str, counter: &str) -> u64 {
        self.exec_ok(&[
            "cat",
            &format!("/sys/class/net/{interface}/statistics/{counter}"),
        ])
        .trim()
        .parse()
        .expect("counter")
    }

    /// The interfaces of the namespace.
    pub fn links(&self) -> Vec<String> {
        self.exec_ok(&["ls", "/sys/class/net"])
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
