//! Link failures: two A-links through relays that are cut, black-holed and restored.

mod support;

use std::thread;
use std::time::{Duration, Instant};

use replication_link::{Session, SessionError, SessionEvent};
use support::{accept, config, listener, payload, recv_one, wait_until, Relay, LONG};

#[test]
fn messages_survive_losing_one_link_then_both() {
    const COUNT: u64 = 5000;
    let mut server_config = config("host-b");
    server_config.max_unacked_messages = 256;
    let listener = listener(2, server_config);
    let relays = [
        Relay::start(listener.local_addrs()[0]),
        Relay::start(listener.local_addrs()[1]),
    ];
    let mut client_config = config("host-a");
    client_config.max_unacked_messages = 256;
    let link_timeout = Duration::from_millis(client_config.link_timeout_ms);
    let addresses = relays.iter().map(Relay::address).collect();
    let client = Session::connect(addresses, "blk:failover", client_config).expect("connect");
    let server = accept(&listener);
    assert!(
        wait_until(LONG, || support::links_up(&client, 2)),
        "both links up"
    );

    // Phase 1: cut link 0 in the middle of the stream.
    thread::scope(|scope| {
        scope.spawn(|| {
            for index in 0..COUNT {
                client.send(&[], payload(index, 1000)).expect("send");
            }
        });
        for index in 0..COUNT {
            if index == 1000 {
                relays[0].kill();
            }
            let message = recv_one(&server);
            assert_eq!(message.seq, index + 1, "in order, no gap, no duplicate");
            assert_eq!(message.payload, payload(index, 1000));
        }
    });
    assert!(
        client.flush(LONG).expect("flush"),
        "everything acknowledged"
    );
    let down = client.take_events();
    assert!(
        down.iter()
            .any(|e| matches!(e, SessionEvent::LinkDown { link: 0, .. })),
        "{down:?}"
    );
    assert!(client.peer_reachable(), "link 1 still carries the session");

    // Phase 2: link 1 goes silent too. The peer becomes unreachable within the link timeout,
    // messages wait, and a full window blocks the sender.
    let silenced = Instant::now();
    relays[1].freeze();
    for index in COUNT..COUNT + 10 {
        client
            .send(&[], payload(index, 1000))
            .expect("queued while unreachable");
    }
    assert!(wait_until(LONG, || !client.peer_reachable()));
    let detection = silenced.elapsed();
    assert!(
        detection <= link_timeout + Duration::from_millis(150),
        "took {detection:?}"
    );
    let mut queued = COUNT + 10;
    let blocked = loop {
        match client.send_timeout(&[], payload(queued, 1000), Duration::from_millis(20)) {
            Ok(_) => queued += 1,
            Err(error) => break error,
        }
        assert!(queued < COUNT + 1000, "the send window never filled");
    };
    assert!(
        matches!(blocked, SessionError::SendTimeout { .. }),
        "{blocked:?}"
    );

    // Phase 3: link 0 comes back; everything queued arrives exactly once, in order.
    relays[0].restore();
    for index in COUNT..queued {
        let message = recv_one(&server);
        assert_eq!(message.seq, index + 1);
        assert_eq!(message.payload, payload(index, 1000));
    }
    assert!(
        server
            .recv(Duration::from_millis(20))
            .expect("open")
            .is_none(),
        "no duplicate"
    );
    assert!(client.peer_reachable());
    assert!(client.flush(LONG).expect("flush"));
    let restarted = client
        .take_events()
        .into_iter()
        .any(|e| matches!(e, SessionEvent::PeerRestarted { .. }));
    assert!(!restarted, "the server kept its session");
    assert_eq!(server.stats().delivered, queued);
}

#[test]
fn a_reply_stream_fails_over_too() {
    const COUNT: u64 = 2000;
    let listener = listener(2, config("host-b"));
    let relays = [
        Relay::start(listener.local_addrs()[0]),
        Relay::start(listener.local_addrs()[1]),
    ];
    let addresses = relays.iter().map(Relay::address).collect();
    let client = Session::connect(addresses, "blk:replies", config("host-a")).expect("connect");
    let server = accept(&listener);
    assert!(
        wait_until(LONG, || support::links_up(&server, 2)),
        "both links up"
    );
    thread::scope(|scope| {
        scope.spawn(|| {
            for index in 0..COUNT {
                server.send(b"r", payload(index, 500)).expect("server send");
            }
        });
        for index in 0..COUNT {
            if index == COUNT / 2 {
                relays[1].kill();
            }
            let message = recv_one(&client);
            assert_eq!(message.seq, index + 1);
            assert_eq!(message.payload, payload(index, 500));
        }
    });
    assert!(server.flush(LONG).expect("flush"));
}

#[test]
fn two_links_to_one_listening_address_both_stay_up() {
    let listener = listener(1, config("host-b"));
    let relays = [
        Relay::start(listener.local_addrs()[0]),
        Relay::start(listener.local_addrs()[0]),
    ];
    let addresses = relays.iter().map(Relay::address).collect();
    let client = Session::connect(addresses, "blk:one-address", config("host-a")).expect("connect");
    let server = accept(&listener);
    assert!(wait_until(LONG, || support::links_up(&client, 2)));
    assert!(wait_until(LONG, || support::links_up(&server, 2)));
    for index in 0..200u64 {
        client.send(&[], payload(index, 100)).expect("send");
    }
    for index in 0..200u64 {
        assert_eq!(recv_one(&server).payload, payload(index, 100));
    }
    let connects: Vec<u64> = client
        .stats()
        .links
        .iter()
        .map(|link| link.connects)
        .collect();
    assert_eq!(connects, vec![1, 1], "no link replaced the other");
}
