//! A `vhost-blk-mirror` daemon started by a test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use daemon_util::test_support::{control_json, status_json};

use crate::netns::in_namespace;
use crate::paths;
use crate::process::Process;
use crate::wait::{poll_for, poll_until};

/// How long a daemon may take to create its sockets.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of one `vhost-blk-mirror` run.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    pub image: PathBuf,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub queues: u16,
    pub serial: Option<String>,
    pub read_only: bool,
    pub netns: Option<String>,
    /// Further arguments: `--role`, `--peer`, `--listen`, `--psk-file`, …
    pub extra_args: Vec<String>,
}

impl BlkOptions {
    /// Sockets and image inside `dir`, one queue.
    pub fn in_dir(dir: &Path, name: &str) -> BlkOptions {
        BlkOptions {
            image: dir.join(format!("{name}.img")),
            socket: dir.join(format!("{name}.sock")),
            control: dir.join(format!("{name}.ctl")),
            queues: 1,
            serial: None,
            read_only: false,
            netns: None,
            extra_args: Vec::new(),
        }
    }
}

/// A running daemon; dropped = ended by PID.
#[derive(Debug)]
pub struct BlkDaemon {
    pub options: BlkOptions,
    pub process: Process,
}

impl BlkDaemon {
    /// Starts the daemon and waits until its vhost-user and control sockets answer.
    pub fn start(options: &BlkOptions, log: &Path) -> BlkDaemon {
        let binary = paths::binary("vhost-blk-mirror");
        let mut command = match &options.netns {
            Some(namespace) => in_namespace(namespace, binary),
            None => Command::new(binary),
        };
        command
            .arg("--socket")
            .arg(&options.socket)
            .arg("--image")
            .arg(&options.image)
            .arg("--control")
            .arg(&options.control)
            .arg("--queues")
            .arg(options.queues.to_string());
        if let Some(serial) = &options.serial {
            command.arg("--serial").arg(serial);
        }
        if options.read_only {
            command.arg("--read-only");
        }
        command.args(&options.extra_args);
        command.env("RUST_LOG", "debug");
        let mut process = Process::spawn("vhost-blk-mirror", command, log);
        let control = options.control.clone();
        poll_until(START_TIMEOUT, "vhost-blk-mirror control socket", || {
            process.assert_running();
            status_json(&control).is_some()
        });
        BlkDaemon {
            options: options.clone(),
            process,
        }
    }

    /// Waits until the replication `mode` is `mode`; returns the status.
    pub fn wait_mode(&self, timeout: Duration, mode: &'static str) -> serde_json::Value {
        self.wait_replication(timeout, mode, |r| r["mode"] == mode)
    }

    /// The daemon's `status` reply.
    pub fn status(&self) -> serde_json::Value {
        status_json(&self.options.control).expect("control socket answers status")
    }

    /// Sends a control command (`promote`, `continue-degraded`, …) and returns the reply.
    pub fn command(&self, command: &str) -> serde_json::Value {
        control_json(&self.options.control, command)
            .unwrap_or_else(|| panic!("control socket does not answer {command:?}"))
    }

    /// Waits until `condition` holds for the replication part of `status`.
    pub fn wait_replication(
        &self,
        timeout: Duration,
        what: &str,
        condition: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let description = format!("{what} ({})", self.options.image.display());
        poll_for(
            timeout,
            &description,
            || Some(self.status()),
            |status| condition(&status["replication"]),
        )
    }
}
