//! Plain QEMU live migration of a guest between hostA and hostB, no ftvm part in it: the
//! anchor of `ci/bench-migrate.sh` (the cost of migration itself).
//!
//! The guest is the rig's (kernel, initramfs with its `/test.sh`), RAM plain anonymous
//! memory, QEMU's own virtio-blk on one raw image that both hosts open (the hosts share
//! this machine's file system), and a virtio-net NIC on a plain TAP device on each host's
//! VM bridge `vmbr0` (made here, removed at the end). A migration starts a new QEMU on the
//! destination with `-incoming tcp:` on the destination's first A-link address, runs
//! `migrate` over QMP on the source with QEMU's defaults, polls `query-migrate` until
//! `completed` and quits the source QEMU. The guest's console goes to a file per host.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::guest::{build_initrd, GuestConfig};
use crate::hosts::Hosts;
use crate::process::Process;
use crate::qmp::Qmp;
use crate::{create_image, paths, scratch_dir};

pub const HOSTS: [&str; 2] = ["hostA", "hostB"];
/// Each host's first A-link address (`ci/hosts.sh`).
const LINK1: [&str; 2] = ["10.77.1.1", "10.77.1.2"];
/// The destination's migration port.
const MIGRATION_PORT: u16 = 7470;
/// Each host's TAP device on `vmbr0`.
const TAP: &str = "plaintap0";
const DISK_BYTES: u64 = 16 << 20;
/// How often `query-migrate` is asked.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// QEMU's figures of one completed migration (`query-migrate`).
#[derive(Clone, Debug)]
pub struct PlainMigration {
    /// QEMU's `downtime`: the guest stopped on the source until it runs on the destination.
    pub downtime: Duration,
    /// QEMU's `total-time`: from `migrate` to completion.
    pub total_time: Duration,
    /// `ram.transferred`.
    pub ram_bytes: u64,
    /// The whole reply, for the log.
    pub reply: Value,
}

/// The guest's QEMU on one host.
struct PlainVm {
    process: Process,
    qmp: PathBuf,
}

/// Fields drop in order: QEMUs, then (in `drop`) the TAPs, then hosts, then files.
pub struct PlainPair {
    vms: [Option<PlainVm>; 2],
    taps: Vec<String>,
    pub hosts: Hosts,
    initrd: PathBuf,
    image: PathBuf,
    mac: String,
    config: GuestConfig,
    dir: tempfile::TempDir,
}

impl PlainPair {
    /// Hosts, the image, the initramfs and a TAP per host; starts nothing.
    pub fn new(name: &str, config: &GuestConfig, mac: &str) -> PlainPair {
        let hosts = Hosts::up();
        let dir = scratch_dir(name);
        let initrd = build_initrd(config, dir.path());
        let image = dir.path().join("disk.img");
        create_image(&image, DISK_BYTES);
        let mut pair = PlainPair {
            vms: [None, None],
            taps: Vec::new(),
            hosts,
            initrd,
            image,
            mac: mac.to_owned(),
            config: config.clone(),
            dir,
        };
        for host in HOSTS {
            let namespace = pair.hosts.namespace(host);
            ip(&namespace, &["tuntap", "add", "dev", TAP, "mode", "tap"]);
            pair.taps.push(namespace.clone());
            ip(&namespace, &["link", "set", TAP, "master", "vmbr0"]);
            ip(&namespace, &["link", "set", TAP, "up"]);
        }
        pair
    }

    /// The console file of a host's QEMU (appended across QEMUs).
    pub fn console(&self, host: usize) -> PathBuf {
        self.dir.path().join(format!("{}-console.log", HOSTS[host]))
    }

    /// Boots the guest on `host`.
    pub fn boot(&mut self, host: usize) {
        self.start_qemu(host, None);
    }

    /// Moves the running guest from `from` to `to`: a new QEMU there, `migrate`, and the
    /// source QEMU quit once QEMU says `completed`. Panics if the migration fails.
    pub fn migrate(&mut self, from: usize, to: usize, timeout: Duration) -> PlainMigration {
        let uri = format!("tcp:{}:{MIGRATION_PORT}", LINK1[to]);
        self.start_qemu(to, Some(&uri));
        let source = self.vms[from]
            .as_ref()
            .expect("the guest runs on the source");
        let mut qmp = Qmp::connect(&source.qmp, Duration::from_secs(30)).expect("source QMP");
        qmp.execute_with("migrate", json!({ "uri": uri }))
            .expect("migrate");
        let deadline = Instant::now() + timeout;
        let reply = loop {
            let reply = qmp.execute("query-migrate").expect("query-migrate");
            match reply["status"].as_str() {
                Some("completed") => break reply,
                Some("failed" | "cancelled") => {
                    panic!("migration {} -> {} failed: {reply}", HOSTS[from], HOSTS[to])
                }
                _ if Instant::now() >= deadline => panic!(
                    "migration {} -> {} not completed after {timeout:?}: {reply}",
                    HOSTS[from], HOSTS[to]
                ),
                _ => std::thread::sleep(POLL_INTERVAL),
            }
        };
        // `quit` ends QEMU; its reply may or may not arrive before the socket closes.
        let _ = qmp.execute("quit");
        if let Some(mut source) = self.vms[from].take() {
            source.process.wait_exit(Duration::from_secs(30));
        }
        let milliseconds = |key: &str| Duration::from_millis(reply[key].as_u64().unwrap_or(0));
        PlainMigration {
            downtime: milliseconds("downtime"),
            total_time: milliseconds("total-time"),
            ram_bytes: reply["ram"]["transferred"].as_u64().unwrap_or(0),
            reply,
        }
    }

    /// Starts QEMU on `host` (with `-incoming URI` when given) and waits for its QMP.
    fn start_qemu(&mut self, host: usize, incoming: Option<&str>) {
        let qmp = self.dir.path().join(format!("{}-qmp.sock", HOSTS[host]));
        let _ = std::fs::remove_file(&qmp);
        let mut command = self.hosts.command(HOSTS[host], "qemu-system-x86_64");
        command.args(self.qemu_args(&qmp, &self.console(host)));
        if let Some(uri) = incoming {
            command.args(["-incoming", uri]);
        }
        let log = self.dir.path().join(format!("{}-qemu.log", HOSTS[host]));
        let process = Process::spawn(&format!("qemu on {}", HOSTS[host]), command, &log);
        // Connecting proves QEMU is in its main loop, its incoming socket listening.
        drop(Qmp::connect(&qmp, Duration::from_secs(60)).expect("QMP of the new QEMU"));
        self.vms[host] = Some(PlainVm { process, qmp });
    }

    fn qemu_args(&self, qmp: &Path, console: &Path) -> Vec<String> {
        let kernel = paths::guest_dir().join("vmlinuz");
        let memory = self.config.memory_mb;
        [
            "-name",
            "vm1",
            "-accel",
            "tcg",
            "-smp",
            &self.config.cpus.to_string(),
            "-m",
            &format!("{memory}M"),
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-chardev",
            &format!("file,id=console,path={},append=on", console.display()),
            "-serial",
            "chardev:console",
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp.display()),
            "-drive",
            &format!("file={},format=raw,if=none,id=disk0", self.image.display()),
            "-device",
            "virtio-blk-pci,drive=disk0",
            "-netdev",
            &format!("tap,id=net0,ifname={TAP},script=no,downscript=no"),
            // The same NIC as ftvmd gives a TCG guest (vectors=0), on a plain TAP.
            "-device",
            &format!(
                "virtio-net-pci,netdev=net0,mac={},mq=off,vectors=0",
                self.mac
            ),
            "-kernel",
            &kernel.display().to_string(),
            "-initrd",
            &self.initrd.display().to_string(),
            "-append",
            "console=ttyS0 panic=-1 quiet no_timer_check",
        ]
        .iter()
        .map(|arg| arg.to_string())
        .collect()
    }
}

impl Drop for PlainPair {
    fn drop(&mut self) {
        for vm in &mut self.vms {
            drop(vm.take());
        }
        for namespace in &self.taps {
            let _ = Command::new("ip")
                .args(["-n", namespace, "link", "del", TAP])
                .status();
        }
        if std::thread::panicking() {
            for (host, name) in HOSTS.iter().enumerate() {
                let console = std::fs::read_to_string(self.console(host)).unwrap_or_default();
                let lines: Vec<&str> = console.lines().collect();
                eprintln!(
                    "---- guest console on {name} (last lines) ----\n{}",
                    lines[lines.len().saturating_sub(30)..].join("\n")
                );
                let log = self.dir.path().join(format!("{name}-qemu.log"));
                eprintln!(
                    "---- QEMU log on {name} ----\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
    }
}

/// `ip -n NAMESPACE ARGS`; panics if it fails.
fn ip(namespace: &str, args: &[&str]) {
    let output = Command::new("ip")
        .args(["-n", namespace])
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        output.status.success(),
        "ip -n {namespace} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}
