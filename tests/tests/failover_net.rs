//! A protected VM with a NIC (`vhost-net-ft` started by `ftvmd`): after hostA is lost, a LAN
//! client reaches the VM restarted on hostB at the same IP and MAC, without anyone touching
//! the client's ARP cache.

use std::process::Command;
use std::time::Duration;

use ftvm_tests::blk::status_json;
use ftvm_tests::cluster::{Cluster, ClusterOptions};
use ftvm_tests::net::{echo_guest, echo_rounds, try_connect_in, ECHO_PORT};

const A: usize = 0;
const B: usize = 1;
const GUEST_IP: &str = "10.77.0.10";
const GUEST_MAC: &str = "52:54:00:77:00:10";

fn client_neighbour(cluster: &Cluster) -> String {
    let output = Command::new("ip")
        .args([
            "-n",
            &cluster.hosts.namespace("client"),
            "neigh",
            "show",
            GUEST_IP,
        ])
        .output()
        .expect("ip neigh");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn after_a_host_loss_the_client_reaches_the_vm_at_the_same_ip_and_mac() {
    let guest = echo_guest("ftvm-net-vm", GUEST_IP);
    let options = ClusterOptions {
        nic_mac: Some(GUEST_MAC.into()),
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::new("failover-net", &guest, &options);
    cluster.start_all();
    cluster.wait_vm(A, Duration::from_secs(60), "running on hostA", |vm| {
        vm["role"] == "Primary" && vm["vm_pid"].is_u64()
    });
    cluster.wait_console(A, &format!("NET-UP {GUEST_MAC}"));
    let client = cluster.hosts.namespace("client");
    let address = format!("{GUEST_IP}:{ECHO_PORT}");
    let stream = try_connect_in(&client, &address, Duration::from_secs(30))
        .expect("the client reaches the VM on hostA");
    echo_rounds(stream, 20);
    let neighbour = client_neighbour(&cluster);
    assert!(
        neighbour.contains(GUEST_MAC),
        "client's ARP entry: {neighbour}"
    );

    let killed_at = cluster.kill_host(A);
    cluster.wait_vm(B, Duration::from_secs(30), "running on hostB", |vm| {
        vm["role"] == "Primary" && vm["vm_pid"].is_u64()
    });
    cluster.wait_console(B, &format!("NET-UP {GUEST_MAC}"));
    let stream = try_connect_in(&client, &address, Duration::from_secs(60))
        .expect("the client reaches the VM restarted on hostB");
    let reached = killed_at.elapsed();
    let latencies = echo_rounds(stream, 50);
    println!(
        "after the loss of hostA, the client's first TCP connection to the VM on hostB \
         succeeded {:.2} s after the kill; 50 round trips, max {:?}",
        reached.as_secs_f64(),
        latencies.iter().max().copied().unwrap_or_default()
    );
    // hostB's NIC daemon announced the MAC on the LAN when the VM started there.
    let control = cluster.dir.path().join("hostB/vm1/nic0.ctl");
    let status = status_json(&control).expect("hostB's NIC daemon answers status");
    assert!(status["announcements"].as_u64() >= Some(1), "{status}");
    assert_eq!(status["mac"], GUEST_MAC, "{status}");
    // Same MAC and IP: the client's ARP entry was never flushed and still names the MAC.
    let neighbour = client_neighbour(&cluster);
    assert!(
        neighbour.contains(GUEST_MAC),
        "client's ARP entry: {neighbour}"
    );
}
