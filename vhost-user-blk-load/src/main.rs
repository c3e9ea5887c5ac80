//! `ftvm-blk-bench`: drives any vhost-user-blk socket like a guest would, without a VM.

use std::error::Error;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use vhost_user_blk_load::bench::{self, parse_size, BenchConfig, Pattern};
use vhost_user_blk_load::compare::{self, CompareConfig};
use vhost_user_blk_load::daemon::QSD_PATH;
use vhost_user_blk_load::{BlkDevice, DeviceOptions};

#[derive(Parser)]
#[command(name = "ftvm-blk-bench", version, about)]
/// Load generator and reference comparison for vhost-user-blk backends.
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one workload against a vhost-user-blk socket and print IOPS, MB/s and latency.
    Run(RunArgs),
    /// Run 4k randread/randwrite at QD1 and QD32, and 64k and 1M sequential read/write at QD4,
    /// against qemu-storage-daemon and our daemon on the same image (which gets written), and
    /// print a markdown table.
    Compare(CompareArgs),
    /// Connect, negotiate, and print the features and config space as JSON.
    Info(InfoArgs),
}

#[derive(Args)]
struct RunArgs {
    /// The backend's vhost-user-blk socket.
    #[arg(long)]
    socket: PathBuf,
    /// randread, randwrite, read or write.
    #[arg(long)]
    rw: Pattern,
    /// Block size: 512, 4k, 64k, 1m, …
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests kept in flight per queue.
    #[arg(long, default_value_t = 1)]
    iodepth: u16,
    /// Run time in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Virtqueues (one thread each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Use only the first BYTES of the disk (4k, 1g, …).
    #[arg(long, value_parser = parse_size)]
    size_limit: Option<u64>,
    /// Seed of the random offsets.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fail when no request completes for this long.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX.
    #[arg(long)]
    event_idx: bool,
    /// Negotiate VIRTIO_RING_F_INDIRECT_DESC.
    #[arg(long)]
    indirect: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CompareArgs {
    /// Raw image both daemons serve; it is written to.
    #[arg(long)]
    image: PathBuf,
    /// Our daemon, e.g. 'vhost-blk-mirror --socket {socket} --image IMG' ({image} works too).
    #[arg(long)]
    ours_cmd: String,
    /// Run time of each workload on each daemon, in seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// The qemu-storage-daemon binary.
    #[arg(long, default_value = QSD_PATH)]
    qsd: PathBuf,
    /// How long a daemon may take to create its socket.
    #[arg(long, default_value_t = 20_000)]
    startup_timeout_ms: u64,
    /// Fail when no request completes for this long.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX with both daemons, as QEMU guests do.
    #[arg(long)]
    event_idx: bool,
    /// Print JSON instead of the markdown table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InfoArgs {
    /// The backend's vhost-user-blk socket.
    #[arg(long)]
    socket: PathBuf,
}

fn seconds(value: f64) -> Result<Duration, Box<dyn Error>> {
    Duration::try_from_secs_f64(value).map_err(|_| format!("bad duration {value}").into())
}

fn run_bench(args: RunArgs) -> Result<(), Box<dyn Error>> {
    let mut config = BenchConfig::new(args.socket, args.rw, args.bs, args.iodepth);
    config.duration = seconds(args.seconds)?;
    config.queues = args.queues;
    config.size_limit_bytes = args.size_limit;
    config.seed = args.seed;
    config.timeout_ms = args.timeout_ms;
    config.event_idx = args.event_idx;
    config.indirect = args.indirect;
    let report = bench::run(&config)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.to_text());
    }
    Ok(())
}

fn run_compare(args: CompareArgs) -> Result<(), Box<dyn Error>> {
    let config = CompareConfig {
        image: args.image,
        ours_command: args.ours_cmd,
        qsd_program: args.qsd,
        duration: seconds(args.seconds)?,
        startup_timeout: Duration::from_millis(args.startup_timeout_ms),
        timeout_ms: args.timeout_ms,
        event_idx: args.event_idx,
    };
    let rows = compare::run(&config)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", compare::markdown_table(&rows));
    }
    Ok(())
}

fn run_info(args: InfoArgs) -> Result<(), Box<dyn Error>> {
    let device = BlkDevice::open(&args.socket, &DeviceOptions::default())?;
    let info = serde_json::json!({
        "negotiated": device.negotiated().describe(),
        "config": device.config(),
        "capacity_bytes": device.capacity_bytes(),
    });
    println!("{}", serde_json::to_string_pretty(&info)?);
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let result = match Cli::parse().command {
        Command::Run(args) => run_bench(args),
        Command::Compare(args) => run_compare(args),
        Command::Info(args) => run_info(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let mut message = format!("ftvm-blk-bench: {error}");
            let mut source = error.source();
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}
