//! Scenario 3, WHATSAT through the fake Places: a lone server asking an HTTPS fake of Google
//! Places, answering at once and after 20 ms, and the TLS handshakes that cost; and, in the
//! herd's turn, the same fake fetched from by a client that does nothing else
//! ([`crate::fetch`]), to tell how much of a WHATSAT lies outside the herd.

use std::time::Duration;

use crate::bench::{highest, lowest, Bench};
use crate::config::{fixture, LONE};
use crate::fake_places::{Behaviour, FakePlaces};
use crate::fetch::{fetch_only, FetchReport};
use crate::load::{load_rows, LoadReport, LoadSpec};
use crate::process::Cluster;
use crate::stacks::{Figures, PerStack, Stack};
use crate::table::{fmt_count, fmt_micros, fmt_rate, Better, Goal, Row, Unit};

/// Both servers keep at most this many HTTPS connections to Places (`places.pool_size`'s
/// default): the bound on TLS handshakes, one per connection of the pool.
const PLACES_POOL_SIZE: f64 = 4.0;

/// One stack's WHATSAT run: the load, the handshakes, and in the herd's turn at +0 ms the
/// fetch-only client against a fake of its own.
struct WhatsatRun {
    report: LoadReport,
    handshakes: usize,
    fetch: Option<FetchReport>,
}

/// The server's CPU time per WHATSAT in a run, in µs (its share of its core over the middle
/// of the window, divided by the rate); NaN when the share was not measured.
fn server_us_per_request(report: &LoadReport) -> f64 {
    match report.server_cpu {
        Some(share) if report.per_second > 0.0 => share.process / 100.0 * 1e6 / report.per_second,
        _ => f64::NAN,
    }
}

/// WHATSAT (bound 5) at a lone server through the HTTPS fake answering `legacy_ok_20.json`,
/// at once and after 20 ms, and how many TLS handshakes the server made: with a keep-alive
/// pool, that is bounded by the pool's size, not by the number of requests.
pub fn run(bench: &Bench) -> Result<Vec<Row>, String> {
    let plan = &bench.plan;
    let body = fixture("legacy_ok_20.json")?;
    let mut rows = Vec::new();
    for delay_ms in [0u64, 20] {
        let runs = bench.alternate(|stack, round| {
            let delay = Duration::from_millis(delay_ms);
            // In the herd's turn, just before it: the fake alone, fetched by a client on the
            // servers' CPU that does nothing else.
            let fetch = if stack == Stack::Herd && delay_ms == 0 {
                let fake = FakePlaces::start(Behaviour::ok(body.clone()));
                let connections = PLACES_POOL_SIZE as usize;
                let fetch = fetch_only(
                    &fake,
                    connections,
                    plan.warmup,
                    plan.load,
                    bench.cpus.server,
                )
                .map_err(|e| format!("the fetch-only client: {e}"))?;
                bench.record(format!(
                    "fetch-only client, round {round}: {} fetches of {} bytes in {:.2} s: {}, \
                     client CPU {:.0}% of its core, {} per fetch",
                    fmt_count(fetch.fetches as f64),
                    fmt_count(fetch.body_bytes as f64),
                    fetch.seconds,
                    fmt_rate(fetch.per_second()),
                    fetch.cpu_percent(),
                    fmt_micros(fetch.cpu_us_per_fetch())
                ));
                Some(fetch)
            } else {
                None
            };
            let fake = FakePlaces::start(Behaviour::ok(body.clone()).delayed(delay));
            // Declared after the fake, so dropped (killed) before it.
            let lone = Cluster::start(bench, stack, LONE, Some(&fake))?;
            let server = &lone.servers[0];
            let spec = LoadSpec {
                mix: "whatsat",
                bound: Some(5),
                radius_km: Some(10),
                ..LoadSpec::iamat(server.addr, plan.load, plan.warmup)
            };
            let label = format!("WHATSAT, Places +{delay_ms} ms, {stack} round {round}");
            let report = bench.load(&label, &spec, server)?;
            let handshakes = fake.handshakes();
            bench.record(format!(
                "{label}: {handshakes} TLS handshakes for {} requests",
                fmt_count(fake.requests().len() as f64)
            ));
            Ok(WhatsatRun {
                report,
                handshakes,
                fetch,
            })
        })?;
        let what = format!("WHATSAT via HTTPS fake, Places +{delay_ms} ms, 50 conns × 1");
        if delay_ms == 0 {
            let mut main = load_rows(
                &runs,
                |r| &r.report,
                &what,
                &[Goal::Times(10.0)],
                Some("WHATSAT through the HTTPS fake (req/s)"),
            );
            let server_us = runs.row(
                format!("{what}: server CPU per WHATSAT"),
                Unit::Micros,
                Better::Lower,
                |r| server_us_per_request(&r.report),
            );
            let fetches: Vec<FetchReport> = runs
                .of(Stack::Herd)
                .iter()
                .filter_map(|r| r.fetch)
                .collect();
            if let Some(note) = outside_the_herd(&fetches, &server_us, main[0].values) {
                main[0].notes.push(note);
            }
            rows.extend(main);
            rows.push(server_us);
            rows.extend(fetch_rows(&fetches));
        } else {
            let mut delayed = load_rows(&runs, |r| &r.report, &what, &[], None);
            delayed[0].notes.push(format!(
                "at most {PLACES_POOL_SIZE} requests to Places at once (every server's pool \
                 size), each taking 20 ms: about {:.0}/s at most",
                PLACES_POOL_SIZE / 0.020
            ));
            rows.extend(delayed);
        }
        rows.push(
            runs.row(
                format!("WHATSAT, Places +{delay_ms} ms: TLS handshakes (most of any round)"),
                Unit::Count,
                Better::Lower,
                |r| r.handshakes as f64,
            )
            .goal(Goal::AtMost(PLACES_POOL_SIZE)),
        );
        // The most of any round, not the best.
        let last = rows.len() - 1;
        rows[last].values = runs.figure(highest, |r| r.handshakes as f64);
    }
    Ok(rows)
}

/// The fetch-only client's rows, in the herd's column (no ratio: no stack's server runs).
fn fetch_rows(fetches: &[FetchReport]) -> Vec<Row> {
    let rate: Vec<f64> = fetches.iter().map(FetchReport::per_second).collect();
    let cpu: Vec<f64> = fetches.iter().map(FetchReport::cpu_us_per_fetch).collect();
    let share: Vec<f64> = fetches.iter().map(FetchReport::cpu_percent).collect();
    let connections = PLACES_POOL_SIZE as usize;
    vec![
        Row::new(
            format!(
                "The fake Places alone, {connections} keep-alive connections, a fetch-only \
                 client: fetches (in the herd's column)"
            ),
            Unit::PerSecond,
            Better::Higher,
            Figures::only(Stack::Herd, highest(&rate)),
        )
        .rounds(PerStack::only(Stack::Herd, rate))
        .apart()
        .note(format!(
            "in the herd's turn of each round: a fake of its own, with the whole load core to \
             itself, fetched by one thread on the servers' core that sends the herd's request on \
             {connections} keep-alive connections and reads each response whole, and does \
             nothing else (benches/herd/fetch.rs); that thread used up to {:.0}% of its core",
            highest(&share).unwrap_or(f64::NAN)
        )),
        Row::new(
            "TLS and HTTP of one fetch: the fetch-only client's CPU (rustls, as the herd)",
            Unit::Micros,
            Better::Lower,
            Figures::only(Stack::Herd, lowest(&cpu)),
        )
        .rounds(PerStack::only(Stack::Herd, cpu))
        .apart(),
    ]
}

/// What the fetch-only client says of the WHATSAT target: how much of the herd's server time
/// per WHATSAT is the fetch's TLS and HTTP alone, and whether 10 times the prototype fits.
fn outside_the_herd(fetches: &[FetchReport], server_us: &Row, rates: Figures) -> Option<String> {
    let fetch_us = lowest(
        &fetches
            .iter()
            .map(FetchReport::cpu_us_per_fetch)
            .collect::<Vec<_>>(),
    )?;
    let fake_limit = highest(
        &fetches
            .iter()
            .map(FetchReport::per_second)
            .collect::<Vec<_>>(),
    )?;
    let herd_us = server_us.values[Stack::Herd].filter(|us| us.is_finite())?;
    let wanted = rates[Stack::Prototype]? * 10.0;
    let budget = 1e6 / wanted;
    let own = herd_us - fetch_us;
    let verdict = if fetch_us >= budget {
        "the fetch alone takes more than that: 10× the prototype is out of reach of any server \
         that decrypts Places's answer with rustls on this machine"
            .to_string()
    } else if own <= budget - fetch_us {
        "the herd's own work fits in what the fetch leaves".to_string()
    } else {
        format!(
            "the fetch leaves {} for the herd's own work (the client's line, the JSON check, \
             the cut, the reply and its log line), which takes {}: {:.1} times that",
            fmt_micros(budget - fetch_us),
            fmt_micros(own),
            own / (budget - fetch_us)
        )
    };
    Some(format!(
        "where a WHATSAT's time goes: the herd's server spends {} of CPU on each (its best \
         round); the fetch-only client spends {} on the TLS and HTTP of one fetch alone, {:.0}% \
         of it, outside the herd's own code. 10× the prototype, {}, allows {} a WHATSAT on a \
         saturated core: {verdict}. The fake by itself answers {} with a core of its own{}",
        fmt_micros(herd_us),
        fmt_micros(fetch_us),
        100.0 * fetch_us / herd_us,
        fmt_rate(wanted),
        fmt_micros(budget),
        fmt_rate(fake_limit),
        if fake_limit < wanted {
            ", less than 10× the prototype: the fake's own limit is below the target"
        } else {
            ""
        }
    ))
}
