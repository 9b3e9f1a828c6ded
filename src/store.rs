//! The latest known record of every client.
//!
//! Records live in a `Vec` in the order their clients were first seen, with a map from client id
//! to position. Clients are never removed, so a position is stable: a peer link re-synchronising
//! after a reconnect walks the store with a plain index as its cursor while the store keeps
//! changing (see [`crate::link`]).

use std::collections::HashMap;

use crate::protocol::is_newer;

/// One client's latest update: the `AT` line exactly as first sent, and its client time.
#[derive(Debug)]
pub struct Record {
    pub time_ns: i128,
    pub line: Box<[u8]>,
}

/// What a merge did.
#[derive(Debug, PartialEq, Eq)]
pub enum Merge {
    /// The record is new or newer than what was held: stored, to be flooded.
    Stored,
    /// The store already held this record or a newer one: nothing changed, nothing to flood.
    Stale,
}

#[derive(Debug, Default)]
pub struct Store {
    records: Vec<Record>,
    index: HashMap<Box<[u8]>, usize>,
}

impl Store {
    /// Keeps `line` as `client`'s record if it is newer than the one held (SPEC.md section 3,
    /// "Which record wins").
    pub fn merge(&mut self, client: &[u8], time_ns: i128, line: &[u8]) -> Merge {
        match self.index.get(client) {
            Some(&at) => {
                let held = &mut self.records[at];
                if !is_newer(time_ns, line, held.time_ns, &held.line) {
                    return Merge::Stale;
                }
                *held = Record {
                    time_ns,
                    line: line.into(),
                };
            }
            None => {
                self.index.insert(client.into(), self.records.len());
                self.records.push(Record {
                    time_ns,
                    line: line.into(),
                });
            }
        }
        Merge::Stored
    }

    /// The stored `AT` line of `client`.
    pub fn get(&self, client: &[u8]) -> Option<&[u8]> {
        self.index.get(client).map(|&at| &*self.records[at].line)
    }

    /// The record at `position` (0 ..len()), for walking the store in batches.
    pub fn at(&self, position: usize) -> Option<&Record> {
        self.records.get(position)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
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
}
