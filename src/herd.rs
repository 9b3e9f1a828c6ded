//! What lines mean: a client's IAMAT and WHATSAT, a neighbour's records, and the flood.
//!
//! [`Herd`] is the server's state apart from its sockets: the store, the links to the
//! neighbours, the Places pool and the log. The loop in [`crate::server`] hands it a connection
//! whose bytes have arrived; [`Herd::process`] runs every whole line the connection holds, as far
//! as the connection's limits allow, and leaves the replies in the connection's output.

use std::time::Instant;

use crate::config::Limits;
use crate::conn::{Conn, ConnState, Line, OutBuf, PeerSide, Replies, Role};
use crate::link::{self, Link};
use crate::log::{Log, Who};
use crate::peer::{self, Compared, Comparison, PeerLine, Secret, Session};
use crate::places::pool::PlacesPool;
use crate::places::{self, Query};
use crate::protocol::{self, Command};
use crate::reactor::Registrar;
use crate::store::{Merge, Store, DIGEST_PARTS};

/// The body of every WHATSAT when no API key is configured: Google's own answer to a missing key
/// is a `REQUEST_DENIED`, so clients see the same shape.
pub const NO_KEY_MESSAGE: &str =
    "This server has no Google Places API key: set GOOGLE_PLACES_API_KEY or places.key_file.";

/// Lines stop being run while a connection has this much output unwritten (or a quarter of
/// its cap, if that is less).
pub const OUTPUT_HIGH_WATER: usize = 256 * 1024;

pub struct Herd {
    pub name: String,
    /// The herd secret, when peers must authenticate.
    pub secret: Option<Secret>,
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
        secret: Option<Secret>,
        links: Vec<Link>,
        places: Option<PlacesPool>,
        log: Log,
        limits: Limits,
        now: Instant,
    ) -> Herd {
        Herd {
            name,
            secret,
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
            Role::Challenged { .. } => peer::MAX_HANDSHAKE_BYTES,
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
                    self.log.bytes(Who::Conn(conn.id), '<', prefix);
                    if !conn.role.is_peer() {
                        let mut reply = b"? ".to_vec();
                        reply.extend_from_slice(prefix);
                        reply.extend_from_slice(
                            format!("... (line longer than {max_line} bytes)\n").as_bytes(),
                        );
                        self.log.bytes(Who::Conn(conn.id), '>', &reply);
                        conn.replies.push(&mut conn.out, &reply);
                    }
                    conn.state = ConnState::Draining(format!("line longer than {max_line} bytes"));
                    break;
                }
            };
            let outcome = match &mut conn.role {
                Role::Client => Ok(false),
                Role::Undecided => {
                    match self.greeting(conn.id, &mut conn.role, &mut conn.out, line) {
                        Some(outcome) => outcome.map(|()| true),
                        // Blank lines leave the question open; anything else makes a client.
                        None if line.iter().all(|&b| protocol::is_space(b)) => Ok(true),
                        None => {
                            conn.role = Role::Client;
                            Ok(false)
                        }
                    }
                }
                Role::Challenged { .. } => self.proof(conn.id, &mut conn.role, line).map(|()| true),
                Role::Peer(side) => self.peer_line(side, &mut conn.out, line).map(|()| true),
            };
            match outcome {
                Ok(true) => continue, // a peer's line: done
                Ok(false) => {}
                Err(why) => {
                    // A peer that breaks the protocol or fails to authenticate loses its
                    // connection; it redials and starts afresh.
                    self.log
                        .event(format_args!("c{}", conn.id), format_args!("{why}"));
                    conn.state = ConnState::Closed(why);
                    break;
                }
            }
            let forged = self.client_line(
                conn.id,
                slot,
                &mut conn.replies,
                &mut conn.out,
                line,
                registrar,
            );
            if forged {
                // A client that speaks the peers' language is forging records: answered like
                // any invalid command, then disconnected.
                conn.state = ConnState::Draining("a client sent a peer's line".into());
                break;
            }
            if conn.out.pending() >= self.output_high_water() {
                // Back-pressure: the rest waits until the client has read this (asyncio's
                // drain()). The loop resumes when the output has gone out.
                break;
            }
        }
        if conn.reader.at_eof() && conn.state == ConnState::Open && conn.reader.buffered() == 0 {
            let reason = match &conn.role {
                Role::Peer(side) => {
                    format!("peer {} closed its link", self.links[side.neighbour].name)
                }
                _ => "end of stream".to_owned(),
            };
            conn.set_state(ConnState::Draining(reason));
        }
        conn.reader.compact();
    }

    /// The links, and what a link needs from the rest of the server, borrowed apart.
    pub fn links_and_context(&mut self) -> (&mut [Link], link::Context<'_>) {
        let cx = link::Context {
            server: &self.name,
            secret: self.secret.as_ref(),
            store: &self.store,
            log: &mut self.log,
        };
        (&mut self.links, cx)
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
        replies: &mut Replies,
        out: &mut OutBuf,
        line: &[u8],
        registrar: &Registrar,
    ) -> bool {
        self.log.bytes(Who::Conn(id), '<', line);
        match protocol::parse_command(line) {
            Command::Blank => {}
            Command::Iamat(iamat) => {
                let mut at = std::mem::take(&mut self.line);
                at.clear();
                protocol::write_at_line(&mut at, &self.name, self.now_ns, &iamat);
                if self.store.merge(iamat.client, iamat.time_ns, &at) == Merge::Stored {
                    // The neighbours get the update before the client gets its reply
                    // (docs/protocol.md section 5); the loop also writes links before clients.
                    self.flood(&at, None);
                }
                at.push(b'\n');
                self.log.bytes(Who::Conn(id), '>', &at);
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
            Command::Invalid => {
                self.invalid(id, replies, out, line);
                let verb = protocol::first_field(line);
                return matches!(verb, b"AT" | b"PEER" | b"PROOF" | b"CHALLENGE");
            }
        }
        false
    }

    fn invalid(&mut self, id: u64, replies: &mut Replies, out: &mut OutBuf, line: &[u8]) {
        let mut reply = Vec::with_capacity(line.len() + 3);
        reply.extend_from_slice(b"? ");
        reply.extend_from_slice(line);
        reply.push(b'\n');
        self.log.bytes(Who::Conn(id), '>', &reply);
        replies.push(out, &reply);
    }

    #[allow(clippy::too_many_arguments)]
    fn whatsat(
        &mut self,
        id: u64,
        slot: usize,
        replies: &mut Replies,
        out: &mut OutBuf,
        record: &[u8],
        w: &protocol::Whatsat,
        registrar: &Registrar,
    ) {
        let Some(pool) = &mut self.places else {
            let reply = whatsat_reply(
                record,
                &places::error_body("REQUEST_DENIED", NO_KEY_MESSAGE),
            );
            self.log.bytes(Who::Conn(id), '>', &reply);
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

    /// The first line of a connection, if it is a neighbour's greeting: without a herd secret
    /// the connection is that neighbour's link at once; with one, it is challenged. `None`
    /// when the line is not a neighbour's greeting (then it is a client's command).
    fn greeting(
        &mut self,
        id: u64,
        role: &mut Role,
        out: &mut OutBuf,
        line: &[u8],
    ) -> Option<Result<(), String>> {
        let greeting = peer::parse_greeting(line)?;
        let neighbour = self.neighbour(greeting.name)?;
        self.log.bytes(Who::Conn(id), '<', line);
        let name = &self.links[neighbour].name;
        Some(match (&self.secret, greeting.nonce) {
            (None, None) => {
                self.log
                    .event(format_args!("c{id}"), format_args!("is peer {name}"));
                self.links[neighbour].on_neighbour_greeted(self.now, &mut self.log);
                *role = Role::Peer(PeerSide {
                    neighbour,
                    session: None,
                    last_sent: self.now,
                    comparison: Comparison::default(),
                });
                Ok(())
            }
            (Some(secret), Some(nd)) => {
                let Some(na): Option<Vec<u8>> = peer::nonce() else {
                    return Some(Err("no randomness for a nonce".into()));
                };
                let proof = secret.proof(b"accept", greeting.name, self.name.as_bytes(), nd, &na);
                let challenge = [&b"CHALLENGE "[..], &na, b" ", &proof].concat();
                self.log.bytes(Who::Conn(id), '>', &challenge);
                out.push(&challenge);
                out.push(b"\n");
                *role = Role::Challenged {
                    neighbour,
                    nd: nd.to_vec(),
                    na,
                    until: self.now + peer::HANDSHAKE_TIMEOUT,
                };
                Ok(())
            }
            (Some(_), None) => Err(format!(
                "{name} greeted without authenticating, but this herd has a secret"
            )),
            (None, Some(_)) => Err(format!(
                "{name} wants to authenticate, but this server has no herd secret"
            )),
        })
    }

    /// The line after our challenge: the neighbour's proof that it knows the secret.
    fn proof(&mut self, id: u64, role: &mut Role, line: &[u8]) -> Result<(), String> {
        let (
            Role::Challenged {
                neighbour, nd, na, ..
            },
            Some(secret),
        ) = (&*role, &self.secret)
        else {
            return Err("no challenge to answer".into());
        };
        self.log.bytes(Who::Conn(id), '<', line);
        let name = &self.links[*neighbour].name;
        let valid = peer::parse_proof(line).is_some_and(|proof| {
            secret.verify(
                proof,
                b"dial",
                name.as_bytes(),
                self.name.as_bytes(),
                nd,
                na,
            )
        });
        if !valid {
            return Err(format!("{name} failed to prove it knows the herd secret"));
        }
        self.log.event(
            format_args!("c{id}"),
            format_args!("is peer {name}, authenticated"),
        );
        self.links[*neighbour].on_neighbour_greeted(self.now, &mut self.log);
        *role = Role::Peer(PeerSide {
            neighbour: *neighbour,
            session: Some(Session::new(secret, nd, na, false)),
            last_sent: self.now,
            comparison: Comparison::default(),
        });
        Ok(())
    }

    /// A line on a neighbour's inbound link: a record to merge (and flood if it is news), a
    /// heartbeat, or the digests of the neighbour's store and of its parts.
    fn peer_line(
        &mut self,
        side: &mut PeerSide,
        out: &mut OutBuf,
        line: &[u8],
    ) -> Result<(), String> {
        let from = side.neighbour;
        self.log.bytes(Who::Peer(&self.links[from].name), '<', line);
        let payload = match &mut side.session {
            Some(session) => session.open(line)?,
            None => line,
        };
        match peer::parse_line(payload) {
            Some(PeerLine::Record(record)) => match self.store.merge_record(record) {
                Some(Merge::Stored) => self.flood(record, Some(from)),
                Some(Merge::Stale) => {}
                None => self.log.event(
                    format_args!("peer {}", self.links[from].name),
                    format_args!("ignored a line that is not a valid record"),
                ),
            },
            Some(PeerLine::Ping) => {}
            Some(PeerLine::Parts { first, digests }) => side.comparison.parts(first, &digests),
            Some(PeerLine::Digest { count, digest }) => {
                // While our link is still copying our store to the neighbour, its store lacks
                // some of ours: not a difference to act on.
                let copying = self.links[from].copying();
                let compared = side.comparison.digest(count, digest, &self.store, copying);
                let Compared::Resync(parts) = compared else {
                    return Ok(());
                };
                // Still different: each side sends the other what differs.
                let what = match &parts {
                    None => "the whole store".to_string(),
                    Some(set) => format!("{} of {} parts", set.len(), DIGEST_PARTS),
                };
                self.log.event(
                    format_args!("peer {}", self.links[from].name),
                    format_args!(
                        "stores differ ({count} records, {digest:016x}; here {}, {:016x}): resyncing {what} both ways",
                        self.store.len(),
                        self.store.digest()
                    ),
                );
                peer::frame(
                    side.session.as_mut(),
                    &peer::sync_line(parts.as_ref()),
                    out.tail(),
                );
                side.last_sent = self.now;
                self.links[from].resync(&self.store, parts);
            }
            Some(PeerLine::Sync(_)) | None => self.log.event(
                format_args!("peer {}", self.links[from].name),
                format_args!("ignored a line an inbound link does not carry"),
            ),
        }
        Ok(())
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
