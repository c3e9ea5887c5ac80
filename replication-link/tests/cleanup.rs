//! Closing a session and a listener stops every thread they started. This file holds a single
//! test so that no other test's threads run in the same process while it counts.

mod support;

use std::time::Duration;

use replication_link::Session;
use support::{accept, config, listener, recv_one, within, Relay, LONG};

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |tasks| tasks.count())
}

#[test]
fn close_stops_every_thread() {
    let baseline = thread_count();
    assert!(baseline > 0, "/proc/self/task is readable");
    {
        let listener = listener(2, config("host-b"));
        let relay = Relay::start(listener.local_addrs()[1]);
        let addresses = vec![listener.local_addrs()[0], relay.address()];
        let client = Session::connect(addresses, "blk:cleanup", config("host-a")).expect("connect");
        let server = accept(&listener);
        within(LONG).until("both links up", || support::links_up(&client, 2));
        client.send(b"x", vec![1; 1000]).expect("send");
        assert_eq!(recv_one(&server).payload, vec![1; 1000]);
        server.send(b"y", vec![2; 1000]).expect("send");
        assert_eq!(recv_one(&client).payload, vec![2; 1000]);
        // A half-open handshake must not keep the listener's threads alive either.
        let _silent = std::net::TcpStream::connect(listener.local_addrs()[0]).expect("connect");
        relay.kill();
        client.close();
        drop(server);
        listener.close();
    }
    within(Duration::from_secs(5)).for_value(
        &format!("the thread count back to {baseline}"),
        || Some(thread_count()),
        |&count| count == baseline,
    );
}
