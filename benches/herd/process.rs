//! Processes: a child that cannot outlive the bench ([`Proc`]), a running server of any stack
//! ([`Server`]), and the servers of one configuration ([`Cluster`]).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::affinity::pin;
use crate::bench::Bench;
use crate::config::{discard_logs, free_ports, write_config, Logs, Settings, TempDir, Topology};
use crate::fake_places::FakePlaces;
use crate::probe::converge;
use crate::stacks::Stack;

/// The API key given to servers in the WHATSAT scenario (the fake accepts any).
const API_KEY: &str = "bench-key";
/// How long a server may take to print its ready line.
pub const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a freshly started herd may take to link up (a marker reaching every server).
const LINK_BOUND: Duration = Duration::from_secs(15);

/// Raises this process's open-file limit to its hard limit (for the idle connections it opens;
/// the servers it starts inherit it too) and returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
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

/// A child process that cannot outlive the bench: dropping it (also while a panic unwinds)
/// kills and reaps it. Threads drain its stdout and stderr into memory, so a chatty child never
/// blocks on a full pipe; stdout also arrives line by line for [`Proc::wait_line`].
pub struct Proc {
    pub label: String,
    pub child: Child,
    pub status: Option<ExitStatus>,
    pub lines: mpsc::Receiver<String>,
    pub stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    drains: Vec<JoinHandle<()>>,
}

/// Copies `pipe` into `into` until end of stream, sending each line to `lines` as well.
pub fn drain(
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

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Proc {
    pub fn spawn(label: impl Into<String>, command: &mut Command) -> Result<Proc, String> {
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

    pub fn pid(&self) -> u32 {
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
    pub fn wait_line<T>(
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
    pub fn finish(&mut self, timeout: Duration) -> Result<String, String> {
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

    /// SIGTERM, then waits up to `timeout` for the process to exit (SIGKILL after that): a
    /// server stops as its operator would stop it, writing what it holds.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(self.pid()).map_err(|e| e.to_string())?;
        // SAFETY: kill only sends a signal to our own child, which has not been reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        match self.wait_exit(timeout) {
            Some(status) => Ok(status),
            None => {
                self.kill();
                Err(format!(
                    "{} did not stop within {timeout:?} of SIGTERM",
                    self.label
                ))
            }
        }
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

/// A running server of any stack.
pub struct Server {
    pub name: String,
    pub addr: SocketAddr,
    pub log: PathBuf,
    pub proc: Proc,
}

/// Parses the ready line every stack prints: `NAME listening on HOST:PORT, logging to
/// PATH` (the path relative to the working directory, `cwd`).
pub fn parse_ready_line(line: &str, name: &str, cwd: &Path) -> Option<(SocketAddr, PathBuf)> {
    let rest = line.trim_end().strip_prefix(name)?;
    let rest = rest.strip_prefix(" listening on ")?;
    let (addr, log) = rest.split_once(", logging to ")?;
    Some((addr.parse().ok()?, cwd.join(log)))
}

/// Starts server `name` of `config` on the server CPU, with the bench's API key or none, and
/// returns once it has printed its ready line.
fn start_server(
    bench: &Bench,
    stack: Stack,
    name: &str,
    config: &Path,
    with_key: bool,
) -> Result<Server, String> {
    let cwd = config
        .parent()
        .expect("the configuration is in a directory");
    let mut command = bench.stacks.serve_command(stack, name, config);
    command.current_dir(cwd).env_remove("GOOGLE_PLACES_API_KEY");
    if with_key {
        command.env("GOOGLE_PLACES_API_KEY", API_KEY);
    }
    pin(&mut command, bench.cpus.server);
    let mut proc = Proc::spawn(format!("{stack} {name}"), &mut command)?;
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
pub struct Cluster {
    pub servers: Vec<Server>,
    pub dir: TempDir,
}

impl Cluster {
    /// Starts every server of `topology`, each on a free port, with the comparison's settings
    /// ([`Bench::settings`]); with the fake as Places (and an API key) when there is one, else
    /// without a key.
    pub fn start(
        bench: &Bench,
        stack: Stack,
        topology: Topology,
        places: Option<&FakePlaces>,
    ) -> Result<Cluster, String> {
        Cluster::start_with(
            bench,
            stack,
            topology,
            places,
            Logs::Files,
            &bench.settings(),
        )
    }

    /// [`Cluster::start`], with the servers' logs where `logs` says and the configuration's
    /// `settings`.
    pub fn start_with(
        bench: &Bench,
        stack: Stack,
        topology: Topology,
        places: Option<&FakePlaces>,
        logs: Logs,
        settings: &Settings,
    ) -> Result<Cluster, String> {
        let dir = TempDir::new(&stack.to_string());
        let ports = free_ports(topology.len())?;
        let config = write_config(&dir, topology, &ports, places, settings)?;
        if logs == Logs::Discarded {
            discard_logs(&dir, topology)?;
        }
        let mut servers = Vec::with_capacity(topology.len());
        for (name, _) in topology {
            let server = start_server(bench, stack, name, &config, places.is_some())?;
            if logs == Logs::Discarded {
                let logs_to = std::fs::canonicalize(&server.log).unwrap_or_default();
                if logs_to != Path::new("/dev/null") {
                    let to = logs_to.display();
                    return Err(format!("{name} logs to {to}, not /dev/null"));
                }
            }
            servers.push(server);
        }
        Ok(Cluster { servers, dir })
    }

    pub fn server(&self, name: &str) -> &Server {
        self.servers
            .iter()
            .find(|s| s.name == name)
            .expect("the server is in the topology")
    }

    /// Waits until the herd is linked: a marker from each server has reached every server.
    pub fn await_links(&self) -> Result<(), String> {
        converge(&self.servers, "links", Instant::now(), LINK_BOUND)
            .map(|_| ())
            .map_err(|e| format!("the herd did not link up: {e}"))
    }
}
