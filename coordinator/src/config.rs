//! `ftvmd`'s configuration file (TOML): this host, its peer, the witness, the protected VMs.
//! Every mistake is reported with what is wrong and where, before anything starts.
//!
//! ```toml
//! [host]
//! name = "hostA"
//! state_dir = "/var/lib/ftvm"
//! control_socket = "/run/ftvm/ftvmd.sock"
//!
//! [peer]
//! name = "hostB"
//! addresses = ["10.77.1.2:7500", "10.77.2.2:7500"]   # one per A-link
//! listen = ["10.77.1.1:7500", "10.77.2.1:7500"]
//! psk_file = "/etc/ftvm/pair.psk"
//!
//! [witness]
//! addresses = ["10.77.0.3:7600"]
//! psk_file = "/etc/ftvm/witness.psk"
//!
//! [[vm]]
//! name = "vm1"
//! level = 2
//! primary = "hostA"
//! memory_mib = 512
//! vcpus = 1
//! [[vm.disk]]
//! image = "/var/lib/ftvm/vm1-disk0.img"
//! replication_port = 7400
//! ```

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::witness_store::MAX_VM_NAME;

/// Most A-links between the two hosts.
pub const MAX_LINKS: usize = 2;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    pub name: String,
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    /// Where `vhost-blk-mirror` is; default: the directory of the `ftvmd` executable.
    #[serde(default)]
    pub bin_dir: Option<PathBuf>,
    /// The QEMU binary.
    #[serde(default = "default_qemu")]
    pub qemu: PathBuf,
}

fn default_qemu() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}

/// Failure detection, in milliseconds.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TimingSection {
    /// The peer is lost when nothing was heard from it on any A-link for this long.
    #[serde(default = "default_peer_timeout")]
    pub peer_timeout_ms: u64,
    /// Extra wait of a secondary before it claims, so that a live primary wins ties.
    #[serde(default = "default_claim_delay")]
    pub secondary_claim_delay_ms: u64,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_ms: u64,
}

impl Default for TimingSection {
    fn default() -> TimingSection {
        TimingSection {
            peer_timeout_ms: default_peer_timeout(),
            secondary_claim_delay_ms: default_claim_delay(),
            heartbeat_interval_ms: default_heartbeat(),
        }
    }
}

fn default_peer_timeout() -> u64 {
    1000
}

fn default_claim_delay() -> u64 {
    500
}

fn default_heartbeat() -> u64 {
    100
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    pub name: String,
    /// The peer's `ftvmd` on each A-link.
    pub addresses: Vec<SocketAddr>,
    /// Where this host's `ftvmd` accepts the peer, one per A-link.
    pub listen: Vec<SocketAddr>,
    pub psk_file: PathBuf,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WitnessSection {
    pub addresses: Vec<SocketAddr>,
    pub psk_file: PathBuf,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    pub image: PathBuf,
    /// The port the disk's secondary listens on, on each A-link address.
    pub replication_port: u16,
    #[serde(default = "default_queues")]
    pub queues: u16,
    /// Most bytes per second a resync may send, like "100M" (default: no limit), so
    /// that an initial or catch-up sync leaves the link to the guest's writes.
    #[serde(default)]
    pub resync_rate_limit: Option<String>,
}

/// A NIC of the VM, served by `vhost-net-ft` on the host that runs the VM.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NicSection {
    /// The VM's MAC: the same on both hosts, so that after a failover the VM answers on
    /// the same MAC (and IP).
    pub mac: String,
    /// The Linux bridge on each host that the NIC's TAP joins (the VMs' LAN).
    pub bridge: String,
    #[serde(default = "default_queues")]
    pub queues: u16,
}

fn default_queues() -> u16 {
    1
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmSection {
    pub name: String,
    /// 1: restart on the peer after a host loss; 2: also component fault tolerance.
    pub level: u8,
    /// The host that runs the VM when protection starts.
    pub primary: String,
    pub memory_mib: u32,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default)]
    pub disk: Vec<DiskSection>,
    #[serde(default)]
    pub nic: Vec<NicSection>,
    /// QEMU accelerator: "kvm" (default) or "tcg" (no hardware virtualisation).
    #[serde(default = "default_accel")]
    pub accel: String,
    /// Extra QEMU arguments (kernel, initrd, …), passed as given.
    #[serde(default)]
    pub qemu_args: Vec<String>,
}

fn default_accel() -> String {
    "kvm".into()
}

fn default_vcpus() -> u32 {
    1
}

/// The whole file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub host: HostSection,
    pub peer: PeerSection,
    pub witness: WitnessSection,
    #[serde(default)]
    pub timing: TimingSection,
    #[serde(default)]
    pub vm: Vec<VmSection>,
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks configuration text; `path` is only for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|error| ConfigError::Syntax {
            path: path.to_owned(),
            message: error.message().to_owned() + &location(text, error.span()),
        })?;
        config.validate().map_err(|what| ConfigError::Invalid {
            path: path.to_owned(),
            what,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        for name in [&self.host.name, &self.peer.name] {
            if !crate::witness_store::valid_name(name) {
                return Err(format!(
                    "host name {name:?} must be 1 to {MAX_VM_NAME} letters, digits, '.', '_' \
                     or '-'"
                ));
            }
        }
        if self.host.name == self.peer.name {
            return Err(format!(
                "host and peer are both named {:?}: each host needs its own name",
                self.host.name
            ));
        }
        for (what, count) in [
            ("peer.addresses", self.peer.addresses.len()),
            ("peer.listen", self.peer.listen.len()),
            ("witness.addresses", self.witness.addresses.len()),
        ] {
            if count == 0 || count > MAX_LINKS {
                return Err(format!(
                    "{what} needs 1 or {MAX_LINKS} addresses, has {count}"
                ));
            }
        }
        let timing = &self.timing;
        if timing.heartbeat_interval_ms == 0
            || timing.peer_timeout_ms < 2 * timing.heartbeat_interval_ms
        {
            return Err(format!(
                "timing: peer_timeout_ms ({}) must be at least twice heartbeat_interval_ms ({}), \
                 which must be above 0",
                timing.peer_timeout_ms, timing.heartbeat_interval_ms
            ));
        }
        let mut names = BTreeSet::new();
        let mut ports = BTreeSet::new();
        for vm in &self.vm {
            self.validate_vm(vm)?;
            if !names.insert(vm.name.as_str()) {
                return Err(format!("VM {:?} is defined twice", vm.name));
            }
            for disk in &vm.disk {
                if !ports.insert(disk.replication_port) {
                    return Err(format!(
                        "replication port {} is used by two disks",
                        disk.replication_port
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_vm(&self, vm: &VmSection) -> Result<(), String> {
        let valid_name = !vm.name.is_empty()
            && vm.name.len() <= MAX_VM_NAME
            && !vm.name.starts_with('.')
            && vm
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if !valid_name {
            return Err(format!(
                "VM name {:?} must be 1 to {MAX_VM_NAME} letters, digits, '.', '_' or '-'",
                vm.name
            ));
        }
        if !matches!(vm.level, 1 | 2) {
            return Err(format!(
                "VM {:?}: level {} is not supported (1: restart on the peer, 2: also \
                 component fault tolerance)",
                vm.name, vm.level
            ));
        }
        if vm.primary != self.host.name && vm.primary != self.peer.name {
            return Err(format!(
                "VM {:?}: primary {:?} is neither this host ({:?}) nor the peer ({:?})",
                vm.name, vm.primary, self.host.name, self.peer.name
            ));
        }
        if vm.memory_mib < 64 {
            return Err(format!(
                "VM {:?}: memory_mib {} is below 64",
                vm.name, vm.memory_mib
            ));
        }
        if vm.vcpus == 0
            || vm
                .disk
                .iter()
                .any(|disk| disk.queues == 0 || disk.queues > 16)
        {
            return Err(format!(
                "VM {:?}: vcpus and disk queues must be 1 or more (queues at most 16)",
                vm.name
            ));
        }
        if !matches!(vm.accel.as_str(), "kvm" | "tcg") {
            return Err(format!(
                "VM {:?}: accel {:?} is not kvm or tcg",
                vm.name, vm.accel
            ));
        }
        if vm.disk.is_empty() {
            return Err(format!(
                "VM {:?}: needs at least one [[vm.disk]]: without a mirrored disk there is \
                 nothing to restart from",
                vm.name
            ));
        }
        for disk in &vm.disk {
            if let Some(rate) = &disk.resync_rate_limit {
                let digits = rate.trim_end_matches(['K', 'k', 'M', 'm', 'G', 'g']);
                if digits.is_empty() || digits.parse::<u64>().is_err() {
                    return Err(format!(
                        "VM {:?}: resync_rate_limit {rate:?} is not a rate like \"100M\" \
                         (bytes per second, with K, M or G)",
                        vm.name
                    ));
                }
            }
        }
        for nic in &vm.nic {
            let octets: Vec<&str> = nic.mac.split(':').collect();
            let valid_mac = octets.len() == 6
                && octets
                    .iter()
                    .all(|octet| octet.len() == 2 && u8::from_str_radix(octet, 16).is_ok())
                && u8::from_str_radix(octets[0], 16).is_ok_and(|first| first & 1 == 0);
            if !valid_mac {
                return Err(format!(
                    "VM {:?}: NIC mac {:?} is not a unicast MAC like \"52:54:00:12:34:56\"",
                    vm.name, nic.mac
                ));
            }
            if nic.bridge.is_empty() || nic.bridge.len() > 15 || nic.queues == 0 || nic.queues > 16
            {
                return Err(format!(
                    "VM {:?}: NIC {}: bridge must be a device name (1 to 15 bytes) and queues \
                     1 to 16",
                    vm.name, nic.mac
                ));
            }
        }
        if vm.disk.iter().any(|disk| disk.replication_port == 0) {
            return Err(format!("VM {:?}: a disk has replication_port 0", vm.name));
        }
        Ok(())
    }
}

/// " at line L, column C" for a byte span of `text`.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!(" (line {line}, column {column})")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[host]
name = "hostA"
state_dir = "/var/lib/ftvm"
control_socket = "/run/ftvm/ftvmd.sock"

[peer]
name = "hostB"
addresses = ["10.77.1.2:7500", "10.77.2.2:7500"]
listen = ["10.77.1.1:7500", "10.77.2.1:7500"]
psk_file = "/etc/ftvm/pair.psk"

[witness]
addresses = ["10.77.0.3:7600"]
psk_file = "/etc/ftvm/witness.psk"

[[vm]]
name = "vm1"
level = 2
primary = "hostA"
memory_mib = 512
[[vm.disk]]
image = "/var/lib/ftvm/vm1.img"
replication_port = 7400
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("ftvmd.toml"))
    }

    fn error_of(text: &str) -> String {
        parse(text).expect_err("must be refused").to_string()
    }

    #[test]
    fn a_good_file_parses_with_defaults() {
        let config = parse(GOOD).expect("valid");
        assert_eq!(config.vm[0].vcpus, 1);
        assert_eq!(config.vm[0].disk[0].queues, 1);
        assert_eq!(config.peer.addresses.len(), 2);
    }

    #[test]
    fn mistakes_are_named_with_their_place() {
        let typo = error_of(&GOOD.replace("memory_mib", "memory_mb"));
        assert!(
            typo.contains("memory_mb") && typo.contains("line"),
            "{typo}"
        );
        let address = error_of(&GOOD.replace("10.77.0.3:7600", "witness-host"));
        assert!(address.contains("line 14"), "{address}");
        let level = error_of(&GOOD.replace("level = 2", "level = 3"));
        assert!(level.contains("level 3 is not supported"), "{level}");
        let primary = error_of(&GOOD.replace("primary = \"hostA\"", "primary = \"hostC\""));
        assert!(primary.contains("neither this host"), "{primary}");
        let same = error_of(&GOOD.replace("name = \"hostB\"", "name = \"hostA\""));
        assert!(same.contains("both named"), "{same}");
        let name = error_of(&GOOD.replace("name = \"vm1\"", "name = \"../vm1\""));
        assert!(name.contains("VM name"), "{name}");
        let links = error_of(&GOOD.replace(
            "addresses = [\"10.77.0.3:7600\"]",
            "addresses = [\"10.77.0.3:7600\", \"10.77.0.4:7600\", \"10.77.0.5:7600\"]",
        ));
        assert!(links.contains("witness.addresses needs 1 or 2"), "{links}");
    }

    #[test]
    fn nics_need_a_unicast_mac_and_a_bridge() {
        let with_nic = |mac: &str, bridge: &str| {
            format!("{GOOD}[[vm.nic]]\nmac = \"{mac}\"\nbridge = \"{bridge}\"\n")
        };
        let config = parse(&with_nic("52:54:00:12:34:56", "vmbr0")).expect("valid");
        assert_eq!(config.vm[0].nic[0].queues, 1);
        for (mac, bridge) in [
            ("52:54:00:12:34", "vmbr0"),
            ("53:54:00:12:34:56", "vmbr0"),
            ("52:54:00:12:34:zz", "vmbr0"),
            ("52:54:00:12:34:56", "a-bridge-name-too-long"),
        ] {
            let error = error_of(&with_nic(mac, bridge));
            assert!(error.contains("NIC"), "{mac} {bridge}: {error}");
        }
    }

    #[test]
    fn duplicate_vms_and_ports_are_refused() {
        let twice = format!("{GOOD}\n{}", &GOOD[GOOD.find("[[vm]]").expect("vm")..]);
        assert!(error_of(&twice).contains("defined twice"));
        let other_vm = GOOD[GOOD.find("[[vm]]").expect("vm")..].replace("vm1", "vm2");
        assert!(error_of(&format!("{GOOD}\n{other_vm}")).contains("port 7400 is used by two"));
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let error = Config::load(Path::new("/nonexistent/ftvmd.toml")).expect_err("missing");
        assert!(error
            .to_string()
            .contains("cannot read /nonexistent/ftvmd.toml"));
    }
}
