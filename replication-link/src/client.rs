//! Client side: one supervisor thread per peer address keeps a connection up, reconnecting
//! with exponential backoff (`reconnect_min_ms` doubling to `reconnect_max_ms`).

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::handshake::{client_handshake, key_ids, random_nonce, HandshakeError};
use crate::header::{Hello, PROTOCOL_VERSION};
use crate::link::{run_connection, LinkError};
use crate::log_limit::error_chain;
use crate::session::CloseReason;
use crate::shared::{PeerHandshake, SessionShared};
use crate::stats::bump;

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("cannot connect")]
    Connect(#[source] io::Error),
    #[error("cannot configure the socket")]
    Socket(#[source] io::Error),
    #[error("handshake failed")]
    Handshake(#[source] HandshakeError),
    #[error("cannot attach the connection")]
    Attach(#[source] LinkError),
}

/// Starts one supervisor per address; they run until the session closes.
pub(crate) fn spawn_supervisors(
    shared: &Arc<SessionShared>,
    addresses: &[SocketAddr],
) -> io::Result<Vec<JoinHandle<()>>> {
    let mut handles = Vec::with_capacity(addresses.len());
    for (slot, address) in addresses.iter().copied().enumerate() {
        shared.set_address(slot, address);
        let thread_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name(format!("rl-link-{slot}"))
            .spawn(move || supervise(&thread_shared, slot, address));
        match spawned {
            Ok(handle) => handles.push(handle),
            Err(error) => {
                shared.close(CloseReason::Closed);
                for handle in handles {
                    let _ = handle.join();
                }
                return Err(error);
            }
        }
    }
    Ok(handles)
}

fn supervise(shared: &Arc<SessionShared>, slot: usize, address: SocketAddr) {
    let config = &shared.config;
    let mut delay_ms = config.reconnect_min_ms;
    // A connection still attached that the next one replaces (a key change).
    let mut replacing = None;
    loop {
        match connect_once(shared, slot, address, replacing.take()) {
            Ok(None) => delay_ms = config.reconnect_min_ms,
            Ok(Some(connection)) => {
                replacing = Some(connection);
                continue;
            }
            Err(error) if !shared.is_closed() => report(shared, slot, address, &error),
            Err(_) => {}
        }
        if !shared.wait_while_open(Duration::from_millis(delay_ms)) {
            break;
        }
        delay_ms = delay_ms.saturating_mul(2).min(config.reconnect_max_ms);
    }
}

fn report(shared: &SessionShared, slot: usize, address: SocketAddr, error: &ConnectError) {
    if let (ConnectError::Handshake(HandshakeError::AuthenticationFailed), Some(counters)) =
        (error, shared.counters(slot))
    {
        bump(&counters.auth_failures);
    }
    let text = error_chain(error);
    // The first of a run of identical failures is a warning, the rest are debug lines.
    if shared.record_error(slot, text.clone()) {
        shared.log.warn(format_args!(
            "session {:032x} ({}) link {} to {}: {}",
            shared.identity.session_id, shared.identity.service, slot, address, text
        ));
    } else {
        log::debug!("link {slot} to {address}: {text}");
    }
}

/// Connects, authenticates and runs one connection to its end. `Ok` once it was up;
/// `Ok(Some(id))` when it is to be replaced at once (a key change: it stays attached until
/// then). `replacing`: a connection this one replaces, ended once this one is attached
/// (or when this one cannot be made).
fn connect_once(
    shared: &Arc<SessionShared>,
    slot: usize,
    address: SocketAddr,
    replacing: Option<u64>,
) -> Result<Option<u64>, ConnectError> {
    let mut replacing = Replacing {
        shared,
        slot,
        connection: replacing,
    };
    let config = &shared.config;
    let timeout = Duration::from_millis(config.connect_timeout_ms);
    let stream = TcpStream::connect_timeout(&address, timeout).map_err(ConnectError::Connect)?;
    stream.set_nodelay(true).map_err(ConnectError::Socket)?;
    let abort_copy = stream.try_clone().map_err(ConnectError::Socket)?;
    if !shared.set_connecting(slot, Some(abort_copy)) {
        return Ok(None);
    }
    let ring = config.keys.keys();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        client_id: config.local_id.clone(),
        service: shared.identity.service.clone(),
        session_id: shared.identity.session_id,
        link: u8::try_from(slot).unwrap_or(u8::MAX),
        client_nonce: random_nonce().map_err(ConnectError::Handshake)?,
        send_base: shared.acked_up_to(),
        limits: config.receive_limits(),
        key_ids: key_ids(&ring),
        protection: config.protection,
    };
    let result = client_handshake(&stream, &ring, &hello, config.handshake_timeout());
    shared.set_connecting(slot, None);
    let (params, keys) = result.map_err(ConnectError::Handshake)?;
    let key_id = params.key_id;
    let peer = PeerHandshake {
        id: params.server_id,
        instance: params.instance,
        send_base: params.send_base,
        limits: params.limits,
        address: Some(address),
        local_address: stream.local_addr().ok(),
        key_id,
    };
    let connection = shared
        .attach(slot, &stream, peer)
        .map_err(ConnectError::Attach)?;
    replacing.end();
    log::info!(
        "session {:032x} ({}) link {} to {} up",
        shared.identity.session_id,
        shared.identity.service,
        slot,
        address
    );
    match run_connection(shared, slot, connection, stream, keys, key_id) {
        LinkError::Rekey(_) => Ok(Some(connection)),
        _ => Ok(None),
    }
}

/// The connection a new one replaces: ended when the new one is attached (no link down:
/// the slot holds the new one), or when the new one fails (the link goes down).
struct Replacing<'a> {
    shared: &'a SessionShared,
    slot: usize,
    connection: Option<u64>,
}

impl Replacing<'_> {
    fn end(&mut self) {
        if let Some(connection) = self.connection.take() {
            let ended = LinkError::Rekey(crate::link::RekeyCause::Retired);
            self.shared.connection_ended(self.slot, connection, &ended);
        }
    }
}

impl Drop for Replacing<'_> {
    fn drop(&mut self) {
        self.end();
    }
}
