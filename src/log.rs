//! The server's own log file (docs/protocol.md section 8): every line received and sent, every
//! peer link made or dropped, every Places request and its outcome.
//!
//! Lines are appended to a buffer and written once per turn of the loop, in one `write`, so
//! logging every line costs a copy, not a system call per line. The time stamp is formatted once
//! per turn too: every event of a turn happened at that turn's `now`. Client bytes are escaped,
//! so a client cannot forge a log line.
//!
//! The write is a blocking call on the loop, kept small: the buffer of one turn, to a file
//! opened for appending, whose pages are handed to the disk and dropped from the cache as it
//! goes ([`CachedPages`]). A log that cannot be written does not stop the server
//! ([`Log::flush`]); rotation ([`Log::rotate_at`]) and SIGHUP ([`Log::reopen`]) keep the file
//! from growing without end.

use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bytes::{escape_into, push_decimal};
use crate::pages::CachedPages;

/// Past this much buffered text the log is written out at once rather than at the end of the
/// turn: a turn that logs a great deal (a copy of the store to a neighbour, every record of it
/// logged; a burst of pipelined commands) holds no more than this, and no write is larger.
const FLUSH_AT_BYTES: usize = 1 << 20;

/// A server's log: the file, and the lines of the current turn not yet written to it.
pub struct Log {
    /// `None` for a log that keeps nothing ([`Log::discard`]).
    file: Option<File>,
    /// Where the file is: opened again after a rotation, on SIGHUP, or after a failed write.
    path: Option<PathBuf>,
    /// What of the file the page cache still holds on the log's account.
    cached: CachedPages,
    buf: Vec<u8>,
    /// `2026-11-24T17:26:00.123456Z`, the current turn's time.
    stamp: String,
    /// The last write failed: said once, and every flush opens the file again until one works.
    failed: bool,
    /// Past this many bytes the file is rotated (`log_max_bytes`; 0: never), keeping `keep`
    /// older files.
    max_bytes: u64,
    keep: usize,
}

/// Opens `path` for appending, owner-only (a file made earlier with looser permissions is
/// tightened): the log holds what clients sent and the herd's own business.
fn open_file(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .and_then(|file| {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            Ok(file)
        })
        .map_err(|e| format!("cannot open log file {}: {e}", path.display()))
}

impl Log {
    /// Opens `path` for appending, creating its directory. Called before the loop starts, so
    /// an unwritable log directory stops the server's start with a message rather than a
    /// server that runs without its log.
    pub fn open(path: &Path) -> Result<Log, String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create log directory {}: {e}", dir.display()))?;
        }
        let file = open_file(path)?;
        let length = file
            .metadata()
            .map_err(|e| format!("cannot read log file {}: {e}", path.display()))?
            .len();
        Ok(Log {
            file: Some(file),
            path: Some(path.to_path_buf()),
            cached: CachedPages::after(length),
            ..Log::discard()
        })
    }

    /// A log that keeps nothing (for tests of the parts that log).
    pub fn discard() -> Log {
        Log {
            file: None,
            path: None,
            cached: CachedPages::after(0),
            buf: Vec::with_capacity(FLUSH_AT_BYTES),
            stamp: String::new(),
            failed: false,
            max_bytes: 0,
            keep: 0,
        }
    }

    /// Rotates the file once it passes `max_bytes` (0: never), keeping `keep` older files as
    /// `NAME.log.1` (the newest) to `NAME.log.KEEP`.
    pub fn rotate_at(&mut self, max_bytes: u64, keep: usize) {
        self.max_bytes = max_bytes;
        self.keep = keep;
    }

    /// Opens the file again at its path: after logrotate moved it away (SIGHUP), after a
    /// rotation, or to try again after a failed write. What was buffered goes to the new file
    /// (on SIGHUP the loop flushes first, so the lines before the signal stay in the old one).
    /// On an error the old descriptor is kept: the lines go on to the file that was moved away.
    pub fn reopen(&mut self) -> Result<(), String> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let file = open_file(path)?;
        let length = file.metadata().map(|m| m.len()).unwrap_or(0);
        self.file = Some(file);
        self.cached = CachedPages::after(length);
        Ok(())
    }

    /// Moves `NAME.log` to `NAME.log.1` (and each older one a number up, the oldest dropped),
    /// then starts a new `NAME.log`. Called by [`Log::flush`] once the file has passed
    /// `max_bytes`: a removal and `keep` renames on the loop, each a metadata change only.
    fn rotate(&mut self) -> Result<(), String> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let numbered = |n: usize| {
            let mut name = path.clone().into_os_string();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        // Nothing kept: the full file is simply removed, and a new one started below.
        if self.keep == 0 {
            let _ = std::fs::remove_file(&path);
        } else {
            // Oldest first, so no rename lands on a file still to be moved. A missing numbered
            // file (fewer rotations so far than `keep`) is no error.
            let _ = std::fs::remove_file(numbered(self.keep));
            for n in (1..self.keep).rev() {
                let _ = std::fs::rename(numbered(n), numbered(n + 1));
            }
            // The one rename that matters: if it fails, the full file stays where it is.
            std::fs::rename(&path, numbered(1))
                .map_err(|e| format!("cannot rotate {}: {e}", path.display()))?;
        }
        // The open descriptor still points at the file just renamed: the next lines must go to
        // a new one.
        self.reopen()
    }
    /// Sets the time stamp of the lines that follow: once per turn of the loop.
    pub fn set_time(&mut self, now: SystemTime) {
        self.stamp.clear();
        format_utc(&mut self.stamp, now);
    }

    /// `STAMP WHO DIR BYTES`: a protocol line received (`<`) or sent (`>`), escaped. The hot
    /// path of logging (every line of every client), so nothing here goes through `fmt`.
    pub fn bytes(&mut self, who: Who, dir: char, bytes: &[u8]) {
        self.buf.extend_from_slice(self.stamp.as_bytes());
        self.buf.push(b' ');
        match who {
            Who::Conn(id) => {
                self.buf.push(b'c');
                push_decimal(&mut self.buf, id);
            }
            Who::Link(name) => {
                self.buf.extend_from_slice(b"link ");
                self.buf.extend_from_slice(name.as_bytes());
            }
            Who::Peer(name) => {
                self.buf.extend_from_slice(b"peer ");
                self.buf.extend_from_slice(name.as_bytes());
            }
        }
        self.buf.push(b' ');
        self.buf.push(dir as u8);
        self.buf.push(b' ');
        escape_into(&mut self.buf, bytes);
        self.end();
    }

    /// `STAMP WHO TEXT`: an event. `what` is escaped like client bytes, since it may carry
    /// text from outside (a Places status as Google sent it, an error a neighbour caused);
    /// `who` is the server's own text (`c7`, `link Bona`) and is not. Formats through a
    /// `String`: events are rarer than lines.
    pub fn event(&mut self, who: fmt::Arguments, what: fmt::Arguments) {
        self.start(who);
        let mut text = String::new();
        let _ = text.write_fmt(what);
        escape_into(&mut self.buf, text.as_bytes());
        self.end();
    }

    /// The stamp and `who` of an event's line.
    fn start(&mut self, who: fmt::Arguments) {
        self.buf.extend_from_slice(self.stamp.as_bytes());
        self.buf.push(b' ');
        let _ = self.buf.write_fmt(who);
        self.buf.push(b' ');
    }

    /// Ends a line; writes the buffer out now if it has grown past [`FLUSH_AT_BYTES`].
    fn end(&mut self) {
        self.buf.push(b'\n');
        if self.buf.len() >= FLUSH_AT_BYTES {
            self.flush();
        }
    }

    /// Whether the last write to the file failed.
    pub fn failing(&self) -> bool {
        self.failed
    }

    /// Writes out what the turn logged. A failing disk does not stop the server: it says so
    /// once on standard error, then opens the file again at each flush until a write works (the
    /// lines in between are dropped, and the return says so once).
    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        // Failing: each flush opens the file afresh and tries again. If it cannot even be
        // opened, the turn's lines are dropped: holding them would grow without bound for as
        // long as the disk is away.
        if self.failed && self.reopen().is_err() {
            self.buf.clear();
            return;
        }
        if let Some(file) = &mut self.file {
            match file.write_all(&self.buf) {
                Ok(()) => {
                    if self.failed {
                        self.failed = false;
                        log::warn!("the log file can be written again");
                    }
                    self.cached.wrote(file, self.buf.len() as u64);
                }
                // The first failure is said on standard error; the loop's `/healthz` reports it
                // from [`Log::failing`] until a write works.
                Err(e) if !self.failed => {
                    self.failed = true;
                    log::error!("cannot write the log file: {e}");
                }
                Err(_) => {}
            }
        }
        // Written or not, the lines go: see above.
        self.buf.clear();
        // Rotation is judged on the bytes written since the file was opened, added to its size
        // then; a failing log is not rotated (the failure is dealt with first).
        if self.max_bytes != 0 && self.cached.end >= self.max_bytes && !self.failed {
            if let Err(e) = self.rotate() {
                self.failed = true;
                log::error!("{e}");
            }
        }
    }
}

/// Whose line a protocol line is: an accepted connection's (`c7`), or a neighbour's on the
/// link we dialled (`link Bona`) or on the one it dialled (`peer Bona`).
#[derive(Debug, Clone, Copy)]
pub enum Who<'a> {
    /// An accepted connection, by its id: a client, or a neighbour not yet proved.
    Conn(u64),
    /// The link this server dialled to the named neighbour.
    Link(&'a str),
    /// The link the named neighbour dialled to this server.
    Peer(&'a str),
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
    fn lines_have_stamp_who_and_direction() {
        let mut log = Log::discard();
        log.set_time(UNIX_EPOCH);
        log.bytes(Who::Conn(7), '<', b"IAMAT x");
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
