//! Unix sockets a daemon listens on: one per path, removed again on exit.

use std::io;
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
}
