//! Places API (New) answers rewritten as legacy Nearby Search bodies, for clients written
//! against the legacy API (docs/protocol.md section 4) when the server's key only opens the New
//! one.
//!
//! This is the one place where the herd re-serialises Google's JSON instead of splicing it
//! (compare [`mod@crate::places::answer`]), because there is no legacy text to splice: the body
//! is built from the New answer's fields and written the way Google's legacy service writes, byte
//! for byte (`tests/data/places/make_places.py` describes it): JsonCpp's `StyledWriter` with keys
//! sorted, a 3-space indent, `"key" : value`, scalar arrays inline when short, doubles as
//! `%.16g`, `<` and `>` as `\u003c` and `\u003e`, and one `\n` at the end.
//!
//! ## From a New place to a legacy result
//!
//! Only what the New answer holds is written; an absent field stays absent, since proto3 leaves
//! unset fields out. A field of the wrong JSON type is treated as absent.
//!
//! | legacy result field | Places API (New) field |
//! |---|---|
//! | `business_status` | `businessStatus`, except `BUSINESS_STATUS_UNSPECIFIED` |
//! | `geometry.location.lat`, `.lng` | `location.latitude`, `.longitude`, a missing one 0 (below) |
//! | `geometry.viewport.northeast`, `.southwest` | `viewport.high`, `viewport.low` |
//! | `icon_background_color` | `iconBackgroundColor` |
//! | `icon_mask_base_uri` | `iconMaskBaseUri` |
//! | `name` | `displayName.text` |
//! | `opening_hours.open_now` | `currentOpeningHours.openNow`, else `regularOpeningHours.openNow` |
//! | `place_id` | `id` |
//! | `plus_code.compound_code`, `.global_code` | `plusCode.compoundCode`, `.globalCode` |
//! | `price_level` | `priceLevel`, as a number (below) |
//! | `rating` | `rating` |
//! | `reference` | `id` (legacy answers carry the place id here too) |
//! | `types` | `types`, as they are (the New API has more of them) |
//! | `user_ratings_total` | `userRatingCount` |
//! | `vicinity` | `shortFormattedAddress`, else `formattedAddress` |
//!
//! A coordinate missing from a New `LatLng` is 0, since proto3 leaves zeros out. `priceLevel`
//! becomes `PRICE_LEVEL_FREE` 0, `_INEXPENSIVE` 1, `_MODERATE` 2, `_EXPENSIVE` 3,
//! `_VERY_EXPENSIVE` 4; any other value leaves `price_level` out.
//!
//! Not written, for want of a source: `icon` (the legacy PNG is not derivable from the New
//! pinlet URI), `photos` (a New photo name is not a legacy `photo_reference`, and the legacy
//! `html_attributions` markup would be invented), `scope`, `permanently_closed` and
//! `next_page_token` (searchNearby has no pages). The top level is `html_attributions: []`,
//! the cut `results`, and `status`: `OK`, or `ZERO_RESULTS` when the New answer has no places.
//!
//! A New error (`{"error": {"status", "message", ...}}`) becomes a legacy error body: status
//! `PERMISSION_DENIED` and `UNAUTHENTICATED` → `REQUEST_DENIED`, `RESOURCE_EXHAUSTED` →
//! `OVER_QUERY_LIMIT`, `INVALID_ARGUMENT` → `INVALID_REQUEST`, anything else `UNKNOWN_ERROR`;
//! `error_message` is the error's `message`.
//!
//! ## Why not `serde_json::Value`
//!
//! Numbers must reach `%.16g` as exactly the double Google wrote. serde_json without its
//! `float_roundtrip` feature may land one unit in the last place off, and does so for about one
//! coordinate in seven as the New API writes them (`99.857052299999992` becomes
//! `99.85705230000001`, which `%.16g` then shows). So serde_json only validates the body and
//! decodes its strings; [`Reader`] keeps each number's text, and the standard library's exactly
//! rounding parser turns it into an `f64`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Turns a Places API (New) searchNearby body into a legacy Nearby Search body, laid out
/// exactly as Google's legacy service writes (3-space indent, `"key" : value`, keys sorted,
/// `[]` for empty arrays, scalar arrays inline as `[ "a", "b" ]` when under 74 chars else one
/// per line, doubles as %.16g, `<`/`>` as \u003c/\u003e, non-ASCII raw UTF-8, ends with "\n").
/// `bound` cuts the results. An error body of the New API (`{"error": {...}}`) becomes a legacy
/// error body (status mapped: PERMISSION_DENIED/UNAUTHENTICATED -> REQUEST_DENIED,
/// RESOURCE_EXHAUSTED -> OVER_QUERY_LIMIT, INVALID_ARGUMENT -> INVALID_REQUEST, else
/// UNKNOWN_ERROR; error_message = the error's message). No places -> ZERO_RESULTS.
///
/// `Err` says why the body is not a New answer at all: not JSON, not an object, or `places`
/// not an array of objects.
pub fn new_to_legacy(raw: &[u8], bound: usize) -> Result<Vec<u8>, String> {
    serde_json::from_slice::<serde_json::Value>(raw)
        .map_err(|e| format!("Places answered with a body that is not JSON ({e})"))?;
    let root = Reader { raw, at: 0 }
        .value()
        .ok_or("Places answered with JSON the herd could not read")?;
    let body = legacy_body(&root, bound)?;
    Ok(StyledWriter::write(&body).into_bytes())
}

/// The whole legacy body for a New answer.
fn legacy_body(root: &Json, bound: usize) -> Result<Legacy, String> {
    let not_new =
        |what: &str| format!("Places answered with JSON that is not a New API answer ({what})");
    let Json::Object(_) = root else {
        return Err(not_new("not an object"));
    };
    let mut body = BTreeMap::new();
    body.insert("html_attributions", Legacy::Array(Vec::new()));
    if let Some(error) = root.get("error") {
        let status = match error.get("status").and_then(Json::as_str) {
            Some("PERMISSION_DENIED" | "UNAUTHENTICATED") => "REQUEST_DENIED",
            Some("RESOURCE_EXHAUSTED") => "OVER_QUERY_LIMIT",
            Some("INVALID_ARGUMENT") => "INVALID_REQUEST",
            _ => "UNKNOWN_ERROR",
        };
        if let Some(message) = error.get("message").and_then(Json::as_str) {
            body.insert("error_message", Legacy::string(message));
        }
        body.insert("results", Legacy::Array(Vec::new()));
        body.insert("status", Legacy::string(status));
        return Ok(Legacy::Object(body));
    }
    let places = match root.get("places") {
        None => &[][..],
        Some(Json::Array(places)) => places,
        Some(_) => return Err(not_new("places is not an array")),
    };
    if places.iter().any(|place| !matches!(place, Json::Object(_))) {
        return Err(not_new("a place is not an object"));
    }
    let results = places.iter().take(bound).map(legacy_result).collect();
    let status = if places.is_empty() {
        "ZERO_RESULTS"
    } else {
        "OK"
    };
    body.insert("results", Legacy::Array(results));
    body.insert("status", Legacy::string(status));
    Ok(Legacy::Object(body))
}

/// One legacy result from one New place, by the table in the module documentation.
fn legacy_result(place: &Json) -> Legacy {
    let text = |key: &str| place.get(key).and_then(Json::as_str);
    let mut r = BTreeMap::new();
    if let Some(status) = text("businessStatus").filter(|s| *s != "BUSINESS_STATUS_UNSPECIFIED") {
        r.insert("business_status", Legacy::string(status));
    }
    let mut geometry = BTreeMap::new();
    if let Some(location) = place.get("location").and_then(lat_lng) {
        geometry.insert("location", location);
    }
    let viewport = place.get("viewport");
    let corner = |key| viewport.and_then(|v| v.get(key)).and_then(lat_lng);
    if let (Some(northeast), Some(southwest)) = (corner("high"), corner("low")) {
        let corners = BTreeMap::from([("northeast", northeast), ("southwest", southwest)]);
        geometry.insert("viewport", Legacy::Object(corners));
    }
    if !geometry.is_empty() {
        r.insert("geometry", Legacy::Object(geometry));
    }
    if let Some(color) = text("iconBackgroundColor") {
        r.insert("icon_background_color", Legacy::string(color));
    }
    if let Some(uri) = text("iconMaskBaseUri") {
        r.insert("icon_mask_base_uri", Legacy::string(uri));
    }
    if let Some(name) = place
        .get("displayName")
        .and_then(|n| n.get("text")?.as_str())
    {
        r.insert("name", Legacy::string(name));
    }
    let open_now = ["currentOpeningHours", "regularOpeningHours"]
        .iter()
        .find_map(|key| place.get(key)?.get("openNow")?.as_bool());
    if let Some(open_now) = open_now {
        let hours = BTreeMap::from([("open_now", Legacy::Scalar(open_now.to_string()))]);
        r.insert("opening_hours", Legacy::Object(hours));
    }
    if let Some(id) = text("id") {
        r.insert("place_id", Legacy::string(id));
        r.insert("reference", Legacy::string(id));
    }
    if let Some(plus) = place.get("plusCode") {
        let mut code = BTreeMap::new();
        for (from, to) in [
            ("compoundCode", "compound_code"),
            ("globalCode", "global_code"),
        ] {
            if let Some(value) = plus.get(from).and_then(Json::as_str) {
                code.insert(to, Legacy::string(value));
            }
        }
        if !code.is_empty() {
            r.insert("plus_code", Legacy::Object(code));
        }
    }
    let price = match text("priceLevel") {
        Some("PRICE_LEVEL_FREE") => Some(0),
        Some("PRICE_LEVEL_INEXPENSIVE") => Some(1),
        Some("PRICE_LEVEL_MODERATE") => Some(2),
        Some("PRICE_LEVEL_EXPENSIVE") => Some(3),
        Some("PRICE_LEVEL_VERY_EXPENSIVE") => Some(4),
        _ => None,
    };
    if let Some(price) = price {
        r.insert("price_level", Legacy::Scalar(price.to_string()));
    }
    if let Some(rating) = place.get("rating").and_then(Json::as_number) {
        r.insert("rating", Legacy::number(rating));
    }
    if let Some(Json::Array(types)) = place.get("types") {
        let types: Option<Vec<Legacy>> = types
            .iter()
            .map(|t| t.as_str().map(Legacy::string))
            .collect();
        if let Some(types) = types {
            r.insert("types", Legacy::Array(types));
        }
    }
    if let Some(count) = place.get("userRatingCount").and_then(Json::as_number) {
        r.insert("user_ratings_total", Legacy::number(count));
    }
    if let Some(vicinity) = text("shortFormattedAddress").or_else(|| text("formattedAddress")) {
        r.insert("vicinity", Legacy::string(vicinity));
    }
    Legacy::Object(r)
}

/// `{"lat", "lng"}` from a New `LatLng`. Its coordinates are plain proto3 doubles, so a
/// coordinate of exactly 0 is left out of the New answer and comes back here as 0.
fn lat_lng(v: &Json) -> Option<Legacy> {
    let Json::Object(_) = v else { return None };
    let coordinate = |key| match v.get(key) {
        None => Some(Legacy::number("0")),
        Some(c) => c.as_number().map(Legacy::number),
    };
    let (lat, lng) = (coordinate("latitude")?, coordinate("longitude")?);
    Some(Legacy::Object(BTreeMap::from([("lat", lat), ("lng", lng)])))
}

/// A JSON value of the New answer, numbers kept as the text Google wrote.
#[derive(Debug)]
enum Json<'a> {
    /// A number, `true`, `false` or `null`, exactly as written.
    Literal(&'a str),
    /// A string, unescaped.
    Str(String),
    Array(Vec<Json<'a>>),
    /// Members in the order written; [`Json::get`] finds the last of duplicate keys, as both
    /// serde_json and Python's `json` do.
    Object(Vec<(String, Json<'a>)>),
}

impl<'a> Json<'a> {
    fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(members) => members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The text of a number.
    fn as_number(&self) -> Option<&'a str> {
        match *self {
            Json::Literal(text) if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) => {
                Some(text)
            }
            _ => None,
        }
    }

    fn as_bool(&self) -> Option<bool> {
        match *self {
            Json::Literal("true") => Some(true),
            Json::Literal("false") => Some(false),
            _ => None,
        }
    }
}

/// A reader of JSON that serde_json has already accepted, so it only finds boundaries: every
/// `None` is unreachable in practice. Its recursion is as deep as the document, which
/// serde_json's recursion limit (128) has bounded.
struct Reader<'a> {
    raw: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn value(&mut self) -> Option<Json<'a>> {
        self.skip_space();
        match *self.raw.get(self.at)? {
            b'{' => {
                self.at += 1;
                let mut members = Vec::new();
                while self.more(b'}')? {
                    let key = self.string()?;
                    self.skip_space();
                    self.at += 1; // the ':'
                    members.push((key, self.value()?));
                }
                Some(Json::Object(members))
            }
            b'[' => {
                self.at += 1;
                let mut items = Vec::new();
                while self.more(b']')? {
                    items.push(self.value()?);
                }
                Some(Json::Array(items))
            }
            b'"' => self.string().map(Json::Str),
            _ => {
                let start = self.at;
                while !matches!(
                    self.raw.get(self.at),
                    None | Some(b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r')
                ) {
                    self.at += 1;
                }
                std::str::from_utf8(&self.raw[start..self.at])
                    .ok()
                    .map(Json::Literal)
            }
        }
    }

    /// Says whether another item of a container follows, stepping over the `,` before it or
    /// over the container's closing `close`.
    fn more(&mut self, close: u8) -> Option<bool> {
        self.skip_space();
        let b = *self.raw.get(self.at)?;
        if b == close || b == b',' {
            self.at += 1;
        }
        Some(b != close)
    }

    /// The string at the cursor, unescaped by serde_json.
    fn string(&mut self) -> Option<String> {
        self.skip_space();
        let start = self.at;
        self.at += 1;
        loop {
            match *self.raw.get(self.at)? {
                b'\\' => self.at += 2,
                b'"' => break,
                _ => self.at += 1,
            }
        }
        self.at += 1;
        serde_json::from_slice(&self.raw[start..self.at]).ok()
    }

    fn skip_space(&mut self) {
        while matches!(self.raw.get(self.at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }
}

/// A legacy body before it is written. Scalars hold their finished text; objects are
/// `BTreeMap`s because the legacy writer sorts keys (byte order, which for UTF-8 is code point
/// order, as JsonCpp's `std::map` and the fixtures' Python writer sort).
#[derive(Debug)]
enum Legacy {
    Scalar(String),
    Array(Vec<Legacy>),
    Object(BTreeMap<&'static str, Legacy>),
}

impl Legacy {
    fn string(s: &str) -> Legacy {
        let mut text = String::with_capacity(s.len() + 2);
        write_string(&mut text, s);
        Legacy::Scalar(text)
    }

    fn number(text: &str) -> Legacy {
        Legacy::Scalar(number_text(text))
    }
}

/// The legacy writer's text for a JSON number written as `text`. An integer literal stays as
/// written (`-0` becomes `0`). Any other number is a double: a whole one below 10^15 in size is
/// written as an integer (a rating of 4.0 is `4`), the rest with [`format_g16`].
fn number_text(text: &str) -> String {
    if !text.contains(['.', 'e', 'E']) {
        return if text == "-0" {
            "0".to_owned()
        } else {
            text.to_owned()
        };
    }
    match text.parse::<f64>() {
        // Exact: the magnitude is below 10^15, well inside both i64 and f64's integers.
        Ok(v) if v.fract() == 0.0 && v.abs() < 1e15 => (v as i64).to_string(),
        Ok(v) => format_g16(v),
        Err(_) => text.to_owned(),
    }
}

/// C's `printf("%.16g", v)`: 16 significant digits, trailing zeros dropped, exponent form
/// (`1e+16`, `1e-05`) when the decimal exponent is below -4 or at least 16.
fn format_g16(v: f64) -> String {
    if !v.is_finite() {
        let text = if v.is_nan() {
            "nan"
        } else if v > 0.0 {
            "inf"
        } else {
            "-inf"
        };
        return text.to_owned();
    }
    // Rust rounds `{:.15e}` exactly, ties to even, as glibc's printf does; its exponent is
    // the one after rounding (9.9999999999999999e15 is 1.000000000000000e16), as %g needs.
    let sci = format!("{v:.15e}");
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let mut out = String::from(sign);
    if !(-4..16).contains(&exponent) {
        out.push_str(mantissa.trim_end_matches('0').trim_end_matches('.'));
        let _ = write!(
            out,
            "e{}{:02}",
            if exponent < 0 { '-' } else { '+' },
            exponent.abs()
        );
        return out;
    }
    // Fixed notation: the significant digits (none for zero) around the decimal point.
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let digits = digits.trim_end_matches('0');
    if exponent < 0 {
        out.push_str("0.");
        out.push_str(&"0".repeat((-exponent - 1) as usize));
        out.push_str(digits);
    } else {
        let whole = exponent as usize + 1;
        if digits.len() <= whole {
            out.push_str(digits);
            out.push_str(&"0".repeat(whole - digits.len()));
        } else {
            out.push_str(&digits[..whole]);
            out.push('.');
            out.push_str(&digits[whole..]);
        }
    }
    out
}

/// A string as Google's legacy service escapes it: JSON's short escapes, other control
/// characters as `\u00XX`, `<` and `>` as `\u003c` and `\u003e` (so a body is safe inside
/// HTML), and everything else, `/`, `&` and non-ASCII included, as is.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c < ' ' || c == '<' || c == '>' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// JsonCpp's limit on the width of an inline array, `[ ` and ` ]` included.
const RIGHT_MARGIN: usize = 74;
/// JsonCpp's indent step.
const INDENT: &str = "   ";

/// JsonCpp's `StyledWriter`, the layout of Google's legacy service. Every line break comes from
/// [`StyledWriter::indent`], which looks at what was written last: after `" : "` it adds
/// nothing (a container opens on the key's line), otherwise a newline and the indent.
struct StyledWriter {
    doc: String,
    indent: String,
}

impl StyledWriter {
    fn write(root: &Legacy) -> String {
        let mut w = StyledWriter {
            doc: String::new(),
            indent: String::new(),
        };
        w.value(root);
        w.doc.push('\n');
        w.doc
    }

    fn value(&mut self, value: &Legacy) {
        match value {
            Legacy::Scalar(text) => self.doc.push_str(text),
            Legacy::Object(members) if members.is_empty() => self.doc.push_str("{}"),
            Legacy::Array(items) if items.is_empty() => self.doc.push_str("[]"),
            Legacy::Object(members) => {
                self.indent();
                self.doc.push('{');
                self.indent.push_str(INDENT);
                for (i, (key, member)) in members.iter().enumerate() {
                    self.indent();
                    write_string(&mut self.doc, key);
                    self.doc.push_str(" : ");
                    self.value(member);
                    if i + 1 < members.len() {
                        self.doc.push(',');
                    }
                }
                self.indent.truncate(self.indent.len() - INDENT.len());
                self.indent();
                self.doc.push('}');
            }
            Legacy::Array(items) => {
                if let Some(inline) = inline_array(items) {
                    self.doc.push_str(&inline);
                    return;
                }
                self.indent();
                self.doc.push('[');
                self.indent.push_str(INDENT);
                for (i, item) in items.iter().enumerate() {
                    self.indent();
                    self.value(item);
                    if i + 1 < items.len() {
                        self.doc.push(',');
                    }
                }
                self.indent.truncate(self.indent.len() - INDENT.len());
                self.indent();
                self.doc.push(']');
            }
        }
    }

    /// Starts a line at the current indent, unless the line is already started by a key.
    fn indent(&mut self) {
        match self.doc.chars().last() {
            None => {}
            Some(' ') => return,
            Some('\n') => {}
            Some(_) => self.doc.push('\n'),
        }
        self.doc.push_str(&self.indent);
    }
}

/// `[ a, b ]` when an array fits on one line: fewer than 25 items, none a non-empty container,
/// and the text narrower than [`RIGHT_MARGIN`]. Width is counted in characters, as the
/// fixtures' Python writer counts (JsonCpp counts bytes; Google's `types` are ASCII).
fn inline_array(items: &[Legacy]) -> Option<String> {
    if items.len() * 3 >= RIGHT_MARGIN {
        return None;
    }
    let texts: Vec<&str> = items
        .iter()
        .map(|item| match item {
            Legacy::Scalar(text) => Some(text.as_str()),
            Legacy::Array(a) if a.is_empty() => Some("[]"),
            Legacy::Object(o) if o.is_empty() => Some("{}"),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let width = 4 + (texts.len() - 1) * 2 + texts.iter().map(|t| t.chars().count()).sum::<usize>();
    (width < RIGHT_MARGIN).then(|| format!("[ {} ]", texts.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A file under the crate's directory, such as `tests/data/...`.
    fn read(path: &str) -> Vec<u8> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
    }

    fn fixture(name: &str) -> Vec<u8> {
        read(&format!("tests/data/places/{name}"))
    }

    /// Compares as text so that a failure shows both bodies.
    fn assert_body(got: Result<Vec<u8>, String>, want: &[u8]) {
        let got = String::from_utf8(got.expect("a body")).expect("UTF-8");
        assert_eq!(got, String::from_utf8_lossy(want));
    }

    #[test]
    fn new_ok_5_cut_to_each_bound() {
        let raw = fixture("new_ok_5.json");
        for bound in [0, 1, 3, 5] {
            let want = read(&format!("tests/data/new_as_legacy_{bound}.json"));
            assert_body(new_to_legacy(&raw, bound), &want);
        }
        let all = read("tests/data/new_as_legacy_5.json");
        assert_body(new_to_legacy(&raw, 20), &all);
    }

    #[test]
    fn every_mapped_field() {
        let raw = read("tests/data/new_as_legacy_full_input.json");
        let want = read("tests/data/new_as_legacy_full.json");
        assert_body(new_to_legacy(&raw, 20), &want);
    }

    #[test]
    fn errors_become_legacy_error_bodies() {
        let want = read("tests/data/new_as_legacy_error_403.json");
        assert_body(new_to_legacy(&fixture("new_error_403.json"), 5), &want);
        let cases = [
            ("PERMISSION_DENIED", "REQUEST_DENIED"),
            ("UNAUTHENTICATED", "REQUEST_DENIED"),
            ("RESOURCE_EXHAUSTED", "OVER_QUERY_LIMIT"),
            ("INVALID_ARGUMENT", "INVALID_REQUEST"),
            ("INTERNAL", "UNKNOWN_ERROR"),
            ("", "UNKNOWN_ERROR"),
        ];
        for (new, legacy) in cases {
            let raw =
                format!(r#"{{"error": {{"code": 4, "message": "<m> é", "status": "{new}"}}}}"#);
            let want = format!(
                "{{\n   \"error_message\" : \"\\u003cm\\u003e é\",\n   \"html_attributions\" : [],\n   \"results\" : [],\n   \"status\" : \"{legacy}\"\n}}\n"
            );
            assert_body(new_to_legacy(raw.as_bytes(), 5), want.as_bytes());
        }
        // No message, no status: Google's own UNKNOWN_ERROR body.
        let unknown = fixture("legacy_unknown_error.json");
        assert_body(new_to_legacy(br#"{"error": {"code": 500}}"#, 5), &unknown);
        assert_body(new_to_legacy(br#"{"error": null}"#, 5), &unknown);
    }

    #[test]
    fn no_places_is_zero_results() {
        let zero = fixture("legacy_zero_results.json");
        assert_body(new_to_legacy(b"{}", 5), &zero);
        assert_body(new_to_legacy(b"{\"places\": []}\n", 0), &zero);
    }

    #[test]
    fn what_is_not_a_new_answer_is_an_error() {
        for raw in [
            &b"<html>"[..],
            b"",
            b"[]",
            b"{\"places\": {}}",
            b"{\"places\": [1]}",
            b"{\"places\": [{}, 1]}",
            b"{\"a\": 1} x",
        ] {
            assert!(new_to_legacy(raw, 5).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn numbers_keep_the_double_google_wrote() {
        // serde_json's default parser reads this as 99.857052300000006: one unit in the last
        // place off, which %.16g shows.
        let raw = br#"{"places": [{"location": {"latitude": 99.857052299999992, "longitude": -0}, "rating": 4.0, "userRatingCount": 12345678901234567890123}]}"#;
        let want = "{\n   \"html_attributions\" : [],\n   \"results\" : [\n      {\n         \"geometry\" : {\n            \"location\" : {\n               \"lat\" : 99.85705229999999,\n               \"lng\" : 0\n            }\n         },\n         \"rating\" : 4,\n         \"user_ratings_total\" : 12345678901234567890123\n      }\n   ],\n   \"status\" : \"OK\"\n}\n";
        assert_body(new_to_legacy(raw, 1), want.as_bytes());
    }

    #[test]
    fn number_text_follows_the_legacy_writer() {
        let cases = [
            ("4", "4"),
            ("-0", "0"),
            ("0", "0"),
            ("4.0", "4"),
            ("-0.0", "0"),
            ("1e2", "100"),
            ("4.6", "4.6"),
            ("999999999999999.0", "999999999999999"),
            ("1e15", "1000000000000000"),
            ("1e16", "1e+16"),
            ("12345678901234567890", "12345678901234567890"),
            ("-118.44688029999999", "-118.4468803"),
            ("1.2300000000000001E-05", "1.23e-05"),
        ];
        for (text, want) in cases {
            assert_eq!(number_text(text), want, "{text}");
        }
    }

    /// Python's `'%.16g' % v` for each value.
    #[test]
    #[allow(clippy::excessive_precision)] // the literals are written as the New API writes them
    fn g16_matches_c() {
        let cases = [
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (123456789012345678.0, "1.234567890123457e+17"),
            (4.0, "4"),
            (-118.44688029999999, "-118.4468803"),
            (34.068903099999998, "34.0689031"),
            (1e16, "1e+16"),
            (5e-324, "4.940656458412465e-324"),
            (0.0, "0"),
            (-0.0, "-0"),
            (1.0, "1"),
            (-1.5, "-1.5"),
            (0.0001, "0.0001"),
            (0.00012345678901234567, "0.0001234567890123457"),
            (9.999999999999999e-5, "9.999999999999999e-05"),
            (1e15, "1000000000000000"),
            (999999999999999.9, "999999999999999.9"),
            (9999999999999998.0, "9999999999999998"),
            (9999999999999999.0, "1e+16"),
            (1e22, "1e+22"),
            (1.7976931348623157e308, "1.797693134862316e+308"),
            (2.2250738585072014e-308, "2.225073858507201e-308"),
            // Exact ties at the 17th digit round to even, as in C.
            (1125899906842624.5, "1125899906842624"),
            (1125899906842625.5, "1125899906842626"),
            (0.3, "0.3"),
            (2.0 / 3.0, "0.6666666666666666"),
            (34.069941199999995, "34.0699412"),
            (99.857052299999992, "99.85705229999999"),
            (-122.29099629999999, "-122.2909963"),
            (4.6, "4.6"),
            (1234567.0, "1234567"),
            (12345678901234567.0, "1.234567890123457e+16"),
            (1.0000000000000002, "1"),
            (100.0, "100"),
            (1e100, "1e+100"),
            (-1e-100, "-1e-100"),
            (0.5, "0.5"),
            (123.456, "123.456"),
            (f64::INFINITY, "inf"),
            (f64::NAN, "nan"),
        ];
        for (v, want) in cases {
            assert_eq!(format_g16(v), want, "{v:e}");
        }
    }

    /// The fixtures' `legacy_str` for each string.
    #[test]
    fn strings_escape_as_google_does() {
        let cases = [
            ("plain", r#""plain""#),
            (
                r#"quote " backslash \ slash / amp &"#,
                r#""quote \" backslash \\ slash / amp &""#,
            ),
            (
                r#"<a href="x">y</a>"#,
                r#""\u003ca href=\"x\"\u003ey\u003c/a\u003e""#,
            ),
            ("tab\tnl\ncr\rbs\u{8}ff\u{c}", r#""tab\tnl\ncr\rbs\bff\f""#),
            ("\u{0}\u{1}\u{1f}\u{7f}", "\"\\u0000\\u0001\\u001f\u{7f}\""),
            (
                "Café Lumière 月 🥞 \u{2028}",
                "\"Café Lumière 月 🥞 \u{2028}\"",
            ),
        ];
        for (s, want) in cases {
            assert_eq!(Legacy::string(s).text(), want);
        }
    }

    /// Each expected text is the fixtures' `legacy_dumps` of the same value.
    #[test]
    fn layout_is_jsoncpps() {
        let strings = |s: &[&str]| Legacy::Array(s.iter().map(|s| Legacy::string(s)).collect());
        let ints =
            |n: usize| Legacy::Array((0..n).map(|i| Legacy::Scalar(i.to_string())).collect());
        let object =
            |members: Vec<(&'static str, Legacy)>| Legacy::Object(members.into_iter().collect());
        let x67 = "x".repeat(67);
        let x68 = "x".repeat(68);
        let e67 = "é".repeat(67);
        let cases = [
            // 73 characters wide stays inline, 74 does not.
            (
                object(vec![("a", strings(&[&x67]))]),
                format!("{{\n   \"a\" : [ \"{x67}\" ]\n}}\n"),
            ),
            (
                object(vec![("a", strings(&[&x68]))]),
                format!("{{\n   \"a\" : [\n      \"{x68}\"\n   ]\n}}\n"),
            ),
            (
                object(vec![("a", strings(&[&e67]))]),
                format!("{{\n   \"a\" : [ \"{e67}\" ]\n}}\n"),
            ),
            (
                object(vec![("a", ints(3))]),
                "{\n   \"a\" : [ 0, 1, 2 ]\n}\n".to_owned(),
            ),
            (
                object(vec![("a", ints(25))]),
                format!(
                    "{{\n   \"a\" : [\n{}\n   ]\n}}\n",
                    (0..25).map(|i| format!("      {i}")).collect::<Vec<_>>().join(",\n")
                ),
            ),
            (
                object(vec![(
                    "a",
                    Legacy::Array(vec![
                        Legacy::Array(vec![]),
                        Legacy::Object(BTreeMap::new()),
                        Legacy::Scalar("1".into()),
                    ]),
                )]),
                "{\n   \"a\" : [ [], {}, 1 ]\n}\n".to_owned(),
            ),
            (
                object(vec![
                    (
                        "a",
                        Legacy::Array(vec![
                            object(vec![("b", Legacy::Scalar("1".into()))]),
                            Legacy::Array(vec![
                                Legacy::Scalar("2".into()),
                                Legacy::Array(vec![Legacy::Scalar("3".into())]),
                            ]),
                        ]),
                    ),
                    ("d", object(vec![("e", Legacy::Array(vec![]))])),
                    ("c", Legacy::Object(BTreeMap::new())),
                ]),
                "{\n   \"a\" : [\n      {\n         \"b\" : 1\n      },\n      [\n         2,\n         [ 3 ]\n      ]\n   ],\n   \"c\" : {},\n   \"d\" : {\n      \"e\" : []\n   }\n}\n".to_owned(),
            ),
        ];
        for (value, want) in cases {
            assert_eq!(StyledWriter::write(&value), want);
        }
    }

    impl Legacy {
        fn text(&self) -> &str {
            match self {
                Legacy::Scalar(text) => text,
                _ => panic!("not a scalar"),
            }
        }
    }
}
