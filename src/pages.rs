//! The page cache of a file only ever appended to: [`CachedPages`] hands what is written to the
//! disk as it goes and drops it from the cache a while later. The log ([`crate::log`]) and the
//! store's file ([`crate::aof`]) both use it.

use std::fs::File;
use std::ops::Range;

/// The pages of a file the server only appends to, in the page cache. The server appends to its
/// log and to its store's file and never reads them back while it runs, yet every page written
/// stays cached until memory runs short: a busy server would fill the machine's memory with them, and each new page costs the kernel an allocation (on a virtual
/// machine whose idle memory goes back to the host, a first touch too, about 7 µs a page: more
/// than the write itself). So what is written is handed to the disk at once, in steps of at
/// least [`HAND_OVER_AT`] bytes, and dropped from the cache once [`CACHE_LAG`] more bytes have
/// followed it, long since on disk; the kernel then reuses those pages for the next writes.
///
/// Handing pages to the disk costs the loop time (the file system's block allocation runs in
/// the caller), about 0.1 ms per MiB: in small steps, each of some microseconds, so that no
/// client waits for a long one. Both calls are advice: an error changes nothing but memory use,
/// so it is ignored. On tmpfs the kernel ignores them.
pub struct CachedPages {
    /// The end of the file: where the next write lands.
    pub end: u64,
    /// Everything before this was handed to the disk.
    handed: u64,
    /// Everything before this was dropped from the cache.
    dropped: u64,
}

/// The least handed to the disk at once.
const HAND_OVER_AT: u64 = 64 << 10;

/// How far behind the end pages are dropped: at 250 MB/s, 64 ms for the disk.
const CACHE_LAG: u64 = 16 << 20;

/// Only whole pages are handed over: the last, partly written one would be written twice.
const PAGE: u64 = 4096;

impl CachedPages {
    /// The pages of a file `length` bytes long, just opened: its whole pages count as handed
    /// over and dropped already.
    pub fn after(length: u64) -> CachedPages {
        let whole = length / PAGE * PAGE;
        CachedPages {
            end: length,
            handed: whole,
            dropped: whole,
        }
    }

    /// `written` more bytes are in the file: `release` what is to be handed to the disk now,
    /// and what is to be dropped from the cache, when enough of either has gathered.
    fn wrote_then(&mut self, written: u64, release: impl FnOnce(Range<u64>, Option<Range<u64>>)) {
        self.end += written;
        let whole = self.end / PAGE * PAGE;
        if whole - self.handed < HAND_OVER_AT {
            return;
        }
        let hand = self.handed..whole;
        self.handed = whole;
        let old = whole.saturating_sub(CACHE_LAG);
        let drop = (old > self.dropped).then_some(self.dropped..old);
        self.dropped = self.dropped.max(old);
        release(hand, drop);
    }

    /// `written` more bytes went into `file` at its end: hands to the disk, and drops from the
    /// cache, what is due.
    pub fn wrote(&mut self, file: &File, written: u64) {
        self.wrote_then(written, |hand, drop| release(file, hand, drop));
    }
}

/// Starts writing `hand` to disk, and drops `drop` from the cache.
#[cfg(target_os = "linux")]
fn release(file: &File, hand: Range<u64>, drop: Option<Range<u64>>) {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let offset = |at: u64| libc::off_t::try_from(at).unwrap_or(libc::off_t::MAX);
    // SAFETY: plain system calls on a descriptor this file owns, with no pointers.
    unsafe {
        let (start, length) = (offset(hand.start), offset(hand.end - hand.start));
        libc::sync_file_range(fd, start, length, libc::SYNC_FILE_RANGE_WRITE);
        if let Some(drop) = drop {
            let (start, length) = (offset(drop.start), offset(drop.end - drop.start));
            libc::posix_fadvise(fd, start, length, libc::POSIX_FADV_DONTNEED);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn release(_: &File, _: Range<u64>, _: Option<Range<u64>>) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_pages_go_to_disk_in_steps_and_leave_the_cache_lag_bytes_later() {
        let mut released = Vec::new();
        // A file that held half a page when it was opened.
        let mut pages = CachedPages::after(PAGE / 2);
        pages.wrote_then(HAND_OVER_AT - PAGE, |h, d| released.push((h, d)));
        assert!(released.is_empty(), "in steps of HAND_OVER_AT");
        pages.wrote_then(PAGE, |h, d| released.push((h, d)));
        assert_eq!(released, [(0..HAND_OVER_AT, None)], "whole pages only");
        // Up to the lag, nothing is dropped; then what lies the lag behind the end, once.
        let mut end = HAND_OVER_AT + PAGE / 2;
        while end < CACHE_LAG + 3 * HAND_OVER_AT {
            pages.wrote_then(HAND_OVER_AT, |h, d| released.push((h, d)));
            end += HAND_OVER_AT;
        }
        let end = end - PAGE / 2; // the last whole page
        let handed: Vec<Range<u64>> = released.iter().map(|r| r.0.clone()).collect();
        assert!(
            handed.windows(2).all(|w| w[0].end == w[1].start),
            "{handed:?}"
        );
        assert_eq!(handed.last().map(|h| h.end), Some(end));
        let dropped: Vec<Range<u64>> = released.iter().filter_map(|r| r.1.clone()).collect();
        assert_eq!(dropped.first().map(|d| d.start), Some(0));
        assert!(
            dropped.windows(2).all(|w| w[0].end == w[1].start),
            "{dropped:?}"
        );
        assert_eq!(dropped.last().map(|d| d.end), Some(end - CACHE_LAG));
    }
}
