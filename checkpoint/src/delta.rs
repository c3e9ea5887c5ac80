//! The page codec: a 4 KiB guest page as sent to the replica.
//!
//! The primary encodes each page against its *shadow*, its copy of what the replica holds for
//! that page (the *base*; all zeros in a full copy). The replica decodes against the same
//! base, its own current page, so both sides always hold the same bytes:
//!
//! | encoding | bytes | page = |
//! |---|---|---|
//! | [`Encoding::Same`] | none | the base (page unchanged) |
//! | [`Encoding::Zero`] | none | all zeros (the guest cleared a page that had content) |
//! | [`Encoding::XorSparse`] | runs of non-zero 8-byte words of `page XOR base` | base XOR runs |
//! | [`Encoding::XorLz4`] | LZ4 block of `page XOR base`, 1 to 4095 bytes | base XOR decompressed |
//! | [`Encoding::Raw`] | the page itself, 4096 bytes | the bytes |
//!
//! The encoder XORs the page with its base in one pass that also counts the non-zero words.
//! Few changed words (at most [`SPARSE_MAX_WORDS`], the common case of an epoch: a page
//! with a counter, a list link or a few fields rewritten, or a mostly-empty page in a full
//! copy) go as `XorSparse`: a list of runs, each `first_word u16 LE | words u16 LE |
//! words × 8 bytes`, in increasing order, not overlapping. It costs one more pass over the
//! XOR and is several times faster than LZ4 on both ends. Otherwise the XOR goes through
//! LZ4, used only when it is smaller than the page; else the page goes raw (so a raw page
//! never depends on the base).
//!
//! Decoding is strict: a page is exactly 4096 bytes, an LZ4 block must decompress to exactly
//! 4096 bytes into a fixed buffer, sparse runs must lie inside the page in order and use
//! every byte; any other length or a malformed block is a [`DeltaError`]; nothing is
//! allocated from what the peer says.
//!
//! `lz4_flex` runs with its default, safe features (the unsafe ones decode zero-heavy pages
//! about 100 times slower, `../shared/DESIGN.md`). `examples/delta_bench.rs` measures the
//! encoder against a plain copy of the same pages.

use lz4_flex::block::CompressTable;
use lz4_flex::block::{compress_into_with_table, decompress_into, get_maximum_output_size};

/// Size of a guest page, in bytes (the only page size of the protocol).
pub const PAGE_BYTES: usize = 4096;

/// One guest page.
pub type Page = [u8; PAGE_BYTES];

/// The all-zero page: the base of every page in a full copy.
pub static ZERO_PAGE: Page = [0; PAGE_BYTES];

/// Largest LZ4 output for one page (the compressor needs this much room).
const LZ4_BOUND_BYTES: usize = get_maximum_output_size(PAGE_BYTES);
/// 8-byte words in a page.
const PAGE_WORDS: usize = PAGE_BYTES / 8;
/// Bytes of a sparse run's header (first word, word count).
const RUN_HEADER_BYTES: usize = 4;
/// Most changed words sent as [`Encoding::XorSparse`] (at most 1.5 KiB encoded); beyond,
/// LZ4 usually wins on size.
pub const SPARSE_MAX_WORDS: usize = 128;

/// How a page is encoded. The discriminants are the wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Encoding {
    /// The page equals its base.
    Same = 0,
    /// The page is all zeros.
    Zero = 1,
    /// The page itself, 4096 bytes.
    Raw = 2,
    /// LZ4 block of the page XOR its base, shorter than a page.
    XorLz4 = 3,
    /// Runs of non-zero words of the page XOR its base.
    XorSparse = 4,
}

impl Encoding {
    /// The encoding a wire byte names.
    pub fn from_byte(byte: u8) -> Result<Encoding, DeltaError> {
        match byte {
            0 => Ok(Encoding::Same),
            1 => Ok(Encoding::Zero),
            2 => Ok(Encoding::Raw),
            3 => Ok(Encoding::XorLz4),
            4 => Ok(Encoding::XorSparse),
            other => Err(DeltaError::UnknownEncoding { byte: other }),
        }
    }

    pub fn as_byte(self) -> u8 {
        self as u8
    }

    /// Whether `length` encoded bytes are possible for this encoding.
    pub fn length_allowed(self, length: usize) -> bool {
        match self {
            Encoding::Same | Encoding::Zero => length == 0,
            Encoding::Raw => length == PAGE_BYTES,
            Encoding::XorLz4 => length > 0 && length < PAGE_BYTES,
            Encoding::XorSparse => (RUN_HEADER_BYTES + 8..PAGE_BYTES).contains(&length),
        }
    }
}

/// Errors of this module: the encoded bytes do not describe a page.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    #[error("unknown page encoding {byte}")]
    UnknownEncoding { byte: u8 },
    #[error("{length} bytes are not a valid {encoding:?} page")]
    Length { encoding: Encoding, length: usize },
    #[error("malformed LZ4 block")]
    Lz4,
    #[error("LZ4 block decodes to {length} bytes instead of a page")]
    DecodedLength { length: usize },
    #[error("sparse run at byte {position} is malformed or out of the page")]
    SparseRun { position: usize },
}

/// A page as encoded: what goes on the wire. `bytes` borrows the encoder's buffer or the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Encoded<'a> {
    pub encoding: Encoding,
    pub bytes: &'a [u8],
}

/// Encodes pages; keeps the LZ4 hash table and the scratch buffers between pages, so
/// encoding allocates nothing. One per encoding thread.
pub struct Encoder {
    table: CompressTable,
    xor: Box<Page>,
    output: Box<[u8; LZ4_BOUND_BYTES]>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Encoder").finish_non_exhaustive()
    }
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    pub fn new() -> Encoder {
        Encoder {
            table: CompressTable::small(),
            xor: Box::new([0; PAGE_BYTES]),
            output: Box::new([0; LZ4_BOUND_BYTES]),
        }
    }

    /// Encodes `page` against `base` (the replica's copy of it).
    pub fn encode<'a>(&'a mut self, page: &'a Page, base: &Page) -> Encoded<'a> {
        if page == base {
            return Encoded {
                encoding: Encoding::Same,
                bytes: &[],
            };
        }
        let (page_nonzero, changed_words) = xor_into(page, base, &mut self.xor);
        if !page_nonzero {
            return Encoded {
                encoding: Encoding::Zero,
                bytes: &[],
            };
        }
        if changed_words <= SPARSE_MAX_WORDS {
            if let Some(length) = encode_sparse(&self.xor, &mut self.output[..]) {
                return Encoded {
                    encoding: Encoding::XorSparse,
                    bytes: self.output.get(..length).unwrap_or(&[]),
                };
            }
        }
        let raw = Encoded {
            encoding: Encoding::Raw,
            bytes: page,
        };
        // The output buffer has the compressor's bound, so it cannot run out of room; an
        // error would be a bug in the compressor and the raw page is always correct.
        match compress_into_with_table(&self.xor[..], &mut self.output[..], &mut self.table) {
            Ok(length) if length < PAGE_BYTES => Encoded {
                encoding: Encoding::XorLz4,
                bytes: self.output.get(..length).unwrap_or(page),
            },
            Ok(_) | Err(_) => raw,
        }
    }
}

/// `output = page XOR base`; returns whether `page` has a non-zero byte and how many
/// 8-byte words of the XOR are non-zero. One pass (the compiler vectorises it).
fn xor_into(page: &Page, base: &Page, output: &mut Page) -> (bool, usize) {
    let mut page_bits = 0u64;
    let mut changed_words = 0usize;
    for ((out, page_word), base_word) in output
        .chunks_exact_mut(8)
        .zip(page.chunks_exact(8))
        .zip(base.chunks_exact(8))
    {
        let page_word = word(page_word);
        let xor = page_word ^ word(base_word);
        page_bits |= page_word;
        changed_words += usize::from(xor != 0);
        out.copy_from_slice(&xor.to_ne_bytes());
    }
    (page_bits != 0, changed_words)
}

/// Writes the runs of non-zero words of `xor` to `output`; returns the length, or `None`
/// if they do not fit (they always do for [`SPARSE_MAX_WORDS`] words in the encoder's
/// buffer) or do not make a valid sparse page.
fn encode_sparse(xor: &Page, output: &mut [u8]) -> Option<usize> {
    let mut length = 0;
    let mut index = 0;
    let word_at = |index: usize| word(&xor[index * 8..index * 8 + 8]);
    while index < PAGE_WORDS {
        if word_at(index) == 0 {
            index += 1;
            continue;
        }
        let first = index;
        while index < PAGE_WORDS && word_at(index) != 0 {
            index += 1;
        }
        let bytes = &xor[first * 8..index * 8];
        let run = output.get_mut(length..length + RUN_HEADER_BYTES + bytes.len())?;
        run[..2].copy_from_slice(&(first as u16).to_le_bytes());
        run[2..4].copy_from_slice(&((index - first) as u16).to_le_bytes());
        run[RUN_HEADER_BYTES..].copy_from_slice(bytes);
        length += run.len();
    }
    Encoding::XorSparse.length_allowed(length).then_some(length)
}

/// XORs the runs in `bytes` into `output` (which holds the base).
fn decode_sparse(bytes: &[u8], output: &mut Page) -> Result<(), DeltaError> {
    let mut position = 0;
    let mut next_word = 0;
    while position < bytes.len() {
        let error = DeltaError::SparseRun { position };
        let header = bytes
            .get(position..position + RUN_HEADER_BYTES)
            .ok_or(error)?;
        let first = usize::from(u16::from_le_bytes([header[0], header[1]]));
        let count = usize::from(u16::from_le_bytes([header[2], header[3]]));
        let end = first + count;
        if count == 0 || first < next_word || end > PAGE_WORDS {
            return Err(DeltaError::SparseRun { position });
        }
        let start = position + RUN_HEADER_BYTES;
        let run = bytes
            .get(start..start + count * 8)
            .ok_or(DeltaError::SparseRun { position })?;
        for (out, xor) in output[first * 8..end * 8].iter_mut().zip(run) {
            *out ^= xor;
        }
        position = start + run.len();
        next_word = end;
    }
    Ok(())
}

fn word(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(bytes);
    u64::from_ne_bytes(word)
}

/// Decodes one page into `output` against `base`. `output` is fully written on success and
/// unspecified on error.
pub fn decode(
    encoding: Encoding,
    bytes: &[u8],
    base: &Page,
    output: &mut Page,
) -> Result<(), DeltaError> {
    if !encoding.length_allowed(bytes.len()) {
        return Err(DeltaError::Length {
            encoding,
            length: bytes.len(),
        });
    }
    match encoding {
        Encoding::Same => output.copy_from_slice(base),
        Encoding::Zero => output.fill(0),
        Encoding::Raw => output.copy_from_slice(bytes),
        Encoding::XorLz4 => {
            let length = decompress_into(bytes, &mut output[..]).map_err(|_| DeltaError::Lz4)?;
            if length != PAGE_BYTES {
                return Err(DeltaError::DecodedLength { length });
            }
            for (out, base_byte) in output.iter_mut().zip(base.iter()) {
                *out ^= base_byte;
            }
        }
        Encoding::XorSparse => {
            output.copy_from_slice(base);
            decode_sparse(bytes, output)?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (xorshift), for test and bench pages.
    pub(crate) fn random_bytes(seed: u64, output: &mut [u8]) {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for byte in output.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = (state >> 24) as u8;
        }
    }

    fn text_page(seed: u64) -> Box<Page> {
        let words = [
            "the ", "page ", "of ", "guest ", "memory ", "kernel ", "buffer ", "0x7f3a ",
        ];
        let mut page = Box::new([0u8; PAGE_BYTES]);
        let mut noise = [0u8; PAGE_BYTES];
        random_bytes(seed, &mut noise);
        let mut position = 0;
        let mut pick = 0;
        while position < PAGE_BYTES {
            let word = words[noise[pick % PAGE_BYTES] as usize % words.len()].as_bytes();
            let length = word.len().min(PAGE_BYTES - position);
            page[position..position + length].copy_from_slice(&word[..length]);
            position += length;
            pick += 1;
        }
        page
    }

    fn round_trip(page: &Page, base: &Page) -> Encoding {
        let mut encoder = Encoder::new();
        let encoded = encoder.encode(page, base);
        let encoding = encoded.encoding;
        let mut output = [0xa5u8; PAGE_BYTES];
        decode(encoding, encoded.bytes, base, &mut output).expect("decodes");
        assert!(output == *page, "{encoding:?} round trip differs");
        encoding
    }

    #[test]
    fn unchanged_page_is_same() {
        let page = text_page(1);
        assert_eq!(round_trip(&page, &page.clone()), Encoding::Same);
        assert_eq!(round_trip(&ZERO_PAGE, &ZERO_PAGE), Encoding::Same);
    }

    #[test]
    fn cleared_page_is_zero() {
        assert_eq!(round_trip(&ZERO_PAGE, &text_page(2)), Encoding::Zero);
    }

    #[test]
    fn slightly_changed_page_is_sparse() {
        let base = text_page(3);
        let mut page = base.clone();
        page[100..108].copy_from_slice(b"changed!");
        page[3000] ^= 0xff;
        let mut encoder = Encoder::new();
        let encoded = encoder.encode(&page, &base);
        assert_eq!(encoded.encoding, Encoding::XorSparse);
        // Bytes 96..112 (two words) and word 375: two runs.
        assert_eq!(encoded.bytes.len(), 4 + 16 + 4 + 8);
        assert_eq!(round_trip(&page, &base), Encoding::XorSparse);
    }

    #[test]
    fn sparse_runs_at_the_edges_and_at_the_limit_round_trip() {
        let base = text_page(10);
        let mut page = base.clone();
        page[0] ^= 1;
        page[PAGE_BYTES - 1] ^= 1;
        assert_eq!(round_trip(&page, &base), Encoding::XorSparse);
        // Every other word changed: SPARSE_MAX_WORDS runs of one word.
        let mut page = base.clone();
        for word in 0..SPARSE_MAX_WORDS {
            page[word * 16] ^= 0x80;
        }
        assert_eq!(round_trip(&page, &base), Encoding::XorSparse);
        // One word more: LZ4 (or raw).
        page[SPARSE_MAX_WORDS * 16] ^= 0x80;
        assert_ne!(round_trip(&page, &base), Encoding::XorSparse);
        // All changed in one place.
        let mut page = base.clone();
        page[1024..1024 + SPARSE_MAX_WORDS * 8].fill(0x55);
        assert_eq!(round_trip(&page, &base), Encoding::XorSparse);
    }

    #[test]
    fn hostile_sparse_runs_are_errors() {
        let base = text_page(11);
        let mut output = [0u8; PAGE_BYTES];
        let run = |first: u16, words: u16| {
            let mut bytes = first.to_le_bytes().to_vec();
            bytes.extend_from_slice(&words.to_le_bytes());
            bytes.extend(std::iter::repeat_n(0xa5, usize::from(words) * 8));
            bytes
        };
        let ok = [run(0, 1), run(5, 2)].concat();
        assert_eq!(decode(Encoding::XorSparse, &ok, &base, &mut output), Ok(()));
        let cases: Vec<Vec<u8>> = vec![
            run(511, 2),                                // past the page
            [run(5, 2), run(6, 1)].concat(),            // overlapping
            [run(5, 2), run(1, 1)].concat(),            // out of order
            [run(0, 1), run(3, 0), run(4, 1)].concat(), // empty run
            [run(0, 1), vec![7, 0]].concat(),           // truncated header
            {
                let mut bytes = run(0, 2);
                bytes.pop();
                bytes
            }, // truncated run
        ];
        for (case, bytes) in cases.iter().enumerate() {
            assert!(
                matches!(
                    decode(Encoding::XorSparse, bytes, &base, &mut output),
                    Err(DeltaError::SparseRun { .. })
                ),
                "case {case} decoded"
            );
        }
        assert!(decode(Encoding::XorSparse, &run(0, 512), &base, &mut output).is_err());
    }

    #[test]
    fn text_against_zero_base_compresses() {
        assert_eq!(round_trip(&text_page(4), &ZERO_PAGE), Encoding::XorLz4);
    }

    #[test]
    fn random_page_goes_raw() {
        let mut page = Box::new([0u8; PAGE_BYTES]);
        random_bytes(5, &mut page[..]);
        assert_eq!(round_trip(&page, &text_page(6)), Encoding::Raw);
        assert_eq!(round_trip(&page, &ZERO_PAGE), Encoding::Raw);
    }

    #[test]
    fn wrong_lengths_are_refused() {
        let base = text_page(7);
        let mut output = [0u8; PAGE_BYTES];
        let cases: [(Encoding, usize); 6] = [
            (Encoding::Same, 1),
            (Encoding::Zero, 4096),
            (Encoding::Raw, 4095),
            (Encoding::Raw, 4097),
            (Encoding::XorLz4, 0),
            (Encoding::XorLz4, 4096),
        ];
        for (encoding, length) in cases {
            let bytes = vec![0u8; length];
            assert_eq!(
                decode(encoding, &bytes, &base, &mut output),
                Err(DeltaError::Length { encoding, length })
            );
        }
        assert!(Encoding::from_byte(5).is_err());
        assert_eq!(Encoding::from_byte(3), Ok(Encoding::XorLz4));
    }

    #[test]
    fn truncated_or_corrupt_lz4_is_an_error() {
        let base = ZERO_PAGE;
        let page = text_page(8);
        let mut encoder = Encoder::new();
        let bytes = encoder.encode(&page, &base).bytes.to_vec();
        let mut output = [0u8; PAGE_BYTES];
        for cut in 1..bytes.len() {
            assert!(
                decode(Encoding::XorLz4, &bytes[..cut], &base, &mut output).is_err(),
                "truncated at {cut} decoded"
            );
        }
        // A block that decodes to less than a page: "ab" as literals only.
        let short = [0x20, b'a', b'b'];
        assert_eq!(
            decode(Encoding::XorLz4, &short, &base, &mut output),
            Err(DeltaError::DecodedLength { length: 2 })
        );
        // A block that would decode to more than a page: a long run of zeros.
        let long = lz4_flex::block::compress(&[0u8; 2 * PAGE_BYTES]);
        assert!(decode(Encoding::XorLz4, &long, &base, &mut output).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        let base = text_page(9);
        let mut output = [0u8; PAGE_BYTES];
        let mut bytes = vec![0u8; 4095];
        for seed in 0..2000u64 {
            let length = 1 + (seed as usize * 7919) % 4095;
            random_bytes(seed, &mut bytes[..length]);
            let _ = decode(Encoding::XorLz4, &bytes[..length], &base, &mut output);
            let _ = decode(Encoding::XorSparse, &bytes[..length], &base, &mut output);
        }
    }
}
