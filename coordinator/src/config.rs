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
//! checkpoint_port = 7460   # Level 3: the pair's checkpoint engines meet here
//! [[vm.nic]]
//! mac = "52:54:00:12:34:56"
//! bridge = "vmbr0"
//! uplink = "uplink"      # Level 2: redundant uplink through the peer (with link_port)
//! link_port = 7450       # the pair's NIC daemons meet on each A-link address at this port
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::daemon::control::SnapshotConsistency;
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
    /// Where each VM's guest RAM lives, one file per VM (`DIR/VM.ram`): QEMU maps it,
    /// shared with the daemons; at Level 3 the checkpoint engine reads it on the primary and
    /// keeps the replica there on the secondary. A RAM-backed file system (tmpfs).
    #[serde(default = "default_ram_dir")]
    pub ram_dir: PathBuf,
    /// Where to serve `/metrics` (Prometheus text format), e.g. "127.0.0.1:9464"; none by
    /// default. Anyone who reaches it reads the VMs' names and states: bind it to a
    /// management address.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where to serve the control API over TCP for remote clients such as the web console
    /// `ftvm-web` (1 or 2 addresses, e.g. ["10.0.0.1:7700"]); none by default. Needs
    /// `api_key_file`. Bind it to a management address.
    #[serde(default)]
    pub api_listen: Vec<std::net::SocketAddr>,
    /// The API's key (`api.psk` of `ftvm keygen`): a client must prove it; the same file
    /// on the console's host.
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
}

fn default_qemu() -> PathBuf {
    PathBuf::from("qemu-system-x86_64")
}

fn default_ram_dir() -> PathBuf {
    PathBuf::from("/dev/shm/ftvm")
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

/// A NIC of the VM, served by `vhost-net-ft` on the host that runs the VM (and, with a
/// redundant uplink, in standby on the other host).
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
    /// Level 2 only, with `link_port`: the bridge's port to the LAN on each host (like
    /// "uplink"). The NIC then has a redundant uplink through the peer: its daemon runs on
    /// both hosts, and when this port loses its link the guest's frames leave through the
    /// peer's bridge.
    #[serde(default)]
    pub uplink: Option<String>,
    /// With `uplink`: the port the pair's NIC daemons use on each A-link address (each
    /// listens on this host's `[peer] listen` addresses at this port and connects to the
    /// peer's `[peer] addresses` at it).
    #[serde(default)]
    pub link_port: Option<u16>,
}

impl NicSection {
    /// The uplink port and link port of a redundant uplink, if the NIC has one.
    pub fn redundant_uplink(&self) -> Option<(&str, u16)> {
        self.uplink.as_deref().zip(self.link_port)
    }
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
    /// Level 3: the port the pair's checkpoint engines use on each A-link address (the
    /// secondary's listens on this host's `[peer] listen` addresses at this port). Needed
    /// for level 3, and for `ftvm protect --level 3` of a running VM.
    #[serde(default)]
    pub checkpoint_port: Option<u16>,
    /// Level 3: milliseconds from one checkpoint to the next (the guest's output waits
    /// about this long plus the round trip).
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval_ms: u64,
    /// `ftvm snapshot create` without `--app-consistent`: "crash" (the default: no
    /// freeze), "application" (the guest agent freezes the file systems; refused when the
    /// guest runs none) or "auto" (freeze when the guest runs an agent).
    #[serde(default = "default_snapshot_consistency")]
    pub snapshot_consistency: SnapshotConsistency,
}

fn default_snapshot_consistency() -> SnapshotConsistency {
    SnapshotConsistency::Crash
}

fn default_checkpoint_interval() -> u64 {
    50
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
    /// Alert agents run on every warning, error and clearing (docs/OPERATIONS.md, "Alerts").
    #[serde(default)]
    pub alert: Vec<crate::daemon::alerts::AlertSection>,
    /// Domains protected with `ftvm protect --domain` run through libvirt.
    #[serde(default)]
    pub libvirt: LibvirtSection,
}

/// libvirt on this host, for the domains protected with `ftvm protect --domain` (the VMs
/// of `[[vm]]` sections keep being started as QEMU processes).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LibvirtSection {
    /// libvirt's connection URI, as for `virsh -c`.
    #[serde(default = "default_libvirt_uri")]
    pub uri: String,
    /// The replication ports of protected domains' disks are taken from here upwards, one
    /// per disk, skipping those of the configuration.
    #[serde(default = "default_libvirt_port_base")]
    pub port_base: u16,
    /// Where a domain's image paths are on this host: "/" (the default) keeps them as they
    /// are, another folder puts them under it (for hosts that share one file system, like
    /// the test rig's).
    #[serde(default = "default_image_root")]
    pub image_root: PathBuf,
}

impl Default for LibvirtSection {
    fn default() -> LibvirtSection {
        LibvirtSection {
            uri: default_libvirt_uri(),
            port_base: default_libvirt_port_base(),
            image_root: default_image_root(),
        }
    }
}

impl LibvirtSection {
    /// A domain's image path as it is on this host.
    pub fn image_path(&self, image: &Path) -> PathBuf {
        match image.strip_prefix("/") {
            Ok(relative) if self.image_root != Path::new("/") => self.image_root.join(relative),
            _ => image.to_owned(),
        }
    }
}

fn default_libvirt_uri() -> String {
    "qemu:///system".into()
}

fn default_libvirt_port_base() -> u16 {
    7700
}

fn default_image_root() -> PathBuf {
    PathBuf::from("/")
}

/// Reads a TOML file as `T` and checks it with `validate`; every error names the file, and
/// a syntax error its place. Shared with the web console's configuration.
pub fn load_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    validate: impl FnOnce(&T) -> Result<(), String>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(&text, path, validate)
}

/// [`load_toml`] of text already read; `path` is only for messages.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
    validate: impl FnOnce(&T) -> Result<(), String>,
) -> Result<T, ConfigError> {
    let value: T = toml::from_str(text).map_err(|error| ConfigError::Syntax {
        path: path.to_owned(),
        message: error.message().to_owned() + &location(text, error.span()),
    })?;
    validate(&value).map_err(|what| ConfigError::Invalid {
        path: path.to_owned(),
        what,
    })?;
    Ok(value)
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        load_toml(path, Config::validate)
    }

    /// Parses and checks configuration text; `path` is only for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        parse_toml(text, path, Config::validate)
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
        match (self.host.api_listen.len(), &self.host.api_key_file) {
            (0, None) => {}
            (1..=MAX_LINKS, Some(_)) => {}
            (0, Some(_)) => {
                return Err(
                    "host.api_key_file is set but host.api_listen is not: give the API's \
                     address (e.g. [\"10.0.0.1:7700\"]) or drop the key"
                        .into(),
                )
            }
            (count, None) if count <= MAX_LINKS => {
                return Err(
                    "host.api_listen needs host.api_key_file (the api.psk of ftvm keygen): \
                     the API is never served without a key"
                        .into(),
                )
            }
            (count, _) => {
                return Err(format!(
                    "host.api_listen needs 1 or {MAX_LINKS} addresses, has {count}"
                ))
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
        // Every port bound on the A-link addresses, and by what.
        let mut ports = BTreeMap::new();
        for address in &self.peer.listen {
            ports
                .entry(address.port())
                .or_insert_with(|| "[peer] listen".to_owned());
        }
        for address in &self.peer.addresses {
            ports
                .entry(address.port())
                .or_insert_with(|| "[peer] addresses".to_owned());
        }
        for vm in &self.vm {
            self.validate_vm(vm)?;
            if !names.insert(vm.name.as_str()) {
                return Err(format!("VM {:?} is defined twice", vm.name));
            }
            let disks = vm.disk.iter().enumerate().map(|(index, disk)| {
                (
                    disk.replication_port,
                    format!("disk {index} of VM {:?} (replication_port)", vm.name),
                )
            });
            let nics = vm.nic.iter().filter_map(|nic| {
                let (_, port) = nic.redundant_uplink()?;
                Some((
                    port,
                    format!("NIC {} of VM {:?} (link_port)", nic.mac, vm.name),
                ))
            });
            let checkpoint = vm.checkpoint_port.map(|port| {
                (
                    port,
                    format!(
                        "the checkpoint engines of VM {:?} (checkpoint_port)",
                        vm.name
                    ),
                )
            });
            for (port, user) in disks.chain(nics).chain(checkpoint) {
                if let Some(first) = ports.get(&port) {
                    return Err(format!(
                        "port {port} is used twice, by {first} and by {user}: each needs its \
                         own port on the A-links"
                    ));
                }
                ports.insert(port, user);
            }
        }
        crate::daemon::alerts::validate(&self.alert)
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
        if !matches!(vm.level, 1..=3) {
            return Err(format!(
                "VM {:?}: level {} is not supported (1: restart on the peer, 2: also \
                 component fault tolerance, 3: also the VM's memory and sessions survive \
                 the loss of its host)",
                vm.name, vm.level
            ));
        }
        if vm.level == 3 && vm.checkpoint_port.is_none() {
            return Err(format!(
                "VM {:?}: level 3 needs checkpoint_port (the port of the checkpoint engines \
                 on the A-links, like 7460)",
                vm.name
            ));
        }
        if vm.checkpoint_port == Some(0) {
            return Err(format!("VM {:?}: checkpoint_port is 0", vm.name));
        }
        if !(1..=60_000).contains(&vm.checkpoint_interval_ms) {
            return Err(format!(
                "VM {:?}: checkpoint_interval_ms {} is not 1 to 60000",
                vm.name, vm.checkpoint_interval_ms
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
            if !valid_interface_name(&nic.bridge) || nic.queues == 0 || nic.queues > 16 {
                return Err(format!(
                    "VM {:?}: NIC {}: bridge must be a device name (1 to 15 bytes) and queues \
                     1 to 16",
                    vm.name, nic.mac
                ));
            }
            validate_redundant_uplink(vm, nic)?;
        }
        if vm.disk.iter().any(|disk| disk.replication_port == 0) {
            return Err(format!("VM {:?}: a disk has replication_port 0", vm.name));
        }
        Ok(())
    }
}

/// The redundant uplink of a NIC: both settings or neither, Level 2 only, a real port.
fn validate_redundant_uplink(vm: &VmSection, nic: &NicSection) -> Result<(), String> {
    let (uplink, link_port) = match (&nic.uplink, nic.link_port) {
        (None, None) => return Ok(()),
        (Some(uplink), Some(link_port)) => (uplink, link_port),
        _ => {
            return Err(format!(
                "VM {:?}: NIC {}: uplink and link_port go together: both for a redundant \
                 uplink through the peer, neither for none",
                vm.name, nic.mac
            ))
        }
    };
    if vm.level < 2 {
        return Err(format!(
            "VM {:?}: NIC {}: a redundant uplink (uplink, link_port) needs level 2 or 3; Level {} \
             gets no redundant uplink: set level = 2 or remove uplink and link_port",
            vm.name, nic.mac, vm.level
        ));
    }
    if !valid_interface_name(uplink) {
        return Err(format!(
            "VM {:?}: NIC {}: uplink {uplink:?} is not a device name (1 to 15 bytes, no '/', \
             ':' or white space)",
            vm.name, nic.mac
        ));
    }
    if *uplink == nic.bridge {
        return Err(format!(
            "VM {:?}: NIC {}: uplink {uplink:?} is the bridge itself: name the bridge's port \
             to the LAN",
            vm.name, nic.mac
        ));
    }
    if link_port == 0 {
        return Err(format!("VM {:?}: NIC {}: link_port is 0", vm.name, nic.mac));
    }
    Ok(())
}

/// A name Linux accepts for a network device: 1 to 15 bytes, not "." or "..", without
/// '/', ':' or white space.
fn valid_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
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
        let level = error_of(&GOOD.replace("level = 2", "level = 4"));
        assert!(level.contains("level 4 is not supported"), "{level}");
        let port = error_of(&GOOD.replace("level = 2", "level = 3"));
        assert!(port.contains("level 3 needs checkpoint_port"), "{port}");
        let level3 = GOOD.replace("level = 2", "level = 3\ncheckpoint_port = 7460");
        assert_eq!(
            parse(&level3).expect("level 3").vm[0].checkpoint_port,
            Some(7460)
        );
        let twice = error_of(&GOOD.replace("level = 2", "level = 3\ncheckpoint_port = 7400"));
        assert!(twice.contains("port 7400 is used twice"), "{twice}");
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
        let ports = error_of(&format!("{GOOD}\n{other_vm}"));
        assert!(ports.contains("port 7400 is used twice"), "{ports}");
        let peer_port =
            error_of(&GOOD.replace("replication_port = 7400", "replication_port = 7500"));
        assert!(peer_port.contains("[peer] listen"), "{peer_port}");
    }

    fn with_redundant_nic(settings: &str) -> String {
        format!("{GOOD}[[vm.nic]]\nmac = \"52:54:00:12:34:56\"\nbridge = \"vmbr0\"\n{settings}\n")
    }

    #[test]
    fn a_redundant_uplink_parses() {
        let config =
            parse(&with_redundant_nic("uplink = \"uplink\"\nlink_port = 7450")).expect("valid");
        assert_eq!(
            config.vm[0].nic[0].redundant_uplink(),
            Some(("uplink", 7450))
        );
        let plain = parse(&with_redundant_nic("")).expect("valid");
        assert_eq!(plain.vm[0].nic[0].redundant_uplink(), None);
    }

    #[test]
    fn a_redundant_uplink_needs_both_settings() {
        for settings in ["uplink = \"uplink\"", "link_port = 7450"] {
            let error = error_of(&with_redundant_nic(settings));
            assert!(error.contains("go together"), "{settings}: {error}");
        }
    }

    #[test]
    fn a_redundant_uplink_is_level_2_only() {
        let text = with_redundant_nic("uplink = \"uplink\"\nlink_port = 7450")
            .replace("level = 2", "level = 1");
        let error = error_of(&text);
        assert!(
            error.contains("needs level 2") && error.contains("Level 1 gets no redundant uplink"),
            "{error}"
        );
    }

    #[test]
    fn a_redundant_uplink_needs_a_device_name() {
        for uplink in [
            "",
            "eth0:1",
            "a/b",
            "up link",
            "..",
            "sixteen-bytes-xx",
            "vmbr0",
        ] {
            let settings = format!("uplink = \"{uplink}\"\nlink_port = 7450");
            let error = error_of(&with_redundant_nic(&settings));
            assert!(
                error.contains("is not a device name") || error.contains("is the bridge itself"),
                "{uplink:?}: {error}"
            );
        }
        let longest = "uplink = \"fifteen-bytes-x\"\nlink_port = 7450";
        parse(&with_redundant_nic(longest)).expect("15 bytes are a device name");
    }

    #[test]
    fn a_link_port_needs_a_port_of_its_own() {
        let zero = error_of(&with_redundant_nic("uplink = \"uplink\"\nlink_port = 0"));
        assert!(zero.contains("link_port is 0"), "{zero}");
        for (port, user) in [(7400, "disk 0"), (7500, "[peer] listen")] {
            let settings = format!("uplink = \"uplink\"\nlink_port = {port}");
            let error = error_of(&with_redundant_nic(&settings));
            assert!(
                error.contains(&format!("port {port} is used twice")) && error.contains(user),
                "{port}: {error}"
            );
        }
        let peer_only = with_redundant_nic("uplink = \"uplink\"\nlink_port = 7501")
            .replace("10.77.1.2:7500", "10.77.1.2:7501");
        let error = error_of(&peer_only);
        assert!(error.contains("[peer] addresses"), "{error}");
        let two_nics = format!(
            "{}[[vm.nic]]\nmac = \"52:54:00:12:34:57\"\nbridge = \"vmbr0\"\nuplink = \"uplink\"\n\
             link_port = 7450\n",
            with_redundant_nic("uplink = \"uplink\"\nlink_port = 7450")
        );
        let error = error_of(&two_nics);
        assert!(
            error.contains("port 7450 is used twice") && error.contains("52:54:00:12:34:57"),
            "{error}"
        );
    }

    #[test]
    fn the_api_needs_its_key_and_an_address() {
        let with = |settings: &str| {
            GOOD.replace(
                "control_socket = ",
                &format!("{settings}\ncontrol_socket = "),
            )
        };
        let config = parse(&with(
            "api_listen = [\"10.77.0.1:7700\"]\napi_key_file = \"/etc/ftvm/api.psk\"",
        ))
        .expect("an API with its key");
        assert_eq!(
            config.host.api_listen,
            ["10.77.0.1:7700".parse().expect("address")]
        );
        let keyless = error_of(&with("api_listen = [\"10.77.0.1:7700\"]"));
        assert!(keyless.contains("needs host.api_key_file"), "{keyless}");
        let nowhere = error_of(&with("api_key_file = \"/etc/ftvm/api.psk\""));
        assert!(nowhere.contains("api_listen is not"), "{nowhere}");
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let error = Config::load(Path::new("/nonexistent/ftvmd.toml")).expect_err("missing");
        assert!(error
            .to_string()
            .contains("cannot read /nonexistent/ftvmd.toml"));
    }
}
