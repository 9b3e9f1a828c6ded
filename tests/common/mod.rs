//! The harness every integration test shares: temporary directories, configurations, a `herd
//! serve` child process that never outlives its test, and blocking TCP clients that speak the
//! protocol in exact bytes.
//!
//! Every wait here is bounded: a server that does not come up, a reply that never arrives or a
//! process that ignores SIGTERM makes the test panic with what was seen so far, never hang.
#![allow(dead_code)]

pub mod fake_places;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
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

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
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

/// Reads `shared/places-fixtures/<name>` (beside the crate: `../shared/places-fixtures`).
pub fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/places-fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// Ports that were free a moment ago: `n` listeners are bound at once (so the ports differ),
/// read, and closed. Another process may take one in between; tests accept that small risk.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("listener has no address").port())
        .collect()
}

/// One `[[server]]` table of a test configuration.
#[derive(Debug, Clone, Copy)]
pub struct ServerSpec<'a> {
    pub name: &'a str,
    pub port: u16,
    pub neighbors: &'a [&'a str],
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes a configuration of one server, "Bailey" on port 0 (any free port) with no
/// neighbours, and `extra` appended.
pub fn write_lone_config(dir: &TestDir, extra: &str) -> PathBuf {
    let bailey = ServerSpec {
        name: "Bailey",
        port: 0,
        neighbors: &[],
    };
    write_config(dir, &[bailey], extra)
}

/// Writes `<dir>/herd.toml` with `log_dir = "logs"`, the given servers, and `extra` appended
/// verbatim (for example a `[places]` or `[limits]` table). Returns the configuration's path.
pub fn write_config(dir: &TestDir, servers: &[ServerSpec], extra: &str) -> PathBuf {
    let mut text = String::from("# Written by the integration tests.\nlog_dir = \"logs\"\n");
    for server in servers {
        let neighbors: Vec<String> = server.neighbors.iter().map(|n| toml_string(n)).collect();
        text.push_str(&format!(
            "\n[[server]]\nname = {}\nport = {}\nneighbors = [{}]\n",
            toml_string(server.name),
            server.port,
            neighbors.join(", ")
        ));
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

/// Spawns `herd serve NAME --config PATH` with the directory of the configuration as its
/// working directory, `env` added to its environment (and `GOOGLE_PLACES_API_KEY` removed
/// unless `env` sets it), stdin null, stdout piped and drained by a thread, stderr inherited.
/// Returns once the server has printed its "listening" line; panics after 10 s without one.
pub fn spawn_server(config: &Path, name: &str, env: &[(&str, &str)]) -> ServerProc {
    let cwd = config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut command = server_command();
    command
        .arg(name)
        .arg("--config")
        .arg(config)
        .current_dir(&cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if !env.iter().any(|(k, _)| *k == "GOOGLE_PLACES_API_KEY") {
        command.env_remove("GOOGLE_PLACES_API_KEY");
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

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
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

// ---------------------------------------------------------------------------------------------
// Small helpers

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

// ---------------------------------------------------------------------------------------------
// Signals and store dumps (added for the fault tests)

impl ServerProc {
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

    /// `<log_dir>/<NAME>.store`, the file SIGUSR1 makes the server write.
    pub fn store_path(&self) -> PathBuf {
        self.log_path.with_file_name(format!("{}.store", self.name))
    }
}

/// How long `dump_store` waits for the server to write its store.
pub const DUMP_TIMEOUT: Duration = Duration::from_secs(10);

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

/// SPEC section 4's newline rules for a relayed body, written from the spec on their own (the
/// tests' oracle, not the server's code): every run of two or more `\n` becomes one, and
/// trailing `\n` are removed.
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
