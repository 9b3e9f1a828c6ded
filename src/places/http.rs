//! An HTTP/1.1 response reader, fed bytes as they arrive (docs/protocol.md section 4, "Talking
//! to Places").
//!
//! The head is parsed with `httparse`; the body is framed by `Content-Length`, by
//! `Transfer-Encoding: chunked`, or by the end of the stream. Bytes may arrive in pieces of any
//! size, so every step can stop in the middle and resume on the next [`ResponseReader::push`].
//!
//! This is the pure half of the Places client: no socket and no clock. The pool's TLS pump
//! ([`crate::places::pool`]) hands it each piece of plaintext as rustls decrypts it, and calls
//! [`ResponseReader::push_eof`] when the stream ends. Every limit here ends the exchange with
//! an [`HttpError`]; the pool then answers the WHATSAT with an error body and does not reuse
//! the connection.

use memchr::memchr;

/// A whole response.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status code, for the log only: Google has sent its error answers with 200, 400
    /// and 403, so the reply is made from the body alone (docs/protocol.md section 4).
    pub status: u16,
    /// The body, without its chunked framing, if it had any.
    pub body: Vec<u8>,
    /// Whether the connection may carry another request.
    pub keep_alive: bool,
}

/// What went wrong with a response. It goes to the log; the client is told only that Places
/// could not be reached or read (the pool's `Failure`), never the detail.
pub type HttpError = String;

/// Longest response head accepted, and most headers (`httparse` refuses a head with more, and
/// it is answered as malformed). A head is held whole until its blank line comes, so this is
/// also the most a head can make the reader hold.
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
/// The most room a body's announced length (`Content-Length`, a chunk's size) reserves before
/// its bytes arrive: a server may announce what it never sends.
const RESERVE_AT_MOST: usize = 1 << 20;

/// Where a response is up to.
#[derive(Debug)]
enum Phase {
    /// Waiting for the status line and headers.
    Head,
    /// Reading the body, framed as the head said. `keep_alive` is what the head allows; the
    /// end of the body may still forbid it (bytes past it).
    Body {
        status: u16,
        keep_alive: bool,
        framing: Framing,
    },
}

/// How the end of the body is found.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// `Content-Length`: this many bytes still to come.
    Length(usize),
    /// `Transfer-Encoding: chunked`, at this point of the chunk grammar.
    Chunked(Chunk),
    /// No length: the body ends when the server closes.
    UntilClose,
}

/// Where the chunked grammar is up to, kept between pieces.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Expecting a `SIZE[;ext]\r\n` line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(usize),
    /// Expecting the `\r\n` after a chunk's data.
    DataEnd,
    /// After the last (zero) chunk: trailer lines until an empty one.
    Trailer,
}

/// Reads one response. Create one per request.
///
/// Bytes are framed where they arrive: a body's bytes are copied once, from the slice given to
/// [`ResponseReader::push`] into the body. Only what cannot be used yet (the unfinished part of
/// a head or of a chunk's framing line) waits in `pending` for the next piece, and it is not
/// searched again: a head is parsed once its blank line has arrived, a line once its `\n` has,
/// so a server that sends its answer a byte at a time costs time in proportion to its bytes.
#[derive(Debug)]
pub struct ResponseReader {
    /// Bytes received and not yet consumed.
    pending: Vec<u8>,
    /// The body so far, never over `max_body_bytes`.
    body: Vec<u8>,
    phase: Phase,
    /// `places.max_body_bytes`: a larger body is refused, checked before its bytes are kept.
    max_body_bytes: usize,
    /// Every byte taken so far, framing included.
    received: usize,
    /// How long the unfinished head was when `httparse` last read it. Until its blank line
    /// arrives it is read again only when it has doubled, so that a malformed head is still
    /// found out early, at a cost in proportion to its length.
    head_read: usize,
}

impl ResponseReader {
    /// A reader for one response, its body capped at `max_body_bytes`. The pool makes one per
    /// request, so nothing of one response can leak into the next.
    pub fn new(max_body_bytes: usize) -> ResponseReader {
        ResponseReader {
            pending: Vec::new(),
            body: Vec::new(),
            phase: Phase::Head,
            max_body_bytes,
            received: 0,
            head_read: 0,
        }
    }

    /// The most bytes one response may take, framing included: twice the body cap and a head.
    /// Interim responses, chunk sizes and trailers do not count in the body, and a server
    /// sending them without end must not hold the loop.
    fn max_received(&self) -> usize {
        self.max_body_bytes
            .saturating_mul(2)
            .saturating_add(MAX_HEAD_BYTES)
    }

    /// Whether any byte of the response has arrived (a keep-alive connection closed by the
    /// server before answering is safe to retry; one closed mid-response is not).
    pub fn started(&self) -> bool {
        !self.pending.is_empty() || !matches!(self.phase, Phase::Head)
    }

    /// Takes the next bytes of the stream. `Ok(Some(..))` once the response is complete;
    /// `Ok(None)` while more is needed; `Err` ends the exchange. Bytes past the end of the
    /// response are kept in `pending` and never read: they only forbid keep-alive.
    pub fn push(&mut self, data: &[u8]) -> Result<Option<Response>, HttpError> {
        self.received = self.received.saturating_add(data.len());
        if self.received > self.max_received() {
            return Err(format!(
                "Places sent over {} bytes for one response",
                self.max_received()
            ));
        }
        // Nothing left over: the piece is framed where it lies, and only what it leaves
        // unfinished is copied.
        if self.pending.is_empty() {
            let mut input = data;
            let result = self.frame(&mut input, 0);
            self.pending.extend_from_slice(input);
            return result;
        }
        // What was left unfinished (a head or a framing line, both short), then what follows.
        // What was left holds no end of what it waits for: only the new bytes are searched.
        let searched = self.pending.len();
        let mut joined = std::mem::take(&mut self.pending);
        joined.extend_from_slice(data);
        let mut input = &joined[..];
        let result = self.frame(&mut input, searched);
        let used = joined.len() - input.len();
        joined.drain(..used);
        self.pending = joined;
        result
    }

    /// Frames `input` as far as it goes, and leaves in it what could not be used yet. Its first
    /// `searched` bytes are known not to end the head or line they start.
    fn frame(
        &mut self,
        input: &mut &[u8],
        mut searched: usize,
    ) -> Result<Option<Response>, HttpError> {
        // Each pass takes one head, one piece of body, or one step of the chunk grammar, until
        // the response is whole or the input can take it no further.
        loop {
            let before = input.len();
            match self.phase {
                // An interim (1xx) head steps past itself and leaves the phase at `Head`.
                Phase::Head => match self.parse_head(input, searched)? {
                    Some(phase) => self.phase = phase,
                    None => return Ok(None),
                },
                Phase::Body {
                    status,
                    keep_alive,
                    framing,
                } => {
                    let next = match framing {
                        Framing::Length(left) => Some(self.take_body(input, left)?),
                        // Everything is body, until the server closes ([`Self::push_eof`]).
                        Framing::UntilClose => {
                            self.take_body(input, input.len())?;
                            None
                        }
                        Framing::Chunked(chunk) => self.step_chunked(input, chunk, searched)?,
                    };
                    match next {
                        Some(Framing::Length(0)) => {
                            // Bytes past the end of the response mean the two sides disagree about
                            // framing: do not reuse the connection.
                            let keep_alive = keep_alive && input.is_empty();
                            return Ok(Some(self.finish(status, keep_alive)));
                        }
                        Some(framing) => {
                            self.phase = Phase::Body {
                                status,
                                keep_alive,
                                framing,
                            };
                            if stalled(framing, input) {
                                return Ok(None);
                            }
                        }
                        None => return Ok(None),
                    }
                }
            }
            if input.len() != before {
                searched = 0; // what follows starts in bytes not searched yet
            }
        }
    }

    /// The server closed the stream. Completes a read-to-close body; anything else is cut short.
    pub fn push_eof(&mut self) -> Result<Response, HttpError> {
        match self.phase {
            Phase::Body {
                status,
                framing: Framing::UntilClose,
                ..
            } => return Ok(self.finish(status, false)),
            Phase::Head if self.pending.is_empty() => {
                return Err("Places closed the connection without answering".into())
            }
            // A head read only in part may have gone wrong since: that is worth saying.
            Phase::Head => {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                httparse::Response::new(&mut headers)
                    .parse(&self.pending)
                    .map_err(malformed)?;
            }
            Phase::Body { .. } => {}
        }
        Err("Places closed the connection in the middle of its answer".into())
    }

    /// Hands the body over; the reader is spent.
    fn finish(&mut self, status: u16, keep_alive: bool) -> Response {
        Response {
            status,
            body: std::mem::take(&mut self.body),
            keep_alive,
        }
    }

    /// Parses the head at the start of `input` and steps past it; `None` while it is partial.
    /// The first `searched` bytes hold no end of the head.
    fn parse_head(
        &mut self,
        input: &mut &[u8],
        searched: usize,
    ) -> Result<Option<Phase>, HttpError> {
        // No blank line has come, and the head has not doubled since `httparse` last read it:
        // wait. Reading it at every piece would cost its whole length each time; a malformed
        // head is still found out once it has doubled.
        if searched > 0 && !ends_a_head(input, searched) && input.len() < 2 * self.head_read {
            return head_wait(input);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut head = httparse::Response::new(&mut headers);
        let used = match head.parse(input) {
            Ok(httparse::Status::Complete(used)) => used,
            Ok(httparse::Status::Partial) => {
                self.head_read = input.len();
                return head_wait(input);
            }
            Err(e) => return Err(malformed(e)),
        };
        let status = head.code.unwrap_or(0);
        // HTTP/1.1 keeps the connection by default, 1.0 closes it; `Connection` says otherwise.
        let mut keep_alive = head.version == Some(1);
        let mut length = None;
        let mut chunked = false;
        for h in head.headers.iter() {
            let value = String::from_utf8_lossy(h.value);
            let value = value.trim();
            if h.name.eq_ignore_ascii_case("content-length") {
                length = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| format!("Places sent a bad Content-Length {value:?}"))?,
                );
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                // Chunked framing only when chunked is the last coding (RFC 9112, section 6.3).
                chunked = value.to_ascii_lowercase().ends_with("chunked");
            } else if h.name.eq_ignore_ascii_case("connection") {
                let value = value.to_ascii_lowercase();
                if value.contains("close") {
                    keep_alive = false;
                } else if value.contains("keep-alive") {
                    keep_alive = true;
                }
            }
        }
        *input = &input[used..];
        if (100..200).contains(&status) {
            return Ok(Some(Phase::Head)); // an interim response: the real one follows
        }
        // 204 and 304 never have a body; chunked framing wins over a `Content-Length` sent
        // with it (RFC 9112, section 6.3).
        let framing = if status == 204 || status == 304 {
            Framing::Length(0)
        } else if chunked {
            Framing::Chunked(Chunk::Size)
        } else if let Some(length) = length {
            if length > self.max_body_bytes {
                return Err(self.too_large());
            }
            // Said and within the cap: the body grows once, not by doubling.
            self.body.reserve(length.min(RESERVE_AT_MOST));
            Framing::Length(length)
        } else {
            // The body ends only when the connection does: it cannot carry another request.
            keep_alive = false;
            Framing::UntilClose
        };
        Ok(Some(Phase::Body {
            status,
            keep_alive,
            framing,
        }))
    }

    fn too_large(&self) -> HttpError {
        format!(
            "Places sent a body larger than {} bytes",
            self.max_body_bytes
        )
    }

    /// Moves up to `want` bytes of `input` into the body; returns the length framing still left.
    /// The cap is checked before the bytes are copied, so an oversize body is never held.
    fn take_body(&mut self, input: &mut &[u8], want: usize) -> Result<Framing, HttpError> {
        let n = want.min(input.len());
        if self.body.len() + n > self.max_body_bytes {
            return Err(self.too_large());
        }
        let (taken, rest) = input.split_at(n);
        self.body.extend_from_slice(taken);
        *input = rest;
        Ok(Framing::Length(want - n))
    }

    /// One step of the chunked grammar. Returns the framing after it; `Length(0)` when the
    /// response is complete.
    /// `None` when a line has not fully arrived; its first `searched` bytes hold no `\n`.
    fn step_chunked(
        &mut self,
        input: &mut &[u8],
        chunk: Chunk,
        searched: usize,
    ) -> Result<Option<Framing>, HttpError> {
        let next = match chunk {
            Chunk::Size => {
                let Some((line, rest)) = split_line(input, searched) else {
                    return line_or_wait(input);
                };
                // Chunk extensions (`;name=value`) are allowed, and ignored.
                let line = String::from_utf8_lossy(line);
                let size = line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size, 16)
                    .map_err(|_| format!("Places sent a bad chunk size {size:?}"))?;
                *input = rest;
                // The last chunk; or one that would take the body over its cap, refused before
                // its data comes.
                if size == 0 {
                    Chunk::Trailer
                } else if self.body.len().saturating_add(size) > self.max_body_bytes {
                    return Err(self.too_large());
                } else {
                    self.body.reserve(size.min(RESERVE_AT_MOST));
                    Chunk::Data(size)
                }
            }
            Chunk::Data(left) => match self.take_body(input, left)? {
                Framing::Length(0) => Chunk::DataEnd,
                Framing::Length(left) => Chunk::Data(left),
                _ => unreachable!("take_body returns a length"),
            },
            Chunk::DataEnd => {
                let Some(rest) = input.strip_prefix(b"\r\n") else {
                    // A lone `\r` (or nothing) may be the start of the line end: wait for more.
                    if input.len() < 2 && b"\r\n".starts_with(input) {
                        return Ok(Some(Framing::Chunked(chunk)));
                    }
                    return Err("Places sent a chunk without its line end".into());
                };
                *input = rest;
                Chunk::Size
            }
            // Trailer fields are read and dropped; an empty line ends the response.
            Chunk::Trailer => {
                let Some((line, rest)) = split_line(input, searched) else {
                    return line_or_wait(input);
                };
                let empty = line.iter().all(|&b| b == b'\r');
                *input = rest;
                if empty {
                    return Ok(Some(Framing::Length(0)));
                }
                Chunk::Trailer
            }
        };
        Ok(Some(Framing::Chunked(next)))
    }
}

/// Whether the chunked or length framing can make no progress with the bytes in `input`. A
/// line that has not fully arrived is found out by trying it, which searches it once.
fn stalled(framing: Framing, input: &[u8]) -> bool {
    match framing {
        Framing::Chunked(Chunk::DataEnd) => input.len() < 2,
        _ => input.is_empty(),
    }
}

fn malformed(e: httparse::Error) -> HttpError {
    format!("Places sent a malformed HTTP response ({e})")
}

/// The line at the start of `input` (without its `\n`) and what follows it, once it is whole.
/// The first `searched` bytes hold no `\n`.
fn split_line(input: &[u8], searched: usize) -> Option<(&[u8], &[u8])> {
    let end = searched + memchr(b'\n', input.get(searched..)?)?;
    Some((&input[..end], &input[end + 1..]))
}

/// Whether `input`, whose first `searched` bytes hold no end of a head, now holds one: a blank
/// line, `\n\n` or `\n\r\n`, which may begin in the last two bytes searched.
fn ends_a_head(input: &[u8], searched: usize) -> bool {
    let mut from = searched.saturating_sub(2);
    while let Some(at) = input.get(from..).and_then(|rest| memchr(b'\n', rest)) {
        let after = &input[from + at + 1..];
        if after.starts_with(b"\n") || after.starts_with(b"\r\n") {
            return true;
        }
        from += at + 1;
    }
    false
}

/// A head that has not fully arrived: wait (`None`), unless it is already too long.
fn head_wait(input: &[u8]) -> Result<Option<Phase>, HttpError> {
    if input.len() > MAX_HEAD_BYTES {
        return Err(format!(
            "Places sent a response head over {MAX_HEAD_BYTES} bytes"
        ));
    }
    Ok(None)
}

/// A chunk-size or trailer line that has not fully arrived: wait (`None`), unless it is
/// absurdly long. A size line is a few hex digits: 4096 bytes without a `\n` is not a server
/// worth waiting for, and bounds what such a line makes the reader hold.
fn line_or_wait(input: &[u8]) -> Result<Option<Framing>, HttpError> {
    if input.len() > 4096 {
        return Err("Places sent a chunk line over 4096 bytes".into());
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `raw` in pieces of `step` bytes.
    fn read(raw: &[u8], step: usize, eof: bool) -> Result<Response, HttpError> {
        let mut r = ResponseReader::new(1 << 20);
        for piece in raw.chunks(step) {
            if let Some(done) = r.push(piece)? {
                return Ok(done);
            }
        }
        if eof {
            return r.push_eof();
        }
        Err("incomplete".into())
    }

    #[test]
    fn content_length_in_any_pieces() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        for step in [1, 2, 7, 100] {
            let r = read(raw, step, false).unwrap();
            assert_eq!(
                (r.status, &r.body[..], r.keep_alive),
                (200, &b"hello"[..], true)
            );
        }
    }

    #[test]
    fn chunked_in_any_pieces() {
        let raw = b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nhel\r\n2\r\nlo\r\n0\r\nTrailer: 1\r\n\r\n";
        for step in [1, 3, 1000] {
            let r = read(raw, step, false).unwrap();
            assert_eq!(
                (r.status, &r.body[..], r.keep_alive),
                (403, &b"hello"[..], true)
            );
        }
    }

    #[test]
    fn bytes_after_the_response_forbid_keep_alive() {
        // Pieces that end past the response (none ends exactly where it does).
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1";
        for step in [3, 7, 100] {
            let r = read(raw, step, false).unwrap();
            assert_eq!((&r.body[..], r.keep_alive), (&b"ok"[..], false), "{step}");
        }
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nx";
        for step in [2, 100] {
            let r = read(raw, step, false).unwrap();
            assert_eq!((&r.body[..], r.keep_alive), (&b"ok"[..], false), "{step}");
        }
    }

    #[test]
    fn a_head_is_found_whatever_its_pieces() {
        // Empty lines before the status line are skipped, and are not the head's end.
        let raw = b"\r\n\nHTTP/1.1 200 OK\nContent-Length: 2\r\nX: y\n\nok";
        for step in [1, 2, 3, 5, 100] {
            let r = read(raw, step, false).unwrap();
            assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]), "{step}");
        }
    }

    #[test]
    fn a_malformed_head_is_said_to_be_one_even_when_it_comes_in_pieces() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nno colon here\r\n";
        for step in [1, 4, 100] {
            assert_eq!(
                read(raw, step, true),
                Err("Places sent a malformed HTTP response (invalid header name)".to_owned()),
                "{step}"
            );
        }
        // Without the end of the stream: found out once the head has doubled, at the latest.
        let mut r = ResponseReader::new(1 << 20);
        assert_eq!(r.push(b"HTTP/1.1 200 OK\r\n"), Ok(None));
        let refused = (0..100).find_map(|_| r.push(b"bad line\r\n").err());
        assert_eq!(
            refused,
            Some("Places sent a malformed HTTP response (invalid header name)".to_owned())
        );
    }

    #[test]
    fn an_announced_length_reserves_at_most_a_mebibyte() {
        // A terabyte announced, under a cap as large: nothing is allocated for it up front.
        let mut r = ResponseReader::new(1 << 41);
        assert_eq!(
            r.push(b"HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\nabc"),
            Ok(None)
        );
        assert!(r.body.capacity() <= RESERVE_AT_MOST);
        let mut r = ResponseReader::new(1 << 41);
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000\r\nabc";
        assert_eq!(r.push(head), Ok(None));
        assert!(r.body.capacity() <= RESERVE_AT_MOST);
    }

    #[test]
    fn a_chunk_must_end_with_its_line_end() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhelXX0\r\n\r\n";
        for step in [1, 2, 1000] {
            assert_eq!(
                read(raw, step, false),
                Err("Places sent a chunk without its line end".to_owned())
            );
        }
    }

    #[test]
    fn read_to_close() {
        let raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello";
        let r = read(raw, 2, true).unwrap();
        assert_eq!((&r.body[..], r.keep_alive), (&b"hello"[..], false));
    }

    #[test]
    fn cut_short_and_too_large() {
        assert!(read(
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello",
            4,
            true
        )
        .is_err());
        assert!(read(b"", 4, true).is_err());
        let mut r = ResponseReader::new(4);
        assert!(r
            .push(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            .is_err());
        let mut r = ResponseReader::new(4);
        assert!(r
            .push(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n")
            .is_err());
        assert!(read(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", 4, false).is_err());
    }

    #[test]
    fn interim_response_is_skipped() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(read(raw, 5, false).unwrap().body, b"ok");
    }

    #[test]
    fn framing_without_end_is_refused_at_twice_the_body_cap_and_a_head() {
        let cap = 1000;
        let limit = 2 * cap + MAX_HEAD_BYTES;
        // Interim responses for ever; trailer lines for ever. (Chunks for ever meet the body
        // cap first.)
        let endless: [(&[u8], &[u8]); 2] = [
            (b"", b"HTTP/1.1 100 Continue\r\n\r\n"),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n",
                b"Trailer: again\r\n",
            ),
        ];
        for (start, again) in endless {
            let mut r = ResponseReader::new(cap);
            assert_eq!(r.push(start), Ok(None));
            let mut sent = start.len();
            let refused = loop {
                match r.push(again) {
                    Ok(None) => sent += again.len(),
                    Ok(Some(_)) => panic!("a response out of endless framing"),
                    Err(e) => break e,
                }
                assert!(sent <= limit, "still reading after {sent} bytes");
            };
            assert_eq!(
                refused,
                format!("Places sent over {limit} bytes for one response")
            );
        }
    }
}
