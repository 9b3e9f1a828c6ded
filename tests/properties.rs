//! Property tests: the parsers that read what clients, peers and Google send, fed arbitrary
//! and adversarial bytes. They must never panic, never accept what they should refuse (inputs
//! made invalid by construction, one field damaged at a time, must be refused), and agree with
//! their own writers (what is written is read back the same).
//!
//! proptest keeps every failing case it finds under `proptest-regressions/` and replays it first
//! on every run: that is the corpus. CI runs the default 256 cases per property; a longer hunt
//! is `PROPTEST_CASES=100000 cargo test --release --test properties`.

use herd::peer::{self, Greeting, PartSet, PeerLine, Secret, Session};
use herd::places::http::ResponseReader;
use herd::places::{self, Api, Output};
use herd::protocol::{self, Command};
use proptest::prelude::*;

/// Bytes that look like protocol lines often enough to reach deep into the parsers: fields
/// made of signs, digits, dots and letters, separated by any of the six white-space bytes.
fn line_like() -> impl Strategy<Value = Vec<u8>> {
    let field = prop::collection::vec(
        prop::sample::select(b"+-.0123456789IAMTWHSe AT\xff\x00".to_vec()),
        0..24,
    );
    let space = prop::sample::select(b" \t\x0b\x0c\r".to_vec());
    prop::collection::vec((field, space), 0..7).prop_map(|parts| {
        let mut line = Vec::new();
        for (field, space) in parts {
            line.extend_from_slice(&field);
            line.push(space);
        }
        line
    })
}

/// A verb, then fields: half the time a well-formed-looking IAMAT.
fn command_like() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        line_like(),
        (
            line_like(),
            0u32..91,
            0u32..181,
            any::<u64>(),
            0u32..1_000_000_000
        )
            .prop_map(|(client, lat, lng, secs, nanos)| {
                let client: Vec<u8> = client
                    .into_iter()
                    .filter(|&b| !protocol::is_space(b))
                    .collect();
                let client = if client.is_empty() {
                    b"c".to_vec()
                } else {
                    client
                };
                [
                    &b"IAMAT "[..],
                    &client,
                    format!(" +{lat}.5-{lng} {secs}.{nanos:09}").as_bytes(),
                ]
                .concat()
            }),
        any::<Vec<u8>>(),
    ]
}

proptest! {
    /// Any line: no panic; an IAMAT accepted becomes an AT record that peers accept, with the
    /// same client and time, and that can be stored.
    #[test]
    fn client_lines_parse_without_panic_and_at_records_round_trip(line in command_like(), now in any::<i64>()) {
        if let Command::Iamat(iamat) = protocol::parse_command(&line) {
            let mut at = Vec::new();
            protocol::write_at_line(&mut at, "Bailey", i128::from(now), &iamat);
            let record = protocol::parse_at_record(&at);
            prop_assert!(record.is_some(), "{}", at.escape_ascii());
            let record = record.unwrap();
            prop_assert_eq!(record.client, iamat.client);
            prop_assert_eq!(record.time_ns, iamat.time_ns);
            // Location fields are exactly in range: latitude within 90, longitude within 180.
            prop_assert!(protocol::parse_location(iamat.location).is_some());
        }
    }

    /// What peers send is checked without panic, whatever it is.
    #[test]
    fn peer_lines_parse_without_panic(line in prop_oneof![line_like(), any::<Vec<u8>>()]) {
        let _ = protocol::parse_at_record(&line);
        let _ = peer::parse_greeting(&line);
        let _ = peer::parse_challenge(&line);
        let _ = peer::parse_proof(&line);
        let _ = peer::parse_line(&line);
    }

    /// The handshake's lines are read back as written, and refused with a nonce or a proof that
    /// is not exactly its lower-case hex digits, a field too many, or another verb or version.
    #[test]
    fn handshake_lines_are_read_back_and_refused_when_damaged(
        name in "[A-Za-z][A-Za-z0-9]{0,11}",
        nonce in hex_digits(32),
        proof in hex_digits(64),
        bad_nonce in bad_hex(32),
        bad_proof in bad_hex(64),
        extra in "[a-z0-9]{1,8}",
    ) {
        let (n, p) = (nonce.as_bytes(), proof.as_bytes());
        let greeting = peer::greeting(&name, Some(n));
        prop_assert_eq!(
            peer::parse_greeting(&greeting),
            Some(Greeting { name: name.as_bytes(), nonce: Some(n) })
        );
        let bare = peer::greeting(&name, None);
        prop_assert_eq!(
            peer::parse_greeting(&bare),
            Some(Greeting { name: name.as_bytes(), nonce: None })
        );
        let challenge = format!("CHALLENGE {nonce}");
        prop_assert_eq!(peer::parse_challenge(challenge.as_bytes()), Some(n));
        let proof_line = format!("PROOF {proof}");
        prop_assert_eq!(peer::parse_proof(proof_line.as_bytes()), Some(p));
        let refused = [
            format!("PEER herd/1 {name} {bad_nonce}"),
            format!("PEER herd/1 {name} {nonce} {extra}"),
            format!("PEER herd/2 {name} {nonce}"),
            format!("PEERS herd/1 {name} {nonce}"),
            "PEER herd/1".to_owned(),
        ];
        for line in &refused {
            prop_assert_eq!(peer::parse_greeting(line.as_bytes()), None, "{}", line);
        }
        let refused = [
            format!("CHALLENGE {bad_nonce}"),
            format!("CHALLENGE {nonce} {proof}"),
            format!("CHALLENGE {nonce} {extra}"),
            "CHALLENGE".to_owned(),
            format!("PROOF {nonce}"),
        ];
        for line in &refused {
            prop_assert_eq!(peer::parse_challenge(line.as_bytes()), None, "{}", line);
        }
        let refused = [
            format!("PROOF {bad_proof}"),
            format!("PROOF {proof} {extra}"),
            "PROOF".to_owned(),
            format!("CHALLENGE {proof}"),
        ];
        for line in &refused {
            prop_assert_eq!(peer::parse_proof(line.as_bytes()), None, "{}", line);
        }
    }

    /// A link's lines (`PARTS`, `DIGEST`, `SYNC`, `PING`) are read back as written, and refused
    /// when a field is missing, added or out of its range: a `PARTS` line that does not start
    /// on a line's boundary or within the store's parts, or lacks or adds a digest, or holds one
    /// that is not 16 hex digits; a `DIGEST` of another scheme or without a count; a `SYNC`
    /// naming no part, or not 64 hex digits.
    #[test]
    fn link_lines_are_read_back_and_refused_when_damaged(
        line_no in 0usize..8,
        digests in prop::collection::vec(any::<u64>(), 32),
        off in 1usize..32,
        which in any::<prop::sample::Index>(),
        bad_digest in bad_hex(16),
        count in any::<u64>(),
        digest in any::<u64>(),
        words in any::<[u64; 4]>().prop_filter("a part at least", |w| w.iter().any(|&x| x != 0)),
        bad_set in bad_hex(64),
    ) {
        let first = line_no * 32;
        let parts = |first: &str, digests: &[String]| format!("PARTS {first} {}", digests.join(" "));
        let hex: Vec<String> = digests.iter().map(|d| format!("{d:016x}")).collect();
        let line = parts(&first.to_string(), &hex);
        let want: Box<[u64; 32]> = Box::new(digests.clone().try_into().unwrap());
        prop_assert_eq!(
            peer::parse_line(line.as_bytes()),
            Some(PeerLine::Parts { first, digests: want })
        );
        let mut short = hex.clone();
        short.pop();
        let mut long = hex.clone();
        long.push(hex[0].clone());
        let mut damaged = hex.clone();
        damaged[which.index(32)] = bad_digest;
        let refused = [
            parts(&(first + off).to_string(), &hex),
            parts(&(first + 256).to_string(), &hex),
            parts(&format!("0{first}"), &hex),
            parts(&first.to_string(), &short),
            parts(&first.to_string(), &long),
            parts(&first.to_string(), &damaged),
        ];
        for line in &refused {
            prop_assert_eq!(peer::parse_line(line.as_bytes()), None, "{}", line);
        }

        let line = format!("DIGEST {count} {digest:016x} {}", peer::DIGEST_SCHEME);
        prop_assert_eq!(peer::parse_line(line.as_bytes()), Some(PeerLine::Digest { count, digest }));
        let refused = [
            format!("DIGEST {count} {digest:016x} {}x", peer::DIGEST_SCHEME),
            format!("DIGEST {count} {digest:016x}"),
            format!("DIGEST {count}x {digest:016x} {}", peer::DIGEST_SCHEME),
            format!("DIGEST {digest:016x} {}", peer::DIGEST_SCHEME),
        ];
        for line in &refused {
            prop_assert_eq!(peer::parse_line(line.as_bytes()), None, "{}", line);
        }

        // Part 0 in the last word's lowest bit.
        let text = format!("{:016x}{:016x}{:016x}{:016x}", words[3], words[2], words[1], words[0]);
        let mut set = PartSet::default();
        for part in 0..=u8::MAX {
            if words[usize::from(part / 64)] & (1 << (part % 64)) != 0 {
                set.insert(part);
            }
        }
        let sync = format!("SYNC {text}");
        prop_assert_eq!(peer::parse_line(sync.as_bytes()), Some(PeerLine::Sync(Some(set))));
        prop_assert_eq!(peer::parse_line(b"SYNC"), Some(PeerLine::Sync(None)));
        prop_assert_eq!(peer::parse_line(b"PING"), Some(PeerLine::Ping));
        let refused = [
            format!("SYNC {}", "0".repeat(64)),
            format!("SYNC {bad_set}"),
            format!("SYNC {text} {text}"),
            format!("PING {count}"),
            format!("PONG {count}"),
        ];
        for line in &refused {
            prop_assert_eq!(peer::parse_line(line.as_bytes()), None, "{}", line);
        }
    }

    /// A neighbour's record is refused when any one of its fields is damaged, although the rest
    /// is a record's: the line is stored and sent on byte for byte, so nothing loose passes.
    #[test]
    fn at_records_with_a_damaged_field_are_refused(
        record in at_record_fields(),
        damage in 0usize..12,
    ) {
        let line = record.join(" ");
        prop_assert!(protocol::parse_at_record(line.as_bytes()).is_some(), "{}", line);
        let mut f = record.clone();
        let line = match damage {
            0 => format!("{line} extra"),
            1 => f[..5].join(" "),
            2 => line.replacen(' ', "  ", 1),
            3 => line.replacen(' ', "\t", 1),
            4 => {
                f[2] = f[2][1..].to_owned(); // the difference without its sign
                f.join(" ")
            }
            5 => {
                f[2].pop(); // eight decimals
                f.join(" ")
            }
            6 => {
                f[4] = "+90.000000001+0.0".to_owned();
                f.join(" ")
            }
            7 => {
                f[4] = "+0.0-180.5".to_owned();
                f.join(" ")
            }
            8 => {
                f[4] = f[4][1..].to_owned(); // the location without its first sign
                f.join(" ")
            }
            9 => {
                f[0] = "at".to_owned();
                f.join(" ")
            }
            10 => {
                f[5].push('x');
                f.join(" ")
            }
            _ => format!("{line} "),
        };
        prop_assert_eq!(protocol::parse_at_record(line.as_bytes()), None, "{}", line);
    }

    /// A client's command with one field out of its range, or a field too many or too few, is
    /// invalid (answered `? LINE`): a latitude past 90 or a longitude past 180 by any amount, a
    /// location or time that is not a number, a radius of 0 or past 50 km, a bound past 20.
    #[test]
    fn client_commands_out_of_range_are_invalid(
        over in 1u32..100_000,
        fraction in "[0-9]{0,6}[1-9]",
        ok_lat in 0u32..=90,
        ok_lng in 0u32..=180,
        bound in 21u32..1000,
        damage in 0usize..13,
    ) {
        let location = format!("+{ok_lat}-{ok_lng}");
        let line = match damage {
            0 => format!("IAMAT c +{}.5+0 1", 90 + over),
            1 => format!("IAMAT c -90.{fraction}+0 1"),
            2 => format!("IAMAT c +0+{}", 180 + over) + " 1",
            3 => format!("IAMAT c +0-180.{fraction} 1"),
            4 => format!("IAMAT c {ok_lat}-{ok_lng} 1"),
            5 => format!("IAMAT c {location} 1.{fraction}x"),
            6 => format!("IAMAT c {location} .{fraction}"),
            7 => format!("IAMAT c {location} 1 {over}"),
            8 => format!("IAMAT c {location}"),
            9 => format!("WHATSAT c 0.{} 1", "0".repeat(fraction.len())),
            10 => format!("WHATSAT c 50.{fraction} 1"),
            11 => format!("WHATSAT c 10 {bound}"),
            _ => format!("WHATSAT c {} 1", 50 + over),
        };
        prop_assert_eq!(protocol::parse_command(line.as_bytes()), Command::Invalid, "{}", line);
    }

    /// A sealed line opens to its payload, once; any change to it, or playing it twice, fails.
    #[test]
    fn sealed_peer_lines_open_once_and_never_altered(
        payload in prop::collection::vec(any::<u8>().prop_filter("no newline", |&b| b != b'\n'), 0..200),
        flip in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let secret = Secret::new(b"a herd secret for the tests");
        let (nd, na) = (peer::nonce().unwrap(), peer::nonce().unwrap());
        let mut dialler = Session::new(&secret, &nd, &na, true);
        let mut acceptor = Session::new(&secret, &nd, &na, false);
        let mut line = Vec::new();
        peer::frame(Some(&mut dialler), &payload, &mut line);
        line.pop();
        let mut altered = line.clone();
        let at = flip.index(altered.len());
        altered[at] ^= 1 << bit;
        let mut fresh = Session::new(&secret, &nd, &na, false);
        prop_assert!(fresh.open(&altered).is_err(), "an altered line opened");
        prop_assert_eq!(acceptor.open(&line), Ok(&payload[..]));
        prop_assert!(acceptor.open(&line).is_err(), "a replayed line opened");
    }

    /// Any bytes, cut anywhere: the HTTP reader ends in an answer or an error, never a panic,
    /// and never holds more than its cap.
    #[test]
    fn http_responses_of_any_bytes_never_panic(
        bytes in prop_oneof![any::<Vec<u8>>(), http_like()],
        cuts in prop::collection::vec(1usize..64, 1..16),
    ) {
        let mut reader = ResponseReader::new(4096);
        let mut rest = &bytes[..];
        let mut cuts = cuts.into_iter().cycle();
        while !rest.is_empty() {
            let n = cuts.next().unwrap_or(1).min(rest.len());
            match reader.push(&rest[..n]) {
                Ok(Some(response)) => prop_assert!(response.body.len() <= 4096),
                Ok(None) => {}
                Err(_) => break,
            }
            rest = &rest[n..];
        }
        let _ = reader.push_eof();
    }

    /// A body framed any of the three ways, delivered in any pieces, reads back the same.
    #[test]
    fn http_bodies_read_back_whatever_the_framing_and_the_pieces(
        body in prop::collection::vec(any::<u8>(), 0..3000),
        framing in 0u8..3,
        chunk in 1usize..700,
        cuts in prop::collection::vec(1usize..200, 1..8),
    ) {
        let raw = frame_http(&body, framing, chunk);
        let mut reader = ResponseReader::new(1 << 20);
        let mut got = None;
        let mut rest = &raw[..];
        let mut cuts = cuts.into_iter().cycle();
        while !rest.is_empty() && got.is_none() {
            let n = cuts.next().unwrap_or(1).min(rest.len());
            got = reader.push(&rest[..n]).unwrap();
            rest = &rest[n..];
        }
        let response = match got {
            Some(response) => response,
            None => reader.push_eof().unwrap(),
        };
        prop_assert_eq!(response.body, body);
    }

    /// Google's body cut to any bound: never a panic; what is kept is Google's own text.
    #[test]
    fn places_answers_keep_googles_bytes(bound in 0usize..25, mangle in any::<prop::sample::Index>()) {
        let raw = std::fs::read(fixture("legacy_ok_20.json")).unwrap();
        let answer = places::answer(Api::Legacy, Output::AsSent, &raw, bound).unwrap();
        let body = String::from_utf8(answer.body).unwrap();
        // Everything before the results array is untouched.
        let head = "\"results\" : [";
        let at = body.find(head).unwrap() + head.len();
        prop_assert!(raw.starts_with(&body.as_bytes()[..at]));
        prop_assert!(body.ends_with('}'), "the body ends with its closing brace");
        prop_assert_eq!(body.matches("\"place_id\"").count(), bound.min(20));
        // Damaged JSON is refused, not cut. A body cut anywhere short of its closing brace is
        // never JSON, and is always refused...
        let end = raw.iter().rposition(|&b| b == b'}').unwrap();
        let short = &raw[..mangle.index(end)];
        prop_assert!(places::answer(Api::Legacy, Output::AsSent, short, bound).is_err());
        // ...and a byte turned into a brace is answered exactly when the body is still JSON
        // (inside a string it may be).
        let mut damaged = raw.clone();
        let i = mangle.index(damaged.len());
        damaged[i] = b'{';
        let json = std::str::from_utf8(&damaged).is_ok()
            && serde_json::from_slice::<serde::de::IgnoredAny>(&damaged).is_ok();
        let answer = places::answer(Api::Legacy, Output::AsSent, &damaged, bound);
        prop_assert_eq!(answer.is_ok(), json);
    }
}

proptest! {
    /// Google's bodies, damaged at a few places or cut short: answered exactly when they are
    /// UTF-8 JSON by serde_json's own verdict, and what is answered is JSON again. (The
    /// exceptions `places::answer` documents, a lone surrogate escape in a top-level key or as
    /// the results value, or a number beyond an f64 as the results value, need bytes these
    /// edits do not make.)
    #[test]
    fn places_answers_exactly_the_bodies_that_are_json(
        which in 0usize..3,
        edits in prop::collection::vec((any::<prop::sample::Index>(), json_byte()), 0..4),
        cut in prop::option::of(any::<prop::sample::Index>()),
        bound in 0usize..25,
    ) {
        let (name, api) = [
            ("legacy_ok_20.json", Api::Legacy),
            ("new_ok_5.json", Api::New),
            ("legacy_zero_results.json", Api::Legacy),
        ][which];
        let mut raw = std::fs::read(fixture(name)).unwrap();
        for (at, byte) in edits {
            let at = at.index(raw.len());
            raw[at] = byte;
        }
        if let Some(cut) = cut {
            raw.truncate(cut.index(raw.len() + 1));
        }
        let json = std::str::from_utf8(&raw).is_ok()
            && serde_json::from_slice::<serde::de::IgnoredAny>(&raw).is_ok();
        let answer = places::answer(api, Output::AsSent, &raw, bound);
        prop_assert_eq!(answer.is_ok(), json, "{}", String::from_utf8_lossy(&raw));
        if let Ok(answer) = answer {
            prop_assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&answer.body).is_ok());
        }
    }
}

/// `n` lower-case hex digits.
fn hex_digits(n: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(b"0123456789abcdef".to_vec()), n)
        .prop_map(|digits| String::from_utf8(digits).unwrap())
}

/// A field that is not `n` lower-case hex digits, by construction: a digit short, a digit too
/// many, or one digit replaced by an upper-case one or a byte that is no digit.
fn bad_hex(n: usize) -> impl Strategy<Value = String> {
    (
        hex_digits(n + 1),
        0usize..3,
        any::<prop::sample::Index>(),
        prop::sample::select(b"ABCDEFgGxz+-./_".to_vec()),
    )
        .prop_map(move |(digits, how, at, byte)| match how {
            0 => digits[..n - 1].to_owned(),
            1 => digits,
            _ => {
                let mut d = digits.into_bytes();
                d.truncate(n);
                d[at.index(n)] = byte;
                String::from_utf8(d).unwrap()
            }
        })
}

/// The six fields of a well-formed record, as a server writes one: `AT`, a server's name, a
/// signed difference with nine decimals, a client id, a location in range, a client time.
fn at_record_fields() -> impl Strategy<Value = Vec<String>> {
    (
        "[A-Za-z]{1,10}",
        prop::sample::select(vec!['+', '-']),
        0u64..1_000_000,
        0u32..1_000_000_000,
        "[!-~]{1,20}",
        (
            0u32..=89,
            0u32..=179,
            "[0-9]{0,6}",
            prop::sample::select(vec!["+-", "-+", "++", "--"]),
        ),
        (0u64..10_000_000_000, "[0-9]{0,12}"),
    )
        .prop_map(
            |(server, sign, secs, nanos, client, (lat, lng, frac, signs), (time, tfrac))| {
                let dot = |f: &str| {
                    if f.is_empty() {
                        String::new()
                    } else {
                        format!(".{f}")
                    }
                };
                let s: Vec<char> = signs.chars().collect();
                vec![
                    "AT".to_owned(),
                    server,
                    format!("{sign}{secs}.{nanos:09}"),
                    client,
                    format!("{}{lat}{}{}{lng}{}", s[0], dot(&frac), s[1], dot(&frac)),
                    format!("{time}{}", dot(&tfrac)),
                ]
            },
        )
}

/// Bytes that matter to JSON's grammar more often than not, and any byte now and then.
fn json_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => prop::sample::select(b"{}[]\",:0123456789-+.eE \n\t\\/truefalsn".to_vec()),
        1 => any::<u8>(),
    ]
}

fn http_like() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![
            &b"HTTP/1.1 200 OK\r\n"[..],
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n",
            b"HTTP/1.0 403 Forbidden\r\n",
        ]),
        prop::sample::select(vec![
            &b"Content-Length: 5\r\n"[..],
            b"Content-Length: 99999999999999999999\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Connection: close\r\n",
            b"",
        ]),
        any::<Vec<u8>>(),
    )
        .prop_map(|(status, header, rest)| [status, header, b"\r\n", &rest].concat())
}

/// `body` as an HTTP/1.1 response: 0 Content-Length, 1 chunked (chunks of `chunk`), 2 to close.
fn frame_http(body: &[u8], framing: u8, chunk: usize) -> Vec<u8> {
    let mut raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n".to_vec();
    match framing {
        0 => {
            raw.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            raw.extend_from_slice(body);
        }
        1 => {
            raw.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            for piece in body.chunks(chunk) {
                raw.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                raw.extend_from_slice(piece);
                raw.extend_from_slice(b"\r\n");
            }
            raw.extend_from_slice(b"0\r\n\r\n");
        }
        _ => {
            raw.extend_from_slice(b"Connection: close\r\n\r\n");
            raw.extend_from_slice(body);
        }
    }
    raw
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/places")
        .join(name)
}
