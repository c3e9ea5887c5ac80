//! The torture workloads. Each prints `ACK <seq> <block>` only after a unit of work was
//! written and flushed, and `WRITE-FAILED <seq> <block>` when the guest saw it fail.
//!
//! - [`Workload::Records`]: one guest writer that writes numbered 4 KiB records at random
//!   blocks across the whole disk, each written and flushed on its own (`dd conv=fsync` on
//!   the block device: the write, then a FLUSH). A block may be written more than once: the
//!   last acknowledged write wins, so a check keeps the latest acknowledged sequence number
//!   per block.
//! - [`Workload::Fio`]: fio with `--verify=crc32c`, one run per chunk of 128 KiB at a
//!   random place of the disk (chunks never overlap): 32 random 4 KiB writes at queue depth
//!   8 with libaio and O_DIRECT, a FLUSH (`end_fsync`), then fio reads the chunk back and
//!   checks every block's CRC32C and header. `ACK` follows a fio run that passed. A copy is
//!   checked on the host with the same fio in `--verify_only` mode over every acknowledged
//!   chunk.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::random::Random;
use crate::cpio::Entry;
use crate::guest::GuestConfig;

/// Size of one record (and of the guest's writes).
pub const BLOCK_BYTES: u64 = 4096;

/// Records the records workload writes in a run.
pub const RECORDS: u64 = 400;
/// Bytes of one fio chunk.
pub const FIO_CHUNK_BYTES: u64 = 128 << 10;
/// fio chunks in a run.
pub const FIO_CHUNKS: u64 = 40;
/// Records that take about as long as one fio chunk: the factor between the two
/// workloads' steps.
const RECORDS_PER_CHUNK: u64 = 4;

/// What the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    Records,
    Fio,
}

impl Workload {
    /// The suffix of a row's name run under this workload (`secondary-eio-fio`).
    pub fn suffix(self) -> &'static str {
        match self {
            Workload::Records => "",
            Workload::Fio => "-fio",
        }
    }

    /// The `ACK`s that stand for `writes` record writes: the rows' step sizes are counted
    /// in records; a fio chunk (32 writes, a flush, a read-back) takes about as long as
    /// four records, so the steps are a quarter (never zero).
    pub fn acks_for(self, writes: u64) -> u64 {
        match self {
            Workload::Records => writes,
            Workload::Fio => writes.div_ceil(RECORDS_PER_CHUNK).max(1),
        }
    }
}

/// The guest's write plan: `(seq, block)` in order, seq from 1; for fio, `block` is the
/// chunk's first block.
#[derive(Debug, Clone)]
pub struct Plan {
    pub workload: Workload,
    pub records: Vec<(u64, u64)>,
}

impl Plan {
    /// The workload's writes at places drawn uniformly from blocks `first..blocks` of the
    /// disk: records at any block, fio chunks at distinct chunk-aligned places.
    pub fn random(random: &mut Random, workload: Workload, first: u64, blocks: u64) -> Plan {
        let records = match workload {
            Workload::Records => (1..=RECORDS)
                .map(|seq| (seq, random.between(first, blocks.saturating_sub(1))))
                .collect(),
            Workload::Fio => {
                let chunk_blocks = FIO_CHUNK_BYTES / BLOCK_BYTES;
                let mut places: Vec<u64> = (first.div_ceil(chunk_blocks)..blocks / chunk_blocks)
                    .map(|chunk| chunk * chunk_blocks)
                    .collect();
                // A partial Fisher-Yates shuffle: the first FIO_CHUNKS places, in random order.
                let count = FIO_CHUNKS.min(places.len() as u64) as usize;
                for index in 0..count {
                    let pick = random.between(index as u64, places.len() as u64 - 1) as usize;
                    places.swap(index, pick);
                }
                places
                    .into_iter()
                    .take(count)
                    .zip(1..)
                    .map(|(block, seq)| (seq, block))
                    .collect()
            }
        };
        Plan { workload, records }
    }

    /// Every acknowledged write that the image at `path` does not hold (see
    /// [`missing_in_image`] and [`fio_missing_in_image`]).
    pub fn missing_in_image(&self, path: &Path, latest: &BTreeMap<u64, u64>) -> Vec<Lost> {
        match self.workload {
            Workload::Records => missing_in_image(path, latest),
            Workload::Fio => fio_missing_in_image(path, latest),
        }
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

/// `/torture.sh` of the fio workload: one fio run per line of `/plan.txt` (its seq seeds
/// fio's random offsets; the host's check replays them), the same `ACK`, `WRITE-FAILED`
/// and `DONE` lines as the records'; a failed run's fio errors are printed after `fio: `.
fn fio_script() -> String {
    format!(
        "failed=0\n\
while read seq block; do\n\
  if fio --name=chunk$seq --filename=/dev/vda --offset=$((block * 4096)) --randseed=$seq \
{FIO_CHUNK_OPTIONS} --ioengine=libaio --direct=1 --iodepth=8 --do_verify=1 --verify_fatal=1 \
--end_fsync=1 --verify_state_save=0 --eta=never --output=/tmp/fio.out; then\n\
    echo \"ACK $seq $block\"\n\
  else\n\
    echo \"WRITE-FAILED $seq $block\"; grep -i -e err -e verify /tmp/fio.out | head -n 5 | sed 's/^/fio: /'\n\
    failed=$((failed + 1))\n\
  fi\n\
done < /plan.txt\n\
echo \"DONE $failed\"\n\
[ $failed -eq 0 ]\n"
    )
}

/// The fio options that decide what a chunk holds: the guest's writes and the host's
/// check must agree on them.
const FIO_CHUNK_OPTIONS: &str = "--rw=randwrite --bs=4k --size=128k --verify=crc32c";

/// Sets up `config` to run the plan.
pub fn add_torture_writer(config: &mut GuestConfig, plan: &Plan) {
    config.script = "sh /torture.sh\n".into();
    config
        .files
        .push(Entry::file("plan.txt", plan.text().into_bytes()));
    let script = match plan.workload {
        Workload::Records => SCRIPT.to_owned(),
        Workload::Fio => {
            config.with_fio = true;
            fio_script()
        }
    };
    config
        .files
        .push(Entry::executable("torture.sh", script.into_bytes()));
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

/// Every acknowledged fio chunk that the image at `path` does not hold intact: the host's
/// fio replays each chunk's writes in `--verify_only` mode (one job per chunk, in one fio
/// run) and checks every block's header and CRC32C. A run that fails is tried again twice
/// (a chunk may be read while a daemon writes it back during a resync).
pub fn fio_missing_in_image(path: &Path, latest: &BTreeMap<u64, u64>) -> Vec<Lost> {
    let mut lost = Vec::new();
    for _ in 0..3 {
        lost = fio_verify(path, latest);
        if lost.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    lost
}

fn fio_verify(path: &Path, latest: &BTreeMap<u64, u64>) -> Vec<Lost> {
    if latest.is_empty() {
        return Vec::new();
    }
    let dir = tempfile::tempdir().expect("tempdir for the fio check");
    let mut job = format!(
        "[global]\nfilename={}\nioengine=psync\nverify_only=1\nverify_state_save=0\nthread=1\n",
        path.display()
    );
    for option in FIO_CHUNK_OPTIONS.split(' ') {
        job.push_str(option.trim_start_matches("--"));
        job.push('\n');
    }
    for (&block, &seq) in latest {
        job.push_str(&format!(
            "[b{block}]\noffset={}\nrandseed={seq}\n",
            block * BLOCK_BYTES
        ));
    }
    let job_path = dir.path().join("check.fio");
    let output_path = dir.path().join("check.json");
    std::fs::write(&job_path, job).expect("write the fio job");
    let run = std::process::Command::new("fio")
        .current_dir(dir.path())
        .arg("--output-format=json")
        .arg(format!("--output={}", output_path.display()))
        .arg(&job_path)
        .output()
        .unwrap_or_else(|error| panic!("cannot run fio to check {}: {error}", path.display()));
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    let output = std::fs::read_to_string(&output_path).unwrap_or_default();
    // fio prints a job's error line before the JSON document in the same file.
    let report: serde_json::Value = output
        .find('{')
        .and_then(|start| serde_json::from_str(&output[start..]).ok())
        .unwrap_or_else(|| {
            panic!(
                "fio's check of {} printed no report (exit {:?}): {stderr}{output}",
                path.display(),
                run.status.code()
            )
        });
    let failed: BTreeMap<u64, i64> = report["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|job| {
            let block = job["jobname"].as_str()?.strip_prefix('b')?.parse().ok()?;
            Some((block, job["error"].as_i64().unwrap_or(-1)))
        })
        .collect();
    latest
        .iter()
        .filter_map(|(&block, &seq)| {
            let error = failed.get(&block).copied().unwrap_or(-1);
            (error != 0).then(|| {
                let chunk = block * BLOCK_BYTES..(block * BLOCK_BYTES + FIO_CHUNK_BYTES);
                // fio's verify message names the first bad block's offset.
                let found = stderr
                    .lines()
                    .chain(output.lines())
                    .find(|line| {
                        line.split("offset ")
                            .nth(1)
                            .and_then(|rest| rest.split(',').next())
                            .and_then(|offset| offset.trim().parse::<u64>().ok())
                            .is_some_and(|offset| chunk.contains(&offset))
                    })
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("fio error {error}"));
                Lost { block, seq, found }
            })
        })
        .collect()
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
        let plan = Plan::random(&mut Random::new(9), Workload::Records, 0, 100);
        assert_eq!(plan.records.len() as u64, RECORDS);
        assert!(plan.records.iter().all(|&(_, block)| block < 100));
        let again = Plan::random(&mut Random::new(9), Workload::Records, 0, 100);
        assert_eq!(plan.records, again.records);
        assert_eq!(parse_ack("ACK 12 345"), Some((12, 345)));
        assert_eq!(parse_ack("ACK x 345"), None);
    }

    fn fio_write(image: &Path, block: u64, seq: u64) {
        let status = std::process::Command::new("fio")
            .arg("--name=write")
            .arg(format!("--filename={}", image.display()))
            .arg(format!("--offset={}", block * BLOCK_BYTES))
            .arg(format!("--randseed={seq}"))
            .args(FIO_CHUNK_OPTIONS.split(' '))
            .args([
                "--ioengine=psync",
                "--output=/dev/null",
                "--verify_state_save=0",
            ])
            .status()
            .expect("run fio");
        assert!(status.success(), "fio could not write the chunk");
    }

    #[test]
    fn a_fio_chunk_is_present_only_when_every_block_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("image");
        std::fs::File::create(&image)
            .and_then(|file| file.set_len(2 << 20))
            .expect("create the image");
        fio_write(&image, 32, 1);
        fio_write(&image, 96, 2);
        fio_write(&image, 160, 3);
        // One byte of chunk 96's data changed; chunk 224 never written.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .expect("open");
        file.write_all_at(b"x", 100 * BLOCK_BYTES + 2000)
            .expect("corrupt");
        let latest = BTreeMap::from([(32, 1), (96, 2), (160, 3), (224, 4)]);
        let lost: Vec<u64> = fio_missing_in_image(&image, &latest)
            .iter()
            .map(|lost| lost.block)
            .collect();
        assert_eq!(lost, vec![96, 224]);
    }

    #[test]
    fn fio_chunks_never_overlap_and_avoid_the_first_blocks() {
        let mut random = Random::new(7);
        let plan = Plan::random(&mut random, Workload::Fio, 1, 8192);
        let chunk_blocks = FIO_CHUNK_BYTES / BLOCK_BYTES;
        assert_eq!(plan.records.len() as u64, FIO_CHUNKS);
        let mut blocks: Vec<u64> = plan.records.iter().map(|&(_, block)| block).collect();
        assert!(blocks
            .iter()
            .all(|&block| block >= 1 && block % chunk_blocks == 0));
        blocks.sort_unstable();
        assert!(blocks
            .windows(2)
            .all(|pair| pair[1] - pair[0] >= chunk_blocks));
        assert_eq!(Workload::Fio.acks_for(1), 1);
        assert_eq!(Workload::Fio.acks_for(40), 10);
        assert_eq!(Workload::Records.acks_for(30), 30);
    }
}
