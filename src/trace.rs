//! Watching the loop: `herd serve NAME --trace` (or `herd up --trace`) prints, on standard
//! error, one line per turn saying what woke the loop, one line per state transition (old ->
//! new), and how long the loop will sleep:
//!
//! ```text
//! Bailey sleep: up to 1000 ms (the next deadline)
//! Bailey turn 12: woken by c3 readable+writable
//! Bailey   c3: Open/Undecided -> Open/Client
//! Bailey   c3: Open/Client -> Draining/Client
//! Bailey   c3: Draining/Client -> closed
//! ```
//!
//! The transitions are logged in one place, the loop ([`crate::server`]), which compares a
//! machine's state name before and after it handles an event or a deadline; the machines
//! themselves know nothing of tracing. Off by default, and then nearly free: every check is
//! one load of the `log` crate's maximum level.

/// The `log` target of the trace lines.
pub const TARGET: &str = "herd::trace";

/// Whether the trace is on.
pub fn enabled() -> bool {
    log::log_enabled!(target: TARGET, log::Level::Trace)
}

/// One line of the trace.
macro_rules! trace_loop {
    ($($arg:tt)*) => {
        log::trace!(target: $crate::trace::TARGET, $($arg)*)
    };
}
pub(crate) use trace_loop;

/// States of named machines, to compare before and after a step.
#[derive(Default, PartialEq, Eq)]
pub struct Snapshot(pub Vec<(String, String)>);

impl Snapshot {
    /// Traces every machine whose state differs in `after`.
    pub fn trace_changes(&self, server: &str, after: &Snapshot) {
        for (name, new) in &after.0 {
            let old = self
                .0
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.as_str());
            if old != Some(new.as_str()) {
                trace_loop!("{server}   {name}: {} -> {new}", old.unwrap_or("(new)"));
            }
        }
        for (name, old) in &self.0 {
            if !after.0.iter().any(|(n, _)| n == name) {
                trace_loop!("{server}   {name}: {old} -> closed");
            }
        }
    }
}
