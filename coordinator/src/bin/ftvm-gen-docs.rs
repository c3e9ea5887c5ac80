use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Writes the man pages (section 8) and the bash, zsh and fish completions of ftvm, ftvmd
/// and ftvm-witness under DIR, laid out as under /usr/share: man/man8/,
/// bash-completion/completions/, zsh/vendor-completions/, fish/vendor_completions.d/.
///
/// Example: `cargo run -p coordinator --bin ftvm-gen-docs -- target/docs`, then
/// `man -l target/docs/man/man8/ftvm.8`.
#[derive(Debug, Parser)]
#[command(name = "ftvm-gen-docs", version)]
struct Args {
    /// Folder to write into (created if missing; files in it are replaced).
    #[arg(value_name = "DIR")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match coordinator::manual::generate(&args.out) {
        Ok(made) => {
            println!("{} files under {}", made.len(), args.out.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("ftvm-gen-docs: {}", coordinator::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
