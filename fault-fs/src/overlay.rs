//! The unsynced state of one file, the emulated page cache: dirty 4 KiB pages, the unsynced
//! size, and the ranges punched or cut off since the last sync, laid over the backing file
//! (the durable content, what survives a power loss).
//!
//! Reads see the overlay over the backing file. A sync writes the overlay to the backing file
//! and syncs it; a power loss drops the overlay. The [`Ledger`] orders the dirty pages of
//! every file by the time they were first dirtied, so the oldest can be written back when the
//! dirty bytes pass their cap (as the kernel's writeback does).

use std::collections::BTreeMap;
use std::io;

use crate::ranges::RangeSet;

/// Size of a dirty page, in bytes.
pub const PAGE_BYTES: u64 = 4096;
const PAGE_SIZE: usize = PAGE_BYTES as usize;

/// The durable content of a file: a backing file, or memory in the unit tests.
pub trait Backing {
    /// Reads up to `buffer.len()` bytes at `offset`; 0 at or past the end.
    fn read_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    fn length(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes `[offset, offset + len)` read as zeros without changing the length.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes what was written durable: the data only, or data and metadata.
    fn sync(&self, data_only: bool) -> io::Result<()>;
}

/// Which file a dirty page belongs to, and which page of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageId {
    pub file: u64,
    pub index: u64,
}

/// The dirty pages of all files, oldest first, and their total size.
#[derive(Debug, Default)]
pub struct Ledger {
    order: BTreeMap<u64, PageId>,
    next_sequence: u64,
}

impl Ledger {
    pub fn dirty_bytes(&self) -> u64 {
        (self.order.len() as u64).saturating_mul(PAGE_BYTES)
    }

    /// The page dirty for the longest time.
    pub fn oldest(&self) -> Option<PageId> {
        self.order.values().next().copied()
    }

    fn dirtied(&mut self, page: PageId) -> u64 {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        self.order.insert(sequence, page);
        sequence
    }

    fn cleaned(&mut self, sequence: u64) {
        let removed = self.order.remove(&sequence);
        assert!(removed.is_some(), "a dirty page missing from the ledger");
    }
}

struct Page {
    /// The page's place in the [`Ledger`].
    sequence: u64,
    bytes: Box<[u8]>,
}

/// One file's unsynced state.
pub struct Overlay {
    file: u64,
    pages: BTreeMap<u64, Page>,
    /// The size readers see.
    size: u64,
    /// The backing file's length, as far as this overlay has made or found it.
    durable_size: u64,
    /// Ranges that read as zeros where no dirty page covers them: the backing file still holds
    /// what was there before a punch, a zeroing or a truncate.
    zeroed: RangeSet,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Overlay")
            .field("file", &self.file)
            .field("dirty_pages", &self.pages.len())
            .field("size", &self.size)
            .field("durable_size", &self.durable_size)
            .finish()
    }
}

fn page_start(index: u64) -> u64 {
    index.saturating_mul(PAGE_BYTES)
}

/// The first page at or after byte `offset`.
fn page_ceiling(offset: u64) -> u64 {
    offset.div_ceil(PAGE_BYTES)
}

fn to_usize(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

impl Overlay {
    /// A clean overlay over `backing`; `file` names it in the ledger.
    pub fn open(file: u64, backing: &dyn Backing) -> io::Result<Overlay> {
        let durable_size = backing.length()?;
        Ok(Overlay {
            file,
            pages: BTreeMap::new(),
            size: durable_size,
            durable_size,
            zeroed: RangeSet::default(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn dirty_bytes(&self) -> u64 {
        (self.pages.len() as u64).saturating_mul(PAGE_BYTES)
    }

    /// Whether the backing file holds everything (nothing for a sync to write).
    pub fn is_clean(&self) -> bool {
        self.pages.is_empty() && self.zeroed.is_empty() && self.size == self.durable_size
    }

    /// Reads up to `len` bytes at `offset`, short at the end of the file.
    pub fn read(&self, backing: &dyn Backing, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        if offset >= self.size {
            return Ok(Vec::new());
        }
        let end = offset.saturating_add(len).min(self.size);
        let mut buffer = vec![0; to_usize(end - offset)];
        self.read_clean(backing, offset, &mut buffer)?;
        let first = offset / PAGE_BYTES;
        let last = page_ceiling(end);
        for (&index, page) in self.pages.range(first..last) {
            let start = page_start(index).max(offset);
            let stop = page_start(index).saturating_add(PAGE_BYTES).min(end);
            let from = to_usize(start - page_start(index));
            let count = to_usize(stop - start);
            let to = to_usize(start - offset);
            buffer[to..to + count].copy_from_slice(&page.bytes[from..from + count]);
        }
        Ok(buffer)
    }

    /// Fills `buffer` with what the file holds at `offset` without the dirty pages: the backing
    /// file, zeros past its end and in the zeroed ranges.
    fn read_clean(&self, backing: &dyn Backing, offset: u64, buffer: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buffer.len() {
            match backing.read_at(&mut buffer[done..], offset + done as u64) {
                Ok(0) => {
                    buffer[done..].fill(0);
                    break;
                }
                Ok(count) => done += count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        let end = offset + buffer.len() as u64;
        for (start, stop) in self.zeroed.overlapping(offset, end) {
            let from = to_usize(start.max(offset) - offset);
            let to = to_usize(stop.min(end) - offset);
            buffer[from..to].fill(0);
        }
        Ok(())
    }

    /// Writes `data` at `offset` into dirty pages, growing the file if it ends past the size.
    pub fn write(
        &mut self,
        backing: &dyn Backing,
        ledger: &mut Ledger,
        offset: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        if data.is_empty() {
            return Ok(());
        }
        for index in offset / PAGE_BYTES..page_ceiling(end) {
            let start = page_start(index);
            let from = start.max(offset);
            let stop = start.saturating_add(PAGE_BYTES).min(end);
            let page = self.dirty_page(backing, ledger, index)?;
            let into = to_usize(from - start);
            let source = to_usize(from - offset);
            let count = to_usize(stop - from);
            page[into..into + count].copy_from_slice(&data[source..source + count]);
        }
        self.size = self.size.max(end);
        Ok(())
    }

    /// The bytes of page `index`, made dirty (read from the clean content) if it was not.
    fn dirty_page(
        &mut self,
        backing: &dyn Backing,
        ledger: &mut Ledger,
        index: u64,
    ) -> io::Result<&mut [u8]> {
        if !self.pages.contains_key(&index) {
            let mut bytes = vec![0; PAGE_SIZE].into_boxed_slice();
            let start = page_start(index);
            if start < self.size {
                let valid = to_usize((self.size - start).min(PAGE_BYTES));
                self.read_clean(backing, start, &mut bytes[..valid])?;
            }
            let sequence = ledger.dirtied(PageId {
                file: self.file,
                index,
            });
            self.pages.insert(index, Page { sequence, bytes });
        }
        match self.pages.get_mut(&index) {
            Some(page) => Ok(&mut page.bytes),
            None => unreachable!("page {index} was just inserted"),
        }
    }

    /// Sets the size: a shrink drops the pages past it and hides the backing data past it
    /// until the next sync; growth reads as zeros.
    pub fn set_size(&mut self, ledger: &mut Ledger, size: u64) {
        if size < self.size {
            let dropped: Vec<u64> = self
                .pages
                .range(page_ceiling(size)..)
                .map(|(&index, _)| index)
                .collect();
            for index in dropped {
                self.drop_page(ledger, index);
            }
            let tail = size % PAGE_BYTES;
            if let Some(page) = self.pages.get_mut(&(size / PAGE_BYTES)) {
                page.bytes[to_usize(tail)..].fill(0);
            }
            self.zeroed.insert(size, u64::MAX);
        }
        self.size = size;
    }

    /// Makes `[offset, offset + len)` read as zeros (a punched hole or a zeroed range); the
    /// size does not change.
    pub fn zero_range(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        if offset >= end {
            return;
        }
        for (&index, page) in self.pages.range_mut(offset / PAGE_BYTES..page_ceiling(end)) {
            let start = page_start(index);
            let from = to_usize(offset.max(start) - start);
            let to = to_usize(end.min(start.saturating_add(PAGE_BYTES)) - start);
            page.bytes[from..to].fill(0);
        }
        self.zeroed.insert(offset, end);
    }

    /// Writes the overlay to the backing file and syncs it: after this, a power loss keeps
    /// everything this file held. On an error the overlay stays as it was (a retry redoes it).
    pub fn sync(
        &mut self,
        backing: &dyn Backing,
        ledger: &mut Ledger,
        data_only: bool,
    ) -> io::Result<()> {
        let mut backing_len = backing.length()?;
        if self.size < backing_len {
            backing.set_len(self.size)?;
            backing_len = self.size;
        }
        for (start, end) in self.zeroed.iter() {
            let end = end.min(backing_len);
            if start < end {
                backing.punch_hole(start, end - start)?;
            }
        }
        for (&index, page) in &self.pages {
            let start = page_start(index);
            if start < self.size {
                let valid = to_usize((self.size - start).min(PAGE_BYTES));
                backing.write_all_at(&page.bytes[..valid], start)?;
            }
        }
        if backing.length()? != self.size {
            backing.set_len(self.size)?;
        }
        backing.sync(data_only)?;
        for page in std::mem::take(&mut self.pages).into_values() {
            ledger.cleaned(page.sequence);
        }
        self.zeroed.clear();
        self.durable_size = self.size;
        Ok(())
    }

    /// Writes one dirty page to the backing file without syncing it (writeback under memory
    /// pressure): the page is clean afterwards and survives a power loss.
    pub fn write_back_page(
        &mut self,
        backing: &dyn Backing,
        ledger: &mut Ledger,
        index: u64,
    ) -> io::Result<u64> {
        let Some(page) = self.pages.get(&index) else {
            return Ok(0);
        };
        let start = page_start(index);
        let mut written = 0;
        if start < self.size {
            let valid = (self.size - start).min(PAGE_BYTES);
            backing.write_all_at(&page.bytes[..to_usize(valid)], start)?;
            written = valid;
            // Only what was written stops reading as zeros: the rest of the page (past the
            // size) may hide stale backing data a later growth must not show.
            self.zeroed.remove(start, start + valid);
            self.durable_size = self.durable_size.max(start + valid);
        }
        self.drop_page(ledger, index);
        Ok(written)
    }

    /// Forgets everything not yet synced or written back, as a power loss does; returns the
    /// dirty bytes dropped. The size becomes the backing file's length again.
    pub fn power_loss(&mut self, backing: &dyn Backing, ledger: &mut Ledger) -> io::Result<u64> {
        let lost = self.dirty_bytes();
        for page in std::mem::take(&mut self.pages).into_values() {
            ledger.cleaned(page.sequence);
        }
        self.zeroed.clear();
        self.durable_size = backing.length()?;
        self.size = self.durable_size;
        Ok(lost)
    }

    /// Drops the overlay without writing it (the file is gone).
    pub fn discard(&mut self, ledger: &mut Ledger) {
        for page in std::mem::take(&mut self.pages).into_values() {
            ledger.cleaned(page.sequence);
        }
        self.zeroed.clear();
    }

    fn drop_page(&mut self, ledger: &mut Ledger, index: u64) {
        if let Some(page) = self.pages.remove(&index) {
            ledger.cleaned(page.sequence);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A backing file in memory that counts its syncs.
    #[derive(Default)]
    struct Memory {
        bytes: RefCell<Vec<u8>>,
        syncs: RefCell<u32>,
    }

    impl Memory {
        fn with(bytes: &[u8]) -> Memory {
            Memory {
                bytes: RefCell::new(bytes.to_vec()),
                syncs: RefCell::new(0),
            }
        }

        fn content(&self) -> Vec<u8> {
            self.bytes.borrow().clone()
        }
    }

    impl Backing for Memory {
        fn read_at(&self, buffer: &mut [u8], offset: u64) -> io::Result<usize> {
            let bytes = self.bytes.borrow();
            let start = to_usize(offset).min(bytes.len());
            let count = buffer.len().min(bytes.len() - start);
            buffer[..count].copy_from_slice(&bytes[start..start + count]);
            Ok(count)
        }

        fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
            let mut bytes = self.bytes.borrow_mut();
            let start = to_usize(offset);
            if bytes.len() < start + data.len() {
                bytes.resize(start + data.len(), 0);
            }
            bytes[start..start + data.len()].copy_from_slice(data);
            Ok(())
        }

        fn length(&self) -> io::Result<u64> {
            Ok(self.bytes.borrow().len() as u64)
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            self.bytes.borrow_mut().resize(to_usize(len), 0);
            Ok(())
        }

        fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
            let mut bytes = self.bytes.borrow_mut();
            let end = to_usize(offset + len).min(bytes.len());
            bytes[to_usize(offset)..end].fill(0);
            Ok(())
        }

        fn sync(&self, _data_only: bool) -> io::Result<()> {
            *self.syncs.borrow_mut() += 1;
            Ok(())
        }
    }

    fn read_all(overlay: &Overlay, backing: &Memory) -> Vec<u8> {
        overlay.read(backing, 0, u64::MAX).expect("read")
    }

    #[test]
    fn a_partial_write_reads_back_over_the_backing_data_and_leaves_it_alone() {
        let backing = Memory::with(&[1; 10_000]);
        let mut ledger = Ledger::default();
        let mut overlay = Overlay::open(7, &backing).expect("open");
        overlay
            .write(&backing, &mut ledger, 4090, &[2; 10])
            .expect("write");
        let mut expected = vec![1; 10_000];
        expected[4090..4100].fill(2);
        assert_eq!(read_all(&overlay, &backing), expected);
        assert_eq!(backing.content(), vec![1; 10_000]);
        // The write straddles two pages; both are dirty, oldest first.
        assert_eq!(ledger.dirty_bytes(), 2 * PAGE_BYTES);
        assert_eq!(ledger.oldest(), Some(PageId { file: 7, index: 0 }));
        assert_eq!(overlay.read(&backing, 4095, 3).expect("read"), [2, 2, 2]);
        assert_eq!(overlay.read(&backing, 9_999, 5).expect("read"), [1]);
        assert!(overlay.read(&backing, 10_000, 5).expect("read").is_empty());
    }

    #[test]
    fn power_loss_drops_unsynced_writes_and_size_but_keeps_synced_ones() {
        let backing = Memory::with(&[1; 4096]);
        let mut ledger = Ledger::default();
        let mut overlay = Overlay::open(1, &backing).expect("open");
        overlay
            .write(&backing, &mut ledger, 0, &[2; 100])
            .expect("write");
        overlay.sync(&backing, &mut ledger, true).expect("sync");
        assert_eq!(*backing.syncs.borrow(), 1);
        overlay
            .write(&backing, &mut ledger, 100, &[3; 8000])
            .expect("write");
        assert_eq!(overlay.size(), 8100);
        let lost = overlay
            .power_loss(&backing, &mut ledger)
            .expect("power loss");
        assert_eq!(lost, 2 * PAGE_BYTES);
        assert_eq!(ledger.dirty_bytes(), 0);
        let mut expected = vec![1; 4096];
        expected[..100].fill(2);
        assert_eq!(overlay.size(), 4096);
        assert_eq!(read_all(&overlay, &backing), expected);
    }

    #[test]
    fn a_shrink_then_growth_reads_zeros_until_synced_and_is_undone_by_power_loss() {
        let backing = Memory::with(&[5; 9000]);
        let mut ledger = Ledger::default();
        let mut overlay = Overlay::open(1, &backing).expect("open");
        overlay.set_size(&mut ledger, 100);
        overlay.set_size(&mut ledger, 9000);
        let mut expected = vec![0; 9000];
        expected[..100].fill(5);
        assert_eq!(read_all(&overlay, &backing), expected);
        overlay
            .power_loss(&backing, &mut ledger)
            .expect("power loss");
        assert_eq!(read_all(&overlay, &backing), vec![5; 9000]);

        overlay.set_size(&mut ledger, 100);
        overlay.set_size(&mut ledger, 200);
        overlay.sync(&backing, &mut ledger, false).expect("sync");
        let mut expected = vec![0; 200];
        expected[..100].fill(5);
        assert_eq!(backing.content(), expected);
        assert_eq!(read_all(&overlay, &backing), expected);
    }

    #[test]
    fn a_dirty_page_cut_by_a_shrink_reads_zeros_past_the_cut_after_growth() {
        let backing = Memory::with(&[]);
        let mut ledger = Ledger::default();
        let mut overlay = Overlay::open(1, &backing).expect("open");
        overlay
            .write(&backing, &mut ledger, 0, &[9; 4096])
            .expect("write");
        overlay.set_size(&mut ledger, 10);
        overlay.set_size(&mut ledger, 4096);
        let mut expected = vec![0; 4096];
        expected[..10].fill(9);
        assert_eq!(read_all(&overlay, &backing), expected);
        overlay.sync(&backing, &mut ledger, true).expect("sync");
        assert_eq!(backing.content(), expected);
    }

    #[test]
    fn a_punched_range_reads_zeros_over_clean_and_dirty_pages_and_syncs_as_a_hole() {
        let backing = Memory::with(&[1; 3 * 4096]);
        let mut ledger = Ledger::default();
        let mut overlay = Overlay::open(1, &backing).expect("open");
        overlay
            .write(&backing, &mut ledger, 8192, &[2; 4096])
            .expect("write");
        overlay.zero_range(100, 10_000);
        let mut expected = vec![1; 3 * 4096];
        expected[8192..].fill(2);
        expected[100..10_100].fill(0);
        assert_eq!(read_all(&overlay, &backing), expected);
        // A write into the hole is seen over it.
        overlay
            .write(&backing, &mut ledger, 200, &[3; 2])
            .expect("write");
        expected[200..202].fill(3);
        assert_eq!(read_all(&overlay, &backing), expected);
        overlay.sync(&backing, &mut ledger, true).expect("sync");
        assert_eq!(backing.content(), expected);
        assert_eq!(read_all(&overlay, &backing), expected);
    }

    #[test]
    fn written_back_pages_survive_power_loss_and_stop_reading_as_zeros() {
        let backing = Memory::with(&[1; 8192]);
        let mut ledger = Ledger::default();
        let mut overlay = Overlay::open(1, &backing).expect("open");
        overlay.zero_range(0, 8192);
        overlay
            .write(&backing, &mut ledger, 0, &[4; 10])
            .expect("write");
        overlay
            .write(&backing, &mut ledger, 4096, &[5; 10])
            .expect("write");
        let oldest = ledger.oldest().expect("a dirty page");
        assert_eq!(oldest.index, 0);
        let written = overlay
            .write_back_page(&backing, &mut ledger, oldest.index)
            .expect("write back");
        assert_eq!(written, PAGE_BYTES);
        assert_eq!(ledger.dirty_bytes(), PAGE_BYTES);
        let mut page = vec![0; 4096];
        page[..10].fill(4);
        assert_eq!(overlay.read(&backing, 0, 4096).expect("read"), page);
        overlay
            .power_loss(&backing, &mut ledger)
            .expect("power loss");
        let mut expected = vec![1; 8192];
        expected[..4096].copy_from_slice(&page);
        assert_eq!(read_all(&overlay, &backing), expected);
    }

    #[test]
    fn growth_by_a_write_past_the_end_syncs_the_new_size() {
        let backing = Memory::with(&[]);
        let mut ledger = Ledger::default();
        let mut overlay = Overlay::open(1, &backing).expect("open");
        overlay
            .write(&backing, &mut ledger, 1 << 30, &[8; 3])
            .expect("write");
        assert_eq!(overlay.size(), (1 << 30) + 3);
        assert_eq!(overlay.read(&backing, 5, 2).expect("read"), [0, 0]);
        assert_eq!(ledger.dirty_bytes(), PAGE_BYTES);
        let error = overlay
            .write(&backing, &mut ledger, u64::MAX - 1, &[1; 4])
            .expect_err("past the largest offset");
        assert_eq!(error.raw_os_error(), Some(libc::EFBIG));
        overlay.discard(&mut ledger);
        assert_eq!(ledger.dirty_bytes(), 0);
    }
}
