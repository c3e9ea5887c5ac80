//! `ftvm collect-logs`: each host's ftvmd gathers a [`Bundle`] (its logs and its VM
//! daemons', its configuration with key-looking values redacted, state files, status,
//! events, versions, kernel and QEMU facts, the tail of each guest console); the CLI packs
//! both hosts' bundles and a manifest into one tar.gz. Key files are never read: a file
//! whose name looks like a key, or that the configuration names as one, is left out.
//! Every file is capped at [`MAX_FILE_BYTES`] (its tail is kept) and a bundle at
//! [`MAX_BUNDLE_BYTES`]; the manifest says what was cut or left out, and why.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Most bytes kept of one file (its last ones).
pub const MAX_FILE_BYTES: u64 = 256 * 1024;
/// Most bytes of one host's bundle (it crosses the peer link in one message).
pub const MAX_BUNDLE_BYTES: usize = 3 * 1024 * 1024;
/// Files taken from the state directory, at most.
const MAX_STATE_FILES: usize = 200;
/// How long a command (journalctl, ip, a daemon's --version) may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// What is shown in place of a redacted value.
pub const REDACTED: &str = "<redacted>";

/// One host's part of the archive.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    pub host: String,
    pub files: Vec<BundleFile>,
    /// What could not be collected, or was cut, and why (the manifest's lines).
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFile {
    /// The path under the host's folder in the archive.
    pub path: String,
    /// The text (invalid UTF-8 replaced).
    pub text: String,
}

impl Bundle {
    fn bytes(&self) -> usize {
        self.files.iter().map(|file| file.text.len()).sum()
    }

    /// Adds a file unless the bundle would grow past [`MAX_BUNDLE_BYTES`].
    pub fn add(&mut self, path: &str, text: String) {
        if self.bytes() + text.len() > MAX_BUNDLE_BYTES {
            self.notes.push(format!(
                "{path}: left out, the host's part of the archive is at its cap of {} MiB",
                MAX_BUNDLE_BYTES >> 20
            ));
            return;
        }
        self.files.push(BundleFile {
            path: path.to_owned(),
            text,
        });
    }

    /// Adds the last [`MAX_FILE_BYTES`] of `source` as `path`.
    pub fn add_tail(&mut self, path: &str, source: &Path) {
        match tail(source, MAX_FILE_BYTES) {
            Ok((text, total)) => {
                if total > MAX_FILE_BYTES {
                    self.notes.push(format!(
                        "{path}: the last {} KiB of {} KiB ({})",
                        MAX_FILE_BYTES >> 10,
                        total >> 10,
                        source.display()
                    ));
                }
                self.add(path, text);
            }
            Err(error) => self.notes.push(format!(
                "{path}: not collected: {}: {error}",
                source.display()
            )),
        }
    }

    /// Adds what `program args` prints (bounded), or a note why it could not run.
    pub fn add_command(&mut self, path: &str, program: &str, args: &[&str]) {
        match run(program, args) {
            Ok(text) => self.add(path, text),
            Err(error) => self.notes.push(format!("{path}: not collected: {error}")),
        }
    }
}

/// Where the witness's own records are (not collected over the network).
pub const WITNESS_NOTE: &str = "witness: its log and grant files are not collected over \
     the network (ftvm-witness answers claims only); on the witness host: journalctl -u \
     ftvm-witness, and the files of its --state-dir (/var/lib/ftvm-witness under systemd). \
     What each host knows of the witness (reachable, key ids) is in HOST/status.json";

/// Writes `bundles` as `NAME/HOST/...` with `NAME/MANIFEST.txt` into a tar.gz at `path`;
/// returns a summary line.
pub fn write_archive(
    path: &Path,
    name: &str,
    bundles: &[Bundle],
    now: &str,
) -> std::io::Result<String> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    let encoder = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut archive = tar::Builder::new(encoder);
    let mut manifest = format!("ftvm collect-logs, {now} UTC\n\n");
    let mut count = 0;
    for bundle in bundles {
        manifest.push_str(&format!(
            "== {}: {} file(s)\n",
            bundle.host,
            bundle.files.len()
        ));
        for file in &bundle.files {
            let entry = format!("{name}/{}/{}", bundle.host, file.path);
            append(&mut archive, &entry, file.text.as_bytes())?;
            manifest.push_str(&format!("  {}  {} bytes\n", file.path, file.text.len()));
            count += 1;
        }
        for note in &bundle.notes {
            manifest.push_str(&format!("  note: {note}\n"));
        }
    }
    manifest.push_str(&format!(
        "\nEach file holds at most its last {} KiB, each host's part at most {} MiB.\n{WITNESS_NOTE}\n",
        MAX_FILE_BYTES >> 10,
        MAX_BUNDLE_BYTES >> 20
    ));
    append(
        &mut archive,
        &format!("{name}/MANIFEST.txt"),
        manifest.as_bytes(),
    )?;
    archive.into_inner()?.finish()?.sync_all()?;
    let hosts: Vec<&str> = bundles.iter().map(|bundle| bundle.host.as_str()).collect();
    Ok(format!(
        "{count} file(s) from {} and MANIFEST.txt",
        hosts.join(" and ")
    ))
}

fn append<W: std::io::Write>(
    archive: &mut tar::Builder<W>,
    path: &str,
    bytes: &[u8],
) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o600);
    header.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs()),
    );
    header.set_cksum();
    archive.append_data(&mut header, path, bytes)
}

/// The last `max` bytes of a file and its whole size.
pub fn tail(path: &Path, max: u64) -> std::io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let total = file.metadata()?.len();
    if total > max {
        file.seek(SeekFrom::Start(total - max))?;
    }
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes)?;
    Ok((String::from_utf8_lossy(&bytes).into_owned(), total))
}

/// Runs a command with a timeout and keeps the last [`MAX_FILE_BYTES`] of its output.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot run {program}: {error}"))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(stdout) = stdout {
            let _ = stdout.take(16 * MAX_FILE_BYTES).read_to_end(&mut text);
        }
        if let Some(stderr) = stderr {
            let _ = stderr.take(MAX_FILE_BYTES).read_to_end(&mut text);
        }
        let _ = sender.send(text);
    });
    let text = receiver.recv_timeout(COMMAND_TIMEOUT);
    let _ = child.kill();
    let status = child.wait();
    let text = text.map_err(|_| {
        format!(
            "{program} did not finish within {} s",
            COMMAND_TIMEOUT.as_secs()
        )
    })?;
    let keep = text.len().saturating_sub(MAX_FILE_BYTES as usize);
    let text = String::from_utf8_lossy(&text[keep..]).into_owned();
    match status {
        Ok(status) if !status.success() && text.trim().is_empty() => {
            Err(format!("{program} failed ({status})"))
        }
        _ => Ok(text),
    }
}

/// Configuration text with every key-looking value replaced by [`REDACTED`]: the value of
/// a key named like a secret (`psk`, `key`, `secret`, `password`, `token`; not `*_file`
/// or `*_dir`, which name files), and any long hex or base64 word anywhere.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let redacted = match line.split_once('=') {
            Some((key, _)) if secret_key(key) => format!("{}= \"{REDACTED}\"", key),
            _ => redact_words(line),
        };
        out.push_str(&redacted);
        out.push('\n');
    }
    out
}

fn secret_key(key: &str) -> bool {
    let key = key.trim().trim_matches('"').to_ascii_lowercase();
    let secret = ["psk", "key", "secret", "password", "token", "credential"]
        .iter()
        .any(|word| key.contains(word));
    let names_a_file = key.ends_with("_file") || key.ends_with("_dir") || key.ends_with("_path");
    secret && !names_a_file && !key.starts_with('#') && !key.starts_with('[')
}

/// Replaces words of 32 or more hex digits, or 40 or more base64 characters with a digit
/// and a letter in them.
fn redact_words(line: &str) -> String {
    let base64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=' | '-' | '_');
    let mut out = String::with_capacity(line.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let hex = word.len() >= 32 && word.chars().all(|c| c.is_ascii_hexdigit());
        let mixed = word.chars().any(|c| c.is_ascii_digit())
            && word.chars().any(|c| c.is_ascii_alphabetic());
        let long_base64 = word.len() >= 40 && mixed && !word.contains('/');
        if hex || long_base64 {
            out.push_str(REDACTED);
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in line.chars() {
        if base64(c) {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// Whether a file must never be read into a bundle: key files and what looks like one.
pub fn is_key_file(path: &Path, key_files: &[PathBuf]) -> bool {
    if key_files
        .iter()
        .any(|key| path == key || *path == replication_link::key_ring::previous_key_path(key))
    {
        return true;
    }
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    [".psk", ".key", ".pem", "psk.previous", "key.previous"]
        .iter()
        .any(|end| name.ends_with(end))
        || path
            .components()
            .any(|part| part.as_os_str().to_string_lossy().contains("keys"))
}

/// The files of `state_dir` worth collecting (two levels deep): logs, state, consoles; not
/// images, RAM, sockets, replicas or keys.
pub fn state_files(state_dir: &Path, key_files: &[PathBuf]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![(state_dir.to_owned(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let name = entry.file_name().to_string_lossy().into_owned();
            if kind.is_dir() {
                if depth < 1 && name != "replica" && !name.ends_with(".snapshots") {
                    dirs.push((path, depth + 1));
                }
                continue;
            }
            let wanted = [".log", ".json", ".txt", ".toml", "generation", "disabled"]
                .iter()
                .any(|end| name.ends_with(end))
                || !name.contains('.');
            let unwanted = [".img", ".ram", ".sock", ".ctl", ".lock", ".qcow2", ".raw"]
                .iter()
                .any(|end| name.ends_with(end));
            if kind.is_file() && wanted && !unwanted && !is_key_file(&path, key_files) {
                found.push(path);
            }
            if found.len() >= MAX_STATE_FILES {
                return found;
            }
        }
    }
    found
}

/// What this host tells about its kernel: version, command line, memory, CPU, modules.
pub fn kernel_facts() -> String {
    let mut text = String::new();
    for file in [
        "/proc/version",
        "/proc/cmdline",
        "/proc/meminfo",
        "/proc/loadavg",
    ] {
        text.push_str(&format!("== {file}\n"));
        text.push_str(&std::fs::read_to_string(file).unwrap_or_else(|error| format!("{error}\n")));
    }
    text.push_str("== /proc/cpuinfo (first CPU)\n");
    if let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") {
        for line in cpuinfo.lines().take_while(|line| !line.is_empty()) {
            text.push_str(line);
            text.push('\n');
        }
    }
    text.push_str("== /proc/modules (kvm, vhost, tun, bridge)\n");
    if let Ok(modules) = std::fs::read_to_string("/proc/modules") {
        for line in modules.lines().filter(|line| {
            ["kvm", "vhost", "tun", "bridge"]
                .iter()
                .any(|name| line.starts_with(name))
        }) {
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_looking_values_are_redacted_and_file_names_kept() {
        let text = "[peer]\npsk_file = \"/etc/ftvm/pair.psk\"\npsk = \"hunter2\"\n\
                    api_token = \"abc\"\nnote = \"0123456789abcdef0123456789abcdef01\"\n\
                    blob = \"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo5ODc2NTQzMjEwYWJj\"\nname = \"hostA\"\n";
        let redacted = redact(text);
        assert!(
            redacted.contains("psk_file = \"/etc/ftvm/pair.psk\""),
            "{redacted}"
        );
        assert!(!redacted.contains("hunter2"), "{redacted}");
        assert!(!redacted.contains("abc\""), "{redacted}");
        assert!(!redacted.contains("0123456789abcdef0123"), "{redacted}");
        assert!(!redacted.contains("QUJDREVG"), "{redacted}");
        assert!(redacted.contains("name = \"hostA\""), "{redacted}");
        assert_eq!(redacted.matches(REDACTED).count(), 4, "{redacted}");
    }

    #[test]
    fn key_files_are_recognised() {
        let keys = [PathBuf::from("/etc/ftvm/pair")];
        assert!(is_key_file(Path::new("/etc/ftvm/pair"), &keys));
        assert!(is_key_file(Path::new("/etc/ftvm/pair.previous"), &keys));
        assert!(is_key_file(Path::new("/x/witness.psk"), &[]));
        assert!(is_key_file(Path::new("/x/witness-keys/hostA"), &[]));
        assert!(!is_key_file(
            Path::new("/var/lib/ftvm/vm1/disk0.log"),
            &keys
        ));
    }

    #[test]
    fn tails_and_caps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big.log");
        std::fs::write(&path, "x".repeat(10) + &"y".repeat(MAX_FILE_BYTES as usize))
            .expect("write");
        let (text, total) = tail(&path, MAX_FILE_BYTES).expect("tail");
        assert_eq!(total, MAX_FILE_BYTES + 10);
        assert!(!text.contains('x'));
        let mut bundle = Bundle::default();
        bundle.add_tail("big.log", &path);
        assert!(
            bundle.notes[0].contains("the last 256 KiB of 256 KiB"),
            "{:?}",
            bundle.notes
        );
        for index in 0..20 {
            bundle.add(&format!("f{index}"), "z".repeat(MAX_FILE_BYTES as usize));
        }
        assert!(bundle.bytes() <= MAX_BUNDLE_BYTES);
        assert!(bundle.notes.iter().any(|note| note.contains("at its cap")));
    }
}
