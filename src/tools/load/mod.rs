//! `herd load`: a load generator that speaks the client protocol, for benchmarks.
//!
//! It is built like the server it measures: one thread, one `mio::Poll`, edge-triggered sockets
//! read and written until `WouldBlock`. So its figures say what one core of a client can push,
//! and [`LoadReport::client_bound`] says when that core, not the server, was the limit.
//!
//! Two ways to talk to a server:
//!
//! - **pipelined** (the default): N connections, each keeping P commands outstanding; a reply
//!   coming back makes room for the next command. Replies come in command order on a
//!   connection (docs/protocol.md section 2), so each connection checks them first in, first
//!   out against the commands it sent.
//! - **one-shot** (`--one-shot`): the way the course's test clients talk. For each command:
//!   connect, send it, half-close, read to the end of the stream, close. N such connections
//!   are under way at once.
//!
//! One-shot figures over loopback mostly measure the kernel: the TCP work of both ends runs in
//! the generator's system calls (so such runs are usually `client_bound`), and since the
//! generator closes first, its ephemeral ports soon all sit in TIME_WAIT, after which every
//! `connect()` searches for one to recycle (a few milliseconds each, all inside one turn of the
//! loop; that is the one-shot p99).
//!
//! Map of the module, one file per part:
//!
//! - [`args`]: the command line ([`LoadOptions`], [`parse_args`], [`USAGE`]);
//! - [`requests`]: pure cores, no sockets and no clock: the commands made
//!   ([`Requests`](requests::Requests)) and the check of each reply
//!   ([`parse_reply`](requests::parse_reply));
//! - [`stats`]: the latencies kept ([`Histogram`](stats::Histogram)), the tallies, and the
//!   figures as one line of JSON ([`LoadReport`]);
//! - [`generator`]: the shell: the run's timeline ([`Phase`](generator::Phase): priming,
//!   warm-up, measuring, draining, done), one connection's state machine
//!   ([`Conn`](generator::Conn)), and the loop ([`Generator`](generator::Generator)).
//!
//! Every reply is checked. An IAMAT must be answered by exactly
//! `AT SERVER [+-]S.NNNNNNNNN CLIENT LOCATION TIME\n` with the three client fields as sent; a
//! WHATSAT by an `AT` line naming the client asked about, a body, and a blank line. A `?` reply,
//! any mismatch, a lost connection or a reply that never comes is an error.

mod args;
mod generator;
mod requests;
mod stats;

pub use args::{parse_args, LoadOptions, Mix, USAGE};
pub use generator::run;
pub use stats::LoadReport;
