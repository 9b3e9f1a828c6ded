//! The programs beside the server, in the same binary: `herd up` ([`up`]), the client commands
//! ([`client`]) and the load generator ([`load`]). They use the server's pure cores (the
//! configuration, the protocol, the byte helpers) and never its loop, as Redis keeps
//! `redis-benchmark` and `redis-cli` beside the server rather than inside it.

pub mod client;
pub mod load;
pub mod status;
pub mod trace_svg;
pub mod up;
