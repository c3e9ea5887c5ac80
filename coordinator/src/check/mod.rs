//! `ftvm check`: can each VM run on either host of the pair? Each host's ftvmd gathers its
//! own facts ([`HostFacts`]: QEMU, KVM, bridges, ports, disk space, memory, CPUs, clock),
//! the peer's come over the peer link, and [`compare`] turns both into findings, one line
//! each with what to do. `ftvm protect` refuses while a finding is blocking.

mod compare;
pub mod facts;
pub mod probe;

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use compare::{compare, Comparison};

use crate::config::{Config, VmSection};

/// QEMU's CPU model when `qemu_args` name none (`-cpu`).
pub const DEFAULT_CPU_MODEL: &str = "qemu64";
/// QEMU's machine type when `qemu_args` name none (`-machine TYPE` or `-M TYPE`).
pub const DEFAULT_MACHINE: &str = "pc";
/// Clocks further apart than this are a finding.
pub const CLOCK_BOUND_MS: u64 = 500;
/// Memory a VM's QEMU needs besides the guest's RAM (device state, TCG's code cache in use,
/// the vhost-user daemons), counted for each VM a host would take over.
pub const OVERHEAD_PER_VM_MIB: u64 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The VM could not run (or not be protected) on a host: `protect` refuses.
    Blocking,
    /// It runs, with a risk or a cost the operator should know.
    Warning,
}

/// One line of `ftvm check`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub severity: Severity,
    /// The VM concerned; empty for the pair.
    pub vm: String,
    /// The host where it was found; empty when it is about both.
    pub host: String,
    pub what: String,
    pub remedy: String,
}

impl Finding {
    /// `blocking hostA vm1: WHAT -> REMEDY`.
    pub fn line(&self) -> String {
        let severity = match self.severity {
            Severity::Blocking => "blocking",
            Severity::Warning => "warning ",
        };
        let host = if self.host.is_empty() {
            "-"
        } else {
            &self.host
        };
        let vm = if self.vm.is_empty() { "-" } else { &self.vm };
        format!(
            "{severity} {host:<8} {vm:<10} {} -> {}",
            self.what, self.remedy
        )
    }
}

/// What one VM needs of a host, from the configuration (the same on both hosts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNeeds {
    pub name: String,
    /// The level to check for (the configured one, or the one `protect` asks for).
    pub level: u8,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub accel: String,
    pub cpu_model: String,
    pub machine: String,
    pub nics: Vec<NicNeeds>,
    /// TCP ports its daemons listen on, on this host's A-link addresses.
    pub ports: Vec<PortNeed>,
    /// Unix sockets its daemons listen on (vhost-user, control).
    pub sockets: Vec<SocketNeed>,
    pub disks: Vec<PathBuf>,
    /// The guest's RAM file (at Level 3 the secondary's replica).
    pub ram_file: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicNeeds {
    pub mac: String,
    pub bridge: String,
    pub uplink: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortNeed {
    pub port: u16,
    /// The configuration key that names it, e.g. `checkpoint_port`.
    pub what: String,
    pub addresses: Vec<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketNeed {
    pub path: PathBuf,
    pub what: String,
}

/// What a VM needs, from its `[[vm]]` section; `level` overrides the configured level.
pub fn vm_needs(config: &Config, section: &VmSection, level: Option<u8>) -> VmNeeds {
    let dir = config.host.state_dir.join(&section.name);
    let listen = &config.peer.listen;
    let port = |port: u16, what: &str| PortNeed {
        port,
        what: what.to_owned(),
        addresses: listen
            .iter()
            .map(|address| SocketAddr::new(address.ip(), port))
            .collect(),
    };
    let mut ports = Vec::new();
    let mut sockets = Vec::new();
    for (index, disk) in section.disk.iter().enumerate() {
        ports.push(port(
            disk.replication_port,
            &format!("replication_port of disk {index}"),
        ));
        sockets.push(SocketNeed {
            path: dir.join(format!("disk{index}.sock")),
            what: format!("vhost-user socket of disk {index}"),
        });
    }
    for (index, nic) in section.nic.iter().enumerate() {
        if let Some((_, link_port)) = nic.redundant_uplink() {
            ports.push(port(link_port, &format!("link_port of NIC {}", nic.mac)));
        }
        sockets.push(SocketNeed {
            path: dir.join(format!("nic{index}.sock")),
            what: format!("vhost-user socket of NIC {}", nic.mac),
        });
    }
    if let Some(checkpoint) = section.checkpoint_port {
        ports.push(port(checkpoint, "checkpoint_port"));
    }
    VmNeeds {
        name: section.name.clone(),
        level: level.unwrap_or(section.level),
        memory_mib: u64::from(section.memory_mib),
        vcpus: section.vcpus,
        accel: section.accel.clone(),
        cpu_model: qemu_option(&section.qemu_args, &["-cpu"], "")
            .unwrap_or_else(|| DEFAULT_CPU_MODEL.to_owned()),
        machine: qemu_option(&section.qemu_args, &["-machine", "-M"], "type=")
            .unwrap_or_else(|| DEFAULT_MACHINE.to_owned()),
        nics: section
            .nic
            .iter()
            .map(|nic| NicNeeds {
                mac: nic.mac.clone(),
                bridge: nic.bridge.clone(),
                uplink: nic.uplink.clone(),
            })
            .collect(),
        ports,
        sockets,
        disks: section.disk.iter().map(|disk| disk.image.clone()).collect(),
        ram_file: config.host.ram_dir.join(format!("{}.ram", section.name)),
    }
}

/// The model or type an option of `args` names (the last one wins, as in QEMU): its first
/// comma-separated part, or its `key=` part (`-machine type=q35,accel=kvm`). Parts like
/// `memory-backend=mem` that are neither are skipped.
fn qemu_option(args: &[String], options: &[&str], key: &str) -> Option<String> {
    let mut found = None;
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if !options.contains(&word.as_str()) {
            continue;
        }
        let Some(value) = words.next() else { break };
        for (index, part) in value.split(',').enumerate() {
            if !key.is_empty() {
                if let Some(named) = part.strip_prefix(key) {
                    found = Some(named.to_owned());
                    continue;
                }
            }
            if index == 0 && !part.contains('=') && !part.is_empty() {
                found = Some(part.to_owned());
            }
        }
    }
    found
}

/// One host's facts, gathered by its ftvmd ([`facts::gather`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostFacts {
    pub host: String,
    /// The host's clock when the facts were sent, milliseconds since 1970.
    pub unix_ms: u64,
    pub qemu: Result<probe::QemuFacts, String>,
    /// KVM's supported CPUID, or why `/dev/kvm` does not open.
    pub kvm: Result<probe::KvmFacts, String>,
    /// `MemAvailable` of `/proc/meminfo`.
    pub memory_available_mib: u64,
    /// CPUs ftvmd may run on.
    pub cpus: u32,
    pub vms: Vec<VmFacts>,
}

/// One VM's needs and what this host offers it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmFacts {
    pub needs: VmNeeds,
    /// The VM runs (or would start) here: this host is its primary.
    pub primary_here: bool,
    /// Bytes of the RAM file already allocated on this host.
    pub ram_allocated_bytes: u64,
    pub nics: Vec<facts::NicFacts>,
    /// Ports and sockets it needs that a process other than ftvm's holds.
    pub taken: Vec<facts::Taken>,
    pub disks: Vec<facts::DiskFacts>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|word| (*word).to_owned()).collect()
    }

    #[test]
    fn the_cpu_model_and_machine_come_from_qemu_args() {
        let words = args(&["-kernel", "k", "-cpu", "Icelake-Server,+avx2", "-M", "q35"]);
        assert_eq!(
            qemu_option(&words, &["-cpu"], "").as_deref(),
            Some("Icelake-Server")
        );
        assert_eq!(
            qemu_option(&words, &["-machine", "-M"], "type=").as_deref(),
            Some("q35")
        );
        let words = args(&[
            "-machine",
            "accel=kvm,type=pc-i440fx-7.2",
            "-machine",
            "x=1",
        ]);
        assert_eq!(
            qemu_option(&words, &["-machine", "-M"], "type=").as_deref(),
            Some("pc-i440fx-7.2")
        );
        assert_eq!(qemu_option(&args(&["-cpu"]), &["-cpu"], ""), None);
        assert_eq!(qemu_option(&args(&[]), &["-cpu"], ""), None);
    }
}
