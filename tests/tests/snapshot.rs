//! Snapshots of a mirrored disk (issue 13): taken on both copies at the same point of the
//! write stream (a barrier through the mirror), as reflinks on XFS; reverted on both copies
//! without a resync; refused with the reason on a file system without reflinks. Real
//! daemons in two test hosts, a real vhost-user frontend, no VM.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftvm_tests::blk::BlkDaemon;
use ftvm_tests::mirror::MirrorPair;
use ftvm_tests::xfs::XfsMount;
use vhost_user_blk_load::{BlkDevice, DeviceOptions};

const TIMEOUT: Duration = Duration::from_secs(60);
const IMAGE_BYTES: u64 = 64 << 20;
const MIB: usize = 1 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2] ^ seed)
        .collect()
}

fn snapshot_file(image: &Path, name: &str) -> PathBuf {
    let mut directory = image.as_os_str().to_owned();
    directory.push(".snapshots");
    PathBuf::from(directory).join(name)
}

fn ok(reply: &serde_json::Value, what: &str) -> String {
    assert_eq!(reply["ok"], true, "{what}: {reply}");
    reply["result"].as_str().unwrap_or_default().to_owned()
}

fn refused(reply: &serde_json::Value, reason: &str) {
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(reason),
        "expected a refusal with {reason:?}: {reply}"
    );
}

/// The held time the daemon reports ("requests held 3.2 ms").
fn held_ms(result: &str) -> f64 {
    result
        .split("held ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no held time in {result:?}"))
}

/// A pair whose images are on one XFS (separate directories per host), able to swap
/// roles (the primary listens once demoted, the secondary knows where the old primary is).
fn pair_on_xfs(name: &str, xfs: &XfsMount) -> MirrorPair {
    let mut pair = MirrorPair::new(name, IMAGE_BYTES, 1);
    for (options, host) in [
        (&mut pair.primary_options, "hostA"),
        (&mut pair.secondary_options, "hostB"),
    ] {
        let directory = xfs.path().join(host);
        std::fs::create_dir_all(&directory).expect("host directory on XFS");
        options.image = directory.join("disk0.img");
        ftvm_tests::create_image(&options.image, IMAGE_BYTES);
    }
    for address in ["10.77.1.1:7400", "10.77.2.1:7400"] {
        pair.primary_options
            .extra_args
            .extend(["--listen".into(), address.into()]);
        pair.secondary_options
            .extra_args
            .extend(["--peer".into(), address.into()]);
    }
    pair
}

fn wait_primary_in_sync(daemon: &BlkDaemon) -> serde_json::Value {
    daemon.wait_replication(TIMEOUT, "an in-sync primary", |r| {
        r["role"] == "primary"
            && r["disk_state"] == "UpToDate"
            && r["in_flight_requests"] == 0
            && r["out_of_sync_bytes"] == 0
    })
}

/// Writes 64 KiB blocks at 8 MiB and up on `device` until stopped; every write must
/// succeed. Gives the device back with the count.
fn background_writer(
    mut device: BlkDevice,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(BlkDevice, u64)> {
    std::thread::spawn(move || {
        let mut writes = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let offset = (8 * MIB as u64) + (writes % 256) * 65_536;
            let reply = device
                .write(offset / 512, &pattern(writes as u8, 65_536))
                .expect("write");
            assert_eq!(reply.status, 0, "a write failed during the snapshot");
            writes += 1;
        }
        (device, writes)
    })
}

#[test]
fn snapshot_on_both_copies_then_revert_survives_a_failover() {
    let xfs = XfsMount::new("snapshot");
    let mut pair = pair_on_xfs("snapshot", &xfs);
    pair.start_in_sync(TIMEOUT);
    let (old, new) = (pattern(1, MIB), pattern(2, MIB));

    let mut device = BlkDevice::open(&pair.primary_options.socket, &DeviceOptions::default())
        .expect("connect to the primary");
    assert_eq!(device.write(0, &old).expect("write").status, 0);

    // Taken while another connection writes all the time: the barrier holds its writes
    // for a moment, none fails.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = background_writer(device, stop.clone());
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let taken = ok(&pair.primary().command("snapshot create s1"), "create");
    let round_trip = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let (mut device, writes) = writer.join().expect("writer");
    assert!(writes > 0, "no background write");
    eprintln!(
        "snapshot create: {taken}; control round trip {round_trip:?}; {writes} background \
         writes"
    );
    assert!(held_ms(&taken) < 2_000.0, "{taken}");
    refused(
        &pair.primary().command("snapshot create s1"),
        "exists already",
    );
    refused(
        &pair.secondary().command("snapshot create s2"),
        "commanded on the primary",
    );

    // Both copies' snapshots hold the data of before, and are equal to each other at the
    // point of the barrier.
    let primary_snapshot = snapshot_file(&pair.primary_options.image, "s1");
    let secondary_snapshot = snapshot_file(&pair.secondary_options.image, "s1");
    let (a, b) = (
        std::fs::read(&primary_snapshot).expect("primary's snapshot"),
        std::fs::read(&secondary_snapshot).expect("secondary's snapshot"),
    );
    assert_eq!(a.len() as u64, IMAGE_BYTES);
    assert!(a == b, "the two copies' snapshots differ");
    assert!(
        a[..MIB] == old[..],
        "the snapshot lacks the data written before it"
    );

    assert_eq!(device.write(0, &new).expect("write").status, 0);
    assert_eq!(device.flush().expect("flush").status, 0);
    let listed = pair.primary().command("snapshot list");
    let snapshots = listed["snapshots"].as_array().expect("a list");
    assert_eq!(snapshots.len(), 1, "{listed}");
    assert_eq!(snapshots[0]["name"], "s1", "{listed}");
    assert_eq!(snapshots[0]["size_bytes"], IMAGE_BYTES, "{listed}");
    // The first MiB was overwritten since: the snapshot alone holds its old blocks.
    let unshared = snapshots[0]["unshared_bytes"]
        .as_u64()
        .expect("unshared_bytes");
    assert!(unshared >= MIB as u64 && unshared < IMAGE_BYTES, "{listed}");

    // A revert needs the guest gone.
    refused(
        &pair.primary().command("snapshot revert s1"),
        "a guest is attached",
    );
    drop(device);
    let resync_before = wait_primary_in_sync(pair.primary())["replication"]["resync"].clone();
    let deadline = Instant::now() + TIMEOUT;
    let reverted = loop {
        let reply = pair.primary().command("snapshot revert s1");
        if reply["ok"] == true || Instant::now() >= deadline {
            break ok(&reply, "revert");
        }
        // The daemon notices the frontend's disconnect a moment later.
        refused(&reply, "a guest is attached");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("snapshot revert: {reverted}");
    // Still Protected, nothing to resync: both copies reverted at the same point.
    let after = wait_primary_in_sync(pair.primary());
    assert_eq!(after["replication"]["mode"], "Mirrored", "{after}");
    assert_eq!(
        after["replication"]["resync"], resync_before,
        "a resync ran: {after}"
    );
    pair.assert_images_identical();

    let mut device = BlkDevice::open(&pair.primary_options.socket, &DeviceOptions::default())
        .expect("connect to the primary");
    assert!(
        device.read(0, 1 << 20).expect("read").data == old,
        "not reverted"
    );
    drop(device);

    // Failover: the other copy serves the reverted data too.
    ok(&pair.primary().command("demote"), "demote");
    ok(&pair.secondary().command("promote"), "promote");
    let new_primary = pair.secondary();
    wait_primary_in_sync(new_primary);
    let mut device = BlkDevice::open(&pair.secondary_options.socket, &DeviceOptions::default())
        .expect("connect to the new primary");
    assert!(
        device.read(0, 1 << 20).expect("read").data == old,
        "the peer's copy was not reverted"
    );
    drop(device);

    // Delete goes to both copies, from the (new) primary.
    ok(&new_primary.command("snapshot delete s1"), "delete");
    assert!(!primary_snapshot.exists() && !secondary_snapshot.exists());
    refused(
        &new_primary.command("snapshot delete s1"),
        "no snapshot named s1",
    );
    refused(
        &new_primary.command("snapshot create ../s1"),
        "invalid snapshot name",
    );
}

#[test]
fn a_snapshot_on_a_file_system_without_reflinks_is_refused_with_the_reason() {
    // The scratch directories are on the machine's ext4 (or whatever it is: the reason
    // names it).
    let mut pair = MirrorPair::new("snapshot-ext4", IMAGE_BYTES, 1);
    pair.start_in_sync(TIMEOUT);
    let reply = pair.primary().command("snapshot create s1");
    refused(
        &reply,
        "snapshots need a file system with reflinks (XFS, btrfs)",
    );
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&pair.primary_options.image.display().to_string()),
        "the reason names the image: {error}"
    );
    eprintln!("refused: {error}");
    assert!(!snapshot_file(&pair.primary_options.image, "s1").exists());
    // Nothing paused or changed: still in sync.
    wait_primary_in_sync(pair.primary());

    drop(pair);

    // tmpfs too.
    let tmpfs_dir = ftvm_tests::scratch_dir("snapshot-tmpfs");
    let tmpfs = ftvm_tests::tmpfs::SmallTmpfs::mount(tmpfs_dir.path(), "160m");
    let mut on_tmpfs = MirrorPair::new("snapshot-tmpfs", IMAGE_BYTES, 1);
    for (options, host) in [
        (&mut on_tmpfs.primary_options, "hostA"),
        (&mut on_tmpfs.secondary_options, "hostB"),
    ] {
        options.image = tmpfs.path().join(format!("{host}.img"));
        ftvm_tests::create_image(&options.image, IMAGE_BYTES);
    }
    on_tmpfs.start_in_sync(TIMEOUT);
    let reply = on_tmpfs.primary().command("snapshot create s1");
    refused(&reply, "is on tmpfs");
    drop(on_tmpfs);
}
