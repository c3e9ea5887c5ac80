//! The fault matrix's disk-level rows (issue 10): a guest writes numbered, flushed records
//! at random blocks across a mirrored disk while one fault hits at a moment chosen by the
//! run's seed; the test plays the coordinator, repairs, and checks that no acknowledged
//! write is lost on the copy that serves next, that no two copies accept writes at one
//! generation, what the guest saw, and how long the pair took to be Protected again.
//!
//! The rows that need the coordinator (ftvmd SIGKILL, witness lost, host kill) run on a
//! whole cluster: [`cluster_rows`], `tests/tests/torture_cluster.rs`.
//!
//! `tests/tests/torture.rs` runs one seeded run of each row; `ci/torture.sh --runs N`
//! runs many and writes `docs/RELIABILITY.md`. A run prints its seed; `FTVM_TORTURE_SEED`
//! replays it (the same plan, the same fault timing). Each run appends one JSON line to
//! `FTVM_TORTURE_RESULTS` (default `target/torture/results.jsonl`).

pub mod cluster_monitor;
pub mod cluster_rows;
pub mod monitor;
pub mod random;
pub mod report;
pub mod rig;
pub mod rows;
pub mod workload;

use std::collections::BTreeSet;
use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;

use serde_json::{json, Value};

use self::random::Random;
use self::rig::{Rig, IMAGE_BYTES, SYNC_TIMEOUT};
use self::rows::{Row, Serving};
use self::workload::{Plan, Workload, BLOCK_BYTES};

/// The fault hits after this many acknowledged writes (drawn from the seed).
const FAULT_AFTER_WRITES: (u64, u64) = (5, 40);

/// One run's outcome: what `ci/torture.sh` tabulates.
#[derive(Debug, Clone, Default)]
pub struct RunRecord {
    pub row: String,
    pub seed: u64,
    pub fault_after_writes: u64,
    pub state_at_fault: String,
    pub serving: String,
    pub acknowledged_writes: u64,
    /// Acknowledged blocks missing on the serving copy right after the fault was handled.
    pub lost_on_serving_copy: Vec<String>,
    /// Acknowledged blocks missing on either copy once Protected again.
    pub lost_after_repair: Vec<String>,
    pub lost_blocks: u64,
    pub split_brain_samples: u64,
    pub monitor_samples: u64,
    pub guest_write_failures: u64,
    pub guest_kernel_io_errors: u64,
    pub rejected_requests: u64,
    pub guest_exit: Option<i32>,
    pub back_to_protected_ms: Option<u64>,
    pub images_identical: Option<bool>,
    /// Cluster rows: the VM was started again (its guest booted a second time).
    pub vm_restarted: Option<bool>,
    /// Cluster rows: another host serves the VM after the fault.
    pub failed_over: Option<bool>,
    pub run_ms: u64,
    pub timeline: Vec<String>,
    pub error: Option<String>,
}

impl RunRecord {
    /// Guest-visible errors: failed writes the guest saw and requests the daemons refused.
    pub fn guest_errors(&self) -> u64 {
        self.guest_write_failures + self.rejected_requests
    }

    /// Every promise held and the run completed.
    pub fn ok(&self) -> bool {
        self.error.is_none()
            && self.lost_blocks == 0
            // A guest that finished must have finished well (one that was killed with its
            // host has no exit code).
            && self.guest_exit.is_none_or(|code| code == 0)
            && self.split_brain_samples == 0
            && self.guest_errors() == 0
            && self.images_identical == Some(true)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "row": self.row,
            "seed": self.seed,
            "ok": self.ok(),
            "fault_after_writes": self.fault_after_writes,
            "state_at_fault": self.state_at_fault,
            "serving": self.serving,
            "acknowledged_writes": self.acknowledged_writes,
            "lost_blocks": self.lost_blocks,
            "lost_on_serving_copy": self.lost_on_serving_copy,
            "lost_after_repair": self.lost_after_repair,
            "split_brain_samples": self.split_brain_samples,
            "monitor_samples": self.monitor_samples,
            "guest_errors": self.guest_errors(),
            "guest_write_failures": self.guest_write_failures,
            "guest_kernel_io_errors": self.guest_kernel_io_errors,
            "rejected_requests": self.rejected_requests,
            "guest_exit": self.guest_exit,
            "back_to_protected_ms": self.back_to_protected_ms,
            "images_identical": self.images_identical,
            "vm_restarted": self.vm_restarted,
            "failed_over": self.failed_over,
            "run_ms": self.run_ms,
            "timeline": self.timeline,
            "error": self.error,
        })
    }
}

/// Runs `row` once with `seed`, filling `record` as it goes (so a panic leaves what was
/// measured up to it).
pub fn run(row: Row, workload: Workload, seed: u64, record: &mut RunRecord) {
    let mut random = Random::new(seed);
    let blocks = IMAGE_BYTES / BLOCK_BYTES;
    let plan = Plan::random(&mut random, workload, 0, blocks);
    let fault_after = workload.acks_for(random.between(FAULT_AFTER_WRITES.0, FAULT_AFTER_WRITES.1));
    record.fault_after_writes = fault_after;
    let mut rig = Rig::start(&row_name(row, workload), row.layout(), &[]);
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        exercise(row, &mut rig, &plan, fault_after, &mut random, record)
    }));
    record.timeline = std::mem::take(&mut rig.timeline);
    let findings = rig.monitor();
    record.split_brain_samples = findings.split_brain_samples;
    record.monitor_samples = findings.samples;
    record.rejected_requests = findings.rejected_requests;
    if let Some(first) = findings.first_split_brain {
        eprintln!("torture: split brain, first sample:\n{first}");
    }
    if let Err(payload) = result {
        panic::resume_unwind(payload);
    }
}

fn exercise(
    row: Row,
    rig: &mut Rig,
    plan: &Plan,
    fault_after: u64,
    random: &mut Random,
    record: &mut RunRecord,
) {
    rig.boot_guest(&row_name(row, plan.workload), plan);
    rig.wait_acknowledged(fault_after);
    let fault = rows::inject(row, rig, random);
    record.state_at_fault = fault.state_at_fault.clone();
    let latest = workload::latest_acknowledged(&rig.console());
    let image = match fault.serving {
        Serving::Primary => rig.pair.primary_options.image.clone(),
        Serving::PrimaryFromPeer => rig.pair.secondary_options.image.clone(),
        // The roles swapped: `primary` is the promoted secondary.
        Serving::PromotedSecondary => rig.pair.primary_options.image.clone(),
    };
    record.serving = match fault.serving {
        Serving::Primary => "primary (own image)".into(),
        Serving::PrimaryFromPeer => "primary, RemoteOnly (secondary's image)".into(),
        Serving::PromotedSecondary => "promoted secondary (the primary fenced)".into(),
    };
    record.lost_on_serving_copy = describe(&plan.missing_in_image(&image, &latest));
    rig.note(&format!(
        "serving copy checked: {} acknowledged blocks, {} missing",
        latest.len(),
        record.lost_on_serving_copy.len()
    ));
    rows::repair(rig, &fault.repair);
    rig.drive_to_protected(SYNC_TIMEOUT);
    record.back_to_protected_ms = Some(fault.at.elapsed().as_millis() as u64);
    rig.note("Protected again");
    record.guest_exit = rig.finish_guest();
    let console = rig.console();
    (record.guest_write_failures, record.guest_kernel_io_errors) = workload::guest_errors(&console);
    record.acknowledged_writes = workload::acknowledged_count(&console) as u64;
    rig.drive_to_protected(SYNC_TIMEOUT);
    rig.pair
        .primary()
        .wait_replication(SYNC_TIMEOUT, "nothing in flight", |r| {
            r["in_flight_requests"] == 0
        });
    let latest = workload::latest_acknowledged(&console);
    let mut lost = Vec::new();
    for path in [
        &rig.pair.primary_options.image,
        &rig.pair.secondary_options.image,
    ] {
        lost.extend(describe(&plan.missing_in_image(path, &latest)));
    }
    record.lost_after_repair = lost;
    record.images_identical = Some(images_identical(
        &rig.pair.primary_options.image,
        &rig.pair.secondary_options.image,
    ));
    let blocks: BTreeSet<&String> = record
        .lost_on_serving_copy
        .iter()
        .chain(&record.lost_after_repair)
        .collect();
    record.lost_blocks = blocks.len() as u64;
}

pub(crate) fn describe(lost: &[workload::Lost]) -> Vec<String> {
    lost.iter()
        .map(|lost| {
            format!(
                "block {} seq {} (found {:?})",
                lost.block, lost.seq, lost.found
            )
        })
        .collect()
}

pub(crate) fn images_identical(first: &std::path::Path, second: &std::path::Path) -> bool {
    let read = |path: &std::path::Path| std::fs::read(path).unwrap_or_default();
    let (first, second) = (read(first), read(second));
    if let Some(offset) = first.iter().zip(&second).position(|(a, b)| a != b) {
        eprintln!(
            "torture: images differ, first at block {}",
            offset as u64 / BLOCK_BYTES
        );
    }
    first == second
}

/// The seed: `FTVM_TORTURE_SEED` to replay one, else a fresh one.
pub fn seed_from_env() -> u64 {
    match std::env::var("FTVM_TORTURE_SEED") {
        Ok(text) if !text.trim().is_empty() => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("FTVM_TORTURE_SEED={text:?} is not a number")),
        _ => random::fresh_seed(),
    }
}

/// Where runs append their JSON lines.
pub fn results_path() -> PathBuf {
    std::env::var_os("FTVM_TORTURE_RESULTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::paths::target_dir().join("torture/results.jsonl"))
}

fn append_result(record: &RunRecord) {
    let path = results_path();
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let line = format!("{}\n", record.to_json());
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| file.write_all(line.as_bytes()));
    if let Err(error) = appended {
        eprintln!("torture: cannot append to {}: {error}", path.display());
    }
}

/// The name of `row` run under `workload` (`secondary-eio`, `secondary-eio-fio`).
pub fn row_name(row: Row, workload: Workload) -> String {
    format!("{}{}", row.name(), workload.suffix())
}

/// One seeded run of `row` under `workload` as a test: prints the seed, appends the
/// result, and fails (naming the seed) unless every promise held.
pub fn run_row_test(row: Row, workload: Workload) {
    run_seeded_test(&row_name(row, workload), |seed, record| {
        run(row, workload, seed, record)
    });
}

/// One seeded run of the row `name` (a disk-level or a cluster row) as a test.
pub fn run_seeded_test(name: &str, run: impl FnOnce(u64, &mut RunRecord)) {
    let seed = seed_from_env();
    eprintln!("torture: row {name}, seed {seed} (replay: FTVM_TORTURE_SEED={seed} ci/torture.sh --runs 1 --rows {name})");
    let started = std::time::Instant::now();
    let mut record = RunRecord {
        row: name.to_owned(),
        seed,
        ..RunRecord::default()
    };
    let result = panic::catch_unwind(AssertUnwindSafe(|| run(seed, &mut record)));
    record.run_ms = started.elapsed().as_millis() as u64;
    if let Err(payload) = &result {
        record.error = Some(panic_message(payload.as_ref()));
    }
    append_result(&record);
    eprintln!("torture: result {:#}", record.to_json());
    if let Err(payload) = result {
        eprintln!("torture: row {name} failed with seed {seed}");
        panic::resume_unwind(payload);
    }
    assert!(
        record.ok(),
        "row {name}, seed {seed}: {} acknowledged blocks lost, {} split-brain samples, {} guest-visible errors, images identical: {:?} (replay: FTVM_TORTURE_SEED={seed} ci/torture.sh --runs 1 --rows {name})",
        record.lost_blocks,
        record.split_brain_samples,
        record.guest_errors(),
        record.images_identical,
    );
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|text| text.to_string()))
        .unwrap_or_else(|| "panic".into());
    // The first line says what; the rest (status dumps, consoles) is in the run's log.
    text.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(400)
        .collect()
}
