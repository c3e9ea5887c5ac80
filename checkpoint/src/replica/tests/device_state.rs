//! The device state as a delta against the replica's committed one: round trips, a delta
//! against another base, truncated, corrupt or random state bytes (each refused without
//! touching the replica), another protocol version.

use super::*;
use crate::delta::tests::random_bytes;

/// A device state in miniature: 64 KiB of mostly zeros with a few fields, `version`
/// changing some of them.
fn device_state(version: u64) -> Vec<u8> {
    let mut state = vec![0u8; 64 * 1024];
    random_bytes(77, &mut state[..2048]);
    for field in 0..8 {
        let start = 4096 + field * 7000;
        state[start..start + 8].copy_from_slice(&(version * 31 + field as u64).to_le_bytes());
    }
    state
}

/// The encoding and wire length `EpochStart` announces in `messages`.
fn state_sent(messages: &[Wire]) -> (StateEncoding, u64) {
    match Message::decode(&messages[0].0, &messages[0].1) {
        Ok(Message::EpochStart {
            state_encoding,
            state_wire_len,
            ..
        }) => (state_encoding, state_wire_len),
        other => panic!("expected an EpochStart, got {other:?}"),
    }
}

/// Index of the `DeviceState` message in an epoch's messages.
fn state_message(messages: &[Wire]) -> usize {
    messages
        .iter()
        .position(|(header, payload)| {
            matches!(
                Message::decode(header, payload),
                Ok(Message::DeviceState { .. })
            )
        })
        .expect("a DeviceState message")
}

/// The `EpochStart` of epoch 3 of the primary's generation.
fn epoch_3_start(
    full: bool,
    pages: u64,
    state_len: u64,
    state_encoding: StateEncoding,
    state_wire_len: u64,
) -> Wire {
    wire(
        &Message::EpochStart {
            epoch: 3,
            generation: GENERATION,
            full,
            pages,
            state_len,
            state_encoding,
            state_wire_len,
        },
        Vec::new(),
    )
}

#[test]
fn device_states_go_as_deltas_and_the_replica_keeps_them_whole() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut primary = Primary::new();
    let mut secondary = committed_secondary(directory.path(), &mut primary);
    for epoch in 3..=5u64 {
        primary.write(epoch, &page(epoch * 3));
        let state = device_state(epoch);
        let messages = primary.epoch(epoch, false, &[epoch], &state);
        let (encoding, wire_len) = state_sent(&messages);
        assert_eq!(
            encoding,
            StateEncoding::XorLz4 {
                base_epoch: epoch - 1
            }
        );
        if epoch > 3 {
            assert!(wire_len < 2048, "{wire_len} bytes for epoch {epoch}");
        }
        assert_eq!(
            feed(&mut secondary, &messages),
            vec![Message::Ack { epoch }]
        );
        assert_eq!(secondary.replica().device_state(), Some(&state[..]));
    }
    assert_eq!(secondary.replica().ram(), &primary.ram[..]);
    drop(secondary);
    // The record holds the whole state: a restore needs no earlier one.
    let replica = open(directory.path());
    assert_eq!(replica.device_state(), Some(&device_state(5)[..]));
}

#[test]
fn a_delta_against_another_base_is_refused_untouched() {
    // The replica committed epoch 2; the delta names epoch 1.
    refused_untouched(
        |primary| {
            change(primary);
            primary.state_base = Some((1, b"device state 1".to_vec()));
            primary.epoch(3, false, &[10], &device_state(3))
        },
        Refusal::StateBase { committed_epoch: 2 },
    );
    // It names epoch 2, but the primary's copy of that state differs from the replica's.
    refused_untouched(
        |primary| {
            change(primary);
            primary.state_base = Some((2, device_state(2)));
            primary.epoch(3, false, &[10], &device_state(3))
        },
        Refusal::Checksum,
    );
    // A full copy never builds on a state.
    refused_untouched(
        |primary| {
            let mut messages = primary.epoch(3, true, &[], &device_state(3));
            let (_, wire_len) = state_sent(&messages);
            messages[0] = epoch_3_start(
                true,
                PAGES,
                device_state(3).len() as u64,
                StateEncoding::XorLz4 { base_epoch: 2 },
                wire_len,
            );
            messages
        },
        Refusal::Malformed("a full copy's device state is a delta".into()),
    );
}

#[test]
fn a_replica_without_a_device_state_refuses_a_delta() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut secondary = Secondary::new(open(directory.path()));
    let mut primary = Primary::new();
    feed(&mut secondary, &[hello(GENERATION, STREAM)]);
    let full = primary.epoch(1, true, &[], b"");
    assert_eq!(feed(&mut secondary, &full), vec![Message::Ack { epoch: 1 }]);
    let before = files(directory.path());
    primary.state_base = Some((1, device_state(1)));
    primary.write(2, &page(2));
    let delta = primary.epoch(2, false, &[2], &device_state(2));
    assert_eq!(
        feed(&mut secondary, &delta),
        vec![Message::Refused {
            epoch: 2,
            reason: Refusal::StateBase { committed_epoch: 1 }
        }]
    );
    assert!(files(directory.path()) == before);
}

#[test]
fn truncated_or_corrupt_state_deltas_are_refused_untouched() {
    let delta_epoch = |primary: &mut Primary| {
        change(primary);
        primary.state_base = Some((2, b"device state 2".to_vec()));
        primary.epoch(3, false, &[10], &device_state(3))
    };
    // The last byte missing.
    let refusal = refusal_untouched(|primary| {
        let mut messages = delta_epoch(primary);
        let index = state_message(&messages);
        messages[index].1.pop();
        messages
    });
    assert!(
        matches!(&refusal, Refusal::Incomplete(text) if text.contains("bytes of device state")),
        "{refusal:?}"
    );
    // A byte too many.
    let refusal = refusal_untouched(|primary| {
        let mut messages = delta_epoch(primary);
        let index = state_message(&messages);
        messages[index].1.push(0);
        messages
    });
    assert!(matches!(refusal, Refusal::Incomplete(_)), "{refusal:?}");
    // Every byte of the block flipped in turn: refused (bad block or checksum).
    let (_, wire_len) = state_sent(&delta_epoch(&mut Primary::new()));
    for position in (0..wire_len as usize).step_by((wire_len as usize / 40).max(1)) {
        let refusal = refusal_untouched(|primary| {
            let mut messages = delta_epoch(primary);
            let index = state_message(&messages);
            messages[index].1[position] ^= 0x5a;
            messages
        });
        assert!(
            matches!(refusal, Refusal::Malformed(_) | Refusal::Checksum),
            "byte {position}: {refusal:?}"
        );
    }
    // A compressed state announced no shorter than itself.
    refused_untouched(
        |primary| {
            let mut messages = delta_epoch(primary);
            messages[0] = epoch_3_start(false, 1, 100, StateEncoding::Lz4, 100);
            messages
        },
        Refusal::Malformed("100 bytes are not a Lz4 device state of 100 bytes".into()),
    );
}

#[test]
fn random_state_bytes_never_panic_or_touch_the_replica() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut primary = Primary::new();
    let mut secondary = committed_secondary(directory.path(), &mut primary);
    let before = files(directory.path());
    let mut bytes = vec![0u8; 3000];
    for seed in 0..300u64 {
        let wire_len = 1 + (seed as usize * 7919) % bytes.len();
        random_bytes(seed, &mut bytes[..wire_len]);
        let state_encoding = match seed % 3 {
            0 => StateEncoding::Lz4,
            1 => StateEncoding::XorLz4 { base_epoch: 2 },
            _ => StateEncoding::XorLz4 { base_epoch: seed },
        };
        let messages = [
            epoch_3_start(
                false,
                0,
                wire_len as u64 + 1 + seed * 13,
                state_encoding,
                wire_len as u64,
            ),
            wire(
                &Message::DeviceState {
                    epoch: 3,
                    offset: 0,
                },
                bytes[..wire_len].to_vec(),
            ),
            wire(
                &Message::EpochEnd {
                    epoch: 3,
                    crc32c: seed as u32,
                },
                Vec::new(),
            ),
        ];
        let replies = feed(&mut secondary, &messages);
        assert!(
            matches!(replies.as_slice(), [Message::Refused { epoch: 3, .. }]),
            "seed {seed}: {replies:?}"
        );
    }
    assert!(files(directory.path()) == before);
    assert_eq!(secondary.replica().committed().epoch, 2);
    assert_eq!(
        secondary.replica().device_state(),
        Some(&b"device state 2"[..])
    );
}

#[test]
fn a_hello_of_another_protocol_is_refused() {
    let directory = tempfile::tempdir().expect("tempdir");
    let mut secondary = Secondary::new(open(directory.path()));
    let hello = wire(
        &Message::Hello {
            protocol: PROTOCOL_VERSION + 1,
            vm: VM.into(),
            generation: 1,
            stream: 1,
            ram_bytes: RAM_BYTES,
            page_bytes: PAGE_BYTES as u32,
        },
        Vec::new(),
    );
    assert_eq!(
        feed(&mut secondary, &[hello]),
        vec![Message::Refused {
            epoch: 0,
            reason: Refusal::Protocol {
                ours: PROTOCOL_VERSION
            }
        }]
    );
}
