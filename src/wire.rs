//! Bytes on a non-blocking socket: [`LineReader`] cuts what arrives into lines, [`OutBuf`]
//! holds what waits to be written. Every connection of the server (a client, a peer link either
//! way) and of the load generator moves its bytes through these two.

use std::io::{self, Read, Write};

use memchr::memchr;

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
}
