//! Pieces the ftvm vhost-user daemons (`vhost-blk-mirror`, `vhost-net-ft`) share: binding
//! their root-only control socket, and a rate limit for log lines caused by guest input.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;

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
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    let bind_error = |source| ControlError::Bind {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    Ok(listener)
}

/// Lets through at most `burst` log lines per interval and counts the rest, so a guest that
/// floods bad requests cannot flood the log.
#[derive(Debug)]
pub struct RateLimitedLog {
    interval: Duration,
    burst: u64,
    start: Instant,
    window: AtomicU64,
    in_window: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    pub fn new(interval: Duration, burst: u64) -> RateLimitedLog {
        RateLimitedLog {
            interval,
            burst,
            start: Instant::now(),
            window: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns `Some(suppressed_since_last)` when a line may be logged now, `None` otherwise.
    pub fn admit(&self) -> Option<u64> {
        let interval_ms = self.interval.as_millis().max(1) as u64;
        let window = self.start.elapsed().as_millis() as u64 / interval_ms;
        if self.window.swap(window, Ordering::Relaxed) != window {
            self.in_window.store(0, Ordering::Relaxed);
        }
        if self.in_window.fetch_add(1, Ordering::Relaxed) < self.burst {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_admits_a_burst_then_counts() {
        let log = RateLimitedLog::new(Duration::from_secs(3600), 2);
        assert_eq!(log.admit(), Some(0));
        assert_eq!(log.admit(), Some(0));
        assert_eq!(log.admit(), None);
        assert_eq!(log.admit(), None);
        assert_eq!(log.suppressed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_live_socket_is_refused_and_a_stale_one_replaced() {
        let dir = std::env::temp_dir().join(format!("daemon-util-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("ctl");
        let first = bind_unix(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(bind_unix(&path), Err(ControlError::InUse(_))));
        drop(first);
        bind_unix(&path).expect("a stale socket file is replaced");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
