//! The poll, its tokens, and every registration: the only code that talks to `mio::Registry`,
//! and the one place that knows what a [`Token`] means.
//!
//! The state machines never register anything. A machine that opens a socket (a link dialling
//! its neighbour, a Places slot connecting) says so to the loop, which registers it here; an
//! accepted connection handed to a neighbour's inbound link is moved here to that link's token.
//!
//! Every connected socket is registered once, for both READABLE and WRITABLE, when it is
//! created, and never re-registered but for that move. (Listening sockets and the signals are
//! registered for READABLE alone: nothing is ever written to them.) mio's readiness is
//! edge-triggered: WRITABLE is reported when a socket first becomes writable, again after a
//! write has hit `WouldBlock` and the kernel has made room, and, on Linux, beside any other
//! event of a socket that is writable (epoll reports a socket's whole readiness whenever
//! something wakes it, so the trace says `readable+writable`). While no write hits `WouldBlock`
//! it never wakes the loop on its own, so the interest costs nothing, and the loop never pays an
//! `epoll_ctl` per reply to arm and disarm it (the trap "WRITABLE left on forever" belongs to
//! level-triggered loops such as Redis's, where it would wake the loop on every turn). Closing a
//! socket removes it from the poll, so a socket is simply dropped when its machine is done.

use std::io;
use std::time::Duration;

use mio::event::Source as MioSource;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};

/// What a token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The listening socket.
    Listener,
    /// The [`mio::Waker`] that helper threads use to wake the loop: the Places pool's DNS
    /// look-up, and the store file's fsync thread when a sync fails.
    Waker,
    /// SIGTERM, SIGINT, SIGUSR1 or SIGHUP.
    Signals,
    /// The admin endpoint's listening socket.
    AdminListener,
    /// Slot `i` of the admin endpoint's connections.
    Admin(usize),
    /// The link this server dialled to neighbour `i`.
    Link(usize),
    /// The link neighbour `i` dialled to this server.
    Inbound(usize),
    /// Slot `i` of the Places connection pool.
    Places(usize),
    /// Slot `i` of the accepted connections: clients, and neighbours until they have proved who
    /// they are.
    Conn(usize),
}

/// The token layout: four fixed tokens, then two per neighbour (the link each way), one per
/// Places slot, one per admin connection, and the accepted connections after them.
///
/// Every count but the last is fixed when the server starts, so the accepted connections, whose
/// number grows with the load, go last and need no bound. The two maps are inverses over every
/// token (`tokens_round_trip` checks it), so no token ever stands for two sockets. Nothing checks
/// the index inside a [`Source`]: `Link(i)` with `i` past the neighbours is another source's
/// token, so the loop passes only indices of machines it holds.
#[derive(Debug, Clone, Copy)]
pub struct Tokens {
    links: usize,
    places: usize,
}

/// The listener, the waker, the signals and the admin listener: tokens 0 to 3.
const FIXED: usize = 4;
/// Admin connections' tokens: reserved whether or not an admin endpoint is configured, so the
/// layout does not depend on it.
const ADMIN: usize = crate::admin::MAX_CONNECTIONS;

impl Tokens {
    /// The layout for `links` neighbours and `places` Places slots.
    pub fn new(links: usize, places: usize) -> Tokens {
        Tokens { links, places }
    }

    /// The token `source` is registered under.
    pub fn token(&self, source: Source) -> Token {
        let (links, places) = (self.links, self.places);
        Token(match source {
            Source::Listener => 0,
            Source::Waker => 1,
            Source::Signals => 2,
            Source::AdminListener => 3,
            Source::Link(i) => FIXED + i,
            Source::Inbound(i) => FIXED + links + i,
            Source::Places(i) => FIXED + 2 * links + i,
            Source::Admin(i) => FIXED + 2 * links + places + i,
            Source::Conn(i) => FIXED + 2 * links + places + ADMIN + i,
        })
    }

    /// What `token` stands for. Every token past the admin connections' is an accepted
    /// connection's slot, which may have been freed since its event was queued: the loop checks
    /// the slot.
    pub fn source(&self, token: Token) -> Source {
        let (links, places) = (self.links, self.places);
        match token.0 {
            0 => Source::Listener,
            1 => Source::Waker,
            2 => Source::Signals,
            3 => Source::AdminListener,
            t if t < FIXED + links => Source::Link(t - FIXED),
            t if t < FIXED + 2 * links => Source::Inbound(t - FIXED - links),
            t if t < FIXED + 2 * links + places => Source::Places(t - FIXED - 2 * links),
            t if t < FIXED + 2 * links + places + ADMIN => {
                Source::Admin(t - FIXED - 2 * links - places)
            }
            t => Source::Conn(t - FIXED - 2 * links - places - ADMIN),
        }
    }
}

/// The poll and its registry, with the server's token layout.
pub struct Reactor {
    poll: Poll,
    tokens: Tokens,
}

impl Reactor {
    /// A poll for a server with `links` neighbours and `places` Places slots.
    pub fn new(links: usize, places: usize) -> Result<Reactor, String> {
        let poll = Poll::new().map_err(|e| format!("cannot create the poll: {e}"))?;
        Ok(Reactor {
            poll,
            tokens: Tokens::new(links, places),
        })
    }

    /// What `token` stands for.
    pub fn source(&self, token: Token) -> Source {
        self.tokens.source(token)
    }

    /// The waker helper threads use to wake the loop, under [`Source::Waker`]. A wake-up
    /// carries nothing: the loop asks the Places pool whether its look-up ended, and the end of
    /// the turn collects what the fsync thread reported.
    pub fn waker(&self) -> Result<Waker, String> {
        Waker::new(self.poll.registry(), self.tokens.token(Source::Waker))
            .map_err(|e| format!("cannot create the waker: {e}"))
    }

    /// Registers a listening socket (READABLE: a connection to accept) or the signals.
    pub fn register_readable(
        &self,
        handle: &mut impl MioSource,
        source: Source,
    ) -> Result<(), String> {
        (self.poll.registry())
            .register(handle, self.tokens.token(source), Interest::READABLE)
            .map_err(|e| format!("cannot register with the poll: {e}"))
    }

    /// Registers a new socket for both readiness kinds, once (see the module docs).
    pub fn attach(&self, stream: &mut TcpStream, source: Source) -> io::Result<()> {
        self.poll.registry().register(
            stream,
            self.tokens.token(source),
            Interest::READABLE | Interest::WRITABLE,
        )
    }

    /// Moves a registered socket to another token: an accepted connection that turned out to be
    /// a neighbour's link. The kernel reports its readiness afresh.
    pub fn move_to(&self, stream: &mut TcpStream, source: Source) -> io::Result<()> {
        self.poll.registry().reregister(
            stream,
            self.tokens.token(source),
            Interest::READABLE | Interest::WRITABLE,
        )
    }

    /// Waits for events until `timeout` (`None`: until there is one). A signal may interrupt
    /// it with `ErrorKind::Interrupted`, which the loop takes as a turn without events; the
    /// signal itself arrives as an event of [`Source::Signals`].
    pub fn poll(&mut self, events: &mut Events, timeout: Option<Duration>) -> io::Result<()> {
        self.poll.poll(events, timeout)
    }
}

/// What a state machine asks of the loop after a step. The machines hold no registry, so they
/// can be driven in tests with no poll at all; the loop registers for them.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Nothing.
    Nothing,
    /// It opened a socket: register it under the machine's token.
    Register,
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
            Source::Inbound(0),
            Source::Inbound(2),
            Source::Places(0),
            Source::Places(3),
            Source::AdminListener,
            Source::Admin(0),
            Source::Admin(7),
            Source::Conn(0),
            Source::Conn(1000),
        ] {
            assert_eq!(t.source(t.token(s)), s, "{s:?}");
        }
        // The layout leaves no token to two sources.
        let all: Vec<usize> = (0..20).map(|n| t.token(t.source(Token(n))).0).collect();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
    }
}
