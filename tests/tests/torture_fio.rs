//! The fault matrix (issue 10) run a second time with fio `--verify=crc32c` as the guest's
//! workload instead of the numbered records: one seeded run of every disk-level and
//! cluster row. The guest runs fio chunk after chunk (random 4 KiB writes at queue depth 8,
//! a FLUSH, then fio's own read-back and CRC32C check); the host checks every acknowledged
//! chunk on the copy that serves next and on both copies once Protected again with fio
//! `--verify_only`. See `ftvm_tests::torture::workload` and `docs/RELIABILITY.md`;
//! `ci/torture.sh --rows secondary-eio-fio,... --runs N` runs them many times.

use ftvm_tests::torture::cluster_rows::{run_cluster_row_test, ClusterRow};
use ftvm_tests::torture::rows::Row;
use ftvm_tests::torture::run_row_test;
use ftvm_tests::torture::workload::Workload;

macro_rules! rows {
    ($($name:ident => $row:expr),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run_row_test($row, Workload::Fio);
            }
        )*
    };
}

macro_rules! cluster_rows {
    ($($name:ident => $row:expr),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run_cluster_row_test($row, Workload::Fio);
            }
        )*
    };
}

rows! {
    secondary_eio_fio => Row::SecondaryEio,
    secondary_enospc_fio => Row::SecondaryEnospc,
    primary_eio_fio => Row::PrimaryEio,
    primary_enospc_fio => Row::PrimaryEnospc,
    secondary_power_loss_fio => Row::SecondaryPowerLoss,
    primary_power_loss_fio => Row::PrimaryPowerLoss,
    kill_syncing_fio => Row::KillSyncing,
    kill_protected_fio => Row::KillProtected,
    kill_degraded_fio => Row::KillDegraded,
    kill_remote_only_fio => Row::KillRemoteOnly,
    kill_holding_fio => Row::KillHolding,
    one_link_cut_fio => Row::OneLinkCut,
    both_links_cut_fio => Row::BothLinksCut,
}

cluster_rows! {
    ftvmd_kill_fio => ClusterRow::FtvmdKill,
    witness_lost_fio => ClusterRow::WitnessLost,
    host_kill_fio => ClusterRow::HostKill,
}
