//! Property tests: the parsers that read what clients, peers and Google send, fed arbitrary
//! and adversarial bytes. They must never panic, never accept what they should refuse, and
//! agree with their own writers (what is written is read back the same).
//!
//! proptest keeps every failing case it finds under `proptest-regressions/` and replays it first
//! on every run: that is the corpus. CI runs the default 256 cases per property; a longer hunt
//! is `PROPTEST_CASES=100000 cargo test --release --test properties`.

use herd::peer::{self, Secret, Session};
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
        // Damaged JSON is refused, not cut: a byte turned into a brace breaks the structure.
        let mut damaged = raw.clone();
        let i = mangle.index(damaged.len());
        damaged[i] = b'{';
        if let Ok(answer) = places::answer(Api::Legacy, Output::AsSent, &damaged, bound) {
            prop_assert!(serde_json::from_slice::<serde_json::Value>(&damaged).is_ok());
            let _ = answer;
        }
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
