//! Shared helpers of the integration tests, beyond the workspace's test framework
//! (`daemon_util::test_support`): fast configurations, waits at the link's pace, and a TCP
//! relay that can cut, black-hole, tamper with, replay or reorder traffic, and captures it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use daemon_util::test_support::Wait;
use replication_link::{LinkConfig, LinkListener, ListenerEvent, Message, Psk, Session};

pub const LONG: Duration = Duration::from_secs(10);

pub fn psk() -> Psk {
    Psk::from_bytes(b"test pre-shared key, 32 bytes!!\n").expect("psk")
}

/// Short timers so that failures are detected in tens of milliseconds.
pub fn config(local_id: &str) -> LinkConfig {
    let _ = env_logger::builder().is_test(true).try_init();
    let mut config = LinkConfig::new(psk(), local_id);
    config.heartbeat_interval_ms = 20;
    config.link_timeout_ms = 250;
    config.handshake_timeout_ms = 500;
    config.connect_timeout_ms = 500;
    config.reconnect_min_ms = 5;
    config.reconnect_max_ms = 50;
    config.send_timeout_ms = 10_000;
    config
}

pub fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub fn listener(links: usize, config: LinkConfig) -> LinkListener {
    LinkListener::bind(vec![loopback(); links], config).expect("bind")
}

/// The next session the listener announces (new or restarted).
pub fn accept(listener: &LinkListener) -> Session {
    match listener.next_event(LONG).expect("a session within 10 s") {
        ListenerEvent::NewSession(session) => session,
        ListenerEvent::PeerRestarted { session, .. } => session,
    }
}

/// A listener on `links` loopback addresses, a client session of `service` to it (host-a to
/// host-b) and the server's side of that session.
pub fn connected(links: usize, service: &str) -> (LinkListener, Session, Session) {
    let listener = listener(links, config("host-b"));
    let client = Session::connect(listener.local_addrs().to_vec(), service, config("host-a"))
        .expect("connect");
    let server = accept(&listener);
    (listener, client, server)
}

/// A wait of at most `timeout` that looks every 2 ms: the links' timers run in tens of
/// milliseconds, and some tests measure how fast a change is seen.
pub fn within(timeout: Duration) -> Wait {
    Wait::up_to(timeout).every(Duration::from_millis(2))
}

pub fn recv_one(session: &Session) -> Message {
    session
        .recv(LONG)
        .expect("session open")
        .expect("a message within 10 s")
}

/// Payload whose content identifies message `index`.
pub fn payload(index: u64, length: usize) -> Vec<u8> {
    let mut bytes = index.to_le_bytes().repeat(length / 8 + 1);
    bytes.truncate(length);
    bytes
}

/// `count` links are authenticated and heard from.
pub fn links_up(session: &Session, count: usize) -> bool {
    session.stats().links.iter().filter(|link| link.up).count() == count
}

/// What a relay does to the client-to-server stream once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Flip the last body byte of the first frame with a body above 1000 bytes.
    FlipPayloadByte,
    /// Send the first frame with a body above 1000 bytes twice.
    DuplicateFrame,
    /// Send the first frame with a body above 1000 bytes after the frame that follows it.
    SwapFrames,
}

/// Most bytes a relay keeps of what it forwards.
const CAPTURE_LIMIT_BYTES: usize = 16 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    /// New connections are accepted and closed at once.
    Refuse,
    /// New connections stay open but carry nothing.
    BlackHole,
}

struct RelayConnection {
    client: TcpStream,
    server: TcpStream,
    frozen: Arc<AtomicBool>,
}

struct RelayShared {
    target: SocketAddr,
    mode: Mutex<Mode>,
    stop: AtomicBool,
    connections: Mutex<Vec<RelayConnection>>,
    pumps: Mutex<Vec<JoinHandle<()>>>,
    fault: Mutex<Option<Fault>>,
    fault_applied: AtomicBool,
    /// What it forwarded in both directions, up to `CAPTURE_LIMIT_BYTES`.
    captured: Mutex<Vec<u8>>,
}

/// A man in the middle between a client and a listener address.
pub struct Relay {
    address: SocketAddr,
    shared: Arc<RelayShared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl Relay {
    pub fn start(target: SocketAddr) -> Relay {
        let socket = TcpListener::bind(loopback()).expect("relay bind");
        let address = socket.local_addr().expect("relay address");
        let shared = Arc::new(RelayShared {
            target,
            mode: Mutex::new(Mode::Forward),
            stop: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
            pumps: Mutex::new(Vec::new()),
            fault: Mutex::new(None),
            fault_applied: AtomicBool::new(false),
            captured: Mutex::new(Vec::new()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::spawn(move || relay_accept(&accept_shared, socket));
        Relay {
            address,
            shared,
            accept_thread: Some(accept_thread),
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Cuts every connection and refuses new ones (a link that is down).
    pub fn kill(&self) {
        *self.shared.mode.lock().expect("mode") = Mode::Refuse;
        for connection in self
            .shared
            .connections
            .lock()
            .expect("connections")
            .drain(..)
        {
            let _ = connection.client.shutdown(Shutdown::Both);
            let _ = connection.server.shutdown(Shutdown::Both);
        }
    }

    /// Keeps every connection open but silently drops all bytes (a link that went silent).
    pub fn freeze(&self) {
        *self.shared.mode.lock().expect("mode") = Mode::BlackHole;
        for connection in self.shared.connections.lock().expect("connections").iter() {
            connection.frozen.store(true, Ordering::SeqCst);
        }
    }

    /// New connections are forwarded again (frozen ones stay frozen).
    pub fn restore(&self) {
        *self.shared.mode.lock().expect("mode") = Mode::Forward;
    }

    pub fn inject(&self, fault: Fault) {
        *self.shared.fault.lock().expect("fault") = Some(fault);
    }

    pub fn fault_applied(&self) -> bool {
        self.shared.fault_applied.load(Ordering::SeqCst)
    }

    /// The bytes forwarded so far, both directions, as they crossed.
    pub fn captured(&self) -> Vec<u8> {
        self.shared.captured.lock().expect("captured").clone()
    }
}

impl RelayShared {
    /// Forwards `bytes` and keeps a copy.
    fn forward(&self, to: &mut TcpStream, bytes: &[u8]) -> bool {
        let mut captured = self.captured.lock().expect("captured");
        let room = CAPTURE_LIMIT_BYTES.saturating_sub(captured.len());
        captured.extend_from_slice(&bytes[..bytes.len().min(room)]);
        drop(captured);
        to.write_all(bytes).is_ok()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.address);
        if let Some(handle) = self.accept_thread.take() {
            let _ = handle.join();
        }
        self.kill();
        let pumps: Vec<_> = self.shared.pumps.lock().expect("pumps").drain(..).collect();
        for pump in pumps {
            let _ = pump.join();
        }
    }
}

fn relay_accept(shared: &Arc<RelayShared>, socket: TcpListener) {
    for incoming in socket.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = incoming else { continue };
        let mode = *shared.mode.lock().expect("mode");
        if mode == Mode::Refuse {
            continue;
        }
        let Ok(server) = TcpStream::connect(shared.target) else {
            continue;
        };
        let frozen = Arc::new(AtomicBool::new(mode == Mode::BlackHole));
        let streams = (|| Some((client.try_clone().ok()?, server.try_clone().ok()?)))();
        let Some((client_copy, server_copy)) = streams else {
            continue;
        };
        shared
            .connections
            .lock()
            .expect("connections")
            .push(RelayConnection {
                client: client_copy,
                server: server_copy,
                frozen: Arc::clone(&frozen),
            });
        let upstream = (
            client.try_clone().expect("clone"),
            server.try_clone().expect("clone"),
        );
        let pump_shared = Arc::clone(shared);
        let up_frozen = Arc::clone(&frozen);
        let up =
            thread::spawn(move || pump_frames(&pump_shared, upstream.0, upstream.1, &up_frozen));
        let down_shared = Arc::clone(shared);
        let down = thread::spawn(move || pump_bytes(&down_shared, server, client, &frozen));
        shared.pumps.lock().expect("pumps").extend([up, down]);
    }
}

/// Server to client: bytes as they come.
fn pump_bytes(shared: &RelayShared, mut from: TcpStream, mut to: TcpStream, frozen: &AtomicBool) {
    let mut buffer = vec![0u8; 64 * 1024];
    while let Ok(read) = from.read(&mut buffer) {
        if read == 0 {
            break;
        }
        if frozen.load(Ordering::SeqCst) {
            continue;
        }
        if !shared.forward(&mut to, &buffer[..read]) {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Client to server: frame by frame, so that a fault hits exactly one frame.
fn pump_frames(shared: &RelayShared, mut from: TcpStream, mut to: TcpStream, frozen: &AtomicBool) {
    let mut held: Option<Vec<u8>> = None;
    loop {
        let mut prefix = [0u8; 4];
        if from.read_exact(&mut prefix).is_err() {
            break;
        }
        let body_length = u32::from_le_bytes(prefix) as usize;
        let mut frame = prefix.to_vec();
        frame.resize(4 + body_length + 16, 0);
        if from.read_exact(&mut frame[4..]).is_err() {
            break;
        }
        if frozen.load(Ordering::SeqCst) {
            continue;
        }
        let mut copies = 1;
        if body_length > 1000 {
            let fault = shared.fault.lock().expect("fault").take();
            match fault {
                Some(Fault::FlipPayloadByte) => frame[4 + body_length - 1] ^= 0x01,
                Some(Fault::DuplicateFrame) => copies = 2,
                Some(Fault::SwapFrames) => {
                    held = Some(frame);
                    continue;
                }
                None => {}
            }
            if fault.is_some() {
                shared.fault_applied.store(true, Ordering::SeqCst);
            }
        }
        let ok = (0..copies).all(|_| shared.forward(&mut to, &frame));
        if !ok {
            break;
        }
        if let Some(held) = held.take() {
            shared.fault_applied.store(true, Ordering::SeqCst);
            if !shared.forward(&mut to, &held) {
                break;
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
