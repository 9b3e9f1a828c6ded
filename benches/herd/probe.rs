//! Probing clients: a blocking protocol client for markers and probes, convergence (every
//! server holding every marker), propagation samples from one server to another, and their
//! percentiles.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::process::Server;

/// How long one propagation sample may take before the record counts as lost.
const PROBE_BOUND: Duration = Duration::from_secs(10);
/// A probe socket's read timeout: how often a blocked read comes back to check its deadline.
pub const READ_STEP: Duration = Duration::from_millis(500);

/// A blocking protocol client with its own buffer, for markers and probes. Every read is
/// bounded by the caller's deadline (checked at least every [`READ_STEP`]).
pub struct Client {
    pub stream: TcpStream,
    pub addr: SocketAddr,
    pub buf: Vec<u8>,
}

/// An IAMAT for `id`, stamped now, at the spec's example location.
fn iamat_command(id: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    format!(
        "IAMAT {id} +34.068930-118.445127 {}.{:09}\n",
        now.as_secs(),
        now.subsec_nanos()
    )
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Result<Client, String> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        // Probes measure latency: no Nagle delay on the small commands.
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(READ_STEP));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
        Ok(Client {
            stream,
            addr,
            buf: Vec::new(),
        })
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .map_err(|e| format!("cannot send to {}: {e}", self.addr))
    }

    /// Reads once more into the buffer.
    pub fn fill(&mut self, deadline: Instant, what: &str) -> Result<(), String> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(format!("{} closed the connection ({what})", self.addr)),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if Instant::now() >= deadline {
                        return Err(format!("no answer from {} in time ({what})", self.addr));
                    }
                }
                Err(e) => return Err(format!("cannot read from {} ({what}): {e}", self.addr)),
            }
        }
    }

    /// One line, without its `\n`.
    fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>, String> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                return Ok(line);
            }
            self.fill(deadline, "a line")?;
        }
    }

    /// Sends an IAMAT for `id` and returns the AT line that answers it.
    pub fn iamat(&mut self, id: &str, deadline: Instant) -> Result<Vec<u8>, String> {
        self.send(iamat_command(id).as_bytes())?;
        let line = self.read_line(deadline)?;
        if line.starts_with(b"AT ") {
            Ok(line)
        } else {
            Err(format!(
                "IAMAT {id} at {} was answered {:?}",
                self.addr,
                line.escape_ascii().to_string()
            ))
        }
    }

    /// Reads one WHATSAT reply and returns its first line: the stored AT line, or the `? ...`
    /// line when the client is unknown there. The rest of an AT reply (the body and the blank
    /// line that ends it) is read and dropped.
    pub fn read_whatsat_reply(&mut self, deadline: Instant) -> Result<Vec<u8>, String> {
        let first = self.read_line(deadline)?;
        if first.starts_with(b"? ") {
            return Ok(first);
        }
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                self.buf.drain(..i + 2);
                return Ok(first);
            }
            self.fill(deadline, "the body of a WHATSAT reply")?;
        }
    }
}

/// Sends one marker IAMAT at each server, then asks every server about every marker (WHATSAT)
/// until each shows it, or `bound` passes. Links are FIFO TCP streams, so a server showing a
/// marker holds every record sent before it along the same path. Returns the time from
/// `since` until the last (server, marker) pair was seen.
pub fn converge(
    servers: &[Server],
    tag: &str,
    since: Instant,
    bound: Duration,
) -> Result<Duration, String> {
    let deadline = Instant::now() + bound;
    let mut clients = servers
        .iter()
        .map(|s| Client::connect(s.addr))
        .collect::<Result<Vec<_>, _>>()?;
    let mut markers = Vec::with_capacity(servers.len()); // (id, its AT line)
    for (client, server) in clients.iter_mut().zip(servers) {
        let id = format!("marker-{tag}-{}", server.name);
        let at = client.iamat(&id, deadline)?;
        markers.push((id, at));
    }
    // pending[j]: the markers server j has not shown yet.
    let mut pending: Vec<Vec<usize>> = vec![(0..markers.len()).collect(); servers.len()];
    loop {
        for (client, waiting) in clients.iter_mut().zip(pending.iter_mut()) {
            if waiting.is_empty() {
                continue;
            }
            // Every question in one write, then the answers in order: one round trip per
            // server per sweep.
            let questions: String = waiting
                .iter()
                .map(|&i| format!("WHATSAT {} 10 1\n", markers[i].0))
                .collect();
            client.send(questions.as_bytes())?;
            let mut still = Vec::new();
            for &i in waiting.iter() {
                if client.read_whatsat_reply(deadline)? != markers[i].1 {
                    still.push(i);
                }
            }
            *waiting = still;
        }
        let missing: usize = pending.iter().map(Vec::len).sum();
        if missing == 0 {
            return Ok(since.elapsed());
        }
        if Instant::now() >= deadline {
            let (j, waiting) = pending
                .iter()
                .enumerate()
                .find(|(_, w)| !w.is_empty())
                .expect("something is missing");
            return Err(format!(
                "{missing} of {} (server, marker) pairs not seen within {bound:?}, e.g. {} lacks {}",
                servers.len() * markers.len(),
                servers[j].name,
                markers[waiting[0]].0
            ));
        }
        // The servers may be busy absorbing a backlog: a short pause, not a busy loop.
        thread::sleep(Duration::from_millis(1));
    }
}

/// Propagation samples from `from` to `to`: an IAMAT with a new id on one connection; from its
/// AT reply (t0), WHATSAT about that id on another connection, back to back, until the reply's
/// first line is that AT line (t1). Returns t1 - t0 of each sample; takes `samples` of them or
/// as many as fit in `window`.
pub fn propagation_samples(
    from: &Server,
    to: &Server,
    tag: &str,
    samples: usize,
    window: Duration,
) -> Result<Vec<Duration>, String> {
    let mut writer = Client::connect(from.addr)?;
    let mut reader = Client::connect(to.addr)?;
    let started = Instant::now();
    let mut delays = Vec::with_capacity(samples);
    for k in 0..samples {
        if started.elapsed() >= window {
            break;
        }
        let id = format!("probe-{tag}-{k}");
        let deadline = Instant::now() + PROBE_BOUND;
        let at = writer.iamat(&id, deadline)?;
        let t0 = Instant::now();
        let question = format!("WHATSAT {id} 10 1\n");
        loop {
            reader.send(question.as_bytes())?;
            if reader.read_whatsat_reply(deadline)? == at {
                delays.push(t0.elapsed());
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{id}, sent to {}, did not reach {} within {PROBE_BOUND:?}",
                    from.name, to.name
                ));
            }
        }
    }
    Ok(delays)
}

/// The `p`-th percentile (nearest rank) of `samples`, in microseconds.
pub fn percentile_us(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1].as_secs_f64() * 1e6
}
