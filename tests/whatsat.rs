//! WHATSAT end to end, over real sockets: a client talks to one `herd serve Bailey`, which
//! talks HTTPS to a fake Google Places (`common::fake_places`) whose answers each test picks.
//!
//! Every reply is checked byte for byte: the stored AT line, `\n`, the body, `\n\n`. The
//! expected bodies of cut results come from `tests/data/` (made by `make_expected.py` with the
//! fixture generator's own writers, not by the herd's code).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::fake_places::{Behaviour, FakePlaces, Framing, Request, LEGACY_PATH, NEW_PATH};
use common::herds::{await_log_line, conn_id, log_stamp, lone_bailey, Env, Herd};
use common::load::PROMPT;
use common::*;
use herd::config::DEFAULT_FIELD_MASK;

/// The Places API key the server gets from its environment; it must never come back out.
const KEY: &str = "test-key-5ecret";
const WITH_KEY: Env = &[("GOOGLE_PLACES_API_KEY", KEY)];
const KIWI: &str = "kiwi.cs.ucla.edu";
/// The legacy request for kiwi with radius 10 km.
const LEGACY_TARGET: &str =
    "/maps/api/place/nearbysearch/json?location=34.068930,-118.445127&radius=10000&key=test-key-5ecret";
const UNKNOWN_ERROR_PREFIX: &[u8] =
    br#"{"html_attributions" : [], "results" : [], "status" : "UNKNOWN_ERROR", "error_message" : ""#;
const UNKNOWN_ERROR_SUFFIX: &[u8] = b"\"}\n\n";

/// `tests/data/<name>`: an expected body.
fn expected(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Asserts `got == want`; on a difference, shows the first differing offset and the exact
/// bytes around it on both sides (a whole 36 kB body would drown the message).
fn assert_bytes_eq(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let from = at.saturating_sub(120);
    let window = |b: &[u8]| show(&b[from.min(b.len())..(at + 200).min(b.len())]);
    panic!(
        "{what}: replies differ at byte {at} (got {} bytes, want {} bytes)\n\
         got  [{from}..]: {}\nwant [{from}..]: {}",
        got.len(),
        want.len(),
        window(got),
        window(want)
    );
}

/// One server "Bailey" that answers WHATSAT through a fake Places, with kiwi's location
/// already reported to it. It remembers every reply so that the test can check that the API
/// key never appears in one.
struct Bailey {
    herd: Herd,
    /// The AT line of kiwi's IAMAT, with its `\n`.
    at_line: Vec<u8>,
    replies: Vec<Vec<u8>>,
}

impl Bailey {
    /// `api` is "legacy" or "new".
    fn start(fake: &FakePlaces, api: &str, timeout_ms: u64) -> Bailey {
        Bailey::start_with(&fake.places_toml(api, timeout_ms))
    }

    /// With `places`, the whole `[places]` table.
    fn start_with(places: &str) -> Bailey {
        let herd = Herd::build("whatsat")
            .env(WITH_KEY)
            .extra(places)
            .start(lone_bailey());
        let at_line = format!("{}\n", iamat_at(herd.get("Bailey"), KIWI)).into_bytes();
        Bailey {
            herd,
            at_line,
            replies: Vec::new(),
        }
    }

    fn server(&self) -> &ServerProc {
        self.herd.get("Bailey")
    }

    fn addr(&self) -> SocketAddr {
        self.server().addr
    }

    /// Sends `WHATSAT kiwi RADIUS BOUND` on a new connection and returns the reply.
    fn whatsat(&mut self, radius: &str, bound: u32) -> Vec<u8> {
        let mut client = Client::connect(self.addr());
        client.send(format!("WHATSAT {KIWI} {radius} {bound}\n").as_bytes());
        let reply = client.read_whatsat_reply();
        self.replies.push(reply.clone());
        reply
    }

    /// The reply that carries `body`.
    fn reply_with(&self, body: &[u8]) -> Vec<u8> {
        [&self.at_line[..], body, b"\n\n"].concat()
    }

    /// Asserts that WHATSAT kiwi 10 BOUND is answered with exactly `body`.
    fn expect_body(&mut self, what: &str, bound: u32, body: &[u8]) {
        let reply = self.whatsat("10", bound);
        let want = self.reply_with(body);
        assert_bytes_eq(&format!("{what}, bound {bound}"), &reply, &want);
    }

    /// Asserts that WHATSAT kiwi 10 BOUND is answered with an UNKNOWN_ERROR body.
    fn expect_unknown_error(&mut self, what: &str, bound: u32) {
        let reply = self.whatsat("10", bound);
        assert_unknown_error(what, &reply, &self.at_line);
    }

    /// The key is in no reply and not in the log.
    fn assert_key_absent(&self) {
        for reply in &self.replies {
            assert!(
                !contains(reply, KEY.as_bytes()),
                "a reply contains the API key: {}",
                show(reply)
            );
        }
        let log = self.server().log_bytes();
        if let Some(at) = find(&log, KEY.as_bytes()) {
            let from = at.saturating_sub(200);
            panic!(
                "the log {} contains the API key: {}",
                self.server().log_path.display(),
                show(&log[from..(at + 100).min(log.len())])
            );
        }
    }
}

fn assert_at_line(line: &[u8], client: &str, time: &str) {
    let tail = format!(" {client} {LOCATION} {time}\n");
    assert!(
        line.starts_with(b"AT Bailey ") && line.ends_with(tail.as_bytes()),
        "IAMAT {client} {LOCATION} {time} was answered {}",
        show(line)
    );
}

/// `reply` is `AT line`, then `{"html_attributions" : [], "results" : [], "status" :
/// "UNKNOWN_ERROR", "error_message" : "..."}`, then `\n\n`; the body is JSON, the message a
/// single line without the key.
fn assert_unknown_error(what: &str, reply: &[u8], at_line: &[u8]) {
    let prefix = [at_line, UNKNOWN_ERROR_PREFIX].concat();
    assert!(
        reply.starts_with(&prefix)
            && reply.ends_with(UNKNOWN_ERROR_SUFFIX)
            && reply.len() >= prefix.len() + UNKNOWN_ERROR_SUFFIX.len(),
        "{what}: want {}<message>{}, got {}",
        show(&prefix),
        show(UNKNOWN_ERROR_SUFFIX),
        show(reply)
    );
    let body = &reply[at_line.len()..reply.len() - 2];
    assert!(
        !body.contains(&b'\n'),
        "{what}: a body of two lines: {}",
        show(reply)
    );
    let json: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{what}: the body is not JSON ({e}): {}", show(body)));
    assert_eq!(json["status"], "UNKNOWN_ERROR", "{what}: {}", show(body));
    let message = json["error_message"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: error_message is not a string: {}", show(body)));
    assert!(
        !message.contains(KEY),
        "{what}: the error message contains the API key: {message:?}"
    );
}

fn legacy_ok() -> Vec<u8> {
    fixture("legacy_ok_20.json")
}

fn assert_legacy_request(request: &Request) {
    assert_eq!(request.method, "GET", "{}", request.describe());
    assert_eq!(request.target, LEGACY_TARGET, "{}", request.describe());
    assert!(
        request.header("accept-encoding").is_none(),
        "the request has an Accept-Encoding header: {}",
        request.describe()
    );
    assert!(
        request.header("host").is_some(),
        "an HTTP/1.1 request without Host: {}",
        request.describe()
    );
}

#[test]
fn legacy_results_are_cut_to_the_bound_byte_for_byte() {
    let fake = FakePlaces::start(Behaviour::ok(legacy_ok()));
    let mut bailey = Bailey::start(&fake, "legacy", 2000);
    for bound in [1, 5, 20, 0] {
        let body = expected(&format!("legacy_cut_{bound}.json"));
        bailey.expect_body("legacy_ok_20.json, Content-Length", bound, &body);
    }
    let requests = fake.requests();
    assert_eq!(
        requests.len(),
        4,
        "one Places request per WHATSAT: {:#?}",
        requests.iter().map(Request::describe).collect::<Vec<_>>()
    );
    for request in &requests {
        assert_legacy_request(request);
    }
    bailey.assert_key_absent();
}

#[test]
fn radius_is_sent_in_metres_without_plus_signs() {
    let fake = FakePlaces::start(Behaviour::ok(legacy_ok()));
    let mut bailey = Bailey::start(&fake, "legacy", 2000);
    for (radius, metres) in [
        ("10", "10000"),
        ("2.5", "2500"),
        ("50", "50000"),
        ("0.5", "500"),
    ] {
        let reply = bailey.whatsat(radius, 1);
        assert_bytes_eq(
            &format!("radius {radius}"),
            &reply,
            &bailey.reply_with(&expected("legacy_cut_1.json")),
        );
        let request = fake.requests().pop().expect("a request was made");
        assert_eq!(
            request.target,
            format!("{LEGACY_PATH}?location=34.068930,-118.445127&radius={metres}&key={KEY}"),
            "WHATSAT {KIWI} {radius} 1: {}",
            request.describe()
        );
    }
    bailey.assert_key_absent();
}

#[test]
fn every_framing_gives_the_same_reply() {
    let fake = FakePlaces::start(Behaviour::ok(legacy_ok()));
    let mut bailey = Bailey::start(&fake, "legacy", 2000);
    let framings: Vec<(&str, Behaviour)> = vec![
        ("Content-Length", Behaviour::ok(legacy_ok())),
        (
            "legacy_ok_20.chunked.http",
            Behaviour::Raw(fixture("legacy_ok_20.chunked.http")),
        ),
        (
            "tiny chunks",
            Behaviour::framed(
                legacy_ok(),
                Framing::Chunked(vec![1, 2, 3, 5, 8, 13, 64, 7]),
            ),
        ),
        // Read to the end of the stream; the herd needs a new connection afterwards.
        (
            "Connection: close",
            Behaviour::framed(legacy_ok(), Framing::Close),
        ),
        (
            "three chunks",
            Behaviour::framed(legacy_ok(), Framing::Chunked(Vec::new())),
        ),
        (
            "Connection: close, again",
            Behaviour::framed(legacy_ok(), Framing::Close),
        ),
        ("Content-Length after close", Behaviour::ok(legacy_ok())),
    ];
    for (what, behaviour) in framings {
        fake.set(behaviour);
        for bound in [20, 5] {
            let body = expected(&format!("legacy_cut_{bound}.json"));
            bailey.expect_body(what, bound, &body);
        }
    }
    for request in fake.requests() {
        assert_legacy_request(&request);
    }
    bailey.assert_key_absent();
}

/// A body read to the end of the stream ends only with TLS's close_notify: a TCP close without
/// it could come from anyone on the path, cutting the body short, so the answer is
/// UNKNOWN_ERROR, never the body as far as it came (docs/protocol.md section 4). Whole bodies
/// are then answered again on a new connection.
#[test]
fn a_body_read_to_a_close_without_close_notify_is_not_taken() {
    let fake = FakePlaces::start(Behaviour::framed(legacy_ok(), Framing::CloseCut));
    let mut bailey = Bailey::start(&fake, "legacy", 2000);
    bailey.expect_unknown_error("Connection: close, TCP closed without close_notify", 5);
    fake.set(Behaviour::framed(legacy_ok(), Framing::Close));
    let body = expected("legacy_cut_5.json");
    bailey.expect_body("Connection: close, then close_notify", 5, &body);
    let log = String::from_utf8_lossy(&bailey.server().log_bytes()).into_owned();
    assert!(
        log.contains("without TLS close_notify"),
        "the log does not say why the first answer was refused:\n{log}"
    );
    bailey.assert_key_absent();
}

#[test]
fn runs_of_newlines_are_collapsed_and_trailing_ones_removed() {
    // Every newline of Google's body doubled, and more at the end: the reply must be the same
    // as for the plain body.
    let mut doubled = Vec::new();
    for &b in &legacy_ok() {
        doubled.push(b);
        if b == b'\n' {
            doubled.push(b'\n');
        }
    }
    doubled.extend_from_slice(b"\n\n\n");
    let fake = FakePlaces::start(Behaviour::ok(doubled));
    let mut bailey = Bailey::start(&fake, "legacy", 2000);
    for bound in [20, 5, 1] {
        let body = expected(&format!("legacy_cut_{bound}.json"));
        bailey.expect_body("legacy_ok_20.json with doubled newlines", bound, &body);
    }
    let body = b"{\n\n\n   \"html_attributions\" : [],\n\n   \"results\" : [],\n   \"status\" : \"ZERO_RESULTS\"\n}\n\n\n\n";
    fake.set(Behaviour::ok(&body[..]));
    bailey.expect_body(
        "ZERO_RESULTS with blank lines",
        5,
        b"{\n   \"html_attributions\" : [],\n   \"results\" : [],\n   \"status\" : \"ZERO_RESULTS\"\n}",
    );
    bailey.assert_key_absent();
}

#[test]
fn google_error_bodies_are_relayed() {
    let fake = FakePlaces::start(Behaviour::ok(legacy_ok()));
    let mut bailey = Bailey::start(&fake, "legacy", 2000);
    let denied = fixture("legacy_request_denied.json");
    let cases: Vec<(&str, Behaviour, Vec<u8>)> = vec![
        (
            "legacy_request_denied.json, HTTP 200",
            Behaviour::ok(denied.clone()),
            denied.clone(),
        ),
        (
            "legacy_over_query_limit.json, HTTP 200",
            Behaviour::ok(fixture("legacy_over_query_limit.json")),
            fixture("legacy_over_query_limit.json"),
        ),
        (
            "legacy_zero_results.json, HTTP 200",
            Behaviour::ok(fixture("legacy_zero_results.json")),
            fixture("legacy_zero_results.json"),
        ),
        (
            "legacy_unknown_error.json, HTTP 200",
            Behaviour::ok(fixture("legacy_unknown_error.json")),
            fixture("legacy_unknown_error.json"),
        ),
        (
            "legacy_request_denied.content-length.http",
            Behaviour::Raw(fixture("legacy_request_denied.content-length.http")),
            denied.clone(),
        ),
        (
            "legacy_request_denied_legacy_not_enabled.json, HTTP 403",
            Behaviour::status(
                403,
                fixture("legacy_request_denied_legacy_not_enabled.json"),
            ),
            fixture("legacy_request_denied_legacy_not_enabled.json"),
        ),
        (
            "legacy_invalid_request.json, HTTP 400",
            Behaviour::status(400, fixture("legacy_invalid_request.json")),
            fixture("legacy_invalid_request.json"),
        ),
        (
            "legacy_request_denied.json, HTTP 403, chunked",
            Behaviour::Fixture {
                body: denied.clone(),
                framing: Framing::Chunked(vec![10]),
                http_status: 403,
                delay: Duration::ZERO,
            },
            denied,
        ),
    ];
    for (what, behaviour, body) in cases {
        fake.set(behaviour);
        for bound in [5, 0] {
            bailey.expect_body(what, bound, &newline_rules(&body));
        }
    }
    bailey.assert_key_absent();
}

/// Checks a Places API (New) request for WHATSAT kiwi 10 BOUND.
fn assert_new_request(request: &Request, bound: u64) {
    let what = request.describe();
    assert_eq!(request.method, "POST", "{what}");
    assert_eq!(request.target, NEW_PATH, "{what}");
    assert_eq!(
        request.header("x-goog-api-key"),
        Some(KEY.as_bytes()),
        "{what}"
    );
    assert_eq!(
        request.header("x-goog-fieldmask").map(show).as_deref(),
        Some(DEFAULT_FIELD_MASK),
        "not the default X-Goog-FieldMask: {what}"
    );
    assert!(
        request.header("accept-encoding").is_none(),
        "the request has an Accept-Encoding header: {what}"
    );
    let body: serde_json::Value = serde_json::from_slice(&request.body)
        .unwrap_or_else(|e| panic!("the request body is not JSON ({e}): {what}"));
    let circle = &body["locationRestriction"]["circle"];
    assert_eq!(
        circle["center"]["latitude"].as_f64(),
        Some(34.06893),
        "{what}"
    );
    assert_eq!(
        circle["center"]["longitude"].as_f64(),
        Some(-118.445127),
        "{what}"
    );
    assert_eq!(circle["radius"].as_f64(), Some(10000.0), "{what}");
    assert_eq!(
        body["maxResultCount"].as_f64(),
        Some(bound.max(1) as f64),
        "{what}"
    );
}

#[test]
fn new_api_posts_search_nearby_and_cuts_places() {
    let fake = FakePlaces::start(Behaviour::Raw(fixture("new_ok_5.chunked.http")));
    let mut bailey = Bailey::start(&fake, "new", 2000);
    for bound in [1, 3, 5, 0] {
        let body = expected(&format!("new_cut_{bound}.json"));
        bailey.expect_body("new_ok_5.chunked.http", bound, &body);
        let request = fake.requests().pop().expect("a request was made");
        assert_new_request(&request, u64::from(bound));
    }
    fake.set(Behaviour::ok(fixture("new_ok_5.json")));
    for bound in [3, 20] {
        let body = expected(&format!("new_cut_{}.json", bound.min(5)));
        bailey.expect_body("new_ok_5.json, Content-Length", bound, &body);
        let request = fake.requests().pop().expect("a request was made");
        assert_new_request(&request, u64::from(bound));
    }
    assert_eq!(fake.requests().len(), 6, "one Places request per WHATSAT");
    bailey.assert_key_absent();
}

/// `places.field_mask`: the configured mask is the `X-Goog-FieldMask` of every request, as
/// configured (Google bills by the fields asked for).
#[test]
fn the_configured_field_mask_reaches_google() {
    const MASK: &str = "places.id,places.location,places.rating";
    let fake = FakePlaces::start(Behaviour::Raw(fixture("new_ok_5.chunked.http")));
    let places = fake.places_toml("new", 2000) + &format!("field_mask = {MASK:?}\n");
    let mut bailey = Bailey::start_with(&places);
    bailey.expect_body("new_ok_5.chunked.http", 3, &expected("new_cut_3.json"));
    bailey.expect_body("new_ok_5.chunked.http", 1, &expected("new_cut_1.json"));
    let requests = fake.requests();
    assert_eq!(requests.len(), 2, "one Places request per WHATSAT");
    for request in &requests {
        let mask = request.header("x-goog-fieldmask").map(show);
        assert_eq!(mask.as_deref(), Some(MASK), "{}", request.describe());
    }
    bailey.assert_key_absent();
}

/// `output = "legacy"`: the New API's answer reaches the client in the legacy layout, laid out
/// as the fixtures' own generator lays it out (tests/data/make_new_as_legacy.py).
#[test]
fn new_api_answers_can_be_relayed_as_legacy_bodies() {
    let fake = FakePlaces::start(Behaviour::Raw(fixture("new_ok_5.chunked.http")));
    let places = fake.places_toml("new", 2000) + "output = \"legacy\"\n";
    let mut bailey = Bailey::start_with(&places);
    for bound in [1, 3, 5, 0] {
        let body = newline_rules(&expected(&format!("new_as_legacy_{bound}.json")));
        bailey.expect_body("new_ok_5.chunked.http as legacy", bound, &body);
        let request = fake.requests().pop().expect("a request was made");
        assert_new_request(&request, u64::from(bound));
    }
    fake.set(Behaviour::status(403, fixture("new_error_403.json")));
    let body = newline_rules(&expected("new_as_legacy_error_403.json"));
    bailey.expect_body("new_error_403.json as legacy", 5, &body);
    bailey.assert_key_absent();
}

#[test]
fn new_api_error_is_relayed() {
    let fake = FakePlaces::start(Behaviour::status(403, fixture("new_error_403.json")));
    let mut bailey = Bailey::start(&fake, "new", 2000);
    let body = newline_rules(&fixture("new_error_403.json"));
    for bound in [5, 0] {
        bailey.expect_body("new_error_403.json, HTTP 403", bound, &body);
    }
    for request in fake.requests() {
        assert_eq!(request.target, NEW_PATH, "{}", request.describe());
    }
    bailey.assert_key_absent();
}

#[test]
fn stalled_places_gives_unknown_error_and_the_loop_keeps_going() {
    let fake = FakePlaces::start(Behaviour::Stall);
    let mut bailey = Bailey::start(&fake, "legacy", 1000);
    let mut waiting = Client::connect(bailey.addr());
    waiting.send(format!("WHATSAT {KIWI} 10 5\n").as_bytes());
    assert!(
        eventually(Duration::from_secs(10), || !fake.requests().is_empty()),
        "the herd never asked Places"
    );
    // While that WHATSAT waits on Places, another client is served.
    iamat_at(bailey.server(), "lime.cs.ucla.edu");
    let reply = waiting.read_whatsat_reply();
    bailey.replies.push(reply.clone());
    assert_unknown_error("Places never answers", &reply, &bailey.at_line);
    // The stalled connection is not reused: the next WHATSAT is answered by Places.
    fake.set(Behaviour::ok(legacy_ok()));
    bailey.expect_body("after a timeout", 5, &expected("legacy_cut_5.json"));
    bailey.assert_key_absent();
}

#[test]
fn dropped_places_connection_gives_unknown_error() {
    let fake = FakePlaces::start(Behaviour::Drop);
    let mut bailey = Bailey::start(&fake, "legacy", 2000);
    bailey.expect_unknown_error("Places closes without a response", 5);
    let requests = fake.requests();
    assert!(
        (1..=2).contains(&requests.len()),
        "one request, and at most one retry: {:#?}",
        requests.iter().map(Request::describe).collect::<Vec<_>>()
    );
    fake.set(Behaviour::ok(legacy_ok()));
    bailey.expect_body(
        "after a dropped connection",
        5,
        &expected("legacy_cut_5.json"),
    );
    bailey.assert_key_absent();
}

#[test]
fn untrusted_certificate_gives_unknown_error() {
    let fake = FakePlaces::start_untrusted(Behaviour::ok(legacy_ok()));
    let mut bailey = Bailey::start(&fake, "legacy", 2000);
    bailey.expect_unknown_error("a certificate from an unknown CA", 5);
    assert_eq!(fake.handshakes(), 0, "a TLS handshake succeeded");
    assert!(fake.requests().is_empty(), "a request was sent");
    bailey.assert_key_absent();
}

#[test]
fn a_body_that_is_not_json_gives_unknown_error() {
    let fake = FakePlaces::start(Behaviour::ok(legacy_ok()));
    let mut bailey = Bailey::start(&fake, "legacy", 2000);
    let truncated = legacy_ok()[..1000].to_vec();
    let cases: Vec<(&str, Behaviour)> = vec![
        ("plain text", Behaviour::ok("this is not JSON\n")),
        (
            "an HTML error page, HTTP 502",
            Behaviour::status(
                502,
                "<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n<body>Bad Gateway</body></html>\n",
            ),
        ),
        ("truncated JSON", Behaviour::ok(truncated)),
        ("an empty body", Behaviour::ok("")),
    ];
    for (what, behaviour) in cases {
        fake.set(behaviour);
        bailey.expect_unknown_error(what, 5);
    }
    bailey.assert_key_absent();
}

#[test]
fn replies_keep_the_order_of_commands() {
    let fake = FakePlaces::start(Behaviour::ok(legacy_ok()).delayed(Duration::from_millis(300)));
    let bailey = Bailey::start(&fake, "legacy", 2000);
    let time = now_secs_string();
    let mut client = Client::connect(bailey.addr());
    // One write: the IAMAT could be answered at once, but its reply must wait for the
    // WHATSAT's.
    client.send(
        format!("WHATSAT {KIWI} 10 1\nIAMAT lime.cs.ucla.edu {LOCATION} {time}\n").as_bytes(),
    );
    let want = bailey.reply_with(&expected("legacy_cut_1.json"));
    let first = client.read_n(want.len());
    assert_bytes_eq("the WHATSAT reply, first", &first, &want);
    let second = client.read_line();
    assert_at_line(&second, "lime.cs.ucla.edu", &time);
    client.half_close();
    let rest = client.read_to_end();
    assert!(
        rest.is_empty(),
        "more after the two replies: {}",
        show(&rest)
    );
}

#[test]
fn places_connections_are_kept_alive_and_reused() {
    let fake = FakePlaces::start(Behaviour::ok(legacy_ok()));
    let bailey = Bailey::start(&fake, "legacy", 5000);
    let bounds = [1u32, 5, 20, 0, 5];
    let want: Vec<Vec<u8>> = bounds
        .iter()
        .map(|b| bailey.reply_with(&expected(&format!("legacy_cut_{b}.json"))))
        .collect();
    let commands: String = bounds
        .iter()
        .map(|b| format!("WHATSAT {KIWI} 10 {b}\n"))
        .collect();
    let addr = bailey.addr();
    let replies: Vec<Vec<u8>> = thread::scope(|scope| {
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let commands = commands.as_bytes();
                scope.spawn(move || {
                    let mut client = Client::connect(addr);
                    client.send(commands);
                    let replies: Vec<Vec<u8>> =
                        (0..5).map(|_| client.read_whatsat_reply()).collect();
                    client.half_close();
                    let rest = client.read_to_end();
                    assert!(rest.is_empty(), "more after five replies: {}", show(&rest));
                    replies
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().expect("a client thread panicked"))
            .collect()
    });
    assert_eq!(replies.len(), 40);
    for (i, reply) in replies.iter().enumerate() {
        assert_bytes_eq(
            &format!("client {} WHATSAT {}", i / 5, i % 5),
            reply,
            &want[i % 5],
        );
        assert!(!contains(reply, KEY.as_bytes()), "a reply contains the key");
    }
    assert_eq!(fake.requests().len(), 40, "one Places request per WHATSAT");
    assert!(
        fake.connections() <= 4,
        "{} connections to Places for pool_size 4",
        fake.connections()
    );
    assert!(
        fake.handshakes() <= 4,
        "{} TLS handshakes ({} TCP connections) for 40 requests: the pool (pool_size 4) \
         does not keep connections alive",
        fake.handshakes(),
        fake.connections()
    );
    bailey.assert_key_absent();
}

#[test]
fn the_api_key_never_appears_in_a_reply_or_the_log() {
    let fake = FakePlaces::start(Behaviour::ok(legacy_ok()));
    let mut bailey = Bailey::start(&fake, "legacy", 2000);
    bailey.expect_body("OK", 5, &expected("legacy_cut_5.json"));
    fake.set(Behaviour::status(
        403,
        fixture("legacy_request_denied.json"),
    ));
    bailey.expect_body(
        "REQUEST_DENIED",
        5,
        &newline_rules(&fixture("legacy_request_denied.json")),
    );
    fake.set(Behaviour::Drop);
    bailey.expect_unknown_error("dropped", 5);
    fake.set(Behaviour::ok("<html>not json</html>"));
    bailey.expect_unknown_error("not JSON", 5);
    fake.set(Behaviour::Stall);
    bailey.expect_unknown_error("stalled", 5);

    let new_fake = FakePlaces::start(Behaviour::Raw(fixture("new_ok_5.chunked.http")));
    let mut new_bailey = Bailey::start(&new_fake, "new", 2000);
    new_bailey.expect_body("new OK", 3, &expected("new_cut_3.json"));
    new_fake.set(Behaviour::status(403, fixture("new_error_403.json")));
    new_bailey.expect_body("new 403", 3, &newline_rules(&fixture("new_error_403.json")));
    new_fake.set(Behaviour::Drop);
    new_bailey.expect_unknown_error("new, dropped", 3);

    // SIGTERM flushes the logs: then they are complete.
    for b in [&mut bailey, &mut new_bailey] {
        let server = b.herd.get_mut("Bailey");
        let status = server.terminate();
        assert!(
            status.success(),
            "SIGTERM: {} exited with {status}",
            server.name
        );
        assert_log_ends_stopped(server);
    }
    let log = bailey.server().log();
    assert!(
        log.contains("location=34.068930,-118.445127&radius=10000"),
        "the log does not record the Places requests:\n{log}"
    );
    bailey.assert_key_absent();
    new_bailey.assert_key_absent();
}

// ---------------------------------------------------------------------------------------------
// Limits

/// A JSON body in Google's legacy shape, on one line, of exactly `size` bytes.
fn body_of_size(size: usize) -> Vec<u8> {
    let head =
        br#"{"html_attributions" : [], "results" : [], "status" : "ZERO_RESULTS", "padding" : ""#;
    let tail = br#""}"#;
    let pad = size - head.len() - tail.len();
    [&head[..], &vec![b'x'; pad], tail].concat()
}

/// `places.max_body_bytes`, here 10,000: a body of that size is relayed, one byte more is
/// abandoned and answered `UNKNOWN_ERROR`, however it is framed.
#[test]
fn a_places_body_over_max_body_bytes_is_refused_and_one_at_it_relayed() {
    const MAX: usize = 10_000;
    let fake = FakePlaces::start(Behaviour::ok(body_of_size(MAX)));
    let places = fake.places_toml("legacy", 2000) + &format!("max_body_bytes = {MAX}\n");
    let mut bailey = Bailey::start_with(&places);
    let framings = [
        ("Content-Length", Framing::ContentLength),
        ("chunked", Framing::Chunked(vec![999])),
        ("to the end of the stream", Framing::Close),
    ];
    for (name, framing) in framings {
        fake.set(Behaviour::framed(body_of_size(MAX), framing.clone()));
        bailey.expect_body(&format!("{MAX} bytes, {name}"), 20, &body_of_size(MAX));
        fake.set(Behaviour::framed(body_of_size(MAX + 1), framing));
        bailey.expect_unknown_error(&format!("{} bytes, {name}", MAX + 1), 20);
    }
    // The log is written at the end of the turn that sent the reply: it may come just after.
    let why = format!("Places sent a body larger than {MAX} bytes");
    let logged = eventually(Duration::from_secs(5), || {
        bailey.server().log().matches(&why).count() == 3
    });
    assert!(
        logged,
        "{why:?} is not in the log 3 times:\n{}",
        bailey.server().log()
    );
    bailey.assert_key_absent();
}

/// `limits.pending_replies`, here 2: with two WHATSATs of a client waiting on Places, none of
/// its later commands runs until one is answered. A third WHATSAT reaches Places only then
/// (not with the first two, though the pool has room), an IAMAT behind it is not run meanwhile,
/// and every reply still comes, in command order.
#[test]
fn past_pending_replies_no_command_of_the_client_runs_until_one_is_answered() {
    const DELAY: Duration = Duration::from_millis(1000);
    let fake = FakePlaces::start(Behaviour::ok(legacy_ok()).delayed(DELAY));
    let config = fake.places_toml("legacy", 5000) + "\n[limits]\npending_replies = 2\n";
    let bailey = Bailey::start_with(&config);
    let time = now_secs_string();
    let mut c = Client::connect(bailey.addr());
    let sent = Instant::now();
    c.send(
        format!(
            "WHATSAT {KIWI} 10 1\nWHATSAT {KIWI} 10 5\nWHATSAT {KIWI} 10 20\n\
             IAMAT held.cs.ucla.edu {LOCATION} {time}\n"
        )
        .as_bytes(),
    );
    // While the first two wait on Places: two requests, and the IAMAT not run.
    let two = eventually(DELAY / 2, || fake.requests().len() >= 2);
    thread::sleep(DELAY / 4);
    let requested = fake.requests().len();
    let other = exchange(bailey.addr(), b"WHATSAT held.cs.ucla.edu 10 1\n");
    assert!(
        sent.elapsed() < DELAY,
        "the machine is too slow for this test: {:?} went by before the checks",
        sent.elapsed()
    );
    assert!(
        two && requested == 2,
        "{requested} requests at Places with 2 pending_replies"
    );
    assert_eq!(
        show(&other),
        show(b"? WHATSAT held.cs.ucla.edu 10 1\n"),
        "the IAMAT behind the held WHATSAT ran"
    );
    // Then every reply, in order; the third only once one of the first two was answered.
    for bound in [1, 5, 20] {
        let want = bailey.reply_with(&expected(&format!("legacy_cut_{bound}.json")));
        assert_bytes_eq(
            &format!("WHATSAT bound {bound}"),
            &c.read_n(want.len()),
            &want,
        );
    }
    let third = sent.elapsed();
    assert_at_line(&c.read_line(), "held.cs.ucla.edu", &time);
    assert_eq!(fake.requests().len(), 3, "one Places request per WHATSAT");
    assert!(
        third >= 2 * DELAY,
        "the third WHATSAT was answered {third:?} after it was sent: it went to Places with \
         the first two (each takes {DELAY:?})"
    );
    println!("pending replies: the third WHATSAT answered {third:?} after it was sent");
}

/// `places.max_queue`, here 1, with one connection to Places (`pool_size = 1`) that stalls:
/// the first WHATSAT holds the connection, the second waits for it, and the third is answered
/// `UNKNOWN_ERROR` at once, in the turn it arrived, without reaching Places.
#[test]
fn past_places_max_queue_a_whatsat_is_answered_unknown_error_at_once() {
    let fake = FakePlaces::start(Behaviour::Stall);
    let places = fake.places_toml("legacy", 5000) + "pool_size = 1\nmax_queue = 1\n";
    let bailey = Bailey::start_with(&places);
    let server = bailey.server();
    let ask = || {
        let mut c = Client::connect(bailey.addr());
        c.send(format!("WHATSAT {KIWI} 10 1\n").as_bytes());
        c
    };
    let _first = ask();
    assert!(
        eventually(Duration::from_secs(10), || fake.requests().len() == 1),
        "the first WHATSAT never reached Places"
    );
    let _second = ask();
    await_log_line(server, "places #2 ", 0, Duration::from_secs(10));
    let asked = Instant::now();
    let mut third = ask();
    let reply = third.read_whatsat_reply();
    let took = asked.elapsed();
    assert_unknown_error("past max_queue", &reply, &bailey.at_line);
    assert!(
        contains(&reply, b"too many requests are waiting for Google Places"),
        "{}",
        show(&reply)
    );
    assert_eq!(fake.requests().len(), 1, "a queued request reached Places");
    // At once: failed in the turn the WHATSAT arrived, by the log's stamps.
    let id = conn_id(server, third.stream.local_addr().expect("address"));
    let arrived = await_log_line(
        server,
        &format!(" {id} < WHATSAT"),
        0,
        Duration::from_secs(10),
    );
    let failed = await_log_line(
        server,
        "places #3 failed: 1 Places requests are already waiting",
        0,
        Duration::from_secs(10),
    );
    assert_eq!(
        log_stamp(&arrived),
        log_stamp(&failed),
        "not in the same turn:\n{arrived}\n{failed}"
    );
    assert!(took < PROMPT, "the refusal took {took:?}");
    println!("max queue: the WHATSAT past the queue answered in {took:?}");
}

/// `limits.client_output_bytes`, here 64 KiB, on its own: a client pipelines 64 WHATSATs and
/// reads nothing. All go to Places before any reply comes back; once its unread replies reach
/// a quarter of the cap no more of its commands run, but the replies already asked for keep
/// coming, and the one that takes them over the cap closes the connection, in the turn it
/// came (the soft limit, 1 MiB for 10 s by default, has no time to).
#[test]
fn a_client_whose_unread_replies_pass_client_output_bytes_is_closed_at_once() {
    const CAP: usize = 64 << 10;
    let fake = FakePlaces::start(Behaviour::ok(legacy_ok()).delayed(Duration::from_millis(100)));
    let config =
        fake.places_toml("legacy", 5000) + &format!("\n[limits]\nclient_output_bytes = {CAP}\n");
    let bailey = Bailey::start_with(&config);
    let server = bailey.server();
    let mut hog = TcpStream::connect(bailey.addr()).expect("connect");
    hog.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
    let sent = Instant::now();
    hog.write_all(format!("WHATSAT {KIWI} 10 20\n").repeat(64).as_bytes())
        .expect("the WHATSATs");
    let id = conn_id(server, hog.local_addr().expect("address"));
    let closed = await_log_line(
        server,
        &format!(" {id} closed: "),
        0,
        Duration::from_secs(10),
    );
    let cut_after = sent.elapsed();
    let why = format!("over {CAP} bytes of replies unread: the client does not read");
    assert!(
        closed.ends_with(&why),
        "closed, but not at the cap: {closed}"
    );
    // In the turn of the reply that took it over: the last line sent to it has the same stamp.
    let log = server.log();
    let last_reply = log
        .lines()
        .take_while(|l| *l != closed)
        .filter(|l| l.contains(&format!(" {id} > ")))
        .last()
        .expect("replies were sent to it");
    assert_eq!(
        log_stamp(last_reply),
        log_stamp(&closed),
        "the close did not come in the turn of the last reply"
    );
    // It sees the end: what the kernel held, then end of stream (or a reset).
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match hog.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the client over its cap never saw the end: {e}"),
        }
    }
    // Another client is served.
    let mut other = Client::connect(bailey.addr());
    other.send(format!("WHATSAT {KIWI} 10 1\n").as_bytes());
    let want = bailey.reply_with(&expected("legacy_cut_1.json"));
    assert_bytes_eq("another client", &other.read_whatsat_reply(), &want);
    println!("output cap: closed {cut_after:?} after it sent its WHATSATs ({why})");
}

/// `limits.idle_timeout_ms` counts only while nothing is pending: a client whose WHATSAT waits
/// on Places longer than the idle timeout gets its reply, and is closed as idle within the
/// next check of the deadlines after it.
#[test]
fn a_client_waiting_on_places_is_not_idle() {
    const PLACES: Duration = Duration::from_millis(2500);
    let fake = FakePlaces::start(Behaviour::ok(legacy_ok()).delayed(PLACES));
    let config = fake.places_toml("legacy", 5000) + "\n[limits]\nidle_timeout_ms = 1000\n";
    let bailey = Bailey::start_with(&config);
    let mut c = Client::connect(bailey.addr());
    let sent = Instant::now();
    c.send(format!("WHATSAT {KIWI} 10 1\n").as_bytes());
    let reply = c.read_whatsat_reply();
    let answered = sent.elapsed();
    let want = bailey.reply_with(&expected("legacy_cut_1.json"));
    assert_bytes_eq("the reply after the idle time", &reply, &want);
    assert!(answered >= PLACES, "answered after {answered:?}");
    let rest = c.read_to_end();
    let closed = sent.elapsed();
    assert_eq!(show(&rest), "", "after the reply");
    // Its last byte came long enough ago: closed at the next check, once a second.
    let bound = answered + Duration::from_millis(1500);
    assert!(
        closed <= bound,
        "closed {closed:?} after it asked (answered at {answered:?}; bound {bound:?})"
    );
}
