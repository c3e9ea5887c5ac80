//! A QEMU guest booted from the rig's kernel and initramfs, with its serial console captured.
//!
//! The guest's `/init` (built by `ci/build-guest.sh`) prints `FTVM-BOOTED`, runs `/test.sh`
//! when one was appended to the initramfs, prints `FTVM-EXIT <rc>` and powers off.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::cpio::{self, Entry};
use crate::netns::in_namespace;
use crate::paths;
use crate::process::Process;

/// Guest RAM; fio in the initramfs needs more than the bare busybox image.
pub const DEFAULT_MEMORY_MB: u32 = 512;

/// A vhost-user-blk disk attached to the guest.
#[derive(Debug, Clone)]
pub struct Disk {
    pub socket: PathBuf,
    pub queues: u16,
}

/// A vhost-user-net NIC attached to the guest.
#[derive(Debug, Clone)]
pub struct Nic {
    pub socket: PathBuf,
    pub mac: String,
    pub queues: u16,
}

/// How to start a guest.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub name: String,
    pub memory_mb: u32,
    pub cpus: u32,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    /// Shell script run as `/test.sh` inside the guest.
    pub script: String,
    /// Extra files for the guest's root directory.
    pub files: Vec<Entry>,
    pub with_fio: bool,
    /// The initramfs holds qemu-ga (`qga.cpio.gz`): the guest runs it when the VM has the
    /// `org.qemu.guest_agent.0` channel (every VM ftvmd starts has).
    pub with_guest_agent: bool,
    /// Network namespace (test host) to run QEMU in.
    pub netns: Option<String>,
    /// A QMP socket to create (`-qmp unix:PATH,server=on,wait=off`), see `crate::qmp`.
    pub qmp: Option<PathBuf>,
    /// Guest RAM in this file (`memory-backend-file,mem-path=…,share=on`, Level 3) instead of
    /// a memfd.
    pub ram_file: Option<PathBuf>,
    /// Start with `-incoming defer`: the guest's state comes by `migrate-incoming` (a Level 3
    /// restore).
    pub incoming_defer: bool,
    /// Extra environment of QEMU (e.g. `LD_PRELOAD` of the Level 3 RAM tracking library).
    pub env: Vec<(String, String)>,
}

impl GuestConfig {
    pub fn new(name: &str, script: &str) -> GuestConfig {
        GuestConfig {
            name: name.to_owned(),
            memory_mb: DEFAULT_MEMORY_MB,
            cpus: 1,
            disks: Vec::new(),
            nics: Vec::new(),
            script: script.to_owned(),
            files: Vec::new(),
            with_fio: false,
            with_guest_agent: false,
            netns: None,
            qmp: None,
            ram_file: None,
            incoming_defer: false,
            env: Vec::new(),
        }
    }
}

type Lines = Arc<(Mutex<Vec<String>>, Condvar)>;
type Arrivals = Arc<Mutex<Vec<Instant>>>;

/// A running guest. Dropping it ends QEMU by PID (SIGKILL) and, when the test is failing,
/// prints the console.
#[derive(Debug)]
pub struct Guest {
    name: String,
    process: Process,
    console: Lines,
    /// When each console line arrived, index for index.
    arrivals: Arrivals,
    console_log: PathBuf,
}

impl Guest {
    /// Boots a guest; its files live in `dir`.
    pub fn boot(config: &GuestConfig, dir: &Path) -> Guest {
        let initrd = build_initrd(config, dir);
        let console_log = dir.join(format!("{}-console.log", config.name));
        let mut command = match &config.netns {
            Some(namespace) => in_namespace(namespace, "qemu-system-x86_64"),
            None => Command::new("qemu-system-x86_64"),
        };
        command.args(qemu_args(config, &initrd));
        command.envs(config.env.iter().map(|(name, value)| (name, value)));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start qemu-system-x86_64: {error}"));
        let console: Lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let arrivals: Arrivals = Arc::new(Mutex::new(Vec::new()));
        let log = File::create(&console_log).expect("create console log");
        if let Some(stdout) = child.stdout.take() {
            capture(stdout, (console.clone(), arrivals.clone()), Some(log));
        }
        if let Some(stderr) = child.stderr.take() {
            let tagged = (console.clone(), arrivals.clone());
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    push_line(&tagged, format!("[qemu] {line}"), None);
                }
            });
        }
        Guest {
            name: config.name.clone(),
            process: Process::adopt(&format!("qemu of guest {}", config.name), child),
            console,
            arrivals,
            console_log,
        }
    }

    /// Every console line so far.
    pub fn console(&self) -> Vec<String> {
        self.console
            .0
            .lock()
            .map(|lines| lines.clone())
            .unwrap_or_default()
    }

    /// Every console line so far with the time it arrived.
    pub fn console_timed(&self) -> Vec<(Instant, String)> {
        let (lock, _) = &*self.console;
        let lines = lock.lock().map(|lines| lines.clone()).unwrap_or_default();
        let arrivals = self.arrivals.lock().map(|a| a.clone()).unwrap_or_default();
        arrivals.into_iter().zip(lines).collect()
    }

    /// Waits until a console line satisfies `matches`, and returns it.
    pub fn wait_for_line(&self, timeout: Duration, matches: impl Fn(&str) -> bool) -> String {
        self.wait_line(timeout, false, matches)
    }

    /// Waits until a console line satisfies `matches`, for as long as the guest keeps
    /// printing: fails only after `idle` without a new line (a guest that works slowly on a
    /// loaded machine is not a hung one).
    pub fn wait_for_line_while_progressing(
        &self,
        idle: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        self.wait_line(idle, true, matches)
    }

    /// Waits up to `timeout` for a matching line; with `progress`, the time starts again at
    /// every new line.
    fn wait_line(
        &self,
        timeout: Duration,
        progress: bool,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let (lock, condvar) = &*self.console;
        let mut lines = lock.lock().expect("console lock");
        let mut seen = 0;
        let mut deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = lines[seen..].iter().find(|line| matches(line)) {
                return line.clone();
            }
            if progress && lines.len() > seen {
                deadline = Instant::now() + timeout;
            }
            seen = lines.len();
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                let what = if progress {
                    "without a new console line"
                } else {
                    "waiting for a console line"
                };
                panic!(
                    "guest {}: timed out after {timeout:?} {what}\n{}",
                    self.name,
                    self.console().join("\n")
                );
            }
            lines = condvar
                .wait_timeout(lines, deadline - now)
                .expect("console lock")
                .0;
        }
    }

    /// Waits until the guest's test script ended and returns its exit code.
    pub fn wait_test_exit(&self, timeout: Duration) -> i32 {
        let line = self.wait_for_line(timeout, |line| line.starts_with("FTVM-EXIT "));
        line.trim_start_matches("FTVM-EXIT ")
            .trim()
            .parse()
            .unwrap_or(-1)
    }

    /// Waits for QEMU to exit by itself (the guest powered off).
    pub fn wait_poweroff(&mut self, timeout: Duration) -> ExitStatus {
        self.process.wait_exit(timeout)
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn console_log(&self) -> &Path {
        &self.console_log
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.process.kill();
        if thread::panicking() {
            eprintln!(
                "---- console of guest {} ----\n{}",
                self.name,
                self.console().join("\n")
            );
        }
    }
}

fn push_line(console: &(Lines, Arrivals), line: String, log: Option<&mut File>) {
    if let Some(log) = log {
        let _ = writeln!(log, "{line}");
    }
    let (lock, condvar) = &*console.0;
    if let Ok(mut lines) = lock.lock() {
        if let Ok(mut arrivals) = console.1.lock() {
            arrivals.push(Instant::now());
        }
        lines.push(line);
    }
    condvar.notify_all();
}

fn capture(
    stdout: impl std::io::Read + Send + 'static,
    console: (Lines, Arrivals),
    mut log: Option<File>,
) {
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let line = line.trim_end_matches('\r').to_owned();
            push_line(&console, line, log.as_mut());
        }
    });
}

fn qemu_args(config: &GuestConfig, initrd: &Path) -> Vec<String> {
    let guest = paths::guest_dir();
    let memory = config.memory_mb;
    let mut args: Vec<String> = [
        "-accel",
        "tcg",
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        "stdio",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    args.extend([
        "-smp".into(),
        config.cpus.to_string(),
        "-m".into(),
        format!("{memory}M"),
        "-object".into(),
        match &config.ram_file {
            Some(path) => format!(
                "memory-backend-file,id=mem,size={memory}M,mem-path={},share=on",
                path.display()
            ),
            None => format!("memory-backend-memfd,id=mem,size={memory}M,share=on"),
        },
        "-machine".into(),
        "memory-backend=mem".into(),
        "-kernel".into(),
        guest.join("vmlinuz").display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        "console=ttyS0 panic=-1 quiet no_timer_check".into(),
    ]);
    if config.incoming_defer {
        args.extend(["-incoming".into(), "defer".into()]);
    }
    if let Some(qmp) = &config.qmp {
        args.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
        ]);
    }
    for (index, disk) in config.disks.iter().enumerate() {
        args.extend([
            "-chardev".into(),
            format!(
                "socket,id=disk{index},path={},reconnect=1",
                disk.socket.display()
            ),
            "-device".into(),
            format!(
                "vhost-user-blk-pci,chardev=disk{index},num-queues={}",
                disk.queues
            ),
        ]);
    }
    for (index, nic) in config.nics.iter().enumerate() {
        // QEMU 7.2 under TCG needs vectors=0 for virtio-net-pci (DESIGN.md).
        let mq = if nic.queues > 1 { "on" } else { "off" };
        args.extend([
            "-chardev".into(),
            format!(
                "socket,id=nic{index},path={},reconnect=1",
                nic.socket.display()
            ),
            "-netdev".into(),
            format!(
                "vhost-user,id=net{index},chardev=nic{index},queues={}",
                nic.queues
            ),
            "-device".into(),
            format!(
                "virtio-net-pci,netdev=net{index},mac={},vectors=0,mq={mq}",
                nic.mac
            ),
        ]);
    }
    args
}

/// Concatenates the base initramfs, fio and qemu-ga when asked, and an archive with
/// `/test.sh`.
pub fn build_initrd(config: &GuestConfig, dir: &Path) -> PathBuf {
    let guest = paths::guest_dir();
    let path = dir.join(format!("{}-initrd", config.name));
    let mut out = File::create(&path).expect("create initrd");
    let mut parts = vec![guest.join("initramfs.gz")];
    if config.with_fio {
        parts.push(guest.join("fio.cpio.gz"));
    }
    if config.with_guest_agent {
        parts.push(guest.join("qga.cpio.gz"));
    }
    for part in parts {
        let bytes = std::fs::read(&part).unwrap_or_else(|error| {
            panic!(
                "cannot read {} ({error}); run ci/build-guest.sh first",
                part.display()
            )
        });
        out.write_all(&bytes).expect("write initrd");
        // The kernel only looks for an uncompressed archive at a 4-byte aligned offset and
        // skips zero padding between archives.
        let padding = (4 - bytes.len() % 4) % 4;
        out.write_all(&[0u8; 3][..padding]).expect("pad initrd");
    }
    let mut entries = config.files.clone();
    entries.push(Entry::executable(
        "test.sh",
        config.script.clone().into_bytes(),
    ));
    cpio::write_archive(&mut out, &entries).expect("write test archive");
    path
}
