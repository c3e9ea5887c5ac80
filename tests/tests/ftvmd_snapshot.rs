//! `ftvm snapshot` with ftvmd (issue 13): a snapshot of a running protected VM's two disks
//! at one point (the guest paused meanwhile), on both hosts (the images on XFS, for
//! reflinks), a revert that reboots the guest into the old data of both disks without a
//! resync, and a failover after which the peer's copies hold the old data too. On ext4 the
//! snapshot is refused with the reason, and an application-consistent one of a guest that
//! runs no agent too.

use std::time::{Duration, Instant};

use ftvm_tests::cluster::{Cluster, ClusterOptions};
use ftvm_tests::guest::GuestConfig;
use ftvm_tests::xfs::XfsMount;

const A: usize = 0;
const B: usize = 1;

/// The guest reads both disks' first sectors at boot. On blank disks it writes OLD to
/// each, then, 15 s later, NEW (the test takes the snapshot in between); otherwise it only
/// says what it found.
const SCRIPT: &str = r#"
seen=$(head -c 8 /dev/vda | tr -d '\000')
seen1=$(head -c 8 /dev/vdb | tr -d '\000')
echo "BOOT-SAW:[$seen][$seen1]"
if [ -z "$seen" ]; then
    echo OLD-DATA > /tmp/old
    dd if=/tmp/old of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null &&
        dd if=/tmp/old of=/dev/vdb bs=512 count=1 conv=sync,fsync 2>/dev/null && echo WROTE-OLD
    sleep 15
    echo NEW-DATA > /tmp/new
    dd if=/tmp/new of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null &&
        dd if=/tmp/new of=/dev/vdb bs=512 count=1 conv=sync,fsync 2>/dev/null && echo WROTE-NEW
fi
while true; do sleep 60; done
"#;

fn cluster(name: &str, second_disk: bool) -> Cluster {
    let mut guest = GuestConfig::new("ftvm-snapshot", SCRIPT);
    guest.memory_mb = 128;
    let options = ClusterOptions {
        second_disk,
        ..ClusterOptions::default()
    };
    Cluster::new(name, &guest, &options)
}

fn count(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|line| line.contains(needle)).count()
}

fn wait_protected(cluster: &Cluster, host: usize, what: &str) -> serde_json::Value {
    cluster.wait_vm(host, Duration::from_secs(90), what, |vm| {
        vm["role"] == "Primary" && vm["state"] == "Protected" && vm["vm_pid"].is_u64()
    })
}

fn resync_bytes(vm: &serde_json::Value) -> Vec<serde_json::Value> {
    vm["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|disk| disk["replication"]["resync"]["bytes_done"].clone())
        .collect()
}

#[test]
fn snapshot_then_revert_on_xfs_and_the_peer_holds_the_old_data_after_a_failover() {
    let xfs = XfsMount::new("ftvmd-snapshot");
    let mut cluster = cluster("ftvmd-snapshot", true);
    // Each host's images on the XFS (their paths in the configuration become links).
    for (host, disk) in [(A, 0), (B, 0), (A, 1), (B, 1)] {
        let image = if disk == 0 {
            cluster.image(host)
        } else {
            cluster.second_image(host)
        };
        let size = std::fs::metadata(&image).expect("the host's image").len();
        let target = xfs.path().join(format!("host{host}-disk{disk}.img"));
        ftvm_tests::create_image(&target, size);
        std::fs::remove_file(&image).expect("remove the host's image");
        std::os::unix::fs::symlink(&target, &image).expect("symlink");
    }
    cluster.start_all();
    wait_protected(&cluster, A, "Protected on hostA");
    cluster.wait_console(A, "WROTE-OLD");

    let (ok, text) = cluster.ftvm(B, &["snapshot", "create", "vm1", "s1"]);
    assert!(
        !ok && text.contains("run `ftvm snapshot create vm1"),
        "{text}"
    );
    let started = Instant::now();
    let (ok, text) = cluster.ftvm(A, &["snapshot", "create", "vm1", "s1"]);
    assert!(ok, "{text}");
    eprintln!("ftvm snapshot create: {text} ({:?})", started.elapsed());
    assert!(
        text.contains("vm1-disk0") && text.contains("vm1-disk1"),
        "both disks took it: {text}"
    );
    assert!(
        count(&cluster.console(A), "WROTE-NEW") == 0,
        "the guest wrote NEW before the snapshot was taken (a very slow machine?)"
    );
    let (ok, text) = cluster.ftvm(A, &["snapshot", "create", "vm1", "s1"]);
    assert!(!ok && text.contains("exists already"), "{text}");
    for host in [A, B] {
        let (ok, listed) = cluster.ftvm(host, &["snapshot", "list", "vm1"]);
        assert!(ok && listed.contains("s1"), "{listed}");
    }

    cluster.wait_console(A, "WROTE-NEW");
    let before = wait_protected(&cluster, A, "Protected before the revert");
    let boots = count(&cluster.console(A), "BOOT-SAW:");
    let started = Instant::now();
    let (ok, text) = cluster.ftvm(A, &["snapshot", "revert", "vm1", "s1"]);
    assert!(ok, "{text}");
    eprintln!("ftvm snapshot revert: {text} ({:?})", started.elapsed());
    // The guest boots again and finds the old data.
    ftvm_tests::wait::Wait::up_to(Duration::from_secs(120))
        .every(Duration::from_millis(200))
        .until("the guest to boot again after the revert", || {
            count(&cluster.console(A), "BOOT-SAW:") > boots
        });
    cluster.wait_console(A, "BOOT-SAW:[OLD-DATA][OLD-DATA]");
    // Protected all along, with no resync: the copies were reverted at the same point.
    let after = wait_protected(&cluster, A, "Protected after the revert");
    assert_eq!(
        resync_bytes(&after),
        resync_bytes(&before),
        "a resync ran: {after}"
    );
    assert_eq!(after["generation"], before["generation"], "{after}");

    // Failover: hostB boots from its own copy, which was reverted too.
    let (ok, text) = cluster.ftvm(A, &["failover", "vm1"]);
    assert!(ok, "{text}");
    cluster.wait_vm(B, Duration::from_secs(60), "primary on hostB", |vm| {
        vm["role"] == "Primary" && vm["vm_pid"].is_u64()
    });
    cluster.wait_console(B, "BOOT-SAW:");
    let seen: Vec<String> = cluster
        .console(B)
        .into_iter()
        .filter(|line| line.contains("BOOT-SAW:"))
        .collect();
    assert!(
        seen.iter()
            .all(|line| line.contains("BOOT-SAW:[OLD-DATA][OLD-DATA]")),
        "hostB's copy was not reverted: {seen:?}"
    );

    // Delete from the new primary: gone on both hosts.
    wait_protected(&cluster, B, "Protected on hostB");
    let (ok, text) = cluster.ftvm(B, &["snapshot", "delete", "vm1", "s1"]);
    assert!(ok, "{text}");
    for host in [A, B] {
        let (ok, listed) = cluster.ftvm(host, &["snapshot", "list", "vm1", "--json"]);
        assert!(ok, "{listed}");
        let disks: serde_json::Value = serde_json::from_str(&listed).expect("json");
        assert_eq!(disks.as_array().map(Vec::len), Some(2), "{listed}");
        for disk in disks.as_array().into_iter().flatten() {
            assert_eq!(disk["snapshots"], serde_json::json!([]), "{listed}");
        }
    }
    drop(cluster);
    drop(xfs);
}

#[test]
fn ftvm_snapshot_on_ext4_is_refused_with_the_reason_and_one_of_two_disks_takes_none() {
    // vm1's first disk on XFS, its second on this machine's ext4: the second refuses, so
    // the first drops the snapshot it took (all or nothing).
    let xfs = XfsMount::new("ftvmd-snapshot-ext4");
    let mut cluster = cluster("ftvmd-snapshot-ext4", true);
    for host in [A, B] {
        let image = cluster.image(host);
        let size = std::fs::metadata(&image).expect("the host's image").len();
        let target = xfs.path().join(format!("host{host}.img"));
        ftvm_tests::create_image(&target, size);
        std::fs::remove_file(&image).expect("remove the host's image");
        std::os::unix::fs::symlink(&target, &image).expect("symlink");
    }
    cluster.start_all();
    wait_protected(&cluster, A, "Protected on hostA");
    let (ok, text) = cluster.ftvm(A, &["snapshot", "create", "vm1", "s1"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("snapshots need a file system with reflinks (XFS, btrfs)")
            && text.contains(" is on ")
            && text.contains("vm1-disk1")
            && text.contains("drop it again"),
        "{text}"
    );
    eprintln!("refused: {text}");
    for host in [A, B] {
        ftvm_tests::wait::Wait::up_to(Duration::from_secs(30))
            .every(Duration::from_millis(200))
            .until("the first disk to drop its snapshot", || {
                let (ok, listed) = cluster.ftvm(host, &["snapshot", "list", "vm1", "--json"]);
                let disks: serde_json::Value =
                    serde_json::from_str(&listed).unwrap_or(serde_json::Value::Null);
                ok && disks[0]["snapshots"] == serde_json::json!([])
                    && disks[1]["snapshots"] == serde_json::json!([])
            });
    }
    let (ok, text) = cluster.ftvm(A, &["snapshot", "create", "vm1", "a/b"]);
    assert!(!ok && text.contains("invalid snapshot name"), "{text}");
    // This guest runs no qemu-guest-agent: an application-consistent snapshot is refused
    // with the reason, and none is taken.
    let (ok, text) = cluster.ftvm(A, &["snapshot", "create", "vm1", "s2", "--app-consistent"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("not application-consistent, no snapshot taken")
            && text.contains("did not answer guest-sync-delimited within 5000 ms")
            && text.contains("is qemu-guest-agent installed and running in the guest?"),
        "{text}"
    );
    eprintln!("refused: {text}");
    // Nothing stopped: the VM runs, Protected, and the guest was resumed (it writes NEW).
    wait_protected(&cluster, A, "still Protected");
    cluster.wait_console(A, "WROTE-NEW");
    drop(cluster);
    drop(xfs);
}
