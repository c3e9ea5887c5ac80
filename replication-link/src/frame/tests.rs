use super::*;

fn keys() -> ConnectionKeys {
    ConnectionKeys::new(FrameKey::from_bytes([7; 32]), FrameKey::from_bytes([8; 32]))
}

fn key() -> FrameKey {
    keys().key(Direction::ClientToServer).clone()
}

fn data_header(seq: u64) -> LinkHeader {
    LinkHeader::Data {
        session_seq: seq,
        payload_crc32c: 1,
        ack_up_to: 0,
        app_header: vec![1, 2, 3],
    }
}

const LIMIT: usize = 1 << 20;

/// Three frames sealed by one side's sealer, as its socket would carry them.
fn stream_of_three(direction: Direction) -> (Vec<u8>, Vec<usize>) {
    let mut sealer = FrameSealer::new(&keys(), direction, LIMIT);
    let mut stream = Vec::new();
    let mut sizes = Vec::new();
    for seq in 0..3u64 {
        let written = sealer
            .write_frame(&mut stream, &data_header(seq), &[seq as u8; 100])
            .expect("write");
        sizes.push(written);
    }
    (stream, sizes)
}

#[test]
fn frames_round_trip_and_slice_and_stream_decoders_agree() {
    let direction = Direction::ClientToServer;
    let (stream, sizes) = stream_of_three(direction);
    assert_eq!(sizes.iter().sum::<usize>(), stream.len());
    let first = encode_frame(&data_header(0), &[0; 100], &key(), direction, 0).expect("encode");
    assert_eq!(stream.get(..first.len()), Some(first.as_slice()));

    let mut rest = stream.as_slice();
    let mut opener = FrameOpener::new(&keys(), direction, LIMIT);
    let mut input = stream.as_slice();
    for seq in 0..3u64 {
        let decoded = decode_frame(rest, &key(), direction, seq, LIMIT).expect("decode");
        assert_eq!(decoded.header, data_header(seq));
        assert_eq!(decoded.payload, vec![seq as u8; 100]);
        rest = rest.get(decoded.frame_bytes..).expect("more");
        let read = opener.read_frame(&mut input).expect("read");
        assert_eq!(read.header, data_header(seq));
        assert_eq!(read.payload, vec![seq as u8; 100]);
        assert_eq!(read.frame_bytes, decoded.frame_bytes);
    }
    assert!(rest.is_empty());
    assert!(matches!(
        opener.read_frame(&mut input),
        Err(FrameError::Closed)
    ));
}

#[test]
fn the_overhead_is_that_of_the_mac_it_replaces() {
    let header = data_header(1);
    let header_bytes = postcard::to_allocvec(&header).expect("encode").len();
    let frame =
        encode_frame(&header, &[0; 4096], &key(), Direction::ClientToServer, 0).expect("encode");
    assert_eq!(frame.len(), 4096 + header_bytes + FRAME_OVERHEAD_BYTES);
    assert_eq!(FRAME_OVERHEAD_BYTES, 22); // 4 length + 2 header length + 16 tag, as in v1
}

/// The payload and the application header of a frame appear nowhere in what the writer
/// writes; the reader recovers both.
#[test]
fn no_plaintext_reaches_the_wire() {
    let canary = b"FTVM-CANARY-guest-block-0123456789abcdef".repeat(100);
    let app_header = b"offset=4096 generation=7 canary".to_vec();
    let header = LinkHeader::Data {
        session_seq: 1,
        payload_crc32c: crc32c::crc32c(&canary),
        ack_up_to: 0,
        app_header: app_header.clone(),
    };
    let direction = Direction::ServerToClient;
    let mut sealer = FrameSealer::new(&keys(), direction, LIMIT);
    let mut wire = Vec::new();
    for _ in 0..2 {
        sealer
            .write_frame(&mut wire, &header, &canary)
            .expect("write");
    }
    for needle in [&canary[..16], &canary[40..56], &app_header[..12]] {
        assert!(
            !wire.windows(needle.len()).any(|window| window == needle),
            "{:?} found on the wire",
            String::from_utf8_lossy(needle)
        );
    }
    let half = wire.len() / 2;
    let (first, second) = wire.split_at(half);
    assert_ne!(first, second, "the same frame twice is sealed differently");
    let mut opener = FrameOpener::new(&keys(), direction, LIMIT);
    let mut input = wire.as_slice();
    for _ in 0..2 {
        let read = opener.read_frame(&mut input).expect("read");
        assert_eq!(read.header, header);
        assert_eq!(read.payload, canary);
    }
}

#[test]
fn wrong_counter_direction_or_key_fails_the_tag() {
    let frame =
        encode_frame(&data_header(1), b"x", &key(), Direction::ClientToServer, 5).expect("encode");
    let decode = |key: &FrameKey, direction, counter| {
        decode_frame(&frame, key, direction, counter, LIMIT).map(|_| ())
    };
    decode(&key(), Direction::ClientToServer, 5).expect("genuine");
    let other = FrameKey::from_bytes([9; 32]);
    for (key, direction, counter) in [
        (key(), Direction::ClientToServer, 4),
        (key(), Direction::ClientToServer, 6),
        (key(), Direction::ServerToClient, 5),
        (other, Direction::ClientToServer, 5),
    ] {
        assert!(matches!(
            decode(&key, direction, counter),
            Err(FrameError::BadTag)
        ));
    }
}

/// Every bit of the length prefix, the sealed header and payload, and the tag.
#[test]
fn every_flipped_bit_is_refused() {
    let frame = encode_frame(
        &data_header(1),
        b"payload",
        &key(),
        Direction::ClientToServer,
        0,
    )
    .expect("encode");
    for index in 0..frame.len() {
        for bit in 0..8 {
            let mut damaged = frame.clone();
            if let Some(byte) = damaged.get_mut(index) {
                *byte ^= 1 << bit;
            }
            let result = decode_frame(&damaged, &key(), Direction::ClientToServer, 0, LIMIT);
            assert!(result.is_err(), "flip at byte {index} bit {bit} passed");
            let mut opener = FrameOpener::new(&keys(), Direction::ClientToServer, LIMIT);
            let read = opener.read_frame(&mut damaged.as_slice());
            assert!(read.is_err(), "flip at byte {index} bit {bit} read");
        }
    }
}

/// A replayed, reordered or dropped frame meets a counter it was not sealed with.
#[test]
fn replayed_reordered_and_dropped_frames_are_refused() {
    let direction = Direction::ClientToServer;
    let (stream, sizes) = stream_of_three(direction);
    let mut frames = Vec::new();
    let mut rest = stream.as_slice();
    for size in sizes {
        let (frame, tail) = rest.split_at(size);
        frames.push(frame.to_vec());
        rest = tail;
    }
    let orders: [&[usize]; 4] = [&[0, 0], &[1], &[0, 2], &[0, 1, 1]];
    for order in orders {
        let mut opener = FrameOpener::new(&keys(), direction, LIMIT);
        let wire: Vec<u8> = order
            .iter()
            .flat_map(|&index| frames[index].clone())
            .collect();
        let mut input = wire.as_slice();
        let mut results = Vec::new();
        while let Ok(read) = opener.read_frame(&mut input) {
            results.push(read.header);
        }
        let genuine = order
            .iter()
            .enumerate()
            .take_while(|(position, index)| position == *index)
            .count();
        assert_eq!(results.len(), genuine, "order {order:?}");
        let mut opener = FrameOpener::new(&keys(), direction, LIMIT);
        let mut input = wire.as_slice();
        for _ in 0..genuine {
            opener.read_frame(&mut input).expect("genuine prefix");
        }
        assert!(
            matches!(opener.read_frame(&mut input), Err(FrameError::BadTag)),
            "order {order:?}"
        );
    }
}

/// A frame sent back to its sender (same counter, the other direction's opener) fails: the
/// directions have different keys.
#[test]
fn a_reflected_frame_is_refused() {
    let mut client_sealer = FrameSealer::new(&keys(), Direction::ClientToServer, LIMIT);
    let mut wire = Vec::new();
    client_sealer
        .write_frame(&mut wire, &data_header(1), b"write")
        .expect("write");
    let mut client_opener = FrameOpener::new(&keys(), Direction::ServerToClient, LIMIT);
    assert!(matches!(
        client_opener.read_frame(&mut wire.as_slice()),
        Err(FrameError::BadTag)
    ));
    let mut server_opener = FrameOpener::new(&keys(), Direction::ClientToServer, LIMIT);
    server_opener
        .read_frame(&mut wire.as_slice())
        .expect("the server opens it");
    // The keys alone tell the directions apart, whatever the nonce.
    let client_key = keys().key(Direction::ClientToServer).clone();
    let server_key = keys().key(Direction::ServerToClient).clone();
    let sealed = encode_frame(
        &data_header(1),
        b"write",
        &client_key,
        Direction::ServerToClient,
        0,
    )
    .expect("encode");
    assert!(matches!(
        decode_frame(&sealed, &server_key, Direction::ServerToClient, 0, LIMIT),
        Err(FrameError::BadTag)
    ));
}

#[test]
fn the_counter_never_wraps() {
    let direction = Direction::ClientToServer;
    let mut sealer = FrameSealer::new(&keys(), direction, LIMIT);
    sealer.skip_to(u64::MAX - 1);
    let mut wire = Vec::new();
    sealer
        .write_frame(&mut wire, &data_header(1), b"last")
        .expect("the last counter");
    let length = wire.len();
    assert!(matches!(
        sealer.write_frame(&mut wire, &data_header(2), b"one more"),
        Err(FrameError::CounterExhausted)
    ));
    assert_eq!(wire.len(), length, "nothing written");

    let mut opener = FrameOpener::new(&keys(), direction, LIMIT);
    opener.skip_to(u64::MAX - 1);
    let mut input = wire.as_slice();
    opener.read_frame(&mut input).expect("the last frame");
    let replay = wire.clone();
    assert!(matches!(
        opener.read_frame(&mut replay.as_slice()),
        Err(FrameError::CounterExhausted)
    ));
}

#[test]
fn oversized_and_truncated_frames_are_refused() {
    let mut huge = u32::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(&[0; 32]);
    assert!(matches!(
        decode_frame(&huge, &key(), Direction::ClientToServer, 0, LIMIT),
        Err(FrameError::TooLarge { .. })
    ));
    let mut opener = FrameOpener::new(&keys(), Direction::ClientToServer, LIMIT);
    assert!(matches!(
        opener.read_frame(&mut huge.as_slice()),
        Err(FrameError::TooLarge { .. })
    ));

    let frame = encode_frame(
        &data_header(1),
        &[9; 50],
        &key(),
        Direction::ClientToServer,
        0,
    )
    .expect("encode");
    for length in 0..frame.len() {
        let cut = frame.get(..length).expect("prefix");
        assert!(matches!(
            decode_frame(cut, &key(), Direction::ClientToServer, 0, LIMIT),
            Err(FrameError::Truncated { .. })
        ));
        let mut opener = FrameOpener::new(&keys(), Direction::ClientToServer, LIMIT);
        let result = opener.read_frame(&mut &cut[..]);
        if length == 0 {
            assert!(matches!(result, Err(FrameError::Closed)));
        } else {
            assert!(
                matches!(result, Err(FrameError::Truncated { .. })),
                "{length}"
            );
        }
    }
}

#[test]
fn malformed_authenticated_bodies_are_errors() {
    let cases: [&[u8]; 5] = [
        &[1],             // shorter than the header length field
        &[0xff, 0xff],    // header length above the limit
        &[1, 10, 0],      // header overruns the body
        &[200, 1, 0],     // unknown variant
        &[5, 7, 0, 3, 0], // valid Ack with a trailing byte
    ];
    for body in cases {
        let frame = seal_body(body, &key(), Direction::ClientToServer, 0).expect("seal");
        let result = decode_frame(&frame, &key(), Direction::ClientToServer, 0, LIMIT);
        assert!(result.is_err(), "{body:?} decoded");
    }
    let ack = seal_body(&[9, 5, 7, 2, 0], &key(), Direction::ClientToServer, 0).expect("seal");
    let decoded = decode_frame(&ack, &key(), Direction::ClientToServer, 0, LIMIT).expect("ack");
    assert_eq!(decoded.header, LinkHeader::Ack { up_to: 7 });
    assert_eq!(decoded.payload, vec![9]);
}

/// A deterministic stand-in for the fuzz target, run on every `cargo test`.
#[test]
fn random_bytes_never_panic() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let length = (next() % 300) as usize;
        let mut bytes: Vec<u8> = (0..length).map(|_| next() as u8).collect();
        if let Some(first) = bytes.get_mut(..4) {
            // Small length prefixes reach further than random 32-bit ones.
            first.copy_from_slice(&((next() % 320) as u32).to_le_bytes());
        }
        let _ = decode_frame(&bytes, &key(), Direction::ClientToServer, 0, LIMIT);
        let sealed = seal_body(&bytes, &key(), Direction::ClientToServer, 0).expect("seal");
        let _ = decode_frame(&sealed, &key(), Direction::ClientToServer, 0, LIMIT);
        let mut opener = FrameOpener::new(&keys(), Direction::ClientToServer, LIMIT);
        let _ = opener.read_frame(&mut sealed.as_slice());
    }
}

#[test]
fn sealer_refuses_frames_above_the_limit() {
    let mut sealer = FrameSealer::new(&keys(), Direction::ClientToServer, 100);
    let mut output = vec![1, 2, 3];
    let result = sealer.write_frame(&mut output, &data_header(1), &[0; 200]);
    assert!(matches!(result, Err(FrameError::TooLarge { .. })));
    assert_eq!(output, vec![1, 2, 3]);
}

/// Encryption off: the body travels in clear, the tag still covers it (and its length), and
/// the same key protecting frames the other way opens none of them.
#[test]
fn without_encryption_the_body_is_in_clear_and_still_authenticated() {
    let direction = Direction::ClientToServer;
    let off = keys().with_protection(FrameProtection::AuthenticatedOnly);
    assert_eq!(off.protection(), FrameProtection::AuthenticatedOnly);
    let payload = b"GUEST-BLOCK-IN-CLEAR-".repeat(50);
    let mut sealer = FrameSealer::new(&off, direction, LIMIT);
    let mut stream = Vec::new();
    for seq in 0..2u64 {
        sealer
            .write_frame(&mut stream, &data_header(seq), &payload)
            .expect("write");
    }
    let body_start = LENGTH_PREFIX_BYTES;
    assert_eq!(
        stream.get(body_start..body_start + payload.len()),
        Some(payload.as_slice()),
        "the payload is on the wire as it is"
    );
    let mut opener = FrameOpener::new(&off, direction, LIMIT);
    let mut input = stream.as_slice();
    for seq in 0..2u64 {
        let read = opener.read_frame(&mut input).expect("read");
        assert_eq!(
            (read.header, read.payload),
            (data_header(seq), payload.clone())
        );
    }
    let first =
        encode_frame(&data_header(0), &payload, off.key(direction), direction, 0).expect("encode");
    assert_eq!(stream.get(..first.len()), Some(first.as_slice()));
    let open = |frame: &[u8], key: &FrameKey, counter| {
        decode_frame(frame, key, direction, counter, LIMIT).map(|decoded| decoded.payload)
    };
    assert_eq!(
        open(&first, off.key(direction), 0).expect("genuine"),
        payload
    );
    // A flipped payload byte, header byte or tag byte; another counter (a replay); the
    // encrypting key; a frame cut short with its length prefix changed to match.
    for index in [body_start + 3, first.len() - TAG_BYTES - 3, first.len() - 1] {
        let mut tampered = first.clone();
        tampered[index] ^= 0x01;
        let result = open(&tampered, off.key(direction), 0);
        assert!(
            matches!(result, Err(FrameError::BadTag)),
            "byte {index}: {result:?}"
        );
    }
    let replayed = open(&first, off.key(direction), 1);
    assert!(matches!(replayed, Err(FrameError::BadTag)), "{replayed:?}");
    let encrypted = open(&first, keys().key(direction), 0);
    assert!(
        matches!(encrypted, Err(FrameError::BadTag)),
        "{encrypted:?}"
    );
    let mut shortened = first.clone();
    shortened.remove(body_start);
    let length = u32::from_le_bytes(shortened[..4].try_into().expect("4 bytes")) - 1;
    shortened[..4].copy_from_slice(&length.to_le_bytes());
    let result = open(&shortened, off.key(direction), 0);
    assert!(matches!(result, Err(FrameError::BadTag)), "{result:?}");
    // And an encrypted frame's payload is not readable, nor opened as authenticated only.
    let sealed = encode_frame(
        &data_header(0),
        &payload,
        keys().key(direction),
        direction,
        0,
    )
    .expect("seal");
    assert!(!sealed.windows(20).any(|window| window == &payload[..20]));
    let result = open(&sealed, off.key(direction), 0);
    assert!(matches!(result, Err(FrameError::BadTag)), "{result:?}");
}
