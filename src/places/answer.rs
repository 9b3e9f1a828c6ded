//! Google Places as pure functions: the request a WHATSAT becomes, and the reply body made from
//! Google's answer (docs/protocol.md section 4). The connection that carries them is
//! [`crate::places::pool`].
//!
//! The body is relayed as Google wrote it. Cutting the results array to the bound splices the
//! raw text: serde_json checks the JSON and gives the byte offsets of the array's elements, and
//! the tail elements are left out, so every other byte (Google's indentation, key order, number
//! formatting, escapes) is untouched. Re-serialising with serde_json would change all of those.

use std::fmt::Write as _;

use serde::de::{
    DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde_json::value::RawValue;

use crate::config::{Api, Output};
use crate::protocol::Coordinate;
use memchr::memchr;

impl Api {
    /// The key of the array that the bound cuts.
    fn results_key(self) -> &'static str {
        match self {
            Api::Legacy => "results",
            Api::New => "places",
        }
    }
}

/// Where a WHATSAT asks about: the client's location and the radius in metres.
pub struct Query<'a> {
    /// The client's latitude, from its stored record.
    pub latitude: Coordinate<'a>,
    /// The client's longitude, from its stored record.
    pub longitude: Coordinate<'a>,
    /// The radius in metres, as exact decimal text: the WHATSAT's kilometres times 1000.
    pub radius_m: &'a [u8],
    /// The most results the reply keeps, 0 to 20.
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
        // The key travels in a header here, and the bound as `maxResultCount`, which must be 1
        // to 20: a bound of 0 asks for one result, and the cut keeps none.
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

/// Makes the reply body from Google's raw body. `Err` says what went wrong when the body is not
/// an answer at all (not UTF-8, not JSON, or, to be rewritten as legacy, not a New API answer);
/// the pool logs it and answers with an [`error_body`].
pub fn answer(api: Api, output: Output, raw: &[u8], bound: usize) -> Result<Answer, String> {
    // JSON is UTF-8, and serde_json skips the bytes inside strings without decoding them.
    std::str::from_utf8(raw)
        .map_err(|e| format!("Places answered with a body that is not UTF-8 ({e})"))?;
    let found = top_level(raw, api.results_key())?;
    // The legacy API says how it went in `status`; the New API only in an `error` object, whose
    // absence means success. The status is for the log.
    let status = match (api, found.error) {
        (Api::Legacy, _) => found.status.unwrap_or_default(),
        (Api::New, Some(error)) => top_level(error.get().as_bytes(), "")
            .ok()
            .and_then(|inner| inner.status)
            .unwrap_or_else(|| "ERROR".into()),
        (Api::New, None) => "OK".to_owned(),
    };
    let legacy;
    let pieces = match (api, output) {
        (Api::New, Output::Legacy) => {
            legacy = crate::places::legacy::new_to_legacy(raw, bound)?;
            [&legacy[..], &[][..]]
        }
        _ => match found.elements {
            Some(elements) => cut_array(raw, &elements, bound),
            None => [raw, &[][..]],
        },
    };
    // The pieces are squeezed as they are joined: the body is copied once.
    let mut body = Vec::with_capacity(pieces[0].len() + pieces[1].len());
    for piece in pieces {
        push_squeezed(&mut body, piece);
    }
    trim_newlines(&mut body);
    Ok(Answer { status, body })
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
#[cfg(test)]
fn squeeze_newlines(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    push_squeezed(&mut out, text);
    trim_newlines(&mut out);
    out
}

/// Appends `text` to `out`, a run of newlines kept as one, counting the newline `out` may
/// already end with.
fn push_squeezed(out: &mut Vec<u8>, mut text: &[u8]) {
    while let Some(at) = memchr(b'\n', text) {
        out.extend_from_slice(&text[..at]);
        // An empty piece after a newline is a run of newlines: one is kept.
        if at > 0 || out.last() != Some(&b'\n') {
            out.push(b'\n');
        }
        text = &text[at + 1..];
    }
    out.extend_from_slice(text);
}

/// Drops the newlines at the end: the reply's own blank line ends it (docs/protocol.md
/// section 4), and a body's last newline would add a second.
fn trim_newlines(out: &mut Vec<u8>) {
    while out.last() == Some(&b'\n') {
        out.pop();
    }
}

/// Keeps the first `keep` of the array elements spanned by `elements` (byte offsets in `raw`,
/// without the white space and commas around them): the two pieces of `raw` that, joined, are
/// the body cut. What stood between the last kept element and the `]` is what stood between
/// the array's last element and its `]`, so the layout stays Google's; an emptied array is
/// written `[]`, as both Google styles write an empty array.
fn cut_array<'a>(raw: &'a [u8], elements: &[(usize, usize)], keep: usize) -> [&'a [u8]; 2] {
    let (Some(&(first, _)), Some(&(_, last_end))) = (elements.first(), elements.last()) else {
        return [raw, &[]];
    };
    if keep >= elements.len() {
        return [raw, &[]]; // nothing to cut
    }
    match keep.checked_sub(1).and_then(|last| elements.get(last)) {
        Some(&(_, kept_end)) => [&raw[..kept_end], &raw[last_end..]],
        None => {
            // The `[` is the last byte before the first element that is not white space, the
            // `]` the first after the last element.
            let open = raw[..first]
                .iter()
                .rposition(|&b| !is_json_space(b))
                .unwrap_or(0);
            let close = raw[last_end..]
                .iter()
                .position(|&b| !is_json_space(b))
                .map_or(raw.len(), |at| last_end + at);
            [&raw[..=open], &raw[close..]]
        }
    }
}

/// JSON's four white-space bytes (RFC 8259, section 2).
fn is_json_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// What the reply needs from the top level of Google's body.
#[derive(Default)]
struct TopLevel<'a> {
    /// The spans of the results array's elements (`results` or `places`), when it is an array.
    elements: Option<Vec<(usize, usize)>>,
    /// The `status` value, when it is a string.
    status: Option<String>,
    /// The `error` value, as Google wrote it.
    error: Option<&'a RawValue>,
}

/// Checks that `raw` is JSON and finds what the reply needs at its top level, in one pass of
/// serde_json's: a tree of Google's 36 KB body would cost more than the rest of the WHATSAT
/// together, so nothing is built but the list of the array's elements, each a [`RawValue`]
/// (the value's own bytes in `raw`, checked and not decoded). A top level that is not an
/// object has nothing to find and is only checked. Of repeated keys, the last counts.
///
/// What is accepted is what serde_json accepts when it only skips a value (`IgnoredAny`),
/// with two exceptions, where a value is read rather than skipped: a lone surrogate escape
/// (`"\ud800"`) in a key of the top level or as the whole results value, and a number beyond
/// an `f64` (`1e400`) as the whole results value, are refused. Google sends neither.
fn top_level<'a>(raw: &'a [u8], array_key: &str) -> Result<TopLevel<'a>, String> {
    let first = raw.iter().find(|&&b| !is_json_space(b));
    let found = if first == Some(&b'{') {
        let mut de = serde_json::Deserializer::from_slice(raw);
        de.deserialize_map(TopLevelVisitor { raw, array_key })
            .and_then(|found| de.end().map(|()| found))
    } else {
        serde_json::from_slice::<IgnoredAny>(raw).map(|_| TopLevel::default())
    };
    found.map_err(|e| format!("Places answered with a body that is not JSON ({e})"))
}

/// Walks the top-level object: the three keys the reply needs are read, every other value is
/// only checked and skipped.
struct TopLevelVisitor<'k, 'a> {
    raw: &'a [u8],
    array_key: &'k str,
}

impl<'de> Visitor<'de> for TopLevelVisitor<'_, 'de> {
    type Value = TopLevel<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<TopLevel<'de>, M::Error> {
        let array_key = self.array_key.as_bytes();
        let mut found = TopLevel::default();
        while let Some(key) = map.next_key_seed(Key { array_key })? {
            match key {
                KeyIs::Array => found.elements = map.next_value_seed(Elements { raw: self.raw })?,
                KeyIs::Status => {
                    let value: &RawValue = map.next_value()?;
                    found.status = serde_json::from_str(value.get()).ok();
                }
                KeyIs::Error => found.error = Some(map.next_value()?),
                KeyIs::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }
}

/// Which key of the top level was read. A key without escapes is compared where it lies in
/// the body, not copied.
enum KeyIs {
    Array,
    Status,
    Error,
    Other,
}

/// Reads one key of the top level as a [`KeyIs`].
struct Key<'k> {
    array_key: &'k [u8],
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = KeyIs;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<KeyIs, D::Error> {
        de.deserialize_str(self)
    }
}

impl Visitor<'_> for Key<'_> {
    type Value = KeyIs;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E>(self, key: &str) -> Result<KeyIs, E> {
        Ok(match key.as_bytes() {
            key if key == self.array_key => KeyIs::Array,
            b"status" => KeyIs::Status,
            b"error" => KeyIs::Error,
            _ => KeyIs::Other,
        })
    }
}

/// The value of the results key: the spans of its elements if it is an array, else nothing.
struct Elements<'a> {
    raw: &'a [u8],
}

impl<'de> DeserializeSeed<'de> for Elements<'de> {
    type Value = Option<Vec<(usize, usize)>>;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Self::Value, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Elements<'de> {
    type Value = Option<Vec<(usize, usize)>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
        let base = self.raw.as_ptr() as usize;
        let mut spans = Vec::new();
        while let Some(element) = seq.next_element::<&RawValue>()? {
            // A borrowed RawValue is a slice of `raw`: its offset is the pointers' difference.
            // Checked all the same, so that no later slicing of `raw` can go out of bounds.
            let text = element.get();
            let span = (text.as_ptr() as usize)
                .checked_sub(base)
                .map(|start| (start, start + text.len()))
                .filter(|&(_, end)| end <= self.raw.len())
                .ok_or_else(|| S::Error::custom("an element outside the body"))?;
            spans.push(span);
        }
        Ok(Some(spans))
    }

    // Any other value: no array to cut, so the body is relayed whole. It is still read to its
    // end, so that what follows it is checked too.
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
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
            "/tests/data/places/new_ok_5.json"
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
        // The rule holds on both sides of a cut: here the run is in what follows the kept
        // results, and the piece before the cut ends with a result, never a newline.
        let raw = b"{\"results\" : [1,\n\n2\n\n\n], \"status\" : \"OK\"}\n\n";
        let a = answer(Api::Legacy, Output::AsSent, raw, 1).unwrap();
        assert_eq!(a.body, b"{\"results\" : [1\n], \"status\" : \"OK\"}");
        let a = answer(Api::Legacy, Output::AsSent, raw, 0).unwrap();
        assert_eq!(a.body, b"{\"results\" : [], \"status\" : \"OK\"}");
    }

    #[test]
    fn not_json_is_an_error() {
        assert!(answer(Api::Legacy, Output::AsSent, b"<html>", 1).is_err());
        // Invalid UTF-8 inside a string is not JSON either.
        assert!(answer(Api::Legacy, Output::AsSent, b"{\"status\" : \"O\xffK\"}", 1).is_err());
        for bad in [
            &b"{\"results\" : [1, 2,], \"status\" : \"OK\"}"[..], // a trailing comma
            b"{\"results\" : [1, 2]} {}",                         // more after the value
            b"{\"results\" : [01]}",                              // a leading zero
            b"{\"status\" : \"\\q\"}",                            // an unknown escape
            b"{\"results\" : [\"\x01\"]}",                        // a control byte in a string
            b"{\"results\" : [1, 2]",                             // unclosed
            b"",
        ] {
            let text = String::from_utf8_lossy(bad);
            assert!(
                answer(Api::Legacy, Output::AsSent, bad, 1).is_err(),
                "{text}"
            );
        }
    }

    #[test]
    fn what_skipping_accepts_is_accepted() {
        // serde_json accepts these when it only skips them; so does the answer.
        for raw in [
            &br#"{"results" : [1, "\ud800", 1e400]}"#[..], // lone surrogates, huge numbers
            br#"{"a" : {"\ud800" : 1e400}}"#,              // below the top level
            br#""\udc00""#,                                // a top level that is not an object
            b"1e400",
            br#"[{"\ud800" : 1e400}]"#,
        ] {
            let text = String::from_utf8_lossy(raw);
            assert!(serde_json::from_slice::<IgnoredAny>(raw).is_ok(), "{text}");
            assert!(
                answer(Api::Legacy, Output::AsSent, raw, 1).is_ok(),
                "{text}"
            );
        }
        // The exceptions, where a value is read: the top level's keys, and a results value
        // that is not an array.
        for raw in [
            &br#"{"results" : "\ud800"}"#[..],
            br#"{"results" : 1e400}"#,
            br#"{"\ud800" : 1}"#,
        ] {
            assert!(answer(Api::Legacy, Output::AsSent, raw, 1).is_err());
        }
    }

    #[test]
    fn only_an_array_under_the_results_key_is_cut() {
        let relayed = |raw: &[u8], bound| answer(Api::Legacy, Output::AsSent, raw, bound).unwrap();
        // Not an object at the top, or no array under the key: relayed whole.
        for raw in [
            &b"[1, 2, 3]"[..],
            b"\"results\"",
            b"7",
            b"null",
            b"{\"results\" : {\"a\" : [1, 2, 3]}, \"status\" : \"OK\"}",
            b"{\"results\" : null}",
            b"{\"other\" : [1, 2, 3]}",
        ] {
            assert_eq!(
                relayed(raw, 1).body,
                raw,
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        // The last of repeated keys counts; a key written with an escape is the same key.
        let raw = b"{\"results\" : [1], \"res\\u0075lts\" : [ 1 , 2 , 3 ], \"status\" : 5}";
        let cut = relayed(raw, 1);
        assert_eq!(
            cut.body,
            b"{\"results\" : [1], \"res\\u0075lts\" : [ 1 ], \"status\" : 5}"
        );
        assert_eq!(cut.status, "", "a status that is not a string is none");
        // Cut to nothing, whatever the white space: `[]`, and the rest as it was.
        let raw = b"{\"results\":[\r\n\t 1,2 \n],\"status\":\"OK\"}";
        let none = relayed(raw, 0);
        assert_eq!(none.body, b"{\"results\":[],\"status\":\"OK\"}");
        assert_eq!(none.status, "OK");
        // Elements of every kind keep their own bytes.
        let raw = b"{\"results\" : [\"]\\\"\", {\"a\" : [1, {}]}, -1.5e+3, true, null, [[]]]}";
        for (bound, kept) in [
            (1, &b"[\"]\\\"\"]"[..]),
            (3, b"[\"]\\\"\", {\"a\" : [1, {}]}, -1.5e+3]"),
            (
                6,
                b"[\"]\\\"\", {\"a\" : [1, {}]}, -1.5e+3, true, null, [[]]]",
            ),
        ] {
            let mut expected = b"{\"results\" : ".to_vec();
            expected.extend_from_slice(kept);
            expected.push(b'}');
            assert_eq!(relayed(raw, bound).body, expected, "bound {bound}");
        }
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
