//! Scenario 5, memory: the resident size of a lone server at start, with many idle client
//! connections, and with many stored clients.

use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use crate::bench::{lowest, Bench, Runs};
use crate::config::LONE;
use crate::load::{LoadReport, LoadSpec};
use crate::probe::Client;
use crate::process::{Cluster, Server};
use crate::procfs::{open_fds, rss_bytes};
use crate::stacks::Stack;
use crate::table::{fmt_count, Better, Goal, Row, Unit};

/// Resident sizes of one lone server.
struct Memory {
    start: f64,
    with_idle: f64,
    idle_connections: usize,
    stored_start: f64,
    stored_end: f64,
    /// Clients stored (the prototype may not store them all in its time).
    stored: u64,
    stored_seconds: f64,
    /// The average length of the stored AT lines.
    at_line_bytes: f64,
}

impl Memory {
    fn per_connection(&self) -> f64 {
        (self.with_idle - self.start) / self.idle_connections as f64
    }

    /// Bytes per stored client beyond the AT line itself.
    fn per_client_overhead(&self) -> f64 {
        (self.stored_end - self.stored_start) / self.stored as f64 - self.at_line_bytes
    }
}

/// Resident size of a lone server at start and with `n` idle client connections open (opened
/// from this process, which raised its own open-file limit).
fn rss_with_idle_connections(bench: &Bench, stack: Stack, n: usize) -> Result<(f64, f64), String> {
    let lone = Cluster::start(bench, stack, LONE, None)?;
    let server = &lone.servers[0];
    let pid = server.proc.pid();
    let start = rss_bytes(pid)?;
    let fds_at_start = open_fds(pid)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut connections = Vec::with_capacity(n);
    for _ in 0..n {
        let connection = TcpStream::connect_timeout(&server.addr, Duration::from_secs(5))
            .map_err(|e| format!("idle connection {}: {e}", connections.len() + 1))?;
        connections.push(connection);
        if Instant::now() >= deadline {
            return Err(format!("only {} connections in 60 s", connections.len()));
        }
    }
    // connect() returns once the kernel queued the connection: count the server's descriptors
    // to know that it has accepted (and allocated for) every one.
    let accepted = Instant::now() + Duration::from_secs(30);
    while open_fds(pid)? < fds_at_start + n {
        if Instant::now() >= accepted {
            return Err(format!(
                "{stack} accepted {} of {n} connections in 30 s",
                open_fds(pid)?.saturating_sub(fds_at_start)
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
    let with_idle = rss_bytes(pid)?;
    drop(connections);
    Ok((start, with_idle))
}

/// The average decimal length of the numbers `0..n`: the number part of generated client ids.
fn average_digits(n: u64) -> f64 {
    let mut total = 0u64;
    let mut low = 0u64;
    let mut digits = 1u64;
    while low < n {
        let high = (low.max(1) * 10).min(n); // numbers with `digits` digits: low..high
        total += (high - low) * digits;
        low = high;
        digits += 1;
    }
    total as f64 / n.max(1) as f64
}

/// Resident size of a lone server at start and after `n` distinct clients have sent one IAMAT
/// each (or as many as it stored within the plan's budget), and the average stored AT line.
fn rss_with_stored_clients(
    bench: &Bench,
    stack: Stack,
    n: u64,
) -> Result<(f64, f64, LoadReport, f64), String> {
    let lone = Cluster::start(bench, stack, LONE, None)?;
    let server = &lone.servers[0];
    let pid = server.proc.pid();
    let start = rss_bytes(pid)?;
    let label = format!("{} stored clients, {stack}", fmt_count(n as f64));
    let (report, at_line) = store_clients(bench, server, n, &label)?;
    let end = rss_bytes(pid)?;
    Ok((start, end, report, at_line))
}

/// Sends `server` one IAMAT from each of `n` distinct clients (50 connections × 16 in flight,
/// within the plan's budget), recorded as `label`; returns the load's report and the average
/// length of the AT lines stored.
pub fn store_clients(
    bench: &Bench,
    server: &Server,
    n: u64,
    label: &str,
) -> Result<(LoadReport, f64), String> {
    const PREFIX: &str = "mem-";
    let spec = LoadSpec {
        conns: 50,
        in_flight: 16,
        clients: Some(n),
        requests: Some(n),
        id_prefix: Some(PREFIX.to_string()),
        ..LoadSpec::iamat(server.addr, bench.plan.stored_budget, Duration::ZERO)
    };
    let report = bench.load(label, &spec, server)?;
    // The stored line of one generated client, as the server holds it; the others differ
    // only in the digits of their number.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = Client::connect(server.addr)?;
    client.send(format!("WHATSAT {PREFIX}1 10 1\n").as_bytes())?;
    let line = client.read_whatsat_reply(deadline)?;
    if !line.starts_with(b"AT ") {
        return Err(format!(
            "WHATSAT {PREFIX}1 after the load was answered {:?}",
            line.escape_ascii().to_string()
        ));
    }
    let stored = report.requests.min(n);
    let at_line = (line.len() - 1) as f64 + average_digits(stored);
    Ok((report, at_line))
}

/// Resident memory of one lone server: at start, with many idle client connections, and with
/// many stored clients. Measured once per stack: sizes do not drift like timings.
pub fn run(bench: &Bench) -> Result<Vec<Row>, String> {
    let plan = &bench.plan;
    let fd_limit = bench.fd_limit;
    // Room for the bench's own descriptors (fake Places, pipes, probes) beside the connections.
    let n = plan
        .idle_connections
        .min(usize::try_from(fd_limit.saturating_sub(200)).unwrap_or(usize::MAX));
    if n < plan.idle_connections {
        bench.problem(format!(
            "the open-file limit is {fd_limit}: {n} idle connections instead of {}",
            plan.idle_connections
        ));
    }
    let mut runs = Runs::new(bench.stacks.list());
    for &stack in bench.stacks.list() {
        let (start, with_idle) =
            rss_with_idle_connections(bench, stack, n).map_err(|e| format!("{stack}: {e}"))?;
        let (stored_start, stored_end, report, at_line_bytes) =
            rss_with_stored_clients(bench, stack, plan.stored_clients)
                .map_err(|e| format!("{stack}: {e}"))?;
        let run = Memory {
            start,
            with_idle,
            idle_connections: n,
            stored_start,
            stored_end,
            stored: report.requests.min(plan.stored_clients),
            stored_seconds: report.seconds,
            at_line_bytes,
        };
        bench.record(format!(
            "memory, {stack}: {} at start, {} with {} idle connections; {} → {} storing {} \
             clients in {:.1} s (AT lines of {:.1} bytes on average)",
            Unit::MiB.format(run.start),
            Unit::MiB.format(run.with_idle),
            fmt_count(n as f64),
            Unit::MiB.format(run.stored_start),
            Unit::MiB.format(run.stored_end),
            fmt_count(run.stored as f64),
            run.stored_seconds,
            run.at_line_bytes
        ));
        runs.push(stack, run);
    }
    let conns = fmt_count(n as f64);
    let mut per_client = Row::new(
        format!(
            "Memory per stored client beyond its AT line ({} clients)",
            fmt_count(plan.stored_clients as f64)
        ),
        Unit::Bytes,
        Better::Lower,
        runs.figure(lowest, Memory::per_client_overhead),
    )
    .goal(Goal::AtMost(300.0));
    for &stack in runs.stacks() {
        for run in runs.of(stack) {
            if run.stored < plan.stored_clients {
                per_client = per_client.note(format!(
                    "{stack} stored only {} clients in its {} s: the figure is over those",
                    fmt_count(run.stored as f64),
                    plan.stored_budget.as_secs()
                ));
            }
        }
    }
    if let Some(run) = runs.of(Stack::Herd).first() {
        per_client = per_client.note(format!(
            "(RSS after − RSS before) ÷ clients − the average AT line ({:.1} bytes)",
            run.at_line_bytes
        ));
    }
    Ok(vec![
        Row::new(
            "Resident memory at start",
            Unit::MiB,
            Better::Lower,
            runs.figure(lowest, |r| r.start),
        ),
        Row::new(
            format!("Resident memory with {conns} idle connections"),
            Unit::MiB,
            Better::Lower,
            runs.figure(lowest, |r| r.with_idle),
        )
        .goal(Goal::AtMost(64.0 * 1024.0 * 1024.0))
        .chart("resident memory, 10,000 idle connections"),
        Row::new(
            "Memory per idle connection",
            Unit::Bytes,
            Better::Lower,
            runs.figure(lowest, Memory::per_connection),
        ),
        per_client,
    ])
}
