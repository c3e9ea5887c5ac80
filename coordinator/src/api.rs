//! The control API over TCP (`[host] api_listen`): the control socket's requests and replies
//! (`daemon::control`), for a client on another host such as the web console `ftvm-web`.
//!
//! It runs on the replication link (`replication_link`), the A-links' own transport: the
//! client proves the API key (`[host] api_key_file`, `api.psk` of `ftvm keygen`) in a
//! challenge-response handshake in which the secret never crosses the wire, and everything
//! after it is AES-256-GCM under keys of that connection, so a request cannot be read,
//! forged, replayed or reflected. A client that fails the handshake is refused before it
//! can send a request, counted and logged (rate-limited) by the listener; handshakes in
//! progress are capped per source. The same key file rotates like the pair's key (a
//! `FILE.previous` is accepted too).
//!
//! A message carries an [`ApiHeader`] (postcard) with the request's number, and the JSON
//! of a `control::Request` (client to ftvmd) or `control::Reply` (ftvmd to client) as its
//! payload, at most [`MAX_MESSAGE_BYTES`]. The replies of one session come back in any
//! order, matched by number: a long request does not hold up a status.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use daemon_util::lock;
use log::{debug, info, warn};
use replication_link::{KeyRing, LinkConfig, LinkListener, ListenerEvent, Session, SessionError};
use serde::{Deserialize, Serialize};

use crate::daemon::control::{Pending, Reply, Request};

/// The link service the API is offered as.
pub const SERVICE: &str = "ftvm-api";
/// Largest request or reply (JSON), in bytes: a status of many VMs fits many times over.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// How long ftvmd waits for its main loop's answer, as on the control socket.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// A server session whose client was not heard for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The application header of every API message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiHeader {
    /// Chosen by the client; a reply carries its request's.
    pub request: u64,
}

fn key_ring(key_file: &Path) -> Result<KeyRing, String> {
    KeyRing::from_file(key_file).map_err(|error| {
        format!(
            "cannot read the API key {}: {}",
            key_file.display(),
            replication_link::error_chain(&error)
        )
    })
}

/// Serves the API on `listen` (1 or 2 addresses) for clients that hold `key_file`;
/// requests go to the main loop through `requests`, as the control socket's do.
pub fn serve(
    listen: Vec<SocketAddr>,
    key_file: &Path,
    host: &str,
    requests: Sender<Pending>,
) -> Result<(), String> {
    let mut config = LinkConfig::new(key_ring(key_file)?, host);
    config.allowed_services = Some(vec![SERVICE.to_owned()]);
    let addresses = listen.clone();
    let listener = LinkListener::bind(listen, config).map_err(|error| {
        format!(
            "cannot serve the API on {addresses:?}: {}",
            replication_link::error_chain(&error)
        )
    })?;
    info!("control API on {addresses:?} (replication link, service {SERVICE})");
    thread::Builder::new()
        .name("api-listener".into())
        .spawn(move || loop {
            let session = match listener.next_event(Duration::from_secs(3600)) {
                Some(ListenerEvent::NewSession(session)) => session,
                Some(ListenerEvent::PeerRestarted { session, .. }) => session,
                None => continue,
            };
            info!(
                "API client {} connected",
                session.peer_id().unwrap_or_else(|| "?".into())
            );
            let requests = requests.clone();
            let spawned = thread::Builder::new()
                .name("api-session".into())
                .spawn(move || serve_session(&Arc::new(session), &requests));
            if let Err(error) = spawned {
                warn!("API: cannot start a thread for a client: {error}");
            }
        })
        .map(|_| ())
        .map_err(|error| format!("cannot start a thread: {error}"))
}

/// Answers one client's requests until it goes away; each request on a thread of its own.
fn serve_session(session: &Arc<Session>, requests: &Sender<Pending>) {
    let client = session.peer_id().unwrap_or_else(|| "?".into());
    let mut heard = Instant::now();
    loop {
        let message = match session.recv(Duration::from_secs(1)) {
            Ok(Some(message)) => message,
            Ok(None) => {
                if session.peer_reachable() {
                    heard = Instant::now();
                } else if heard.elapsed() > IDLE_TIMEOUT {
                    info!("API client {client}: not heard for {IDLE_TIMEOUT:?}, closed");
                    session.close();
                    return;
                }
                continue;
            }
            Err(error) => {
                info!("API client {client}: {error}");
                return;
            }
        };
        heard = Instant::now();
        let header = match message.header::<ApiHeader>() {
            Ok(header) => header,
            Err(error) => {
                warn!("API client {client}: malformed header ({error}); session closed");
                session.close();
                return;
            }
        };
        let reply = |reply: Reply| send_reply(session, header, &reply);
        let request = match serde_json::from_slice::<Request>(&message.payload) {
            Ok(request) => request,
            Err(error) => {
                reply(Reply::Error(format!("malformed request: {error}")));
                continue;
            }
        };
        if matches!(request, Request::Snapshot { .. }) {
            reply(Reply::Error(
                "snapshot is not offered over the API: use ftvm snapshot on the host".into(),
            ));
            continue;
        }
        let (session, requests) = (Arc::clone(session), requests.clone());
        let spawned = thread::Builder::new()
            .name("api-request".into())
            .spawn(move || {
                let (answer, answered) = mpsc::channel();
                let reply = if requests.send((request, answer)).is_err() {
                    Reply::Error("ftvmd is stopping".into())
                } else {
                    answered
                        .recv_timeout(ANSWER_TIMEOUT)
                        .unwrap_or_else(|_| Reply::Error("ftvmd did not answer in time".into()))
                };
                send_reply(&session, header, &reply);
            });
        if let Err(error) = spawned {
            reply(Reply::Error(format!("cannot start a thread: {error}")));
        }
    }
}

fn send_reply(session: &Session, header: ApiHeader, reply: &Reply) {
    let payload = match serde_json::to_vec(reply) {
        Ok(payload) if payload.len() <= MAX_MESSAGE_BYTES => payload,
        Ok(payload) => serde_json::to_vec(&Reply::Error(format!(
            "the reply ({} bytes) exceeds the API's {MAX_MESSAGE_BYTES}",
            payload.len()
        )))
        .unwrap_or_default(),
        Err(error) => {
            warn!("API: cannot encode a reply: {error}");
            return;
        }
    };
    if let Err(error) = session.send_typed(&header, payload) {
        debug!("API: reply {} not sent: {error}", header.request);
    }
}

/// The client side: one session with one host's ftvmd, shared by any number of threads;
/// it reconnects by itself when the host or the network comes back.
pub struct ApiClient {
    session: Arc<Session>,
    shared: Arc<ClientShared>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ApiClient")
            .field("service", &self.session.service())
            .finish()
    }
}

#[derive(Default)]
struct ClientShared {
    next: Mutex<u64>,
    waiting: Mutex<HashMap<u64, Sender<Reply>>>,
}

impl ApiClient {
    /// Starts a session with the ftvmd at `addresses` (1 or 2, like A-links), as
    /// `client_id` (the name its log shows), proving the key of `key_file`.
    pub fn connect(
        addresses: Vec<SocketAddr>,
        key_file: &Path,
        client_id: &str,
    ) -> Result<ApiClient, String> {
        let config = LinkConfig::new(key_ring(key_file)?, client_id);
        let session = Session::connect(addresses.clone(), SERVICE, config).map_err(|error| {
            format!(
                "cannot start the API session with {addresses:?}: {}",
                replication_link::error_chain(&error)
            )
        })?;
        let session = Arc::new(session);
        let shared = Arc::new(ClientShared::default());
        let (reader, readers) = (Arc::clone(&session), Arc::clone(&shared));
        thread::Builder::new()
            .name("api-client".into())
            .spawn(move || read_replies(&reader, &readers))
            .map_err(|error| format!("cannot start a thread: {error}"))?;
        Ok(ApiClient { session, shared })
    }

    /// The host answers now (some link authenticated and heard from).
    pub fn reachable(&self) -> bool {
        self.session.peer_reachable()
    }

    /// Sends `request` and waits up to `timeout` for its reply.
    pub fn request(&self, request: &Request, timeout: Duration) -> Result<Reply, String> {
        if !self.session.peer_reachable() {
            return Err("not connected (host down, network cut, or wrong API key)".into());
        }
        let number = {
            let mut next = lock(&self.shared.next);
            *next += 1;
            *next
        };
        let (answer, answered) = mpsc::channel();
        lock(&self.shared.waiting).insert(number, answer);
        let payload = serde_json::to_vec(request).map_err(|error| error.to_string())?;
        let header = ApiHeader { request: number };
        let sent = self
            .session
            .send_timeout(
                &postcard::to_allocvec(&header).map_err(|error| error.to_string())?,
                payload,
                timeout,
            )
            .map_err(|error| format!("cannot send: {error}"));
        let result = sent.and_then(|_| {
            answered
                .recv_timeout(timeout)
                .map_err(|_| format!("no answer within {} s", timeout.as_secs_f32()))
        });
        lock(&self.shared.waiting).remove(&number);
        result
    }
}

impl Drop for ApiClient {
    fn drop(&mut self) {
        self.session.close();
    }
}

fn read_replies(session: &Session, shared: &ClientShared) {
    loop {
        match session.recv(Duration::from_secs(1)) {
            Ok(Some(message)) => {
                let Ok(header) = message.header::<ApiHeader>() else {
                    warn!("API: a reply with a malformed header, ignored");
                    continue;
                };
                let reply = match serde_json::from_slice::<Reply>(&message.payload) {
                    Ok(reply) => reply,
                    Err(error) => Reply::Error(format!("reply not understood: {error}")),
                };
                if let Some(waiting) = lock(&shared.waiting).remove(&header.request) {
                    let _ = waiting.send(reply);
                }
            }
            Ok(None) => {}
            Err(SessionError::Closed { .. }) => return,
            Err(error) => {
                debug!("API client: {error}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write key");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        path
    }

    /// A main loop that answers `status` with an error naming it, and a slow `failover`.
    fn main_loop() -> Sender<Pending> {
        let (sender, receiver) = mpsc::channel::<Pending>();
        thread::spawn(move || {
            for (request, answer) in receiver {
                thread::spawn(move || {
                    let reply = match request {
                        Request::Failover { vm } => {
                            thread::sleep(Duration::from_secs(3));
                            Reply::Done(format!("{vm} handed over"))
                        }
                        other => Reply::Error(format!("{other:?}")),
                    };
                    let _ = answer.send(reply);
                });
            }
        });
        sender
    }

    fn free_address() -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address")
    }

    #[test]
    fn requests_and_replies_cross_and_a_wrong_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = key(
            dir.path(),
            "api.psk",
            "the API key of this pair, 0123456789\n",
        );
        let bad = key(
            dir.path(),
            "other.psk",
            "another key altogether, 0123456789\n",
        );
        let address = free_address();
        serve(vec![address], &good, "hostA", main_loop()).expect("serve");
        let client = ApiClient::connect(vec![address], &good, "console").expect("connect");
        let timeout = Duration::from_secs(10);
        let deadline = Instant::now() + timeout;
        while !client.reachable() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        // A slow request does not hold up another: the status comes back first.
        let client = Arc::new(client);
        let slow = thread::spawn({
            let client = Arc::clone(&client);
            move || client.request(&Request::Failover { vm: "vm1".into() }, timeout)
        });
        assert_eq!(
            client.request(&Request::Status, timeout),
            Ok(Reply::Error("Status".into()))
        );
        assert!(!slow.is_finished(), "the status waited for the failover");
        assert_eq!(
            slow.join().expect("slow request"),
            Ok(Reply::Done("vm1 handed over".into()))
        );
        let snapshot = Request::Snapshot {
            vm: "vm1".into(),
            snapshot: crate::daemon::control::SnapshotCommand::List,
        };
        assert!(matches!(
            client.request(&snapshot, timeout),
            Ok(Reply::Error(text)) if text.contains("not offered")
        ));

        let intruder = ApiClient::connect(vec![address], &bad, "intruder").expect("connect");
        thread::sleep(Duration::from_millis(500));
        assert!(!intruder.reachable());
        let refused = intruder
            .request(&Request::Status, Duration::from_millis(200))
            .expect_err("a client with another key is refused");
        assert!(refused.contains("not connected"), "{refused}");
    }
}
