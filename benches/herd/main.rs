//! The herd against the prototypes of the same protocol (issues 3 and 20): `cargo bench --bench
//! herd`.
//!
//! The reports this project comes from ask whether asyncio suits a server herd, against
//! Node.js (and Java). So every figure compares four stacks, each a column: `herd serve` (the
//! Rust server), `benches/prototype/herd_prototype.py` on asyncio's default event loop (the
//! `prototype`, what the targets speak of), the same Python file on uvloop (`uvloop`, installed
//! by the bench into a virtual environment under the target directory), and
//! `benches/prototype/herd_prototype.js` on Node.js (`node`). Every figure comes from real
//! processes talking over loopback, with `herd load` as the load generator, and for WHATSAT a
//! fake Google Places over real HTTPS (`tests/common/fake_places.rs`) running in this process.
//! The bench prints one table, figure | a column per stack | ratio | vs uvloop | vs node |
//! target, and writes `target/bench/results.md` and `target/bench/herd-vs-prototype.svg`. Given
//! `--baseline PATH`, another build of the herd runs beside them as one more stack, with a
//! column of its own and one for the herd's ratio to it.
//!
//! ```text
//! cargo bench --bench herd                # every scenario, about ten minutes on two cores
//! cargo bench --bench herd -- --save      # also copy both files into benches/results/
//! cargo bench --bench herd -- --smoke     # a tiny round of every scenario, for CI
//! cargo bench --bench herd -- memory      # only the scenarios whose name holds a word
//! cargo bench --bench herd -- --stacks node lone   # the herd and only the stacks named
//! cargo bench --bench herd -- --baseline /path/to/old/herd lone   # this build against another
//! cargo bench --bench herd -- --help      # the options, and nothing run
//! ```
//!
//! The scenarios, one module each (its `run`), in the order they run:
//!
//! | module | what it measures |
//! |---|---|
//! | [`lone_iamat`] | IAMAT at one server without neighbours: 50 connections × 1 and × 16 in flight, and one request per connection; the first and last also against a bare server ([`ceiling`]), the most this machine allows |
//! | [`herd_wide`] | the five-server herd absorbing IAMAT at every server at once, until every server holds every record, and how evenly each server's own clients were served; the herd also with its logs linked to `/dev/null`, to weigh the log and the kernel's TCP work against the target |
//! | [`whatsat`] | WHATSAT through the HTTPS fake, answering at once and after 20 ms, and the TLS handshakes it cost; the fake alone, fetched by a client that does nothing else ([`fetch`]), to measure what lies outside the herd |
//! | [`propagation`] | time from an IAMAT's reply at one server until the farthest server answers with it (two hops in the 2023 herd, three in the Goloman herd), idle and under load: at the rate asked, and at a rate every stack sustains |
//! | [`memory`] | resident size with many idle connections and with many stored clients |
//! | [`startup`] | time from spawning a server to its first answer |
//! | [`fairness`] | the herd only: a well-behaved client's latency beside a connection that pipelines a million IAMATs and never reads, and beside ten that pipeline at full speed, against the same client alone |
//! | [`budget`] | the herd only: throughput with the per-connection budget per turn against the same with it off |
//! | [`disk`] | the herd only: throughput with the store on disk (`fsync` "everysec" and "always") against memory only; start-up, file size and memory with a million clients on disk |
//!
//! What they share, one module each:
//!
//! | module | what it holds |
//! |---|---|
//! | [`stacks`] | the stacks compared (the herd, the prototype on asyncio and on uvloop, Node.js, an earlier build of the herd), how each starts a server, and the virtual environment uvloop comes from |
//! | [`bench`] | what every scenario is handed: the plan, the stacks, the CPUs, the configuration of the comparisons, the alternation of the stacks (and of a herd-only scenario's variants), the run log and the problems |
//! | [`config`] | temporary directories, the herds' shapes, configuration files, free ports, sample answers |
//! | [`process`] | child processes that die with the bench, servers, and clusters of servers |
//! | [`load`] | runs of `herd load`, its reports, and the rows a load figure makes |
//! | [`probe`] | a blocking protocol client: markers, convergence, propagation samples |
//! | [`procfs`] | what `/proc` tells: resident size, descriptors, CPU time, TIME_WAIT sockets |
//! | [`affinity`] | which CPU the servers run on and which the load |
//! | [`table`] | rows, units, targets, ratios and their noise, the table and its number formats |
//! | [`report`] | the machine, the chart, `results.md` and where they are written |
//! | [`ceiling`] | a bare server, the most this machine allows a server |
//! | [`fetch`] | a client that only fetches from the fake Places |
//!
//! How the comparison is kept fair:
//!
//! - Servers run on CPU 0; load generators, the probes of this process and the fake Places run
//!   on CPU 1 (when the machine has two CPUs), so client work never steals the server's core.
//! - Like with like: every stack's servers keep their store in memory only (`data_dir = ""`;
//!   the prototypes keep none on disk) and run the same configuration; the herd's store on
//!   disk is measured apart, against its memory-only self ([`disk`]).
//! - Each scenario runs the stacks in alternation, every run on freshly started servers, the
//!   order turned by one place each round (herd, prototype, uvloop, node; then prototype,
//!   uvloop, node, herd; ...), and each figure is the better of the rounds: a slow drift of the
//!   machine (a noisy neighbour, a cold cache) hits every side, and no stack always runs first.
//!   Beside each ratio the table prints the lowest and highest of the round-by-round ratios:
//!   the noise this run saw.
//!   Memory is measured once (it does not drift) and start-up is the median of five tries.
//! - Logging is on, as in production: every server writes every line to its log file, in a
//!   temporary directory removed after the run.
//! - Only [`whatsat`] talks to Places. The other scenarios run the servers without an API key,
//!   so a WHATSAT used as a probe is answered at once (the stored AT line, then Google's
//!   `REQUEST_DENIED` body) by every stack.
//!
//! This is a benchmark, not a test: it asserts nothing about speed. It exits non-zero only when
//! something did not run (a server did not start, a load reported errors, a record never
//! reached a server within its bound, a Python stack ran on the wrong event loop), which is what
//! CI checks with `--smoke`. Every wait is bounded, and every process it starts is killed when
//! its guard is dropped, panics included.

mod affinity;
mod bench;
mod budget;
mod ceiling;
mod config;
mod disk;
mod fairness;
#[path = "../../tests/common/fake_places.rs"]
mod fake_places;
mod fetch;
mod herd_wide;
mod load;
mod lone_iamat;
mod memory;
mod probe;
mod process;
mod procfs;
mod propagation;
mod report;
mod stacks;
mod startup;
mod table;
mod whatsat;

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use affinity::{set_affinity, Cpus};
use bench::Bench;
use config::{manifest_dir, target_dir};
use process::raise_fd_limit;
use report::{baseline_note, chart_svg, fmt_minutes, results_markdown, write_results, Machine};
use stacks::{Stack, Stacks};
use table::{Row, Table};

// `fake_places.rs` is shared with the tests, whose harness calls its temporary directory
// `TestDir`; the fake finds it as `super::TestDir`.
use config::TempDir as TestDir;

/// How big a run is: the full bench, or the smoke round CI runs.
struct Plan {
    smoke: bool,
    /// Runs per stack, alternated (herd, prototype, uvloop, node, then prototype, ...).
    rounds: usize,
    /// The measured window of a throughput load, and the warm-up before it.
    load: Duration,
    warmup: Duration,
    /// Connections made by one run of one request per connection (see [`lone_iamat`]).
    one_shot_connections: u64,
    /// How long each server is loaded in the herd-wide scenario.
    herd_wide: Duration,
    propagation_samples: usize,
    /// How many of the propagation scenario's herds run (the 2023 herd, then the Goloman herd).
    propagation_paths: usize,
    /// How long propagation is sampled while the background load runs.
    loaded_window: Duration,
    idle_connections: usize,
    stored_clients: u64,
    /// The longest a server may take to store them; the prototype may not make it, and what it
    /// reached is reported.
    stored_budget: Duration,
    startup_samples: usize,
    /// How long the well-behaved client of [`fairness`] is measured, beside each neighbour.
    fairness_window: Duration,
    /// Restarts of a server with the stored clients on disk ([`disk`]), each replaying them.
    restart_samples: usize,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            smoke: false,
            rounds: 2,
            load: Duration::from_secs(3),
            warmup: Duration::from_millis(500),
            one_shot_connections: 12_000,
            herd_wide: Duration::from_secs(3),
            propagation_samples: 300,
            propagation_paths: 2,
            loaded_window: Duration::from_secs(4),
            idle_connections: 10_000,
            stored_clients: 1_000_000,
            stored_budget: Duration::from_secs(120),
            startup_samples: 5,
            fairness_window: Duration::from_secs(2),
            restart_samples: 3,
        }
    }

    /// About a quarter of a second of every scenario: proves that everything runs.
    fn smoke() -> Plan {
        Plan {
            smoke: true,
            rounds: 1,
            load: Duration::from_millis(250),
            warmup: Duration::from_millis(50),
            one_shot_connections: 1_000,
            herd_wide: Duration::from_millis(300),
            propagation_samples: 20,
            // Each path starts a five-server herd per stack and pass: the smoke round proves
            // the code with one.
            propagation_paths: 1,
            loaded_window: Duration::from_millis(300),
            idle_connections: 100,
            stored_clients: 1_000,
            stored_budget: Duration::from_secs(20),
            startup_samples: 1,
            fairness_window: Duration::from_millis(300),
            restart_samples: 1,
        }
    }
}

type Scenario = fn(&Bench) -> Result<Vec<Row>, String>;

/// Runs this binary as the ceiling server instead of the bench.
const CEILING_FLAG: &str = "--ceiling-server";

/// The scenarios, in the order they run: a name (which filters match) and its function.
const SCENARIOS: [(&str, Scenario); 9] = [
    ("lone server IAMAT", lone_iamat::run),
    ("herd-wide IAMAT", herd_wide::run),
    ("WHATSAT through the HTTPS fake", whatsat::run),
    ("propagation", propagation::run),
    ("memory", memory::run),
    ("start-up", startup::run),
    ("fair turns (the herd only)", fairness::run),
    ("turn budget (the herd only)", budget::run),
    ("store on disk (the herd only)", disk::run),
];

/// What the command line asks for.
#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    /// A tiny round of every scenario.
    smoke: bool,
    /// Also copy the results into `benches/results/`.
    save: bool,
    /// Words: only scenarios whose name contains one of them run.
    filters: Vec<String>,
    /// Another build of `herd` to run beside this one, as the baseline stack.
    baseline: Option<PathBuf>,
    /// The stacks to run beside the herd, when not all of them.
    stacks: Option<Vec<Stack>>,
}

/// What `cargo bench --bench herd -- --help` prints.
fn usage() -> String {
    let names: Vec<&str> = SCENARIOS.iter().map(|(name, _)| *name).collect();
    format!(
        "The herd against the prototypes of the same protocol: the Python prototype on asyncio's
default loop (prototype) and on uvloop (uvloop), and the Node.js prototype (node). Every stack
runs every scenario in alternation, and one table compares them, a column each.

usage: cargo bench --bench herd [-- [OPTION | WORD]...]

  (nothing)   every scenario, about ten minutes on two cores; writes results.md and
              herd-vs-prototype.svg to bench/ in the target directory
  --smoke     a tiny round of every scenario, in seconds: every stack builds, starts and
              answers (what CI runs); its figures mean nothing, and go to bench/smoke/
  --save      after a full run, also copy both files into benches/results/ (ignored with
              --smoke, a WORD, --stacks or --baseline)
  WORD        only the scenarios whose name contains WORD, in any case; the partial table goes
              to bench/partial/
  --stacks LIST
              run the herd and only these of the other stacks (comma-separated: prototype,
              uvloop, node); the partial table goes to bench/partial/
  --baseline PATH
              also run PATH, another build of herd (`PATH serve`), in the same alternation: a
              baseline column, and a `vs baseline` column of how many times better this build
              is on each row (below 1: the change made that path slower)
  -h, --help  print this and run nothing

The uvloop stack runs the Python of a virtual environment the bench makes once, with pip's
uvloop, in bench-venv/ in the target directory (python3 -m venv, then pip install uvloop); the
node stack needs Node.js 18 or newer as `node`.

Scenarios, in the order they run:
  {}

Exit status: 0 when everything ran; 1 when something did not (the uvloop environment could not
be made, a server did not start, a load reported errors, a record never arrived in time, a
Python stack ran on the wrong event loop); 2 for an unknown option, an unknown stack or a
baseline that is not a file.",
        names.join("\n  ")
    )
}

/// Reads the bench's arguments; `Ok(None)` asks for the usage. Cargo appends `--bench` when it
/// runs a bench without the test harness, so that flag is accepted and means nothing.
fn parse_args(args: &[String]) -> Result<Option<Options>, String> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(None);
    }
    let mut options = Options::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--smoke" => options.smoke = true,
            "--save" => options.save = true,
            "--bench" => {}
            "--baseline" => {
                let path = args
                    .next()
                    .ok_or("--baseline needs the path of a herd binary")?;
                options.baseline = Some(baseline_binary(path)?);
            }
            with_path if with_path.starts_with("--baseline=") => {
                options.baseline = Some(baseline_binary(&with_path["--baseline=".len()..])?);
            }
            "--stacks" => {
                let list = args
                    .next()
                    .ok_or("--stacks needs a list, e.g. --stacks prototype,node")?;
                options.stacks = Some(stack_list(list)?);
            }
            with_list if with_list.starts_with("--stacks=") => {
                options.stacks = Some(stack_list(&with_list["--stacks=".len()..])?);
            }
            word if !word.starts_with('-') => options.filters.push(word.to_owned()),
            other => {
                return Err(format!(
                    "unknown option {other} (cargo bench --bench herd -- --help lists them)"
                ))
            }
        }
    }
    Ok(Some(options))
}

/// The stacks of `--stacks a,b`: the herd always runs, the baseline comes with --baseline.
fn stack_list(list: &str) -> Result<Vec<Stack>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty() && *name != "herd")
        .map(|name| match Stack::from_label(name) {
            Some(Stack::Baseline) | None => Err(format!(
                "--stacks: unknown stack {name:?} (prototype, uvloop and node can be chosen)"
            )),
            Some(stack) => Ok(stack),
        })
        .collect()
}

/// The absolute path of the baseline's binary: its servers run in their own directories.
fn baseline_binary(path: &str) -> Result<PathBuf, String> {
    let absolute = std::fs::canonicalize(path).map_err(|e| format!("--baseline {path}: {e}"))?;
    if absolute.is_file() {
        Ok(absolute)
    } else {
        Err(format!("--baseline {path}: not a file"))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == CEILING_FLAG) {
        if let Err(e) = ceiling::serve() {
            eprintln!("ceiling server: {e}");
        }
        return ExitCode::FAILURE; // it serves until killed
    }
    let Options {
        smoke,
        save,
        filters,
        baseline,
        stacks,
    } = match parse_args(&args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("herd bench: {e}");
            return ExitCode::from(2);
        }
    };
    let partial_stacks = stacks.is_some();
    let stacks = match Stacks::new(stacks.as_deref(), baseline) {
        Ok(stacks) => stacks,
        Err(e) => {
            eprintln!("herd bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bench = Bench {
        plan: if smoke { Plan::smoke() } else { Plan::full() },
        stacks,
        cpus: Cpus::detect(),
        // Raised first, so that every server started inherits the raised limit too.
        fd_limit: raise_fd_limit(),
        problems: RefCell::default(),
        runs: RefCell::default(),
        event_loops: RefCell::default(),
        disturbed_loads: Cell::new(0),
        measured_loads: Cell::new(0),
    };
    // This process (probes, markers, the fake Places) belongs with the load, off the servers'
    // CPU; the load generators are pinned there explicitly as well.
    if let Some(cpu) = bench.cpus.client {
        if let Err(e) = set_affinity(cpu) {
            eprintln!("cannot pin the bench to CPU {cpu}: {e}");
        }
    }
    let machine = Machine::detect(&bench.stacks);
    eprintln!(
        "herd bench{}: {}; {}; {}",
        if smoke { " (smoke round)" } else { "" },
        machine.describe(),
        machine.runtimes(),
        bench.cpus.describe()
    );

    let chosen = |name: &str| {
        filters.is_empty()
            || filters
                .iter()
                .any(|f| name.to_lowercase().contains(&f.to_lowercase()))
    };
    let started = Instant::now();
    let mut table = Table::new(bench.stacks.list());
    for (name, scenario) in SCENARIOS.into_iter().filter(|(name, _)| chosen(name)) {
        eprintln!("== {name}");
        let t = Instant::now();
        match scenario(&bench) {
            Ok(rows) => table.rows.extend(rows),
            Err(e) => bench.problem(format!("{name} did not run: {e}")),
        }
        eprintln!("   ({})", fmt_minutes(t.elapsed()));
    }
    let took = started.elapsed();

    println!();
    println!("{}", table.to_text());
    println!("{}; {}.", machine.describe(), machine.runtimes());
    println!(
        "{}; best of {} alternated rounds. {} Took {}.",
        bench.cpus.describe(),
        bench.plan.rounds,
        RATIOS,
        fmt_minutes(took)
    );
    if let Some(baseline) = baseline_note(&bench) {
        println!("{baseline}.");
    }
    if let Some(disturbed) = bench.disturbance() {
        println!("{disturbed}");
    }

    let markdown = results_markdown(&bench, &table, &machine, took);
    let svg = chart_svg(&bench, &table, &machine);
    // A smoke round's figures mean nothing, and a filtered run's table is partial: keep them
    // apart from a full run's, and never save them.
    let whole = filters.is_empty() && !partial_stacks;
    let out = match (smoke, whole) {
        (false, true) => target_dir().join("bench"),
        (true, _) => target_dir().join("bench/smoke"),
        (false, false) => target_dir().join("bench/partial"),
    };
    if let Err(e) = write_results(&out, &markdown, &svg) {
        bench.problem(e);
    }
    if save && (smoke || !whole || bench.stacks.baseline().is_some()) {
        eprintln!(
            "--save is ignored for a smoke round, a filtered run, a run of fewer stacks or a run \
             with a baseline: not a full result"
        );
    } else if save {
        if let Err(e) = write_results(&manifest_dir().join("benches/results"), &markdown, &svg) {
            bench.problem(e);
        }
    }

    let problems = bench.problems.borrow();
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("\n{} problem(s):", problems.len());
        for problem in problems.iter() {
            eprintln!("- {problem}");
        }
        ExitCode::FAILURE
    }
}

/// What the ratio columns say, under the table and in results.md.
pub const RATIOS: &str = "ratio: how many times better the herd is than the prototype on \
     asyncio's default loop (vs uvloop, vs node: than those), above 1 the herd is better; in \
     brackets, the lowest and highest of the round-by-round ratios, the noise of this run; on a \
     herd-only row, ratio is the herd against the reference that row names, in the same run.";
