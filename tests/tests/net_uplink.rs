//! The redundant uplink of `vhost-net-ft`, daemon to daemon: a guest on hostA, its NIC's
//! daemons on hostA (serving QEMU) and hostB (standby), linked over both A-links. A LAN
//! client holds one TCP connection to the guest and exchanges request/response rounds while
//! hostA's VM bridge loses its uplink port and gets it back.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ftvm_tests::guest::{Guest, Nic};
use ftvm_tests::hosts::Hosts;
use ftvm_tests::net::{connect_in, echo_guest, PacketCapture, Rounds, ECHO_PORT};
use ftvm_tests::nic_daemon::{NicDaemon, GUEST_IP, GUEST_MAC};
use ftvm_tests::scratch_dir;
use ftvm_tests::wait::poll_until;

fn start_daemon(hosts: &Hosts, dir: &Path, host: usize, psk: &Path) -> NicDaemon {
    NicDaemon::start(hosts, dir, host, psk, &[])
}

fn status(daemon: &NicDaemon) -> serde_json::Value {
    daemon.status()
}

fn counter(status: &serde_json::Value, name: &str) -> u64 {
    status[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

/// A marker in every line of the bulk echo: it must never show in clear on the A-links.
const CANARY: &str = "FTVM-NIC-CANARY-";

/// Sends `bytes` lines of the canary pattern through the guest's echo on `stream` while
/// reading the echo back (a thread writes, so neither side's buffers can fill up), and
/// returns what came back.
fn bulk_echo(stream: TcpStream, bytes: usize) -> (Vec<u8>, Vec<u8>) {
    let mut sent = Vec::with_capacity(bytes + 64);
    let mut line = 0u64;
    while sent.len() < bytes {
        sent.extend_from_slice(format!("{CANARY}{line:08}\n").as_bytes());
        line += 1;
    }
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let to_send = sent.clone();
    let writing = std::thread::spawn(move || writer.write_all(&to_send));
    let mut echoed = vec![0u8; sent.len()];
    (&stream)
        .read_exact(&mut echoed)
        .expect("the echo of the bulk data");
    writing.join().expect("writer").expect("bulk write");
    (sent, echoed)
}

/// Sets both A-links of hostA up or down.
fn set_alinks(hosts: &Hosts, up: bool) {
    for link in ["alink1", "alink2"] {
        let done = Command::new("ip")
            .args(["-n", &hosts.namespace("hostA"), "link", "set", link])
            .arg(if up { "up" } else { "down" })
            .status()
            .expect("ip link set");
        assert!(done.success());
    }
}

fn set_uplink(hosts: &Hosts, up: bool) {
    let done = Command::new("ip")
        .args(["-n", &hosts.namespace("hostA"), "link", "set", "uplink"])
        .arg(if up { "up" } else { "down" })
        .status()
        .expect("ip link set");
    assert!(done.success());
}

#[test]
fn an_uplink_cut_moves_traffic_through_the_peer_and_back_on_one_tcp_connection() {
    let hosts = Hosts::up();
    let dir = scratch_dir("net-uplink");
    let psk = dir.path().join("pair.psk");
    std::fs::write(&psk, "net-uplink test key, 32 bytes!!\n").expect("psk");
    let daemon_a = start_daemon(&hosts, dir.path(), 0, &psk);
    let daemon_b = start_daemon(&hosts, dir.path(), 1, &psk);

    let mut config = echo_guest("net-uplink", GUEST_IP);
    config.netns = Some(hosts.namespace("hostA"));
    config.nics.push(Nic {
        socket: daemon_a.socket.clone(),
        mac: GUEST_MAC.into(),
        queues: 1,
    });
    let guest = Guest::boot(&config, dir.path());
    guest.wait_for_line(Duration::from_secs(120), |line| line.starts_with("NET-UP"));
    poll_until(
        Duration::from_secs(10),
        "the daemons to see each other",
        || {
            status(&daemon_a)["redundancy"]["peer_reachable"] == true
                && status(&daemon_b)["redundancy"]["peer_reachable"] == true
        },
    );
    let before = status(&daemon_a);
    assert_eq!(before["redundancy"]["path"], "local", "{before}");
    assert_eq!(before["redundancy"]["uplink_up"], true, "{before}");
    assert_eq!(before["redundancy"]["peer_uplink_up"], true, "{before}");

    let client = hosts.namespace("client");
    let rounds = Rounds::start(connect_in(&client, &format!("{GUEST_IP}:{ECHO_PORT}")));
    rounds.wait_for(20, Duration::from_secs(60), "rounds on the local path");

    // Cut: the traffic moves through hostB.
    let relayed_before = counter(&status(&daemon_b), "relay_to_lan_packets");
    let cut = Instant::now();
    set_uplink(&hosts, false);
    poll_until(
        Duration::from_secs(5),
        "hostA to take the peer path",
        || status(&daemon_a)["redundancy"]["path"] == "peer",
    );
    let switched_after = cut.elapsed();
    rounds.wait_for(50, Duration::from_secs(60), "rounds through the peer host");
    let gap = rounds.longest_gap_since(cut);
    let on_peer = status(&daemon_b);
    println!(
        "uplink cut: peer path after {switched_after:?}; longest pause between round trips {gap:?}"
    );
    assert!(
        counter(&on_peer, "relay_to_lan_packets") > relayed_before + 50,
        "{on_peer}"
    );
    assert!(counter(&on_peer, "relay_to_peer_packets") > 50, "{on_peer}");
    assert_eq!(
        on_peer["redundancy"]["relaying_for_peer"], true,
        "{on_peer}"
    );
    assert!(
        gap < Duration::from_secs(5),
        "the connection stalled for {gap:?}"
    );

    // Bulk data through the peer path, both ways, while everything that crosses hostA's
    // interfaces (the A-links; its uplink is down) is captured: it arrives intact and in
    // order, the guest's frames share link messages when it queues several at once, and
    // none of it crosses the A-links in clear.
    let capture = PacketCapture::start(&hosts.namespace("hostA"), 64 << 20);
    let before_bulk = status(&daemon_a);
    let bulk_start = Instant::now();
    let (sent, echoed) = bulk_echo(
        connect_in(&client, &format!("{GUEST_IP}:{ECHO_PORT}")),
        1 << 20,
    );
    let after_bulk = status(&daemon_a);
    let frames = counter(&after_bulk, "peer_tx_packets") - counter(&before_bulk, "peer_tx_packets");
    let messages =
        counter(&after_bulk, "peer_tx_messages") - counter(&before_bulk, "peer_tx_messages");
    let captured = capture.captured_bytes();
    println!(
        "bulk echo of {} bytes through the peer host in {:?}: {frames} guest frames in \
         {messages} link messages; {captured} bytes captured on hostA",
        sent.len(),
        bulk_start.elapsed()
    );
    assert!(echoed == sent, "the bulk echo came back changed");
    assert!(
        captured >= 2 * sent.len(),
        "the capture saw both directions of the bulk data: {captured} bytes"
    );
    assert!(
        !capture.contains(CANARY.as_bytes()),
        "guest frames crossed the A-links in clear"
    );
    assert!(
        messages > 0 && messages < frames,
        "frames queued together share messages: {frames} frames, {messages} messages"
    );
    drop(capture);

    // Both A-links lost while on the peer path: no path is left (hostA falls back to its
    // dead uplink); when they return, the sessions reconnect, the peer path resumes and the
    // same TCP connection carries on (TCP retransmits across the outage).
    set_alinks(&hosts, false);
    poll_until(
        Duration::from_secs(10),
        "hostA to give up the unreachable peer",
        || {
            let now = status(&daemon_a);
            now["redundancy"]["path"] == "local" && now["redundancy"]["peer_reachable"] == false
        },
    );
    // What each daemon queued for the other meanwhile is dropped with its session, never
    // delivered late (a stale "relay for me" could move the MAC back to hostB's uplink).
    for daemon in [&daemon_a, &daemon_b] {
        poll_until(
            Duration::from_secs(10),
            "the daemons to drop their stale queues with their sessions",
            || daemon.log_has("a new session started"),
        );
    }
    let links_back = Instant::now();
    set_alinks(&hosts, true);
    poll_until(
        Duration::from_secs(10),
        "hostA to take the peer path again",
        || status(&daemon_a)["redundancy"]["path"] == "peer",
    );
    println!(
        "A-links back: peer path again after {:?}",
        links_back.elapsed()
    );
    rounds.wait_for(
        20,
        Duration::from_secs(60),
        "rounds after the A-links returned",
    );
    println!(
        "A-links back: longest pause between round trips {:?}",
        rounds.longest_gap_since(links_back)
    );

    // Restore: the traffic comes back to hostA.
    let restored = Instant::now();
    set_uplink(&hosts, true);
    poll_until(
        Duration::from_secs(5),
        "hostA to take the local path",
        || status(&daemon_a)["redundancy"]["path"] == "local",
    );
    println!("uplink restored: local path after {:?}", restored.elapsed());
    poll_until(Duration::from_secs(5), "hostB to stop relaying", || {
        status(&daemon_b)["redundancy"]["relaying_for_peer"] == false
    });
    rounds.wait_for(10, Duration::from_secs(60), "rounds after the way back");
    let settled = status(&daemon_b);
    rounds.wait_for(
        50,
        Duration::from_secs(60),
        "rounds on the local path again",
    );
    let later = status(&daemon_b);
    for name in ["relay_to_lan_packets", "relay_to_peer_packets"] {
        assert_eq!(
            counter(&settled, name),
            counter(&later, name),
            "hostB still relays: {later}"
        );
    }
    let gap = rounds.longest_gap_since(restored);
    println!("uplink restored: longest pause between round trips {gap:?}");
    assert!(
        gap < Duration::from_secs(5),
        "the connection stalled for {gap:?}"
    );
    rounds.check();
    drop(rounds);

    let end = status(&daemon_a);
    // To the peer, back (A-links lost), to the peer again, back (uplink restored).
    assert_eq!(end["redundancy"]["path_switches"], 4, "{end}");
    assert_eq!(end["tx_dropped_malformed"], 0, "{end}");
    assert_eq!(end["peer_rx_dropped"], 0, "{end}");
    drop(guest);
}
