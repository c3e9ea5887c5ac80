//! `ftvm migrate` (issue 13): a running protected VM moves between the two hosts without a
//! reboot, its memory, processes and TCP sessions with it, and the disks swap roles with
//! nothing lost; a move called off, or whose destination host dies, leaves the VM running
//! where it was, protected. The guest runs fio `--verify=crc32c` and synced records throughout.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ftvm_tests::cluster::{Cluster, ClusterOptions, HOSTS};
use ftvm_tests::guest::GuestConfig;
use ftvm_tests::level3::{count_of, guest_script, COUNTER_AND_ECHO, RAM_MB};
use ftvm_tests::net::{connect_in, Rounds, ECHO_PORT};
use ftvm_tests::nic_daemon::{GUEST_IP, GUEST_MAC};
use ftvm_tests::records;
use ftvm_tests::torture::workload::{fio_missing_in_image, BLOCK_BYTES, FIO_CHUNK_BYTES};
use ftvm_tests::wait::{poll_for, poll_until};

const A: usize = 0;
const B: usize = 1;
/// Booting, Level 3's first full copy and the restore, under TCG on a loaded machine.
const TIMEOUT: Duration = Duration::from_secs(240);
/// Moves in a row in the first test.
const MOVES: usize = 10;

/// Records written to the disk (each synced) in the background, every 20 ms: `ACK n` once
/// record n is on the disk.
const DISK_WRITER: &str = "(i=1\n\
     while true; do\n\
       echo \"rec $i\" | dd of=/dev/vda bs=4096 seek=$((i % 1000)) conv=sync,fsync 2>/dev/null \
         || echo \"WRITE-FAILED $i\"\n\
       echo \"ACK $i\"\n\
       i=$((i + 1))\n\
       usleep 20000\n\
     done) &\n";

/// Where fio's chunks start: the disk's upper half (the records use its first 4 MiB).
const FIO_FIRST_BLOCK: u64 = (8 << 20) / BLOCK_BYTES;
/// fio chunks in the upper half, used in turn.
const FIO_CHUNKS: u64 = (8 << 20) / FIO_CHUNK_BYTES;

/// fio `--verify=crc32c` in the background, one run after another over the 128 KiB chunks
/// of the disk's upper half in turn: each run writes its chunk with 32 random 4 KiB writes
/// at queue depth 8 (libaio, O_DIRECT) seeded by the run's number, a FLUSH, then reads the
/// chunk back and checks every block's header and CRC32C. `FIO-ACK seq block` follows a
/// run that passed, `FIO-FAILED seq block` and fio's error lines one that did not. The
/// host checks the copies with the same fio afterwards (the torture rig's fio workload).
fn fio_writer() -> String {
    let chunk_blocks = FIO_CHUNK_BYTES / BLOCK_BYTES;
    format!(
        "(seq=1\n\
         while true; do\n\
           block=$(({FIO_FIRST_BLOCK} + (seq % {FIO_CHUNKS}) * {chunk_blocks}))\n\
           if fio --name=chunk$seq --filename=/dev/vda --offset=$((block * 4096)) \
             --randseed=$seq --rw=randwrite --bs=4k --size=128k --verify=crc32c \
             --ioengine=libaio --direct=1 --iodepth=8 --do_verify=1 --verify_fatal=1 \
             --end_fsync=1 --verify_state_save=0 --eta=never --output=/tmp/fio.out; then\n\
             echo \"FIO-ACK $seq $block\"\n\
           else\n\
             echo \"FIO-FAILED $seq $block\"; grep -i -e err -e verify /tmp/fio.out | head -n 5\n\
           fi\n\
           seq=$((seq + 1))\n\
         done) &\n"
    )
}

/// The newest fio run that passed, on either host's console.
fn newest_fio_run(cluster: &Cluster) -> Option<u64> {
    [A, B]
        .iter()
        .flat_map(|&host| fio_acks(&cluster.console(host)))
        .map(|(seq, _)| seq)
        .max()
}

/// The fio runs that passed (`FIO-ACK seq block`), in order.
fn fio_acks(console: &[String]) -> Vec<(u64, u64)> {
    console
        .iter()
        .filter_map(|line| {
            let mut words = line.strip_prefix("FIO-ACK ")?.split_whitespace();
            Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
        })
        .collect()
}

fn start(name: &str) -> Cluster {
    let script = format!("{DISK_WRITER}{}{COUNTER_AND_ECHO}", fio_writer());
    let mut guest = GuestConfig::new(name, &guest_script(&script));
    guest.with_fio = true;
    guest.cpus = 1;
    guest.memory_mb = RAM_MB;
    let options = ClusterOptions {
        disk_bytes: 16 << 20,
        nic_mac: Some(GUEST_MAC.into()),
        // The NIC daemons then stay on both hosts (standby for the relay): a move must
        // leave the source's daemon holding nothing, or a VM restored there later would
        // have its output held with no engine to release it (seen in the demo).
        nic_redundant_uplink: true,
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::new(name, &guest, &options);
    cluster.start_all();
    cluster.wait_vm(A, TIMEOUT, "Protected, running", |vm| {
        vm["state"] == "Protected" && vm["vm_pid"].is_u64()
    });
    cluster.wait_console(A, "NET-UP");
    cluster
}

/// A host's events of warning or error severity (`ftvm events --json`).
fn warnings(cluster: &Cluster, host: usize) -> Vec<String> {
    let (ok, text) = cluster.ftvm(host, &["events", "--json"]);
    assert!(ok, "ftvm events on {}: {text}", HOSTS[host]);
    let events: serde_json::Value = serde_json::from_str(&text).expect("events JSON");
    events
        .as_array()
        .into_iter()
        .flatten()
        .filter(|event| event["severity"] != "Info")
        .map(|event| format!("{} {}", event["severity"], event["what"]))
        .collect()
}

/// How many lines of a host's ftvmd log are about its disks' settle before a move: that
/// one settled, did not, or did not answer in time.
fn settle_lines(cluster: &Cluster, host: usize) -> usize {
    cluster
        .log(host)
        .lines()
        .filter(|line| line.contains("settled") || line.contains("did not settle"))
        .count()
}

/// The last `COUNT` line of a host's console from line `from` on.
fn last_count_since(cluster: &Cluster, host: usize, from: usize) -> Option<(u64, f64)> {
    let console = cluster.console(host);
    console[from.min(console.len())..]
        .iter()
        .rev()
        .find_map(|line| count_of(line))
}

/// A counter of a host's NIC daemon (its `status`); 0 while it does not answer.
fn nic_counter(cluster: &Cluster, host: usize, name: &str) -> u64 {
    cluster
        .nic_status(host)
        .and_then(|status| status[name].as_u64())
        .unwrap_or(0)
}

/// The switchover's relay of one move (`vhost-net-ft`, `handover`): the frames for the
/// guest that reached the source's TAP while neither host ran it, and those of them the
/// destination handed to its guest, once every relayed frame was either passed or dropped.
fn handover_frames(cluster: &Cluster, from: usize, to: usize, before: [u64; 3]) -> (u64, u64) {
    let [relayed_before, passed_before, dropped_before] = before;
    let (relayed, passed, dropped) = poll_for(
        Duration::from_secs(10),
        "the destination's NIC daemon to pass on every frame the source relayed",
        || {
            let now = handover_counters(cluster, from, to);
            Some((now[0], now[1], now[2]))
        },
        |(relayed, passed, dropped)| {
            relayed.saturating_sub(relayed_before)
                == passed.saturating_sub(passed_before) + dropped.saturating_sub(dropped_before)
        },
    );
    assert_eq!(
        nic_counter(cluster, from, "handover_relay_dropped"),
        0,
        "the source's link refused frames of the relay"
    );
    assert_eq!(
        dropped, dropped_before,
        "{} dropped frames the source relayed during the move",
        HOSTS[to]
    );
    (
        relayed.saturating_sub(relayed_before),
        passed.saturating_sub(passed_before),
    )
}

/// The source's relayed frames, the destination's passed and dropped ones.
fn handover_counters(cluster: &Cluster, from: usize, to: usize) -> [u64; 3] {
    [
        nic_counter(cluster, from, "handover_relayed_packets"),
        nic_counter(cluster, to, "handover_rx_packets"),
        nic_counter(cluster, to, "handover_rx_dropped"),
    ]
}

/// Waits until `host` runs the VM as primary, Protected at level 2, with `peer` its
/// secondary and no move under way on either.
fn wait_protected_on(cluster: &Cluster, host: usize, peer: usize) -> serde_json::Value {
    cluster.wait_vm(
        peer,
        TIMEOUT,
        "secondary in sync, no move under way",
        |vm| vm["role"] == "Secondary" && vm["state"] == "Protected" && vm["migration"].is_null(),
    );
    cluster.wait_vm(host, TIMEOUT, "primary, Protected at level 2 again", |vm| {
        vm["role"] == "Primary"
            && vm["state"] == "Protected"
            && vm["level"] == 2
            && vm["vm_pid"].is_u64()
            && vm["checkpoint"].is_null()
            && vm["migration"].is_null()
    })
}

/// A move that takes longer than this, or whose TCP gap is longer than [`SLOW_GAP`], prints
/// both hosts' ftvmd log lines of it.
const SLOW_MOVE: Duration = Duration::from_secs(4);
const SLOW_GAP: Duration = Duration::from_millis(500);

#[test]
fn ftvm_migrate_moves_the_running_vm_ten_times_without_a_reboot_or_a_lost_write() {
    let cluster = start("ftvmd-migrate");
    let client = cluster.hosts.namespace("client");
    let rounds = Rounds::start(connect_in(&client, &format!("{GUEST_IP}:{ECHO_PORT}")));
    rounds.wait_for(10, TIMEOUT, "before the first move");
    let (mut count, mut uptime) = last_count_since(&cluster, A, 0).expect("the guest counts");

    let mut downtimes = Vec::new();
    let mut handed_over = Vec::new();
    let mut fio_done = 0;
    for index in 0..MOVES {
        let (from, to) = if index.is_multiple_of(2) {
            (A, B)
        } else {
            (B, A)
        };
        // fio finished a run since the last move: every move falls among fio's runs, also
        // on a loaded machine where the guest's runs are slow.
        fio_done = poll_for(
            TIMEOUT,
            "a fio run in the guest since the last move",
            || newest_fio_run(&cluster),
            |&newest| newest > fio_done,
        );
        let console_before = cluster.console(to).len();
        let settles_before = settle_lines(&cluster, from);
        let warnings_before = [warnings(&cluster, A).len(), warnings(&cluster, B).len()];
        let relay_before = handover_counters(&cluster, from, to);
        let logs_before = [cluster.log(A).len(), cluster.log(B).len()];
        let started = Instant::now();
        let (ok, text) = cluster.ftvm(from, &["migrate", "vm1", "--timeout", "200"]);
        assert!(ok, "move {index}: ftvm migrate on {}: {text}", HOSTS[from]);
        let took = started.elapsed();
        // The same guest goes on there: its counter and uptime continue (no reboot).
        let (count_to, uptime_to) = poll_for(
            TIMEOUT,
            "the guest counting on the destination",
            || last_count_since(&cluster, to, console_before),
            |_| true,
        );
        assert!(
            count_to > count && uptime_to + 1.0 >= uptime,
            "move {index}: on {} the guest counts {count_to} at {uptime_to} s; before the \
             move it counted {count} at {uptime} s",
            HOSTS[to]
        );
        assert!(
            !cluster.console(to)[console_before..]
                .iter()
                .any(|line| line.starts_with("COUNT 1 ")),
            "move {index}: the guest counted from 1 again on {}: it rebooted",
            HOSTS[to]
        );
        let vm = wait_protected_on(&cluster, to, from);
        let resync = vm["disks"][0]["replication"]["resync"]["bytes_total"].clone();
        // The source's disk settled before the peer took over (both copies flushed, its
        // active extents forgotten, so the resync after the move holds only what the
        // guest wrote before the demoted copy was back), or the source said why not.
        assert!(
            settle_lines(&cluster, from) > settles_before,
            "move {index}: {}'s log has no line about its disk's settle",
            HOSTS[from]
        );
        rounds.wait_for(5, TIMEOUT, "after the move");
        let gap = rounds.longest_gap_since(started);
        // The TCP loop's segments that reached the source while the guest ran nowhere went
        // on to the destination, and its guest got every one of them.
        let (relayed, passed) = handover_frames(&cluster, from, to, relay_before);
        eprintln!(
            "move {index} {} -> {}: ftvm migrate returned after {took:?}; longest gap of the \
             TCP loop {gap:?}; resync after it {resync} bytes; frames relayed at the \
             switchover {relayed}, passed to the guest {passed}",
            HOSTS[from], HOSTS[to]
        );
        if took > SLOW_MOVE || gap > SLOW_GAP {
            // Not a failure (a loaded machine), but worth a look: the move's ftvmd lines.
            for host in [A, B] {
                let log = cluster.log(host);
                eprintln!(
                    "move {index} was slow; ftvmd log of {} meanwhile:\n{}",
                    HOSTS[host],
                    log.get(logs_before[host]..).unwrap_or("")
                );
            }
        }
        downtimes.push(gap);
        handed_over.push(relayed);
        let nic = cluster
            .nic_status(from)
            .expect("the source's standby NIC daemon answers");
        assert_eq!(
            nic["output_commit"]["enabled"], false,
            "move {index}: {}'s NIC daemon still holds output: {nic}",
            HOSTS[from]
        );
        let (_, events) = cluster.ftvm(to, &["events"]);
        assert!(
            events.contains(&format!("migrated: the VM runs on {}", HOSTS[to])),
            "move {index}: {}'s events: {events}",
            HOSTS[to]
        );
        // A move asked for is no cause for an alert: no warning or error on either host
        // (the source's disk became the secondary in place, the new primary ran on one
        // copy only until then).
        for host in [A, B] {
            let warned = warnings(&cluster, host);
            assert_eq!(
                warned.len(),
                warnings_before[host],
                "move {index}: warnings on {}: {:?}",
                HOSTS[host],
                &warned[warnings_before[host].min(warned.len())..]
            );
        }
        (count, uptime) = last_count_since(&cluster, to, console_before).expect("counts");
    }
    rounds.check();
    downtimes.sort();
    eprintln!("TCP loop gaps over {MOVES} moves: {downtimes:?}");
    // The loop always has a segment on its way, so the guest's downtime meets some: without
    // the relay they were lost and the client waited out its retransmission timeout.
    assert!(
        handed_over.iter().sum::<u64>() > 0,
        "no frame was relayed at any switchover: {handed_over:?}"
    );

    // No write failed, and after ten role swaps both copies are equal byte for byte (the
    // guest paused, the mirror idle).
    for host in [A, B] {
        records::assert_no_write_failed(&cluster.console(host));
        let failed: Vec<String> = cluster
            .console(host)
            .into_iter()
            .filter(|line| line.starts_with("FIO-FAILED") || line.starts_with("fio: "))
            .collect();
        assert!(
            failed.is_empty(),
            "fio verify failed in the guest: {failed:?}"
        );
    }
    let primary = if MOVES.is_multiple_of(2) { A } else { B };
    let mut qmp = ftvm_tests::qmp::Qmp::connect(&cluster.test_qmp(primary), TIMEOUT).expect("QMP");
    qmp.stop().expect("stop the guest");
    cluster.wait_vm(primary, TIMEOUT, "the mirror idle", |vm| {
        vm["disks"][0]["replication"]["in_flight_requests"].as_u64() == Some(0)
            && vm["state"] == "Protected"
    });
    let image_a = cluster.assert_images_equal();
    // Every record the guest was told is on the disk is in the image.
    let last = records::last_ack(&cluster.console(A)).max(records::last_ack(&cluster.console(B)));
    for i in last.saturating_sub(990).max(1)..=last {
        let offset = (i % 1000) as usize * 4096;
        let record = format!("rec {i}\n");
        assert_eq!(
            &image_a[offset..offset + record.len()],
            record.as_bytes(),
            "record {i} (acknowledged) is not in the image"
        );
    }
    // Every fio run the guest passed is on both copies (the newest one of each chunk; the
    // chunks of the run under way when the guest stopped, and of the one before it whose
    // line may not have left the serial port yet, are left out).
    let mut acks = fio_acks(&cluster.console(A));
    acks.extend(fio_acks(&cluster.console(B)));
    let newest = acks.iter().map(|(seq, _)| *seq).max().unwrap_or(0);
    assert!(
        newest >= MOVES as u64,
        "fio passed only {newest} runs over {MOVES} moves"
    );
    let mut latest = BTreeMap::new();
    for (seq, block) in acks {
        let entry = latest.entry(block).or_insert(seq);
        *entry = (*entry).max(seq);
    }
    latest.retain(|_, seq| *seq + FIO_CHUNKS > newest + 2);
    for host in [A, B] {
        let lost = fio_missing_in_image(&cluster.image(host), &latest);
        assert!(
            lost.is_empty(),
            "{}: fio chunks not intact: {lost:?}",
            HOSTS[host]
        );
    }
    eprintln!(
        "fio: {newest} verified runs in the guest over {MOVES} moves, the newest {} \
        chunks checked on both copies",
        latest.len()
    );
    qmp.cont().expect("cont");
}

#[test]
fn a_cancelled_move_and_one_whose_destination_dies_leave_the_vm_running_protected() {
    let mut cluster = start("ftvmd-migrate-off");
    let pid = cluster.vm_status(A).expect("status")["vm_pid"].clone();
    let client = cluster.hosts.namespace("client");
    let rounds = Rounds::start(connect_in(&client, &format!("{GUEST_IP}:{ECHO_PORT}")));
    rounds.wait_for(10, TIMEOUT, "before the moves");

    // Cancelled while preparing: the VM stays at level 2 on hostA.
    let (ok, text) = cluster.ftvm(A, &["migrate", "vm1", "--no-wait"]);
    assert!(ok, "ftvm migrate --no-wait: {text}");
    let (ok, text) = cluster.ftvm(A, &["migrate", "vm1", "--cancel"]);
    assert!(
        ok && text.contains("cancelled"),
        "ftvm migrate --cancel: {text}"
    );
    let (ok, text) = cluster.ftvm(A, &["migrate", "vm1", "--cancel"]);
    assert!(
        !ok && text.contains("not moving"),
        "a second cancel: {text}"
    );
    wait_protected_on(&cluster, A, B);
    cluster.wait_vm(B, TIMEOUT, "no replica on hostB", |vm| {
        vm["level"] == 2 && vm["checkpoint"].is_null()
    });
    rounds.wait_for(10, TIMEOUT, "after the cancelled move");

    // The destination dies while the move prepares: hostA keeps the VM running (the
    // witness grants it the VM alone), and protection returns when hostB is back.
    let (ok, text) = cluster.ftvm(A, &["migrate", "vm1", "--no-wait"]);
    assert!(ok, "ftvm migrate --no-wait: {text}");
    cluster.wait_vm(B, TIMEOUT, "hostB keeps a replica", |vm| {
        vm["level"] == 3 && vm["checkpoint"]["role"] == "secondary"
    });
    let killed = cluster.kill_host(B);
    let vm = cluster.wait_vm(A, TIMEOUT, "the move called off, running alone", |vm| {
        vm["migration"].is_null() && vm["state"] == "Degraded" && vm["level"] == 2
    });
    assert_eq!(vm["vm_pid"], pid, "QEMU was restarted on hostA");
    rounds.wait_for(10, TIMEOUT, "with hostB lost");
    eprintln!(
        "hostB lost mid-move: longest gap of the TCP loop {:?}",
        rounds.longest_gap_since(killed)
    );
    let (_, events) = cluster.ftvm(A, &["events"]);
    assert!(
        events.contains("migration to hostB called off"),
        "hostA's events: {events}"
    );
    cluster.set_links(B, &["alink1", "alink2", "lan0"], true);
    cluster.start_ftvmd(B);
    wait_protected_on(&cluster, A, B);
    rounds.wait_for(10, TIMEOUT, "with hostB back");
    rounds.check();
    let vm = cluster.vm_status(A).expect("status");
    assert_eq!(vm["vm_pid"], pid, "QEMU was restarted on hostA");
    records::assert_no_write_failed(&cluster.console(A));
}

/// `ftvm host disable` moves every VM the host runs live: two VMs, both primary on hostA,
/// go on on hostB without a reboot; hostA is disabled, and `ftvm host enable` brings
/// protection back.
#[test]
fn host_disable_moves_two_vms_without_a_reboot() {
    let mut guest = GuestConfig::new("ftvmd-disable2", &guest_script(COUNTER_AND_ECHO));
    guest.cpus = 1;
    guest.memory_mb = RAM_MB;
    let options = ClusterOptions {
        disk_bytes: 16 << 20,
        extra_vms: 1,
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::new("ftvmd-disable2", &guest, &options);
    cluster.start_all();
    let vms = ["vm1", "vm2"];
    let wait_named =
        |host: usize, name: &str, what: &str, check: &dyn Fn(&serde_json::Value) -> bool| {
            poll_for(
                TIMEOUT,
                &format!("{name} on {}: {what}", HOSTS[host]),
                || cluster.named_vm_status(host, name),
                |vm| check(vm),
            )
        };
    let mut before = Vec::new();
    for name in vms {
        wait_named(A, name, "Protected, running", &|vm| {
            vm["state"] == "Protected" && vm["vm_pid"].is_u64()
        });
        let count = poll_for(
            TIMEOUT,
            &format!("{name} counting on hostA"),
            || {
                cluster
                    .named_console(A, name)
                    .iter()
                    .rev()
                    .find_map(|line| count_of(line))
            },
            |&(count, _)| count >= 5,
        );
        before.push((cluster.named_console(B, name).len(), count));
    }

    let (ok, text) = cluster.ftvm(A, &["host", "disable", "--timeout", "240"]);
    assert!(ok && text.contains("disabled"), "ftvm host disable: {text}");
    let status = cluster.status(A).expect("hostA's status");
    assert_eq!(status["disabled"], true, "{status}");
    let (_, events) = cluster.ftvm(B, &["events"]);
    for (name, (console_before, (count, uptime))) in vms.iter().zip(&before) {
        let vm = cluster.named_vm_status(B, name).expect("hostB's status");
        assert!(
            vm["role"] == "Primary" && vm["vm_pid"].is_u64(),
            "{name} on hostB: {vm}"
        );
        let (count_b, uptime_b) = poll_for(
            TIMEOUT,
            &format!("{name} counting on hostB"),
            || {
                cluster.named_console(B, name)[*console_before..]
                    .iter()
                    .rev()
                    .find_map(|line| count_of(line))
            },
            |_| true,
        );
        assert!(
            count_b > *count && uptime_b + 1.0 >= *uptime,
            "{name} counts {count_b} at {uptime_b} s on hostB; on hostA it had counted {count} \
             at {uptime} s"
        );
        assert!(
            !cluster.named_console(B, name)[*console_before..]
                .iter()
                .any(|line| line.starts_with("COUNT 1 ")),
            "{name} rebooted on hostB"
        );
        assert!(
            events
                .lines()
                .any(|line| line.contains(name) && line.contains("migrated: the VM runs on hostB")),
            "hostB's events say nothing of {name} moving live: {events}"
        );
    }

    let (ok, text) = cluster.ftvm(A, &["host", "enable"]);
    assert!(ok, "ftvm host enable: {text}");
    for name in vms {
        wait_named(B, name, "Protected with hostA back", &|vm| {
            vm["state"] == "Protected" && vm["role"] == "Primary"
        });
    }
}

/// The pid of a host's secondary checkpoint engine once its control socket exists (ftvmd
/// counts it as running from then on).
fn secondary_engine(cluster: &Cluster, host: usize) -> Option<u32> {
    cluster.hosts.pids(HOSTS[host]).into_iter().find(|pid| {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let args: Vec<String> = cmdline
            .split(|byte| *byte == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        let control = args
            .iter()
            .position(|arg| arg == "--control")
            .and_then(|index| args.get(index + 1));
        args.first()
            .is_some_and(|arg| arg.ends_with("ftvm-checkpoint"))
            && args.get(1).is_some_and(|arg| arg == "secondary")
            && control.is_some_and(|path| std::path::Path::new(path).exists())
    })
}

/// Starts a move from `from` and holds it in its preparation: the destination's engine is
/// stopped (SIGSTOP) as soon as it runs, so no checkpoint commits. Returns the engine's
/// pid and the destination's status once its QEMU was started ahead and attached to its
/// disk daemons.
fn hold_a_move_with_qemu_ahead(
    cluster: &Cluster,
    from: usize,
    to: usize,
) -> (u32, serde_json::Value) {
    let (ok, text) = cluster.ftvm(from, &["migrate", "vm1", "--no-wait"]);
    assert!(ok, "ftvm migrate --no-wait: {text}");
    let engine = poll_for(
        TIMEOUT,
        "the destination's secondary engine",
        || secondary_engine(cluster, to),
        |_| true,
    );
    ftvm_tests::process::signal(engine, libc::SIGSTOP);
    let vm = cluster.wait_vm(to, TIMEOUT, "QEMU started ahead, attached", |vm| {
        vm["vm_prestarted"] == true && vm["vm_pid"].is_u64() && vm["disks"][0]["connected"] == true
    });
    (engine, vm)
}

/// The destination of a move starts its QEMU while the move prepares (`-incoming defer`),
/// attached to its secondary disk daemon and its standby NIC daemon, which serve it nothing:
/// the disk stays secondary with no request popped, the NIC stays in standby and hostA's
/// guest keeps its network. A move called off ends that QEMU (by its pid); a move that
/// completes restores into it; a source lost while the move prepares ends it and the
/// destination takes over as after any host loss (here, before any checkpoint, by a boot).
#[test]
fn the_destination_starts_qemu_ahead_and_ends_it_when_the_move_does_not_happen() {
    let mut cluster = start("ftvmd-migrate-ahead");
    let client = cluster.hosts.namespace("client");
    let rounds = Rounds::start(connect_in(&client, &format!("{GUEST_IP}:{ECHO_PORT}")));
    rounds.wait_for(10, TIMEOUT, "before the moves");

    // Held in its preparation, then cancelled.
    let (engine, vm) = hold_a_move_with_qemu_ahead(&cluster, A, B);
    let ahead = vm["vm_pid"].as_u64().expect("pid") as u32;
    assert_eq!(vm["role"], "Secondary", "{vm}");
    let disk = &vm["disks"][0];
    assert_eq!(disk["replication"]["role"], "secondary", "{disk}");
    assert_eq!(
        disk["held_kicks"], 0,
        "QEMU kicked a ring before `cont`: {disk}"
    );
    assert_eq!(disk["write_requests"], 0, "{disk}");
    assert_eq!(disk["read_requests"], 0, "{disk}");
    assert_eq!(
        vm["nics"][0]["guest_attached"], false,
        "hostB's NIC daemon took the guest: {vm}"
    );
    let source = cluster.vm_status(A).expect("hostA's status");
    assert_eq!(source["nics"][0]["guest_attached"], true, "{source}");
    assert_eq!(source["migration"]["phase"], "preparing", "{source}");
    let (ok, text) = cluster.ftvm(B, &["status"]);
    assert!(
        ok && text.contains("ahead of the move"),
        "ftvm status on hostB: {text}"
    );
    let (ok, text) = cluster.ftvm(A, &["migrate", "vm1", "--cancel"]);
    assert!(
        ok && text.contains("cancelled"),
        "ftvm migrate --cancel: {text}"
    );
    ftvm_tests::process::signal(engine, libc::SIGCONT);
    cluster.wait_vm(B, TIMEOUT, "the QEMU started ahead ended", |vm| {
        vm["vm_pid"].is_null() && vm["vm_prestarted"] == false
    });
    poll_until(TIMEOUT, "the QEMU started ahead to be gone", || {
        !cluster.hosts.pids(HOSTS[B]).contains(&ahead)
    });
    wait_protected_on(&cluster, A, B);
    rounds.wait_for(10, TIMEOUT, "after the cancelled move");

    // A move that completes restores into the QEMU started ahead.
    let (ok, text) = cluster.ftvm(A, &["migrate", "vm1"]);
    assert!(ok, "ftvm migrate: {text}");
    wait_protected_on(&cluster, B, A);
    let (_, events) = cluster.ftvm(B, &["events"]);
    assert!(
        events.contains("restoring into the QEMU started ahead of the move"),
        "hostB's events: {events}"
    );
    rounds.wait_for(10, TIMEOUT, "after the move");
    rounds.check();

    // The source (now hostB) is lost while the move back prepares: hostA ends the QEMU it
    // started ahead and takes the VM over (no checkpoint committed: it boots).
    let (engine, vm) = hold_a_move_with_qemu_ahead(&cluster, B, A);
    let ahead = vm["vm_pid"].as_u64().expect("pid") as u32;
    let boots = |cluster: &Cluster| {
        cluster
            .console(A)
            .iter()
            .filter(|line| line.contains("NET-UP"))
            .count()
    };
    let booted_before = boots(&cluster);
    cluster.kill_host(B);
    ftvm_tests::process::signal(engine, libc::SIGCONT);
    let vm = cluster.wait_vm(A, TIMEOUT, "hostA runs the VM alone", |vm| {
        vm["role"] == "Primary" && vm["vm_pid"].is_u64() && vm["vm_prestarted"] == false
    });
    assert_ne!(vm["vm_pid"], ahead, "the QEMU started ahead was kept: {vm}");
    assert!(
        !cluster.hosts.pids(HOSTS[A]).contains(&ahead),
        "the QEMU started ahead still runs"
    );
    let (_, events) = cluster.ftvm(A, &["events"]);
    assert!(
        events.contains("the QEMU started ahead of the move is not needed"),
        "hostA's events: {events}"
    );
    poll_until(TIMEOUT, "the guest up on hostA", || {
        boots(&cluster) > booted_before
    });
}
