//! The client protocol as pure functions: splitting lines into fields, validating `IAMAT` and
//! `WHATSAT`, formatting the `AT` reply, and the total order on records (docs/protocol.md
//! sections 2-6).
//!
//! Nothing here touches a socket or a clock: the caller passes the receive time in. Everything
//! works on bytes, because a client id is any run of non-white-space bytes and need not be UTF-8.

use crate::bytes::push_decimal;

/// The six bytes docs/protocol.md section 2 counts as white space. `u8::is_ascii_whitespace`
/// (and so `split_ascii_whitespace`) leaves out `\v`, which test clients do send.
pub fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Splits a line into its white-space separated fields. Returns `None` when there are more
/// than `N` fields; the array's unused tail stays empty. `N` is the most a valid line has, so
/// a line of many fields is not split to its end.
pub fn fields<const N: usize>(line: &[u8]) -> Option<([&[u8]; N], usize)> {
    let mut out: [&[u8]; N] = [&[]; N];
    let mut count = 0;
    for field in line.split(|&b| is_space(b)).filter(|f| !f.is_empty()) {
        if count == N {
            return None;
        }
        out[count] = field;
        count += 1;
    }
    Some((out, count))
}

/// The first field of a line, however many follow (empty for a blank line).
pub fn first_field(line: &[u8]) -> &[u8] {
    line.split(|&b| is_space(b))
        .find(|f| !f.is_empty())
        .unwrap_or_default()
}

/// A parsed, valid `IAMAT`: the three client fields as the client sent them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iamat<'a> {
    /// The client id: any run of bytes that are not white space.
    pub client: &'a [u8],
    /// The location, valid by [`parse_location`], copied into the `AT` line as sent.
    pub location: &'a [u8],
    /// The client's time, copied into the `AT` line as sent, digits past the ninth too.
    pub time: &'a [u8],
    /// The client time in nanoseconds since the epoch, digits past nine truncated.
    pub time_ns: i128,
}

/// A parsed, valid `WHATSAT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Whatsat<'a> {
    /// The client whose location is asked about.
    pub client: &'a [u8],
    /// The radius in metres, as exact decimal text (`10` km is `10000`, `0.0001` km is `0.1`).
    pub radius_m: Vec<u8>,
    /// The most results the reply keeps of what Google found, 0 to 20.
    pub bound: usize,
}

/// What a client line asks for. Anything that is not a valid command is `Invalid`, and is
/// answered with `? ` and a copy of the line (section 6).
#[derive(Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// Empty, or white space only: no reply at all (section 2).
    Blank,
    /// A valid IAMAT.
    Iamat(Iamat<'a>),
    /// A valid WHATSAT.
    Whatsat(Whatsat<'a>),
    /// Anything else.
    Invalid,
}

/// Parses one client line (without its `\n`).
pub fn parse_command(line: &[u8]) -> Command<'_> {
    // Both commands have exactly four fields: a fifth makes the line invalid, unsplit.
    let Some((f, n)) = fields::<4>(line) else {
        return Command::Invalid;
    };
    match (n, f[0]) {
        (0, _) => Command::Blank,
        (4, b"IAMAT") => match (parse_location(f[2]), parse_time_ns(f[3])) {
            (Some(_), Some(time_ns)) => Command::Iamat(Iamat {
                client: f[1],
                location: f[2],
                time: f[3],
                time_ns,
            }),
            _ => Command::Invalid,
        },
        (4, b"WHATSAT") => match (parse_radius(f[2]), parse_bound(f[3])) {
            (Some(radius_m), Some(bound)) => Command::Whatsat(Whatsat {
                client: f[1],
                radius_m,
                bound,
            }),
            _ => Command::Invalid,
        },
        _ => Command::Invalid,
    }
}

/// Splits `DIGITS[.DIGITS]` into its integer and fraction digits (fraction may be empty).
fn split_decimal(text: &[u8]) -> Option<(&[u8], &[u8])> {
    let (int, frac) = match text.iter().position(|&b| b == b'.') {
        Some(dot) => (&text[..dot], &text[dot + 1..]),
        None => (text, &text[text.len()..]),
    };
    let has_dot = int.len() != text.len();
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    // "1." has a dot but no fraction digits, ".5" no integer digits: both invalid.
    let valid = !int.is_empty() && digits(int) && digits(frac) && !(has_dot && frac.is_empty());
    valid.then_some((int, frac))
}

fn strip_leading_zeros(digits: &[u8]) -> &[u8] {
    let first = digits
        .iter()
        .position(|&b| b != b'0')
        .unwrap_or(digits.len());
    &digits[first..]
}

/// Compares the decimal `int.frac` with the whole number `limit`, exactly.
fn decimal_cmp(int: &[u8], frac: &[u8], limit: u32) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let int = strip_leading_zeros(int);
    // Ten digits or more pass every limit here (180 at most); nine fit a `u32`.
    if int.len() > 9 {
        return Ordering::Greater;
    }
    let value: u32 = int.iter().fold(0, |v, &d| v * 10 + u32::from(d - b'0'));
    match value.cmp(&limit) {
        Ordering::Equal if frac.iter().any(|&d| d != b'0') => Ordering::Greater,
        other => other,
    }
}

/// One signed coordinate of an ISO 6709 location: its sign, integer and fraction digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coordinate<'a> {
    /// The sign was `-`.
    pub negative: bool,
    /// The integer digits as sent, leading zeros and all.
    pub int: &'a [u8],
    /// The fraction digits as sent; empty when there was no point.
    pub frac: &'a [u8],
}

impl Coordinate<'_> {
    /// The coordinate as a JSON number or query value: no `+` (it decodes as a space in a query
    /// string), no leading zeros (JSON forbids them), the digits otherwise as the client sent.
    pub fn write_plain(&self, out: &mut Vec<u8>) {
        if self.negative {
            out.push(b'-');
        }
        let int = strip_leading_zeros(self.int);
        out.extend_from_slice(if int.is_empty() { b"0" } else { int });
        if !self.frac.is_empty() {
            out.push(b'.');
            out.extend_from_slice(self.frac);
        }
    }
}

/// The longest location, and the longest client time, in bytes (docs/protocol.md section 3):
/// some thirty digits of a coordinate's fraction, and fifty of a time's, far past any clock or
/// receiver. With the client id's limit, they bound a record, which every server keeps and
/// floods: without them a record could take a whole line, some 4 KiB, in every store.
pub const MAX_FIELD_BYTES: usize = 64;

/// What a connection is told when every place is taken: by the loop when it refuses or evicts
/// one, and by a connection in a place kept for neighbours whose first line is a client's. A
/// dialling neighbour may read it instead of the challenge it waits for.
pub const BUSY: &[u8] = b"? server busy\n";

/// Parses `[+-]DIGITS[.DIGITS][+-]DIGITS[.DIGITS]` with latitude in [-90, 90] and longitude in
/// [-180, 180], compared exactly (`90.0000000000000001` is out of range, though not as an f64),
/// at most [`MAX_FIELD_BYTES`] long.
pub fn parse_location(text: &[u8]) -> Option<(Coordinate<'_>, Coordinate<'_>)> {
    let sign = |b: u8| b == b'+' || b == b'-';
    // The shortest location is `+0+0`.
    if text.len() < 4 || text.len() > MAX_FIELD_BYTES || !sign(text[0]) {
        return None;
    }
    // The longitude begins at the next sign.
    let split = 1 + text[1..].iter().position(|&b| sign(b))?;
    Some((
        coordinate(&text[..split], 90)?,
        coordinate(&text[split..], 180)?,
    ))
}

/// One signed coordinate, at most `limit` degrees either way.
fn coordinate(part: &[u8], limit: u32) -> Option<Coordinate<'_>> {
    let (int, frac) = split_decimal(&part[1..])?;
    (decimal_cmp(int, frac, limit) != std::cmp::Ordering::Greater).then_some(Coordinate {
        negative: part[0] == b'-',
        int,
        frac,
    })
}

/// Parses a client time, `DIGITS[.DIGITS]` of at most [`MAX_FIELD_BYTES`], into nanoseconds
/// since the epoch. Fraction digits past the ninth are truncated. A time too large for `i128`
/// nanoseconds is invalid.
pub fn parse_time_ns(text: &[u8]) -> Option<i128> {
    if text.len() > MAX_FIELD_BYTES {
        return None;
    }
    let (int, frac) = split_decimal(text)?;
    let digit = |d: u8| u64::from(d - b'0');
    // Every record from a peer comes through here. Eighteen digits cannot overflow a u64, so
    // the usual time is read without 128-bit arithmetic; only longer ones need it.
    let secs = if int.len() <= 18 {
        i128::from(int.iter().fold(0, |n, &d| n * 10 + digit(d)))
    } else {
        let mut secs: i128 = 0;
        for &d in int {
            secs = secs.checked_mul(10)?.checked_add(i128::from(digit(d)))?;
        }
        secs
    };
    let nanos = (0..9).fold(0, |n, i| n * 10 + frac.get(i).map_or(0, |&d| digit(d)));
    secs.checked_mul(1_000_000_000)?
        .checked_add(i128::from(nanos))
}

/// Parses a radius in kilometres, `DIGITS[.DIGITS]`, greater than 0 and at most 50, and returns
/// it in metres as exact decimal text: the decimal point moves three places right. Text, not a
/// float, because it goes into the request to Google: the client's digits arrive unchanged.
pub fn parse_radius(text: &[u8]) -> Option<Vec<u8>> {
    let (int, frac) = split_decimal(text)?;
    let positive = int.iter().chain(frac).any(|&d| d != b'0');
    if !positive || decimal_cmp(int, frac, 50) == std::cmp::Ordering::Greater {
        return None;
    }
    // The integer digits, then the first three fraction digits (zeros when fewer): metres.
    let mut text = Vec::with_capacity(24);
    text.extend_from_slice(strip_leading_zeros(int));
    for i in 0..3 {
        text.push(frac.get(i).copied().unwrap_or(b'0'));
    }
    let mut text: Vec<u8> = strip_leading_zeros(&text).to_vec();
    if text.is_empty() {
        text.push(b'0');
    }
    // What is left of the fraction, its trailing zeros dropped: a fraction of a metre.
    let rest = frac.get(3..).unwrap_or(&[]);
    let rest = &rest[..rest.iter().rposition(|&d| d != b'0').map_or(0, |p| p + 1)];
    if !rest.is_empty() {
        text.push(b'.');
        text.extend_from_slice(rest);
    }
    Some(text)
}

/// Parses a bound, an integer from 0 to 20.
pub fn parse_bound(text: &[u8]) -> Option<usize> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Leading zeros are allowed (`007`): the length is checked without them.
    let digits = strip_leading_zeros(text);
    if digits.len() > 2 {
        return None;
    }
    let value = digits
        .iter()
        .fold(0, |v, &d| v * 10 + usize::from(d - b'0'));
    (value <= 20).then_some(value)
}

/// Appends `AT <server> <diff> <client> <location> <time>` (no newline): the reply to an IAMAT
/// and, exactly as sent, the record of that update. `diff` is the receive time minus the client
/// time, in exact nanoseconds, printed with a sign and nine decimals.
pub fn write_at_line(out: &mut Vec<u8>, server: &str, received_ns: i128, iamat: &Iamat) {
    let diff = received_ns - iamat.time_ns;
    let sign = if diff < 0 { '-' } else { '+' };
    let abs = diff.unsigned_abs();
    out.extend_from_slice(b"AT ");
    out.extend_from_slice(server.as_bytes());
    out.push(b' ');
    out.push(sign as u8);
    let (secs, nanos) = (abs / 1_000_000_000, (abs % 1_000_000_000) as u32);
    match u64::try_from(secs) {
        Ok(secs) => push_decimal(out, secs),
        Err(_) => out.extend_from_slice(secs.to_string().as_bytes()), // beyond 584 billion years
    }
    out.push(b'.');
    // Always nine digits, zeros in front: the difference is exact to the nanosecond.
    let mut digits = [b'0'; 9];
    let mut rest = nanos;
    for digit in digits.iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out.extend_from_slice(&digits);
    out.push(b' ');
    out.extend_from_slice(iamat.client);
    out.push(b' ');
    out.extend_from_slice(iamat.location);
    out.push(b' ');
    out.extend_from_slice(iamat.time);
}

/// A record as it travels between peers: an `AT` line, validated and ready to merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtRecord<'a> {
    /// The client id, the line's fourth field.
    pub client: &'a [u8],
    /// The client's time in nanoseconds since the epoch, as [`parse_time_ns`] reads it.
    pub time_ns: i128,
}

/// Validates an `AT` line received from a peer: `AT SERVER DIFF CLIENT LOCATION TIME`, single
/// spaces, fields as an IAMAT would have them. The line is stored and re-sent byte for byte, so
/// anything looser is refused rather than repaired.
pub fn parse_at_record(line: &[u8]) -> Option<AtRecord<'_>> {
    // Every record crosses every server, so this is one pass over the bytes: fields end at
    // single spaces, and any other white space (`\t` to `\r`) refuses the line.
    let mut f: [&[u8]; 6] = [&[]; 6];
    let (mut count, mut start) = (0, 0);
    for (i, &b) in line.iter().enumerate() {
        if b == b' ' {
            if count == 5 || i == start {
                return None; // a seventh field, or an empty one
            }
            f[count] = &line[start..i];
            count += 1;
            start = i + 1;
        } else if (b'\t'..=b'\r').contains(&b) {
            return None;
        }
    }
    if count != 5 || start == line.len() {
        return None;
    }
    f[5] = &line[start..];
    let diff_ok = matches!(f[2].first(), Some(b'+' | b'-'))
        && split_decimal(&f[2][1..]).is_some_and(|(_, frac)| frac.len() == 9);
    if f[0] != b"AT" || !diff_ok || parse_location(f[4]).is_none() {
        return None;
    }
    Some(AtRecord {
        client: f[3],
        time_ns: parse_time_ns(f[5])?,
    })
}

/// The greeting a dialling peer sends as its first line: `PEER herd/1 NAME` (see [`crate::peer`]).
pub const GREETING_VERB: &[u8] = b"PEER";
/// The peer protocol's version, the greeting's second field: a line that names another is not
/// a greeting, and is run as a client's command (answered `?` and closed: its verb is a peer's).
pub const PROTOCOL_VERSION: &[u8] = b"herd/1";

/// Which of two records of the same client wins: the later client time, and on equal time the
/// bytewise larger line. A total order, so every server picks the same winner.
pub fn is_newer(time_ns: i128, line: &[u8], than_time_ns: i128, than_line: &[u8]) -> bool {
    (time_ns, line) > (than_time_ns, than_line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iamat(line: &[u8]) -> Option<Iamat<'_>> {
        match parse_command(line) {
            Command::Iamat(i) => Some(i),
            _ => None,
        }
    }

    #[test]
    fn white_space_is_six_bytes() {
        let all: Vec<u8> = (0u8..=255).filter(|&b| is_space(b)).collect();
        assert_eq!(all, b"\t\n\x0b\x0c\r ");
    }

    #[test]
    fn iamat_fields_are_split_on_any_white_space() {
        let i = iamat(b" IAMAT\x0bkiwi\t+1+2\x0c\r 3.5 \r").unwrap();
        assert_eq!(
            (i.client, i.location, i.time),
            (&b"kiwi"[..], &b"+1+2"[..], &b"3.5"[..])
        );
        assert_eq!(i.time_ns, 3_500_000_000);
    }

    #[test]
    fn invalid_iamats() {
        for line in [
            &b"IAMAT a +1+1"[..],
            b"IAMAT a +1+1 1 extra",
            b"iamat a +1+1 1",
            b"IAMAT a +90.5+1 1",
            b"IAMAT a +1+180.0001 1",
            b"IAMAT a 1+1 1",
            b"IAMAT a +1 1",
            b"IAMAT a +1+ 1",
            b"IAMAT a ++1+1 1",
            b"IAMAT a +1.+1 1",
            b"IAMAT a +.5+1 1",
            b"IAMAT a +1+1 nan",
            b"IAMAT a +1+1 -1",
            b"IAMAT a +1+1 1e9",
            b"IAMAT a +1+1 +5",
            b"IAMAT a +1+1 1.",
            b"IAMAT a +1+1 .5",
            b"IAMAT a +1+1 1.2.3",
            b"IAMAT a +1+1 999999999999999999999999999999999",
        ] {
            assert_eq!(
                parse_command(line),
                Command::Invalid,
                "{}",
                line.escape_ascii()
            );
        }
    }

    #[test]
    fn location_edges_are_exact() {
        assert!(parse_location(b"+90-180").is_some());
        assert!(parse_location(b"-90.000+180.0000").is_some());
        assert!(parse_location(b"+0090.0+0").is_some());
        assert!(parse_location(b"+90.0000000000000001+0").is_none());
        assert!(parse_location(b"+89.999999999+179.99999").is_some());
        // Sixty-four bytes at most, for the location and for the time.
        let long = |n: usize| format!("+1.{}+2", "0".repeat(n - 5));
        assert!(parse_location(long(MAX_FIELD_BYTES).as_bytes()).is_some());
        assert!(parse_location(long(MAX_FIELD_BYTES + 1).as_bytes()).is_none());
        let time = |n: usize| format!("1.{}", "5".repeat(n - 2));
        assert!(parse_time_ns(time(MAX_FIELD_BYTES).as_bytes()).is_some());
        assert!(parse_time_ns(time(MAX_FIELD_BYTES + 1).as_bytes()).is_none());
        assert!(parse_location(b"+34.068930-118.445127").is_some());
    }

    #[test]
    fn plain_coordinates_drop_plus_and_leading_zeros() {
        let (lat, lng) = parse_location(b"+034.068930-0118.4").unwrap();
        let mut out = Vec::new();
        lat.write_plain(&mut out);
        out.push(b',');
        lng.write_plain(&mut out);
        assert_eq!(out, b"34.068930,-118.4");
        let (lat, _) = parse_location(b"-00+0").unwrap();
        out.clear();
        lat.write_plain(&mut out);
        assert_eq!(out, b"-0");
    }

    #[test]
    fn times_are_exact_nanoseconds() {
        assert_eq!(
            parse_time_ns(b"1621464827.959498503"),
            Some(1_621_464_827_959_498_503)
        );
        assert_eq!(
            parse_time_ns(b"1621464827.9594985039999"),
            Some(1_621_464_827_959_498_503)
        );
        assert_eq!(parse_time_ns(b"1.5"), Some(1_500_000_000));
        assert_eq!(parse_time_ns(b"0"), Some(0));
        // Either side of the 18 digits read without 128-bit arithmetic, and the i128 limit.
        for int in [
            "999999999999999999",
            "1000000000000000000",
            "18446744073709551616",
        ] {
            let expected = int.parse::<i128>().unwrap() * 1_000_000_000 + 7;
            let text = format!("{int}.000000007");
            assert_eq!(parse_time_ns(text.as_bytes()), Some(expected), "{int}");
        }
        let most = i128::MAX / 1_000_000_000;
        assert_eq!(
            parse_time_ns(format!("{most}").as_bytes()),
            Some(most * 1_000_000_000)
        );
        assert_eq!(parse_time_ns(format!("{}", most + 1).as_bytes()), None);
        assert_eq!(parse_time_ns(format!("{}0", i128::MAX).as_bytes()), None);
    }

    #[test]
    fn at_line_has_exact_signed_difference() {
        let i =
            iamat(b"IAMAT kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503").unwrap();
        let mut out = Vec::new();
        write_at_line(&mut out, "Bailey", 1_621_464_828_223_371_889, &i);
        assert_eq!(
            out,
            b"AT Bailey +0.263873386 kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503"
        );
        let i = iamat(b"IAMAT k +1+1 13.000000001").unwrap();
        out.clear();
        write_at_line(&mut out, "B", 1_000_000_000, &i);
        assert_eq!(out, b"AT B -12.000000001 k +1+1 13.000000001");
        out.clear();
        write_at_line(&mut out, "B", 13_000_000_001, &i);
        assert_eq!(out, b"AT B +0.000000000 k +1+1 13.000000001");
    }

    #[test]
    fn whatsat_radius_and_bound() {
        let radius = |t: &[u8]| parse_radius(t).map(|r| String::from_utf8_lossy(&r).into_owned());
        assert_eq!(radius(b"10").as_deref(), Some("10000"));
        assert_eq!(radius(b"50").as_deref(), Some("50000"));
        assert_eq!(radius(b"50.000").as_deref(), Some("50000"));
        assert_eq!(radius(b"1.5").as_deref(), Some("1500"));
        assert_eq!(radius(b"0.0001").as_deref(), Some("0.1"));
        assert_eq!(radius(b"0.00012340").as_deref(), Some("0.1234"));
        assert_eq!(radius(b"007").as_deref(), Some("7000"));
        for bad in [
            &b"0"[..],
            b"0.0",
            b"50.5",
            b"50.0001",
            b"51",
            b"-1",
            b"+5",
            b"1e3",
            b"",
        ] {
            assert_eq!(radius(bad), None, "{}", bad.escape_ascii());
        }
        assert_eq!(parse_bound(b"0"), Some(0));
        assert_eq!(parse_bound(b"20"), Some(20));
        assert_eq!(parse_bound(b"007"), Some(7));
        for bad in [&b"21"[..], b"-1", b"5.0", b"+5", b"100"] {
            assert_eq!(parse_bound(bad), None);
        }
    }

    #[test]
    fn first_fields() {
        assert_eq!(first_field(b" \x0bAT Bona +0.1 x +1+1 1"), b"AT");
        assert_eq!(first_field(b"PEER"), b"PEER");
        assert_eq!(first_field(b" \t"), b"");
    }

    #[test]
    fn blank_and_overlong_lines() {
        assert_eq!(parse_command(b""), Command::Blank);
        assert_eq!(parse_command(b" \t\x0b\x0c\r"), Command::Blank);
        assert_eq!(parse_command(b"WHATSAT a 1 1 1"), Command::Invalid);
    }

    #[test]
    fn at_records_from_peers() {
        let line =
            b"AT Bailey +0.263873386 kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503";
        let r = parse_at_record(line).unwrap();
        assert_eq!(r.client, b"kiwi.cs.ucla.edu");
        assert_eq!(r.time_ns, 1_621_464_827_959_498_503);
        for bad in [
            &b"AT Bailey +0.26 kiwi +1+1 1"[..],
            b"AT Bailey  +0.263873386 kiwi +1+1 1",
            b"AT Bailey +0.263873386 kiwi +1+1",
            b"AT Bailey 0.263873386 kiwi +1+1 1",
            b"AT Bailey +0.263873386 kiwi +91+1 1",
            b"AT Bailey +0.263873386 kiwi +1+1 1\r",
        ] {
            assert!(parse_at_record(bad).is_none(), "{}", bad.escape_ascii());
        }
    }

    #[test]
    fn record_order_is_time_then_bytes() {
        assert!(is_newer(2, b"a", 1, b"z"));
        assert!(is_newer(1, b"b", 1, b"a"));
        assert!(!is_newer(1, b"a", 1, b"a"));
        assert!(!is_newer(1, b"z", 2, b"a"));
    }
}
