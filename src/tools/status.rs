//! `herd status`: asks every server of the configuration how it is, and prints one table:
//! whether it is up, its records and their digest (and whether every server's agrees), its
//! links up of those configured, its clients connected, and its Places errors. It exits 0 when
//! every server is up and every store agrees, 1 otherwise, for scripts and systemd.
//!
//! Up means its port takes a connection and, when it has an admin endpoint, the endpoint
//! answers: the kernel accepts connections for a server that is stopped (SIGSTOP) or stuck, its
//! loop does not answer. A server with no admin endpoint can say nothing of its store, so the
//! stores cannot be known to agree. A name that does not resolve is a server that is not up.
//!
//! A server's figures come from its admin endpoint's `/status`, at the address the server writes
//! beside its log while it runs (`<log_dir>/<NAME>.admin`: also for a herd of `herd up`, which
//! gives each server an endpoint on a free port), else at the `admin` address of its
//! `[[server]]` table. Plain blocking I/O, like the client commands.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::config::{resolve, Config, ServerConfig};

/// How long a server may take to connect and to answer.
const WAIT: Duration = Duration::from_secs(2);

/// One server's answers.
#[derive(Debug, Default)]
struct Seen {
    up: bool,
    status: Option<serde_json::Value>,
    why: Option<String>,
}

/// Asks every server; prints the table; returns the exit code.
pub fn run(config: &Config) -> Result<i32, String> {
    let mut rows = Vec::new();
    for server in &config.servers {
        let (addr, seen) = match resolve(&server.host, Some(server.port)) {
            Ok(addr) => (addr.to_string(), ask(config, server, addr)),
            Err(why) => {
                let addr = format!("{}:{}", server.host, server.port);
                let why = Some(why);
                (
                    addr,
                    Seen {
                        why,
                        ..Seen::default()
                    },
                )
            }
        };
        rows.push((server, addr, seen));
    }
    let digests: Vec<&str> = rows
        .iter()
        .filter_map(|(_, _, seen)| seen.status.as_ref()?.get("digest")?.as_str())
        .collect();
    let agree = digests.len() == rows.len() && digests.windows(2).all(|w| w[0] == w[1]);
    println!(
        "{:<12} {:<22} {:<5} {:>9} {:<17} {:>6} {:>8} {:>7}",
        "server", "address", "up", "records", "digest", "links", "clients", "places"
    );
    for (server, addr, seen) in &rows {
        let field = |key: &str| {
            (seen.status.as_ref())
                .and_then(|s| s.get(key))
                .map_or("-".to_owned(), |v| {
                    v.to_string().trim_matches('"').to_owned()
                })
        };
        let links = match (&seen.status, field("links_up"), field("links")) {
            (Some(_), up, all) => format!("{up}/{all}"),
            (None, _, _) => "-".into(),
        };
        println!(
            "{:<12} {:<22} {:<5} {:>9} {:<17} {:>6} {:>8} {:>7}{}",
            server.name,
            addr,
            if seen.up { "yes" } else { "no" },
            field("records"),
            field("digest"),
            links,
            field("clients"),
            field("places_errors"),
            seen.why
                .as_ref()
                .map_or(String::new(), |w| format!("  ({w})"))
        );
    }
    let all_up = rows.iter().all(|(_, _, seen)| seen.up);
    let all_said = digests.len() == rows.len();
    println!(
        "{}; {}",
        if all_up {
            "every server is up"
        } else {
            "not every server is up"
        },
        match (agree, all_said) {
            (true, _) => "every store agrees",
            (false, true) => "the stores differ",
            (false, false) => "not every server said what its store holds",
        }
    );
    Ok(if all_up && agree { 0 } else { 1 })
}

/// Whether `server` is up at `addr` (see the module's docs), and its `/status`.
fn ask(config: &Config, server: &ServerConfig, addr: SocketAddr) -> Seen {
    let status = ask_admin(config, server);
    // Its port is tried after its count of clients was read, so the try is not counted.
    let port_open = TcpStream::connect_timeout(&addr, WAIT).is_ok();
    match status {
        Ok(status) => Seen {
            up: port_open,
            status: Some(status),
            why: None,
        },
        Err(Unanswered::NoEndpoint) => Seen {
            up: port_open,
            status: None,
            why: Some("no admin endpoint configured: its store is not known".into()),
        },
        Err(Unanswered::NoAnswer(why)) => Seen {
            up: false,
            status: None,
            why: Some(why),
        },
    }
}

/// Why a server's `/status` was not read.
enum Unanswered {
    /// It has no admin endpoint to ask.
    NoEndpoint,
    /// Its endpoint did not answer, or not with a status.
    NoAnswer(String),
}

/// `server`'s `/status`, from its admin endpoint.
fn ask_admin(config: &Config, server: &ServerConfig) -> Result<serde_json::Value, Unanswered> {
    // The file holds the address the server bound (the configuration may ask for port 0).
    let written = std::fs::read_to_string(config.log_dir.join(format!("{}.admin", server.name)))
        .ok()
        .map(|text| text.trim().to_owned());
    let admin = written.or_else(|| server.admin.clone());
    match admin {
        Some(admin) => get_status(&admin).map_err(Unanswered::NoAnswer),
        None => Err(Unanswered::NoEndpoint),
    }
}

/// `GET /status` at `admin` (`HOST:PORT`), parsed.
fn get_status(admin: &str) -> Result<serde_json::Value, String> {
    let addr = resolve(admin, None)?;
    let mut stream = TcpStream::connect_timeout(&addr, WAIT)
        .map_err(|e| format!("admin endpoint {addr}: {e}"))?;
    let io = |e: std::io::Error| format!("admin endpoint {addr}: {e}");
    stream.set_read_timeout(Some(WAIT)).map_err(io)?;
    stream
        .write_all(b"GET /status HTTP/1.1\r\nHost: herd\r\nConnection: close\r\n\r\n")
        .map_err(io)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(io)?;
    let body_at = memchr::memmem::find(&response, b"\r\n\r\n")
        .ok_or_else(|| format!("admin endpoint {addr}: not an HTTP response"))?;
    serde_json::from_slice(&response[body_at + 4..])
        .map_err(|e| format!("admin endpoint {addr}: {e}"))
}
