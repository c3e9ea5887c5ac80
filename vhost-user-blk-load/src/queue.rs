//! One virtqueue of the device: its split ring, kick and call eventfds, and an arena of guest
//! memory for request buffers. Typed virtio-blk requests, raw descriptor chains, and the
//! submit-now / reap-later API the benchmark uses to keep many requests in flight.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::arena::Arena;
use crate::blk::{Request, Response, HEADER_BYTES, STATUS_UNWRITTEN};
use crate::memory::{GuestRam, MemoryError, PAGE_SIZE};
use crate::ring::{encode_table, Descriptor, RingError, RingLayout, SplitRing, DESCRIPTOR_BYTES};

const CALL_TOKEN: u64 = 0;
const SOCKET_TOKEN: u64 = 1;

/// Errors of a queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("virtqueue error")]
    Ring(#[from] RingError),
    #[error("guest memory error")]
    Memory(#[from] MemoryError),
    #[error("no room for {len} bytes in the queue's guest memory")]
    OutOfMemory { len: u64 },
    #[error("cannot set up the kick/call eventfds or their epoll")]
    Setup(#[source] io::Error),
    #[error("waiting for the call eventfd failed")]
    Wait(#[source] io::Error),
    #[error("cannot write the kick eventfd")]
    Kick(#[source] io::Error),
    #[error("no completion within {waited_ms} ms ({in_flight} requests in flight)")]
    Timeout { waited_ms: u64, in_flight: usize },
    #[error("the backend closed the connection")]
    BackendGone,
    #[error("request {0} is neither in flight nor completed")]
    UnknownRequest(u64),
}

type Result<T> = std::result::Result<T, QueueError>;

/// Where a queue lives and how it behaves; built by the device.
#[derive(Clone, Copy, Debug)]
pub struct QueueSetup {
    /// Queue index (vring number).
    pub index: u16,
    /// Ring addresses.
    pub layout: RingLayout,
    /// First guest address of the buffer arena.
    pub arena_start: u64,
    /// Arena length in bytes.
    pub arena_len: u64,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub event_idx: bool,
    /// Post typed requests through indirect tables (needs INDIRECT_DESC).
    pub indirect: bool,
    /// Default wait for the typed one-shot calls.
    pub timeout: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Allocation {
    address: u64,
    len: u64,
}

#[derive(Debug)]
struct Typed {
    buffer: Allocation,
    /// Bytes the device writes before the status byte (IN and GET_ID data).
    in_len: u32,
    status_address: u64,
}

#[derive(Debug)]
struct Pending {
    id: u64,
    typed: Option<Typed>,
    table: Option<Allocation>,
    submitted_at: Instant,
}

/// A finished request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The id `enqueue`/`submit` returned.
    pub id: u64,
    /// The length the device put in the used ring.
    pub used_len: u32,
    /// From submit to the moment we saw it in the used ring.
    pub latency: Duration,
    /// Status and data for typed requests; `None` for raw chains.
    pub response: Option<Response>,
}

impl Completion {
    /// The status byte of a typed request.
    pub fn status(&self) -> Option<u8> {
        self.response.as_ref().map(|response| response.status)
    }
}

/// One virtqueue, driver side. `Send`: the benchmark drives each queue from its own thread.
#[derive(Debug)]
pub struct BlkQueue {
    index: u16,
    memory: Arc<GuestRam>,
    ring: SplitRing,
    arena: Arena,
    kick: EventFd,
    call: EventFd,
    epoll: Epoll,
    _socket: UnixStream,
    pending: Vec<Option<Pending>>,
    in_flight: usize,
    done: VecDeque<Completion>,
    next_id: u64,
    indirect: bool,
    timeout: Duration,
}

impl BlkQueue {
    /// Lays out the ring and creates the eventfds; `socket` (a duplicate of the vhost-user
    /// socket) keeps the connection open and reports the backend's hangup.
    pub fn new(memory: Arc<GuestRam>, setup: QueueSetup, socket: UnixStream) -> Result<Self> {
        let ring = SplitRing::new(memory.clone(), setup.layout, setup.event_idx)?;
        let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(QueueError::Setup)?;
        let call = EventFd::new(libc::EFD_NONBLOCK).map_err(QueueError::Setup)?;
        let epoll = Epoll::new().map_err(QueueError::Setup)?;
        epoll
            .ctl(
                ControlOperation::Add,
                call.as_raw_fd(),
                EpollEvent::new(EventSet::IN, CALL_TOKEN),
            )
            .map_err(QueueError::Setup)?;
        epoll
            .ctl(
                ControlOperation::Add,
                socket.as_raw_fd(),
                EpollEvent::new(EventSet::READ_HANG_UP, SOCKET_TOKEN),
            )
            .map_err(QueueError::Setup)?;
        let size = usize::from(setup.layout.size);
        Ok(Self {
            index: setup.index,
            memory,
            ring,
            arena: Arena::new(setup.arena_start, setup.arena_len),
            kick,
            call,
            epoll,
            _socket: socket,
            pending: (0..size).map(|_| None).collect(),
            in_flight: 0,
            done: VecDeque::new(),
            next_id: 0,
            indirect: setup.indirect,
            timeout: setup.timeout,
        })
    }

    /// The vring index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Ring addresses (guest physical).
    pub fn layout(&self) -> RingLayout {
        self.ring.layout()
    }

    /// The eventfd we write to kick the backend.
    pub fn kick_eventfd(&self) -> &EventFd {
        &self.kick
    }

    /// The eventfd the backend writes when it used buffers.
    pub fn call_eventfd(&self) -> &EventFd {
        &self.call
    }

    /// Guest memory, for raw tests that build their own buffers.
    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    /// Requests submitted and not yet seen completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Free descriptors in the ring.
    pub fn free_descriptors(&self) -> usize {
        self.ring.free_descriptors()
    }

    /// The default timeout of the one-shot calls.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the default timeout of the one-shot calls.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn alloc(&mut self, len: u64, align: u64) -> Result<Allocation> {
        let address = self
            .arena
            .alloc(len, align)
            .ok_or(QueueError::OutOfMemory { len })?;
        Ok(Allocation { address, len })
    }

    fn release(&mut self, allocation: Option<Allocation>) {
        if let Some(allocation) = allocation {
            self.arena.free(allocation.address, allocation.len);
        }
    }

    /// Allocates a page-aligned buffer of `len` bytes in this queue's guest memory.
    pub fn alloc_buffer(&mut self, len: u64) -> Result<u64> {
        Ok(self.alloc(len, PAGE_SIZE)?.address)
    }

    /// Frees a buffer from [`BlkQueue::alloc_buffer`] (same `len`).
    pub fn free_buffer(&mut self, address: u64, len: u64) {
        self.arena.free(address, len);
    }

    /// Writes `chain` (through an indirect table when `indirect`), puts its head in the avail
    /// ring and publishes the avail index. Returns the head and the table allocation.
    fn post(&mut self, chain: &[Descriptor], indirect: bool) -> Result<(u16, Option<Allocation>)> {
        if !indirect {
            let head = self.ring.add_chain(chain)?;
            self.ring.push_avail(head)?;
            self.ring.publish()?;
            return Ok((head, None));
        }
        let table_bytes = encode_table(chain);
        let table = self.alloc(table_bytes.len() as u64, DESCRIPTOR_BYTES)?;
        let count = chain.len() as u32;
        let posted = self
            .memory
            .write(table.address, &table_bytes)
            .map_err(QueueError::from)
            .and_then(|()| {
                Ok(self
                    .ring
                    .add_chain(&[Descriptor::indirect_table(table.address, count)])?)
            });
        let head = match posted {
            Ok(head) => head,
            Err(error) => {
                self.release(Some(table));
                return Err(error);
            }
        };
        self.ring.push_avail(head)?;
        self.ring.publish()?;
        Ok((head, Some(table)))
    }

    fn track(&mut self, head: u16, typed: Option<Typed>, table: Option<Allocation>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.pending[usize::from(head)] = Some(Pending {
            id,
            typed,
            table,
            submitted_at: Instant::now(),
        });
        self.in_flight += 1;
        id
    }

    /// Lays out a typed request (data page-aligned, then header, then status byte), posts it
    /// and publishes it without kicking. Returns its id.
    pub fn enqueue(&mut self, request: &Request) -> Result<u64> {
        let out = request.out_payload();
        let data_len = match &out {
            Some(data) => u32::try_from(data.len()).map_err(|_| QueueError::OutOfMemory {
                len: data.len() as u64,
            })?,
            None => request.in_len(),
        };
        let data_span = u64::from(data_len).next_multiple_of(16);
        let buffer = self.alloc(data_span + 32, PAGE_SIZE)?;
        let header_address = buffer.address + data_span;
        let status_address = header_address + u64::from(HEADER_BYTES);
        let mut chain = vec![Descriptor::readable(header_address, HEADER_BYTES)];
        if data_len > 0 {
            chain.push(match out {
                Some(_) => Descriptor::readable(buffer.address, data_len),
                None => Descriptor::writable(buffer.address, data_len),
            });
        }
        chain.push(Descriptor::writable(status_address, 1));
        let written = self.write_request(request, out.as_deref(), buffer.address, header_address);
        let posted = written.and_then(|()| self.post(&chain, self.indirect));
        let (head, table) = match posted {
            Ok(posted) => posted,
            Err(error) => {
                self.release(Some(buffer));
                return Err(error);
            }
        };
        let typed = Typed {
            buffer,
            in_len: request.in_len(),
            status_address,
        };
        Ok(self.track(head, Some(typed), table))
    }

    fn write_request(
        &self,
        request: &Request,
        out: Option<&[u8]>,
        data_address: u64,
        header_address: u64,
    ) -> Result<()> {
        self.memory.write(header_address, &request.header())?;
        self.memory.write(
            header_address + u64::from(HEADER_BYTES),
            &[STATUS_UNWRITTEN],
        )?;
        if let Some(data) = out {
            self.memory.write(data_address, data)?;
        }
        Ok(())
    }

    /// Kicks the backend if it asked for kicks (EVENT_IDX / NO_NOTIFY) since the last kick.
    pub fn kick(&mut self) -> Result<()> {
        if self.ring.needs_kick()? {
            self.kick.write(1).map_err(QueueError::Kick)?;
        }
        Ok(())
    }

    /// `enqueue` then `kick`.
    pub fn submit(&mut self, request: &Request) -> Result<u64> {
        let id = self.enqueue(request)?;
        self.kick()?;
        Ok(id)
    }

    /// Posts an arbitrary chain (addresses, lengths, flags and links as given) and kicks.
    /// Completes with `response: None`; the caller reads its own status byte.
    pub fn submit_raw(&mut self, chain: &[Descriptor]) -> Result<u64> {
        let (head, table) = self.post(chain, false)?;
        let id = self.track(head, None, table);
        self.kick()?;
        Ok(id)
    }

    /// Writes `table` as an indirect descriptor table (positions are table indexes), posts one
    /// INDIRECT descriptor pointing at it, and kicks.
    pub fn submit_raw_indirect(&mut self, table: &[Descriptor]) -> Result<u64> {
        let (head, table) = self.post(table, true)?;
        let id = self.track(head, None, table);
        self.kick()?;
        Ok(id)
    }

    /// Publishes `head` in the avail ring as if it were a chain head (any value, even out of
    /// range or already in flight) and kicks. Nothing is tracked: a completion of it is an error.
    pub fn publish_raw_head(&mut self, head: u16) -> Result<()> {
        self.ring.push_avail(head)?;
        self.ring.publish()?;
        self.kick.write(1).map_err(QueueError::Kick)
    }

    /// Sets avail->idx to any value and kicks (e.g. jump ahead by more than the queue size).
    pub fn set_avail_index_raw(&mut self, index: u16) -> Result<()> {
        self.ring.set_avail_index(index)?;
        self.kick.write(1).map_err(QueueError::Kick)
    }

    fn finish(&mut self, pending: Pending, used_len: u32, seen_at: Instant) -> Result<Completion> {
        let response = match &pending.typed {
            Some(typed) => {
                let mut status = [STATUS_UNWRITTEN];
                self.memory.read(typed.status_address, &mut status)?;
                let data = self
                    .memory
                    .read_vec(typed.buffer.address, typed.in_len as usize)?;
                Some(Response {
                    status: status[0],
                    data,
                    used_len,
                })
            }
            None => None,
        };
        self.release(pending.typed.map(|typed| typed.buffer));
        self.release(pending.table);
        Ok(Completion {
            id: pending.id,
            used_len,
            latency: seen_at.saturating_duration_since(pending.submitted_at),
            response,
        })
    }

    /// Moves everything the device returned into the completion list; returns how many.
    pub fn poll(&mut self) -> Result<usize> {
        let seen_at = Instant::now();
        let mut count = 0;
        while let Some(used) = self.ring.pop_used()? {
            let pending =
                self.pending[usize::from(used.head)]
                    .take()
                    .ok_or(RingError::UnknownUsedId {
                        id: u32::from(used.head),
                    })?;
            self.in_flight -= 1;
            let completion = self.finish(pending, used.len, seen_at)?;
            self.done.push_back(completion);
            count += 1;
        }
        Ok(count)
    }

    /// Sleeps on the call eventfd until the used ring has news (true) or `deadline` passes
    /// (false). A hangup of the backend's socket is an error once nothing is left to take.
    fn wait_for_used(&mut self, deadline: Instant) -> Result<bool> {
        let mut events = [EpollEvent::default(); 2];
        loop {
            if self.ring.arm_interrupt()? {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            let remaining_ms = (deadline - now).as_micros().div_ceil(1000);
            let timeout_ms = i32::try_from(remaining_ms).unwrap_or(i32::MAX);
            let count = match self.epoll.wait(timeout_ms, &mut events) {
                Ok(count) => count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(QueueError::Wait(error)),
            };
            for event in &events[..count] {
                if event.data() == SOCKET_TOKEN {
                    // Take what the device finished before it went away first.
                    if self.ring.has_used()? {
                        return Ok(true);
                    }
                    return Err(QueueError::BackendGone);
                }
                // Clears the eventfd; WouldBlock only means another wake-up drained it.
                let _ = self.call.read();
            }
        }
    }

    fn timeout_error(&self, timeout: Duration) -> QueueError {
        QueueError::Timeout {
            waited_ms: timeout.as_millis() as u64,
            in_flight: self.in_flight,
        }
    }

    /// Waits until at least `min` requests (at most all in flight) have completed, then
    /// returns every completion collected so far. On timeout nothing is lost: completions
    /// stay queued for the next call.
    pub fn reap(&mut self, min: usize, timeout: Duration) -> Result<Vec<Completion>> {
        let deadline = Instant::now() + timeout;
        let wanted = min.min(self.done.len() + self.in_flight);
        loop {
            self.poll()?;
            if self.done.len() >= wanted {
                return Ok(self.done.drain(..).collect());
            }
            if !self.wait_for_used(deadline)? {
                return Err(self.timeout_error(timeout));
            }
        }
    }

    /// Waits for request `id`; other completions seen meanwhile stay queued for `reap`.
    pub fn wait(&mut self, id: u64, timeout: Duration) -> Result<Completion> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll()?;
            if let Some(position) = self.done.iter().position(|done| done.id == id) {
                if let Some(completion) = self.done.remove(position) {
                    return Ok(completion);
                }
            }
            let in_flight = self
                .pending
                .iter()
                .flatten()
                .any(|pending| pending.id == id);
            if !in_flight {
                return Err(QueueError::UnknownRequest(id));
            }
            if !self.wait_for_used(deadline)? {
                return Err(self.timeout_error(timeout));
            }
        }
    }

    /// Submits `request`, waits for it (default timeout) and returns status and data.
    pub fn execute(&mut self, request: &Request) -> Result<Response> {
        let id = self.submit(request)?;
        let completion = self.wait(id, self.timeout)?;
        completion
            .response
            .ok_or(QueueError::UnknownRequest(completion.id))
    }

    /// Reads `len` bytes at `sector`.
    pub fn read(&mut self, sector: u64, len: u32) -> Result<Response> {
        self.execute(&Request::Read { sector, len })
    }

    /// Writes `data` at `sector`.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<Response> {
        self.execute(&Request::Write {
            sector,
            data: data.to_vec(),
        })
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self) -> Result<Response> {
        self.execute(&Request::Flush)
    }

    /// Reads the 20-byte device id.
    pub fn get_id(&mut self) -> Result<Response> {
        self.execute(&Request::GetId)
    }

    /// Discards `sectors` sectors at `sector`.
    pub fn discard(&mut self, sector: u64, sectors: u32) -> Result<Response> {
        self.execute(&Request::Discard { sector, sectors })
    }

    /// Writes zeroes to `sectors` sectors at `sector` (`unmap` lets the device deallocate).
    pub fn write_zeroes(&mut self, sector: u64, sectors: u32, unmap: bool) -> Result<Response> {
        self.execute(&Request::WriteZeroes {
            sector,
            sectors,
            unmap,
        })
    }
}
