//! The device-state half of a checkpoint: CPU and device state of a running guest without
//! its RAM, taken over QMP while the guest is stopped ([`capture_device_state`]), and put
//! back into a fresh QEMU started with `-incoming defer` on the replica RAM file
//! ([`restore`]). Guest RAM is a shared file (`memory-backend-file,…,share=on`), so the
//! migration capability `x-ignore-shared` leaves it out of the stream; the engine copies
//! the dirty pages itself, in the hook [`capture_device_state`] runs while QEMU is stopped.
//!
//! One epoch (`docs/LEVEL3.md`, "The epoch"):
//!
//! 1. before `stop`: a pipe; its write end goes to QEMU with `getfd ftvm-state`; a thread
//!    reads the read end to EOF;
//! 2. `stop`;
//! 3. the hook (harvest and re-arm the dirty-page trackers, stage the pages);
//! 4. `migrate fd:ftvm-state` (capabilities `x-ignore-shared` and `events`, set once per
//!    session, before the first `stop`);
//! 5. wait for the `MIGRATION` event `completed`, then poll `query-status` until
//!    `postmigrate`: QEMU 7.2 reports `completed` (event and `query-migrate`) before it
//!    leaves `finish-migrate`, and a `cont` in between fails with "Migration is not
//!    finalized yet";
//! 6. `cont`; the pause is from `stop` to `cont`'s reply. The reader's EOF comes after
//!    `cont` (QEMU closes the fd in a bottom half after `postmigrate`); every byte was in the
//!    pipe before `completed`, so waiting for it costs no pause.
//!
//! A failure after `stop` resumes the guest when it can (`cont` once QEMU left
//! `finish-migrate`) and returns the error: that epoch is no checkpoint, the guest's output
//! of it stays held by the output commit, and the engine decides what comes next.
//!
//! # Measured
//!
//! QEMU 7.2.22 under TCG, a 256 MiB RAM file in `/dev/shm`, two cores shared with other
//! builds and tests (load average 3–10: the tails below are the machine's, they move
//! between runs and rows). `PAUSE`, `PAIRS`, `RESTORE` and `RACE` lines of
//! `cargo test [--release] -p ftvm-tests --test l3_checkpoint_qmp -- --nocapture
//! --test-threads 1`; 120 epochs per guest; the pause is `stop` sent to `cont`'s reply,
//! epochs whose hook copied the whole RAM left out.
//!
//! Release build (engine and `vhost-blk-mirror` optimised), ms (medians in the last three
//! columns); two runs without a disk, four with one:
//!
//! | guest | pause median | p99 | max | `stop` | `migrate` → `postmigrate` | `cont` |
//! |---|---|---|---|---|---|---|
//! | counter, no disk | 4.9–5.5 | 115–281 | 176–307 | 0.26–0.36 | 2.7 | 0.74–1.00 |
//! | counter + flushed writes, vhost-user disk | 4.7–5.7 | 15–145 | 18–469 | 0.30–0.37 | 2.5–2.9 | 0.9–1.9 |
//!
//! The vhost-user disk's cost, measured in pairs (two counter guests checkpointed in turn,
//! one with an idle vhost-user disk, so both see the same load;
//! `pause_cost_of_a_vhost_user_disk_in_paired_epochs`), six release runs: pause median
//! 3.9–5.7 ms without, 4.9–7.5 ms with the disk; median difference per pair +0.76 to
//! +1.53 ms: `stop` (`SET_VRING_ENABLE(0)`, `GET_VRING_BASE`) +0.18–0.37 ms, `cont` (the
//! ring set-up messages) +0.11–0.57 ms, and the migration +0.28–0.61 ms (the device's
//! section: 365,566 bytes of state against 319,747). On the quietest run p99/max were
//! 10.6/15.9 ms without and 29.9/53.3 ms with the disk. In the debug build (the suite's
//! default, daemon unoptimised) the difference is +2.1 to +3.3 ms (stop +0.7–0.8, migrate
//! +0.4–1.0, cont +0.8–1.3), and over nine debug runs the pause median is 5.8–9.0 ms
//! without a disk and 6.2–8.3 ms with a busy one. The disk served a flushed write between
//! every two of the 120 epochs and after the restore (the daemon drains at
//! `GET_VRING_BASE`). (Four paired and two busy-disk release runs used a daemon built
//! earlier that day, before others' changes in progress; the figures did not move with it.)
//!
//! The race: the `MIGRATION` `completed` event came while QEMU was still `finish-migrate`
//! in 19–51 of 120 epochs; [`capture_device_state`] then saw `finish-migrate` in 1 to 14
//! more `query-status` answers (100 µs apart) before `postmigrate`. A `cont` sent right
//! after the event was refused with `GenericError` "Migration is not finalized yet" in 2–11
//! of 40 tries per run (`a_cont_right_after_the_completed_event_can_be_refused`).
//!
//! Restore: `migrate-incoming fd:NAME` with a pipe's read end passed by `getfd` works in
//! QEMU 7.2 (the incoming side resolves `NAME` among the monitor's descriptors like the
//! outgoing one; no file, no `exec:`). QEMU start to QMP ready 53–594 ms (load),
//! `migrate-incoming` to `completed` 2.1–25 ms, `cont` 0.1–15 ms, first counter line
//! 0.2–1.1 s after QEMU's start; the counter went on from the checkpoint (123 seen at the
//! checkpoint, 124 first after the restore) and the guest's uptime with it.

use std::error::Error as StdError;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use log::warn;
use thiserror::Error;

use crate::qmp::{Event, Qmp, QmpError};

/// The name QEMU knows the device-state pipe's write end by.
pub const STATE_FD_NAME: &str = "ftvm-state";
/// The name QEMU knows the restore pipe's read end by.
pub const RESTORE_FD_NAME: &str = "ftvm-restore";
/// Largest device state accepted (QEMU 7.2 sends 320–370 KB here, mostly firmware blobs).
pub const MAX_STATE_BYTES: usize = 64 << 20;
/// How long a device-state migration (or a restore) may take.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between two `query-status` while QEMU finishes a migration.
const STATUS_POLL_INTERVAL: Duration = Duration::from_micros(100);
/// How long a failed epoch waits for QEMU to leave `finish-migrate` before `cont`.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// The first bytes of QEMU's migration stream (`QEMU_VM_FILE_MAGIC`).
const STREAM_MAGIC: &[u8; 4] = b"QEVM";

/// Something done while the guest is stopped failed, for [`EpochError::WhileStopped`].
pub type HookError = Box<dyn StdError + Send + Sync + 'static>;

#[derive(Debug, Error)]
pub enum EpochError {
    #[error("QMP failed at {step}")]
    Qmp {
        step: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("cannot set up the device-state pipe")]
    Pipe(#[source] io::Error),
    #[error("the work done while the guest was stopped failed")]
    WhileStopped(#[source] HookError),
    #[error("the device-state migration failed: {desc}")]
    MigrationFailed { desc: String },
    #[error("QEMU did not {what} within {timeout_ms} ms")]
    Timeout {
        what: &'static str,
        timeout_ms: u128,
    },
    #[error("QEMU went to run state {status} while {during}")]
    UnexpectedStatus {
        status: String,
        during: &'static str,
    },
    #[error("device state larger than {limit} bytes")]
    StateTooLarge { limit: usize },
    #[error("the device state is not a QEMU migration stream")]
    NotDeviceState,
    #[error("reading the device state from QEMU failed")]
    StateRead(#[source] io::Error),
    #[error("writing the device state to QEMU failed")]
    StateWrite(#[source] io::Error),
    #[error("the device-state {role} thread ended without an answer")]
    ThreadLost { role: &'static str },
    #[error("QEMU is {status}, not waiting for an incoming migration (-incoming defer)")]
    NotIncoming { status: String },
}

impl EpochError {
    fn qmp(step: &'static str) -> impl FnOnce(QmpError) -> EpochError {
        move |source| EpochError::Qmp { step, source }
    }
}

/// Where one epoch's pause went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PauseTimings {
    /// `stop` sent to its reply.
    pub stop: Duration,
    /// The hook.
    pub while_stopped: Duration,
    /// `migrate` sent to `postmigrate`.
    pub migrate: Duration,
    /// `cont` sent to its reply.
    pub cont: Duration,
    /// `stop` sent to `cont`'s reply: the guest's pause.
    pub total: Duration,
    /// `query-status` answers of `finish-migrate` after the `completed` event: the window
    /// in which a `cont` would have been refused.
    pub finish_migrate_polls: u32,
}

impl PauseTimings {
    /// The pause without the hook: what QEMU's stop, migration and restart cost.
    pub fn qemu_only(&self) -> Duration {
        self.total.saturating_sub(self.while_stopped)
    }
}

/// One epoch's device state and what the hook staged.
#[derive(Debug)]
pub struct Captured<T> {
    /// QEMU's migration stream without RAM.
    pub state: Vec<u8>,
    pub timings: PauseTimings,
    /// The hook's result.
    pub staged: T,
}

/// Where a restore's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreTimings {
    /// `migrate-incoming` sent to the `completed` event (QEMU `paused`).
    pub incoming: Duration,
    /// `cont` sent to its reply.
    pub cont: Duration,
    /// From the first command of the restore to the guest running.
    pub total: Duration,
}

/// Sets the migration capabilities the device-state stream needs (`x-ignore-shared`: RAM
/// in a shared backend stays out of it; `events`: `MIGRATION` events), unless this session
/// set them already. No migration may be running.
pub fn set_device_state_capabilities(qmp: &mut Qmp) -> Result<(), EpochError> {
    if qmp.capability("x-ignore-shared") == Some(true) && qmp.capability("events") == Some(true) {
        return Ok(());
    }
    qmp.migrate_set_capabilities(&[("x-ignore-shared", true), ("events", true)])
        .map_err(EpochError::qmp("migrate-set-capabilities"))
}

/// Takes the device state of the running guest behind `qmp`: stops it, runs
/// `while_stopped`, migrates the device state (no RAM) into a pipe, resumes it. Returns the
/// state, the pause's timings and the hook's result. See the module documentation for the
/// steps and what a failure leaves behind.
pub fn capture_device_state<T, E, F>(
    qmp: &mut Qmp,
    while_stopped: F,
) -> Result<Captured<T>, EpochError>
where
    F: FnOnce() -> Result<T, E>,
    E: Into<HookError>,
{
    capture(qmp, true, while_stopped)
}

/// [`capture_device_state`] for the last checkpoint before the VM moves to the peer (`ftvm
/// migrate`): the guest stays stopped (QEMU `postmigrate`; `timings.cont` is zero), so that
/// the checkpoint is the guest's final state here. A failure resumes it, as for any epoch;
/// after a success [`resume_stopped_guest`] brings it back if the move is called off.
pub fn capture_final_device_state<T, E, F>(
    qmp: &mut Qmp,
    while_stopped: F,
) -> Result<Captured<T>, EpochError>
where
    F: FnOnce() -> Result<T, E>,
    E: Into<HookError>,
{
    capture(qmp, false, while_stopped)
}

fn capture<T, E, F>(
    qmp: &mut Qmp,
    resume: bool,
    while_stopped: F,
) -> Result<Captured<T>, EpochError>
where
    F: FnOnce() -> Result<T, E>,
    E: Into<HookError>,
{
    set_device_state_capabilities(qmp)?;
    drop(qmp.take_events_matching(|event| event.name == "MIGRATION"));
    let (reader, writer) = io::pipe().map_err(EpochError::Pipe)?;
    qmp.getfd(STATE_FD_NAME, writer.as_fd())
        .map_err(EpochError::qmp("getfd"))?;
    drop(writer);
    let collector = match StateReader::spawn(reader) {
        Ok(collector) => collector,
        Err(error) => {
            forget_fd(qmp, STATE_FD_NAME);
            return Err(error);
        }
    };

    let started = Instant::now();
    if let Err(source) = qmp.stop() {
        forget_fd(qmp, STATE_FD_NAME);
        return Err(EpochError::Qmp {
            step: "stop",
            source,
        });
    }
    let stopped = Instant::now();
    let staged = match while_stopped() {
        Ok(staged) => staged,
        Err(error) => {
            forget_fd(qmp, STATE_FD_NAME);
            resume_after_failure(qmp);
            return Err(EpochError::WhileStopped(error.into()));
        }
    };
    let hooked = Instant::now();
    let finish_migrate_polls = match migrate_device_state(qmp) {
        Ok(polls) => polls,
        Err(error) => {
            cancel_migration(qmp);
            forget_fd(qmp, STATE_FD_NAME);
            resume_after_failure(qmp);
            return Err(error);
        }
    };
    let migrated = Instant::now();
    if resume {
        qmp.cont().map_err(EpochError::qmp("cont"))?;
    }
    let resumed = Instant::now();

    let state = collector.finish(MIGRATION_TIMEOUT)?;
    if !state.starts_with(STREAM_MAGIC) {
        return Err(EpochError::NotDeviceState);
    }
    Ok(Captured {
        state,
        timings: PauseTimings {
            stop: stopped - started,
            while_stopped: hooked - stopped,
            migrate: migrated - hooked,
            cont: resumed - migrated,
            total: resumed - started,
            finish_migrate_polls,
        },
        staged,
    })
}

/// `migrate fd:ftvm-state` on a stopped guest, until QEMU is `postmigrate`. Returns how
/// often QEMU still said `finish-migrate` after reporting `completed`.
fn migrate_device_state(qmp: &mut Qmp) -> Result<u32, EpochError> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    qmp.migrate(&format!("fd:{STATE_FD_NAME}"))
        .map_err(EpochError::qmp("migrate"))?;
    wait_migration_end(qmp, deadline)?;
    let mut finish_migrate_polls = 0;
    loop {
        let status = qmp
            .query_status()
            .map_err(EpochError::qmp("query-status after migrate"))?;
        match status.as_str() {
            "postmigrate" => return Ok(finish_migrate_polls),
            "finish-migrate" => finish_migrate_polls += 1,
            _ => {
                return Err(EpochError::UnexpectedStatus {
                    status,
                    during: "finishing the device-state migration",
                })
            }
        }
        if Instant::now() >= deadline {
            return Err(EpochError::Timeout {
                what: "leave finish-migrate",
                timeout_ms: MIGRATION_TIMEOUT.as_millis(),
            });
        }
        std::thread::sleep(STATUS_POLL_INTERVAL);
    }
}

/// Waits for the `MIGRATION` event that ends the current migration; `completed` is `Ok`.
fn wait_migration_end(qmp: &mut Qmp, deadline: Instant) -> Result<(), EpochError> {
    let is_end = |event: &Event| {
        matches!(
            event.migration_status(),
            Some("completed" | "failed" | "cancelled")
        )
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    let event = qmp
        .wait_event(remaining, is_end)
        .map_err(EpochError::qmp("waiting for the MIGRATION event"))?;
    match event.as_ref().and_then(Event::migration_status) {
        Some("completed") => Ok(()),
        Some(_) => {
            let desc = match qmp.query_migrate() {
                Ok(info) => info
                    .error_desc
                    .unwrap_or_else(|| info.status.unwrap_or_default()),
                Err(error) => format!("query-migrate failed too: {error}"),
            };
            Err(EpochError::MigrationFailed { desc })
        }
        None => Err(EpochError::Timeout {
            what: "complete the migration",
            timeout_ms: MIGRATION_TIMEOUT.as_millis(),
        }),
    }
}

/// Brings a guest that [`capture_final_device_state`] left stopped back to running (the
/// move to the peer was called off).
pub fn resume_stopped_guest(qmp: &mut Qmp) {
    resume_after_failure(qmp);
}

/// Brings a guest that a failed epoch left stopped back to running, as far as QEMU lets it:
/// waits out `finish-migrate`, then `cont`. Failures are logged only (the epoch's error is
/// what the caller gets).
fn resume_after_failure(qmp: &mut Qmp) {
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    loop {
        match qmp.query_status() {
            Ok(status) if status == "running" => return,
            Ok(status) if status == "finish-migrate" && Instant::now() < deadline => {
                std::thread::sleep(STATUS_POLL_INTERVAL);
            }
            Ok(_) => break,
            Err(error) => {
                warn!("cannot resume the guest after a failed epoch: {error}");
                return;
            }
        }
    }
    if let Err(error) = qmp.cont() {
        warn!("cannot resume the guest after a failed epoch: {error}");
    }
}

/// Cancels a migration that failed on our side (a timeout) so that QEMU leaves
/// `finish-migrate`; a no-op when none runs. Failures are logged only.
fn cancel_migration(qmp: &mut Qmp) {
    if let Err(error) = qmp.execute("migrate_cancel", None) {
        warn!("cannot cancel the device-state migration: {error}");
    }
}

/// Closes QEMU's copy of a descriptor no migration took, so the thread on the other end of
/// its pipe sees EOF. Failures are logged only.
fn forget_fd(qmp: &mut Qmp, name: &str) {
    match qmp.closefd(name) {
        Ok(()) => {}
        // The migration took it (and closes it itself).
        Err(QmpError::Command { .. }) => {}
        Err(error) => warn!("cannot close QEMU's descriptor {name}: {error}"),
    }
}

/// A thread reading the device-state pipe to EOF.
struct StateReader {
    result: mpsc::Receiver<Result<Vec<u8>, EpochError>>,
}

impl StateReader {
    fn spawn(pipe: io::PipeReader) -> Result<StateReader, EpochError> {
        let (sender, result) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("ftvm-state-reader".into())
            .spawn(move || {
                let _ = sender.send(read_state(pipe));
            })
            .map_err(EpochError::Pipe)?;
        Ok(StateReader { result })
    }

    fn finish(self, timeout: Duration) -> Result<Vec<u8>, EpochError> {
        match self.result.recv_timeout(timeout) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(EpochError::Timeout {
                what: "close the device-state pipe",
                timeout_ms: timeout.as_millis(),
            }),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(EpochError::ThreadLost { role: "reader" })
            }
        }
    }
}

/// Reads `pipe` to EOF, at most [`MAX_STATE_BYTES`]; the rest of a larger stream is read
/// and dropped so that QEMU's migration ends instead of blocking on a full pipe.
fn read_state(mut pipe: io::PipeReader) -> Result<Vec<u8>, EpochError> {
    let mut state = Vec::with_capacity(1 << 20);
    let limit = MAX_STATE_BYTES as u64 + 1;
    (&mut pipe)
        .take(limit)
        .read_to_end(&mut state)
        .map_err(EpochError::StateRead)?;
    if state.len() > MAX_STATE_BYTES {
        io::copy(&mut pipe, &mut io::sink()).map_err(EpochError::StateRead)?;
        return Err(EpochError::StateTooLarge {
            limit: MAX_STATE_BYTES,
        });
    }
    Ok(state)
}

/// Puts a device state taken by [`capture_device_state`] into the QEMU behind `qmp`, which
/// was started with `-incoming defer` on the replica RAM file (same machine arguments as
/// the original), and resumes the guest. The state goes through a pipe whose read end QEMU
/// gets with `getfd` (`migrate-incoming fd:ftvm-restore`). A failed incoming migration ends
/// QEMU 7.2 (it exits), which shows as a QMP error here.
pub fn restore(qmp: &mut Qmp, state: &[u8]) -> Result<RestoreTimings, EpochError> {
    let started = Instant::now();
    let status = qmp
        .query_status()
        .map_err(EpochError::qmp("query-status before restore"))?;
    if status != "inmigrate" {
        return Err(EpochError::NotIncoming { status });
    }
    set_device_state_capabilities(qmp)?;
    drop(qmp.take_events_matching(|event| event.name == "MIGRATION"));
    let (reader, writer) = io::pipe().map_err(EpochError::Pipe)?;
    qmp.getfd(RESTORE_FD_NAME, reader.as_fd())
        .map_err(EpochError::qmp("getfd"))?;
    drop(reader);
    let feeder = match StateWriter::spawn(writer, state.to_vec()) {
        Ok(feeder) => feeder,
        Err(error) => {
            forget_fd(qmp, RESTORE_FD_NAME);
            return Err(error);
        }
    };

    let incoming_started = Instant::now();
    let deadline = incoming_started + MIGRATION_TIMEOUT;
    if let Err(source) = qmp.migrate_incoming(&format!("fd:{RESTORE_FD_NAME}")) {
        forget_fd(qmp, RESTORE_FD_NAME);
        return Err(EpochError::Qmp {
            step: "migrate-incoming",
            source,
        });
    }
    wait_migration_end(qmp, deadline)?;
    let incoming = incoming_started.elapsed();
    feeder.finish(MIGRATION_TIMEOUT)?;
    let status = qmp
        .query_status()
        .map_err(EpochError::qmp("query-status after migrate-incoming"))?;
    let cont_started = Instant::now();
    match status.as_str() {
        "paused" => qmp.cont().map_err(EpochError::qmp("cont"))?,
        // A state taken from a running guest starts by itself.
        "running" => {}
        _ => {
            return Err(EpochError::UnexpectedStatus {
                status,
                during: "restoring the device state",
            })
        }
    }
    let resumed = Instant::now();
    Ok(RestoreTimings {
        incoming,
        cont: resumed - cont_started,
        total: resumed - started,
    })
}

/// A thread writing the device state into the restore pipe, then closing it.
struct StateWriter {
    result: mpsc::Receiver<io::Result<()>>,
}

impl StateWriter {
    fn spawn(mut pipe: io::PipeWriter, state: Vec<u8>) -> Result<StateWriter, EpochError> {
        let (sender, result) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("ftvm-state-writer".into())
            .spawn(move || {
                let written = pipe.write_all(&state);
                drop(pipe);
                let _ = sender.send(written);
            })
            .map_err(EpochError::Pipe)?;
        Ok(StateWriter { result })
    }

    fn finish(self, timeout: Duration) -> Result<(), EpochError> {
        match self.result.recv_timeout(timeout) {
            Ok(written) => written.map_err(EpochError::StateWrite),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(EpochError::Timeout {
                what: "read the whole device state",
                timeout_ms: timeout.as_millis(),
            }),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(EpochError::ThreadLost { role: "writer" })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};
    use std::fs::File;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};

    use serde_json::{json, Value};

    use super::*;
    use crate::qmp::tests::receive_with_fd;

    const STATE: &[u8] = b"QEVM\0\0\0\x03a fake device state";

    /// A QEMU as far as the epoch sees it: run states, descriptors by name, a migration that
    /// writes [`STATE`] and then stays `finish-migrate` for `finish_polls` query-status
    /// answers after its `completed` event, an incoming migration that reads its fd to EOF.
    struct Fake {
        status: String,
        finish_polls: u32,
        /// The migration fails ("Unable to write to file") instead.
        fail_migration: bool,
        fds: HashMap<String, OwnedFd>,
        commands: Arc<Mutex<Vec<String>>>,
        received_state: Arc<Mutex<Vec<u8>>>,
    }

    impl Fake {
        fn answer(&mut self, command: &Value, fd: Option<OwnedFd>) -> String {
            let name = command["execute"].as_str().unwrap_or_default().to_owned();
            let id = command["id"].clone();
            if let Ok(mut commands) = self.commands.lock() {
                commands.push(name.clone());
            }
            let fd_name = command["arguments"]["fdname"].as_str().unwrap_or_default();
            let ok = |value: Value| format!("{}\n", json!({ "return": value, "id": id }));
            let refuse = |desc: &str| {
                let error = json!({ "class": "GenericError", "desc": desc });
                format!("{}\n", json!({ "error": error, "id": id }))
            };
            match name.as_str() {
                "getfd" => match fd {
                    Some(fd) => {
                        self.fds.insert(fd_name.to_owned(), fd);
                        ok(json!({}))
                    }
                    None => refuse("No file descriptor supplied via SCM_RIGHTS"),
                },
                "closefd" => match self.fds.remove(fd_name) {
                    Some(_) => ok(json!({})),
                    None => refuse("File descriptor named 'x' not found"),
                },
                "stop" => {
                    self.status = "paused".into();
                    ok(json!({}))
                }
                "cont" if self.status == "finish-migrate" => {
                    refuse("Migration is not finalized yet")
                }
                "cont" => {
                    self.status = "running".into();
                    ok(json!({}))
                }
                "query-status" => {
                    let status = self.status.clone();
                    if self.status == "finish-migrate" {
                        self.finish_polls = self.finish_polls.saturating_sub(1);
                        if self.finish_polls == 0 {
                            self.status = "postmigrate".into();
                        }
                    }
                    ok(json!({ "status": status, "running": status == "running" }))
                }
                "migrate" => {
                    let uri = command["arguments"]["uri"].as_str().unwrap_or_default();
                    let Some(fd) = uri.strip_prefix("fd:").and_then(|n| self.fds.remove(n)) else {
                        return refuse("unknown fd");
                    };
                    if self.fail_migration {
                        drop(fd);
                        self.status = "postmigrate".into();
                        return ok(json!({})) + &migration_event("failed");
                    }
                    let _ = File::from(fd).write_all(STATE);
                    self.status = "finish-migrate".into();
                    if self.finish_polls == 0 {
                        self.status = "postmigrate".into();
                    }
                    ok(json!({})) + &migration_event("completed")
                }
                "migrate-incoming" => {
                    let uri = command["arguments"]["uri"].as_str().unwrap_or_default();
                    let Some(fd) = uri.strip_prefix("fd:").and_then(|n| self.fds.remove(n)) else {
                        return refuse("unknown fd");
                    };
                    let mut state = Vec::new();
                    let _ = File::from(fd).read_to_end(&mut state);
                    if let Ok(mut received) = self.received_state.lock() {
                        *received = state;
                    }
                    self.status = "paused".into();
                    ok(json!({})) + &migration_event("completed")
                }
                "query-migrate" if self.fail_migration => ok(json!({
                    "status": "failed",
                    "error-desc": "Unable to write to file"
                })),
                _ => ok(json!({})),
            }
        }
    }

    fn migration_event(status: &str) -> String {
        format!(
            "{}\n",
            json!({ "event": "MIGRATION", "data": { "status": status } })
        )
    }

    struct Session {
        qmp: Qmp,
        commands: Arc<Mutex<Vec<String>>>,
        received_state: Arc<Mutex<Vec<u8>>>,
    }

    impl Session {
        fn commands(&self) -> Vec<String> {
            self.commands.lock().map(|c| c.clone()).unwrap_or_default()
        }
    }

    fn fake_qemu(status: &str, finish_polls: u32) -> Session {
        fake_qemu_failing(status, finish_polls, false)
    }

    fn fake_qemu_failing(status: &str, finish_polls: u32, fail_migration: bool) -> Session {
        let (client, server) = UnixStream::pair().expect("socketpair");
        let commands = Arc::new(Mutex::new(Vec::new()));
        let received_state = Arc::new(Mutex::new(Vec::new()));
        let mut fake = Fake {
            status: status.to_owned(),
            finish_polls,
            fail_migration,
            fds: HashMap::new(),
            commands: commands.clone(),
            received_state: received_state.clone(),
        };
        std::thread::spawn(move || {
            let mut writer = server.try_clone().expect("clone");
            let greeting = "{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n";
            writer.write_all(greeting.as_bytes()).expect("greet");
            let mut pending = Vec::new();
            let mut fds = VecDeque::new();
            loop {
                let (bytes, fd) = receive_with_fd(&server);
                if bytes.is_empty() {
                    return;
                }
                pending.extend_from_slice(&bytes);
                fds.extend(fd);
                while let Some(end) = pending.iter().position(|&byte| byte == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let command: Value = serde_json::from_slice(&line).expect("JSON command");
                    let fd = match command["execute"].as_str() {
                        Some("getfd") => fds.pop_front(),
                        _ => None,
                    };
                    let reply = fake.answer(&command, fd);
                    if writer.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            }
        });
        let qmp = Qmp::from_stream(client, Duration::from_secs(5)).expect("session");
        Session {
            qmp,
            commands,
            received_state,
        }
    }

    #[test]
    fn capture_waits_out_finish_migrate_and_returns_the_state() {
        let mut session = fake_qemu("running", 2);
        let captured =
            capture_device_state(&mut session.qmp, || Ok::<_, io::Error>(7)).expect("capture");
        assert_eq!(captured.state, STATE);
        assert_eq!(captured.staged, 7);
        assert_eq!(captured.timings.finish_migrate_polls, 2);
        assert!(captured.timings.total >= captured.timings.migrate);
        let second = capture_device_state(&mut session.qmp, || Ok::<_, io::Error>(()))
            .expect("second capture");
        assert_eq!(second.timings.finish_migrate_polls, 0);
        let commands = session.commands();
        let epoch = [
            "getfd",
            "stop",
            "migrate",
            "query-status",
            "query-status",
            "query-status",
            "cont",
        ];
        assert_eq!(
            commands[..2],
            ["qmp_capabilities", "migrate-set-capabilities"]
        );
        assert_eq!(commands[2..9], epoch);
        // The capabilities are set once per session.
        assert_eq!(
            commands[9..],
            ["getfd", "stop", "migrate", "query-status", "cont"]
        );
        assert_eq!(session.qmp.query_status().expect("status"), "running");
    }

    #[test]
    fn a_failed_hook_resumes_the_guest_and_releases_the_fd() {
        let mut session = fake_qemu("running", 0);
        let error = capture_device_state(&mut session.qmp, || {
            Err::<(), _>(io::Error::other("harvest failed"))
        })
        .expect_err("the hook failed");
        assert!(matches!(error, EpochError::WhileStopped(_)), "{error}");
        let commands = session.commands();
        assert_eq!(
            commands[2..],
            ["getfd", "stop", "closefd", "query-status", "cont"]
        );
        assert_eq!(session.qmp.query_status().expect("status"), "running");
    }

    #[test]
    fn a_failed_migration_carries_qemus_error_and_resumes_the_guest() {
        let mut session = fake_qemu_failing("running", 0, true);
        let error = capture_device_state(&mut session.qmp, || Ok::<_, io::Error>(()))
            .expect_err("the migration failed");
        assert!(
            matches!(&error, EpochError::MigrationFailed { desc } if desc == "Unable to write to file"),
            "{error}"
        );
        assert_eq!(
            session.commands()[2..],
            [
                "getfd",
                "stop",
                "migrate",
                "query-migrate",
                "migrate_cancel",
                "closefd",
                "query-status",
                "cont"
            ]
        );
        assert_eq!(session.qmp.query_status().expect("status"), "running");
    }

    #[test]
    fn restore_feeds_the_state_and_continues() {
        let mut session = fake_qemu("inmigrate", 0);
        let state = [STATE, &[0x5a; 300_000][..]].concat();
        restore(&mut session.qmp, &state).expect("restore");
        let received = session
            .received_state
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default();
        assert!(received == state, "QEMU read {} bytes", received.len());
        assert_eq!(
            session.commands()[1..],
            [
                "query-status",
                "migrate-set-capabilities",
                "getfd",
                "migrate-incoming",
                "query-status",
                "cont"
            ]
        );
        assert_eq!(session.qmp.query_status().expect("status"), "running");
        let mut running = fake_qemu("running", 0);
        let error = restore(&mut running.qmp, STATE).expect_err("not incoming");
        assert!(matches!(error, EpochError::NotIncoming { .. }), "{error}");
    }
}
