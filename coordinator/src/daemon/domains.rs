//! libvirt domains protected with `ftvm protect --domain`: their definitions (kept in
//! `state_dir/domains/` on both hosts, with the operator's original XML), adding and
//! removing them while ftvmd runs, and the libvirt hook's questions.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::mpsc::Sender;

use serde::{Deserialize, Serialize};

use super::control::{Reply, SnapshotConsistency};
use super::libvirt_launcher::DomainSpec;
use super::links::PeerMessage;
use super::{remove_durably, write_durably, Daemon};
use crate::config::{DiskSection, NicSection, VmSection};
use crate::host::Role;
use crate::libvirt::{describe_changes, read_domain, Virsh};

/// Most disks and NICs of a protected domain.
const MAX_DEVICES: usize = 16;

/// A protected domain, the same on both hosts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainDefinition {
    /// The domain's name, which is the VM's.
    pub vm: String,
    pub level: u8,
    /// The host that protected it (its first primary).
    pub primary: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// `tcg` for a `<domain type='qemu'>`, else `kvm`.
    pub accel: String,
    pub disks: Vec<DomainDisk>,
    pub nics: Vec<DomainNic>,
    /// The operator's XML, for `ftvm unprotect`.
    pub original_xml: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainDisk {
    /// As in the operator's XML (each host maps it through `[libvirt] image_root`).
    pub image: PathBuf,
    pub size_bytes: u64,
    pub replication_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainNic {
    pub mac: String,
    pub bridge: String,
}

impl DomainDefinition {
    /// Checks a definition (from this host's state or from the peer) before use.
    fn check(&self) -> Result<(), String> {
        if !crate::witness_store::valid_name(&self.vm) {
            return Err(format!("domain name {:?} is not a valid VM name", self.vm));
        }
        if !matches!(self.level, 1 | 2) {
            return Err(format!("level {} is not 1 or 2", self.level));
        }
        if self.disks.is_empty() || self.disks.len() > MAX_DEVICES || self.nics.len() > MAX_DEVICES
        {
            return Err(format!(
                "1 to {MAX_DEVICES} disks and at most {MAX_DEVICES} NICs"
            ));
        }
        if self.disks.iter().any(|disk| disk.replication_port == 0) {
            return Err("a disk's replication port is 0".into());
        }
        let plain = |path: &std::path::Path| {
            path.is_absolute()
                && path
                    .components()
                    .all(|part| !matches!(part, std::path::Component::ParentDir))
        };
        if let Some(disk) = self.disks.iter().find(|disk| !plain(&disk.image)) {
            return Err(format!(
                "image {} is not an absolute path without '..'",
                disk.image.display()
            ));
        }
        let facts = read_domain(&self.original_xml)?;
        if facts.name != self.vm || facts.disks.len() != self.disks.len() {
            return Err("the original XML does not match the definition".into());
        }
        Ok(())
    }
}

impl Daemon {
    fn domains_dir(&self) -> PathBuf {
        self.config.host.state_dir.join("domains")
    }

    fn definition_path(&self, vm: &str) -> PathBuf {
        self.domains_dir().join(format!("{vm}.json"))
    }

    pub(super) fn is_domain(&self, vm: &str) -> bool {
        self.vms
            .iter()
            .any(|runner| runner.name == vm && runner.is_domain())
    }

    /// At start: the domains protected before.
    pub(super) fn start_domains(&mut self) -> Result<(), String> {
        let entries = match std::fs::read_dir(self.domains_dir()) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => {
                return Err(format!(
                    "cannot read {}: {error}",
                    self.domains_dir().display()
                ))
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| {
                path.extension()
                    .is_some_and(|extension| extension == "json")
            })
            .collect();
        paths.sort();
        for path in paths {
            let definition: DomainDefinition = std::fs::read_to_string(&path)
                .map_err(|error| error.to_string())
                .and_then(|text| serde_json::from_str(&text).map_err(|error| error.to_string()))
                .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
            definition
                .check()
                .map_err(|error| format!("{}: {error}", path.display()))?;
            self.add_domain(&definition)?;
        }
        Ok(())
    }

    fn section_of(&self, definition: &DomainDefinition) -> VmSection {
        let libvirt = &self.config.libvirt;
        VmSection {
            name: definition.vm.clone(),
            level: definition.level,
            primary: definition.primary.clone(),
            memory_mib: definition.memory_mib,
            vcpus: definition.vcpus,
            disk: definition
                .disks
                .iter()
                .map(|disk| DiskSection {
                    image: libvirt.image_path(&disk.image),
                    replication_port: disk.replication_port,
                    queues: 1,
                    resync_rate_limit: None,
                })
                .collect(),
            nic: definition
                .nics
                .iter()
                .map(|nic| NicSection {
                    mac: nic.mac.clone(),
                    bridge: nic.bridge.clone(),
                    queues: 1,
                    uplink: None,
                    link_port: None,
                })
                .collect(),
            accel: definition.accel.clone(),
            qemu_args: Vec::new(),
            checkpoint_port: None,
            checkpoint_interval_ms: 50,
            snapshot_consistency: SnapshotConsistency::Crash,
        }
    }

    /// The original XML with its images where they are on this host.
    fn original_here(&self, definition: &DomainDefinition) -> String {
        let mut xml = definition.original_xml.clone();
        for disk in &definition.disks {
            let here = self.config.libvirt.image_path(&disk.image);
            if here != disk.image {
                for quote in ['\'', '"'] {
                    xml = xml.replace(
                        &format!("{quote}{}{quote}", disk.image.display()),
                        &format!("{quote}{}{quote}", here.display()),
                    );
                }
            }
        }
        xml
    }

    /// Adds the domain's runner, and defines its protected XML in libvirt here.
    fn add_domain(&mut self, definition: &DomainDefinition) -> Result<(), String> {
        let section = self.section_of(definition);
        let spec = DomainSpec {
            uri: self.config.libvirt.uri.clone(),
            original_xml: self.original_here(definition),
            control_socket: self.config.host.control_socket.clone(),
            definition: self
                .config
                .host
                .state_dir
                .join(&definition.vm)
                .join("domain.xml"),
        };
        let mut runner = self.new_runner(&section, Some(spec))?;
        runner.prepare_launch(&self.io.launcher);
        self.vms.push(runner);
        Ok(())
    }

    fn save_definition(&self, definition: &DomainDefinition) -> Result<(), String> {
        let dir = self.domains_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
        let original = dir.join(format!("{}.original.xml", definition.vm));
        write_durably(&original, &self.original_here(definition))
            .map_err(|error| format!("cannot write {}: {error}", original.display()))?;
        let text = serde_json::to_string_pretty(definition).map_err(|error| error.to_string())?;
        let path = self.definition_path(&definition.vm);
        write_durably(&path, &text)
            .map_err(|error| format!("cannot write {}: {error}", path.display()))
    }

    /// Ports bound on the A-links already: the configuration's and the domains'.
    fn ports_in_use(&self) -> BTreeSet<u16> {
        let mut ports: BTreeSet<u16> = self
            .config
            .peer
            .listen
            .iter()
            .chain(&self.config.peer.addresses)
            .map(|address| address.port())
            .collect();
        for section in &self.config.vm {
            ports.extend(section.disk.iter().map(|disk| disk.replication_port));
            ports.extend(section.nic.iter().filter_map(|nic| nic.link_port));
            ports.extend(section.checkpoint_port);
        }
        for runner in &self.vms {
            ports.extend(runner.replication_ports());
        }
        ports
    }

    /// `ftvm protect --domain`: without `confirmed`, what it would change.
    pub(super) fn protect_domain(
        &mut self,
        domain: &str,
        xml: &str,
        level: u8,
        peer: &str,
        confirmed: bool,
    ) -> Result<String, String> {
        if peer != self.config.peer.name {
            return Err(format!(
                "{peer:?} is not this host's peer ({})",
                self.config.peer.name
            ));
        }
        if !matches!(level, 1 | 2) {
            return Err(format!(
                "level {level}: a libvirt domain is protected at level 1 or 2 (level 3 runs \
                 VMs from a [[vm]] section only, for now)"
            ));
        }
        let facts = read_domain(xml)?;
        if facts.name != domain {
            return Err(format!("the XML is of domain {:?}", facts.name));
        }
        if !crate::witness_store::valid_name(domain) {
            return Err(
                "its name must be 1 to 64 letters, digits, '.', '_' or '-' to be a VM name".into(),
            );
        }
        if self.vms.iter().any(|runner| runner.name == domain) {
            return Err(format!("a VM named {domain} is already protected here"));
        }
        if self.io.peer.links_up().0 == 0 {
            return Err(format!(
                "{} is not reachable: it must take the replica",
                self.config.peer.name
            ));
        }
        let mut disks = Vec::new();
        let mut used = self.ports_in_use();
        let mut port = self.config.libvirt.port_base;
        for disk in &facts.disks {
            let here = self.config.libvirt.image_path(&disk.image);
            let size_bytes = std::fs::metadata(&here)
                .map_err(|error| {
                    format!(
                        "cannot read disk {} ({}): {error}",
                        disk.target,
                        here.display()
                    )
                })?
                .len();
            while used.contains(&port) {
                port = port
                    .checked_add(1)
                    .ok_or("no free replication port above port_base")?;
            }
            used.insert(port);
            disks.push(DomainDisk {
                image: disk.image.clone(),
                size_bytes,
                replication_port: port,
            });
        }
        let images: Vec<PathBuf> = facts.disks.iter().map(|disk| disk.image.clone()).collect();
        if !confirmed {
            let changes = describe_changes(&facts, peer, &images);
            return Ok(format!(
                "protecting domain {domain} at level {level} with {peer} changes:\n  - {}",
                changes.join("\n  - ")
            ));
        }
        let definition = DomainDefinition {
            vm: domain.to_owned(),
            level,
            primary: self.config.host.name.clone(),
            memory_mib: facts.memory_mib,
            vcpus: facts.vcpus,
            accel: if facts.kind == "qemu" { "tcg" } else { "kvm" }.to_owned(),
            disks,
            nics: facts
                .nics
                .iter()
                .map(|nic| DomainNic {
                    mac: nic.mac.clone(),
                    bridge: nic.bridge.clone(),
                })
                .collect(),
            original_xml: xml.to_owned(),
        };
        definition.check()?;
        self.save_definition(&definition)?;
        self.add_domain(&definition)?;
        match postcard::to_allocvec(&definition) {
            Ok(payload) => {
                self.io
                    .peer
                    .send_with_payload(&PeerMessage::DefineDomain, &payload, true)
            }
            Err(error) => log::error!("cannot encode the domain for the peer: {error}"),
        }
        self.io.events.info(
            domain,
            format!(
                "libvirt domain protected at level {level}: {} runs it, {peer} keeps its replica \
                 (full sync first)",
                self.config.host.name
            ),
        );
        Ok(format!(
            "{domain} protected at level {level}: ftvmd starts the domain on {} now; `ftvm \
             status` shows the first full sync to {peer}",
            self.config.host.name
        ))
    }

    /// The peer protected a domain: keep its replica here.
    pub(super) fn define_from_peer(&mut self, definition: DomainDefinition) {
        if self.vms.iter().any(|runner| runner.name == definition.vm) {
            return; // the same message on the other A-link
        }
        if let Err(error) = self.accept_definition(&definition) {
            self.io.events.error(
                &definition.vm,
                format!(
                    "{} protected domain {}, but this host cannot keep its replica: {error}",
                    self.config.peer.name, definition.vm
                ),
                "fix it, then `ftvm unprotect` and `ftvm protect --domain` it again",
            );
        }
    }

    fn accept_definition(&mut self, definition: &DomainDefinition) -> Result<(), String> {
        definition.check()?;
        if definition.primary != self.config.peer.name {
            return Err(format!(
                "its primary is {}, not the peer",
                definition.primary
            ));
        }
        let used = self.ports_in_use();
        if let Some(disk) = definition
            .disks
            .iter()
            .find(|disk| used.contains(&disk.replication_port))
        {
            return Err(format!("port {} is in use here", disk.replication_port));
        }
        for disk in &definition.disks {
            let here = self.config.libvirt.image_path(&disk.image);
            if let Some(parent) = here.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|error| format!("cannot create {}: {error}", parent.display()))?;
            }
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&here)
                .map_err(|error| format!("cannot open {}: {error}", here.display()))?;
            let size = file.metadata().map_err(|error| error.to_string())?.len();
            if size == 0 {
                file.set_len(disk.size_bytes)
                    .map_err(|error| format!("cannot size {}: {error}", here.display()))?;
            } else if size != disk.size_bytes {
                return Err(format!(
                    "{} exists with {size} bytes, the domain's disk has {}",
                    here.display(),
                    disk.size_bytes
                ));
            }
        }
        self.save_definition(definition)?;
        self.add_domain(definition)?;
        self.io.events.info(
            &definition.vm,
            format!(
                "{} protected libvirt domain {}: this host keeps its replica",
                self.config.peer.name, definition.vm
            ),
        );
        Ok(())
    }

    /// `ftvm unprotect` of a protected domain (on its primary): its processes stop, the
    /// domain is defined again from the operator's XML (its images hold every write) and
    /// started again if it ran; the peer drops its replica's processes.
    pub(super) fn unprotect_domain(&mut self, vm: &str, answer: Sender<Reply>) {
        let Some(index) = self.vms.iter().position(|runner| runner.name == vm) else {
            let _ = answer.send(Reply::Error(format!("no VM named {vm:?}")));
            return;
        };
        if self.vms[index].role() != Role::Primary {
            let _ = answer.send(Reply::Error(format!(
                "{vm} is protected with {} as its primary: run `ftvm unprotect` there",
                self.config.peer.name
            )));
            return;
        }
        let path = self.definition_path(vm);
        let definition: Option<DomainDefinition> = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok());
        let Some(definition) = definition else {
            let _ = answer.send(Reply::Error(format!(
                "cannot read {}: the original XML is in {}",
                path.display(),
                self.domains_dir().display()
            )));
            return;
        };
        let was_running = self.vms[index].guest_present();
        let mut runner = self.vms.remove(index);
        runner.shutdown(&mut self.io.events);
        self.io
            .peer
            .send(&PeerMessage::ForgetDomain { vm: vm.to_owned() }, true);
        if let Err(error) = remove_durably(&path) {
            log::warn!("{vm}: cannot remove {}: {error}", path.display());
        }
        let original = self.original_here(&definition);
        let virsh = Virsh::new(&self.config.libvirt.uri);
        let file = self.domains_dir().join(format!("{vm}.original.xml"));
        let host = self.config.host.name.clone();
        self.io.events.info(
            vm,
            format!("unprotected: the domain gets its original XML back on {host}"),
        );
        let vm = vm.to_owned();
        let spawned = std::thread::Builder::new()
            .name(format!("{vm}-unprotect"))
            .spawn(move || {
                runner.finish();
                let result = virsh.define(&original, &file).and_then(|()| {
                    if was_running {
                        virsh.run(&["start", &vm]).map(drop)
                    } else {
                        Ok(())
                    }
                });
                let _ = answer.send(match result {
                    Ok(()) => Reply::Done(format!(
                        "{vm} unprotected: its original domain is defined again on {host}{}",
                        if was_running { " and runs" } else { "" }
                    )),
                    Err(error) => Reply::Error(format!(
                        "{vm} is unprotected, but its original domain could not be restored: \
                         {error}; its XML is in {}",
                        file.display()
                    )),
                });
            });
        if let Err(error) = spawned {
            log::error!("cannot start a thread: {error}");
        }
    }

    /// The peer unprotected a domain: this host's replica processes stop, and the
    /// protected domain is undefined here (the original XML stays in `state_dir`).
    pub(super) fn forget_domain(&mut self, vm: &str) {
        let Some(index) = self.vms.iter().position(|runner| runner.name == vm) else {
            return;
        };
        if !self.vms[index].is_domain() {
            return;
        }
        let mut runner = self.vms.remove(index);
        runner.shutdown(&mut self.io.events);
        let path = self.definition_path(vm);
        if let Err(error) = remove_durably(&path) {
            log::warn!("{vm}: cannot remove {}: {error}", path.display());
        }
        self.io.events.info(
            vm,
            format!(
                "{} unprotected the domain: no replica is kept here",
                self.config.peer.name
            ),
        );
        let virsh = Virsh::new(&self.config.libvirt.uri);
        let vm = vm.to_owned();
        let spawned = std::thread::Builder::new()
            .name(format!("{vm}-forget"))
            .spawn(move || {
                runner.finish();
                if let Err(error) = virsh.run(&["undefine", &vm]) {
                    log::warn!("{vm}: {error}");
                }
            });
        if let Err(error) = spawned {
            log::error!("cannot start a thread: {error}");
        }
    }

    /// The hook's question or news about a protected domain.
    pub(super) fn libvirt_hook(&mut self, vm: &str, operation: &str) -> Reply {
        let now = self.now();
        let host = self.config.host.name.clone();
        let mut context = self.io.context(now);
        match self.vms.iter_mut().find(|runner| runner.name == vm) {
            None if matches!(operation, "prepare" | "start") => Reply::Error(format!(
                "domain {vm} carries ftvm's protection, but ftvmd on {host} does not \
                 protect it: define its original XML (kept in the state directory's domains/) \
                 again"
            )),
            None => Reply::Done(String::new()),
            Some(runner) => match runner.libvirt_hook(operation, &mut context) {
                Ok(done) => Reply::Done(done),
                Err(error) => Reply::Error(error),
            },
        }
    }
}
