//! One authenticated connection (one A-link at a time): a reader on the calling thread and a
//! writer thread. Either ending ends both; the session then sends the connection's
//! unacknowledged messages on another link.

use std::io::{self, BufReader, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use crate::frame::{ConnectionKeys, FrameError, FrameOpener, FrameSealer};
use crate::handshake::Side;
use crate::header::LinkHeader;
use crate::key_ring::RECHECK_INTERVAL;
use crate::log_limit::error_chain;
use crate::psk::KeyId;
use crate::reliability::ReliabilityError;
use crate::shared::{OutFrame, SessionShared};
use crate::stats::{add, bump};

/// Small enough that a large frame's body is mostly read straight from the socket into its own
/// buffer (`BufReader` bypasses itself for reads larger than its capacity), large enough
/// that one read takes many small frames.
const READ_BUFFER_BYTES: usize = 64 * 1024;
const WRITE_BUFFER_BYTES: usize = 256 * 1024;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no frame from the peer for {timeout_ms} ms")]
    Silent { timeout_ms: u64 },
    #[error("connection closed by the peer")]
    Closed,
    #[error("bad frame from the peer")]
    Frame(#[source] FrameError),
    #[error("payload of message {seq} failed its CRC32C check")]
    Crc { seq: u64 },
    #[error("unexpected {kind} frame on an established link")]
    Unexpected { kind: &'static str },
    #[error("peer broke the protocol")]
    Protocol(#[source] ReliabilityError),
    #[error("cannot send")]
    Write(#[source] FrameError),
    #[error("session closed")]
    SessionClosed,
    #[error("cannot start the writer thread")]
    Spawn(#[source] io::Error),
    #[error("cannot configure the socket")]
    Socket(#[source] io::Error),
    #[error("the connection's pre-shared key {key} was retired, and the peer did not connect again under a current one")]
    KeyRetired { key: KeyId },
    #[error("connecting again under a current key: {0}")]
    Rekey(RekeyCause),
}

/// Why a client connects again while its connection still works.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RekeyCause {
    #[error("this host retired the connection's key")]
    Retired,
    #[error("the peer retired the connection's key")]
    PeerRetired,
}

/// Runs connection `connection` of link `slot` until it fails or the session closes; returns
/// why it ended. A client's connection that ends with [`LinkError::Rekey`] stays attached,
/// its writer still sending: the caller connects again at once, the new connection
/// replaces it, and then the caller ends it with [`SessionShared::connection_ended`] (so
/// the link never goes down for a key change).
pub(crate) fn run_connection(
    shared: &Arc<SessionShared>,
    slot: usize,
    connection: u64,
    stream: TcpStream,
    keys: ConnectionKeys,
    key_id: KeyId,
) -> LinkError {
    let error = match start_writer(shared, slot, connection, &stream, keys.clone()) {
        Ok(writer) => {
            let reader = Reader {
                slot,
                connection,
                keys: &keys,
                key_id,
            };
            let error = read_loop(shared, &stream, reader);
            if matches!(error, LinkError::Rekey(_)) {
                // Being replaced: senders leave it to its writer thread from now on (the
                // server closes it as soon as the new one is attached on its side).
                shared.end_direct_writes(slot, connection);
                // The writer ends once the new connection replaces this one.
                log::info!(
                    "session {:032x} ({}) link {}: {}",
                    shared.identity.session_id,
                    shared.identity.service,
                    slot,
                    error
                );
                return error;
            }
            shared.connection_ended(slot, connection, &error);
            let _ = writer.join();
            error
        }
        Err(error) => {
            shared.connection_ended(slot, connection, &error);
            error
        }
    };
    if !shared.is_closed() {
        count_error(shared, slot, &error);
        shared.log.warn(format_args!(
            "session {:032x} ({}) link {}: {}",
            shared.identity.session_id,
            shared.identity.service,
            slot,
            error_chain(&error)
        ));
    }
    error
}

fn start_writer(
    shared: &Arc<SessionShared>,
    slot: usize,
    connection: u64,
    stream: &TcpStream,
    keys: ConnectionKeys,
) -> Result<thread::JoinHandle<()>, LinkError> {
    let timeout = Some(shared.config.link_timeout());
    stream
        .set_read_timeout(timeout)
        .map_err(LinkError::Socket)?;
    stream
        .set_write_timeout(timeout)
        .map_err(LinkError::Socket)?;
    let writer_stream = stream.try_clone().map_err(LinkError::Socket)?;
    let direction = shared.identity.side.sending();
    let writer = Arc::new(Mutex::new(LinkWriter {
        sealer: FrameSealer::new(&keys, direction, shared.config.max_frame_bytes),
        stream: writer_stream,
        output: Vec::with_capacity(WRITE_BUFFER_BYTES),
    }));
    let writer_shared = Arc::clone(shared);
    let thread_writer = Arc::clone(&writer);
    let handle = thread::Builder::new()
        .name(format!("rl-write-{slot}"))
        .spawn(move || {
            if let Err(error) = write_loop(&writer_shared, slot, connection, &thread_writer) {
                writer_shared.connection_ended(slot, connection, &error);
            }
        })
        .map_err(LinkError::Spawn)?;
    // From here on a sender may also write on this connection itself (see `send_direct`).
    shared.set_writer(slot, connection, writer);
    Ok(handle)
}

/// What the reader of one connection needs to know about it.
struct Reader<'a> {
    slot: usize,
    connection: u64,
    keys: &'a ConnectionKeys,
    /// The pre-shared key the connection was authenticated with.
    key_id: KeyId,
}

fn read_loop(shared: &SessionShared, stream: &TcpStream, reader: Reader<'_>) -> LinkError {
    let Reader {
        slot,
        connection,
        keys,
        key_id,
    } = reader;
    let direction = shared.identity.side.receiving();
    let mut opener = FrameOpener::new(keys, direction, shared.config.max_frame_bytes);
    let mut input = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
    let mut key_checked = Instant::now();
    let mut rekey_asked: Option<Instant> = None;
    loop {
        if key_checked.elapsed() >= RECHECK_INTERVAL {
            key_checked = Instant::now();
            if let Err(error) = check_key(shared, slot, connection, key_id, &mut rekey_asked) {
                return error;
            }
        }
        let frame = match opener.read_frame(&mut input) {
            Ok(frame) => frame,
            Err(error) => return classify(shared, error),
        };
        if let Some(counters) = shared.counters(slot) {
            bump(&counters.frames_received);
            add(&counters.bytes_received, frame.frame_bytes);
        }
        if let Err(error) = shared.on_frame(slot, connection, frame) {
            return error;
        }
    }
}

/// What to do when this host no longer holds the connection's key (retired): a client
/// connects again ([`LinkError::Rekey`]); a server asks its client to (`Rekey`), and ends
/// the connection itself if it is not replaced within a link timeout. A listener with a
/// key per client keeps its keys for its life.
fn check_key(
    shared: &SessionShared,
    slot: usize,
    connection: u64,
    key_id: KeyId,
    rekey_asked: &mut Option<Instant>,
) -> Result<(), LinkError> {
    if shared.config.client_keys.is_some() || shared.config.keys.holds(key_id) {
        return Ok(());
    }
    match (shared.identity.side, *rekey_asked) {
        (Side::Client, _) => Err(LinkError::Rekey(RekeyCause::Retired)),
        (Side::Server, None) => {
            shared.ask_rekey(slot, connection);
            *rekey_asked = Some(Instant::now());
            Ok(())
        }
        (Side::Server, Some(asked)) if asked.elapsed() < shared.config.link_timeout() => Ok(()),
        (Side::Server, Some(_)) => Err(LinkError::KeyRetired { key: key_id }),
    }
}

fn classify(shared: &SessionShared, error: FrameError) -> LinkError {
    if error.is_timeout() {
        LinkError::Silent {
            timeout_ms: shared.config.link_timeout_ms,
        }
    } else if matches!(error, FrameError::Closed) {
        LinkError::Closed
    } else {
        LinkError::Frame(error)
    }
}

fn count_error(shared: &SessionShared, slot: usize, error: &LinkError) {
    let Some(counters) = shared.counters(slot) else {
        return;
    };
    match error {
        LinkError::Frame(FrameError::BadTag) => bump(&counters.auth_failures),
        LinkError::Crc { .. } => bump(&counters.crc_errors),
        LinkError::Frame(_) | LinkError::Unexpected { .. } | LinkError::Protocol(_) => {
            bump(&counters.frame_errors)
        }
        LinkError::Silent { .. }
        | LinkError::Closed
        | LinkError::Write(_)
        | LinkError::SessionClosed
        | LinkError::Spawn(_)
        | LinkError::Socket(_)
        | LinkError::KeyRetired { .. }
        | LinkError::Rekey(_) => {}
    }
}

/// The sending half of one connection, behind the link's lock: whoever holds the lock (the
/// connection's writer thread, or a sender that found the link idle) seals frames and writes
/// them, so frames go out in the order of their counters.
pub(crate) struct LinkWriter {
    sealer: FrameSealer,
    stream: TcpStream,
    /// Sealed bytes not yet written: frames are sealed straight into it; a sender's write
    /// that would have blocked leaves the rest here for the writer thread.
    output: Vec<u8>,
}

impl LinkWriter {
    /// Whether everything sealed was written.
    pub(crate) fn is_drained(&self) -> bool {
        self.output.is_empty()
    }

    /// Seals `frames` into the output buffer, counting them on link `slot`.
    fn seal(
        &mut self,
        shared: &SessionShared,
        slot: usize,
        frames: Vec<OutFrame>,
    ) -> Result<(), LinkError> {
        let counters = shared.counters(slot);
        for frame in frames {
            let written = match frame {
                OutFrame::Control(header) => {
                    self.sealer.write_frame(&mut self.output, &header, &[])
                }
                OutFrame::Data {
                    transmission,
                    ack_up_to,
                } => {
                    let message = &transmission.message;
                    let header = LinkHeader::Data {
                        session_seq: message.seq,
                        payload_crc32c: message.payload_crc32c,
                        ack_up_to,
                        app_header: message.app_header.clone(),
                    };
                    if let Some(counters) = counters.filter(|_| transmission.retransmit) {
                        bump(&counters.retransmits);
                    }
                    self.sealer
                        .write_frame(&mut self.output, &header, &message.payload)
                }
            }
            .map_err(LinkError::Write)?;
            if let Some(counters) = counters {
                bump(&counters.frames_sent);
                add(&counters.bytes_sent, written);
            }
        }
        Ok(())
    }

    /// Writes the output buffer, blocking (up to the socket's write timeout).
    fn write_blocking(&mut self) -> Result<(), LinkError> {
        self.stream
            .write_all(&self.output)
            .map_err(|error| LinkError::Write(FrameError::Io(error)))?;
        self.output.clear();
        Ok(())
    }

    /// Writes as much of the output buffer as the socket takes without blocking; what is
    /// left stays for the writer thread. Returns whether everything was written.
    fn write_nonblocking(&mut self) -> Result<bool, LinkError> {
        let mut written = 0;
        while written < self.output.len() {
            let rest = self.output.get(written..).unwrap_or_default();
            match send_nonblocking(&self.stream, rest) {
                Ok(0) => {
                    let error = io::Error::new(io::ErrorKind::WriteZero, "socket took no bytes");
                    return Err(LinkError::Write(FrameError::Io(error)));
                }
                Ok(count) => written += count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => return Err(LinkError::Write(FrameError::Io(error))),
            }
        }
        self.output.drain(..written);
        Ok(self.output.is_empty())
    }
}

/// `send(2)` with `MSG_DONTWAIT`: this call only, the socket stays blocking for the reader
/// and the writer thread (a file status flag would change it for both).
fn send_nonblocking(stream: &TcpStream, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: `send` reads at most `bytes.len()` bytes from `bytes.as_ptr()`, a live slice
    // borrowed for the call; the descriptor belongs to `stream`, open while it is borrowed.
    // MSG_NOSIGNAL: a closed peer is an EPIPE error, not a signal.
    let sent = unsafe {
        libc::send(
            stream.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}

/// A sender's own transmission on an idle link (no hand-off to the writer thread): seals
/// `frames` and writes them without blocking, under the link's lock `writer`. A write that
/// would block leaves the rest to the writer thread; a failed one ends the connection (its
/// messages are sent again on another link).
pub(crate) fn send_direct(
    shared: &SessionShared,
    slot: usize,
    connection: u64,
    writer: &mut LinkWriter,
    frames: Vec<OutFrame>,
) {
    if let Some(counters) = shared.counters(slot) {
        bump(&counters.direct_writes);
    }
    let result = writer
        .seal(shared, slot, frames)
        .and_then(|()| writer.write_nonblocking());
    match result {
        Ok(true) => {}
        Ok(false) => shared.wake_writers(),
        Err(error) => shared.connection_ended(slot, connection, &error),
    }
}

fn write_loop(
    shared: &SessionShared,
    slot: usize,
    connection: u64,
    writer: &Mutex<LinkWriter>,
) -> Result<(), LinkError> {
    while let Some((mut out, frames)) = shared.next_frames(slot, connection, writer) {
        out.seal(shared, slot, frames)?;
        out.write_blocking()?;
    }
    Ok(())
}
