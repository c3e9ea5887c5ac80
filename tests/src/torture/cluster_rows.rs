//! The fault matrix's cluster rows (issue 10): the rows that need the coordinator. Two
//! hosts run `ftvmd`, a third the witness (`tests/src/cluster.rs`); `ftvmd` starts the
//! Level 2 VM's QEMU and disk daemons. The guest runs the torture workload (numbered,
//! flushed records at random blocks, `ACK <seq> <block>` after the flush); its disk's
//! block 0 holds a boot marker, so a guest started again after a fault (a restart or a
//! failover) says `REBOOTED` and stays idle instead of writing. The checks are the disk
//! rows': acknowledged writes on the copy that serves next (read from that host's image
//! once its guest is up again or while it writes on) and on both copies once Protected,
//! split brains (the witness's record and both hosts' `ftvm status`, every 50 ms, plus
//! the disk daemons' own monitor), guest-visible errors, time back to Protected.

use std::panic::{self, AssertUnwindSafe};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::cluster_monitor::{acting_generation, ClusterMonitor, Sources};
use super::monitor::Monitor;
use super::random::Random;
use super::workload::{self, Plan, Workload, BLOCK_BYTES};
use super::{describe, images_identical, RunRecord};
use crate::blk::status_json;
use crate::cluster::{Cluster, ClusterOptions, HOSTS, VM};
use crate::guest::GuestConfig;
use crate::process::signal;
use crate::wait::Wait;

const A: usize = 0;
const B: usize = 1;
/// The VM's disk: 8192 blocks of 4 KiB, as the disk rows'.
const DISK_BYTES: u64 = 32 << 20;
/// The fault hits after this many acknowledged writes (drawn from the seed).
const FAULT_AFTER_WRITES: (u64, u64) = (5, 40);
/// Booting, syncing, failing over, the whole plan: well under this on a loaded machine.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);
/// How long ftvmd stays dead before it is started again (drawn from the seed).
const FTVMD_DOWN_MS: (u64, u64) = (0, 3000);
/// How long the witness stays away, or the links cut, while the test watches.
const WATCH_MS: (u64, u64) = (1000, 3000);
/// With the peer up, the guest's next acknowledged write comes within this: a write in
/// flight on a cut link waits out the link timeout (1 s) before it goes on the other link,
/// and one fio chunk takes a second or more under TCG on a loaded machine.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);

/// A row of the fault matrix at the level of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterRow {
    FtvmdKill,
    WitnessLost,
    HostKill,
}

impl ClusterRow {
    pub const ALL: [ClusterRow; 3] = [
        ClusterRow::FtvmdKill,
        ClusterRow::WitnessLost,
        ClusterRow::HostKill,
    ];

    /// The row's name in `ci/torture.sh --rows` and in the results.
    pub fn name(self) -> &'static str {
        match self {
            ClusterRow::FtvmdKill => "ftvmd-kill",
            ClusterRow::WitnessLost => "witness-lost",
            ClusterRow::HostKill => "host-kill",
        }
    }

    pub fn from_name(name: &str) -> Option<ClusterRow> {
        ClusterRow::ALL.into_iter().find(|row| row.name() == name)
    }

    /// What the row does, for `docs/RELIABILITY.md`.
    pub fn description(self) -> &'static str {
        match self {
            ClusterRow::FtvmdKill => "SIGKILL of `ftvmd` on the primary's host (hostA); its QEMU and disk daemons die with it (`PR_SET_PDEATHSIG`, by design: a host without its supervisor is a failed host); it is started again after 0–3 s (seed). The VM must run again on one host (hostA again or hostB by failover: recorded), with every acknowledged write on that host's copy, never two primaries; then Protected.",
            ClusterRow::WitnessLost => "The witness is stopped; the seed adds nothing, one A-link cut or both A-links cut in hostA, for 1–3 s. With the peer reachable (nothing or one link cut) the VM must go on writing on hostA at the same generation, with no restart and no failover. With both links cut and no witness no host is granted anything: the primary holds (then fences, cut from peer and witness) and the secondary waits; the witness is then started again and one host goes on (degraded or by failover), the links return. Repair: witness started, links up.",
            ClusterRow::HostKill => "hostA (the primary) is lost as `Cluster::kill_host` does it: its A-links and LAN port cut, every process in it SIGKILLed. hostB must be granted the next generation and start the VM; its copy must hold every acknowledged write. Repair: hostA's links up and its `ftvmd` started: it must rejoin as hostB's secondary (delta resync) and the pair be Protected again.",
        }
    }
}

/// One seeded run of `row` under `workload` as a test (see [`super::run_seeded_test`]).
pub fn run_cluster_row_test(row: ClusterRow, workload: Workload) {
    let name = format!("{}{}", row.name(), workload.suffix());
    super::run_seeded_test(&name, |seed, record| run(row, workload, seed, record));
}

/// The test bed. Fields drop in order: monitors, then the cluster.
struct Bed {
    disk_monitor: Monitor,
    cluster_monitor: ClusterMonitor,
    cluster: Cluster,
    started: Instant,
    timeline: Vec<String>,
}

impl Bed {
    fn start(name: &str, guest: &GuestConfig) -> Bed {
        let options = ClusterOptions {
            disk_bytes: DISK_BYTES,
            ..ClusterOptions::default()
        };
        let mut cluster = Cluster::new(name, guest, &options);
        cluster.start_all();
        let disk_monitor = Monitor::start(disk_control(&cluster, A), disk_control(&cluster, B));
        let cluster_monitor = ClusterMonitor::start(Sources {
            ftvm: crate::paths::binary("ftvm"),
            sockets: [cluster.socket(A), cluster.socket(B)],
            witness_record: cluster
                .dir
                .path()
                .join("witness/hostA+hostB")
                .join(format!("{VM}.grant.json")),
        });
        Bed {
            disk_monitor,
            cluster_monitor,
            cluster,
            started: Instant::now(),
            timeline: Vec::new(),
        }
    }

    fn note(&mut self, what: &str) {
        let line = format!("{:7.2} s  {what}", self.started.elapsed().as_secs_f64());
        eprintln!("torture: {line}");
        self.timeline.push(line);
    }

    /// Both hosts' consoles (a host's console is appended across its QEMU's restarts).
    fn consoles(&self) -> Vec<String> {
        let mut lines = self.cluster.console(A);
        lines.extend(self.cluster.console(B));
        lines
    }

    fn acknowledged(&self) -> u64 {
        workload::acknowledged_count(&self.consoles()) as u64
    }

    fn wait_acknowledged(&self, count: u64) {
        Wait::up_to(STEP_TIMEOUT)
            .every(Duration::from_millis(100))
            .for_value(
                &format!("{count} acknowledged writes"),
                || Some(self.acknowledged()),
                |&acknowledged| acknowledged >= count,
            );
    }

    fn rebooted(&self, host: usize) -> bool {
        self.cluster
            .console(host)
            .iter()
            .any(|line| line.contains("REBOOTED"))
    }

    fn generation(&self, host: usize) -> Option<u64> {
        self.cluster
            .vm_status(host)
            .and_then(|vm| vm["generation"].as_u64())
    }

    /// Waits until one host acts as primary with its VM running and its guest serving:
    /// booted again (`REBOOTED`) or acknowledging new writes (two past `acknowledged`:
    /// the last line of a guest that died may reach its console late).
    fn wait_serving(&self, acknowledged: u64) -> usize {
        Wait::up_to(STEP_TIMEOUT)
            .every(Duration::from_millis(100))
            .for_value(
                "a host serving the VM again",
                || {
                    [A, B].into_iter().find(|&host| {
                        self.cluster.vm_status(host).is_some_and(|vm| {
                            acting_generation(&vm).is_some() && vm["vm_pid"].is_u64()
                        }) && (self.rebooted(host) || self.acknowledged() >= acknowledged + 2)
                    })
                },
                |_| true,
            )
    }

    /// Waits until `primary` is Protected and the other host its UpToDate secondary.
    fn wait_protected(&self, primary: usize) {
        let what = format!("Protected on {}", HOSTS[primary]);
        self.cluster.wait_vm(primary, STEP_TIMEOUT, &what, |vm| {
            vm["role"] == "Primary" && vm["state"] == "Protected" && vm["vm_pid"].is_u64()
        });
        self.cluster
            .wait_vm(1 - primary, STEP_TIMEOUT, "an UpToDate secondary", |vm| {
                vm["role"] == "Secondary"
                    && vm["disks"][0]["replication"]["disk_state"] == "UpToDate"
            });
    }
}

fn disk_control(cluster: &Cluster, host: usize) -> std::path::PathBuf {
    cluster
        .dir
        .path()
        .join(HOSTS[host])
        .join(VM)
        .join("disk0.ctl")
}

/// The plan at blocks 1.. (block 0 holds the boot marker).
fn plan(random: &mut Random, workload: Workload) -> Plan {
    Plan::random(random, workload, 1, DISK_BYTES / BLOCK_BYTES)
}

/// The VM: the torture writer on its first boot, `REBOOTED` and idle on a later one;
/// either way it stays up (`IDLE`) so that ftvmd keeps it running.
fn guest(plan: &Plan) -> GuestConfig {
    let mut guest = GuestConfig::new("ftvm-vm1", "");
    guest.memory_mb = 256;
    workload::add_torture_writer(&mut guest, plan);
    guest.script = "\
if dd if=/dev/vda bs=4096 count=1 2>/dev/null | grep -q ftvm-torture-boot; then
  echo REBOOTED
else
  echo ftvm-torture-boot | dd of=/dev/vda bs=4096 conv=sync,fsync 2>/dev/null
  sh /torture.sh
  echo \"TORTURE-EXIT $?\"
fi
echo IDLE
while true; do sleep 3600; done
"
    .into();
    guest
}

/// A fault, handled: when it hit, which host serves the VM now, and the repair to do.
struct Handled {
    at: Instant,
    serving: usize,
    repair: Repair,
}

enum Repair {
    Nothing,
    StartWitness,
    LinksUpStartWitness(Vec<&'static str>),
    LinksUp(Vec<&'static str>),
    RestartHostA,
}

fn run(row: ClusterRow, workload: Workload, seed: u64, record: &mut RunRecord) {
    let mut random = Random::new(seed);
    let plan = plan(&mut random, workload);
    let fault_after = workload.acks_for(random.between(FAULT_AFTER_WRITES.0, FAULT_AFTER_WRITES.1));
    record.fault_after_writes = fault_after;
    let mut bed = Bed::start(&record.row, &guest(&plan));
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        exercise(row, &mut bed, &plan, fault_after, &mut random, record)
    }));
    let findings = bed.disk_monitor.findings();
    let cluster = bed.cluster_monitor.findings();
    bed.note(&format!(
        "witness grants seen: {}",
        cluster.grants.join(", ")
    ));
    record.timeline = std::mem::take(&mut bed.timeline);
    record.split_brain_samples = findings.split_brain_samples + cluster.split_brain_samples;
    record.monitor_samples = cluster.samples;
    record.rejected_requests = findings.rejected_requests;
    for first in [findings.first_split_brain, cluster.first_split_brain]
        .into_iter()
        .flatten()
    {
        eprintln!("torture: split brain, first sample:\n{first}");
    }
    if let Err(payload) = result {
        panic::resume_unwind(payload);
    }
}

fn exercise(
    row: ClusterRow,
    bed: &mut Bed,
    plan: &Plan,
    fault_after: u64,
    random: &mut Random,
    record: &mut RunRecord,
) {
    bed.wait_protected(A);
    bed.note("Protected on hostA");
    bed.wait_acknowledged(fault_after);
    let vm = bed.cluster.vm_status(A).unwrap_or_default();
    record.state_at_fault = vm["state"].as_str().unwrap_or("?").to_owned();
    let handled = match row {
        ClusterRow::FtvmdKill => ftvmd_kill(bed, random),
        ClusterRow::WitnessLost => witness_lost(bed, random),
        ClusterRow::HostKill => host_kill(bed),
    };
    let serving = handled.serving;
    record.serving = HOSTS[serving].to_owned();
    record.failed_over = Some(serving != A);
    let latest = workload::latest_acknowledged(&bed.consoles());
    record.lost_on_serving_copy =
        describe(&plan.missing_in_image(&bed.cluster.image(serving), &latest));
    bed.note(&format!(
        "{}'s copy checked: {} acknowledged blocks, {} missing",
        HOSTS[serving],
        latest.len(),
        record.lost_on_serving_copy.len()
    ));
    repair(bed, &handled.repair);
    bed.wait_protected(serving);
    record.back_to_protected_ms = Some(handled.at.elapsed().as_millis() as u64);
    bed.note("Protected again");
    finish(bed, plan, serving, record);
}

/// Waits for the guest to be idle and the pair in sync, then checks both copies.
fn finish(bed: &mut Bed, plan: &Plan, serving: usize, record: &mut RunRecord) {
    Wait::up_to(STEP_TIMEOUT)
        .every(Duration::from_millis(200))
        .until("the guest idle", || {
            bed.cluster
                .console(serving)
                .iter()
                .any(|line| line == "IDLE")
        });
    bed.note("guest idle");
    bed.wait_protected(serving);
    let control = disk_control(&bed.cluster, serving);
    Wait::up_to(STEP_TIMEOUT)
        .every(Duration::from_millis(100))
        .until("nothing in flight", || {
            status_json(&control).is_some_and(|s| s["replication"]["in_flight_requests"] == 0)
        });
    record.vm_restarted = Some(bed.rebooted(A) || bed.rebooted(B));
    let consoles = bed.consoles();
    (record.guest_write_failures, record.guest_kernel_io_errors) =
        workload::guest_errors(&consoles);
    record.acknowledged_writes = workload::acknowledged_count(&consoles) as u64;
    record.guest_exit = consoles
        .iter()
        .find_map(|line| line.strip_prefix("TORTURE-EXIT ")?.trim().parse().ok());
    let latest = workload::latest_acknowledged(&consoles);
    let mut lost = Vec::new();
    for host in [A, B] {
        lost.extend(describe(
            &plan.missing_in_image(&bed.cluster.image(host), &latest),
        ));
    }
    record.lost_after_repair = lost;
    record.images_identical = Some(images_identical(
        &bed.cluster.image(A),
        &bed.cluster.image(B),
    ));
    let blocks: std::collections::BTreeSet<&String> = record
        .lost_on_serving_copy
        .iter()
        .chain(&record.lost_after_repair)
        .collect();
    record.lost_blocks = blocks.len() as u64;
}

fn repair(bed: &mut Bed, repair: &Repair) {
    match repair {
        Repair::Nothing => {}
        Repair::StartWitness => {
            bed.cluster.start_witness();
            bed.note("witness started again");
        }
        Repair::LinksUpStartWitness(links) => {
            bed.cluster.set_links(A, links, true);
            bed.note(&format!("{} up", links.join(", ")));
            bed.cluster.start_witness();
            bed.note("witness started again");
        }
        Repair::LinksUp(links) => {
            bed.cluster.set_links(A, links, true);
            bed.note(&format!("{} up", links.join(", ")));
        }
        Repair::RestartHostA => {
            bed.cluster
                .set_links(A, &["alink1", "alink2", "lan0"], true);
            bed.cluster.start_ftvmd(A);
            bed.note("hostA back: links up, ftvmd started");
            bed.cluster
                .wait_vm(A, STEP_TIMEOUT, "secondary of hostB", |vm| {
                    vm["role"] == "Secondary" && vm["primary"] == HOSTS[B]
                });
            bed.note("hostA is hostB's secondary");
        }
    }
}

/// The pid of `ftvmd` in a host's namespace.
fn ftvmd_pid(cluster: &Cluster, host: usize) -> u32 {
    cluster
        .hosts
        .pids(HOSTS[host])
        .into_iter()
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "ftvmd")
        })
        .unwrap_or_else(|| panic!("no ftvmd runs in {}", HOSTS[host]))
}

fn ftvmd_kill(bed: &mut Bed, random: &mut Random) -> Handled {
    let down = Duration::from_millis(random.between(FTVMD_DOWN_MS.0, FTVMD_DOWN_MS.1));
    let acknowledged = bed.acknowledged();
    let pid = ftvmd_pid(&bed.cluster, A);
    let at = Instant::now();
    signal(pid, libc::SIGKILL);
    bed.note(&format!(
        "hostA's ftvmd (pid {pid}) SIGKILLed after {acknowledged} acknowledged writes"
    ));
    // The fault's length, drawn from the seed: not a wait for a condition.
    std::thread::sleep(down);
    bed.cluster.start_ftvmd(A);
    bed.note(&format!(
        "hostA's ftvmd started again after {} ms",
        down.as_millis()
    ));
    let serving = bed.wait_serving(bed.acknowledged());
    bed.note(&format!(
        "{} serves the VM, generation {:?} ({:.2} s after the kill)",
        HOSTS[serving],
        bed.generation(serving),
        at.elapsed().as_secs_f64()
    ));
    Handled {
        at,
        serving,
        repair: Repair::Nothing,
    }
}

fn witness_lost(bed: &mut Bed, random: &mut Random) -> Handled {
    let cut: Vec<&'static str> = match random.between(0, 2) {
        0 => Vec::new(),
        1 => vec![["alink1", "alink2"][random.between(0, 1) as usize]],
        _ => vec!["alink1", "alink2"],
    };
    let watch = Duration::from_millis(random.between(WATCH_MS.0, WATCH_MS.1));
    let generation = bed.generation(A);
    let at = Instant::now();
    bed.cluster.stop_witness();
    bed.note("witness stopped");
    let peer_up = cut.len() < 2;
    // The witness's loss is noticed (and nothing else happens) before a link goes.
    bed.wait_acknowledged(bed.acknowledged() + 3);
    if !cut.is_empty() {
        bed.cluster.set_links(A, &cut, false);
        bed.note(&format!("{} cut in hostA", cut.join(", ")));
    }
    let acknowledged = bed.acknowledged();
    let mut acting_seen = Vec::new();
    Wait::up_to(watch)
        .every(Duration::from_millis(100))
        .sample(|| note_acting_primaries(&bed.cluster, &mut acting_seen));
    let mut acknowledged_after = bed.acknowledged();
    bed.note(&format!(
        "watched {} ms: acting primaries seen {acting_seen:?}, {} writes acknowledged meanwhile",
        watch.as_millis(),
        acknowledged_after - acknowledged
    ));
    if peer_up {
        // The guest goes on writing: its next write is acknowledged within a bound (the
        // watch may end while a write waits out the cut link's timeout), and the VM stays
        // put meanwhile.
        let waited = Instant::now();
        let progressed = Wait::up_to(PROGRESS_TIMEOUT)
            .every(Duration::from_millis(100))
            .poll(|| {
                note_acting_primaries(&bed.cluster, &mut acting_seen);
                acknowledged_after = bed.acknowledged();
                (acknowledged_after > acknowledged).then_some(())
            })
            .is_some();
        bed.note(&format!(
            "{} writes acknowledged since the cut, {} ms after the watch",
            acknowledged_after - acknowledged,
            waited.elapsed().as_millis()
        ));
        // The peer is up: nothing may move, and the guest must go on writing.
        assert_eq!(
            acting_seen,
            vec![HOSTS[A]],
            "with the witness lost and the peer up, the VM moved or stopped"
        );
        assert!(
            progressed,
            "with the witness lost and the peer up, the guest's writes stopped for {} s",
            PROGRESS_TIMEOUT.as_secs()
        );
        assert_eq!(
            bed.generation(A),
            generation,
            "with the witness lost and the peer up, hostA's generation changed"
        );
        assert!(
            !bed.rebooted(A) && !bed.rebooted(B),
            "with the witness lost and the peer up, the VM was restarted"
        );
        let repair = if cut.is_empty() {
            Repair::StartWitness
        } else {
            Repair::LinksUpStartWitness(cut)
        };
        return Handled {
            at,
            serving: A,
            repair,
        };
    }
    // Peer and witness both out of reach: nobody may have acted as primary after the
    // hold began; the witness returns and decides.
    bed.cluster.start_witness();
    bed.note("witness started again (links still cut)");
    let serving = bed.wait_serving(acknowledged_after);
    bed.note(&format!(
        "{} serves the VM, generation {:?}",
        HOSTS[serving],
        bed.generation(serving)
    ));
    Handled {
        at,
        serving,
        repair: Repair::LinksUp(cut),
    }
}

/// Adds the hosts acting as primary now to `seen`, each once.
fn note_acting_primaries(cluster: &Cluster, seen: &mut Vec<&'static str>) {
    for host in cluster.acting_primaries() {
        if !seen.contains(&host) {
            seen.push(host);
        }
    }
}

fn host_kill(bed: &mut Bed) -> Handled {
    let at = bed.cluster.kill_host(A);
    let acknowledged = workload::acknowledged_count(&bed.cluster.console(A));
    bed.note(&format!(
        "hostA killed after {acknowledged} acknowledged writes"
    ));
    let promoted = bed
        .cluster
        .wait_vm(B, STEP_TIMEOUT, "primary with the VM running", |vm| {
            vm["role"] == "Primary" && vm["vm_pid"].is_u64()
        });
    bed.note(&format!(
        "hostB primary at generation {}, QEMU running ({:.2} s after the kill)",
        promoted["generation"],
        at.elapsed().as_secs_f64()
    ));
    Wait::up_to(STEP_TIMEOUT)
        .every(Duration::from_millis(100))
        .until("hostB's guest booted", || bed.rebooted(B));
    bed.note(&format!(
        "hostB's guest up ({:.2} s after the kill)",
        at.elapsed().as_secs_f64()
    ));
    let record: Value = bed.cluster.witness_record();
    assert_eq!(record["holder"], HOSTS[B], "witness record: {record}");
    Handled {
        at,
        serving: B,
        repair: Repair::RestartHostA,
    }
}
