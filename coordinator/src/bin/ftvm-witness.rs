use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use coordinator::witness_daemon::{run, WitnessConfig, WitnessKeys};

/// The ftvm quorum witness: runs on a third host and grants each generation of a protected
/// VM to at most one of its two hosts, so that a partition never gives two primaries.
///
/// Every grant is written to STATE_DIR (one readable JSON file per VM) and synced before
/// the answer leaves. Hosts connect over the replication link, authenticated with a
/// pre-shared key: one for all hosts (--psk-file), or better one per host (--psk-dir), so
/// that no host can connect, and claim, under another host's name.
#[derive(Debug, Parser)]
#[command(name = "ftvm-witness", version)]
struct Args {
    /// Address to accept hosts on (give twice for two networks).
    #[arg(long, value_name = "ADDR:PORT", required = true)]
    listen: Vec<SocketAddr>,
    /// Where grants are kept (created, mode 0700).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Pre-shared key every host uses to reach this witness (at least 16 bytes).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "psk_dir",
        conflicts_with = "psk_dir"
    )]
    psk_file: Option<PathBuf>,
    /// A key per host: DIR/HOST.psk for each host (HOST as in its `[host] name`), the same
    /// file as that host's `[witness] psk_file`. A host connects only under its own name.
    #[arg(long, value_name = "DIR")]
    psk_dir: Option<PathBuf>,
    /// This witness's name on the link.
    #[arg(long, value_name = "NAME", default_value = "witness")]
    host_id: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let config = WitnessConfig {
        listen: args.listen,
        state_dir: args.state_dir,
        keys: match (args.psk_file, args.psk_dir) {
            (_, Some(dir)) => WitnessKeys::PerHost(dir),
            (Some(file), None) => WitnessKeys::Shared(file),
            // clap requires one of them.
            (None, None) => return ExitCode::from(2),
        },
        host_id: args.host_id,
    };
    match run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ftvm-witness: {}", coordinator::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
