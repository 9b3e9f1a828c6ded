//! Google Places as pure functions: the request a WHATSAT becomes, and the reply body made from
//! Google's answer (SPEC.md section 4). The connection that carries them is [`crate::https`].
//!
//! The body is relayed as Google wrote it. Cutting the results array to the bound splices the raw
//! text: the JSON is scanned for the byte offsets of the array's elements and the tail elements
//! are left out, so every other byte (Google's indentation, key order, number formatting,
//! escapes) is untouched. Re-serialising with serde_json would change all of those.

use std::fmt::Write as _;

use crate::conn::{find_first, splat, zero_bytes};
use crate::protocol::Coordinate;

/// Which Places API a server talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// Nearby Search (`maps/api/place/nearbysearch/json`), a GET with the key in the query.
    Legacy,
    /// Places API (New), a POST of JSON to `v1/places:searchNearby`.
    New,
}

impl Api {
    /// The key of the array that the bound cuts.
    fn results_key(self) -> &'static str {
        match self {
            Api::Legacy => "results",
            Api::New => "places",
        }
    }
}

/// What a reply body is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Google's body as Google sent it (cut to the bound, newlines squeezed).
    AsSent,
    /// With the New API, its answer turned into a legacy Nearby Search body, for clients written
    /// for the legacy layout ([`crate::legacy`]). The same as `AsSent` with the legacy API.
    Legacy,
}

/// Where a WHATSAT asks about: the client's location and the radius in metres.
pub struct Query<'a> {
    pub latitude: Coordinate<'a>,
    pub longitude: Coordinate<'a>,
    pub radius_m: &'a [u8],
    pub bound: usize,
}

/// The HTTP request for one query, split so that the key is never part of what is logged.
pub struct Request {
    /// What the log may show: method and target without the key.
    pub summary: String,
    /// The whole request, key included.
    pub bytes: Vec<u8>,
}

/// Builds the HTTP/1.1 request. `host` is the `Host` header value, `path` the URL's path.
pub fn build_request(
    api: Api,
    host: &str,
    path: &str,
    key: &str,
    field_mask: &str,
    q: &Query,
) -> Request {
    let mut location = Vec::with_capacity(48);
    q.latitude.write_plain(&mut location);
    location.push(b',');
    q.longitude.write_plain(&mut location);
    let location = String::from_utf8_lossy(&location).into_owned();
    let radius = String::from_utf8_lossy(q.radius_m);
    let mut bytes = String::with_capacity(512);
    let summary;
    match api {
        Api::Legacy => {
            let target = format!("{path}?location={location}&radius={radius}");
            summary = format!("GET {target}");
            let _ = write!(
                bytes,
                "GET {target}&key={key} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: herd/{}\r\nAccept: application/json\r\n\r\n",
                env!("CARGO_PKG_VERSION")
            );
        }
        Api::New => {
            let (lat, lng) = location.split_once(',').unwrap_or((&location, "0"));
            let body = format!(
                "{{\"locationRestriction\":{{\"circle\":{{\"center\":{{\"latitude\":{lat},\"longitude\":{lng}}},\"radius\":{radius}}}}},\"maxResultCount\":{}}}",
                q.bound.max(1)
            );
            summary = format!("POST {path} {body}");
            let _ = write!(
                bytes,
                "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: herd/{}\r\nAccept: application/json\r\nContent-Type: application/json\r\nX-Goog-Api-Key: {key}\r\nX-Goog-FieldMask: {field_mask}\r\nContent-Length: {}\r\n\r\n{body}",
                env!("CARGO_PKG_VERSION"),
                body.len()
            );
        }
    }
    Request {
        summary,
        bytes: bytes.into_bytes(),
    }
}

/// Google's answer, checked: the status it reports and the body cut to the bound.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    /// The body's `status` (legacy), or `OK` / the error's `status` (New API).
    pub status: String,
    /// The reply body: cut, newline rules applied, no trailing newline.
    pub body: Vec<u8>,
}

/// Makes the reply body from Google's raw body. `Err` carries what went wrong when the body is
/// not JSON at all; the caller answers that with [`error_body`].
pub fn answer(api: Api, output: Output, raw: &[u8], bound: usize) -> Result<Answer, String> {
    // Checked, not built: a tree of Google's 40 KB body would cost more than the rest of the
    // WHATSAT together. The scanner below finds what the reply needs.
    // JSON is UTF-8, and IgnoredAny skips strings without looking at their bytes.
    std::str::from_utf8(raw)
        .map_err(|e| format!("Places answered with a body that is not UTF-8 ({e})"))?;
    serde_json::from_slice::<serde::de::IgnoredAny>(raw)
        .map_err(|e| format!("Places answered with a body that is not JSON ({e})"))?;
    let found = top_level(raw, api.results_key()).unwrap_or_default();
    let text = |span: Option<(usize, usize)>, within: &[u8]| {
        span.and_then(|(from, to)| serde_json::from_slice::<String>(&within[from..to]).ok())
    };
    let status = match (api, found.error) {
        (Api::Legacy, _) => text(found.status, raw).unwrap_or_default(),
        (Api::New, Some((from, to))) => {
            let error = &raw[from..to];
            let inner = top_level(error, "").and_then(|t| text(t.status, error));
            inner.unwrap_or_else(|| "ERROR".into())
        }
        (Api::New, None) => "OK".to_owned(),
    };
    let cut = match (api, output) {
        (Api::New, Output::Legacy) => crate::legacy::new_to_legacy(raw, bound)?,
        _ => match found.array {
            Some(array) if array.elements.len() > bound => cut_array(raw, &array, bound),
            _ => raw.to_vec(),
        },
    };
    Ok(Answer {
        status,
        body: squeeze_newlines(&cut),
    })
}

/// A body in Google's error vocabulary, for when Places could not be asked or gave no answer.
pub fn error_body(status: &str, message: &str) -> Vec<u8> {
    let message = serde_json::Value::String(message.to_owned()).to_string();
    format!(
        "{{\"html_attributions\" : [], \"results\" : [], \"status\" : \"{status}\", \"error_message\" : {message}}}"
    )
    .into_bytes()
}

/// Replaces every run of two or more newlines with one and drops trailing newlines.
pub fn squeeze_newlines(mut text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    while let Some(at) = text.iter().position(|&b| b == b'\n') {
        out.extend_from_slice(&text[..at]);
        // An empty piece after a newline is a run of newlines: one is kept.
        if at > 0 || out.last() != Some(&b'\n') {
            out.push(b'\n');
        }
        text = &text[at + 1..];
    }
    out.extend_from_slice(text);
    while out.last() == Some(&b'\n') {
        out.pop();
    }
    out
}

/// Byte offsets of a top-level array: `open` is the `[`, `close` the `]`, and each element's
/// span excludes the white space and commas around it.
#[derive(Debug)]
struct ArraySpan {
    open: usize,
    close: usize,
    elements: Vec<(usize, usize)>,
}

/// Keeps the first `keep` elements. What stood between the last kept element and the `]` is
/// what stood between the array's last element and its `]`, so the layout stays Google's; an
/// emptied array is written `[]`, as both Google styles write an empty array.
fn cut_array(raw: &[u8], array: &ArraySpan, keep: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    match keep.checked_sub(1).map(|last| array.elements[last].1) {
        Some(kept_end) => {
            let (_, last_end) = array.elements[array.elements.len() - 1];
            out.extend_from_slice(&raw[..kept_end]);
            out.extend_from_slice(&raw[last_end..]);
        }
        None => {
            out.extend_from_slice(&raw[..=array.open]);
            out.extend_from_slice(&raw[array.close..]);
        }
    }
    out
}

/// What the reply needs from the top level of Google's body, found in one pass.
#[derive(Default)]
struct TopLevel {
    /// The results array (`results` or `places`), with its elements.
    array: Option<ArraySpan>,
    /// The spans of the `status` and `error` values.
    status: Option<(usize, usize)>,
    error: Option<(usize, usize)>,
}

/// Walks the top-level object of valid JSON `raw` once.
fn top_level(raw: &[u8], array_key: &str) -> Option<TopLevel> {
    let mut found = TopLevel::default();
    let mut scan = Scanner { raw, at: 0 };
    scan.skip_space();
    scan.expect(b'{')?;
    loop {
        scan.skip_space();
        if scan.peek()? == b'}' {
            return Some(found); // {}
        }
        let name = scan.string()?;
        let name = &raw[name.0 + 1..name.1 - 1];
        scan.skip_space();
        scan.expect(b':')?;
        scan.skip_space();
        if name == array_key.as_bytes() && scan.peek()? == b'[' {
            found.array = Some(scan.array()?);
        } else {
            let value = scan.value()?;
            match name {
                b"status" => found.status = Some(value),
                b"error" => found.error = Some(value),
                _ => {}
            }
        }
        scan.skip_space();
        if scan.next()? != b',' {
            return Some(found);
        }
    }
}

/// A forward scanner over JSON text already known to be valid; it only finds boundaries.
struct Scanner<'a> {
    raw: &'a [u8],
    at: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.raw.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.at += 1;
        Some(b)
    }

    fn expect(&mut self, b: u8) -> Option<()> {
        (self.next()? == b).then_some(())
    }

    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// A string; returns its span including the quotes. Jumps from one quote or backslash to
    /// the next, eight bytes at a time: most of Google's bytes are inside strings.
    fn string(&mut self) -> Option<(usize, usize)> {
        let start = self.at;
        self.expect(b'"')?;
        loop {
            let skip = find_first(
                &self.raw[self.at..],
                |w| zero_bytes(w ^ splat(b'"')) | zero_bytes(w ^ splat(b'\\')),
                |b| b == b'"' || b == b'\\',
            )?;
            self.at += skip;
            match self.next()? {
                b'\\' => self.at += 1,
                _ => return Some((start, self.at)),
            }
        }
    }

    /// Any value; returns its span.
    fn value(&mut self) -> Option<(usize, usize)> {
        let start = self.at;
        match self.peek()? {
            b'"' => return self.string(),
            b'[' | b'{' => {
                let mut depth = 0usize;
                loop {
                    // Indentation and numbers are skipped in one stride to the next bracket
                    // or string, eight bytes at a time. Clearing bit 5 (0x20) turns `{` into
                    // `[` and `}` into `]`, and no other byte into either.
                    let skip = find_first(
                        &self.raw[self.at..],
                        |w| {
                            let folded = w & splat(!0x20);
                            zero_bytes(w ^ splat(b'"'))
                                | zero_bytes(folded ^ splat(b'['))
                                | zero_bytes(folded ^ splat(b']'))
                        },
                        |b| matches!(b, b'"' | b'[' | b']' | b'{' | b'}'),
                    )?;
                    self.at += skip;
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'[' | b'{' => depth += 1,
                        _ => depth -= 1,
                    }
                    self.at += 1;
                    if depth == 0 {
                        break;
                    }
                }
            }
            _ => {
                while !matches!(
                    self.peek()?,
                    b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r'
                ) {
                    self.at += 1;
                }
            }
        }
        Some((start, self.at))
    }

    /// An array at the cursor, with the spans of its elements; the cursor ends past its `]`.
    fn array(&mut self) -> Option<ArraySpan> {
        let open = self.at;
        self.expect(b'[')?;
        let mut elements = Vec::new();
        loop {
            self.skip_space();
            if self.peek()? == b']' {
                let close = self.at;
                self.at += 1;
                return Some(ArraySpan {
                    open,
                    close,
                    elements,
                });
            }
            elements.push(self.value()?);
            self.skip_space();
            if self.peek()? == b',' {
                self.at += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::parse_location;

    #[test]
    fn cut_keeps_layout() {
        let raw = b"{\n   \"a\" : [ 1, 2 ],\n   \"results\" : [\n      {\n         \"x\" : \"]}\\\"\"\n      },\n      {\n         \"x\" : 2\n      }\n   ],\n   \"status\" : \"OK\"\n}\n";
        let one = answer(Api::Legacy, Output::AsSent, raw, 1).unwrap();
        assert_eq!(one.status, "OK");
        assert_eq!(
            String::from_utf8(one.body).unwrap(),
            "{\n   \"a\" : [ 1, 2 ],\n   \"results\" : [\n      {\n         \"x\" : \"]}\\\"\"\n      }\n   ],\n   \"status\" : \"OK\"\n}"
        );
        let none = answer(Api::Legacy, Output::AsSent, raw, 0).unwrap();
        assert_eq!(
            String::from_utf8(none.body).unwrap(),
            "{\n   \"a\" : [ 1, 2 ],\n   \"results\" : [],\n   \"status\" : \"OK\"\n}"
        );
        let all = answer(Api::Legacy, Output::AsSent, raw, 2).unwrap();
        assert_eq!(all.body, &raw[..raw.len() - 1]);
    }

    #[test]
    fn new_api_cuts_places_and_reads_errors() {
        let raw = b"{\n  \"places\": [\n    {\n      \"id\": \"a\"\n    },\n    {\n      \"id\": \"b\"\n    }\n  ]\n}\n";
        let a = answer(Api::New, Output::AsSent, raw, 1).unwrap();
        assert_eq!(a.status, "OK");
        assert_eq!(
            a.body,
            b"{\n  \"places\": [\n    {\n      \"id\": \"a\"\n    }\n  ]\n}"
        );
        let e = answer(
            Api::New,
            Output::AsSent,
            b"{\"error\": {\"code\": 403, \"status\": \"PERMISSION_DENIED\"}}",
            3,
        )
        .unwrap();
        assert_eq!(e.status, "PERMISSION_DENIED");
    }

    #[test]
    fn new_api_answers_can_be_relayed_in_the_legacy_layout() {
        let raw = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/places-fixtures/new_ok_5.json"
        ))
        .unwrap();
        let expected = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/new_as_legacy_3.json"
        ))
        .unwrap();
        let a = answer(Api::New, Output::Legacy, &raw, 3).unwrap();
        assert_eq!(a.body, squeeze_newlines(&expected));
        assert!(a
            .body
            .starts_with(b"{\n   \"html_attributions\" : [],\n   \"results\" : [\n"));
    }

    #[test]
    fn newlines_are_squeezed() {
        assert_eq!(squeeze_newlines(b"{\n\n\n\"a\"\n}\n\n"), b"{\n\"a\"\n}");
    }

    #[test]
    fn not_json_is_an_error() {
        assert!(answer(Api::Legacy, Output::AsSent, b"<html>", 1).is_err());
        // Invalid UTF-8 inside a string is not JSON either.
        assert!(answer(Api::Legacy, Output::AsSent, b"{\"status\" : \"O\xffK\"}", 1).is_err());
    }

    #[test]
    fn error_body_escapes_the_message() {
        assert_eq!(
            error_body("UNKNOWN_ERROR", "a \"b\""),
            b"{\"html_attributions\" : [], \"results\" : [], \"status\" : \"UNKNOWN_ERROR\", \"error_message\" : \"a \\\"b\\\"\"}"
        );
    }

    #[test]
    fn requests_carry_plain_coordinates() {
        let (latitude, longitude) = parse_location(b"+34.068930-118.445127").unwrap();
        let q = Query {
            latitude,
            longitude,
            radius_m: b"10000",
            bound: 0,
        };
        let r = build_request(Api::Legacy, "maps.googleapis.com", "/p", "K", "", &q);
        assert_eq!(
            r.summary,
            "GET /p?location=34.068930,-118.445127&radius=10000"
        );
        assert!(r.bytes.starts_with(b"GET /p?location=34.068930,-118.445127&radius=10000&key=K HTTP/1.1\r\nHost: maps.googleapis.com\r\n"));
        let r = build_request(
            Api::New,
            "h",
            "/v1/places:searchNearby",
            "K",
            "places.id",
            &q,
        );
        let text = String::from_utf8(r.bytes).unwrap();
        assert!(text.ends_with("\r\n\r\n{\"locationRestriction\":{\"circle\":{\"center\":{\"latitude\":34.068930,\"longitude\":-118.445127},\"radius\":10000}},\"maxResultCount\":1}"));
        assert!(text.contains("\r\nX-Goog-Api-Key: K\r\nX-Goog-FieldMask: places.id\r\n"));
        assert!(!r.summary.contains('K'));
    }
}
