//! `ftvm-checkpoint`: the Level 3 engine of one protected VM (see `docs/LEVEL3.md`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use log::{error, info};

use checkpoint::engine::primary::{self, PrimaryOptions, PrimaryShared};
use checkpoint::engine::secondary::{self, SecondaryOptions};
use checkpoint::engine::{answer_primary, answer_secondary, serve_control};

/// Level 3 of ftvm: continuous checkpoints of a running VM's memory and device state to the
/// peer host, so that the VM survives the loss of its host with its memory, processes and
/// TCP sessions. One engine per protected VM on each host: `primary` where the VM runs,
/// `secondary` on the peer. ftvmd starts them; they can be run by hand for tests.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Where the VM runs: every --interval-ms, stop the guest, copy its dirty pages and
    /// device state, resume it, send the epoch to the secondary; release the NICs' held
    /// output when the secondary acknowledged it. QEMU must run with its RAM in a shared
    /// file (memory-backend-file,mem-path=RAM,share=on) and LD_PRELOAD=libftvm_ram_track.so
    /// with FTVM_RAM_TRACK_SOCKET=--ram-track.
    Primary(PrimaryArgs),
    /// On the peer: keep the replica of the VM's RAM and its last committed device state.
    /// After the primary's loss: `freeze` on the control socket (names the checkpoint to
    /// promote the disks at), then `restore QMP_SOCKET` brings the VM back in a QEMU started
    /// with `-incoming defer` on the replica RAM file. After a restore the engine stays, with
    /// `status` saying `restored`, until it gets SIGTERM.
    Secondary(SecondaryArgs),
}

#[derive(Debug, Args)]
struct Link {
    /// The pair's key file (the same as the disk and NIC daemons').
    #[arg(long)]
    psk_file: PathBuf,
    /// This host's id on the A-links.
    #[arg(long)]
    host_id: String,
    /// The control socket (status; see the role's description).
    #[arg(long)]
    control: PathBuf,
}

#[derive(Debug, Args)]
struct PrimaryArgs {
    /// The VM's name (the checkpoint service is `checkpoint:VM`).
    #[arg(long)]
    vm: String,
    /// QEMU's QMP socket.
    #[arg(long)]
    qmp: PathBuf,
    /// The guest RAM file QEMU maps.
    #[arg(long)]
    ram: PathBuf,
    /// The socket of the RAM tracking library inside QEMU (FTVM_RAM_TRACK_SOCKET).
    #[arg(long)]
    ram_track: PathBuf,
    /// A disk daemon's control socket (repeat per disk): its writes to guest RAM, and its
    /// epochs (the secondary buffers each checkpoint's writes until it commits).
    #[arg(long)]
    disk: Vec<PathBuf>,
    /// A NIC daemon's control socket (repeat per NIC): its writes to guest RAM, and output
    /// commit (the guest's frames wait for the checkpoint that produced them).
    #[arg(long)]
    nic: Vec<PathBuf>,
    /// The secondary's engine, ADDRESS:PORT, once per A-link (one or two).
    #[arg(long, required = true, num_args = 1)]
    peer: Vec<SocketAddr>,
    /// This primary's generation (fencing token; a replica at a higher one refuses it).
    #[arg(long, default_value_t = 1)]
    generation: u64,
    /// Time between two checkpoints, from one stop to the next (milliseconds).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    interval_ms: u64,
    #[command(flatten)]
    link: Link,
}

#[derive(Debug, Args)]
struct SecondaryArgs {
    /// The VM's name.
    #[arg(long)]
    vm: String,
    /// The replica RAM file (created with --ram-mib if missing; a restore's QEMU maps it).
    #[arg(long)]
    ram: PathBuf,
    /// The guest's RAM size in MiB (as QEMU's -m).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    ram_mib: u64,
    /// Where the replica's committed record lives (the last checkpoint's device state).
    #[arg(long)]
    state_dir: PathBuf,
    /// Where the primary's engine connects, ADDRESS:PORT, once per A-link (one or two).
    #[arg(long, required = true, num_args = 1)]
    listen: Vec<SocketAddr>,
    /// The primary host's id: only it may send checkpoints (default: any host with the key).
    #[arg(long)]
    peer_id: Option<String>,
    /// This host's disk daemon (secondary) of each mirrored disk (repeat per disk): a
    /// checkpoint commits only once the disk sealed its epoch, then the disk applies it.
    #[arg(long)]
    disk: Vec<PathBuf>,
    #[command(flatten)]
    link: Link,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    daemon_util::keep_large_buffers();
    let cli = Cli::parse();
    let result = match cli.role {
        Role::Primary(args) => run_primary(args),
        Role::Secondary(args) => run_secondary(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            error!("{failure:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_primary(args: PrimaryArgs) -> anyhow::Result<()> {
    let options = PrimaryOptions {
        vm: args.vm,
        qmp: args.qmp,
        ram: args.ram,
        ram_track: args.ram_track,
        disks: args.disk,
        nics: args.nic,
        peers: args.peer,
        psk_file: args.link.psk_file,
        host_id: args.link.host_id,
        generation: args.generation,
        interval: Duration::from_millis(args.interval_ms),
    };
    let shared = PrimaryShared::new(&options);
    // SIGTERM and SIGINT end Level 3 as `release` does.
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, flag_of(&shared))?;
    }
    let control = Arc::clone(&shared);
    serve_control(&args.link.control, move |line| {
        answer_primary(&control, line)
    })?;
    info!(
        "primary of {}: checkpoints every {} ms to {:?}",
        options.vm, args.interval_ms, options.peers
    );
    let result = primary::run(&options, &shared);
    daemon_util::remove_socket(&args.link.control);
    result
}

/// The `release` flag, as signal-hook wants it.
fn flag_of(shared: &Arc<PrimaryShared>) -> Arc<AtomicBool> {
    shared.release_flag()
}

fn run_secondary(args: SecondaryArgs) -> anyhow::Result<()> {
    let options = SecondaryOptions {
        vm: args.vm,
        ram: args.ram,
        ram_bytes: args.ram_mib << 20,
        state_dir: args.state_dir,
        listen: args.listen,
        psk_file: args.link.psk_file,
        host_id: args.link.host_id,
        peer_id: args.peer_id,
        disks: args.disk,
    };
    let (replica, shared) = secondary::open(&options)?;
    let quit = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&quit))?;
    }
    let control = Arc::clone(&shared);
    serve_control(&args.link.control, move |line| {
        answer_secondary(&control, line)
    })?;
    info!(
        "secondary of {}: replica {} ({} MiB), listening on {:?}",
        options.vm,
        options.ram.display(),
        args.ram_mib,
        options.listen
    );
    let restored = secondary::run(&options, replica, &shared, &quit)?;
    if restored {
        // The engine stays (status says `restored`, with the epoch) until it is stopped:
        // exiting here could end the process before the control socket's thread wrote the
        // answer to `restore`.
        info!(
            "the VM runs on this host now; the replica's role ended (stop this engine when done)"
        );
        while !quit.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    daemon_util::remove_socket(&args.link.control);
    Ok(())
}
