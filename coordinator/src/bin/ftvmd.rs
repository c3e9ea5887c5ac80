use std::process::ExitCode;

use clap::Parser;
use coordinator::cli::FtvmdArgs as Args;
use coordinator::config::Config;
use coordinator::daemon;

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
        let agents = match config.alert.len() {
            0 => String::new(),
            count => format!(", {count} alert agent(s)"),
        };
        println!(
            "{}: valid ({} VM(s), peer {}{agents})",
            args.config.display(),
            config.vm.len(),
            config.peer.name
        );
        return ExitCode::SUCCESS;
    }
    // Before any thread starts: they all inherit it (children are put back to 0).
    coordinator::raise_priority("ftvmd");
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
