//! Step 4: the TLS pump, rustls over a non-blocking socket.
//!
//! The herd asks Google Places over HTTPS from inside its poll loop, so TLS cannot block either.
//! rustls does no I/O: it takes the bytes read from the socket and hands back the bytes to
//! write, and the program moves them. This example fetches one page that way:
//!
//! ```text
//! cargo run --release --example 04_tls_pump                   # --port N, --path /x
//! ```
//!
//! It makes a certificate for `localhost` with `rcgen`, starts a small blocking HTTPS server
//! with it in a thread (port 7004; `--port 0` takes a free one, and the first line printed says
//! which), and fetches `/` (or `--path`) from it in a `mio` poll loop, trusting that certificate
//! and nothing else. Each step of the pump goes to stderr, the response to stdout. The pump,
//! on every readiness event until the server closes:
//!
//! 1. `write_tls` while rustls `wants_write` (the ClientHello; later the request, which was
//!    handed to rustls before the connection even existed);
//! 2. `read_tls` until `WouldBlock`, each read followed by `process_new_packets` (the handshake,
//!    or decryption) and a drain of `reader()`: decrypted bytes raise no new event;
//! 3. `write_tls` again, then wait for what rustls asks: `wants_read`, `wants_write`.
//!
//! The asyncio equivalent is `await asyncio.open_connection(host, port, ssl=context)`, whose
//! `SSLProtocol` runs the same pump around a pair of `ssl.MemoryBIO`s.

use std::error::Error;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::crypto::ring;
use rustls::pki_types::{PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

const DEFAULT_PORT: u16 = 7004;
/// How long the whole exchange may take: the loop's one deadline.
const TIMEOUT: Duration = Duration::from_secs(10);
const CLIENT: Token = Token(0);

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.get(args.iter().position(|a| a == flag)? + 1);
    let port: u16 = value("--port").map_or(Ok(DEFAULT_PORT), |v| v.parse())?;
    let path = value("--path").map_or("/", String::as_str);

    let provider = Arc::new(ring::default_provider());
    // A certificate for `localhost`, made afresh: the server shows it, the client trusts it
    // and nothing else.
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
    let cert = made.cert.der().clone();
    let key = PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.into())?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
    let addr = listener.local_addr()?;
    println!("listening on {addr}");
    thread::spawn(move || serve(listener, Arc::new(server)));

    let mut roots = RootCertStore::empty();
    roots.add(cert)?;
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let response = fetch(addr, Arc::new(client), path)?;
    io::stdout().write_all(&response)?;
    Ok(())
}

/// GETs `path` from `addr` over TLS, on one non-blocking socket in a poll loop, and returns
/// the whole response as it came.
fn fetch(addr: SocketAddr, config: Arc<ClientConfig>, path: &str) -> Result<Vec<u8>> {
    let deadline = Instant::now() + TIMEOUT;
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(4);
    let mut tls = ClientConnection::new(config, ServerName::try_from("localhost")?)?;
    // Plaintext waits inside rustls until the handshake allows it out.
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.writer().write_all(request.as_bytes())?;
    // Returns at once: the TCP handshake goes on in the kernel, and WRITABLE says it ended.
    let mut stream = TcpStream::connect(addr)?;
    poll.registry()
        .register(&mut stream, CLIENT, Interest::WRITABLE)?;
    loop {
        wait(&mut poll, &mut events, deadline)?;
        if let Some(e) = stream.take_error()? {
            return Err(format!("cannot connect to {addr}: {e}").into());
        }
        match stream.peer_addr() {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::NotConnected => continue, // a spurious event
            Err(e) => return Err(format!("cannot connect to {addr}: {e}").into()),
        }
    }
    eprintln!("connected to {addr}");
    let mut response = Vec::new();
    while !pump(&mut tls, &mut stream, &mut response)? {
        let interest = match (tls.wants_read(), tls.wants_write()) {
            (true, true) => Interest::READABLE | Interest::WRITABLE,
            (false, true) => Interest::WRITABLE,
            // rustls wants to read, or nothing at all: then only the server's close can come.
            (_, false) => Interest::READABLE,
        };
        poll.registry().reregister(&mut stream, CLIENT, interest)?;
        wait(&mut poll, &mut events, deadline)?;
    }
    Ok(response)
}

/// Moves bytes between the socket and rustls until the socket would block, putting the
/// plaintext into `plain`. Returns whether the server has closed the TLS session.
fn pump(tls: &mut ClientConnection, stream: &mut TcpStream, plain: &mut Vec<u8>) -> Result<bool> {
    write_tls(tls, stream)?;
    loop {
        let n = match tls.read_tls(stream) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("reading from the server failed: {e}").into()),
        };
        eprintln!("read_tls: {n} bytes");
        let handshaking = tls.is_handshaking();
        // Bad certificates, bad records: TLS errors surface here.
        tls.process_new_packets()
            .map_err(|e| format!("TLS failed: {e}"))?;
        if handshaking && !tls.is_handshaking() {
            let version = tls.protocol_version().map(|v| format!("{v:?}"));
            eprintln!("handshake done: {}", version.unwrap_or_default());
        }
        let mut reader = tls.reader();
        loop {
            match reader.fill_buf() {
                Ok([]) => {
                    eprintln!("close_notify: the response is whole");
                    return Ok(true);
                }
                Ok(bytes) => {
                    let len = bytes.len();
                    eprintln!("plaintext: {len} bytes");
                    plain.extend_from_slice(bytes);
                    reader.consume(len);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The stream ended without close_notify: an attacker could have cut it short.
                Err(e) => return Err(format!("the response was cut: {e}").into()),
            }
        }
        if n == 0 {
            return Err("the server closed without ending the TLS session".into());
        }
    }
    write_tls(tls, stream)?;
    Ok(false)
}

fn write_tls(tls: &mut ClientConnection, stream: &mut TcpStream) -> Result<()> {
    while tls.wants_write() {
        match tls.write_tls(stream) {
            Ok(n) => eprintln!("write_tls: {n} bytes"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("writing to the server failed: {e}").into()),
        }
    }
    Ok(())
}

/// Sleeps until the socket is ready, or fails once `deadline` has passed.
fn wait(poll: &mut Poll, events: &mut Events, deadline: Instant) -> Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no answer within {} s", TIMEOUT.as_secs()).into());
        }
        match poll.poll(events, Some(left)) {
            Ok(()) if !events.is_empty() => return Ok(()),
            Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e.into()),
            _ => {}
        }
    }
}

/// The other side, kept as plain as can be: a blocking HTTPS server in its own thread, which
/// answers each request with a short text and closes.
fn serve(listener: TcpListener, config: Arc<ServerConfig>) {
    for tcp in listener.incoming() {
        let answered = tcp.map_err(Box::from).and_then(|tcp| {
            let mut tls = rustls::StreamOwned::new(ServerConnection::new(config.clone())?, tcp);
            let mut lines = BufReader::new(&mut tls).lines();
            let request = lines.next().ok_or("no request")??;
            while !lines.next().ok_or("no blank line")??.is_empty() {}
            let body = format!("hello over TLS, you asked: {request}\n");
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close";
            let length = body.len();
            let response = format!("{head}\r\nContent-Length: {length}\r\n\r\n{body}");
            tls.write_all(response.as_bytes())?;
            tls.conn.send_close_notify();
            tls.flush()?;
            Ok::<(), Box<dyn Error>>(())
        });
        if let Err(e) = answered {
            eprintln!("server: {e}");
        }
    }
}
