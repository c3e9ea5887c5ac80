//! vhost-user glue: the only module that knows `vhost_user_backend`.
//!
//! One worker thread per queue (`queues_per_thread` gives each queue its own thread), each with
//! its own [`Executor`] and completion list; the only shared state is the [`Disk`] and atomic
//! counters.
//!
//! Requests of a queue are executed as they arrive, but completed strictly in order: a write
//! waiting for the peer holds back the completions behind it (they are pipelined, not
//! serialised). That is what makes a daemon restart safe without
//! `VHOST_USER_GET_INFLIGHT_FD`: when the connection breaks, QEMU resets each queue's
//! `last_avail_idx` to its used index, so a new daemon re-executes exactly the requests that
//! were never completed, and none that were.
//!
//! The same rule serves QEMU's `stop` (and snapshots, migration, Level 3 epochs): for
//! `GET_VRING_BASE` the library marks the ring not ready and calls [`BlkBackend::stop_vring`],
//! which waits for the worker to finish what it is executing, completes every request whose
//! outcome is known while the guest can still be signalled, waits a little for the peer's
//! acknowledgements, and **rewinds** the ring over the requests still waiting: the base QEMU
//! reads back is the avail index of the first uncompleted request, so after `cont` exactly
//! those are popped and executed again. A stopped ring is never touched by the worker.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use daemon_util::guest_pages::TrackedBitmap;
use daemon_util::{lock, Slot};
use log::{debug, error, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::config::{
    config_slice, config_space, virtio_features, CONFIG_SPACE_LEN, MAX_QUEUE_SIZE,
};
use crate::execute::{Disk, Executed, Executor};
use crate::metrics::Metrics;
use crate::ticket::Waker;

/// How long `stop_vring` waits for requests still waiting on the peer before it rewinds
/// them. QEMU's `stop` blocks meanwhile; a peer that answers at all answers in a few
/// milliseconds, and a rewound request is simply executed again after `cont`.
pub const STOP_DRAIN_TIMEOUT: Duration = Duration::from_millis(300);

/// Guest memory as this daemon maps it: every page it writes is marked in the dirty log QEMU
/// can hand us for migration and in the page bitmap `dirty-pages` reads (Level 3).
pub type GuestMemory = GuestMemoryMmap<TrackedBitmap>;
pub type AtomicMemory = GuestMemoryAtomic<GuestMemory>;
pub type Vring = VringRwLock<AtomicMemory>;

/// A vhost-user-blk backend for one frontend connection.
pub struct BlkBackend {
    disk: Arc<Disk>,
    num_queues: usize,
    config: [u8; CONFIG_SPACE_LEN],
    event_idx: std::sync::atomic::AtomicBool,
    memory: Slot<AtomicMemory>,
    /// One worker per queue, locked by that queue's thread while it handles an event and by
    /// the vhost-user handler thread in `stop_vring` (which never holds a vring lock while
    /// it waits for this one, so the two cannot deadlock).
    workers: Vec<Mutex<QueueWorker>>,
    wakers: Vec<Arc<Waker>>,
}

/// A queue's executor and its requests waiting to complete, oldest first.
struct QueueWorker {
    executor: Executor,
    pending: VecDeque<Executed>,
    /// The queue's vring, kept when the worker first handles an event (before it can pop
    /// anything), for `stop_vring`: `None` means nothing was ever popped.
    vring: Option<Vring>,
}

impl BlkBackend {
    pub fn new(disk: Arc<Disk>, num_queues: usize) -> io::Result<BlkBackend> {
        let queues = u16::try_from(num_queues).unwrap_or(u16::MAX);
        let config = config_space(&disk.limits, queues);
        let wakers = (0..num_queues)
            .map(|_| Waker::new().map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        let workers = wakers
            .iter()
            .map(|waker| {
                Mutex::new(QueueWorker {
                    executor: Executor::new(disk.clone(), waker.clone()),
                    pending: VecDeque::new(),
                    vring: None,
                })
            })
            .collect();
        Ok(BlkBackend {
            disk,
            num_queues,
            config,
            event_idx: std::sync::atomic::AtomicBool::new(false),
            memory: Slot::new(),
            workers,
            wakers,
        })
    }

    /// The epoll id of the completion wake-up, one past the ids the library reserves.
    pub fn wake_event_id(&self) -> u64 {
        self.num_queues as u64 + 1
    }

    /// The waker of a queue, to register in that queue's epoll loop.
    pub fn waker(&self, queue: usize) -> Option<&Arc<Waker>> {
        self.wakers.get(queue)
    }

    /// Lets the thread that completes a request's last part (a primary's receiver, on the
    /// secondary's acknowledgement) put it on the used ring itself when the queue's worker
    /// is idle, instead of waking the worker through the eventfd. It only tries the
    /// worker's lock: a busy worker (running requests, or a send waiting for window space)
    /// is woken as before and completes them itself.
    pub fn complete_on_the_completing_thread(self: &Arc<Self>) {
        for (queue, waker) in self.wakers.iter().enumerate() {
            // Weak: the wakers belong to the backend (a strong reference would keep every
            // frontend connection's backend alive).
            let backend = Arc::downgrade(self);
            waker.set_completer(Box::new(move || {
                backend
                    .upgrade()
                    .is_some_and(|backend| backend.try_complete(queue))
            }));
        }
    }

    /// Completes queue `queue`'s finished requests in order if its worker's lock is free
    /// and the queue runs; true when it did.
    fn try_complete(&self, queue: usize) -> bool {
        let Some(Ok(mut worker)) = self.workers.get(queue).map(Mutex::try_lock) else {
            return false;
        };
        let (Some(vring), Some(memory)) = (worker.vring.clone(), self.memory.get()) else {
            return false;
        };
        queue_ready(&vring) && complete_in_order(&vring, &memory, &mut worker).is_ok()
    }

    fn worker(&self, queue: usize) -> Option<std::sync::MutexGuard<'_, QueueWorker>> {
        self.workers.get(queue).map(lock)
    }

    /// Runs every available request of `vring`; with EVENT_IDX, loops until no new request
    /// arrived while notifications were off.
    fn process_vring(&self, vring: &Vring, queue: usize) -> io::Result<()> {
        let (Some(memory), Some(mut worker)) = (self.memory.get(), self.worker(queue)) else {
            return Ok(());
        };
        worker.vring.get_or_insert_with(|| vring.clone());
        if !self.disk.mirror.serves_guest() {
            // A frontend connected to a secondary (or a demoted primary): nothing is popped,
            // so nothing is applied or completed, not even with an error; the requests stay
            // on the ring for a promoted copy's next kick.
            Metrics::add(&self.disk.metrics.held_kicks, 1);
            if let Some(suppressed) = self.disk.bad_request_log.admit() {
                warn!(
                    "queue {queue}: a request arrived while this copy is secondary: held, \
                     not served until promoted ({suppressed} similar lines suppressed)"
                );
            }
            return Ok(());
        }
        let event_idx = self.event_idx.load(std::sync::atomic::Ordering::Relaxed);
        loop {
            // Stopped (GET_VRING_BASE) before or while we ran: a kick that raced the stop.
            if !queue_ready(vring) {
                return Ok(());
            }
            if event_idx {
                vring.disable_notification().map_err(queue_error)?;
            }
            self.process_available(vring, &memory, &mut worker)?;
            if !event_idx || !vring.enable_notification().map_err(queue_error)? {
                return Ok(());
            }
        }
    }

    fn process_available(
        &self,
        vring: &Vring,
        memory: &AtomicMemory,
        worker: &mut QueueWorker,
    ) -> io::Result<()> {
        let guest = memory.memory();
        let chains: Vec<_> = vring
            .get_mut()
            .get_queue_mut()
            .iter(guest.clone())
            .map_err(queue_error)?
            .collect();
        for chain in chains {
            let executed = worker.executor.execute(chain);
            worker.pending.push_back(executed);
        }
        complete_in_order(vring, memory, worker)
    }

    /// Completes what the peer has acknowledged since the worker last looked.
    fn complete_acknowledged(&self, vring: &Vring, queue: usize) -> io::Result<()> {
        let (Some(memory), Some(mut worker)) = (self.memory.get(), self.worker(queue)) else {
            return Ok(());
        };
        // Cleared even on a stopped ring: the waker is level-triggered in our epoll loop.
        if let Some(waker) = self.wakers.get(queue) {
            waker.clear();
        }
        // A stopped ring left nothing pending (see `stop_vring`): this is a late wake-up of
        // a rewound request, whose call fd may be gone.
        if !queue_ready(vring) {
            return Ok(());
        }
        complete_in_order(vring, &memory, &mut worker)
    }

    /// Brings a queue to rest for GET_VRING_BASE (the library already marked the ring not
    /// ready, so nothing new is popped): completes what can complete, waits up to
    /// [`STOP_DRAIN_TIMEOUT`] for the rest, and rewinds the ring over what still waits.
    fn drain_queue(&self, queue: usize) {
        let Some(waker) = self.wakers.get(queue) else {
            return;
        };
        // A request waiting behind an overlapping one (that only the peer can complete)
        // gives up, so that the worker lets go of its lock.
        waker.set_stopping(true);
        self.drain_stopping_queue(queue, waker);
        waker.set_stopping(false);
    }

    fn drain_stopping_queue(&self, queue: usize, waker: &Waker) {
        let Some(mut worker) = self.worker(queue) else {
            return;
        };
        // Holding the worker's lock: the worker is not executing anything for this queue.
        let (Some(vring), Some(memory)) = (worker.vring.clone(), self.memory.get()) else {
            return;
        };
        let deadline = Instant::now() + STOP_DRAIN_TIMEOUT;
        loop {
            waker.clear();
            if let Err(error) = complete_in_order(&vring, &memory, &mut worker) {
                warn!("queue {queue}: completing before the stop failed: {error}");
                break;
            }
            let now = Instant::now();
            // Holding for a lost peer (or fenced): nothing will complete soon, so the stop
            // (e.g. ftvmd pausing the guest) does not wait for it.
            if worker.pending.is_empty() || now >= deadline || !self.disk.mirror.acknowledging() {
                break;
            }
            if let Err(error) = wait_for_wake(waker, deadline - now) {
                warn!("queue {queue}: cannot wait for completions: {error}");
                break;
            }
        }
        rewind(&vring, &mut worker, queue);
    }
}

fn queue_ready(vring: &Vring) -> bool {
    vring.get_ref().get_queue().ready()
}

/// Puts the requests that are still pending back on the ring: they are dropped from the
/// list, and the ring's next avail index goes back to the first of them. Requests complete
/// strictly in order, so the pending ones are exactly the last popped.
fn rewind(vring: &Vring, worker: &mut QueueWorker, queue: usize) {
    if worker.pending.is_empty() {
        return;
    }
    // Indices are modulo 2^16, so the count is too.
    let count = worker.pending.len() as u16;
    let next_avail = vring.queue_next_avail();
    let first_pending = next_avail.wrapping_sub(count);
    vring.set_queue_next_avail(first_pending);
    worker.pending.clear();
    warn!(
        "queue {queue}: stopped with {count} request(s) still waiting after {} ms; \
         the ring is rewound from {next_avail} to {first_pending} and they run again",
        STOP_DRAIN_TIMEOUT.as_millis()
    );
}

/// Sleeps until `waker` fires or `timeout` passes.
fn wait_for_wake(waker: &Waker, timeout: Duration) -> io::Result<()> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        waker.eventfd().as_raw_fd(),
        EpollEvent::new(EventSet::IN, 0),
    )?;
    let mut events = [EpollEvent::default(); 1];
    let timeout_ms = i32::try_from(timeout.as_millis().max(1)).unwrap_or(i32::MAX);
    match epoll.wait(timeout_ms, &mut events) {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::Interrupted => Ok(()),
        Err(error) => Err(error),
    }
}

/// Writes the status byte and puts on the used ring every request at the front of the list
/// whose outcome is known, stopping at the first that is still waiting.
fn complete_in_order(
    vring: &Vring,
    memory: &AtomicMemory,
    worker: &mut QueueWorker,
) -> io::Result<()> {
    let guest = memory.memory();
    let mut completed = false;
    while let Some(front) = worker.pending.front() {
        let Some(status) = front.outcome.status() else {
            break;
        };
        if let Some(address) = front.status_address {
            // The guest may have unmapped the buffer meanwhile; the request completes anyway.
            let _ = guest.write_obj(status as u8, address);
        }
        vring
            .add_used(front.head, front.used_len)
            .map_err(queue_error)?;
        worker.pending.pop_front();
        completed = true;
    }
    let notify = completed && vring.needs_notification().map_err(queue_error)?;
    if notify {
        vring.signal_used_queue()?;
    }
    log::trace!(
        "completions: {} waiting, signalled {notify}",
        worker.pending.len()
    );
    Ok(())
}

fn queue_error(error: virtio_queue::Error) -> io::Error {
    io::Error::other(format!("virtqueue: {error}"))
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = TrackedBitmap;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        virtio_features(self.disk.limits.read_only)
    }

    fn acked_features(&self, features: u64) {
        debug!("frontend acked features {features:#x}");
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        self.event_idx
            .store(event_idx, std::sync::atomic::Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx
            .store(enabled, std::sync::atomic::Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_slice(&self.config, offset, size)
    }

    fn update_memory(&self, memory: AtomicMemory) -> io::Result<()> {
        self.disk.guest_pages.set_memory(&memory.memory());
        self.memory.set(memory);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|queue| 1u64 << queue).collect()
    }

    /// GET_VRING_BASE (QEMU's `stop`, a snapshot, migration): when this returns, the queue's
    /// worker executes nothing, every request with a known outcome is completed and the guest
    /// signalled while its call fd is still set, and the ring is rewound over the rest.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let queue = queue_index as usize;
        debug!("queue {queue}: stopping");
        self.drain_queue(queue);
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
        if evset != EventSet::IN {
            return Ok(());
        }
        // One queue per thread: the thread's only vring is its queue, `thread_id` its index.
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        log::trace!("queue {thread_id}: event {device_event}");
        let result = if u64::from(device_event) == self.wake_event_id() {
            self.complete_acknowledged(vring, thread_id)
        } else {
            self.process_vring(vring, thread_id)
        };
        // An error returned from here silently ends this queue's worker, so it is logged
        // (rate-limited: the guest controls the ring) and swallowed; the queue stays alive
        // for the next kick.
        if let Err(error) = result {
            if let Some(suppressed) = self.disk.bad_request_log.admit() {
                error!("queue {thread_id}: {error} ({suppressed} similar lines suppressed)");
            }
        }
        Ok(())
    }
}
