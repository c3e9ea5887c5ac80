//! Deterministic simulation of two hosts and a witness running the quorum protocol, with a
//! model of the mirrored disk, under seeded partitions (of the heartbeats, of the disk
//! replication path, or of both, and of each host's path to the witness), message loss and
//! reordering, process kills and power losses of any of the three, disk failures and their
//! repair, and clock skew.
//!
//! Each host runs the real [`Host`] state machine, driven the way `ftvmd` drives it: the
//! glue turns its commands into orders for the disk daemon, repeats a granted generation
//! the disk has not adopted, and asks the witness when the disk holds for a whole peer
//! timeout while the peer's heartbeats arrive. The disk daemons are a model
//! ([`disk`]) of `vhost-blk-mirror`'s rules, over copies that fail writes and lose
//! unflushed data on a power loss. After every event the checkers ([`checker`]) verify:
//! 1. at most one host acknowledges writes for the VM at any generation;
//! 2. a host that acknowledges a write serves a copy holding every write acknowledged
//!    before it, by either host;
//! 3. a copy that is granted a generation, promoted or continues degraded holds every
//!    acknowledged write.
//!
//! A failure names its seed; `FTVM_SIM_SEED=<seed> cargo test -p coordinator --test
//! simulation` replays it (`FTVM_SIM_TRACE=1` prints every decision).

mod checker;
mod disk;

use std::collections::BTreeMap;

use crate::host::{Action, DiskCommand, Heartbeat, Host, HostConfig, Mode, Role};
use crate::witness::{Claim, Grant, Verdict, Witness};
use crate::{Generation, HostId, Millis};
use checker::Checker;
pub use disk::Rules;
use disk::{Disk, Replication};

/// A small, fast, seedable generator (xorshift64*), so runs are reproducible everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[low, high]`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.next_u64() % 1000 < per_mille
    }
}

#[derive(Debug)]
enum Event {
    Heartbeat {
        to: HostId,
        heartbeat: Heartbeat,
    },
    ClaimArrives(Claim),
    Verdict {
        to: HostId,
        verdict: Verdict,
    },
    /// Planned failover: the primary handed over; the peer should take over.
    TakeOver {
        to: HostId,
    },
}

/// What the simulated world may do, per mille per 10 ms step.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    /// A path changes (cut or restored): the A-links (heartbeats and replication), the
    /// heartbeats alone, the replication alone, or one host's path to the witness.
    pub partition_change: u64,
    /// A process kill of a host's daemons (the page cache survives), or of the witness.
    pub crash: u64,
    /// A power loss of a host: unflushed writes on its copy are gone.
    pub power_loss: u64,
    pub restart: u64,
    pub message_loss: u64,
    pub max_delay_ms: u64,
    /// An operator's planned failover (`ftvm failover`) on the primary.
    pub handover: u64,
    /// `ftvmd` fencing a primary that holds with neither peer nor witness reachable.
    pub isolation_fence: u64,
    /// A host's disk starts failing every write and flush.
    pub disk_failure: u64,
    /// The operator repairs a failed disk (or a copy that lost writes) and sends `repair`.
    pub repair: u64,
    /// The guest flushes.
    pub flush: u64,
    /// The primary tries its periodic clear of activity extents.
    pub activity_clear: u64,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            partition_change: 8,
            crash: 2,
            power_loss: 1,
            restart: 30,
            message_loss: 50,
            max_delay_ms: 60,
            handover: 1,
            isolation_fence: 20,
            disk_failure: 1,
            repair: 10,
            flush: 100,
            activity_clear: 50,
        }
    }
}

/// Statistics of a run, to show the faults were exercised.
#[derive(Clone, Copy, Debug, Default)]
pub struct Outcome {
    pub acknowledged_writes: usize,
    pub highest_generation: Generation,
    pub promotions: usize,
    pub degraded_continuations: usize,
    pub fences: usize,
    pub handovers: usize,
    pub power_losses: usize,
    /// Blocks a power loss took from a copy's page cache.
    pub unflushed_blocks_lost: usize,
    /// Acknowledged writes lost with every copy that held them (allowed: never flushed).
    pub acknowledged_writes_lost_unflushed: usize,
    pub disk_failures: usize,
    pub repairs: usize,
    /// Local copies rebuilt from the peer after `repair`.
    pub rebuilds: usize,
    pub delta_resyncs: usize,
    pub full_resyncs: usize,
    /// Claims made because the disk held while the peer's heartbeats arrived.
    pub disk_lost_peer: usize,
}

const STEP_MS: Millis = 10;
const HOSTS: [HostId; 2] = [HostId::A, HostId::B];

/// The world: two hosts, a witness, the network between them.
pub struct World {
    rng: Rng,
    faults: Faults,
    rules: Rules,
    now: Millis,
    hosts: BTreeMap<HostId, Option<Host>>,
    disks: BTreeMap<HostId, Disk>,
    witness: Witness,
    witness_up: bool,
    /// Which paths are cut: heartbeats A-B, disk replication A-B, each host to the witness.
    cut_heartbeats: bool,
    cut_replication: bool,
    cut_witness: BTreeMap<HostId, bool>,
    /// Per host (see [`slot`]): clock rate in per mille and offset.
    skew: [(u64, u64); 2],
    in_flight: Vec<(Millis, Event)>,
    /// In-order replication sessions, per direction (to, messages).
    channels: BTreeMap<HostId, Vec<Replication>>,
    /// `ftvmd`: since when (host clock) the disk holds while the state machine mirrors.
    disk_holding_since: [Option<Millis>; 2],
    next_write: u64,
    checker: Checker,
    outcome: Outcome,
    /// Print every decision (set `FTVM_SIM_TRACE=1` when replaying a seed).
    trace: bool,
}

impl World {
    pub fn new(seed: u64, faults: Faults) -> World {
        World::with_rules(seed, faults, Rules::default())
    }

    /// A world whose disk daemons follow `rules` (old, broken rules to test the checkers).
    pub fn with_rules(seed: u64, faults: Faults, rules: Rules) -> World {
        let mut rng = Rng::new(seed);
        let config = HostConfig::default();
        let mut hosts = BTreeMap::new();
        let mut disks = BTreeMap::new();
        let mut skew = [(1000, 0); 2];
        for id in HOSTS {
            let role = if id == HostId::A {
                Role::Primary
            } else {
                Role::Secondary
            };
            // Clock rate in per mille (±5%) and offset: timeouts differ between hosts.
            skew[slot(id)] = (rng.between(950, 1050), rng.between(0, 5000));
            let mut host = Host::start(id, config, role, 1, 0);
            if role == Role::Primary {
                // Protection starts mirrored with an UpToDate peer.
                host.on_heartbeat(
                    0,
                    Heartbeat {
                        from: HostId::B,
                        role: Role::Secondary,
                        generation: 1,
                    },
                );
            }
            hosts.insert(id, Some(host));
            disks.insert(id, Disk::new(role));
        }
        World {
            rng,
            faults,
            rules,
            now: 0,
            hosts,
            disks,
            witness: Witness::new(Grant {
                generation: 1,
                holder: HostId::A,
            }),
            witness_up: true,
            cut_heartbeats: false,
            cut_replication: false,
            cut_witness: HOSTS.iter().map(|id| (*id, false)).collect(),
            skew,
            in_flight: Vec::new(),
            channels: HOSTS.iter().map(|id| (*id, Vec::new())).collect(),
            disk_holding_since: [None; 2],
            next_write: 1,
            checker: Checker::default(),
            outcome: Outcome::default(),
            trace: std::env::var_os("FTVM_SIM_TRACE").is_some(),
        }
    }

    fn local_time(&self, id: HostId) -> Millis {
        let (rate, offset) = self.skew[slot(id)];
        self.now * rate / 1000 + offset
    }

    /// Runs `duration_ms` of simulated time; `Err` describes the first violation.
    pub fn run(&mut self, duration_ms: Millis) -> Result<Outcome, String> {
        while self.now < duration_ms {
            self.now += STEP_MS;
            self.inject_faults()?;
            self.deliver_due()?;
            for id in HOSTS {
                self.tick_host(id)?;
                self.reconcile(id)?;
            }
            self.guest()?;
            for id in HOSTS {
                if self.hosts[&id].is_some() {
                    self.watch_link(id);
                }
            }
            self.replicate()?;
        }
        self.outcome.acknowledged_writes = self.checker.acknowledged();
        self.outcome.acknowledged_writes_lost_unflushed = self.checker.legitimately_lost();
        self.outcome.highest_generation = self.witness.grant().generation;
        Ok(self.outcome)
    }

    fn inject_faults(&mut self) -> Result<(), String> {
        if self.rng.chance(self.faults.partition_change) {
            match self.rng.between(0, 4) {
                0 => {
                    let cut = !(self.cut_heartbeats && self.cut_replication);
                    self.cut_heartbeats = cut;
                    self.cut_replication = cut;
                }
                1 => self.cut_heartbeats = !self.cut_heartbeats,
                2 => self.cut_replication = !self.cut_replication,
                3 => toggle(&mut self.cut_witness, HostId::A),
                _ => toggle(&mut self.cut_witness, HostId::B),
            }
            if self.trace {
                eprintln!(
                    "t={} links: heartbeats cut {}, replication cut {}, witness cut {:?}",
                    self.now, self.cut_heartbeats, self.cut_replication, self.cut_witness
                );
            }
        }
        for id in HOSTS {
            let up = self.hosts[&id].is_some();
            if self.rng.chance(self.faults.power_loss) {
                self.crash(id, true);
            } else if up && self.rng.chance(self.faults.crash) {
                self.crash(id, false);
            } else if !up && self.rng.chance(self.faults.restart) {
                self.restart(id);
            }
            self.disk_faults(id);
        }
        if self.witness_up && self.rng.chance(self.faults.crash) {
            self.witness_up = false;
        } else if !self.witness_up && self.rng.chance(self.faults.restart) {
            self.witness_up = true;
        }
        for id in HOSTS {
            self.operator_and_isolation(id)?;
        }
        Ok(())
    }

    /// A disk starts failing; the operator repairs one (and sends `repair`).
    fn disk_faults(&mut self, id: HostId) {
        let fails = self.rng.chance(self.faults.disk_failure);
        let repairs = self.rng.chance(self.faults.repair) && self.hosts[&id].is_some();
        let disk = self.disk(id);
        if fails && !disk.copy.broken {
            disk.copy.broken = true;
            self.outcome.disk_failures += 1;
            if self.trace {
                eprintln!("t={} {id:?}: disk fails", self.now);
            }
        } else if repairs && disk.needs_repair() {
            disk.repair();
            self.outcome.repairs += 1;
            if self.trace {
                eprintln!("t={} {id:?}: repair", self.now);
            }
            self.rebuild(id);
        }
    }

    /// Planned handovers, and the daemon's fencing of an isolated primary.
    fn operator_and_isolation(&mut self, id: HostId) -> Result<(), String> {
        let time = self.local_time(id);
        let handover = self.rng.chance(self.faults.handover);
        let isolated = (self.cut_heartbeats || self.hosts[&id.peer()].is_none())
            && (self.cut_witness[&id] || !self.witness_up)
            && self.rng.chance(self.faults.isolation_fence);
        let Some(Some(host)) = self.hosts.get_mut(&id) else {
            return Ok(());
        };
        let mut actions = Vec::new();
        let mut take_over = false;
        if handover && host.role() == Role::Primary && host.mode() == Mode::Mirrored {
            // Half of them live (`ftvm migrate`: the VM and its disks kept until the peer
            // takes over), half with the VM stopped and the disks fenced (`ftvm failover`).
            actions = if self.rng.chance(500) {
                host.hand_over_live(time)
            } else {
                host.hand_over(time)
            };
            take_over = true;
        } else if isolated {
            actions = host.fence_isolated();
        }
        if take_over {
            self.outcome.handovers += 1;
            if self.trace {
                eprintln!("t={} {id:?}: planned handover", self.now);
            }
        }
        self.act(id, actions)?;
        if take_over {
            let reachable = !self.cut_heartbeats;
            self.send(Event::TakeOver { to: id.peer() }, reachable);
        }
        Ok(())
    }

    /// A process kill (`power_lost` false: the page cache survives) or a power loss of a
    /// host (also when its daemons are already down).
    fn crash(&mut self, id: HostId, power_lost: bool) {
        if self.trace {
            let what = if power_lost { "power loss" } else { "crash" };
            eprintln!("t={} {id:?}: {what}", self.now);
        }
        let rules = self.rules;
        let was_up = self.hosts.insert(id, None).flatten().is_some();
        self.disk_holding_since[slot(id)] = None;
        // Both directions of the disks' session are gone.
        self.channels.insert(id, Vec::new());
        self.channels.insert(id.peer(), Vec::new());
        if was_up {
            self.disk(id).stop();
            self.disk(id.peer()).stop_session();
        }
        if power_lost {
            self.outcome.power_losses += 1;
            self.outcome.unflushed_blocks_lost += self.disk(id).lose_power(rules);
            let copies = [
                &self.disks[&HostId::A].copy.store,
                &self.disks[&HostId::B].copy.store,
            ];
            self.checker.power_lost(copies);
        }
    }

    fn restart(&mut self, id: HostId) {
        if self.trace {
            eprintln!("t={} {id:?}: restart", self.now);
        }
        let now = self.local_time(id);
        let disk = self.disk(id);
        disk.start();
        let (role, generation) = (disk.role, disk.generation);
        self.checker.invalidate();
        let host = Host::start(id, HostConfig::default(), role, generation, now);
        self.hosts.insert(id, Some(host));
    }

    fn send(&mut self, event: Event, reachable: bool) {
        if !reachable || self.rng.chance(self.faults.message_loss) {
            return;
        }
        let at = self.now + self.rng.between(1, self.faults.max_delay_ms);
        self.in_flight.push((at, event));
    }

    fn deliver_due(&mut self) -> Result<(), String> {
        let now = self.now;
        if !self.in_flight.iter().any(|(at, _)| *at <= now) {
            return Ok(());
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.in_flight = later;
        for (_, event) in due {
            match event {
                Event::Heartbeat { to, heartbeat } => {
                    let time = self.local_time(to);
                    let actions = match self.hosts.get_mut(&to) {
                        Some(Some(host)) => host.on_heartbeat(time, heartbeat),
                        _ => continue,
                    };
                    self.act(to, actions)?;
                }
                Event::ClaimArrives(claim) => self.decide(claim)?,
                Event::TakeOver { to } => {
                    let time = self.local_time(to);
                    let view = self.disks[&to].view();
                    let actions = match self.hosts.get_mut(&to) {
                        Some(Some(host)) => host.take_over(time, view),
                        _ => continue,
                    };
                    self.act(to, actions)?;
                }
                Event::Verdict { to, verdict } => {
                    let actions = match self.hosts.get_mut(&to) {
                        Some(Some(host)) => host.on_verdict(verdict),
                        _ => continue,
                    };
                    self.act(to, actions)?;
                }
            }
        }
        Ok(())
    }

    /// The witness decides a claim (durably, before the answer leaves).
    fn decide(&mut self, claim: Claim) -> Result<(), String> {
        if !self.witness_up {
            return Ok(());
        }
        let before = *self.witness.grant();
        let verdict = self.witness.decide(claim);
        if self.trace {
            eprintln!("t={} witness: {claim:?} -> {verdict:?}", self.now);
        }
        // A copy granted a generation, still as its claim described it (the claimant may
        // have gone down since, or lost power: then it is Inconsistent and can use the
        // grant for nothing), holds every acknowledged write.
        let view = self.disks[&claim.host].view();
        let as_claimed = self.hosts[&claim.host].is_some()
            && view.consistent
            && view.data_generation == claim.data_generation;
        if *self.witness.grant() != before && as_claimed {
            let copy = &self.disks[&claim.host].copy.store;
            self.checker.chosen(self.now, claim.host, "granted", copy)?;
        }
        let reachable = !self.cut_witness[&claim.host];
        self.send(
            Event::Verdict {
                to: claim.host,
                verdict,
            },
            reachable,
        );
        Ok(())
    }

    fn tick_host(&mut self, id: HostId) -> Result<(), String> {
        let time = self.local_time(id);
        let view = self.disks[&id].view();
        let actions = match self.hosts.get_mut(&id) {
            Some(Some(host)) => host.tick(time, view),
            _ => return Ok(()),
        };
        self.act(id, actions)
    }

    /// `ftvmd`'s reconciliation on a primary: a granted generation the disk has not
    /// adopted is ordered again (`continue-degraded GEN`), and a disk that holds for a
    /// whole peer timeout while the state machine mirrors (at once while it runs
    /// degraded) counts as a lost peer.
    fn reconcile(&mut self, id: HostId) -> Result<(), String> {
        let time = self.local_time(id);
        let Some(Some(host)) = self.hosts.get(&id) else {
            return Ok(());
        };
        let (role, mode, generation) = (host.role(), host.mode(), host.generation());
        let disk = &self.disks[&id];
        if role != Role::Primary || disk.role != Role::Primary {
            self.disk_holding_since[slot(id)] = None;
            return Ok(());
        }
        if disk.generation < generation && disk.mode != Mode::Fenced {
            self.continue_degraded(id, generation)?;
        }
        let holding = self.disks[&id].holding();
        if !(matches!(mode, Mode::Mirrored | Mode::Degraded) && holding) {
            self.disk_holding_since[slot(id)] = None;
            return Ok(());
        }
        let peer_timeout = HostConfig::default().peer_timeout;
        let since = *self.disk_holding_since[slot(id)].get_or_insert(time);
        if mode == Mode::Degraded || time.saturating_sub(since) > peer_timeout {
            self.disk_holding_since[slot(id)] = None;
            if self.trace {
                eprintln!("t={} {id:?}: the disk lost the peer", self.now);
            }
            self.outcome.disk_lost_peer += 1;
            let actions = match self.hosts.get_mut(&id) {
                Some(Some(host)) => host.on_disk_lost_peer(),
                _ => Vec::new(),
            };
            self.act(id, actions)?;
        }
        Ok(())
    }

    fn act(&mut self, id: HostId, actions: Vec<Action>) -> Result<(), String> {
        for action in actions {
            match action {
                Action::SendHeartbeat(heartbeat) => {
                    let reachable = !self.cut_heartbeats;
                    self.send(
                        Event::Heartbeat {
                            to: id.peer(),
                            heartbeat,
                        },
                        reachable,
                    );
                }
                Action::AskWitness(claim) => {
                    let reachable = !self.cut_witness[&id];
                    self.send(Event::ClaimArrives(claim), reachable);
                }
                Action::Disk(command) => self.command(id, command)?,
            }
        }
        Ok(())
    }

    /// What `ftvmd` does with the state machine's disk commands: `Hold` and `Resume` are
    /// the disk's own business (it holds on its own when its link is lost; a generation
    /// it lacks is ordered by [`World::reconcile`]), the others are orders.
    fn command(&mut self, id: HostId, command: DiskCommand) -> Result<(), String> {
        if self.trace {
            eprintln!("t={} {id:?}: {command:?}", self.now);
        }
        match command {
            DiskCommand::Hold | DiskCommand::Resume { .. } => Ok(()),
            DiskCommand::ContinueDegraded { generation } => self.continue_degraded(id, generation),
            DiskCommand::Fence => {
                self.fence(id);
                Ok(())
            }
            DiskCommand::Promote { generation } => self.promote(id, generation),
            DiskCommand::Demote { .. } => {
                self.demote(id);
                Ok(())
            }
        }
    }

    /// The guest writes and flushes wherever a host runs it as primary (even,
    /// adversarially, on both); the primary clears its activity extents now and then.
    fn guest(&mut self) -> Result<(), String> {
        let write = self.rng.chance(400);
        let flush = self.rng.chance(self.faults.flush);
        let clear = self.rng.chance(self.faults.activity_clear);
        for id in HOSTS {
            if self.hosts[&id].is_none() || self.disks[&id].role != Role::Primary {
                continue;
            }
            if write {
                let block = self.next_write;
                self.next_write += 1;
                self.guest_write(id, block)?;
            }
            if flush {
                self.guest_flush(id);
            }
            if clear {
                self.clear_activity(id);
            }
        }
        Ok(())
    }
}

/// A host's index in the per-host arrays.
fn slot(id: HostId) -> usize {
    match id {
        HostId::A => 0,
        HostId::B => 1,
    }
}

fn toggle(map: &mut BTreeMap<HostId, bool>, id: HostId) {
    if let Some(cut) = map.get_mut(&id) {
        *cut = !*cut;
    }
}
