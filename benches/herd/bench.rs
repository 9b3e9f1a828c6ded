//! What every scenario shares ([`Bench`]): the plan, the CPUs, the alternation of the
//! implementations round after round, the measurements per implementation ([`Runs`]), and what
//! the bench noticed on the way (the run log, the problems, the prototype's event loop, the
//! runs that other work disturbed).

use std::cell::{Cell, RefCell};

use crate::affinity::Cpus;
use crate::process::Server;
use crate::procfs::OTHER_WORK_PERCENT;
use crate::stacks::Impl;
use crate::Plan;

/// What every scenario shares.
pub struct Bench {
    pub plan: Plan,
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

/// One scenario's measurements, per implementation, in round order.
pub struct Runs<T> {
    pub herd: Vec<T>,
    pub prototype: Vec<T>,
}

/// A figure of both implementations; `None` where it was not measured.
#[derive(Clone, Copy, Default)]
pub struct Pair {
    pub herd: Option<f64>,
    pub prototype: Option<f64>,
}

impl<T> Runs<T> {
    pub fn new() -> Runs<T> {
        Runs {
            herd: Vec::new(),
            prototype: Vec::new(),
        }
    }

    pub fn push(&mut self, imp: Impl, run: T) {
        match imp {
            Impl::Herd => self.herd.push(run),
            Impl::Prototype => self.prototype.push(run),
        }
    }

    pub fn of(&self, imp: Impl) -> &[T] {
        match imp {
            Impl::Herd => &self.herd,
            Impl::Prototype => &self.prototype,
        }
    }

    /// `choose` (the best, or the worst, of the rounds) over `value` of each run.
    pub fn figure(&self, choose: fn(&[f64]) -> Option<f64>, value: impl Fn(&T) -> f64) -> Pair {
        let pick = |runs: &[T]| choose(&runs.iter().map(&value).collect::<Vec<_>>());
        Pair {
            herd: pick(&self.herd),
            prototype: pick(&self.prototype),
        }
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

    /// Runs `run` for each implementation in turn, `plan.rounds` times: herd, prototype, herd,
    /// prototype. The rounds are numbered from 1.
    pub fn alternate<T>(
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
