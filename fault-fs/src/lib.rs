//! `ftvm-fault-fs`: a FUSE file system for tests that serves the files of a backing directory
//! and, on command over a control socket, fails reads and writes, runs out of space, adds
//! latency and loses power (drops every write not covered by a later fsync of its file, as
//! a host crash loses its page cache).
//!
//! Layers: [`overlay`] (one file's unsynced pages over its backing file, pure), [`store`]
//! (the directory and the dirty cap), [`faults`] and [`command`] (what to inject, parsed
//! from the control socket), [`control`] (the shared state and the answers), `filesystem`
//! (the only module that knows FUSE), `sys` (the only unsafe code).

pub mod command;
pub mod control;
pub mod faults;
mod filesystem;
pub mod overlay;
mod ranges;
pub mod store;
mod sys;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use fuser::{MountOption, Session};
use log::{info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use thiserror::Error;

use crate::control::Shared;
use crate::filesystem::FaultFileSystem;
use crate::store::Store;

/// Default cap on the dirty bytes of all files: 256 MiB.
pub const DEFAULT_MAX_DIRTY_BYTES: u64 = 256 << 20;
/// Threads serving the kernel's requests (an injected delay holds one per request).
const FUSE_THREADS: usize = 4;
/// How often the main thread looks whether the session ended without a signal.
const SESSION_CHECK_INTERVAL: Duration = Duration::from_millis(200);
/// How long the session may take to end after the unmount, and how often to look.
const SESSION_END_TIMEOUT: Duration = Duration::from_secs(2);
const SESSION_END_POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone)]
pub struct Config {
    /// The durable content: the files served, what survives a power loss.
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    pub control: PathBuf,
    pub max_dirty_bytes: u64,
}

#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot open backing directory {path}")]
    Backing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount on {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Control(#[from] daemon_util::ControlError),
    #[error("cannot serve the control socket")]
    ControlThread(#[source] io::Error),
    #[error("cannot watch for signals")]
    Signals(#[source] io::Error),
    #[error("the file system session failed")]
    Session(#[source] io::Error),
}

/// Mounts the file system, serves it and the control socket until SIGTERM or SIGINT (or an
/// unmount from outside), then unmounts it; the unmount syncs every file.
pub fn run(config: &Config) -> Result<(), Error> {
    let backing_error = |source| Error::Backing {
        path: config.backing.clone(),
        source,
    };
    if !config.backing.is_dir() {
        return Err(backing_error(io::Error::from_raw_os_error(libc::ENOTDIR)));
    }
    let store = Store::open(&config.backing, config.max_dirty_bytes).map_err(backing_error)?;
    let shared = Arc::new(Shared::new(store));
    // Before the mount: a signal from now on stops the daemon cleanly instead of killing it.
    let signals = Signals::new([SIGTERM, SIGINT]).map_err(Error::Signals)?;
    let signals_handle = signals.handle();
    let mut fuse_config = fuser::Config::default();
    fuse_config.mount_options = vec![
        MountOption::FSName("ftvm-fault-fs".into()),
        MountOption::Subtype("ftvm-fault-fs".into()),
        MountOption::NoAtime,
    ];
    fuse_config.n_threads = Some(FUSE_THREADS);
    let mount_error = |source| Error::Mount {
        path: config.mountpoint.clone(),
        source,
    };
    let session = Session::new(
        FaultFileSystem::new(shared.clone()),
        &config.mountpoint,
        &fuse_config,
    )
    .and_then(Session::spawn)
    .map_err(mount_error)?;
    info!(
        "serving {} on {} (dirty cap {} bytes)",
        config.backing.display(),
        config.mountpoint.display(),
        config.max_dirty_bytes
    );
    // The control socket answers once the mount is live: tests wait for it.
    let listener = daemon_util::bind_unix(&config.control)?;
    let answering = shared.clone();
    daemon_util::serve_commands(listener, move |line| Ok(answering.answer(line)))
        .map_err(Error::ControlThread)?;

    wait_for_stop(signals, &session)?;
    signals_handle.close();
    let result = unmount(session, &config.mountpoint, &shared);
    daemon_util::remove_socket(&config.control);
    result
}

/// Returns on the first SIGTERM or SIGINT, or when the session ended by itself (an unmount
/// from outside).
fn wait_for_stop(mut signals: Signals, session: &fuser::BackgroundSession) -> Result<(), Error> {
    let (stop_sender, stop) = mpsc::channel();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                info!("signal {signal} received, unmounting");
                let _ = stop_sender.send(());
            }
        })
        .map_err(Error::Signals)?;
    while !session.guard.is_finished() {
        match stop.recv_timeout(SESSION_CHECK_INTERVAL) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    Ok(())
}

/// Unmounts (or, if the mount is busy, detaches) the file system, waits a while for the
/// session to end (it syncs every file as it ends) and syncs every file.
///
/// The session may not end: files still open behind a detached mount, or a copy of the mount
/// in another mount namespace (`ip netns exec` makes them) keep the connection alive. Then
/// the process exits anyway once the files are synced; closing `/dev/fuse` at exit ends the
/// connection and its users get ENOTCONN.
fn unmount(
    session: fuser::BackgroundSession,
    mountpoint: &Path,
    shared: &Shared,
) -> Result<(), Error> {
    // A detached mount lives on while its files are open: no use waiting for it.
    let wait = match sys::unmount(mountpoint, false) {
        Ok(()) => {
            info!("unmounted {}", mountpoint.display());
            SESSION_END_TIMEOUT
        }
        // Unmounted from outside already.
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => SESSION_END_TIMEOUT,
        Err(error) => {
            warn!(
                "cannot unmount {} ({error}), detaching it",
                mountpoint.display()
            );
            if let Err(error) = sys::unmount(mountpoint, true) {
                warn!("cannot detach {}: {error}", mountpoint.display());
            }
            Duration::ZERO
        }
    };
    let deadline = Instant::now() + wait;
    while !session.guard.is_finished() && Instant::now() < deadline {
        thread::sleep(SESSION_END_POLL);
    }
    if session.guard.is_finished() {
        // The mount is gone: fuser's own unmount finds nothing (EINVAL) and the join is
        // immediate.
        match session.umount_and_join() {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {}
            Err(error) => warn!("the file system session ended with an error: {error}"),
        }
    } else {
        warn!("the file system is still in use; exiting without waiting for it");
        // Neither join the session nor let it unmount again: the process exits next.
        std::mem::forget(session);
    }
    daemon_util::lock(&shared.store)
        .sync_all()
        .map_err(Error::Session)
}
