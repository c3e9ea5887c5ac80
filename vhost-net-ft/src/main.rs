use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Parser};
use vhost_net_ft::backend::error_chain;
use vhost_net_ft::config::parse_mac;
use vhost_net_ft::peer::PeerSettings;
use vhost_net_ft::{run, Config, Uplink};

/// Serve a guest NIC to QEMU over vhost-user-net and bridge it to a TAP device.
///
/// QEMU connects with `-chardev socket,id=n0,path=SOCKET,reconnect=1 -netdev
/// vhost-user,id=net0,chardev=n0,queues=N -device virtio-net-pci,netdev=net0,mac=MAC` and
/// guest RAM shared (`share=on`); give QEMU the same MAC as `--mac`. The daemon keeps serving
/// across QEMU restarts and reconnects; SIGTERM stops it cleanly.
///
/// Redundant uplink (Level 2): run the NIC's daemon on both hosts of the pair with the same
/// `--mac`, each with `--uplink` (its bridge's port to the LAN), `--listen` (its own A-link
/// addresses), `--peer` (the other's) and the pair's `--psk-file`. Where the guest runs, a
/// failed uplink moves the guest's traffic through the peer host's uplink within a few
/// milliseconds, with a RARP so the LAN follows the MAC; it moves back once the
/// uplink has been up for 0.5 s. Where no guest runs, the daemon waits and relays. `status`
/// on the control socket shows the path (`redundancy.path`: local or peer).
#[derive(Debug, Parser)]
#[command(name = "vhost-net-ft", version)]
#[command(group(ArgGroup::new("device").required(true).args(["tap", "bridge"])))]
struct Args {
    /// vhost-user socket path QEMU connects to (created; a stale file is replaced).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// TAP device to use: an existing one is attached to, a missing one created (and gone
    /// when the daemon exits). Brought up either way.
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// Bridge to put the guest on: a TAP `ftvm-<pid>-<n>` is created, brought up, made a
    /// port of BRIDGE, and deleted when the daemon exits.
    #[arg(long, value_name = "BRIDGE")]
    bridge: Option<String>,
    /// The guest's MAC address (default: a locally administered address derived from the
    /// socket path). Give QEMU the same with `-device virtio-net-pci,mac=MAC`.
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    mac: Option<[u8; 6]>,
    /// Queue pairs (1-16), each with its own thread and TAP queue. QEMU's `queues` must not
    /// exceed it; more than one needs `mq=on` on the device.
    #[arg(long, value_name = "N", default_value_t = 1)]
    queues: usize,
    /// Control socket (mode 0600): `status` (JSON), `announce` (send a RARP from the MAC
    /// where the guest's frames leave now: the TAP, or the peer host on the redundant path;
    /// ask the guest to announce itself where the frontend lets us); Level 3: `dirty-pages`
    /// (the guest pages written since the last call), `output-commit on EPOCH|off`,
    /// `epoch-end N`, `commit N` (hold the guest's frames until their epoch commits).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// The bridge's port to the LAN (e.g. a physical NIC or bond), watched for a lost link or
    /// carrier. Without it the local path is always taken.
    #[arg(long, value_name = "IFNAME")]
    uplink: Option<String>,
    /// The same NIC's daemon on the peer host, on an A-link (give twice for two links).
    #[arg(long, value_name = "ADDR:PORT", requires_all = ["listen", "psk_file"])]
    peer: Vec<SocketAddr>,
    /// Where to accept the peer's daemon (this host's A-link addresses; up to two).
    #[arg(long, value_name = "ADDR:PORT", requires_all = ["peer", "psk_file"])]
    listen: Vec<SocketAddr>,
    /// Pre-shared key of the host pair (at least 16 bytes; the same file on both hosts).
    #[arg(long, value_name = "FILE", requires_all = ["peer", "listen"])]
    psk_file: Option<PathBuf>,
    /// This host's name on the peer link (default: the host name).
    #[arg(long, value_name = "NAME")]
    host_id: Option<String>,
    /// Level 3 output commit: the most bytes of guest frames held for uncommitted epochs
    /// (at least 1 MiB). When it is reached, the guest's frames wait in its TX ring until a
    /// commit frees room (none is dropped).
    #[arg(long, value_name = "BYTES", default_value_t = vhost_net_ft::output::DEFAULT_BUFFER_BYTES)]
    output_buffer_bytes: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    daemon_util::keep_large_buffers();
    let uplink = match (args.tap, args.bridge) {
        (Some(tap), _) => Uplink::Tap(tap),
        (None, Some(bridge)) => Uplink::Bridge(bridge),
        // clap's group makes exactly one of them present.
        (None, None) => return ExitCode::FAILURE,
    };
    if args.peer.len() > 2 || args.listen.len() > 2 {
        eprintln!("vhost-net-ft: --peer and --listen take at most two addresses (one per A-link)");
        return ExitCode::from(2);
    }
    let peer = args.psk_file.map(|psk_file| PeerSettings {
        peers: args.peer,
        listen: args.listen,
        psk_file,
        host_id: args.host_id.unwrap_or_else(host_name),
    });
    let config = Config {
        socket: args.socket,
        uplink,
        mac: args.mac,
        queues: args.queues,
        control: args.control,
        watch_uplink: args.uplink,
        peer,
        output_buffer_bytes: args.output_buffer_bytes,
    };
    match run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("vhost-net-ft: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
