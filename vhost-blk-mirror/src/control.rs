//! The control socket: a root-only unix socket answering one-line commands with one JSON line.
//!
//! Protocol: the client writes a command and a newline; the daemon answers with a single JSON
//! object and a newline, then closes. `status` returns the disk's state; `promote`, `demote`,
//! `continue-degraded`, `fence` (the coordinator's commands) and `repair` (the operator's,
//! after replacing a failed local disk) return `{"ok": true,
//! "result": "..."}`; anything refused or unknown gets `{"error": "..."}`.

use std::io;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use log::info;
use serde::Serialize;

use crate::execute::Disk;
use crate::image::ImageKind;
use crate::metrics::MetricsSnapshot;

/// The commands the control socket understands.
const COMMANDS: &str =
    "status, promote [GENERATION], demote, continue-degraded [GENERATION], fence, repair";

pub use daemon_util::{bind_unix, request, ControlError};

/// The answer to `status`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub image: String,
    pub image_kind: ImageKind,
    pub size_bytes: u64,
    pub read_only: bool,
    pub serial: String,
    pub queues: usize,
    #[serde(flatten)]
    pub metrics: MetricsSnapshot,
    /// Role, generation, disk state, peer and links, resync progress.
    pub replication: serde_json::Value,
}

/// Builds the `status` answer for a disk.
pub fn status(disk: &Disk, queues: usize) -> Status {
    Status {
        image: disk.mirror.image().path().display().to_string(),
        image_kind: disk.mirror.image().kind(),
        size_bytes: disk.mirror.image().size_bytes(),
        read_only: disk.mirror.image().read_only(),
        serial: disk.serial.clone(),
        queues,
        metrics: disk.metrics.snapshot(),
        replication: disk.mirror.status(),
    }
}

/// Serves the control socket on a background thread until the process exits.
pub fn spawn(listener: UnixListener, disk: Arc<Disk>, queues: usize) -> io::Result<()> {
    daemon_util::serve_commands(listener, move |command| answer(command, &disk, queues))
}

fn answer(command: &str, disk: &Disk, queues: usize) -> io::Result<String> {
    let reply = match command {
        "status" => serde_json::to_string(&status(disk, queues)).map_err(io::Error::other)?,
        "" => serde_json::json!({ "error": format!("empty command; try: {COMMANDS}") }).to_string(),
        command
            if matches!(
                command.split_whitespace().next(),
                Some("promote" | "demote" | "continue-degraded" | "fence" | "repair")
            ) =>
        {
            info!("control command: {command}");
            match disk.mirror.command(command) {
                Ok(result) => serde_json::json!({ "ok": true, "result": result }),
                Err(error) => serde_json::json!({ "error": error }),
            }
            .to_string()
        }
        other => serde_json::json!({
            "error": format!("unknown command {other:?}; try: {COMMANDS}")
        })
        .to_string(),
    };
    Ok(reply)
}
