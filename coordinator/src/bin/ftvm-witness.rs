use std::process::ExitCode;

use clap::Parser;
use coordinator::cli::WitnessArgs as Args;
use coordinator::witness_daemon::{run, WitnessConfig, WitnessKeys};

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    coordinator::raise_priority("ftvm-witness");
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
