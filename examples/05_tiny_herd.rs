//! Step 5: a tiny herd, servers that flood a key-value store to each other.
//!
//! ```text
//! cargo run --release --example 05_tiny_herd               # A to E, on ports 7005 to 7009
//! echo 'SET kiwi +34.068930-118.445127' | nc -q1 127.0.0.1 7005    # A answers OK
//! echo 'GET kiwi' | nc -q1 127.0.0.1 7007                          # C answers +34.068930-118.445127
//! ```
//!
//! `--servers N`: N servers, A, B, C..., in a ring; `--port P`: ports P, P+1, ... (0: free ports,
//! printed). Each is a thread with its own poll loop, sharing nothing but sockets, as processes
//! would. Clients send `SET key value` (`OK`) or `GET key` (the value); anything else gets `? `
//! and the line. A server sends each record it keeps, `AT time key value`, to its neighbours,
//! which keep it only if it is newer than theirs and send on only what they keep: so a flood
//! dies out instead of circling for ever, as stderr shows. (The only bound kept is a line's
//! length; `02_poll` shows back-pressure.) In asyncio: `start_server`, `open_connection` to each
//! neighbour, and a `flood` that writes each new record to every neighbour's `StreamWriter`.

use std::collections::HashMap;
use std::error::Error;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const LISTENER: Token = Token(0);
/// A connection whose line grows past this is closed.
const MAX_LINE_BYTES: usize = 4096;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// A client, or a neighbour's link to us: lines come in and are answered.
    Accepted,
    /// Our link to a neighbour: records go out on it, and nothing comes back.
    Link,
}

struct Conn {
    stream: TcpStream,
    kind: Kind,
    input: Vec<u8>,
    output: Vec<u8>,
    /// No more input (end of stream, an error, a line too long): it goes once its output is out.
    done: bool,
}

struct Server {
    name: String,
    poll: Poll,
    listener: TcpListener,
    /// Slot `i` has token `i + 1`.
    conns: Vec<Option<Conn>>,
    /// Each key's newest record: the time of its `SET` (ns since 1970) and its value.
    store: HashMap<String, (u128, String)>,
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.get(args.iter().position(|a| a == flag)? + 1);
    let servers: usize = value("--servers").map_or(Ok(5), |v| v.parse())?;
    let port: u16 = value("--port").map_or(Ok(7005), |v| v.parse())?;
    if !(1..=26).contains(&servers) {
        return Err("--servers takes 1 to 26".into());
    }
    let (mut listeners, mut addrs) = (Vec::new(), Vec::new());
    for i in 0..servers as u16 {
        let port = if port == 0 { 0 } else { port.saturating_add(i) };
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
        addrs.push(listener.local_addr()?);
        listeners.push(listener);
    }
    let mut threads = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let name = char::from(b'A' + i as u8).to_string();
        println!("{name} listening on {}", addrs[i]);
        let mut peers = vec![addrs[(i + 1) % servers], addrs[(i + servers - 1) % servers]];
        peers.dedup();
        peers.retain(|&peer| peer != addrs[i]);
        threads.push(thread::spawn(move || {
            Server::start(name, listener, &peers)?.run()
        }));
    }
    io::stdout().flush()?;
    for thread in threads {
        thread.join().map_err(|_| "a server panicked")??;
    }
    Ok(())
}

impl Server {
    /// Dials the neighbours. Blocking, but before the loop runs: nothing waits on it yet (and
    /// their listeners are bound, so the kernel answers for them).
    fn start(name: String, mut listener: TcpListener, peers: &[SocketAddr]) -> io::Result<Server> {
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let (conns, store) = (Vec::new(), HashMap::new());
        let mut server = Server {
            name,
            poll,
            listener,
            conns,
            store,
        };
        for &peer in peers {
            let stream = std::net::TcpStream::connect(peer)?;
            stream.set_nonblocking(true)?;
            server.insert(TcpStream::from_std(stream), Kind::Link)?;
        }
        Ok(server)
    }

    /// The loop: sleep until an event, handle each, then write what the turn produced.
    fn run(&mut self) -> io::Result<()> {
        let (mut events, mut scratch) = (Events::with_capacity(256), vec![0; 64 * 1024]);
        loop {
            match self.poll.poll(&mut events, None) {
                Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e),
                _ => {}
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    Token(t) => self.on_ready(t - 1, &mut scratch),
                }
            }
            self.before_sleep();
        }
    }

    fn accept(&mut self) {
        loop {
            let accepted = self.listener.accept();
            match accepted.and_then(|(stream, _)| self.insert(stream, Kind::Accepted)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return eprintln!("{}: accept failed: {e}", self.name),
            }
        }
    }

    /// Gives a new connection a free slot, registered under that slot's token.
    fn insert(&mut self, mut stream: TcpStream, kind: Kind) -> io::Result<()> {
        let slot = (self.conns.iter().position(Option::is_none)).unwrap_or(self.conns.len());
        let interest = Interest::READABLE | Interest::WRITABLE;
        self.poll
            .registry()
            .register(&mut stream, Token(slot + 1), interest)?;
        self.conns
            .resize_with(self.conns.len().max(slot + 1), || None);
        let (input, output) = (Vec::new(), Vec::new());
        self.conns[slot] = Some(Conn {
            stream,
            kind,
            input,
            output,
            done: false,
        });
        Ok(())
    }

    /// An event on connection `slot`: reads until the socket would block, then runs the lines.
    fn on_ready(&mut self, slot: usize, scratch: &mut [u8]) {
        let mut lines = Vec::new();
        if let Some(Some(conn)) = self.conns.get_mut(slot) {
            while !conn.done {
                match conn.stream.read(scratch) {
                    Ok(0) => conn.done = true,
                    Ok(n) => conn.input.extend_from_slice(&scratch[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => conn.done = true,
                }
                while let Some(end) = conn.input.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = conn.input.drain(..=end).collect();
                    lines.push(String::from_utf8_lossy(&line).trim_end().to_owned());
                }
                conn.done |= conn.input.len() > MAX_LINE_BYTES;
            }
            if conn.kind == Kind::Link {
                lines.clear(); // a neighbour says nothing on our link; nothing is answered there
            }
        }
        for line in lines {
            let reply = self.on_line(&line);
            if let (Some(reply), Some(Some(conn))) = (reply, self.conns.get_mut(slot)) {
                conn.output
                    .extend_from_slice(format!("{reply}\n").as_bytes());
            }
        }
    }

    /// Runs one line; returns its reply. A record from a neighbour gets none.
    fn on_line(&mut self, line: &str) -> Option<String> {
        let words: Vec<&str> = line.splitn(3, ' ').collect();
        match words[..] {
            ["AT", time, record] => {
                match (time.parse(), record.split_once(' ')) {
                    (Ok(time), Some((key, value))) => self.merge(key, time, value),
                    _ => eprintln!("{}: not a record: {line}", self.name),
                }
                None
            }
            ["SET", key, value] => {
                // Later than the record held, even if that one's clock ran ahead: a SET wins.
                let now = SystemTime::now().duration_since(UNIX_EPOCH);
                let held = self.store.get(key).map_or(0, |(time, _)| time + 1);
                self.merge(key, now.map_or(0, |d| d.as_nanos()).max(held), value);
                Some("OK".to_owned())
            }
            ["GET", key] => match self.store.get(key) {
                Some((_, value)) => Some(value.clone()),
                None => Some(format!("? {line}")),
            },
            _ => Some(format!("? {line}")),
        }
    }

    /// Keeps a record if it is newer than the one held for its key, and only then sends it to
    /// every neighbour: a record already held ends the flood here. (It also goes back to the
    /// neighbour it came from, which drops it as old news; the herd knows whom not to send it.)
    fn merge(&mut self, key: &str, time: u128, value: &str) {
        let held = self.store.get(key);
        if held.is_some_and(|(t, v)| (*t, v.as_str()) >= (time, value)) {
            return eprintln!("{}: old news: {key} {time}", self.name);
        }
        eprintln!("{}: kept: {key} {time} {value}", self.name);
        self.store.insert(key.to_owned(), (time, value.to_owned()));
        let record = format!("AT {time} {key} {value}\n");
        for conn in self.conns.iter_mut().flatten() {
            if conn.kind == Kind::Link {
                conn.output.extend_from_slice(record.as_bytes());
            }
        }
    }

    /// End of the turn: writes what the turn produced, one write per connection, and frees the
    /// connections that are done. One that is done with output left waits for WRITABLE.
    fn before_sleep(&mut self) {
        for slot in 0..self.conns.len() {
            let Some(conn) = &mut self.conns[slot] else {
                continue;
            };
            // Written until it is all out or the socket would block; what is left waits.
            let mut failed = false;
            while !conn.output.is_empty() && !failed {
                match conn.stream.write(&conn.output) {
                    Ok(n) if n > 0 => drop(conn.output.drain(..n)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    _ => failed = true,
                }
            }
            if failed || (conn.done && conn.output.is_empty()) {
                let _ = self.poll.registry().deregister(&mut conn.stream);
                self.conns[slot] = None;
            }
        }
    }
}
