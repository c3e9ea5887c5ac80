//! Level 3 driven by `ftvmd` (issue 11): a protected VM goes from Level 2 to Level 3 and back
//! while it runs (`ftvm protect --level`), and at Level 3 it survives the loss of its host:
//! ftvmd on hostB gets the witness's grant, freezes the replica, promotes the disk at its
//! checkpoint and restores the VM, whose processes and TCP sessions go on; when hostA comes
//! back, Level 3 protection returns with the roles swapped.

use std::time::Duration;

use ftvm_tests::cluster::{Cluster, ClusterOptions};
use ftvm_tests::guest::GuestConfig;
use ftvm_tests::level3::{count_of, guest_script, COUNTER_AND_ECHO, RAM_MB};
use ftvm_tests::net::{connect_in, Rounds, ECHO_PORT};
use ftvm_tests::nic_daemon::{GUEST_IP, GUEST_MAC};
use ftvm_tests::wait::poll_for;

const A: usize = 0;
const B: usize = 1;
/// Booting, the first full copy and the restore, under TCG on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(240);

/// The last `COUNT` line of a host's console.
fn last_count(cluster: &Cluster, host: usize) -> Option<(u64, f64)> {
    cluster
        .console(host)
        .iter()
        .rev()
        .find_map(|line| count_of(line))
}

fn protect(cluster: &Cluster, level: &str) {
    let (ok, text) = cluster.ftvm(A, &["protect", "vm1", "--level", level, "--peer", "hostB"]);
    assert!(ok, "ftvm protect --level {level}: {text}");
    eprintln!("ftvm protect --level {level}: {text}");
}

/// Waits until hostA's engine has committed `more` checkpoints beyond what it had.
fn wait_checkpoints(cluster: &Cluster, what: &str) -> serde_json::Value {
    let vm = cluster.wait_vm(A, TIMEOUT, what, |vm| {
        vm["checkpoint"]["state"] == "protected"
            && vm["checkpoint"]["stats"]["committed_epoch"].as_u64() >= Some(5)
    });
    cluster.wait_vm(B, TIMEOUT, "a restorable replica", |vm| {
        vm["level"] == 3 && vm["checkpoint"]["restorable"] == true
    });
    vm
}

#[test]
fn level_2_to_3_and_back_while_running_then_the_guest_survives_the_loss_of_its_host() {
    // The counter and echo server, and records written to the disk all the time (so that
    // every failover drops writes of checkpoints that never committed).
    let script = format!("{DISK_WRITER}{COUNTER_AND_ECHO}");
    let mut guest = GuestConfig::new("ftvmd-l3", &guest_script(&script));
    guest.cpus = 1;
    guest.memory_mb = RAM_MB;
    let options = ClusterOptions {
        disk_bytes: 16 << 20,
        nic_mac: Some(GUEST_MAC.into()),
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::new("ftvmd-l3", &guest, &options);
    cluster.start_all();
    let vm = cluster.wait_vm(A, TIMEOUT, "Protected, running", |vm| {
        vm["state"] == "Protected" && vm["vm_pid"].is_u64()
    });
    let pid = vm["vm_pid"].clone();
    cluster.wait_console(A, "NET-UP");
    let client = cluster.hosts.namespace("client");
    let rounds = Rounds::start(connect_in(&client, &format!("{GUEST_IP}:{ECHO_PORT}")));
    rounds.wait_for(10, TIMEOUT, "at Level 2");

    // Level 2 → 3 while the guest runs.
    protect(&cluster, "3");
    let vm = wait_checkpoints(&cluster, "Level 3 checkpoints committing");
    eprintln!("hostA at Level 3: {}", vm["checkpoint"]);
    assert!(
        cluster.ram_file(B).exists(),
        "hostB's replica has no RAM file"
    );
    rounds.wait_for(20, TIMEOUT, "at Level 3 (through output commit)");
    let (ok, text) = cluster.ftvm(A, &["status"]);
    assert!(
        ok && text.contains("checkpoints: primary protected"),
        "{text}"
    );

    // … and back to 2: the engines stop, the held output goes out, the guest runs on.
    protect(&cluster, "2");
    cluster.wait_vm(A, TIMEOUT, "Level 2 again, no engine", |vm| {
        vm["level"] == 2 && vm["checkpoint"].is_null()
    });
    cluster.wait_vm(B, TIMEOUT, "Level 2 again, no replica", |vm| {
        vm["level"] == 2 && vm["checkpoint"].is_null()
    });
    // The dropped replica's RAM (memory, in /dev/shm) is gone (its record says it is not
    // restorable: `a_replica_handed_to_a_restore_is_never_restorable_again`).
    let replica_ram = cluster.ram_file(B);
    poll_for(
        TIMEOUT,
        "hostB's replica RAM file removed",
        || Some(replica_ram.exists()),
        |exists| !exists,
    );
    let log = cluster.checkpoint_log(B);
    assert!(log.contains("replica dropped"), "hostB's engine log: {log}");
    rounds.wait_for(10, TIMEOUT, "at Level 2 again");

    // Level 3 again, then hostA is lost.
    protect(&cluster, "3");
    wait_checkpoints(&cluster, "Level 3 again");
    rounds.wait_for(10, TIMEOUT, "at Level 3 again");
    let vm = cluster.vm_status(A).expect("hostA's status");
    assert_eq!(
        vm["vm_pid"], pid,
        "QEMU was restarted while the level changed"
    );
    let (first_a, _) = cluster
        .console(A)
        .iter()
        .find_map(|line| count_of(line))
        .expect("hostA's guest counted");
    let killed = cluster.kill_host(A);
    let (last_a, uptime_a) = last_count(&cluster, A).expect("hostA's guest counted");

    cluster.wait_vm(B, TIMEOUT, "primary, VM running", |vm| {
        vm["role"] == "Primary" && vm["vm_pid"].is_u64()
    });
    let (count, uptime) = poll_for(
        TIMEOUT,
        "the restored guest counts",
        || last_count(&cluster, B),
        |_| true,
    );
    eprintln!(
        "restored on hostB {:?} after the kill: COUNT {count} at {uptime} s (hostA's last: \
         {last_a} at {uptime_a} s)",
        killed.elapsed()
    );
    // The process goes on from the checkpoint: not from 1, not beyond what hostA's guest
    // reached (plus a line hostA printed that its console had not), not far behind.
    assert!(
        count > first_a && count <= last_a + 1 && count + 50 >= last_a,
        "the restored guest counts {count}; hostA's counted {first_a} to {last_a}"
    );
    assert!(
        uptime + 5.0 >= uptime_a,
        "the restored guest's uptime is {uptime} s, hostA's guest was at {uptime_a} s: it rebooted"
    );
    assert!(
        !cluster
            .console(B)
            .iter()
            .any(|line| line.starts_with("COUNT 1 ")),
        "the guest counted from 1 again on hostB"
    );
    // The same TCP connection carries on, every reply byte for byte.
    rounds.wait_for(20, TIMEOUT, "on hostB after the failover");
    rounds.check();
    let (_, events) = cluster.ftvm(B, &["events"]);
    assert!(
        events.contains("VM restored on hostB from checkpoint"),
        "hostB's events: {events}"
    );
    eprintln!(
        "after the failover: {} rounds, longest gap {:?}",
        rounds.count(),
        rounds.longest_gap_since(killed)
    );

    // hostA comes back: it follows hostB as secondary, its disk resyncs, and Level 3
    // protection returns by itself, hostB's engine primary, hostA's the replica.
    cluster.set_links(A, &["alink1", "alink2", "lan0"], true);
    cluster.start_ftvmd(A);
    let vm = cluster.wait_vm(B, TIMEOUT, "Level 3 again with hostA as secondary", |vm| {
        vm["checkpoint"]["role"] == "primary"
            && vm["checkpoint"]["state"] == "protected"
            && vm["checkpoint"]["stats"]["committed_epoch"].as_u64() >= Some(5)
    });
    eprintln!("hostB protects the VM at Level 3: {}", vm["checkpoint"]);
    eprintln!(
        "hostA's copy was resynced: {} of {} bytes",
        vm["disks"][0]["replication"]["resync"]["bytes_total"], options.disk_bytes
    );
    cluster.wait_vm(A, TIMEOUT, "hostA's replica restorable", |vm| {
        vm["role"] == "Secondary" && vm["level"] == 3 && vm["checkpoint"]["restorable"] == true
    });
    rounds.wait_for(10, TIMEOUT, "with hostA back");
    rounds.check();

    // A planned failover at Level 3 moves the running VM back to hostA from its last
    // checkpoint: no reboot, the same TCP connection.
    let (_, before_b) = last_count(&cluster, B).expect("hostB's guest counts");
    let (ok, text) = cluster.ftvm(B, &["failover", "vm1"]);
    assert!(ok, "ftvm failover: {text}");
    let moved = std::time::Instant::now();
    cluster.wait_vm(A, TIMEOUT, "primary again, VM running", |vm| {
        vm["role"] == "Primary" && vm["vm_pid"].is_u64()
    });
    let console_before = cluster.console(A).len();
    let (count_a, uptime_a) = poll_for(
        TIMEOUT,
        "the guest counting on hostA again",
        || {
            cluster.console(A)[console_before.min(cluster.console(A).len())..]
                .iter()
                .rev()
                .find_map(|line| count_of(line))
        },
        |_| true,
    );
    assert!(
        count_a > count && uptime_a + 5.0 >= before_b,
        "after the planned failover hostA's guest counts {count_a} at {uptime_a} s; hostB's \
         was at {before_b} s"
    );
    rounds.wait_for(10, TIMEOUT, "after the planned failover to hostA");
    rounds.check();
    let (_, events) = cluster.ftvm(A, &["events"]);
    assert!(
        events.contains("VM restored on hostA from checkpoint"),
        "hostA's events: {events}"
    );
    eprintln!(
        "planned failover at Level 3: longest gap of the TCP loop {:?}",
        rounds.longest_gap_since(moved)
    );

    // After two moves that each dropped uncommitted writes, the copies are the same: back
    // at Level 2 (hostB applies what it buffered), with the guest paused and the mirror
    // idle, both images are equal byte for byte.
    protect(&cluster, "2");
    cluster.wait_vm(A, TIMEOUT, "Level 2, Protected", |vm| {
        vm["checkpoint"].is_null() && vm["state"] == "Protected"
    });
    let mut qmp = ftvm_tests::qmp::Qmp::connect(&cluster.test_qmp(A), TIMEOUT).expect("QMP");
    qmp.stop().expect("stop the guest");
    cluster.wait_vm(B, TIMEOUT, "hostB's copy idle, nothing buffered", |vm| {
        let replication = &vm["disks"][0]["replication"];
        replication["epochs"]["enabled"] == false
            && replication["epochs"]["buffered_records"].as_u64() == Some(0)
    });
    cluster.wait_vm(A, TIMEOUT, "hostA's mirror idle", |vm| {
        vm["disks"][0]["replication"]["in_flight_requests"].as_u64() == Some(0)
            && vm["state"] == "Protected"
    });
    cluster.assert_images_equal();
    qmp.cont().expect("cont");
}

/// Records written to the disk (each synced) in the background, every 20 ms.
const DISK_WRITER: &str = "(i=1\n\
     while true; do\n\
       echo \"rec $i\" | dd of=/dev/vda bs=4096 seek=$((i % 1000)) conv=sync,fsync 2>/dev/null \
         || echo \"WRITE-FAILED $i\"\n\
       echo \"ACK $i\"\n\
       i=$((i + 1))\n\
       usleep 20000\n\
     done) &\n";

/// A process's nice value (`/proc/PID/stat`, field 19).
fn nice(pid: u32) -> i64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_name = &stat[stat.rfind(')').expect("(comm)") + 2..];
    // Fields from the third (state) on: nice is the 19th field, the 17th here.
    after_name
        .split_whitespace()
        .nth(16)
        .and_then(|field| field.parse().ok())
        .expect("the nice field")
}

/// The highest `ACK n` on a host's console.
fn last_ack(cluster: &Cluster, host: usize) -> u64 {
    ftvm_tests::records::last_ack(&cluster.console(host))
}

/// hostA's own disk fails (a real EIO from `ftvm-fault-fs`): its disk daemon serves the
/// guest from hostB's copy (RemoteOnly), which ends the disk's epochs, so no checkpoint
/// could commit and the guest's output would stay held. ftvmd suspends Level 3 (both
/// engines stop, hostB first: the held output goes out only once no replica is left to
/// restore), the guest's writes and its TCP connection go on; after the repair Level 3
/// resumes by itself.
#[test]
fn a_failed_local_disk_suspends_level_3_and_the_repair_resumes_it() {
    let fault_fs = ftvm_tests::fault_fs::FaultFs::start();
    let mut guest = GuestConfig::new(
        "ftvmd-l3-disk",
        &guest_script(&format!("{DISK_WRITER}nc -ll -p 7000 -e cat\n")),
    );
    guest.cpus = 1;
    guest.memory_mb = RAM_MB;
    let options = ClusterOptions {
        level: 3,
        disk_bytes: 16 << 20,
        nic_mac: Some(GUEST_MAC.into()),
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::new("ftvmd-l3-disk", &guest, &options);
    // hostA's image lives on the fault-injecting file system.
    cluster.put_image_on(A, &fault_fs);
    cluster.start_all();
    cluster.wait_console(A, "NET-UP");
    wait_checkpoints(&cluster, "Level 3 checkpoints committing");
    // ftvmd runs above its guests, so that a busy host still heartbeats on time; what it
    // starts (QEMU, the disk daemon, the engine) does not.
    let vm = cluster.vm_status(A).expect("hostA's status");
    assert_eq!(nice(cluster.ftvmd_pid(A).expect("ftvmd runs")), -10);
    for pid in [&vm["vm_pid"], &vm["disk_pids"][0]] {
        let pid = pid.as_u64().expect("a pid") as u32;
        assert_eq!(nice(pid), 0, "pid {pid}: {vm}");
    }
    let client = cluster.hosts.namespace("client");
    let rounds = Rounds::start(connect_in(&client, &format!("{GUEST_IP}:{ECHO_PORT}")));
    rounds.wait_for(10, TIMEOUT, "at Level 3");

    fault_fs.fail_writes("hostA.img", 0, 16 << 20);
    cluster.wait_vm(A, TIMEOUT, "RemoteOnly, both engines stopped", |vm| {
        vm["state"] == "RemoteOnly" && vm["checkpoint"].is_null()
    });
    cluster.wait_vm(B, TIMEOUT, "no replica on hostB", |vm| {
        vm["checkpoint"].is_null()
    });
    let (_, events) = cluster.ftvm(A, &["events"]);
    assert!(
        events.contains("Level 3 suspended"),
        "hostA's events: {events}"
    );
    // The guest goes on: its writes (served from hostB's copy) and its TCP connection,
    // whose output is no longer held.
    let before = last_ack(&cluster, A);
    poll_for(
        TIMEOUT,
        "the guest's writes going on",
        || Some(last_ack(&cluster, A)),
        |&ack| ack >= before + 20,
    );
    rounds.wait_for(10, TIMEOUT, "with Level 3 suspended");

    // The disk is repaired: its copy is rebuilt from hostB's, and Level 3 comes back.
    fault_fs.clear();
    let control = cluster.dir.path().join("hostA/vm1/disk0.ctl");
    let answer = ftvm_tests::blk::control_json(&control, "repair").expect("repair answered");
    assert!(answer.get("error").is_none(), "repair refused: {answer}");
    wait_checkpoints(&cluster, "Level 3 again after the repair");
    rounds.wait_for(10, TIMEOUT, "at Level 3 after the repair");
    rounds.check();
    ftvm_tests::records::assert_no_write_failed(&cluster.console(A));
    let (_, events) = cluster.ftvm(A, &["events"]);
    assert!(
        events.contains("Level 3 resumes"),
        "hostA's events: {events}"
    );
    eprintln!("hostA's events:\n{events}");
}
