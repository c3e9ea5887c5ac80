//! A Level 2 VM whose NIC has a redundant uplink through the peer. When hostA's uplink (the
//! port of its VM bridge to the LAN) goes down, the guest's frames go over the A-links to
//! hostB's standby NIC daemon, which relays them through its own bridge: the client's TCP
//! connection to the guest goes on. When the uplink returns, the traffic goes back to hostA.
//! After a planned failover the roles swap: QEMU on hostB uses the daemon that stood by
//! there, and hostA's daemon stays to relay.

use std::time::{Duration, Instant};

use ftvm_tests::cluster::{Cluster, ClusterOptions, HOSTS};

use ftvm_tests::net::{echo_guest, try_connect_in, Rounds, ECHO_PORT};
use ftvm_tests::wait::poll_for;
use serde_json::Value;

const A: usize = 0;
const B: usize = 1;
const GUEST_IP: &str = "10.77.0.10";
const GUEST_MAC: &str = "52:54:00:77:00:11";
/// The goal for the longest pause of the connection when the path changes.
const GAP_GOAL: Duration = Duration::from_secs(1);
/// What the test enforces: well above the goal, so that TCG load does not make it flaky.
const GAP_LIMIT: Duration = Duration::from_secs(5);
/// How long the path may take to change once the uplink's link changed.
const SWITCH_LIMIT: Duration = Duration::from_secs(5);

/// Polls a host's NIC daemon (its control socket) until `check` holds; returns its status.
fn wait_nic(
    cluster: &Cluster,
    host: usize,
    timeout: Duration,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let what = format!("{}'s NIC daemon: {what}", HOSTS[host]);
    poll_for(timeout, &what, || cluster.nic_status(host), check)
}

/// Polls the NIC's entry in a host's `ftvm status --json` until `check` holds.
fn wait_summary(
    cluster: &Cluster,
    host: usize,
    timeout: Duration,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let what = format!("{}'s ftvm status of the NIC: {what}", HOSTS[host]);
    poll_for(timeout, &what, || cluster.nic_summary(host), check)
}

/// hostB's relay counters: (frames of hostA's guest written to hostB's TAP, frames from
/// hostB's TAP sent to hostA's guest).
fn relay_counters(cluster: &Cluster, host: usize) -> (u64, u64) {
    let status = cluster
        .nic_status(host)
        .unwrap_or_else(|| panic!("{}'s NIC daemon does not answer", HOSTS[host]));
    let counter = |name: &str| {
        status[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no {name} in {}'s NIC status: {status:#}", HOSTS[host]))
    };
    (
        counter("relay_to_lan_packets"),
        counter("relay_to_peer_packets"),
    )
}

fn path_is(status: &Value, path: &str) -> bool {
    status["redundancy"]["path"] == path
}

/// The cluster with the VM running on hostA, its NIC daemons on both hosts paired.
fn boot(name: &str) -> Cluster {
    let guest = echo_guest("ftvm-uplink-vm", GUEST_IP);
    let options = ClusterOptions {
        level: 2,
        nic_mac: Some(GUEST_MAC.into()),
        nic_redundant_uplink: true,
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::new(name, &guest, &options);
    cluster.start_all();
    cluster.wait_vm(A, Duration::from_secs(60), "running on hostA", |vm| {
        vm["role"] == "Primary" && vm["vm_pid"].is_u64()
    });
    cluster.wait_console(A, &format!("NET-UP {GUEST_MAC}"));
    wait_paired(&cluster, A);
    cluster
}

/// Both hosts run the NIC's daemon, paired over the A-links: the VM host's serves the
/// guest on the local path, the other's waits in standby.
fn wait_paired(cluster: &Cluster, vm_host: usize) {
    let standby = 1 - vm_host;
    let patience = Duration::from_secs(30);
    wait_nic(cluster, vm_host, patience, "paired, path local", |status| {
        path_is(status, "local")
            && status["redundancy"]["peer_reachable"] == true
            && status["link"]["frontend_connected"] == true
    });
    wait_nic(cluster, standby, patience, "standby, paired", |status| {
        status["redundancy"]["peer_reachable"] == true
            && status["redundancy"]["peer_guest_attached"] == true
            && status["link"]["frontend_connected"] == false
    });
    let patience = Duration::from_secs(5);
    wait_summary(cluster, vm_host, patience, "path local", |nic| {
        nic["path"] == "local" && nic["uplink_up"] == true && nic["peer_reachable"] == true
    });
    wait_summary(cluster, standby, patience, "standby daemon", |nic| {
        nic["pid"].is_u64() && nic["guest_attached"] == false
    });
}

/// The client's request/response loop on one TCP connection to the VM (running on
/// `where_`), once 20 rounds went through.
fn start_rounds(cluster: &Cluster, where_: &str) -> Rounds {
    let client = cluster.hosts.namespace("client");
    let stream = try_connect_in(
        &client,
        &format!("{GUEST_IP}:{ECHO_PORT}"),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|| panic!("the client does not reach the VM on {where_}"));
    let rounds = Rounds::start(stream);
    rounds.wait_for(20, Duration::from_secs(30), "the first rounds");
    rounds
}

#[test]
fn when_the_uplink_fails_the_connection_goes_on_through_the_peer() {
    let cluster = boot("uplink-redundancy");
    let rounds = start_rounds(&cluster, "hostA");
    let relayed_before = relay_counters(&cluster, B);

    // hostA's uplink fails: the path goes through hostB.
    let cut = Instant::now();
    cluster.set_links(A, &["uplink"], false);
    wait_nic(&cluster, A, SWITCH_LIMIT, "path peer", |status| {
        path_is(status, "peer") && status["redundancy"]["uplink_up"] == false
    });
    let switched = cut.elapsed();
    rounds.wait_for(50, Duration::from_secs(60), "through hostB");
    let gap_down = rounds.longest_gap_since(cut);
    println!(
        "uplink down: hostA's NIC path was \"peer\" {:.3} s after the cut; longest pause of \
         the TCP connection {:.3} s (goal < {:.1} s, enforced < {:.1} s)",
        switched.as_secs_f64(),
        gap_down.as_secs_f64(),
        GAP_GOAL.as_secs_f64(),
        GAP_LIMIT.as_secs_f64()
    );
    assert!(
        gap_down < GAP_LIMIT,
        "the connection paused {gap_down:?} when the uplink failed"
    );
    let relayed = relay_counters(&cluster, B);
    println!(
        "hostB relayed {} frames to the LAN and {} to hostA's guest",
        relayed.0 - relayed_before.0,
        relayed.1 - relayed_before.1
    );
    assert!(
        relayed.0 > relayed_before.0 && relayed.1 > relayed_before.1,
        "hostB's relay counters did not grow: {relayed_before:?} -> {relayed:?}"
    );
    wait_nic(&cluster, B, Duration::from_secs(5), "relaying", |status| {
        status["redundancy"]["relaying_for_peer"] == true
            && status["redundancy"]["peer_uplink_up"] == false
    });
    wait_summary(&cluster, A, Duration::from_secs(5), "path peer", |nic| {
        nic["path"] == "peer" && nic["uplink_up"] == false
    });

    // The uplink returns: the path comes back to hostA.
    let restored = Instant::now();
    cluster.set_links(A, &["uplink"], true);
    wait_nic(
        &cluster,
        A,
        2 * SWITCH_LIMIT,
        "path local again",
        |status| path_is(status, "local") && status["redundancy"]["uplink_up"] == true,
    );
    let switched_back = restored.elapsed();
    rounds.wait_for(50, Duration::from_secs(60), "after the uplink returned");
    let gap_up = rounds.longest_gap_since(restored);
    println!(
        "uplink up: hostA's NIC path was \"local\" {:.3} s after the link came back; longest \
         pause of the TCP connection {:.3} s",
        switched_back.as_secs_f64(),
        gap_up.as_secs_f64()
    );
    assert!(
        gap_up < GAP_LIMIT,
        "the connection paused {gap_up:?} when the uplink returned"
    );

    // The traffic is back on hostA: hostB relays nothing while more rounds complete.
    wait_nic(
        &cluster,
        B,
        Duration::from_secs(5),
        "no longer relaying",
        |status| status["redundancy"]["relaying_for_peer"] == false,
    );
    rounds.wait_for(10, Duration::from_secs(30), "frames in flight drain");
    let settled = relay_counters(&cluster, B);
    rounds.wait_for(50, Duration::from_secs(60), "back on hostA");
    let after = relay_counters(&cluster, B);
    assert_eq!(
        after, settled,
        "hostB still relays (relay_to_lan, relay_to_peer) while the uplink of hostA is up"
    );
    wait_summary(&cluster, A, Duration::from_secs(5), "path local", |nic| {
        nic["path"] == "local" && nic["uplink_up"] == true
    });
    println!(
        "{} rounds on one TCP connection through the uplink's failure and return",
        rounds.count()
    );
}

#[test]
fn after_a_planned_failover_the_standby_daemon_serves_the_vm_and_the_old_host_relays() {
    let cluster = boot("uplink-failover");
    let pid = |host: usize| {
        cluster
            .nic_summary(host)
            .and_then(|nic| nic["pid"].as_u64())
            .unwrap_or_else(|| panic!("no NIC daemon on {}", HOSTS[host]))
    };
    let daemons = (pid(A), pid(B));
    cluster.wait_vm(A, Duration::from_secs(60), "Protected", |vm| {
        vm["role"] == "Primary" && vm["state"] == "Protected"
    });
    cluster.wait_vm(B, Duration::from_secs(30), "UpToDate", |vm| {
        vm["role"] == "Secondary" && vm["disks"][0]["replication"]["disk_state"] == "UpToDate"
    });
    let (ok, text) = cluster.ftvm(A, &["failover", "vm1"]);
    assert!(ok, "{text}");
    cluster.wait_vm(B, Duration::from_secs(30), "running on hostB", |vm| {
        vm["role"] == "Primary" && vm["vm_pid"].is_u64()
    });
    cluster.wait_vm(A, Duration::from_secs(30), "hostA secondary", |vm| {
        vm["role"] == "Secondary" && vm["vm_pid"].is_null()
    });
    cluster.wait_console(B, &format!("NET-UP {GUEST_MAC}"));
    wait_paired(&cluster, B);
    assert_eq!(
        (pid(A), pid(B)),
        daemons,
        "the NIC daemons of both hosts are the ones that ran before the failover"
    );

    // hostB's uplink fails: hostA, which ran the VM before, relays for it.
    let rounds = start_rounds(&cluster, "hostB");
    let relayed_before = relay_counters(&cluster, A);
    let cut = Instant::now();
    cluster.set_links(B, &["uplink"], false);
    wait_nic(&cluster, B, SWITCH_LIMIT, "path peer", |status| {
        path_is(status, "peer")
    });
    rounds.wait_for(30, Duration::from_secs(60), "through hostA");
    let gap = rounds.longest_gap_since(cut);
    let relayed = relay_counters(&cluster, A);
    println!(
        "after the failover, hostB's uplink down: longest pause {:.3} s; hostA relayed {} \
         frames to the LAN and {} to the guest",
        gap.as_secs_f64(),
        relayed.0 - relayed_before.0,
        relayed.1 - relayed_before.1
    );
    assert!(gap < GAP_LIMIT, "the connection paused {gap:?}");
    assert!(
        relayed.0 > relayed_before.0 && relayed.1 > relayed_before.1,
        "hostA's relay counters did not grow: {relayed_before:?} -> {relayed:?}"
    );
    cluster.set_links(B, &["uplink"], true);
    wait_nic(
        &cluster,
        B,
        2 * SWITCH_LIMIT,
        "path local again",
        |status| path_is(status, "local"),
    );
    rounds.wait_for(20, Duration::from_secs(60), "back on hostB");
}
