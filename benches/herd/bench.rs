//! What every scenario shares ([`Bench`]): the plan, the stacks, the CPUs, the alternation of
//! the stacks round after round, the measurements per stack ([`Runs`]), and what the bench
//! noticed on the way (the run log, the problems, the prototype's event loop, the runs that
//! other work disturbed).

use std::cell::{Cell, RefCell};

use crate::affinity::Cpus;
use crate::process::Server;
use crate::procfs::OTHER_WORK_PERCENT;
use crate::stacks::{Figures, PerStack, Stack, Stacks};
use crate::Plan;

/// What every scenario shares.
pub struct Bench {
    pub plan: Plan,
    /// What the run compares, in the order it runs them.
    pub stacks: Stacks,
    pub cpus: Cpus,
    /// This process's open-file limit, raised as far as allowed.
    pub fd_limit: u64,
    /// Things that did not run; any makes the bench exit non-zero.
    pub problems: RefCell<Vec<String>>,
    /// One line per measurement, for the "every run" section of results.md.
    pub runs: RefCell<Vec<String>>,
    /// The prototype's event loop, as its log names it.
    pub event_loop: RefCell<Option<String>>,
    /// Loads whose server shared its CPU with work from outside the bench, of all loads whose
    /// server's CPU was measured.
    pub disturbed_loads: Cell<usize>,
    pub measured_loads: Cell<usize>,
}

/// One scenario's measurements, per stack, in round order.
pub struct Runs<T> {
    /// The stacks measured, in the order they ran.
    stacks: Vec<Stack>,
    runs: PerStack<Vec<T>>,
}

impl<T> Runs<T> {
    pub fn new(stacks: &[Stack]) -> Runs<T> {
        Runs {
            stacks: stacks.to_vec(),
            runs: PerStack::default(),
        }
    }

    pub fn push(&mut self, stack: Stack, run: T) {
        self.runs[stack].push(run);
    }

    pub fn of(&self, stack: Stack) -> &[T] {
        &self.runs[stack]
    }

    /// The stacks measured, in the order they ran.
    pub fn stacks(&self) -> &[Stack] {
        &self.stacks
    }

    /// `choose` (the best, or the worst, of the rounds) over `value` of each run.
    pub fn figure(&self, choose: fn(&[f64]) -> Option<f64>, value: impl Fn(&T) -> f64) -> Figures {
        let mut figures = Figures::default();
        for &stack in &self.stacks {
            figures[stack] = choose(&self.of(stack).iter().map(&value).collect::<Vec<_>>());
        }
        figures
    }
}

pub fn highest(values: &[f64]) -> Option<f64> {
    values.iter().copied().reduce(f64::max)
}

pub fn lowest(values: &[f64]) -> Option<f64> {
    values.iter().copied().reduce(f64::min)
}

impl Bench {
    pub fn problem(&self, message: String) {
        eprintln!("  PROBLEM: {message}");
        self.problems.borrow_mut().push(message);
    }

    pub fn record(&self, line: String) {
        eprintln!("  {line}");
        self.runs.borrow_mut().push(line);
    }

    /// Runs `run` for each stack in turn, `plan.rounds` times: herd, prototype, (baseline,)
    /// herd, prototype, ... The rounds are numbered from 1.
    pub fn alternate<T>(
        &self,
        mut run: impl FnMut(Stack, usize) -> Result<T, String>,
    ) -> Result<Runs<T>, String> {
        let mut runs = Runs::new(self.stacks.list());
        for round in 1..=self.plan.rounds {
            for &stack in self.stacks.list() {
                let result =
                    run(stack, round).map_err(|e| format!("{stack}, round {round}: {e}"))?;
                runs.push(stack, result);
            }
        }
        Ok(runs)
    }

    /// A sentence on the loads whose server's CPU did other work too, if any did.
    pub fn disturbance(&self) -> Option<String> {
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
    pub fn note_event_loop(&self, server: &Server) {
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
