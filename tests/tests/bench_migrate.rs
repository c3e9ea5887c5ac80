//! `ftvm migrate` benchmark (issue 13), run by `ci/bench-migrate.sh`: a 256 MiB TCG guest
//! (1 vCPU) moved back and forth between hostA and hostB, idle and rewriting memory, by
//! `ftvm migrate` on the Cluster rig at Level 2 (ours), and by plain QEMU live migration
//! of the same guest between the same kind of hosts (the anchor: the cost of migration
//! itself, `ftvm_tests::plain_migration`). Prints `BENCH` lines (markdown rows) for the
//! script to collect, and each of our moves' ftvmd log lines (`TIMELINE`) on stderr.
//!
//! Per move: the guest-visible downtime as the longest gap of a TCP echo loop from the
//! client host (`Rounds`, one round every ~10 ms plus its round trip), the gap between the
//! guest's last console line on the source and its first on the destination (the guest
//! prints `TICK n` every 10 ms: `tests/guest/memwrite.c`), the time the move took (`ftvm
//! migrate` until it returned; QEMU's `total-time`), the bytes sent (the engine's full copy
//! and checkpoints; QEMU's `ram.transferred`) and, for QEMU, its own `downtime`.
//!
//! The write workload is memwrite rewriting pages of a 64 MiB buffer at 50 MB/s (paced by
//! the guest's clock), asked once and left running for all its moves.
//!
//! `FTVM_BENCH_MOVES` (default 10) sets the moves per workload; `FTVM_BENCH_PARTS`
//! (default `qemu,ours`) which parts run; `FTVM_BENCH_NIC_LINK=1` gives our NIC its link to
//! the peer's daemon (a redundant uplink: `uplink` and `link_port`), over which the
//! switchover relays the frames that reach the source while the guest runs nowhere
//! (`vhost-net-ft`, `handover`); without it those frames are lost, as with plain QEMU.
//! `FTVM_BENCH_KEEP=DIR` copies our rig's log files (ftvmd's, the engines', the NIC and
//! disk daemons', QEMU's) into DIR before the rig is removed, for a look at a move's
//! frames next to packet captures.

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use ftvm_tests::blk::status_json;
use ftvm_tests::cluster::{Cluster, ClusterOptions, HOSTS, VM};
use ftvm_tests::console_watch::ConsoleWatch;
use ftvm_tests::guest::GuestConfig;
use ftvm_tests::guest_tools;
use ftvm_tests::level3::{guest_script, RAM_MB};
use ftvm_tests::net::{connect_in, Rounds, ECHO_PORT};
use ftvm_tests::nic_daemon::{GUEST_IP, GUEST_MAC};
use ftvm_tests::plain_migration::PlainPair;

const A: usize = 0;
const B: usize = 1;
/// Booting, a move (Level 3's full copy under TCG on a loaded machine), a resync.
const TIMEOUT: Duration = Duration::from_secs(240);
/// memwrite's port, buffer and ticker.
const MEMWRITE_PORT: u16 = 7001;
const BUFFER_MB: u32 = 64;
const TICK_MS: u32 = 10;
/// The write workload's rate, MB/s.
const WRITE_RATE_MB: u32 = 50;
/// Time for memwrite to get going before the first move of the write workload.
const WRITE_SETTLE: Duration = Duration::from_secs(3);
/// ftvmd's `peer_timeout_ms`: above the rig's 1000 ms, so that an ftvmd stalled for a
/// second on this shared machine does not make its peer take the VM over by a restart
/// mid-benchmark (seen once: the guest rebooted and the TCP loop was reset). A move does
/// not wait for it: the peer takes over when told (`TakeOver`), not on a timeout.
const PEER_TIMEOUT_MS: u64 = 3000;
/// The goals of issue 13.
const DOWNTIME_GOAL_MS: f64 = 300.0;
const RATIO_GOAL: f64 = 1.2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    Idle,
    Writing,
}

impl Workload {
    const ALL: [Workload; 2] = [Workload::Idle, Workload::Writing];

    fn name(self) -> String {
        match self {
            Workload::Idle => "idle".into(),
            Workload::Writing => format!("writing {WRITE_RATE_MB} MB/s"),
        }
    }
}

/// One move's figures.
#[derive(Clone, Debug)]
struct Sample {
    from: usize,
    tcp_gap: Duration,
    console_gap: Option<Duration>,
    took: Duration,
    bytes: Option<u64>,
    /// QEMU's own `downtime` (the anchor only).
    qemu_downtime: Option<Duration>,
}

/// The moves of one part (ours or QEMU's), per workload.
type Results = Vec<(Workload, Vec<Sample>)>;

fn moves() -> usize {
    std::env::var("FTVM_BENCH_MOVES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(10)
}

/// Our NIC has a link to the peer's daemon (`FTVM_BENCH_NIC_LINK=1`).
fn nic_link() -> bool {
    std::env::var("FTVM_BENCH_NIC_LINK").is_ok_and(|value| value == "1")
}

fn part_wanted(part: &str) -> bool {
    std::env::var("FTVM_BENCH_PARTS")
        .map(|parts| parts.split(',').any(|wanted| wanted.trim() == part))
        .unwrap_or(true)
}

/// The guest: memwrite (its ticker every 10 ms) and a TCP echo server.
fn guest_config(name: &str) -> GuestConfig {
    let script = guest_script(&format!(
        "/memwrite {MEMWRITE_PORT} {BUFFER_MB} {TICK_MS} &\nnc -ll -p {ECHO_PORT} -e cat\n"
    ));
    let mut guest = GuestConfig::new(name, &script);
    guest.cpus = 1;
    guest.memory_mb = RAM_MB;
    guest.files.push(guest_tools::tool("memwrite"));
    guest
}

/// Asks memwrite to rewrite memory for longer than the benchmark runs; the connection
/// stays open (its answer comes at the end).
fn start_writing(client: &str) -> TcpStream {
    let mut stream = connect_in(client, &format!("{GUEST_IP}:{MEMWRITE_PORT}"));
    stream
        .write_all(format!("write w1 {WRITE_RATE_MB} 1000000\n").as_bytes())
        .expect("ask memwrite to write");
    stream
}

fn is_tick(line: &str) -> bool {
    line.starts_with("TICK ")
}

#[test]
#[ignore = "a benchmark (tens of minutes of TCG guest), run by ci/bench-migrate.sh"]
fn migrate_benchmark() {
    let moves = moves();
    println!(
        "BENCH {RAM_MB} MiB TCG guest, 1 vCPU; {moves} migrations per workload, back and \
         forth between hostA and hostB; the guest prints a console line every {TICK_MS} ms; \
         write workload: {WRITE_RATE_MB} MB/s of page rewrites in a {BUFFER_MB} MiB buffer"
    );
    let plain = part_wanted("qemu").then(|| {
        let results = plain_part(moves);
        report_moves("plain QEMU live migration", &results);
        results
    });
    let ours = part_wanted("ours").then(|| {
        let results = ours_part(moves);
        report_moves("ftvm migrate", &results);
        results
    });
    report_summary(ours.as_ref(), plain.as_ref());
}

// --- the anchor: plain QEMU live migration ----------------------------------------------

fn plain_part(moves: usize) -> Results {
    let config = guest_config("bench-plain");
    let mut pair = PlainPair::new("bench-plain", &config, GUEST_MAC);
    let watch = ConsoleWatch::start(vec![pair.console(A), pair.console(B)]);
    pair.boot(A);
    watch.wait_for(A, "MEMWRITE-READY", TIMEOUT);
    let client = pair.hosts.namespace("client");
    let rounds = Rounds::start(connect_in(&client, &format!("{GUEST_IP}:{ECHO_PORT}")));
    rounds.wait_for(10, TIMEOUT, "before the first migration");
    let mut host = A;
    let mut results = Vec::new();
    let mut writer = None;
    for workload in Workload::ALL {
        if workload == Workload::Writing {
            writer = Some(start_writing(&client));
            std::thread::sleep(WRITE_SETTLE);
        }
        let mut samples = Vec::new();
        for index in 0..moves {
            let (from, to) = (host, 1 - host);
            let started = Instant::now();
            let migration = pair.migrate(from, to, TIMEOUT);
            rounds.wait_for(5, TIMEOUT, "after the migration");
            let sample = Sample {
                from,
                tcp_gap: rounds.longest_gap_since(started),
                console_gap: watch.switch_gap((from, to), started, is_tick),
                took: migration.total_time,
                bytes: Some(migration.ram_bytes),
                qemu_downtime: Some(migration.downtime),
            };
            eprintln!(
                "plain {} #{index} {} -> {}: {sample:?}; query-migrate: {}",
                workload.name(),
                HOSTS[from],
                HOSTS[to],
                migration.reply
            );
            samples.push(sample);
            host = to;
        }
        results.push((workload, samples));
    }
    rounds.check();
    drop(writer);
    results
}

// --- ours: ftvm migrate on the Cluster rig ----------------------------------------------

fn ours_part(moves: usize) -> Results {
    let config = guest_config("bench-ours");
    let options = ClusterOptions {
        disk_bytes: 16 << 20,
        nic_mac: Some(GUEST_MAC.into()),
        nic_redundant_uplink: nic_link(),
        peer_timeout_ms: PEER_TIMEOUT_MS,
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::new("bench-ours", &config, &options);
    let console = |host: usize| -> PathBuf {
        cluster
            .dir
            .path()
            .join(HOSTS[host])
            .join(VM)
            .join("console.log")
    };
    let watch = ConsoleWatch::start(vec![console(A), console(B)]);
    cluster.start_all();
    cluster.wait_vm(A, TIMEOUT, "Protected, running", |vm| {
        vm["state"] == "Protected" && vm["vm_pid"].is_u64()
    });
    watch.wait_for(A, "MEMWRITE-READY", TIMEOUT);
    wait_protected_on(&cluster, A, B);
    let client = cluster.hosts.namespace("client");
    let rounds = Rounds::start(connect_in(&client, &format!("{GUEST_IP}:{ECHO_PORT}")));
    rounds.wait_for(10, TIMEOUT, "before the first move");
    let mut host = A;
    let mut results = Vec::new();
    let mut writer = None;
    for workload in Workload::ALL {
        if workload == Workload::Writing {
            writer = Some(start_writing(&client));
            std::thread::sleep(WRITE_SETTLE);
        }
        let mut samples = Vec::new();
        for index in 0..moves {
            let (from, to) = (host, 1 - host);
            let sample = ours_move(&cluster, (&rounds, &watch), (from, to));
            eprintln!(
                "ours {} #{index} {} -> {}: {sample:?}",
                workload.name(),
                HOSTS[from],
                HOSTS[to]
            );
            samples.push(sample);
            host = to;
        }
        results.push((workload, samples));
    }
    rounds.check();
    drop(writer);
    keep_logs(&cluster);
    results
}

/// `FTVM_BENCH_KEEP=DIR`: copies every `*.log` of the rig's directory into DIR, with its
/// path under the rig's directory.
fn keep_logs(cluster: &Cluster) {
    let Some(keep) = std::env::var_os("FTVM_BENCH_KEEP") else {
        return;
    };
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"cd "$1" && find . -name '*.log' -exec cp --parents {} "$2" \;"#)
        .arg("keep-logs")
        .arg(cluster.dir.path())
        .arg(&keep)
        .status();
    eprintln!(
        "the rig's logs copied to {}: {status:?}",
        PathBuf::from(keep).display()
    );
}

/// Waits until `host` runs the VM as primary, Protected at level 2, with `peer` its
/// secondary and no move under way on either (as `ftvmd_migrate.rs` does).
fn wait_protected_on(cluster: &Cluster, host: usize, peer: usize) {
    cluster.wait_vm(peer, TIMEOUT, "secondary, no move under way", |vm| {
        vm["role"] == "Secondary" && vm["migration"].is_null()
    });
    cluster.wait_vm(host, TIMEOUT, "primary, Protected at level 2", |vm| {
        vm["role"] == "Primary"
            && vm["state"] == "Protected"
            && vm["level"] == 2
            && vm["vm_pid"].is_u64()
            && vm["checkpoint"].is_null()
            && vm["migration"].is_null()
    });
}

/// One `ftvm migrate` from `from` to `to`, measured; returns once the VM is Protected on
/// `to` again.
fn ours_move(
    cluster: &Cluster,
    (rounds, watch): (&Rounds, &ConsoleWatch),
    (from, to): (usize, usize),
) -> Sample {
    let engine_control = cluster
        .dir
        .path()
        .join(HOSTS[from])
        .join(VM)
        .join("checkpoint.ctl");
    let engine_log_before = cluster.checkpoint_log(from).len();
    let ftvmd_logs_before = [cluster.log(A).len(), cluster.log(B).len()];
    // The source engine's last status (its checkpoints' bytes): it ends with the move.
    let last_status: Mutex<Option<Value>> = Mutex::new(None);
    let done = AtomicBool::new(false);
    let mut started = Instant::now();
    let (ok, text, took) = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if let Some(status) = status_json(&engine_control) {
                    if status["stats"].is_object() {
                        *last_status.lock().expect("status") = Some(status);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        // A move refused because the peer's last report is not in sync yet (it comes with
        // its next heartbeat after the previous move's resync) is asked again.
        let give_up = Instant::now() + TIMEOUT;
        let (ok, text) = loop {
            started = Instant::now();
            let (ok, text) = cluster.ftvm(from, &["migrate", VM, "--timeout", "200"]);
            if ok || !text.contains("try again in a moment") || Instant::now() > give_up {
                break (ok, text);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let took = started.elapsed();
        done.store(true, Ordering::Relaxed);
        (ok, text, took)
    });
    assert!(ok, "ftvm migrate on {}: {text}", HOSTS[from]);
    wait_protected_on(cluster, to, from);
    rounds.wait_for(5, TIMEOUT, "after the move");
    let engine_log = cluster.checkpoint_log(from);
    let full_copy_bytes = full_copy_bytes(engine_log.get(engine_log_before..).unwrap_or(""));
    let last_status = last_status.into_inner().expect("status");
    let checkpoint_bytes = last_status
        .as_ref()
        .and_then(|status| status["stats"]["wire_bytes_total"].as_u64());
    eprintln!(
        "ours {} -> {}: the source engine's last status: {}",
        HOSTS[from],
        HOSTS[to],
        last_status.unwrap_or_default()
    );
    if let Some((last, first)) = watch.switch((from, to), started, is_tick) {
        eprintln!(
            "TIMELINE console: the guest's last line on {} at {}, its first on {} at {}",
            HOSTS[from],
            wall_clock(last),
            HOSTS[to],
            wall_clock(first)
        );
    }
    for line in engine_log.get(engine_log_before..).unwrap_or("").lines() {
        if line.contains("handover") || line.contains("handed over") {
            eprintln!("TIMELINE {} engine: {line}", HOSTS[from]);
        }
    }
    for host in [A, B] {
        let log = cluster.log(host);
        for line in log.get(ftvmd_logs_before[host]..).unwrap_or("").lines() {
            eprintln!("TIMELINE {} {line}", HOSTS[host]);
        }
    }
    Sample {
        from,
        tcp_gap: rounds.longest_gap_since(started),
        console_gap: watch.switch_gap((from, to), started, is_tick),
        took,
        bytes: checkpoint_bytes.map(|bytes| bytes + full_copy_bytes),
        qemu_downtime: None,
    }
}

/// `at` as UTC seconds of the day with milliseconds (`HH:MM:SS.mmm`), as the logs show it.
fn wall_clock(at: Instant) -> String {
    let now = std::time::SystemTime::now();
    let then = now - Instant::now().saturating_duration_since(at);
    let since_epoch = then
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since_epoch.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60,
        since_epoch.subsec_millis()
    )
}

/// The bytes of the engine's full copies in its log (`full copy sent as epoch N (P pages,
/// B bytes on the wire)`).
fn full_copy_bytes(log: &str) -> u64 {
    log.lines()
        .filter_map(|line| {
            let rest = line.split("full copy sent as epoch ").nth(1)?;
            let before = rest.split(" bytes on the wire").next()?;
            before.rsplit(' ').next()?.parse::<u64>().ok()
        })
        .sum()
}

// --- report --------------------------------------------------------------------------------

/// The `fraction` percentile (nearest rank) of `values`; NaN when empty.
fn percentile(values: &[f64], fraction: f64) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn optional(value: Option<f64>, decimals: usize) -> String {
    value.map_or("-".into(), |value| format!("{value:.decimals$}"))
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn report_moves(part: &str, results: &Results) {
    println!("BENCH");
    println!("BENCH {part}, each migration:");
    println!("BENCH");
    println!(
        "BENCH | workload | # | from → to | TCP loop gap ms | console gap ms | QEMU's downtime \
         ms | time s | MB sent |"
    );
    println!("BENCH |---|---:|---|---:|---:|---:|---:|---:|");
    for (workload, samples) in results {
        for (index, sample) in samples.iter().enumerate() {
            println!(
                "BENCH | {} | {index} | {} → {} | {:.0} | {} | {} | {:.1} | {} |",
                workload.name(),
                HOSTS[sample.from],
                HOSTS[1 - sample.from],
                milliseconds(sample.tcp_gap),
                optional(sample.console_gap.map(milliseconds), 0),
                optional(sample.qemu_downtime.map(milliseconds), 0),
                sample.took.as_secs_f64(),
                optional(sample.bytes.map(|bytes| bytes as f64 / 1e6), 1),
            );
        }
    }
}

/// One figure of every sample of a workload.
fn figures(samples: &[Sample], figure: fn(&Sample) -> Option<f64>) -> Vec<f64> {
    samples.iter().filter_map(figure).collect()
}

fn samples_of(results: Option<&Results>, workload: Workload) -> &[Sample] {
    results
        .and_then(|results| results.iter().find(|(seen, _)| *seen == workload))
        .map_or(&[], |(_, samples)| samples.as_slice())
}

fn report_summary(ours: Option<&Results>, plain: Option<&Results>) {
    type Figure = (&'static str, fn(&Sample) -> Option<f64>);
    let rows: [Figure; 5] = [
        ("downtime: TCP loop gap, ms", |sample| {
            Some(milliseconds(sample.tcp_gap))
        }),
        ("downtime: console gap, ms", |sample| {
            sample.console_gap.map(milliseconds)
        }),
        ("QEMU's own downtime, ms", |sample| {
            sample.qemu_downtime.map(milliseconds)
        }),
        ("time, s (ftvm migrate; QEMU's total-time)", |sample| {
            Some(sample.took.as_secs_f64())
        }),
        ("MB sent per migration", |sample| {
            sample.bytes.map(|bytes| bytes as f64 / 1e6)
        }),
    ];
    println!("BENCH");
    println!(
        "BENCH | workload | figure | ours p50 | ours p99 | QEMU p50 | QEMU p99 | ours/QEMU p50 \
         | ours/QEMU p99 |"
    );
    println!("BENCH |---|---|---:|---:|---:|---:|---:|---:|");
    let mut goals = Vec::new();
    for workload in Workload::ALL {
        let (ours, plain) = (samples_of(ours, workload), samples_of(plain, workload));
        for (name, figure) in rows {
            let (ours, plain) = (figures(ours, figure), figures(plain, figure));
            let [ours_p50, ours_p99, plain_p50, plain_p99] = [
                percentile(&ours, 0.5),
                percentile(&ours, 0.99),
                percentile(&plain, 0.5),
                percentile(&plain, 0.99),
            ];
            let shown = |value: f64| optional(value.is_finite().then_some(value), 1);
            println!(
                "BENCH | {} | {name} | {} | {} | {} | {} | {} | {} |",
                workload.name(),
                shown(ours_p50),
                shown(ours_p99),
                shown(plain_p50),
                shown(plain_p99),
                optional(Some(ours_p50 / plain_p50).filter(|r| r.is_finite()), 2),
                optional(Some(ours_p99 / plain_p99).filter(|r| r.is_finite()), 2),
            );
            if let Some(measure) = name.strip_prefix("downtime: ") {
                goals.push((
                    workload,
                    measure.trim_end_matches(", ms"),
                    ours_p99,
                    plain_p99,
                ));
            }
        }
    }
    println!("BENCH");
    println!("BENCH | goal | downtime measured as | workload | target | measured | result |");
    println!("BENCH |---|---|---|---:|---:|---|");
    for (workload, measure, ours_p99, plain_p99) in goals {
        if ours_p99.is_finite() {
            println!(
                "BENCH | downtime p99, ftvm migrate | {measure} | {} | ≤ {DOWNTIME_GOAL_MS:.0} ms \
                 | {ours_p99:.0} ms | {} |",
                workload.name(),
                verdict(ours_p99 <= DOWNTIME_GOAL_MS)
            );
        }
        let ratio = ours_p99 / plain_p99;
        if ratio.is_finite() {
            println!(
                "BENCH | downtime p99, ftvm migrate / plain QEMU | {measure} | {} | ≤ \
                 {RATIO_GOAL}× | {ratio:.2}× ({ours_p99:.0} / {plain_p99:.0} ms) | {} |",
                workload.name(),
                verdict(ratio <= RATIO_GOAL)
            );
        }
    }
}
