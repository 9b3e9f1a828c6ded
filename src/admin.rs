//! The admin endpoint: a small HTTP/1.1 server in the same loop, off unless configured
//! (`admin = "127.0.0.1:PORT"` in a server's `[[server]]` table, or `herd serve --admin ADDR`).
//!
//! - `GET /metrics`: the server's counts and state in Prometheus's text format ([`metrics`]);
//! - `GET /healthz`: `200 ok` while the loop turns and nothing is failing, else `503` and the
//!   reason (the store's file or the log cannot be written, or the server is stopping);
//! - `GET /status`: one line of JSON for `herd status` ([`crate::tools::status`]).
//!
//! Each connection is one more explicit state machine of the loop:
//!
//! ```text
//!            a whole request head: answered          written, keep-alive
//!   Reading -------------------------------> Writing -------------------> Reading
//!      |  head too long, too slow, not GET       |  written, close
//!      '-----------------------------------------+-------------------> Closed
//! ```
//!
//! Limits, like the client port's: a request head of at most [`MAX_HEAD_BYTES`], whole within
//! [`REQUEST_TIME`] of its first byte (or of the connection, for the first); a kept-alive
//! connection idle for [`IDLE_TIME`] is closed; at most [`MAX_CONNECTIONS`] at once, and one
//! more is answered `503` and closed. The request is parsed with `httparse`; the response is
//! written by hand.

use std::fmt::Write as _;
use std::io::Read;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};

use crate::metrics::{
    Histogram, LinkCounts, PlacesCounts, CLOSE_KINDS, PLACES_OUTCOMES, RESULTS, VERBS,
};
use crate::wire::OutBuf;

/// The longest request head accepted.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// How long a request may take to arrive whole.
pub const REQUEST_TIME: Duration = Duration::from_secs(5);
/// How long a kept-alive connection may wait for its next request.
pub const IDLE_TIME: Duration = Duration::from_secs(30);
/// Admin connections open at once.
pub const MAX_CONNECTIONS: usize = 8;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Metrics,
    Health,
    Status,
}

/// One admin connection.
pub struct AdminConn {
    stream: TcpStream,
    state: State,
}

enum State {
    /// Reading a request head, due whole by `until`.
    Reading {
        buf: Vec<u8>,
        until: Instant,
    },
    /// Writing the response; then reading the next request, or closing.
    Writing {
        out: OutBuf,
        keep_alive: bool,
    },
    Closed,
}

/// What reading asked of the server: a response to a route (the server makes the body).
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum Asked {
    Nothing,
    Route { route: Route, keep_alive: bool },
}

impl AdminConn {
    pub fn new(stream: TcpStream, now: Instant) -> AdminConn {
        AdminConn {
            stream,
            state: State::Reading {
                buf: Vec::new(),
                until: now + REQUEST_TIME,
            },
        }
    }

    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// When the connection next needs the loop.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Reading { until, .. } => Some(*until),
            _ => None,
        }
    }

    /// Fires its deadline: a request not whole in time, or a kept-alive connection idle too long.
    pub fn on_timeout(&mut self, now: Instant) {
        if self.deadline().is_some_and(|at| at <= now) {
            self.state = State::Closed;
        }
    }

    /// Reads what arrived; returns the route of a whole request, if one came.
    pub fn on_readable(&mut self, scratch: &mut [u8]) -> Asked {
        let State::Reading { buf, .. } = &mut self.state else {
            return Asked::Nothing;
        };
        loop {
            match self.stream.read(scratch) {
                Ok(0) => {
                    self.state = State::Closed;
                    return Asked::Nothing;
                }
                Ok(n) => buf.extend_from_slice(&scratch[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.state = State::Closed;
                    return Asked::Nothing;
                }
            }
            if buf.len() > MAX_HEAD_BYTES {
                break;
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        let parsed = request.parse(buf);
        let whole = match parsed {
            Ok(httparse::Status::Complete(_)) => true,
            Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD_BYTES => return Asked::Nothing,
            _ => false,
        };
        if !whole {
            self.reply(400, "text/plain", b"bad request\n", false);
            return Asked::Nothing;
        }
        let close = request.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close")
        });
        let keep_alive = request.version == Some(1) && !close;
        let route = match (request.method, request.path) {
            (Some("GET"), Some("/metrics")) => Route::Metrics,
            (Some("GET"), Some("/healthz")) => Route::Health,
            (Some("GET"), Some("/status")) => Route::Status,
            (Some("GET"), _) => {
                self.reply(404, "text/plain", b"not found\n", keep_alive);
                return Asked::Nothing;
            }
            _ => {
                self.reply(405, "text/plain", b"only GET\n", false);
                return Asked::Nothing;
            }
        };
        Asked::Route { route, keep_alive }
    }

    /// Queues a response.
    pub fn reply(&mut self, status: u16, kind: &str, body: &[u8], keep_alive: bool) {
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
        self.state = State::Writing { out, keep_alive };
    }

    /// Writes what waits; a response written goes back to reading (keep-alive) or closes.
    pub fn flush(&mut self, now: Instant) {
        let State::Writing { out, keep_alive } = &mut self.state else {
            return;
        };
        if out.write_to(&mut self.stream).is_err() {
            self.state = State::Closed;
            return;
        }
        if out.pending() == 0 {
            self.state = match keep_alive {
                true => State::Reading {
                    buf: Vec::new(),
                    until: now + IDLE_TIME,
                },
                false => {
                    let _ = self.stream.shutdown(std::net::Shutdown::Write);
                    State::Closed
                }
            };
        }
    }
}

/// The admin listener and its connections.
pub struct Admin {
    pub listener: TcpListener,
    pub addr: SocketAddr,
    pub conns: Vec<Option<AdminConn>>,
}

impl Admin {
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

/// Appends a metric's `# HELP` and `# TYPE` lines.
fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Appends a histogram in Prometheus's cumulative form.
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
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {}", h.sum);
    let _ = writeln!(out, "{name}_count{braces} {}", h.count);
}

/// A label value, escaped as the text format wants.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One link's state, as the server sees it, for the metrics and the status.
#[derive(Debug, Clone)]
pub struct LinkView {
    pub neighbour: String,
    /// `out`: the link we dialled; `in`: the one the neighbour dialled.
    pub direction: &'static str,
    pub state: &'static str,
    pub up: bool,
    pub seconds_in_state: f64,
}

/// Everything `/metrics` and `/status` show, gathered by the loop.
pub struct View<'a> {
    pub name: &'a str,
    pub metrics: &'a crate::metrics::Metrics,
    pub records: usize,
    pub digest: u64,
    pub clients_connected: usize,
    pub links: Vec<LinkView>,
    /// Each neighbour's counts, in the order of its `out` link in `links`.
    pub link_counts: Vec<LinkCounts>,
    pub places: Option<&'a PlacesCounts>,
    pub places_slots_busy: usize,
    pub store_file: Option<StoreFileView>,
    pub uptime: f64,
}

/// The store's file, for the metrics.
pub struct StoreFileView {
    pub stats: crate::aof::Stats,
    pub bytes: u64,
    pub sync_seconds: Histogram,
    /// The `everysec` helper's syncs and the longest, in seconds.
    pub helper: Option<(u64, f64)>,
}

/// The Prometheus text of `view`.
pub fn render_metrics(view: &View) -> String {
    let m = view.metrics;
    let mut out = String::with_capacity(8 * 1024);
    let server = format!("server=\"{}\"", label(view.name));
    head(
        &mut out,
        "herd_up_seconds",
        "gauge",
        "Seconds since the server started.",
    );
    let _ = writeln!(out, "herd_up_seconds{{{server}}} {:.3}", view.uptime);
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
    head(
        &mut out,
        "herd_records",
        "gauge",
        "Clients whose record the store holds.",
    );
    let _ = writeln!(out, "herd_records{{{server}}} {}", view.records);
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
    let neighbours: Vec<&String> = view
        .links
        .iter()
        .filter(|l| l.direction == "out")
        .map(|l| &l.neighbour)
        .collect();
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
    if let Some(places) = view.places {
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
        histogram(
            &mut out,
            "herd_places_request_seconds",
            "Seconds from a WHATSAT's arrival to its Places answer.",
            &server,
            &places.seconds,
        );
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
    if let Some(file) = &view.store_file {
        let s = &file.stats;
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
        histogram(&mut out, "herd_store_file_sync_seconds", "Seconds the loop spent syncing the store's file before a turn's replies (fsync = \"always\").", &server, &file.sync_seconds);
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
    histogram(
        &mut out,
        "herd_loop_turn_seconds",
        "Seconds a turn of the loop took, from the end of its poll to its next.",
        &server,
        &m.turn_seconds,
    );
    out
}

/// The one line of JSON `herd status` reads.
pub fn render_status(view: &View) -> String {
    let links_up = view
        .links
        .iter()
        .filter(|l| l.direction == "out" && l.up)
        .count();
    let links = view.links.iter().filter(|l| l.direction == "out").count();
    let places_errors: u64 = view.places.map_or(0, |p| p.outcomes[1..].iter().sum());
    let status = serde_json::json!({
        "name": view.name,
        "records": view.records,
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
