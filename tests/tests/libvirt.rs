//! A libvirt domain of the operator's own (its XML, a raw disk, a bridge NIC), protected
//! with `ftvm protect --domain` on a cluster whose hosts each run their own libvirtd:
//! ftvmd runs it through libvirt, the hook refuses `virsh start` where the VM is not
//! held, an operator's `virsh destroy` is a planned stop, the domain survives the loss of
//! its host, and `ftvm unprotect` gives it back as it was.

use std::time::{Duration, Instant};

use ftvm_tests::cluster::{Cluster, ClusterOptions, HOSTS, VM};
use ftvm_tests::guest::GuestConfig;
use ftvm_tests::records::last_ack;
use ftvm_tests::wait::Wait;
use ftvm_tests::{create_image, paths};

const A: usize = 0;
const B: usize = 1;
const MAC: &str = "52:54:00:4c:56:01";
const DISK_BYTES: u64 = 16 << 20;
/// Records the guest may write (block `i` holds record `i`).
const RECORDS: u32 = 3000;

/// Every boot: finds the records in a row on the disk (`FOUND-UPTO n`), prints its MAC,
/// then writes record `i` to block `i` from `n + 1` on, each flushed, `ACK i` after the
/// flush.
fn writer() -> GuestConfig {
    let script = "\
i=1
while dd if=/dev/vda bs=4096 skip=$i count=1 2>/dev/null | head -n 1 | grep -q \"^ftvm-record $i\\$\"; do
  i=$((i + 1))
done
echo \"FOUND-UPTO $((i - 1))\"
echo \"MAC $(cat /sys/class/net/eth0/address)\"
while [ $i -le RECORDS ]; do
  echo \"ftvm-record $i\" | dd of=/dev/vda bs=4096 seek=$i conv=sync,fsync 2>/dev/null || { echo \"WRITE-FAILED $i\"; exit 1; }
  echo \"ACK $i\"
  i=$((i + 1))
  usleep 10000
done
"
    .replace("RECORDS", &RECORDS.to_string());
    let mut guest = GuestConfig::new("ftvm-libvirt", &script);
    guest.memory_mb = 256;
    guest
}

/// The operator's domain: TCG, a raw image, a NIC on bridge vmbr0, the serial console to
/// a file (appended by every boot on either host).
fn domain_xml(cluster: &Cluster) -> String {
    let root = cluster.dir.path();
    format!(
        "<domain type='qemu'>
  <name>{VM}</name>
  <description>{description}</description>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet no_timer_check</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{image}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='bridge'>
      <mac address='{MAC}'/>
      <source bridge='vmbr0'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='{console}' append='on'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
",
        kernel = paths::guest_dir().join("vmlinuz").display(),
        initrd = cluster.initrd.display(),
        // An operator's XML is often larger than a link message's 4 KiB header: the peer
        // gets the definition in the payload.
        description = "ftvm test domain; ".repeat(400),
        image = image(cluster).display(),
        console = root.join("console.log").display(),
    )
}

/// The domain's image on hostA, as its XML names it.
fn image(cluster: &Cluster) -> std::path::PathBuf {
    cluster.dir.path().join("images").join(format!("{VM}.img"))
}

/// The same path on hostB (under its `image_root`).
fn image_on_b(cluster: &Cluster) -> std::path::PathBuf {
    let relative = image(cluster);
    let relative = relative.strip_prefix("/").expect("absolute");
    cluster.dir.path().join("hostB-root").join(relative)
}

fn console(cluster: &Cluster) -> Vec<String> {
    std::fs::read_to_string(cluster.dir.path().join("console.log"))
        .unwrap_or_default()
        .lines()
        .map(|line| line.trim_end_matches('\r').to_owned())
        .collect()
}

/// The `FOUND-UPTO` of the `boot`-th boot (1 is the first).
fn found(cluster: &Cluster, boot: usize) -> u64 {
    Wait::up_to(Duration::from_secs(120))
        .every(Duration::from_millis(100))
        .for_value(
            &format!("boot {boot} to report FOUND-UPTO"),
            || {
                console(cluster)
                    .iter()
                    .filter_map(|line| line.strip_prefix("FOUND-UPTO ")?.trim().parse().ok())
                    .nth(boot - 1)
            },
            |_| true,
        )
}

/// The guest's `MAC` lines, once `boots` boots printed theirs.
fn macs(cluster: &Cluster, boots: usize) -> Vec<String> {
    Wait::up_to(Duration::from_secs(60))
        .every(Duration::from_millis(100))
        .for_value(
            &format!("boot {boots} to print its MAC"),
            || {
                let lines: Vec<String> = console(cluster)
                    .into_iter()
                    .filter(|line| line.starts_with("MAC "))
                    .collect();
                (lines.len() >= boots).then_some(lines)
            },
            |_| true,
        )
}

/// Waits until the guest acknowledged `count` more records than `since`.
fn wait_acks(cluster: &Cluster, since: u64, count: u64) -> u64 {
    Wait::up_to(Duration::from_secs(120))
        .every(Duration::from_millis(100))
        .for_value(
            &format!("the guest to acknowledge record {}", since + count),
            || Some(last_ack(&console(cluster))),
            |&acked| acked >= since + count,
        )
}

fn virsh(cluster: &Cluster, host: usize, args: &[&str]) -> String {
    let (ok, text) = cluster.libvirtd(host).virsh(args);
    assert!(ok, "virsh {args:?} on {} failed: {text}", HOSTS[host]);
    text
}

fn domain_state(cluster: &Cluster, host: usize) -> String {
    cluster
        .libvirtd(host)
        .virsh(&["domstate", VM])
        .1
        .trim()
        .to_owned()
}

#[test]
fn a_protected_libvirt_domain_survives_host_loss_and_is_given_back_intact() {
    let started = Instant::now();
    let options = ClusterOptions {
        libvirt: true,
        disk_bytes: DISK_BYTES,
        level: 1,
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::new("libvirt-domain", &writer(), &options);
    cluster.start_all();
    std::fs::create_dir_all(image(&cluster).parent().expect("images dir")).expect("images");
    create_image(&image(&cluster), DISK_BYTES);
    let xml_file = cluster.dir.path().join("operator-domain.xml");
    std::fs::write(&xml_file, domain_xml(&cluster)).expect("write the XML");
    virsh(&cluster, A, &["define", &xml_file.to_string_lossy()]);

    // Protection shows what it changes, and changes nothing without a yes.
    let (refused, plan) = cluster.ftvm(
        A,
        &["protect", "--domain", VM, "--level", "1", "--peer", "hostB"],
    );
    assert!(!refused, "protect without an answer went through: {plan}");
    assert!(plan.contains("becomes a mirrored disk"), "{plan}");
    assert!(
        plan.contains(MAC) && plan.contains("nothing was changed"),
        "{plan}"
    );
    assert!(virsh(&cluster, A, &["dumpxml", VM]).contains("type='file'"));
    let (ok, text) = cluster.ftvm(
        A,
        &[
            "protect", "--domain", VM, "--level", "1", "--peer", "hostB", "--yes",
        ],
    );
    assert!(ok, "ftvm protect --domain: {text}");
    let running = cluster.wait_vm(A, Duration::from_secs(60), "the domain runs", |vm| {
        vm["role"] == "Primary" && vm["vm_pid"].is_u64() && vm["domain"] == true
    });
    println!(
        "protected and running under libvirt after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let protected_xml = virsh(&cluster, A, &["dumpxml", VM]);
    for needed in ["type='vhostuser'", MAC, "memfd", "ftvm:vm"] {
        assert!(
            protected_xml.contains(needed),
            "no {needed} in {protected_xml}"
        );
    }
    assert!(!protected_xml.contains(&*image(&cluster).to_string_lossy()));
    let qemu = running["vm_pid"].as_u64().unwrap_or(0);
    assert!(
        std::fs::read_to_string(format!("/proc/{qemu}/cmdline"))
            .is_ok_and(|line| line.contains("qemu")),
        "vm_pid {qemu} is not the domain's QEMU"
    );
    assert_eq!(found(&cluster, 1), 0);
    assert_eq!(macs(&cluster, 1), [format!("MAC {MAC}")]);
    wait_acks(&cluster, 0, 20);
    cluster.wait_vm(B, Duration::from_secs(60), "UpToDate replica", |vm| {
        vm["role"] == "Secondary" && vm["disks"][0]["replication"]["disk_state"] == "UpToDate"
    });

    // The host that does not hold the VM: the domain is defined (by hostB's ftvmd, on
    // its VM's own thread, some time after the protect), and its start refused.
    Wait::up_to(Duration::from_secs(60))
        .every(Duration::from_millis(200))
        .until("the protected domain defined on hostB", || {
            domain_state(&cluster, B) == "shut off"
        });
    let (ok, refusal) = cluster.libvirtd(B).virsh(&["start", VM]);
    assert!(!ok, "virsh start on hostB went through: {refusal}");
    assert!(
        refusal.contains("keeps only its replica") && refusal.contains("ftvm failover"),
        "virsh start on hostB: {refusal}"
    );
    assert_eq!(domain_state(&cluster, B), "shut off");

    // The operator stops the domain: a planned stop, no failover.
    virsh(&cluster, A, &["destroy", VM]);
    cluster.wait_vm(
        A,
        Duration::from_secs(20),
        "stopped by the operator",
        |vm| vm["stopped_by_operator"] == true && vm["vm_pid"].is_null(),
    );
    let no_failover = Wait::up_to(Duration::from_secs(3))
        .every(Duration::from_millis(100))
        .holds(|| {
            cluster
                .vm_status(B)
                .is_some_and(|vm| vm["role"] == "Secondary" && vm["vm_pid"].is_null())
        });
    assert!(no_failover, "hostB took the VM over after a planned stop");
    let (_, events) = cluster.ftvm(A, &["events"]);
    assert!(events.contains("planned stop"), "{events}");
    // … and starts it again on its primary: the hook lets it, ftvmd takes it over.
    let acknowledged = last_ack(&console(&cluster));
    virsh(&cluster, A, &["start", VM]);
    cluster.wait_vm(
        A,
        Duration::from_secs(30),
        "the operator's start taken over",
        |vm| vm["vm_pid"].is_u64() && vm["stopped_by_operator"] == false,
    );
    assert!(found(&cluster, 2) >= acknowledged);
    let before_loss = wait_acks(&cluster, acknowledged, 20);

    // hostA is lost (libvirtd, QEMU, ftvmd and its daemons killed): libvirt on hostB runs
    // the domain, with every acknowledged record and the same MAC.
    let killed_at = cluster.kill_host(A);
    let acknowledged = last_ack(&console(&cluster)).max(before_loss);
    cluster.wait_vm(B, Duration::from_secs(60), "primary on hostB", |vm| {
        vm["role"] == "Primary" && vm["vm_pid"].is_u64()
    });
    println!(
        "host loss: the domain runs on hostB {:.1} s after hostA was killed",
        killed_at.elapsed().as_secs_f64()
    );
    assert_eq!(domain_state(&cluster, B), "running");
    let found_after_loss = found(&cluster, 3);
    assert!(
        found_after_loss >= acknowledged,
        "hostB's guest found records up to {found_after_loss}, {acknowledged} were acknowledged"
    );
    let macs = macs(&cluster, 3);
    assert!(
        macs.iter().all(|line| line == &format!("MAC {MAC}")),
        "{macs:?}"
    );
    assert!(virsh(&cluster, B, &["dumpxml", VM]).contains(MAC));
    let before_unprotect = wait_acks(&cluster, found_after_loss, 10);

    // Unprotected on hostB: the domain is the operator's again (raw disk, bridge NIC) and
    // runs from hostB's copy with all its records.
    let (ok, text) = cluster.ftvm(B, &["unprotect", "--domain", VM]);
    assert!(ok, "ftvm unprotect --domain: {text}");
    let given_back = virsh(&cluster, B, &["dumpxml", VM]);
    assert!(
        given_back.contains("<disk type='file' device='disk'>")
            && given_back.contains(&*image_on_b(&cluster).to_string_lossy())
            && given_back.contains("<interface type='bridge'>")
            && given_back.contains(MAC)
            && !given_back.contains("vhostuser")
            && !given_back.contains("ftvm:vm"),
        "{given_back}"
    );
    assert_eq!(domain_state(&cluster, B), "running");
    let acknowledged = last_ack(&console(&cluster)).max(before_unprotect);
    let found_unprotected = found(&cluster, 4);
    assert!(
        found_unprotected >= acknowledged,
        "the unprotected domain found records up to {found_unprotected}, {acknowledged} were \
         acknowledged"
    );
    assert!(
        cluster.named_vm_status(B, VM).is_none(),
        "hostB still lists the VM"
    );
    virsh(&cluster, B, &["destroy", VM]);
    println!("whole test: {:.1} s", started.elapsed().as_secs_f64());
}
