//! The comparison of both hosts' facts: pure, so every rule is unit-tested on made-up
//! facts.

use super::facts::LinkState;
use super::probe::{common_models, cpuid_missing};
use super::{Finding, HostFacts, Severity, VmFacts, CLOCK_BOUND_MS, OVERHEAD_PER_VM_MIB};

/// What [`compare`] compares.
pub struct Comparison<'a> {
    pub local: &'a HostFacts,
    /// The peer's facts and this host's clock when they arrived; `Err`: why there are
    /// none; `None`: not asked for.
    pub peer: Option<Result<(&'a HostFacts, u64), String>>,
    /// The peer's name (for a finding about missing peer facts).
    pub peer_name: &'a str,
    /// Only this VM (the resources of the whole host are still checked).
    pub vm: Option<&'a str>,
}

/// Every finding, blocking ones first.
pub fn compare(comparison: &Comparison<'_>) -> Vec<Finding> {
    let mut findings = Vec::new();
    let peer = match &comparison.peer {
        Some(Ok((facts, _))) => Some(*facts),
        Some(Err(why)) => {
            findings.push(Finding {
                severity: Severity::Warning,
                vm: String::new(),
                host: comparison.peer_name.to_owned(),
                what: format!("the peer's side was not checked: {why}"),
                remedy: format!(
                    "start ftvmd on {} (and check the A-links), then `ftvm check --peer`",
                    comparison.peer_name
                ),
            });
            None
        }
        None => None,
    };
    let hosts: Vec<&HostFacts> = std::iter::once(comparison.local).chain(peer).collect();
    for host in &hosts {
        host_findings(host, peer.map(|_| &hosts), comparison.vm, &mut findings);
    }
    if let Some(peer) = peer {
        pair_findings(comparison.local, peer, comparison.vm, &mut findings);
        if let Some(Ok((_, received_unix_ms))) = &comparison.peer {
            clock_finding(peer, *received_unix_ms, &mut findings);
        }
    }
    for vm in &comparison.local.vms {
        if selected(comparison.vm, &vm.needs.name)
            && vm.needs.level == 3
            && matches!(vm.needs.cpu_model.as_str(), "host" | "max")
        {
            findings.push(Finding {
                severity: Severity::Blocking,
                vm: vm.needs.name.clone(),
                host: String::new(),
                what: format!(
                    "Level 3 with CPU model {:?}: a checkpoint restored on the other host \
                     would find another CPU",
                    vm.needs.cpu_model
                ),
                remedy: "name a CPU model both hosts run (-cpu MODEL in qemu_args on both \
                         hosts; `ftvm check` lists some)"
                    .into(),
            });
        }
    }
    findings.sort_by_key(|finding| finding.severity);
    findings
}

fn selected(only: Option<&str>, vm: &str) -> bool {
    only.is_none_or(|only| only == vm)
}

fn finding(severity: Severity, host: &HostFacts, vm: &str, what: String, remedy: &str) -> Finding {
    Finding {
        severity,
        vm: vm.to_owned(),
        host: host.host.clone(),
        what,
        remedy: remedy.to_owned(),
    }
}

/// One host's own findings: QEMU, each VM's CPU model, machine, NICs, ports, disks, and
/// whether it can run every VM it would take over. `hosts`: both hosts' facts, for
/// suggestions both can follow.
fn host_findings(
    host: &HostFacts,
    hosts: Option<&Vec<&HostFacts>>,
    only: Option<&str>,
    findings: &mut Vec<Finding>,
) {
    match &host.qemu {
        Err(error) => findings.push(finding(
            Severity::Blocking,
            host,
            "",
            format!("QEMU does not run: {error}"),
            "install qemu-system-x86 (or set [host] qemu to the QEMU binary)",
        )),
        Ok(_) => {
            for vm in host.vms.iter().filter(|vm| selected(only, &vm.needs.name)) {
                qemu_findings(host, vm, hosts, findings);
            }
        }
    }
    for vm in host.vms.iter().filter(|vm| selected(only, &vm.needs.name)) {
        nic_findings(host, vm, findings);
        for taken in &vm.taken {
            findings.push(finding(
                Severity::Blocking,
                host,
                &vm.needs.name,
                format!("{} is in use by {}", taken.what, taken.holder),
                "stop that process, or give the VM another port in its [[vm]] section on \
                 both hosts",
            ));
        }
        disk_findings(host, vm, findings);
    }
    resource_findings(host, findings);
}

fn qemu_findings(
    host: &HostFacts,
    vm: &VmFacts,
    hosts: Option<&Vec<&HostFacts>>,
    findings: &mut Vec<Finding>,
) {
    let Ok(qemu) = &host.qemu else { return };
    let name = &vm.needs.name;
    if qemu.resolve_machine(&vm.needs.machine).is_none() {
        findings.push(finding(
            Severity::Blocking,
            host,
            name,
            format!(
                "machine type {:?} is unknown to QEMU {}",
                vm.needs.machine, qemu.version
            ),
            "name a machine type both hosts' QEMU know (-machine in qemu_args)",
        ));
    }
    let accel = &vm.needs.accel;
    let details = match qemu.accels.get(accel) {
        Some(Ok(details)) => details,
        Some(Err(error)) => {
            findings.push(finding(
                Severity::Blocking,
                host,
                name,
                format!("QEMU does not start with accel {accel:?}: {error}"),
                if accel == "kvm" {
                    "load kvm_intel or kvm_amd and give ftvmd /dev/kvm, or set accel = \"tcg\""
                } else {
                    "set accel to \"kvm\" or \"tcg\""
                },
            ));
            return;
        }
        None => return,
    };
    let model = &vm.needs.cpu_model;
    let missing = match details.models.get(model) {
        Some(Some(missing)) if missing.is_empty() => return,
        Some(Some(missing)) => missing.clone(),
        // `host` is only known to KVM; under TCG QEMU lists it with "kvm" unavailable.
        Some(None) | None => {
            findings.push(finding(
                Severity::Blocking,
                host,
                name,
                format!("CPU model {model:?} is unknown to QEMU {}", qemu.version),
                &suggest(hosts.map_or(&[host][..], |hosts| hosts), accel),
            ));
            return;
        }
    };
    let shown: Vec<&str> = missing.iter().take(8).map(String::as_str).collect();
    let more = if missing.len() > shown.len() {
        format!(" and {} more", missing.len() - shown.len())
    } else {
        String::new()
    };
    findings.push(finding(
        Severity::Blocking,
        host,
        name,
        format!(
            "CPU model {model} needs features this host lacks under {accel}: {}{more}",
            shown.join(", ")
        ),
        &suggest(hosts.map_or(&[host][..], |hosts| hosts), accel),
    ));
}

/// "choose a CPU model both hosts run under ACCEL: A, B, C (-cpu in qemu_args on both)".
fn suggest(hosts: &[&HostFacts], accel: &str) -> String {
    let details: Vec<_> = hosts
        .iter()
        .filter_map(|host| host.qemu.as_ref().ok()?.accels.get(accel)?.as_ref().ok())
        .collect();
    let models = match details.as_slice() {
        [one] => common_models(one, one),
        [first, second, ..] => common_models(first, second),
        [] => Vec::new(),
    };
    let which = if hosts.len() > 1 {
        "both hosts run"
    } else {
        "this host runs"
    };
    if models.is_empty() {
        return format!("choose a CPU model {which} (-cpu MODEL in qemu_args on both hosts)");
    }
    format!(
        "choose a CPU model {which} under {accel}, like {} (-cpu MODEL in qemu_args on both \
         hosts)",
        models.join(", ")
    )
}

fn nic_findings(host: &HostFacts, vm: &VmFacts, findings: &mut Vec<Finding>) {
    for nic in &vm.nics {
        let bridge = &nic.bridge;
        let problem = match nic.bridge_state {
            LinkState::Missing => Some(format!("bridge {bridge} of NIC {} is missing", nic.mac)),
            LinkState::NotABridge => Some(format!(
                "{bridge} (bridge of NIC {}) is not a Linux bridge",
                nic.mac
            )),
            LinkState::Present { .. } => None,
        };
        if let Some(problem) = problem {
            findings.push(finding(
                Severity::Blocking,
                host,
                &vm.needs.name,
                problem,
                &format!(
                    "create it (ip link add {bridge} type bridge) or name this host's VM \
                     bridge in [[vm.nic]] bridge"
                ),
            ));
        }
        let (Some(uplink), Some(state)) = (&nic.uplink, &nic.uplink_state) else {
            continue;
        };
        let (severity, what, remedy) = match state {
            LinkState::Missing | LinkState::NotABridge => (
                Severity::Blocking,
                format!("uplink {uplink} of NIC {} is missing", nic.mac),
                format!("add the LAN port {uplink} to {bridge}, or fix [[vm.nic]] uplink"),
            ),
            LinkState::Present { master, .. } if master.as_deref() != Some(bridge.as_str()) => (
                Severity::Blocking,
                format!(
                    "uplink {uplink} of NIC {} is not a port of {bridge}",
                    nic.mac
                ),
                format!("ip link set {uplink} master {bridge}"),
            ),
            LinkState::Present { up: false, .. } => (
                Severity::Warning,
                format!("uplink {uplink} of NIC {} is down", nic.mac),
                format!("check its cable and switch port (ip link set {uplink} up)"),
            ),
            LinkState::Present { .. } => continue,
        };
        findings.push(finding(severity, host, &vm.needs.name, what, &remedy));
    }
}

fn disk_findings(host: &HostFacts, vm: &VmFacts, findings: &mut Vec<Finding>) {
    for disk in &vm.disks {
        let image = disk.image.display();
        match (&disk.size, disk.free_bytes) {
            (Err(error), _) => findings.push(finding(
                Severity::Blocking,
                host,
                &vm.needs.name,
                format!("image {image} cannot be read: {error}"),
                "create it (the same size on both hosts) or fix [[vm.disk]] image",
            )),
            (Ok((size, allocated)), Some(free)) if size.saturating_sub(*allocated) > free => {
                findings.push(finding(
                    Severity::Blocking,
                    host,
                    &vm.needs.name,
                    format!(
                        "a full copy of {image} needs {} MiB more, its file system has {} MiB \
                         free",
                        size.saturating_sub(*allocated) >> 20,
                        free >> 20
                    ),
                    "free space there, or move the image to a larger file system",
                ));
            }
            _ => {}
        }
    }
}

/// everRun's rule: a host must be able to run every VM it would take over. A VM whose
/// primary is the other host needs its RAM (less what its RAM file holds already: at
/// Level 3 the replica) and QEMU's overhead; all VMs' vCPUs should fit its CPUs.
fn resource_findings(host: &HostFacts, findings: &mut Vec<Finding>) {
    let takeover: Vec<&VmFacts> = host.vms.iter().filter(|vm| !vm.primary_here).collect();
    let needed_mib: u64 = takeover
        .iter()
        .map(|vm| {
            vm.needs
                .memory_mib
                .saturating_sub(vm.ram_allocated_bytes >> 20)
                + OVERHEAD_PER_VM_MIB
        })
        .sum();
    if !takeover.is_empty() && needed_mib > host.memory_available_mib {
        let names: Vec<String> = takeover
            .iter()
            .map(|vm| {
                if vm.needs.level == 3 {
                    format!("{} (Level 3: its replica needs the RAM now)", vm.needs.name)
                } else {
                    vm.needs.name.clone()
                }
            })
            .collect();
        findings.push(finding(
            Severity::Blocking,
            host,
            "",
            format!(
                "taking over {} needs {needed_mib} MiB, {} MiB available",
                names.join(", "),
                host.memory_available_mib
            ),
            "free memory on this host, give the VMs less (memory_mib), or protect fewer \
             VMs with this pair",
        ));
    }
    let vcpus: u32 = host.vms.iter().map(|vm| vm.needs.vcpus).sum();
    for vm in &host.vms {
        if vm.needs.vcpus > host.cpus {
            findings.push(finding(
                Severity::Blocking,
                host,
                &vm.needs.name,
                format!("{} vCPUs, this host has {} CPUs", vm.needs.vcpus, host.cpus),
                "give the VM at most as many vcpus as each host has CPUs",
            ));
        }
    }
    if vcpus > host.cpus && host.vms.len() > 1 {
        findings.push(finding(
            Severity::Warning,
            host,
            "",
            format!(
                "running every VM after a failover means {vcpus} vCPUs on {} CPUs",
                host.cpus
            ),
            "expect the VMs to run slower after a failover, or give them fewer vcpus",
        ));
    }
}

/// What the two hosts must agree on: the VMs' definitions, QEMU, machine types, KVM.
fn pair_findings(
    local: &HostFacts,
    peer: &HostFacts,
    only: Option<&str>,
    findings: &mut Vec<Finding>,
) {
    let pair = |severity, vm: &str, what: String, remedy: &str| Finding {
        severity,
        vm: vm.to_owned(),
        host: String::new(),
        what,
        remedy: remedy.to_owned(),
    };
    if let (Ok(ours), Ok(theirs)) = (&local.qemu, &peer.qemu) {
        if ours.version != theirs.version {
            findings.push(pair(
                Severity::Warning,
                "",
                format!(
                    "QEMU {} on {}, {} on {}",
                    ours.version, local.host, theirs.version, peer.host
                ),
                "upgrade one so that both run the same QEMU",
            ));
        }
    }
    for vm in local.vms.iter().filter(|vm| selected(only, &vm.needs.name)) {
        let name = &vm.needs.name;
        let Some(other) = peer.vms.iter().find(|other| &other.needs.name == name) else {
            findings.push(pair(
                Severity::Blocking,
                name,
                format!("{name} is not in {}'s configuration", peer.host),
                "add the same [[vm]] section to both hosts' configuration",
            ));
            continue;
        };
        let (ours, theirs) = (&vm.needs, &other.needs);
        let differences: Vec<String> = [
            (
                "memory_mib",
                ours.memory_mib.to_string(),
                theirs.memory_mib.to_string(),
            ),
            ("vcpus", ours.vcpus.to_string(), theirs.vcpus.to_string()),
            ("accel", ours.accel.clone(), theirs.accel.clone()),
            (
                "CPU model",
                ours.cpu_model.clone(),
                theirs.cpu_model.clone(),
            ),
            ("machine", ours.machine.clone(), theirs.machine.clone()),
        ]
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .map(|(what, a, b)| format!("{what} {a} on {}, {b} on {}", local.host, peer.host))
        .collect();
        if !differences.is_empty() {
            findings.push(pair(
                Severity::Blocking,
                name,
                format!(
                    "the hosts define {name} differently: {}",
                    differences.join("; ")
                ),
                "make its [[vm]] section the same on both hosts and restart ftvmd",
            ));
        }
        if let (Ok(our_qemu), Ok(their_qemu)) = (&local.qemu, &peer.qemu) {
            let (a, b) = (
                our_qemu.resolve_machine(&ours.machine),
                their_qemu.resolve_machine(&ours.machine),
            );
            if let (Some(a), Some(b)) = (a, b) {
                if a != b {
                    let severity = if ours.level == 3 {
                        Severity::Blocking
                    } else {
                        Severity::Warning
                    };
                    findings.push(pair(
                        severity,
                        name,
                        format!(
                            "machine type {} is {a} on {}, {b} on {}",
                            ours.machine, local.host, peer.host
                        ),
                        "name one versioned machine type both QEMUs know (-machine in qemu_args)",
                    ));
                }
            }
        }
        if ours.accel == "kvm" && matches!(ours.cpu_model.as_str(), "host" | "max") {
            if let (Ok(a), Ok(b)) = (&local.kvm, &peer.kvm) {
                let missing = [
                    (local, peer, cpuid_missing(a, b)),
                    (peer, local, cpuid_missing(b, a)),
                ];
                for (has, lacks, bits) in missing {
                    if bits.is_empty() {
                        continue;
                    }
                    findings.push(pair(
                        Severity::Warning,
                        name,
                        format!(
                            "KVM on {} offers {} CPUID feature bit(s) KVM on {} lacks ({}): \
                             with -cpu {} the VM finds another CPU after a failover",
                            has.host,
                            bits.len(),
                            lacks.host,
                            bits.iter().take(4).cloned().collect::<Vec<_>>().join(", "),
                            ours.cpu_model
                        ),
                        "name a CPU model both hosts run (-cpu MODEL in qemu_args)",
                    ));
                }
            }
        }
    }
}

fn clock_finding(peer: &HostFacts, received_unix_ms: u64, findings: &mut Vec<Finding>) {
    let offset = peer.unix_ms.abs_diff(received_unix_ms);
    if offset > CLOCK_BOUND_MS {
        findings.push(Finding {
            severity: Severity::Warning,
            vm: String::new(),
            host: peer.host.clone(),
            what: format!(
                "the hosts' clocks differ by about {offset} ms (more than {CLOCK_BOUND_MS} \
                 ms): events and logs of the two hosts do not line up, and a Level 3 \
                 guest's clock jumps at a failover"
            ),
            remedy: "run NTP (chrony or systemd-timesyncd) on both hosts".into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::path::PathBuf;

    use super::*;
    use crate::check::facts::{DiskFacts, NicFacts, Taken};
    use crate::check::probe::{Accel, KvmFacts, Machine, QemuFacts};
    use crate::check::{NicNeeds, PortNeed, VmNeeds};

    fn host(name: &str, model_missing: &[&str]) -> HostFacts {
        let accel = Accel {
            models: BTreeMap::from([(
                "Icelake-Server".to_owned(),
                Some(model_missing.iter().map(|f| (*f).to_owned()).collect()),
            )]),
            runnable: vec!["qemu64".into(), "Nehalem".into(), "Westmere".into()],
        };
        let needs = VmNeeds {
            name: "vm1".into(),
            level: 2,
            memory_mib: 512,
            vcpus: 1,
            accel: "tcg".into(),
            cpu_model: "Icelake-Server".into(),
            machine: "pc".into(),
            nics: vec![NicNeeds {
                mac: "52:54:00:00:00:01".into(),
                bridge: "vmbr0".into(),
                uplink: Some("uplink".into()),
            }],
            ports: vec![PortNeed {
                port: 7460,
                what: "checkpoint_port".into(),
                addresses: vec![SocketAddr::from(([10, 0, 0, 1], 7460))],
            }],
            sockets: Vec::new(),
            disks: vec![PathBuf::from("/images/vm1.img")],
            ram_file: PathBuf::from("/dev/shm/vm1.ram"),
        };
        HostFacts {
            host: name.into(),
            unix_ms: 1_000_000,
            qemu: Ok(QemuFacts {
                version: "7.2.22".into(),
                machines: vec![Machine {
                    name: "pc-i440fx-7.2".into(),
                    alias: Some("pc".into()),
                    default: true,
                }],
                accels: BTreeMap::from([("tcg".to_owned(), Ok(accel))]),
            }),
            kvm: Err("/dev/kvm does not open".into()),
            memory_available_mib: 4096,
            cpus: 2,
            vms: vec![VmFacts {
                needs,
                primary_here: name == "hostA",
                ram_allocated_bytes: 0,
                nics: vec![NicFacts {
                    mac: "52:54:00:00:00:01".into(),
                    bridge: "vmbr0".into(),
                    bridge_state: LinkState::Present {
                        up: true,
                        master: None,
                    },
                    uplink: Some("uplink".into()),
                    uplink_state: Some(LinkState::Present {
                        up: true,
                        master: Some("vmbr0".into()),
                    }),
                }],
                taken: Vec::new(),
                disks: vec![DiskFacts {
                    image: PathBuf::from("/images/vm1.img"),
                    size: Ok((1 << 30, 0)),
                    free_bytes: Some(10 << 30),
                }],
            }],
        }
    }

    fn run(local: &HostFacts, peer: &HostFacts, received: u64) -> Vec<Finding> {
        compare(&Comparison {
            local,
            peer: Some(Ok((peer, received))),
            peer_name: "hostB",
            vm: None,
        })
    }

    #[test]
    fn two_matching_hosts_have_no_findings() {
        let findings = run(&host("hostA", &[]), &host("hostB", &[]), 1_000_100);
        assert!(findings.is_empty(), "{findings:?}");
    }

    #[test]
    fn a_cpu_model_with_missing_features_blocks_and_names_models_both_run() {
        let findings = run(
            &host("hostA", &[]),
            &host("hostB", &["avx512f", "pku"]),
            1_000_000,
        );
        assert_eq!(findings.len(), 1, "{findings:?}");
        let line = findings[0].line();
        assert_eq!(findings[0].severity, Severity::Blocking);
        assert!(
            line.contains("hostB") && line.contains("avx512f, pku"),
            "{line}"
        );
        assert!(line.contains("like Westmere, Nehalem"), "{line}");
    }

    #[test]
    fn a_wrong_bridge_an_uplink_outside_it_and_a_taken_port_block() {
        let mut local = host("hostA", &[]);
        let vm = &mut local.vms[0];
        vm.nics[0].bridge_state = LinkState::Missing;
        vm.nics[0].uplink_state = Some(LinkState::Present {
            up: true,
            master: Some("br9".into()),
        });
        vm.taken.push(Taken {
            what: "port 7460 (checkpoint_port) on 10.0.0.1".into(),
            holder: "pid 42 (socat)".into(),
        });
        let findings = run(&local, &host("hostB", &[]), 1_000_000);
        let lines: Vec<String> = findings.iter().map(Finding::line).collect();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines[0].contains("bridge vmbr0 of NIC 52:54:00:00:00:01 is missing"));
        assert!(lines[0].contains("ip link add vmbr0 type bridge"));
        assert!(lines[1].contains("ip link set uplink master vmbr0"));
        assert!(lines[2].contains("in use by pid 42 (socat)"));
        assert!(findings.iter().all(|f| f.severity == Severity::Blocking));
    }

    #[test]
    fn memory_for_the_vms_a_host_would_take_over() {
        let mut peer = host("hostB", &[]);
        peer.memory_available_mib = 300;
        let findings = run(&host("hostA", &[]), &peer, 1_000_000);
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert!(findings[0]
            .what
            .contains("taking over vm1 needs 576 MiB, 300 MiB available"));
        // A Level 3 replica already in place counts as held.
        peer.vms[0].needs.level = 3;
        peer.vms[0].ram_allocated_bytes = 512 << 20;
        let mut local = host("hostA", &[]);
        local.vms[0].needs.level = 3;
        assert!(run(&local, &peer, 1_000_000).is_empty());
        peer.vms[0].ram_allocated_bytes = 0;
        let findings = run(&local, &peer, 1_000_000);
        assert!(findings[0]
            .what
            .contains("Level 3: its replica needs the RAM now"));
        // The primary's host runs it already.
        local.memory_available_mib = 0;
        peer.memory_available_mib = 4096;
        assert!(run(&local, &peer, 1_000_000).is_empty());
    }

    #[test]
    fn clocks_level3_host_model_and_differing_definitions() {
        let local = host("hostA", &[]);
        let findings = run(&local, &host("hostB", &[]), 1_000_000 + CLOCK_BOUND_MS + 1);
        assert!(findings[0].what.contains("clocks differ by about 501 ms"));
        assert_eq!(findings[0].severity, Severity::Warning);
        let mut local = host("hostA", &[]);
        local.vms[0].needs.level = 3;
        local.vms[0].needs.cpu_model = "host".into();
        local.vms[0].needs.memory_mib = 256;
        let findings = run(&local, &host("hostB", &[]), 1_000_000);
        let text: Vec<String> = findings.iter().map(Finding::line).collect();
        assert!(
            text.iter()
                .any(|line| line.contains("Level 3 with CPU model \"host\"")),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|line| line.contains("memory_mib 256 on hostA, 512 on hostB")),
            "{text:#?}"
        );
    }

    #[test]
    fn a_missing_peer_is_a_warning_and_kvm_differences_are_named() {
        let local = host("hostA", &[]);
        let findings = compare(&Comparison {
            local: &local,
            peer: Some(Err("no answer within 30 s".into())),
            peer_name: "hostB",
            vm: Some("vm1"),
        });
        assert_eq!(findings.len(), 1);
        assert!(findings[0].line().contains("no answer within 30 s"));
        assert_eq!(findings[0].severity, Severity::Warning);
        let leaf = |ecx| crate::check::probe::CpuidLeaf {
            function: 1,
            index: 0,
            registers: [0, 0, ecx, 0],
        };
        let mut local = host("hostA", &[]);
        local.vms[0].needs.accel = "kvm".into();
        local.vms[0].needs.cpu_model = "host".into();
        local.kvm = Ok(KvmFacts {
            leaves: vec![leaf(0b11)],
        });
        let mut peer = local.clone();
        peer.host = "hostB".into();
        peer.vms[0].primary_here = false;
        peer.kvm = Ok(KvmFacts {
            leaves: vec![leaf(0b01)],
        });
        let findings = run(&local, &peer, 1_000_000);
        assert!(
            findings.iter().any(|f| f.what.contains("KVM on hostA offers 1 CPUID feature bit(s) KVM on hostB lacks (leaf 0x1.0 ecx bit 1)")),
            "{findings:#?}"
        );
    }
}
