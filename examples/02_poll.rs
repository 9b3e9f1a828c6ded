//! Step 2: one `mio::Poll`, one thread, every client at once.
//!
//! The same upper-casing line server as `01_blocking`, without a blocking call: every socket is
//! non-blocking, and the thread waits in one place only, `poll`, which says which sockets are
//! ready. A client that types nothing costs nothing; the others are served meanwhile.
//!
//! ```text
//! cargo run --release --example 02_poll               # --port N; --port 0 takes a free port
//! nc 127.0.0.1 7002                                   # as many as you like, at once
//! ```
//!
//! What it shows:
//!
//! - **Tokens.** Each registered socket has a [`Token`], a number the poll hands back with its
//!   events. Token 0 is the listener; token `i + 1` is slot `i` of a `Vec<Option<Conn>>` (a
//!   slab: freed slots are reused, so tokens stay small).
//! - **Edge-triggered readiness.** An event says "this socket became ready", once. The handler
//!   therefore reads (and accepts) until `WouldBlock`: stopping after one read would leave
//!   bytes in the kernel that no event will announce again.
//! - **Write first, keep leftovers.** A reply is written as soon as it exists. Only what the
//!   kernel would not take is kept, and the WRITABLE event that comes when it has room again
//!   writes it. Registered once for both kinds, WRITABLE fires only after a write hit
//!   `WouldBlock`, so it costs nothing while writes go through.
//! - **Close after the batch.** A connection that ends (end of stream, all replies written) is
//!   marked, and freed after every event of the batch has been handled, so a later event of the
//!   same batch never finds its slot given to someone else.
//!
//! The asyncio equivalent is `asyncio.start_server(handle, host, port)` with a `handle` that
//! loops on `await reader.readline()`, `writer.write(line.upper())`, `await writer.drain()`:
//! here is the loop underneath those `await`s.

use std::error::Error;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};

const DEFAULT_PORT: u16 = 7002;
const LISTENER: Token = Token(0);
/// A client whose line grows past this is disconnected: the input buffer is bounded.
const MAX_LINE_BYTES: usize = 4096;
/// Past this many unwritten reply bytes a client's input is left in the kernel until it reads
/// its replies (back-pressure, `await writer.drain()`), so the output is bounded too.
const OUTPUT_HIGH_WATER: usize = 64 * 1024;

/// An accepted connection.
struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet a whole line.
    input: Vec<u8>,
    /// Replies the kernel has not taken yet: only ever the leftovers of a write.
    output: Vec<u8>,
    /// The client closed its side; the connection ends once its replies are written.
    eof: bool,
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.get(args.iter().position(|a| a == flag)? + 1);
    let port = value("--port").map_or(Ok(DEFAULT_PORT), |v| v.parse())?;
    let mut poll = Poll::new()?;
    let mut listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;

    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free_slots: Vec<usize> = Vec::new();
    let mut closed: Vec<usize> = Vec::new();
    // One read buffer for every connection: only the bytes that arrive are kept per connection.
    let mut scratch = vec![0; 64 * 1024];
    let mut events = Events::with_capacity(256);
    loop {
        // The only place the thread waits. `None`: no deadline yet (that is step 3).
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue; // a signal arrived; poll again
            }
            return Err(e.into());
        }
        for event in events.iter() {
            if event.token() == LISTENER {
                accept(&listener, poll.registry(), &mut conns, &mut free_slots);
                continue;
            }
            let slot = event.token().0 - 1;
            let Some(Some(conn)) = conns.get_mut(slot) else {
                continue; // nothing there any more: events can be spurious
            };
            // Readable or writable, the same handler: it flushes, then reads.
            match conn.on_ready(&mut scratch) {
                Ok(true) => {}
                Ok(false) => closed.push(slot),
                Err(e) => {
                    eprintln!("slot {slot}: {e}");
                    closed.push(slot);
                }
            }
        }
        for slot in closed.drain(..) {
            if let Some(mut conn) = conns[slot].take() {
                let _ = poll.registry().deregister(&mut conn.stream);
                free_slots.push(slot); // and dropping the stream closes it
                eprintln!("slot {slot}: closed");
            }
        }
    }
}

/// Accepts every waiting connection, until `WouldBlock`: one accept per event would leave
/// the others waiting for an event that never comes.
fn accept(
    listener: &TcpListener,
    registry: &Registry,
    conns: &mut Vec<Option<Conn>>,
    free_slots: &mut Vec<usize>,
) {
    loop {
        let (mut stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return eprintln!("accept failed: {e}"),
        };
        let slot = free_slots.pop().unwrap_or_else(|| {
            conns.push(None);
            conns.len() - 1
        });
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = registry.register(&mut stream, Token(slot + 1), interest) {
            eprintln!("{peer}: cannot register: {e}");
            free_slots.push(slot);
            continue;
        }
        eprintln!("{peer}: connected, slot {slot}");
        conns[slot] = Some(Conn {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            eof: false,
        });
    }
}

impl Conn {
    /// Called on every event of this connection. Writes the leftovers, then reads until the
    /// socket would block (or the output is over its high-water mark), answering lines as
    /// they come. Returns whether the connection stays open.
    fn on_ready(&mut self, scratch: &mut [u8]) -> io::Result<bool> {
        self.flush()?;
        // Stopping at the high-water mark leaves input in the socket, which no new READABLE
        // event will announce. That is fine: the output is only this full because a write hit
        // `WouldBlock`, so a WRITABLE event will come, and it brings us back here.
        while !self.eof && self.output.len() < OUTPUT_HIGH_WATER {
            match self.stream.read(scratch) {
                Ok(0) => {
                    self.eof = true;
                    if !self.input.is_empty() {
                        self.input.push(b'\n'); // a last line without its newline is a line
                    }
                }
                Ok(n) => self.input.extend_from_slice(&scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            self.answer_lines()?;
            self.flush()?;
        }
        Ok(!(self.eof && self.output.is_empty()))
    }

    /// Turns every whole line of the input into its reply.
    fn answer_lines(&mut self) -> io::Result<()> {
        let mut start = 0;
        while let Some(end) = self.input[start..].iter().position(|&b| b == b'\n') {
            let line = &self.input[start..start + end + 1];
            self.output.extend(line.iter().map(u8::to_ascii_uppercase));
            start += end + 1;
        }
        self.input.drain(..start);
        if self.input.len() > MAX_LINE_BYTES {
            let why = format!("a line longer than {MAX_LINE_BYTES} bytes");
            return Err(io::Error::new(io::ErrorKind::InvalidData, why));
        }
        Ok(())
    }

    /// Writes what the kernel takes now; the rest waits for the next WRITABLE event.
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
