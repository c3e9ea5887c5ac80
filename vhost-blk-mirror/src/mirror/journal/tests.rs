use super::*;

const MIB: usize = 1 << 20;

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn write(journal: &mut Journal, epoch: u64, offset: u64, data: &[u8]) -> Record {
    journal
        .append(3, epoch, Kind::Write, offset, data.len() as u64, data)
        .expect("append")
}

#[test]
fn records_read_back_in_order_after_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.ftvm-journal");
    let mut journal = Journal::create(&path, MIN_JOURNAL_BYTES, 100).expect("create");
    let first = write(&mut journal, 7, 4096, &data(4096, 1));
    let zero = journal
        .append(3, 7, Kind::Zero { deallocate: true }, 1 << 20, 65536, &[])
        .expect("zero");
    let done = journal
        .append(3, 7, Kind::ResyncDone, 0, 0, &[])
        .expect("done");
    let end = journal
        .append(3, 7, Kind::EpochEnd, 0, 0, &[])
        .expect("end");
    let odd = write(&mut journal, 8, 512, &data(700, 2));
    journal.sync().expect("sync");
    assert_eq!(first.sequence, 100);
    assert_eq!(odd.sequence, 104);
    let next = journal.next_position();
    drop(journal);

    let (journal, found) = Journal::open(&path, 0, 100).expect("open");
    let records: Vec<Record> = found.iter().map(|found| found.record).collect();
    assert_eq!(records, vec![first, zero, done, end, odd]);
    assert_eq!(journal.read_data(&found[0]).expect("data"), data(4096, 1));
    assert_eq!(journal.read_data(&found[4]).expect("data"), data(700, 2));
    assert!(journal.read_data(&found[1]).expect("no data").is_empty());
    assert_eq!(journal.next_position(), next);
    assert_eq!(journal.oldest(), Some((0, 100)));
}

#[test]
fn the_ring_wraps_refuses_when_full_and_reading_follows_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal");
    let mut journal = Journal::create(&path, MIN_JOURNAL_BYTES, 0).expect("create");
    let block = 5 * MIB;
    let mut written = Vec::new();
    loop {
        let seed = written.len() as u8;
        match journal.append(1, 0, Kind::Write, 0, block as u64, &data(block, seed)) {
            Ok(record) => written.push((record, seed)),
            Err(JournalError::Full { needed, free }) => {
                assert!(needed > free);
                break;
            }
            Err(error) => panic!("{error}"),
        }
    }
    assert_eq!(written.len(), 6, "32 MiB hold six records of 5 MiB");
    // Epochs applied: their space comes back, and the next records wrap to the start.
    journal.release_through(written[2].0.sequence);
    for _ in 0..2 {
        let seed = written.len() as u8;
        let record = write(&mut journal, 1, 0, &data(block, seed));
        written.push((record, seed));
    }
    assert!(journal.next_position().0 < 3 * block as u64, "wrapped");
    journal.sync().expect("sync");
    let (start, sequence) = journal.oldest().expect("live records");
    assert_eq!(sequence, written[3].0.sequence);
    let next = journal.next_position();
    drop(journal);

    // From the oldest live record: the rest of the first lap, then the wrapped records;
    // the first lap's records behind them (lower numbers) are not taken.
    let (mut journal, found) = Journal::open(&path, start, sequence).expect("open");
    assert_eq!(found.len(), 5);
    for (found, (record, seed)) in found.iter().zip(&written[3..]) {
        assert_eq!(found.record, *record);
        assert_eq!(journal.read_data(found).expect("data"), data(block, *seed));
    }
    assert_eq!(journal.next_position(), next);
    // Exactly one more fits between the tail and the oldest record, then nothing.
    write(&mut journal, 1, 0, &data(block, 0));
    assert_eq!(journal.free_bytes(), 0);
    assert!(matches!(
        journal.append(1, 0, Kind::EpochEnd, 0, 0, &[]),
        Err(JournalError::Full { .. })
    ));
    journal.release_through(u64::MAX);
    assert_eq!(journal.free_bytes(), MIN_JOURNAL_BYTES);
}

#[test]
fn a_torn_record_ends_the_journal_and_is_written_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal");
    let mut journal = Journal::create(&path, MIN_JOURNAL_BYTES, 0).expect("create");
    let first = write(&mut journal, 0, 0, &data(8192, 1));
    let torn = write(&mut journal, 0, 8192, &data(8192, 2));
    write(&mut journal, 0, 16384, &data(8192, 3));
    journal.sync().expect("sync");
    drop(journal);
    let (second_position, _) = {
        let (_, found) = Journal::open(&path, 0, 0).expect("open");
        (found[1].position, found[1].record)
    };
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    file.write_all_at(&[0xa5], second_position + HEADER_BYTES + 100)
        .expect("tear");
    drop(file);

    let (mut journal, found) = Journal::open(&path, 0, 0).expect("open");
    assert_eq!(found.len(), 1, "everything from the torn record on is cut");
    assert_eq!(found[0].record, first);
    assert_eq!(journal.next_position(), (second_position, torn.sequence));
    let again = write(&mut journal, 1, 8192, &data(4096, 9));
    journal.sync().expect("sync");
    drop(journal);
    let (_, found) = Journal::open(&path, 0, 0).expect("open");
    let records: Vec<Record> = found.iter().map(|found| found.record).collect();
    assert_eq!(records, vec![first, again]);
}

#[test]
fn a_corrupt_file_ends_the_journal_without_a_large_allocation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal");
    drop(Journal::create(&path, MIN_JOURNAL_BYTES, 0).expect("create"));
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    let mut header = [0u8; HEADER_BYTES as usize];
    header[0..8].copy_from_slice(MAGIC);
    header[48..52].copy_from_slice(&u32::MAX.to_le_bytes());
    file.write_all_at(&header, 0).expect("garbage");
    drop(file);
    let (_, found) = Journal::open(&path, 0, 0).expect("open");
    assert!(found.is_empty());
    assert!(matches!(
        Journal::open(&path, 10, 0),
        Err(JournalError::BadStart { .. })
    ));
    assert!(matches!(
        Journal::open(&path, MIN_JOURNAL_BYTES, 0),
        Err(JournalError::BadStart { .. })
    ));
}

#[test]
fn a_bad_size_or_an_oversized_record_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let small = dir.path().join("small");
    assert!(matches!(
        Journal::create(&small, MIN_JOURNAL_BYTES - ALIGN, 0),
        Err(JournalError::BadSize { .. })
    ));
    let path = dir.path().join("journal");
    let mut journal = Journal::create(&path, MIN_JOURNAL_BYTES, 0).expect("create");
    let too_large = vec![0u8; MAX_REQUEST_BYTES + 1];
    assert!(matches!(
        journal.append(0, 0, Kind::Write, 0, too_large.len() as u64, &too_large),
        Err(JournalError::TooLarge(_))
    ));
    assert_eq!(journal.next_position(), (0, 0));
}

/// A journal made again over an old one (a new Level 3 session) reads as zeroes from end to
/// end, so no record of the old one is found in it, and takes its whole size on the disk.
#[test]
fn a_journal_created_over_an_old_one_holds_none_of_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk.ftvm-journal");
    let mut old = Journal::create(&path, MIN_JOURNAL_BYTES, 1).expect("create");
    for epoch in 1..=8 {
        write(&mut old, epoch, epoch * 4096, &data(64 * 1024, epoch as u8));
    }
    old.sync().expect("sync");
    drop(old);

    let journal = Journal::create(&path, MIN_JOURNAL_BYTES, 1).expect("create again");
    drop(journal);
    let bytes = std::fs::read(&path).expect("read");
    assert_eq!(bytes.len() as u64, MIN_JOURNAL_BYTES);
    assert!(bytes.iter().all(|&byte| byte == 0), "old records survive");
    let (_, found) = Journal::open(&path, 0, 1).expect("open");
    assert!(
        found.is_empty(),
        "records found in a new journal: {}",
        found.len()
    );
    let metadata = std::fs::metadata(&path).expect("metadata");
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&metadata) * 512 >= MIN_JOURNAL_BYTES,
        "the journal's space is not reserved"
    );
}
