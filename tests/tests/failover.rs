//! Automatic failover with `ftvmd` and `ftvm-witness` on namespace hosts, QEMU TCG guests.

use std::time::{Duration, Instant};

use ftvm_tests::cluster::{Cluster, ClusterOptions, HOSTS};
use ftvm_tests::guest::GuestConfig;

const A: usize = 0;
const B: usize = 1;
/// Records a writer may write (block `i` holds record `i`; block 0 is the boot marker).
const RECORDS: u32 = 4000;

/// First boot: marks the disk, then writes numbered records, each flushed, and reports
/// `ACK n` after the flush. A later boot (the failover) reports the last record present.
fn record_guest() -> GuestConfig {
    let script = "\
if dd if=/dev/vda bs=4096 count=1 2>/dev/null | grep -q ftvm-first-boot; then
  i=1
  while dd if=/dev/vda bs=4096 skip=$i count=1 2>/dev/null | head -n 1 | grep -q \"^ftvm-record $i\\$\"; do
    i=$((i + 1))
  done
  echo \"FOUND-UPTO $((i - 1))\"
  echo \"BOOT-COUNT $(dd if=/dev/vda bs=4096 count=1 2>/dev/null | grep -c ftvm-first-boot)\"
  exit 0
fi
echo ftvm-first-boot | dd of=/dev/vda bs=4096 conv=sync,fsync 2>/dev/null
i=1
while [ $i -le RECORDS ]; do
  echo \"ftvm-record $i\" | dd of=/dev/vda bs=4096 seek=$i conv=sync,fsync 2>/dev/null || { echo \"WRITE-FAILED $i\"; exit 1; }
  echo \"ACK $i\"
  i=$((i + 1))
done
echo WRITER-DONE
"
    .replace("RECORDS", &RECORDS.to_string());
    let mut guest = GuestConfig::new("ftvm-vm1", &script);
    guest.memory_mb = 256;
    guest
}

fn last_ack(console: &[String]) -> u64 {
    console
        .iter()
        .filter_map(|line| line.strip_prefix("ACK ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

fn found_upto(console: &[String]) -> Option<u64> {
    console
        .iter()
        .find_map(|line| line.strip_prefix("FOUND-UPTO ")?.trim().parse().ok())
}

/// Starts witness and both hosts; waits until the VM runs on hostA, mirrored and in sync.
fn protected_cluster(name: &str) -> Cluster {
    let mut cluster = Cluster::new(name, &record_guest(), &ClusterOptions::default());
    cluster.start_witness();
    cluster.start_ftvmd(A);
    cluster.start_ftvmd(B);
    cluster.wait_vm(A, Duration::from_secs(60), "Protected on hostA", |vm| {
        vm["role"] == "Primary" && vm["state"] == "Protected" && vm["vm_pid"].is_u64()
    });
    cluster
}

fn wait_acks(cluster: &Cluster, host: usize, count: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let acked = last_ack(&cluster.console(host));
        if acked >= count {
            return acked;
        }
        assert!(
            Instant::now() < deadline,
            "the guest acknowledged only {acked} records; console:\n{}",
            cluster.console(host).join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn host_loss_fails_over_to_the_peer_with_every_acknowledged_record() {
    let mut cluster = protected_cluster("failover-host-loss");
    wait_acks(&cluster, A, 30);
    let killed_at = cluster.kill_host(A);
    let acknowledged = last_ack(&cluster.console(A));
    let promoted = cluster.wait_vm(B, Duration::from_secs(30), "primary on hostB", |vm| {
        vm["role"] == "Primary" && vm["vm_pid"].is_u64()
    });
    let to_qemu = killed_at.elapsed();
    println!(
        "host loss: QEMU running on hostB {:.2} s after hostA was killed (peer timeout 1.0 s, \
         claim delay 0.5 s); generation {}",
        to_qemu.as_secs_f64(),
        promoted["generation"]
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let found = loop {
        if let Some(found) = found_upto(&cluster.console(B)) {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted guest did not report; console:\n{}",
            cluster.console(B).join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        found >= acknowledged,
        "the restarted guest found records up to {found}, but {acknowledged} were acknowledged"
    );
    println!("acknowledged {acknowledged} records before the loss; hostB's guest found {found}");
    let record = cluster.witness_record();
    assert_eq!(record["holder"], HOSTS[B], "witness record: {record}");
    assert_eq!(cluster.acting_primaries(), vec![HOSTS[B]]);

    // hostA comes back: with no command typed, it becomes hostB's secondary and a delta
    // resync (not a full one) makes the VM Protected again.
    cluster.set_links(A, &["alink1", "alink2", "lan0"], true);
    cluster.start_ftvmd(A);
    let secondary = cluster.wait_vm(A, Duration::from_secs(60), "secondary of hostB", |vm| {
        vm["role"] == "Secondary" && vm["primary"] == HOSTS[B]
    });
    assert!(secondary["vm_pid"].is_null(), "no VM may run on the secondary");
    let protected = cluster.wait_vm(B, Duration::from_secs(60), "Protected again", |vm| {
        vm["state"] == "Protected" && vm["disks"][0]["replication"]["resync"]["bytes_total"].as_u64() > Some(0)
    });
    let resynced = protected["disks"][0]["replication"]["resync"]["bytes_total"]
        .as_u64()
        .unwrap_or(u64::MAX);
    let disk = ClusterOptions::default().disk_bytes;
    println!("re-protection: delta resync of {resynced} bytes of a {disk}-byte disk");
    assert!(
        resynced < disk / 4,
        "re-protection resynced {resynced} of {disk} bytes: not a delta resync"
    );
    cluster.wait_vm(A, Duration::from_secs(30), "UpToDate secondary", |vm| {
        vm["disks"][0]["replication"]["disk_state"] == "UpToDate"
    });
    assert_eq!(cluster.acting_primaries(), vec![HOSTS[B]]);
    // The restarted guest has finished (it only read), so the copies must be identical.
    let (image_a, image_b) = (
        std::fs::read(cluster.image(A)).expect("read hostA image"),
        std::fs::read(cluster.image(B)).expect("read hostB image"),
    );
    assert!(image_a == image_b, "after re-protection the two copies differ");
}
