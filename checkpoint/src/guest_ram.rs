//! The primary's view of the running guest's RAM: the RAM file QEMU maps
//! (`memory-backend-file,…,share=on`), mapped here shared and read-only.
//!
//! The guest (and QEMU, and the daemons) write these pages while the engine reads them, so
//! no Rust reference into the mapping is ever made: pages are copied out with raw pointer
//! copies into memory the engine owns, and only those copies are looked at. A page copied
//! while the guest runs may be torn; the engine copies while the guest runs only for the
//! first full copy, whose torn pages are dirty and sent again at the first stop.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;

use crate::delta::{Page, PAGE_BYTES};

/// The guest's RAM file, mapped read-only.
pub struct GuestRam {
    address: NonNull<u8>,
    length: usize,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GuestRam")
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

// SAFETY: the mapping is only read, through raw copies; the pointer is not tied to a thread.
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// Maps the whole file at `path`, which must be a non-empty multiple of the page size.
    pub fn open(path: &Path) -> io::Result<GuestRam> {
        let file = File::open(path)?;
        let length = file.metadata()?.len();
        if length == 0 || !length.is_multiple_of(PAGE_BYTES as u64) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is {length} bytes: not a guest RAM file (a non-zero multiple of {PAGE_BYTES})",
                    path.display()
                ),
            ));
        }
        let length = usize::try_from(length)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "RAM file too large"))?;
        // SAFETY: a fresh read-only mapping chosen by the kernel (null hint, no MAP_FIXED)
        // over a file opened for reading; it overlaps no Rust object. Checked for MAP_FAILED.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let address = NonNull::new(address.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null address"))?;
        Ok(GuestRam { address, length })
    }

    pub fn len(&self) -> usize {
        self.length
    }

    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    pub fn pages(&self) -> u64 {
        (self.length / PAGE_BYTES) as u64
    }

    /// Copies page `index` into `page`; `false` if the page is beyond the RAM.
    pub fn copy_page(&self, index: u64, page: &mut Page) -> bool {
        if index >= self.pages() {
            return false;
        }
        let offset = index as usize * PAGE_BYTES;
        // SAFETY: `offset + PAGE_BYTES <= length` (checked above), so the source lies in the
        // live read-only mapping; `page` is our own PAGE_BYTES-long buffer, which cannot
        // overlap a mapping we never hand out. No reference to the mapping is formed.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.address.as_ptr().add(offset),
                page.as_mut_ptr(),
                PAGE_BYTES,
            );
        }
        true
    }

    /// Copies all of the RAM into `out` (resized to its length).
    pub fn copy_all(&self, out: &mut Vec<u8>) {
        out.resize(self.length, 0);
        // Page by page, so that a long copy does not hold a huge range at once.
        for (index, chunk) in out.chunks_exact_mut(PAGE_BYTES).enumerate() {
            let offset = index * PAGE_BYTES;
            // SAFETY: `out` has exactly `length` bytes, so `offset + PAGE_BYTES <= length`:
            // the source lies in the mapping; `chunk` is our own memory.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.address.as_ptr().add(offset),
                    chunk.as_mut_ptr(),
                    PAGE_BYTES,
                );
            }
        }
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `open`, unmapped once; nothing refers into it.
        let result = unsafe { libc::munmap(self.address.as_ptr().cast(), self.length) };
        if result != 0 {
            log::warn!(
                "cannot unmap the guest RAM file: {}",
                io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn pages_are_copied_from_the_file_and_bounds_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ram");
        let file = File::create(&path).expect("create");
        file.set_len(4 * PAGE_BYTES as u64).expect("size");
        file.write_all_at(b"third page", 2 * PAGE_BYTES as u64)
            .expect("write");
        let ram = GuestRam::open(&path).expect("map");
        assert_eq!(ram.pages(), 4);
        let mut page = [0u8; PAGE_BYTES];
        assert!(ram.copy_page(2, &mut page));
        assert_eq!(&page[..10], b"third page");
        assert!(!ram.copy_page(4, &mut page));
        // A later write through the file is seen by the next copy (one shared page cache).
        file.write_all_at(b"changed", 2 * PAGE_BYTES as u64)
            .expect("write");
        assert!(ram.copy_page(2, &mut page));
        assert_eq!(&page[..7], b"changed");
        let mut all = Vec::new();
        ram.copy_all(&mut all);
        assert_eq!(all.len(), 4 * PAGE_BYTES);
        assert_eq!(&all[2 * PAGE_BYTES..2 * PAGE_BYTES + 7], b"changed");
    }

    #[test]
    fn a_file_that_is_not_whole_pages_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ram");
        std::fs::write(&path, b"short").expect("write");
        assert!(GuestRam::open(&path).is_err());
        std::fs::write(&path, b"").expect("write");
        assert!(GuestRam::open(&path).is_err());
    }
}
