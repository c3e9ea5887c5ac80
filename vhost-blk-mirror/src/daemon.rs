//! The daemon's life: open the image, listen, serve one frontend connection after another
//! (QEMU reconnects after its own restart or ours), stop cleanly on SIGTERM/SIGINT.

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use daemon_util::guest_pages::GuestPages;
use daemon_util::{listen_unix, remove_socket, ListenError, Stop};
use log::{info, warn};
use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::BlkBackend;
use crate::config::disk_limits;
use crate::control::{self, ControlError};
use crate::execute::Disk;
use crate::image::{Image, ImageError};
use crate::metrics::{Metrics, RateLimitedLog};
use crate::replication::{build_mirror, ReplicationConfig, ReplicationError};

/// Most queues a disk may have.
pub const MAX_QUEUES: usize = 16;

/// Everything the daemon needs to run, as parsed from the command line.
#[derive(Clone, Debug)]
pub struct Config {
    pub socket: PathBuf,
    pub image: PathBuf,
    pub queues: usize,
    pub read_only: bool,
    pub serial: Option<String>,
    pub control: Option<PathBuf>,
    pub replication: ReplicationConfig,
}

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("--queues must be between 1 and {MAX_QUEUES}, not {0}")]
    Queues(usize),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot start the vhost-user daemon: {0}")]
    Start(String),
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
}

/// Opens the image and builds the shared disk state.
pub fn open_disk(config: &Config) -> Result<Arc<Disk>, DaemonError> {
    if config.queues == 0 || config.queues > MAX_QUEUES {
        return Err(DaemonError::Queues(config.queues));
    }
    let image = Image::open(&config.image, config.read_only)?;
    let limits = disk_limits(image.size_bytes(), config.read_only);
    let serial = config
        .serial
        .clone()
        .unwrap_or_else(|| default_serial(&config.image));
    let mirror = build_mirror(image, &config.replication)?;
    Ok(Arc::new(Disk {
        mirror,
        limits,
        serial,
        metrics: Metrics::default(),
        bad_request_log: RateLimitedLog::new(Duration::from_secs(1), 10),
        guest_pages: GuestPages::new(),
    }))
}

/// The image's file name, which is what an operator would look for in the guest.
fn default_serial(image: &Path) -> String {
    image
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: &Config) -> Result<(), DaemonError> {
    // Signal handlers first: a SIGTERM that arrives once the sockets answer must stop us
    // cleanly, not kill us with the default action.
    let stop =
        Stop::on_signals(&config.socket, ShutdownHandle::shutdown).map_err(DaemonError::Signals)?;
    let disk = open_disk(config)?;
    // The socket file is ours to remove: a library listener made from a bound socket does not.
    let mut listener = Listener::from(listen_unix(&config.socket, "vhost-user")?);
    if let Err(error) = start_control(config, &disk) {
        remove_socket(&config.socket);
        return Err(error);
    }
    info!(
        "serving {} ({} bytes, {} queue(s){}) on {}",
        config.image.display(),
        disk.mirror.image().size_bytes(),
        config.queues,
        if config.read_only { ", read-only" } else { "" },
        config.socket.display()
    );
    let result = serve(&disk, config.queues, &mut listener, &stop);
    if let Err(error) = disk.mirror.image().flush() {
        warn!("final fdatasync of the image failed: {error}");
    }
    disk.mirror.shutdown();
    remove_socket(&config.socket);
    if let Some(path) = &config.control {
        remove_socket(path);
    }
    info!("stopped");
    result
}

/// Binds the control socket (if any) and serves it on a thread.
fn start_control(config: &Config, disk: &Arc<Disk>) -> Result<(), DaemonError> {
    let Some(path) = &config.control else {
        return Ok(());
    };
    let listener = control::bind_unix(path)?;
    control::spawn(listener, disk.clone(), config.queues)
        .map_err(|error| DaemonError::Start(error.to_string()))
}

/// Serves frontends one connection at a time. Each connection gets a fresh backend, so no
/// queue state leaks from one QEMU (or one QEMU lifetime) to the next.
fn serve(
    disk: &Arc<Disk>,
    queues: usize,
    listener: &mut Listener,
    stop: &Stop<ShutdownHandle>,
) -> Result<(), DaemonError> {
    while !stop.requested() {
        // A secondary accepts a frontend too (a destination QEMU started ahead of a move,
        // `-incoming defer`): it answers the negotiation, but its queues pop no request
        // until the copy is promoted (`BlkBackend::process_vring`).
        let backend = Arc::new(
            BlkBackend::new(disk.clone(), queues)
                .map_err(|error| DaemonError::Start(error.to_string()))?,
        );
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("vhost-blk-mirror".into(), backend.clone(), memory)
            .map_err(|error| DaemonError::Start(error.to_string()))?;
        register_wakers(&daemon, &backend)?;
        backend.complete_on_the_completing_thread();
        daemon
            .start(listener)
            .map_err(|error| DaemonError::Start(error.to_string()))?;
        if stop.requested() {
            daemon.request_shutdown();
        } else {
            Metrics::add(&disk.metrics.connections, 1);
            disk.metrics.connected.store(true, Ordering::Relaxed);
            if disk.mirror.serves_guest() {
                info!("frontend connected");
            } else {
                info!("frontend connected to this secondary: held, no request is served until promoted");
            }
        }
        stop.set_connection(daemon.shutdown_handle());
        let ended = daemon.wait();
        stop.set_connection(None);
        disk.metrics.connected.store(false, Ordering::Relaxed);
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        match ended {
            Ok(()) => info!("frontend disconnected"),
            Err(error) => warn!("frontend connection ended: {error}"),
        }
    }
    Ok(())
}

/// Registers each queue's completion waker in that queue's epoll loop.
fn register_wakers(
    daemon: &VhostUserDaemon<Arc<BlkBackend>>,
    backend: &BlkBackend,
) -> Result<(), DaemonError> {
    for (queue, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        let Some(waker) = backend.waker(queue) else {
            continue;
        };
        handler
            .register_listener(
                waker.eventfd().as_raw_fd(),
                EventSet::IN,
                backend.wake_event_id(),
            )
            .map_err(|error| DaemonError::Start(format!("cannot register waker: {error}")))?;
    }
    Ok(())
}
