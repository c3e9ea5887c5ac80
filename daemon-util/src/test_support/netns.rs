//! Network namespaces for tests: commands run inside one, the processes in one, and a
//! throwaway namespace deleted when dropped. The end-to-end rig's test hosts (`ftvm_tests`'
//! `Hosts`, made by `ci/hosts.sh`) are namespaces too and use these.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::require_root;

/// `program` to be run inside network namespace `namespace` (`ip netns exec` execs it, so
/// the PID is the program's).
pub fn in_namespace(namespace: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", namespace]).arg(program);
    command
}

/// The processes in a network namespace.
pub fn namespace_pids(namespace: &str) -> Vec<u32> {
    let output = Command::new("ip")
        .args(["netns", "pids", namespace])
        .output()
        .expect("run ip netns pids");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect()
}

/// A network namespace `nettest-<tag>-<pid>-<n>` with IPv6 off (so the kernel sends no
/// unsolicited frames); its processes are killed and it is deleted when dropped.
#[derive(Debug)]
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    /// Creates the namespace; fails the test at once when not root.
    pub fn new(tag: &str) -> Namespace {
        require_root("a network namespace");
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "nettest-{tag}-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("run ip");
        assert!(status.success(), "ip netns add {name} failed");
        let namespace = Namespace { name };
        namespace.exec_ok(&["ip", "link", "set", "lo", "up"]);
        namespace.exec_ok(&[
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; \
             echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
        ]);
        namespace
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        in_namespace(&self.name, program)
    }

    /// Runs a command inside the namespace and returns its output.
    pub fn exec(&self, args: &[&str]) -> Output {
        let (program, rest) = args.split_first().expect("a command");
        self.command(program)
            .args(rest)
            .output()
            .expect("run ip netns exec")
    }

    /// Runs a command inside the namespace; it must succeed. Returns its stdout.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let output = self.exec(args);
        assert!(
            output.status.success(),
            "{args:?} in {} failed: {}",
            self.name,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        for pid in namespace_pids(&self.name) {
            super::process::signal(pid, libc::SIGKILL);
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
