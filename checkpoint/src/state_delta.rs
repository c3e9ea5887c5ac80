//! The device-state codec: QEMU's device state of a checkpoint as sent to the replica.
//!
//! QEMU's device state (about 616 KB without RAM) changes little from one checkpoint to the
//! next, so it is sent as a delta against a *base*: the device state of the last checkpoint
//! the replica committed, which both sides hold (the primary kept what it sent, the replica
//! keeps it in its record). The encoding is named in `EpochStart`
//! ([`crate::wire::Message::EpochStart`]), with the base's epoch, so the replica can refuse
//! a delta whose base is not the state it committed:
//!
//! | encoding | bytes on the wire | state = |
//! |---|---|---|
//! | [`StateEncoding::Raw`] | the state itself | the bytes |
//! | [`StateEncoding::Lz4`] | LZ4 block of the state, shorter than it | decompressed |
//! | [`StateEncoding::XorLz4`] | LZ4 block of the delta, shorter than the state | delta XOR base |
//!
//! The delta has the new state's length: byte `i` is `state[i] XOR base[i]` where the base
//! has a byte `i`, else `state[i]` (a longer state's tail goes as it is; a shorter one uses
//! the start of the base). The encoder sends the delta when it compresses below the state's
//! size, else the state raw; without a base (the first state after a handshake or a full
//! copy) LZ4 of the state, or raw.
//!
//! Decoding is strict: the length on the wire must be possible for the encoding (a raw state
//! is exactly its length, a compressed one shorter), the LZ4 block must decompress to exactly
//! the announced length into a buffer of that length, and a delta needs its base. The
//! announced length is bounded by the caller (`MAX_DEVICE_STATE_BYTES`) before anything is
//! allocated. The epoch's CRC32C covers the reconstructed state, so a base that differs
//! from the primary's is caught as well.

use lz4_flex::block::{compress_into, decompress_into, get_maximum_output_size};
use serde::{Deserialize, Serialize};

/// How an epoch's device state is sent. Variant order is the wire format: add at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateEncoding {
    /// The state itself.
    Raw,
    /// LZ4 block of the state.
    Lz4,
    /// LZ4 block of the delta against the device state of `base_epoch`, the replica's
    /// committed checkpoint.
    XorLz4 { base_epoch: u64 },
}

impl StateEncoding {
    /// The epoch whose device state is the base, for a delta.
    pub fn base_epoch(self) -> Option<u64> {
        match self {
            StateEncoding::XorLz4 { base_epoch } => Some(base_epoch),
            StateEncoding::Raw | StateEncoding::Lz4 => None,
        }
    }

    /// Whether `wire_len` bytes on the wire are possible for a state of `state_len` bytes.
    pub fn wire_len_allowed(self, wire_len: u64, state_len: u64) -> bool {
        match self {
            StateEncoding::Raw => wire_len == state_len,
            StateEncoding::Lz4 | StateEncoding::XorLz4 { .. } => {
                wire_len > 0 && wire_len < state_len
            }
        }
    }
}

/// Errors of this module: the bytes do not describe the announced state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateDeltaError {
    #[error("{wire_len} bytes are not a valid {encoding:?} device state of {state_len} bytes")]
    Length {
        encoding: StateEncoding,
        wire_len: u64,
        state_len: u64,
    },
    #[error("a device state delta without its base")]
    NoBase,
    #[error("malformed LZ4 block in the device state")]
    Lz4,
    #[error("the device state decodes to {length} bytes instead of {state_len}")]
    DecodedLength { length: usize, state_len: usize },
}

/// Encodes device states; keeps its buffers between epochs.
#[derive(Debug, Default)]
pub struct StateEncoder {
    delta: Vec<u8>,
    output: Vec<u8>,
}

impl StateEncoder {
    pub fn new() -> StateEncoder {
        StateEncoder::default()
    }

    /// Encodes `state` against `base` (the epoch and device state the replica committed,
    /// if the replica is known to hold it); returns the encoding and the bytes to send.
    pub fn encode<'a>(
        &'a mut self,
        state: &'a [u8],
        base: Option<(u64, &[u8])>,
    ) -> (StateEncoding, &'a [u8]) {
        if state.is_empty() {
            return (StateEncoding::Raw, state);
        }
        let (encoding, input) = match base {
            Some((base_epoch, base)) => {
                self.delta.clear();
                self.delta.extend_from_slice(state);
                xor_prefix(&mut self.delta, base);
                (StateEncoding::XorLz4 { base_epoch }, &self.delta[..])
            }
            None => (StateEncoding::Lz4, state),
        };
        self.output.resize(get_maximum_output_size(input.len()), 0);
        // The output has the compressor's bound, so it cannot run out of room; an error
        // would be a bug in the compressor and the raw state is always correct.
        match compress_into(input, &mut self.output) {
            Ok(length) if length < state.len() => match self.output.get(..length) {
                Some(bytes) => (encoding, bytes),
                None => (StateEncoding::Raw, state),
            },
            Ok(_) | Err(_) => (StateEncoding::Raw, state),
        }
    }
}

/// `bytes[i] ^= base[i]` wherever both have a byte `i`.
fn xor_prefix(bytes: &mut [u8], base: &[u8]) {
    for (byte, base_byte) in bytes.iter_mut().zip(base) {
        *byte ^= base_byte;
    }
}

/// Decodes a device state of `state_len` bytes from `wire` into `output` (replaced), with
/// `base` for a delta (the caller checked it is the state of the named base epoch).
/// `output` is unspecified on error.
pub fn decode(
    encoding: StateEncoding,
    wire: &[u8],
    state_len: usize,
    base: Option<&[u8]>,
    output: &mut Vec<u8>,
) -> Result<(), StateDeltaError> {
    if !encoding.wire_len_allowed(wire.len() as u64, state_len as u64) {
        return Err(StateDeltaError::Length {
            encoding,
            wire_len: wire.len() as u64,
            state_len: state_len as u64,
        });
    }
    output.clear();
    match encoding {
        StateEncoding::Raw => output.extend_from_slice(wire),
        StateEncoding::Lz4 => decompress_exact(wire, state_len, output)?,
        StateEncoding::XorLz4 { .. } => {
            let base = base.ok_or(StateDeltaError::NoBase)?;
            decompress_exact(wire, state_len, output)?;
            xor_prefix(output, base);
        }
    }
    Ok(())
}

fn decompress_exact(
    wire: &[u8],
    state_len: usize,
    output: &mut Vec<u8>,
) -> Result<(), StateDeltaError> {
    output.resize(state_len, 0);
    let length = decompress_into(wire, output).map_err(|_| StateDeltaError::Lz4)?;
    if length != state_len {
        return Err(StateDeltaError::DecodedLength { length, state_len });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::tests::random_bytes;

    /// A device state in miniature: mostly zeros and small fields, some noise.
    fn state(seed: u64, length: usize) -> Vec<u8> {
        let mut state = vec![0u8; length];
        for (index, chunk) in state.chunks_mut(512).enumerate() {
            if index % 3 == 0 {
                let length = chunk.len().min(24);
                random_bytes(seed + index as u64, &mut chunk[..length]);
            }
        }
        state
    }

    fn round_trip(state: &[u8], base: Option<(u64, &[u8])>) -> (StateEncoding, usize) {
        let mut encoder = StateEncoder::new();
        let (encoding, wire) = encoder.encode(state, base);
        let mut output = vec![0xa5; 3];
        decode(
            encoding,
            wire,
            state.len(),
            base.map(|(_, bytes)| bytes),
            &mut output,
        )
        .expect("own encoding decodes");
        assert!(output == state, "{encoding:?} does not round-trip");
        (encoding, wire.len())
    }

    #[test]
    fn a_state_close_to_its_base_goes_as_a_small_delta() {
        let base = state(1, 616_519);
        let mut next = base.clone();
        next[1000..1008].copy_from_slice(&7u64.to_le_bytes());
        next[400_000] ^= 0xff;
        let (encoding, wire_len) = round_trip(&next, Some((9, &base)));
        assert_eq!(encoding, StateEncoding::XorLz4 { base_epoch: 9 });
        assert!(wire_len < 4_000, "{wire_len} bytes");
        // Without a base, the whole state, compressed.
        let (encoding, whole) = round_trip(&next, None);
        assert_eq!(encoding, StateEncoding::Lz4);
        assert!(
            whole > 3 * wire_len && whole < next.len(),
            "{whole} and {wire_len} bytes"
        );
    }

    #[test]
    fn states_longer_or_shorter_than_their_base_round_trip() {
        let base = state(2, 10_000);
        let mut longer = base.clone();
        longer.extend_from_slice(&state(3, 5_000));
        let (encoding, _) = round_trip(&longer, Some((1, &base)));
        assert_eq!(encoding.base_epoch(), Some(1));
        let shorter = base[..6_000].to_vec();
        round_trip(&shorter, Some((1, &base)));
        round_trip(&base, Some((1, &[])));
    }

    #[test]
    fn incompressible_or_empty_states_go_raw() {
        let mut noise = vec![0u8; 20_000];
        random_bytes(4, &mut noise);
        assert_eq!(round_trip(&noise, None).0, StateEncoding::Raw);
        assert_eq!(
            round_trip(&noise, Some((1, &[0; 100]))).0,
            StateEncoding::Raw
        );
        assert_eq!(round_trip(&[], Some((1, &noise))), (StateEncoding::Raw, 0));
    }

    #[test]
    fn wrong_lengths_truncated_or_corrupt_blocks_are_errors() {
        let base = state(5, 50_000);
        let mut next = base.clone();
        next[10] = 1;
        let mut encoder = StateEncoder::new();
        let (encoding, wire) = encoder.encode(&next, Some((3, &base)));
        let wire = wire.to_vec();
        let mut output = Vec::new();
        let length = next.len();
        assert!(matches!(
            decode(StateEncoding::Raw, &wire, length, None, &mut output),
            Err(StateDeltaError::Length { .. })
        ));
        assert!(matches!(
            decode(encoding, &[], length, Some(&base), &mut output),
            Err(StateDeltaError::Length { .. })
        ));
        assert_eq!(
            decode(encoding, &wire, length, None, &mut output),
            Err(StateDeltaError::NoBase)
        );
        // Announced longer or shorter than what the block holds.
        assert!(decode(encoding, &wire, length + 1, Some(&base), &mut output).is_err());
        assert!(decode(encoding, &wire, length - 1, Some(&base), &mut output).is_err());
        for cut in [1, wire.len() / 2, wire.len() - 1] {
            assert!(
                decode(encoding, &wire[..cut], length, Some(&base), &mut output).is_err(),
                "cut {cut}"
            );
        }
        // A block of literals only: decodes to fewer bytes than announced.
        assert_eq!(
            decode(StateEncoding::Lz4, &[0x20, 1, 2], 100, None, &mut output),
            Err(StateDeltaError::DecodedLength {
                length: 2,
                state_len: 100
            })
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let base = state(6, 8192);
        let mut bytes = vec![0u8; 4096];
        let mut output = Vec::new();
        for seed in 0..2000u64 {
            let length = 1 + (seed as usize * 7919) % bytes.len();
            random_bytes(seed, &mut bytes[..length]);
            let state_len = length + (seed as usize % 3) * 1000;
            for encoding in [
                StateEncoding::Raw,
                StateEncoding::Lz4,
                StateEncoding::XorLz4 { base_epoch: 1 },
            ] {
                if decode(
                    encoding,
                    &bytes[..length],
                    state_len,
                    Some(&base),
                    &mut output,
                )
                .is_ok()
                {
                    assert_eq!(output.len(), state_len);
                }
            }
        }
    }
}
