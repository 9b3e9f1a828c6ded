//! The server's state apart from its sockets, and what a command does to it.
//!
//! [`Herd`] holds what every machine of the loop shares: the store, the links to the
//! neighbours, the Places pool, the log, the limits, and the turn's clock. The machines that own
//! sockets (a client's connection in [`crate::conn`], a neighbour's inbound link in
//! [`crate::inbound`]) call into it: [`Herd::command`] runs one client command,
//! [`Herd::merge_record`] one record from a neighbour, and both flood what changed the store.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::aof::Aof;
use crate::config::Limits;
use crate::link::{self, Link};
use crate::log::{Log, Who};
use crate::metrics::Metrics;
use crate::peer::Secret;
use crate::places::pool::Owner;
use crate::places::{self, PlacesPool, Query};
use crate::protocol::{self, Command};
use crate::store::{Bounds, Merge, Store};
use crate::trace::{self, trace_loop};

/// The body of every WHATSAT when no API key is configured: Google's own answer to a missing key
/// is a `REQUEST_DENIED`, so clients see the same shape.
pub const NO_KEY_MESSAGE: &str =
    "This server has no Google Places API key: set GOOGLE_PLACES_API_KEY or places.key_file.";

/// Indices of [`crate::metrics::VERBS`] and [`crate::metrics::RESULTS`].
const IAMAT: usize = 0;
const WHATSAT: usize = 1;
const OTHER: usize = 2;
const OK: usize = 0;
const INVALID: usize = 1;
const REFUSED: usize = 2;

/// A client whose replies not yet read reach this much (or a quarter of its cap, if that is
/// less) has no more of its commands run until it reads: asyncio's `drain()`.
pub const OUTPUT_HIGH_WATER: usize = 256 * 1024;

/// What the machines of the loop share. The [`crate::server::Server`] owns it and lends it,
/// as `&mut Herd`, to one machine's step at a time: one thread, so no lock.
pub struct Herd {
    /// This server's name: the second field of every `AT` line it writes, and its name to
    /// its neighbours.
    pub name: String,
    /// The herd secret, when peers must authenticate.
    pub secret: Option<Secret>,
    /// The latest record of every client: what a WHATSAT reads, what every merge writes.
    pub store: Store,
    /// The links to the neighbours, in configuration order; a link's index is its neighbour's.
    pub links: Vec<Link>,
    /// `None` when no API key is configured.
    pub places: Option<PlacesPool>,
    /// The store on disk; `None` when it is kept in memory only.
    pub aof: Option<Aof>,
    /// What the server counts, for its admin endpoint.
    pub metrics: Metrics,
    /// When a neighbour's record refused for a full store was last logged, and how many were
    /// refused unsaid since ([`REFUSALS_SAID_EVERY`]).
    refusal_said_at: Option<Instant>,
    refusals_unsaid: u64,
    /// Whether peer housekeeping (heartbeats, digests) is logged line by line.
    pub log_housekeeping: bool,
    /// The server's log file, buffered for the turn and written at its end.
    pub log: Log,
    /// The configured limits, read by every machine.
    pub limits: Limits,
    /// This turn's time, read once by the loop.
    pub now: Instant,
    /// This turn's wall-clock time in nanoseconds since the epoch: the receive time of IAMATs.
    pub now_ns: i128,
    /// This turn's number: a connection's share of the loop is counted per turn.
    pub turn: u64,
    /// The reply being made, reused so that an IAMAT allocates nothing in the common case.
    /// [`Answer::Now`] lends it out: the caller copies the reply before the next command.
    reply: Vec<u8>,
    /// What is left of each client address's WHATSATs this minute, when they are limited.
    allowance: Allowance,
}

/// WHATSATs per client address, when `whatsat_per_minute` limits them (each is a call to
/// Google, billed to the key): a bucket of tokens per address, refilled evenly over a minute.
#[derive(Default)]
struct Allowance {
    /// Tokens left, and when they were counted. A bucket is brought up to date only when its
    /// address asks again, so a quiet address costs no timer and no work.
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

/// Addresses remembered at most. At this many the full buckets are forgotten; if every one is
/// still drawing on its bucket, all are (each then starts again with a full bucket, which an
/// address new to the server gets anyway). Either way the map stays this size and the scan
/// comes once per this many new addresses.
const ALLOWANCE_ADDRESSES: usize = 65_536;

/// How often the log may say that a neighbour's record was refused for a full store.
const REFUSALS_SAID_EVERY: Duration = Duration::from_secs(60);

impl Allowance {
    /// Takes one WHATSAT from `addr`'s bucket; `false` if it is empty.
    fn take(&mut self, addr: IpAddr, per_minute: usize, now: Instant) -> bool {
        if per_minute == 0 {
            return true;
        }
        let full = per_minute as f64;
        let refill = |(tokens, at): (f64, Instant)| {
            let since = now.saturating_duration_since(at).as_secs_f64();
            (tokens + since * full / 60.0).min(full)
        };
        // A bucket full again holds nothing worth keeping: an address asking anew gets a full
        // one anyway.
        if self.buckets.len() >= ALLOWANCE_ADDRESSES {
            self.buckets.retain(|_, bucket| refill(*bucket) < full);
            if self.buckets.len() >= ALLOWANCE_ADDRESSES / 2 {
                self.buckets.clear();
            }
        }
        let bucket = self.buckets.entry(host_key(addr)).or_insert((full, now));
        let tokens = refill(*bucket);
        // Spent if there was a whole token; a refusal spends nothing, so an address that keeps
        // asking is not pushed further behind.
        *bucket = (tokens - 1.0, now);
        if tokens >= 1.0 {
            true
        } else {
            bucket.0 = tokens;
            false
        }
    }
}

/// The address that stands for one host, for the limits counted per address (the WHATSAT
/// allowance, the connections open at once): an IPv4 address as itself, also when a dual-stack
/// listener sees it as `::ffff:a.b.c.d`; an IPv6 address by its /64, which one host is usually
/// given whole (a count per IPv6 address would let it ask from as many addresses as it likes).
pub fn host_key(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

/// What a client's command answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer<'a> {
    /// Nothing: the line was blank.
    Nothing,
    /// This reply, now. It borrows the herd's reply buffer, so the caller copies it out before
    /// it runs another command.
    Now(&'a [u8]),
    /// A WHATSAT whose reply comes when Places answers job `job`.
    Later(u64),
    /// `? LINE`, to a client that spoke the peers' language: it is forging records, and is
    /// disconnected once answered.
    Forged(&'a [u8]),
}

impl Herd {
    /// A herd with an empty store for at most `limits.max_clients` clients and no store file
    /// (the server replays one and sets [`Herd::aof`] after). `now` stands for the clock until
    /// the loop's first turn reads it.
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
            store: Store::new(limits.max_clients),
            links,
            places,
            aof: None,
            metrics: Metrics::new(),
            refusal_said_at: None,
            refusals_unsaid: 0,
            log_housekeeping: false,
            log,
            limits,
            now,
            now_ns: 0,
            turn: 0,
            reply: Vec::with_capacity(256),
            allowance: Allowance::default(),
        }
    }

    /// Runs one client command (a whole line, without its `\n`) of connection `id`: an IAMAT is
    /// stored and flooded if it is news, then answered; a WHATSAT is handed to Places and answered
    /// later; anything else is answered `? LINE`. The line and the reply are logged.
    pub fn command(&mut self, id: u64, owner: Owner, from: IpAddr, line: &[u8]) -> Answer<'_> {
        // Logged before it is parsed: the log shows every line a client sent, valid or not.
        self.log.bytes(Who::Conn(id), '<', line);
        trace_loop!("  c{id} < {}", trace::shown(line));
        match protocol::parse_command(line) {
            // A blank line gets no reply at all (docs/protocol.md section 2).
            Command::Blank => Answer::Nothing,
            Command::Iamat(iamat) => {
                // A client id too long, or a time too far ahead (it would pin the client's
                // record until then, on every server): invalid.
                if iamat.client.len() > self.limits.max_client_id_bytes
                    || iamat.time_ns > self.latest_client_time()
                {
                    self.metrics.command(IAMAT, INVALID);
                    return self.invalid(id, line);
                }
                // Built once: the `AT` line is the reply, the record stored and the line
                // flooded, byte for byte.
                self.reply.clear();
                protocol::write_at_line(&mut self.reply, &self.name, self.now_ns, &iamat);
                match self.store.merge(iamat.client, iamat.time_ns, &self.reply) {
                    Merge::Stored => {
                        self.metrics.stored_from_clients += 1;
                        trace_loop!("  store {}: stored", trace::shown(iamat.client));
                        if let Some(aof) = &mut self.aof {
                            aof.append(&self.reply);
                        }
                        // The neighbours get the update before the client gets its reply
                        // (docs/protocol.md section 5); the loop also writes links before
                        // clients.
                        // Taken out for the call, which borrows the whole herd; put back for
                        // the reply.
                        let record = std::mem::take(&mut self.reply);
                        self.flood(&record, None);
                        self.reply = record;
                    }
                    Merge::Full => {
                        self.metrics.command(IAMAT, REFUSED);
                        self.log.event(
                            format_args!("c{id}"),
                            format_args!(
                                "refused a new client: the store holds {} clients (max_clients)",
                                self.store.len()
                            ),
                        );
                        return self.invalid(id, line);
                    }
                    // Stale: an IAMAT older than the record held is still answered (the client
                    // learns its line arrived), but neither kept nor flooded (docs/protocol.md
                    // section 3). `merge` has no other outcome.
                    _ => {}
                }
                self.metrics.command(IAMAT, OK);
                // The newline is the reply's alone: records are stored and sent without it.
                self.reply.push(b'\n');
                self.log.bytes(Who::Conn(id), '>', &self.reply);
                Answer::Now(&self.reply)
            }
            Command::Whatsat(w) => match self.store.get(w.client) {
                // Only a WHATSAT about a known client draws on the allowance: any other is
                // answered `?` and costs Google nothing.
                Some(record) => {
                    // Copied: it is borrowed from the store, and what follows needs the herd.
                    let record = record.to_vec();
                    let per_minute = self.limits.whatsat_per_minute;
                    if !self.allowance.take(from, per_minute, self.now) {
                        // Refused in Google's own vocabulary, under the record like any
                        // WHATSAT reply, so a client needs no case of its own for it.
                        self.metrics.command(WHATSAT, REFUSED);
                        let message = format!(
                            "This server answers at most {per_minute} WHATSATs a minute from one address."
                        );
                        let body = places::error_body("OVER_QUERY_LIMIT", &message);
                        self.reply = whatsat_reply(&record, &body);
                        self.log.bytes(Who::Conn(id), '>', &self.reply);
                        return Answer::Now(&self.reply);
                    }
                    self.metrics.command(WHATSAT, OK);
                    self.whatsat(id, owner, &record, &w)
                }
                None => {
                    self.metrics.command(WHATSAT, INVALID);
                    self.invalid(id, line)
                }
            },
            Command::Invalid => {
                self.metrics.command(OTHER, INVALID);
                // A verb only peers use: answered like any invalid line, then the connection
                // closes (docs/protocol.md section 5), so a client cannot inject records.
                let forged = matches!(
                    protocol::first_field(line),
                    b"AT" | b"PEER" | b"PROOF" | b"CHALLENGE"
                );
                match self.invalid(id, line) {
                    Answer::Now(reply) if forged => Answer::Forged(reply),
                    answer => answer,
                }
            }
        }
    }

    /// `? LINE`, logged: the line exactly as it came, its own white space kept
    /// (docs/protocol.md section 6).
    pub fn invalid(&mut self, id: u64, line: &[u8]) -> Answer<'_> {
        self.reply.clear();
        self.reply.extend_from_slice(b"? ");
        self.reply.extend_from_slice(line);
        self.reply.push(b'\n');
        self.log.bytes(Who::Conn(id), '>', &self.reply);
        Answer::Now(&self.reply)
    }

    /// Hands a WHATSAT about a known client (its stored `record`) to Places, and answers
    /// later; with no API key, answers now with the refusal Google would give.
    fn whatsat(
        &mut self,
        id: u64,
        owner: Owner,
        record: &[u8],
        w: &protocol::Whatsat,
    ) -> Answer<'_> {
        let Some(pool) = &mut self.places else {
            let body = places::error_body("REQUEST_DENIED", NO_KEY_MESSAGE);
            self.reply = whatsat_reply(record, &body);
            self.log.bytes(Who::Conn(id), '>', &self.reply);
            return Answer::Now(&self.reply);
        };
        // A stored record was validated when it was stored, so its location parses.
        let location = protocol::fields::<6>(record)
            .map(|(f, _)| f[4])
            .unwrap_or_default();
        let Some((latitude, longitude)) = protocol::parse_location(location) else {
            return self.invalid(id, record);
        };
        let query = Query {
            latitude,
            longitude,
            radius_m: &w.radius_m,
            bound: w.bound,
        };
        // Started now if it can be: on an idle connection, or by a connect on an empty slot
        // once the host's address is known. Else it queues. Its deadline runs from now.
        let job = pool.submit(self.now, owner, record, &query, &mut self.log);
        pool.dispatch(self.now, &mut self.log);
        Answer::Later(job)
    }

    /// A record that neighbour `from` sent: merged, and flooded on if it changed the store.
    pub fn merge_record(&mut self, record: &[u8], from: usize) {
        // A client's IAMAT's bounds: a neighbour cannot store what a client could not.
        let bounds = Bounds {
            max_id_bytes: self.limits.max_client_id_bytes,
            latest_ns: self.latest_client_time(),
        };
        let merged = self.store.merge_record(record, &bounds);
        if trace::enabled() {
            let client = record.split(|&b| b == b' ').nth(3).unwrap_or_default();
            let what = match merged {
                Some(Merge::Stored) => "stored",
                Some(Merge::Stale) => "not news (held already, or older)",
                None => "not a valid record",
                Some(_) => "refused",
            };
            trace_loop!("  store {}: {what}", trace::shown(client));
        }
        if !matches!(merged, Some(Merge::Stored | Merge::Stale)) {
            self.metrics.refused_records += 1;
        }
        let why = match merged {
            Some(Merge::Stored) => {
                self.metrics.stored_from_peers += 1;
                if let Some(aof) = &mut self.aof {
                    aof.append(record);
                }
                return self.flood(record, Some(from));
            }
            // Not news: the flood stops here, silently (most records arrive once per path).
            Some(Merge::Stale) => return,
            None => "ignored a line that is not a valid record",
            Some(Merge::Full) => {
                "refused a record of a new client: the store is full (max_clients)"
            }
            Some(Merge::Ahead) => {
                "refused a record whose client time lies too far ahead (client_time_ahead_ms)"
            }
            Some(Merge::LongId) => "refused a record whose client id is too long",
        };
        // A full store is said once a minute at most: the copy of a neighbour's store that
        // keeps being refused would otherwise write a line per record per copy. The metrics
        // count every one. (Every other refusal is said each time: the checker of the fault
        // tests reads them.)
        let mut more = String::new();
        if matches!(merged, Some(Merge::Full)) {
            if (self.refusal_said_at).is_some_and(|at| self.now < at + REFUSALS_SAID_EVERY) {
                self.refusals_unsaid += 1;
                return;
            }
            self.refusal_said_at = Some(self.now);
            match std::mem::take(&mut self.refusals_unsaid) {
                0 => {}
                n => more = format!(" ({n} more refused since the last such line)"),
            }
        }
        self.log.event(
            format_args!("peer {}", self.links[from].name),
            format_args!("{why}{more}"),
        );
    }

    /// The latest client time accepted now, in nanoseconds since the epoch.
    fn latest_client_time(&self) -> i128 {
        self.now_ns
            .saturating_add(self.limits.client_time_ahead.as_nanos() as i128)
    }

    /// Hands a record that changed the store to every link but the one it came from.
    ///
    /// Only a record that changed the store is flooded, which alone ends every flood on any
    /// graph: back round a cycle, a record finds itself held and goes no further. A link that
    /// is down drops it ([`Link::send`]): its copy of the store, when it is up again, carries
    /// the record instead.
    pub fn flood(&mut self, line: &[u8], except: Option<usize>) {
        for (i, link) in self.links.iter_mut().enumerate() {
            if Some(i) != except {
                link.send(self.now, line, self.limits.peer_output_bytes, &mut self.log);
            }
        }
    }

    /// The links, and what a link needs from the rest of the server, borrowed apart. A link's
    /// step needs the store and the log while the links are borrowed mutably; the borrow
    /// checker allows fields to be borrowed apart within one function, not across methods.
    pub fn links_and_context(&mut self) -> (&mut [Link], link::Context<'_>) {
        let cx = link::Context {
            server: &self.name,
            housekeeping: self.log_housekeeping,
            secret: self.secret.as_ref(),
            store: &self.store,
            log: &mut self.log,
        };
        (&mut self.links, cx)
    }

    /// Replies unread past this stop a client's commands: well below the cap that closes it.
    pub fn output_high_water(&self) -> usize {
        OUTPUT_HIGH_WATER.min(self.limits.client_output_bytes / 4)
    }

    /// The index of the neighbour called `name`.
    pub fn neighbour(&self, name: &[u8]) -> Option<usize> {
        self.links.iter().position(|l| l.name.as_bytes() == name)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_host_draws_on_one_bucket_for_its_whole_64() {
        let mut allowance = Allowance::default();
        let now = Instant::now();
        let host =
            |last: u16| IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, last));
        assert!(allowance.take(host(1), 2, now));
        assert!(allowance.take(host(2), 2, now));
        assert!(!allowance.take(host(3), 2, now), "the /64's two are spent");
        let other = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 3, 0, 0, 0, 1));
        assert!(allowance.take(other, 2, now), "another /64 has its own");
    }

    #[test]
    fn ipv4_clients_of_a_dual_stack_listener_each_draw_on_their_own_bucket() {
        // A listener on `[::]` sees IPv4 clients as `::ffff:a.b.c.d`: all in the /64 `::`,
        // which must not make them one host.
        let mut allowance = Allowance::default();
        let now = Instant::now();
        let mapped =
            |last: u8| IpAddr::V6(std::net::Ipv4Addr::new(127, 0, 0, last).to_ipv6_mapped());
        assert!(allowance.take(mapped(1), 1, now));
        assert!(
            !allowance.take(mapped(1), 1, now),
            "127.0.0.1's one is spent"
        );
        assert!(allowance.take(mapped(2), 1, now), "127.0.0.2 has its own");
        assert!(
            !allowance.take(IpAddr::V4([127, 0, 0, 2].into()), 1, now),
            "the same host"
        );
        assert!(allowance.take(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), 1, now));
        assert_eq!(host_key(mapped(3)), IpAddr::V4([127, 0, 0, 3].into()));
    }

    #[test]
    fn the_addresses_remembered_stay_bounded_however_many_draw_at_once() {
        let mut allowance = Allowance::default();
        let now = Instant::now();
        for i in 0..3 * ALLOWANCE_ADDRESSES as u32 {
            let _ = allowance.take(IpAddr::V4(i.into()), 10, now);
            assert!(allowance.buckets.len() <= ALLOWANCE_ADDRESSES);
        }
    }
}
