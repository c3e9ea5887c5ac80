//! Starting and stopping backend daemons (qemu-storage-daemon, ours) for the benchmark and the
//! tests: each is killed by PID when its guard drops, even on error or panic.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Where Debian installs qemu-storage-daemon.
pub const QSD_PATH: &str = "/usr/bin/qemu-storage-daemon";
/// How often we look for the socket and for an early exit.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How long a daemon may take to exit after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Bytes of a daemon's log quoted in errors.
const LOG_TAIL_BYTES: u64 = 2000;

/// Errors of the daemon module.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the log file {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{name} exited ({status}) before its socket {socket} appeared; log: {log_tail}")]
    Exited {
        name: String,
        status: String,
        socket: PathBuf,
        log_tail: String,
    },
    #[error("socket {socket} of {name} did not appear within {timeout_ms} ms; log: {log_tail}")]
    SocketTimeout {
        name: String,
        socket: PathBuf,
        timeout_ms: u64,
        log_tail: String,
    },
    #[error("command template has no {{socket}} placeholder: {template}")]
    NoSocketPlaceholder { template: String },
    #[error("cannot check whether {name} is still running")]
    Status {
        name: String,
        #[source]
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, DaemonError>;

/// Quotes `text` for `sh`.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A running daemon with its socket path and log file; stopped on drop.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Child,
    socket: PathBuf,
    log_path: PathBuf,
}

impl Daemon {
    /// Starts `command` with stdout and stderr going to `log_path`.
    pub fn spawn(name: &str, mut command: Command, socket: &Path, log_path: &Path) -> Result<Self> {
        let log_error = |source| DaemonError::Log {
            path: log_path.to_path_buf(),
            source,
        };
        let log = File::create(log_path).map_err(log_error)?;
        let log_copy = log.try_clone().map_err(log_error)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_copy))
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|source| DaemonError::Spawn {
                program: format!("{command:?}"),
                source,
            })?;
        log::info!(
            "started {name} (pid {}) for {}",
            child.id(),
            socket.display()
        );
        Ok(Self {
            name: name.to_string(),
            child,
            socket: socket.to_path_buf(),
            log_path: log_path.to_path_buf(),
        })
    }

    /// Starts qemu-storage-daemon exporting raw `image` as vhost-user-blk on `socket`.
    pub fn qemu_storage_daemon(
        program: &Path,
        image: &Path,
        socket: &Path,
        num_queues: u16,
        log_path: &Path,
    ) -> Result<Self> {
        let mut command = Command::new(program);
        command
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={}",
                image.display()
            ))
            .arg("--blockdev")
            .arg("driver=raw,node-name=d0,file=f0")
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,addr.type=unix,addr.path={},node-name=d0,\
                 writable=on,num-queues={num_queues}",
                socket.display()
            ));
        Self::spawn("qemu-storage-daemon", command, socket, log_path)
    }

    /// Starts `template` through `sh -c 'exec …'` (so the PID is the daemon's), with
    /// `{socket}` and `{image}` replaced by the quoted paths.
    pub fn from_template(
        name: &str,
        template: &str,
        socket: &Path,
        image: Option<&Path>,
        log_path: &Path,
    ) -> Result<Self> {
        if !template.contains("{socket}") {
            return Err(DaemonError::NoSocketPlaceholder {
                template: template.to_string(),
            });
        }
        let mut line = template.replace("{socket}", &shell_quote(&socket.to_string_lossy()));
        if let Some(image) = image {
            line = line.replace("{image}", &shell_quote(&image.to_string_lossy()));
        }
        let mut command = Command::new("sh");
        command.arg("-c").arg(format!("exec {line}"));
        Self::spawn(name, command, socket, log_path)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The socket it serves.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The last bytes of its log.
    pub fn log_tail(&self) -> String {
        read_tail(&self.log_path).unwrap_or_else(|error| format!("(no log: {error})"))
    }

    /// Polls until the socket exists, failing early if the daemon exits.
    pub fn wait_for_socket(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let is_socket = std::fs::metadata(&self.socket)
                .map(|metadata| metadata.file_type().is_socket())
                .unwrap_or(false);
            if is_socket {
                return Ok(());
            }
            let status = self
                .child
                .try_wait()
                .map_err(|source| DaemonError::Status {
                    name: self.name.clone(),
                    source,
                })?;
            if let Some(status) = status {
                return Err(DaemonError::Exited {
                    name: self.name.clone(),
                    status: status.to_string(),
                    socket: self.socket.clone(),
                    log_tail: self.log_tail(),
                });
            }
            if Instant::now() >= deadline {
                return Err(DaemonError::SocketTimeout {
                    name: self.name.clone(),
                    socket: self.socket.clone(),
                    timeout_ms: timeout.as_millis() as u64,
                    log_tail: self.log_tail(),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL after a grace period; waits for the exit. Idempotent.
    pub fn stop(&mut self) {
        if !self.is_running() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) takes two integers and touches no memory of ours; `pid` is our
            // own child, which has not been reaped yet (try_wait said it runs), so the PID
            // cannot have been reused by another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if !self.is_running() {
                log::info!("{} (pid {}) stopped", self.name, self.child.id());
                return;
            }
            thread::sleep(POLL_INTERVAL);
        }
        log::warn!(
            "{} (pid {}) ignored SIGTERM; killing",
            self.name,
            self.child.id()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read_tail(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_survives_quotes() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn template_without_socket_is_refused() {
        let directory = tempfile::tempdir().expect("tempdir");
        let result = Daemon::from_template(
            "x",
            "true",
            &directory.path().join("s"),
            None,
            &directory.path().join("log"),
        );
        assert!(matches!(
            result,
            Err(DaemonError::NoSocketPlaceholder { .. })
        ));
    }

    #[test]
    fn early_exit_is_reported_with_the_log() {
        let directory = tempfile::tempdir().expect("tempdir");
        let mut daemon = Daemon::from_template(
            "failing",
            "sh -c 'echo no luck for $0 >&2; exit 3' {socket}",
            &directory.path().join("s"),
            None,
            &directory.path().join("log"),
        )
        .expect("spawn");
        let error = daemon
            .wait_for_socket(Duration::from_secs(5))
            .expect_err("must fail");
        let message = error.to_string();
        assert!(message.contains("no luck"), "{message}");
    }

    #[test]
    fn stop_ends_a_running_daemon() {
        let directory = tempfile::tempdir().expect("tempdir");
        let mut daemon = Daemon::from_template(
            "sleeper",
            "sleep 30 # {socket}",
            &directory.path().join("s"),
            None,
            &directory.path().join("log"),
        )
        .expect("spawn");
        assert!(daemon.is_running());
        daemon.stop();
        assert!(!daemon.is_running());
    }
}
