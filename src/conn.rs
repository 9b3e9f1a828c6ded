//! An accepted connection: a client, or a neighbour until it has proved who it is. The central
//! machine of the server, in one place: its states, what each event does to it, its deadlines,
//! and why it closes.
//!
//! ```text
//!  from            to            when
//!  Undecided    -> Undecided     a blank line
//!  Undecided    -> Client        a first line that is a command
//!  Undecided    -> Peer          a neighbour's greeting, in a herd without a secret
//!  Undecided    -> Challenged    a neighbour's greeting with its nonce: we send CHALLENGE
//!  Challenged   -> Peer          its PROOF checks out: we send ours
//!  Undecided    -> Draining      a client's first line in a place kept for neighbours: busy
//!  Undecided,
//!  Client       -> Draining      a peer's line from a client: answered `?`
//!  running      -> Draining      an overlong line (answered `?`, except in the handshake), or
//!                                the end of the stream once every line has run
//!  Draining     -> Lingering     every reply written, after a broken limit: write side shut
//!  Draining     -> Closed        every reply written, after the end of the stream
//!  Lingering    -> Closed        its input ends or passes LINGER_BYTES, or LINGER passes
//!  all but Peer -> Closed        a failed read or write, a deadline passed, replies over the
//!                                cap, a handshake refused
//! ```
//!
//! `running` is Undecided, Challenged or Client: the states whose lines are read and run. A
//! `Peer` leaves the machine at the end of the turn, when the loop hands its socket to the
//! neighbour's inbound link; a `Closed` one is freed by the loop at the end of the turn.
//!
//! Every event comes through one of three methods: [`Conn::serve`] (bytes arrived, or lines it
//! holds may run now), [`Conn::flush`] (the end of the turn: write, and decide whether it is
//! done) and [`Conn::on_timeout`] (the loop's once-a-second sweep: a deadline passed). A Places
//! answer only takes its place in line ([`Conn::deliver`]); the loop then serves the connection.
//! Every change of state goes through [`Conn::set_state`]; the trace sees it by comparing
//! [`Conn::state_name`] before and after each event.
//!
//! `serve` never writes to the client. Replies gather in the connection's output and leave in
//! `flush`, at the end of the turn, after the links have written (a neighbour hears of an update
//! before the client that sent it) and after the store's file has taken the turn's records. So
//! a burst of pipelined commands costs one write, and what the kernel holds for the client can
//! only shrink while its lines run.
//!
//! Three things hold a client's commands back, each released by something that comes later:
//! - its share of the turn is spent ([`crate::config::Turn`]): the loop serves it again in the
//!   next turn, which comes at once;
//! - its replies not yet read reach the high-water mark (back-pressure): the end of a turn whose
//!   write brings them under it has the rest run in the next turn, which comes at once;
//! - as many WHATSATs as it may have are waiting on Places: a reply coming back runs the rest.
//!
//! The kernel will not wake the loop for bytes already read, so whatever ends the wait runs the
//! connection again; [`Served::More`] and [`Flushed::Resume`] are how the connection says so.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::config::{Limits, Turn};
use crate::herd::{Answer, Herd};
use crate::log::Who;
use crate::peer::{self, Session};
use crate::places::pool::Owner;
use crate::protocol;
use crate::trace::{self, trace_lines, trace_loop};
use crate::wire::{Fill, Line, OutBuf, Transport, Wire};

/// A connection's unhandled input stops being read past this (it is waiting on Places, or
/// sending faster than it reads); reading resumes when its lines are handled. A neighbour's
/// inbound link stops at the same mark. Past it the client's bytes wait in the kernel, whose
/// receive window then tells it to slow down.
pub const INPUT_HIGH_WATER: usize = 256 * 1024;
/// How long a connection closed for breaking a limit has its input read and dropped after its
/// last reply, before it is closed (a lingering close, as nginx's `lingering_time`): closing a
/// socket with unread input resets it, and the reset destroys the reply the client has not read
/// yet.
pub const LINGER: Duration = Duration::from_secs(5);
/// ...and how much of its input is dropped at most before it is closed anyway.
pub const LINGER_BYTES: usize = 1 << 20;

/// Why a connection closed: printed in the log's `closed:` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client half-closed, and every reply owed was written.
    EndOfStream,
    /// A read failed (a reset, most likely), as said.
    ReadFailed(String),
    /// A write failed (the client is gone, most likely), as said.
    WriteFailed(String),
    /// A line longer than this many bytes.
    LineTooLong(usize),
    /// A line started and not finished within this.
    LineTimeout(Duration),
    /// Nothing received and nothing pending for this long.
    Idle(Duration),
    /// Replies unread over the soft limit (`bytes`) for longer than `time`.
    Unread {
        /// The soft limit, `client_output_soft_bytes`.
        bytes: usize,
        /// How long it may be passed, `client_output_soft_time`.
        time: Duration,
    },
    /// Replies unread over the hard cap.
    OutputCap(usize),
    /// Done with its commands, its last replies still unread this long after.
    Undelivered(Duration),
    /// A client sent a line only peers send: it was answered `?` like any invalid command.
    PeerLineFromClient,
    /// A neighbour's handshake failed, as said.
    Handshake(String),
    /// A neighbour did not prove itself within this.
    NotAuthenticated(Duration),
    /// The neighbour closed its inbound link.
    PeerClosed(String),
    /// An inbound link heard nothing for this long.
    Silent(Duration),
    /// The neighbour broke the peer protocol, as said.
    PeerProtocol(String),
    /// The neighbour dialled a new link, which took this one's place.
    Replaced(u64),
    /// No first line within this.
    NoFirstLine(Duration),
    /// Every place was taken: it was told `? server busy`.
    Busy,
    /// It held a place kept for neighbours and said nothing, and a newcomer needed the place.
    Evicted,
}

impl CloseReason {
    /// The kind of a close: its index in [`CLOSE_KINDS`](crate::metrics::CLOSE_KINDS), the
    /// `reason` label of the metrics. Reasons are grouped into a few kinds: a label naming each
    /// reason with its detail (an error's text, a limit's value) would make a new series for
    /// every value.
    pub fn kind(&self) -> usize {
        match self {
            CloseReason::EndOfStream => 0,
            CloseReason::ReadFailed(_) | CloseReason::WriteFailed(_) => 1,
            CloseReason::LineTooLong(_) => 2,
            CloseReason::LineTimeout(_) | CloseReason::NoFirstLine(_) => 3,
            CloseReason::Idle(_) => 4,
            CloseReason::Unread { .. }
            | CloseReason::OutputCap(_)
            | CloseReason::Undelivered(_) => 5,
            CloseReason::PeerLineFromClient => 6,
            CloseReason::Handshake(_) | CloseReason::NotAuthenticated(_) => 7,
            CloseReason::PeerClosed(_)
            | CloseReason::Silent(_)
            | CloseReason::PeerProtocol(_)
            | CloseReason::Replaced(_) => 8,
            CloseReason::Busy | CloseReason::Evicted => 9,
        }
    }

    /// Whether a connection closed for this reason lingers: the client broke a limit and was
    /// told so with a `?` line, which a reset must not destroy.
    pub fn lingers(&self) -> bool {
        matches!(
            self,
            CloseReason::LineTooLong(_) | CloseReason::PeerLineFromClient | CloseReason::Busy
        )
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::EndOfStream => write!(f, "end of stream"),
            CloseReason::ReadFailed(e) => write!(f, "read failed: {e}"),
            CloseReason::WriteFailed(e) => write!(f, "write failed: {e}"),
            CloseReason::LineTooLong(max) => write!(f, "line longer than {max} bytes"),
            CloseReason::LineTimeout(t) => {
                write!(f, "a line not finished within {} ms", t.as_millis())
            }
            CloseReason::Idle(t) => write!(f, "idle for {} ms", t.as_millis()),
            CloseReason::Unread { bytes, time } => write!(
                f,
                "over {bytes} bytes of replies unread for {} ms: the client does not read",
                time.as_millis()
            ),
            CloseReason::OutputCap(cap) => write!(
                f,
                "over {cap} bytes of replies unread: the client does not read"
            ),
            CloseReason::Undelivered(t) => write!(
                f,
                "its last replies unread {} ms after its last command: the client does not read",
                t.as_millis()
            ),
            CloseReason::PeerLineFromClient => write!(f, "a client sent a peer's line"),
            CloseReason::Handshake(why) | CloseReason::PeerProtocol(why) => write!(f, "{why}"),
            CloseReason::NotAuthenticated(t) => {
                write!(f, "did not authenticate within {} s", t.as_secs())
            }
            CloseReason::PeerClosed(name) => write!(f, "peer {name} closed its link"),
            CloseReason::Silent(t) => write!(f, "silent for {} s", t.as_secs()),
            CloseReason::Replaced(by) => write!(f, "the neighbour dialled again (c{by})"),
            CloseReason::NoFirstLine(t) => write!(f, "no first line within {} ms", t.as_millis()),
            CloseReason::Busy => write!(f, "every place is taken: told the server is busy"),
            CloseReason::Evicted => write!(
                f,
                "it held a place kept for neighbours and had not proved itself one: told the server is busy"
            ),
        }
    }
}

/// Where an accepted connection is in its life.
pub enum State {
    /// Nothing but blank lines yet: the first line decides what it is.
    Undecided {
        /// When its first line must have come ([`crate::config::Limits::first_line_timeout`]).
        until: Instant,
        /// It took one of the places kept for neighbours (the client places were all taken):
        /// only a neighbour's greeting is welcome.
        peers_only: bool,
    },
    /// A client: its commands run, its replies go out in command order.
    Client,
    /// Neighbour `neighbour` greeted with its nonce `nd`; we answered with our challenge `na`
    /// and wait, until `until`, for its proof.
    Challenged {
        /// The neighbour it claims to be, by index of [`Herd::links`].
        neighbour: usize,
        /// Its nonce, from its greeting.
        nd: Vec<u8>,
        /// Ours, from our challenge.
        na: Vec<u8>,
        /// The handshake's deadline, [`peer::HANDSHAKE_TIMEOUT`] after the greeting.
        until: Instant,
    },
    /// Neighbour `neighbour`, proved (or greeted, in a herd without a secret): at the end of the
    /// turn the loop hands the socket to the neighbour's inbound link.
    Peer {
        /// Which neighbour, by index of [`Herd::links`].
        neighbour: usize,
        /// The keys every later line is sealed and checked with; `None` without a secret.
        session: Option<Session>,
    },
    /// No more input is run: the replies owed are finished and written, then it closes.
    Draining(CloseReason),
    /// Closed for breaking a limit, its last reply written and its write side shut: what it
    /// still sends is read and dropped until it closes too, or until `until`.
    Lingering {
        /// Why it was closed, logged when it goes.
        reason: CloseReason,
        /// The end of the linger, [`LINGER`] after its last reply was written.
        until: Instant,
    },
    /// Done: the loop frees it at the end of the turn.
    Closed(CloseReason),
}

/// Why a connection stopped running its lines. Each reason has its own release: the next turn
/// for [`Held::Turn`] ([`Served::More`]), a write that brings the replies under the mark for
/// [`Held::Output`] ([`Flushed::Resume`]), a Places answer for [`Held::Places`]. `serve` and
/// `flush` read it to know which applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Its share of this turn is spent.
    Turn,
    /// Its unread replies are at the high-water mark.
    Output,
    /// As many WHATSATs as it may have are waiting on Places.
    Places,
}

/// What the kernel said of a socket: bytes arrived (`readable`), the other end closed its side
/// (`hangup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// The event said READABLE.
    pub readable: bool,
    /// The event said the read side closed, or the socket has an error: read to the end now,
    /// for the end of the stream raises no second event.
    pub hangup: bool,
}

impl Readiness {
    /// No event: what the connection already holds may run.
    pub const HELD: Readiness = Readiness {
        readable: false,
        hangup: false,
    };
}

/// What a call of [`Conn::serve`] left.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Nothing that the next event, reply or write will not bring back.
    Done,
    /// Its share of the turn is spent with work left: serve it again next turn, at once.
    More,
}

/// What the end of a turn made of a connection.
#[must_use]
#[derive(Debug, PartialEq, Eq)]
pub enum Flushed {
    /// It stays; nothing to do.
    Open,
    /// Its replies went out, and lines it holds back may run now: serve it again.
    Resume,
    /// Closed: free it (the reason is logged by the loop).
    Closed(CloseReason),
    /// A neighbour's link, proved: hand it to the neighbour's inbound link.
    Peer,
}

/// One connection's share of the current turn: what keeps a client that pipelines a million
/// commands from making every other client wait for them ([`crate::config::Turn`]).
#[derive(Debug, Clone, Copy)]
struct Share {
    /// The turn it belongs to: a serve in a later turn starts a fresh share.
    turn: u64,
    /// Lines it may still run this turn.
    lines: usize,
    /// Bytes it may still read this turn.
    read_bytes: usize,
}

/// An accepted connection. `S` is its socket: mio's `TcpStream`, or a scripted one in tests.
pub struct Conn<S = TcpStream> {
    /// Unique for the life of the process; names the connection in the log (`c7`).
    pub id: u64,
    /// Where it came from.
    pub addr: SocketAddr,
    /// It took one of the places kept for neighbours.
    pub reserved: bool,
    /// Its socket, what was read of it, and what waits to be written.
    wire: Wire<S>,
    /// Replies in command order, some waiting on Places.
    replies: Replies,
    /// Where it is in its life; changed only by [`Conn::set_state`].
    state: State,
    /// When the socket was last read (on an event, or to refill a full buffer), for the idle
    /// timeout.
    heard: Instant,
    /// When the first byte of a line whose end has not come arrived, for the line timeout.
    line_began: Option<Instant>,
    /// Since when the replies not yet read have been over the soft limit.
    unread_since: Option<Instant>,
    /// Why its lines are held back, if they are.
    held: Option<Held>,
    /// What is left of its share of the turn.
    share: Share,
    /// Input dropped while lingering.
    lingered: usize,
}

impl<S: Transport> Conn<S> {
    /// A connection accepted at `now`, whose first line must come by `until`. `peers_only`
    /// when it took a place kept for neighbours.
    pub fn new(
        id: u64,
        stream: S,
        addr: SocketAddr,
        now: Instant,
        until: Instant,
        peers_only: bool,
    ) -> Conn<S> {
        Conn {
            id,
            addr,
            reserved: peers_only,
            wire: Wire::new(stream),
            replies: Replies::default(),
            state: State::Undecided { until, peers_only },
            heard: now,
            line_began: None,
            unread_since: None,
            held: None,
            // No turn is numbered this: the first serve gives it a fresh share.
            share: Share {
                turn: u64::MAX,
                lines: 0,
                read_bytes: 0,
            },
            lingered: 0,
        }
    }

    /// Its socket: for the loop to answer `? server busy` on it when it evicts it.
    pub fn socket(&mut self) -> &mut S {
        &mut self.wire.stream
    }

    /// Where it is in its life.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The state's name, for the trace.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::Undecided { .. } => "Undecided",
            State::Client => "Client",
            State::Challenged { .. } => "Challenged",
            State::Peer { .. } => "Peer",
            State::Draining(_) => "Draining",
            State::Lingering { .. } => "Lingering",
            State::Closed(_) => "Closed",
        }
    }

    /// The one place the state changes. Nothing leaves `Closed`: a close decided earlier in
    /// the turn (a failed read or write, a limit) stands, whatever a later step of the same
    /// turn would make of the connection.
    fn set_state(&mut self, next: State) {
        if !matches!(self.state, State::Closed(_)) {
            self.state = next;
        }
    }

    /// Whether, in a place kept for neighbours, it is a stranger who can be made to give the
    /// place up: it has not proved itself a neighbour. It is silent; or it spoke, was told the
    /// server is busy, and is closing; or it greeted as a neighbour and has not answered the
    /// challenge yet. Anyone can send a greeting, so a claim not yet proved holds no place
    /// against a newcomer: a real neighbour proves itself within a round trip, and so is among
    /// the newest, which are evicted last.
    pub fn is_stranger(&self) -> bool {
        !matches!(self.state, State::Peer { .. })
    }

    /// The bytes of replies it is owed: in the output, and made but held in line behind a
    /// Places answer. Back-pressure and the output caps count both: a client that asks one
    /// slow WHATSAT and then pipelines without reading is held at the mark all the same.
    fn owed(&self) -> usize {
        self.wire.out.pending() + self.replies.held_bytes()
    }

    /// Whether its lines are read and run: before it drains, lingers, closes or is handed over.
    fn running(&self) -> bool {
        matches!(
            self.state,
            State::Undecided { .. } | State::Client | State::Challenged { .. }
        )
    }

    /// Reads what arrived and runs its whole lines, as far as its share of the turn, its
    /// unread replies and its replies waiting on Places allow. With [`Readiness::HELD`] it runs
    /// what it already holds (and reads again if it had stopped reading with bytes left).
    ///
    /// Called by the loop on the connection's events, and without one when what held it back
    /// has gone: the next turn ([`Served::More`]), a write that brought its replies under the
    /// mark ([`Flushed::Resume`]), a Places answer. Unless it returns [`Served::More`], nothing
    /// it leaves needs the next turn: new bytes raise an event, and lines held by the mark or
    /// by Places are released by `flush` or by the answer.
    pub fn serve(
        &mut self,
        ready: Readiness,
        scratch: &mut [u8],
        herd: &mut Herd,
        slot: usize,
    ) -> Served {
        let (now, turn) = (herd.now, herd.turn);
        let Readiness { readable, hangup } = ready;
        // A new turn: a fresh share. 0 in the configuration means no limit.
        if self.share.turn != turn {
            let Turn { lines, read_bytes } = herd.limits.turn;
            self.share = Share {
                turn,
                lines: if lines == 0 { usize::MAX } else { lines },
                read_bytes: if read_bytes == 0 {
                    usize::MAX
                } else {
                    read_bytes
                },
            };
        }
        if let State::Lingering { .. } = self.state {
            return self.drop_input(scratch, hangup);
        }
        // Draining, handed over, or closed: its input is no longer read (a draining
        // connection's bytes wait in the kernel until it lingers or closes).
        if !self.running() {
            return Served::Done;
        }
        // Whatever held its lines back is asked again below.
        self.held = None;
        // Replies the kernel still holds count as unread too; it is asked only when the last
        // write could not take everything (a write that took everything left the kernel less
        // than the send buffer, which is kept under the mark: see `crate::server`).
        let in_kernel = match self.wire.out.pending() {
            0 => 0,
            _ => self.wire.stream.queued().unwrap_or(0),
        };
        // Read on an event, and without one when the last fill stopped at the high-water mark
        // with bytes left in the socket: no event will come for those.
        let mut read = readable || hangup || self.wire.reader.is_full();
        loop {
            let fill = match read && self.share.read_bytes > 0 {
                true => {
                    // Read no more than the share allows, nor past the high-water mark.
                    let before = self.wire.reader.buffered();
                    let high = before
                        .saturating_add(self.share.read_bytes)
                        .min(INPUT_HIGH_WATER);
                    let fill =
                        (self.wire.reader).fill(&mut self.wire.stream, scratch, high, hangup);
                    let taken = self.wire.reader.buffered().saturating_sub(before);
                    self.share.read_bytes = self.share.read_bytes.saturating_sub(taken);
                    if taken > 0 {
                        self.heard = now;
                        trace_loop!("  c{} read {taken} bytes", self.id);
                    }
                    fill
                }
                false => Ok(Fill::Drained),
            };
            // Lines run between reads, and a read follows only when running lines made room:
            // the input of a connection held back stops at the high-water mark, and the rest
            // waits in the kernel.
            let before = self.wire.reader.buffered();
            self.run_lines(now, herd, slot, in_kernel);
            match fill {
                // Handling made room: the socket may hold more, and will not say so again.
                Ok(Fill::Full) if self.wire.reader.buffered() < before && self.running() => {
                    read = true
                }
                Ok(_) => break,
                Err(e) => {
                    self.set_state(State::Closed(CloseReason::ReadFailed(e.to_string())));
                    break;
                }
            }
        }
        // The client half-closed and every line it sent has run: the replies owed go out,
        // then it closes (docs/protocol.md section 2).
        if self.wire.reader.at_eof() && self.wire.reader.buffered() == 0 && self.running() {
            self.set_state(State::Draining(CloseReason::EndOfStream));
        }
        // The line deadline runs from the first byte of a line whose end has not come.
        self.line_began = match self.wire.reader.waiting_for_newline() {
            true => self.line_began.or(Some(now)),
            false => None,
        };
        self.wire.reader.compact();
        // Again next turn only for what no event will bring back: a line held by the share,
        // or bytes left in the socket when the read share ran out. Lines held by the output
        // mark or by Places wait for `flush` or a Places answer, after which the loop serves
        // the connection again.
        // Not when the output mark or Places holds it: serving it next turn would find it
        // held still, and the loop would turn at once, again and again, until the client read.
        let unread_input = self.wire.reader.is_full() && self.share.read_bytes == 0;
        match self.held {
            Some(Held::Turn) => Served::More,
            Some(Held::Output | Held::Places) => Served::Done,
            None if unread_input && self.running() => Served::More,
            None => Served::Done,
        }
    }

    /// Runs the whole lines it holds until one of the three things that hold them back, or
    /// until a line changes what the connection is (a greeting, a close). The checks come
    /// before each line, so a line is taken from the reader only when it can run.
    fn run_lines(&mut self, now: Instant, herd: &mut Herd, slot: usize, in_kernel: usize) {
        let mark = herd.output_high_water();
        // Names this connection to the Places pool: the slot finds it, the id tells it from a
        // later connection in the same slot.
        let owner = Owner { slot, id: self.id };
        while self.running() {
            // `pending_replies` WHATSATs waiting: the next Places answer releases it.
            if self.replies.waiting() >= herd.limits.pending_replies {
                self.held = Some(Held::Places);
                return;
            }
            // Unread replies at the mark (back-pressure, asyncio's `drain()`): the end of a
            // turn that writes them under it releases it. `in_kernel` is measured once per
            // serve: nothing is written to the client before the end of the turn, so the
            // kernel's part can only shrink meanwhile.
            if self.owed() + in_kernel >= mark {
                self.held = Some(Held::Output);
                return;
            }
            if self.share.lines == 0 {
                // Only when a line is there to run: an empty buffer holds nothing back.
                if self.wire.reader.has_line() {
                    self.held = Some(Held::Turn);
                }
                return;
            }
            // A neighbour in its handshake gets the handshake's short limit
            // (docs/protocol.md section 5); before its first line a connection may be a
            // client, and gets a client's.
            let max_line = match self.state {
                State::Challenged { .. } => peer::MAX_HANDSHAKE_BYTES,
                _ => herd.limits.max_line_bytes,
            };
            let next = match self.wire.reader.next_line(max_line) {
                None => return,
                // The rest of the line would read as lines of its own: nothing more is run.
                // A client is told where its line went wrong; a neighbour in its handshake is
                // told nothing.
                Some(Line::TooLong(prefix)) => {
                    herd.log.bytes(Who::Conn(self.id), '<', prefix);
                    if !matches!(self.state, State::Challenged { .. }) {
                        let mut reply = b"? ".to_vec();
                        reply.extend_from_slice(prefix);
                        reply.extend_from_slice(
                            format!("... (line longer than {max_line} bytes)\n").as_bytes(),
                        );
                        herd.log.bytes(Who::Conn(self.id), '>', &reply);
                        self.replies.push(&mut self.wire.out, &reply);
                    }
                    State::Draining(CloseReason::LineTooLong(max_line))
                }
                Some(Line::Complete(line)) => {
                    self.share.lines -= 1;
                    match &self.state {
                        State::Undecided { peers_only, .. } => {
                            match greeting(self.id, now, herd, line) {
                                // A neighbour. Nothing is queued before a first line, so the
                                // challenge goes straight to the output. Once it is a `Peer`,
                                // the loop stops: the lines after the greeting stay in the
                                // reader, for the inbound link to read under its own share
                                // and session.
                                Some(Ok(Greeted { next, challenge })) => {
                                    if let Some(challenge) = challenge {
                                        self.wire.out.push(&challenge);
                                    }
                                    next
                                }
                                // A neighbour's greeting that cannot be accepted: closed at once,
                                // with no `?` (it is owed no reply).
                                Some(Err(why)) => {
                                    herd.log
                                        .event(format_args!("c{}", self.id), format_args!("{why}"));
                                    State::Closed(why)
                                }
                                // Blank lines leave the question open; anything else makes a
                                // client.
                                None if line.iter().all(|&b| protocol::is_space(b)) => {
                                    continue;
                                }
                                // A place kept for neighbours, taken by a client: the server is
                                // full.
                                None if *peers_only => {
                                    herd.log.bytes(Who::Conn(self.id), '<', line);
                                    herd.log.bytes(Who::Conn(self.id), '>', protocol::BUSY);
                                    self.replies.push(&mut self.wire.out, protocol::BUSY);
                                    State::Draining(CloseReason::Busy)
                                }
                                None => {
                                    let answer = herd.command(self.id, owner, self.addr.ip(), line);
                                    self.replies.answer(&mut self.wire.out, answer)
                                }
                            }
                        }
                        // A command: its answer, now or later, takes its place in line.
                        State::Client => {
                            let answer = herd.command(self.id, owner, self.addr.ip(), line);
                            self.replies.answer(&mut self.wire.out, answer)
                        }
                        // The line after our challenge must be the neighbour's proof.
                        State::Challenged {
                            neighbour, nd, na, ..
                        } => match proof(
                            self.id,
                            now,
                            herd,
                            *neighbour,
                            nd,
                            na,
                            line,
                            &mut self.wire.out,
                        ) {
                            Ok(next) => next,
                            Err(why) => {
                                herd.log
                                    .event(format_args!("c{}", self.id), format_args!("{why}"));
                                State::Closed(why)
                            }
                        },
                        // Not reached: the loop runs only while the connection runs.
                        _ => return,
                    }
                }
            };
            self.set_state(next);
        }
    }

    /// Reads and drops what a lingering connection still sends; closes it at its end. Its
    /// reads count against its share of the turn like any other, so a client that keeps
    /// sending while it lingers takes no more of the loop than one that is served.
    fn drop_input(&mut self, scratch: &mut [u8], hangup: bool) -> Served {
        let State::Lingering { reason, .. } = &self.state else {
            return Served::Done;
        };
        let reason = reason.clone();
        let before = self.wire.reader.buffered();
        let high = before.saturating_add(self.share.read_bytes);
        let fill = (self.wire.reader).fill(&mut self.wire.stream, scratch, high, hangup);
        let taken = self.wire.reader.buffered() - before;
        self.share.read_bytes = self.share.read_bytes.saturating_sub(taken);
        self.lingered += taken;
        self.wire.reader.discard();
        match fill {
            // The client closed its side too, so nothing unread is left to cause a reset; or
            // the read failed.
            Ok(Fill::Eof) | Err(_) => self.set_state(State::Closed(reason)),
            // It sends more than a client reading its answer would: stop waiting.
            _ if self.lingered >= LINGER_BYTES => self.set_state(State::Closed(reason)),
            // The share ran out with bytes left in the socket: no event will come for them.
            Ok(Fill::Full) => return Served::More,
            // Emptied: the next bytes, or the end of the stream, raise an event.
            Ok(Fill::Drained) => {}
        }
        Served::Done
    }

    /// Places answered job `job`: its reply takes its place in line, and every reply now at
    /// the head goes out. The loop serves the connection next: lines may wait behind it.
    pub fn deliver(&mut self, job: u64, reply: Vec<u8>) {
        self.replies.complete(&mut self.wire.out, job, reply);
    }

    /// The end of the turn: writes what is pending and decides what becomes of the connection.
    /// Called by the loop for every connection that ran or timed out in the turn, after the
    /// links and the store's file have written; `mark` is the output high-water mark.
    pub fn flush(&mut self, now: Instant, limits: &Limits, mark: usize) -> Flushed {
        // Closed during the turn: nothing more is written; the loop frees it.
        if let State::Closed(reason) = &self.state {
            return Flushed::Closed(reason.clone());
        }
        // A proved neighbour: its wire, with our `PROOF` unwritten if there is a secret, goes
        // whole to the inbound link, which writes it at once.
        if let State::Peer { .. } = self.state {
            return Flushed::Peer;
        }
        if trace::enabled() {
            trace_lines(&format!("c{}", self.id), '>', self.wire.out.unsent());
        }
        let owed = self.wire.out.pending();
        if let Err(e) = self.wire.out.write_to(&mut self.wire.stream) {
            self.set_state(State::Closed(CloseReason::WriteFailed(e.to_string())));
        }
        // A draining connection reads nothing more: what it takes of its replies is how it is
        // heard from (see `on_timeout`).
        if matches!(self.state, State::Draining(_)) && self.wire.out.pending() < owed {
            self.heard = now;
        }
        // Over the hard cap: closed at once, whatever is still owed. The mark stops its
        // commands long before; what passes the cap is mostly WHATSATs' answers, which come
        // whatever the mark.
        let pending = self.wire.out.pending();
        let owed = self.owed();
        if owed > limits.client_output_bytes {
            let cap = CloseReason::OutputCap(limits.client_output_bytes);
            self.set_state(State::Closed(cap));
        }
        // Over the soft limit: `on_timeout` closes it if it stays over for
        // `client_output_soft_time`.
        self.unread_since = match owed > limits.client_output_soft_bytes {
            true => self.unread_since.or(Some(now)),
            false => None,
        };
        // Everything owed is written: linger if it was closed for a broken limit (see
        // `LINGER`), and close at once if not, or if the write side will not shut.
        if let State::Draining(reason) = &self.state {
            if self.replies.is_empty() && pending == 0 {
                let reason = reason.clone();
                match reason.lingers() && self.wire.stream.shutdown_write().is_ok() {
                    true => self.set_state(State::Lingering {
                        reason,
                        until: now + LINGER,
                    }),
                    false => self.set_state(State::Closed(reason)),
                }
            }
        }
        match &self.state {
            State::Closed(reason) => Flushed::Closed(reason.clone()),
            // Lines wait behind the mark: if this write brought the unread replies (here and in
            // the kernel, asked only after a short write) under it, they may run now, and no
            // event will come for bytes already read.
            _ if self.held == Some(Held::Output) => {
                let in_kernel = match pending {
                    0 => 0,
                    _ => self.wire.stream.queued().unwrap_or(0),
                };
                match owed + in_kernel < mark {
                    true => Flushed::Resume,
                    false => Flushed::Open,
                }
            }
            _ => Flushed::Open,
        }
    }

    /// The loop's once-a-second sweep: closes the connection if a deadline of its state has
    /// passed (a line not finished in time, replies left unread over the soft limit too long,
    /// a client idle with nothing pending, a neighbour not proved in time, a linger over).
    /// Safe to call when none has. Returns whether it closed.
    pub fn on_timeout(&mut self, now: Instant, limits: &Limits) -> bool {
        let past = |since: Option<Instant>, limit: Duration| {
            since.is_some_and(|at| now.saturating_duration_since(at) >= limit)
        };
        let quiet = now.saturating_duration_since(self.heard);
        let idle = limits.idle_timeout;
        // The arms are tried in order, and the first deadline passed names the reason: the
        // soft output limit and the line timeout apply in every state below them.
        let why = match &self.state {
            // Closed already; or handed over at the end of this turn, with the inbound link's
            // deadlines from then on.
            State::Closed(_) | State::Peer { .. } => None,
            State::Lingering { reason, until } => (*until <= now).then(|| reason.clone()),
            _ if past(self.unread_since, limits.client_output_soft_time) => {
                Some(CloseReason::Unread {
                    bytes: limits.client_output_soft_bytes,
                    time: limits.client_output_soft_time,
                })
            }
            State::Challenged { until, .. } => {
                (*until <= now).then_some(CloseReason::NotAuthenticated(peer::HANDSHAKE_TIMEOUT))
            }
            _ if past(self.line_began, limits.line_timeout) => {
                Some(CloseReason::LineTimeout(limits.line_timeout))
            }
            State::Undecided { until, .. } => {
                (*until <= now).then_some(CloseReason::NoFirstLine(limits.first_line_timeout))
            }
            // Not while a WHATSAT is out: the client is waiting on us, not idle.
            State::Client => (!idle.is_zero() && quiet >= idle && self.replies.is_empty())
                .then_some(CloseReason::Idle(idle)),
            // It waits until its replies are made (Places answers every job by its deadline)
            // and taken by the kernel, which a client that does not read may never allow: once
            // all are made, it closes when the kernel has taken none of them for the soft
            // limit's time (`heard`: its last command, or the last write that took some).
            // Without this, a client that stops reading with less than the soft limit unread
            // would hold its place for ever.
            State::Draining(_) => (self.replies.is_empty()
                && quiet >= limits.client_output_soft_time)
                .then_some(CloseReason::Undelivered(limits.client_output_soft_time)),
        };
        match why {
            Some(why) => {
                self.set_state(State::Closed(why));
                true
            }
            None => false,
        }
    }

    /// A proved neighbour's connection, taken apart for its inbound link: which neighbour, its
    /// session, and the socket with what was read after the proof and what waits to be written.
    pub fn into_peer(self) -> Option<(usize, Option<Session>, Wire<S>)> {
        match self.state {
            State::Peer { neighbour, session } => Some((neighbour, session, self.wire)),
            _ => None,
        }
    }
}

/// What a neighbour's greeting made of a connection, and the challenge to send, if any.
struct Greeted {
    next: State,
    challenge: Option<Vec<u8>>,
}

/// The first line of a connection, if it is a neighbour's greeting: without a herd secret the
/// connection is that neighbour's link at once; with one, it is challenged. `None` when the
/// line is not a neighbour's greeting (then it is a client's command, and a greeting that names
/// a server that is no neighbour is a client sending a peer's line: answered with a `?` line and
/// closed).
fn greeting(
    id: u64,
    now: Instant,
    herd: &mut Herd,
    line: &[u8],
) -> Option<Result<Greeted, CloseReason>> {
    let greeting = peer::parse_greeting(line)?;
    let neighbour = herd.neighbour(greeting.name)?;
    // Logged here: a greeting never reaches `Herd::command`, which logs a client's lines.
    herd.log.bytes(Who::Conn(id), '<', line);
    trace_loop!("  c{id} < {}", trace::shown(line));
    let name = herd.links[neighbour].name.clone();
    // Both ends must agree on whether the herd has a secret.
    Some(match (&herd.secret, greeting.nonce) {
        // No secret: the greeting alone names the neighbour.
        (None, None) => {
            herd.log
                .event(format_args!("c{id}"), format_args!("is peer {name}"));
            // The neighbour is up: our own link to it, if waiting to redial, dials in this turn.
            herd.links[neighbour].on_neighbour_greeted(now, &mut herd.log);
            Ok(Greeted {
                next: State::Peer {
                    neighbour,
                    session: None,
                },
                challenge: None,
            })
        }
        (Some(_), Some(nd)) => {
            let Some(na): Option<Vec<u8>> = peer::nonce() else {
                return Some(Err(CloseReason::Handshake(
                    "no randomness for a nonce".into(),
                )));
            };
            // Only a nonce: nothing that depends on the secret goes to a connection that has
            // not proved it knows the secret (docs/protocol.md section 5).
            let mut challenge = [&b"CHALLENGE "[..], &na].concat();
            herd.log.bytes(Who::Conn(id), '>', &challenge);
            challenge.push(b'\n');
            Ok(Greeted {
                next: State::Challenged {
                    neighbour,
                    nd: nd.to_vec(),
                    na,
                    until: now + peer::HANDSHAKE_TIMEOUT,
                },
                challenge: Some(challenge),
            })
        }
        (Some(_), None) => Err(CloseReason::Handshake(format!(
            "{name} greeted without authenticating, but this herd has a secret"
        ))),
        (None, Some(_)) => Err(CloseReason::Handshake(format!(
            "{name} wants to authenticate, but this server has no herd secret"
        ))),
    })
}

/// The line after our challenge: the neighbour's proof that it knows the secret. A good one is
/// answered with ours, written into `out`; neither is logged. We prove ourselves second, so a
/// connection that does not know the secret never gets a proof from us to study.
#[allow(clippy::too_many_arguments)]
fn proof(
    id: u64,
    now: Instant,
    herd: &mut Herd,
    neighbour: usize,
    nd: &[u8],
    na: &[u8],
    line: &[u8],
    out: &mut OutBuf,
) -> Result<State, CloseReason> {
    let Some(secret) = &herd.secret else {
        return Err(CloseReason::Handshake("no challenge to answer".into()));
    };
    let name = herd.links[neighbour].name.clone();
    let valid = peer::parse_proof(line).is_some_and(|proof| {
        secret.verify(
            proof,
            b"dial",
            name.as_bytes(),
            herd.name.as_bytes(),
            nd,
            na,
        )
    });
    if !valid {
        return Err(CloseReason::Handshake(format!(
            "{name} failed to prove it knows the herd secret"
        )));
    }
    // `false`: this end is the acceptor, and signs its lines as such.
    let session = Session::new(secret, nd, na, false);
    let ours = secret.proof(b"accept", name.as_bytes(), herd.name.as_bytes(), nd, na);
    out.push(&[&b"PROOF "[..], &ours, b"\n"].concat());
    herd.log.event(
        format_args!("c{id}"),
        format_args!("is peer {name}, authenticated"),
    );
    herd.links[neighbour].on_neighbour_greeted(now, &mut herd.log);
    Ok(State::Peer {
        neighbour,
        session: Some(session),
    })
}

/// Replies in the order their commands arrived. While nothing waits on Places a reply goes
/// straight to the output; behind a waiting WHATSAT it queues until the WHATSAT is answered.
/// Answers from Places come back in any order; clients read replies in command order
/// (docs/protocol.md section 2).
#[derive(Debug, Default)]
pub struct Replies {
    /// Replies not yet in the output: the first is always one awaiting Places.
    queue: VecDeque<Reply>,
    /// How many of them await Places, for the `pending_replies` limit.
    waiting: usize,
    /// The bytes of the ready replies in `queue` (those made while a Places answer ahead of
    /// them waits, and answers that came before one ahead of them): owed to the client as much
    /// as those in the output, and counted with them against the mark and the caps.
    held_bytes: usize,
}

/// One reply held in line.
#[derive(Debug)]
enum Reply {
    /// Made, waiting for the replies ahead of it.
    Ready(Vec<u8>),
    /// Holds the place of the answer to a Places job, by its number.
    AwaitingPlaces(u64),
}

impl Replies {
    /// A reply made now: to the output at once if nothing waits ahead of it, else in line.
    pub fn push(&mut self, out: &mut OutBuf, bytes: &[u8]) {
        if self.queue.is_empty() {
            out.push(bytes);
        } else {
            self.held_bytes += bytes.len();
            self.queue.push_back(Reply::Ready(bytes.to_vec()));
        }
    }

    /// Holds the place of the reply to Places job `job`.
    pub fn push_awaiting(&mut self, job: u64) {
        self.queue.push_back(Reply::AwaitingPlaces(job));
        self.waiting += 1;
    }

    /// Takes a command's answer in line; returns the state it leaves a client in.
    fn answer(&mut self, out: &mut OutBuf, answer: Answer) -> State {
        match answer {
            Answer::Nothing => State::Client,
            Answer::Now(reply) => {
                self.push(out, reply);
                State::Client
            }
            Answer::Later(job) => {
                self.push_awaiting(job);
                State::Client
            }
            // Answered like any invalid command, then disconnected.
            Answer::Forged(reply) => {
                self.push(out, reply);
                State::Draining(CloseReason::PeerLineFromClient)
            }
        }
    }

    /// Fills in job `job`'s reply and releases every reply now at the head of the line.
    pub fn complete(&mut self, out: &mut OutBuf, job: u64, bytes: Vec<u8>) {
        // Job numbers are unique: the first match is the only one.
        for reply in self.queue.iter_mut() {
            if matches!(reply, Reply::AwaitingPlaces(j) if *j == job) {
                self.held_bytes += bytes.len();
                *reply = Reply::Ready(bytes);
                self.waiting -= 1;
                break;
            }
        }
        while let Some(Reply::Ready(_)) = self.queue.front() {
            if let Some(Reply::Ready(bytes)) = self.queue.pop_front() {
                self.held_bytes -= bytes.len();
                out.push(&bytes);
            }
        }
    }

    /// The bytes of the replies made and held in line behind a Places answer.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Replies still waiting on Places.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Whether no reply is held in line. Replies already in the output do not count: ask
    /// the output for those.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    //! The machine driven with scripted sockets and an explicit `now`: each test is a state and
    //! an event, and says what the connection does and becomes.

    use super::*;
    use crate::link::Link;
    use crate::log::Log;
    use crate::peer::Secret;
    use crate::wire::script::{Script, Step};

    const SCRATCH: usize = 64 * 1024;

    /// A lone server called `Test`, whose clock reads 100 s past the epoch, with neighbour
    /// `Bona` and `secret`, if given.
    fn herd(secret: Option<&str>) -> Herd {
        let now = Instant::now();
        let bona = Link::new("Bona".into(), SocketAddr::from(([127, 0, 0, 1], 9)), now);
        let secret = secret.map(|s| Secret::new(s.as_bytes()));
        let mut herd = Herd::new(
            "Test".into(),
            secret,
            vec![bona],
            None,
            Log::discard(),
            Limits::default(),
            now,
        );
        herd.now_ns = 100_000_000_000;
        herd.turn = 1;
        herd
    }

    fn conn(steps: &[Step]) -> Conn<Script> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 40000));
        let now = Instant::now();
        let first_line = Limits::default().first_line_timeout;
        Conn::new(
            7,
            Script::reading(steps),
            addr,
            now,
            now + first_line,
            false,
        )
    }

    /// A connection in one of the places kept for neighbours.
    fn reserved(steps: &[Step]) -> Conn<Script> {
        let addr = SocketAddr::from(([127, 0, 0, 1], 40001));
        let now = Instant::now();
        let first_line = Limits::default().first_line_timeout;
        Conn::new(8, Script::reading(steps), addr, now, now + first_line, true)
    }

    /// A hundred IAMATs for as many clients, each reply as long as the others.
    fn hundred_iamats() -> String {
        (0..100)
            .map(|i| format!("IAMAT c{i:02} +1+1 100\n"))
            .collect()
    }

    fn data(bytes: &str) -> Step {
        Step::Data(bytes.as_bytes().to_vec())
    }

    /// Serves once as if the socket were readable.
    fn serve(c: &mut Conn<Script>, herd: &mut Herd) -> Served {
        let ready = Readiness {
            readable: true,
            hangup: false,
        };
        c.serve(ready, &mut vec![0; SCRATCH], herd, 0)
    }

    /// Serves once as if the other end had sent its last bytes and closed its side.
    fn serve_hangup(c: &mut Conn<Script>, herd: &mut Herd) -> Served {
        let ready = Readiness {
            readable: true,
            hangup: true,
        };
        c.serve(ready, &mut vec![0; SCRATCH], herd, 0)
    }

    fn flush(c: &mut Conn<Script>, herd: &Herd) -> Flushed {
        c.flush(herd.now, &herd.limits, herd.output_high_water())
    }

    fn written(c: &Conn<Script>) -> String {
        String::from_utf8_lossy(&c.wire.stream.output).into_owned()
    }

    fn next_turn(herd: &mut Herd) {
        herd.turn += 1;
    }

    #[test]
    fn undecided_with_a_command_becomes_a_client_and_is_answered_at_the_turns_end() {
        let mut herd = herd(None);
        let mut c = conn(&[data("IAMAT kiwi +1+1 99.5\n")]);
        assert_eq!(serve(&mut c, &mut herd), Served::Done);
        assert_eq!(c.state_name(), "Client");
        assert_eq!(written(&c), "", "replies wait for the end of the turn");
        assert_eq!(flush(&mut c, &herd), Flushed::Open);
        assert_eq!(written(&c), "AT Test +0.500000000 kiwi +1+1 99.5\n");
    }

    #[test]
    fn undecided_with_blank_lines_stays_undecided() {
        let mut herd = herd(None);
        let mut c = conn(&[data("\n \t\n")]);
        let _ = serve(&mut c, &mut herd);
        assert_eq!(c.state_name(), "Undecided");
        let _ = flush(&mut c, &herd);
        assert_eq!(written(&c), "");
    }

    #[test]
    fn undecided_without_a_first_line_in_time_is_closed() {
        let herd = herd(None);
        let limits = herd.limits.clone();
        // Blank lines are no first line.
        let mut c = conn(&[data("\n\n")]);
        let mut h = herd;
        let _ = serve(&mut c, &mut h);
        let deadline = h.now + limits.first_line_timeout;
        assert!(!c.on_timeout(deadline - Duration::from_millis(1), &limits));
        assert!(c.on_timeout(deadline + Duration::from_millis(1), &limits));
        let why = CloseReason::NoFirstLine(limits.first_line_timeout);
        assert_eq!(flush(&mut c, &h), Flushed::Closed(why));
    }

    #[test]
    fn a_place_kept_for_neighbours_takes_a_greeting_and_turns_a_client_away() {
        let mut herd = herd(None);
        let mut client = reserved(&[data("IAMAT kiwi +1+1 100\n")]);
        let _ = serve(&mut client, &mut herd);
        let _ = flush(&mut client, &herd);
        assert_eq!(written(&client), "? server busy\n");
        assert_eq!(
            client.state_name(),
            "Lingering",
            "told, then closed without a reset"
        );
        assert!(herd.store.is_empty(), "its command was not run");
        let mut neighbour = reserved(&[data("PEER herd/1 Bona\n")]);
        let _ = serve(&mut neighbour, &mut herd);
        assert_eq!(neighbour.state_name(), "Peer");
    }

    #[test]
    fn client_with_an_invalid_line_is_answered_with_a_question_mark() {
        let mut herd = herd(None);
        let mut c = conn(&[data("hello there\r\n")]);
        let _ = serve(&mut c, &mut herd);
        let _ = flush(&mut c, &herd);
        assert_eq!(written(&c), "? hello there\r\n");
        assert_eq!(c.state_name(), "Client");
    }

    #[test]
    fn client_at_the_end_of_its_stream_drains_then_closes() {
        let mut herd = herd(None);
        let mut c = conn(&[data("IAMAT kiwi +1+1 100"), Step::Eof]);
        let _ = serve_hangup(&mut c, &mut herd);
        assert_eq!(
            c.state_name(),
            "Draining",
            "a last line without \\n still runs"
        );
        assert_eq!(
            flush(&mut c, &herd),
            Flushed::Closed(CloseReason::EndOfStream)
        );
        assert_eq!(written(&c), "AT Test +0.000000000 kiwi +1+1 100\n");
    }

    #[test]
    fn draining_with_replies_the_client_takes_none_of_is_closed_after_the_soft_limits_time() {
        let mut herd = herd(None);
        let mut c = conn(&[data("IAMAT kiwi +1+1 100"), Step::Eof]);
        c.wire.stream.room = Some(10);
        let _ = serve_hangup(&mut c, &mut herd);
        let limits = herd.limits.clone();
        let soft = limits.client_output_soft_time;
        let t0 = herd.now;
        assert_eq!(flush(&mut c, &herd), Flushed::Open);
        assert_eq!(written(&c), "AT Test +0");
        // Taking some of its replies counts as being heard from: the wait starts again.
        herd.now = t0 + soft / 2;
        c.wire.stream.room = Some(10);
        assert_eq!(flush(&mut c, &herd), Flushed::Open);
        assert!(
            !c.on_timeout(t0 + soft, &limits),
            "it took some at soft / 2"
        );
        assert!(c.on_timeout(t0 + soft / 2 + soft, &limits));
        let undelivered = CloseReason::Undelivered(soft);
        assert_eq!(flush(&mut c, &herd), Flushed::Closed(undelivered));
    }

    #[test]
    fn client_with_an_overlong_line_is_told_then_lingers_until_its_input_ends() {
        let mut herd = herd(None);
        herd.limits.max_line_bytes = 64;
        let mut c = conn(&[data(&"x".repeat(100)), data("\nmore input")]);
        let _ = serve(&mut c, &mut herd);
        assert_eq!(c.state_name(), "Draining");
        assert_eq!(flush(&mut c, &herd), Flushed::Open);
        let told = format!("? {}... (line longer than 64 bytes)\n", "x".repeat(64));
        assert_eq!(written(&c), told);
        assert_eq!(c.state_name(), "Lingering");
        assert!(c.wire.stream.write_shut.get(), "the write side is shut");
        // What it still sends is read and dropped, and its end closes it.
        c.wire.stream.input.push_back(data("and more\n"));
        c.wire.stream.input.push_back(Step::Eof);
        next_turn(&mut herd);
        let _ = serve_hangup(&mut c, &mut herd);
        assert_eq!(
            flush(&mut c, &herd),
            Flushed::Closed(CloseReason::LineTooLong(64))
        );
        assert_eq!(written(&c), told, "nothing more is written");
    }

    #[test]
    fn lingering_ends_at_its_deadline() {
        let mut herd = herd(None);
        let mut c = conn(&[data("AT forged\n")]);
        let _ = serve(&mut c, &mut herd);
        let _ = flush(&mut c, &herd);
        assert_eq!(written(&c), "? AT forged\n");
        assert_eq!(c.state_name(), "Lingering");
        let limits = herd.limits.clone();
        assert!(!c.on_timeout(herd.now + LINGER / 2, &limits));
        assert!(c.on_timeout(herd.now + LINGER, &limits));
        assert_eq!(
            flush(&mut c, &herd),
            Flushed::Closed(CloseReason::PeerLineFromClient)
        );
    }

    #[test]
    fn client_whose_share_of_the_turn_is_spent_is_served_again_with_no_new_event() {
        let mut herd = herd(None);
        herd.limits.turn.lines = 2;
        let five: String = (0..5).map(|i| format!("IAMAT c{i} +1+1 100\n")).collect();
        // All five lines arrive at once; the script has nothing more to give.
        let mut c = conn(&[data(&five)]);
        assert_eq!(serve(&mut c, &mut herd), Served::More);
        let _ = flush(&mut c, &herd);
        assert_eq!(written(&c).lines().count(), 2);
        // A second serve in the same turn gets no more.
        assert_eq!(
            c.serve(Readiness::HELD, &mut [0; 8], &mut herd, 0),
            Served::More
        );
        assert_eq!(written(&c).lines().count(), 2);
        next_turn(&mut herd);
        assert_eq!(
            c.serve(Readiness::HELD, &mut [0; 8], &mut herd, 0),
            Served::More
        );
        let _ = flush(&mut c, &herd);
        assert_eq!(written(&c).lines().count(), 4);
        next_turn(&mut herd);
        assert_eq!(
            c.serve(Readiness::HELD, &mut [0; 8], &mut herd, 0),
            Served::Done
        );
        let _ = flush(&mut c, &herd);
        assert_eq!(written(&c).lines().count(), 5);
    }

    #[test]
    fn client_whose_read_share_is_spent_reads_the_rest_next_turn() {
        let mut herd = herd(None);
        herd.limits.turn.read_bytes = 16;
        let line = "IAMAT kiwi +1+1 100\n";
        let mut c = conn(&[data(&line.repeat(3))]);
        // A read takes what fits in the scratch buffer: 16 bytes, the turn's share.
        let ready = Readiness {
            readable: true,
            hangup: false,
        };
        assert_eq!(c.serve(ready, &mut [0; 16], &mut herd, 0), Served::More);
        assert_eq!(written(&c), "");
        for _ in 0..8 {
            next_turn(&mut herd);
            let _ = c.serve(Readiness::HELD, &mut [0; 16], &mut herd, 0);
        }
        let _ = flush(&mut c, &herd);
        assert_eq!(written(&c).lines().count(), 3);
    }

    #[test]
    fn client_at_the_high_water_mark_runs_no_more_until_its_replies_go_out() {
        let mut herd = herd(None);
        herd.limits.client_output_bytes = 4096; // a mark of 1 KiB
        let mut c = conn(&[data(&hundred_iamats())]);
        c.wire.stream.room = Some(0); // the kernel takes nothing
        let _ = serve(&mut c, &mut herd);
        let reply_len = "AT Test +0.000000000 c00 +1+1 100\n".len();
        let ran = c.wire.out.pending() / reply_len;
        assert_eq!(
            ran,
            1024_usize.div_ceil(reply_len),
            "lines run up to the mark"
        );
        assert_eq!(flush(&mut c, &herd), Flushed::Open, "nothing went out");
        // The kernel takes it all and holds it: it still counts as unread.
        c.wire.stream.room = None;
        c.wire.stream.queued = 0;
        assert_eq!(flush(&mut c, &herd), Flushed::Resume);
        next_turn(&mut herd);
        let _ = c.serve(Readiness::HELD, &mut [0; 8], &mut herd, 0);
        assert_eq!(
            c.wire.out.pending() / reply_len,
            ran,
            "the next mark's worth"
        );
        c.wire.stream.room = Some(0);
        c.wire.stream.queued = 1024;
        // What the kernel holds is asked only when a write was short; with a full mark's worth
        // still in the kernel, nothing more runs.
        assert_eq!(flush(&mut c, &herd), Flushed::Open);
        next_turn(&mut herd);
        let _ = c.serve(Readiness::HELD, &mut [0; 8], &mut herd, 0);
        assert_eq!(c.wire.out.pending() / reply_len, ran);
    }

    #[test]
    fn replies_held_behind_a_places_answer_count_against_the_mark() {
        let mut herd = herd(None);
        herd.limits.client_output_bytes = 4096; // a mark of 1 KiB
        let mut c = conn(&[data(&hundred_iamats())]);
        // A WHATSAT asked before, still waiting on Places: every reply after it is held in line.
        c.set_state(State::Client);
        c.replies.push_awaiting(7);
        let _ = serve(&mut c, &mut herd);
        let reply_len = "AT Test +0.000000000 c00 +1+1 100\n".len();
        assert_eq!(
            c.wire.out.pending(),
            0,
            "nothing can go out before the answer"
        );
        assert_eq!(
            c.replies.held_bytes() / reply_len,
            1024_usize.div_ceil(reply_len),
            "lines run up to the mark, held replies counted"
        );
        assert_eq!(flush(&mut c, &herd), Flushed::Open, "still held");
        // The answer comes: it and the replies behind it go out, and the rest may run.
        c.deliver(7, b"{}\n\n".to_vec());
        assert_eq!(c.replies.held_bytes(), 0);
        assert_eq!(flush(&mut c, &herd), Flushed::Resume);
        next_turn(&mut herd);
        let _ = c.serve(Readiness::HELD, &mut [0; 8], &mut herd, 0);
        let _ = flush(&mut c, &herd);
        assert_eq!(
            written(&c).lines().count(),
            2 + 2 * 1024_usize.div_ceil(reply_len)
        );
    }

    #[test]
    fn client_held_by_the_mark_with_input_left_waits_for_its_replies_to_go_not_the_next_turn() {
        let mut herd = herd(None);
        herd.limits.client_output_bytes = 4096; // a mark of 1 KiB
        herd.limits.turn.read_bytes = 64; // its read share spent at once, bytes left behind
        let mut c = conn(&[data(&hundred_iamats())]);
        c.wire.stream.room = Some(0); // the kernel takes nothing
                                      // Input is left in the buffer and the socket, and the share read is spent: but the
                                      // mark holds it, so the next turn would find it held still. Only its replies going out
                                      // (`Flushed::Resume`) bring it back.
        for _ in 0..20 {
            if serve(&mut c, &mut herd) == Served::Done {
                break;
            }
            next_turn(&mut herd);
        }
        assert!(c.wire.out.pending() >= 1024, "it reached the mark");
        assert_eq!(serve(&mut c, &mut herd), Served::Done);
        next_turn(&mut herd);
        assert_eq!(
            serve(&mut c, &mut herd),
            Served::Done,
            "held by the mark: not served again every turn"
        );
    }

    #[test]
    fn client_over_its_output_cap_is_closed_at_once() {
        let mut herd = herd(None);
        herd.limits.client_output_bytes = 64;
        let mut c = conn(&[data("IAMAT a +1+1 1\n")]);
        c.wire.stream.room = Some(0);
        let _ = serve(&mut c, &mut herd);
        assert_eq!(flush(&mut c, &herd), Flushed::Open, "under the cap");
        // A reply that comes later (a WHATSAT's) takes the unread replies over the cap.
        c.replies.push_awaiting(1);
        c.deliver(1, vec![b'x'; 64]);
        assert_eq!(
            flush(&mut c, &herd),
            Flushed::Closed(CloseReason::OutputCap(64))
        );
    }

    #[test]
    fn client_with_replies_unread_over_the_soft_limit_too_long_is_closed() {
        let mut herd = herd(None);
        herd.limits.client_output_soft_bytes = 10;
        let mut c = conn(&[data("IAMAT a +1+1 1\n")]);
        c.wire.stream.room = Some(0);
        let _ = serve(&mut c, &mut herd);
        let _ = flush(&mut c, &herd);
        let limits = herd.limits.clone();
        let soft = limits.client_output_soft_time;
        assert!(!c.on_timeout(herd.now + soft / 2, &limits));
        assert!(c.on_timeout(herd.now + soft, &limits));
        let unread = CloseReason::Unread {
            bytes: 10,
            time: soft,
        };
        assert_eq!(flush(&mut c, &herd), Flushed::Closed(unread));
    }

    #[test]
    fn client_with_a_line_unfinished_past_the_line_timeout_is_closed() {
        let mut herd = herd(None);
        let mut c = conn(&[data("IAMAT ki")]);
        let _ = serve(&mut c, &mut herd);
        let limits = herd.limits.clone();
        assert!(!c.on_timeout(herd.now + limits.line_timeout / 2, &limits));
        assert!(c.on_timeout(herd.now + limits.line_timeout, &limits));
        let why = CloseReason::LineTimeout(limits.line_timeout);
        assert_eq!(flush(&mut c, &herd), Flushed::Closed(why));
    }

    #[test]
    fn client_idle_with_nothing_pending_is_closed_at_the_idle_timeout() {
        let mut herd = herd(None);
        let mut c = conn(&[data("IAMAT a +1+1 1\n")]);
        let _ = serve(&mut c, &mut herd);
        let _ = flush(&mut c, &herd);
        let limits = herd.limits.clone();
        assert!(!c.on_timeout(herd.now + limits.idle_timeout / 2, &limits));
        assert!(c.on_timeout(herd.now + limits.idle_timeout, &limits));
        // With the timeout off, a client is never closed for idling.
        let mut never = limits.clone();
        never.idle_timeout = Duration::ZERO;
        let mut d = conn(&[data("IAMAT a +1+1 1\n")]);
        let _ = serve(&mut d, &mut herd);
        let _ = flush(&mut d, &herd);
        assert!(!d.on_timeout(herd.now + Duration::from_secs(1 << 20), &never));
    }

    #[test]
    fn undecided_greeted_by_a_neighbour_without_a_secret_becomes_its_peer() {
        let mut herd = herd(None);
        let mut c = conn(&[data("PEER herd/1 Bona\nAT Bona +0.000000001 k +1+1 5\n")]);
        let _ = serve(&mut c, &mut herd);
        assert_eq!(c.state_name(), "Peer");
        // The record after the greeting is the inbound link's, not run here.
        assert!(herd.store.is_empty());
        assert_eq!(flush(&mut c, &herd), Flushed::Peer);
        let (neighbour, session, mut wire) = c.into_peer().expect("a peer");
        assert_eq!((neighbour, session.is_none()), (0, true));
        match wire.reader.next_line(1024) {
            Some(Line::Complete(line)) => assert_eq!(line, b"AT Bona +0.000000001 k +1+1 5"),
            other => panic!("{other:?}"),
        }
        // The greeting made the link back to Bona due at once.
        assert_eq!(herd.links[0].deadline(), Some(herd.now));
    }

    #[test]
    fn undecided_greeted_with_a_nonce_is_challenged_and_proves_itself_only_after_a_good_proof() {
        let secret = Secret::new(b"0123456789abcdef0123");
        let mut herd = herd(Some("0123456789abcdef0123"));
        let nd = "00112233445566778899aabbccddeeff";
        let mut c = conn(&[data(&format!("PEER herd/1 Bona {nd}\n"))]);
        let _ = serve(&mut c, &mut herd);
        assert_eq!(c.state_name(), "Challenged");
        let _ = flush(&mut c, &herd);
        let challenge = written(&c);
        // A nonce, and nothing that depends on the secret.
        let na = peer::parse_challenge(challenge.trim_end().as_bytes()).expect("a challenge");
        assert_eq!(challenge.len(), "CHALLENGE \n".len() + 32);
        let mine = secret.proof(b"dial", b"Bona", b"Test", nd.as_bytes(), na);
        let proof_line = format!("PROOF {}\n", String::from_utf8_lossy(&mine));
        c.wire.stream.input.push_back(data(&proof_line));
        let _ = serve(&mut c, &mut herd);
        assert_eq!(c.state_name(), "Peer");
        let (_, session, wire) = c.into_peer().expect("a peer");
        assert!(session.is_some());
        // Its own proof waits in the output, for the inbound link to write first.
        let mut out = Vec::new();
        let mut pending = wire.out;
        pending.write_to(&mut out).expect("a Vec takes everything");
        let text = String::from_utf8_lossy(&out).into_owned();
        let theirs = peer::parse_proof(text.trim_end().as_bytes()).expect("a proof");
        assert!(secret.verify(theirs, b"accept", b"Bona", b"Test", nd.as_bytes(), na));
    }

    #[test]
    fn challenged_with_a_wrong_proof_or_none_in_time_is_closed() {
        let mut herd = herd(Some("0123456789abcdef0123"));
        let nd = "00112233445566778899aabbccddeeff";
        let greeting = format!("PEER herd/1 Bona {nd}\n");
        let wrong = format!("PROOF {}\n", "ab".repeat(32));
        let mut c = conn(&[data(&greeting), data(&wrong)]);
        let _ = serve(&mut c, &mut herd);
        assert_eq!(c.state_name(), "Challenged");
        let _ = serve(&mut c, &mut herd);
        let why = CloseReason::Handshake("Bona failed to prove it knows the herd secret".into());
        assert_eq!(flush(&mut c, &herd), Flushed::Closed(why));

        let mut late = conn(&[data(&greeting)]);
        let _ = serve(&mut late, &mut herd);
        let limits = herd.limits.clone();
        assert!(!late.on_timeout(herd.now + peer::HANDSHAKE_TIMEOUT / 2, &limits));
        assert!(late.on_timeout(herd.now + peer::HANDSHAKE_TIMEOUT, &limits));
        let why = CloseReason::NotAuthenticated(peer::HANDSHAKE_TIMEOUT);
        assert_eq!(flush(&mut late, &herd), Flushed::Closed(why));
    }

    #[test]
    fn a_greeting_that_does_not_match_the_herds_secret_setting_is_refused() {
        let mut herd = herd(Some("0123456789abcdef0123"));
        let mut c = conn(&[data("PEER herd/1 Bona\n")]);
        let _ = serve(&mut c, &mut herd);
        let why = "Bona greeted without authenticating, but this herd has a secret";
        assert_eq!(
            flush(&mut c, &herd),
            Flushed::Closed(CloseReason::Handshake(why.into()))
        );
    }

    #[test]
    fn a_whatsat_without_a_key_is_answered_at_once_with_googles_shape() {
        let mut herd = herd(None);
        let mut c = conn(&[data("IAMAT kiwi +1+1 100\nWHATSAT kiwi 10 1\n")]);
        let _ = serve(&mut c, &mut herd);
        let _ = flush(&mut c, &herd);
        let text = written(&c);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("AT Test +0.000000000 kiwi +1+1 100"));
        assert_eq!(lines.next(), Some("AT Test +0.000000000 kiwi +1+1 100"));
        assert!(text.contains("\"status\" : \"REQUEST_DENIED\""), "{text}");
        assert!(text.ends_with("}\n\n"), "{text}");
    }

    #[test]
    fn replies_keep_command_order() {
        let mut out = OutBuf::default();
        let mut replies = Replies::default();
        replies.push(&mut out, b"1");
        replies.push_awaiting(7);
        replies.push(&mut out, b"3");
        replies.push_awaiting(8);
        assert_eq!(out.pending(), 1);
        assert_eq!(replies.held_bytes(), 1, "\"3\" is held in line");
        replies.complete(&mut out, 8, b"4".to_vec());
        assert_eq!(out.pending(), 1);
        replies.complete(&mut out, 7, b"2".to_vec());
        let mut sent = Vec::new();
        out.write_to(&mut sent).expect("a Vec takes everything");
        assert_eq!(sent, b"1234");
        assert!(replies.is_empty());
        assert_eq!(replies.waiting(), 0);
        assert_eq!(replies.held_bytes(), 0);
    }
}
