//! A stand-in for QEMU in the tracking tests: maps a file shared (as QEMU maps guest RAM)
//! and writes pages when told, so that a test can preload `libftvm_ram_track.so` into it
//! and check that `PAGEMAP_SCAN` sees exactly those writes.
//!
//! Usage: `ftvm-ram-track-test-writer PATH BYTES`. Creates PATH if needed, sizes it, maps
//! it and prints `mapped 0xADDRESS 0xBYTES`; then reads commands from stdin: `write PAGE
//! [STEP COUNT]` (adds one to the first byte of page PAGE, or of COUNT pages from PAGE on,
//! STEP apart; answers `written N` with the number of pages written), `read PAGE` (the
//! kernel writes 64 bytes of `/dev/urandom` into page PAGE with read(2), as QEMU's block
//! layer reads into guest RAM; answers `read PAGE`) and `quit`. Anything else is answered
//! with `error TEXT`.

use std::io::{BufRead, Write};
use std::os::fd::AsRawFd;

const PAGE_BYTES: usize = 4096;

fn main() {
    if let Err(error) = run() {
        eprintln!("ftvm-ram-track-test-writer: {error}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(bytes), None) = (args.next(), args.next(), args.next()) else {
        return Err("usage: ftvm-ram-track-test-writer PATH BYTES".into());
    };
    let bytes: usize = bytes.parse().map_err(|_| format!("bad size {bytes:?}"))?;
    if bytes == 0 || !bytes.is_multiple_of(PAGE_BYTES) {
        return Err("the size must be a positive multiple of 4096".into());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|error| format!("{path}: {error}"))?;
    file.set_len(bytes as u64)
        .map_err(|error| format!("{path}: {error}"))?;
    // SAFETY: a new shared mapping chosen by the kernel (null hint), of a file we hold open
    // and sized to `bytes`; it overlaps nothing of ours and is never unmapped, so the
    // pointer stays valid for the life of the process.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(format!("mmap: {}", std::io::Error::last_os_error()));
    }
    let base = base.cast::<u8>();
    let mut out = std::io::stdout().lock();
    let say = |out: &mut std::io::StdoutLock, line: String| {
        writeln!(out, "{line}").and_then(|()| out.flush())
    };
    say(&mut out, format!("mapped {:#x} {bytes:#x}", base as usize)).map_err(|e| e.to_string())?;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|error| error.to_string())?;
        let reply = match line.split_once(' ') {
            Some(("write", arguments)) => match pages(arguments, bytes / PAGE_BYTES) {
                Some(pages) => {
                    for page in &pages {
                        // SAFETY: `pages` checked every page to be below `bytes /
                        // PAGE_BYTES`, so the byte is inside the `bytes`-long mapping made
                        // above, which is readable and writable; volatile so that the write
                        // happens exactly once, when told.
                        unsafe {
                            let byte = base.add(page * PAGE_BYTES);
                            byte.write_volatile(byte.read_volatile().wrapping_add(1));
                        }
                    }
                    format!("written {}", pages.len())
                }
                None => format!("error bad pages {arguments:?}"),
            },
            Some(("read", page)) => match page.parse::<usize>() {
                Ok(page) if page < bytes / PAGE_BYTES => {
                    let random = std::fs::File::open("/dev/urandom")
                        .map_err(|error| format!("/dev/urandom: {error}"))?;
                    // SAFETY: read(2) writes at most 64 bytes at the start of page `page`,
                    // which is inside the `bytes`-long readable and writable mapping made
                    // above (`page` was checked against the page count).
                    let read = unsafe {
                        libc::read(random.as_raw_fd(), base.add(page * PAGE_BYTES).cast(), 64)
                    };
                    if read == 64 {
                        format!("read {page}")
                    } else {
                        format!("error read: {}", std::io::Error::last_os_error())
                    }
                }
                _ => format!("error no page {page:?}"),
            },
            None if line == "quit" => return Ok(()),
            _ => format!("error unknown command {line:?}"),
        };
        say(&mut out, reply).map_err(|error| error.to_string())?;
    }
    Ok(())
}

/// `PAGE` or `FIRST STEP COUNT`: the page numbers, each below `page_count`.
fn pages(arguments: &str, page_count: usize) -> Option<Vec<usize>> {
    let numbers: Vec<usize> = arguments
        .split(' ')
        .map(|word| word.parse().ok())
        .collect::<Option<_>>()?;
    let (first, step, count) = match numbers.as_slice() {
        [page] => (*page, 1, 1),
        [first, step, count] if *step > 0 => (*first, *step, *count),
        _ => return None,
    };
    let last = step
        .checked_mul(count.checked_sub(1)?)?
        .checked_add(first)?;
    (last < page_count).then(|| (0..count).map(|index| first + index * step).collect())
}
