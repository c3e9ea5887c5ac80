//! The fault matrix's disk-level rows (issue 10), one seeded run each: see
//! `ftvm_tests::torture` and `docs/RELIABILITY.md`. `ci/torture.sh --runs N` runs them
//! many times; `FTVM_TORTURE_SEED` replays one run.

use ftvm_tests::torture::rows::Row;
use ftvm_tests::torture::workload::Workload;
use ftvm_tests::torture::{report, results_path, run_row_test};

#[test]
fn secondary_eio() {
    run_row_test(Row::SecondaryEio, Workload::Records);
}

#[test]
fn secondary_enospc() {
    run_row_test(Row::SecondaryEnospc, Workload::Records);
}

#[test]
fn primary_eio() {
    run_row_test(Row::PrimaryEio, Workload::Records);
}

#[test]
fn primary_enospc() {
    run_row_test(Row::PrimaryEnospc, Workload::Records);
}

#[test]
fn secondary_power_loss() {
    run_row_test(Row::SecondaryPowerLoss, Workload::Records);
}

#[test]
fn primary_power_loss() {
    run_row_test(Row::PrimaryPowerLoss, Workload::Records);
}

#[test]
fn kill_syncing() {
    run_row_test(Row::KillSyncing, Workload::Records);
}

#[test]
fn kill_protected() {
    run_row_test(Row::KillProtected, Workload::Records);
}

#[test]
fn kill_degraded() {
    run_row_test(Row::KillDegraded, Workload::Records);
}

#[test]
fn kill_remote_only() {
    run_row_test(Row::KillRemoteOnly, Workload::Records);
}

#[test]
fn kill_holding() {
    run_row_test(Row::KillHolding, Workload::Records);
}

#[test]
fn one_link_cut() {
    run_row_test(Row::OneLinkCut, Workload::Records);
}

#[test]
fn both_links_cut() {
    run_row_test(Row::BothLinksCut, Workload::Records);
}

/// Not a test: `ci/torture.sh` runs it to print the table of the results file
/// (`FTVM_TORTURE_RESULTS`) and, with `FTVM_TORTURE_REPORT`, write `docs/RELIABILITY.md`.
#[test]
#[ignore = "run by ci/torture.sh after its runs"]
fn report() {
    let path = results_path();
    let results = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
    let rows = report::summarize(&results);
    // After libtest's "test report ... " (no newline with --nocapture).
    println!("\n{}", report::table(&rows));
    if let Some(document) = std::env::var_os("FTVM_TORTURE_REPORT") {
        let command = std::env::var("FTVM_TORTURE_COMMAND").unwrap_or_default();
        let when = std::env::var("FTVM_TORTURE_WHEN").unwrap_or_default();
        let total = std::env::var("FTVM_TORTURE_TOTAL").unwrap_or_default();
        let previous = std::fs::read_to_string(&document).unwrap_or_default();
        let text = report::document(&rows, &command, &when, &total, &previous);
        std::fs::write(&document, text).expect("write the report");
        println!("wrote {}", std::path::Path::new(&document).display());
    }
}
