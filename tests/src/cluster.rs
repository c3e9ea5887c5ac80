//! A protected VM on a whole test cluster: `ftvm-witness` in the witness namespace and
//! `ftvmd` in hostA and hostB, with real configuration files, keys and images. The VM is
//! the rig's guest (kernel, initramfs, a `/test.sh`), started by `ftvmd` itself.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::blk::status_json;
use crate::guest::{build_initrd, GuestConfig};
use crate::hosts::Hosts;
use crate::libvirt::Libvirtd;
use crate::process::{signal, Process};
use crate::qmp::Qmp;
use crate::wait::{poll_until, Wait};
use crate::{create_image, paths, scratch_dir};

/// The VM's name in every configuration.
pub const VM: &str = "vm1";
pub const HOSTS: [&str; 2] = ["hostA", "hostB"];
const LAN: [&str; 2] = ["10.77.0.1", "10.77.0.2"];
pub const LINK1: [&str; 2] = ["10.77.1.1", "10.77.1.2"];
const LINK2: [&str; 2] = ["10.77.2.1", "10.77.2.2"];
const WITNESS: &str = "10.77.0.3:7600";
const FTVMD_PORT: u16 = 7500;
const REPLICATION_PORT: u16 = 7400;
/// The NIC's `link_port` when it has a redundant uplink.
const NIC_LINK_PORT: u16 = 7450;
/// Where each host's ftvmd serves `/metrics`, on its LAN address.
pub const METRICS_PORT: u16 = 9464;
/// Where each host's ftvmd serves the control API over TCP (with [`ClusterOptions::api`]),
/// on its LAN address.
pub const API_PORT: u16 = 7700;
/// The VM's `checkpoint_port` (Level 3), set at every level so that a test can raise it.
pub const CHECKPOINT_PORT: u16 = 7460;

/// Settings of a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub disk_bytes: u64,
    pub level: u8,
    pub peer_timeout_ms: u64,
    /// The disks' `resync_rate_limit` (e.g. "4M"), to make a sync last.
    pub resync_rate_limit: Option<String>,
    /// A NIC with this MAC on each host's VM bridge `vmbr0`.
    pub nic_mac: Option<String>,
    /// The NIC (`nic_mac`) has a redundant uplink through the peer: `uplink = "uplink"`
    /// (the port of `vmbr0` to the LAN) and a `link_port`.
    pub nic_redundant_uplink: bool,
    /// Level 3: `checkpoint_interval_ms`.
    pub checkpoint_interval_ms: u64,
    /// More VMs besides `vm1`: `vm2`, `vm3`, … with the same guest, primary on hostA, a
    /// disk each (image `HOST-vmN.img`) and no NIC; their ports follow vm1's.
    pub extra_vms: u16,
    /// `vm1` has a second disk (image `HOST-disk1.img`, `/dev/vdb` in the guest), of
    /// `disk_bytes` too.
    pub second_disk: bool,
    /// Each ftvmd serves the control API on its LAN address at [`API_PORT`], with the key
    /// [`Cluster::api_key`].
    pub api: bool,
    /// Each host runs its own libvirtd (`crate::libvirt`), named in a `[libvirt]` section;
    /// the configuration has no `[[vm]]`: the test protects a domain with `ftvm protect
    /// --domain`. hostB's images live under `DIR/hostB-root` (`image_root`): both hosts
    /// share this file system.
    pub libvirt: bool,
}

impl Default for ClusterOptions {
    fn default() -> ClusterOptions {
        ClusterOptions {
            disk_bytes: 64 << 20,
            level: 2,
            peer_timeout_ms: 1000,
            resync_rate_limit: None,
            nic_mac: None,
            nic_redundant_uplink: false,
            checkpoint_interval_ms: 50,
            extra_vms: 0,
            second_disk: false,
            api: false,
            libvirt: false,
        }
    }
}

/// Fields drop in order: daemons, then hosts, then files.
#[derive(Debug)]
pub struct Cluster {
    ftvmd: [Option<Process>; 2],
    witness: Option<Process>,
    libvirtd: [Option<Libvirtd>; 2],
    libvirt: bool,
    /// The guest's initramfs.
    pub initrd: PathBuf,
    pub hosts: Hosts,
    /// Each host's `ram_dir` (guest RAM, Level 3 replica) in `/dev/shm`: the hosts share
    /// one file system here, and RAM files belong in tmpfs.
    ram_dir: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Hosts, keys, images and configuration files for a VM running `guest`'s script;
    /// starts nothing.
    pub fn new(name: &str, guest: &GuestConfig, options: &ClusterOptions) -> Cluster {
        let hosts = Hosts::up();
        let dir = scratch_dir(name);
        let root = dir.path();
        // The pair's key, and a witness key per host (the witness takes a key directory, so
        // no host can reach it under the other's name).
        std::fs::create_dir_all(root.join("witness-keys")).expect("witness key dir");
        for (file, key) in [
            ("pair.psk", "pair"),
            ("witness-keys/hostA.psk", "hostA's witness"),
            ("witness-keys/hostB.psk", "hostB's witness"),
            ("api.psk", "the API"),
        ] {
            let path = root.join(file);
            std::fs::write(
                &path,
                format!("ftvm {key} key for {name} 0123456789abcdef\n"),
            )
            .expect("write psk");
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("chmod psk");
        }
        let initrd = build_initrd(guest, root);
        let ram_dir = PathBuf::from(format!("/dev/shm/ftvm-test-{}-{name}", std::process::id()));
        let kernel = paths::guest_dir().join("vmlinuz");
        for (index, host) in HOSTS.iter().enumerate() {
            let peer = 1 - index;
            std::fs::create_dir_all(root.join(host)).expect("host dir");
            create_image(&root.join(format!("{host}.img")), options.disk_bytes);
            let second_disk = if options.second_disk {
                let image = root.join(format!("{host}-disk1.img"));
                create_image(&image, options.disk_bytes);
                format!(
                    "[[vm.disk]]\nimage = \"{}\"\nreplication_port = {}",
                    image.display(),
                    REPLICATION_PORT + 1
                )
            } else {
                String::new()
            };
            let mut extra = String::new();
            for number in 2..2 + options.extra_vms {
                let image = root.join(format!("{host}-vm{number}.img"));
                create_image(&image, options.disk_bytes);
                let step = 2 * (number - 1);
                extra.push_str(&format!(
                    r#"
[[vm]]
name = "vm{number}"
level = {level}
primary = "hostA"
memory_mib = {memory}
vcpus = {cpus}
accel = "tcg"
checkpoint_port = {checkpoint}
checkpoint_interval_ms = {interval}
qemu_args = ["-kernel", "{kernel}", "-initrd", "{initrd}", "-append", "console=ttyS0 panic=-1 quiet no_timer_check"]
[[vm.disk]]
image = "{image}"
replication_port = {replication}
"#,
                    level = options.level,
                    memory = guest.memory_mb,
                    cpus = guest.cpus,
                    checkpoint = CHECKPOINT_PORT + step,
                    interval = options.checkpoint_interval_ms,
                    kernel = kernel.display(),
                    initrd = initrd.display(),
                    image = image.display(),
                    replication = REPLICATION_PORT + step,
                ));
            }
            let vm = if options.libvirt {
                libvirt_section(root, host)
            } else {
                format!(
                    r#"
[[vm]]
name = "{VM}"
level = {level}
primary = "hostA"
memory_mib = {memory}
vcpus = {cpus}
accel = "tcg"
checkpoint_port = {CHECKPOINT_PORT}
checkpoint_interval_ms = {interval}
qemu_args = ["-kernel", "{kernel}", "-initrd", "{initrd}", "-append", "console=ttyS0 panic=-1 quiet no_timer_check", "-qmp", "unix:{state}/test-qmp.sock,server=on,wait=off"]
[[vm.disk]]
image = "{root}/{host}.img"
replication_port = {REPLICATION_PORT}
{rate}
{second_disk}
{nic}
"#,
                    state = root.join(host).display(),
                    root = root.display(),
                    interval = options.checkpoint_interval_ms,
                    level = options.level,
                    memory = guest.memory_mb,
                    cpus = guest.cpus,
                    kernel = kernel.display(),
                    initrd = initrd.display(),
                    nic = options.nic_mac.as_ref().map_or(String::new(), |mac| {
                        let redundancy = if options.nic_redundant_uplink {
                            format!("\nuplink = \"uplink\"\nlink_port = {NIC_LINK_PORT}")
                        } else {
                            String::new()
                        };
                        format!("[[vm.nic]]\nmac = \"{mac}\"\nbridge = \"vmbr0\"{redundancy}")
                    }),
                    rate = options
                        .resync_rate_limit
                        .as_ref()
                        .map_or(String::new(), |rate| format!(
                            "resync_rate_limit = \"{rate}\""
                        )),
                )
            };
            let config = format!(
                r#"[host]
name = "{host}"
state_dir = "{state}"
control_socket = "{state}/ftvmd.sock"
bin_dir = "{bin}"
ram_dir = "{ram_dir}/{host}"
metrics_listen = "{lan}:{METRICS_PORT}"
{api}

[peer]
name = "{peer_name}"
addresses = ["{peer1}:{FTVMD_PORT}", "{peer2}:{FTVMD_PORT}"]
listen = ["{own1}:{FTVMD_PORT}", "{own2}:{FTVMD_PORT}"]
psk_file = "{root}/pair.psk"

[witness]
addresses = ["{WITNESS}"]
psk_file = "{root}/witness-keys/{host}.psk"

[timing]
peer_timeout_ms = {timeout}
{vm}
{extra}
"#,
                state = root.join(host).display(),
                bin = paths::binary("vhost-blk-mirror")
                    .parent()
                    .expect("bin dir")
                    .display(),
                peer_name = HOSTS[peer],
                lan = LAN[index],
                peer1 = LINK1[peer],
                peer2 = LINK2[peer],
                own1 = LINK1[index],
                own2 = LINK2[index],
                root = root.display(),
                api = if options.api {
                    format!(
                        "api_listen = [\"{}:{API_PORT}\"]\napi_key_file = \"{}\"",
                        LAN[index],
                        root.join("api.psk").display()
                    )
                } else {
                    String::new()
                },
                timeout = options.peer_timeout_ms,
                ram_dir = ram_dir.display(),
            );
            std::fs::write(root.join(format!("{host}.toml")), config).expect("write config");
        }
        Cluster {
            ftvmd: [None, None],
            witness: None,
            libvirtd: [None, None],
            libvirt: options.libvirt,
            initrd,
            hosts,
            ram_dir,
            dir,
        }
    }

    /// A host's `/metrics`, fetched from the client namespace (a monitoring host on the
    /// LAN) and parsed with a Prometheus text-format parser.
    pub fn scrape_metrics(&self, host: usize) -> prometheus_parse::Scrape {
        use std::io::{Read, Write};
        let client = self.hosts.namespace("client");
        let mut stream = crate::net::connect_in(&client, &format!("{}:{METRICS_PORT}", LAN[host]));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: ftvmd\r\n\r\n")
            .expect("send the request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("read the response");
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP head in {response:?}"));
        assert!(head.starts_with("HTTP/1.0 200"), "{head}");
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        prometheus_parse::Scrape::parse(body.lines().map(|line| Ok(line.to_owned())))
            .unwrap_or_else(|error| {
                panic!(
                    "{}'s /metrics does not parse ({error}): {body}",
                    HOSTS[host]
                )
            })
    }

    /// A host's RAM file of the VM: QEMU's, or the Level 3 replica's on the secondary.
    pub fn ram_file(&self, host: usize) -> PathBuf {
        self.ram_dir.join(HOSTS[host]).join(format!("{VM}.ram"))
    }

    /// A host's libvirtd (with `libvirt`, once started).
    pub fn libvirtd(&self, host: usize) -> &Libvirtd {
        self.libvirtd[host]
            .as_ref()
            .expect("this cluster runs libvirtd")
    }

    pub fn config_path(&self, host: usize) -> PathBuf {
        self.dir.path().join(format!("{}.toml", HOSTS[host]))
    }

    pub fn image(&self, host: usize) -> PathBuf {
        self.dir.path().join(format!("{}.img", HOSTS[host]))
    }

    /// A host's image of vm1's second disk ([`ClusterOptions::second_disk`]).
    pub fn second_image(&self, host: usize) -> PathBuf {
        self.dir.path().join(format!("{}-disk1.img", HOSTS[host]))
    }

    /// Moves a host's image onto the fault-injecting file system (as `HOST.img` there; the
    /// image's path becomes a link to it, its metadata stays beside the link). Before
    /// [`Cluster::start_all`].
    pub fn put_image_on(&self, host: usize, fault_fs: &crate::fault_fs::FaultFs) {
        let image = self.image(host);
        let size = std::fs::metadata(&image).expect("the host's image").len();
        let target = fault_fs.path(&format!("{}.img", HOSTS[host]));
        crate::create_image(&target, size);
        std::fs::remove_file(&image).expect("remove the host's image");
        std::os::unix::fs::symlink(&target, &image).expect("symlink");
    }

    /// The key of the control API over TCP ([`ClusterOptions::api`]).
    pub fn api_key(&self) -> PathBuf {
        self.dir.path().join("api.psk")
    }

    /// A host's control API address ([`ClusterOptions::api`]).
    pub fn api_address(&self, host: usize) -> String {
        format!("{}:{API_PORT}", LAN[host])
    }

    pub fn socket(&self, host: usize) -> PathBuf {
        self.dir.path().join(HOSTS[host]).join("ftvmd.sock")
    }

    pub fn start_witness(&mut self) {
        let mut command = self.hosts.command("witness", paths::binary("ftvm-witness"));
        command
            .args(["--listen", WITNESS, "--state-dir"])
            .arg(self.dir.path().join("witness"))
            .arg("--psk-dir")
            .arg(self.dir.path().join("witness-keys"));
        let log = self.dir.path().join("witness.log");
        self.witness = Some(Process::spawn("ftvm-witness", command, &log));
    }

    /// Starts the witness and both hosts' ftvmd (and libvirtd first, with `libvirt`).
    pub fn start_all(&mut self) {
        if self.libvirt {
            for (host, name) in HOSTS.iter().enumerate() {
                let dir = self.dir.path().join(format!("{name}-libvirt"));
                self.libvirtd[host] = Some(Libvirtd::start(&self.hosts, name, &dir));
            }
        }
        self.start_witness();
        self.start_ftvmd(0);
        self.start_ftvmd(1);
    }

    pub fn stop_witness(&mut self) {
        if let Some(mut witness) = self.witness.take() {
            witness.kill();
        }
    }

    pub fn start_ftvmd(&mut self, host: usize) {
        self.start_ftvmd_with_env(host, &[]);
    }

    /// [`Cluster::start_ftvmd`] with more environment variables (as systemd sets them).
    pub fn start_ftvmd_with_env(&mut self, host: usize, environment: &[(&str, &str)]) {
        let mut command = self.hosts.command(HOSTS[host], paths::binary("ftvmd"));
        command.arg("--config").arg(self.config_path(host));
        command.env("RUST_LOG", "info");
        command.envs(environment.iter().copied());
        let log = self.log_path(host);
        self.ftvmd[host] = Some(Process::spawn(HOSTS[host], command, &log));
        let socket = self.socket(host);
        poll_until(Duration::from_secs(20), "ftvmd's control socket", || {
            socket.exists()
        });
    }

    /// The pid of a host's ftvmd, while this rig runs it.
    pub fn ftvmd_pid(&self, host: usize) -> Option<u32> {
        self.ftvmd[host].as_ref().map(Process::pid)
    }

    pub fn log_path(&self, host: usize) -> PathBuf {
        self.dir.path().join(format!("{}-ftvmd.log", HOSTS[host]))
    }

    pub fn log(&self, host: usize) -> String {
        std::fs::read_to_string(self.log_path(host)).unwrap_or_default()
    }

    /// A host is lost: its A-links and LAN port go down, then every process in its
    /// namespace (ftvmd, disk daemons, QEMU: all started by this test) is killed.
    pub fn kill_host(&mut self, host: usize) -> Instant {
        self.set_links(host, &["alink1", "alink2", "lan0"], false);
        let killed_at = Instant::now();
        for pid in self.hosts.pids(HOSTS[host]) {
            signal(pid, libc::SIGKILL);
        }
        if let Some(mut ftvmd) = self.ftvmd[host].take() {
            ftvmd.kill();
        }
        let what = format!("{}'s processes to die", HOSTS[host]);
        poll_until(Duration::from_secs(10), &what, || {
            self.hosts.pids(HOSTS[host]).is_empty()
        });
        killed_at
    }

    /// Stops a host's ftvmd cleanly (it stops its VM and disk daemons).
    pub fn stop_ftvmd(&mut self, host: usize) {
        if let Some(mut ftvmd) = self.ftvmd[host].take() {
            ftvmd.terminate();
        }
    }

    /// Sets network devices of a host up or down.
    pub fn set_links(&self, host: usize, devices: &[&str], up: bool) {
        let namespace = self.hosts.namespace(HOSTS[host]);
        for device in devices {
            let status = Command::new("ip")
                .args(["-n", &namespace, "link", "set", device])
                .arg(if up { "up" } else { "down" })
                .status()
                .expect("run ip");
            assert!(
                status.success(),
                "ip link set {device} failed in {namespace}"
            );
        }
    }

    /// Runs `ftvm ARGS` against a host's ftvmd; returns (success, stdout + stderr).
    pub fn ftvm(&self, host: usize, args: &[&str]) -> (bool, String) {
        let output = Command::new(paths::binary("ftvm"))
            .arg("--socket")
            .arg(self.socket(host))
            .args(args)
            .output()
            .expect("run ftvm");
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        (output.status.success(), text)
    }

    /// `ftvm status --json` of a host, or `None` if its ftvmd does not answer.
    pub fn status(&self, host: usize) -> Option<serde_json::Value> {
        let (ok, text) = self.ftvm(host, &["status", "--json"]);
        if !ok {
            return None;
        }
        serde_json::from_str(&text).ok()
    }

    /// The VM's line of a host's status.
    pub fn vm_status(&self, host: usize) -> Option<serde_json::Value> {
        self.status(host).map(|status| status["vms"][0].clone())
    }

    /// The line of VM `name` (`vm1`, or `vm2`… with `extra_vms`) in a host's status.
    pub fn named_vm_status(&self, host: usize, name: &str) -> Option<serde_json::Value> {
        self.status(host).and_then(|status| {
            status["vms"]
                .as_array()?
                .iter()
                .find(|vm| vm["name"] == name)
                .cloned()
        })
    }

    /// The guest console of VM `name` as written by a host's QEMU.
    pub fn named_console(&self, host: usize, name: &str) -> Vec<String> {
        let path = self
            .dir
            .path()
            .join(HOSTS[host])
            .join(name)
            .join("console.log");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|line| line.trim_end_matches('\r').to_owned())
            .collect()
    }

    /// Waits until `check` holds for a host's VM status; returns that status.
    pub fn wait_vm(
        &self,
        host: usize,
        timeout: Duration,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        // Each look runs `ftvm status`: every 50 ms is enough.
        Wait::up_to(timeout)
            .every(Duration::from_millis(50))
            .for_value(
                &format!("{} to reach \"{what}\"", HOSTS[host]),
                || self.vm_status(host),
                check,
            )
    }

    /// A host's checkpoint engine log (Level 3).
    pub fn checkpoint_log(&self, host: usize) -> String {
        let path = self
            .dir
            .path()
            .join(HOSTS[host])
            .join(VM)
            .join("checkpoint.log");
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// The control socket of the VM's first NIC daemon on a host.
    /// vm1's guest agent channel on `host` (QEMU listens there while the VM runs there).
    pub fn guest_agent_socket(&self, host: usize) -> PathBuf {
        self.dir.path().join(HOSTS[host]).join(VM).join("qga.sock")
    }

    pub fn nic_control(&self, host: usize) -> PathBuf {
        self.dir.path().join(HOSTS[host]).join(VM).join("nic0.ctl")
    }

    /// The log of the VM's first NIC daemon on a host.
    pub fn nic_log(&self, host: usize) -> String {
        let path = self.dir.path().join(HOSTS[host]).join(VM).join("nic0.log");
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// The `status` JSON of the VM's first NIC daemon on a host, asked on its control
    /// socket (fresh, unlike `ftvm status`, which ftvmd refreshes every 0.5 s); `None` if
    /// the daemon does not run or answer.
    pub fn nic_status(&self, host: usize) -> Option<serde_json::Value> {
        status_json(&self.nic_control(host))
    }

    /// The first NIC's entry in a host's `ftvm status --json` (what ftvmd reports of it).
    pub fn nic_summary(&self, host: usize) -> Option<serde_json::Value> {
        self.vm_status(host)
            .map(|vm| vm["nics"][0].clone())
            .filter(|nic| nic.is_object())
    }

    /// The guest console as written by a host's QEMU (appended across restarts).
    pub fn console(&self, host: usize) -> Vec<String> {
        self.named_console(host, VM)
    }

    /// Asserts that both hosts' images of vm1 are equal byte for byte (the caller made the
    /// mirror idle); returns hostA's.
    pub fn assert_images_equal(&self) -> Vec<u8> {
        let (image_a, image_b) = (
            std::fs::read(self.image(0)).expect("hostA's image"),
            std::fs::read(self.image(1)).expect("hostB's image"),
        );
        let first_difference = image_a.iter().zip(&image_b).position(|(a, b)| a != b);
        assert_eq!(
            first_difference, None,
            "the two copies differ (first at byte {first_difference:?}) though both say Protected"
        );
        image_a
    }

    /// Waits up to 120 s for a line containing `needle` on a host's guest console.
    pub fn wait_console(&self, host: usize, needle: &str) {
        let what = format!("{needle:?} on {}'s console", HOSTS[host]);
        Wait::up_to(Duration::from_secs(120))
            .every(Duration::from_millis(100))
            .until(&what, || {
                self.console(host).iter().any(|line| line.contains(needle))
            });
    }

    /// The QMP socket the rig gives each host's QEMU (besides ftvmd's own), for tests.
    pub fn test_qmp(&self, host: usize) -> PathBuf {
        self.dir.path().join(HOSTS[host]).join("test-qmp.sock")
    }

    /// The run state of a host's guest (`running`, `paused`, …) by QMP `query-status`;
    /// `None` if no QEMU answers there.
    pub fn guest_run_state(&self, host: usize) -> Option<String> {
        let mut qmp = Qmp::connect(&self.test_qmp(host), Duration::ZERO).ok()?;
        qmp.status().ok()
    }

    /// The witness's record of the VM (its JSON file).
    pub fn witness_record(&self) -> serde_json::Value {
        let path = self
            .dir
            .path()
            .join("witness")
            .join("hostA+hostB")
            .join(format!("{VM}.grant.json"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
        serde_json::from_str(&text).expect("witness record is JSON")
    }

    /// Hosts whose status says they are the VM's primary and acknowledge writes (not
    /// fenced, not waiting).
    pub fn acting_primaries(&self) -> Vec<&'static str> {
        (0..2)
            .filter(|&host| {
                self.vm_status(host).is_some_and(|vm| {
                    vm["role"] == "Primary"
                        && !matches!(vm["state"].as_str(), Some("Fenced" | "Waiting" | "Holding"))
                })
            })
            .map(|host| HOSTS[host])
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (host, name) in HOSTS.iter().enumerate() {
            self.stop_ftvmd(host);
            // Whatever a killed ftvmd left (its children die with it, but be sure).
            for pid in self.hosts.pids(name) {
                signal(pid, libc::SIGKILL);
            }
        }
        self.stop_witness();
        let _ = std::fs::remove_dir_all(&self.ram_dir);
        if std::thread::panicking() {
            for (host, name) in HOSTS.iter().enumerate() {
                eprintln!("---- ftvmd log of {name} ----\n{}", self.log(host));
                let nic = self.nic_log(host);
                if !nic.is_empty() {
                    eprintln!("---- NIC daemon log of {name} ----\n{nic}");
                }
                let checkpoint = self.checkpoint_log(host);
                if !checkpoint.is_empty() {
                    let lines: Vec<&str> = checkpoint.lines().collect();
                    eprintln!(
                        "---- checkpoint engine log of {name} (last lines) ----\n{}",
                        lines[lines.len().saturating_sub(60)..].join("\n")
                    );
                }
                if let Some(libvirtd) = &self.libvirtd[host] {
                    eprintln!("---- libvirt of {name} ----\n{}", libvirtd.logs());
                }
                let console = self.console(host);
                if !console.is_empty() {
                    let tail = &console[console.len().saturating_sub(50)..];
                    eprintln!(
                        "---- guest console on {name} (last lines) ----\n{}",
                        tail.join("\n")
                    );
                }
            }
        }
    }
}

/// The value of the sample `name` of a scrape whose labels include `labels`.
pub fn metric_value(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|sample| {
            sample.metric == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
        .and_then(|sample| match sample.value {
            prometheus_parse::Value::Gauge(value)
            | prometheus_parse::Value::Counter(value)
            | prometheus_parse::Value::Untyped(value) => Some(value),
            _ => None,
        })
}

/// A host's `[libvirt]` section: its libvirtd's socket, and hostB's images under
/// `DIR/hostB-root` (the hosts share this file system).
fn libvirt_section(root: &std::path::Path, host: &str) -> String {
    let image_root = if host == HOSTS[0] {
        PathBuf::from("/")
    } else {
        root.join(format!("{host}-root"))
    };
    format!(
        "\n[libvirt]\nuri = \"qemu:///system?socket={}\"\nimage_root = \"{}\"\n",
        root.join(format!("{host}-libvirt/run/libvirt-sock"))
            .display(),
        image_root.display()
    )
}
