//! The model of the mirrored disk: each host's copy (with a page cache that a power loss
//! empties, and a disk that can fail writes) and the rules its disk daemon
//! (`vhost-blk-mirror`) follows as primary or secondary.
//!
//! A write is a distinct block (its id); a copy is the set of blocks it holds. The
//! primary's out-of-sync and activity bitmaps are sets of blocks. A resync copies the
//! primary's version of each listed block: the secondary gains the blocks the primary
//! holds and loses those it does not.

use std::collections::{BTreeMap, BTreeSet};

use super::World;
use crate::host::{DiskView, Mode, Role};
use crate::{Generation, HostId, Millis};

/// How long the disk's replication link waits before it calls the peer lost.
const LINK_TIMEOUT_MS: Millis = 1000;

/// Rules of the disk daemons that the model can switch back to their old, broken versions,
/// to show that the checkers catch what they broke.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rules {
    /// Old: a failed reply from the secondary completes the write (its range marked out of
    /// sync), a failed resync block clears its chunk, a failed flush counts as done, and a
    /// secondary whose disk failed goes on applying and accepts the end of a resync.
    pub complete_failed_replies: bool,
    /// Old: the primary clears its activity extents after its own flush, without a flush
    /// of the secondary.
    pub clear_activity_after_local_flush: bool,
    /// Old: a copy whose host lost power restarts as it was (no boot id check), so
    /// neither it nor its primary knows it lost unflushed writes.
    pub ignore_power_loss: bool,
    /// Today's `vhost-blk-mirror`: `continue-degraded` on a holding primary whose local
    /// copy failed (RemoteOnly) completes the held writes, which no copy may hold.
    pub continue_degraded_without_local_copy: bool,
}

/// One host's storage: what it holds, and what a power loss would take.
#[derive(Clone, Debug, Default)]
pub(super) struct Copy {
    /// Blocks written, flushed or not (what a read returns).
    pub(super) store: BTreeSet<u64>,
    /// Of those, the blocks still in the page cache only.
    unflushed: BTreeSet<u64>,
    /// The disk fails every write and flush until repaired.
    pub(super) broken: bool,
}

impl Copy {
    fn write(&mut self, block: u64) -> bool {
        if self.broken {
            return false;
        }
        self.store.insert(block);
        self.unflushed.insert(block);
        true
    }

    fn flush(&mut self) -> bool {
        if self.broken {
            return false;
        }
        self.unflushed.clear();
        true
    }

    /// Power loss: the page cache is gone. Returns how many blocks were lost.
    pub(super) fn lose_power(&mut self) -> usize {
        let lost = std::mem::take(&mut self.unflushed);
        for block in &lost {
            self.store.remove(block);
        }
        lost.len()
    }
}

/// What a resync sends.
#[derive(Clone, Debug)]
pub(super) enum Chunks {
    /// Listed blocks, each with whether the primary holds it.
    Delta(BTreeMap<u64, bool>),
    /// The whole disk.
    Full(BTreeSet<u64>),
}

/// What the disk daemons say to each other (one in-order session per direction).
#[derive(Clone, Debug)]
pub(super) enum Replication {
    Write {
        id: u64,
        generation: Generation,
    },
    /// A flush round trip; `clear` is the activity epoch to clear once the secondary has
    /// flushed too.
    Flush {
        generation: Generation,
        clear: Option<BTreeSet<u64>>,
    },
    /// A whole resync round: start (the secondary is Inconsistent), blocks, done.
    Resync {
        generation: Generation,
        chunks: Chunks,
        /// The out-of-sync blocks this round clears when it succeeds.
        listed: Vec<u64>,
    },
    // Answers, from the secondary.
    Ack {
        id: u64,
        generation: Generation,
    },
    /// The secondary's disk failed the write (or failed earlier).
    Failed {
        id: u64,
    },
    /// A lower generation than the secondary's: a newer primary exists.
    Refused,
    FlushDone {
        ok: bool,
        clear: Option<BTreeSet<u64>>,
    },
    ResyncDone {
        ok: bool,
        chunks: Vec<u64>,
        generation: Generation,
    },
}

/// A host's disk: durable metadata, its copy, and its daemon's volatile state.
#[derive(Clone, Debug)]
pub(super) struct Disk {
    // Durable metadata.
    pub(super) role: Role,
    pub(super) generation: Generation,
    /// UpToDate. On a primary, false means its local copy failed (RemoteOnly).
    pub(super) consistent: bool,
    /// The latest generation at which both copies were identical outside the bitmaps.
    base_generation: Generation,
    out_of_sync: BTreeSet<u64>,
    all_out_of_sync: bool,
    activity: BTreeSet<u64>,
    /// The host lost power while the daemon had this copy open (its boot id changed).
    power_lost: bool,
    pub(super) copy: Copy,
    // The daemon's volatile state.
    pub(super) mode: Mode,
    /// Primary: writes sent to the peer, not yet acknowledged by it.
    pending: Vec<u64>,
    /// Primary: the current session's `Hello` was answered with a usable `Welcome`.
    welcomed: bool,
    /// Primary: the secondary's copy failed; it counts as lost until it works again.
    peer_failed: bool,
    resync_running: bool,
    resync_forced: bool,
    unreachable_since: Option<Millis>,
    /// Secondary: its disk failed; it applies nothing until `repair`.
    refusing: bool,
    /// Secondary: restarted after a power loss, until a resync ends.
    lost_unflushed: bool,
    /// Secondary: UpToDate before that power loss.
    up_to_date_before_crash: bool,
}

impl Disk {
    pub(super) fn new(role: Role) -> Disk {
        Disk {
            role,
            generation: 1,
            consistent: true,
            base_generation: 1,
            out_of_sync: BTreeSet::new(),
            all_out_of_sync: false,
            activity: BTreeSet::new(),
            power_lost: false,
            copy: Copy::default(),
            mode: Mode::Mirrored,
            pending: Vec::new(),
            welcomed: true,
            peer_failed: false,
            resync_running: false,
            resync_forced: false,
            unreachable_since: None,
            refusing: false,
            lost_unflushed: false,
            up_to_date_before_crash: false,
        }
    }

    /// What `ftvmd` reads from the daemon's status: an Inconsistent copy (or a primary's
    /// failed local copy) holds no generation completely.
    pub(super) fn view(&self) -> DiskView {
        match self.consistent && !self.refusing {
            true => DiskView {
                consistent: true,
                data_generation: self.generation,
            },
            false => DiskView {
                consistent: false,
                data_generation: 0,
            },
        }
    }

    /// The daemon stops (process killed, or the host lost power): its volatile state is
    /// gone.
    pub(super) fn stop(&mut self) {
        self.pending.clear();
        self.stop_session();
        self.unreachable_since = None;
    }

    /// The session to the peer is gone (the peer's daemon stopped).
    pub(super) fn stop_session(&mut self) {
        self.welcomed = false;
        self.resync_running = false;
    }

    /// The host loses power: the page cache is gone, and the daemon will find another
    /// boot id in the metadata (unless the old rules ignore it). Returns the blocks lost.
    pub(super) fn lose_power(&mut self, rules: Rules) -> usize {
        if !rules.ignore_power_loss {
            self.power_lost = true;
        }
        self.copy.lose_power()
    }

    /// The daemon starts on this copy again.
    pub(super) fn start(&mut self) {
        self.refusing = false;
        self.peer_failed = false;
        self.resync_forced = false;
        self.mode = match self.role {
            Role::Primary => Mode::Holding,
            Role::Secondary => Mode::Mirrored,
        };
        if std::mem::take(&mut self.power_lost) {
            // Writes it acknowledged but had not flushed may be gone: Inconsistent,
            // durably, before anyone asks. A primary serves from the peer (RemoteOnly).
            self.lost_unflushed = self.role == Role::Secondary;
            self.up_to_date_before_crash = self.consistent;
            self.consistent = false;
        }
    }

    /// The operator repaired the disk and sent `repair`.
    pub(super) fn repair(&mut self) {
        self.copy.broken = false;
        self.refusing = false;
    }

    pub(super) fn needs_repair(&self) -> bool {
        self.copy.broken || self.refusing || (self.role == Role::Primary && !self.consistent)
    }

    pub(super) fn holding(&self) -> bool {
        self.mode == Mode::Holding
    }
}

/// The daemons' behaviour: what the primary does with the guest's requests and the
/// coordinator's orders, what the secondary does with the session, and the answers.
impl World {
    pub(super) fn disk(&mut self, id: HostId) -> &mut Disk {
        self.disks.get_mut(&id).expect("both hosts have disks")
    }

    fn channel(&mut self, to: HostId) -> &mut Vec<Replication> {
        self.channels.entry(to).or_default()
    }

    /// A new session between the disks: both directions start empty.
    fn new_session(&mut self, primary: HostId) {
        self.channels.insert(primary, Vec::new());
        self.channels.insert(primary.peer(), Vec::new());
        self.disk(primary).welcomed = false;
    }

    pub(super) fn acknowledge(&mut self, id: HostId, write: u64) -> Result<(), String> {
        let generation = self.disks[&id].generation;
        // The copy it serves from: its own, or the peer's when RemoteOnly.
        let serving = match self.disks[&id].consistent {
            true => &self.disks[&id].copy.store,
            false => &self.disks[&id.peer()].copy.store,
        };
        self.checker
            .acknowledge(self.now, id, generation, write, serving)
    }

    /// The local copy failed: recorded durably as Inconsistent before anything else
    /// completes; from then on I/O is served by the peer (RemoteOnly).
    fn local_failed(&mut self, id: HostId) {
        if self.trace {
            eprintln!("t={} {id:?}: local disk failed: RemoteOnly", self.now);
        }
        self.disk(id).consistent = false;
        self.checker.invalidate();
    }

    /// The guest writes block `write` on the primary `id`.
    pub(super) fn guest_write(&mut self, id: HostId, write: u64) -> Result<(), String> {
        let disk = self.disk(id);
        match disk.mode {
            Mode::Fenced => Ok(()),
            Mode::Degraded => {
                // Alone: the write needs a usable local copy, and is recorded for the
                // peer's resync before it completes.
                if !disk.consistent {
                    return Ok(());
                }
                disk.activity.insert(write);
                if !disk.copy.write(write) {
                    return Ok(()); // an I/O error for the guest: nothing acknowledged
                }
                disk.out_of_sync.insert(write);
                self.acknowledge(id, write)
            }
            Mode::Mirrored | Mode::Holding => {
                disk.activity.insert(write);
                let local_ok = !disk.consistent || disk.copy.write(write);
                disk.pending.push(write);
                let generation = disk.generation;
                if !local_ok {
                    self.local_failed(id);
                }
                self.channel(id.peer()).push(Replication::Write {
                    id: write,
                    generation,
                });
                Ok(())
            }
        }
    }

    /// The guest flushes: the local copy, then (mirrored) the secondary's.
    pub(super) fn guest_flush(&mut self, id: HostId) {
        let disk = self.disk(id);
        if disk.mode == Mode::Fenced {
            return;
        }
        if disk.consistent && !disk.copy.flush() {
            self.local_failed(id);
        }
        let disk = self.disk(id);
        if matches!(disk.mode, Mode::Mirrored | Mode::Holding) {
            let generation = disk.generation;
            self.channel(id.peer()).push(Replication::Flush {
                generation,
                clear: None,
            });
        }
    }

    /// The primary's periodic clear of its activity extents: once no write is under way,
    /// after a flush round trip in which the secondary flushed too.
    pub(super) fn clear_activity(&mut self, id: HostId) {
        let rules = self.rules;
        let disk = self.disk(id);
        let idle = disk.mode == Mode::Mirrored && disk.pending.is_empty() && disk.welcomed;
        if !idle || !disk.consistent || disk.activity.is_empty() {
            return;
        }
        let epoch = disk.activity.clone();
        if !disk.copy.flush() {
            self.local_failed(id);
            return;
        }
        if rules.clear_activity_after_local_flush {
            for block in &epoch {
                disk.activity.remove(block);
            }
            return;
        }
        let generation = disk.generation;
        self.channel(id.peer()).push(Replication::Flush {
            generation,
            clear: Some(epoch),
        });
    }

    /// The disk's own view of its link to the peer: a mirrored primary holds once the
    /// peer is unreachable for the link timeout, and mirrors again when it is back in
    /// the same session.
    pub(super) fn watch_link(&mut self, id: HostId) {
        let now = self.now;
        let up = self.link_up(id);
        let disk = self.disk(id);
        if disk.role != Role::Primary {
            return;
        }
        if up {
            disk.unreachable_since = None;
            if disk.mode == Mode::Holding && disk.welcomed && !disk.peer_failed {
                disk.mode = Mode::Mirrored;
            }
            return;
        }
        let since = *disk.unreachable_since.get_or_insert(now);
        if disk.mode == Mode::Mirrored && now.saturating_sub(since) >= LINK_TIMEOUT_MS {
            disk.mode = Mode::Holding;
        }
    }

    /// Whether the replication session of the primary `id` can carry messages.
    pub(super) fn link_up(&self, id: HostId) -> bool {
        !self.cut_replication
            && self.hosts.values().all(Option::is_some)
            && self.disks[&id.peer()].role == Role::Secondary
    }

    /// `continue-degraded GEN`, as the real daemon answers it.
    pub(super) fn continue_degraded(
        &mut self,
        id: HostId,
        generation: Generation,
    ) -> Result<(), String> {
        let rules = self.rules;
        let disk = self.disk(id);
        if disk.role != Role::Primary || generation < disk.generation {
            return Ok(());
        }
        match disk.mode {
            Mode::Fenced => return Ok(()),
            Mode::Degraded => {
                disk.generation = generation;
                return Ok(());
            }
            // The witness granted a generation while the peer is reachable: adopt it, and
            // have the secondary confirm it holds everything (an empty resync round).
            Mode::Mirrored => {
                if generation > disk.generation {
                    disk.generation = generation;
                    disk.resync_forced = true;
                }
                return Ok(());
            }
            Mode::Holding => {}
        }
        if !disk.consistent && !rules.continue_degraded_without_local_copy {
            // RemoteOnly: no copy of its own to run alone on (a grant for a claim made
            // before the local disk failed).
            return Ok(());
        }
        disk.generation = generation;
        disk.mode = Mode::Degraded;
        disk.resync_forced = false;
        let held = std::mem::take(&mut disk.pending);
        disk.out_of_sync.extend(held.iter().copied());
        let copy = disk.copy.store.clone();
        self.checker
            .chosen(self.now, id, "continuing degraded", &copy)?;
        self.new_session(id);
        self.outcome.degraded_continuations += 1;
        for write in held {
            self.acknowledge(id, write)?;
        }
        Ok(())
    }

    pub(super) fn fence(&mut self, id: HostId) {
        let disk = self.disk(id);
        if disk.role != Role::Primary {
            return;
        }
        disk.mode = Mode::Fenced;
        disk.pending.clear();
        self.new_session(id);
        self.outcome.fences += 1;
    }

    /// `promote GEN`: refused unless this copy is UpToDate and its disk works.
    pub(super) fn promote(&mut self, id: HostId, generation: Generation) -> Result<(), String> {
        let disk = self.disk(id);
        if disk.role != Role::Secondary || !disk.consistent || disk.refusing {
            return Ok(());
        }
        disk.base_generation = disk.generation;
        disk.role = Role::Primary;
        disk.mode = Mode::Degraded;
        disk.generation = generation;
        disk.pending.clear();
        let copy = disk.copy.store.clone();
        self.checker.chosen(self.now, id, "promoted", &copy)?;
        self.new_session(id);
        self.outcome.promotions += 1;
        Ok(())
    }

    /// `demote`: fence, then listen as the new primary's secondary. The copy keeps its
    /// bitmaps: they are its suspect regions for the new primary.
    pub(super) fn demote(&mut self, id: HostId) {
        let disk = self.disk(id);
        if disk.role != Role::Primary {
            return;
        }
        disk.role = Role::Secondary;
        disk.mode = Mode::Mirrored;
        disk.pending.clear();
        disk.resync_running = false;
        self.new_session(id);
    }

    /// The replication sessions: Hello/Welcome on a new session, resyncs, then every
    /// message in order, while both ends run and the replication path works.
    pub(super) fn replicate(&mut self) -> Result<(), String> {
        let Some(primary) = [HostId::A, HostId::B]
            .into_iter()
            .find(|id| self.disks[id].role == Role::Primary && self.link_up(*id))
        else {
            return Ok(());
        };
        let disk = &self.disks[&primary];
        if disk.mode == Mode::Fenced {
            return Ok(());
        }
        let hello_due = !disk.welcomed && (!disk.peer_failed || disk.mode == Mode::Degraded);
        if hello_due && !self.handshake(primary) {
            return Ok(());
        }
        if !self.disks[&primary].welcomed {
            // The peer's copy is unusable (failed, or nothing to serve or resync from):
            // the session carries nothing until a new `Welcome`.
            return Ok(());
        }
        self.maybe_start_resync(primary);
        for to in [primary.peer(), primary] {
            let batch = std::mem::take(self.channel(to));
            for message in batch {
                self.receive(to, message)?;
            }
        }
        Ok(())
    }

    /// `Hello` and the secondary's `Welcome`: decides between a delta and a full resync.
    /// Returns whether the session may carry writes.
    fn handshake(&mut self, primary: HostId) -> bool {
        let secondary = primary.peer();
        let ours = self.disks[&primary].generation;
        let peer = self.disk(secondary);
        let (peer_generation, disk_failed) = (peer.generation, peer.refusing);
        let up_to_date = match peer.lost_unflushed {
            true => peer.up_to_date_before_crash,
            false => peer.consistent && !peer.refusing,
        };
        let lost_unflushed = peer.lost_unflushed;
        let suspects: BTreeSet<u64> = peer.out_of_sync.union(&peer.activity).copied().collect();
        if peer_generation > ours {
            // The secondary refuses a lower generation: a newer primary exists.
            self.fence(primary);
            return false;
        }
        if ours > peer_generation {
            // A newer primary: Inconsistent until its resync ends.
            peer.generation = ours;
            peer.consistent = false;
        }
        self.new_session(primary);
        if disk_failed {
            self.peer_copy_failed(primary, None);
            return false;
        }
        let disk = self.disk(primary);
        if lost_unflushed {
            disk.out_of_sync.extend(disk.activity.iter().copied());
        }
        let delta = up_to_date && peer_generation >= disk.base_generation;
        if delta {
            disk.out_of_sync.extend(suspects);
        } else {
            disk.all_out_of_sync = true;
        }
        let forced = peer_generation < ours || lost_unflushed;
        let needs_resync = disk.all_out_of_sync || !disk.out_of_sync.is_empty() || forced;
        if !disk.consistent && needs_resync {
            // RemoteOnly, and the peer's copy is not complete either: there is no copy to
            // serve from, nor one to resync from.
            self.peer_copy_failed(primary, None);
            return false;
        }
        disk.welcomed = true;
        disk.peer_failed = false;
        disk.resync_forced = forced;
        if matches!(disk.mode, Mode::Holding | Mode::Degraded) {
            disk.mode = Mode::Mirrored;
        }
        if self.trace {
            eprintln!(
                "t={} {primary:?}: welcomed by the secondary (generation {peer_generation}, \
                 up to date {up_to_date}, lost unflushed {lost_unflushed}): {} resync",
                self.now,
                if delta { "delta" } else { "full" }
            );
        }
        self.maybe_start_resync(primary);
        // The session carries on with the writes still waiting for the peer.
        let disk = &self.disks[&primary];
        let (pending, generation) = (disk.pending.clone(), disk.generation);
        for write in pending {
            self.channel(secondary).push(Replication::Write {
                id: write,
                generation,
            });
        }
        true
    }

    /// A mirrored primary resyncs what its out-of-sync bitmap lists, from its own copy.
    fn maybe_start_resync(&mut self, primary: HostId) {
        let disk = self.disk(primary);
        let due = disk.all_out_of_sync || !disk.out_of_sync.is_empty() || disk.resync_forced;
        let able = disk.mode == Mode::Mirrored && disk.welcomed && disk.consistent;
        if !due || !able || disk.resync_running {
            return;
        }
        disk.resync_running = true;
        disk.resync_forced = false;
        let chunks = match disk.all_out_of_sync {
            true => Chunks::Full(disk.copy.store.clone()),
            false => Chunks::Delta(
                disk.out_of_sync
                    .iter()
                    .map(|block| (*block, disk.copy.store.contains(block)))
                    .collect(),
            ),
        };
        let listed = disk.out_of_sync.iter().copied().collect();
        let generation = disk.generation;
        if matches!(chunks, Chunks::Full(_)) {
            self.outcome.full_resyncs += 1;
        } else {
            self.outcome.delta_resyncs += 1;
        }
        self.channel(primary.peer()).insert(
            0,
            Replication::Resync {
                generation,
                chunks,
                listed,
            },
        );
    }

    /// The secondary's copy missed a change: it is Inconsistent and treated like a lost
    /// secondary. The write stays held, its block out of sync, and the disk holds until
    /// the coordinator has a new generation for it.
    fn peer_copy_failed(&mut self, primary: HostId, write: Option<u64>) {
        if self.trace {
            eprintln!("t={} {primary:?}: the secondary's copy failed", self.now);
        }
        let disk = self.disk(primary);
        disk.out_of_sync.extend(write);
        disk.peer_failed = true;
        disk.welcomed = false;
        disk.resync_running = false;
        if disk.mode == Mode::Mirrored {
            disk.mode = Mode::Holding;
        }
    }

    fn receive(&mut self, to: HostId, message: Replication) -> Result<(), String> {
        match self.disks[&to].role {
            Role::Secondary => self.secondary_receive(to, message),
            Role::Primary => self.primary_receive(to, message),
        }
    }

    /// The secondary's disk daemon.
    fn secondary_receive(&mut self, to: HostId, message: Replication) -> Result<(), String> {
        let old_rules = self.rules.complete_failed_replies;
        let disk = self.disk(to);
        let generation = match &message {
            Replication::Write { generation, .. }
            | Replication::Flush { generation, .. }
            | Replication::Resync { generation, .. } => *generation,
            _ => return Ok(()),
        };
        if generation < disk.generation {
            self.channel(to.peer()).push(Replication::Refused);
            return Ok(());
        }
        // Every earlier message of the session arrived in order: as complete as before.
        disk.generation = generation;
        let reply = match message {
            Replication::Write { id, generation } => {
                if disk.refusing || !disk.copy.write(id) {
                    if !old_rules {
                        disk.refusing = true;
                        disk.consistent = false;
                    }
                    Replication::Failed { id }
                } else {
                    Replication::Ack { id, generation }
                }
            }
            Replication::Flush { clear, .. } => {
                let ok = !disk.refusing && disk.copy.flush();
                if !ok && !old_rules {
                    disk.refusing = true;
                    disk.consistent = false;
                }
                Replication::FlushDone { ok, clear }
            }
            Replication::Resync {
                generation,
                chunks,
                listed,
            } => {
                // ResyncStart: Inconsistent (durably) until ResyncDone.
                disk.consistent = false;
                let ok = !disk.refusing && !disk.copy.broken;
                if ok {
                    match chunks {
                        Chunks::Delta(blocks) => {
                            for (block, present) in blocks {
                                if present {
                                    disk.copy.write(block);
                                } else {
                                    disk.copy.store.remove(&block);
                                }
                            }
                        }
                        Chunks::Full(store) => disk.copy.store = store,
                    }
                    disk.copy.flush();
                } else if !old_rules {
                    disk.refusing = true;
                }
                if ok || old_rules {
                    // ResyncDone: UpToDate at the primary's generation.
                    disk.consistent = true;
                    disk.lost_unflushed = false;
                    disk.out_of_sync.clear();
                    disk.activity.clear();
                }
                self.checker.invalidate();
                Replication::ResyncDone {
                    ok,
                    chunks: listed,
                    generation,
                }
            }
            _ => return Ok(()),
        };
        self.channel(to.peer()).push(reply);
        Ok(())
    }

    /// The primary's receiver: the secondary's answers.
    fn primary_receive(&mut self, to: HostId, message: Replication) -> Result<(), String> {
        let old_rules = self.rules.complete_failed_replies;
        let disk = self.disk(to);
        if disk.mode == Mode::Fenced {
            return Ok(());
        }
        match message {
            Replication::Ack { id, generation } => {
                let live = matches!(disk.mode, Mode::Mirrored | Mode::Holding);
                if let Some(index) = disk.pending.iter().position(|w| *w == id) {
                    if live && disk.generation >= generation {
                        disk.pending.remove(index);
                        self.acknowledge(to, id)?;
                    }
                }
            }
            Replication::Failed { id } if old_rules => {
                // Old: the range is resynced later, the request completes now.
                disk.out_of_sync.insert(id);
                if let Some(index) = disk.pending.iter().position(|w| *w == id) {
                    disk.pending.remove(index);
                    self.acknowledge(to, id)?;
                }
            }
            Replication::Failed { id } => {
                let held = disk.pending.contains(&id);
                self.peer_copy_failed(to, held.then_some(id));
            }
            Replication::Refused => {
                if self.trace {
                    eprintln!("t={} {to:?}: refused by the secondary: fenced", self.now);
                }
                self.fence(to);
            }
            Replication::FlushDone { ok, clear } => {
                if ok || old_rules {
                    for block in clear.iter().flatten() {
                        disk.activity.remove(block);
                    }
                } else {
                    self.peer_copy_failed(to, None);
                }
            }
            Replication::ResyncDone {
                ok,
                chunks,
                generation,
            } => {
                disk.resync_running = false;
                if ok || old_rules {
                    for block in &chunks {
                        disk.out_of_sync.remove(block);
                    }
                    disk.all_out_of_sync = false;
                    disk.base_generation = generation;
                } else {
                    self.peer_copy_failed(to, None);
                }
            }
            Replication::Write { .. } | Replication::Flush { .. } | Replication::Resync { .. } => {}
        }
        Ok(())
    }

    /// `repair` on a primary whose local copy failed: rebuilt from the peer's copy,
    /// which must be UpToDate and reachable in a mirrored session.
    pub(super) fn rebuild(&mut self, id: HostId) {
        let peer = &self.disks[&id.peer()];
        let source = peer.consistent && !peer.refusing;
        let disk = &self.disks[&id];
        let able = disk.role == Role::Primary
            && !disk.consistent
            && !disk.copy.broken
            && disk.mode == Mode::Mirrored
            && disk.welcomed
            && self.link_up(id);
        if !source || !able {
            return;
        }
        let store = self.disks[&id.peer()].copy.store.clone();
        let disk = self.disk(id);
        disk.copy.store = store;
        disk.copy.flush();
        disk.consistent = true;
        self.checker.invalidate();
        self.outcome.rebuilds += 1;
    }
}
