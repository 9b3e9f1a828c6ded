//! Scenario 6, start-up: the time from spawning a server to its first answer.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crate::affinity::pin;
use crate::bench::{Bench, Runs};
use crate::config::{free_ports, write_config, TempDir, LONE};
use crate::probe::{Client, READ_STEP};
use crate::process::Proc;
use crate::stacks::Stack;
use crate::table::{fmt_micros, Better, Goal, Row, Unit};

/// Spawns server Bailey of `config` (in `dir`, listening at `addr`) on `stack`, and times it
/// until it answers an IAMAT: connect attempts back to back (a refused connect on loopback
/// fails at once), each followed by an IAMAT. Returns the time and the running server, within
/// `bound`.
pub fn spawn_and_answer(
    bench: &Bench,
    stack: Stack,
    dir: &Path,
    config: &Path,
    addr: SocketAddr,
    bound: Duration,
) -> Result<(Duration, Proc), String> {
    let mut command = bench.stacks.serve_command(stack, "Bailey", config);
    command.current_dir(dir).env_remove("GOOGLE_PLACES_API_KEY");
    pin(&mut command, bench.cpus.server);
    let spawned = Instant::now();
    let server = Proc::spawn(format!("{stack} Bailey"), &mut command)?;
    let deadline = spawned + bound;
    loop {
        if let Ok(stream) = TcpStream::connect(addr) {
            let _ = stream.set_nodelay(true);
            let _ = stream.set_read_timeout(Some(READ_STEP));
            let mut client = Client {
                stream,
                addr,
                buf: Vec::new(),
            };
            if client.iamat("startup", deadline).is_ok() {
                return Ok((spawned.elapsed(), server));
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("{stack} did not answer within {bound:?}"));
        }
        thread::sleep(Duration::from_micros(200));
    }
}

/// Time from spawning a lone server until it answers an IAMAT.
fn time_to_first_answer(bench: &Bench, stack: Stack) -> Result<Duration, String> {
    let dir = TempDir::new("startup");
    let port = free_ports(1)?[0];
    let config = write_config(&dir, LONE, &[port], None, &bench.settings())?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let bound = crate::process::SERVER_READY_TIMEOUT;
    spawn_and_answer(bench, stack, &dir.path, &config, addr, bound).map(|(took, _)| took)
}

/// Start-up time, the median of a few tries, alternating the stacks.
pub fn run(bench: &Bench) -> Result<Vec<Row>, String> {
    let mut runs = Runs::new(bench.stacks.list());
    for sample in 1..=bench.plan.startup_samples {
        for stack in bench.stacks.in_round(sample) {
            runs.push(stack, time_to_first_answer(bench, stack)?);
        }
    }
    for &stack in runs.stacks() {
        let times: Vec<String> = runs
            .of(stack)
            .iter()
            .map(|d| fmt_micros(d.as_secs_f64() * 1e6))
            .collect();
        bench.record(format!("start-up, {stack}: {}", times.join(", ")));
    }
    let row = Row::new(
        format!(
            "Start-up: spawn to first IAMAT answered (median of {})",
            bench.plan.startup_samples
        ),
        Unit::Micros,
        Better::Lower,
        runs.figure(median, |d| d.as_secs_f64() * 1e6),
    )
    .rounds(runs.rounds(|d| d.as_secs_f64() * 1e6));
    Ok(vec![row
        .goal(Goal::AtMost(50_000.0))
        .chart("start-up to first answer")])
}

/// The median of `values` (the upper one of an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}
