//! The redundant uplink through the peer host (Level 2).
//!
//! The two daemons of a NIC, one on each host of the pair and both with the VM's MAC, keep a
//! link over the A-links ([`replication_link`]): each connects a session to the other's
//! listener and sends on it, and receives on the session the other connected to it. So each
//! direction is its own reliable, authenticated stream and neither daemon needs a role.
//!
//! The daemon the guest is attached to (a frontend is connected) watches its uplink
//! (`--uplink`: the VM bridge's port to the LAN). When the uplink fails and the peer reports
//! its own uplink up, it
//! 1. asks the peer to relay (`State.want_relay`): the peer then sends it every frame its TAP
//!    receives for the guest's MAC or a group address (`Frame(ToGuest)`), and
//! 2. sends the guest's frames to the peer (`Frame(ToLan)`), which writes them to its own TAP
//!    on its own bridge, starting with a RARP from the MAC so that the LAN's switches learn
//!    that the MAC is now behind the peer host.
//!
//! When the uplink has been up again for [`FAILBACK`], traffic moves back, with a RARP on the
//! local TAP. A daemon with a guest attached never relays for the other, and frames are only
//! accepted in the direction the receiver's state allows, so two attached daemons (which the
//! coordinator's fencing prevents) still cannot loop frames between them.
//!
//! Layout: [`PeerMessage`] and [`PeerState`] are the wire format and
//! [`check_frame_from_peer`] the (fuzzed) check of a frame from the peer; [`PathChooser`] is
//! the pure decision; [`Redundancy`] is the state the queue workers share; [`start`] runs the
//! two threads (`peer-in`: the peer's messages; `uplink`: the watch, the decision, the state
//! messages and, without a guest, the TAP).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use daemon_util::lock;
use log::{info, warn};
use replication_link::{
    error_chain, LinkConfig, LinkListener, ListenerEvent, Psk, Session, SessionError, SessionEvent,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{format_mac, tap_offloads};
use crate::device::Device;
use crate::frame::{
    addressed_to, convert_header, validate_tx, FrameError, TxOffloads, VnetHeader, MAX_FRAME_BYTES,
    VNET_HDR_LEN,
};
use crate::metrics::Metrics;
use crate::sink::TxFrame;
use crate::tap::{interface_running, LinkEvents};

/// How often the uplink is checked and the path decided.
pub const TICK: Duration = Duration::from_millis(20);
/// How often each daemon tells the other its state (also sent at once on a change).
pub const STATE_INTERVAL: Duration = Duration::from_millis(100);
/// A peer whose last state is older than this is not relied on (and not relayed for).
pub const PEER_STATE_TIMEOUT: Duration = Duration::from_millis(1000);
/// How long the uplink must be up again before traffic moves back to it (a flapping port
/// does not move the MAC back and forth).
pub const FAILBACK: Duration = Duration::from_millis(500);
/// Announcements after a switch, relative to it (the first may be lost while the path
/// settles).
const ANNOUNCE_AFTER: [Duration; 2] = [Duration::ZERO, Duration::from_millis(1000)];
/// How long a state message may wait for room in the send window behind frames.
const STATE_SEND_WAIT: Duration = Duration::from_millis(10);
/// The `TUN_F_*` offloads a peer may ask our relaying TAP for.
const RELAY_OFFLOADS: u32 =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
/// Frames from the peer waiting for the guest; more are dropped (the guest is not reading).
pub const MAX_QUEUED_FOR_GUEST: usize = 512;
/// The link's send window: small, because a frame late by seconds is worth nothing.
const SEND_WINDOW_BYTES: usize = 4 * 1024 * 1024;
const SEND_WINDOW_MESSAGES: usize = 2048;
/// Largest link frame: a 64 KiB segmentation-offload frame, its header and ours.
const LINK_FRAME_BYTES: usize = 128 * 1024;

/// What the two daemons of a NIC send each other (the postcard application header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// The sender's state; every [`STATE_INTERVAL`] and at once on a change.
    State(PeerState),
    /// The payload is a 12-byte virtio-net header and an Ethernet frame.
    Frame(Direction),
}

/// Where a frame from the peer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// A frame of the peer's guest, for our TAP (we relay for the peer).
    ToLan,
    /// A frame our peer's TAP received for our guest.
    ToGuest,
}

/// A daemon's state as its peer needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerState {
    /// The sender's uplink: up, down, or not watched (`None`).
    pub uplink_up: Option<bool>,
    /// A frontend (the VM) is attached to the sender.
    pub guest_attached: bool,
    /// The sender's guest uses the receiver's uplink: relay for it.
    pub want_relay: bool,
    /// The `TUN_F_*` offloads the sender's guest takes: what the relaying TAP may hand over.
    pub offloads: u32,
}

/// Why a frame from the peer was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PeerFrameError {
    #[error("a frame for our guest, but no guest is attached here")]
    NoGuest,
    #[error("a frame for our LAN, but we are not relaying for the peer (our guest is attached here, or the peer did not ask)")]
    NotRelaying,
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Checks a frame from the peer (12-byte header and Ethernet frame) against this daemon's
/// state: a `ToGuest` frame needs an attached guest and may only use the offloads the guest
/// negotiated (`acked_features`); a `ToLan` frame needs no guest here and a relay the peer
/// asked for (`relaying`: a late frame from before is not put on the LAN), and may use any
/// offload the TAP takes. Pure; fuzzed with the frame parser.
pub fn check_frame_from_peer(
    direction: Direction,
    payload: &[u8],
    guest_attached: bool,
    relaying: bool,
    acked_features: u64,
) -> Result<VnetHeader, PeerFrameError> {
    let offloads = match direction {
        Direction::ToGuest if guest_attached => TxOffloads::guest_receive(acked_features),
        Direction::ToGuest => return Err(PeerFrameError::NoGuest),
        Direction::ToLan if relaying && !guest_attached => TxOffloads::ALL,
        Direction::ToLan => return Err(PeerFrameError::NotRelaying),
    };
    Ok(validate_tx(payload, VNET_HDR_LEN, offloads)?)
}

/// The path the guest's frames take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// Our own TAP and uplink.
    Local,
    /// The peer host's TAP and uplink, over the A-links.
    Peer,
}

/// Decides the path from the uplink's state and the peer's usability. Pure.
#[derive(Debug, Default)]
pub struct PathChooser {
    via_peer: bool,
    /// Since when the local uplink is up again, while on the peer path.
    local_up_since: Option<Instant>,
}

impl PathChooser {
    pub fn path(&self) -> Path {
        if self.via_peer {
            Path::Peer
        } else {
            Path::Local
        }
    }

    /// `local_up`: our uplink (`None`: not watched, taken as up). `peer_usable`: the peer is
    /// reachable, fresh, has no guest and its uplink is not down. Returns the new path on a
    /// switch.
    pub fn decide(
        &mut self,
        local_up: Option<bool>,
        peer_usable: bool,
        now: Instant,
    ) -> Option<Path> {
        let local_ok = local_up != Some(false);
        if !self.via_peer {
            if !local_ok && peer_usable {
                self.via_peer = true;
                self.local_up_since = None;
                return Some(Path::Peer);
            }
            return None;
        }
        if !local_ok {
            self.local_up_since = None;
        } else if self.local_up_since.is_none() {
            self.local_up_since = Some(now);
        }
        let failback = self
            .local_up_since
            .is_some_and(|since| now.saturating_duration_since(since) >= FAILBACK);
        if failback || !peer_usable {
            self.via_peer = false;
            self.local_up_since = None;
            return Some(Path::Local);
        }
        None
    }

    /// No guest: no path to choose; back to local.
    pub fn reset(&mut self) -> Option<Path> {
        let was = self.via_peer;
        *self = PathChooser::default();
        was.then_some(Path::Local)
    }
}

/// Frames from the peer for the guest, taken by queue pair 0's worker.
#[derive(Debug)]
pub struct GuestQueue {
    frames: Mutex<VecDeque<Vec<u8>>>,
    /// Written when a frame is queued; registered in pair 0's event loop.
    wake: EventFd,
}

impl GuestQueue {
    fn new() -> io::Result<GuestQueue> {
        Ok(GuestQueue {
            frames: Mutex::new(VecDeque::new()),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Queues a frame (12-byte header first); false when the queue is full.
    fn push(&self, frame: Vec<u8>) -> bool {
        let mut frames = lock(&self.frames);
        if frames.len() >= MAX_QUEUED_FOR_GUEST {
            return false;
        }
        frames.push_back(frame);
        drop(frames);
        let _ = self.wake.write(1);
        true
    }

    /// The next frame (12-byte header first).
    pub fn pop(&self) -> Option<Vec<u8>> {
        lock(&self.frames).pop_front()
    }

    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Clears the wake-up (the worker then drains the queue).
    pub fn acknowledge(&self) {
        let _ = self.wake.read();
    }

    pub(crate) fn clear(&self) {
        lock(&self.frames).clear();
    }
}

/// Uplink state as stored: not watched, down, up.
const UPLINK_UNWATCHED: u8 = 0;
const UPLINK_DOWN: u8 = 1;
const UPLINK_UP: u8 = 2;

/// The redundancy state of a NIC, shared by the queue workers, the control socket and the
/// two threads of [`start`].
#[derive(Debug)]
pub struct Redundancy {
    uplink: Option<String>,
    uplink_state: AtomicU8,
    via_peer: AtomicBool,
    /// We relay for the peer (its uplink is down, we have no guest).
    relaying: AtomicBool,
    switches: AtomicU64,
    link: OnceLock<PeerLink>,
    to_guest: GuestQueue,
}

/// The sessions with the peer's daemon.
#[derive(Debug)]
struct PeerLink {
    /// Ours to the peer's listener: everything we send. Replaced by a new session when the
    /// peer was unreachable for [`PEER_STATE_TIMEOUT`] with messages still queued, so that
    /// frames and states of the past are dropped instead of delivered late.
    outgoing: RwLock<Arc<Session>>,
    /// What a new outgoing session needs.
    peers: Vec<SocketAddr>,
    service: String,
    config: LinkConfig,
    /// The peer's last state and when it came.
    peer: Mutex<Option<(PeerState, Instant)>>,
    /// The session the peer connected to us is up.
    incoming_reachable: AtomicBool,
    to_lan_header: Vec<u8>,
    to_guest_header: Vec<u8>,
}

/// The redundancy part of `status`.
#[derive(Debug, Serialize)]
pub struct RedundancyStatus {
    pub path: Path,
    pub uplink: Option<String>,
    pub uplink_up: Option<bool>,
    pub peer_configured: bool,
    pub peer_reachable: bool,
    pub peer_uplink_up: Option<bool>,
    pub peer_guest_attached: bool,
    pub relaying_for_peer: bool,
    pub path_switches: u64,
    pub frames_queued_for_guest: usize,
    /// The outgoing session's links (addresses, state, counters).
    pub peer_session: Option<serde_json::Value>,
}

impl Redundancy {
    pub fn new(uplink: Option<String>) -> io::Result<Redundancy> {
        Ok(Redundancy {
            uplink,
            uplink_state: AtomicU8::new(UPLINK_UNWATCHED),
            via_peer: AtomicBool::new(false),
            relaying: AtomicBool::new(false),
            switches: AtomicU64::new(0),
            link: OnceLock::new(),
            to_guest: GuestQueue::new()?,
        })
    }

    /// The guest's frames go to the peer host.
    pub fn via_peer(&self) -> bool {
        self.via_peer.load(Ordering::Relaxed)
    }

    pub fn guest_queue(&self) -> &GuestQueue {
        &self.to_guest
    }

    pub fn uplink_up(&self) -> Option<bool> {
        match self.uplink_state.load(Ordering::Relaxed) {
            UPLINK_UP => Some(true),
            UPLINK_DOWN => Some(false),
            _ => None,
        }
    }

    /// Sends one guest frame to the peer host (without waiting: a full window drops it).
    pub fn send_to_lan(&self, frame: TxFrame) -> Result<(), SessionError> {
        let Some(link) = self.link.get() else {
            return Err(SessionError::Closed {
                reason: replication_link::CloseReason::Closed,
            });
        };
        let (bytes, header_len) = frame.into_parts();
        let payload = convert_header(bytes, header_len, VNET_HDR_LEN);
        link.session()
            .send_timeout(&link.to_lan_header, payload, Duration::ZERO)
            .map(|_| ())
    }

    pub fn status(&self) -> RedundancyStatus {
        let peer = self.link.get().and_then(PeerLink::fresh_state);
        RedundancyStatus {
            path: if self.via_peer() {
                Path::Peer
            } else {
                Path::Local
            },
            uplink: self.uplink.clone(),
            uplink_up: self.uplink_up(),
            peer_configured: self.link.get().is_some(),
            peer_reachable: self.link.get().is_some_and(PeerLink::reachable),
            peer_uplink_up: peer.and_then(|state| state.uplink_up),
            peer_guest_attached: peer.is_some_and(|state| state.guest_attached),
            relaying_for_peer: self.relaying.load(Ordering::Relaxed),
            path_switches: self.switches.load(Ordering::Relaxed),
            frames_queued_for_guest: lock(&self.to_guest.frames).len(),
            peer_session: self
                .link
                .get()
                .and_then(|link| serde_json::to_value(link.session().stats()).ok()),
        }
    }
}

impl PeerLink {
    fn session(&self) -> Arc<Session> {
        self.outgoing
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn reachable(&self) -> bool {
        self.session().peer_reachable() && self.incoming_reachable.load(Ordering::Relaxed)
    }

    /// Starts a new outgoing session in place of the current one, whose queue is dropped.
    fn replace_session(&self) {
        match Session::connect(self.peers.clone(), &self.service, self.config.clone()) {
            Ok(session) => {
                let old = std::mem::replace(
                    &mut *self
                        .outgoing
                        .write()
                        .unwrap_or_else(PoisonError::into_inner),
                    Arc::new(session),
                );
                let dropped = old.stats().unacked_messages;
                old.close();
                info!(
                    "peer link: the peer was unreachable for {PEER_STATE_TIMEOUT:?}; {dropped} \
                     queued message(s) dropped, a new session started"
                );
            }
            Err(error) => warn!(
                "peer link: cannot start a new session: {}",
                error_chain(&error)
            ),
        }
    }

    /// The peer's state if it is recent.
    fn fresh_state(&self) -> Option<PeerState> {
        let peer = *lock(&self.peer);
        peer.filter(|(_, at)| at.elapsed() < PEER_STATE_TIMEOUT)
            .map(|(state, _)| state)
    }

    /// Sends our state, waiting a little for room behind the frames; false if it could not.
    fn send_state(&self, state: PeerState) -> bool {
        let Ok(header) = postcard::to_allocvec(&PeerMessage::State(state)) else {
            return false;
        };
        self.session()
            .send_timeout(&header, Vec::new(), STATE_SEND_WAIT)
            .is_ok()
    }
}

/// How to reach the peer's daemon (`--peer`, `--listen`, `--psk-file`, `--host-id`).
#[derive(Clone, Debug)]
pub struct PeerSettings {
    pub peers: Vec<SocketAddr>,
    pub listen: Vec<SocketAddr>,
    pub psk_file: PathBuf,
    pub host_id: String,
}

#[derive(Debug, Error)]
pub enum PeerError {
    #[error("cannot read the pre-shared key")]
    Psk(#[source] replication_link::PskError),
    #[error("cannot listen for the peer's daemon on {addresses:?}")]
    Listen {
        addresses: Vec<SocketAddr>,
        #[source]
        source: replication_link::ListenerError,
    },
    #[error("cannot start the session to the peer's daemon")]
    Connect(#[source] SessionError),
    #[error("cannot start a thread")]
    Spawn(#[source] io::Error),
}

/// The link configuration of a NIC's peer link (both hosts must agree on the frame size).
fn link_config(settings: &PeerSettings) -> Result<LinkConfig, PeerError> {
    let psk = Psk::from_file(&settings.psk_file).map_err(PeerError::Psk)?;
    let mut config = LinkConfig::new(psk, settings.host_id.clone());
    config.max_frame_bytes = LINK_FRAME_BYTES;
    config.max_unacked_bytes = SEND_WINDOW_BYTES;
    config.max_unacked_messages = SEND_WINDOW_MESSAGES;
    config.reconnect_max_ms = 200;
    Ok(config)
}

/// The session's service name: one NIC, so several NICs' daemons can share nothing by mistake.
fn service(mac: [u8; 6]) -> String {
    format!("net:{}", format_mac(mac))
}

/// Starts the redundancy threads: with `peer`, the link to the peer's daemon; the uplink
/// watch runs either way when `--uplink` was given.
pub fn start(device: &Arc<Device>, peer: Option<&PeerSettings>) -> Result<(), PeerError> {
    let mut listener = None;
    if let Some(settings) = peer {
        let config = link_config(settings)?;
        let bound =
            LinkListener::bind(settings.listen.clone(), config.clone()).map_err(|source| {
                PeerError::Listen {
                    addresses: settings.listen.clone(),
                    source,
                }
            })?;
        let outgoing =
            Session::connect(settings.peers.clone(), &service(device.mac), config.clone())
                .map_err(PeerError::Connect)?;
        let header =
            |direction| postcard::to_allocvec(&PeerMessage::Frame(direction)).unwrap_or_default();
        let link = PeerLink {
            outgoing: RwLock::new(Arc::new(outgoing)),
            peers: settings.peers.clone(),
            service: service(device.mac),
            config,
            peer: Mutex::new(None),
            incoming_reachable: AtomicBool::new(false),
            to_lan_header: header(Direction::ToLan),
            to_guest_header: header(Direction::ToGuest),
        };
        let _ = device.redundancy.link.set(link);
        listener = Some(bound);
        info!(
            "peer link for {}: listening on {:?}, peer at {:?}",
            format_mac(device.mac),
            settings.listen,
            settings.peers
        );
    }
    if let Some(listener) = listener {
        let device = device.clone();
        thread::Builder::new()
            .name("peer-in".into())
            .spawn(move || receive_loop(&device, &listener))
            .map_err(PeerError::Spawn)?;
    }
    if device.redundancy.uplink.is_some() || device.redundancy.link.get().is_some() {
        let device = device.clone();
        thread::Builder::new()
            .name("uplink".into())
            .spawn(move || Watch::new(device).run())
            .map_err(PeerError::Spawn)?;
    }
    Ok(())
}

/// `peer-in`: takes the peer's sessions from the listener and handles their messages.
fn receive_loop(device: &Arc<Device>, listener: &LinkListener) {
    let expected = service(device.mac);
    let Some(link) = device.redundancy.link.get() else {
        return;
    };
    let mut session: Option<Session> = None;
    loop {
        let wait = if session.is_some() {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        if let Some(event) = listener.next_event(wait) {
            let (ListenerEvent::NewSession(new)
            | ListenerEvent::PeerRestarted { session: new, .. }) = event;
            if new.service() == expected {
                info!(
                    "peer daemon {} connected",
                    new.peer_id().unwrap_or_default()
                );
                session = Some(new);
            } else {
                warn!(
                    "refused a peer session for {:?}: this daemon serves {expected:?}",
                    new.service()
                );
                new.close();
            }
        }
        let Some(current) = &session else {
            link.incoming_reachable.store(false, Ordering::Relaxed);
            continue;
        };
        for event in current.take_events() {
            if let SessionEvent::LinkDown { link, error, .. } = event {
                info!("peer daemon: A-link {link} down: {error}");
            }
        }
        link.incoming_reachable
            .store(current.peer_reachable(), Ordering::Relaxed);
        match current.recv(TICK) {
            Ok(Some(message)) => handle_message(device, link, message),
            Ok(None) => {}
            Err(_) => session = None,
        }
    }
}

fn handle_message(device: &Device, link: &PeerLink, message: replication_link::Message) {
    let metrics = &device.metrics;
    let decoded: Result<PeerMessage, _> = message.header();
    match decoded {
        Ok(PeerMessage::State(state)) => {
            *lock(&link.peer) = Some((state, Instant::now()));
            // Start relaying at once: the RARP and the first frames follow on this session.
            let attached = attached(device);
            device
                .redundancy
                .relaying
                .store(state.want_relay && !attached, Ordering::Relaxed);
        }
        Ok(PeerMessage::Frame(direction)) => {
            let attached = attached(device);
            let relaying = device.redundancy.relaying.load(Ordering::Relaxed);
            let checked = check_frame_from_peer(
                direction,
                &message.payload,
                attached,
                relaying,
                device.acked_features(),
            );
            match checked {
                Ok(_) => {}
                // Frames still in flight when a path changed: expected, not the peer's fault.
                Err(error @ (PeerFrameError::NoGuest | PeerFrameError::NotRelaying)) => {
                    Metrics::add(&metrics.peer_rx_dropped, 1);
                    log::debug!("dropped a frame from the peer: {error}");
                    return;
                }
                Err(error) => {
                    Metrics::add(&metrics.peer_rx_dropped, 1);
                    fault(
                        device,
                        format_args!("dropped a frame from the peer: {error}"),
                    );
                    return;
                }
            }
            match direction {
                Direction::ToGuest => {
                    if device.redundancy.to_guest.push(message.payload) {
                        Metrics::add(&metrics.peer_rx_packets, 1);
                    } else {
                        Metrics::add(&metrics.peer_rx_dropped, 1);
                    }
                }
                Direction::ToLan => match device.tap.write_frame(0, &message.payload) {
                    Ok(()) => Metrics::add(&metrics.relay_to_lan_packets, 1),
                    Err(error) => {
                        Metrics::add(&metrics.tap_write_errors, 1);
                        fault(
                            device,
                            format_args!("relaying a frame to {}: {error}", device.tap.name()),
                        );
                    }
                },
            }
        }
        Err(error) => {
            Metrics::add(&metrics.peer_rx_dropped, 1);
            fault(
                device,
                format_args!("dropped a malformed peer message: {error}"),
            );
        }
    }
}

/// A guest is attached to this daemon (a frontend is connected).
fn attached(device: &Device) -> bool {
    device.metrics.connected.load(Ordering::Relaxed)
}

fn fault(device: &Device, message: std::fmt::Arguments<'_>) {
    if let Some(suppressed) = device.fault_log.admit() {
        if suppressed > 0 {
            warn!("{message} ({suppressed} similar lines suppressed)");
        } else {
            warn!("{message}");
        }
    }
}

/// `uplink`: watches the uplink, chooses the path, tells the peer, announces, and without a
/// guest reads the TAP (relaying what is for the peer's guest).
struct Watch {
    device: Arc<Device>,
    chooser: PathChooser,
    last_sent: Option<(PeerState, Instant)>,
    announce_at: Vec<(Instant, Path)>,
    /// The uplink's last state, to log changes once.
    last_uplink: Option<bool>,
    /// Since when the outgoing session has not reached the peer.
    unreachable_since: Option<Instant>,
    buffer: Vec<u8>,
    /// Link changes wake the watch at once (without: it checks every [`TICK`]).
    link_events: Option<LinkEvents>,
}

impl Watch {
    fn new(device: Arc<Device>) -> Watch {
        Watch {
            device,
            chooser: PathChooser::default(),
            last_sent: None,
            announce_at: Vec::new(),
            last_uplink: None,
            unreachable_since: None,
            buffer: vec![0u8; VNET_HDR_LEN + MAX_FRAME_BYTES + 256],
            link_events: match LinkEvents::open() {
                Ok(events) => Some(events),
                Err(error) => {
                    warn!(
                        "cannot watch link changes ({error}): the uplink is checked every {TICK:?}"
                    );
                    None
                }
            },
        }
    }

    fn run(mut self) {
        loop {
            let next = Instant::now() + TICK;
            self.tick();
            self.wait_until(next);
        }
    }

    /// Waits until `deadline` or a link change; without a guest, serves the TAP meanwhile.
    fn wait_until(&mut self, deadline: Instant) {
        let tap = &self.device.tap;
        let mut fds: Vec<libc::pollfd> = self
            .link_events
            .iter()
            .map(LinkEvents::fd)
            .chain(
                (0..tap.queue_count()).filter_map(|index| tap.queue(index).map(AsRawFd::as_raw_fd)),
            )
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let queues_from = usize::from(self.link_events.is_some());
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return;
            }
            // With a guest the TAP is the queue workers'; only link changes are watched.
            let watched = if attached(&self.device) {
                queues_from
            } else {
                fds.len()
            };
            let timeout = libc::c_int::try_from(remaining.as_millis().max(1)).unwrap_or(1);
            let ready = crate::tap::poll(&mut fds[..watched], timeout);
            if ready == 0 {
                continue;
            }
            let broken = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
            if ready < 0 || fds[..watched].iter().any(|fd| fd.revents & broken != 0) {
                if ready < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // A descriptor in error (say, the TAP deleted under us) would wake poll at
                // once, forever: give up the netlink wake-up if it is the one, and otherwise
                // wait out the tick instead of spinning.
                if queues_from == 1 && fds[0].revents & broken != 0 {
                    warn!("link change notices failed: the uplink is checked every {TICK:?}");
                    self.link_events = None;
                } else {
                    fault(
                        &self.device,
                        format_args!(
                            "the TAP {} is in error; standby reads paused",
                            self.device.tap.name()
                        ),
                    );
                    thread::sleep(deadline.saturating_duration_since(Instant::now()));
                }
                return;
            }
            if queues_from == 1 && fds[0].revents & libc::POLLIN != 0 {
                if let Some(events) = &self.link_events {
                    events.drain();
                }
                return;
            }
            let ready: Vec<usize> = fds[queues_from..watched]
                .iter()
                .enumerate()
                .filter(|(_, fd)| fd.revents & libc::POLLIN != 0)
                .map(|(index, _)| index)
                .collect();
            for index in ready {
                self.drain_queue(index);
            }
        }
    }

    fn tick(&mut self) {
        let before = self.last_uplink;
        let uplink_up = self.check_uplink();
        let came_back = before == Some(false) && uplink_up == Some(true);
        let device = Arc::clone(&self.device);
        let device = &*device;
        let redundancy = &device.redundancy;
        let link = redundancy.link.get();
        let peer = link.and_then(PeerLink::fresh_state);
        let attached = attached(device);
        let now = Instant::now();
        let switched = if attached {
            let peer_usable = link.is_some_and(PeerLink::reachable)
                && peer
                    .is_some_and(|state| state.uplink_up != Some(false) && !state.guest_attached);
            self.chooser.decide(uplink_up, peer_usable, now)
        } else {
            // Frames that came for a guest that left are not for the next one.
            redundancy.to_guest.clear();
            self.chooser.reset()
        };
        let want_relay = self.chooser.path() == Path::Peer;
        // Relay only for a fresh peer that wants it, never with a guest of our own.
        let relaying = !attached && peer.is_some_and(|state| state.want_relay);
        self.set_relaying(relaying, peer.map_or(0, |state| state.offloads));
        if let Some(link) = link {
            self.drop_stale_queue(link, now);
            let state = PeerState {
                uplink_up,
                guest_attached: attached,
                want_relay,
                offloads: tap_offloads(device.acked_features()),
            };
            let due = self
                .last_sent
                .is_none_or(|(sent, at)| sent != state || now.duration_since(at) >= STATE_INTERVAL);
            // Not sent (the window stayed full): tried again at the next tick.
            if due && link.send_state(state) {
                self.last_sent = Some((state, now));
            }
        }
        if let Some(path) = switched {
            self.switch(path, uplink_up, now);
        } else if came_back && attached && self.chooser.path() == Path::Local {
            // Back on a path we never left (no peer to go to meanwhile): the LAN may have
            // learned the MAC elsewhere, or forgotten it.
            self.schedule_announcements(Path::Local, now);
        }
        self.announce_due(now);
    }

    /// A peer unreachable for [`PEER_STATE_TIMEOUT`] with messages still queued: they are
    /// dropped with the session (a new one starts), instead of reaching the peer late.
    fn drop_stale_queue(&mut self, link: &PeerLink, now: Instant) {
        if link.session().peer_reachable() {
            self.unreachable_since = None;
            return;
        }
        let since = *self.unreachable_since.get_or_insert(now);
        if now.duration_since(since) >= PEER_STATE_TIMEOUT
            && link.session().stats().unacked_messages > 0
        {
            link.replace_session();
            self.unreachable_since = Some(now);
        }
    }

    /// Reads the uplink's state, logs a change, stores it for `status`. The local path also
    /// needs our TAP up (an operator may have set it down or it may have lost its queue).
    fn check_uplink(&mut self) -> Option<bool> {
        let name = self.device.redundancy.uplink.as_deref()?;
        let tap = self.device.tap.name();
        let up = match interface_running(name).and_then(|up| Ok(up && interface_running(tap)?)) {
            Ok(up) => up,
            Err(error) => {
                if self.last_uplink != Some(false) {
                    warn!("cannot read the state of uplink {name} or TAP {tap}: {error}; taken as down");
                }
                false
            }
        };
        if self.last_uplink != Some(up) {
            if up {
                info!("uplink {name} is up");
            } else {
                warn!("uplink {name} is down");
            }
            self.last_uplink = Some(up);
        }
        let stored = if up { UPLINK_UP } else { UPLINK_DOWN };
        self.device
            .redundancy
            .uplink_state
            .store(stored, Ordering::Relaxed);
        Some(up)
    }

    fn switch(&mut self, path: Path, uplink_up: Option<bool>, now: Instant) {
        let redundancy = &self.device.redundancy;
        redundancy
            .via_peer
            .store(path == Path::Peer, Ordering::Relaxed);
        redundancy.switches.fetch_add(1, Ordering::Relaxed);
        match path {
            Path::Peer => warn!(
                "uplink {} is down: the guest's traffic goes through the peer host",
                redundancy.uplink.as_deref().unwrap_or("?")
            ),
            Path::Local if uplink_up == Some(false) => {
                warn!("the peer host cannot relay any more: back to the local uplink (down)")
            }
            Path::Local => info!("uplink is back: the guest's traffic is local again"),
        }
        // Only a daemon with a guest speaks for the MAC (one that just lost its guest not).
        if attached(&self.device) {
            self.schedule_announcements(path, now);
        } else {
            self.announce_at.clear();
        }
    }

    fn schedule_announcements(&mut self, path: Path, now: Instant) {
        self.announce_at = ANNOUNCE_AFTER
            .iter()
            .map(|after| (now + *after, path))
            .collect();
    }

    /// Sends the RARPs that are due on the path they were planned for, if it still holds.
    fn announce_due(&mut self, now: Instant) {
        if !attached(&self.device) {
            self.announce_at.clear();
            return;
        }
        let current = self.chooser.path();
        let due: Vec<Path> = self
            .announce_at
            .iter()
            .filter(|(at, _)| *at <= now)
            .map(|(_, path)| *path)
            .collect();
        self.announce_at.retain(|(at, _)| *at > now);
        for path in due.into_iter().filter(|path| *path == current) {
            if let Err(error) = self.device.announce_on(path) {
                warn!("cannot announce {}: {error}", format_mac(self.device.mac));
            }
        }
    }

    /// Sets our TAP up for relaying (the peer's guest's offloads) or idling (none), unless a
    /// guest took the TAP meanwhile.
    fn set_relaying(&self, relaying: bool, offloads: u32) {
        let device = &self.device;
        let was = device.redundancy.relaying.swap(relaying, Ordering::Relaxed);
        if was != relaying {
            if relaying {
                info!("relaying for the peer host's guest (its uplink is down)");
            } else {
                info!("no longer relaying for the peer host");
            }
        }
        // Only offloads a TAP knows; the peer's word is not trusted further.
        let wanted = if relaying {
            offloads & RELAY_OFFLOADS
        } else {
            0
        };
        if let Err(error) = device.configure_idle_tap(wanted) {
            fault(device, format_args!("{}", error_chain(&error)));
        }
    }

    /// Reads queue `index` of the TAP (without a guest), sending what is for the peer's
    /// guest while relaying and dropping the rest (an unread TAP would hand a new guest stale
    /// frames).
    fn drain_queue(&mut self, index: usize) {
        let device = &self.device;
        let link = device.redundancy.link.get();
        for _ in 0..256 {
            // A frontend attaching takes the TAP: leave its frames to the guest.
            if attached(device) {
                return;
            }
            let len = match device.tap.read_frame(index, &mut self.buffer) {
                Ok(len) => len,
                Err(_) => return,
            };
            if !device.redundancy.relaying.load(Ordering::Relaxed) || len >= self.buffer.len() {
                continue;
            }
            let Some(link) = link else { continue };
            let header_len = device.tap.header_len();
            let Some(frame) = self.buffer.get(header_len..len) else {
                continue;
            };
            if !addressed_to(frame, device.mac) {
                continue;
            }
            let bytes = convert_header(self.buffer[..len].to_vec(), header_len, VNET_HDR_LEN);
            match link
                .session()
                .send_timeout(&link.to_guest_header, bytes, Duration::ZERO)
            {
                Ok(_) => Metrics::add(&device.metrics.relay_to_peer_packets, 1),
                Err(_) => Metrics::add(&device.metrics.peer_tx_dropped, 1),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FLAG_NEEDS_CSUM, GSO_TCPV4};
    use virtio_bindings::virtio_net::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4};

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn uplink_loss_moves_to_the_peer_only_if_it_can_relay() {
        let start = Instant::now();
        let mut chooser = PathChooser::default();
        assert_eq!(chooser.decide(Some(true), true, start), None);
        assert_eq!(chooser.decide(None, true, start), None, "unwatched is up");
        assert_eq!(chooser.decide(Some(false), false, start), None);
        assert_eq!(chooser.path(), Path::Local);
        assert_eq!(
            chooser.decide(Some(false), true, at(start, 20)),
            Some(Path::Peer)
        );
        assert_eq!(chooser.decide(Some(false), true, at(start, 40)), None);
        assert_eq!(chooser.path(), Path::Peer);
    }

    #[test]
    fn failback_waits_until_the_uplink_stayed_up() {
        let start = Instant::now();
        let mut chooser = PathChooser::default();
        chooser.decide(Some(false), true, start);
        // Up, down again before FAILBACK: stays on the peer, and the wait starts over.
        assert_eq!(chooser.decide(Some(true), true, at(start, 100)), None);
        assert_eq!(chooser.decide(Some(false), true, at(start, 300)), None);
        assert_eq!(chooser.decide(Some(true), true, at(start, 400)), None);
        assert_eq!(chooser.decide(Some(true), true, at(start, 800)), None);
        assert_eq!(
            chooser.decide(Some(true), true, at(start, 900)),
            Some(Path::Local)
        );
        assert_eq!(chooser.path(), Path::Local);
    }

    #[test]
    fn a_lost_peer_ends_the_peer_path() {
        let start = Instant::now();
        let mut chooser = PathChooser::default();
        chooser.decide(Some(false), true, start);
        assert_eq!(
            chooser.decide(Some(false), false, at(start, 20)),
            Some(Path::Local)
        );
        // And it comes back when the peer does.
        assert_eq!(
            chooser.decide(Some(false), true, at(start, 40)),
            Some(Path::Peer)
        );
        assert_eq!(chooser.reset(), Some(Path::Local));
        assert_eq!(chooser.reset(), None);
    }

    fn frame(header: VnetHeader, len: usize) -> Vec<u8> {
        let mut bytes = header.encode().to_vec();
        bytes.extend(std::iter::repeat_n(0x5a, len));
        bytes
    }

    #[test]
    fn frames_from_the_peer_must_fit_our_state() {
        let plain = frame(VnetHeader::default(), 60);
        assert!(check_frame_from_peer(Direction::ToGuest, &plain, true, false, 0).is_ok());
        assert!(check_frame_from_peer(Direction::ToLan, &plain, false, true, 0).is_ok());
        assert_eq!(
            check_frame_from_peer(Direction::ToGuest, &plain, false, true, 0),
            Err(PeerFrameError::NoGuest)
        );
        assert_eq!(
            check_frame_from_peer(Direction::ToLan, &plain, true, true, 0),
            Err(PeerFrameError::NotRelaying)
        );
        // A late frame for the LAN, from a relay the peer no longer asks for.
        assert_eq!(
            check_frame_from_peer(Direction::ToLan, &plain, false, false, 0),
            Err(PeerFrameError::NotRelaying)
        );
        let short = frame(VnetHeader::default(), 4);
        assert!(matches!(
            check_frame_from_peer(Direction::ToLan, &short, false, true, 0),
            Err(PeerFrameError::Frame(FrameError::ShortFrame { .. }))
        ));
        assert!(check_frame_from_peer(Direction::ToLan, &[1, 2], false, true, 0).is_err());
    }

    #[test]
    fn a_guest_gets_segmentation_offload_only_if_it_negotiated_it() {
        let tso = frame(
            VnetHeader {
                flags: FLAG_NEEDS_CSUM,
                gso_type: GSO_TCPV4,
                hdr_len: 54,
                gso_size: 1448,
                csum_start: 34,
                csum_offset: 16,
                num_buffers: 0,
            },
            3000,
        );
        assert!(check_frame_from_peer(Direction::ToGuest, &tso, true, false, 0).is_err());
        let features = (1u64 << VIRTIO_NET_F_GUEST_CSUM) | (1u64 << VIRTIO_NET_F_GUEST_TSO4);
        assert!(check_frame_from_peer(Direction::ToGuest, &tso, true, false, features).is_ok());
        // The relaying TAP takes any offload.
        assert!(check_frame_from_peer(Direction::ToLan, &tso, false, true, 0).is_ok());
    }

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let state = PeerMessage::State(PeerState {
            uplink_up: Some(false),
            guest_attached: true,
            want_relay: true,
            offloads: 7,
        });
        let bytes = postcard::to_allocvec(&state).expect("encode");
        assert_eq!(
            postcard::from_bytes::<PeerMessage>(&bytes).expect("decode"),
            state
        );
        for garbage in [&[][..], &[9], &[0, 2], &[1, 7]] {
            assert!(
                postcard::from_bytes::<PeerMessage>(garbage).is_err(),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn the_guest_queue_is_bounded() {
        let queue = GuestQueue::new().expect("eventfd");
        for _ in 0..MAX_QUEUED_FOR_GUEST {
            assert!(queue.push(vec![0; 14]));
        }
        assert!(!queue.push(vec![0; 14]));
        assert!(queue.pop().is_some());
        queue.clear();
        assert!(queue.pop().is_none());
    }
}
