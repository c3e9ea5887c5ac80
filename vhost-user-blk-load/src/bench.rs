//! The load generator behind `ftvm-blk-bench run`: keeps `iodepth` requests in flight on each
//! queue (one thread per queue) for a fixed time and reports IOPS, bandwidth and latency from
//! submit to completion seen.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::thread;
use std::time::{Duration, Instant};

use crate::blk::{Request, SECTOR_BYTES, STATUS_OK};
use crate::device::{BlkDevice, DeviceError, DeviceOptions};
use crate::histogram::Histogram;
use crate::memory::PAGE_SIZE;
use crate::queue::{BlkQueue, Completion, QueueError};
use crate::ring::RingLayout;

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot open the device")]
    Device(#[from] DeviceError),
    #[error("queue {queue} failed")]
    Queue {
        queue: u16,
        #[source]
        source: QueueError,
    },
    #[error("block size {block_size_bytes} is not a positive multiple of 512")]
    BadBlockSize { block_size_bytes: u64 },
    #[error("iodepth {0} is outside 1..=4096")]
    BadIodepth(u16),
    #[error("the disk ({limit_bytes} bytes usable) is smaller than one block")]
    DiskTooSmall { limit_bytes: u64 },
    #[error("a queue thread panicked")]
    WorkerPanic,
}

type Result<T> = std::result::Result<T, BenchError>;

/// Access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    RandRead,
    RandWrite,
    Read,
    Write,
}

impl Pattern {
    /// Whether requests are writes.
    pub fn is_write(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::Write)
    }

    /// Whether offsets are random.
    pub fn is_random(self) -> bool {
        matches!(self, Pattern::RandRead | Pattern::RandWrite)
    }
}

impl FromStr for Pattern {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        match text {
            "randread" => Ok(Pattern::RandRead),
            "randwrite" => Ok(Pattern::RandWrite),
            "read" => Ok(Pattern::Read),
            "write" => Ok(Pattern::Write),
            other => Err(format!(
                "unknown pattern {other:?} (randread, randwrite, read, write)"
            )),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::Read => "read",
            Pattern::Write => "write",
        })
    }
}

/// Parses `4k`, `64K`, `1m`, `1MiB`, `512`, `2g` into bytes (binary multiples).
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|character: char| !character.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{text:?} has an unknown unit")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// The backend's vhost-user-blk socket.
    pub socket: PathBuf,
    pub pattern: Pattern,
    pub block_size_bytes: u64,
    /// Requests kept in flight on each queue.
    pub iodepth: u16,
    pub duration: Duration,
    pub queues: u16,
    /// Only the first this many bytes of the disk are used.
    pub size_limit_bytes: Option<u64>,
    /// Seed of the offset generator (queue `n` uses `seed + n`).
    pub seed: u64,
    /// Longest wait for any completion before the run fails.
    pub timeout_ms: u64,
    /// Negotiate EVENT_IDX.
    pub event_idx: bool,
    /// Negotiate INDIRECT_DESC (one descriptor per request).
    pub indirect: bool,
}

impl BenchConfig {
    /// A config with the defaults of `ftvm-blk-bench run`.
    pub fn new(socket: PathBuf, pattern: Pattern, block_size_bytes: u64, iodepth: u16) -> Self {
        Self {
            socket,
            pattern,
            block_size_bytes,
            iodepth,
            duration: Duration::from_secs(10),
            queues: 1,
            size_limit_bytes: None,
            seed: 1,
            timeout_ms: 10_000,
            event_idx: false,
            indirect: false,
        }
    }

    fn validate(&self) -> Result<()> {
        let bs = self.block_size_bytes;
        if bs == 0 || !bs.is_multiple_of(SECTOR_BYTES) || bs > u64::from(u32::MAX) {
            return Err(BenchError::BadBlockSize {
                block_size_bytes: bs,
            });
        }
        if self.iodepth == 0 || self.iodepth > 4096 {
            return Err(BenchError::BadIodepth(self.iodepth));
        }
        Ok(())
    }

    /// Device options big enough for `queues × iodepth` requests of `block_size_bytes`.
    pub fn device_options(&self) -> DeviceOptions {
        let descriptors_per_request = if self.indirect { 1 } else { 3 };
        let queue_size = (u32::from(self.iodepth) * descriptors_per_request)
            .next_power_of_two()
            .clamp(128, 32768) as u16;
        let per_request = self.block_size_bytes.next_multiple_of(PAGE_SIZE) + PAGE_SIZE;
        let per_queue =
            RingLayout::bytes_needed(queue_size) + 2 * u64::from(self.iodepth) * per_request;
        let memory = (u64::from(self.queues.max(1)) * per_queue)
            .max(64 << 20)
            .next_multiple_of(PAGE_SIZE);
        let mut options = DeviceOptions {
            memory_size_bytes: memory,
            queue_count: self.queues,
            queue_size,
            timeout_ms: self.timeout_ms,
            ..DeviceOptions::default()
        };
        if self.event_idx {
            options = options.with_event_idx();
        }
        if self.indirect {
            options = options.with_indirect();
        }
        options
    }
}

/// Latency figures in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct LatencyReport {
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl LatencyReport {
    fn from_histogram(histogram: &Histogram) -> Self {
        let micros = |ns: u64| ns as f64 / 1000.0;
        Self {
            min_us: micros(histogram.min_ns()),
            mean_us: micros(histogram.mean_ns()),
            p50_us: micros(histogram.quantile_ns(0.5)),
            p99_us: micros(histogram.quantile_ns(0.99)),
            p999_us: micros(histogram.quantile_ns(0.999)),
            max_us: micros(histogram.max_ns()),
        }
    }
}

/// Results of one run.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BenchReport {
    pub pattern: Pattern,
    pub block_size_bytes: u64,
    pub iodepth: u16,
    pub queues: u16,
    pub capacity_bytes: u64,
    /// From the first submit to the last completion.
    pub seconds: f64,
    /// Completed requests, errors included.
    pub requests: u64,
    /// Requests whose status byte was not OK.
    pub errors: u64,
    pub iops: f64,
    /// Decimal megabytes (10^6 bytes) per second.
    pub bandwidth_mb_s: f64,
    pub latency: LatencyReport,
}

impl BenchReport {
    /// Two lines of text.
    pub fn to_text(&self) -> String {
        format!(
            "{} bs={} iodepth={} queues={} seconds={:.2} requests={} errors={}\n\
             iops={:.0} bandwidth={:.2} MB/s latency_us min={:.1} mean={:.1} p50={:.1} \
             p99={:.1} p99.9={:.1} max={:.1}",
            self.pattern,
            self.block_size_bytes,
            self.iodepth,
            self.queues,
            self.seconds,
            self.requests,
            self.errors,
            self.iops,
            self.bandwidth_mb_s,
            self.latency.min_us,
            self.latency.mean_us,
            self.latency.p50_us,
            self.latency.p99_us,
            self.latency.p999_us,
            self.latency.max_us,
        )
    }
}

/// xorshift64*: small, fast and seedable; good enough for offsets.
struct Offsets {
    state: u64,
}

impl Offsets {
    fn new(seed: u64) -> Self {
        Self {
            state: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
        }
    }

    fn next(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One queue's share of the run.
struct Worker {
    queue: BlkQueue,
    pattern: Pattern,
    block_size_bytes: u64,
    blocks: u64,
    next_block: u64,
    offsets: Offsets,
    payload: Vec<u8>,
    timeout: Duration,
}

struct WorkerResult {
    histogram: Histogram,
    errors: u64,
    started: Instant,
    finished: Instant,
}

impl Worker {
    fn next_request(&mut self) -> Request {
        let block = if self.pattern.is_random() {
            self.offsets.next() % self.blocks
        } else {
            let block = self.next_block;
            self.next_block = (self.next_block + 1) % self.blocks;
            block
        };
        let sector = block * self.block_size_bytes / SECTOR_BYTES;
        if self.pattern.is_write() {
            Request::Write {
                sector,
                data: self.payload.clone(),
            }
        } else {
            Request::Read {
                sector,
                len: self.block_size_bytes as u32,
            }
        }
    }

    fn enqueue_next(&mut self) -> std::result::Result<(), QueueError> {
        let request = self.next_request();
        self.queue.enqueue(&request).map(|_| ())
    }

    fn run(
        mut self,
        iodepth: u16,
        deadline: Instant,
    ) -> std::result::Result<WorkerResult, QueueError> {
        let mut histogram = Histogram::default();
        let mut errors = 0;
        let started = Instant::now();
        for _ in 0..iodepth {
            self.enqueue_next()?;
        }
        self.queue.kick()?;
        let mut finished = started;
        while self.queue.in_flight() > 0 {
            let completions = self.queue.reap(1, self.timeout)?;
            finished = Instant::now();
            let refill = finished < deadline;
            for completion in completions {
                errors += u64::from(!is_ok(&completion));
                histogram.record(completion.latency);
                if refill {
                    self.enqueue_next()?;
                }
            }
            self.queue.kick()?;
        }
        Ok(WorkerResult {
            histogram,
            errors,
            started,
            finished,
        })
    }
}

fn is_ok(completion: &Completion) -> bool {
    let ok = completion.status() == Some(STATUS_OK);
    if !ok {
        log::debug!(
            "request {} failed: {:?}",
            completion.id,
            completion.status()
        );
    }
    ok
}

/// Opens the device, runs the workload on every queue, and reports.
pub fn run(config: &BenchConfig) -> Result<BenchReport> {
    config.validate()?;
    let mut device = BlkDevice::open(&config.socket, &config.device_options())?;
    let capacity_bytes = device.capacity_bytes();
    let limit_bytes = config
        .size_limit_bytes
        .map_or(capacity_bytes, |limit| limit.min(capacity_bytes));
    let blocks = limit_bytes / config.block_size_bytes;
    if blocks == 0 {
        return Err(BenchError::DiskTooSmall { limit_bytes });
    }
    let queues = device.take_queues();
    let workers: Vec<Worker> = queues
        .into_iter()
        .map(|queue| {
            let index = u64::from(queue.index());
            Worker {
                queue,
                pattern: config.pattern,
                block_size_bytes: config.block_size_bytes,
                blocks,
                next_block: index * blocks / u64::from(config.queues.max(1)),
                offsets: Offsets::new(config.seed.wrapping_add(index)),
                payload: vec![0xa5; config.block_size_bytes as usize],
                timeout: Duration::from_millis(config.timeout_ms),
            }
        })
        .collect();
    let results = run_workers(workers, config.iodepth, config.duration)?;
    Ok(summarize(config, capacity_bytes, &results))
}

fn run_workers(
    workers: Vec<Worker>,
    iodepth: u16,
    duration: Duration,
) -> Result<Vec<WorkerResult>> {
    let deadline = Instant::now() + duration;
    thread::scope(|scope| {
        let handles: Vec<_> = workers
            .into_iter()
            .map(|worker| {
                let queue = worker.queue.index();
                let handle = scope.spawn(move || worker.run(iodepth, deadline));
                (queue, handle)
            })
            .collect();
        handles
            .into_iter()
            .map(|(queue, handle)| match handle.join() {
                Ok(result) => result.map_err(|source| BenchError::Queue { queue, source }),
                Err(_) => Err(BenchError::WorkerPanic),
            })
            .collect()
    })
}

fn summarize(config: &BenchConfig, capacity_bytes: u64, results: &[WorkerResult]) -> BenchReport {
    let mut histogram = Histogram::default();
    let mut errors = 0;
    for result in results {
        histogram.merge(&result.histogram);
        errors += result.errors;
    }
    let started = results.iter().map(|result| result.started).min();
    let finished = results.iter().map(|result| result.finished).max();
    let seconds = match (started, finished) {
        (Some(started), Some(finished)) => (finished - started).as_secs_f64(),
        _ => 0.0,
    };
    let requests = histogram.count();
    let rate = |amount: f64| if seconds > 0.0 { amount / seconds } else { 0.0 };
    BenchReport {
        pattern: config.pattern,
        block_size_bytes: config.block_size_bytes,
        iodepth: config.iodepth,
        queues: config.queues,
        capacity_bytes,
        seconds,
        requests,
        errors,
        iops: rate(requests as f64),
        bandwidth_mb_s: rate(requests as f64 * config.block_size_bytes as f64) / 1e6,
        latency: LatencyReport::from_histogram(&histogram),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("4q").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("99999999999999t").is_err());
    }

    #[test]
    fn patterns_round_trip() {
        for name in ["randread", "randwrite", "read", "write"] {
            let pattern: Pattern = name.parse().expect("pattern");
            assert_eq!(pattern.to_string(), name);
        }
        assert!("trim".parse::<Pattern>().is_err());
    }

    #[test]
    fn device_options_fit_the_load() {
        let mut config = BenchConfig::new(PathBuf::from("/x"), Pattern::RandRead, 1 << 20, 64);
        config.queues = 2;
        let options = config.device_options();
        assert_eq!(options.queue_size, 256);
        assert!(options.memory_size_bytes >= 2 * 64 * (1 << 20));
        assert!(config.validate().is_ok());
        config.block_size_bytes = 1000;
        assert!(config.validate().is_err());
    }

    #[test]
    fn offsets_differ_per_seed() {
        let mut first = Offsets::new(1);
        let mut second = Offsets::new(2);
        assert_ne!(first.next(), second.next());
    }
}
