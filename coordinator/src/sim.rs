//! Deterministic simulation of two hosts and a witness running the quorum protocol, with a
//! model of the mirrored disk, under seeded partitions, message loss and reordering,
//! crashes and restarts of any of the three, and clock skew.
//!
//! After every event it checks the two safety properties of DESIGN.md:
//! 1. at most one host acknowledges writes for the VM at any generation;
//! 2. no acknowledged write is missing after a failover: a host that acknowledges a write
//!    holds every write acknowledged before it, by either host.
//!
//! A failure names its seed; `FTVM_SIM_SEED=<seed> cargo test -p coordinator simulation`
//! replays it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::host::{Action, DiskCommand, DiskView, Heartbeat, Host, HostConfig, Mode, Role};
use crate::witness::{Claim, Grant, Verdict, Witness};
use crate::{Generation, HostId, Millis};

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

/// What disks say to each other (carried in order, like the replication link's session).
#[derive(Clone, Debug)]
enum Replication {
    Write {
        id: u64,
        generation: Generation,
    },
    Ack {
        id: u64,
        generation: Generation,
    },
    /// A resync: the secondary takes the snapshot and is consistent at `generation`.
    Resync {
        generation: Generation,
        snapshot: BTreeSet<u64>,
    },
}

/// The durable part of a host's disk, and what its daemon does with writes.
#[derive(Clone, Debug)]
struct Disk {
    role: Role,
    generation: Generation,
    data_generation: Generation,
    consistent: bool,
    store: BTreeSet<u64>,
    /// Primary: writes on the local disk whose peer acknowledgement is awaited.
    pending: Vec<u64>,
    mode: Mode,
    /// Primary: the peer lacks writes acknowledged here alone (the out-of-sync bitmap is
    /// not empty): it must be resynced before it gets new writes. Durable.
    peer_outdated: bool,
}

impl Disk {
    fn view(&self) -> DiskView {
        DiskView {
            consistent: self.consistent,
            data_generation: self.data_generation,
        }
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
    pub partition_change: u64,
    pub crash: u64,
    pub restart: u64,
    pub message_loss: u64,
    pub max_delay_ms: u64,
    /// An operator's planned failover (`ftvm failover`) on the primary.
    pub handover: u64,
    /// `ftvmd` fencing a primary that holds with neither peer nor witness reachable.
    pub isolation_fence: u64,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            partition_change: 8,
            crash: 2,
            restart: 30,
            message_loss: 50,
            max_delay_ms: 60,
            handover: 1,
            isolation_fence: 20,
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
}

const STEP_MS: Millis = 10;
const HOSTS: [HostId; 2] = [HostId::A, HostId::B];

/// The world: two hosts, a witness, the network between them.
pub struct World {
    rng: Rng,
    faults: Faults,
    now: Millis,
    hosts: BTreeMap<HostId, Option<Host>>,
    disks: BTreeMap<HostId, Disk>,
    witness: Witness,
    witness_up: bool,
    /// Which of the three paths are cut: A-B, A-witness, B-witness.
    cut_peer: bool,
    cut_witness: BTreeMap<HostId, bool>,
    skew: BTreeMap<HostId, (u64, u64)>,
    in_flight: Vec<(Millis, Event)>,
    /// In-order replication channels, per direction (to, messages).
    channels: BTreeMap<HostId, VecDeque<Replication>>,
    next_write: u64,
    /// Every acknowledged write and who acknowledged it at which generation.
    acknowledged: BTreeSet<u64>,
    acknowledgers: BTreeMap<Generation, BTreeSet<HostId>>,
    /// Who acknowledged last: while it stays the same host at the same generation, its
    /// store only grows and holds what it acknowledged, so the full check is only needed
    /// when this changes.
    last_acknowledger: Option<(HostId, Generation)>,
    outcome: Outcome,
    /// Print every decision (set `FTVM_SIM_TRACE=1` when replaying a seed).
    trace: bool,
}

impl World {
    pub fn new(seed: u64, faults: Faults) -> World {
        let mut rng = Rng::new(seed);
        let config = HostConfig::default();
        let mut hosts = BTreeMap::new();
        let mut disks = BTreeMap::new();
        let mut skew = BTreeMap::new();
        for id in HOSTS {
            let role = if id == HostId::A {
                Role::Primary
            } else {
                Role::Secondary
            };
            // Clock rate in per mille (±5%) and offset: timeouts differ between hosts.
            skew.insert(id, (rng.between(950, 1050), rng.between(0, 5000)));
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
            disks.insert(
                id,
                Disk {
                    role,
                    generation: 1,
                    data_generation: 1,
                    consistent: true,
                    store: BTreeSet::new(),
                    pending: Vec::new(),
                    mode: Mode::Mirrored,
                    peer_outdated: false,
                },
            );
        }
        World {
            rng,
            faults,
            now: 0,
            hosts,
            disks,
            witness: Witness::new(Grant {
                generation: 1,
                holder: HostId::A,
            }),
            witness_up: true,
            cut_peer: false,
            cut_witness: HOSTS.iter().map(|id| (*id, false)).collect(),
            skew,
            in_flight: Vec::new(),
            channels: HOSTS.iter().map(|id| (*id, VecDeque::new())).collect(),
            next_write: 1,
            acknowledged: BTreeSet::new(),
            acknowledgers: BTreeMap::new(),
            last_acknowledger: None,
            outcome: Outcome::default(),
            trace: std::env::var_os("FTVM_SIM_TRACE").is_some(),
        }
    }

    fn local_time(&self, id: HostId) -> Millis {
        let (rate, offset) = self.skew[&id];
        self.now * rate / 1000 + offset
    }

    fn disk(&mut self, id: HostId) -> &mut Disk {
        self.disks.get_mut(&id).expect("both hosts have disks")
    }

    /// Runs `duration_ms` of simulated time; `Err` describes the first violation.
    pub fn run(&mut self, duration_ms: Millis) -> Result<Outcome, String> {
        while self.now < duration_ms {
            self.now += STEP_MS;
            self.inject_faults()?;
            self.deliver_due()?;
            for id in HOSTS {
                self.tick_host(id)?;
            }
            self.client_writes()?;
            self.replicate()?;
        }
        self.outcome.acknowledged_writes = self.acknowledged.len();
        self.outcome.highest_generation = self.witness.grant().generation;
        Ok(self.outcome)
    }

    fn inject_faults(&mut self) -> Result<(), String> {
        if self.rng.chance(self.faults.partition_change) {
            match self.rng.between(0, 2) {
                0 => self.cut_peer = !self.cut_peer,
                1 => toggle(&mut self.cut_witness, HostId::A),
                _ => toggle(&mut self.cut_witness, HostId::B),
            }
            if self.trace {
                eprintln!(
                    "t={} links: peer cut {}, witness cut {:?}",
                    self.now, self.cut_peer, self.cut_witness
                );
            }
        }
        for id in HOSTS {
            let up = self.hosts[&id].is_some();
            if up && self.rng.chance(self.faults.crash) {
                self.crash(id);
            } else if !up && self.rng.chance(self.faults.restart) {
                self.restart(id);
            }
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

    /// Planned handovers, and the daemon's fencing of an isolated primary.
    fn operator_and_isolation(&mut self, id: HostId) -> Result<(), String> {
        let time = self.local_time(id);
        let handover = self.rng.chance(self.faults.handover);
        let isolated = (self.cut_peer || self.hosts[&id.peer()].is_none())
            && (self.cut_witness[&id] || !self.witness_up)
            && self.rng.chance(self.faults.isolation_fence);
        let Some(Some(host)) = self.hosts.get_mut(&id) else {
            return Ok(());
        };
        let mut actions = Vec::new();
        let mut take_over = false;
        if handover && host.role() == Role::Primary && host.mode() == Mode::Mirrored {
            actions = host.hand_over(time);
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
            let reachable = !self.cut_peer;
            self.send(Event::TakeOver { to: id.peer() }, reachable);
        }
        Ok(())
    }

    fn crash(&mut self, id: HostId) {
        if self.trace {
            eprintln!("t={} {id:?}: crash", self.now);
        }
        self.hosts.insert(id, None);
        // Volatile state and both directions of its session are gone.
        self.channels.insert(id, VecDeque::new());
        self.channels.insert(id.peer(), VecDeque::new());
        let disk = self.disk(id);
        disk.pending.clear();
    }

    fn restart(&mut self, id: HostId) {
        if self.trace {
            eprintln!("t={} {id:?}: restart", self.now);
        }
        let now = self.local_time(id);
        let disk = self.disk(id);
        let (role, generation) = (disk.role, disk.generation);
        if role == Role::Primary {
            disk.mode = Mode::Holding;
        }
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
                Event::ClaimArrives(claim) => {
                    if !self.witness_up {
                        continue;
                    }
                    // The decision is durable before the answer leaves.
                    let verdict = self.witness.decide(claim);
                    if self.trace {
                        eprintln!("t={} witness: {claim:?} -> {verdict:?}", self.now);
                    }
                    let reachable = !self.cut_witness[&claim.host];
                    self.send(
                        Event::Verdict {
                            to: claim.host,
                            verdict,
                        },
                        reachable,
                    );
                }
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

    fn tick_host(&mut self, id: HostId) -> Result<(), String> {
        let time = self.local_time(id);
        let view = self.disks[&id].view();
        let actions = match self.hosts.get_mut(&id) {
            Some(Some(host)) => host.tick(time, view),
            _ => return Ok(()),
        };
        self.act(id, actions)
    }

    fn act(&mut self, id: HostId, actions: Vec<Action>) -> Result<(), String> {
        for action in actions {
            match action {
                Action::SendHeartbeat(heartbeat) => {
                    let reachable = !self.cut_peer;
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

    /// The disk daemon's response to the coordinator (a model of `vhost-blk-mirror`).
    fn command(&mut self, id: HostId, command: DiskCommand) -> Result<(), String> {
        if self.trace {
            eprintln!("t={} {id:?}: {command:?}", self.now);
        }
        match command {
            DiskCommand::Hold => self.disk(id).mode = Mode::Holding,
            DiskCommand::Resume { generation } => {
                let disk = self.disk(id);
                disk.mode = Mode::Mirrored;
                disk.generation = generation;
                disk.data_generation = generation;
                // The session carries on: unacknowledged writes are sent again.
                let pending = disk.pending.clone();
                for write in pending {
                    self.channel(id.peer()).push_back(Replication::Write {
                        id: write,
                        generation,
                    });
                }
            }
            DiskCommand::ContinueDegraded { generation } => {
                let disk = self.disk(id);
                disk.mode = Mode::Degraded;
                disk.generation = generation;
                disk.data_generation = generation;
                disk.peer_outdated = true;
                let held = std::mem::take(&mut disk.pending);
                self.channels.insert(id.peer(), VecDeque::new());
                self.outcome.degraded_continuations += 1;
                for write in held {
                    self.acknowledge(id, write)?;
                }
            }
            DiskCommand::Fence => {
                let disk = self.disk(id);
                disk.mode = Mode::Fenced;
                disk.pending.clear();
                self.channels.insert(id.peer(), VecDeque::new());
                self.outcome.fences += 1;
            }
            DiskCommand::Promote { generation } => {
                let disk = self.disk(id);
                disk.role = Role::Primary;
                disk.mode = Mode::Degraded;
                disk.generation = generation;
                disk.data_generation = generation;
                disk.peer_outdated = true;
                self.channels.insert(id.peer(), VecDeque::new());
                self.outcome.promotions += 1;
            }
            DiskCommand::Demote { generation } => {
                let disk = self.disk(id);
                disk.role = Role::Secondary;
                disk.mode = Mode::Mirrored;
                disk.generation = generation;
                // It may hold writes the new primary never saw: Inconsistent until resynced.
                disk.consistent = false;
                disk.pending.clear();
                self.channels.insert(id.peer(), VecDeque::new());
            }
        }
        Ok(())
    }

    fn channel(&mut self, to: HostId) -> &mut VecDeque<Replication> {
        self.channels.entry(to).or_default()
    }

    fn acknowledge(&mut self, id: HostId, write: u64) -> Result<(), String> {
        let disk = &self.disks[&id];
        let generation = disk.generation;
        let changed = self.last_acknowledger != Some((id, generation));
        self.last_acknowledger = Some((id, generation));
        let missing = if changed {
            self.acknowledged.iter().find(|w| !disk.store.contains(w))
        } else {
            None
        };
        if let Some(missing) = missing {
            return Err(format!(
                "t={} ms: {id:?} acknowledges write {write} at generation {generation} but lacks \
                 acknowledged write {missing}",
                self.now
            ));
        }
        let hosts = self.acknowledgers.entry(generation).or_default();
        hosts.insert(id);
        if hosts.len() > 1 {
            return Err(format!(
                "t={} ms: two hosts acknowledge writes at generation {generation}",
                self.now
            ));
        }
        self.acknowledged.insert(write);
        Ok(())
    }

    /// The guest writes wherever a host runs it as primary (even, adversarially, on both).
    fn client_writes(&mut self) -> Result<(), String> {
        if !self.rng.chance(400) {
            return Ok(());
        }
        for id in HOSTS {
            if self.hosts[&id].is_none() || self.disks[&id].role != Role::Primary {
                continue;
            }
            let write = self.next_write;
            self.next_write += 1;
            let disk = self.disk(id);
            match disk.mode {
                Mode::Fenced => continue,
                Mode::Degraded => {
                    disk.store.insert(write);
                    self.acknowledge(id, write)?;
                }
                Mode::Mirrored | Mode::Holding => {
                    disk.store.insert(write);
                    disk.pending.push(write);
                    let generation = disk.generation;
                    self.channel(id.peer()).push_back(Replication::Write {
                        id: write,
                        generation,
                    });
                }
            }
        }
        Ok(())
    }

    /// The replication sessions: in order, only while both ends are up and the A-links work.
    fn replicate(&mut self) -> Result<(), String> {
        if self.cut_peer || HOSTS.iter().any(|id| self.hosts[id].is_none()) {
            return Ok(());
        }
        self.start_resyncs();
        for to in HOSTS {
            let batch: Vec<_> = self.channel(to).drain(..).collect();
            for message in batch {
                self.receive(to, message)?;
            }
        }
        Ok(())
    }

    /// A primary whose secondary is outdated resyncs it as soon as it can reach it: the
    /// resync goes first in the session (the secondary is Inconsistent until it is
    /// applied), then writes are mirrored again.
    fn start_resyncs(&mut self) {
        for id in HOSTS {
            let peer_is_secondary = self.disks[&id.peer()].role == Role::Secondary;
            let disk = self.disk(id);
            let can = disk.role == Role::Primary && disk.mode != Mode::Fenced;
            if can && disk.peer_outdated && peer_is_secondary {
                let (generation, snapshot) = (disk.generation, disk.store.clone());
                disk.peer_outdated = false;
                if disk.mode == Mode::Degraded {
                    disk.mode = Mode::Mirrored;
                }
                let resync = Replication::Resync {
                    generation,
                    snapshot,
                };
                self.channel(id.peer()).push_front(resync);
            }
        }
    }

    fn receive(&mut self, to: HostId, message: Replication) -> Result<(), String> {
        match message {
            Replication::Write { id, generation } => {
                let disk = self.disk(to);
                if disk.role != Role::Secondary || generation < disk.generation {
                    return Ok(()); // refused: stale generation
                }
                disk.store.insert(id);
                disk.generation = generation;
                if disk.consistent {
                    disk.data_generation = generation;
                }
                self.channel(to.peer())
                    .push_back(Replication::Ack { id, generation });
            }
            Replication::Ack { id, generation } => {
                let disk = self.disk(to);
                let live = matches!(disk.mode, Mode::Mirrored | Mode::Holding);
                if let Some(index) = disk.pending.iter().position(|w| *w == id) {
                    if live && disk.generation >= generation {
                        disk.pending.remove(index);
                        self.acknowledge(to, id)?;
                    }
                }
            }
            Replication::Resync {
                generation,
                snapshot,
            } => {
                let disk = self.disk(to);
                if disk.role != Role::Secondary || generation < disk.generation {
                    return Ok(());
                }
                disk.store.extend(snapshot);
                disk.generation = generation;
                disk.data_generation = generation;
                disk.consistent = true;
            }
        }
        Ok(())
    }
}

fn toggle(map: &mut BTreeMap<HostId, bool>, id: HostId) {
    if let Some(cut) = map.get_mut(&id) {
        *cut = !*cut;
    }
}
