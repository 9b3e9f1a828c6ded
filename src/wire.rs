//! Bytes on a non-blocking socket: [`LineReader`] cuts what arrives into lines, [`OutBuf`]
//! holds what waits to be written. A client's connection and a peer link, either way, move
//! their bytes through both ([`Wire`]); the admin endpoint and the load generator write through
//! [`OutBuf`]. A Places slot speaks TLS, and reads and writes through rustls instead
//! ([`crate::places::pool`]).
//!
//! Both follow the edge-triggered rule: a fill reads until the socket is empty, and a write
//! writes until the socket is full or nothing is left, because the kernel announces bytes when
//! they arrive, not while they wait. A fill that stops sooner, at its high-water mark, says so
//! ([`Fill::Full`]).
//!
//! The state machines hold their socket as a [`Transport`]: mio's `TcpStream` in the server,
//! and in their tests a `script::Script` (built only for tests, so not linked here) that plays
//! a conversation from memory, so that a machine is driven with scripted events and an explicit
//! `now`, with no socket at all.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use memchr::memchr;

/// What a state machine needs of its socket beyond reading and writing.
pub trait Transport: Read + Write + Sized {
    /// Starts a non-blocking connect to `addr`; [`Transport::connected`] says when it ends.
    fn connect(addr: SocketAddr) -> io::Result<Self>;
    /// How a non-blocking connect ended: `Ok(true)` connected, `Ok(false)` still in flight (a
    /// readiness event may be spurious), `Err` refused or failed.
    fn connected(&self) -> io::Result<bool>;
    /// Closes the writing side: the other end reads what was written, then the end of the
    /// stream, and may still send.
    fn shutdown_write(&self) -> io::Result<()>;
    /// The bytes written that the kernel still holds, not yet acknowledged by the other end,
    /// where the operating system says (Linux's `SIOCOUTQ`); `None` elsewhere.
    fn queued(&self) -> Option<usize>;
}

impl Transport for mio::net::TcpStream {
    // Only the sockets this server dials come through here; the loop sets the same option on
    // each connection it accepts.
    fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = mio::net::TcpStream::connect(addr)?;
        // A line goes out as soon as it is written: not held back by Nagle's algorithm until
        // the other end acknowledges the last one, which it may delay.
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    fn connected(&self) -> io::Result<bool> {
        // The connect has ended if the socket has an error or a peer address; neither means the
        // event was spurious and the connect is still in flight.
        match self.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => match self.peer_addr() {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
                Err(e) => Err(e),
            },
        }
    }

    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }

    // Back-pressure counts what the kernel holds for a client as unread; elsewhere only what
    // waits in the connection's own buffer counts.
    #[cfg(target_os = "linux")]
    fn queued(&self) -> Option<usize> {
        use std::os::fd::AsRawFd;
        let mut bytes: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer, which is valid.
        let done = unsafe { libc::ioctl(self.as_raw_fd(), libc::TIOCOUTQ, &mut bytes) };
        (done == 0).then(|| usize::try_from(bytes).unwrap_or(0))
    }

    #[cfg(not(target_os = "linux"))]
    fn queued(&self) -> Option<usize> {
        None
    }
}

/// Buffers whose capacity outgrows this are freed once empty, so an idle connection holds no
/// heap memory however busy it once was.
const KEEP_CAPACITY: usize = 16 * 1024;

/// Bytes read from a socket, cut into lines. A line is handed out as a slice of the buffer,
/// valid until the next call: it costs no copy of its own.
#[derive(Debug, Default)]
pub struct LineReader {
    /// Lines already handed out, before `start`; bytes not yet handed out, after it.
    buf: Vec<u8>,
    /// Start of the first line not yet handed out.
    start: usize,
    /// How far past `start` is known to hold no `\n`: a line that arrives a few bytes a read
    /// is searched once, not once per read.
    scanned: usize,
    /// The peer has half-closed: a final line without `\n` is still a line.
    eof: bool,
    /// An event said the peer closed its side; the end of stream is yet to be read.
    hangup: bool,
    /// The last fill stopped at the high-water mark, not at `WouldBlock`: the socket may hold
    /// more, and the kernel will not say so again.
    full: bool,
}

/// Why a fill stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// The socket would block: everything the kernel had is read.
    Drained,
    /// End of stream.
    Eof,
    /// The buffer reached the high-water mark; the socket may hold more. The kernel will not
    /// tell us again, so whoever drains the buffer must fill again.
    Full,
}

/// One line handed out by [`LineReader::next_line`].
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A whole line, without its `\n`.
    Complete(&'a [u8]),
    /// A line over the limit: its first bytes. Nothing after it can be trusted to be a line.
    TooLong(&'a [u8]),
}

/// How much of an overlong line is quoted back.
pub const TOO_LONG_PREFIX: usize = 64;

impl LineReader {
    /// Reads until the socket would block, the stream ends, or `high_water` bytes are buffered.
    /// `scratch` is the loop's shared read buffer: only bytes that arrive are kept here.
    /// `hangup` when the event said the peer closed its side: then it reads to the end.
    /// Stopping at `high_water` leaves bytes in the socket that no event will announce again:
    /// [`Fill::Full`] says so, and whoever hands out lines must fill again once it has room.
    pub fn fill(
        &mut self,
        stream: &mut impl Read,
        scratch: &mut [u8],
        high_water: usize,
        hangup: bool,
    ) -> io::Result<Fill> {
        self.hangup |= hangup;
        self.full = false;
        if self.eof {
            return Ok(Fill::Eof);
        }
        loop {
            if self.buffered() >= high_water {
                self.full = true;
                return Ok(Fill::Full);
            }
            match stream.read(scratch) {
                // A read of nothing is the end of the stream: every read after it says the same.
                Ok(0) => {
                    self.eof = true;
                    return Ok(Fill::Eof);
                }
                Ok(n) => {
                    // Everything handed out: start again from the front. A connection's serve
                    // refills between its lines and compacts only at its end, and would
                    // otherwise grow the buffer behind lines it has already run.
                    if self.start > 0 && self.start == self.buf.len() {
                        self.buf.clear();
                        self.start = 0;
                        self.scanned = 0;
                    }
                    self.buf.extend_from_slice(&scratch[..n]);
                    // A short read means the socket's queue is empty: bytes arriving later
                    // raise a new edge, so the read that would only say `WouldBlock` is
                    // skipped (one system call fewer per request). Not when the stream's end
                    // has been signalled: that arrived before this read and raises no new edge.
                    if n < scratch.len() && !self.hangup {
                        return Ok(Fill::Drained);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::Drained),
                // A signal arrived during the read: nothing was read, so read again.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A reset, most likely: the caller closes the connection.
                Err(e) => return Err(e),
            }
        }
    }

    /// Bytes read and not yet handed out as lines.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Whether a read has found the end of the stream (lines may still be buffered).
    pub fn at_eof(&self) -> bool {
        self.eof
    }

    /// Whether all that is buffered is the start of a line whose end has not come yet.
    pub fn waiting_for_newline(&self) -> bool {
        self.buffered() > 0 && self.scanned == self.buffered()
    }

    /// Whether the socket may hold bytes not read yet, which no event will announce.
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Whether a whole line may be buffered (bytes not yet searched for a `\n`, or a last line
    /// the end of the stream made whole).
    pub fn has_line(&self) -> bool {
        self.buffered() > self.scanned || (self.eof && self.buffered() > 0)
    }

    /// Drops everything buffered: what a connection that only waits to close still sends.
    pub fn discard(&mut self) {
        self.start = self.buf.len();
        self.scanned = 0;
        self.compact();
    }

    /// The next line, if a whole one is buffered (or the stream ended after a partial one).
    /// A line over `max_line_bytes` is [`Line::TooLong`] as soon as more than that many bytes
    /// have come without a `\n`, not when its end comes (which may be never).
    pub fn next_line(&mut self, max_line_bytes: usize) -> Option<Line<'_>> {
        let pending = &self.buf[self.start..];
        let found = memchr(b'\n', &pending[self.scanned..]);
        let (len, consumed) = match found {
            Some(i) => (self.scanned + i, self.scanned + i + 1),
            // Over the limit with no end in sight: everything buffered goes with it, and the
            // rest of that line, still to come, would read as lines of its own.
            None if pending.len() > max_line_bytes => (pending.len(), pending.len()),
            // The stream ended after a last line without `\n`: still a line
            // (docs/protocol.md section 2).
            None if self.eof && !pending.is_empty() => (pending.len(), pending.len()),
            None => {
                self.scanned = pending.len();
                return None;
            }
        };
        let line_start = self.start;
        self.start += consumed;
        self.scanned = 0;
        let line = &self.buf[line_start..line_start + len];
        Some(if len > max_line_bytes {
            Line::TooLong(&line[..TOO_LONG_PREFIX.min(len)])
        } else {
            Line::Complete(line)
        })
    }

    /// Drops handed-out lines from the buffer; frees it when empty and large.
    /// Moving what is left to the front costs a copy of it, so it is done once at least half
    /// the buffer has been handed out: a connection that holds many lines back (its share of
    /// the turn spent) does not copy them all at every turn.
    pub fn compact(&mut self) {
        if self.start == 0 || self.start < self.buf.len() - self.start {
            return;
        }
        self.buf.drain(..self.start);
        self.start = 0;
        if self.buf.is_empty() && self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        }
    }
}

/// Bytes waiting to be written to a socket. What a turn produces is appended whole, and the
/// server writes it at the end of the turn in as few writes as the kernel takes: a pipelined
/// burst of replies costs one write, and a WHATSAT's reply leaves in one when the kernel has
/// room (classic clients read once, docs/protocol.md section 4).
#[derive(Debug, Default)]
pub struct OutBuf {
    /// Bytes already written, before `sent`; bytes still to write, after it. The written ones
    /// are dropped only when everything is written: until then the buffer holds all that was
    /// pushed since it was last empty.
    buf: Vec<u8>,
    sent: usize,
}

impl OutBuf {
    /// Appends `bytes`, to be written at the next [`OutBuf::write_to`].
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The buffer, to append to in place (a framed peer line is written straight into it).
    pub fn tail(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Bytes not yet written.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// The bytes not yet written.
    pub fn unsent(&self) -> &[u8] {
        &self.buf[self.sent..]
    }

    /// Writes until everything is written or the socket would block. What is left waits for
    /// a later turn's call; a WRITABLE event, when the kernel has made room, brings one.
    pub fn write_to(&mut self, stream: &mut impl Write) -> io::Result<()> {
        while self.sent < self.buf.len() {
            match stream.write(&self.buf[self.sent..]) {
                // A socket that takes nothing without blocking will never take the rest.
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.sent == self.buf.len() {
            self.sent = 0;
            if self.buf.capacity() > KEEP_CAPACITY {
                self.buf = Vec::new();
            } else {
                self.buf.clear();
            }
        } else if self.sent >= self.buf.len() / 2 {
            // A reader that keeps up but never quite catches up would otherwise keep every byte
            // ever written here: the written half goes, at a cost of one copy of the unsent
            // half, which is no bigger (so each byte is copied once, on average, at most).
            self.buf.drain(..self.sent);
            self.sent = 0;
        }
        Ok(())
    }
}

/// An open connection: its socket and its two buffers. It moves whole from one machine to
/// another, so that a connection handed from [`crate::conn::Conn`] to a neighbour's inbound
/// link keeps the lines already read and the bytes not yet written.
pub struct Wire<S> {
    /// The socket.
    pub stream: S,
    /// What was read and not yet handed out as lines.
    pub reader: LineReader,
    /// What waits to be written.
    pub out: OutBuf,
}

impl<S> Wire<S> {
    /// A connection with nothing read and nothing to write.
    pub fn new(stream: S) -> Wire<S> {
        Wire {
            stream,
            reader: LineReader::default(),
            out: OutBuf::default(),
        }
    }
}

/// A socket played from memory, for the state machines' tests.
#[cfg(test)]
pub mod script {
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::io::{self, Read, Write};
    use std::net::SocketAddr;

    use super::Transport;

    /// One step of what the other end does, as the next read sees it.
    #[derive(Debug, Clone)]
    pub enum Step {
        /// These bytes arrive (a read takes as many as fit; the rest stays first in line).
        Data(Vec<u8>),
        /// Nothing yet: the read would block.
        Block,
        /// The other end closed its side.
        Eof,
    }

    /// A scripted socket: reads play `input`, writes land in `output` until `room` runs out.
    #[derive(Debug, Default)]
    pub struct Script {
        /// What the next reads find, in order; a test may push more between steps.
        pub input: VecDeque<Step>,
        /// Everything written so far.
        pub output: Vec<u8>,
        /// Bytes a write may still take; `None`: any number.
        pub room: Option<usize>,
        /// What [`Transport::queued`] says.
        pub queued: usize,
        /// Whether [`Transport::shutdown_write`] was called (a `Cell`: it takes `&self`).
        pub write_shut: std::cell::Cell<bool>,
        /// What [`Transport::connected`] says: `Some(true)` connected, `Some(false)` refused,
        /// `None` still in flight.
        pub connect: Option<bool>,
    }

    thread_local! {
        /// What the next [`Transport::connect`] calls of this thread return, in order.
        pub static DIALS: RefCell<VecDeque<io::Result<Script>>> =
            const { RefCell::new(VecDeque::new()) };
    }

    impl Script {
        /// A connected socket whose reads play `steps`, and whose writes all go through.
        pub fn reading(steps: &[Step]) -> Script {
            Script {
                input: steps.iter().cloned().collect(),
                connect: Some(true),
                ..Script::default()
            }
        }
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.input.pop_front() {
                None | Some(Step::Block) => Err(io::ErrorKind::WouldBlock.into()),
                // As a real socket, every read after the end says 0 again.
                Some(Step::Eof) => {
                    self.input.push_front(Step::Eof);
                    Ok(0)
                }
                Some(Step::Data(mut bytes)) => {
                    let n = bytes.len().min(buf.len());
                    buf[..n].copy_from_slice(&bytes[..n]);
                    if n < bytes.len() {
                        self.input.push_front(Step::Data(bytes.split_off(n)));
                    }
                    Ok(n)
                }
            }
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = self.room.map_or(buf.len(), |room| room.min(buf.len()));
            // No room: a full send buffer, as a non-blocking socket says it.
            if n == 0 && !buf.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if let Some(room) = &mut self.room {
                *room -= n;
            }
            self.output.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Transport for Script {
        fn connect(_: SocketAddr) -> io::Result<Script> {
            DIALS
                .with(|dials| dials.borrow_mut().pop_front())
                .unwrap_or_else(|| Err(io::ErrorKind::ConnectionRefused.into()))
        }

        fn connected(&self) -> io::Result<bool> {
            match self.connect {
                Some(true) => Ok(true),
                Some(false) => Err(io::ErrorKind::ConnectionRefused.into()),
                None => Ok(false),
            }
        }

        fn shutdown_write(&self) -> io::Result<()> {
            self.write_shut.set(true);
            Ok(())
        }

        fn queued(&self) -> Option<usize> {
            Some(self.queued)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(reader: &mut LineReader, max: usize) -> Vec<Line<'static>> {
        let mut out = Vec::new();
        while let Some(line) = reader.next_line(max) {
            out.push(match line {
                Line::Complete(l) => Line::Complete(Vec::leak(l.to_vec())),
                Line::TooLong(l) => Line::TooLong(Vec::leak(l.to_vec())),
            });
        }
        out
    }

    #[test]
    fn lines_arrive_in_pieces() {
        let mut r = LineReader::default();
        let mut scratch = [0u8; 4];
        assert_eq!(
            r.fill(&mut &b"ab\ncd"[..], &mut scratch, 1000, true)
                .unwrap(),
            Fill::Eof
        );
        assert_eq!(
            lines(&mut r, 100),
            [Line::Complete(b"ab"), Line::Complete(b"cd")]
        );
    }

    #[test]
    fn a_partial_line_waits_for_more_unless_the_stream_ended() {
        let mut r = LineReader {
            buf: b"IAMAT a".to_vec(),
            ..LineReader::default()
        };
        assert_eq!(lines(&mut r, 100), []);
        r.buf.extend_from_slice(b" b c\nx");
        assert_eq!(lines(&mut r, 100), [Line::Complete(b"IAMAT a b c")]);
        r.eof = true;
        assert_eq!(lines(&mut r, 100), [Line::Complete(b"x")]);
    }

    #[test]
    fn overlong_lines_are_cut() {
        let mut r = LineReader {
            buf: vec![b'x'; 200],
            ..LineReader::default()
        };
        assert_eq!(
            lines(&mut r, 100),
            [Line::TooLong(&[b'x'; TOO_LONG_PREFIX])]
        );
    }

    /// A socket that takes at most `room` bytes per call to `write_to`.
    struct Slow {
        room: usize,
        taken: Vec<u8>,
    }

    impl Write for Slow {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_a_reader_never_quite_catches_up_with_stays_the_size_of_what_is_unsent() {
        let mut out = OutBuf::default();
        let mut socket = Slow {
            room: 0,
            taken: Vec::new(),
        };
        let reply = [b'r'; 100];
        // Every turn 1,000 bytes of replies, and the reader takes 990: the backlog grows by 10 a
        // turn, and the buffer must hold that backlog, not all 1,000,000 bytes written.
        for _ in 0..1000 {
            for _ in 0..10 {
                out.push(&reply);
            }
            socket.room = 990;
            out.write_to(&mut socket).unwrap();
        }
        assert_eq!(out.pending(), 10_000);
        assert_eq!(socket.taken.len(), 990_000);
        assert!(
            out.buf.len() <= 2 * out.pending(),
            "{} bytes held",
            out.buf.len()
        );
        socket.room = usize::MAX;
        out.write_to(&mut socket).unwrap();
        assert_eq!((out.pending(), out.buf.len()), (0, 0));
        assert_eq!(socket.taken.len(), 1_000_000);
    }
}
