//! The root-only control socket: binding it, accepting its clients on a thread, and the
//! daemons' protocol of one command line answered by one line.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use log::{debug, warn};
use thiserror::Error;

use crate::socket::{listen_unix, ListenError};

/// Longest command line a daemon's control socket accepts, in bytes.
const MAX_COMMAND_BYTES: u64 = 4096;
/// How long a client may take to send its command, and to read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("control socket {0} is in use by a running process")]
    InUse(PathBuf),
    #[error("cannot create control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds a unix socket at `path` with mode 0600, replacing a stale socket file but refusing
/// one that a live process still listens on.
pub fn bind_unix(path: &Path) -> Result<UnixListener, ControlError> {
    let listener = listen_unix(path, "control").map_err(|error| match error {
        ListenError::InUse { path, .. } => ControlError::InUse(path),
        ListenError::Bind { path, source, .. } => ControlError::Bind { path, source },
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ControlError::Bind {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// Accepts the clients of a control socket on a thread named `control` until the process
/// exits and hands each to `serve_client`. A client's error is logged at debug level (it is
/// the client's), a failed accept as a warning.
pub fn serve_clients<F>(listener: UnixListener, serve_client: F) -> io::Result<()>
where
    F: Fn(UnixStream) -> io::Result<()> + Send + 'static,
{
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        if let Err(error) = serve_client(stream) {
                            debug!("control client: {error}");
                        }
                    }
                    Err(error) => warn!("control socket accept failed: {error}"),
                }
            }
        })
        .map(|_| ())
}

/// Serves a daemon's control socket (see [`serve_clients`]) one client at a time: the client
/// writes a command and a newline, `answer` gets the command without surrounding white
/// space, and its reply goes back with a newline; then the connection closes.
pub fn serve_commands<F>(listener: UnixListener, answer: F) -> io::Result<()>
where
    F: Fn(&str) -> io::Result<String> + Send + 'static,
{
    serve_clients(listener, move |stream| answer_client(&stream, &answer))
}

fn answer_client(
    stream: &UnixStream,
    answer: &dyn Fn(&str) -> io::Result<String>,
) -> io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(io::Read::take(stream, MAX_COMMAND_BYTES)).read_line(&mut line)?;
    let mut reply = answer(line.trim())?;
    reply.push('\n');
    let mut stream = stream;
    stream.write_all(reply.as_bytes())
}

/// Sends one command to a daemon's control socket and returns the reply line (for tests and
/// tools).
pub fn request(path: &Path, command: &str) -> io::Result<String> {
    let mut stream = crate::socket::connect_unix(path)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.write_all(command.as_bytes())?;
    stream.write_all(b"\n")?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temporary_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("daemon-util-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let dir = temporary_dir("bind");
        let path = dir.join("ctl");
        let first = bind_unix(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(bind_unix(&path), Err(ControlError::InUse(_))));
        drop(first);
        bind_unix(&path).expect("a stale socket file is replaced");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_command_is_answered_with_one_line() {
        let dir = temporary_dir("commands");
        let path = dir.join("ctl");
        let listener = bind_unix(&path).expect("bind");
        serve_commands(listener, |command| match command {
            "fail" => Err(io::Error::other("no answer")),
            command => Ok(format!("got {command:?}")),
        })
        .expect("serve");
        assert_eq!(
            request(&path, "  status ").expect("reply"),
            "got \"status\"\n"
        );
        assert_eq!(request(&path, "").expect("reply"), "got \"\"\n");
        // No answer: the connection closes without a line; the next client is served.
        assert_eq!(request(&path, "fail").expect("closed"), "");
        assert_eq!(request(&path, "again").expect("reply"), "got \"again\"\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
