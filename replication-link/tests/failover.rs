//! Link failures: two A-links through relays that are cut, black-holed and restored.

mod support;

use std::thread;
use std::time::{Duration, Instant};

use replication_link::{LinkListener, Session, SessionError, SessionEvent};
use support::{accept, config, listener, payload, recv_one, within, Relay, LONG};

/// A session whose two links each go through a relay.
struct TwoLinks {
    // Field order is drop order: sessions first, then relays, then the listener.
    client: Session,
    server: Session,
    relays: [Relay; 2],
    _listener: LinkListener,
    link_timeout: Duration,
}

fn two_links(window_messages: usize, listen_addresses: usize) -> TwoLinks {
    let mut server_config = config("host-b");
    server_config.max_unacked_messages = window_messages;
    let listener = listener(listen_addresses, server_config);
    let targets = listener.local_addrs();
    let relays = [
        Relay::start(targets[0]),
        Relay::start(targets[listen_addresses - 1]),
    ];
    let mut client_config = config("host-a");
    client_config.max_unacked_messages = window_messages;
    let link_timeout = Duration::from_millis(client_config.link_timeout_ms);
    let addresses = relays.iter().map(Relay::address).collect();
    let client = Session::connect(addresses, "blk:failover", client_config).expect("connect");
    let server = accept(&listener);
    within(LONG).until("client links up", || support::links_up(&client, 2));
    within(LONG).until("server links up", || support::links_up(&server, 2));
    TwoLinks {
        client,
        server,
        relays,
        _listener: listener,
        link_timeout,
    }
}

/// Receives messages `first..last` (by payload index) and checks order and content.
fn expect_range(session: &Session, first: u64, last: u64, size: usize) {
    for index in first..last {
        let message = recv_one(session);
        assert_eq!(message.seq, index + 1, "in order, no gap, no duplicate");
        assert_eq!(message.payload, payload(index, size));
    }
}

fn assert_nothing_more(session: &Session) {
    let extra = session.recv(Duration::from_millis(20)).expect("open");
    assert!(extra.is_none(), "duplicate or extra message {extra:?}");
}

/// Sends `count` messages while link 0 is cut after the first 1000 arrived.
fn stream_while_cutting_link_0(links: &TwoLinks, count: u64) {
    thread::scope(|scope| {
        scope.spawn(|| {
            for index in 0..count {
                links.client.send(&[], payload(index, 1000)).expect("send");
            }
        });
        expect_range(&links.server, 0, 1000, 1000);
        links.relays[0].kill();
        expect_range(&links.server, 1000, count, 1000);
    });
    assert_nothing_more(&links.server);
    assert!(
        links.client.flush(LONG).expect("flush"),
        "everything acknowledged"
    );
    let events = links.client.take_events();
    let link_0_down = events
        .iter()
        .any(|e| matches!(e, SessionEvent::LinkDown { link: 0, .. }));
    assert!(link_0_down, "{events:?}");
    assert!(
        links.client.peer_reachable(),
        "link 1 still carries the session"
    );
}

/// Link 1 goes silent too: the peer becomes unreachable within the link timeout, messages
/// wait, and a full window blocks the sender. Returns how many messages were sent in all.
fn silence_link_1_and_fill_the_window(links: &TwoLinks, first: u64) -> u64 {
    let silenced = Instant::now();
    links.relays[1].freeze();
    for index in first..first + 10 {
        links
            .client
            .send(&[], payload(index, 1000))
            .expect("queued while unreachable");
    }
    within(LONG).until("the peer unreachable", || !links.client.peer_reachable());
    let detection = silenced.elapsed();
    let bound = links.link_timeout + Duration::from_millis(150);
    assert!(detection <= bound, "unreachable after {detection:?}");
    let mut sent = first + 10;
    let short = Duration::from_millis(20);
    let blocked = loop {
        match links.client.send_timeout(&[], payload(sent, 1000), short) {
            Ok(_) => sent += 1,
            Err(error) => break error,
        }
        assert!(sent < first + 1000, "the send window never filled");
    };
    assert!(
        matches!(blocked, SessionError::SendTimeout { .. }),
        "{blocked:?}"
    );
    sent
}

#[test]
fn messages_survive_losing_one_link_then_both() {
    const COUNT: u64 = 5000;
    let links = two_links(256, 2);
    stream_while_cutting_link_0(&links, COUNT);
    let sent = silence_link_1_and_fill_the_window(&links, COUNT);

    // Link 0 comes back: everything queued arrives exactly once, in order.
    links.relays[0].restore();
    expect_range(&links.server, COUNT, sent, 1000);
    assert_nothing_more(&links.server);
    assert!(links.client.peer_reachable());
    assert!(links.client.flush(LONG).expect("flush"));
    let restarted = links
        .client
        .take_events()
        .into_iter()
        .any(|e| matches!(e, SessionEvent::PeerRestarted { .. }));
    assert!(!restarted, "the server kept its session");
    assert_eq!(links.server.stats().delivered, sent);
}

#[test]
fn a_reply_stream_fails_over_too() {
    const COUNT: u64 = 2000;
    let links = two_links(4096, 2);
    thread::scope(|scope| {
        scope.spawn(|| {
            for index in 0..COUNT {
                links
                    .server
                    .send(b"r", payload(index, 500))
                    .expect("server send");
            }
        });
        expect_range(&links.client, 0, COUNT / 2, 500);
        links.relays[1].kill();
        expect_range(&links.client, COUNT / 2, COUNT, 500);
    });
    assert_nothing_more(&links.client);
    assert!(links.server.flush(LONG).expect("flush"));
}

#[test]
fn two_links_to_one_listening_address_both_stay_up() {
    let links = two_links(4096, 1);
    for index in 0..200u64 {
        links.client.send(&[], payload(index, 100)).expect("send");
    }
    expect_range(&links.server, 0, 200, 100);
    let stats = links.client.stats();
    let connects: Vec<u64> = stats.links.iter().map(|link| link.connects).collect();
    assert_eq!(connects, vec![1, 1], "no link replaced the other");
}
