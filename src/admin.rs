//! The admin endpoint: a small HTTP/1.1 server in the same loop, off unless configured
//! (`admin = "127.0.0.1:PORT"` in a server's `[[server]]` table, or `herd serve --admin ADDR`).
//!
//! - `GET /metrics`: the server's counts and state in Prometheus's text format
//!   ([`render_metrics`]);
//! - `GET /healthz`: `200 ok` while the loop turns and nothing is failing, else `503` and the
//!   reason (the store's file cannot be synced by the `everysec` helper, the log cannot be
//!   written, or the server is stopping; a store's file that cannot be written stops the server);
//! - `GET /status`: one line of JSON for `herd status` ([`crate::tools::status`]).
//!
//! Being in the loop, it reads what a scrape shows (the counts of [`crate::metrics`], the
//! store's digest, each link's state) where the loop keeps it, with no lock and no copy kept up
//! to date for another thread, and a response is made between two events, so it shows one
//! moment of the server. The price: the text is rendered on the loop, so the turn that answers
//! a scrape is longer, by the time a few kilobytes of formatting take, for every client in it.
//!
//! Each connection is one more explicit state machine of the loop:
//!
//! ```text
//!            a whole request head: answered          written, keep-alive: the next request,
//!   Reading -------------------------------> Writing ---------------------> Reading
//!      |  too slow                               |    already read or still to come
//!      |                                         |  written, close (a bad request, HTTP/1.0,
//!      |                                         |  `Connection: close`, the client half-closed)
//!      |                                         v
//!      |                                    Lingering: input read and dropped until the client
//!      |                                         |     closes too, or for LINGER at most
//!      '-----------------------------------------+-------------------> Closed
//! ```
//!
//! Limits, like the client port's: a request head of at most [`MAX_HEAD_BYTES`]; the first
//! request whole within [`REQUEST_TIME`] of the connection, and each later one on a kept-alive
//! connection whole within [`IDLE_TIME`] of the response before it (the deadline is not moved
//! by the first byte of a request); a response the client does not take within [`IDLE_TIME`]
//! closes the connection; at most [`MAX_CONNECTIONS`] at once: more wait in the kernel's accept
//! queue until one closes (the loop's [`accept_admin`](crate::server::Server::accept_admin)
//! takes them then). The request is parsed with `httparse`; the response is written by hand.
//!
//! Requests may be pipelined: what follows a request head is kept, and read while the response
//! is written, and the next request is answered once the response before it is written. A client
//! that sends a request and half-closes is answered, then closed. A connection closed after its
//! response has its input drained before the close (a lingering close, as for clients), so that
//! the response is not destroyed by a reset.

use std::fmt::Write as _;
use std::io::Read;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};

use crate::metrics::{
    Histogram, LinkCounts, PlacesCounts, CLOSE_KINDS, PLACES_OUTCOMES, RESULTS, VERBS,
};
use crate::wire::OutBuf;

/// The longest request head accepted: past it, `400` and the connection is closed. A scrape's
/// head is a few hundred bytes; this bounds what a connection that never ends its head holds.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// How long a connection's first request may take to arrive whole, from the accept: past it the
/// connection is closed without a response (a client dripping bytes holds a slot no longer).
pub const REQUEST_TIME: Duration = Duration::from_secs(5);
/// How long a kept-alive connection may wait for its next request, and so take to send it
/// whole, from the end of the response before it.
pub const IDLE_TIME: Duration = Duration::from_secs(30);
/// Admin connections open at once: a fixed set of slots, each with its own token
/// ([`crate::reactor::Source::Admin`]), so the token layout is known before the loop starts.
pub const MAX_CONNECTIONS: usize = 8;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics`: [`render_metrics`].
    Metrics,
    /// `GET /healthz`: the loop's own judgement, made where it knows what is failing.
    Health,
    /// `GET /status`: [`render_status`].
    Status,
}

/// How long a connection closed after its response has its input read and dropped, so that
/// the close is a FIN and not a reset that could destroy the response at the client.
pub const LINGER: Duration = Duration::from_secs(2);

/// One admin connection. It never registers anything and makes no response body: the loop
/// reads it on each event ([`AdminConn::on_readable`]), makes the body the route asks for, and
/// hands it back ([`AdminConn::reply`]); the end of the turn writes it ([`AdminConn::flush`]).
pub struct AdminConn {
    stream: TcpStream,
    /// What was read and not yet answered: a request head being read, or requests pipelined
    /// behind the one being answered. Never more than [`MAX_HEAD_BYTES`] and one read.
    input: Vec<u8>,
    /// The client closed its side: the requests whole in `input` are the last.
    ended: bool,
    /// `input` ends in part of a head, and the socket had no more: only a new event (or the
    /// deadline) can change that, so the loop is not brought back for it.
    partial: bool,
    state: State,
}

/// Where a connection is. Each state that waits carries its deadline, so leaving it cancels it.
enum State {
    /// Waiting for a request head, due whole by `until`.
    Reading { until: Instant },
    /// Writing the response, due taken by `until`; then reading the next request, or closing.
    Writing {
        out: OutBuf,
        /// What the response's `Connection` header promised: read again, or close.
        keep_alive: bool,
        until: Instant,
    },
    /// The response written and the write side shut: input is read and dropped until the
    /// client closes too, or until `until`.
    Lingering { until: Instant },
    /// Done with: the end of the turn frees the slot and drops the socket, which closes it.
    Closed,
}

/// What reading asked of the server: a response to a route (the server makes the body).
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum Asked {
    /// No whole request yet, or one already answered here (an error), or the connection is
    /// writing, lingering or closed.
    Nothing,
    /// A whole, valid request; the loop must [`AdminConn::reply`].
    Route {
        /// What is asked for.
        route: Route,
        /// HTTP/1.1 without `Connection: close`: the connection may be read again after the
        /// response.
        keep_alive: bool,
    },
}

impl AdminConn {
    /// A connection just accepted at `now`: its first request is due within [`REQUEST_TIME`].
    pub fn new(stream: TcpStream, now: Instant) -> AdminConn {
        AdminConn {
            stream,
            input: Vec::new(),
            ended: false,
            partial: false,
            state: State::Reading {
                until: now + REQUEST_TIME,
            },
        }
    }

    /// The socket, for the loop to register.
    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Whether the connection is done with: the loop frees its slot at the end of the turn.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Whether it is reading with a request possibly waiting in what it already holds: the
    /// loop must call [`AdminConn::on_readable`] again, as no event will come for those bytes.
    pub fn has_input(&self) -> bool {
        matches!(self.state, State::Reading { .. })
            && ((!self.input.is_empty() && !self.partial) || self.ended)
    }

    /// When the connection next needs the loop.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Reading { until }
            | State::Writing { until, .. }
            | State::Lingering { until } => Some(*until),
            State::Closed => None,
        }
    }

    /// Fires its deadline: a request not whole in time, a kept-alive connection idle too long, a
    /// response not taken in time, a linger over. Called for every connection each time the
    /// loop fires deadlines (every turn), so it checks its own and is safe to call when none is
    /// due. No `408` is sent: the connection is simply closed.
    pub fn on_timeout(&mut self, now: Instant) {
        if self.deadline().is_some_and(|at| at <= now) {
            self.state = State::Closed;
        }
    }

    /// Reads what arrived, and returns the route of the next whole request, if one is there.
    /// An error (`400`, `404`, `405`) is answered here, and [`Asked::Nothing`] returned.
    ///
    /// Called by the loop on every event of the connection's token, WRITABLE ones included
    /// (the socket is registered for both), and again when [`AdminConn::has_input`] says so.
    /// It reads in every state but `Closed`: while a response is written, a pipelined request
    /// is read into `input` (edge-triggered: its event is now, not after the response), up to
    /// the head limit; lingering, what is read is dropped.
    pub fn on_readable(&mut self, now: Instant, scratch: &mut [u8]) -> Asked {
        if matches!(self.state, State::Closed) {
            return Asked::Nothing;
        }
        let lingering = matches!(self.state, State::Lingering { .. });
        // Edge-triggered: read until `WouldBlock`, the end of the stream, or more than a head's
        // worth held; bytes left in the socket past that are read once the held ones are
        // answered (`has_input` brings the loop back).
        while !self.ended && (lingering || self.input.len() <= MAX_HEAD_BYTES) {
            match self.stream.read(scratch) {
                Ok(0) => self.ended = true,
                Ok(_) if lingering => {}
                Ok(n) => {
                    self.input.extend_from_slice(&scratch[..n]);
                    self.partial = false;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A reset, or another error: nothing can be answered.
                Err(_) => {
                    self.state = State::Closed;
                    return Asked::Nothing;
                }
            }
        }
        match self.state {
            State::Lingering { .. } if self.ended => self.state = State::Closed,
            State::Reading { .. } => return self.next_request(now),
            _ => {}
        }
        Asked::Nothing
    }

    /// Takes the next whole request out of `input`, if there is one.
    fn next_request(&mut self, now: Instant) -> Asked {
        // More than 32 headers is `TooManyHeaders`: a `400`, like any head httparse refuses.
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        let length = match request.parse(&self.input) {
            // Whole, and within its limit however it arrived (one read may bring more).
            Ok(httparse::Status::Complete(length)) if length <= MAX_HEAD_BYTES => length,
            // Not yet whole, and still within its limit: wait for more (or the deadline), unless
            // no more can come.
            Ok(httparse::Status::Partial) if self.input.len() <= MAX_HEAD_BYTES => {
                self.partial = true;
                if self.ended {
                    // Nothing, or half a request, before the end: nothing to answer.
                    self.state = State::Closed;
                }
                return Asked::Nothing;
            }
            // Not HTTP, or a head past its limit: where the next request would begin cannot be
            // trusted, so the connection is closed after the answer.
            _ => {
                self.input.clear();
                self.reply(now, 400, "text/plain", b"bad request\n", false);
                return Asked::Nothing;
            }
        };
        let close = request.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close")
        });
        // HTTP/1.1 keeps the connection unless told not to; HTTP/1.0 (version 0) is closed
        // after its response, even with `Connection: keep-alive`.
        let keep_alive = request.version == Some(1) && !close;
        // Exact paths: a query string (`/metrics?x`) is a `404`.
        let asked = match (request.method, request.path) {
            (Some("GET"), Some("/metrics")) => Some(Route::Metrics),
            (Some("GET"), Some("/healthz")) => Some(Route::Health),
            (Some("GET"), Some("/status")) => Some(Route::Status),
            (Some("GET"), _) => None,
            // Any other method may carry a body this does not read, which would be taken for
            // the next request: closed after the answer.
            _ => {
                self.input.clear();
                self.reply(now, 405, "text/plain", b"only GET\n", false);
                return Asked::Nothing;
            }
        };
        self.input.drain(..length);
        match asked {
            Some(route) => Asked::Route { route, keep_alive },
            // A well-formed GET for an unknown path: the connection may go on.
            None => {
                self.reply(now, 404, "text/plain", b"not found\n", keep_alive);
                Asked::Nothing
            }
        }
    }

    /// Queues a response, made at `now`: `status`, a `Content-Type` of `kind`, `body`, and a `Connection`
    /// header that says what [`AdminConn::flush`] will do once it is written (a client that has
    /// half-closed is told `close`). Nothing is written here; the end of the turn writes it.
    pub fn reply(&mut self, now: Instant, status: u16, kind: &str, body: &[u8], keep_alive: bool) {
        let keep_alive = keep_alive && !self.ended;
        // The statuses this module and the loop send; any other would be misnamed `503`.
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Service Unavailable",
        };
        let mut out = OutBuf::default();
        out.push(
            format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
                 Connection: {}\r\n\r\n",
                body.len(),
                if keep_alive { "keep-alive" } else { "close" }
            )
            .as_bytes(),
        );
        out.push(body);
        // A client that does not take its response within the idle time holds its slot no
        // longer.
        self.state = State::Writing {
            out,
            keep_alive,
            until: now + IDLE_TIME,
        };
    }

    /// Writes what waits; a response written goes back to reading (keep-alive), or shuts the
    /// write side and lingers.
    ///
    /// Called for every admin connection at the end of every turn (Redis's `beforeSleep`
    /// writing replies), not only on WRITABLE: a response made this turn leaves at once, with
    /// no turn spent waiting for an event. A response the socket cannot take whole waits for
    /// the next turn, whatever woke it, and each turn until then costs one `write` that says
    /// `WouldBlock`.
    pub fn flush(&mut self, now: Instant) {
        let State::Writing {
            out, keep_alive, ..
        } = &mut self.state
        else {
            return;
        };
        // The client went away: nothing more to say to it.
        if out.write_to(&mut self.stream).is_err() {
            self.state = State::Closed;
            return;
        }
        if out.pending() != 0 {
            return;
        }
        self.state = match (*keep_alive, self.ended) {
            // The next request gets the idle time, whole, from now.
            (true, false) => State::Reading {
                until: now + IDLE_TIME,
            },
            // The client has closed its side: it sends nothing more, and the FIN follows.
            (_, true) => {
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
                State::Closed
            }
            // Input may still come or wait unread (a body, the rest of an overlong head): a
            // close now would be a reset, which may overtake the response at the client.
            (false, false) => match self.stream.shutdown(std::net::Shutdown::Write) {
                Ok(()) => {
                    self.input.clear();
                    State::Lingering {
                        until: now + LINGER,
                    }
                }
                Err(_) => State::Closed,
            },
        };
    }
}

/// The admin listener and its connections.
pub struct Admin {
    /// Registered for READABLE by the loop, under [`crate::reactor::Source::AdminListener`].
    pub listener: TcpListener,
    /// The address bound: with port 0 asked for (as `herd up` does), the port the kernel
    /// chose, which the server prints and writes to `<log_dir>/<NAME>.admin` for `herd status`.
    pub addr: SocketAddr,
    /// [`MAX_CONNECTIONS`] slots; slot `i` is token [`crate::reactor::Source::Admin`]`(i)`.
    /// A slot is emptied at the end of the turn its connection closed in.
    pub conns: Vec<Option<AdminConn>>,
}

impl Admin {
    /// Listens at `addr`, before the loop starts. A failure (the port taken) stops the server's
    /// start, as one on its client port does.
    pub fn bind(addr: SocketAddr) -> Result<Admin, String> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| format!("cannot listen for the admin endpoint on {addr}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        Ok(Admin {
            listener,
            addr,
            conns: (0..MAX_CONNECTIONS).map(|_| None).collect(),
        })
    }

    /// The earliest deadline of its connections.
    pub fn deadline(&self) -> Option<Instant> {
        self.conns
            .iter()
            .flatten()
            .filter_map(AdminConn::deadline)
            .min()
    }
}

/// Appends a metric's `# HELP` and `# TYPE` lines. Every `help` here is a fixed text with no
/// backslash or newline, the two characters the format would want escaped in it.
fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Appends a histogram in Prometheus's cumulative form. [`Histogram`] counts each bucket apart
/// (an observation is one increment); the sums are made here, when a scraper asks, not on the
/// loop's hot path. `labels` is `key="value",...` without braces, or empty.
fn histogram(out: &mut String, name: &str, help: &str, labels: &str, h: &Histogram) {
    head(out, name, "histogram", help);
    let mut cumulative = 0;
    let sep = if labels.is_empty() { "" } else { "," };
    for (bound, count) in h.bounds.iter().zip(&h.counts) {
        cumulative += count;
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
        );
    }
    // The last of `counts`, past every bound, has no line of its own: `+Inf` is every
    // observation, which is `count`.
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {}", h.sum);
    let _ = writeln!(out, "{name}_count{braces} {}", h.count);
}

/// A label value, escaped as the text format wants: backslash, double quote and newline. Only
/// names from the configuration are labels here, but a name is not checked for these.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One link's state, as the server sees it, for the metrics and the status.
#[derive(Debug, Clone)]
pub struct LinkView {
    /// The neighbour's name in the configuration.
    pub neighbour: String,
    /// `out`: the link we dialled; `in`: the one the neighbour dialled.
    pub direction: &'static str,
    /// The link's state name (`out`: as it was at the end of the last turn; `in`: now).
    pub state: &'static str,
    /// `out`: the dialled link is `Up`; `in`: a proved connection from the neighbour is held.
    pub up: bool,
    /// Seconds since `state` last changed (for `in`, since the server started if it never did).
    pub seconds_in_state: f64,
}

/// Everything `/metrics` and `/status` show, gathered by the loop
/// ([`Server::view`](crate::server::Server::view)) at the moment of the request. Borrowed where
/// it can be: a view lives only while one response is made.
pub struct View<'a> {
    /// The server's name: the `server` label of every sample.
    pub name: &'a str,
    /// The counts the loop keeps as it works.
    pub metrics: &'a crate::metrics::Metrics,
    /// Clients whose record the store holds.
    pub records: usize,
    /// The store's order-independent digest ([`crate::store`]): equal on two servers that hold
    /// the same records.
    pub digest: u64,
    /// Accepted connections open: clients, and neighbours that have not yet proved who they
    /// are (a proved one becomes an inbound link and is not counted).
    pub clients_connected: usize,
    /// Two per neighbour, its `out` link then its `in` link, in the configuration's order.
    pub links: Vec<LinkView>,
    /// Each neighbour's counts, in the order of its `out` link in `links`.
    pub link_counts: Vec<LinkCounts>,
    /// The Places pool's counts; `None` when the server has no API key, and then no Places
    /// metric is shown.
    pub places: Option<&'a PlacesCounts>,
    /// Places connections with a request under way (connecting or exchanging).
    pub places_slots_busy: usize,
    /// The store's file; `None` when the server keeps its records in memory only.
    pub store_file: Option<StoreFileView>,
    /// Seconds since the server was started, by the monotonic clock.
    pub uptime: f64,
}

/// The store's file, for the metrics.
pub struct StoreFileView {
    /// The file's counts ([`crate::aof::Stats`]).
    pub stats: crate::aof::Stats,
    /// The file's length now: it falls when a compaction replaces the file.
    pub bytes: u64,
    /// The syncs the loop made itself (`fsync = "always"`); empty under the other policies.
    pub sync_seconds: Histogram,
    /// The `everysec` helper's syncs and the longest, in seconds.
    pub helper: Option<(u64, f64)>,
}

/// The Prometheus text of `view` (text format 0.0.4, the `Content-Type` the loop sends with it).
///
/// Every series of a family is written even at zero (every verb and result, every close
/// reason, every Places outcome): a series that first appears at 1 loses its first increment
/// to `rate()` and `increase()`, which need two samples. Every sample carries `server`, the
/// server's name, so queries can name servers as the herd does rather than by address.
pub fn render_metrics(view: &View) -> String {
    let m = view.metrics;
    let mut out = String::with_capacity(8 * 1024);
    let server = format!("server=\"{}\"", label(view.name));
    // By the monotonic clock, so a change of the wall clock does not move it; a fall means the
    // server restarted, and with it every counter below.
    head(
        &mut out,
        "herd_up_seconds",
        "gauge",
        "Seconds since the server started.",
    );
    let _ = writeln!(out, "herd_up_seconds{{{server}}} {:.3}", view.uptime);
    // The accepted connections the loop holds a slot for: neither the admin connections nor a
    // neighbour's proved inbound link, which has its own token and no slot.
    head(
        &mut out,
        "herd_connections_open",
        "gauge",
        "Accepted connections open now (clients, and neighbours not yet proved).",
    );
    let _ = writeln!(
        out,
        "herd_connections_open{{{server}}} {}",
        view.clients_connected
    );
    // Counted once a connection has its slot and is registered; one refused at the door is
    // counted in the next family instead, never in both.
    head(
        &mut out,
        "herd_connections_accepted_total",
        "counter",
        "Connections accepted.",
    );
    let _ = writeln!(
        out,
        "herd_connections_accepted_total{{{server}}} {}",
        m.accepted
    );
    // Refused before it had a slot: its address already holds `max_connections_per_address`,
    // or every place is taken and no stranger could be evicted. A stranger evicted to make
    // room is counted nowhere: neither here nor as closed.
    head(
        &mut out,
        "herd_connections_refused_total",
        "counter",
        "Connections refused at once: every place taken, or too many from one address.",
    );
    let _ = writeln!(
        out,
        "herd_connections_refused_total{{{server}}} {}",
        m.refused
    );
    // Client connections and neighbours' inbound links alike, by the kinds of
    // [`crate::conn::CloseReason::kind`]: `peer_link` is an inbound link its neighbour closed,
    // left silent, broke the protocol on or replaced; `not_reading` a client closed for leaving
    // its replies unread. The links this server dialled are not counted here (see the ups).
    head(
        &mut out,
        "herd_connections_closed_total",
        "counter",
        "Connections closed, by reason.",
    );
    for (kind, count) in CLOSE_KINDS.iter().zip(m.closed) {
        let _ = writeln!(
            out,
            "herd_connections_closed_total{{{server},reason=\"{kind}\"}} {count}"
        );
    }
    // `invalid`: an IAMAT whose client id or time is out of bounds, a WHATSAT about a client
    // the store does not know; a line that parses as neither (a malformed IAMAT or WHATSAT
    // too) is `other`. `refused`: an IAMAT for a new client past `max_clients`, a WHATSAT over
    // `whatsat_per_minute`. A stale IAMAT is `ok`, answered as any other; a WHATSAT is `ok`
    // once handed to Places, whatever Places then does (the Places outcomes say that).
    head(
        &mut out,
        "herd_commands_total",
        "counter",
        "Client commands, by verb and result.",
    );
    for (v, verb) in VERBS.iter().enumerate() {
        for (r, result) in RESULTS.iter().enumerate() {
            let _ = writeln!(
                out,
                "herd_commands_total{{{server},verb=\"{verb}\",result=\"{result}\"}} {}",
                m.commands[v][r]
            );
        }
    }
    // Clients are never removed from the store, so while the server runs this only grows, up
    // to `max_clients`.
    head(
        &mut out,
        "herd_records",
        "gauge",
        "Clients whose record the store holds.",
    );
    let _ = writeln!(out, "herd_records{{{server}}} {}", view.records);
    // Only records that changed the store: each is appended to the store's file and flooded.
    // A copy that reaches a server again, by a second path or in a resync, is stale and not
    // counted.
    head(
        &mut out,
        "herd_records_stored_total",
        "counter",
        "Records that changed the store, by where they came from.",
    );
    let _ = writeln!(
        out,
        "herd_records_stored_total{{{server},source=\"client\"}} {}",
        m.stored_from_clients
    );
    let _ = writeln!(
        out,
        "herd_records_stored_total{{{server},source=\"peer\"}} {}",
        m.stored_from_peers
    );
    // From neighbours only (a client's bad IAMAT is a command, above): a record that does not
    // parse, whose client id or time is out of bounds, or for a new client past `max_clients`.
    // A steady count points at a neighbour whose clock runs ahead of this one's, or at limits
    // that differ between servers.
    head(
        &mut out,
        "herd_records_refused_total",
        "counter",
        "Records from neighbours refused (out of bounds, or not valid).",
    );
    let _ = writeln!(
        out,
        "herd_records_refused_total{{{server}}} {}",
        m.refused_records
    );
    // The digest as a label on a constant 1, Prometheus's `_info` idiom for a value that is not
    // a number to graph. The herd agrees when
    // `count(count by (digest) (herd_store_digest_info)) == 1`; while records are in flight,
    // servers differ for a moment, so alert on a difference that lasts.
    head(
        &mut out,
        "herd_store_digest_info",
        "gauge",
        "The store's order-independent digest, as a label: equal on every server once they agree.",
    );
    let _ = writeln!(
        out,
        "herd_store_digest_info{{{server},digest=\"{:016x}\"}} 1",
        view.digest
    );
    // Both directions of each neighbour: the link this server dialled carries its records out,
    // the one the neighbour dialled brings the neighbour's in, so either down is half a link.
    head(
        &mut out,
        "herd_link_up",
        "gauge",
        "Whether a link to a neighbour is up, by direction (out: dialled by this server).",
    );
    for l in &view.links {
        let n = label(&l.neighbour);
        let _ = writeln!(
            out,
            "herd_link_up{{{server},neighbour=\"{n}\",direction=\"{}\"}} {}",
            l.direction,
            u8::from(l.up)
        );
    }
    // The state is a label, so a change of state ends one series and starts another: the
    // series present is the state now.
    head(
        &mut out,
        "herd_link_state_seconds",
        "gauge",
        "Seconds a link has been in its state, with the state as a label.",
    );
    for l in &view.links {
        let n = label(&l.neighbour);
        let _ = writeln!(
            out,
            "herd_link_state_seconds{{{server},neighbour=\"{n}\",direction=\"{}\",state=\"{}\"}} {:.3}",
            l.direction, l.state, l.seconds_in_state
        );
    }
    // The per-neighbour counts below are indexed like the `out` links (see [`View`]).
    let neighbours: Vec<&String> = view
        .links
        .iter()
        .filter(|l| l.direction == "out")
        .map(|l| &l.neighbour)
        .collect();
    // What is written on the link this server dialled (its records and copies) and read on
    // the one the neighbour dialled (the neighbour's). What flows the other way on each link
    // (handshake replies, heartbeats, digests) is not counted.
    head(
        &mut out,
        "herd_link_bytes_total",
        "counter",
        "Bytes on a neighbour's links: sent on the link dialled, received on the one it dialled.",
    );
    for (n, c) in neighbours.iter().zip(&view.link_counts) {
        let n = label(n);
        let _ = writeln!(
            out,
            "herd_link_bytes_total{{{server},neighbour=\"{n}\",direction=\"sent\"}} {}",
            c.bytes_sent
        );
        let _ = writeln!(
            out,
            "herd_link_bytes_total{{{server},neighbour=\"{n}\",direction=\"received\"}} {}",
            c.bytes_received
        );
    }
    // Rising steadily, the link flaps: each rise is a reconnect, and a copy of the whole store
    // after it.
    head(
        &mut out,
        "herd_link_ups_total",
        "counter",
        "Times the link dialled to a neighbour came up.",
    );
    for (n, c) in neighbours.iter().zip(&view.link_counts) {
        let _ = writeln!(
            out,
            "herd_link_ups_total{{{server},neighbour=\"{}\"}} {}",
            label(n),
            c.ups
        );
    }
    // Each copy started or widened because the two stores' digests kept differing, whichever
    // side saw it ([`Link::resync`](crate::link::Link::resync)); the copy of the whole store
    // that follows every reconnect is not counted.
    head(
        &mut out,
        "herd_resyncs_total",
        "counter",
        "Copies of the store, or of parts of it, made again for a neighbour.",
    );
    for (n, c) in neighbours.iter().zip(&view.link_counts) {
        let _ = writeln!(
            out,
            "herd_resyncs_total{{{server},neighbour=\"{}\"}} {}",
            label(n),
            c.resyncs
        );
    }
    // Sums the parts of each resync: a copy of the whole store counts
    // [`DIGEST_PARTS`](crate::store::DIGEST_PARTS), which the help text says as 256.
    head(
        &mut out,
        "herd_parts_copied_total",
        "counter",
        "Parts of the store copied again for a neighbour (a whole copy counts all 256).",
    );
    for (n, c) in neighbours.iter().zip(&view.link_counts) {
        let _ = writeln!(
            out,
            "herd_parts_copied_total{{{server},neighbour=\"{}\"}} {}",
            label(n),
            c.parts_copied
        );
    }
    // Only with an API key: without one there is no pool, and a WHATSAT about a known client
    // is answered `REQUEST_DENIED` at once (and counted as an `ok` command, nothing more).
    if let Some(places) = view.places {
        // `answered`: a whole HTTP response came back, whatever Google's status in it, and
        // even if its body could not be read as an answer (the client is then told
        // `UNKNOWN_ERROR`); `failed`: no whole response (connect, TLS, HTTP framing, a body
        // over `max_body_bytes`); `late`: past `timeout_ms`; `busy`: refused because
        // `max_queue` requests were already waiting.
        head(
            &mut out,
            "herd_places_requests_total",
            "counter",
            "Places requests, by outcome.",
        );
        for (outcome, count) in PLACES_OUTCOMES.iter().zip(places.outcomes) {
            let _ = writeln!(
                out,
                "herd_places_requests_total{{{server},outcome=\"{outcome}\"}} {count}"
            );
        }
        // Every outcome is timed, so `busy` refusals add observations of about zero and `late`
        // ones pile up at `timeout_ms`: read it beside the outcomes.
        histogram(
            &mut out,
            "herd_places_request_seconds",
            "Seconds from a WHATSAT's arrival to its Places answer.",
            &server,
            &places.seconds,
        );
        // At `pool_size`, new requests queue: a pool too small for the load shows here
        // before it shows as `busy` refusals.
        head(
            &mut out,
            "herd_places_connections_busy",
            "gauge",
            "Places connections with a request under way.",
        );
        let _ = writeln!(
            out,
            "herd_places_connections_busy{{{server}}} {}",
            view.places_slots_busy
        );
    }
    // Only with a data directory: a server that keeps its records in memory has no file.
    if let Some(file) = &view.store_file {
        let s = &file.stats;
        // Counted when a record is queued for the end of the turn, so a record whose write
        // then failed is counted here and not in the bytes written.
        head(
            &mut out,
            "herd_store_file_records_total",
            "counter",
            "Records appended to the store's file.",
        );
        let _ = writeln!(
            out,
            "herd_store_file_records_total{{{server}}} {}",
            s.records
        );
        // Bytes whose `write` succeeded (to the page cache: what reached the disk depends on
        // `fsync`).
        head(
            &mut out,
            "herd_store_file_written_bytes_total",
            "counter",
            "Bytes appended to the store's file.",
        );
        let _ = writeln!(
            out,
            "herd_store_file_written_bytes_total{{{server}}} {}",
            s.bytes
        );
        // Grows with every update and falls at each compaction; compactions start when it
        // passes twice the live records and `compact_min_bytes`.
        head(
            &mut out,
            "herd_store_file_bytes",
            "gauge",
            "The store's file's size.",
        );
        let _ = writeln!(out, "herd_store_file_bytes{{{server}}} {}", file.bytes);
        head(
            &mut out,
            "herd_store_file_compactions_total",
            "counter",
            "Compactions of the store's file.",
        );
        let _ = writeln!(
            out,
            "herd_store_file_compactions_total{{{server}}} {}",
            s.compactions
        );
        // Time the clients of a turn waited for the disk: with `fsync = "always"` the loop
        // syncs before it writes the turn's replies. Empty under the other policies.
        histogram(&mut out, "herd_store_file_sync_seconds", "Seconds the loop spent syncing the store's file before a turn's replies (fsync = \"always\").", &server, &file.sync_seconds);
        // The helper thread's syncs (failed ones included) and its longest: these delay no
        // client, but a long sync widens, by as much, the span of records a crash of the
        // machine can lose.
        if let Some((syncs, longest)) = file.helper {
            head(
                &mut out,
                "herd_store_file_background_syncs_total",
                "counter",
                "Syncs of the store's file by its helper thread (fsync = \"everysec\").",
            );
            let _ = writeln!(
                out,
                "herd_store_file_background_syncs_total{{{server}}} {syncs}"
            );
            head(
                &mut out,
                "herd_store_file_background_sync_max_seconds",
                "gauge",
                "The longest sync by the helper thread.",
            );
            let _ = writeln!(
                out,
                "herd_store_file_background_sync_max_seconds{{{server}}} {longest}"
            );
        }
    }
    // The loop itself. Events per turn (the ratio of these two) is the batch a poll returns:
    // it grows with load, as more sockets are ready each time the loop looks. A turn woken by
    // a deadline alone has no event.
    head(
        &mut out,
        "herd_loop_turns_total",
        "counter",
        "Turns of the event loop.",
    );
    let _ = writeln!(out, "herd_loop_turns_total{{{server}}} {}", m.turns);
    head(
        &mut out,
        "herd_loop_events_total",
        "counter",
        "Readiness events the loop handled.",
    );
    let _ = writeln!(out, "herd_loop_events_total{{{server}}} {}", m.events);
    // The work of a turn, not its sleep: from `poll` returning to the end of the turn's
    // writes. Replies leave at the end of the turn their command ran in, so a long turn delays
    // every client served in it.
    histogram(
        &mut out,
        "herd_loop_turn_seconds",
        "Seconds a turn of the loop took, from the end of its poll to its next.",
        &server,
        &m.turn_seconds,
    );
    out
}

/// The one line of JSON `herd status` reads: what its table shows of this server, where
/// `/metrics` has everything.
pub fn render_status(view: &View) -> String {
    // A neighbour's link counts as up when the link this server dialled is: that is the one
    // its records leave by.
    let links_up = view
        .links
        .iter()
        .filter(|l| l.direction == "out" && l.up)
        .count();
    let links = view.links.iter().filter(|l| l.direction == "out").count();
    // Every outcome but the first, `answered` ([`PLACES_OUTCOMES`]).
    let places_errors: u64 = view.places.map_or(0, |p| p.outcomes[1..].iter().sum());
    let status = serde_json::json!({
        "name": view.name,
        "records": view.records,
        // Hex, as in `/metrics` and the `.store` dump, so the three can be compared by eye.
        "digest": format!("{:016x}", view.digest),
        "links_up": links_up,
        "links": links,
        "clients": view.clients_connected,
        "places_errors": places_errors,
    });
    format!("{status}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn view(metrics: &Metrics) -> View<'_> {
        View {
            name: "Bailey",
            metrics,
            records: 3,
            digest: 0xabc,
            clients_connected: 2,
            links: vec![LinkView {
                neighbour: "Bona".into(),
                direction: "out",
                state: "Up",
                up: true,
                seconds_in_state: 1.5,
            }],
            link_counts: vec![LinkCounts::default()],
            places: None,
            places_slots_busy: 0,
            store_file: None,
            uptime: 10.0,
        }
    }

    #[test]
    fn metrics_are_in_the_text_format() {
        let mut metrics = Metrics::new();
        metrics.turn_seconds.observe(0.0002);
        let text = render_metrics(&view(&metrics));
        assert!(text.contains("herd_records{server=\"Bailey\"} 3\n"));
        assert!(text
            .contains("herd_store_digest_info{server=\"Bailey\",digest=\"0000000000000abc\"} 1\n"));
        assert!(text
            .contains("herd_link_up{server=\"Bailey\",neighbour=\"Bona\",direction=\"out\"} 1\n"));
        assert!(text.contains("herd_loop_turn_seconds_bucket{server=\"Bailey\",le=\"0.0005\"} 1\n"));
        assert!(text.contains("herd_loop_turn_seconds_bucket{server=\"Bailey\",le=\"+Inf\"} 1\n"));
        // Every sample line is NAME{...} VALUE, after its HELP and TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').expect("a value");
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(name.starts_with("herd_"), "{line}");
        }
    }

    #[test]
    fn status_is_one_line_of_json() {
        let metrics = Metrics::new();
        let line = render_status(&view(&metrics));
        let json: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(json["links_up"], 1);
        assert_eq!(json["digest"], "0000000000000abc");
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
    }
}
