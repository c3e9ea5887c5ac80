//! Loopback throughput of one session, client to server.
//!
//! `cargo run --release -p replication-link --example throughput [SECONDS]`
//!
//! Sends 64 KiB and 64-byte messages over one and over two links for SECONDS each (default 2)
//! and prints MB/s and messages/s. Loopback only: it measures the link layer's CPU cost
//! (cipher, CRC, copies, locking), not a network.

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use replication_link::{LinkConfig, LinkListener, ListenerEvent, Psk, Session};

fn config(local_id: &str) -> LinkConfig {
    let psk = Psk::from_bytes(b"throughput benchmark key........").expect("psk");
    LinkConfig::new(psk, local_id)
}

fn measure(links: usize, size: usize, seconds: f64) {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let listener = LinkListener::bind(vec![loopback; links], config("server")).expect("bind");
    let client = Session::connect(listener.local_addrs().to_vec(), "bench", config("client"))
        .expect("connect");
    let server = match listener.next_event(Duration::from_secs(10)) {
        Some(ListenerEvent::NewSession(session)) => session,
        other => panic!("no session: {other:?}"),
    };
    let deadline = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let sent = thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let mut sent = 0u64;
            while started.elapsed() < deadline {
                client.send(&[], vec![0xa5; size]).expect("send");
                sent += 1;
            }
            sent
        });
        let mut received = 0u64;
        let mut last_arrival = started;
        loop {
            match server.recv(Duration::from_millis(200)).expect("recv") {
                Some(_) => {
                    received += 1;
                    last_arrival = Instant::now();
                }
                None if sender.is_finished() => break,
                None => {}
            }
        }
        let sent = sender.join().expect("sender");
        assert_eq!(sent, received, "every message delivered");
        (sent, last_arrival)
    });
    let (sent, last_arrival) = sent;
    let elapsed = last_arrival.duration_since(started).as_secs_f64();
    let stats = client.stats();
    let frames: Vec<u64> = stats.links.iter().map(|link| link.frames_sent).collect();
    println!(
        "links={links} size={size:>6} B: {:>9.0} messages/s {:>8.1} MB/s (frames per link {frames:?})",
        sent as f64 / elapsed,
        sent as f64 * size as f64 / elapsed / 1e6,
    );
}

/// Request/response latency: 4 KiB request, 16-byte reply (a mirrored write and its ack).
fn ping_pong(links: usize, rounds: usize) {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let listener = LinkListener::bind(vec![loopback; links], config("server")).expect("bind");
    let client = Session::connect(listener.local_addrs().to_vec(), "bench", config("client"))
        .expect("connect");
    let server = match listener.next_event(Duration::from_secs(10)) {
        Some(ListenerEvent::NewSession(session)) => session,
        other => panic!("no session: {other:?}"),
    };
    let mut round_trips_us = thread::scope(|scope| {
        scope.spawn(|| {
            for _ in 0..rounds {
                let request = server.recv(Duration::from_secs(10)).expect("recv");
                assert!(request.is_some(), "request");
                server.send(&[], vec![0; 16]).expect("reply");
            }
        });
        (0..rounds)
            .map(|_| {
                let started = Instant::now();
                client.send(&[], vec![0; 4096]).expect("request");
                let reply = client.recv(Duration::from_secs(10)).expect("recv");
                assert!(reply.is_some(), "reply");
                started.elapsed().as_micros() as u64
            })
            .collect::<Vec<u64>>()
    });
    round_trips_us.sort_unstable();
    let at = |fraction: f64| round_trips_us[((rounds - 1) as f64 * fraction) as usize];
    println!(
        "links={links} request/response 4 KiB/16 B: p50 {} us, p99 {} us",
        at(0.5),
        at(0.99)
    );
}

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(2.0);
    for links in [1, 2] {
        for size in [64 * 1024, 64] {
            measure(links, size, seconds);
        }
        ping_pong(links, 5000);
    }
}
