//! Scenario 8, what fair turns cost (the herd only): the lone-server and herd-wide throughput
//! with the per-connection budget per turn as it ships (`turn_lines`, `turn_read_bytes` at
//! their defaults) against the same with the budget off (both 0), alternated in the same run.
//! The budget must not cost a busy server its speed: within 5%.

use crate::bench::Bench;
use crate::config::{Logs, Settings, LONE};
use crate::herd_wide::{herd_wide_run, HerdWide};
use crate::load::{LoadReport, LoadSpec};
use crate::process::Cluster;
use crate::stacks::Stack;
use crate::table::{Better, Goal, Row, Unit};

/// The budget as it ships, or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Budget {
    On,
    Off,
}

/// One round of one variant: the lone server at 50 × 1 and 50 × 16, and the whole herd.
struct BudgetRun {
    one: LoadReport,
    sixteen: LoadReport,
    herd_wide: HerdWide,
}

/// One throughput figure of a run.
type Figure = fn(&BudgetRun) -> f64;

pub fn run(bench: &Bench) -> Result<Vec<Row>, String> {
    let plan = &bench.plan;
    let runs = bench.alternate_variants(&[Budget::On, Budget::Off], |budget, round| {
        let settings = Settings {
            budget: budget == Budget::On,
            ..bench.settings()
        };
        let lone = Cluster::start_with(bench, Stack::Herd, LONE, None, Logs::Files, &settings)?;
        let server = &lone.servers[0];
        let base = LoadSpec::iamat(server.addr, plan.load, plan.warmup);
        let label = |what: &str| format!("budget {budget:?}, {what}, round {round}");
        let one = bench.load(&label("lone 50×1"), &base, server)?;
        let sixteen = LoadSpec {
            in_flight: 16,
            ..base
        };
        let sixteen = bench.load(&label("lone 50×16"), &sixteen, server)?;
        drop(lone);
        let herd_wide = herd_wide_run(
            bench,
            Stack::Herd,
            &label("herd-wide"),
            Logs::Files,
            &settings,
        )?;
        Ok(BudgetRun {
            one,
            sixteen,
            herd_wide,
        })
    })?;
    let figures: [(&str, Figure); 3] = [
        ("Lone server IAMAT, 50 conns × 1 in flight", |r| {
            r.one.per_second
        }),
        ("Lone server IAMAT, 50 conns × 16 in flight", |r| {
            r.sixteen.per_second
        }),
        ("Herd-wide IAMAT, until all hold all", |r| {
            r.herd_wide.per_second()
        }),
    ];
    let mut rows = Vec::new();
    for (i, (what, value)) in figures.into_iter().enumerate() {
        rows.push(runs.row(
            format!("{what}, turn budget off: throughput"),
            Unit::PerSecond,
            Better::Higher,
            Budget::Off,
            None,
            value,
        ));
        let mut with = runs
            .row(
                format!("{what}, turn budget on: throughput"),
                Unit::PerSecond,
                Better::Higher,
                Budget::On,
                Some((Budget::Off, "budget off")),
                value,
            )
            .goal(Goal::OfReference(0.95));
        if i == 0 {
            with = with.note(
                "the herd only: the same loads with the per-connection budget per turn on, as it \
                 ships (turn_lines and turn_read_bytes at their defaults), and off (both set to \
                 0), alternated round by round on fresh servers (ratio: on ÷ off)",
            );
        }
        rows.push(with);
    }
    Ok(rows)
}
