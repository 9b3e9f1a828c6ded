//! Load a test applies while it breaks something, and what the load shows: steady updates whose
//! acknowledgements are remembered ([`Updater`]), timed IAMATs that must stay prompt
//! ([`Pinger`]), `herd load` as a child process ([`Load`]), and a server's resident memory.
//!
//! Each runs on threads of its own (or in its own process) and stops when dropped, also while a
//! failed test unwinds.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{iamat_on, join, lock, Client, LOCATION, POLL_INTERVAL};

/// A liveness bound, not a performance target: an IAMAT answered within this is "prompt".
pub const PROMPT: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Steady updates

/// The latest acknowledged record of each client: (its update number, its AT line).
pub type Acked = BTreeMap<String, (u64, String)>;

/// Steady updates: IAMATs one at a time on one connection per target server, round robin over
/// the targets and the clients, with client times that strictly increase (one millisecond per
/// update from the start), until stopped. Remembers, for each client, the AT line of its
/// latest acknowledged update.
pub struct Updater {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acked>>,
    handle: Option<JoinHandle<()>>,
}

impl Updater {
    pub fn start(
        targets: Vec<(String, SocketAddr)>,
        clients: Vec<String>,
        pause: Duration,
    ) -> Updater {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(Acked::new()));
        let handle = {
            let stop = Arc::clone(&stop);
            let acked = Arc::clone(&shared);
            thread::spawn(move || {
                let base = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .expect("clock after 1970")
                    .as_secs();
                let mut conns: Vec<Client> =
                    targets.iter().map(|(_, a)| Client::connect(*a)).collect();
                let mut n: u64 = 0;
                while !stop.load(Ordering::SeqCst) {
                    let t = n as usize % targets.len();
                    let client = &clients[n as usize % clients.len()];
                    let time = format!("{}.{:09}", base + n / 1000, (n % 1000) * 1_000_000);
                    conns[t].send(format!("IAMAT {client} {LOCATION} {time}\n").as_bytes());
                    let reply = String::from_utf8_lossy(&conns[t].read_line()).into_owned();
                    let server = &targets[t].0;
                    assert!(
                        reply.starts_with(&format!("AT {server} "))
                            && reply.ends_with(&format!(" {client} {LOCATION} {time}\n")),
                        "IAMAT {client} {time} at {server} was answered {reply:?}"
                    );
                    lock(&acked).insert(client.clone(), (n, reply.trim_end().to_owned()));
                    n += 1;
                    thread::sleep(pause);
                }
            })
        };
        Updater {
            stop,
            acked: shared,
            handle: Some(handle),
        }
    }

    /// What has been acknowledged so far.
    pub fn snapshot(&self) -> Acked {
        lock(&self.acked).clone()
    }

    pub fn stop(mut self) -> Acked {
        self.stop.store(true, Ordering::SeqCst);
        join(self.handle.take().expect("running"));
        self.snapshot()
    }
}

impl Drop for Updater {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// The AT lines of the latest acknowledged records: what every converged store holds.
pub fn latest_records(acked: &Acked) -> BTreeSet<String> {
    acked.values().map(|(_, line)| line.clone()).collect()
}

// ---------------------------------------------------------------------------------------------
// Timed IAMATs

/// A client on its own connection that sends an IAMAT every `every` and times each answer,
/// until stopped: the loop's liveness while something else is going on. `start` returns once
/// the first answer is in, so there is always at least one round trip, however short the
/// thing measured.
pub struct Pinger {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Vec<Duration>>>,
}

impl Pinger {
    pub fn start(addr: SocketAddr, server: &str, client: &str, every: Duration) -> Pinger {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let handle = {
            let stop = Arc::clone(&stop);
            let (server, client) = (server.to_owned(), client.to_owned());
            thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut rtts = Vec::new();
                loop {
                    let sent = Instant::now();
                    iamat_on(&mut c, &server, &client);
                    rtts.push(sent.elapsed());
                    if rtts.len() == 1 {
                        let _ = ready_tx.send(());
                    }
                    if stop.load(Ordering::SeqCst) {
                        break rtts;
                    }
                    thread::sleep(every);
                }
            })
        };
        // Whatever is measured starts only once the pings are flowing, however quickly it ends.
        // If the thread died instead, `stop` reports its panic.
        let _ = ready_rx.recv();
        Pinger {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops; returns every round trip, after checking all were prompt.
    pub fn stop(mut self, what: &str) -> Vec<Duration> {
        self.stop.store(true, Ordering::SeqCst);
        let rtts = join(self.handle.take().expect("running"));
        let max = rtts.iter().max().copied().unwrap_or_default();
        assert!(
            max < PROMPT,
            "{what}: an IAMAT took {max:?} to be answered (bound {PROMPT:?}); {} round trips",
            rtts.len()
        );
        rtts
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Round trips as `N IAMATs, p50 ..., max ...`.
pub fn summary(rtts: &[Duration]) -> String {
    let mut sorted = rtts.to_vec();
    sorted.sort();
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize];
    format!(
        "{} IAMATs, p50 {:?}, max {:?}",
        sorted.len(),
        at(0.5),
        at(1.0)
    )
}

// ---------------------------------------------------------------------------------------------
// herd load, and memory

/// `herd load` as a child process, killed if it outlives the test.
pub struct Load {
    child: Option<Child>,
    stdout: Option<JoinHandle<String>>,
}

impl Load {
    /// `herd load --addr ADDR ARGS` (`args` split at white space).
    pub fn start(addr: SocketAddr, args: &str) -> Load {
        let mut command = Command::new(env!("CARGO_BIN_EXE_herd"));
        // Nothing of the environment the tests run in reaches it (it reads `RUST_LOG`).
        for var in super::SERVER_ENV {
            command.env_remove(var);
        }
        let mut child = command
            .arg("load")
            .arg("--addr")
            .arg(addr.to_string())
            .args(args.split_whitespace())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start herd load");
        let mut pipe = child.stdout.take().expect("piped");
        let stdout = thread::spawn(move || {
            let mut out = String::new();
            let _ = pipe.read_to_string(&mut out);
            out
        });
        Load {
            child: Some(child),
            stdout: Some(stdout),
        }
    }

    /// Waits at most `limit` for the end; returns what it printed.
    pub fn finish(mut self, limit: Duration) -> String {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + limit;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL_INTERVAL),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("herd load did not finish within {limit:?}");
                }
            }
        };
        let out = join(self.stdout.take().expect("reader"));
        assert!(status.success(), "herd load exited {status}: {out}");
        out
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// VmRSS of a process, in kB.
pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}
