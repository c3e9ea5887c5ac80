//! Fuzz target: the replication frame decoders on untrusted bytes (the sealed frames after the
//! handshake, encrypted or authenticated only, and the clear handshake frames).
//!
//! `cd replication-link/fuzz && cargo +nightly fuzz run frame_decoder`
#![no_main]

use libfuzzer_sys::fuzz_target;
use replication_link::frame::{
    decode_frame, encode_frame, seal_body, Direction, FrameKey, FrameProtection,
};
use replication_link::handshake_frame::{
    checksum_body, decode_handshake_frame, encode_handshake_frame,
};

const LIMIT: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    for protection in [FrameProtection::Encrypted, FrameProtection::AuthenticatedOnly] {
        sealed_frames(data, &FrameKey::from_bytes([0x42; 32]).with_protection(protection));
    }
    handshake_frames(data);
});

fn sealed_frames(data: &[u8], key: &FrameKey) {
    // The bytes as they would arrive on a socket: a stream of frames. Without the key the
    // tag fails, so this mostly exercises the length checks.
    let mut rest = data;
    let mut counter = 0;
    while let Ok(frame) = decode_frame(rest, key, Direction::ClientToServer, counter, LIMIT) {
        rest = rest.get(frame.frame_bytes..).unwrap_or_default();
        counter += 1;
    }

    // The bytes as a sealed body, so that the body decoder sees them; whatever decodes must
    // encode again to the same header and payload.
    let sealed = seal_body(data, key, Direction::ServerToClient, 7).expect("seal");
    if let Ok(frame) = decode_frame(&sealed, key, Direction::ServerToClient, 7, LIMIT) {
        assert_eq!(frame.frame_bytes, sealed.len());
        let again = encode_frame(
            &frame.header,
            &frame.payload,
            key,
            Direction::ServerToClient,
            7,
        )
        .expect("a decoded header encodes again");
        let decoded = decode_frame(&again, key, Direction::ServerToClient, 7, LIMIT)
            .expect("a re-encoded frame decodes");
        assert_eq!(decoded.header, frame.header);
        assert_eq!(decoded.payload, frame.payload);
    }
}

/// Handshake frames come from anyone: the raw bytes, then as a body with a valid checksum.
fn handshake_frames(data: &[u8]) {
    let _ = decode_handshake_frame(data, Direction::ClientToServer, 0);
    let framed = checksum_body(data, Direction::ClientToServer, 0);
    if let Ok(frame) = decode_handshake_frame(&framed, Direction::ClientToServer, 0) {
        let again = encode_handshake_frame(&frame.header, Direction::ClientToServer, 0)
            .expect("a decoded handshake header encodes again");
        let decoded = decode_handshake_frame(&again, Direction::ClientToServer, 0)
            .expect("a re-encoded handshake frame decodes");
        assert_eq!(decoded.header, frame.header);
    }
}
