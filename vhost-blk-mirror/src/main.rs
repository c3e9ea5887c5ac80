use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vhost_blk_mirror::{run, Config};

/// Serve a guest disk to QEMU over vhost-user-blk from a raw image file or block device.
///
/// QEMU connects with `-chardev socket,id=c0,path=SOCKET,reconnect=1
/// -device vhost-user-blk-pci,chardev=c0` and guest RAM shared (`share=on`). The daemon keeps
/// serving across QEMU restarts and reconnects; SIGTERM stops it cleanly.
#[derive(Debug, Parser)]
#[command(name = "vhost-blk-mirror", version)]
struct Args {
    /// vhost-user socket path QEMU connects to (created; a stale file is replaced).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Raw disk image file or block device to serve.
    #[arg(long, value_name = "FILE")]
    image: PathBuf,
    /// Number of virtqueues, each served by its own thread (1-16).
    #[arg(long, value_name = "N", default_value_t = 1)]
    queues: usize,
    /// Serve the disk read-only: the guest sees a read-only device, writes fail.
    #[arg(long)]
    read_only: bool,
    /// Serial number the guest reads (up to 20 bytes; default: the image's file name).
    #[arg(long, value_name = "ID")]
    serial: Option<String>,
    /// Control socket answering `status` with JSON (mode 0600).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let config = Config {
        socket: args.socket,
        image: args.image,
        queues: args.queues,
        read_only: args.read_only,
        serial: args.serial,
        control: args.control,
    };
    match run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("vhost-blk-mirror: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its sources on one line: "cannot open image x: No such file or directory".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
