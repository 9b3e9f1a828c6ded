//! The stacks the bench compares, and how each starts a server. Every stack takes the same
//! arguments (`NAME --config PATH`) and prints the same ready line, so every scenario runs
//! them alike: in alternation, one column of the table each.
//!
//! Adding a stack takes a variant of [`Stack`], its place in [`Stack::ALL`] (the order of the
//! columns; the array's length counts the stacks), its label and colour, its command in
//! [`Stacks::serve_command`], and, if it does not always run, the condition in
//! [`Stacks::new`]. The scenarios, the table and the chart take it from there.

use std::fmt;
use std::ops::{Index, IndexMut};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::manifest_dir;

/// How many kinds of stack there are: the length of a [`PerStack`].
const KINDS: usize = Stack::ALL.len();

/// One implementation of the protocol on its runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// The Rust server of this build, `herd serve`.
    Herd,
    /// The Python asyncio prototype, `benches/prototype/herd_prototype.py`.
    Prototype,
    /// Another build of the herd, given with `--baseline PATH`: `PATH serve`. It shows whether
    /// a change made a path slower than the build before it, in the same run.
    Baseline,
}

impl Stack {
    /// Every stack, in the order of the table's columns and of every alternation.
    pub const ALL: [Stack; 3] = [Stack::Herd, Stack::Prototype, Stack::Baseline];

    /// Its column in the table, its bar in the chart, its name in the run log.
    pub fn label(self) -> &'static str {
        match self {
            Stack::Herd => "herd",
            Stack::Prototype => "prototype",
            Stack::Baseline => "baseline",
        }
    }

    /// Its bar's colour in the chart.
    pub fn colour(self) -> &'static str {
        match self {
            Stack::Herd => "#d95f02",
            Stack::Prototype => "#7570b3",
            Stack::Baseline => "#1b9e77",
        }
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
    /// The stacks this run compares, in [`Stack::ALL`]'s order: the herd and the prototype
    /// always, the others when asked for.
    list: Vec<Stack>,
    /// The `herd` binary the baseline's servers run.
    baseline: Option<PathBuf>,
}

impl Stacks {
    /// The herd and the prototype, and a baseline when `baseline` names its `herd` binary.
    pub fn new(baseline: Option<PathBuf>) -> Stacks {
        let list = Stack::ALL
            .into_iter()
            .filter(|stack| match stack {
                Stack::Herd | Stack::Prototype => true,
                Stack::Baseline => baseline.is_some(),
            })
            .collect();
        Stacks { list, baseline }
    }

    /// The stacks of this run, in the order every alternation runs them.
    pub fn list(&self) -> &[Stack] {
        &self.list
    }

    /// The baseline's `herd` binary, when the run has one.
    pub fn baseline(&self) -> Option<&Path> {
        self.baseline.as_deref()
    }

    /// The command that runs server `name` of `config` on `stack` (same arguments, same ready
    /// line).
    pub fn serve_command(&self, stack: Stack, name: &str, config: &Path) -> Command {
        let herd = |binary: &Path| {
            let mut c = Command::new(binary);
            c.arg("serve");
            c
        };
        let mut command = match stack {
            Stack::Herd => herd(Path::new(env!("CARGO_BIN_EXE_herd"))),
            Stack::Prototype => {
                let mut c = Command::new("python3");
                c.arg(manifest_dir().join("benches/prototype/herd_prototype.py"));
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
