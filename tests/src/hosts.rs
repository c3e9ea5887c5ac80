//! Test hosts as network namespaces, made by `ci/hosts.sh` with a prefix unique to the test
//! and removed when the test ends, pass or fail. Making them needs root: a test that is not
//! root fails here, at its start, with the reason.

use std::ffi::OsStr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::netns::{in_namespace, namespace_pids};
use crate::{paths, require_root};

static NEXT_SET: AtomicU32 = AtomicU32::new(0);

/// One set of hosts: `<prefix>hostA`, `<prefix>hostB`, `<prefix>witness`, `<prefix>client`.
#[derive(Debug)]
pub struct Hosts {
    prefix: String,
}

impl Hosts {
    pub fn up() -> Hosts {
        require_root("the test hosts' network namespaces");
        let prefix = format!(
            "t{}x{}-",
            std::process::id(),
            NEXT_SET.fetch_add(1, Ordering::Relaxed)
        );
        run_hosts_script("up", &prefix);
        Hosts { prefix }
    }

    /// The namespace of a host: `hostA`, `hostB`, `witness` or `client`.
    pub fn namespace(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    /// `program` to be run on `host`.
    pub fn command(&self, host: &str, program: impl AsRef<OsStr>) -> Command {
        in_namespace(&self.namespace(host), program)
    }

    /// The processes running on `host`.
    pub fn pids(&self, host: &str) -> Vec<u32> {
        namespace_pids(&self.namespace(host))
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        run_hosts_script("down", &self.prefix);
    }
}

fn run_hosts_script(action: &str, prefix: &str) {
    let script = paths::repo_root().join("ci/hosts.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg(action)
        .arg(prefix)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", script.display()));
    if !output.status.success() && !std::thread::panicking() {
        panic!(
            "ci/hosts.sh {action} {prefix} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
