//! The NIC as it outlives frontend connections: its TAP, MAC, config status, negotiated
//! features and counters. Shared by the queue workers, the control socket and the daemon.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use daemon_util::guest_pages::GuestPages;
use log::info;
use virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_ANNOUNCE;

use crate::config::tap_offloads;
use crate::config::{config_space, format_mac, CONFIG_SPACE_LEN, STATUS_ANNOUNCE, STATUS_LINK_UP};
use crate::frame::{header_len, rarp_frame, RARP_FRAME_LEN, VNET_HDR_LEN};
use crate::metrics::{Metrics, RateLimitedLog};
use crate::output::OutputCommit;
use crate::peer::{Path, Redundancy};
use crate::sink::TxFrame;
use crate::tap::{Tap, TapError};
use replication_link::error_chain;

/// What `announce` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announcement {
    /// A RARP from the guest's MAC went out on the TAP.
    pub rarp_sent: bool,
    /// `VIRTIO_NET_S_ANNOUNCE` was set in the config status (the guest negotiated
    /// GUEST_ANNOUNCE); the guest sees it when its frontend reads our config space.
    pub guest_asked: bool,
}

#[derive(Debug)]
pub struct Device {
    pub tap: Arc<Tap>,
    pub mac: [u8; 6],
    pub queue_pairs: usize,
    pub metrics: Metrics,
    /// Log of guest (and network) faults: at most 10 lines a second.
    pub fault_log: RateLimitedLog,
    /// `virtio_net_config.status`.
    status: AtomicU16,
    /// The features the current frontend acked (0 before and between connections).
    acked_features: AtomicU64,
    /// Held while the TAP's header length and offloads change: the frontend's features and
    /// the standby relay (see [`Device::configure_idle_tap`]) both set them.
    tap_settings: Mutex<()>,
    /// The uplink watch and the path through the peer host.
    pub redundancy: Redundancy,
    /// Level 3 output commit: the guest's frames held until their epoch commits.
    pub output: OutputCommit,
    /// The pages of guest RAM this daemon wrote, for `dirty-pages` (over every memory table
    /// and every frontend connection).
    pub guest_pages: GuestPages,
}

impl Device {
    /// `uplink`: the interface to watch (`--uplink`); `output_buffer_bytes`: the output
    /// commit buffer's limit (`--output-buffer-bytes`).
    pub fn new(
        tap: Tap,
        mac: [u8; 6],
        queue_pairs: usize,
        uplink: Option<String>,
        output_buffer_bytes: usize,
    ) -> std::io::Result<Device> {
        Ok(Device {
            tap: Arc::new(tap),
            mac,
            queue_pairs,
            metrics: Metrics::default(),
            fault_log: RateLimitedLog::new(Duration::from_secs(1), 10),
            status: AtomicU16::new(STATUS_LINK_UP),
            acked_features: AtomicU64::new(0),
            tap_settings: Mutex::new(()),
            redundancy: Redundancy::new(uplink)?,
            output: OutputCommit::new(queue_pairs, output_buffer_bytes)?,
            guest_pages: GuestPages::new(),
        })
    }

    /// A guest uses this daemon: a frontend is connected **and** started the device (acked
    /// its features, which QEMU does when the device starts: the guest's driver is ready
    /// and the VM runs). A frontend that only connected is held: a destination QEMU
    /// started ahead of a move (`-incoming defer`) negotiates and sends nothing else until
    /// its restored guest runs. Meanwhile this daemon stays in standby (it relays for the
    /// peer, speaks for no MAC) and its queues move no frame.
    pub fn guest_attached(&self) -> bool {
        self.metrics.connected.load(Ordering::Relaxed) && self.acked_features() != 0
    }

    /// The frontend acked `features`: stores them and sets the TAP's header length and
    /// offloads to match. A guest (re)starting here ends a move's relay (the move did not
    /// happen: the guest reads the TAP itself again).
    pub fn apply_acked_features(&self, features: u64) -> Result<(), TapError> {
        let _settings = self
            .tap_settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.redundancy
            .stop_handover("the guest starts here again (its frontend acked features)");
        self.set_acked_features(features);
        let header = self.tap.set_header_len(header_len(features));
        let offloads = self.tap.set_offloads(tap_offloads(features));
        header.and(offloads)
    }

    /// Without a guest (no frontend acked features; one may be connected and held): 12-byte
    /// headers and `offloads` on the TAP, for relaying the peer's frames. Leaves the TAP
    /// alone once a frontend acked its features, so a guest arriving meanwhile keeps its
    /// own settings (the lock orders the two).
    pub fn configure_idle_tap(&self, offloads: u32) -> Result<(), TapError> {
        let _settings = self
            .tap_settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.acked_features() != 0 {
            return Ok(());
        }
        self.tap.set_header_len(VNET_HDR_LEN)?;
        self.tap.set_offloads(offloads)
    }

    /// A warning caused by the guest, the peer or the network: at most 10 lines a second,
    /// with the count of the lines left out.
    pub fn log_fault(&self, message: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.fault_log.admit() {
            if suppressed > 0 {
                log::warn!("{message} ({suppressed} similar lines suppressed)");
            } else {
                log::warn!("{message}");
            }
        }
    }

    /// The config space as the guest reads it now.
    pub fn config(&self) -> [u8; CONFIG_SPACE_LEN] {
        let pairs = u16::try_from(self.queue_pairs).unwrap_or(u16::MAX);
        config_space(self.mac, self.status_bits(), pairs)
    }

    pub fn status_bits(&self) -> u16 {
        self.status.load(Ordering::Relaxed)
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features.load(Ordering::Relaxed)
    }

    pub fn set_acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    /// The driver acknowledged an announcement (control queue ANNOUNCE_ACK).
    pub fn clear_announce(&self) {
        self.status.fetch_and(!STATUS_ANNOUNCE, Ordering::Relaxed);
    }

    /// Moves the LAN's view of the guest's MAC to where its frames leave now: sends a RARP
    /// from the MAC on the TAP (what QEMU's VHOST_USER_SEND_RARP asks a backend to do), or
    /// through the peer host while the guest's traffic goes there; when the guest negotiated
    /// GUEST_ANNOUNCE, also sets `VIRTIO_NET_S_ANNOUNCE` so that it announces itself.
    pub fn announce(&self) -> std::io::Result<Announcement> {
        let path = if self.redundancy.via_peer() {
            Path::Peer
        } else {
            Path::Local
        };
        self.announce_on(path)
    }

    /// [`Device::announce`] on a given path.
    pub fn announce_on(&self, path: Path) -> std::io::Result<Announcement> {
        let guest_asked = self.acked_features() & (1u64 << VIRTIO_NET_F_GUEST_ANNOUNCE) != 0;
        if guest_asked {
            self.status.fetch_or(STATUS_ANNOUNCE, Ordering::Relaxed);
        }
        let header_len = match path {
            Path::Local => self.tap.header_len(),
            Path::Peer => VNET_HDR_LEN,
        };
        let mut bytes = vec![0u8; header_len + RARP_FRAME_LEN];
        bytes[header_len..].copy_from_slice(&rarp_frame(self.mac));
        let through = match path {
            Path::Local => {
                self.tap.write_frame(0, &bytes)?;
                self.tap.name().to_owned()
            }
            Path::Peer => {
                self.redundancy
                    .send_to_lan(TxFrame::new(bytes, header_len))
                    .map_err(|error| std::io::Error::other(error_chain(&error)))?;
                "the peer host".to_owned()
            }
        };
        Metrics::add(&self.metrics.announcements, 1);
        info!(
            "announced {} through {through} (RARP sent{})",
            format_mac(self.mac),
            if guest_asked {
                ", guest asked to announce"
            } else {
                ""
            }
        );
        Ok(Announcement {
            rarp_sent: true,
            guest_asked,
        })
    }

    /// The frontend left (or a new one starts): no features, so the TAP hands over plain
    /// frames only, and frames the peer relayed for the old guest are dropped.
    pub fn clear_acked_features(&self) -> Result<(), TapError> {
        let _settings = self
            .tap_settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.set_acked_features(0);
        self.redundancy.guest_queue().clear();
        self.tap.set_offloads(0)
    }
}
