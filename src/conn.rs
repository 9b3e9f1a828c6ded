//! An accepted connection: a client, or a neighbour's inbound peer link once it has greeted.
//!
//! The connection owns its bytes: [`LineReader`] holds what was read and not yet handled,
//! [`OutBuf`] what is to be written, and [`Replies`] keeps replies in command order while a
//! WHATSAT waits on Places. What a line *means* is decided in [`crate::herd`].

use std::collections::VecDeque;

use memchr::memchr;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::TcpStream;

use crate::peer::{Comparison, Session};

/// Buffers whose capacity outgrows this are freed once empty, so an idle connection holds no
/// heap memory however busy it once was.
const KEEP_CAPACITY: usize = 16 * 1024;

/// Bytes read from a socket, cut into lines.
#[derive(Debug, Default)]
pub struct LineReader {
    buf: Vec<u8>,
    /// Start of the first line not yet handed out.
    start: usize,
    /// How far past `start` is known to hold no `\n`.
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
                Ok(0) => {
                    self.eof = true;
                    return Ok(Fill::Eof);
                }
                Ok(n) => {
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
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Bytes read and not yet handed out as lines.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

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

    /// The next line, if a whole one is buffered (or the stream ended after a partial one).
    pub fn next_line(&mut self, max_line_bytes: usize) -> Option<Line<'_>> {
        let pending = &self.buf[self.start..];
        let found = memchr(b'\n', &pending[self.scanned..]);
        let (len, consumed) = match found {
            Some(i) => (self.scanned + i, self.scanned + i + 1),
            None if pending.len() > max_line_bytes => (pending.len(), pending.len()),
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
    pub fn compact(&mut self) {
        if self.start == 0 {
            return;
        }
        self.buf.drain(..self.start);
        self.start = 0;
        if self.buf.is_empty() && self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::new();
        }
    }
}

/// Bytes waiting to be written to a socket.
#[derive(Debug, Default)]
pub struct OutBuf {
    buf: Vec<u8>,
    sent: usize,
}

impl OutBuf {
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

    /// Writes until everything is written or the socket would block.
    pub fn write_to(&mut self, stream: &mut impl Write) -> io::Result<()> {
        while self.sent < self.buf.len() {
            match stream.write(&self.buf[self.sent..]) {
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
        }
        Ok(())
    }
}

/// Replies in the order their commands arrived. While nothing waits on Places a reply goes
/// straight to the output; behind a waiting WHATSAT it queues until the WHATSAT is answered.
#[derive(Debug, Default)]
pub struct Replies {
    queue: VecDeque<Reply>,
    waiting: usize,
}

#[derive(Debug)]
enum Reply {
    Ready(Vec<u8>),
    AwaitingPlaces(u64),
}

impl Replies {
    pub fn push(&mut self, out: &mut OutBuf, bytes: &[u8]) {
        if self.queue.is_empty() {
            out.push(bytes);
        } else {
            self.queue.push_back(Reply::Ready(bytes.to_vec()));
        }
    }

    /// Holds the place of the reply to Places job `job`.
    pub fn push_awaiting(&mut self, job: u64) {
        self.queue.push_back(Reply::AwaitingPlaces(job));
        self.waiting += 1;
    }

    /// Fills in job `job`'s reply and releases every reply now at the head of the line.
    pub fn complete(&mut self, out: &mut OutBuf, job: u64, bytes: Vec<u8>) {
        for reply in self.queue.iter_mut() {
            if matches!(reply, Reply::AwaitingPlaces(j) if *j == job) {
                *reply = Reply::Ready(bytes);
                self.waiting -= 1;
                break;
            }
        }
        while let Some(Reply::Ready(_)) = self.queue.front() {
            if let Some(Reply::Ready(bytes)) = self.queue.pop_front() {
                out.push(&bytes);
            }
        }
    }

    /// Replies still waiting on Places.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// What the other end of an accepted connection turned out to be.
pub enum Role {
    /// Nothing but blank lines yet: the first line decides.
    Undecided,
    Client,
    /// Neighbour `neighbour` greeted with its nonce `nd`; we answered with our challenge `na`
    /// and wait, until `until`, for its proof.
    Challenged {
        neighbour: usize,
        nd: Vec<u8>,
        na: Vec<u8>,
        until: Instant,
    },
    /// The inbound link of a neighbour: records and heartbeats in, heartbeats and `SYNC` out.
    Peer(PeerSide),
}

/// An inbound link's state.
pub struct PeerSide {
    pub neighbour: usize,
    /// With a herd secret: the keys and counters that every line is checked with.
    pub session: Option<Session>,
    pub last_sent: Instant,
    /// The neighbour's store compared with ours.
    pub comparison: Comparison,
}

impl Role {
    pub fn is_peer(&self) -> bool {
        matches!(self, Role::Peer(_) | Role::Challenged { .. })
    }
}

/// Where an accepted connection is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    /// Reading commands and answering them.
    Open,
    /// No more input will be handled (the client half-closed, or broke a limit): finish the
    /// pending replies, write them, then close with this reason.
    Draining(String),
    /// Done; the loop frees it after the current batch of events.
    Closed(String),
}

pub struct Conn {
    /// Unique for the life of the process; names the connection in the log (`c7`).
    pub id: u64,
    pub stream: TcpStream,
    pub addr: SocketAddr,
    pub reader: LineReader,
    pub out: OutBuf,
    pub replies: Replies,
    pub role: Role,
    pub state: ConnState,
    /// When the last byte arrived, for the idle timeout.
    pub last_active: Instant,
    /// Already listed for the loop's end-of-turn write.
    pub dirty: bool,
    /// Since when a started line has been waiting for its end (the line deadline).
    pub partial_since: Option<Instant>,
    /// Since when unread replies have been over the soft limit.
    pub over_soft_since: Option<Instant>,
}

impl Conn {
    pub fn new(id: u64, stream: TcpStream, addr: SocketAddr, now: Instant) -> Conn {
        Conn {
            id,
            stream,
            addr,
            reader: LineReader::default(),
            out: OutBuf::default(),
            replies: Replies::default(),
            role: Role::Undecided,
            state: ConnState::Open,
            last_active: now,
            dirty: false,
            partial_since: None,
            over_soft_since: None,
        }
    }

    /// The state and role's names, for the trace.
    pub fn state_name(&self) -> String {
        let state = match self.state {
            ConnState::Open => "Open",
            ConnState::Draining(_) => "Draining",
            ConnState::Closed(_) => "Closed",
        };
        let role = match self.role {
            Role::Undecided => "Undecided",
            Role::Client => "Client",
            Role::Challenged { .. } => "Challenged",
            Role::Peer(_) => "Peer",
        };
        format!("{state}/{role}")
    }

    /// Moves to a new state; the loop logs the close when it frees the connection.
    pub fn set_state(&mut self, next: ConnState) {
        if !matches!(self.state, ConnState::Closed(_)) {
            self.state = next;
        }
    }

    /// Writes what is pending and decides whether the connection is done. Called by the loop
    /// at the end of the turn, so the replies of a whole batch of commands go out in one write.
    pub fn flush(&mut self, output_cap: usize) {
        if let ConnState::Closed(_) = self.state {
            return;
        }
        if let Err(e) = self.out.write_to(&mut self.stream) {
            self.state = ConnState::Closed(format!("write failed: {e}"));
            return;
        }
        if self.out.pending() > output_cap {
            self.state = ConnState::Closed(format!(
                "over {output_cap} bytes of replies unread: the client does not read"
            ));
        } else if let ConnState::Draining(reason) = &self.state {
            if self.replies.is_empty() && self.out.pending() == 0 {
                self.state = ConnState::Closed(reason.clone());
            }
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

    #[test]
    fn replies_keep_command_order() {
        let mut out = OutBuf::default();
        let mut replies = Replies::default();
        replies.push(&mut out, b"1");
        replies.push_awaiting(7);
        replies.push(&mut out, b"3");
        replies.push_awaiting(8);
        assert_eq!(out.buf, b"1");
        replies.complete(&mut out, 8, b"4".to_vec());
        assert_eq!(out.buf, b"1");
        replies.complete(&mut out, 7, b"2".to_vec());
        assert_eq!(out.buf, b"1234");
        assert!(replies.is_empty());
        assert_eq!(replies.waiting(), 0);
    }
}
