//! Everything that speaks to Google Places, in one place: the pool of HTTPS connections and
//! its state machine ([`pool`]), the HTTP/1.1 response reader it feeds ([`http`]), the request a
//! WHATSAT becomes and the reply body made from Google's answer ([`mod@answer`]), and the rewrite
//! of a Places API (New) answer as a legacy body ([`legacy`]).
//!
//! Only [`pool`] touches a socket; the other three are pure, tested with tables.

pub mod answer;
pub mod http;
pub mod legacy;
pub mod pool;

// What the rest of the server uses, by name, wherever in here it lives.
pub use crate::config::{Api, Output};
pub use answer::{answer, build_request, error_body, Answer, Query, Request};
pub use pool::PlacesPool;
