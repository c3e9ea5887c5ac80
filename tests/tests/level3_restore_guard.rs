//! Level 3 (issue 11): a replica that never completed its first full copy and a checkpoint
//! is never restored. The secondary engine refuses `restore` with a reason, and `freeze`
//! says the replica is not restorable: with no primary ever, and with a primary SIGKILLed
//! during its first full copy. (Malformed and truncated checkpoint streams are refused
//! without touching the replica: unit tests in `checkpoint/`, see `docs/SPECIFICATION.md`.)

use std::path::Path;
use std::time::{Duration, Instant};

use ftvm_tests::guest::GuestConfig;
use ftvm_tests::hosts::Hosts;
use ftvm_tests::level3::{
    guest_script, start_secondary, status_json_command, Level3Options, Level3Pair,
};
use ftvm_tests::scratch_dir;
use ftvm_tests::wait::Wait;
use serde_json::Value;

/// `restore` into a QEMU that does not exist: the engine must refuse before it looks for
/// one, because there is nothing to restore.
fn assert_restore_refused(control: &Path, qmp: &Path) -> Value {
    let reply = status_json_command(control, &format!("restore {}", qmp.display()));
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("not restorable") && error.contains("full copy"),
        "restore of a replica without a checkpoint was not refused for that reason: {reply}"
    );
    assert_ne!(reply["restored"], true, "{reply}");
    reply
}

/// Bytes received by every interface of process `pid`'s network namespace (hostB's A-links
/// carry the full copy).
fn bytes_received(pid: u32) -> u64 {
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap_or_default();
    // "  name: rx_bytes rx_packets ..." after two header lines.
    table
        .lines()
        .skip(2)
        .filter_map(|line| {
            line.split_once(':')?
                .1
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

fn assert_frozen_not_restorable(control: &Path) -> Value {
    let frozen = status_json_command(control, "freeze");
    assert_eq!(frozen["ok"], true, "{frozen}");
    assert_eq!(frozen["restorable"], false, "{frozen}");
    frozen
}

#[test]
fn a_secondary_that_never_saw_a_primary_refuses_to_restore() {
    let hosts = Hosts::up();
    let dir = scratch_dir("l3-restore-empty");
    let psk = dir.path().join("pair.psk");
    std::fs::write(&psk, "level 3 test key, 32 bytes long!\n").expect("psk");
    let control = dir.path().join("checkpoint-B.ctl");
    let _secondary = start_secondary(
        &hosts,
        dir.path(),
        &psk,
        &dir.path().join("replica.ram"),
        &control,
        None,
    );
    let status = status_json_command(&control, "status");
    assert_eq!(status["state"], "waiting", "{status}");
    assert_eq!(status["restorable"], false, "{status}");
    let qmp = dir.path().join("no-such-qemu.sock");
    let refused = assert_restore_refused(&control, &qmp);
    let frozen = assert_frozen_not_restorable(&control);
    // Still refused once frozen, and a restore without its QEMU is a usage error.
    assert_restore_refused(&control, &qmp);
    let usage = status_json_command(&control, "restore");
    assert!(
        usage["error"]
            .as_str()
            .is_some_and(|error| error.contains("QMP")),
        "{usage}"
    );
    let status = status_json_command(&control, "status");
    assert_eq!(status["state"], "frozen", "{status}");
    eprintln!("refused: {refused}; frozen: {frozen}");
}

#[test]
fn a_primary_killed_during_its_first_full_copy_leaves_nothing_to_restore() {
    let config = GuestConfig::new("l3-restore-first-copy", &guest_script("sleep 3600\n"));
    // The first checkpoint would come 20 s after the engine started: the kill is long
    // before it whatever the load.
    let options = Level3Options {
        interval_ms: 20_000,
        disk_bytes: None,
    };
    let mut pair = Level3Pair::start_unprotected("l3-restore-first-copy", config, options);
    let secondary = pair.secondary_pid();
    let received_before = bytes_received(secondary);
    pair.start_primary_engine();
    let started = Instant::now();
    // The kill comes once hostB has received 8 MiB of the copy (of 256 MiB of RAM),
    // while the primary still says `full-copy` (its copy is not acknowledged yet).
    let seen = Wait::up_to(Duration::from_secs(60))
        .every(Duration::from_millis(2))
        .poll(|| {
            let status = pair.primary_status();
            let copying = bytes_received(secondary) >= received_before + (8 << 20);
            (copying || status["state"] == "protected").then_some(status)
        })
        .unwrap_or_else(|| {
            panic!(
                "the primary never sent 8 MiB of its full copy: {}\nlog:\n{}",
                pair.primary_status(),
                pair.log("checkpoint-A.log")
            )
        });
    pair.kill_primary_engine();
    let received = bytes_received(secondary) - received_before;
    eprintln!(
        "primary SIGKILLed {:?} after its start, in state {}, hostB having received {received} bytes",
        started.elapsed(),
        seen["state"]
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "too slow to be sure no checkpoint was taken"
    );
    assert_eq!(
        seen["state"], "full-copy",
        "the kill came after the full copy: {seen}"
    );
    // The link's session outlives its connections (a primary that comes back resumes it):
    // the secondary may still count itself replicating; freeze ends that.
    let status = pair.secondary_status();
    assert_eq!(status["restorable"], false, "{status}");
    assert_eq!(status["committed_epoch"], 0, "{status}");
    let qmp = pair.dir.path().join("qmp-B.sock");
    let refused = assert_restore_refused(&pair.secondary_control, &qmp);
    let frozen = assert_frozen_not_restorable(&pair.secondary_control);
    eprintln!("secondary: {status}; refused: {refused}; frozen: {frozen}");
}
