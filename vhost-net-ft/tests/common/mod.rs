//! Shared helpers of the integration tests, beyond the workspace's test framework
//! (`daemon_util::test_support`): the daemon in a throwaway network namespace for the TAP,
//! `status` parsed.
#![allow(dead_code)]

use std::ops::Deref;
use std::path::Path;
use std::process::{Command, Output};

use daemon_util::test_support::{status_json, Namespace, Process};

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
    status_json(path).expect("status answers JSON")
}

/// A throwaway network namespace for the daemon and its TAP (deleted when dropped).
pub struct Netns(Namespace);

impl Netns {
    /// Fails the test at once, with the reason, when not root: TAPs and namespaces need it.
    pub fn new() -> Netns {
        Netns(Namespace::new("vnft"))
    }

    /// Starts the daemon inside the namespace (`ip netns exec` execs it: same PID); its
    /// log is printed if the test fails.
    pub fn start_daemon(&self, args: &[&str]) -> Process {
        let mut command = self.command(BINARY);
        command.args(args).env("RUST_LOG", "debug");
        Process::start("vhost-net-ft", command)
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

impl Deref for Netns {
    type Target = Namespace;

    fn deref(&self) -> &Namespace {
        &self.0
    }
}
