//! Page codec throughput (`checkpoint::delta`) on realistic pages, per core, against a plain
//! copy of the same pages measured in the same run (the anchor).
//!
//! ```sh
//! cargo run --release -p checkpoint --example delta_bench [-- PAGES ROUNDS]
//! ```
//!
//! For each kind of page: the anchor (`copy_from_slice` of every page into a second buffer),
//! the encoder (`Encoder::encode` against the base), the sender's whole per-page path
//! (encode, append to a `PageBatch`, CRC32C of the page, copy into the shadow unless
//! unchanged), and the
//! decoder, each the median of ROUNDS interleaved runs over PAGES pages (default 8192 pages
//! = 32 MiB, 9 rounds). Prints GB/s of page bytes, the ratio to the anchor, and the wire size
//! as a share of the pages.

use std::hint::black_box;
use std::time::{Duration, Instant};

use checkpoint::delta::{decode, Encoder, Encoding, Page, PAGE_BYTES, ZERO_PAGE};
use checkpoint::wire::BatchBuilder;

/// xorshift bytes.
fn random_fill(seed: u64, output: &mut [u8]) {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in output.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Text-like: words from a small vocabulary, numbers, newlines (like kernel and program
/// text, logs, page cache of text files).
fn text_page(seed: u64, page: &mut Page) {
    const WORDS: [&str; 16] = [
        "the ",
        "kernel ",
        "page ",
        "struct ",
        "return ",
        "0x7ffd3a20 ",
        "error ",
        "value ",
        "if (",
        "NULL",
        ");\n",
        "int ",
        "static ",
        "buffer ",
        "= ",
        "memory ",
    ];
    let mut noise = [0u8; PAGE_BYTES];
    random_fill(seed, &mut noise);
    let mut position = 0;
    for choice in noise.iter().cycle() {
        if position >= PAGE_BYTES {
            break;
        }
        let word = WORDS[usize::from(*choice) % WORDS.len()].as_bytes();
        let length = word.len().min(PAGE_BYTES - position);
        page[position..position + length].copy_from_slice(&word[..length]);
        position += length;
    }
}

/// Mostly zero: a freshly used page with a few small structures written.
fn mostly_zero_page(seed: u64, page: &mut Page) {
    page.fill(0);
    for region in 0..3u64 {
        let start = ((seed * 7 + region * 1361) as usize * 8) % (PAGE_BYTES - 96);
        random_fill(seed * 3 + region, &mut page[start..start + 96]);
    }
}

/// A base page and the page as the guest left it.
struct Pages {
    name: &'static str,
    pages: Vec<Page>,
    bases: Vec<Page>,
}

fn build(count: usize) -> Vec<Pages> {
    let make = |name, fill: &dyn Fn(u64, &mut Page, &mut Page)| {
        let mut pages = vec![[0u8; PAGE_BYTES]; count];
        let mut bases = vec![[0u8; PAGE_BYTES]; count];
        for (index, (page, base)) in pages.iter_mut().zip(bases.iter_mut()).enumerate() {
            fill(index as u64 + 1, page, base);
        }
        Pages { name, pages, bases }
    };
    vec![
        make("unchanged (text)", &|seed, page, base| {
            text_page(seed, base);
            page.copy_from_slice(base);
        }),
        make("slightly changed (text, 1-4 words)", &|seed, page, base| {
            text_page(seed, base);
            page.copy_from_slice(base);
            for write in 0..=(seed % 4) {
                let offset = ((seed * 131 + write * 977) as usize * 8) % PAGE_BYTES;
                page[offset..offset + 8].copy_from_slice(&(seed ^ write).to_le_bytes());
            }
        }),
        make("mostly zero, full copy", &|seed, page, _| {
            mostly_zero_page(seed, page)
        }),
        make("cleared (was text)", &|seed, page, base| {
            text_page(seed, base);
            page.fill(0);
        }),
        make("text, full copy", &|seed, page, _| text_page(seed, page)),
        make("text rewritten (new text)", &|seed, page, base| {
            text_page(seed, base);
            text_page(seed + 1_000_000, page);
        }),
        make("random, full copy", &|seed, page, _| {
            random_fill(seed, page)
        }),
    ]
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn gigabytes_per_second(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e9
}

fn main() {
    let mut arguments = std::env::args().skip(1);
    let count: usize = arguments
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(8192);
    let rounds: usize = arguments.next().and_then(|a| a.parse().ok()).unwrap_or(9);
    let sets = build(count);
    let bytes = count * PAGE_BYTES;
    let mut copies = vec![[0u8; PAGE_BYTES]; count];
    let mut encoder = Encoder::new();
    println!(
        "{count} pages ({} MiB) per kind, median of {rounds} interleaved rounds, one core",
        bytes >> 20
    );
    println!(
        "{:<36} {:>9} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8} {:>7}",
        "pages",
        "copy GB/s",
        "enc GB/s",
        "enc/copy",
        "path GB/s",
        "path/copy",
        "dec GB/s",
        "dec/copy",
        "wire %"
    );
    let mut shadow = vec![[0u8; PAGE_BYTES]; count];
    for set in &sets {
        let mut wire = Vec::with_capacity(count);
        let (mut copy_times, mut encode_times, mut path_times, mut decode_times) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let start = Instant::now();
            for (copy, page) in copies.iter_mut().zip(&set.pages) {
                copy.copy_from_slice(black_box(page));
            }
            black_box(&mut copies);
            copy_times.push(start.elapsed());

            wire.clear();
            let start = Instant::now();
            let mut wire_bytes = 0usize;
            for (page, base) in set.pages.iter().zip(&set.bases) {
                let encoded = encoder.encode(black_box(page), base);
                wire_bytes += encoded.bytes.len() + 11;
                black_box(encoded);
            }
            encode_times.push(start.elapsed());
            black_box(wire_bytes);

            for (target, base) in shadow.iter_mut().zip(&set.bases) {
                target.copy_from_slice(base);
            }
            let mut batch = BatchBuilder::new();
            let mut crc = 0u32;
            let start = Instant::now();
            for (index, (page, target)) in set.pages.iter().zip(shadow.iter_mut()).enumerate() {
                let encoded = encoder.encode(black_box(page), target);
                let changed = encoded.encoding != Encoding::Same;
                if !batch.has_room(&encoded) {
                    black_box(batch.take(1));
                }
                batch.push(index as u64, &encoded);
                crc = crc32c::crc32c_append(crc, &(index as u64).to_le_bytes());
                crc = crc32c::crc32c_append(crc, page);
                if changed {
                    target.copy_from_slice(page);
                }
            }
            black_box(batch.take(1));
            path_times.push(start.elapsed());
            black_box(crc);

            // Decode input, prepared outside the timed loop.
            for (page, base) in set.pages.iter().zip(&set.bases) {
                let encoded = encoder.encode(page, base);
                wire.push((encoded.encoding, encoded.bytes.to_vec()));
            }
            let start = Instant::now();
            for ((encoding, encoded), (base, copy)) in
                wire.iter().zip(set.bases.iter().zip(copies.iter_mut()))
            {
                if decode(*encoding, encoded, base, copy).is_err() {
                    panic!("{}: a page does not decode", set.name);
                }
            }
            decode_times.push(start.elapsed());
            if copies != set.pages {
                panic!("{}: decoded pages differ", set.name);
            }
        }
        let wire_bytes: usize = wire.iter().map(|(_, bytes)| bytes.len() + 11).sum();
        let copy = gigabytes_per_second(bytes, median(copy_times));
        let encode = gigabytes_per_second(bytes, median(encode_times));
        let path = gigabytes_per_second(bytes, median(path_times));
        let decode = gigabytes_per_second(bytes, median(decode_times));
        println!(
            "{:<36} {:>9.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>8.2} {:>8.2} {:>6.1}%",
            set.name,
            copy,
            encode,
            encode / copy,
            path,
            path / copy,
            decode,
            decode / copy,
            100.0 * wire_bytes as f64 / bytes as f64
        );
    }
    black_box(&ZERO_PAGE);
}
