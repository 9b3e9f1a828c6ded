//! The peer protocol as pure functions: the greeting, the challenge-response that proves a
//! neighbour knows the herd secret, the framing of every later line, and the verbs.
//!
//! A link is one TCP connection dialled by one server (the *dialler*) to a neighbour (the
//! *acceptor*). Without a secret:
//!
//! ```text
//! dialler  -> PEER herd/1 NAME
//! then one per line: AT records, PARTS FIRST HEX..., DIGEST COUNT HEX SCHEME (dialler only);
//! SYNC [SET] (acceptor only); PING (both)
//! ```
//!
//! Every [`DIGEST_INTERVAL`] the dialler sends the digest of each part of its store, 32 to a
//! `PARTS FIRST HEX...` line, then the digest of the whole store. The acceptor compares them with
//! its own: equal, all is well; a part that differs at two digests in a row is copied again
//! both ways (`SYNC SET` asks the dialler for it, `SET` a bitmap of parts in hex). Updates in
//! flight make a few parts differ at any moment, never the same ones for long, so a herd under
//! steady load copies nothing again. A dialler that sends no parts (an older build) is compared
//! on the whole digest, and a difference there asks for the whole store (`SYNC`).
//!
//! With a secret, both sides prove they know it before anything else is accepted, with fresh
//! nonces so that no earlier exchange can be replayed. The dialler proves first: the acceptor,
//! whose port anyone can reach, says nothing that depends on the secret to anyone who has not
//! proved it knows the secret already, so a stranger gets nothing to guess the secret from.
//!
//! ```text
//! dialler  -> PEER herd/1 NAME ND               ND, NA: 16 random bytes, in hex
//! acceptor -> CHALLENGE NA
//! dialler  -> PROOF HMAC(secret, "dial" NAME-D NAME-A ND NA)
//! acceptor -> PROOF HMAC(secret, "accept" NAME-D NAME-A ND NA)     only after checking the first
//! then every line both ways: PAYLOAD SEQ TAG     TAG = HMAC(session key, direction SEQ PAYLOAD)
//! ```
//!
//! The session key is `HMAC(secret, "session" ND NA)`, new for every connection; `SEQ` counts
//! the lines of one direction from 0. A line from another connection, a line played twice, a
//! line out of order or altered fails its tag, and the connection is closed.

use std::time::{Duration, Instant};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::bytes::hex;
use crate::protocol::{fields, GREETING_VERB, PROTOCOL_VERSION};
use crate::store::{Store, DIGEST_PARTS};

/// A link that has sent nothing for this long sends `PING`.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A link that has heard nothing for this long is dead: closed, and redialled by the dialler.
pub const DEAD_AFTER: Duration = Duration::from_secs(5);
/// How often the dialler sends the digest of its store.
pub const DIGEST_INTERVAL: Duration = Duration::from_secs(3);
/// The least time between two requests a neighbour's lines may make this server act on: two
/// `DIGEST`s it compares, two `SYNC`s it copies the store for. A correct neighbour sends its
/// digests [`DIGEST_INTERVAL`] apart, and asks for a copy only after two of them differ, so it
/// never comes this close; one that sends them faster (a bug, or a herd member gone bad) is
/// heard no more often, and cannot make the server copy its store, or log, without end.
pub const ACT_AT_MOST_EVERY: Duration = Duration::from_millis(1500);

/// Digests that differ this many times in a row ask for a resynchronisation of what differs: one
/// difference is usually just updates in flight.
pub const MISMATCHES_BEFORE_SYNC: u32 = 2;
/// Part digests per `PARTS` line: 8 lines for the store's 256 parts, each well under the
/// shortest line a peer may send.
const PARTS_PER_LINE: usize = 32;
/// Before it has authenticated, a connection gets this long and this many bytes.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest line a connection may send while it is challenged: a `PROOF` is 70 bytes, and
/// a stranger who greets with a neighbour's name must not make the server hold more.
pub const MAX_HANDSHAKE_BYTES: usize = 1024;

/// 16 random bytes per nonce: no two connections ever share one in practice, so no proof or
/// line of an earlier connection fits a later one.
const NONCE_BYTES: usize = 16;
/// A line's tag is its HMAC-SHA256 cut to 16 bytes: 128 bits are plenty against forgery, and
/// every line then carries 32 hex digits instead of 64.
const TAG_BYTES: usize = 16;

/// The herd secret, ready for HMAC-SHA256.
#[derive(Clone)]
pub struct Secret(hmac::Key);

impl Secret {
    /// The secret's bytes as configured (its text, not decoded from hex or base64): every
    /// server of the herd uses them alike.
    pub fn new(bytes: &[u8]) -> Secret {
        Secret(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// The bytes a proof signs: each part length-prefixed, so that no two different lists of
    /// parts sign the same bytes.
    fn message(parts: &[&[u8]]) -> Vec<u8> {
        let mut message = Vec::with_capacity(128);
        for part in parts {
            message.extend_from_slice(&(part.len() as u32).to_be_bytes());
            message.extend_from_slice(part);
        }
        message
    }

    fn sign(&self, parts: &[&[u8]]) -> hmac::Tag {
        hmac::sign(&self.0, &Secret::message(parts))
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

    /// Checks a proof, with ring's own verification (in constant time).
    pub fn verify(
        &self,
        proof: &[u8],
        role: &[u8],
        dialler: &[u8],
        acceptor: &[u8],
        nd: &[u8],
        na: &[u8],
    ) -> bool {
        let Some(tag) = unhex(proof) else {
            return false;
        };
        let message = Secret::message(&[role, dialler, acceptor, nd, na]);
        hmac::verify(&self.0, &message, &tag).is_ok()
    }
}

/// `HERD_SECRET`, unless it is unset or empty (an empty one counts as not set, everywhere).
pub fn secret_from_env() -> Option<String> {
    std::env::var("HERD_SECRET")
        .ok()
        .filter(|s| !s.trim().is_empty())
}

/// Checks that a herd secret carries at least 128 bits: written as hex, at least 32 digits;
/// as base64, at least 22 characters; and not a run of a few characters repeated (fewer than
/// ten different ones, which a random secret of that length has with a chance under one in a
/// billion). A passphrase is refused: its bits cannot be told from its length.
pub fn check_secret(text: &str) -> Result<(), String> {
    const HOW: &str = "make one with `openssl rand -hex 32`";
    let hex = text.bytes().all(|b| b.is_ascii_hexdigit());
    let base64 = text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_' | b'='));
    let bits = match (hex, base64) {
        (true, _) => text.len() * 4,
        (false, true) => text.trim_end_matches('=').len() * 6,
        (false, false) => {
            return Err(format!(
                "the herd secret must be written in hex or base64 (128 bits at least): {HOW}"
            ))
        }
    };
    if bits < 128 {
        return Err(format!(
            "the herd secret carries {bits} bits, fewer than 128: {HOW}"
        ));
    }
    let mut seen = [false; 256];
    text.bytes().for_each(|b| seen[usize::from(b)] = true);
    if seen.iter().filter(|&&s| s).count() < 10 {
        return Err(format!(
            "the herd secret repeats a few characters; it must be random: {HOW}"
        ));
    }
    Ok(())
}

/// A fresh nonce, in hex. `None` only if the operating system has no randomness to give.
pub fn nonce() -> Option<Vec<u8>> {
    let mut bytes = [0u8; NONCE_BYTES];
    SystemRandom::new().fill(&mut bytes).ok()?;
    Some(hex(&bytes))
}

/// A random herd secret, in hex, for `herd up`: 256 bits.
pub fn new_secret() -> Option<String> {
    let mut bytes = [0u8; 32];
    SystemRandom::new().fill(&mut bytes).ok()?;
    String::from_utf8(hex(&bytes)).ok()
}

/// The bytes written in lower-case hex `text`; `None` if it is not that.
fn unhex(text: &[u8]) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    let digit = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    text.chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// Compares two tags in time that depends only on their length, so a forger learns nothing
/// from timing: ring's comparison (its constant-time `CRYPTO_memcmp`), which ring still
/// exports for this under a deprecated name.
#[allow(deprecated)]
fn same(a: &[u8], b: &[u8]) -> bool {
    ring::constant_time::verify_slices_are_equal(a, b).is_ok()
}

/// Whether `text` is exactly `len` lower-case hex digits, as nonces, proofs, part sets and part
/// digests are written; nothing else is taken for one.
fn is_hex(text: &[u8], len: usize) -> bool {
    text.len() == len
        && text
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// A greeting: the dialler's name, and its nonce when the herd has a secret.
#[derive(Debug, PartialEq, Eq)]
pub struct Greeting<'a> {
    /// The dialler's name: the acceptor looks it up among its neighbours.
    pub name: &'a [u8],
    /// ND, in hex: present exactly when the dialler's herd has a secret.
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

/// Parses `CHALLENGE NA`: the acceptor's nonce, and nothing that proves anything yet (the
/// acceptor proves itself only to a dialler that has proved itself first).
pub fn parse_challenge(line: &[u8]) -> Option<&[u8]> {
    match fields::<2>(line)? {
        ([b"CHALLENGE", na], 2) if is_hex(na, 2 * NONCE_BYTES) => Some(na),
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
    Digest {
        /// The records the sender holds.
        count: u64,
        /// The wrapping sum of their hashes ([`crate::store::record_hash`]).
        digest: u64,
    },
    /// The digests of parts `first ..first + PARTS_PER_LINE` of the sender's store.
    Parts {
        /// The first part on the line: a multiple of [`PARTS_PER_LINE`].
        first: usize,
        /// The parts' digests, in order; boxed, so that the other verbs do not carry their
        /// 256 bytes too.
        digests: Box<[u64; PARTS_PER_LINE]>,
    },
    /// The receiver asks the sender of the link to send these parts of its store again, or
    /// the whole store.
    Sync(Option<PartSet>),
}

/// A set of the store's parts ([`crate::store::DIGEST_PARTS`] of them): a bitmap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartSet([u64; DIGEST_PARTS / 64]);

impl PartSet {
    /// Adds `part`.
    pub fn insert(&mut self, part: u8) {
        self.0[usize::from(part / 64)] |= 1 << (part % 64);
    }

    /// Whether `part` is in the set.
    pub fn contains(&self, part: u8) -> bool {
        self.0[usize::from(part / 64)] & (1 << (part % 64)) != 0
    }

    /// How many parts the set holds.
    pub fn len(&self) -> u32 {
        self.0.iter().map(|word| word.count_ones()).sum()
    }

    /// Whether the set holds no part. An empty set is never sent: `SYNC` with one is refused.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The parts in either set: what a copy under way and a new request cover together
    /// ([`crate::link::Link::resync`]).
    pub fn union(&self, other: &PartSet) -> PartSet {
        let mut both = *self;
        for (word, theirs) in both.0.iter_mut().zip(other.0) {
            *word |= theirs;
        }
        both
    }

    /// 64 hex digits, part 0 in the last.
    fn to_hex(self) -> String {
        self.0
            .iter()
            .rev()
            .map(|word| format!("{word:016x}"))
            .collect()
    }

    fn from_hex(hex: &[u8]) -> Option<PartSet> {
        if !is_hex(hex, DIGEST_PARTS / 4) {
            return None;
        }
        let mut set = PartSet::default();
        for (word, digits) in set.0.iter_mut().rev().zip(hex.chunks_exact(16)) {
            *word = hex_u64(digits)?;
        }
        Some(set)
    }
}

/// What a payload says (a line once opened, or the whole line without a secret). `None` for
/// anything else: the dialled link goes down on it, the inbound link logs and ignores it.
pub fn parse_line(payload: &[u8]) -> Option<PeerLine<'_>> {
    if payload.starts_with(b"AT ") {
        return Some(PeerLine::Record(payload)); // checked as a record by the caller
    }
    // 33 fields, more than the verbs below are split into: parsed on its own.
    if let Some(rest) = payload.strip_prefix(b"PARTS ") {
        return parse_parts(rest);
    }
    match fields::<4>(payload)? {
        ([b"PING", ..], 1) => Some(PeerLine::Ping),
        ([b"SYNC", ..], 1) => Some(PeerLine::Sync(None)),
        // An empty set is never asked for.
        ([b"SYNC", set, ..], 2) => Some(PeerLine::Sync(Some(
            PartSet::from_hex(set).filter(|set| !set.is_empty())?,
        ))),
        // A digest made another way (another build's) compares with nothing here: ignored.
        ([b"DIGEST", count, digest, scheme], 4) if scheme == DIGEST_SCHEME.as_bytes() => {
            Some(PeerLine::Digest {
                count: std::str::from_utf8(count).ok()?.parse().ok()?,
                digest: hex_u64(digest)?,
            })
        }
        _ => None,
    }
}

/// The number written in hex `digits`.
fn hex_u64(digits: &[u8]) -> Option<u64> {
    // Exactly as written: 16 lower-case digits, no sign (`from_str_radix` alone takes `+`,
    // upper case and fewer digits).
    if !is_hex(digits, 16) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// How the digest is made: [`crate::store::record_hash`], summed, and (for `PARTS`) a client's
/// part the top byte of the same hash of its id, 256 parts. Named in every `DIGEST`, so that
/// servers hashing records differently (different builds) ignore each other's digests instead
/// of resynchronising forever: a build that changes either must change the name. A build that
/// sent `DIGEST COUNT HEX`, with no scheme, hashed with FNV-1a; neither side reads the other's.
pub const DIGEST_SCHEME: &str = "fold64";

/// `DIGEST COUNT HEX SCHEME`.
fn digest_line(count: usize, digest: u64) -> Vec<u8> {
    format!("DIGEST {count} {digest:016x} {DIGEST_SCHEME}").into_bytes()
}

/// `PARTS FIRST HEX...`: the digests of parts `first ..first + PARTS_PER_LINE`, each in 16 hex
/// digits.
fn parts_line(first: usize, digests: &[u64]) -> Vec<u8> {
    let mut line = format!("PARTS {first}");
    for digest in digests {
        line.push_str(&format!(" {digest:016x}"));
    }
    line.into_bytes()
}

/// What the dialler sends every [`DIGEST_INTERVAL`] about `store`: its `PARTS` lines, then its
/// `DIGEST`, which the acceptor compares at.
pub fn store_lines(store: &Store) -> Vec<Vec<u8>> {
    let parts = store.part_digests().chunks(PARTS_PER_LINE).enumerate();
    let mut lines: Vec<Vec<u8>> = parts
        .map(|(i, digests)| parts_line(i * PARTS_PER_LINE, digests))
        .collect();
    lines.push(digest_line(store.len(), store.digest()));
    lines
}

/// The part digests after `PARTS `: a first part on a line's boundary, then exactly
/// [`PARTS_PER_LINE`] digests.
fn parse_parts(rest: &[u8]) -> Option<PeerLine<'_>> {
    let mut words = rest.split(|&b| b == b' ');
    // Decimal as written: digits only, no leading zero.
    let first = words.next().filter(|w| {
        !w.is_empty()
            && w.len() <= 3
            && w.iter().all(u8::is_ascii_digit)
            && (w.len() == 1 || w[0] != b'0')
    })?;
    let first: usize = std::str::from_utf8(first).ok()?.parse().ok()?;
    if !starts_a_line(first) {
        return None;
    }
    let mut digests = Box::new([0; PARTS_PER_LINE]);
    for digest in digests.iter_mut() {
        *digest = hex_u64(words.next().filter(|w| is_hex(w, 16))?)?;
    }
    match words.next() {
        Some(_) => None,
        None => Some(PeerLine::Parts { first, digests }),
    }
}

/// What the acceptor of a link makes of a `DIGEST`.
#[derive(Debug, PartialEq, Eq)]
pub enum Compared {
    /// The stores are the same.
    Same,
    /// They differ, but not for long enough to be more than updates in flight.
    InFlight,
    /// Copy these parts again both ways, or (`None`) the whole store.
    Resync(Option<PartSet>),
}

/// The acceptor's comparison of a dialler's store with its own, for one inbound link.
#[derive(Default)]
pub struct Comparison {
    /// From the first `PARTS` line on (a dialler of an older build sends none).
    parts: Option<Box<PartsCompared>>,
    /// Digests in a row that differed, for a dialler that sends no parts.
    mismatches: u32,
    /// The `DIGEST`s compared.
    compared: Heeded,
}

/// When a neighbour's request of one kind (a `DIGEST` to compare, a `SYNC` to copy for) was
/// last acted on: the next is acted on no sooner than [`ACT_AT_MOST_EVERY`] after it.
#[derive(Default)]
pub struct Heeded {
    at: Option<Instant>,
}

impl Heeded {
    /// Whether a request at `now` comes too soon after the last one acted on to be acted on;
    /// if not, it is the last from here on.
    pub fn too_soon(&mut self, now: Instant) -> bool {
        if self.at.is_some_and(|at| now < at + ACT_AT_MOST_EVERY) {
            return true;
        }
        self.at = Some(now);
        false
    }
}

struct PartsCompared {
    /// The dialler's part digests, from its latest `PARTS` lines.
    theirs: [u64; DIGEST_PARTS],
    /// Which `PARTS` lines arrived since the last `DIGEST`: bit `i` for parts from
    /// `i * PARTS_PER_LINE`.
    lines_seen: u32,
    /// For each part, the digests in a row at which it differed.
    mismatches: [u32; DIGEST_PARTS],
}

const PARTS_LINES: usize = DIGEST_PARTS / PARTS_PER_LINE;

/// Whether `first` is the first part of a `PARTS` line.
fn starts_a_line(first: usize) -> bool {
    first % PARTS_PER_LINE == 0 && first < DIGEST_PARTS
}

impl Comparison {
    /// Whether a `DIGEST` at `now` comes too soon after the last one compared to be compared
    /// ([`Heeded`]).
    pub fn too_soon(&mut self, now: Instant) -> bool {
        self.compared.too_soon(now)
    }

    /// A `PARTS` line.
    pub fn parts(&mut self, first: usize, digests: &[u64; PARTS_PER_LINE]) {
        if !starts_a_line(first) {
            return; // `parse_line` makes no such line
        }
        let parts = self.parts.get_or_insert_with(|| {
            Box::new(PartsCompared {
                theirs: [0; DIGEST_PARTS],
                lines_seen: 0,
                mismatches: [0; DIGEST_PARTS],
            })
        });
        parts.theirs[first..first + PARTS_PER_LINE].copy_from_slice(digests);
        parts.lines_seen |= 1 << (first / PARTS_PER_LINE);
    }

    /// A `DIGEST`, compared with `store`: the parts sent just before it decide what differs.
    /// `copying` while our own link is still copying our store to the dialler, whose store
    /// then lacks some of ours.
    pub fn digest(&mut self, count: u64, digest: u64, store: &Store, copying: bool) -> Compared {
        let same = (count, digest) == (store.len() as u64, store.digest());
        let every_part = (self.parts.as_mut())
            .is_some_and(|parts| std::mem::take(&mut parts.lines_seen) == (1 << PARTS_LINES) - 1);
        if same || copying {
            // Counting starts afresh, also once a copy is through.
            self.start_afresh();
            return if same {
                Compared::Same
            } else {
                Compared::InFlight
            };
        }
        if let Some(parts) = self.parts.as_mut().filter(|_| every_part) {
            let mut differ = PartSet::default();
            let mut any = false;
            let pairs = parts.theirs.iter().zip(store.part_digests());
            for ((part, mismatches), (theirs, ours)) in
                (0..=u8::MAX).zip(&mut parts.mismatches).zip(pairs)
            {
                if theirs == ours {
                    *mismatches = 0;
                    continue;
                }
                any = true;
                *mismatches += 1;
                if *mismatches >= MISMATCHES_BEFORE_SYNC {
                    *mismatches = 0;
                    differ.insert(part);
                }
            }
            // Parts that all agree with a whole that does not: the whole decides, below.
            if any {
                self.mismatches = 0;
                return match differ.is_empty() {
                    true => Compared::InFlight,
                    false => Compared::Resync(Some(differ)),
                };
            }
        }
        // Only the whole digest to go by.
        self.mismatches += 1;
        if self.mismatches < MISMATCHES_BEFORE_SYNC {
            return Compared::InFlight;
        }
        self.start_afresh();
        Compared::Resync(None)
    }

    /// Forgets every difference counted so far.
    fn start_afresh(&mut self) {
        self.mismatches = 0;
        if let Some(parts) = &mut self.parts {
            parts.mismatches.fill(0);
        }
    }
}

/// `SYNC` for the whole store, `SYNC SET` for some parts of it.
pub fn sync_line(parts: Option<&PartSet>) -> Vec<u8> {
    match parts {
        None => b"SYNC".to_vec(),
        Some(set) => format!("SYNC {}", set.to_hex()).into_bytes(),
    }
}

/// An authenticated connection's keys and counters.
pub struct Session {
    /// `HMAC(secret, "session" ND NA)`: new for every connection, so a line fits no other.
    key: hmac::Key,
    /// Direction labels: what this side signs with, and what it expects the other to.
    send_label: u8,
    receive_label: u8,
    /// Lines sealed and opened so far: the `SEQ` of the next line each way.
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

    /// The tag covers the direction, so that a line cannot be reflected back to its sender,
    /// and `SEQ`, which [`Session::open`] requires to be the next one expected: a line replayed,
    /// dropped or moved shows as a `SEQ` out of turn, and a `SEQ` altered fails the tag.
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
        assert_eq!(parse_line(b"SYNC"), Some(PeerLine::Sync(None)));
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

    #[test]
    fn part_lines_and_sync_sets() {
        let digests: Vec<u64> = (0..PARTS_PER_LINE as u64).map(|i| i << 60 | i).collect();
        let line = parts_line(64, &digests);
        assert!(line.starts_with(b"PARTS 64 0000000000000000 1000000000000001 "));
        assert_eq!(line.len(), "PARTS 64".len() + PARTS_PER_LINE * 17);
        let Some(PeerLine::Parts {
            first,
            digests: got,
        }) = parse_line(&line)
        else {
            panic!("not parsed: {}", String::from_utf8_lossy(&line));
        };
        assert_eq!((first, &got[..]), (64, &digests[..]));
        // A first part off a line's boundary or past the end, a digest too few or too many, or
        // one that is not 16 lower-case hex digits: not a PARTS line.
        let text = String::from_utf8(line).unwrap();
        let bad = [
            text.replacen("PARTS 64", "PARTS 65", 1),
            text.replacen("PARTS 64", "PARTS 256", 1),
            text.replacen("PARTS 64", "PARTS x", 1),
            text.replacen("PARTS 64", "PARTS +64", 1),
            text.replacen("PARTS 64", "PARTS 064", 1),
            text[..text.len() - 17].to_string(),
            format!("{text} 0000000000000000"),
            format!("{text} "),
            text.replacen(" 1000000000000001", " 100000000000000F", 1),
            text.replacen(" 1000000000000001", " 10000000000000001", 1),
            text.replacen(" 1000000000000001", "  000000000000001", 1),
        ];
        for line in &bad {
            assert_eq!(parse_line(line.as_bytes()), None, "{line}");
        }

        let mut set = PartSet::default();
        assert!(set.is_empty());
        for part in [0, 1, 63, 64, 200, 255] {
            set.insert(part);
        }
        assert_eq!(set.len(), 6);
        assert!(set.contains(200) && !set.contains(199));
        // Part 0 is the last hex digit, part 255 the first.
        let line = sync_line(Some(&set));
        assert_eq!(
            String::from_utf8(line.clone()).unwrap(),
            format!(
                "SYNC 8000000000000100{}{}18000000000000003",
                "0".repeat(16),
                "0".repeat(15)
            )
        );
        assert_eq!(parse_line(&line), Some(PeerLine::Sync(Some(set))));
        assert_eq!(sync_line(None), b"SYNC");
        assert_eq!(parse_line(b"SYNC 0123"), None);
        assert_eq!(
            parse_line(sync_line(Some(&PartSet::default())).as_slice()),
            None
        );
        assert_eq!(parse_line(&[&line[..], b" x"].concat()), None);
        let mut other = PartSet::default();
        other.insert(7);
        assert_eq!(set.union(&other).len(), 7);
    }

    /// Records for clients `names`, each at time `t`, in a fresh store.
    fn store_of(names: &[&str], t: u64) -> Store {
        let mut store = Store::default();
        for name in names {
            let line = format!("AT A +0.000000001 {name} +1+1 {t}");
            store.merge(name.as_bytes(), i128::from(t), line.as_bytes());
        }
        store
    }

    /// Gives `comparison` the `PARTS` lines a dialler holding `theirs` sends, as parsed.
    fn parts_of(comparison: &mut Comparison, theirs: &Store) {
        for line in store_lines(theirs) {
            match parse_line(&line) {
                Some(PeerLine::Parts { first, digests }) => comparison.parts(first, &digests),
                Some(PeerLine::Digest { .. }) => {}
                _ => panic!(
                    "a line that does not parse: {}",
                    String::from_utf8_lossy(&line)
                ),
            }
        }
    }

    /// What `comparison` makes of `theirs` sent as a dialler sends it: its parts, then its
    /// digest, compared with `ours`.
    fn compare(comparison: &mut Comparison, theirs: &Store, ours: &Store) -> Compared {
        parts_of(comparison, theirs);
        comparison.digest(theirs.len() as u64, theirs.digest(), ours, false)
    }

    #[test]
    fn only_a_part_that_differs_twice_in_a_row_is_copied_again() {
        let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
        let ours = store_of(&names, 1);
        let mut comparison = Comparison::default();
        assert_eq!(compare(&mut comparison, &ours, &ours), Compared::Same);
        // "a" missing at theirs twice in a row: a's part, and only it.
        let without_a = store_of(&names[1..], 1);
        let mut a = PartSet::default();
        a.insert(crate::store::part_of(b"a"));
        assert_eq!(
            compare(&mut comparison, &without_a, &ours),
            Compared::InFlight
        );
        assert_eq!(
            compare(&mut comparison, &without_a, &ours),
            Compared::Resync(Some(a))
        );
        // Differences that move from part to part, as updates in flight do: nothing copied.
        let without_b = store_of(&[&names[..1], &names[2..]].concat(), 1);
        let b = crate::store::part_of(b"b");
        let c = crate::store::part_of(b"c");
        assert_ne!(b, c, "pick two clients in different parts");
        let without_c = store_of(&[&names[..2], &names[3..]].concat(), 1);
        for _ in 0..3 {
            assert_eq!(
                compare(&mut comparison, &without_b, &ours),
                Compared::InFlight
            );
            assert_eq!(
                compare(&mut comparison, &without_c, &ours),
                Compared::InFlight
            );
        }
        // Stores that agree reset the count.
        assert_eq!(
            compare(&mut comparison, &without_a, &ours),
            Compared::InFlight
        );
        assert_eq!(compare(&mut comparison, &ours, &ours), Compared::Same);
        assert_eq!(
            compare(&mut comparison, &without_a, &ours),
            Compared::InFlight
        );
    }

    #[test]
    fn nothing_counts_while_our_copy_to_them_is_under_way() {
        let ours = store_of(&["a", "b"], 1);
        let theirs = store_of(&["a"], 1);
        let mut comparison = Comparison::default();
        assert_eq!(compare(&mut comparison, &theirs, &ours), Compared::InFlight);
        parts_of(&mut comparison, &theirs);
        let copying = comparison.digest(theirs.len() as u64, theirs.digest(), &ours, true);
        assert_eq!(copying, Compared::InFlight);
        // Once the copy is through, counting starts afresh.
        assert_eq!(compare(&mut comparison, &theirs, &ours), Compared::InFlight);
        assert!(matches!(
            compare(&mut comparison, &theirs, &ours),
            Compared::Resync(Some(_))
        ));
    }

    #[test]
    fn parts_that_agree_with_a_whole_that_does_not_leave_the_whole_to_decide() {
        let ours = store_of(&["a", "b"], 1);
        let mut comparison = Comparison::default();
        // The dialler's parts are ours, its whole digest is not: a dialler at odds with itself.
        let odd = |c: &mut Comparison| {
            parts_of(c, &ours);
            c.digest(ours.len() as u64, ours.digest() ^ 1, &ours, false)
        };
        assert_eq!(odd(&mut comparison), Compared::InFlight);
        assert_eq!(odd(&mut comparison), Compared::Resync(None));
    }

    #[test]
    fn without_every_part_the_whole_digest_decides() {
        let ours = store_of(&["a", "b"], 1);
        let theirs = store_of(&["a"], 1);
        let mut comparison = Comparison::default();
        // A dialler that sends no parts.
        let digest_only =
            |c: &mut Comparison| c.digest(theirs.len() as u64, theirs.digest(), &ours, false);
        assert_eq!(digest_only(&mut comparison), Compared::InFlight);
        assert_eq!(digest_only(&mut comparison), Compared::Resync(None));
        assert_eq!(digest_only(&mut comparison), Compared::InFlight);
        // Parts count only until the next digest: one line missing, and the whole decides.
        let line = parts_line(0, &theirs.part_digests()[..PARTS_PER_LINE]);
        let Some(PeerLine::Parts { first, digests }) = parse_line(&line) else {
            panic!("a PARTS line that does not parse");
        };
        comparison.parts(first, &digests);
        assert_eq!(digest_only(&mut comparison), Compared::Resync(None));
    }
}
