//! The application's handle on a session: send, receive, state, statistics.
//!
//! A client makes one with [`Session::connect`]; a server gets one from
//! [`crate::LinkListener::next_event`]. Both ends behave the same once connected.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::spawn_supervisors;
use crate::config::{ConfigError, LinkConfig};
use crate::handshake::Side;
use crate::header::{MAX_APP_HEADER_BYTES, MAX_ID_BYTES};
use crate::link::send_direct;
use crate::log_limit::lock;
use crate::reliability::Message;
use crate::shared::{Identity, InlineHandler, SessionShared};
use crate::stats::SessionStats;

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// `close` was called or the handle dropped.
    Closed,
    /// Server side: the same client and service connected with a new session id.
    Replaced,
    /// Server side: the listener was closed.
    ListenerClosed,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            CloseReason::Closed => "closed",
            CloseReason::Replaced => "replaced by a new session of the same peer",
            CloseReason::ListenerClosed => "listener closed",
        })
    }
}

/// Something that happened to a session, for the application's log and state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// Link `link` authenticated.
    LinkUp {
        link: usize,
        address: Option<SocketAddr>,
    },
    /// Link `link` went down; its unacknowledged messages go on the other link or wait.
    LinkDown {
        link: usize,
        address: Option<SocketAddr>,
        error: String,
    },
    /// Client side: the server lost its session state (it restarted). Its messages start
    /// again from a new base; ours are all sent again.
    PeerRestarted {
        peer_instance: u128,
        discarded_messages: usize,
    },
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session {reason}")]
    Closed { reason: CloseReason },
    #[error("send window still full after {timeout_ms} ms")]
    SendTimeout { timeout_ms: u64 },
    #[error("message of {length} bytes (header and payload) exceeds the limit of {limit}")]
    MessageTooLarge { length: usize, limit: usize },
    #[error("application header of {length} bytes exceeds the limit of {MAX_APP_HEADER_BYTES}")]
    AppHeaderTooLarge { length: usize },
    #[error("cannot encode the application header")]
    EncodeHeader(#[source] postcard::Error),
    #[error("invalid configuration")]
    Config(#[source] ConfigError),
    #[error("a session needs 1 or 2 peer addresses, got {count}")]
    PeerAddresses { count: usize },
    #[error("service name must be 1 to {MAX_ID_BYTES} bytes, is {length}")]
    Service { length: usize },
    #[error("cannot draw random bytes: {0}")]
    Random(getrandom::Error),
    #[error("cannot start a link thread")]
    Spawn(#[source] std::io::Error),
}

/// One session: reliable, exactly-once, in-order messages in both directions over up to two
/// links. Dropping it closes it.
pub struct Session {
    shared: Arc<SessionShared>,
    supervisors: Mutex<Vec<JoinHandle<()>>>,
}

impl fmt::Debug for Session {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Session")
            .field("session_id", &format_args!("{:032x}", self.session_id()))
            .field("service", &self.service())
            .finish()
    }
}

impl Session {
    /// Client side: starts a session with the peer at one or two addresses (one per A-link).
    /// Returns at once; links connect in the background and keep reconnecting, and messages
    /// sent before a link is up wait in the send window.
    pub fn connect(
        peer_addrs: Vec<SocketAddr>,
        service: &str,
        config: LinkConfig,
    ) -> Result<Session, SessionError> {
        config.validate().map_err(SessionError::Config)?;
        if peer_addrs.is_empty() || peer_addrs.len() > 2 {
            return Err(SessionError::PeerAddresses {
                count: peer_addrs.len(),
            });
        }
        if service.is_empty() || service.len() > MAX_ID_BYTES {
            return Err(SessionError::Service {
                length: service.len(),
            });
        }
        let session_id = random_id().map_err(SessionError::Random)?;
        let identity = Identity {
            side: Side::Client,
            session_id,
            service: service.to_string(),
            instance: session_id,
            owner: None,
        };
        let shared = Arc::new(SessionShared::new(identity, config, peer_addrs.len(), None));
        let session = Session::from_shared(Arc::clone(&shared));
        let supervisors = spawn_supervisors(&shared, &peer_addrs).map_err(SessionError::Spawn)?;
        *lock(&session.supervisors) = supervisors;
        Ok(session)
    }

    pub(crate) fn from_shared(shared: Arc<SessionShared>) -> Session {
        Session {
            shared,
            supervisors: Mutex::new(Vec::new()),
        }
    }

    /// Chosen at random by the client.
    pub fn session_id(&self) -> u128 {
        self.shared.identity.session_id
    }

    pub fn service(&self) -> &str {
        &self.shared.identity.service
    }

    /// The peer's `local_id`, once a link authenticated.
    pub fn peer_id(&self) -> Option<String> {
        let state = self.shared.lock_state();
        self.shared.peer_id(&state)
    }

    /// Sends a message, waiting up to `send_timeout_ms` while the send window is full.
    /// Returns its sequence number.
    pub fn send(&self, app_header: &[u8], payload: Vec<u8>) -> Result<u64, SessionError> {
        let timeout = Duration::from_millis(self.shared.config.send_timeout_ms);
        self.send_timeout(app_header, payload, timeout)
    }

    /// Sends with a postcard-encoded application header.
    pub fn send_typed<H: Serialize>(
        &self,
        header: &H,
        payload: Vec<u8>,
    ) -> Result<u64, SessionError> {
        let app_header = postcard::to_allocvec(header).map_err(SessionError::EncodeHeader)?;
        self.send(&app_header, payload)
    }

    /// Sends a message, waiting up to `timeout` while the send window is full.
    pub fn send_timeout(
        &self,
        app_header: &[u8],
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<u64, SessionError> {
        let crc = crc32c::crc32c(&payload);
        self.send_with_crc32c(app_header, payload, crc, timeout)
    }

    /// Sends a message whose payload's CRC32C the caller computed already (where it read
    /// the data, so that one checksum follows the data end to end and nobody hashes it
    /// twice); it travels in the frame and the receiver checks it against the payload (and
    /// delivers it as [`Message::payload_crc32c`]). `crc32c` must be `crc32c(&payload)`:
    /// another value makes the receiver refuse the frame on every link, each time it is
    /// sent. Waits up to `timeout` while the send window is full.
    ///
    /// When nothing else is in flight and a link is idle, the calling thread seals and
    /// writes the message itself, without waking that link's writer thread (a socket that
    /// would block leaves the rest to the writer); with messages in flight the writer
    /// thread sends it, with whatever accumulated meanwhile, in one write.
    pub fn send_with_crc32c(
        &self,
        app_header: &[u8],
        payload: Vec<u8>,
        crc32c: u32,
        timeout: Duration,
    ) -> Result<u64, SessionError> {
        if app_header.len() > MAX_APP_HEADER_BYTES {
            return Err(SessionError::AppHeaderTooLarge {
                length: app_header.len(),
            });
        }
        let limit = self.shared.config.max_message_bytes();
        if app_header.len() + payload.len() > limit {
            return Err(SessionError::MessageTooLarge {
                length: app_header.len() + payload.len(),
                limit,
            });
        }
        debug_assert_eq!(crc32c, crc32c::crc32c(&payload), "caller's CRC32C");
        let size = app_header.len() + payload.len();
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock_state();
        loop {
            if let Some(reason) = state.closed {
                return Err(SessionError::Closed { reason });
            }
            if state.send.has_room(size, self.shared.send_window(&state)) {
                break;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(SessionError::SendTimeout {
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            state.waiting.senders += 1;
            state = self.shared.wait(&self.shared.space, state, remaining);
            state.waiting.senders -= 1;
        }
        let seq = state.send.push(app_header.to_vec(), payload, crc32c);
        // Nothing else in flight (a request at a time, as at queue depth 1): seal and write
        // here, on an idle link, and save the writer thread's wake-up. With more in flight
        // the writer thread takes what accumulates while it writes, many messages in one
        // `write`. The link's lock is only tried (never waited for) while the state is
        // held, so the lock order link -> state of the writer threads holds.
        let links = if state.send.unacked_count() == 1 {
            self.shared.direct_links(&state)
        } else {
            Vec::new()
        };
        for link in links {
            let Ok(mut writer) = link.writer.try_lock() else {
                continue;
            };
            if !writer.is_drained() {
                continue;
            }
            let frames = self
                .shared
                .frames_for(&mut state, link.slot, link.connection);
            drop(state);
            if frames.is_empty() {
                // Not sendable now (the peer's window): the writer threads take it later.
                drop(writer);
                self.shared.wake_writers();
            } else {
                send_direct(
                    &self.shared,
                    link.slot,
                    link.connection,
                    &mut writer,
                    frames,
                );
            }
            return Ok(seq);
        }
        self.shared.wake_a_writer(&state);
        Ok(seq)
    }

    /// Takes the next message in order, waiting up to `timeout`. `Ok(None)` on timeout;
    /// `Err(Closed)` once the session is closed and every received message was taken.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Message>, SessionError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock_state();
        // The caller is done with the message the previous call returned.
        if std::mem::take(&mut state.app_delivering) {
            state.delivering = false;
        }
        loop {
            // Not while a reader thread hands messages to the inline handler: it takes
            // every message ready, or defers one to here.
            if !state.delivering {
                if let Some(message) = state.deferred.take() {
                    // Until the next call: the inline handler must not run the next
                    // message while the caller still handles this one.
                    state.delivering = true;
                    state.app_delivering = true;
                    return Ok(Some(message));
                }
                if self.shared.inline.get().is_some() {
                    // Ready while the caller held the delivery: the handler takes them
                    // here (and maybe defers one, taken above).
                    if state.receive.has_ready() {
                        state = self.shared.deliver_inline(state);
                        continue;
                    }
                } else if let Some(message) = state.receive.pop() {
                    self.shared.note_consumed(&mut state);
                    return Ok(Some(message));
                }
            }
            if let Some(reason) = state.closed {
                return Err(SessionError::Closed { reason });
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() || std::mem::take(&mut state.interrupted) {
                return Ok(None);
            }
            state.waiting.receivers += 1;
            state = self.shared.wait(&self.shared.ready, state, remaining);
            state.waiting.receivers -= 1;
        }
    }

    /// Ends the wait of the thread in [`Session::recv`] (or of the next call, if none
    /// waits) with `Ok(None)`, as a timeout would, but at once: another thread wants the
    /// receiver to look at something else (a checkpoint replica asked to freeze). A message
    /// already waiting is still returned first.
    pub fn interrupt(&self) {
        let mut state = self.shared.lock_state();
        state.interrupted = true;
        if state.waiting.receivers > 0 {
            self.shared.ready.notify_all();
        }
    }

    /// True when a message is waiting for `recv`.
    pub fn has_message(&self) -> bool {
        let state = self.shared.lock_state();
        state.deferred.is_some() || state.receive.has_ready()
    }

    /// Lets the links' reader threads run `handler` on each message themselves, instead of
    /// waking the thread in [`Session::recv`]: one thread wake-up less per message (on a
    /// mirrored disk, per completed write). `recv` then returns only the messages the
    /// handler leaves to it (`Delivery::Defer`). Messages still reach the application
    /// strictly in order and one at a time: a thread runs the handler only while no other
    /// delivers, `recv`'s caller counts as delivering from the message it got until its
    /// next call, no later message is handled before `recv` took a deferred one, and
    /// messages that became ready meanwhile are run through the handler by `recv`'s
    /// caller on that next call.
    ///
    /// The handler runs on a reader thread: it must never wait for anything that needs a
    /// reader thread to go on (window space on a session, an acknowledgement): defer what
    /// might. Set once; `false` if a handler was set already.
    pub fn set_inline_handler(&self, handler: InlineHandler) -> bool {
        self.shared.inline.set(handler).is_ok()
    }

    /// Waits up to `timeout` until the peer acknowledged every message sent; returns whether
    /// it did.
    pub fn flush(&self, timeout: Duration) -> Result<bool, SessionError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock_state();
        loop {
            if state.send.unacked_count() == 0 {
                return Ok(true);
            }
            if let Some(reason) = state.closed {
                return Err(SessionError::Closed { reason });
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(false);
            }
            state.waiting.senders += 1;
            state = self.shared.wait(&self.shared.space, state, remaining);
            state.waiting.senders -= 1;
        }
    }

    /// Some link is authenticated and heard from within `link_timeout_ms`.
    pub fn peer_reachable(&self) -> bool {
        let state = self.shared.lock_state();
        self.shared.peer_reachable(&state)
    }

    /// Events since the last call (at most 256 are kept).
    pub fn take_events(&self) -> Vec<SessionEvent> {
        self.shared.take_events()
    }

    pub fn stats(&self) -> SessionStats {
        let state = self.shared.lock_state();
        SessionStats {
            session_id: self.session_id(),
            service: self.service().to_string(),
            peer_id: self.shared.peer_id(&state),
            peer_reachable: self.shared.peer_reachable(&state),
            links: self.link_stats(&state),
            sent: state.send.sent_count(),
            unacked_messages: state.send.unacked_count(),
            unacked_bytes: state.send.unacked_bytes(),
            delivered: state.receive.delivered(),
            buffered_messages: state.receive.buffered_messages(),
            discarded_on_peer_restart: self.shared.discarded_on_peer_restart(&state),
        }
    }

    /// Server sessions have a slot per possible client link: show those that were used.
    fn link_stats(&self, state: &crate::shared::SessionState) -> Vec<crate::stats::LinkStats> {
        let mut links = self.shared.link_stats(state);
        if self.shared.identity.side == Side::Server {
            links.retain(|link| link.address.is_some());
        }
        links
    }

    /// Why the session ended, if it did.
    pub fn closed(&self) -> Option<CloseReason> {
        self.shared.lock_state().closed
    }

    /// Closes every link and stops this session's threads (waits for them). Messages not yet
    /// acknowledged are dropped; call [`Session::flush`] first to wait for them.
    pub fn close(&self) {
        self.shared.close(CloseReason::Closed);
        let supervisors = std::mem::take(&mut *lock(&self.supervisors));
        for supervisor in supervisors {
            let _ = supervisor.join();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

/// A random, non-zero 128-bit id.
pub(crate) fn random_id() -> Result<u128, getrandom::Error> {
    loop {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        let id = u128::from_le_bytes(bytes);
        if id != 0 {
            return Ok(id);
        }
    }
}
