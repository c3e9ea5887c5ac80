//! Executes one virtio-blk descriptor chain against the image.
//!
//! This is the only module that sees guest buffers; it copies through a bounded bounce buffer
//! with `virtio_queue`'s `Reader`/`Writer`, so every byte written into guest memory goes through
//! `vm-memory` and is marked in the dirty log when the frontend asked for one. Requests are
//! completed strictly in the order the guest made them available (see the note in
//! `backend.rs` on reconnects).

use std::io::{self, Read, Write};
use std::ops::Deref;
use std::sync::Arc;

use log::warn;
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::bitmap::{BitmapSlice, WithBitmapSlice};
use vm_memory::GuestMemory;

use crate::image::Image;
use crate::metrics::{Metrics, RateLimitedLog};
use crate::request::{
    check_data_range, id_bytes, parse_header, parse_segments, DiskLimits, Header, RequestError,
    RequestKind, Status, HEADER_LEN, ID_LEN, SEGMENT_LEN,
};

/// Largest bounce buffer a worker holds; bigger requests are copied in pieces of this size.
pub const BOUNCE_BYTES: usize = 256 * 1024;

/// What a worker needs to execute requests: shared, read-only after start.
#[derive(Debug)]
pub struct Disk {
    pub image: Image,
    pub limits: DiskLimits,
    pub serial: String,
    pub metrics: Metrics,
    pub bad_request_log: RateLimitedLog,
}

/// Outcome of a request that reached the image but failed there.
#[derive(Debug)]
enum Failure {
    Refused(RequestError),
    Io(io::Error),
    /// The guest buffer could not be read or written (it vanished or was too short).
    Guest(io::Error),
}

/// A queue worker's executor: the shared disk plus the worker's own bounce buffer.
#[derive(Debug)]
pub struct Executor {
    disk: Arc<Disk>,
    bounce: Vec<u8>,
}

impl Executor {
    pub fn new(disk: Arc<Disk>) -> Executor {
        Executor {
            disk,
            bounce: Vec::new(),
        }
    }

    /// Executes one chain and returns the number of bytes written into guest memory (the
    /// used length, status byte included; 0 when the chain has no room for a status).
    pub fn execute<M>(&mut self, chain: DescriptorChain<M>) -> u32
    where
        M: Deref + Clone,
        M::Target: GuestMemory + Sized,
        for<'a> <M::Target as GuestMemory>::Bitmap: WithBitmapSlice<'a>,
    {
        let memory = chain.memory();
        let Ok(mut writer) = chain.clone().writer(memory) else {
            self.refuse(&RequestError::BadChain(
                "writable buffer outside guest memory",
            ));
            return 0;
        };
        let Some(status_offset) = writer.available_bytes().checked_sub(1) else {
            self.refuse(&RequestError::NoStatus);
            return 0;
        };
        let Ok(mut status_writer) = writer.split_at(status_offset) else {
            self.refuse(&RequestError::NoStatus);
            return 0;
        };
        let result = match chain.clone().reader(memory) {
            Ok(mut reader) => self.run(&mut reader, &mut writer),
            Err(_) => Err(Failure::Refused(RequestError::BadChain(
                "readable buffer outside guest memory",
            ))),
        };
        let (status, data_written) = match result {
            Ok(written) => (Status::Ok, written),
            Err(failure) => (self.fail(failure), 0),
        };
        if status_writer.write_all(&[status as u8]).is_err() {
            return 0;
        }
        // The chain's lengths are u32 descriptor lengths; `data_written` never exceeds them.
        u32::try_from(data_written + 1).unwrap_or(u32::MAX)
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
                        self.disk.image.path().display()
                    );
                }
                Status::IoError
            }
        }
    }

    fn run<B: BitmapSlice>(
        &mut self,
        reader: &mut Reader<'_, B>,
        writer: &mut Writer<'_, B>,
    ) -> Result<usize, Failure> {
        let mut raw_header = [0u8; HEADER_LEN];
        let header_len = read_up_to(reader, &mut raw_header).map_err(Failure::Guest)?;
        let header = parse_header(&raw_header[..header_len]).map_err(Failure::Refused)?;
        let metrics = &self.disk.metrics;
        match header.kind {
            RequestKind::Read => {
                Metrics::add(&metrics.read_requests, 1);
                self.read(&header, writer)
            }
            RequestKind::Write => {
                Metrics::add(&metrics.write_requests, 1);
                self.write(&header, reader).map(|()| 0)
            }
            RequestKind::Flush => {
                Metrics::add(&metrics.flush_requests, 1);
                self.disk.image.flush().map_err(Failure::Io).map(|()| 0)
            }
            RequestKind::GetId => {
                Metrics::add(&metrics.get_id_requests, 1);
                let id = id_bytes(&self.disk.serial);
                let len = writer.available_bytes().min(ID_LEN);
                writer.write_all(&id[..len]).map_err(Failure::Guest)?;
                Ok(len)
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                self.discard_or_zero(header.kind, reader).map(|()| 0)
            }
        }
    }

    fn read<B: BitmapSlice>(
        &mut self,
        header: &Header,
        writer: &mut Writer<'_, B>,
    ) -> Result<usize, Failure> {
        let len = writer.available_bytes();
        let offset =
            check_data_range(header, len as u64, &self.disk.limits).map_err(Failure::Refused)?;
        let mut done = 0usize;
        while done < len {
            let chunk = (len - done).min(BOUNCE_BYTES);
            let buffer = bounce(&mut self.bounce, chunk);
            self.disk
                .image
                .read_at(buffer, offset + done as u64)
                .map_err(Failure::Io)?;
            writer.write_all(buffer).map_err(Failure::Guest)?;
            done += chunk;
        }
        Metrics::add(&self.disk.metrics.read_bytes, len as u64);
        Ok(len)
    }

    fn write<B: BitmapSlice>(
        &mut self,
        header: &Header,
        reader: &mut Reader<'_, B>,
    ) -> Result<(), Failure> {
        let len = reader.available_bytes();
        let offset =
            check_data_range(header, len as u64, &self.disk.limits).map_err(Failure::Refused)?;
        let mut done = 0usize;
        while done < len {
            let chunk = (len - done).min(BOUNCE_BYTES);
            let buffer = bounce(&mut self.bounce, chunk);
            reader.read_exact(buffer).map_err(Failure::Guest)?;
            self.disk
                .image
                .write_at(buffer, offset + done as u64)
                .map_err(Failure::Io)?;
            done += chunk;
        }
        Metrics::add(&self.disk.metrics.written_bytes, len as u64);
        Ok(())
    }

    fn discard_or_zero<B: BitmapSlice>(
        &mut self,
        kind: RequestKind,
        reader: &mut Reader<'_, B>,
    ) -> Result<(), Failure> {
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
        let buffer = bounce(&mut self.bounce, len);
        reader.read_exact(buffer).map_err(Failure::Guest)?;
        let segments = parse_segments(kind, buffer, &self.disk.limits).map_err(Failure::Refused)?;
        for segment in segments {
            let image = &self.disk.image;
            let result = match kind {
                RequestKind::Discard => image.discard(segment.offset, segment.len),
                _ => image.write_zeroes(segment.offset, segment.len, segment.unmap),
            };
            result.map_err(Failure::Io)?;
        }
        Ok(())
    }
}

/// Returns the first `len` bytes of the worker's bounce buffer, growing it up to `len`.
fn bounce(buffer: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buffer.len() < len {
        buffer.resize(len, 0);
    }
    &mut buffer[..len]
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
