//! A host's coordinator for one VM: watches the peer (heartbeats over the A-links), asks the
//! witness for the next generation when the peer is lost, and tells the disk daemons what
//! to do (`continue-degraded`, `fence`, `promote`, `demote`).
//!
//! Rules (DESIGN.md "Failover and quorum", with the witness's data-generation check):
//! - The primary asks the witness at once when the peer is lost; the secondary waits
//!   `secondary_claim_delay` first, so the running side wins ties.
//! - Granted: the primary continues degraded at the new generation, the secondary promotes.
//!   Refused: the primary fences; the secondary stays.
//! - Until granted, a primary that lost its peer acknowledges nothing (its disk holds).
//! - A host that hears a primary with a higher generation than its own becomes its
//!   secondary (a resync follows).
//! - A host whose copy is not consistent (a secondary's Inconsistent copy, a primary's
//!   failed local copy) never claims.

use serde::{Deserialize, Serialize};

use crate::witness::{Claim, Verdict};
use crate::{Generation, HostId, Millis};

/// Timings, in milliseconds of the host's own clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostConfig {
    pub heartbeat_interval: Millis,
    /// The peer is lost when nothing was heard from it for this long.
    pub peer_timeout: Millis,
    /// Extra wait of a secondary before it claims (the running primary wins ties).
    pub secondary_claim_delay: Millis,
    /// Interval between repeated claims while no verdict arrived.
    pub claim_retry: Millis,
}

impl Default for HostConfig {
    fn default() -> HostConfig {
        HostConfig {
            heartbeat_interval: 100,
            peer_timeout: 1000,
            secondary_claim_delay: 500,
            claim_retry: 200,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Secondary,
}

/// What the primary's disk does with writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Writes complete when both copies have them.
    Mirrored,
    /// Peer lost: completions held until the witness decides.
    Holding,
    /// Running alone at a generation the witness granted.
    Degraded,
    /// Refused by the witness: nothing completes.
    Fenced,
}

/// What the disk reports about its copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskView {
    /// UpToDate (not Inconsistent).
    pub consistent: bool,
    /// The latest generation whose writes this copy holds completely.
    pub data_generation: Generation,
}

/// Heartbeat between the hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub from: HostId,
    pub role: Role,
    pub generation: Generation,
}

/// Commands for this host's disk daemons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskCommand {
    /// Hold completions (the peer is lost).
    Hold,
    /// The peer is back before any verdict: mirror again (at `generation`).
    Resume {
        generation: Generation,
    },
    ContinueDegraded {
        generation: Generation,
    },
    Fence,
    Promote {
        generation: Generation,
    },
    /// Become the secondary of a primary at `generation`.
    Demote {
        generation: Generation,
    },
}

/// What the coordinator wants done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    SendHeartbeat(Heartbeat),
    AskWitness(Claim),
    Disk(DiskCommand),
}

/// The coordinator of one VM on one host.
#[derive(Clone, Debug)]
pub struct Host {
    id: HostId,
    config: HostConfig,
    role: Role,
    generation: Generation,
    mode: Mode,
    last_heard: Millis,
    last_heartbeat_sent: Option<Millis>,
    last_claim: Option<Millis>,
    /// A planned handover runs until then: the fenced primary does not resume before.
    handover_until: Option<Millis>,
    /// The disks lost the peer although its heartbeats still arrive (its disk daemon or
    /// the replication path failed): claim without waiting for silence.
    disk_lost_peer: bool,
}

impl Host {
    /// A host (re)starting at `now` with its durable role and generation. It knows nothing
    /// of its peer yet: a primary holds until it hears the peer or wins a claim.
    pub fn start(
        id: HostId,
        config: HostConfig,
        role: Role,
        generation: Generation,
        now: Millis,
    ) -> Host {
        Host {
            id,
            config,
            role,
            generation,
            mode: match role {
                Role::Primary => Mode::Holding,
                Role::Secondary => Mode::Mirrored,
            },
            last_heard: now,
            last_heartbeat_sent: None,
            last_claim: None,
            handover_until: None,
            disk_lost_peer: false,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn generation(&self) -> Generation {
        self.generation
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Time passes: heartbeats, peer-loss detection, claims.
    pub fn tick(&mut self, now: Millis, disk: DiskView) -> Vec<Action> {
        let mut actions = Vec::new();
        let due = self
            .last_heartbeat_sent
            .is_none_or(|sent| now.saturating_sub(sent) >= self.config.heartbeat_interval);
        if due {
            self.last_heartbeat_sent = Some(now);
            actions.push(Action::SendHeartbeat(Heartbeat {
                from: self.id,
                role: self.role,
                generation: self.generation,
            }));
        }
        let silent = now.saturating_sub(self.last_heard);
        if self.role == Role::Primary
            && self.mode == Mode::Mirrored
            && silent > self.config.peer_timeout
        {
            self.mode = Mode::Holding;
            actions.push(Action::Disk(DiskCommand::Hold));
        }
        if self.wants_to_claim(silent, disk) && self.claim_due(now) {
            self.last_claim = Some(now);
            actions.push(Action::AskWitness(Claim {
                host: self.id,
                generation: self.generation + 1,
                data_generation: disk.data_generation,
            }));
        }
        actions
    }

    fn wants_to_claim(&self, silent: Millis, disk: DiskView) -> bool {
        match self.role {
            // A primary that lost its peer asks at once; one that just (re)started first
            // gives the peer a timeout's chance to be heard. One whose own copy failed
            // (RemoteOnly) has nothing to run alone on: it never claims (the witness would
            // grant its repeated claim for a generation it already holds).
            Role::Primary => {
                disk.consistent
                    && self.mode == Mode::Holding
                    && (silent > self.config.peer_timeout || self.disk_lost_peer)
            }
            Role::Secondary => {
                disk.consistent
                    && silent > self.config.peer_timeout + self.config.secondary_claim_delay
            }
        }
    }

    fn claim_due(&self, now: Millis) -> bool {
        self.last_claim
            .is_none_or(|sent| now.saturating_sub(sent) >= self.config.claim_retry)
    }

    /// Planned failover, on the primary: it stops acknowledging writes (the caller has
    /// stopped the VM and fenced its disks) and waits for the peer to take over; the peer's
    /// heartbeat at a newer generation then makes this host its secondary.
    pub fn hand_over(&mut self, now: Millis) -> Vec<Action> {
        if self.role != Role::Primary {
            return Vec::new();
        }
        self.handover_until =
            Some(now + 2 * self.config.peer_timeout + self.config.secondary_claim_delay);
        self.mode = Mode::Fenced;
        vec![Action::Disk(DiskCommand::Fence)]
    }

    /// Live handover (`ftvm migrate`), on the primary: the VM is stopped here at its final
    /// checkpoint but kept, and the disks stay as they are, so that the VM can go on here
    /// if the peer does not take over. Until the handover window ends the host holds as
    /// for a lost peer but does not resume when it hears its secondary; after it, a silent
    /// peer makes it claim the next generation (the witness decides between the two hosts,
    /// as after a crash), and a peer still heard as its secondary lets it resume.
    pub fn hand_over_live(&mut self, now: Millis) -> Vec<Action> {
        if self.role != Role::Primary || self.mode != Mode::Mirrored {
            return Vec::new();
        }
        self.handover_until =
            Some(now + 2 * self.config.peer_timeout + self.config.secondary_claim_delay);
        self.mode = Mode::Holding;
        vec![Action::Disk(DiskCommand::Hold)]
    }

    /// The disks have held writes for a whole peer timeout while the peer's heartbeats
    /// still arrive: the peer's disk side is gone. Ask the witness, as for a lost peer.
    ///
    /// Also for a primary running degraded: its disks may have re-mirrored the peer (which
    /// is then UpToDate at our generation and may claim the next one), so running alone
    /// again needs a new grant.
    pub fn on_disk_lost_peer(&mut self) -> Vec<Action> {
        if self.role != Role::Primary || !matches!(self.mode, Mode::Mirrored | Mode::Degraded) {
            return Vec::new();
        }
        self.mode = Mode::Holding;
        self.disk_lost_peer = true;
        vec![Action::Disk(DiskCommand::Hold)]
    }

    /// A primary holding with neither peer nor witness reachable: it stops for good (its
    /// VM is stopped) rather than hold for ever, since the peer may be taking over.
    pub fn fence_isolated(&mut self) -> Vec<Action> {
        if self.role != Role::Primary || self.mode != Mode::Holding {
            return Vec::new();
        }
        self.mode = Mode::Fenced;
        vec![Action::Disk(DiskCommand::Fence)]
    }

    /// Planned failover, on the secondary: claims the next generation now, without waiting
    /// for the peer to fall silent (the primary has handed over). The witness still decides.
    pub fn take_over(&mut self, now: Millis, disk: DiskView) -> Vec<Action> {
        if self.role != Role::Secondary || !disk.consistent {
            return Vec::new();
        }
        // The handover arrives once per A-link: one claim is enough.
        if !self.claim_due(now) {
            return Vec::new();
        }
        self.last_claim = Some(now);
        vec![Action::AskWitness(Claim {
            host: self.id,
            generation: self.generation + 1,
            data_generation: disk.data_generation,
        })]
    }

    /// The peer's heartbeat.
    pub fn on_heartbeat(&mut self, now: Millis, heartbeat: Heartbeat) -> Vec<Action> {
        if heartbeat.from == self.id {
            return Vec::new();
        }
        self.last_heard = now;
        let newer_primary =
            heartbeat.role == Role::Primary && heartbeat.generation > self.generation;
        if newer_primary {
            // Another host holds a later generation: follow it. A secondary only learns the
            // number (its disk learns the data from the primary's session); a primary steps
            // down, and its disk, which may hold writes the new primary never saw, becomes
            // its secondary.
            self.generation = heartbeat.generation;
            self.last_claim = None;
            if self.role == Role::Secondary {
                return Vec::new();
            }
            self.role = Role::Secondary;
            self.mode = Mode::Mirrored;
            self.disk_lost_peer = false;
            self.handover_until = None;
            return vec![Action::Disk(DiskCommand::Demote {
                generation: heartbeat.generation,
            })];
        }
        let handing_over = self.handover_until.is_some_and(|until| now < until);
        let resumable = match self.mode {
            Mode::Holding => !self.disk_lost_peer && !handing_over,
            // Running alone, and the peer is back as our secondary: mirrored again (its
            // disk reconnects and resyncs), so a later loss asks the witness again.
            Mode::Degraded => true,
            Mode::Fenced => !handing_over,
            Mode::Mirrored => false,
        };
        if self.role == Role::Primary
            && resumable
            && heartbeat.role == Role::Secondary
            && heartbeat.generation <= self.generation
        {
            // Our own secondary, at our generation or behind: nobody took over, so the
            // peer's disk still refuses nothing of ours. (A host that won a newer
            // generation says so in its heartbeat, handled above.)
            self.mode = Mode::Mirrored;
            self.last_claim = None;
            return vec![Action::Disk(DiskCommand::Resume {
                generation: self.generation,
            })];
        }
        Vec::new()
    }

    /// The witness's answer to a claim.
    pub fn on_verdict(&mut self, verdict: Verdict) -> Vec<Action> {
        match verdict {
            Verdict::Granted { generation } if generation == self.generation + 1 => {
                self.generation = generation;
                self.last_claim = None;
                self.disk_lost_peer = false;
                match (self.role, self.mode) {
                    (Role::Primary, Mode::Holding) => {
                        self.mode = Mode::Degraded;
                        vec![Action::Disk(DiskCommand::ContinueDegraded { generation })]
                    }
                    // The peer came back before the verdict: keep mirroring, at the new
                    // generation (the peer accepts a higher one).
                    (Role::Primary, _) => vec![Action::Disk(DiskCommand::Resume { generation })],
                    (Role::Secondary, _) => {
                        self.role = Role::Primary;
                        self.mode = Mode::Degraded;
                        vec![Action::Disk(DiskCommand::Promote { generation })]
                    }
                }
            }
            // A late answer to an older claim: nothing to do.
            Verdict::Granted { .. } => Vec::new(),
            Verdict::Refused { current, .. } => {
                // A secondary that missed a generation (the heartbeat announcing it was
                // lost) learns it here; its next claim is for the one after, which the
                // witness grants only if its disk holds everything of `current`.
                if self.role == Role::Secondary && current > self.generation {
                    self.generation = current;
                    self.last_claim = None;
                    return Vec::new();
                }
                if self.role == Role::Primary
                    && self.mode == Mode::Holding
                    && current > self.generation
                {
                    self.mode = Mode::Fenced;
                    self.disk_lost_peer = false;
                    return vec![Action::Disk(DiskCommand::Fence)];
                }
                Vec::new()
            }
        }
    }
}
