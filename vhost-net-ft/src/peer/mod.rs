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
//! Layout: [`protocol`] has the wire format ([`PeerMessage`], [`PeerState`]), the (fuzzed)
//! check of a frame from the peer ([`check_frame_from_peer`]) and the pure decision
//! ([`PathChooser`]); this module the state the queue workers share ([`Redundancy`]), the
//! peer link and the `peer-in` thread (the peer's messages); `watch` the `uplink` thread
//! (the watch, the decision, the state messages and, without a guest, the TAP). [`start`]
//! runs both.

pub mod handover;
mod protocol;
mod watch;

pub use protocol::{
    check_frame_from_peer, split_batch, BatchError, BatchFrames, Direction, FrameBatch, Path,
    PathChooser, PeerFrameError, PeerMessage, PeerState, BATCH_LENGTH_BYTES, FAILBACK,
};

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use control_protocol::nic;
use daemon_util::lock;
use log::{info, warn};
use replication_link::{
    error_chain, KeyRing, LinkConfig, LinkListener, ListenerEvent, Session, SessionError,
    SessionEvent,
};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::config::format_mac;
use crate::device::Device;
use crate::frame::{convert_header, VNET_HDR_LEN};
use crate::metrics::Metrics;
use crate::sink::TxFrame;
use handover::{HandoverQueue, HandoverRelay};
use watch::Watch;

/// How often the uplink is checked and the path decided.
pub const TICK: Duration = Duration::from_millis(20);
/// How often each daemon tells the other its state (also sent at once on a change).
pub const STATE_INTERVAL: Duration = Duration::from_millis(100);
/// A peer whose last state is older than this is not relied on (and not relayed for).
pub const PEER_STATE_TIMEOUT: Duration = Duration::from_millis(1000);
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
/// Largest batch of frames in one link message ([`PeerMessage::Frames`]): three 64 KiB
/// segmentation-offload frames. A batch is sent before a frame that might not fit.
pub const BATCH_BYTES: usize = 256 * 1024;
/// Largest link frame: a batch, the headers and ours. Both daemons of a NIC must agree (the
/// link's handshake refuses a peer with another limit, naming both).
pub const LINK_FRAME_BYTES: usize = BATCH_BYTES + 4096;

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

    /// Wakes queue pair 0's worker (and the `uplink` thread's TAP reads) without a frame.
    pub fn wake(&self) {
        let _ = self.wake.write(1);
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
    /// A move's source: the guest is stopped here and its frames go to the peer.
    handover: HandoverRelay,
    /// A move's destination: frames the peer relayed, for the guest once it runs here.
    from_handover: HandoverQueue,
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
    to_lan_batch_header: Vec<u8>,
    to_guest_batch_header: Vec<u8>,
    handover_batch_header: Vec<u8>,
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
            handover: HandoverRelay::default(),
            from_handover: HandoverQueue::default(),
        })
    }

    /// `handover on`: the guest stays stopped here for a move; the frames the TAP receives
    /// for it go to the peer's daemon (see [`handover`]). Refused without a peer link.
    pub fn start_handover(&self) -> Result<(), &'static str> {
        if self.link.get().is_none() {
            return Err("no peer daemon is configured (--peer): there is nobody to relay to");
        }
        self.handover.start(Instant::now());
        info!(
            "handover: the guest is stopped here for a move; its frames go to the peer's \
             daemon until the LAN hears its MAC from there"
        );
        // The `uplink` thread reads the TAP from its next poll on (within a [`TICK`]; what
        // arrives meanwhile waits in the TAP's queue).
        Ok(())
    }

    /// Ends the relay of a move's source, saying why (if it ran).
    pub fn stop_handover(&self, why: &str) {
        if self.handover.stop() {
            info!("handover: relay to the peer ends: {why}");
        }
    }

    /// A move's source relays the guest's frames to the peer now.
    pub fn handover_relaying(&self) -> bool {
        self.handover.active(Instant::now())
    }

    /// A queue worker found the guest's receive ring running: a move's relay ends (the
    /// guest runs here again, and reads the TAP itself). Cheap when no relay runs.
    pub fn guest_runs_here(&self) {
        self.stop_handover("the guest runs here again (its receive ring is running)");
    }

    /// Frames the peer relayed during a move (taken by queue pair 0's worker).
    pub fn handover_queue(&self) -> &HandoverQueue {
        &self.from_handover
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

    /// Sends a batch of the guest's frames ([`PeerMessage::Frames`]) to the peer host in one
    /// message, without waiting: a full window drops the batch.
    pub fn send_batch_to_lan(&self, payload: Vec<u8>) -> Result<(), SessionError> {
        let Some(link) = self.link.get() else {
            return Err(SessionError::Closed {
                reason: replication_link::CloseReason::Closed,
            });
        };
        link.session()
            .send_timeout(&link.to_lan_batch_header, payload, Duration::ZERO)
            .map(|_| ())
    }

    /// The redundancy part of `status`.
    pub fn status(&self) -> nic::Redundancy {
        let peer = self.link.get().and_then(PeerLink::fresh_state);
        nic::Redundancy {
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
            handover_relaying: self.handover_relaying(),
            handover_frames_queued: self.from_handover.len(),
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
    Psk(#[source] replication_link::KeyRingError),
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
    // The pair's key and, while it exists, the previous one (key rotation); the ring follows
    // both files while the daemon runs.
    let keys = KeyRing::from_file(&settings.psk_file).map_err(PeerError::Psk)?;
    let mut config = LinkConfig::new(keys, settings.host_id.clone());
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
        // Only this NIC's peer daemon may open a session here, refused before its proof.
        let mut listen_config = config.clone();
        listen_config.allowed_services = Some(vec![service(device.mac)]);
        let bound =
            LinkListener::bind(settings.listen.clone(), listen_config).map_err(|source| {
                PeerError::Listen {
                    addresses: settings.listen.clone(),
                    source,
                }
            })?;
        let outgoing =
            Session::connect(settings.peers.clone(), &service(device.mac), config.clone())
                .map_err(PeerError::Connect)?;
        let header = |message| postcard::to_allocvec(&message).unwrap_or_default();
        let link = PeerLink {
            outgoing: RwLock::new(Arc::new(outgoing)),
            peers: settings.peers.clone(),
            service: service(device.mac),
            config,
            peer: Mutex::new(None),
            incoming_reachable: AtomicBool::new(false),
            to_lan_header: header(PeerMessage::Frame(Direction::ToLan)),
            to_lan_batch_header: header(PeerMessage::Frames(Direction::ToLan)),
            to_guest_batch_header: header(PeerMessage::Frames(Direction::ToGuest)),
            handover_batch_header: header(PeerMessage::Frames(Direction::Handover)),
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
            if accept_frame(device, direction, &message.payload) {
                deliver_frame(device, direction, Cow::Owned(message.payload));
            }
        }
        Ok(PeerMessage::Frames(direction)) => {
            for frame in split_batch(&message.payload) {
                match frame {
                    Ok(frame) => {
                        if accept_frame(device, direction, frame) {
                            deliver_frame(device, direction, Cow::Borrowed(frame));
                        }
                    }
                    Err(error) => {
                        Metrics::add(&metrics.peer_rx_dropped, 1);
                        device.log_fault(format_args!("dropped the rest of a batch: {error}"));
                    }
                }
            }
        }
        Err(error) => {
            Metrics::add(&metrics.peer_rx_dropped, 1);
            device.log_fault(format_args!("dropped a malformed peer message: {error}"));
        }
    }
}

/// Checks a frame from the peer against our state; counts and logs a refused one.
fn accept_frame(device: &Device, direction: Direction, frame: &[u8]) -> bool {
    let metrics = &device.metrics;
    let relaying = device.redundancy.relaying.load(Ordering::Relaxed);
    match check_frame_from_peer(
        direction,
        frame,
        attached(device),
        relaying,
        device.acked_features(),
    ) {
        Ok(_) => true,
        // Frames still in flight when a path changed: expected, not the peer's fault.
        Err(error @ (PeerFrameError::NoGuest | PeerFrameError::NotRelaying)) => {
            Metrics::add(&metrics.peer_rx_dropped, 1);
            log::debug!("dropped a frame from the peer: {error}");
            false
        }
        Err(error) => {
            Metrics::add(&metrics.peer_rx_dropped, 1);
            device.log_fault(format_args!("dropped a frame from the peer: {error}"));
            false
        }
    }
}

/// Puts an accepted frame from the peer where it goes: the guest's queue, or our TAP
/// (written from the received message, no copy).
fn deliver_frame(device: &Device, direction: Direction, frame: Cow<'_, [u8]>) {
    let metrics = &device.metrics;
    match direction {
        Direction::ToGuest => {
            if device.redundancy.to_guest.push(frame.into_owned()) {
                Metrics::add(&metrics.peer_rx_packets, 1);
            } else {
                Metrics::add(&metrics.peer_rx_dropped, 1);
            }
        }
        Direction::Handover => {
            let queue = &device.redundancy.from_handover;
            let dropped = queue.push(frame.into_owned(), Instant::now());
            if dropped > 0 {
                Metrics::add(&metrics.handover_rx_dropped, dropped as u64);
                device.log_fault(format_args!(
                    "handover: {dropped} relayed frame(s) dropped, the queue for the guest \
                     is full ({} frames or {} bytes at most)",
                    handover::QUEUE_FRAMES,
                    handover::QUEUE_BYTES
                ));
            }
            if attached(device) {
                device.redundancy.to_guest.wake();
            }
        }
        Direction::ToLan => match device.tap.write_frame(0, &frame) {
            Ok(()) => Metrics::add(&metrics.relay_to_lan_packets, 1),
            Err(error) => {
                Metrics::add(&metrics.tap_write_errors, 1);
                device.log_fault(format_args!(
                    "relaying a frame to {}: {error}",
                    device.tap.name()
                ));
            }
        },
    }
}

/// A guest is attached to this daemon (a frontend is connected and started the device; one
/// that is only connected is held, see [`Device::guest_attached`]).
fn attached(device: &Device) -> bool {
    device.guest_attached()
}

#[cfg(test)]
mod tests {
    use super::*;

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
