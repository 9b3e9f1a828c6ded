//! HTTPS to Google Places, written by hand as state machines in the server's one poll loop:
//! non-blocking connect, TLS with rustls, an HTTP/1.1 request, the response read by
//! [`crate::places::http::ResponseReader`], and the connection kept alive for the next request.
//!
//! A [`PlacesPool`] has a fixed number of slots, each holding at most one connection:
//!
//! ```text
//!            job queued, address known: connect()        WRITABLE, no socket error
//!   Empty --------------------------------------> Connecting --------------------> Exchanging
//!     ^  ^                                             |                          |   |
//!     |  '--- refused, TLS error, deadline, EOF -------+--------------------------'   |
//!     |       (or a response after which the connection cannot be kept)               |
//!     |                                                         response complete,    |
//!     |                                                         connection kept       |
//!     '----- idle too long, or the server closed -------------- Idle <----------------'
//!                                                                 '--- next job: request sent
//!                                                                      --> Exchanging
//! ```
//!
//! Every job carries its own deadline, from the WHATSAT's arrival: queued, connecting, in the
//! handshake or reading the body, a job past its deadline is answered with an `UNKNOWN_ERROR`
//! body, so a client always hears back in time. DNS never blocks the loop: a helper thread
//! resolves the host and wakes the loop through a [`mio::Waker`] (asyncio does the same with
//! `getaddrinfo` in an executor).
//!
//! A slot carries one request at a time (HTTP/1.1, no pipelining), so `pool_size` bounds the
//! requests in flight to Google, and `max_queue` the jobs waiting for a slot.
//!
//! How the loop drives the pool: a WHATSAT calls [`PlacesPool::submit`], then
//! [`PlacesPool::dispatch`]; every event on a slot's token goes to
//! [`PlacesPool::on_ready`], deadlines to [`PlacesPool::on_timeout`], the waker to
//! [`PlacesPool::on_wake`]. The pool opens sockets but never registers them: the loop takes
//! them from [`PlacesPool::take_opened`]. Finished jobs wait in [`PlacesPool::done`] for the
//! loop to hand each reply to its connection.
//!
//! The edge-triggered trap is doubled here: bytes can wait in the kernel, and plaintext can
//! wait inside rustls, and no event announces either. So the pump reads the socket until it
//! would block, and after every read drains all the plaintext rustls has decrypted.

use std::collections::VecDeque;
use std::io::{self, BufRead, Write};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::Waker;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use crate::config::PlacesConfig;
use crate::log::Log;
use crate::metrics::PlacesCounts;
use crate::places::http::ResponseReader;
use crate::places::{self, Api, Output};
use crate::trace::trace_loop;
use crate::wire::Transport;

/// How long a kept-alive connection may sit unused before we close it ourselves. One that the
/// server closes first is dropped when it says so (see [`PlacesPool::on_ready`]), or found
/// out by the next request on it, which is then retried once.
const IDLE_KEEP: Duration = Duration::from_secs(30);

/// Builds the TLS configuration: the web's roots, plus the PEM file's if one is configured.
/// Called once, before the loop runs: reading the file blocks. The crypto provider is named
/// rather than taken from the process default, which rustls cannot pick by itself when more
/// than one is compiled in.
pub fn tls_config(ca_file: Option<&std::path::Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect())
            .map_err(|e| format!("places.ca_file {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "places.ca_file {}: no certificate in it",
                path.display()
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("places.ca_file {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Whom a job's answer goes to: the connection in slot `slot` of the loop's table, if it is still
/// connection `id` (a connection that left may have had its slot taken by another).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// The connection's slot in the loop's table; slots are reused.
    pub slot: usize,
    /// The connection's id (`cN` in the log), never reused.
    pub id: u64,
}

/// One WHATSAT's request, from the moment it is made until it is answered.
pub struct Job {
    /// The job's number: `places #N` in the log, and what the client's connection holds a
    /// place for among its replies.
    pub id: u64,
    /// Whom to answer. The pool only carries it.
    pub owner: Owner,
    /// The stored AT record that starts the reply. The pool only carries it.
    pub record: Box<[u8]>,
    /// The whole request, key included; written into rustls as one piece.
    request: places::Request,
    /// How many results the reply keeps.
    bound: usize,
    /// When the WHATSAT arrived: the metrics time the job from here.
    started: Instant,
    /// `started` plus `places.timeout_ms`: by then the job is answered, one way or another.
    deadline: Instant,
    /// Already retried once after a kept-alive connection turned out to be closed.
    retried: bool,
}

/// What kind of failure a client is told of, in Google's `error_message`; the detail is the
/// log's alone (it may name addresses, certificates, or what Google sent).
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// No answer within the timeout.
    Late,
    /// Too many requests already waiting for a connection.
    Busy,
    /// Anything else: no connection, TLS, HTTP, or a body that is not an answer.
    Failed,
}

impl Failure {
    /// Its index in [`crate::metrics::PLACES_OUTCOMES`] (0 is "answered").
    fn outcome(self) -> usize {
        match self {
            Failure::Failed => 1,
            Failure::Late => 2,
            Failure::Busy => 3,
        }
    }

    fn told(self) -> &'static str {
        match self {
            Failure::Late => "Google Places did not answer in time",
            Failure::Busy => "too many requests are waiting for Google Places",
            Failure::Failed => {
                "Google Places could not be reached, or its answer could not be read"
            }
        }
    }
}

/// A finished job: the reply body, Google's or an error in Google's vocabulary.
pub struct Done {
    /// Whom to answer: the loop skips a job whose connection has left.
    pub owner: Owner,
    /// The job's number, which the connection matches to the place it holds for the reply.
    pub job: u64,
    /// The AT record that starts the reply.
    pub record: Box<[u8]>,
    /// The reply's body: Google's answer as [`fn@places::answer`] made it, or an error body.
    pub body: Vec<u8>,
}

/// The most bytes read from a Places socket per system call: a whole answer of Google's, or most.
const WIRE_READ: usize = 64 * 1024;
/// The bytes one exchange reads from its socket in one turn of the loop (give or take one
/// read), so that an answer over the size cap is refused soon after the cap, not after Places
/// has sent it all, and a server sending TLS records without end (empty ones, session tickets:
/// nothing the response reader counts) cannot hold the loop: the rest is read next turn
/// ([`PlacesPool::take_more`]), after the turn has served everyone else and checked the job's
/// deadline.
const TRANSFER_STEP: usize = 256 * 1024;

/// Where one call of [`Tls::transfer`] stopped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transfer {
    /// The socket would block: readiness will be reported again when there is more.
    Blocked,
    /// [`TRANSFER_STEP`] bytes were read and the socket may hold more: call again.
    More,
    /// The stream ended with TLS's close_notify.
    Ended,
    /// The TCP stream ended with no close_notify before it. Anyone on the path can close a TCP
    /// connection, so what came may have been cut short: it ends no body.
    Cut,
}

/// A TCP connection with TLS on it.
struct Tls<S> {
    /// The TCP socket, non-blocking.
    stream: S,
    /// rustls's side: the handshake, the keys, and the bytes waiting either way.
    tls: ClientConnection,
    /// Bytes just read from the socket: kept for the connection's life, not zeroed afresh
    /// for every read.
    wire: Box<[u8]>,
    /// Connection number, for the log.
    number: u64,
}

/// One connection's state. The job in flight carries its own deadline, so the slot needs no
/// timer of its own except an idle connection's.
enum Slot<S> {
    Empty,
    /// TCP connect in flight. The request already waits inside rustls, which sends it as soon
    /// as the handshake allows.
    Connecting {
        conn: Tls<S>,
        job: Job,
    },
    /// TLS handshake, request and response in flight. `reused` if the connection served an
    /// earlier request (then a close before any answer is worth one retry).
    Exchanging {
        conn: Tls<S>,
        job: Job,
        response: ResponseReader,
        reused: bool,
    },
    /// Kept alive for the next job.
    Idle {
        conn: Tls<S>,
        until: Instant,
    },
}

/// Where the address of the Places host is.
enum Address {
    /// Not looked up yet, or the last look-up failed.
    Unknown,
    /// A helper thread is looking it up.
    Resolving(Receiver<io::Result<Vec<SocketAddr>>>),
    /// Known; `next` is the address to try next (a failing one moves it on).
    Known { list: Vec<SocketAddr>, next: usize },
}

/// The pool of connections to Places. `S` is their socket: mio's `TcpStream`, or a scripted
/// one in tests.
pub struct PlacesPool<S = TcpStream> {
    api: Api,
    output: Output,
    host: String,
    port: u16,
    path: String,
    field_mask: String,
    /// The API key: it goes into the request bytes and nowhere else, never into the log.
    key: String,
    /// How long a job may take from its WHATSAT's arrival to its answer.
    timeout: Duration,
    max_body_bytes: usize,
    max_queue: usize,
    tls: Arc<ClientConfig>,
    /// The name the server's certificate must carry, also sent as SNI.
    server_name: ServerName<'static>,
    address: Address,
    /// A clone goes to each resolver thread, to wake the loop when it is done.
    waker: Arc<Waker>,
    /// `places.pool_size` of them; slot `i` is the loop's token [`Source::Places(i)`].
    ///
    /// [`Source::Places(i)`]: crate::reactor::Source::Places
    slots: Vec<Slot<S>>,
    /// Slots whose new socket the loop is to register ([`PlacesPool::take_opened`]).
    opened: Vec<usize>,
    /// The time of the loop's turn, for how long each request took.
    now: Instant,
    /// Requests by outcome, and how long they took, for the metrics.
    pub counts: PlacesCounts,
    /// Jobs waiting for a slot (or for the host's address), oldest first.
    queue: VecDeque<Job>,
    next_job: u64,
    /// Connections opened so far: each one's number in the log.
    connections_made: u64,
    /// Finished jobs, for the loop to hand to their connections.
    pub done: Vec<Done>,
    /// Slots whose exchange read its [`TRANSFER_STEP`] with the socket perhaps holding more:
    /// the loop serves them again next turn ([`PlacesPool::take_more`]), as no event will come.
    more: Vec<usize>,
}

impl<S: Transport> PlacesPool<S> {
    /// The pool as configured, every slot empty; nothing is connected or looked up yet. A host
    /// written as an IP address needs no look-up; a name is looked up when the first job needs
    /// it. `tls` comes from [`tls_config`]; `waker` wakes the loop when a look-up ends.
    pub fn new(
        cfg: &PlacesConfig,
        key: String,
        tls: Arc<ClientConfig>,
        waker: Arc<Waker>,
    ) -> Result<PlacesPool<S>, String> {
        let server_name = ServerName::try_from(cfg.host.clone())
            .map_err(|e| format!("places.url host {:?}: {e}", cfg.host))?;
        let address = match cfg.host.parse::<IpAddr>() {
            Ok(ip) => Address::Known {
                list: vec![SocketAddr::new(ip, cfg.port)],
                next: 0,
            },
            Err(_) => Address::Unknown,
        };
        Ok(PlacesPool {
            api: cfg.api,
            output: cfg.output,
            host: cfg.host.clone(),
            port: cfg.port,
            path: cfg.path.clone(),
            field_mask: cfg.field_mask.clone(),
            key,
            timeout: cfg.timeout,
            max_body_bytes: cfg.max_body_bytes,
            max_queue: cfg.max_queue,
            tls,
            server_name,
            address,
            waker,
            slots: (0..cfg.pool_size).map(|_| Slot::Empty).collect(),
            opened: Vec::new(),
            now: Instant::now(),
            counts: PlacesCounts::default(),
            queue: VecDeque::new(),
            next_job: 1,
            connections_made: 0,
            done: Vec::new(),
            more: Vec::new(),
        })
    }

    /// Each slot's state name, for the trace.
    pub fn slot_states(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.slots.iter().map(|slot| match slot {
            Slot::Empty => "Empty",
            Slot::Connecting { .. } => "Connecting",
            Slot::Exchanging { .. } => "Exchanging",
            Slot::Idle { .. } => "Idle",
        })
    }

    /// Queues a request for `query`; returns the job's id. Its caller, a WHATSAT in
    /// [`crate::herd::Herd::command`], calls [`Self::dispatch`] right after. With
    /// `places.max_queue` jobs already waiting, the job is answered at once, `Busy`, into
    /// [`Self::done`]: the queue stays bounded, and the client hears that the server is busy.
    pub fn submit(
        &mut self,
        now: Instant,
        owner: Owner,
        record: &[u8],
        query: &places::Query,
        log: &mut Log,
    ) -> u64 {
        self.now = now;
        // `Host` names the port only when it is not HTTPS's own (RFC 9110, section 7.2).
        let host = if self.port == 443 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let request = places::build_request(
            self.api,
            &host,
            &self.path,
            &self.key,
            &self.field_mask,
            query,
        );
        let id = self.next_job;
        self.next_job += 1;
        log.event(
            format_args!("places #{id}"),
            format_args!("{}", request.summary),
        );
        trace_loop!("  places #{id} > {}", request.summary);
        let job = Job {
            id,
            owner,
            record: record.into(),
            request,
            bound: query.bound,
            started: now,
            deadline: now + self.timeout,
            retried: false,
        };
        if self.queue.len() >= self.max_queue {
            let why = format!("{} Places requests are already waiting", self.queue.len());
            self.fail(job, log, Failure::Busy, &why);
        } else {
            self.queue.push_back(job);
        }
        id
    }

    /// When the pool next needs the loop without an event: the earliest job or idle deadline.
    pub fn deadline(&self) -> Option<Instant> {
        let slots = self.slots.iter().filter_map(|slot| match slot {
            Slot::Empty => None,
            Slot::Connecting { job, .. } | Slot::Exchanging { job, .. } => Some(job.deadline),
            Slot::Idle { until, .. } => Some(*until),
        });
        // Jobs queue in arrival order with one timeout, so the first is the earliest.
        slots.chain(self.queue.front().map(|j| j.deadline)).min()
    }

    /// Starts queued jobs on idle or empty slots, as far as they go.
    ///
    /// Called after anything that may bring a job or free a slot: a submit, an event, a
    /// deadline, a look-up's end. Jobs go in order, a retried one first: to a kept-alive
    /// connection if there is one (no handshake), else to an empty slot on a new connection,
    /// else they wait. A job whose deadline passed while it waited is answered here.
    pub fn dispatch(&mut self, now: Instant, log: &mut Log) {
        self.now = now;
        while let Some(job) = self.queue.pop_front() {
            if job.deadline <= now {
                self.fail(job, log, Failure::Late, &self.timed_out());
                continue;
            }
            // A kept-alive connection first: the request goes into rustls, which encrypts it;
            // the pump writes it, and reads whatever the connection already holds. Not for a
            // job retried because a kept-alive connection had been closed under it: the others,
            // idle as long, may be closed too, so it gets a new one.
            let idle = (self.slots.iter()).position(|s| matches!(s, Slot::Idle { .. }));
            if let Some(i) = idle.filter(|_| !job.retried) {
                let Slot::Idle { mut conn, .. } =
                    std::mem::replace(&mut self.slots[i], Slot::Empty)
                else {
                    unreachable!("position found an idle slot")
                };
                if let Err(e) = conn.tls.writer().write_all(&job.request.bytes) {
                    self.fail(
                        job,
                        log,
                        Failure::Failed,
                        &format!("cannot send the request: {e}"),
                    );
                    continue;
                }
                // `reused`: the server may have closed the connection since its last answer.
                self.slots[i] = Slot::Exchanging {
                    conn,
                    job,
                    response: ResponseReader::new(self.max_body_bytes),
                    reused: true,
                };
                self.pump(i, now, log);
                continue;
            }
            // An empty slot; for a retried job with none empty, an idle one, its connection
            // closed to make room.
            let Some(i) = (self.slots.iter().position(|s| matches!(s, Slot::Empty))).or(idle)
            else {
                self.queue.push_front(job);
                return; // every slot is busy: the job waits for one
            };
            let addr = match &self.address {
                Address::Known { list, next } => list[*next % list.len()],
                // The jobs wait for the look-up; `on_wake` dispatches them when it ends.
                Address::Resolving(_) => {
                    self.queue.push_front(job);
                    return;
                }
                Address::Unknown => {
                    self.resolve(log);
                    self.queue.push_front(job);
                    return;
                }
            };
            match self.connect(i, addr) {
                Ok(mut conn) => {
                    log.event(
                        format_args!("places #{}", job.id),
                        format_args!("connecting to {addr} (connection {})", conn.number),
                    );
                    match conn.tls.writer().write_all(&job.request.bytes) {
                        Ok(()) => self.slots[i] = Slot::Connecting { conn, job },
                        Err(e) => {
                            let why = format!("cannot send the request: {e}");
                            self.fail(job, log, Failure::Failed, &why)
                        }
                    }
                }
                // The next job tries the host's next address.
                Err(e) => {
                    self.next_address();
                    self.fail(
                        job,
                        log,
                        Failure::Failed,
                        &format!("cannot connect to {addr}: {e}"),
                    );
                }
            }
        }
    }

    /// Starts a connect for slot `slot`; the loop registers the socket ([`Self::take_opened`]).
    /// Each connection gets its own read buffer of [`WIRE_READ`] bytes, allocated here once.
    fn connect(&mut self, slot: usize, addr: SocketAddr) -> io::Result<Tls<S>> {
        let tls = ClientConnection::new(self.tls.clone(), self.server_name.clone())
            .map_err(io::Error::other)?;
        let stream = S::connect(addr)?;
        self.opened.push(slot);
        self.connections_made += 1;
        Ok(Tls {
            stream,
            tls,
            wire: vec![0; WIRE_READ].into_boxed_slice(),
            number: self.connections_made,
        })
    }

    /// Starts a look-up of the host on a helper thread; it wakes the loop when done.
    /// `getaddrinfo` blocks for as long as DNS takes, seconds when a resolver is away, and would
    /// stop every client with it. The answer goes through a channel, and the wake says to look.
    /// A thread that cannot start leaves the address unknown: the next dispatch tries again.
    fn resolve(&mut self, log: &mut Log) {
        let (tx, rx) = mpsc::channel();
        let (host, port, waker) = (self.host.clone(), self.port, self.waker.clone());
        log.event(format_args!("places"), format_args!("resolving {host}"));
        let spawned = std::thread::Builder::new()
            .name("resolve".into())
            .spawn(move || {
                let result = (host.as_str(), port)
                    .to_socket_addrs()
                    .map(|addrs| addrs.collect::<Vec<_>>());
                let _ = tx.send(result);
                let _ = waker.wake();
            });
        self.address = match spawned {
            Ok(_) => Address::Resolving(rx),
            Err(e) => {
                log.event(
                    format_args!("places"),
                    format_args!("cannot start a resolver thread: {e}"),
                );
                Address::Unknown
            }
        };
    }

    /// The waker fired: a look-up may have finished. The waker is shared (the store's fsync
    /// thread wakes the loop with it to report a failed sync), so a wake may have nothing for
    /// the pool.
    pub fn on_wake(&mut self, now: Instant, log: &mut Log) {
        self.now = now;
        let Address::Resolving(rx) = &self.address else {
            return;
        };
        let result = match rx.try_recv() {
            Ok(result) => result,
            Err(TryRecvError::Empty) => return,
            // The thread ended without an answer (it panicked): a failed look-up.
            Err(TryRecvError::Disconnected) => Err(io::Error::other("resolver thread ended")),
        };
        match result {
            Ok(list) if !list.is_empty() => {
                log.event(
                    format_args!("places"),
                    format_args!("{} is {:?}", self.host, list),
                );
                self.address = Address::Known { list, next: 0 };
                self.dispatch(now, log);
            }
            outcome => {
                let why = match outcome {
                    Err(e) => format!("cannot resolve {}: {e}", self.host),
                    Ok(_) => format!("cannot resolve {}: no address", self.host),
                };
                // The waiting jobs fail now rather than at their deadlines; the next job starts
                // a new look-up.
                self.address = Address::Unknown;
                for job in std::mem::take(&mut self.queue) {
                    self.fail(job, log, Failure::Failed, &why);
                }
            }
        }
    }

    /// An address failed: the next connect tries the next one. Once every address of a named
    /// host has failed it is looked up again, since its addresses may have changed; an IP
    /// address is simply tried again.
    fn next_address(&mut self) {
        if let Address::Known { list, next } = &mut self.address {
            *next += 1;
            if *next >= list.len() && self.host.parse::<IpAddr>().is_err() {
                self.address = Address::Unknown; // every address failed: look the host up again
            }
        }
    }

    /// A readiness event on slot `i`'s socket, of either kind: the state says what it means.
    /// Ends with a dispatch, since the event may have freed the slot.
    pub fn on_ready(&mut self, i: usize, now: Instant, log: &mut Log) {
        self.now = now;
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        match slot {
            // An event of this turn's batch for a connection already dropped.
            Slot::Empty => {}
            Slot::Connecting { conn, .. } => {
                match conn.stream.connected() {
                    Ok(false) => {} // a spurious event: still connecting
                    // Refused, unreachable: the job fails, the next connect tries another
                    // address.
                    Err(e) => {
                        let Slot::Connecting { job, .. } =
                            std::mem::replace(&mut self.slots[i], Slot::Empty)
                        else {
                            unreachable!()
                        };
                        self.next_address();
                        let why = format!("cannot connect to {}:{}: {e}", self.host, self.port);
                        self.fail(job, log, Failure::Failed, &why);
                    }
                    // Connected: the pump sends the ClientHello rustls has ready, and the
                    // request follows as soon as the handshake allows.
                    Ok(true) => {
                        let Slot::Connecting { conn, job } =
                            std::mem::replace(&mut self.slots[i], Slot::Empty)
                        else {
                            unreachable!()
                        };
                        self.slots[i] = Slot::Exchanging {
                            conn,
                            job,
                            response: ResponseReader::new(self.max_body_bytes),
                            reused: false,
                        };
                        self.pump(i, now, log);
                    }
                }
            }
            Slot::Exchanging { .. } => self.pump(i, now, log),
            Slot::Idle { conn, .. } => {
                // The server may close a kept-alive connection (or send a TLS alert); anything
                // readable on an idle connection ends it.
                let mut said = false;
                match conn.transfer(|_| said = true) {
                    Ok(Transfer::Blocked) if !said => {}
                    _ => self.slots[i] = Slot::Empty,
                }
            }
        }
        self.dispatch(now, log);
    }

    /// Moves bytes for the exchange in slot `i` and finishes it when the response is whole.
    ///
    /// Transfers until the socket would block, the stream ends, the response is whole or
    /// refused, or this turn's [`TRANSFER_STEP`] is read; an exchange left with bytes in the
    /// kernel gets no event for them, so the last is listed to be served next turn. A
    /// finished job is handed over ([`Self::finish`]), and the connection kept only if HTTP
    /// allows it and nothing follows the response.
    fn pump(&mut self, i: usize, now: Instant, log: &mut Log) {
        let Slot::Exchanging { conn, response, .. } = &mut self.slots[i] else {
            return;
        };
        // Plaintext goes from rustls straight to the response; once it is whole or refused,
        // what follows only counts.
        let mut outcome = None;
        let mut after = false;
        let transferred = conn.transfer(|plain| match outcome {
            Some(_) => after = true,
            None => outcome = response.push(plain).transpose(),
        });
        let drained = !after && matches!(transferred, Ok(Transfer::Blocked));
        let outcome = match (transferred, outcome) {
            (_, Some(Ok(mut done))) => {
                // Bytes may follow the response, still in the socket or in rustls: a
                // connection that is not known to be drained is not kept.
                done.keep_alive &= drained;
                Some(Ok(done))
            }
            // The response refused, or the connection failed, before it was whole.
            (_, Some(Err(e))) | (Err(e), None) => Some(Err(e)),
            // The end of the stream: it ends a body read to the close, and cuts any other.
            (Ok(Transfer::Ended), None) => Some(response.push_eof()),
            // A TCP close alone ends nothing: a body read to the close may be cut short.
            (Ok(Transfer::Cut), None) => {
                let cut = "Places closed the connection without TLS close_notify, before the \
                           answer was whole";
                Some(response.push_eof().and_then(|_| Err(cut.into())))
            }
            // All read: the next event brings more.
            (Ok(Transfer::Blocked), None) => None,
            // The socket may hold more, and no event will say so: again next turn, which comes
            // at once, so that one exchange takes no more than its step of a turn.
            (Ok(Transfer::More), None) => {
                if !self.more.contains(&i) {
                    self.more.push(i);
                }
                None
            }
        };
        let Some(outcome) = outcome else {
            return; // more to come
        };
        let Slot::Exchanging {
            conn,
            job,
            response,
            reused,
        } = std::mem::replace(&mut self.slots[i], Slot::Empty)
        else {
            unreachable!()
        };
        match outcome {
            // What counts is the body, whatever the HTTP status (docs/protocol.md section 4).
            Ok(resp) => {
                let elapsed = now.saturating_duration_since(job.started).as_millis();
                let mut failed = false;
                let body = match places::answer(self.api, self.output, &resp.body, job.bound) {
                    Ok(answer) => {
                        log.event(
                            format_args!("places #{}", job.id),
                            format_args!(
                                "done: HTTP {}, status {}, {} bytes in {elapsed} ms",
                                resp.status,
                                answer.status,
                                resp.body.len()
                            ),
                        );
                        answer.body
                    }
                    Err(why) => {
                        log.event(
                            format_args!("places #{}", job.id),
                            format_args!("failed: {why}"),
                        );
                        failed = true;
                        places::error_body("UNKNOWN_ERROR", Failure::Failed.told())
                    }
                };
                // Kept if the response allows; if not, the connection went with the old state,
                // and the slot stays empty.
                if resp.keep_alive {
                    self.slots[i] = Slot::Idle {
                        conn,
                        until: now + IDLE_KEEP,
                    };
                }
                // A body Google's shape cannot be cut from counts as failed, as it was answered.
                let outcome = if failed { Failure::Failed.outcome() } else { 0 };
                self.finish(job, body, outcome);
            }
            // A kept-alive connection the server had already closed: try once more, afresh.
            Err(_) if reused && !response.started() && !job.retried && job.deadline > now => {
                log.event(
                    format_args!("places #{}", job.id),
                    format_args!("kept-alive connection was closed; retrying on a new one"),
                );
                self.queue.push_front(Job {
                    retried: true,
                    ..job
                });
            }
            Err(why) => self.fail(job, log, Failure::Failed, &why),
        }
    }

    /// The slots to serve again next turn ([`PlacesPool::more`]), taken.
    pub fn take_more(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.more)
    }

    /// Drops the jobs of `owner`, a connection gone, that still wait in the queue: asking
    /// Places for an answer no one will read costs a request (Google bills each one) and a
    /// place in the queue others wait for. A job already sent is let finish; its answer finds
    /// no one, and is dropped.
    pub fn forget(&mut self, owner: Owner) {
        if !self.queue.is_empty() {
            self.queue.retain(|job| job.owner != owner);
        }
    }

    /// Whether a slot is to be served again next turn, with no event.
    pub fn has_more(&self) -> bool {
        !self.more.is_empty()
    }

    /// Fires deadlines; safe to call when none has passed.
    ///
    /// A job past its deadline is answered `Late` wherever it is, and its connection is closed
    /// with it: an answer arriving later on that connection would be read as the next job's.
    /// Queued jobs past theirs are answered by the dispatch that follows.
    pub fn on_timeout(&mut self, now: Instant, log: &mut Log) {
        self.now = now;
        for i in 0..self.slots.len() {
            let expired = match &self.slots[i] {
                Slot::Connecting { job, .. } | Slot::Exchanging { job, .. } => job.deadline <= now,
                Slot::Idle { until, .. } => *until <= now,
                Slot::Empty => false,
            };
            if !expired {
                continue;
            }
            match std::mem::replace(&mut self.slots[i], Slot::Empty) {
                Slot::Connecting { job, .. } | Slot::Exchanging { job, .. } => {
                    let why = self.timed_out();
                    self.fail(job, log, Failure::Late, &why);
                }
                _ => {} // an idle connection past its time: dropping it closes it
            }
        }
        self.dispatch(now, log);
    }

    /// Slots with a new socket since the last call, for the loop to register.
    pub fn take_opened(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.opened)
    }

    /// Slot `i`'s socket, if it has one.
    pub fn socket(&mut self, i: usize) -> Option<&mut S> {
        match self.slots.get_mut(i)? {
            Slot::Empty => None,
            Slot::Connecting { conn, .. }
            | Slot::Exchanging { conn, .. }
            | Slot::Idle { conn, .. } => Some(&mut conn.stream),
        }
    }

    /// The loop could not register slot `i`'s new socket: its job fails, as a refused connect.
    pub fn on_register_failed(&mut self, i: usize, log: &mut Log, why: &str) {
        if let Some(Slot::Connecting { job, .. }) = self
            .slots
            .get_mut(i)
            .map(|slot| std::mem::replace(slot, Slot::Empty))
        {
            let why = format!("cannot register the socket: {why}");
            self.fail(job, log, Failure::Failed, &why);
        }
    }

    /// What the log says of a job past its deadline (the client is told [`Failure::Late`]).
    fn timed_out(&self) -> String {
        format!(
            "Places did not answer within {} ms",
            self.timeout.as_millis()
        )
    }

    /// Answers `job` with an `UNKNOWN_ERROR` body. The client is told only what kind of failure
    /// it was ([`Failure`]); the detail (addresses, TLS errors, what Google sent) goes to the
    /// log.
    fn fail(&mut self, job: Job, log: &mut Log, failure: Failure, why: &str) {
        let outcome = failure.outcome();
        log.event(
            format_args!("places #{}", job.id),
            format_args!("failed: {why}"),
        );
        let body = places::error_body("UNKNOWN_ERROR", failure.told());
        self.finish(job, body, outcome);
    }

    /// Hands `job`'s reply to the loop, counted under `outcome` (an index of
    /// [`crate::metrics::PLACES_OUTCOMES`]). Every job that is answered, by Google or by
    /// [`Self::fail`], ends here once; a retried job is not answered until its retry is.
    fn finish(&mut self, job: Job, body: Vec<u8>, outcome: usize) {
        self.counts.outcomes[outcome] += 1;
        let took = self.now.saturating_duration_since(job.started);
        self.counts.seconds.observe(took.as_secs_f64());
        trace_loop!("  places #{} < {} bytes", job.id, body.len());
        self.done.push(Done {
            owner: job.owner,
            job: job.id,
            record: job.record,
            body,
        });
    }
}

impl<S: Transport> Tls<S> {
    /// The TLS pump: writes what rustls has to send, then reads until the socket would block
    /// or [`TRANSFER_STEP`] bytes are in, decrypting as it goes, and writes again (reading can
    /// make rustls want to answer, as in the handshake). Plaintext goes to `deliver`, a piece
    /// at a time, straight from rustls's buffer.
    ///
    /// The socket is read in pieces of up to [`WIRE_READ`] bytes, which rustls then takes
    /// from memory: its own `read_tls` reads at most 4 KiB per system call, ten calls for one
    /// of Google's answers.
    fn transfer(&mut self, mut deliver: impl FnMut(&[u8])) -> Result<Transfer, String> {
        // What rustls holds to send goes first: a ClientHello, a request, an answer to the
        // handshake from the last call whose write would have blocked.
        self.write_tls()?;
        let mut taken = 0;
        let state = loop {
            if taken >= TRANSFER_STEP {
                break Transfer::More;
            }
            let mut fresh = match self.stream.read(&mut self.wire) {
                // A close_notify already read ended the loop below.
                Ok(0) => break Transfer::Cut,
                Ok(n) => {
                    taken += n;
                    &self.wire[..n]
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Transfer::Blocked,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("reading from Places failed: {e}")),
            };
            let mut closed = None;
            while !fresh.is_empty() && closed.is_none() {
                // rustls takes at most 4 KiB from the slice per call, and the plaintext is
                // drained after each call, so its buffers keep room; a record too large to fit is
                // a TLS error, answered like any other.
                self.tls
                    .read_tls(&mut fresh)
                    .map_err(|e| format!("TLS with Places failed: {e}"))?;
                self.tls
                    .process_new_packets()
                    .map_err(|e| format!("TLS with Places failed: {e}"))?;
                closed = read_plain(&mut self.tls, &mut deliver)?;
            }
            if let Some(end) = closed {
                break end;
            }
        };
        self.write_tls()?;
        Ok(state)
    }

    /// Writes what rustls has to send until it has nothing or the socket would block. What is
    /// left stays in rustls: the WRITABLE event when the kernel has room brings the slot back
    /// to [`Tls::transfer`], which writes first.
    fn write_tls(&mut self) -> Result<(), String> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.stream) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("writing to Places failed: {e}")),
            }
        }
        Ok(())
    }
}

/// Hands what `tls` has decrypted to `deliver`, in rustls's own pieces (no copy on the way).
/// `Ok(Some(how))` when the stream has ended.
fn read_plain(
    tls: &mut ClientConnection,
    mut deliver: impl FnMut(&[u8]),
) -> Result<Option<Transfer>, String> {
    let mut reader = tls.reader();
    loop {
        match reader.fill_buf() {
            // Nothing, and no error: the server's close_notify has been read.
            Ok([]) => return Ok(Some(Transfer::Ended)),
            Ok(plain) => {
                let n = plain.len();
                deliver(plain);
                reader.consume(n);
            }
            // Every byte decrypted so far is delivered.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            // rustls saw the end of the stream with no close_notify before it.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Some(Transfer::Cut)),
            Err(e) => return Err(format!("TLS with Places failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    //! A slot driven through its states with an explicit `now`, over an in-memory socket whose
    //! other end is a real rustls server in the same thread: the TLS pump, the HTTP reader and
    //! keep-alive, with no socket at all.

    use std::cell::RefCell;
    use std::io::Read;

    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::{ServerConfig, ServerConnection};

    use super::*;
    use crate::config::Config;
    use crate::places::Query;
    use crate::protocol::parse_location;

    /// Google's answer, cut to the bound by the pool: two results, one kept.
    const BODY: &str = "{\n   \"html_attributions\" : [],\n   \"results\" : [\n      {\n         \"name\" : \"one\"\n      },\n      {\n         \"name\" : \"two\"\n      }\n   ],\n   \"status\" : \"OK\"\n}\n";
    const CUT: &str = "{\n   \"html_attributions\" : [],\n   \"results\" : [\n      {\n         \"name\" : \"one\"\n      }\n   ],\n   \"status\" : \"OK\"\n}";

    /// The server end of an in-memory connection: bytes the client writes go straight into a
    /// rustls server, and what it answers is what the client reads. Every request (a head
    /// ending in a blank line) gets `response`, unless `silent`.
    struct Pipe {
        server: ServerConnection,
        response: Vec<u8>,
        silent: bool,
        received: Vec<u8>,
        answered: usize,
    }

    /// A TLS server, what it answers, and whether it keeps silent instead.
    type Far = (Arc<ServerConfig>, Vec<u8>, bool);

    thread_local! {
        /// What the next connect finds at the other end.
        static SERVER: RefCell<Option<Far>> = const { RefCell::new(None) };
        static CONNECTS: RefCell<usize> = const { RefCell::new(0) };
    }

    impl Transport for Pipe {
        fn connect(_: SocketAddr) -> io::Result<Pipe> {
            CONNECTS.with(|c| *c.borrow_mut() += 1);
            let (config, response, silent) = SERVER
                .with(|s| s.borrow().clone())
                .ok_or(io::ErrorKind::ConnectionRefused)?;
            let mut server = ServerConnection::new(config).map_err(io::Error::other)?;
            // The answer is queued whole, behind whatever the handshake sent.
            server.set_buffer_limit(None);
            Ok(Pipe {
                server,
                response,
                silent,
                received: Vec::new(),
                answered: 0,
            })
        }

        fn connected(&self) -> io::Result<bool> {
            Ok(true)
        }

        fn shutdown_write(&self) -> io::Result<()> {
            Ok(())
        }

        fn queued(&self) -> Option<usize> {
            None
        }
    }

    impl Write for Pipe {
        fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
            let n = buf.len();
            while !buf.is_empty() {
                self.server.read_tls(&mut buf)?;
                self.server
                    .process_new_packets()
                    .map_err(io::Error::other)?;
            }
            let mut plain = [0u8; 4096];
            loop {
                match self.server.reader().read(&mut plain) {
                    Ok(0) => break,
                    Ok(got) => self.received.extend_from_slice(&plain[..got]),
                    Err(_) => break, // nothing more for now
                }
            }
            let requests = self
                .received
                .windows(4)
                .filter(|w| w == b"\r\n\r\n")
                .count();
            while !self.silent && self.answered < requests {
                self.server.writer().write_all(&self.response)?;
                self.answered += 1;
            }
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Read for Pipe {
        fn read(&mut self, mut buf: &mut [u8]) -> io::Result<usize> {
            match self.server.wants_write() {
                true => self.server.write_tls(&mut buf),
                false => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
    }

    /// An HTTP answer carrying `body`, framed by its length.
    fn answer_of(body: &str) -> String {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    /// A certificate for 127.0.0.1, the client's one root; a server that answers `response`.
    fn serve(response: &str, silent: bool) -> Arc<ClientConfig> {
        let key = rcgen::KeyPair::generate().expect("a key");
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("a SAN");
        let cert = params.self_signed(&key).expect("a certificate");
        let der = cert.der().clone();
        let private = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], private)
            .expect("a server configuration");
        SERVER.with(|s| {
            *s.borrow_mut() = Some((Arc::new(server), response.as_bytes().to_vec(), silent))
        });
        let mut roots = RootCertStore::empty();
        roots.add(der).expect("a root");
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(client)
    }

    fn pool(tls: Arc<ClientConfig>) -> (PlacesPool<Pipe>, mio::Poll) {
        let text = "[places]\nurl = \"https://127.0.0.1:443/maps/api/place/nearbysearch/json\"\ntimeout_ms = 2000\npool_size = 1\n\n[[server]]\nname = \"Test\"\nport = 1\n";
        let config = Config::parse(text, std::path::Path::new(".")).expect("a configuration");
        let poll = mio::Poll::new().expect("a poll");
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(0)).expect("a waker"));
        let pool = PlacesPool::new(&config.places, "KEY".into(), tls, waker).expect("a pool");
        (pool, poll)
    }

    fn submit(pool: &mut PlacesPool<Pipe>, now: Instant, log: &mut Log) -> u64 {
        let (latitude, longitude) = parse_location(b"+34.068930-118.445127").expect("a location");
        let query = Query {
            latitude,
            longitude,
            radius_m: b"10000",
            bound: 1,
        };
        let owner = Owner { slot: 0, id: 1 };
        let job = pool.submit(now, owner, b"AT Test +0 kiwi +1+1 1", &query, log);
        pool.dispatch(now, log);
        job
    }

    /// Readiness events on slot 0, as a socket would raise them, until a job is done.
    fn pump_until_done(pool: &mut PlacesPool<Pipe>, now: Instant, log: &mut Log) -> Done {
        for _ in 0..20 {
            pool.on_ready(0, now, log);
            if let Some(done) = pool.done.pop() {
                return done;
            }
        }
        panic!(
            "no answer after 20 events; slots: {:?}",
            pool.slot_states().collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_job_connects_shakes_hands_asks_and_keeps_the_connection_for_the_next() {
        let (mut pool, _poll) = pool(serve(&answer_of(BODY), false));
        let mut log = Log::discard();
        let now = Instant::now();
        CONNECTS.with(|c| *c.borrow_mut() = 0);
        let job = submit(&mut pool, now, &mut log);
        assert_eq!(
            pool.take_opened(),
            [0],
            "a new socket for the loop to register"
        );
        assert_eq!(pool.slot_states().collect::<Vec<_>>(), ["Connecting"]);
        let done = pump_until_done(&mut pool, now, &mut log);
        assert_eq!(done.job, job);
        assert_eq!(String::from_utf8_lossy(&done.body), CUT);
        assert_eq!(pool.slot_states().collect::<Vec<_>>(), ["Idle"]);
        // The next job goes out on the same connection: no connect, no handshake.
        let second = submit(&mut pool, now, &mut log);
        assert_eq!(pool.take_opened(), Vec::<usize>::new());
        let done = pump_until_done(&mut pool, now, &mut log);
        assert_eq!(
            (done.job, String::from_utf8_lossy(&done.body)),
            (second, CUT.into())
        );
        assert_eq!(CONNECTS.with(|c| *c.borrow()), 1);
    }

    #[test]
    fn an_exchange_reads_no_more_than_its_step_in_a_turn_however_much_places_sends() {
        // An answer of some 900 KB (white space inside the JSON): more than three steps.
        let body = BODY.replacen('{', &format!("{{{}", " ".repeat(900_000)), 1);
        let (mut pool, _poll) = pool(serve(&answer_of(&body), false));
        let mut log = Log::discard();
        let now = Instant::now();
        let job = submit(&mut pool, now, &mut log);
        let (mut turns_with_more, mut calls) = (0, 0);
        let done = loop {
            pool.on_ready(0, now, &mut log);
            if let Some(done) = pool.done.pop() {
                break done;
            }
            // Its step read, the rest for the next turn: listed, as no event would come.
            if pool.take_more() == [0] {
                turns_with_more += 1;
            }
            calls += 1;
            assert!(calls < 100, "no answer");
        };
        assert_eq!(done.job, job);
        let answer = String::from_utf8_lossy(&done.body).into_owned();
        assert!(answer.ends_with(&CUT[1..]), "the answer cut to its bound");
        assert!(
            turns_with_more >= 3,
            "900 KB read in {turns_with_more} turns past the first"
        );
    }

    #[test]
    fn the_queued_jobs_of_a_connection_gone_are_not_sent() {
        let (mut pool, _poll) = pool(serve(&answer_of(BODY), false));
        let mut log = Log::discard();
        let now = Instant::now();
        // One slot: the first job takes it, the second waits.
        let _ = submit(&mut pool, now, &mut log);
        let _ = submit(&mut pool, now, &mut log);
        assert_eq!(pool.queue.len(), 1);
        pool.forget(Owner { slot: 0, id: 2 });
        assert_eq!(pool.queue.len(), 1, "another connection's job stays");
        pool.forget(Owner { slot: 0, id: 1 });
        assert_eq!(pool.queue.len(), 0);
        assert_eq!(pool.slot_states().collect::<Vec<_>>(), ["Connecting"]);
    }

    #[test]
    fn a_job_past_its_deadline_is_answered_with_an_error_in_googles_shape() {
        let (mut pool, _poll) = pool(serve("", true));
        let mut log = Log::discard();
        let now = Instant::now();
        let job = submit(&mut pool, now, &mut log);
        for _ in 0..5 {
            pool.on_ready(0, now, &mut log);
        }
        assert!(pool.done.is_empty(), "the server never answers");
        assert_eq!(pool.deadline(), Some(now + Duration::from_millis(2000)));
        pool.on_timeout(now + Duration::from_millis(1999), &mut log);
        assert!(pool.done.is_empty(), "not yet");
        pool.on_timeout(now + Duration::from_millis(2000), &mut log);
        let done = pool.done.pop().expect("answered at the deadline");
        assert_eq!(done.job, job);
        let body = String::from_utf8_lossy(&done.body);
        assert!(body.contains("\"status\" : \"UNKNOWN_ERROR\""), "{body}");
        assert!(
            body.contains("Google Places did not answer in time"),
            "{body}"
        );
        assert_eq!(pool.slot_states().collect::<Vec<_>>(), ["Empty"]);
    }

    #[test]
    fn a_connection_that_cannot_be_registered_fails_its_job() {
        let (mut pool, _poll) = pool(serve("", true));
        let mut log = Log::discard();
        let now = Instant::now();
        let job = submit(&mut pool, now, &mut log);
        for slot in pool.take_opened() {
            pool.on_register_failed(slot, &mut log, "no more descriptors");
        }
        let done = pool.done.pop().expect("failed at once");
        assert_eq!(done.job, job);
        // The client is told the kind of failure, never the detail.
        let body = String::from_utf8_lossy(&done.body);
        assert!(body.contains("could not be reached"), "{body}");
        assert!(!body.contains("descriptors"), "{body}");
    }
}
