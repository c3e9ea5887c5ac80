//! Level 3 disk writes end to end (`docs/LEVEL3.md`, "Disk writes at Level 3"): a TCG guest
//! writes numbered, flushed records to a mirrored disk while the test plays the checkpoint
//! engine (QMP `stop`, `epoch-end N` on the primary, `cont`, then `wait-sealed N` and
//! `commit N` on the secondary). The primary is killed in the middle of an epoch and the
//! secondary promoted at the last committed epoch N*: its image is byte for byte the
//! primary's image as it was while the VM was stopped at the end of N* (every write of the
//! epochs up to N*, none of a later one, sealed or not), and it holds every record the guest
//! saw acknowledged before that stop.
//!
//! The console alone cannot bound what came after a stop: a line the shell printed can sit
//! in the guest's tty buffer across the stop while the writer already wrote its next record.
//! The primary's image read while the VM is stopped (every accepted request completed) can.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ftvm_tests::cpio::Entry;
use ftvm_tests::guest::{Disk, Guest, GuestConfig};
use ftvm_tests::mirror::MirrorPair;
use ftvm_tests::qmp::Qmp;
use ftvm_tests::records;
use ftvm_tests::wait::poll_for;

/// Boot under TCG on a shared machine.
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
const IMAGE_BYTES: u64 = 64 << 20;
const QUEUES: u16 = 2;
const WRITERS: u16 = 2;
/// Committed epochs before the failover.
const EPOCHS: u64 = 6;
/// How long the guest runs in each epoch.
const EPOCH_RUN: Duration = Duration::from_millis(400);
/// The console is read by a thread: lines the guest printed before a stop may still be on
/// their way; once none arrived for this long, the snapshot is complete.
const CONSOLE_QUIET: Duration = Duration::from_millis(500);

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

fn guest_config(pair: &MirrorPair, qmp: std::path::PathBuf) -> GuestConfig {
    let mut script = String::new();
    for writer in 0..WRITERS {
        let cpu = 1 << (writer % QUEUES);
        script.push_str(&format!("taskset {cpu} sh /writer.sh {writer} &\n"));
    }
    script.push_str("wait\n");
    let mut config = GuestConfig::new("mirror-level3", &script);
    config.cpus = u32::from(QUEUES);
    config.disks.push(Disk {
        socket: pair.primary_options.socket.clone(),
        queues: QUEUES,
    });
    config.qmp = Some(qmp);
    config.netns = Some(pair.hosts.namespace("hostA"));
    config
        .files
        .push(Entry::executable("writer.sh", WRITER.as_bytes().to_vec()));
    config
}

/// The guest's console once no line arrived for [`CONSOLE_QUIET`] (the guest is stopped).
fn settled_console(guest: &Guest) -> Vec<String> {
    let mut last = guest.console();
    let mut quiet_since = Instant::now();
    let deadline = Instant::now() + QMP_TIMEOUT;
    while quiet_since.elapsed() < CONSOLE_QUIET && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let now = guest.console();
        if now.len() != last.len() {
            last = now;
            quiet_since = Instant::now();
        }
    }
    last
}

/// The highest record each writer had acknowledged.
fn latest(console: &[String]) -> BTreeMap<u64, u64> {
    let mut latest = BTreeMap::new();
    for (writer, record) in records::acknowledged(console) {
        let slot = latest.entry(writer).or_insert(0);
        *slot = record.max(*slot);
    }
    latest
}

fn wait_status(qmp: &mut Qmp, wanted: &str) {
    poll_for(
        QMP_TIMEOUT,
        &format!("QEMU {wanted}"),
        || qmp.status().ok(),
        |status| status == wanted,
    );
}

fn record_present(image: &[u8], writer: u64, record: u64) -> bool {
    let offset = ((writer * 1000 + record) * 4096) as usize;
    let expected = format!("ftvm-record {record:06} w{writer}\n");
    image.get(offset..offset + expected.len()) == Some(expected.as_bytes())
}

fn ok(reply: &serde_json::Value, what: &str) {
    assert_eq!(reply["ok"], true, "{what} refused: {reply}");
}

/// `wait-sealed N` as the engine asks it: at most 1 s each time, again after a refusal.
fn wait_sealed(pair: &MirrorPair, epoch: u64) {
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let reply = pair
            .secondary()
            .command(&format!("wait-sealed {epoch} 1000"));
        if reply["ok"] == true {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "epoch {epoch} never sealed: {reply}"
        );
    }
}

/// What the test saw while the VM was stopped at the end of an epoch.
struct AtStop {
    console: Vec<String>,
    /// The primary's image: every write of the epochs up to this one.
    primary_image: Vec<u8>,
}

/// Stops the guest, ends `epoch` on the primary, continues the guest; returns the console
/// and the primary's image as they were while the guest was stopped.
fn end_epoch(pair: &MirrorPair, qmp: &mut Qmp, guest: &Guest, epoch: u64) -> AtStop {
    qmp.stop().expect("stop");
    wait_status(qmp, "paused");
    let console = settled_console(guest);
    let primary_image =
        std::fs::read(&pair.primary_options.image).expect("read the primary's image");
    ok(
        &pair.primary().command(&format!("epoch-end {epoch}")),
        "epoch-end",
    );
    qmp.cont().expect("cont");
    wait_status(qmp, "running");
    AtStop {
        console,
        primary_image,
    }
}

#[test]
fn a_promoted_secondary_holds_exactly_the_committed_epochs() {
    let mut pair = MirrorPair::new("mirror-level3", IMAGE_BYTES, QUEUES);
    pair.secondary_options
        .extra_args
        .extend(["--epoch-journal-bytes".into(), "64M".into()]);
    // Where the promoted secondary would reach the old primary (needed by `promote`).
    for address in ["10.77.1.1:7400", "10.77.2.1:7400"] {
        pair.secondary_options
            .extra_args
            .extend(["--peer".into(), address.into()]);
    }
    pair.start_in_sync(SYNC_TIMEOUT);
    let qmp_path = pair.dir.path().join("qmp.sock");
    let guest = Guest::boot(&guest_config(&pair, qmp_path.clone()), pair.dir.path());
    for writer in 0..WRITERS {
        guest.wait_for_line(GUEST_TIMEOUT, |line| line == format!("ACK {writer} 3"));
    }
    let mut qmp = Qmp::connect(&qmp_path, QMP_TIMEOUT).expect("QMP session");
    ok(&pair.primary().command("epoch on 1"), "epoch on");

    // The engine's loop: each epoch ends while the VM is stopped, is sealed on the
    // secondary, then committed there (the replica's record stands in for the commit).
    let mut last_stop = None;
    for epoch in 1..=EPOCHS {
        std::thread::sleep(EPOCH_RUN);
        last_stop = Some(end_epoch(&pair, &mut qmp, &guest, epoch));
        wait_sealed(&pair, epoch);
        ok(
            &pair.secondary().command(&format!("commit {epoch}")),
            "commit",
        );
        // Applied in the background while the guest runs.
        pair.secondary()
            .wait_replication(SYNC_TIMEOUT, "the commit applied", |r| {
                r["epochs"]["applied_epoch"] == epoch
            });
    }
    let committed = EPOCHS;
    let last_stop = last_stop.expect("epochs ran");
    let acknowledged_by_commit = latest(&last_stop.console);
    // Epoch N*+1 is sealed but never committed (the replica did not record it), and the
    // primary dies in the middle of N*+2.
    std::thread::sleep(EPOCH_RUN);
    end_epoch(&pair, &mut qmp, &guest, committed + 1);
    wait_sealed(&pair, committed + 1);
    std::thread::sleep(EPOCH_RUN);
    let written = latest(&guest.console());
    pair.kill_primary();
    let console = guest.console();
    drop(guest);
    assert!(
        !console.iter().any(|line| line.starts_with("WRITE-FAILED")),
        "the guest saw write errors"
    );
    let status = pair.secondary().status();
    let epochs = &status["replication"]["epochs"];
    assert_eq!(epochs["sealed_epoch"], committed + 1, "{status}");
    assert_eq!(epochs["applied_epoch"], committed, "{status}");

    let generation = status["replication"]["generation"]
        .as_u64()
        .expect("generation")
        + 1;
    ok(
        &pair
            .secondary()
            .command(&format!("promote {generation} {committed}")),
        "promote at the committed epoch",
    );
    let image = pair.secondary_image();
    let primary_image =
        std::fs::read(&pair.primary_options.image).expect("read the old primary's image");
    // Every record acknowledged before the stop that ended N* is there.
    for (&writer, &last) in &acknowledged_by_commit {
        for record in 1..=last {
            assert!(
                record_present(&image, writer, record),
                "record {record} of writer {writer} was acknowledged before epoch {committed} \
                 ended but is missing from the promoted image"
            );
        }
    }
    // Exactly the writes of the epochs up to N*: the primary's image at that stop.
    if let Some(offset) = last_stop
        .primary_image
        .iter()
        .zip(&image)
        .position(|(at_stop, promoted)| at_stop != promoted)
    {
        let block = offset / 4096;
        panic!(
            "the promoted image differs from the primary's at the end of epoch {committed}, \
             first at block {block} (writer {}, record {}): {:?} instead of {:?}",
            block / 1000,
            block % 1000,
            String::from_utf8_lossy(&image[block * 4096..block * 4096 + 24]),
            String::from_utf8_lossy(&last_stop.primary_image[block * 4096..block * 4096 + 24]),
        );
    }
    // And the later epochs did write something (else the check proves nothing).
    let mut dropped = 0;
    for writer in 0..u64::from(WRITERS) {
        for record in 1..1000 {
            if record_present(&primary_image, writer, record)
                && !record_present(&image, writer, record)
            {
                dropped += 1;
            }
        }
    }
    eprintln!(
        "{committed} epochs committed; by then {acknowledged_by_commit:?} acknowledged; \
         {written:?} when the primary died; {dropped} record(s) of later epochs dropped"
    );
    assert!(
        dropped > 0,
        "the guest wrote nothing after the last commit: the test proves nothing"
    );
    let promoted = pair.secondary().status();
    assert_eq!(promoted["replication"]["role"], "primary", "{promoted}");
    assert_eq!(
        promoted["replication"]["generation"], generation,
        "{promoted}"
    );
}
