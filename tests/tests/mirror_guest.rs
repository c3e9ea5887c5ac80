//! Level 2 disk tests: a guest on hostA whose disk `vhost-blk-mirror` mirrors synchronously
//! to hostB over both A-links (network namespaces, real TCP), QEMU under TCG.

use std::time::Duration;

use ftvm_tests::blk::BlkDaemon;
use ftvm_tests::guest::Guest;
use ftvm_tests::mirror::MirrorPair;
use ftvm_tests::net::PacketCapture;
use ftvm_tests::records;
use ftvm_tests::tmpfs::SmallTmpfs;

const GUEST_TIMEOUT: Duration = Duration::from_secs(180);
/// Initial full sync of the test disk, link detection, resyncs: all well under this.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
const IMAGE_BYTES: u64 = 64 << 20;
const MIB: u64 = 1 << 20;

fn started_pair(name: &str, queues: u16) -> MirrorPair {
    let mut pair = MirrorPair::new(name, IMAGE_BYTES, queues);
    pair.start_in_sync(SYNC_TIMEOUT);
    pair
}

fn wait_mode(daemon: &BlkDaemon, mode: &'static str) -> serde_json::Value {
    daemon.wait_mode(SYNC_TIMEOUT, mode)
}

fn continue_degraded(daemon: &BlkDaemon) {
    let reply = daemon.command("continue-degraded");
    assert_eq!(reply["ok"], true, "continue-degraded refused: {reply}");
    wait_mode(daemon, "Degraded");
}

#[test]
fn mirrored_fio_verify_passes_and_images_are_identical() {
    let pair = started_pair("mirror-fio", 2);
    let mut config = pair.guest_config("mirror-fio");
    config.cpus = 2;
    config.with_fio = true;
    config.script = "fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=8 \
         --ioengine=libaio --direct=1 --size=16M --numjobs=2 --offset_increment=16M \
         --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting && sync\n"
        .into();
    let mut guest = Guest::boot(&config, pair.dir.path());
    assert_eq!(guest.wait_test_exit(GUEST_TIMEOUT), 0, "fio verify failed");
    guest.wait_poweroff(GUEST_TIMEOUT);
    pair.wait_in_sync(SYNC_TIMEOUT);
    pair.assert_images_identical();
    let secondary = pair.secondary().status();
    assert!(
        secondary["replication"]["applied_bytes"].as_u64() >= Some(32 * MIB),
        "the secondary applied the guest's 2 x 16 MiB of writes: {secondary}"
    );
}

/// What crosses the A-links while a guest writes a known pattern holds none of it, though it
/// reaches the secondary's disk; the capture is the real one: it holds the link's handshake,
/// which travels in clear.
#[test]
fn a_capture_of_the_a_links_holds_no_guest_data() {
    const PATTERN: &str = "FTVM-GUEST-CANARY-PATTERN-0123456789";
    let mut pair = MirrorPair::new("mirror-capture", IMAGE_BYTES, 1);
    // Room for the initial full sync (the whole image) and the guest's writes: the capture
    // must hold everything for the absence of the pattern to mean something.
    let capture_limit = 8 * IMAGE_BYTES as usize;
    let capture = PacketCapture::start(&pair.hosts.namespace("hostB"), capture_limit);
    pair.start_in_sync(SYNC_TIMEOUT);
    let mut config = pair.guest_config("capture");
    config.script =
        format!("set -e\nyes {PATTERN} | head -c 4194304 > /dev/vda\nsync\necho WROTE\n");
    let mut guest = Guest::boot(&config, pair.dir.path());
    assert_eq!(
        guest.wait_test_exit(GUEST_TIMEOUT),
        0,
        "writer script failed"
    );
    guest.wait_poweroff(GUEST_TIMEOUT);
    pair.wait_in_sync(SYNC_TIMEOUT);
    let needle = format!("{PATTERN}\n{PATTERN}");
    let secondary = pair.secondary_image();
    assert!(
        secondary
            .windows(needle.len())
            .any(|window| window == needle.as_bytes()),
        "the pattern reached the secondary's disk"
    );
    // At least the full sync (the whole image) and the guest's 4 MiB, all of it kept: the
    // capture missed none of the data that crossed (measured 71.6 MB).
    let captured = capture.captured_bytes();
    eprintln!("captured {captured} bytes on hostB's interfaces");
    assert!(
        captured >= IMAGE_BYTES as usize + (4 << 20) && captured < capture_limit,
        "captured {captured} bytes"
    );
    assert!(
        capture.contains(b"blk:mirror-capture-disk"),
        "the handshake's service name, in clear, is in the capture"
    );
    assert!(
        !capture.contains(PATTERN.as_bytes()),
        "guest data crossed the A-links in clear"
    );
}

#[test]
fn secondary_loss_holds_then_degraded_then_delta_resync() {
    let mut pair = started_pair("mirror-degraded", 1);
    let mut config = pair.guest_config("degraded");
    records::add_writers(&mut config, 1, 150);
    let mut guest = Guest::boot(&config, pair.dir.path());
    guest.wait_for_line(GUEST_TIMEOUT, |line| line == "ACK 0 20");

    pair.kill_secondary();
    wait_mode(pair.primary(), "Holding");
    pair.primary()
        .wait_replication(SYNC_TIMEOUT, "a held write", |r| {
            r["in_flight_requests"] != 0
        });
    // Every record acknowledged so far was acknowledged by the secondary: it is on its disk.
    let acknowledged_mirrored = records::acknowledged(&guest.console());
    let secondary_image = pair.secondary_image();
    records::assert_in_image(&secondary_image, &acknowledged_mirrored, "secondary");

    continue_degraded(pair.primary());
    assert_eq!(
        guest.wait_test_exit(GUEST_TIMEOUT),
        0,
        "the guest saw an error"
    );
    guest.wait_poweroff(GUEST_TIMEOUT);
    let degraded = pair.primary().status()["replication"].clone();
    let out_of_sync = degraded["out_of_sync_bytes"].as_u64().unwrap_or(0);
    assert!(
        out_of_sync > 0 && out_of_sync <= 2 * MIB,
        "about the ~520 KiB written while degraded is out of sync, not the disk: {degraded}"
    );

    pair.start_secondary();
    let synced = pair.wait_in_sync(SYNC_TIMEOUT);
    let resynced = synced["replication"]["resync"]["bytes_done"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        resynced, out_of_sync,
        "the delta resync copies what was out of sync: {synced}"
    );
    pair.assert_images_identical();
    let acknowledged = records::acknowledged(&guest.console());
    assert_eq!(acknowledged.len(), 150);
    let secondary_image = pair.secondary_image();
    records::assert_in_image(&secondary_image, &acknowledged, "resynced secondary");
}

#[test]
fn primary_killed_in_degraded_mode_keeps_its_bitmap() {
    let mut pair = started_pair("mirror-crash", 1);
    let mut config = pair.guest_config("crash");
    records::add_writers(&mut config, 1, 100);
    let mut guest = Guest::boot(&config, pair.dir.path());
    guest.wait_for_line(GUEST_TIMEOUT, |line| line == "ACK 0 10");
    pair.kill_secondary();
    wait_mode(pair.primary(), "Holding");
    continue_degraded(pair.primary());
    guest.wait_for_line(GUEST_TIMEOUT, |line| line == "ACK 0 40");

    // The primary dies in degraded mode; its successor finds the bitmap on disk.
    pair.kill_primary();
    pair.start_primary();
    let restarted = pair.primary().status()["replication"].clone();
    assert!(
        restarted["out_of_sync_bytes"].as_u64() >= Some(64 * 1024),
        "the restarted primary knows what changed while degraded: {restarted}"
    );
    // Peer still down: the new primary holds until told to continue.
    wait_mode(pair.primary(), "Connecting");
    continue_degraded(pair.primary());
    assert_eq!(
        guest.wait_test_exit(GUEST_TIMEOUT),
        0,
        "the guest saw an error"
    );
    guest.wait_poweroff(GUEST_TIMEOUT);

    pair.start_secondary();
    let synced = pair.wait_in_sync(SYNC_TIMEOUT);
    let resynced = synced["replication"]["resync"]["bytes_done"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        resynced > 0 && resynced <= 8 * MIB,
        "a delta resync (records region and active extents), not the 64 MiB disk: {synced}"
    );
    pair.assert_images_identical();
    let acknowledged = records::acknowledged(&guest.console());
    let secondary_image = pair.secondary_image();
    records::assert_in_image(&secondary_image, &acknowledged, "resynced secondary");
}

/// Longest time between two consecutive `ACK` lines of the guest's record writer.
fn longest_ack_gap(guest: &Guest) -> Duration {
    let times: Vec<_> = guest
        .console_timed()
        .into_iter()
        .filter(|(_, line)| line.starts_with("ACK "))
        .map(|(at, _)| at)
        .collect();
    times
        .windows(2)
        .map(|pair| pair[1].duration_since(pair[0]))
        .max()
        .unwrap_or_default()
}

fn set_link(pair: &MirrorPair, link: &str, state: &str) {
    let namespace = pair.hosts.namespace("hostA");
    let status = std::process::Command::new("ip")
        .args(["-n", &namespace, "link", "set", link, state])
        .status()
        .expect("run ip");
    assert!(status.success(), "ip link set {link} {state} failed");
}

#[test]
fn a_link_cuts_lose_and_duplicate_nothing() {
    let pair = started_pair("mirror-links", 1);
    let mut config = pair.guest_config("links");
    records::add_writers(&mut config, 1, 300);
    let mut guest = Guest::boot(&config, pair.dir.path());
    guest.wait_for_line(GUEST_TIMEOUT, |line| line == "ACK 0 20");

    // One link cut: writes carry on over the other after at most a link timeout.
    set_link(&pair, "alink1", "down");
    guest.wait_for_line(GUEST_TIMEOUT, |line| line == "ACK 0 80");
    let one_link_gap = longest_ack_gap(&guest);
    eprintln!("longest pause between acknowledged records with one link cut: {one_link_gap:?}");
    assert!(
        one_link_gap < Duration::from_millis(2500),
        "a write stalled {one_link_gap:?}; the link timeout is 1 s"
    );

    // Both cut: completions are held; the first link back resumes them.
    set_link(&pair, "alink2", "down");
    wait_mode(pair.primary(), "Holding");
    pair.primary()
        .wait_replication(SYNC_TIMEOUT, "a held write", |r| {
            r["in_flight_requests"] != 0
        });
    let held_at = records::acknowledged(&guest.console()).len();
    set_link(&pair, "alink1", "up");
    wait_mode(pair.primary(), "Mirrored");
    assert_eq!(
        guest.wait_test_exit(GUEST_TIMEOUT),
        0,
        "the guest saw an error"
    );
    guest.wait_poweroff(GUEST_TIMEOUT);
    assert!(held_at < 300, "writes were held while both links were down");

    pair.wait_in_sync(SYNC_TIMEOUT);
    pair.assert_images_identical();
    let acknowledged = records::acknowledged(&guest.console());
    assert_eq!(acknowledged.len(), 300);
    let secondary_image = pair.secondary_image();
    records::assert_in_image(&secondary_image, &acknowledged, "secondary");
    // Exactly once: the secondary applied as many writes as the guest made.
    let guest_writes = pair.primary().status()["write_requests"].clone();
    let applied = pair.secondary().status()["replication"]["applied_writes"].clone();
    assert_eq!(applied, guest_writes, "writes lost or applied twice");
}

#[test]
fn local_disk_fault_is_served_by_the_peer_then_repaired() {
    let small_dir = ftvm_tests::scratch_dir("small-disk");
    let small = SmallTmpfs::mount(small_dir.path(), "24m");
    let mut pair = MirrorPair::new("mirror-fault", IMAGE_BYTES, 1);
    pair.primary_options.image = small_dir.path().join("primary.img");
    ftvm_tests::create_image(&pair.primary_options.image, IMAGE_BYTES);
    pair.start_in_sync(SYNC_TIMEOUT);

    // 40 MiB of random writes do not fit the 24 MiB the local image can grow to: the local
    // writes fail with ENOSPC mid-run, and the peer serves everything from then on.
    let mut config = pair.guest_config("fault");
    config.with_fio = true;
    config.script = "fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=8 \
         --ioengine=libaio --direct=1 --size=40M --verify=crc32c --do_verify=1 \
         --verify_fatal=1 && sync\n"
        .into();
    let mut guest = Guest::boot(&config, pair.dir.path());
    assert_eq!(guest.wait_test_exit(GUEST_TIMEOUT), 0, "fio verify failed");
    guest.wait_poweroff(GUEST_TIMEOUT);
    let faulted = pair.primary().status();
    assert_eq!(
        faulted["replication"]["disk_state"], "RemoteOnly",
        "{faulted}"
    );
    assert_eq!(faulted["rejected_requests"], 0, "{faulted}");

    small.resize("128m");
    pair.repair_primary(SYNC_TIMEOUT);
}
