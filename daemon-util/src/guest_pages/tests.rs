use std::fs::File;
use std::os::unix::fs::MetadataExt;

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::*;

const PAGE: usize = PAGE_SIZE as usize;

fn marked_pages(bitmap: &PageBitmap) -> Vec<usize> {
    let mut pages = Vec::new();
    bitmap.take(|page| pages.push(page));
    pages
}

#[test]
fn a_write_marks_every_page_it_touches_and_take_clears_them() {
    let bitmap = PageBitmap::new(200 * PAGE);
    bitmap.mark(PAGE - 1, 2);
    bitmap.mark(10 * PAGE, 1);
    bitmap.mark(60 * PAGE, 10 * PAGE);
    bitmap.mark(5 * PAGE, 0);
    let mut expected = vec![0, 1, 10];
    expected.extend(60..70);
    assert_eq!(marked_pages(&bitmap), expected);
    assert_eq!(marked_pages(&bitmap), Vec::<usize>::new());
}

#[test]
fn whole_words_and_the_end_of_the_region() {
    let bitmap = PageBitmap::new(130 * PAGE + 1);
    bitmap.mark(0, 128 * PAGE);
    assert_eq!(marked_pages(&bitmap), (0..128).collect::<Vec<_>>());
    // Past the end (the last, partial page is page 130) or overflowing: ignored or cut.
    bitmap.mark(129 * PAGE, usize::MAX);
    bitmap.mark(500 * PAGE, PAGE);
    assert_eq!(marked_pages(&bitmap), vec![129, 130]);
    assert!(!bitmap.dirty_at(129 * PAGE));
}

#[test]
fn a_region_too_large_to_track_counts_as_written_whole() {
    let bitmap = PageBitmap::new(MAX_TRACKED_REGION_BYTES + PAGE);
    assert!(bitmap.words.is_none());
    assert!(bitmap.dirty_at(0));
    assert_eq!(bitmap.pages, MAX_TRACKED_REGION_BYTES / PAGE + 1);
}

#[test]
fn a_slice_marks_at_its_place_in_the_region() {
    let bitmap = TrackedBitmap::with_len(16 * PAGE);
    let slice = bitmap.slice_at(3 * PAGE).slice_at(PAGE);
    slice.mark_dirty(PAGE + 8, 1);
    assert!(bitmap.dirty_at(5 * PAGE));
    assert!(slice.dirty_at(PAGE));
    assert!(!bitmap.dirty_at(4 * PAGE));
    assert_eq!(marked_pages(&bitmap.pages), vec![5]);
}

#[test]
fn merge_sorts_and_joins_touching_ranges() {
    let ranges = vec![
        (8192, 4096),
        (0, 4096),
        (4096, 4096),
        (20480, 4096),
        (20480, 8192),
    ];
    assert_eq!(merge(ranges), vec![(0, 12288), (20480, 8192)]);
    assert_eq!(merge(Vec::new()), Vec::new());
}

/// Guest memory of two regions mapped from one file at different offsets, as QEMU's
/// memory table describes RAM below and above a hole.
struct Memory {
    file: tempfile::NamedTempFile,
    memory: TrackedMemory,
}

fn memory() -> Memory {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    file.as_file().set_len(64 * PAGE as u64).expect("size");
    let region = |guest: u64, size: usize, offset: u64| {
        let clone: File = file.as_file().try_clone().expect("clone");
        GuestRegionMmap::<TrackedBitmap>::from_range(
            GuestAddress(guest),
            size,
            Some(FileOffset::new(clone, offset)),
        )
        .expect("region")
    };
    let memory = GuestMemoryMmap::from_regions(vec![
        region(0, 8 * PAGE, 0),
        region(0x10_0000, 16 * PAGE, 32 * PAGE as u64),
    ])
    .expect("memory");
    Memory { file, memory }
}

fn file_id(file: &tempfile::NamedTempFile) -> FileId {
    let metadata = file.as_file().metadata().expect("stat");
    FileId {
        dev: metadata.dev(),
        ino: metadata.ino(),
    }
}

#[test]
fn take_reports_written_pages_as_ranges_of_the_file_and_clears_them() {
    let Memory { file, memory } = memory();
    let pages = GuestPages::new();
    pages.set_memory(&memory);
    assert_eq!(pages.take().expect("take"), vec![]);

    memory
        .write_obj(0xabu8, GuestAddress(PAGE as u64 + 5))
        .expect("write");
    memory
        .write_slice(&[1u8; 2 * PAGE], GuestAddress(2 * PAGE as u64))
        .expect("write");
    // Second region: guest 0x10_0000 is file offset 32 pages.
    memory
        .write_obj(7u32, GuestAddress(0x10_0000 + 3 * PAGE as u64))
        .expect("write");
    let written = pages.take().expect("take");
    assert_eq!(
        written,
        vec![WrittenFile {
            file: file_id(&file),
            ranges: vec![
                (PAGE as u64, 3 * PAGE as u64),
                (35 * PAGE as u64, PAGE as u64)
            ],
        }]
    );
    assert_eq!(pages.take().expect("take"), vec![]);
}

#[test]
fn writes_through_a_replaced_memory_table_are_still_reported() {
    let old = memory();
    let new = memory();
    let pages = GuestPages::new();
    pages.set_memory(&old.memory);
    old.memory
        .write_obj(1u8, GuestAddress(4 * PAGE as u64))
        .expect("write");
    pages.set_memory(&new.memory);
    // A worker still holding the old table writes after the new one arrived.
    old.memory
        .write_obj(1u8, GuestAddress(5 * PAGE as u64))
        .expect("write");
    new.memory.write_obj(1u8, GuestAddress(0)).expect("write");
    let mut expected = vec![
        WrittenFile {
            file: file_id(&old.file),
            ranges: vec![(4 * PAGE as u64, 2 * PAGE as u64)],
        },
        WrittenFile {
            file: file_id(&new.file),
            ranges: vec![(0, PAGE as u64)],
        },
    ];
    expected.sort_by_key(|written| written.file);
    assert_eq!(pages.take().expect("take"), expected);

    // Once nobody holds the old table its region is read a last time and forgotten.
    old.memory
        .write_obj(1u8, GuestAddress(7 * PAGE as u64))
        .expect("write");
    let Memory {
        file: old_file,
        memory: old_memory,
    } = old;
    drop(old_memory);
    let written = pages.take().expect("take");
    let old_written: Vec<_> = written
        .iter()
        .filter(|w| w.file == file_id(&old_file))
        .collect();
    assert_eq!(old_written[0].ranges, vec![(7 * PAGE as u64, PAGE as u64)]);
    assert!(lock(&pages.regions).retired.is_empty());
    assert_eq!(pages.take().expect("take"), vec![]);
}

#[test]
fn a_region_without_a_file_makes_take_refuse() {
    let memory: TrackedMemory =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 * PAGE)]).expect("anonymous");
    let pages = GuestPages::new();
    pages.set_memory(&memory);
    let error = pages.take().expect_err("anonymous memory has no file");
    assert!(
        error.to_string().contains("not mapped from a file"),
        "{error}"
    );
}
