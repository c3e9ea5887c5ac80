//! The Level 3 rig (issue 11), without `ftvmd`: the test plays the coordinator.
//!
//! hostA runs the guest's QEMU (RAM in a `/dev/shm` file, the RAM tracking library
//! preloaded), its `vhost-net-ft` and the primary `ftvm-checkpoint`; hostB runs the standby
//! `vhost-net-ft` and the secondary `ftvm-checkpoint` with the replica RAM file. Both NIC
//! daemons sit on their host's VM bridge, whose uplink reaches the LAN. A host is killed as
//! a power cut would: its links go down and every process in it is SIGKILLed. The VM is
//! then restored on hostB from the replica, as `ftvmd` would after the witness's grant:
//! a QEMU with `-incoming defer` on the replica RAM file, attached to hostB's NIC daemon,
//! `restore` on the secondary engine, `announce` on the NIC daemon.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::blk::{control_json, status_json};
use crate::guest::{Disk, Guest, GuestConfig, Nic};
use crate::hosts::Hosts;
use crate::mirror::MirrorPair;
use crate::nic_daemon::{NicDaemon, ALINKS, GUEST_IP, GUEST_MAC, HOSTS};
use crate::paths;
use crate::process::{signal, Process};
use crate::wait::{poll_for, poll_until};

/// The checkpoint engines' port on every A-link address.
pub const CHECKPOINT_PORT: u16 = 7460;
/// The guest's RAM.
pub const RAM_MB: u32 = 256;
/// Booting under TCG on a loaded machine, the first full copy, the restore.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(180);
const VM: &str = "vm1";

/// A counter in the guest's memory, printed every ~100 ms with the guest's uptime
/// (`COUNT n uptime`), and a TCP echo server on port 7000.
pub const COUNTER_AND_ECHO: &str = "i=0\n\
     (while true; do\n\
       i=$((i + 1))\n\
       read up idle < /proc/uptime\n\
       echo \"COUNT $i $up\"\n\
       usleep 100000\n\
     done) &\n\
     nc -ll -p 7000 -e cat\n";

/// `(n, uptime)` of a `COUNT n uptime` line of [`COUNTER_AND_ECHO`].
pub fn count_of(line: &str) -> Option<(u64, f64)> {
    let mut words = line.strip_prefix("COUNT ")?.split_whitespace();
    Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
}

/// The guest's script: the LAN address, then whatever `body` runs.
pub fn guest_script(body: &str) -> String {
    format!(
        "ip link set eth0 up\n\
         ip addr add {GUEST_IP}/24 dev eth0\n\
         echo \"NET-UP $(cat /sys/class/net/eth0/address)\"\n\
         {body}"
    )
}

/// Files under `/dev/shm` the rig made, removed when it ends.
#[derive(Debug)]
struct ShmFiles(Vec<PathBuf>);

impl Drop for ShmFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What the rig's VM has besides its NIC.
#[derive(Debug, Clone, Copy, Default)]
pub struct Level3Options {
    /// Milliseconds between checkpoints (`--interval-ms`).
    pub interval_ms: u64,
    /// A disk of this many bytes, mirrored from hostA to hostB (`vhost-blk-mirror`, the
    /// primary's writes to guest RAM reported to the engine); after the loss of hostA the
    /// test promotes hostB's copy, as `ftvmd` would, and the restored guest uses it.
    pub disk_bytes: Option<u64>,
}

/// The rig. Fields drop in order: guests, engines, NIC daemons, files, the disk's daemons
/// and the hosts, directory.
#[derive(Debug)]
pub struct Level3Pair {
    pub guest: Option<Guest>,
    pub restored: Option<Guest>,
    primary: Option<Process>,
    _secondary: Process,
    pub nic_a: Option<NicDaemon>,
    pub nic_b: NicDaemon,
    shm: ShmFiles,
    /// The mirrored disk (its hosts are the rig's hosts).
    pub mirror: Option<MirrorPair>,
    own_hosts: Option<Hosts>,
    pub dir: tempfile::TempDir,
    /// The guest as booted on hostA (the restore on hostB starts from it).
    pub config: GuestConfig,
    pub primary_control: PathBuf,
    pub secondary_control: PathBuf,
    /// The console of hostA's guest as it was when hostA was killed.
    pub console_a: Vec<String>,
    interval_ms: u64,
    psk: PathBuf,
    track: PathBuf,
    /// The epoch the replica was frozen at (and hostB's disk promoted at), once it was.
    frozen_epoch: Option<u64>,
}

impl Level3Pair {
    /// Brings up the hosts, the NIC daemons, the secondary engine and the guest (with
    /// `config`'s script and files; NIC, RAM file, preload and QMP are set here); waits for
    /// `NET-UP` and then starts the primary engine and waits for its first commits.
    pub fn start(name: &str, config: GuestConfig, options: Level3Options) -> Level3Pair {
        let mut pair = Level3Pair::start_unprotected(name, config, options);
        pair.start_primary_engine();
        pair.wait_committed(3);
        pair
    }

    /// As [`Level3Pair::start`] up to `NET-UP`, without the primary engine: the guest runs
    /// unprotected, the secondary engine waits for a primary
    /// ([`Level3Pair::start_primary_engine`] starts it).
    pub fn start_unprotected(
        name: &str,
        mut config: GuestConfig,
        options: Level3Options,
    ) -> Level3Pair {
        let interval_ms = options.interval_ms;
        let (mut mirror, own_hosts) = match options.disk_bytes {
            Some(bytes) => (Some(MirrorPair::new(name, bytes, 1)), None),
            None => (None, Some(Hosts::up())),
        };
        if let Some(mirror) = &mut mirror {
            // Where hostB's copy, once promoted, reaches the old primary when it returns.
            for address in ALINKS[0] {
                mirror.secondary_options.extra_args.extend([
                    "--peer".to_owned(),
                    format!("{address}:{}", crate::mirror::REPLICATION_PORT),
                ]);
            }
            mirror.start_secondary();
            mirror.start_primary();
            mirror.wait_in_sync(GUEST_TIMEOUT);
            config.disks = vec![Disk {
                socket: mirror.primary_options.socket.clone(),
                queues: 1,
            }];
        }
        let hosts = match (&mirror, &own_hosts) {
            (Some(mirror), _) => &mirror.hosts,
            (None, Some(hosts)) => hosts,
            (None, None) => unreachable!("one of them is set"),
        };
        let dir = crate::scratch_dir(name);
        let psk = dir.path().join("pair.psk");
        std::fs::write(&psk, "level 3 test key, 32 bytes long!\n").expect("psk");
        let nic_a = NicDaemon::start(hosts, dir.path(), 0, &psk, &[]);
        let nic_b = NicDaemon::start(hosts, dir.path(), 1, &psk, &[]);
        let base = format!("/dev/shm/ftvm-l3-{}-{name}", std::process::id());
        let shm = ShmFiles(vec![
            PathBuf::from(format!("{base}-A.ram")),
            PathBuf::from(format!("{base}-B.ram")),
        ]);
        let secondary_control = dir.path().join("checkpoint-B.ctl");
        let secondary_disk = mirror
            .as_ref()
            .map(|mirror| mirror.secondary_options.control.clone());
        let secondary = start_secondary(
            hosts,
            dir.path(),
            &psk,
            &shm.0[1],
            &secondary_control,
            secondary_disk.as_deref(),
        );

        let track = dir.path().join("ram-track.sock");
        config.memory_mb = RAM_MB;
        config.netns = Some(hosts.namespace("hostA"));
        config.ram_file = Some(shm.0[0].clone());
        config.qmp = Some(dir.path().join("qmp-A.sock"));
        config.env = vec![
            (
                "LD_PRELOAD".into(),
                paths::binary("libftvm_ram_track.so").display().to_string(),
            ),
            ("FTVM_RAM_TRACK_SOCKET".into(), track.display().to_string()),
        ];
        config.nics = vec![Nic {
            socket: nic_a.socket.clone(),
            mac: GUEST_MAC.into(),
            queues: 1,
        }];
        let guest = Guest::boot(&config, dir.path());
        guest.wait_for_line(GUEST_TIMEOUT, |line| line.starts_with("NET-UP"));

        let primary_control = dir.path().join("checkpoint-A.ctl");
        Level3Pair {
            guest: Some(guest),
            restored: None,
            primary: None,
            _secondary: secondary,
            nic_a: Some(nic_a),
            nic_b,
            shm,
            mirror,
            own_hosts,
            dir,
            config,
            primary_control,
            secondary_control,
            console_a: Vec::new(),
            interval_ms,
            psk,
            track,
            frozen_epoch: None,
        }
    }

    /// Starts the primary engine on hostA (it registers QEMU's RAM tracking, holds the
    /// NIC's output, makes the full copy, then takes a checkpoint every `interval_ms`);
    /// does not wait for it.
    pub fn start_primary_engine(&mut self) {
        let mut command = self
            .hosts()
            .command("hostA", paths::binary("ftvm-checkpoint"));
        let nic_a = self.nic_a.as_ref().expect("hostA's NIC daemon");
        command
            .args(["primary", "--vm", VM, "--host-id", "hostA"])
            .arg("--qmp")
            .arg(self.config.qmp.as_ref().expect("qmp"))
            .arg("--ram")
            .arg(&self.shm.0[0])
            .arg("--ram-track")
            .arg(&self.track)
            .arg("--nic")
            .arg(&nic_a.control)
            .arg("--psk-file")
            .arg(&self.psk)
            .arg("--control")
            .arg(&self.primary_control)
            .arg("--interval-ms")
            .arg(self.interval_ms.to_string());
        for address in ALINKS[1] {
            command
                .arg("--peer")
                .arg(format!("{address}:{CHECKPOINT_PORT}"));
        }
        if let Some(mirror) = &self.mirror {
            command.arg("--disk").arg(&mirror.primary_options.control);
        }
        self.primary = Some(Process::spawn(
            "ftvm-checkpoint primary",
            command,
            &self.dir.path().join("checkpoint-A.log"),
        ));
    }

    /// SIGKILLs the primary engine alone (hostA and its guest run on, unprotected).
    pub fn kill_primary_engine(&mut self) {
        if let Some(mut primary) = self.primary.take() {
            primary.kill();
        }
    }

    /// The secondary engine's PID (to stop and continue it: a hung daemon).
    pub fn secondary_pid(&self) -> u32 {
        self._secondary.pid()
    }

    /// The replica RAM file on hostB (the guest's memory as of the last committed
    /// checkpoint, once frozen).
    pub fn replica_ram(&self) -> &Path {
        &self.shm.0[1]
    }

    /// hostA's guest RAM file (after the loss of hostA: the guest's memory when it died).
    pub fn primary_ram(&self) -> &Path {
        &self.shm.0[0]
    }

    /// The test hosts.
    pub fn hosts(&self) -> &Hosts {
        match (&self.mirror, &self.own_hosts) {
            (Some(mirror), _) => &mirror.hosts,
            (None, Some(hosts)) => hosts,
            (None, None) => unreachable!("one of them is set"),
        }
    }

    pub fn guest(&self) -> &Guest {
        self.restored
            .as_ref()
            .or(self.guest.as_ref())
            .expect("a guest runs")
    }

    pub fn primary_status(&self) -> Value {
        status_json(&self.primary_control).unwrap_or_default()
    }

    pub fn secondary_status(&self) -> Value {
        status_json(&self.secondary_control).unwrap_or_default()
    }

    /// Waits until the primary has had `epochs` more epochs committed (the first call
    /// includes the full copy).
    pub fn wait_committed(&self, epochs: u64) -> u64 {
        let start = self.primary_status()["stats"]["committed_epoch"]
            .as_u64()
            .unwrap_or(0);
        poll_for(
            GUEST_TIMEOUT,
            &format!("{epochs} more committed checkpoints"),
            || {
                let status = self.primary_status();
                assert_ne!(
                    status["state"],
                    "released",
                    "the primary engine gave up: {status}\nlog:\n{}",
                    self.log("checkpoint-A.log")
                );
                status["stats"]["committed_epoch"].as_u64()
            },
            |&committed| committed >= start + epochs,
        )
    }

    /// A daemon's or engine's log in the rig's directory.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    /// hostA is lost: its links go down and every process in it is SIGKILLed.
    pub fn kill_host_a(&mut self) -> Instant {
        let namespace = self.hosts().namespace("hostA");
        for link in ["alink1", "alink2", "lan0", "uplink"] {
            let status = Command::new("ip")
                .args(["-n", &namespace, "link", "set", link, "down"])
                .status()
                .expect("ip link set");
            assert!(status.success(), "cannot cut {link} of hostA");
        }
        let at = Instant::now();
        for pid in self.hosts().pids("hostA") {
            signal(pid, libc::SIGKILL);
        }
        if let Some(mirror) = &mut self.mirror {
            mirror.kill_primary();
        }
        if let Some(guest) = self.guest.take() {
            self.console_a = guest.console();
        }
        self.primary.take();
        self.nic_a.take();
        at
    }

    /// Restores the VM on hostB from the secondary's replica, as `ftvmd` would: QEMU with
    /// `-incoming defer` on the replica RAM file and hostB's NIC daemon, `restore`,
    /// `announce`. Returns the secondary's answer to `restore`.
    pub fn restore_on_b(&mut self) -> Value {
        self.freeze_and_promote_on_b();
        let mut config = self.config.clone();
        config.name = format!("{}-restored", config.name);
        config.netns = Some(self.hosts().namespace("hostB"));
        if let Some(mirror) = &self.mirror {
            config.disks = vec![Disk {
                socket: mirror.secondary_options.socket.clone(),
                queues: 1,
            }];
        }
        config.ram_file = Some(self.shm.0[1].clone());
        config.incoming_defer = true;
        let qmp = self.dir.path().join("qmp-B.sock");
        config.qmp = Some(qmp.clone());
        config.env = Vec::new();
        config.nics = vec![Nic {
            socket: self.nic_b.socket.clone(),
            mac: GUEST_MAC.into(),
            queues: 1,
        }];
        let restored = Guest::boot(&config, self.dir.path());
        poll_until(Duration::from_secs(30), "the restored QEMU's QMP", || {
            qmp.exists()
        });
        let reply = status_json_command(
            &self.secondary_control,
            &format!("restore {}", qmp.display()),
        );
        assert_eq!(
            reply["ok"],
            true,
            "restore failed: {reply}\nsecondary log:\n{}",
            self.log("checkpoint-B.log")
        );
        let announced = status_json_command(&self.nic_b.control, "announce");
        assert_eq!(announced["ok"], true, "announce refused: {announced}");
        self.restored = Some(restored);
        reply
    }

    /// The first half of [`Level3Pair::restore_on_b`] (done once): `freeze` the replica and
    /// promote hostB's disk at its epoch, which is returned. Between the two halves the
    /// replica RAM file and hostB's image are the checkpoint that will be restored.
    pub fn freeze_and_promote_on_b(&mut self) -> u64 {
        if let Some(epoch) = self.frozen_epoch {
            return epoch;
        }
        // No epoch changes the replica from here on; the disks are promoted at its epoch.
        let frozen = status_json_command(&self.secondary_control, "freeze");
        assert_eq!(frozen["restorable"], true, "nothing to restore: {frozen}");
        let epoch = frozen["epoch"].as_u64().expect("the frozen epoch");
        if let Some(mirror) = &self.mirror {
            // As ftvmd would once the witness granted hostB: its copy serves, at the next
            // generation, with exactly the writes of the checkpoints up to the replica's.
            let secondary = mirror.secondary();
            let disk = secondary.status();
            let sealed = disk["replication"]["epochs"]["sealed_epoch"].as_u64();
            assert!(
                sealed.is_some_and(|sealed| sealed >= epoch),
                "hostB's disk has not sealed checkpoint {epoch} (its writes are buffered per checkpoint): {disk}"
            );
            let generation = secondary.status()["replication"]["generation"]
                .as_u64()
                .unwrap_or(0)
                + 1;
            let reply = secondary.command(&format!("promote {generation} {epoch}"));
            assert_eq!(
                reply["ok"], true,
                "promote {generation} {epoch} refused: {reply}"
            );
        }
        self.frozen_epoch = Some(epoch);
        epoch
    }
}

/// Starts a secondary engine on hostB (what [`Level3Pair`] runs there) and waits for its
/// control socket.
pub fn start_secondary(
    hosts: &Hosts,
    dir: &Path,
    psk: &Path,
    replica: &Path,
    control: &Path,
    disk: Option<&Path>,
) -> Process {
    let mut command = hosts.command(HOSTS[1], paths::binary("ftvm-checkpoint"));
    command
        .args([
            "secondary",
            "--vm",
            VM,
            "--host-id",
            "hostB",
            "--peer-id",
            "hostA",
        ])
        .arg("--ram")
        .arg(replica)
        .arg("--ram-mib")
        .arg(RAM_MB.to_string())
        .arg("--state-dir")
        .arg(dir.join("replica-state"))
        .arg("--psk-file")
        .arg(psk)
        .arg("--control")
        .arg(control);
    if let Some(disk) = disk {
        command.arg("--disk").arg(disk);
    }
    for address in ALINKS[1] {
        command
            .arg("--listen")
            .arg(format!("{address}:{CHECKPOINT_PORT}"));
    }
    let process = Process::spawn(
        "ftvm-checkpoint secondary",
        command,
        &dir.join("checkpoint-B.log"),
    );
    poll_until(
        Duration::from_secs(10),
        "the secondary engine's socket",
        || control.exists(),
    );
    process
}

/// A command's JSON answer on a control socket (panics, naming both, when there is none).
pub fn status_json_command(socket: &Path, command: &str) -> Value {
    control_json(socket, command)
        .unwrap_or_else(|| panic!("{}: {command}: no JSON answer", socket.display()))
}

/// The counters a guest tool (`tests/guest/udpseq.c`, `tests/guest/recwriter.c`) keeps in
/// a page of its memory marked with `magic`: the third word of every page of the RAM file
/// at `path` that starts with the words `magic` and `magic` rotated left by 17.
pub fn counters_in_ram(path: &Path, magic: u64) -> Vec<u64> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)
        .unwrap_or_else(|error| panic!("cannot open {}: {error}", path.display()));
    let marker = [magic, magic.rotate_left(17)];
    let mut counters = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let mut filled = 0;
        while filled < chunk.len() {
            match file.read(&mut chunk[filled..]) {
                Ok(0) => break,
                Ok(len) => filled += len,
                Err(error) => panic!("cannot read {}: {error}", path.display()),
            }
        }
        for page in chunk[..filled].chunks_exact(4096) {
            let word = |index: usize| {
                let bytes = &page[index * 8..index * 8 + 8];
                u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
            };
            if [word(0), word(1)] == marker {
                counters.push(word(2));
            }
        }
        if filled < chunk.len() {
            return counters;
        }
    }
}
