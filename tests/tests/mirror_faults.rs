//! Level 2 disk under real storage faults (issue 10): a copy that failed a write, lost its
//! unflushed writes in a power loss, or went stale is never treated as current. The faults
//! are real: a full tmpfs returns ENOSPC from the kernel; `ftvm-fault-fs` (FUSE) drops every
//! write not covered by a later fsync when it "loses power", as a crashed host's page cache.

use std::time::Duration;

use ftvm_tests::blk::BlkDaemon;
use ftvm_tests::fault_fs::FaultFs;
use ftvm_tests::guest::Guest;
use ftvm_tests::mirror::MirrorPair;
use ftvm_tests::records;
use ftvm_tests::tmpfs::SmallTmpfs;
use ftvm_tests::wait::poll_until;

const GUEST_TIMEOUT: Duration = Duration::from_secs(180);
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
const IMAGE_BYTES: u64 = 64 << 20;

fn wait_mode(daemon: &BlkDaemon, mode: &'static str) -> serde_json::Value {
    daemon.wait_mode(SYNC_TIMEOUT, mode)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Primary,
    Secondary,
}

/// A pair in sync whose `side` keeps its image on `ftvm-fault-fs` and reads its boot id
/// from a file of its own (boot 1): a power loss of that host can be emulated.
fn pair_on_fault_fs(name: &str, side: Side) -> (FaultFs, MirrorPair, std::path::PathBuf) {
    let fault_fs = FaultFs::start();
    let mut pair = MirrorPair::new(name, IMAGE_BYTES, 1);
    let boot_id = pair.dir.path().join("boot_id");
    write_boot_id(&boot_id, 1);
    let options = match side {
        Side::Primary => &mut pair.primary_options,
        Side::Secondary => &mut pair.secondary_options,
    };
    options.image = fault_fs.path("image.img");
    ftvm_tests::create_image(&options.image, IMAGE_BYTES);
    // The image exists durably before the daemon starts, as an operator's image made long
    // ago does: a power loss takes the run's unsynced writes, not the file's size (which
    // nothing else syncs when the loss comes before the daemon's first flush of it).
    std::fs::File::open(&options.image)
        .and_then(|image| image.sync_all())
        .expect("sync the new image");
    options
        .extra_args
        .extend(["--boot-id-file".to_owned(), boot_id.display().to_string()]);
    pair.start_in_sync(SYNC_TIMEOUT);
    (fault_fs, pair, boot_id)
}

fn write_boot_id(path: &std::path::Path, boot: u32) {
    std::fs::write(path, format!("{boot:08x}-1b2c-4d5e-8f90-a1b2c3d4e5f6\n")).expect("boot id");
}

/// The secondary's image fills up (a real ENOSPC): its copy must become durably
/// Inconsistent before the primary hears of it, the primary must hold rather than complete
/// on the failure, go on only at a new generation (as the witness would grant), never call
/// that copy UpToDate, and never let it be promoted; after the disk is repaired, a resync
/// makes it current again with every acknowledged record.
#[test]
fn a_full_secondary_disk_is_never_up_to_date_nor_promotable() {
    let small_dir = ftvm_tests::scratch_dir("small-secondary");
    let small = SmallTmpfs::mount(small_dir.path(), "512k");
    let mut pair = MirrorPair::new("fault-secondary", IMAGE_BYTES, 1);
    pair.secondary_options.image = small.path().join("secondary.img");
    ftvm_tests::create_image(&pair.secondary_options.image, IMAGE_BYTES);
    // Compare mode sends only differing chunks: the sparse secondary stays sparse until the
    // guest writes, so it fills up under the guest's writes, not under the first sync.
    pair.primary_options
        .extra_args
        .push("--resync-compare".into());
    // Where a promoted secondary would reach the old primary: makes `promote` possible, so
    // that its refusal is the copy's state.
    pair.secondary_options
        .extra_args
        .extend(["--peer".to_owned(), "10.77.1.1:7400".to_owned()]);
    pair.start_in_sync(SYNC_TIMEOUT);
    let generation = pair.primary().status()["replication"]["generation"]
        .as_u64()
        .expect("generation");

    let mut config = pair.guest_config("fault-secondary");
    records::add_writers(&mut config, 1, 300);
    let mut guest = Guest::boot(&config, pair.dir.path());
    // The secondary's disk fills up: the primary holds (no completion on a failed reply).
    pair.primary()
        .wait_replication(GUEST_TIMEOUT, "the copy's failure", |r| {
            r["mode"] == "Holding" && r["peer_disk_failed"].is_string()
        });
    let secondary = pair.secondary().status();
    assert_eq!(
        secondary["replication"]["disk_state"], "Failed",
        "{secondary}"
    );
    let refused = pair.secondary().command("promote");
    assert!(
        refused["ok"] != true
            && refused["error"]
                .as_str()
                .is_some_and(|error| error.contains("failed")),
        "a failed copy was promoted, or refused for another reason: {refused}"
    );

    // The coordinator's part: the witness grants the next generation, which that copy
    // does not hold; the primary goes on alone at it, and the guest never sees an error.
    let next = generation + 1;
    let reply = pair.primary().command(&format!("continue-degraded {next}"));
    assert_eq!(reply["ok"], true, "continue-degraded refused: {reply}");
    wait_mode(pair.primary(), "Degraded");
    assert_eq!(
        guest.wait_test_exit(GUEST_TIMEOUT),
        0,
        "the guest saw an error"
    );
    guest.wait_poweroff(GUEST_TIMEOUT);
    let acknowledged = records::acknowledged(&guest.console());
    assert_eq!(acknowledged.len(), 300, "every record was acknowledged");
    let primary = pair.primary().status();
    assert_eq!(primary["rejected_requests"], 0, "{primary}");
    // Asked again while degraded, the failed copy still says so: never UpToDate.
    let secondary = pair.secondary().status();
    assert_eq!(
        secondary["replication"]["disk_state"], "Failed",
        "{secondary}"
    );
    assert_eq!(
        pair.primary().status()["replication"]["mode"],
        "Degraded",
        "the primary mirrored to a failed copy again"
    );

    // Repair: room on the disk, `repair` on the secondary; the degraded primary asks again
    // and resyncs it; only then is it UpToDate, at the new generation.
    small.resize("128m");
    let reply = pair.secondary().command("repair");
    assert_eq!(reply["ok"], true, "repair refused: {reply}");
    let synced = pair.wait_in_sync(SYNC_TIMEOUT);
    assert_eq!(synced["replication"]["generation"], next, "{synced}");
    pair.assert_images_identical();
    records::assert_in_image(&pair.secondary_image(), &acknowledged, "secondary");
}

/// The primary's own disk fills up: it serves every request from the peer (RemoteOnly).
/// Its disk daemon is then killed and started again, as a supervisor would: the restarted
/// daemon must still know its copy is stale and serve from the peer, so that the guest
/// reads back every record it wrote.
#[test]
fn remote_only_survives_a_restart_of_the_primary() {
    let small_dir = ftvm_tests::scratch_dir("small-primary");
    let small = SmallTmpfs::mount(small_dir.path(), "512k");
    let mut pair = MirrorPair::new("fault-primary", IMAGE_BYTES, 1);
    pair.primary_options.image = small.path().join("primary.img");
    ftvm_tests::create_image(&pair.primary_options.image, IMAGE_BYTES);
    pair.start_in_sync(SYNC_TIMEOUT);

    let mut config = pair.guest_config("fault-primary");
    records::add_writers(&mut config, 1, 200);
    let mut guest = Guest::boot(&config, pair.dir.path());
    pair.primary()
        .wait_replication(GUEST_TIMEOUT, "RemoteOnly", |r| {
            r["disk_state"] == "RemoteOnly"
        });
    guest.wait_for_line(GUEST_TIMEOUT, |line| {
        records::acknowledged(&[line.to_owned()])
            .first()
            .is_some_and(|&(_, record)| record >= 150)
    });
    // A crash of the daemon (its host keeps running): QEMU reconnects to the new one.
    pair.kill_primary();
    pair.start_primary();
    let restarted = pair.primary().status();
    assert_eq!(
        restarted["replication"]["disk_state"], "RemoteOnly",
        "the restarted primary trusted its stale copy: {restarted}"
    );
    // The guest's own read-back of all 200 records goes through the restarted daemon.
    assert_eq!(
        guest.wait_test_exit(GUEST_TIMEOUT),
        0,
        "the guest lost records"
    );
    guest.wait_poweroff(GUEST_TIMEOUT);
    let status = pair.primary().status();
    assert_eq!(status["rejected_requests"], 0, "{status}");

    small.resize("128m");
    pair.repair_primary(SYNC_TIMEOUT);
}

/// The secondary's host loses power, twice: once while the guest writes (O_DIRECT, no
/// flush: acknowledged, so on both hosts, but durable on neither), and once after the
/// guest went idle and the primary had had time to clear its activity record. Each time
/// the secondary comes back Inconsistent and is resynced where it may have lost writes;
/// only then is it UpToDate, and its image then equals the primary's.
#[test]
fn a_secondary_power_loss_loses_no_acknowledged_write() {
    let (fault_fs, mut pair, boot_id) = pair_on_fault_fs("fault-power", Side::Secondary);

    let mut config = pair.guest_config("fault-power");
    records::add_direct_writer(&mut config, 300);
    let guest = Guest::boot(&config, pair.dir.path());
    let mut boot = 1;
    let mut power_loss = |pair: &mut MirrorPair, why: &str| {
        // The daemon dies with its host, then the host's unsynced writes are gone.
        pair.kill_secondary();
        let dropped = fault_fs.power_loss();
        boot += 1;
        write_boot_id(&boot_id, boot);
        eprintln!("power loss ({why}): {dropped} unsynced bytes dropped");
        pair.start_secondary();
        // It came back Inconsistent (the primary may already have resynced it by the time
        // its status answers, when nothing was lost: its log tells).
        let log = pair.secondary().process.log();
        assert!(
            log.contains("this copy is Inconsistent until the primary resyncs"),
            "a copy that may have lost writes did not come back Inconsistent:\n{log}"
        );
    };

    guest.wait_for_line(GUEST_TIMEOUT, |line| line == "ACK 0 100");
    power_loss(&mut pair, "while the guest writes");
    guest.wait_for_line(GUEST_TIMEOUT, |line| line == "IDLE 0");
    pair.wait_in_sync(SYNC_TIMEOUT);
    pair.assert_images_identical();
    // Idle: the primary clears its record of recent writes only once both copies flushed.
    pair.primary()
        .wait_replication(SYNC_TIMEOUT, "activity cleared", |r| {
            r["active_extents"] == 0
        });
    power_loss(&mut pair, "while the guest is idle");
    pair.wait_in_sync(SYNC_TIMEOUT);
    pair.assert_images_identical();
    let acknowledged = records::acknowledged(&guest.console());
    assert_eq!(acknowledged.len(), 300);
    records::assert_in_image(&pair.secondary_image(), &acknowledged, "secondary");
    poll_until(SYNC_TIMEOUT, "the fault file system's status", || {
        fault_fs.status()["power_losses"].as_u64() == Some(2)
    });
}

/// The primary's host loses power while the guest writes (O_DIRECT, no flush): QEMU and the
/// daemon die with it, and the primary's image loses its unflushed writes, which the
/// secondary holds. Restarted on the same host, the primary must not trust (nor resync
/// from) its own copy: it serves from the peer (RemoteOnly), a new guest finds every
/// acknowledged record, and `repair` rebuilds the local copy.
#[test]
fn a_primary_power_loss_keeps_its_stale_copy_out_of_service() {
    let (fault_fs, mut pair, boot_id) = pair_on_fault_fs("fault-primary-power", Side::Primary);

    let mut config = pair.guest_config("fault-primary-power");
    records::add_direct_writer(&mut config, 300);
    let guest = Guest::boot(&config, pair.dir.path());
    guest.wait_for_line(GUEST_TIMEOUT, |line| line == "ACK 0 150");
    // The host goes down: QEMU and the daemon with it, then its page cache.
    drop(guest);
    pair.kill_primary();
    let dropped = fault_fs.power_loss();
    eprintln!("power loss of the primary's host: {dropped} unsynced bytes dropped");
    write_boot_id(&boot_id, 2);
    pair.start_primary();
    let restarted = pair.primary().status();
    assert_eq!(
        restarted["replication"]["disk_state"], "RemoteOnly",
        "the restarted primary trusted a copy that lost writes: {restarted}"
    );
    pair.primary()
        .wait_replication(SYNC_TIMEOUT, "the peer reached", |r| {
            r["mode"] == "Mirrored"
        });

    let mut config = pair.guest_config("fault-primary-verify");
    records::add_verifier(&mut config, 150);
    let mut guest = Guest::boot(&config, pair.dir.path());
    assert_eq!(
        guest.wait_test_exit(GUEST_TIMEOUT),
        0,
        "acknowledged records lost"
    );
    guest.wait_poweroff(GUEST_TIMEOUT);

    pair.repair_primary(SYNC_TIMEOUT);
}

/// Storage that cannot punch holes or zero ranges (`fallocate` fails with EOPNOTSUPP on
/// both hosts' `ftvm-fault-fs`): discards and write-zeroes still succeed (zeroes written),
/// neither copy is counted as failed, and both read the same; an empty discard completes.
#[test]
fn unsupported_discards_write_zeroes_on_both_copies() {
    use vhost_user_blk_load::{BlkDevice, DeviceOptions};

    let fault_fs = FaultFs::start();
    fault_fs.set_fallocate_supported(false);
    let mut pair = MirrorPair::new("fault-discard", 16 << 20, 1);
    pair.primary_options.image = fault_fs.path("primary.img");
    pair.secondary_options.image = fault_fs.path("secondary.img");
    for image in [&pair.primary_options.image, &pair.secondary_options.image] {
        ftvm_tests::create_image(image, 16 << 20);
    }
    pair.start_in_sync(SYNC_TIMEOUT);
    let mut device = BlkDevice::open(&pair.primary_options.socket, &DeviceOptions::default())
        .expect("connect to the primary");
    let data = vec![0x5au8; 64 << 10];
    assert_eq!(device.write(0, &data).expect("write").status, 0);
    assert_eq!(device.discard(0, 32).expect("discard").status, 0);
    assert_eq!(
        device.write_zeroes(32, 32, false).expect("zeroes").status,
        0
    );
    assert_eq!(device.write_zeroes(64, 16, true).expect("unmap").status, 0);
    assert_eq!(device.discard(100, 0).expect("empty discard").status, 0);
    assert_eq!(device.flush().expect("flush").status, 0);
    let back = device.read(0, 64 << 10).expect("read");
    assert_eq!(back.status, 0);
    assert!(back.data[..40 << 10].iter().all(|&b| b == 0));
    assert!(back.data[40 << 10..].iter().all(|&b| b == 0x5a));
    drop(device);
    let synced = pair.wait_in_sync(SYNC_TIMEOUT);
    assert!(
        synced["replication"]["peer_disk_failed"].is_null(),
        "{synced}"
    );
    assert_eq!(synced["replication"]["local_disk"], "Healthy", "{synced}");
    pair.assert_images_identical();
}
