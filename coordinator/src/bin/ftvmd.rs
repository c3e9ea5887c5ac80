use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use coordinator::config::Config;
use coordinator::daemon;

/// The ftvm host daemon: keeps the protected VMs of this host running through the loss of
/// a disk, a link or the whole peer host.
///
/// It starts each VM's disk daemons (vhost-blk-mirror) and, on the VM's primary host, the
/// VM itself; heartbeats the peer host's ftvmd on every A-link; asks the quorum witness
/// for the next generation when the peer is lost, and then continues alone, promotes this
/// host's copy, or fences it. Operators talk to it with `ftvm`.
///
/// FILE is TOML with [host], [peer], [witness], optional [timing] and one [[vm]] per VM;
/// see coordinator/README.md. Stop with SIGTERM: the VMs of this host stop with it (the
/// peer then takes them over); use `ftvm host disable` first for planned maintenance.
#[derive(Debug, Parser)]
#[command(name = "ftvmd", version)]
struct Args {
    /// The configuration file.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Check the configuration file and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(error) => return fail(&error),
    };
    if args.check {
        println!(
            "{}: valid ({} VM(s), peer {})",
            args.config.display(),
            config.vm.len(),
            config.peer.name
        );
        return ExitCode::SUCCESS;
    }
    let launcher = daemon::qemu_launcher(&config);
    match daemon::run(config, launcher) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ftvmd: {error}");
            ExitCode::FAILURE
        }
    }
}

fn fail(error: &dyn std::error::Error) -> ExitCode {
    eprintln!("ftvmd: {}", coordinator::error_chain(error));
    ExitCode::FAILURE
}
