//! Sessions over loopback: round trips, large payloads, ordering over two links, restarts.

mod support;

use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use replication_link::{
    CloseReason, LinkListener, ListenerEvent, Session, SessionError, SessionEvent,
};
use serde::{Deserialize, Serialize};
use support::{
    accept, config, connected, links_up, listener, loopback, payload, recv_one, within, LONG,
};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct WriteHeader {
    generation: u64,
    offset: u64,
}

#[test]
fn round_trip_in_both_directions_with_typed_headers() {
    let listener = listener(1, config("host-b"));
    let client = Session::connect(
        listener.local_addrs().to_vec(),
        "blk:vm1-disk0",
        config("host-a"),
    )
    .expect("connect");
    for index in 0..100u64 {
        let header = WriteHeader {
            generation: 3,
            offset: index * 4096,
        };
        let seq = client
            .send_typed(&header, payload(index, 100))
            .expect("send");
        assert_eq!(seq, index + 1);
    }
    let server = accept(&listener);
    assert_eq!(server.service(), "blk:vm1-disk0");
    assert_eq!(server.session_id(), client.session_id());
    for index in 0..100u64 {
        let message = recv_one(&server);
        assert_eq!(message.seq, index + 1);
        let header: WriteHeader = message.header().expect("typed header");
        assert_eq!(header.offset, index * 4096);
        assert_eq!(message.payload, payload(index, 100));
        server.send(b"ack", payload(index, 8)).expect("reply");
    }
    for index in 0..100u64 {
        let message = recv_one(&client);
        assert_eq!(
            (message.seq, message.app_header.as_slice()),
            (index + 1, &b"ack"[..])
        );
        assert_eq!(message.payload, payload(index, 8));
    }
    assert!(client.flush(LONG).expect("flush"));
    assert!(server.flush(LONG).expect("flush"));
    assert_eq!(client.peer_id().as_deref(), Some("host-b"));
    assert_eq!(server.peer_id().as_deref(), Some("host-a"));
    let stats = client.stats();
    assert!(stats.peer_reachable);
    assert_eq!(
        (stats.sent, stats.delivered, stats.unacked_messages),
        (100, 100, 0)
    );
    within(LONG).until("heartbeats to measure RTT", || {
        client.stats().links[0].rtt_us.is_some()
    });
    let events = client.take_events();
    assert!(
        matches!(events.first(), Some(SessionEvent::LinkUp { link: 0, .. })),
        "{events:?}"
    );
}

#[test]
fn large_payloads_arrive_intact() {
    let listener = listener(1, config("host-b"));
    let client_config = config("host-a");
    let largest = client_config.max_message_bytes();
    let client = Session::connect(listener.local_addrs().to_vec(), "blk:large", client_config)
        .expect("connect");
    let server = accept(&listener);
    let one_mib = payload(7, 1024 * 1024);
    client.send(b"h", one_mib.clone()).expect("send 1 MiB");
    client
        .send(&[], payload(8, largest))
        .expect("send the largest");
    let too_large = client.send(&[], vec![0; largest + 1]);
    assert!(matches!(
        too_large,
        Err(SessionError::MessageTooLarge { .. })
    ));
    assert_eq!(recv_one(&server).payload, one_mib);
    assert_eq!(recv_one(&server).payload, payload(8, largest));
    server.send(&[], one_mib.clone()).expect("reply 1 MiB");
    assert_eq!(recv_one(&client).payload, one_mib);
}

/// Receives `count` messages and checks they are 1..=count in order with their payloads.
fn expect_in_order(session: &Session, count: u64) {
    for index in 0..count {
        let message = recv_one(session);
        assert_eq!(message.seq, index + 1, "out of order");
        assert_eq!(message.payload, payload(index, 64));
    }
    let extra = session.recv(Duration::from_millis(20)).expect("open");
    assert!(extra.is_none(), "duplicate or extra message {extra:?}");
}

#[test]
fn ten_thousand_messages_keep_their_order_over_two_links() {
    const COUNT: u64 = 10_000;
    let (_listener, client, server) = connected(2, "blk:order");
    within(LONG).until("both links up", || support::links_up(&client, 2));
    thread::scope(|scope| {
        scope.spawn(|| {
            for index in 0..COUNT {
                client.send(&[], payload(index, 64)).expect("client send");
            }
        });
        scope.spawn(|| {
            for index in 0..COUNT {
                server.send(&[], payload(index, 64)).expect("server send");
            }
        });
        scope.spawn(|| expect_in_order(&server, COUNT));
        expect_in_order(&client, COUNT);
    });
    let links = client.stats().links;
    let data_frames: Vec<u64> = links.iter().map(|link| link.frames_sent).collect();
    assert!(
        data_frames.iter().all(|frames| *frames > 10),
        "both links carried data: {data_frames:?}"
    );
}

#[test]
fn messages_sent_before_the_peer_is_up_are_delivered() {
    let reserved = TcpListener::bind(loopback()).expect("reserve a port");
    let address = reserved.local_addr().expect("address");
    drop(reserved);
    let client = Session::connect(vec![address], "blk:early", config("host-a")).expect("connect");
    client
        .send(b"early", payload(1, 10))
        .expect("send while the peer is down");
    within(LONG).until("a link error", || {
        client.stats().links[0].last_error.is_some()
    });
    assert!(!client.peer_reachable());
    let listener = LinkListener::bind(vec![address], config("host-b")).expect("bind late");
    let server = accept(&listener);
    let message = recv_one(&server);
    assert_eq!((message.seq, message.app_header), (1, b"early".to_vec()));
}

#[test]
fn client_restart_is_reported_to_the_server() {
    let listener = listener(1, config("host-b"));
    let addresses = listener.local_addrs().to_vec();
    let first =
        Session::connect(addresses.clone(), "blk:restart", config("host-a")).expect("connect");
    first.send(b"first", vec![1]).expect("send");
    let old_server = match listener.next_event(LONG).expect("event") {
        ListenerEvent::NewSession(session) => session,
        other => panic!("expected a new session, got {other:?}"),
    };
    assert_eq!(recv_one(&old_server).app_header, b"first");
    let first_id = first.session_id();
    drop(first);

    let second = Session::connect(addresses, "blk:restart", config("host-a")).expect("reconnect");
    second.send(b"second", vec![2]).expect("send");
    let (previous, new_server) = match listener.next_event(LONG).expect("event") {
        ListenerEvent::PeerRestarted {
            previous_session_id,
            session,
        } => (previous_session_id, session),
        other => panic!("expected a restart, got {other:?}"),
    };
    assert_eq!(previous, first_id);
    assert_eq!(new_server.session_id(), second.session_id());
    let message = recv_one(&new_server);
    assert_eq!((message.seq, message.app_header), (1, b"second".to_vec()));
    let closed = old_server.recv(Duration::from_millis(10));
    assert!(matches!(
        closed,
        Err(SessionError::Closed {
            reason: CloseReason::Replaced
        })
    ));
}

#[test]
fn server_restart_is_reported_to_the_client_and_unacked_messages_are_resent() {
    let first = listener(1, config("host-b"));
    let address = first.local_addrs()[0];
    let client =
        Session::connect(vec![address], "blk:server-restart", config("host-a")).expect("connect");
    let server = accept(&first);
    server.send(b"before", vec![1]).expect("send");
    assert_eq!(recv_one(&client).app_header, b"before");
    drop(server);
    drop(first);

    // The client sends while the server is away: nobody acknowledges this message.
    client.send(b"while away", vec![2]).expect("send");
    let second = LinkListener::bind(vec![address], config("host-b")).expect("rebind");
    let server = accept(&second);
    let message = recv_one(&server);
    assert_eq!(message.app_header, b"while away");
    within(LONG).until("a PeerRestarted event", || {
        client
            .take_events()
            .iter()
            .any(|event| matches!(event, SessionEvent::PeerRestarted { .. }))
    });
    server.send(b"after", vec![3]).expect("send");
    let message = recv_one(&client);
    assert_eq!((message.seq, message.app_header), (1, b"after".to_vec()));
}

#[test]
fn a_full_send_window_blocks_and_times_out_then_drains() {
    let mut client_config = config("host-a");
    client_config.max_unacked_messages = 8;
    let mut server_config = config("host-b");
    server_config.max_unacked_messages = 8;
    let listener = listener(1, server_config);
    let client = Session::connect(listener.local_addrs().to_vec(), "blk:window", client_config)
        .expect("connect");
    let server = accept(&listener);
    // The server application does not read: after 8 messages the client must wait.
    for index in 0..8u64 {
        client
            .send(&[], payload(index, 16))
            .expect("send within the window");
    }
    let blocked = client.send_timeout(&[], payload(8, 16), Duration::from_millis(50));
    assert!(
        matches!(blocked, Err(SessionError::SendTimeout { .. })),
        "{blocked:?}"
    );
    assert_eq!(recv_one(&server).seq, 1);
    client
        .send_timeout(&[], payload(8, 16), LONG)
        .expect("room after the peer read one");
    for seq in 2..=9 {
        assert_eq!(recv_one(&server).seq, seq);
    }
}

#[test]
fn a_new_session_is_announced_with_its_peer_id_and_first_link_known() {
    // The listener used to announce a session before attaching its first connection, so
    // `peer_id()` could still be `None` just after `next_event` on a busy machine.
    let listener = listener(1, config("host-b"));
    for round in 0..50 {
        let client = Session::connect(
            listener.local_addrs().to_vec(),
            "blk:announce",
            config("host-a"),
        )
        .expect("connect");
        let server = accept(&listener);
        assert_eq!(server.peer_id().as_deref(), Some("host-a"), "round {round}");
        let stats = server.stats();
        assert_eq!(stats.peer_id.as_deref(), Some("host-a"), "round {round}");
        assert_eq!(stats.links[0].connects, 1, "round {round}: {stats:?}");
        drop(client);
    }
}

/// Request and reply, one at a time (a guest's write at queue depth 1): each side writes
/// its message on the idle link itself, without handing it to the link's writer thread,
/// and the sender's own CRC32C arrives with the message, checked.
#[test]
fn a_sender_writes_on_an_idle_link_itself_and_its_checksum_arrives_checked() {
    const ROUND_TRIPS: u64 = 200;
    let (_listener, client, server) = connected(1, "blk:vm1-disk0");
    within(LONG).until("the link up on both sides", || {
        links_up(&client, 1) && links_up(&server, 1)
    });
    for index in 0..ROUND_TRIPS {
        let data = payload(index, 4096);
        let crc = crc32c::crc32c(&data);
        client
            .send_with_crc32c(b"write", data.clone(), crc, LONG)
            .expect("send");
        let request = recv_one(&server);
        assert_eq!(request.payload, data);
        assert_eq!(request.payload_crc32c, crc);
        server.send(b"done", Vec::new()).expect("reply");
        assert_eq!(recv_one(&client).app_header, b"done");
    }
    let direct = |session: &Session| -> u64 {
        session
            .stats()
            .links
            .iter()
            .map(|link| link.direct_writes)
            .sum()
    };
    // A heartbeat or ack the writer thread sends now and then may hold the link at the
    // moment of a send (that send then goes through the writer): most go direct.
    for (side, session) in [("client", &client), ("server", &server)] {
        let written = direct(session);
        assert!(
            written >= ROUND_TRIPS * 3 / 4,
            "{side}: only {written} of {ROUND_TRIPS} messages written by their sender"
        );
    }
    client.close();
    server.close();
}

#[test]
fn an_interrupt_ends_a_receive_wait_at_once_and_never_hides_a_message() {
    let listener = listener(1, config("host-b"));
    let client = std::sync::Arc::new(
        Session::connect(
            listener.local_addrs().to_vec(),
            "blk:interrupt",
            config("host-a"),
        )
        .expect("connect"),
    );
    // Made before any receive: the next wait ends at once instead of after its timeout.
    client.interrupt();
    let started = std::time::Instant::now();
    assert!(client.recv(LONG).expect("recv").is_none());
    assert!(started.elapsed() < LONG);
    // Made while another thread waits (or is about to: the interrupt is kept for its
    // wait): that wait of an hour ends.
    let receiver = std::sync::Arc::clone(&client);
    let waiting = thread::spawn(move || receiver.recv(Duration::from_secs(3600)));
    client.interrupt();
    let outcome = waiting.join().expect("join");
    assert!(matches!(outcome, Ok(None)), "{outcome:?}");
    // A message already waiting comes first; the interrupt then ends the next wait.
    let server = accept(&listener);
    server.send(b"first", payload(1, 10)).expect("send");
    within(LONG).until("the message arrives", || client.has_message());
    client.interrupt();
    let message = client.recv(LONG).expect("recv").expect("the message");
    assert_eq!(message.app_header, b"first".to_vec());
    assert!(client.recv(LONG).expect("recv").is_none());
}

/// Every message, handled inline on the reader threads or deferred to `recv`, reaches the
/// application once, in order, one at a time, over two links.
#[test]
fn inline_delivery_keeps_the_order_with_messages_deferred_to_recv() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use replication_link::Delivery;

    const COUNT: u64 = 10_000;
    let (_listener, client, server) = connected(2, "blk:inline");
    within(LONG).until("both links up", || support::links_up(&client, 2));
    // What the application saw, in the order it saw it, and by which path.
    let seen = Arc::new(Mutex::new(Vec::<u64>::new()));
    let inline_count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Set while a message is being handled: never twice at once.
    let busy = Arc::new(AtomicBool::new(false));
    {
        let seen = Arc::clone(&seen);
        let inline_count = Arc::clone(&inline_count);
        let busy = Arc::clone(&busy);
        assert!(server.set_inline_handler(Box::new(move |message| {
            // Every 97th message goes to `recv`, as a handler defers what might block.
            if message.seq % 97 == 0 {
                return Delivery::Defer(message);
            }
            assert!(!busy.swap(true, Ordering::SeqCst), "two deliveries at once");
            seen.lock().expect("seen").push(message.seq);
            inline_count.fetch_add(1, Ordering::Relaxed);
            busy.store(false, Ordering::SeqCst);
            Delivery::Handled
        })));
    }
    assert!(!server.set_inline_handler(Box::new(|_| Delivery::Handled)));
    thread::scope(|scope| {
        scope.spawn(|| {
            for index in 0..COUNT {
                client.send(&[], payload(index, 64)).expect("client send");
            }
        });
        // The application's thread: takes what the handler deferred.
        let mut deferred = 0;
        while seen.lock().expect("seen").len() < COUNT as usize {
            if let Some(message) = server.recv(Duration::from_millis(100)).expect("open") {
                assert_eq!(message.seq % 97, 0, "only deferred messages reach recv");
                assert!(!busy.swap(true, Ordering::SeqCst), "two deliveries at once");
                seen.lock().expect("seen").push(message.seq);
                busy.store(false, Ordering::SeqCst);
                deferred += 1;
            }
        }
        assert_eq!(deferred, COUNT / 97);
    });
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen, (1..=COUNT).collect::<Vec<_>>(), "once each, in order");
    assert_eq!(
        inline_count.load(std::sync::atomic::Ordering::Relaxed),
        COUNT - COUNT / 97
    );
}
