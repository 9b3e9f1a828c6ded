//! The peer protocol as pure functions: the greeting, the challenge-response that proves a
//! neighbour knows the herd secret, the framing of every later line, and the verbs.
//!
//! A link is one TCP connection dialled by one server (the *dialler*) to a neighbour (the
//! *acceptor*). Without a secret:
//!
//! ```text
//! dialler  -> PEER herd/1 NAME
//! then both ways, one per line: AT records (dialler only), PING, DIGEST COUNT HEX SCHEME, SYNC
//! ```
//!
//! With a secret, both sides prove they know it before anything else is accepted, with fresh
//! nonces so that no earlier exchange can be replayed:
//!
//! ```text
//! dialler  -> PEER herd/1 NAME ND               ND, NA: 16 random bytes, in hex
//! acceptor -> CHALLENGE NA HMAC(secret, "accept" NAME-D NAME-A ND NA)
//! dialler  -> PROOF HMAC(secret, "dial" NAME-D NAME-A ND NA)
//! then every line both ways: PAYLOAD SEQ TAG     TAG = HMAC(session key, direction SEQ PAYLOAD)
//! ```
//!
//! The session key is `HMAC(secret, "session" ND NA)`, new for every connection; `SEQ` counts
//! the lines of one direction from 0. A line from another connection, a line played twice, a
//! line out of order or altered fails its tag, and the connection is closed.

use std::time::Duration;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::protocol::{fields, GREETING_VERB, PROTOCOL_VERSION};

/// A link that has sent nothing for this long sends `PING`.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A link that has heard nothing for this long is dead: closed, and redialled by the dialler.
pub const DEAD_AFTER: Duration = Duration::from_secs(5);
/// How often the dialler sends the digest of its store.
pub const DIGEST_INTERVAL: Duration = Duration::from_secs(3);
/// Digests that differ this many times in a row ask for a full resynchronisation: one
/// difference is usually just updates in flight.
pub const MISMATCHES_BEFORE_SYNC: u32 = 2;
/// Before it has authenticated, a connection gets this long and this many bytes.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_HANDSHAKE_BYTES: usize = 1024;

const NONCE_BYTES: usize = 16;
const TAG_BYTES: usize = 16;

/// The herd secret, ready for HMAC-SHA256.
#[derive(Clone)]
pub struct Secret(hmac::Key);

impl Secret {
    pub fn new(bytes: &[u8]) -> Secret {
        Secret(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    fn sign(&self, parts: &[&[u8]]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.0);
        for part in parts {
            // Length-prefixed, so that no two different lists of parts sign the same bytes.
            ctx.update(&(part.len() as u32).to_be_bytes());
            ctx.update(part);
        }
        ctx.sign()
    }

    /// The proof one side sends: `role` is `b"accept"` or `b"dial"`.
    pub fn proof(
        &self,
        role: &[u8],
        dialler: &[u8],
        acceptor: &[u8],
        nd: &[u8],
        na: &[u8],
    ) -> Vec<u8> {
        hex(self.sign(&[role, dialler, acceptor, nd, na]).as_ref())
    }

    /// Checks a proof in constant time.
    pub fn verify(
        &self,
        proof: &[u8],
        role: &[u8],
        dialler: &[u8],
        acceptor: &[u8],
        nd: &[u8],
        na: &[u8],
    ) -> bool {
        let expected = self.proof(role, dialler, acceptor, nd, na);
        same(&expected, proof)
    }
}

/// A fresh nonce, in hex. `None` only if the operating system has no randomness to give.
pub fn nonce() -> Option<Vec<u8>> {
    let mut bytes = [0u8; NONCE_BYTES];
    SystemRandom::new().fill(&mut bytes).ok()?;
    Some(hex(&bytes))
}

/// A random herd secret, in hex, for `herd up`.
pub fn new_secret() -> Option<String> {
    let mut bytes = [0u8; 32];
    SystemRandom::new().fill(&mut bytes).ok()?;
    String::from_utf8(hex(&bytes)).ok()
}

fn hex(bytes: &[u8]) -> Vec<u8> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|&b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]])
        .collect()
}

/// Compares in time that depends only on the length, so a forger learns nothing from timing.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn is_hex(text: &[u8], len: usize) -> bool {
    text.len() == len
        && text
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// A greeting: the dialler's name, and its nonce when the herd has a secret.
#[derive(Debug, PartialEq, Eq)]
pub struct Greeting<'a> {
    pub name: &'a [u8],
    pub nonce: Option<&'a [u8]>,
}

/// Parses `PEER herd/1 NAME [NONCE]`.
pub fn parse_greeting(line: &[u8]) -> Option<Greeting<'_>> {
    match fields::<4>(line)? {
        ([GREETING_VERB, PROTOCOL_VERSION, name, _], 3) => Some(Greeting { name, nonce: None }),
        ([GREETING_VERB, PROTOCOL_VERSION, name, nonce], 4) if is_hex(nonce, 2 * NONCE_BYTES) => {
            Some(Greeting {
                name,
                nonce: Some(nonce),
            })
        }
        _ => None,
    }
}

/// `PEER herd/1 NAME [NONCE]`, without the newline.
pub fn greeting(name: &str, nonce: Option<&[u8]>) -> Vec<u8> {
    let mut line = Vec::with_capacity(80);
    line.extend_from_slice(GREETING_VERB);
    line.push(b' ');
    line.extend_from_slice(PROTOCOL_VERSION);
    line.push(b' ');
    line.extend_from_slice(name.as_bytes());
    if let Some(nonce) = nonce {
        line.push(b' ');
        line.extend_from_slice(nonce);
    }
    line
}

/// Parses `CHALLENGE NA PROOF`.
pub fn parse_challenge(line: &[u8]) -> Option<(&[u8], &[u8])> {
    match fields::<3>(line)? {
        ([b"CHALLENGE", na, proof], 3) if is_hex(na, 2 * NONCE_BYTES) && is_hex(proof, 64) => {
            Some((na, proof))
        }
        _ => None,
    }
}

/// Parses `PROOF PROOF`.
pub fn parse_proof(line: &[u8]) -> Option<&[u8]> {
    match fields::<2>(line)? {
        ([b"PROOF", proof], 2) if is_hex(proof, 64) => Some(proof),
        _ => None,
    }
}

/// What a peer line (its payload, once opened) says.
#[derive(Debug, PartialEq, Eq)]
pub enum PeerLine<'a> {
    /// An `AT` record (the whole payload).
    Record(&'a [u8]),
    /// A heartbeat: the link is alive.
    Ping,
    /// The sender's store: how many records, and their order-independent digest.
    Digest { count: u64, digest: u64 },
    /// The receiver asks the sender of the link to send its whole store again.
    Sync,
}

pub fn parse_line(payload: &[u8]) -> Option<PeerLine<'_>> {
    if payload.starts_with(b"AT ") {
        return Some(PeerLine::Record(payload)); // checked as a record by the caller
    }
    match fields::<4>(payload)? {
        ([b"PING", ..], 1) => Some(PeerLine::Ping),
        ([b"SYNC", ..], 1) => Some(PeerLine::Sync),
        // A digest made another way (another build's) compares with nothing here: ignored.
        ([b"DIGEST", count, digest, scheme], 4) if scheme == DIGEST_SCHEME.as_bytes() => {
            Some(PeerLine::Digest {
                count: std::str::from_utf8(count).ok()?.parse().ok()?,
                digest: u64::from_str_radix(std::str::from_utf8(digest).ok()?, 16).ok()?,
            })
        }
        _ => None,
    }
}

/// How the digest is made: [`crate::store::record_hash`], summed. Named in every `DIGEST`, so
/// that servers hashing records differently (different builds) ignore each other's digests
/// instead of resynchronising forever. A build that sent `DIGEST COUNT HEX`, with no scheme,
/// hashed with FNV-1a; neither side reads the other's.
pub const DIGEST_SCHEME: &str = "fold64";

/// `DIGEST COUNT HEX SCHEME`.
pub fn digest_line(count: usize, digest: u64) -> Vec<u8> {
    format!("DIGEST {count} {digest:016x} {DIGEST_SCHEME}").into_bytes()
}

/// An authenticated connection's keys and counters.
pub struct Session {
    key: hmac::Key,
    /// Direction labels: what this side signs with, and what it expects the other to.
    send_label: u8,
    receive_label: u8,
    sent: u64,
    received: u64,
}

impl Session {
    /// The session of a connection from `nd` and `na`; `dialler` says which end this is.
    pub fn new(secret: &Secret, nd: &[u8], na: &[u8], dialler: bool) -> Session {
        let key = secret.sign(&[b"session", nd, na]);
        let (send_label, receive_label) = if dialler { (b'd', b'a') } else { (b'a', b'd') };
        Session {
            key: hmac::Key::new(hmac::HMAC_SHA256, key.as_ref()),
            send_label,
            receive_label,
            sent: 0,
            received: 0,
        }
    }

    fn tag(&self, label: u8, seq: u64, payload: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&[label]);
        ctx.update(&seq.to_be_bytes());
        ctx.update(payload);
        ctx.sign()
    }

    /// Appends `PAYLOAD SEQ TAG` (no newline).
    pub fn seal(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        let tag = self.tag(self.send_label, self.sent, payload);
        out.extend_from_slice(payload);
        out.extend_from_slice(format!(" {} ", self.sent).as_bytes());
        out.extend_from_slice(&hex(&tag.as_ref()[..TAG_BYTES]));
        self.sent += 1;
    }

    /// Checks `PAYLOAD SEQ TAG` and returns the payload. Any failure ends the connection.
    pub fn open<'a>(&mut self, line: &'a [u8]) -> Result<&'a [u8], &'static str> {
        let mut parts = line.rsplitn(3, |&b| b == b' ');
        let (Some(tag), Some(seq), Some(payload)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err("a peer line without its sequence number and tag");
        };
        if seq != self.received.to_string().as_bytes() {
            return Err("a peer line out of sequence (replayed, lost or reordered)");
        }
        let expected = hex(&self
            .tag(self.receive_label, self.received, payload)
            .as_ref()[..TAG_BYTES]);
        if !same(&expected, tag) {
            return Err("a peer line with a wrong tag");
        }
        self.received += 1;
        Ok(payload)
    }
}

/// Frames a payload for the wire: sealed when the link is authenticated, as is otherwise.
/// Appends the newline.
pub fn frame(session: Option<&mut Session>, payload: &[u8], out: &mut Vec<u8>) {
    match session {
        Some(session) => session.seal(payload, out),
        None => out.extend_from_slice(payload),
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings() {
        assert_eq!(
            parse_greeting(b"PEER herd/1 Bona"),
            Some(Greeting {
                name: b"Bona",
                nonce: None
            })
        );
        let nonce = nonce().unwrap();
        let line = greeting("Bona", Some(&nonce));
        assert_eq!(parse_greeting(&line).unwrap().nonce, Some(&nonce[..]));
        assert_eq!(parse_greeting(b"PEER herd/1 Bona xyz"), None);
        assert_eq!(parse_greeting(b"PEER herd/2 Bona"), None);
    }

    #[test]
    fn proofs_bind_both_names_and_both_nonces() {
        let secret = Secret::new(b"s3cret");
        let (nd, na) = (nonce().unwrap(), nonce().unwrap());
        let proof = secret.proof(b"dial", b"A", b"B", &nd, &na);
        assert!(secret.verify(&proof, b"dial", b"A", b"B", &nd, &na));
        assert!(!secret.verify(&proof, b"accept", b"A", b"B", &nd, &na));
        assert!(!secret.verify(&proof, b"dial", b"A", b"C", &nd, &na));
        assert!(!secret.verify(&proof, b"dial", b"A", b"B", &na, &nd));
        assert!(!Secret::new(b"other").verify(&proof, b"dial", b"A", b"B", &nd, &na));
    }

    #[test]
    fn sealed_lines_open_once_in_order_and_only_on_their_connection() {
        let secret = Secret::new(b"s3cret");
        let (nd, na) = (nonce().unwrap(), nonce().unwrap());
        let mut dialler = Session::new(&secret, &nd, &na, true);
        let mut acceptor = Session::new(&secret, &nd, &na, false);
        let mut first = Vec::new();
        frame(
            Some(&mut dialler),
            b"AT A +0.000000001 k +1+1 1",
            &mut first,
        );
        let mut second = Vec::new();
        frame(Some(&mut dialler), b"PING", &mut second);
        let (first, second) = (&first[..first.len() - 1], &second[..second.len() - 1]);
        assert_eq!(acceptor.open(first), Ok(&b"AT A +0.000000001 k +1+1 1"[..]));
        assert!(acceptor.open(first).is_err(), "a replayed line");
        assert_eq!(acceptor.open(second), Ok(&b"PING"[..]));
        // A line of this direction reflected back is refused: the direction is signed.
        let mut reflected = Session::new(&secret, &nd, &na, true);
        assert!(reflected.open(first).is_err());
        // Another connection's session refuses it.
        let mut other = Session::new(&secret, &nonce().unwrap(), &na, false);
        assert!(other.open(first).is_err());
        // An altered payload is refused.
        let mut fresh = Session::new(&secret, &nd, &na, false);
        let mut altered = first.to_vec();
        altered[3] = b'B';
        assert!(fresh.open(&altered).is_err());
    }

    #[test]
    fn verbs() {
        assert_eq!(parse_line(b"PING"), Some(PeerLine::Ping));
        assert_eq!(parse_line(b"SYNC"), Some(PeerLine::Sync));
        assert_eq!(
            parse_line(&digest_line(7, 0xabc)),
            Some(PeerLine::Digest {
                count: 7,
                digest: 0xabc
            })
        );
        assert_eq!(digest_line(7, 0xabc), b"DIGEST 7 0000000000000abc fold64");
        // Another way of hashing, or none named: not comparable, so not a digest.
        assert_eq!(parse_line(b"DIGEST 7 0000000000000abc fnv"), None);
        assert_eq!(parse_line(b"DIGEST 7 0000000000000abc"), None);
        let record = b"AT Bailey +0.263873386 kiwi +34.068930-118.445127 1621464827.959498503";
        assert_eq!(parse_line(record), Some(PeerLine::Record(record)));
        assert_eq!(parse_line(b"PING x"), None);
        assert_eq!(parse_line(b"IAMAT a +1+1 1"), None);
    }
}
