//! Tokens and registration: the only code that talks to `mio::Registry`, and the one
//! place that knows what a [`Token`] means.
//!
//! Every socket is registered once, for both READABLE and WRITABLE, when it is created, and never
//! re-registered. mio's readiness is edge-triggered: WRITABLE fires when a socket first becomes
//! writable and then again only after a write has hit `WouldBlock` and the kernel has made room.
//! So the interest costs nothing while output flows, and the loop never pays an `epoll_ctl` per
//! reply to arm and disarm it (the trap "WRITABLE left on forever" belongs to level-triggered
//! loops such as Redis's, where it would wake the loop on every turn).

use std::io;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

/// What a token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The listening socket.
    Listener,
    /// The [`mio::Waker`] that helper threads (DNS) use to wake the loop.
    Waker,
    /// SIGTERM or SIGINT.
    Signals,
    /// The link dialled to neighbour `i`.
    Link(usize),
    /// Slot `i` of the Places connection pool.
    Places(usize),
    /// Slot `i` of the accepted connections (clients and inbound peers).
    Conn(usize),
}

/// The token layout: three fixed tokens, then one per neighbour, one per Places slot, and the
/// accepted connections after them.
#[derive(Debug, Clone, Copy)]
pub struct Tokens {
    links: usize,
    places: usize,
}

const FIXED: usize = 3;

impl Tokens {
    pub fn new(links: usize, places: usize) -> Tokens {
        Tokens { links, places }
    }

    pub fn token(&self, source: Source) -> Token {
        Token(match source {
            Source::Listener => 0,
            Source::Waker => 1,
            Source::Signals => 2,
            Source::Link(i) => FIXED + i,
            Source::Places(i) => FIXED + self.links + i,
            Source::Conn(i) => FIXED + self.links + self.places + i,
        })
    }

    pub fn source(&self, token: Token) -> Source {
        match token.0 {
            0 => Source::Listener,
            1 => Source::Waker,
            2 => Source::Signals,
            t if t < FIXED + self.links => Source::Link(t - FIXED),
            t if t < FIXED + self.links + self.places => Source::Places(t - FIXED - self.links),
            t => Source::Conn(t - FIXED - self.links - self.places),
        }
    }
}

/// Registers sockets for the state machines that create them.
pub struct Registrar<'a> {
    registry: &'a Registry,
    tokens: Tokens,
}

impl<'a> Registrar<'a> {
    pub fn new(registry: &'a Registry, tokens: Tokens) -> Registrar<'a> {
        Registrar { registry, tokens }
    }

    /// Registers a new socket for both readiness kinds, once (see the module docs).
    pub fn attach(&self, stream: &mut TcpStream, source: Source) -> io::Result<()> {
        self.registry.register(
            stream,
            self.tokens.token(source),
            Interest::READABLE | Interest::WRITABLE,
        )
    }

    /// Deregisters a socket about to be dropped.
    pub fn detach(&self, stream: &mut TcpStream) {
        // Closing the descriptor removes it from epoll anyway; a failure here changes nothing.
        let _ = self.registry.deregister(stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let t = Tokens::new(3, 4);
        for s in [
            Source::Listener,
            Source::Waker,
            Source::Signals,
            Source::Link(0),
            Source::Link(2),
            Source::Places(0),
            Source::Places(3),
            Source::Conn(0),
            Source::Conn(10_000),
        ] {
            assert_eq!(t.source(t.token(s)), s);
        }
    }
}
