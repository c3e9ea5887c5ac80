//! The secondary's engine: keeps the replica (RAM file and committed record) up to date
//! from the primary's checkpoint stream, and restores the VM from it when told to
//! (`restore QMP_SOCKET` on the control socket, after `ftvmd` or the operator started a
//! QEMU with `-incoming defer` on the replica RAM file).
//!
//! One thread serves the sessions (one at a time: a new session of the same primary
//! replaces the old one); the control socket's thread hands it `freeze` and `restore`.
//! Either freezes the replica for good first (no epoch is taken after it), so the epoch
//! `freeze` names is the one the disks are promoted at and the one restored.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::Context;
use log::{info, warn};
use replication_link::{KeyRing, LinkConfig, LinkListener, ListenerEvent, Session};
use serde::Serialize;

use super::daemons::SecondaryDisks;
use crate::epoch;
use crate::qmp::Qmp;
use crate::replica::{Replica, ReplicaConfig};
use crate::secondary::{EpochHooks, Secondary, ServeEnd};
use crate::wire;

/// How long a restore's QMP commands may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the serving thread looks for a restore request between sessions.
const POLL: Duration = Duration::from_millis(10);

/// What the secondary's engine needs (see `ftvm-checkpoint secondary --help`).
#[derive(Debug, Clone)]
pub struct SecondaryOptions {
    pub vm: String,
    pub ram: PathBuf,
    pub ram_bytes: u64,
    pub state_dir: PathBuf,
    pub listen: Vec<SocketAddr>,
    pub psk_file: PathBuf,
    pub host_id: String,
    /// The primary host's id: the only client the listener admits (`None`: any that
    /// authenticates with the pair key).
    pub peer_id: Option<String>,
    /// This host's disk daemons (secondaries): a checkpoint commits only once each sealed
    /// its epoch, and each applies the epoch's writes when it commits.
    pub disks: Vec<PathBuf>,
}

/// What `status` shows of the secondary.
#[derive(Debug, Clone, Serialize)]
pub struct SecondaryStatus {
    pub role: &'static str,
    pub vm: String,
    /// `waiting` (no primary), `replicating`, `restoring`, `restored`.
    pub state: String,
    pub generation: u64,
    pub committed_epoch: u64,
    /// The replica holds a complete copy and a committed device state.
    pub restorable: bool,
    pub epochs_applied: u64,
    /// Milliseconds since the last epoch was applied (`null` before the first).
    pub since_last_epoch_ms: Option<u64>,
    pub problem: Option<String>,
}

/// What the control socket asks of the serving thread.
#[derive(Debug)]
pub enum Request {
    /// Stop taking epochs for good (the primary is lost): the replica stays at its last
    /// committed checkpoint, which the answer names (the epoch to promote the disks at).
    Freeze,
    /// Freeze, then restore into the QEMU behind this QMP socket.
    Restore(PathBuf),
    /// Freeze and make the replica durably not restorable (its primary stopped taking
    /// checkpoints: the VM runs on without them, so none of its checkpoints may ever be
    /// restored). The record keeps its epoch, so that later epochs of this VM's disks still
    /// number above every one used.
    Drop,
}

type Reply = mpsc::Sender<Result<serde_json::Value, String>>;

/// Shared with the control socket.
#[derive(Debug)]
pub struct SecondaryShared {
    status: Mutex<SecondaryStatus>,
    last_epoch_at: Mutex<Option<Instant>>,
    /// Set to make the serving loop return to the main loop (a restore is waiting).
    stop_serving: AtomicBool,
    /// The session being served, interrupted with `stop_serving` so that the serving loop
    /// sees it at once, not after its receive timeout (a move's freeze waits for it).
    serving: Mutex<Weak<Session>>,
    requests: Mutex<Option<mpsc::Sender<(Request, Reply)>>>,
    /// The serving thread's end of `requests`, taken by [`run`]: a request made before it
    /// started (the control socket answers from the start) waits for it.
    incoming: Mutex<Option<mpsc::Receiver<(Request, Reply)>>>,
}

impl SecondaryShared {
    pub fn status(&self) -> SecondaryStatus {
        let mut status = daemon_util::lock(&self.status).clone();
        status.since_last_epoch_ms =
            daemon_util::lock(&self.last_epoch_at).map(|at| at.elapsed().as_millis() as u64);
        status
    }

    /// Hands `request` to the serving thread and waits for its outcome.
    pub fn ask(&self, request: Request) -> Result<serde_json::Value, String> {
        let (reply, answer) = mpsc::channel();
        let sent = daemon_util::lock(&self.requests)
            .as_ref()
            .map(|requests| requests.send((request, reply)));
        if !matches!(sent, Some(Ok(()))) {
            return Err("the engine is not serving a replica".into());
        }
        self.stop_serving.store(true, Ordering::Relaxed);
        if let Some(session) = daemon_util::lock(&self.serving).upgrade() {
            session.interrupt();
        }
        answer
            .recv()
            .unwrap_or_else(|_| Err("the engine ended before it answered".into()))
    }

    fn update(&self, change: impl FnOnce(&mut SecondaryStatus)) {
        change(&mut daemon_util::lock(&self.status));
    }
}

/// How many times a checkpoint asks each disk daemon whether its epoch is sealed (each
/// waits up to the daemon's longest wait, 1 s) before the checkpoint is refused.
const SEAL_ATTEMPTS: u32 = 3;

/// Joins each checkpoint with this host's disks and keeps the shared status current.
struct Hooks {
    shared: Arc<SecondaryShared>,
    disks: SecondaryDisks,
}

impl EpochHooks for Hooks {
    fn before_apply(&mut self, epoch: u64) -> Result<(), String> {
        self.disks
            .wait_sealed(epoch, SEAL_ATTEMPTS)
            .map_err(|error| format!("the disks have not sealed epoch {epoch}: {error}"))
    }

    fn committed(&mut self, epoch: u64, replica: &Replica) {
        if let Err(error) = self.disks.commit(epoch) {
            // The epoch stays sealed in the disk's journal: applied at the next commit or
            // at promotion (`promote GEN N*`).
            warn!("checkpoint {epoch} committed, but a disk did not take the commit: {error}");
        }
        *daemon_util::lock(&self.shared.last_epoch_at) = Some(Instant::now());
        let (generation, restorable) = (replica.committed().generation, replica.restorable());
        self.shared.update(|status| {
            status.committed_epoch = epoch;
            status.epochs_applied += 1;
            status.generation = generation;
            status.restorable = restorable;
        });
    }
}

/// Opens the replica and prepares the shared status.
pub fn open(options: &SecondaryOptions) -> anyhow::Result<(Replica, Arc<SecondaryShared>)> {
    std::fs::create_dir_all(&options.state_dir)
        .with_context(|| format!("cannot create {}", options.state_dir.display()))?;
    let replica = Replica::open(ReplicaConfig {
        vm: options.vm.clone(),
        ram_bytes: options.ram_bytes,
        ram_path: options.ram.clone(),
        record_path: options.state_dir.join("replica.record"),
    })
    .with_context(|| format!("cannot open the replica of {}", options.vm))?;
    let committed = replica.committed();
    let (requests, incoming) = mpsc::channel();
    let shared = Arc::new(SecondaryShared {
        status: Mutex::new(SecondaryStatus {
            role: "secondary",
            vm: options.vm.clone(),
            state: "waiting".into(),
            generation: committed.generation,
            committed_epoch: committed.epoch,
            restorable: replica.restorable(),
            epochs_applied: 0,
            since_last_epoch_ms: None,
            problem: None,
        }),
        last_epoch_at: Mutex::new(None),
        stop_serving: AtomicBool::new(false),
        serving: Mutex::new(Weak::new()),
        requests: Mutex::new(Some(requests)),
        incoming: Mutex::new(Some(incoming)),
    });
    Ok((replica, shared))
}

/// Serves the primary's sessions until a restore ends the replica's role (`Ok(true)`) or
/// `quit` is set (`Ok(false)`).
pub fn run(
    options: &SecondaryOptions,
    replica: Replica,
    shared: &Arc<SecondaryShared>,
    quit: &AtomicBool,
) -> anyhow::Result<bool> {
    // Taken first: if starting fails, the requests waiting are answered with an error.
    let requests = daemon_util::lock(&shared.incoming)
        .take()
        .context("the secondary engine serves its replica once")?;
    // The pair's key and, while it exists, the previous one (key rotation).
    let keys = KeyRing::from_file(&options.psk_file)
        .with_context(|| format!("cannot read the pair key {}", options.psk_file.display()))?;
    let mut config = LinkConfig::new(keys, options.host_id.clone());
    config.allowed_services = Some(vec![wire::service_name(&options.vm)]);
    config.allowed_clients = options.peer_id.clone().map(|peer| vec![peer]);
    let listener = LinkListener::bind(options.listen.clone(), config)
        .context("cannot listen for the primary's checkpoint stream")?;
    let mut secondary = Secondary::with_hooks(
        replica,
        Box::new(Hooks {
            shared: Arc::clone(shared),
            disks: SecondaryDisks {
                disks: options.disks.clone(),
            },
        }),
    );
    let mut session = None;
    let mut frozen = false;
    loop {
        if quit.load(Ordering::Relaxed) {
            listener.close();
            return Ok(false);
        }
        // Frozen, the thread only waits for the next request (a restore after the freeze).
        let request = if frozen {
            requests.recv_timeout(POLL).ok()
        } else {
            requests.try_recv().ok()
        };
        if let Some((request, reply)) = request {
            if !frozen {
                // No epoch may change the replica from here on.
                listener.close();
                drop(session.take());
                frozen = true;
                shared.update(|status| status.state = "frozen".into());
            }
            let outcome = match request {
                Request::Freeze => Ok(frozen_answer(secondary.replica())),
                Request::Restore(qmp) => restore(&mut secondary, shared, &qmp),
                Request::Drop => match secondary.take_for_restore() {
                    Ok(_) => {
                        info!("replica dropped: no longer restorable");
                        shared.update(|status| {
                            status.state = "dropped".into();
                            status.restorable = false;
                        });
                        Ok(serde_json::json!({"ok": true, "restorable": false}))
                    }
                    Err(error) => Err(format!("cannot drop the replica: {error}")),
                },
            };
            let restored = outcome
                .as_ref()
                .is_ok_and(|answer| answer["restored"] == true);
            let _ = reply.send(outcome);
            if restored {
                return Ok(true);
            }
            continue;
        }
        if frozen {
            continue;
        }
        match listener.next_event(POLL) {
            Some(ListenerEvent::NewSession(new))
            | Some(ListenerEvent::PeerRestarted { session: new, .. }) => {
                info!("primary connected (session {:032x})", new.session_id());
                let new = Arc::new(new);
                *daemon_util::lock(&shared.serving) = Arc::downgrade(&new);
                session = Some(new);
            }
            None => {}
        }
        let Some(current) = &session else { continue };
        shared.update(|status| status.state = "replicating".into());
        match secondary.serve(current, &shared.stop_serving) {
            Ok(ServeEnd::Closed(reason)) => {
                info!("the primary's session ended: {reason}");
                session = None;
                shared.update(|status| status.state = "waiting".into());
            }
            Ok(ServeEnd::Stopped) => {}
            Err(error) => {
                warn!("checkpoint session failed: {error}");
                session = None;
                shared.update(|status| {
                    status.state = "waiting".into();
                    status.problem = Some(error.to_string());
                });
            }
        }
        let committed = secondary.replica().committed();
        let restorable = secondary.replica().restorable();
        shared.update(|status| {
            status.generation = committed.generation;
            status.committed_epoch = committed.epoch;
            status.restorable = restorable;
        });
    }
}

/// Restores the VM from the replica into the QEMU behind `qmp` (started with `-incoming
/// defer` on the replica RAM file).
fn restore(
    secondary: &mut Secondary,
    shared: &SecondaryShared,
    qmp: &std::path::Path,
) -> Result<serde_json::Value, String> {
    let committed = secondary.replica().committed();
    let state = match secondary.take_for_restore() {
        Ok(Some(state)) => state,
        Ok(None) => {
            return Err(format!(
                "the replica is not restorable (epoch {}, full copy {}): it never completed a full copy and a checkpoint",
                committed.epoch, committed.full_copy_complete
            ))
        }
        Err(error) => return Err(format!("cannot hand the replica to the restore: {error}")),
    };
    shared.update(|status| status.state = "restoring".into());
    let started = Instant::now();
    let result = Qmp::connect(qmp, QMP_TIMEOUT)
        .map_err(|error| format!("cannot reach QEMU at {}: {error}", qmp.display()))
        .and_then(|mut qmp| {
            epoch::restore(&mut qmp, &state).map_err(|error| format!("restore failed: {error}"))
        });
    match result {
        Ok(timings) => {
            info!(
                "restored epoch {} of generation {} in {:?}",
                committed.epoch,
                committed.generation,
                started.elapsed()
            );
            shared.update(|status| status.state = "restored".into());
            Ok(serde_json::json!({
                "ok": true,
                "restored": true,
                "epoch": committed.epoch,
                "generation": committed.generation,
                "incoming_ms": timings.incoming.as_secs_f64() * 1000.0,
                "cont_ms": timings.cont.as_secs_f64() * 1000.0,
                "total_ms": timings.total.as_secs_f64() * 1000.0,
            }))
        }
        Err(error) => {
            shared.update(|status| {
                status.state = "frozen".into();
                status.problem = Some(error.clone());
            });
            Err(error)
        }
    }
}

/// The answer to `freeze`: the checkpoint the replica holds.
fn frozen_answer(replica: &Replica) -> serde_json::Value {
    let committed = replica.committed();
    serde_json::json!({
        "ok": true,
        "epoch": committed.epoch,
        "generation": committed.generation,
        "restorable": replica.restorable(),
    })
}
