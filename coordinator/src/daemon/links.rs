//! `ftvmd`'s sessions: with the peer's `ftvmd` over both A-links (heartbeats and planned
//! handovers) and with the witness (registrations and claims). Both ride on the
//! replication link, so every message is authenticated with the pair's or the witness's
//! pre-shared key; received messages come out of a channel for the daemon's main loop.

use std::net::SocketAddr;
use std::sync::mpsc::Receiver;

use super::wake::{self, Sender};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{info, warn};
use replication_link::{KeyRing, LinkConfig, LinkListener, ListenerEvent, Session};
use serde::{Deserialize, Serialize};

use crate::host::Role;
use crate::witness_daemon::{WitnessReply, WitnessRequest};
use crate::Generation;

/// The service name of `ftvmd`'s sessions with its peer.
pub const PEER_SERVICE: &str = "ftvmd";
/// The service name of sessions with the witness.
pub const WITNESS_SERVICE: &str = "ftvm-witness";
/// Messages kept waiting for a peer that is not reachable: heartbeats are only sent while
/// it is, so this bounds the backlog of a link that just went down.
const MAX_QUEUED: usize = 64;

/// One VM's line in a heartbeat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmBeat {
    pub vm: String,
    pub role: Role,
    pub generation: Generation,
    /// The sender's summary (Protected, Syncing, Degraded, …), for `ftvm status`.
    pub state: String,
    pub sync_percent: Option<f64>,
    /// The sender's view; the secondary follows its primary's.
    pub protected: bool,
    /// The protection level (the secondary follows its primary's).
    pub level: u8,
    /// Level 3: a primary takes checkpoints (or wants to); a secondary keeps a replica it
    /// could restore. A primary releases output it holds only once its secondary says it
    /// keeps none.
    pub checkpoints: bool,
    /// The VM runs on the sender (QEMU up, not paused, no restore under way): a move to it
    /// is done once its primary says so.
    pub running: bool,
    /// The sender, primary, is moving the VM to the receiver (`ftvm migrate` under way):
    /// the receiver starts its QEMU ahead of the final checkpoint.
    #[serde(default)]
    pub moving: bool,
}

/// Between the two `ftvmd`s.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PeerMessage {
    /// Sent on every link each heartbeat interval. `instance` (random per daemon start) and
    /// `sequence` (growing) let the receiver drop a copy that arrives late on a slower
    /// link, after a newer one.
    Beat {
        host: String,
        instance: u64,
        sequence: u64,
        vms: Vec<VmBeat>,
        /// The ids of the pair keys the sender holds, the preferred first: lets `ftvm key
        /// retire` check that the peer holds the new key before the old one is refused.
        keys: Vec<String>,
    },
    /// Planned failover: the sender (the primary) has stopped the VM and fenced its disks;
    /// the receiver should claim the next generation and start the VM.
    /// `live`: `ftvm migrate` (the level to run the VM at once moved): the VM is restored
    /// from the final checkpoint; else `ftvm failover`.
    TakeOver { vm: String, live: Option<u8> },
    /// `ftvm check` and `ftvm collect-logs` on the sender: answer `id` with an
    /// [`PeerMessage::Answer`].
    Ask {
        id: u64,
        question: super::asks::Question,
    },
    /// The answer to [`PeerMessage::Ask`] `id`: an [`super::asks::Answer`] (postcard) in the
    /// message's payload (the header holds at most 4 KiB).
    Answer { id: u64 },
    /// `ftvm protect --domain` on the sender: keep a replica of this libvirt domain, whose
    /// [`super::domains::DomainDefinition`] (postcard) is the message's payload (with the
    /// operator's XML it is larger than the 4 KiB a header holds).
    DefineDomain,
    /// `ftvm unprotect` of a protected domain on the sender: stop keeping its replica.
    ForgetDomain { vm: String },
}

/// One A-link as `ftvm status --json` and `/metrics` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ALinkStatus {
    /// 1 or 2: its place in `[peer] addresses`.
    pub link: usize,
    /// The peer's ftvmd on this link.
    pub address: String,
    /// The peer is heard on it.
    pub up: bool,
    /// Round trip of the heartbeat session on it, while known.
    pub rtt_us: Option<u64>,
    /// Bytes this host's session to the peer sent and received on it (heartbeats and
    /// orders; the disk daemons' replication has sessions of its own).
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// Both directions with the peer, on each A-link separately: one client session per
/// link sends, our listener receives. Separate sessions keep the links independent: a
/// link that dies holds back only its own messages (an ordered session over both links
/// would stall every heartbeat until the dead link timed out).
pub struct PeerLink {
    keys: KeyRing,
    clients: Vec<Session>,
    _listener: Arc<LinkListener>,
    received: Receiver<(PeerMessage, Vec<u8>)>,
}

impl PeerLink {
    pub fn start(
        peer: Vec<SocketAddr>,
        listen: Vec<SocketAddr>,
        config: LinkConfig,
    ) -> Result<PeerLink, String> {
        let listener = Arc::new(
            LinkListener::bind(listen.clone(), config.clone())
                .map_err(|error| format!("cannot listen for the peer on {listen:?}: {error}"))?,
        );
        let mut clients = Vec::new();
        for (index, address) in peer.iter().enumerate() {
            let service = format!("{PEER_SERVICE}-link{index}");
            let session =
                Session::connect(vec![*address], &service, config.clone()).map_err(|error| {
                    format!("cannot start a session to the peer {address}: {error}")
                })?;
            clients.push(session);
        }
        let (sender, received) = wake::channel();
        let accepting = Arc::clone(&listener);
        thread::Builder::new()
            .name("peer-accept".into())
            .spawn(move || accept(&accepting, &sender))
            .map_err(|error| format!("cannot start a thread: {error}"))?;
        Ok(PeerLink {
            keys: config.keys.clone(),
            clients,
            _listener: listener,
            received,
        })
    }

    /// Sends on every link where the peer is reachable. Heartbeats (`keep` false) are
    /// dropped on a link that is down: they are not worth delivering late. Others wait
    /// on a down link if its backlog is small.
    pub fn send(&self, message: &PeerMessage, keep: bool) {
        self.send_with_payload(message, &[], keep);
    }

    /// [`PeerLink::send`] with a payload.
    pub fn send_with_payload(&self, message: &PeerMessage, payload: &[u8], keep: bool) {
        let bytes = encode(message);
        for client in &self.clients {
            if !client.peer_reachable() && (!keep || client.stats().unacked_messages >= MAX_QUEUED)
            {
                continue;
            }
            if let Err(error) =
                client.send_timeout(&bytes, payload.to_vec(), Duration::from_millis(10))
            {
                log::debug!("cannot send to the peer: {error}");
            }
        }
    }

    /// A message from the peer, and its payload (empty but for [`PeerMessage::Answer`] and
    /// [`PeerMessage::DefineDomain`]).
    pub fn try_recv(&self) -> Option<(PeerMessage, Vec<u8>)> {
        self.received.try_recv().ok()
    }

    /// Sends `message` with `payload` once, on the first link where the peer is reachable;
    /// `false` if none is.
    pub fn send_once(&self, message: &PeerMessage, payload: Vec<u8>) -> bool {
        let bytes = encode(message);
        let Some(client) = self.clients.iter().find(|client| client.peer_reachable()) else {
            return false;
        };
        match client.send_timeout(&bytes, payload, Duration::from_millis(100)) {
            Ok(_) => true,
            Err(error) => {
                warn!("cannot send an answer to the peer: {error}");
                false
            }
        }
    }

    /// Failed authentications so far, on all links (a key mismatch).
    pub fn auth_failures(&self) -> u64 {
        self.clients
            .iter()
            .flat_map(|client| client.stats().links)
            .map(|link| link.auth_failures)
            .sum()
    }

    /// The last connection error of each link that is down.
    pub fn link_errors(&self) -> Vec<String> {
        self.clients
            .iter()
            .flat_map(|client| client.stats().links)
            .filter(|link| !link.up)
            .filter_map(|link| {
                let address = link
                    .address
                    .map_or("?".into(), |address| address.to_string());
                link.last_error.map(|error| format!("{address}: {error}"))
            })
            .collect()
    }

    /// The ids of the pair keys this host holds now, the preferred first.
    pub fn keys_held(&self) -> Vec<String> {
        self.keys.ids().iter().map(ToString::to_string).collect()
    }

    /// The ids of the keys the links this host dials are authenticated with, one per link
    /// that is up.
    pub fn keys_in_use(&self) -> Vec<String> {
        keys_in_use(self.clients.iter())
    }

    /// Each A-link's session to the peer (the one this host dials; it carries this host's
    /// heartbeats and orders), in configuration order.
    pub fn links(&self) -> Vec<ALinkStatus> {
        self.clients
            .iter()
            .enumerate()
            .map(|(index, client)| {
                let links = client.stats().links;
                let link = links.first();
                ALinkStatus {
                    link: index + 1,
                    address: link
                        .and_then(|link| link.address)
                        .map_or_else(String::new, |address| address.to_string()),
                    up: client.peer_reachable(),
                    rtt_us: link.and_then(|link| link.rtt_us),
                    bytes_sent: links.iter().map(|link| link.bytes_sent).sum(),
                    bytes_received: links.iter().map(|link| link.bytes_received).sum(),
                }
            })
            .collect()
    }

    /// A-links on which the peer is reachable, of those configured.
    pub fn links_up(&self) -> (usize, usize) {
        let up = self
            .clients
            .iter()
            .filter(|client| client.peer_reachable())
            .count();
        (up, self.clients.len())
    }
}

fn keys_in_use<'a>(sessions: impl Iterator<Item = &'a Session>) -> Vec<String> {
    sessions
        .flat_map(|session| session.stats().links)
        .filter(|link| link.up)
        .filter_map(|link| link.key)
        .collect()
}

fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    postcard::to_allocvec(message).unwrap_or_default()
}

fn accept(listener: &LinkListener, sender: &Sender<(PeerMessage, Vec<u8>)>) {
    loop {
        let Some(event) = listener.next_event(Duration::from_secs(1)) else {
            continue;
        };
        let (ListenerEvent::NewSession(session) | ListenerEvent::PeerRestarted { session, .. }) =
            event;
        info!("peer {:?} connected", session.peer_id());
        let sender = sender.clone();
        let spawned = thread::Builder::new()
            .name("peer-recv".into())
            .spawn(move || receive::<PeerMessage, _>(&session, &sender));
        if let Err(error) = spawned {
            warn!("cannot serve the peer's session: {error}");
        }
    }
}

/// Delivers each message's decoded header (with its payload where `T` takes one) until
/// the session ends.
fn receive<T: for<'de> Deserialize<'de>, U: Received<T>>(session: &Session, sender: &Sender<U>) {
    loop {
        match session.recv(Duration::from_secs(1)) {
            Ok(Some(message)) => match message.header::<T>() {
                Ok(decoded) => {
                    if sender.send(U::from(decoded, message.payload)).is_err() {
                        return;
                    }
                }
                Err(error) => warn!(
                    "malformed message from {:?} dropped: {error}",
                    session.peer_id()
                ),
            },
            Ok(None) => {}
            Err(_) => return,
        }
    }
}

/// What a receiving thread hands on: the header alone, or with the payload.
trait Received<T> {
    fn from(header: T, payload: Vec<u8>) -> Self;
}

impl Received<PeerMessage> for (PeerMessage, Vec<u8>) {
    fn from(header: PeerMessage, payload: Vec<u8>) -> Self {
        (header, payload)
    }
}

impl Received<WitnessReply> for WitnessReply {
    fn from(header: WitnessReply, _payload: Vec<u8>) -> Self {
        header
    }
}

/// The session with the witness.
pub struct WitnessLink {
    keys: KeyRing,
    session: Arc<Session>,
    received: Receiver<WitnessReply>,
}

impl WitnessLink {
    pub fn start(addresses: Vec<SocketAddr>, config: LinkConfig) -> Result<WitnessLink, String> {
        let keys = config.keys.clone();
        let session = Arc::new(
            Session::connect(addresses.clone(), WITNESS_SERVICE, config).map_err(|error| {
                format!("cannot start a session to the witness {addresses:?}: {error}")
            })?,
        );
        let (sender, received) = wake::channel();
        let reader = Arc::clone(&session);
        thread::Builder::new()
            .name("witness-recv".into())
            .spawn(move || receive::<WitnessReply, WitnessReply>(&reader, &sender))
            .map_err(|error| format!("cannot start a thread: {error}"))?;
        Ok(WitnessLink {
            keys,
            session,
            received,
        })
    }

    pub fn reachable(&self) -> bool {
        self.session.peer_reachable()
    }

    /// The ids of the witness keys this host holds now, the preferred first.
    pub fn keys_held(&self) -> Vec<String> {
        self.keys.ids().iter().map(ToString::to_string).collect()
    }

    /// The ids of the keys the link to the witness is authenticated with, while up.
    pub fn keys_in_use(&self) -> Vec<String> {
        keys_in_use(std::iter::once(self.session.as_ref()))
    }

    /// Failed authentications so far (a key mismatch).
    pub fn auth_failures(&self) -> u64 {
        self.session
            .stats()
            .links
            .iter()
            .map(|link| link.auth_failures)
            .sum()
    }

    /// Sends a request if the witness is reachable; `false` if not sent.
    pub fn send(&self, request: &WitnessRequest) -> bool {
        if !self.session.peer_reachable() {
            return false;
        }
        match self
            .session
            .send_timeout(&encode(request), Vec::new(), Duration::from_millis(10))
        {
            Ok(_) => true,
            Err(error) => {
                warn!("cannot send to the witness: {error}");
                false
            }
        }
    }

    pub fn try_recv(&self) -> Option<WitnessReply> {
        self.received.try_recv().ok()
    }
}

/// The link settings of a session: the keys of `psk_file` (and of `psk_file.previous` while
/// it exists: key rotation, followed while ftvmd runs), this host's name.
pub fn link_config(psk_file: &std::path::Path, host: &str) -> Result<LinkConfig, String> {
    let keys = KeyRing::from_file(psk_file).map_err(|error| {
        format!(
            "cannot read the key {}: {}",
            psk_file.display(),
            replication_link::error_chain(&error)
        )
    })?;
    Ok(LinkConfig::new(keys, host))
}
