//! Runs one alert agent once: an executable with the alert in its environment, in a
//! process group of its own, killed (the whole group) at its timeout.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Most bytes of an agent's output (stdout and stderr together) kept for the log.
const MAX_OUTPUT_BYTES: usize = 4096;
/// Tries to start an agent whose file is busy ("Text file busy"), [`POLL`] apart.
const BUSY_RETRIES: u32 = 20;
/// How often a running agent is checked for its end.
const POLL: Duration = Duration::from_millis(10);
/// How long the output is waited for after the agent ended (a child it left behind may
/// hold the pipe open).
const OUTPUT_GRACE: Duration = Duration::from_millis(500);
/// The `PATH` agents run with (their environment is not ftvmd's).
const AGENT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How one run of an agent ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status 0.
    Delivered,
    /// Another exit status, or killed by a signal: what, with the agent's last output.
    Failed(String),
    /// Still running at its timeout: its process group was killed.
    TimedOut,
    /// It could not be started.
    NotStarted(String),
}

/// Runs `path` with exactly `environment` (and a standard `PATH`), stdin from /dev/null,
/// in `/`, until it exits or `timeout` passes. Returns how it ended and its output (at
/// most [`MAX_OUTPUT_BYTES`], lossily as UTF-8).
pub fn run(path: &Path, environment: &[(String, String)], timeout: Duration) -> (Outcome, String) {
    let (reader, writer) = match std::io::pipe() {
        Ok(pipe) => pipe,
        Err(error) => {
            return (
                Outcome::NotStarted(format!("no pipe: {error}")),
                String::new(),
            )
        }
    };
    let stderr = match writer.try_clone() {
        Ok(stderr) => stderr,
        Err(error) => {
            return (
                Outcome::NotStarted(format!("no pipe: {error}")),
                String::new(),
            )
        }
    };
    let mut command = Command::new(path);
    command
        .env_clear()
        .env("PATH", AGENT_PATH)
        .envs(environment.iter().map(|(key, value)| (key, value)))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(stderr)
        .process_group(0);
    let mut spawned = command.spawn();
    // "Text file busy": another thread of ftvmd forked while the agent's file was open for
    // writing (or an installer is writing it); that passes in moments.
    for _ in 0..BUSY_RETRIES {
        match &spawned {
            Err(error) if error.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                thread::sleep(POLL);
                spawned = command.spawn();
            }
            _ => break,
        }
    }
    // The command holds our copies of the pipe's write end: the reader sees its end only
    // once they are closed too.
    drop(command);
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => return (Outcome::NotStarted(error.to_string()), String::new()),
    };
    let output = collect(reader);
    let deadline = Instant::now() + timeout;
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                break match (status.code(), status.signal()) {
                    (Some(0), _) => Outcome::Delivered,
                    (Some(code), _) => Outcome::Failed(format!("exit status {code}")),
                    (None, Some(signal)) => Outcome::Failed(format!("killed by signal {signal}")),
                    (None, None) => Outcome::Failed(status.to_string()),
                };
            }
            Ok(None) if Instant::now() >= deadline => {
                kill_group(child.id());
                let _ = child.wait();
                break Outcome::TimedOut;
            }
            Ok(None) => thread::sleep(POLL),
            Err(error) => {
                kill_group(child.id());
                let _ = child.wait();
                break Outcome::Failed(format!("cannot wait for it: {error}"));
            }
        }
    };
    let text = output.recv_timeout(OUTPUT_GRACE).unwrap_or_default();
    (outcome, text)
}

/// Reads `reader` to its end on a thread, keeping the first [`MAX_OUTPUT_BYTES`].
fn collect(mut reader: std::io::PipeReader) -> mpsc::Receiver<String> {
    let (sender, receiver) = mpsc::channel();
    let spawned = thread::Builder::new()
        .name("alert-output".into())
        .spawn(move || {
            let mut kept = Vec::new();
            let mut buffer = [0u8; 1024];
            loop {
                match reader.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(read) => {
                        let room = MAX_OUTPUT_BYTES.saturating_sub(kept.len());
                        kept.extend_from_slice(&buffer[..read.min(room)]);
                    }
                }
            }
            let _ = sender.send(String::from_utf8_lossy(&kept).trim_end().to_owned());
        });
    if let Err(error) = spawned {
        log::warn!("alert agent output not read: cannot start a thread: {error}");
    }
    receiver
}

/// SIGKILL to process group `pid` (the agent leads its own group).
fn kill_group(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) with a negative pid signals that process group; it touches no memory.
    // The group is the agent's own (process_group(0)), not yet reaped, so the id is ours.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(body: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("agent");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write agent");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        (dir, path)
    }

    #[test]
    fn an_agent_sees_only_its_environment_and_its_output_is_kept() {
        let (_dir, path) = script("echo \"kind=$FTVM_ALERT_KIND home=${HOME:-none}\" >&2");
        let environment = [("FTVM_ALERT_KIND".to_owned(), "test".to_owned())];
        let (outcome, output) = run(&path, &environment, Duration::from_secs(10));
        assert_eq!(outcome, Outcome::Delivered);
        assert_eq!(output, "kind=test home=none");
    }

    #[test]
    fn a_failure_says_how() {
        let (_dir, path) = script("echo no route; exit 3");
        let (outcome, output) = run(&path, &[], Duration::from_secs(10));
        assert_eq!(outcome, Outcome::Failed("exit status 3".into()));
        assert_eq!(output, "no route");
        let (outcome, _) = run(Path::new("/nonexistent/agent"), &[], Duration::from_secs(1));
        assert!(matches!(outcome, Outcome::NotStarted(_)), "{outcome:?}");
    }

    #[test]
    fn a_hung_agent_and_its_children_are_killed_at_the_timeout() {
        let (dir, path) = script("sleep 100 & echo $! > \"$PIDS\"; sleep 100");
        let pids = dir.path().join("pids");
        let environment = [("PIDS".to_owned(), pids.display().to_string())];
        let started = Instant::now();
        let (outcome, _) = run(&path, &environment, Duration::from_millis(300));
        let took = started.elapsed();
        assert_eq!(outcome, Outcome::TimedOut);
        assert!(took < Duration::from_secs(3), "took {took:?}");
        let child: u32 = std::fs::read_to_string(&pids)
            .expect("the agent's child")
            .trim()
            .parse()
            .expect("a pid");
        // The background sleep was in the agent's group: killed too (reaped by init, so
        // wait for it to go).
        let gone = (0..200).any(|_| {
            let state = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            let running = !state.is_empty() && !state.contains(") Z ");
            if running {
                thread::sleep(Duration::from_millis(10));
            }
            !running
        });
        assert!(gone, "the agent's child {child} outlived the timeout");
    }
}
