//! The shell of a load: one thread, one `mio::Poll`, and a state machine per connection, built
//! like the server it measures.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::args::{LoadOptions, Sources};
use super::requests::*;
use super::stats::*;
use crate::bytes::escape_into;
use crate::wire::OutBuf;
use mio::event::Event;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Registry, Token};

/// Size of the one read buffer shared by every connection.
pub(super) const READ_CHUNK: usize = 64 * 1024;
/// Events taken from the kernel per poll.
pub(super) const EVENTS_PER_POLL: usize = 1024;
/// How long the replies still due may take once the measured window has closed.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Priming gives up when no reply at all has come for this long (the server is not answering).
pub(super) const PRIMING_STALL: Duration = Duration::from_secs(5);
/// How much of a bad reply the first error quotes.
pub(super) const ERROR_QUOTE_BYTES: usize = 200;

/// Where the run is. Every transition is in [`Generator::next_phase`].
#[derive(Debug, Clone)]
pub(super) enum Phase {
    /// Before a load with WHATSAT: one IAMAT per client id, all answered, so that every WHATSAT
    /// asks about a client the server knows. Gives up after `PRIMING_STALL` without a reply.
    Priming { answered: u64, stalled_at: Instant },
    /// The load runs; replies are checked but not counted until `measure_from`.
    WarmingUp { measure_from: Instant },
    /// Replies are counted. `from` and `cpu_from` were read in the turn that opened the window.
    Measuring {
        from: Instant,
        cpu_from: Duration,
        until: Instant,
    },
    /// No new commands; the replies still due have until `deadline`.
    Draining { deadline: Instant, window: Measured },
    /// Finished: the window's figures, or why there are none.
    Done(Result<Measured, String>),
}

impl Phase {
    /// When the loop must wake up even if no socket does.
    pub(super) fn deadline(&self) -> Option<Instant> {
        match self {
            Phase::Priming { stalled_at, .. } => Some(*stalled_at),
            Phase::WarmingUp { measure_from } => Some(*measure_from),
            Phase::Measuring { until, .. } => Some(*until),
            Phase::Draining { deadline, .. } => Some(*deadline),
            Phase::Done(_) => None,
        }
    }

    /// What may be sent in this phase.
    pub(super) fn sending(&self) -> Sending {
        match self {
            Phase::Priming { .. } => Sending::Primers,
            Phase::WarmingUp { .. } | Phase::Measuring { .. } => Sending::Load,
            Phase::Draining { .. } | Phase::Done(_) => Sending::Nothing,
        }
    }
}

// The shell: one connection

/// Where one connection is in its life. The socket lives in the states that have one.
pub(super) enum ConnState {
    /// No socket: a one-shot slot between two commands, or a pipelined connection that failed
    /// (those are not redialled: the load keeps running on the others).
    Idle,
    /// A non-blocking connect is under way: a WRITABLE event, no socket error and a peer
    /// address finish it (mio's `TcpStream::connect` docs).
    Connecting(TcpStream),
    /// Connected: commands go out, replies come in.
    Open(TcpStream),
    /// One-shot: the command is written and the write side shut; reading to the end of stream.
    HalfClosed(TcpStream),
    /// Finished with, or failed. The end of the turn deregisters and drops the socket, so that
    /// no later event of the same batch finds its token reused.
    Closed(TcpStream),
}

/// One connection of the load: its state, its buffers, and the commands it waits on.
pub(super) struct Conn {
    pub(super) state: ConnState,
    pub(super) out: OutBuf,
    /// Bytes read and not yet parsed as whole replies.
    pub(super) input: Vec<u8>,
    /// Commands sent and not yet answered, oldest first: replies come in this order.
    pub(super) pending: VecDeque<Pending>,
    /// Already listed for the end-of-turn pass.
    pub(super) dirty: bool,
}

impl Conn {
    /// A connection with no socket yet, room for `in_flight` commands outstanding.
    pub(super) fn new(in_flight: usize) -> Conn {
        Conn {
            state: ConnState::Idle,
            out: OutBuf::default(),
            input: Vec::new(),
            pending: VecDeque::with_capacity(in_flight),
            dirty: false,
        }
    }

    /// A WRITABLE (or error) event while connecting: finished, failed, or spurious.
    pub(super) fn on_connect_event(&mut self, tally: &mut Tally) {
        let ConnState::Connecting(stream) = &self.state else {
            return;
        };
        let outcome = match stream.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match stream.peer_addr() {
                Ok(_) => Ok(true),
                // Spurious wake-up: still connecting.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
                Err(e) => Err(e),
            },
        };
        match outcome {
            Ok(true) => self.become_with_stream(ConnState::Open),
            Ok(false) => {}
            Err(e) => self.fail(tally, || format!("cannot connect: {e}")),
        }
    }

    /// Reads until the socket is empty, parsing replies as they come. Edge-triggered: the
    /// kernel will not tell us again about bytes we leave unread.
    ///
    /// A read that fills less than `scratch` has emptied the socket, and bytes arriving later
    /// raise a new edge: so the loop stops there, without the read that would only say
    /// `WouldBlock` (a third of the system calls of a pipelined exchange). The exception is
    /// `closed`, the kernel having said the server's end of stream is already here: no new
    /// edge will come for it, so that read must be made now.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_readable(
        &mut self,
        now: Instant,
        counted: bool,
        closed: bool,
        tally: &mut Tally,
        scratch: &mut [u8],
        expect: &mut Vec<u8>,
        prefix: &[u8],
    ) {
        loop {
            let (ConnState::Open(stream) | ConnState::HalfClosed(stream)) = &mut self.state else {
                return;
            };
            match stream.read(scratch) {
                Ok(0) => return self.on_end_of_stream(tally),
                Ok(n) => {
                    self.input.extend_from_slice(&scratch[..n]);
                    self.take_replies(now, counted, tally, expect, prefix);
                    if n < scratch.len() && !closed {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(tally, || format!("read failed: {e}")),
            }
        }
    }

    /// Matches whole replies against the commands waiting for them, first in, first out.
    pub(super) fn take_replies(
        &mut self,
        now: Instant,
        counted: bool,
        tally: &mut Tally,
        expect: &mut Vec<u8>,
        prefix: &[u8],
    ) {
        let mut at = 0;
        while at < self.input.len() {
            let rest = &self.input[at..];
            let Some(asked) = self.pending.front().copied() else {
                tally.error(1, || {
                    format!("bytes with no command waiting for them: {}", quote(rest))
                });
                at = self.input.len();
                break;
            };
            let Some((len, verdict)) = parse_reply(rest, expect_for(&asked, prefix, expect)) else {
                break; // incomplete: the rest is on its way
            };
            self.pending.pop_front();
            tally.outstanding -= 1;
            tally.answered += 1;
            match verdict {
                Ok(()) if counted => {
                    tally.requests += 1;
                    tally
                        .latency
                        .record(now.saturating_duration_since(asked.sent_at));
                }
                Ok(()) => {}
                Err(why) => tally.error(1, || {
                    let mut client = Vec::new();
                    write_client_id(&mut client, prefix, asked.client);
                    format!(
                        "{why}: {} {} answered {}",
                        asked.kind.verb(),
                        String::from_utf8_lossy(&client),
                        quote(&rest[..len])
                    )
                }),
            }
            at += len;
        }
        self.input.drain(..at);
    }

    /// The server closed its side: the end of a one-shot exchange, or, with replies still
    /// due, a failure.
    pub(super) fn on_end_of_stream(&mut self, tally: &mut Tally) {
        match self.state {
            // The one-shot exchange is complete: the server answered, then closed.
            ConnState::HalfClosed(_) if self.pending.is_empty() => {
                self.become_with_stream(ConnState::Closed)
            }
            _ => {
                let due = self.pending.len();
                self.fail(tally, || {
                    format!("the server closed the connection with {due} replies due")
                })
            }
        }
    }

    /// Adds commands until `in_flight` are outstanding (pipelined connections only).
    pub(super) fn top_up(
        &mut self,
        in_flight: usize,
        sending: Sending,
        now: Instant,
        requests: &mut Requests,
        tally: &mut Tally,
        line: &mut Vec<u8>,
    ) {
        while self.pending.len() < in_flight {
            line.clear();
            let Some(asked) = requests.make(sending, now, line) else {
                return;
            };
            self.out.push(line);
            self.pending.push_back(asked);
            tally.outstanding += 1;
        }
    }

    /// Writes what is pending, until done or the socket would block (WRITABLE will say when
    /// there is room again). A one-shot connection then shuts its write side, as the course's
    /// clients do: the server answers, then closes.
    ///
    /// A one-shot connection writes while still `Connecting`: over loopback the handshake is
    /// usually over by the time `connect()` returns, and a write that goes through proves the
    /// connection as well as the WRITABLE event and the two checks of `on_connect_event` would,
    /// for a third of the system calls. Not connected yet, the write says `WouldBlock` (Linux)
    /// or `NotConnected`, and WRITABLE comes when it is; a failed connect fails the write.
    pub(super) fn flush(&mut self, one_shot: bool, tally: &mut Tally) {
        let connecting = matches!(self.state, ConnState::Connecting(_));
        let (ConnState::Open(stream) | ConnState::Connecting(stream)) = &mut self.state else {
            return;
        };
        if connecting && !one_shot {
            return; // a pipelined connect is finished by `on_connect_event`
        }
        let before = self.out.pending();
        match self.out.write_to(stream) {
            Ok(()) if connecting && self.out.pending() == before => {}
            Err(e) if connecting && e.kind() == io::ErrorKind::NotConnected => {}
            Ok(()) if self.out.pending() == 0 && one_shot => {
                match stream.shutdown(Shutdown::Write) {
                    Ok(()) => self.become_with_stream(ConnState::HalfClosed),
                    Err(e) => self.fail(tally, || format!("shutdown failed: {e}")),
                }
            }
            Ok(()) if connecting => self.become_with_stream(ConnState::Open),
            Ok(()) => {}
            Err(e) if connecting => self.fail(tally, || format!("cannot connect: {e}")),
            Err(e) => self.fail(tally, || format!("write failed: {e}")),
        }
    }

    /// Every command still outstanding on this connection fails (at least one error is counted:
    /// a connection lost is one); the socket closes at the end of the turn.
    pub(super) fn fail(&mut self, tally: &mut Tally, why: impl FnOnce() -> String) {
        tally.error(self.pending.len().max(1), why);
        tally.outstanding -= self.pending.len();
        self.pending.clear();
        self.input.clear();
        self.out = OutBuf::default();
        self.become_with_stream(ConnState::Closed);
    }

    /// Moves the socket into the state `next` (no-op when there is no socket).
    pub(super) fn become_with_stream(&mut self, next: fn(TcpStream) -> ConnState) {
        self.state = match std::mem::replace(&mut self.state, ConnState::Idle) {
            ConnState::Connecting(s)
            | ConnState::Open(s)
            | ConnState::HalfClosed(s)
            | ConnState::Closed(s) => next(s),
            ConnState::Idle => ConnState::Idle,
        };
    }
}

/// A non-blocking connect from `source` (any port) to `addr`. The port is chosen at `connect()`
/// (`IP_BIND_ADDRESS_NO_PORT`), so that it need only be unique for this source and
/// destination, not for every destination as `bind()` alone would have it.
#[cfg(target_os = "linux")]
pub(super) fn connect_from(source: Ipv4Addr, addr: SocketAddrV4) -> io::Result<TcpStream> {
    use std::mem::size_of;
    use std::os::fd::{FromRawFd, OwnedFd};

    pub(super) fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
        match rc {
            -1 => Err(io::Error::last_os_error()),
            rc => Ok(rc),
        }
    }
    pub(super) fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        }
    }
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: plain system calls on a descriptor this function owns from the moment it exists
    // (`OwnedFd` closes it on every early return), with pointers to live locals and their sizes.
    unsafe {
        let fd = check(libc::socket(libc::AF_INET, flags, 0))?;
        let socket = OwnedFd::from_raw_fd(fd);
        let on: libc::c_int = 1;
        check(libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ))?;
        let from = sockaddr(SocketAddrV4::new(source, 0));
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        check(libc::bind(
            fd,
            (&from as *const libc::sockaddr_in).cast(),
            len,
        ))?;
        let to = sockaddr(addr);
        match check(libc::connect(
            fd,
            (&to as *const libc::sockaddr_in).cast(),
            len,
        )) {
            Err(e) if e.raw_os_error() != Some(libc::EINPROGRESS) => return Err(e),
            _ => {}
        }
        Ok(TcpStream::from_std(std::net::TcpStream::from(socket)))
    }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn connect_from(_source: Ipv4Addr, addr: SocketAddrV4) -> io::Result<TcpStream> {
    TcpStream::connect(SocketAddr::V4(addr)) // `Sources::check` refused `--sources` already
}

/// Starts a non-blocking connect, from `source` when given, registered once for both readiness
/// kinds (as the server's sockets are: edge-triggered WRITABLE interest costs nothing while
/// output flows).
pub(super) fn dial(
    registry: &Registry,
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
    slot: usize,
    pipelined: bool,
) -> io::Result<TcpStream> {
    let mut stream = match (source, addr) {
        (Some(source), SocketAddr::V4(addr)) => connect_from(source, addr)?,
        _ => TcpStream::connect(addr)?,
    };
    // Pipelined commands are small and follow each other: Nagle's algorithm would hold one
    // back until the previous one is acknowledged. A one-shot command is one write.
    if pipelined {
        stream.set_nodelay(true)?;
    }
    registry.register(
        &mut stream,
        Token(slot),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    Ok(stream)
}

/// The first bytes of a reply, escaped, for an error message.
pub(super) fn quote(bytes: &[u8]) -> String {
    let mut out = Vec::new();
    escape_into(&mut out, &bytes[..bytes.len().min(ERROR_QUOTE_BYTES)]);
    if bytes.len() > ERROR_QUOTE_BYTES {
        out.extend_from_slice(b"...");
    }
    format!("\"{}\"", String::from_utf8_lossy(&out))
}

// The shell: the loop

/// Generates load as `opts` says, then reports. Blocks for the warm-up, the window and at most
/// `DRAIN_TIMEOUT` more (plus priming, for a load with WHATSAT).
pub fn run(opts: &LoadOptions) -> Result<LoadReport, String> {
    Generator::new(opts)?.run()
}

/// The generator: the poll, every connection, and the run's timeline. A token is a
/// connection's slot in `conns`, and nothing else.
pub(super) struct Generator<'a> {
    pub(super) opts: &'a LoadOptions,
    pub(super) poll: Poll,
    pub(super) conns: Vec<Conn>,
    /// Connections listed for the end-of-turn pass: to top up, write, close or redial.
    pub(super) dirty: Vec<usize>,
    /// Connections with a socket that is not yet closed.
    pub(super) live: usize,
    pub(super) requests: Requests,
    pub(super) tally: Tally,
    pub(super) phase: Phase,
    /// The read buffer every connection shares.
    pub(super) scratch: Vec<u8>,
    /// A command being made, or the fields a reply must copy; reused, never freed.
    pub(super) line: Vec<u8>,
    pub(super) sources: Sources,
}

impl<'a> Generator<'a> {
    /// A generator for `opts`, its pipelined connections dialled and its first phase begun.
    pub(super) fn new(opts: &'a LoadOptions) -> Result<Generator<'a>, String> {
        let poll = Poll::new().map_err(|e| format!("cannot create the poll: {e}"))?;
        let epoch_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let now = Instant::now();
        let mut generator = Generator {
            opts,
            poll,
            conns: (0..opts.connections)
                .map(|_| Conn::new(opts.in_flight))
                .collect(),
            dirty: Vec::new(),
            live: 0,
            requests: Requests::new(opts, now, epoch_ns),
            tally: Tally {
                latency: Histogram::new(),
                requests: 0,
                answered: 0,
                errors: 0,
                first_error: None,
                outstanding: 0,
            },
            phase: Phase::Priming {
                answered: 0,
                stalled_at: now + PRIMING_STALL,
            },
            scratch: vec![0; READ_CHUNK],
            line: Vec::new(),
            sources: Sources::new(opts.sources),
        };
        // Pipelined connections are dialled once, here; one-shot ones when they have a command.
        if !opts.one_shot {
            for slot in 0..opts.connections {
                let source = generator.sources.next();
                match dial(generator.poll.registry(), opts.addr, source, slot, true) {
                    Ok(stream) => {
                        generator.conns[slot].state = ConnState::Connecting(stream);
                        generator.live += 1;
                    }
                    Err(e) => generator
                        .tally
                        .error(1, || format!("cannot connect to {}: {e}", opts.addr)),
                }
            }
        }
        generator.mark_all_dirty();
        generator.advance(now);
        Ok(generator)
    }

    /// Turns the loop until the run is done: poll until an event or the phase's deadline;
    /// dispatch each event; at the end of the turn top up, write, close and redial; then move
    /// the timeline on.
    ///
    /// The clock is read twice a turn: when `poll` returns (the replies read in this turn
    /// completed then) and before the writes (the commands written in this turn start then, and
    /// deadlines are judged by it).
    pub(super) fn run(mut self) -> Result<LoadReport, String> {
        let mut events = Events::with_capacity(EVENTS_PER_POLL);
        loop {
            if let Phase::Done(result) = &self.phase {
                let result = result.clone();
                return result.map(|window| self.tally.report(window));
            }
            // A paced load wakes for its next command even if no socket does, if a connection
            // has room for it. When none has (the server is behind the schedule), a reply makes
            // the room: waking for the clock then would only spin.
            let paced = match self.phase.sending() {
                Sending::Load if !self.requests.exhausted() => self
                    .requests
                    .next_send_at()
                    .filter(|_| self.room_for_a_command()),
                _ => None,
            };
            // A connection left dirty (a redial that failed) is retried at once.
            let timeout = match self.dirty.is_empty() {
                true => self
                    .phase
                    .deadline()
                    .into_iter()
                    .chain(paced)
                    .min()
                    .map(|at| at.saturating_duration_since(Instant::now())),
                false => Some(Duration::ZERO),
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(format!("poll failed: {e}"));
                }
            }
            let now = Instant::now();
            for event in events.iter() {
                self.dispatch(event, now);
            }
            let now = Instant::now();
            if paced.is_some_and(|at| at <= now) {
                self.mark_all_dirty(); // the schedule lets commands out: any connection may send
            }
            self.end_turn(now);
            self.advance(now);
        }
    }

    /// One event: the connection of its token connects, or reads. Writing waits for the end
    /// of the turn.
    pub(super) fn dispatch(&mut self, event: &Event, now: Instant) {
        let slot = event.token().0;
        let counted = matches!(self.phase, Phase::Measuring { .. });
        let Some(conn) = self.conns.get_mut(slot) else {
            return;
        };
        match conn.state {
            // The write at the end of the turn finishes a one-shot connect, or says it failed.
            ConnState::Connecting(_) if self.opts.one_shot => {}
            ConnState::Connecting(_) => conn.on_connect_event(&mut self.tally),
            ConnState::Open(_) | ConnState::HalfClosed(_) => {
                let closed = event.is_read_closed() || event.is_error();
                if event.is_readable() || closed {
                    conn.on_readable(
                        now,
                        counted,
                        closed,
                        &mut self.tally,
                        &mut self.scratch,
                        &mut self.line,
                        &self.requests.prefix,
                    );
                }
            }
            // A late event for a socket already done with.
            ConnState::Idle | ConnState::Closed(_) => return,
        }
        // Replies made room for commands, or the socket for output: the end of the turn writes.
        self.mark_dirty(slot);
    }

    /// End of the turn, for each connection that had something happen: top up and write (so a
    /// whole turn's commands go out in one write), drop a closed socket, give a one-shot slot
    /// its next command.
    pub(super) fn end_turn(&mut self, now: Instant) {
        let sending = self.phase.sending();
        let one_shot = self.opts.one_shot;
        for slot in std::mem::take(&mut self.dirty) {
            let conn = &mut self.conns[slot];
            conn.dirty = false;
            if let ConnState::Open(_) = conn.state {
                if !one_shot {
                    conn.top_up(
                        self.opts.in_flight,
                        sending,
                        now,
                        &mut self.requests,
                        &mut self.tally,
                        &mut self.line,
                    );
                }
            }
            conn.flush(one_shot, &mut self.tally);
            if let ConnState::Closed(_) = conn.state {
                // Closing the descriptor takes it out of epoll: no `deregister` call needed.
                conn.state = ConnState::Idle;
                self.live -= 1;
            }
            if one_shot && matches!(conn.state, ConnState::Idle) {
                self.redial(slot, sending, now);
            }
        }
    }

    /// A one-shot slot's next command: made first (there may be none left), then the connect.
    /// The command is queued at once, so its latency includes the connect.
    pub(super) fn redial(&mut self, slot: usize, sending: Sending, now: Instant) {
        self.line.clear();
        let Some(asked) = self.requests.make(sending, now, &mut self.line) else {
            return;
        };
        let source = self.sources.next();
        match dial(self.poll.registry(), self.opts.addr, source, slot, false) {
            Ok(stream) => {
                let conn = &mut self.conns[slot];
                conn.state = ConnState::Connecting(stream);
                conn.out.push(&self.line);
                conn.pending.push_back(asked);
                self.tally.outstanding += 1;
                self.live += 1;
                conn.flush(true, &mut self.tally);
                if !matches!(
                    conn.state,
                    ConnState::Connecting(_) | ConnState::HalfClosed(_)
                ) {
                    // Failed at once, or written in part: the next turn closes it or writes on.
                    self.mark_dirty(slot);
                }
            }
            Err(e) => {
                let addr = self.opts.addr;
                self.tally
                    .error(1, || format!("cannot connect to {addr}: {e}"));
                self.mark_dirty(slot); // try again next turn, not in a loop here
            }
        }
    }

    /// Moves the timeline on as far as `now` allows.
    pub(super) fn advance(&mut self, now: Instant) {
        while let Some(next) = self.next_phase(now) {
            let starts_load = matches!(next, Phase::WarmingUp { .. });
            self.phase = next;
            if starts_load {
                self.mark_all_dirty(); // every connection may send, or dial, now
            }
        }
    }

    /// The timeline's transitions, all of them.
    pub(super) fn next_phase(&mut self, now: Instant) -> Option<Phase> {
        let opts = self.opts;
        let all_answered = self.all_answered();
        let tally = &mut self.tally;
        // Pipelined connections are not redialled: with none left, nothing more can happen.
        let stranded = !opts.one_shot && self.live == 0;
        let no_figures = |tally: &Tally, what: &str| {
            let first = tally.first_error.as_deref().unwrap_or("no error seen");
            Phase::Done(Err(format!("{what} (first error: {first})")))
        };
        match &self.phase {
            // Every connection failed before the window opened.
            Phase::Priming { .. } | Phase::WarmingUp { .. } if stranded => Some(no_figures(
                tally,
                &format!("no connection to {} is left", opts.addr),
            )),
            // Every connection failed in the window: report what it saw.
            Phase::Measuring { from, cpu_from, .. } if stranded => {
                Some(Phase::Done(Ok(Measured::close(*from, *cpu_from, now))))
            }
            // Every client id is known: the load starts, and the warm-up with it.
            Phase::Priming { .. } if self.requests.primed() && tally.outstanding == 0 => {
                Some(Phase::WarmingUp {
                    measure_from: now + opts.warmup,
                })
            }
            // Priming replies still come: push the stall deadline back.
            Phase::Priming { answered, .. } if *answered != tally.answered => {
                Some(Phase::Priming {
                    answered: tally.answered,
                    stalled_at: now + PRIMING_STALL,
                })
            }
            Phase::Priming { stalled_at, .. } if now >= *stalled_at => Some(no_figures(
                tally,
                &format!(
                    "priming stalled: no reply for {} s with {} IAMATs unanswered",
                    PRIMING_STALL.as_secs(),
                    tally.outstanding
                ),
            )),
            // The warm-up is over (or --requests were all made and answered): the window opens.
            Phase::WarmingUp { measure_from } if now >= *measure_from || all_answered => {
                Some(Phase::Measuring {
                    from: now,
                    cpu_from: cpu_time(),
                    until: now + opts.duration,
                })
            }
            // The window closes; no new commands.
            Phase::Measuring {
                from,
                cpu_from,
                until,
            } if now >= *until || all_answered => Some(Phase::Draining {
                deadline: now + DRAIN_TIMEOUT,
                window: Measured::close(*from, *cpu_from, now),
            }),
            // Every reply is in.
            Phase::Draining { window, .. } if tally.outstanding == 0 => {
                Some(Phase::Done(Ok(*window)))
            }
            // Replies still missing after the grace period: each is an error.
            Phase::Draining { deadline, window } if now >= *deadline => {
                let missing = tally.outstanding;
                tally.error(missing, || {
                    format!(
                        "{missing} replies still missing {} s after the window closed",
                        DRAIN_TIMEOUT.as_secs()
                    )
                });
                Some(Phase::Done(Ok(*window)))
            }
            _ => None,
        }
    }

    /// Every command `--requests` allows was made and answered.
    pub(super) fn all_answered(&self) -> bool {
        self.requests.exhausted() && self.tally.outstanding == 0
    }

    /// Lists connection `slot` for the end of the turn, once however often it is marked.
    pub(super) fn mark_dirty(&mut self, slot: usize) {
        let conn = &mut self.conns[slot];
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(slot);
        }
    }

    /// Whether a command could go out now: a pipelined connection below its in-flight limit,
    /// or a free one-shot slot.
    pub(super) fn room_for_a_command(&self) -> bool {
        let (one_shot, in_flight) = (self.opts.one_shot, self.opts.in_flight);
        self.conns.iter().any(|conn| match conn.state {
            ConnState::Open(_) => !one_shot && conn.pending.len() < in_flight,
            ConnState::Idle => one_shot,
            _ => false,
        })
    }

    /// Lists every connection for the end of the turn.
    pub(super) fn mark_all_dirty(&mut self) {
        for slot in 0..self.conns.len() {
            self.mark_dirty(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::load::args::parse_args;
    use crate::tools::load::args::tests::args;
    use crate::tools::load::args::{Mix, CLIENT_PREFIX};

    /// A stand-in server for `run`, a thread per connection: answers IAMAT as the herd does,
    /// remembers the record, answers WHATSAT with it and a small body, anything else with `?`.
    fn fake_server() -> SocketAddr {
        use std::collections::HashMap;
        use std::io::{BufRead, BufReader, BufWriter, Write};
        use std::sync::{Arc, Mutex};

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let records = Arc::new(Mutex::new(HashMap::<String, String>::new()));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let records = records.clone();
                std::thread::spawn(move || {
                    let Ok(read_half) = stream.try_clone() else {
                        return;
                    };
                    let mut reader = BufReader::new(read_half);
                    let mut writer = BufWriter::new(stream);
                    let mut line = String::new();
                    while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                        let fields: Vec<&str> = line.split_whitespace().collect();
                        let reply = match fields[..] {
                            ["IAMAT", client, location, time] => {
                                let record =
                                    format!("AT Fake +0.000000001 {client} {location} {time}");
                                records
                                    .lock()
                                    .unwrap()
                                    .insert(client.into(), record.clone());
                                record + "\n"
                            }
                            ["WHATSAT", client, _, _] => {
                                match records.lock().unwrap().get(client) {
                                    Some(record) => format!("{record}\n{{\"results\" : []}}\n\n"),
                                    None => format!("? {}\n", line.trim_end()),
                                }
                            }
                            _ => format!("? {}\n", line.trim_end()),
                        };
                        line.clear();
                        // Answer a whole batch of pipelined commands in one write.
                        let flushed =
                            writer.write_all(reply.as_bytes()).and_then(|()| {
                                match reader.buffer().is_empty() {
                                    true => writer.flush(),
                                    false => Ok(()),
                                }
                            });
                        if flushed.is_err() {
                            return;
                        }
                    }
                    let _ = writer.flush();
                });
            }
        });
        addr
    }

    #[test]
    fn sources_take_turns_from_127_0_0_2() {
        let mut sources = Sources::new(3);
        let taken: Vec<_> = (0..4).map(|_| sources.next()).collect();
        let ip = |d| Some(Ipv4Addr::new(127, 0, 0, d));
        assert_eq!(taken, [ip(2), ip(3), ip(4), ip(2)]);
        assert_eq!(Sources::new(1).next(), None);
        assert_eq!(
            Sources::new(Sources::MAX).addrs.last(),
            Some(&Ipv4Addr::new(127, 0, 0, 254))
        );
        // The kernel really connects from them.
        if cfg!(target_os = "linux") {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let SocketAddr::V4(addr) = listener.local_addr().unwrap() else {
                unreachable!("bound to an IPv4 address");
            };
            let _stream = connect_from(Ipv4Addr::new(127, 0, 0, 3), addr).unwrap();
            let (_, peer) = listener.accept().unwrap();
            assert_eq!(peer.ip(), Ipv4Addr::new(127, 0, 0, 3));
        }
    }

    #[test]
    fn a_paced_load_waits_for_replies_when_every_connection_is_full() {
        // A server that accepts and never answers: the one command allowed in flight stays
        // outstanding, and the schedule falls behind at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let opts = parse_args(&args(&format!(
            "--addr {addr} -c 1 -p 1 -d 400 --warmup-ms 0 --clients 10 --rate 1000000"
        )))
        .unwrap();
        let report = run(&opts).unwrap();
        drop(listener);
        assert_eq!(report.requests, 0, "{report:?}");
        // Waking for the clock with nowhere to send would spin for the whole run; waiting for
        // a reply costs next to nothing.
        assert!(report.cpu_seconds < 0.1, "{report:?}");
    }

    #[test]
    fn run_loads_a_fake_server_pipelined_and_one_shot() {
        let addr = fake_server();
        let pipelined = LoadOptions {
            addr,
            connections: 4,
            in_flight: 8,
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(50),
            mix: Mix::Mixed {
                whatsat_percent: 20,
            },
            one_shot: false,
            clients: 100,
            radius_km: "10".into(),
            bound: 5,
            id_prefix: CLIENT_PREFIX.into(),
            rate: None,
            requests: None,
            sources: 1,
        };
        let one_shot = LoadOptions {
            mix: Mix::Iamat,
            in_flight: 1,
            one_shot: true,
            ..pipelined.clone()
        };
        let spread = LoadOptions {
            sources: 3,
            ..one_shot.clone()
        };
        for opts in [pipelined, one_shot, spread] {
            let report = run(&opts).unwrap();
            assert!(report.requests > 0, "{opts:?}: {report:?}");
            assert_eq!(report.errors, 0, "{opts:?}: {report:?}");
            assert!(report.seconds >= 0.3 && report.seconds < 0.5, "{report:?}");
            assert!(
                report.p50_us > 0.0 && report.p50_us <= report.max_us,
                "{report:?}"
            );
        }
    }
}
