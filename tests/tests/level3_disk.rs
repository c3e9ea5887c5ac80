//! Level 3 disk writes across a failover, with the real engines (issue 11): the writes of
//! epochs that never committed are not on hostB's image, the writes the restored memory
//! says completed are, and fio's own verification across the failover passes.
//!
//! The guest runs two writers on its mirrored disk: fio in a loop over the first 8 MiB
//! (random 4 KiB writes at queue depth 8, O_DIRECT, then fio reads every block back and
//! checks its CRC32C), and `tests/guest/recwriter.c`, which writes numbered records to a
//! ring of 1024 blocks from 12 MiB on and keeps the number of the last completed one in a
//! marked page of its memory. The secondary engine is hung (SIGSTOP) in the middle of a fio
//! run, so that hostA's guest goes on writing for a while in epochs that cannot commit;
//! then hostA is lost. hostB's disk is promoted at the replica's checkpoint and compared
//! with the record counter in the replica RAM file, then the VM is restored there.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use ftvm_tests::guest::GuestConfig;
use ftvm_tests::guest_tools;
use ftvm_tests::level3::{counters_in_ram, guest_script, Level3Options, Level3Pair, GUEST_TIMEOUT};
use ftvm_tests::process::signal;

const DISK_BYTES: u64 = 16 << 20;
/// The records' ring: 1024 blocks of 4 KiB from 12 MiB on (fio writes below 8 MiB).
const RECORD_FIRST_BLOCK: u64 = 3072;
const RECORD_BLOCKS: u64 = 1024;
const BLOCK: usize = 4096;

/// The guest's writers: records every ~10 ms in the background, fio runs one after another.
fn script(magic: u64) -> String {
    guest_script(&format!(
        "/recwriter /dev/vda {RECORD_FIRST_BLOCK} {RECORD_BLOCKS} {magic:x} 10000 &\n\
         i=0\n\
         while true; do\n\
           i=$((i + 1))\n\
           echo \"FIO-START $i\"\n\
           if fio --name=run$i --filename=/dev/vda --offset=0 --size=8M --rw=randwrite \
--bs=4k --ioengine=libaio --direct=1 --iodepth=8 --verify=crc32c --do_verify=1 \
--verify_fatal=1 --randseed=$i --verify_state_save=0 --eta=never --output=/tmp/fio.out; then\n\
             echo \"FIO-PASS $i\"\n\
           else\n\
             echo \"FIO-FAIL $i\"; grep -i -e err -e verify -e bad /tmp/fio.out | head -n 8 | sed 's/^/fio: /'\n\
           fi\n\
         done\n"
    ))
}

/// The number after `prefix` in a console line (a line may begin with another program's
/// output that had no newline).
fn number_after(line: &str, prefix: &str) -> Option<u64> {
    let start = line.rfind(prefix)? + prefix.len();
    line[start..].split_whitespace().next()?.parse().ok()
}

/// The highest number after `prefix` on the console.
fn highest(console: &[String], prefix: &str) -> u64 {
    console
        .iter()
        .filter_map(|line| number_after(line, prefix))
        .max()
        .unwrap_or_default()
}

fn last_record(console: &[String]) -> Option<u64> {
    console
        .iter()
        .rev()
        .find_map(|line| number_after(line, "REC "))
}

/// The records on an image: block index in the ring → record number. A block of the ring
/// that holds something else than a whole record is an error.
fn records_on(image: &[u8], magic: u64, what: &str) -> BTreeMap<u64, u64> {
    let mut records = BTreeMap::new();
    for slot in 0..RECORD_BLOCKS {
        let start = (RECORD_FIRST_BLOCK + slot) as usize * BLOCK;
        let block = &image[start..start + BLOCK];
        if block.iter().all(|&byte| byte == 0) {
            continue;
        }
        let word = |index: usize| {
            u64::from_le_bytes(block[index * 8..index * 8 + 8].try_into().expect("8 bytes"))
        };
        let number = word(1);
        let whole = &block[..8] == b"FTVMREC1"
            && word(2) == magic
            && (3..BLOCK / 8).all(|index| word(index) == number)
            && number % RECORD_BLOCKS == slot;
        assert!(
            whole,
            "{what}: block {slot} of the record ring is not a whole record (torn or misplaced write): {:?}",
            &block[..32]
        );
        records.insert(slot, number);
    }
    records
}

fn read_image(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()))
}

#[test]
fn uncommitted_disk_writes_are_not_on_hostb_and_fio_verifies_across_the_failover() {
    let mut magic = [0u8; 8];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").expect("urandom"),
        &mut magic,
    )
    .expect("random bytes");
    let magic = u64::from_le_bytes(magic) | 1;
    let mut config = GuestConfig::new("l3-disk", &script(magic));
    config.cpus = 1;
    config.with_fio = true;
    config.files.push(guest_tools::tool("recwriter"));
    let options = Level3Options {
        interval_ms: 50,
        disk_bytes: Some(DISK_BYTES),
    };
    let mut pair = Level3Pair::start("l3-disk", config, options);
    let started = Instant::now();
    let first = pair.guest().wait_for_line(GUEST_TIMEOUT, |line| {
        line.contains("FIO-FAIL") || number_after(line, "FIO-PASS ").is_some()
    });
    assert!(!first.contains("FIO-FAIL"), "fio failed on hostA: {first}");
    eprintln!("{first} after {:?}", started.elapsed());
    // A run that starts from now on.
    let started_before = highest(&pair.guest().console(), "FIO-START ");
    let run = pair.guest().wait_for_line(GUEST_TIMEOUT, |line| {
        number_after(line, "FIO-START ").is_some_and(|run| run > started_before)
    });
    let run = number_after(&run, "FIO-START ").expect("a run number");
    // Checkpoints commit with this run's first writes in them.
    pair.wait_committed(5);

    // A hung secondary engine: no checkpoint commits from here on (at most the one in
    // flight), while hostA's guest goes on writing; hostB's disk daemon still receives
    // (and seals) those writes.
    let secondary = pair.secondary_pid();
    signal(secondary, libc::SIGSTOP);
    let record_at_stop = last_record(&pair.guest().console()).unwrap_or_default();
    pair.guest().wait_for_line(GUEST_TIMEOUT, |line| {
        number_after(line, "REC ").is_some_and(|record| record >= record_at_stop + 48)
    });
    let killed = pair.kill_host_a();
    signal(secondary, libc::SIGCONT);
    let fio_done_on_a = pair
        .console_a
        .iter()
        .any(|line| number_after(line, "FIO-PASS ") == Some(run));
    let epoch = pair.freeze_and_promote_on_b();

    // What the checkpoint says the guest wrote, and what each image holds.
    let counters = counters_in_ram(pair.replica_ram(), magic);
    let [completed] = counters[..] else {
        panic!(
            "recwriter's state page found {} times in the replica",
            counters.len()
        );
    };
    let mirror = pair.mirror.as_ref().expect("the mirrored disk");
    let on_b = records_on(&mirror.secondary_image(), magic, "hostB");
    let on_a = records_on(&read_image(&mirror.primary_options.image), magic, "hostA");
    let highest_a = on_a.values().copied().max().unwrap_or_default();
    let highest_b = on_b.values().copied().max().unwrap_or_default();
    eprintln!(
        "checkpoint {epoch}: records completed {completed}; hostB's image up to {highest_b}, hostA's up to {highest_a}; fio run {run} done on hostA: {fio_done_on_a}"
    );
    // Not ahead: nothing of a later epoch (the write in flight at the checkpoint may be
    // there: its request is in the checkpoint and is completed after the restore).
    assert!(
        highest_b <= completed + 1,
        "hostB's image holds record {highest_b}, the restored memory says only {completed} were written: writes of uncommitted epochs were kept"
    );
    // Not behind: every record the memory says completed, still in the ring, is there.
    for number in completed.saturating_sub(RECORD_BLOCKS - 2).max(1)..=completed {
        let slot = number % RECORD_BLOCKS;
        assert_eq!(
            on_b.get(&slot),
            Some(&number),
            "hostB's image lacks record {number}, which the restored memory says completed"
        );
    }
    // The check had something to drop: hostA wrote well past the checkpoint.
    assert!(
        highest_a > completed + 16,
        "hostA wrote records up to {highest_a} only, the checkpoint has {completed}"
    );

    let answer = pair.restore_on_b();
    eprintln!("restored {:?} after the kill: {answer}", killed.elapsed());
    // fio's run in progress at the checkpoint goes on and verifies every block it wrote,
    // before and after the checkpoint; then one more run on hostB's disk alone.
    let restored = pair.guest();
    restored.wait_for_line(GUEST_TIMEOUT, |line| {
        line.contains("FIO-FAIL") || number_after(line, "FIO-PASS ") == Some(run + 1)
    });
    let console = restored.console();
    let fio_lines: Vec<&String> = console
        .iter()
        .filter(|line| line.contains("FIO-") || line.starts_with("fio: "))
        .collect();
    assert!(
        !console.iter().any(|line| line.contains("FIO-FAIL")),
        "fio's verification failed after the failover: {fio_lines:?}"
    );
    assert_eq!(
        fio_lines
            .first()
            .and_then(|line| number_after(line, "FIO-PASS ")),
        Some(run),
        "the restored guest did not go on with fio run {run}, in progress at the checkpoint: {fio_lines:?}"
    );
    assert!(
        !console
            .iter()
            .any(|line| line.contains("REC-FAILED") || number_after(line, "REC ") == Some(16)),
        "the record writer failed or started over: {:?}",
        console
            .iter()
            .filter(|line| line.starts_with("REC"))
            .take(5)
            .collect::<Vec<_>>()
    );
}
