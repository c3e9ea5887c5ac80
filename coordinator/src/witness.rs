//! The witness: grants each generation of a VM to at most one host.
//!
//! DESIGN.md has the witness grant `g+1` to whoever asks first. That leaves a hole: if the
//! primary wins `g+1` and continues alone, acknowledging writes the secondary never sees,
//! and then dies, the secondary could win `g+2` and promote a copy that lacks those writes.
//! So a claim also states the claimant's **data generation** — the latest generation whose
//! writes its disk holds completely — and the witness grants `current + 1` only to a host
//! whose data generation is `current`: a host that missed a whole generation is outdated
//! and is refused until it has resynced (DRBD's "outdated" peer, decided by the witness).

use serde::{Deserialize, Serialize};

use crate::{Generation, HostId};

/// A host's request for the next generation. `H` names hosts: [`HostId`] in the
/// simulation, host names in the daemons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim<H = HostId> {
    pub host: H,
    /// The generation asked for: the current one plus one.
    pub generation: Generation,
    /// The latest generation whose writes the claimant's disk holds completely.
    pub data_generation: Generation,
}

/// The witness's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict<H = HostId> {
    Granted { generation: Generation },
    Refused { current: Generation, holder: H },
}

/// What the witness keeps on disk for one VM (written and synced before any answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant<H = HostId> {
    pub generation: Generation,
    pub holder: H,
}

/// The witness's decision for one VM; the caller persists `grant()` before replying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Witness<H = HostId> {
    grant: Grant<H>,
}

impl<H: Clone + PartialEq> Witness<H> {
    /// A VM first protected with `holder` as primary at `generation`.
    pub fn new(grant: Grant<H>) -> Witness<H> {
        Witness { grant }
    }

    pub fn grant(&self) -> &Grant<H> {
        &self.grant
    }

    /// Decides a claim. A repeated claim by the holder of the current grant is granted
    /// again (its first answer may have been lost), but only while its copy still holds the
    /// generation before (as its first claim did) or the current one: a holder whose copy
    /// has since failed (data generation 0) is not handed the grant again.
    pub fn decide(&mut self, claim: Claim<H>) -> Verdict<H> {
        let current = self.grant.clone();
        let repeat = claim.generation == current.generation
            && claim.host == current.holder
            && (claim.data_generation == current.generation
                || claim.data_generation.checked_add(1) == Some(current.generation));
        let next = claim.generation == current.generation + 1
            && claim.data_generation == current.generation;
        if next {
            self.grant = Grant {
                generation: claim.generation,
                holder: claim.host.clone(),
            };
        }
        if next || repeat {
            Verdict::Granted {
                generation: claim.generation,
            }
        } else {
            Verdict::Refused {
                current: current.generation,
                holder: current.holder,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(host: HostId, generation: Generation, data_generation: Generation) -> Claim {
        Claim {
            host,
            generation,
            data_generation,
        }
    }

    #[test]
    fn each_generation_goes_to_one_host() {
        let mut witness = Witness::new(Grant {
            generation: 1,
            holder: HostId::A,
        });
        assert_eq!(
            witness.decide(claim(HostId::B, 2, 1)),
            Verdict::Granted { generation: 2 }
        );
        assert_eq!(
            witness.decide(claim(HostId::A, 2, 1)),
            Verdict::Refused {
                current: 2,
                holder: HostId::B
            }
        );
        // The winner asking again (its answer was lost) gets the same answer.
        assert_eq!(
            witness.decide(claim(HostId::B, 2, 1)),
            Verdict::Granted { generation: 2 }
        );
        // But not once its copy failed (an Inconsistent copy claims data generation 0).
        assert!(matches!(
            witness.decide(claim(HostId::B, 2, 0)),
            Verdict::Refused { .. }
        ));
    }

    #[test]
    fn an_outdated_host_is_refused() {
        let mut witness = Witness::new(Grant {
            generation: 1,
            holder: HostId::A,
        });
        assert!(matches!(
            witness.decide(claim(HostId::A, 2, 1)),
            Verdict::Granted { .. }
        ));
        // B holds generation 1's data only: it missed what A acknowledged at 2.
        assert!(matches!(
            witness.decide(claim(HostId::B, 3, 1)),
            Verdict::Refused { .. }
        ));
        // Once resynced to generation 2, B may take over.
        assert!(matches!(
            witness.decide(claim(HostId::B, 3, 2)),
            Verdict::Granted { .. }
        ));
    }
}
