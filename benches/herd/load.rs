//! The load generator, `herd load`, as the bench runs it: what one run asks for
//! ([`LoadSpec`]), what it reports ([`LoadReport`]), how a run is started, measured and
//! recorded, and the throughput and latency rows a load figure makes in the table.

use std::net::SocketAddr;
use std::process::Command;
use std::thread;
use std::time::Duration;

use crate::affinity::pin;
use crate::bench::{highest, Bench, Runs};
use crate::process::{Proc, Server};
use crate::procfs::{CpuMeter, CpuShare, OTHER_WORK_PERCENT};
use crate::table::{fmt_count, fmt_micros, fmt_rate, Better, Goal, Row, Unit};

/// What a load generator may take beyond its warm-up and measured window: connecting, priming
/// the ids of a WHATSAT load, and waiting for the last replies.
pub const LOAD_SLACK: Duration = Duration::from_secs(60);

/// One run of `herd load` (see `herd load --help`).
#[derive(Clone)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    pub conns: usize,
    pub in_flight: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// `iamat`, `whatsat` or `mixed:N`.
    pub mix: &'static str,
    pub one_shot: bool,
    pub clients: Option<u64>,
    /// Stop after this many measured requests.
    pub requests: Option<u64>,
    /// Open-loop pacing, requests per second across all connections.
    pub rate: Option<u64>,
    pub bound: Option<u32>,
    pub radius_km: Option<u32>,
    /// Client ids are `<prefix><k>`.
    pub id_prefix: Option<String>,
    /// Loopback source addresses to spread connections over (`herd load --sources`).
    pub sources: Option<usize>,
}

impl LoadSpec {
    /// IAMAT from 50 connections, one in flight each, for `duration` after `warmup`.
    pub fn iamat(addr: SocketAddr, duration: Duration, warmup: Duration) -> LoadSpec {
        LoadSpec {
            addr,
            conns: 50,
            in_flight: 1,
            duration,
            warmup,
            mix: "iamat",
            one_shot: false,
            clients: None,
            requests: None,
            rate: None,
            bound: None,
            radius_km: None,
            id_prefix: None,
            sources: None,
        }
    }

    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "load".into(),
            "--addr".into(),
            self.addr.to_string(),
            "-c".into(),
            self.conns.to_string(),
            "-p".into(),
            self.in_flight.to_string(),
            "-d".into(),
            self.duration.as_millis().to_string(),
            "--warmup-ms".into(),
            self.warmup.as_millis().to_string(),
            "--mix".into(),
            self.mix.into(),
        ];
        if self.one_shot {
            args.push("--one-shot".into());
        }
        let options = [
            ("--clients", self.clients.map(|n| n.to_string())),
            ("--requests", self.requests.map(|n| n.to_string())),
            ("--rate", self.rate.map(|n| n.to_string())),
            ("--bound", self.bound.map(|n| n.to_string())),
            ("--radius", self.radius_km.map(|n| n.to_string())),
            ("--id-prefix", self.id_prefix.clone()),
            ("--sources", self.sources.map(|n| n.to_string())),
        ];
        for (flag, value) in options {
            if let Some(value) = value {
                args.push(flag.into());
                args.push(value);
            }
        }
        args
    }

    /// The longest the run may take.
    pub fn bound(&self) -> Duration {
        self.warmup + self.duration + LOAD_SLACK
    }
}

/// The line of JSON `herd load` prints, the fields the bench uses.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    cpu_percent: f64,
    pub client_bound: bool,
    first_error: Option<String>,
    /// The server's share of its core during the run (measured by the bench, not the
    /// generator).
    pub server_cpu: Option<CpuShare>,
}

impl LoadReport {
    pub fn parse(stdout: &str) -> Result<LoadReport, String> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .ok_or_else(|| format!("herd load printed no JSON: {stdout:?}"))?;
        let json: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("herd load printed {line:?}: {e}"))?;
        let number = |key: &str| -> Result<f64, String> {
            json.get(key)
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| format!("herd load's JSON has no number {key:?}: {line}"))
        };
        // A run that completed no request in its window has no latency: NaN, shown as —.
        let requests = number("requests")? as u64;
        let latency = |key: &str| -> Result<f64, String> {
            Ok(if requests == 0 {
                f64::NAN
            } else {
                number(key)?
            })
        };
        Ok(LoadReport {
            requests,
            errors: number("errors")? as u64,
            seconds: number("seconds")?,
            per_second: number("per_second")?,
            p50_us: latency("p50_us")?,
            p99_us: latency("p99_us")?,
            max_us: latency("max_us")?,
            cpu_percent: number("cpu_percent")?,
            client_bound: json
                .get("client_bound")
                .and_then(serde_json::Value::as_bool)
                == Some(true),
            first_error: json
                .get("first_error")
                .and_then(serde_json::Value::as_str)
                .map(str::to_string),
            server_cpu: None,
        })
    }

    /// One line for the run log.
    fn summary(&self) -> String {
        format!(
            "{} ({} requests), p50 {}, p99 {}, {}generator CPU {:.0}%{}",
            fmt_rate(self.per_second),
            fmt_count(self.requests as f64),
            fmt_micros(self.p50_us),
            fmt_micros(self.p99_us),
            self.server_cpu.map_or(String::new(), |share| {
                let others = match share.others {
                    Some(others) if others >= OTHER_WORK_PERCENT => {
                        format!(" (and OTHER WORK {others:.0}% of its CPU)")
                    }
                    _ => String::new(),
                };
                format!("server CPU {:.0}%{others}, ", share.process)
            }),
            self.cpu_percent,
            if self.client_bound {
                ", client-bound"
            } else {
                ""
            }
        )
    }
}

impl Bench {
    /// Starts `herd load` for `spec` on the client CPU.
    pub fn spawn_load(&self, spec: &LoadSpec) -> Result<Proc, String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_herd"));
        command.args(spec.args());
        pin(&mut command, self.cpus.client);
        Proc::spawn(format!("herd load against {}", spec.addr), &mut command)
    }

    /// Waits for a load started by [`Bench::spawn_load`] and returns its report.
    pub fn finish_load(&self, mut load: Proc, spec: &LoadSpec) -> Result<LoadReport, String> {
        LoadReport::parse(&load.finish(spec.bound())?)
    }

    /// Records a finished load's report as `label`. A load that saw errors is a problem, but
    /// its figures still count.
    pub fn record_load(&self, label: &str, report: &LoadReport) {
        self.record(format!("{label}: {}", report.summary()));
        if let Some(share) = report.server_cpu {
            self.measured_loads.set(self.measured_loads.get() + 1);
            if share
                .others
                .is_some_and(|others| others >= OTHER_WORK_PERCENT)
            {
                self.disturbed_loads.set(self.disturbed_loads.get() + 1);
            }
        }
        if report.errors > 0 {
            self.problem(format!(
                "{label}: the load generator saw {} errors, the first: {}",
                report.errors,
                report.first_error.as_deref().unwrap_or("(not said)")
            ));
        }
    }

    /// Runs one load against `server` to its end, and measures the server's share of its core
    /// while the generator measures: over the middle of a timed window (away from connecting,
    /// priming and the last replies), or from the end of the warm-up to the end of a load of a
    /// fixed number of requests.
    pub fn load(
        &self,
        label: &str,
        spec: &LoadSpec,
        server: &Server,
    ) -> Result<LoadReport, String> {
        let timed = spec.requests.is_none();
        let load = self.spawn_load(spec)?;
        thread::sleep(
            spec.warmup
                + if timed {
                    spec.duration / 10
                } else {
                    Duration::ZERO
                },
        );
        let meter = CpuMeter::start(server.proc.pid(), self.cpus.server);
        let mut server_cpu = None;
        if timed {
            thread::sleep(spec.duration * 7 / 10);
            server_cpu = meter.read();
        }
        let mut report = self.finish_load(load, spec)?;
        report.server_cpu = server_cpu.or_else(|| meter.read());
        self.record_load(label, &report);
        Ok(report)
    }
}

/// Throughput, p50 and p99 rows of a load figure, with a note where the generator, not the
/// server, was the limit.
pub fn load_rows<T>(
    runs: &Runs<T>,
    report: impl Fn(&T) -> &LoadReport,
    what: &str,
    goals: &[Goal],
    chart: Option<&'static str>,
) -> Vec<Row> {
    let mut throughput = runs.row(
        format!("{what}: throughput"),
        Unit::PerSecond,
        Better::Higher,
        |r| report(r).per_second,
    );
    for goal in goals {
        throughput = throughput.goal(*goal);
    }
    if let Some(label) = chart {
        throughput = throughput.chart(label);
    }
    for &stack in runs.stacks() {
        let bound: Vec<f64> = runs
            .of(stack)
            .iter()
            .map(&report)
            .filter(|r| r.client_bound)
            .map(|r| r.cpu_percent)
            .collect();
        if let Some(cpu) = highest(&bound) {
            throughput = throughput.note(format!(
                "{stack}: the load generator was client-bound ({cpu:.0}% of its core) in {} of \
                 {} runs: the figure is at least partly the client's limit",
                bound.len(),
                runs.of(stack).len()
            ));
        }
    }
    for &stack in runs.stacks() {
        let server_cpu: Vec<f64> = runs
            .of(stack)
            .iter()
            .filter_map(|r| Some(report(r).server_cpu?.process))
            .collect();
        if let Some(cpu) = highest(&server_cpu).filter(|cpu| *cpu < 80.0) {
            throughput = throughput.note(format!(
                "{stack}: the server used at most {cpu:.0}% of its core over a run: something \
                 else set the pace"
            ));
        }
    }
    vec![
        throughput,
        runs.row(
            format!("{what}: p50 latency"),
            Unit::Micros,
            Better::Lower,
            |r| report(r).p50_us,
        ),
        runs.row(
            format!("{what}: p99 latency"),
            Unit::Micros,
            Better::Lower,
            |r| report(r).p99_us,
        ),
    ]
}
