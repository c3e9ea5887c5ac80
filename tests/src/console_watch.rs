//! Guest consoles written to files (QEMU's `file` chardev, as `ftvmd` runs its VMs), their
//! lines timestamped on arrival: a thread reads what was appended to each file every 2 ms
//! until dropped. Lines written before the watch started are skipped.
//!
//! What it is for: the switch of a guest's output from one host's console to the other's
//! when the VM moves (`ci/bench-migrate.sh`).

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::wait::poll_until;

/// How often the files are read.
const POLL_INTERVAL: Duration = Duration::from_millis(2);

/// One console line: when it was seen, in which file (index into the watched files).
#[derive(Clone, Debug)]
pub struct TimedLine {
    pub at: Instant,
    pub file: usize,
    pub text: String,
}

/// Watches console files until dropped.
pub struct ConsoleWatch {
    lines: Arc<Mutex<Vec<TimedLine>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ConsoleWatch {
    /// Starts watching `files` (they need not exist yet).
    pub fn start(files: Vec<PathBuf>) -> ConsoleWatch {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tails: Vec<Tail> = files.into_iter().map(Tail::new).collect();
        let thread = {
            let (lines, stop) = (Arc::clone(&lines), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for (file, tail) in tails.iter_mut().enumerate() {
                        let new = tail.read_lines();
                        if new.is_empty() {
                            continue;
                        }
                        let at = Instant::now();
                        let mut lines = lines.lock().expect("console lines");
                        lines.extend(new.into_iter().map(|text| TimedLine { at, file, text }));
                    }
                    std::thread::sleep(POLL_INTERVAL);
                }
            })
        };
        ConsoleWatch {
            lines,
            stop,
            thread: Some(thread),
        }
    }

    /// Every line seen so far, in arrival order.
    pub fn lines(&self) -> Vec<TimedLine> {
        self.lines.lock().expect("console lines").clone()
    }

    /// Waits up to `timeout` for a line of file `file` that contains `needle`.
    pub fn wait_for(&self, file: usize, needle: &str, timeout: Duration) {
        let what = format!("{needle:?} on console {file}");
        poll_until(timeout, &what, || {
            self.lines
                .lock()
                .expect("console lines")
                .iter()
                .any(|line| line.file == file && line.text.contains(needle))
        });
    }

    /// The guest's output moving from file `from` to file `to`: from the last line of
    /// `from` that `matches` to the first line of `to` after `since` that matches, counted
    /// from the last one of `from` before it. `None` while `to` has no such line, or when
    /// `from` had none before it.
    pub fn switch_gap(
        &self,
        files: (usize, usize),
        since: Instant,
        matches: impl Fn(&str) -> bool,
    ) -> Option<Duration> {
        let (last, first) = self.switch(files, since, matches)?;
        Some(first.duration_since(last))
    }

    /// When the lines of [`ConsoleWatch::switch_gap`] arrived: the last one of `from`, the
    /// first one of `to`.
    pub fn switch(
        &self,
        (from, to): (usize, usize),
        since: Instant,
        matches: impl Fn(&str) -> bool,
    ) -> Option<(Instant, Instant)> {
        let lines = self.lines.lock().expect("console lines");
        let first_on_to = lines
            .iter()
            .find(|line| line.file == to && line.at >= since && matches(&line.text))?;
        let last_on_from = lines
            .iter()
            .rev()
            .find(|line| line.file == from && line.at <= first_on_to.at && matches(&line.text))?;
        Some((last_on_from.at, first_on_to.at))
    }
}

impl Drop for ConsoleWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What was read of one file so far.
struct Tail {
    path: PathBuf,
    /// `None` until the file was first seen: then what it held is skipped.
    offset: Option<u64>,
    partial: Vec<u8>,
}

impl Tail {
    fn new(path: PathBuf) -> Tail {
        let offset = std::fs::metadata(&path).ok().map(|meta| meta.len());
        Tail {
            path,
            offset,
            partial: Vec::new(),
        }
    }

    /// The whole lines appended since the last call.
    fn read_lines(&mut self) -> Vec<String> {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        let Some(offset) = self.offset else {
            // Created after the watch started: everything in it is new.
            self.offset = Some(0);
            return self.read_lines();
        };
        let length = file.metadata().map(|meta| meta.len()).unwrap_or(offset);
        if length <= offset || file.seek(SeekFrom::Start(offset)).is_err() {
            return Vec::new();
        }
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_err() {
            return Vec::new();
        }
        self.offset = Some(offset + bytes.len() as u64);
        self.partial.extend_from_slice(&bytes);
        let mut lines = Vec::new();
        while let Some(end) = self.partial.iter().position(|&byte| byte == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..end]);
            lines.push(text.trim_end_matches('\r').to_owned());
        }
        lines
    }
}
