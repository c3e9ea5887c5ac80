//! The primary's engine: the epoch loop of `docs/LEVEL3.md` ("The epoch").
//!
//! One thread does everything in order, so that at most one epoch is in flight:
//!
//! 1. (once per replica) a full copy of RAM while the guest runs, after QEMU's tracking was
//!    registered and the NICs began holding output: not a checkpoint (no device state, torn
//!    pages), but every page written meanwhile is dirty and goes in the next epoch;
//! 2. every `interval`: `stop`; while stopped, QEMU's dirty pages (`PAGEMAP_SCAN`) and the
//!    daemons' (`dirty-pages`) are harvested and copied out, and the NICs' epoch ends;
//!    device state; `cont`;
//! 3. the epoch goes to the secondary (pages encoded against the shadow, the device state
//!    against the previous epoch's) while the guest runs;
//!    its `Ack` is the commit: the NICs release the frames of the epochs it covers.
//!
//! A failure of a step leaves output held (nothing unconfirmed leaves the host) and the
//! dirty pages of a failed epoch are carried into the next. A lost secondary (no `Ack`, a
//! refusal, a closed session) means a new handshake and, if the replica does not follow
//! the shadow any more, a new full copy; the guest runs meanwhile with its output held
//! until the next commit, or until the operator (or `ftvmd`) ends Level 3 (`release`).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use log::{info, warn};
use replication_link::{KeyRing, LinkConfig, Session};
use serde::Serialize;

use super::daemons::Daemons;
use crate::delta::{Page, PAGE_BYTES};
use crate::dirty::{DirtySet, FileId, RamTracker, ScanMode};
use crate::epoch::{self, HookError};
use crate::guest_ram::GuestRam;
use crate::qmp::Qmp;
use crate::sender::{Sender, SenderConfig, SenderError};
use crate::stats::{EpochSample, Stats, StatsReport};
use crate::wire;

/// How long QMP commands, the tracker's socket and the secondary's `Welcome` may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
const TRACKER_TIMEOUT: Duration = Duration::from_secs(10);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an epoch's `Ack` may take before the secondary counts as lost.
const ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between attempts while the secondary cannot be reached.
const RETRY_INTERVAL: Duration = Duration::from_millis(200);

/// What the primary's engine needs (see `ftvm-checkpoint primary --help`).
#[derive(Debug, Clone)]
pub struct PrimaryOptions {
    pub vm: String,
    pub qmp: PathBuf,
    pub ram: PathBuf,
    pub ram_track: PathBuf,
    pub disks: Vec<PathBuf>,
    pub nics: Vec<PathBuf>,
    pub peers: Vec<SocketAddr>,
    pub psk_file: PathBuf,
    pub host_id: String,
    pub generation: u64,
    pub interval: Duration,
}

/// What `status` shows of the primary.
#[derive(Debug, Clone, Serialize)]
pub struct PrimaryStatus {
    pub role: &'static str,
    pub vm: String,
    pub generation: u64,
    /// `starting`, `full-copy`, `protected` (epochs commit), `peer-lost`, `handing-over`
    /// (the final epoch of a `handover`), `handed-over` (the guest stays stopped),
    /// `released`.
    pub state: String,
    /// Why the state is not `protected`, when it is not.
    pub problem: Option<String>,
    pub ram_bytes: u64,
    pub interval_ms: u64,
    pub full_copies: u64,
    pub failed_epochs: u64,
    pub stats: Option<StatsReport>,
}

/// Shared with the control socket.
#[derive(Debug)]
pub struct PrimaryShared {
    pub status: Mutex<PrimaryStatus>,
    /// Set by `release` or a signal: end Level 3 (output released, tracking off).
    pub release: Arc<AtomicBool>,
    /// A `handover` waiting for the epoch loop: where its answer goes.
    handover: Mutex<Option<mpsc::Sender<Result<u64, String>>>>,
}

impl PrimaryShared {
    pub fn new(options: &PrimaryOptions) -> Arc<PrimaryShared> {
        Arc::new(PrimaryShared {
            status: Mutex::new(PrimaryStatus {
                role: "primary",
                vm: options.vm.clone(),
                generation: options.generation,
                state: "starting".into(),
                problem: None,
                ram_bytes: 0,
                interval_ms: options.interval.as_millis() as u64,
                full_copies: 0,
                failed_epochs: 0,
                stats: None,
            }),
            release: Arc::new(AtomicBool::new(false)),
            handover: Mutex::new(None),
        })
    }

    /// `handover` (`ftvm migrate`): the next epoch is the last one, taken with the guest
    /// left stopped; once the secondary committed it (every frame the guest sent is out, the
    /// replica is the guest's state here) the answer names it, and the engine takes no more
    /// epochs until it is released or killed: the peer restores the VM from that
    /// checkpoint. Refused unless epochs commit. When the answer cannot be given (the
    /// secondary lost, `timeout`), the guest runs on here, still at Level 3.
    pub fn hand_over(&self, timeout: Duration) -> Result<u64, String> {
        let (state, problem) = {
            let status = daemon_util::lock(&self.status);
            (status.state.clone(), status.problem.clone())
        };
        if state != "protected" || problem.is_some() {
            return Err(format!(
                "checkpoints do not commit ({state}{}): no handover now",
                problem
                    .map(|problem| format!(": {problem}"))
                    .unwrap_or_default()
            ));
        }
        let (sender, answer) = mpsc::channel();
        {
            let mut pending = daemon_util::lock(&self.handover);
            if pending.is_some() {
                return Err("a handover is already under way".into());
            }
            *pending = Some(sender);
        }
        match answer.recv_timeout(timeout) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                // Taken back if the loop has not started it; if it has, the loop finds
                // nobody to answer and resumes the guest.
                daemon_util::lock(&self.handover).take();
                Err(format!(
                    "no final checkpoint within {timeout:?}; the VM runs on here"
                ))
            }
        }
    }

    fn take_handover(&self) -> Option<mpsc::Sender<Result<u64, String>>> {
        daemon_util::lock(&self.handover).take()
    }

    /// The `release` flag, for signal handlers.
    pub fn release_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.release)
    }

    fn update(&self, change: impl FnOnce(&mut PrimaryStatus)) {
        change(&mut daemon_util::lock(&self.status));
    }

    /// Sets the state, logging every change of state or problem.
    fn set_state(&self, state: &str, problem: Option<String>) {
        self.update(|status| {
            if status.state != state || status.problem != problem {
                match &problem {
                    Some(problem) => warn!("{state}: {problem}"),
                    None => info!("{state}"),
                }
            }
            status.state = state.into();
            status.problem = problem;
        });
    }
}

/// One epoch copied out while the guest was stopped.
struct Staged {
    indices: Vec<u64>,
    /// The pages, back to back, in the order of `indices`.
    bytes: Vec<u8>,
    /// The NIC epoch ended in this stop.
    nic_epoch: u64,
}

/// Runs the primary until Level 3 is released (`release`, SIGTERM) or a fatal error.
pub fn run(options: &PrimaryOptions, shared: &PrimaryShared) -> anyhow::Result<()> {
    let ram = GuestRam::open(&options.ram)
        .with_context(|| format!("cannot map the guest RAM file {}", options.ram.display()))?;
    let ram_bytes = ram.len() as u64;
    shared.update(|status| status.ram_bytes = ram_bytes);
    let daemons = Daemons {
        disks: options.disks.clone(),
        nics: options.nics.clone(),
        ram: FileId::of(&options.ram)?,
        ram_bytes,
    };
    let mut qmp = Qmp::connect(&options.qmp, QMP_TIMEOUT)
        .with_context(|| format!("cannot reach QEMU at {}", options.qmp.display()))?;
    epoch::set_device_state_capabilities(&mut qmp)?;

    // Output held by an engine before this one (killed) stays held until this one commits.
    let held = daemons.output_commit_held()?;
    if let Some(epoch) = held {
        warn!("the NICs held output at epoch {epoch} (an engine before this one was killed): taken over");
    }
    let mut output = Output {
        nic_epoch: held.unwrap_or(1),
        held: held.is_some(),
    };
    let result = run_epochs(options, shared, &ram, &daemons, &mut qmp, &mut output);
    // Level 3 ends: whatever is held goes out (the VM runs on at Level 2).
    if let Err(error) = daemons.output_commit_off() {
        warn!("cannot release the NICs' held output: {error}");
    }
    shared.set_state(
        "released",
        result.as_ref().err().map(|error| format!("{error:#}")),
    );
    result
}

/// The guest's output: the NIC epoch its frames belong to now, and whether the NICs hold
/// them (output commit).
///
/// Output is held from the first handshake on whenever the secondary's replica holds a
/// complete copy (it may be restorable: nothing may go out that a restore of it would
/// undo). A replica without one (Level 3 just started, or a new replica) cannot be
/// restored before the first checkpoint commits, and every frame sent before that
/// checkpoint's stop is caused by state the checkpoint contains: so while the first full
/// copy of a fresh replica runs, frames pass, and holding starts at the first checkpoint's
/// stop. (The guest's network would otherwise stall for the whole copy: 3.5 s for 256 MiB
/// here.)
#[derive(Debug)]
struct Output {
    nic_epoch: u64,
    held: bool,
}

fn run_epochs(
    options: &PrimaryOptions,
    shared: &PrimaryShared,
    ram: &GuestRam,
    daemons: &Daemons,
    qmp: &mut Qmp,
    output: &mut Output,
) -> anyhow::Result<()> {
    // Asked again until QEMU answers: a wrapper QEMU is started through (`ip netns exec`)
    // may hold the library's socket for a moment, and it maps no guest RAM.
    let deadline = Instant::now() + TRACKER_TIMEOUT;
    let mut tracker = loop {
        match RamTracker::start(&options.ram_track, &options.ram, TRACKER_TIMEOUT) {
            Ok(tracker) => break tracker,
            Err(error) if Instant::now() < deadline => {
                warn!("QEMU's RAM tracking not ready yet: {error}");
                std::thread::sleep(RETRY_INTERVAL);
            }
            Err(error) => {
                return Err(error).context(
                    "cannot start QEMU's RAM tracking (is QEMU run with LD_PRELOAD=libftvm_ram_track.so and FTVM_RAM_TRACK_SOCKET?)",
                )
            }
        }
    };
    info!(
        "tracking QEMU {}'s writes to {}",
        tracker.qemu_pid(),
        options.ram.display()
    );
    // The pair's key and, while it exists, the previous one (key rotation).
    let keys = KeyRing::from_file(&options.psk_file)
        .with_context(|| format!("cannot read the pair key {}", options.psk_file.display()))?;
    let config = LinkConfig::new(keys, options.host_id.clone());
    let session = Session::connect(
        options.peers.clone(),
        &wire::service_name(&options.vm),
        config,
    )
    .context("cannot start the checkpoint link")?;
    let mut sender = Sender::new(SenderConfig {
        vm: options.vm.clone(),
        generation: options.generation,
        ram_bytes: ram.len() as u64,
    })?;
    let mut stats = Stats::new(Instant::now());
    // Pages harvested in an epoch that failed before it was sent: they go in the next.
    let mut carried = DirtySet::new();
    // Sent epochs and the NIC epoch each one's commit releases.
    let mut in_flight: VecDeque<(u64, u64)> = VecDeque::new();
    let mut full_copy_buffer = Vec::new();
    let mut last_stop = Instant::now();
    // The disks' current epoch while their secondaries buffer (the number of the next
    // checkpoint), and the highest epoch number ever given to them.
    let mut disk_epoch: Option<u64> = None;
    let mut disk_used: u64 = 0;

    'epochs: while !shared.release.load(Ordering::Relaxed) {
        // (Re)join the secondary.
        in_flight.clear();
        match sender.handshake(&session, WELCOME_TIMEOUT) {
            Ok(replica) => {
                info!(
                    "secondary at epoch {} (generation {}, full copy {})",
                    replica.committed_epoch, replica.generation, replica.full_copy_complete
                );
                if !output.held && replica.full_copy_complete {
                    daemons
                        .output_commit_on(output.nic_epoch)
                        .context("cannot hold the NICs' output")?;
                    output.held = true;
                    info!("the replica holds a complete copy: output held from now on");
                }
            }
            Err(SenderError::Fenced { ours, theirs }) => {
                return Err(anyhow!(
                    "the replica is at generation {theirs}, above ours ({ours}): another primary exists; stopping"
                ));
            }
            Err(error) => {
                shared.set_state("peer-lost", Some(format!("{error}")));
                std::thread::sleep(RETRY_INTERVAL);
                continue;
            }
        }
        if sender.needs_full_copy() {
            if !daemons.disks.is_empty() {
                // The disks' epochs start again with the first checkpoint after this copy
                // (writes before it are part of that checkpoint; the secondaries apply
                // what they still buffer). Their numbers never repeat.
                if disk_epoch.take().is_some() {
                    if let Err(error) = daemons.disk_epoch_off() {
                        warn!("cannot end the disks' epochs: {error}");
                    }
                }
                // Above every number the disks used, also by an engine before this one
                // whose last epochs never reached the replica.
                match daemons.disk_last_epoch() {
                    Ok(last) => disk_used = disk_used.max(last),
                    Err(error) => {
                        shared.set_state("waiting-for-disk", Some(error.to_string()));
                        std::thread::sleep(RETRY_INTERVAL);
                        continue;
                    }
                }
                sender.start_over(disk_used + 1);
                let first_checkpoint = sender.next_epoch() + 1;
                if let Err(error) = daemons.disk_epoch_on(first_checkpoint) {
                    shared.set_state("waiting-for-disk", Some(error.to_string()));
                    std::thread::sleep(RETRY_INTERVAL);
                    continue;
                }
                disk_epoch = Some(first_checkpoint);
                disk_used = disk_used.max(first_checkpoint);
            }
            shared.set_state("full-copy", None);
            let started = Instant::now();
            ram.copy_all(&mut full_copy_buffer);
            match sender.send_full(&session, &full_copy_buffer, &[]) {
                Ok(sent) => {
                    shared.update(|status| status.full_copies += 1);
                    info!(
                        "full copy sent as epoch {} ({} pages, {} bytes on the wire) in {:?}",
                        sent.epoch,
                        sent.pages,
                        sent.page_bytes_sent,
                        started.elapsed()
                    );
                    in_flight.push_back((sent.epoch, 0));
                }
                Err(error) => {
                    shared.set_state("peer-lost", Some(format!("full copy: {error}")));
                    continue;
                }
            }
        }
        // Epochs, until the secondary is lost or Level 3 released.
        while !shared.release.load(Ordering::Relaxed) {
            // Commits first: the full copy's, or the previous epoch's.
            if !collect_acks(
                &mut sender,
                &session,
                &mut in_flight,
                daemons,
                &mut stats,
                shared,
            )? {
                break;
            }
            let wait = options.interval.saturating_sub(last_stop.elapsed());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            last_stop = Instant::now();
            let epoch = sender.next_epoch();
            if disk_epoch.is_some_and(|disk| disk != epoch) {
                // Cannot happen: both count the checkpoints. If it did, the disks would
                // apply other writes than the checkpoint's: start over.
                warn!("the disks are at epoch {disk_epoch:?}, the checkpoint at {epoch}: starting over");
                disk_epoch = None;
                if let Err(error) = daemons.disk_epoch_off() {
                    warn!("cannot end the disks' epochs: {error}");
                }
                sender.start_over(disk_used + 1);
                break;
            }
            let mut harvested = std::mem::take(&mut carried);
            let ended = output.nic_epoch;
            // The first checkpoint of a fresh replica: holding starts in this stop (frames
            // sent before it are part of this checkpoint's state and went out).
            let start_holding = !output.held;
            let mut holding_started = false;
            let mut nic_epoch_ended = false;
            let mut disk_epoch_ended = false;
            // `handover`: this epoch is the last, and the guest stays stopped.
            let handover = shared.take_handover();
            if handover.is_some() {
                info!("handover asked: epoch {epoch} is the last one here");
                shared.set_state("handing-over", None);
            }
            let capture = if handover.is_some() {
                epoch::capture_final_device_state
            } else {
                epoch::capture_device_state
            };
            let captured = capture(qmp, || -> Result<Staged, HookError> {
                tracker.scan_into(ScanMode::Rearm, &mut harvested)?;
                daemons.harvest_into(&mut harvested)?;
                let staged = if start_holding {
                    daemons.output_commit_on(ended)?;
                    holding_started = true;
                    // Nothing of this checkpoint is held: its commit releases nothing.
                    stage(ram, &harvested, 0)
                } else {
                    let staged = stage(ram, &harvested, ended);
                    daemons.epoch_end(ended)?;
                    nic_epoch_ended = true;
                    staged
                };
                if disk_epoch.is_some() {
                    daemons.disk_epoch_end(epoch)?;
                    disk_epoch_ended = true;
                }
                Ok(staged)
            });
            if nic_epoch_ended {
                output.nic_epoch = ended + 1;
            }
            if holding_started {
                output.held = true;
            }
            if disk_epoch_ended {
                disk_epoch = Some(epoch + 1);
                disk_used = disk_used.max(epoch + 1);
            }
            // STOP and RESUME events are of no use here; keep the queue from overflowing.
            drop(qmp.take_events());
            let captured = match captured {
                Ok(captured) => captured,
                Err(error) => {
                    // (A failed capture resumed the guest.)
                    answer_handover(
                        handover,
                        Err(format!("the final checkpoint failed: {error}")),
                    );
                    // Whatever was harvested goes in the next epoch; a NIC epoch that
                    // ended waits for the next commit (`commit N` releases every epoch up
                    // to N).
                    carried = harvested;
                    shared.update(|status| status.failed_epochs += 1);
                    warn!("epoch {epoch} failed: {error}");
                    shared.set_state("protected", Some(format!("epoch {epoch} failed: {error}")));
                    if disk_epoch_ended {
                        // The disks ended an epoch no checkpoint will carry: their next
                        // epochs would be off by one from the checkpoints. Start over with
                        // a full copy (its number skips the one used).
                        disk_epoch = None;
                        if let Err(error) = daemons.disk_epoch_off() {
                            warn!("cannot end the disks' epochs: {error}");
                        }
                        sender.start_over(disk_used + 1);
                        break;
                    }
                    continue;
                }
            };
            let staged = captured.staged;
            let pages: Vec<(u64, &Page)> = staged
                .indices
                .iter()
                .zip(staged.bytes.chunks_exact(PAGE_BYTES))
                .filter_map(|(&index, bytes)| Some((index, <&Page>::try_from(bytes).ok()?)))
                .collect();
            match sender.send_incremental(&session, &pages, &captured.state) {
                Ok(sent) => {
                    in_flight.push_back((sent.epoch, staged.nic_epoch));
                    stats.taken(
                        Instant::now(),
                        sent.epoch,
                        EpochSample {
                            pause: captured.timings.total,
                            dirty_pages: sent.pages,
                            wire_bytes: sent.page_bytes_sent + sent.device_state_wire_bytes,
                            device_state_bytes: sent.device_state_bytes,
                            device_state_wire_bytes: sent.device_state_wire_bytes,
                        },
                    );
                }
                Err(error) => {
                    if handover.is_some() {
                        epoch::resume_stopped_guest(qmp);
                        answer_handover(
                            handover,
                            Err(format!("the final checkpoint was not sent: {error}")),
                        );
                    }
                    // The shadow no longer matches: a new handshake and a full copy. The
                    // frames of this NIC epoch wait for the next commit.
                    shared.set_state("peer-lost", Some(format!("epoch {epoch}: {error}")));
                    break;
                }
            }
            if let Some(handover) = handover {
                if finish_handover(
                    handover,
                    epoch,
                    qmp,
                    shared,
                    (&mut sender, &session, &mut in_flight),
                    (daemons, &mut stats, output),
                )? {
                    break 'epochs;
                }
                break;
            }
        }
    }
    if disk_epoch.is_some() {
        if let Err(error) = daemons.disk_epoch_off() {
            warn!("cannot end the disks' epochs: {error}");
        }
    }
    if let Err(error) = tracker.stop() {
        warn!("cannot end QEMU's RAM tracking: {error}");
    }
    session.close();
    Ok(())
}

/// Gives a `handover` its answer, if one waits.
fn answer_handover(
    handover: Option<mpsc::Sender<Result<u64, String>>>,
    result: Result<u64, String>,
) {
    if let Some(handover) = handover {
        if let Err(error) = &result {
            warn!("handover failed: {error}; the guest runs on here");
        }
        // Nobody waits any more: the caller gave up (and was told the VM runs on here).
        drop(handover.send(result));
    }
}

/// The final epoch of a `handover` was sent: waits for its commit (the NICs then release
/// every frame of the guest), answers, and leaves the guest stopped until the engine is
/// released or killed. `true` when handed over; `false` when the secondary did not commit
/// it or nobody waits for the answer any more: the guest runs on here and the epoch loop
/// starts over with a handshake.
fn finish_handover(
    handover: mpsc::Sender<Result<u64, String>>,
    epoch: u64,
    qmp: &mut Qmp,
    shared: &PrimaryShared,
    (sender, session, in_flight): (&mut Sender, &Session, &mut VecDeque<(u64, u64)>),
    (daemons, stats, output): (&Daemons, &mut Stats, &mut Output),
) -> anyhow::Result<bool> {
    let committed = collect_acks(sender, session, in_flight, daemons, stats, shared);
    if !matches!(committed, Ok(true)) {
        epoch::resume_stopped_guest(qmp);
        let why = match &committed {
            Err(error) => format!("{error:#}"),
            Ok(_) => "the secondary did not commit it".into(),
        };
        answer_handover(
            Some(handover),
            Err(format!("final checkpoint {epoch} not committed: {why}")),
        );
        return committed.map(|_| false);
    }
    // Every frame the guest sent is out (the stopped guest sends no more): the NICs stop
    // holding, so that a NIC daemon that stays on this host (a redundant uplink's standby)
    // does not hold the frames of a VM restored here later, with no engine to release them.
    match daemons.output_commit_off() {
        Ok(()) => output.held = false,
        Err(error) => {
            warn!("cannot end the NICs' output commit after the final checkpoint: {error}")
        }
    }
    // Frames for the guest that reach this host from now on (and those waiting in its TAPs
    // since the stop) go to the peer, which hands them to the guest once it runs there
    // (`vhost-net-ft`, `handover`). Before the answer: a guest that resumes here after it
    // (the move called off) does so after the relay started, and its NIC daemons end the
    // relay when its rings run again.
    daemons.nic_handover(true);
    if handover.send(Ok(epoch)).is_err() {
        warn!("final checkpoint {epoch} committed, but nobody waits for it any more: the guest runs on here");
        daemons.nic_handover(false);
        // Holding again before the guest runs: the replica is restorable.
        if !output.held {
            daemons
                .output_commit_on(output.nic_epoch)
                .context("cannot hold the NICs' output again")?;
            output.held = true;
        }
        epoch::resume_stopped_guest(qmp);
        return Ok(false);
    }
    info!("handed over at checkpoint {epoch}: the guest stays stopped here");
    shared.set_state("handed-over", None);
    while !shared.release.load(Ordering::Relaxed) {
        std::thread::sleep(RETRY_INTERVAL);
    }
    Ok(true)
}

/// Copies the pages of `dirty` out of the (stopped) guest's RAM.
fn stage(ram: &GuestRam, dirty: &DirtySet, nic_epoch: u64) -> Staged {
    let mut staged = Staged {
        indices: Vec::with_capacity(dirty.page_count() as usize),
        bytes: vec![0; dirty.page_count() as usize * PAGE_BYTES],
        nic_epoch,
    };
    let mut filled = 0;
    for (slot, offset) in staged.bytes.chunks_exact_mut(PAGE_BYTES).zip(dirty.pages()) {
        let index = offset / PAGE_BYTES as u64;
        let Ok(page) = <&mut Page>::try_from(slot) else {
            continue;
        };
        if ram.copy_page(index, page) {
            staged.indices.push(index);
            filled += 1;
        }
    }
    staged.bytes.truncate(filled * PAGE_BYTES);
    staged
}

/// Takes the acknowledgements of the epochs in flight (waiting for the oldest). Commits
/// release the NICs' frames. `false` when the secondary is lost (a new handshake follows).
fn collect_acks(
    sender: &mut Sender,
    session: &Session,
    in_flight: &mut VecDeque<(u64, u64)>,
    daemons: &Daemons,
    stats: &mut Stats,
    shared: &PrimaryShared,
) -> anyhow::Result<bool> {
    while !in_flight.is_empty() {
        if shared.release.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match sender.wait_ack(session, ACK_TIMEOUT) {
            Ok(Some(epoch)) => {
                let mut release = None;
                while in_flight.front().is_some_and(|&(sent, _)| sent <= epoch) {
                    if let Some((_, nic_epoch)) = in_flight.pop_front() {
                        if nic_epoch > 0 {
                            release = Some(nic_epoch);
                        }
                    }
                }
                stats.committed(Instant::now(), epoch);
                if let Some(nic_epoch) = release {
                    daemons.commit(nic_epoch)?;
                }
                let report = stats.report(Instant::now());
                shared.set_state("protected", None);
                shared.update(|status| status.stats = Some(report));
            }
            Ok(None) => {
                shared.set_state(
                    "peer-lost",
                    Some(format!("no acknowledgement within {ACK_TIMEOUT:?}")),
                );
                return Ok(false);
            }
            Err(SenderError::Refused { epoch, reason }) => {
                warn!("the secondary refused epoch {epoch}: {reason:?}");
                shared.set_state(
                    "peer-lost",
                    Some(format!("epoch {epoch} refused: {reason:?}")),
                );
                return Ok(false);
            }
            Err(error) => {
                shared.set_state("peer-lost", Some(format!("{error}")));
                return Ok(false);
            }
        }
    }
    Ok(true)
}
