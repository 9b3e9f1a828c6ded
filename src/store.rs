//! The latest known record of every client.
//!
//! Records live in a `Vec` in the order their clients were first seen, with a map from client id
//! to position. Clients are never removed, so a position is stable: a peer link re-synchronising
//! after a reconnect walks the store with a plain index as its cursor while the store keeps
//! changing (see [`crate::link`]).
//!
//! Besides the digest of the whole store, the store keeps the digest of each of
//! [`DIGEST_PARTS`] parts, a record's part chosen by its client. Two servers whose stores differ
//! only by the updates in flight between them differ in a few parts at any moment, and in
//! different parts from one moment to the next; a part that differs twice in a row is copied
//! again, not the whole store (see [`crate::peer`]).

use std::collections::HashMap;

use crate::protocol::{is_newer, parse_at_record};
use memchr::memchr;

/// One client's latest update: the `AT` line exactly as first sent, and its client time.
#[derive(Debug)]
pub struct Record {
    /// The client's time in nanoseconds since the epoch, parsed once when the record is
    /// stored: every merge compares it.
    pub time_ns: i128,
    /// The `AT` line, without its `\n`. Never rebuilt: it is sent on byte for byte.
    pub line: Box<[u8]>,
}

/// What a merge did.
#[derive(Debug, PartialEq, Eq)]
pub enum Merge {
    /// The record is new or newer than what was held: stored, to be flooded.
    Stored,
    /// The store already held this record or a newer one: nothing changed, nothing to flood.
    Stale,
    /// A new client, and the store already holds as many as it may: refused.
    Full,
    /// A record whose client time lies further ahead of this server's clock than it may:
    /// refused (it would pin its client's record until then, on every server).
    Ahead,
    /// A record whose client id is longer than a client id may be: refused.
    LongId,
}

/// What a record from a neighbour must keep to: checked here, where it is parsed anyway.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// The longest client id accepted. Checked for a client not yet held only: a held
    /// client's id was accepted when it came.
    pub max_id_bytes: usize,
    /// The latest client time accepted, in nanoseconds since the epoch.
    pub latest_ns: i128,
}

impl Bounds {
    /// No bound at all.
    pub const NONE: Bounds = Bounds {
        max_id_bytes: usize::MAX,
        latest_ns: i128::MAX,
    };
}

/// How many parts the store's digest is also kept in.
pub const DIGEST_PARTS: usize = 256;

/// The latest record of every client (see the module docs): the records in the order their
/// clients came, an index by client id, and digests that every merge keeps up to date.
#[derive(Debug)]
pub struct Store {
    /// The most clients the store holds: the memory a flood of new client ids can make a
    /// server hold is bounded by it.
    max_clients: usize,
    records: Vec<Record>,
    /// The bytes of every record line held.
    bytes: usize,
    /// Client id to position in `records`.
    index: HashMap<Box<[u8]>, usize>,
    /// The wrapping sum of [`record_hash`] over every record: the same for the same set of
    /// records whatever order they arrived in, and updated in O(1) by each merge.
    digest: u64,
    /// The same sum over the records of each part.
    parts: Box<[u64]>,
    /// The part of the record at each position, kept so that copying a few parts again reads
    /// one byte per record it skips, not the record.
    part_at: Vec<u8>,
}

impl Default for Store {
    fn default() -> Store {
        Store::new(usize::MAX)
    }
}

impl Store {
    /// An empty store for at most `max_clients` clients.
    pub fn new(max_clients: usize) -> Store {
        Store {
            max_clients,
            records: Vec::new(),
            bytes: 0,
            index: HashMap::new(),
            digest: 0,
            parts: vec![0; DIGEST_PARTS].into_boxed_slice(),
            part_at: Vec::new(),
        }
    }
}

/// The part of the digest a client's records count in: the same in every server.
pub fn part_of(client: &[u8]) -> u8 {
    (record_hash(client) >> 56) as u8
}

/// A record's contribution to the digest, the same in every server: its bytes taken 8 at a
/// time, each folded into the state by a 64 × 64 → 128-bit multiply (high half XOR low half),
/// then splitmix64's final mix, so that records differing in one byte differ in about half the
/// bits. Eight bytes per multiply: every merge that replaces a record hashes two lines. Not a
/// defence against an adversary: records are authenticated on the way in when that matters.
pub fn record_hash(line: &[u8]) -> u64 {
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
    fn fold(state: u64, word: u64) -> u64 {
        let product = u128::from(state ^ word) * u128::from(MULTIPLIER);
        (product as u64) ^ ((product >> 64) as u64)
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ line.len() as u64;
    let mut words = line.chunks_exact(8);
    let mut word = [0u8; 8];
    for chunk in &mut words {
        word.copy_from_slice(chunk);
        h = fold(h, u64::from_le_bytes(word));
    }
    let tail = words.remainder();
    word = [0; 8];
    word[..tail.len()].copy_from_slice(tail);
    h = fold(h, u64::from_le_bytes(word));
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The fourth of a line's fields separated by single spaces (a record's client id); empty if
/// there are fewer.
fn fourth_field(line: &[u8]) -> &[u8] {
    let mut rest = line;
    for _ in 0..3 {
        match memchr(b' ', rest) {
            Some(space) => rest = &rest[space + 1..],
            None => return &[],
        }
    }
    &rest[..memchr(b' ', rest).unwrap_or(rest.len())]
}

impl Store {
    /// Keeps `line` as `client`'s record if it is newer than the one held (docs/protocol.md
    /// section 3, "Which record wins"). `client` is `line`'s fourth field, as in every `AT` line.
    pub fn merge(&mut self, client: &[u8], time_ns: i128, line: &[u8]) -> Merge {
        match self.index.get(client) {
            Some(&at) => self.replace_if_newer(at, time_ns, line),
            None => self.insert_new(client, time_ns, line, self.max_clients),
        }
    }

    /// How many clients a neighbour's records (and the store's file, which holds them) may
    /// bring: `max_clients` and an eighth more. Servers that take new clients at the same
    /// moment, each just under `max_clients`, together pass it; if each then refused the
    /// others' records, their stores would differ for good, and every comparison of digests
    /// would copy the difference again, to be refused again. The margin takes those records
    /// in; new clients from clients stop at `max_clients` everywhere, so only such races use it.
    fn records_limit(&self) -> usize {
        self.max_clients
            .saturating_add(self.max_clients / 8)
            .saturating_add(64)
    }

    /// Room for `additional` more clients (at most up to `max_clients`), made at once: a replay
    /// that knows how many records are coming grows the index once instead of rehashing every
    /// key at each doubling.
    pub fn reserve(&mut self, additional: usize) {
        let room = additional.min(self.records_limit().saturating_sub(self.records.len()));
        self.index.reserve(room);
        self.records.reserve(room);
        self.part_at.reserve(room);
    }

    /// Stores the first record of `client`, which the caller has just looked up and not found
    /// (so the index is searched once, not twice, for a new client).
    fn insert_new(&mut self, client: &[u8], time_ns: i128, line: &[u8], limit: usize) -> Merge {
        if self.records.len() >= limit {
            return Merge::Full;
        }
        self.index.insert(client.into(), self.records.len());
        self.bytes += line.len();
        let part = part_of(client);
        self.count(part, record_hash(line));
        self.part_at.push(part);
        self.records.push(Record {
            time_ns,
            line: line.into(),
        });
        Merge::Stored
    }

    /// Replaces the record at `at` with `line` if `line` is newer.
    fn replace_if_newer(&mut self, at: usize, time_ns: i128, line: &[u8]) -> Merge {
        let held = &mut self.records[at];
        if !is_newer(time_ns, line, held.time_ns, &held.line) {
            return Merge::Stale;
        }
        let change = record_hash(line).wrapping_sub(record_hash(&held.line));
        self.bytes = self.bytes + line.len() - held.line.len();
        *held = Record {
            time_ns,
            line: line.into(),
        };
        self.count(self.part_at[at], change);
        Merge::Stored
    }

    /// Adds `change` (wrapping) to the digest of the store and of `part`.
    fn count(&mut self, part: u8, change: u64) {
        self.digest = self.digest.wrapping_add(change);
        let part = &mut self.parts[usize::from(part)];
        *part = part.wrapping_add(change);
    }

    /// The stored `AT` line of `client`.
    pub fn get(&self, client: &[u8]) -> Option<&[u8]> {
        self.index.get(client).map(|&at| &*self.records[at].line)
    }

    /// Merges a record line from a peer; `None` when it is not a valid record. Flooding brings
    /// most records once per path, so an exact copy of the record held is known as stale before
    /// any checking (it was checked when it was stored), and a record for a client already held
    /// costs one lookup, not two.
    pub fn merge_record(&mut self, line: &[u8], bounds: &Bounds) -> Option<Merge> {
        // For a valid record, the fourth field is the client (`parse_at_record` splits on
        // single spaces too).
        let Some(&at) = self.index.get(fourth_field(line)) else {
            let record = parse_at_record(line)?;
            if record.client.len() > bounds.max_id_bytes {
                return Some(Merge::LongId);
            }
            if record.time_ns > bounds.latest_ns {
                return Some(Merge::Ahead);
            }
            // The client looked up above is the record's: it is new.
            return Some(self.insert_new(
                record.client,
                record.time_ns,
                line,
                self.records_limit(),
            ));
        };
        if *self.records[at].line == *line {
            return Some(Merge::Stale);
        }
        let record = parse_at_record(line)?;
        if record.time_ns > bounds.latest_ns {
            return Some(Merge::Ahead);
        }
        Some(self.replace_if_newer(at, record.time_ns, line))
    }

    /// The record at `position` (0 ..len()), for walking the store in batches.
    pub fn at(&self, position: usize) -> Option<&Record> {
        self.records.get(position)
    }

    /// How many clients the store holds, one record each.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// The bytes of every record line held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether it holds no client at all.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The order-independent digest of every record held.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// The digest of each part: [`DIGEST_PARTS`] of them.
    pub fn part_digests(&self) -> &[u64] {
        &self.parts
    }

    /// The part of the record at `position` (0 ..len()).
    pub fn part_at(&self, position: usize) -> Option<u8> {
        self.part_at.get(position).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_wins_and_stale_is_ignored() {
        let mut store = Store::default();
        assert_eq!(store.merge(b"k", 5, b"AT A +0 k +1+1 5"), Merge::Stored);
        assert_eq!(store.merge(b"k", 4, b"AT B +0 k +1+1 4"), Merge::Stale);
        assert_eq!(store.merge(b"k", 5, b"AT A +0 k +1+1 5"), Merge::Stale);
        assert_eq!(store.merge(b"k", 5, b"AT B +0 k +1+1 5"), Merge::Stored);
        assert_eq!(store.get(b"k"), Some(&b"AT B +0 k +1+1 5"[..]));
        assert_eq!(store.merge(b"j", 1, b"AT A +0 j +1+1 1"), Merge::Stored);
        assert_eq!(store.len(), 2);
        assert_eq!(&*store.at(1).unwrap().line, b"AT A +0 j +1+1 1");
    }

    #[test]
    fn a_record_line_merges_as_its_fields_say() {
        const HELD: &[u8] = b"AT A +0.000000001 k +1+1 5";
        let mut store = Store::default();
        assert_eq!(store.merge_record(HELD, &Bounds::NONE), Some(Merge::Stored));
        assert_eq!(store.merge_record(HELD, &Bounds::NONE), Some(Merge::Stale));
        let cases: [(&[u8], Option<Merge>); 7] = [
            (b"AT A +0.000000001 k +1+1 4", Some(Merge::Stale)), // older
            (b"AT A +0.000000001 k +1+1 6", Some(Merge::Stored)), // newer
            (b"AT A +0.000000001 k +1+1 6", Some(Merge::Stale)), // now a copy
            (b"AT B +0.000000001 k +1+1 6", Some(Merge::Stored)), // same time, later bytes
            (b"AT A +0.000000001 j +1+1 1", Some(Merge::Stored)), // another client
            (b"AT A +0.000000001 k +1+1 7 ", None),              // a held client, bad line
            (b"AT A +0.000000001 q +91+1 1", None),              // a new client, bad line
        ];
        for (line, merged) in cases {
            assert_eq!(
                store.merge_record(line, &Bounds::NONE),
                merged,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(store.len(), 2);
        assert_eq!(store.get(b"k"), Some(&b"AT B +0.000000001 k +1+1 6"[..]));
        // The digest is the one of a store given the same records by `merge`.
        let mut same = Store::default();
        same.merge(b"k", 6_000_000_000, b"AT B +0.000000001 k +1+1 6");
        same.merge(b"j", 1_000_000_000, b"AT A +0.000000001 j +1+1 1");
        assert_eq!(store.digest(), same.digest());
    }

    #[test]
    fn a_bounded_store_refuses_new_clients_past_its_cap_and_records_out_of_bounds() {
        let mut store = Store::new(2);
        assert_eq!(store.merge(b"a", 1, b"AT A +0 a +1+1 1"), Merge::Stored);
        assert_eq!(store.merge(b"b", 1, b"AT A +0 b +1+1 1"), Merge::Stored);
        assert_eq!(store.merge(b"c", 1, b"AT A +0 c +1+1 1"), Merge::Full);
        assert_eq!(store.len(), 2);
        // A client already held is still updated.
        assert_eq!(store.merge(b"a", 2, b"AT A +0 a +1+1 2"), Merge::Stored);
        // A neighbour's record of a new client has a margin past the cap (an eighth, and 64).
        let none = Bounds::NONE;
        for i in 0..64 {
            let line = format!("AT B +0.000000000 n{i} +1+1 1");
            assert_eq!(
                store.merge_record(line.as_bytes(), &none),
                Some(Merge::Stored)
            );
        }
        let past = b"AT B +0.000000000 past +1+1 1";
        assert_eq!(store.merge_record(past, &none), Some(Merge::Full));
        assert_eq!(store.len(), 66);
        let bounds = Bounds {
            max_id_bytes: 3,
            latest_ns: 10_000_000_000,
        };
        let mut open = Store::default();
        let cases: [(&[u8], Merge); 4] = [
            (b"AT A +0.000000000 abcd +1+1 1", Merge::LongId),
            (b"AT A +0.000000000 abc +1+1 10.000000001", Merge::Ahead),
            (b"AT A +0.000000000 abc +1+1 10", Merge::Stored),
            // A client held may not be pinned either.
            (b"AT A +0.000000000 abc +1+1 11", Merge::Ahead),
        ];
        for (line, merged) in cases {
            let shown = String::from_utf8_lossy(line);
            assert_eq!(open.merge_record(line, &bounds), Some(merged), "{shown}");
        }
        assert_eq!(open.len(), 1);
    }

    #[test]
    fn the_record_hash_is_fixed_and_sees_every_byte() {
        // Servers compare digests (`peer::DIGEST_SCHEME` names this hash): every build that
        // names it must hash a record the same way.
        assert_eq!(record_hash(b""), 0x1e90_fe10_2805_b64e);
        // The tail is padded with zero bytes, and the length keeps a zero byte from vanishing.
        assert_ne!(record_hash(b"\0"), record_hash(b""));
        let line =
            b"AT Bailey +0.263873386 kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503";
        assert_eq!(record_hash(line), 0xd0b8_78c1_a770_3513);
        // One byte changed anywhere, or one byte more or less, changes the hash.
        for i in 0..line.len() {
            let mut other = line.to_vec();
            other[i] ^= 1;
            assert_ne!(record_hash(&other), record_hash(line), "byte {i}");
            assert_ne!(record_hash(&line[..i]), record_hash(line), "prefix {i}");
        }
        assert_ne!(record_hash(b"AT\0"), record_hash(b"AT"));
    }

    #[test]
    fn the_digest_depends_on_the_records_not_their_order() {
        let updates: [(&[u8], i128, &[u8]); 4] = [
            (b"k", 5, b"AT A +0 k +1+1 5"),
            (b"j", 1, b"AT A +0 j +1+1 1"),
            (b"k", 6, b"AT B +0 k +1+1 6"),
            (b"k", 4, b"AT B +0 k +1+1 4"),
        ];
        let mut forward = Store::default();
        let mut backward = Store::default();
        for &(c, t, l) in &updates {
            forward.merge(c, t, l);
        }
        for &(c, t, l) in updates.iter().rev() {
            backward.merge(c, t, l);
        }
        assert_eq!(forward.digest(), backward.digest());
        let mut fewer = Store::default();
        fewer.merge(b"j", 1, b"AT A +0 j +1+1 1");
        assert_ne!(forward.digest(), fewer.digest());
        fewer.merge(b"k", 6, b"AT B +0 k +1+1 6");
        assert_eq!(forward.digest(), fewer.digest());
    }

    #[test]
    fn the_parts_add_up_to_the_digest_and_follow_the_client() {
        let mut store = Store::default();
        for i in 0..1000u32 {
            let client = format!("client-{}", i % 300);
            let line = format!("AT A +0 {client} +1+1 {i}");
            store.merge(client.as_bytes(), i128::from(i), line.as_bytes());
        }
        let sum = store
            .part_digests()
            .iter()
            .fold(0u64, |sum, part| sum.wrapping_add(*part));
        assert_eq!(store.part_digests().len(), DIGEST_PARTS);
        assert_eq!(sum, store.digest());
        // Each part holds exactly its clients' latest records.
        let mut parts = vec![0u64; DIGEST_PARTS];
        for position in 0..store.len() {
            let line = &store.at(position).unwrap().line;
            let part = part_of(fourth_field(line));
            assert_eq!(store.part_at(position), Some(part));
            parts[usize::from(part)] = parts[usize::from(part)].wrapping_add(record_hash(line));
        }
        assert_eq!(store.part_digests(), &parts[..]);
        assert_eq!(store.part_at(store.len()), None);
        // Spread over the parts: 300 clients thrown at random into 256 parts fill about 177.
        let used = parts.iter().filter(|&&p| p != 0).count();
        assert!(used > 150, "300 clients in only {used} parts");
        // The part of a client is fixed, the same in every server (`peer::DIGEST_SCHEME`
        // names it): pinned, like the record hash.
        assert_eq!(part_of(b"kiwi.cs.ucla.edu"), 2);
    }
}
