#!/usr/bin/env node
/*
 * A Node.js prototype of one herd server: the same baseline as herd_prototype.py, on Node's
 * event loop instead of asyncio's.
 *
 *     node benches/prototype/herd_prototype.js NAME [--config PATH]
 *
 * It reads the same `herd.toml` as the Rust server and the Python prototype (default:
 * `herd.toml` in the current directory), speaks the same protocol byte for byte (SPEC.md, as
 * README.md introduces it), uses the same peer-link greeting and framing and writes the same
 * log format (README.md). It is one file, written for Node.js 20 (it uses nothing newer than
 * Node.js 18), and uses only Node's own modules: `net` for the server and the peer links,
 * `https` for Places; no package, no framework. It does what herd_prototype.py does, no more
 * and no less, so that the two measure their runtimes and not two designs.
 *
 * How it maps to the spec
 * -----------------------
 * * Bytes: every socket reads and writes 'latin1' strings, one character per byte, so any
 *   byte sequence round-trips and string operations (indexOf, slice, regular expressions,
 *   comparison, Map keys) work on bytes. A client id need not be UTF-8.
 * * SPEC 2 (lines, white space): `Connection.process` splits on "\n" only; `splitFields`
 *   splits on exactly the six spec white-space bytes (space, \t \n \v \f \r). A last line
 *   without "\n" before end of stream is a command. Replies leave in command order: a WHATSAT
 *   that waits on Places holds a slot in a per-connection queue and every later reply queues
 *   behind it. On half-close (the server allows half-open sockets) the pending replies are
 *   finished, then the connection is closed.
 * * SPEC 3 (IAMAT), SPEC 4 (WHATSAT), SPEC 6 (invalid): the pure functions under "Protocol"
 *   below. Every range check is exact decimal arithmetic on the digits; times are integer
 *   nanoseconds in BigInt.
 * * SPEC 3 "which record wins": `Herd.merge` compares the client time, then the line's bytes.
 * * SPEC 4 "talking to Places": `Places` asks through an `https.Agent` with keep-alive and at
 *   most `places.pool_size` sockets; Node's HTTP parser reads Content-Length, chunked and
 *   read-to-close bodies. `cutBody` cuts `results`/`places` by splicing the raw text.
 * * SPEC 5 (peers), README "Peer links": each server dials each neighbour (`Link`), greets
 *   with `PEER herd/1 NAME`, sends its whole store, then floods new records on that
 *   connection. The accepted side of a link never writes; a connection whose first line is
 *   such a greeting from a configured neighbour is a peer (`Connection` in peer mode).
 * * SPEC 7 (limits), README "Configuration reference": every `[limits]` key the Python
 *   prototype honours is honoured here with the README's meaning and default.
 * * SPEC 8, README "Logs": `Log` buffers event lines and writes them once per turn of the
 *   event loop (`setImmediate` batching); client bytes are escaped (\n, \\, \xNN).
 * * SPEC 9: SIGTERM/SIGINT stop accepting, flush the log and exit 0; bad configuration
 *   exits 2.
 *
 * Callbacks for the listening side, async functions where the code waits
 * ----------------------------------------------------------------------
 * Client and inbound peer connections are driven by 'data' and 'end' events, which hand over
 * everything that arrived together, so pipelined commands are answered with one write. The
 * places where the code genuinely waits -- dialling a neighbour with backoff, syncing a store
 * into a link, an HTTPS request to Places -- are async functions.
 *
 * The wall clock
 * --------------
 * Node reads the wall clock only to the millisecond (`Date.now()`), but its monotonic clock
 * to the nanosecond (`process.hrtime.bigint()`). `WallClock` is the monotonic clock plus an
 * offset taken at start from `performance.timeOrigin` (microseconds), and taken again, to the
 * millisecond, if the system clock is ever stepped.
 */

'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const https = require('node:https');
const net = require('node:net');
const path = require('node:path');
const tls = require('node:tls');
const util = require('node:util');
const { performance } = require('node:perf_hooks');

const NS_PER_S = 1_000_000_000n;

// --------------------------------------------------------------------------------------------
// The wall clock, in integer nanoseconds
// --------------------------------------------------------------------------------------------

class WallClock {
  constructor() {
    const hr = process.hrtime.bigint();
    const micros = Math.round((performance.timeOrigin + performance.now()) * 1000);
    this.offset = BigInt(micros) * 1000n - hr;
    this.nextCheck = hr + NS_PER_S;
  }

  /** Nanoseconds since the epoch, as a BigInt. */
  nowNs() {
    const hr = process.hrtime.bigint();
    if (hr >= this.nextCheck) {
      this.nextCheck = hr + NS_PER_S;
      const ms = Date.now(); // once a second: has the system clock been stepped?
      const drift = Number((hr + this.offset) / 1_000_000n) - ms;
      if (drift > 1 || drift < -1) {
        this.offset = BigInt(ms) * 1_000_000n + 500_000n - hr;
      }
    }
    return hr + this.offset;
  }
}

const clock = new WallClock();

// --------------------------------------------------------------------------------------------
// Protocol: pure functions on byte strings (SPEC.md sections 2-6)
// --------------------------------------------------------------------------------------------

// Patterns are anchored; [0-9] is written out (no \d) to say "ASCII digits only".
const DECIMAL = /^([0-9]+)(?:\.([0-9]+))?$/;
const LOCATION = /^([+-])([0-9]+)(?:\.([0-9]+))?([+-])([0-9]+)(?:\.([0-9]+))?$/;
const DIFF = /^[+-][0-9]+\.[0-9]{9}$/;
const DIGITS = /^[0-9]+$/;
const WHITE_SPACE = /[ \t\n\v\f\r]+/;
const ALL_WHITE_SPACE = /^[ \t\n\v\f\r]*$/;

// Client times are kept as signed 128-bit nanoseconds by the Rust herd; a time beyond that is
// invalid there, and so it is here.
const MAX_TIME_NS = (1n << 127n) - 1n;

/** The fields of a line: runs of anything but the six white-space bytes. */
function splitFields(line) {
  const fields = line.split(WHITE_SPACE);
  if (fields[0] === '') fields.shift();
  if (fields.length > 0 && fields[fields.length - 1] === '') fields.pop();
  return fields;
}

function stripLeadingZeros(digits) {
  let i = 0;
  while (i < digits.length && digits.charCodeAt(i) === 0x30) i++;
  return digits.slice(i);
}

function stripTrailingZeros(digits) {
  let end = digits.length;
  while (end > 0 && digits.charCodeAt(end - 1) === 0x30) end--;
  return digits.slice(0, end);
}

/** Whether the decimal `intDigits.fracDigits` is <= `limit`, compared exactly. */
function atMost(intDigits, fracDigits, limit) {
  const digits = stripLeadingZeros(intDigits);
  if (digits.length > 3) return false; // every limit here (50, 90, 180) has at most three digits
  const value = Number(digits || '0');
  return value < limit || (value === limit && !/[1-9]/.test(fracDigits || ''));
}

/** A coordinate as a query value / JSON number: no '+' (it decodes as a space in a query
 *  string), no leading zeros (JSON forbids them), the digits otherwise as the client sent. */
function plain(sign, intDigits, fracDigits) {
  const text = (sign === '-' ? '-' : '') + (stripLeadingZeros(intDigits) || '0');
  return fracDigits ? text + '.' + fracDigits : text;
}

/** `[+-]D[.D][+-]D[.D]`, latitude in [-90, 90], longitude in [-180, 180] (exactly).
 *  Returns the plain [latitude, longitude] texts, or null when invalid. */
function parseLocation(text) {
  const m = LOCATION.exec(text);
  if (m === null) return null;
  const [, latSign, latInt, latFrac, lngSign, lngInt, lngFrac] = m;
  if (!(atMost(latInt, latFrac, 90) && atMost(lngInt, lngFrac, 180))) return null;
  return [plain(latSign, latInt, latFrac), plain(lngSign, lngInt, lngFrac)];
}

/** POSIX seconds `D[.D]` as BigInt nanoseconds; fraction digits past nine truncated. */
function parseTimeNs(text) {
  const m = DECIMAL.exec(text);
  if (m === null) return null;
  const secs = stripLeadingZeros(m[1]);
  if (secs.length > 30) return null;
  const frac = (m[2] || '').slice(0, 9).padEnd(9, '0');
  const ns = BigInt(secs || '0') * NS_PER_S + BigInt(frac);
  return ns <= MAX_TIME_NS ? ns : null;
}

/** A radius in km, `D[.D]` in (0, 50], as metres in exact decimal text: the decimal point
 *  moves three places right (10 -> 10000, 1.5 -> 1500, 0.0001 -> 0.1). */
function parseRadiusM(text) {
  const m = DECIMAL.exec(text);
  if (m === null) return null;
  const intDigits = m[1];
  const frac = m[2] || '';
  if (!/[1-9]/.test(intDigits + frac) || !atMost(intDigits, frac, 50)) return null;
  const metres = stripLeadingZeros(intDigits + frac.slice(0, 3).padEnd(3, '0')) || '0';
  const rest = stripTrailingZeros(frac.slice(3));
  return rest ? metres + '.' + rest : metres;
}

/** An integer from 0 to 20 (leading zeros allowed). */
function parseBound(text) {
  if (!DIGITS.test(text)) return null;
  const digits = stripLeadingZeros(text);
  if (digits.length > 2) return null;
  const value = Number(digits || '0');
  return value <= 20 ? value : null;
}

/** Signed seconds with exactly nine decimals: `+0.263873386`, `-12.000000001`. */
function formatDiff(ns) {
  const abs = ns < 0n ? -ns : ns;
  const frac = String(abs % NS_PER_S).padStart(9, '0');
  return `${ns >= 0n ? '+' : '-'}${abs / NS_PER_S}.${frac}`;
}

/** Validates an AT record from a peer: `AT SERVER DIFF CLIENT LOCATION TIME` with single
 *  spaces. It is stored and re-sent byte for byte, so anything looser is refused, not
 *  repaired. Returns [client, timeNs] or null. */
function parseAtRecord(line) {
  const fields = line.split(' ');
  if (fields.length !== 6 || fields[0] !== 'AT') return null;
  const loose = splitFields(line); // rejects empty fields and any other white space
  if (loose.length !== 6 || loose.some((field, i) => field !== fields[i])) return null;
  if (!DIFF.test(fields[2]) || parseLocation(fields[4]) === null) return null;
  const timeNs = parseTimeNs(fields[5]);
  return timeNs === null ? null : [fields[3], timeNs];
}

/** The sender's name if the (split) line is the peer greeting `PEER herd/1 NAME`. */
function greetingName(fields) {
  if (fields.length === 3 && fields[0] === 'PEER' && fields[1] === 'herd/1') return fields[2];
  return null;
}

/** A text's UTF-8 bytes as a byte string. */
function bytesOf(text) {
  return Buffer.from(text, 'utf8').toString('latin1');
}

/** A fresh, flat copy of a byte string. A slice of a received chunk would keep the whole
 *  chunk alive for as long as the store holds it. */
function own(bytes) {
  return Buffer.from(bytes, 'latin1').toString('latin1');
}

// --------------------------------------------------------------------------------------------
// Places bodies: cut the results array by splicing the raw text (SPEC.md section 4)
// --------------------------------------------------------------------------------------------

class NotJson extends Error {}

/**
 * A validating scanner for one JSON text, as strict and as lenient as Python's `json` module
 * (which the Python prototype uses): NaN, Infinity and -Infinity are values, control
 * characters in strings are not. Errors read like Python's.
 */
class JsonScanner {
  constructor(text) {
    this.text = text;
  }

  fail(message, at) {
    const text = this.text;
    const line = (text.slice(0, at).match(/\n/g) || []).length + 1;
    const column = at - (at === 0 ? -1 : text.lastIndexOf('\n', at - 1));
    throw new NotJson(`${message}: line ${line} column ${column} (char ${at})`);
  }

  space(i) {
    const text = this.text;
    for (;;) {
      const c = text.charCodeAt(i);
      if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09) i++;
      else return i;
    }
  }

  /** The index after the value that starts at `i`. */
  value(i) {
    const text = this.text;
    switch (text.charCodeAt(i)) {
      case 0x7b: // {
        return this.object(i);
      case 0x5b: // [
        return this.array(i).end;
      case 0x22: // "
        return this.string(i);
      case 0x6e: // n
        if (text.startsWith('null', i)) return i + 4;
        break;
      case 0x74: // t
        if (text.startsWith('true', i)) return i + 4;
        break;
      case 0x66: // f
        if (text.startsWith('false', i)) return i + 5;
        break;
      case 0x4e: // N
        if (text.startsWith('NaN', i)) return i + 3;
        break;
      case 0x49: // I
        if (text.startsWith('Infinity', i)) return i + 8;
        break;
      case 0x2d: // -
        if (text.startsWith('-Infinity', i)) return i + 9;
        return this.number(i);
      default:
        return this.number(i);
    }
    return this.fail('Expecting value', i);
  }

  number(start) {
    const text = this.text;
    const digit = (at) => {
      const c = text.charCodeAt(at);
      return c >= 0x30 && c <= 0x39;
    };
    let i = start;
    if (text.charCodeAt(i) === 0x2d) i++;
    if (text.charCodeAt(i) === 0x30) i++;
    else if (digit(i)) while (digit(i)) i++;
    else return this.fail('Expecting value', start);
    if (text.charCodeAt(i) === 0x2e && digit(i + 1)) {
      i += 2;
      while (digit(i)) i++;
    }
    const e = text.charCodeAt(i);
    if (e === 0x65 || e === 0x45) {
      let j = i + 1;
      const sign = text.charCodeAt(j);
      if (sign === 0x2b || sign === 0x2d) j++;
      if (digit(j)) {
        while (digit(j)) j++;
        i = j;
      }
    }
    return i;
  }

  string(start) {
    const text = this.text;
    const n = text.length;
    for (let i = start + 1; i < n; i++) {
      const c = text.charCodeAt(i);
      if (c === 0x22) return i + 1;
      if (c === 0x5c) {
        const e = text.charCodeAt(i + 1);
        if (e === 0x75) {
          if (!/^[0-9a-fA-F]{4}$/.test(text.slice(i + 2, i + 6))) {
            this.fail('Invalid \\uXXXX escape', i + 1);
          }
          i += 5;
        } else if (e === 0x22 || e === 0x5c || e === 0x2f || e === 0x62 || e === 0x66 ||
                   e === 0x6e || e === 0x72 || e === 0x74) {
          i += 1;
        } else if (i + 1 >= n) {
          break;
        } else {
          this.fail('Invalid \\escape', i);
        }
      } else if (c < 0x20) {
        this.fail('Invalid control character at', i);
      }
    }
    return this.fail('Unterminated string starting at', start);
  }

  /** The array at `open`: its elements' ends, the index of ']' and the index after it. */
  array(open) {
    const text = this.text;
    const ends = [];
    let i = this.space(open + 1);
    if (text.charCodeAt(i) === 0x5d) return { ends, open, close: i, end: i + 1 };
    for (;;) {
      i = this.value(i);
      ends.push(i);
      i = this.space(i);
      const c = text.charCodeAt(i);
      if (c === 0x5d) return { ends, open, close: i, end: i + 1 };
      if (c !== 0x2c) this.fail("Expecting ',' delimiter", i);
      i = this.space(i + 1);
    }
  }

  object(open, onMember) {
    const text = this.text;
    let i = this.space(open + 1);
    if (text.charCodeAt(i) === 0x7d) return i + 1;
    for (;;) {
      if (text.charCodeAt(i) !== 0x22) {
        this.fail('Expecting property name enclosed in double quotes', i);
      }
      const nameStart = i;
      i = this.string(i);
      const nameEnd = i;
      i = this.space(i);
      if (text.charCodeAt(i) !== 0x3a) this.fail("Expecting ':' delimiter", i);
      i = this.space(i + 1);
      if (onMember) i = onMember(JSON.parse(text.slice(nameStart, nameEnd)), i);
      else i = this.value(i);
      i = this.space(i);
      const c = text.charCodeAt(i);
      if (c === 0x7d) return i + 1;
      if (c !== 0x2c) this.fail("Expecting ',' delimiter", i);
      i = this.space(i + 1);
    }
  }

  /**
   * Walks the whole text, which must be one JSON value. When it is an object, returns its
   * top-level members named in `wanted` (their values decoded) and, if the member
   * `arrayKey` is an array, that array's element ends; else empty members and no array.
   */
  document(arrayKey, wanted) {
    const text = this.text;
    const members = new Map();
    let array = null;
    let i = this.space(0);
    if (text.charCodeAt(i) === 0x7b) {
      i = this.object(i, (name, at) => {
        if (name === arrayKey && text.charCodeAt(at) === 0x5b) {
          array = this.array(at);
          return array.end;
        }
        const end = this.value(at);
        if (wanted.includes(name)) members.set(name, decoded(text.slice(at, end)));
        return end;
      });
    } else {
      i = this.value(i);
    }
    i = this.space(i);
    if (i !== text.length) this.fail('Extra data', i);
    return { members, array };
  }
}

/** A JSON value's text, decoded; undefined for what JSON.parse refuses (NaN, Infinity). */
function decoded(text) {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** Python's str() of a decoded JSON value, for the log. */
function pyStr(value) {
  if (typeof value === 'string') return value;
  if (value === true) return 'True';
  if (value === false) return 'False';
  if (value === null) return 'None';
  return typeof value === 'object' ? JSON.stringify(value) : String(value);
}

const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/**
 * Google's raw body (a Buffer) -> [status, reply body as a byte string]. The array
 * (`results` for the legacy API, `places` for the new one) keeps its first `bound` elements;
 * every other byte is Google's. Then runs of newlines become one and trailing newlines go.
 * Throws NotJson.
 */
function cutBody(raw, api, bound) {
  let text;
  try {
    text = UTF8.decode(raw);
  } catch {
    throw new NotJson('not UTF-8');
  }
  if (text.startsWith('\ufeff')) {
    throw new NotJson('Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 column 1 (char 0)');
  }
  let scanned;
  try {
    scanned = new JsonScanner(text).document(api === 'legacy' ? 'results' : 'places',
      ['status', 'error']);
  } catch (e) {
    if (e instanceof RangeError) {
      throw new NotJson('maximum recursion depth exceeded while decoding a JSON document');
    }
    throw e;
  }
  const { members, array } = scanned;
  let status;
  if (api === 'legacy') {
    const value = members.get('status');
    status = typeof value === 'string' ? value : '';
  } else {
    const error = members.get('error');
    const isObject = error !== null && typeof error === 'object' && !Array.isArray(error);
    status = isObject ? pyStr(error.status === undefined ? 'ERROR' : error.status) : 'OK';
  }
  if (array !== null && array.ends.length > bound) {
    if (bound === 0) { // both Google styles write an empty array as []
      text = text.slice(0, array.open + 1) + text.slice(array.close);
    } else { // keep what stood between the last element and ']': Google's layout
      text = text.slice(0, array.ends[bound - 1]) + text.slice(array.ends[array.ends.length - 1]);
    }
  }
  text = text.replace(/\n{2,}/g, '\n').replace(/\n+$/, '');
  return [status, bytesOf(text)];
}

/** A body in Google's error vocabulary, for when Places gave no usable answer. */
function errorBody(status, message) {
  return bytesOf(`{"html_attributions" : [], "results" : [], "status" : "${status}", ` +
    `"error_message" : ${JSON.stringify(message)}}`);
}

const NO_KEY_BODY = errorBody(
  'REQUEST_DENIED',
  'This server has no Google Places API key: set GOOGLE_PLACES_API_KEY or places.key_file.',
);

// --------------------------------------------------------------------------------------------
// TOML: the subset of TOML 1.0 a herd.toml needs, which is nearly all of it
// --------------------------------------------------------------------------------------------

class TomlError extends Error {}

/** A date or time value; no key of herd.toml takes one, but the file may hold one. */
class TomlDateTime {
  constructor(text) {
    this.text = text;
  }
}

/**
 * Parses TOML text into plain objects (without prototypes, so any key is safe), arrays,
 * strings, BigInt integers (so that `5000` and `5000.0` stay different), numbers, booleans
 * and TomlDateTime values. Duplicate keys and redefined tables are errors.
 */
class TomlParser {
  constructor(text) {
    this.text = text;
    this.i = 0;
    this.root = Object.create(null);
    this.kind = new WeakMap(); // table or array -> how it was made
  }

  fail(message, at = this.i) {
    const before = this.text.slice(0, at);
    const line = (before.match(/\n/g) || []).length + 1;
    const column = at - before.lastIndexOf('\n');
    throw new TomlError(`${message} (at line ${line}, column ${column})`);
  }

  peek(offset = 0) {
    return this.text[this.i + offset];
  }

  match(pattern) {
    pattern.lastIndex = this.i;
    const m = pattern.exec(this.text);
    if (m !== null) this.i = pattern.lastIndex;
    return m;
  }

  skipBlank() {
    while (this.peek() === ' ' || this.peek() === '\t') this.i++;
  }

  skipComment() {
    if (this.peek() !== '#') return;
    while (this.i < this.text.length && this.peek() !== '\n') {
      const c = this.text.charCodeAt(this.i);
      if ((c < 0x20 && c !== 0x09 && !(c === 0x0d && this.peek(1) === '\n')) || c === 0x7f) {
        this.fail('Illegal character in a comment');
      }
      this.i++;
    }
  }

  /** Blanks, comments and newlines (between statements and inside arrays). */
  skipAll() {
    for (;;) {
      this.skipBlank();
      this.skipComment();
      if (this.peek() === '\n') this.i++;
      else if (this.peek() === '\r' && this.peek(1) === '\n') this.i += 2;
      else return;
    }
  }

  endOfLine() {
    this.skipBlank();
    this.skipComment();
    if (this.i >= this.text.length) return;
    if (this.peek() === '\n') this.i++;
    else if (this.peek() === '\r' && this.peek(1) === '\n') this.i += 2;
    else this.fail('Expected the end of the line');
  }

  parse() {
    let table = this.root;
    for (;;) {
      this.skipAll();
      if (this.i >= this.text.length) return this.root;
      if (this.peek() === '[' && this.peek(1) === '[') {
        this.i += 2;
        const keys = this.keys();
        if (this.peek() !== ']' || this.peek(1) !== ']') this.fail("Expected ']]'");
        this.i += 2;
        table = this.arrayTable(keys);
      } else if (this.peek() === '[') {
        this.i += 1;
        const keys = this.keys();
        if (this.peek() !== ']') this.fail("Expected ']'");
        this.i += 1;
        table = this.headerTable(keys);
      } else {
        this.keyValue(table, false);
      }
      this.endOfLine();
    }
  }

  /** A dotted key: bare, "basic" or 'literal' parts. */
  keys() {
    const keys = [];
    for (;;) {
      this.skipBlank();
      if (this.peek() === '"') keys.push(this.basicString());
      else if (this.peek() === "'") keys.push(this.literalString());
      else {
        const m = this.match(/[A-Za-z0-9_-]+/y);
        if (m === null) this.fail('Invalid key');
        keys.push(m[0]);
      }
      this.skipBlank();
      if (this.peek() !== '.') return keys;
      this.i++;
    }
  }

  isTable(value) {
    return value !== null && typeof value === 'object' && !Array.isArray(value) &&
      !(value instanceof TomlDateTime);
  }

  /** Walks the tables a header names before its last key. */
  descend(keys) {
    let table = this.root;
    for (const key of keys) {
      let next = table[key];
      if (next === undefined) {
        next = Object.create(null);
        this.kind.set(next, 'implicit');
        table[key] = next;
      } else if (Array.isArray(next) && this.kind.get(next) === 'array of tables') {
        next = next[next.length - 1];
      } else if (!this.isTable(next) || this.kind.get(next) === 'inline') {
        this.fail(`Cannot define a table under ${key}`);
      }
      table = next;
    }
    return table;
  }

  headerTable(keys) {
    const parent = this.descend(keys.slice(0, -1));
    const key = keys[keys.length - 1];
    const existing = parent[key];
    if (existing === undefined) {
      const table = Object.create(null);
      this.kind.set(table, 'header');
      parent[key] = table;
      return table;
    }
    if (this.isTable(existing) && this.kind.get(existing) === 'implicit') {
      this.kind.set(existing, 'header');
      return existing;
    }
    return this.fail(`Cannot declare [${keys.join('.')}] twice`);
  }

  arrayTable(keys) {
    const parent = this.descend(keys.slice(0, -1));
    const key = keys[keys.length - 1];
    let array = parent[key];
    if (array === undefined) {
      array = [];
      this.kind.set(array, 'array of tables');
      parent[key] = array;
    } else if (!Array.isArray(array) || this.kind.get(array) !== 'array of tables') {
      this.fail(`Cannot declare [[${keys.join('.')}]]: ${key} is not an array of tables`);
    }
    const table = Object.create(null);
    this.kind.set(table, 'header');
    array.push(table);
    return table;
  }

  /** `key = value` into `table`; dotted keys make (or extend) tables of their own. */
  keyValue(table, inline) {
    const keys = this.keys();
    if (this.peek() !== '=') this.fail("Expected '=' after a key");
    this.i++;
    this.skipBlank();
    const value = this.value();
    for (const key of keys.slice(0, -1)) {
      let next = table[key];
      if (next === undefined) {
        next = Object.create(null);
        this.kind.set(next, inline ? 'inline' : 'dotted');
        table[key] = next;
      } else if (!this.isTable(next) || this.kind.get(next) !== (inline ? 'inline' : 'dotted')) {
        this.fail(`Cannot add keys to ${key}`);
      }
      table = next;
    }
    const key = keys[keys.length - 1];
    if (key in table) this.fail(`Key ${key} is defined twice`);
    table[key] = value;
  }

  value() {
    const c = this.peek();
    if (c === '"') return this.text.startsWith('"""', this.i) ? this.multiBasic() : this.basicString();
    if (c === "'") return this.text.startsWith("'''", this.i) ? this.multiLiteral() : this.literalString();
    if (c === '[') return this.array();
    if (c === '{') return this.inlineTable();
    if (this.match(/true(?![A-Za-z0-9_-])/y)) return true;
    if (this.match(/false(?![A-Za-z0-9_-])/y)) return false;
    const dateTime = this.match(
      /[0-9]{4}-[0-9]{2}-[0-9]{2}(?:[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})?)?|[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?/y,
    );
    if (dateTime) return this.delimited(new TomlDateTime(dateTime[0]));
    let m = this.match(/([+-]?)(inf|nan)/y);
    if (m) return this.delimited(m[2] === 'nan' ? NaN : m[1] === '-' ? -Infinity : Infinity);
    m = this.match(/0x([0-9A-Fa-f](?:_?[0-9A-Fa-f])*)|0o([0-7](?:_?[0-7])*)|0b([01](?:_?[01])*)/y);
    if (m) {
      const [digits, prefix] = m[1] ? [m[1], '0x'] : m[2] ? [m[2], '0o'] : [m[3], '0b'];
      return this.delimited(BigInt(prefix + digits.replaceAll('_', '')));
    }
    m = this.match(/[+-]?(?:0|[1-9](?:_?[0-9])*)(\.[0-9](?:_?[0-9])*)?([eE][+-]?[0-9](?:_?[0-9])*)?/y);
    if (m) {
      const digits = m[0].replaceAll('_', '');
      return this.delimited(m[1] || m[2] ? Number(digits) : BigInt(digits));
    }
    return this.fail('Invalid value');
  }

  /** A scalar must be followed by white space, a comment, ',', ']', '}' or the end. */
  delimited(value) {
    if (this.i < this.text.length && !/[ \t\r\n#,\]}]/.test(this.peek())) this.fail('Invalid value');
    return value;
  }

  checkChar(c, allowNewline) {
    const code = c.charCodeAt(0);
    if ((code < 0x20 && code !== 0x09 && !(allowNewline && (code === 0x0a || code === 0x0d))) ||
        code === 0x7f) {
      this.fail('Illegal character in a string');
    }
  }

  escape() {
    const e = this.peek(1);
    const simple = { b: '\b', t: '\t', n: '\n', f: '\f', r: '\r', '"': '"', '\\': '\\' };
    if (e in simple) {
      this.i += 2;
      return simple[e];
    }
    if (e === 'u' || e === 'U') {
      const length = e === 'u' ? 4 : 8;
      const hex = this.text.slice(this.i + 2, this.i + 2 + length);
      const code = /^[0-9A-Fa-f]+$/.test(hex) && hex.length === length ? parseInt(hex, 16) : -1;
      if (code < 0 || code > 0x10ffff || (code >= 0xd800 && code <= 0xdfff)) {
        this.fail('Invalid unicode escape');
      }
      this.i += 2 + length;
      return String.fromCodePoint(code);
    }
    return this.fail('Invalid escape in a string');
  }

  basicString() {
    let out = '';
    this.i++;
    for (;;) {
      const c = this.peek();
      if (c === undefined || c === '\n') this.fail('Unterminated string');
      if (c === '"') {
        this.i++;
        return out;
      }
      if (c === '\\') {
        out += this.escape();
        continue;
      }
      this.checkChar(c, false);
      out += c;
      this.i++;
    }
  }

  literalString() {
    this.i++;
    const end = this.text.indexOf("'", this.i);
    const newline = this.text.indexOf('\n', this.i);
    if (end < 0 || (newline >= 0 && newline < end)) this.fail('Unterminated string');
    const out = this.text.slice(this.i, end);
    for (const c of out) this.checkChar(c, false);
    this.i = end + 1;
    return out;
  }

  /** After the opening delimiter, a newline right away is not part of the string. */
  skipFirstNewline() {
    if (this.peek() === '\n') this.i++;
    else if (this.peek() === '\r' && this.peek(1) === '\n') this.i += 2;
  }

  /** The closing `"""` or `'''` (with up to two more quotes that belong to the string). */
  closing(quote) {
    if (!this.text.startsWith(quote.repeat(3), this.i)) return null;
    let n = 3;
    while (n < 5 && this.peek(n) === quote) n++;
    this.i += n;
    return quote.repeat(n - 3);
  }

  multiBasic() {
    this.i += 3;
    this.skipFirstNewline();
    let out = '';
    for (;;) {
      const c = this.peek();
      if (c === undefined) this.fail('Unterminated string');
      if (c === '"') {
        const tail = this.closing('"');
        if (tail !== null) return out + tail;
      }
      if (c === '\\' && /[ \t]*\r?\n/y.test(this.text.slice(this.i + 1, this.i + 200))) {
        // A line-ending backslash trims the white space and newlines that follow.
        this.i++;
        while (/[ \t\r\n]/.test(this.peek() || '')) this.i++;
        continue;
      }
      if (c === '\\') {
        out += this.escape();
        continue;
      }
      if (c === '\r' && this.peek(1) !== '\n') this.fail('Illegal character in a string');
      this.checkChar(c, true);
      out += c;
      this.i++;
    }
  }

  multiLiteral() {
    this.i += 3;
    this.skipFirstNewline();
    let out = '';
    for (;;) {
      const c = this.peek();
      if (c === undefined) this.fail('Unterminated string');
      if (c === "'") {
        const tail = this.closing("'");
        if (tail !== null) return out + tail;
      }
      if (c === '\r' && this.peek(1) !== '\n') this.fail('Illegal character in a string');
      this.checkChar(c, true);
      out += c;
      this.i++;
    }
  }

  array() {
    const array = [];
    this.kind.set(array, 'static');
    this.i++;
    for (;;) {
      this.skipAll();
      if (this.peek() === ']') {
        this.i++;
        return array;
      }
      array.push(this.value());
      this.skipAll();
      if (this.peek() === ',') this.i++;
      else if (this.peek() !== ']') this.fail("Expected ',' or ']' in an array");
    }
  }

  inlineTable() {
    const table = Object.create(null);
    this.kind.set(table, 'inline');
    this.i++;
    this.skipBlank();
    if (this.peek() === '}') {
      this.i++;
      return table;
    }
    for (;;) {
      this.keyValue(table, true);
      this.skipBlank();
      if (this.peek() === '}') {
        this.i++;
        return table;
      }
      if (this.peek() !== ',') this.fail("Expected ',' or '}' in an inline table");
      this.i++;
      this.skipBlank();
    }
  }
}

function parseToml(text) {
  return new TomlParser(text).parse();
}

// --------------------------------------------------------------------------------------------
// Configuration (README.md, "Configuration reference")
// --------------------------------------------------------------------------------------------

const DEFAULT_URLS = {
  legacy: 'https://maps.googleapis.com/maps/api/place/nearbysearch/json',
  new: 'https://places.googleapis.com/v1/places:searchNearby',
};
const DEFAULT_FIELD_MASK =
  'places.id,places.displayName,places.formattedAddress,places.location,places.types,' +
  'places.rating,places.userRatingCount,places.businessStatus';

class ConfigError extends Error {}

/** The description of a system error, like C's strerror ("No such file or directory"). */
function strerror(err) {
  const known = typeof err.errno === 'number' && util.getSystemErrorMap().get(err.errno);
  if (!known) return err.message || String(err);
  return known[1].charAt(0).toUpperCase() + known[1].slice(1);
}

/** Python's repr() of a string, as the Python prototype's messages quote names. */
function pyRepr(text) {
  const quote = text.includes("'") && !text.includes('"') ? '"' : "'";
  let out = quote;
  for (const c of text) {
    const code = c.codePointAt(0);
    if (c === '\\' || c === quote) out += '\\' + c;
    else if (c === '\n') out += '\\n';
    else if (c === '\r') out += '\\r';
    else if (c === '\t') out += '\\t';
    else if (code < 0x20 || (code >= 0x7f && code < 0xa0)) out += '\\x' + code.toString(16).padStart(2, '0');
    else out += c;
  }
  return out + quote;
}

// What Python's str.isspace() calls white space.
const PY_SPACE = /[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]/;

function isTable(value) {
  return value !== null && typeof value === 'object' && !Array.isArray(value) &&
    !(value instanceof TomlDateTime);
}

/** `table[key]`, or `fallback`, checked to be a non-negative integer or a string. */
function get(table, key, kind, fallback, where) {
  const value = key in table ? table[key] : fallback;
  if (value === null) return null;
  if (kind === 'int') {
    if (typeof value !== 'bigint') throw new ConfigError(`${where}${key} must be an integer`);
    if (value < 0n) throw new ConfigError(`${where}${key} must not be negative`);
    return value;
  }
  if (typeof value !== 'string') throw new ConfigError(`${where}${key} must be a string`);
  return value;
}

/** A whole number for the limits below (they are all far below 2^53 in any real file). */
function count(table, key, fallback, where) {
  return Number(get(table, key, 'int', BigInt(fallback), where));
}

function resolve(base, file) {
  return path.isAbsolute(file) ? file : path.join(base, file);
}

/** The extra trusted roots of `places.ca_file`, on top of Node's own. */
function loadCa(file) {
  let pem;
  try {
    pem = fs.readFileSync(file, 'latin1');
  } catch (e) {
    throw new ConfigError(`cannot load places.ca_file: ${strerror(e)}`);
  }
  const blocks = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g);
  if (blocks === null) throw new ConfigError('cannot load places.ca_file: no certificate found');
  for (const block of blocks) {
    try {
      new crypto.X509Certificate(block); // throws unless the block is a certificate
    } catch (e) {
      throw new ConfigError(`cannot load places.ca_file: ${e.message}`);
    }
  }
  return [...tls.rootCertificates, ...blocks];
}

function loadConfig(configPath, name) {
  let data;
  try {
    const text = new TextDecoder('utf-8', { fatal: true }).decode(fs.readFileSync(configPath));
    data = parseToml(text);
  } catch (e) {
    if (e instanceof TomlError) throw new ConfigError(`${configPath}: ${e.message}`);
    if (e instanceof TypeError) throw new ConfigError(`${configPath}: not UTF-8`);
    throw new ConfigError(`cannot read ${configPath}: ${strerror(e)}`);
  }
  const base = path.dirname(configPath);

  const servers = new Map();
  const ports = new Set();
  const entries = 'server' in data ? data.server : [];
  if (!Array.isArray(entries) || !entries.every(isTable)) {
    throw new ConfigError('servers must be given as [[server]] tables');
  }
  entries.forEach((s, i) => {
    const where = `server[${i}].`;
    const sname = get(s, 'name', 'str', null, where);
    if (!sname || PY_SPACE.test(sname)) {
      throw new ConfigError(`${where}name is required and must not contain white space`);
    }
    if (servers.has(sname)) throw new ConfigError(`server ${sname} is configured twice`);
    const port = get(s, 'port', 'int', null, where);
    if (port === null || port > 65535n) {
      throw new ConfigError(`${where}port is required and must be 0..65535`);
    }
    const host = get(s, 'host', 'str', '127.0.0.1', where);
    const neighbors = 'neighbors' in s ? s.neighbors : [];
    if (!Array.isArray(neighbors) || !neighbors.every((n) => typeof n === 'string')) {
      throw new ConfigError(`${where}neighbors must be a list of names`);
    }
    const hostPort = JSON.stringify([host, String(port)]);
    if (port !== 0n && ports.has(hostPort)) {
      throw new ConfigError(`two servers listen on ${host}:${port}`);
    }
    ports.add(hostPort);
    servers.set(sname, { name: sname, host, port: Number(port), neighbors: [...new Set(neighbors)] });
  });
  for (const s of servers.values()) {
    for (const n of s.neighbors) {
      if (!servers.has(n) || n === s.name) {
        throw new ConfigError(`server ${s.name} names an unknown neighbour ${pyRepr(n)}`);
      }
      if (!servers.get(n).neighbors.includes(s.name)) {
        throw new ConfigError(`link ${s.name}-${n} must be named on both sides`);
      }
    }
  }
  if (!servers.has(name)) throw new ConfigError(`no server named ${pyRepr(name)} in ${configPath}`);

  const places = 'places' in data ? data.places : Object.create(null);
  const limits = 'limits' in data ? data.limits : Object.create(null);
  if (!isTable(places)) throw new ConfigError('places must be a table');
  if (!isTable(limits)) throw new ConfigError('limits must be a table');
  const api = get(places, 'api', 'str', 'legacy', 'places.');
  if (!(api in DEFAULT_URLS)) throw new ConfigError('places.api must be "legacy" or "new"');
  let url;
  try {
    url = new URL(get(places, 'url', 'str', DEFAULT_URLS[api], 'places.'));
  } catch (e) {
    if (e instanceof ConfigError) throw e;
    url = null;
  }
  if (url === null || url.protocol !== 'https:' || !url.hostname) {
    throw new ConfigError('places.url must be https://host[:port]/path');
  }
  const caFile = get(places, 'ca_file', 'str', null, 'places.');
  const keyFile = get(places, 'key_file', 'str', null, 'places.');
  let key = process.env.GOOGLE_PLACES_API_KEY || null;
  if (key === null && keyFile) {
    try {
      key = fs.readFileSync(resolve(base, keyFile), 'utf8').trim() || null;
    } catch (e) {
      throw new ConfigError(`cannot read places.key_file: ${strerror(e)}`);
    }
  }

  return {
    me: servers.get(name),
    servers,
    logPath: path.join(resolve(base, get(data, 'log_dir', 'str', 'logs', '')), `${name}.log`),
    api,
    host: url.hostname.replace(/^\[(.*)\]$/, '$1'),
    port: url.port ? Number(url.port) : 443,
    path: url.pathname || '/',
    ca: caFile ? loadCa(resolve(base, caFile)) : undefined,
    key,
    timeoutMs: count(places, 'timeout_ms', 5000, 'places.'),
    poolSize: Math.max(1, count(places, 'pool_size', 4, 'places.')),
    maxBodyBytes: count(places, 'max_body_bytes', 1 << 20, 'places.'),
    fieldMask: get(places, 'field_mask', 'str', DEFAULT_FIELD_MASK, 'places.'),
    maxLineBytes: count(limits, 'max_line_bytes', 4096, 'limits.'),
    idleTimeoutMs: count(limits, 'idle_timeout_ms', 300_000, 'limits.'),
    clientOutputBytes: count(limits, 'client_output_bytes', 4 << 20, 'limits.'),
    pendingReplies: Math.max(1, count(limits, 'pending_replies', 64, 'limits.')),
    maxConnections: count(limits, 'max_connections', 16384, 'limits.'),
    peerOutputBytes: count(limits, 'peer_output_bytes', 16 << 20, 'limits.'),
  };
}

// --------------------------------------------------------------------------------------------
// Log (README.md, "Logs")
// --------------------------------------------------------------------------------------------

const LOG_UNSAFE = /[^\x20-\x5b\x5d-\x7e]/; // anything but printable ASCII, and the backslash
const LOG_UNSAFE_ALL = /[^\x20-\x5b\x5d-\x7e]/g;

function escapeByte(c) {
  if (c === '\\') return '\\\\';
  if (c === '\n') return '\\n';
  return '\\x' + c.charCodeAt(0).toString(16).padStart(2, '0');
}

/** Client bytes for a log line: backslash and newline as `\\` and `\n`, any other byte
 *  outside printable ASCII as `\xNN`, so a client cannot forge a log line. */
function escape(bytes) {
  return LOG_UNSAFE.test(bytes) ? bytes.replace(LOG_UNSAFE_ALL, escapeByte) : bytes;
}

/** Event lines, buffered in memory and written with one write() per turn of the loop. */
class Log {
  constructor(file) {
    fs.mkdirSync(path.dirname(file), { recursive: true });
    this.fd = fs.openSync(file, 'a');
    this.lines = [];
    this.scheduled = false;
    this.second = -1n;
    this.prefix = '';
    this.flush = this.flush.bind(this);
  }

  write(event) {
    const now = clock.nowNs();
    const second = now / NS_PER_S;
    if (second !== this.second) { // formatting the date once per second is plenty
      this.second = second;
      this.prefix = new Date(Number(second) * 1000).toISOString().slice(0, 19);
    }
    const micros = String((now % NS_PER_S) / 1000n).padStart(6, '0');
    this.lines.push(`${this.prefix}.${micros}Z ${event}\n`);
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(this.flush);
    }
  }

  flush() {
    this.scheduled = false;
    if (this.lines.length === 0) return;
    const data = Buffer.from(this.lines.join(''), 'utf8');
    this.lines.length = 0;
    for (let done = 0; done < data.length;) done += fs.writeSync(this.fd, data, done);
  }

  close() {
    this.flush();
    fs.closeSync(this.fd);
  }
}

// --------------------------------------------------------------------------------------------
// Places client: https with a keep-alive agent
// --------------------------------------------------------------------------------------------

/** Places could not be asked or gave no usable answer; the text goes to the client. */
class PlacesError extends Error {}

/** `urllib.parse.quote(text, safe="")`: everything but letters, digits and `_.-~`. */
function quote(text) {
  return encodeURIComponent(text).replace(/[!'()*]/g,
    (c) => '%' + c.charCodeAt(0).toString(16).toUpperCase());
}

// The certificate checks that fail when a server's certificate is not trusted.
const UNTRUSTED = /^(UNABLE_TO_|CERT_|DEPTH_ZERO_|SELF_SIGNED_|INVALID_CA|PATH_LENGTH|INVALID_PURPOSE|HOSTNAME_MISMATCH|ERR_TLS_CERT_ALTNAME)/;

/** Asks Google Places (or whatever `places.url` names) on behalf of WHATSAT. */
class Places {
  constructor(cfg, log) {
    this.api = cfg.api;
    this.host = cfg.host;
    this.port = cfg.port;
    this.path = cfg.path;
    this.hostHeader = this.port === 443 ? this.host : `${this.host}:${this.port}`;
    this.key = cfg.key;
    this.fieldMask = cfg.fieldMask;
    this.timeoutMs = cfg.timeoutMs;
    this.maxBody = cfg.maxBodyBytes;
    this.log = log;
    // At most pool_size connections; requests beyond wait for one. Idle ones are reused
    // newest first, like the Python prototype's pool.
    this.agent = new https.Agent({
      keepAlive: true,
      maxSockets: cfg.poolSize,
      maxFreeSockets: cfg.poolSize,
      scheduling: 'lifo',
      ca: cfg.ca,
    });
    this.ids = 0;
  }

  /** The request (key included) and a summary for the log (key left out). */
  request(lat, lng, radiusM, bound) {
    const headers = {
      Host: this.hostHeader,
      'User-Agent': 'herd-prototype/1',
      Accept: 'application/json',
    };
    if (this.api === 'legacy') {
      const target = `${this.path}?location=${lat},${lng}&radius=${radiusM}`;
      return {
        options: { method: 'GET', path: `${target}&key=${quote(this.key)}`, headers },
        body: null,
        summary: `GET ${target}`,
      };
    }
    const body = '{"locationRestriction":{"circle":{"center":{"latitude":' + lat +
      ',"longitude":' + lng + '},"radius":' + radiusM + '}},"maxResultCount":' +
      Math.max(bound, 1) + '}';
    Object.assign(headers, {
      'Content-Type': 'application/json',
      'X-Goog-Api-Key': this.key,
      'X-Goog-FieldMask': this.fieldMask,
      'Content-Length': String(body.length),
    });
    return {
      options: { method: 'POST', path: this.path, headers },
      body,
      summary: `POST ${this.path} ${body}`,
    };
  }

  /**
   * The reply body (a byte string) for one WHATSAT, or null when the caller aborted `abort`
   * (the client has gone). Never throws: every failure becomes an UNKNOWN_ERROR body.
   * `deadline` is in performance.now() time, set when the command arrived, and covers
   * waiting for a pooled connection as well.
   */
  async search(lat, lng, radiusM, bound, deadline, abort) {
    if (!this.key) {
      this.log.write('places not asked: no API key');
      return NO_KEY_BODY;
    }
    const n = ++this.ids;
    const { options, body, summary } = this.request(lat, lng, radiusM, bound);
    this.log.write(`places #${n} ${summary}`);
    const started = performance.now();
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      abort.abort();
    }, Math.min(Math.max(deadline - started, 0), 0x7fffffff));
    let failure;
    try {
      let response;
      for (;;) {
        try {
          response = await this.exchange(options, body, abort.signal);
          break;
        } catch (e) {
          // A keep-alive connection the server closed as we sent: retry on a new one.
          if (!e.retry || abort.signal.aborted) throw e;
        }
      }
      const [status, reply] = cutBody(response.body, this.api, bound);
      const ms = Math.round(performance.now() - started);
      this.log.write(`places #${n} done: HTTP ${response.status}, status ${status || '?'}, ` +
        `${response.body.length} bytes in ${ms} ms`);
      return reply;
    } catch (e) {
      if (abort.signal.aborted && !timedOut) return null;
      failure = timedOut ? `Places did not answer within ${this.timeoutMs} ms` : this.describe(e);
    } finally {
      clearTimeout(timer);
    }
    failure = failure.replaceAll(this.key, '<key>'); // belt and braces: never leak the key
    const ms = Math.round(performance.now() - started);
    this.log.write(`places #${n} failed: ${failure} after ${ms} ms`);
    return errorBody('UNKNOWN_ERROR', failure);
  }

  /** What went wrong, for the client, in the Python prototype's words. */
  describe(e) {
    if (e instanceof NotJson) return `Places answered with a body that is not JSON (${e.message})`;
    if (e instanceof PlacesError) return e.message;
    const code = typeof e.code === 'string' ? e.code : '';
    if (UNTRUSTED.test(code)) return `TLS certificate of ${this.host} not trusted (${e.message})`;
    if (code.startsWith('ERR_SSL_') || e.library !== undefined) {
      return `TLS with ${this.host}:${this.port} failed (${e.reason || e.message})`;
    }
    if (code === 'ECONNREFUSED') {
      return `could not connect to ${this.host}:${this.port} (connection refused)`;
    }
    if (code === 'ECONNRESET') {
      return `could not talk to ${this.host}:${this.port} (Connection reset by peer)`;
    }
    if (code === 'HPE_HEADER_OVERFLOW') return 'Places sent a response head over 64 KiB';
    if (code.startsWith('HPE_')) return `Places sent a malformed HTTP response (${e.message})`;
    if (e.syscall !== undefined || typeof e.errno === 'number') {
      return `could not talk to ${this.host}:${this.port} (${strerror(e)})`;
    }
    return `internal error (${e.name || typeof e})`;
  }

  /** Sends one request on a pooled (or new) connection and reads the whole response. */
  exchange(options, body, signal) {
    return new Promise((resolve, reject) => {
      let answered = false;
      let failure = null; // set before destroying the request for a reason of ours
      const req = https.request({
        ...options,
        host: this.host,
        port: this.port,
        agent: this.agent,
        signal,
        maxHeaderSize: 64 * 1024,
      });
      const give = (e) => {
        if (failure !== null) return reject(failure);
        if (!answered && e.code === 'ECONNRESET' && e.message === 'socket hang up') {
          const noAnswer = new PlacesError('Places closed the connection without answering');
          noAnswer.retry = req.reusedSocket;
          return reject(noAnswer);
        }
        if (answered && e.code === 'ECONNRESET') {
          return reject(new PlacesError('Places closed the connection in the middle of its answer'));
        }
        e.retry = !answered && req.reusedSocket && (e.code === 'ECONNRESET' || e.code === 'EPIPE');
        return reject(e);
      };
      const stop = (message) => {
        failure = new PlacesError(message);
        req.destroy(failure);
      };
      req.on('error', give);
      req.on('response', (res) => {
        answered = true;
        const tooLarge = `Places sent a body larger than ${this.maxBody} bytes`;
        if (Number(res.headers['content-length']) > this.maxBody) return stop(tooLarge);
        const chunks = [];
        let total = 0;
        res.on('data', (chunk) => {
          total += chunk.length;
          if (total > this.maxBody) stop(tooLarge);
          else chunks.push(chunk);
        });
        res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks, total) }));
        res.on('error', give);
        res.on('close', () => {
          if (!res.complete) give(Object.assign(new Error('aborted'), { code: 'ECONNRESET' }));
        });
        return undefined;
      });
      req.end(body === null ? undefined : body);
    });
  }
}

// --------------------------------------------------------------------------------------------
// The herd: store, flooding, outbound peer links
// --------------------------------------------------------------------------------------------

/** Why a connection failed, in the Python prototype's words. */
function reasonOf(e) {
  if (e.code === 'ECONNREFUSED') return 'connection refused';
  if (e.code === 'ECONNRESET') return 'connection reset';
  return strerror(e);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Dials host:port; the socket records its last error as `socket.lastError`. */
function dial(host, port, timeoutMs) {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port });
    socket.lastError = null;
    socket.on('error', (e) => {
      socket.lastError = e;
    });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(Object.assign(new Error('connect timeout'), {
        reason: `connect timed out after ${timeoutMs} ms`,
      }));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      resolve(socket);
    });
    socket.once('close', () => {
      clearTimeout(timer);
      reject(socket.lastError || new Error('closed while connecting'));
    });
  });
}

/** Resolves when `socket` can take more output, or has closed. */
function drained(socket) {
  return new Promise((resolve) => {
    if (socket.destroyed) return resolve();
    const done = () => {
      socket.off('drain', done);
      socket.off('close', done);
      resolve();
    };
    socket.on('drain', done);
    socket.on('close', done);
    return undefined;
  });
}

/**
 * The connection this server dials to one neighbour, and only writes on (README "Peer
 * links"): greeting, the whole store, then every new record. Redialled with backoff.
 */
class Link {
  static CONNECT_TIMEOUT_MS = 2000;
  static FIRST_RETRY_MS = 50;
  static MAX_RETRY_MS = 2000;
  static SYNC_BATCH = 64 * 1024; // bytes of store written before waiting for the socket to drain

  constructor(herd, peer) {
    this.herd = herd;
    this.name = peer.name;
    this.host = peer.host;
    this.port = peer.port;
    this.socket = null; // set while the link is up
    this.dropReason = null;
  }

  /** Sends one record if the link is up. A down link drops it: updates are not queued for a
   *  link that is down, the sync on reconnect repairs it. */
  send(line) {
    const socket = this.socket;
    if (socket === null) return;
    socket.write(line + '\n', 'latin1');
    this.herd.log.write(`link ${this.name} > ${escape(line)}`);
    if (socket.writableLength > this.herd.cfg.peerOutputBytes) {
      this.drop(`output over ${this.herd.cfg.peerOutputBytes} bytes`);
    }
  }

  /** Abandons the connection; run() notices, logs and redials (then re-syncs). */
  drop(reason) {
    if (this.socket !== null) {
      this.dropReason = reason;
      this.socket.destroy();
      this.socket = null;
    }
  }

  async run() {
    const log = this.herd.log;
    let delay = Link.FIRST_RETRY_MS;
    for (;;) {
      let reason;
      let socket = null;
      try {
        socket = await dial(this.host, this.port, Link.CONNECT_TIMEOUT_MS);
      } catch (e) {
        reason = e.reason || reasonOf(e);
      }
      if (socket !== null) {
        delay = Link.FIRST_RETRY_MS;
        reason = await this.serve(socket);
      }
      log.write(`link ${this.name} down: ${reason}; retry in ${delay} ms`);
      await sleep(delay);
      delay = Math.min(delay * 2, Link.MAX_RETRY_MS);
    }
  }

  /** Greets, syncs, then waits for the link to close; returns why it did. */
  async serve(socket) {
    const log = this.herd.log;
    log.write(`link ${this.name} up to ${this.host}:${this.port}`);
    this.socket = socket;
    this.dropReason = null;
    socket.setNoDelay(true);
    const closed = new Promise((resolve) => socket.once('close', resolve));
    // The accepting side never writes on a link; if a neighbour does (it does not list us as
    // a neighbour and answers us as a client), say so once.
    let complained = false;
    socket.on('data', (data) => {
      if (!complained) {
        complained = true;
        log.write(`link ${this.name} unexpected data: ${escape(data.toString('latin1', 0, 200))}`);
      }
    });
    const greeting = 'PEER herd/1 ' + this.herd.name;
    socket.write(greeting + '\n', 'latin1');
    log.write(`link ${this.name} > ${escape(greeting)}`);
    await this.sync(socket);
    await closed;
    if (this.socket === socket) this.socket = null;
    if (this.dropReason !== null) return this.dropReason;
    return socket.lastError ? reasonOf(socket.lastError) : 'end of stream';
  }

  /** Sends the whole store in batches that keep the link's output small. Records that
   *  change meanwhile are also flooded live; duplicates are harmless (the merge is
   *  idempotent, and the order is total, so arrival order does not matter). */
  async sync(socket) {
    const lines = Array.from(this.herd.store.values(), (record) => record.line); // a snapshot
    let start = 0;
    while (start < lines.length && this.socket === socket) {
      let end = start;
      let size = 0;
      while (end < lines.length && size < Link.SYNC_BATCH) {
        size += lines[end].length + 1;
        end++;
      }
      const batch = lines.slice(start, end);
      const ready = socket.write(batch.join('\n') + '\n', 'latin1');
      for (const line of batch) this.herd.log.write(`link ${this.name} > ${escape(line)}`);
      start = end;
      if (!ready) await drained(socket);
    }
  }
}

/** This server's state: configuration, the store of records, the links to its neighbours. */
class Herd {
  constructor(cfg, log) {
    this.cfg = cfg;
    this.log = log;
    this.name = bytesOf(cfg.me.name);
    this.neighbours = new Map(cfg.me.neighbors.map((n) => [bytesOf(n), n]));
    this.store = new Map(); // client -> { timeNs, line }, both byte strings but the time
    this.links = new Map(cfg.me.neighbors.map((n) => [n, new Link(this, cfg.servers.get(n))]));
    this.places = new Places(cfg, log);
    this.connections = new Set();
    this.connectionIds = 0;
    // A peer line is an AT line made from a client line of up to max_line_bytes: its
    // difference field can be about as long as the time field, so allow twice plus slack.
    this.maxPeerLine = 2 * cfg.maxLineBytes + 1024;
  }

  /** Stores the record if it is newer (client time, then line bytes) than the one held. */
  merge(client, timeNs, line) {
    const held = this.store.get(client);
    if (held !== undefined) {
      if (timeNs < held.timeNs || (timeNs === held.timeNs && line <= held.line)) return false;
      held.timeNs = timeNs;
      held.line = own(line);
    } else {
      this.store.set(own(client), { timeNs, line: own(line) });
    }
    return true;
  }

  flood(line, cameFrom = null) {
    for (const [name, link] of this.links) {
      if (name !== cameFrom) link.send(line);
    }
  }

  /** The AT reply to a valid IAMAT (after storing and flooding it if newer), else null. */
  iamat(fields, receivedNs) {
    const [, client, location, clientTime] = fields;
    const timeNs = parseTimeNs(clientTime);
    if (timeNs === null || parseLocation(location) === null) return null;
    const line = `AT ${this.name} ${formatDiff(receivedNs - timeNs)} ${client} ${location} ${clientTime}`;
    if (this.merge(client, timeNs, line)) this.flood(line); // peers first, then the client (SPEC 5)
    return line + '\n';
  }

  /** Closes client connections with nothing received and nothing pending for too long. */
  sweepIdle() {
    const idle = this.cfg.idleTimeoutMs;
    if (idle <= 0) return; // 0 disables the idle timeout
    setInterval(() => {
      const cutoff = performance.now() - idle;
      for (const c of this.connections) {
        if (c.peer === null && c.lastActive < cutoff && c.slots.size === 0) {
          c.close(`idle for ${idle} ms`);
        }
      }
    }, Math.min(Math.max(idle / 4, 50), 10_000));
  }
}

// --------------------------------------------------------------------------------------------
// Accepted connections: clients and inbound peer links
// --------------------------------------------------------------------------------------------

/** A first-in, first-out queue with O(1) shift (an Array's shift() is O(n)). */
class Queue {
  constructor() {
    this.items = [];
    this.head = 0;
  }

  get size() {
    return this.items.length - this.head;
  }

  push(item) {
    this.items.push(item);
  }

  peek() {
    return this.items[this.head];
  }

  shift() {
    const item = this.items[this.head];
    this.items[this.head++] = undefined;
    if (this.head === this.items.length) {
      this.items = [];
      this.head = 0;
    }
    return item;
  }
}

/**
 * One accepted connection. Its first line decides: a greeting from a configured neighbour
 * makes it an inbound peer link (records in, nothing out); anything else, a client.
 */
class Connection {
  constructor(herd, socket) {
    this.herd = herd;
    this.cfg = herd.cfg;
    this.log = herd.log;
    this.id = `c${++herd.connectionIds}`;
    this.socket = socket;
    this.peer = null; // neighbour name once greeted
    this.decided = false; // whether the first line has arrived
    this.buffer = ''; // received bytes not yet processed
    this.out = []; // replies ready to go out with the next write
    this.slots = new Queue(); // replies queued behind an unanswered WHATSAT: { data }
    this.waiting = 0; // WHATSATs in flight
    this.inFlight = new Set(); // their AbortControllers, aborted when the connection is lost
    this.lineLimit = this.cfg.maxLineBytes;
    this.eof = false; // the client half-closed
    this.closing = false; // reading stopped; close once the queued replies are written
    this.paused = false;
    this.shut = false; // the socket is closing or closed: nothing more is written
    this.lost = false;
    this.closeReason = null;
    this.error = null;
    this.lastActive = performance.now();
  }

  // -- socket events --------------------------------------------------------------------------

  start() {
    const socket = this.socket;
    socket.setNoDelay(true);
    socket.on('error', (e) => {
      this.error = e;
    });
    socket.on('close', () => this.connectionLost());
    if (this.herd.connections.size >= this.cfg.maxConnections) {
      this.log.write(`${this.id} refused: over ${this.cfg.maxConnections} connections`);
      this.closing = true;
      this.shut = true;
      this.lost = true;
      socket.write('? server busy\n', 'latin1', () => socket.destroy());
      return;
    }
    this.herd.connections.add(this);
    this.log.write(`${this.id} accepted from ${socket.remoteAddress}:${socket.remotePort}`);
    socket.setEncoding('latin1');
    socket.on('data', (data) => this.guard(() => this.dataReceived(data)));
    socket.on('end', () => this.guard(() => this.eofReceived()));
  }

  /** Runs an event handler; a bug costs this connection, not the server. */
  guard(handler) {
    try {
      handler();
    } catch (e) {
      process.stderr.write(`herd_prototype: ${this.id}: ${e.stack || e}\n`);
      this.closeReason = `internal error (${e.name})`;
      this.abort();
    }
  }

  dataReceived(data) {
    if (this.closing) return;
    this.lastActive = performance.now();
    this.buffer = this.buffer ? this.buffer + data : data;
    this.process();
  }

  eofReceived() {
    this.eof = true;
    if (!this.closing) this.process();
    // With nothing left to answer, close now; otherwise the replies still waiting on Places
    // close it when they are written.
    if (this.done()) this.closeSocket();
  }

  connectionLost() {
    if (this.lost) return;
    this.lost = true;
    this.shut = true;
    this.herd.connections.delete(this);
    for (const abort of this.inFlight) abort.abort();
    const reason = this.closeReason || (this.error ? reasonOf(this.error) : 'end of stream');
    this.log.write(`${this.peer !== null ? `peer ${this.peer}` : this.id} closed: ${reason}`);
  }

  // -- reading ------------------------------------------------------------------------------

  /** Handles every complete line in the buffer (and the last, unterminated one after end of
   *  stream), unless too many WHATSATs are in flight: then reading pauses. */
  process() {
    const buf = this.buffer;
    let start = 0;
    const receivedNs = clock.nowNs(); // everything here arrived together
    while (!this.closing && this.waiting < this.cfg.pendingReplies) {
      let end = buf.indexOf('\n', start);
      if (end < 0) {
        if (!(this.eof && start < buf.length)) break;
        end = buf.length; // a last line without "\n" before end of stream
      }
      const line = buf.slice(start, end);
      start = end + 1;
      if (line.length > this.lineLimit) this.overlong(line);
      else if (this.peer !== null) this.peerLine(line);
      else this.clientLine(line, receivedNs);
    }
    this.buffer = buf.slice(start);
    if (!this.closing && this.buffer.length > this.lineLimit &&
        this.waiting < this.cfg.pendingReplies) {
      this.overlong(this.buffer); // no "\n" within the limit: no need to wait for one
    }
    if (this.closing) this.buffer = '';
    this.writeOut();
    this.flowControl();
    if (this.done() && (this.eof || this.closing)) this.closeSocket();
  }

  clientLine(line, receivedNs) {
    this.log.write(`${this.id} < ${escape(line)}`);
    const fields = splitFields(line);
    if (!this.decided) {
      this.decided = true;
      const name = greetingName(fields);
      if (name !== null && this.herd.neighbours.has(name)) {
        this.peer = this.herd.neighbours.get(name);
        this.lineLimit = this.herd.maxPeerLine;
        this.log.write(`${this.id} is peer ${this.peer}`);
        return;
      }
    }
    if (fields.length === 0) return; // blank line: no reply
    if (fields.length === 4) {
      if (fields[0] === 'IAMAT') {
        const reply = this.herd.iamat(fields, receivedNs);
        if (reply !== null) {
          this.reply(reply);
          return;
        }
      } else if (fields[0] === 'WHATSAT' && this.whatsat(fields)) {
        return;
      }
    }
    this.reply('? ' + line + '\n');
  }

  peerLine(line) {
    if (ALL_WHITE_SPACE.test(line)) return;
    this.log.write(`peer ${this.peer} < ${escape(line)}`);
    const record = parseAtRecord(line);
    if (record === null) {
      this.log.write(`peer ${this.peer} sent an invalid record; ignored`);
    } else if (this.herd.merge(record[0], record[1], line)) {
      this.herd.flood(line, this.peer);
    }
  }

  overlong(line) {
    const limit = this.lineLimit;
    if (this.peer !== null) { // never write on a peer link: just drop it
      this.close(`line longer than ${limit} bytes`);
      return;
    }
    this.log.write(`${this.id} < ${escape(line.slice(0, 64))}... (${line.length} bytes)`);
    this.reply(`? ${line.slice(0, 64)}... (line longer than ${limit} bytes)\n`);
    this.closing = true;
    this.closeReason = `line longer than ${limit} bytes`;
    this.socket.pause();
  }

  // -- WHATSAT ------------------------------------------------------------------------------

  /** Starts a valid WHATSAT (its reply slot keeps its place in line); false if invalid. */
  whatsat(fields) {
    const radiusM = parseRadiusM(fields[2]);
    const bound = parseBound(fields[3]);
    const record = this.herd.store.get(fields[1]);
    if (radiusM === null || bound === null || record === undefined) return false;
    const atLine = record.line;
    const [lat, lng] = parseLocation(atLine.split(' ')[4]);
    const deadline = performance.now() + this.cfg.timeoutMs;
    const slot = { data: null };
    this.slots.push(slot);
    this.waiting += 1;
    this.answer(slot, atLine, lat, lng, radiusM, bound, deadline);
    return true;
  }

  async answer(slot, atLine, lat, lng, radiusM, bound, deadline) {
    const abort = new AbortController();
    this.inFlight.add(abort);
    // Like asyncio.create_task() in the Python prototype: the search starts once the handler
    // that read the command has returned, after the replies to the lines read with it.
    await Promise.resolve();
    if (this.lost) return; // the client went first
    const body = await this.herd.places.search(lat, lng, radiusM, bound, deadline, abort);
    this.inFlight.delete(abort);
    if (body === null || this.lost) return; // the client has gone
    this.guard(() => {
      slot.data = `${atLine}\n${body}\n\n`;
      this.waiting -= 1;
      while (this.slots.size > 0 && this.slots.peek().data !== null) {
        this.out.push(this.slots.shift().data);
      }
      this.writeOut();
      this.flowControl();
      if (this.paused || this.shut) return;
      if (this.buffer || this.eof) this.process(); // lines held back while WHATSATs were in flight
      else if (this.closing && this.done()) this.closeSocket();
    });
  }

  // -- writing ------------------------------------------------------------------------------

  reply(data) {
    if (this.slots.size > 0) this.slots.push({ data }); // behind an unanswered WHATSAT
    else this.out.push(data);
  }

  /** Writes every ready reply with one write() (test clients do a single read()). */
  writeOut() {
    if (this.out.length === 0) return;
    if (this.shut) {
      this.out.length = 0;
      return;
    }
    for (const data of this.out) this.log.write(`${this.id} > ${escape(data)}`);
    this.socket.write(this.out.length === 1 ? this.out[0] : this.out.join(''), 'latin1');
    this.out.length = 0;
    if (this.socket.writableLength > this.cfg.clientOutputBytes) {
      this.closeReason = `over ${this.cfg.clientOutputBytes} bytes of unread replies`;
      this.abort();
    }
  }

  /** Stops reading while pending_replies WHATSATs are in flight (README limits). */
  flowControl() {
    if (this.closing || this.shut) return;
    const full = this.waiting >= this.cfg.pendingReplies;
    if (full && !this.paused) {
      this.paused = true;
      this.socket.pause();
    } else if (!full && this.paused) {
      this.paused = false;
      this.socket.resume();
    }
  }

  /** Nothing left to answer: no queued reply, and no held-back input (unless closing). */
  done() {
    return this.slots.size === 0 && (this.closing || this.buffer === '');
  }

  /** Closes once what is written has gone out, as asyncio's transport.close() does: reading
   *  stops now; the connection is lost (and logged) before the socket closes, so a client
   *  that sees the end of the stream finds the log already saying why. */
  closeSocket() {
    if (this.shut) return;
    this.shut = true;
    this.socket.pause();
    this.socket.write('', 'latin1', (e) => { // called once every earlier write has gone out
      if (e) this.error = e;
      this.connectionLost();
      this.socket.destroy();
    });
  }

  /** Closes at once, dropping unsent output (asyncio's transport.abort()). */
  abort() {
    this.shut = true;
    this.connectionLost();
    this.socket.destroy();
  }

  close(reason) {
    this.closeReason = reason;
    this.closing = true;
    this.closeSocket();
  }
}

// --------------------------------------------------------------------------------------------
// Process
// --------------------------------------------------------------------------------------------

function serve(cfg, log) {
  const herd = new Herd(cfg, log);
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    new Connection(herd, socket).start();
  });
  server.on('error', (e) => { // e.g. the port is taken
    process.stderr.write(`herd_prototype: ${cfg.me.name}: ${strerror(e)}\n`);
    log.close();
    process.exit(1);
  });
  const stop = () => {
    server.close(); // stop accepting
    log.write('stopping on signal');
    log.close();
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  server.listen({ host: cfg.me.host, port: cfg.me.port, backlog: 1024 }, () => {
    const { port } = server.address();
    log.write(`${cfg.me.name} listening on ${cfg.me.host}:${port} (Node.js ${process.version})`);
    process.stdout.write(`${cfg.me.name} listening on ${cfg.me.host}:${port}, logging to ${cfg.logPath}\n`);
    for (const link of herd.links.values()) link.run();
    herd.sweepIdle();
  });
}

const USAGE = 'usage: herd_prototype.js [-h] [--config PATH] NAME';

function usageError(message) {
  process.stderr.write(`${USAGE}\nherd_prototype.js: error: ${message}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  let name = null;
  let config = 'herd.toml';
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '-h' || arg === '--help') {
      process.stdout.write(`${USAGE}\n\nNode.js prototype of one herd server.\n\n` +
        'positional arguments:\n  NAME           the server of the configuration to run\n\n' +
        'options:\n  -h, --help     show this help message and exit\n  --config PATH\n');
      process.exit(0);
    } else if (arg === '--config') {
      if (i + 1 >= argv.length) usageError('argument --config: expected one argument');
      config = argv[++i];
    } else if (arg.startsWith('--config=')) {
      config = arg.slice('--config='.length);
    } else if (arg.startsWith('-') && arg !== '-') {
      usageError(`unrecognized arguments: ${arg}`);
    } else if (name === null) {
      name = arg;
    } else {
      usageError(`unrecognized arguments: ${arg}`);
    }
  }
  if (name === null) usageError('the following arguments are required: NAME');
  return { name, config };
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  let cfg;
  try {
    cfg = loadConfig(args.config, args.name);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    process.stderr.write(`herd_prototype: ${e.message}\n`);
    process.exit(2);
  }
  let log;
  try {
    log = new Log(cfg.logPath);
  } catch (e) {
    process.stderr.write(`herd_prototype: cannot open ${cfg.logPath}: ${strerror(e)}\n`);
    process.exit(1);
  }
  serve(cfg, log);
}

if (require.main === module) {
  main();
} else { // the pure functions, for checks
  module.exports = {
    splitFields, parseLocation, parseTimeNs, parseRadiusM, parseBound, formatDiff,
    parseAtRecord, greetingName, cutBody, errorBody, escape, parseToml, NotJson, TomlError,
  };
}
