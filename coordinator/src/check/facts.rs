//! This host's side of `ftvm check`: bridges and uplinks, ports and sockets held by
//! others, disk space, memory, CPUs; with [`super::probe`] for QEMU and KVM.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{probe, HostFacts, NicNeeds, VmFacts, VmNeeds};

/// Most lines read from one `/proc/net` table (a host with more sockets is checked on the
/// first ones only).
const MAX_SOCKET_LINES: usize = 200_000;
/// The wait between the two looks at the listening sockets.
const SECOND_LOOK: std::time::Duration = std::time::Duration::from_millis(200);

/// A NIC's bridge and uplink on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicFacts {
    pub mac: String,
    pub bridge: String,
    pub bridge_state: LinkState,
    pub uplink: Option<String>,
    pub uplink_state: Option<LinkState>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkState {
    Missing,
    /// The device exists but is not a Linux bridge.
    NotABridge,
    /// Present; `master`: the bridge it is a port of.
    Present {
        up: bool,
        master: Option<String>,
    },
}

/// A port or socket a VM needs, held by a process that is not ftvm's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    /// Like "port 7460 (checkpoint_port) on 10.77.1.1" or "/var/lib/ftvm/vm1/disk0.sock
    /// (vhost-user socket of disk 0)".
    pub what: String,
    /// Like "pid 4242 (socat)".
    pub holder: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskFacts {
    pub image: PathBuf,
    /// The image's size and bytes allocated, or why it cannot be read.
    pub size: Result<(u64, u64), String>,
    /// Free bytes on its file system (for a full copy).
    pub free_bytes: Option<u64>,
}

/// What [`gather`] looks at.
pub struct Gather {
    pub host: String,
    pub qemu: PathBuf,
    /// Each VM's needs, and whether this host is its primary.
    pub vms: Vec<(VmNeeds, bool)>,
}

/// This host's facts. Runs QEMU probes: seconds, so not on the deciding thread.
pub fn gather(input: &Gather) -> HostFacts {
    let accels: BTreeSet<String> = input.vms.iter().map(|(vm, _)| vm.accel.clone()).collect();
    let models: BTreeSet<String> = input
        .vms
        .iter()
        .map(|(vm, _)| vm.cpu_model.clone())
        .collect();
    let accels: Vec<String> = accels.into_iter().collect();
    let models: Vec<String> = models.into_iter().collect();
    let qemu = probe::qemu(&input.qemu, &accels, &models);
    // Two looks, a moment apart: a daemon that is starting or exiting shows a socket no
    // process holds yet (or any more); only what both looks show counts.
    let first_look = Listening::read();
    std::thread::sleep(SECOND_LOOK);
    let listening = Listening::read();
    let vms = input
        .vms
        .iter()
        .map(|(needs, primary_here)| VmFacts {
            needs: needs.clone(),
            primary_here: *primary_here,
            ram_allocated_bytes: std::fs::metadata(&needs.ram_file)
                .map_or(0, |metadata| metadata.blocks() * 512),
            nics: needs.nics.iter().map(nic_facts).collect(),
            taken: {
                let earlier = first_look.taken(needs);
                listening
                    .taken(needs)
                    .into_iter()
                    .filter(|taken| earlier.contains(taken))
                    .collect()
            },
            disks: needs.disks.iter().map(|image| disk_facts(image)).collect(),
        })
        .collect();
    HostFacts {
        host: input.host.clone(),
        unix_ms: unix_ms(),
        qemu,
        kvm: probe::kvm(),
        memory_available_mib: memory_available_kib().unwrap_or(0) / 1024,
        cpus: std::thread::available_parallelism().map_or(1, |count| count.get() as u32),
        vms,
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

fn memory_available_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
}

fn link_state(name: &str, bridge: bool) -> LinkState {
    let dir = Path::new("/sys/class/net").join(name);
    if name.is_empty() || name.contains('/') || !dir.exists() {
        return LinkState::Missing;
    }
    if bridge && !dir.join("bridge").is_dir() {
        return LinkState::NotABridge;
    }
    let up = std::fs::read_to_string(dir.join("operstate"))
        .map(|state| state.trim() != "down")
        .unwrap_or(false);
    let master = std::fs::read_link(dir.join("master"))
        .ok()
        .and_then(|target| {
            target
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
        });
    LinkState::Present { up, master }
}

fn nic_facts(nic: &NicNeeds) -> NicFacts {
    NicFacts {
        mac: nic.mac.clone(),
        bridge: nic.bridge.clone(),
        bridge_state: link_state(&nic.bridge, true),
        uplink: nic.uplink.clone(),
        uplink_state: nic
            .uplink
            .as_deref()
            .map(|uplink| link_state(uplink, false)),
    }
}

fn disk_facts(image: &Path) -> DiskFacts {
    let size = std::fs::metadata(image)
        .map(|metadata| (metadata.len(), metadata.blocks() * 512))
        .map_err(|error| error.to_string());
    let dir = image.parent().unwrap_or(Path::new("/"));
    DiskFacts {
        image: image.to_owned(),
        size,
        free_bytes: free_bytes(dir),
    }
}

fn free_bytes(dir: &Path) -> Option<u64> {
    let path = CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string that outlives the call; `stat` is a
    // writable statvfs owned by this frame.
    let result = unsafe { libc::statvfs(path.as_ptr(), &raw mut stat) };
    (result == 0).then(|| stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The listening sockets of this host's network namespace, and who holds them.
struct Listening {
    /// TCP: (address, port) to socket inode.
    tcp: Vec<(IpAddr, u16, u64)>,
    /// Unix: path to inode.
    unix: BTreeMap<PathBuf, u64>,
    /// Socket inode to holding process.
    holders: BTreeMap<u64, u32>,
}

impl Listening {
    fn read() -> Listening {
        let mut tcp = Vec::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            if let Ok(text) = std::fs::read_to_string(table) {
                tcp.extend(
                    text.lines()
                        .skip(1)
                        .take(MAX_SOCKET_LINES)
                        .filter_map(tcp_line),
                );
            }
        }
        let unix = std::fs::read_to_string("/proc/net/unix")
            .map(|text| {
                text.lines()
                    .skip(1)
                    .take(MAX_SOCKET_LINES)
                    .filter_map(unix_line)
                    .collect()
            })
            .unwrap_or_default();
        Listening {
            tcp,
            unix,
            holders: socket_holders(),
        }
    }

    /// The ports and sockets of `needs` held by a process that is not this ftvmd or one
    /// it started.
    fn taken(&self, needs: &VmNeeds) -> Vec<Taken> {
        let mut taken = Vec::new();
        for need in &needs.ports {
            for address in &need.addresses {
                let held = self.tcp.iter().find(|(ip, port, _)| {
                    *port == need.port && (ip.is_unspecified() || *ip == address.ip())
                });
                if let Some((ip, _, inode)) = held {
                    if let Some(holder) = self.foreign(*inode) {
                        taken.push(Taken {
                            what: format!("port {} ({}) on {ip}", need.port, need.what),
                            holder,
                        });
                        break;
                    }
                }
            }
        }
        for need in &needs.sockets {
            if let Some(inode) = self.unix.get(&need.path) {
                if let Some(holder) = self.foreign(*inode) {
                    taken.push(Taken {
                        what: format!("{} ({})", need.path.display(), need.what),
                        holder,
                    });
                }
            }
        }
        taken
    }

    /// Who holds socket `inode`, unless it is this process or a descendant.
    fn foreign(&self, inode: u64) -> Option<String> {
        let Some(&pid) = self.holders.get(&inode) else {
            return Some("a process this host's /proc does not show".into());
        };
        let own = std::process::id();
        // Gone already: it held the socket while exiting.
        parent(pid)?;
        let mut ancestor = pid;
        for _ in 0..64 {
            if ancestor == own {
                return None;
            }
            match parent(ancestor) {
                Some(next) if next > 1 => ancestor = next,
                _ => break,
            }
        }
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|name| name.trim().to_owned())
            .unwrap_or_else(|_| "?".into());
        Some(format!("pid {pid} ({name})"))
    }
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name is in parentheses and may hold spaces: the fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A `/proc/net/tcp{,6}` line in LISTEN state: local address, port, inode.
fn tcp_line(line: &str) -> Option<(IpAddr, u16, u64)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.get(3) != Some(&"0A") {
        return None;
    }
    let (address, port) = fields.get(1)?.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let inode = fields.get(9)?.parse().ok()?;
    let ip = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(address, 16).ok()?.swap_bytes(),
        )),
        32 => {
            // Four 32-bit words, each in the host's (little-endian) byte order.
            let mut bytes = [0u8; 16];
            for (word, chunk) in bytes.chunks_mut(4).enumerate() {
                let text = address.get(word * 8..word * 8 + 8)?;
                let value = u32::from_str_radix(text, 16).ok()?;
                chunk.copy_from_slice(&value.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((ip, port, inode))
}

/// A `/proc/net/unix` line of a listening socket with a path: path, inode.
fn unix_line(line: &str) -> Option<(PathBuf, u64)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let flags = u32::from_str_radix(fields.get(3)?, 16).ok()?;
    // __SO_ACCEPTCON: the socket listens.
    if flags & 0x1_0000 == 0 {
        return None;
    }
    let inode = fields.get(6)?.parse().ok()?;
    let path = fields.get(7)?;
    path.starts_with('/').then(|| (PathBuf::from(path), inode))
}

/// Every socket inode open in a process, with the process.
fn socket_holders() -> BTreeMap<u64, u32> {
    let mut holders = BTreeMap::new();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return holders;
    };
    for process in processes.flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|rest| rest.strip_suffix(']'))
                .and_then(|inode| inode.parse().ok())
            {
                holders.entry(inode).or_insert(pid);
            }
        }
    }
    holders
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_lines_parse() {
        let line = "   3: 0101A8C0:1D24 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            tcp_line(line),
            Some((IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1)), 0x1d24, 123_456))
        );
        let established = line.replace(" 0A ", " 01 ");
        assert_eq!(tcp_line(&established), None);
        let line6 = "   0: 00000000000000000000000001000000:1D24 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1";
        assert_eq!(
            tcp_line(line6),
            Some((IpAddr::V6(Ipv6Addr::LOCALHOST), 0x1d24, 77))
        );
        let unix = "0000000000000000: 00000002 00000000 00010000 0001 01 4242 /run/x/disk0.sock";
        assert_eq!(
            unix_line(unix),
            Some((PathBuf::from("/run/x/disk0.sock"), 4242))
        );
        let connected =
            "0000000000000000: 00000002 00000000 00000000 0001 03 4243 /run/x/disk0.sock";
        assert_eq!(unix_line(connected), None);
        assert_eq!(tcp_line("garbage"), None);
        assert_eq!(unix_line(""), None);
    }
}
