//! A set of half-open byte ranges `[start, end)`, kept merged: the parts of a file that read
//! as zeros until the next sync (punched, zeroed or cut off by a truncate).

use std::collections::BTreeMap;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeSet {
    /// Start to end; ranges never overlap or touch.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    /// Adds `[start, end)`, merging it with the ranges it overlaps or touches.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut start = start;
        let mut end = end;
        // A range that begins before `start` and reaches it merges from the left.
        if let Some((&left_start, &left_end)) = self.ranges.range(..=start).next_back() {
            if left_end >= start {
                start = left_start;
                end = end.max(left_end);
            }
        }
        let absorbed: Vec<(u64, u64)> = self
            .ranges
            .range(start..=end)
            .map(|(&range_start, &range_end)| (range_start, range_end))
            .collect();
        for (range_start, range_end) in absorbed {
            self.ranges.remove(&range_start);
            end = end.max(range_end);
        }
        self.ranges.insert(start, end);
    }

    /// Removes `[start, end)`, splitting the ranges it cuts.
    pub fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        for (range_start, range_end) in self.overlapping(start, end) {
            self.ranges.remove(&range_start);
            if range_start < start {
                self.ranges.insert(range_start, start);
            }
            if range_end > end {
                self.ranges.insert(end, range_end);
            }
        }
    }

    /// The stored ranges that overlap `[start, end)`, whole (not clipped).
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut found = Vec::new();
        if start >= end {
            return found;
        }
        if let Some((&range_start, &range_end)) = self.ranges.range(..start).next_back() {
            if range_end > start {
                found.push((range_start, range_end));
            }
        }
        found.extend(
            self.ranges
                .range(start..end)
                .map(|(&range_start, &range_end)| (range_start, range_end)),
        );
        found
    }

    /// Every range, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges
            .iter()
            .map(|(&range_start, &range_end)| (range_start, range_end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(set: &RangeSet) -> Vec<(u64, u64)> {
        set.iter().collect()
    }

    #[test]
    fn touching_and_overlapping_ranges_merge() {
        let mut set = RangeSet::default();
        set.insert(10, 20);
        set.insert(30, 40);
        set.insert(20, 25);
        assert_eq!(ranges(&set), [(10, 25), (30, 40)]);
        set.insert(5, 35);
        assert_eq!(ranges(&set), [(5, 40)]);
        set.insert(7, 8);
        set.insert(50, 50);
        assert_eq!(ranges(&set), [(5, 40)]);
    }

    #[test]
    fn removing_splits_and_trims() {
        let mut set = RangeSet::default();
        set.insert(0, 100);
        set.insert(200, u64::MAX);
        set.remove(10, 20);
        set.remove(90, 210);
        assert_eq!(ranges(&set), [(0, 10), (20, 90), (210, u64::MAX)]);
        assert_eq!(set.overlapping(5, 25), [(0, 10), (20, 90)]);
        assert_eq!(set.overlapping(10, 20), []);
        set.remove(0, u64::MAX);
        assert!(set.is_empty());
    }
}
