//! The control socket: a root-only unix socket answering one-line commands with one JSON line.
//!
//! The commands, the replies and the status are `control_protocol::nic`'s types, which
//! ftvmd reads too: `status` answers [`nic::Status`] (the NIC's state and counters);
//! `announce` moves the LAN's view of the guest's MAC here (see [`Device::announce`]) and
//! answers [`nic::Announced`]; anything refused or not understood gets `{"error": "..."}`.

use std::io;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use control_protocol::{nic, Reply};
use log::info;

use crate::config::{feature_names, format_mac, virtio_features, STATUS_ANNOUNCE, STATUS_LINK_UP};
use crate::device::Device;
use crate::metrics::MetricsSnapshot;

pub use daemon_util::{bind_unix, request, ControlError};

/// Builds the `status` answer.
pub fn status(device: &Device) -> nic::Status {
    // Every counter is named: one added to the metrics without a place in the protocol's
    // status does not compile.
    let MetricsSnapshot {
        rx_packets,
        rx_bytes,
        rx_dropped_no_buffers,
        rx_waits_for_buffers,
        rx_bad_buffers,
        tap_read_errors,
        tx_packets,
        tx_bytes,
        tx_dropped_malformed,
        tap_write_errors,
        ctrl_commands,
        announcements,
        connections,
        connected,
        peer_tx_packets,
        peer_tx_dropped,
        peer_rx_packets,
        peer_rx_dropped,
        relay_to_lan_packets,
        relay_to_peer_packets,
    } = device.metrics.snapshot();
    let status_bits = device.status_bits();
    let acked = device.acked_features();
    nic::Status {
        mac: format_mac(device.mac),
        tap: device.tap.name().to_owned(),
        bridge: device.tap.bridge().map(str::to_owned),
        queues: device.queue_pairs,
        link: nic::Link {
            frontend_connected: connected,
            guest_link_up: status_bits & STATUS_LINK_UP != 0,
            announce_pending: status_bits & STATUS_ANNOUNCE != 0,
            tap_up: device.tap.is_up(),
            tap_carrier: device.tap.has_carrier(),
            tap_master: device.tap.master(),
        },
        features: nic::Features {
            offered: format!("{:#x}", virtio_features(device.queue_pairs)),
            acked: format!("{acked:#x}"),
            acked_names: feature_names(acked),
            tap_offloads: format!("{:#x}", device.tap.offloads()),
            header_len_bytes: device.tap.header_len(),
        },
        redundancy: device.redundancy.status(),
        rx_packets,
        rx_bytes,
        rx_dropped_no_buffers,
        rx_waits_for_buffers,
        rx_bad_buffers,
        tap_read_errors,
        tx_packets,
        tx_bytes,
        tx_dropped_malformed,
        tap_write_errors,
        ctrl_commands,
        announcements,
        connections,
        connected,
        peer_tx_packets,
        peer_tx_dropped,
        peer_rx_packets,
        peer_rx_dropped,
        relay_to_lan_packets,
        relay_to_peer_packets,
    }
}

/// Serves the control socket on a background thread until the process exits.
pub fn spawn(listener: UnixListener, device: Arc<Device>) -> io::Result<()> {
    daemon_util::serve_commands(listener, move |line| answer(line, &device))
}

fn answer(line: &str, device: &Device) -> io::Result<String> {
    match line.parse::<nic::Command>() {
        Ok(nic::Command::Status) => Reply::Answer(status(device)).to_line(),
        Ok(nic::Command::Announce) => {
            info!("control command: announce");
            match device.announce() {
                Ok(done) => Reply::Answer(nic::Announced {
                    ok: true,
                    rarp_sent: done.rarp_sent,
                    guest_asked: done.guest_asked,
                })
                .to_line(),
                Err(error) => Reply::<nic::Announced>::Refused(format!(
                    "cannot send the RARP on {}: {error}",
                    device.tap.name()
                ))
                .to_line(),
            }
        }
        Err(error) => Reply::<nic::Announced>::Refused(error.to_string()).to_line(),
    }
    .map_err(io::Error::other)
}
