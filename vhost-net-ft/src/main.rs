use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Parser};
use vhost_net_ft::backend::error_chain;
use vhost_net_ft::config::parse_mac;
use vhost_net_ft::{run, Config, Uplink};

/// Serve a guest NIC to QEMU over vhost-user-net and bridge it to a TAP device.
///
/// QEMU connects with `-chardev socket,id=n0,path=SOCKET,reconnect=1 -netdev
/// vhost-user,id=net0,chardev=n0,queues=N -device virtio-net-pci,netdev=net0,mac=MAC` and
/// guest RAM shared (`share=on`); give QEMU the same MAC as `--mac`. The daemon keeps serving
/// across QEMU restarts and reconnects; SIGTERM stops it cleanly.
#[derive(Debug, Parser)]
#[command(name = "vhost-net-ft", version)]
#[command(group(ArgGroup::new("uplink").required(true).args(["tap", "bridge"])))]
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
    /// Control socket (mode 0600): `status` (JSON), `announce` (send a RARP from the MAC on
    /// the TAP; ask the guest to announce itself where the frontend lets us).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let uplink = match (args.tap, args.bridge) {
        (Some(tap), _) => Uplink::Tap(tap),
        (None, Some(bridge)) => Uplink::Bridge(bridge),
        // clap's group makes exactly one of them present.
        (None, None) => return ExitCode::FAILURE,
    };
    let config = Config {
        socket: args.socket,
        uplink,
        mac: args.mac,
        queues: args.queues,
        control: args.control,
    };
    match run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("vhost-net-ft: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
