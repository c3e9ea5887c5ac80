//! Hostile input: wrong keys, garbage on the listener port, tampered and replayed frames.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use replication_link::frame::Direction;
use replication_link::handshake::HandshakeError;
use replication_link::handshake_frame::{decode_handshake_frame, encode_handshake_frame};
use replication_link::header::{Hello, LinkHeader, LinkLimits};
use replication_link::{FrameProtection, LinkConfig, Psk, Session, SessionError};
use support::{accept, config, listener, payload, recv_one, within, Fault, Relay, LONG};

#[test]
fn wrong_key_is_refused_on_both_sides_and_nothing_is_delivered() {
    let listener = listener(1, config("host-b"));
    let mut wrong = config("host-a");
    wrong.keys = Psk::from_bytes(b"another key entirely, 32 bytes..")
        .expect("psk")
        .into();
    let intruder =
        Session::connect(listener.local_addrs().to_vec(), "blk:x", wrong).expect("connect");
    intruder
        .send(b"must not arrive", vec![0; 10])
        .expect("queued");
    within(LONG).until("an authentication failure on both sides", || {
        intruder.stats().links[0].auth_failures > 0
            && listener.stats().addresses[0].auth_failures > 0
    });
    let expected = HandshakeError::AuthenticationFailed.to_string();
    let last_error = intruder.stats().links[0]
        .last_error
        .clone()
        .unwrap_or_default();
    assert!(last_error.contains(&expected), "{last_error}");
    assert!(last_error.contains("wrong pre-shared key"), "{last_error}");
    assert!(!intruder.peer_reachable());
    assert_eq!(intruder.stats().unacked_messages, 1);
    assert!(
        listener.next_event(Duration::from_millis(20)).is_none(),
        "no session"
    );
    drop(intruder);

    // The listener keeps serving clients with the right key.
    let good = Session::connect(listener.local_addrs().to_vec(), "blk:x", config("host-a"))
        .expect("connect");
    good.send(b"hello", vec![1]).expect("send");
    let server = accept(&listener);
    assert_eq!(recv_one(&server).app_header, b"hello");
}

#[test]
fn with_per_client_keys_no_client_can_use_another_ones_id() {
    let key = |text: &str| Psk::from_bytes(text.as_bytes()).expect("psk");
    let keys = [
        (
            "host-a".to_owned(),
            key("host-a's own key, 32 bytes long.."),
        ),
        (
            "host-c".to_owned(),
            key("host-c's own key, 32 bytes long.."),
        ),
    ];
    let mut server = config("witness");
    server.client_keys = Some(std::sync::Arc::new(keys.iter().cloned().collect()));
    let listener = listener(1, server);
    let as_client = |id: &str, psk: &Psk| {
        let mut client = config(id);
        client.keys = psk.clone().into();
        let session =
            Session::connect(listener.local_addrs().to_vec(), "witness", client).expect("connect");
        session.send(b"claim", vec![]).expect("queued");
        session
    };
    // host-c with its own key, but under host-a's id; an id without a key; the shared key.
    let impostor = as_client("host-a", &keys[1].1);
    let unknown = as_client("host-b", &keys[1].1);
    let shared = as_client("host-a", &support::psk());
    for session in [&impostor, &unknown, &shared] {
        within(LONG).until("an authentication failure", || {
            session.stats().links[0].auth_failures > 0
        });
        assert!(!session.peer_reachable());
    }
    assert!(
        listener.next_event(Duration::from_millis(20)).is_none(),
        "no session"
    );
    // Each with its own key and id gets through.
    for (id, psk) in &keys {
        let session = as_client(id, psk);
        let server = accept(&listener);
        assert_eq!(server.peer_id().as_deref(), Some(id.as_str()));
        assert_eq!(recv_one(&server).app_header, b"claim");
        drop(session);
    }
}

/// Waits until the listener closes `stream` (read returns end of stream or an error).
fn assert_closed_by_listener(mut stream: TcpStream, within: Duration) {
    stream.set_read_timeout(Some(within)).expect("timeout");
    let started = Instant::now();
    let mut buffer = [0u8; 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) if started.elapsed() < within => {
                assert!(
                    !matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "listener kept the connection open for {within:?}"
                );
                return;
            }
            Err(error) => panic!("listener kept the connection open: {error}"),
        }
    }
}

fn send_raw(address: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream.write_all(bytes).expect("write");
    stream
}

fn hello(version: u16) -> LinkHeader {
    LinkHeader::Hello(Hello {
        protocol_version: version,
        client_id: "raw".into(),
        service: "blk:raw".into(),
        session_id: 99,
        link: 0,
        client_nonce: [1; 32],
        send_base: 0,
        limits: LinkLimits {
            window_messages: 16,
            window_bytes: 1 << 20,
            max_frame_bytes: replication_link::DEFAULT_MAX_FRAME_BYTES as u32,
        },
        key_ids: vec![support::psk().id()],
        protection: replication_link::FrameProtection::Encrypted,
    })
}

#[test]
fn garbage_on_the_listener_port_is_dropped_and_good_clients_still_work() {
    let mut server_config = config("host-b");
    server_config.handshake_timeout_ms = 200;
    let listener = listener(1, server_config);
    let address = listener.local_addrs()[0];
    let within = Duration::from_secs(2);

    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert_closed_by_listener(send_raw(address, &garbage), within);
    assert_closed_by_listener(send_raw(address, &[0xff; 8]), within); // 4 GiB length prefix
    let truncated = [100, 0, 0, 0, 10, 0, 1, 2, 3]; // 100-byte body, 7 bytes sent
    assert_closed_by_listener(send_raw(address, &truncated), within);
    let half_closed = send_raw(address, &truncated);
    let _ = half_closed.shutdown(Shutdown::Write);
    assert_closed_by_listener(half_closed, within);
    assert_closed_by_listener(TcpStream::connect(address).expect("connect"), within); // silence

    // A well-formed hello with another version (1: before the frames were sealed, or an
    // unknown one) gets a reason before the close.
    for version in [1, 99] {
        let frame =
            encode_handshake_frame(&hello(version), Direction::ClientToServer, 0).expect("encode");
        let mut stream = send_raw(address, &frame);
        stream.set_read_timeout(Some(within)).expect("timeout");
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        let decoded =
            decode_handshake_frame(&reply, Direction::ServerToClient, 0).expect("a refusal");
        assert!(
            matches!(&decoded.header, LinkHeader::Refused { reason }
                if reason == "unsupported protocol version"),
            "{:?}",
            decoded.header
        );
    }

    let stats = listener.stats();
    assert!(stats.addresses[0].handshake_errors >= 7, "{stats:?}");
    assert_eq!(stats.sessions, 0);

    let good =
        Session::connect(vec![address], "blk:after-garbage", config("host-a")).expect("connect");
    good.send(b"still works", vec![1]).expect("send");
    let server = accept(&listener);
    assert_eq!(recv_one(&server).app_header, b"still works");
}

/// Sends 20 messages through a relay that applies `fault` once; each must arrive exactly once,
/// in order and intact, and the server's link must have counted a tag failure.
fn survive_fault(fault: Fault) {
    survive_fault_protected(fault, FrameProtection::Encrypted);
}

/// `survive_fault` with both sides' frames protected as `protection` says; returns what
/// crossed the link.
fn survive_fault_protected(fault: Fault, protection: FrameProtection) -> Vec<u8> {
    let protected = |id: &str| LinkConfig {
        protection,
        ..config(id)
    };
    let listener = listener(1, protected("host-b"));
    let relay = Relay::start(listener.local_addrs()[0]);
    relay.inject(fault);
    let client =
        Session::connect(vec![relay.address()], "blk:fault", protected("host-a")).expect("connect");
    let server = accept(&listener);
    for index in 0..20u64 {
        client.send(b"w", payload(index, 2000)).expect("send");
    }
    for index in 0..20u64 {
        let message = recv_one(&server);
        assert_eq!(message.seq, index + 1);
        assert_eq!(message.payload, payload(index, 2000), "payload intact");
    }
    assert!(
        server
            .recv(Duration::from_millis(20))
            .expect("open")
            .is_none(),
        "no duplicate"
    );
    assert!(relay.fault_applied());
    let server_link = &server.stats().links[0];
    assert!(server_link.auth_failures >= 1, "{server_link:?}");
    assert!(
        client.stats().links[0].connects >= 2,
        "the client reconnected"
    );
    assert!(client.flush(LONG).expect("flush"));
    relay.captured()
}

#[test]
fn tampered_frame_is_detected_and_its_message_resent() {
    survive_fault(Fault::FlipPayloadByte);
}

#[test]
fn replayed_frame_is_refused() {
    survive_fault(Fault::DuplicateFrame);
}

#[test]
fn reordered_frames_are_refused() {
    survive_fault(Fault::SwapFrames);
}

/// What crosses the A-link, both ways, holds neither the payloads nor the application headers
/// of the messages, and each arrives intact.
#[test]
fn the_link_carries_no_plaintext() {
    let listener = listener(1, config("host-b"));
    let relay = Relay::start(listener.local_addrs()[0]);
    let client =
        Session::connect(vec![relay.address()], "blk:canary", config("host-a")).expect("connect");
    let server = accept(&listener);
    let block = b"GUEST-BLOCK-CANARY-0123456789abcdef-".repeat(120);
    let frame = b"GUEST-NIC-FRAME-CANARY-fedcba9876543210-".repeat(30);
    for _ in 0..5 {
        client
            .send(b"app-header-canary-write", block.clone())
            .expect("send");
        server
            .send(b"app-header-canary-reply", frame.clone())
            .expect("send");
    }
    for _ in 0..5 {
        let arrived = recv_one(&server);
        assert_eq!(
            (arrived.app_header.as_slice(), &arrived.payload),
            (&b"app-header-canary-write"[..], &block)
        );
        let arrived = recv_one(&client);
        assert_eq!(
            (arrived.app_header.as_slice(), &arrived.payload),
            (&b"app-header-canary-reply"[..], &frame)
        );
    }
    assert!(client.flush(LONG).expect("flush") && server.flush(LONG).expect("flush"));
    let captured = relay.captured();
    assert!(
        captured.len() > 5 * (block.len() + frame.len()),
        "{}",
        captured.len()
    );
    for needle in [
        &block[..16],
        &block[1000..1016],
        &frame[..16],
        b"app-header-canary",
    ] {
        assert!(
            !captured
                .windows(needle.len())
                .any(|window| window == needle),
            "{:?} crossed the link in clear",
            String::from_utf8_lossy(needle)
        );
    }
    // The session names travel in clear, in the handshake: the capture is the real one.
    assert!(captured.windows(10).any(|window| window == b"blk:canary"));
}

/// Encryption off (both sides configured so): what crosses the link holds the guest's data in
/// clear, and the frames are still authenticated: a tampered one is refused and its message
/// sent again, and every message arrives once, intact.
#[test]
fn without_encryption_the_data_is_in_clear_and_tampering_still_refused() {
    let captured =
        survive_fault_protected(Fault::FlipPayloadByte, FrameProtection::AuthenticatedOnly);
    for index in [0u64, 7, 19] {
        let needle = payload(index, 2000);
        assert!(
            captured
                .windows(needle.len())
                .any(|window| window == needle),
            "message {index} did not cross the link in clear"
        );
    }
}

/// A side with encryption off and one with it on never connect, whichever is the server:
/// both refuse, and the client's error names both settings.
#[test]
fn a_side_with_encryption_off_is_refused_by_one_with_it_on() {
    use FrameProtection::{AuthenticatedOnly as Off, Encrypted as On};
    for (client_side, server_side) in [(Off, On), (On, Off)] {
        let listener = listener(
            1,
            LinkConfig {
                protection: server_side,
                ..config("host-b")
            },
        );
        let client_config = LinkConfig {
            protection: client_side,
            ..config("host-a")
        };
        let client = Session::connect(listener.local_addrs().to_vec(), "blk:x", client_config)
            .expect("connect");
        client
            .send(b"must not arrive", vec![0; 10])
            .expect("queued");
        within(LONG).until("a refused handshake on both sides", || {
            client.stats().links[0].last_error.is_some()
                && listener.stats().addresses[0].handshake_errors > 0
        });
        let expected = format!(
            "peer has link {}, this side {}",
            server_side.describe(),
            client_side.describe()
        );
        let last_error = client.stats().links[0]
            .last_error
            .clone()
            .unwrap_or_default();
        assert!(last_error.contains(&expected), "{last_error}");
        assert!(!client.peer_reachable());
        assert_eq!(listener.stats().addresses[0].handshakes_completed, 0);
        assert!(
            listener.next_event(Duration::from_millis(20)).is_none(),
            "no session"
        );
    }
}

#[test]
fn psk_file_errors_are_clear() {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), b"short\n").expect("write");
    let error = Psk::from_file(file.path()).expect_err("too short");
    assert_eq!(
        error.to_string(),
        "pre-shared key is 5 bytes, needs at least 16"
    );
    let mut bad = LinkConfig::new(support::psk(), "");
    bad.local_id.clear();
    let refused = Session::connect(vec!["127.0.0.1:1".parse().expect("address")], "s", bad);
    assert!(matches!(refused, Err(SessionError::Config(_))));
}
