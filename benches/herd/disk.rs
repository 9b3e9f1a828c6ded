//! Scenario 9, the store on disk (the herd only): what keeping the records in an append-only
//! file costs, against the memory-only server every comparison runs (`data_dir = ""`).
//!
//! - The lone server's IAMAT throughput at 50 connections × 16 in flight with the store in
//!   memory, on disk with `fsync = "everysec"` and with `fsync = "always"`, alternated round by
//!   round on fresh servers (targets: 90% and 50% of memory only).
//! - Start-up with the plan's stored clients on disk: a server with a data directory is given
//!   that many clients, stopped with SIGTERM, and started again; the time from spawning it to
//!   its first IAMAT answered (target: at most a second for a million), the file's bytes per
//!   record, and the resident memory per client after the replay, against the same server's
//!   before the restart.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::bench::Bench;
use crate::config::{Logs, Settings, Store, DATA_DIR, LONE};
use crate::load::{LoadReport, LoadSpec};
use crate::memory::store_clients;
use crate::process::Cluster;
use crate::procfs::rss_bytes;
use crate::stacks::{Figures, PerStack, Stack};
use crate::startup::{median, spawn_and_answer};
use crate::table::{fmt_count, fmt_micros, Better, Goal, Row, Unit, Versus};

/// Where the store is, in each variant of the throughput runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kept {
    Memory,
    EverySec,
    Always,
}

impl Kept {
    fn store(self) -> Store {
        match self {
            Kept::Memory => Store::Memory,
            Kept::EverySec => Store::Disk("everysec"),
            Kept::Always => Store::Disk("always"),
        }
    }
}

/// How long a server with the plan's stored clients may take to stop, and to answer after a
/// restart.
const STOP_BOUND: Duration = Duration::from_secs(60);
const RESTART_BOUND: Duration = Duration::from_secs(60);

pub fn run(bench: &Bench) -> Result<Vec<Row>, String> {
    let plan = &bench.plan;
    let variants = [Kept::Memory, Kept::EverySec, Kept::Always];
    let runs = bench.alternate_variants(&variants, |kept, round| {
        let settings = Settings {
            store: kept.store(),
            ..bench.settings()
        };
        let lone = Cluster::start_with(bench, Stack::Herd, LONE, None, Logs::Files, &settings)?;
        let server = &lone.servers[0];
        let spec = LoadSpec {
            in_flight: 16,
            ..LoadSpec::iamat(server.addr, plan.load, plan.warmup)
        };
        bench.load(
            &format!("store {kept:?}, lone 50×16, round {round}"),
            &spec,
            server,
        )
    })?;
    let what = "Lone server IAMAT, 50 conns × 16 in flight";
    let throughput = |r: &LoadReport| r.per_second;
    let mut rows = vec![runs.row(
        format!("{what}, store in memory only: throughput"),
        Unit::PerSecond,
        Better::Higher,
        Kept::Memory,
        None,
        throughput,
    )];
    for (kept, policy, share) in [
        (Kept::EverySec, "everysec", 0.9),
        (Kept::Always, "always", 0.5),
    ] {
        let mut row = runs
            .row(
                format!("{what}, store on disk, fsync = \"{policy}\": throughput"),
                Unit::PerSecond,
                Better::Higher,
                kept,
                Some((Kept::Memory, "memory only")),
                throughput,
            )
            .goal(Goal::OfReference(share));
        if kept == Kept::EverySec {
            row = row.note(
                "the herd only: the same load at a fresh server with its store in memory only \
                 and on disk under each fsync policy, alternated round by round (ratio: on \
                 disk ÷ memory only). The data directory is on the same file system as the \
                 logs",
            );
        }
        rows.push(row);
    }
    rows.extend(restart(bench)?);
    Ok(rows)
}

/// What a restart from a full store measured.
struct Restart {
    clients: u64,
    /// Spawn to first IAMAT answered, each try.
    times: Vec<Duration>,
    file_bytes: u64,
    at_line: f64,
    rss_start: f64,
    rss_loaded: f64,
    rss_replayed: f64,
    /// The server's own log line of its first replay.
    replay_line: Option<String>,
}

impl Restart {
    /// Bytes per stored client beyond its AT line, with `rss` after storing them.
    fn per_client(&self, rss: f64) -> f64 {
        (rss - self.rss_start) / self.clients as f64 - self.at_line
    }
}

/// Stores the plan's clients at a server with a data directory, stops it, and starts it again,
/// `plan.restart_samples` times, timing each start to its first answer.
fn restart(bench: &Bench) -> Result<Vec<Row>, String> {
    let plan = &bench.plan;
    let n = plan.stored_clients;
    let settings = Settings {
        store: Store::Disk("everysec"),
        ..bench.settings()
    };
    let mut lone = Cluster::start_with(bench, Stack::Herd, LONE, None, Logs::Files, &settings)?;
    let server = &lone.servers[0];
    let addr: SocketAddr = server.addr;
    let rss_start = rss_bytes(server.proc.pid())?;
    let label = format!("{} stored clients on disk", fmt_count(n as f64));
    let (report, at_line) = store_clients(bench, server, n, &label)?;
    let clients = report.requests.min(n);
    let rss_loaded = rss_bytes(server.proc.pid())?;
    let mut stopped = lone.servers.remove(0);
    stopped.proc.terminate(STOP_BOUND)?;
    let log = stopped.log.clone();
    drop(stopped);
    let dir = lone.dir.path.clone();
    let file: PathBuf = dir.join(DATA_DIR).join("Bailey.aof");
    let file_bytes = std::fs::metadata(&file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?
        .len();
    let config = dir.join("herd.toml");
    let mut times = Vec::new();
    let mut rss_replayed = f64::NAN;
    for k in 0..plan.restart_samples.max(1) {
        let (took, mut proc) =
            spawn_and_answer(bench, Stack::Herd, &dir, &config, addr, RESTART_BOUND)?;
        if k == 0 {
            rss_replayed = rss_bytes(proc.pid())?;
        }
        times.push(took);
        proc.terminate(STOP_BOUND)?;
    }
    let replay_line = std::fs::read_to_string(&log).ok().and_then(|text| {
        // The first replay is the empty store's, at the first start.
        let line = text.lines().filter(|l| l.contains("replayed ")).nth(1)?;
        Some(line[line.find("replayed ")?..].to_string())
    });
    let run = Restart {
        clients,
        times,
        file_bytes,
        at_line,
        rss_start,
        rss_loaded,
        rss_replayed,
        replay_line,
    };
    let times: Vec<String> = run
        .times
        .iter()
        .map(|t| fmt_micros(t.as_secs_f64() * 1e6))
        .collect();
    bench.record(format!(
        "store on disk: {} clients, a file of {} bytes; restarts to the first answer: {}; {}",
        fmt_count(run.clients as f64),
        fmt_count(run.file_bytes as f64),
        times.join(", "),
        run.replay_line
            .as_deref()
            .unwrap_or("no replay line in the log")
    ));
    drop(lone);
    Ok(restart_rows(bench, &run))
}

fn restart_rows(bench: &Bench, run: &Restart) -> Vec<Row> {
    let clients = fmt_count(run.clients as f64);
    let herd = |value: f64| Figures::only(Stack::Herd, Some(value));
    let times: Vec<f64> = run.times.iter().map(|t| t.as_secs_f64() * 1e6).collect();
    let mut start = Row::new(
        format!(
            "Start-up with {clients} stored clients on disk: spawn to first IAMAT answered \
             (median of {})",
            times.len()
        ),
        Unit::Micros,
        Better::Lower,
        Figures::only(Stack::Herd, median(&times)),
    )
    .rounds(PerStack::only(Stack::Herd, times.clone()))
    .goal(Goal::AtMost(1_000_000.0))
    .note(format!(
        "the herd only: a server with a data directory (fsync = \"everysec\") given {clients} \
         clients, one IAMAT each, stopped with SIGTERM, then started again; the store is \
         replayed before the listener opens. Tries: {}",
        times
            .iter()
            .map(|&t| fmt_micros(t))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    if let Some(line) = &run.replay_line {
        start = start.note(format!("the server's log on its first restart: {line}"));
    }
    if run.clients < bench.plan.stored_clients {
        start = start.note(format!(
            "only {clients} of the {} clients were stored within the plan's budget",
            fmt_count(bench.plan.stored_clients as f64)
        ));
    }
    let per_record = run.file_bytes as f64 / run.clients.max(1) as f64;
    vec![
        start,
        Row::new(
            "The store's file: bytes per record",
            Unit::Bytes,
            Better::Lower,
            herd(per_record),
        )
        .note(format!(
            "the file's size after {clients} IAMATs from as many clients, divided by them; the \
             AT line itself is {:.1} bytes on average",
            run.at_line
        )),
        Row::new(
            format!("Memory per stored client beyond its AT line, after replaying {clients}"),
            Unit::Bytes,
            Better::Lower,
            herd(run.per_client(run.rss_replayed)),
        )
        .versus(Versus {
            label: "before the restart".to_string(),
            value: Some(run.per_client(run.rss_loaded)),
            rounds: Vec::new(),
        })
        .goal(Goal::AtMost(138.0))
        .note(
            "(RSS after the replay − RSS of the same server empty, before it was given its \
             clients) ÷ clients − the average AT line; against the same figure of that server \
             before the restart, with the clients sent as IAMATs (ratio: before ÷ after). The \
             target is the memory scenario's figure before the store was kept on disk: 138 B",
        ),
    ]
}
