//! Scenario 2, the whole herd: the five servers of 2023 absorbing IAMAT at every server at
//! once, until every server holds every record; the herd also with its logs linked to
//! `/dev/null`, to weigh the log and the kernel's TCP work against the target.

use std::time::{Duration, Instant};

use crate::bench::{highest, lowest, Bench};
use crate::config::{Logs, Settings, HERD_2023};
use crate::load::LoadSpec;
use crate::probe::converge;
use crate::process::Cluster;
use crate::procfs::cpu_split;
use crate::stacks::{Figures, Stack};
use crate::table::{fmt_count, fmt_micros, fmt_rate, Better, Goal, Row, Unit};

/// How long every server may take to show every marker after a herd-wide load.
const CONVERGE_BOUND: Duration = Duration::from_secs(60);

/// One herd-wide run.
pub struct HerdWide {
    acknowledged: u64,
    /// Each server's own clients: the rate its load generator reached, and their p99 latency,
    /// in the topology's order.
    servers: Vec<(f64, f64)>,
    /// The longest measured window of the loads.
    load_seconds: f64,
    /// From the end of the loads until every server held every marker.
    converge: Duration,
    client_bound: bool,
    /// The five servers' CPU time from the start of the loads until every server held every
    /// marker, `[user, system]` in seconds, where the system tells (`/proc`).
    server_cpu: Option<[f64; 2]>,
}

impl HerdWide {
    pub fn per_second(&self) -> f64 {
        self.acknowledged as f64 / (self.load_seconds + self.converge.as_secs_f64())
    }

    /// The servers' CPU time per acknowledged update, in µs: `[user, system]`.
    fn cpu_per_update(&self) -> Option<[f64; 2]> {
        let per_update = |seconds: f64| seconds * 1e6 / self.acknowledged.max(1) as f64;
        self.server_cpu.map(|[u, s]| [per_update(u), per_update(s)])
    }
}

/// One round of the herd-wide scenario, for one stack.
struct HerdWideRound {
    /// The run as the herd is meant to run: every line logged to disk.
    logged: HerdWide,
    /// In the herd's turn only, before `logged`: the same run with every server's log file
    /// linked to `/dev/null`.
    discarded: Option<HerdWide>,
}

/// The five-server herd of 2023 absorbing IAMAT at every server at once (one load generator per
/// server, distinct client ids), counted until every server holds every record. On two cores
/// this measures the total work per update, which flooding multiplies by the herd's size.
///
/// In its turn of each round the herd also runs with its logs linked to `/dev/null`: every
/// line is still formatted and written, but the kernel keeps nothing. From the servers' CPU
/// time in the two runs, [`herd_wide_budget`] tells what writing the log costs per update,
/// what the kernel's TCP work costs without it, and what that leaves of the time per update
/// that 30 times the prototype allows.
pub fn run(bench: &Bench) -> Result<Vec<Row>, String> {
    let runs = bench.alternate(|stack, round| {
        // A failure here costs the comparison, not the scenario's other rows.
        let discarded = if stack == Stack::Herd {
            let label = format!("logs to /dev/null, round {round}");
            herd_wide_run(bench, stack, &label, Logs::Discarded, &bench.settings())
                .map_err(|e| bench.problem(format!("herd-wide, {label}: {e}")))
                .ok()
        } else {
            None
        };
        let logged = herd_wide_run(
            bench,
            stack,
            &format!("round {round}"),
            Logs::Files,
            &bench.settings(),
        )?;
        Ok(HerdWideRound { logged, discarded })
    })?;
    let mut absorbed = runs
        .row(
            "Herd-wide IAMAT, 5 servers loaded at once, until all hold all",
            Unit::PerSecond,
            Better::Higher,
            |r| r.logged.per_second(),
        )
        .goal(Goal::Times(30.0))
        .chart("herd-wide IAMAT, all 5 servers (updates/s)")
        .note(
            "acknowledged IAMATs ÷ (load seconds + time until every server held a marker sent \
         after the load); 5 load generators share one core",
        );
    for &stack in runs.stacks() {
        if runs.of(stack).iter().any(|r| r.logged.client_bound) {
            absorbed = absorbed.note(format!(
                "{stack}: some of the 5 load generators were client-bound"
            ));
        }
    }
    let prototype = absorbed.values[Stack::Prototype];
    let herd_rounds = runs.of(Stack::Herd);
    let cpu: Vec<[[f64; 2]; 2]> = herd_rounds
        .iter()
        .filter_map(|r| {
            let discarded = r.discarded.as_ref()?.cpu_per_update()?;
            Some([r.logged.cpu_per_update()?, discarded])
        })
        .collect();
    if let Some(prototype) = prototype {
        if let Some(budget) = herd_wide_budget(&cpu, prototype * 30.0) {
            absorbed = absorbed.note(budget);
        }
    }
    let discarded = highest(
        &herd_rounds
            .iter()
            .filter_map(|r| r.discarded.as_ref().map(HerdWide::per_second))
            .collect::<Vec<_>>(),
    );
    let discarded = Row::new(
        "Herd-wide IAMAT, logs linked to /dev/null (the herd only)",
        Unit::PerSecond,
        Better::Higher,
        Figures::only(Stack::Herd, discarded),
    )
    .note(
        "the same run in the herd's turn of each round, before the herd's own, with every \
         server's log file linked to /dev/null: every line is still formatted and written, but \
         the kernel keeps nothing",
    );
    let converged = runs.row(
        "Herd-wide: convergence after the load ends",
        Unit::Micros,
        Better::Lower,
        |r| r.logged.converge.as_secs_f64() * 1e6,
    );
    // A single-threaded server is only as fair as its turns; under the herd-wide
    // load, each server's own clients must still be served.
    let mut share = runs
        .row(
            "Herd-wide: the slowest server's own clients' rate, as a share of the fastest's",
            Unit::Percent,
            Better::Higher,
            |r| r.logged.slowest_share(),
        )
        .goal(Goal::AtLeast(50.0));
    for &stack in runs.stacks() {
        let rounds: Vec<String> = runs
            .of(stack)
            .iter()
            .map(|r| {
                let rates: Vec<String> = r
                    .logged
                    .servers
                    .iter()
                    .map(|&(rate, _)| fmt_rate(rate))
                    .collect();
                rates.join(" / ")
            })
            .collect();
        share = share.note(format!(
            "{stack}, each server's own clients (Bailey / Bona / Campbell / Clark / Jaquez), \
             round by round: {}",
            rounds.join("; ")
        ));
    }
    let worst_p99 = runs
        .row(
            "Herd-wide: the worst p99 latency of any server's own clients",
            Unit::Micros,
            Better::Lower,
            |r| r.logged.worst_p99(),
        )
        .goal(Goal::AtMost(50_000.0));
    Ok(vec![absorbed, discarded, converged, share, worst_p99])
}

impl HerdWide {
    /// The slowest server's own clients' rate, in percent of the fastest's.
    fn slowest_share(&self) -> f64 {
        let rates: Vec<f64> = self.servers.iter().map(|&(rate, _)| rate).collect();
        match (lowest(&rates), highest(&rates)) {
            (Some(low), Some(high)) if high > 0.0 => 100.0 * low / high,
            _ => 0.0,
        }
    }

    /// The highest p99 latency of any server's own clients, in µs.
    fn worst_p99(&self) -> f64 {
        let p99s: Vec<f64> = self.servers.iter().map(|&(_, p99)| p99).collect();
        highest(&p99s).unwrap_or(f64::NAN)
    }
}

/// What the servers' CPU time per update says of the herd-wide target. The five servers share
/// one core, so 30 times the prototype, `wanted` updates a second, leaves 1 s ÷ `wanted` of
/// server time for each update. Each round gives `[logged, discarded]`, each `[user, system]`
/// in µs: the run logging to disk and the run logging to `/dev/null`. Their difference is what
/// writing the log costs (the kernel's page cache and disk work, and the caches they evict);
/// the second run's system time is the kernel's TCP and epoll work. What those two leave of
/// the budget is all the herd's own work (parsing, merging into the stores, flooding, formatting
/// the log lines) may take; it takes the second run's user time. The verdict is the round's
/// most favourable to the target.
fn herd_wide_budget(rounds: &[[[f64; 2]; 2]], wanted: f64) -> Option<String> {
    struct Split {
        needed: f64,
        log: f64,
        kernel: f64,
        left: f64,
        own: f64,
    }
    let total = |[user, system]: [f64; 2]| user + system;
    let budget = 1e6 / wanted;
    let splits: Vec<Split> = rounds
        .iter()
        .map(|&[logged, discarded]| {
            let log = total(logged) - total(discarded);
            Split {
                needed: total(logged),
                log,
                kernel: discarded[1],
                left: budget - log - discarded[1],
                own: discarded[0],
            }
        })
        .collect();
    // How many times faster the herd's own work would have to run.
    let short = |s: &Split| {
        if s.left > 0.0 {
            s.own / s.left
        } else {
            f64::INFINITY
        }
    };
    let best = splits.iter().min_by(|a, b| short(a).total_cmp(&short(b)))?;
    let range = |of: fn(&Split) -> f64| {
        let values: Vec<f64> = splits.iter().map(of).collect();
        let (low, high) = (
            lowest(&values).unwrap_or(0.0),
            highest(&values).unwrap_or(0.0),
        );
        if format!("{low:.2}") == format!("{high:.2}") {
            format!("{low:.2} µs")
        } else {
            format!("{low:.2}–{high:.2} µs")
        }
    };
    let verdict = if best.left <= 0.0 {
        "nothing is left for the herd's own work in any round: out of this machine's reach \
         while every line is logged to disk and the records travel over TCP"
            .to_string()
    } else if best.own <= best.left {
        "in the round most favourable to the target, the herd's own work fits".to_string()
    } else {
        format!(
            "in the round most favourable to the target, that is {:.1} times what is left",
            short(best)
        )
    };
    Some(format!(
        "the servers' CPU time per update, from the start of the loads until every server held \
         every marker, over the herd's rounds: {} logging to disk. The five servers share one \
         core: 30× the prototype, {}, leaves {budget:.2} µs an update. Writing the log costs \
         {} an update (against the same round's run logging to /dev/null), and without it the \
         kernel's TCP and epoll work takes {}. That leaves {} for the herd's own work, which \
         takes {} (user time logging to /dev/null); {verdict}",
        range(|s| s.needed),
        fmt_rate(wanted),
        range(|s| s.log),
        range(|s| s.kernel),
        range(|s| s.left),
        range(|s| s.own),
    ))
}

/// One herd-wide run (see [`run`]) of `stack`, its servers logging where `logs` says and
/// configured with `settings`.
pub fn herd_wide_run(
    bench: &Bench,
    stack: Stack,
    label: &str,
    logs: Logs,
    settings: &Settings,
) -> Result<HerdWide, String> {
    let herd = Cluster::start_with(bench, stack, HERD_2023, None, logs, settings)?;
    herd.await_links()?;
    let servers_cpu = || {
        herd.servers
            .iter()
            .map(|s| cpu_split(s.proc.pid()))
            .try_fold([0.0, 0.0], |[u, s], cpu| {
                cpu.map(|[cu, cs]| [u + cu, s + cs])
            })
    };
    let cpu_before = servers_cpu();
    // Closed loop at every server at once, measured from the first command (no warm-up), so
    // that every acknowledged update counts.
    let specs: Vec<LoadSpec> = herd
        .servers
        .iter()
        .map(|s| LoadSpec {
            conns: 10,
            in_flight: 16,
            id_prefix: Some(format!("{}-", s.name.to_lowercase())),
            ..LoadSpec::iamat(s.addr, bench.plan.herd_wide, Duration::ZERO)
        })
        .collect();
    let loads = specs
        .iter()
        .map(|spec| bench.spawn_load(spec))
        .collect::<Result<Vec<_>, _>>()?;
    let mut reports = Vec::with_capacity(loads.len());
    for ((load, spec), server) in loads.into_iter().zip(&specs).zip(&herd.servers) {
        let report = bench.finish_load(load, spec)?;
        bench.record_load(
            &format!("herd-wide at {}, {stack}, {label}", server.name),
            &report,
        );
        reports.push(report);
    }
    let loads_ended = Instant::now();
    let converge = converge(&herd.servers, "after-load", loads_ended, CONVERGE_BOUND)?;
    let server_cpu = match (cpu_before, servers_cpu()) {
        (Some([u0, s0]), Some([u1, s1])) => Some([u1 - u0, s1 - s0]),
        _ => None,
    };
    let run = HerdWide {
        acknowledged: reports.iter().map(|r| r.requests).sum(),
        servers: reports.iter().map(|r| (r.per_second, r.p99_us)).collect(),
        load_seconds: reports.iter().map(|r| r.seconds).fold(0.0, f64::max),
        converge,
        client_bound: reports.iter().any(|r| r.client_bound),
        server_cpu,
    };
    let cpu = run
        .cpu_per_update()
        .map_or(String::new(), |[user, system]| {
            format!("; server CPU per update {user:.2} µs user + {system:.2} µs system")
        });
    bench.record(format!(
        "herd-wide, {stack}, {label}: {} IAMAT acknowledged in {:.2} s, every server held every \
         marker {} later: {}{cpu}",
        fmt_count(run.acknowledged as f64),
        run.load_seconds,
        fmt_micros(run.converge.as_secs_f64() * 1e6),
        fmt_rate(run.per_second())
    ));
    Ok(run)
}
