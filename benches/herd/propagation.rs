//! Scenario 4, propagation: the time from an IAMAT's reply at one server until the farthest
//! server answers with it (two hops in the 2023 herd, three in the Goloman herd), idle and
//! under a background load.
//!
//! Like with like: a background load that a stack cannot keep up with measures its growing
//! queue, not its propagation. So the loaded figures come in two passes. The first asks every
//! stack for [`BACKGROUND_RATE`] IAMAT/s (the herd's target is set at that rate) and records
//! the rate each sustained; the second runs every stack at one common rate, a share
//! ([`COMMON_SHARE`]) of the lowest rate any stack sustained in the first, and the stacks are
//! compared there.

use std::thread;
use std::time::Duration;

use crate::bench::{lowest, Bench, Runs};
use crate::config::{Topology, HERD_2023, HERD_GOLOMAN};
use crate::load::LoadSpec;
use crate::probe::{percentile_us, propagation_samples};
use crate::process::{Cluster, Server};
use crate::procfs::CpuMeter;
use crate::stacks::{Figures, Stack};
use crate::table::{and_list, fmt_count, fmt_micros, fmt_rate, Better, Goal, Row, Unit};

/// The IAMAT rate asked of every stack in the first pass.
const BACKGROUND_RATE: u64 = 20_000;
/// The common rate of the second pass, as a share of the lowest rate sustained in the first:
/// a server kept busy most of the time still queues, and the rate a stack sustains drifts
/// from run to run with the machine; half leaves room for both.
const COMMON_SHARE: f64 = 0.5;
/// A background load sustained its rate if it reached this share of it.
const SUSTAINED: f64 = 0.95;

/// Long enough for every idle sample; only a broken herd comes near it.
const IDLE_WINDOW: Duration = Duration::from_secs(60);

/// A herd and the two servers farthest apart in it.
struct Path {
    topology: Topology,
    from: &'static str,
    to: &'static str,
    /// How the run log names it.
    name: &'static str,
    /// How the figures name it.
    what: &'static str,
}

const PATHS: [Path; 2] = [
    Path {
        topology: HERD_2023,
        from: "Bailey",
        to: "Jaquez",
        name: "Bailey → Jaquez",
        what: "Propagation Bailey → Jaquez (2 hops)",
    },
    Path {
        topology: HERD_GOLOMAN,
        from: "Welsh",
        to: "Hands",
        name: "Welsh → Hands",
        what: "Propagation Welsh → Hands (Goloman herd, 3 hops)",
    },
];

/// The samples of one loaded run, and the rate the background load reached.
struct Loaded {
    samples: Vec<Duration>,
    rate: f64,
}

/// One run of the first pass on one path: idle, then at [`BACKGROUND_RATE`].
struct FirstPass {
    idle: Vec<Duration>,
    asked: Loaded,
}

/// Time from an IAMAT's reply at one server until WHATSAT at the server farthest from it
/// answers with that record: idle, under [`BACKGROUND_RATE`] IAMAT/s at the first server, and
/// under a rate every stack sustains.
pub fn run(bench: &Bench) -> Result<Vec<Row>, String> {
    let samples = bench.plan.propagation_samples;
    let mut rows = Vec::new();
    for path in PATHS.iter().take(bench.plan.propagation_paths) {
        let first = bench.alternate(|stack, round| {
            let herd = Cluster::start(bench, stack, path.topology, None)?;
            herd.await_links()?;
            let (from, to) = (herd.server(path.from), herd.server(path.to));
            let idle = propagation_samples(from, to, "idle", samples, IDLE_WINDOW)?;
            let label = format!("{} asked, {stack} round {round}", path.name);
            let asked = loaded_propagation(bench, from, to, BACKGROUND_RATE, &label)?;
            bench.record(format!(
                "propagation {}, {stack} round {round}: idle {}; at {} asked: {}",
                path.name,
                describe(&idle),
                fmt_rate(BACKGROUND_RATE as f64),
                describe(&asked.samples),
            ));
            Ok(FirstPass { idle, asked })
        })?;
        // The lowest rate any stack sustained in any round, and the common rate from it.
        let sustained = lowest(
            &runs_of(&first)
                .map(|r| r.asked.rate.min(BACKGROUND_RATE as f64))
                .collect::<Vec<_>>(),
        )
        .unwrap_or(BACKGROUND_RATE as f64);
        let common = ((sustained * COMMON_SHARE / 100.0).floor() * 100.0).max(100.0) as u64;
        let second = bench.alternate(|stack, round| {
            let herd = Cluster::start(bench, stack, path.topology, None)?;
            herd.await_links()?;
            let (from, to) = (herd.server(path.from), herd.server(path.to));
            let label = format!("{} common, {stack} round {round}", path.name);
            let loaded = loaded_propagation(bench, from, to, common, &label)?;
            bench.record(format!(
                "propagation {}, {stack} round {round}: at {} (every stack): {}",
                path.name,
                fmt_rate(common as f64),
                describe(&loaded.samples),
            ));
            Ok(loaded)
        })?;
        rows.extend(path_rows(bench, path, &first, &second, common));
    }
    Ok(rows)
}

fn runs_of<T>(runs: &Runs<T>) -> impl Iterator<Item = &T> {
    runs.stacks().iter().flat_map(|&s| runs.of(s))
}

/// "N samples, p50 X, p99 Y".
fn describe(samples: &[Duration]) -> String {
    let mut s = samples.to_vec();
    format!(
        "{} samples, p50 {}, p99 {}",
        s.len(),
        fmt_micros(percentile_us(&mut s, 50.0)),
        fmt_micros(percentile_us(&mut s, 99.0))
    )
}

/// "X (herd), Y (prototype), ..." in the stacks' order.
fn each(stacks: &[Stack], figures: Figures, format: fn(f64) -> String) -> String {
    let cells: Vec<String> = stacks
        .iter()
        .map(|&s| format!("{} ({s})", figures[s].map_or("—".into(), format)))
        .collect();
    and_list(&cells)
}

/// The rows of one path: idle p50 and p99; the rate each stack sustained when asked for
/// [`BACKGROUND_RATE`], and the p99 there of the stacks that sustained it; p50 and p99 at the
/// common rate.
fn path_rows(
    bench: &Bench,
    path: &Path,
    first: &Runs<FirstPass>,
    second: &Runs<Loaded>,
    common: u64,
) -> Vec<Row> {
    let samples = bench.plan.propagation_samples;
    let pct = |p: f64| move |s: &Vec<Duration>| percentile_us(&mut s.clone(), p);
    let stacks = first.stacks();
    let what = path.what;
    let mut idle_p99 = first
        .row(
            format!("{what}, idle: p99"),
            Unit::Micros,
            Better::Lower,
            |r| pct(99.0)(&r.idle),
        )
        .goal(Goal::Below(1_000.0));
    if path.topology == HERD_2023 {
        idle_p99 = idle_p99.chart("propagation p99, idle, 2 hops");
    }
    let asked = format!("{} IAMAT/s", fmt_count(BACKGROUND_RATE as f64));
    let reached = first.row(
        format!(
            "{what}: IAMAT/s sustained at {} when {asked} is asked",
            path.from
        ),
        Unit::PerSecond,
        Better::Higher,
        |r| r.asked.rate,
    );
    let reached = reached.note(format!(
        "a paced background load at {} ({asked} asked, 10 connections × 16 in flight): the \
         rate each stack reached is the most it sustains there with its whole herd on one core; \
         a stack that reached {asked} could do more",
        path.from
    ));
    // At the rate asked, only the stacks that sustained it in every round have a figure.
    let kept = |stack: Stack| {
        first
            .of(stack)
            .iter()
            .all(|r| r.asked.rate >= BACKGROUND_RATE as f64 * SUSTAINED)
    };
    let mut at_asked = first.row(
        format!("{what}, {asked} asked at {}: p99", path.from),
        Unit::Micros,
        Better::Lower,
        |r| pct(99.0)(&r.asked.samples),
    );
    let dropped: Vec<String> = stacks
        .iter()
        .filter(|&&s| !kept(s))
        .map(|s| s.to_string())
        .collect();
    for &stack in stacks {
        if !kept(stack) {
            at_asked.values[stack] = None;
            at_asked.rounds[stack].clear();
        }
    }
    let mut at_asked = at_asked.goal(Goal::Below(5_000.0));
    if !dropped.is_empty() {
        at_asked = at_asked.note(format!(
            "only the stacks that sustained {asked} in every round have a figure here; {} did \
             not (see the row above), and their samples would measure a growing queue",
            and_list(&dropped)
        ));
    }
    let at_common = |p: f64, name: &str| {
        second.row(
            format!(
                "{what}, {} IAMAT/s at {} (every stack): {name}",
                fmt_count(common as f64),
                path.from
            ),
            Unit::Micros,
            Better::Lower,
            move |r| pct(p)(&r.samples),
        )
    };
    let common_p50 = at_common(50.0, "p50");
    let mut common_p99 = at_common(99.0, "p99");
    let fewest = second.figure(lowest, |r| r.samples.len() as f64);
    let short: Vec<String> = stacks
        .iter()
        .filter(|&&s| {
            second
                .of(s)
                .iter()
                .any(|r| r.rate < common as f64 * SUSTAINED)
        })
        .map(|s| s.to_string())
        .collect();
    common_p99 = common_p99.note(format!(
        "the common rate is {:.0}% of the lowest rate any stack sustained when {asked} was \
         asked ({}); the background load reached {}; the fewest samples in a round: {} of \
         {samples}{}",
        COMMON_SHARE * 100.0,
        fmt_rate(common as f64 / COMMON_SHARE),
        each(stacks, second.figure(lowest, |r| r.rate), fmt_rate),
        each(stacks, fewest, fmt_count),
        if short.is_empty() {
            String::new()
        } else {
            format!(
                "; {} fell short of it in a round: that figure holds a queue",
                and_list(&short)
            )
        }
    ));
    vec![
        first.row(
            format!("{what}, idle: p50"),
            Unit::Micros,
            Better::Lower,
            |r| pct(50.0)(&r.idle),
        ),
        idle_p99,
        reached,
        at_asked,
        common_p50,
        common_p99,
    ]
}

/// Propagation samples from `from` to `to` while a background load sends `rate` IAMAT/s to
/// `from`, and the rate the load reached. The load is recorded as `label`, with `from`'s share
/// of its core.
fn loaded_propagation(
    bench: &Bench,
    from: &Server,
    to: &Server,
    rate: u64,
    label: &str,
) -> Result<Loaded, String> {
    let plan = &bench.plan;
    // The background load runs a little longer than the sampling window, which starts just
    // after its warm-up.
    let warmup = plan.warmup.min(Duration::from_millis(300));
    let spec = LoadSpec {
        conns: 10,
        in_flight: 16,
        rate: Some(rate),
        id_prefix: Some("background-".to_string()),
        ..LoadSpec::iamat(
            from.addr,
            plan.loaded_window + Duration::from_millis(250),
            warmup,
        )
    };
    let background = bench.spawn_load(&spec)?;
    thread::sleep(warmup + Duration::from_millis(100));
    // The other servers share the loaded server's CPU: only its own share is of interest.
    let meter = CpuMeter::start(from.proc.pid(), None);
    let loaded = propagation_samples(
        from,
        to,
        "loaded",
        plan.propagation_samples,
        plan.loaded_window,
    );
    // The server's share of its core over the whole window (the load goes on past it): the
    // samples alone may take a few milliseconds, shorter than the kernel's CPU clock tick.
    thread::sleep(plan.loaded_window.saturating_sub(meter.since.elapsed()));
    let cpu = meter.read();
    let mut background = bench.finish_load(background, &spec)?;
    background.server_cpu = cpu;
    bench.record_load(label, &background);
    Ok(Loaded {
        samples: loaded?,
        rate: background.per_second,
    })
}
