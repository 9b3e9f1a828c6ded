#!/usr/bin/env python3
"""Checks herd_prototype.py against docs/protocol.md by hand-rolled black-box tests (standard
library).

    python3 benches/prototype/check_prototype.py [--herd-only | --quick]

What it does, in a temporary directory:
  1. pure-function checks of the protocol code (parsing, exact ranges, radius text, cut_body);
  2. a fake Google Places over HTTPS (a throw-away CA and leaf made with `openssl`), serving the
     sample answers of tests/data/places with Content-Length, chunked and read-to-close framing,
     plus slow, not-JSON and hang-up answers, chosen by the request's radius;
  3. single servers (legacy API, new API, no key, Places unreachable) driven over TCP:
     IAMAT, WHATSAT, invalid lines, white space, pipelining behind a slow WHATSAT, half-close,
     overlong lines, client AT/PEER lines, peer links (a fake neighbour both ways), the log;
  4. the 5-server herd of herd.toml (on free ports): an update reaches the farthest servers,
     routes around a dead server, and a restarted (empty) server converges.
Prints one line per check and exits 1 if any failed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PROTOTYPE = HERE / "herd_prototype.py"
FIXTURES = REPO / "tests" / "data" / "places"  # Google Places sample answers (make_places.py)
KEY = "test-key-Zx9"

sys.dont_write_bytecode = True  # leave no __pycache__ in the repository
sys.path.insert(0, str(HERE))
import herd_prototype as hp  # noqa: E402

failures = 0


def check(ok: bool, what: str, detail: object = "") -> None:
    global failures
    print(("ok   " if ok else "FAIL ") + what + ("" if ok or detail == "" else f"\n     {detail!r}"))
    if not ok:
        failures += 1


# ---------------------------------------------------------------------------------------------
# 1. Pure functions
# ---------------------------------------------------------------------------------------------


def check_pure() -> None:
    check(
        [b for b in range(256) if len((b"a" + bytes([b]) + b"b").split()) == 2] == [9, 10, 11, 12, 13, 32],
        "bytes.split() splits on exactly the six spec white-space bytes",
    )
    good = [b"+34.068930-118.445127", b"+90-180", b"-90.000+180.0000", b"+0090.0+0", b"+34-118"]
    bad = [b"+90.5+0", b"+90.0000000000000001+0", b"+1+180.0001", b"1+1", b"+1", b"+1+", b"++1+1",
           b"+1.+1", b"+.5+1", b"+1+1+1", b"+\xd9\xa1+1"]
    check(all(hp.parse_location(x) for x in good), "valid locations accepted (90.000 is valid)")
    check(not any(hp.parse_location(x) for x in bad), "invalid locations refused (90.5, >180, forms)")
    check(hp.parse_location(b"+034.068930-0118.4") == ("34.068930", "-118.4"), "plain coordinates")
    check(hp.parse_location(b"-00+0") == ("-0", "0"), "plain coordinates of zero")
    check(hp.parse_time_ns(b"1621464827.9594985039999") == 1621464827959498503, "time truncated to ns")
    check(all(hp.parse_time_ns(x) is None for x in [b"nan", b"-1", b"1e9", b"+5", b"1.", b".5", b"1.2.3", b"9" * 40]),
          "invalid times refused")
    radii = {b"10": "10000", b"50": "50000", b"50.000": "50000", b"1.5": "1500", b"0.0001": "0.1",
             b"0.00012340": "0.1234", b"007": "7000"}
    check(all(hp.parse_radius_m(k) == v for k, v in radii.items()), "radius in exact metres",
          {k: hp.parse_radius_m(k) for k in radii})
    check(all(hp.parse_radius_m(x) is None for x in [b"0", b"0.0", b"50.5", b"50.0001", b"51", b"-1", b"+5", b"1e3", b""]),
          "invalid radii refused")
    check([hp.parse_bound(x) for x in [b"0", b"20", b"007", b"21", b"-1", b"5.0", b"+5", b"100"]]
          == [0, 20, 7, None, None, None, None, None], "bounds")
    check((hp.format_diff(263873386), hp.format_diff(-12000000001), hp.format_diff(0))
          == (b"+0.263873386", b"-12.000000001", b"+0.000000000"), "difference format")
    check(hp.parse_at_record(b"AT Bailey +0.263873386 kiwi +34.068930-118.445127 1621464827.959498503")
          == (b"kiwi", 1621464827959498503), "AT record parsed")
    check(not any(hp.parse_at_record(x) for x in [
        b"AT Bailey +0.26 kiwi +1+1 1", b"AT Bailey  +0.263873386 kiwi +1+1 1", b"AT B +0.263873386 k +1+1",
        b"AT B 0.263873386 k +1+1 1", b"AT B +0.263873386 k +91+1 1", b"AT B +0.263873386 k +1+1 1\r"]),
        "loose AT records refused")
    raw = (b'{\n   "a" : [ 1, 2 ],\n   "results" : [\n      {\n         "x" : "]}\\""\n      },\n'
           b'      {\n         "x" : 2\n      }\n   ],\n   "status" : "OK"\n}\n')
    check(hp.cut_body(raw, "legacy", 1) == ("OK", b'{\n   "a" : [ 1, 2 ],\n   "results" : [\n      {\n'
          b'         "x" : "]}\\""\n      }\n   ],\n   "status" : "OK"\n}'), "cut keeps layout (1)")
    check(hp.cut_body(raw, "legacy", 0)[1] == b'{\n   "a" : [ 1, 2 ],\n   "results" : [],\n   "status" : "OK"\n}',
          "cut to [] (0)")
    check(hp.cut_body(raw, "legacy", 2)[1] == raw[:-1], "no cut when bound >= length")
    check(hp.cut_body(b"{\n\n\n\"a\"\n:1}\n\n", "legacy", 1)[1] == b'{\n"a"\n:1}', "newline runs squeezed")
    check(hp.cut_body(b'{"error": {"code": 403, "status": "PERMISSION_DENIED"}}', "new", 3)[0] == "PERMISSION_DENIED",
          "new API error status")
    for junk in [b"<html>", b"{\"a\":1} x", b"\xff{}", b"[" * 100000]:
        try:
            hp.cut_body(junk, "legacy", 1)
            check(False, f"not JSON detected: {junk[:10]!r}")
        except hp.NotJson:
            check(True, f"not JSON detected: {junk[:10]!r}")
    check(hp.cut_body(b"[1, 2]", "legacy", 1) == ("", b"[1, 2]"), "non-object JSON relayed uncut")
    check(hp.error_body("UNKNOWN_ERROR", 'a "b"') ==
          b'{"html_attributions" : [], "results" : [], "status" : "UNKNOWN_ERROR", "error_message" : "a \\"b\\""}',
          "error body escapes the message")
    check(hp.escape(b"a\\b\nc\td\x7f\xc3\xa9") == "a\\\\b\\nc\\x09d\\x7f\\xc3\\xa9", "log escaping")


# ---------------------------------------------------------------------------------------------
# 2. Fake Places over HTTPS
# ---------------------------------------------------------------------------------------------


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=herd test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=localhost")
    (d / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                           "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "leaf.pem", "-days", "2", "-extfile", "ext")
    return d / "ca.pem", d / "leaf.pem", d / "leaf.key"


LEGACY_OK = (FIXTURES / "legacy_ok_20.json").read_bytes()
NEW_OK = (FIXTURES / "new_ok_5.json").read_bytes()
ZERO = (FIXTURES / "legacy_zero_results.json").read_bytes()
NEWLINES_BODY = b'{\n\n\n   "results" : [ 1, 2, 3 ],\n\n   "status" : "OK"\n}\n\n\n'


class FakePlaces:
    """Answers by the request's radius (metres), so each test picks its framing/failure."""

    def __init__(self, cert: Path, key: Path):
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        self.requests: list[tuple[bytes, dict, bytes]] = []  # (request line, headers, body)
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer):
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, *hs = head[:-4].split(b"\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in hs)}
                body = await reader.readexactly(int(headers.get(b"content-length", 0)))
                self.requests.append((line, headers, body))
                if line.startswith(b"POST"):
                    radius = str(json.loads(body)["locationRestriction"]["circle"]["radius"])
                else:
                    radius = re.search(rb"[?&]radius=([^&]*)", line).group(1).decode()
                if not await self._answer(radius, line, writer):
                    writer.close()
                    return
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(self, radius: str, line: bytes, writer) -> bool:
        """Writes the response; False when the connection must close afterwards."""
        def cl(body, status="200 OK"):
            return (b"HTTP/1.1 %s\r\nContent-Type: application/json; charset=UTF-8\r\n"
                    b"Content-Length: %d\r\n\r\n" % (status.encode(), len(body))) + body
        if line.startswith(b"POST"):
            writer.write((FIXTURES / "new_ok_5.chunked.http").read_bytes())
        elif radius == "10000":  # chunked, keep-alive
            writer.write((FIXTURES / "legacy_ok_20.chunked.http").read_bytes())
        elif radius == "1000":  # Content-Length, an error body with HTTP 200
            writer.write((FIXTURES / "legacy_request_denied.content-length.http").read_bytes())
        elif radius == "2000":  # read to close
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\n\r\n")
            await writer.drain()
            for i in range(0, len(LEGACY_OK), 5000):
                writer.write(LEGACY_OK[i:i + 5000])
                await writer.drain()
            return False
        elif radius == "3000":  # too slow for the 1000 ms timeout
            await asyncio.sleep(3)
            writer.write(cl(ZERO))
        elif radius == "4000":
            writer.write(cl(b"<html>oops</html>"))
        elif radius == "5000":  # slow but in time
            await asyncio.sleep(0.4)
            writer.write(cl(ZERO))
        elif radius == "6000":  # hang up without answering
            return False
        elif radius == "7000":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + cl(NEWLINES_BODY, "403 Forbidden"))
        else:
            writer.write(cl(ZERO))
        return True


# ---------------------------------------------------------------------------------------------
# Driving servers
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, config: Path, name: str, env: dict | None = None):
        self.name = name
        self.config = config
        self.env = env
        self.start()

    def start(self):
        env = dict(os.environ)
        env.pop("GOOGLE_PLACES_API_KEY", None)
        env.update(self.env or {})
        t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(PROTOTYPE), self.name, "--config", str(self.config)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.banner = self.proc.stdout.readline().decode()
        self.startup = time.monotonic() - t0
        m = re.fullmatch(r"(\S+) listening on (\S+):(\d+), logging to (.+)\n", self.banner)
        if not m:
            raise RuntimeError(f"{self.name} did not start: {self.banner!r} {self.proc.stderr.read()!r}")
        self.port = int(m.group(3))
        self.log = Path(m.group(4))

    def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(5)


def talk(port: int, data: bytes, half_close=True, timeout=6.0) -> bytes:
    """Sends data, half-closes, reads until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def now_text() -> str:
    ns = time.time_ns()
    return f"{ns // 10**9}.{ns % 10**9:09d}"


def write_config(path: Path, servers: list[dict], places: dict, limits: dict | None = None) -> Path:
    def val(v):
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return str(v)
    lines = [f'log_dir = "logs"', "[places]"] + [f"{k} = {val(v)}" for k, v in places.items()]
    if limits:
        lines += ["[limits]"] + [f"{k} = {val(v)}" for k, v in limits.items()]
    for s in servers:
        lines += ["[[server]]"] + [f"{k} = {val(v)}" for k, v in s.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def whatsat_parts(reply: bytes) -> tuple[bytes, bytes]:
    """(AT line, body) of one WHATSAT reply, checking its shape."""
    assert reply.endswith(b"\n\n"), reply[-50:]
    at, _, body = reply[:-2].partition(b"\n")
    return at, body


def is_splice(out: bytes, raw: bytes) -> bool:
    """Whether out == raw[:i] + raw[j:] for some i <= j (every kept byte is Google's)."""
    raw = raw.rstrip(b"\n")  # the reply drops Google's trailing newline
    i = 0
    while i < min(len(out), len(raw)) and out[i] == raw[i]:
        i += 1
    return raw.endswith(out[i:])


# ---------------------------------------------------------------------------------------------
# 3. One server
# ---------------------------------------------------------------------------------------------


def check_single(tmp: Path, fake: FakePlaces, ca: Path) -> None:
    url = f"https://127.0.0.1:{fake.port}/maps/api/place/nearbysearch/json"
    fake_neighbour = socket.create_server(("127.0.0.1", 0))  # "Fake": the prototype dials us
    fake_neighbour.settimeout(5)
    port = free_port()
    cfg = write_config(tmp / "single.toml",
                       [{"name": "Solo", "port": port, "neighbors": ["Fake"]},
                        {"name": "Fake", "port": fake_neighbour.getsockname()[1], "neighbors": ["Solo"]}],
                       {"api": "legacy", "url": url, "ca_file": str(ca), "timeout_ms": 1000, "pool_size": 2})
    server = Server(cfg, "Solo", {"GOOGLE_PLACES_API_KEY": KEY})
    check(server.startup < 0.5 + 0.3, f"started and printed its banner in {server.startup * 1000:.0f} ms",
          server.banner)
    p = server.port

    # Our fake neighbour accepts the link the prototype dials: greeting, sync (empty), floods.
    link = LinkReader(fake_neighbour)
    check(link.next() == b"PEER herd/1 Solo\n", "outbound link opens with PEER herd/1 Solo")

    # IAMAT
    t = now_text()
    before = time.time_ns()
    reply = talk(p, f"IAMAT kiwi.cs.ucla.edu +34.068930-118.445127 {t}\n".encode())
    m = re.fullmatch(rb"AT Solo ([+-]\d+\.\d{9}) kiwi\.cs\.ucla\.edu \+34\.068930-118\.445127 (\S+)\n", reply)
    check(bool(m) and m.group(2) == t.encode(), "IAMAT reply format", reply)
    if m:
        diff = int(m.group(1).replace(b".", b""))
        check(0 <= diff < time.time_ns() - before + 10**6, f"exact ns difference ({m.group(1).decode()})")
    kiwi_at = reply[:-1]
    check(link.next() == kiwi_at + b"\n", "new record flooded on the outbound link")

    # white space, bytes, blank lines
    reply = talk(p, b"\x0b IAMAT\tw\xff\xfe\x0c+1+2\r 3.5 \r\n\n \t\x0b\x0c\r\n")
    check(reply == b"AT Solo " + hp.format_diff(time.time_ns() - 3_500_000_000)[:4] + reply[12:]
          and reply.endswith(b" w\xff\xfe +1+2 3.5\n") and reply.count(b"\n") == 1,
          "all six white-space bytes separate fields; non-UTF-8 id; blank lines get no reply", reply)
    reply = talk(p, b"IAMAT a +1+1 13.000000001\nIAMAT a +1+1 1e9\n")
    check(reply.split(b"\n")[1] == b"? IAMAT a +1+1 1e9", "pipelined: valid then invalid", reply)

    invalid = [b"IAMAT kiwi +34.068930-118.445127", b"iamat a +1+1 1", b"IAMAT a +90.5+1 1",
               b"IAMAT a +1+180.0001 1", b"IAMAT a +1+1 nan", b"IAMAT a +1+1 -1", b"  IAMAT a +1+1 1 x\r",
               b"WHATSAT nobody 10 5", b"WHATSAT kiwi.cs.ucla.edu 0 5", b"WHATSAT kiwi.cs.ucla.edu 50.0001 5",
               b"WHATSAT kiwi.cs.ucla.edu 10 21", b"WHATSAT kiwi.cs.ucla.edu 10 5.0", b"WHATSAT kiwi.cs.ucla.edu 10",
               b"AT Solo +0.000000000 x +1+1 1", b"PEER herd/1 Fake", b"HELLO", b"\xff\xfe"]
    reply = talk(p, b"HELLO\n" + b"\n".join(invalid) + b"\n")
    check(reply == b"? HELLO\n" + b"".join(b"? " + x + b"\n" for x in invalid),
          "invalid commands echoed as '? <line>' byte for byte (incl. AT/PEER from a client)", reply)
    check(talk(p, b"IAMAT a +90.000-180 1\n").startswith(b"AT Solo +"), "+90.000-180 is valid")

    # final line without newline + half-close; replies finish before close
    reply = talk(p, f"IAMAT tail +1+1 {now_text()}".encode())
    check(reply.startswith(b"AT Solo ") and reply.endswith(b" tail +1+1 " + reply.split()[-1] + b"\n"),
          "a last line without \\n before EOF is a command", reply)

    # WHATSAT, chunked (10 km), bound 5 / 20 / 0
    for bound in (5, 20, 0, 1):
        at, body = whatsat_parts(talk(p, b"WHATSAT kiwi.cs.ucla.edu 10 %d\n" % bound))
        parsed = json.loads(body)
        want = json.loads(LEGACY_OK)
        want["results"] = want["results"][:bound]
        check(at == kiwi_at and parsed == want and is_splice(body, LEGACY_OK) and not body.endswith(b"\n"),
              f"WHATSAT bound {bound}: stored AT line, results cut by splicing the raw text")
    at, body = whatsat_parts(talk(p, b"WHATSAT kiwi.cs.ucla.edu 10 0\n"))
    check(b'   "results" : [],\n   "status" : "OK"' in body, "bound 0 gives \"results\" : []")
    at, body = whatsat_parts(talk(p, b"WHATSAT kiwi.cs.ucla.edu 10 20\n"))
    check(body == LEGACY_OK.rstrip(b"\n"), "bound 20 relays the body byte for byte (minus final newline)")
    line, headers, _ = fake.requests[-1]
    check(line == b"GET /maps/api/place/nearbysearch/json?location=34.068930,-118.445127&radius=10000&key="
          + KEY.encode() + b" HTTP/1.1", "legacy request line (no '+', metres, key)", line)
    check(b"accept-encoding" not in headers, "no Accept-Encoding")

    # Content-Length (1 km), read-to-close (2 km), timeout (3 km), not JSON (4 km), hang-up (6 km)
    at, body = whatsat_parts(talk(p, b"WHATSAT kiwi.cs.ucla.edu 1 3\n"))
    check(body == (FIXTURES / "legacy_request_denied.json").read_bytes().rstrip(b"\n"),
          "Content-Length body relayed (Google's REQUEST_DENIED with HTTP 200)")
    at, body = whatsat_parts(talk(p, b"WHATSAT kiwi.cs.ucla.edu 2 3\n"))
    check(json.loads(body)["results"] == json.loads(LEGACY_OK)["results"][:3] and is_splice(body, LEGACY_OK),
          "read-to-close body")
    t0 = time.monotonic()
    at, body = whatsat_parts(talk(p, b"WHATSAT kiwi.cs.ucla.edu 3 3\n"))
    took = time.monotonic() - t0
    check(json.loads(body)["status"] == "UNKNOWN_ERROR" and 0.9 < took < 1.5 and at == kiwi_at,
          f"timeout -> UNKNOWN_ERROR after {took * 1000:.0f} ms (timeout_ms 1000)", body)
    at, body = whatsat_parts(talk(p, b"WHATSAT kiwi.cs.ucla.edu 4 3\n"))
    check(json.loads(body)["status"] == "UNKNOWN_ERROR" and b"not JSON" in body, "not JSON -> UNKNOWN_ERROR", body)
    at, body = whatsat_parts(talk(p, b"WHATSAT kiwi.cs.ucla.edu 6 3\n"))
    check(json.loads(body)["status"] == "UNKNOWN_ERROR", "hang-up -> UNKNOWN_ERROR", body)
    at, body = whatsat_parts(talk(p, b"WHATSAT kiwi.cs.ucla.edu 7 1\n"))
    check(body == b'{\n   "results" : [ 1 ],\n   "status" : "OK"\n}',
          "100 Continue skipped, inline array cut, newline runs squeezed, HTTP 403 relayed", body)
    talk(p, b"WHATSAT kiwi.cs.ucla.edu 0.0001 1\n")
    check(b"&radius=0.1&" in fake.requests[-1][0], "0.0001 km is radius=0.1")

    # pipelining: a slow WHATSAT (5 km, 400 ms), then IAMATs and an invalid line
    t = now_text()
    reply = talk(p, f"WHATSAT kiwi.cs.ucla.edu 5 1\nIAMAT pipe +1+1 {t}\nBAD\nWHATSAT kiwi.cs.ucla.edu 10 1\n".encode())
    parts = reply.split(b"\n\n")
    check(len(parts) == 3 and parts[0].startswith(kiwi_at + b"\n{") and b"ZERO_RESULTS" in parts[0]
          and parts[1].startswith(b"AT Solo ") and f" pipe +1+1 {t}\n? BAD\n".encode() + kiwi_at in parts[1]
          and parts[2] == b"", "replies in command order behind a slow WHATSAT; half-close waits for them",
          reply[:300])

    # whole WHATSAT reply arrives in one read()
    with socket.create_connection(("127.0.0.1", p)) as s:
        s.sendall(b"WHATSAT kiwi.cs.ucla.edu 10 20\n")
        s.settimeout(5)
        first = s.recv(1 << 20)
    check(first.endswith(b"}\n\n") and first.startswith(kiwi_at), f"one write per reply ({len(first)} bytes in one recv)")

    # pool: connections opened <= pool_size while keep-alive works
    before = fake.connections
    for _ in range(5):
        talk(p, b"WHATSAT kiwi.cs.ucla.edu 10 1\n")
    check(fake.connections - before <= 1, f"keep-alive pool reused ({fake.connections - before} new connections for 5)")

    # stale IAMAT: answered, not stored, not flooded
    stale = talk(p, b"IAMAT kiwi.cs.ucla.edu +1+1 1000\n")
    at, _ = whatsat_parts(talk(p, b"WHATSAT kiwi.cs.ucla.edu 10 1\n"))
    check(stale.startswith(b"AT Solo +") and at == kiwi_at, "stale IAMAT answered but not stored")

    link.drain()
    # inbound peer link: records merged, tie broken by bytes, not flooded back to the sender
    with socket.create_connection(("127.0.0.1", p)) as s:
        s.sendall(b"PEER herd/1 Fake\n"
                  b"AT Fake +0.100000000 tie +1+1 2000000000.5\n"
                  b"AT Fake +0.200000000 tie +2+2 2000000000.5\n"
                  b"AT Fake +0.050000000 tie +3+3 2000000000.5\n"
                  b"AT Fake  +0.050000000 bad +3+3 2000000000.5\n")
        time.sleep(0.3)
        s.settimeout(0.2)
        try:
            silent = s.recv(100) == b""
        except socket.timeout:
            silent = True
    at, _ = whatsat_parts(talk(p, b"WHATSAT tie 10 1\n"))
    check(at == b"AT Fake +0.200000000 tie +2+2 2000000000.5", "equal time: bytewise larger AT line wins", at)
    check(silent, "the accepting side never writes on a peer link")
    check(talk(p, b"WHATSAT bad 10 1\n") == b"? WHATSAT bad 10 1\n", "a loose AT record from a peer is ignored")
    echoed = link.drain()
    check(echoed == [], "records from Fake are not flooded back to Fake", echoed)

    # the outbound link: drop it, the prototype redials and re-syncs the whole store
    link.close()
    link = LinkReader(fake_neighbour)
    synced = [link.next()] + link.drain()
    check(synced[0] == b"PEER herd/1 Solo\n" and kiwi_at + b"\n" in synced
          and b"AT Fake +0.200000000 tie +2+2 2000000000.5\n" in synced,
          "link redialled after a drop, whole store re-sent", synced)

    # overlong line
    reply = talk(p, b"IAMAT a +1+1 1\n" + b"x" * 5000 + b"\nIAMAT b +1+1 1\n", half_close=False)
    check(reply.split(b"\n")[1] == b"? " + b"x" * 64 + b"... (line longer than 4096 bytes)" and reply.count(b"\n") == 2,
          "overlong line: '? <64 bytes>... (line longer than 4096 bytes)' then closed", reply[-120:])
    check(talk(p, b"IAMAT a +1+1 1 " + b" " * 4000 + b"\n").startswith(b"AT "), "4096-byte line is fine")

    # the log
    code = server.stop()
    check(code == 0, "SIGTERM: exit 0", code)
    log = server.log.read_bytes()
    check(KEY.encode() not in log, "API key never in the log")
    stamp = rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z "
    check(all(re.match(stamp, l) for l in log.splitlines()), "every log line is time-stamped")
    for what in [rb"c\d+ accepted from 127\.0\.0\.1:\d+", rb"c\d+ < IAMAT kiwi\.cs\.ucla\.edu",
                 rb"c\d+ > AT Solo \S+ kiwi\.cs\.ucla\.edu \S+ \S+\\n\n", rb"link Fake up to 127\.0\.0\.1:\d+",
                 rb"link Fake > AT Solo", rb"c\d+ is peer Fake", rb"peer Fake < AT Fake",
                 rb"places #\d+ GET /maps/api/place/nearbysearch/json\?location=34\.068930,-118\.445127&radius=10000\n",
                 rb"places #\d+ done: HTTP 200, status OK, 36148 bytes in \d+ ms",
                 rb"places #\d+ failed: Places did not answer within 1000 ms", rb"c\d+ closed: end of stream",
                 rb"link Fake down: ", rb"c\d+ < \\x0b IAMAT\\x09w\\xff\\xfe\\x0c\+1\+2\\x0d 3\.5 \\x0d\n", rb"stopping on signal"]:
        check(re.search(what, log) is not None, f"log has {what.decode()}")
    link.close()
    fake_neighbour.close()


class LinkReader:
    """Accepts the link a prototype dials to a fake neighbour and collects its lines."""

    def __init__(self, listener: socket.socket):
        import queue
        self.sock, _ = listener.accept()
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        with self.sock.makefile("rb") as f:
            try:
                for line in f:
                    self.lines.put(line)
            except OSError:
                pass

    def next(self, timeout=5.0) -> bytes:
        return self.lines.get(timeout=timeout)

    def drain(self, quiet=0.3) -> list[bytes]:
        time.sleep(quiet)
        out = []
        while not self.lines.empty():
            out.append(self.lines.get())
        return out

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def check_variants(tmp: Path, fake: FakePlaces, ca: Path) -> None:
    """New API, no key, Places unreachable, untrusted certificate."""
    base = {"timeout_ms": 2000}
    new = write_config(tmp / "new.toml", [{"name": "N", "port": 0}],
                       dict(base, api="new", url=f"https://127.0.0.1:{fake.port}/v1/places:searchNearby",
                            ca_file=str(ca)))
    nokey = write_config(tmp / "nokey.toml", [{"name": "K", "port": 0}], dict(base))
    down = write_config(tmp / "down.toml", [{"name": "D", "port": 0}],
                        dict(base, url=f"https://127.0.0.1:{free_port()}/x"))
    untrusted = write_config(tmp / "untrusted.toml", [{"name": "U", "port": 0}],
                             dict(base, url=f"https://127.0.0.1:{fake.port}/x"))
    t = now_text()
    iamat = f"IAMAT c -05.5+010 {t}\n".encode()

    s = Server(new, "N", {"GOOGLE_PLACES_API_KEY": KEY})
    talk(s.port, iamat)
    for bound in (3, 0):
        at, body = whatsat_parts(talk(s.port, b"WHATSAT c 1.5 %d\n" % bound))
        want = json.loads(NEW_OK)
        want["places"] = want["places"][:bound]
        check(json.loads(body) == want and is_splice(body, NEW_OK), f"new API: places cut to {bound}")
    line, headers, body = fake.requests[-1]
    check(line == b"POST /v1/places:searchNearby HTTP/1.1"
          and headers.get(b"x-goog-api-key") == KEY.encode()
          and headers.get(b"x-goog-fieldmask") == hp.DEFAULT_FIELD_MASK.encode()
          and headers.get(b"content-type") == b"application/json"
          and body == b'{"locationRestriction":{"circle":{"center":{"latitude":-5.5,"longitude":10},'
                      b'"radius":1500}},"maxResultCount":1}', "new API request", (line, headers, body))
    s.stop()
    check(KEY.encode() not in s.log.read_bytes(), "new API: key not logged")

    s = Server(nokey, "K")
    talk(s.port, iamat)
    at, body = whatsat_parts(talk(s.port, b"WHATSAT c 10 5\n"))
    check(body == hp.NO_KEY_BODY and body.startswith(b'{"html_attributions" : [], "results" : [], '
          b'"status" : "REQUEST_DENIED", "error_message" : "This server has no Google Places API key'),
          "no key: REQUEST_DENIED body", body)
    s.stop()

    s = Server(down, "D", {"GOOGLE_PLACES_API_KEY": KEY})
    talk(s.port, iamat)
    at, body = whatsat_parts(talk(s.port, b"WHATSAT c 10 5\n"))
    check(json.loads(body)["status"] == "UNKNOWN_ERROR" and b"refused" in body, "connection refused -> UNKNOWN_ERROR", body)
    s.stop()

    s = Server(untrusted, "U", {"GOOGLE_PLACES_API_KEY": KEY})
    talk(s.port, iamat)
    at, body = whatsat_parts(talk(s.port, b"WHATSAT c 10 5\n"))
    check(json.loads(body)["status"] == "UNKNOWN_ERROR" and b"TLS" in body and KEY.encode() not in body,
          "untrusted certificate (no ca_file) -> UNKNOWN_ERROR", body)
    s.stop()

    bad = tmp / "bad.toml"
    bad.write_text('[[server]]\nname = "A"\nport = 1\nneighbors = ["B"]\n')
    r = subprocess.run([sys.executable, str(PROTOTYPE), "A", "--config", str(bad)], capture_output=True)
    check(r.returncode == 2 and r.stderr.count(b"\n") == 1, "bad configuration: one line, exit 2", r.stderr)


def check_limits(tmp: Path, fake: FakePlaces, ca: Path) -> None:
    """pending_replies, client_output_bytes, max_connections, idle_timeout_ms."""
    url = f"https://127.0.0.1:{fake.port}/maps/api/place/nearbysearch/json"
    cfg = write_config(tmp / "limits.toml", [{"name": "L", "port": 0}],
                       {"url": url, "ca_file": str(ca), "timeout_ms": 5000},
                       {"max_connections": 3, "idle_timeout_ms": 400, "client_output_bytes": 1 << 20,
                        "pending_replies": 8})
    s = Server(cfg, "L", {"GOOGLE_PLACES_API_KEY": KEY})
    p = s.port
    talk(p, f"IAMAT c +1+1 {now_text()}\n".encode())

    # 100 pipelined WHATSATs (more than pending_replies) interleaved with invalid lines
    data = b"".join(b"WHATSAT c 10 %d\nX%d\n" % (i % 3, i) for i in range(100))
    reply = talk(p, data, timeout=30)
    parts = reply.split(b"\n\n")
    order = [int(part.split(b"\n", 1)[0].removeprefix(b"? X")) for part in parts[1:-1]]
    check(len(parts) == 101 and order == list(range(99)) and parts[-1] == b"? X99\n",
          "100 pipelined WHATSATs past pending_replies (8): all answered, in order", (len(parts), order[:5]))

    # a client that never reads is cut off at client_output_bytes (1 MiB); others unaffected
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    hog.connect(("127.0.0.1", p))
    hog.sendall(b"WHATSAT c 10 20\n" * 1000)  # ~36 MB of replies
    time.sleep(2)
    ok_other = talk(p, b"IAMAT d +1+1 1\n").startswith(b"AT L ")
    hog.settimeout(5)
    got, closed = 0, False
    try:
        while chunk := hog.recv(1 << 16):
            got += len(chunk)
        closed = True
    except (ConnectionResetError, socket.timeout) as e:
        closed = isinstance(e, ConnectionResetError)
    hog.close()
    check(closed and got < 8 << 20 and ok_other,
          f"non-reading client disconnected after {got} bytes; another client unaffected")

    # max_connections 3: the fourth is told '? server busy'
    held = [socket.create_connection(("127.0.0.1", p)) for _ in range(3)]
    time.sleep(0.1)
    busy = talk(p, b"")  # (sending would earn a reset: the server never reads it)
    check(busy == b"? server busy\n", "max_connections: '? server busy' and closed", busy)

    # idle_timeout_ms 400: a silent connection is closed
    t0 = time.monotonic()
    held[0].settimeout(5)
    eof = held[0].recv(10) == b""
    took = time.monotonic() - t0
    check(eof and 0.3 < took < 1.0, f"idle connection closed after {took * 1000:.0f} ms (idle_timeout_ms 400)")
    for h in held:
        h.close()
    check(s.stop(signal.SIGINT) == 0, "SIGINT: exit 0")
    log = s.log.read_text()
    check("closed: over 1048576 bytes of unread replies" in log and "closed: idle for 400 ms" in log
          and "refused: over 3 connections" in log, "limits are logged")


# ---------------------------------------------------------------------------------------------
# 4. The herd of herd.toml
# ---------------------------------------------------------------------------------------------


def wait_known(port: int, client: bytes, want: bytes, limit=5.0) -> float | None:
    """Seconds until WHATSAT on port answers with the AT line want (None: never)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        reply = talk(port, b"WHATSAT %s 10 1\n" % client)
        if reply.partition(b"\n")[0] == want:
            return time.monotonic() - t0
        time.sleep(0.01)
    return None


def check_herd(tmp: Path) -> None:
    herd = tomllib.loads((REPO / "herd.toml").read_text())
    for s in herd["server"]:
        s["port"] = free_port()
    cfg = write_config(tmp / "herd.toml", herd["server"], {"api": "legacy", "timeout_ms": 1000})
    servers = {s["name"]: Server(cfg, s["name"]) for s in herd["server"]}
    port = {n: s.port for n, s in servers.items()}
    try:
        time.sleep(0.3)  # links come up
        at = talk(port["Bailey"], f"IAMAT kiwi.cs.ucla.edu +34.068930-118.445127 {now_text()}\n".encode())[:-1]
        for far in ("Jaquez", "Clark"):
            took = wait_known(port[far], b"kiwi.cs.ucla.edu", at)
            check(took is not None, f"herd: IAMAT at Bailey reaches {far} (two hops) in {took and took * 1000:.1f} ms")

        servers["Campbell"].stop()  # Bailey-Bona-Clark-Jaquez is the only route now
        time.sleep(0.1)
        at = talk(port["Bailey"], f"IAMAT kiwi.cs.ucla.edu +1+1 {now_text()}\n".encode())[:-1]
        took = wait_known(port["Jaquez"], b"kiwi.cs.ucla.edu", at)
        check(took is not None, f"herd: with Campbell down, Bailey reaches Jaquez via Bona and Clark ({took and took * 1000:.1f} ms)")
        servers["Campbell"].start()  # restarted empty: the links' sync fills it in
        took = wait_known(servers["Campbell"].port, b"kiwi.cs.ucla.edu", at)
        check(took is not None, f"herd: restarted Campbell converges ({took and took * 1000:.0f} ms)")

        servers["Jaquez"].stop()
        at2 = talk(port["Clark"], f"IAMAT other +2+2 {now_text()}\n".encode())[:-1]
        servers["Jaquez"].start()
        took = wait_known(servers["Jaquez"].port, b"other", at2)
        check(took is not None, f"herd: update made while Jaquez was down reaches it after restart ({took and took * 1000:.0f} ms)")
        logs = {n: s.log.read_text() for n, s in servers.items()}
        check("link Campbell down: connection refused; retry in" in logs["Bailey"], "herd: link drops are logged")
    finally:
        codes = [s.stop() for s in servers.values()]
    check(codes == [0] * 5, "herd: all five exit 0 on SIGTERM", codes)


def main() -> int:
    only_herd = "--herd-only" in sys.argv
    check_pure()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not only_herd:
            ca, cert, key = make_certs(tmp)
            fake = FakePlaces(cert, key)
            check_single(tmp, fake, ca)
            check_variants(tmp, fake, ca)
            check_limits(tmp, fake, ca)
        check_herd(tmp)
    print(f"\n{failures} failed" if failures else "\nall checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
