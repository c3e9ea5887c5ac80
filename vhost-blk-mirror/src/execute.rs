//! Executes one virtio-blk descriptor chain against the [`Mirror`].
//!
//! This is the only module that sees descriptor chains. The header, discard segments and
//! the serial go through `virtio_queue`'s `Reader`/`Writer`. Read and write data do not pass
//! through a buffer of ours: the chain's data descriptors become [`GuestBuffers`], host slices
//! of guest memory that the image reads into and writes from with `preadv`/`pwritev`
//! (`guest_io.rs`). Every byte a read lands in guest memory is marked in the dirty log when
//! the frontend asked for one, and in [`Disk::guest_pages`] always, as vm-memory marks its
//! own writes. A primary's write still takes its data once out of guest memory, into the
//! buffer that goes to the image and the peer (see `Mirror::write`). The status byte is not
//! written here: the worker writes it when the request completes, strictly in the order the
//! guest made requests available (see `backend.rs`).

use std::io::{self, Read, Write};
use std::ops::Deref;
use std::sync::Arc;

use daemon_util::guest_pages::GuestPages;
use log::warn;
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::bitmap::{BitmapSlice, WithBitmapSlice};
use vm_memory::{Address, GuestAddress, GuestMemory, Permissions};

use crate::guest_io::{GuestBufferError, GuestBuffers};
use crate::image::buffer_fault;
use crate::metrics::{Metrics, RateLimitedLog};
use crate::mirror::{Mirror, MAX_REQUEST_BYTES};
use crate::request::{
    check_data_range, id_bytes, parse_header, parse_segments, DiskLimits, Header, RequestError,
    RequestKind, Status, HEADER_LEN, ID_LEN, SEGMENT_LEN,
};
use crate::ticket::{Outcome, Waker};

/// What a worker needs to execute requests: shared, read-only after start.
#[derive(Debug)]
pub struct Disk {
    pub mirror: Mirror,
    pub limits: DiskLimits,
    pub serial: String,
    pub metrics: Metrics,
    pub bad_request_log: RateLimitedLog,
    /// The guest pages this daemon wrote, for `dirty-pages` (Level 3); kept across
    /// connections.
    pub guest_pages: GuestPages,
}

/// Outcome of a request that reached the image but failed there.
#[derive(Debug)]
enum Failure {
    Refused(RequestError),
    Io(io::Error),
    /// The guest buffer could not be read or written (it vanished or was too short).
    Guest(io::Error),
}

/// A request that was executed: where its status byte goes, how much it wrote into guest
/// memory, and how it ends.
#[derive(Debug)]
pub struct Executed {
    pub head: u16,
    /// Guest address of the status byte; `None` when the chain has no room for one.
    pub status_address: Option<GuestAddress>,
    /// Used length: data written into guest memory plus the status byte.
    pub used_len: u32,
    pub outcome: Outcome,
}

/// A queue worker's executor: the shared disk, the worker's buffer for discard and
/// write-zeroes segment lists, and its waker.
#[derive(Debug)]
pub struct Executor {
    disk: Arc<Disk>,
    segments: Vec<u8>,
    waker: Arc<Waker>,
}

impl Executor {
    pub fn new(disk: Arc<Disk>, waker: Arc<Waker>) -> Executor {
        Executor {
            disk,
            segments: Vec::new(),
            waker,
        }
    }

    /// Executes one chain. Data reads are done when this returns; writes may still wait for
    /// the peer (see [`Executed::outcome`]).
    pub fn execute<M>(&mut self, chain: DescriptorChain<M>) -> Executed
    where
        M: Deref + Clone,
        M::Target: GuestMemory + Sized,
        for<'a> <M::Target as GuestMemory>::Bitmap: WithBitmapSlice<'a>,
    {
        let head = chain.head_index();
        let refused = |executor: &Self, error: RequestError| {
            executor.refuse(&error);
            Executed {
                head,
                status_address: None,
                used_len: 0,
                outcome: Outcome::Ready(Status::IoError),
            }
        };
        // The status byte is the last byte of the last non-empty writable descriptor.
        let status_address = chain
            .clone()
            .writable()
            .filter(|descriptor| descriptor.len() > 0)
            .last()
            .and_then(|descriptor| {
                descriptor
                    .addr()
                    .checked_add(u64::from(descriptor.len()) - 1)
            });
        let Some(status_address) = status_address else {
            return refused(self, RequestError::NoStatus);
        };
        let memory = chain.memory();
        let Ok(mut writer) = chain.clone().writer(memory) else {
            return refused(
                self,
                RequestError::BadChain("writable buffer outside guest memory"),
            );
        };
        let Some(data_capacity) = writer.available_bytes().checked_sub(1) else {
            return refused(self, RequestError::NoStatus);
        };
        if writer.split_at(data_capacity).is_err() {
            return refused(self, RequestError::NoStatus);
        }
        let result = match chain.clone().reader(memory) {
            Ok(mut reader) => self.run(&chain, &mut reader, &mut writer),
            Err(_) => Err(Failure::Refused(RequestError::BadChain(
                "readable buffer outside guest memory",
            ))),
        };
        let (outcome, data_written) = match result {
            Ok(done) => done,
            Err(failure) => (Outcome::Ready(self.fail(failure)), 0),
        };
        Executed {
            head,
            status_address: Some(status_address),
            // Descriptor lengths are u32, so data_written + 1 fits unless the chain lied.
            used_len: u32::try_from(data_written + 1).unwrap_or(u32::MAX),
            outcome,
        }
    }

    fn refuse(&self, error: &RequestError) {
        Metrics::add(&self.disk.metrics.rejected_requests, 1);
        if let Some(suppressed) = self.disk.bad_request_log.admit() {
            warn!("refused guest request: {error} ({suppressed} similar lines suppressed)");
        }
    }

    fn fail(&self, failure: Failure) -> Status {
        match failure {
            Failure::Refused(error) => {
                self.refuse(&error);
                error.status()
            }
            Failure::Guest(error) => {
                self.refuse(&RequestError::BadChain(
                    "guest buffer shorter than announced",
                ));
                log::debug!("guest buffer error: {error}");
                Status::IoError
            }
            Failure::Io(error) => {
                Metrics::add(&self.disk.metrics.io_errors, 1);
                if let Some(suppressed) = self.disk.bad_request_log.admit() {
                    warn!(
                        "I/O error on image {}: {error} ({suppressed} similar lines suppressed)",
                        self.disk.mirror.image().path().display()
                    );
                }
                Status::IoError
            }
        }
    }

    fn run<M, B>(
        &mut self,
        chain: &DescriptorChain<M>,
        reader: &mut Reader<'_, B>,
        writer: &mut Writer<'_, B>,
    ) -> Result<(Outcome, usize), Failure>
    where
        M: Deref + Clone,
        M::Target: GuestMemory + Sized,
        for<'a> <M::Target as GuestMemory>::Bitmap: WithBitmapSlice<'a>,
        B: BitmapSlice,
    {
        let mut raw_header = [0u8; HEADER_LEN];
        let header_len = read_up_to(reader, &mut raw_header).map_err(Failure::Guest)?;
        let header = parse_header(&raw_header[..header_len]).map_err(Failure::Refused)?;
        let metrics = &self.disk.metrics;
        let ok = Outcome::Ready(Status::Ok);
        match header.kind {
            RequestKind::Read => {
                Metrics::add(&metrics.read_requests, 1);
                self.read(&header, chain, writer.available_bytes())
                    .map(|len| (ok, len))
            }
            RequestKind::Write => {
                Metrics::add(&metrics.write_requests, 1);
                self.write(&header, chain, reader.available_bytes())
                    .map(|outcome| (outcome, 0))
            }
            RequestKind::Flush => {
                Metrics::add(&metrics.flush_requests, 1);
                let outcome = self.disk.mirror.flush(&self.waker).map_err(Failure::Io)?;
                Ok((outcome, 0))
            }
            RequestKind::GetId => {
                Metrics::add(&metrics.get_id_requests, 1);
                let id = id_bytes(&self.disk.serial);
                let len = writer.available_bytes().min(ID_LEN);
                writer.write_all(&id[..len]).map_err(Failure::Guest)?;
                Ok((ok, len))
            }
            RequestKind::Discard | RequestKind::WriteZeroes => self
                .discard_or_zero(header.kind, reader)
                .map(|outcome| (outcome, 0)),
        }
    }

    /// A read of `len` bytes (the writable descriptors but the status byte), straight into
    /// guest memory.
    fn read<M>(
        &mut self,
        header: &Header,
        chain: &DescriptorChain<M>,
        len: usize,
    ) -> Result<usize, Failure>
    where
        M: Deref + Clone,
        M::Target: GuestMemory + Sized,
        for<'a> <M::Target as GuestMemory>::Bitmap: WithBitmapSlice<'a>,
    {
        let offset =
            check_data_range(header, len as u64, &self.disk.limits).map_err(Failure::Refused)?;
        let descriptors = chain
            .clone()
            .writable()
            .map(|descriptor| (descriptor.addr(), descriptor.len() as usize));
        let mut buffers =
            GuestBuffers::new(chain.memory(), descriptors, Permissions::Write, 0, len)
                .map_err(bad_buffers)?;
        self.disk
            .mirror
            .read(offset, &mut buffers)
            .map_err(image_or_guest)?;
        Metrics::add(&self.disk.metrics.read_bytes, len as u64);
        Ok(len)
    }

    /// A write of `len` bytes (the readable descriptors after the header), straight from
    /// guest memory (a primary copies them once, see `Mirror::write`).
    fn write<M>(
        &mut self,
        header: &Header,
        chain: &DescriptorChain<M>,
        len: usize,
    ) -> Result<Outcome, Failure>
    where
        M: Deref + Clone,
        M::Target: GuestMemory + Sized,
        for<'a> <M::Target as GuestMemory>::Bitmap: WithBitmapSlice<'a>,
    {
        let offset =
            check_data_range(header, len as u64, &self.disk.limits).map_err(Failure::Refused)?;
        if len > MAX_REQUEST_BYTES {
            return Err(Failure::Refused(RequestError::TooLarge(len)));
        }
        let descriptors = chain
            .clone()
            .readable()
            .map(|descriptor| (descriptor.addr(), descriptor.len() as usize));
        let buffers = GuestBuffers::new(
            chain.memory(),
            descriptors,
            Permissions::Read,
            HEADER_LEN,
            len,
        )
        .map_err(bad_buffers)?;
        let outcome = self
            .disk
            .mirror
            .write(offset, buffers, &self.waker)
            .map_err(image_or_guest)?;
        Metrics::add(&self.disk.metrics.written_bytes, len as u64);
        Ok(outcome)
    }

    fn discard_or_zero<B: BitmapSlice>(
        &mut self,
        kind: RequestKind,
        reader: &mut Reader<'_, B>,
    ) -> Result<Outcome, Failure> {
        let metrics = &self.disk.metrics;
        match kind {
            RequestKind::Discard => Metrics::add(&metrics.discard_requests, 1),
            _ => Metrics::add(&metrics.write_zeroes_requests, 1),
        }
        let limit = self.disk.limits.max_discard_segments as usize * SEGMENT_LEN;
        let len = reader.available_bytes();
        if len > limit {
            return Err(Failure::Refused(RequestError::TooManySegments {
                count: len / SEGMENT_LEN,
                limit: self.disk.limits.max_discard_segments,
            }));
        }
        let buffer = grown(&mut self.segments, len);
        reader.read_exact(buffer).map_err(Failure::Guest)?;
        let segments = parse_segments(kind, buffer, &self.disk.limits).map_err(Failure::Refused)?;
        let mirror = &self.disk.mirror;
        let mut outcomes = Vec::with_capacity(segments.len());
        for segment in segments {
            let outcome = match kind {
                RequestKind::Discard => mirror.discard(segment.offset, segment.len, &self.waker),
                _ => mirror.write_zeroes(segment.offset, segment.len, segment.unmap, &self.waker),
            };
            outcomes.push(outcome.map_err(Failure::Io)?);
        }
        Ok(Outcome::all(outcomes))
    }
}

/// Returns the first `len` bytes of a worker's reused buffer, growing it up to `len`.
fn grown(buffer: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buffer.len() < len {
        buffer.resize(len, 0);
    }
    &mut buffer[..len]
}

/// The data descriptors did not map (the `Reader`/`Writer` over the same chain did, so this
/// means the chain changed under us: the guest's doing).
fn bad_buffers(error: GuestBufferError) -> Failure {
    log::debug!("guest data buffers: {error}");
    Failure::Refused(RequestError::BadChain("data buffer outside guest memory"))
}

/// An error of a read or write straight between guest memory and the image: a fault on
/// guest memory is the guest's, anything else the image's.
fn image_or_guest(error: io::Error) -> Failure {
    if buffer_fault(&error) {
        Failure::Guest(error)
    } else {
        Failure::Io(error)
    }
}

/// Reads as many bytes as are available, up to `buf.len()`.
fn read_up_to<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
