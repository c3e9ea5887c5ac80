//! Which guest pages changed in an epoch.
//!
//! QEMU's own writes to guest RAM (TCG, device models, and under KVM the guest's writes)
//! are tracked inside QEMU by the preload library `libftvm_ram_track.so`
//! (`checkpoint/ram-track`): on [`TrackerClient::register`] it registers QEMU's mapping of
//! the RAM file with a userfaultfd in async write-protect mode and protects every page.
//! A write to a protected page faults once; the kernel lifts the protection itself (no
//! thread serves the fd), which `PAGEMAP_SCAN` then reports as `PAGE_IS_WRITTEN`.
//! [`PagemapScanner`] reads those pages from outside QEMU and protects them again in the
//! same ioctl, on `/proc/<qemu>/pagemap`: flags `PM_SCAN_WP_MATCHING |
//! PM_SCAN_CHECK_WPASYNC`, `category_mask = return_mask = PAGE_IS_WRITTEN`, looping on
//! `walk_end` until the whole mapping is walked (the kernel stops early when the output
//! vector is full). The daemons' writes (`dirty-pages`, see `docs/LEVEL3.md`) are merged
//! into the same [`DirtySet`], in byte offsets of the RAM file.
//!
//! Harvest only while QEMU is stopped (`stop`): a page written between the scan of its
//! region and `cont` is caught by the next scan, but the engine copies pages after the
//! scan, so only a stopped guest makes the copy match the scan.
//!
//! # Findings (issue 11: kernel 6.18, QEMU 7.2 under TCG, 2 loaded cores)
//!
//! - What works: QEMU's `memory-backend-file,mem-path=/dev/shm/…,share=on` (shmem)
//!   registered inside QEMU with `UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED`
//!   (bits 15 and 13), `UFFDIO_REGISTER_MODE_WP`, `UFFDIO_WRITEPROTECT` over the whole
//!   mapping; then `PAGEMAP_SCAN` (`_IOWR('f', 16, struct pm_scan_arg)` = `0xc0606610`)
//!   from another process with `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`,
//!   `category_mask = return_mask = PAGE_IS_WRITTEN`, `max_pages = 0`. A range nobody
//!   registered fails with `EPERM` ([`DirtyError::NotTracked`]) instead of reporting
//!   nothing. The tracked process may be unprivileged: with `vm.unprivileged_userfaultfd
//!   = 0` the library falls back to `UFFD_USER_MODE_ONLY`, and writes by the kernel
//!   (read(2) into the mapping, as QEMU's block layer reads into guest RAM) are still
//!   seen, because async write-protect faults never reach the userfaultfd.
//! - `walk_end` can be stale: when the kernel's internal buffer (512 regions) fills
//!   during a call, it sets `walk_end`, goes on walking within the same call and, if the
//!   walk then completes, returns that earlier `walk_end` with regions beyond it (seen:
//!   952 regions, `walk_end` 1024 pages after the start, the last region at 6098 pages).
//!   So regions are checked against the scanned range, not `walk_end`, and the next call
//!   starts after the last region reported when that is further than `walk_end`.
//! - Tests (`tests/tests/l3_dirty_tracking.rs`): a stand-in for QEMU sees exactly the
//!   pages it wrote (also by the kernel, also as `nobody`) and after the re-arm only the
//!   new ones; a TCG guest rewriting files in its tmpfs: in each of 3 stopped intervals
//!   every page whose bytes changed in the RAM file (900–960 pages) was in the scan, none
//!   missed, the scan holding 30–70 more (pages rewritten with the same bytes); a scan of
//!   a stopped guest is empty.
//! - Measured, one scan and re-arm of 256 MiB (release build; debug in brackets): with
//!   200–1,000 written pages (a TCG guest's interval) 0.18–0.25 ms [0.2–0.7 ms], once
//!   4.2 ms on the loaded machine; nothing written 0.16–0.18 ms; every page written (one
//!   region) 0.8–1.1 ms [0.9 ms]; every other page written (32,768 regions, 1,024 per
//!   call) 3–3.5 ms [26–95 ms, mostly the debug build's `DirtySet`].
//! - Under KVM (reasoned from the kernel's code, not verifiable on this TCG-only
//!   machine): KVM maps guest memory from the same userspace page tables (the memslot's
//!   userspace address, faulted in through GUP, with `FOLL_WRITE` for a write), and
//!   `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING` brackets its walk (`do_pagemap_scan`) with
//!   `mmu_notifier_invalidate_range_start/end` (`MMU_NOTIFY_PROTECTION_VMA`), so KVM
//!   drops its mapping of the range when the pages are protected again. The guest's next
//!   write faults into KVM, which faults the host page for writing, which lifts the
//!   protection: the page is written. A page KVM faults in for reading while protected
//!   is mapped read-only (the protected PTE is not writable). To prove on a KVM host: run
//!   the QEMU test of `l3_dirty_tracking.rs` with `-accel kvm` (`guest.rs` passes `tcg`).
//! - Not seen by this tracker: writes through another mapping or process (the daemons
//!   report theirs; DESIGN.md saw 64 of 64 pages missed otherwise), and pages discarded
//!   from the RAM file (a hole punched, as QEMU's balloon and virtio-mem do): their
//!   bytes become zeros without a write fault and they stay protected (tested:
//!   `a_hole_punched_in_the_ram_file_is_not_reported`). A protected VM must have no
//!   balloon or virtio-mem device. Reasoned, not tested: not with QEMU's `-daemonize`
//!   (its fork leaves the library's thread behind), nor with QEMU's own userfaultfd users
//!   (postcopy, background snapshot: `UFFDIO_REGISTER` then fails with `EBUSY`, an error
//!   reply).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

/// The page size the tracking works in (x86-64; checked at [`PagemapScanner::open`]).
pub const PAGE_SIZE: u64 = 4096;

// From `include/uapi/linux/fs.h` (Linux 6.7, newer than Debian 12's headers).
/// `PAGE_IS_WRITTEN`: the page is not write-protected (written since the last protection).
const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PM_SCAN_WP_MATCHING`: write-protect the pages that match.
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail (`EPERM`) unless the range is async write-protected.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct page_region`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::Ioctl =
    ((3 << 30) | ((std::mem::size_of::<PmScanArg>() as u32) << 16) | (0x66 << 8) | 16)
        as libc::Ioctl;

/// Regions one `PAGEMAP_SCAN` call may return (the walk continues at `walk_end`).
const REGIONS_PER_CALL: usize = 1024;
/// How long the preload library may take to answer a request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds on a reply from the preload library (it runs inside QEMU).
const MAX_REPLY_LINE_BYTES: u64 = 8192;
const MAX_REPLY_LINES: usize = 1024;
/// Interval between two connection attempts while QEMU starts.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

#[derive(Debug, Error)]
pub enum DirtyError {
    #[error("range {offset:#x}+{len:#x} overflows")]
    Overflow { offset: u64, len: u64 },
    #[error("the page size is {0}, not 4096")]
    PageSize(i64),
    #[error("cannot read {path}")]
    Proc {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{start:#x}+{len:#x} of process {pid} is not one page-aligned shared mapping of one file"
    )]
    NotAMapping { pid: u32, start: u64, len: u64 },
    #[error("the mapping at {start:#x} maps another file than {path}")]
    OtherFile { start: u64, path: PathBuf },
    #[error("PAGEMAP_SCAN is not supported by this kernel (Linux 6.7 or later needed)")]
    ScanUnsupported(#[source] io::Error),
    #[error(
        "the range is not write-protected in async mode (not registered by the preload library)"
    )]
    NotTracked(#[source] io::Error),
    #[error("PAGEMAP_SCAN failed")]
    Scan(#[source] io::Error),
    #[error("PAGEMAP_SCAN returned a region outside the scan: {start:#x}..{end:#x}")]
    BadRegion { start: u64, end: u64 },
    #[error("PAGEMAP_SCAN made no progress at {0:#x}")]
    NoProgress(u64),
    #[error("cannot connect to the tracking socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("tracking socket I/O failed")]
    Io(#[from] io::Error),
    #[error("{0:?} cannot be sent to the preload library (not UTF-8, or a newline)")]
    BadPath(PathBuf),
    #[error("the preload library refused: {0}")]
    Refused(String),
    #[error("the preload library sent an unexpected reply: {0:?}")]
    BadReply(String),
}

/// A half-open, page-aligned byte range `[start, end)` of the RAM file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    start: u64,
    end: u64,
}

impl PageRange {
    /// The pages that hold any byte of `[offset, offset + len)`; `None` when empty.
    pub fn covering(offset: u64, len: u64) -> Result<Option<PageRange>, DirtyError> {
        let overflow = DirtyError::Overflow { offset, len };
        if len == 0 {
            return Ok(None);
        }
        let end = offset
            .checked_add(len)
            .and_then(|end| end.checked_next_multiple_of(PAGE_SIZE))
            .ok_or(overflow)?;
        Ok(Some(PageRange {
            start: offset - offset % PAGE_SIZE,
            end,
        }))
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn end(&self) -> u64 {
        self.end
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// A set of pages of the RAM file: sorted, merged, page-aligned byte ranges. Holds QEMU's
/// written pages and the daemons' reported ranges alike.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtySet {
    /// start → end of each range; ranges neither overlap nor touch.
    ranges: BTreeMap<u64, u64>,
}

impl DirtySet {
    pub fn new() -> DirtySet {
        DirtySet::default()
    }

    /// Adds the pages that hold any byte of `[offset, offset + len)` (a daemon's reported
    /// range, which may be unaligned or hostile).
    pub fn insert_bytes(&mut self, offset: u64, len: u64) -> Result<(), DirtyError> {
        if let Some(range) = PageRange::covering(offset, len)? {
            self.insert(range);
        }
        Ok(())
    }

    /// Adds `range`, merging it with the ranges it overlaps or touches.
    pub fn insert(&mut self, range: PageRange) {
        let (mut start, mut end) = (range.start, range.end);
        if start >= end {
            return;
        }
        // Scans add ranges in ascending order: append or extend the last one.
        if let Some((_, last_end)) = self.ranges.iter_mut().next_back() {
            if start == *last_end {
                *last_end = end;
                return;
            }
            if start > *last_end {
                self.ranges.insert(start, end);
                return;
            }
        }
        if let Some((&before, &before_end)) = self.ranges.range(..=start).next_back() {
            if before_end >= start {
                start = before;
                end = end.max(before_end);
                self.ranges.remove(&before);
            }
        }
        while let Some((&next, &next_end)) = self.ranges.range(start..=end).next() {
            end = end.max(next_end);
            self.ranges.remove(&next);
        }
        self.ranges.insert(start, end);
    }

    /// Adds every page of `other`.
    pub fn union(&mut self, other: &DirtySet) {
        for range in other.ranges() {
            self.insert(range);
        }
    }

    /// Drops every page at or beyond `size` (a range reported past the end of the RAM).
    pub fn truncate(&mut self, size: u64) {
        let limit = size - size % PAGE_SIZE;
        let beyond: Vec<u64> = self
            .ranges
            .range(limit..)
            .map(|(&start, _)| start)
            .collect();
        for start in beyond {
            self.ranges.remove(&start);
        }
        if let Some((_, end)) = self.ranges.iter_mut().next_back() {
            *end = (*end).min(limit);
        }
    }

    /// The ranges in ascending order.
    pub fn ranges(&self) -> impl Iterator<Item = PageRange> + '_ {
        self.ranges
            .iter()
            .map(|(&start, &end)| PageRange { start, end })
    }

    /// The byte offset of every page, ascending.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges()
            .flat_map(|range| (range.start..range.end).step_by(PAGE_SIZE as usize))
    }

    /// Whether the page holding `offset` is in the set.
    pub fn contains(&self, offset: u64) -> bool {
        self.ranges
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, &end)| offset < end)
    }

    pub fn page_count(&self) -> u64 {
        self.byte_count() / PAGE_SIZE
    }

    pub fn byte_count(&self) -> u64 {
        self.ranges().map(|range| range.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
    }
}

/// A file's identity: `st_dev` (glibc's encoding, as `stat` gives it and as the daemons
/// report it in `dirty-pages`) and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub inode: u64,
}

impl FileId {
    /// The file `path` names, following symlinks.
    pub fn of(path: &Path) -> Result<FileId, DirtyError> {
        use std::os::unix::fs::MetadataExt;
        let metadata = std::fs::metadata(path).map_err(|source| DirtyError::Proc {
            path: path.to_owned(),
            source,
        })?;
        Ok(FileId {
            dev: metadata.dev(),
            inode: metadata.ino(),
        })
    }

    /// From `/proc/PID/maps`' `MAJOR:MINOR` and inode (glibc's `gnu_dev_makedev`).
    fn from_maps(major: u64, minor: u64, inode: u64) -> FileId {
        let dev = ((major & 0xffff_f000) << 32)
            | ((major & 0xfff) << 8)
            | ((minor & 0xffff_ff00) << 12)
            | (minor & 0xff);
        FileId { dev, inode }
    }
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Area {
    start: u64,
    end: u64,
    shared: bool,
    offset: u64,
    file: FileId,
}

/// Parses `START-END PERMS OFFSET MAJOR:MINOR INODE [PATH]`; `None` for anything else.
fn parse_maps_line(line: &str) -> Option<Area> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let permissions = fields.next()?;
    let offset = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode = fields.next()?;
    let area = Area {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        shared: permissions.as_bytes().get(3) == Some(&b's'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        file: FileId::from_maps(
            u64::from_str_radix(major, 16).ok()?,
            u64::from_str_radix(minor, 16).ok()?,
            inode.parse().ok()?,
        ),
    };
    (area.start < area.end).then_some(area)
}

/// The file and the file offset at `start` of `[start, start + len)`, which must be covered
/// by shared areas of one file that continue each other in memory and in the file.
fn resolve(maps: &str, pid: u32, start: u64, len: u64) -> Result<(FileId, u64), DirtyError> {
    let not_a_mapping = || DirtyError::NotAMapping { pid, start, len };
    let end = start.checked_add(len).ok_or_else(not_a_mapping)?;
    if len == 0 || !start.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(not_a_mapping());
    }
    let mut found: Option<(FileId, u64)> = None;
    let mut cursor = start;
    for area in maps.lines().filter_map(parse_maps_line) {
        if cursor >= end {
            break;
        }
        if area.end <= cursor {
            continue;
        }
        if area.start > cursor || !area.shared {
            return Err(not_a_mapping());
        }
        let offset = area
            .offset
            .checked_add(cursor - area.start)
            .ok_or_else(not_a_mapping)?;
        match found {
            None => found = Some((area.file, offset)),
            Some((file, base)) => {
                if file != area.file || base.checked_add(cursor - start) != Some(offset) {
                    return Err(not_a_mapping());
                }
            }
        }
        cursor = area.end;
    }
    match found {
        Some(found) if cursor >= end => Ok(found),
        _ => Err(not_a_mapping()),
    }
}

/// What a scan does to the pages it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanMode {
    /// Report the written pages and write-protect them again (an epoch's harvest).
    Rearm,
    /// Report only (diagnostics; the pages stay written).
    Peek,
}

/// What one scan found and cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanStats {
    pub pages: u64,
    pub ioctl_calls: u32,
}

/// Reads (and re-arms) the written pages of one async write-protected mapping of another
/// process through `/proc/PID/pagemap`.
#[derive(Debug)]
pub struct PagemapScanner {
    pagemap: File,
    start: u64,
    end: u64,
    file: FileId,
    file_offset: u64,
    regions: Vec<PageRegion>,
}

impl PagemapScanner {
    /// Scans `[start, start + len)` of process `pid`, which must be one shared mapping of
    /// one file (checked in `/proc/PID/maps`).
    pub fn open(pid: u32, start: u64, len: u64) -> Result<PagemapScanner, DirtyError> {
        // SAFETY: sysconf(3) takes an integer and touches no memory of ours.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if u64::try_from(page_size).ok() != Some(PAGE_SIZE) {
            return Err(DirtyError::PageSize(page_size));
        }
        let maps_path = PathBuf::from(format!("/proc/{pid}/maps"));
        let maps = std::fs::read_to_string(&maps_path).map_err(|source| DirtyError::Proc {
            path: maps_path,
            source,
        })?;
        let (file, file_offset) = resolve(&maps, pid, start, len)?;
        let pagemap_path = PathBuf::from(format!("/proc/{pid}/pagemap"));
        let pagemap = File::open(&pagemap_path).map_err(|source| DirtyError::Proc {
            path: pagemap_path,
            source,
        })?;
        Ok(PagemapScanner {
            pagemap,
            start,
            end: start + len,
            file,
            file_offset,
            regions: vec![PageRegion::default(); REGIONS_PER_CALL],
        })
    }

    /// The file the mapping maps.
    pub fn file(&self) -> FileId {
        self.file
    }

    /// The mapping's virtual address range `[start, end)` in its process.
    pub fn span(&self) -> (u64, u64) {
        (self.start, self.end)
    }

    /// The offset in the file of the mapping's first byte.
    pub fn file_offset(&self) -> u64 {
        self.file_offset
    }

    /// Reads the written pages and write-protects them again; file offsets.
    pub fn harvest(&mut self) -> Result<DirtySet, DirtyError> {
        let mut dirty = DirtySet::new();
        self.scan_into(ScanMode::Rearm, &mut dirty)?;
        Ok(dirty)
    }

    /// Adds the written pages of the whole mapping to `dirty`, as file offsets.
    pub fn scan_into(
        &mut self,
        mode: ScanMode,
        dirty: &mut DirtySet,
    ) -> Result<ScanStats, DirtyError> {
        let mut stats = ScanStats::default();
        let mut cursor = self.start;
        while cursor < self.end {
            let (count, walk_end) = self.scan_once(mode, cursor)?;
            stats.ioctl_calls += 1;
            // The kernel may report regions beyond `walk_end` (see the module's findings):
            // regions are checked against the scanned range, and the walk resumes after
            // the last one reported when that is further.
            let mut next = walk_end;
            for region in self.regions.iter().take(count) {
                let bad = region.start >= region.end
                    || region.start < cursor
                    || region.end > self.end
                    || !region.start.is_multiple_of(PAGE_SIZE)
                    || !region.end.is_multiple_of(PAGE_SIZE);
                if bad {
                    return Err(DirtyError::BadRegion {
                        start: region.start,
                        end: region.end,
                    });
                }
                let offset = self.file_offset + (region.start - self.start);
                stats.pages += (region.end - region.start) / PAGE_SIZE;
                dirty.insert_bytes(offset, region.end - region.start)?;
                next = next.max(region.end);
            }
            if next <= cursor || next > self.end {
                return Err(DirtyError::NoProgress(cursor));
            }
            cursor = next;
        }
        Ok(stats)
    }

    /// One `PAGEMAP_SCAN` from `start`: the regions filled and where the walk stopped.
    fn scan_once(&mut self, mode: ScanMode, start: u64) -> Result<(usize, u64), DirtyError> {
        let flags = match mode {
            ScanMode::Rearm => PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            ScanMode::Peek => PM_SCAN_CHECK_WPASYNC,
        };
        let mut argument = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags,
            start,
            end: self.end,
            walk_end: 0,
            vec: self.regions.as_mut_ptr() as u64,
            vec_len: self.regions.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: PAGE_IS_WRITTEN,
            category_anyof_mask: 0,
            return_mask: PAGE_IS_WRITTEN,
        };
        loop {
            // SAFETY: PAGEMAP_SCAN reads the `pm_scan_arg` it is given (`argument`, whose
            // size field and the request's encoded size are both `size_of::<PmScanArg>()`),
            // writes back its `walk_end`, and writes at most `vec_len` `page_region`s to
            // `vec`, which points at `self.regions`, a live buffer of exactly that many
            // regions that nothing else uses during the call. `pagemap` is an open pagemap.
            let result =
                unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut argument) };
            if result >= 0 {
                let count = usize::try_from(result).unwrap_or(0).min(self.regions.len());
                return Ok((count, argument.walk_end));
            }
            let error = io::Error::last_os_error();
            return Err(match error.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOTTY) => DirtyError::ScanUnsupported(error),
                Some(libc::EPERM) => DirtyError::NotTracked(error),
                _ => DirtyError::Scan(error),
            });
        }
    }
}

/// A mapping the preload library registered: QEMU's virtual addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackedSpan {
    pub start: u64,
    pub len: u64,
}

/// What the preload library reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerStatus {
    /// QEMU's PID in QEMU's PID namespace.
    pub pid: u32,
    /// Each registered mapping with the path it was registered by.
    pub tracking: Vec<(TrackedSpan, String)>,
}

/// A connection to the preload library's socket inside QEMU.
#[derive(Debug)]
pub struct TrackerClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    peer_pid: u32,
}

impl TrackerClient {
    /// Connects, retrying until `timeout` while QEMU starts.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<TrackerClient, DirtyError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(source) if Instant::now() >= deadline => {
                    return Err(DirtyError::Connect {
                        path: socket.to_owned(),
                        source,
                    })
                }
                Err(_) => std::thread::sleep(CONNECT_RETRY),
            }
        };
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let peer_pid = peer_pid(&stream)?;
        Ok(TrackerClient {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            peer_pid,
        })
    }

    /// The PID of the process serving the socket (QEMU), in our PID namespace
    /// (`SO_PEERCRED`, taken when it listened).
    pub fn peer_pid(&self) -> u32 {
        self.peer_pid
    }

    /// Write-protects every shared mapping of `ram_file` in QEMU.
    pub fn register(&mut self, ram_file: &Path) -> Result<Vec<TrackedSpan>, DirtyError> {
        let path = ram_file
            .to_str()
            .filter(|path| !path.contains('\n'))
            .ok_or_else(|| DirtyError::BadPath(ram_file.to_owned()))?;
        let lines = self.request(&format!("register {path}"))?;
        if lines.is_empty() {
            return Err(DirtyError::BadReply("register: no mapping".to_owned()));
        }
        lines.iter().map(|line| parse_span(line, line)).collect()
    }

    /// Undoes every registration; returns how many there were.
    pub fn unregister(&mut self) -> Result<u64, DirtyError> {
        let lines = self.request("unregister")?;
        match lines.as_slice() {
            [line] => line
                .strip_prefix("unregistered ")
                .and_then(parse_hex)
                .ok_or_else(|| DirtyError::BadReply(line.clone())),
            _ => Err(DirtyError::BadReply(lines.join(" | "))),
        }
    }

    pub fn status(&mut self) -> Result<TrackerStatus, DirtyError> {
        let lines = self.request("status")?;
        let mut pid = None;
        let mut tracking = Vec::new();
        for line in &lines {
            if let Some(value) = line.strip_prefix("pid ") {
                pid = parse_hex(value).and_then(|pid| u32::try_from(pid).ok());
            } else if let Some(rest) = line.strip_prefix("tracking ") {
                let mut fields = rest.splitn(3, ' ');
                let span = format!(
                    "{} {}",
                    fields.next().unwrap_or_default(),
                    fields.next().unwrap_or_default()
                );
                let path = fields.next().unwrap_or_default().to_owned();
                tracking.push((parse_span(&span, line)?, path));
            } else {
                return Err(DirtyError::BadReply(line.clone()));
            }
        }
        let pid = pid.ok_or_else(|| DirtyError::BadReply(lines.join(" | ")))?;
        Ok(TrackerStatus { pid, tracking })
    }

    /// Sends one request line; returns the reply's `ok` lines without `ok `.
    fn request(&mut self, line: &str) -> Result<Vec<String>, DirtyError> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        let mut lines = Vec::new();
        loop {
            let mut bytes = Vec::new();
            (&mut self.reader)
                .take(MAX_REPLY_LINE_BYTES)
                .read_until(b'\n', &mut bytes)?;
            if bytes.last() != Some(&b'\n') {
                return Err(if bytes.is_empty() {
                    DirtyError::Io(io::ErrorKind::UnexpectedEof.into())
                } else {
                    DirtyError::BadReply(String::from_utf8_lossy(&bytes).into_owned())
                });
            }
            bytes.pop();
            let reply = String::from_utf8(bytes).map_err(|error| {
                DirtyError::BadReply(String::from_utf8_lossy(error.as_bytes()).into_owned())
            })?;
            if reply == "end" {
                return Ok(lines);
            }
            if let Some(text) = reply.strip_prefix("error ") {
                return Err(DirtyError::Refused(text.to_owned()));
            }
            match reply.strip_prefix("ok ") {
                Some(body) if lines.len() < MAX_REPLY_LINES => lines.push(body.to_owned()),
                _ => return Err(DirtyError::BadReply(reply)),
            }
        }
    }
}

fn parse_hex(text: &str) -> Option<u64> {
    u64::from_str_radix(text.strip_prefix("0x")?, 16).ok()
}

/// `0xSTART 0xLEN`.
fn parse_span(text: &str, line: &str) -> Result<TrackedSpan, DirtyError> {
    let bad = || DirtyError::BadReply(line.to_owned());
    let (start, len) = text.split_once(' ').ok_or_else(bad)?;
    Ok(TrackedSpan {
        start: parse_hex(start).ok_or_else(bad)?,
        len: parse_hex(len).ok_or_else(bad)?,
    })
}

fn peer_pid(stream: &UnixStream) -> io::Result<u32> {
    let credentials = daemon_util::peer_credentials(stream)?;
    u32::try_from(credentials.pid).map_err(|_| io::Error::other("the peer has no PID"))
}

/// One scanner per registered span, each checked to map `file`.
fn open_scanners(
    pid: u32,
    spans: &[TrackedSpan],
    file: FileId,
    ram_file: &Path,
) -> Result<Vec<PagemapScanner>, DirtyError> {
    let mut scanners = Vec::with_capacity(spans.len());
    for span in spans {
        let scanner = PagemapScanner::open(pid, span.start, span.len)?;
        if scanner.file() != file {
            return Err(DirtyError::OtherFile {
                start: span.start,
                path: ram_file.to_owned(),
            });
        }
        scanners.push(scanner);
    }
    Ok(scanners)
}

/// QEMU's RAM tracking as the engine uses it: registered through the preload library,
/// harvested with one [`PagemapScanner`] per mapping of the RAM file.
#[derive(Debug)]
pub struct RamTracker {
    client: TrackerClient,
    scanners: Vec<PagemapScanner>,
}

impl RamTracker {
    /// Connects to the preload library at `socket` (retrying until `timeout` while QEMU
    /// starts), registers `ram_file` and checks that every mapping it reports maps that
    /// file in QEMU.
    pub fn start(
        socket: &Path,
        ram_file: &Path,
        timeout: Duration,
    ) -> Result<RamTracker, DirtyError> {
        let file = FileId::of(ram_file)?;
        let mut client = TrackerClient::connect(socket, timeout)?;
        let pid = client.peer_pid();
        let spans = client.register(ram_file)?;
        match open_scanners(pid, &spans, file, ram_file) {
            Ok(scanners) => Ok(RamTracker { client, scanners }),
            Err(error) => {
                // Best effort: leave no protection behind that nobody harvests.
                let _ = client.unregister();
                Err(error)
            }
        }
    }

    /// QEMU's PID in our PID namespace.
    pub fn qemu_pid(&self) -> u32 {
        self.client.peer_pid()
    }

    /// Reads QEMU's written pages and write-protects them again (call while QEMU is
    /// stopped); file offsets.
    pub fn harvest(&mut self) -> Result<DirtySet, DirtyError> {
        let mut dirty = DirtySet::new();
        self.scan_into(ScanMode::Rearm, &mut dirty)?;
        Ok(dirty)
    }

    /// Adds QEMU's written pages to `dirty`.
    pub fn scan_into(
        &mut self,
        mode: ScanMode,
        dirty: &mut DirtySet,
    ) -> Result<ScanStats, DirtyError> {
        let mut total = ScanStats::default();
        for scanner in &mut self.scanners {
            let stats = scanner.scan_into(mode, dirty)?;
            total.pages += stats.pages;
            total.ioctl_calls += stats.ioctl_calls;
        }
        Ok(total)
    }

    /// The preload library's view.
    pub fn status(&mut self) -> Result<TrackerStatus, DirtyError> {
        self.client.status()
    }

    /// Ends the tracking inside QEMU (QEMU keeps running).
    pub fn stop(mut self) -> Result<(), DirtyError> {
        self.client.unregister().map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ranges: &[(u64, u64)]) -> DirtySet {
        let mut dirty = DirtySet::new();
        for &(offset, len) in ranges {
            dirty.insert_bytes(offset, len).expect("in range");
        }
        dirty
    }

    fn pairs(dirty: &DirtySet) -> Vec<(u64, u64)> {
        dirty
            .ranges()
            .map(|range| (range.start(), range.end()))
            .collect()
    }

    #[test]
    fn the_ioctl_number_matches_the_kernel_header() {
        // `_IOWR('f', 16, struct pm_scan_arg)`, a 96-byte struct.
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    }

    #[test]
    fn ranges_merge_when_they_overlap_or_touch() {
        let dirty = set(&[
            (0x5000, 0x1000),
            (0x0, 0x1000),
            (0x1000, 0x1000),
            (0x9000, 0x2000),
            (0x4000, 0x3000),
            (0x8000, 0x1000),
        ]);
        assert_eq!(
            pairs(&dirty),
            vec![(0x0, 0x2000), (0x4000, 0x7000), (0x8000, 0xb000)]
        );
        assert_eq!(dirty.page_count(), 2 + 3 + 3);
        let big = set(&[(0x0, 0x20000)]);
        let mut all = dirty.clone();
        all.union(&big);
        assert_eq!(pairs(&all), vec![(0x0, 0x20000)]);
    }

    #[test]
    fn ascending_ranges_append_or_extend_the_last_one() {
        let dirty = set(&[
            (0x0, 0x1000),
            (0x1000, 0x1000),
            (0x3000, 0x1000),
            (0x4000, 0x2000),
            (0x5000, 0x4000),
        ]);
        assert_eq!(pairs(&dirty), vec![(0x0, 0x2000), (0x3000, 0x9000)]);
    }

    #[test]
    fn unaligned_ranges_cover_their_pages() {
        let dirty = set(&[(0x1fff, 2), (0x5001, 0), (0x7000, 1)]);
        assert_eq!(pairs(&dirty), vec![(0x1000, 0x3000), (0x7000, 0x8000)]);
        assert!(dirty.contains(0x1000) && dirty.contains(0x2fff) && dirty.contains(0x7abc));
        assert!(!dirty.contains(0x3000) && !dirty.contains(0x0) && !dirty.contains(0x8000));
        assert_eq!(
            dirty.pages().collect::<Vec<_>>(),
            vec![0x1000, 0x2000, 0x7000]
        );
    }

    #[test]
    fn hostile_ranges_are_errors_and_truncate_bounds_the_set() {
        let mut dirty = DirtySet::new();
        assert!(dirty.insert_bytes(u64::MAX - 10, 20).is_err());
        assert!(dirty.insert_bytes(u64::MAX - 10, 5).is_err());
        assert!(dirty.is_empty());
        dirty.insert_bytes(0x1000, 0x4000).expect("in range");
        dirty.insert_bytes(0x9000, 0x1000).expect("in range");
        dirty.truncate(0x3800);
        assert_eq!(pairs(&dirty), vec![(0x1000, 0x3000)]);
        dirty.truncate(0);
        assert!(dirty.is_empty());
    }

    const MAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fd:01 1234 /usr/bin/qemu-system-x86_64
7f0000000000-7f0008000000 rw-s 00000000 00:1a 42 /dev/shm/ftvm vm.ram
7f0008000000-7f0010000000 rw-s 08000000 00:1a 42 /dev/shm/ftvm vm.ram
7f0010000000-7f0010001000 rw-s 00000000 00:1a 42 /dev/shm/ftvm vm.ram
7f0020000000-7f0020001000 rw-p 00000000 00:1a 42 /dev/shm/ftvm vm.ram
";

    #[test]
    fn a_span_resolves_to_its_file_and_offset() {
        let ram = FileId::from_maps(0, 0x1a, 42);
        assert_eq!(
            resolve(MAPS, 1, 0x7f00_0000_0000, 0x1000_0000).expect("one mapping"),
            (ram, 0)
        );
        assert_eq!(
            resolve(MAPS, 1, 0x7f00_0800_0000, 0x1000).expect("inside"),
            (ram, 0x800_0000)
        );
        for (start, len) in [
            (0x7f00_0000_0000, 0x1000_1000), // continues in memory, not in the file
            (0x7f00_2000_0000, 0x1000),      // private
            (0x7f00_1000_1000, 0x1000),      // unmapped
            (0x7f00_0000_0000, 0),
            (0x7f00_0000_0001, 0x1000),
            (u64::MAX - 0xfff, 0x2000),
        ] {
            assert!(resolve(MAPS, 1, start, len).is_err(), "{start:#x}+{len:#x}");
        }
        assert_eq!(
            FileId::from_maps(0xfd, 0x01, 7).dev,
            0xfd01,
            "glibc's makedev for small numbers"
        );
    }

    /// A fake preload library that answers each request with the next canned reply.
    fn fake_tracker(replies: Vec<&'static [u8]>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("track.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut writer = stream;
            for reply in replies {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let _ = writer.write_all(reply);
            }
        });
        (dir, path)
    }

    #[test]
    fn the_client_parses_replies_and_refuses_hostile_ones() {
        let long: &'static [u8] = Box::leak(vec![b'a'; 20_000].into_boxed_slice());
        let (_dir, path) = fake_tracker(vec![
            b"ok 0x7f0000000000 0x10000000\nend\n",
            b"ok pid 0x2a\nok tracking 0x1000 0x2000 /dev/shm/a b\nend\n",
            b"ok unregistered 0x1\nend\n",
            b"error no such file\n",
            b"ok 0x1000\nend\n",
            b"surprise\n",
            long,
        ]);
        let mut client = TrackerClient::connect(&path, Duration::from_secs(5)).expect("connect");
        assert_eq!(client.peer_pid(), std::process::id());
        assert_eq!(
            client
                .register(Path::new("/dev/shm/ram"))
                .expect("registered"),
            vec![TrackedSpan {
                start: 0x7f00_0000_0000,
                len: 0x1000_0000
            }]
        );
        let status = client.status().expect("status");
        assert_eq!(status.pid, 42);
        assert_eq!(
            status.tracking,
            vec![(
                TrackedSpan {
                    start: 0x1000,
                    len: 0x2000
                },
                "/dev/shm/a b".to_owned()
            )]
        );
        assert_eq!(client.unregister().expect("unregistered"), 1);
        assert!(matches!(
            client.register(Path::new("/x")),
            Err(DirtyError::Refused(text)) if text == "no such file"
        ));
        assert!(matches!(
            client.register(Path::new("/x")),
            Err(DirtyError::BadReply(_))
        ));
        assert!(matches!(client.status(), Err(DirtyError::BadReply(_))));
        assert!(matches!(client.status(), Err(DirtyError::BadReply(_))));
        assert!(matches!(
            client.register(Path::new("/a\nstatus")),
            Err(DirtyError::BadPath(_))
        ));
    }

    #[test]
    fn a_mapping_nobody_registered_is_refused_by_the_kernel() {
        // A shared mapping of our own, never registered with a userfaultfd: the real ioctl
        // with PM_SCAN_CHECK_WPASYNC refuses it (EPERM) instead of reporting nothing.
        let file = tempfile::tempfile().expect("temp file");
        file.set_len(4 * PAGE_SIZE).expect("size");
        let len = (4 * PAGE_SIZE) as usize;
        // SAFETY: a new shared mapping chosen by the kernel, of a file we hold open and
        // sized above; unmapped below before the file is closed, used by nothing else.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let result = PagemapScanner::open(std::process::id(), base as u64, 4 * PAGE_SIZE)
            .and_then(|mut scanner| scanner.harvest());
        // SAFETY: unmaps exactly the mapping made above, which nothing refers to any more.
        unsafe { libc::munmap(base, len) };
        assert!(
            matches!(result, Err(DirtyError::NotTracked(_))),
            "{result:?}"
        );
    }
}
