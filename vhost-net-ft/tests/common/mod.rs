//! Shared helpers of the integration tests, beyond `daemon_util::test_support`: the daemon
//! in a throwaway network namespace for the TAP, `status` parsed.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use daemon_util::test_support::{control, Daemon};

pub const BINARY: &str = env!("CARGO_BIN_EXE_vhost-net-ft");

/// Runs the daemon to completion (for argument errors).
pub fn run(args: &[&str]) -> Output {
    Command::new(BINARY)
        .args(args)
        .output()
        .expect("run vhost-net-ft")
}

/// `status`, parsed.
pub fn status(path: &Path) -> serde_json::Value {
    serde_json::from_str(&control(path, "status").expect("status")).expect("status is JSON")
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
