//! # herd
//!
//! A proxy herd server: clients report locations with `IAMAT`, ask about places near a client
//! with `WHATSAT` (answered through Google Places), and servers flood updates to each other.
//! One process per server, one thread, one hand-written [`mio`] poll loop.
//!
//! ## Map of the code
//!
//! | module | owns |
//! |---|---|
//! | [`server`] | the event loop: poll, dispatch, deadlines, end-of-turn writes |
//! | [`reactor`] | tokens, socket registration and the timer heap |
//! | [`conn`] | an accepted connection: line reader, output buffer, replies in order |
//! | [`herd`] | what lines mean: IAMAT, WHATSAT, records from peers, the flood |
//! | [`link`] | the link dialled to one neighbour: connect, authenticate, sync, heartbeats, backoff |
//! | [`peer`] | the peer protocol: greeting, challenge-response, sealed lines, verbs |
//! | [`https`] | the Places connection pool: TCP, TLS with rustls, keep-alive, deadlines |
//! | [`http`] | reading an HTTP/1.1 response: head, Content-Length, chunked, read-to-close |
//! | [`places`] | Places requests and reply bodies: the results cut by splicing Google's text |
//! | [`protocol`] | the client protocol as pure functions: fields, IAMAT, WHATSAT, AT lines |
//! | [`store`] | the latest record of every client, and which record wins |
//! | [`config`] | `herd.toml`, checked as a whole at start-up |
//! | [`trace`] | `--trace`: what woke the loop, every state transition, how long it sleeps |
//! | [`log`] | the per-server log file, buffered and written once per turn |
//! | [`up`] | `herd up`: a whole herd as child processes |
//! | [`client`] | `herd iamat`, `herd whatsat`, `herd send`: one command, its reply |
//! | [`load`] | `herd load`: a load generator that speaks the protocol, for benchmarks |

pub mod client;
pub mod config;
pub mod conn;
pub mod herd;
pub mod http;
pub mod https;
pub mod link;
pub mod load;
pub mod log;
pub mod peer;
pub mod places;
pub mod protocol;
pub mod reactor;
pub mod server;
pub mod store;
pub mod trace;
pub mod up;
