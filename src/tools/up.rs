//! `herd up`: every server of a configuration as a child process of this one, for trying a
//! herd on one machine. Ctrl-C or SIGTERM stops them all; if one of them dies, the rest are
//! stopped too, so a half herd never keeps running unnoticed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

use crate::config::Config;

/// How long children get to exit after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// One server of the herd, as a child process.
struct Running {
    name: String,
    child: Child,
}

/// What `herd up` does with its servers' traces.
#[derive(Debug, Clone, Default)]
pub struct Tracing {
    /// Every server traces its loop (see [`crate::trace`]); `up` prints their traces merged in
    /// time order.
    pub on: bool,
    /// Also draws the merged trace into this file when the herd stops
    /// ([`crate::tools::trace_svg`]).
    pub svg: Option<PathBuf>,
}

/// Runs the herd until a signal; returns the exit code.
pub fn run(config_path: &Path, config: &Config, tracing: &Tracing) -> Result<i32, String> {
    let trace = tracing.on || tracing.svg.is_some();
    let merger = trace.then(|| Merger::start(tracing.svg.is_some()));
    let code = run_herd(
        config_path,
        config,
        trace,
        merger.as_ref().map(Merger::sender),
    );
    if let Some(merger) = merger {
        let lines = merger.finish();
        if let Some(path) = &tracing.svg {
            let svg = crate::tools::trace_svg::draw(&lines.join("\n"));
            std::fs::write(path, svg)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            println!("herd up: the trace is drawn in {}", path.display());
        }
    }
    code
}

/// Starts every server, waits for each one's ready line, then waits for a signal: Ctrl-C or
/// SIGTERM stops the herd, SIGHUP and SIGUSR1 are passed on, and a server that exits stops
/// the rest.
fn run_herd(
    config_path: &Path,
    config: &Config,
    trace: bool,
    traces: Option<Sender<String>>,
) -> Result<i32, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    // Registered before any child exists, so no SIGCHLD is missed.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGCHLD, SIGHUP, SIGUSR1])
        .map_err(|e| format!("cannot catch signals: {e}"))?;
    // The servers of a local herd authenticate each other with a secret made for this run,
    // unless one is configured.
    let configured = crate::peer::secret_from_env().is_some() || config.secret_file.is_some();
    let secret = match configured {
        true => None,
        false => Some(crate::peer::new_secret().ok_or("no randomness for the herd secret")?),
    };
    let mut herd = Vec::new();
    for server in &config.servers {
        let mut command = Command::new(&exe);
        command
            .arg("serve")
            .arg(&server.name)
            .arg("--config")
            .arg(config_path)
            .args(trace.then_some("--trace"))
            // Each server's admin endpoint, on a free port unless the configuration names one:
            // its address is printed, and written beside its log for `herd status`.
            .args(
                match server.admin {
                    Some(_) => None,
                    None => Some(["--admin", "127.0.0.1:0"]),
                }
                .into_iter()
                .flatten(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(match traces {
                Some(_) => Stdio::piped(),
                None => Stdio::inherit(),
            })
            .envs(secret.iter().map(|s| ("HERD_SECRET", s)))
            // Its own process group: a terminal's Ctrl-C reaches `up` alone, which stops the
            // herd in order.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it makes the kernel send SIGTERM to the child if
        // `up` itself dies, so no server outlives it.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        match command.spawn() {
            Ok(child) => herd.push(Running {
                name: server.name.clone(),
                child,
            }),
            Err(e) => {
                stop(&mut herd);
                return Err(format!("cannot start server {}: {e}", server.name));
            }
        }
    }
    for running in &mut herd {
        if let (Some(stderr), Some(traces)) = (running.child.stderr.take(), &traces) {
            let traces = traces.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let _ = traces.send(line);
                }
            });
        }
        let Some(stdout) = running.child.stdout.take() else {
            continue;
        };
        let mut lines = BufReader::new(stdout);
        let mut ready = String::new();
        if lines.read_line(&mut ready).unwrap_or(0) == 0 {
            // It exited before it was up: `up` stops the rest and exits as that server did (2
            // for a bad configuration or a port in use, as `herd serve` would).
            let name = running.name.clone();
            let code = running
                .child
                .wait()
                .ok()
                .and_then(|s| s.code())
                .unwrap_or(1);
            eprintln!("herd up: server {name} did not start (its error is above)");
            stop(&mut herd);
            return Ok(code);
        }
        print!("{ready}");
        // Anything else a server prints is passed on.
        std::thread::spawn(move || {
            for line in lines.lines().map_while(Result::ok) {
                println!("{line}");
            }
        });
    }
    println!("herd up: {} servers running; Ctrl-C stops them", herd.len());
    let _ = std::io::stdout().flush();
    for signal in signals.forever() {
        if signal == SIGHUP || signal == SIGUSR1 {
            // Passed on: SIGHUP, logrotate's convention, makes every server open its log file
            // again; SIGUSR1 makes each write its store to <log_dir>/NAME.store.
            for running in &herd {
                if let Ok(pid) = i32::try_from(running.child.id()) {
                    // SAFETY: kill(2) on our own child's pid has no memory effects.
                    unsafe {
                        libc::kill(pid, signal);
                    }
                }
            }
            continue;
        }
        if signal == SIGCHLD {
            let exited = herd.iter_mut().find_map(|r| match r.child.try_wait() {
                Ok(Some(status)) => Some((r.name.clone(), status)),
                _ => None,
            });
            if let Some((name, status)) = exited {
                eprintln!("herd up: server {name} exited ({status}); stopping the herd");
                stop(&mut herd);
                return Ok(1);
            }
            continue;
        }
        println!("herd up: stopping");
        return Ok(if stop(&mut herd) { 0 } else { 1 });
    }
    Ok(0)
}

/// SIGTERM to every child, then waits; kills what has not exited in time. Returns whether all
/// exited cleanly.
fn stop(herd: &mut [Running]) -> bool {
    for running in herd.iter() {
        if let Ok(pid) = i32::try_from(running.child.id()) {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    let mut clean = true;
    for running in herd.iter_mut() {
        loop {
            match running.child.try_wait() {
                Ok(Some(status)) => {
                    clean &= status.success();
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    eprintln!("herd up: server {} did not stop; killing it", running.name);
                    let _ = running.child.kill();
                    let _ = running.child.wait();
                    clean = false;
                    break;
                }
            }
        }
    }
    clean
}

/// Prints the servers' traces merged in time order: a line waits until nothing earlier can still
/// come (its servers write within milliseconds of the time stamp), then goes out in order. Lines
/// without a time stamp (warnings, errors) go out at once.
struct Merger {
    sender: Sender<String>,
    printer: JoinHandle<Vec<String>>,
}

/// How long a trace line waits for earlier ones from other servers.
const MERGE_WAIT_US: u64 = 50_000;
/// The most lines kept for the drawing.
const KEEP_LINES: usize = 1_000_000;

impl Merger {
    /// Starts the printer thread; `keep` also keeps the lines for a drawing.
    fn start(keep: bool) -> Merger {
        let (sender, lines) = mpsc::channel::<String>();
        let printer = std::thread::spawn(move || {
            let mut waiting: BinaryHeap<Reverse<(u64, u64, String)>> = BinaryHeap::new();
            let mut kept = Vec::new();
            let mut count = 0u64;
            let out = |line: String, kept: &mut Vec<String>| {
                eprintln!("{line}");
                if keep && kept.len() < KEEP_LINES {
                    kept.push(line);
                }
            };
            loop {
                let received = lines.recv_timeout(std::time::Duration::from_millis(10));
                let ended = matches!(received, Err(RecvTimeoutError::Disconnected));
                if let Ok(line) = received {
                    let stamp = line.split_whitespace().next().and_then(|t| t.parse().ok());
                    match stamp {
                        Some(stamp) => {
                            count += 1;
                            waiting.push(Reverse((stamp, count, line)));
                        }
                        None => out(line, &mut kept),
                    }
                }
                let ripe = crate::trace::now_us().saturating_sub(MERGE_WAIT_US);
                while let Some(Reverse((stamp, _, _))) = waiting.peek() {
                    if *stamp > ripe && !ended {
                        break;
                    }
                    if let Some(Reverse((_, _, line))) = waiting.pop() {
                        out(line, &mut kept);
                    }
                }
                if ended {
                    return kept;
                }
            }
        });
        Merger { sender, printer }
    }

    /// Where each server's trace reader sends its lines.
    fn sender(&self) -> Sender<String> {
        self.sender.clone()
    }

    /// Waits for every server's trace to end, prints what is left, returns the lines kept.
    fn finish(self) -> Vec<String> {
        drop(self.sender);
        self.printer.join().unwrap_or_default()
    }
}
