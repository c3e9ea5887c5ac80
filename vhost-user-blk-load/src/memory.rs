//! "Guest" RAM of the frontend: a memfd mapped shared into this process and handed to the backend
//! with SET_MEM_TABLE, plus the dirty-log bitmap (also a memfd) handed over with SET_LOG_BASE.
//!
//! All accesses go through vm-memory (volatile copies and atomics); the only unsafe code of the
//! crate is the `memfd_create` call below.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use vhost::{VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo};
use vm_memory::mmap::FromRangesError;
use vm_memory::{
    AtomicAccess, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryMmap, MmapRegion, VolatileMemory,
};

/// Page size the ring layout, the allocator and the dirty log use.
pub const PAGE_SIZE: u64 = 4096;

/// Errors of the memory module.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create memfd {name:?}")]
    Memfd {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the memfd size to {size_bytes} bytes")]
    Resize {
        size_bytes: u64,
        #[source]
        source: io::Error,
    },
    #[error("memory size {size_bytes} bytes is not a positive multiple of {PAGE_SIZE}")]
    BadSize { size_bytes: u64 },
    #[error("cannot map guest memory")]
    MapGuest(#[source] FromRangesError),
    #[error("cannot map the dirty log")]
    MapLog(#[source] vm_memory::mmap::MmapRegionError),
    #[error("guest memory access at {address:#x} ({len} bytes) failed")]
    Access {
        address: u64,
        len: usize,
        #[source]
        source: GuestMemoryError,
    },
    #[error("cannot describe the guest memory region to the backend")]
    Region(#[source] vhost::Error),
}

type Result<T> = std::result::Result<T, MemoryError>;

/// Creates an anonymous memory file of `size_bytes` (close-on-exec; the backend receives it over
/// the socket).
pub fn create_memfd(name: &str, size_bytes: u64) -> Result<File> {
    let memfd_error = |source| MemoryError::Memfd {
        name: name.to_string(),
        source,
    };
    let c_name = CString::new(name)
        .map_err(|_| memfd_error(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call; memfd_create
    // reads it and returns a new descriptor or -1. No memory of ours is written.
    let fd = unsafe { libc::memfd_create(c_name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(memfd_error(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create, is open, and nothing else owns it, so the
    // File becomes its sole owner and closes it once.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size_bytes)
        .map_err(|source| MemoryError::Resize { size_bytes, source })?;
    Ok(file)
}

fn check_size(size_bytes: u64) -> Result<usize> {
    if size_bytes == 0 || !size_bytes.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::BadSize { size_bytes });
    }
    usize::try_from(size_bytes).map_err(|_| MemoryError::BadSize { size_bytes })
}

/// One region of guest RAM at guest physical address `base_address`, backed by a memfd.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    base_address: u64,
    size_bytes: u64,
}

impl GuestRam {
    /// Allocates `size_bytes` (a multiple of [`PAGE_SIZE`]) at guest address `base_address`.
    pub fn new(base_address: u64, size_bytes: u64) -> Result<Self> {
        let size = check_size(size_bytes)?;
        let file = create_memfd("ftvm-guest-ram", size_bytes)?;
        let range = (
            GuestAddress(base_address),
            size,
            Some(FileOffset::new(file, 0)),
        );
        let memory =
            GuestMemoryMmap::from_ranges_with_files([range]).map_err(MemoryError::MapGuest)?;
        Ok(Self {
            memory,
            base_address,
            size_bytes,
        })
    }

    /// Guest physical address of the first byte.
    pub fn base_address(&self) -> u64 {
        self.base_address
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Guest physical address one past the last byte.
    pub fn end_address(&self) -> u64 {
        self.base_address + self.size_bytes
    }

    /// The region as SET_MEM_TABLE describes it (fd, guest address, our user address).
    pub fn region_info(&self) -> Result<VhostUserMemoryRegionInfo> {
        let region = self
            .memory
            .iter()
            .next()
            .ok_or(MemoryError::BadSize { size_bytes: 0 })?;
        VhostUserMemoryRegionInfo::from_guest_region(region).map_err(MemoryError::Region)
    }

    /// Our (frontend) virtual address of a guest address, as SET_VRING_ADDR wants it.
    pub fn host_address(&self, address: u64) -> Result<u64> {
        let pointer = self
            .memory
            .get_host_address(GuestAddress(address))
            .map_err(|source| self.access_error(address, 1, source))?;
        Ok(pointer as u64)
    }

    /// Copies `data` to guest address `address`.
    pub fn write(&self, address: u64, data: &[u8]) -> Result<()> {
        self.memory
            .write_slice(data, GuestAddress(address))
            .map_err(|source| self.access_error(address, data.len(), source))
    }

    /// Copies guest memory at `address` into `buffer`.
    pub fn read(&self, address: u64, buffer: &mut [u8]) -> Result<()> {
        self.memory
            .read_slice(buffer, GuestAddress(address))
            .map_err(|source| self.access_error(address, buffer.len(), source))
    }

    /// Returns `len` bytes of guest memory at `address`.
    pub fn read_vec(&self, address: u64, len: usize) -> Result<Vec<u8>> {
        let mut buffer = vec![0; len];
        self.read(address, &mut buffer)?;
        Ok(buffer)
    }

    /// Atomic store of a naturally aligned integer (ring indexes).
    pub fn store<T: AtomicAccess>(&self, value: T, address: u64, order: Ordering) -> Result<()> {
        self.memory
            .store(value, GuestAddress(address), order)
            .map_err(|source| self.access_error(address, size_of::<T>(), source))
    }

    /// Atomic load of a naturally aligned integer (ring indexes).
    pub fn load<T: AtomicAccess>(&self, address: u64, order: Ordering) -> Result<T> {
        self.memory
            .load(GuestAddress(address), order)
            .map_err(|source| self.access_error(address, size_of::<T>(), source))
    }

    fn access_error(&self, address: u64, len: usize, source: GuestMemoryError) -> MemoryError {
        MemoryError::Access {
            address,
            len,
            source,
        }
    }
}

/// The vhost dirty log: one bit per 4 KiB guest page, bit `n % 8` of byte `n / 8` for page `n`
/// (page `n` = guest physical address / 4096), set by the backend for every page it writes.
#[derive(Debug)]
pub struct DirtyLog {
    file: File,
    region: MmapRegion,
    size_bytes: u64,
}

impl DirtyLog {
    /// A zeroed log covering guest physical addresses `0..end_address`.
    pub fn new(end_address: u64) -> Result<Self> {
        let pages = end_address.div_ceil(PAGE_SIZE);
        let size_bytes = pages.div_ceil(8).div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
        let size = check_size(size_bytes)?;
        let file = create_memfd("ftvm-dirty-log", size_bytes)?;
        let mapped = file.try_clone().map_err(|source| MemoryError::Memfd {
            name: "ftvm-dirty-log".to_string(),
            source,
        })?;
        let region =
            MmapRegion::from_file(FileOffset::new(mapped, 0), size).map_err(MemoryError::MapLog)?;
        Ok(Self {
            file,
            region,
            size_bytes,
        })
    }

    /// Size of the bitmap in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The log as SET_LOG_BASE describes it.
    pub fn region_info(&self) -> VhostUserDirtyLogRegion {
        VhostUserDirtyLogRegion {
            mmap_size: self.size_bytes,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// The raw file descriptor of the log memfd.
    pub fn raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    fn word(&self, index: u64) -> Option<&AtomicU64> {
        let offset = usize::try_from(index.checked_mul(8)?).ok()?;
        self.region.get_atomic_ref::<AtomicU64>(offset).ok()
    }

    fn words(&self) -> u64 {
        self.size_bytes / 8
    }

    /// Whether the page holding guest address `address` is marked dirty.
    pub fn is_dirty(&self, address: u64) -> bool {
        let page = address / PAGE_SIZE;
        self.word(page / 64)
            .is_some_and(|word| word.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    /// Guest addresses of all dirty pages, in order; the log is left as it is.
    pub fn dirty_pages(&self) -> Vec<u64> {
        self.collect(false)
    }

    /// Guest addresses of all dirty pages, clearing each word atomically as it is read, so a bit
    /// the backend sets meanwhile is either returned now or kept for the next call.
    pub fn take_dirty_pages(&self) -> Vec<u64> {
        self.collect(true)
    }

    /// Clears the whole log.
    pub fn clear(&self) {
        let _ = self.collect(true);
    }

    fn collect(&self, clear: bool) -> Vec<u64> {
        let mut pages = Vec::new();
        for index in 0..self.words() {
            let Some(word) = self.word(index) else {
                break;
            };
            let mut bits = if clear {
                word.swap(0, Ordering::AcqRel)
            } else {
                word.load(Ordering::Acquire)
            };
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                pages.push((index * 64 + bit) * PAGE_SIZE);
                bits &= bits - 1;
            }
        }
        pages
    }

    /// Marks the page of `address` dirty (for tests of the reader itself).
    pub fn mark(&self, address: u64) {
        let page = address / PAGE_SIZE;
        if let Some(word) = self.word(page / 64) {
            word.fetch_or(1 << (page % 64), Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_round_trips_bytes_and_atomics() {
        let ram = GuestRam::new(0x4000_0000, 16 * PAGE_SIZE).expect("ram");
        ram.write(0x4000_0010, b"hello").expect("write");
        assert_eq!(ram.read_vec(0x4000_0010, 5).expect("read"), b"hello");
        ram.store(0xbeef_u16, 0x4000_0100, Ordering::Release)
            .expect("store");
        let value: u16 = ram.load(0x4000_0100, Ordering::Acquire).expect("load");
        assert_eq!(value, 0xbeef);
        assert!(ram.read_vec(0x3fff_ffff, 2).is_err());
        assert!(ram.write(0x4000_0000 + 16 * PAGE_SIZE, b"x").is_err());
    }

    #[test]
    fn guest_ram_rejects_unaligned_size() {
        assert!(matches!(
            GuestRam::new(0, 100),
            Err(MemoryError::BadSize { size_bytes: 100 })
        ));
    }

    #[test]
    fn region_info_carries_the_fd_and_guest_address() {
        let ram = GuestRam::new(0x1000_0000, 4 * PAGE_SIZE).expect("ram");
        let info = ram.region_info().expect("info");
        assert_eq!(info.guest_phys_addr, 0x1000_0000);
        assert_eq!(info.memory_size, 4 * PAGE_SIZE);
        assert!(info.mmap_handle >= 0);
        assert_eq!(
            ram.host_address(0x1000_0000).expect("host"),
            info.userspace_addr
        );
    }

    #[test]
    fn dirty_log_marks_takes_and_clears() {
        let log = DirtyLog::new(0x4000_0000 + 64 * 1024 * 1024).expect("log");
        assert_eq!(log.size_bytes() % PAGE_SIZE, 0);
        log.mark(0x4000_1234);
        log.mark(0x4000_0000 + 65 * PAGE_SIZE);
        assert!(log.is_dirty(0x4000_1000));
        assert!(!log.is_dirty(0x4000_2000));
        assert_eq!(
            log.dirty_pages(),
            vec![0x4000_1000, 0x4000_0000 + 65 * PAGE_SIZE]
        );
        assert_eq!(log.take_dirty_pages().len(), 2);
        assert!(log.dirty_pages().is_empty());
    }
}
