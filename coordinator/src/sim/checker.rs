//! The simulator's safety checkers, run after every event that could break them:
//! 1. at most one host acknowledges writes at any generation;
//! 2. a host that acknowledges a write serves a copy holding every write acknowledged
//!    before it, by either host;
//! 3. a copy that the witness grants a generation, or that is promoted or continues
//!    degraded, holds every acknowledged write.
//!
//! "Every acknowledged write" excludes only writes that were legitimately lost: acknowledged
//! but not yet flushed on any copy when the hosts holding them lost power (a disk with a
//! volatile write cache promises no more). A write that a copy lost while another copy
//! still held it stays required: a copy that lacks it must not count as complete.

use std::collections::{BTreeMap, BTreeSet};

use crate::{Generation, HostId, Millis};

/// What the checkers know: every acknowledged write and who acknowledged at which
/// generation.
#[derive(Debug, Default)]
pub(super) struct Checker {
    /// Acknowledged writes that must never be missing from a copy that serves.
    required: BTreeSet<u64>,
    acknowledged: usize,
    /// Acknowledged writes lost with every copy that held them (power loss, unflushed).
    legitimately_lost: usize,
    acknowledgers: BTreeMap<Generation, HostId>,
    /// Who acknowledged last: while it stays the same host at the same generation and no
    /// copy lost anything, the copy it serves only grows and holds what it acknowledged,
    /// so the full check is only needed when this changes.
    last_acknowledger: Option<(HostId, Generation)>,
}

impl Checker {
    /// `host` acknowledges `write` at `generation`, serving the copy `serving`.
    pub(super) fn acknowledge(
        &mut self,
        now: Millis,
        host: HostId,
        generation: Generation,
        write: u64,
        serving: &BTreeSet<u64>,
    ) -> Result<(), String> {
        if self.last_acknowledger != Some((host, generation)) {
            self.last_acknowledger = Some((host, generation));
            if let Some(missing) = self.missing_from(serving) {
                return Err(format!(
                    "t={now} ms: {host:?} acknowledges write {write} at generation \
                     {generation} but its copy lacks acknowledged write {missing}"
                ));
            }
        }
        let first = *self.acknowledgers.entry(generation).or_insert(host);
        if first != host {
            return Err(format!(
                "t={now} ms: two hosts ({first:?} and {host:?}) acknowledge writes at \
                 generation {generation}"
            ));
        }
        if !serving.contains(&write) {
            return Err(format!(
                "t={now} ms: {host:?} acknowledges write {write} that its copy lacks"
            ));
        }
        self.required.insert(write);
        self.acknowledged += 1;
        Ok(())
    }

    /// A copy is chosen to serve alone (`what`: granted, promoted, continues degraded):
    /// it must hold every acknowledged write.
    pub(super) fn chosen(
        &self,
        now: Millis,
        host: HostId,
        what: &str,
        copy: &BTreeSet<u64>,
    ) -> Result<(), String> {
        match self.missing_from(copy) {
            Some(missing) => Err(format!(
                "t={now} ms: {host:?}'s copy is {what} but lacks acknowledged write {missing}"
            )),
            None => Ok(()),
        }
    }

    /// Some copy changed other than by growing (power loss, resync, rebuild, failure):
    /// the next acknowledgement is checked in full.
    pub(super) fn invalidate(&mut self) {
        self.last_acknowledger = None;
    }

    /// After a power loss: acknowledged writes that no copy holds any more were lost
    /// unflushed on every copy, which a volatile write cache allows.
    pub(super) fn power_lost(&mut self, copies: [&BTreeSet<u64>; 2]) {
        let before = self.required.len();
        self.required
            .retain(|write| copies.iter().any(|copy| copy.contains(write)));
        self.legitimately_lost += before - self.required.len();
        self.invalidate();
    }

    pub(super) fn acknowledged(&self) -> usize {
        self.acknowledged
    }

    pub(super) fn legitimately_lost(&self) -> usize {
        self.legitimately_lost
    }

    fn missing_from(&self, copy: &BTreeSet<u64>) -> Option<u64> {
        self.required
            .iter()
            .find(|write| !copy.contains(write))
            .copied()
    }
}
