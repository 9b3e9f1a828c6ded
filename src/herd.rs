//! What lines mean: a client's IAMAT and WHATSAT, a neighbour's records, and the flood.
//!
//! [`Herd`] is the server's state apart from its sockets: the store, the links to the
//! neighbours, the Places pool and the log. The loop in [`crate::server`] hands it a connection
//! whose bytes have arrived; [`Herd::process`] runs every whole line the connection holds, as far
//! as the connection's limits allow, and leaves the replies in the connection's output.

use std::time::Instant;

use crate::config::Limits;
use crate::conn::{Conn, ConnState, Line, Role};
use crate::https::PlacesPool;
use crate::link::Link;
use crate::log::Log;
use crate::places::{self, Query};
use crate::protocol::{self, Command};
use crate::reactor::Registrar;
use crate::store::{Merge, Store};

/// The body of every WHATSAT when no API key is configured: Google's own answer to a missing key
/// is a `REQUEST_DENIED`, so clients see the same shape.
pub const NO_KEY_MESSAGE: &str =
    "This server has no Google Places API key: set GOOGLE_PLACES_API_KEY or places.key_file.";

/// Lines stop being run while a connection has this much output unwritten (or a quarter of
/// its cap, if that is less).
pub const OUTPUT_HIGH_WATER: usize = 256 * 1024;

pub struct Herd {
    pub name: String,
    pub store: Store,
    /// The links to the neighbours, in configuration order; a link's index is its neighbour's.
    pub links: Vec<Link>,
    /// `None` when no API key is configured.
    pub places: Option<PlacesPool>,
    pub log: Log,
    pub limits: Limits,
    /// This turn's time, read once by the loop.
    pub now: Instant,
    /// This turn's wall-clock time in nanoseconds since the epoch: the receive time of IAMATs.
    pub now_ns: i128,
    /// Reused for building AT lines, so an IAMAT allocates nothing in the common case.
    line: Vec<u8>,
}

impl Herd {
    pub fn new(
        name: String,
        links: Vec<Link>,
        places: Option<PlacesPool>,
        log: Log,
        limits: Limits,
        now: Instant,
    ) -> Herd {
        Herd {
            name,
            store: Store::default(),
            links,
            places,
            log,
            limits,
            now,
            now_ns: 0,
            line: Vec::with_capacity(256),
        }
    }

    /// Runs the whole lines buffered in `conn` (slot `slot`). Stops early when the connection
    /// has as many replies waiting on Places as it may, has [`OUTPUT_HIGH_WATER`] bytes of
    /// output unwritten, or is no longer open: the unread lines stay buffered, and the loop
    /// calls this again when a reply completes or the output has gone out.
    pub fn process(&mut self, conn: &mut Conn, slot: usize, registrar: &Registrar) {
        // A record is a little longer than the IAMAT it answers (server name, time difference),
        // so a peer's lines may be longer than a client's.
        let max_line = match conn.role {
            Role::Peer(_) => 2 * self.limits.max_line_bytes + 1024,
            _ => self.limits.max_line_bytes,
        };
        while conn.state == ConnState::Open && conn.replies.waiting() < self.limits.pending_replies
        {
            let Some(line) = conn.reader.next_line(max_line) else {
                break;
            };
            let line = match line {
                Line::Complete(line) => line,
                Line::TooLong(prefix) => {
                    self.log.bytes(format_args!("c{}", conn.id), '<', prefix);
                    let mut reply = b"? ".to_vec();
                    reply.extend_from_slice(prefix);
                    reply.extend_from_slice(
                        format!("... (line longer than {max_line} bytes)\n").as_bytes(),
                    );
                    self.log.bytes(format_args!("c{}", conn.id), '>', &reply);
                    conn.replies.push(&mut conn.out, &reply);
                    conn.set_state(ConnState::Draining(format!(
                        "line longer than {max_line} bytes"
                    )));
                    break;
                }
            };
            match conn.role {
                Role::Peer(from) => {
                    self.peer_line(from, line);
                    continue;
                }
                Role::Undecided => {
                    if let Some(i) = protocol::parse_greeting(line).and_then(|n| self.neighbour(n))
                    {
                        self.log.bytes(format_args!("c{}", conn.id), '<', line);
                        self.log.event(
                            format_args!("c{}", conn.id),
                            format_args!("is peer {}", self.links[i].name),
                        );
                        conn.role = Role::Peer(i);
                        continue;
                    }
                    if !line.iter().all(|&b| protocol::is_space(b)) {
                        conn.role = Role::Client;
                    }
                }
                Role::Client => {}
            }
            self.client_line(
                conn.id,
                slot,
                &mut conn.replies,
                &mut conn.out,
                line,
                registrar,
            );
            if conn.out.pending() >= self.output_high_water() {
                // Back-pressure: the rest waits until the client has read this (asyncio's
                // drain()). The loop resumes when the output has gone out.
                break;
            }
        }
        if conn.reader.at_eof() && conn.state == ConnState::Open && conn.reader.buffered() == 0 {
            let reason = match conn.role {
                Role::Peer(i) => format!("peer {} closed its link", self.links[i].name),
                _ => "end of stream".to_owned(),
            };
            conn.set_state(ConnState::Draining(reason));
        }
        conn.reader.compact();
    }

    /// Output that stops a connection's lines from running: well below the cap that closes it.
    fn output_high_water(&self) -> usize {
        OUTPUT_HIGH_WATER.min(self.limits.client_output_bytes / 4)
    }

    fn neighbour(&self, name: &[u8]) -> Option<usize> {
        self.links.iter().position(|l| l.name.as_bytes() == name)
    }

    fn client_line(
        &mut self,
        id: u64,
        slot: usize,
        replies: &mut crate::conn::Replies,
        out: &mut crate::conn::OutBuf,
        line: &[u8],
        registrar: &Registrar,
    ) {
        self.log.bytes(format_args!("c{id}"), '<', line);
        match protocol::parse_command(line) {
            Command::Blank => {}
            Command::Iamat(iamat) => {
                let mut at = std::mem::take(&mut self.line);
                at.clear();
                protocol::write_at_line(&mut at, &self.name, self.now_ns, &iamat);
                if self.store.merge(iamat.client, iamat.time_ns, &at) == Merge::Stored {
                    // The neighbours get the update before the client gets its reply (SPEC.md
                    // section 5); the loop also writes links before clients.
                    self.flood(&at, None);
                }
                at.push(b'\n');
                self.log.bytes(format_args!("c{id}"), '>', &at);
                replies.push(out, &at);
                self.line = at;
            }
            Command::Whatsat(w) => match self.store.get(w.client) {
                Some(record) => {
                    let record = record.to_vec();
                    self.whatsat(id, slot, replies, out, &record, &w, registrar);
                }
                None => self.invalid(id, replies, out, line),
            },
            Command::Invalid => self.invalid(id, replies, out, line),
        }
    }

    fn invalid(
        &mut self,
        id: u64,
        replies: &mut crate::conn::Replies,
        out: &mut crate::conn::OutBuf,
        line: &[u8],
    ) {
        let mut reply = Vec::with_capacity(line.len() + 3);
        reply.extend_from_slice(b"? ");
        reply.extend_from_slice(line);
        reply.push(b'\n');
        self.log.bytes(format_args!("c{id}"), '>', &reply);
        replies.push(out, &reply);
    }

    #[allow(clippy::too_many_arguments)]
    fn whatsat(
        &mut self,
        id: u64,
        slot: usize,
        replies: &mut crate::conn::Replies,
        out: &mut crate::conn::OutBuf,
        record: &[u8],
        w: &protocol::Whatsat,
        registrar: &Registrar,
    ) {
        let Some(pool) = &mut self.places else {
            let reply = whatsat_reply(
                record,
                &places::error_body("REQUEST_DENIED", NO_KEY_MESSAGE),
            );
            self.log.bytes(format_args!("c{id}"), '>', &reply);
            replies.push(out, &reply);
            return;
        };
        // A stored record was validated when it was stored, so its location parses.
        let location = protocol::fields::<6>(record)
            .map(|(f, _)| f[4])
            .unwrap_or_default();
        let Some((latitude, longitude)) = protocol::parse_location(location) else {
            return self.invalid(id, replies, out, record);
        };
        let query = Query {
            latitude,
            longitude,
            radius_m: &w.radius_m,
            bound: w.bound,
        };
        let job = pool.submit(self.now, (slot, id), record, &query, &mut self.log);
        replies.push_awaiting(job);
        pool.dispatch(self.now, registrar, &mut self.log);
    }

    /// A line on neighbour `from`'s inbound link: a record to merge, and flood if it is news.
    fn peer_line(&mut self, from: usize, line: &[u8]) {
        let name = &self.links[from].name;
        self.log.bytes(format_args!("peer {name}"), '<', line);
        match protocol::parse_at_record(line) {
            Some(record) => {
                if self.store.merge(record.client, record.time_ns, line) == Merge::Stored {
                    self.flood(line, Some(from));
                }
            }
            None => self.log.event(
                format_args!("peer {name}"),
                format_args!("ignored a line that is not a valid record"),
            ),
        }
    }

    /// Hands a record that changed the store to every link but the one it came from.
    fn flood(&mut self, line: &[u8], except: Option<usize>) {
        for (i, link) in self.links.iter_mut().enumerate() {
            if Some(i) != except {
                link.send(self.now, line, self.limits.peer_output_bytes, &mut self.log);
            }
        }
    }
}

/// A WHATSAT reply: the stored record, the body, and the blank line that ends it.
pub fn whatsat_reply(record: &[u8], body: &[u8]) -> Vec<u8> {
    let mut reply = Vec::with_capacity(record.len() + body.len() + 3);
    reply.extend_from_slice(record);
    reply.push(b'\n');
    reply.extend_from_slice(body);
    reply.extend_from_slice(b"\n\n");
    reply
}
