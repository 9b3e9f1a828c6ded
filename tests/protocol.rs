//! The client protocol in exact bytes (docs/protocol.md sections 2, 3, 4, 5 "clients cannot
//! inject", 6 and 7's line limit), against a real `herd serve` process.
//!
//! Every test starts its own lone server, "Bailey", on an ephemeral port and with no Places API
//! key, so a valid WHATSAT is answered with the stored AT line and Google's own `REQUEST_DENIED`
//! vocabulary. That answer shows which record a server holds without any network access.
//!
//! The only field a test cannot know exactly is the time difference of an AT reply, which
//! depends on the server's clock: `assert_at` checks everything else byte for byte and that the
//! difference is `[+-]DIGITS.NNNNNNNNN` and within a minute of what it should be.

mod common;

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::thread;
use std::time::Duration;

use common::herds::{free_ports, lone_bailey, member, Herd};
use common::*;
use herd::peer::{self, PartSet};
use herd::store::{part_of, Bounds, Merge, Store};

/// The body a server without an API key answers a valid WHATSAT with.
const NO_KEY_BODY: &[u8] = b"{\"html_attributions\" : [], \"results\" : [], \"status\" : \
\"REQUEST_DENIED\", \"error_message\" : \"This server has no Google Places API key: set \
GOOGLE_PLACES_API_KEY or places.key_file.\"}";

/// How long a test waits for something another connection did to become visible.
const SETTLE: Duration = Duration::from_secs(10);

/// A herd whose one running server is "Bailey".
struct Lone(Herd);

impl Lone {
    fn addr(&self) -> SocketAddr {
        self.0.get("Bailey").addr
    }

    fn server(&mut self) -> &mut ServerProc {
        self.0.get_mut("Bailey")
    }
}

/// Starts "Bailey" on port 0 with no neighbours and `extra` appended to the configuration.
fn lone_with(tag: &str, extra: &str) -> Lone {
    Lone(Herd::build(tag).extra(extra).start(lone_bailey()))
}

fn lone(tag: &str) -> Lone {
    lone_with(tag, "")
}

/// Starts "Bailey" with one configured neighbour, "Bona", that is not running. Bona's port is
/// held by the returned listener, which never accepts: Bailey's dialled link ends in its
/// backlog and can reach no other test's server. A server with neighbours needs a real port
/// (they must be able to dial it), so Bailey's comes from `free_ports`.
fn bailey_with_neighbour_bona(tag: &str) -> (Lone, TcpListener) {
    let bona = TcpListener::bind("127.0.0.1:0").expect("cannot bind a port for Bona");
    let bona_port = bona.local_addr().expect("listener address").port();
    let bailey_port = free_ports(1)[0];
    let members = vec![
        member("Bailey", bailey_port, &["Bona"]),
        member("Bona", bona_port, &["Bailey"]),
    ];
    let herd = Herd::build(tag).only(&["Bailey"]).start(members);
    (Lone(herd), bona)
}

/// `DIGITS[.DIGITS]` in nanoseconds, digits past the ninth truncated.
fn time_ns(text: &[u8]) -> i128 {
    let text = std::str::from_utf8(text).expect("client time is ASCII");
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let mut nanos: i128 = 0;
    for i in 0..9 {
        nanos = nanos * 10 + frac.as_bytes().get(i).map_or(0, |&d| i128::from(d - b'0'));
    }
    int.parse::<i128>().expect("client time digits") * 1_000_000_000 + nanos
}

/// Parses a time difference, `[+-]DIGITS.NNNNNNNNN` with exactly nine decimals.
fn parse_diff(diff: &[u8]) -> Option<i128> {
    let (&sign, rest) = diff.split_first()?;
    let negative = match sign {
        b'+' => false,
        b'-' => true,
        _ => return None,
    };
    let dot = rest.iter().position(|&b| b == b'.')?;
    let (int, frac) = (&rest[..dot], &rest[dot + 1..]);
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    if !digits(int) || frac.len() != 9 || !digits(frac) {
        return None;
    }
    let value = time_ns(rest);
    // Zero is printed "+0.000000000".
    if negative && value == 0 {
        return None;
    }
    Some(if negative { -value } else { value })
}

/// Asserts that `reply` is exactly `AT Bailey <diff> <fields>\n`, where `fields` are the client
/// id, location and time, and the difference is well formed and within 60 s of now minus the
/// client time (a sanity bound, not a timing test). Returns the AT line without its `\n`.
fn assert_at(reply: &[u8], fields: &[u8]) -> Vec<u8> {
    let prefix: &[u8] = b"AT Bailey ";
    let mut suffix = vec![b' '];
    suffix.extend_from_slice(fields);
    suffix.push(b'\n');
    assert!(
        reply.len() > prefix.len() + suffix.len()
            && reply.starts_with(prefix)
            && reply.ends_with(&suffix),
        "expected `AT Bailey <diff> {}\\n`, got `{}`",
        show(fields),
        show(reply)
    );
    let diff = &reply[prefix.len()..reply.len() - suffix.len()];
    let diff_ns = parse_diff(diff).unwrap_or_else(|| {
        panic!(
            "time difference `{}` is not [+-]DIGITS.NNNNNNNNN (\"+\" for zero) in `{}`",
            show(diff),
            show(reply)
        )
    });
    let time = fields
        .rsplit(|&b| b == b' ')
        .next()
        .expect("fields end with the client time");
    let expected = now_ns() - time_ns(time);
    assert!(
        (expected - diff_ns).abs() <= 60_000_000_000,
        "time difference `{}` is more than 60 s away from now - client time ({} ns) in `{}`",
        show(diff),
        expected,
        show(reply)
    );
    reply[..reply.len() - 1].to_vec()
}

/// The whole reply to a valid WHATSAT about a client whose stored record is `at_line`.
fn no_key_reply(at_line: &[u8]) -> Vec<u8> {
    let mut out = at_line.to_vec();
    out.push(b'\n');
    out.extend_from_slice(NO_KEY_BODY);
    out.extend_from_slice(b"\n\n");
    out
}

/// `? <line>\n`
fn invalid_reply(line: &[u8]) -> Vec<u8> {
    let mut out = b"? ".to_vec();
    out.extend_from_slice(line);
    out.push(b'\n');
    out
}

/// Sends one line (plus `\n`) and asserts the reply is `? <line>\n`.
fn assert_invalid(client: &mut Client, line: &[u8]) {
    let mut sent = line.to_vec();
    sent.push(b'\n');
    client.send(&sent);
    assert_eq!(
        show(&client.read_line()),
        show(&invalid_reply(line)),
        "reply to `{}`",
        show(&sent)
    );
}

/// Sends an IAMAT for `client` at `location` and `time` and returns its checked AT line.
fn iamat(c: &mut Client, client: &[u8], location: &[u8], time: &[u8]) -> Vec<u8> {
    let fields = [client, location, time].join(&b' ');
    let mut line = b"IAMAT ".to_vec();
    line.extend_from_slice(&fields);
    line.push(b'\n');
    c.send(&line);
    assert_at(&c.read_line(), &fields)
}

/// Sends `WHATSAT <client> 10 5` on `c` and returns the whole reply.
fn whatsat(c: &mut Client, client: &[u8]) -> Vec<u8> {
    let mut line = b"WHATSAT ".to_vec();
    line.extend_from_slice(client);
    line.extend_from_slice(b" 10 5\n");
    c.send(&line);
    c.read_whatsat_reply()
}

/// Polls `WHATSAT <client> 10 5` on fresh connections until the reply is `want`.
fn assert_eventually_stored(addr: SocketAddr, client: &[u8], want: &[u8]) {
    let mut line = b"WHATSAT ".to_vec();
    line.extend_from_slice(client);
    line.extend_from_slice(b" 10 5\n");
    let mut last = Vec::new();
    let stored = eventually(SETTLE, || {
        last = exchange(addr, &line);
        last == want
    });
    assert!(
        stored,
        "`{}` never answered `{}`; last answer `{}`",
        show(&line),
        show(want),
        show(&last)
    );
}

// ---------------------------------------------------------------------------------------------
// IAMAT

#[test]
fn iamat_is_answered_with_an_at_line_that_copies_the_client_fields() {
    let s = lone("iamat-basic");
    let mut c = Client::connect(s.addr());
    c.send(b"IAMAT kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503\n");
    assert_at(
        &c.read_line(),
        b"kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503",
    );

    // A client that sends the current time sees a difference near zero.
    let now = now_secs_string();
    iamat(
        &mut c,
        b"now.example",
        b"+34.068930-118.445127",
        now.as_bytes(),
    );

    // Integer degrees, leading zeros, any number of fraction digits: copied exactly as sent.
    iamat(&mut c, b"int", b"+34-118", b"1621464827");
    iamat(
        &mut c,
        b"zeros",
        b"+034.50-0118.000",
        b"0001621464827.9594985039999",
    );
    iamat(
        &mut c,
        b"seven",
        b"-33.8688+151.2093",
        b"1700000000.1234567",
    );
}

#[test]
fn time_difference_has_a_sign_and_nine_decimals() {
    let s = lone("iamat-diff");
    let mut c = Client::connect(s.addr());
    let past = iamat(&mut c, b"epoch", b"+0+0", b"0");
    assert!(
        past.starts_with(b"AT Bailey +"),
        "a client time of 0 must give a positive difference: `{}`",
        show(&past)
    );
    // A client clock ahead of the server's, within the minute a client time may lead by.
    let ahead = (now_ns() / 1_000_000_000 + 30).to_string();
    let future = iamat(&mut c, b"future", b"+0+0", format!("{ahead}.5").as_bytes());
    assert!(
        future.starts_with(b"AT Bailey -"),
        "a client time ahead must give a negative difference: `{}`",
        show(&future)
    );
    let tiny = iamat(
        &mut c,
        b"tiny",
        b"+0+0",
        format!("{ahead}.000000001").as_bytes(),
    );
    assert!(tiny.starts_with(b"AT Bailey -"), "`{}`", show(&tiny));
}

#[test]
fn fields_may_be_separated_by_any_of_the_six_white_space_bytes() {
    let s = lone("white-space");
    let mut c = Client::connect(s.addr());
    let cases: [(&[u8], &[u8]); 9] = [
        (b"IAMAT\tc1\t+1+1\t5\n", b"c1 +1+1 5"),
        (b"IAMAT\x0bc2\x0b+1+1\x0b5\n", b"c2 +1+1 5"),
        (b"IAMAT\x0cc3\x0c+1+1\x0c5\n", b"c3 +1+1 5"),
        (b"IAMAT\rc4\r+1+1\r5\n", b"c4 +1+1 5"),
        (b"IAMAT c5 +1+1 5\r\n", b"c5 +1+1 5"),
        (b"   IAMAT c6 +1+1 5   \n", b"c6 +1+1 5"),
        (b"\t\x0b\x0c\rIAMAT c7 +1+1 5\x0b\x0c\t \r\n", b"c7 +1+1 5"),
        (
            b" \t\x0b\x0c\rIAMAT \t\x0b\x0c\r c8 \x0b +1+1\x0c\t5 \t\x0b\x0c\r\r\n",
            b"c8 +1+1 5",
        ),
        (b"WHATSAT\x0bc1\x0b10\x0b5\n", b""),
    ];
    let mut c1 = Vec::new();
    for (sent, fields) in cases {
        c.send(sent);
        if fields.is_empty() {
            // The WHATSAT with \v separators, about c1.
            assert_eq!(
                show(&c.read_whatsat_reply()),
                show(&no_key_reply(&c1)),
                "reply to `{}`",
                show(sent)
            );
        } else {
            let at = assert_at(&c.read_line(), fields);
            if fields.starts_with(b"c1 ") {
                c1 = at;
            }
        }
    }
    // The same WHATSAT with every kind of separator and CRLF.
    c.send(b"\r\x0c WHATSAT\t\x0b c1 \x0c10\r5 \r\n");
    assert_eq!(show(&c.read_whatsat_reply()), show(&no_key_reply(&c1)));
}

#[test]
fn a_final_line_without_newline_is_answered_before_the_server_closes() {
    let s = lone("eof");
    let reply = exchange(s.addr(), b"IAMAT eof +1+1 5");
    let at = assert_at(&reply, b"eof +1+1 5");
    assert_eq!(
        show(&exchange(s.addr(), b"WHATSAT eof 10 5")),
        show(&no_key_reply(&at))
    );
    assert_eq!(
        show(&exchange(s.addr(), b"BOGUS  \t")),
        show(b"? BOGUS  \t\n")
    );
    // Trailing white space before the end of stream is still only white space.
    assert_at(
        &exchange(s.addr(), b"IAMAT eof2 +1+1 5\r \t"),
        b"eof2 +1+1 5",
    );
    // Earlier lines are answered too, in order.
    let reply = exchange(s.addr(), b"IAMAT eof3 +1+1 5\nWHATSAT eof3 10 5");
    let end = reply
        .iter()
        .position(|&b| b == b'\n')
        .expect("a reply line");
    let at3 = assert_at(&reply[..=end], b"eof3 +1+1 5");
    assert_eq!(show(&reply[end + 1..]), show(&no_key_reply(&at3)));
}

#[test]
fn invalid_commands_are_answered_with_a_question_mark_and_an_exact_copy() {
    let s = lone("invalid");
    let mut c = Client::connect(s.addr());
    let lines: &[&[u8]] = &[
        // Wrong field counts.
        b"IAMAT a +1+1 1 extra",
        b"IAMAT a +1+1",
        b"IAMAT a",
        b"IAMAT",
        // Locations out of range or malformed.
        b"IAMAT a +90.5+1 1",
        b"IAMAT a -90.5+1 1",
        b"IAMAT a +91+1 1",
        b"IAMAT a +1+180.5 1",
        b"IAMAT a +1-180.5 1",
        b"IAMAT a +1+181 1",
        b"IAMAT a 34.068930-118.445127 1",
        b"IAMAT a +34.068930118.445127 1",
        b"IAMAT a +34.068930 1",
        b"IAMAT a +1+1+1 1",
        b"IAMAT a +1.+1 1",
        b"IAMAT a +.5+1 1",
        b"IAMAT a ++1+1 1",
        b"IAMAT a +1,+1 1",
        // Times.
        b"IAMAT a +1+1 nan",
        b"IAMAT a +1+1 inf",
        b"IAMAT a +1+1 -1",
        b"IAMAT a +1+1 1e9",
        b"IAMAT a +1+1 +5",
        b"IAMAT a +1+1 1.",
        b"IAMAT a +1+1 .5",
        b"IAMAT a +1+1 1.2.3",
        b"IAMAT a +1+1 0x10",
        // Verbs are case sensitive; unknown verbs.
        b"iamat a +1+1 1",
        b"Iamat a +1+1 1",
        b"IAMATX a +1+1 1",
        b"whatsat a 10 5",
        b"HELLO",
        b"FOO bar baz qux",
        b"WHATSAT",
        b"WHAT\x00SAT a 10 5",
        // The copy keeps leading, inner and trailing white space.
        b"  IAMAT a +1+1 1 extra \t",
        b"\x0bIAMAT\x0ca\t\t+1+1\x0b",
        b" \x0c HELLO \x0b world \r ",
        // With CRLF the terminator is only the \n: the copy keeps the \r.
        b"IAMAT a +1+1\r",
        b"\rIAMAT a +1+1 1 2\r",
    ];
    for line in lines {
        assert_invalid(&mut c, line);
    }
    // The spec's example.
    assert_invalid(&mut c, b"IAMAT kiwi.cs.ucla.edu +34.068930-118.445127");

    // The connection survives, and no invalid IAMAT stored anything.
    iamat(&mut c, b"b", b"+1+1", b"1");
    assert_invalid(&mut c, b"WHATSAT a 10 5");
    assert_invalid(&mut c, b"WHATSAT kiwi.cs.ucla.edu 10 5");
}

#[test]
fn latitude_and_longitude_bounds_are_inclusive() {
    let s = lone("bounds");
    let mut c = Client::connect(s.addr());
    for (client, location) in [
        (&b"n1"[..], &b"+90.0+0"[..]),
        (b"n2", b"-90-180"),
        (b"n3", b"+90+180.000"),
        (b"n4", b"-90.000000+180"),
        (b"n5", b"+0-0"),
        (b"n6", b"-0.0+0.0"),
        (b"n7", b"+89.999999999-179.999999999"),
    ] {
        iamat(&mut c, client, location, b"5");
    }
}

#[test]
fn blank_and_white_space_only_lines_get_no_reply() {
    let s = lone("blank");
    let reply = exchange(
        s.addr(),
        b"\n\n \n\t\n\x0b\n\x0c\n\r\n \t\x0b\x0c\r \r\n   \nIAMAT blank +1+1 5\n\n \r\n",
    );
    assert_at(&reply, b"blank +1+1 5");
    // And a connection that sends only white space gets nothing at all.
    assert_eq!(show(&exchange(s.addr(), b"\n \r\n\x0b\x0c\t\n  ")), "");
}

// ---------------------------------------------------------------------------------------------
// Which record wins

#[test]
fn an_older_iamat_is_answered_but_not_stored() {
    let s = lone("stale");
    let mut c = Client::connect(s.addr());
    let newer = iamat(&mut c, b"stale", b"+1+1", b"200");
    // The older update still gets its own AT reply...
    iamat(&mut c, b"stale", b"+2+2", b"100");
    iamat(&mut c, b"stale", b"+2+2", b"199.999999999");
    // ...but the record held is the newer one.
    assert_eq!(
        show(&whatsat(&mut c, b"stale")),
        show(&no_key_reply(&newer))
    );

    // A later update replaces it.
    let latest = iamat(&mut c, b"stale", b"+3+3", b"300");
    assert_eq!(
        show(&whatsat(&mut c, b"stale")),
        show(&no_key_reply(&latest))
    );
    // Seen from another connection too.
    assert_eq!(
        show(&exchange(s.addr(), b"WHATSAT stale 10 5\n")),
        show(&no_key_reply(&latest))
    );
}

#[test]
fn on_equal_client_times_the_bytewise_larger_at_line_is_stored() {
    let s = lone("tie");
    let mut c = Client::connect(s.addr());
    // Separate writes, both orders of arrival.
    for (client, first, second) in [
        (&b"tieA"[..], &b"+1+1"[..], &b"+2+2"[..]),
        (b"tieB", b"+2+2", b"+1+1"),
    ] {
        let one = iamat(&mut c, client, first, b"100");
        let two = iamat(&mut c, client, second, b"100");
        let winner = one.clone().max(two.clone());
        assert_eq!(
            show(&whatsat(&mut c, client)),
            show(&no_key_reply(&winner)),
            "stored record after `{}` then `{}`",
            show(&one),
            show(&two)
        );
    }
    // One write, both orders: a server that reads its clock once per batch gives both lines
    // the same difference, and then the location alone decides, whatever the arrival order.
    for (client, first, second) in [
        (&b"tieC"[..], &b"+1+1"[..], &b"+2+2"[..]),
        (b"tieD", b"+2+2", b"+1+1"),
    ] {
        let mut sent = Vec::new();
        for location in [first, second] {
            sent.extend_from_slice(&[b"IAMAT ", client, b" ", location, b" 100\n"].concat());
        }
        c.send(&sent);
        let one = assert_at(&c.read_line(), &[client, b" ", first, b" 100"].concat());
        let two = assert_at(&c.read_line(), &[client, b" ", second, b" 100"].concat());
        let winner = one.clone().max(two.clone());
        assert_eq!(
            show(&whatsat(&mut c, client)),
            show(&no_key_reply(&winner)),
            "stored record after `{}` then `{}` in one write",
            show(&one),
            show(&two)
        );
    }
}

#[test]
fn on_equal_client_times_records_from_a_peer_are_ordered_by_their_bytes() {
    // "AT Bona ..." > "AT Bailey ..." > "AT Bah ...": with equal client times the winner is
    // fixed by the bytes, whichever arrives first.
    let (s, _bona) = bailey_with_neighbour_bona("tie-peer");
    let addr = s.addr();
    let mut peer = Client::connect(addr);
    peer.send(b"PEER herd/1 Bona\n");
    let mut c = Client::connect(addr);

    // A larger record arriving after the IAMAT replaces it.
    iamat(&mut c, b"tie1", b"+1+1", b"100");
    let bona1: &[u8] = b"AT Bona +0.000000000 tie1 +1+1 100";
    peer.send(&[bona1, b"\n"].concat());
    assert_eventually_stored(addr, b"tie1", &no_key_reply(bona1));

    // A larger record arriving first is kept; the IAMAT is still answered.
    let bona2: &[u8] = b"AT Bona +0.000000000 tie2 +1+1 100";
    peer.send(&[bona2, b"\n"].concat());
    assert_eventually_stored(addr, b"tie2", &no_key_reply(bona2));
    iamat(&mut c, b"tie2", b"+1+1", b"100");
    assert_eq!(show(&whatsat(&mut c, b"tie2")), show(&no_key_reply(bona2)));

    // A smaller record arriving first is replaced by the IAMAT.
    let bah3: &[u8] = b"AT Bah +0.000000000 tie3 +1+1 100";
    peer.send(&[bah3, b"\n"].concat());
    assert_eventually_stored(addr, b"tie3", &no_key_reply(bah3));
    let mine3 = iamat(&mut c, b"tie3", b"+1+1", b"100");
    assert_eq!(show(&whatsat(&mut c, b"tie3")), show(&no_key_reply(&mine3)));

    // A smaller record arriving after the IAMAT changes nothing; nor does one whose time is
    // larger only past the ninth decimal (ordering truncates to nanoseconds). The sync record
    // after them on the same link shows they were processed.
    let mine4 = iamat(&mut c, b"tie4", b"+1+1", b"100");
    let mine5 = iamat(&mut c, b"tie5", b"+1+1", b"100");
    let sync: &[u8] = b"AT Bona +0.000000000 sync45 +1+1 1";
    peer.send(
        &[
            &b"AT Bah +0.000000000 tie4 +1+1 100\n"[..],
            b"AT Bah +0.000000000 tie5 +1+1 100.0000000009\n",
            sync,
            b"\n",
        ]
        .concat(),
    );
    assert_eventually_stored(addr, b"sync45", &no_key_reply(sync));
    assert_eq!(show(&whatsat(&mut c, b"tie4")), show(&no_key_reply(&mine4)));
    assert_eq!(show(&whatsat(&mut c, b"tie5")), show(&no_key_reply(&mine5)));

    // A later client time beats any bytes.
    let later: &[u8] = b"AT Bah +0.000000000 tie4 +1+1 100.000000001";
    peer.send(&[later, b"\n"].concat());
    assert_eventually_stored(addr, b"tie4", &no_key_reply(later));
}

// ---------------------------------------------------------------------------------------------
// Connections

#[test]
fn pipelined_commands_in_one_write_are_answered_in_order() {
    let s = lone("pipeline");
    let mut c = Client::connect(s.addr());
    c.send(b"IAMAT pipe +1+1 5\nBOGUS line\nWHATSAT pipe 10 5\nIAMAT pipe2 +2+2 6\n");
    let at = assert_at(&c.read_line(), b"pipe +1+1 5");
    assert_eq!(show(&c.read_line()), show(b"? BOGUS line\n"));
    assert_eq!(show(&c.read_whatsat_reply()), show(&no_key_reply(&at)));
    assert_at(&c.read_line(), b"pipe2 +2+2 6");
    c.half_close();
    assert_eq!(show(&c.read_to_end()), "", "nothing after the four replies");
}

#[test]
fn a_command_sent_one_byte_at_a_time_is_answered_once() {
    let s = lone("bytewise");
    let mut c = Client::connect(s.addr());
    for &b in b"IAMAT slow +1+1 5\n" {
        c.send(&[b]);
        thread::sleep(Duration::from_millis(3));
    }
    let at = assert_at(&c.read_line(), b"slow +1+1 5");
    for &b in b"WHATSAT slow 10 5\r\n" {
        c.send(&[b]);
        thread::sleep(Duration::from_millis(3));
    }
    assert_eq!(show(&c.read_whatsat_reply()), show(&no_key_reply(&at)));
    c.half_close();
    assert_eq!(
        show(&c.read_to_end()),
        "",
        "each command answered exactly once"
    );
}

#[test]
fn client_ids_need_not_be_utf8() {
    let s = lone("utf8");
    let mut c = Client::connect(s.addr());
    let id: &[u8] = b"\xff\xfe\x80\xc3(caf\xc3\xa9";
    let at = iamat(&mut c, id, b"+1+1", b"5");
    assert_eq!(show(&whatsat(&mut c, id)), show(&no_key_reply(&at)));
    assert_invalid(&mut c, b"\xff\xfe");
    assert_invalid(&mut c, b"IAMAT \xff +1+1");
    assert_invalid(&mut c, b"WHATSAT \xfe\xff 10 5");
    // The connection survives.
    iamat(&mut c, b"ok", b"+1+1", b"5");
}

#[test]
fn many_commands_on_one_connection_are_answered_in_order() {
    pipelined_commands_are_all_answered(1000, false);
}

/// Far more output than a client may leave unread (here 100,000 bytes), sent while the client
/// does not read at first: the server must hold back rather than disconnect, and resume by
/// itself, with no new event, once the client reads.
#[test]
fn megabytes_of_pipelined_commands_are_all_answered() {
    pipelined_commands_are_all_answered(50_000, true);
}

/// Bytes that have arrived on `stream` and wait to be read.
fn unread_bytes(stream: &std::net::TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which is valid for its size.
    let result = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(result, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    usize::try_from(n).expect("a count")
}

/// `n` IAMATs and a WHATSAT in one stream, all answered in order. With `fill`, the client first
/// reads nothing until the server's output is full: replies wait unread in the client's socket
/// and no more arrive, while most are still owed.
fn pipelined_commands_are_all_answered(n: usize, fill: bool) {
    let n_minus_1 = n - 1;
    let s = lone_with("many", "[limits]\nclient_output_bytes = 100000\n");
    let mut c = Client::connect(s.addr());
    let mut sent = Vec::new();
    for i in 0..n {
        sent.extend_from_slice(format!("IAMAT m{i} +1+1 {i}.5\n").as_bytes());
    }
    sent.extend_from_slice(format!("WHATSAT m{n_minus_1} 10 5\n").as_bytes());
    // Write on another thread so that neither side can block the other on full buffers.
    let mut writer = c.stream.try_clone().expect("cannot clone the stream");
    let sender = thread::spawn(move || {
        writer.write_all(&sent).expect("cannot send the commands");
        writer.shutdown(Shutdown::Write).expect("cannot half-close");
    });
    if fill {
        // The server fills its output and the kernel's buffers before anything is read: the
        // bytes waiting in this socket stop growing, with the socket's receive buffer full (a
        // quarter of it at least: the kernel keeps some of it for its own) and most replies
        // still owed.
        let full_at = receive_buffer(&c.stream) / 4;
        let mut before = unread_bytes(&c.stream);
        let full = eventually(SETTLE, || {
            thread::sleep(Duration::from_millis(200));
            let now = unread_bytes(&c.stream);
            let still = now == before && now > 0;
            before = now;
            still
        });
        let owed = n * "AT Bailey +0.000000000 m0 +1+1 0.5\n".len();
        assert!(
            full && before >= full_at && before < owed / 2,
            "the server's output never filled: {before} bytes waiting unread in the client's \
             socket, steady: {full} (its receive buffer is full at {full_at}; the replies owed \
             are over {owed})"
        );
    }
    let mut last = Vec::new();
    for i in 0..n {
        last = assert_at(&c.read_line(), format!("m{i} +1+1 {i}.5").as_bytes());
    }
    assert_eq!(show(&c.read_whatsat_reply()), show(&no_key_reply(&last)));
    assert_eq!(show(&c.read_to_end()), "", "nothing after the replies");
    sender.join().expect("sender thread panicked");
}

#[test]
fn half_close_with_a_whatsat_pending_still_gets_the_whole_reply() {
    let s = lone("half-close");
    let reply = exchange(s.addr(), b"IAMAT hc +1+1 5\nWHATSAT hc 10 5\n");
    let end = reply
        .iter()
        .position(|&b| b == b'\n')
        .expect("a reply line");
    let at = assert_at(&reply[..=end], b"hc +1+1 5");
    assert_eq!(show(&reply[end + 1..]), show(&no_key_reply(&at)));

    assert_eq!(
        show(&exchange(s.addr(), b"WHATSAT hc 10 5\n")),
        show(&no_key_reply(&at))
    );
    let three = exchange(
        s.addr(),
        b"WHATSAT hc 10 5\nWHATSAT hc 1 0\nWHATSAT hc 50 20\n",
    );
    assert_eq!(show(&three), show(&no_key_reply(&at).repeat(3)));
}

// ---------------------------------------------------------------------------------------------
// WHATSAT

#[test]
fn whatsat_rejects_bad_radius_bad_bound_and_unknown_clients() {
    let s = lone("whatsat-invalid");
    let mut c = Client::connect(s.addr());
    iamat(&mut c, b"w", b"+34.068930-118.445127", b"5");
    let lines: &[&[u8]] = &[
        // Radius: greater than 0, at most 50, DIGITS[.DIGITS].
        b"WHATSAT w 0 5",
        b"WHATSAT w 0.0 5",
        b"WHATSAT w 000 5",
        b"WHATSAT w 50.5 5",
        b"WHATSAT w 50.0001 5",
        b"WHATSAT w 51 5",
        b"WHATSAT w -10 5",
        b"WHATSAT w +10 5",
        b"WHATSAT w 1e1 5",
        b"WHATSAT w 10. 5",
        b"WHATSAT w .5 5",
        b"WHATSAT w ten 5",
        // Bound: an integer from 0 to 20.
        b"WHATSAT w 10 21",
        b"WHATSAT w 10 -1",
        b"WHATSAT w 10 5.0",
        b"WHATSAT w 10 +5",
        b"WHATSAT w 10 100",
        b"WHATSAT w 10 five",
        // Field counts, case, unknown clients.
        b"WHATSAT w 10",
        b"WHATSAT w 10 5 1",
        b"WHATSAT w",
        b"whatsat w 10 5",
        b"WHATSAT nobody 10 5",
        b"WHATSAT W 10 5",
        b" WHATSAT nobody\t10 5 \r",
    ];
    for line in lines {
        assert_invalid(&mut c, line);
    }
}

#[test]
fn valid_whatsats_are_answered_with_the_stored_at_line_and_a_body() {
    let s = lone("whatsat-valid");
    let mut c = Client::connect(s.addr());
    let at = iamat(&mut c, b"w", b"+34.068930-118.445127", b"5");
    for line in [
        &b"WHATSAT w 10 5\n"[..],
        b"WHATSAT w 50 5\n",
        b"WHATSAT w 50.0 5\n",
        b"WHATSAT w 50.000 20\n",
        b"WHATSAT w 10.5 5\n",
        b"WHATSAT w 0.5 1\n",
        b"WHATSAT w 0.001 1\n",
        b"WHATSAT w 007 07\n",
        b"WHATSAT w 10 0\n",
        b"WHATSAT w 10 20\n",
    ] {
        c.send(line);
        assert_eq!(
            show(&c.read_whatsat_reply()),
            show(&no_key_reply(&at)),
            "reply to `{}`",
            show(line)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Clients cannot inject; peers can

/// A client that speaks the peers' language (`AT`, `PEER`) is forging records: it is answered
/// like any invalid command, then disconnected; what it sent after is not run, and nothing is
/// stored.
fn assert_forgery_refused(addr: SocketAddr, line: &[u8]) {
    let mut c = Client::connect(addr);
    let mut sent = line.to_vec();
    sent.extend_from_slice(b"\nIAMAT after-forgery +1+1 5\n");
    c.send(&sent);
    let mut expected = b"? ".to_vec();
    expected.extend_from_slice(line);
    expected.push(b'\n');
    assert_eq!(
        show(&c.read_to_end()),
        show(&expected),
        "the reply to a forged line, then the end"
    );
}

#[test]
fn clients_cannot_inject_at_records() {
    let s = lone("inject");
    assert_forgery_refused(s.addr(), b"AT Bona +0.1 x +1+1 1.0");
    assert_forgery_refused(s.addr(), b"AT Bona +0.100000000 x +1+1 1.0");
    assert_forgery_refused(s.addr(), b"AT Bailey +0.100000000 x +1+1 1.0");
    let mut c = Client::connect(s.addr());
    assert_invalid(&mut c, b"WHATSAT x 10 5");
    assert_invalid(&mut c, b"WHATSAT after-forgery 10 5");
}

#[test]
fn a_greeting_from_a_server_that_is_not_a_neighbour_is_an_invalid_command() {
    let s = lone("greeting-stranger");
    assert_forgery_refused(s.addr(), b"PEER herd/1 Bona");
    // A server is not its own neighbour.
    assert_forgery_refused(s.addr(), b"PEER herd/1 Bailey");
    let mut c = Client::connect(s.addr());
    assert_invalid(&mut c, b"WHATSAT after-forgery 10 5");
}

#[test]
fn a_greeting_after_another_command_is_an_invalid_command() {
    let (s, _bona) = bailey_with_neighbour_bona("greeting-late");
    let mut c = Client::connect(s.addr());
    iamat(&mut c, b"inj", b"+1+1", b"5");
    c.send(b"PEER herd/1 Bona\nAT Bona +0.100000000 inj2 +1+1 1.0\n");
    assert_eq!(show(&c.read_to_end()), show(b"? PEER herd/1 Bona\n"));

    // A malformed greeting naming a neighbour is a client's line; a peer's verb, so forged.
    assert_forgery_refused(s.addr(), b"PEER herd/2 Bona");
    assert_forgery_refused(s.addr(), b"PEER herd/1 Bona extra");
    // Verbs are case sensitive: `peer` is just an invalid command.
    let mut c = Client::connect(s.addr());
    assert_invalid(&mut c, b"peer herd/1 Bona");
    assert_invalid(&mut c, b"WHATSAT inj2 10 5");
}

#[test]
fn a_neighbours_greeting_makes_a_peer_link_whose_records_are_stored() {
    let (s, _bona) = bailey_with_neighbour_bona("greeting-peer");
    let addr = s.addr();
    let mut peer = Client::connect(addr);
    let record: &[u8] = b"AT Bona +0.500000000 peerclient +10+20 100.5";
    peer.send(&[&b"PEER herd/1 Bona\n"[..], record, b"\n"].concat());
    // Another client sees the record as the stored one, exactly as the peer sent it.
    let want = no_key_reply(record);
    let mut last = Vec::new();
    let stored = eventually(SETTLE, || {
        last = exchange(addr, b"WHATSAT peerclient 10 1\n");
        last == want
    });
    assert!(
        stored,
        "the peer's record never became the stored one; last answer `{}`",
        show(&last)
    );

    // Malformed records change nothing, even with a later client time.
    peer.send(
        &[
            &b"AT Bona +0.5 peerclient +10+20 200\n"[..],
            b"AT Bona +0.500000000 peerclient +91+20 200\n",
            b"AT Bona +0.500000000 peerclient +10+181 200\n",
            b"AT Bona  +0.500000000 peerclient +10+20 200\n",
            b"AT Bona\t+0.500000000 peerclient +10+20 200\n",
            b"AT Bona +0.500000000 peerclient +10+20 200 extra\n",
            b"AT Bona +0.500000000 peerclient +10+20 2e2\n",
            b"AT Bona +0.500000000 peerclient +10+20\n",
            b"AT Bona 0.500000000 peerclient +10+20 200\n",
            b"AT Bona +0.500000000 peerclient +10+20 200 \n",
            b"AT Bona +0.5 unknown1 +1+1 1\n",
            b"AT Bona +0.500000000 unknown2 1+1 1\n",
            b"At Bona +0.500000000 unknown3 +1+1 1\n",
        ]
        .concat(),
    );
    // The accepting side never writes on a peer link; once it has read everything up to the
    // end of the stream and closed, every line above has been dealt with.
    peer.half_close();
    assert_eq!(
        show(&peer.read_to_end()),
        "",
        "the server wrote on a peer link"
    );
    assert_eq!(
        show(&exchange(addr, b"WHATSAT peerclient 10 1\n")),
        show(&want)
    );
    for client in ["unknown1", "unknown2", "unknown3"] {
        let line = format!("WHATSAT {client} 10 1");
        assert_eq!(
            show(&exchange(addr, format!("{line}\n").as_bytes())),
            show(&invalid_reply(line.as_bytes()))
        );
    }
}

/// A peer's `PARTS` lines and `DIGEST`, as a dialler sends them, for a store holding `store`.
fn digest_lines(store: &Store) -> Vec<u8> {
    let lines = peer::store_lines(store);
    lines
        .iter()
        .flat_map(|line| [&line[..], b"\n"].concat())
        .collect()
}

/// The next `AT` record on a link from the server, past its heartbeats and digests.
fn next_record(link: &mut Client) -> Vec<u8> {
    loop {
        let line = link.read_line();
        if line.starts_with(b"AT ") {
            return line;
        }
        let verb = line
            .split(|&b| b == b' ' || b == b'\n')
            .next()
            .unwrap_or_default();
        assert!(
            [&b"PING"[..], b"PARTS", b"DIGEST"].contains(&verb),
            "an unexpected line on the link: {}",
            show(&line)
        );
    }
}

/// Stores that agree copy nothing; a store that lacks one record at two digests in a row has
/// that record's part copied again both ways, and nothing else: the acceptor answers
/// `SYNC SET` naming the part, and its own link sends the part's records again.
#[test]
fn a_part_that_differs_at_two_digests_in_a_row_is_copied_again_and_nothing_else() {
    let (s, bona) = bailey_with_neighbour_bona("digest-parts");
    let addr = s.addr();
    // Bailey's link to Bona, accepted here: its greeting, then every record Bailey stores.
    let mut from_bailey = Client::accept(&bona);
    assert_eq!(
        show(&from_bailey.read_line()),
        show(b"PEER herd/1 Bailey\n")
    );
    // A heartbeat now and then, so that Bailey never finds the link silent.
    from_bailey.send(b"PING\n");
    let mut held = Store::default();
    let mut records = Vec::new();
    for i in 0..40 {
        let iamat = format!(
            "IAMAT part-{i}.cs.ucla.edu +34.068930-118.445127 {}.5\n",
            1000 + i
        );
        let reply = exchange(addr, iamat.as_bytes());
        let line = reply.strip_suffix(b"\n").expect("a whole AT line").to_vec();
        assert_eq!(
            held.merge_record(&line, &Bounds::NONE),
            Some(Merge::Stored),
            "{}",
            show(&line)
        );
        records.push(line);
    }
    let mut seen: Vec<Vec<u8>> = (0..records.len())
        .map(|_| next_record(&mut from_bailey))
        .collect();
    seen.sort();
    let mut all = records
        .iter()
        .map(|r| [&r[..], b"\n"].concat())
        .collect::<Vec<_>>();
    all.sort();
    assert_eq!(seen, all, "Bailey's records on its link to Bona");

    // Bona's link to Bailey: the digests of Bailey's own store, then twice those of a store
    // without the last record, each round a little more than the 1.5 s apart that a server
    // heeds (a correct dialler sends them 3 s apart).
    let last = records.last().expect("records");
    let mut lacking = Store::default();
    for record in &records[..records.len() - 1] {
        lacking.merge_record(record, &Bounds::NONE);
    }
    let mut to_bailey = Client::connect(addr);
    to_bailey.send(b"PEER herd/1 Bona\n");
    let heeded = peer::ACT_AT_MOST_EVERY + Duration::from_millis(100);
    to_bailey.send(&digest_lines(&held));
    for _ in 0..2 {
        thread::sleep(heeded);
        to_bailey.send(&digest_lines(&lacking));
    }
    let client = last.split(|&b| b == b' ').nth(3).expect("a client field");
    let mut part = PartSet::default();
    part.insert(part_of(client));
    // Bailey writes back heartbeats, and then asks for that part alone.
    let asked = loop {
        let line = to_bailey.read_line();
        if line != b"PING\n" {
            break line;
        }
    };
    assert_eq!(
        show(&asked),
        show(&[&peer::sync_line(Some(&part))[..], b"\n"].concat())
    );
    // And sends that part again: the records of its clients, in the store's order, the last
    // record last. A copy of the whole store would send the other 39 first.
    from_bailey.send(b"PING\n");
    let again: Vec<Vec<u8>> = records
        .iter()
        .filter(|r| part.contains(part_of(r.split(|&b| b == b' ').nth(3).unwrap_or_default())))
        .map(|r| [&r[..], b"\n"].concat())
        .collect();
    for want in &again {
        assert_eq!(show(&next_record(&mut from_bailey)), show(want));
    }
    // Then nothing more of the store: the next record on the link is a new one, flooded.
    let marker = exchange(
        addr,
        b"IAMAT after.cs.ucla.edu +34.068930-118.445127 2000.5\n",
    );
    assert_eq!(show(&next_record(&mut from_bailey)), show(&marker));
}

// ---------------------------------------------------------------------------------------------
// Limits

#[test]
fn a_line_longer_than_max_line_bytes_is_refused_and_the_connection_closed() {
    let s = lone_with("long-line", "[limits]\nmax_line_bytes = 100\n");
    // A line under the limit is fine.
    let mut c = Client::connect(s.addr());
    let id = "i".repeat(70);
    iamat(&mut c, id.as_bytes(), b"+1+1", b"5");

    let long = [&b"IAMAT "[..], &[b'x'; 200], b" +1+1 5"].concat();
    let check = |reply: &[u8]| {
        let text = String::from_utf8_lossy(reply);
        assert!(
            reply.starts_with(b"? ")
                && reply.ends_with(b"\n")
                && reply.iter().filter(|&&b| b == b'\n').count() == 1
                && text.contains("line longer than 100 bytes"),
            "expected one line `? <prefix>... (line longer than 100 bytes)`, got `{}`",
            show(reply)
        );
        assert!(
            reply[2..].starts_with(&long[..16]),
            "the reply does not quote a prefix of the line: `{}`",
            show(reply)
        );
        // README.md, [limits] max_line_bytes.
        let readme = [
            &b"? "[..],
            &long[..64],
            b"... (line longer than 100 bytes)\n",
        ]
        .concat();
        assert_eq!(show(reply), show(&readme), "the form README.md documents");
    };

    // With its newline; the server closes without waiting for the client.
    let mut c = Client::connect(s.addr());
    c.send(&[&long[..], b"\n"].concat());
    check(&c.read_to_end());

    // Without any newline: the server must not wait for one.
    let mut c = Client::connect(s.addr());
    c.send(&long);
    check(&c.read_to_end());

    // Replies to earlier commands on the connection come first.
    let mut c = Client::connect(s.addr());
    c.send(&[&b"IAMAT before +1+1 5\n"[..], &long, b"\n"].concat());
    assert_at(&c.read_line(), b"before +1+1 5");
    check(&c.read_to_end());

    // The server is unharmed.
    let mut c = Client::connect(s.addr());
    iamat(&mut c, b"after", b"+1+1", b"5");
}

/// `idle_timeout_ms`: a client with nothing received and nothing pending for this long is
/// closed (no earlier, and within the once-a-second check and half a second more); a client
/// that keeps sending is not; with `0` a client is never closed for idling.
#[test]
fn a_client_idle_past_idle_timeout_ms_is_closed_and_0_turns_it_off() {
    const IDLE: Duration = Duration::from_millis(1000);
    let bound = IDLE + Duration::from_millis(1500);
    let s = lone_with(
        "idle",
        &format!("[limits]\nidle_timeout_ms = {}\n", IDLE.as_millis()),
    );
    let never = lone_with("idle-off", "[limits]\nidle_timeout_ms = 0\n");
    let (addr, never_addr) = (s.addr(), never.addr());
    // A client that keeps sending, every 400 ms, for longer than the bound.
    let busy = thread::spawn(move || {
        let mut c = Client::connect(addr);
        let started = std::time::Instant::now();
        let mut i = 0;
        while started.elapsed() < bound + Duration::from_millis(500) {
            iamat(&mut c, format!("busy-{i}").as_bytes(), b"+1+1", b"5");
            i += 1;
            thread::sleep(Duration::from_millis(400));
        }
        iamat(&mut c, b"busy-last", b"+1+1", b"5");
    });
    // With the timeout off, a client quiet for as long is still served.
    let off = thread::spawn(move || {
        let mut c = Client::connect(never_addr);
        iamat(&mut c, b"quiet-1", b"+1+1", b"5");
        thread::sleep(bound + Duration::from_millis(500));
        iamat(&mut c, b"quiet-2", b"+1+1", b"5");
    });
    let mut c = Client::connect(addr);
    iamat(&mut c, b"idle", b"+1+1", b"5");
    let quiet_since = std::time::Instant::now();
    let rest = c.read_to_end();
    let closed_after = quiet_since.elapsed();
    assert_eq!(show(&rest), "", "an idle client was sent something");
    assert!(
        closed_after >= IDLE && closed_after <= bound,
        "an idle client was closed {closed_after:?} after its last byte (idle_timeout_ms \
         {IDLE:?}; bound {bound:?})"
    );
    busy.join().expect("the busy client");
    off.join()
        .expect("the client of the server without an idle timeout");
    println!("idle: closed {closed_after:?} after its last byte (idle_timeout_ms {IDLE:?})");
}

// ---------------------------------------------------------------------------------------------
// Process and log

#[test]
fn sigterm_exits_zero_with_the_log_flushed() {
    let mut s = lone("sigterm");
    let mut c = Client::connect(s.addr());
    let at = iamat(&mut c, b"sigterm-client", b"+1+1", b"5");
    // The client stays connected: SIGTERM must not wait for it.
    let status = s.server().terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );
    let log = s.server().log();
    assert_log_ends_stopped(s.server());
    assert!(
        log.contains("IAMAT sigterm-client +1+1 5"),
        "the log lacks the received line:\n{log}"
    );
    assert!(
        log.contains(&*String::from_utf8_lossy(&at)),
        "the log lacks the sent line `{}`:\n{log}",
        show(&at)
    );
}

#[test]
fn sigint_exits_zero_with_the_log_flushed() {
    let mut s = lone("sigint");
    let mut c = Client::connect(s.addr());
    iamat(&mut c, b"sigint-client", b"+1+1", b"5");
    let status = s.server().signal_and_wait(libc::SIGINT);
    assert_eq!(status.code(), Some(0), "exit status after SIGINT: {status}");
    assert_log_ends_stopped(s.server());
    let log = s.server().log();
    assert!(
        log.contains("IAMAT sigint-client +1+1 5"),
        "the log lacks the received line:\n{log}"
    );
}

#[test]
fn the_log_escapes_client_bytes() {
    let mut s = lone("log-escape");
    let mut c = Client::connect(s.addr());
    iamat(&mut c, b"esc\x1b[31m", b"+1+1", b"1");
    iamat(&mut c, b"bell\x07id", b"+1+1", b"1");
    assert_invalid(&mut c, b"FORGE\r2030-01-01T00:00:00.000000Z c1 < forged");
    assert_invalid(&mut c, b"\x7f\x08\x00 nul");
    let status = s.server().terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status}"
    );

    let log = s.server().log_bytes();
    let text = String::from_utf8_lossy(&log);
    let raw: Vec<u8> = log
        .iter()
        .copied()
        .filter(|&b| (b < 0x20 && b != b'\n') || b == 0x7f)
        .collect();
    assert!(
        raw.is_empty(),
        "the log holds raw control bytes {}:\n{}",
        show(&raw),
        show(&log)
    );
    assert!(
        text.contains("esc\\x1b[31m"),
        "no escaped ESC in the log:\n{text}"
    );
    assert!(
        text.contains("bell\\x07id"),
        "no escaped BEL in the log:\n{text}"
    );
    assert!(
        text.contains("FORGE\\r2030-01-01") || text.contains("FORGE\\x0d2030-01-01"),
        "no escaped CR in the log:\n{text}"
    );
    for line in text.lines() {
        assert!(
            line.starts_with(|c: char| c.is_ascii_digit()) && !line.starts_with("2030-01-01"),
            "a log line that does not start with the server's time stamp: `{line}`"
        );
    }
}
