//! The server's own log file (SPEC.md section 8): every line received and sent, every peer link
//! made or dropped, every Places request and its outcome.
//!
//! Lines are appended to a buffer and written once per turn of the loop, in one `write`, so
//! logging every line costs a copy, not a system call per line. The time stamp is formatted once
//! per turn too: every event of a turn happened at that turn's `now`. Client bytes are escaped,
//! so a client cannot forge a log line.

use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Past this much buffered text the log is written out at once rather than at the end of the turn.
const FLUSH_AT_BYTES: usize = 1 << 20;

pub struct Log {
    file: Option<File>,
    buf: Vec<u8>,
    /// `2026-11-24T17:26:00.123456Z`, the current turn's time.
    stamp: String,
    failed: bool,
}

impl Log {
    /// Opens `path` for appending, creating its directory.
    pub fn open(path: &Path) -> Result<Log, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create log directory {}: {e}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
        Ok(Log {
            file: Some(file),
            ..Log::discard()
        })
    }

    /// A log that keeps nothing (for tests of the parts that log).
    pub fn discard() -> Log {
        Log {
            file: None,
            buf: Vec::with_capacity(FLUSH_AT_BYTES),
            stamp: String::new(),
            failed: false,
        }
    }

    /// Sets the time stamp of the lines that follow: once per turn of the loop.
    pub fn set_time(&mut self, now: SystemTime) {
        self.stamp.clear();
        format_utc(&mut self.stamp, now);
    }

    /// `STAMP WHO DIR BYTES`: a protocol line received (`<`) or sent (`>`), escaped.
    pub fn bytes(&mut self, who: fmt::Arguments, dir: char, bytes: &[u8]) {
        self.start(who);
        self.buf.push(dir as u8);
        self.buf.push(b' ');
        escape_into(&mut self.buf, bytes);
        self.end();
    }

    /// `STAMP WHO TEXT`: an event.
    pub fn event(&mut self, who: fmt::Arguments, what: fmt::Arguments) {
        self.start(who);
        let mut text = String::new();
        let _ = text.write_fmt(what);
        escape_into(&mut self.buf, text.as_bytes());
        self.end();
    }

    fn start(&mut self, who: fmt::Arguments) {
        self.buf.extend_from_slice(self.stamp.as_bytes());
        self.buf.push(b' ');
        let _ = self.buf.write_fmt(who);
        self.buf.push(b' ');
    }

    fn end(&mut self) {
        self.buf.push(b'\n');
        if self.buf.len() >= FLUSH_AT_BYTES {
            self.flush();
        }
    }

    /// Writes out what the turn logged. A failing disk does not stop the server: it says so
    /// once on standard error and drops log lines until writes succeed again.
    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if let Some(file) = &mut self.file {
            match file.write_all(&self.buf) {
                Ok(()) => self.failed = false,
                Err(e) if !self.failed => {
                    self.failed = true;
                    log::error!("cannot write the log file: {e}");
                }
                Err(_) => {}
            }
        }
        self.buf.clear();
    }
}

/// Appends `bytes` with everything but printable ASCII escaped: `\n`, `\r`, `\t`, `\\`, `\xNN`.
pub fn escape_into(out: &mut Vec<u8>, bytes: &[u8]) {
    if bytes
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'\\')
    {
        out.extend_from_slice(bytes); // the common case: one copy
        return;
    }
    for &b in bytes {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x20..=0x7e => out.push(b),
            _ => {
                let hex = b"0123456789abcdef";
                out.extend_from_slice(&[
                    b'\\',
                    b'x',
                    hex[usize::from(b >> 4)],
                    hex[usize::from(b & 15)],
                ]);
            }
        }
    }
}

/// Formats `t` as `YYYY-MM-DDTHH:MM:SS.uuuuuuZ` (UTC).
pub fn format_utc(out: &mut String, t: SystemTime) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days, after Howard Hinnant's algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_micros()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_stamps() {
        let mut s = String::new();
        format_utc(
            &mut s,
            UNIX_EPOCH + Duration::from_micros(1_621_464_827_959_498),
        );
        assert_eq!(s, "2021-05-19T22:53:47.959498Z");
        s.clear();
        format_utc(&mut s, UNIX_EPOCH + Duration::from_secs(951_782_400));
        assert_eq!(s, "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn client_bytes_cannot_forge_lines() {
        let mut out = Vec::new();
        escape_into(&mut out, b"a\nFAKE\\ \x1b[31m\xff");
        assert_eq!(out, b"a\\nFAKE\\\\ \\x1b[31m\\xff");
    }

    #[test]
    fn lines_have_stamp_who_and_direction() {
        let mut log = Log::discard();
        log.set_time(UNIX_EPOCH);
        log.bytes(format_args!("c{}", 7), '<', b"IAMAT x");
        log.event(
            format_args!("link Bona"),
            format_args!("up to {}", "127.0.0.1:1"),
        );
        assert_eq!(
            String::from_utf8(log.buf.clone()).unwrap(),
            "1970-01-01T00:00:00.000000Z c7 < IAMAT x\n1970-01-01T00:00:00.000000Z link Bona up to 127.0.0.1:1\n"
        );
    }
}
