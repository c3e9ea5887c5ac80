//! Failover with a failed copy (issue 10, first finding): two hosts with `ftvmd`, a witness,
//! a Level 2 VM; hostB's image runs out of space (a real ENOSPC from `ftvm-fault-fs`). The
//! primary goes on alone only at a generation the witness granted, and when hostA is then
//! lost, hostB, whose copy misses acknowledged writes, is never granted nor promoted.

use std::time::Duration;

use ftvm_tests::blk::control_json;
use ftvm_tests::cluster::{Cluster, ClusterOptions, HOSTS, VM};
use ftvm_tests::fault_fs::FaultFs;
use ftvm_tests::records::{cluster_writer, last_ack, wait_acks, wait_found};
use ftvm_tests::wait::Wait;

const A: usize = 0;
const B: usize = 1;

/// Records the guest may write: more than the test waits for.
const RECORDS: u32 = 15_000;

#[test]
fn a_copy_that_failed_writes_is_never_promoted() {
    let fault_fs = FaultFs::start();
    let mut cluster = Cluster::new(
        "failover-faults",
        &cluster_writer(RECORDS),
        &ClusterOptions::default(),
    );
    // hostB's image lives on the fault-injecting file system (its metadata beside the link).
    cluster.put_image_on(B, &fault_fs);
    cluster.start_all();
    let protected = cluster.wait_vm(A, Duration::from_secs(60), "Protected on hostA", |vm| {
        vm["role"] == "Primary" && vm["state"] == "Protected" && vm["vm_pid"].is_u64()
    });
    let generation = protected["generation"].as_u64().expect("generation");
    wait_acks(&cluster, A, 20);

    // hostB's disk fills up.
    fault_fs.command("fail write errno=ENOSPC file=hostB.img");
    let degraded = cluster.wait_vm(A, Duration::from_secs(60), "hostA alone", |vm| {
        vm["generation"].as_u64() > Some(generation) && vm["vm_pid"].is_u64()
    });
    let record = cluster.witness_record();
    assert_eq!(record["holder"], HOSTS[A], "{record}");
    assert!(
        record["generation"].as_u64() >= degraded["generation"].as_u64(),
        "{record}"
    );
    cluster.wait_vm(B, Duration::from_secs(30), "hostB's copy failed", |vm| {
        vm["disks"][0]["replication"]["disk_state"] == "Failed"
    });
    // The guest goes on without an error.
    let before = last_ack(&cluster.console(A));
    wait_acks(&cluster, A, before + 20);
    ftvm_tests::records::assert_no_write_failed(&cluster.console(A));
    let (_, events) = cluster.ftvm(A, &["events"]);
    assert!(
        events.contains("hostB") && events.contains("failed"),
        "no event names the failed copy:\n{events}"
    );

    // hostA is lost. hostB's copy misses writes the guest was told are on disk: it must
    // neither be granted nor start the VM, however long it waits.
    let acknowledged = last_ack(&cluster.console(A));
    // (hostA may have claimed more than one generation alone: a loaded host can lose its
    // peer's heartbeats for a moment just then. What counts is that none goes to hostB.)
    let before_kill = cluster.witness_record();
    cluster.kill_host(A);
    Wait::up_to(Duration::from_secs(6))
        .every(Duration::from_millis(100))
        .sample(|| {
            if let Some(vm) = cluster.vm_status(B) {
                assert!(
                    vm["role"] != "Primary" && vm["vm_pid"].is_null(),
                    "hostB took over with a copy that failed writes: {vm}"
                );
            }
        });
    let record = cluster.witness_record();
    assert_eq!(record["holder"], HOSTS[A], "{record}");
    assert_eq!(record["generation"], before_kill["generation"], "{record}");

    // hostA returns: the VM runs there again and finds every acknowledged record.
    cluster.set_links(A, &["alink1", "alink2", "lan0"], true);
    cluster.start_ftvmd(A);
    let found = wait_found(&cluster, A);
    assert!(
        found >= acknowledged,
        "the guest found records up to {found}, {acknowledged} were acknowledged"
    );

    // The disk is repaired: hostB's copy is resynced and the VM is Protected again.
    fault_fs.clear();
    let control = cluster.dir.path().join(HOSTS[B]).join(VM).join("disk0.ctl");
    let reply = control_json(&control, "repair").expect("hostB's disk daemon answers");
    assert_eq!(reply["ok"], true, "repair refused: {reply}");
    cluster.wait_vm(A, Duration::from_secs(60), "Protected again", |vm| {
        vm["state"] == "Protected"
    });
}
