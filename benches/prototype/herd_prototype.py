#!/usr/bin/env python3
"""A Python asyncio prototype of one herd server: the baseline the Rust herd is measured against.

    python3 benches/prototype/herd_prototype.py NAME [--config PATH]

It reads the same ``herd.toml`` as the Rust server (default: ``herd.toml`` in the current
directory), speaks the same protocol byte for byte (``docs/protocol.md``), uses the same peer-link
greeting and framing and writes the same log format (``README.md``). It is one file, standard
library only (Python 3.11), and uses ``uvloop`` when it is installed.

How it maps to docs/protocol.md
-------------------------------
* Section 2 (lines, white space): ``Connection._process`` splits on ``\\n`` only and works on
  bytes; ``bytes.split()`` with no argument splits on exactly the six white-space bytes of the
  protocol (space, ``\\t \\n \\v \\f \\r``). A last line without ``\\n`` before end of stream is
  a command. Replies leave in command order: a WHATSAT that waits on Places holds a slot in a
  per-connection queue and every later reply queues behind it. On half-close the pending
  replies are finished, then the connection is closed.
* Sections 3 (IAMAT), 4 (WHATSAT) and 6 (invalid): the pure functions under "Protocol" below.
  Every range check is exact decimal arithmetic on the digits, times are integer nanoseconds.
* Section 3, "Which record wins": ``Herd.merge`` compares ``(time_ns, line)`` tuples.
* Section 4, "Talking to Places": ``Places`` writes HTTP/1.1 by hand over asyncio streams with
  TLS from ``ssl``, keeps a small keep-alive pool, reads Content-Length, chunked and
  read-to-close bodies, and cuts ``results``/``places`` by splicing the raw text (``cut_body``).
* Section 5 (peers), README "Peer links": each server dials each neighbour (``Link``), greets
  with ``PEER herd/1 NAME``, sends its whole store, then floods new records on that connection.
  The accepted side of a link never writes; a connection whose first line is such a greeting
  from a configured neighbour is a peer (``Connection`` in peer mode).
* Section 7 (limits), README "Configuration reference": every ``[limits]`` key is honoured with
  the README's meaning and default.
* Section 8, README "Logs": ``Log`` buffers event lines and writes them once per turn of the
  event loop (``call_soon`` batching); client bytes are escaped (``\\n``, ``\\\\``, ``\\xNN``).
* Section 9: SIGTERM/SIGINT stop accepting, flush the log and exit 0; bad configuration exits 2.

``check_prototype.py`` beside this file checks all of the above black-box (a fake HTTPS Places
with a throw-away CA, single servers, and the five-server herd of ``herd.toml``).

Why Protocols for the listening side
------------------------------------
Client and inbound peer connections use ``asyncio.Protocol``: a line server does almost no
waiting per line, and the callback style avoids the per-connection task, the StreamReader buffer
copy and the coroutine switch per ``readline()`` that streams cost; ``data_received`` also hands
over everything that arrived together, so pipelined commands are answered with one ``write``.
The places where the code genuinely *waits* -- dialling a neighbour with backoff, and an HTTPS
request to Places -- read best as coroutines, so they use streams (``open_connection``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import ssl
import sys
import time
import tomllib
import urllib.parse
from collections import deque
from dataclasses import dataclass
from pathlib import Path

try:  # Optional: a faster event loop, used when installed.
    import uvloop
except ImportError:
    uvloop = None


# --------------------------------------------------------------------------------------------
# Protocol: pure functions on bytes (docs/protocol.md sections 2-6)
# --------------------------------------------------------------------------------------------

# In a bytes pattern \d is exactly [0-9]. Patterns are used with fullmatch().
_DECIMAL = re.compile(rb"(\d+)(?:\.(\d+))?")
_LOCATION = re.compile(rb"([+-])(\d+)(?:\.(\d+))?([+-])(\d+)(?:\.(\d+))?")
_DIFF = re.compile(rb"[+-]\d+\.\d{9}")
_DIGITS = re.compile(rb"\d+")

NS_PER_S = 1_000_000_000
# Client times are kept as signed 128-bit nanoseconds by the Rust herd; a time beyond that is
# invalid there, and so it is here (it also keeps int() away from absurdly long digit strings).
_MAX_TIME_NS = (1 << 127) - 1


def _at_most(int_digits: bytes, frac_digits: bytes | None, limit: int) -> bool:
    """Whether the decimal ``int_digits.frac_digits`` is <= ``limit``, compared exactly."""
    digits = int_digits.lstrip(b"0")
    if len(digits) > 3:  # every limit here (50, 90, 180) has at most three digits
        return False
    value = int(digits or b"0")
    return value < limit or (value == limit and not (frac_digits or b"").strip(b"0"))


def _plain(sign: bytes, int_digits: bytes, frac_digits: bytes | None) -> str:
    """A coordinate as a query value / JSON number: no '+' (it decodes as a space in a query
    string), no leading zeros (JSON forbids them), the digits otherwise as the client sent."""
    text = ("-" if sign == b"-" else "") + (int_digits.lstrip(b"0") or b"0").decode()
    return text + "." + frac_digits.decode() if frac_digits else text


def parse_location(text: bytes) -> tuple[str, str] | None:
    """``[+-]D[.D][+-]D[.D]``, latitude in [-90, 90], longitude in [-180, 180] (exactly).
    Returns the plain (latitude, longitude) texts, or None when invalid."""
    m = _LOCATION.fullmatch(text)
    if m is None:
        return None
    lat_sign, lat_int, lat_frac, lng_sign, lng_int, lng_frac = m.groups()
    if not (_at_most(lat_int, lat_frac, 90) and _at_most(lng_int, lng_frac, 180)):
        return None
    return _plain(lat_sign, lat_int, lat_frac), _plain(lng_sign, lng_int, lng_frac)


def parse_time_ns(text: bytes) -> int | None:
    """POSIX seconds ``D[.D]`` as integer nanoseconds; fraction digits past nine truncated."""
    m = _DECIMAL.fullmatch(text)
    if m is None:
        return None
    secs, frac = m.groups()
    secs = secs.lstrip(b"0")
    if len(secs) > 30:
        return None
    ns = int(secs or b"0") * NS_PER_S + int((frac or b"")[:9].ljust(9, b"0"))
    return ns if ns <= _MAX_TIME_NS else None


def parse_radius_m(text: bytes) -> str | None:
    """A radius in km, ``D[.D]`` in (0, 50], as metres in exact decimal text: the decimal point
    moves three places right (10 -> 10000, 1.5 -> 1500, 0.0001 -> 0.1)."""
    m = _DECIMAL.fullmatch(text)
    if m is None:
        return None
    int_digits, frac = m.group(1), m.group(2) or b""
    if not (int_digits + frac).strip(b"0") or not _at_most(int_digits, frac, 50):
        return None
    metres = (int_digits + frac[:3].ljust(3, b"0")).lstrip(b"0") or b"0"
    rest = frac[3:].rstrip(b"0")
    return (metres + b"." + rest if rest else metres).decode()


def parse_bound(text: bytes) -> int | None:
    """An integer from 0 to 20 (leading zeros allowed)."""
    if _DIGITS.fullmatch(text) is None:
        return None
    digits = text.lstrip(b"0")
    if len(digits) > 2:
        return None
    value = int(digits or b"0")
    return value if value <= 20 else None


def format_diff(ns: int) -> bytes:
    """Signed seconds with exactly nine decimals: ``+0.263873386``, ``-12.000000001``."""
    secs, frac = divmod(abs(ns), NS_PER_S)
    return b"%s%d.%09d" % (b"+" if ns >= 0 else b"-", secs, frac)


def parse_at_record(line: bytes) -> tuple[bytes, int] | None:
    """Validates an AT record from a peer: ``AT SERVER DIFF CLIENT LOCATION TIME`` with single
    spaces. It is stored and re-sent byte for byte, so anything looser is refused, not repaired.
    Returns (client, time_ns)."""
    fields = line.split(b" ")
    if len(fields) != 6 or fields != line.split() or fields[0] != b"AT":
        return None  # (the second test rejects empty fields and any other white space)
    if _DIFF.fullmatch(fields[2]) is None or parse_location(fields[4]) is None:
        return None
    time_ns = parse_time_ns(fields[5])
    return None if time_ns is None else (fields[3], time_ns)


def greeting_name(fields: list[bytes]) -> bytes | None:
    """The sender's name if the (split) line is the peer greeting ``PEER herd/1 NAME``."""
    if len(fields) == 3 and fields[0] == b"PEER" and fields[1] == b"herd/1":
        return fields[2]
    return None


# --------------------------------------------------------------------------------------------
# Places bodies: cut the results array by splicing the raw text (docs/protocol.md section 4)
# --------------------------------------------------------------------------------------------

_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON = json.JSONDecoder()
_NEWLINES = re.compile(r"\n{2,}")


class NotJson(ValueError):
    pass


def _skip(text: str, i: int) -> int:
    return _JSON_SPACE.match(text, i).end()


def _scan_array(text: str, i: int) -> tuple[list[tuple[int, int]], int, int, int]:
    """The array starting at text[i] == '['. Returns (element spans, index of '[', index of ']',
    index after ']'). Each element is scanned (and validated) by the C JSON scanner."""
    open_at, i, spans = i, _skip(text, i + 1), []
    if text.startswith("]", i):
        return spans, open_at, i, i + 1
    while True:
        start = i
        _, i = _JSON.raw_decode(text, i)
        spans.append((start, i))
        i = _skip(text, i)
        if text.startswith("]", i):
            return spans, open_at, i, i + 1
        if not text.startswith(",", i):
            raise NotJson(f"expected ',' or ']' at offset {i}")
        i = _skip(text, i + 1)


def _scan_object(text: str, array_key: str) -> tuple[dict, tuple | None]:
    """Walks a top-level JSON object member by member. Returns the members (except the array
    under ``array_key``) and that array's spans, or raises NotJson. The whole text is
    validated on the way, so no separate json.loads() is needed."""
    i = _skip(text, 0)
    if not text.startswith("{", i):
        raise NotJson("not an object")
    members: dict = {}
    array = None
    i = _skip(text, i + 1)
    if text.startswith("}", i):
        i += 1
    else:
        while True:
            name, i = _JSON.raw_decode(text, i)
            if not isinstance(name, str):
                raise NotJson(f"expected a member name at offset {i}")
            i = _skip(text, i)
            if not text.startswith(":", i):
                raise NotJson(f"expected ':' at offset {i}")
            i = _skip(text, i + 1)
            if name == array_key and text.startswith("[", i):
                *array, i = _scan_array(text, i)
            else:
                members[name], i = _JSON.raw_decode(text, i)
            i = _skip(text, i)
            if text.startswith("}", i):
                i += 1
                break
            if not text.startswith(",", i):
                raise NotJson(f"expected ',' or '}}' at offset {i}")
            i = _skip(text, i + 1)
    if _skip(text, i) != len(text):
        raise NotJson(f"extra data at offset {i}")
    return members, array


def cut_body(raw: bytes, api: str, bound: int) -> tuple[str, bytes]:
    """Google's raw body -> (status, reply body). The array (``results`` for the legacy API,
    ``places`` for the new one) keeps its first ``bound`` elements; every other byte is Google's.
    Then runs of newlines become one and trailing newlines go. Raises NotJson."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise NotJson("not UTF-8") from None
    try:
        members, array = _scan_object(text, "results" if api == "legacy" else "places")
    except (ValueError, RecursionError):  # NotJson, json.JSONDecodeError, absurd nesting
        try:  # valid JSON that is not an object is relayed as it is
            json.loads(text)
        except (ValueError, RecursionError) as e:
            raise NotJson(str(e) or type(e).__name__) from None
        members, array = {}, None
    if api == "legacy":
        status = members.get("status")
        status = status if isinstance(status, str) else ""
    else:
        error = members.get("error")
        status = str(error.get("status", "ERROR")) if isinstance(error, dict) else "OK"
    if array is not None:
        spans, open_at, close_at = array
        if len(spans) > bound:
            if bound == 0:  # both Google styles write an empty array as []
                text = text[: open_at + 1] + text[close_at:]
            else:  # keep what stood between the last element and ']': Google's layout
                text = text[: spans[bound - 1][1]] + text[spans[-1][1]:]
    return status, _NEWLINES.sub("\n", text).rstrip("\n").encode("utf-8")


def error_body(status: str, message: str) -> bytes:
    """A body in Google's error vocabulary, for when Places gave no usable answer."""
    return (
        '{"html_attributions" : [], "results" : [], "status" : "%s", "error_message" : %s}'
        % (status, json.dumps(message, ensure_ascii=False))
    ).encode("utf-8")


NO_KEY_BODY = error_body(
    "REQUEST_DENIED",
    "This server has no Google Places API key: set GOOGLE_PLACES_API_KEY or places.key_file.",
)


# --------------------------------------------------------------------------------------------
# Configuration (README.md, "Configuration reference")
# --------------------------------------------------------------------------------------------

DEFAULT_URLS = {
    "legacy": "https://maps.googleapis.com/maps/api/place/nearbysearch/json",
    "new": "https://places.googleapis.com/v1/places:searchNearby",
}
DEFAULT_FIELD_MASK = (
    "places.id,places.displayName,places.formattedAddress,places.location,places.types,"
    "places.rating,places.userRatingCount,places.businessStatus"
)


class ConfigError(Exception):
    pass


@dataclass
class ServerEntry:
    name: str
    host: str
    port: int
    neighbors: list[str]


@dataclass
class Config:
    me: ServerEntry
    servers: dict[str, ServerEntry]
    log_path: Path
    api: str
    url: urllib.parse.SplitResult
    tls: ssl.SSLContext
    key: str | None
    timeout_ms: int
    pool_size: int
    max_body_bytes: int
    field_mask: str
    max_line_bytes: int
    idle_timeout_ms: int
    client_output_bytes: int
    pending_replies: int
    max_connections: int
    peer_output_bytes: int


def _get(table: dict, key: str, kind: type, default, where: str):
    value = table.get(key, default)
    if value is None and default is None:
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}{key} must be an integer")
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{where}{key} must be a string")
    if kind is int and value < 0:
        raise ConfigError(f"{where}{key} must not be negative")
    return value


def load_config(path: Path, name: str) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    base = path.parent

    servers: dict[str, ServerEntry] = {}
    ports: set[tuple[str, int]] = set()
    entries = data.get("server", [])
    if not isinstance(entries, list) or not all(isinstance(s, dict) for s in entries):
        raise ConfigError("servers must be given as [[server]] tables")
    for i, s in enumerate(entries):
        where = f"server[{i}]."
        sname = _get(s, "name", str, None, where)
        if not sname or any(c.isspace() for c in sname):
            raise ConfigError(f"{where}name is required and must not contain white space")
        if sname in servers:
            raise ConfigError(f"server {sname} is configured twice")
        port = _get(s, "port", int, None, where)
        if port is None or port > 65535:
            raise ConfigError(f"{where}port is required and must be 0..65535")
        host = _get(s, "host", str, "127.0.0.1", where)
        neighbors = s.get("neighbors", [])
        if not isinstance(neighbors, list) or not all(isinstance(n, str) for n in neighbors):
            raise ConfigError(f"{where}neighbors must be a list of names")
        if port and (host, port) in ports:
            raise ConfigError(f"two servers listen on {host}:{port}")
        ports.add((host, port))
        servers[sname] = ServerEntry(sname, host, port, list(dict.fromkeys(neighbors)))
    for s in servers.values():
        for n in s.neighbors:
            if n not in servers or n == s.name:
                raise ConfigError(f"server {s.name} names an unknown neighbour {n!r}")
            if s.name not in servers[n].neighbors:
                raise ConfigError(f"link {s.name}-{n} must be named on both sides")
    if name not in servers:
        raise ConfigError(f"no server named {name!r} in {path}")

    places = data.get("places", {})
    api = _get(places, "api", str, "legacy", "places.")
    if api not in DEFAULT_URLS:
        raise ConfigError('places.api must be "legacy" or "new"')
    url = urllib.parse.urlsplit(_get(places, "url", str, DEFAULT_URLS[api], "places."))
    if url.scheme != "https" or not url.hostname:
        raise ConfigError("places.url must be https://host[:port]/path")
    ca_file = _get(places, "ca_file", str, None, "places.")
    key_file = _get(places, "key_file", str, None, "places.")
    key = os.environ.get("GOOGLE_PLACES_API_KEY") or None
    if key is None and key_file:
        try:
            key = (base / key_file).read_text().strip() or None
        except OSError as e:
            raise ConfigError(f"cannot read places.key_file: {e.strerror}") from None

    tls = ssl.create_default_context()
    if ca_file:  # extra roots on top of the default trust store
        try:
            tls.load_verify_locations(cafile=base / ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load places.ca_file: {e}") from None

    limits = data.get("limits", {})
    return Config(
        me=servers[name],
        servers=servers,
        log_path=base / _get(data, "log_dir", str, "logs", "") / f"{name}.log",
        api=api,
        url=url,
        tls=tls,
        key=key,
        timeout_ms=_get(places, "timeout_ms", int, 5000, "places."),
        pool_size=max(1, _get(places, "pool_size", int, 4, "places.")),
        max_body_bytes=_get(places, "max_body_bytes", int, 1 << 20, "places."),
        field_mask=_get(places, "field_mask", str, DEFAULT_FIELD_MASK, "places."),
        max_line_bytes=_get(limits, "max_line_bytes", int, 4096, "limits."),
        idle_timeout_ms=_get(limits, "idle_timeout_ms", int, 300_000, "limits."),
        client_output_bytes=_get(limits, "client_output_bytes", int, 4 << 20, "limits."),
        pending_replies=max(1, _get(limits, "pending_replies", int, 64, "limits.")),
        max_connections=_get(limits, "max_connections", int, 16384, "limits."),
        peer_output_bytes=_get(limits, "peer_output_bytes", int, 16 << 20, "limits."),
    )


# --------------------------------------------------------------------------------------------
# Log (README.md, "Logs")
# --------------------------------------------------------------------------------------------

_LOG_UNSAFE = re.compile(rb"[^\x20-\x7e]")


def escape(data: bytes) -> str:
    """Client bytes for a log line: backslash and newline as ``\\\\`` and ``\\n``, any other byte
    outside printable ASCII as ``\\xNN``, so a client cannot forge a log line."""
    data = data.replace(b"\\", b"\\\\").replace(b"\n", b"\\n")
    if _LOG_UNSAFE.search(data):
        data = _LOG_UNSAFE.sub(lambda m: b"\\x%02x" % m.group()[0], data)
    return data.decode("ascii")


class Log:
    """Event lines, buffered in memory and written with one write() per turn of the loop."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab", buffering=0)
        self._lines: list[str] = []
        self._scheduled = False
        self._second = -1
        self._prefix = ""

    def __call__(self, event: str) -> None:
        now = time.time_ns()
        second, ns = divmod(now, NS_PER_S)
        if second != self._second:  # formatting the date once per second is plenty
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._lines.append(f"{self._prefix}.{ns // 1000:06d}Z {event}\n")
        if not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._scheduled = True
            except RuntimeError:  # no loop (shutting down): write at once
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if self._lines:
            data = "".join(self._lines).encode()
            self._lines.clear()
            self._file.write(data)

    def close(self) -> None:
        self.flush()
        self._file.close()


# --------------------------------------------------------------------------------------------
# Places client: HTTP/1.1 by hand over TLS streams, with a keep-alive pool
# --------------------------------------------------------------------------------------------


class PlacesError(Exception):
    """Places could not be asked or gave no usable answer; the text goes to the client."""


class _NoAnswer(PlacesError):
    """The connection closed before the first byte of a response (safe to retry once when it
    was an idle keep-alive connection that the server had closed)."""


@dataclass
class Response:
    status: int
    body: bytes
    keep_alive: bool


async def read_response(reader: asyncio.StreamReader, max_body: int) -> Response:
    """Reads one HTTP/1.1 response: Content-Length, chunked or read-to-close body."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise PlacesError("Places closed the connection in the middle of its answer")
            raise _NoAnswer("Places closed the connection without answering") from None
        except asyncio.LimitOverrunError:
            raise PlacesError("Places sent a response head over 64 KiB") from None
        status_line, *header_lines = head[:-4].split(b"\r\n")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise PlacesError("Places sent a malformed HTTP response")
        status = int(parts[1])
        if not 100 <= status < 200:  # skip interim responses (100 Continue)
            break
    headers = {}
    for h in header_lines:
        name, colon, value = h.partition(b":")
        if not colon:
            raise PlacesError("Places sent a malformed HTTP header")
        headers[name.strip().lower()] = value.strip()

    keep_alive = parts[0] == b"HTTP/1.1"
    connection = headers.get(b"connection", b"").lower()
    if b"close" in connection:
        keep_alive = False
    elif b"keep-alive" in connection:
        keep_alive = True
    too_large = PlacesError(f"Places sent a body larger than {max_body} bytes")
    try:
        if status in (204, 304):
            body = b""
        elif headers.get(b"transfer-encoding", b"").lower().endswith(b"chunked"):
            chunks, total = [], 0
            while True:
                size_line = await reader.readuntil(b"\n")
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    size = -1
                if size < 0:
                    raise PlacesError("Places sent a bad chunk size")
                if size == 0:
                    break
                total += size
                if total > max_body:
                    raise too_large
                chunks.append(await reader.readexactly(size))
                if await reader.readexactly(2) != b"\r\n":
                    raise PlacesError("Places sent a chunk without its line end")
            while (await reader.readuntil(b"\n")).strip(b"\r\n"):
                pass  # trailer fields, up to the empty line
            body = b"".join(chunks)
        elif b"content-length" in headers:
            try:
                length = int(headers[b"content-length"])
            except ValueError:
                raise PlacesError("Places sent a bad Content-Length") from None
            if length > max_body:
                raise too_large
            body = await reader.readexactly(length)
        else:  # no framing: the body runs to the end of the stream
            keep_alive = False
            chunks, total = [], 0
            while chunk := await reader.read(65536):
                total += len(chunk)
                if total > max_body:
                    raise too_large
                chunks.append(chunk)
            body = b"".join(chunks)
    except asyncio.IncompleteReadError:
        raise PlacesError("Places closed the connection in the middle of its answer") from None
    except asyncio.LimitOverrunError:
        raise PlacesError("Places sent a chunk line over 64 KiB") from None
    return Response(status, body, keep_alive)


class Places:
    """Asks Google Places (or whatever ``places.url`` names) on behalf of WHATSAT."""

    def __init__(self, cfg: Config, log: Log):
        self.api = cfg.api
        self.host = cfg.url.hostname
        self.port = cfg.url.port or 443
        self.path = cfg.url.path or "/"
        self.host_header = self.host if self.port == 443 else f"{self.host}:{self.port}"
        self.key = cfg.key
        self.field_mask = cfg.field_mask
        self.timeout_ms = cfg.timeout_ms
        self.max_body = cfg.max_body_bytes
        self.tls = cfg.tls
        self.log = log
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(cfg.pool_size)  # at most pool_size connections
        self._ids = itertools.count(1)

    def _request(self, lat: str, lng: str, radius_m: str, bound: int) -> tuple[bytes, str]:
        """The request bytes (key included) and a summary for the log (key left out)."""
        if self.api == "legacy":
            target = f"{self.path}?location={lat},{lng}&radius={radius_m}"
            key = urllib.parse.quote(self.key, safe="")
            request = (
                f"GET {target}&key={key} HTTP/1.1\r\nHost: {self.host_header}\r\n"
                "User-Agent: herd-prototype/1\r\nAccept: application/json\r\n\r\n"
            )
            return request.encode(), f"GET {target}"
        body = (
            '{"locationRestriction":{"circle":{"center":{"latitude":%s,"longitude":%s},'
            '"radius":%s}},"maxResultCount":%d}' % (lat, lng, radius_m, max(bound, 1))
        )
        request = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
            "User-Agent: herd-prototype/1\r\nAccept: application/json\r\n"
            f"Content-Type: application/json\r\nX-Goog-Api-Key: {self.key}\r\n"
            f"X-Goog-FieldMask: {self.field_mask}\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        )
        return request.encode(), f"POST {self.path} {body}"

    async def search(self, lat: str, lng: str, radius_m: str, bound: int, deadline: float) -> bytes:
        """The reply body for one WHATSAT. Never raises (except when cancelled): every failure
        becomes an UNKNOWN_ERROR body. ``deadline`` is in loop time, set when the command
        arrived, and covers waiting for a pooled connection as well."""
        if not self.key:
            self.log("places not asked: no API key")
            return NO_KEY_BODY
        n = next(self._ids)
        request, summary = self._request(lat, lng, radius_m, bound)
        self.log(f"places #{n} {summary}")
        started = time.monotonic()
        try:
            async with asyncio.timeout_at(deadline):
                response = await self._exchange(request)
            status, body = cut_body(response.body, self.api, bound)
        except TimeoutError:
            failure = f"Places did not answer within {self.timeout_ms} ms"
        except NotJson as e:
            failure = f"Places answered with a body that is not JSON ({e})"
        except PlacesError as e:
            failure = str(e)
        except ssl.SSLCertVerificationError as e:
            failure = f"TLS certificate of {self.host} not trusted ({e.verify_message})"
        except ssl.SSLError as e:
            failure = f"TLS with {self.host}:{self.port} failed ({e.reason or e})"
        except ConnectionRefusedError:
            failure = f"could not connect to {self.host}:{self.port} (connection refused)"
        except OSError as e:
            failure = f"could not talk to {self.host}:{self.port} ({e.strerror or e})"
        except Exception as e:  # a bug must not leave the client without its answer
            failure = f"internal error ({type(e).__name__})"
        else:
            ms = round((time.monotonic() - started) * 1000)
            self.log(
                f"places #{n} done: HTTP {response.status}, status {status or '?'}, "
                f"{len(response.body)} bytes in {ms} ms"
            )
            return body
        failure = failure.replace(self.key, "<key>")  # belt and braces: never leak the key
        ms = round((time.monotonic() - started) * 1000)
        self.log(f"places #{n} failed: {failure} after {ms} ms")
        return error_body("UNKNOWN_ERROR", failure)

    async def _exchange(self, request: bytes) -> Response:
        """Sends one request on a pooled (or new) connection and reads the response."""
        async with self._slots:
            while True:
                reused = bool(self._idle)
                if reused:
                    reader, writer = self._idle.pop()
                    if reader.at_eof():  # the server closed it while it was idle
                        writer.close()
                        continue
                else:
                    reader, writer = await asyncio.open_connection(
                        self.host, self.port, ssl=self.tls, server_hostname=self.host
                    )
                keep = False
                try:
                    writer.write(request)
                    response = await read_response(reader, self.max_body)
                    keep = response.keep_alive
                    return response
                except (_NoAnswer, ConnectionResetError, BrokenPipeError):
                    if not reused:
                        raise
                    # A keep-alive connection the server closed as we sent: retry on a new one.
                finally:
                    if keep:
                        self._idle.append((reader, writer))
                    else:  # also on errors and cancellation: its state is unknown
                        writer.close()


# --------------------------------------------------------------------------------------------
# The herd: store, flooding, outbound peer links
# --------------------------------------------------------------------------------------------


def _reason(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    if isinstance(e, OSError):
        return e.strerror or str(e) or type(e).__name__
    return str(e) or type(e).__name__


class Link:
    """The connection this server dials to one neighbour, and only writes on (README "Peer
    links"): greeting, the whole store, then every new record. Redialled with backoff."""

    CONNECT_TIMEOUT = 2.0
    FIRST_RETRY, MAX_RETRY = 0.05, 2.0
    SYNC_BATCH = 64 * 1024  # bytes of store written before waiting for the socket to drain

    def __init__(self, herd: Herd, peer: ServerEntry):
        self.herd = herd
        self.name = peer.name
        self.host, self.port = peer.host, peer.port
        self.writer: asyncio.StreamWriter | None = None  # set while the link is up
        self._drop_reason: str | None = None

    def send(self, line: bytes) -> None:
        """Sends one record if the link is up. A down link drops it: updates are not queued for
        a link that is down, the sync on reconnect repairs it."""
        writer = self.writer
        if writer is None:
            return
        writer.write(line + b"\n")
        self.herd.log(f"link {self.name} > {escape(line)}")
        if writer.transport.get_write_buffer_size() > self.herd.cfg.peer_output_bytes:
            self._drop(f"output over {self.herd.cfg.peer_output_bytes} bytes")

    def _drop(self, reason: str) -> None:
        """Abandons the connection; run() notices, logs and redials (then re-syncs)."""
        if self.writer is not None:
            self._drop_reason = reason
            self.writer.transport.abort()
            self.writer = None

    async def run(self) -> None:
        log = self.herd.log
        delay = self.FIRST_RETRY
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), self.CONNECT_TIMEOUT
                )
            except TimeoutError:
                reason = f"connect timed out after {round(self.CONNECT_TIMEOUT * 1000)} ms"
            except OSError as e:
                reason = _reason(e)
            else:
                delay = self.FIRST_RETRY
                log(f"link {self.name} up to {self.host}:{self.port}")
                self.writer, self._drop_reason = writer, None
                try:
                    greeting = b"PEER herd/1 " + self.herd.name
                    writer.write(greeting + b"\n")
                    log(f"link {self.name} > {escape(greeting)}")
                    await self._sync(writer)
                    reason = await self._watch(reader)
                except OSError as e:
                    reason = self._drop_reason or _reason(e)
                finally:
                    if self.writer is writer:
                        self.writer = None
                    writer.close()
            log(f"link {self.name} down: {reason}; retry in {round(delay * 1000)} ms")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.MAX_RETRY)

    async def _sync(self, writer: asyncio.StreamWriter) -> None:
        """Sends the whole store in batches that keep the link's output small. Records that
        change meanwhile are also flooded live; duplicates are harmless (the merge is
        idempotent, and the order is total, so arrival order does not matter)."""
        lines = [line for _, line in self.herd.store.values()]  # snapshot: the dict may change
        start = 0
        while start < len(lines) and self.writer is writer:
            end, size = start, 0
            while end < len(lines) and size < self.SYNC_BATCH:
                size += len(lines[end]) + 1
                end += 1
            batch = lines[start:end]
            writer.write(b"\n".join(batch) + b"\n")
            for line in batch:
                self.herd.log(f"link {self.name} > {escape(line)}")
            start = end
            await writer.drain()

    async def _watch(self, reader: asyncio.StreamReader) -> str:
        """Waits for the link to close. The accepting side never writes on it; if a neighbour
        does (it does not list us as a neighbour and answers us as a client), say so once."""
        complained = False
        while data := await reader.read(65536):
            if not complained:
                complained = True
                self.herd.log(f"link {self.name} unexpected data: {escape(data[:200])}")
        return self._drop_reason or "end of stream"


class Herd:
    """This server's state: configuration, the store of records, the links to its neighbours."""

    def __init__(self, cfg: Config, log: Log):
        self.cfg = cfg
        self.log = log
        self.name = cfg.me.name.encode()
        self.neighbours = {n.encode(): n for n in cfg.me.neighbors}
        self.store: dict[bytes, tuple[int, bytes]] = {}  # client -> (time_ns, AT line)
        self.links = {n: Link(self, cfg.servers[n]) for n in cfg.me.neighbors}
        self.places = Places(cfg, log)
        self.connections: set[Connection] = set()
        self.connection_ids = itertools.count(1)
        # A peer line is an AT line made from a client line of up to max_line_bytes: its
        # difference field can be about as long as the time field, so allow twice plus slack.
        self.max_peer_line = 2 * cfg.max_line_bytes + 1024

    def merge(self, client: bytes, time_ns: int, line: bytes) -> bool:
        """Stores the record if it is newer (client time, then line bytes) than the one held."""
        held = self.store.get(client)
        if held is not None and (time_ns, line) <= held:
            return False
        self.store[client] = (time_ns, line)
        return True

    def flood(self, line: bytes, came_from: str | None = None) -> None:
        for name, link in self.links.items():
            if name != came_from:
                link.send(line)

    def iamat(self, fields: list[bytes], received_ns: int) -> bytes | None:
        """The AT reply to a valid IAMAT (after storing and flooding it if newer), else None."""
        _, client, location, client_time = fields
        time_ns = parse_time_ns(client_time)
        if time_ns is None or parse_location(location) is None:
            return None
        line = b"AT %s %s %s %s %s" % (
            self.name, format_diff(received_ns - time_ns), client, location, client_time
        )
        if self.merge(client, time_ns, line):
            self.flood(line)  # peers first, then the client's reply (docs/protocol.md section 5)
        return line + b"\n"

    async def sweep_idle(self) -> None:
        """Closes client connections with nothing received and nothing pending for too long."""
        idle = self.cfg.idle_timeout_ms / 1000
        if idle <= 0:
            return  # 0 disables the idle timeout
        while True:
            await asyncio.sleep(min(max(idle / 4, 0.05), 10.0))
            cutoff = time.monotonic() - idle
            for c in list(self.connections):
                if c.peer is None and c.last_active < cutoff and not c.slots:
                    c.close(f"idle for {self.cfg.idle_timeout_ms} ms")


# --------------------------------------------------------------------------------------------
# Accepted connections: clients and inbound peer links
# --------------------------------------------------------------------------------------------


class _Slot:
    """A reply in the per-connection queue; ``data`` is None until its WHATSAT is answered."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | None):
        self.data = data


class Connection(asyncio.Protocol):
    """One accepted connection. Its first line decides: a greeting from a configured neighbour
    makes it an inbound peer link (records in, nothing out); anything else, a client."""

    def __init__(self, herd: Herd):
        self.herd = herd
        self.cfg = herd.cfg
        self.log = herd.log
        self.id = f"c{next(herd.connection_ids)}"
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None  # neighbour name once greeted
        self.decided = False  # whether the first line has arrived
        self.buffer = b""  # received bytes not yet processed
        self.out: list[bytes] = []  # replies ready to go out with the next write
        self.slots: deque[_Slot] = deque()  # replies queued behind an unanswered WHATSAT
        self.waiting = 0  # WHATSATs in flight
        self.tasks: set[asyncio.Task] = set()
        self.line_limit = self.cfg.max_line_bytes
        self.eof = False  # the client half-closed
        self.closing = False  # reading stopped; close once the queued replies are written
        self.paused = False
        self.close_reason: str | None = None
        self.last_active = time.monotonic()

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        if len(self.herd.connections) >= self.cfg.max_connections:
            self.log(f"{self.id} refused: over {self.cfg.max_connections} connections")
            transport.write(b"? server busy\n")
            transport.close()
            self.closing = True
            return
        self.herd.connections.add(self)
        host, port = transport.get_extra_info("peername")[:2]
        self.log(f"{self.id} accepted from {host}:{port}")

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.last_active = time.monotonic()
        self.buffer = self.buffer + data if self.buffer else data
        self._process()

    def eof_received(self) -> bool:
        self.eof = True
        if not self.closing:
            self._process()
        # Returning False lets the transport close itself (after writing what is queued);
        # True keeps it open for the replies still waiting on Places.
        return not self._done()

    def connection_lost(self, exc: Exception | None) -> None:
        if self not in self.herd.connections:
            return
        self.herd.connections.discard(self)
        for task in self.tasks:
            task.cancel()
        reason = self.close_reason or (_reason(exc) if exc else "end of stream")
        who = f"peer {self.peer}" if self.peer else self.id
        self.log(f"{who} closed: {reason}")

    # -- reading ------------------------------------------------------------------------------

    def _process(self) -> None:
        """Handles every complete line in the buffer (and the last, unterminated one after
        end of stream), unless too many WHATSATs are in flight: then reading pauses."""
        buf, start = self.buffer, 0
        received_ns = time.time_ns()  # everything here arrived together
        while not self.closing and self.waiting < self.cfg.pending_replies:
            end = buf.find(b"\n", start)
            if end < 0:
                if not (self.eof and start < len(buf)):
                    break
                end = len(buf)  # a last line without "\n" before end of stream
            line = buf[start:end]
            start = end + 1
            if len(line) > self.line_limit:
                self._overlong(line)
            elif self.peer is not None:
                self._peer_line(line)
            else:
                self._client_line(line, received_ns)
        self.buffer = buf[start:]
        if (
            not self.closing
            and len(self.buffer) > self.line_limit
            and self.waiting < self.cfg.pending_replies
        ):
            self._overlong(self.buffer)  # no "\n" within the limit: no need to wait for one
        if self.closing:
            self.buffer = b""
        self._write_out()
        self._flow_control()
        if self._done() and (self.eof or self.closing):
            self.transport.close()

    def _client_line(self, line: bytes, received_ns: int) -> None:
        self.log(f"{self.id} < {escape(line)}")
        fields = line.split()
        if not self.decided:
            self.decided = True
            name = greeting_name(fields)
            if name in self.herd.neighbours:
                self.peer = self.herd.neighbours[name]
                self.line_limit = self.herd.max_peer_line
                self.log(f"{self.id} is peer {self.peer}")
                return
        if not fields:
            return  # blank line: no reply
        if len(fields) == 4:
            if fields[0] == b"IAMAT":
                reply = self.herd.iamat(fields, received_ns)
                if reply is not None:
                    self._reply(reply)
                    return
            elif fields[0] == b"WHATSAT" and self._whatsat(fields):
                return
        self._reply(b"? " + line + b"\n")

    def _peer_line(self, line: bytes) -> None:
        if not line.strip():
            return
        self.log(f"peer {self.peer} < {escape(line)}")
        record = parse_at_record(line)
        if record is None:
            self.log(f"peer {self.peer} sent an invalid record; ignored")
        elif self.herd.merge(record[0], record[1], line):
            self.herd.flood(line, came_from=self.peer)

    def _overlong(self, line: bytes) -> None:
        limit = self.line_limit
        if self.peer is not None:  # never write on a peer link: just drop it
            self.close(f"line longer than {limit} bytes")
            return
        self.log(f"{self.id} < {escape(line[:64])}... ({len(line)} bytes)")
        self._reply(b"? " + line[:64] + b"... (line longer than %d bytes)\n" % limit)
        self.closing = True
        self.close_reason = f"line longer than {limit} bytes"
        self.transport.pause_reading()

    # -- WHATSAT ------------------------------------------------------------------------------

    def _whatsat(self, fields: list[bytes]) -> bool:
        """Starts a valid WHATSAT (its reply slot keeps its place in line); False if invalid."""
        radius_m = parse_radius_m(fields[2])
        bound = parse_bound(fields[3])
        record = self.herd.store.get(fields[1])
        if radius_m is None or bound is None or record is None:
            return False
        at_line = record[1]
        lat, lng = parse_location(at_line.split(b" ")[4])
        deadline = asyncio.get_running_loop().time() + self.cfg.timeout_ms / 1000
        slot = _Slot(None)
        self.slots.append(slot)
        self.waiting += 1
        task = asyncio.create_task(self._answer(slot, at_line, lat, lng, radius_m, bound, deadline))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _answer(self, slot, at_line, lat, lng, radius_m, bound, deadline) -> None:
        body = await self.herd.places.search(lat, lng, radius_m, bound, deadline)
        slot.data = b"%s\n%s\n\n" % (at_line, body)
        self.waiting -= 1
        while self.slots and self.slots[0].data is not None:
            self.out.append(self.slots.popleft().data)
        self._write_out()
        self._flow_control()
        if self.paused or self.transport.is_closing():
            return
        if self.buffer or self.eof:
            self._process()  # lines held back while too many WHATSATs were in flight
        elif self.closing and self._done():
            self.transport.close()

    # -- writing ------------------------------------------------------------------------------

    def _reply(self, data: bytes) -> None:
        if self.slots:  # behind an unanswered WHATSAT
            self.slots.append(_Slot(data))
        else:
            self.out.append(data)

    def _write_out(self) -> None:
        """Writes every ready reply with one write() (test clients do a single read())."""
        if not self.out or self.transport.is_closing():
            self.out.clear()
            return
        for data in self.out:
            self.log(f"{self.id} > {escape(data)}")
        self.transport.write(self.out[0] if len(self.out) == 1 else b"".join(self.out))
        self.out.clear()
        if self.transport.get_write_buffer_size() > self.cfg.client_output_bytes:
            self.close_reason = f"over {self.cfg.client_output_bytes} bytes of unread replies"
            self.transport.abort()

    def _flow_control(self) -> None:
        """Stops reading while pending_replies WHATSATs are in flight (README limits)."""
        if self.closing or self.transport.is_closing():
            return
        full = self.waiting >= self.cfg.pending_replies
        if full and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        elif not full and self.paused:
            self.paused = False
            self.transport.resume_reading()

    def _done(self) -> bool:
        """Nothing left to answer: no queued reply, and no held-back input (unless closing)."""
        return not self.slots and (self.closing or not self.buffer)

    def close(self, reason: str) -> None:
        self.close_reason = reason
        self.closing = True
        self.transport.close()


# --------------------------------------------------------------------------------------------
# Process
# --------------------------------------------------------------------------------------------


async def serve(cfg: Config, log: Log) -> None:
    loop = asyncio.get_running_loop()
    herd = Herd(cfg, log)
    server = await loop.create_server(
        lambda: Connection(herd), cfg.me.host, cfg.me.port, reuse_address=True, backlog=1024
    )
    port = server.sockets[0].getsockname()[1]
    log(f"{cfg.me.name} listening on {cfg.me.host}:{port} ({type(loop).__module__} event loop)")
    print(f"{cfg.me.name} listening on {cfg.me.host}:{port}, logging to {cfg.log_path}", flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(link.run()) for link in herd.links.values()]
    tasks.append(asyncio.create_task(herd.sweep_idle()))
    await stop.wait()

    server.close()  # stop accepting
    log("stopping on signal")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="Python asyncio prototype of one herd server.")
    parser.add_argument("name", metavar="NAME", help="the server of the configuration to run")
    parser.add_argument("--config", type=Path, default=Path("herd.toml"), metavar="PATH")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.name)
    except ConfigError as e:
        print(f"herd_prototype: {e}", file=sys.stderr)
        return 2
    try:
        log = Log(cfg.log_path)
    except OSError as e:
        print(f"herd_prototype: cannot open {cfg.log_path}: {e.strerror}", file=sys.stderr)
        return 1
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as runner:
            runner.run(serve(cfg, log))
    except OSError as e:  # e.g. the port is taken
        print(f"herd_prototype: {cfg.me.name}: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
