//! Scenario 7, fair turns (the herd only): a well-behaved client's IAMAT latency at a lone
//! server while other connections are greedy, against the same client alone in the same run.
//!
//! A single-threaded server is only as fair as its turns. The well-behaved client is `herd
//! load` with one connection and one command in flight. Beside it, in turn:
//!
//! - nothing ([`Neighbour::Alone`]): the reference;
//! - one connection that pipelines [`GREEDY_LINES`] IAMATs as fast as the socket takes them and
//!   never reads a reply ([`Neighbour::Greedy`], a thread of this process). Back-pressure must
//!   stop running its commands once its unread replies pass the mark, and the per-turn budget
//!   must keep the burst before that from holding a turn;
//! - ten connections, each with [`PIPELINE_DEPTH`] IAMATs in flight, reading their replies at
//!   full speed ([`Neighbour::Pipelining`], a second `herd load`).

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::bench::Bench;
use crate::config::LONE;
use crate::load::{LoadReport, LoadSpec};
use crate::process::Cluster;
use crate::stacks::Stack;
use crate::table::{fmt_count, Better, Goal, Row, Unit};

/// How many IAMATs the greedy connection pipelines, at most.
pub const GREEDY_LINES: u64 = 1_000_000;
/// Commands in flight on each of the ten pipelining connections: more than a turn's budget
/// of lines (512), so each one has work left at the end of its turns.
const PIPELINE_DEPTH: usize = 1_000;
/// The pipelining connections.
const PIPELINING: usize = 10;

/// What runs beside the well-behaved client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Neighbour {
    Alone,
    Greedy,
    Pipelining,
}

/// The greedy connection: writes IAMATs to `addr` as fast as the socket takes them, never
/// reading, until it has written `lines` or `stop` is set. Returns the lines written whole.
fn greedy(addr: SocketAddr, lines: u64, stop: &AtomicBool) -> Result<u64, String> {
    let mut stream =
        TcpStream::connect(addr).map_err(|e| format!("greedy connection to {addr}: {e}"))?;
    // Short write timeouts: once the server stops reading, a blocked write comes back to
    // check the stop flag.
    let _ = stream.set_write_timeout(Some(Duration::from_millis(20)));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    let chunk: String = (0..1_000)
        .map(|k| {
            format!(
                "IAMAT greedy-{k} +34.068930-118.445127 {}.{:09}\n",
                now.as_secs(),
                now.subsec_nanos()
            )
        })
        .collect();
    let chunk = chunk.as_bytes();
    let per_chunk = 1_000u64;
    let (mut written, mut offset) = (0u64, 0usize);
    while written + per_chunk <= lines && !stop.load(Ordering::Relaxed) {
        match stream.write(&chunk[offset..]) {
            Ok(0) => break,
            Ok(n) => {
                offset += n;
                if offset == chunk.len() {
                    offset = 0;
                    written += per_chunk;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // The server may close a connection that breaks a limit: what was written counts.
            Err(_) => break,
        }
    }
    let partial = chunk[..offset].iter().filter(|&&b| b == b'\n').count() as u64;
    Ok(written + partial)
}

/// One run: the well-behaved client's report beside `neighbour`, at a fresh lone server.
fn fairness_run(bench: &Bench, neighbour: Neighbour, round: usize) -> Result<LoadReport, String> {
    let plan = &bench.plan;
    let lone = Cluster::start(bench, Stack::Herd, LONE, None)?;
    let server = &lone.servers[0];
    let warmup = Duration::from_millis(100);
    let spec = LoadSpec {
        conns: 1,
        id_prefix: Some("polite-".to_string()),
        ..LoadSpec::iamat(server.addr, plan.fairness_window, warmup)
    };
    let stop = AtomicBool::new(false);
    let label = format!("fairness, a client beside {neighbour:?}, round {round}");
    let pipelining = LoadSpec {
        conns: PIPELINING,
        in_flight: PIPELINE_DEPTH,
        id_prefix: Some("pipeline-".to_string()),
        ..LoadSpec::iamat(
            server.addr,
            plan.fairness_window + Duration::from_millis(200),
            Duration::ZERO,
        )
    };
    thread::scope(|scope| {
        let others = match neighbour {
            Neighbour::Pipelining => Some(bench.spawn_load(&pipelining)?),
            Neighbour::Alone | Neighbour::Greedy => None,
        };
        let polite = bench.spawn_load(&spec)?;
        let greedy = (neighbour == Neighbour::Greedy).then(|| {
            let stop = &stop;
            let addr = server.addr;
            scope.spawn(move || {
                // Inside the measured window, not in the warm-up.
                thread::sleep(warmup + plan.fairness_window / 10);
                let started = Instant::now();
                greedy(addr, GREEDY_LINES, stop).map(|lines| (lines, started.elapsed()))
            })
        });
        let report = bench.finish_load(polite, &spec);
        stop.store(true, Ordering::Relaxed);
        if let Some(greedy) = greedy {
            let (lines, took) = greedy
                .join()
                .unwrap_or_else(|_| Err("the greedy thread panicked".to_string()))?;
            bench.record(format!(
                "fairness round {round}: the greedy connection wrote {} IAMATs in {:.2} s and \
                 read nothing",
                fmt_count(lines as f64),
                took.as_secs_f64()
            ));
        }
        if let Some(load) = others {
            let pipelined = bench.finish_load(load, &pipelining)?;
            bench.record_load(
                &format!("fairness round {round}: the {PIPELINING} pipelining connections"),
                &pipelined,
            );
        }
        let report = report?;
        bench.record_load(&label, &report);
        Ok(report)
    })
}

/// One of the well-behaved client's figures in a run.
type Figure = fn(&LoadReport) -> f64;

/// The well-behaved client's p50, p99 and max beside each neighbour, as ratios against the
/// same figures alone.
pub fn run(bench: &Bench) -> Result<Vec<Row>, String> {
    let neighbours = [Neighbour::Alone, Neighbour::Greedy, Neighbour::Pipelining];
    let runs = bench.alternate_variants(&neighbours, |neighbour, round| {
        fairness_run(bench, neighbour, round)
    })?;
    let client = "Fair turns: a client's IAMAT (1 in flight) at a lone server";
    let figures: [(&str, Figure); 3] = [
        ("p50", |r| r.p50_us),
        ("p99", |r| r.p99_us),
        ("max", |r| r.max_us),
    ];
    let mut rows = Vec::new();
    for (name, value) in figures {
        rows.push(runs.row(
            format!("{client}, alone: {name}"),
            Unit::Micros,
            Better::Lower,
            Neighbour::Alone,
            None,
            value,
        ));
    }
    for (name, value) in figures {
        let mut row = runs.row(
            format!(
                "Fair turns: the same beside 1 connection pipelining {} IAMATs, never reading: \
                 {name}",
                fmt_count(GREEDY_LINES as f64)
            ),
            Unit::Micros,
            Better::Lower,
            Neighbour::Greedy,
            Some((Neighbour::Alone, "alone")),
            value,
        );
        row = match name {
            "p50" => row.note(
                "the herd only; each row beside a neighbour against the same client alone, at a \
                 fresh server, in the same rounds (ratio: alone ÷ beside; below 1, the \
                 neighbour slowed the client down). The greedy connection is a thread of the \
                 bench that starts inside the measured window; the pipelining connections are \
                 a second herd load on the load core",
            ),
            "p99" => row.goal(Goal::AtMost(5_000.0)),
            "max" => row.goal(Goal::AtMost(20_000.0)),
            _ => row,
        };
        rows.push(row);
    }
    for (name, value) in figures {
        let mut row = runs.row(
            format!(
                "Fair turns: the same beside {PIPELINING} connections × {} in flight, reading: \
                 {name}",
                fmt_count(PIPELINE_DEPTH as f64)
            ),
            Unit::Micros,
            Better::Lower,
            Neighbour::Pipelining,
            Some((Neighbour::Alone, "alone")),
            value,
        );
        if name == "p99" {
            row = row.goal(Goal::AtMost(5_000.0));
        }
        rows.push(row);
    }
    Ok(rows)
}
