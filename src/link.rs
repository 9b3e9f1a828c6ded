//! The link this server dials to one neighbour, and keeps up (docs/protocol.md section 5).
//!
//! A neighbour's identity is permanent; its connection comes and goes (Redis Cluster's bus keeps
//! its node links the same way). The link is a state machine whose every state carries the
//! deadline it waits for, so changing state cancels the old deadline:
//!
//! ```text
//!       retry_at: connect()        connected: greeting      CHALLENGE: PROOF     PROOF checked
//!  Down -------------------> Connecting ---------> Authenticating ---------> Proving ---------> Up
//!   ^                            |   (no secret: straight to Up)   |            |               |
//!   '----------------------------+---------------------------------+------------+---------------'
//!    refused, deadline passed, bad challenge or proof, EOF, error, a line the link does not
//!    carry, silent for 5 s, output over its cap: backoff doubles, 50 ms up to 2 s
//! ```
//!
//! Two things end a wait in `Down`: its timer, or the neighbour itself. A neighbour that greets
//! us on the connection it dialled is up and reachable, so a link waiting out its backoff (or
//! stuck on a connect presumed lost, [`STALE_CONNECT`]) is dialled in the same turn, with its
//! backoff reset ([`Link::on_neighbour_greeted`]): both directions come back together.
//!
//! Records go out only on this link; the neighbour's own records arrive on the connection it
//! dialled to us (an inbound [`crate::conn::Conn`]). The neighbour writes back only heartbeats
//! and `SYNC`. When the link comes up it sends the whole store, in batches (`sync`), then
//! whatever is flooded; a heartbeat when it has been quiet for a second; and every three
//! seconds the digests of the store and of its parts, which the neighbour compares with its own
//! (see [`crate::peer`]); `SYNC` asks for some parts, or all, again.
//!
//! How the loop ([`crate::server`]) drives it: [`Link::on_ready`] for every event on the link's
//! token, of either kind; [`Link::on_timeout`] on every turn, whatever is due; [`Link::send`]
//! when a record is flooded; and [`Link::flush`] at the end of every turn, before any client's
//! output. Only `flush` writes to the socket. Everything else queues into the link's output, so
//! a WRITABLE event needs no handler of its own: it wakes the loop, and the turn ends with the
//! write. The readiness is edge-triggered, so `on_ready` reads until the socket would block and
//! handles every whole line it holds before it returns: no event comes for bytes already read.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::log::{Log, Who};
use crate::metrics::LinkCounts;
use crate::peer::{self, Heeded, PartSet, PeerLine, Secret, Session};
use crate::protocol;
use crate::reactor::Want;
use crate::store::{Store, DIGEST_PARTS};
use crate::trace::{self, trace_loop};
use crate::wire::{Fill, Line, Transport, Wire};

/// How long a dial may stay unanswered before it counts as a failure. The kernel would go on
/// retransmitting the SYN for over two minutes (Linux's defaults); a neighbour that does not
/// answer in two seconds is better redialled after the backoff.
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The wait after the first failure in a row; each further failure doubles it ([`backoff`]).
pub const FIRST_RETRY: Duration = Duration::from_millis(50);
/// The longest wait between two dials: a neighbour that comes back is dialled within this, or
/// at once if it greets us first ([`Link::on_neighbour_greeted`]).
pub const MAX_RETRY: Duration = Duration::from_secs(2);
/// A connect still in flight this long after it began, when the neighbour's own connection has
/// just got through, is presumed lost to a partition that has since healed: the kernel would
/// retransmit its SYN only 1 s after the first, then 3 s later. Loopback and LAN connects end
/// in well under a millisecond; a connect younger than this is left to finish.
pub const STALE_CONNECT: Duration = Duration::from_millis(250);
/// A handshake still unfinished this long after it began, when the neighbour's own connection
/// has just got through, is presumed lost (the connection taken by a middlebox that drops its
/// bytes, or cut with no reset): a handshake takes a round trip or two, and this allows for
/// round trips of half a second.
pub const STALE_HANDSHAKE: Duration = Duration::from_secs(1);
/// The store is copied into a link's output only while less than this is waiting, so a sync
/// of a large store never trips the output cap. A copy of some parts passes over the other
/// parts' records at a byte each: a few milliseconds for a million.
const SYNC_LOW_WATER: usize = 64 * 1024;
/// The most of a copy of the store one turn writes, however fast the neighbour takes it: about
/// a millisecond of the loop, so that clients and the other links get their turn while a large
/// store is copied. A copy with more to send asks for the next turn at once
/// ([`Link::wants_turn`]).
const SYNC_TURN_BYTES: usize = 256 * 1024;
/// What the log says when the neighbour answers our greeting with [`protocol::BUSY`] (it needed
/// the place for a newcomer): not a wrong secret, which that line would otherwise be taken for.
const BUSY_WHY: &str =
    "the neighbour answered `? server busy`: every place there is taken (strangers may be holding them)";

/// Longest line a neighbour may write on this link (its lines are short: PING, SYNC, CHALLENGE).
/// A longer one takes the link down ([`Link::next_line`]).
const MAX_LINE_BYTES: usize = 1024;

/// The wait after `failures` failed attempts in a row. The shift is capped so that it cannot
/// overflow however long the neighbour stays away; a few failures in, [`MAX_RETRY`] rules
/// anyway.
pub fn backoff(failures: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1 << failures.min(16))
        .min(MAX_RETRY)
}

// One per neighbour, so the size of the largest state costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
/// Where the link is. Each state holds the socket and the deadline it needs, so leaving a state
/// drops both: no timer is left to cancel, and dropping the socket closes it, which also takes
/// it out of the poll.
enum LinkState<S> {
    /// Waiting to redial.
    Down { retry_at: Instant },
    /// A non-blocking connect in flight; WRITABLE says it ended, one way or the other.
    Connecting { stream: S, deadline: Instant },
    /// Greeting sent with our nonce `nd`; waiting for the neighbour's CHALLENGE.
    Authenticating {
        wire: Wire<S>,
        nd: Vec<u8>,
        deadline: Instant,
    },
    /// Our PROOF sent for the neighbour's nonce `na`; waiting for the neighbour's own, until
    /// the same deadline. Nothing else is sent before it comes: records go only to a neighbour
    /// that has proved it knows the secret.
    Proving {
        wire: Wire<S>,
        nd: Vec<u8>,
        na: Vec<u8>,
        deadline: Instant,
    },
    /// Connected (and authenticated, with a secret). `sync` is the position of the next record
    /// of the store being copied, up to `sync_end` (the store's size when the copy began;
    /// later records are flooded anyway); `sync_parts` the parts copied, or `None` for all.
    Up {
        wire: Wire<S>,
        session: Option<Session>,
        sync: usize,
        sync_end: usize,
        sync_parts: Option<PartSet>,
        /// Records the copy has sent so far.
        sync_sent: usize,
        /// When the neighbour last wrote a line that checked out: [`peer::DEAD_AFTER`] of
        /// silence takes the link down.
        last_heard: Instant,
        /// When we last queued a line: [`peer::HEARTBEAT_INTERVAL`] later a `PING` is due.
        last_sent: Instant,
        /// When the digests of the store are next due ([`peer::DIGEST_INTERVAL`] apart).
        next_digest: Instant,
    },
}

/// The link to one neighbour. `S` is its socket: mio's `TcpStream`, or a scripted one in tests.
pub struct Link<S = TcpStream> {
    /// The neighbour's name.
    pub name: String,
    /// Where the neighbour listens: every dial goes there.
    addr: SocketAddr,
    /// Failed attempts since the link was last up.
    failures: u32,
    state: LinkState<S>,
    /// The neighbour's `SYNC`s acted on.
    sync_asked: Heeded,
    /// What it has done, for the metrics.
    pub counts: LinkCounts,
}

/// What the link needs from the server around it.
///
/// Borrowed afresh for each call ([`crate::herd::Herd::links_and_context`]), so that the links
/// and the store they copy can be used at the same time.
pub struct Context<'a> {
    /// This server's name: it goes in our greeting, and in both proofs as the dialler's.
    pub server: &'a str,
    /// Whether the neighbour's heartbeats are logged line by line (the heartbeats and digests
    /// the link sends never are).
    pub housekeeping: bool,
    /// The herd secret. Without one, the link greets without a nonce and is up as soon as it
    /// has connected.
    pub secret: Option<&'a Secret>,
    /// The store: copied to the neighbour when the link comes up, and summed in the digests.
    pub store: &'a Store,
    /// The server's log: every line sent and received, and every change of state.
    pub log: &'a mut Log,
}

impl<S: Transport> Link<S> {
    /// A link to `name` at `addr`, down and due at once: the first turn of the loop dials it.
    pub fn new(name: String, addr: SocketAddr, now: Instant) -> Link<S> {
        Link {
            name,
            addr,
            failures: 0,
            state: LinkState::Down { retry_at: now },
            sync_asked: Heeded::default(),
            counts: LinkCounts::default(),
        }
    }

    /// The link's socket, if it has one: for the loop to register after [`Want::Register`].
    pub fn socket(&mut self) -> Option<&mut S> {
        match &mut self.state {
            LinkState::Down { .. } => None,
            LinkState::Connecting { stream, .. } => Some(stream),
            LinkState::Authenticating { wire, .. }
            | LinkState::Proving { wire, .. }
            | LinkState::Up { wire, .. } => Some(&mut wire.stream),
        }
    }

    /// The loop could not register the socket the link opened. An unregistered socket would
    /// never report how its connect ended, so it is dropped, and the attempt counts as a failure.
    pub fn on_register_failed(&mut self, now: Instant, log: &mut Log, why: &str) {
        self.go_down(now, log, &format!("cannot register the socket: {why}"));
    }

    /// Whether the link wants the next turn at once, without waiting for an event or a
    /// deadline: a copy of the store that the neighbour is taking as fast as it is written.
    pub fn wants_turn(&self) -> bool {
        matches!(&self.state, LinkState::Up { wire, sync, sync_end, .. }
            if sync < sync_end && wire.out.pending() < SYNC_LOW_WATER)
    }

    /// When the link next needs the loop, without any event. Up, it is the earliest of three
    /// (silence, heartbeat, digest); [`Link::on_timeout`] works out which has come.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            LinkState::Down { retry_at } => Some(*retry_at),
            LinkState::Connecting { deadline, .. }
            | LinkState::Authenticating { deadline, .. }
            | LinkState::Proving { deadline, .. } => Some(*deadline),
            LinkState::Up {
                last_heard,
                last_sent,
                next_digest,
                ..
            } => Some(
                (*last_heard + peer::DEAD_AFTER)
                    .min(*last_sent + peer::HEARTBEAT_INTERVAL)
                    .min(*next_digest),
            ),
        }
    }

    /// The neighbour's address: where it is dialled, and where its own connections come from.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The state's name, for the trace.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            LinkState::Down { .. } => "Down",
            LinkState::Connecting { .. } => "Connecting",
            LinkState::Authenticating { .. } => "Authenticating",
            LinkState::Proving { .. } => "Proving",
            LinkState::Up { .. } => "Up",
        }
    }

    /// The neighbour has just greeted us on a connection it dialled (and proved it knows the
    /// secret, when the herd has one): it is up and reachable now. A link waiting out its
    /// backoff, or stuck on a connect or a handshake presumed lost ([`STALE_CONNECT`],
    /// [`STALE_HANDSHAKE`]), is made due at once, so
    /// that both directions come up together and no update skips the neighbour for the length
    /// of a backoff. The dial itself happens in this turn's deadlines. A link that is up, or
    /// connecting or authenticating afresh, is left alone: a neighbour that greets us while our
    /// own handshake with it is young is one whose dial crossed ours.
    ///
    /// This cannot loop: a greeting arrives only when the neighbour's own dial connects, and it
    /// dials only on its timer or on our greeting while its link is down. Our dial's greeting
    /// finds its link up (it just greeted us over it), so it changes nothing there.
    pub fn on_neighbour_greeted(&mut self, now: Instant, log: &mut Log) {
        let waited = match &self.state {
            LinkState::Down { retry_at } if *retry_at > now => format!(
                "was down, retry in {} ms",
                retry_at.saturating_duration_since(now).as_millis()
            ),
            LinkState::Connecting { deadline, .. } => {
                let began = *deadline - PEER_CONNECT_TIMEOUT;
                let age = now.saturating_duration_since(began);
                if age < STALE_CONNECT {
                    return;
                }
                format!("a connect unanswered for {} ms", age.as_millis())
            }
            // A handshake on a connection that a middlebox took and then dropped, or that the
            // partition cut, waits out its 5 s; the neighbour's greeting says the way is open.
            LinkState::Authenticating { deadline, .. } | LinkState::Proving { deadline, .. } => {
                let began = *deadline - peer::HANDSHAKE_TIMEOUT;
                let age = now.saturating_duration_since(began);
                if age < STALE_HANDSHAKE {
                    return;
                }
                format!("a handshake unanswered for {} ms", age.as_millis())
            }
            _ => return,
        };
        log.event(
            format_args!("link {}", self.name),
            format_args!("the neighbour greeted us ({waited}): dialling now"),
        );
        self.failures = 0;
        // Dropping a connecting stream closes it, which also removes it from the poll.
        self.state = LinkState::Down { retry_at: now };
    }

    /// Fires whatever deadline has passed; safe to call when none has. Asks the loop to register
    /// the socket when it has dialled.
    ///
    /// The loop calls it for every link on every turn, not only when [`Link::deadline`] has
    /// come, so each arm checks its own deadline against `now`.
    pub fn on_timeout(&mut self, now: Instant, cx: &mut Context) -> Want {
        let why = match &mut self.state {
            // The backoff is over: dial.
            LinkState::Down { retry_at } if *retry_at <= now => return self.dial(now, cx.log),
            // The handshake states give up at their deadline; each says what it waited for.
            LinkState::Connecting { deadline, .. } if *deadline <= now => {
                format!("no answer within {} ms", PEER_CONNECT_TIMEOUT.as_millis())
            }
            LinkState::Authenticating { deadline, .. } if *deadline <= now => format!(
                "no challenge within {} s: is the herd secret set on both, and does the way there carry our bytes?",
                peer::HANDSHAKE_TIMEOUT.as_secs()
            ),
            LinkState::Proving { deadline, .. } if *deadline <= now => format!(
                "the neighbour did not prove itself within {} s",
                peer::HANDSHAKE_TIMEOUT.as_secs()
            ),
            // The neighbour heartbeats every second: this much silence is a dead connection
            // (or a partition), not a quiet neighbour.
            LinkState::Up { last_heard, .. } if *last_heard + peer::DEAD_AFTER <= now => {
                format!("silent for {} s", peer::DEAD_AFTER.as_secs())
            }
            // Alive: what is due of the digests and the heartbeat goes into the output.
            LinkState::Up {
                wire,
                session,
                sync,
                sync_end,
                last_sent,
                next_digest,
                ..
            } => {
                // The digest is sent once the copy of the store is through: before, the two
                // stores are expected to differ. Its parts first, so that the neighbour holds
                // them all when the whole digest tells it to look.
                if *next_digest <= now && sync >= sync_end {
                    for line in peer::store_lines(cx.store) {
                        if cx.housekeeping {
                            cx.log.bytes(Who::Link(&self.name), '>', &line);
                        }
                        send(wire, session, &line);
                    }
                    *last_sent = now;
                }
                // The beat moves on even when the copy held the digest back: it comes at the next
                // beat, not as soon as the copy is through.
                if *next_digest <= now {
                    *next_digest = now + peer::DIGEST_INTERVAL;
                }
                // Any line sent counts as a sign of life, so a busy link sends no PING.
                if *last_sent + peer::HEARTBEAT_INTERVAL <= now {
                    if cx.housekeeping {
                        cx.log.bytes(Who::Link(&self.name), '>', b"PING");
                    }
                    send(wire, session, b"PING");
                    *last_sent = now;
                }
                return Want::Nothing;
            }
            // Nothing due yet.
            _ => return Want::Nothing,
        };
        self.go_down(now, cx.log, &why);
        Want::Nothing
    }

    /// Starts a non-blocking connect; the loop registers the socket, and its first event says
    /// how the connect ended. An error here is one the kernel knew at once (no descriptor, no
    /// route); a refusal or a silent neighbour shows later, as an event or the deadline.
    fn dial(&mut self, now: Instant, log: &mut Log) -> Want {
        match S::connect(self.addr) {
            Ok(stream) => {
                self.state = LinkState::Connecting {
                    stream,
                    deadline: now + PEER_CONNECT_TIMEOUT,
                };
                Want::Register
            }
            Err(e) => {
                self.go_down(now, log, &e.to_string());
                Want::Nothing
            }
        }
    }

    /// A readiness event on the link's socket, of either kind: what it means depends on the
    /// state, not on the kind. `scratch` is the loop's read buffer, shared by every socket.
    ///
    /// Connecting, it may be the end of the connect or a spurious wake-up, which
    /// [`Transport::connected`] tells apart. Otherwise it reads; what the neighbour's lines
    /// call for (a proof, a copy of the store) waits for [`Link::flush`] at the end of the
    /// turn. Any error takes the link down. `hangup`: the event said the neighbour closed its
    /// side, so the read goes on to the end of the stream (a short read would stop it before,
    /// and the end of a stream raises no new event).
    pub fn on_ready(&mut self, now: Instant, hangup: bool, scratch: &mut [u8], cx: &mut Context) {
        if let LinkState::Connecting { stream, .. } = &mut self.state {
            match stream.connected() {
                // Then read in the same call: the event that ended the connect may also have
                // announced bytes or the end of the stream, and it will not be raised again.
                Ok(true) => self.greet(now, cx),
                Ok(false) => return, // a spurious event: still in flight
                Err(e) => return self.go_down(now, cx.log, &e.to_string()),
            }
        }
        if let Err(why) = self.read(now, hangup, scratch, cx) {
            self.go_down(now, cx.log, &why);
        }
    }

    /// Connected: sends the greeting; without a secret the link is up at once. With one, the
    /// greeting carries our fresh nonce, and the link waits for the neighbour's challenge.
    /// The state is taken out by value (a placeholder `Down` stands in meanwhile) so that the
    /// stream can move into its [`Wire`]; every path sets the real next state.
    fn greet(&mut self, now: Instant, cx: &mut Context) {
        let LinkState::Connecting { stream, .. } =
            std::mem::replace(&mut self.state, LinkState::Down { retry_at: now })
        else {
            return;
        };
        let mut wire = Wire::new(stream);
        let nd = match cx.secret {
            Some(_) => match peer::nonce() {
                Some(nd) => Some(nd),
                // No fresh nonce, no handshake: a stale one would let an old one be replayed.
                None => return self.go_down(now, cx.log, "no randomness for a nonce"),
            },
            None => None,
        };
        let greeting = peer::greeting(cx.server, nd.as_deref());
        cx.log.bytes(Who::Link(&self.name), '>', &greeting);
        trace_loop!("  link {} > {}", self.name, trace::shown(&greeting));
        send(&mut wire, &mut None, &greeting);
        self.state = match nd {
            Some(nd) => LinkState::Authenticating {
                wire,
                nd,
                deadline: now + peer::HANDSHAKE_TIMEOUT,
            },
            None => self.come_up(now, wire, None, cx),
        };
    }

    /// The link is up: the backoff starts over, and the copy of the store begins, from the
    /// first record to the last one held now. Records stored later are flooded as they come,
    /// and a record replaced at a position the copy has passed is flooded too, so the copy
    /// never has to chase the store ([`crate::store`] keeps positions stable). The first digest
    /// waits a whole interval, by when a small store's copy is through.
    fn come_up(
        &mut self,
        now: Instant,
        wire: Wire<S>,
        session: Option<Session>,
        cx: &mut Context,
    ) -> LinkState<S> {
        self.failures = 0;
        self.counts.ups += 1;
        cx.log.event(
            format_args!("link {}", self.name),
            format_args!(
                "up to {}{}; syncing {} records",
                self.addr,
                if session.is_some() {
                    ", authenticated"
                } else {
                    ""
                },
                cx.store.len()
            ),
        );
        LinkState::Up {
            wire,
            session,
            sync: 0,
            sync_end: cx.store.len(),
            sync_parts: None,
            sync_sent: 0,
            last_heard: now,
            last_sent: now,
            next_digest: now + peer::DIGEST_INTERVAL,
        }
    }

    /// Reads what the neighbour wrote: its challenge, heartbeats, and requests to resync.
    ///
    /// Reads until the socket would block, then handles every whole line before it returns:
    /// the kernel will not report bytes already read. The lines are handled before the fill's
    /// outcome is, so what the neighbour wrote just before it closed still counts. A fill that
    /// buffers four of the longest lines while the socket may hold more ([`Fill::Full`]) ends
    /// the link: a neighbour writes only a few short lines here, and one that floods it is
    /// broken.
    fn read(
        &mut self,
        now: Instant,
        hangup: bool,
        scratch: &mut [u8],
        cx: &mut Context,
    ) -> Result<(), String> {
        let wire = match &mut self.state {
            LinkState::Authenticating { wire, .. }
            | LinkState::Proving { wire, .. }
            | LinkState::Up { wire, .. } => wire,
            _ => return Ok(()),
        };
        let fill = wire
            .reader
            .fill(&mut wire.stream, scratch, 4 * MAX_LINE_BYTES, hangup)
            .map_err(|e| e.to_string())?;
        while let Some(line) = self.next_line() {
            self.on_line(now, &line?, cx)?;
        }
        match fill {
            Fill::Eof => Err("closed by the neighbour".into()),
            Fill::Full => Err("the neighbour wrote too much".into()),
            Fill::Drained => Ok(()),
        }
    }

    /// The next whole line, copied out of the reader so that [`Link::on_line`] may change the
    /// state it lives in. A line over [`MAX_LINE_BYTES`] is an error that takes the link down:
    /// the neighbour writes nothing that long.
    fn next_line(&mut self) -> Option<Result<Vec<u8>, String>> {
        let wire = match &mut self.state {
            LinkState::Authenticating { wire, .. }
            | LinkState::Proving { wire, .. }
            | LinkState::Up { wire, .. } => wire,
            _ => return None,
        };
        let line = match wire.reader.next_line(MAX_LINE_BYTES)? {
            Line::Complete(line) => Ok(line.to_vec()),
            Line::TooLong(_) => Err(format!(
                "the neighbour sent a line longer than {MAX_LINE_BYTES} bytes"
            )),
        };
        wire.reader.compact();
        Some(line)
    }

    /// One line from the neighbour, in the state it finds the link in. `Err` takes the link
    /// down with that reason.
    fn on_line(&mut self, now: Instant, line: &[u8], cx: &mut Context) -> Result<(), String> {
        let (me, them) = (cx.server.as_bytes(), self.name.as_bytes());
        match &mut self.state {
            // The challenge: we prove ourselves first. The proof binds both names and both
            // nonces, so it is good for this connection between these two servers only.
            LinkState::Authenticating { nd, .. } => {
                cx.log.bytes(Who::Link(&self.name), '<', line);
                let secret = cx.secret.ok_or("no secret")?;
                if protocol::BUSY.strip_suffix(b"\n") == Some(line) {
                    return Err(BUSY_WHY.into());
                }
                let na = peer::parse_challenge(line)
                    .ok_or("the neighbour did not answer with a challenge: is the herd secret set on both?")?;
                let mut proof = b"PROOF ".to_vec();
                proof.extend_from_slice(&secret.proof(b"dial", me, them, nd, na));
                let na = na.to_vec();
                let LinkState::Authenticating {
                    mut wire,
                    nd,
                    deadline,
                } = std::mem::replace(&mut self.state, LinkState::Down { retry_at: now })
                else {
                    return Ok(());
                };
                // The proof itself is never logged.
                send(&mut wire, &mut None, &proof);
                self.state = LinkState::Proving {
                    wire,
                    nd,
                    na,
                    deadline,
                };
                Ok(())
            }
            // The neighbour's proof, as the acceptor: only now is it known to hold the secret.
            // The session key comes from both nonces, new for this connection.
            LinkState::Proving { nd, na, .. } => {
                let secret = cx.secret.ok_or("no secret")?;
                if protocol::BUSY.strip_suffix(b"\n") == Some(line) {
                    cx.log.bytes(Who::Link(&self.name), '<', line);
                    return Err(BUSY_WHY.into());
                }
                let proved = peer::parse_proof(line)
                    .is_some_and(|proof| secret.verify(proof, b"accept", me, them, nd, na));
                if !proved {
                    return Err("the neighbour's proof is wrong: the herd secrets differ".into());
                }
                let session = Session::new(secret, nd, na, true);
                let LinkState::Proving { wire, .. } =
                    std::mem::replace(&mut self.state, LinkState::Down { retry_at: now })
                else {
                    return Ok(());
                };
                self.state = self.come_up(now, wire, Some(session), cx);
                Ok(())
            }
            // Up: every line is opened (with a secret) before anything else, so a forged or
            // replayed line takes the link down instead of keeping it alive.
            LinkState::Up {
                session,
                last_heard,
                ..
            } => {
                let payload = match session {
                    Some(session) => session.open(line)?,
                    None => line,
                };
                // Logged once its tag is checked (a forged line never appears as the
                // neighbour's), heartbeats only when asked.
                if payload != b"PING" || cx.housekeeping {
                    cx.log.bytes(Who::Link(&self.name), '<', line);
                }
                trace_loop!("  link {} < {}", self.name, trace::shown(payload));
                *last_heard = now;
                match peer::parse_line(payload) {
                    Some(PeerLine::Ping) => {}
                    // Asked again sooner than a correct neighbour would ask: not copied again.
                    // If its store still differs, its next digests ask once more.
                    Some(PeerLine::Sync(_)) if self.sync_asked.too_soon(now) => {}
                    Some(PeerLine::Sync(parts)) => {
                        let what = match &parts {
                            None => format!("the whole store: syncing {} records", cx.store.len()),
                            Some(set) => format!(
                                "{} of {} parts of the store: syncing their records",
                                set.len(),
                                DIGEST_PARTS
                            ),
                        };
                        cx.log.event(
                            format_args!("link {}", self.name),
                            format_args!("the neighbour asks for {what}"),
                        );
                        self.resync(cx.store, parts);
                    }
                    _ => return Err("the neighbour sent a line a link does not carry".into()),
                }
                Ok(())
            }
            // Down or Connecting: there is no wire, so no line to get here.
            _ => Ok(()),
        }
    }

    /// Every failure ends here: the state's socket is dropped (closed, and so out of the poll),
    /// the wait is the backoff for the failures so far, and the count grows. Nothing is kept
    /// for the neighbour meanwhile: the copy when the link is up again carries it all.
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
        let LinkState::Up {
            wire,
            session,
            last_sent,
            ..
        } = &mut self.state
        else {
            return;
        };
        log.bytes(Who::Link(&self.name), '>', line);
        trace_loop!("  link {} > {}", self.name, trace::shown(line));
        send(wire, session, line);
        *last_sent = now;
        // `peer_output_bytes` unsent: the neighbour has stopped reading, or reads far slower
        // than we write. Dropping the link frees the output, and the copy made when it comes
        // back up repairs what the neighbour missed.
        if wire.out.pending() > cap {
            let why = format!("over {cap} bytes unsent: the neighbour does not keep up");
            self.go_down(now, log, &why);
        }
    }

    /// Copies the records of `parts`, or the whole store, to the neighbour again (its digest
    /// kept differing). A copy of the whole store already under way goes on as it is: what it
    /// has sent is with the neighbour, and the rest is coming. A copy of other parts is widened
    /// to cover both, and starts over.
    pub fn resync(&mut self, store: &Store, parts: Option<PartSet>) {
        if let LinkState::Up {
            sync,
            sync_end,
            sync_parts,
            sync_sent,
            ..
        } = &mut self.state
        {
            // (copy under way, parts it copies, parts asked for)
            let widened = match (*sync < *sync_end, *sync_parts, parts) {
                // The whole store is on its way already.
                (true, None, _) => return,
                // No copy under way: copy what is asked.
                (false, _, parts) => parts,
                // Some parts under way, others asked: both, from the start.
                (true, Some(copying), Some(asked)) => Some(copying.union(&asked)),
                // Some parts under way, the whole store asked: the whole store.
                (true, Some(_), None) => None,
            };
            self.counts.resyncs += 1;
            self.counts.parts_copied += widened.map_or(DIGEST_PARTS as u64, |p| u64::from(p.len()));
            (*sync, *sync_end, *sync_parts, *sync_sent) = (0, store.len(), widened, 0);
        }
    }

    /// Whether the link is copying the store (or some of it) to the neighbour, whose store is
    /// then expected to differ from ours.
    pub fn copying(&self) -> bool {
        matches!(&self.state, LinkState::Up { sync, sync_end, .. } if sync < sync_end)
    }

    /// Copies the next batch of the store into the output, if the output has room, then writes.
    /// Called at the end of every turn, for every link, before any client's output is written:
    /// a neighbour is sent an update before the client that made it is answered
    /// (docs/protocol.md section 5). It is the only place the link writes to its socket.
    ///
    /// The copy refills the output only while less than [`SYNC_LOW_WATER`] waits, and one turn
    /// queues about [`SYNC_TURN_BYTES`] of it at most; the rest waits for the next turn
    /// ([`Link::wants_turn`]) or, when the kernel is full, for the neighbour to read.
    pub fn flush(&mut self, now: Instant, store: &Store, log: &mut Log) {
        let (wire, session, sync, sync_end, sync_parts, sync_sent, last_sent) =
            match &mut self.state {
                // The handshake: our greeting or proof to write, and no copy yet.
                LinkState::Authenticating { wire, .. } | LinkState::Proving { wire, .. } => {
                    let before = wire.out.pending();
                    let result = wire.out.write_to(&mut wire.stream);
                    self.counts.bytes_sent += (before - wire.out.pending()) as u64;
                    if let Err(e) = result {
                        self.go_down(now, log, &format!("write failed: {e}"));
                    }
                    return;
                }
                LinkState::Up {
                    wire,
                    session,
                    sync,
                    sync_end,
                    sync_parts,
                    sync_sent,
                    last_sent,
                    ..
                } => (
                    wire,
                    session,
                    sync,
                    sync_end,
                    &*sync_parts,
                    sync_sent,
                    last_sent,
                ),
                _ => return,
            };
        let copying = *sync < *sync_end;
        // Bytes of the copy queued in this turn.
        let mut synced = 0;
        let result = loop {
            // A copy of some parts steps over the other parts' records, reading only their
            // part (a byte each), not the records.
            while *sync < *sync_end && wire.out.pending() < SYNC_LOW_WATER {
                let wanted = match sync_parts {
                    None => true,
                    Some(set) => store.part_at(*sync).is_some_and(|part| set.contains(part)),
                };
                if let Some(record) = store.at(*sync).filter(|_| wanted) {
                    log.bytes(Who::Link(&self.name), '>', &record.line);
                    trace_loop!("  link {} > {}", self.name, trace::shown(&record.line));
                    let before = wire.out.pending();
                    send(wire, session, &record.line);
                    synced += wire.out.pending() - before;
                    *sync_sent += 1;
                    *last_sent = now;
                }
                *sync += 1;
            }
            let before = wire.out.pending();
            let result = wire.out.write_to(&mut wire.stream);
            self.counts.bytes_sent += (before - wire.out.pending()) as u64;
            // Keep going while the kernel takes everything, the copy has more to send, and this
            // turn's share of it is not spent ([`Link::wants_turn`] asks for the next).
            let more = *sync < *sync_end && synced < SYNC_TURN_BYTES;
            if result.is_err() || wire.out.pending() != 0 || before == 0 || !more {
                break result;
            }
        };
        if copying && *sync >= *sync_end {
            log.event(
                format_args!("link {}", self.name),
                format_args!("sync done: {} records sent", *sync_sent),
            );
        }
        if let Err(e) = result {
            self.go_down(now, log, &format!("write failed: {e}"));
        }
    }
}

/// Frames one payload onto the wire's output: sealed when the link has a session, and ended
/// with its newline. Takes the wire and the session rather than the link, so that callers can
/// hold other fields of the state borrowed at the same time.
fn send<S>(wire: &mut Wire<S>, session: &mut Option<Session>, payload: &[u8]) {
    peer::frame(session.as_mut(), payload, wire.out.tail());
}

#[cfg(test)]
mod tests {
    //! The link driven with scripted sockets and an explicit `now`.

    use super::*;
    use crate::wire::script::{Script, Step, DIALS};

    const NEIGHBOUR: &str = "Bona";

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    /// What the link needs around it: our name, the secret, a store and a log.
    struct Around {
        secret: Option<Secret>,
        store: Store,
        log: Log,
    }

    impl Around {
        fn new(secret: Option<&str>) -> Around {
            Around {
                secret: secret.map(|s| Secret::new(s.as_bytes())),
                store: Store::default(),
                log: Log::discard(),
            }
        }

        fn cx(&mut self) -> Context<'_> {
            Context {
                server: "Test",
                housekeeping: false,
                secret: self.secret.as_ref(),
                store: &self.store,
                log: &mut self.log,
            }
        }
    }

    /// The next connect returns `script`.
    fn dials(script: Script) {
        DIALS.with(|d| d.borrow_mut().push_back(Ok(script)));
    }

    fn written(link: &mut Link<Script>) -> String {
        let out = link.socket().map(|s| s.output.clone()).unwrap_or_default();
        String::from_utf8_lossy(&out).into_owned()
    }

    /// A link that has dialled and connected at `t0` with a secret: its greeting sent, it
    /// waits for the neighbour's challenge.
    fn authenticating(t0: Instant) -> (Around, Link<Script>) {
        let mut around = Around::new(Some("0123456789abcdef0123"));
        let mut link: Link<Script> = Link::new(NEIGHBOUR.into(), addr(), t0);
        dials(Script::reading(&[]));
        let _ = link.on_timeout(t0, &mut around.cx());
        link.on_ready(t0, false, &mut [0; 1024], &mut around.cx());
        assert_eq!(link.state_name(), "Authenticating");
        (around, link)
    }

    /// A link that has dialled and connected at `t0`, without a secret: up.
    fn up(around: &mut Around, t0: Instant) -> Link<Script> {
        let mut link: Link<Script> = Link::new(NEIGHBOUR.into(), addr(), t0);
        dials(Script::reading(&[]));
        assert_eq!(link.on_timeout(t0, &mut around.cx()), Want::Register);
        link.on_ready(t0, false, &mut [0; 1024], &mut around.cx());
        assert_eq!(link.state_name(), "Up");
        link
    }

    /// [`up`] at `t0`, with a store holding one record `k`, whose copy at link-up is written.
    fn up_with_k(t0: Instant) -> (Around, Link<Script>) {
        let mut around = Around::new(None);
        around
            .store
            .merge(b"k", 5, b"AT Test +0.000000001 k +1+1 5");
        let mut link = up(&mut around, t0);
        link.flush(t0, &around.store, &mut around.log);
        (around, link)
    }

    #[test]
    fn down_at_its_retry_time_dials_and_asks_for_registration() {
        let t0 = Instant::now();
        let mut around = Around::new(None);
        let mut link: Link<Script> = Link::new(NEIGHBOUR.into(), addr(), t0);
        dials(Script {
            connect: None,
            ..Script::default()
        });
        assert_eq!(link.on_timeout(t0, &mut around.cx()), Want::Register);
        assert_eq!(link.state_name(), "Connecting");
        assert_eq!(link.deadline(), Some(t0 + PEER_CONNECT_TIMEOUT));
        // A spurious event changes nothing.
        link.on_ready(t0, false, &mut [0; 64], &mut around.cx());
        assert_eq!(link.state_name(), "Connecting");
    }

    #[test]
    fn connecting_refused_or_unanswered_goes_down_and_waits_longer_each_time() {
        let t0 = Instant::now();
        let mut around = Around::new(None);
        let mut link: Link<Script> = Link::new(NEIGHBOUR.into(), addr(), t0);
        dials(Script {
            connect: Some(false),
            ..Script::default()
        });
        let _ = link.on_timeout(t0, &mut around.cx());
        link.on_ready(t0, false, &mut [0; 64], &mut around.cx());
        assert_eq!(link.state_name(), "Down");
        assert_eq!(link.deadline(), Some(t0 + backoff(0)));
        let t1 = t0 + backoff(0);
        dials(Script {
            connect: None,
            ..Script::default()
        });
        let _ = link.on_timeout(t1, &mut around.cx());
        assert_eq!(link.state_name(), "Connecting");
        let t2 = t1 + PEER_CONNECT_TIMEOUT;
        assert_eq!(link.on_timeout(t2, &mut around.cx()), Want::Nothing);
        assert_eq!(link.state_name(), "Down");
        assert_eq!(link.deadline(), Some(t2 + backoff(1)));
    }

    #[test]
    fn connected_without_a_secret_greets_is_up_and_copies_the_store() {
        let t0 = Instant::now();
        let (mut around, mut link) = up_with_k(t0);
        assert_eq!(
            written(&mut link),
            "PEER herd/1 Test\nAT Test +0.000000001 k +1+1 5\n"
        );
        // Then whatever is flooded.
        link.send(
            t0,
            b"AT Test +0.000000001 j +1+1 6",
            1 << 20,
            &mut around.log,
        );
        link.flush(t0, &around.store, &mut around.log);
        assert!(written(&mut link).ends_with("j +1+1 6\n"));
    }

    #[test]
    fn a_sync_asked_sooner_than_a_correct_neighbour_would_is_not_copied_again() {
        let t0 = Instant::now();
        let (mut around, mut link) = up_with_k(t0);
        let mut ask = |link: &mut Link<Script>, now: Instant, times: usize| {
            let line = [&peer::sync_line(None)[..], b"\n"].concat();
            let socket = link.socket().expect("up");
            socket.input.push_back(Step::Data(line.repeat(times)));
            link.on_ready(now, false, &mut [0; 1024], &mut around.cx());
            link.flush(now, &around.store, &mut around.log);
        };
        // Five at once: one copy.
        ask(&mut link, t0, 5);
        assert_eq!(link.counts.resyncs, 1);
        ask(&mut link, t0 + peer::ACT_AT_MOST_EVERY / 2, 1);
        assert_eq!(link.counts.resyncs, 1, "too soon after the last");
        // Once a correct neighbour could ask again: copied again.
        ask(&mut link, t0 + peer::ACT_AT_MOST_EVERY, 1);
        assert_eq!(link.counts.resyncs, 2);
        assert_eq!(link.state_name(), "Up");
    }

    #[test]
    fn up_sends_a_heartbeat_when_quiet_and_its_digests_every_three_seconds() {
        let t0 = Instant::now();
        let mut around = Around::new(None);
        let mut link = up(&mut around, t0);
        link.flush(t0, &around.store, &mut around.log);
        let greeted = written(&mut link).len();
        let t1 = t0 + peer::HEARTBEAT_INTERVAL;
        // The neighbour keeps the link alive meanwhile.
        link.socket()
            .expect("up")
            .input
            .push_back(Step::Data(b"PING\n".to_vec()));
        link.on_ready(t1, false, &mut [0; 64], &mut around.cx());
        let _ = link.on_timeout(t1, &mut around.cx());
        link.flush(t1, &around.store, &mut around.log);
        assert_eq!(&written(&mut link)[greeted..], "PING\n");
        let t3 = t0 + peer::DIGEST_INTERVAL;
        link.socket()
            .expect("up")
            .input
            .push_back(Step::Data(b"PING\n".to_vec()));
        link.on_ready(t3, false, &mut [0; 64], &mut around.cx());
        let _ = link.on_timeout(t3, &mut around.cx());
        link.flush(t3, &around.store, &mut around.log);
        let text = written(&mut link);
        let digests: Vec<&str> = text[greeted + 5..].lines().collect();
        assert_eq!(digests.len(), 9, "8 PARTS lines and a DIGEST: {digests:?}");
        assert!(digests[8].starts_with("DIGEST 0 "));
    }

    #[test]
    fn up_and_silent_for_five_seconds_goes_down() {
        let t0 = Instant::now();
        let mut around = Around::new(None);
        let mut link = up(&mut around, t0);
        let _ = link.on_timeout(t0 + peer::DEAD_AFTER / 2, &mut around.cx());
        assert_eq!(link.state_name(), "Up");
        let _ = link.on_timeout(t0 + peer::DEAD_AFTER, &mut around.cx());
        assert_eq!(link.state_name(), "Down");
    }

    #[test]
    fn a_record_for_a_link_that_is_down_is_dropped_and_one_over_the_cap_drops_the_link() {
        let t0 = Instant::now();
        let mut around = Around::new(None);
        let mut link: Link<Script> = Link::new(NEIGHBOUR.into(), addr(), t0);
        link.send(t0, b"AT Test +0.000000001 k +1+1 5", 10, &mut around.log);
        assert!(
            link.socket().is_none(),
            "nothing queued for a link that is down"
        );
        let mut link = up(&mut around, t0);
        link.socket().expect("up").room = Some(0); // the neighbour reads nothing
        link.send(t0, b"AT Test +0.000000001 k +1+1 5", 10, &mut around.log);
        assert_eq!(link.state_name(), "Down");
    }

    #[test]
    fn with_a_secret_the_link_proves_itself_first_and_is_up_once_the_neighbour_has() {
        let t0 = Instant::now();
        let (mut around, mut link) = authenticating(t0);
        link.flush(t0, &around.store, &mut around.log);
        let greeting = written(&mut link);
        let nd = greeting
            .trim_end()
            .rsplit(' ')
            .next()
            .expect("a nonce")
            .to_owned();
        let secret = Secret::new(b"0123456789abcdef0123");
        let na = "ffeeddccbbaa99887766554433221100";
        let input = |link: &mut Link<Script>, line: String| {
            let socket = link.socket().expect("a socket");
            socket.input.push_back(Step::Data(line.into_bytes()));
        };
        input(&mut link, format!("CHALLENGE {na}\n"));
        link.on_ready(t0, false, &mut [0; 1024], &mut around.cx());
        assert_eq!(link.state_name(), "Proving");
        link.flush(t0, &around.store, &mut around.log);
        let (d, a) = (nd.as_bytes(), na.as_bytes());
        let ours = secret.proof(b"dial", b"Test", NEIGHBOUR.as_bytes(), d, a);
        let text = written(&mut link);
        assert!(text.ends_with(&format!("PROOF {}\n", String::from_utf8_lossy(&ours))));
        let theirs = secret.proof(b"accept", b"Test", NEIGHBOUR.as_bytes(), d, a);
        input(
            &mut link,
            format!("PROOF {}\n", String::from_utf8_lossy(&theirs)),
        );
        link.on_ready(t0, false, &mut [0; 1024], &mut around.cx());
        assert_eq!(link.state_name(), "Up");
    }

    #[test]
    fn a_neighbour_with_no_place_left_is_said_to_be_busy_not_to_have_another_secret() {
        let t0 = Instant::now();
        let (mut around, mut link) = authenticating(t0);
        let why = link.on_line(t0, b"? server busy", &mut around.cx());
        assert_eq!(why, Err(BUSY_WHY.to_string()));
        let why = link.on_line(t0, b"CHALLENGE nonsense", &mut around.cx());
        assert!(why.is_err_and(|w| w.contains("herd secret set on both")));
    }

    #[test]
    fn a_neighbour_whose_proof_is_wrong_or_late_gets_no_record() {
        let t0 = Instant::now();
        let mut around = Around::new(Some("0123456789abcdef0123"));
        around
            .store
            .merge(b"k", 5, b"AT Test +0.000000001 k +1+1 5");
        let na = "ffeeddccbbaa99887766554433221100";
        for wrong in [Some(format!("PROOF {}\n", "cd".repeat(32))), None] {
            let mut link: Link<Script> = Link::new(NEIGHBOUR.into(), addr(), t0);
            dials(Script::reading(&[Step::Data(
                format!("CHALLENGE {na}\n").into_bytes(),
            )]));
            let _ = link.on_timeout(t0, &mut around.cx());
            link.on_ready(t0, false, &mut [0; 1024], &mut around.cx());
            assert_eq!(link.state_name(), "Proving");
            match wrong {
                Some(line) => {
                    let socket = link.socket().expect("a socket");
                    socket.input.push_back(Step::Data(line.into_bytes()));
                    link.on_ready(t0, false, &mut [0; 1024], &mut around.cx());
                }
                None => {
                    let late = t0 + peer::HANDSHAKE_TIMEOUT;
                    let _ = link.on_timeout(late, &mut around.cx());
                }
            }
            assert_eq!(link.state_name(), "Down");
        }
    }

    #[test]
    fn a_greeting_makes_a_waiting_link_due_now_with_its_backoff_reset() {
        let t0 = Instant::now();
        let mut log = Log::discard();
        let addr = SocketAddr::from(([127, 0, 0, 1], 9));
        let mut link: Link = Link::new("Bona".into(), addr, t0);
        for _ in 0..7 {
            link.go_down(t0, &mut log, "refused");
        }
        assert_eq!(link.deadline(), Some(t0 + MAX_RETRY));
        // Heard from the neighbour 10 ms later: due at once, and the next failure waits the
        // first backoff again.
        let t1 = t0 + Duration::from_millis(10);
        link.on_neighbour_greeted(t1, &mut log);
        assert_eq!(link.deadline(), Some(t1));
        assert_eq!(link.failures, 0);
        link.go_down(t1, &mut log, "refused");
        assert_eq!(link.deadline(), Some(t1 + FIRST_RETRY));
        // Already due: nothing changes.
        let t2 = t1 + FIRST_RETRY;
        link.on_neighbour_greeted(t2, &mut log);
        assert_eq!(
            (link.deadline(), link.failures),
            (Some(t1 + FIRST_RETRY), 1)
        );
    }

    #[test]
    fn a_greeting_cuts_short_a_handshake_that_has_waited_long_but_not_a_young_one() {
        let t0 = Instant::now();
        let (mut around, mut link) = authenticating(t0);
        // The neighbour's own dial got through while ours is a round trip old: crossed dials.
        link.on_neighbour_greeted(t0 + Duration::from_millis(5), &mut around.log);
        assert_eq!(link.state_name(), "Authenticating");
        // A second after ours began, its greeting says the way is open and ours is lost.
        let t1 = t0 + STALE_HANDSHAKE;
        link.on_neighbour_greeted(t1, &mut around.log);
        assert_eq!(link.state_name(), "Down");
        assert_eq!(link.deadline(), Some(t1));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let waits: Vec<u128> = (0..8).map(|f| backoff(f).as_millis()).collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(backoff(u32::MAX), MAX_RETRY);
    }
}
