//! Step 3: deadlines without a timer thread.
//!
//! The upper-casing server of `02_poll` (upper-casing bytes as they come: it needs no lines),
//! now closing a client quiet for too long with `BYE idle for N ms`. mio has no timers, and
//! needs none: `poll` takes a timeout.
//!
//! ```text
//! cargo run --release --example 03_deadlines -- --idle-ms 5000 --trace
//! nc 127.0.0.1 7003          # type a line, then wait five seconds
//! ```
//!
//! (`--port N`; `--port 0` takes a free port, and the first line printed says which.) With
//! `--trace`, each turn prints how long it could sleep and how many events woke it.
//!
//! What it shows, in `Server::run`: each connection carries its own deadline (`idle_until`);
//! the poll's timeout is the earliest of them; the clock is read once per turn, on waking;
//! `on_timeout(now)` runs on every turn and is safe when nothing is due, for the loop never
//! guesses that "no events" means "a deadline passed".
//!
//! The asyncio equivalent is `loop.call_later(delay, callback)`, or `asyncio.wait_for(
//! reader.readline(), timeout)`. asyncio keeps its timers in a heap and takes `select`'s
//! timeout from the top of it, as `next_deadline` does here by a walk over the connections.

use std::error::Error;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const DEFAULT_PORT: u16 = 7003;
const DEFAULT_IDLE_MS: u64 = 10_000;
const LISTENER: Token = Token(0);
/// Past this many unwritten reply bytes, input waits in the kernel (see `02_poll`).
const OUTPUT_HIGH_WATER: usize = 64 * 1024;

struct Conn {
    stream: TcpStream,
    /// Replies the kernel has not taken yet.
    output: Vec<u8>,
    eof: bool,
    /// When the client will have been quiet too long. The deadline lives in the connection:
    /// when the connection goes, so does its deadline, and no timer is left to cancel.
    idle_until: Instant,
}

struct Server {
    poll: Poll,
    listener: TcpListener,
    /// Slot `i` has token `i + 1`.
    conns: Vec<Option<Conn>>,
    /// Slots to free at the end of the turn.
    closed: Vec<usize>,
    idle: Duration,
    trace: bool,
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.get(args.iter().position(|a| a == flag)? + 1);
    let port = value("--port").map_or(Ok(DEFAULT_PORT), |v| v.parse())?;
    let idle_ms = value("--idle-ms").map_or(Ok(DEFAULT_IDLE_MS), |v| v.parse())?;
    let poll = Poll::new()?;
    let mut listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;
    let mut server = Server {
        poll,
        listener,
        conns: Vec::new(),
        closed: Vec::new(),
        idle: Duration::from_millis(idle_ms),
        trace: args.iter().any(|a| a == "--trace"),
    };
    Ok(server.run()?)
}

impl Server {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        let mut scratch = vec![0; 64 * 1024];
        loop {
            // 1. Sleep until an event or the earliest deadline, whichever comes first.
            let timeout = self
                .next_deadline()
                .map(|at| at.saturating_duration_since(Instant::now()));
            match self.poll.poll(&mut events, timeout) {
                Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e),
                _ => {}
            }
            // 2. One reading of the clock for everything this turn does.
            let now = Instant::now();
            if self.trace {
                let limit = timeout.map_or("no limit".into(), |t| format!("up to {t:.1?}"));
                eprintln!(
                    "slept ({limit}), woken by {} event(s)",
                    events.iter().count()
                );
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    Token(t) => {
                        let Some(Some(conn)) = self.conns.get_mut(t - 1) else {
                            continue;
                        };
                        if let Err(e) = conn.on_ready(now, self.idle, &mut scratch) {
                            eprintln!("slot {}: {e}", t - 1);
                            self.closed.push(t - 1);
                        } else if conn.eof && conn.output.is_empty() {
                            self.closed.push(t - 1);
                        }
                    }
                }
            }
            // 3. Deadlines, on every turn, whatever woke the loop.
            self.on_timeout(now);
            // 4. Free what closed, now that no event of the batch can refer to it.
            for slot in self.closed.drain(..) {
                if let Some(mut conn) = self.conns[slot].take() {
                    let _ = self.poll.registry().deregister(&mut conn.stream);
                }
            }
        }
    }

    /// The earliest deadline of any connection; `None` when there is no connection, and the
    /// loop can sleep until one comes.
    fn next_deadline(&self) -> Option<Instant> {
        self.conns.iter().flatten().map(|c| c.idle_until).min()
    }

    /// Says goodbye to every connection quiet for too long. Safe to call at any time: a
    /// deadline that has not come is left alone.
    fn on_timeout(&mut self, now: Instant) {
        for (slot, conn) in self.conns.iter_mut().enumerate() {
            let Some(conn) = conn else { continue };
            if conn.idle_until > now || self.closed.contains(&slot) {
                continue;
            }
            let bye = format!("BYE idle for {} ms\n", self.idle.as_millis());
            conn.output.extend_from_slice(bye.as_bytes());
            // One try, and the connection goes whatever the kernel took: an idle client
            // that does not read its goodbye loses nothing it was waiting for.
            let _ = conn.flush();
            self.closed.push(slot);
        }
    }

    fn accept(&mut self, now: Instant) {
        loop {
            let mut stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return eprintln!("accept failed: {e}"),
            };
            // A free slot: slots are freed only at the end of a turn, never during one.
            let slot = self.conns.iter().position(Option::is_none);
            let slot = slot.unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            let (registry, token) = (self.poll.registry(), Token(slot + 1));
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(e) = registry.register(&mut stream, token, interest) {
                eprintln!("cannot register: {e}");
                continue;
            }
            self.conns[slot] = Some(Conn {
                stream,
                output: Vec::new(),
                eof: false,
                idle_until: now + self.idle,
            });
        }
    }
}

impl Conn {
    /// As in `02_poll`: writes the leftovers, then reads until `WouldBlock`, answering as it goes.
    /// Bytes from the client push its deadline back.
    fn on_ready(&mut self, now: Instant, idle: Duration, scratch: &mut [u8]) -> io::Result<()> {
        self.flush()?;
        while !self.eof && self.output.len() < OUTPUT_HIGH_WATER {
            match self.stream.read(scratch) {
                Ok(0) => self.eof = true,
                Ok(n) => self
                    .output
                    .extend(scratch[..n].iter().map(u8::to_ascii_uppercase)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            self.idle_until = now + idle;
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
