use std::process::ExitCode;
use std::time::{Duration, Instant, UNIX_EPOCH};

use clap::Parser;
use coordinator::check::Severity;
use coordinator::cli::{
    AlertAction, AppConsistent, FtvmArgs as Args, FtvmCommand as Command, HostAction, KeyAction,
    KeyChoice, SnapshotAction,
};
use coordinator::daemon::control::CheckReport;
use coordinator::daemon::control::{
    request, DiskSnapshots, HostStatus, KeyStatus, Reply, Request, SnapshotCommand,
    SnapshotConsistency,
};
use coordinator::daemon::nics::NicStatus;
use coordinator::host::Role;

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ftvm: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let ask = |request_: Request| -> Result<Reply, String> {
        match request(&args.socket, &request_)? {
            Reply::Error(error) => Err(error),
            reply => Ok(reply),
        }
    };
    match &args.command {
        Command::Keygen { out, hosts, force } => {
            let keys = coordinator::keygen::generate(out, hosts, *force)
                .map_err(|error| coordinator::error_chain(&error))?;
            print!("{}", coordinator::keygen::instructions(&keys));
        }
        Command::Key { action } => key(action, &ask)?,
        Command::Status { json } => {
            let Reply::Status(status) = ask(Request::Status)? else {
                return Err("unexpected answer from ftvmd".into());
            };
            if *json {
                print_json(&status)?;
            } else {
                print!("{}", table(&status));
            }
        }
        Command::Events { json } => {
            let Reply::Events(events) = ask(Request::Events)? else {
                return Err("unexpected answer from ftvmd".into());
            };
            if *json {
                print_json(&events)?;
            } else {
                for event in events {
                    let time = UNIX_EPOCH + Duration::from_millis(event.unix_ms);
                    let time = humantime(time);
                    let vm = if event.vm.is_empty() { "-" } else { &event.vm };
                    let advice = if event.advice.is_empty() {
                        String::new()
                    } else {
                        format!(" -> {}", event.advice)
                    };
                    println!(
                        "{time}  {:<8} {vm:<12} {}{advice}",
                        format!("{:?}", event.severity),
                        event.what
                    );
                }
            }
        }
        Command::Protect {
            domain: Some(domain),
            level,
            peer,
            yes,
            ..
        } => coordinator::domain_cli::protect(&args.socket, domain, *level, peer, *yes)?,
        Command::Protect {
            vm, level, peer, ..
        } => done(ask(Request::Protect {
            vm: vm.clone().unwrap_or_default(),
            level: *level,
            peer: peer.clone(),
        })?),
        Command::Unprotect { vm, domain } => done(ask(Request::Unprotect {
            vm: domain.clone().or_else(|| vm.clone()).unwrap_or_default(),
        })?),
        Command::Hook {
            domain, operation, ..
        } => return coordinator::domain_cli::hook(domain, operation),
        Command::Check { vm, peer, json } => {
            let Reply::Check(report) = ask(Request::Check {
                vm: vm.clone(),
                peer: *peer,
            })?
            else {
                return Err("unexpected answer from ftvmd".into());
            };
            if *json {
                print_json(&report)?;
            } else {
                print!("{}", check_text(&report));
            }
            let blocking = report
                .findings
                .iter()
                .filter(|finding| finding.severity == Severity::Blocking)
                .count();
            if blocking > 0 {
                return Err(format!(
                    "{blocking} blocking finding(s): `ftvm protect` refuses until they are fixed"
                ));
            }
        }
        Command::CollectLogs { out } => {
            let Reply::Bundles(bundles) = ask(Request::CollectLogs)? else {
                return Err("unexpected answer from ftvmd".into());
            };
            let now = humantime(std::time::SystemTime::now());
            let stamp: String = now
                .chars()
                .filter(|c| c.is_ascii_digit())
                .take(14)
                .collect();
            let host = bundles
                .first()
                .map_or("ftvm", |bundle| bundle.host.as_str());
            let name = format!(
                "ftvm-logs-{host}-{}-{}",
                &stamp[..8.min(stamp.len())],
                &stamp[8.min(stamp.len())..]
            );
            let path = out
                .clone()
                .unwrap_or_else(|| std::path::PathBuf::from(format!("{name}.tar.gz")));
            let written = coordinator::collect::write_archive(&path, &name, &bundles, &now)
                .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
            println!("{}: {written}", path.display());
        }
        Command::Failover { vm } => done(ask(Request::Failover { vm: vm.clone() })?),
        Command::Migrate {
            vm,
            cancel,
            no_wait,
            timeout,
        } => {
            // Right after the copies come back in sync the peer's last heartbeat may
            // still say otherwise for a moment: that refusal is retried for a few seconds.
            let retry_until = Instant::now() + Duration::from_secs(5);
            let reply = loop {
                match ask(Request::Migrate {
                    vm: vm.clone(),
                    cancel: *cancel,
                    timeout_s: *timeout,
                }) {
                    Err(error)
                        if error.contains("try again in a moment")
                            && Instant::now() < retry_until =>
                    {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    other => break other?,
                }
            };
            done(reply);
            if !*cancel && !*no_wait {
                wait_for_move(&ask, vm, Duration::from_secs(*timeout + 120))?;
            }
        }
        Command::Snapshot { action } => snapshot(&ask, action)?,
        Command::Alert {
            action: AlertAction::Test,
        } => done(ask(Request::AlertTest)?),
        Command::Host {
            action: HostAction::Enable,
        } => done(ask(Request::HostEnable)?),
        Command::Host {
            action: HostAction::Disable { timeout, restart },
        } => {
            let deadline = Instant::now() + Duration::from_secs(*timeout);
            loop {
                let reply = ask(Request::HostDisable { restart: *restart })?;
                let Reply::Status(status) = ask(Request::Status)? else {
                    return Err("unexpected answer from ftvmd".into());
                };
                if status.disabled {
                    done(reply);
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "VMs still primary here after {timeout} s: {}; see `ftvm events`",
                        primaries(&status).join(", ")
                    ));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    Ok(())
}

fn snapshot(
    ask: &dyn Fn(Request) -> Result<Reply, String>,
    action: &SnapshotAction,
) -> Result<(), String> {
    let (vm, command, json) = match action {
        SnapshotAction::Create {
            vm,
            name,
            app_consistent,
        } => {
            let consistency = app_consistent.map(|when| match when {
                AppConsistent::Yes => SnapshotConsistency::Application,
                AppConsistent::Auto => SnapshotConsistency::Auto,
                AppConsistent::No => SnapshotConsistency::Crash,
            });
            let command = SnapshotCommand::Create {
                name: name.clone(),
                consistency,
            };
            (vm, command, false)
        }
        SnapshotAction::List { vm, json } => (vm, SnapshotCommand::List, *json),
        SnapshotAction::Delete { vm, name } => {
            (vm, SnapshotCommand::Delete { name: name.clone() }, false)
        }
        SnapshotAction::Revert { vm, name } => {
            (vm, SnapshotCommand::Revert { name: name.clone() }, false)
        }
    };
    let reply = ask(Request::Snapshot {
        vm: vm.clone(),
        snapshot: command,
    })?;
    match reply {
        Reply::Snapshots(disks) if json => print_json(&disks)?,
        Reply::Snapshots(disks) => print!("{}", snapshot_table(&disks)),
        other => done(other),
    }
    Ok(())
}

fn snapshot_table(disks: &[DiskSnapshots]) -> String {
    let mut text = String::new();
    for disk in disks {
        text.push_str(&format!("{} ({})\n", disk.disk, disk.image));
        if disk.snapshots.is_empty() {
            text.push_str("  no snapshots\n");
        }
        for snapshot in &disk.snapshots {
            let time = humantime(UNIX_EPOCH + Duration::from_secs(snapshot.created_unix_s));
            text.push_str(&format!(
                "  {:<24} {time}  {:<11}  {:>10} held alone\n",
                snapshot.name.as_str(),
                snapshot.consistency.word(),
                bytes(snapshot.unshared_bytes)
            ));
        }
    }
    text
}

fn bytes(count: u64) -> String {
    match count {
        count if count >= 1 << 30 => format!("{:.1} GiB", count as f64 / (1u64 << 30) as f64),
        count if count >= 1 << 20 => format!("{:.1} MiB", count as f64 / (1u64 << 20) as f64),
        count if count >= 1 << 10 => format!("{:.1} KiB", count as f64 / 1024.0),
        count => format!("{count} B"),
    }
}

/// Follows a move until this host is the VM's secondary (done) or the move ends here
/// without that (called off: the events say why).
fn wait_for_move(
    ask: &dyn Fn(Request) -> Result<Reply, String>,
    vm: &str,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last_phase = String::new();
    loop {
        let Reply::Status(status) = ask(Request::Status)? else {
            return Err("unexpected answer from ftvmd".into());
        };
        let Some(vm_status) = status.vms.iter().find(|status| status.name == vm) else {
            return Err(format!("{vm} is gone from ftvmd's status"));
        };
        match &vm_status.migration {
            Some(migration) => {
                let phase = migration["phase"].as_str().unwrap_or("?").to_owned();
                if phase != last_phase {
                    println!(
                        "{vm}: {phase} ({:.1} s)",
                        migration["seconds"].as_f64().unwrap_or(0.0)
                    );
                    last_phase = phase;
                }
            }
            None if vm_status.role == Role::Secondary => {
                println!("{vm} runs on {}; this host is its secondary", status.peer);
                return Ok(());
            }
            None => {
                return Err(format!(
                    "the move of {vm} was called off; it runs on {}: see `ftvm events`",
                    status.host
                ))
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{vm} still moving after {} s; see `ftvm status` and `ftvm events`",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `--json`: the answer, pretty-printed.
fn print_json(value: &impl serde::Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|error| error.to_string())?;
    println!("{text}");
    Ok(())
}

/// A line per host (QEMU, KVM, memory, CPUs), then a line per finding.
fn check_text(report: &CheckReport) -> String {
    let mut text = String::new();
    for host in &report.hosts {
        let qemu = match &host.qemu {
            Ok(qemu) => format!("QEMU {}", qemu.version),
            Err(_) => "QEMU does not run".into(),
        };
        let kvm = match &host.kvm {
            Ok(_) => "KVM".to_owned(),
            Err(why) => format!("no KVM ({why})"),
        };
        text.push_str(&format!(
            "{}: {qemu}, {kvm}, {} MiB available, {} CPUs, {} VM(s)\n",
            host.host,
            host.memory_available_mib,
            host.cpus,
            host.vms.len()
        ));
    }
    for finding in &report.findings {
        text.push_str(&finding.line());
        text.push('\n');
    }
    if report.findings.is_empty() {
        let hosts = if report.hosts.len() > 1 {
            "both hosts"
        } else {
            "this host"
        };
        text.push_str(&format!(
            "no findings: every VM checked can run on {hosts}\n"
        ));
    }
    text
}

fn done(reply: Reply) {
    if let Reply::Done(message) = reply {
        println!("{message}");
    }
}

fn primaries(status: &HostStatus) -> Vec<String> {
    status
        .vms
        .iter()
        .filter(|vm| vm.role == Role::Primary)
        .map(|vm| vm.name.clone())
        .collect()
}

/// `ftvm key rotate|retire`: the file work here (ftvmd cannot write /etc), the checks
/// from ftvmd's status.
fn key(action: &KeyAction, ask: &dyn Fn(Request) -> Result<Reply, String>) -> Result<(), String> {
    let status = |choice: &KeyChoice| -> Result<KeyStatus, String> {
        let Reply::Status(status) = ask(Request::Status)? else {
            return Err("unexpected answer from ftvmd".into());
        };
        Ok(if choice.witness {
            status.witness_key
        } else {
            status.pair_key
        })
    };
    let file = |choice: &KeyChoice| -> Result<std::path::PathBuf, String> {
        match &choice.key_file {
            Some(file) => Ok(file.clone()),
            None => status(choice)
                .map(|key| key.file)
                .map_err(|error| format!("{error} (give --key-file FILE when ftvmd does not run)")),
        }
    };
    let error =
        |error: coordinator::key_rotation::KeyRotationError| coordinator::error_chain(&error);
    match action {
        KeyAction::Rotate { new, key } => {
            let path = file(key)?;
            let rotated =
                coordinator::key_rotation::rotate(&path, new.as_deref()).map_err(error)?;
            let previous = replication_link::key_ring::previous_key_path(&path);
            println!(
                "{}: key {} preferred now, key {} still accepted ({}).",
                path.display(),
                rotated.new,
                rotated.previous,
                previous.display()
            );
            if key.witness {
                println!(
                    "Next: put {} on the witness as this host's key, restart ftvm-witness, then `ftvm key retire --witness` here.",
                    path.display()
                );
            } else if new.is_none() {
                println!(
                    "Next: copy {} to the peer (scp -p) and run `ftvm key rotate --new COPY` there; then `ftvm key retire` on both hosts.",
                    path.display()
                );
            } else {
                println!("Next: `ftvm key retire` on both hosts.");
            }
        }
        KeyAction::Retire { key, force } => {
            let path = file(key)?;
            if !*force {
                let status = status(key)
                    .map_err(|error| format!("{error} (or --force to retire unchecked)"))?;
                coordinator::key_rotation::check_retire(&status, key.witness)
                    .map_err(|error| format!("not retired: {error} (or --force)"))?;
            }
            let retired = coordinator::key_rotation::retire(&path).map_err(error)?;
            println!(
                "{}: key {retired} retired; connections under it are replaced by ones under the current key.",
                path.display()
            );
        }
    }
    Ok(())
}

fn key_line(name: &str, key: &KeyStatus) -> String {
    let held = match key.held.as_slice() {
        [preferred] => preferred.clone(),
        [preferred, rest @ ..] => format!("{preferred} (also accepted: {})", rest.join(", ")),
        [] => "-".into(),
    };
    let peer = match &key.peer_holds {
        Some(keys) => format!(", peer holds {}", keys.join(", ")),
        None => String::new(),
    };
    format!(
        "{name} key {held}; links use {}{peer}\n",
        if key.in_use.is_empty() {
            "-".into()
        } else {
            key.in_use.join(", ")
        }
    )
}

fn table(status: &HostStatus) -> String {
    let mut out = format!(
        "host {} (peer {}): A-links {}/{} up, witness {}{}\n",
        status.host,
        status.peer,
        status.links_up,
        status.links,
        if status.witness_reachable {
            "reachable"
        } else {
            "UNREACHABLE"
        },
        if status.disabled { ", DISABLED" } else { "" }
    );
    out.push_str(&key_line("pair", &status.pair_key));
    out.push_str(&key_line("witness", &status.witness_key));
    out.push_str(&format!(
        "{:<12} {:>5} {:<12} {:<10} {:<10} {:>6} {:>5} {:>6} {:<9}\n",
        "VM", "LEVEL", "STATE", "PRIMARY", "SECONDARY", "SYNC", "GEN", "LINKS", "WITNESS"
    ));
    for vm in &status.vms {
        let sync = vm
            .sync_percent
            .map_or("-".into(), |percent| format!("{percent:.0}%"));
        out.push_str(&format!(
            "{:<12} {:>5} {:<12} {:<10} {:<10} {:>6} {:>5} {:>6} {:<9}\n",
            vm.name,
            vm.level,
            vm.state,
            vm.primary.as_deref().unwrap_or("-"),
            vm.secondary.as_deref().unwrap_or("-"),
            sync,
            vm.generation,
            format!("{}/{}", status.links_up, status.links),
            if status.witness_reachable {
                "ok"
            } else {
                "DOWN"
            },
        ));
        if vm.vm_paused {
            out.push_str("  guest paused here: writes held until the witness decides\n");
        }
        if vm.vm_prestarted {
            out.push_str(&format!(
                "  QEMU started here ahead of the move (pid {}): it waits for the final checkpoint\n",
                vm.vm_pid.unwrap_or_default()
            ));
        }
        for nic in &vm.nics {
            out.push_str(&format!("  nic {}: {}\n", nic.mac, nic_line(nic)));
        }
        if let Some(migration) = &vm.migration {
            out.push_str(&format!(
                "  migrating to {}: {} for {:.0} s\n",
                migration["to"].as_str().unwrap_or("?"),
                migration["phase"].as_str().unwrap_or("?"),
                migration["seconds"].as_f64().unwrap_or(0.0)
            ));
        }
        if let Some(checkpoint) = &vm.checkpoint {
            out.push_str(&format!("  checkpoints: {}\n", checkpoint_line(checkpoint)));
        } else if vm.level == 3 {
            out.push_str("  checkpoints: no engine runs here\n");
        }
    }
    out
}

/// The Level 3 engine's state on this host, in words.
fn checkpoint_line(status: &serde_json::Value) -> String {
    let text = |key: &str| status[key].as_str().unwrap_or("?").to_owned();
    let mut line = format!("{} {}", text("role"), text("state"));
    if status["role"] == "primary" {
        let stats = &status["stats"];
        if let Some(epoch) = stats["committed_epoch"].as_u64() {
            line.push_str(&format!(
                ", committed epoch {epoch}, {:.1}/s, pause p50 {:.1} ms p99 {:.1} ms, {} in flight",
                stats["epochs_per_second"].as_f64().unwrap_or(0.0),
                stats["pause_p50_ms"].as_f64().unwrap_or(0.0),
                stats["pause_p99_ms"].as_f64().unwrap_or(0.0),
                stats["lag_epochs"].as_u64().unwrap_or(0),
            ));
        }
    } else {
        line.push_str(&format!(
            ", replica at epoch {}{}",
            status["committed_epoch"].as_u64().unwrap_or(0),
            if status["restorable"] == true {
                " (restorable)"
            } else {
                " (NOT restorable yet: first full copy)"
            }
        ));
    }
    if let Some(problem) = status["problem"].as_str() {
        line.push_str(&format!(": {problem}"));
    }
    line
}

/// A NIC's state on this host, in words: where its frames go, and what is wrong.
fn nic_line(nic: &NicStatus) -> String {
    if nic.pid.is_none() {
        return "no daemon on this host".into();
    }
    let Some(path) = nic.path.filter(|_| nic.answering) else {
        return "unknown (its daemon does not answer)".into();
    };
    let Some(uplink) = &nic.uplink else {
        return format!("path {path} (no redundant uplink)");
    };
    let word = |flag: Option<bool>, yes: &str, no: &str| match flag {
        Some(true) => yes.to_owned(),
        Some(false) => no.to_owned(),
        None => "unknown".to_owned(),
    };
    let mut line = format!(
        "path {path}, uplink {uplink} {}, peer {}",
        word(nic.uplink_up, "up", "DOWN"),
        word(nic.peer_reachable, "reachable", "UNREACHABLE"),
    );
    if nic.guest_attached != Some(true) {
        line.push_str(", standby");
    }
    if nic.relaying_for_peer == Some(true) {
        line.push_str(", relaying for the peer");
    }
    line
}

/// UTC time as `YYYY-MM-DD HH:MM:SS.mmm`.
fn humantime(time: std::time::SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    // 2026-12-07T08:55:02.125Z as 2026-12-07 08:55:02.125
    coordinator::daemon::events::utc_time(since.as_millis() as u64)
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    use control_protocol::nic::Path;

    fn nic(path: Option<Path>, uplink_up: Option<bool>) -> NicStatus {
        NicStatus {
            mac: "52:54:00:12:34:56".into(),
            uplink: Some("uplink".into()),
            pid: Some(42),
            answering: path.is_some(),
            path,
            uplink_up,
            peer_reachable: Some(true),
            relaying_for_peer: Some(false),
            guest_attached: Some(true),
            relay: None,
        }
    }

    #[test]
    fn a_nic_line_names_the_path_and_what_is_down() {
        let line = nic_line(&nic(Some(Path::Peer), Some(false)));
        assert_eq!(line, "path peer, uplink uplink DOWN, peer reachable");
        assert!(nic_line(&nic(None, None)).contains("does not answer"));
        let standby = NicStatus {
            guest_attached: Some(false),
            relaying_for_peer: Some(true),
            ..nic(Some(Path::Local), Some(true))
        };
        assert_eq!(
            nic_line(&standby),
            "path local, uplink uplink up, peer reachable, standby, relaying for the peer"
        );
        let stopped = NicStatus {
            pid: None,
            ..nic(None, None)
        };
        assert_eq!(nic_line(&stopped), "no daemon on this host");
        let plain = NicStatus {
            uplink: None,
            ..nic(Some(Path::Local), None)
        };
        assert_eq!(nic_line(&plain), "path local (no redundant uplink)");
    }
}
