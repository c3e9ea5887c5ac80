//! `ftvm-web`: the web console. See `lib.rs` and docs/OPERATIONS.md ("Web console").

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// ftvm's web console: every protected pair on one page over HTTPS, with a login, live
/// updates, the operator's actions (protect, unprotect, planned failover, migrate, host
/// maintenance) behind a confirmation, and an audit log of every login and action.
///
/// It reaches each host's ftvmd through the control API over TCP (the host's [host]
/// api_listen and api_key_file) or, on the console's own host, its control socket. A
/// separate process: stopping or crashing it never affects failover.
#[derive(Debug, Parser)]
#[command(name = "ftvm-web", version)]
struct Args {
    /// The configuration file (TOML; see docs/OPERATIONS.md, "Web console").
    #[arg(
        long,
        short,
        value_name = "FILE",
        default_value = "/etc/ftvm/ftvm-web.toml"
    )]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read a password from standard input (one line) and print its argon2id hash for a
    /// [[user]] password_hash.
    HashPassword,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ftvm-web: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    if let Some(Command::HashPassword) = args.command {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|error| format!("cannot read the password: {error}"))?;
        let password = line.trim_end_matches(['\n', '\r']);
        if password.is_empty() {
            return Err("empty password".into());
        }
        println!("{}", ftvm_web::auth::hash_password(password)?);
        return Ok(());
    }
    let config = ftvm_web::config::Config::load(&args.config)
        .map_err(|error| coordinator::error_chain(&error))?;
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    ftvm_web::run(config)
}
