use std::io::Write as _;

use daemon_util::guest_pages::TrackedBitmap;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, FileOffset, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::*;
use crate::image::buffer_fault;

type Memory = GuestMemoryMmap<TrackedBitmap>;

const REGION_BYTES: u64 = 0x10000;

/// Two adjacent regions: separate mappings, so a guest range across 0x10000 is two slices.
fn two_regions() -> Memory {
    Memory::from_ranges(&[
        (GuestAddress(0), REGION_BYTES as usize),
        (GuestAddress(REGION_BYTES), REGION_BYTES as usize),
    ])
    .expect("guest memory")
}

/// An image of `len` bytes, byte `i` being `i % 251`.
fn patterned_image(len: usize) -> (tempfile::NamedTempFile, Image) {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    file.write_all(&bytes).expect("fill image");
    let image = Image::open(file.path(), false).expect("open image");
    (file, image)
}

fn pattern_at(offset: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((offset as usize + i) % 251) as u8)
        .collect()
}

fn dirty(memory: &Memory, address: u64) -> bool {
    let (region, offset) = memory
        .to_region_addr(GuestAddress(address))
        .expect("address in guest memory");
    region.bitmap().dirty_at(offset.0 as usize)
}

/// Descriptors of a read: across the boundary between the regions (and so two mappings),
/// one inside a page, one across a page boundary, then the status byte.
const READ_DESCRIPTORS: [(u64, usize); 4] = [
    (REGION_BYTES - 0x600, 0x1000),
    (0x3000, 0x200),
    (REGION_BYTES + 0x1f00, 0x400),
    (0x5000, 1),
];

fn descriptors(list: &[(u64, usize)]) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
    list.iter()
        .map(|&(address, len)| (GuestAddress(address), len))
}

#[test]
fn a_read_lands_in_every_descriptor_and_marks_every_page_it_touched() {
    let memory = two_regions();
    let (_file, image) = patterned_image(1 << 20);
    let len = 0x1000 + 0x200 + 0x400;
    let mut buffers = GuestBuffers::new(
        &memory,
        descriptors(&READ_DESCRIPTORS),
        Permissions::Write,
        0,
        len,
    )
    .expect("buffers");
    assert_eq!(buffers.slice_count(), 4, "the region boundary splits one");
    assert_eq!(ReadTarget::len(&buffers), len);
    buffers.read_from(&image, 8192).expect("read");

    let mut expected = pattern_at(8192, len);
    for &(address, len) in &READ_DESCRIPTORS[..3] {
        let rest = expected.split_off(len);
        let mut landed = vec![0u8; len];
        memory
            .read_slice(&mut landed, GuestAddress(address))
            .expect("guest read");
        assert_eq!(landed, expected, "descriptor at {address:#x}");
        expected = rest;
    }
    let touched = [
        REGION_BYTES - 0x1000,
        REGION_BYTES,
        0x3000,
        REGION_BYTES + 0x1000,
        REGION_BYTES + 0x2000,
    ];
    for page in touched {
        assert!(dirty(&memory, page), "page {page:#x} not marked");
    }
    for page in [0u64, 0x4000, 0x5000, REGION_BYTES + 0x3000] {
        assert!(
            !dirty(&memory, page),
            "page {page:#x} marked, never written"
        );
    }
}

#[test]
fn a_write_takes_the_data_after_the_header_from_every_descriptor() {
    let memory = two_regions();
    let (file, image) = patterned_image(1 << 20);
    // The header's 16 bytes and the first 496 data bytes share a descriptor.
    let list = [
        (0x2000 - 16, 512),
        (REGION_BYTES - 0x100, 0x200),
        (0x8000, 0x200),
    ];
    let mut data = Vec::new();
    for (index, &(address, len)) in list.iter().enumerate() {
        let bytes = vec![index as u8 + 1; len];
        memory
            .write_slice(&bytes, GuestAddress(address))
            .expect("guest write");
        data.extend_from_slice(&bytes);
    }
    let data = data.split_off(16);
    let buffers = GuestBuffers::new(&memory, descriptors(&list), Permissions::Read, 16, 1024)
        .expect("buffers");
    assert_eq!(WriteSource::len(&buffers), 1024);
    buffers.write_to(&image, 4096).expect("write");
    let on_disk = std::fs::read(file.path()).expect("read image");
    assert_eq!(&on_disk[4096..4096 + 1024], &data[..1024]);
    assert_eq!(on_disk[4096 + 1024], pattern_at(4096 + 1024, 1)[0]);
    let buffers = GuestBuffers::new(&memory, descriptors(&list), Permissions::Read, 16, 1024)
        .expect("buffers");
    assert_eq!(
        buffers.into_bytes(),
        data[..1024],
        "the copy a mirror sends"
    );
}

#[test]
fn more_slices_than_iov_max_take_several_calls_and_all_land() {
    let memory = Memory::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("guest memory");
    let (_file, image) = patterned_image(2 << 20);
    // 2500 descriptors of one sector, each followed by a gap: 2500 iovecs.
    let list: Vec<(u64, usize)> = (0..2500).map(|i| (i * 1024, 512)).collect();
    let mut buffers = GuestBuffers::new(
        &memory,
        descriptors(&list),
        Permissions::Write,
        0,
        2500 * 512,
    )
    .expect("buffers");
    assert_eq!(buffers.slice_count(), 2500);
    buffers.read_from(&image, 512).expect("read");
    for (index, &(address, len)) in list.iter().enumerate() {
        let mut landed = vec![0u8; len];
        memory
            .read_slice(&mut landed, GuestAddress(address))
            .expect("guest read");
        assert_eq!(landed, pattern_at(512 + index as u64 * 512, len), "{index}");
        assert!(dirty(&memory, address));
    }
    assert!(
        !dirty(&memory, 2500 * 1024 + 4096),
        "past the last descriptor"
    );
}

#[test]
fn short_transfers_continue_where_they_stopped() {
    let memory = two_regions();
    let list: Vec<(u64, usize)> = (0..1500).map(|i| (i * 32, 32)).collect();
    let buffers = GuestBuffers::new(
        &memory,
        descriptors(&list),
        Permissions::Write,
        0,
        1500 * 32,
    )
    .expect("buffers");
    let base = memory
        .get_slice(GuestAddress(0), 1)
        .expect("slice")
        .ptr_guard()
        .as_ptr() as usize;
    let mut done = 0usize;
    let mut calls = 0;
    let mut marked = 0usize;
    buffers
        .transfer(
            |iovecs| {
                assert!(iovecs.len() <= MAX_IOVECS);
                // The first iovec starts where the previous call stopped.
                let expected = base + (done / 32) * 32 + done % 32;
                assert_eq!(iovecs[0].iov_base as usize, expected, "after {done} bytes");
                let offered: usize = iovecs.iter().map(|iovec| iovec.iov_len).sum();
                calls += 1;
                if calls % 3 == 0 {
                    return Err(io::Error::from(io::ErrorKind::Interrupted));
                }
                let count = offered.min(1000 + calls);
                done += count;
                Ok(count)
            },
            |slice, skip| marked += slice.len() - skip,
        )
        .expect("transfer");
    assert_eq!(done, 1500 * 32);
    assert!(calls > 48, "{calls} calls");
    assert!(marked >= done, "every byte offered is marked");
}

#[test]
fn a_call_that_does_nothing_is_the_end_of_the_image() {
    let memory = two_regions();
    let (_file, image) = patterned_image(8192);
    let mut buffers = GuestBuffers::new(
        &memory,
        descriptors(&[(0x1000, 0x2000)]),
        Permissions::Write,
        0,
        0x2000,
    )
    .expect("buffers");
    let error = buffers.read_from(&image, 4096).expect_err("past the end");
    assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    assert!(dirty(&memory, 0x1000), "the part that landed is marked");
}

#[test]
fn descriptors_outside_memory_or_too_short_are_refused() {
    let memory = two_regions();
    let outside = GuestBuffers::new(
        &memory,
        descriptors(&[(2 * REGION_BYTES - 0x100, 0x200)]),
        Permissions::Write,
        0,
        0x200,
    );
    assert!(matches!(outside, Err(GuestBufferError::OutsideMemory(_))));
    let short = GuestBuffers::new(
        &memory,
        descriptors(&[(0, 0x100), (0x1000, 0)]),
        Permissions::Read,
        16,
        0x100,
    );
    assert!(matches!(
        short,
        Err(GuestBufferError::Short {
            needed: 0x100,
            available: 0xf0
        })
    ));
}

#[test]
fn a_fill_from_the_peer_lands_across_slices_and_marks_them() {
    let memory = two_regions();
    let mut buffers = GuestBuffers::new(
        &memory,
        descriptors(&READ_DESCRIPTORS),
        Permissions::Write,
        0,
        0x1600,
    )
    .expect("buffers");
    buffers.fill_at(0x200, &[7u8; 0x1200]).expect("fill");
    let mut landed = vec![0u8; 0x800];
    memory
        .read_slice(&mut landed, GuestAddress(REGION_BYTES - 0x600))
        .expect("guest read");
    assert!(landed[..0x200].iter().all(|&byte| byte == 0));
    assert!(landed[0x200..].iter().all(|&byte| byte == 7));
    assert!(dirty(&memory, REGION_BYTES) && dirty(&memory, 0x3000));
    assert!(
        buffers.fill_at(0x1500, &[1u8; 0x200]).is_err(),
        "past the end"
    );
}

/// Guest memory whose file shrank under the mapping (a hostile frontend): `preadv` faults on
/// it, and that is the buffer's error, not the image's.
#[test]
fn a_fault_on_guest_memory_is_not_an_image_error() {
    let backing = tempfile::tempfile().expect("memory file");
    backing.set_len(0x4000).expect("size");
    let memory = Memory::from_ranges_with_files(&[(
        GuestAddress(0),
        0x4000,
        Some(FileOffset::new(backing.try_clone().expect("dup"), 0)),
    )])
    .expect("guest memory");
    backing.set_len(0x1000).expect("shrink");
    let (_file, image) = patterned_image(1 << 20);
    let mut buffers = GuestBuffers::new(
        &memory,
        descriptors(&[(0x2000, 0x1000)]),
        Permissions::Write,
        0,
        0x1000,
    )
    .expect("buffers");
    let error = buffers.read_from(&image, 0).expect_err("faults");
    assert!(buffer_fault(&error), "{error}");
}

#[test]
fn the_cursor_moves_over_slices() {
    let lengths = [10usize, 5, 20];
    let mut cursor = Cursor::default();
    cursor.advance(lengths, 3);
    assert_eq!(
        cursor,
        Cursor {
            slice: 0,
            within: 3
        }
    );
    cursor.advance(lengths, 7);
    assert_eq!(
        cursor,
        Cursor {
            slice: 1,
            within: 0
        }
    );
    cursor.advance(lengths, 9);
    assert_eq!(
        cursor,
        Cursor {
            slice: 2,
            within: 4
        }
    );
    cursor.advance(lengths, 16);
    assert_eq!(
        cursor,
        Cursor {
            slice: 3,
            within: 0
        }
    );
}
