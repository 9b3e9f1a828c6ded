//! `herd.toml`: the servers of a herd, their links, Places and the limits, checked as a whole
//! at start-up. Every problem is one line that names it; README.md lists every key.
//!
//! Each field below says which key sets it, its unit and its default. Relative paths are
//! relative to the configuration file's directory, not to where the server was started, so a
//! herd started from anywhere finds the same files. An unknown key is an error rather than
//! ignored: a misspelt limit would otherwise leave its default in force without a word.
//! Numbers are whole and not negative; durations are whole milliseconds (keys ending `_ms`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

/// The whole configuration file, as every server and tool of the herd reads it.
#[derive(Debug, Clone)]
pub struct Config {
    /// `log_dir`, default `logs`: the directory of each server's log `<NAME>.log`, and of the
    /// files it writes beside it (`<NAME>.store` on SIGUSR1, `<NAME>.admin` while it runs).
    /// Made if missing.
    pub log_dir: PathBuf,
    /// `log_max_bytes`, in bytes, default 0: a log file past this many bytes is rotated when
    /// the log is next written (0: never; for logrotate, send SIGHUP).
    pub log_max_bytes: u64,
    /// `log_keep`, default 5: rotated log files kept, `<NAME>.log.1` (the newest) up; 0 keeps
    /// none, and a full log is deleted.
    pub log_keep: usize,
    /// `log_housekeeping`, default `false`: whether the heartbeats and digests received from
    /// neighbours (`PING`, `DIGEST`, `PARTS`: every second or so on every link) are logged line
    /// by line.
    pub log_housekeeping: bool,
    /// `data_dir`, default `data`: where each server keeps its records on disk
    /// (`<data_dir>/<NAME>.aof`); `data_dir = ""` gives `None`: in memory only, and a restarted
    /// server starts empty until its neighbours resend what they hold.
    pub data_dir: Option<PathBuf>,
    /// `[store]`: how the records on disk are kept.
    pub store: StoreConfig,
    /// `secret_file`, default none: a file holding the herd secret, used when `HERD_SECRET` is
    /// not set. A file that grants anyone but its owner any access (mode looser than 600) is
    /// refused.
    pub secret_file: Option<PathBuf>,
    /// The `[[server]]` tables, in the file's order: at least one.
    pub servers: Vec<ServerConfig>,
    /// `[places]`: how WHATSAT reaches Google Places.
    pub places: PlacesConfig,
    /// `[limits]`: what a client, a neighbour or Places can make a server hold.
    pub limits: Limits,
}

/// `[store]`: how the records on disk are kept.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `fsync`: `"always"`, `"everysec"` (the default) or `"no"`: when the records written
    /// reach the disk ([`Fsync`]).
    pub fsync: Fsync,
    /// `compact_min_bytes`, in bytes, default [`COMPACT_MIN_BYTES`] (64 MiB): a file smaller
    /// than this is never compacted; a larger one is once it is twice the size of the live
    /// records.
    pub compact_min_bytes: u64,
}

/// One `[[server]]` table: a server of the herd.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `name`, required: unique in the herd, non-empty, with no white space (it is a field of
    /// every `AT` line the server writes).
    pub name: String,
    /// `host`, default `127.0.0.1`: where neighbours, clients of `herd iamat` and the like,
    /// and `herd status` reach this server; also where it listens, unless `listen` says.
    pub host: String,
    /// `port`, required: the TCP port for clients and neighbours alike; unique per `host`.
    /// `0` (any free port) only for a server that no neighbour has to dial.
    pub port: u16,
    /// `listen`, `HOST:PORT`, default `host:port`: where it listens, when not at `host:port`
    /// (behind a proxy or NAT, on all interfaces).
    pub listen: Option<String>,
    /// `neighbors`, default none: the names of the servers it links to. Each must name this
    /// server back: a link is configured on both sides or not at all.
    pub neighbors: Vec<String>,
    /// `admin`, default none: `HOST:PORT` of its admin endpoint (`/metrics`, `/healthz`,
    /// `/status`); off when `None` (`herd up` then gives it one on a free port).
    pub admin: Option<String>,
}

/// `[places]`: how WHATSAT reaches Google Places. The API key is not here: it comes from
/// `GOOGLE_PLACES_API_KEY` or the file `key_file` names, never from this file's text.
#[derive(Debug, Clone)]
pub struct PlacesConfig {
    /// `api`: `"legacy"` (the default: Nearby Search) or `"new"` (Places API (New)
    /// `searchNearby`).
    pub api: Api,
    /// `output`: `"google"` (the default: the body as Google sent it) or `"legacy"` (an
    /// answer of the new API rewritten as a legacy Nearby Search body).
    pub output: Output,
    /// `url`, default Google's endpoint for `api` ([`LEGACY_URL`], [`NEW_URL`]): the URL as
    /// configured, `https://host[:port]/path`, for messages; the three fields below are taken
    /// from it.
    pub url: String,
    /// The URL's host: what is resolved and dialled, the TLS server name, the `Host` header.
    pub host: String,
    /// The URL's port, default 443.
    pub port: u16,
    /// The URL's path, default `/`.
    pub path: String,
    /// `ca_file`, default none: a PEM file of extra trusted roots, on top of the built-in web
    /// roots (for tests and corporate proxies). Checked readable when the file is loaded.
    pub ca_file: Option<PathBuf>,
    /// `key_file`, default none: a file holding the API key, read when `GOOGLE_PLACES_API_KEY`
    /// is not set.
    pub key_file: Option<PathBuf>,
    /// `timeout_ms`, in milliseconds, default 5000: the deadline of one WHATSAT's Places
    /// request, from the turn the command ran in to the last byte of Google's answer, time
    /// spent waiting for a connection included; past it the reply is `UNKNOWN_ERROR`.
    pub timeout: Duration,
    /// `pool_size`, default 4 (at least 1): the most HTTPS connections open to Places at
    /// once, each with its own token; requests beyond them wait in the queue.
    pub pool_size: usize,
    /// `max_queue`, default 1024: most requests waiting for a connection; past it a WHATSAT is
    /// answered UNKNOWN_ERROR at once. Every request passes through the queue, so 0 refuses
    /// them all.
    pub max_queue: usize,
    /// `max_body_bytes`, in bytes, default 1048576 (1 MiB): a response whose body is larger
    /// is abandoned, its connection closed, and the WHATSAT answered `UNKNOWN_ERROR`; this
    /// bounds what Places can make a server hold per connection.
    pub max_body_bytes: usize,
    /// `field_mask`, default [`DEFAULT_FIELD_MASK`]: the `X-Goog-FieldMask` of requests to
    /// the new API (Google bills by the fields asked for); unused with `api = "legacy"`. One
    /// line: it goes into a header.
    pub field_mask: String,
}

/// Every buffer's limit (docs/protocol.md section 7); README.md says what crossing each one does.
/// `[limits]`, each key named in its field's doc; the defaults are [`Limits::default`].
///
/// The time limits of a client connection are checked by the loop's sweep, once a second, so
/// each acts up to a second after it is reached. A client that breaks a limit loses its own
/// connection and nothing else.
#[derive(Debug, Clone)]
pub struct Limits {
    /// `max_line_bytes`, in bytes, default 4096, at least 64: the longest
    /// line a client may send, its `\n` not counted. A longer one is answered
    /// `? <its first 64 bytes>... (line longer than N bytes)` and the connection closed. A
    /// neighbour's lines may be twice as long and 1024 bytes more (a record is longer than the
    /// IAMAT it stores).
    pub max_line_bytes: usize,
    /// `line_timeout_ms`, in milliseconds, default 10000: a line started must end within this
    /// (a client sending a byte at a time holds a connection and a buffer; this bounds how
    /// long). 0 does not turn it off: a line unfinished at a sweep closes its connection.
    pub line_timeout: Duration,
    /// `idle_timeout_ms`, in milliseconds, default 300000 (5 minutes): a client connection
    /// that has sent nothing for this long and has no reply pending is closed; 0 turns it off.
    pub idle_timeout: Duration,
    /// `client_output_bytes`, in bytes, default 4194304 (4 MiB): unread replies past this close
    /// the connection at once... Long before, at a quarter of it (at most 256 KiB,
    /// [`crate::herd::OUTPUT_HIGH_WATER`]), the client's commands stop being run until it
    /// reads: the back-pressure mark, which also sizes every client socket's send buffer.
    pub client_output_bytes: usize,
    /// ...and past this (`client_output_soft_bytes`, in bytes, default 1048576, 1 MiB) for
    /// `client_output_soft_time`.
    pub client_output_soft_bytes: usize,
    /// `client_output_soft_ms`, in milliseconds, default 10000: how long unread replies may
    /// stay over `client_output_soft_bytes` before the connection is closed.
    pub client_output_soft_time: Duration,
    /// `pending_replies`, default 64, at least 1: replies one client may have waiting on
    /// Places; at this many, no more of its commands are run until one is answered (replies go
    /// out in command order, so each one waiting holds back those behind it).
    pub pending_replies: usize,
    /// `max_connections`, default 16384: accepted connections open at once (clients, and
    /// neighbours not yet proved). A connection past it is answered `? server busy` and
    /// closed, but for two places per neighbour kept beyond it, which only a neighbour's
    /// greeting may hold ([`crate::server`]). The server raises its soft descriptor limit to
    /// the hard one at start; the hard limit must leave room for this many.
    pub max_connections: usize,
    /// `peer_output_bytes`, in bytes, default 16777216 (16 MiB): a link to a neighbour whose
    /// unsent output passes this when a record is queued is dropped, then redialled and
    /// resynchronised: nothing queues without bound for a neighbour that does not keep up.
    pub peer_output_bytes: usize,
    /// One connection's share of a turn of the loop: see [`Turn`].
    pub turn: Turn,
    /// `max_client_id_bytes`, in bytes, default 256, at least 1: the longest client id an
    /// IAMAT or a neighbour's record may carry. A longer IAMAT is invalid, a longer record
    /// refused.
    pub max_client_id_bytes: usize,
    /// `max_clients`, default 1000000: the most clients the store holds; a new client past it
    /// is refused (its IAMAT answered `?`, a neighbour's record dropped). Clients are never
    /// removed, so this bounds the store's memory.
    pub max_clients: usize,
    /// `client_time_ahead_ms`, in milliseconds, default 60000: how far ahead of this server's
    /// clock a client time may lie: further, and an IAMAT is invalid and a neighbour's record
    /// refused (a far-future time would pin its client).
    pub client_time_ahead: Duration,
    /// `first_line_timeout_ms`, in milliseconds, default 60000: a new connection's first line
    /// must come within this. A connection in a place kept for neighbours gets the shorter of
    /// this and [`crate::peer::HANDSHAKE_TIMEOUT`].
    pub first_line_timeout: Duration,
    /// `max_connections_per_address`, default 1024: the most connections open from one IP
    /// address at once; past it a newcomer is refused like one past `max_connections`; 0: no
    /// cap.
    pub max_connections_per_address: usize,
    /// `whatsat_per_minute`, default 0 (no limit): WHATSATs one client IP address may send per
    /// minute, as a bucket of that many that refills evenly over the minute; one over it is
    /// answered with an `OVER_QUERY_LIMIT` body, and costs no Places request.
    pub whatsat_per_minute: usize,
}

/// How much one connection may take of one turn of the loop before the others get theirs: a
/// single-threaded server is only as fair as its turns. A connection that still has work when
/// its share is spent is served again in the next turn, which comes at once.
///
/// A client's share is about fifty microseconds of the loop: 64 commands (an IAMAT costs a
/// microsecond or less), read 16 KiB at a time (about 270 IAMATs, so a share's worth is read
/// ahead), as Redis reads 16 KiB per client per event. A busy client with sixteen commands in flight never comes near it; one that
/// pipelines a million stops there, and a client behind it waits a turn, not a million commands.
/// The share is small because the turn is everyone's: with ten connections pipelining as fast as
/// they can, a turn is ten shares, and a client that sends one command waits for one or two of
/// them (with 512 commands a share, that was 7 ms at the median; with 64, half a millisecond).
/// A neighbour's inbound link carries the updates of every client of the herd, and it must keep
/// up or its sender's output grows until the link is dropped and resynchronised: its share is
/// sixty-four clients'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    /// `turn_lines`, default [`Turn::LINES`]: lines a client's connection runs per turn; 0: no
    /// limit.
    pub lines: usize,
    /// `turn_read_bytes`, in bytes, default [`Turn::READ_BYTES`]: bytes read from a client's
    /// connection per turn; 0: no limit.
    pub read_bytes: usize,
}

impl Turn {
    /// The default lines per turn: about fifty microseconds of IAMATs.
    pub const LINES: usize = 64;
    /// The default bytes read per turn: 16 KiB, about 270 IAMATs.
    pub const READ_BYTES: usize = 16 * 1024;
    /// A neighbour's inbound link gets this many clients' share.
    pub const PEER_SHARE: usize = 64;

    /// A neighbour's inbound link's share: [`Turn::PEER_SHARE`] times this, a limit of 0 still
    /// none.
    pub fn peer(self) -> Turn {
        Turn {
            lines: self.lines.saturating_mul(Turn::PEER_SHARE),
            read_bytes: self.read_bytes.saturating_mul(Turn::PEER_SHARE),
        }
    }
}

impl Default for Turn {
    fn default() -> Turn {
        Turn {
            lines: Turn::LINES,
            read_bytes: Turn::READ_BYTES,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_line_bytes: 4096,
            line_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            client_output_bytes: 4 << 20,
            client_output_soft_bytes: 1 << 20,
            client_output_soft_time: Duration::from_secs(10),
            pending_replies: 64,
            max_connections: 16384,
            peer_output_bytes: 16 << 20,
            turn: Turn::default(),
            max_client_id_bytes: 256,
            max_clients: 1_000_000,
            client_time_ahead: Duration::from_secs(60),
            first_line_timeout: Duration::from_secs(60),
            max_connections_per_address: 1024,
            whatsat_per_minute: 0,
        }
    }
}

/// Google's legacy Nearby Search endpoint: the default `url` with `api = "legacy"`.
/// Which Places API a server talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// Nearby Search (`maps/api/place/nearbysearch/json`), a GET with the key in the query.
    Legacy,
    /// Places API (New), a POST of JSON to `v1/places:searchNearby`.
    New,
}

/// What a reply body is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Google's body as Google sent it (cut to the bound, newlines squeezed).
    AsSent,
    /// With the New API, its answer turned into a legacy Nearby Search body, for clients written
    /// for the legacy layout ([`crate::places::legacy`]). The same as `AsSent` with the legacy API.
    Legacy,
}

/// When records reach the disk: Redis's `appendfsync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// `fdatasync` in the loop at the end of every turn that wrote, before its replies.
    Always,
    /// `fdatasync` by a helper thread, about once a second when something was written.
    EverySec,
    /// Never asked for: the kernel writes the pages back when it chooses.
    No,
}

/// The smallest file worth compacting, unless configured (`[store] compact_min_bytes`): a
/// smaller file is left as it is, however many old records it holds (Redis's
/// `auto-aof-rewrite-min-size` has the same default).
pub const COMPACT_MIN_BYTES: u64 = 64 << 20;

/// Reads `text` as `[store] fsync`: Redis's `appendfsync` words.
pub fn parse_fsync(text: &str) -> Option<Fsync> {
    match text {
        "always" => Some(Fsync::Always),
        "everysec" => Some(Fsync::EverySec),
        "no" => Some(Fsync::No),
        _ => None,
    }
}

/// The longest `limits.max_line_bytes` accepted.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Nearby Search: the default `url` with `api = "legacy"`.
pub const LEGACY_URL: &str = "https://maps.googleapis.com/maps/api/place/nearbysearch/json";
/// Places API (New) `searchNearby`: the default `url` with `api = "new"`.
pub const NEW_URL: &str = "https://places.googleapis.com/v1/places:searchNearby";
/// The default `field_mask`: a few basic fields of each place (Google bills by the fields asked
/// for); with `output = "legacy"`, the body written holds only what these return.
pub const DEFAULT_FIELD_MASK: &str = "places.id,places.displayName,places.formattedAddress,places.location,places.types,places.rating,places.userRatingCount,places.businessStatus";

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read configuration {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses configuration text; relative paths in it are relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, String> {
        let mut top: Table = text
            .parse()
            .map_err(|e: toml::de::Error| format!("not valid TOML: {}", e.message().trim()))?;
        let log_dir = base.join(take_str(&mut top, "log_dir", "")?.unwrap_or("logs".into()));
        let log_max_bytes = take_uint(&mut top, "log_max_bytes", "", 0)? as u64;
        let log_keep = take_uint(&mut top, "log_keep", "", 5)?;
        let log_housekeeping = match top.remove("log_housekeeping") {
            None => false,
            Some(Value::Boolean(b)) => b,
            Some(_) => return Err("log_housekeeping must be true or false".into()),
        };
        // Absent: records kept on disk, under `data`; only an explicit `""` turns that off.
        let data_dir = match take_str(&mut top, "data_dir", "")? {
            None => Some(base.join("data")),
            Some(dir) if dir.is_empty() => None,
            Some(dir) => Some(base.join(dir)),
        };
        let store = parse_store(take_table(&mut top, "store")?)?;
        let secret_file = take_str(&mut top, "secret_file", "")?.map(|p| base.join(p));
        let servers = match top.remove("server") {
            Some(Value::Array(list)) => list
                .into_iter()
                .map(parse_server)
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err("`server` must be an array of [[server]] tables".into()),
            None => return Err("no [[server]] table: a herd needs at least one server".into()),
        };
        let places = parse_places(take_table(&mut top, "places")?, base)?;
        let limits = parse_limits(take_table(&mut top, "limits")?)?;
        // Every known key was taken out of the table as it was read: what is left is unknown.
        no_unknown_keys(&top, "")?;
        check_herd(&servers)?;
        Ok(Config {
            log_dir,
            log_max_bytes,
            log_keep,
            log_housekeeping,
            data_dir,
            store,
            secret_file,
            servers,
            places,
            limits,
        })
    }

    /// The server called `name`; the error lists the names there are.
    pub fn server(&self, name: &str) -> Result<&ServerConfig, String> {
        self.servers.iter().find(|s| s.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.servers.iter().map(|s| s.name.as_str()).collect();
            format!(
                "no server named {name:?} in the configuration (it has {})",
                names.join(", ")
            )
        })
    }

    /// `<log_dir>/<name>.log`: where server `name` logs.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.log"))
    }
}

fn parse_server(value: Value) -> Result<ServerConfig, String> {
    let Value::Table(mut t) = value else {
        return Err("each [[server]] must be a table".into());
    };
    let name = take_str(&mut t, "name", "server.")?.ok_or("a [[server]] has no `name`")?;
    let at = format!("server {name:?}: ");
    if name.is_empty() || name.bytes().any(crate::protocol::is_space) {
        return Err(format!("{at}a name must be non-empty with no white space"));
    }
    let port = match t.remove("port") {
        Some(Value::Integer(p)) => {
            u16::try_from(p).map_err(|_| format!("{at}port {p} is not a TCP port"))?
        }
        Some(_) => return Err(format!("{at}`port` must be a number")),
        None => return Err(format!("{at}no `port`")),
    };
    let host = take_str(&mut t, "host", &at)?.unwrap_or("127.0.0.1".into());
    let listen = take_str(&mut t, "listen", &at)?;
    let admin = take_str(&mut t, "admin", &at)?;
    let neighbors = match t.remove("neighbors") {
        None => Vec::new(),
        Some(Value::Array(list)) => list
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(format!("{at}`neighbors` must be a list of names")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(format!("{at}`neighbors` must be a list of names")),
    };
    no_unknown_keys(&t, &at)?;
    Ok(ServerConfig {
        name,
        host,
        port,
        listen,
        neighbors,
        admin,
    })
}

/// Names unique, ports unique per host, and every link known and named on both sides.
fn check_herd(servers: &[ServerConfig]) -> Result<(), String> {
    let mut names = HashMap::new();
    let mut addresses = HashSet::new();
    for s in servers {
        if names.insert(s.name.as_str(), s).is_some() {
            return Err(format!("two servers are named {:?}", s.name));
        }
        if s.port != 0 && !addresses.insert((s.host.as_str(), s.port)) {
            return Err(format!("two servers use port {} on {}", s.port, s.host));
        }
    }
    for s in servers {
        let mut seen = HashSet::new();
        for n in &s.neighbors {
            let Some(other) = names.get(n.as_str()) else {
                return Err(format!(
                    "server {:?} names an unknown neighbour {n:?}",
                    s.name
                ));
            };
            if n == &s.name {
                return Err(format!("server {:?} names itself as a neighbour", s.name));
            }
            if !seen.insert(n) {
                return Err(format!("server {:?} names neighbour {n:?} twice", s.name));
            }
            if !other.neighbors.contains(&s.name) {
                return Err(format!(
                    "the link {} - {n} is named on one side only: add {:?} to {n}'s neighbors",
                    s.name, s.name
                ));
            }
            if other.port == 0 {
                return Err(format!(
                    "server {n:?} has port 0 but neighbours must be able to dial it"
                ));
            }
        }
    }
    Ok(())
}

fn parse_places(mut t: Table, base: &Path) -> Result<PlacesConfig, String> {
    let at = "places.";
    let api = match take_str(&mut t, "api", at)?.as_deref() {
        None | Some("legacy") => Api::Legacy,
        Some("new") => Api::New,
        Some(other) => {
            return Err(format!(
                "places.api is {other:?}: it must be \"legacy\" or \"new\""
            ))
        }
    };
    let output = match take_str(&mut t, "output", at)?.as_deref() {
        None | Some("google") => Output::AsSent,
        Some("legacy") => Output::Legacy,
        Some(other) => {
            return Err(format!(
                "places.output is {other:?}: it must be \"google\" or \"legacy\""
            ))
        }
    };
    let default_url = if api == Api::Legacy {
        LEGACY_URL
    } else {
        NEW_URL
    };
    let url = take_str(&mut t, "url", at)?.unwrap_or(default_url.into());
    let (host, port, path) = split_https_url(&url)?;
    let file = |t: &mut Table, key: &str| -> Result<Option<PathBuf>, String> {
        Ok(take_str(t, key, at)?.map(|p| base.join(p)))
    };
    let ca_file = file(&mut t, "ca_file")?;
    if let Some(ca) = &ca_file {
        std::fs::metadata(ca)
            .and_then(|_| std::fs::File::open(ca))
            .map_err(|e| format!("places.ca_file {}: {e}", ca.display()))?;
    }
    let key_file = file(&mut t, "key_file")?;
    let timeout = take_ms_least(&mut t, "timeout_ms", at, Duration::from_millis(5000), 1)?;
    // A pool of no connections would hold every request in the queue until its deadline.
    let pool_size = take_least(&mut t, "pool_size", at, 4, 1)?;
    let max_queue = take_uint(&mut t, "max_queue", at, 1024)?;
    let max_body_bytes = take_uint(&mut t, "max_body_bytes", at, 1 << 20)?;
    let field_mask = take_str(&mut t, "field_mask", at)?.unwrap_or(DEFAULT_FIELD_MASK.into());
    if field_mask.bytes().any(|b| b.is_ascii_control()) {
        return Err("places.field_mask must be a single line".into());
    }
    no_unknown_keys(&t, at)?;
    Ok(PlacesConfig {
        api,
        output,
        url,
        host,
        port,
        path,
        ca_file,
        key_file,
        timeout,
        pool_size,
        max_queue,
        max_body_bytes,
        field_mask,
    })
}

/// Splits `https://host[:port]/path`: the port defaults to 443 and the path to `/`; an IPv6
/// host is written in brackets, which are taken off. Any other scheme is refused.
fn split_https_url(url: &str) -> Result<(String, u16, String), String> {
    let bad = || format!("places.url {url:?} must look like https://host[:port]/path");
    let rest = url.strip_prefix("https://").ok_or_else(bad)?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    // A port follows the last `:`, unless that colon is inside an IPv6 literal's brackets.
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, p.parse::<u16>().map_err(|_| bad())?),
        _ => (authority, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty()
        || path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(bad());
    }
    let path = if path.is_empty() { "/" } else { path };
    Ok((host.to_owned(), port, path.to_owned()))
}

fn parse_store(mut t: Table) -> Result<StoreConfig, String> {
    let at = "store.";
    let fsync = match take_str(&mut t, "fsync", at)?.as_deref() {
        None => Fsync::EverySec,
        Some(text) => parse_fsync(text).ok_or_else(|| {
            format!("store.fsync is {text:?}: it must be \"always\", \"everysec\" or \"no\"")
        })?,
    };
    let compact_min_bytes =
        take_uint(&mut t, "compact_min_bytes", at, COMPACT_MIN_BYTES as usize)? as u64;
    no_unknown_keys(&t, at)?;
    Ok(StoreConfig {
        fsync,
        compact_min_bytes,
    })
}

fn parse_limits(mut t: Table) -> Result<Limits, String> {
    let at = "limits.";
    let d = Limits::default();
    let limits = Limits {
        max_line_bytes: take_least(&mut t, "max_line_bytes", at, d.max_line_bytes, 64)?,
        line_timeout: take_ms_least(&mut t, "line_timeout_ms", at, d.line_timeout, 1)?,
        idle_timeout: take_ms(&mut t, "idle_timeout_ms", at, d.idle_timeout)?,
        client_output_bytes: take_uint(&mut t, "client_output_bytes", at, d.client_output_bytes)?,
        client_output_soft_bytes: take_uint(
            &mut t,
            "client_output_soft_bytes",
            at,
            d.client_output_soft_bytes,
        )?,
        client_output_soft_time: take_ms(
            &mut t,
            "client_output_soft_ms",
            at,
            d.client_output_soft_time,
        )?,
        pending_replies: take_least(&mut t, "pending_replies", at, d.pending_replies, 1)?,
        max_connections: take_least(&mut t, "max_connections", at, d.max_connections, 1)?,
        peer_output_bytes: take_uint(&mut t, "peer_output_bytes", at, d.peer_output_bytes)?,
        turn: Turn {
            lines: take_uint(&mut t, "turn_lines", at, d.turn.lines)?,
            read_bytes: take_uint(&mut t, "turn_read_bytes", at, d.turn.read_bytes)?,
        },
        max_client_id_bytes: take_least(
            &mut t,
            "max_client_id_bytes",
            at,
            d.max_client_id_bytes,
            1,
        )?,
        max_clients: take_least(&mut t, "max_clients", at, d.max_clients, 1)?,
        client_time_ahead: take_ms(&mut t, "client_time_ahead_ms", at, d.client_time_ahead)?,
        first_line_timeout: take_ms(&mut t, "first_line_timeout_ms", at, d.first_line_timeout)?,
        max_connections_per_address: take_uint(
            &mut t,
            "max_connections_per_address",
            at,
            d.max_connections_per_address,
        )?,
        whatsat_per_minute: take_uint(&mut t, "whatsat_per_minute", at, d.whatsat_per_minute)?,
    };
    no_unknown_keys(&t, at)?;
    // A connection stops reading at `conn::INPUT_HIGH_WATER` of unhandled input, and a
    // neighbour's sealed line may be twice a client's and more: a longer limit would let a
    // line be legal that can never be read whole.
    if limits.max_line_bytes > MAX_LINE_BYTES {
        return Err(format!(
            "limits.max_line_bytes is {}: it must be at most {MAX_LINE_BYTES}",
            limits.max_line_bytes
        ));
    }
    Ok(limits)
}

fn take_ms(t: &mut Table, key: &str, at: &str, default: Duration) -> Result<Duration, String> {
    take_ms_least(t, key, at, default, 0)
}

/// [`take_ms`] for a key of at least `least` milliseconds ([`take_least`]).
fn take_ms_least(
    t: &mut Table,
    key: &str,
    at: &str,
    default: Duration,
    least: usize,
) -> Result<Duration, String> {
    let ms = take_least(t, key, at, default.as_millis() as usize, least)?;
    Ok(Duration::from_millis(ms as u64))
}

fn take_table(t: &mut Table, key: &str) -> Result<Table, String> {
    match t.remove(key) {
        None => Ok(Table::new()),
        Some(Value::Table(inner)) => Ok(inner),
        Some(_) => Err(format!("`{key}` must be a table ([{key}])")),
    }
}

fn take_str(t: &mut Table, key: &str, at: &str) -> Result<Option<String>, String> {
    match t.remove(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{at}{key} must be a string")),
    }
}

/// [`take_uint`] for a key below whose `least` the server could not work (no connection, no
/// client, no line): such a value is refused at start, not quietly raised.
fn take_least(
    t: &mut Table,
    key: &str,
    at: &str,
    default: usize,
    least: usize,
) -> Result<usize, String> {
    let n = take_uint(t, key, at, default)?;
    match n >= least {
        true => Ok(n),
        false => Err(format!("{at}{key} is {n}: it must be at least {least}")),
    }
}

fn take_uint(t: &mut Table, key: &str, at: &str, default: usize) -> Result<usize, String> {
    match t.remove(key) {
        None => Ok(default),
        Some(Value::Integer(n)) => {
            usize::try_from(n).map_err(|_| format!("{at}{key} must not be negative"))
        }
        Some(_) => Err(format!("{at}{key} must be a whole number")),
    }
}

fn no_unknown_keys(t: &Table, at: &str) -> Result<(), String> {
    match t.keys().next() {
        Some(key) => Err(format!("unknown key {at}{key}")),
        None => Ok(()),
    }
}

/// The first address of `host` and `port`, or of `host` alone written `HOST:PORT`. Blocks: call
/// it before a loop starts, never inside one.
pub fn resolve(host: &str, port: Option<u16>) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let (addrs, shown) = match port {
        Some(port) => ((host, port).to_socket_addrs(), format!("{host}:{port}")),
        None => (host.to_socket_addrs(), host.to_owned()),
    };
    addrs
        .map_err(|e| format!("cannot resolve {shown}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {shown}: no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/herd"))
    }

    const PAIR: &str = "[[server]]\nname = \"A\"\nport = 1\nneighbors = [\"B\"]\n[[server]]\nname = \"B\"\nport = 2\nneighbors = [\"A\"]\n";

    #[test]
    fn defaults() {
        let c = parse(PAIR).unwrap();
        assert_eq!(c.log_dir, Path::new("/etc/herd/logs"));
        assert_eq!(c.servers[1].host, "127.0.0.1");
        assert_eq!(c.places.api, Api::Legacy);
        assert_eq!(
            (
                c.places.host.as_str(),
                c.places.port,
                c.places.path.as_str()
            ),
            (
                "maps.googleapis.com",
                443,
                "/maps/api/place/nearbysearch/json"
            )
        );
        assert_eq!(c.limits.max_line_bytes, 4096);
    }

    #[test]
    fn the_repository_herd_toml_loads() {
        let c = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("herd.toml")).unwrap();
        assert_eq!(c.servers.len(), 5);
        assert_eq!(
            c.server("Campbell").unwrap().neighbors,
            ["Bailey", "Bona", "Jaquez"]
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let one_sided = "[[server]]\nname = \"A\"\nport = 1\nneighbors = [\"B\"]\n[[server]]\nname = \"B\"\nport = 2\n";
        assert!(parse(one_sided)
            .unwrap_err()
            .contains("A - B is named on one side only"));
        let unknown = "[[server]]\nname = \"A\"\nport = 1\nneighbors = [\"C\"]\n";
        assert!(parse(unknown)
            .unwrap_err()
            .contains("unknown neighbour \"C\""));
        let dup_name = "[[server]]\nname = \"A\"\nport = 1\n[[server]]\nname = \"A\"\nport = 2\n";
        assert!(parse(dup_name)
            .unwrap_err()
            .contains("two servers are named \"A\""));
        let dup_port = "[[server]]\nname = \"A\"\nport = 1\n[[server]]\nname = \"B\"\nport = 1\n";
        assert!(parse(dup_port).unwrap_err().contains("port 1"));
        // A value the server could not work with is refused, not raised.
        for (table, key, least) in [
            ("limits", "max_connections", 1),
            ("limits", "max_clients", 1),
            ("limits", "max_line_bytes", 64),
            ("limits", "line_timeout_ms", 1),
            ("limits", "pending_replies", 1),
            ("limits", "max_client_id_bytes", 1),
            ("places", "pool_size", 1),
            ("places", "timeout_ms", 1),
        ] {
            let low = format!("{PAIR}[{table}]\n{key} = {}\n", least - 1);
            let why = parse(&low).unwrap_err();
            assert!(
                why.contains(&format!(
                    "{table}.{key} is {}: it must be at least {least}",
                    least - 1
                )),
                "{why}"
            );
        }
        let typo = format!("{PAIR}[places]\ntimeout = 5\n");
        assert!(parse(&typo)
            .unwrap_err()
            .contains("unknown key places.timeout"));
        let url = format!("{PAIR}[places]\nurl = \"http://x/\"\n");
        assert!(parse(&url).unwrap_err().contains("https://host"));
        let ca = format!("{PAIR}[places]\nca_file = \"/nonexistent/ca.pem\"\n");
        assert!(parse(&ca).unwrap_err().contains("/nonexistent/ca.pem"));
        let long = format!("{PAIR}[limits]\nmax_line_bytes = 1000000\n");
        assert!(parse(&long)
            .unwrap_err()
            .contains("limits.max_line_bytes is 1000000: it must be at most 65536"));
    }

    #[test]
    fn urls() {
        assert_eq!(
            split_https_url("https://127.0.0.1:8443/v1/places:searchNearby").unwrap(),
            ("127.0.0.1".into(), 8443, "/v1/places:searchNearby".into())
        );
        assert_eq!(
            split_https_url("https://[::1]/p").unwrap(),
            ("::1".into(), 443, "/p".into())
        );
        assert_eq!(
            split_https_url("https://[::1]:8443/p").unwrap(),
            ("::1".into(), 8443, "/p".into())
        );
        assert_eq!(
            split_https_url("https://[::1]:9/x").unwrap(),
            ("::1".into(), 9, "/x".into())
        );
        assert_eq!(
            split_https_url("https://h").unwrap(),
            ("h".into(), 443, "/".into())
        );
    }
}
