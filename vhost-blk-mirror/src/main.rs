use std::path::PathBuf;
use std::process::ExitCode;

use std::net::SocketAddr;

use clap::Parser;
use vhost_blk_mirror::mirror::primary::ResyncOptions;
use vhost_blk_mirror::replication::{LinkEncryption, ReplicationConfig, RoleKind};
use vhost_blk_mirror::{run, Config};

/// Serve a guest disk to QEMU over vhost-user-blk from a raw image file or block device, and
/// mirror it synchronously to a peer host.
///
/// QEMU connects with `-chardev socket,id=c0,path=SOCKET,reconnect=1
/// -device vhost-user-blk-pci,chardev=c0` and guest RAM shared (`share=on`). The daemon keeps
/// serving across QEMU restarts and reconnects; SIGTERM stops it cleanly.
///
/// Replication: run `--role secondary --listen ADDR` on the peer host and `--role primary
/// --peer ADDR` here, both with the same `--psk-file`. A write completes for the guest only
/// when it is on both disks. If the peer is lost, completions are held until the control
/// socket gets `continue-degraded` (run alone, record what changed) or `fence`.
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
    /// Control socket (mode 0600): `status` (JSON), the coordinator's commands `promote`,
    /// `demote`, `continue-degraded`, `fence`, `repair` after a local disk failure, `settle`
    /// before a planned handover, and the
    /// checkpoint engine's `dirty-pages`, `epoch on|off`, `epoch-end`, `commit`,
    /// `wait-sealed`.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Role in replication.
    #[arg(long, value_enum, default_value_t = RoleKind::Standalone)]
    role: RoleKind,
    /// Primary: the secondary's address on an A-link (give twice for two links).
    #[arg(long, value_name = "ADDR:PORT")]
    peer: Vec<SocketAddr>,
    /// Secondary: address to accept the primary on (give twice for two links). A disk
    /// given both `--peer` and `--listen` changes roles in place as often as asked.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,
    /// Pre-shared key of this host pair (at least 16 bytes; same file on both hosts).
    #[arg(long, value_name = "FILE")]
    psk_file: Option<PathBuf>,
    /// Encryption of the replication link. `off` sends the guest's disk data across the
    /// A-links in clear (still authenticated: tampered, replayed or reordered frames are
    /// refused): anyone on those links reads it. For measurements and trusted links only.
    /// Both hosts must be set alike; a peer set otherwise is refused in the handshake.
    #[arg(long, value_enum, value_name = "ON|OFF", default_value_t = LinkEncryption::On)]
    link_encryption: LinkEncryption,
    /// Replication metadata: generation, disk state, out-of-sync bitmap
    /// (default: IMAGE.ftvm-meta).
    #[arg(long, value_name = "FILE")]
    meta: Option<PathBuf>,
    /// Limit of the background resync, bytes per second (suffixes K, M, G); 0 = none.
    /// Without it the resync runs at the link's speed (blocks of up to 1 MiB, 4 to 16 MiB
    /// in flight from the measured round trip) but keeps one block in flight while guest
    /// writes are: a busy guest slows the resync, not the other way round.
    #[arg(long, value_name = "RATE", default_value = "0", value_parser = parse_rate)]
    resync_rate_limit: u64,
    /// Resync only the chunks whose BLAKE3 hash differs from the secondary's (reads both
    /// disks, sends less; for a secondary that is mostly current already).
    #[arg(long)]
    resync_compare: bool,
    /// This host's name on the replication link (default: the host name).
    #[arg(long, value_name = "NAME")]
    host_id: Option<String>,
    /// File holding this boot's id, recorded in the metadata while the copy is in use: a
    /// different id at the next start means the host went down under the daemon, and
    /// writes it had not flushed may be gone (the copy is then resynced before it counts
    /// as UpToDate). Test rigs whose "hosts" share one kernel give each host a file (also
    /// through the environment, so that it reaches daemons that ftvmd starts).
    #[arg(
        long,
        value_name = "FILE",
        env = "FTVM_BOOT_ID_FILE",
        default_value = vhost_blk_mirror::mirror::secondary::KERNEL_BOOT_ID
    )]
    boot_id_file: PathBuf,
    /// Level 3, secondary: the epoch journal, where writes wait for their epoch's commit
    /// (default: IMAGE.ftvm-journal; created when the primary first starts epochs).
    #[arg(long, value_name = "FILE")]
    epoch_journal: Option<PathBuf>,
    /// Size of the epoch journal, preallocated (suffixes K, M, G; at least 33M). When it is
    /// full the secondary stops acknowledging until a commit frees room.
    #[arg(long, value_name = "BYTES", default_value = "1G", value_parser = parse_rate)]
    epoch_journal_bytes: u64,
    /// Data of unapplied epochs also kept in memory (suffixes K, M, G); beyond it, a commit
    /// reads the journal back.
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = parse_rate)]
    epoch_memory_bytes: u64,
}

/// Parses `100M`, `1G`, `512K` or a plain number of bytes.
fn parse_rate(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, multiplier) = match text.char_indices().last() {
        Some((index, 'K' | 'k')) => (&text[..index], 1u64 << 10),
        Some((index, 'M' | 'm')) => (&text[..index], 1 << 20),
        Some((index, 'G' | 'g')) => (&text[..index], 1 << 30),
        _ => (text, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|value| value.checked_mul(multiplier))
        .ok_or_else(|| format!("{text:?} is not a rate like 100M"))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    daemon_util::keep_large_buffers();
    let service = format!(
        "blk:{}",
        args.serial.clone().unwrap_or_else(|| args
            .image
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default())
    );
    let replication = ReplicationConfig {
        role: args.role,
        peers: args.peer,
        listen: args.listen,
        psk_file: args.psk_file,
        link_encryption: args.link_encryption,
        metadata: args.meta,
        resync: ResyncOptions {
            rate_limit: args.resync_rate_limit,
            compare: args.resync_compare,
        },
        host_id: args.host_id.unwrap_or_else(host_name),
        service,
        boot_id_file: args.boot_id_file,
        epoch_journal: args.epoch_journal,
        epoch_journal_bytes: args.epoch_journal_bytes,
        epoch_memory_bytes: args.epoch_memory_bytes,
    };
    let config = Config {
        socket: args.socket,
        image: args.image,
        queues: args.queues,
        read_only: args.read_only,
        serial: args.serial,
        control: args.control,
        replication,
    };
    match run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!(
                "vhost-blk-mirror: {}",
                replication_link::error_chain(&error)
            );
            ExitCode::FAILURE
        }
    }
}
