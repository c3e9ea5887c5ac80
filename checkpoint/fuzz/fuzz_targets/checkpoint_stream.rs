//! Fuzz target: what the secondary's engine decodes from the primary's bytes
//! (`checkpoint::wire` messages and batch entries, `checkpoint::delta` pages), and the page
//! codec's round trip.
//!
//! `cd checkpoint/fuzz && cargo +nightly fuzz run checkpoint_stream` (see README.md).
//!
//! Every input is a structured [`Input`] built by `arbitrary`:
//! - a link message as the peer sent it (header and payload bytes, a RAM size): decoding
//!   must not panic; a decoded message re-encodes to a header that decodes to the same
//!   message; every entry of a decoded batch names a page inside the RAM with a length its
//!   encoding allows, and decodes (or fails) without a panic;
//! - an encoded page as the peer sent it: decoding fails or yields a whole page, never a
//!   panic;
//! - a page the guest changed (a base of some kind and writes at chosen offsets): the
//!   encoding decodes to exactly the page, `Same` exactly when nothing changed, and is never
//!   longer than a page;
//! - an encoded device state as the peer sent it (`checkpoint::state_delta`, any encoding,
//!   bytes, announced length and base): decoding fails or yields exactly the announced
//!   length, never a panic;
//! - a device state changed from its base (resized, writes at chosen offsets): encoded with
//!   and without the base, it decodes to exactly the state and is never longer than it.
#![no_main]

use arbitrary::Arbitrary;
use checkpoint::delta::{decode, Encoder, Encoding, Page, PAGE_BYTES, ZERO_PAGE};
use checkpoint::state_delta::{self, StateEncoder, StateEncoding};
use checkpoint::wire::{BatchEntries, Message};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Base {
    Zero,
    Pattern(u8),
    Seeded(u64),
}

#[derive(Debug, Arbitrary)]
enum Input {
    Message {
        header: Vec<u8>,
        payload: Vec<u8>,
        ram_pages: u16,
    },
    Encoded {
        encoding: u8,
        bytes: Vec<u8>,
        base: Base,
    },
    Changed {
        base: Base,
        writes: Vec<(u16, Vec<u8>)>,
    },
    EncodedState {
        encoding: u8,
        base_epoch: u64,
        wire: Vec<u8>,
        state_len: u16,
        base: Vec<u8>,
    },
    ChangedState {
        base: Vec<u8>,
        length: u16,
        writes: Vec<(u16, Vec<u8>)>,
    },
}

fn state_encoding(byte: u8, base_epoch: u64) -> StateEncoding {
    match byte % 3 {
        0 => StateEncoding::Raw,
        1 => StateEncoding::Lz4,
        _ => StateEncoding::XorLz4 { base_epoch },
    }
}

fn check_changed_state(base: &[u8], length: u16, writes: &[(u16, Vec<u8>)]) {
    let length = usize::from(length);
    let mut state = base.to_vec();
    state.resize(length, 0);
    for (offset, bytes) in writes {
        if length == 0 {
            break;
        }
        let start = usize::from(*offset) % length;
        let count = bytes.len().min(length - start);
        state[start..start + count].copy_from_slice(&bytes[..count]);
    }
    let mut encoder = StateEncoder::new();
    for with_base in [Some((7, base)), None] {
        let (encoding, wire) = encoder.encode(&state, with_base);
        assert!(wire.len() <= state.len());
        assert!(encoding.wire_len_allowed(wire.len() as u64, state.len() as u64));
        let mut output = Vec::new();
        state_delta::decode(encoding, wire, length, Some(base), &mut output)
            .expect("own encoding decodes");
        assert!(output == state, "{encoding:?} does not round-trip");
    }
}

fn base_page(base: &Base) -> Box<Page> {
    let mut page = Box::new([0u8; PAGE_BYTES]);
    match base {
        Base::Zero => {}
        Base::Pattern(byte) => page.fill(*byte),
        Base::Seeded(seed) => {
            let mut state = seed | 1;
            for byte in page.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = (state >> 32) as u8;
            }
        }
    }
    page
}

fn check_message(header: &[u8], payload: &[u8], ram_pages: u64) {
    let Ok(message) = Message::decode(header, payload) else {
        return;
    };
    let encoded = message.encode().expect("a decoded message encodes");
    assert_eq!(
        Message::decode(&encoded, payload).expect("re-decodes"),
        message
    );
    if let Message::PageBatch { entries, .. } = message {
        let mut output = [0u8; PAGE_BYTES];
        for entry in BatchEntries::new(payload, entries, ram_pages) {
            let Ok(entry) = entry else { break };
            assert!(entry.index < ram_pages);
            assert!(entry.encoding.length_allowed(entry.bytes.len()));
            let _ = decode(entry.encoding, entry.bytes, &ZERO_PAGE, &mut output);
        }
    }
}

fn check_changed(base: &Base, writes: &[(u16, Vec<u8>)]) {
    let base = base_page(base);
    let mut page = base.clone();
    for (offset, bytes) in writes {
        let start = usize::from(*offset) % PAGE_BYTES;
        let length = bytes.len().min(PAGE_BYTES - start);
        page[start..start + length].copy_from_slice(&bytes[..length]);
    }
    let mut encoder = Encoder::new();
    let encoded = encoder.encode(&page, &base);
    assert_eq!(encoded.encoding == Encoding::Same, page == base);
    assert!(encoded.encoding.length_allowed(encoded.bytes.len()));
    let mut output = [0xa5u8; PAGE_BYTES];
    decode(encoded.encoding, encoded.bytes, &base, &mut output).expect("own encoding decodes");
    assert!(
        output == *page,
        "{:?} does not round-trip",
        encoded.encoding
    );
}

fuzz_target!(|input: Input| {
    match input {
        Input::Message {
            header,
            payload,
            ram_pages,
        } => check_message(&header, &payload, u64::from(ram_pages).max(1)),
        Input::Encoded {
            encoding,
            bytes,
            base,
        } => {
            if let Ok(encoding) = Encoding::from_byte(encoding) {
                let mut output = [0u8; PAGE_BYTES];
                let _ = decode(encoding, &bytes, &base_page(&base), &mut output);
            }
        }
        Input::Changed { base, writes } => check_changed(&base, &writes),
        Input::EncodedState {
            encoding,
            base_epoch,
            wire,
            state_len,
            base,
        } => {
            let encoding = state_encoding(encoding, base_epoch);
            let state_len = usize::from(state_len);
            let mut output = Vec::new();
            if state_delta::decode(encoding, &wire, state_len, Some(&base), &mut output).is_ok() {
                assert_eq!(output.len(), state_len);
            }
        }
        Input::ChangedState {
            base,
            length,
            writes,
        } => check_changed_state(&base, length, &writes),
    }
});
