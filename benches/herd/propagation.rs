//! Scenario 4, propagation: the time from an IAMAT's reply at one server until the farthest
//! server answers with it (two hops in the 2023 herd, three in the Goloman herd), idle and
//! under a background load.

use std::thread;
use std::time::Duration;

use crate::bench::{lowest, Bench};
use crate::config::{HERD_2023, HERD_GOLOMAN};
use crate::load::LoadSpec;
use crate::probe::{percentile_us, propagation_samples};
use crate::process::{Cluster, Server};
use crate::procfs::CpuMeter;
use crate::stacks::{Figures, Stack};
use crate::table::{and_list, fmt_count, fmt_micros, fmt_rate, Better, Goal, Row, Unit};

/// One propagation run: the samples of each variant.
struct Propagation {
    idle: Vec<Duration>,
    loaded: Vec<Duration>,
    /// The rate the background load reached.
    loaded_rate: f64,
    goloman: Vec<Duration>,
    goloman_loaded: Vec<Duration>,
    goloman_loaded_rate: f64,
}

/// The IAMAT rate of the background load in the loaded variants.
const BACKGROUND_RATE: u64 = 20_000;

/// Time from an IAMAT's reply at one server until WHATSAT at the server farthest from it
/// answers with that record, idle and while a background load sends 20,000 IAMAT/s to the
/// first: Bailey to Jaquez in the 2023 herd (two hops), and Welsh to Hands in the Goloman herd
/// (three hops).
pub fn run(bench: &Bench) -> Result<Vec<Row>, String> {
    /// Long enough for every idle sample; only a broken herd comes near it.
    const IDLE_WINDOW: Duration = Duration::from_secs(60);
    let samples = bench.plan.propagation_samples;
    let runs = bench.alternate(|stack, round| {
        let herd = Cluster::start(bench, stack, HERD_2023, None)?;
        herd.await_links()?;
        let (bailey, jaquez) = (herd.server("Bailey"), herd.server("Jaquez"));
        let idle = propagation_samples(bailey, jaquez, "idle", samples, IDLE_WINDOW)?;
        let label = format!("background load at Bailey, {stack} round {round}");
        let (loaded, loaded_rate) = loaded_propagation(bench, bailey, jaquez, &label)?;
        drop(herd);

        let goloman = Cluster::start(bench, stack, HERD_GOLOMAN, None)?;
        goloman.await_links()?;
        let (welsh, hands) = (goloman.server("Welsh"), goloman.server("Hands"));
        let far = propagation_samples(welsh, hands, "goloman", samples, IDLE_WINDOW)?;
        let label = format!("background load at Welsh, {stack} round {round}");
        let (far_loaded, far_loaded_rate) = loaded_propagation(bench, welsh, hands, &label)?;

        let run = Propagation {
            idle,
            loaded,
            loaded_rate,
            goloman: far,
            goloman_loaded: far_loaded,
            goloman_loaded_rate: far_loaded_rate,
        };
        let describe = |s: &[Duration]| {
            let mut s = s.to_vec();
            format!(
                "{} samples, p50 {}, p99 {}",
                s.len(),
                fmt_micros(percentile_us(&mut s, 50.0)),
                fmt_micros(percentile_us(&mut s, 99.0))
            )
        };
        bench.record(format!(
            "propagation, {stack} round {round}: Bailey→Jaquez idle {}; under load {}; \
             Welsh→Hands idle {}; under load {}",
            describe(&run.idle),
            describe(&run.loaded),
            describe(&run.goloman),
            describe(&run.goloman_loaded)
        ));
        Ok(run)
    })?;

    let pct = |pick: fn(&Propagation) -> &Vec<Duration>, p: f64| {
        move |r: &Propagation| percentile_us(&mut pick(r).clone(), p)
    };
    let mut rows = Vec::new();
    /// A figure's name, its samples in a run, its target, and for a loaded variant the rate
    /// its background load reached.
    type Variant = (
        &'static str,
        fn(&Propagation) -> &Vec<Duration>,
        Goal,
        Option<fn(&Propagation) -> f64>,
    );
    let variants: [Variant; 4] = [
        (
            "Propagation Bailey → Jaquez (2 hops), idle",
            |r| &r.idle,
            Goal::Below(1_000.0),
            None,
        ),
        (
            "Propagation Bailey → Jaquez, 20,000 IAMAT/s at Bailey",
            |r| &r.loaded,
            Goal::Below(5_000.0),
            Some(|r| r.loaded_rate),
        ),
        (
            "Propagation Welsh → Hands (Goloman herd, 3 hops), idle",
            |r| &r.goloman,
            Goal::Below(1_000.0),
            None,
        ),
        (
            "Propagation Welsh → Hands, 20,000 IAMAT/s at Welsh",
            |r| &r.goloman_loaded,
            Goal::Below(5_000.0),
            Some(|r| r.goloman_loaded_rate),
        ),
    ];
    for (i, (what, pick, goal, background)) in variants.into_iter().enumerate() {
        rows.push(Row::new(
            format!("{what}: p50"),
            Unit::Micros,
            Better::Lower,
            runs.figure(lowest, pct(pick, 50.0)),
        ));
        let mut p99 = Row::new(
            format!("{what}: p99"),
            Unit::Micros,
            Better::Lower,
            runs.figure(lowest, pct(pick, 99.0)),
        )
        .goal(goal);
        if i == 0 {
            p99 = p99.chart("propagation p99, idle, 2 hops");
        }
        if let Some(rate) = background {
            // "X (herd)", "Y (prototype)", ... in the stacks' order.
            let each = |figures: Figures, format: fn(f64) -> String| -> Vec<String> {
                let value = |stack: Stack| figures[stack].map_or("—".into(), format);
                let stacks = runs.stacks().iter();
                stacks.map(|&s| format!("{} ({s})", value(s))).collect()
            };
            let reached = each(runs.figure(lowest, rate), fmt_rate);
            let count = each(runs.figure(lowest, |r| pick(r).len() as f64), fmt_count);
            p99 = p99.note(format!(
                "the background load reached {} of the {} asked; the fewest samples in a \
                 round: {} of {samples}",
                and_list(&reached),
                fmt_rate(BACKGROUND_RATE as f64),
                count.join(", "),
            ));
        }
        rows.push(p99);
    }
    Ok(rows)
}

/// Propagation samples from `from` to `to` while a background load sends [`BACKGROUND_RATE`]
/// IAMAT/s to `from`, and the rate the load reached. The load is recorded as `label`, with
/// `from`'s share of its core.
fn loaded_propagation(
    bench: &Bench,
    from: &Server,
    to: &Server,
    label: &str,
) -> Result<(Vec<Duration>, f64), String> {
    let plan = &bench.plan;
    // The background load runs a little longer than the sampling window, which starts once its
    // warm-up is over.
    let warmup = Duration::from_millis(300);
    let spec = LoadSpec {
        conns: 10,
        in_flight: 16,
        rate: Some(BACKGROUND_RATE),
        id_prefix: Some("background-".to_string()),
        ..LoadSpec::iamat(
            from.addr,
            plan.loaded_window + Duration::from_millis(500),
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
    Ok((loaded?, background.per_second))
}
