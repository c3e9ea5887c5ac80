//! `ftvm check` and `ftvm collect-logs` on the namespace rig, both hosts' ftvmd and the
//! witness running, no guest boot needed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ftvm_tests::cluster::{Cluster, ClusterOptions, CHECKPOINT_PORT, LINK1};
use ftvm_tests::guest::GuestConfig;
use ftvm_tests::paths;
use ftvm_tests::process::Process;
use ftvm_tests::wait::Wait;

const A: usize = 0;
const B: usize = 1;
const MAC: &str = "52:54:00:c4:ec:01";

fn cluster(name: &str) -> Cluster {
    let mut guest = GuestConfig::new("ftvm-check", "true\n");
    guest.memory_mb = 128;
    let options = ClusterOptions {
        nic_mac: Some(MAC.into()),
        ..ClusterOptions::default()
    };
    Cluster::new(name, &guest, &options)
}

/// Rewrites both hosts' configuration files.
fn edit_configs(cluster: &Cluster, edit: impl Fn(String) -> String) {
    for host in [A, B] {
        let path = cluster.config_path(host);
        let text = std::fs::read_to_string(&path).expect("read config");
        std::fs::write(&path, edit(text)).expect("write config");
    }
}

fn wait_text(cluster: &Cluster, host: usize, args: &[&str], needles: &[&str]) -> String {
    Wait::up_to(Duration::from_secs(40))
        .every(Duration::from_millis(250))
        .for_value(
            &format!("`ftvm {}` to say {needles:?}", args.join(" ")),
            || Some(cluster.ftvm(host, args).1),
            |text| needles.iter().all(|needle| text.contains(needle)),
        )
}

/// A wrong bridge, a CPU model TCG cannot run and a port held by another process: each
/// named with its remedy, on the host where it is, and `ftvm protect` refuses.
#[test]
fn check_names_a_wrong_bridge_a_cpu_model_the_host_cannot_run_and_a_port_in_use() {
    let mut cluster = cluster("ftvm-check");
    edit_configs(&cluster, |text| {
        text.replace("bridge = \"vmbr0\"", "bridge = \"vmbr9\"")
            .replace(
                "quiet no_timer_check\"",
                "quiet no_timer_check\", \"-cpu\", \"Icelake-Server\"",
            )
    });
    // Another program on hostA holds vm1's checkpoint port on the first A-link.
    let mut command = cluster.hosts.command("hostA", "socat");
    command.arg(format!("TCP-LISTEN:{CHECKPOINT_PORT},bind={}", LINK1[A]));
    command.arg("STDIO");
    let holder = Process::spawn("socat", command, &cluster.dir.path().join("socat.log"));
    Wait::up_to(Duration::from_secs(10)).until("socat listening", || {
        let output = cluster
            .hosts
            .command("hostA", "ss")
            .args(["-ltnH", &format!("sport = :{CHECKPOINT_PORT}")])
            .output()
            .expect("run ss");
        !output.stdout.is_empty()
    });
    cluster.start_all();

    let port = format!(
        "port {CHECKPOINT_PORT} (checkpoint_port) on {} is in use by pid {} (socat)",
        LINK1[A],
        holder.pid()
    );
    let text = wait_text(
        &cluster,
        A,
        &["check", "--peer", "vm1"],
        &["hostA:", "hostB:", "(socat)"],
    );
    eprintln!("ftvm check --peer vm1:\n{text}");
    for host in ["hostA", "hostB"] {
        let line = |needle: &str| {
            text.lines()
                .find(|line| line.contains(needle) && line.contains(&format!(" {host} ")))
                .unwrap_or_else(|| panic!("no line with {needle:?} for {host}:\n{text}"))
                .to_owned()
        };
        let bridge = line(&format!("bridge vmbr9 of NIC {MAC} is missing"));
        assert!(bridge.starts_with("blocking"), "{bridge}");
        assert!(
            bridge.contains("-> create it (ip link add vmbr9 type bridge)"),
            "{bridge}"
        );
        let cpu = line("CPU model Icelake-Server needs features this host lacks under tcg: ");
        assert!(cpu.starts_with("blocking"), "{cpu}");
        assert!(cpu.contains("avx512f"), "{cpu}");
        assert!(
            cpu.contains("-> choose a CPU model both hosts run under tcg, like Westmere, Nehalem"),
            "{cpu}"
        );
    }
    let port_line = text
        .lines()
        .find(|line| line.contains(&port))
        .unwrap_or_else(|| panic!("no {port:?} in:\n{text}"));
    assert!(port_line.starts_with("blocking hostA"), "{port_line}");
    assert!(port_line.contains("-> stop that process"), "{port_line}");
    assert!(
        !text.contains("port 7460 (checkpoint_port) on 10.77.1.2"),
        "{text}"
    );
    assert!(text.contains("ftvm: 5 blocking finding(s)"), "{text}");

    // --json says the same.
    let (ok, json) = cluster.ftvm(A, &["check", "--peer", "--json", "vm1"]);
    assert!(!ok);
    let report: serde_json::Value = serde_json::from_str(
        json.lines()
            .take_while(|line| !line.starts_with("ftvm:"))
            .collect::<Vec<_>>()
            .join("\n")
            .as_str(),
    )
    .unwrap_or_else(|error| panic!("{error}: {json}"));
    assert_eq!(
        report["hosts"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
    assert_eq!(report["findings"][0]["severity"], "blocking", "{report}");

    let (ok, refused) = cluster.ftvm(A, &["protect", "vm1", "--level", "2", "--peer", "hostB"]);
    assert!(!ok, "{refused}");
    assert!(
        refused.contains("vm1 not protected: `ftvm check` found 5 blocking problem(s)")
            && refused.contains(&port),
        "{refused}"
    );
    // The check that ran when the peer came up is in the events too.
    wait_text(
        &cluster,
        B,
        &["events"],
        &[
            "check on hostB: bridge vmbr9 of NIC",
            "ip link add vmbr9 type bridge",
        ],
    );
}

/// The archive holds both hosts' pieces and none of the keys' bytes, in any encoding.
#[test]
fn collect_logs_holds_both_hosts_and_no_key_material() {
    let mut cluster = cluster("ftvm-collect");
    // Keys as `ftvm keygen` makes them (hex), in the files the configuration names.
    let status = Command::new(paths::binary("ftvm"))
        .args([
            "keygen", "--force", "--host", "hostA", "--host", "hostB", "--out",
        ])
        .arg(cluster.dir.path())
        .output()
        .expect("run ftvm keygen");
    assert!(status.status.success(), "{status:?}");
    cluster.start_all();
    cluster.wait_vm(
        A,
        Duration::from_secs(60),
        "vm1's QEMU started on hostA",
        |vm| !vm["vm_pid"].is_null(),
    );
    let out = cluster.dir.path().join("logs.tar.gz");
    let (ok, text) = cluster.ftvm(A, &["collect-logs", "--out", out.to_str().expect("utf-8")]);
    assert!(ok, "{text}");
    assert!(
        text.contains("from hostA and hostB and MANIFEST.txt"),
        "{text}"
    );
    let extracted = cluster.dir.path().join("extracted");
    std::fs::create_dir_all(&extracted).expect("mkdir");
    let untar = Command::new("tar")
        .arg("-xzf")
        .arg(&out)
        .arg("-C")
        .arg(&extracted)
        .status()
        .expect("run tar");
    assert!(untar.success());
    let files = walk(&extracted);
    let names: Vec<String> = files
        .iter()
        .map(|file| {
            file.strip_prefix(&extracted)
                .expect("under")
                .display()
                .to_string()
        })
        .collect();
    let root = names[0].split('/').next().expect("root folder").to_owned();
    for host in ["hostA", "hostB"] {
        for piece in [
            "ftvmd.toml",
            "ftvmd.log",
            "status.json",
            "events.json",
            "facts.json",
            "versions.txt",
            "kernel.txt",
            "network.txt",
            "state/vm1/disk0.log",
        ] {
            let name = format!("{root}/{host}/{piece}");
            assert!(names.contains(&name), "no {name} in {names:#?}");
        }
    }
    assert!(
        names.contains(&format!("{root}/hostA/state/vm1/console.log")),
        "{names:#?}"
    );
    let manifest =
        std::fs::read_to_string(extracted.join(&root).join("MANIFEST.txt")).expect("manifest");
    assert!(
        manifest.contains("== hostA:") && manifest.contains("== hostB:"),
        "{manifest}"
    );
    assert!(
        manifest.contains("witness: its log and grant files"),
        "{manifest}"
    );
    let facts = std::fs::read_to_string(extracted.join(&root).join("hostB/facts.json"))
        .expect("hostB facts");
    assert!(facts.contains("\"version\": \"7.2"), "{facts}");

    // No key's bytes anywhere: raw, as stored (hex), upper-case hex, base64.
    let mut forbidden: Vec<Vec<u8>> = Vec::new();
    for key in [
        "pair.psk",
        "witness-keys/hostA.psk",
        "witness-keys/hostB.psk",
    ] {
        let stored = std::fs::read(cluster.dir.path().join(key)).expect("read key");
        let text = String::from_utf8_lossy(&stored).trim().to_owned();
        let raw = decode_hex(&text);
        assert_eq!(raw.len(), 32, "{key} is not 32 bytes of hex");
        forbidden.extend([
            text.as_bytes().to_vec(),
            text.to_uppercase().into_bytes(),
            raw.clone(),
            base64(&raw).into_bytes(),
            base64(text.as_bytes()).into_bytes(),
        ]);
    }
    for file in &files {
        let bytes = std::fs::read(file).expect("read extracted file");
        for needle in &forbidden {
            assert!(
                !bytes
                    .windows(needle.len())
                    .any(|window| window == needle.as_slice()),
                "{} holds key material",
                file.display()
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

fn decode_hex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .filter_map(|index| u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok())
        .collect()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let word = chunk.iter().enumerate().fold(0u32, |word, (index, byte)| {
            word | u32::from(*byte) << (16 - 8 * index)
        });
        for index in 0..=chunk.len() {
            out.push(char::from(
                ALPHABET[(word >> (18 - 6 * index) & 63) as usize],
            ));
        }
    }
    // Without padding: a prefix of the padded form, so a padded copy is found too.
    out
}
