//! A fake Google Places that speaks real HTTPS on `127.0.0.1:0`.
//!
//! The certificates are made fresh for each fake: a CA (written as PEM to `ca_file()`, which a
//! test configuration names as `places.ca_file`) and a server certificate it signs, for
//! `localhost` and `127.0.0.1`. The herd therefore runs its real TLS client, certificate checks
//! included, against a server whose answers the test chooses.
//!
//! The fake serves HTTP/1.1 keep-alive, one thread per accepted connection: it reads requests
//! (head parsed with `httparse`, body by `Content-Length`), records each one, and answers it as
//! the current [`Behaviour`] says. The behaviour can be switched at any time with
//! [`FakePlaces::set`]; a request is answered by the behaviour current when it was read.
//!
//! Every thread ends when the fake is dropped: the accept loop is woken by a connection to
//! itself, connection threads are woken by shutting their sockets down, and a stalled answer
//! is a bounded sleep loop that checks the stop flag.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ServerConfig, ServerConnection};

use super::TestDir;

/// The legacy Nearby Search path.
pub const LEGACY_PATH: &str = "/maps/api/place/nearbysearch/json";
/// The Places API (New) Nearby Search path.
pub const NEW_PATH: &str = "/v1/places:searchNearby";

/// How a [`Behaviour::Fixture`] body is delimited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length: N`.
    ContentLength,
    /// `Transfer-Encoding: chunked`. The sizes are used in turn, cyclically, until the body is
    /// consumed (`[1, 2, 3]` makes chunks of 1, 2, 3, 1, 2, 3, ... bytes); an empty list splits
    /// the body into three chunks. Each chunk is written and flushed on its own, so it travels
    /// in its own TLS record.
    Chunked(Vec<usize>),
    /// `Connection: close` and no length: the body ends when the fake closes the connection
    /// (after a TLS close_notify, as Google's front ends do).
    Close,
    /// As [`Framing::Close`], but the TCP connection is closed with no close_notify first: as
    /// anyone on the path could close it, cutting the body short.
    CloseCut,
}

/// How the fake answers the next requests.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// An HTTP response with this status and body (`Content-Type: application/json`), framed as
    /// said, written after `delay`.
    Fixture {
        body: Vec<u8>,
        framing: Framing,
        http_status: u16,
        delay: Duration,
    },
    /// These exact bytes, a whole HTTP response (for example a `.http` fixture).
    Raw(Vec<u8>),
    /// Read the request and never answer; the connection stays open until the fake is dropped.
    Stall,
    /// Read the request, then close the TCP connection without any response.
    Drop,
}

impl Behaviour {
    /// HTTP 200 with `Content-Length`, at once.
    pub fn ok(body: impl Into<Vec<u8>>) -> Behaviour {
        Behaviour::status(200, body)
    }

    /// This HTTP status with `Content-Length`, at once.
    pub fn status(http_status: u16, body: impl Into<Vec<u8>>) -> Behaviour {
        Behaviour::Fixture {
            body: body.into(),
            framing: Framing::ContentLength,
            http_status,
            delay: Duration::ZERO,
        }
    }

    /// HTTP 200 framed as said, at once.
    pub fn framed(body: impl Into<Vec<u8>>, framing: Framing) -> Behaviour {
        Behaviour::Fixture {
            body: body.into(),
            framing,
            http_status: 200,
            delay: Duration::ZERO,
        }
    }

    /// The same fixture, answered `delay` after the request was read.
    pub fn delayed(self, delay: Duration) -> Behaviour {
        match self {
            Behaviour::Fixture {
                body,
                framing,
                http_status,
                ..
            } => Behaviour::Fixture {
                body,
                framing,
                http_status,
                delay,
            },
            other => panic!("only a Behaviour::Fixture can be delayed, not {other:?}"),
        }
    }
}

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Request {
    /// Which accepted connection carried it (1 for the first).
    pub connection: usize,
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
    /// Names as sent (case kept), values as raw bytes, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first header of this name (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The request as text, for assertion messages.
    pub fn describe(&self) -> String {
        let mut out = format!("{} {}", self.method, self.target);
        for (name, value) in &self.headers {
            out.push_str(&format!(" | {name}: {}", value.escape_ascii()));
        }
        out.push_str(&format!(" | body {}", self.body.escape_ascii()));
        out
    }
}

struct Shared {
    behaviour: Mutex<Behaviour>,
    requests: Mutex<Vec<Request>>,
    connections: AtomicUsize,
    handshakes: AtomicUsize,
    stop: AtomicBool,
    /// A clone of every accepted socket, shut down on drop to wake its thread.
    sockets: Mutex<Vec<TcpStream>>,
}

/// Locks a mutex even if a thread panicked while holding it (the data is plain records).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running fake Places server; stops when dropped.
pub struct FakePlaces {
    shared: Arc<Shared>,
    addr: SocketAddr,
    ca_file: PathBuf,
    accept: Option<JoinHandle<()>>,
    /// Holds the CA file; removed after the threads are stopped.
    _dir: TestDir,
}

/// A CA certificate (PEM) and the issuer that signs with its key.
/// Writes the CA the herd is to trust into `dir`, and makes the TLS configuration of a server
/// presenting `cert`.
fn tls_server(
    dir: &TestDir,
    ca_pem: &str,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> (PathBuf, Arc<ServerConfig>) {
    let ca_file = dir.join("places-ca.pem");
    std::fs::write(&ca_file, ca_pem)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", ca_file.display()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("cannot build the TLS server configuration");
    (ca_file, Arc::new(config))
}

fn new_ca(common_name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SAN list");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("cannot generate a CA key");
    let cert = params.self_signed(&key).expect("cannot self-sign the CA");
    (cert.pem(), Issuer::new(params, key))
}

/// A server certificate for `localhost` and `127.0.0.1`, signed by `issuer`.
fn new_server_cert(
    issuer: &Issuer<'static, KeyPair>,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("valid SANs");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("cannot generate a server key");
    let cert = params
        .signed_by(&key, issuer)
        .expect("cannot sign the server certificate");
    let key_der = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (cert.der().clone(), key_der)
}

impl FakePlaces {
    /// Starts a fake whose certificate is signed by the CA in `ca_file()`.
    pub fn start(behaviour: Behaviour) -> FakePlaces {
        FakePlaces::start_with(behaviour, false)
    }

    /// Starts a fake whose certificate is signed by a different CA than the one written to
    /// `ca_file()`: a client that trusts `ca_file()` must refuse it.
    pub fn start_untrusted(behaviour: Behaviour) -> FakePlaces {
        FakePlaces::start_with(behaviour, true)
    }

    fn start_with(behaviour: Behaviour, untrusted: bool) -> FakePlaces {
        let dir = TestDir::new("fake-places");
        let (ca_pem, issuer) = new_ca("herd test CA");
        let (cert, key) = if untrusted {
            let (_, other) = new_ca("untrusted test CA");
            new_server_cert(&other)
        } else {
            new_server_cert(&issuer)
        };
        let (ca_file, config) = tls_server(&dir, &ca_pem, cert, key);

        let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("listener has no address");
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(behaviour),
            requests: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
        });
        let accept = {
            let shared = Arc::clone(&shared);
            let serve: Serve = Arc::new(move |sock, id, shared| {
                let _ = serve_connection(sock, id, shared, Arc::clone(&config));
            });
            thread::spawn(move || accept_loop(listener, shared, serve))
        };
        FakePlaces {
            shared,
            addr,
            ca_file,
            accept: Some(accept),
            _dir: dir,
        }
    }

    /// Answers the next requests this way.
    pub fn set(&self, behaviour: Behaviour) {
        *lock(&self.shared.behaviour) = behaviour;
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The PEM file of the CA to trust (`places.ca_file`).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// `https://127.0.0.1:PORT/maps/api/place/nearbysearch/json`
    pub fn legacy_url(&self) -> String {
        format!("https://127.0.0.1:{}{LEGACY_PATH}", self.port())
    }

    /// `https://127.0.0.1:PORT/v1/places:searchNearby`
    pub fn new_url(&self) -> String {
        format!("https://127.0.0.1:{}{NEW_PATH}", self.port())
    }

    /// A `[places]` table for this fake: `api` is `"legacy"` or `"new"`.
    pub fn places_toml(&self, api: &str, timeout_ms: u64) -> String {
        let url = match api {
            "legacy" => self.legacy_url(),
            "new" => self.new_url(),
            other => panic!("unknown Places API {other:?}"),
        };
        format!(
            "[places]\napi = {}\nurl = {}\nca_file = {}\ntimeout_ms = {timeout_ms}\n",
            toml_basic(api),
            toml_basic(&url),
            toml_basic(&self.ca_file.to_string_lossy()),
        )
    }

    /// Every request received so far, in order of arrival.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.requests).clone()
    }

    /// TLS handshakes completed so far.
    pub fn handshakes(&self) -> usize {
        self.shared.handshakes.load(Ordering::SeqCst)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FakePlaces {
    fn drop(&mut self) {
        self.shared.shut_down(self.addr, self.accept.take());
    }
}

impl Shared {
    /// Stops a fake listening at `addr`: wakes its accept loop, which sees the flag and returns
    /// (should the wake-up fail, the thread is left detached rather than joined for ever), then
    /// every connection thread blocked in a read or a write.
    fn shut_down(&self, addr: SocketAddr, accept: Option<JoinHandle<()>>) {
        self.stop.store(true, Ordering::SeqCst);
        let woken = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok();
        if let Some(accept) = accept {
            if woken {
                let _ = accept.join();
            }
        }
        for socket in lock(&self.sockets).drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

/// A TOML basic string.
pub fn toml_basic(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04X}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// What a fake does with one accepted connection: its socket and its number, from 1.
type Serve = Arc<dyn Fn(TcpStream, usize, &Shared) + Send + Sync>;

/// Accepts until stopped, keeping a clone of every socket (so that stopping can shut them all)
/// and serving each connection on a thread of its own.
fn accept_loop(listener: TcpListener, shared: Arc<Shared>, serve: Serve) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(sock) = stream else { continue };
        let id = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
        match sock.try_clone() {
            Ok(clone) => lock(&shared.sockets).push(clone),
            Err(_) => continue,
        }
        let (shared, serve) = (Arc::clone(&shared), Arc::clone(&serve));
        thread::spawn(move || serve(sock, id, &shared));
    }
}

/// What the connection does after answering a request.
enum Next {
    KeepAlive,
    /// Send a TLS close_notify, then close.
    Close,
    /// Close the TCP connection as it is.
    Abort,
}

/// Serves one connection: TLS handshake, then requests until the peer closes, the behaviour
/// closes, or the fake stops.
fn serve_connection(
    mut sock: TcpStream,
    id: usize,
    shared: &Shared,
    config: Arc<ServerConfig>,
) -> io::Result<()> {
    sock.set_nodelay(true)?;
    let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
    while conn.is_handshaking() {
        let (read, written) = conn.complete_io(&mut sock)?;
        if read == 0 && written == 0 && conn.is_handshaking() {
            return Ok(()); // end of stream during the handshake
        }
    }
    shared.handshakes.fetch_add(1, Ordering::SeqCst);

    let mut buf: Vec<u8> = Vec::new();
    loop {
        let Some((request, client_closes)) = read_request(&mut conn, &mut sock, &mut buf, id)?
        else {
            return Ok(());
        };
        // The behaviour current when the request was read answers it.
        let behaviour = lock(&shared.behaviour).clone();
        lock(&shared.requests).push(request);
        let next = respond(&mut conn, &mut sock, shared, behaviour)?;
        if matches!(next, Next::Abort) {
            let _ = sock.shutdown(Shutdown::Both);
            return Ok(());
        }
        if client_closes || matches!(next, Next::Close) || shared.stop.load(Ordering::SeqCst) {
            conn.send_close_notify();
            let _ = conn.complete_io(&mut sock);
            let _ = sock.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}

/// Reads one request; `None` at a clean end of stream before any byte of it. The flag says
/// whether the request asked to close the connection after the response.
fn read_request(
    conn: &mut ServerConnection,
    sock: &mut TcpStream,
    buf: &mut Vec<u8>,
    id: usize,
) -> io::Result<Option<(Request, bool)>> {
    let mut stream = rustls::Stream::new(conn, sock);
    let mut chunk = [0u8; 16384];
    // The head.
    let (head_len, method, target, headers) = loop {
        let mut header_space = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut header_space);
        match parsed.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let headers: Vec<(String, Vec<u8>)> = parsed
                    .headers
                    .iter()
                    .map(|h| (h.name.to_string(), h.value.to_vec()))
                    .collect();
                break (
                    len,
                    parsed.method.unwrap_or("").to_string(),
                    parsed.path.unwrap_or("").to_string(),
                    headers,
                );
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad request head {}: {e}", buf.escape_ascii()),
                ))
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    let request_head = Request {
        connection: id,
        method,
        target,
        headers,
        body: Vec::new(),
    };
    let body_len = match request_head.header("content-length") {
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length"))?,
        None => 0,
    };
    while buf.len() < head_len + body_len {
        match stream.read(&mut chunk) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let body = buf[head_len..head_len + body_len].to_vec();
    buf.drain(..head_len + body_len);
    let closes = request_head
        .header("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
    Ok(Some((
        Request {
            body,
            ..request_head
        },
        closes,
    )))
}

/// Sleeps `total`, in short steps, ending early if the fake stops; returns false if it did.
fn sleep_unless_stopped(shared: &Shared, total: Duration) -> bool {
    let deadline = Instant::now() + total;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return false;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        thread::sleep(left.min(Duration::from_millis(20)));
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

fn respond(
    conn: &mut ServerConnection,
    sock: &mut TcpStream,
    shared: &Shared,
    behaviour: Behaviour,
) -> io::Result<Next> {
    match behaviour {
        Behaviour::Stall => {
            // Hold the connection open, answering nothing, until the fake stops.
            while sleep_unless_stopped(shared, Duration::from_millis(100)) {}
            Ok(Next::Abort)
        }
        Behaviour::Drop => Ok(Next::Abort),
        Behaviour::Raw(bytes) => {
            let mut stream = rustls::Stream::new(conn, sock);
            stream.write_all(&bytes)?;
            stream.flush()?;
            Ok(Next::KeepAlive)
        }
        Behaviour::Fixture {
            body,
            framing,
            http_status,
            delay,
        } => {
            if !sleep_unless_stopped(shared, delay) {
                return Ok(Next::Abort);
            }
            let mut head = format!(
                "HTTP/1.1 {http_status} {}\r\nContent-Type: application/json; charset=UTF-8\r\n\
                 Server: fake-places\r\n",
                reason(http_status)
            );
            let mut stream = rustls::Stream::new(conn, sock);
            match framing {
                Framing::ContentLength => {
                    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
                    let mut response = head.into_bytes();
                    response.extend_from_slice(&body);
                    stream.write_all(&response)?;
                    stream.flush()?;
                    Ok(Next::KeepAlive)
                }
                Framing::Chunked(sizes) => {
                    head.push_str("Transfer-Encoding: chunked\r\n\r\n");
                    stream.write_all(head.as_bytes())?;
                    stream.flush()?;
                    let third = body.len().div_ceil(3).max(1);
                    let sizes = if sizes.is_empty() { vec![third] } else { sizes };
                    let mut rest = body.as_slice();
                    for &size in sizes.iter().cycle() {
                        if rest.is_empty() {
                            break;
                        }
                        let (part, tail) = rest.split_at(size.clamp(1, rest.len()));
                        let mut chunk = format!("{:x}\r\n", part.len()).into_bytes();
                        chunk.extend_from_slice(part);
                        chunk.extend_from_slice(b"\r\n");
                        stream.write_all(&chunk)?;
                        stream.flush()?;
                        rest = tail;
                    }
                    stream.write_all(b"0\r\n\r\n")?;
                    stream.flush()?;
                    Ok(Next::KeepAlive)
                }
                Framing::Close | Framing::CloseCut => {
                    head.push_str("Connection: close\r\n\r\n");
                    let mut response = head.into_bytes();
                    response.extend_from_slice(&body);
                    stream.write_all(&response)?;
                    stream.flush()?;
                    match framing {
                        Framing::CloseCut => Ok(Next::Abort),
                        _ => Ok(Next::Close),
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A Places that dribbles (added for the fault tests)

/// How a [`DribblePlaces`] answers: these exact bytes (a whole HTTP response), written `step`
/// bytes at a time with `pause` after each write, each write flushed in its own TLS record.
#[derive(Clone, Debug)]
pub struct Dribble {
    pub response: Vec<u8>,
    pub step: usize,
    pub pause: Duration,
}

/// A fake Places over HTTPS, with its own CA in `ca_file()` like [`FakePlaces`], that answers
/// every request by dribbling a response (the [`Dribble`] current when the request was read).
/// Keep-alive once a response is through. Stops when dropped: every pause checks the stop flag.
pub struct DribblePlaces {
    shared: Arc<Shared>,
    dribble: Arc<Mutex<Dribble>>,
    addr: SocketAddr,
    ca_file: PathBuf,
    accept: Option<JoinHandle<()>>,
    _dir: TestDir,
}

impl DribblePlaces {
    pub fn start(dribble: Dribble) -> DribblePlaces {
        let dir = TestDir::new("dribble-places");
        let (ca_pem, issuer) = new_ca("herd dribble test CA");
        let (cert, key) = new_server_cert(&issuer);
        let (ca_file, config) = tls_server(&dir, &ca_pem, cert, key);
        let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("listener has no address");
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(Behaviour::Stall), // unused: the dribble answers
            requests: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
        });
        let dribble = Arc::new(Mutex::new(dribble));
        let accept = {
            let shared = Arc::clone(&shared);
            let dribble = Arc::clone(&dribble);
            let serve: Serve = Arc::new(move |sock, id, shared| {
                let _ = serve_dribbling(sock, id, shared, Arc::clone(&config), &dribble);
            });
            thread::spawn(move || accept_loop(listener, shared, serve))
        };
        DribblePlaces {
            shared,
            dribble,
            addr,
            ca_file,
            accept: Some(accept),
            _dir: dir,
        }
    }

    /// Answers the next requests this way.
    pub fn set(&self, dribble: Dribble) {
        *lock(&self.dribble) = dribble;
    }

    /// A `[places]` table for this fake, legacy API.
    pub fn places_toml(&self, timeout_ms: u64) -> String {
        let url = format!("https://127.0.0.1:{}{LEGACY_PATH}", self.addr.port());
        format!(
            "[places]\napi = \"legacy\"\nurl = {}\nca_file = {}\ntimeout_ms = {timeout_ms}\n",
            toml_basic(&url),
            toml_basic(&self.ca_file.to_string_lossy()),
        )
    }

    /// Every request received so far, in order of arrival.
    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.requests).clone()
    }
}

impl Drop for DribblePlaces {
    fn drop(&mut self) {
        self.shared.shut_down(self.addr, self.accept.take());
    }
}

fn serve_dribbling(
    mut sock: TcpStream,
    id: usize,
    shared: &Shared,
    config: Arc<ServerConfig>,
    dribble: &Mutex<Dribble>,
) -> io::Result<()> {
    sock.set_nodelay(true)?;
    let mut conn = ServerConnection::new(config).map_err(io::Error::other)?;
    while conn.is_handshaking() {
        let (read, written) = conn.complete_io(&mut sock)?;
        if read == 0 && written == 0 && conn.is_handshaking() {
            return Ok(());
        }
    }
    shared.handshakes.fetch_add(1, Ordering::SeqCst);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let Some((request, _)) = read_request(&mut conn, &mut sock, &mut buf, id)? else {
            return Ok(());
        };
        let Dribble {
            response,
            step,
            pause,
        } = lock(dribble).clone();
        lock(&shared.requests).push(request);
        for part in response.chunks(step.max(1)) {
            let mut stream = rustls::Stream::new(&mut conn, &mut sock);
            stream.write_all(part)?;
            stream.flush()?;
            if !sleep_unless_stopped(shared, pause) {
                return Ok(());
            }
        }
    }
}
