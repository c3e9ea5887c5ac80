//! The A-links' cipher on its own: GB/s per core of AES-256-GCM (`ring`, what every frame
//! after the handshake is sealed with) sealing and opening in place; of the tag alone that
//! frames carry with encryption off (GMAC: AES-256-GCM with the body as additional data and
//! nothing encrypted); and of the keyed BLAKE3 MAC that protocol version 1 used.
//!
//! `cargo run --release -p replication-link --example cipher [SECONDS]`
//!
//! One thread, buffers of 4 KiB, 64 KiB and 1 MiB (a 4k write, a resync block, a large
//! write), SECONDS per figure (default 1). Prints a markdown table.

use std::hint::black_box;
use std::time::{Duration, Instant};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

/// Runs `operation` on a buffer of `size` bytes for `seconds`; returns GB/s.
fn rate(size: usize, seconds: f64, mut operation: impl FnMut(u64, &mut [u8])) -> f64 {
    let mut buffer = vec![0x5a; size];
    let deadline = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut rounds = 0u64;
    while started.elapsed() < deadline {
        operation(rounds, &mut buffer);
        rounds += 1;
    }
    (rounds as f64 * size as f64) / started.elapsed().as_secs_f64() / 1e9
}

fn nonce(counter: u64) -> Nonce {
    let mut bytes = [0u8; NONCE_LEN];
    for (target, source) in bytes.iter_mut().skip(4).zip(counter.to_le_bytes()) {
        *target = source;
    }
    Nonce::assume_unique_for_key(bytes)
}

fn main() {
    let seconds = std::env::args()
        .nth(1)
        .and_then(|text| text.parse().ok())
        .unwrap_or(1.0);
    let key = UnboundKey::new(&AES_256_GCM, &[7; 32]).expect("a 32-byte key");
    let key = LessSafeKey::new(key);
    let mac_key = [7u8; 32];
    println!(
        "| buffer | AES-256-GCM seal GB/s | AES-256-GCM open GB/s | GMAC, encryption off \
         (seal = open) GB/s | BLAKE3 keyed MAC (v1) GB/s |"
    );
    println!("|---:|---:|---:|---:|---:|");
    for size in [4096, 64 << 10, 1 << 20] {
        let seal = rate(size, seconds, |counter, buffer| {
            let tag = key.seal_in_place_separate_tag(nonce(counter), Aad::from([0u8; 4]), buffer);
            let _ = black_box(tag.expect("seal"));
        });
        // Opening checks the tag first; a wrong tag still costs the full pass, as a real
        // open does, so the figure is the open's cost.
        let tag = [0u8; 16];
        let open = rate(size, seconds, |counter, buffer| {
            let result = key.open_in_place_separate_tag(
                nonce(counter),
                Aad::from([0u8; 4]),
                tag.into(),
                buffer,
                0..,
            );
            let _ = black_box(result);
        });
        // Encryption off: the buffer as additional data, nothing encrypted.
        let gmac = rate(size, seconds, |counter, buffer| {
            let tag = key.seal_in_place_separate_tag(nonce(counter), Aad::from(&*buffer), &mut []);
            let _ = black_box(tag.expect("seal"));
        });
        let mac = rate(size, seconds, |counter, buffer| {
            let mut hasher = blake3::Hasher::new_keyed(&mac_key);
            hasher.update(&counter.to_le_bytes());
            hasher.update(buffer);
            black_box(hasher.finalize());
        });
        let label = if size >= 1 << 20 {
            format!("{} MiB", size >> 20)
        } else {
            format!("{} KiB", size >> 10)
        };
        println!("| {label} | {seal:.2} | {open:.2} | {gmac:.2} | {mac:.2} |");
    }
}
