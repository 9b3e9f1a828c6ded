//! The stacks the bench compares, and how each starts a server. Every stack takes the same
//! arguments (`NAME --config PATH`) and prints the same ready line, so every scenario runs
//! them alike: in alternation, one column of the table each.
//!
//! The question the bench answers is the one its reports ask: does asyncio suit a server herd,
//! against the same protocol on a faster Python event loop (uvloop), on Node.js, and in Rust?
//! So the same Python file runs twice, once on asyncio's own loop and once on uvloop, and the
//! Node.js prototype once. The uvloop stack runs the Python of a virtual environment the bench
//! makes under the target directory (`bench-venv`, with pip's `uvloop`), once, and reuses after;
//! the plain stack runs the system's `python3` with its site-packages off (`-S`), so that a
//! uvloop installed there cannot be picked up. Each Python server names its loop in its log,
//! and the bench checks it ([`Stack::expected_loop`]).
//!
//! Adding a stack takes a variant of [`Stack`], its place in [`Stack::ALL`] (the order of the
//! columns; the array's length counts the stacks), its label and colour, its command in
//! [`Stacks::serve_command`], and, if it does not always run, the condition in
//! [`Stacks::new`]. The scenarios, the table and the chart take it from there.

use std::fmt;
use std::ops::{Index, IndexMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::config::{manifest_dir, target_dir};
use crate::process::Proc;

/// How many kinds of stack there are: the length of a [`PerStack`].
const KINDS: usize = Stack::ALL.len();

/// One implementation of the protocol on its runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// The Rust server of this build, `herd serve`.
    Herd,
    /// The Python asyncio prototype, `benches/prototype/herd_prototype.py`, on asyncio's own
    /// event loop: what the targets compare the herd with.
    Prototype,
    /// The same Python file on uvloop, the loop a Python user picks for speed.
    Uvloop,
    /// The Node.js prototype, `benches/prototype/herd_prototype.js` (`net` and `https` only).
    Node,
    /// Another build of the herd, given with `--baseline PATH`: `PATH serve`. It shows whether
    /// a change made a path slower than the build before it, in the same run.
    Baseline,
}

impl Stack {
    /// Every stack, in the order of the table's columns and of the first round.
    pub const ALL: [Stack; 5] = [
        Stack::Herd,
        Stack::Prototype,
        Stack::Uvloop,
        Stack::Node,
        Stack::Baseline,
    ];

    /// Its column in the table, its bar in the chart, its name in the run log.
    pub fn label(self) -> &'static str {
        match self {
            Stack::Herd => "herd",
            Stack::Prototype => "prototype",
            Stack::Uvloop => "uvloop",
            Stack::Node => "node",
            Stack::Baseline => "baseline",
        }
    }

    /// What it is, in a sentence's words.
    pub fn describe(self) -> &'static str {
        match self {
            Stack::Herd => "the herd (Rust, mio)",
            Stack::Prototype => "the Python prototype on asyncio's default event loop",
            Stack::Uvloop => "the same Python prototype on uvloop",
            Stack::Node => "the Node.js prototype",
            Stack::Baseline => "another build of the herd",
        }
    }

    /// Its bar's colour in the chart.
    pub fn colour(self) -> &'static str {
        match self {
            Stack::Herd => "#d95f02",
            Stack::Prototype => "#7570b3",
            Stack::Uvloop => "#e7298a",
            Stack::Node => "#66a61e",
            Stack::Baseline => "#1b9e77",
        }
    }

    /// The event loop a Python stack's log must name (`... (MODULE event loop)`): the bench
    /// checks that each Python stack ran on the loop its column says.
    pub fn expected_loop(self) -> Option<&'static str> {
        match self {
            Stack::Prototype => Some("asyncio"),
            Stack::Uvloop => Some("uvloop"),
            _ => None,
        }
    }

    /// Parses a label back (`--stacks`).
    pub fn from_label(label: &str) -> Option<Stack> {
        Stack::ALL.into_iter().find(|s| s.label() == label)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Stack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// One value for each kind of stack, indexed by [`Stack`].
#[derive(Clone, Copy, Debug, Default)]
pub struct PerStack<T>([T; KINDS]);

impl<T> Index<Stack> for PerStack<T> {
    type Output = T;

    fn index(&self, stack: Stack) -> &T {
        &self.0[stack.index()]
    }
}

impl<T> IndexMut<Stack> for PerStack<T> {
    fn index_mut(&mut self, stack: Stack) -> &mut T {
        &mut self.0[stack.index()]
    }
}

impl<T: Default> PerStack<T> {
    /// `value` for `stack`, the default for every other.
    pub fn only(stack: Stack, value: T) -> PerStack<T> {
        let mut values = PerStack::<T>::default();
        values[stack] = value;
        values
    }
}

/// A figure of every stack; `None` where it was not measured.
pub type Figures = PerStack<Option<f64>>;

/// The stacks of one run, and what their servers need to start.
pub struct Stacks {
    /// The stacks this run compares, in [`Stack::ALL`]'s order: the herd, the two Python
    /// stacks and Node.js unless `--stacks` chose fewer, a baseline when asked for.
    list: Vec<Stack>,
    /// The `herd` binary the baseline's servers run.
    baseline: Option<PathBuf>,
    /// The virtual environment's Python, with uvloop, when the uvloop stack runs.
    uvloop_python: Option<PathBuf>,
}

/// Where the bench keeps the virtual environment with uvloop, under the target directory.
pub fn venv_dir() -> PathBuf {
    target_dir().join("bench-venv")
}

/// Runs `program args` to its end (within `timeout`) and returns its stdout, or a one-line
/// reason naming what failed.
fn run(program: &Path, args: &[&str], timeout: Duration) -> Result<String, String> {
    let what = format!("{} {}", program.display(), args.join(" "));
    let mut command = Command::new(program);
    command.args(args);
    let mut proc = Proc::spawn(what.clone(), &mut command)?;
    proc.finish(timeout)
}

/// The Python of [`venv_dir`], made and given uvloop if it is not there yet. Every failure is
/// one line naming the step that failed.
fn uvloop_python() -> Result<PathBuf, String> {
    let venv = venv_dir();
    let python = venv.join("bin/python");
    let has_uvloop = |python: &Path| {
        run(
            python,
            &["-c", "import uvloop; print(uvloop.__version__)"],
            Duration::from_secs(30),
        )
        .is_ok()
    };
    if python.is_file() && has_uvloop(&python) {
        return Ok(python);
    }
    eprintln!(
        "making {} with uvloop for the uvloop stack (once)",
        venv.display()
    );
    let venv_arg = venv.to_string_lossy().into_owned();
    run(
        Path::new("python3"),
        &["-m", "venv", "--clear", &venv_arg],
        Duration::from_secs(120),
    )
    .map_err(|e| format!("cannot make the uvloop stack's virtual environment: {e}"))?;
    run(
        &venv.join("bin/pip"),
        &[
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "uvloop",
        ],
        Duration::from_secs(300),
    )
    .map_err(|e| format!("cannot install uvloop for the uvloop stack: {e}"))?;
    if !has_uvloop(&python) {
        return Err(format!(
            "{} cannot import uvloop after installing it",
            python.display()
        ));
    }
    Ok(python)
}

impl Stacks {
    /// The stacks `chosen` (every stack but the baseline when `None`), and a baseline when
    /// `baseline` names its `herd` binary. Makes the uvloop stack's virtual environment when it
    /// runs; an error is one line saying what failed.
    pub fn new(chosen: Option<&[Stack]>, baseline: Option<PathBuf>) -> Result<Stacks, String> {
        let list: Vec<Stack> = Stack::ALL
            .into_iter()
            .filter(|&stack| match stack {
                Stack::Baseline => baseline.is_some(),
                Stack::Herd => true,
                other => chosen.map_or(true, |chosen| chosen.contains(&other)),
            })
            .collect();
        let uvloop_python = if list.contains(&Stack::Uvloop) {
            Some(uvloop_python()?)
        } else {
            None
        };
        if list.contains(&Stack::Node) {
            run(Path::new("node"), &["--version"], Duration::from_secs(30))
                .map_err(|e| format!("the node stack needs Node.js 18 or newer: {e}"))?;
        }
        Ok(Stacks {
            list,
            baseline,
            uvloop_python,
        })
    }

    /// The stacks of this run, in the order of the columns.
    pub fn list(&self) -> &[Stack] {
        &self.list
    }

    /// The stacks in the order round `round` (from 1) runs them: the list turned by one place
    /// each round, so that no stack always runs first (on a fresh machine) or last.
    pub fn in_round(&self, round: usize) -> Vec<Stack> {
        let mut order = self.list.clone();
        if !order.is_empty() {
            let turn = (round.max(1) - 1) % order.len();
            order.rotate_left(turn);
        }
        order
    }

    /// The baseline's `herd` binary, when the run has one.
    pub fn baseline(&self) -> Option<&Path> {
        self.baseline.as_deref()
    }

    /// The Python the uvloop stack runs, when the run has it.
    pub fn uvloop_python(&self) -> Option<&Path> {
        self.uvloop_python.as_deref()
    }

    /// The command that runs server `name` of `config` on `stack` (same arguments, same ready
    /// line).
    pub fn serve_command(&self, stack: Stack, name: &str, config: &Path) -> Command {
        let herd = |binary: &Path| {
            let mut c = Command::new(binary);
            c.arg("serve");
            c
        };
        let prototype = |file: &str| manifest_dir().join("benches/prototype").join(file);
        let mut command = match stack {
            Stack::Herd => herd(Path::new(env!("CARGO_BIN_EXE_herd"))),
            Stack::Prototype => {
                // -I: no environment variables or user site; -S: no site-packages, so no
                // uvloop even where one is installed.
                let mut c = Command::new("python3");
                c.args(["-I", "-S"]).arg(prototype("herd_prototype.py"));
                c
            }
            Stack::Uvloop => {
                let python = self
                    .uvloop_python
                    .as_deref()
                    .expect("the uvloop stack runs only with its virtual environment");
                let mut c = Command::new(python);
                c.arg("-I").arg(prototype("herd_prototype.py"));
                c
            }
            Stack::Node => {
                let mut c = Command::new("node");
                c.arg(prototype("herd_prototype.js"));
                c
            }
            Stack::Baseline => herd(
                self.baseline
                    .as_deref()
                    .expect("the baseline runs only when its binary was given"),
            ),
        };
        command.arg(name).arg("--config").arg(config);
        command
    }
}
