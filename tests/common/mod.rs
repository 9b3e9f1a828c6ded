//! The harness every integration test shares. Here: temporary directories, a `herd serve`
//! child process that never outlives its test, and blocking TCP clients that speak the protocol
//! in exact bytes. Beside it, each in a module of its own because each is a thing of its own:
//!
//! - `herds`: the members of a herd, the one configuration writer, the one herd builder, and
//!   what a running herd shows (store dumps, log lines and their time stamps);
//! - `load`: load the test applies while it breaks something (steady updates, timed pings, a
//!   `herd load` child) and the memory it costs;
//! - `links`: what the test puts on or at the end of a peer link (a proxy that blackholes it,
//!   a neighbour that never reads);
//! - `netns`: hosts on network namespaces, for tests that need real addresses;
//! - `fake_places`: a Google Places the test scripts (the bench uses it too);
//! - `traced`: `herd serve --trace`, for tests that assert what happened in which turn;
//! - `up`: `herd up` as a child that never outlives its test.
//!
//! Every wait here is bounded: a server that does not come up, a reply that never arrives or a
//! process that ignores SIGTERM makes the test panic with what was seen so far, never hang.
#![allow(dead_code)]

pub mod fake_places;
pub mod herds;
pub mod links;
pub mod load;
pub mod netns;
pub mod traced;
pub mod up;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a client waits for bytes before the test fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `spawn_server` waits for the "listening" line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `terminate` waits for the process to exit after the signal.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The poll interval of `eventually` and `wait_log`.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------
// Files

/// A fresh directory under the system temporary directory, removed with everything in it when
/// dropped. The name holds the test process id, a counter and a tag, so parallel tests and
/// parallel test binaries never share one.
pub struct TestDir {
    pub path: PathBuf,
}

static DIR_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Removes, once per test process, the directories of this naming left by test processes that
/// no longer run: a test killed outright (SIGKILL, a timeout) never drops its directories, and a
/// long storm's logs are large.
fn remove_leftover_dirs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("herd-test-")) else {
                continue;
            };
            let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
}

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        remove_leftover_dirs();
        let tag: String = tag
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let n = DIR_COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("herd-test-{}-{n}-{tag}", std::process::id()));
        // A leftover from an earlier run with a recycled pid would otherwise leak into this one.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create test directory {}: {e}", path.display()));
        TestDir { path }
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Reads `tests/data/places/<name>`, a Google Places sample answer (made by `make_places.py`).
pub fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/places")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Server processes

/// A running `herd serve NAME`. Dropping it kills the process and reaps it, so no server is
/// left behind even when the test panics.
pub struct ServerProc {
    pub name: String,
    pub addr: SocketAddr,
    pub log_path: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
    stdout: Arc<Mutex<Vec<u8>>>,
}

/// Parses `NAME listening on HOST:PORT, logging to PATH`.
fn parse_listening_line(line: &str, name: &str, cwd: &Path) -> Option<(SocketAddr, PathBuf)> {
    let rest = line.trim_end_matches(['\n', '\r']).strip_prefix(name)?;
    let rest = rest.strip_prefix(" listening on ")?;
    let (addr, log) = rest.split_once(", logging to ")?;
    let addr = match addr.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => addr.to_socket_addrs().ok()?.next()?,
    };
    Some((addr, cwd.join(log)))
}

/// The command that runs one server, before its NAME: `herd serve`, or, with
/// `HERD_TEST_SERVER=prototype`, the Python asyncio prototype the benchmark measures the herd
/// against, and with `HERD_TEST_SERVER=node`, the Node.js prototype of the same protocol, so
/// that the protocol tests check the opponents too
/// (`HERD_TEST_SERVER=prototype cargo test --release --test protocol`, or `=node`).
pub fn server_command() -> Command {
    let prototypes = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/prototype");
    match std::env::var("HERD_TEST_SERVER").as_deref() {
        Ok("prototype") => {
            let mut command = Command::new("python3");
            command.arg(prototypes.join("herd_prototype.py"));
            command
        }
        Ok("node") => {
            let mut command = Command::new("node");
            command.arg(prototypes.join("herd_prototype.js"));
            command
        }
        _ => {
            let mut command = Command::new(env!("CARGO_BIN_EXE_herd"));
            command.arg("serve");
            command
        }
    }
}

/// The line a server writes when SIGTERM or SIGINT stops it, once everything else is written:
/// `server NAME stopped`, the herd's last log line; the prototypes (see [`server_command`]) say
/// `stopping on signal`.
pub fn stopped_line(name: &str) -> String {
    match std::env::var("HERD_TEST_SERVER").as_deref() {
        Ok("prototype" | "node") => "stopping on signal".to_owned(),
        _ => format!("server {name} stopped"),
    }
}

/// The log of `server`, stopped by a signal, ends with the line written at the very end of the
/// shutdown ([`stopped_line`]): the log was written out when the process stopped, not only
/// turn by turn before. (A prototype's stop line need not be its last.)
pub fn assert_log_ends_stopped(server: &ServerProc) {
    let log = server.log();
    let want = stopped_line(&server.name);
    let herd = !matches!(
        std::env::var("HERD_TEST_SERVER").as_deref(),
        Ok("prototype" | "node")
    );
    let ok = match herd {
        true => log.lines().last().is_some_and(|l| l.ends_with(&want)),
        false => log.contains(&want),
    };
    let tail: Vec<&str> = log.lines().collect();
    assert!(
        ok,
        "{}'s log does not end with {want:?}; its last lines:\n{}",
        server.name,
        tail[tail.len().saturating_sub(5)..].join("\n")
    );
}

/// Spawns `herd serve NAME --config PATH` with the directory of the configuration as its
/// working directory, `env` added to its environment (and each of [`SERVER_ENV`] it does not
/// set removed), stdin null, stdout piped and drained by a thread, stderr inherited. Returns
/// once the server has printed its "listening" line; panics after 10 s without one.
pub fn spawn_server(config: &Path, name: &str, env: &[(&str, &str)]) -> ServerProc {
    spawn_server_in(None, config, name, env)
}

/// Every environment variable the server reads: the harness clears each one a test does not
/// set, so that the environment the tests run in cannot leak into a server.
pub const SERVER_ENV: [&str; 3] = ["GOOGLE_PLACES_API_KEY", "HERD_SECRET", "RUST_LOG"];

/// [`spawn_server`], inside host `host` of `net` when one is given.
pub fn spawn_server_in(
    host: Option<(&netns::Net, &str)>,
    config: &Path,
    name: &str,
    env: &[(&str, &str)],
) -> ServerProc {
    let cwd = config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut command = server_command();
    command.arg(name).arg("--config").arg(config);
    if let Some((net, host)) = host {
        command = net.command_in(host, &command);
    }
    command
        .current_dir(&cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for var in SERVER_ENV {
        if !env.iter().any(|(k, _)| *k == var) {
            command.env_remove(var);
        }
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", server_command()));

    let stdout_pipe = child.stdout.take().expect("stdout is piped");
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    {
        let stdout = Arc::clone(&stdout);
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout_pipe);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        stdout.lock().unwrap().extend_from_slice(&line);
                        // The receiver is gone once the server is up: keep draining anyway.
                        let _ = lines_tx.send(String::from_utf8_lossy(&line).into_owned());
                    }
                }
            }
        });
    }

    let mut server = ServerProc {
        name: name.to_string(),
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        log_path: PathBuf::new(),
        child,
        status: None,
        stdout,
    };
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => {
                if let Some((addr, log_path)) = parse_listening_line(&line, name, &cwd) {
                    server.addr = addr;
                    server.log_path = log_path;
                    return server;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                server.kill();
                panic!(
                    "{name} did not print \"{name} listening on HOST:PORT, logging to PATH\" \
                     within {STARTUP_TIMEOUT:?}; its stdout: {:?}",
                    server.stdout()
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // Stdout closed: the process exited (or closed stdout) before it was up.
                let status = server.child.wait_timeout_or_kill(Duration::from_secs(2));
                server.status = Some(status);
                panic!(
                    "{name} closed its stdout before printing its listening line \
                     ({status}); its stdout: {:?}",
                    server.stdout()
                );
            }
        }
    }
}

trait WaitTimeout {
    fn wait_timeout_or_kill(&mut self, timeout: Duration) -> ExitStatus;
}

impl WaitTimeout for Child {
    /// Waits up to `timeout` for the process to exit, then kills it; returns its status.
    fn wait_timeout_or_kill(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL_INTERVAL),
                _ => {
                    let _ = self.kill();
                    return self.wait().expect("cannot wait for a killed child");
                }
            }
        }
    }
}

impl ServerProc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`, `libc::SIGUSR1`) and returns at once. Does nothing
    /// once the process has been reaped (its pid may then belong to another process).
    pub fn signal(&self, signal: libc::c_int) {
        if self.status.is_some() {
            return;
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the child is not reaped yet, so
        // its pid cannot have been recycled.
        unsafe {
            libc::kill(pid, signal);
        }
    }

    /// SIGKILL, then reap. Does nothing if the process was already reaped.
    pub fn kill(&mut self) {
        if self.status.is_some() {
            return;
        }
        let _ = self.child.kill();
        if let Ok(status) = self.child.wait() {
            self.status = Some(status);
        }
    }

    /// SIGTERM, then wait at most 10 s for the exit (else SIGKILL and panic).
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGTERM)
    }

    /// Sends `signal` (e.g. `libc::SIGINT`), then waits at most 10 s for the exit (else SIGKILL
    /// and panic). Returns the exit status; if the process was already reaped, its old status.
    pub fn signal_and_wait(&mut self, signal: libc::c_int) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        if let Ok(Some(status)) = self.child.try_wait() {
            self.status = Some(status);
            return status;
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the child is not reaped yet, so
        // its pid cannot have been recycled.
        unsafe {
            libc::kill(pid, signal);
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.status = Some(status);
                    return status;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL_INTERVAL),
                Ok(None) => {
                    self.kill();
                    panic!(
                        "{} did not exit within {EXIT_TIMEOUT:?} of signal {signal}",
                        self.name
                    );
                }
                Err(e) => panic!("cannot wait for {}: {e}", self.name),
            }
        }
    }

    /// The exit status, if the process has exited (reaps it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
            }
        }
        self.status
    }

    /// Everything the server printed on stdout so far (lossy UTF-8).
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    /// The raw bytes of the log file; empty if it does not exist (yet).
    pub fn log_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.log_path).unwrap_or_default()
    }

    /// The log file as lossy UTF-8; "" if it does not exist (yet).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.log_bytes()).into_owned()
    }

    /// Polls the log file every 20 ms until it contains `needle` or `timeout` passes.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        eventually(timeout, || self.log().contains(needle))
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    with_timeouts(stream)
}

/// `stream`, whose reads and writes give up after [`READ_TIMEOUT`].
fn with_timeouts(stream: TcpStream) -> TcpStream {
    stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .expect("cannot set read timeout");
    stream
        .set_write_timeout(Some(READ_TIMEOUT))
        .expect("cannot set write timeout");
    stream
}

/// Reads until end of stream. A connection reset counts as the end: the server closed it.
fn read_until_eof(stream: &mut TcpStream, out: &mut Vec<u8>, what: &str) {
    let mut chunk = [0u8; 65536];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => panic!(
                "{what}: no end of stream within {READ_TIMEOUT:?}; received so far: {}",
                show(out)
            ),
            Err(e) => panic!("{what}: read failed: {e}; received so far: {}", show(out)),
        }
    }
}

/// Connects, writes all of `bytes`, half-closes, and returns everything read up to the end of
/// the stream (each read waits at most 15 s).
pub fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = connect(addr);
    stream
        .write_all(bytes)
        .unwrap_or_else(|e| panic!("cannot send {} to {addr}: {e}", show(bytes)));
    stream
        .shutdown(Shutdown::Write)
        .unwrap_or_else(|e| panic!("cannot half-close the connection to {addr}: {e}"));
    let mut out = Vec::new();
    read_until_eof(&mut stream, &mut out, &format!("reply to {}", show(bytes)));
    out
}

/// A blocking client connection with its own read buffer (read timeout 15 s, TCP_NODELAY).
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = connect(addr);
        stream.set_nodelay(true).expect("cannot set TCP_NODELAY");
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// A client connection whose reads give up after 5 s.
    pub fn connect_quick(addr: SocketAddr) -> Client {
        let c = Client::connect(addr);
        c.stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("cannot set a read timeout");
        c
    }

    /// The next connection `listener` accepts (a server dialling the test), with the same
    /// timeouts as a connection the test dials.
    pub fn accept(listener: &TcpListener) -> Client {
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let mut accepted = None;
        eventually(READ_TIMEOUT, || {
            accepted = listener.accept().ok();
            accepted.is_some()
        });
        let Some((stream, _)) = accepted else {
            panic!("nothing dialled the test within {READ_TIMEOUT:?}");
        };
        stream.set_nonblocking(false).expect("a blocking stream");
        Client {
            stream: with_timeouts(stream),
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("cannot send {}: {e}", show(bytes)));
    }

    /// Bytes received but not yet returned by a read method.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Reads one more chunk into the buffer; panics on end of stream or timeout.
    fn fill(&mut self, what: &str) {
        let mut chunk = [0u8; 65536];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!(
                    "end of stream while waiting for {what}; unread bytes: {}",
                    show(&self.buf)
                ),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!(
                        "nothing more within {READ_TIMEOUT:?} while waiting for {what}; \
                         unread bytes: {}",
                        show(&self.buf)
                    )
                }
                Err(e) => panic!(
                    "read failed while waiting for {what}: {e}; unread bytes: {}",
                    show(&self.buf)
                ),
            }
        }
    }

    /// One line, up to and including its `\n`.
    pub fn read_line(&mut self) -> Vec<u8> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                return self.buf.drain(..=i).collect();
            }
            self.fill("a line");
        }
    }

    /// Exactly `n` bytes.
    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            self.fill(&format!("{n} bytes"));
        }
        self.buf.drain(..n).collect()
    }

    /// Everything up to the end of the stream (a reset counts as the end).
    pub fn read_to_end(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        read_until_eof(&mut self.stream, &mut out, "end of stream");
        out
    }

    /// Everything read until the end of the stream or the read timeout, and whether the stream
    /// ended (a reset counts as the end).
    pub fn read_until_end(&mut self) -> (Vec<u8>, bool) {
        let mut out = self.buffered().to_vec();
        let mut chunk = [0u8; 65536];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return (out, true),
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return (out, true),
                Err(_) => return (out, false),
            }
        }
    }

    /// Shuts down the sending side: the server sees end of stream.
    pub fn half_close(&mut self) {
        self.stream
            .shutdown(Shutdown::Write)
            .unwrap_or_else(|e| panic!("cannot half-close: {e}"));
    }

    /// One WHATSAT reply: a `? ...\n` line if the reply starts with `? `, otherwise the bytes up
    /// to and including the first `\n\n`.
    pub fn read_whatsat_reply(&mut self) -> Vec<u8> {
        loop {
            if self.buf.len() >= 2 {
                if self.buf.starts_with(b"? ") {
                    if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                        return self.buf.drain(..=i).collect();
                    }
                } else if let Some(i) = find(&self.buf, b"\n\n") {
                    return self.buf.drain(..i + 2).collect();
                }
            }
            self.fill("a WHATSAT reply");
        }
    }
}

/// What [`Client::read_until_end`] returned, `(bytes, ended)`, as a message (for a
/// [`Client::connect_quick`] connection).
pub fn describe_end(got: &(Vec<u8>, bool)) -> String {
    format!(
        "{}{}",
        show(&got.0),
        if got.1 {
            " then the end of the stream"
        } else {
            " and no end of stream within 5 s"
        }
    )
}

/// The location of every IAMAT the tests send unless they say otherwise (the specification's
/// example, on the UCLA campus).
pub const LOCATION: &str = "+34.068930-118.445127";

/// `IAMAT CLIENT LOCATION NOW` at `server`, on a connection of its own; returns the AT line
/// without its `\n`, after checking its shape: `AT SERVER ...` the client's fields, one line.
pub fn iamat_at(server: &ServerProc, client: &str) -> String {
    let time = now_secs_string();
    let reply = exchange(
        server.addr,
        format!("IAMAT {client} {LOCATION} {time}\n").as_bytes(),
    );
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let name = &server.name;
    assert!(
        reply.starts_with(&format!("AT {name} "))
            && reply.ends_with(&format!(" {client} {LOCATION} {time}\n"))
            && reply.matches('\n').count() == 1,
        "IAMAT {client} {LOCATION} {time} at {name} was answered {reply:?}"
    );
    reply.trim_end().to_owned()
}

/// One IAMAT on a connection the caller keeps, answered by server `server`; returns the AT line
/// without its `\n`.
pub fn iamat_on(c: &mut Client, server: &str, client: &str) -> String {
    let time = now_secs_string();
    c.send(format!("IAMAT {client} {LOCATION} {time}\n").as_bytes());
    let reply = String::from_utf8_lossy(&c.read_line()).into_owned();
    assert!(
        reply.starts_with(&format!("AT {server} "))
            && reply.ends_with(&format!(" {client} {LOCATION} {time}\n")),
        "IAMAT {client} at {server} was answered {reply:?}"
    );
    reply.trim_end().to_owned()
}

// ---------------------------------------------------------------------------------------------
// Small helpers

/// Where `needle` first starts in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// Joins a thread, passing its panic on.
pub fn join<T>(handle: JoinHandle<T>) -> T {
    match handle.join() {
        Ok(value) => value,
        Err(failure) => std::panic::resume_unwind(failure),
    }
}

/// Locks `m`, also after a thread panicked while holding it (the test reports that panic).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Now as POSIX seconds with nine decimals, as a client would send it: `SECS.NNNNNNNNN`.
pub fn now_secs_string() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970");
    format!("{}.{:09}", now.as_secs(), now.subsec_nanos())
}

/// Now in nanoseconds since the epoch.
pub fn now_ns() -> i128 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970");
    i128::try_from(now.as_nanos()).expect("nanoseconds fit i128")
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes; returns whether it did.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Bytes as escaped ASCII, for assertion messages: `show(a) == show(b)` compares exactly and
/// prints readably.
pub fn show(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

/// The newline rules of docs/protocol.md section 4 for a relayed body, written from the
/// document on their own (the tests' oracle, not the server's code): every run of two or more
/// `\n` becomes one, and trailing `\n` are removed.
pub fn newline_rules(body: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(body.len());
    for &b in body {
        if b == b'\n' && out.last() == Some(&b'\n') {
            continue;
        }
        out.push(b);
    }
    while out.last() == Some(&b'\n') {
        out.pop();
    }
    out
}

/// Runs `herd ARGS` to its exit, at most 10 s (then kills it and panics), with `env` in the
/// environment (the variables the server reads otherwise removed). Returns the status, stdout
/// and stderr.
pub fn run_to_exit(
    args: &[&str],
    cwd: &Path,
    env: &[(&str, &str)],
) -> (ExitStatus, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herd"));
    for var in SERVER_ENV {
        command.env_remove(var);
    }
    let mut child = command
        .envs(env.iter().copied())
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start herd");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut out = Vec::new();
            let _ = pipe.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("herd {args:?} did not exit within 10 s");
            }
        }
    };
    (
        status,
        stdout.join().expect("stdout reader"),
        stderr.join().expect("stderr reader"),
    )
}

/// A connection to `addr` whose kernel receive buffer is small (set before it connects, so the
/// window it offers is small from the start).
pub fn connect_with_small_receive_buffer(addr: SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        panic!("an IPv4 address: {addr}");
    };
    let size: libc::c_int = 4096;
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a socket this function owns until it hands it to the TcpStream; setsockopt and
    // connect read only the live values they are given, for the sizes given.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let set = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(set, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
        let connected = libc::connect(
            fd,
            (&to as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(
            connected,
            0,
            "connect to {addr}: {}",
            std::io::Error::last_os_error()
        );
        stream
    }
}

/// The size of `stream`'s kernel receive buffer (`SO_RCVBUF`).
pub fn receive_buffer(stream: &std::net::TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut size: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes through the pointer, which is valid for
    // them, and the length through the other.
    let result = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut size as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(result, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
    usize::try_from(size).expect("a size")
}

/// A small generator of random numbers (splitmix64), the same in every test that draws
/// moments or choices from a seed, so that a seed printed by a failure runs it again.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next() >> 11) as f64 / (1u64 << 53) as f64)
    }

    pub fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        Duration::from_secs_f64(self.uniform(lo, hi))
    }
}
