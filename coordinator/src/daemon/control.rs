//! `ftvmd`'s control socket, shared with the `ftvm` CLI: one JSON request per line, one
//! JSON reply per line. The socket is mode 0600 and only root (or `ftvmd`'s own user) may
//! use it; the peer's credentials are checked on every connection.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::Duration;

use daemon_util::{bind_unix, serve_clients, ControlError};
use log::debug;
use serde::{Deserialize, Serialize};

use super::events::Event;
use super::vm::VmStatus;

/// Longest request accepted, in bytes.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Events,
    Failover {
        vm: String,
    },
    /// `ftvm migrate`: move the running VM to the peer without a reboot (`cancel`: call
    /// off a move before its final checkpoint). `timeout_s` bounds the preparation.
    Migrate {
        vm: String,
        #[serde(default)]
        cancel: bool,
        #[serde(default = "default_migrate_timeout")]
        timeout_s: u64,
    },
    Protect {
        vm: String,
        level: u8,
        peer: String,
    },
    Unprotect {
        vm: String,
    },
    /// `ftvm protect --domain`: protect the libvirt domain whose XML `ftvm` read. Without
    /// `confirmed`, only the changes it would make are returned (as `Done`).
    ProtectDomain {
        domain: String,
        xml: String,
        level: u8,
        peer: String,
        confirmed: bool,
    },
    /// From the libvirt hook (`ftvm hook`): `operation` (`prepare`, `start`, `started`,
    /// `stopped`, `release`, …) of the protected domain of VM `vm`. For `prepare` and
    /// `start`, `Error` refuses the start with its message.
    LibvirtHook {
        vm: String,
        operation: String,
    },
    /// `restart`: hand the VMs over stopped (they reboot on the peer) instead of moving
    /// them live.
    HostDisable {
        #[serde(default)]
        restart: bool,
    },
    HostEnable,
    /// `ftvm alert test`: a test alert through every alert agent, answered with each one's
    /// result.
    AlertTest,
    /// `ftvm snapshot ACTION VM [NAME]`: answered once the disk daemons have.
    Snapshot {
        vm: String,
        snapshot: SnapshotCommand,
    },
    /// `ftvm check [--peer] [VM]`: answered with [`Reply::Check`] once the facts are in.
    Check {
        vm: Option<String>,
        peer: bool,
    },
    /// `ftvm collect-logs`: answered with [`Reply::Bundles`], this host's and the peer's.
    CollectLogs,
}

/// The answer to `check`: the findings (blocking first) and the facts they come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckReport {
    pub findings: Vec<crate::check::Finding>,
    /// This host's facts, then the peer's if it answered.
    pub hosts: Vec<crate::check::HostFacts>,
}

/// What `ftvm snapshot` asks of a VM's disks (`docs/ARCHITECTURE.md`, "Snapshots").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotCommand {
    /// `consistency`: as asked with `--app-consistent`, or `None` for the VM's
    /// `snapshot_consistency`.
    Create {
        name: String,
        consistency: Option<SnapshotConsistency>,
    },
    List,
    Delete {
        name: String,
    },
    Revert {
        name: String,
    },
}

/// Whether a snapshot freezes the guest's file systems through its agent first
/// (`docs/OPERATIONS.md`, "Snapshots").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotConsistency {
    /// No freeze: crash-consistent.
    Crash,
    /// Freeze through the guest agent; refused with the reason when the guest runs none.
    Application,
    /// Freeze when the guest runs an agent; crash-consistent, and said so, when it does not.
    Auto,
}

impl SnapshotCommand {
    /// The disk daemons' command; refused when the name is not a snapshot name. A create
    /// is crash-consistent here: the VM decides when the guest's file systems are frozen.
    pub fn order(&self) -> Result<control_protocol::disk::SnapshotOrder, String> {
        use control_protocol::disk::{Consistency, SnapshotName, SnapshotOrder};
        let name = |name: &str| SnapshotName::new(name).map_err(|error| error.to_string());
        Ok(match self {
            SnapshotCommand::Create { name: text, .. } => {
                SnapshotOrder::Create(name(text)?, Consistency::Crash)
            }
            SnapshotCommand::List => SnapshotOrder::List,
            SnapshotCommand::Delete { name: text } => SnapshotOrder::Delete(name(text)?),
            SnapshotCommand::Revert { name: text } => SnapshotOrder::Revert(name(text)?),
        })
    }
}

/// One disk's snapshots on this host (`ftvm snapshot list`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiskSnapshots {
    /// The disk's serial.
    pub disk: String,
    pub image: String,
    pub snapshots: Vec<control_protocol::disk::SnapshotInfo>,
}

fn default_migrate_timeout() -> u64 {
    300
}

/// The answer to `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    pub host: String,
    /// The pair's key (`[peer] psk_file`).
    pub pair_key: KeyStatus,
    /// This host's key with the witness (`[witness] psk_file`).
    pub witness_key: KeyStatus,
    pub peer: String,
    pub peer_reachable: bool,
    pub links_up: usize,
    pub links: usize,
    /// Each A-link: up, round trip, bytes.
    pub alinks: Vec<super::links::ALinkStatus>,
    pub witness_reachable: bool,
    pub disabled: bool,
    pub vms: Vec<VmStatus>,
    /// Each alert agent's counts (`[[alert]]`).
    pub alerts: Vec<super::alerts::AgentStatus>,
    /// libvirt's URI on this host (`[libvirt] uri`), for `ftvm protect --domain`.
    #[serde(default)]
    pub libvirt_uri: Option<String>,
}

/// One of this host's keys, for `ftvm status` and `ftvm key retire` (ids: 16 hex digits,
/// a one-way hash of the key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStatus {
    /// The key file; `FILE.previous`, while it exists, holds a key accepted too.
    pub file: PathBuf,
    /// The ids of the keys held now, the preferred (the file's) first.
    pub held: Vec<String>,
    /// The ids of the keys the links this host dials use, one per link that is up.
    pub in_use: Vec<String>,
    /// The pair's key: the ids the peer holds, from its last heartbeat (`None`: not heard).
    pub peer_holds: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Status(Box<HostStatus>),
    Events(Vec<Event>),
    Snapshots(Vec<DiskSnapshots>),
    Check(Box<CheckReport>),
    Bundles(Vec<crate::collect::Bundle>),
    Done(String),
    Error(String),
}

/// A request waiting for the main loop's answer.
pub type Pending = (Request, Sender<Reply>);

/// Binds the socket (0600; a stale file is replaced, a live one refused) and serves it on
/// a thread; requests come out of the returned channel, and the returned sender lets other
/// servers (`/metrics`) ask the main loop too.
pub fn serve(path: &Path) -> Result<(Sender<Pending>, Receiver<Pending>), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    }
    let listener = bind_unix(path).map_err(|error| match error {
        ControlError::InUse(_) => format!(
            "{} is in use: another ftvmd is running on this host",
            path.display()
        ),
        ControlError::Bind { source, .. } => format!("cannot create {}: {source}", path.display()),
    })?;
    let (sender, receiver) = mpsc::channel();
    let others = sender.clone();
    // A client waits for the main loop's answer: each gets a thread, so one slow client
    // holds up no other.
    serve_clients(listener, move |stream| {
        let sender = sender.clone();
        thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                if let Err(error) = client(stream, &sender) {
                    debug!("control client: {error}");
                }
            })
            .map(|_| ())
    })
    .map_err(|error| format!("cannot start a thread: {error}"))?;
    Ok((others, receiver))
}

fn client(stream: UnixStream, sender: &Sender<Pending>) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let reply = if allowed(&stream) {
        let mut line = String::new();
        BufReader::new(io::Read::take(&stream, MAX_REQUEST_BYTES)).read_line(&mut line)?;
        match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let (answer, answered) = mpsc::channel();
                if sender.send((request, answer)).is_err() {
                    Reply::Error("ftvmd is stopping".into())
                } else {
                    answered
                        .recv_timeout(CLIENT_TIMEOUT)
                        .unwrap_or_else(|_| Reply::Error("ftvmd did not answer in time".into()))
                }
            }
            Err(error) => Reply::Error(format!("malformed request: {error}")),
        }
    } else {
        Reply::Error("permission denied: only root may control ftvmd".into())
    };
    let mut stream = stream;
    let mut text = serde_json::to_string(&reply).map_err(io::Error::other)?;
    text.push('\n');
    stream.write_all(text.as_bytes())
}

/// Root or the daemon's own user.
fn allowed(stream: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    daemon_util::peer_credentials(stream)
        .is_ok_and(|credentials| credentials.uid == 0 || credentials.uid == own)
}

/// Client side (the `ftvm` CLI): sends one request and returns the reply.
pub fn request(path: &Path, request: &Request) -> Result<Reply, String> {
    request_within(path, request, CLIENT_TIMEOUT + Duration::from_secs(5))
}

/// [`request`] that waits at most `timeout` for the answer.
pub fn request_within(path: &Path, request: &Request, timeout: Duration) -> Result<Reply, String> {
    let mut stream = UnixStream::connect(path).map_err(|error| match error.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => format!(
            "cannot reach ftvmd at {}: {error}; is ftvmd running on this host (systemctl \
             status ftvmd), and is this its control_socket?",
            path.display()
        ),
        io::ErrorKind::PermissionDenied => format!(
            "cannot reach ftvmd at {}: permission denied; run ftvm as root",
            path.display()
        ),
        _ => format!("cannot reach ftvmd at {}: {error}", path.display()),
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|error| error.to_string())?;
    let mut text = serde_json::to_string(request).map_err(|error| error.to_string())?;
    text.push('\n');
    stream
        .write_all(text.as_bytes())
        .map_err(|error| format!("cannot send to ftvmd: {error}"))?;
    let mut line = String::new();
    BufReader::new(io::Read::take(&stream, 64 << 20))
        .read_line(&mut line)
        .map_err(|error| format!("no answer from ftvmd: {error}"))?;
    serde_json::from_str(&line).map_err(|error| format!("bad answer from ftvmd: {error}"))
}
