//! What a test puts on a peer link, or at its far end: a [`Proxy`] that forwards a link until
//! it is blackholed, and a [`SlowNeighbour`] that heartbeats but does not read. Both serve a
//! listener of the test's own on threads ([`Accepting`]) that stop when dropped.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::lock;

/// How often a thread of an [`Accepting`] looks at its flags.
const TICK: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------------------------
// Listeners the test serves

/// What the threads of an [`Accepting`] share: at least the flag that stops them.
pub trait Stoppable: Send + Sync + 'static {
    fn stop(&self) -> &AtomicBool;
}

/// A listener the test serves itself: a thread accepts, and each connection gets a thread of
/// its own running `serve`. Dropping it raises the stop flag and joins every thread.
pub struct Accepting<S: Stoppable> {
    shared: Arc<S>,
    accept: Option<JoinHandle<()>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl<S: Stoppable> Accepting<S> {
    pub fn start(listener: TcpListener, shared: S, serve: fn(TcpStream, &S)) -> Accepting<S> {
        listener
            .set_nonblocking(true)
            .expect("cannot make the listener non-blocking");
        let shared = Arc::new(shared);
        let threads = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (shared, threads) = (Arc::clone(&shared), Arc::clone(&threads));
            thread::spawn(move || {
                while !shared.stop().load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let inner = Arc::clone(&shared);
                            let handle = thread::spawn(move || serve(stream, &inner));
                            lock(&threads).push(handle);
                        }
                        Err(_) => thread::sleep(TICK),
                    }
                }
            })
        };
        Accepting {
            shared,
            accept: Some(accept),
            threads,
        }
    }

    /// What the threads share.
    pub fn shared(&self) -> &S {
        &self.shared
    }
}

impl<S: Stoppable> Drop for Accepting<S> {
    fn drop(&mut self) {
        self.shared.stop().store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let threads: Vec<JoinHandle<()>> = lock(&self.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A proxy that can blackhole a link

/// A TCP proxy on 127.0.0.1 that the test controls. It forwards both ways to `target` until it
/// is blackholed: then every connection stays open but no byte moves either way (they wait in
/// the kernel's buffers, as in a partition where TCP keeps retransmitting), and new connections
/// are accepted but not connected onward until the heal. Every thread stops when it is dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    accepting: Accepting<ProxyShared>,
}

struct ProxyShared {
    target: Mutex<SocketAddr>,
    blackholed: AtomicBool,
    stop: AtomicBool,
}

impl Stoppable for ProxyShared {
    fn stop(&self) -> &AtomicBool {
        &self.stop
    }
}

impl Proxy {
    /// A proxy on a port of its own; it forwards nowhere until `set_target`.
    pub fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("listener has no address");
        let shared = ProxyShared {
            target: Mutex::new(SocketAddr::from(([127, 0, 0, 1], 0))),
            blackholed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        };
        Proxy {
            addr,
            accepting: Accepting::start(listener, shared, proxy_connection),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Forwards new connections to 127.0.0.1:`port`.
    pub fn set_target(&self, port: u16) {
        *lock(&self.accepting.shared().target) = SocketAddr::from(([127, 0, 0, 1], port));
    }

    pub fn blackhole(&self) {
        self.accepting
            .shared()
            .blackholed
            .store(true, Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.accepting
            .shared()
            .blackholed
            .store(false, Ordering::SeqCst);
    }
}

fn proxy_connection(client: TcpStream, shared: &ProxyShared) {
    let _ = client.set_nonblocking(false);
    // Accepted in a blackhole: connected onward only when it heals.
    while shared.blackholed.load(Ordering::SeqCst) {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        thread::sleep(TICK);
    }
    let target = *lock(&shared.target);
    let Ok(upstream) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
        return; // the client sees its connection closed, as if refused
    };
    let (Ok(client_w), Ok(upstream_r)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    thread::scope(|s| {
        s.spawn(|| pump(upstream_r, client_w, shared));
        pump(client, upstream, shared);
    });
}

/// Whether an error of a socket with timeouts means "nothing yet, go on".
fn would_block(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Copies `from` to `to` while not blackholed; passes the end of stream on.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &ProxyShared) {
    let _ = from.set_read_timeout(Some(TICK * 5));
    let _ = to.set_write_timeout(Some(TICK * 5));
    let _ = to.set_nodelay(true);
    let mut buf = vec![0u8; 16 * 1024];
    let stopped = || shared.stop.load(Ordering::SeqCst);
    while !stopped() {
        if shared.blackholed.load(Ordering::SeqCst) {
            thread::sleep(TICK);
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if would_block(&e) => continue,
            Err(_) => break,
        };
        // Bytes read just as the blackhole began wait in it with the rest, as TCP would hold
        // them for retransmission: none get through late.
        while shared.blackholed.load(Ordering::SeqCst) && !stopped() {
            thread::sleep(TICK);
        }
        let mut rest = &buf[..n];
        while !rest.is_empty() && !stopped() {
            match to.write(rest) {
                Ok(0) => break,
                Ok(k) => rest = &rest[k..],
                Err(e) if would_block(&e) => {}
                Err(_) => break,
            }
        }
        if !rest.is_empty() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

// ---------------------------------------------------------------------------------------------
// A neighbour that does not read

/// A neighbour Bona played by the test, without a herd secret: it accepts every link Bailey
/// dials, reads its greeting, sends `PING` every half second so that the link never looks
/// dead, and reads nothing more until `read_from_now_on` (and again from `stop_reading` on);
/// while it reads, it keeps every AT record it receives. Every thread stops when it is dropped.
pub struct SlowNeighbour {
    accepting: Accepting<SlowShared>,
}

struct SlowShared {
    reading: AtomicBool,
    stop: AtomicBool,
    records: Mutex<BTreeSet<String>>,
}

impl Stoppable for SlowShared {
    fn stop(&self) -> &AtomicBool {
        &self.stop
    }
}

impl SlowNeighbour {
    pub fn start(listener: TcpListener) -> SlowNeighbour {
        let shared = SlowShared {
            reading: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            records: Mutex::new(BTreeSet::new()),
        };
        SlowNeighbour {
            accepting: Accepting::start(listener, shared, slow_link),
        }
    }

    pub fn read_from_now_on(&self) {
        self.accepting
            .shared()
            .reading
            .store(true, Ordering::SeqCst);
    }

    /// Stops reading again (its heartbeats go on): what Bailey sends from now on waits.
    pub fn stop_reading(&self) {
        self.accepting
            .shared()
            .reading
            .store(false, Ordering::SeqCst);
    }

    pub fn records(&self) -> BTreeSet<String> {
        lock(&self.accepting.shared().records).clone()
    }
}

fn slow_link(mut stream: TcpStream, shared: &SlowShared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(TICK * 5));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let mut pending: Vec<u8> = Vec::new();
    let mut greeted = false;
    let mut pinged = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    while !shared.stop.load(Ordering::SeqCst) {
        if pinged.elapsed() >= Duration::from_millis(500) {
            if stream.write_all(b"PING\n").is_err() {
                return;
            }
            pinged = Instant::now();
        }
        if greeted && !shared.reading.load(Ordering::SeqCst) {
            thread::sleep(TICK);
            continue;
        }
        // Until the greeting is through, one byte at a time: nothing past it is read early.
        let want = if greeted { buf.len() } else { 1 };
        match stream.read(&mut buf[..want]) {
            Ok(0) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if would_block(&e) => continue,
            Err(_) => return,
        }
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]).into_owned();
            if !greeted {
                greeted = line == "PEER herd/1 Bailey";
            } else if line.starts_with("AT ") {
                lock(&shared.records).insert(line);
            }
        }
    }
}

/// Makes the connections `listener` accepts take little into their kernel receive buffer, so
/// that what a non-reading neighbour leaves unsent is the sender's, however fast the load ran.
pub fn small_receive_buffer(listener: &TcpListener) {
    let size: libc::c_int = 4096;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int, on a socket this
    // process owns.
    let result = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(result, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
}
