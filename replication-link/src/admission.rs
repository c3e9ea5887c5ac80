//! Which unauthenticated connections a listener keeps (pure state; the listener does the I/O).
//!
//! At most `max_pending_handshakes` connections are in their handshake at once, and at most
//! `max_pending_handshakes_per_source` from one source (an IPv4 address, or an IPv6 /64: one
//! host usually owns a whole /64). A new connection over a limit is not refused: it closes
//! the **oldest** handshake of its own source (per-source limit) or of the source that holds
//! the most (global limit), preferring one that has not yet sent a whole valid `Hello` (a
//! real client sends it at once, in one write). A connection that sends slowly or not at all
//! therefore holds its slot only until newer connections need it, and never beyond
//! `handshake_timeout_ms`; to keep a real client out an attacker must open more new
//! connections than the limit during that client's handshake (a few milliseconds), each
//! sending a valid `Hello`, not merely keep many slow ones open.

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
    pending: BTreeMap<u64, Pending>,
}

#[derive(Debug)]
struct Pending {
    source: Source,
    /// A whole valid `Hello` arrived: closed only after every handshake of the same source
    /// that is still waiting for its `Hello`.
    hello_received: bool,
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
        let victim = if self.count(source) >= self.max_per_source {
            self.victim_of(source)
        } else if self.pending.len() >= self.max_total {
            self.largest_source()
                .and_then(|largest| self.victim_of(largest))
        } else {
            None
        };
        if let Some(victim) = victim {
            self.pending.remove(&victim);
        }
        let pending = Pending {
            source,
            hello_received: false,
        };
        self.pending.insert(id, pending);
        victim
    }

    /// Connection `id` sent a whole valid `Hello`.
    pub(crate) fn hello_received(&mut self, id: u64) {
        if let Some(pending) = self.pending.get_mut(&id) {
            pending.hello_received = true;
        }
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
            .filter(|pending| pending.source == source)
            .count()
    }

    /// The handshake of `source` to close: its oldest still waiting for a `Hello`, else its
    /// oldest.
    fn victim_of(&self, source: Source) -> Option<u64> {
        let mut own = self
            .pending
            .iter()
            .filter(|(_, pending)| pending.source == source);
        let oldest = own.clone().next().map(|(id, _)| *id);
        own.find(|(_, pending)| !pending.hello_received)
            .map(|(id, _)| *id)
            .or(oldest)
    }

    /// The source with the most handshakes; between equals, the one whose oldest is older.
    fn largest_source(&self) -> Option<Source> {
        let mut sources: HashMap<Source, (usize, u64)> = HashMap::new();
        for (id, pending) in &self.pending {
            let entry = sources.entry(pending.source).or_insert((0, *id));
            entry.0 += 1;
        }
        sources
            .into_iter()
            .max_by(|(_, (count_a, oldest_a)), (_, (count_b, oldest_b))| {
                count_a.cmp(count_b).then(oldest_b.cmp(oldest_a))
            })
            .map(|(source, _)| source)
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
    fn a_handshake_past_its_hello_gives_way_last() {
        let mut admission = Admission::new(32, 3);
        let source = v4(1);
        assert_eq!(admission.admit(1, source), None);
        admission.hello_received(1); // the real peer: the oldest, but past its hello
        assert_eq!(admission.admit(2, source), None);
        assert_eq!(admission.admit(3, source), None);
        assert_eq!(admission.admit(4, source), Some(2));
        assert_eq!(admission.admit(5, source), Some(3));
        for id in [4, 5] {
            admission.hello_received(id);
        }
        assert_eq!(admission.admit(6, source), Some(1), "then the oldest");
        // At the global limit too.
        let mut admission = Admission::new(2, 2);
        assert_eq!(admission.admit(1, source), None);
        admission.hello_received(1);
        assert_eq!(admission.admit(2, source), None);
        assert_eq!(admission.admit(3, v4(2)), Some(2));
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
