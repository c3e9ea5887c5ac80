//! The torture workload: one guest writer that writes numbered 4 KiB records at random
//! blocks across the whole disk, each written and flushed on its own (`dd conv=fsync` on the
//! block device: the write, then a FLUSH), and prints `ACK <seq> <block>` only after both
//! returned. A block may be written more than once: the last acknowledged write wins, so a
//! check keeps the latest acknowledged sequence number per block.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::random::Random;
use crate::cpio::Entry;
use crate::guest::GuestConfig;

/// Size of one record (and of the guest's writes).
pub const BLOCK_BYTES: u64 = 4096;

/// The guest's write plan: `(seq, block)` in order, seq from 1.
#[derive(Debug, Clone)]
pub struct Plan {
    pub records: Vec<(u64, u64)>,
}

impl Plan {
    /// `records` writes at blocks drawn uniformly from the disk's `blocks`.
    pub fn random(random: &mut Random, records: u64, blocks: u64) -> Plan {
        let records = (1..=records)
            .map(|seq| (seq, random.between(0, blocks.saturating_sub(1))))
            .collect();
        Plan { records }
    }

    fn text(&self) -> String {
        self.records
            .iter()
            .map(|(seq, block)| format!("{seq} {block}\n"))
            .collect()
    }
}

/// The record the guest writes for `seq` at `block` (the rest of the block is zeroes).
pub fn record_text(seq: u64, block: u64) -> String {
    format!("ftvm-torture seq={seq:08} block={block:08}\n")
}

/// `/torture.sh`: writes the plan in `/plan.txt`, goes on after a failed write (each one is
/// a guest-visible error, printed), says `DONE <failures>` and exits non-zero if any failed.
const SCRIPT: &str = "failed=0\n\
while read seq block; do\n\
  printf 'ftvm-torture seq=%08d block=%08d\\n' $seq $block > /tmp/rec\n\
  if dd if=/tmp/rec of=/dev/vda bs=4096 seek=$block conv=sync,fsync 2>/dev/null; then\n\
    echo \"ACK $seq $block\"\n\
  else\n\
    echo \"WRITE-FAILED $seq $block\"; failed=$((failed + 1))\n\
  fi\n\
done < /plan.txt\n\
echo \"DONE $failed\"\n\
[ $failed -eq 0 ]\n";

/// Sets up `config` to run the plan.
pub fn add_torture_writer(config: &mut GuestConfig, plan: &Plan) {
    config.script = "sh /torture.sh\n".into();
    config
        .files
        .push(Entry::file("plan.txt", plan.text().into_bytes()));
    config
        .files
        .push(Entry::executable("torture.sh", SCRIPT.as_bytes().to_vec()));
}

/// The `(seq, block)` of an `ACK` line.
pub fn parse_ack(line: &str) -> Option<(u64, u64)> {
    let mut words = line.strip_prefix("ACK ")?.split(' ');
    let seq = words.next()?.trim().parse().ok()?;
    let block = words.next()?.trim().parse().ok()?;
    Some((seq, block))
}

/// The latest acknowledged seq of every block the guest acknowledged a write to.
pub fn latest_acknowledged(console: &[String]) -> BTreeMap<u64, u64> {
    let mut latest = BTreeMap::new();
    for (seq, block) in console.iter().filter_map(|line| parse_ack(line)) {
        let entry = latest.entry(block).or_insert(seq);
        *entry = (*entry).max(seq);
    }
    latest
}

/// How many writes the guest acknowledged.
pub fn acknowledged_count(console: &[String]) -> usize {
    console
        .iter()
        .filter(|line| parse_ack(line).is_some())
        .count()
}

/// Guest-visible errors on the console: failed writes the script reported, and the
/// kernel's I/O error lines.
pub fn guest_errors(console: &[String]) -> (u64, u64) {
    let failed = console
        .iter()
        .filter(|line| line.starts_with("WRITE-FAILED "))
        .count() as u64;
    let kernel = console
        .iter()
        .filter(|line| line.contains("I/O error"))
        .count() as u64;
    (failed, kernel)
}

/// An acknowledged write that is not on a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub block: u64,
    pub seq: u64,
    /// What the block holds instead (its first line, or "no record").
    pub found: String,
}

/// The seq the record in `bytes` names for `block`, if it is a torture record of that block.
fn record_seq(bytes: &[u8], block: u64) -> Option<u64> {
    let line = bytes.split(|&byte| byte == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let rest = line.strip_prefix("ftvm-torture seq=")?;
    let (seq, named) = rest.split_once(" block=")?;
    (named.parse::<u64>().ok()? == block).then_some(())?;
    seq.parse().ok()
}

/// Every acknowledged write that the image at `path` does not hold: its block must name a
/// seq at least the latest acknowledged one (a later write, acknowledged or not, may have
/// replaced it). A block read while the guest may be writing it is read again a few times
/// before it counts as lost.
pub fn missing_in_image(path: &Path, latest: &BTreeMap<u64, u64>) -> Vec<Lost> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) => panic!("cannot open {} to check it: {error}", path.display()),
    };
    let mut lost = Vec::new();
    for (&block, &seq) in latest {
        let mut found = String::from("no record");
        let mut present = false;
        for _ in 0..3 {
            let mut bytes = [0u8; 64];
            let read = file.read_at(&mut bytes, block * BLOCK_BYTES).unwrap_or(0);
            let bytes = bytes.get(..read).unwrap_or_default();
            if record_seq(bytes, block).is_some_and(|on_disk| on_disk >= seq) {
                present = true;
                break;
            }
            found =
                String::from_utf8_lossy(bytes.split(|&b| b == b'\n').next().unwrap_or_default())
                    .trim_end_matches('\0')
                    .to_owned();
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if !present {
            lost.push(Lost { block, seq, found });
        }
    }
    lost
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_acknowledged_write_of_a_block_wins() {
        let console: Vec<String> = ["ACK 1 7", "noise", "ACK 2 9", "ACK 3 7", "WRITE-FAILED 4 7"]
            .iter()
            .map(|line| line.to_string())
            .collect();
        let latest = latest_acknowledged(&console);
        assert_eq!(latest.get(&7), Some(&3));
        assert_eq!(latest.get(&9), Some(&2));
        assert_eq!(acknowledged_count(&console), 3);
        assert_eq!(guest_errors(&console), (1, 0));
    }

    #[test]
    fn a_record_is_present_only_with_its_block_and_a_seq_not_older() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("image");
        let file = std::fs::File::create(&image).expect("create");
        file.set_len(8 * BLOCK_BYTES).expect("size");
        file.write_all_at(record_text(5, 1).as_bytes(), BLOCK_BYTES)
            .expect("write");
        file.write_all_at(record_text(3, 2).as_bytes(), 2 * BLOCK_BYTES)
            .expect("write");
        // Block 3 holds block 4's record: misplaced, so lost.
        file.write_all_at(record_text(6, 4).as_bytes(), 3 * BLOCK_BYTES)
            .expect("write");
        let latest = BTreeMap::from([(1, 4), (2, 4), (3, 6), (5, 1)]);
        let lost: Vec<u64> = missing_in_image(&image, &latest)
            .iter()
            .map(|lost| lost.block)
            .collect();
        assert_eq!(lost, vec![2, 3, 5]);
    }

    #[test]
    fn a_plan_covers_the_disk_and_replays_from_its_seed() {
        let plan = Plan::random(&mut Random::new(9), 500, 100);
        assert_eq!(plan.records.len(), 500);
        assert!(plan.records.iter().all(|&(_, block)| block < 100));
        let again = Plan::random(&mut Random::new(9), 500, 100);
        assert_eq!(plan.records, again.records);
        assert_eq!(parse_ack("ACK 12 345"), Some((12, 345)));
        assert_eq!(parse_ack("ACK x 345"), None);
    }
}
