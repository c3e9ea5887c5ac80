//! Which unauthenticated connections a listener keeps (pure state; the listener does the I/O).
//!
//! At most `max_pending_handshakes` connections are in their handshake at once, and at most
//! `max_pending_handshakes_per_source` from one source (an IPv4 address, or an IPv6 /64: one
//! host usually owns a whole /64). A new connection over a limit is not refused: it closes
//! the **oldest** handshake of its own source (per-source limit) or of the source that holds
//! the most (global limit). A connection that sends slowly or not at all therefore holds its
//! slot only until newer connections need it, and never beyond `handshake_timeout_ms`; to
//! keep a real client out an attacker must open more new connections during that client's
//! handshake (a few milliseconds) than the limit, not merely keep many slow ones open.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

/// Where a connection comes from, for the per-source limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    V4(Ipv4Addr),
    /// The upper 64 bits of an IPv6 address.
    V6Prefix(u64),
}

impl Source {
    /// IPv4 (also when mapped into IPv6) by address, IPv6 by /64 prefix.
    pub(crate) fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(ip) => Source::V4(ip),
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(mapped) => Source::V4(mapped),
                None => Source::V6Prefix((ip.to_bits() >> 64) as u64),
            },
        }
    }
}

/// The handshakes in progress, by connection id (ids grow, so the smallest is the oldest).
#[derive(Debug)]
pub(crate) struct Admission {
    max_total: usize,
    max_per_source: usize,
    pending: BTreeMap<u64, Source>,
}

impl Admission {
    /// Limits below 1 are taken as 1.
    pub(crate) fn new(max_total: usize, max_per_source: usize) -> Admission {
        Admission {
            max_total: max_total.max(1),
            max_per_source: max_per_source.max(1),
            pending: BTreeMap::new(),
        }
    }

    /// Admits connection `id` (greater than every id before it) from `source`; returns the
    /// handshake to close to make room, which is no longer counted.
    pub(crate) fn admit(&mut self, id: u64, source: Source) -> Option<u64> {
        debug_assert!(
            self.pending.keys().all(|old| *old < id),
            "connection ids grow"
        );
        let own_oldest = self
            .pending
            .iter()
            .find(|(_, from)| **from == source)
            .map(|(old, _)| *old);
        let own_count = self.count(source);
        let victim = if own_count >= self.max_per_source {
            own_oldest
        } else if self.pending.len() >= self.max_total {
            self.oldest_of_largest_source()
        } else {
            None
        };
        if let Some(victim) = victim {
            self.pending.remove(&victim);
        }
        self.pending.insert(id, source);
        victim
    }

    /// Connection `id` left its handshake (done or failed); false if it was not counted
    /// (it was closed to make room, or had left already).
    pub(crate) fn finish(&mut self, id: u64) -> bool {
        self.pending.remove(&id).is_some()
    }

    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }

    pub(crate) fn count(&self, source: Source) -> usize {
        self.pending
            .values()
            .filter(|from| **from == source)
            .count()
    }

    /// The oldest handshake of the source with the most; between equals, the source whose
    /// oldest handshake is older.
    fn oldest_of_largest_source(&self) -> Option<u64> {
        let mut sources: HashMap<Source, (usize, u64)> = HashMap::new();
        for (id, source) in &self.pending {
            let entry = sources.entry(*source).or_insert((0, *id));
            entry.0 += 1;
        }
        sources
            .values()
            .max_by(|(count_a, oldest_a), (count_b, oldest_b)| {
                count_a.cmp(count_b).then(oldest_b.cmp(oldest_a))
            })
            .map(|(_, oldest)| *oldest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn v4(last: u8) -> Source {
        Source::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    #[test]
    fn a_source_over_its_limit_closes_its_own_oldest_handshake() {
        let mut admission = Admission::new(32, 3);
        let attacker = v4(66);
        let peer = v4(2);
        assert_eq!(admission.admit(1, peer), None);
        for id in 2..=4 {
            assert_eq!(admission.admit(id, attacker), None);
        }
        // The attacker's fourth and fifth connections push out its own oldest ones.
        assert_eq!(admission.admit(5, attacker), Some(2));
        assert_eq!(admission.admit(6, attacker), Some(3));
        assert_eq!(admission.count(attacker), 3);
        assert_eq!(
            admission.count(peer),
            1,
            "the peer's handshake is untouched"
        );
    }

    #[test]
    fn at_the_global_limit_the_largest_source_gives_way() {
        let mut admission = Admission::new(8, 8);
        // Two attackers fill every slot, 5 and 3.
        for id in 1..=5 {
            assert_eq!(admission.admit(id, v4(100)), None);
        }
        for id in 6..=8 {
            assert_eq!(admission.admit(id, v4(101)), None);
        }
        // The real peer gets in by closing the largest source's oldest handshake.
        assert_eq!(admission.admit(9, v4(2)), Some(1));
        assert_eq!(admission.len(), 8);
        // Equal counts: the source with the older handshake gives way.
        let mut admission = Admission::new(4, 4);
        for (id, source) in [(1, v4(7)), (2, v4(8)), (3, v4(8)), (4, v4(7))] {
            assert_eq!(admission.admit(id, source), None);
        }
        assert_eq!(admission.admit(5, v4(9)), Some(1));
    }

    #[test]
    fn a_real_peer_always_gets_a_slot_under_a_slow_flood() {
        // 64 slow connections spread over 8 addresses, the real peer on a ninth, and the
        // real peer from one of the flood's addresses: each gets in, pushing out a flooder.
        let mut admission = Admission::new(32, 8);
        let mut id = 0;
        for round in 0..8u8 {
            for source in 0..8u8 {
                id += 1;
                let _ = admission.admit(id, v4(100 + source));
                assert!(admission.len() <= 32, "round {round}");
            }
        }
        let mut peers = Vec::new();
        for peer in [v4(2), v4(100)] {
            id += 1;
            let victim = admission.admit(id, peer).expect("a flooder gives way");
            assert!(!peers.contains(&victim), "a peer gives way");
            peers.push(id);
        }
        for peer in peers {
            assert!(admission.finish(peer), "the peer's handshake is counted");
            assert!(!admission.finish(peer), "finishing twice counts once");
        }
    }

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_prefixes() {
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("address");
        assert_eq!(Source::of(mapped), v4(1));
        let a: IpAddr = "2001:db8:1:2::10".parse().expect("address");
        let b: IpAddr = "2001:db8:1:2:ffff::1".parse().expect("address");
        let c: IpAddr = "2001:db8:1:3::10".parse().expect("address");
        assert_eq!(Source::of(a), Source::of(b), "one /64");
        assert_ne!(Source::of(a), Source::of(c));
        assert_ne!(
            Source::of(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            Source::of(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
    }
}
