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
//! Map of the file, top to bottom:
//!
//! | part | what it is |
//! |---|---|
//! | [`LoadOptions`], [`parse_args`], [`USAGE`] | the command line |
//! | `Requests`, `parse_reply`, `Histogram` | pure cores: commands made, replies checked, latencies kept; no sockets, no clock |
//! | `Phase` | the run's timeline: priming, warm-up, measuring, draining, done |
//! | `Generator`, `Conn` | the shell: the loop, and one connection's state machine |
//! | [`LoadReport`] | the figures, as one line of JSON |
//!
//! Every reply is checked. An IAMAT must be answered by exactly
//! `AT SERVER [+-]S.NNNNNNNNN CLIENT LOCATION TIME\n` with the three client fields as sent; a
//! WHATSAT by an `AT` line naming the client asked about, a body, and a blank line. A `?` reply,
//! any mismatch, a lost connection or a reply that never comes is an error.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, ToSocketAddrs};
use std::ops::Range;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token};

use crate::conn::{find_byte, OutBuf};
use crate::log::{escape_into, push_decimal};

/// The location every generated IAMAT reports: the spec's example, on UCLA's campus.
const LOCATION: &[u8] = b"+34.068930-118.445127";
/// Client ids are a prefix and a number: `load-0`, `load-1`, ... unless `--id-prefix` says.
const CLIENT_PREFIX: &str = "load-";
/// Size of the one read buffer shared by every connection.
const READ_CHUNK: usize = 64 * 1024;
/// Events taken from the kernel per poll.
const EVENTS_PER_POLL: usize = 1024;
/// How long the replies still due may take once the measured window has closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Priming gives up when no reply at all has come for this long (the server is not answering).
const PRIMING_STALL: Duration = Duration::from_secs(5);
/// At or above this share of its one core, the generator is the limit, not the server.
const CLIENT_BOUND_PERCENT: f64 = 90.0;
/// How much of a bad reply the first error quotes.
const ERROR_QUOTE_BYTES: usize = 200;

// ---------------------------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------------------------

/// What `herd load` was asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    pub addr: SocketAddr,
    /// Connections open at once (one-shot: connections under way at once).
    pub connections: usize,
    /// Commands each pipelined connection keeps outstanding.
    pub in_flight: usize,
    /// Length of the measured window.
    pub duration: Duration,
    /// Load before the window opens, not counted.
    pub warmup: Duration,
    pub mix: Mix,
    /// One command per connection, as the course's test clients send them.
    pub one_shot: bool,
    /// Distinct client ids, `load-0` to `load-<clients - 1>`.
    pub clients: usize,
    /// WHATSAT radius, sent byte for byte as given.
    pub radius_km: String,
    /// WHATSAT bound.
    pub bound: usize,
    /// Client ids are this prefix and a number.
    pub id_prefix: String,
    /// Commands per second across all connections, sent on schedule whatever the replies do
    /// (open loop); `None`: as fast as the connections' in-flight limits allow.
    pub rate: Option<f64>,
    /// Stop after this many load commands (the window closes when all are answered).
    pub requests: Option<u64>,
    /// Loopback source addresses connections are spread over, from 127.0.0.2 up; 1: the
    /// kernel's choice. See [`Sources`].
    pub sources: usize,
}

/// Which commands make up the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    Iamat,
    Whatsat,
    /// This many WHATSAT in every hundred commands, evenly spread; IAMAT for the rest.
    Mixed {
        whatsat_percent: u8,
    },
}

/// The help text of `herd load`.
pub const USAGE: &str = "\
herd load: generate load against a server of the proxy herd protocol and print one line of JSON

Usage:
  herd load --addr HOST:PORT [options]

Options:
  --addr HOST:PORT       the server to load (required)
  -c, --connections N    connections open at once (default 50)
  -p, --in-flight N      commands each connection keeps outstanding, pipelined (default 1)
  -d, --duration-ms MS   length of the measured window (default 5000)
  --warmup-ms MS         load before the window opens, not counted (default 500)
  --mix KIND             iamat, whatsat, or mixed:N for N% WHATSAT (default iamat)
  --one-shot             one command per connection, as the course's test clients do:
                         connect, send, half-close, read to the end, close
  --clients N            distinct client ids load-0 .. load-(N-1) (default 10000, or 1000
                         when the mix has WHATSAT: each id is sent one IAMAT before the load
                         starts, so that every WHATSAT asks about a known client)
  --radius KM            WHATSAT radius, sent as given (default 10)
  --bound N              WHATSAT bound (default 5)
  --rate N               send N commands per second in all, on schedule whatever the replies
                         do (open loop), as long as -c × -p allow: a command due when all
                         are outstanding waits for a reply; default: as fast as -c and -p allow
  --requests N           stop after N load commands; the window closes when all are answered
  --id-prefix TEXT       client ids are TEXT0, TEXT1, ... (default load-)
  --sources N            connect from N loopback addresses, 127.0.0.2 and up, in turn
                         (Linux, a server on 127.x.x.x; default 1: the kernel chooses). Each
                         address has its own ephemeral ports, so a long --one-shot run does
                         not run out of ports that are not in TIME_WAIT

Every reply is checked against the command it answers. The JSON says:
  requests, per_second   valid replies completed in the measured window, and their rate
  p50_us .. max_us       latency, from handing a command to the socket to parsing its whole
                         reply (with --one-shot, the connect is included)
  errors, first_error    commands without a valid reply (a ? reply, a mismatch, a lost
                         connection, a reply still missing 2 s after the end), warm-up included
  cpu_seconds, cpu_percent
                         this generator's own CPU time over the window, and its share of a core
  client_bound           true when cpu_percent is 90 or more: the generator's one core is
                         saturated, so the rate is the generator's limit, not the server's";

/// Parses the arguments that follow `herd load`.
pub fn parse_args(args: &[String]) -> Result<LoadOptions, String> {
    let mut opts = getopts::Options::new();
    opts.optopt("", "addr", "the server to load", "HOST:PORT");
    opts.optopt("c", "connections", "connections open at once", "N");
    opts.optopt("p", "in-flight", "commands outstanding per connection", "N");
    opts.optopt("d", "duration-ms", "length of the measured window", "MS");
    opts.optopt("", "warmup-ms", "load before the window opens", "MS");
    opts.optopt("", "mix", "iamat, whatsat or mixed:N", "KIND");
    opts.optflag("", "one-shot", "one command per connection");
    opts.optopt("", "clients", "distinct client ids", "N");
    opts.optopt("", "radius", "WHATSAT radius", "KM");
    opts.optopt("", "bound", "WHATSAT bound", "N");
    opts.optopt("", "rate", "commands per second in all", "N");
    opts.optopt("", "requests", "stop after this many commands", "N");
    opts.optopt("", "id-prefix", "what client ids start with", "TEXT");
    opts.optopt("", "sources", "loopback source addresses", "N");
    let m = opts
        .parse(args)
        .map_err(|e| format!("{e} (see herd load --help)"))?;
    if let Some(extra) = m.free.first() {
        return Err(format!(
            "unexpected argument {extra:?} (see herd load --help)"
        ));
    }
    let number = |name: &str, default: usize| -> Result<usize, String> {
        match m.opt_str(name) {
            None => Ok(default),
            Some(text) => text
                .parse()
                .map_err(|_| format!("--{name} {text:?}: not a whole number")),
        }
    };
    let positive = |name: &str, default: usize| -> Result<usize, String> {
        match number(name, default)? {
            0 => Err(format!("--{name} must be at least 1")),
            n => Ok(n),
        }
    };
    let addr = m
        .opt_str("addr")
        .ok_or("--addr HOST:PORT is required (see herd load --help)")?;
    let mix = match m.opt_str("mix") {
        None => Mix::Iamat,
        Some(text) => parse_mix(&text)?,
    };
    let in_flight = positive("in-flight", 1)?;
    let one_shot = m.opt_present("one-shot");
    if one_shot && in_flight > 1 {
        return Err(
            "--in-flight is for pipelined connections: --one-shot sends one command \
                    per connection (use -c for more at once)"
                .into(),
        );
    }
    // WHATSAT asks about known clients only, and each must be sent an IAMAT first.
    let default_clients = if mix == Mix::Iamat { 10_000 } else { 1_000 };
    let radius_km = m.opt_str("radius").unwrap_or_else(|| "10".into());
    if radius_km.is_empty() || radius_km.bytes().any(crate::protocol::is_space) {
        // A space would add a field and turn every WHATSAT into a `?`.
        return Err(format!("--radius {radius_km:?}: one field, no white space"));
    }
    let id_prefix = m
        .opt_str("id-prefix")
        .unwrap_or_else(|| CLIENT_PREFIX.into());
    if id_prefix.bytes().any(crate::protocol::is_space) {
        return Err(format!("--id-prefix {id_prefix:?}: no white space"));
    }
    let addr = resolve(&addr)?;
    let sources = positive("sources", 1)?;
    if sources > 1 {
        Sources::check(sources, addr)?;
    }
    Ok(LoadOptions {
        addr,
        connections: positive("connections", 50)?,
        in_flight,
        duration: Duration::from_millis(positive("duration-ms", 5000)? as u64),
        warmup: Duration::from_millis(number("warmup-ms", 500)? as u64),
        mix,
        one_shot,
        clients: positive("clients", default_clients)?,
        radius_km,
        bound: number("bound", 5)?,
        id_prefix,
        rate: match m.opt_str("rate") {
            None => None,
            Some(text) => match text.parse::<f64>() {
                Ok(rate) if rate > 0.0 && rate.is_finite() => Some(rate),
                _ => {
                    return Err(format!(
                        "--rate {text:?}: a number of commands per second above 0"
                    ))
                }
            },
        },
        requests: match m.opt_str("requests") {
            None => None,
            Some(_) => Some(positive("requests", 1)? as u64),
        },
        sources,
    })
}

fn parse_mix(text: &str) -> Result<Mix, String> {
    match text {
        "iamat" => Ok(Mix::Iamat),
        "whatsat" => Ok(Mix::Whatsat),
        _ => match text.strip_prefix("mixed:").map(str::parse::<u8>) {
            Some(Ok(whatsat_percent)) if whatsat_percent <= 100 => {
                Ok(Mix::Mixed { whatsat_percent })
            }
            _ => Err(format!(
                "--mix {text:?}: expected iamat, whatsat or mixed:N with N from 0 to 100"
            )),
        },
    }
}

/// Resolves `HOST:PORT`, preferring IPv4: `localhost` often resolves to `::1` first, and the
/// herd listens on `127.0.0.1` by default. Before the loop starts, so blocking is allowed.
fn resolve(text: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("--addr {text:?}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("--addr {text:?}: no address"))
}

// ---------------------------------------------------------------------------------------------
// Pure core: the commands
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Iamat,
    Whatsat,
}

impl Kind {
    fn verb(self) -> &'static str {
        match self {
            Kind::Iamat => "IAMAT",
            Kind::Whatsat => "WHATSAT",
        }
    }
}

/// A command sent and not yet answered: enough to check its reply and time it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pending {
    /// When the command was handed to the socket (or queued for it).
    sent_at: Instant,
    kind: Kind,
    /// The number of the client id: `load-<client>`.
    client: u64,
    /// An IAMAT's client time, in nanoseconds since the epoch.
    time_ns: u64,
}

/// What the current phase sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sending {
    /// One IAMAT per client id, each id once.
    Primers,
    /// The mix.
    Load,
    Nothing,
}

/// Makes the commands: which kind, about which client, with which client time.
struct Requests {
    mix: Mix,
    clients: u64,
    /// Client ids still to be sent their priming IAMAT.
    to_prime: Range<u64>,
    /// The run's start, by the monotonic clock and by the wall clock (nanoseconds since the
    /// epoch): client times are computed from the two, with no clock read per command.
    start: Instant,
    epoch_ns: u64,
    /// The client time of the last command made.
    last_time_ns: u64,
    /// Commands made so far; the load's client ids cycle with it.
    made: u64,
    /// Bresenham's accumulator for the mixed load: exactly N WHATSAT in every hundred.
    whatsat_credit: u32,
    /// `" RADIUS BOUND\n"`, the end of every WHATSAT.
    whatsat_tail: Vec<u8>,
    /// What every client id starts with.
    prefix: Vec<u8>,
    /// Load commands made (priming IAMATs not counted), and how many may be made at most.
    load_made: u64,
    limit: Option<u64>,
    /// Commands per second across all connections, when paced, counted from `load_start`.
    rate: Option<f64>,
    load_start: Option<Instant>,
}

impl Requests {
    fn new(opts: &LoadOptions, start: Instant, epoch_ns: u64) -> Requests {
        let primed = if opts.mix == Mix::Iamat {
            0
        } else {
            opts.clients as u64
        };
        Requests {
            mix: opts.mix,
            clients: opts.clients as u64,
            to_prime: 0..primed,
            start,
            epoch_ns,
            last_time_ns: 0,
            made: 0,
            whatsat_credit: 0,
            whatsat_tail: format!(" {} {}\n", opts.radius_km, opts.bound).into_bytes(),
            prefix: opts.id_prefix.clone().into_bytes(),
            load_made: 0,
            limit: opts.requests,
            rate: opts.rate,
            load_start: None,
        }
    }

    /// Every command `--requests` allows has been made.
    fn exhausted(&self) -> bool {
        self.limit.is_some_and(|limit| self.load_made >= limit)
    }

    /// When a paced load may send its next command, if pacing holds it back now.
    fn next_send_at(&self) -> Option<Instant> {
        let (rate, start) = (self.rate?, self.load_start?);
        Some(start + Duration::from_secs_f64(self.load_made as f64 / rate))
    }

    /// Whether the load may make another command at `now`: within `--requests`, and, when
    /// paced, no ahead of `--rate` (open loop: the schedule does not wait for replies).
    fn load_allowed(&mut self, now: Instant) -> bool {
        if self.exhausted() {
            return false;
        }
        match self.rate {
            None => true,
            Some(rate) => {
                let start = *self.load_start.get_or_insert(now);
                let due = now.saturating_duration_since(start).as_secs_f64() * rate;
                // Commands are due at start, start + 1/rate, ...: floor(due) + 1 of them by now.
                (self.load_made as f64) <= due
            }
        }
    }

    /// Every priming IAMAT has been made.
    fn primed(&self) -> bool {
        self.to_prime.is_empty()
    }

    /// Appends the next command to `line` and says what it asked; `None` when `sending` has
    /// nothing (more) to send.
    fn make(&mut self, sending: Sending, sent_at: Instant, line: &mut Vec<u8>) -> Option<Pending> {
        let (kind, client) = match sending {
            Sending::Primers => (Kind::Iamat, self.to_prime.next()?),
            Sending::Load if !self.load_allowed(sent_at) => return None,
            Sending::Load => {
                self.load_made += 1;
                (self.next_kind(), self.made % self.clients)
            }
            Sending::Nothing => return None,
        };
        // The wall clock at `sent_at`, but at least 1 ns past the previous command's time (a
        // turn's commands share one `sent_at`): client times strictly increase for every id,
        // and the server's time difference stays a true one.
        let wall_ns =
            self.epoch_ns + sent_at.saturating_duration_since(self.start).as_nanos() as u64;
        let time_ns = wall_ns.max(self.last_time_ns + 1);
        self.last_time_ns = time_ns;
        self.made += 1;
        match kind {
            Kind::Iamat => {
                line.extend_from_slice(b"IAMAT ");
                write_iamat_fields(line, &self.prefix, client, time_ns);
                line.push(b'\n');
            }
            Kind::Whatsat => {
                line.extend_from_slice(b"WHATSAT ");
                write_client_id(line, &self.prefix, client);
                line.extend_from_slice(&self.whatsat_tail);
            }
        }
        Some(Pending {
            sent_at,
            kind,
            client,
            time_ns,
        })
    }

    fn next_kind(&mut self) -> Kind {
        match self.mix {
            Mix::Iamat => Kind::Iamat,
            Mix::Whatsat => Kind::Whatsat,
            Mix::Mixed { whatsat_percent } => {
                self.whatsat_credit += u32::from(whatsat_percent);
                if self.whatsat_credit >= 100 {
                    self.whatsat_credit -= 100;
                    Kind::Whatsat
                } else {
                    Kind::Iamat
                }
            }
        }
    }
}

/// `load-<client> LOCATION TIME`: the three fields of an IAMAT, which its reply must copy.
fn write_iamat_fields(out: &mut Vec<u8>, prefix: &[u8], client: u64, time_ns: u64) {
    write_client_id(out, prefix, client);
    out.push(b' ');
    out.extend_from_slice(LOCATION);
    out.push(b' ');
    write_client_time(out, time_ns);
}

fn write_client_id(out: &mut Vec<u8>, prefix: &[u8], client: u64) {
    out.extend_from_slice(prefix);
    push_decimal(out, client);
}

/// POSIX seconds with nine decimals, `SECS.NNNNNNNNN`, as the spec's example client sends.
fn write_client_time(out: &mut Vec<u8>, ns: u64) {
    push_decimal(out, ns / 1_000_000_000);
    out.push(b'.');
    let mut fraction = ns % 1_000_000_000;
    let mut digits = [b'0'; 9];
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (fraction % 10) as u8;
        fraction /= 10;
    }
    out.extend_from_slice(&digits);
}

// ---------------------------------------------------------------------------------------------
// Pure core: checking replies
// ---------------------------------------------------------------------------------------------

/// What the reply at the head of a connection's input must be.
#[derive(Debug, Clone, Copy)]
enum Expect<'a> {
    /// One `AT` line ending with these client fields, byte for byte.
    Iamat(&'a [u8]),
    /// The `AT` record of this client id, a body, a blank line.
    Whatsat(&'a [u8]),
}

/// Writes into `buf` what the reply to `asked` must contain.
fn expect_for<'a>(asked: &Pending, prefix: &[u8], buf: &'a mut Vec<u8>) -> Expect<'a> {
    buf.clear();
    match asked.kind {
        Kind::Iamat => {
            write_iamat_fields(buf, prefix, asked.client, asked.time_ns);
            Expect::Iamat(buf)
        }
        Kind::Whatsat => {
            write_client_id(buf, prefix, asked.client);
            Expect::Whatsat(buf)
        }
    }
}

/// The verdict on one reply: fine, or what was wrong with it.
type Verdict = Result<(), &'static str>;

/// Cuts the first reply off `buf` and checks it. Returns its length and the verdict, or `None`
/// while the reply is incomplete.
///
/// Framing comes first, so that one bad reply does not spoil the ones behind it: a line that is
/// not an `AT` line is one reply; a WHATSAT's `AT` line is followed by a body up to the first
/// blank line (the server squeezes runs of newlines in the body, so `\n\n` only ends it).
fn parse_reply(buf: &[u8], expect: Expect<'_>) -> Option<(usize, Verdict)> {
    let line_end = find_byte(buf, b'\n')?;
    let line = &buf[..line_end];
    let one_line = line_end + 1;
    if line.first() == Some(&b'?') {
        return Some((one_line, Err("the server found the command invalid")));
    }
    match expect {
        Expect::Iamat(fields) => {
            let verdict = at_line_fields(line).and_then(|rest| {
                if rest == fields {
                    Ok(())
                } else {
                    Err("the AT line does not copy the IAMAT's fields")
                }
            });
            Some((one_line, verdict))
        }
        Expect::Whatsat(_) if !line.starts_with(b"AT ") => Some((one_line, Err("not an AT line"))),
        Expect::Whatsat(client) => {
            let blank = find_blank_line(buf, line_end)?;
            let verdict = if blank == line_end {
                Err("the WHATSAT reply has no body")
            } else {
                at_line_fields(line).and_then(|rest| match split_field(rest) {
                    Some((id, rest)) if id == client && is_location_and_time(rest) => Ok(()),
                    _ => Err("the AT line is not a record of the client asked about"),
                })
            };
            Some((blank + 2, verdict))
        }
    }
}

/// Checks `AT SERVER DIFF ` and returns what follows: the client fields.
fn at_line_fields(line: &[u8]) -> Result<&[u8], &'static str> {
    let rest = line.strip_prefix(b"AT ").ok_or("not an AT line")?;
    let (server, rest) = split_field(rest).ok_or("the AT line is too short")?;
    let (difference, rest) = split_field(rest).ok_or("the AT line is too short")?;
    if server.is_empty() {
        return Err("the AT line names no server");
    }
    if !is_time_difference(difference) {
        return Err("the AT line's time difference is not [+-]SECONDS.NNNNNNNNN");
    }
    Ok(rest)
}

/// `[+-]DIGITS.NNNNNNNNN`: exactly nine decimals.
fn is_time_difference(field: &[u8]) -> bool {
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    match field.split_first() {
        Some((b'+' | b'-', rest)) => match find_byte(rest, b'.') {
            Some(dot) => {
                digits(&rest[..dot]) && rest.len() - dot - 1 == 9 && digits(&rest[dot + 1..])
            }
            None => false,
        },
        _ => false,
    }
}

/// `LOCATION TIME`: two non-empty fields, one space between.
fn is_location_and_time(rest: &[u8]) -> bool {
    match split_field(rest) {
        Some((location, time)) => {
            !location.is_empty() && !time.is_empty() && find_byte(time, b' ').is_none()
        }
        None => false,
    }
}

/// Splits at the first space.
fn split_field(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = find_byte(s, b' ')?;
    Some((&s[..space], &s[space + 1..]))
}

/// Where the first `\n\n` at or after `from` starts.
fn find_blank_line(buf: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    loop {
        let newline = at + find_byte(&buf[at..], b'\n')?;
        match buf.get(newline + 1) {
            Some(b'\n') => return Some(newline),
            Some(_) => at = newline + 1,
            None => return None, // the next byte decides, and it has not arrived
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pure core: the latency histogram
// ---------------------------------------------------------------------------------------------

/// Latencies in nanoseconds, kept the way HdrHistogram keeps them: exact below 256 ns, then 128
/// buckets per power of two, so every value is known to within 1/128 (0.8%). Recording is an
/// increment; the whole thing is 30 KB however long the run.
struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max_ns: u64,
}

/// log2 of the buckets per power of two.
const SUB_BUCKET_BITS: u32 = 7;
/// Longer latencies are counted in the last bucket (the maximum stays exact).
const MAX_TRACKED_NS: u64 = 60_000_000_000;

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            counts: vec![0; bucket_of(MAX_TRACKED_NS) + 1],
            total: 0,
            max_ns: 0,
        }
    }

    fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(ns.min(MAX_TRACKED_NS))] += 1;
        self.total += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    /// The latency that `quantile` (0 to 1) of the values are at or below, in nanoseconds: the
    /// middle of its bucket, never above the maximum seen; the top rank is the maximum itself.
    /// 0 when nothing was recorded.
    fn quantile_ns(&self, quantile: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((quantile * self.total as f64).ceil() as u64).clamp(1, self.total);
        if rank == self.total {
            return self.max_ns;
        }
        let mut seen = 0;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, width) = bucket_range(index);
                return (low + width / 2).min(self.max_ns);
            }
        }
        self.max_ns
    }
}

/// The bucket of `ns`. Below `2 << SUB_BUCKET_BITS` a bucket holds one value; above, the top
/// `SUB_BUCKET_BITS + 1` bits of the value pick the bucket within its power of two.
fn bucket_of(ns: u64) -> usize {
    let top_bit = 63 - ns.max(1).leading_zeros();
    if top_bit < SUB_BUCKET_BITS {
        return ns as usize;
    }
    let shift = top_bit - SUB_BUCKET_BITS;
    let power = shift + 1;
    ((power as usize) << SUB_BUCKET_BITS) + ((ns >> shift) as usize - (1 << SUB_BUCKET_BITS))
}

/// The lowest value of bucket `index` and how many values it holds.
fn bucket_range(index: usize) -> (u64, u64) {
    let power = (index >> SUB_BUCKET_BITS) as u32;
    let sub = (index & ((1 << SUB_BUCKET_BITS) - 1)) as u64;
    if power == 0 {
        return (index as u64, 1);
    }
    let shift = power - 1;
    (((1 << SUB_BUCKET_BITS) + sub) << shift, 1 << shift)
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

/// The figures of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    /// Valid replies completed in the measured window.
    pub requests: u64,
    /// Commands without a valid reply, warm-up and drain included: errors are never hidden.
    pub errors: u64,
    /// Length of the measured window.
    pub seconds: f64,
    pub per_second: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// The generator's own user and system CPU time over the window.
    pub cpu_seconds: f64,
    pub cpu_percent: f64,
    /// The generator used 90% or more of its one core: the rate is its limit, not the server's.
    pub client_bound: bool,
    pub first_error: Option<String>,
}

impl LoadReport {
    /// One line of JSON, the figures rounded to what they can claim.
    pub fn to_json(&self) -> String {
        let round = |x: f64, places: i32| {
            let scale = 10f64.powi(places);
            (x * scale).round() / scale
        };
        serde_json::json!({
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "per_second": round(self.per_second, 1),
            "p50_us": round(self.p50_us, 1),
            "p90_us": round(self.p90_us, 1),
            "p99_us": round(self.p99_us, 1),
            "p999_us": round(self.p999_us, 1),
            "max_us": round(self.max_us, 1),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "cpu_percent": round(self.cpu_percent, 1),
            "client_bound": self.client_bound,
            "first_error": self.first_error,
        })
        .to_string()
    }
}

/// What the run has counted so far.
struct Tally {
    /// Latencies of the valid replies completed in the measured window.
    latency: Histogram,
    /// Valid replies completed in the measured window.
    requests: u64,
    /// Replies parsed, valid or not, in any phase: priming watches it to see the server answer.
    answered: u64,
    errors: u64,
    first_error: Option<String>,
    /// Commands sent and not yet answered, over all connections.
    outstanding: usize,
}

impl Tally {
    /// Counts `count` errors; `why` is only called for the first.
    fn error(&mut self, count: usize, why: impl FnOnce() -> String) {
        self.errors += count as u64;
        if self.first_error.is_none() {
            self.first_error = Some(why());
        }
    }

    fn report(&self, window: Measured) -> LoadReport {
        let us = |quantile: f64| self.latency.quantile_ns(quantile) as f64 / 1000.0;
        let per_second = |x: f64| match window.seconds > 0.0 {
            true => x / window.seconds,
            false => 0.0,
        };
        let cpu_percent = per_second(window.cpu_seconds) * 100.0;
        LoadReport {
            requests: self.requests,
            errors: self.errors,
            seconds: window.seconds,
            per_second: per_second(self.requests as f64),
            p50_us: us(0.5),
            p90_us: us(0.9),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: self.latency.max_ns as f64 / 1000.0,
            cpu_seconds: window.cpu_seconds,
            cpu_percent,
            client_bound: cpu_percent >= CLIENT_BOUND_PERCENT,
            first_error: self.first_error.clone(),
        }
    }
}

/// The measured window, once closed.
#[derive(Debug, Clone, Copy)]
struct Measured {
    seconds: f64,
    cpu_seconds: f64,
}

impl Measured {
    fn close(from: Instant, cpu_from: Duration, now: Instant) -> Measured {
        Measured {
            seconds: now.saturating_duration_since(from).as_secs_f64(),
            cpu_seconds: cpu_time().saturating_sub(cpu_from).as_secs_f64(),
        }
    }
}

/// The generator's user and system CPU time so far: its thread's where the system counts
/// threads apart (Linux), so that a generator run inside a larger program counts its own.
fn cpu_time() -> Duration {
    #[cfg(target_os = "linux")]
    const WHO: libc::c_int = libc::RUSAGE_THREAD;
    #[cfg(not(target_os = "linux"))]
    const WHO: libc::c_int = libc::RUSAGE_SELF;
    // SAFETY: getrusage only writes the struct passed in, which is plain integers.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(WHO, &mut usage) != 0 {
            return Duration::ZERO;
        }
        usage
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

// ---------------------------------------------------------------------------------------------
// The timeline
// ---------------------------------------------------------------------------------------------

/// Where the run is. Every transition is in [`Generator::next_phase`].
#[derive(Debug, Clone)]
enum Phase {
    /// Before a load with WHATSAT: one IAMAT per client id, all answered, so that every WHATSAT
    /// asks about a client the server knows. Gives up after `PRIMING_STALL` without a reply.
    Priming { answered: u64, stalled_at: Instant },
    /// The load runs; replies are checked but not counted until `measure_from`.
    WarmingUp { measure_from: Instant },
    /// Replies are counted. `from` and `cpu_from` were read in the turn that opened the window.
    Measuring {
        from: Instant,
        cpu_from: Duration,
        until: Instant,
    },
    /// No new commands; the replies still due have until `deadline`.
    Draining { deadline: Instant, window: Measured },
    /// Finished: the window's figures, or why there are none.
    Done(Result<Measured, String>),
}

impl Phase {
    /// When the loop must wake up even if no socket does.
    fn deadline(&self) -> Option<Instant> {
        match self {
            Phase::Priming { stalled_at, .. } => Some(*stalled_at),
            Phase::WarmingUp { measure_from } => Some(*measure_from),
            Phase::Measuring { until, .. } => Some(*until),
            Phase::Draining { deadline, .. } => Some(*deadline),
            Phase::Done(_) => None,
        }
    }

    fn sending(&self) -> Sending {
        match self {
            Phase::Priming { .. } => Sending::Primers,
            Phase::WarmingUp { .. } | Phase::Measuring { .. } => Sending::Load,
            Phase::Draining { .. } | Phase::Done(_) => Sending::Nothing,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The shell: one connection
// ---------------------------------------------------------------------------------------------

/// Where one connection is in its life. The socket lives in the states that have one.
enum ConnState {
    /// No socket: a one-shot slot between two commands, or a pipelined connection that failed
    /// (those are not redialled: the load keeps running on the others).
    Idle,
    /// A non-blocking connect is under way: a WRITABLE event, no socket error and a peer
    /// address finish it (mio's `TcpStream::connect` docs).
    Connecting(TcpStream),
    /// Connected: commands go out, replies come in.
    Open(TcpStream),
    /// One-shot: the command is written and the write side shut; reading to the end of stream.
    HalfClosed(TcpStream),
    /// Finished with, or failed. The end of the turn deregisters and drops the socket, so that
    /// no later event of the same batch finds its token reused.
    Closed(TcpStream),
}

struct Conn {
    state: ConnState,
    out: OutBuf,
    /// Bytes read and not yet parsed as whole replies.
    input: Vec<u8>,
    /// Commands sent and not yet answered, oldest first: replies come in this order.
    pending: VecDeque<Pending>,
    /// Already listed for the end-of-turn pass.
    dirty: bool,
}

impl Conn {
    fn new(in_flight: usize) -> Conn {
        Conn {
            state: ConnState::Idle,
            out: OutBuf::default(),
            input: Vec::new(),
            pending: VecDeque::with_capacity(in_flight),
            dirty: false,
        }
    }

    /// A WRITABLE (or error) event while connecting: finished, failed, or spurious.
    fn on_connect_event(&mut self, tally: &mut Tally) {
        let ConnState::Connecting(stream) = &self.state else {
            return;
        };
        let outcome = match stream.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match stream.peer_addr() {
                Ok(_) => Ok(true),
                // Spurious wake-up: still connecting.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
                Err(e) => Err(e),
            },
        };
        match outcome {
            Ok(true) => self.become_with_stream(ConnState::Open),
            Ok(false) => {}
            Err(e) => self.fail(tally, || format!("cannot connect: {e}")),
        }
    }

    /// Reads until the socket is empty, parsing replies as they come. Edge-triggered: the
    /// kernel will not tell us again about bytes we leave unread.
    ///
    /// A read that fills less than `scratch` has emptied the socket, and bytes arriving later
    /// raise a new edge: so the loop stops there, without the read that would only say
    /// `WouldBlock` (a third of the system calls of a pipelined exchange). The exception is
    /// `closed`, the kernel having said the server's end of stream is already here: no new
    /// edge will come for it, so that read must be made now.
    #[allow(clippy::too_many_arguments)]
    fn on_readable(
        &mut self,
        now: Instant,
        counted: bool,
        closed: bool,
        tally: &mut Tally,
        scratch: &mut [u8],
        expect: &mut Vec<u8>,
        prefix: &[u8],
    ) {
        loop {
            let (ConnState::Open(stream) | ConnState::HalfClosed(stream)) = &mut self.state else {
                return;
            };
            match stream.read(scratch) {
                Ok(0) => return self.on_end_of_stream(tally),
                Ok(n) => {
                    self.input.extend_from_slice(&scratch[..n]);
                    self.take_replies(now, counted, tally, expect, prefix);
                    if n < scratch.len() && !closed {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(tally, || format!("read failed: {e}")),
            }
        }
    }

    /// Matches whole replies against the commands waiting for them, first in, first out.
    fn take_replies(
        &mut self,
        now: Instant,
        counted: bool,
        tally: &mut Tally,
        expect: &mut Vec<u8>,
        prefix: &[u8],
    ) {
        let mut at = 0;
        while at < self.input.len() {
            let rest = &self.input[at..];
            let Some(asked) = self.pending.front().copied() else {
                tally.error(1, || {
                    format!("bytes with no command waiting for them: {}", quote(rest))
                });
                at = self.input.len();
                break;
            };
            let Some((len, verdict)) = parse_reply(rest, expect_for(&asked, prefix, expect)) else {
                break; // incomplete: the rest is on its way
            };
            self.pending.pop_front();
            tally.outstanding -= 1;
            tally.answered += 1;
            match verdict {
                Ok(()) if counted => {
                    tally.requests += 1;
                    tally
                        .latency
                        .record(now.saturating_duration_since(asked.sent_at));
                }
                Ok(()) => {}
                Err(why) => tally.error(1, || {
                    let mut client = Vec::new();
                    write_client_id(&mut client, prefix, asked.client);
                    format!(
                        "{why}: {} {} answered {}",
                        asked.kind.verb(),
                        String::from_utf8_lossy(&client),
                        quote(&rest[..len])
                    )
                }),
            }
            at += len;
        }
        self.input.drain(..at);
    }

    fn on_end_of_stream(&mut self, tally: &mut Tally) {
        match self.state {
            // The one-shot exchange is complete: the server answered, then closed.
            ConnState::HalfClosed(_) if self.pending.is_empty() => {
                self.become_with_stream(ConnState::Closed)
            }
            _ => {
                let due = self.pending.len();
                self.fail(tally, || {
                    format!("the server closed the connection with {due} replies due")
                })
            }
        }
    }

    /// Adds commands until `in_flight` are outstanding (pipelined connections only).
    fn top_up(
        &mut self,
        in_flight: usize,
        sending: Sending,
        now: Instant,
        requests: &mut Requests,
        tally: &mut Tally,
        line: &mut Vec<u8>,
    ) {
        while self.pending.len() < in_flight {
            line.clear();
            let Some(asked) = requests.make(sending, now, line) else {
                return;
            };
            self.out.push(line);
            self.pending.push_back(asked);
            tally.outstanding += 1;
        }
    }

    /// Writes what is pending, until done or the socket would block (WRITABLE will say when
    /// there is room again). A one-shot connection then shuts its write side, as the course's
    /// clients do: the server answers, then closes.
    ///
    /// A one-shot connection writes while still `Connecting`: over loopback the handshake is
    /// usually over by the time `connect()` returns, and a write that goes through proves the
    /// connection as well as the WRITABLE event and the two checks of `on_connect_event` would,
    /// for a third of the system calls. Not connected yet, the write says `WouldBlock` (Linux)
    /// or `NotConnected`, and WRITABLE comes when it is; a failed connect fails the write.
    fn flush(&mut self, one_shot: bool, tally: &mut Tally) {
        let connecting = matches!(self.state, ConnState::Connecting(_));
        let (ConnState::Open(stream) | ConnState::Connecting(stream)) = &mut self.state else {
            return;
        };
        if connecting && !one_shot {
            return; // a pipelined connect is finished by `on_connect_event`
        }
        let before = self.out.pending();
        match self.out.write_to(stream) {
            Ok(()) if connecting && self.out.pending() == before => {}
            Err(e) if connecting && e.kind() == io::ErrorKind::NotConnected => {}
            Ok(()) if self.out.pending() == 0 && one_shot => {
                match stream.shutdown(Shutdown::Write) {
                    Ok(()) => self.become_with_stream(ConnState::HalfClosed),
                    Err(e) => self.fail(tally, || format!("shutdown failed: {e}")),
                }
            }
            Ok(()) if connecting => self.become_with_stream(ConnState::Open),
            Ok(()) => {}
            Err(e) if connecting => self.fail(tally, || format!("cannot connect: {e}")),
            Err(e) => self.fail(tally, || format!("write failed: {e}")),
        }
    }

    /// Every command still outstanding on this connection fails (at least one error is counted:
    /// a connection lost is one); the socket closes at the end of the turn.
    fn fail(&mut self, tally: &mut Tally, why: impl FnOnce() -> String) {
        tally.error(self.pending.len().max(1), why);
        tally.outstanding -= self.pending.len();
        self.pending.clear();
        self.input.clear();
        self.out = OutBuf::default();
        self.become_with_stream(ConnState::Closed);
    }

    /// Moves the socket into the state `next` (no-op when there is no socket).
    fn become_with_stream(&mut self, next: fn(TcpStream) -> ConnState) {
        self.state = match std::mem::replace(&mut self.state, ConnState::Idle) {
            ConnState::Connecting(s)
            | ConnState::Open(s)
            | ConnState::HalfClosed(s)
            | ConnState::Closed(s) => next(s),
            ConnState::Idle => ConnState::Idle,
        };
    }
}

/// The source addresses connections take in turn (`--sources`).
///
/// A client that closes first keeps each connection's port in TIME_WAIT for a minute, and one
/// source address has about 28,000 ephemeral ports: a one-shot run soon has every `connect()`
/// searching the port range for one the kernel may recycle, and the generator's core, not the
/// server, sets the rate. The whole of 127.0.0.0/8 is loopback on Linux, and each address has
/// its own ports.
struct Sources {
    addrs: Vec<Ipv4Addr>,
    next: usize,
}

impl Sources {
    /// The most `--sources` may ask for: 127.0.0.2 to 127.0.0.254.
    const MAX: usize = 253;

    fn new(count: usize) -> Sources {
        let addrs = match count {
            0 | 1 => Vec::new(),
            n => (0..n.min(Sources::MAX))
                .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8))
                .collect(),
        };
        Sources { addrs, next: 0 }
    }

    /// Whether `count` sources can be used to reach `addr`.
    fn check(count: usize, addr: SocketAddr) -> Result<(), String> {
        if !cfg!(target_os = "linux") {
            return Err(
                "--sources: binding to a loopback address per connection needs Linux".into(),
            );
        }
        if count > Sources::MAX {
            return Err(format!("--sources {count}: at most {}", Sources::MAX));
        }
        match addr {
            SocketAddr::V4(v4) if v4.ip().is_loopback() => Ok(()),
            _ => Err(format!(
                "--sources: the server must be at an IPv4 loopback address, not {addr}"
            )),
        }
    }

    /// The address for the next connection; `None`: the kernel's choice.
    fn next(&mut self) -> Option<Ipv4Addr> {
        let addr = *self.addrs.get(self.next)?;
        self.next = (self.next + 1) % self.addrs.len();
        Some(addr)
    }
}

/// A non-blocking connect from `source` (any port) to `addr`. The port is chosen at `connect()`
/// (`IP_BIND_ADDRESS_NO_PORT`), so that it need only be unique for this source and
/// destination, not for every destination as `bind()` alone would have it.
#[cfg(target_os = "linux")]
fn connect_from(source: Ipv4Addr, addr: SocketAddrV4) -> io::Result<TcpStream> {
    use std::mem::size_of;
    use std::os::fd::{FromRawFd, OwnedFd};

    fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
        match rc {
            -1 => Err(io::Error::last_os_error()),
            rc => Ok(rc),
        }
    }
    fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        }
    }
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: plain system calls on a descriptor this function owns from the moment it exists
    // (`OwnedFd` closes it on every early return), with pointers to live locals and their sizes.
    unsafe {
        let fd = check(libc::socket(libc::AF_INET, flags, 0))?;
        let socket = OwnedFd::from_raw_fd(fd);
        let on: libc::c_int = 1;
        check(libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ))?;
        let from = sockaddr(SocketAddrV4::new(source, 0));
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        check(libc::bind(
            fd,
            (&from as *const libc::sockaddr_in).cast(),
            len,
        ))?;
        let to = sockaddr(addr);
        match check(libc::connect(
            fd,
            (&to as *const libc::sockaddr_in).cast(),
            len,
        )) {
            Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => return Err(e),
            _ => {}
        }
        Ok(TcpStream::from_std(std::net::TcpStream::from(socket)))
    }
}

#[cfg(not(target_os = "linux"))]
fn connect_from(_source: Ipv4Addr, addr: SocketAddrV4) -> io::Result<TcpStream> {
    TcpStream::connect(SocketAddr::V4(addr)) // `Sources::check` refused `--sources` already
}

/// Starts a non-blocking connect, from `source` when given, registered once for both readiness
/// kinds (as the server's sockets are: edge-triggered WRITABLE interest costs nothing while
/// output flows).
fn dial(
    registry: &Registry,
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
    slot: usize,
    pipelined: bool,
) -> io::Result<TcpStream> {
    let mut stream = match (source, addr) {
        (Some(source), SocketAddr::V4(addr)) => connect_from(source, addr)?,
        _ => TcpStream::connect(addr)?,
    };
    // Pipelined commands are small and follow each other: Nagle's algorithm would hold one
    // back until the previous one is acknowledged. A one-shot command is one write.
    if pipelined {
        stream.set_nodelay(true)?;
    }
    registry.register(
        &mut stream,
        Token(slot),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    Ok(stream)
}

/// The first bytes of a reply, escaped, for an error message.
fn quote(bytes: &[u8]) -> String {
    let mut out = Vec::new();
    escape_into(&mut out, &bytes[..bytes.len().min(ERROR_QUOTE_BYTES)]);
    if bytes.len() > ERROR_QUOTE_BYTES {
        out.extend_from_slice(b"...");
    }
    format!("\"{}\"", String::from_utf8_lossy(&out))
}

// ---------------------------------------------------------------------------------------------
// The shell: the loop
// ---------------------------------------------------------------------------------------------

/// Generates load as `opts` says, then reports. Blocks for the warm-up, the window and at most
/// `DRAIN_TIMEOUT` more (plus priming, for a load with WHATSAT).
pub fn run(opts: &LoadOptions) -> Result<LoadReport, String> {
    Generator::new(opts)?.run()
}

/// The generator: the poll, every connection, and the run's timeline. A token is a
/// connection's slot in `conns`, and nothing else.
struct Generator<'a> {
    opts: &'a LoadOptions,
    poll: Poll,
    conns: Vec<Conn>,
    /// Connections listed for the end-of-turn pass: to top up, write, close or redial.
    dirty: Vec<usize>,
    /// Connections with a socket that is not yet closed.
    live: usize,
    requests: Requests,
    tally: Tally,
    phase: Phase,
    /// The read buffer every connection shares.
    scratch: Vec<u8>,
    /// A command being made, or the fields a reply must copy; reused, never freed.
    line: Vec<u8>,
    sources: Sources,
}

impl<'a> Generator<'a> {
    fn new(opts: &'a LoadOptions) -> Result<Generator<'a>, String> {
        let poll = Poll::new().map_err(|e| format!("cannot create the poll: {e}"))?;
        let epoch_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let now = Instant::now();
        let mut generator = Generator {
            opts,
            poll,
            conns: (0..opts.connections)
                .map(|_| Conn::new(opts.in_flight))
                .collect(),
            dirty: Vec::new(),
            live: 0,
            requests: Requests::new(opts, now, epoch_ns),
            tally: Tally {
                latency: Histogram::new(),
                requests: 0,
                answered: 0,
                errors: 0,
                first_error: None,
                outstanding: 0,
            },
            phase: Phase::Priming {
                answered: 0,
                stalled_at: now + PRIMING_STALL,
            },
            scratch: vec![0; READ_CHUNK],
            line: Vec::new(),
            sources: Sources::new(opts.sources),
        };
        // Pipelined connections are dialled once, here; one-shot ones when they have a command.
        if !opts.one_shot {
            for slot in 0..opts.connections {
                let source = generator.sources.next();
                match dial(generator.poll.registry(), opts.addr, source, slot, true) {
                    Ok(stream) => {
                        generator.conns[slot].state = ConnState::Connecting(stream);
                        generator.live += 1;
                    }
                    Err(e) => generator
                        .tally
                        .error(1, || format!("cannot connect to {}: {e}", opts.addr)),
                }
            }
        }
        generator.mark_all_dirty();
        generator.advance(now);
        Ok(generator)
    }

    /// Turns the loop until the run is done: poll until an event or the phase's deadline;
    /// dispatch each event; at the end of the turn top up, write, close and redial; then move
    /// the timeline on.
    ///
    /// The clock is read twice a turn: when `poll` returns (the replies read in this turn
    /// completed then) and before the writes (the commands written in this turn start then, and
    /// deadlines are judged by it).
    fn run(mut self) -> Result<LoadReport, String> {
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
        loop {
            if let Phase::Done(result) = &self.phase {
                let result = result.clone();
                return result.map(|window| self.tally.report(window));
            }
            // A paced load wakes for its next command even if no socket does, if a connection
            // has room for it. When none has (the server is behind the schedule), a reply makes
            // the room: waking for the clock then would only spin.
            let paced = match self.phase.sending() {
                Sending::Load if !self.requests.exhausted() => self
                    .requests
                    .next_send_at()
                    .filter(|_| self.room_for_a_command()),
                _ => None,
            };
            // A connection left dirty (a redial that failed) is retried at once.
            let timeout = match self.dirty.is_empty() {
                true => self
                    .phase
                    .deadline()
                    .into_iter()
                    .chain(paced)
                    .min()
                    .map(|at| at.saturating_duration_since(Instant::now())),
                false => Some(Duration::ZERO),
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(format!("poll failed: {e}"));
                }
            }
            let now = Instant::now();
            for event in events.iter() {
                self.dispatch(event, now);
            }
            let now = Instant::now();
            if paced.is_some_and(|at| at <= now) {
                self.mark_all_dirty(); // the schedule lets commands out: any connection may send
            }
            self.end_turn(now);
            self.advance(now);
        }
    }

    fn dispatch(&mut self, event: &Event, now: Instant) {
        let slot = event.token().0;
        let counted = matches!(self.phase, Phase::Measuring { .. });
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        match conn.state {
            // The write at the end of the turn finishes a one-shot connect, or says it failed.
            ConnState::Connecting(_) if self.opts.one_shot => {}
            ConnState::Connecting(_) => conn.on_connect_event(&mut self.tally),
            ConnState::Open(_) | ConnState::HalfClosed(_) => {
                let closed = event.is_read_closed() || event.is_error();
                if event.is_readable() || closed {
                    conn.on_readable(
                        now,
                        counted,
                        closed,
                        &mut self.tally,
                        &mut self.scratch,
                        &mut self.line,
                        &self.requests.prefix,
                    );
                }
            }
            // A late event for a socket already done with.
            ConnState::Idle | ConnState::Closed(_) => return,
        }
        // Replies made room for commands, or the socket for output: the end of the turn writes.
        self.mark_dirty(slot);
    }

    /// End of the turn, for each connection that had something happen: top up and write (so a
    /// whole turn's commands go out in one write), drop a closed socket, give a one-shot slot
    /// its next command.
    fn end_turn(&mut self, now: Instant) {
        let sending = self.phase.sending();
        let one_shot = self.opts.one_shot;
        for slot in std::mem::take(&mut self.dirty) {
            let conn = &mut self.conns[slot];
            conn.dirty = false;
            if let ConnState::Open(_) = conn.state {
                if !one_shot {
                    conn.top_up(
                        self.opts.in_flight,
                        sending,
                        now,
                        &mut self.requests,
                        &mut self.tally,
                        &mut self.line,
                    );
                }
            }
            conn.flush(one_shot, &mut self.tally);
            if let ConnState::Closed(_) = conn.state {
                // Closing the descriptor takes it out of epoll: no `deregister` call needed.
                conn.state = ConnState::Idle;
                self.live -= 1;
            }
            if one_shot && matches!(conn.state, ConnState::Idle) {
                self.redial(slot, sending, now);
            }
        }
    }

    /// A one-shot slot's next command: made first (there may be none left), then the connect.
    /// The command is queued at once, so its latency includes the connect.
    fn redial(&mut self, slot: usize, sending: Sending, now: Instant) {
        self.line.clear();
        let Some(asked) = self.requests.make(sending, now, &mut self.line) else {
            return;
        };
        let source = self.sources.next();
        match dial(self.poll.registry(), self.opts.addr, source, slot, false) {
            Ok(stream) => {
                let conn = &mut self.conns[slot];
                conn.state = ConnState::Connecting(stream);
                conn.out.push(&self.line);
                conn.pending.push_back(asked);
                self.tally.outstanding += 1;
                self.live += 1;
                conn.flush(true, &mut self.tally);
                if !matches!(
                    conn.state,
                    ConnState::Connecting(_) | ConnState::HalfClosed(_)
                ) {
                    // Failed at once, or written in part: the next turn closes it or writes on.
                    self.mark_dirty(slot);
                }
            }
            Err(e) => {
                let addr = self.opts.addr;
                self.tally
                    .error(1, || format!("cannot connect to {addr}: {e}"));
                self.mark_dirty(slot); // try again next turn, not in a loop here
            }
        }
    }

    /// Moves the timeline on as far as `now` allows.
    fn advance(&mut self, now: Instant) {
        while let Some(next) = self.next_phase(now) {
            let starts_load = matches!(next, Phase::WarmingUp { .. });
            self.phase = next;
            if starts_load {
                self.mark_all_dirty(); // every connection may send, or dial, now
            }
        }
    }

    /// The timeline's transitions, all of them.
    fn next_phase(&mut self, now: Instant) -> Option<Phase> {
        let opts = self.opts;
        let all_answered = self.all_answered();
        let tally = &mut self.tally;
        // Pipelined connections are not redialled: with none left, nothing more can happen.
        let stranded = !opts.one_shot && self.live == 0;
        let no_figures = |tally: &Tally, what: &str| {
            let first = tally.first_error.as_deref().unwrap_or("no error seen");
            Phase::Done(Err(format!("{what} (first error: {first})")))
        };
        match &self.phase {
            // Every connection failed before the window opened.
            Phase::Priming { .. } | Phase::WarmingUp { .. } if stranded => Some(no_figures(
                tally,
                &format!("no connection to {} is left", opts.addr),
            )),
            // Every connection failed in the window: report what it saw.
            Phase::Measuring { from, cpu_from, .. } if stranded => {
                Some(Phase::Done(Ok(Measured::close(*from, *cpu_from, now))))
            }
            // Every client id is known: the load starts, and the warm-up with it.
            Phase::Priming { .. } if self.requests.primed() && tally.outstanding == 0 => {
                Some(Phase::WarmingUp {
                    measure_from: now + opts.warmup,
                })
            }
            // Priming replies still come: push the stall deadline back.
            Phase::Priming { answered, .. } if *answered != tally.answered => {
                Some(Phase::Priming {
                    answered: tally.answered,
                    stalled_at: now + PRIMING_STALL,
                })
            }
            Phase::Priming { stalled_at, .. } if now >= *stalled_at => Some(no_figures(
                tally,
                &format!(
                    "priming stalled: no reply for {} s with {} IAMATs unanswered",
                    PRIMING_STALL.as_secs(),
                    tally.outstanding
                ),
            )),
            // The warm-up is over (or --requests were all made and answered): the window opens.
            Phase::WarmingUp { measure_from } if now >= *measure_from || all_answered => {
                Some(Phase::Measuring {
                    from: now,
                    cpu_from: cpu_time(),
                    until: now + opts.duration,
                })
            }
            // The window closes; no new commands.
            Phase::Measuring {
                from,
                cpu_from,
                until,
            } if now >= *until || all_answered => Some(Phase::Draining {
                deadline: now + DRAIN_TIMEOUT,
                window: Measured::close(*from, *cpu_from, now),
            }),
            // Every reply is in.
            Phase::Draining { window, .. } if tally.outstanding == 0 => {
                Some(Phase::Done(Ok(*window)))
            }
            // Replies still missing after the grace period: each is an error.
            Phase::Draining { deadline, window } if now >= *deadline => {
                let missing = tally.outstanding;
                tally.error(missing, || {
                    format!(
                        "{missing} replies still missing {} s after the window closed",
                        DRAIN_TIMEOUT.as_secs()
                    )
                });
                Some(Phase::Done(Ok(*window)))
            }
            _ => None,
        }
    }

    /// Every command `--requests` allows was made and answered.
    fn all_answered(&self) -> bool {
        self.requests.exhausted() && self.tally.outstanding == 0
    }

    fn mark_dirty(&mut self, slot: usize) {
        let conn = &mut self.conns[slot];
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(slot);
        }
    }

    /// Whether a command could go out now: a pipelined connection below its in-flight limit,
    /// or a free one-shot slot.
    fn room_for_a_command(&self) -> bool {
        let (one_shot, in_flight) = (self.opts.one_shot, self.opts.in_flight);
        self.conns.iter().any(|conn| match conn.state {
            ConnState::Open(_) => !one_shot && conn.pending.len() < in_flight,
            ConnState::Idle => one_shot,
            _ => false,
        })
    }

    fn mark_all_dirty(&mut self) {
        for slot in 0..self.conns.len() {
            self.mark_dirty(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn client_times_have_nine_decimals() {
        let mut out = Vec::new();
        write_client_time(&mut out, 1_621_464_827_959_498_503);
        assert_eq!(out, b"1621464827.959498503");
        out.clear();
        write_client_time(&mut out, 5);
        assert_eq!(out, b"0.000000005");
        out.clear();
        push_decimal(&mut out, u64::MAX);
        assert_eq!(out, u64::MAX.to_string().as_bytes());
    }

    #[test]
    fn a_paced_load_keeps_its_schedule_and_its_limit() {
        let opts = parse_args(&args(
            "--addr 127.0.0.1:1 --rate 1000 --requests 5 --id-prefix p-",
        ))
        .unwrap();
        let now = Instant::now();
        let mut requests = Requests::new(&opts, now, 1_000_000_000);
        let mut line = Vec::new();
        // At the start one command is due; the next 1 ms later (1000 a second).
        assert!(requests.make(Sending::Load, now, &mut line).is_some());
        assert!(line.starts_with(b"IAMAT p-0 "));
        assert_eq!(requests.make(Sending::Load, now, &mut line), None);
        assert_eq!(
            requests.next_send_at(),
            Some(now + Duration::from_millis(1))
        );
        // By 2.5 ms, the ones due at 1 ms and 2 ms: two more, not three.
        let later = now + Duration::from_micros(2500);
        assert!(requests.make(Sending::Load, later, &mut line).is_some());
        assert!(requests.make(Sending::Load, later, &mut line).is_some());
        assert_eq!(requests.make(Sending::Load, later, &mut line), None);
        // Long after, only the five --requests allows were ever made.
        let much_later = now + Duration::from_secs(1);
        assert!(requests
            .make(Sending::Load, much_later, &mut line)
            .is_some());
        assert!(requests
            .make(Sending::Load, much_later, &mut line)
            .is_some());
        assert!(requests.exhausted());
        assert_eq!(requests.make(Sending::Load, much_later, &mut line), None);
    }

    #[test]
    fn commands_are_made_as_the_protocol_says() {
        let opts = LoadOptions {
            mix: Mix::Mixed {
                whatsat_percent: 50,
            },
            clients: 3,
            ..parse_args(&args("--addr 127.0.0.1:1")).unwrap()
        };
        let now = Instant::now();
        let mut requests = Requests::new(&opts, now, 1_700_000_000_000_000_000);
        let mut line = Vec::new();
        // Priming: one IAMAT per id, then nothing more to prime.
        for id in 0..3 {
            line.clear();
            let asked = requests.make(Sending::Primers, now, &mut line).unwrap();
            assert_eq!((asked.kind, asked.client), (Kind::Iamat, id));
        }
        assert_eq!(
            line,
            b"IAMAT load-2 +34.068930-118.445127 1700000000.000000002\n"
        );
        assert!(requests.primed());
        assert_eq!(requests.make(Sending::Primers, now, &mut line), None);
        line.clear();
        let asked = requests.make(Sending::Load, now, &mut line).unwrap();
        assert_eq!(asked.kind, Kind::Iamat);
        assert_eq!(
            line,
            b"IAMAT load-0 +34.068930-118.445127 1700000000.000000003\n"
        );
        line.clear();
        requests.make(Sending::Load, now, &mut line).unwrap();
        assert_eq!(line, b"WHATSAT load-1 10 5\n");
        // Later commands carry the wall clock of their time.
        line.clear();
        let later = now + Duration::from_millis(1500);
        let asked = requests.make(Sending::Load, later, &mut line).unwrap();
        assert_eq!(asked.time_ns, 1_700_000_001_500_000_000);
        assert_eq!(
            line,
            b"IAMAT load-2 +34.068930-118.445127 1700000001.500000000\n"
        );
        assert_eq!(requests.make(Sending::Nothing, now, &mut line), None);
    }

    #[test]
    fn the_mix_is_exact_and_evenly_spread() {
        let opts = LoadOptions {
            mix: Mix::Mixed {
                whatsat_percent: 25,
            },
            ..parse_args(&args("--addr 127.0.0.1:1")).unwrap()
        };
        let mut requests = Requests::new(&opts, Instant::now(), 0);
        let kinds: Vec<Kind> = (0..100).map(|_| requests.next_kind()).collect();
        assert_eq!(kinds.iter().filter(|&&k| k == Kind::Whatsat).count(), 25);
        assert_eq!(
            &kinds[..4],
            [Kind::Iamat, Kind::Iamat, Kind::Iamat, Kind::Whatsat]
        );
    }

    const IAMAT_FIELDS: &[u8] = b"load-7 +34.068930-118.445127 1621464827.959498503";

    #[test]
    fn an_iamat_reply_is_one_exact_at_line() {
        let good = b"AT Bailey +0.263873386 load-7 +34.068930-118.445127 1621464827.959498503\n";
        let expect = Expect::Iamat(IAMAT_FIELDS);
        assert_eq!(parse_reply(good, expect), Some((good.len(), Ok(()))));
        // Incomplete until the newline.
        assert_eq!(parse_reply(&good[..good.len() - 1], expect), None);
        // Two replies back to back: the first one only.
        let two = [&good[..], &good[..]].concat();
        assert_eq!(parse_reply(&two, expect), Some((good.len(), Ok(()))));
        let cases: &[(&[u8], &str)] = &[
            (
                b"? IAMAT load-7 x y\n",
                "the server found the command invalid",
            ),
            (
                b"AT Bailey +0.263873386 load-8 +34.068930-118.445127 1621464827.959498503\n",
                "the AT line does not copy the IAMAT's fields",
            ),
            (
                b"AT Bailey +0.26387338 load-7 +34.068930-118.445127 1621464827.959498503\n",
                "the AT line's time difference is not [+-]SECONDS.NNNNNNNNN",
            ),
            (
                b"AT Bailey 0.263873386 load-7 +34.068930-118.445127 1621464827.959498503\n",
                "the AT line's time difference is not [+-]SECONDS.NNNNNNNNN",
            ),
            (
                b"AT  +0.263873386 load-7 +34.068930-118.445127 1621464827.959498503\n",
                "the AT line names no server",
            ),
            (
                b"AT Bailey +0.263873386 load-7 +34.068930-118.445127 1621464827.959498503 \n",
                "the AT line does not copy the IAMAT's fields",
            ),
            (b"AT Bailey\n", "the AT line is too short"),
            (b"hello\n", "not an AT line"),
        ];
        for (reply, why) in cases {
            assert_eq!(
                parse_reply(reply, expect),
                Some((reply.len(), Err(*why))),
                "{}",
                quote(reply)
            );
        }
    }

    #[test]
    fn a_whatsat_reply_runs_to_the_first_blank_line() {
        let good = b"AT Bona -0.000001000 load-7 +34.068930-118.445127 1621464827.959498503\n{\n   \"results\" : []\n}\n\n";
        let expect = Expect::Whatsat(b"load-7");
        assert_eq!(parse_reply(good, expect), Some((good.len(), Ok(()))));
        for cut in [good.len() - 1, good.len() - 2, 80, 10] {
            assert_eq!(parse_reply(&good[..cut], expect), None, "cut at {cut}");
        }
        let next = [&good[..], b"AT Bona"].concat();
        assert_eq!(parse_reply(&next, expect), Some((good.len(), Ok(()))));
        let other =
            b"AT Bona -0.000001000 load-8 +34.068930-118.445127 1621464827.959498503\n{}\n\n";
        assert_eq!(
            parse_reply(other, expect),
            Some((
                other.len(),
                Err("the AT line is not a record of the client asked about")
            ))
        );
        let empty = b"AT Bona -0.000001000 load-7 +34.068930-118.445127 1621464827.959498503\n\n";
        assert_eq!(
            parse_reply(empty, expect),
            Some((empty.len(), Err("the WHATSAT reply has no body")))
        );
        // An unknown client gets one `?` line: it is one reply, not the start of a body.
        let refused = b"? WHATSAT load-7 10 5\nAT ...";
        assert_eq!(
            parse_reply(refused, expect),
            Some((22, Err("the server found the command invalid")))
        );
    }

    #[test]
    fn the_histogram_is_exact_when_small_and_within_one_percent_above() {
        for ns in [
            0,
            1,
            127,
            128,
            255,
            256,
            257,
            1_000,
            123_456_789,
            MAX_TRACKED_NS,
        ] {
            let (low, width) = bucket_range(bucket_of(ns));
            assert!(low <= ns && ns < low + width, "{ns}: {low} + {width}");
            assert!(
                width == 1 || (width as f64) / (low as f64) <= 1.0 / 128.0,
                "{ns}"
            );
        }
        let mut h = Histogram::new();
        assert_eq!(h.quantile_ns(0.5), 0);
        for ns in 1..=100 {
            h.record(Duration::from_nanos(ns));
        }
        assert_eq!(h.quantile_ns(0.5), 50);
        assert_eq!(h.quantile_ns(0.99), 99);
        assert_eq!(h.quantile_ns(1.0), 100);

        let mut h = Histogram::new();
        for us in 1..=10_000 {
            h.record(Duration::from_micros(us));
        }
        for (quantile, exact) in [(0.5, 5_000_000.0), (0.9, 9_000_000.0), (0.999, 9_990_000.0)] {
            let got = h.quantile_ns(quantile) as f64;
            assert!((got - exact).abs() / exact < 0.01, "{quantile}: {got}");
        }
        assert_eq!(h.quantile_ns(1.0), 10_000_000);
        h.record(Duration::from_secs(100));
        assert_eq!(h.max_ns, 100_000_000_000);
        assert_eq!(h.quantile_ns(1.0), 100_000_000_000);
    }

    #[test]
    fn arguments_have_defaults_and_limits() {
        let opts = parse_args(&args("--addr 127.0.0.1:10000")).unwrap();
        assert_eq!(
            opts,
            LoadOptions {
                addr: "127.0.0.1:10000".parse().unwrap(),
                connections: 50,
                in_flight: 1,
                duration: Duration::from_millis(5000),
                warmup: Duration::from_millis(500),
                mix: Mix::Iamat,
                one_shot: false,
                clients: 10_000,
                radius_km: "10".into(),
                bound: 5,
                id_prefix: CLIENT_PREFIX.into(),
                rate: None,
                requests: None,
                sources: 1,
            }
        );
        let opts = parse_args(&args(
            "--addr localhost:10001 -c 8 -p 32 -d 100 --warmup-ms 0 --mix mixed:10 --radius 2.5 --bound 20",
        ))
        .unwrap();
        assert_eq!(opts.addr, "127.0.0.1:10001".parse().unwrap());
        assert_eq!((opts.connections, opts.in_flight), (8, 32));
        assert_eq!(
            (opts.duration, opts.warmup),
            (Duration::from_millis(100), Duration::ZERO)
        );
        assert_eq!(
            opts.mix,
            Mix::Mixed {
                whatsat_percent: 10
            }
        );
        assert_eq!(
            (opts.clients, opts.radius_km.as_str(), opts.bound),
            (1000, "2.5", 20)
        );
        let opts = parse_args(&args(
            "--addr 127.0.0.1:1 --mix whatsat --clients 7 --one-shot",
        ))
        .unwrap();
        assert_eq!(
            (opts.mix, opts.clients, opts.one_shot),
            (Mix::Whatsat, 7, true)
        );
        for bad in [
            "",
            "--addr 127.0.0.1:1 -c 0",
            "--addr 127.0.0.1:1 -p x",
            "--addr 127.0.0.1:1 --mix mixed:101",
            "--addr 127.0.0.1:1 --mix sometimes",
            "--addr 127.0.0.1:1 --one-shot -p 2",
            "--addr 127.0.0.1:1 extra",
            "--addr nowhere",
            "--addr 127.0.0.1:1 --frobnicate",
            "--addr 127.0.0.1:1 --sources 0",
            "--addr 127.0.0.1:1 --sources 254",
            "--addr [::1]:1 --sources 2",
        ] {
            assert!(parse_args(&args(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_report_is_one_line_of_json() {
        let report = LoadReport {
            requests: 1000,
            errors: 1,
            seconds: 1.00049,
            per_second: 999.5101,
            p50_us: 12.3456,
            p90_us: 20.0,
            p99_us: 40.0,
            p999_us: 80.0,
            max_us: 100.0,
            cpu_seconds: 0.95,
            cpu_percent: 95.0,
            client_bound: true,
            first_error: Some("the \"server\" said ?".into()),
        };
        let json = report.to_json();
        assert!(!json.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["requests"], 1000);
        assert_eq!(value["p50_us"], 12.3);
        assert_eq!(value["per_second"], 999.5);
        assert_eq!(value["client_bound"], true);
        assert_eq!(value["first_error"], "the \"server\" said ?");
    }

    /// A stand-in server for `run`, a thread per connection: answers IAMAT as the herd does,
    /// remembers the record, answers WHATSAT with it and a small body, anything else with `?`.
    fn fake_server() -> SocketAddr {
        use std::collections::HashMap;
        use std::io::{BufRead, BufReader, BufWriter, Write};
        use std::sync::{Arc, Mutex};

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let records = Arc::new(Mutex::new(HashMap::<String, String>::new()));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let records = records.clone();
                std::thread::spawn(move || {
                    let Ok(read_half) = stream.try_clone() else {
                        return;
                    };
                    let mut reader = BufReader::new(read_half);
                    let mut writer = BufWriter::new(stream);
                    let mut line = String::new();
                    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                        let fields: Vec<&str> = line.split_whitespace().collect();
                        let reply = match fields[..] {
                            ["IAMAT", client, location, time] => {
                                let record =
                                    format!("AT Fake +0.000000001 {client} {location} {time}");
                                records
                                    .lock()
                                    .unwrap()
                                    .insert(client.into(), record.clone());
                                record + "\n"
                            }
                            ["WHATSAT", client, _, _] => {
                                match records.lock().unwrap().get(client) {
                                    Some(record) => format!("{record}\n{{\"results\" : []}}\n\n"),
                                    None => format!("? {}\n", line.trim_end()),
                                }
                            }
                            _ => format!("? {}\n", line.trim_end()),
                        };
                        line.clear();
                        // Answer a whole batch of pipelined commands in one write.
                        let flushed =
                            writer.write_all(reply.as_bytes()).and_then(|()| {
                                match reader.buffer().is_empty() {
                                    true => writer.flush(),
                                    false => Ok(()),
                                }
                            });
                        if flushed.is_err() {
                            return;
                        }
                    }
                    let _ = writer.flush();
                });
            }
        });
        addr
    }

    #[test]
    fn sources_take_turns_from_127_0_0_2() {
        let mut sources = Sources::new(3);
        let taken: Vec<_> = (0..4).map(|_| sources.next()).collect();
        let ip = |d| Some(Ipv4Addr::new(127, 0, 0, d));
        assert_eq!(taken, [ip(2), ip(3), ip(4), ip(2)]);
        assert_eq!(Sources::new(1).next(), None);
        assert_eq!(
            Sources::new(Sources::MAX).addrs.last(),
            Some(&Ipv4Addr::new(127, 0, 0, 254))
        );
        // The kernel really connects from them.
        if cfg!(target_os = "linux") {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
                unreachable!("bound to an IPv4 address");
            };
            let _stream = connect_from(Ipv4Addr::new(127, 0, 0, 3), addr).unwrap();
            let (_, peer) = listener.accept().unwrap();
            assert_eq!(peer.ip(), Ipv4Addr::new(127, 0, 0, 3));
        }
    }

    #[test]
    fn a_paced_load_waits_for_replies_when_every_connection_is_full() {
        // A server that accepts and never answers: the one command allowed in flight stays
        // outstanding, and the schedule falls behind at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let opts = parse_args(&args(&format!(
            "--addr {addr} -c 1 -p 1 -d 400 --warmup-ms 0 --clients 10 --rate 1000000"
        )))
        .unwrap();
        let report = run(&opts).unwrap();
        drop(listener);
        assert_eq!(report.requests, 0, "{report:?}");
        // Waking for the clock with nowhere to send would spin for the whole run; waiting for
        // a reply costs next to nothing.
        assert!(report.cpu_seconds < 0.1, "{report:?}");
    }

    #[test]
    fn run_loads_a_fake_server_pipelined_and_one_shot() {
        let addr = fake_server();
        let pipelined = LoadOptions {
            addr,
            connections: 4,
            in_flight: 8,
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(50),
            mix: Mix::Mixed {
                whatsat_percent: 20,
            },
            one_shot: false,
            clients: 100,
            radius_km: "10".into(),
            bound: 5,
            id_prefix: CLIENT_PREFIX.into(),
            rate: None,
            requests: None,
            sources: 1,
        };
        let one_shot = LoadOptions {
            mix: Mix::Iamat,
            in_flight: 1,
            one_shot: true,
            ..pipelined.clone()
        };
        let spread = LoadOptions {
            sources: 3,
            ..one_shot.clone()
        };
        for opts in [pipelined, one_shot, spread] {
            let report = run(&opts).unwrap();
            assert!(report.requests > 0, "{opts:?}: {report:?}");
            assert_eq!(report.errors, 0, "{opts:?}: {report:?}");
            assert!(report.seconds >= 0.3 && report.seconds < 0.5, "{report:?}");
            assert!(
                report.p50_us > 0.0 && report.p50_us <= report.max_us,
                "{report:?}"
            );
        }
    }
}
