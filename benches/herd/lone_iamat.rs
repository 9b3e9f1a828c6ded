//! Scenario 1, a lone server: IAMAT at one server without neighbours, 50 connections with 1
//! and with 16 commands in flight, and one request per connection; the first and the last also
//! against a bare server ([`crate::ceiling`]), the most this machine allows.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::affinity::pin;
use crate::bench::{highest, Bench};
use crate::ceiling;
use crate::config::LONE;
use crate::load::{load_rows, LoadReport, LoadSpec, LOAD_SLACK};
use crate::process::{parse_ready_line, Cluster, Proc, Server, SERVER_READY_TIMEOUT};
use crate::procfs::time_wait_sockets;
use crate::stacks::{Figures, Stack};
use crate::table::{fmt_count, fmt_rate, Better, Goal, Row, Unit};
use crate::CEILING_FLAG;

/// IAMAT at a lone server (no neighbours: it compares with any single-threaded key-value
/// server): 50 connections with 1 and with 16 commands in flight, then one request per
/// connection, 50 under way at once, as the course's test clients talk.
pub fn run(bench: &Bench) -> Result<Vec<Row>, String> {
    let plan = &bench.plan;
    let runs = bench.alternate(|stack, round| {
        // The ceiling runs in the herd's turn, just before it, on the same footing.
        let ceiling = if stack == Stack::Herd {
            Some(ceiling_loads(bench, round)?)
        } else {
            None
        };
        let lone = Cluster::start(bench, stack, LONE, None)?;
        let server = &lone.servers[0];
        let base = LoadSpec::iamat(server.addr, plan.load, plan.warmup);
        let one = bench.load(&format!("lone 50×1, {stack} round {round}"), &base, server)?;
        let sixteen = LoadSpec {
            in_flight: 16,
            ..base.clone()
        };
        let sixteen = bench.load(
            &format!("lone 50×16, {stack} round {round}"),
            &sixteen,
            server,
        )?;
        let one_shot = load_one_shot(bench, &stack.to_string(), round, base, server)?;
        bench.note_event_loop(stack, server);
        Ok(([one, sixteen, one_shot], ceiling))
    })?;
    let mut rows = load_rows(
        &runs,
        |r| &r.0[0],
        "Lone server IAMAT, 50 conns × 1 in flight",
        &[Goal::Times(30.0), Goal::AtLeast(90_000.0)],
        Some("lone server, 1 in flight (IAMAT/s)"),
    );
    let throughput = |i: usize| runs.figure(highest, |r| r.0[i].per_second);
    let ceiling_of = |i: usize| {
        let ceiling = runs.of(Stack::Herd).iter().filter_map(|r| r.1.as_ref());
        highest(&ceiling.map(|c| c[i].per_second).collect::<Vec<_>>())
    };
    rows.push(ceiling_row(
        "50 conns × 1 in flight",
        ceiling_of(0),
        throughput(0),
        30.0,
    ));
    rows.extend(load_rows(
        &runs,
        |r| &r.0[1],
        "Lone server IAMAT, 50 conns × 16 in flight",
        &[Goal::AtLeast(500_000.0)],
        Some("lone server, 16 in flight (IAMAT/s)"),
    ));
    let mut one_shot = load_rows(
        &runs,
        |r| &r.0[2],
        &format!(
            "One IAMAT per connection, 50 at once, {} connections",
            fmt_count(plan.one_shot_connections as f64)
        ),
        &[Goal::Times(5.0)],
        Some("one request per connection (req/s)"),
    );
    one_shot[0].notes.push(
        "each run is a fixed number of connections to a freshly started server. The client \
         closes first, so every connection leaves a socket in TIME_WAIT for 60 s; the \
         generator spreads its connections over 64 loopback source addresses (--sources), \
         or after some 28,000 connections every connect() would search the one address's \
         ports for one to recycle (3-second runs from one address measured about 14,000/s \
         for the herd, with the generator's core saturated and the server's 80% idle)"
            .to_string(),
    );
    rows.extend(one_shot);
    rows.push(ceiling_row(
        "one IAMAT per connection",
        ceiling_of(1),
        throughput(2),
        5.0,
    ));
    Ok(rows)
}

/// One IAMAT per connection against `server` (`who`'s), 50 connections under way at once, for
/// a fixed number of connections (see the note on the row), spread over loopback source
/// addresses where the generator can do that.
fn load_one_shot(
    bench: &Bench,
    who: &str,
    round: usize,
    base: LoadSpec,
    server: &Server,
) -> Result<LoadReport, String> {
    let spec = LoadSpec {
        one_shot: true,
        requests: Some(bench.plan.one_shot_connections),
        duration: LOAD_SLACK,
        warmup: Duration::from_millis(20),
        sources: cfg!(target_os = "linux").then_some(64),
        ..base
    };
    let label = format!(
        "one-shot, {who} round {round} ({} sockets in TIME_WAIT before)",
        time_wait_sockets().map_or("?".to_string(), |n| fmt_count(n as f64))
    );
    bench.load(&label, &spec, server)
}

/// The 50 × 1 and one-shot loads against a fresh ceiling server.
fn ceiling_loads(bench: &Bench, round: usize) -> Result<[LoadReport; 2], String> {
    let server = start_ceiling(bench)?;
    let base = LoadSpec::iamat(server.addr, bench.plan.load, bench.plan.warmup);
    let one = bench.load(&format!("lone 50×1, ceiling round {round}"), &base, &server)?;
    let one_shot = load_one_shot(bench, "ceiling", round, base, &server)?;
    Ok([one, one_shot])
}

/// Starts this bench binary as the ceiling server (`ceiling.rs`) on the server CPU.
fn start_ceiling(bench: &Bench) -> Result<Server, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the bench itself: {e}"))?;
    let mut command = Command::new(exe);
    command.arg(CEILING_FLAG);
    pin(&mut command, bench.cpus.server);
    let mut proc = Proc::spawn("ceiling server", &mut command)?;
    let (addr, log) = proc.wait_line(SERVER_READY_TIMEOUT, |line| {
        parse_ready_line(line, ceiling::NAME, Path::new("/"))
    })?;
    Ok(Server {
        name: ceiling::NAME.to_string(),
        addr,
        log,
        proc,
    })
}

/// A row of the ceiling's throughput under a load, in the herd's column, with no ratio (the
/// other stacks' columns stay empty: the bare server is none of them). The note says whether
/// the target ratio `times` is within the best that this load reached against any server, the
/// herd and the bare one.
fn ceiling_row(what: &str, ceiling: Option<f64>, measured: Figures, times: f64) -> Row {
    let mut row = Row::new(
        format!("Ceiling of this machine, {what} (a bare server, in the herd's column)"),
        Unit::PerSecond,
        Better::Higher,
        Figures::only(Stack::Herd, ceiling),
    )
    .apart();
    if let (Some(ceiling), Some(herd), Some(prototype)) =
        (ceiling, measured[Stack::Herd], measured[Stack::Prototype])
    {
        let wanted = prototype * times;
        let reached = ceiling.max(herd);
        row = row.note(format!(
            "the same load, in the herd's turn of each round, against a bare server \
             (benches/herd/ceiling.rs: it copies each IAMAT's fields into its reply, with no \
             clock, checks, store or log). Best runs: the herd {}, the bare server {}. {times}× \
             the prototype, {}, is {}",
            fmt_rate(herd),
            fmt_rate(ceiling),
            fmt_rate(wanted),
            if wanted > reached {
                format!(
                    "{:.0}% above the better of the two: out of this machine's reach",
                    (wanted / reached - 1.0) * 100.0
                )
            } else {
                "within what this load reached".to_string()
            }
        ));
    }
    row
}
