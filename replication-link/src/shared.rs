//! The state one session shares between the application's threads and its link threads:
//! one lock, three condition variables (`work` for writers and reconnect waits, `space` for
//! blocked senders, `ready` for receivers). Link threads call in here; nothing in here does
//! I/O except shutting sockets down.

use std::collections::VecDeque;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::config::LinkConfig;
use crate::frame::ReadFrame;
use crate::handshake::Side;
use crate::header::{Echo, LinkHeader, LinkLimits};
use crate::link::{LinkError, LinkWriter, RekeyCause};
use crate::log_limit::{error_chain, lock, LogLimiter};
use crate::psk::KeyId;
use crate::reliability::{Arrival, Message, ReceiveBuffer, SendWindow, Transmission, Window};
use crate::session::{CloseReason, SessionEvent};
use crate::stats::{bump, LinkCounters, LinkStats};

/// Most messages a writer takes in one batch.
const BATCH_MESSAGES: usize = 64;
/// Most payload bytes a writer takes in one batch (a single larger message goes alone).
const BATCH_BYTES: usize = 1024 * 1024;
/// Events kept for the application; older ones are dropped first.
const MAX_EVENTS: usize = 256;

/// Who this session is.
pub(crate) struct Identity {
    pub(crate) side: Side,
    pub(crate) session_id: u128,
    pub(crate) service: String,
    /// This side's incarnation as the peer sees it (client: the session id; server: random).
    pub(crate) instance: u128,
    /// Server side: the client id that opened the session. Only that client may attach
    /// more links to it (the session id travels in clear in the Hello).
    pub(crate) owner: Option<String>,
}

/// What the handshake told about the peer.
pub(crate) struct PeerHandshake {
    pub(crate) id: String,
    pub(crate) instance: u128,
    pub(crate) send_base: u64,
    pub(crate) limits: LinkLimits,
    pub(crate) address: Option<SocketAddr>,
    pub(crate) local_address: Option<SocketAddr>,
    /// The pre-shared key the connection was authenticated with.
    pub(crate) key_id: KeyId,
}

/// A frame a writer is to send.
pub(crate) enum OutFrame {
    Control(LinkHeader),
    Data {
        transmission: Transmission,
        ack_up_to: u64,
    },
}

pub(crate) struct SessionShared {
    pub(crate) identity: Identity,
    pub(crate) config: LinkConfig,
    pub(crate) state: Mutex<SessionState>,
    /// The writer threads wait here (and only they: a wake-up for sending is given to one).
    pub(crate) work: Condvar,
    /// Reconnect back-offs wait here: woken when links change or the session closes.
    lifecycle: Condvar,
    pub(crate) space: Condvar,
    pub(crate) ready: Condvar,
    counters: Vec<LinkCounters>,
    pub(crate) log: LogLimiter,
    started: Instant,
    /// Set once by `Session::set_inline_handler`.
    pub(crate) inline: OnceLock<InlineHandler>,
}

/// What an inline handler did with a message (see `Session::set_inline_handler`).
pub enum Delivery {
    /// Handled: the next message may follow.
    Handled,
    /// Left for `recv`, which returns it before any later message.
    Defer(Message),
}

/// Runs on a link's reader thread for each message, in order (`Session::set_inline_handler`).
pub type InlineHandler = Box<dyn Fn(Message) -> Delivery + Send + Sync>;

pub(crate) struct SessionState {
    pub(crate) send: SendWindow,
    pub(crate) receive: ReceiveBuffer,
    ack: AckState,
    links: Vec<LinkSlot>,
    next_connection_id: u64,
    peer: PeerState,
    events: VecDeque<SessionEvent>,
    pub(crate) closed: Option<CloseReason>,
    pub(crate) waiting: Waiting,
    discarded_on_peer_restart: u64,
    /// `Session::interrupt` was called: the receiver's current or next wait ends at once.
    pub(crate) interrupted: bool,
    /// A thread is handing messages to the application: a reader thread running the inline
    /// handler, or the application between `recv` returning a message and its next call.
    /// Messages go out in order because only the holder takes them.
    pub(crate) delivering: bool,
    /// The application holds `delivering` (its `recv` returned a message).
    pub(crate) app_delivering: bool,
    /// A message the inline handler left for `recv`; inline delivery waits until it is taken.
    pub(crate) deferred: Option<Message>,
}

/// Threads blocked on each condition variable, so that hot paths notify only when needed.
#[derive(Default)]
pub(crate) struct Waiting {
    pub(crate) writers: usize,
    pub(crate) senders: usize,
    pub(crate) receivers: usize,
}

struct AckState {
    /// Highest ack value sent on any link.
    sent_up_to: u64,
    /// When the delivered-but-unacknowledged messages must be acknowledged.
    due_at: Option<Instant>,
    /// Acknowledge at once (duplicates arrived, or many messages are unacknowledged).
    forced: bool,
}

impl AckState {
    fn new(base: u64) -> AckState {
        AckState {
            sent_up_to: base,
            due_at: None,
            forced: false,
        }
    }

    fn mark_sent(&mut self, up_to: u64) {
        self.sent_up_to = self.sent_up_to.max(up_to);
        self.due_at = None;
        self.forced = false;
    }

    fn is_due(&self, consumed: u64, now: Instant) -> bool {
        self.forced || (consumed > self.sent_up_to && self.due_at.is_some_and(|due| due <= now))
    }
}

struct PeerState {
    id: Option<String>,
    instance: Option<u128>,
    /// Our send window: the smaller of ours and the receive window the peer offered.
    window: Window,
}

#[derive(Default)]
struct LinkSlot {
    address: Option<SocketAddr>,
    local_address: Option<SocketAddr>,
    connection: Option<Connection>,
    /// A client connection in its handshake, so that `close` can abort it.
    connecting: Option<TcpStream>,
    /// Client: the connection a new one replaced for a key change, kept open until the
    /// server is heard on the new one (so the server never sees the old one close before
    /// the new one is attached on its side, which would be a link down).
    retiring: Option<TcpStream>,
    last_error: Option<String>,
}

struct Connection {
    key_id: KeyId,
    /// Server: a `Rekey` is to be sent on this connection.
    rekey_due: bool,
    id: u64,
    stream: TcpStream,
    last_heard: Instant,
    last_heartbeat_sent: Option<Instant>,
    /// The peer's last heartbeat time and when it arrived, to echo back.
    echo: Option<(u64, Instant)>,
    rtt_us: Option<u64>,
    /// The sending half, once its writer thread runs: a sender that finds it idle writes
    /// its message itself (`SessionShared::direct_link`).
    writer: Option<Arc<Mutex<LinkWriter>>>,
}

/// A link a sender may write on itself: its connection, and the sending half's lock.
pub(crate) struct DirectLink {
    pub(crate) slot: usize,
    pub(crate) connection: u64,
    pub(crate) writer: Arc<Mutex<LinkWriter>>,
}

impl SessionState {
    /// Closes the connection that link `slot`'s current one replaced, if any.
    fn end_retiring(&mut self, slot: usize) {
        if let Some(old) = self
            .links
            .get_mut(slot)
            .and_then(|link| link.retiring.take())
        {
            let _ = old.shutdown(Shutdown::Both);
        }
    }

    fn connection_mut(&mut self, slot: usize, id: u64) -> Option<&mut Connection> {
        self.links
            .get_mut(slot)
            .and_then(|link| link.connection.as_mut())
            .filter(|connection| connection.id == id)
    }

    fn push_event(&mut self, event: SessionEvent) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }
}

impl SessionShared {
    /// `peer`: the peer's instance and send base when already known (server side).
    pub(crate) fn new(
        identity: Identity,
        config: LinkConfig,
        slots: usize,
        peer: Option<(u128, u64)>,
    ) -> SessionShared {
        let own_window = Window {
            messages: config.max_unacked_messages,
            bytes: config.max_unacked_bytes,
        };
        let mut receive = ReceiveBuffer::new(own_window);
        let base = peer.map_or(0, |(_, send_base)| send_base);
        receive.reset(base);
        let state = SessionState {
            send: SendWindow::new(),
            receive,
            ack: AckState::new(base),
            links: (0..slots).map(|_| LinkSlot::default()).collect(),
            next_connection_id: 1,
            peer: PeerState {
                // Server side the peer is the client that opened the session.
                id: identity.owner.clone(),
                instance: peer.map(|(instance, _)| instance),
                window: own_window,
            },
            events: VecDeque::new(),
            closed: None,
            waiting: Waiting::default(),
            discarded_on_peer_restart: 0,
            interrupted: false,
            delivering: false,
            app_delivering: false,
            deferred: None,
        };
        SessionShared {
            identity,
            config,
            state: Mutex::new(state),
            work: Condvar::new(),
            lifecycle: Condvar::new(),
            space: Condvar::new(),
            ready: Condvar::new(),
            counters: (0..slots).map(|_| LinkCounters::default()).collect(),
            log: LogLimiter::new("replication_link::session"),
            started: Instant::now(),
            inline: OnceLock::new(),
        }
    }

    pub(crate) fn lock_state(&self) -> MutexGuard<'_, SessionState> {
        lock(&self.state)
    }

    /// Waits on `condvar` for at most `timeout`.
    pub(crate) fn wait<'a>(
        &self,
        condvar: &Condvar,
        guard: MutexGuard<'a, SessionState>,
        timeout: Duration,
    ) -> MutexGuard<'a, SessionState> {
        condvar
            .wait_timeout(guard, timeout)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    pub(crate) fn counters(&self, slot: usize) -> Option<&LinkCounters> {
        self.counters.get(slot)
    }

    pub(crate) fn set_address(&self, slot: usize, address: SocketAddr) {
        if let Some(link) = self.lock_state().links.get_mut(slot) {
            link.address = Some(address);
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.lock_state().closed.is_some()
    }

    /// This side's send base and window for a `Hello` or `Challenge`.
    pub(crate) fn acked_up_to(&self) -> u64 {
        self.lock_state().send.acked_up_to()
    }

    fn clock_us(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_micros() as u64
    }

    /// Sleeps up to `timeout` unless the session closes; returns true while it is open.
    pub(crate) fn wait_while_open(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock_state();
        while state.closed.is_none() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return true;
            }
            state = self.wait(&self.lifecycle, state, remaining);
        }
        false
    }

    /// Registers (or clears) a client connection in its handshake; false if closed.
    pub(crate) fn set_connecting(&self, slot: usize, stream: Option<TcpStream>) -> bool {
        let mut state = self.lock_state();
        if state.closed.is_some() {
            return false;
        }
        if let Some(link) = state.links.get_mut(slot) {
            link.connecting = stream;
        }
        true
    }

    pub(crate) fn record_error(&self, slot: usize, error: String) -> bool {
        let mut state = self.lock_state();
        let Some(link) = state.links.get_mut(slot) else {
            return false;
        };
        let changed = link.last_error.as_deref() != Some(error.as_str());
        link.last_error = Some(error);
        changed
    }

    /// Makes an authenticated connection the slot's link; returns its connection id.
    pub(crate) fn attach(
        &self,
        slot: usize,
        stream: &TcpStream,
        peer: PeerHandshake,
    ) -> Result<u64, LinkError> {
        let shutdown_copy = stream.try_clone().map_err(LinkError::Socket)?;
        let mut state = self.lock_state();
        if state.closed.is_some() {
            return Err(LinkError::SessionClosed);
        }
        self.adopt_peer(&mut state, &peer);
        let id = state.next_connection_id;
        state.next_connection_id += 1;
        let now = Instant::now();
        let side = self.identity.side;
        let link = state.links.get_mut(slot).ok_or(LinkError::SessionClosed)?;
        if let Some(old) = link.connection.take() {
            match side {
                // Only a key change replaces a client's connection that still runs.
                Side::Client => link.retiring = Some(old.stream),
                Side::Server => {
                    let _ = old.stream.shutdown(Shutdown::Both);
                }
            }
        }
        link.connection = Some(Connection {
            key_id: peer.key_id,
            rekey_due: false,
            id,
            stream: shutdown_copy,
            last_heard: now,
            last_heartbeat_sent: None,
            echo: None,
            rtt_us: None,
            writer: None,
        });
        link.connecting = None;
        link.last_error = None;
        link.address = peer.address.or(link.address);
        link.local_address = peer.local_address;
        let address = link.address;
        state.push_event(SessionEvent::LinkUp {
            link: slot,
            address,
        });
        drop(state);
        if let Some(counters) = self.counters(slot) {
            bump(&counters.connects);
        }
        // The peer's window or a restart may have made messages sendable.
        self.wake_all();
        Ok(id)
    }

    fn adopt_peer(&self, state: &mut SessionState, peer: &PeerHandshake) {
        if state.peer.instance != Some(peer.instance) {
            let dropped = state.receive.reset(peer.send_base);
            state.ack = AckState::new(peer.send_base);
            if state.peer.instance.is_some() {
                state.send.requeue_all();
                state.discarded_on_peer_restart += dropped as u64;
                state.push_event(SessionEvent::PeerRestarted {
                    peer_instance: peer.instance,
                    discarded_messages: dropped,
                });
                log::info!(
                    "session {:032x} ({}): peer {} restarted; {} undelivered messages dropped",
                    self.identity.session_id,
                    self.identity.service,
                    peer.id,
                    dropped
                );
            }
            state.peer.instance = Some(peer.instance);
        }
        state.peer.id = Some(peer.id.clone());
        state.peer.window = Window {
            messages: self
                .config
                .max_unacked_messages
                .min(peer.limits.window_messages as usize),
            bytes: self
                .config
                .max_unacked_bytes
                .min(usize::try_from(peer.limits.window_bytes).unwrap_or(usize::MAX)),
        };
    }

    /// A connection ended (either of its threads saw `error`): the link goes down and its
    /// unacknowledged messages wait for another link.
    pub(crate) fn connection_ended(&self, slot: usize, connection: u64, error: &LinkError) {
        let mut state = self.lock_state();
        let closed = state.closed.is_some();
        if let Some(link) = state.links.get_mut(slot) {
            if link.connection.as_ref().is_some_and(|c| c.id == connection) {
                for stream in [
                    link.connection.take().map(|old| old.stream),
                    link.retiring.take(),
                ]
                .into_iter()
                .flatten()
                {
                    let _ = stream.shutdown(Shutdown::Both);
                }
                let text = error_chain(error);
                link.last_error = Some(text.clone());
                let address = link.address;
                if !closed {
                    state.push_event(SessionEvent::LinkDown {
                        link: slot,
                        address,
                        error: text,
                    });
                }
            }
        }
        state.send.on_connection_lost(connection);
        drop(state);
        self.wake_all();
    }

    /// Server: asks the client of `connection` to connect again (a `Rekey` frame).
    pub(crate) fn ask_rekey(&self, slot: usize, connection: u64) {
        let mut state = self.lock_state();
        if let Some(current) = state.connection_mut(slot, connection) {
            current.rekey_due = true;
        }
        drop(state);
        self.wake_all();
    }

    /// Ends the session: every link is shut down and every waiting thread woken.
    pub(crate) fn close(&self, reason: CloseReason) {
        let mut state = self.lock_state();
        if state.closed.is_none() {
            state.closed = Some(reason);
        }
        for link in state.links.iter_mut() {
            if let Some(connection) = link.connection.take() {
                let _ = connection.stream.shutdown(Shutdown::Both);
            }
            for stream in [link.connecting.take(), link.retiring.take()]
                .into_iter()
                .flatten()
            {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        drop(state);
        self.wake_all();
        self.space.notify_all();
        self.ready.notify_all();
    }

    /// Handles one authenticated frame from a link.
    pub(crate) fn on_frame(
        &self,
        slot: usize,
        connection: u64,
        frame: ReadFrame,
    ) -> Result<(), LinkError> {
        match frame.header {
            LinkHeader::Data {
                session_seq,
                payload_crc32c,
                ack_up_to,
                app_header,
            } => {
                if crc32c::crc32c(&frame.payload) != payload_crc32c {
                    return Err(LinkError::Crc { seq: session_seq });
                }
                let message = Message {
                    seq: session_seq,
                    app_header,
                    payload: frame.payload,
                    payload_crc32c,
                };
                self.on_data(slot, connection, message, ack_up_to)
            }
            LinkHeader::Ack { up_to } => self.on_control(slot, connection, up_to, None),
            LinkHeader::Heartbeat {
                ack_up_to,
                time_us,
                echo,
            } => self.on_control(slot, connection, ack_up_to, Some((time_us, echo))),
            LinkHeader::Rekey if self.identity.side == Side::Client => {
                Err(LinkError::Rekey(RekeyCause::PeerRetired))
            }
            other => Err(LinkError::Unexpected { kind: other.kind() }),
        }
    }

    fn on_data(
        &self,
        slot: usize,
        connection: u64,
        message: Message,
        ack_up_to: u64,
    ) -> Result<(), LinkError> {
        let mut state = self.lock_state();
        if let Some(current) = state.connection_mut(slot, connection) {
            current.last_heard = Instant::now();
            state.end_retiring(slot);
        }
        self.apply_ack(&mut state, ack_up_to)?;
        match state
            .receive
            .on_data(message)
            .map_err(LinkError::Protocol)?
        {
            Arrival::Accepted { ready } if ready > 0 => {
                if self.inline.get().is_some() {
                    // Unless another thread delivers (it takes these too) or a deferred
                    // message waits for `recv` (which then runs the rest).
                    if !state.delivering && state.deferred.is_none() {
                        drop(self.deliver_inline(state));
                    }
                } else if state.waiting.receivers > 0 {
                    self.ready.notify_all();
                }
            }
            Arrival::Accepted { .. } => {}
            Arrival::Duplicate => {
                // The peer retransmitted: our ack may have been lost with a link.
                state.ack.forced = true;
                if state.waiting.writers > 0 {
                    self.wake_all();
                }
            }
        }
        Ok(())
    }

    /// Hands the messages ready to the inline handler, on this thread (a reader thread,
    /// or `recv`'s caller), until none is left or the handler defers one to `recv`. The
    /// caller saw `delivering` free: this takes it, so that no other thread takes a message
    /// meanwhile (a message the other link's reader makes ready is taken by this loop).
    pub(crate) fn deliver_inline<'a>(
        &'a self,
        mut state: MutexGuard<'a, SessionState>,
    ) -> MutexGuard<'a, SessionState> {
        let Some(handler) = self.inline.get() else {
            return state;
        };
        state.delivering = true;
        while let Some(message) = state.receive.pop() {
            self.note_consumed(&mut state);
            drop(state);
            let outcome = handler(message);
            state = self.lock_state();
            if let Delivery::Defer(message) = outcome {
                state.deferred = Some(message);
                break;
            }
        }
        state.delivering = false;
        if state.deferred.is_some() && state.waiting.receivers > 0 {
            self.ready.notify_all();
        }
        state
    }

    fn on_control(
        &self,
        slot: usize,
        connection: u64,
        ack_up_to: u64,
        heartbeat: Option<(u64, Option<Echo>)>,
    ) -> Result<(), LinkError> {
        let mut state = self.lock_state();
        let now = Instant::now();
        let now_us = self.clock_us(now);
        if state.connection_mut(slot, connection).is_some() {
            state.end_retiring(slot);
        }
        if let Some(current) = state.connection_mut(slot, connection) {
            current.last_heard = now;
            if let Some((time_us, echo)) = heartbeat {
                current.echo = Some((time_us, now));
                if let Some(echo) = echo {
                    let rtt_us = now_us
                        .saturating_sub(echo.time_us)
                        .saturating_sub(echo.hold_us);
                    current.rtt_us = Some(rtt_us);
                }
            }
        }
        self.apply_ack(&mut state, ack_up_to)
    }

    fn apply_ack(&self, state: &mut SessionState, up_to: u64) -> Result<(), LinkError> {
        let freed = state.send.on_ack(up_to).map_err(LinkError::Protocol)?;
        if freed > 0 && state.waiting.senders > 0 {
            self.space.notify_all();
        }
        Ok(())
    }

    /// Records that the application took messages: schedules an ack.
    pub(crate) fn note_consumed(&self, state: &mut SessionState) {
        let consumed = state.receive.consumed_up_to();
        if consumed <= state.ack.sent_up_to {
            return;
        }
        let mut wake = false;
        if state.ack.due_at.is_none() {
            let delay = Duration::from_millis(self.config.ack_delay_ms);
            state.ack.due_at = Some(Instant::now() + delay);
            wake = true;
        }
        let threshold = (self.config.max_unacked_messages / 4).max(1) as u64;
        if !state.ack.forced && consumed - state.ack.sent_up_to >= threshold {
            state.ack.forced = true;
            wake = true;
        }
        if wake && state.waiting.writers > 0 {
            // Any link's writer can send the ack.
            self.work.notify_one();
        }
    }

    /// Installs the sending half of `connection` (its writer thread runs).
    pub(crate) fn set_writer(&self, slot: usize, connection: u64, writer: Arc<Mutex<LinkWriter>>) {
        if let Some(current) = self.lock_state().connection_mut(slot, connection) {
            current.writer = Some(writer);
        }
    }

    /// No sender writes on `connection` itself any more (it is being replaced).
    pub(crate) fn end_direct_writes(&self, slot: usize, connection: u64) {
        if let Some(current) = self.lock_state().connection_mut(slot, connection) {
            current.writer = None;
        }
    }

    /// Wakes every writer thread and reconnect back-off (links or the session changed).
    fn wake_all(&self) {
        self.work.notify_all();
        self.lifecycle.notify_all();
    }

    /// Wakes one writer thread: a message was queued, and any link may send it. The one
    /// that takes it wakes another if more is left (`next_frames`), so a deep queue still
    /// keeps both links busy, while a request at a time costs one wake-up, not one per link.
    pub(crate) fn wake_a_writer(&self, state: &SessionState) {
        if state.waiting.writers > 0 {
            self.work.notify_one();
        }
    }

    /// Wakes the writer threads (a sender left bytes for them to write).
    pub(crate) fn wake_writers(&self) {
        // Under the state lock: a writer between its last look and its wait (it holds
        // the lock then) cannot miss this.
        let _state = self.lock_state();
        self.wake_all();
    }

    /// The links, in order, on which a sender may write itself: authenticated, heard from
    /// within the link timeout, their writer thread running.
    pub(crate) fn direct_links(&self, state: &SessionState) -> Vec<DirectLink> {
        let timeout = self.config.link_timeout();
        state
            .links
            .iter()
            .enumerate()
            .filter_map(|(slot, link)| {
                let connection = link.connection.as_ref()?;
                let writer = connection.writer.as_ref()?;
                (connection.last_heard.elapsed() < timeout).then(|| DirectLink {
                    slot,
                    connection: connection.id,
                    writer: Arc::clone(writer),
                })
            })
            .collect()
    }

    /// A sender holding link `slot`'s lock: what to send on it now (waiting messages, and
    /// a heartbeat or ack if one is due), as the writer thread would take it.
    pub(crate) fn frames_for(
        &self,
        state: &mut SessionState,
        slot: usize,
        connection: u64,
    ) -> Vec<OutFrame> {
        self.collect_frames(state, slot, connection, Instant::now())
            .unwrap_or_default()
    }

    /// Writer side: blocks until there is something to send on this connection, and returns
    /// it with the link's lock held (bytes a sender left unwritten come first, with no new
    /// frames); `None` when the connection is no longer the slot's link or the session
    /// closed.
    pub(crate) fn next_frames<'w>(
        &self,
        slot: usize,
        connection: u64,
        writer: &'w Mutex<LinkWriter>,
    ) -> Option<(MutexGuard<'w, LinkWriter>, Vec<OutFrame>)> {
        loop {
            // The link's lock before the state's, as senders do (they only try it).
            let out = lock(writer);
            if !out.is_drained() {
                return Some((out, Vec::new()));
            }
            let mut state = self.lock_state();
            if state.closed.is_some() {
                return None;
            }
            let now = Instant::now();
            let Some(frames) = self.collect_frames(&mut state, slot, connection, now) else {
                // This writer ends (its connection was replaced): a wake-up it took for
                // queued messages goes to another.
                self.wake_a_writer(&state);
                return None;
            };
            if !frames.is_empty() {
                if state.send.has_pending() {
                    self.wake_a_writer(&state);
                }
                return Some((out, frames));
            }
            let Some(wait) = self.writer_wait(&mut state, slot, connection, now) else {
                self.wake_a_writer(&state);
                return None;
            };
            // Released while the state is held: a sender that takes the link now sees its
            // messages in the state first, and one that finds it busy wakes us after.
            drop(out);
            state.waiting.writers += 1;
            state = self.wait(&self.work, state, wait);
            state.waiting.writers -= 1;
        }
    }

    fn collect_frames(
        &self,
        state: &mut SessionState,
        slot: usize,
        connection: u64,
        now: Instant,
    ) -> Option<Vec<OutFrame>> {
        let consumed = state.receive.consumed_up_to();
        let interval = self.config.heartbeat_interval();
        let now_us = self.clock_us(now);
        let current = state.connection_mut(slot, connection)?;
        let mut frames = Vec::new();
        if std::mem::take(&mut current.rekey_due) {
            frames.push(OutFrame::Control(LinkHeader::Rekey));
        }
        if current
            .last_heartbeat_sent
            .is_none_or(|sent| now.saturating_duration_since(sent) >= interval)
        {
            let echo = current.echo.take().map(|(time_us, received)| Echo {
                time_us,
                hold_us: now.saturating_duration_since(received).as_micros() as u64,
            });
            current.last_heartbeat_sent = Some(now);
            frames.push(OutFrame::Control(LinkHeader::Heartbeat {
                ack_up_to: consumed,
                time_us: now_us,
                echo,
            }));
            state.ack.mark_sent(consumed);
        }
        let batch = Window {
            messages: BATCH_MESSAGES,
            bytes: BATCH_BYTES,
        };
        let transmissions = state.send.take_for(connection, batch, state.peer.window);
        if !transmissions.is_empty() {
            state.ack.mark_sent(consumed);
        }
        frames.extend(
            transmissions
                .into_iter()
                .map(|transmission| OutFrame::Data {
                    transmission,
                    ack_up_to: consumed,
                }),
        );
        if frames.is_empty() && state.ack.is_due(consumed, now) {
            state.ack.mark_sent(consumed);
            frames.push(OutFrame::Control(LinkHeader::Ack { up_to: consumed }));
        }
        Some(frames)
    }

    /// How long an idle writer may sleep: until its next heartbeat or a due ack.
    fn writer_wait(
        &self,
        state: &mut SessionState,
        slot: usize,
        connection: u64,
        now: Instant,
    ) -> Option<Duration> {
        let consumed = state.receive.consumed_up_to();
        let ack_due = state.ack.due_at.filter(|_| consumed > state.ack.sent_up_to);
        let interval = self.config.heartbeat_interval();
        let current = state.connection_mut(slot, connection)?;
        let heartbeat_due = current
            .last_heartbeat_sent
            .map_or(now, |sent| sent + interval);
        let deadline = ack_due.map_or(heartbeat_due, |due| due.min(heartbeat_due));
        Some(deadline.saturating_duration_since(now))
    }

    /// Some link is authenticated and heard from within the link timeout.
    pub(crate) fn peer_reachable(&self, state: &SessionState) -> bool {
        let timeout = self.config.link_timeout();
        state
            .links
            .iter()
            .filter_map(|link| link.connection.as_ref())
            .any(|connection| connection.last_heard.elapsed() < timeout)
    }

    pub(crate) fn take_events(&self) -> Vec<SessionEvent> {
        self.lock_state().events.drain(..).collect()
    }

    pub(crate) fn peer_id(&self, state: &SessionState) -> Option<String> {
        state.peer.id.clone()
    }

    pub(crate) fn send_window(&self, state: &SessionState) -> Window {
        state.peer.window
    }

    pub(crate) fn discarded_on_peer_restart(&self, state: &SessionState) -> u64 {
        state.discarded_on_peer_restart
    }

    pub(crate) fn link_stats(&self, state: &SessionState) -> Vec<LinkStats> {
        let now = Instant::now();
        state
            .links
            .iter()
            .zip(&self.counters)
            .enumerate()
            .map(|(index, (link, counters))| {
                let mut stats = LinkStats::from_counters(index, counters);
                stats.address = link.address;
                stats.local_address = link.local_address;
                stats.last_error = link.last_error.clone();
                if let Some(connection) = &link.connection {
                    let silence = now.saturating_duration_since(connection.last_heard);
                    stats.up = silence < self.config.link_timeout();
                    stats.rtt_us = connection.rtt_us;
                    stats.last_heard_ms = Some(silence.as_millis() as u64);
                    stats.key = Some(connection.key_id.to_string());
                }
                stats
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::psk::Psk;

    fn server_session() -> SessionShared {
        let identity = Identity {
            side: Side::Server,
            session_id: 1,
            service: "blk:test".into(),
            instance: 2,
            owner: Some("host-a".into()),
        };
        let psk = Psk::from_bytes(b"0123456789abcdef").expect("psk");
        SessionShared::new(identity, LinkConfig::new(psk, "host-b"), 2, Some((1, 0)))
    }

    fn data(seq: u64, crc: u32, payload: &[u8]) -> ReadFrame {
        ReadFrame {
            header: LinkHeader::Data {
                session_seq: seq,
                payload_crc32c: crc,
                ack_up_to: 0,
                app_header: vec![],
            },
            payload: payload.to_vec(),
            frame_bytes: 0,
        }
    }

    #[test]
    fn payload_with_a_wrong_crc_is_an_error_and_never_delivered() {
        let shared = server_session();
        let good = crc32c::crc32c(b"block");
        let result = shared.on_frame(0, 1, data(1, good ^ 1, b"block"));
        assert!(matches!(result, Err(LinkError::Crc { seq: 1 })));
        assert!(!shared.lock_state().receive.has_ready());
        shared
            .on_frame(0, 1, data(1, good, b"block"))
            .expect("intact");
        assert!(shared.lock_state().receive.has_ready());
    }

    #[test]
    fn protocol_violations_are_errors() {
        let shared = server_session();
        let hello_again = ReadFrame {
            header: LinkHeader::Proof {
                client_proof: [0; 32],
            },
            payload: vec![],
            frame_bytes: 0,
        };
        assert!(matches!(
            shared.on_frame(0, 1, hello_again),
            Err(LinkError::Unexpected { kind: "proof" })
        ));
        let ack_of_unsent = ReadFrame {
            header: LinkHeader::Ack { up_to: 5 },
            payload: vec![],
            frame_bytes: 0,
        };
        assert!(matches!(
            shared.on_frame(0, 1, ack_of_unsent),
            Err(LinkError::Protocol(_))
        ));
    }
}
