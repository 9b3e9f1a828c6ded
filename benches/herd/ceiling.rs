//! The machine's ceiling for the lone-server figures: `cargo bench` runs this as a server of its
//! own (the bench binary started with `--ceiling-server`), pinned where the servers run.
//!
//! It does the least any server of the protocol can do. It reads lines and answers each
//! `IAMAT CLIENT LOCATION TIME` with `AT Ceiling +0.000000000 CLIENT LOCATION TIME`: no clock,
//! no checks, no store, no log. It is built as the herd is (one thread, one `mio::Poll`,
//! edge-triggered sockets, one read and one write per batch), so `herd load` against it
//! measures what this machine's loopback TCP and the load generator allow a server that does
//! nearly nothing. Where the server's work is what limits a load (50 connections, one command
//! in flight), no server beats it. Where the generator's core is the limit (one request per
//! connection), a server doing more can match it within the noise, and the bench compares a
//! target with the better of the two.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

/// The name in its ready line and its replies.
pub const NAME: &str = "Ceiling";

const LISTENER: Token = Token(usize::MAX);

/// Serves until killed. Prints the ready line the bench waits for, as the servers do.
pub fn serve() -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut stdout = io::stdout();
    writeln!(
        stdout,
        "{NAME} listening on {}, logging to /dev/null",
        listener.local_addr()?
    )?;
    stdout.flush()?;
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0; 64 * 1024];
    loop {
        match poll.poll(&mut events, None) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            result => result?,
        }
        for event in &events {
            if event.token() == LISTENER {
                loop {
                    let mut stream = match listener.accept() {
                        Ok((stream, _)) => stream,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    };
                    stream.set_nodelay(true)?;
                    let slot = free.pop().unwrap_or_else(|| {
                        conns.push(None);
                        conns.len() - 1
                    });
                    poll.registry().register(
                        &mut stream,
                        Token(slot),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    conns[slot] = Some(Conn::new(stream));
                }
                continue;
            }
            let slot = event.token().0;
            let Some(conn) = conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            let closed = event.is_read_closed() || event.is_error();
            if conn.on_event(&mut scratch, closed) {
                conns[slot] = None; // closing the socket takes it out of the poll
                free.push(slot);
            }
        }
    }
}

struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet a whole line.
    input: Vec<u8>,
    output: Vec<u8>,
    sent: usize,
    /// The client has half-closed: close once everything is written.
    ended: bool,
}

impl Conn {
    fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
            ended: false,
        }
    }

    /// Reads what came and answers every whole line, then writes. Returns whether the
    /// connection is finished with.
    fn on_event(&mut self, scratch: &mut [u8], closed: bool) -> bool {
        loop {
            match self.stream.read(scratch) {
                Ok(0) => {
                    self.ended = true;
                    break;
                }
                Ok(n) => {
                    answer(&scratch[..n], &mut self.input, &mut self.output);
                    // A short read emptied the socket; the end of stream, if already here,
                    // raises no new edge and must be read now.
                    if n < scratch.len() && !closed {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
        while self.sent < self.output.len() {
            match self.stream.write(&self.output[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
        self.output.clear();
        self.sent = 0;
        self.ended
    }
}

/// Appends `bytes` to `input` and the reply to each whole line of it to `output`.
fn answer(bytes: &[u8], input: &mut Vec<u8>, output: &mut Vec<u8>) {
    input.extend_from_slice(bytes);
    let mut start = 0;
    while let Some(end) = input[start..].iter().position(|&b| b == b'\n') {
        let line = &input[start..start + end];
        output.extend_from_slice(b"AT ");
        output.extend_from_slice(NAME.as_bytes());
        output.extend_from_slice(b" +0.000000000 ");
        output.extend_from_slice(line.strip_prefix(b"IAMAT ").unwrap_or(line));
        output.push(b'\n');
        start += end + 1;
    }
    input.drain(..start);
}
