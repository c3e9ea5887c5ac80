//! The control socket: a root-only unix socket answering one-line commands with one JSON line.
//!
//! The commands, the replies and the status are `control_protocol::disk`'s types, which
//! ftvmd reads too: `status` answers [`disk::Status`]; `promote`, `demote`,
//! `continue-degraded`, `fence` (the coordinator's orders) and `repair` (the operator's,
//! after replacing a failed local disk) answer [`disk::Done`] (`{"ok": true, "result":
//! "..."}`); `dirty-pages` (the checkpoint engine's, Level 3) answers [`disk::DirtyPages`];
//! the checkpoint engine's Level 3 epoch commands (`epoch on|off`, `epoch-end`, `commit`,
//! `wait-sealed`) answer [`disk::Done`]; `snapshot create|delete|revert NAME` answer
//! [`disk::Done`] and `snapshot list` [`disk::Snapshots`];
//! anything refused or not understood gets `{"error": "..."}`.

use std::io;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use control_protocol::{disk, Reply};
use daemon_util::guest_pages::PAGE_SIZE;
use log::info;

use crate::execute::Disk;
use crate::metrics::MetricsSnapshot;

pub use daemon_util::{bind_unix, request, ControlError};

/// Builds the `status` answer for a disk.
pub fn status(disk: &Disk, queues: usize) -> disk::Status {
    // Every counter is named: one added to the metrics without a place in the protocol's
    // status does not compile.
    let MetricsSnapshot {
        read_requests,
        write_requests,
        flush_requests,
        discard_requests,
        write_zeroes_requests,
        get_id_requests,
        read_bytes,
        written_bytes,
        rejected_requests,
        io_errors,
        connections,
        connected,
        held_kicks,
    } = disk.metrics.snapshot();
    let image = disk.mirror.image();
    disk::Status {
        image: image.path().display().to_string(),
        image_kind: image.kind(),
        size_bytes: image.size_bytes(),
        read_only: image.read_only(),
        serial: disk.serial.clone(),
        queues,
        read_requests,
        write_requests,
        flush_requests,
        discard_requests,
        write_zeroes_requests,
        get_id_requests,
        read_bytes,
        written_bytes,
        rejected_requests,
        io_errors,
        connections,
        connected,
        held_kicks,
        replication: disk.mirror.status(),
    }
}

/// Builds the `dirty-pages` answer: the guest pages written since the last one, cleared.
pub fn dirty_pages(disk: &Disk) -> Result<disk::DirtyPages, String> {
    let files = disk.guest_pages.take().map_err(|error| error.to_string())?;
    Ok(disk::DirtyPages {
        page_size: PAGE_SIZE,
        files: files
            .into_iter()
            .map(|written| disk::DirtyFile {
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
}

/// Serves the control socket on a background thread until the process exits.
pub fn spawn(listener: UnixListener, disk: Arc<Disk>, queues: usize) -> io::Result<()> {
    daemon_util::serve_commands(listener, move |line| answer(line, &disk, queues))
}

fn answer(line: &str, disk: &Disk, queues: usize) -> io::Result<String> {
    match line.parse::<disk::Command>() {
        Ok(disk::Command::Status) => Reply::Answer(status(disk, queues)).to_line(),
        Ok(disk::Command::DirtyPages) => match dirty_pages(disk) {
            Ok(pages) => Reply::Answer(pages).to_line(),
            Err(error) => Reply::<disk::DirtyPages>::Refused(error).to_line(),
        },
        Ok(disk::Command::Epoch(order)) => {
            log::debug!("control command: {order}");
            match disk.mirror.epoch_command(order) {
                Ok(result) => Reply::Answer(disk::Done { ok: true, result }).to_line(),
                Err(error) => Reply::<disk::Done>::Refused(error).to_line(),
            }
        }
        Ok(disk::Command::Order(order)) => {
            info!("control command: {order}");
            match disk.mirror.command(order) {
                Ok(result) => Reply::Answer(disk::Done { ok: true, result }).to_line(),
                Err(error) => Reply::<disk::Done>::Refused(error).to_line(),
            }
        }
        Ok(disk::Command::Snapshot(disk::SnapshotOrder::List)) => {
            match crate::snapshot::list(disk.mirror.image().path()) {
                Ok(snapshots) => Reply::Answer(snapshots).to_line(),
                Err(error) => Reply::<disk::Snapshots>::Refused(error).to_line(),
            }
        }
        Ok(disk::Command::Snapshot(order)) => {
            info!("control command: {order}");
            let attached = disk.metrics.snapshot().connected;
            match disk.mirror.snapshot_command(&order, attached) {
                Ok(result) => Reply::Answer(disk::Done { ok: true, result }).to_line(),
                Err(error) => Reply::<disk::Done>::Refused(error).to_line(),
            }
        }
        Err(error) => Reply::<disk::Done>::Refused(error.to_string()).to_line(),
    }
    .map_err(io::Error::other)
}
