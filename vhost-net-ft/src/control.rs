//! The control socket: a root-only unix socket answering one-line commands with one JSON line.
//!
//! The commands, the replies and the status are `control_protocol::nic`'s types, which
//! ftvmd reads too: `status` answers [`nic::Status`] (the NIC's state and counters);
//! `announce` moves the LAN's view of the guest's MAC here (see [`Device::announce`]) and
//! answers [`nic::Announced`]; `dirty-pages` answers [`nic::DirtyPages`] (the guest pages
//! this daemon wrote since the last call); `output-commit on EPOCH|off`, `epoch-end N` and
//! `commit N` drive Level 3 output commit ([`crate::output`]) and answer
//! [`nic::OutputCommitted`]; `handover on|off` starts or ends a move's relay of the stopped
//! guest's frames to the peer ([`crate::peer::handover`]) and answers [`nic::Handover`];
//! anything refused or not understood gets `{"error": "..."}`.

use std::io;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use control_protocol::{nic, Reply};
use daemon_util::guest_pages::PAGE_SIZE;
use log::info;

use crate::config::{feature_names, format_mac, virtio_features, STATUS_ANNOUNCE, STATUS_LINK_UP};
use crate::device::Device;
use crate::metrics::MetricsSnapshot;
use crate::output::EpochError;
use crate::sink::send_now;

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
        interrupts_deferred,
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
        peer_tx_messages,
        peer_tx_dropped,
        peer_rx_packets,
        peer_rx_dropped,
        relay_to_lan_packets,
        relay_to_peer_packets,
        handover_relayed_packets,
        handover_relay_dropped,
        handover_rx_packets,
        handover_rx_dropped,
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
        output_commit: device.output.state(),
        rx_packets,
        rx_bytes,
        rx_dropped_no_buffers,
        rx_waits_for_buffers,
        interrupts_deferred,
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
        peer_tx_messages,
        peer_tx_dropped,
        peer_rx_packets,
        peer_rx_dropped,
        relay_to_lan_packets,
        relay_to_peer_packets,
        handover_relayed_packets,
        handover_relay_dropped,
        handover_rx_packets,
        handover_rx_dropped,
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
        Ok(nic::Command::DirtyPages) => dirty_pages(device),
        Ok(nic::Command::OutputCommitOn(epoch)) => {
            info!("control command: output-commit on {epoch}");
            epoch_reply(device.output.start(epoch))
        }
        Ok(nic::Command::OutputCommitOff) => {
            let done = device
                .output
                .stop(&mut |queue, frame| send_now(device, queue, frame));
            info!(
                "control command: output-commit off ({} held frame(s) released)",
                done.released_frames
            );
            Reply::Answer(done).to_line()
        }
        Ok(nic::Command::EpochEnd(epoch)) => epoch_reply(device.output.end(epoch)),
        Ok(nic::Command::Commit(epoch)) => epoch_reply(
            device
                .output
                .commit(epoch, &mut |queue, frame| send_now(device, queue, frame)),
        ),
        Ok(nic::Command::Handover(on)) => handover(device, on),
        Err(error) => Reply::<nic::Announced>::Refused(error.to_string()).to_line(),
    }
    .map_err(io::Error::other)
}

/// `handover on|off`: a move's source relays the stopped guest's frames to the peer, or no
/// longer.
fn handover(device: &Device, on: bool) -> Result<String, serde_json::Error> {
    info!(
        "control command: handover {}",
        if on { "on" } else { "off" }
    );
    let redundancy = &device.redundancy;
    if !on {
        redundancy.stop_handover("handover off");
    } else if let Err(why) = redundancy.start_handover() {
        return Reply::<nic::Handover>::Refused(format!("handover on: {why}")).to_line();
    }
    Reply::Answer(nic::Handover {
        relaying: redundancy.handover_relaying(),
    })
    .to_line()
}

/// The answer to an output commit command, or its refusal.
fn epoch_reply(
    result: Result<nic::OutputCommitted, EpochError>,
) -> Result<String, serde_json::Error> {
    match result {
        Ok(done) => Reply::Answer(done).to_line(),
        Err(error) => Reply::<nic::OutputCommitted>::Refused(error.to_string()).to_line(),
    }
}

/// `dirty-pages`: reads and clears the pages of guest RAM this daemon wrote.
fn dirty_pages(device: &Device) -> Result<String, serde_json::Error> {
    match device.guest_pages.take() {
        Ok(files) => Reply::Answer(nic::DirtyPages {
            page_size: PAGE_SIZE,
            files: files
                .into_iter()
                .map(|written| nic::DirtyFile {
                    dev: written.file.dev,
                    ino: written.file.ino,
                    ranges: written
                        .ranges
                        .into_iter()
                        .map(|(offset, len)| [offset, len])
                        .collect(),
                })
                .collect(),
        })
        .to_line(),
        Err(error) => Reply::<nic::DirtyPages>::Refused(error.to_string()).to_line(),
    }
}
