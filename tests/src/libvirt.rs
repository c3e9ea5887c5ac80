//! A `libvirtd` per test host (`../shared/LIBVIRT.md`): started inside the host's network
//! namespace with its own directories bind-mounted over libvirt's compiled-in paths (the
//! mounts live in that process's own mount namespace), its socket in the test's directory,
//! the ftvm hook installed, ended by PID.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::hosts::Hosts;
use crate::paths;
use crate::process::Process;
use crate::wait::poll_until;

const LIBVIRTD_CONF: &str = r#"unix_sock_dir = "/run/libvirt"
unix_sock_group = "root"
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0770"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"#;

const QEMU_CONF: &str = r#"user = "root"
group = "root"
security_driver = "none"
stdio_handler = "file"
remember_owner = 0
"#;

/// libvirt's compiled-in directories, each replaced by one of the instance's.
const MOUNTS: [(&str, &str); 5] = [
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
];

/// One host's libvirtd.
#[derive(Debug)]
pub struct Libvirtd {
    process: Process,
    dir: PathBuf,
}

impl Libvirtd {
    /// Starts libvirtd on `host` with its directories under `dir`, the ftvm hook (the
    /// package's script, calling this build's `ftvm`) installed; waits until it answers.
    pub fn start(hosts: &Hosts, host: &str, dir: &Path) -> Libvirtd {
        for (own, _) in MOUNTS {
            std::fs::create_dir_all(dir.join(own)).expect("libvirt instance dir");
        }
        for (_, system) in MOUNTS {
            std::fs::create_dir_all(system).expect("libvirt mount point");
        }
        std::fs::write(dir.join("etc/libvirtd.conf"), LIBVIRTD_CONF).expect("libvirtd.conf");
        std::fs::write(dir.join("etc/qemu.conf"), QEMU_CONF).expect("qemu.conf");
        let hooks = dir.join("etc/hooks/qemu.d");
        std::fs::create_dir_all(&hooks).expect("hooks dir");
        let hook = std::fs::read_to_string(paths::repo_root().join("packaging/libvirt-hook"))
            .expect("packaging/libvirt-hook")
            .replace("/usr/bin/ftvm", &paths::binary("ftvm").to_string_lossy());
        let hook_path = hooks.join("50-ftvm");
        std::fs::write(&hook_path, hook).expect("write the hook");
        std::fs::set_permissions(
            &hook_path,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod the hook");
        warm_capabilities(dir);
        let mut mounts = String::new();
        for (own, system) in MOUNTS {
            mounts.push_str(&format!(
                "mount --bind '{}' {system} && ",
                dir.join(own).display()
            ));
        }
        let mut command = hosts.command(host, "sh");
        command.arg("-c").arg(format!(
            "{mounts}exec /usr/sbin/libvirtd --config /etc/libvirt/libvirtd.conf \
             --pid-file /run/libvirt/libvirtd.pid"
        ));
        let process = Process::spawn(
            &format!("libvirtd-{host}"),
            command,
            &dir.join("libvirtd.out"),
        );
        let libvirtd = Libvirtd {
            process,
            dir: dir.to_owned(),
        };
        poll_until(Duration::from_secs(90), "libvirtd to answer", || {
            libvirtd.virsh(&["list", "--all"]).0
        });
        keep_capabilities(dir);
        libvirtd
    }

    /// The URI for `virsh -c` and `[libvirt] uri`.
    pub fn uri(&self) -> String {
        format!(
            "qemu:///system?socket={}",
            self.dir.join("run/libvirt-sock").display()
        )
    }

    /// `virsh -c URI ARGS`: (success, stdout + stderr).
    pub fn virsh(&self, args: &[&str]) -> (bool, String) {
        let output = Command::new("virsh")
            .arg("-c")
            .arg(self.uri())
            .args(args)
            .output()
            .expect("run virsh");
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        (output.status.success(), text)
    }

    /// libvirtd's log and the domains' QEMU logs, for a failing test.
    pub fn logs(&self) -> String {
        let mut text = std::fs::read_to_string(self.dir.join("log/libvirtd.log"))
            .unwrap_or_default()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        if let Ok(entries) = std::fs::read_dir(self.dir.join("log/qemu")) {
            for entry in entries.flatten() {
                text.push_str(&format!("\n-- {} --\n", entry.path().display()));
                text.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        text
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        self.process.terminate();
    }
}

/// QEMU's capabilities, probed once per build tree (about 8 s, longer under load) and
/// copied into each new instance.
fn capabilities_cache() -> PathBuf {
    paths::target_dir().join("libvirt-capabilities")
}

fn warm_capabilities(dir: &Path) {
    let target = dir.join("cache/qemu/capabilities");
    let Ok(entries) = std::fs::read_dir(capabilities_cache()) else {
        return;
    };
    std::fs::create_dir_all(&target).expect("capabilities dir");
    for entry in entries.flatten() {
        let _ = std::fs::copy(entry.path(), target.join(entry.file_name()));
    }
}

fn keep_capabilities(dir: &Path) {
    let cache = capabilities_cache();
    if cache.exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir.join("cache/qemu/capabilities")) else {
        return;
    };
    // Another test may fill it at the same time: build aside, then rename.
    let aside = cache.with_extension(format!("{}", std::process::id()));
    if std::fs::create_dir_all(&aside).is_err() {
        return;
    }
    for entry in entries.flatten() {
        let _ = std::fs::copy(entry.path(), aside.join(entry.file_name()));
    }
    if std::fs::rename(&aside, &cache).is_err() {
        let _ = std::fs::remove_dir_all(&aside);
    }
}
