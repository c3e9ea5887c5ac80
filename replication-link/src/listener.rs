//! Server side: accepts connections on one or two addresses (one per A-link), authenticates
//! them, and joins each to its session by session id. A new session id from the same client
//! and service replaces the old session (the client restarted).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::config::{ConfigError, LinkConfig};
use crate::frame::FrameKey;
use crate::handshake::{answer_hello, random_nonce, read_hello};
use crate::handshake::{HandshakeChannel, HandshakeError, Side};
use crate::header::{Hello, ServerParams, MAX_LINKS, PROTOCOL_VERSION};
use crate::link::{run_connection, LinkError};
use crate::log_limit::{error_chain, lock, LogLimiter};
use crate::psk::Psk;
use crate::session::{random_id, CloseReason, Session};
use crate::shared::{Identity, PeerHandshake, SessionShared};
use crate::stats::{bump, ListenerAddressStats, ListenerCounters, ListenerStats};

/// Sessions announced but not yet taken by the application; beyond this new ones are refused.
const MAX_PENDING_EVENTS: usize = 64;
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("invalid configuration")]
    Config(#[source] ConfigError),
    #[error("a listener needs 1 or 2 addresses, got {count}")]
    Addresses { count: usize },
    #[error("cannot listen on {address}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the accept thread")]
    Spawn(#[source] io::Error),
}

/// Why serving one connection failed.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("handshake failed")]
    Handshake(#[source] HandshakeError),
    #[error("cannot configure the socket")]
    Socket(#[source] io::Error),
    #[error("cannot attach the connection")]
    Attach(#[source] LinkError),
}

/// What a listener tells the application.
pub enum ListenerEvent {
    /// A client started a session.
    NewSession(Session),
    /// A client that had session `previous_session_id` for the same service came back with a
    /// new one: it restarted. The old session is closed (`CloseReason::Replaced`).
    PeerRestarted {
        previous_session_id: u128,
        session: Session,
    },
}

impl fmt::Debug for ListenerEvent {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenerEvent::NewSession(session) => {
                formatter.debug_tuple("NewSession").field(session).finish()
            }
            ListenerEvent::PeerRestarted {
                previous_session_id,
                session,
            } => formatter
                .debug_struct("PeerRestarted")
                .field(
                    "previous_session_id",
                    &format_args!("{previous_session_id:032x}"),
                )
                .field("session", session)
                .finish(),
        }
    }
}

/// Accepts the peer's connections on one or two addresses.
pub struct LinkListener {
    shared: Arc<ListenerShared>,
    accept_threads: Mutex<Vec<JoinHandle<()>>>,
}

impl fmt::Debug for LinkListener {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("LinkListener")
            .field("local_addrs", &self.shared.local_addrs)
            .finish()
    }
}

struct ListenerShared {
    config: LinkConfig,
    local_addrs: Vec<SocketAddr>,
    registry: Mutex<Registry>,
    events: Mutex<VecDeque<ListenerEvent>>,
    event_ready: Condvar,
    stopping: AtomicBool,
    connections: Mutex<ConnectionThreads>,
    handshakes_in_progress: AtomicUsize,
    counters: Vec<ListenerCounters>,
    log: LogLimiter,
}

#[derive(Default)]
struct ConnectionThreads {
    handles: Vec<JoinHandle<()>>,
    /// Connections in their handshake, so that `close` can abort them.
    handshaking: HashMap<u64, TcpStream>,
    next_id: u64,
}

#[derive(Default)]
struct Registry {
    sessions: HashMap<u128, Arc<SessionShared>>,
    by_peer: HashMap<(String, String), u128>,
    /// Instances promised in challenges for sessions that do not exist yet.
    pending: HashMap<u128, Pending>,
}

struct Pending {
    instance: u128,
    users: usize,
}

/// What a challenge promised.
struct Prepared {
    instance: u128,
    send_base: u64,
    pending: bool,
}

/// An authenticated connection joining its session's link `slot`.
struct Joining {
    slot: usize,
    connection: u64,
    key: FrameKey,
}

/// The session a connection joins, and what the application must be told.
enum Joined {
    Existing(Arc<SessionShared>),
    New {
        session: Arc<SessionShared>,
        replaced: Option<(u128, Arc<SessionShared>)>,
    },
}

impl LinkListener {
    /// Listens on `addrs` (1 or 2; port 0 picks a free port, see [`LinkListener::local_addrs`]).
    pub fn bind(addrs: Vec<SocketAddr>, config: LinkConfig) -> Result<LinkListener, ListenerError> {
        config.validate().map_err(ListenerError::Config)?;
        if addrs.is_empty() || addrs.len() > 2 {
            return Err(ListenerError::Addresses { count: addrs.len() });
        }
        let mut listeners = Vec::with_capacity(addrs.len());
        let mut local_addrs = Vec::with_capacity(addrs.len());
        for address in addrs {
            let bind_error = |source| ListenerError::Bind { address, source };
            let listener = TcpListener::bind(address).map_err(bind_error)?;
            local_addrs.push(listener.local_addr().map_err(bind_error)?);
            listeners.push(listener);
        }
        let shared = Arc::new(ListenerShared {
            counters: local_addrs
                .iter()
                .map(|_| ListenerCounters::default())
                .collect(),
            config,
            local_addrs,
            registry: Mutex::new(Registry::default()),
            events: Mutex::new(VecDeque::new()),
            event_ready: Condvar::new(),
            stopping: AtomicBool::new(false),
            connections: Mutex::new(ConnectionThreads::default()),
            handshakes_in_progress: AtomicUsize::new(0),
            log: LogLimiter::new("replication_link::listener"),
        });
        let listener = LinkListener {
            shared: Arc::clone(&shared),
            accept_threads: Mutex::new(Vec::new()),
        };
        for (index, socket) in listeners.into_iter().enumerate() {
            let shared = Arc::clone(&shared);
            let handle = thread::Builder::new()
                .name(format!("rl-accept-{index}"))
                .spawn(move || accept_loop(&shared, index, socket))
                .map_err(ListenerError::Spawn)?;
            lock(&listener.accept_threads).push(handle);
        }
        for address in &listener.shared.local_addrs {
            log::info!("replication link listening on {address}");
        }
        Ok(listener)
    }

    /// The bound addresses, in the order given to `bind`.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.shared.local_addrs
    }

    /// The next new or restarted session, waiting up to `timeout`.
    pub fn next_event(&self, timeout: Duration) -> Option<ListenerEvent> {
        let deadline = Instant::now() + timeout;
        let mut events = lock(&self.shared.events);
        loop {
            if let Some(event) = events.pop_front() {
                return Some(event);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() || self.shared.stopping.load(Ordering::SeqCst) {
                return None;
            }
            events = self
                .shared
                .event_ready
                .wait_timeout(events, remaining)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    pub fn stats(&self) -> ListenerStats {
        let sessions = lock(&self.shared.registry)
            .sessions
            .values()
            .filter(|session| !session.is_closed())
            .count();
        ListenerStats {
            addresses: self
                .shared
                .local_addrs
                .iter()
                .zip(&self.shared.counters)
                .map(|(address, counters)| ListenerAddressStats::from_counters(*address, counters))
                .collect(),
            sessions,
        }
    }

    /// Stops accepting, closes every session of this listener (`CloseReason::ListenerClosed`)
    /// and waits for all of its threads.
    pub fn close(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let accept_threads = std::mem::take(&mut *lock(&self.accept_threads));
        for (index, handle) in accept_threads.into_iter().enumerate() {
            let woken = self
                .shared
                .local_addrs
                .get(index)
                .is_some_and(|address| wake_accept(*address));
            if woken {
                let _ = handle.join();
            } else {
                log::warn!("cannot wake accept thread {index}; leaving it behind");
            }
        }
        let sessions: Vec<_> = {
            let mut registry = lock(&self.shared.registry);
            registry.by_peer.clear();
            registry
                .sessions
                .drain()
                .map(|(_, session)| session)
                .collect()
        };
        for session in sessions {
            session.close(CloseReason::ListenerClosed);
        }
        let handles = {
            let mut connections = lock(&self.shared.connections);
            for stream in connections.handshaking.values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut connections.handles)
        };
        for handle in handles {
            let _ = handle.join();
        }
        lock(&self.shared.events).clear();
        self.shared.event_ready.notify_all();
    }
}

impl Drop for LinkListener {
    fn drop(&mut self) {
        self.close();
    }
}

/// Connects to our own listening address so that a blocked `accept` returns.
fn wake_accept(address: SocketAddr) -> bool {
    let target = match address.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), address.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), address.port())
        }
        _ => address,
    };
    TcpStream::connect_timeout(&target, WAKE_TIMEOUT).is_ok()
}

fn accept_loop(shared: &Arc<ListenerShared>, index: usize, socket: TcpListener) {
    for incoming in socket.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match incoming {
            Ok(stream) => stream,
            Err(error) => {
                shared.log.warn(format_args!("accept failed: {error}"));
                thread::sleep(ACCEPT_ERROR_PAUSE);
                continue;
            }
        };
        let Some(counters) = shared.counters.get(index) else {
            break;
        };
        bump(&counters.connections_accepted);
        shared.reap();
        let in_progress = shared.handshakes_in_progress.load(Ordering::SeqCst);
        if in_progress >= shared.config.max_pending_handshakes {
            bump(&counters.refused_overload);
            shared.log.warn(format_args!(
                "dropping connection from {:?}: {in_progress} handshakes in progress",
                stream.peer_addr().ok()
            ));
            continue;
        }
        if let Err(error) = shared.spawn_connection(index, stream) {
            shared
                .log
                .warn(format_args!("cannot start a connection thread: {error}"));
        }
    }
}

impl ListenerShared {
    fn spawn_connection(self: &Arc<Self>, index: usize, stream: TcpStream) -> io::Result<()> {
        let abort_copy = stream.try_clone()?;
        let mut connections = lock(&self.connections);
        let id = connections.next_id;
        connections.next_id += 1;
        self.handshakes_in_progress.fetch_add(1, Ordering::SeqCst);
        let shared = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name(format!("rl-serve-{index}"))
            .spawn(move || shared.serve(index, id, stream));
        match spawned {
            Ok(handle) => {
                connections.handshaking.insert(id, abort_copy);
                connections.handles.push(handle);
                Ok(())
            }
            Err(error) => {
                self.handshakes_in_progress.fetch_sub(1, Ordering::SeqCst);
                Err(error)
            }
        }
    }

    /// Joins finished connection threads and forgets closed sessions.
    fn reap(&self) {
        let finished: Vec<_> = {
            let mut connections = lock(&self.connections);
            let (finished, running) = std::mem::take(&mut connections.handles)
                .into_iter()
                .partition(|handle: &JoinHandle<()>| handle.is_finished());
            connections.handles = running;
            finished
        };
        for handle in finished {
            let _ = handle.join();
        }
        let mut registry = lock(&self.registry);
        registry.sessions.retain(|_, session| !session.is_closed());
        let Registry {
            sessions, by_peer, ..
        } = &mut *registry;
        by_peer.retain(|_, id| sessions.contains_key(id));
    }

    fn serve(self: Arc<Self>, index: usize, id: u64, stream: TcpStream) {
        let result = self.authenticate(index, &stream);
        lock(&self.connections).handshaking.remove(&id);
        self.handshakes_in_progress.fetch_sub(1, Ordering::SeqCst);
        let peer_address = stream.peer_addr().ok();
        match result {
            Ok(Some((session, joining))) => {
                run_connection(
                    &session,
                    joining.slot,
                    joining.connection,
                    stream,
                    joining.key,
                );
            }
            Ok(None) => {}
            Err(error) => self.report(index, peer_address, &error),
        }
    }

    fn report(&self, index: usize, peer: Option<SocketAddr>, error: &ServeError) {
        if let Some(counters) = self.counters.get(index) {
            match error {
                ServeError::Handshake(HandshakeError::AuthenticationFailed) => {
                    bump(&counters.auth_failures)
                }
                _ => bump(&counters.handshake_errors),
            }
        }
        if !self.stopping.load(Ordering::SeqCst) {
            self.log.warn(format_args!(
                "refused connection from {peer:?} on {:?}: {}",
                self.local_addrs.get(index),
                error_chain(error)
            ));
        }
    }

    /// The key a client must prove: the pair's, or its own with per-client keys. An unknown
    /// client gets a random one, so it fails exactly like a client with a wrong key and
    /// learns nothing about which ids exist.
    fn key_for(&self, client_id: &str) -> Result<Psk, HandshakeError> {
        let Some(keys) = &self.config.client_keys else {
            return Ok(self.config.psk.clone());
        };
        if let Some(key) = keys.get(client_id) {
            return Ok(key.clone());
        }
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(HandshakeError::Random)?;
        Psk::from_bytes(&secret).map_err(|_| HandshakeError::AuthenticationFailed)
    }

    /// Runs the handshake and joins the connection to its session.
    fn authenticate(
        &self,
        index: usize,
        stream: &TcpStream,
    ) -> Result<Option<(Arc<SessionShared>, Joining)>, ServeError> {
        stream.set_nodelay(true).map_err(ServeError::Socket)?;
        let limits = self.config.receive_limits();
        let mut channel =
            HandshakeChannel::new(stream, Side::Server, self.config.handshake_timeout());
        let hello = read_hello(&mut channel, &limits).map_err(ServeError::Handshake)?;
        let prepared = lock(&self.registry)
            .prepare(&hello)
            .map_err(|error| ServeError::Handshake(HandshakeError::Random(error)))?;
        let answered = random_nonce().and_then(|server_nonce| {
            let params = ServerParams {
                protocol_version: PROTOCOL_VERSION,
                server_id: self.config.local_id.clone(),
                server_nonce,
                instance: prepared.instance,
                send_base: prepared.send_base,
                limits,
            };
            let psk = self.key_for(&hello.client_id)?;
            answer_hello(&mut channel, &psk, &hello, params)
        });
        let key = match answered {
            Ok(key) => key,
            Err(error) => {
                lock(&self.registry).release(hello.session_id, &prepared);
                return Err(ServeError::Handshake(error));
            }
        };
        if let Some(counters) = self.counters.get(index) {
            bump(&counters.handshakes_completed);
        }
        let Some(session) = self.join_session(&hello, &prepared) else {
            log::debug!(
                "session {:032x} changed during its handshake",
                hello.session_id
            );
            return Ok(None);
        };
        let peer = PeerHandshake {
            id: hello.client_id.clone(),
            instance: hello.session_id,
            send_base: hello.send_base,
            limits: hello.limits,
            address: stream.peer_addr().ok(),
            local_address: stream.local_addr().ok(),
        };
        let slot = usize::from(hello.link);
        let connection = session
            .attach(slot, stream, peer)
            .map_err(ServeError::Attach)?;
        Ok(Some((
            session,
            Joining {
                slot,
                connection,
                key,
            },
        )))
    }

    /// The session this authenticated connection joins; tells the application about new ones.
    fn join_session(&self, hello: &Hello, prepared: &Prepared) -> Option<Arc<SessionShared>> {
        let joined = {
            let mut registry = lock(&self.registry);
            registry.release(hello.session_id, prepared);
            if self.stopping.load(Ordering::SeqCst) {
                return None;
            }
            registry.join(self, hello, prepared)?
        };
        match joined {
            Joined::Existing(session) => Some(session),
            Joined::New { session, replaced } => {
                log::info!(
                    "new session {:032x} from {} for {}",
                    hello.session_id,
                    hello.client_id,
                    hello.service
                );
                let handle = Session::from_shared(Arc::clone(&session));
                let event = match replaced {
                    Some((previous_session_id, old)) => {
                        old.close(CloseReason::Replaced);
                        log::info!(
                            "{} restarted: session {previous_session_id:032x} replaced",
                            hello.client_id
                        );
                        ListenerEvent::PeerRestarted {
                            previous_session_id,
                            session: handle,
                        }
                    }
                    None => ListenerEvent::NewSession(handle),
                };
                lock(&self.events).push_back(event);
                self.event_ready.notify_all();
                Some(session)
            }
        }
    }
}

impl Registry {
    /// Parameters for the challenge to `hello`: the session's instance and send base.
    fn prepare(&mut self, hello: &Hello) -> Result<Prepared, getrandom::Error> {
        let open = self
            .sessions
            .get(&hello.session_id)
            .filter(|session| !session.is_closed());
        if let Some(session) = open {
            return Ok(Prepared {
                instance: session.identity.instance,
                send_base: session.acked_up_to(),
                pending: false,
            });
        }
        let pending = match self.pending.entry(hello.session_id) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => entry.insert(Pending {
                instance: random_id()?,
                users: 0,
            }),
        };
        pending.users += 1;
        Ok(Prepared {
            instance: pending.instance,
            send_base: 0,
            pending: true,
        })
    }

    fn release(&mut self, session_id: u128, prepared: &Prepared) {
        if !prepared.pending {
            return;
        }
        if let Entry::Occupied(mut entry) = self.pending.entry(session_id) {
            entry.get_mut().users = entry.get().users.saturating_sub(1);
            if entry.get().users == 0 {
                entry.remove();
            }
        }
    }

    /// Finds or creates the session; `None` when the challenge no longer matches it (it was
    /// closed or recreated meanwhile: the client reconnects and learns the new instance) or
    /// when the application is not taking new sessions.
    fn join(
        &mut self,
        listener: &ListenerShared,
        hello: &Hello,
        prepared: &Prepared,
    ) -> Option<Joined> {
        let id = hello.session_id;
        if let Some(existing) = self.sessions.get(&id) {
            if !existing.is_closed() {
                let owner = existing.identity.owner.as_deref();
                if owner != Some(hello.client_id.as_str())
                    || existing.identity.service != hello.service
                {
                    // Authenticated, but as someone else: it may not take over the session.
                    log::warn!(
                        "refused {} ({}) joining session {id:032x} of {} ({})",
                        hello.client_id,
                        hello.service,
                        owner.unwrap_or("?"),
                        existing.identity.service
                    );
                    return None;
                }
                let same = existing.identity.instance == prepared.instance;
                return same.then(|| Joined::Existing(Arc::clone(existing)));
            }
            self.sessions.remove(&id);
        }
        if !prepared.pending || lock(&listener.events).len() >= MAX_PENDING_EVENTS {
            return None;
        }
        let identity = Identity {
            side: Side::Server,
            session_id: id,
            service: hello.service.clone(),
            instance: prepared.instance,
            owner: Some(hello.client_id.clone()),
        };
        let session = Arc::new(SessionShared::new(
            identity,
            listener.config.clone(),
            MAX_LINKS,
            Some((id, hello.send_base)),
        ));
        self.sessions.insert(id, Arc::clone(&session));
        let peer_key = (hello.client_id.clone(), hello.service.clone());
        let previous = self.by_peer.insert(peer_key, id).filter(|old| *old != id);
        let replaced = previous.and_then(|old| self.sessions.remove(&old).map(|s| (old, s)));
        Some(Joined::New { session, replaced })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::client_handshake;
    use std::collections::BTreeMap;
    use std::io::Read;

    fn key(text: &str) -> Psk {
        Psk::from_bytes(text.as_bytes()).expect("psk")
    }

    fn hello(config: &LinkConfig, client_id: &str, session_id: u128, link: u8) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            client_id: client_id.into(),
            service: "witness".into(),
            session_id,
            link,
            client_nonce: random_nonce().expect("nonce"),
            send_base: 0,
            limits: config.receive_limits(),
        }
    }

    #[test]
    fn a_client_cannot_join_another_clients_session_by_its_id() {
        let key_a = key("host-a's own key, 32 bytes long..");
        let key_c = key("host-c's own key, 32 bytes long..");
        let mut config = LinkConfig::new(key_a.clone(), "witness");
        let keys: BTreeMap<String, Psk> = [
            ("host-a".to_owned(), key_a.clone()),
            ("host-c".to_owned(), key_c.clone()),
        ]
        .into_iter()
        .collect();
        config.client_keys = Some(Arc::new(keys));
        let listener =
            LinkListener::bind(vec!["127.0.0.1:0".parse().expect("addr")], config.clone())
                .expect("bind");
        let address = listener.local_addrs()[0];
        let timeout = Duration::from_secs(5);
        let session_id = 0x1234_5678;

        let a = TcpStream::connect(address).expect("connect");
        client_handshake(
            &a,
            &key_a,
            &hello(&config, "host-a", session_id, 0),
            timeout,
        )
        .expect("host-a authenticates");
        let Some(ListenerEvent::NewSession(session)) = listener.next_event(timeout) else {
            panic!("no session for host-a");
        };
        assert_eq!(session.peer_id().as_deref(), Some("host-a"));

        // host-c, with its own valid key, names host-a's session id (sent in clear).
        let mut c = TcpStream::connect(address).expect("connect");
        let _ = client_handshake(
            &c,
            &key_c,
            &hello(&config, "host-c", session_id, 1),
            timeout,
        );
        c.set_read_timeout(Some(timeout)).expect("timeout");
        let mut byte = [0u8; 1];
        assert!(
            matches!(c.read(&mut byte), Ok(0) | Err(_)),
            "the listener keeps host-c's connection"
        );
        assert_eq!(session.peer_id().as_deref(), Some("host-a"));
        assert!(listener.next_event(Duration::from_millis(50)).is_none());
        drop(a);
        listener.close();
    }
}
