//! The fault matrix's cluster rows (issue 10), one seeded run each: `ftvmd` on two hosts,
//! the witness, a Level 2 VM; see `ftvm_tests::torture::cluster_rows` and
//! `docs/RELIABILITY.md`. `ci/torture.sh --rows ftvmd-kill,witness-lost,host-kill --runs N`
//! runs them many times; `FTVM_TORTURE_SEED` replays one run.

use ftvm_tests::torture::cluster_rows::{run_cluster_row_test, ClusterRow};
use ftvm_tests::torture::workload::Workload;

#[test]
fn ftvmd_kill() {
    run_cluster_row_test(ClusterRow::FtvmdKill, Workload::Records);
}

#[test]
fn witness_lost() {
    run_cluster_row_test(ClusterRow::WitnessLost, Workload::Records);
}

#[test]
fn host_kill() {
    run_cluster_row_test(ClusterRow::HostKill, Workload::Records);
}
