//! The driver side of a split virtqueue: writes descriptors, publishes the avail ring with release
//! ordering, decides whether to kick (VRING_USED_F_NO_NOTIFY or EVENT_IDX's avail_event), arms
//! interrupts (EVENT_IDX's used_event) and consumes the used ring.
//!
//! Everything the device writes (used index, ids, lengths) is checked before use.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use crate::memory::{GuestRam, MemoryError};

/// Descriptor continues via the `next` field.
pub const DESC_F_NEXT: u16 = 1;
/// Buffer is device write-only.
pub const DESC_F_WRITE: u16 = 2;
/// Buffer holds a table of indirect descriptors.
pub const DESC_F_INDIRECT: u16 = 4;
/// Device asks the driver not to kick (without EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = 1;
/// Size of one descriptor in the table.
pub const DESCRIPTOR_BYTES: u64 = 16;

/// Errors of the ring.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("queue size {0} is not a power of two in 1..=32768")]
    BadSize(u16),
    #[error("chain is empty")]
    EmptyChain,
    #[error("{needed} descriptors needed, {free} free")]
    Full { needed: usize, free: usize },
    #[error("descriptor position {position} is outside the chain of {len}")]
    BadPosition { position: u16, len: usize },
    #[error("device moved the used index from {last_used} to {used_index}, beyond the queue size")]
    BogusUsedIndex { last_used: u16, used_index: u16 },
    #[error("device returned id {id}, which is not an in-flight chain head")]
    UnknownUsedId { id: u32 },
    #[error("ring memory access failed")]
    Memory(#[from] MemoryError),
}

type Result<T> = std::result::Result<T, RingError>;

/// Where a descriptor's `next` field points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The next descriptor of this chain (no NEXT flag on the last one).
    Following,
    /// Descriptor number `n` of this same chain (loops, back references).
    Position(u16),
    /// A raw descriptor table index, which may be out of range.
    Index(u16),
    /// End of chain: no NEXT flag.
    End,
}

/// One descriptor as the caller describes it; the ring fills in the table index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest physical address of the buffer (any value: out-of-range addresses are allowed).
    pub address: u64,
    /// Buffer length in bytes.
    pub len: u32,
    /// Device write-only (VRING_DESC_F_WRITE).
    pub write_only: bool,
    /// The buffer is an indirect descriptor table (VRING_DESC_F_INDIRECT).
    pub indirect: bool,
    /// Extra flag bits ORed in (for malformed-chain tests).
    pub extra_flags: u16,
    /// Where `next` points.
    pub next: Next,
}

impl Descriptor {
    /// A device-readable buffer.
    pub fn readable(address: u64, len: u32) -> Self {
        Self {
            address,
            len,
            write_only: false,
            indirect: false,
            extra_flags: 0,
            next: Next::Following,
        }
    }

    /// A device-writable buffer.
    pub fn writable(address: u64, len: u32) -> Self {
        Self {
            write_only: true,
            ..Self::readable(address, len)
        }
    }

    /// A descriptor pointing at an indirect table of `count` descriptors.
    pub fn indirect_table(address: u64, count: u32) -> Self {
        Self {
            indirect: true,
            ..Self::readable(address, count * DESCRIPTOR_BYTES as u32)
        }
    }

    /// The same descriptor with `next` replaced.
    pub fn with_next(self, next: Next) -> Self {
        Self { next, ..self }
    }

    fn flags(&self, is_last: bool) -> u16 {
        let links = match self.next {
            Next::Following => !is_last,
            Next::Position(_) | Next::Index(_) => true,
            Next::End => false,
        };
        let mut flags = self.extra_flags;
        if links {
            flags |= DESC_F_NEXT;
        }
        if self.write_only {
            flags |= DESC_F_WRITE;
        }
        if self.indirect {
            flags |= DESC_F_INDIRECT;
        }
        flags
    }

    /// The 16 bytes of this descriptor with `next` already resolved to a table index.
    pub fn encode(&self, next_index: u16, is_last: bool) -> [u8; 16] {
        let mut bytes = [0; 16];
        bytes[0..8].copy_from_slice(&self.address.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.len.to_le_bytes());
        bytes[12..14].copy_from_slice(&self.flags(is_last).to_le_bytes());
        bytes[14..16].copy_from_slice(&next_index.to_le_bytes());
        bytes
    }
}

/// Encodes `chain` as an indirect table, where positions are table indexes.
pub fn encode_table(chain: &[Descriptor]) -> Vec<u8> {
    let mut table = Vec::with_capacity(chain.len() * DESCRIPTOR_BYTES as usize);
    for (position, descriptor) in chain.iter().enumerate() {
        let is_last = position + 1 == chain.len();
        let next = match descriptor.next {
            Next::Following if !is_last => position as u16 + 1,
            Next::Following | Next::End => 0,
            Next::Position(index) | Next::Index(index) => index,
        };
        table.extend_from_slice(&descriptor.encode(next, is_last));
    }
    table
}

/// Guest addresses of one split ring's three parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Number of descriptors.
    pub size: u16,
    /// Descriptor table (16-byte aligned).
    pub descriptors: u64,
    /// Available ring (2-byte aligned).
    pub avail: u64,
    /// Used ring (4-byte aligned; we page-align it).
    pub used: u64,
}

impl RingLayout {
    const PAGE: u64 = crate::memory::PAGE_SIZE;

    fn avail_offset(size: u16) -> u64 {
        DESCRIPTOR_BYTES * u64::from(size)
    }

    fn used_offset(size: u16) -> u64 {
        // flags, idx, ring[size], used_event
        (Self::avail_offset(size) + 6 + 2 * u64::from(size)).next_multiple_of(Self::PAGE)
    }

    /// Bytes the rings of a queue of `size` take, rounded up to whole pages.
    pub fn bytes_needed(size: u16) -> u64 {
        // flags, idx, ring[size], avail_event
        (Self::used_offset(size) + 6 + 8 * u64::from(size)).next_multiple_of(Self::PAGE)
    }

    /// The layout of a queue of `size` starting at the page-aligned guest address `base`.
    pub fn at(base: u64, size: u16) -> Self {
        Self {
            size,
            descriptors: base,
            avail: base + Self::avail_offset(size),
            used: base + Self::used_offset(size),
        }
    }

    fn avail_index(&self) -> u64 {
        self.avail + 2
    }

    fn avail_slot(&self, slot: u16) -> u64 {
        self.avail + 4 + 2 * u64::from(slot)
    }

    fn used_event(&self) -> u64 {
        self.avail_slot(self.size)
    }

    fn used_index(&self) -> u64 {
        self.used + 2
    }

    fn used_slot(&self, slot: u16) -> u64 {
        self.used + 4 + 8 * u64::from(slot)
    }

    fn avail_event(&self) -> u64 {
        self.used_slot(self.size)
    }
}

/// One entry taken from the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElement {
    /// Head index of the returned chain.
    pub head: u16,
    /// Bytes the device says it wrote.
    pub len: u32,
}

/// EVENT_IDX's test: was `event` passed when the index moved from `old` to `new`?
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The driver's view of one split ring.
#[derive(Debug)]
pub struct SplitRing {
    memory: Arc<GuestRam>,
    layout: RingLayout,
    event_idx: bool,
    free: Vec<u16>,
    chains: Vec<Option<Vec<u16>>>,
    next_avail: u16,
    kicked_avail: u16,
    last_used: u16,
}

impl SplitRing {
    /// Zeroes the rings at `layout` and makes every descriptor free.
    pub fn new(memory: Arc<GuestRam>, layout: RingLayout, event_idx: bool) -> Result<Self> {
        let size = layout.size;
        if size == 0 || !size.is_power_of_two() {
            return Err(RingError::BadSize(size));
        }
        let zeroes = vec![0; RingLayout::bytes_needed(size) as usize];
        memory.write(layout.descriptors, &zeroes)?;
        Ok(Self {
            memory,
            layout,
            event_idx,
            free: (0..size).rev().collect(),
            chains: vec![None; usize::from(size)],
            next_avail: 0,
            kicked_avail: 0,
            last_used: 0,
        })
    }

    /// Where the rings are.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Number of free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Writes `chain` into free descriptors and returns its head index (not yet published).
    pub fn add_chain(&mut self, chain: &[Descriptor]) -> Result<u16> {
        if chain.is_empty() {
            return Err(RingError::EmptyChain);
        }
        if chain.len() > self.free.len() {
            return Err(RingError::Full {
                needed: chain.len(),
                free: self.free.len(),
            });
        }
        let split = self.free.len() - chain.len();
        let mut indexes = self.free.split_off(split);
        indexes.reverse();
        if let Err(error) = self.write_chain(chain, &indexes) {
            self.free.extend(indexes);
            return Err(error);
        }
        let head = indexes[0];
        self.chains[usize::from(head)] = Some(indexes);
        Ok(head)
    }

    fn write_chain(&self, chain: &[Descriptor], indexes: &[u16]) -> Result<()> {
        for (position, descriptor) in chain.iter().enumerate() {
            let is_last = position + 1 == chain.len();
            let next = match descriptor.next {
                Next::Following if !is_last => indexes[position + 1],
                Next::Following | Next::End => 0,
                Next::Position(target) => {
                    *indexes
                        .get(usize::from(target))
                        .ok_or(RingError::BadPosition {
                            position: target,
                            len: chain.len(),
                        })?
                }
                Next::Index(index) => index,
            };
            let address = self.layout.descriptors + DESCRIPTOR_BYTES * u64::from(indexes[position]);
            self.memory
                .write(address, &descriptor.encode(next, is_last))?;
        }
        Ok(())
    }

    /// Puts `head` into the next avail slot without publishing the index.
    pub fn push_avail(&mut self, head: u16) -> Result<()> {
        let slot = self.next_avail % self.layout.size;
        self.memory
            .store(head, self.layout.avail_slot(slot), Ordering::Relaxed)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(())
    }

    /// Publishes every pushed entry: a release store of avail->idx, so the device sees the
    /// descriptors and ring entries written before it.
    pub fn publish(&mut self) -> Result<()> {
        self.memory.store(
            self.next_avail,
            self.layout.avail_index(),
            Ordering::Release,
        )?;
        Ok(())
    }

    /// Overwrites avail->idx with any value (malformed-ring tests); the ring's own bookkeeping
    /// follows it, so later pushes continue from there.
    pub fn set_avail_index(&mut self, index: u16) -> Result<()> {
        self.next_avail = index;
        self.publish()
    }

    /// Whether the device wants a kick for the entries published since the last call.
    pub fn needs_kick(&mut self) -> Result<bool> {
        // The avail index store must be visible before we read the device's suppression state.
        fence(Ordering::SeqCst);
        let old = self.kicked_avail;
        let new = self.next_avail;
        self.kicked_avail = new;
        if old == new {
            return Ok(false);
        }
        if self.event_idx {
            let event: u16 = self
                .memory
                .load(self.layout.avail_event(), Ordering::Acquire)?;
            return Ok(need_event(event, new, old));
        }
        let flags: u16 = self.memory.load(self.layout.used, Ordering::Acquire)?;
        Ok(flags & USED_F_NO_NOTIFY == 0)
    }

    /// Asks for an interrupt at the next used entry (writes used_event with EVENT_IDX) and
    /// returns whether entries are already waiting, in which case no interrupt may come.
    pub fn arm_interrupt(&mut self) -> Result<bool> {
        if self.event_idx {
            self.memory
                .store(self.last_used, self.layout.used_event(), Ordering::Relaxed)?;
        }
        fence(Ordering::SeqCst);
        self.has_used()
    }

    /// Whether the device has returned entries we have not taken.
    pub fn has_used(&self) -> Result<bool> {
        let used_index: u16 = self
            .memory
            .load(self.layout.used_index(), Ordering::Acquire)?;
        Ok(used_index != self.last_used)
    }

    /// Takes the next used entry, if any, and frees the descriptors of its chain.
    pub fn pop_used(&mut self) -> Result<Option<UsedElement>> {
        let used_index: u16 = self
            .memory
            .load(self.layout.used_index(), Ordering::Acquire)?;
        if used_index == self.last_used {
            return Ok(None);
        }
        if used_index.wrapping_sub(self.last_used) > self.layout.size {
            return Err(RingError::BogusUsedIndex {
                last_used: self.last_used,
                used_index,
            });
        }
        let slot = self.layout.used_slot(self.last_used % self.layout.size);
        let id: u32 = self.memory.load(slot, Ordering::Relaxed)?;
        let len: u32 = self.memory.load(slot + 4, Ordering::Relaxed)?;
        self.last_used = self.last_used.wrapping_add(1);
        let chain = usize::try_from(id)
            .ok()
            .and_then(|head| self.chains.get_mut(head))
            .and_then(Option::take)
            .ok_or(RingError::UnknownUsedId { id })?;
        self.free.extend(chain);
        Ok(Some(UsedElement {
            head: id as u16,
            len,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(size: u16, event_idx: bool) -> (Arc<GuestRam>, SplitRing) {
        let memory = Arc::new(GuestRam::new(0x10_0000, 64 * 4096).expect("ram"));
        let layout = RingLayout::at(0x10_0000, size);
        let ring = SplitRing::new(memory.clone(), layout, event_idx).expect("ring");
        (memory, ring)
    }

    fn device_returns(memory: &GuestRam, layout: RingLayout, used_index: u16, id: u32, len: u32) {
        let slot = layout.used_slot((used_index.wrapping_sub(1)) % layout.size);
        memory.store(id, slot, Ordering::Relaxed).expect("id");
        memory.store(len, slot + 4, Ordering::Relaxed).expect("len");
        memory
            .store(used_index, layout.used_index(), Ordering::Release)
            .expect("idx");
    }

    #[test]
    fn layout_is_aligned_and_disjoint() {
        let layout = RingLayout::at(0x1000, 128);
        assert_eq!(layout.avail, 0x1000 + 2048);
        assert_eq!(layout.used % 4096, 0);
        assert!(layout.used >= layout.avail + 6 + 256);
        assert!(0x1000 + RingLayout::bytes_needed(128) >= layout.used + 6 + 1024);
    }

    #[test]
    fn chain_is_linked_and_published() {
        let (memory, mut ring) = ring(8, false);
        let chain = [
            Descriptor::readable(0x2000, 16),
            Descriptor::writable(0x3000, 1),
        ];
        let head = ring.add_chain(&chain).expect("add");
        ring.push_avail(head).expect("push");
        ring.publish().expect("publish");
        let layout = ring.layout();
        let first = memory
            .read_vec(layout.descriptors + 16 * u64::from(head), 16)
            .expect("read");
        let flags = u16::from_le_bytes([first[12], first[13]]);
        let next = u16::from_le_bytes([first[14], first[15]]);
        assert_eq!(flags, DESC_F_NEXT);
        let second = memory
            .read_vec(layout.descriptors + 16 * u64::from(next), 16)
            .expect("read");
        assert_eq!(u16::from_le_bytes([second[12], second[13]]), DESC_F_WRITE);
        let avail_index: u16 = memory
            .load(layout.avail_index(), Ordering::Acquire)
            .expect("idx");
        assert_eq!(avail_index, 1);
        assert!(ring.needs_kick().expect("kick"));
        assert!(!ring.needs_kick().expect("no new entries"));
    }

    #[test]
    fn used_entries_free_descriptors_and_bad_ids_are_errors() {
        let (memory, mut ring) = ring(4, false);
        let head = ring
            .add_chain(&[Descriptor::readable(0, 1), Descriptor::writable(0, 1)])
            .expect("add");
        assert_eq!(ring.free_descriptors(), 2);
        device_returns(&memory, ring.layout(), 1, u32::from(head), 7);
        let used = ring.pop_used().expect("pop").expect("one entry");
        assert_eq!(used, UsedElement { head, len: 7 });
        assert_eq!(ring.free_descriptors(), 4);
        device_returns(&memory, ring.layout(), 2, 3, 0);
        assert!(matches!(
            ring.pop_used(),
            Err(RingError::UnknownUsedId { id: 3 })
        ));
        device_returns(&memory, ring.layout(), 40, 0, 0);
        assert!(matches!(
            ring.pop_used(),
            Err(RingError::BogusUsedIndex { .. })
        ));
    }

    #[test]
    fn full_ring_and_bad_positions_are_refused() {
        let (_memory, mut ring) = ring(2, false);
        let three = [Descriptor::readable(0, 1); 3];
        assert!(matches!(
            ring.add_chain(&three),
            Err(RingError::Full { needed: 3, free: 2 })
        ));
        let looped = [Descriptor::readable(0, 1).with_next(Next::Position(5))];
        assert!(matches!(
            ring.add_chain(&looped),
            Err(RingError::BadPosition { position: 5, .. })
        ));
        assert_eq!(ring.free_descriptors(), 2);
    }

    #[test]
    fn event_idx_kick_follows_avail_event() {
        let (memory, mut ring) = ring(8, true);
        let layout = ring.layout();
        memory
            .store(5_u16, layout.avail_event(), Ordering::Relaxed)
            .expect("event");
        for _ in 0..3 {
            let head = ring.add_chain(&[Descriptor::readable(0, 1)]).expect("add");
            ring.push_avail(head).expect("push");
        }
        ring.publish().expect("publish");
        assert!(!ring.needs_kick().expect("0..3 does not pass 5"));
        for _ in 0..3 {
            let head = ring.add_chain(&[Descriptor::readable(0, 1)]).expect("add");
            ring.push_avail(head).expect("push");
        }
        ring.publish().expect("publish");
        assert!(ring.needs_kick().expect("3..6 passes 5"));
        assert!(!ring.arm_interrupt().expect("nothing used"));
        let used_event: u16 = memory
            .load(layout.used_event(), Ordering::Relaxed)
            .expect("used_event");
        assert_eq!(used_event, 0);
    }

    #[test]
    fn need_event_wraps() {
        assert!(need_event(0xffff, 0, 0xfffe));
        assert!(!need_event(10, 5, 3));
        assert!(need_event(4, 5, 3));
    }

    #[test]
    fn indirect_table_encodes_positions() {
        let table = encode_table(&[
            Descriptor::readable(0x10, 16),
            Descriptor::writable(0x20, 1).with_next(Next::Position(0)),
        ]);
        assert_eq!(table.len(), 32);
        assert_eq!(u16::from_le_bytes([table[14], table[15]]), 1);
        assert_eq!(
            u16::from_le_bytes([table[28], table[29]]),
            DESC_F_NEXT | DESC_F_WRITE
        );
        assert_eq!(u16::from_le_bytes([table[30], table[31]]), 0);
    }
}
