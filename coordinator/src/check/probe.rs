//! What this host's QEMU and KVM offer: a short-lived `qemu-system-x86_64 -machine none
//! -qmp stdio` per accelerator (version, machine types, CPU models and their
//! `unavailable-features`), and KVM's supported CPUID.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How long a probe may take (QEMU starts in well under a second; a loaded host is slower).
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// Most bytes read from a probe's output.
const MAX_PROBE_BYTES: u64 = 4 << 20;
/// CPU models named in a suggestion.
const MAX_SUGGESTED: usize = 4;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuFacts {
    /// `query-version`'s `qemu` part, like "7.2.22".
    pub version: String,
    /// Machine types, with what each alias (`pc`, `q35`) stands for.
    pub machines: Vec<Machine>,
    /// Per accelerator (`tcg`, `kvm`): the CPU models the VMs name, and the models this
    /// host runs without a missing feature (for suggestions). An accelerator that does not
    /// start here has its error.
    pub accels: BTreeMap<String, Result<Accel, String>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub name: String,
    pub alias: Option<String>,
    pub default: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accel {
    /// The VMs' CPU models: their unavailable features (`None`: QEMU does not know it).
    pub models: BTreeMap<String, Option<Vec<String>>>,
    /// Models with no unavailable feature, newest-looking last (QEMU's order).
    pub runnable: Vec<String>,
}

impl QemuFacts {
    /// The versioned machine type `name` stands for here (`pc` is `pc-i440fx-7.2` on
    /// QEMU 7.2); `None` if this QEMU does not know it.
    pub fn resolve_machine(&self, name: &str) -> Option<String> {
        self.machines
            .iter()
            .find(|machine| machine.name == name || machine.alias.as_deref() == Some(name))
            .map(|machine| machine.name.clone())
    }
}

/// Runs `qemu` once per accelerator in `accels` and asks about the CPU models `models`.
pub fn qemu(qemu: &Path, accels: &[String], models: &[String]) -> Result<QemuFacts, String> {
    let mut facts: Option<QemuFacts> = None;
    let mut results = BTreeMap::new();
    // TCG always starts: it gives the version and machines even when no VM uses it.
    let mut order: Vec<String> = vec!["tcg".into()];
    order.extend(accels.iter().filter(|accel| *accel != "tcg").cloned());
    for accel in &order {
        match probe(qemu, accel, models) {
            Ok((version, machines, details)) => {
                if facts.is_none() {
                    facts = Some(QemuFacts {
                        version,
                        machines,
                        accels: BTreeMap::new(),
                    });
                }
                results.insert(accel.clone(), Ok(details));
            }
            Err(error) if accel == "tcg" => return Err(error),
            Err(error) => {
                results.insert(accel.clone(), Err(error));
            }
        }
    }
    let mut facts = facts.ok_or_else(|| format!("{} did not start", qemu.display()))?;
    results.retain(|accel, _| accels.contains(accel) || accel == "tcg");
    facts.accels = results;
    Ok(facts)
}

type Probed = (String, Vec<Machine>, Accel);

fn probe(qemu: &Path, accel: &str, models: &[String]) -> Result<Probed, String> {
    let mut child = Command::new(qemu)
        .args(["-machine", "none", "-accel", accel, "-nodefaults"])
        .args(["-display", "none", "-qmp", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot run {}: {error}", qemu.display()))?;
    let script = concat!(
        "{\"execute\":\"qmp_capabilities\"}\n",
        "{\"execute\":\"query-version\"}\n",
        "{\"execute\":\"query-machines\"}\n",
        "{\"execute\":\"query-cpu-definitions\"}\n",
        "{\"execute\":\"quit\"}\n"
    );
    if let Some(mut stdin) = child.stdin.take() {
        // QEMU that already failed closes its end: its stderr says why.
        let _ = stdin.write_all(script.as_bytes());
    }
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut replies = Vec::new();
        if let Some(stdout) = stdout {
            for line in BufReader::new(stdout.take(MAX_PROBE_BYTES)).lines() {
                let Ok(line) = line else { break };
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    if let Some(reply) = value.get("return") {
                        replies.push(reply.clone());
                    } else if let Some(error) = value.get("error") {
                        replies.push(serde_json::json!({ "error": error }));
                    }
                }
            }
        }
        let mut errors = String::new();
        if let Some(stderr) = stderr {
            let _ = stderr.take(4096).read_to_string(&mut errors);
        }
        let _ = sender.send((replies, errors));
    });
    let outcome = receiver.recv_timeout(PROBE_TIMEOUT);
    let _ = child.kill();
    let _ = child.wait();
    let (replies, errors) = outcome.map_err(|_| {
        format!(
            "{} -accel {accel} did not answer within {} s",
            qemu.display(),
            PROBE_TIMEOUT.as_secs()
        )
    })?;
    // capabilities, version, machines, CPU models (quit's answer may be lost).
    let [_, version, machines, cpus, ..] = replies.as_slice() else {
        let why = errors
            .lines()
            .next()
            .unwrap_or("it exited")
            .trim()
            .to_owned();
        return Err(format!("{} -accel {accel}: {why}", qemu.display()));
    };
    Ok((
        version_text(version),
        machine_list(machines),
        accel_details(cpus, models),
    ))
}

fn version_text(reply: &Value) -> String {
    let qemu = &reply["qemu"];
    match (
        qemu["major"].as_u64(),
        qemu["minor"].as_u64(),
        qemu["micro"].as_u64(),
    ) {
        (Some(major), Some(minor), Some(micro)) => format!("{major}.{minor}.{micro}"),
        _ => "unknown".into(),
    }
}

fn machine_list(reply: &Value) -> Vec<Machine> {
    reply
        .as_array()
        .map(|machines| {
            machines
                .iter()
                .filter_map(|machine| {
                    Some(Machine {
                        name: machine["name"].as_str()?.to_owned(),
                        alias: machine["alias"].as_str().map(str::to_owned),
                        default: machine["is-default"].as_bool().unwrap_or(false),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

fn accel_details(reply: &Value, models: &[String]) -> Accel {
    let definitions = reply.as_array().cloned().unwrap_or_default();
    let unavailable = |definition: &Value| -> Vec<String> {
        definition["unavailable-features"]
            .as_array()
            .map(|features| {
                features
                    .iter()
                    .filter_map(|feature| feature.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let models = models
        .iter()
        .map(|model| {
            let found = definitions
                .iter()
                .find(|definition| definition["name"].as_str() == Some(model.as_str()));
            (model.clone(), found.map(unavailable))
        })
        .collect();
    let runnable = definitions
        .iter()
        .filter(|definition| unavailable(definition).is_empty())
        .filter_map(|definition| definition["name"].as_str().map(str::to_owned))
        .collect();
    Accel { models, runnable }
}

/// CPU model families, newest first (QEMU 7.2's x86 models).
const FAMILIES: [&str; 22] = [
    "SapphireRapids",
    "Icelake",
    "Cooperlake",
    "Cascadelake",
    "Skylake",
    "Broadwell",
    "Haswell",
    "IvyBridge",
    "SandyBridge",
    "Westmere",
    "Nehalem",
    "Penryn",
    "Conroe",
    "EPYC-Milan",
    "EPYC-Rome",
    "EPYC",
    "Dhyana",
    "Opteron_G5",
    "Opteron_G4",
    "Opteron_G3",
    "Opteron_G2",
    "Opteron_G1",
];

/// Named CPU models both hosts run under `accel`, for a remedy: versioned names and the
/// generic ones (`qemu64`, `kvm64`, `max`, `base`) left out, at most a few.
pub fn common_models(first: &Accel, second: &Accel) -> Vec<String> {
    let generic = ["qemu32", "qemu64", "kvm32", "kvm64", "max", "base", "host"];
    let mut common: Vec<String> = first
        .runnable
        .iter()
        .filter(|model| second.runnable.contains(model))
        .filter(|model| !model.contains("-v") && !generic.contains(&model.as_str()))
        .cloned()
        .collect();
    // QEMU lists them alphabetically: the newest families first.
    common.sort_by_key(|model| {
        FAMILIES
            .iter()
            .position(|family| model.starts_with(family))
            .unwrap_or(FAMILIES.len())
    });
    common.truncate(MAX_SUGGESTED);
    common
}

/// KVM's supported CPUID, as feature registers: `(function, index)` to
/// `[eax, ebx, ecx, edx]`, of the leaves that hold feature flags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmFacts {
    pub leaves: Vec<CpuidLeaf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidLeaf {
    pub function: u32,
    pub index: u32,
    /// eax, ebx, ecx, edx.
    pub registers: [u32; 4],
}

/// The CPUID leaves compared: basic features, structured extended features, XSAVE,
/// extended features.
const FEATURE_LEAVES: [(u32, u32); 5] = [(1, 0), (7, 0), (7, 1), (0xd, 1), (0x8000_0001, 0)];

/// Opens `/dev/kvm` and reads `KVM_GET_SUPPORTED_CPUID`.
pub fn kvm() -> Result<KvmFacts, String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|error| format!("/dev/kvm does not open: {error}"))?;
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|error| format!("KVM_GET_SUPPORTED_CPUID failed: {error}"))?;
    let leaves = cpuid
        .as_slice()
        .iter()
        .filter(|entry| FEATURE_LEAVES.contains(&(entry.function, entry.index)))
        .map(|entry| CpuidLeaf {
            function: entry.function,
            index: entry.index,
            // Leaf 1's EAX and EBX hold the signature, APIC id and CPU counts, not features.
            registers: [
                if entry.function == 1 { 0 } else { entry.eax },
                if entry.function == 1 { 0 } else { entry.ebx },
                entry.ecx,
                entry.edx,
            ],
        })
        .collect();
    Ok(KvmFacts { leaves })
}

/// The CPUID feature bits `first` offers and `second` lacks, as `leaf 0x7.0 ebx bit 16`.
pub fn cpuid_missing(first: &KvmFacts, second: &KvmFacts) -> Vec<String> {
    let registers = ["eax", "ebx", "ecx", "edx"];
    let mut missing = Vec::new();
    for leaf in &first.leaves {
        let (function, index) = (leaf.function, leaf.index);
        let other = second
            .leaves
            .iter()
            .find(|other| (other.function, other.index) == (function, index))
            .map_or([0; 4], |other| other.registers);
        for (register, (value, other)) in registers.iter().zip(leaf.registers.iter().zip(other)) {
            let lacking = value & !other;
            for bit in 0..32 {
                if lacking & (1 << bit) != 0 {
                    missing.push(format!("leaf {function:#x}.{index} {register} bit {bit}"));
                }
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_definitions_give_unavailable_features_and_runnable_models() {
        let reply = serde_json::json!([
            {"name": "qemu64", "unavailable-features": []},
            {"name": "Icelake-Server", "unavailable-features": ["avx512f", "pku"]},
            {"name": "Nehalem", "unavailable-features": []},
            {"name": "bogus"}
        ]);
        let models = ["Icelake-Server".to_owned(), "Nosuch".to_owned()];
        let accel = accel_details(&reply, &models);
        assert_eq!(
            accel.models["Icelake-Server"],
            Some(vec!["avx512f".into(), "pku".into()])
        );
        assert_eq!(accel.models["Nosuch"], None);
        assert_eq!(accel.runnable, ["qemu64", "Nehalem", "bogus"]);
    }

    #[test]
    fn machine_aliases_resolve() {
        let facts = QemuFacts {
            version: "7.2.22".into(),
            machines: machine_list(&serde_json::json!([
                {"name": "pc-i440fx-7.2", "alias": "pc", "is-default": true},
                {"name": "pc-q35-7.2", "alias": "q35"},
                {"name": "pc-q35-7.1"}
            ])),
            accels: BTreeMap::new(),
        };
        assert_eq!(
            facts.resolve_machine("pc").as_deref(),
            Some("pc-i440fx-7.2")
        );
        assert_eq!(
            facts.resolve_machine("pc-q35-7.1").as_deref(),
            Some("pc-q35-7.1")
        );
        assert_eq!(facts.resolve_machine("virt"), None);
        assert_eq!(
            version_text(&serde_json::json!({"qemu": {"major": 7, "minor": 2, "micro": 22}})),
            "7.2.22"
        );
    }

    #[test]
    fn missing_cpuid_bits_are_named() {
        let leaf = |ebx| CpuidLeaf {
            function: 7,
            index: 0,
            registers: [0, ebx, 0, 0],
        };
        let first = KvmFacts {
            leaves: vec![leaf(0b101)],
        };
        let second = KvmFacts {
            leaves: vec![leaf(0b001)],
        };
        assert_eq!(cpuid_missing(&first, &second), ["leaf 0x7.0 ebx bit 2"]);
        assert!(cpuid_missing(&second, &first).is_empty());
    }
}
