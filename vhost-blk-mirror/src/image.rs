//! The local disk image: a raw file or a block device, accessed with positioned I/O.
//!
//! `read_at`/`write_at` take `&self`, so every queue worker uses the same `Image` without a
//! lock. This is the only module that issues syscalls on the image (`fallocate`, block ioctls,
//! `preadv`/`pwritev` on buffers the caller vouches for).
//!
//! A read's destination and a write's source are a [`ReadTarget`] and a [`WriteSource`]: a
//! plain buffer, or a request's buffers in guest memory (`guest_io.rs`), which the image reads
//! into and writes from directly.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Largest zero-filled buffer used when a range cannot be zeroed by `fallocate` or ioctl.
const ZERO_CHUNK_BYTES: usize = 256 * 1024;

// From <linux/fs.h>: _IOR(0x12, 114, size_t), _IO(0x12, 119), _IO(0x12, 127).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("cannot open image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {0} is neither a regular file nor a block device")]
    NotFileOrBlock(PathBuf),
    #[error("image {0} is smaller than one 512-byte sector")]
    TooSmall(PathBuf),
    #[error("cannot read the size of {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What kind of storage backs the image (a word of the control protocol's status).
pub use control_protocol::disk::ImageKind;

/// An open disk image.
#[derive(Debug)]
pub struct Image {
    file: File,
    path: PathBuf,
    kind: ImageKind,
    size_bytes: u64,
    read_only: bool,
}

impl Image {
    /// Opens `path` for reading, and for writing unless `read_only`.
    pub fn open(path: &Path, read_only: bool) -> Result<Image, ImageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| ImageError::Open {
                path: path.to_owned(),
                source,
            })?;
        let size_error = |source| ImageError::Size {
            path: path.to_owned(),
            source,
        };
        let metadata = file.metadata().map_err(size_error)?;
        let (kind, size_bytes) = if metadata.file_type().is_block_device() {
            (
                ImageKind::BlockDevice,
                block_device_size(&file).map_err(size_error)?,
            )
        } else if metadata.is_file() {
            (ImageKind::File, metadata.len())
        } else {
            return Err(ImageError::NotFileOrBlock(path.to_owned()));
        };
        if size_bytes < 512 {
            return Err(ImageError::TooSmall(path.to_owned()));
        }
        Ok(Image {
            file,
            path: path.to_owned(),
            kind,
            size_bytes,
            read_only,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> ImageKind {
        self.kind
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The open image, for the snapshots' reflinks (`crate::snapshot`).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// One `preadv` at `offset` into `iovecs`; returns the bytes read, which may be fewer
    /// than asked (0 at the end of the image).
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that is valid for writes of `iov_len` bytes, and that
    /// no Rust reference reads or writes, for the whole call (the kernel writes it).
    pub unsafe fn read_vectored_at(
        &self,
        iovecs: &[libc::iovec],
        offset: u64,
    ) -> io::Result<usize> {
        let offset = libc::off_t::try_from(offset).map_err(|_| invalid("offset too large"))?;
        let count = libc::c_int::try_from(iovecs.len()).map_err(|_| invalid("too many iovecs"))?;
        // SAFETY: the fd is open for the whole call (owned by `self.file`); `iovecs` is a live
        // array of `count` iovecs; the memory they describe is writable and unaliased by
        // references for the call, as this function's caller guarantees.
        let ret = unsafe { libc::preadv(self.file.as_raw_fd(), iovecs.as_ptr(), count, offset) };
        usize::try_from(ret).map_err(|_| io::Error::last_os_error())
    }

    /// One `pwritev` at `offset` from `iovecs`; returns the bytes written, which may be fewer
    /// than given.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that is valid for reads of `iov_len` bytes for the
    /// whole call (the kernel reads it; a concurrent writer makes the data undefined, not
    /// the call unsafe).
    pub unsafe fn write_vectored_at(
        &self,
        iovecs: &[libc::iovec],
        offset: u64,
    ) -> io::Result<usize> {
        let offset = libc::off_t::try_from(offset).map_err(|_| invalid("offset too large"))?;
        let count = libc::c_int::try_from(iovecs.len()).map_err(|_| invalid("too many iovecs"))?;
        // SAFETY: the fd is open for the whole call (owned by `self.file`); `iovecs` is a live
        // array of `count` iovecs; the kernel only reads the memory they describe, which is
        // readable for the call, as this function's caller guarantees.
        let ret = unsafe { libc::pwritev(self.file.as_raw_fd(), iovecs.as_ptr(), count, offset) };
        usize::try_from(ret).map_err(|_| io::Error::last_os_error())
    }

    /// Makes every completed write durable (`fdatasync`).
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Drops the image's clean pages from the page cache (`POSIX_FADV_DONTNEED`; dirty pages
    /// stay). Only a hint: nothing is lost, later reads come from the disk.
    pub fn drop_clean_cache(&self) -> io::Result<()> {
        // SAFETY: posix_fadvise only reads its integer arguments; the fd is owned by
        // `self.file` and open for the whole call.
        let ret =
            unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(ret))
        }
    }

    /// Deallocates a range; reads of it return zeroes afterwards.
    ///
    /// Storage that cannot deallocate (EOPNOTSUPP, EINVAL, ENOTTY) gets zeroes written
    /// instead: never a disk failure, and both copies of a mirror read the same afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let result = match self.kind {
            ImageKind::File => self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
            ImageKind::BlockDevice => self.block_range_ioctl(BLKDISCARD, offset, len),
        };
        match result {
            Err(error) if unsupported(&error) => self.write_zero_buffers(offset, len),
            other => other,
        }
    }

    /// Makes a range read as zeroes, deallocating it when `unmap` allows.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let result = match (self.kind, unmap) {
            (ImageKind::File, true) => self.discard(offset, len),
            (ImageKind::File, false) => self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ),
            (ImageKind::BlockDevice, _) => self.block_range_ioctl(BLKZEROOUT, offset, len),
        };
        match result {
            Err(error) if unsupported(&error) => self.write_zero_buffers(offset, len),
            other => other,
        }
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK_BYTES.min(usize::try_from(len).unwrap_or(usize::MAX))];
        let mut done = 0u64;
        while done < len {
            let chunk = zeroes
                .len()
                .min(usize::try_from(len - done).unwrap_or(usize::MAX));
            self.write_at(&zeroes[..chunk], offset + done)?;
            done += chunk as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let offset = libc::off_t::try_from(offset).map_err(|_| invalid("offset too large"))?;
        let len = libc::off_t::try_from(len).map_err(|_| invalid("length too large"))?;
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by `self.file`
        // and stays open for the duration of the call.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn block_range_ioctl(&self, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKDISCARD and BLKZEROOUT read a `u64[2]` (start, length) from the pointer,
        // which points at `range`, alive and correctly sized for the whole call; the fd is open.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), request, range.as_ptr()) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Where a read's data goes: a plain buffer, or a request's buffers in guest memory.
pub trait ReadTarget {
    /// Bytes to read.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills the whole target from `image` at `offset`. A [`buffer_fault`] error means the
    /// target's memory, not the image, failed.
    fn read_from(&mut self, image: &Image, offset: u64) -> io::Result<()>;

    /// Copies `data` into the target from its byte `at` on (a read served by the peer).
    fn fill_at(&mut self, at: usize, data: &[u8]) -> io::Result<()>;
}

impl ReadTarget for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }

    fn read_from(&mut self, image: &Image, offset: u64) -> io::Result<()> {
        image.read_at(self, offset)
    }

    fn fill_at(&mut self, at: usize, data: &[u8]) -> io::Result<()> {
        at.checked_add(data.len())
            .and_then(|end| self.get_mut(at..end))
            .ok_or_else(|| invalid("data past the end of the read"))?
            .copy_from_slice(data);
        Ok(())
    }
}

/// Where a write's data comes from: an owned buffer, or a request's buffers in guest memory.
pub trait WriteSource {
    /// Bytes to write.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes all of it to `image` at `offset`. A [`buffer_fault`] error means the source's
    /// memory, not the image, failed.
    fn write_to(&self, image: &Image, offset: u64) -> io::Result<()>;

    /// The data as one owned buffer, copied once: what a mirrored write writes locally,
    /// checksums and sends, so that all three are the same bytes.
    fn into_bytes(self) -> Vec<u8>;
}

impl WriteSource for Vec<u8> {
    fn len(&self) -> usize {
        Vec::len(self)
    }

    fn write_to(&self, image: &Image, offset: u64) -> io::Result<()> {
        image.write_at(self, offset)
    }

    fn into_bytes(self) -> Vec<u8> {
        self
    }
}

/// Whether an error of a vectored read or write says that one of its buffers is not
/// accessible memory (`EFAULT`: guest memory that vanished), rather than that the image failed.
pub fn buffer_fault(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::EFAULT)
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`, a live
    // u64; the fd is open for the duration of the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if ret == 0 {
        Ok(size)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether an error says the storage cannot do the operation (rather than that it failed).
fn unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY)
    )
}

fn invalid(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_of(len: u64) -> (tempfile::NamedTempFile, Image) {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        file.as_file().set_len(len).expect("set_len");
        let image = Image::open(file.path(), false).expect("open");
        (file, image)
    }

    #[test]
    fn round_trip_and_size() {
        let (_file, image) = image_of(1 << 20);
        assert_eq!(image.size_bytes(), 1 << 20);
        assert_eq!(image.kind(), ImageKind::File);
        image.write_at(&[7u8; 4096], 8192).expect("write");
        let mut back = [0u8; 4096];
        image.read_at(&mut back, 8192).expect("read");
        assert_eq!(back, [7u8; 4096]);
        image.flush().expect("flush");
    }

    #[test]
    fn discard_and_write_zeroes_read_back_zero() {
        let (_file, image) = image_of(1 << 20);
        image.write_at(&[9u8; 16384], 0).expect("write");
        image.discard(0, 4096).expect("discard");
        image.write_zeroes(4096, 4096, false).expect("zero");
        image.write_zeroes(8192, 4096, true).expect("zero unmap");
        let mut back = [1u8; 16384];
        image.read_at(&mut back, 0).expect("read");
        assert!(back[..12288].iter().all(|&b| b == 0));
        assert!(back[12288..].iter().all(|&b| b == 9));
    }

    #[test]
    fn missing_and_tiny_images_are_refused() {
        let missing = Image::open(Path::new("/nonexistent/ftvm.img"), false);
        assert!(matches!(missing, Err(ImageError::Open { .. })));
        let file = tempfile::NamedTempFile::new().expect("temp file");
        assert!(matches!(
            Image::open(file.path(), false),
            Err(ImageError::TooSmall(_))
        ));
        assert!(matches!(
            Image::open(Path::new("/dev/null"), false),
            Err(ImageError::NotFileOrBlock(_))
        ));
    }

    #[test]
    fn read_only_image_refuses_writes() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        file.as_file().set_len(4096).expect("set_len");
        let image = Image::open(file.path(), true).expect("open");
        assert!(image.read_only());
        assert!(image.write_at(&[1u8; 512], 0).is_err());
    }
}
