//! The pure cores of a load: the commands a connection sends, and the check of every reply
//! against the command it answers. No sockets, no clock: the caller passes the time in.

use std::ops::Range;
use std::time::{Duration, Instant};

use super::args::{LoadOptions, Mix};
use crate::bytes::push_decimal;
use memchr::memchr;

/// The location every generated IAMAT reports: the spec's example, on UCLA's campus.
pub(super) const LOCATION: &[u8] = b"+34.068930-118.445127";

/// The two commands the load sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Iamat,
    Whatsat,
}

impl Kind {
    /// The command's verb, for error messages.
    pub(super) fn verb(self) -> &'static str {
        match self {
            Kind::Iamat => "IAMAT",
            Kind::Whatsat => "WHATSAT",
        }
    }
}

/// A command sent and not yet answered: enough to check its reply and time it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pending {
    /// When the command was handed to the socket (or queued for it).
    pub(super) sent_at: Instant,
    pub(super) kind: Kind,
    /// The number of the client id: `load-<client>`.
    pub(super) client: u64,
    /// An IAMAT's client time, in nanoseconds since the epoch.
    pub(super) time_ns: u64,
}

/// What the current phase sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sending {
    /// One IAMAT per client id, each id once.
    Primers,
    /// The mix.
    Load,
    Nothing,
}

/// Makes the commands: which kind, about which client, with which client time.
pub(super) struct Requests {
    pub(super) mix: Mix,
    pub(super) clients: u64,
    /// Client ids still to be sent their priming IAMAT.
    pub(super) to_prime: Range<u64>,
    /// The run's start, by the monotonic clock and by the wall clock (nanoseconds since the
    /// epoch): client times are computed from the two, with no clock read per command.
    pub(super) start: Instant,
    pub(super) epoch_ns: u64,
    /// The client time of the last command made.
    pub(super) last_time_ns: u64,
    /// Commands made so far; the load's client ids cycle with it.
    pub(super) made: u64,
    /// Bresenham's accumulator for the mixed load: exactly N WHATSAT in every hundred.
    pub(super) whatsat_credit: u32,
    /// `" RADIUS BOUND\n"`, the end of every WHATSAT.
    pub(super) whatsat_tail: Vec<u8>,
    /// What every client id starts with.
    pub(super) prefix: Vec<u8>,
    /// Load commands made (priming IAMATs not counted), and how many may be made at most.
    pub(super) load_made: u64,
    pub(super) limit: Option<u64>,
    /// Commands per second across all connections, when paced, counted from `load_start`.
    pub(super) rate: Option<f64>,
    pub(super) load_start: Option<Instant>,
}

impl Requests {
    /// The commands of a run started at `start`, when the wall clock read `epoch_ns`. A load
    /// with WHATSAT primes every client id first.
    pub(super) fn new(opts: &LoadOptions, start: Instant, epoch_ns: u64) -> Requests {
        let primed = if opts.mix == Mix::Iamat {
            0
        } else {
            opts.clients as u64
        };
        Requests {
            mix: opts.mix,
            clients: opts.clients as u64,
            to_prime: 0..primed,
            start,
            epoch_ns,
            last_time_ns: 0,
            made: 0,
            whatsat_credit: 0,
            whatsat_tail: format!(" {} {}\n", opts.radius_km, opts.bound).into_bytes(),
            prefix: opts.id_prefix.clone().into_bytes(),
            load_made: 0,
            limit: opts.requests,
            rate: opts.rate,
            load_start: None,
        }
    }

    /// Every command `--requests` allows has been made.
    pub(super) fn exhausted(&self) -> bool {
        self.limit.is_some_and(|limit| self.load_made >= limit)
    }

    /// When a paced load may send its next command, if pacing holds it back now.
    pub(super) fn next_send_at(&self) -> Option<Instant> {
        let (rate, start) = (self.rate?, self.load_start?);
        Some(start + Duration::from_secs_f64(self.load_made as f64 / rate))
    }

    /// Whether the load may make another command at `now`: within `--requests`, and, when
    /// paced, no ahead of `--rate` (open loop: the schedule does not wait for replies).
    pub(super) fn load_allowed(&mut self, now: Instant) -> bool {
        if self.exhausted() {
            return false;
        }
        match self.rate {
            None => true,
            Some(rate) => {
                let start = *self.load_start.get_or_insert(now);
                let due = now.saturating_duration_since(start).as_secs_f64() * rate;
                // Commands are due at start, start + 1/rate, ...: floor(due) + 1 of them by now.
                (self.load_made as f64) <= due
            }
        }
    }

    /// Every priming IAMAT has been made.
    pub(super) fn primed(&self) -> bool {
        self.to_prime.is_empty()
    }

    /// Appends the next command to `line` and says what it asked; `None` when `sending` has
    /// nothing (more) to send.
    pub(super) fn make(
        &mut self,
        sending: Sending,
        sent_at: Instant,
        line: &mut Vec<u8>,
    ) -> Option<Pending> {
        let (kind, client) = match sending {
            Sending::Primers => (Kind::Iamat, self.to_prime.next()?),
            Sending::Load if !self.load_allowed(sent_at) => return None,
            Sending::Load => {
                self.load_made += 1;
                (self.next_kind(), self.made % self.clients)
            }
            Sending::Nothing => return None,
        };
        // The wall clock at `sent_at`, but at least 1 ns past the previous command's time (a
        // turn's commands share one `sent_at`): client times strictly increase for every id,
        // and the server's time difference stays a true one.
        let wall_ns =
            self.epoch_ns + sent_at.saturating_duration_since(self.start).as_nanos() as u64;
        let time_ns = wall_ns.max(self.last_time_ns + 1);
        self.last_time_ns = time_ns;
        self.made += 1;
        match kind {
            Kind::Iamat => {
                line.extend_from_slice(b"IAMAT ");
                write_iamat_fields(line, &self.prefix, client, time_ns);
                line.push(b'\n');
            }
            Kind::Whatsat => {
                line.extend_from_slice(b"WHATSAT ");
                write_client_id(line, &self.prefix, client);
                line.extend_from_slice(&self.whatsat_tail);
            }
        }
        Some(Pending {
            sent_at,
            kind,
            client,
            time_ns,
        })
    }

    /// The kind of the next load command, as the mix says.
    pub(super) fn next_kind(&mut self) -> Kind {
        match self.mix {
            Mix::Iamat => Kind::Iamat,
            Mix::Whatsat => Kind::Whatsat,
            Mix::Mixed { whatsat_percent } => {
                self.whatsat_credit += u32::from(whatsat_percent);
                if self.whatsat_credit >= 100 {
                    self.whatsat_credit -= 100;
                    Kind::Whatsat
                } else {
                    Kind::Iamat
                }
            }
        }
    }
}

/// `load-<client> LOCATION TIME`: the three fields of an IAMAT, which its reply must copy.
pub(super) fn write_iamat_fields(out: &mut Vec<u8>, prefix: &[u8], client: u64, time_ns: u64) {
    write_client_id(out, prefix, client);
    out.push(b' ');
    out.extend_from_slice(LOCATION);
    out.push(b' ');
    write_client_time(out, time_ns);
}

/// `<prefix><client>`: a client id.
pub(super) fn write_client_id(out: &mut Vec<u8>, prefix: &[u8], client: u64) {
    out.extend_from_slice(prefix);
    push_decimal(out, client);
}

/// POSIX seconds with nine decimals, `SECS.NNNNNNNNN`, as the spec's example client sends.
pub(super) fn write_client_time(out: &mut Vec<u8>, ns: u64) {
    push_decimal(out, ns / 1_000_000_000);
    out.push(b'.');
    let mut fraction = ns % 1_000_000_000;
    let mut digits = [b'0'; 9];
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (fraction % 10) as u8;
        fraction /= 10;
    }
    out.extend_from_slice(&digits);
}

/// What the reply at the head of a connection's input must be.
#[derive(Debug, Clone, Copy)]
pub(super) enum Expect<'a> {
    /// One `AT` line ending with these client fields, byte for byte.
    Iamat(&'a [u8]),
    /// The `AT` record of this client id, a body, a blank line.
    Whatsat(&'a [u8]),
}

/// Writes into `buf` what the reply to `asked` must contain.
pub(super) fn expect_for<'a>(asked: &Pending, prefix: &[u8], buf: &'a mut Vec<u8>) -> Expect<'a> {
    buf.clear();
    match asked.kind {
        Kind::Iamat => {
            write_iamat_fields(buf, prefix, asked.client, asked.time_ns);
            Expect::Iamat(buf)
        }
        Kind::Whatsat => {
            write_client_id(buf, prefix, asked.client);
            Expect::Whatsat(buf)
        }
    }
}

/// The verdict on one reply: fine, or what was wrong with it.
pub(super) type Verdict = Result<(), &'static str>;

/// Cuts the first reply off `buf` and checks it. Returns its length and the verdict, or `None`
/// while the reply is incomplete.
///
/// Framing comes first, so that one bad reply does not spoil the ones behind it: a line that is
/// not an `AT` line is one reply; a WHATSAT's `AT` line is followed by a body up to the first
/// blank line (the server squeezes runs of newlines in the body, so `\n\n` only ends it).
pub(super) fn parse_reply(buf: &[u8], expect: Expect<'_>) -> Option<(usize, Verdict)> {
    let line_end = memchr(b'\n', buf)?;
    let line = &buf[..line_end];
    let one_line = line_end + 1;
    if line.first() == Some(&b'?') {
        return Some((one_line, Err("the server found the command invalid")));
    }
    match expect {
        Expect::Iamat(fields) => {
            let verdict = at_line_fields(line).and_then(|rest| {
                if rest == fields {
                    Ok(())
                } else {
                    Err("the AT line does not copy the IAMAT's fields")
                }
            });
            Some((one_line, verdict))
        }
        Expect::Whatsat(_) if !line.starts_with(b"AT ") => Some((one_line, Err("not an AT line"))),
        Expect::Whatsat(client) => {
            let blank = find_blank_line(buf, line_end)?;
            let verdict = if blank == line_end {
                Err("the WHATSAT reply has no body")
            } else {
                at_line_fields(line).and_then(|rest| match split_field(rest) {
                    Some((id, rest)) if id == client && is_location_and_time(rest) => Ok(()),
                    _ => Err("the AT line is not a record of the client asked about"),
                })
            };
            Some((blank + 2, verdict))
        }
    }
}

/// Checks `AT SERVER DIFF ` and returns what follows: the client fields.
pub(super) fn at_line_fields(line: &[u8]) -> Result<&[u8], &'static str> {
    let rest = line.strip_prefix(b"AT ").ok_or("not an AT line")?;
    let (server, rest) = split_field(rest).ok_or("the AT line is too short")?;
    let (difference, rest) = split_field(rest).ok_or("the AT line is too short")?;
    if server.is_empty() {
        return Err("the AT line names no server");
    }
    if !is_time_difference(difference) {
        return Err("the AT line's time difference is not [+-]SECONDS.NNNNNNNNN");
    }
    Ok(rest)
}

/// `[+-]DIGITS.NNNNNNNNN`: exactly nine decimals.
pub(super) fn is_time_difference(field: &[u8]) -> bool {
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    match field.split_first() {
        Some((b'+' | b'-', rest)) => match memchr(b'.', rest) {
            Some(dot) => {
                digits(&rest[..dot]) && rest.len() - dot - 1 == 9 && digits(&rest[dot + 1..])
            }
            None => false,
        },
        _ => false,
    }
}

/// `LOCATION TIME`: two non-empty fields, one space between.
pub(super) fn is_location_and_time(rest: &[u8]) -> bool {
    match split_field(rest) {
        Some((location, time)) => {
            !location.is_empty() && !time.is_empty() && memchr(b' ', time).is_none()
        }
        None => false,
    }
}

/// Splits at the first space.
pub(super) fn split_field(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let space = memchr(b' ', s)?;
    Some((&s[..space], &s[space + 1..]))
}

/// Where the first `\n\n` at or after `from` starts.
pub(super) fn find_blank_line(buf: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    loop {
        let newline = at + memchr(b'\n', &buf[at..])?;
        match buf.get(newline + 1) {
            Some(b'\n') => return Some(newline),
            Some(_) => at = newline + 1,
            None => return None, // the next byte decides, and it has not arrived
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::load::args::parse_args;
    use crate::tools::load::args::tests::args;
    use crate::tools::load::generator::quote;

    #[test]
    fn client_times_have_nine_decimals() {
        let mut out = Vec::new();
        write_client_time(&mut out, 1_621_464_827_959_498_503);
        assert_eq!(out, b"1621464827.959498503");
        out.clear();
        write_client_time(&mut out, 5);
        assert_eq!(out, b"0.000000005");
        out.clear();
        push_decimal(&mut out, u64::MAX);
        assert_eq!(out, u64::MAX.to_string().as_bytes());
    }

    #[test]
    fn commands_are_made_as_the_protocol_says() {
        let opts = LoadOptions {
            mix: Mix::Mixed {
                whatsat_percent: 50,
            },
            clients: 3,
            ..parse_args(&args("--addr 127.0.0.1:1")).unwrap()
        };
        let now = Instant::now();
        let mut requests = Requests::new(&opts, now, 1_700_000_000_000_000_000);
        let mut line = Vec::new();
        // Priming: one IAMAT per id, then nothing more to prime.
        for id in 0..3 {
            line.clear();
            let asked = requests.make(Sending::Primers, now, &mut line).unwrap();
            assert_eq!((asked.kind, asked.client), (Kind::Iamat, id));
        }
        assert_eq!(
            line,
            b"IAMAT load-2 +34.068930-118.445127 1700000000.000000002\n"
        );
        assert!(requests.primed());
        assert_eq!(requests.make(Sending::Primers, now, &mut line), None);
        line.clear();
        let asked = requests.make(Sending::Load, now, &mut line).unwrap();
        assert_eq!(asked.kind, Kind::Iamat);
        assert_eq!(
            line,
            b"IAMAT load-0 +34.068930-118.445127 1700000000.000000003\n"
        );
        line.clear();
        requests.make(Sending::Load, now, &mut line).unwrap();
        assert_eq!(line, b"WHATSAT load-1 10 5\n");
        // Later commands carry the wall clock of their time.
        line.clear();
        let later = now + Duration::from_millis(1500);
        let asked = requests.make(Sending::Load, later, &mut line).unwrap();
        assert_eq!(asked.time_ns, 1_700_000_001_500_000_000);
        assert_eq!(
            line,
            b"IAMAT load-2 +34.068930-118.445127 1700000001.500000000\n"
        );
        assert_eq!(requests.make(Sending::Nothing, now, &mut line), None);
    }

    #[test]
    fn the_mix_is_exact_and_evenly_spread() {
        let opts = LoadOptions {
            mix: Mix::Mixed {
                whatsat_percent: 25,
            },
            ..parse_args(&args("--addr 127.0.0.1:1")).unwrap()
        };
        let mut requests = Requests::new(&opts, Instant::now(), 0);
        let kinds: Vec<Kind> = (0..100).map(|_| requests.next_kind()).collect();
        assert_eq!(kinds.iter().filter(|&&k| k == Kind::Whatsat).count(), 25);
        assert_eq!(
            &kinds[..4],
            [Kind::Iamat, Kind::Iamat, Kind::Iamat, Kind::Whatsat]
        );
    }

    const IAMAT_FIELDS: &[u8] = b"load-7 +34.068930-118.445127 1621464827.959498503";

    #[test]
    fn an_iamat_reply_is_one_exact_at_line() {
        let good = b"AT Bailey +0.263873386 load-7 +34.068930-118.445127 1621464827.959498503\n";
        let expect = Expect::Iamat(IAMAT_FIELDS);
        assert_eq!(parse_reply(good, expect), Some((good.len(), Ok(()))));
        // Incomplete until the newline.
        assert_eq!(parse_reply(&good[..good.len() - 1], expect), None);
        // Two replies back to back: the first one only.
        let two = [&good[..], &good[..]].concat();
        assert_eq!(parse_reply(&two, expect), Some((good.len(), Ok(()))));
        let cases: &[(&[u8], &str)] = &[
            (
                b"? IAMAT load-7 x y\n",
                "the server found the command invalid",
            ),
            (
                b"AT Bailey +0.263873386 load-8 +34.068930-118.445127 1621464827.959498503\n",
                "the AT line does not copy the IAMAT's fields",
            ),
            (
                b"AT Bailey +0.26387338 load-7 +34.068930-118.445127 1621464827.959498503\n",
                "the AT line's time difference is not [+-]SECONDS.NNNNNNNNN",
            ),
            (
                b"AT Bailey 0.263873386 load-7 +34.068930-118.445127 1621464827.959498503\n",
                "the AT line's time difference is not [+-]SECONDS.NNNNNNNNN",
            ),
            (
                b"AT  +0.263873386 load-7 +34.068930-118.445127 1621464827.959498503\n",
                "the AT line names no server",
            ),
            (
                b"AT Bailey +0.263873386 load-7 +34.068930-118.445127 1621464827.959498503 \n",
                "the AT line does not copy the IAMAT's fields",
            ),
            (b"AT Bailey\n", "the AT line is too short"),
            (b"hello\n", "not an AT line"),
        ];
        for (reply, why) in cases {
            assert_eq!(
                parse_reply(reply, expect),
                Some((reply.len(), Err(*why))),
                "{}",
                quote(reply)
            );
        }
    }

    #[test]
    fn a_whatsat_reply_runs_to_the_first_blank_line() {
        let good = b"AT Bona -0.000001000 load-7 +34.068930-118.445127 1621464827.959498503\n{\n   \"results\" : []\n}\n\n";
        let expect = Expect::Whatsat(b"load-7");
        assert_eq!(parse_reply(good, expect), Some((good.len(), Ok(()))));
        for cut in [good.len() - 1, good.len() - 2, 80, 10] {
            assert_eq!(parse_reply(&good[..cut], expect), None, "cut at {cut}");
        }
        let next = [&good[..], b"AT Bona"].concat();
        assert_eq!(parse_reply(&next, expect), Some((good.len(), Ok(()))));
        let other =
            b"AT Bona -0.000001000 load-8 +34.068930-118.445127 1621464827.959498503\n{}\n\n";
        assert_eq!(
            parse_reply(other, expect),
            Some((
                other.len(),
                Err("the AT line is not a record of the client asked about")
            ))
        );
        let empty = b"AT Bona -0.000001000 load-7 +34.068930-118.445127 1621464827.959498503\n\n";
        assert_eq!(
            parse_reply(empty, expect),
            Some((empty.len(), Err("the WHATSAT reply has no body")))
        );
        // An unknown client gets one `?` line: it is one reply, not the start of a body.
        let refused = b"? WHATSAT load-7 10 5\nAT ...";
        assert_eq!(
            parse_reply(refused, expect),
            Some((22, Err("the server found the command invalid")))
        );
    }

    #[test]
    fn a_paced_load_keeps_its_schedule_and_its_limit() {
        let opts = parse_args(&args(
            "--addr 127.0.0.1:1 --rate 1000 --requests 5 --id-prefix p-",
        ))
        .unwrap();
        let now = Instant::now();
        let mut requests = Requests::new(&opts, now, 1_000_000_000);
        let mut line = Vec::new();
        // At the start one command is due; the next 1 ms later (1000 a second).
        assert!(requests.make(Sending::Load, now, &mut line).is_some());
        assert!(line.starts_with(b"IAMAT p-0 "));
        assert_eq!(requests.make(Sending::Load, now, &mut line), None);
        assert_eq!(
            requests.next_send_at(),
            Some(now + Duration::from_millis(1))
        );
        // By 2.5 ms, the ones due at 1 ms and 2 ms: two more, not three.
        let later = now + Duration::from_micros(2500);
        assert!(requests.make(Sending::Load, later, &mut line).is_some());
        assert!(requests.make(Sending::Load, later, &mut line).is_some());
        assert_eq!(requests.make(Sending::Load, later, &mut line), None);
        // Long after, only the five --requests allows were ever made.
        let much_later = now + Duration::from_secs(1);
        assert!(requests
            .make(Sending::Load, much_later, &mut line)
            .is_some());
        assert!(requests
            .make(Sending::Load, much_later, &mut line)
            .is_some());
        assert!(requests.exhausted());
        assert_eq!(requests.make(Sending::Load, much_later, &mut line), None);
    }
}
