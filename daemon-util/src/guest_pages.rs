//! Which pages of guest RAM a daemon wrote (Level 3): the `dirty-pages` control command of
//! both vhost-user daemons reads them here (`docs/LEVEL3.md`, "Interfaces").
//!
//! A daemon maps guest RAM as `GuestMemoryMmap<TrackedBitmap>` (its `VhostUserBackend`'s
//! `Bitmap`). Every write vm-memory and virtio-queue make into that memory (request data,
//! status bytes, used-ring entries, `used_event`/`avail_event`) marks the written pages in
//! two places:
//!
//! - QEMU's migration log (`VHOST_USER_SET_LOG_BASE`, `LOG_SHMFD`), exactly as
//!   vhost-user-backend's [`BitmapMmapRegion`] does: live migration keeps working;
//! - an always-on page bitmap of the region, which [`GuestPages::take`] reads and clears.
//!
//! A write made through a raw host pointer (io_uring, `preadv` into guest buffers) bypasses
//! both: whoever makes one marks it with [`TrackedBitmap::mark_dirty`] on the region's bitmap.
//!
//! The answer names pages by the file QEMU mapped guest RAM from (the region's fd,
//! identified by device and inode) and their offset in it (the region's `mmap_offset` plus
//! the offset within the region), which is what the checkpoint engine maps too.
//!
//! vm-memory marks a page after it wrote it: a `take` that runs while the daemon writes may
//! see a write's data before its mark, and then reports that page in the next `take`. The
//! engine calls `take` while the VM is stopped and the daemons have drained their queues, so
//! nothing is written meanwhile.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace};
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::lock;

/// The page size of the reports (and of the vhost-user dirty log).
pub const PAGE_SIZE: u64 = 4096;

/// Largest region whose pages are tracked one by one (a 32 MiB bitmap). The region's size
/// comes from QEMU and the bitmap is allocated before the mapping is tried, so a larger
/// region is reported whole at every `take` instead (a superset is harmless).
pub const MAX_TRACKED_REGION_BYTES: usize = 1 << 40;

const WORD_PAGES: usize = u64::BITS as usize;

/// One bit per page of a region, set by any thread, read and cleared by [`GuestPages`].
#[derive(Debug)]
struct PageBitmap {
    /// `None`: the region is too large to track; every page counts as written.
    words: Option<Box<[AtomicU64]>>,
    pages: usize,
}

impl PageBitmap {
    fn new(len: usize) -> PageBitmap {
        let pages = len.div_ceil(PAGE_SIZE as usize);
        let words = (len <= MAX_TRACKED_REGION_BYTES).then(|| {
            (0..pages.div_ceil(WORD_PAGES))
                .map(|_| AtomicU64::new(0))
                .collect()
        });
        PageBitmap { words, pages }
    }

    /// Marks the pages of `len` bytes at `offset`; pages past the end are ignored.
    fn mark(&self, offset: usize, len: usize) {
        let Some(words) = &self.words else {
            return;
        };
        if len == 0 {
            return;
        }
        let page_size = PAGE_SIZE as usize;
        let first = offset / page_size;
        let last = (offset.saturating_add(len - 1) / page_size).min(self.pages.saturating_sub(1));
        let mut page = first;
        while page <= last {
            let bit = page % WORD_PAGES;
            let count = (last - page + 1).min(WORD_PAGES - bit);
            let mask = if count == WORD_PAGES {
                u64::MAX
            } else {
                ((1u64 << count) - 1) << bit
            };
            if let Some(word) = words.get(page / WORD_PAGES) {
                word.fetch_or(mask, Ordering::Relaxed);
            }
            page += count;
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let page = offset / PAGE_SIZE as usize;
        match &self.words {
            None => page < self.pages,
            Some(words) => words
                .get(page / WORD_PAGES)
                .is_some_and(|word| word.load(Ordering::Relaxed) & (1 << (page % WORD_PAGES)) != 0),
        }
    }

    /// Calls `page_written` with each marked page, oldest word first, and clears it.
    fn take(&self, mut page_written: impl FnMut(usize)) {
        let Some(words) = &self.words else {
            (0..self.pages).for_each(page_written);
            return;
        };
        for (index, word) in words.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                page_written(index * WORD_PAGES + bit);
                bits &= bits - 1;
            }
        }
    }
}

/// The bitmap of guest memory as the daemons map it: QEMU's migration log and this crate's
/// page bitmap, both marked by every write (see the module's documentation).
#[derive(Clone, Debug)]
pub struct TrackedBitmap {
    migration: BitmapMmapRegion,
    pages: Arc<PageBitmap>,
    /// Where this slice starts in its region.
    base: usize,
}

impl Default for TrackedBitmap {
    fn default() -> TrackedBitmap {
        TrackedBitmap::with_len(0)
    }
}

impl NewBitmap for TrackedBitmap {
    fn with_len(len: usize) -> TrackedBitmap {
        TrackedBitmap {
            migration: BitmapMmapRegion::with_len(len),
            pages: Arc::new(PageBitmap::new(len)),
            base: 0,
        }
    }
}

impl Bitmap for TrackedBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.migration.mark_dirty(offset, len);
        if let Some(start) = self.base.checked_add(offset) {
            self.pages.mark(start, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.migration.dirty_at(offset)
            || self
                .base
                .checked_add(offset)
                .is_some_and(|start| self.pages.dirty_at(start))
    }

    fn slice_at(&self, offset: usize) -> TrackedBitmap {
        TrackedBitmap {
            migration: self.migration.slice_at(offset),
            pages: Arc::clone(&self.pages),
            base: self.base.saturating_add(offset),
        }
    }
}

impl WithBitmapSlice<'_> for TrackedBitmap {
    type S = TrackedBitmap;
}

impl BitmapSlice for TrackedBitmap {}

impl BitmapReplace for TrackedBitmap {
    type InnerBitmap = AtomicBitmapMmap;

    /// QEMU's `SET_LOG_BASE`: the migration log changes, the page bitmap stays.
    fn replace(&self, bitmap: AtomicBitmapMmap) {
        self.migration.replace(bitmap);
    }
}

/// Guest memory as the daemons map it.
pub type TrackedMemory = GuestMemoryMmap<TrackedBitmap>;

/// A file guest RAM is mapped from, as `stat` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// The written pages of one file: byte ranges `(offset, len)`, page-aligned, sorted, merged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenFile {
    pub file: FileId,
    pub ranges: Vec<(u64, u64)>,
}

/// Why [`GuestPages::take`] cannot answer.
#[derive(Clone, Debug)]
pub struct UnknownFile {
    guest_address: u64,
    error: String,
}

impl fmt::Display for UnknownFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guest memory region at {:#x}: its file is unknown ({})",
            self.guest_address, self.error
        )
    }
}

impl std::error::Error for UnknownFile {}

/// A region of guest memory as `take` reads it.
#[derive(Debug)]
struct Region {
    file: Result<FileId, UnknownFile>,
    /// The region's `mmap_offset` in its file.
    file_start: u64,
    pages: Arc<PageBitmap>,
}

#[derive(Debug, Default)]
struct Regions {
    current: Vec<Region>,
    /// Regions of an earlier memory table: a worker that still holds the old table may
    /// write through them until it lets go.
    retired: Vec<Region>,
    /// Marks read from retired regions nobody holds any more, not yet reported.
    pending: BTreeMap<FileId, Vec<(u64, u64)>>,
    /// A retired region whose file was unknown was dropped: its marks are lost, so the next
    /// `take` is refused.
    lost: Option<UnknownFile>,
}

impl Regions {
    /// Reads the marks of the retired regions nobody else holds (none can come any more)
    /// into `pending`, and drops them.
    fn drop_finished(&mut self) {
        let Regions {
            retired,
            pending,
            lost,
            ..
        } = self;
        retired.retain(|region| {
            if Arc::strong_count(&region.pages) > 1 {
                return true;
            }
            match &region.file {
                Ok(_) => region.take_into(pending),
                Err(error) => *lost = Some(error.clone()),
            }
            false
        });
        for ranges in pending.values_mut() {
            *ranges = merge(std::mem::take(ranges));
        }
    }
}

/// The pages a daemon wrote into guest RAM since the last [`GuestPages::take`], over every
/// memory table the frontend sent (and every connection).
#[derive(Debug, Default)]
pub struct GuestPages {
    regions: Mutex<Regions>,
}

impl GuestPages {
    pub fn new() -> GuestPages {
        GuestPages::default()
    }

    /// The frontend's new memory table (`SET_MEM_TABLE`, `ADD_MEM_REG`, …): its regions are
    /// tracked from now on; the previous table's stay until their last marks are read.
    pub fn set_memory(&self, memory: &TrackedMemory) {
        let current: Vec<Region> = memory.iter().map(Region::of).collect();
        let mut regions = lock(&self.regions);
        let previous = std::mem::take(&mut regions.current);
        for region in previous {
            let kept = current
                .iter()
                .any(|new| Arc::ptr_eq(&new.pages, &region.pages));
            if !kept {
                regions.retired.push(region);
            }
        }
        regions.current = current;
        regions.drop_finished();
    }

    /// Reads and clears the pages written since the last call: the files with any, sorted
    /// by device and inode, each with its ranges. Refused, clearing nothing, when a region's file could
    /// not be identified.
    pub fn take(&self) -> Result<Vec<WrittenFile>, UnknownFile> {
        let mut regions = lock(&self.regions);
        for region in regions.current.iter().chain(regions.retired.iter()) {
            if let Err(error) = &region.file {
                return Err(error.clone());
            }
        }
        if let Some(error) = regions.lost.take() {
            return Err(error);
        }
        regions.drop_finished();
        let mut files = std::mem::take(&mut regions.pending);
        for region in regions.retired.iter().chain(regions.current.iter()) {
            region.take_into(&mut files);
        }
        Ok(files
            .into_iter()
            .filter(|(_, ranges)| !ranges.is_empty())
            .map(|(file, ranges)| WrittenFile {
                file,
                ranges: merge(ranges),
            })
            .collect())
    }
}

impl Region {
    fn of(region: &vm_memory::GuestRegionMmap<TrackedBitmap>) -> Region {
        let guest_address = region.start_addr().0;
        let (file, file_start) = match region.file_offset() {
            Some(file_offset) => (
                file_offset
                    .file()
                    .metadata()
                    .map(|metadata| FileId {
                        dev: metadata.dev(),
                        ino: metadata.ino(),
                    })
                    .map_err(|error: io::Error| UnknownFile {
                        guest_address,
                        error: error.to_string(),
                    }),
                file_offset.start(),
            ),
            None => (
                Err(UnknownFile {
                    guest_address,
                    error: "not mapped from a file".into(),
                }),
                0,
            ),
        };
        if let Err(error) = &file {
            log::warn!("{error}: dirty-pages will be refused");
        }
        Region {
            file,
            file_start,
            pages: Arc::clone(&region.bitmap().pages),
        }
    }

    fn take_into(&self, files: &mut BTreeMap<FileId, Vec<(u64, u64)>>) {
        let Ok(file) = self.file else {
            return;
        };
        let ranges = files.entry(file).or_default();
        let file_start = self.file_start;
        self.pages.take(|page| {
            let offset = (page as u64)
                .saturating_mul(PAGE_SIZE)
                .saturating_add(file_start);
            ranges.push((offset, PAGE_SIZE));
        });
    }
}

/// Sorts ranges and merges those that overlap or touch.
fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (offset, len) in ranges {
        if let Some((last_offset, last_len)) = merged.last_mut() {
            let last_end = last_offset.saturating_add(*last_len);
            if offset <= last_end {
                *last_len = last_end.max(offset.saturating_add(len)) - *last_offset;
                continue;
            }
        }
        merged.push((offset, len));
    }
    merged
}

#[cfg(test)]
mod tests;
