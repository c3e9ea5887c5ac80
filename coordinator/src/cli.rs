//! The command lines of `ftvm`, `ftvmd` and `ftvm-witness` (clap), here rather than in the
//! programs so that `ftvm-gen-docs` makes their man pages and shell completions from them.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Operate ftvm, the fault tolerance for QEMU/KVM VMs, through this host's ftvmd.
///
/// Exit status: 0 done, 1 refused or failed (the message says why and what to do), 2 bad
/// usage.
#[derive(Debug, Parser)]
#[command(name = "ftvm", version)]
pub struct FtvmArgs {
    /// ftvmd's control socket (control_socket in its configuration).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/run/ftvm/ftvmd.sock",
        global = true
    )]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: FtvmCommand,
}

#[derive(Debug, Subcommand)]
pub enum FtvmCommand {
    /// One line per VM: level, state, primary, secondary, disk sync, links, witness; under
    /// it one line per NIC: the path of its frames (local or through the peer).
    Status {
        /// The whole status as JSON (for scripts and monitoring).
        #[arg(long)]
        json: bool,
    },
    /// What happened, with what to do about it (newest last).
    Events {
        #[arg(long)]
        json: bool,
    },
    /// Protect a VM defined in the configuration at a level, with the peer host; on a
    /// protected VM, change its level while it runs (on its primary; 2 to 3 and back
    /// without a restart).
    ///
    /// With --domain NAME instead of a VM: protect an existing libvirt domain (shut off,
    /// with raw file disks and bridge NICs). ftvm reads its XML, shows what it changes
    /// and asks before it does: each raw disk becomes a mirrored one (its image is the
    /// primary copy; the peer gets a full copy at the same path), each NIC is served by
    /// vhost-net-ft with the same MAC and bridge, the memory becomes shared. The original
    /// XML is kept on both hosts; `ftvm unprotect --domain NAME` gives it back.
    Protect {
        #[arg(required_unless_present = "domain", conflicts_with = "domain")]
        vm: Option<String>,
        /// A libvirt domain of this host (`[libvirt] uri`) to protect; the VM takes its name.
        #[arg(long, value_name = "NAME")]
        domain: Option<String>,
        /// With --domain: do not ask for confirmation.
        #[arg(long, requires = "domain")]
        yes: bool,
        /// 1: restart on the peer after a host loss; 2: also survive a failed disk or link;
        /// 3: also keep the VM running through the loss of its host, memory and TCP
        /// sessions included (continuous checkpoints; needs checkpoint_port).
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=3))]
        level: u8,
        /// The peer host (must be the one in ftvmd's configuration).
        #[arg(long)]
        peer: String,
    },
    /// Stop protecting a VM. A libvirt domain (protected with --domain) gets its original
    /// XML back (its disks and NICs as before, the data of the primary's copy) and runs
    /// again if it ran; run it on the VM's primary.
    Unprotect {
        #[arg(required_unless_present = "domain", conflicts_with = "domain")]
        vm: Option<String>,
        /// The protected libvirt domain (the same as its VM name).
        #[arg(long, value_name = "NAME")]
        domain: Option<String>,
    },
    /// The libvirt qemu hook (installed as /etc/libvirt/hooks/qemu.d/50-ftvm): libvirt
    /// runs it with the domain's XML on stdin. For a domain ftvm protects it asks the
    /// ftvmd named in the domain's metadata whether the domain may start here (`prepare`,
    /// `start`: a refusal exits 1 with the reason, which `virsh start` shows), and tells
    /// it of stops (`stopped`, `release`: an operator's `virsh shutdown`/`destroy` is a
    /// planned stop). Other domains pass untouched. It never calls libvirt.
    Hook {
        /// The domain's name.
        domain: String,
        /// prepare, start, started, stopped, release, migrate, restore, reconnect, attach.
        operation: String,
        /// begin, end, …
        sub_operation: Option<String>,
        /// libvirt's extra argument.
        extra: Option<String>,
    },
    /// Can each VM run on either host? One line per finding: blocking or warning, the
    /// host, the VM, what is wrong -> what to do. Exit status 1 when a finding blocks.
    ///
    /// ftvmd gathers this host's facts (with --peer also the peer's, over the A-links) and
    /// compares them: QEMU version and the VM's machine type; its CPU model (-cpu in
    /// qemu_args, default qemu64) has no unavailable feature under its accelerator on
    /// either host (QEMU's query-cpu-definitions); KVM's supported CPUID where /dev/kvm
    /// opens, and a named CPU model at Level 3 (never host); the bridges and uplinks its
    /// NICs name; its ports and vhost-user sockets not held by another process; clocks
    /// within 500 ms; disk space for a full copy of each disk; enough memory and CPUs on
    /// each host to run the VMs it would take over (at Level 3, the replica's memory now);
    /// both hosts define the VM alike. `ftvm protect` runs the same check and refuses on
    /// a blocking finding; ftvmd runs it when the peer rejoins and records the findings in
    /// `ftvm events`.
    Check {
        /// Only this VM (the memory and CPUs of the whole host are still counted).
        vm: Option<String>,
        /// Ask the peer's ftvmd for its facts too and compare both hosts.
        #[arg(long)]
        peer: bool,
        /// The findings and both hosts' facts as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One archive (tar.gz) for a support case or a bug report, from this host and the
    /// peer: ftvmd's log (its stderr file, or the journal), its VM daemons' and QEMU's
    /// logs, the last 256 KiB of each guest console, state files, status, events, the
    /// configuration with key-looking values redacted, versions, kernel, network, QEMU and
    /// KVM facts; and MANIFEST.txt: what is in it, what could not be collected and why.
    ///
    /// Key files are never read into it. Each file is cut to its last 256 KiB and each
    /// host's part to 3 MiB; the manifest says where. The witness's own log and grant
    /// files stay on the witness host (journalctl -u ftvm-witness, its --state-dir): the
    /// manifest says so; the archive holds what each host knows of the witness.
    CollectLogs {
        /// The archive to write (default: ftvm-logs-HOST-YYYYMMDD-HHMMSS.tar.gz here).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Planned failover: stop the VM here and restart it on the peer from its in-sync copy
    /// (at Level 3: restore it there from its last checkpoint). To move it without a
    /// reboot, use `ftvm migrate`.
    Failover { vm: String },
    /// Move a running protected VM to the peer without a reboot: memory, devices and TCP
    /// sessions go with it (run on its primary).
    ///
    /// The VM is checkpointed to the peer as at Level 3 (raised to it for the move if it
    /// runs at 1 or 2; its RAM is copied once while it runs), then one final checkpoint is
    /// taken with the guest stopped; the peer takes the next generation from the witness
    /// and restores the VM from it. The disks swap roles with nothing to resync. The VM
    /// goes back to its level on the peer. Needs checkpoint_port in the VM's [[vm]]
    /// section. Waits until the VM runs on the peer unless --no-wait. A move called off
    /// (--cancel, the peer lost, --timeout) leaves the VM running here, protected.
    Migrate {
        vm: String,
        /// Call off a move under way (possible until its final checkpoint).
        #[arg(long)]
        cancel: bool,
        /// Return once the move has started; `ftvm status` shows its progress.
        #[arg(long)]
        no_wait: bool,
        /// Call the move off if checkpoints do not commit within this many seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 300)]
        timeout: u64,
    },
    /// Snapshots of a protected VM's disks, taken on both copies at the same point of the
    /// write stream (run on its primary; `list` on either host).
    ///
    /// A snapshot is a reflink of each disk image (and so costs no copy), kept next to it
    /// in IMAGE.snapshots/NAME on both hosts. It needs the images on a file system with
    /// reflinks: XFS (made with reflink=1, the default) or btrfs; on ext4, tmpfs and others
    /// it is refused with the file system's name. By default it is crash-consistent: the
    /// guest's disk as after a power cut at that instant. With --app-consistent the guest
    /// agent (qemu-guest-agent, which must run in the guest) freezes the guest's file
    /// systems first and thaws them afterwards: they are clean in the snapshot and hold
    /// everything written before it. Both copies must be in sync (Protected) and the VM at
    /// Level 1 or 2. The guest's writes wait for a few milliseconds while it is taken.
    Snapshot {
        #[command(subcommand)]
        action: SnapshotAction,
    },
    /// Planned maintenance of this host.
    Host {
        #[command(subcommand)]
        action: HostAction,
    },
    /// Make the pre-shared keys of a host pair and its witness, and say what to copy where.
    ///
    /// Makes DIR/pair.psk (the pair's key: /etc/ftvm/pair.psk on both hosts, `[peer]
    /// psk_file`), DIR/api.psk (the key of the control API over TCP, `[host] api_key_file`
    /// on both hosts and on the web console's host), DIR/witness-keys/HOST.psk for each host (its `[witness] psk_file`,
    /// /etc/ftvm/witness.psk on that host, and /etc/ftvm-witness/keys/HOST.psk on the
    /// witness for `ftvm-witness --psk-dir`) and DIR/ftvm-witness-keys.conf (a drop-in
    /// that hands those keys to ftvm-witness.service as credentials). Keys are 32 random
    /// bytes as hex, mode 0600, in folders of mode 0700. Needs no ftvmd; run it anywhere
    /// and copy the files with their modes.
    Keygen {
        /// Folder to make the keys in (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A host of the pair, as in its `[host] name`; give it twice.
        #[arg(long = "host", value_name = "NAME", required = true)]
        hosts: Vec<String>,
        /// Replace existing keys (both hosts and the witness then need the new ones).
        #[arg(long)]
        force: bool,
    },
    /// Rotate a pre-shared key without a restart and without dropping a session.
    ///
    /// Every ftvm process accepts the key of its key file FILE and, while it exists, of
    /// FILE.previous, dials with the first, and picks up a change of either file within a
    /// second. The pair's key: `ftvm key rotate` on one host, copy its FILE to the other
    /// and `ftvm key rotate --new COPY` there, then `ftvm key retire` on both. The
    /// witness's key: the same with --witness on the host, then the witness restarted with
    /// the new key, then `ftvm key retire --witness`. See docs/OPERATIONS.md.
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Alert agents ([[alert]] in ftvmd's configuration): the programs ftvmd runs on every
    /// warning, error and clearing, with the event in FTVM_ALERT_* variables. See
    /// docs/OPERATIONS.md, "Alerts".
    Alert {
        #[command(subcommand)]
        action: AlertAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum AlertAction {
    /// Send a test alert (FTVM_ALERT_KIND=test, severity info) through every agent and
    /// report each one's result: delivered, or why not (its exit status and last line of
    /// output, or killed at its timeout). Exit status 1 if any agent failed. The test is
    /// not retried; the agents' counts are in `ftvm status --json` and /metrics.
    Test,
}

/// The steps of a key rotation.
#[derive(Debug, Subcommand)]
pub enum KeyAction {
    /// Make a new key this host's preferred one, and keep the current one accepted (moved
    /// to FILE.previous) until `ftvm key retire`. New connections use the new key as soon
    /// as the other end holds it too; running ones keep theirs. Refused while
    /// FILE.previous exists (the last rotation is not finished).
    Rotate {
        /// The new key: a copy of the FILE the other host's rotation made. Without it a new
        /// random key is made (on the first host).
        #[arg(long, value_name = "NEW")]
        new: Option<PathBuf>,
        #[command(flatten)]
        key: KeyChoice,
    },
    /// Stop accepting the previous key (remove FILE.previous). Connections still under it
    /// are replaced by ones under the current key within a second, no session going down;
    /// a host that offers only the old key is refused from then on. Refused until ftvmd sees that the peer (from
    /// its heartbeats) or the witness (its link) holds the current key, unless --force.
    Retire {
        #[command(flatten)]
        key: KeyChoice,
        /// Retire without asking ftvmd (a peer without the new key is then cut off).
        #[arg(long)]
        force: bool,
    },
}

/// Which key file a rotation step works on.
#[derive(Debug, clap::Args)]
pub struct KeyChoice {
    /// The key with the witness (`[witness] psk_file`) instead of the pair's
    /// (`[peer] psk_file`).
    #[arg(long)]
    pub witness: bool,
    /// The key file, instead of the one ftvmd's configuration names (then ftvmd need not
    /// run for `rotate`).
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
}

/// `ftvm snapshot create --app-consistent[=WHEN]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AppConsistent {
    Yes,
    Auto,
    No,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotAction {
    /// Take snapshot NAME of every disk of VM, on both copies (a VM with one disk).
    ///
    /// With --app-consistent, ftvmd asks the guest agent (on the VM's channel
    /// org.qemu.guest_agent.0) to freeze the guest's file systems (guest-fsfreeze-freeze:
    /// the guest writes back everything first), takes the snapshot, and thaws them again,
    /// also when the snapshot fails; the answer says how many file systems were frozen and
    /// thawed. A guest that does not answer within 5 s (no qemu-guest-agent, or a hung
    /// one) is refused with the reason and nothing is frozen; with --app-consistent=auto a
    /// crash-consistent snapshot is taken instead, and the answer says why. A thaw that
    /// fails is an error event, and ftvmd tries it again every 5 s. Without the option, the
    /// VM's snapshot_consistency setting decides (default: crash).
    Create {
        vm: String,
        /// 1 to 64 letters, digits, '-', '_' and '.', not starting with '.'.
        name: String,
        /// Freeze the guest's file systems through its agent for the snapshot: "yes" (the
        /// default when given without a value), "auto" (freeze when the guest runs an
        /// agent, else crash-consistent) or "no" (crash-consistent).
        #[arg(
            long,
            value_name = "WHEN",
            num_args = 0..=1,
            require_equals = true,
            default_missing_value = "yes"
        )]
        app_consistent: Option<AppConsistent>,
    },
    /// This host's snapshots of VM's disks: name, time, consistency ("application": the
    /// guest's file systems were frozen for it; "crash": not), and the space each holds
    /// alone (blocks the image no longer shares with it: about what deleting it frees).
    List {
        vm: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete snapshot NAME from both copies.
    Delete { vm: String, name: String },
    /// Put VM's disks back to snapshot NAME on both copies: the VM is stopped, both copies
    /// reverted (they stay in sync: no resync), and the VM started again (a reboot; what
    /// the guest wrote since the snapshot is gone).
    Revert { vm: String, name: String },
}

#[derive(Debug, Subcommand)]
pub enum HostAction {
    /// Move every primary VM to the peer, then stop this host's VM daemons. The host stays
    /// disabled, also across ftvmd restarts and reboots, until `ftvm host enable`.
    ///
    /// Each VM moves live (as `ftvm migrate`: no reboot); one that cannot (no
    /// checkpoint_port) is stopped and restarted on the peer, and an event says why.
    Disable {
        /// How long to wait for the VMs to move, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Stop the VMs here and restart them on the peer (a reboot) instead of moving
        /// them live.
        #[arg(long)]
        restart: bool,
    },
    /// Rejoin: this host's copies resync and become secondaries again.
    Enable,
}

/// The ftvm host daemon: keeps the protected VMs of this host running through the loss of
/// a disk, a link or the whole peer host.
///
/// It starts each VM's disk daemons (vhost-blk-mirror) and, on the VM's primary host, the
/// VM itself; heartbeats the peer host's ftvmd on every A-link; asks the quorum witness
/// for the next generation when the peer is lost, and then continues alone, promotes this
/// host's copy, or fences it. Operators talk to it with `ftvm`.
///
/// FILE is TOML with [host], [peer], [witness], optional [timing], one [[vm]] per VM and
/// one [[alert]] per alert agent; see coordinator/README.md and docs/OPERATIONS.md. Stop with SIGTERM: the VMs of this host stop with it (the
/// peer then takes them over); use `ftvm host disable` first for planned maintenance.
#[derive(Debug, Parser)]
#[command(name = "ftvmd", version)]
pub struct FtvmdArgs {
    /// The configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Check the configuration file and exit.
    #[arg(long)]
    pub check: bool,
}

/// The ftvm quorum witness: runs on a third host and grants each generation of a protected
/// VM to at most one of its two hosts, so that a partition never gives two primaries.
///
/// Every grant is written to STATE_DIR (one readable JSON file per VM) and synced before
/// the answer leaves. Hosts connect over the replication link, authenticated with a
/// pre-shared key: one for all hosts (--psk-file), or better one per host (--psk-dir), so
/// that no host can connect, and claim, under another host's name.
#[derive(Debug, Parser)]
#[command(name = "ftvm-witness", version)]
pub struct WitnessArgs {
    /// Address to accept hosts on (give twice for two networks).
    #[arg(long, value_name = "ADDR:PORT", required = true)]
    pub listen: Vec<SocketAddr>,
    /// Where grants are kept (created, mode 0700).
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Pre-shared key every host uses to reach this witness (at least 16 bytes).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "psk_dir",
        conflicts_with = "psk_dir"
    )]
    pub psk_file: Option<PathBuf>,
    /// A key per host: DIR/HOST.psk for each host (HOST as in its `[host] name`), the same
    /// file as that host's `[witness] psk_file`. A host connects only under its own name.
    #[arg(long, value_name = "DIR")]
    pub psk_dir: Option<PathBuf>,
    /// This witness's name on the link.
    #[arg(long, value_name = "NAME", default_value = "witness")]
    pub host_id: String,
}
