//! `ftvm snapshot create --app-consistent` with ftvmd and a guest that runs qemu-ga (issue
//! 13 item 4): the guest writes a file on an ext4 without syncing it (writeback and
//! journal commits held off), a crash-consistent snapshot lacks it and needs a journal
//! replay, an application-consistent one (the agent froze the file system) holds it and
//! is clean; a revert boots the guest into it. A snapshot that fails after the freeze
//! still thaws; a hung agent (SIGSTOPped in the guest) is refused with the reason and the
//! guest keeps running and writing, and `--app-consistent=auto` falls back to a
//! crash-consistent snapshot.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use coordinator::daemon::guest_agent::Session;
use ftvm_tests::cluster::{Cluster, ClusterOptions};
use ftvm_tests::guest::GuestConfig;
use ftvm_tests::wait::Wait;
use ftvm_tests::xfs::XfsMount;
use serde_json::{json, Value};

const A: usize = 0;
const B: usize = 1;
const PATTERN: &str = "PATTERN-5a5a-0123456789";

/// Mounts the ext4 on /dev/vda with journal commits and writeback held off (nothing the
/// guest writes reaches the disk unless something flushes it); on a disk without the file,
/// writes it unsynced; then every second rewrites /mnt/alive (a frozen file system stops
/// the ALIVE lines).
const SCRIPT: &str = r#"
echo 60000 > /proc/sys/vm/dirty_expire_centisecs
echo 0 > /proc/sys/vm/dirty_writeback_centisecs
mkdir -p /mnt
mount -t ext4 -o commit=600 /dev/vda /mnt || echo MOUNT-FAILED
if [ -f /mnt/data ]; then
    echo "FOUND:[$(cat /mnt/data)]"
else
    echo PATTERN-5a5a-0123456789 > /mnt/data && echo WROTE-DATA
fi
i=0
while true; do
    i=$((i + 1))
    echo "$i" > /mnt/alive && echo "ALIVE $i"
    sleep 1
done
"#;

fn wait_protected(cluster: &Cluster, what: &str) -> Value {
    cluster.wait_vm(A, Duration::from_secs(90), what, |vm| {
        vm["role"] == "Primary" && vm["state"] == "Protected" && vm["vm_pid"].is_u64()
    })
}

fn count(cluster: &Cluster, needle: &str) -> usize {
    cluster
        .console(A)
        .iter()
        .filter(|line| line.contains(needle))
        .count()
}

/// Waits until the guest writes its file system again (more ALIVE lines).
fn wait_alive(cluster: &Cluster, what: &str) {
    let seen = count(cluster, "ALIVE ");
    Wait::up_to(Duration::from_secs(30))
        .every(Duration::from_millis(200))
        .until(what, || count(cluster, "ALIVE ") >= seen + 2);
}

/// A session with the guest agent on hostA, once it answers.
fn agent(cluster: &Cluster) -> Session {
    let path = cluster.guest_agent_socket(A);
    let mut session = None;
    Wait::up_to(Duration::from_secs(60))
        .every(Duration::from_millis(200))
        .until("the guest agent to answer", || {
            session = Session::open(&path, Duration::from_secs(2)).ok();
            session.is_some()
        });
    session.expect("a session")
}

fn freeze_status(cluster: &Cluster) -> String {
    agent(cluster)
        .freeze_status(Duration::from_secs(5))
        .expect("guest-fsfreeze-status")
}

/// Runs `shell` in the guest through the agent's `guest-exec`; waits for it to end unless
/// `detach`.
fn guest_exec(cluster: &Cluster, shell: &str, detach: bool) {
    let mut session = agent(cluster);
    let timeout = Duration::from_secs(10);
    let started = session
        .execute_with(
            "guest-exec",
            Some(json!({ "path": "/bin/sh", "arg": ["-c", shell] })),
            timeout,
        )
        .expect("guest-exec");
    if detach {
        return;
    }
    let pid = started["pid"].clone();
    Wait::up_to(Duration::from_secs(30))
        .every(Duration::from_millis(100))
        .until(&format!("`{shell}` to end in the guest"), || {
            let status = session
                .execute_with("guest-exec-status", Some(json!({ "pid": pid })), timeout)
                .expect("guest-exec-status");
            status["exited"] == true
        });
}

/// Runs a host tool on a snapshot file: (exit code, stdout, stderr).
fn tool(program: &str, args: &[&str], file: &Path) -> (i32, String, String) {
    let output = Command::new(program)
        .args(args)
        .arg(file)
        .output()
        .unwrap_or_else(|error| panic!("{program}: {error} (install e2fsprogs)"));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn needs_recovery(file: &Path) -> bool {
    let (code, out, err) = tool("dumpe2fs", &["-h"], file);
    assert_eq!(code, 0, "dumpe2fs: {err}");
    out.lines()
        .any(|line| line.starts_with("Filesystem features:") && line.contains("needs_recovery"))
}

fn snapshot_consistency(cluster: &Cluster, host: usize) -> Vec<(String, String)> {
    let (ok, listed) = cluster.ftvm(host, &["snapshot", "list", "vm1", "--json"]);
    assert!(ok, "{listed}");
    let disks: Value = serde_json::from_str(&listed).expect("json");
    disks[0]["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|snapshot| {
            (
                snapshot["name"].as_str().unwrap_or_default().to_owned(),
                snapshot["consistency"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

#[test]
fn app_consistent_snapshot_freezes_the_guest_file_systems_and_always_thaws() {
    let xfs = XfsMount::new("ftvmd-snapshot-app");
    let mut guest = GuestConfig::new("ftvm-snapshot-app", SCRIPT);
    guest.memory_mb = 128;
    guest.with_guest_agent = true;
    let mut cluster = Cluster::new("ftvmd-snapshot-app", &guest, &ClusterOptions::default());
    // hostA's image: an ext4 made here, on the XFS (reflinks); hostB's a copy of it.
    let images: Vec<PathBuf> = [A, B]
        .iter()
        .map(|&host| xfs.path().join(format!("host{host}.img")))
        .collect();
    let size = std::fs::metadata(cluster.image(A)).expect("image").len();
    ftvm_tests::create_image(&images[A], size);
    let (code, _, err) = tool("mkfs.ext4", &["-q", "-F"], &images[A]);
    assert_eq!(code, 0, "mkfs.ext4: {err}");
    std::fs::copy(&images[A], &images[B]).expect("copy the image");
    for host in [A, B] {
        std::fs::remove_file(cluster.image(host)).expect("remove the host's image");
        std::os::unix::fs::symlink(&images[host], cluster.image(host)).expect("symlink");
    }
    cluster.start_all();
    wait_protected(&cluster, "Protected on hostA");
    cluster.wait_console(A, "WROTE-DATA");
    wait_alive(&cluster, "the guest to write its file system");

    // Crash-consistent (the default), then application-consistent, a moment apart.
    let (ok, text) = cluster.ftvm(A, &["snapshot", "create", "vm1", "crash1"]);
    assert!(ok, "{text}");
    let started = Instant::now();
    let (ok, text) = cluster.ftvm(
        A,
        &["snapshot", "create", "vm1", "app1", "--app-consistent"],
    );
    eprintln!(
        "ftvm snapshot create --app-consistent: {text} ({:?})",
        started.elapsed()
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("the guest agent froze 1 file system(s) (guest-fsfreeze-status: frozen)")
            && text.contains("application snapshot app1 taken on both copies")
            && text.contains(
                "the guest agent thawed 1 file system(s) (guest-fsfreeze-status: thawed)"
            ),
        "{text}"
    );
    let log = cluster.log(A);
    assert!(
        log.contains("snapshot create app1 application: the guest agent froze 1 file system(s) (guest-fsfreeze-status: frozen)"),
        "ftvmd's log does not show the freeze"
    );
    assert_eq!(freeze_status(&cluster), "thawed");
    wait_alive(&cluster, "the guest to write again after the thaw");

    // On the disk: the frozen file system was flushed and is clean; the other is not.
    let directory = PathBuf::from(format!("{}.snapshots", images[A].display()));
    let (app, crash) = (directory.join("app1"), directory.join("crash1"));
    let (_, data, _) = tool("debugfs", &["-R", "cat /data"], &app);
    assert_eq!(
        data.trim(),
        PATTERN,
        "the application-consistent snapshot's /data"
    );
    assert!(
        !needs_recovery(&app),
        "the application-consistent snapshot needs a journal replay"
    );
    let (code, out, err) = tool("e2fsck", &["-fn"], &app);
    assert_eq!(
        code, 0,
        "e2fsck of the application-consistent snapshot: {out}{err}"
    );
    let (_, data, _) = tool("debugfs", &["-R", "cat /data"], &crash);
    assert!(
        !data.contains(PATTERN),
        "the crash-consistent snapshot holds /data already: the test shows nothing"
    );
    assert!(
        needs_recovery(&crash),
        "the crash-consistent snapshot needs no journal replay: the test shows nothing"
    );
    let peer_copy = PathBuf::from(format!("{}.snapshots/app1", images[B].display()));
    assert!(
        std::fs::read(&peer_copy).expect("hostB's snapshot")
            == std::fs::read(&app).expect("hostA's snapshot"),
        "the copies' snapshots differ"
    );
    for host in [A, B] {
        let listed = snapshot_consistency(&cluster, host);
        assert!(
            listed.contains(&("app1".into(), "application".into()))
                && listed.contains(&("crash1".into(), "crash".into())),
            "{listed:?}"
        );
    }
    let (ok, table) = cluster.ftvm(A, &["snapshot", "list", "vm1"]);
    assert!(ok && table.contains("application"), "{table}");

    // A snapshot that fails after the freeze (the name is taken) thaws all the same.
    let (ok, text) = cluster.ftvm(
        A,
        &["snapshot", "create", "vm1", "app1", "--app-consistent"],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("exists already") && text.contains("thawed 1 file system(s)"),
        "{text}"
    );
    assert_eq!(freeze_status(&cluster), "thawed");
    wait_alive(&cluster, "the guest to write after the failed snapshot");

    // More writes, then the revert: the guest boots into the frozen file system's state.
    guest_exec(&cluster, "echo CHANGED > /mnt/data && sync", false);
    let boots = count(&cluster, "FTVM-BOOTED");
    let (ok, text) = cluster.ftvm(A, &["snapshot", "revert", "vm1", "app1"]);
    assert!(ok, "{text}");
    Wait::up_to(Duration::from_secs(120))
        .every(Duration::from_millis(200))
        .until("the guest to boot again after the revert", || {
            count(&cluster, "FTVM-BOOTED") > boots
        });
    cluster.wait_console(A, &format!("FOUND:[{PATTERN}]"));
    wait_protected(&cluster, "Protected after the revert");
    wait_alive(&cluster, "the reverted guest to write its file system");

    // A hung agent: refused with the reason, nothing frozen, the guest goes on writing.
    guest_exec(&cluster, "kill -STOP $(pidof qemu-ga)", true);
    Wait::up_to(Duration::from_secs(30))
        .every(Duration::from_millis(200))
        .until("the guest agent to stop answering", || {
            Session::open(&cluster.guest_agent_socket(A), Duration::from_secs(1)).is_err()
        });
    let started = Instant::now();
    let (ok, text) = cluster.ftvm(
        A,
        &["snapshot", "create", "vm1", "hung", "--app-consistent"],
    );
    eprintln!("refused: {text} ({:?})", started.elapsed());
    assert!(!ok, "{text}");
    assert!(
        text.contains("not application-consistent, no snapshot taken")
            && text.contains("is qemu-guest-agent installed and running in the guest?"),
        "{text}"
    );
    wait_alive(&cluster, "the guest to write with its agent hung");
    wait_protected(&cluster, "Protected with the agent hung");
    let (ok, text) = cluster.ftvm(
        A,
        &[
            "snapshot",
            "create",
            "vm1",
            "auto1",
            "--app-consistent=auto",
        ],
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("crash-consistent: the guest agent did not answer")
            && text.contains("crash snapshot auto1 taken on both copies"),
        "{text}"
    );
    let listed = snapshot_consistency(&cluster, A);
    assert!(
        listed.contains(&("auto1".into(), "crash".into())),
        "{listed:?}"
    );
    assert!(!listed.iter().any(|(name, _)| name == "hung"), "{listed:?}");
    wait_alive(&cluster, "the guest to write after the fallback");
    drop(cluster);
    drop(xfs);
}
