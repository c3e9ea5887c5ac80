//! A small seeded generator (SplitMix64): every random choice of a torture run comes from
//! its seed, so `FTVM_TORTURE_SEED` replays the same plan and the same fault timing.

/// SplitMix64 (Steele, Lea, Flood 2014): 64 bits of state, good enough for test choices.
#[derive(Debug, Clone)]
pub struct Random {
    state: u64,
}

impl Random {
    pub fn new(seed: u64) -> Random {
        Random { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `low..=high` (`low` if the range is empty).
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        match (high.checked_sub(low)).and_then(|span| span.checked_add(1)) {
            Some(count) => low + self.next_u64() % count,
            None => low,
        }
    }

    /// A fraction in `[0, 1)`.
    pub fn fraction(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A fresh seed: the clock and the process id, for runs not asked to replay one.
pub fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as u64)
        .unwrap_or(0);
    let mut mixer = Random::new(nanos ^ (u64::from(std::process::id()) << 32));
    mixer.next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_choices_within_bounds() {
        let mut first = Random::new(42);
        let mut second = Random::new(42);
        for _ in 0..1000 {
            let value = first.between(10, 20);
            assert_eq!(value, second.between(10, 20));
            assert!((10..=20).contains(&value));
        }
        assert_eq!(Random::new(7).between(5, 5), 5);
        assert_eq!(Random::new(7).between(9, 3), 9);
        assert!((0.0..1.0).contains(&Random::new(3).fraction()));
    }
}
