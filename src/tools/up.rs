//! `herd up`: every server of a configuration as a child process of this one, for trying a
//! herd on one machine. Ctrl-C or SIGTERM stops them all; if one of them dies, the rest are
//! stopped too, so a half herd never keeps running unnoticed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGCHLD, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::config::Config;

/// How long children get to exit after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

struct Running {
    name: String,
    child: Child,
}

/// Runs the herd until a signal; returns the exit code.
/// With `trace`, every server traces its loop (see [`crate::trace`]).
pub fn run(config_path: &Path, config: &Config, trace: bool) -> Result<i32, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    // Registered before any child exists, so no SIGCHLD is missed.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGCHLD])
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
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .envs(secret.iter().map(|s| ("HERD_SECRET", s)))
            // Its own process group: a terminal's Ctrl-C reaches `up`, which stops the herd in order.
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
        let Some(stdout) = running.child.stdout.take() else {
            continue;
        };
        let mut lines = BufReader::new(stdout);
        let mut ready = String::new();
        if lines.read_line(&mut ready).unwrap_or(0) == 0 {
            let name = running.name.clone();
            stop(&mut herd);
            return Err(format!("server {name} did not start (its error is above)"));
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
