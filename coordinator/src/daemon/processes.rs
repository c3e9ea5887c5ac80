//! The processes `ftvmd` runs for a VM: one `vhost-blk-mirror` per disk, one `vhost-net-ft`
//! per NIC, and on the primary the VM itself, started through [`VmLauncher`] (QEMU here;
//! libvirt domains in `libvirt_launcher`).
//!
//! Children get `PR_SET_PDEATHSIG = SIGKILL`: if `ftvmd` dies, its VMs and daemons die
//! with it, and the peer takes over. A host whose supervisor is gone is a failed host, not
//! a host whose VM runs on unsupervised.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::qmp;
use crate::host::Role;

/// How long a QMP command to QEMU may take (a `stop` waits for the disk daemons to hand
/// back their rings, which they do within 300 ms).
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopping child gets after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Everything needed to run one disk's daemon on this host.
#[derive(Clone, Debug)]
pub struct DiskSpec {
    pub binary: PathBuf,
    pub image: PathBuf,
    pub queues: u16,
    pub serial: String,
    /// The vhost-user socket QEMU connects to.
    pub socket: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
    /// The peer's replication addresses (one per A-link).
    pub peer: Vec<SocketAddr>,
    /// This host's replication addresses (one per A-link).
    pub listen: Vec<SocketAddr>,
    pub psk_file: PathBuf,
    pub host_name: String,
    pub resync_rate_limit: Option<String>,
}

/// A child process `ftvmd` started and supervises: a disk daemon, a NIC daemon or QEMU.
#[derive(Debug)]
pub struct Supervised {
    child: Child,
}

impl Supervised {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(description)` once the process has ended.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(error) => Some(format!("cannot be waited for: {error}")),
        }
    }

    /// SIGKILL at once; reaps.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL after a grace period; always reaps.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on the pid of our own child, which is not yet reaped.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `vhost-blk-mirror`.
#[derive(Debug)]
pub struct DiskProcess {
    pub process: Supervised,
    pub role: Role,
    pub started: Instant,
    /// It was told to `fence`: it never acknowledges again, and serving needs a new one.
    pub fenced: bool,
}

impl DiskProcess {
    /// Starts the daemon in `role`. Both roles get both `--peer` and `--listen`, so that
    /// `promote` and `demote` work in place.
    pub fn start(spec: &DiskSpec, role: Role) -> io::Result<DiskProcess> {
        let mut command = Command::new(&spec.binary);
        command
            .arg("--socket")
            .arg(&spec.socket)
            .arg("--image")
            .arg(&spec.image)
            .arg("--queues")
            .arg(spec.queues.to_string())
            .arg("--serial")
            .arg(&spec.serial)
            .arg("--control")
            .arg(&spec.control)
            .arg("--role")
            .arg(match role {
                Role::Primary => "primary",
                Role::Secondary => "secondary",
            })
            .arg("--psk-file")
            .arg(&spec.psk_file)
            .arg("--host-id")
            .arg(&spec.host_name);
        if let Some(rate) = &spec.resync_rate_limit {
            command.arg("--resync-rate-limit").arg(rate);
        }
        for address in &spec.peer {
            command.arg("--peer").arg(address.to_string());
        }
        for address in &spec.listen {
            command.arg("--listen").arg(address.to_string());
        }
        Ok(DiskProcess {
            process: spawn_logged(&mut command, &spec.log)?,
            role,
            started: Instant::now(),
            fenced: false,
        })
    }
}

/// Everything needed to run one NIC's `vhost-net-ft` on this host.
#[derive(Clone, Debug)]
pub struct NicSpec {
    pub binary: PathBuf,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
    pub mac: String,
    pub bridge: String,
    pub queues: u16,
    /// The redundant uplink through the peer (Level 2), if the NIC has one.
    pub redundancy: Option<NicRedundancy>,
}

/// What a NIC daemon needs to pair with the same NIC's daemon on the peer host, so that
/// the guest's frames can leave through the peer's bridge when this host's uplink fails.
#[derive(Clone, Debug)]
pub struct NicRedundancy {
    /// This host's port of the bridge to the LAN, watched for link loss.
    pub uplink: String,
    /// The peer's NIC daemon, one address per A-link.
    pub peer: Vec<SocketAddr>,
    /// Where this host's NIC daemon accepts the peer's, one address per A-link.
    pub listen: Vec<SocketAddr>,
    /// The pair's key (the same file as the `ftvmd` peer link's).
    pub psk_file: PathBuf,
    pub host_name: String,
}

/// Starts a NIC's `vhost-net-ft` (with its redundant uplink's options if it has one).
pub fn start_nic(spec: &NicSpec) -> io::Result<Supervised> {
    let mut command = Command::new(&spec.binary);
    command
        .arg("--socket")
        .arg(&spec.socket)
        .arg("--bridge")
        .arg(&spec.bridge)
        .arg("--mac")
        .arg(&spec.mac)
        .arg("--queues")
        .arg(spec.queues.to_string())
        .arg("--control")
        .arg(&spec.control);
    if let Some(redundancy) = &spec.redundancy {
        command
            .arg("--uplink")
            .arg(&redundancy.uplink)
            .arg("--psk-file")
            .arg(&redundancy.psk_file)
            .arg("--host-id")
            .arg(&redundancy.host_name);
        for address in &redundancy.peer {
            command.arg("--peer").arg(address.to_string());
        }
        for address in &redundancy.listen {
            command.arg("--listen").arg(address.to_string());
        }
    }
    spawn_logged(&mut command, &spec.log)
}

/// Everything needed to run a VM's Level 3 checkpoint engine (`ftvm-checkpoint`) here:
/// `primary` where the VM runs, `secondary` (the replica) on the other host.
#[derive(Clone, Debug)]
pub struct EngineSpec {
    pub binary: PathBuf,
    pub vm: String,
    pub control: PathBuf,
    pub log: PathBuf,
    /// The secondary's committed record (the last checkpoint's device state).
    pub state_dir: PathBuf,
    /// The guest's RAM file on the primary; the replica on the secondary (the same path:
    /// a restore's QEMU maps the replica in place).
    pub ram_file: PathBuf,
    pub ram_mib: u32,
    /// The RAM tracking library's socket inside QEMU.
    pub ram_track: PathBuf,
    /// QEMU's monitor for the engine.
    pub qmp: PathBuf,
    /// The control sockets of the VM's disk daemons and NIC daemons here.
    pub disks: Vec<PathBuf>,
    pub nics: Vec<PathBuf>,
    /// `checkpoint_port`: none, no Level 3.
    pub port: Option<u16>,
    /// The peer's A-link addresses (their ports are replaced by `port`).
    pub peer: Vec<SocketAddr>,
    /// This host's A-link addresses (likewise).
    pub listen: Vec<SocketAddr>,
    pub psk_file: PathBuf,
    pub host_name: String,
    pub peer_name: String,
    pub interval_ms: u64,
}

/// Starts a checkpoint engine: `primary` (at `generation`, the fencing token the replica
/// checks) or `secondary`.
pub fn start_engine(spec: &EngineSpec, role: Role, generation: u64) -> io::Result<Supervised> {
    let Some(port) = spec.port else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no checkpoint_port is configured",
        ));
    };
    let at_port = |addresses: &[SocketAddr]| {
        addresses
            .iter()
            .map(|address| SocketAddr::new(address.ip(), port).to_string())
            .collect::<Vec<_>>()
    };
    let mut command = Command::new(&spec.binary);
    match role {
        Role::Primary => {
            command
                .args(["primary", "--vm", &spec.vm])
                .arg("--qmp")
                .arg(&spec.qmp)
                .arg("--ram")
                .arg(&spec.ram_file)
                .arg("--ram-track")
                .arg(&spec.ram_track)
                .arg("--generation")
                .arg(generation.to_string())
                .arg("--interval-ms")
                .arg(spec.interval_ms.to_string());
            for nic in &spec.nics {
                command.arg("--nic").arg(nic);
            }
            for peer in at_port(&spec.peer) {
                command.arg("--peer").arg(peer);
            }
        }
        Role::Secondary => {
            command
                .args(["secondary", "--vm", &spec.vm])
                .arg("--ram")
                .arg(&spec.ram_file)
                .arg("--ram-mib")
                .arg(spec.ram_mib.to_string())
                .arg("--state-dir")
                .arg(&spec.state_dir)
                .arg("--peer-id")
                .arg(&spec.peer_name);
            for listen in at_port(&spec.listen) {
                command.arg("--listen").arg(listen);
            }
        }
    }
    for disk in &spec.disks {
        command.arg("--disk").arg(disk);
    }
    command
        .arg("--psk-file")
        .arg(&spec.psk_file)
        .arg("--host-id")
        .arg(&spec.host_name)
        .arg("--control")
        .arg(&spec.control);
    spawn_logged(&mut command, &spec.log)
}

/// What the launcher needs to start a VM.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub name: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub accel: String,
    /// The vhost-user-blk socket and queue count of each disk.
    pub disks: Vec<(PathBuf, u16)>,
    /// The vhost-user-net socket, MAC and queue pairs of each NIC.
    pub nics: Vec<(PathBuf, String, u16)>,
    /// The guest's serial console is appended to this file.
    pub console: PathBuf,
    /// QEMU's QMP socket, for pausing and resuming the guest.
    pub qmp: PathBuf,
    /// A second QMP monitor, the checkpoint engine's (Level 3): QEMU serves one client per
    /// monitor, and the engine keeps its connection.
    pub engine_qmp: PathBuf,
    /// The guest agent's channel (`org.qemu.guest_agent.0` on a virtio-serial port; QEMU
    /// listens here), always given: a guest without `qemu-ga` never answers on it.
    pub guest_agent: PathBuf,
    /// The guest's RAM, a file shared with the daemons (and read by the Level 3 engine).
    pub ram_file: PathBuf,
    /// The Level 3 RAM tracking library (`LD_PRELOAD`) and its socket, when installed: QEMU
    /// always runs with it, so that Level 3 can start on a running VM.
    pub ram_track: Option<(PathBuf, PathBuf)>,
    /// Start QEMU waiting for an incoming migration (`-incoming defer`): the Level 3
    /// restore of a replica, whose RAM file is kept as it is.
    pub incoming: bool,
    pub log: PathBuf,
    pub extra_args: Vec<String>,
    /// A domain protected with `ftvm protect --domain`: run through libvirt.
    pub domain: Option<super::libvirt_launcher::DomainSpec>,
}

/// A started VM.
pub trait RunningVm: Send + std::fmt::Debug {
    fn pid(&self) -> u32;
    /// `Some(description)` once the VM has ended.
    fn exited(&mut self) -> Option<String>;
    /// Stops the VM now (its disks keep every acknowledged write).
    fn stop(&mut self);
    /// Pauses the guest's CPUs and devices: no more guest output, no new I/O.
    fn pause(&mut self) -> Result<(), String>;
    /// Resumes a paused guest.
    fn resume(&mut self) -> Result<(), String>;
}

/// Starts VMs: the one place that knows how (QEMU processes here, libvirt domains in
/// `libvirt_launcher`). Called from a VM's agent thread, never from the deciding one.
pub trait VmLauncher: Send + Sync + std::fmt::Debug {
    fn launch(&self, spec: &VmSpec) -> io::Result<Box<dyn RunningVm>>;
    /// Makes the VM known where it may run later without starting it (libvirt: defines
    /// the protected domain, so that its hook guards `virsh start`).
    fn prepare(&self, _spec: &VmSpec) -> io::Result<()> {
        Ok(())
    }
}

/// Runs QEMU directly.
#[derive(Debug)]
pub struct QemuLauncher {
    pub binary: PathBuf,
}

impl QemuLauncher {
    /// QEMU's arguments for `spec`: memory shared with the vhost-user daemons, one
    /// vhost-user-blk device per disk, the serial console to a file.
    pub fn args(spec: &VmSpec) -> Vec<String> {
        let memory = spec.memory_mib;
        let mut args: Vec<String> = vec![
            "-name".into(),
            spec.name.clone(),
            "-accel".into(),
            spec.accel.clone(),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            format!("{memory}M"),
            "-object".into(),
            format!(
                "memory-backend-file,id=mem,size={memory}M,mem-path={},share=on",
                spec.ram_file.display()
            ),
            "-machine".into(),
            "memory-backend=mem".into(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-chardev".into(),
            format!("file,id=console,path={},append=on", spec.console.display()),
            "-serial".into(),
            "chardev:console".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", spec.qmp.display()),
            "-chardev".into(),
            format!(
                "socket,id=engine-qmp,path={},server=on,wait=off",
                spec.engine_qmp.display()
            ),
            "-mon".into(),
            "chardev=engine-qmp,mode=control".into(),
            "-chardev".into(),
            format!(
                "socket,id=guest-agent,path={},server=on,wait=off",
                spec.guest_agent.display()
            ),
            "-device".into(),
            "virtio-serial-pci,id=guest-agent-serial".into(),
            "-device".into(),
            format!(
                "virtserialport,bus=guest-agent-serial.0,chardev=guest-agent,name={}",
                super::guest_agent::CHANNEL_NAME
            ),
        ];
        if spec.incoming {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        for (index, (socket, queues)) in spec.disks.iter().enumerate() {
            args.extend([
                "-chardev".into(),
                format!(
                    "socket,id=disk{index},path={},reconnect=1",
                    socket.display()
                ),
                "-device".into(),
                format!("vhost-user-blk-pci,chardev=disk{index},num-queues={queues}"),
            ]);
        }
        for (index, (socket, mac, queues)) in spec.nics.iter().enumerate() {
            // QEMU 7.2 under TCG needs vectors=0 on virtio-net-pci; with KVM MSI-X stays.
            let vectors = if spec.accel == "tcg" {
                ",vectors=0"
            } else {
                ""
            };
            let mq = if *queues > 1 { "on" } else { "off" };
            args.extend([
                "-chardev".into(),
                format!("socket,id=nic{index},path={},reconnect=1", socket.display()),
                "-netdev".into(),
                format!("vhost-user,id=net{index},chardev=nic{index},queues={queues}"),
                "-device".into(),
                format!("virtio-net-pci,netdev=net{index},mac={mac},mq={mq}{vectors}"),
            ]);
        }
        args.extend(spec.extra_args.iter().cloned());
        args
    }
}

impl VmLauncher for QemuLauncher {
    fn launch(&self, spec: &VmSpec) -> io::Result<Box<dyn RunningVm>> {
        if let Some(dir) = spec.ram_file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if !spec.incoming {
            // A fresh boot gets fresh memory, never a stale replica's or a past run's.
            match std::fs::remove_file(&spec.ram_file) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        let mut command = Command::new(&self.binary);
        command.args(QemuLauncher::args(spec));
        if let Some((library, socket)) = &spec.ram_track {
            command
                .env("LD_PRELOAD", library)
                .env("FTVM_RAM_TRACK_SOCKET", socket);
        }
        Ok(Box::new(QemuVm {
            process: spawn_logged(&mut command, &spec.log)?,
            qmp: spec.qmp.clone(),
        }))
    }
}

#[derive(Debug)]
struct QemuVm {
    process: Supervised,
    qmp: PathBuf,
}

impl QemuVm {
    fn qmp(&self, command: &str) -> Result<(), String> {
        qmp_command(&self.qmp, command)
    }
}

/// One QMP command on the monitor at `path`, answered within [`QMP_TIMEOUT`].
pub fn qmp_command(path: &Path, command: &str) -> Result<(), String> {
    qmp::execute(path, command, QMP_TIMEOUT)
        .map(drop)
        .map_err(|error| crate::error_chain(&error))
}

impl RunningVm for QemuVm {
    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn exited(&mut self) -> Option<String> {
        self.process.exited()
    }

    fn stop(&mut self) {
        self.process.stop();
    }

    fn pause(&mut self) -> Result<(), String> {
        self.qmp("stop")
    }

    fn resume(&mut self) -> Result<(), String> {
        self.qmp("cont")
    }
}

/// Spawns with stdout and stderr appended to `log`, stdin closed, and SIGKILL when the
/// spawning thread ends (an agent thread ends only after stopping its child; the process
/// ending ends them all).
fn spawn_logged(command: &mut Command, log: &Path) -> io::Result<Supervised> {
    let file = OpenOptions::new().create(true).append(true).open(log)?;
    let errors = file.try_clone()?;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(errors));
    // Only ftvmd speaks to systemd: a child must not ping its watchdog or say it is ready.
    for variable in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        command.env_remove(variable);
    }
    // SAFETY: prctl(PR_SET_PDEATHSIG) and setpriority(2) are async-signal-safe and touch
    // no memory of the parent; they run in the child between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            // ftvmd runs above its guests (`coordinator::DAEMON_NICE`); QEMU and the
            // daemons do not. A failure leaves the child at ftvmd's priority: harmless.
            libc::setpriority(libc::PRIO_PROCESS, 0, 0);
            Ok(())
        });
    }
    command
        .spawn()
        .map(|child| Supervised { child })
        .map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("cannot start {:?}: {error}", command.get_program()),
            )
        })
}

/// A supervised child with its output discarded, for unit tests.
#[cfg(test)]
pub fn spawn_for_test(mut command: Command) -> Supervised {
    spawn_logged(&mut command, Path::new("/dev/null")).expect("spawn")
}

/// Creates `path` empty if missing (the console file, so that readers find it at once).
pub fn touch(path: &Path) -> io::Result<()> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(|_: File| ())
}
