//! Rotating the pair's key under running sessions: each host's ring follows its key files
//! (`pair.psk` and `pair.psk.previous`), the hosts take the new key one after the other, and
//! the old key is retired, without losing or repeating a message.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use replication_link::key_ring::previous_key_path;
use replication_link::{KeyRing, LinkConfig, Psk, Session, SessionEvent};
use support::{accept, config, listener, recv_one, within, LONG};

const OLD: &[u8] = b"the old pair key, 32 bytes long.\n";
const NEW: &[u8] = b"the new pair key, 32 bytes long.\n";

/// Writes a key file the way `ftvm key rotate` does: a temporary file renamed into place.
fn write_key(path: &Path, secret: &[u8]) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, secret).expect("write key");
    std::fs::rename(&temporary, path).expect("rename key");
}

/// What `ftvm key rotate` does on one host: the current key becomes the previous one, the
/// new one current.
fn rotate(path: &Path) {
    std::fs::copy(path, previous_key_path(path)).expect("keep the old key");
    write_key(path, NEW);
}

fn host(dir: &Path, name: &str) -> (PathBuf, LinkConfig) {
    let path = dir.join(format!("{name}.psk"));
    write_key(&path, OLD);
    let mut config = config(name);
    config.keys = KeyRing::from_file(&path).expect("key ring");
    (path, config)
}

fn id(secret: &[u8]) -> String {
    Psk::from_bytes(secret).expect("psk").id().to_string()
}

/// The key ids of a session's links that are up.
fn link_keys(session: &Session) -> Vec<Option<String>> {
    session
        .stats()
        .links
        .iter()
        .filter(|link| link.up)
        .map(|link| link.key.clone())
        .collect()
}

fn connects(session: &Session) -> u64 {
    session.stats().links.iter().map(|link| link.connects).sum()
}

/// A session that connects now with `config`; returns the key its first link used.
fn fresh_session_key(addresses: &[std::net::SocketAddr], config: LinkConfig) -> Option<String> {
    let session = Session::connect(addresses.to_vec(), "blk:probe", config).expect("connect");
    within(LONG).until("the probe's link is up", || {
        link_keys(&session).first().is_some_and(Option::is_some)
    });
    link_keys(&session).into_iter().next().flatten()
}

/// The server's view: every message arrives once, in order.
struct Checked {
    received: u64,
}

impl Checked {
    fn receive_one(&mut self, server: &Session) {
        let message = recv_one(server);
        assert_eq!(
            message.app_header,
            self.received.to_le_bytes(),
            "in order, once"
        );
        self.received += 1;
    }

    fn receive_for(&mut self, server: &Session, duration: Duration) {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            self.receive_one(server);
        }
    }
}

/// The server (hostB) retires first: it asks the client to connect again (`Rekey`).
#[test]
fn the_pair_key_rotates_under_running_sessions_and_the_retired_key_is_refused() {
    rotate_and_retire(Retires::ServerFirst);
}

/// The client (hostA) retires first: it connects again by itself.
#[test]
fn the_client_retiring_first_replaces_its_links_without_a_link_down() {
    rotate_and_retire(Retires::ClientFirst);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Retires {
    ServerFirst,
    ClientFirst,
}

fn rotate_and_retire(order: Retires) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (key_a, config_a) = host(dir.path(), "host-a");
    let (key_b, config_b) = host(dir.path(), "host-b");
    let listener = listener(2, config_b);
    let addresses = listener.local_addrs().to_vec();
    let client = Arc::new(
        Session::connect(addresses.clone(), "blk:rot", config_a.clone()).expect("connect"),
    );
    let server = accept(&listener);
    within(LONG).until("both links up", || link_keys(&client).len() == 2);
    assert_eq!(link_keys(&client), vec![Some(id(OLD)); 2]);
    let connects_before = connects(&client);

    // A writer that never stops while the keys change; the server checks every message.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, stop) = (Arc::clone(&client), Arc::clone(&stop));
        thread::spawn(move || {
            let mut sent = 0u64;
            while !stop.load(Ordering::SeqCst) {
                client
                    .send(&sent.to_le_bytes(), vec![7; 4096])
                    .expect("send");
                sent += 1;
                thread::sleep(Duration::from_millis(1));
            }
            sent
        })
    };
    let mut checked = Checked { received: 0 };
    // hostA takes the new key first: hostB holds only the old one, which both still use;
    // new connections in either direction still authenticate (with the old key).
    rotate(&key_a);
    checked.receive_for(&server, Duration::from_millis(300));
    assert_eq!(
        fresh_session_key(&addresses, config_a.clone()),
        Some(id(OLD))
    );
    assert_eq!(connects(&client), connects_before, "running links stay up");

    // hostB takes it too: new connections use the new key; running ones keep theirs.
    rotate(&key_b);
    checked.receive_for(&server, Duration::from_millis(300));
    assert_eq!(
        fresh_session_key(&addresses, config_a.clone()),
        Some(id(NEW))
    );
    assert_eq!(connects(&client), connects_before, "running links stay up");
    assert_eq!(link_keys(&client), vec![Some(id(OLD)); 2]);

    // One host retires the old key: the links under it are replaced by connections under
    // the new one (a server asks its client to connect again), never down, and no message
    // is lost or repeated.
    client.take_events();
    server.take_events();
    let (first, second) = match order {
        Retires::ServerFirst => (&key_b, &key_a),
        Retires::ClientFirst => (&key_a, &key_b),
    };
    std::fs::remove_file(previous_key_path(first)).expect("retire on the first host");
    within(LONG).until("both links under the new key", || {
        link_keys(&client) == vec![Some(id(NEW)); 2]
    });
    checked.receive_for(&server, Duration::from_millis(300));
    std::fs::remove_file(previous_key_path(second)).expect("retire on the second host");
    checked.receive_for(&server, Duration::from_millis(300));
    assert_eq!(link_keys(&client), vec![Some(id(NEW)); 2]);
    assert!(
        connects(&client) >= connects_before + 2,
        "the links were replaced"
    );
    // What the daemons put in their status (a u128 session id used to make this fail).
    let stats = serde_json::to_value(client.stats()).expect("statistics as JSON");
    assert_eq!(
        stats["links"][0]["key"],
        serde_json::json!(id(NEW)),
        "{stats}"
    );
    for session in [&client, &server] {
        let down: Vec<SessionEvent> = session
            .take_events()
            .into_iter()
            .filter(|event| matches!(event, SessionEvent::LinkDown { .. }))
            .collect();
        assert!(
            down.is_empty(),
            "a link went down for the key change: {down:?}"
        );
    }

    stop.store(true, Ordering::SeqCst);
    let sent = writer.join().expect("writer");
    while checked.received < sent {
        checked.receive_one(&server);
    }
    assert!(server
        .recv(Duration::from_millis(50))
        .expect("open")
        .is_none());

    // A host that still has only the retired key is refused.
    let mut stale = config("host-a");
    stale.keys = Psk::from_bytes(OLD).expect("psk").into();
    let intruder = Session::connect(addresses, "blk:stale", stale).expect("connect");
    within(LONG).until("the retired key fails authentication", || {
        intruder.stats().links[0].auth_failures > 0
    });
    assert!(!intruder.peer_reachable());
}
