//! A first-fit allocator of guest address ranges: request headers, data buffers, status bytes
//! and indirect tables of one queue live in that queue's arena.

/// Free ranges of `[start, end)`, kept sorted and coalesced.
#[derive(Debug)]
pub struct Arena {
    start: u64,
    end: u64,
    free: Vec<(u64, u64)>,
}

/// Allocations are rounded up to this many bytes.
const GRANULE: u64 = 16;

impl Arena {
    /// An arena managing guest addresses `start..start + len`.
    pub fn new(start: u64, len: u64) -> Self {
        let free = if len > 0 { vec![(start, len)] } else { vec![] };
        Self {
            start,
            end: start + len,
            free,
        }
    }

    /// Bytes not allocated.
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|(_, len)| len).sum()
    }

    /// Total bytes managed.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the arena manages no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// The size an allocation of `len` bytes really takes (pass it to [`Arena::free`]).
    pub fn rounded(len: u64) -> u64 {
        len.max(1).div_ceil(GRANULE) * GRANULE
    }

    /// Allocates `len` bytes aligned to `align` (a power of two); `None` when nothing fits.
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let len = Self::rounded(len);
        let align = align.max(1);
        for index in 0..self.free.len() {
            let (start, free_len) = self.free[index];
            let aligned = start.checked_add(align - 1)? & !(align - 1);
            let padding = aligned - start;
            if padding.checked_add(len)? > free_len {
                continue;
            }
            let tail_start = aligned + len;
            let tail_len = start + free_len - tail_start;
            self.free.remove(index);
            if tail_len > 0 {
                self.free.insert(index, (tail_start, tail_len));
            }
            if padding > 0 {
                self.free.insert(index, (start, padding));
            }
            return Some(aligned);
        }
        None
    }

    /// Returns a range given by [`Arena::alloc`] with the same `len`.
    pub fn free(&mut self, address: u64, len: u64) {
        let len = Self::rounded(len);
        debug_assert!(address >= self.start && address + len <= self.end);
        let index = self.free.partition_point(|(start, _)| *start < address);
        debug_assert!(index == 0 || self.free[index - 1].0 + self.free[index - 1].1 <= address);
        self.free.insert(index, (address, len));
        if index + 1 < self.free.len() && address + len == self.free[index + 1].0 {
            self.free[index].1 += self.free[index + 1].1;
            self.free.remove(index + 1);
        }
        if index > 0 && self.free[index - 1].0 + self.free[index - 1].1 == address {
            self.free[index - 1].1 += self.free[index].1;
            self.free.remove(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_respects_alignment_and_bounds() {
        let mut arena = Arena::new(0x1010, 0x3000);
        let first = arena.alloc(100, 4096).expect("first");
        assert_eq!(first, 0x2000);
        let second = arena.alloc(16, 16).expect("second");
        assert_eq!(second, 0x1010);
        assert!(arena.alloc(0x3000, 1).is_none());
    }

    #[test]
    fn free_coalesces_back_to_one_range() {
        let mut arena = Arena::new(0, 0x10000);
        let blocks: Vec<u64> = (0..8)
            .map(|_| arena.alloc(0x1000, 0x1000).expect("alloc"))
            .collect();
        for (number, block) in blocks.iter().enumerate() {
            if number % 2 == 0 {
                arena.free(*block, 0x1000);
            }
        }
        for (number, block) in blocks.iter().enumerate() {
            if number % 2 == 1 {
                arena.free(*block, 0x1000);
            }
        }
        assert_eq!(arena.free, vec![(0, 0x10000)]);
        assert_eq!(arena.free_bytes(), arena.len());
    }

    #[test]
    fn exhausted_arena_recovers_after_free() {
        let mut arena = Arena::new(0, 64);
        let a = arena.alloc(33, 1).expect("a");
        assert!(arena.alloc(32, 1).is_none());
        arena.free(a, 33);
        assert_eq!(arena.alloc(64, 1), Some(0));
    }
}
