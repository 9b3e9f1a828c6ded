//! The link this server dials to one neighbour, and keeps up (SPEC.md section 5).
//!
//! A neighbour's identity is permanent; its connection comes and goes (Redis Cluster's bus keeps
//! its node links the same way). The link is a state machine whose every state carries the
//! deadline it waits for, so changing state cancels the old deadline:
//!
//! ```text
//!            retry_at passed: connect()                 WRITABLE, no socket error
//!   Down ---------------------------------> Connecting ---------------------------> Up
//!    ^  <--------------------------------------'  deadline passed or refused          |
//!    '----------------------------------------------------------------------------'
//!            EOF, error, or output over its cap: backoff doubles, 50 ms up to 2 s
//! ```
//!
//! Records go out only on this link; the neighbour's own records arrive on the connection it
//! dialled to us (an inbound [`crate::conn::Conn`]). When the link comes up it first sends the
//! greeting, then the whole store in batches (`sync`), then whatever is flooded.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::conn::OutBuf;
use crate::log::Log;
use crate::protocol::{GREETING_VERB, PROTOCOL_VERSION};
use crate::reactor::{Registrar, Source};
use crate::store::Store;

pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const FIRST_RETRY: Duration = Duration::from_millis(50);
pub const MAX_RETRY: Duration = Duration::from_secs(2);
/// The store is copied into a link's output only while less than this is waiting, so a sync
/// of a large store neither stalls the loop nor trips the output cap.
const SYNC_LOW_WATER: usize = 64 * 1024;

/// The wait after `failures` failed attempts in a row.
pub fn backoff(failures: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1 << failures.min(16))
        .min(MAX_RETRY)
}

enum LinkState {
    /// Waiting to redial.
    Down { retry_at: Instant },
    /// A non-blocking connect in flight; WRITABLE says it ended, one way or the other.
    Connecting {
        stream: TcpStream,
        deadline: Instant,
    },
    /// Connected and greeted. `sync` is the position of the next record of the initial copy of
    /// the store, up to `sync_end` (the store's size when the link came up; later records are
    /// flooded anyway).
    Up {
        stream: TcpStream,
        out: OutBuf,
        sync: usize,
        sync_end: usize,
    },
}

pub struct Link {
    /// The neighbour's name.
    pub name: String,
    /// This link's index among the neighbours, which is also its token's.
    index: usize,
    addr: SocketAddr,
    /// Failed attempts since the link was last up.
    failures: u32,
    state: LinkState,
}

impl Link {
    pub fn new(name: String, index: usize, addr: SocketAddr, now: Instant) -> Link {
        Link {
            name,
            index,
            addr,
            failures: 0,
            state: LinkState::Down { retry_at: now },
        }
    }

    /// When the link next needs the loop, without any event.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            LinkState::Down { retry_at } => Some(*retry_at),
            LinkState::Connecting { deadline, .. } => Some(*deadline),
            LinkState::Up { .. } => None,
        }
    }

    pub fn is_up(&self) -> bool {
        matches!(self.state, LinkState::Up { .. })
    }

    /// Fires whatever deadline has passed; safe to call when none has.
    pub fn on_timeout(&mut self, now: Instant, registrar: &Registrar, log: &mut Log) {
        match &self.state {
            LinkState::Down { retry_at } if *retry_at <= now => self.dial(now, registrar, log),
            LinkState::Connecting { deadline, .. } if *deadline <= now => {
                let why = format!("no answer within {} ms", PEER_CONNECT_TIMEOUT.as_millis());
                self.go_down(now, log, &why);
            }
            _ => {}
        }
    }

    fn dial(&mut self, now: Instant, registrar: &Registrar, log: &mut Log) {
        let attempt = TcpStream::connect(self.addr).and_then(|mut stream| {
            registrar.attach(&mut stream, Source::Link(self.index))?;
            Ok(stream)
        });
        match attempt {
            Ok(stream) => {
                self.state = LinkState::Connecting {
                    stream,
                    deadline: now + PEER_CONNECT_TIMEOUT,
                };
            }
            Err(e) => self.go_down(now, log, &e.to_string()),
        }
    }

    /// A readiness event on the link's socket.
    pub fn on_ready(&mut self, now: Instant, server: &str, store: &Store, log: &mut Log) {
        match &mut self.state {
            LinkState::Down { .. } => {} // a late event for a socket already dropped
            LinkState::Connecting { stream, .. } => {
                // The connect has ended if the socket has an error or a peer address; neither
                // means the event was spurious and the connect is still in flight.
                let outcome = match stream.take_error() {
                    Ok(Some(e)) | Err(e) => Err(e),
                    Ok(None) => stream.peer_addr().map(|_| ()),
                };
                match outcome {
                    Ok(()) => self.come_up(server, store, log),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(e) => self.go_down(now, log, &e.to_string()),
                }
            }
            LinkState::Up { stream, .. } => {
                // The neighbour never writes on this connection: a readable socket means it
                // closed, or broke the protocol. Either way the link is rebuilt.
                let mut scratch = [0u8; 512];
                let why = loop {
                    match stream.read(&mut scratch) {
                        Ok(0) => break Some("closed by the neighbour".to_owned()),
                        Ok(_) => break Some("the neighbour wrote on a send-only link".to_owned()),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Some(e.to_string()),
                    }
                };
                if let Some(why) = why {
                    self.go_down(now, log, &why);
                }
            }
        }
    }

    fn come_up(&mut self, server: &str, store: &Store, log: &mut Log) {
        let LinkState::Connecting { stream, .. } = std::mem::replace(
            &mut self.state,
            LinkState::Down {
                retry_at: Instant::now(),
            },
        ) else {
            return;
        };
        let mut out = OutBuf::default();
        let mut greeting = Vec::with_capacity(64);
        greeting.extend_from_slice(GREETING_VERB);
        greeting.push(b' ');
        greeting.extend_from_slice(PROTOCOL_VERSION);
        greeting.push(b' ');
        greeting.extend_from_slice(server.as_bytes());
        log.bytes(format_args!("link {}", self.name), '>', &greeting);
        greeting.push(b'\n');
        out.push(&greeting);
        self.failures = 0;
        log.event(
            format_args!("link {}", self.name),
            format_args!("up to {}; syncing {} records", self.addr, store.len()),
        );
        self.state = LinkState::Up {
            stream,
            out,
            sync: 0,
            sync_end: store.len(),
        };
    }

    fn go_down(&mut self, now: Instant, log: &mut Log, why: &str) {
        let wait = backoff(self.failures);
        self.failures = self.failures.saturating_add(1);
        log.event(
            format_args!("link {}", self.name),
            format_args!("down: {why}; retry in {} ms", wait.as_millis()),
        );
        self.state = LinkState::Down {
            retry_at: now + wait,
        };
    }

    /// Queues one record. A link that is not up drops it: the sync when it comes back up
    /// carries the whole store, so nothing queues without bound for a neighbour that is away.
    pub fn send(&mut self, now: Instant, line: &[u8], cap: usize, log: &mut Log) {
        let LinkState::Up { out, .. } = &mut self.state else {
            return;
        };
        log.bytes(format_args!("link {}", self.name), '>', line);
        out.push(line);
        out.push(b"\n");
        if out.pending() > cap {
            let why = format!("over {cap} bytes unsent: the neighbour does not keep up");
            self.go_down(now, log, &why);
        }
    }

    /// Copies the next batch of the store into the output, if the output has room, then writes.
    /// Called at the end of every turn.
    pub fn flush(&mut self, now: Instant, store: &Store, log: &mut Log) {
        let LinkState::Up {
            stream,
            out,
            sync,
            sync_end,
        } = &mut self.state
        else {
            return;
        };
        let result = loop {
            while *sync < *sync_end && out.pending() < SYNC_LOW_WATER {
                if let Some(record) = store.at(*sync) {
                    log.bytes(format_args!("link {}", self.name), '>', &record.line);
                    out.push(&record.line);
                    out.push(b"\n");
                }
                *sync += 1;
            }
            let before = out.pending();
            let result = out.write_to(stream);
            // Keep going while the kernel takes everything and the sync has more to send.
            if result.is_err() || out.pending() != 0 || before == 0 || *sync >= *sync_end {
                break result;
            }
        };
        if let Err(e) = result {
            self.go_down(now, log, &format!("write failed: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let waits: Vec<u128> = (0..8).map(|f| backoff(f).as_millis()).collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(backoff(u32::MAX), MAX_RETRY);
    }
}
