//! What the server counts as it works, for its admin endpoint's `/metrics` ([`crate::admin`]).
//!
//! Counters are plain integers the loop adds to where things happen: no atomics, no locks, no
//! allocation, so counting costs the client path nothing measurable. The Prometheus text is made
//! only when a scraper asks, by [`crate::admin`], from these counts and the server's state.

/// A histogram of durations in seconds, with fixed bucket bounds (Prometheus's `le`).
///
/// Fixed bounds, chosen for what each histogram measures, keep an observation to a short scan
/// and an increment, with no allocation; the price is a resolution no finer than the bounds.
#[derive(Debug, Clone)]
pub struct Histogram {
    /// The buckets' upper bounds, in seconds, ascending.
    pub bounds: &'static [f64],
    /// How many observations fell at or under each bound (not cumulative; the text makes them
    /// so), and over the last.
    pub counts: Vec<u64>,
    /// The sum of every observation, in seconds (Prometheus's `_sum`).
    pub sum: f64,
    /// How many observations there were (Prometheus's `_count`, and the `+Inf` bucket).
    pub count: u64,
}

impl Histogram {
    /// An empty histogram with these bounds (ascending), and one bucket more past the last.
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Counts one duration of `seconds` in the first bucket whose bound it does not pass.
    pub fn observe(&mut self, seconds: f64) {
        let at = self
            .bounds
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(self.bounds.len());
        self.counts[at] += 1;
        self.sum += seconds;
        self.count += 1;
    }
}

/// Bounds of a turn of the loop, from ten microseconds to a second.
pub const TURN_BOUNDS: &[f64] = &[
    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
];
/// Bounds of a Places request, from ten milliseconds to ten seconds.
pub const PLACES_BOUNDS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Bounds of a sync of the store's file to the disk, from 100 µs to a second.
pub const SYNC_BOUNDS: &[f64] = &[0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0];

/// The verbs a client's command is counted by, the `verb` label's values: `other` is any line
/// that is neither a valid IAMAT nor a valid WHATSAT (a blank line is not counted).
pub const VERBS: [&str; 3] = ["IAMAT", "WHATSAT", "other"];
/// What became of a command, the `result` label's values: answered as asked (`ok`), answered
/// `?` for what it said (`invalid`), or turned away by a limit (`refused`).
pub const RESULTS: [&str; 3] = ["ok", "invalid", "refused"];

/// The `reason` labels, by [`CloseReason::kind`](crate::conn::CloseReason::kind).
pub const CLOSE_KINDS: [&str; 10] = [
    "end_of_stream",
    "io_error",
    "line_too_long",
    "line_timeout",
    "idle",
    "not_reading",
    "peer_line_from_client",
    "handshake",
    "peer_link",
    "busy",
];

/// Counts of one neighbour's links: kept by the link we dialled, but for the bytes received,
/// which the one it dialled adds.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkCounts {
    /// Bytes written on the link we dialled.
    pub bytes_sent: u64,
    /// Bytes read on the link the neighbour dialled.
    pub bytes_received: u64,
    /// Times it came up (our dialled link).
    pub ups: u64,
    /// Copies of the store, or of parts of it, made again at the neighbour's asking or ours.
    pub resyncs: u64,
    /// The parts those copies covered: a copy of the whole store counts every one of
    /// [`crate::store::DIGEST_PARTS`].
    pub parts_copied: u64,
}

/// Every count of one server. Counters only grow, from zero at start: Prometheus reads a fall
/// as a restart.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Connections accepted into a slot.
    pub accepted: u64,
    /// Connections refused at once, before they had a slot (too many from their address, or
    /// every place taken).
    pub refused: u64,
    /// Connections closed (clients, and neighbours' inbound links), by [`CloseReason::kind`](crate::conn::CloseReason::kind).
    pub closed: [u64; CLOSE_KINDS.len()],
    /// By verb and result ([`VERBS`], [`RESULTS`]).
    pub commands: [[u64; RESULTS.len()]; VERBS.len()],
    /// Clients' IAMATs that changed the store.
    pub stored_from_clients: u64,
    /// Neighbours' records that changed the store.
    pub stored_from_peers: u64,
    /// Records from neighbours refused (out of bounds) or invalid.
    pub refused_records: u64,
    /// Turns of the loop.
    pub turns: u64,
    /// Readiness events the loop handled, over every turn.
    pub events: u64,
    /// How long each turn's work took (not its wait in `poll`).
    pub turn_seconds: Histogram,
}

/// What the Places pool counts: requests by outcome ([`PLACES_OUTCOMES`]) and their time.
#[derive(Debug, Clone)]
pub struct PlacesCounts {
    /// Requests by outcome, indexed like [`PLACES_OUTCOMES`].
    pub outcomes: [u64; 4],
    /// Seconds from a WHATSAT's turn to its reply, for every outcome.
    pub seconds: Histogram,
}

impl Default for PlacesCounts {
    fn default() -> PlacesCounts {
        PlacesCounts {
            outcomes: [0; 4],
            seconds: Histogram::new(PLACES_BOUNDS),
        }
    }
}

/// The outcomes of a Places request, as the `outcome` label says them. The first is the one
/// success; `herd status` counts the others as errors.
pub const PLACES_OUTCOMES: [&str; 4] = ["answered", "failed", "late", "busy"];

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Every count at zero.
    pub fn new() -> Metrics {
        Metrics {
            accepted: 0,
            refused: 0,
            closed: [0; CLOSE_KINDS.len()],
            commands: [[0; RESULTS.len()]; VERBS.len()],
            stored_from_clients: 0,
            stored_from_peers: 0,
            refused_records: 0,
            turns: 0,
            events: 0,
            turn_seconds: Histogram::new(TURN_BOUNDS),
        }
    }

    /// A command of `verb` ended with `result` (indices of [`VERBS`] and [`RESULTS`]).
    pub fn command(&mut self, verb: usize, result: usize) {
        self.commands[verb][result] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_each_observation_in_its_bucket() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.1, 0.5, 2.0] {
            h.observe(v);
        }
        assert_eq!(h.counts, [2, 1, 1]);
        assert_eq!(h.count, 4);
        assert!((h.sum - 2.65).abs() < 1e-9);
    }
}
