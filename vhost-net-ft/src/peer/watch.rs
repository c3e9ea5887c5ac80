//! The `uplink` thread: watches the uplink, chooses the path, tells the peer, announces,
//! and without a guest reads the TAP (relaying what is for the peer's guest).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{info, warn};
use replication_link::error_chain;

use super::{
    attached, FrameBatch, Path, PathChooser, PeerLink, PeerState, ANNOUNCE_AFTER, BATCH_BYTES,
    BATCH_LENGTH_BYTES, PEER_STATE_TIMEOUT, RELAY_OFFLOADS, STATE_INTERVAL, TICK, UPLINK_DOWN,
    UPLINK_UP,
};
use crate::config::{format_mac, tap_offloads};
use crate::device::Device;
use crate::frame::{addressed_to, sent_from, unicast_to, MAX_FRAME_BYTES, VNET_HDR_LEN};
use crate::metrics::Metrics;
use crate::tap::{interface_running, LinkEvents};

/// `uplink`: watches the uplink, chooses the path, tells the peer, announces, and without a
/// guest reads the TAP (relaying what is for the peer's guest).
pub(super) struct Watch {
    device: Arc<Device>,
    chooser: PathChooser,
    last_sent: Option<(PeerState, Instant)>,
    announce_at: Vec<(Instant, Path)>,
    /// The uplink's last state, to log changes once.
    last_uplink: Option<bool>,
    /// Since when the outgoing session has not reached the peer.
    unreachable_since: Option<Instant>,
    buffer: Vec<u8>,
    /// Link changes wake the watch at once (without: it checks every [`TICK`]).
    link_events: Option<LinkEvents>,
}

impl Watch {
    pub(super) fn new(device: Arc<Device>) -> Watch {
        Watch {
            device,
            chooser: PathChooser::default(),
            last_sent: None,
            announce_at: Vec::new(),
            last_uplink: None,
            unreachable_since: None,
            buffer: vec![0u8; VNET_HDR_LEN + MAX_FRAME_BYTES + 256],
            link_events: match LinkEvents::open() {
                Ok(events) => Some(events),
                Err(error) => {
                    warn!(
                        "cannot watch link changes ({error}): the uplink is checked every {TICK:?}"
                    );
                    None
                }
            },
        }
    }

    pub(super) fn run(mut self) {
        loop {
            let next = Instant::now() + TICK;
            self.tick();
            self.wait_until(next);
        }
    }

    /// Waits until `deadline` or a link change; without a guest, serves the TAP meanwhile.
    fn wait_until(&mut self, deadline: Instant) {
        let tap = &self.device.tap;
        let mut fds: Vec<libc::pollfd> = self
            .link_events
            .iter()
            .map(LinkEvents::fd)
            .chain(
                (0..tap.queue_count()).filter_map(|index| tap.queue(index).map(AsRawFd::as_raw_fd)),
            )
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let queues_from = usize::from(self.link_events.is_some());
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return;
            }
            // With a guest the TAP is the queue workers'; only link changes are watched.
            // A move's source reads it although its (stopped) guest is attached.
            let watched = if attached(&self.device) && !self.device.redundancy.handover_relaying() {
                queues_from
            } else {
                fds.len()
            };
            let timeout = libc::c_int::try_from(remaining.as_millis().max(1)).unwrap_or(1);
            let ready = crate::tap::poll(&mut fds[..watched], timeout);
            if ready == 0 {
                continue;
            }
            let broken = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
            if ready < 0 || fds[..watched].iter().any(|fd| fd.revents & broken != 0) {
                if ready < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // A descriptor in error (say, the TAP deleted under us) would wake poll at
                // once, forever: give up the netlink wake-up if it is the one, and otherwise
                // wait out the tick instead of spinning.
                if queues_from == 1 && fds[0].revents & broken != 0 {
                    warn!("link change notices failed: the uplink is checked every {TICK:?}");
                    self.link_events = None;
                } else {
                    self.device.log_fault(format_args!(
                        "the TAP {} is in error; standby reads paused",
                        self.device.tap.name()
                    ));
                    thread::sleep(deadline.saturating_duration_since(Instant::now()));
                }
                return;
            }
            if queues_from == 1 && fds[0].revents & libc::POLLIN != 0 {
                if let Some(events) = &self.link_events {
                    events.drain();
                }
                return;
            }
            let ready: Vec<usize> = fds[queues_from..watched]
                .iter()
                .enumerate()
                .filter(|(_, fd)| fd.revents & libc::POLLIN != 0)
                .map(|(index, _)| index)
                .collect();
            for index in ready {
                self.drain_queue(index);
            }
        }
    }

    fn tick(&mut self) {
        let before = self.last_uplink;
        let uplink_up = self.check_uplink();
        let came_back = before == Some(false) && uplink_up == Some(true);
        let device = Arc::clone(&self.device);
        let device = &*device;
        let redundancy = &device.redundancy;
        let link = redundancy.link.get();
        let peer = link.and_then(PeerLink::fresh_state);
        let attached = attached(device);
        let now = Instant::now();
        if redundancy.handover.expire(now) {
            info!(
                "handover: relay to the peer ends: {} s passed",
                super::handover::RELAY_LIMIT.as_secs()
            );
        }
        // A move's destination: the guest's frontend may have started the rings since the
        // peer's frames came (nothing wakes the worker then).
        if attached && !redundancy.handover_queue().is_empty() {
            redundancy.guest_queue().wake();
        }
        let switched = if attached {
            let peer_usable = link.is_some_and(PeerLink::reachable)
                && peer
                    .is_some_and(|state| state.uplink_up != Some(false) && !state.guest_attached);
            self.chooser.decide(uplink_up, peer_usable, now)
        } else {
            self.chooser.reset()
        };
        let want_relay = self.chooser.path() == Path::Peer;
        // Relay only for a fresh peer that wants it, never with a guest of our own.
        let relaying = !attached && peer.is_some_and(|state| state.want_relay);
        self.set_relaying(relaying, peer.map_or(0, |state| state.offloads));
        if let Some(link) = link {
            self.drop_stale_queue(link, now);
            let state = PeerState {
                uplink_up,
                guest_attached: attached,
                want_relay,
                offloads: tap_offloads(device.acked_features()),
            };
            let due = self
                .last_sent
                .is_none_or(|(sent, at)| sent != state || now.duration_since(at) >= STATE_INTERVAL);
            // Not sent (the window stayed full): tried again at the next tick.
            if due && link.send_state(state) {
                self.last_sent = Some((state, now));
            }
        }
        if let Some(path) = switched {
            self.switch(path, uplink_up, now);
        } else if came_back && attached && self.chooser.path() == Path::Local {
            // Back on a path we never left (no peer to go to meanwhile): the LAN may have
            // learned the MAC elsewhere, or forgotten it.
            self.schedule_announcements(Path::Local, now);
        }
        self.announce_due(now);
    }

    /// A peer unreachable for [`PEER_STATE_TIMEOUT`] with messages still queued: they are
    /// dropped with the session (a new one starts), instead of reaching the peer late.
    fn drop_stale_queue(&mut self, link: &PeerLink, now: Instant) {
        if link.session().peer_reachable() {
            self.unreachable_since = None;
            return;
        }
        let since = *self.unreachable_since.get_or_insert(now);
        if now.duration_since(since) >= PEER_STATE_TIMEOUT
            && link.session().stats().unacked_messages > 0
        {
            link.replace_session();
            self.unreachable_since = Some(now);
        }
    }

    /// Reads the uplink's state, logs a change, stores it for `status`. The local path also
    /// needs our TAP up (an operator may have set it down or it may have lost its queue).
    fn check_uplink(&mut self) -> Option<bool> {
        let name = self.device.redundancy.uplink.as_deref()?;
        let tap = self.device.tap.name();
        let up = match interface_running(name).and_then(|up| Ok(up && interface_running(tap)?)) {
            Ok(up) => up,
            Err(error) => {
                if self.last_uplink != Some(false) {
                    warn!("cannot read the state of uplink {name} or TAP {tap}: {error}; taken as down");
                }
                false
            }
        };
        if self.last_uplink != Some(up) {
            if up {
                info!("uplink {name} is up");
            } else {
                warn!("uplink {name} is down");
            }
            self.last_uplink = Some(up);
        }
        let stored = if up { UPLINK_UP } else { UPLINK_DOWN };
        self.device
            .redundancy
            .uplink_state
            .store(stored, Ordering::Relaxed);
        Some(up)
    }

    fn switch(&mut self, path: Path, uplink_up: Option<bool>, now: Instant) {
        let redundancy = &self.device.redundancy;
        redundancy
            .via_peer
            .store(path == Path::Peer, Ordering::Relaxed);
        redundancy.switches.fetch_add(1, Ordering::Relaxed);
        match path {
            Path::Peer => warn!(
                "uplink {} is down: the guest's traffic goes through the peer host",
                redundancy.uplink.as_deref().unwrap_or("?")
            ),
            Path::Local if uplink_up == Some(false) => {
                warn!("the peer host cannot relay any more: back to the local uplink (down)")
            }
            Path::Local => info!("uplink is back: the guest's traffic is local again"),
        }
        // Only a daemon with a guest speaks for the MAC (one that just lost its guest not).
        if attached(&self.device) {
            self.schedule_announcements(path, now);
        } else {
            self.announce_at.clear();
        }
    }

    fn schedule_announcements(&mut self, path: Path, now: Instant) {
        self.announce_at = ANNOUNCE_AFTER
            .iter()
            .map(|after| (now + *after, path))
            .collect();
    }

    /// Sends the RARPs that are due on the path they were planned for, if it still holds.
    fn announce_due(&mut self, now: Instant) {
        if !attached(&self.device) {
            self.announce_at.clear();
            return;
        }
        let current = self.chooser.path();
        let due: Vec<Path> = self
            .announce_at
            .iter()
            .filter(|(at, _)| *at <= now)
            .map(|(_, path)| *path)
            .collect();
        self.announce_at.retain(|(at, _)| *at > now);
        for path in due.into_iter().filter(|path| *path == current) {
            if let Err(error) = self.device.announce_on(path) {
                warn!("cannot announce {}: {error}", format_mac(self.device.mac));
            }
        }
    }

    /// Sets our TAP up for relaying (the peer's guest's offloads) or idling (none), unless a
    /// guest took the TAP meanwhile.
    fn set_relaying(&self, relaying: bool, offloads: u32) {
        let device = &self.device;
        let was = device.redundancy.relaying.swap(relaying, Ordering::Relaxed);
        if was != relaying {
            if relaying {
                info!("relaying for the peer host's guest (its uplink is down)");
            } else {
                info!("no longer relaying for the peer host");
            }
        }
        // Only offloads a TAP knows; the peer's word is not trusted further.
        let wanted = if relaying {
            offloads & RELAY_OFFLOADS
        } else {
            0
        };
        if let Err(error) = device.configure_idle_tap(wanted) {
            device.log_fault(format_args!("{}", error_chain(&error)));
        }
    }

    /// Reads queue `index` of the TAP (without a guest), sending what is for the peer's
    /// guest while relaying, several frames to a link message ([`FrameBatch`]), and dropping
    /// the rest (an unread TAP would hand a new guest stale frames).
    fn drain_queue(&mut self, index: usize) {
        let device = Arc::clone(&self.device);
        let mut batch = FrameBatch::default();
        let mut handover = FrameBatch::default();
        for _ in 0..256 {
            let handing_over = device.redundancy.handover_relaying();
            // A frontend attaching takes the TAP: leave its frames to the guest.
            if attached(&device) && !handing_over {
                break;
            }
            let len = match device.tap.read_frame(index, &mut self.buffer) {
                Ok(len) => len,
                Err(_) => break,
            };
            if handing_over && self.hand_over(&mut handover, len) {
                continue;
            }
            if !device.redundancy.relaying.load(Ordering::Relaxed)
                || device.redundancy.link.get().is_none()
                || len >= self.buffer.len()
            {
                continue;
            }
            let header_len = device.tap.header_len();
            let Some(frame) = self.buffer.get(header_len..len) else {
                continue;
            };
            if !addressed_to(frame, device.mac) {
                continue;
            }
            if batch.len() + BATCH_LENGTH_BYTES + VNET_HDR_LEN + frame.len() > BATCH_BYTES {
                relay_batch(&device, &mut batch);
            }
            // The peer's guest takes 12-byte headers: the TAP's is cut or padded to that.
            append_frame(
                &mut batch,
                &self.buffer[..header_len.min(VNET_HDR_LEN)],
                frame,
            );
        }
        relay_batch(&device, &mut batch);
        send_handover(&device, &mut handover);
    }

    /// A move's source: takes the frame of `len` bytes in the buffer if it is the move's
    /// (see [`super::handover`]): for the guest's MAC it goes into `batch` for the peer;
    /// one from the guest's MAC (the destination's announcement came back over the LAN)
    /// ends the relay; a group frame is dropped while the stopped guest is attached here.
    /// `false`: not taken, handled as without a move.
    fn hand_over(&self, batch: &mut FrameBatch, len: usize) -> bool {
        let device = &*self.device;
        let header_len = device.tap.header_len();
        let Some(frame) = self.buffer.get(header_len..len) else {
            return false;
        };
        if sent_from(frame, device.mac) {
            send_handover(device, batch);
            device.redundancy.stop_handover(
                "a frame from the guest's MAC came over the LAN (the peer announced it)",
            );
            return false;
        }
        if !unicast_to(frame, device.mac) {
            return attached(device);
        }
        if batch.len() + BATCH_LENGTH_BYTES + VNET_HDR_LEN + frame.len() > BATCH_BYTES {
            send_handover(device, batch);
        }
        append_frame(batch, &self.buffer[..header_len.min(VNET_HDR_LEN)], frame);
        true
    }
}

/// Appends a frame read from the TAP to `batch`, its header (the TAP's) cut or padded to
/// the 12 bytes the peer's guest takes.
fn append_frame(batch: &mut FrameBatch, header: &[u8], frame: &[u8]) {
    let appended = batch.append(VNET_HDR_LEN + frame.len(), |bytes| {
        let (to_header, to_frame) = bytes.split_at_mut(VNET_HDR_LEN);
        to_header[..header.len()].copy_from_slice(header);
        to_frame.copy_from_slice(frame);
        Ok::<(), std::convert::Infallible>(())
    });
    let Ok(()) = appended;
}

/// Sends the frames of a move's relay, if any, in one message.
fn send_handover(device: &Device, batch: &mut FrameBatch) {
    let metrics = &device.metrics;
    send_batch(
        device,
        batch,
        |link| &link.handover_batch_header,
        (
            &metrics.handover_relayed_packets,
            &metrics.handover_relay_dropped,
        ),
    );
}

/// Sends the frames relayed for the peer's guest, if any, in one message.
fn relay_batch(device: &Device, batch: &mut FrameBatch) {
    let metrics = &device.metrics;
    send_batch(
        device,
        batch,
        |link| &link.to_guest_batch_header,
        (&metrics.relay_to_peer_packets, &metrics.peer_tx_dropped),
    );
}

/// Sends `batch`, if not empty, as one message with the header `header` picks, without
/// waiting (a full window drops it), counting its frames as `sent` or `dropped`.
fn send_batch(
    device: &Device,
    batch: &mut FrameBatch,
    header: impl Fn(&PeerLink) -> &Vec<u8>,
    (sent, dropped): (&AtomicU64, &AtomicU64),
) {
    let Some(link) = device.redundancy.link.get() else {
        return;
    };
    if batch.is_empty() {
        return;
    }
    let (payload, frames) = batch.take();
    let counter = match link
        .session()
        .send_timeout(header(link), payload, Duration::ZERO)
    {
        Ok(_) => sent,
        Err(_) => dropped,
    };
    Metrics::add(counter, frames as u64);
}
