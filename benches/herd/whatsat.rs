//! Scenario 3, WHATSAT through the fake Places: a lone server asking an HTTPS fake of Google
//! Places, answering at once and after 20 ms, and the TLS handshakes that cost.

use std::time::Duration;

use crate::bench::{highest, Bench};
use crate::config::{fixture, LONE};
use crate::fake_places::{Behaviour, FakePlaces};
use crate::load::{load_rows, LoadSpec};
use crate::process::Cluster;
use crate::table::{fmt_count, Better, Goal, Row, Unit};

/// Both servers keep at most this many HTTPS connections to Places (`places.pool_size`'s
/// default): the bound on TLS handshakes that issue 3 sets.
const PLACES_POOL_SIZE: f64 = 4.0;

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
            Ok((report, handshakes))
        })?;
        let what = format!("WHATSAT via HTTPS fake, Places +{delay_ms} ms, 50 conns × 1");
        if delay_ms == 0 {
            rows.extend(load_rows(
                &runs,
                |r| &r.0,
                &what,
                &[Goal::Times(10.0)],
                Some("WHATSAT through the HTTPS fake (req/s)"),
            ));
        } else {
            let mut delayed = load_rows(&runs, |r| &r.0, &what, &[], None);
            delayed[0].notes.push(format!(
                "at most {PLACES_POOL_SIZE} requests to Places at once (both servers' pool \
                 size), each taking 20 ms: about {:.0}/s at most",
                PLACES_POOL_SIZE / 0.020
            ));
            rows.extend(delayed);
        }
        rows.push(
            Row::new(
                format!("WHATSAT, Places +{delay_ms} ms: TLS handshakes (most of any round)"),
                Unit::Count,
                Better::Lower,
                runs.figure(highest, |r| r.1 as f64),
            )
            .goal(Goal::AtMost(PLACES_POOL_SIZE)),
        );
    }
    Ok(rows)
}
