//! The control socket: a root-only unix socket answering one-line commands with one JSON line.
//!
//! Protocol: the client writes a command and a newline; the daemon answers with a single JSON
//! object and a newline, then closes. `status` returns the NIC's state and counters;
//! `announce` moves the LAN's view of the guest's MAC here (see [`Device::announce`]) and
//! returns `{"ok": true, ...}`; anything refused or unknown gets `{"error": "..."}`.

use std::io;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use log::info;
use serde::Serialize;

use crate::config::{feature_names, format_mac, virtio_features, STATUS_ANNOUNCE, STATUS_LINK_UP};
use crate::device::Device;
use crate::metrics::MetricsSnapshot;
use crate::peer::RedundancyStatus;

/// The commands the control socket understands.
const COMMANDS: &str = "status, announce";

pub use daemon_util::{bind_unix, request, ControlError};

/// The link as the guest and the host see it.
#[derive(Debug, Serialize)]
pub struct Link {
    /// A frontend (QEMU) is connected.
    pub frontend_connected: bool,
    /// `VIRTIO_NET_S_LINK_UP` in the config status.
    pub guest_link_up: bool,
    /// `VIRTIO_NET_S_ANNOUNCE` is set and not yet acknowledged.
    pub announce_pending: bool,
    /// The TAP is administratively up.
    pub tap_up: bool,
    /// The TAP has carrier (we hold it open).
    pub tap_carrier: bool,
    /// The bridge the TAP is a port of now (`null`: none).
    pub tap_master: Option<String>,
}

/// Feature bits, as numbers and names.
#[derive(Debug, Serialize)]
pub struct Features {
    pub offered: String,
    pub acked: String,
    pub acked_names: Vec<String>,
    /// The `TUN_F_*` offloads set on the TAP.
    pub tap_offloads: String,
    /// Length of the virtio-net header on the TAP.
    pub header_len_bytes: usize,
}

/// The answer to `status`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub mac: String,
    pub tap: String,
    pub bridge: Option<String>,
    pub queues: usize,
    pub link: Link,
    pub features: Features,
    /// The uplink watch and the path through the peer host.
    pub redundancy: RedundancyStatus,
    #[serde(flatten)]
    pub metrics: MetricsSnapshot,
}

/// Builds the `status` answer.
pub fn status(device: &Device) -> Status {
    let metrics = device.metrics.snapshot();
    let status_bits = device.status_bits();
    let acked = device.acked_features();
    Status {
        mac: format_mac(device.mac),
        tap: device.tap.name().to_owned(),
        bridge: device.tap.bridge().map(str::to_owned),
        queues: device.queue_pairs,
        link: Link {
            frontend_connected: metrics.connected,
            guest_link_up: status_bits & STATUS_LINK_UP != 0,
            announce_pending: status_bits & STATUS_ANNOUNCE != 0,
            tap_up: device.tap.is_up(),
            tap_carrier: device.tap.has_carrier(),
            tap_master: device.tap.master(),
        },
        features: Features {
            offered: format!("{:#x}", virtio_features(device.queue_pairs)),
            acked: format!("{acked:#x}"),
            acked_names: feature_names(acked),
            tap_offloads: format!("{:#x}", device.tap.offloads()),
            header_len_bytes: device.tap.header_len(),
        },
        redundancy: device.redundancy.status(),
        metrics,
    }
}

/// Serves the control socket on a background thread until the process exits.
pub fn spawn(listener: UnixListener, device: Arc<Device>) -> io::Result<()> {
    daemon_util::serve_commands(listener, move |command| answer(command, &device))
}

fn answer(command: &str, device: &Device) -> io::Result<String> {
    let reply = match command {
        "status" => serde_json::to_string(&status(device)).map_err(io::Error::other)?,
        "announce" => {
            info!("control command: announce");
            match device.announce() {
                Ok(done) => serde_json::json!({
                    "ok": true,
                    "rarp_sent": done.rarp_sent,
                    "guest_asked": done.guest_asked,
                }),
                Err(error) => serde_json::json!({
                    "error": format!("cannot send the RARP on {}: {error}", device.tap.name())
                }),
            }
            .to_string()
        }
        "" => serde_json::json!({ "error": format!("empty command; try: {COMMANDS}") }).to_string(),
        other => serde_json::json!({
            "error": format!("unknown command {other:?}; try: {COMMANDS}")
        })
        .to_string(),
    };
    Ok(reply)
}
