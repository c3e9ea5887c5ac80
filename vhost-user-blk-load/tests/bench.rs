//! `ftvm-blk-bench` against qemu-storage-daemon: the library run, the binary, and `compare`
//! with qemu-storage-daemon standing in for our daemon.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::QsdFixture;
use vhost_user_blk_load::bench::{self, BenchConfig, Pattern};
use vhost_user_blk_load::compare::{self, CompareConfig, MATRIX};
use vhost_user_blk_load::daemon::QSD_PATH;

#[test]
fn a_short_run_reports_iops_and_latency() {
    let fixture = QsdFixture::start(64 << 20, 2);
    for (pattern, iodepth, queues) in [(Pattern::RandWrite, 4, 1), (Pattern::RandRead, 8, 2)] {
        let mut config = BenchConfig::new(fixture.socket.clone(), pattern, 4096, iodepth);
        config.duration = Duration::from_millis(500);
        config.queues = queues;
        let report = bench::run(&config).expect("bench run");
        assert!(report.requests > 0, "{report:?}");
        assert_eq!(report.errors, 0);
        assert!(report.iops > 0.0);
        assert!(report.latency.p50_us > 0.0);
        assert!(report.latency.p50_us <= report.latency.p99_us);
        assert!(report.latency.p99_us <= report.latency.max_us);
        assert_eq!(report.capacity_bytes, 64 << 20);
    }
}

#[test]
fn the_binary_prints_json() {
    let fixture = QsdFixture::start(64 << 20, 1);
    let output = Command::new(env!("CARGO_BIN_EXE_ftvm-blk-bench"))
        .arg("run")
        .arg("--socket")
        .arg(&fixture.socket)
        .args(["--rw", "randwrite", "--bs", "8k", "--iodepth", "4"])
        .args(["--seconds", "0.3", "--size-limit", "1m", "--json"])
        .output()
        .expect("run ftvm-blk-bench");
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(report["pattern"], "randwrite");
    assert_eq!(report["block_size_bytes"], 8192);
    assert_eq!(report["errors"], 0);
    assert!(report["iops"].as_f64().expect("iops") > 0.0);
}

#[test]
fn compare_runs_the_matrix_and_cleans_up() {
    let directory = tempfile::tempdir().expect("tempdir");
    let image = directory.path().join("disk.raw");
    std::fs::File::create(&image)
        .and_then(|file| file.set_len(32 << 20))
        .expect("image");
    let ours = format!(
        "{QSD_PATH} --blockdev driver=file,node-name=f0,filename={{image}} \
         --blockdev driver=raw,node-name=d0,file=f0 \
         --export type=vhost-user-blk,id=e0,addr.type=unix,addr.path={{socket}},node-name=d0,writable=on"
    );
    let config = CompareConfig {
        image,
        ours_command: ours,
        qsd_program: PathBuf::from(QSD_PATH),
        duration: Duration::from_millis(200),
        startup_timeout: Duration::from_secs(20),
        timeout_ms: 10_000,
        event_idx: true,
    };
    let rows = compare::run(&config).expect("compare");
    assert_eq!(rows.len(), MATRIX.len());
    for row in &rows {
        assert!(row.ours.iops > 0.0 && row.qsd.iops > 0.0, "{row:?}");
    }
    let table = compare::markdown_table(&rows);
    assert!(table.contains("| 4k randwrite QD32 |"), "{table}");
}
