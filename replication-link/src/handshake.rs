//! Mutual authentication of one TCP connection with the pre-shared key.
//!
//! ```text
//! client                                   server
//!   Hello{version, client_id, service, session_id, client_nonce, send_base, limits,
//!         key_ids, protection} ->
//!   <- Challenge{params{version, server_id, server_nonce, instance, send_base, limits,
//!                       key_id, protection},
//!                server_proof = keyed_hash(psk, "server" || transcript)}
//!   Proof{client_proof = keyed_hash(psk, "client" || transcript)} ->
//! transcript = derive_key-hash of (len(hello) || postcard(hello) || postcard(params))
//! connection secret = derive_key("ftvm replication connection v2",
//!                                psk || client_nonce || server_nonce || session_id || transcript)
//! client-to-server key = derive_key("ftvm replication frame key v2 client to server", secret)
//! server-to-client key = derive_key("ftvm replication frame key v2 server to client", secret)
//! ```
//! `key_ids` are the ids ([`Psk::id`]) of every key the client holds ([`crate::KeyRing`]),
//! the preferred first; `psk` is the first of them the server holds, named by `key_id`. A
//! server that holds none of them refuses at once (`authentication failed`), as does a client
//! whose server names a key it did not offer. So a host that took a new key and still holds
//! the old one connects with a peer that has only the old one, and the new key is used as
//! soon as both hold it. The offer is in the transcript: a changed offer fails the proofs.
//! `protection` is each side's own configuration ([`FrameProtection`]: encryption on, or off
//! for measurements): a server refuses a `Hello` naming another than its own (`link encryption
//! differs`, before it proves anything), a client a `Challenge` naming another than its own.
//! Both are in the transcript, so no one on the network can turn encryption off: a changed
//! `Hello` is refused by the server or fails the proofs, and the keys of a connection without
//! encryption differ from those of one with it.
//! Either side answers a check that fails with `Refused{reason}` and closes. Handshake frames
//! ([`crate::handshake_frame`]) carry no payload and travel in clear; every frame after them is
//! sealed with the key of its direction ([`crate::frame`]). Both sides' fresh nonces make the
//! keys new on every connection, so frame counters that start again at 0 on a reconnect, or
//! after a restart, never repeat a key and nonce pair.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::frame::{ConnectionKeys, Direction, FrameError, FrameKey};
use crate::handshake_frame::HandshakeFrames;
use crate::header::NONCE_BYTES;
use crate::header::PROTOCOL_VERSION;
use crate::header::{FrameProtection, Hello, LinkHeader, LinkLimits, ServerParams};
use crate::header::{MAX_ID_BYTES, MAX_LINKS};
use crate::key_ring::MAX_KEYS;
use crate::psk::{KeyId, Psk};

const TRANSCRIPT_CONTEXT: &str = "ftvm replication transcript v1";
const CONNECTION_KEY_CONTEXT: &str = "ftvm replication connection v2";
const CLIENT_TO_SERVER_KEY_CONTEXT: &str = "ftvm replication frame key v2 client to server";
const SERVER_TO_CLIENT_KEY_CONTEXT: &str = "ftvm replication frame key v2 server to client";
/// Reason a client sends when the server's proof did not verify.
const AUTHENTICATION_REFUSAL: &str = "authentication failed";
/// Reason a side sends when the peer's frame protection is not its own.
const PROTECTION_REFUSAL: &str = "link encryption differs";
const MAX_REASON_CHARS: usize = 200;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("peer failed authentication (wrong pre-shared key?)")]
    AuthenticationFailed,
    #[error("peer refused the connection: {reason}")]
    Refused { reason: String },
    #[error("handshake timed out")]
    Timeout,
    #[error("connection closed during the handshake")]
    Closed,
    #[error("unexpected {kind} frame during the handshake")]
    Unexpected { kind: &'static str },
    #[error("peer speaks protocol version {version}, this side {PROTOCOL_VERSION}")]
    Version { version: u16 },
    #[error("peer's max_frame_bytes is {peer}, this side's {local}: configure both alike")]
    FrameLimit { peer: u32, local: u32 },
    #[error(
        "peer has link {}, this side {}: configure both hosts alike",
        peer.describe(),
        local.describe()
    )]
    Protection {
        peer: FrameProtection,
        local: FrameProtection,
    },
    #[error("invalid {field} in the handshake")]
    Invalid { field: &'static str },
    #[error("handshake frame error")]
    Frame(#[source] FrameError),
    #[error("cannot draw random bytes: {0}")]
    Random(getrandom::Error),
}

impl From<FrameError> for HandshakeError {
    fn from(error: FrameError) -> HandshakeError {
        if error.is_timeout() {
            HandshakeError::Timeout
        } else if matches!(error, FrameError::Closed) {
            HandshakeError::Closed
        } else {
            HandshakeError::Frame(error)
        }
    }
}

/// Which end of the connection this side is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Server,
}

impl Side {
    pub(crate) fn sending(self) -> Direction {
        match self {
            Side::Client => Direction::ClientToServer,
            Side::Server => Direction::ServerToClient,
        }
    }

    pub(crate) fn receiving(self) -> Direction {
        match self {
            Side::Client => Direction::ServerToClient,
            Side::Server => Direction::ClientToServer,
        }
    }
}

/// Handshake frames on one connection, under one deadline for the whole handshake: every
/// read and write gets only the time left, so a peer that trickles bytes cannot stretch it.
/// Reads are unbuffered so that no byte after the handshake is consumed here.
pub(crate) struct HandshakeChannel<'a> {
    stream: DeadlineStream<'a>,
    frames: HandshakeFrames,
}

impl<'a> HandshakeChannel<'a> {
    /// `deadline`: when the whole handshake must be done (for a server, counted from accept).
    pub(crate) fn new(stream: &'a TcpStream, side: Side, deadline: Instant) -> Self {
        HandshakeChannel {
            stream: DeadlineStream { stream, deadline },
            frames: HandshakeFrames::new(side.sending(), side.receiving()),
        }
    }

    fn send(&mut self, header: &LinkHeader) -> Result<(), HandshakeError> {
        let frame = self.frames.encode(header)?;
        self.stream
            .write_all(&frame)
            .map_err(|error| HandshakeError::from(FrameError::Io(error)))
    }

    fn receive(&mut self) -> Result<LinkHeader, HandshakeError> {
        Ok(self.frames.read(&mut self.stream)?)
    }

    /// Tells the peer why it is refused, best effort (the connection is closed next).
    pub(crate) fn send_refusal(&mut self, reason: &str) {
        let _ = self.send(&LinkHeader::Refused {
            reason: reason.to_string(),
        });
    }

    /// Tells the peer why it is refused (best effort) and returns `error`.
    fn refuse(&mut self, reason: &str, error: HandshakeError) -> HandshakeError {
        self.send_refusal(reason);
        error
    }

    fn frames_received(&self) -> u64 {
        self.frames.received()
    }
}

/// A socket whose every read and write times out at one fixed instant.
struct DeadlineStream<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl DeadlineStream<'_> {
    /// Sets the socket timeouts to the time left; `TimedOut` once it is gone.
    fn time_left(&self, set: fn(&TcpStream, Option<Duration>) -> io::Result<()>) -> io::Result<()> {
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake deadline passed",
            ));
        }
        set(self.stream, Some(remaining))
    }
}

impl Read for DeadlineStream<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        self.time_left(TcpStream::set_read_timeout)?;
        let mut stream = self.stream;
        stream.read(buffer)
    }
}

impl Write for DeadlineStream<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.time_left(TcpStream::set_write_timeout)?;
        let mut stream = self.stream;
        stream.write(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Fresh random bytes for a nonce.
pub(crate) fn random_nonce() -> Result<[u8; NONCE_BYTES], HandshakeError> {
    let mut nonce = [0u8; NONCE_BYTES];
    getrandom::fill(&mut nonce).map_err(HandshakeError::Random)?;
    Ok(nonce)
}

/// Client side: sends `hello` (whose `key_ids` are those of `keys`), checks the server,
/// proves itself. Returns the server's parameters (`key_id`: the key used) and the
/// connection's keys.
pub(crate) fn client_handshake(
    stream: &TcpStream,
    keys: &[Psk],
    hello: &Hello,
    timeout: Duration,
) -> Result<(ServerParams, ConnectionKeys), HandshakeError> {
    let mut channel = HandshakeChannel::new(stream, Side::Client, Instant::now() + timeout);
    channel.send(&LinkHeader::Hello(hello.clone()))?;
    let (params, server_proof) = match channel.receive()? {
        LinkHeader::Challenge {
            params,
            server_proof,
        } => (params, server_proof),
        LinkHeader::Refused { reason } => return Err(client_refusal(&reason, hello)),
        other => return Err(HandshakeError::Unexpected { kind: other.kind() }),
    };
    if params.protocol_version != PROTOCOL_VERSION {
        let error = HandshakeError::Version {
            version: params.protocol_version,
        };
        return Err(channel.refuse("unsupported protocol version", error));
    }
    let offered = hello.key_ids.iter().position(|id| *id == params.key_id);
    let Some(psk) = offered.and_then(|index| keys.get(index)) else {
        return Err(channel.refuse("invalid challenge", invalid("key id")));
    };
    let transcript = transcript(hello, &params)?;
    if !proof_matches(psk, b"server", &transcript, &server_proof) {
        return Err(channel.refuse(AUTHENTICATION_REFUSAL, HandshakeError::AuthenticationFailed));
    }
    if params.protection != hello.protection {
        let error = HandshakeError::Protection {
            peer: params.protection,
            local: hello.protection,
        };
        return Err(channel.refuse(PROTECTION_REFUSAL, error));
    }
    if params.limits.max_frame_bytes != hello.limits.max_frame_bytes {
        let error = HandshakeError::FrameLimit {
            peer: params.limits.max_frame_bytes,
            local: hello.limits.max_frame_bytes,
        };
        return Err(channel.refuse("max_frame_bytes differs", error));
    }
    if params.server_id.is_empty() || params.server_id.len() > MAX_ID_BYTES {
        return Err(channel.refuse("invalid server id", invalid("server id")));
    }
    check_limits(&params.limits)?;
    let client_proof = proof(psk, b"client", &transcript);
    channel.send(&LinkHeader::Proof { client_proof })?;
    let keys = connection_keys(psk, hello, &params, &transcript);
    Ok((params, keys))
}

/// Server side, first step: reads and checks the client's `Hello` against this side's
/// limits and frame protection.
pub(crate) fn read_hello(
    channel: &mut HandshakeChannel<'_>,
    local: &LinkLimits,
    protection: FrameProtection,
) -> Result<Hello, HandshakeError> {
    let hello = match channel.receive()? {
        LinkHeader::Hello(hello) => hello,
        other => return Err(HandshakeError::Unexpected { kind: other.kind() }),
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        let error = HandshakeError::Version {
            version: hello.protocol_version,
        };
        return Err(channel.refuse("unsupported protocol version", error));
    }
    if hello.limits.max_frame_bytes != local.max_frame_bytes {
        let error = HandshakeError::FrameLimit {
            peer: hello.limits.max_frame_bytes,
            local: local.max_frame_bytes,
        };
        return Err(channel.refuse("max_frame_bytes differs", error));
    }
    if hello.protection != protection {
        let error = HandshakeError::Protection {
            peer: hello.protection,
            local: protection,
        };
        return Err(channel.refuse(PROTECTION_REFUSAL, error));
    }
    for (field, value) in [("client id", &hello.client_id), ("service", &hello.service)] {
        if value.is_empty() || value.len() > MAX_ID_BYTES {
            return Err(channel.refuse("invalid hello", invalid(field)));
        }
    }
    if hello.session_id == 0 {
        return Err(channel.refuse("invalid hello", invalid("session id")));
    }
    if usize::from(hello.link) >= MAX_LINKS {
        return Err(channel.refuse("invalid hello", invalid("link index")));
    }
    if hello.key_ids.is_empty() || hello.key_ids.len() > MAX_KEYS {
        return Err(channel.refuse("invalid hello", invalid("key ids")));
    }
    check_limits(&hello.limits)?;
    Ok(hello)
}

/// Server side, between the steps: the first key the client offers that the server holds
/// (`held`, the server's keys), or a refusal (`authentication failed`, as for a wrong key)
/// when they share none.
pub(crate) fn choose_key(
    channel: &mut HandshakeChannel<'_>,
    hello: &Hello,
    held: &[Psk],
) -> Result<Psk, HandshakeError> {
    let chosen = hello
        .key_ids
        .iter()
        .find_map(|id| held.iter().find(|key| key.id() == *id));
    match chosen {
        Some(key) => Ok(key.clone()),
        None => Err(channel.refuse(AUTHENTICATION_REFUSAL, HandshakeError::AuthenticationFailed)),
    }
}

/// Server side, second step: proves itself with `psk` (from [`choose_key`], named in
/// `params.key_id`), checks the client's proof. Returns the connection's keys.
pub(crate) fn answer_hello(
    channel: &mut HandshakeChannel<'_>,
    psk: &Psk,
    hello: &Hello,
    params: ServerParams,
) -> Result<ConnectionKeys, HandshakeError> {
    debug_assert_eq!(
        channel.frames_received(),
        1,
        "answer_hello follows read_hello"
    );
    let transcript = transcript(hello, &params)?;
    let server_proof = proof(psk, b"server", &transcript);
    channel.send(&LinkHeader::Challenge {
        params: params.clone(),
        server_proof,
    })?;
    let client_proof = match channel.receive()? {
        LinkHeader::Proof { client_proof } => client_proof,
        LinkHeader::Refused { reason } => return Err(refusal(&reason)),
        other => return Err(HandshakeError::Unexpected { kind: other.kind() }),
    };
    if !proof_matches(psk, b"client", &transcript, &client_proof) {
        return Err(channel.refuse(AUTHENTICATION_REFUSAL, HandshakeError::AuthenticationFailed));
    }
    Ok(connection_keys(psk, hello, &params, &transcript))
}

/// A server's refusal of `hello`: one for a frame protection other than the server's names
/// both (there are two: the server's is the other one).
fn client_refusal(reason: &str, hello: &Hello) -> HandshakeError {
    if reason != PROTECTION_REFUSAL {
        return refusal(reason);
    }
    let peer = match hello.protection {
        FrameProtection::Encrypted => FrameProtection::AuthenticatedOnly,
        FrameProtection::AuthenticatedOnly => FrameProtection::Encrypted,
    };
    HandshakeError::Protection {
        peer,
        local: hello.protection,
    }
}

/// A peer's refusal: a failed authentication is named as such (the peer holds none of our
/// keys, or proved with another), anything else with the peer's reason.
fn refusal(reason: &str) -> HandshakeError {
    if reason == AUTHENTICATION_REFUSAL {
        HandshakeError::AuthenticationFailed
    } else {
        HandshakeError::Refused {
            reason: sanitize(reason),
        }
    }
}

/// The ids a client offers for `keys`.
pub(crate) fn key_ids(keys: &[Psk]) -> Vec<KeyId> {
    keys.iter().take(MAX_KEYS).map(Psk::id).collect()
}

fn check_limits(limits: &LinkLimits) -> Result<(), HandshakeError> {
    if limits.window_messages == 0 || limits.window_bytes == 0 {
        return Err(invalid("receive window"));
    }
    Ok(())
}

fn invalid(field: &'static str) -> HandshakeError {
    HandshakeError::Invalid { field }
}

/// A peer's reason, shortened and stripped of control characters before it reaches a log.
fn sanitize(reason: &str) -> String {
    reason
        .chars()
        .take(MAX_REASON_CHARS)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn transcript(hello: &Hello, params: &ServerParams) -> Result<[u8; 32], HandshakeError> {
    let encode = |result: Result<Vec<u8>, postcard::Error>| {
        result.map_err(|error| HandshakeError::Frame(FrameError::Encode(error)))
    };
    let hello_bytes = encode(postcard::to_allocvec(hello))?;
    let params_bytes = encode(postcard::to_allocvec(params))?;
    let mut hasher = blake3::Hasher::new_derive_key(TRANSCRIPT_CONTEXT);
    hasher.update(&(hello_bytes.len() as u64).to_le_bytes());
    hasher.update(&hello_bytes);
    hasher.update(&params_bytes);
    Ok(*hasher.finalize().as_bytes())
}

fn proof(psk: &Psk, label: &[u8], transcript: &[u8; 32]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_keyed(psk.key());
    hasher.update(label);
    hasher.update(transcript);
    *hasher.finalize().as_bytes()
}

/// Constant-time check (`blake3::Hash` compares in constant time).
fn proof_matches(psk: &Psk, label: &[u8], transcript: &[u8; 32], received: &[u8; 32]) -> bool {
    blake3::Hash::from(proof(psk, label, transcript)) == blake3::Hash::from(*received)
}

/// The connection's secret, from the key and both sides' fresh nonces, then one key per
/// direction from it, protecting frames as both sides agreed (the transcript holds it).
fn connection_keys(
    psk: &Psk,
    hello: &Hello,
    params: &ServerParams,
    transcript: &[u8; 32],
) -> ConnectionKeys {
    let mut hasher = blake3::Hasher::new_derive_key(CONNECTION_KEY_CONTEXT);
    hasher.update(psk.key());
    hasher.update(&hello.client_nonce);
    hasher.update(&params.server_nonce);
    hasher.update(&hello.session_id.to_le_bytes());
    hasher.update(transcript);
    let secret = hasher.finalize();
    let key = |context| FrameKey::from_bytes(blake3::derive_key(context, secret.as_bytes()));
    ConnectionKeys::new(
        key(CLIENT_TO_SERVER_KEY_CONTEXT),
        key(SERVER_TO_CLIENT_KEY_CONTEXT),
    )
    .with_protection(params.protection)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    fn limits() -> LinkLimits {
        LinkLimits {
            window_messages: 16,
            window_bytes: 1 << 20,
            max_frame_bytes: 1 << 20,
        }
    }

    fn hello(keys: &[Psk]) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            client_id: "host-a".into(),
            service: "blk:test".into(),
            session_id: 42,
            link: 1,
            client_nonce: random_nonce().expect("nonce"),
            send_base: 0,
            limits: limits(),
            key_ids: key_ids(keys),
            protection: FrameProtection::Encrypted,
        }
    }

    fn params(key: &Psk) -> ServerParams {
        ServerParams {
            protocol_version: PROTOCOL_VERSION,
            server_id: "host-b".into(),
            server_nonce: random_nonce().expect("nonce"),
            instance: 7,
            send_base: 0,
            limits: limits(),
            key_id: key.id(),
            protection: FrameProtection::Encrypted,
        }
    }

    type ServerResult = Result<(Hello, ConnectionKeys), HandshakeError>;

    fn deadline(seconds: u64) -> Instant {
        Instant::now() + Duration::from_secs(seconds)
    }

    fn keys(secrets: &[&[u8]]) -> Vec<Psk> {
        secrets
            .iter()
            .map(|secret| Psk::from_bytes(secret).expect("psk"))
            .collect()
    }

    fn run(
        client_psk: &[u8],
        server_psk: &[u8],
    ) -> (ServerResult, Result<ConnectionKeys, HandshakeError>) {
        let (server, client) = run_with(&keys(&[client_psk]), &keys(&[server_psk]));
        (server, client.map(|(_, keys)| keys))
    }

    /// One handshake between a client holding `client_keys` and a server holding
    /// `server_keys` (each the preferred first). The client's result names the key used.
    fn run_with(
        client_keys: &[Psk],
        server_keys: &[Psk],
    ) -> (
        ServerResult,
        Result<(KeyId, ConnectionKeys), HandshakeError>,
    ) {
        let on = FrameProtection::Encrypted;
        run_with_protection(client_keys, server_keys, [on, on])
    }

    /// `run_with`, the client and the server each with its own frame protection.
    fn run_with_protection(
        client_keys: &[Psk],
        server_keys: &[Psk],
        [client_protection, server_protection]: [FrameProtection; 2],
    ) -> (
        ServerResult,
        Result<(KeyId, ConnectionKeys), HandshakeError>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let server_keys = server_keys.to_vec();
        let server = thread::spawn(move || -> ServerResult {
            let (stream, _) = listener.accept().expect("accept");
            let mut channel = HandshakeChannel::new(&stream, Side::Server, deadline(5));
            let hello = read_hello(&mut channel, &limits(), server_protection)?;
            let psk = choose_key(&mut channel, &hello, &server_keys)?;
            let mut params = params(&psk);
            params.protection = server_protection;
            let keys = answer_hello(&mut channel, &psk, &hello, params)?;
            Ok((hello, keys))
        });
        let stream = TcpStream::connect(address).expect("connect");
        let mut hello = hello(client_keys);
        hello.protection = client_protection;
        let client = client_handshake(&stream, client_keys, &hello, Duration::from_secs(5))
            .map(|(params, keys)| (params.key_id, keys));
        drop(stream);
        (server.join().expect("server thread"), client)
    }

    #[test]
    fn same_key_agrees_on_the_connection_keys() {
        let (server, client) = run(b"0123456789abcdef", b"0123456789abcdef");
        let (hello, server_keys) = server.expect("server");
        assert_eq!(hello.service, "blk:test");
        assert_eq!(server_keys, client.expect("client"));
    }

    /// A reconnect (same key, same session id) starts its frame counters at 0 again, under new
    /// keys: no key and nonce pair repeats, and no frame of the old connection opens on the
    /// new one. The two directions never share a key.
    #[test]
    fn every_connection_has_fresh_keys_one_per_direction() {
        let psk = b"0123456789abcdef";
        let connect = || {
            let (server, client) = run(psk, psk);
            let client = client.expect("client");
            assert_eq!(server.expect("server").1, client);
            client
        };
        let (first, second) = (connect(), connect());
        for direction in [Direction::ClientToServer, Direction::ServerToClient] {
            assert_ne!(first.key(direction), second.key(direction));
        }
        for keys in [&first, &second] {
            assert_ne!(
                keys.key(Direction::ClientToServer),
                keys.key(Direction::ServerToClient)
            );
        }
        let header = LinkHeader::Ack { up_to: 1 };
        let seal = |keys: &ConnectionKeys| {
            let direction = Direction::ClientToServer;
            crate::frame::encode_frame(&header, b"block", keys.key(direction), direction, 0)
                .expect("encode")
        };
        let (old, new) = (seal(&first), seal(&second));
        assert_ne!(
            old, new,
            "same plaintext, same counter, different ciphertext"
        );
        let open = |frame: &[u8], keys: &ConnectionKeys| {
            let direction = Direction::ClientToServer;
            crate::frame::decode_frame(frame, keys.key(direction), direction, 0, 1 << 20)
        };
        open(&new, &second).expect("genuine");
        let replayed = open(&old, &second);
        assert!(matches!(replayed, Err(FrameError::BadTag)), "{replayed:?}");
    }

    /// One handshake with the same key, the client and the server each with its own frame
    /// protection.
    fn run_protected(
        client: FrameProtection,
        server: FrameProtection,
    ) -> (ServerResult, Result<ConnectionKeys, HandshakeError>) {
        let keys = keys(&[b"0123456789abcdef"]);
        let (server, client) = run_with_protection(&keys, &keys, [client, server]);
        (server, client.map(|(_, keys)| keys))
    }

    /// Encryption off on both sides: agreed, and the connection's keys say so (and differ
    /// from an encrypted connection's, the mode being in the transcript). Off on one side
    /// only, either one: refused on both sides, each naming both settings.
    #[test]
    fn both_sides_must_agree_on_encryption() {
        use FrameProtection::{AuthenticatedOnly as Off, Encrypted as On};
        let (server, client) = run_protected(Off, Off);
        let client = client.expect("client");
        assert_eq!(server.expect("server").1, client);
        assert_eq!(client.protection(), Off);
        let (_, encrypted) = run_protected(On, On);
        assert_eq!(encrypted.expect("client").protection(), On);

        for (client_side, server_side) in [(Off, On), (On, Off)] {
            let (server, client) = run_protected(client_side, server_side);
            let client_error = client.expect_err("client must fail");
            let server_error = server.expect_err("server must fail");
            assert!(
                matches!(client_error, HandshakeError::Protection { peer, local }
                    if peer == server_side && local == client_side),
                "{client_error:?}"
            );
            assert!(
                matches!(server_error, HandshakeError::Protection { peer, local }
                    if peer == client_side && local == server_side),
                "{server_error:?}"
            );
        }
        let (_, client) = run_protected(Off, On);
        assert_eq!(
            client.expect_err("refused").to_string(),
            "peer has link encryption on, this side encryption off (authenticated only): \
             configure both hosts alike"
        );
    }

    #[test]
    fn wrong_key_fails_on_both_sides() {
        let (server, client) = run(b"0123456789abcdef", b"fedcba9876543210");
        let client_error = client.expect_err("client must fail");
        let server_error = server.expect_err("server must fail");
        assert!(matches!(client_error, HandshakeError::AuthenticationFailed));
        assert!(matches!(server_error, HandshakeError::AuthenticationFailed));
        assert_eq!(
            server_error.to_string(),
            "peer failed authentication (wrong pre-shared key?)"
        );
    }

    /// Key rotation: a host holding the new key and the old one connects with a peer that
    /// holds only the old one, whichever side dials; once both hold the new key it is the
    /// one used; a key no longer held (retired) or never known is refused on both sides.
    #[test]
    fn a_set_of_keys_connects_with_any_key_both_hold_and_prefers_the_newest() {
        let old = Psk::from_bytes(b"the old pair key, 32 bytes long.").expect("psk");
        let new = Psk::from_bytes(b"the new pair key, 32 bytes long.").expect("psk");
        let stranger = Psk::from_bytes(b"a key nobody was given, 32 bytes").expect("psk");
        let rotated = [new.clone(), old.clone()];
        let agreed = |client: &[Psk], server: &[Psk]| {
            let (server_result, client_result) = run_with(client, server);
            let (key_id, client_keys) = client_result.expect("client");
            let (_, server_keys) = server_result.expect("server");
            assert_eq!(client_keys, server_keys);
            key_id
        };
        // The first host rotated, the second not yet: the old key, in both directions.
        assert_eq!(agreed(&rotated, std::slice::from_ref(&old)), old.id());
        assert_eq!(agreed(std::slice::from_ref(&old), &rotated), old.id());
        // Both rotated: the new key.
        assert_eq!(agreed(&rotated, &rotated), new.id());
        // The first retired the old key, the second not yet: the new key.
        assert_eq!(agreed(std::slice::from_ref(&new), &rotated), new.id());
        assert_eq!(agreed(&rotated, std::slice::from_ref(&new)), new.id());
        // The old key retired on the server: a client with only the old key is refused.
        for (client, server) in [
            (vec![old.clone()], vec![new.clone()]),
            (vec![stranger.clone()], rotated.to_vec()),
            (rotated.to_vec(), vec![stranger.clone()]),
        ] {
            let (server_result, client_result) = run_with(&client, &server);
            let client_error = client_result.expect_err("client must fail");
            let server_error = server_result.expect_err("server must fail");
            assert!(
                matches!(client_error, HandshakeError::AuthenticationFailed),
                "{client_error:?}"
            );
            assert!(
                matches!(server_error, HandshakeError::AuthenticationFailed),
                "{server_error:?}"
            );
        }
    }

    /// A client whose server names a key the client did not offer is refused (a server
    /// cannot make it use a key of its choosing).
    #[test]
    fn a_server_naming_a_key_not_offered_is_refused() {
        let offered = Psk::from_bytes(b"the key the client offers, 32 b.").expect("psk");
        let other = Psk::from_bytes(b"a key the client does not offer.").expect("psk");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let server_key = other.clone();
        let server = thread::spawn(move || -> ServerResult {
            let (stream, _) = listener.accept().expect("accept");
            let mut channel = HandshakeChannel::new(&stream, Side::Server, deadline(5));
            let hello = read_hello(&mut channel, &limits(), FrameProtection::Encrypted)?;
            let keys = answer_hello(&mut channel, &server_key, &hello, params(&server_key))?;
            Ok((hello, keys))
        });
        let stream = TcpStream::connect(address).expect("connect");
        let offered = [offered];
        let result = client_handshake(&stream, &offered, &hello(&offered), Duration::from_secs(5));
        assert!(
            matches!(result, Err(HandshakeError::Invalid { field: "key id" })),
            "{result:?}"
        );
        drop(stream);
        let server_result = server.join().expect("server thread");
        assert!(server_result.is_err(), "{server_result:?}");
    }

    #[test]
    fn a_hello_without_keys_or_with_too_many_is_refused() {
        let key = Psk::from_bytes(b"0123456789abcdef").expect("psk");
        for count in [0, MAX_KEYS + 1] {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let address = listener.local_addr().expect("address");
            let server = thread::spawn(move || {
                let (stream, _) = listener.accept().expect("accept");
                let mut channel = HandshakeChannel::new(&stream, Side::Server, deadline(5));
                read_hello(&mut channel, &limits(), FrameProtection::Encrypted).map(|_| ())
            });
            let stream = TcpStream::connect(address).expect("connect");
            let mut hello = hello(std::slice::from_ref(&key));
            hello.key_ids = vec![key.id(); count];
            let result = client_handshake(
                &stream,
                std::slice::from_ref(&key),
                &hello,
                Duration::from_secs(5),
            );
            assert!(
                matches!(&result, Err(HandshakeError::Refused { reason }) if reason == "invalid hello"),
                "{count} ids: {result:?}"
            );
            let server_result = server.join().expect("server thread");
            assert!(
                matches!(
                    server_result,
                    Err(HandshakeError::Invalid { field: "key ids" })
                ),
                "{server_result:?}"
            );
        }
    }

    #[test]
    fn the_deadline_covers_the_whole_handshake_not_each_read() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address");
        let frame = crate::handshake_frame::encode_handshake_frame(
            &LinkHeader::Hello(hello(&keys(&[b"0123456789abcdef"]))),
            Direction::ClientToServer,
            0,
        )
        .expect("encode");
        // One byte every 50 ms: each read succeeds well within any per-read timeout.
        let trickle = thread::spawn(move || {
            let mut stream = TcpStream::connect(address).expect("connect");
            for byte in frame {
                if stream.write_all(&[byte]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        let (stream, _) = listener.accept().expect("accept");
        let started = Instant::now();
        let mut channel =
            HandshakeChannel::new(&stream, Side::Server, started + Duration::from_millis(300));
        let result = read_hello(&mut channel, &limits(), FrameProtection::Encrypted);
        let elapsed = started.elapsed();
        assert!(matches!(result, Err(HandshakeError::Timeout)), "{result:?}");
        assert!(elapsed < Duration::from_millis(600), "took {elapsed:?}");
        drop(stream);
        trickle.join().expect("trickle thread");
    }
}
