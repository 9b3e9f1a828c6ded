//! Herds: who is in one (a [`Member`] a server, the 2023 herd and the Goloman herd of
//! docs/protocol.md section 1), the one configuration writer ([`write_config`]), the one way to
//! start servers from it ([`Herd::build`]), and what a running herd shows of itself: the store
//! each server dumps on SIGUSR1, and its log, line by line and stamp by stamp.
//!
//! Every wait is bounded and panics with what was seen: the lines a log ended with, or how the
//! dumps differ.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::fake_places::toml_basic;
use super::netns::Net;
use super::{eventually, spawn_server_in, ServerProc, TestDir};

// ---------------------------------------------------------------------------------------------
// Members and configurations

/// One `[[server]]` of a test configuration.
#[derive(Clone, Copy, Debug)]
pub struct Member {
    pub name: &'static str,
    /// Where neighbours dial it.
    pub port: u16,
    /// The address neighbours dial it at, when not the configuration's default, 127.0.0.1 (a
    /// host of a [`Net`]).
    pub host: Option<Ipv4Addr>,
    /// Where it listens, on 127.0.0.1, when not at `port` (a proxy in between).
    pub listen: Option<u16>,
    pub neighbors: &'static [&'static str],
    /// Whether it runs an admin endpoint (on a free port of 127.0.0.1: [`admin_addr`] finds it).
    pub admin: bool,
}

/// A member on 127.0.0.1 that listens where it is dialled.
pub const fn member(name: &'static str, port: u16, neighbors: &'static [&'static str]) -> Member {
    Member {
        name,
        port,
        host: None,
        listen: None,
        neighbors,
        admin: false,
    }
}

impl Member {
    /// Dialled at `host` (and listening there: the configuration's `listen` defaults to it).
    pub const fn at(self, host: Ipv4Addr) -> Member {
        Member {
            host: Some(host),
            ..self
        }
    }

    /// With an admin endpoint on a free port.
    pub const fn with_admin(self) -> Member {
        Member {
            admin: true,
            ..self
        }
    }

    /// Listening on 127.0.0.1:`port`, while neighbours dial it at its own port.
    pub const fn listening_on(self, port: u16) -> Member {
        Member {
            listen: Some(port),
            ..self
        }
    }
}

/// The 2023 herd of docs/protocol.md section 1 on the given five ports.
pub fn herd_2023(p: &[u16]) -> Vec<Member> {
    vec![
        member("Bailey", p[0], &["Bona", "Campbell"]),
        member("Bona", p[1], &["Bailey", "Campbell", "Clark"]),
        member("Campbell", p[2], &["Bailey", "Bona", "Jaquez"]),
        member("Clark", p[3], &["Bona", "Jaquez"]),
        member("Jaquez", p[4], &["Campbell", "Clark"]),
    ]
}

/// The Goloman herd of earlier years (docs/protocol.md section 1) on the given five ports.
pub fn herd_goloman(p: &[u16]) -> Vec<Member> {
    vec![
        member("Goloman", p[0], &["Hands", "Holiday", "Wilkes"]),
        member("Hands", p[1], &["Goloman", "Wilkes"]),
        member("Holiday", p[2], &["Goloman", "Welsh", "Wilkes"]),
        member("Welsh", p[3], &["Holiday"]),
        member("Wilkes", p[4], &["Goloman", "Hands", "Holiday"]),
    ]
}

/// "Bailey" alone, on port 0 (any free port: nobody dials it).
pub fn lone_bailey() -> Vec<Member> {
    vec![member("Bailey", 0, &[])]
}

/// Bailey and Bona, each the other's neighbour, on two ports free a moment ago: for
/// [`HerdBuilder::start_retrying`], which calls it again for new ports when one was taken.
pub fn bailey_and_bona_on_free_ports() -> Vec<Member> {
    let p = free_ports(2);
    vec![
        member("Bailey", p[0], &["Bona"]),
        member("Bona", p[1], &["Bailey"]),
    ]
}

/// Ports that were free a moment ago: `n` listeners are bound at once (so the ports differ),
/// read, and closed. Another process may take one in between: [`HerdBuilder::start_retrying`]
/// makes a herd again on new ports when that happens.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("listener has no address").port())
        .collect()
}

/// Writes `<dir>/herd.toml` with `log_dir = "logs"`, stores in memory only (`data_dir = ""`),
/// one `[[server]]` table per member, and `extra` appended verbatim (a `[places]` or `[limits]`
/// table, say). Returns its path.
pub fn write_config(dir: &TestDir, members: &[Member], extra: &str) -> PathBuf {
    write_config_with(dir, members, MEMORY_ONLY, extra)
}

/// The top-level keys of a test's configuration by default: the store in memory only, so that
/// a restarted server starts empty unless its test asks for the store on disk.
pub const MEMORY_ONLY: &str = "data_dir = \"\"\n";

/// [`write_config`] with `top`, the top-level keys (`data_dir = "data"`, say), in place of
/// [`MEMORY_ONLY`].
pub fn write_config_with(dir: &TestDir, members: &[Member], top: &str, extra: &str) -> PathBuf {
    let mut text = String::from("# Written by the integration tests.\nlog_dir = \"logs\"\n");
    text.push_str(top);
    for m in members {
        text.push_str(&format!("\n[[server]]\nname = {}\n", toml_basic(m.name)));
        if let Some(host) = m.host {
            text.push_str(&format!("host = {}\n", toml_basic(&host.to_string())));
        }
        text.push_str(&format!("port = {}\n", m.port));
        if let Some(listen) = m.listen {
            let listen = format!("127.0.0.1:{listen}");
            text.push_str(&format!("listen = {}\n", toml_basic(&listen)));
        }
        let neighbors: Vec<String> = m.neighbors.iter().map(|n| toml_basic(n)).collect();
        text.push_str(&format!("neighbors = [{}]\n", neighbors.join(", ")));
        if m.admin {
            text.push_str("admin = \"127.0.0.1:0\"\n");
        }
    }
    if !extra.is_empty() {
        text.push('\n');
        text.push_str(extra);
        if !extra.ends_with('\n') {
            text.push('\n');
        }
    }
    let path = dir.join("herd.toml");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

// ---------------------------------------------------------------------------------------------
// Running herds

/// The environment of every server of a herd (see [`super::SERVER_ENV`]).
pub type Env = &'static [(&'static str, &'static str)];

/// How long [`Herd::wait_linked`] waits for each line it looks for.
pub const LINK_WAIT: Duration = Duration::from_secs(20);

/// How a herd is started, before its members are known: see [`Herd::build`].
pub struct HerdBuilder<'a> {
    tag: &'a str,
    env: Env,
    top: &'a str,
    extra: &'a str,
    only: &'a [&'a str],
    net: Option<Net>,
}

/// Running servers of one configuration, written by [`write_config`] in a directory of their
/// own. Dropping it kills the servers, then removes their network (if any) and their directory
/// (the fields drop in this order).
pub struct Herd {
    pub servers: Vec<ServerProc>,
    pub config: PathBuf,
    pub members: Vec<Member>,
    env: Env,
    net: Option<Net>,
    _dir: TestDir,
}

impl Herd {
    /// A herd in a new directory named after `tag`. By default every member runs, on loopback,
    /// with none of the variables the server reads set, and the configuration has no tail.
    pub fn build(tag: &str) -> HerdBuilder<'_> {
        HerdBuilder {
            tag,
            env: &[],
            top: MEMORY_ONLY,
            extra: "",
            only: &[],
            net: None,
        }
    }

    pub fn index(&self, name: &str) -> usize {
        self.servers
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("no server {name} in this herd"))
    }

    pub fn get(&self, name: &str) -> &ServerProc {
        &self.servers[self.index(name)]
    }

    pub fn get_mut(&mut self, name: &str) -> &mut ServerProc {
        let i = self.index(name);
        &mut self.servers[i]
    }

    pub fn all(&self) -> Vec<&ServerProc> {
        self.servers.iter().collect()
    }

    /// The network the herd runs on; panics for a herd on loopback.
    pub fn net(&self) -> &Net {
        self.net.as_ref().expect("a herd on a network of hosts")
    }

    /// Starts `name` again, on the same configuration and in the same host (its old process
    /// must be gone).
    pub fn restart(&mut self, name: &str) {
        let i = self.index(name);
        let host = self.net.as_ref().map(|net| (net, name));
        self.servers[i] = spawn_server_in(host, &self.config, name, self.env);
    }

    /// Waits until every running server has dialled each running neighbour and accepted its
    /// link: `link NEIGHBOUR up` and `is peer NEIGHBOUR` in its log.
    pub fn wait_linked(&self) {
        for m in &self.members {
            let Some(server) = self.servers.iter().find(|s| s.name == m.name) else {
                continue;
            };
            for n in m.neighbors {
                if !self.servers.iter().any(|s| s.name == *n) {
                    continue;
                }
                for needle in [format!("link {n} up"), format!("is peer {n}")] {
                    assert!(
                        server.wait_log(&needle, LINK_WAIT),
                        "{}'s log has no {needle:?} within {LINK_WAIT:?}:\n{}",
                        m.name,
                        server.log()
                    );
                }
            }
        }
    }
}

impl<'a> HerdBuilder<'a> {
    /// The servers' environment.
    pub fn env(self, env: Env) -> Self {
        HerdBuilder { env, ..self }
    }

    /// Appended to the configuration (see [`write_config`]).
    pub fn extra(self, extra: &'a str) -> Self {
        HerdBuilder { extra, ..self }
    }

    /// The configuration's top-level keys, in place of [`MEMORY_ONLY`] (see
    /// [`write_config_with`]).
    pub fn top(self, top: &'a str) -> Self {
        HerdBuilder { top, ..self }
    }

    /// Only these members run; the others are in the configuration only (a neighbour the test
    /// plays, or one that is down).
    pub fn only(self, names: &'a [&'a str]) -> Self {
        HerdBuilder {
            only: names,
            ..self
        }
    }

    /// Each member runs inside the host of `net` named after it, and the herd keeps `net`.
    pub fn on(self, net: Net) -> Self {
        HerdBuilder {
            net: Some(net),
            ..self
        }
    }

    /// Writes the configuration of `members` and starts them, once: their ports cannot be taken
    /// meanwhile (port 0, a host of its own, or a port a listener of the test holds).
    pub fn start(self, members: Vec<Member>) -> Herd {
        let mut members = Some(members);
        self.try_start(1, || (members.take().expect("one attempt"), ()))
            .0
    }

    /// Writes the configuration of the members `make` returns and starts them. Ports from
    /// [`free_ports`] can be taken by another test before a server binds them, and a server that
    /// loses its port exits; so a herd that fails to start is made again by `make`, in a new
    /// directory on new ports, twice at most. A server that never starts still fails the test.
    pub fn start_retrying(self, mut make: impl FnMut() -> Vec<Member>) -> Herd {
        self.try_start(3, || (make(), ())).0
    }

    /// [`HerdBuilder::start_retrying`], where `make` also returns what the test needs beside the
    /// herd on each attempt (proxies, a listener), and the attempt that started is returned with
    /// the herd.
    pub fn start_retrying_with<T>(self, make: impl FnMut() -> (Vec<Member>, T)) -> (Herd, T) {
        self.try_start(3, make)
    }

    fn try_start<T>(
        self,
        attempts: usize,
        mut make: impl FnMut() -> (Vec<Member>, T),
    ) -> (Herd, T) {
        let mut attempt = 1;
        loop {
            let dir = TestDir::new(self.tag);
            let (members, state) = make();
            let config = write_config_with(&dir, &members, self.top, self.extra);
            let started = panic::catch_unwind(AssertUnwindSafe(|| {
                members
                    .iter()
                    .filter(|m| self.only.is_empty() || self.only.contains(&m.name))
                    .map(|m| {
                        let host = self.net.as_ref().map(|net| (net, m.name));
                        spawn_server_in(host, &config, m.name, self.env)
                    })
                    .collect::<Vec<_>>()
            }));
            match started {
                Ok(servers) => {
                    let herd = Herd {
                        servers,
                        config,
                        members,
                        env: self.env,
                        net: self.net,
                        _dir: dir,
                    };
                    return (herd, state);
                }
                Err(_) if attempt < attempts => attempt += 1,
                Err(failure) => panic::resume_unwind(failure),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Store dumps

/// How long `dump_store` waits for the server to write its store.
pub const DUMP_TIMEOUT: Duration = Duration::from_secs(10);

impl ServerProc {
    /// `<log_dir>/<NAME>.store`, the file SIGUSR1 makes the server write.
    pub fn store_path(&self) -> PathBuf {
        self.log_path.with_file_name(format!("{}.store", self.name))
    }
}

/// The server's store as it writes it on SIGUSR1: `# N records, digest HEX`, then every stored
/// AT line, sorted. The old file is removed first and the server writes the new one beside and
/// renames it into place, so the file that appears is this request's, whole. Panics if it does
/// not appear within 10 s (a stopped or dead server).
pub fn dump_store(server: &ServerProc) -> String {
    let path = server.store_path();
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => panic!("cannot remove {}: {e}", path.display()),
    }
    server.signal(libc::SIGUSR1);
    let mut text = None;
    let written = eventually(DUMP_TIMEOUT, || {
        text = std::fs::read(&path).ok();
        text.is_some()
    });
    assert!(
        written,
        "{} did not write {} within {DUMP_TIMEOUT:?} of SIGUSR1",
        server.name,
        path.display()
    );
    String::from_utf8_lossy(&text.expect("read")).into_owned()
}

/// The records of a dump: every line but the `# N records, digest HEX` header.
pub fn records(dump: &str) -> BTreeSet<String> {
    dump.lines().skip(1).map(str::to_owned).collect()
}

/// The clients of every record `server` holds.
pub fn stored_clients(server: &ServerProc) -> BTreeSet<String> {
    records(&dump_store(server))
        .iter()
        .filter_map(|r| r.split(' ').nth(3).map(str::to_owned))
        .collect()
}

/// Waits until `server` holds `record`.
pub fn await_stored(server: &ServerProc, record: &str) {
    let held = eventually(Duration::from_secs(10), || {
        records(&dump_store(server)).contains(record)
    });
    assert!(held, "{} never stored {record:?}", server.name);
}

/// What differs between dumps (and from `expected`), briefly, for a failure message.
pub fn describe_dumps(dumps: &[(String, String)], expected: Option<&BTreeSet<String>>) -> String {
    let reference = match expected {
        Some(e) => e.clone(),
        None => dumps.iter().flat_map(|(_, d)| records(d)).collect(),
    };
    let mut out = format!(
        "{} ({} records):\n",
        if expected.is_some() {
            "expected"
        } else {
            "the union"
        },
        reference.len()
    );
    for (name, dump) in dumps {
        let held = records(dump);
        let missing: Vec<&String> = reference.difference(&held).take(3).collect();
        let extra: Vec<&String> = held.difference(&reference).take(3).collect();
        out.push_str(&format!(
            "  {name}: {:?}; missing {} (e.g. {missing:?}); extra {} (e.g. {extra:?})\n",
            dump.lines().next().unwrap_or(""),
            reference.difference(&held).count(),
            held.difference(&reference).count(),
        ));
    }
    out
}

/// Dumps every server until all dumps are the same (and hold exactly `expected`, if given).
/// Returns the time from `since` to the end of the first round of dumps that showed it (an
/// upper bound of the time the herd took); panics after `limit`.
pub fn await_converged(
    servers: &[&ServerProc],
    expected: Option<&BTreeSet<String>>,
    since: Instant,
    limit: Duration,
    what: &str,
) -> Duration {
    loop {
        let dumps: Vec<(String, String)> = servers
            .iter()
            .map(|s| (s.name.clone(), dump_store(s)))
            .collect();
        let same = dumps.windows(2).all(|w| w[0].1 == w[1].1);
        let right = match expected {
            Some(e) => records(&dumps[0].1) == *e,
            None => true,
        };
        if same && right {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < limit,
            "{what}: the stores are not the same within {limit:?} — {}",
            describe_dumps(&dumps, expected)
        );
        thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// Logs

/// The first line of `server`'s log from byte `from` on that contains `needle`, and the byte
/// just past that line.
fn find_log_line(server: &ServerProc, needle: &str, from: usize) -> Option<(String, usize)> {
    let log = server.log_bytes();
    let from = from.min(log.len());
    let mut start = from;
    for line in log[from..].split_inclusive(|&b| b == b'\n') {
        let end = start + line.len();
        let text = String::from_utf8_lossy(line);
        if text.contains(needle) {
            return Some((text.trim_end_matches('\n').to_owned(), end));
        }
        start = end;
    }
    None
}

/// Polls `server`'s log from byte `from` until a line contains `needle`, for `limit` at most;
/// returns that line and the byte just past it.
fn await_log(server: &ServerProc, needle: &str, from: usize, limit: Duration) -> (String, usize) {
    let mut found = None;
    let seen = eventually(limit, || {
        found = find_log_line(server, needle, from);
        found.is_some()
    });
    if !seen {
        let log = server.log_bytes();
        let text = String::from_utf8_lossy(&log[from.min(log.len())..]).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        panic!(
            "{}'s log has no {needle:?} after byte {from} within {limit:?}; its last lines:\n{}",
            server.name,
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    }
    found.expect("seen")
}

/// Polls `server`'s log from byte `from` until a line contains `needle`; returns that line.
pub fn await_log_line(server: &ServerProc, needle: &str, from: usize, limit: Duration) -> String {
    await_log(server, needle, from, limit).0
}

/// [`await_log_line`], returning where that line ends instead: where to look for what comes
/// after it.
pub fn await_log_past(server: &ServerProc, needle: &str, from: usize, limit: Duration) -> usize {
    await_log(server, needle, from, limit).1
}

/// The connection id (`cN`) the server gave the connection from `local`.
pub fn conn_id(server: &ServerProc, local: SocketAddr) -> String {
    let line = await_log_line(
        server,
        &format!("accepted from {local}"),
        0,
        Duration::from_secs(10),
    );
    line.split(' ')
        .nth(1)
        .expect("STAMP cN accepted")
        .to_owned()
}

/// The time stamp that starts a log line: `YYYY-MM-DDTHH:MM:SS.uuuuuuZ` (RFC 3339, UTC).
pub fn log_stamp(line: &str) -> SystemTime {
    fn fail<T>(line: &str) -> T {
        panic!("a log line without a time stamp: {line:?}")
    }
    let bad = || fail(line);
    let stamp = line.split(' ').next().unwrap_or_default();
    let b = stamp.as_bytes();
    if b.len() != 27 || b[4] != b'-' || b[10] != b'T' || b[19] != b'.' || b[26] != b'Z' {
        fail::<()>(line);
    }
    let num =
        |r: std::ops::Range<usize>| -> i64 { stamp[r].parse().unwrap_or_else(|_| fail(line)) };
    let (y, m, d) = (num(0..4), num(5..7), num(8..10));
    let (hh, mm, ss, us) = (num(11..13), num(14..16), num(17..19), num(20..26));
    // Days from civil, after Howard Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    UNIX_EPOCH
        + Duration::from_secs(u64::try_from(secs).unwrap_or_else(|_| bad()))
        + Duration::from_micros(us as u64)
}

/// `later - earlier`, negative as a negative number of seconds.
pub fn seconds_between(earlier: SystemTime, later: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

/// The API key `key` is in no log line of `servers` and in nothing they printed; each wrote a
/// log.
pub fn assert_key_absent(servers: &[&ServerProc], key: &str) {
    assert_absent(servers, key, "the API key");
}

/// `secret` (`what`: "the API key", "the herd secret") is in no log line of `servers` and in
/// nothing they printed; each wrote a log.
pub fn assert_absent(servers: &[&ServerProc], secret: &str, what: &str) {
    for s in servers {
        let log = s.log();
        assert!(
            !log.is_empty(),
            "{} wrote no log at {}",
            s.name,
            s.log_path.display()
        );
        if let Some(line) = log.lines().find(|l| l.contains(secret)) {
            panic!("{}'s log shows {what}: {line}", s.name);
        }
        assert!(
            !s.stdout().contains(secret),
            "{} printed {what}: {}",
            s.name,
            s.stdout()
        );
    }
}

/// The address of `server`'s admin endpoint, from the file it writes beside its log.
pub fn admin_addr(server: &ServerProc) -> SocketAddr {
    let path = server
        .log_path
        .with_file_name(format!("{}.admin", server.name));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "no admin endpoint for {}: {}: {e}",
            server.name,
            path.display()
        )
    });
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {text:?}: {e}", path.display()))
}

/// `GET PATH` at `addr` (HTTP/1.1, one request, the connection closed after): the status code
/// and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a read timeout");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .expect("send the request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("read the response");
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response from {addr}: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_owned())
}
