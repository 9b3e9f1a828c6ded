//! A client that only fetches from the fake Places: what a WHATSAT costs outside the herd's own
//! work. It opens as many keep-alive HTTPS connections as the servers' pool holds, with the
//! herd's own TLS configuration (`herd::places::pool::tls_config`: rustls, the same cipher
//! suites), and on one thread, pinned where the servers run, sends the herd's request on each
//! and reads each response whole (head parsed with `httparse`, body by `Content-Length`), over
//! and over. Nothing else: no client, no JSON check, no cut, no log.
//!
//! Two figures come of it. The fetches a second are the fake's own limit with the whole other
//! core to itself (in the WHATSAT scenario it shares that core with the load generator). The
//! thread's CPU time per fetch is the TLS decryption of the answer, the HTTP framing and the
//! socket calls: the part of a WHATSAT that any server in Rust with rustls pays, measured
//! apart from the herd.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use crate::affinity::set_affinity;
use crate::fake_places::{FakePlaces, LEGACY_PATH};

/// What a fetch-only run measured, over its window.
#[derive(Clone, Copy, Debug)]
pub struct FetchReport {
    pub fetches: u64,
    pub seconds: f64,
    /// The fetching thread's own CPU time.
    pub cpu_seconds: f64,
    /// The bytes of one response's body.
    pub body_bytes: usize,
}

impl FetchReport {
    pub fn per_second(&self) -> f64 {
        self.fetches as f64 / self.seconds
    }

    /// The fetching thread's CPU time per fetch, in µs.
    pub fn cpu_us_per_fetch(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.fetches.max(1) as f64
    }

    /// The fetching thread's share of its core, in percent.
    pub fn cpu_percent(&self) -> f64 {
        100.0 * self.cpu_seconds / self.seconds
    }
}

/// This thread's CPU time so far, in seconds.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } == 0;
    if ok {
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    } else {
        f64::NAN
    }
}

type Connection = StreamOwned<ClientConnection, TcpStream>;

/// Connects and completes the TLS handshake.
fn connect(fake: &FakePlaces, config: &Arc<ClientConfig>) -> Result<Connection, String> {
    let sock = TcpStream::connect(fake.addr()).map_err(|e| format!("cannot connect: {e}"))?;
    sock.set_nodelay(true).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1".to_string()).map_err(|e| e.to_string())?;
    let conn = ClientConnection::new(Arc::clone(config), name).map_err(|e| e.to_string())?;
    let mut stream = StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| format!("TLS handshake: {e}"))?;
    }
    Ok(stream)
}

/// Reads one response whole into `buf` (cleared first) and returns its body's length.
fn read_response(stream: &mut Connection, buf: &mut Vec<u8>) -> io::Result<usize> {
    buf.clear();
    let mut chunk = [0u8; 32 * 1024];
    let (head, body) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(buf) {
            Ok(httparse::Status::Complete(head)) => {
                let length = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                    .ok_or_else(|| io::Error::other("a response without Content-Length"))?;
                break (head, length);
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(io::Error::other(format!("a bad response head: {e}"))),
        }
        match stream.read(&mut chunk)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    while buf.len() < head + body {
        match stream.read(&mut chunk)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Ok(body)
}

/// Fetches from `fake` on `connections` keep-alive connections, one request in flight on each,
/// from one thread pinned to `cpu`, for `warmup` then a measured `duration`.
pub fn fetch_only(
    fake: &FakePlaces,
    connections: usize,
    warmup: Duration,
    duration: Duration,
    cpu: Option<usize>,
) -> Result<FetchReport, String> {
    let config = herd::places::pool::tls_config(Some(fake.ca_file()))?;
    let request = format!(
        "GET {LEGACY_PATH}?location=34.068930,-118.445127&radius=10000&key=bench-key \
         HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUser-Agent: herd-bench\r\nAccept: \
         application/json\r\n\r\n",
        fake.port()
    );
    thread::scope(|scope| {
        scope
            .spawn(|| {
                if let Some(cpu) = cpu {
                    set_affinity(cpu).map_err(|e| format!("cannot pin to CPU {cpu}: {e}"))?;
                }
                let mut streams = (0..connections)
                    .map(|_| connect(fake, &config))
                    .collect::<Result<Vec<_>, _>>()?;
                let mut buf = Vec::with_capacity(64 * 1024);
                let started = Instant::now();
                let mut window: Option<(Instant, f64, u64)> = None;
                let mut fetches = 0u64;
                let mut body_bytes = 0;
                loop {
                    let now = Instant::now();
                    match window {
                        None if now >= started + warmup => {
                            window = Some((now, thread_cpu_seconds(), fetches));
                        }
                        Some((opened, cpu0, before)) if now >= opened + duration => {
                            return Ok(FetchReport {
                                fetches: fetches - before,
                                seconds: opened.elapsed().as_secs_f64(),
                                cpu_seconds: thread_cpu_seconds() - cpu0,
                                body_bytes,
                            });
                        }
                        _ => {}
                    }
                    for stream in &mut streams {
                        stream
                            .write_all(request.as_bytes())
                            .and_then(|()| stream.flush())
                            .map_err(|e| format!("cannot send a request: {e}"))?;
                    }
                    for stream in &mut streams {
                        body_bytes = read_response(stream, &mut buf)
                            .map_err(|e| format!("cannot read a response: {e}"))?;
                        fetches += 1;
                    }
                }
            })
            .join()
            .unwrap_or_else(|_| Err("the fetching thread panicked".to_string()))
    })
}
