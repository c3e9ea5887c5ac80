use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use fault_fs::{run, Config, DEFAULT_MAX_DIRTY_BYTES};

/// A FUSE file system for tests that serves the files of a backing directory and, on command,
/// fails I/O, runs out of space, adds latency and loses power.
///
/// Writes stay in memory until the file is fsynced (or written back past the dirty cap);
/// `power-loss` on the control socket drops every write not yet synced, as a host crash
/// loses its page cache. Runs in the foreground as root; SIGTERM or SIGINT unmounts (which
/// syncs every file). Control commands (one per line, one JSON line back): `fail
/// read|write|sync|any [errno=EIO|ENOSPC|EOPNOTSUPP] [file=NAME] [offset=N] [len=N]`,
/// `enospc-after BYTES`, `delay-ms N`, `fallocate supported|unsupported`, `power-loss`,
/// `sync`, `clear`, `status`.
#[derive(Debug, Parser)]
#[command(name = "ftvm-fault-fs", version)]
struct Args {
    /// Directory holding the files served (their durable content). Regular files only.
    #[arg(long, value_name = "DIR")]
    backing: PathBuf,
    /// Where to mount the file system (an existing directory).
    #[arg(long, value_name = "DIR")]
    mountpoint: PathBuf,
    /// Control socket (created with mode 0600; a stale file is replaced). It answers once
    /// the file system is mounted.
    #[arg(long, value_name = "PATH")]
    control: PathBuf,
    /// Cap on unsynced data of all files; past it the oldest dirty pages are written to the
    /// backing files (and then survive a power loss), as the kernel's writeback does.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_DIRTY_BYTES)]
    max_dirty_bytes: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let config = Config {
        backing: args.backing,
        mountpoint: args.mountpoint,
        control: args.control,
        max_dirty_bytes: args.max_dirty_bytes,
    };
    match run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ftvm-fault-fs: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// `error: source: source ...` on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
