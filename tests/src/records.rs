//! The record workload: guest writers that write numbered 4 KiB records, each flushed on its
//! own, and report `ACK <writer> <n>` on the console only after the flush returned. After a
//! crash or failover, every acknowledged record must be in the image.
//!
//! The cluster tests' VM ([`cluster_writer`]) runs one such writer that reports `ACK <n>`,
//! and after a failover its next boot reports `FOUND-UPTO <n>`, the last record it found.

use std::time::Duration;

use crate::cluster::Cluster;
use crate::cpio::Entry;
use crate::guest::GuestConfig;
use crate::wait::Wait;

/// How long a cluster's guest may take to boot and acknowledge, or to report.
const CLUSTER_GUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Records of writer `w` start at block `w * WRITER_STRIDE_BLOCKS`.
const WRITER_STRIDE_BLOCKS: u64 = 1000;

/// `/writer.sh W`: writes `records` records, then reads all of them back.
fn writer_script(records: u32) -> String {
    "w=$1; base=$(( $1 * 1000 )); i=1\n\
     while [ $i -le RECORDS ]; do\n\
       printf 'ftvm-record %06d w%d\\n' $i $w > /tmp/rec$w\n\
       dd if=/tmp/rec$w of=/dev/vda bs=4096 seek=$((base + i)) conv=sync,fsync 2>/dev/null \
         || { echo \"WRITE-FAILED $w $i\"; exit 1; }\n\
       echo \"ACK $w $i\"\n\
       i=$((i + 1))\n\
     done\n\
     i=1\n\
     while [ $i -le RECORDS ]; do\n\
       dd if=/dev/vda bs=4096 skip=$((base + i)) count=1 2>/dev/null | head -n 1 > /tmp/got$w\n\
       printf 'ftvm-record %06d w%d\\n' $i $w | cmp -s - /tmp/got$w \
         || { echo \"MISSING $w $i\"; exit 1; }\n\
       i=$((i + 1))\n\
     done\n\
     echo \"VERIFIED $w\"\n"
        .replace("RECORDS", &records.to_string())
}

/// Sets up `config` to run one writer per CPU (pinned, so every queue carries writes).
pub fn add_writers(config: &mut GuestConfig, writers: u16, records: u32) {
    let mut script = String::from("pids=\n");
    for writer in 0..writers {
        script.push_str(&format!(
            "taskset {} sh /writer.sh {writer} & pids=\"$pids $!\"\n",
            1 << writer
        ));
    }
    script.push_str("failed=0\nfor pid in $pids; do wait $pid || failed=1; done\nexit $failed\n");
    config.script = script;
    config.cpus = u32::from(writers);
    config.files.push(Entry::executable(
        "writer.sh",
        writer_script(records).into_bytes(),
    ));
}

/// The `(writer, record)` pairs the guest acknowledged on its console.
pub fn acknowledged(console: &[String]) -> Vec<(u64, u64)> {
    console
        .iter()
        .filter_map(|line| {
            let mut words = line.strip_prefix("ACK ")?.split(' ');
            Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
        })
        .collect()
}

/// Panics unless every acknowledged record is in `image`.
pub fn assert_in_image(image: &[u8], acknowledged: &[(u64, u64)], which: &str) {
    for &(writer, record) in acknowledged {
        let offset = ((writer * WRITER_STRIDE_BLOCKS + record) * 4096) as usize;
        let expected = format!("ftvm-record {record:06} w{writer}\n");
        assert_eq!(
            image.get(offset..offset + expected.len()),
            Some(expected.as_bytes()),
            "acknowledged record {record} of writer {writer} is missing from the {which} image"
        );
    }
}

/// `/direct.sh W`: writes `records` records with O_DIRECT and no flush (each acknowledged
/// by the disk, so on both copies of a mirror, but durable nowhere yet), then says `IDLE`
/// and waits for the test to end the guest.
fn direct_writer_script(records: u32) -> String {
    "w=$1; base=$(( $1 * 1000 )); i=1\n\
     while [ $i -le RECORDS ]; do\n\
       printf 'ftvm-record %06d w%d\\n' $i $w > /tmp/rec$w\n\
       dd if=/tmp/rec$w of=/dev/vda bs=4096 seek=$((base + i)) conv=sync oflag=direct \
         2>/dev/null || { echo \"WRITE-FAILED $w $i\"; exit 1; }\n\
       echo \"ACK $w $i\"\n\
       i=$((i + 1))\n\
     done\n\
     echo \"IDLE $w\"\n\
     sleep 3600\n"
        .replace("RECORDS", &records.to_string())
}

/// Sets up `config` to run one O_DIRECT writer without flushes (see `direct_writer_script`).
pub fn add_direct_writer(config: &mut GuestConfig, records: u32) {
    config.script = "sh /direct.sh 0\n".into();
    config.files.push(Entry::executable(
        "direct.sh",
        direct_writer_script(records).into_bytes(),
    ));
}

/// Sets up `config` to read back records `1..=records` of writer 0 and exit non-zero on the
/// first one missing (`MISSING 0 <n>`), or print `VERIFIED 0`.
pub fn add_verifier(config: &mut GuestConfig, records: u64) {
    config.script = format!(
        "i=1\n\
         while [ $i -le {records} ]; do\n\
           dd if=/dev/vda bs=4096 skip=$i count=1 iflag=direct 2>/dev/null | head -n 1 > /tmp/got\n\
           printf 'ftvm-record %06d w0\\n' $i | cmp -s - /tmp/got || {{ echo \"MISSING 0 $i\"; exit 1; }}\n\
           i=$((i + 1))\n\
         done\n\
         echo \"VERIFIED 0\"\n"
    );
}

/// The VM of a cluster test. Its first boot marks the disk (block 0), then writes record `i`
/// to block `i` for `i` in `1..=records`, each flushed, and reports `ACK i` after the flush
/// (about 50 a second, so that a later check reads few). A later boot (after a failover)
/// reports the last record present in a row, `FOUND-UPTO n`, and exits.
pub fn cluster_writer(records: u32) -> GuestConfig {
    let script = "\
if dd if=/dev/vda bs=4096 count=1 2>/dev/null | grep -q ftvm-first-boot; then
  i=1
  while dd if=/dev/vda bs=4096 skip=$i count=1 2>/dev/null | head -n 1 | grep -q \"^ftvm-record $i\\$\"; do
    i=$((i + 1))
  done
  echo \"FOUND-UPTO $((i - 1))\"
  echo \"BOOT-COUNT $(dd if=/dev/vda bs=4096 count=1 2>/dev/null | grep -c ftvm-first-boot)\"
  exit 0
fi
echo ftvm-first-boot | dd of=/dev/vda bs=4096 conv=sync,fsync 2>/dev/null
i=1
while [ $i -le RECORDS ]; do
  echo \"ftvm-record $i\" | dd of=/dev/vda bs=4096 seek=$i conv=sync,fsync 2>/dev/null || { echo \"WRITE-FAILED $i\"; exit 1; }
  echo \"ACK $i\"
  i=$((i + 1))
  usleep 10000
done
echo WRITER-DONE
"
    .replace("RECORDS", &records.to_string());
    let mut guest = GuestConfig::new("ftvm-vm1", &script);
    guest.memory_mb = 256;
    guest
}

/// Panics unless records `1..=up_to` of [`cluster_writer`] are in `image` (record `i` at
/// block `i`): what a cluster's guest acknowledged, on one copy.
pub fn assert_cluster_records_in_image(image: &[u8], up_to: u64, which: &str) {
    for record in 1..=up_to {
        let offset = (record * 4096) as usize;
        let expected = format!("ftvm-record {record}\n");
        assert_eq!(
            image.get(offset..offset + expected.len()),
            Some(expected.as_bytes()),
            "acknowledged record {record} is missing from {which}'s image"
        );
    }
}

/// Panics if a guest writer reported a failed write (`WRITE-FAILED` on its console).
pub fn assert_no_write_failed(console: &[String]) {
    assert!(
        !console.iter().any(|line| line.contains("WRITE-FAILED")),
        "the guest saw a write fail"
    );
}

/// The highest `ACK <n>` on a console (0 if none).
pub fn last_ack(console: &[String]) -> u64 {
    console
        .iter()
        .filter_map(|line| line.strip_prefix("ACK ")?.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// The `FOUND-UPTO <n>` of a console, if the guest reported it.
pub fn found_upto(console: &[String]) -> Option<u64> {
    console
        .iter()
        .find_map(|line| line.strip_prefix("FOUND-UPTO ")?.trim().parse().ok())
}

/// Waits until the guest on `host` acknowledged record `count`; returns the last one.
pub fn wait_acks(cluster: &Cluster, host: usize, count: u64) -> u64 {
    let what = format!("the guest to acknowledge record {count}");
    Wait::up_to(CLUSTER_GUEST_TIMEOUT)
        .every(Duration::from_millis(100))
        .for_value(
            &what,
            || Some(last_ack(&cluster.console(host))),
            |&acked| acked >= count,
        )
}

/// Waits for the restarted guest on `host` to report the last record it found.
pub fn wait_found(cluster: &Cluster, host: usize) -> u64 {
    Wait::up_to(CLUSTER_GUEST_TIMEOUT)
        .every(Duration::from_millis(200))
        .for_value(
            "the restarted guest to report FOUND-UPTO",
            || found_upto(&cluster.console(host)),
            |_| true,
        )
}
