//! What every scenario shares ([`Bench`]): the plan, the stacks, the CPUs, the configuration
//! every comparison runs with, the alternation of the stacks (or of a herd-only scenario's
//! variants) round after round, the measurements per stack ([`Runs`]), and what the bench
//! noticed on the way (the run log, the problems, the Python stacks' event loops, the runs that
//! other work disturbed).

use std::cell::{Cell, RefCell};

use crate::affinity::Cpus;
use crate::config::{Settings, Store};
use crate::process::Server;
use crate::procfs::OTHER_WORK_PERCENT;
use crate::stacks::{Figures, PerStack, Stack, Stacks};
use crate::table::{Better, Row, Unit, Versus};
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
    /// The event loop each Python stack ran on, as its log names it.
    pub event_loops: RefCell<Vec<(Stack, String)>>,
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

    /// `choose` (the best, or the worst, of the rounds) over `value` of each run; a value that
    /// is not a number (a run that measured nothing) is left out.
    pub fn figure(&self, choose: fn(&[f64]) -> Option<f64>, value: impl Fn(&T) -> f64) -> Figures {
        let mut figures = Figures::default();
        for &stack in &self.stacks {
            let values: Vec<f64> = self
                .of(stack)
                .iter()
                .map(&value)
                .filter(|v| !v.is_nan())
                .collect();
            figures[stack] = choose(&values);
        }
        figures
    }

    /// `value` of each run, per stack, in round order.
    pub fn rounds(&self, value: impl Fn(&T) -> f64) -> PerStack<Vec<f64>> {
        let mut rounds = PerStack::<Vec<f64>>::default();
        for &stack in &self.stacks {
            rounds[stack] = self.of(stack).iter().map(&value).collect();
        }
        rounds
    }

    /// A row of `value`: the figure `choose` picks over the rounds (the best: [`highest`] when
    /// higher is better, [`lowest`] when lower is), with every round kept for the noise.
    pub fn row(
        &self,
        figure: impl Into<String>,
        unit: Unit,
        better: Better,
        value: impl Fn(&T) -> f64,
    ) -> Row {
        Row::new(figure, unit, better, self.figure(best(better), &value)).rounds(self.rounds(value))
    }
}

/// The best of the rounds for a figure that is better `better`.
pub fn best(better: Better) -> fn(&[f64]) -> Option<f64> {
    match better {
        Better::Higher => highest,
        Better::Lower => lowest,
    }
}

/// A herd-only scenario's runs: one list per variant (no greedy connection and one, the budget
/// on and off, the store in memory and on disk), each in round order.
pub struct Variants<V, T> {
    pub runs: Vec<(V, Vec<T>)>,
}

impl<V: Copy + PartialEq, T> Variants<V, T> {
    pub fn of(&self, variant: V) -> &[T] {
        self.runs
            .iter()
            .find(|(v, _)| *v == variant)
            .map_or(&[], |(_, runs)| runs.as_slice())
    }

    /// A herd-only row of `value` in `variant`, compared with the same figure in `reference`
    /// (labelled `label`), each the best of its rounds.
    pub fn row(
        &self,
        figure: impl Into<String>,
        unit: Unit,
        better: Better,
        variant: V,
        reference: Option<(V, &str)>,
        value: impl Fn(&T) -> f64,
    ) -> Row {
        let rounds: Vec<f64> = self.of(variant).iter().map(&value).collect();
        let mut row = Row::new(
            figure,
            unit,
            better,
            Figures::only(Stack::Herd, best(better)(&rounds)),
        )
        .rounds(PerStack::only(Stack::Herd, rounds));
        if let Some((reference, label)) = reference {
            let rounds: Vec<f64> = self.of(reference).iter().map(&value).collect();
            row = row.versus(Versus {
                label: label.to_string(),
                value: best(better)(&rounds),
                rounds,
            });
        }
        row
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

    /// The configuration every comparison runs with: the store in memory only (the
    /// prototypes keep none on disk), the herd's per-turn budget as it ships, and room for the
    /// memory scenario's clients.
    pub fn settings(&self) -> Settings {
        Settings {
            store: Store::Memory,
            budget: true,
            max_clients: (self.plan.stored_clients * 2).max(1_000_000),
        }
    }

    /// Runs `run` for each stack in turn, `plan.rounds` times, each round in the order
    /// [`Stacks::in_round`] gives: herd, prototype, uvloop, node, then prototype, uvloop, node,
    /// herd, ... The rounds are numbered from 1.
    pub fn alternate<T>(
        &self,
        mut run: impl FnMut(Stack, usize) -> Result<T, String>,
    ) -> Result<Runs<T>, String> {
        let mut runs = Runs::new(self.stacks.list());
        for round in 1..=self.plan.rounds {
            for stack in self.stacks.in_round(round) {
                let result =
                    run(stack, round).map_err(|e| format!("{stack}, round {round}: {e}"))?;
                runs.push(stack, result);
            }
        }
        Ok(runs)
    }

    /// Runs `run` for each variant of a herd-only scenario in turn, `plan.rounds` times, the
    /// order turned by one place each round as the stacks' is.
    pub fn alternate_variants<V: Copy + PartialEq + std::fmt::Debug, T>(
        &self,
        variants: &[V],
        mut run: impl FnMut(V, usize) -> Result<T, String>,
    ) -> Result<Variants<V, T>, String> {
        let mut runs: Vec<(V, Vec<T>)> = variants.iter().map(|&v| (v, Vec::new())).collect();
        for round in 1..=self.plan.rounds {
            let turn = (round - 1) % variants.len().max(1);
            for i in (0..variants.len()).map(|i| (i + turn) % variants.len()) {
                let variant = variants[i];
                let result =
                    run(variant, round).map_err(|e| format!("{variant:?}, round {round}: {e}"))?;
                runs[i].1.push(result);
            }
        }
        Ok(Variants { runs })
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

    /// Notes a Python stack's event loop from its server's log (`... (asyncio.unix_events
    /// event loop)`), and makes it a problem if it is not the loop the stack's column says.
    pub fn note_event_loop(&self, stack: Stack, server: &Server) {
        let Some(expected) = stack.expected_loop() else {
            return;
        };
        let log = std::fs::read_to_string(&server.log).unwrap_or_default();
        let found = log.lines().find_map(|line| {
            let (_, tail) = line.rsplit_once(" (")?;
            Some(tail.strip_suffix(" event loop)")?.to_string())
        });
        match found {
            Some(found) if found.starts_with(expected) => {
                let mut loops = self.event_loops.borrow_mut();
                if !loops.iter().any(|(s, _)| *s == stack) {
                    loops.push((stack, found));
                }
            }
            Some(found) => self.problem(format!(
                "the {stack} stack ran on the {found} event loop, not on {expected}"
            )),
            None => self.problem(format!(
                "the {stack} stack's log does not name its event loop"
            )),
        }
    }

    /// The event loop `stack` ran on, when it is a Python stack that has run.
    pub fn event_loop(&self, stack: Stack) -> Option<String> {
        let loops = self.event_loops.borrow();
        loops
            .iter()
            .find(|(s, _)| *s == stack)
            .map(|(_, l)| l.clone())
    }
}
