//! Server side: accepts connections on one or two addresses (one per A-link), authenticates
//! them, and joins each to its session by session id. A new session id from the same client
//! and service replaces the old session (the client restarted).
//!
//! Before authentication a connection is bounded in time (`handshake_timeout_ms` from accept,
//! for the whole handshake) and in number (`admission`: per source and in all, the oldest
//! giving way to a newer one), and it must name a service and client id the listener serves.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::admission::{Admission, Source};
use crate::config::{ConfigError, LinkConfig};
use crate::frame::ConnectionKeys;
use crate::handshake::{answer_hello, choose_key, random_nonce, read_hello};
use crate::handshake::{HandshakeChannel, HandshakeError, Side};
use crate::header::{Hello, ServerParams, MAX_LINKS, PROTOCOL_VERSION};
use crate::link::{run_connection, LinkError};
use crate::log_limit::{error_chain, lock, LogLimiter};
use crate::psk::{KeyId, Psk};
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
    #[error(
        "{client_id:?} (not yet authenticated) asked for service {service:?}; \
         this listener serves {served:?}"
    )]
    ServiceNotServed {
        client_id: String,
        service: String,
        served: Vec<String>,
    },
    #[error(
        "client id {client_id:?} (not yet authenticated, service {service:?}) is not allowed; \
         this listener allows {allowed:?}"
    )]
    ClientNotAllowed {
        client_id: String,
        service: String,
        allowed: Vec<String>,
    },
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
    counters: Vec<ListenerCounters>,
    log: LogLimiter,
}

struct ConnectionThreads {
    handles: Vec<JoinHandle<()>>,
    /// Connections in their handshake, so that `close` and `admission` can abort them.
    handshaking: HashMap<u64, TcpStream>,
    /// Which of them count against the limits.
    admission: Admission,
    /// Threads still in their handshake, including those whose connection was closed to make
    /// room and that have not noticed yet.
    handshake_threads: usize,
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

/// A connection that completed its handshake.
struct Handshaken {
    hello: Hello,
    prepared: Prepared,
    keys: ConnectionKeys,
    key_id: KeyId,
}

/// An authenticated connection joining its session's link `slot`.
struct Joining {
    slot: usize,
    connection: u64,
    keys: ConnectionKeys,
    key_id: KeyId,
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
        let admission = Admission::new(
            config.max_pending_handshakes,
            config.max_pending_handshakes_per_source,
        );
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
            connections: Mutex::new(ConnectionThreads {
                handles: Vec::new(),
                handshaking: HashMap::new(),
                admission,
                handshake_threads: 0,
                next_id: 0,
            }),
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
            handshakes_in_progress: lock(&self.shared.connections).admission.len(),
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
        let accepted_at = Instant::now();
        let Some(counters) = shared.counters.get(index) else {
            break;
        };
        bump(&counters.connections_accepted);
        shared.reap();
        if let Err(error) = shared.admit(index, stream, accepted_at) {
            shared
                .log
                .warn(format_args!("cannot start a connection thread: {error}"));
        }
    }
}

impl ListenerShared {
    /// Starts the handshake of a new connection, closing an older one if a limit is reached.
    fn admit(
        self: &Arc<Self>,
        index: usize,
        stream: TcpStream,
        accepted_at: Instant,
    ) -> io::Result<()> {
        let Ok(peer) = stream.peer_addr() else {
            return Ok(()); // gone already
        };
        let source = Source::of(peer.ip());
        let abort_copy = stream.try_clone()?;
        let counters = self.counters.get(index);
        let mut connections = lock(&self.connections);
        // Closed connections whose threads have not ended yet still hold a thread each.
        let thread_limit = self.config.max_pending_handshakes.saturating_mul(2);
        if connections.handshake_threads >= thread_limit {
            if let Some(counters) = counters {
                bump(&counters.refused_overload);
            }
            self.log.warn(format_args!(
                "dropping connection from {peer}: {} handshake threads still running",
                connections.handshake_threads
            ));
            return Ok(());
        }
        let id = connections.next_id;
        connections.next_id += 1;
        if let Some(victim) = connections.admission.admit(id, source) {
            let victim_peer = connections.handshaking.get(&victim).map(|stream| {
                let _ = stream.shutdown(Shutdown::Both);
                stream.peer_addr().ok()
            });
            if let Some(counters) = counters {
                bump(&counters.evicted_handshakes);
            }
            self.log.warn(format_args!(
                "closed an unauthenticated connection (from {}) to make room for one \
                 from {peer}: {} handshakes in progress, {} from {}",
                victim_peer
                    .flatten()
                    .map_or("?".into(), |address| address.to_string()),
                connections.admission.len(),
                connections.admission.count(source),
                peer.ip(),
            ));
        }
        let shared = Arc::clone(self);
        let spawned = thread::Builder::new()
            .name(format!("rl-serve-{index}"))
            .spawn(move || shared.serve(index, id, stream, accepted_at));
        match spawned {
            Ok(handle) => {
                connections.handshaking.insert(id, abort_copy);
                connections.handshake_threads += 1;
                connections.handles.push(handle);
                Ok(())
            }
            Err(error) => {
                connections.admission.finish(id);
                Err(error)
            }
        }
    }

    /// Connection `id` left its handshake; false if it had been closed to make room.
    fn end_handshake(&self, id: u64) -> bool {
        let mut connections = lock(&self.connections);
        connections.handshaking.remove(&id);
        connections.handshake_threads = connections.handshake_threads.saturating_sub(1);
        connections.admission.finish(id)
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

    fn serve(self: Arc<Self>, index: usize, id: u64, stream: TcpStream, accepted_at: Instant) {
        let peer_address = stream.peer_addr().ok();
        let deadline = accepted_at + self.config.handshake_timeout();
        let handshake = self.handshake(id, &stream, deadline);
        let counted = self.end_handshake(id);
        let result = match handshake {
            Ok(done) if counted => self.join(index, &stream, done),
            Ok(done) => {
                // Closed to make room just as it finished: the client connects again.
                lock(&self.registry).release(done.hello.session_id, &done.prepared);
                return;
            }
            // Closed to make room: counted and logged then.
            Err(_) if !counted => return,
            Err(error) => Err(error),
        };
        match result {
            Ok(Some((session, joining))) => {
                run_connection(
                    &session,
                    joining.slot,
                    joining.connection,
                    stream,
                    joining.keys,
                    joining.key_id,
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
                ServeError::ServiceNotServed { .. } | ServeError::ClientNotAllowed { .. } => {
                    bump(&counters.refused_not_served)
                }
                ServeError::Handshake(_) | ServeError::Socket(_) | ServeError::Attach(_) => {
                    bump(&counters.handshake_errors)
                }
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

    /// The keys a client may prove: the pair's (its ring, as it is now), or its own with
    /// per-client keys. An unknown client gets none, so it is refused exactly like a
    /// client with a wrong key and learns nothing about which ids exist.
    fn keys_for(&self, client_id: &str) -> Vec<Psk> {
        let Some(keys) = &self.config.client_keys else {
            return self.config.keys.keys().to_vec();
        };
        keys.get(client_id).cloned().into_iter().collect()
    }

    /// Runs the handshake, under `deadline` as a whole.
    fn handshake(
        &self,
        id: u64,
        stream: &TcpStream,
        deadline: Instant,
    ) -> Result<Handshaken, ServeError> {
        stream.set_nodelay(true).map_err(ServeError::Socket)?;
        let limits = self.config.receive_limits();
        let mut channel = HandshakeChannel::new(stream, Side::Server, deadline);
        let hello = read_hello(&mut channel, &limits, self.config.protection)
            .map_err(ServeError::Handshake)?;
        self.check_served(&mut channel, &hello)?;
        lock(&self.connections).admission.hello_received(id);
        let prepared = lock(&self.registry)
            .prepare(&hello)
            .map_err(|error| ServeError::Handshake(HandshakeError::Random(error)))?;
        let answered = random_nonce().and_then(|server_nonce| {
            let psk = choose_key(&mut channel, &hello, &self.keys_for(&hello.client_id))?;
            let params = ServerParams {
                protocol_version: PROTOCOL_VERSION,
                server_id: self.config.local_id.clone(),
                server_nonce,
                instance: prepared.instance,
                send_base: prepared.send_base,
                limits,
                key_id: psk.id(),
                protection: self.config.protection,
            };
            answer_hello(&mut channel, &psk, &hello, params).map(|keys| (keys, psk.id()))
        });
        match answered {
            Ok((keys, key_id)) => Ok(Handshaken {
                hello,
                prepared,
                keys,
                key_id,
            }),
            Err(error) => {
                lock(&self.registry).release(hello.session_id, &prepared);
                Err(ServeError::Handshake(error))
            }
        }
    }

    /// Refuses a client that names a service or client id this listener does not serve.
    /// Checked before the challenge: the client learns only that the name it sent in clear
    /// is not served here; one that holds the key still cannot reach another service.
    fn check_served(
        &self,
        channel: &mut HandshakeChannel<'_>,
        hello: &Hello,
    ) -> Result<(), ServeError> {
        if !self.config.serves(&hello.service) {
            channel.send_refusal("service not served here");
            return Err(ServeError::ServiceNotServed {
                client_id: hello.client_id.clone(),
                service: hello.service.clone(),
                served: self.config.allowed_services.clone().unwrap_or_default(),
            });
        }
        if !self.config.allows_client(&hello.client_id) {
            channel.send_refusal("client not allowed here");
            return Err(ServeError::ClientNotAllowed {
                client_id: hello.client_id.clone(),
                service: hello.service.clone(),
                allowed: self.config.allowed_clients.clone().unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// Joins an authenticated connection to its session. A new session reaches the
    /// application only once this first connection is attached, so that its peer id and
    /// link are known from the start.
    fn join(
        &self,
        index: usize,
        stream: &TcpStream,
        done: Handshaken,
    ) -> Result<Option<(Arc<SessionShared>, Joining)>, ServeError> {
        let Handshaken {
            hello,
            prepared,
            keys,
            key_id,
        } = done;
        if let Some(counters) = self.counters.get(index) {
            bump(&counters.handshakes_completed);
        }
        let joined = {
            let mut registry = lock(&self.registry);
            registry.release(hello.session_id, &prepared);
            if self.stopping.load(Ordering::SeqCst) {
                return Ok(None);
            }
            registry.join(self, &hello, &prepared)
        };
        let Some(joined) = joined else {
            log::debug!(
                "session {:032x} changed during its handshake",
                hello.session_id
            );
            return Ok(None);
        };
        let session = match &joined {
            Joined::Existing(session) | Joined::New { session, .. } => Arc::clone(session),
        };
        let peer = PeerHandshake {
            id: hello.client_id.clone(),
            instance: hello.session_id,
            send_base: hello.send_base,
            limits: hello.limits,
            address: stream.peer_addr().ok(),
            local_address: stream.local_addr().ok(),
            key_id,
        };
        let slot = usize::from(hello.link);
        let connection = match session.attach(slot, stream, peer) {
            Ok(connection) => connection,
            Err(error) => {
                if let Joined::New { session, replaced } = joined {
                    // Never announced: nobody else would close them.
                    session.close(CloseReason::ListenerClosed);
                    if let Some((_, old)) = replaced {
                        old.close(CloseReason::Replaced);
                    }
                }
                return Err(ServeError::Attach(error));
            }
        };
        if let Joined::New { session, replaced } = joined {
            self.announce(&hello, session, replaced);
        }
        Ok(Some((
            session,
            Joining {
                slot,
                connection,
                keys,
                key_id,
            },
        )))
    }

    /// Tells the application about a new session (closing the one it replaces).
    fn announce(
        &self,
        hello: &Hello,
        session: Arc<SessionShared>,
        replaced: Option<(u128, Arc<SessionShared>)>,
    ) {
        log::info!(
            "new session {:032x} from {} for {}",
            hello.session_id,
            hello.client_id,
            hello.service
        );
        let handle = Session::from_shared(session);
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
                    listener.log.warn(format_args!(
                        "refused {} ({}) joining session {id:032x} of {} ({})",
                        hello.client_id,
                        hello.service,
                        owner.unwrap_or("?"),
                        existing.identity.service
                    ));
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

    fn hello(key: &Psk, client_id: &str, session_id: u128, link: u8) -> Hello {
        let config = LinkConfig::new(key.clone(), client_id);
        Hello {
            protocol_version: PROTOCOL_VERSION,
            client_id: client_id.into(),
            service: "witness".into(),
            session_id,
            link,
            client_nonce: random_nonce().expect("nonce"),
            send_base: 0,
            limits: config.receive_limits(),
            key_ids: vec![key.id()],
            protection: config.protection,
        }
    }

    #[test]
    fn refusals_name_what_was_asked_and_what_is_served_escaped() {
        let error = ServeError::ServiceNotServed {
            client_id: "host-a".into(),
            service: "blk:vm2\n-disk0".into(),
            served: vec!["blk:vm1-disk0".into()],
        };
        assert_eq!(
            error.to_string(),
            "\"host-a\" (not yet authenticated) asked for service \"blk:vm2\\n-disk0\"; \
             this listener serves [\"blk:vm1-disk0\"]"
        );
        let error = ServeError::ClientNotAllowed {
            client_id: "host-c".into(),
            service: "blk:vm1-disk0".into(),
            allowed: vec!["host-a".into()],
        };
        assert!(
            error.to_string().contains("client id \"host-c\""),
            "{error}"
        );
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
            std::slice::from_ref(&key_a),
            &hello(&key_a, "host-a", session_id, 0),
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
            std::slice::from_ref(&key_c),
            &hello(&key_c, "host-c", session_id, 1),
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
