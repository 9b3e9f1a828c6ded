//! `herd serve --trace` as a child whose trace the test reads: the server's own account of
//! which turn of its loop did what, for tests that assert order ("in the same turn, or the
//! next") rather than time.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;

use super::SERVER_ENV;

/// A traced server; killed when dropped.
pub struct Traced {
    child: Child,
    trace: Arc<Mutex<Vec<String>>>,
}

impl Traced {
    /// Starts `herd serve NAME --trace --config CONFIG` with `env` added to an environment
    /// cleared of the server variables.
    pub fn start(config: &Path, name: &str, env: &[(&str, &str)]) -> Traced {
        let mut command = Command::new(env!("CARGO_BIN_EXE_herd"));
        for var in SERVER_ENV {
            command.env_remove(var);
        }
        let mut child = command
            .args(["serve", name, "--trace", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start herd serve --trace");
        let trace = Arc::new(Mutex::new(Vec::<String>::new()));
        let stderr = child.stderr.take().expect("piped");
        let lines = Arc::clone(&trace);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Traced { child, trace }
    }

    /// The trace so far, a line each.
    pub fn lines(&self) -> Vec<String> {
        self.trace.lock().unwrap().clone()
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The index of the first line of `lines` at or after `from` that contains `needle`.
pub fn find(lines: &[String], from: usize, needle: &str) -> Option<usize> {
    (from..lines.len()).find(|&i| lines[i].contains(needle))
}

/// The number of the loop's turn that trace line `line` belongs to: that of the last
/// `turn N: woken by ...` line before it.
pub fn turn_of(lines: &[String], line: usize) -> u64 {
    (0..=line)
        .rev()
        .find_map(|i| {
            let text = &lines[i];
            let at = text.find(" turn ")?;
            text[at + 6..].split(':').next()?.parse::<u64>().ok()
        })
        .expect("a turn before the line")
}
