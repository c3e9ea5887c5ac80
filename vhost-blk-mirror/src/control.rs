//! The control socket: a root-only unix socket answering one-line commands with one JSON line.
//!
//! Protocol: the client writes a command and a newline; the daemon answers with a single JSON
//! object and a newline, then closes. `status` returns the disk's state; `promote`, `demote`,
//! `continue-degraded`, `fence` (the coordinator's commands) and `repair` (the operator's,
//! after replacing a failed local disk) return `{"ok": true,
//! "result": "..."}`; anything refused or unknown gets `{"error": "..."}`.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{debug, info, warn};
use serde::Serialize;

use crate::execute::Disk;
use crate::image::ImageKind;
use crate::metrics::MetricsSnapshot;

/// The commands the control socket understands.
const COMMANDS: &str =
    "status, promote [GENERATION], demote, continue-degraded [GENERATION], fence, repair";
/// Longest command line accepted, in bytes.
const MAX_COMMAND_BYTES: u64 = 4096;
/// How long a client may take to send its command.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

pub use daemon_util::{bind_unix, ControlError};

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
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(error) = serve_client(stream, &disk, queues) {
                            debug!("control client: {error}");
                        }
                    }
                    Err(error) => warn!("control socket accept failed: {error}"),
                }
            }
        })
        .map(|_| ())
}

fn serve_client(stream: UnixStream, disk: &Disk, queues: usize) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(io::Read::take(&stream, MAX_COMMAND_BYTES)).read_line(&mut line)?;
    let reply = match line.trim() {
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
    let mut stream = stream;
    stream.write_all(reply.as_bytes())?;
    stream.write_all(b"\n")
}

/// Sends one command to a control socket and returns the reply line (used by tests and tools).
pub fn request(path: &Path, command: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.write_all(command.as_bytes())?;
    stream.write_all(b"\n")?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    Ok(reply)
}
