//! Unix sockets a daemon listens on: one per path, removed again on exit.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::warn;
use thiserror::Error;

/// Why a daemon cannot listen on its `role` socket (`"vhost-user"`, …).
#[derive(Debug, Error)]
pub enum ListenError {
    #[error("{role} socket {path} is in use by a running process")]
    InUse { role: &'static str, path: PathBuf },
    #[error("cannot listen on {role} socket {path}")]
    Bind {
        role: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds the daemon's `role` socket at `path`, replacing a stale socket file but refusing one
/// that a live process still listens on.
pub fn listen_unix(path: &Path, role: &'static str) -> Result<UnixListener, ListenError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ListenError::InUse {
                role,
                path: path.to_owned(),
            });
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| ListenError::Bind {
        role,
        path: path.to_owned(),
        source,
    })
}

/// Removes a socket file on exit; one that is already gone is fine, any other failure is
/// logged.
pub fn remove_socket(path: &Path) {
    if let Err(error) = std::fs::remove_file(path) {
        if error.kind() != io::ErrorKind::NotFound {
            warn!("cannot remove {}: {error}", path.display());
        }
    }
}

/// Connects to the unix socket at `path` without ever waiting for the listener: a daemon
/// whose accept queue is full (it hangs) gives `WouldBlock` at once instead of blocking the
/// caller, as `UnixStream::connect` would. The stream returned is blocking.
pub fn connect_unix(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero `sockaddr_un` is valid; the family and path are set below.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= address.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a usable socket path", path.display()),
        ));
    }
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: socket(2) takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2), is open and owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let length = std::mem::size_of::<libc::sa_family_t>() + bytes.len();
    // SAFETY: connect(2) reads `length` bytes of `address` (within its size: the path was
    // checked to fit), alive for the call; `socket` is open.
    let connected = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            std::ptr::addr_of!(address).cast(),
            length as libc::socklen_t,
        )
    };
    if connected < 0 {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::WouldBlock {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "{} does not accept connections (its queue is full)",
                    path.display()
                ),
            ));
        }
        return Err(error);
    }
    let stream = UnixStream::from(socket);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// The credentials (pid, uid, gid) of the process at the other end of a unix socket, as
/// the kernel took them when it connected or listened (`SO_PEERCRED`).
pub fn peer_credentials(stream: &UnixStream) -> io::Result<libc::ucred> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(SO_PEERCRED) writes at most `length` bytes (the size of a
    // `ucred`) into `credentials`, a properly sized and aligned ucred owned by this frame,
    // and its size into `length`; the fd is the stream's, open for the call.
    let result = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut credentials).cast(),
            &raw mut length,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(credentials)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_socket_is_refused_a_stale_one_replaced_and_removed() {
        let dir = std::env::temp_dir().join(format!("daemon-util-socket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s.sock");
        let first = listen_unix(&path, "test").expect("listen");
        let in_use = listen_unix(&path, "test").expect_err("in use");
        assert_eq!(
            in_use.to_string(),
            format!(
                "test socket {} is in use by a running process",
                path.display()
            )
        );
        drop(first);
        let _second = listen_unix(&path, "test").expect("a stale socket file is replaced");
        remove_socket(&path);
        assert!(!path.exists());
        remove_socket(&path);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn connecting_to_a_daemon_that_no_longer_accepts_fails_at_once() {
        let dir = std::env::temp_dir().join(format!("daemon-util-connect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("hung.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        // Nobody accepts: the queue fills, and then each connect fails instead of blocking.
        let mut held = Vec::new();
        let refused = (0..10_000).find_map(|_| match connect_unix(&path) {
            Ok(stream) => {
                held.push(stream);
                None
            }
            Err(error) => Some(error),
        });
        let error = refused.expect("the queue never filled");
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock, "{error}");
        assert!(error.to_string().contains("queue is full"), "{error}");
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
        let missing = connect_unix(&dir.join("missing.sock")).expect_err("no socket");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
    }
}
