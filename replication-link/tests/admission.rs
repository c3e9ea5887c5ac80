//! Limits before authentication: slow connections cannot keep the real peer out, and a
//! listener serves only its services and client ids.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use replication_link::frame::Direction;
use replication_link::handshake_frame::encode_handshake_frame;
use replication_link::header::{Hello, LinkHeader, LinkLimits};
use replication_link::{LinkConfig, LinkListener, ListenerEvent, Psk, Session};
use support::{accept, config, listener, recv_one, within, LONG};

const FLOOD_CONNECTIONS: usize = 64;
/// Just under the default `handshake_timeout_ms` (2000): a timeout per read never fires.
const FLOOD_BYTE_INTERVAL: Duration = Duration::from_millis(1900);
/// How long the real peer may take to connect during the flood.
const CONNECT_LIMIT: Duration = Duration::from_secs(1);

/// `FLOOD_CONNECTIONS` connections that each send one byte of a valid hello every
/// `FLOOD_BYTE_INTERVAL`, reconnecting at once when the listener closes them. Stopped and
/// joined on drop (the sockets close with the thread).
struct SlowFlood {
    stop: Arc<AtomicBool>,
    connects: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl SlowFlood {
    fn start(target: SocketAddr) -> SlowFlood {
        let stop = Arc::new(AtomicBool::new(false));
        let connects = Arc::new(AtomicU64::new(0));
        let (thread_stop, thread_connects) = (Arc::clone(&stop), Arc::clone(&connects));
        let thread = thread::Builder::new()
            .name("slow-flood".into())
            .spawn(move || flood(target, &thread_stop, &thread_connects))
            .expect("flood thread");
        SlowFlood {
            stop,
            connects,
            thread: Some(thread),
        }
    }

    fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }
}

impl Drop for SlowFlood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn hello_frame() -> Vec<u8> {
    let hello = LinkHeader::Hello(Hello {
        protocol_version: replication_link::header::PROTOCOL_VERSION,
        client_id: "slow".into(),
        service: "blk:slow".into(),
        session_id: 7,
        link: 0,
        client_nonce: [3; 32],
        send_base: 0,
        limits: LinkLimits {
            window_messages: 16,
            window_bytes: 1 << 20,
            max_frame_bytes: replication_link::DEFAULT_MAX_FRAME_BYTES as u32,
        },
        key_ids: vec![support::psk().id()],
        protection: replication_link::FrameProtection::Encrypted,
    });
    encode_handshake_frame(&hello, Direction::ClientToServer, 0).expect("encode")
}

/// A flood connection and how many bytes of the hello it sent.
struct Slow {
    stream: Option<TcpStream>,
    sent: usize,
}

/// Whether the listener closed `stream` (a non-blocking read sees the end or an error).
fn closed_by_peer(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 64];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(error) => error.kind() != ErrorKind::WouldBlock,
    }
}

fn flood(target: SocketAddr, stop: &AtomicBool, connects: &AtomicU64) {
    let frame = hello_frame();
    let mut slow: Vec<Slow> = (0..FLOOD_CONNECTIONS)
        .map(|_| Slow {
            stream: None,
            sent: 0,
        })
        .collect();
    while !stop.load(Ordering::SeqCst) {
        let tick = Instant::now();
        for connection in &mut slow {
            let alive = connection
                .stream
                .as_mut()
                .is_some_and(|stream| !closed_by_peer(stream));
            if !alive {
                connection.stream = TcpStream::connect_timeout(&target, Duration::from_secs(1))
                    .ok()
                    .filter(|stream| stream.set_nonblocking(true).is_ok());
                connection.sent = 0;
                connects.fetch_add(1, Ordering::Relaxed);
            }
            let byte = frame.get(connection.sent..=connection.sent);
            if let (Some(stream), Some(byte)) = (connection.stream.as_mut(), byte) {
                if stream.write(byte).is_ok() {
                    connection.sent += 1;
                }
            }
        }
        while !stop.load(Ordering::SeqCst) && tick.elapsed() < FLOOD_BYTE_INTERVAL {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A listener with the default handshake timeout, so that the flood's byte interval stays
/// under it.
fn flooded_listener(mut config: LinkConfig) -> LinkListener {
    config.handshake_timeout_ms = LinkConfig::new(support::psk(), "x").handshake_timeout_ms;
    assert!(Duration::from_millis(config.handshake_timeout_ms) > FLOOD_BYTE_INTERVAL);
    listener(1, config)
}

/// Connects the real peer `rounds` times during the flood, spread over more than one
/// handshake timeout; returns each time from `connect` to an announced session with its
/// link up on both sides.
fn connect_times(listener: &LinkListener, client: &LinkConfig, rounds: u32) -> Vec<Duration> {
    let address = listener.local_addrs()[0];
    let mut times = Vec::new();
    for round in 0..rounds {
        thread::sleep(Duration::from_millis(600));
        let started = Instant::now();
        let session = Session::connect(vec![address], "witness", client.clone()).expect("connect");
        let server = match listener.next_event(Duration::from_secs(5)) {
            Some(ListenerEvent::NewSession(server)) => server,
            Some(ListenerEvent::PeerRestarted { session, .. }) => session,
            None => panic!("round {round}: the real peer did not connect within 5 s"),
        };
        within(Duration::from_secs(5))
            .until("the real peer reachable", || session.peer_reachable());
        times.push(started.elapsed());
        assert_eq!(server.peer_id().as_deref(), Some(client.local_id.as_str()));
        session.send(b"through", vec![]).expect("send");
        assert_eq!(recv_one(&server).app_header, b"through");
    }
    times
}

fn check_flood_resistance(server: LinkConfig, client: LinkConfig, limit: usize) {
    let listener = flooded_listener(server);
    let flood = SlowFlood::start(listener.local_addrs()[0]);
    within(LONG).for_value(
        "the flood to fill the handshake slots",
        || Some(listener.stats()),
        |stats| stats.handshakes_in_progress >= limit,
    );
    let times = connect_times(&listener, &client, 6);
    let stats = listener.stats();
    let connects = flood.connects();
    drop(flood);
    eprintln!(
        "real peer connect times under {FLOOD_CONNECTIONS} slow connections ({connects} \
         flood connects, limit {limit}): {times:?}; {stats:?}"
    );
    for (round, time) in times.iter().enumerate() {
        assert!(*time < CONNECT_LIMIT, "round {round}: {time:?} ({times:?})");
    }
    assert!(stats.addresses[0].evicted_handshakes > 0, "{stats:?}");
    assert!(
        connects > FLOOD_CONNECTIONS as u64,
        "the listener closed slow connections"
    );
}

#[test]
fn slow_connections_do_not_keep_the_real_peer_out() {
    // The flood comes from the peer's own address (loopback): the per-source limit binds.
    let server = config("host-b");
    let limit = server.max_pending_handshakes_per_source;
    check_flood_resistance(server, config("host-a"), limit);
}

#[test]
fn slow_connections_do_not_keep_a_host_from_the_witness() {
    // A witness with a key per host; the per-source limit raised to the global one, so that
    // the global limit binds.
    let key = Psk::from_bytes(b"host-a's own key, 32 bytes long..").expect("psk");
    let mut server = config("witness");
    server.client_keys = Some(Arc::new([("host-a".to_owned(), key.clone())].into()));
    server.max_pending_handshakes_per_source = server.max_pending_handshakes;
    let limit = server.max_pending_handshakes;
    let mut client = config("host-a");
    client.keys = key.into();
    check_flood_resistance(server, client, limit);
}

#[test]
fn a_listener_refuses_other_services_and_clients_with_the_pair_key() {
    let mut server = config("host-b");
    server.allowed_services = Some(vec!["blk:vm1-disk0".into()]);
    server.allowed_clients = Some(vec!["host-a".into()]);
    let listener = listener(1, server);
    let address = listener.local_addrs()[0];
    let refused = |client_id: &str, service: &str, reason: &str| {
        let session = Session::connect(vec![address], service, config(client_id)).expect("connect");
        session.send(b"write", vec![9; 512]).expect("queued");
        within(LONG).for_value(
            &format!("{client_id} {service} refused: {reason}"),
            || Some(session.stats()),
            |stats| {
                stats.links[0]
                    .last_error
                    .as_deref()
                    .is_some_and(|error| error.contains(reason))
            },
        );
        assert!(!session.peer_reachable());
        assert_eq!(session.stats().links[0].connects, 0);
    };
    // Another VM's primary, same pair key: must not write vm1's replica.
    refused("host-a", "blk:vm2-disk0", "service not served here");
    // The right service from a host this listener does not serve.
    refused("host-c", "blk:vm1-disk0", "client not allowed here");
    assert!(
        listener.next_event(Duration::from_millis(50)).is_none(),
        "no session"
    );
    let stats = listener.stats();
    assert!(stats.addresses[0].refused_not_served >= 2, "{stats:?}");
    assert_eq!(stats.sessions, 0);

    let good = Session::connect(vec![address], "blk:vm1-disk0", config("host-a")).expect("connect");
    good.send(b"write", vec![1]).expect("send");
    let server = accept(&listener);
    assert_eq!(server.service(), "blk:vm1-disk0");
    assert_eq!(server.peer_id().as_deref(), Some("host-a"));
    assert_eq!(recv_one(&server).app_header, b"write");
}
