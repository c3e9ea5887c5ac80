//! A guest under flushed writes stopped and continued over QMP again and again (what `virsh
//! suspend`/`resume`, snapshots, migration and Level 3 epochs do). QEMU's `stop` sends
//! `SET_VRING_ENABLE(0)` and `GET_VRING_BASE` per queue while requests are in flight; `cont`
//! sets every ring up again. The disk must keep serving and lose no acknowledged write, for a
//! standalone daemon and for a mirrored primary.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ftvm_tests::blk::{BlkDaemon, BlkOptions};
use ftvm_tests::cpio::Entry;
use ftvm_tests::guest::{Disk, Guest, GuestConfig};
use ftvm_tests::mirror::MirrorPair;
use ftvm_tests::qmp::Qmp;
use ftvm_tests::wait::{poll_for, poll_until};
use ftvm_tests::{create_image, records, scratch_dir};

/// Boot under TCG on a shared machine.
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// QMP answers, and the run state follows a command.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Every writer acknowledges a new record within this after the last `cont`; a queue that
/// lost an interrupt or a request never does.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);
const IMAGE_BYTES: u64 = 64 << 20;
const QUEUES: u16 = 2;
/// Two writers per queue, so each queue nearly always has a request in flight.
const WRITERS: u16 = 4;
const CYCLES: u32 = 150;
/// Upper bounds of the random time the guest stays paused, then running, in each cycle.
const PAUSED_MAX_MS: u64 = 10;
const RUNNING_MAX_MS: u64 = 40;

/// `/writer.sh W`: numbered 4 KiB records, each written and flushed on its own (the layout
/// and `ACK W N` lines of `records.rs`), until the guest is killed.
const WRITER: &str = "w=$1; base=$(( $1 * 1000 )); i=1\n\
     while [ $i -le 999 ]; do\n\
       printf 'ftvm-record %06d w%d\\n' $i $w > /tmp/rec$w\n\
       dd if=/tmp/rec$w of=/dev/vda bs=4096 seek=$((base + i)) conv=sync,fsync 2>/dev/null \
         || { echo \"WRITE-FAILED $w $i\"; exit 1; }\n\
       echo \"ACK $w $i\"\n\
       i=$((i + 1))\n\
     done\n\
     echo \"WRITER-DONE $w\"\n";

fn guest_config(name: &str, disk: Disk, qmp: std::path::PathBuf) -> GuestConfig {
    let mut script = String::new();
    for writer in 0..WRITERS {
        let cpu = 1 << (writer % QUEUES);
        script.push_str(&format!("taskset {cpu} sh /writer.sh {writer} &\n"));
    }
    script.push_str("wait\n");
    let mut config = GuestConfig::new(name, &script);
    config.cpus = u32::from(QUEUES);
    config.disks.push(disk);
    config.qmp = Some(qmp);
    config
        .files
        .push(Entry::executable("writer.sh", WRITER.as_bytes().to_vec()));
    config
}

/// xorshift: the pauses of a failed run can be replayed from the seed it prints.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn wait_status(qmp: &mut Qmp, wanted: &str, seed: u64) {
    poll_for(
        QMP_TIMEOUT,
        &format!("QEMU {wanted} (seed {seed})"),
        || qmp.status().ok(),
        |status| status == wanted,
    );
}

/// `CYCLES` times `stop`, a short random pause, `cont`, a short random run.
fn stop_cont_cycles(qmp: &mut Qmp, seed: u64) {
    let mut random = seed | 1;
    for cycle in 0..CYCLES {
        qmp.stop()
            .unwrap_or_else(|error| panic!("cycle {cycle} (seed {seed}): stop: {error}"));
        wait_status(qmp, "paused", seed);
        std::thread::sleep(Duration::from_millis(
            next_random(&mut random) % PAUSED_MAX_MS,
        ));
        qmp.cont()
            .unwrap_or_else(|error| panic!("cycle {cycle} (seed {seed}): cont: {error}"));
        wait_status(qmp, "running", seed);
        std::thread::sleep(Duration::from_millis(
            next_random(&mut random) % RUNNING_MAX_MS,
        ));
    }
}

/// The highest record each writer acknowledged.
fn latest_records(console: &[String]) -> Vec<u64> {
    let mut latest = vec![0; usize::from(WRITERS)];
    for (writer, record) in records::acknowledged(console) {
        if let Some(slot) = latest.get_mut(writer as usize) {
            *slot = (*slot).max(record);
        }
    }
    latest
}

/// Runs the cycles against a guest that is writing, checks that every writer still makes
/// progress afterwards, and returns the acknowledged records; the guest is killed.
fn cycle_and_check_progress(guest: Guest, qmp: &std::path::Path) -> Vec<(u64, u64)> {
    for writer in 0..WRITERS {
        guest.wait_for_line(GUEST_TIMEOUT, |line| line == format!("ACK {writer} 3"));
    }
    let mut qmp = Qmp::connect(qmp, QMP_TIMEOUT).expect("QMP session");
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|now| now.as_nanos() as u64)
        .unwrap_or(1);
    let started = Instant::now();
    stop_cont_cycles(&mut qmp, seed);
    let cycled = latest_records(&guest.console());
    eprintln!(
        "{CYCLES} stop/cont cycles in {:?} (seed {seed}), records so far {cycled:?}",
        started.elapsed()
    );
    poll_until(
        PROGRESS_TIMEOUT,
        &format!("every writer to acknowledge a record after the cycles (seed {seed})"),
        || {
            let console = guest.console();
            let now = latest_records(&console);
            // A writer that wrote all its records (a fast machine) made its progress too.
            let done = |writer: usize| console.contains(&format!("WRITER-DONE {writer}"));
            (0..now.len()).all(|writer| now[writer] > cycled[writer] || done(writer))
        },
    );
    let console = guest.console();
    let failed: Vec<_> = console
        .iter()
        .filter(|line| line.starts_with("WRITE-FAILED"))
        .collect();
    assert!(failed.is_empty(), "the guest saw write errors: {failed:?}");
    drop(guest);
    records::acknowledged(&console)
}

#[test]
fn standalone_disk_survives_stop_cont_cycles_under_flushed_writes() {
    let dir = scratch_dir("blk-stop-cont");
    let mut options = BlkOptions::in_dir(dir.path(), "disk");
    options.queues = QUEUES;
    create_image(&options.image, IMAGE_BYTES);
    let daemon = BlkDaemon::start(&options, &dir.path().join("daemon.log"));
    let qmp = dir.path().join("qmp.sock");
    let disk = Disk {
        socket: options.socket.clone(),
        queues: QUEUES,
    };
    let guest = Guest::boot(&guest_config("stop-cont", disk, qmp.clone()), dir.path());

    let acknowledged = cycle_and_check_progress(guest, &qmp);
    let image = std::fs::read(&options.image).expect("read image");
    records::assert_in_image(&image, &acknowledged, "daemon's");
    let status = daemon.status();
    assert_eq!(status["rejected_requests"], 0, "status: {status}");
    assert_eq!(status["io_errors"], 0, "status: {status}");
    assert_eq!(status["connections"], 1, "no reconnect: {status}");
}

#[test]
fn mirrored_primary_survives_stop_cont_cycles_under_flushed_writes() {
    let mut pair = MirrorPair::new("mirror-stop-cont", IMAGE_BYTES, QUEUES);
    pair.start_secondary();
    pair.start_primary();
    pair.wait_in_sync(SYNC_TIMEOUT);
    let qmp = pair.dir.path().join("qmp.sock");
    let disk = Disk {
        socket: pair.primary_options.socket.clone(),
        queues: QUEUES,
    };
    let mut config = guest_config("mirror-stop-cont", disk, qmp.clone());
    config.netns = Some(pair.hosts.namespace("hostA"));
    let guest = Guest::boot(&config, pair.dir.path());

    let acknowledged = cycle_and_check_progress(guest, &qmp);
    pair.wait_in_sync(SYNC_TIMEOUT);
    let primary = std::fs::read(&pair.primary_options.image).expect("read primary image");
    records::assert_in_image(&primary, &acknowledged, "primary");
    records::assert_in_image(&pair.secondary_image(), &acknowledged, "secondary");
    pair.assert_images_identical();
    let status = pair.primary().status();
    assert_eq!(status["rejected_requests"], 0, "status: {status}");
    assert_eq!(status["connections"], 1, "no reconnect: {status}");
}

/// The rewind path end to end: the secondary is lost, so the primary holds every write's
/// completion; QEMU is stopped (the daemon waits its limit, then rewinds the ring over the
/// held requests) and continued, several times, while nothing can complete. Then the primary
/// goes on degraded: the rewound requests run again after `cont`, every writer makes
/// progress, and every acknowledged record is on the primary's disk.
#[test]
fn held_requests_are_rewound_at_stop_and_complete_after_cont() {
    let mut pair = MirrorPair::new("mirror-stop-held", IMAGE_BYTES, QUEUES);
    pair.start_in_sync(SYNC_TIMEOUT);
    let qmp_path = pair.dir.path().join("qmp.sock");
    let disk = Disk {
        socket: pair.primary_options.socket.clone(),
        queues: QUEUES,
    };
    let mut config = guest_config("mirror-stop-held", disk, qmp_path.clone());
    config.netns = Some(pair.hosts.namespace("hostA"));
    let guest = Guest::boot(&config, pair.dir.path());
    for writer in 0..WRITERS {
        guest.wait_for_line(GUEST_TIMEOUT, |line| line == format!("ACK {writer} 3"));
    }
    pair.kill_secondary();
    pair.primary().wait_mode(SYNC_TIMEOUT, "Holding");
    pair.primary()
        .wait_replication(SYNC_TIMEOUT, "held writes", |r| {
            r["in_flight_requests"].as_u64() >= Some(1)
        });
    let held = latest_records(&guest.console());
    let mut qmp = Qmp::connect(&qmp_path, QMP_TIMEOUT).expect("QMP session");
    for cycle in 0..5 {
        let started = Instant::now();
        qmp.stop()
            .unwrap_or_else(|error| panic!("cycle {cycle}: stop: {error}"));
        wait_status(&mut qmp, "paused", 0);
        eprintln!("stop with held writes took {:?}", started.elapsed());
        qmp.cont()
            .unwrap_or_else(|error| panic!("cycle {cycle}: cont: {error}"));
        wait_status(&mut qmp, "running", 0);
    }
    // A writer's record that completed just before the hold may print its `ACK` after the
    // snapshot (the console lags), but no writer gets two further records acknowledged:
    // its next write is held.
    let after = latest_records(&guest.console());
    assert!(
        after.iter().zip(&held).all(|(now, then)| *now <= then + 1),
        "held writes completed: {held:?} before the stops, {after:?} after"
    );
    let reply = pair.primary().command("continue-degraded");
    assert_eq!(reply["ok"], true, "continue-degraded refused: {reply}");
    poll_until(
        PROGRESS_TIMEOUT,
        "every writer to go on after the rewinds",
        || {
            let now = latest_records(&guest.console());
            (0..now.len()).all(|writer| now[writer] > after[writer])
        },
    );
    let console = guest.console();
    assert!(
        !console.iter().any(|line| line.starts_with("WRITE-FAILED")),
        "the guest saw write errors"
    );
    drop(guest);
    let image = std::fs::read(&pair.primary_options.image).expect("read primary image");
    records::assert_in_image(&image, &records::acknowledged(&console), "primary");
    let status = pair.primary().status();
    assert_eq!(status["rejected_requests"], 0, "status: {status}");
}
