//! The herd against its Python asyncio prototype (issue 3): `cargo bench --bench herd`.
//!
//! Every figure comes from real processes talking over loopback: `herd serve` (the Rust
//! server) and `benches/prototype/herd_prototype.py` (its opponent) as servers, `herd load` as
//! the load generator, and for WHATSAT a fake Google Places over real HTTPS
//! (`tests/common/fake_places.rs`) running in this process. The bench prints one table, figure |
//! herd | prototype | ratio | target, and writes `target/bench/results.md` and
//! `target/bench/herd-vs-prototype.svg`.
//!
//! ```text
//! cargo bench --bench herd                # every scenario, a few minutes on two cores
//! cargo bench --bench herd -- --save      # also copy both files into benches/results/
//! cargo bench --bench herd -- --smoke     # a tiny round of every scenario, for CI
//! cargo bench --bench herd -- memory      # only the scenarios whose name holds a word
//! cargo bench --bench herd -- --help      # the options, and nothing run
//! ```
//!
//! The scenarios, one function each, in the order they run:
//!
//! | function | what it measures |
//! |---|---|
//! | [`lone_iamat`] | IAMAT at one server without neighbours: 50 connections × 1 and × 16 in flight, and one request per connection; the first and last also against a bare server ([`ceiling`]), the most this machine allows |
//! | [`herd_wide`] | the five-server herd absorbing IAMAT at every server at once, until every server holds every record; the herd also with its logs linked to `/dev/null`, to weigh the log and the kernel's TCP work against the target |
//! | [`whatsat`] | WHATSAT through the HTTPS fake, answering at once and after 20 ms, and the TLS handshakes it cost |
//! | [`propagation`] | time from an IAMAT's reply at one server until the farthest server answers with it (two hops in the 2023 herd, three in the Goloman herd), idle and under load |
//! | [`memory`] | resident size with many idle connections and with many stored clients |
//! | [`startup`] | time from spawning a server to its first answer |
//!
//! How the comparison is kept fair:
//!
//! - Servers run on CPU 0; load generators, the probes of this process and the fake Places run
//!   on CPU 1 (when the machine has two CPUs), so client work never steals the server's core.
//! - Each scenario runs the herd and the prototype in alternation (herd, prototype, herd,
//!   prototype), every run on freshly started servers, and each figure is the better of the
//!   rounds: a slow drift of the machine (a noisy neighbour, a cold cache) hits both sides.
//!   Memory is measured once (it does not drift) and start-up is the median of five tries.
//! - Logging is on, as in production: every server writes every line to its log file, in a
//!   temporary directory removed after the run.
//! - Only [`whatsat`] talks to Places. The other scenarios run the servers without an API key,
//!   so a WHATSAT used as a probe is answered at once (the stored AT line, then Google's
//!   `REQUEST_DENIED` body) by both implementations.
//!
//! This is a benchmark, not a test: it asserts nothing about speed. It exits non-zero only when
//! something did not run (a server did not start, a load reported errors, a record never
//! reached a server within its bound), which is what CI checks with `--smoke`. Every wait is
//! bounded, and every process it starts is killed when its guard is dropped, panics included.

#[path = "herd/ceiling.rs"]
mod ceiling;
#[path = "../tests/common/fake_places.rs"]
mod fake_places;

use std::cell::{Cell, RefCell};
use std::fmt::{self, Write as _};
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fake_places::{Behaviour, FakePlaces};

// `fake_places.rs` is shared with the tests, whose harness calls its temporary directory
// `TestDir`; the fake finds it as `super::TestDir`.
use crate::TempDir as TestDir;

// ---------------------------------------------------------------------------------------------
// Settings

/// The API key given to servers in the WHATSAT scenario (the fake accepts any).
const API_KEY: &str = "bench-key";
/// Both servers keep at most this many HTTPS connections to Places (`places.pool_size`'s
/// default): the bound on TLS handshakes that issue 3 sets.
const PLACES_POOL_SIZE: f64 = 4.0;
/// How long a server may take to print its ready line.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// What a load generator may take beyond its warm-up and measured window: connecting, priming
/// the ids of a WHATSAT load, and waiting for the last replies.
const LOAD_SLACK: Duration = Duration::from_secs(60);
/// How long every server may take to show every marker after a herd-wide load.
const CONVERGE_BOUND: Duration = Duration::from_secs(60);
/// How long a freshly started herd may take to link up (a marker reaching every server).
const LINK_BOUND: Duration = Duration::from_secs(15);
/// How long one propagation sample may take before the record counts as lost.
const PROBE_BOUND: Duration = Duration::from_secs(10);
/// Other processes' share of the servers' CPU above which a run counts as disturbed. Below
/// it, it is the kernel's own work (timers, network softirqs in process context).
const OTHER_WORK_PERCENT: f64 = 10.0;
/// A probe socket's read timeout: how often a blocked read comes back to check its deadline.
const READ_STEP: Duration = Duration::from_millis(500);

/// How big a run is: the full bench, or the smoke round CI runs.
struct Plan {
    smoke: bool,
    /// Runs per implementation, alternated (herd, prototype, herd, prototype, ...).
    rounds: usize,
    /// The measured window of a throughput load, and the warm-up before it.
    load: Duration,
    warmup: Duration,
    /// Connections made by one run of one request per connection (see [`lone_iamat`]).
    one_shot_connections: u64,
    /// How long each server is loaded in the herd-wide scenario.
    herd_wide: Duration,
    propagation_samples: usize,
    /// How long propagation is sampled while the background load runs.
    loaded_window: Duration,
    idle_connections: usize,
    stored_clients: u64,
    /// The longest a server may take to store them; the prototype may not make it, and what it
    /// reached is reported.
    stored_budget: Duration,
    startup_samples: usize,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            smoke: false,
            rounds: 2,
            load: Duration::from_secs(3),
            warmup: Duration::from_millis(500),
            one_shot_connections: 12_000,
            herd_wide: Duration::from_secs(3),
            propagation_samples: 300,
            loaded_window: Duration::from_secs(4),
            idle_connections: 10_000,
            stored_clients: 1_000_000,
            stored_budget: Duration::from_secs(120),
            startup_samples: 5,
        }
    }

    /// About a quarter of a second of every scenario: proves that everything runs.
    fn smoke() -> Plan {
        Plan {
            smoke: true,
            rounds: 1,
            load: Duration::from_millis(250),
            warmup: Duration::from_millis(50),
            one_shot_connections: 1_000,
            herd_wide: Duration::from_millis(300),
            propagation_samples: 20,
            loaded_window: Duration::from_millis(500),
            idle_connections: 100,
            stored_clients: 1_000,
            stored_budget: Duration::from_secs(20),
            startup_samples: 1,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The two implementations

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Impl {
    /// The Rust server, `herd serve`.
    Herd,
    /// The Python asyncio prototype.
    Prototype,
}

impl Impl {
    /// In the order every alternation runs them.
    const BOTH: [Impl; 2] = [Impl::Herd, Impl::Prototype];

    /// The command that runs server `name` of `config` (same arguments, same ready line).
    fn serve_command(self, name: &str, config: &Path) -> Command {
        let mut command = match self {
            Impl::Herd => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_herd"));
                c.arg("serve");
                c
            }
            Impl::Prototype => {
                let mut c = Command::new("python3");
                c.arg(manifest_dir().join("benches/prototype/herd_prototype.py"));
                c
            }
        };
        command.arg(name).arg("--config").arg(config);
        command
    }
}

impl fmt::Display for Impl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Impl::Herd => "herd",
            Impl::Prototype => "prototype",
        })
    }
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------------------------
// CPUs and file descriptors

/// Where processes run: servers on one CPU, everything that makes load on another.
#[derive(Clone, Copy)]
struct Cpus {
    server: Option<usize>,
    client: Option<usize>,
}

impl Cpus {
    fn detect() -> Cpus {
        let n = thread::available_parallelism().map_or(1, |n| n.get());
        if n >= 2 {
            Cpus {
                server: Some(0),
                client: Some(1),
            }
        } else {
            Cpus {
                server: None,
                client: None,
            }
        }
    }

    fn describe(&self) -> String {
        match (self.server, self.client) {
            (Some(s), Some(c)) => format!(
                "servers pinned to CPU {s}; load generators, probes and the fake Places to CPU {c}"
            ),
            _ => "one CPU: nothing pinned, servers and load share it".to_string(),
        }
    }
}

/// Restricts the calling process to one CPU.
fn set_affinity(cpu: usize) -> io::Result<()> {
    // SAFETY: all-zero is a valid (empty) `cpu_set_t`; CPU_SET writes inside the set it is
    // given, and sched_setaffinity only reads `size_of::<cpu_set_t>()` bytes of it.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes `command` start on `cpu` (the same as prefixing `taskset -c CPU`, without the extra
/// exec that would count in start-up times).
fn pin(command: &mut Command, cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe work is allowed: set_affinity makes one system call and allocates
        // nothing (a failure is an OS error code, not a boxed error).
        unsafe {
            command.pre_exec(move || set_affinity(cpu));
        }
    }
}

/// Raises this process's open-file limit to its hard limit (for the idle connections it opens;
/// the servers it starts inherit it too) and returns the new soft limit.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            }
        }
    }
    limit.rlim_cur
}

// ---------------------------------------------------------------------------------------------
// Files and configurations

/// A fresh directory under the system temporary directory, removed with its contents when
/// dropped.
struct TempDir {
    path: PathBuf,
}

static TEMP_DIRS: AtomicUsize = AtomicUsize::new(0);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let n = TEMP_DIRS.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("herd-bench-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path); // a leftover of a recycled pid
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A herd's shape: each server's name and the servers it talks with (docs/protocol.md section 1).
type Topology = &'static [(&'static str, &'static [&'static str])];

/// One server, no neighbours: nothing but the protocol, the store and the log.
const LONE: Topology = &[("Bailey", &[])];

/// The course's herd from 2023 on. Jaquez is two hops from Bailey.
const HERD_2023: Topology = &[
    ("Bailey", &["Bona", "Campbell"]),
    ("Bona", &["Bailey", "Campbell", "Clark"]),
    ("Campbell", &["Bailey", "Bona", "Jaquez"]),
    ("Clark", &["Bona", "Jaquez"]),
    ("Jaquez", &["Campbell", "Clark"]),
];

/// An earlier year's herd. Hands is three hops from Welsh (Welsh-Holiday-Goloman-Hands).
const HERD_GOLOMAN: Topology = &[
    ("Goloman", &["Hands", "Holiday", "Wilkes"]),
    ("Hands", &["Goloman", "Wilkes"]),
    ("Holiday", &["Goloman", "Welsh", "Wilkes"]),
    ("Welsh", &["Holiday"]),
    ("Wilkes", &["Goloman", "Hands", "Holiday"]),
];

/// Ports that were free a moment ago: `n` listeners bound at once (so they differ), then
/// closed. Another process could take one in between; a bench accepts that small risk.
fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| format!("cannot bind 127.0.0.1:0: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| e.to_string())
}

/// Writes `<dir>/herd.toml`: logs in `<dir>/logs`, every server on 127.0.0.1 at its port, and
/// the fake as Places when there is one.
fn write_config(
    dir: &TempDir,
    topology: Topology,
    ports: &[u16],
    places: Option<&FakePlaces>,
) -> Result<PathBuf, String> {
    let mut text = format!("# Written by benches/herd.rs.\nlog_dir = \"{LOG_DIR}\"\n");
    for ((name, neighbours), port) in topology.iter().zip(ports) {
        let neighbours: Vec<String> = neighbours.iter().map(|n| format!("\"{n}\"")).collect();
        let _ = write!(
            text,
            "\n[[server]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\n\
             neighbors = [{}]\n",
            neighbours.join(", ")
        );
    }
    if let Some(fake) = places {
        text.push('\n');
        text.push_str(&fake.places_toml("legacy", 5000));
    }
    let path = dir.join("herd.toml");
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// The servers' log directory, in the cluster's directory.
const LOG_DIR: &str = "logs";

/// Where the servers of a cluster log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Logs {
    /// Files in the cluster's directory, as a herd runs.
    Files,
    /// `/dev/null`: every line is still formatted and written, but the kernel keeps nothing.
    Discarded,
}

/// Makes each server's log file a link to `/dev/null` before the servers open it for appending.
fn discard_logs(dir: &TempDir, topology: Topology) -> Result<(), String> {
    let logs = dir.join(LOG_DIR);
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    for (name, _) in topology {
        let path = logs.join(format!("{name}.log"));
        std::os::unix::fs::symlink("/dev/null", &path)
            .map_err(|e| format!("cannot link {} to /dev/null: {e}", path.display()))?;
    }
    Ok(())
}

/// A Google Places sample answer of `tests/data/places`.
fn fixture(name: &str) -> Result<Vec<u8>, String> {
    let path = manifest_dir().join("tests/data/places").join(name);
    std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process that cannot outlive the bench: dropping it (also while a panic unwinds)
/// kills and reaps it. Threads drain its stdout and stderr into memory, so a chatty child never
/// blocks on a full pipe; stdout also arrives line by line for [`Proc::wait_line`].
struct Proc {
    label: String,
    child: Child,
    status: Option<ExitStatus>,
    lines: mpsc::Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    drains: Vec<JoinHandle<()>>,
}

/// Copies `pipe` into `into` until end of stream, sending each line to `lines` as well.
fn drain(
    pipe: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
    lines: Option<mpsc::Sender<String>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line).into_owned();
                    lock(&into).push_str(&text);
                    if let Some(lines) = &lines {
                        let _ = lines.send(text); // nobody listens once the server is up
                    }
                }
            }
        }
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Proc {
    fn spawn(label: impl Into<String>, command: &mut Command) -> Result<Proc, String> {
        let label = label.into();
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {label}: {e}"))?;
        let (tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out_pipe = child.stdout.take().expect("stdout is piped");
        let err_pipe = child.stderr.take().expect("stderr is piped");
        let drains = vec![
            drain(out_pipe, Arc::clone(&stdout), Some(tx)),
            drain(err_pipe, Arc::clone(&stderr), None),
        ];
        Ok(Proc {
            label,
            child,
            status: None,
            lines,
            stdout,
            stderr,
            drains,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of stderr, for error messages.
    fn stderr_tail(&self) -> String {
        let stderr = lock(&self.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" / ")
    }

    /// Waits up to `timeout` for the process to exit by itself.
    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits up to `timeout` for a line of stdout that `accept` makes something of.
    fn wait_line<T>(
        &mut self,
        timeout: Duration,
        mut accept: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(found) = accept(&line) {
                        return Ok(found);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{} printed no ready line within {timeout:?}; stderr: {}",
                        self.label,
                        self.stderr_tail()
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Stdout closed: the process is exiting. Let stderr arrive before quoting it.
                    let status = self.wait_exit(Duration::from_secs(2));
                    let status = status.map_or("still running".to_string(), |s| s.to_string());
                    return Err(format!(
                        "{} exited before its ready line ({status}); stderr: {}",
                        self.label,
                        self.stderr_tail()
                    ));
                }
            }
        }
    }

    /// Waits up to `timeout` for the process to finish by itself and returns its stdout. A
    /// process still running then is killed; that, or a failed exit, is an error.
    fn finish(&mut self, timeout: Duration) -> Result<String, String> {
        let Some(status) = self.wait_exit(timeout) else {
            self.kill();
            return Err(format!("{} did not finish within {timeout:?}", self.label));
        };
        // The pipes are closed now that the process is gone: the drains end.
        for drain in self.drains.drain(..) {
            let _ = drain.join();
        }
        if !status.success() {
            return Err(format!(
                "{} failed ({status}): {}",
                self.label,
                self.stderr_tail()
            ));
        }
        Ok(lock(&self.stdout).clone())
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running server of either implementation.
struct Server {
    name: String,
    addr: SocketAddr,
    log: PathBuf,
    proc: Proc,
}

/// Parses the ready line both implementations print: `NAME listening on HOST:PORT, logging to
/// PATH` (the path relative to the working directory, `cwd`).
fn parse_ready_line(line: &str, name: &str, cwd: &Path) -> Option<(SocketAddr, PathBuf)> {
    let rest = line.trim_end().strip_prefix(name)?;
    let rest = rest.strip_prefix(" listening on ")?;
    let (addr, log) = rest.split_once(", logging to ")?;
    Some((addr.parse().ok()?, cwd.join(log)))
}

/// Starts server `name` of `config` on the server CPU, with the bench's API key or none, and
/// returns once it has printed its ready line.
fn start_server(
    bench: &Bench,
    imp: Impl,
    name: &str,
    config: &Path,
    with_key: bool,
) -> Result<Server, String> {
    let cwd = config
        .parent()
        .expect("the configuration is in a directory");
    let mut command = imp.serve_command(name, config);
    command.current_dir(cwd).env_remove("GOOGLE_PLACES_API_KEY");
    if with_key {
        command.env("GOOGLE_PLACES_API_KEY", API_KEY);
    }
    pin(&mut command, bench.cpus.server);
    let mut proc = Proc::spawn(format!("{imp} {name}"), &mut command)?;
    let (addr, log) = proc.wait_line(SERVER_READY_TIMEOUT, |line| {
        parse_ready_line(line, name, cwd)
    })?;
    Ok(Server {
        name: name.to_string(),
        addr,
        log,
        proc,
    })
}

/// The running servers of one configuration, and the directory holding it and their logs. The
/// servers are killed before the directory is removed (fields drop in declaration order).
struct Cluster {
    servers: Vec<Server>,
    _dir: TempDir,
}

impl Cluster {
    /// Starts every server of `topology`, each on a free port; with the fake as Places (and an
    /// API key) when there is one, else without a key.
    fn start(
        bench: &Bench,
        imp: Impl,
        topology: Topology,
        places: Option<&FakePlaces>,
    ) -> Result<Cluster, String> {
        Cluster::start_with_logs(bench, imp, topology, places, Logs::Files)
    }

    /// [`Cluster::start`], with the servers' logs where `logs` says.
    fn start_with_logs(
        bench: &Bench,
        imp: Impl,
        topology: Topology,
        places: Option<&FakePlaces>,
        logs: Logs,
    ) -> Result<Cluster, String> {
        let dir = TempDir::new(&imp.to_string());
        let ports = free_ports(topology.len())?;
        let config = write_config(&dir, topology, &ports, places)?;
        if logs == Logs::Discarded {
            discard_logs(&dir, topology)?;
        }
        let mut servers = Vec::with_capacity(topology.len());
        for (name, _) in topology {
            let server = start_server(bench, imp, name, &config, places.is_some())?;
            if logs == Logs::Discarded {
                let logs_to = std::fs::canonicalize(&server.log).unwrap_or_default();
                if logs_to != Path::new("/dev/null") {
                    let to = logs_to.display();
                    return Err(format!("{name} logs to {to}, not /dev/null"));
                }
            }
            servers.push(server);
        }
        Ok(Cluster { servers, _dir: dir })
    }

    fn server(&self, name: &str) -> &Server {
        self.servers
            .iter()
            .find(|s| s.name == name)
            .expect("the server is in the topology")
    }

    /// Waits until the herd is linked: a marker from each server has reached every server.
    fn await_links(&self) -> Result<(), String> {
        converge(&self.servers, "links", Instant::now(), LINK_BOUND)
            .map(|_| ())
            .map_err(|e| format!("the herd did not link up: {e}"))
    }
}

// ---------------------------------------------------------------------------------------------
// The load generator

/// One run of `herd load` (see `herd load --help`).
#[derive(Clone)]
struct LoadSpec {
    addr: SocketAddr,
    conns: usize,
    in_flight: usize,
    duration: Duration,
    warmup: Duration,
    /// `iamat`, `whatsat` or `mixed:N`.
    mix: &'static str,
    one_shot: bool,
    clients: Option<u64>,
    /// Stop after this many measured requests.
    requests: Option<u64>,
    /// Open-loop pacing, requests per second across all connections.
    rate: Option<u64>,
    bound: Option<u32>,
    radius_km: Option<u32>,
    /// Client ids are `<prefix><k>`.
    id_prefix: Option<String>,
    /// Loopback source addresses to spread connections over (`herd load --sources`).
    sources: Option<usize>,
}

impl LoadSpec {
    /// IAMAT from 50 connections, one in flight each, for `duration` after `warmup`.
    fn iamat(addr: SocketAddr, duration: Duration, warmup: Duration) -> LoadSpec {
        LoadSpec {
            addr,
            conns: 50,
            in_flight: 1,
            duration,
            warmup,
            mix: "iamat",
            one_shot: false,
            clients: None,
            requests: None,
            rate: None,
            bound: None,
            radius_km: None,
            id_prefix: None,
            sources: None,
        }
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "load".into(),
            "--addr".into(),
            self.addr.to_string(),
            "-c".into(),
            self.conns.to_string(),
            "-p".into(),
            self.in_flight.to_string(),
            "-d".into(),
            self.duration.as_millis().to_string(),
            "--warmup-ms".into(),
            self.warmup.as_millis().to_string(),
            "--mix".into(),
            self.mix.into(),
        ];
        if self.one_shot {
            args.push("--one-shot".into());
        }
        let options = [
            ("--clients", self.clients.map(|n| n.to_string())),
            ("--requests", self.requests.map(|n| n.to_string())),
            ("--rate", self.rate.map(|n| n.to_string())),
            ("--bound", self.bound.map(|n| n.to_string())),
            ("--radius", self.radius_km.map(|n| n.to_string())),
            ("--id-prefix", self.id_prefix.clone()),
            ("--sources", self.sources.map(|n| n.to_string())),
        ];
        for (flag, value) in options {
            if let Some(value) = value {
                args.push(flag.into());
                args.push(value);
            }
        }
        args
    }

    /// The longest the run may take.
    fn bound(&self) -> Duration {
        self.warmup + self.duration + LOAD_SLACK
    }
}

/// The line of JSON `herd load` prints, the fields the bench uses.
#[derive(Clone, Debug, Default)]
struct LoadReport {
    requests: u64,
    errors: u64,
    seconds: f64,
    per_second: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_percent: f64,
    client_bound: bool,
    first_error: Option<String>,
    /// The server's share of its core during the run (measured by the bench, not the
    /// generator).
    server_cpu: Option<CpuShare>,
}

impl LoadReport {
    fn parse(stdout: &str) -> Result<LoadReport, String> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .ok_or_else(|| format!("herd load printed no JSON: {stdout:?}"))?;
        let json: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("herd load printed {line:?}: {e}"))?;
        let number = |key: &str| -> Result<f64, String> {
            json.get(key)
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| format!("herd load's JSON has no number {key:?}: {line}"))
        };
        Ok(LoadReport {
            requests: number("requests")? as u64,
            errors: number("errors")? as u64,
            seconds: number("seconds")?,
            per_second: number("per_second")?,
            p50_us: number("p50_us")?,
            p99_us: number("p99_us")?,
            cpu_percent: number("cpu_percent")?,
            client_bound: json
                .get("client_bound")
                .and_then(serde_json::Value::as_bool)
                == Some(true),
            first_error: json
                .get("first_error")
                .and_then(serde_json::Value::as_str)
                .map(str::to_string),
            server_cpu: None,
        })
    }

    /// One line for the run log.
    fn summary(&self) -> String {
        format!(
            "{} ({} requests), p50 {}, p99 {}, {}generator CPU {:.0}%{}",
            fmt_rate(self.per_second),
            fmt_count(self.requests as f64),
            fmt_micros(self.p50_us),
            fmt_micros(self.p99_us),
            self.server_cpu.map_or(String::new(), |share| {
                let others = match share.others {
                    Some(others) if others >= OTHER_WORK_PERCENT => {
                        format!(" (and OTHER WORK {others:.0}% of its CPU)")
                    }
                    _ => String::new(),
                };
                format!("server CPU {:.0}%{others}, ", share.process)
            }),
            self.cpu_percent,
            if self.client_bound {
                ", client-bound"
            } else {
                ""
            }
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Probing clients

/// A blocking protocol client with its own buffer, for markers and probes. Every read is
/// bounded by the caller's deadline (checked at least every [`READ_STEP`]).
struct Client {
    stream: TcpStream,
    addr: SocketAddr,
    buf: Vec<u8>,
}

/// An IAMAT for `id`, stamped now, at the spec's example location.
fn iamat_command(id: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    format!(
        "IAMAT {id} +34.068930-118.445127 {}.{:09}\n",
        now.as_secs(),
        now.subsec_nanos()
    )
}

impl Client {
    fn connect(addr: SocketAddr) -> Result<Client, String> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        // Probes measure latency: no Nagle delay on the small commands.
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(READ_STEP));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
        Ok(Client {
            stream,
            addr,
            buf: Vec::new(),
        })
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("cannot send to {}: {e}", self.addr))
    }

    /// Reads once more into the buffer.
    fn fill(&mut self, deadline: Instant, what: &str) -> Result<(), String> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(format!("{} closed the connection ({what})", self.addr)),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if Instant::now() >= deadline {
                        return Err(format!("no answer from {} in time ({what})", self.addr));
                    }
                }
                Err(e) => return Err(format!("cannot read from {} ({what}): {e}", self.addr)),
            }
        }
    }

    /// One line, without its `\n`.
    fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>, String> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                return Ok(line);
            }
            self.fill(deadline, "a line")?;
        }
    }

    /// Sends an IAMAT for `id` and returns the AT line that answers it.
    fn iamat(&mut self, id: &str, deadline: Instant) -> Result<Vec<u8>, String> {
        self.send(iamat_command(id).as_bytes())?;
        let line = self.read_line(deadline)?;
        if line.starts_with(b"AT ") {
            Ok(line)
        } else {
            Err(format!(
                "IAMAT {id} at {} was answered {:?}",
                self.addr,
                line.escape_ascii().to_string()
            ))
        }
    }

    /// Reads one WHATSAT reply and returns its first line: the stored AT line, or the `? ...`
    /// line when the client is unknown there. The rest of an AT reply (the body and the blank
    /// line that ends it) is read and dropped.
    fn read_whatsat_reply(&mut self, deadline: Instant) -> Result<Vec<u8>, String> {
        let first = self.read_line(deadline)?;
        if first.starts_with(b"? ") {
            return Ok(first);
        }
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                self.buf.drain(..i + 2);
                return Ok(first);
            }
            self.fill(deadline, "the body of a WHATSAT reply")?;
        }
    }
}

/// Sends one marker IAMAT at each server, then asks every server about every marker (WHATSAT)
/// until each shows it, or `bound` passes. Links are FIFO TCP streams, so a server showing a
/// marker holds every record sent before it along the same path. Returns the time from
/// `since` until the last (server, marker) pair was seen.
fn converge(
    servers: &[Server],
    tag: &str,
    since: Instant,
    bound: Duration,
) -> Result<Duration, String> {
    let deadline = Instant::now() + bound;
    let mut clients = servers
        .iter()
        .map(|s| Client::connect(s.addr))
        .collect::<Result<Vec<_>, _>>()?;
    let mut markers = Vec::with_capacity(servers.len()); // (id, its AT line)
    for (client, server) in clients.iter_mut().zip(servers) {
        let id = format!("marker-{tag}-{}", server.name);
        let at = client.iamat(&id, deadline)?;
        markers.push((id, at));
    }
    // pending[j]: the markers server j has not shown yet.
    let mut pending: Vec<Vec<usize>> = vec![(0..markers.len()).collect(); servers.len()];
    loop {
        for (client, waiting) in clients.iter_mut().zip(pending.iter_mut()) {
            if waiting.is_empty() {
                continue;
            }
            // Every question in one write, then the answers in order: one round trip per
            // server per sweep.
            let questions: String = waiting
                .iter()
                .map(|&i| format!("WHATSAT {} 10 1\n", markers[i].0))
                .collect();
            client.send(questions.as_bytes())?;
            let mut still = Vec::new();
            for &i in waiting.iter() {
                if client.read_whatsat_reply(deadline)? != markers[i].1 {
                    still.push(i);
                }
            }
            *waiting = still;
        }
        let missing: usize = pending.iter().map(Vec::len).sum();
        if missing == 0 {
            return Ok(since.elapsed());
        }
        if Instant::now() >= deadline {
            let (j, waiting) = pending
                .iter()
                .enumerate()
                .find(|(_, w)| !w.is_empty())
                .expect("something is missing");
            return Err(format!(
                "{missing} of {} (server, marker) pairs not seen within {bound:?}, e.g. {} lacks {}",
                servers.len() * markers.len(),
                servers[j].name,
                markers[waiting[0]].0
            ));
        }
        // The servers may be busy absorbing a backlog: a short pause, not a busy loop.
        thread::sleep(Duration::from_millis(1));
    }
}

/// Propagation samples from `from` to `to`: an IAMAT with a new id on one connection; from its
/// AT reply (t0), WHATSAT about that id on another connection, back to back, until the reply's
/// first line is that AT line (t1). Returns t1 - t0 of each sample; takes `samples` of them or
/// as many as fit in `window`.
fn propagation_samples(
    from: &Server,
    to: &Server,
    tag: &str,
    samples: usize,
    window: Duration,
) -> Result<Vec<Duration>, String> {
    let mut writer = Client::connect(from.addr)?;
    let mut reader = Client::connect(to.addr)?;
    let started = Instant::now();
    let mut delays = Vec::with_capacity(samples);
    for k in 0..samples {
        if started.elapsed() >= window {
            break;
        }
        let id = format!("probe-{tag}-{k}");
        let deadline = Instant::now() + PROBE_BOUND;
        let at = writer.iamat(&id, deadline)?;
        let t0 = Instant::now();
        let question = format!("WHATSAT {id} 10 1\n");
        loop {
            reader.send(question.as_bytes())?;
            if reader.read_whatsat_reply(deadline)? == at {
                delays.push(t0.elapsed());
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{id}, sent to {}, did not reach {} within {PROBE_BOUND:?}",
                    from.name, to.name
                ));
            }
        }
    }
    Ok(delays)
}

/// The `p`-th percentile (nearest rank) of `samples`, in microseconds.
fn percentile_us(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1].as_secs_f64() * 1e6
}

// ---------------------------------------------------------------------------------------------
// /proc

/// Resident set size of process `pid`, in bytes (`VmRSS`).
fn rss_bytes(pid: u32) -> Result<f64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in {path}"))?;
    Ok(kib * 1024.0)
}

/// How many file descriptors process `pid` has open.
fn open_fds(pid: u32) -> Result<usize, String> {
    let path = format!("/proc/{pid}/fd");
    std::fs::read_dir(&path)
        .map(|dir| dir.count())
        .map_err(|e| format!("cannot list {path}: {e}"))
}

/// How many TCP sockets of this machine are in TIME_WAIT (state 06 of /proc/net/tcp).
fn time_wait_sockets() -> Option<usize> {
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).ok()?;
        count += text
            .lines()
            .skip(1)
            .filter(|line| line.split_whitespace().nth(3) == Some("06"))
            .count();
    }
    Some(count)
}

/// CPU time (user and system) process `pid` has used so far, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_split(pid).map(|[user, system]| user + system)
}

/// CPU time process `pid` has used so far, in seconds: `[user, system]`.
fn cpu_split(pid: u32) -> Option<[f64; 2]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which is in parentheses and may hold spaces, the fields go on
    // from the third: utime and stime are the 14th and 15th.
    let (_, fields) = stat.rsplit_once(')')?;
    let mut fields = fields.split_whitespace().skip(11);
    let mut seconds = || Some(fields.next()?.parse::<f64>().ok()? / ticks_per_second());
    Some([seconds()?, seconds()?])
}

/// Busy time (user, nice and system; not interrupts) of one CPU so far, in clock ticks.
fn cpu_busy_ticks(cpu: usize) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&format!("cpu{cpu}")))?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(3)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    Some(fields.iter().sum())
}

/// The share of one core a process used over a stretch of time, and what else ran on its CPU.
#[derive(Clone, Copy, Debug)]
struct CpuShare {
    /// Percent of one core the process used.
    process: f64,
    /// Percent of the process's CPU that other processes used: on a CPU the bench keeps for its
    /// servers, that is someone else's work (this machine may be shared), and a figure of that
    /// run is lower than it should be.
    others: Option<f64>,
}

/// Measures a process's [`CpuShare`]: tells whether the server was the limit of a run, or
/// something else (the client, the round trips to Places, another tenant of the machine) was.
struct CpuMeter {
    pid: u32,
    /// The CPU the process is pinned to, if it is.
    cpu: Option<usize>,
    process_seconds: Option<f64>,
    cpu_ticks: Option<f64>,
    since: Instant,
}

/// The kernel's CPU clock ticks per second.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

impl CpuMeter {
    fn start(pid: u32, cpu: Option<usize>) -> CpuMeter {
        CpuMeter {
            pid,
            cpu,
            process_seconds: cpu_seconds(pid),
            cpu_ticks: cpu.and_then(cpu_busy_ticks),
            since: Instant::now(),
        }
    }

    /// The share since the start; `None` over less than a few of the kernel's CPU clock ticks
    /// (10 ms each), which would make it mostly rounding.
    fn read(&self) -> Option<CpuShare> {
        let elapsed = self.since.elapsed().as_secs_f64();
        if elapsed < 0.1 {
            return None;
        }
        let used = cpu_seconds(self.pid)? - self.process_seconds?;
        let others = self.cpu.and_then(|cpu| {
            let busy = (cpu_busy_ticks(cpu)? - self.cpu_ticks?) / ticks_per_second();
            Some((100.0 * (busy - used) / elapsed).max(0.0))
        });
        Some(CpuShare {
            process: 100.0 * used / elapsed,
            others,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The bench: plan, pinning, alternation, and what it noticed

/// What every scenario shares.
struct Bench {
    plan: Plan,
    cpus: Cpus,
    /// This process's open-file limit, raised as far as allowed.
    fd_limit: u64,
    /// Things that did not run; any makes the bench exit non-zero.
    problems: RefCell<Vec<String>>,
    /// One line per measurement, for the "every run" section of results.md.
    runs: RefCell<Vec<String>>,
    /// The prototype's event loop, as its log names it.
    event_loop: RefCell<Option<String>>,
    /// Loads whose server shared its CPU with work from outside the bench, of all loads whose
    /// server's CPU was measured.
    disturbed_loads: Cell<usize>,
    measured_loads: Cell<usize>,
}

/// One scenario's measurements, per implementation, in round order.
struct Runs<T> {
    herd: Vec<T>,
    prototype: Vec<T>,
}

/// A figure of both implementations; `None` where it was not measured.
#[derive(Clone, Copy, Default)]
struct Pair {
    herd: Option<f64>,
    prototype: Option<f64>,
}

impl<T> Runs<T> {
    fn new() -> Runs<T> {
        Runs {
            herd: Vec::new(),
            prototype: Vec::new(),
        }
    }

    fn push(&mut self, imp: Impl, run: T) {
        match imp {
            Impl::Herd => self.herd.push(run),
            Impl::Prototype => self.prototype.push(run),
        }
    }

    fn of(&self, imp: Impl) -> &[T] {
        match imp {
            Impl::Herd => &self.herd,
            Impl::Prototype => &self.prototype,
        }
    }

    /// `choose` (the best, or the worst, of the rounds) over `value` of each run.
    fn figure(&self, choose: fn(&[f64]) -> Option<f64>, value: impl Fn(&T) -> f64) -> Pair {
        let pick = |runs: &[T]| choose(&runs.iter().map(&value).collect::<Vec<_>>());
        Pair {
            herd: pick(&self.herd),
            prototype: pick(&self.prototype),
        }
    }
}

fn highest(values: &[f64]) -> Option<f64> {
    values.iter().copied().reduce(f64::max)
}

fn lowest(values: &[f64]) -> Option<f64> {
    values.iter().copied().reduce(f64::min)
}

impl Bench {
    fn problem(&self, message: String) {
        eprintln!("  PROBLEM: {message}");
        self.problems.borrow_mut().push(message);
    }

    fn record(&self, line: String) {
        eprintln!("  {line}");
        self.runs.borrow_mut().push(line);
    }

    /// Runs `run` for each implementation in turn, `plan.rounds` times: herd, prototype, herd,
    /// prototype. The rounds are numbered from 1.
    fn alternate<T>(
        &self,
        mut run: impl FnMut(Impl, usize) -> Result<T, String>,
    ) -> Result<Runs<T>, String> {
        let mut runs = Runs::new();
        for round in 1..=self.plan.rounds {
            for imp in Impl::BOTH {
                let result = run(imp, round).map_err(|e| format!("{imp}, round {round}: {e}"))?;
                runs.push(imp, result);
            }
        }
        Ok(runs)
    }

    /// Starts `herd load` for `spec` on the client CPU.
    fn spawn_load(&self, spec: &LoadSpec) -> Result<Proc, String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_herd"));
        command.args(spec.args());
        pin(&mut command, self.cpus.client);
        Proc::spawn(format!("herd load against {}", spec.addr), &mut command)
    }

    /// Waits for a load started by [`Bench::spawn_load`] and returns its report.
    fn finish_load(&self, mut load: Proc, spec: &LoadSpec) -> Result<LoadReport, String> {
        LoadReport::parse(&load.finish(spec.bound())?)
    }

    /// Records a finished load's report as `label`. A load that saw errors is a problem, but
    /// its figures still count.
    fn record_load(&self, label: &str, report: &LoadReport) {
        self.record(format!("{label}: {}", report.summary()));
        if let Some(share) = report.server_cpu {
            self.measured_loads.set(self.measured_loads.get() + 1);
            if share
                .others
                .is_some_and(|others| others >= OTHER_WORK_PERCENT)
            {
                self.disturbed_loads.set(self.disturbed_loads.get() + 1);
            }
        }
        if report.errors > 0 {
            self.problem(format!(
                "{label}: the load generator saw {} errors, the first: {}",
                report.errors,
                report.first_error.as_deref().unwrap_or("(not said)")
            ));
        }
    }

    /// Runs one load against `server` to its end, and measures the server's share of its core
    /// while the generator measures: over the middle of a timed window (away from connecting,
    /// priming and the last replies), or from the end of the warm-up to the end of a load of a
    /// fixed number of requests.
    fn load(&self, label: &str, spec: &LoadSpec, server: &Server) -> Result<LoadReport, String> {
        let timed = spec.requests.is_none();
        let load = self.spawn_load(spec)?;
        thread::sleep(
            spec.warmup
                + if timed {
                    spec.duration / 10
                } else {
                    Duration::ZERO
                },
        );
        let meter = CpuMeter::start(server.proc.pid(), self.cpus.server);
        let mut server_cpu = None;
        if timed {
            thread::sleep(spec.duration * 7 / 10);
            server_cpu = meter.read();
        }
        let mut report = self.finish_load(load, spec)?;
        report.server_cpu = server_cpu.or_else(|| meter.read());
        self.record_load(label, &report);
        Ok(report)
    }

    /// A sentence on the loads whose server's CPU did other work too, if any did.
    fn disturbance(&self) -> Option<String> {
        let disturbed = self.disturbed_loads.get();
        (disturbed > 0).then(|| {
            format!(
                "In {disturbed} of {} single-server loads, processes outside the bench used \
                 {OTHER_WORK_PERCENT}% or more of the server's CPU (marked OTHER WORK under \
                 \"Every run\"): this machine is shared, and those runs are slower than they \
                 should be.",
                self.measured_loads.get()
            )
        })
    }

    /// Notes the prototype's event loop from its log (`... (asyncio.unix_events event loop)`).
    fn note_event_loop(&self, server: &Server) {
        let log = std::fs::read_to_string(&server.log).unwrap_or_default();
        let found = log.lines().find_map(|line| {
            let (_, tail) = line.rsplit_once(" (")?;
            Some(tail.strip_suffix(" event loop)")?.to_string())
        });
        if found.is_some() {
            *self.event_loop.borrow_mut() = found;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The table

/// Which way a figure is better; orients the ratio so that above 1 means the herd is better.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

/// What a value counts; every value is kept in the unit named here.
#[derive(Clone, Copy)]
enum Unit {
    /// Requests per second.
    PerSecond,
    /// A duration, in microseconds.
    Micros,
    /// Memory, in bytes, shown in MiB.
    MiB,
    /// Memory, in bytes.
    Bytes,
    Count,
}

impl Unit {
    fn format(self, value: f64) -> String {
        match self {
            Unit::PerSecond => fmt_rate(value),
            Unit::Micros => fmt_micros(value),
            Unit::MiB if value % (1024.0 * 1024.0) == 0.0 => {
                format!("{:.0} MiB", value / (1024.0 * 1024.0)) // a round target, "64 MiB"
            }
            Unit::MiB => format!("{:.1} MiB", value / (1024.0 * 1024.0)),
            Unit::Bytes => format!("{} B", fmt_count(value)),
            Unit::Count => fmt_count(value),
        }
    }
}

/// A target of issue 3, item 4, for the herd's figure.
#[derive(Clone, Copy)]
enum Goal {
    /// At least this many times better than the prototype.
    Times(f64),
    AtLeast(f64),
    AtMost(f64),
    Below(f64),
}

/// One line of the table.
struct Row {
    figure: String,
    unit: Unit,
    better: Better,
    values: Pair,
    goals: Vec<Goal>,
    /// The short label of this figure in the chart, if it is one of the main figures.
    chart: Option<&'static str>,
    notes: Vec<String>,
}

impl Row {
    fn new(figure: impl Into<String>, unit: Unit, better: Better, values: Pair) -> Row {
        Row {
            figure: figure.into(),
            unit,
            better,
            values,
            goals: Vec::new(),
            chart: None,
            notes: Vec::new(),
        }
    }

    fn goal(mut self, goal: Goal) -> Row {
        self.goals.push(goal);
        self
    }

    fn chart(mut self, label: &'static str) -> Row {
        self.chart = Some(label);
        self
    }

    fn note(mut self, note: impl Into<String>) -> Row {
        self.notes.push(note.into());
        self
    }

    /// How many times better the herd is: above 1, the herd wins.
    fn ratio(&self) -> Option<f64> {
        let (herd, prototype) = (self.values.herd?, self.values.prototype?);
        let ratio = match self.better {
            Better::Higher => herd / prototype,
            Better::Lower => prototype / herd,
        };
        ratio.is_finite().then_some(ratio)
    }

    /// The targets, each with ✓ or ✗ (? when the figure is missing).
    fn target(&self) -> String {
        let checks: Vec<String> = self
            .goals
            .iter()
            .map(|goal| {
                let (text, met) = match *goal {
                    Goal::Times(x) => (format!("≥ {x}×"), self.ratio().map(|r| r >= x)),
                    Goal::AtLeast(v) => (
                        format!("≥ {}", self.unit.format(v)),
                        self.values.herd.map(|h| h >= v),
                    ),
                    Goal::AtMost(v) => (
                        format!("≤ {}", self.unit.format(v)),
                        self.values.herd.map(|h| h <= v),
                    ),
                    Goal::Below(v) => (
                        format!("< {}", self.unit.format(v)),
                        self.values.herd.map(|h| h < v),
                    ),
                };
                let mark = match met {
                    Some(true) => "✓",
                    Some(false) => "✗",
                    None => "?",
                };
                format!("{text} {mark}")
            })
            .collect();
        checks.join(", ")
    }
}

/// The one table the bench prints.
#[derive(Default)]
struct Table {
    rows: Vec<Row>,
}

impl Table {
    const HEADER: [&'static str; 5] = ["figure", "herd", "prototype", "ratio", "target"];

    /// The cells of every row, with footnote numbers on figures that have notes, and the
    /// footnotes.
    fn cells(&self) -> (Vec<[String; 5]>, Vec<String>) {
        let mut footnotes = Vec::new();
        let rows = self
            .rows
            .iter()
            .map(|row| {
                let mut figure = row.figure.clone();
                for note in &row.notes {
                    footnotes.push(note.clone());
                    let _ = write!(figure, " [{}]", footnotes.len());
                }
                let value = |v: Option<f64>| v.map_or("—".to_string(), |v| row.unit.format(v));
                [
                    figure,
                    value(row.values.herd),
                    value(row.values.prototype),
                    row.ratio().map_or("—".to_string(), fmt_ratio),
                    row.target(),
                ]
            })
            .collect();
        (rows, footnotes)
    }

    /// Aligned columns, for the terminal.
    fn to_text(&self) -> String {
        let (rows, footnotes) = self.cells();
        let width = |i: usize| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([Self::HEADER[i].len()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..5).map(width).collect();
        let line = |cells: [&str; 5]| {
            let mut out = String::new();
            for (i, cell) in cells.iter().enumerate() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                // The figure and the target read left to right; numbers line up on the right.
                if i == 0 || i == 4 {
                    let _ = write!(out, "{cell}{}  ", " ".repeat(pad));
                } else {
                    let _ = write!(out, "{}{cell}  ", " ".repeat(pad));
                }
            }
            out.trim_end().to_string() + "\n"
        };
        let dashes: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        let mut out = line(Self::HEADER);
        out.push_str(&line(std::array::from_fn(|i| dashes[i].as_str())));
        for row in &rows {
            out.push_str(&line(row.each_ref().map(String::as_str)));
        }
        for (i, note) in footnotes.iter().enumerate() {
            let _ = writeln!(out, "[{}] {note}", i + 1);
        }
        out
    }

    fn to_markdown(&self) -> String {
        let (rows, footnotes) = self.cells();
        let mut out =
            String::from("| figure | herd | prototype | ratio | target |\n|---|--:|--:|--:|---|\n");
        for row in &rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        if !footnotes.is_empty() {
            out.push('\n');
            for (i, note) in footnotes.iter().enumerate() {
                let _ = writeln!(out, "[{}] {note}  ", i + 1);
            }
        }
        out
    }
}

fn fmt_count(value: f64) -> String {
    if !value.is_finite() {
        return "—".to_string();
    }
    let negative = value < 0.0;
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if negative {
        format!("-{out}")
    } else {
        out
    }
}

fn fmt_rate(per_second: f64) -> String {
    if per_second < 100.0 {
        format!("{per_second:.1}/s")
    } else {
        format!("{}/s", fmt_count(per_second))
    }
}

fn fmt_micros(us: f64) -> String {
    if !us.is_finite() {
        "—".to_string()
    } else if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 && us % 1_000.0 == 0.0 {
        format!("{:.0} ms", us / 1e3) // a round target, "50 ms"
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

fn fmt_ratio(ratio: f64) -> String {
    if ratio >= 10.0 {
        format!("{ratio:.0}×")
    } else if ratio >= 1.0 {
        format!("{ratio:.1}×")
    } else {
        format!("{ratio:.2}×")
    }
}

// ---------------------------------------------------------------------------------------------
// Scenario 1: a lone server

/// Throughput, p50 and p99 rows of a load figure, with a note where the generator, not the
/// server, was the limit.
fn load_rows<T>(
    runs: &Runs<T>,
    report: impl Fn(&T) -> &LoadReport,
    what: &str,
    goals: &[Goal],
    chart: Option<&'static str>,
) -> Vec<Row> {
    let mut throughput = Row::new(
        format!("{what}: throughput"),
        Unit::PerSecond,
        Better::Higher,
        runs.figure(highest, |r| report(r).per_second),
    );
    for goal in goals {
        throughput = throughput.goal(*goal);
    }
    if let Some(label) = chart {
        throughput = throughput.chart(label);
    }
    for imp in Impl::BOTH {
        let bound: Vec<f64> = runs
            .of(imp)
            .iter()
            .map(&report)
            .filter(|r| r.client_bound)
            .map(|r| r.cpu_percent)
            .collect();
        if let Some(cpu) = highest(&bound) {
            throughput = throughput.note(format!(
                "{imp}: the load generator was client-bound ({cpu:.0}% of its core) in {} of \
                 {} runs: the figure is at least partly the client's limit",
                bound.len(),
                runs.of(imp).len()
            ));
        }
    }
    for imp in Impl::BOTH {
        let server_cpu: Vec<f64> = runs
            .of(imp)
            .iter()
            .filter_map(|r| Some(report(r).server_cpu?.process))
            .collect();
        if let Some(cpu) = highest(&server_cpu).filter(|cpu| *cpu < 80.0) {
            throughput = throughput.note(format!(
                "{imp}: the server used at most {cpu:.0}% of its core over a run: something \
                 else set the pace"
            ));
        }
    }
    vec![
        throughput,
        Row::new(
            format!("{what}: p50 latency"),
            Unit::Micros,
            Better::Lower,
            runs.figure(lowest, |r| report(r).p50_us),
        ),
        Row::new(
            format!("{what}: p99 latency"),
            Unit::Micros,
            Better::Lower,
            runs.figure(lowest, |r| report(r).p99_us),
        ),
    ]
}

/// IAMAT at a lone server (no neighbours: it compares with any single-threaded key-value
/// server): 50 connections with 1 and with 16 commands in flight, then one request per
/// connection, 50 under way at once, as the course's test clients talk.
fn lone_iamat(bench: &Bench) -> Result<Vec<Row>, String> {
    let plan = &bench.plan;
    let runs = bench.alternate(|imp, round| {
        // The ceiling runs in the herd's turn, just before it, on the same footing.
        let ceiling = match imp {
            Impl::Herd => Some(ceiling_loads(bench, round)?),
            Impl::Prototype => None,
        };
        let lone = Cluster::start(bench, imp, LONE, None)?;
        let server = &lone.servers[0];
        let base = LoadSpec::iamat(server.addr, plan.load, plan.warmup);
        let one = bench.load(&format!("lone 50×1, {imp} round {round}"), &base, server)?;
        let sixteen = LoadSpec {
            in_flight: 16,
            ..base.clone()
        };
        let sixteen = bench.load(
            &format!("lone 50×16, {imp} round {round}"),
            &sixteen,
            server,
        )?;
        let one_shot = load_one_shot(bench, &imp.to_string(), round, base, server)?;
        if imp == Impl::Prototype {
            bench.note_event_loop(server);
        }
        Ok(([one, sixteen, one_shot], ceiling))
    })?;
    let mut rows = load_rows(
        &runs,
        |r| &r.0[0],
        "Lone server IAMAT, 50 conns × 1 in flight",
        &[Goal::Times(30.0), Goal::AtLeast(90_000.0)],
        Some("lone server, 1 in flight (IAMAT/s)"),
    );
    let throughput = |i: usize| runs.figure(highest, |r| r.0[i].per_second);
    let ceiling_of = |i: usize| {
        let ceiling = runs.of(Impl::Herd).iter().filter_map(|r| r.1.as_ref());
        highest(&ceiling.map(|c| c[i].per_second).collect::<Vec<_>>())
    };
    rows.push(ceiling_row(
        "50 conns × 1 in flight",
        ceiling_of(0),
        throughput(0),
        30.0,
    ));
    rows.extend(load_rows(
        &runs,
        |r| &r.0[1],
        "Lone server IAMAT, 50 conns × 16 in flight",
        &[Goal::AtLeast(500_000.0)],
        Some("lone server, 16 in flight (IAMAT/s)"),
    ));
    let mut one_shot = load_rows(
        &runs,
        |r| &r.0[2],
        &format!(
            "One IAMAT per connection, 50 at once, {} connections",
            fmt_count(plan.one_shot_connections as f64)
        ),
        &[Goal::Times(5.0)],
        Some("one request per connection (req/s)"),
    );
    one_shot[0].notes.push(
        "each run is a fixed number of connections to a freshly started server. The client \
         closes first, so every connection leaves a socket in TIME_WAIT for 60 s; the \
         generator spreads its connections over 64 loopback source addresses (--sources), \
         or after some 28,000 connections every connect() would search the one address's \
         ports for one to recycle (3-second runs from one address measured about 14,000/s \
         for the herd, with the generator's core saturated and the server's 80% idle)"
            .to_string(),
    );
    rows.extend(one_shot);
    rows.push(ceiling_row(
        "one IAMAT per connection",
        ceiling_of(1),
        throughput(2),
        5.0,
    ));
    Ok(rows)
}

/// One IAMAT per connection against `server` (`who`'s), 50 connections under way at once, for
/// a fixed number of connections (see the note on the row), spread over loopback source
/// addresses where the generator can do that.
fn load_one_shot(
    bench: &Bench,
    who: &str,
    round: usize,
    base: LoadSpec,
    server: &Server,
) -> Result<LoadReport, String> {
    let spec = LoadSpec {
        one_shot: true,
        requests: Some(bench.plan.one_shot_connections),
        duration: LOAD_SLACK,
        warmup: Duration::from_millis(20),
        sources: cfg!(target_os = "linux").then_some(64),
        ..base
    };
    let label = format!(
        "one-shot, {who} round {round} ({} sockets in TIME_WAIT before)",
        time_wait_sockets().map_or("?".to_string(), |n| fmt_count(n as f64))
    );
    bench.load(&label, &spec, server)
}

/// The 50 × 1 and one-shot loads against a fresh ceiling server.
fn ceiling_loads(bench: &Bench, round: usize) -> Result<[LoadReport; 2], String> {
    let server = start_ceiling(bench)?;
    let base = LoadSpec::iamat(server.addr, bench.plan.load, bench.plan.warmup);
    let one = bench.load(&format!("lone 50×1, ceiling round {round}"), &base, &server)?;
    let one_shot = load_one_shot(bench, "ceiling", round, base, &server)?;
    Ok([one, one_shot])
}

/// Starts this bench binary as the ceiling server (`ceiling.rs`) on the server CPU.
fn start_ceiling(bench: &Bench) -> Result<Server, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the bench itself: {e}"))?;
    let mut command = Command::new(exe);
    command.arg(CEILING_FLAG);
    pin(&mut command, bench.cpus.server);
    let mut proc = Proc::spawn("ceiling server", &mut command)?;
    let (addr, log) = proc.wait_line(SERVER_READY_TIMEOUT, |line| {
        parse_ready_line(line, ceiling::NAME, Path::new("/"))
    })?;
    Ok(Server {
        name: ceiling::NAME.to_string(),
        addr,
        log,
        proc,
    })
}

/// A row of the ceiling's throughput under a load, in the herd's column, against the
/// prototype's. The note says whether the target ratio `times` is within the best that this
/// load reached against any server, the herd and the bare one.
fn ceiling_row(what: &str, ceiling: Option<f64>, measured: Pair, times: f64) -> Row {
    let mut row = Row::new(
        format!("Ceiling of this machine, {what} (a bare server, in the herd's column)"),
        Unit::PerSecond,
        Better::Higher,
        Pair {
            herd: ceiling,
            prototype: measured.prototype,
        },
    );
    if let (Some(ceiling), Some(herd), Some(prototype)) =
        (ceiling, measured.herd, measured.prototype)
    {
        let wanted = prototype * times;
        let reached = ceiling.max(herd);
        row = row.note(format!(
            "the same load, in the herd's turn of each round, against a bare server \
             (benches/herd/ceiling.rs: it copies each IAMAT's fields into its reply, with no \
             clock, checks, store or log). Best runs: the herd {}, the bare server {}. {times}× \
             the prototype, {}, is {}",
            fmt_rate(herd),
            fmt_rate(ceiling),
            fmt_rate(wanted),
            if wanted > reached {
                format!(
                    "{:.0}% above the better of the two: out of this machine's reach",
                    (wanted / reached - 1.0) * 100.0
                )
            } else {
                "within what this load reached".to_string()
            }
        ));
    }
    row
}

// ---------------------------------------------------------------------------------------------
// Scenario 2: the whole herd

/// One herd-wide run.
struct HerdWide {
    acknowledged: u64,
    /// The longest measured window of the loads.
    load_seconds: f64,
    /// From the end of the loads until every server held every marker.
    converge: Duration,
    client_bound: bool,
    /// The five servers' CPU time from the start of the loads until every server held every
    /// marker, `[user, system]` in seconds, where the system tells (`/proc`).
    server_cpu: Option<[f64; 2]>,
}

impl HerdWide {
    fn per_second(&self) -> f64 {
        self.acknowledged as f64 / (self.load_seconds + self.converge.as_secs_f64())
    }

    /// The servers' CPU time per acknowledged update, in µs: `[user, system]`.
    fn cpu_per_update(&self) -> Option<[f64; 2]> {
        let per_update = |seconds: f64| seconds * 1e6 / self.acknowledged.max(1) as f64;
        self.server_cpu.map(|[u, s]| [per_update(u), per_update(s)])
    }
}

/// One round of the herd-wide scenario, for one implementation.
struct HerdWideRound {
    /// The run as the herd is meant to run: every line logged to disk.
    logged: HerdWide,
    /// In the herd's turn only, before `logged`: the same run with every server's log file
    /// linked to `/dev/null`.
    discarded: Option<HerdWide>,
}

/// The five-server herd of 2023 absorbing IAMAT at every server at once (one load generator per
/// server, distinct client ids), counted until every server holds every record. On two cores
/// this measures the total work per update, which flooding multiplies by the herd's size.
///
/// In its turn of each round the herd also runs with its logs linked to `/dev/null`: every
/// line is still formatted and written, but the kernel keeps nothing. From the servers' CPU
/// time in the two runs, [`herd_wide_budget`] tells what writing the log costs per update,
/// what the kernel's TCP work costs without it, and what that leaves of the time per update
/// that 30 times the prototype allows.
fn herd_wide(bench: &Bench) -> Result<Vec<Row>, String> {
    let runs = bench.alternate(|imp, round| {
        // A failure here costs the comparison, not the scenario's other rows.
        let discarded = match imp {
            Impl::Herd => {
                let label = format!("logs to /dev/null, round {round}");
                herd_wide_run(bench, imp, &label, Logs::Discarded)
                    .map_err(|e| bench.problem(format!("herd-wide, {label}: {e}")))
                    .ok()
            }
            Impl::Prototype => None,
        };
        let logged = herd_wide_run(bench, imp, &format!("round {round}"), Logs::Files)?;
        Ok(HerdWideRound { logged, discarded })
    })?;
    let mut absorbed = Row::new(
        "Herd-wide IAMAT, 5 servers loaded at once, until all hold all",
        Unit::PerSecond,
        Better::Higher,
        runs.figure(highest, |r| r.logged.per_second()),
    )
    .goal(Goal::Times(30.0))
    .chart("herd-wide IAMAT, all 5 servers (updates/s)")
    .note(
        "acknowledged IAMATs ÷ (load seconds + time until every server held a marker sent \
         after the load); 5 load generators share one core",
    );
    for imp in Impl::BOTH {
        if runs.of(imp).iter().any(|r| r.logged.client_bound) {
            absorbed = absorbed.note(format!(
                "{imp}: some of the 5 load generators were client-bound"
            ));
        }
    }
    let prototype = absorbed.values.prototype;
    let herd_rounds = runs.of(Impl::Herd);
    let cpu: Vec<[[f64; 2]; 2]> = herd_rounds
        .iter()
        .filter_map(|r| {
            let discarded = r.discarded.as_ref()?.cpu_per_update()?;
            Some([r.logged.cpu_per_update()?, discarded])
        })
        .collect();
    if let Some(prototype) = prototype {
        if let Some(budget) = herd_wide_budget(&cpu, prototype * 30.0) {
            absorbed = absorbed.note(budget);
        }
    }
    let discarded = highest(
        &herd_rounds
            .iter()
            .filter_map(|r| r.discarded.as_ref().map(HerdWide::per_second))
            .collect::<Vec<_>>(),
    );
    let discarded = Row::new(
        "Herd-wide IAMAT, logs linked to /dev/null (the herd only)",
        Unit::PerSecond,
        Better::Higher,
        Pair {
            herd: discarded,
            prototype: None,
        },
    )
    .note(
        "the same run in the herd's turn of each round, before the herd's own, with every \
         server's log file linked to /dev/null: every line is still formatted and written, but \
         the kernel keeps nothing",
    );
    let converged = Row::new(
        "Herd-wide: convergence after the load ends",
        Unit::Micros,
        Better::Lower,
        runs.figure(lowest, |r| r.logged.converge.as_secs_f64() * 1e6),
    );
    Ok(vec![absorbed, discarded, converged])
}

/// What the servers' CPU time per update says of the herd-wide target. The five servers share
/// one core, so 30 times the prototype, `wanted` updates a second, leaves 1 s ÷ `wanted` of
/// server time for each update. Each round gives `[logged, discarded]`, each `[user, system]`
/// in µs: the run logging to disk and the run logging to `/dev/null`. Their difference is what
/// writing the log costs (the kernel's page cache and disk work, and the caches they evict);
/// the second run's system time is the kernel's TCP and epoll work. What those two leave of
/// the budget is all the herd's own work (parsing, merging into the stores, flooding, formatting
/// the log lines) may take; it takes the second run's user time. The verdict is the round's
/// most favourable to the target.
fn herd_wide_budget(rounds: &[[[f64; 2]; 2]], wanted: f64) -> Option<String> {
    struct Split {
        needed: f64,
        log: f64,
        kernel: f64,
        left: f64,
        own: f64,
    }
    let total = |[user, system]: [f64; 2]| user + system;
    let budget = 1e6 / wanted;
    let splits: Vec<Split> = rounds
        .iter()
        .map(|&[logged, discarded]| {
            let log = total(logged) - total(discarded);
            Split {
                needed: total(logged),
                log,
                kernel: discarded[1],
                left: budget - log - discarded[1],
                own: discarded[0],
            }
        })
        .collect();
    // How many times faster the herd's own work would have to run.
    let short = |s: &Split| {
        if s.left > 0.0 {
            s.own / s.left
        } else {
            f64::INFINITY
        }
    };
    let best = splits.iter().min_by(|a, b| short(a).total_cmp(&short(b)))?;
    let range = |of: fn(&Split) -> f64| {
        let values: Vec<f64> = splits.iter().map(of).collect();
        let (low, high) = (
            lowest(&values).unwrap_or(0.0),
            highest(&values).unwrap_or(0.0),
        );
        if format!("{low:.2}") == format!("{high:.2}") {
            format!("{low:.2} µs")
        } else {
            format!("{low:.2}–{high:.2} µs")
        }
    };
    let verdict = if best.left <= 0.0 {
        "nothing is left for the herd's own work in any round: out of this machine's reach \
         while every line is logged to disk and the records travel over TCP"
            .to_string()
    } else if best.own <= best.left {
        "in the round most favourable to the target, the herd's own work fits".to_string()
    } else {
        format!(
            "in the round most favourable to the target, that is {:.1} times what is left",
            short(best)
        )
    };
    Some(format!(
        "the servers' CPU time per update, from the start of the loads until every server held \
         every marker, over the herd's rounds: {} logging to disk. The five servers share one \
         core: 30× the prototype, {}, leaves {budget:.2} µs an update. Writing the log costs \
         {} an update (against the same round's run logging to /dev/null), and without it the \
         kernel's TCP and epoll work takes {}. That leaves {} for the herd's own work, which \
         takes {} (user time logging to /dev/null); {verdict}",
        range(|s| s.needed),
        fmt_rate(wanted),
        range(|s| s.log),
        range(|s| s.kernel),
        range(|s| s.left),
        range(|s| s.own),
    ))
}

/// One herd-wide run (see [`herd_wide`]) of `imp`, its servers logging where `logs` says.
fn herd_wide_run(bench: &Bench, imp: Impl, label: &str, logs: Logs) -> Result<HerdWide, String> {
    let herd = Cluster::start_with_logs(bench, imp, HERD_2023, None, logs)?;
    herd.await_links()?;
    let servers_cpu = || {
        herd.servers
            .iter()
            .map(|s| cpu_split(s.proc.pid()))
            .try_fold([0.0, 0.0], |[u, s], cpu| {
                cpu.map(|[cu, cs]| [u + cu, s + cs])
            })
    };
    let cpu_before = servers_cpu();
    // Closed loop at every server at once, measured from the first command (no warm-up), so
    // that every acknowledged update counts.
    let specs: Vec<LoadSpec> = herd
        .servers
        .iter()
        .map(|s| LoadSpec {
            conns: 10,
            in_flight: 16,
            id_prefix: Some(format!("{}-", s.name.to_lowercase())),
            ..LoadSpec::iamat(s.addr, bench.plan.herd_wide, Duration::ZERO)
        })
        .collect();
    let loads = specs
        .iter()
        .map(|spec| bench.spawn_load(spec))
        .collect::<Result<Vec<_>, _>>()?;
    let mut reports = Vec::with_capacity(loads.len());
    for ((load, spec), server) in loads.into_iter().zip(&specs).zip(&herd.servers) {
        let report = bench.finish_load(load, spec)?;
        bench.record_load(
            &format!("herd-wide at {}, {imp}, {label}", server.name),
            &report,
        );
        reports.push(report);
    }
    let loads_ended = Instant::now();
    let converge = converge(&herd.servers, "after-load", loads_ended, CONVERGE_BOUND)?;
    let server_cpu = match (cpu_before, servers_cpu()) {
        (Some([u0, s0]), Some([u1, s1])) => Some([u1 - u0, s1 - s0]),
        _ => None,
    };
    let run = HerdWide {
        acknowledged: reports.iter().map(|r| r.requests).sum(),
        load_seconds: reports.iter().map(|r| r.seconds).fold(0.0, f64::max),
        converge,
        client_bound: reports.iter().any(|r| r.client_bound),
        server_cpu,
    };
    let cpu = run
        .cpu_per_update()
        .map_or(String::new(), |[user, system]| {
            format!("; server CPU per update {user:.2} µs user + {system:.2} µs system")
        });
    bench.record(format!(
        "herd-wide, {imp}, {label}: {} IAMAT acknowledged in {:.2} s, every server held every \
         marker {} later: {}{cpu}",
        fmt_count(run.acknowledged as f64),
        run.load_seconds,
        fmt_micros(run.converge.as_secs_f64() * 1e6),
        fmt_rate(run.per_second())
    ));
    Ok(run)
}

// ---------------------------------------------------------------------------------------------
// Scenario 3: WHATSAT through the fake Places

/// WHATSAT (bound 5) at a lone server through the HTTPS fake answering `legacy_ok_20.json`,
/// at once and after 20 ms, and how many TLS handshakes the server made: with a keep-alive
/// pool, that is bounded by the pool's size, not by the number of requests.
fn whatsat(bench: &Bench) -> Result<Vec<Row>, String> {
    let plan = &bench.plan;
    let body = fixture("legacy_ok_20.json")?;
    let mut rows = Vec::new();
    for delay_ms in [0u64, 20] {
        let runs = bench.alternate(|imp, round| {
            let delay = Duration::from_millis(delay_ms);
            let fake = FakePlaces::start(Behaviour::ok(body.clone()).delayed(delay));
            // Declared after the fake, so dropped (killed) before it.
            let lone = Cluster::start(bench, imp, LONE, Some(&fake))?;
            let server = &lone.servers[0];
            let spec = LoadSpec {
                mix: "whatsat",
                bound: Some(5),
                radius_km: Some(10),
                ..LoadSpec::iamat(server.addr, plan.load, plan.warmup)
            };
            let label = format!("WHATSAT, Places +{delay_ms} ms, {imp} round {round}");
            let report = bench.load(&label, &spec, server)?;
            let handshakes = fake.handshakes();
            bench.record(format!(
                "{label}: {handshakes} TLS handshakes for {} requests",
                fmt_count(fake.requests().len() as f64)
            ));
            Ok((report, handshakes))
        })?;
        let what = format!("WHATSAT via HTTPS fake, Places +{delay_ms} ms, 50 conns × 1");
        if delay_ms == 0 {
            rows.extend(load_rows(
                &runs,
                |r| &r.0,
                &what,
                &[Goal::Times(10.0)],
                Some("WHATSAT through the HTTPS fake (req/s)"),
            ));
        } else {
            let mut delayed = load_rows(&runs, |r| &r.0, &what, &[], None);
            delayed[0].notes.push(format!(
                "at most {PLACES_POOL_SIZE} requests to Places at once (both servers' pool \
                 size), each taking 20 ms: about {:.0}/s at most",
                PLACES_POOL_SIZE / 0.020
            ));
            rows.extend(delayed);
        }
        rows.push(
            Row::new(
                format!("WHATSAT, Places +{delay_ms} ms: TLS handshakes (most of any round)"),
                Unit::Count,
                Better::Lower,
                runs.figure(highest, |r| r.1 as f64),
            )
            .goal(Goal::AtMost(PLACES_POOL_SIZE)),
        );
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------------
// Scenario 4: propagation

/// One propagation run: the samples of each variant.
struct Propagation {
    idle: Vec<Duration>,
    loaded: Vec<Duration>,
    /// The rate the background load reached.
    loaded_rate: f64,
    goloman: Vec<Duration>,
    goloman_loaded: Vec<Duration>,
    goloman_loaded_rate: f64,
}

/// The IAMAT rate of the background load in the loaded variants.
const BACKGROUND_RATE: u64 = 20_000;

/// Time from an IAMAT's reply at one server until WHATSAT at the server farthest from it
/// answers with that record, idle and while a background load sends 20,000 IAMAT/s to the
/// first: Bailey to Jaquez in the 2023 herd (two hops), and Welsh to Hands in the Goloman herd
/// (three hops).
fn propagation(bench: &Bench) -> Result<Vec<Row>, String> {
    /// Long enough for every idle sample; only a broken herd comes near it.
    const IDLE_WINDOW: Duration = Duration::from_secs(60);
    let samples = bench.plan.propagation_samples;
    let runs = bench.alternate(|imp, round| {
        let herd = Cluster::start(bench, imp, HERD_2023, None)?;
        herd.await_links()?;
        let (bailey, jaquez) = (herd.server("Bailey"), herd.server("Jaquez"));
        let idle = propagation_samples(bailey, jaquez, "idle", samples, IDLE_WINDOW)?;
        let label = format!("background load at Bailey, {imp} round {round}");
        let (loaded, loaded_rate) = loaded_propagation(bench, bailey, jaquez, &label)?;
        drop(herd);

        let goloman = Cluster::start(bench, imp, HERD_GOLOMAN, None)?;
        goloman.await_links()?;
        let (welsh, hands) = (goloman.server("Welsh"), goloman.server("Hands"));
        let far = propagation_samples(welsh, hands, "goloman", samples, IDLE_WINDOW)?;
        let label = format!("background load at Welsh, {imp} round {round}");
        let (far_loaded, far_loaded_rate) = loaded_propagation(bench, welsh, hands, &label)?;

        let run = Propagation {
            idle,
            loaded,
            loaded_rate,
            goloman: far,
            goloman_loaded: far_loaded,
            goloman_loaded_rate: far_loaded_rate,
        };
        let describe = |s: &[Duration]| {
            let mut s = s.to_vec();
            format!(
                "{} samples, p50 {}, p99 {}",
                s.len(),
                fmt_micros(percentile_us(&mut s, 50.0)),
                fmt_micros(percentile_us(&mut s, 99.0))
            )
        };
        bench.record(format!(
            "propagation, {imp} round {round}: Bailey→Jaquez idle {}; under load {}; \
             Welsh→Hands idle {}; under load {}",
            describe(&run.idle),
            describe(&run.loaded),
            describe(&run.goloman),
            describe(&run.goloman_loaded)
        ));
        Ok(run)
    })?;

    let pct = |pick: fn(&Propagation) -> &Vec<Duration>, p: f64| {
        move |r: &Propagation| percentile_us(&mut pick(r).clone(), p)
    };
    let mut rows = Vec::new();
    /// A figure's name, its samples in a run, its target, and for a loaded variant the rate
    /// its background load reached.
    type Variant = (
        &'static str,
        fn(&Propagation) -> &Vec<Duration>,
        Goal,
        Option<fn(&Propagation) -> f64>,
    );
    let variants: [Variant; 4] = [
        (
            "Propagation Bailey → Jaquez (2 hops), idle",
            |r| &r.idle,
            Goal::Below(1_000.0),
            None,
        ),
        (
            "Propagation Bailey → Jaquez, 20,000 IAMAT/s at Bailey",
            |r| &r.loaded,
            Goal::Below(5_000.0),
            Some(|r| r.loaded_rate),
        ),
        (
            "Propagation Welsh → Hands (Goloman herd, 3 hops), idle",
            |r| &r.goloman,
            Goal::Below(1_000.0),
            None,
        ),
        (
            "Propagation Welsh → Hands, 20,000 IAMAT/s at Welsh",
            |r| &r.goloman_loaded,
            Goal::Below(5_000.0),
            Some(|r| r.goloman_loaded_rate),
        ),
    ];
    for (i, (what, pick, goal, background)) in variants.into_iter().enumerate() {
        rows.push(Row::new(
            format!("{what}: p50"),
            Unit::Micros,
            Better::Lower,
            runs.figure(lowest, pct(pick, 50.0)),
        ));
        let mut p99 = Row::new(
            format!("{what}: p99"),
            Unit::Micros,
            Better::Lower,
            runs.figure(lowest, pct(pick, 99.0)),
        )
        .goal(goal);
        if i == 0 {
            p99 = p99.chart("propagation p99, idle, 2 hops");
        }
        if let Some(rate) = background {
            let reached = runs.figure(lowest, rate);
            let count = runs.figure(lowest, |r| pick(r).len() as f64);
            p99 = p99.note(format!(
                "the background load reached {} (herd) and {} (prototype) of the {} asked; \
                 the fewest samples in a round: {} (herd), {} (prototype) of {samples}",
                reached.herd.map_or("—".into(), fmt_rate),
                reached.prototype.map_or("—".into(), fmt_rate),
                fmt_rate(BACKGROUND_RATE as f64),
                count.herd.map_or("—".into(), fmt_count),
                count.prototype.map_or("—".into(), fmt_count),
            ));
        }
        rows.push(p99);
    }
    Ok(rows)
}

/// Propagation samples from `from` to `to` while a background load sends [`BACKGROUND_RATE`]
/// IAMAT/s to `from`, and the rate the load reached. The load is recorded as `label`, with
/// `from`'s share of its core.
fn loaded_propagation(
    bench: &Bench,
    from: &Server,
    to: &Server,
    label: &str,
) -> Result<(Vec<Duration>, f64), String> {
    let plan = &bench.plan;
    // The background load runs a little longer than the sampling window, which starts once its
    // warm-up is over.
    let warmup = Duration::from_millis(300);
    let spec = LoadSpec {
        conns: 10,
        in_flight: 16,
        rate: Some(BACKGROUND_RATE),
        id_prefix: Some("background-".to_string()),
        ..LoadSpec::iamat(
            from.addr,
            plan.loaded_window + Duration::from_millis(500),
            warmup,
        )
    };
    let background = bench.spawn_load(&spec)?;
    thread::sleep(warmup + Duration::from_millis(100));
    // The other servers share the loaded server's CPU: only its own share is of interest.
    let meter = CpuMeter::start(from.proc.pid(), None);
    let loaded = propagation_samples(
        from,
        to,
        "loaded",
        plan.propagation_samples,
        plan.loaded_window,
    );
    // The server's share of its core over the whole window (the load goes on past it): the
    // samples alone may take a few milliseconds, shorter than the kernel's CPU clock tick.
    thread::sleep(plan.loaded_window.saturating_sub(meter.since.elapsed()));
    let cpu = meter.read();
    let mut background = bench.finish_load(background, &spec)?;
    background.server_cpu = cpu;
    bench.record_load(label, &background);
    Ok((loaded?, background.per_second))
}

// ---------------------------------------------------------------------------------------------
// Scenario 5: memory

/// Resident sizes of one lone server.
struct Memory {
    start: f64,
    with_idle: f64,
    idle_connections: usize,
    stored_start: f64,
    stored_end: f64,
    /// Clients stored (the prototype may not store them all in its time).
    stored: u64,
    stored_seconds: f64,
    /// The average length of the stored AT lines.
    at_line_bytes: f64,
}

impl Memory {
    fn per_connection(&self) -> f64 {
        (self.with_idle - self.start) / self.idle_connections as f64
    }

    /// Bytes per stored client beyond the AT line itself.
    fn per_client_overhead(&self) -> f64 {
        (self.stored_end - self.stored_start) / self.stored as f64 - self.at_line_bytes
    }
}

/// Resident size of a lone server at start and with `n` idle client connections open (opened
/// from this process, which raised its own open-file limit).
fn rss_with_idle_connections(bench: &Bench, imp: Impl, n: usize) -> Result<(f64, f64), String> {
    let lone = Cluster::start(bench, imp, LONE, None)?;
    let server = &lone.servers[0];
    let pid = server.proc.pid();
    let start = rss_bytes(pid)?;
    let fds_at_start = open_fds(pid)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut connections = Vec::with_capacity(n);
    for _ in 0..n {
        let connection = TcpStream::connect_timeout(&server.addr, Duration::from_secs(5))
            .map_err(|e| format!("idle connection {}: {e}", connections.len() + 1))?;
        connections.push(connection);
        if Instant::now() >= deadline {
            return Err(format!("only {} connections in 60 s", connections.len()));
        }
    }
    // connect() returns once the kernel queued the connection: count the server's descriptors
    // to know that it has accepted (and allocated for) every one.
    let accepted = Instant::now() + Duration::from_secs(30);
    while open_fds(pid)? < fds_at_start + n {
        if Instant::now() >= accepted {
            return Err(format!(
                "{imp} accepted {} of {n} connections in 30 s",
                open_fds(pid)?.saturating_sub(fds_at_start)
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
    let with_idle = rss_bytes(pid)?;
    drop(connections);
    Ok((start, with_idle))
}

/// The average decimal length of the numbers `0..n`: the number part of generated client ids.
fn average_digits(n: u64) -> f64 {
    let mut total = 0u64;
    let mut low = 0u64;
    let mut digits = 1u64;
    while low < n {
        let high = (low.max(1) * 10).min(n); // numbers with `digits` digits: low..high
        total += (high - low) * digits;
        low = high;
        digits += 1;
    }
    total as f64 / n.max(1) as f64
}

/// Resident size of a lone server at start and after `n` distinct clients have sent one IAMAT
/// each (or as many as it stored within the plan's budget), and the average stored AT line.
fn rss_with_stored_clients(
    bench: &Bench,
    imp: Impl,
    n: u64,
) -> Result<(f64, f64, LoadReport, f64), String> {
    const PREFIX: &str = "mem-";
    let lone = Cluster::start(bench, imp, LONE, None)?;
    let server = &lone.servers[0];
    let pid = server.proc.pid();
    let start = rss_bytes(pid)?;
    let spec = LoadSpec {
        conns: 50,
        in_flight: 16,
        clients: Some(n),
        requests: Some(n),
        id_prefix: Some(PREFIX.to_string()),
        ..LoadSpec::iamat(server.addr, bench.plan.stored_budget, Duration::ZERO)
    };
    let label = format!("{} stored clients, {imp}", fmt_count(n as f64));
    let report = bench.load(&label, &spec, server)?;
    let end = rss_bytes(pid)?;
    // The stored line of one generated client, as the server holds it; the others differ
    // only in the digits of their number.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = Client::connect(server.addr)?;
    client.send(format!("WHATSAT {PREFIX}1 10 1\n").as_bytes())?;
    let line = client.read_whatsat_reply(deadline)?;
    if !line.starts_with(b"AT ") {
        return Err(format!(
            "WHATSAT {PREFIX}1 after the load was answered {:?}",
            line.escape_ascii().to_string()
        ));
    }
    let stored = report.requests.min(n);
    let at_line = (line.len() - 1) as f64 + average_digits(stored);
    Ok((start, end, report, at_line))
}

/// Resident memory of one lone server: at start, with many idle client connections, and with
/// many stored clients. Measured once per implementation: sizes do not drift like timings.
fn memory(bench: &Bench) -> Result<Vec<Row>, String> {
    let plan = &bench.plan;
    let fd_limit = bench.fd_limit;
    // Room for the bench's own descriptors (fake Places, pipes, probes) beside the connections.
    let n = plan
        .idle_connections
        .min(usize::try_from(fd_limit.saturating_sub(200)).unwrap_or(usize::MAX));
    if n < plan.idle_connections {
        bench.problem(format!(
            "the open-file limit is {fd_limit}: {n} idle connections instead of {}",
            plan.idle_connections
        ));
    }
    let mut runs = Runs::new();
    for imp in Impl::BOTH {
        let (start, with_idle) =
            rss_with_idle_connections(bench, imp, n).map_err(|e| format!("{imp}: {e}"))?;
        let (stored_start, stored_end, report, at_line_bytes) =
            rss_with_stored_clients(bench, imp, plan.stored_clients)
                .map_err(|e| format!("{imp}: {e}"))?;
        let run = Memory {
            start,
            with_idle,
            idle_connections: n,
            stored_start,
            stored_end,
            stored: report.requests.min(plan.stored_clients),
            stored_seconds: report.seconds,
            at_line_bytes,
        };
        bench.record(format!(
            "memory, {imp}: {} at start, {} with {} idle connections; {} → {} storing {} \
             clients in {:.1} s (AT lines of {:.1} bytes on average)",
            Unit::MiB.format(run.start),
            Unit::MiB.format(run.with_idle),
            fmt_count(n as f64),
            Unit::MiB.format(run.stored_start),
            Unit::MiB.format(run.stored_end),
            fmt_count(run.stored as f64),
            run.stored_seconds,
            run.at_line_bytes
        ));
        runs.push(imp, run);
    }
    let conns = fmt_count(n as f64);
    let mut per_client = Row::new(
        format!(
            "Memory per stored client beyond its AT line ({} clients)",
            fmt_count(plan.stored_clients as f64)
        ),
        Unit::Bytes,
        Better::Lower,
        runs.figure(lowest, Memory::per_client_overhead),
    )
    .goal(Goal::AtMost(300.0));
    for imp in Impl::BOTH {
        for run in runs.of(imp) {
            if run.stored < plan.stored_clients {
                per_client = per_client.note(format!(
                    "{imp} stored only {} clients in its {} s: the figure is over those",
                    fmt_count(run.stored as f64),
                    plan.stored_budget.as_secs()
                ));
            }
        }
    }
    if let Some(run) = runs.herd.first() {
        per_client = per_client.note(format!(
            "(RSS after − RSS before) ÷ clients − the average AT line ({:.1} bytes)",
            run.at_line_bytes
        ));
    }
    Ok(vec![
        Row::new(
            "Resident memory at start",
            Unit::MiB,
            Better::Lower,
            runs.figure(lowest, |r| r.start),
        ),
        Row::new(
            format!("Resident memory with {conns} idle connections"),
            Unit::MiB,
            Better::Lower,
            runs.figure(lowest, |r| r.with_idle),
        )
        .goal(Goal::AtMost(64.0 * 1024.0 * 1024.0))
        .chart("resident memory, 10,000 idle connections"),
        Row::new(
            "Memory per idle connection",
            Unit::Bytes,
            Better::Lower,
            runs.figure(lowest, Memory::per_connection),
        ),
        per_client,
    ])
}

// ---------------------------------------------------------------------------------------------
// Scenario 6: start-up

/// Time from spawning a lone server until it answers an IAMAT: connect attempts back to back
/// (a refused connect on loopback fails at once), each followed by an IAMAT.
fn time_to_first_answer(bench: &Bench, imp: Impl) -> Result<Duration, String> {
    let dir = TempDir::new("startup");
    let port = free_ports(1)?[0];
    let config = write_config(&dir, LONE, &[port], None)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut command = imp.serve_command("Bailey", &config);
    command
        .current_dir(&dir.path)
        .env_remove("GOOGLE_PLACES_API_KEY");
    pin(&mut command, bench.cpus.server);
    let spawned = Instant::now();
    let _server = Proc::spawn(format!("{imp} Bailey"), &mut command)?;
    let deadline = spawned + SERVER_READY_TIMEOUT;
    loop {
        if let Ok(stream) = TcpStream::connect(addr) {
            let _ = stream.set_nodelay(true);
            let _ = stream.set_read_timeout(Some(READ_STEP));
            let mut client = Client {
                stream,
                addr,
                buf: Vec::new(),
            };
            if client.iamat("startup", deadline).is_ok() {
                return Ok(spawned.elapsed());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{imp} did not answer within {SERVER_READY_TIMEOUT:?}"
            ));
        }
        thread::sleep(Duration::from_micros(200));
    }
}

/// Start-up time, the median of a few tries, alternating the implementations.
fn startup(bench: &Bench) -> Result<Vec<Row>, String> {
    let mut runs = Runs::new();
    for _ in 0..bench.plan.startup_samples {
        for imp in Impl::BOTH {
            runs.push(imp, time_to_first_answer(bench, imp)?);
        }
    }
    for imp in Impl::BOTH {
        let times: Vec<String> = runs
            .of(imp)
            .iter()
            .map(|d| fmt_micros(d.as_secs_f64() * 1e6))
            .collect();
        bench.record(format!("start-up, {imp}: {}", times.join(", ")));
    }
    let median = |times: &[f64]| -> Option<f64> {
        let mut times = times.to_vec();
        times.sort_by(f64::total_cmp);
        times.get(times.len() / 2).copied()
    };
    Ok(vec![Row::new(
        format!(
            "Start-up: spawn to first IAMAT answered (median of {})",
            bench.plan.startup_samples
        ),
        Unit::Micros,
        Better::Lower,
        runs.figure(median, |d| d.as_secs_f64() * 1e6),
    )
    .goal(Goal::AtMost(50_000.0))
    .chart("start-up to first answer")])
}

// ---------------------------------------------------------------------------------------------
// The machine, the chart and the files

/// What the figures were measured on.
struct Machine {
    cpus: usize,
    model: String,
    kernel: String,
    python: String,
    commit: String,
    /// When the bench ran, UTC.
    date: String,
}

/// Runs a short command and returns its trimmed stdout, or "" if it fails.
fn command_output(program: &str, args: &[&str]) -> String {
    let mut command = Command::new(program);
    command.args(args).current_dir(manifest_dir());
    match Proc::spawn(program, &mut command) {
        Ok(mut proc) => proc
            .finish(Duration::from_secs(10))
            .map(|out| out.trim().to_string())
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

impl Machine {
    fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map_or("unknown CPU".to_string(), |(_, m)| m.trim().to_string());
        let cpus = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or("unknown".to_string(), |k| k.trim().to_string());
        let python = command_output("python3", &["--version"]);
        let commit = command_output("git", &["describe", "--always", "--dirty"]);
        let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
        Machine {
            cpus,
            model,
            kernel,
            python,
            commit,
            date,
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} × {}, Linux {}, {}",
            self.cpus, self.model, self.kernel, self.python
        )
    }
}

/// Escapes text for SVG.
fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal grouped bar chart of the main figures: per figure, a herd bar and a prototype
/// bar on the figure's own linear scale (the figures have different units), each labelled with
/// its value, and on the right how many times better the herd is.
fn chart_svg(table: &Table, machine: &Machine, event_loop: &str, cpus: &Cpus) -> String {
    const WIDTH: f64 = 1000.0;
    const LABEL_END: f64 = 330.0;
    const BAR_X: f64 = 340.0;
    const BAR_MAX: f64 = 400.0;
    const RATIO_END: f64 = 980.0;
    const TOP: f64 = 100.0;
    const GROUP: f64 = 54.0;
    const HERD_COLOUR: &str = "#d95f02";
    const PROTOTYPE_COLOUR: &str = "#7570b3";

    let rows: Vec<&Row> = table.rows.iter().filter(|r| r.chart.is_some()).collect();
    let height = TOP + GROUP * rows.len() as f64 + 30.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"Helvetica, Arial, sans-serif\" \
         font-size=\"13\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>"
    );
    let _ = writeln!(
        svg,
        "<text x=\"20\" y=\"30\" font-size=\"18\" font-weight=\"bold\">herd (Rust, mio) vs \
         its Python asyncio prototype — {}</text>",
        xml(&format!("{} × {}", machine.cpus, machine.model))
    );
    let _ = writeln!(
        svg,
        "<text x=\"20\" y=\"52\" fill=\"#555\" font-size=\"12\">{}</text>",
        xml(&format!(
            "Linux {}, {} ({} event loop) · logging on · {} · cargo bench --bench herd",
            machine.kernel,
            machine.python,
            event_loop,
            match (cpus.server, cpus.client) {
                (Some(s), Some(c)) => format!("servers on CPU {s}, load on CPU {c}"),
                _ => "one CPU, nothing pinned".to_string(),
            }
        ))
    );
    // The legend.
    let _ = writeln!(
        svg,
        "<rect x=\"20\" y=\"66\" width=\"14\" height=\"14\" fill=\"{HERD_COLOUR}\"/>\
         <text x=\"40\" y=\"78\">herd</text>\
         <rect x=\"100\" y=\"66\" width=\"14\" height=\"14\" fill=\"{PROTOTYPE_COLOUR}\"/>\
         <text x=\"120\" y=\"78\">prototype</text>\
         <text x=\"220\" y=\"78\" fill=\"#555\" font-size=\"12\">each figure on its own scale; \
         right: how many times better the herd is</text>"
    );
    for (i, row) in rows.iter().enumerate() {
        let y = TOP + GROUP * i as f64;
        let direction = match row.better {
            Better::Higher => "higher is better",
            Better::Lower => "lower is better",
        };
        let _ = writeln!(
            svg,
            "<text x=\"{LABEL_END}\" y=\"{}\" text-anchor=\"end\" font-weight=\"bold\">{}</text>\
             <text x=\"{LABEL_END}\" y=\"{}\" text-anchor=\"end\" fill=\"#666\" \
             font-size=\"11\">{direction}</text>",
            y + 17.0,
            xml(row.chart.unwrap_or_default()),
            y + 33.0
        );
        let scale = highest(&[
            row.values.herd.unwrap_or(0.0),
            row.values.prototype.unwrap_or(0.0),
        ])
        .filter(|m| *m > 0.0)
        .unwrap_or(1.0);
        let bars = [
            (row.values.herd, HERD_COLOUR, y + 4.0),
            (row.values.prototype, PROTOTYPE_COLOUR, y + 24.0),
        ];
        for (value, colour, bar_y) in bars {
            let length = value.map_or(0.0, |v| (BAR_MAX * v / scale).max(2.0));
            let text = value.map_or("not measured".to_string(), |v| row.unit.format(v));
            let _ = writeln!(
                svg,
                "<rect x=\"{BAR_X}\" y=\"{bar_y}\" width=\"{length:.1}\" height=\"17\" \
                 fill=\"{colour}\"/><text x=\"{:.1}\" y=\"{}\">{}</text>",
                BAR_X + length + 6.0,
                bar_y + 13.0,
                xml(&text)
            );
        }
        if let Some(ratio) = row.ratio() {
            let (colour, words) = if ratio >= 1.0 {
                ("#1b7837", format!("{} better", fmt_ratio(ratio)))
            } else {
                ("#b2182b", format!("{} (worse)", fmt_ratio(ratio)))
            };
            let _ = writeln!(
                svg,
                "<text x=\"{RATIO_END}\" y=\"{}\" text-anchor=\"end\" font-weight=\"bold\" \
                 font-size=\"15\" fill=\"{colour}\">{}</text>",
                y + 24.0,
                xml(&words)
            );
        }
        for goal in &row.goals {
            if let Goal::Times(times) = goal {
                let _ = writeln!(
                    svg,
                    "<text x=\"{RATIO_END}\" y=\"{}\" text-anchor=\"end\" fill=\"#666\" \
                     font-size=\"11\">target ≥ {times}×</text>",
                    y + 39.0
                );
            }
        }
        let _ = writeln!(
            svg,
            "<line x1=\"20\" x2=\"{RATIO_END}\" y1=\"{y2}\" y2=\"{y2}\" stroke=\"#ddd\"/>",
            y2 = y + GROUP - 6.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// `results.md`: how the figures were made, the table, every run, and any problem.
fn results_markdown(bench: &Bench, table: &Table, machine: &Machine, took: Duration) -> String {
    let event_loop = bench
        .event_loop
        .borrow()
        .clone()
        .unwrap_or("unknown".into());
    let mut md = String::from("# herd vs its Python asyncio prototype\n\n");
    let _ = writeln!(md, "- Machine: {}", machine.describe());
    let _ = writeln!(md, "- Date: {}", machine.date);
    let _ = writeln!(
        md,
        "- Command: `cargo bench --bench herd{}` (commit {}, took {})",
        if bench.plan.smoke { " -- --smoke" } else { "" },
        if machine.commit.is_empty() {
            "unknown"
        } else {
            &machine.commit
        },
        fmt_minutes(took)
    );
    let _ = writeln!(
        md,
        "- The prototype ran on the `{event_loop}` event loop (uvloop is used when installed)."
    );
    let _ = writeln!(md, "- {}; logging on.", bench.cpus.describe());
    let _ = writeln!(
        md,
        "- Each figure is the better of {} rounds, herd and prototype run in alternation on \
         freshly started servers; memory is measured once, start-up is a median. A ratio above \
         1 means the herd is better.",
        bench.plan.rounds
    );
    if let Some(disturbed) = bench.disturbance() {
        let _ = writeln!(md, "- {disturbed}");
    }
    md.push('\n');
    md.push_str("![herd vs prototype](herd-vs-prototype.svg)\n\n");
    md.push_str(&table.to_markdown());
    md.push_str("\n## Every run\n\n");
    for run in bench.runs.borrow().iter() {
        let _ = writeln!(md, "- {run}");
    }
    let problems = bench.problems.borrow();
    if !problems.is_empty() {
        md.push_str("\n## Problems\n\n");
        for problem in problems.iter() {
            let _ = writeln!(md, "- {problem}");
        }
    }
    md
}

fn fmt_minutes(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Writes `results.md` and the chart into `dir`.
fn write_results(dir: &Path, markdown: &str, svg: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for (name, text) in [("results.md", markdown), ("herd-vs-prototype.svg", svg)] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target"))
}

// ---------------------------------------------------------------------------------------------
// Main

type Scenario = fn(&Bench) -> Result<Vec<Row>, String>;

/// Runs this binary as the ceiling server instead of the bench.
const CEILING_FLAG: &str = "--ceiling-server";

/// The scenarios, in the order they run: a name (which filters match) and its function.
const SCENARIOS: [(&str, Scenario); 6] = [
    ("lone server IAMAT", lone_iamat),
    ("herd-wide IAMAT", herd_wide),
    ("WHATSAT through the HTTPS fake", whatsat),
    ("propagation", propagation),
    ("memory", memory),
    ("start-up", startup),
];

/// What the command line asks for.
#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    /// A tiny round of every scenario.
    smoke: bool,
    /// Also copy the results into `benches/results/`.
    save: bool,
    /// Words: only scenarios whose name contains one of them run.
    filters: Vec<String>,
}

/// What `cargo bench --bench herd -- --help` prints.
fn usage() -> String {
    let names: Vec<&str> = SCENARIOS.iter().map(|(name, _)| *name).collect();
    format!(
        "The herd against its Python asyncio prototype: both run every scenario in alternation,
and one table compares them.

usage: cargo bench --bench herd [-- [OPTION | WORD]...]

  (nothing)   every scenario, a few minutes on two cores; writes results.md and
              herd-vs-prototype.svg to bench/ in the target directory
  --smoke     a tiny round of every scenario, in seconds: both herds build, start and answer
              (what CI runs); its figures mean nothing, and go to bench/smoke/
  --save      after a full run, also copy both files into benches/results/ (ignored with
              --smoke or a WORD)
  WORD        only the scenarios whose name contains WORD, in any case; the partial table goes
              to bench/partial/
  -h, --help  print this and run nothing

Scenarios, in the order they run:
  {}

Exit status: 0 when everything ran; 1 when something did not (a server did not start, a load
reported errors, a record never arrived in time); 2 for an unknown option.",
        names.join("\n  ")
    )
}

/// Reads the bench's arguments; `Ok(None)` asks for the usage. Cargo appends `--bench` when it
/// runs a bench without the test harness, so that flag is accepted and means nothing.
fn parse_args(args: &[String]) -> Result<Option<Options>, String> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(None);
    }
    let mut options = Options::default();
    for arg in args {
        match arg.as_str() {
            "--smoke" => options.smoke = true,
            "--save" => options.save = true,
            "--bench" => {}
            word if !word.starts_with('-') => options.filters.push(word.to_owned()),
            other => {
                return Err(format!(
                    "unknown option {other} (cargo bench --bench herd -- --help lists them)"
                ))
            }
        }
    }
    Ok(Some(options))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == CEILING_FLAG) {
        if let Err(e) = ceiling::serve() {
            eprintln!("ceiling server: {e}");
        }
        return ExitCode::FAILURE; // it serves until killed
    }
    let Options {
        smoke,
        save,
        filters,
    } = match parse_args(&args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("herd bench: {e}");
            return ExitCode::from(2);
        }
    };
    let bench = Bench {
        plan: if smoke { Plan::smoke() } else { Plan::full() },
        cpus: Cpus::detect(),
        // Raised first, so that every server started inherits the raised limit too.
        fd_limit: raise_fd_limit(),
        problems: RefCell::default(),
        runs: RefCell::default(),
        event_loop: RefCell::default(),
        disturbed_loads: Cell::new(0),
        measured_loads: Cell::new(0),
    };
    // This process (probes, markers, the fake Places) belongs with the load, off the servers'
    // CPU; the load generators are pinned there explicitly as well.
    if let Some(cpu) = bench.cpus.client {
        if let Err(e) = set_affinity(cpu) {
            eprintln!("cannot pin the bench to CPU {cpu}: {e}");
        }
    }
    let machine = Machine::detect();
    eprintln!(
        "herd bench{}: {}; {}",
        if smoke { " (smoke round)" } else { "" },
        machine.describe(),
        bench.cpus.describe()
    );

    let chosen = |name: &str| {
        filters.is_empty()
            || filters
                .iter()
                .any(|f| name.to_lowercase().contains(&f.to_lowercase()))
    };
    let started = Instant::now();
    let mut table = Table::default();
    for (name, scenario) in SCENARIOS.into_iter().filter(|(name, _)| chosen(name)) {
        eprintln!("== {name}");
        let t = Instant::now();
        match scenario(&bench) {
            Ok(rows) => table.rows.extend(rows),
            Err(e) => bench.problem(format!("{name} did not run: {e}")),
        }
        eprintln!("   ({})", fmt_minutes(t.elapsed()));
    }
    let took = started.elapsed();

    println!();
    println!("{}", table.to_text());
    println!(
        "{}; {}; best of {} alternated rounds; ratio > 1: the herd is better. Took {}.",
        machine.describe(),
        bench.cpus.describe(),
        bench.plan.rounds,
        fmt_minutes(took)
    );
    if let Some(disturbed) = bench.disturbance() {
        println!("{disturbed}");
    }

    let event_loop = bench
        .event_loop
        .borrow()
        .clone()
        .unwrap_or("asyncio".into());
    let markdown = results_markdown(&bench, &table, &machine, took);
    let svg = chart_svg(&table, &machine, &event_loop, &bench.cpus);
    // A smoke round's figures mean nothing, and a filtered run's table is partial: keep them
    // apart from a full run's, and never save them.
    let out = match (smoke, filters.is_empty()) {
        (false, true) => target_dir().join("bench"),
        (true, _) => target_dir().join("bench/smoke"),
        (false, false) => target_dir().join("bench/partial"),
    };
    if let Err(e) = write_results(&out, &markdown, &svg) {
        bench.problem(e);
    }
    if save && (smoke || !filters.is_empty()) {
        eprintln!("--save is ignored for a smoke round or a filtered run: not a full result");
    } else if save {
        if let Err(e) = write_results(&manifest_dir().join("benches/results"), &markdown, &svg) {
            bench.problem(e);
        }
    }

    let problems = bench.problems.borrow();
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("\n{} problem(s):", problems.len());
        for problem in problems.iter() {
            eprintln!("- {problem}");
        }
        ExitCode::FAILURE
    }
}
