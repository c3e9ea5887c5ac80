//! The daemon's life: open the TAP, listen, serve one frontend connection after another
//! (QEMU reconnects after its own restart or ours), stop cleanly on SIGTERM/SIGINT.

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use daemon_util::{listen_unix, remove_socket, ListenError, Stop};
use log::{info, warn};
use thiserror::Error;
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{tap_fd, NetBackend};
use crate::config::{default_mac, format_mac, MAX_QUEUE_PAIRS};
use crate::control::{self, ControlError};
use crate::device::Device;
use crate::metrics::Metrics;
use crate::output::MIN_BUFFER_BYTES;
use crate::peer::{self, PeerError, PeerSettings};
use crate::relay::Relay;
use crate::tap::{check_name, Tap, TapError};

/// Where the guest's frames go on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uplink {
    /// An existing TAP device of this name, or a new one (`--tap`).
    Tap(String),
    /// A new TAP made a port of this bridge, deleted on exit (`--bridge`).
    Bridge(String),
}

/// Everything the daemon needs to run, as parsed from the command line.
#[derive(Clone, Debug)]
pub struct Config {
    pub socket: PathBuf,
    pub uplink: Uplink,
    /// The guest's MAC; default: derived from the socket path.
    pub mac: Option<[u8; 6]>,
    /// Queue pairs.
    pub queues: usize,
    pub control: Option<PathBuf>,
    /// The VM bridge's port to the LAN, watched (`--uplink`).
    pub watch_uplink: Option<String>,
    /// The same NIC's daemon on the peer host, for the redundant uplink.
    pub peer: Option<PeerSettings>,
    /// The output commit buffer's limit in bytes (`--output-buffer-bytes`).
    pub output_buffer_bytes: usize,
}

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("--queues must be between 1 and {MAX_QUEUE_PAIRS}, not {0}")]
    Queues(usize),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot create the internal socket {path}")]
    Internal {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the vhost-user daemon: {0}")]
    Start(String),
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("cannot set up the NIC")]
    Device(#[source] std::io::Error),
    #[error("cannot set up the redundant uplink")]
    Peer(#[source] PeerError),
    #[error("--uplink {0}: {1}")]
    Uplink(String, TapError),
    #[error("--output-buffer-bytes must be at least {MIN_BUFFER_BYTES}, not {0}")]
    OutputBuffer(usize),
}

/// Opens (or creates) the TAP and builds the NIC's shared state.
pub fn open_device(config: &Config) -> Result<Arc<Device>, DaemonError> {
    if config.queues == 0 || config.queues > MAX_QUEUE_PAIRS {
        return Err(DaemonError::Queues(config.queues));
    }
    if config.output_buffer_bytes < MIN_BUFFER_BYTES {
        return Err(DaemonError::OutputBuffer(config.output_buffer_bytes));
    }
    let tap = match &config.uplink {
        Uplink::Tap(name) => Tap::open(name, config.queues)?,
        Uplink::Bridge(bridge) => Tap::create_on_bridge(bridge, config.queues)?,
    };
    if let Some(uplink) = &config.watch_uplink {
        check_name(uplink).map_err(|error| DaemonError::Uplink(uplink.clone(), error))?;
    }
    let mac = config.mac.unwrap_or_else(|| default_mac(&config.socket));
    let device = Device::new(
        tap,
        mac,
        config.queues,
        config.watch_uplink.clone(),
        config.output_buffer_bytes,
    )
    .map_err(DaemonError::Device)?;
    Ok(Arc::new(device))
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: &Config) -> Result<(), DaemonError> {
    // Signal handlers first: a SIGTERM that arrives once the sockets answer must stop us
    // cleanly (and delete our TAP), not kill us with the default action.
    let stop =
        Stop::on_signals(&config.socket, ShutdownHandle::shutdown).map_err(DaemonError::Signals)?;
    // Sockets before the TAP: a daemon that would be refused must not touch the network.
    let listener = listen_unix(&config.socket, "vhost-user")?;
    remove_stale_internal_directories();
    let result = start(config).and_then(|device| {
        log_serving(config, &device);
        let served = serve(&device, &listener, &stop);
        if let Some(path) = &config.control {
            remove_socket(path);
        }
        // The TAP is not persistent: the kernel deletes a TAP we created when its last file
        // closes, at the latest when the process exits right after this.
        if device.tap.bridge().is_some() {
            info!("deleting TAP device {}", device.tap.name());
        }
        info!("stopped");
        served
    });
    remove_socket(&config.socket);
    result
}

/// Binds the control socket, opens the TAP, starts the control thread.
fn start(config: &Config) -> Result<Arc<Device>, DaemonError> {
    let control_listener = match &config.control {
        Some(path) => Some(control::bind_unix(path)?),
        None => None,
    };
    let started = open_device(config).and_then(|device| {
        peer::start(&device, config.peer.as_ref()).map_err(DaemonError::Peer)?;
        if let Some(listener) = control_listener {
            control::spawn(listener, device.clone())
                .map_err(|error| DaemonError::Start(error.to_string()))?;
        }
        Ok(device)
    });
    if started.is_err() {
        // Ours to remove: it was bound above (one another process listens on is refused).
        if let Some(path) = &config.control {
            remove_socket(path);
        }
    }
    started
}

fn log_serving(config: &Config, device: &Device) {
    info!(
        "serving NIC {} ({} queue pair(s)) on TAP {}{} at {}",
        format_mac(device.mac),
        config.queues,
        device.tap.name(),
        device
            .tap
            .bridge()
            .map(|bridge| format!(" (bridge {bridge})"))
            .unwrap_or_default(),
        config.socket.display()
    );
}

/// Lets the library connect for one frontend connection (see [`crate::relay`]) and returns
/// its end. The library only connects to a path, so the socket lives in a fresh private
/// directory (mode 0700: no one else can connect in its place), removed again as soon as
/// the library is connected.
fn connect_library(
    daemon: &mut VhostUserDaemon<Arc<NetBackend>>,
) -> Result<UnixStream, DaemonError> {
    static CONNECTIONS: AtomicUsize = AtomicUsize::new(0);
    let directory = std::env::temp_dir().join(format!(
        "vhost-net-ft.{}.{}",
        std::process::id(),
        CONNECTIONS.fetch_add(1, Ordering::Relaxed)
    ));
    let path = directory.join("backend.sock");
    let error = |source| DaemonError::Internal {
        path: path.clone(),
        source,
    };
    // A directory of an earlier process with our pid is stale.
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&directory)
        .map_err(error)?;
    let _remove = RemoveDirectory(directory);
    let listener = UnixListener::bind(&path).map_err(error)?;
    let path_text = path
        .to_str()
        .ok_or_else(|| DaemonError::Start(format!("{} is not UTF-8", path.display())))?;
    daemon
        .start_client(path_text)
        .map_err(|error| DaemonError::Start(error.to_string()))?;
    let (stream, _) = listener.accept().map_err(error)?;
    Ok(stream)
}

/// Removes the internal directories of daemons that died (SIGKILL) while their library was
/// connecting.
fn remove_stale_internal_directories() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix("vhost-net-ft."))
            .and_then(|rest| rest.split('.').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Removes a directory and what is in it when dropped.
struct RemoveDirectory(PathBuf);

impl Drop for RemoveDirectory {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Serves frontends one connection at a time. Each connection gets a fresh backend, so no
/// queue state leaks from one QEMU (or one QEMU lifetime) to the next.
fn serve(
    device: &Arc<Device>,
    listener: &UnixListener,
    stop: &Stop<ShutdownHandle>,
) -> Result<(), DaemonError> {
    while !stop.requested() {
        let frontend = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) => {
                warn!("accepting a frontend failed: {error}");
                thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if stop.requested() {
            break;
        }
        // Connected: once the frontend starts the device (acks its features) the standby
        // thread leaves the TAP and its settings alone; until then it is held
        // (`Device::guest_attached`).
        device.metrics.connected.store(true, Ordering::Relaxed);
        let backend = Arc::new(
            NetBackend::new(device.clone())
                .map_err(|error| DaemonError::Start(error.to_string()))?,
        );
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("vhost-net-ft".into(), backend.clone(), memory)
            .map_err(|error| DaemonError::Start(error.to_string()))?;
        register_listeners(&daemon, &backend, device)?;
        let library = connect_library(&mut daemon)?;
        let relay = Relay::spawn(frontend, library)
            .map_err(|error| DaemonError::Start(error.to_string()))?;
        Metrics::add(&device.metrics.connections, 1);
        info!("frontend connected");
        stop.set_connection(daemon.shutdown_handle());
        if stop.requested() {
            daemon.request_shutdown();
        }
        let ended = daemon.wait();
        stop.set_connection(None);
        relay.join();
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        if let Err(error) = device.clear_acked_features() {
            warn!("{}", crate::backend::error_chain(&error));
        }
        device.metrics.connected.store(false, Ordering::Relaxed);
        match ended {
            // QEMU closing its end is how a connection normally ends.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!("frontend disconnected"),
            Err(error) => warn!("frontend connection ended: {error}"),
        }
    }
    Ok(())
}

/// Registers each pair's TAP queue (edge-triggered), resume eventfd, output-buffer room
/// eventfd and call fd timer in that pair's epoll loop. The last handler is the control
/// queue's and gets none of them.
fn register_listeners(
    daemon: &VhostUserDaemon<Arc<NetBackend>>,
    backend: &NetBackend,
    device: &Device,
) -> Result<(), DaemonError> {
    let register_error = |what: &str, error: std::io::Error| {
        DaemonError::Start(format!("cannot register {what}: {error}"))
    };
    for (pair, handler) in daemon
        .get_epoll_handlers()
        .iter()
        .enumerate()
        .take(backend.queue_pairs())
    {
        if let Some(fd) = tap_fd(device, pair) {
            handler
                .register_listener(
                    fd,
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    backend.tap_event_id(),
                )
                .map_err(|error| register_error("the TAP queue", error))?;
        }
        if pair == 0 {
            let wake = device.redundancy.guest_queue().wake_fd();
            handler
                .register_listener(wake.as_raw_fd(), EventSet::IN, backend.peer_event_id())
                .map_err(|error| register_error("the peer wake-up", error))?;
        }
        if let Some(resume) = backend.resume_eventfd(pair) {
            handler
                .register_listener(resume.as_raw_fd(), EventSet::IN, backend.resume_event_id())
                .map_err(|error| register_error("the RX wake-up", error))?;
        }
        if let Some(room) = device.output.room_eventfd(pair) {
            handler
                .register_listener(room.as_raw_fd(), EventSet::IN, backend.room_event_id())
                .map_err(|error| register_error("the output buffer's wake-up", error))?;
        }
        if let Some(timer) = backend.resignal_fd(pair) {
            handler
                .register_listener(timer, EventSet::IN, backend.resignal_event_id())
                .map_err(|error| register_error("the call fd timer", error))?;
        }
    }
    Ok(())
}
