//! Watching the loop: `herd serve NAME --trace` (or `herd up --trace`) prints, on standard
//! error, what the loop does and what the data does, one line per step:
//!
//! ```text
//!  3514262801355 Bailey turn 12: woken by c3 readable+writable
//!  3514262801362 Bailey   c3 read 58 bytes
//!  3514262801366 Bailey   c3 < IAMAT kiwi +34.068930-118.445127 1621464827.959498503
//!  3514262801371 Bailey   store kiwi: stored
//!  3514262801373 Bailey   link Bona > AT Bailey +0.263873386 kiwi +34.068930-118.445127 ...
//!  3514262801380 Bailey   c3: Undecided -> Client
//!  3514262801391 Bailey   c3 > AT Bailey +0.263873386 kiwi +34.068930-118.445127 ...
//!  3514262801402 Bailey sleep: up to 998 ms (the next deadline)
//! ```
//!
//! Each line starts with a time stamp in microseconds of the system's monotonic clock, which
//! every process of the machine shares, and the server's name: `herd up --trace` merges its
//! servers' traces in time order, so one IAMAT can be followed from the client socket of one
//! server to the store of the farthest. `herd trace-svg` draws such a trace as a sequence
//! diagram ([`crate::tools::trace_svg`]).
//!
//! What is traced: what woke each turn; bytes read; every line parsed, on a client's connection
//! or a link either way; every record stored; every line sent on a link; every reply written;
//! every state transition (old -> new; `c3: Undecided -> Client` above is a client that stays
//! connected: `herd iamat`, which half-closes at once, shows `Undecided -> Draining`), which the loop ([`crate::server`]) finds by comparing a
//! machine's state name before and after it handles an event. Off by default, and then free:
//! every trace point is one check of the `log` crate's maximum level, and nothing is formatted.

use std::sync::OnceLock;

/// The `log` target of the trace lines.
pub const TARGET: &str = "herd::trace";

/// The server's name, set once at start: one process runs one server.
static SERVER: OnceLock<String> = OnceLock::new();

/// Names the server whose loop is traced. Only the first call counts.
pub fn set_server(name: &str) {
    let _ = SERVER.set(name.to_owned());
}

/// The traced server's name; `herd` before one is set.
pub fn server() -> &'static str {
    SERVER.get().map_or("herd", String::as_str)
}

/// Whether the trace is on. The loop asks before it builds what only the trace would show
/// (the snapshots of every machine's state, the description of what woke it).
pub fn enabled() -> bool {
    log::log_enabled!(target: TARGET, log::Level::Trace)
}

/// Microseconds of the system's monotonic clock: the same clock in every process, so the
/// traces of a herd's servers merge in time order. `Instant` reads the same clock but gives no
/// number another process could compare with.
pub fn now_us() -> u64 {
    let mut at = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer, which is valid.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut at);
    }
    (at.tv_sec as u64).saturating_mul(1_000_000) + at.tv_nsec as u64 / 1000
}

/// One line of the trace: the time stamp and the server's name, then the text. `log::trace!`
/// checks the level first, so with the trace off the arguments are never formatted.
macro_rules! trace_loop {
    ($($arg:tt)*) => {
        log::trace!(
            target: $crate::trace::TARGET,
            "{:>14} {} {}",
            $crate::trace::now_us(),
            $crate::trace::server(),
            format_args!($($arg)*)
        )
    };
}
pub(crate) use trace_loop;

/// How much of a line the trace shows.
const SHOWN_BYTES: usize = 120;

/// `bytes` as the trace shows them: escaped like the log, cut at [`SHOWN_BYTES`] with `...`,
/// without the final newline.
pub fn shown(bytes: &[u8]) -> String {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut out = Vec::with_capacity(bytes.len().min(SHOWN_BYTES) + 3);
    crate::bytes::escape_into(&mut out, &bytes[..bytes.len().min(SHOWN_BYTES)]);
    if bytes.len() > SHOWN_BYTES {
        out.extend_from_slice(b"...");
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Traces the lines of `bytes` that `who` sent (`>`) or received (`<`): each of the first four,
/// then how many more, so that a pipelined burst of replies takes five lines of the trace, not
/// thousands.
pub fn trace_lines(who: &str, dir: char, bytes: &[u8]) {
    const EACH: usize = 4;
    let lines = bytes.split_inclusive(|&b| b == b'\n');
    let mut count = 0;
    for line in lines {
        if count < EACH {
            trace_loop!("  {who} {dir} {}", shown(line));
        }
        count += 1;
    }
    if count > EACH {
        trace_loop!("  {who} {dir} ... and {} more lines", count - EACH);
    }
}

/// States of named machines, to compare before and after a step: `(machine, state name)`
/// pairs, such as `("c3", "Undecided")`. The loop takes one before and one after each event,
/// and around the rest of the turn, so no machine has to report its own transitions.
#[derive(Default, PartialEq, Eq)]
pub struct Snapshot(pub Vec<(String, String)>);

impl Snapshot {
    /// Traces every machine whose state differs in `after`: a machine only in `after` is
    /// `(new)`, one only in `self` is `closed` (a connection freed during the step).
    pub fn trace_changes(&self, after: &Snapshot) {
        for (name, new) in &after.0 {
            let old = self
                .0
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.as_str());
            if old != Some(new.as_str()) {
                trace_loop!("  {name}: {} -> {new}", old.unwrap_or("(new)"));
            }
        }
        for (name, old) in &self.0 {
            if !after.0.iter().any(|(n, _)| n == name) {
                trace_loop!("  {name}: {old} -> closed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_lines_are_escaped_and_cut() {
        assert_eq!(shown(b"IAMAT a +1+1 5\n"), "IAMAT a +1+1 5");
        assert_eq!(shown(b"a\rb"), "a\\rb");
        let long = vec![b'x'; 300];
        assert_eq!(shown(&long), format!("{}...", "x".repeat(SHOWN_BYTES)));
    }

    #[test]
    fn the_clock_moves_forward() {
        let a = now_us();
        let b = now_us();
        assert!(a > 0 && b >= a);
    }
}
