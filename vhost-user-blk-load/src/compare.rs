//! `ftvm-blk-bench compare`: the same workloads against qemu-storage-daemon and against our
//! daemon on the same image, one daemon at a time, each started fresh per workload and killed
//! by PID afterwards (also on error).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::bench::{self, BenchConfig, BenchError, BenchReport, Pattern};
use crate::daemon::{Daemon, DaemonError};

/// Errors of a comparison.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("image {0} does not exist")]
    NoImage(PathBuf),
    #[error("cannot create a temporary directory")]
    TempDir(#[source] std::io::Error),
    #[error("cannot start {backend}")]
    Daemon {
        backend: &'static str,
        #[source]
        source: DaemonError,
    },
    #[error("{workload} against {backend} failed; daemon log: {log_tail}")]
    Bench {
        workload: String,
        backend: &'static str,
        log_tail: String,
        #[source]
        source: Box<BenchError>,
    },
}

type Result<T> = std::result::Result<T, CompareError>;

/// One row of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    pub pattern: Pattern,
    pub block_size_bytes: u64,
    pub iodepth: u16,
}

impl Workload {
    /// E.g. `4k randread QD32`, `1M write QD4`.
    pub fn name(&self) -> String {
        let size =
            if self.block_size_bytes >= 1 << 20 && self.block_size_bytes.is_multiple_of(1 << 20) {
                format!("{}M", self.block_size_bytes >> 20)
            } else {
                format!("{}k", self.block_size_bytes / 1024)
            };
        format!("{size} {} QD{}", self.pattern, self.iodepth)
    }
}

/// 4k randread and randwrite at QD1 and QD32, then 64 KiB and 1 MiB sequential read and write
/// at QD4 (where copying the data, not the per-request cost, decides).
pub const MATRIX: [Workload; 8] = [
    Workload {
        pattern: Pattern::RandRead,
        block_size_bytes: 4096,
        iodepth: 1,
    },
    Workload {
        pattern: Pattern::RandRead,
        block_size_bytes: 4096,
        iodepth: 32,
    },
    Workload {
        pattern: Pattern::RandWrite,
        block_size_bytes: 4096,
        iodepth: 1,
    },
    Workload {
        pattern: Pattern::RandWrite,
        block_size_bytes: 4096,
        iodepth: 32,
    },
    Workload {
        pattern: Pattern::Read,
        block_size_bytes: 64 << 10,
        iodepth: 4,
    },
    Workload {
        pattern: Pattern::Write,
        block_size_bytes: 64 << 10,
        iodepth: 4,
    },
    Workload {
        pattern: Pattern::Read,
        block_size_bytes: 1 << 20,
        iodepth: 4,
    },
    Workload {
        pattern: Pattern::Write,
        block_size_bytes: 1 << 20,
        iodepth: 4,
    },
];

/// What to compare.
#[derive(Clone, Debug)]
pub struct CompareConfig {
    /// Raw image both daemons serve (it gets written).
    pub image: PathBuf,
    /// Our daemon's command line with `{socket}` (and optionally `{image}`) placeholders.
    pub ours_command: String,
    /// qemu-storage-daemon binary.
    pub qsd_program: PathBuf,
    /// Length of each run.
    pub duration: Duration,
    /// How long a daemon may take to create its socket.
    pub startup_timeout: Duration,
    /// Longest wait for one completion.
    pub timeout_ms: u64,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX, as QEMU guests do.
    pub event_idx: bool,
}

/// Results of one workload on both backends.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CompareRow {
    pub workload: String,
    pub ours: BenchReport,
    pub qsd: BenchReport,
}

#[derive(Clone, Copy)]
enum Backend {
    Ours,
    Qsd,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Ours => "ours",
            Backend::Qsd => "qemu-storage-daemon",
        }
    }
}

fn start(config: &CompareConfig, backend: Backend, directory: &Path, run: usize) -> Result<Daemon> {
    let socket = directory.join(format!("{}-{run}.sock", backend.name()));
    let log = directory.join(format!("{}-{run}.log", backend.name()));
    let started = match backend {
        Backend::Qsd => {
            Daemon::qemu_storage_daemon(&config.qsd_program, &config.image, &socket, 1, &log)
        }
        Backend::Ours => Daemon::from_template(
            backend.name(),
            &config.ours_command,
            &socket,
            Some(&config.image),
            &log,
        ),
    };
    let daemon_error = |source| CompareError::Daemon {
        backend: backend.name(),
        source,
    };
    let mut daemon = started.map_err(daemon_error)?;
    daemon
        .wait_for_socket(config.startup_timeout)
        .map_err(daemon_error)?;
    Ok(daemon)
}

fn measure(
    config: &CompareConfig,
    workload: Workload,
    backend: Backend,
    directory: &Path,
    run: usize,
) -> Result<BenchReport> {
    let daemon = start(config, backend, directory, run)?;
    let mut bench_config = BenchConfig::new(
        daemon.socket().to_path_buf(),
        workload.pattern,
        workload.block_size_bytes,
        workload.iodepth,
    );
    bench_config.duration = config.duration;
    bench_config.timeout_ms = config.timeout_ms;
    bench_config.event_idx = config.event_idx;
    log::info!("{} against {}", workload.name(), backend.name());
    // `daemon` drops (SIGTERM, then SIGKILL) on every path out of here.
    bench::run(&bench_config).map_err(|source| CompareError::Bench {
        workload: workload.name(),
        backend: backend.name(),
        log_tail: daemon.log_tail(),
        source: Box::new(source),
    })
}

/// Runs [`MATRIX`] against both backends, alternating per workload.
pub fn run(config: &CompareConfig) -> Result<Vec<CompareRow>> {
    if !config.image.exists() {
        return Err(CompareError::NoImage(config.image.clone()));
    }
    let directory = tempfile::tempdir().map_err(CompareError::TempDir)?;
    let mut rows = Vec::with_capacity(MATRIX.len());
    for (run, workload) in MATRIX.into_iter().enumerate() {
        let qsd = measure(config, workload, Backend::Qsd, directory.path(), run)?;
        let ours = measure(config, workload, Backend::Ours, directory.path(), run)?;
        rows.push(CompareRow {
            workload: workload.name(),
            ours,
            qsd,
        });
    }
    Ok(rows)
}

/// The comparison as a markdown table.
pub fn markdown_table(rows: &[CompareRow]) -> String {
    let mut table = String::from(
        "| workload | ours IOPS | qsd IOPS | ours MB/s | qsd MB/s | ratio ours/qsd | ours p50/p99 µs | qsd p50/p99 µs |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let ratio = if row.qsd.iops > 0.0 {
            format!("{:.2}", row.ours.iops / row.qsd.iops)
        } else {
            "n/a".to_string()
        };
        let _ = writeln!(
            table,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.0}/{:.0} | {:.0}/{:.0} |",
            row.workload,
            row.ours.iops,
            row.qsd.iops,
            row.ours.bandwidth_mb_s,
            row.qsd.bandwidth_mb_s,
            ratio,
            row.ours.latency.p50_us,
            row.ours.latency.p99_us,
            row.qsd.latency.p50_us,
            row.qsd.latency.p99_us,
        );
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::LatencyReport;

    fn report(iops: f64, p50_us: f64) -> BenchReport {
        BenchReport {
            pattern: Pattern::RandRead,
            block_size_bytes: 4096,
            iodepth: 1,
            queues: 1,
            capacity_bytes: 1 << 30,
            seconds: 1.0,
            requests: iops as u64,
            errors: 0,
            iops,
            bandwidth_mb_s: iops * 4096.0 / 1e6,
            latency: LatencyReport {
                p50_us,
                p99_us: p50_us * 2.0,
                ..LatencyReport::default()
            },
        }
    }

    #[test]
    fn table_has_one_row_per_workload() {
        let rows = vec![CompareRow {
            workload: MATRIX[0].name(),
            ours: report(5000.0, 150.0),
            qsd: report(10000.0, 80.0),
        }];
        let table = markdown_table(&rows);
        assert!(
            table
                .contains("| 4k randread QD1 | 5000 | 10000 | 20 | 41 | 0.50 | 150/300 | 80/160 |"),
            "{table}"
        );
        assert_eq!(table.lines().count(), 3);
    }

    #[test]
    fn workload_names_use_the_largest_whole_unit() {
        let names: Vec<String> = MATRIX.iter().map(Workload::name).collect();
        assert_eq!(
            names,
            [
                "4k randread QD1",
                "4k randread QD32",
                "4k randwrite QD1",
                "4k randwrite QD32",
                "64k read QD4",
                "64k write QD4",
                "1M read QD4",
                "1M write QD4",
            ]
        );
    }
}
