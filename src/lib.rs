#![doc = include_str!("guide.md")]
// The guide ends with a sequence diagram drawn by `herd up --trace-svg` from a real run, inline
// (rustdoc passes an SVG element through as it is); tests/examples.rs checks it is one.
#![doc = include_str!("../docs/one-iamat-one-whatsat.svg")]
// The guide walks through the loop's private parts, and the docs are always built with them
// (.cargo/config.toml: --document-private-items), so its links to private items resolve.
#![allow(rustdoc::private_intra_doc_links)]
// Every public item says what it is: the code is meant to be read (clippy -D warnings in CI
// makes a missing doc an error).
#![warn(missing_docs)]

pub mod admin;
pub mod aof;
pub mod bytes;
pub mod config;
pub mod conn;
pub mod herd;
pub mod inbound;
pub mod link;
pub mod log;
pub mod metrics;
pub mod pages;
pub mod peer;
pub mod places;
pub mod protocol;
pub mod reactor;
pub mod server;
pub mod store;
pub mod tools;
pub mod trace;
pub mod wire;

/// Learn the loop in five steps: the examples' own guide, one chapter per example.
#[doc = include_str!("../examples/README.md")]
pub mod learn {}
