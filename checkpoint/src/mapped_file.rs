//! A regular file mapped shared and read-write: the replica RAM file. The only `unsafe` of
//! the replica side lives here.
//!
//! The mapping is owned: it is unmapped on drop, and every access goes through `&self`
//! (reads) or `&mut self` (writes), so Rust's aliasing rules hold *within this process*. No
//! other process writes the replica file while the engine holds it (QEMU maps it only for a
//! restore, after the engine has stopped serving).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// A file mapped `MAP_SHARED`, `PROT_READ | PROT_WRITE`, over its whole length.
pub struct MappedFile {
    file: File,
    address: NonNull<u8>,
    length: usize,
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("MappedFile")
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

// SAFETY: the mapping is plain memory owned by this value; access is through `&self`/`&mut
// self`, so sending or sharing it between threads is as safe as for a `Vec<u8>`.
unsafe impl Send for MappedFile {}
// SAFETY: as above: shared references only read.
unsafe impl Sync for MappedFile {}

impl MappedFile {
    /// Maps all of `file` (opened read-write), which must be `length` bytes long and not
    /// empty.
    pub fn map(file: File, length: usize) -> io::Result<MappedFile> {
        if length == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "cannot map an empty file",
            ));
        }
        let actual = file.metadata()?.len();
        if actual != length as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("file is {actual} bytes, expected {length}"),
            ));
        }
        // SAFETY: a fresh mapping chosen by the kernel (null hint, no MAP_FIXED), so it
        // overlaps no Rust object; `length` is non-zero and the file is open read-write, as
        // PROT_WRITE with MAP_SHARED requires. The result is checked for MAP_FAILED.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ | libc::PROT_WRITE,
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
        Ok(MappedFile {
            file,
            address,
            length,
        })
    }

    pub fn len(&self) -> usize {
        self.length
    }

    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `address` is a live mapping of `length` readable bytes until drop, and no
        // `&mut` to it exists while `&self` is borrowed. The file's size is fixed while
        // mapped (the replica never truncates it), so no access faults with SIGBUS.
        unsafe { std::slice::from_raw_parts(self.address.as_ptr(), self.length) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.address.as_ptr(), self.length) }
    }

    /// Makes everything written through the mapping durable (for a shared file mapping,
    /// `fdatasync` writes back the pages dirtied through it, as `msync(MS_SYNC)` would).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Takes an exclusive advisory lock (`flock`) on `file` without waiting: `Ok(false)` when
/// another open file description holds it. Released when the file is closed.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: `flock` only reads the descriptor number, which `file` keeps open for the call.
    let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if result == 0 {
        return Ok(true);
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(false);
    }
    Err(error)
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        // SAFETY: `address`/`length` are exactly the mapping made in `map`, unmapped once,
        // here; no reference into it outlives `self`.
        let result = unsafe { libc::munmap(self.address.as_ptr().cast(), self.length) };
        if result != 0 {
            log::warn!(
                "cannot unmap the replica file: {}",
                io::Error::last_os_error()
            );
        }
    }
}
