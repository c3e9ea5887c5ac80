//! userfaultfd in asynchronous write-protect mode: the kernel resolves a write fault on a
//! protected page by itself (no thread reads the fd) and clears the page's protection, which
//! `PAGEMAP_SCAN` then reports as `PAGE_IS_WRITTEN`. The syscall and the ioctls live
//! here; the library's only other `unsafe` code sets the umask and the signal mask.
//!
//! Constants and structs from `include/uapi/linux/userfaultfd.h` (Linux 6.7; the async
//! features are newer than Debian 12's 6.1 headers).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `UFFD_API`.
const UFFD_API: u64 = 0xaa;
/// `UFFD_USER_MODE_ONLY`: lets a process without `CAP_SYS_PTRACE` create the fd when
/// `vm.unprivileged_userfaultfd` is 0. Async write-protect faults are resolved by the
/// kernel for kernel-mode writes too, so the mode loses nothing here.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
/// `UFFD_FEATURE_WP_UNPOPULATED`: write-protect pages that are not populated yet (a PTE
/// marker), so a first write to them is seen as well.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_WP_ASYNC`: the kernel resolves write-protect faults itself.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFDIO_REGISTER_MODE_WP`.
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`.
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `_UFFDIO_WRITEPROTECT`: its bit in the `ioctls` a registration reports.
const UFFDIO_WRITEPROTECT_NR: u32 = 0x06;

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, 0xAA, nr, size)` as in `asm-generic/ioctl.h`.
const fn uffd_ioctl(direction: u32, number: u32, size: usize) -> libc::Ioctl {
    ((direction << 30) | ((size as u32) << 16) | (0xaa << 8) | number) as libc::Ioctl
}

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

const UFFDIO_API: libc::Ioctl =
    uffd_ioctl(IOC_READ | IOC_WRITE, 0x3f, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::Ioctl = uffd_ioctl(
    IOC_READ | IOC_WRITE,
    0x00,
    std::mem::size_of::<UffdioRegister>(),
);
const UFFDIO_UNREGISTER: libc::Ioctl =
    uffd_ioctl(IOC_READ, 0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WRITEPROTECT: libc::Ioctl = uffd_ioctl(
    IOC_READ | IOC_WRITE,
    UFFDIO_WRITEPROTECT_NR,
    std::mem::size_of::<UffdioWriteprotect>(),
);

/// The features the tracking needs.
pub const FEATURES: u64 = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;

/// A userfaultfd past its `UFFDIO_API` handshake with [`FEATURES`] enabled. Closing it
/// unregisters every range registered on it and clears their protection.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    /// Creates the fd (close-on-exec, non-blocking) and enables async write-protect.
    pub fn open() -> Result<Userfaultfd, String> {
        let fd = create(0).or_else(|error| {
            if error.raw_os_error() == Some(libc::EPERM) {
                create(UFFD_USER_MODE_ONLY)
            } else {
                Err(error)
            }
        });
        let fd = fd.map_err(|error| format!("userfaultfd: {error}"))?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: FEATURES,
            ioctls: 0,
        };
        if let Err(error) = ioctl(&fd, UFFDIO_API, &mut api) {
            return Err(match supported_features() {
                Some(supported) if supported & FEATURES != FEATURES => format!(
                    "this kernel's userfaultfd lacks{}{} (Linux 6.7 or later needed)",
                    missing(supported, UFFD_FEATURE_WP_ASYNC, " UFFD_FEATURE_WP_ASYNC"),
                    missing(
                        supported,
                        UFFD_FEATURE_WP_UNPOPULATED,
                        " UFFD_FEATURE_WP_UNPOPULATED"
                    ),
                ),
                _ => format!("UFFDIO_API: {error}"),
            });
        }
        Ok(Userfaultfd { fd })
    }

    /// Registers `[start, start + len)` for write-protect tracking.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut register = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(&self.fd, UFFDIO_REGISTER, &mut register)?;
        if register.ioctls & (1 << UFFDIO_WRITEPROTECT_NR) == 0 {
            return Err(io::Error::other(
                "the registered range does not support UFFDIO_WRITEPROTECT",
            ));
        }
        Ok(())
    }

    /// Write-protects every page of `[start, start + len)` (a registered range).
    pub fn write_protect(&self, start: u64, len: u64) -> io::Result<()> {
        let mut protect = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        ioctl(&self.fd, UFFDIO_WRITEPROTECT, &mut protect)
    }

    /// Unregisters `[start, start + len)`; the kernel clears its protection.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        ioctl(&self.fd, UFFDIO_UNREGISTER, &mut range)
    }
}

fn missing(supported: u64, feature: u64, name: &'static str) -> &'static str {
    if supported & feature == 0 {
        name
    } else {
        ""
    }
}

/// The features this kernel offers, asked on a second fd (`UFFDIO_API` is one-shot per fd).
fn supported_features() -> Option<u64> {
    let fd = create(0).or_else(|_| create(UFFD_USER_MODE_ONLY)).ok()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        ..UffdioApi::default()
    };
    ioctl(&fd, UFFDIO_API, &mut api).ok()?;
    Some(api.features)
}

fn create(extra_flags: libc::c_int) -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | extra_flags;
    // SAFETY: userfaultfd(2) takes one integer of flags and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: `fd` was just returned by the kernel as a new descriptor that nothing else
    // owns; OwnedFd takes over closing it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One userfaultfd ioctl whose argument is `argument`'s struct.
fn ioctl<T>(fd: &OwnedFd, request: libc::Ioctl, argument: &mut T) -> io::Result<()> {
    // SAFETY: every request passed here is a userfaultfd ioctl whose encoded size is
    // `size_of::<T>()` for the `#[repr(C)]` uapi struct `T` it is called with (see the
    // constants above); the kernel reads and writes only that struct, which lives for the
    // whole call, and `fd` is an open userfaultfd.
    let result = unsafe { libc::ioctl(fd.as_raw_fd(), request, argument as *mut T) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // From `linux/userfaultfd.h` via `_IOWR`/`_IOR`, as printed by a C program.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
    }
}
