//! libvirt domains as protected VMs: what `ftvm protect --domain` reads from an operator's
//! domain XML, the protected XML ftvmd defines in its place, and `virsh`.
//!
//! A protected domain's XML is the operator's with three changes: each raw file disk
//! becomes a `<disk type='vhostuser'>` served by the disk's `vhost-blk-mirror`, each
//! bridge NIC an `<interface type='vhostuser'>` served by its `vhost-net-ft` (same MAC),
//! and the memory is shared memfd (vhost-user needs it). It also carries ftvm's
//! `<metadata>` (the VM and ftvmd's control socket, for the hook) and, through
//! `<qemu:commandline>`, two QMP monitors of ftvmd's own (see `docs/OPERATIONS.md`,
//! "libvirt"). Everything else (kernel, serial, CPU, …) stays as the operator wrote it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The XML namespace of ftvm's `<metadata>` element in a protected domain.
pub const METADATA_NAMESPACE: &str = "https://ftvm.dev/xmlns/libvirt/1";
const QEMU_NAMESPACE: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// Longest domain XML read (from virsh or a hook's stdin).
pub const MAX_XML_BYTES: u64 = 4 << 20;
/// Longest a `virsh` call may take before it is killed.
const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);

/// A raw disk image of a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileDisk {
    pub image: PathBuf,
    /// The guest's name for it (`vda`).
    pub target: String,
}

/// A NIC of a domain on a Linux bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeNic {
    pub mac: String,
    pub bridge: String,
}

/// What protection needs to know of an operator's domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainFacts {
    pub name: String,
    pub memory_mib: u32,
    pub vcpus: u32,
    /// `qemu` (TCG) or `kvm`.
    pub kind: String,
    pub disks: Vec<FileDisk>,
    pub nics: Vec<BridgeNic>,
}

/// Reads an operator's domain XML; refuses what protection cannot convert, saying why.
pub fn read_domain(xml: &str) -> Result<DomainFacts, String> {
    let document = roxmltree::Document::parse(xml)
        .map_err(|error| format!("the domain XML does not parse: {error}"))?;
    let domain = document.root_element();
    if domain.tag_name().name() != "domain" {
        return Err("the XML is not a libvirt <domain>".into());
    }
    if protection_of(xml).is_some() {
        return Err("the domain is already protected by ftvm".into());
    }
    let child = |name: &str| domain.children().find(|node| node.has_tag_name(name));
    let text = |name: &str| child(name).and_then(|node| node.text()).map(str::trim);
    let name = text("name").ok_or("the domain has no <name>")?.to_owned();
    let memory = child("memory").ok_or("the domain has no <memory>")?;
    let amount: u64 = memory
        .text()
        .and_then(|value| value.trim().parse().ok())
        .ok_or("the domain's <memory> is not a number")?;
    let kib = match memory.attribute("unit").unwrap_or("KiB") {
        "KiB" | "k" | "K" => amount,
        "MiB" | "M" => amount.saturating_mul(1024),
        "GiB" | "G" => amount.saturating_mul(1 << 20),
        "b" | "bytes" => amount / 1024,
        unit => {
            return Err(format!(
                "the domain's <memory> has unit {unit:?}, not KiB, MiB or GiB"
            ))
        }
    };
    let memory_mib = u32::try_from(kib / 1024).map_err(|_| "the domain's memory is too large")?;
    let vcpus = match text("vcpu") {
        Some(value) => value
            .parse()
            .map_err(|_| format!("the domain's <vcpu> {value:?} is not a number"))?,
        None => 1,
    };
    let kind = domain.attribute("type").unwrap_or("kvm").to_owned();
    let devices = child("devices").ok_or("the domain has no <devices>")?;
    let mut disks = Vec::new();
    let mut nics = Vec::new();
    for device in devices.children().filter(roxmltree::Node::is_element) {
        match device.tag_name().name() {
            "disk" => disks.push(read_disk(device)?),
            "interface" => nics.push(read_nic(device)?),
            _ => {}
        }
    }
    if disks.is_empty() {
        return Err("the domain has no disk to protect".into());
    }
    Ok(DomainFacts {
        name,
        memory_mib,
        vcpus,
        kind,
        disks,
        nics,
    })
}

fn read_disk(disk: roxmltree::Node<'_, '_>) -> Result<FileDisk, String> {
    let child = |name: &str| disk.children().find(|node| node.has_tag_name(name));
    let target = child("target")
        .and_then(|target| target.attribute("dev"))
        .unwrap_or("?")
        .to_owned();
    let kind = disk.attribute("type").unwrap_or("?");
    let device = disk.attribute("device").unwrap_or("disk");
    if kind != "file" || device != "disk" {
        return Err(format!(
            "disk {target} is a {kind} {device}: only raw file disks can be protected (detach \
             CD-ROMs and other disks first)"
        ));
    }
    let format = child("driver")
        .and_then(|driver| driver.attribute("type"))
        .unwrap_or("raw");
    if format != "raw" {
        return Err(format!(
            "disk {target} is {format}: only raw images can be mirrored (convert it with \
             `qemu-img convert -O raw`)"
        ));
    }
    let image = child("source")
        .and_then(|source| source.attribute("file"))
        .ok_or_else(|| format!("disk {target} has no source file"))?;
    Ok(FileDisk {
        image: PathBuf::from(image),
        target,
    })
}

fn read_nic(interface: roxmltree::Node<'_, '_>) -> Result<BridgeNic, String> {
    let child = |name: &str| interface.children().find(|node| node.has_tag_name(name));
    let mac = child("mac").and_then(|mac| mac.attribute("address"));
    let kind = interface.attribute("type").unwrap_or("?");
    let Some(mac) = mac else {
        return Err(format!(
            "a {kind} interface has no <mac address>: give it one (the VM keeps its MAC on \
             both hosts)"
        ));
    };
    if kind != "bridge" {
        return Err(format!(
            "interface {mac} is of type {kind}: only bridge interfaces can be protected"
        ));
    }
    let bridge = child("source")
        .and_then(|source| source.attribute("bridge"))
        .ok_or_else(|| format!("interface {mac} has no source bridge"))?;
    Ok(BridgeNic {
        mac: mac.to_ascii_lowercase(),
        bridge: bridge.to_owned(),
    })
}

/// What ftvmd puts in place of the domain's devices.
#[derive(Clone, Debug)]
pub struct Protection<'a> {
    pub vm: &'a str,
    /// ftvmd's control socket, for the hook.
    pub control_socket: &'a Path,
    /// The vhost-user-blk socket of each disk, in the domain's order.
    pub disks: &'a [PathBuf],
    /// The vhost-user-net socket of each NIC, in the domain's order.
    pub nics: &'a [PathBuf],
    /// ftvmd's QMP monitor and the checkpoint engine's.
    pub qmp: &'a Path,
    pub engine_qmp: &'a Path,
}

/// The protected XML of an operator's domain (see the module's documentation).
pub fn protected_xml(original: &str, protection: &Protection<'_>) -> Result<String, String> {
    let facts = read_domain(original)?;
    if facts.disks.len() != protection.disks.len() || facts.nics.len() != protection.nics.len() {
        return Err(format!(
            "the domain has {} disk(s) and {} NIC(s), ftvm serves {} and {}",
            facts.disks.len(),
            facts.nics.len(),
            protection.disks.len(),
            protection.nics.len()
        ));
    }
    let document = roxmltree::Document::parse(original)
        .map_err(|error| format!("the domain XML does not parse: {error}"))?;
    let domain = document.root_element();
    let tcg = facts.kind == "qemu";
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    let devices = domain
        .children()
        .find(|node| node.has_tag_name("devices"))
        .ok_or("the domain has no <devices>")?;
    let (mut disk_index, mut nic_index) = (0, 0);
    for device in devices.children().filter(roxmltree::Node::is_element) {
        match device.tag_name().name() {
            "disk" => {
                let (disk, socket) = (&facts.disks[disk_index], &protection.disks[disk_index]);
                edits.push((device.range(), vhostuser_disk(socket, &disk.target)));
                disk_index += 1;
            }
            "interface" => {
                let (nic, socket) = (&facts.nics[nic_index], &protection.nics[nic_index]);
                edits.push((device.range(), vhostuser_nic(socket, &nic.mac, nic_index)));
                nic_index += 1;
            }
            _ => {}
        }
    }
    let metadata = format!(
        "<ftvm:vm xmlns:ftvm='{METADATA_NAMESPACE}' name='{}' control-socket='{}'/>",
        escape(protection.vm),
        escape(&protection.control_socket.to_string_lossy())
    );
    let mut appended = String::new();
    for node in domain.children().filter(roxmltree::Node::is_element) {
        match node.tag_name().name() {
            "memoryBacking" => edits.push((node.range(), String::new())),
            "metadata" => {
                let text = &original[node.range()];
                let inner = match (text.find('>'), text.rfind("</")) {
                    (Some(open), Some(close)) if !text.ends_with("/>") && open < close => {
                        &text[open + 1..close]
                    }
                    _ => "",
                };
                edits.push((
                    node.range(),
                    format!("<metadata>{inner}{metadata}</metadata>"),
                ));
                appended.push(' '); // marks that the metadata is placed
            }
            _ => {}
        }
    }
    let placed = !appended.is_empty();
    appended.clear();
    if !placed {
        appended.push_str(&format!("<metadata>{metadata}</metadata>\n"));
    }
    appended
        .push_str("<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\n");
    appended.push_str(&qemu_commandline(protection, facts.nics.len(), tcg));
    let end = domain.range().end;
    let close = original[..end]
        .rfind("</domain>")
        .or_else(|| original[..end].rfind("</"))
        .ok_or("the domain element is not closed")?;
    edits.push((close..close, appended));
    let start = domain.range().start;
    let declared = domain
        .namespaces()
        .any(|namespace| namespace.name() == Some("qemu") && namespace.uri() == QEMU_NAMESPACE);
    if !declared {
        let at = start + "<domain".len();
        edits.push((at..at, format!(" xmlns:qemu='{QEMU_NAMESPACE}'")));
    }
    edits.sort_by_key(|(range, _)| std::cmp::Reverse(range.start));
    let mut xml = original.to_owned();
    for (range, text) in edits {
        xml.replace_range(range, &text);
    }
    Ok(xml)
}

fn vhostuser_disk(socket: &Path, target: &str) -> String {
    format!(
        "<disk type='vhostuser' device='disk'><driver name='qemu' type='raw'/>\
         <source type='unix' path='{}'><reconnect enabled='yes' timeout='10'/></source>\
         <target dev='{}' bus='virtio'/></disk>",
        escape(&socket.to_string_lossy()),
        escape(target)
    )
}

fn vhostuser_nic(socket: &Path, mac: &str, index: usize) -> String {
    format!(
        "<interface type='vhostuser'><mac address='{}'/>\
         <source type='unix' path='{}' mode='client'><reconnect enabled='yes' timeout='10'/>\
         </source><model type='virtio'/><alias name='ua-ftvm-net{index}'/></interface>",
        escape(mac),
        escape(&socket.to_string_lossy())
    )
}

/// ftvmd's QMP monitors, and under TCG the NICs' `vectors=0` (QEMU 7.2 crashes without).
fn qemu_commandline(protection: &Protection<'_>, nics: usize, tcg: bool) -> String {
    let mut text = String::from("<qemu:commandline>");
    for (id, path) in [
        ("ftvm-qmp", protection.qmp),
        ("ftvm-engine-qmp", protection.engine_qmp),
    ] {
        for value in [
            "-chardev".to_owned(),
            format!("socket,id={id},path={},server=on,wait=off", path.display()),
            "-mon".to_owned(),
            format!("chardev={id},mode=control"),
        ] {
            text.push_str(&format!("<qemu:arg value='{}'/>", escape(&value)));
        }
    }
    text.push_str("</qemu:commandline>\n");
    if tcg && nics > 0 {
        text.push_str("<qemu:override>");
        for index in 0..nics {
            text.push_str(&format!(
                "<qemu:device alias='ua-ftvm-net{index}'><qemu:frontend>\
                 <qemu:property name='vectors' type='unsigned' value='0'/>\
                 </qemu:frontend></qemu:device>"
            ));
        }
        text.push_str("</qemu:override>\n");
    }
    text
}

/// The VM and ftvmd control socket named in a protected domain's ftvm `<metadata>`, or
/// `None` for a domain ftvm does not protect.
pub fn protection_of(xml: &str) -> Option<(String, PathBuf)> {
    let document = roxmltree::Document::parse(xml).ok()?;
    let metadata = document
        .root_element()
        .children()
        .find(|node| node.has_tag_name("metadata"))?;
    let vm = metadata
        .children()
        .find(|node| node.has_tag_name((METADATA_NAMESPACE, "vm")))?;
    Some((
        vm.attribute("name")?.to_owned(),
        PathBuf::from(vm.attribute("control-socket")?),
    ))
}

/// The operator's view of what protection changes, one line each.
pub fn describe_changes(facts: &DomainFacts, peer: &str, image_on_peer: &[PathBuf]) -> Vec<String> {
    let mut lines = Vec::new();
    for (disk, replica) in facts.disks.iter().zip(image_on_peer) {
        lines.push(format!(
            "disk {}: {} becomes a mirrored disk (vhost-blk-mirror): this image is the \
             primary copy, {peer} gets a full copy at {}",
            disk.target,
            disk.image.display(),
            replica.display()
        ));
    }
    for nic in &facts.nics {
        lines.push(format!(
            "NIC {}: bridge {} is served by vhost-net-ft, same MAC and bridge on both hosts",
            nic.mac, nic.bridge
        ));
    }
    lines.push(format!(
        "memory: {} MiB becomes shared memfd memory (vhost-user needs it)",
        facts.memory_mib
    ));
    lines.push(format!(
        "the domain is defined on both hosts; ftvmd starts it on its primary, and on {peer} \
         after a failover; the original XML is kept on both hosts for `ftvm unprotect`"
    ));
    lines
}

/// Escapes text for an XML attribute in single quotes.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// `virsh` against one libvirt connection (`-c URI`).
#[derive(Clone, Debug)]
pub struct Virsh {
    pub uri: String,
}

impl Virsh {
    pub fn new(uri: &str) -> Virsh {
        Virsh {
            uri: uri.to_owned(),
        }
    }

    /// Runs `virsh -c URI ARGS`; its stdout, or its error message.
    pub fn run(&self, args: &[&str]) -> Result<String, String> {
        let mut child = Command::new("virsh")
            .arg("-q")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| {
                format!("cannot run virsh (is libvirt-clients installed?): {error}")
            })?;
        let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
        let out = std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(pipe) = stdout.as_mut() {
                let _ = pipe.take(MAX_XML_BYTES).read_to_string(&mut text);
            }
            text
        });
        let mut error_text = String::new();
        if let Some(pipe) = stderr.as_mut() {
            let _ = pipe.take(64 * 1024).read_to_string(&mut error_text);
        }
        let deadline = Instant::now() + VIRSH_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("virsh {} did not finish in time", args.join(" ")));
                }
            }
        };
        let output = out.join().unwrap_or_default();
        if status.success() {
            Ok(output)
        } else {
            Err(format!(
                "virsh -c {} {}: {}",
                self.uri,
                args.first().copied().unwrap_or(""),
                error_text.trim()
            ))
        }
    }

    /// The domain's persistent XML.
    pub fn dumpxml(&self, domain: &str) -> Result<String, String> {
        self.run(&["dumpxml", "--inactive", domain])
    }

    /// Defines (or redefines) a domain from `xml`, through the file `path`.
    pub fn define(&self, xml: &str, path: &Path) -> Result<(), String> {
        std::fs::write(path, xml)
            .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
        self.run(&["define", &path.to_string_lossy()]).map(drop)
    }

    /// `running`, `shut off`, … with libvirt's reason: `shut off (destroyed)`.
    pub fn state(&self, domain: &str) -> Result<String, String> {
        self.run(&["domstate", "--reason", domain])
            .map(|text| text.trim().to_owned())
    }

    /// Whether the domain runs (or is paused) now.
    pub fn active(&self, domain: &str) -> Result<bool, String> {
        let state = self.state(domain)?;
        Ok(!state.starts_with("shut off") && !state.starts_with("crashed"))
    }

    /// Whether libvirt knows the domain.
    pub fn defined(&self, domain: &str) -> bool {
        self.run(&["domuuid", domain]).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOMAIN: &str = "<domain type='qemu'>
  <name>web</name>
  <memory unit='KiB'>262144</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64'>hvm</type><kernel>/k</kernel></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/images/web.img'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:AA:BB:01'/>
      <source bridge='vmbr0'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'><source path='/tmp/console'/></serial>
  </devices>
</domain>";

    #[test]
    fn reads_raw_disks_bridge_nics_and_sizes() {
        let facts = read_domain(DOMAIN).expect("reads");
        assert_eq!(facts.name, "web");
        assert_eq!(facts.memory_mib, 256);
        assert_eq!(facts.vcpus, 2);
        assert_eq!(facts.kind, "qemu");
        assert_eq!(
            facts.disks[0].image,
            PathBuf::from("/var/lib/images/web.img")
        );
        assert_eq!(facts.nics[0].mac, "52:54:00:aa:bb:01");
        assert_eq!(facts.nics[0].bridge, "vmbr0");
    }

    #[test]
    fn refuses_what_it_cannot_mirror_with_the_reason() {
        let qcow = DOMAIN.replace("type='raw'", "type='qcow2'");
        assert!(read_domain(&qcow)
            .expect_err("qcow2")
            .contains("qemu-img convert"));
        let network = DOMAIN
            .replace("type='bridge'", "type='network'")
            .replace("bridge='vmbr0'", "network='default'");
        assert!(read_domain(&network)
            .expect_err("network")
            .contains("only bridge"));
        assert!(read_domain("<domain><name>x</name>").is_err());
    }

    #[test]
    fn protected_xml_swaps_devices_and_keeps_the_rest() {
        let disks = [PathBuf::from("/run/ftvm/web/disk0.sock")];
        let nics = [PathBuf::from("/run/ftvm/web/nic0.sock")];
        let protection = Protection {
            vm: "web",
            control_socket: Path::new("/run/ftvm/ftvmd.sock"),
            disks: &disks,
            nics: &nics,
            qmp: Path::new("/run/ftvm/web/qmp.sock"),
            engine_qmp: Path::new("/run/ftvm/web/engine-qmp.sock"),
        };
        let xml = protected_xml(DOMAIN, &protection).expect("converts");
        roxmltree::Document::parse(&xml).expect("well-formed");
        assert!(xml.contains("<disk type='vhostuser'"));
        assert!(!xml.contains("web.img"));
        assert!(xml.contains("path='/run/ftvm/web/disk0.sock'"));
        assert!(xml.contains("<mac address='52:54:00:aa:bb:01'/>"));
        assert!(xml.contains("<source type='memfd'/><access mode='shared'/>"));
        assert!(xml.contains("value='vectors'") || xml.contains("name='vectors'"));
        assert!(xml.contains("/run/ftvm/web/qmp.sock"));
        assert!(xml.contains("<serial type='file'><source path='/tmp/console'/></serial>"));
        assert_eq!(
            protection_of(&xml),
            Some(("web".into(), PathBuf::from("/run/ftvm/ftvmd.sock")))
        );
        assert_eq!(protection_of(DOMAIN), None);
        assert!(read_domain(&xml)
            .expect_err("protected")
            .contains("already protected"));
    }
}
