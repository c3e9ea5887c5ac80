//! A request's data buffers in guest memory, read into and written from by the image
//! directly (`preadv`/`pwritev`), without a bounce buffer.
//!
//! [`GuestBuffers`] holds the host slices of a request's data: the descriptors' guest
//! ranges, each split where it crosses from one memory region to another (regions are
//! separate mappings, so a range contiguous for the guest need not be in this process).
//! One system call takes at most [`MAX_IOVECS`] of them; a longer list, or a call that does
//! less than asked, continues where the last one stopped.
//!
//! **Dirty pages.** The kernel writing guest memory for `preadv` passes neither QEMU's
//! vhost-user dirty log nor the `dirty-pages` bitmap (Level 3), which vm-memory marks on
//! every write it makes itself. So [`GuestBuffers`] marks, through each slice's bitmap, every
//! byte a `preadv` was given, once the call returned and whatever it returned (a failed read
//! may have landed in part): a superset of what changed, never less.
//!
//! **Whose bytes.** The guest can change its buffers while the kernel reads them. For a
//! write that only this image receives that is the guest's own business (QEMU's virtio-blk
//! does the same); a mirrored write must not let its local copy, its CRC32C and the copy it
//! sends differ, so it takes its bytes once with [`WriteSource::into_bytes`] and uses that
//! buffer for all three (`mirror/mod.rs`).
//!
//! This module holds the only raw pointers into guest memory; `image.rs` issues the calls.

use std::io;

use thiserror::Error;
use vm_memory::bitmap::{BitmapSlice, WithBitmapSlice};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryError, Permissions, VolatileSlice};

use crate::image::{Image, ReadTarget, WriteSource};

/// Most iovecs one `preadv` or `pwritev` takes (Linux's `IOV_MAX`).
pub const MAX_IOVECS: usize = 1024;

#[derive(Debug, Error)]
pub enum GuestBufferError {
    #[error("data buffer outside guest memory")]
    OutsideMemory(#[source] GuestMemoryError),
    #[error("descriptors hold {available} data bytes, the request needs {needed}")]
    Short { needed: usize, available: usize },
}

/// A request's data in guest memory: host slices, in order, `len` bytes in all.
pub struct GuestBuffers<'a, B> {
    slices: Vec<VolatileSlice<'a, B>>,
    len: usize,
}

impl<B> std::fmt::Debug for GuestBuffers<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestBuffers")
            .field("slices", &self.slices.len())
            .field("len", &self.len)
            .finish()
    }
}

/// Where a transfer stands: the slice it is in and the bytes of that slice already done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Cursor {
    slice: usize,
    within: usize,
}

impl Cursor {
    /// Moves `count` bytes on over slices of `lengths`.
    fn advance(&mut self, lengths: impl IntoIterator<Item = usize>, mut count: usize) {
        for length in lengths.into_iter().skip(self.slice) {
            let left = length.saturating_sub(self.within);
            if count < left {
                self.within += count;
                return;
            }
            count -= left;
            self.slice += 1;
            self.within = 0;
        }
    }
}

impl<'a, B: BitmapSlice> GuestBuffers<'a, B> {
    /// The `len` bytes that follow the first `skip` bytes of the guest ranges `descriptors`
    /// (address, length), mapped with `access`. Bytes past `skip + len` are left out (the
    /// status byte); fewer than `skip + len` bytes is an error.
    pub fn new<M>(
        memory: &'a M,
        descriptors: impl IntoIterator<Item = (GuestAddress, usize)>,
        access: Permissions,
        mut skip: usize,
        len: usize,
    ) -> Result<Self, GuestBufferError>
    where
        M: GuestMemory + ?Sized,
        M::Bitmap: WithBitmapSlice<'a, S = B>,
    {
        let outside = GuestBufferError::OutsideMemory;
        let mut slices = Vec::new();
        let mut remaining = len;
        'descriptors: for (address, length) in descriptors {
            if length == 0 {
                continue;
            }
            let pieces = memory
                .get_slices(address, length, access)
                .map_err(outside)?;
            for piece in pieces {
                if remaining == 0 {
                    break 'descriptors;
                }
                let mut slice = piece.map_err(outside)?;
                if skip >= slice.len() {
                    skip -= slice.len();
                    continue;
                }
                if skip > 0 {
                    slice = slice.offset(skip).map_err(|error| outside(error.into()))?;
                    skip = 0;
                }
                if slice.len() > remaining {
                    slice = slice
                        .subslice(0, remaining)
                        .map_err(|error| outside(error.into()))?;
                }
                remaining -= slice.len();
                slices.push(slice);
            }
        }
        if remaining > 0 {
            return Err(GuestBufferError::Short {
                needed: len,
                available: len - remaining,
            });
        }
        Ok(GuestBuffers { slices, len })
    }

    /// How many host slices the data is in.
    pub fn slice_count(&self) -> usize {
        self.slices.len()
    }

    /// Runs `call` on iovecs of the data from the cursor on until all of it is done,
    /// `MAX_IOVECS` at a time, continuing after short transfers and retrying interrupted
    /// calls. `after` runs on each call's slices once the call returned, whatever it
    /// returned. A call that does nothing is `UnexpectedEof` (the end of the image).
    fn transfer(
        &self,
        mut call: impl FnMut(&[libc::iovec]) -> io::Result<usize>,
        mut after: impl FnMut(&VolatileSlice<'a, B>, usize),
    ) -> io::Result<()> {
        let mut cursor = Cursor::default();
        let mut done = 0usize;
        let batch_len = self.slices.len().min(MAX_IOVECS);
        let mut guards = Vec::with_capacity(batch_len);
        let mut iovecs = Vec::with_capacity(batch_len);
        while done < self.len {
            let batch = self
                .slices
                .get(cursor.slice..)
                .unwrap_or_default()
                .iter()
                .take(MAX_IOVECS);
            guards.clear();
            iovecs.clear();
            for (index, slice) in batch.clone().enumerate() {
                let skip = if index == 0 { cursor.within } else { 0 };
                let guard = slice.ptr_guard_mut();
                iovecs.push(libc::iovec {
                    // Within the slice: `skip` < its length (the cursor never rests at a
                    // slice's end), so the pointer stays inside the mapping.
                    iov_base: guard.as_ptr().wrapping_add(skip).cast(),
                    iov_len: slice.len() - skip,
                });
                guards.push(guard);
            }
            let result = loop {
                match call(&iovecs) {
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            for (index, slice) in batch.enumerate() {
                after(slice, if index == 0 { cursor.within } else { 0 });
            }
            match result? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the image ended before the request did",
                    ))
                }
                count => {
                    done = done.saturating_add(count);
                    cursor.advance(self.slices.iter().map(VolatileSlice::len), count);
                }
            }
        }
        Ok(())
    }
}

impl<B: BitmapSlice> ReadTarget for GuestBuffers<'_, B> {
    fn len(&self) -> usize {
        self.len
    }

    fn read_from(&mut self, image: &Image, offset: u64) -> io::Result<()> {
        let mut position = offset;
        self.transfer(
            |iovecs| {
                // SAFETY: each iovec lies inside one slice of guest memory (from its start
                // plus a skip below its length, for the rest of it), writable: the slices
                // were mapped with `Permissions::Write` by the caller for reads, and the
                // mapping stays alive while `self` borrows the memory ('a), its guard held
                // in `transfer` for the call. No Rust reference points into guest memory:
                // vm-memory only ever accesses it by volatile copies.
                let count = unsafe { image.read_vectored_at(iovecs, position) }?;
                position = position.saturating_add(count as u64);
                Ok(count)
            },
            |slice, skip| slice.bitmap().mark_dirty(skip, slice.len() - skip),
        )
    }

    fn fill_at(&mut self, at: usize, data: &[u8]) -> io::Result<()> {
        let mut start = 0usize;
        let mut data = data;
        for slice in &self.slices {
            let end = start + slice.len();
            if data.is_empty() {
                break;
            }
            if at < end {
                let skip = at.saturating_sub(start);
                let count = (slice.len() - skip).min(data.len());
                let (part, rest) = data.split_at(count);
                // Marks what it wrote in the slice's bitmap (vm-memory's copy).
                slice
                    .subslice(skip, count)
                    .map_err(io::Error::other)?
                    .copy_from(part);
                data = rest;
            }
            start = end;
        }
        if data.is_empty() {
            Ok(())
        } else {
            Err(io::Error::other("data past the end of the read"))
        }
    }
}

impl<B: BitmapSlice> WriteSource for GuestBuffers<'_, B> {
    fn len(&self) -> usize {
        self.len
    }

    fn write_to(&self, image: &Image, offset: u64) -> io::Result<()> {
        let mut position = offset;
        self.transfer(
            |iovecs| {
                // SAFETY: each iovec lies inside one slice of guest memory, readable, alive
                // while `self` borrows it ('a), its guard held in `transfer` for the call.
                // The guest may change it meanwhile: that changes the data written, never
                // memory safety (the kernel only reads it).
                let count = unsafe { image.write_vectored_at(iovecs, position) }?;
                position = position.saturating_add(count as u64);
                Ok(count)
            },
            |_, _| {},
        )
    }

    fn into_bytes(self) -> Vec<u8> {
        let mut bytes = vec![0u8; self.len];
        let mut start = 0usize;
        for slice in &self.slices {
            if let Some(part) = bytes.get_mut(start..start + slice.len()) {
                slice.copy_to(part);
            }
            start += slice.len();
        }
        bytes
    }
}

#[cfg(test)]
mod tests;
