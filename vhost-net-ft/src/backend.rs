//! vhost-user glue: the only module that knows `vhost_user_backend`.
//!
//! Virtqueues as virtio-net numbers them: RX of queue pair `i` is vring `2i`, its TX `2i + 1`,
//! the control queue the last, `2N`. Each pair has a worker thread of its own
//! (`queues_per_thread`) that owns the pair's TAP queue, its RX staging buffer and its
//! [`TxSink`]; the only shared state is the [`Device`] (atomics) and the TAP's file
//! descriptors. The control queue has a thread too (QEMU never uses it, see [`crate::ctrl`]).
//!
//! Event ids on a pair's thread: `0` RX kick, `1` TX kick (the thread-local vring index),
//! `num_queues` the library's exit and vring-enable events, [`NetBackend::tap_event_id`] the
//! TAP queue became readable (edge-triggered), [`NetBackend::resume_event_id`] our own "more
//! to receive" wake-up, [`NetBackend::room_event_id`] "the output commit buffer has room
//! again" (TX resumes, see [`crate::output`]).
//!
//! RX is driven by the TAP: a readable TAP queue wakes the worker, which moves frames into the
//! guest's buffers until the TAP is empty. When the guest has no buffer left for a frame, the
//! frame stays in the worker's staging buffer, the worker asks the guest to kick and stops
//! reading the TAP; the guest's kick (it posted buffers) resumes it. Nothing is dropped and
//! nothing spins: the TAP is registered edge-triggered, so an unread TAP raises no events.
//!
//! A ring that starts again after a stop (QEMU's `cont` after a checkpoint, the first start
//! of a restored guest) runs its worker at once, from `SET_VRING_KICK`, and the worker hands
//! the guest what waited in the TAP meanwhile; but `GET_VRING_BASE` took the call fd, and
//! QEMU sends the new one only after the kick: an interrupt then would go nowhere, and the
//! guest would not look at its ring until some later frame interrupts it (for a TCP peer
//! waiting for an answer, its retransmission timeout). So used entries added without a call
//! fd are remembered and signalled once the fd is there ([`NetBackend::resignal_event_id`],
//! a timer, and every event of the pair).
//!
//! Every chain a worker pops is completed within the same event, so nothing stays accepted
//! across events. `GET_VRING_BASE` (QEMU's `stop`) may still arrive while a worker is in the
//! middle of a batch: [`NetBackend::stop_vring`] waits for that batch to end, so its used
//! entries and interrupt reach the guest before the library reads the base and drops the
//! call fd, and the worker never pops from a stopped ring.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use daemon_util::guest_pages::{TrackedBitmap, TrackedMemory};
use daemon_util::{lock, Slot};
use log::{debug, error, warn};
pub use replication_link::error_chain;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::{config_slice, virtio_features, MAX_QUEUE_SIZE};
use crate::ctrl::{self, Effect};
use crate::datapath::{
    deliver, read_ctrl_chain, read_tx_chain, read_tx_chain_into, write_ctrl_ack, Delivery,
};
use crate::device::Device;
use crate::frame::convert_header;
use crate::frame::{header_len, validate_tx, TxOffloads, MAX_FRAME_BYTES, VNET_HDR_LEN};
use crate::metrics::Metrics;
use crate::sink::{EpochSink, TxSink};

/// Guest memory as this daemon maps it: every write is marked in QEMU's migration log (when
/// QEMU hands us one) and in the page bitmap `dirty-pages` reads (see
/// `daemon_util::guest_pages`).
pub type GuestMemory = TrackedMemory;
pub type AtomicMemory = GuestMemoryAtomic<GuestMemory>;
pub type Vring = VringRwLock<AtomicMemory>;

/// Frames a worker moves to the guest before it lets its other events run.
const RX_BUDGET_FRAMES: usize = 64;
/// The first wait for a call fd after used entries were added without one; it doubles up to
/// [`RESIGNAL_MOST`] while the fd stays unset (QEMU sets it right after the kick).
const RESIGNAL_FIRST: std::time::Duration = std::time::Duration::from_millis(1);
const RESIGNAL_MOST: std::time::Duration = std::time::Duration::from_millis(64);
/// The RX staging buffer: the largest frame with its header, and room to see truncation.
const RX_BUFFER_BYTES: usize = VNET_HDR_LEN + MAX_FRAME_BYTES + 256;

/// A vhost-user-net backend for one frontend connection.
pub struct NetBackend {
    device: Arc<Device>,
    num_queues: usize,
    event_idx: AtomicBool,
    features: AtomicU64,
    memory: Slot<AtomicMemory>,
    /// One worker per queue pair, locked by that pair's thread while it handles an event
    /// and by `stop_vring` on the vhost-user handler thread (which holds no vring lock while
    /// it waits, so the two cannot deadlock).
    pairs: Vec<Mutex<PairWorker>>,
    /// Held while the control queue's thread handles an event, for `stop_vring`.
    ctrl: Mutex<()>,
    /// Per pair: "the RX budget ran out, come back".
    resume: Vec<EventFd>,
    /// Per pair: "look again whether the frontend set the call fd" (see the module
    /// documentation), armed while used entries wait for their interrupt.
    resignal: Vec<Mutex<TimerFd>>,
}

/// A queue pair's state.
struct PairWorker {
    index: usize,
    sink: Box<dyn TxSink>,
    rx_buffer: Vec<u8>,
    /// Length of a frame read from the TAP but not yet delivered (0: none).
    rx_pending: usize,
    /// RX stopped for lack of guest buffers (counted once per pause).
    rx_waiting: bool,
    /// TX stopped because the output commit buffer was full (counted once per pause).
    tx_waiting: bool,
    /// Used entries were added to the RX (`[0]`) or TX (`[1]`) ring while it had no call fd:
    /// the guest was not interrupted for them yet.
    unsignalled: [bool; 2],
    /// The next wait of the resignal timer.
    resignal_wait: std::time::Duration,
}

impl NetBackend {
    pub fn new(device: Arc<Device>) -> io::Result<NetBackend> {
        let pairs = device.queue_pairs;
        let resume = (0..pairs)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let resignal = (0..pairs)
            .map(|_| TimerFd::new().map(Mutex::new).map_err(io::Error::from))
            .collect::<io::Result<Vec<_>>>()?;
        let workers = (0..pairs)
            .map(|index| {
                let sink: Box<dyn TxSink> = Box::new(EpochSink::new(device.clone(), index));
                Mutex::new(PairWorker {
                    index,
                    sink,
                    rx_buffer: vec![0u8; RX_BUFFER_BYTES],
                    rx_pending: 0,
                    rx_waiting: false,
                    tx_waiting: false,
                    unsignalled: [false; 2],
                    resignal_wait: RESIGNAL_FIRST,
                })
            })
            .collect();
        // Until this frontend acks offloads, the TAP must hand us plain frames only.
        if let Err(error) = device.clear_acked_features() {
            warn!("{}", error_chain(&error));
        }
        Ok(NetBackend {
            num_queues: 2 * pairs + 1,
            device,
            event_idx: AtomicBool::new(false),
            features: AtomicU64::new(0),
            memory: Slot::new(),
            pairs: workers,
            ctrl: Mutex::new(()),
            resume,
            resignal,
        })
    }

    /// The epoll id of "TAP queue readable", one past the ids the library reserves.
    pub fn tap_event_id(&self) -> u64 {
        self.num_queues as u64 + 1
    }

    /// The epoll id of the RX resume wake-up.
    pub fn resume_event_id(&self) -> u64 {
        self.num_queues as u64 + 2
    }

    /// The epoll id of "frames from the peer host wait for the guest" (pair 0 only).
    pub fn peer_event_id(&self) -> u64 {
        self.num_queues as u64 + 3
    }

    /// The epoll id of "the output commit buffer has room again" (see [`crate::output`]).
    pub fn room_event_id(&self) -> u64 {
        self.num_queues as u64 + 4
    }

    /// The epoll id of "look again for the call fd" (see the module documentation).
    pub fn resignal_event_id(&self) -> u64 {
        self.num_queues as u64 + 5
    }

    /// The resignal timer of pair `index`, to register in that pair's event loop.
    pub fn resignal_fd(&self, index: usize) -> Option<std::os::fd::RawFd> {
        self.resignal
            .get(index)
            .map(|timer| lock(timer).as_raw_fd())
    }

    /// The resume eventfd of pair `index`, to register in that pair's event loop.
    pub fn resume_eventfd(&self, index: usize) -> Option<&EventFd> {
        self.resume.get(index)
    }

    pub fn queue_pairs(&self) -> usize {
        self.pairs.len()
    }

    fn features(&self) -> u64 {
        self.features.load(Ordering::Relaxed)
    }

    fn handle_pair_event(&self, event: u16, vrings: &[Vring], pair: usize) -> io::Result<()> {
        let (Some(rx), Some(tx), Some(worker)) =
            (vrings.first(), vrings.get(1), self.pairs.get(pair))
        else {
            return Ok(());
        };
        if !self.device.guest_attached() {
            // A held frontend (connected, device not started): no frame moves either way;
            // the TAP stays the standby thread's. Wake-ups are taken, so that a
            // level-triggered one does not wake this loop again at once.
            self.take_wake_up(event, pair);
            return Ok(());
        }
        let mut worker = lock(worker);
        self.sync_attachment(pair, rx);
        if u64::from(event) == self.resignal_event_id() {
            self.take_resignal_timer(pair);
        }
        if worker.unsignalled != [false; 2] {
            self.resignal([rx, tx], &mut worker)?;
        }
        match u64::from(event) {
            0 => self.receive(rx, &mut worker),
            1 => self.transmit(tx, &mut worker),
            id if id == self.tap_event_id() => self.receive(rx, &mut worker),
            id if id == self.peer_event_id() => {
                self.device.redundancy.guest_queue().acknowledge();
                self.receive(rx, &mut worker)
            }
            id if id == self.resume_event_id() => {
                if let Some(resume) = self.resume.get(pair) {
                    let _ = resume.read();
                }
                self.receive(rx, &mut worker)
            }
            id if id == self.room_event_id() => {
                if let Some(room) = self.device.output.room_eventfd(pair) {
                    let _ = room.read();
                }
                self.transmit(tx, &mut worker)
            }
            _ => Ok(()),
        }
    }

    /// Clears the eventfd behind a wake-up of pair `pair` (a kick or a TAP event needs
    /// nothing: the library reads kicks, the TAP is edge-triggered).
    fn take_wake_up(&self, event: u16, pair: usize) {
        let event = u64::from(event);
        if event == self.peer_event_id() {
            self.device.redundancy.guest_queue().acknowledge();
        } else if event == self.resume_event_id() {
            if let Some(resume) = self.resume.get(pair) {
                let _ = resume.read();
            }
        } else if event == self.room_event_id() {
            if let Some(room) = self.device.output.room_eventfd(pair) {
                let _ = room.read();
            }
        } else if event == self.resignal_event_id() {
            self.take_resignal_timer(pair);
        }
    }

    /// Clears the resignal timer's expiry (only an expired timer is read: a read of one
    /// re-armed meanwhile would block until it expires again).
    fn take_resignal_timer(&self, pair: usize) {
        if let Some(timer) = self.resignal.get(pair) {
            let mut timer = lock(timer);
            if timer.is_armed().is_ok_and(|armed| !armed) {
                let _ = timer.wait();
            }
        }
    }

    /// Tells the guest about used entries of `vring` (`which`: 0 RX, 1 TX): interrupts it
    /// through the call fd, or, while the frontend has not set one (a ring starting again),
    /// remembers them for [`NetBackend::resignal`].
    fn signal(&self, vring: &Vring, which: usize, worker: &mut PairWorker) -> io::Result<()> {
        if vring.get_ref().get_call().is_some() {
            return vring.signal_used_queue();
        }
        if !worker.unsignalled[which] {
            worker.unsignalled[which] = true;
            Metrics::add(&self.device.metrics.interrupts_deferred, 1);
            self.arm_resignal(worker);
        }
        Ok(())
    }

    /// Interrupts the guest for the used entries added without a call fd, on each ring that
    /// has one now; while a running ring still has none, looks again after a wait (a
    /// stopped ring is looked at again when it starts: the library then runs its event).
    fn resignal(&self, vrings: [&Vring; 2], worker: &mut PairWorker) -> io::Result<()> {
        let mut waiting = false;
        for (which, vring) in vrings.into_iter().enumerate() {
            if !worker.unsignalled[which] {
                continue;
            }
            if vring.get_ref().get_call().is_some() {
                worker.unsignalled[which] = false;
                vring.signal_used_queue()?;
            } else if queue_usable(vring) {
                waiting = true;
            }
        }
        if waiting {
            self.arm_resignal(worker);
        } else {
            worker.resignal_wait = RESIGNAL_FIRST;
        }
        Ok(())
    }

    /// Arms the pair's resignal timer for its next wait (doubling up to [`RESIGNAL_MOST`]).
    fn arm_resignal(&self, worker: &mut PairWorker) {
        let wait = worker.resignal_wait;
        worker.resignal_wait = (wait * 2).min(RESIGNAL_MOST);
        if let Some(timer) = self.resignal.get(worker.index) {
            if let Err(error) = lock(timer).reset(wait, None) {
                self.device.log_fault(format_args!(
                    "queue pair {}: cannot arm the call fd timer: {error}",
                    worker.index
                ));
            }
        }
    }

    /// Keeps the TAP queue of a pair attached exactly while the guest uses the pair, so the
    /// kernel does not steer frames to a queue nobody reads.
    fn sync_attachment(&self, pair: usize, rx: &Vring) {
        let usable = queue_usable(rx);
        if pair == 0 || self.device.tap.is_attached(pair) == usable {
            return;
        }
        if let Err(error) = self.device.tap.set_attached(pair, usable) {
            warn!("{error}");
        }
    }

    /// Moves frames from the pair's TAP queue into the guest until the TAP is empty, the
    /// guest's buffers run out, or the budget is spent.
    fn receive(&self, rx: &Vring, worker: &mut PairWorker) -> io::Result<()> {
        let Some(memory) = self.memory.get() else {
            return Ok(());
        };
        if !queue_usable(rx) {
            // Frames wait in the TAP (or the staging buffer) until the queue is enabled.
            return Ok(());
        }
        if worker.index == 0 {
            // The ring runs: a move's relay of this guest's frames has no reason to go on.
            self.device.redundancy.guest_runs_here();
        }
        let header_len = self.device.tap.header_len();
        let mergeable = self.features() & (1u64 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let guest = memory.memory();
        let metrics = &self.device.metrics;
        let mut delivered = false;
        let mut budget = RX_BUDGET_FRAMES;
        loop {
            // Disabled or stopped (GET_VRING_BASE) while we ran: the frame waits in the
            // staging buffer. Without this, a stopped ring with buffers posted would make
            // `deliver` answer "retry" for ever.
            if !queue_usable(rx) {
                break;
            }
            if worker.rx_pending == 0 {
                if budget == 0 {
                    if let Some(resume) = self.resume.get(worker.index) {
                        let _ = resume.write(1);
                    }
                    break;
                }
                budget -= 1;
                if worker.index == 0 {
                    if let Some(len) = self.take_from_peer(worker, header_len) {
                        worker.rx_pending = len;
                        continue;
                    }
                }
                match self.read_tap(worker, header_len) {
                    TapRead::Frame(len) => worker.rx_pending = len,
                    TapRead::Skipped => continue,
                    TapRead::Empty => break,
                }
            }
            let len = worker.rx_pending;
            let outcome = {
                let mut state = rx.get_mut();
                let frame = worker.rx_buffer.get_mut(..len).unwrap_or_default();
                deliver(state.get_queue_mut(), &*guest, frame, header_len, mergeable)
            };
            match outcome.map_err(queue_error)? {
                Delivery::Delivered { bad_buffers, .. } => {
                    Metrics::add(&metrics.rx_packets, 1);
                    Metrics::add(&metrics.rx_bytes, (len - header_len) as u64);
                    Metrics::add(&metrics.rx_bad_buffers, u64::from(bad_buffers));
                    worker.rx_pending = 0;
                    worker.rx_waiting = false;
                    delivered = true;
                }
                Delivery::TooLarge => {
                    Metrics::add(&metrics.rx_dropped_no_buffers, 1);
                    self.device.log_fault(format_args!(
                        "queue pair {}: dropped a {}-byte frame the guest's receive buffers cannot hold",
                        worker.index,
                        len - header_len
                    ));
                    worker.rx_pending = 0;
                }
                Delivery::NoBuffers { retry: true } => continue,
                Delivery::NoBuffers { retry: false } => {
                    if !worker.rx_waiting {
                        Metrics::add(&metrics.rx_waits_for_buffers, 1);
                        worker.rx_waiting = true;
                    }
                    break;
                }
            }
        }
        if delivered && rx.needs_notification().map_err(queue_error)? {
            self.signal(rx, 0, worker)?;
        }
        Ok(())
    }

    /// Moves the next frame the peer host relayed for the guest into the staging buffer,
    /// with the guest's header length; its length, `None` when none waits.
    fn take_from_peer(&self, worker: &mut PairWorker, header_len: usize) -> Option<usize> {
        if let Some(len) = self.take_from_handover(worker, header_len) {
            return Some(len);
        }
        let queue = self.device.redundancy.guest_queue();
        loop {
            let bytes = convert_header(queue.pop()?, VNET_HDR_LEN, header_len);
            // Checked on arrival to be at most a header and MAX_FRAME_BYTES.
            match worker.rx_buffer.get_mut(..bytes.len()) {
                Some(staging) => {
                    staging.copy_from_slice(&bytes);
                    return Some(bytes.len());
                }
                None => Metrics::add(&self.device.metrics.peer_rx_dropped, 1),
            }
        }
    }

    /// Reads one frame from the pair's TAP queue into the staging buffer.
    /// The next frame the peer relayed during a move (see [`crate::peer::handover`]),
    /// checked against the offloads this guest negotiated (it may have been queued before).
    fn take_from_handover(&self, worker: &mut PairWorker, header_len: usize) -> Option<usize> {
        let metrics = &self.device.metrics;
        let offloads = TxOffloads::guest_receive(self.features());
        loop {
            let (frame, expired) = self
                .device
                .redundancy
                .handover_queue()
                .pop(std::time::Instant::now());
            Metrics::add(&metrics.handover_rx_dropped, expired as u64);
            let frame = frame?;
            if let Err(error) = validate_tx(&frame, VNET_HDR_LEN, offloads) {
                Metrics::add(&metrics.handover_rx_dropped, 1);
                self.device.log_fault(format_args!(
                    "handover: dropped a frame the peer relayed: {error}"
                ));
                continue;
            }
            let bytes = convert_header(frame, VNET_HDR_LEN, header_len);
            match worker.rx_buffer.get_mut(..bytes.len()) {
                Some(staging) => {
                    staging.copy_from_slice(&bytes);
                    Metrics::add(&metrics.handover_rx_packets, 1);
                    return Some(bytes.len());
                }
                None => Metrics::add(&metrics.handover_rx_dropped, 1),
            }
        }
    }

    fn read_tap(&self, worker: &mut PairWorker, header_len: usize) -> TapRead {
        let metrics = &self.device.metrics;
        match self
            .device
            .tap
            .read_frame(worker.index, &mut worker.rx_buffer)
        {
            // The kernel reports a frame's full length even when it did not fit.
            Ok(len) if len >= worker.rx_buffer.len() => {
                Metrics::add(&metrics.rx_dropped_no_buffers, 1);
                self.device.log_fault(format_args!(
                    "queue pair {}: dropped a {len}-byte frame from the TAP (larger than {} bytes)",
                    worker.index,
                    worker.rx_buffer.len()
                ));
                TapRead::Skipped
            }
            Ok(len) if len < header_len => {
                Metrics::add(&metrics.tap_read_errors, 1);
                TapRead::Skipped
            }
            Ok(len) => TapRead::Frame(len),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => TapRead::Empty,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => TapRead::Skipped,
            Err(error) => {
                Metrics::add(&metrics.tap_read_errors, 1);
                self.device.log_fault(format_args!(
                    "queue pair {}: reading the TAP failed: {error}",
                    worker.index
                ));
                TapRead::Empty
            }
        }
    }

    /// Sends every available TX chain; with EVENT_IDX, loops until no chain arrived while
    /// notifications were off. Takes no chain while the sink has no room (a full output
    /// commit buffer): the guest's frames wait in its ring and the sink wakes the pair when
    /// a commit frees room (with notifications still off, so waiting costs nothing).
    fn transmit(&self, tx: &Vring, worker: &mut PairWorker) -> io::Result<()> {
        let Some(memory) = self.memory.get() else {
            return Ok(());
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let features = self.features();
        let header_len = header_len(features);
        let offloads = TxOffloads::from_features(features);
        loop {
            // Stopped (GET_VRING_BASE) before or while we ran: a kick that raced the stop.
            if !tx.get_ref().get_queue().ready() {
                return Ok(());
            }
            if event_idx {
                tx.disable_notification().map_err(queue_error)?;
            }
            let guest = memory.memory();
            let mut sent_any = false;
            let mut full = false;
            loop {
                if !worker.sink.has_room() {
                    full = true;
                    break;
                }
                // One chain at a time, so that the room is checked before each.
                let chain = tx
                    .get_mut()
                    .get_queue_mut()
                    .iter(guest.clone())
                    .map_err(queue_error)?
                    .next();
                let Some(chain) = chain else {
                    break;
                };
                sent_any = true;
                let head = chain.head_index();
                // On the peer path, straight from the guest into the link message's batch.
                let batch = worker
                    .sink
                    .peer_batch()
                    .filter(|_| header_len == VNET_HDR_LEN);
                let taken = match batch {
                    Some(batch) => read_tx_chain_into(chain, offloads, batch),
                    None => read_tx_chain(chain, header_len, offloads)
                        .map(|frame| worker.sink.send(frame)),
                };
                match taken {
                    Ok(()) => {}
                    Err(error) => {
                        Metrics::add(&self.device.metrics.tx_dropped_malformed, 1);
                        self.device.log_fault(format_args!(
                            "queue pair {}: dropped a malformed TX chain: {error}",
                            worker.index
                        ));
                    }
                }
                tx.add_used(head, 0).map_err(queue_error)?;
            }
            // The pass's frames for the peer leave as one message, before the guest hears
            // its buffers are free.
            worker.sink.flush();
            if sent_any && tx.needs_notification().map_err(queue_error)? {
                self.signal(tx, 1, worker)?;
            }
            if full {
                if !worker.tx_waiting {
                    worker.sink.count_full_wait();
                    worker.tx_waiting = true;
                }
                return Ok(());
            }
            worker.tx_waiting = false;
            if !event_idx || !tx.enable_notification().map_err(queue_error)? {
                return Ok(());
            }
        }
    }

    /// Answers control commands (for frontends that pass the control queue to us).
    fn process_ctrl(&self, vring: &Vring) -> io::Result<()> {
        let Some(memory) = self.memory.get() else {
            return Ok(());
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let pairs = u16::try_from(self.pairs.len()).unwrap_or(u16::MAX);
        let _serialised = lock(&self.ctrl);
        loop {
            if !vring.get_ref().get_queue().ready() {
                return Ok(());
            }
            if event_idx {
                vring.disable_notification().map_err(queue_error)?;
            }
            let guest = memory.memory();
            let chains: Vec<_> = vring
                .get_mut()
                .get_queue_mut()
                .iter(guest.clone())
                .map_err(queue_error)?
                .collect();
            let answered_any = !chains.is_empty();
            for chain in chains {
                let head = chain.head_index();
                let used_len = match read_ctrl_chain(&chain) {
                    Ok(command) => {
                        let answer = ctrl::answer(&command, pairs);
                        self.apply(answer.effect);
                        Metrics::add(&self.device.metrics.ctrl_commands, 1);
                        debug!("control command {:?}: ack {}", command.get(..2), answer.ack);
                        write_ctrl_ack(chain, answer.ack).unwrap_or_else(|error| {
                            self.device
                                .log_fault(format_args!("control queue: {error}"));
                            0
                        })
                    }
                    Err(error) => {
                        self.device
                            .log_fault(format_args!("control queue: {error}"));
                        0
                    }
                };
                vring.add_used(head, used_len).map_err(queue_error)?;
            }
            if answered_any && vring.needs_notification().map_err(queue_error)? {
                vring.signal_used_queue()?;
            }
            if !event_idx || !vring.enable_notification().map_err(queue_error)? {
                return Ok(());
            }
        }
    }

    fn apply(&self, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::AnnounceAcked => self.device.clear_announce(),
            Effect::QueuePairs(pairs) => debug!("guest uses {pairs} queue pair(s)"),
        }
    }
}

/// What a read from the TAP gave.
enum TapRead {
    Frame(usize),
    /// A frame was dropped or the read interrupted; read again.
    Skipped,
    /// Nothing more to read now.
    Empty,
}

/// One thread per queue pair (its RX and TX vrings), then one for the control queue.
fn thread_masks(pairs: usize) -> Vec<u64> {
    (0..pairs)
        .map(|pair| 0b11u64 << (2 * pair))
        .chain(std::iter::once(1u64 << (2 * pairs)))
        .collect()
}

fn queue_usable(vring: &Vring) -> bool {
    let state = vring.get_ref();
    state.get_queue().ready() && state.is_enabled()
}

fn queue_error(error: virtio_queue::Error) -> io::Error {
    io::Error::other(format!("virtqueue: {error}"))
}

impl VhostUserBackend for NetBackend {
    type Bitmap = TrackedBitmap;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        virtio_features(self.pairs.len())
    }

    fn acked_features(&self, features: u64) {
        debug!(
            "frontend acked features {features:#x}: {}",
            crate::config::feature_names(features).join(" ")
        );
        self.features.store(features, Ordering::Relaxed);
        self.event_idx.store(
            features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0,
            Ordering::Relaxed,
        );
        if let Err(error) = self.device.apply_acked_features(features) {
            error!("{}", error_chain(&error));
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // Not RARP: vhost 0.18 cannot decode VHOST_USER_SEND_RARP and would drop the
        // connection; `announce` on the control socket sends the RARP instead.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_slice(&self.device.config(), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // The virtio-net config space is read-only for a VERSION_1 driver.
        debug!("ignored a {}-byte config write at {offset}", buf.len());
        Ok(())
    }

    fn update_memory(&self, memory: AtomicMemory) -> io::Result<()> {
        self.device.guest_pages.set_memory(&memory.memory());
        self.memory.set(memory);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        thread_masks(self.pairs.len())
    }

    /// GET_VRING_BASE (QEMU's `stop`, a snapshot, migration): the library has marked the ring
    /// not ready; waiting for the worker of the queue's thread ends the batch it may be in,
    /// so everything it popped is on the used ring and signalled while the call fd is set.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let queue = queue_index as usize;
        match self.pairs.get(queue / 2) {
            Some(worker) => drop(lock(worker)),
            None => drop(lock(&self.ctrl)),
        }
        debug!("queue {queue}: stopped");
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        let result = if thread_id < self.pairs.len() {
            self.handle_pair_event(device_event, vrings, thread_id)
        } else {
            vrings
                .first()
                .map_or(Ok(()), |vring| self.process_ctrl(vring))
        };
        // An error returned from here silently ends this thread's worker, so it is logged
        // (rate-limited: the guest controls the ring) and swallowed.
        if let Err(error) = result {
            if let Some(suppressed) = self.device.fault_log.admit() {
                error!("thread {thread_id}: {error} ({suppressed} similar lines suppressed)");
            }
        }
        Ok(())
    }
}

/// The raw fd of pair `index`'s TAP queue, to register in its event loop.
pub fn tap_fd(device: &Device, index: usize) -> Option<std::os::fd::RawFd> {
    device.tap.queue(index).map(AsRawFd::as_raw_fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_layout_follows_virtio_net() {
        assert_eq!(thread_masks(1), vec![0b11, 0b100]);
        assert_eq!(thread_masks(3), vec![0b11, 0b1100, 0b11_0000, 0b100_0000]);
        // The largest --queues still fits the 64-bit masks.
        let masks = thread_masks(crate::config::MAX_QUEUE_PAIRS);
        assert_eq!(masks.last(), Some(&(1u64 << 32)));
    }
}
