//! `herd up` as a test runs it: a child in a process group of its own, what it prints on
//! stdout collected as it comes, and nothing left behind when the test ends, failing or not.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::herds::Member;
use super::{eventually, SERVER_ENV};

/// A running `herd up`. Dropping it kills whatever is left: the children of `herd up` (found in
/// /proc while it still runs), `herd up` itself, and the whole process group, so no server
/// survives a failed test.
pub struct Up {
    pub child: Child,
    /// Everything `herd up` has printed on stdout so far.
    pub printed: Arc<Mutex<String>>,
}

/// The pids whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<libc::pid_t> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(pid)
        })
        .collect()
}

/// Sends `sig` to `pid` (a negative pid: to that process group).
pub fn signal(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

impl Up {
    /// Starts `herd up --config CONFIG ARGS...` in `dir`, with `env` added to an environment
    /// cleared of the server variables, and waits (10 s at most) until it has printed where each
    /// of `members` listens. An `Err` carries what went wrong and what it printed.
    pub fn start(
        dir: &Path,
        config: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        members: &[Member],
    ) -> Result<Up, String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_herd"));
        for var in SERVER_ENV {
            command.env_remove(var);
        }
        let mut child = command
            .envs(env.iter().copied())
            .arg("up")
            .arg("--config")
            .arg(config)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start herd up: {e}"))?;
        let stdout_pipe = child.stdout.take().ok_or("herd up has no stdout pipe")?;
        let printed = Arc::new(Mutex::new(String::new()));
        let mut up = Up {
            child,
            printed: Arc::clone(&printed),
        };
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout_pipe);
            let mut line = String::new();
            while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                printed.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let listens = |text: &str, spec: &Member| {
            text.lines()
                .any(|l| l.contains(spec.name) && l.contains(&format!(":{}", spec.port)))
        };
        let all_listen = || {
            members
                .iter()
                .all(|s| listens(&up.printed.lock().unwrap(), s))
        };
        let _ = eventually(Duration::from_secs(10), || {
            all_listen() || matches!(up.child.try_wait(), Ok(Some(_)))
        });
        if all_listen() {
            return Ok(up);
        }
        let status = up.child.try_wait();
        Err(format!(
            "herd up did not print where each server listens within 10 s (exit status \
             {status:?}); it printed:\n{}",
            up.printed.lock().unwrap()
        ))
    }

    /// Sends SIGTERM and waits (10 s at most) for `herd up` to exit; returns its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        signal(self.child.id() as libc::pid_t, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.code(),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => panic!("herd up did not exit within 10 s of SIGTERM"),
            }
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // Only while `herd up` is not reaped is its pid surely its own.
        if let Ok(None) = self.child.try_wait() {
            for child in children_of(self.child.id()) {
                signal(child, libc::SIGKILL);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // The group id is `herd up`'s pid; the group outlives it while members remain.
        signal(-(self.child.id() as libc::pid_t), libc::SIGKILL);
    }
}
