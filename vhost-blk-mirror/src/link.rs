//! The replication link as the mirror sees it: adapts `replication_link` sessions to the
//! mirror's [`Transport`] (client side for a primary, listening side for a secondary).

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use log::{info, warn};
use replication_link::{
    Delivery, KeyRing, LinkConfig, LinkListener, ListenerEvent, Psk, Session, SessionEvent,
};
use thiserror::Error;

use crate::mirror::primary::Connector;
use crate::mirror::protocol::{
    payload_crc32c, InlineHandler, Message, Payload, Received, Replier, Transport,
};
use crate::replication::{LinkEncryption, ReplicationConfig};

#[derive(Debug, Error)]
pub enum LinkSetupError {
    #[error("cannot read the pre-shared key")]
    Psk(#[source] replication_link::KeyRingError),
    #[error("cannot listen for the primary on {addresses:?}")]
    Listen {
        addresses: Vec<SocketAddr>,
        #[source]
        source: replication_link::ListenerError,
    },
}

/// Everything needed to open link sessions.
#[derive(Clone, Debug)]
pub struct LinkSettings {
    config: LinkConfig,
    peers: Vec<SocketAddr>,
    listen: Vec<SocketAddr>,
    service: String,
}

impl LinkSettings {
    pub fn from_config(config: &ReplicationConfig) -> Result<LinkSettings, LinkSetupError> {
        let psk = match &config.psk_file {
            // The pair's key and, while it exists, the previous one (key rotation); the
            // ring follows both files while the daemon runs.
            Some(path) => KeyRing::from_file(path).map_err(LinkSetupError::Psk)?,
            None => Psk::from_bytes(b"standalone: no peer, no key")
                .map_err(|error| LinkSetupError::Psk(error.into()))?
                .into(),
        };
        if config.link_encryption == LinkEncryption::Off {
            warn!(
                "LINK ENCRYPTION IS OFF (--link-encryption off): the guest's disk data crosses \
                 the A-links in clear, readable by anyone on them (frames are still \
                 authenticated). For measurements and trusted links only."
            );
        }
        Ok(LinkSettings {
            config: LinkConfig {
                protection: config.link_encryption.protection(),
                ..LinkConfig::new(psk, config.host_id.clone())
            },
            peers: config.peers.clone(),
            listen: config.listen.clone(),
            service: config.service.clone(),
        })
    }
}

fn to_io(error: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(error)
}

fn decode(message: replication_link::Message) -> io::Result<Received> {
    let header: Message = message.header().map_err(|error| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad mirror message: {error}"),
        )
    })?;
    let payload = Payload {
        bytes: message.payload,
        checked_crc32c: Some(message.payload_crc32c),
    };
    Ok(Received::Message(header, payload))
}

fn log_link_events(events: Vec<SessionEvent>) -> bool {
    let mut restarted = false;
    for event in events {
        match event {
            SessionEvent::LinkUp { link, address } => info!("A-link {link} up ({address:?})"),
            SessionEvent::LinkDown {
                link,
                address,
                error,
            } => warn!("A-link {link} down ({address:?}): {error}"),
            SessionEvent::PeerRestarted { .. } => restarted = true,
        }
    }
    restarted
}

/// A primary's session to its secondary.
struct ClientTransport {
    session: Session,
}

/// A primary waits as long as it takes for room in the send window: a full window means the
/// peer is not acknowledging, and then completions are held anyway. Giving up would drop a
/// write from the session and leave its request held forever; closing the session (on
/// `continue-degraded` or `fence`) ends the wait.
const SEND_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

impl Transport for ClientTransport {
    fn send(&self, message: &Message, payload: Vec<u8>) -> io::Result<()> {
        let header = postcard::to_allocvec(message).map_err(to_io)?;
        let crc32c = payload_crc32c(message, &payload);
        self.session
            .send_with_crc32c(&header, payload, crc32c, SEND_WAIT)
            .map(|_| ())
            .map_err(to_io)
    }

    fn recv(&self, timeout: Duration) -> io::Result<Option<Received>> {
        if log_link_events(self.session.take_events()) {
            return Ok(Some(Received::PeerRestarted));
        }
        match self.session.recv(timeout).map_err(to_io)? {
            Some(message) => decode(message).map(Some),
            None => Ok(None),
        }
    }

    fn peer_reachable(&self) -> bool {
        self.session.peer_reachable()
    }

    fn links(&self) -> serde_json::Value {
        serde_json::to_value(self.session.stats()).unwrap_or_default()
    }

    fn close(&self) {
        self.session.close();
    }

    fn set_inline_handler(&self, inline: fn(&Message) -> bool, handler: InlineHandler) {
        self.session
            .set_inline_handler(Box::new(move |message: replication_link::Message| {
                match message.header::<Message>() {
                    Ok(header) if inline(&header) => {
                        let payload = Payload {
                            bytes: message.payload,
                            checked_crc32c: Some(message.payload_crc32c),
                        };
                        handler(header, payload);
                        Delivery::Handled
                    }
                    // `recv` reports what does not decode.
                    _ => Delivery::Defer(message),
                }
            }));
    }
}

/// Opens a fresh session to the secondary each time it is called.
pub fn connector(settings: &LinkSettings) -> Connector {
    let settings = settings.clone();
    Box::new(move || {
        let session = Session::connect(
            settings.peers.clone(),
            &settings.service,
            settings.config.clone(),
        )
        .map_err(to_io)?;
        Ok(Arc::new(ClientTransport { session }) as Arc<dyn Transport>)
    })
}

/// A secondary's listener: the current primary's session, replaced when a new one arrives.
struct ListenerTransport {
    listener: LinkListener,
    session: Mutex<Option<Arc<Session>>>,
}

impl ListenerTransport {
    fn current(&self) -> MutexGuard<'_, Option<Arc<Session>>> {
        self.session.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Sends `message` on `session`, waiting as long as it takes for window space (same
/// reasoning as the primary's: a lost answer would hold the primary's request).
fn send_on(session: &Session, message: &Message, payload: Vec<u8>) -> io::Result<()> {
    let header = postcard::to_allocvec(message).map_err(to_io)?;
    let crc32c = payload_crc32c(message, &payload);
    session
        .send_with_crc32c(&header, payload, crc32c, SEND_WAIT)
        .map(|_| ())
        .map_err(to_io)
}

impl Transport for ListenerTransport {
    fn send(&self, message: &Message, payload: Vec<u8>) -> io::Result<()> {
        // Not under the lock: the send may wait for window space.
        let session = self
            .current()
            .clone()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no primary connected"))?;
        send_on(&session, message, payload)
    }

    fn session_replier(&self) -> Option<Replier> {
        let session = self.current().clone()?;
        Some(Box::new(move |message: &Message| {
            send_on(&session, message, Vec::new())
        }))
    }

    fn recv(&self, timeout: Duration) -> io::Result<Option<Received>> {
        // With no primary yet, wait for one; with one, only look for a newer session.
        let wait = if self.current().is_some() {
            Duration::ZERO
        } else {
            timeout
        };
        if let Some(event) = self.listener.next_event(wait) {
            let (ListenerEvent::NewSession(session) | ListenerEvent::PeerRestarted { session, .. }) =
                event;
            info!("primary {:?} connected (new session)", session.peer_id());
            if let Some(old) = self.current().replace(Arc::new(session)) {
                old.close();
            }
            return Ok(Some(Received::PeerRestarted));
        }
        let Some(session) = self.current().clone() else {
            return Ok(None);
        };
        log_link_events(session.take_events());
        match session.recv(timeout) {
            Ok(Some(message)) => decode(message).map(Some),
            Ok(None) => Ok(None),
            Err(error) => Err(to_io(error)),
        }
    }

    fn peer_reachable(&self) -> bool {
        self.current()
            .as_ref()
            .is_some_and(|session| session.peer_reachable())
    }

    fn links(&self) -> serde_json::Value {
        let session = self
            .current()
            .as_ref()
            .map(|session| serde_json::to_value(session.stats()).unwrap_or_default());
        serde_json::json!({
            "listener": serde_json::to_value(self.listener.stats()).unwrap_or_default(),
            "session": session,
        })
    }

    fn close(&self) {
        if let Some(session) = self.current().take() {
            session.close();
        }
        self.listener.close();
    }
}

/// Listens for the primary on the configured addresses.
pub fn listen(settings: &LinkSettings) -> io::Result<Arc<dyn Transport>> {
    // Only this disk's primary: the pair key alone must not let another disk's write here.
    let mut config = settings.config.clone();
    config.allowed_services = Some(vec![settings.service.clone()]);
    let listener = LinkListener::bind(settings.listen.clone(), config).map_err(|source| {
        to_io(LinkSetupError::Listen {
            addresses: settings.listen.clone(),
            source,
        })
    })?;
    Ok(Arc::new(ListenerTransport {
        listener,
        session: Mutex::new(None),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(service: &str, listen: Vec<SocketAddr>, peers: Vec<SocketAddr>) -> LinkSettings {
        let psk = Psk::from_bytes(b"one pair key for every disk....").expect("psk");
        LinkSettings {
            config: LinkConfig::new(psk, "host-a"),
            peers,
            listen,
            service: service.into(),
        }
    }

    #[test]
    fn a_secondary_refuses_another_disks_primary_with_the_same_key() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = free.local_addr().expect("address");
        drop(free);
        let secondary = listen(&settings("blk:vm1-disk0", vec![address], vec![])).expect("listen");
        let other =
            connector(&settings("blk:vm2-disk0", vec![], vec![address]))().expect("connect");
        let stranger = Duration::from_millis(500);
        assert!(
            secondary.recv(stranger).expect("recv").is_none(),
            "no session"
        );
        assert!(!other.peer_reachable());
        let own = connector(&settings("blk:vm1-disk0", vec![], vec![address]))().expect("connect");
        let arrived = secondary.recv(Duration::from_secs(10)).expect("recv");
        assert!(
            matches!(arrived, Some(Received::PeerRestarted)),
            "own primary"
        );
        for transport in [other, own, secondary] {
            transport.close();
        }
    }
}
