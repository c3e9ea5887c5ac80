//! Protected libvirt domains (`ftvm protect --domain`): ftvmd defines the domain's
//! protected XML (`crate::libvirt`) and starts it with `virsh`, on whichever host is the
//! primary; the other VMs run as QEMU processes ([`QemuLauncher`]).
//!
//! QEMU is then libvirtd's child, not ftvmd's: ftvmd learns its pid from the QMP monitor it
//! adds to the domain (the socket's peer credentials), watches `/proc`, and asks libvirt
//! why it ended (`virsh domstate --reason`: an operator's `virsh shutdown`/`destroy` is a
//! planned stop, a crash a failure). Pausing and resuming go through that monitor, as for
//! QEMU processes; stopping is `virsh destroy`.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::processes::{qmp_command, QemuLauncher, RunningVm, VmLauncher, VmSpec};
use crate::libvirt::{protected_xml, Protection, Virsh};

/// How long a started domain's QEMU may take to open ftvmd's monitor (the start waits
/// for the disk daemons' sockets first).
const MONITOR_TIMEOUT: Duration = Duration::from_secs(60);
/// How long libvirt may take to record why a domain's QEMU ended.
const STATE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `virsh destroy` may take to end QEMU.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(15);

/// A VM that is a libvirt domain.
#[derive(Clone, Debug)]
pub struct DomainSpec {
    pub uri: String,
    /// The operator's XML, as `ftvm protect --domain` found it (image paths as on the
    /// primary that protected it).
    pub original_xml: String,
    /// ftvmd's control socket, named in the domain's metadata for the hook.
    pub control_socket: PathBuf,
    /// Where the protected XML is written before `virsh define`.
    pub definition: PathBuf,
}

/// ftvmd's launcher: libvirt for protected domains, QEMU for the others.
#[derive(Debug)]
pub struct HostLauncher {
    pub qemu: QemuLauncher,
}

impl VmLauncher for HostLauncher {
    fn launch(&self, spec: &VmSpec) -> io::Result<Box<dyn RunningVm>> {
        match &spec.domain {
            Some(domain) => launch_domain(spec, domain),
            None => self.qemu.launch(spec),
        }
    }

    fn prepare(&self, spec: &VmSpec) -> io::Result<()> {
        match &spec.domain {
            Some(domain) => define(spec, domain).map(drop),
            None => Ok(()),
        }
    }
}

fn other(message: String) -> io::Error {
    io::Error::other(message)
}

/// Defines the domain's protected XML here.
fn define(spec: &VmSpec, domain: &DomainSpec) -> io::Result<Virsh> {
    let disks: Vec<PathBuf> = spec
        .disks
        .iter()
        .map(|(socket, _)| socket.clone())
        .collect();
    let nics: Vec<PathBuf> = spec
        .nics
        .iter()
        .map(|(socket, _, _)| socket.clone())
        .collect();
    let xml = protected_xml(
        &domain.original_xml,
        &Protection {
            vm: &spec.name,
            control_socket: &domain.control_socket,
            disks: &disks,
            nics: &nics,
            qmp: &spec.qmp,
            engine_qmp: &spec.engine_qmp,
        },
    )
    .map_err(other)?;
    let virsh = Virsh::new(&domain.uri);
    virsh.define(&xml, &domain.definition).map_err(other)?;
    Ok(virsh)
}

/// Defines and starts the domain, or takes over the one that runs already (started by
/// the operator with `virsh start`, which the hook allowed, or left by a past ftvmd).
fn launch_domain(spec: &VmSpec, domain: &DomainSpec) -> io::Result<Box<dyn RunningVm>> {
    let virsh = Virsh::new(&domain.uri);
    if !virsh.active(&spec.name).unwrap_or(false) {
        // A monitor socket a past QEMU left refuses connections until the new QEMU binds
        // it again: [`monitor_pid`] waits for that.
        define(spec, domain)?;
        if let Err(error) = virsh.run(&["start", &spec.name]) {
            // Started meanwhile by the operator (the hook let both through): take it.
            if !virsh.active(&spec.name).unwrap_or(false) {
                return Err(other(error));
            }
        }
    }
    let pid = monitor_pid(&spec.qmp, MONITOR_TIMEOUT)?;
    Ok(Box::new(DomainVm {
        virsh,
        name: spec.name.clone(),
        pid,
        started: start_time(pid),
        qmp: spec.qmp.clone(),
    }))
}

/// The pid of the QEMU serving the monitor socket at `path` (its peer credentials).
fn monitor_pid(path: &Path, timeout: Duration) -> io::Result<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return peer_pid(&stream),
            Err(error) if Instant::now() >= deadline => {
                return Err(other(format!(
                    "the domain's QEMU did not open ftvmd's monitor {} within {} s: {error}",
                    path.display(),
                    timeout.as_secs()
                )))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn peer_pid(stream: &UnixStream) -> io::Result<u32> {
    let credentials = daemon_util::peer_credentials(stream)?;
    u32::try_from(credentials.pid).map_err(|_| other("the monitor has no peer process".into()))
}

/// The start time of process `pid` (field 22 of its stat), to tell it from a later
/// process with the same pid; `None` once it is gone or a zombie.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// A running domain.
#[derive(Debug)]
struct DomainVm {
    virsh: Virsh,
    name: String,
    pid: u32,
    started: Option<u64>,
    qmp: PathBuf,
}

impl DomainVm {
    fn alive(&self) -> bool {
        self.started.is_some() && start_time(self.pid) == self.started
    }
}

impl RunningVm for DomainVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn exited(&mut self) -> Option<String> {
        if self.alive() {
            return None;
        }
        // libvirtd notices the end a moment after the process is gone: until then it
        // still says running (or `in shutdown`), without the final reason.
        let deadline = Instant::now() + STATE_TIMEOUT;
        loop {
            match self.virsh.state(&self.name) {
                // `running`, `paused`, `in shutdown`: not final yet.
                Ok(state) if !state.starts_with("shut off") && !state.starts_with("crashed") => {
                    if Instant::now() >= deadline {
                        return Some(format!("QEMU is gone, libvirt still says {state}"));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Ok(state) => return Some(format!("libvirt says {state}")),
                Err(error) => return Some(format!("QEMU is gone ({error})")),
            }
        }
    }

    fn stop(&mut self) {
        if !self.alive() {
            return;
        }
        if let Err(error) = self.virsh.run(&["destroy", &self.name]) {
            log::warn!("{}: {error}", self.name);
        }
        let deadline = Instant::now() + DESTROY_TIMEOUT;
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.alive() {
            if let Ok(pid) = libc::pid_t::try_from(self.pid) {
                log::warn!("{}: QEMU outlived virsh destroy: killing it", self.name);
                // SAFETY: kill(2) of the QEMU whose start time we checked just above.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }

    fn pause(&mut self) -> Result<(), String> {
        qmp_command(&self.qmp, "stop")
    }

    fn resume(&mut self) -> Result<(), String> {
        qmp_command(&self.qmp, "cont")
    }
}
