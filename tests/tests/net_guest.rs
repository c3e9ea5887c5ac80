//! `vhost-net-ft` with a real QEMU guest (TCG) on hostA's VM bridge: a client on the LAN
//! pings the guest and runs TCP request/response against it, over one and two queue pairs.

use std::time::Duration;

use ftvm_tests::blk::status_json;
use ftvm_tests::guest::{Guest, GuestConfig, Nic};
use ftvm_tests::hosts::Hosts;
use ftvm_tests::net::{connect_in, echo_rounds};
use ftvm_tests::paths;
use ftvm_tests::process::Process;
use ftvm_tests::scratch_dir;
use ftvm_tests::wait::{poll_until, TIMEOUT};

const GUEST_IP: &str = "10.77.0.10";
const GUEST_MAC: &str = "52:54:00:77:00:10";
const PORT: u16 = 7000;

/// The guest brings its NIC up, then serves TCP with `cat` (echo) until the test ends.
fn echo_guest(queues: u16) -> GuestConfig {
    let script = format!(
        "ip link set eth0 up\n\
         ip addr add {GUEST_IP}/24 dev eth0\n\
         echo \"NET-UP $(cat /sys/class/net/eth0/address) queues $(ls /sys/class/net/eth0/queues | tr '\\n' ' ')\"\n\
         nc -ll -p {PORT} -e cat\n"
    );
    let mut guest = GuestConfig::new(&format!("net-{queues}q"), &script);
    guest.memory_mb = 256;
    guest.cpus = u32::from(queues);
    guest
}

fn net_daemon(hosts: &Hosts, dir: &std::path::Path, queues: u16) -> (Process, std::path::PathBuf) {
    let socket = dir.join("net.sock");
    let control = dir.join("net.ctl");
    let mut command = hosts.command("hostA", paths::binary("vhost-net-ft"));
    command
        .arg("--socket")
        .arg(&socket)
        .args(["--bridge", "vmbr0", "--mac", GUEST_MAC, "--queues"])
        .arg(queues.to_string())
        .arg("--control")
        .arg(&control);
    let daemon = Process::spawn("vhost-net-ft", command, &dir.join("net.log"));
    poll_until(TIMEOUT, "vhost-net-ft's socket", || {
        socket.exists() && control.exists()
    });
    (daemon, control)
}

/// The daemon's `status` JSON.
fn daemon_status(control: &std::path::Path) -> serde_json::Value {
    status_json(control).expect("vhost-net-ft answers status")
}

fn ping_and_echo(queues: u16) {
    let hosts = Hosts::up();
    let dir = scratch_dir(&format!("net-guest-{queues}q"));
    let (_daemon, control) = net_daemon(&hosts, dir.path(), queues);
    let mut config = echo_guest(queues);
    config.netns = Some(hosts.namespace("hostA"));
    config.nics.push(Nic {
        socket: dir.path().join("net.sock"),
        mac: GUEST_MAC.into(),
        queues,
    });
    let guest = Guest::boot(&config, dir.path());
    let up = guest.wait_for_line(Duration::from_secs(120), |line| line.starts_with("NET-UP"));
    assert!(up.contains(GUEST_MAC), "{up}");
    if queues > 1 {
        assert!(up.contains("rx-1") && up.contains("tx-1"), "{up}");
    }

    let client = hosts.namespace("client");
    let ping = hosts
        .command("client", "ping")
        .args(["-c", "5", "-i", "0.2", "-W", "5", GUEST_IP])
        .output()
        .expect("run ping");
    let text = String::from_utf8_lossy(&ping.stdout);
    assert!(
        ping.status.success(),
        "ping from the client failed:\n{text}"
    );
    assert!(text.contains("5 received, 0% packet loss"), "{text}");

    // One TCP connection, many request/response round trips, some larger than a segment.
    let stream = connect_in(&client, &format!("{GUEST_IP}:{PORT}"));
    let mut latencies = echo_rounds(stream, 200);
    latencies.sort();
    println!(
        "{queues} queue pair(s): 200 TCP round trips, median {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );

    let status = daemon_status(&control);
    let metrics = &status;
    assert!(metrics["tx_packets"].as_u64() > Some(200), "{status}");
    assert!(metrics["rx_packets"].as_u64() > Some(200), "{status}");
    assert_eq!(metrics["tx_dropped_malformed"], 0, "{status}");
    assert_eq!(status["link"]["tap_master"], "vmbr0", "{status}");
    drop(guest);
}

#[test]
fn a_client_pings_and_talks_tcp_to_the_guest_one_queue() {
    ping_and_echo(1);
}

#[test]
fn a_client_pings_and_talks_tcp_to_the_guest_two_queues() {
    ping_and_echo(2);
}
