//! The store on disk: an append-only file of records, replayed at start, so that a server
//! remembers every location across a restart (Redis's AOF, in the same spirit).
//!
//! Every record that changed the store, a client's IAMAT or a neighbour's, is appended as one
//! line: its CRC-32C in eight hex digits, a space, and the `AT` line, as it is stored. A record
//! never holds a `\n`, so a line is a record; the checksum tells a whole record from a torn or
//! damaged one.
//!
//! ```text
//! 5be0c2f3 AT Bailey +0.263873386 kiwi.cs.ucla.edu +34.068930-118.445127 1621464827.959498503
//! ```
//!
//! The turn's records are written at the end of the turn, in one `write`. When they reach the
//! disk depends on `[store] fsync`, with Redis's meanings:
//!
//! - `always`: the loop calls `fdatasync` after that write and before it writes the turn's
//!   replies (a group commit: one per turn, however many records), so an acknowledged IAMAT is
//!   on disk;
//! - `everysec` (the default): a helper thread calls `fdatasync` on its own descriptor of the
//!   file once a second when something was written, so at most about two seconds of records are
//!   lost in a crash of the machine (none when only the server dies). This is the one place
//!   besides DNS where the loop hands work away: the thread only waits on the disk, and wakes
//!   the loop when a sync fails;
//! - `no`: the kernel writes when it likes.
//!
//! Start-up replays the file into the store before the listener opens. A torn tail (the last
//! record cut short by a crash, or damaged) is cut off, and one log line says how many bytes;
//! a damaged record with whole records after it stops start-up with the file and its offset.
//!
//! The file grows with every update; once it is twice the size of the live records (and at
//! least `compact_min_bytes`), it is compacted: the store's records are written to a new file
//! a slice per turn, while new records go to both files; then the new file is synced, renamed
//! over the old one, and the directory synced. A crash at any moment leaves either the old file
//! or the new one whole, and either replays to the store (replay merges, newest wins, so a
//! record in a file twice is harmless).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::Waker;

use crate::config::Fsync;
use crate::metrics::{Histogram, SYNC_BOUNDS};
use crate::pages::CachedPages;
use crate::store::{Bounds, Merge, Store};

/// How much of the store a compaction writes per turn: about a millisecond of the loop. The
/// copy is spread over turns so that no turn, and no client served in it, waits for the
/// whole store to be written.
const COMPACT_TURN_BYTES: usize = 256 * 1024;
/// How often the helper thread syncs an `everysec` file.
const EVERY: Duration = Duration::from_secs(1);

/// CRC-32C (Castagnoli), the checksum of a record; the table is made once, at compile time.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// The CRC-32C of `bytes`; `123456789` gives the standard check value, `e3069283`. Every
/// record written and every record replayed is summed, so it is on the IAMAT's path: with the
/// CPU's own instruction where there is one (x86-64's SSE 4.2, eight bytes a step), else a byte
/// at a time through [`CRC_TABLE`], some ten times slower.
pub fn crc32c(bytes: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU has SSE 4.2, as just asked (the answer is cached after the first).
        return unsafe { crc32c_sse42(bytes) };
    }
    crc32c_table(bytes)
}

/// [`crc32c`] a byte at a time, through the table.
fn crc32c_table(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |crc, &b| {
        CRC_TABLE[usize::from((crc as u8) ^ b)] ^ (crc >> 8)
    })
}

/// [`crc32c`] with SSE 4.2's `crc32` instruction, which computes this very polynomial.
///
/// # Safety
///
/// The CPU must have SSE 4.2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc32c_sse42(bytes: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut crc = u64::from(!0u32);
    let mut words = bytes.chunks_exact(8);
    for chunk in &mut words {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        crc = _mm_crc32_u64(crc, u64::from_le_bytes(word));
    }
    let mut crc = crc as u32;
    for &b in words.remainder() {
        crc = _mm_crc32_u8(crc, b);
    }
    !crc
}

/// Appends `record` as a line of the file: its checksum in eight lower-case hex digits, a
/// space, the record, `\n`.
fn frame(record: &[u8], out: &mut Vec<u8>) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let sum = crc32c(record);
    out.extend(
        (0..8)
            .rev()
            .map(|i| DIGITS[((sum >> (4 * i)) & 0xf) as usize]),
    );
    out.push(b' ');
    out.extend_from_slice(record);
    out.push(b'\n');
}

/// The record of one line of the file (without its `\n`), if its checksum holds. A line too
/// short, without its space, or with a sum that is not hex is damaged like a wrong sum.
fn unframe(line: &[u8]) -> Option<&[u8]> {
    let (sum, record) = (line.get(..8)?, line.get(9..)?);
    if line.get(8) != Some(&b' ') {
        return None;
    }
    // Exactly as `frame` writes it: eight lower-case hex digits.
    let mut value = 0u32;
    for &digit in sum {
        let nibble = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => return None,
        };
        value = value << 4 | u32::from(nibble);
    }
    (crc32c(record) == value).then_some(record)
}

/// What a replay found.
#[derive(Debug, PartialEq, Eq)]
pub struct Replayed {
    /// Whole records read.
    pub records: u64,
    /// Records that changed the store (the rest were older copies, or refused).
    pub stored: u64,
    /// Bytes of a torn tail cut off the file.
    pub cut: u64,
    /// Records the store refused: new clients past its `max_clients` (lowered since they were
    /// written), or lines that are whole but not valid records.
    pub refused: u64,
}

/// Reads the records of `bytes` into `store`. `Ok(len)` with the length of the whole records
/// (the rest is a torn tail); `Err(offset)` if a damaged record has whole records after it.
///
/// The file is only ever appended to, so a crash can damage only its end: a last record cut
/// short, or the last blocks left as garbage. Damage with whole records after it is not a
/// crash's doing (a disk's, or a hand's), and cutting there would throw the good records
/// after it away: start-up stops and leaves the choice to the operator.
///
/// Records are merged with no bounds but the store's own `max_clients`: each passed them when
/// it was stored, and a client time that was near enough to the clock then is behind it now.
fn replay_bytes(bytes: &[u8], store: &mut Store, seen: &mut Replayed) -> Result<usize, usize> {
    let mut at = 0;
    let mut bad: Option<usize> = None;
    while at < bytes.len() {
        let Some(end) = memchr::memchr(b'\n', &bytes[at..]).map(|n| at + n) else {
            break; // the last record, cut short
        };
        match unframe(&bytes[at..end]) {
            // A whole record, with no damage before it: into the store, newest wins.
            Some(record) if bad.is_none() => {
                seen.records += 1;
                match store.merge_record(record, &Bounds::NONE) {
                    Some(Merge::Stored) => seen.stored += 1,
                    Some(Merge::Stale) => {}
                    _ => seen.refused += 1,
                }
            }
            // A whole record after a damaged one: the damage is in the middle.
            Some(_) => return Err(bad.unwrap_or(at)),
            // Damaged: the tail starts here unless a whole record turns up after it.
            None => bad = bad.or(Some(at)),
        }
        at = end + 1;
    }
    // The whole records end at the first damage, or at the last `\n`; what follows (damaged
    // lines, a last line with no `\n`) is the torn tail.
    Ok(bad.unwrap_or(at).min(at))
}

/// The file of records of one server. Owned by the loop ([`crate::herd::Herd`]), which calls
/// [`Aof::append`] as the store changes and [`Aof::end_turn`] before the turn's replies leave.
pub struct Aof {
    path: PathBuf,
    /// The file's directory, synced after a compaction's rename so the new name survives a crash.
    dir: PathBuf,
    /// Opened for appending: every write lands at the end, wherever the offset was.
    file: File,
    fsync: Fsync,
    /// This turn's records, framed, for the end of the turn.
    pending: Vec<u8>,
    /// The file's length, as this process has written it (not asked of the file system).
    len: u64,
    /// `[store] compact_min_bytes`.
    compact_min: u64,
    /// The rewrite under way, if any: while it runs, every record goes to both files.
    compaction: Option<Compaction>,
    /// The size the file must reach before a compaction is tried again after one failed: a
    /// disk that refuses the new file is not asked again every turn.
    compact_retry_at: u64,
    /// The file's pages: the server never reads the file back while it runs, so what it
    /// writes is handed to the disk and dropped from the cache as it goes, like the log's.
    cached: CachedPages,
    /// The `everysec` helper: written-since-sync flag, and its reports.
    syncer: Option<Syncer>,
    /// Figures for the metrics: appends, bytes, syncs done in the loop and their time.
    pub stats: Stats,
    /// Each sync the loop made itself (`always`), in seconds: the clients of its turn waited
    /// for it.
    pub sync_seconds: Histogram,
}

/// A compaction under way: the new file, and how far through the store it is.
struct Compaction {
    /// `<name>.aof.compact`, beside the file it will replace (a rename stays in one directory
    /// and one file system, which is what makes it atomic).
    path: PathBuf,
    file: File,
    /// The next position of the store to copy, up to `end` (its size when the compaction began;
    /// later records are appended to both files anyway).
    next: usize,
    end: usize,
    /// Bytes written to the new file so far.
    len: u64,
    /// The new file's pages, handed to the disk and dropped from the cache as they are written.
    cached: CachedPages,
}

/// The helper thread of `everysec`.
struct Syncer {
    /// Set by the loop when it has written since the last sync. The loop's holder going away
    /// (the thread's clone is then the only one) tells the thread to stop.
    dirty: Arc<AtomicBool>,
    /// The loop's end of the thread's reports: a sync that failed, said in words.
    failures: Receiver<String>,
    /// The thread's end, kept here to be cloned for the thread a compaction starts.
    reports: Sender<String>,
    /// Wakes the loop when a report is sent, so a failure is said within a turn rather than
    /// whenever the next event comes.
    waker: Arc<Waker>,
    /// How many syncs it has done, and the longest, in microseconds.
    syncs: Arc<AtomicU64>,
    longest_us: Arc<AtomicU64>,
}

/// Counts for the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Records queued for the file ([`Aof::append`]), whether or not their write then worked.
    pub records: u64,
    /// Bytes written to the file, compactions' copies not counted.
    pub bytes: u64,
    /// Syncs made by the loop itself (`always`); the helper's are counted apart.
    pub syncs: u64,
    /// The time of those syncs, in all, in microseconds.
    pub sync_us_total: u64,
    /// The longest of them, in microseconds.
    pub sync_us_max: u64,
    /// Compactions finished: the new file in the old one's place.
    pub compactions: u64,
}

impl Aof {
    /// Opens (creating if needed) `<dir>/<name>.aof` and replays it into `store`. A torn tail is
    /// cut off the file; a damaged record in the middle is an error naming the file and offset.
    ///
    /// Called before the listener opens, so nothing is answered from a store that is not yet
    /// whole. Blocking, and the whole file is read into memory at once: at start-up there is
    /// no loop to keep turning, and the file is bounded by compaction to about twice the live
    /// records (or `compact_min`).
    pub fn open(
        dir: &Path,
        name: &str,
        fsync: Fsync,
        compact_min: u64,
        store: &mut Store,
        waker: &Arc<Waker>,
    ) -> Result<(Aof, Replayed), String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create data directory {}: {e}", dir.display()))?;
        let path = dir.join(format!("{name}.aof"));
        let shown = path.display().to_string();
        // A compaction that did not finish left its new file: the old one is whole.
        let _ = std::fs::remove_file(path.with_extension("aof.compact"));
        // Owner-only: the records are where the herd's clients have been.
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("cannot open data file {shown}: {e}"))?;
        // A file made before by other hands (a restore, a copy) is tightened too.
        file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| format!("cannot make data file {shown} the owner's alone: {e}"))?;
        // A file just created is on disk only once its directory entry is.
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read data file {shown}: {e}"))?;
        let mut seen = Replayed {
            records: 0,
            stored: 0,
            cut: 0,
            refused: 0,
        };
        // A line per record: room for them all at once (records of the same client make it an
        // overestimate, by at most the half of the file a compaction would remove).
        store.reserve(memchr::memchr_iter(b'\n', &bytes).count());
        let whole = replay_bytes(&bytes, store, &mut seen).map_err(|offset| {
            format!(
                "data file {shown} is damaged at byte {offset}, with whole records after it: \
                 move it aside to start empty (the neighbours resend what they hold)"
            )
        })?;
        // Cut before anything is appended, or the next record would follow the torn one and
        // make it damage in the middle at the next start.
        if whole < bytes.len() {
            seen.cut = (bytes.len() - whole) as u64;
            file.set_len(whole as u64)
                .map_err(|e| format!("cannot cut the torn tail of {shown}: {e}"))?;
            // On disk before anything is appended: a crash of the machine must not bring the
            // torn bytes back in front of the next records.
            file.sync_all()
                .map_err(|e| format!("cannot sync data file {shown}: {e}"))?;
        }
        let syncer = match fsync {
            Fsync::EverySec => Some(Syncer::start(&file, waker.clone())?),
            _ => None,
        };
        let aof = Aof {
            dir: dir.to_path_buf(),
            path,
            file,
            fsync,
            pending: Vec::with_capacity(64 * 1024),
            len: whole as u64,
            cached: CachedPages::after(whole as u64),
            compact_min,
            compaction: None,
            compact_retry_at: 0,
            syncer,
            stats: Stats::default(),
            sync_seconds: Histogram::new(SYNC_BOUNDS),
        };
        Ok((aof, seen))
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues a record that changed the store, for the end of the turn. Called as the store
    /// changes, before the reply or the flood it causes is queued; nothing touches the disk
    /// until [`Aof::end_turn`], so a turn's records cost one `write` however many there are.
    pub fn append(&mut self, record: &[u8]) {
        frame(record, &mut self.pending);
        self.stats.records += 1;
    }

    /// Whether the next turn should come at once: a compaction has more to copy. No event
    /// would come for it (the file is not a socket), so the loop polls without waiting.
    pub fn wants_turn(&self) -> bool {
        self.compaction.is_some()
    }

    /// The end of the turn: writes the turn's records (to the new file of a compaction too),
    /// syncs them with `always`, and moves a compaction on by a slice. Called before the turn's
    /// replies are written. Returns what the log should say, if anything.
    ///
    /// A failed write is returned, and the loop stops without sending the turn's replies. A
    /// write that failed part way may have put the first bytes of a record in the file: the
    /// file is cut back to its last whole record first, so the next start replays it whole. A
    /// failure on a compaction's new file, or in any step of the compaction, gives the
    /// compaction up: the old file has every record.
    pub fn end_turn(&mut self, store: &Store) -> Result<Option<String>, String> {
        let mut said = None;
        if !self.pending.is_empty() {
            let shown = self.path.display().to_string();
            if let Err(e) = self.file.write_all(&self.pending) {
                // Part of a record may have gone in: the file is cut back to its last whole
                // record, so that the records, still pending, are written after it next time.
                let _ = self.file.set_len(self.len);
                return Err(format!("cannot write data file {shown}: {e}"));
            }
            self.cached.wrote(&self.file, self.pending.len() as u64);
            // The new file too: a compaction copies each position once, and a record that
            // changes after its position was copied reaches the new file only this way.
            let failed = match &mut self.compaction {
                Some(c) => match c.file.write_all(&self.pending) {
                    Ok(()) => {
                        c.len += self.pending.len() as u64;
                        c.cached.wrote(&c.file, self.pending.len() as u64);
                        None
                    }
                    Err(e) => Some(format!("cannot write {}: {e}", c.path.display())),
                },
                None => None,
            };
            // The old file has every record: the compaction is given up, not retried after a
            // piece of a batch that would be damage in the new file's middle.
            if let Some(why) = failed {
                said = Some(self.give_up_compaction(&why));
            }
            self.len += self.pending.len() as u64;
            self.stats.bytes += self.pending.len() as u64;
            self.pending.clear();
            match self.fsync {
                // The data and the file's size, not its times: all a replay needs. A failure is
                // returned, but the records were written and stay counted as such.
                Fsync::Always => {
                    let started = Instant::now();
                    self.file
                        .sync_data()
                        .map_err(|e| format!("cannot sync data file {shown}: {e}"))?;
                    let took = started.elapsed().as_micros() as u64;
                    self.sync_seconds.observe(took as f64 / 1e6);
                    self.stats.syncs += 1;
                    self.stats.sync_us_total += took;
                    self.stats.sync_us_max = self.stats.sync_us_max.max(took);
                }
                Fsync::EverySec => {
                    if let Some(syncer) = &self.syncer {
                        syncer.dirty.store(true, Ordering::Release);
                    }
                }
                Fsync::No => {}
            }
        }
        // Near Redis's default rule (rewrite when the file has grown to twice its size after the
        // last rewrite): here, once it holds twice what a fresh file would.
        if self.compaction.is_some() {
            said = match self.compact_slice(store) {
                Ok(done) => done,
                Err(why) => Some(self.give_up_compaction(&why)),
            };
        } else if self.len >= self.compact_min.max(self.compact_retry_at)
            && self.len > 2 * live_bytes(store)
        {
            said = Some(match self.start_compaction(store) {
                Ok(started) => started,
                Err(why) => self.give_up_compaction(&why),
            });
        }
        Ok(said)
    }

    /// Abandons a compaction that failed: its file is removed (best effort; a start removes a
    /// leftover one anyway), the old file, whole, stays the file, and the next attempt waits
    /// until the file has grown by another `compact_min`. Returns what the log says.
    fn give_up_compaction(&mut self, why: &str) -> String {
        if let Some(c) = self.compaction.take() {
            let _ = std::fs::remove_file(&c.path);
        }
        self.compact_retry_at = self.len.saturating_add(self.compact_min);
        format!(
            "compaction given up ({why}); {} stays as it was",
            self.path.display()
        )
    }

    /// Starts rewriting the file with only the store's records. Nothing is copied yet: the
    /// first slice goes at the next turn's end. The copy covers the store's positions as they
    /// are now (`end`); clients first seen later reach the new file through
    /// [`Aof::end_turn`]'s writes to both files.
    fn start_compaction(&mut self, store: &Store) -> Result<String, String> {
        let path = self.path.with_extension("aof.compact");
        // Truncated: whatever an earlier attempt left there is not to be trusted.
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        let said = format!(
            "compacting {} ({} bytes for {} records)",
            self.path.display(),
            self.len,
            store.len()
        );
        self.compaction = Some(Compaction {
            path,
            file,
            next: 0,
            end: store.len(),
            len: 0,
            cached: CachedPages::after(0),
        });
        Ok(said)
    }

    /// Copies the next slice of the store into the new file; at the end, syncs it and puts it
    /// in the old one's place.
    ///
    /// A record is copied as the store holds it when its slice is written, which may be newer
    /// than a copy appended earlier in the new file: replay keeps the newest, so the order of
    /// the two does not matter. An error is returned for [`Aof::end_turn`] to give the
    /// compaction up: a slice may have gone in part way.
    fn compact_slice(&mut self, store: &Store) -> Result<Option<String>, String> {
        let Some(c) = &mut self.compaction else {
            return Ok(None);
        };
        let mut slice = Vec::with_capacity(COMPACT_TURN_BYTES + 256);
        while c.next < c.end && slice.len() < COMPACT_TURN_BYTES {
            if let Some(record) = store.at(c.next) {
                frame(&record.line, &mut slice);
            }
            c.next += 1;
        }
        c.file
            .write_all(&slice)
            .map_err(|e| format!("cannot write {}: {e}", c.path.display()))?;
        c.len += slice.len() as u64;
        c.cached.wrote(&c.file, slice.len() as u64);
        // More to copy: [`Aof::wants_turn`] brings the next turn at once.
        if c.next < c.end {
            return Ok(None);
        }
        // Whole: on disk, then in the old file's place, then the directory's entry on disk.
        c.file
            .sync_all()
            .map_err(|e| format!("cannot sync {}: {e}", c.path.display()))?;
        std::fs::rename(&c.path, &self.path)
            .map_err(|e| format!("cannot rename {}: {e}", c.path.display()))?;
        if let Ok(dir) = File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        let Some(c) = self.compaction.take() else {
            return Ok(None);
        };
        let before = self.len;
        // The new file is the file now, and the appends go on to it through the descriptor that
        // wrote it: written only at its end, its offset is its end. (Opening it again by name
        // could fail, and leave the appends going to the old file, which no name reaches.)
        self.file = c.file;
        self.len = c.len;
        self.cached = c.cached;
        // The helper's descriptor is of the old file: a new helper takes the new one.
        if let Some(syncer) = &mut self.syncer {
            syncer.follow(&self.file)?;
        }
        self.stats.compactions += 1;
        Ok(Some(format!(
            "compacted {}: {before} bytes to {}",
            self.path.display(),
            self.len
        )))
    }

    /// What the `everysec` helper reported: a sync that failed. Called at every turn's end,
    /// so a report waits at most one turn (and the helper's wake makes that turn come).
    pub fn take_failures(&mut self) -> Vec<String> {
        match &self.syncer {
            Some(syncer) => syncer.failures.try_iter().collect(),
            None => Vec::new(),
        }
    }

    /// The helper's syncs and the longest, in microseconds (`everysec`). Read from atomics the
    /// helper updates, with no ordering needed: figures for the metrics, not a protocol.
    pub fn helper_syncs(&self) -> Option<(u64, u64)> {
        let s = self.syncer.as_ref()?;
        Some((
            s.syncs.load(Ordering::Relaxed),
            s.longest_us.load(Ordering::Relaxed),
        ))
    }

    /// Stopping: everything written and synced, whatever the policy, so that a clean stop
    /// loses nothing even under `no`. A compaction under way moves on by one slice at most;
    /// left unfinished, its file is removed at the next start, and the old file, whole, is
    /// replayed.
    pub fn close(&mut self, store: &Store) -> Result<(), String> {
        self.end_turn(store)?;
        self.file
            .sync_data()
            .map_err(|e| format!("cannot sync data file {}: {e}", self.path.display()))
    }
}

/// The bytes the store's records take in a compacted file.
fn live_bytes(store: &Store) -> u64 {
    // Nine bytes of checksum and space, and a newline, around each record.
    store.bytes() as u64 + 10 * store.len() as u64
}

impl Syncer {
    /// The helper for `file`, started when the file is opened with `everysec`. A thread, not
    /// the loop: `fdatasync` on a busy disk can block for a long time, and the loop must not
    /// (Redis hands the same sync to a background thread for the same reason).
    fn start(file: &File, waker: Arc<Waker>) -> Result<Syncer, String> {
        let (reports, failures) = mpsc::channel();
        let syncer = Syncer {
            dirty: Arc::new(AtomicBool::new(false)),
            failures,
            reports,
            waker,
            syncs: Arc::new(AtomicU64::new(0)),
            longest_us: Arc::new(AtomicU64::new(0)),
        };
        syncer.spawn(file)?;
        Ok(syncer)
    }

    /// A thread that syncs `file` once a second when the loop has written to it.
    fn spawn(&self, file: &File) -> Result<(), String> {
        // Its own descriptor of the file: the loop's is never shared with the thread.
        let own = file
            .try_clone()
            .map_err(|e| format!("cannot duplicate the data file's descriptor: {e}"))?;
        let (dirty, syncs, longest) = (
            self.dirty.clone(),
            self.syncs.clone(),
            self.longest_us.clone(),
        );
        let (reports, waker) = (self.reports.clone(), self.waker.clone());
        std::thread::Builder::new()
            .name("fsync".into())
            .spawn(move || loop {
                // Sleep first: at most one sync a second, however busy the loop.
                std::thread::sleep(EVERY);
                if Arc::strong_count(&dirty) == 1 {
                    return; // the file was closed, or a compaction replaced it
                }
                // Cleared before the sync: records written during the sync set it again and are
                // synced a second later, never missed. Nothing written: no sync.
                if !dirty.swap(false, Ordering::AcqRel) {
                    continue;
                }
                let started = Instant::now();
                // The loop hears of a failure at its next turn; the thread goes on, and tries
                // again when more is written.
                if let Err(e) = own.sync_data() {
                    let _ = reports.send(format!("cannot sync the data file: {e}"));
                    let _ = waker.wake();
                }
                let took = started.elapsed().as_micros() as u64;
                syncs.fetch_add(1, Ordering::Relaxed);
                longest.fetch_max(took, Ordering::Relaxed);
            })
            .map_err(|e| format!("cannot start the fsync thread: {e}"))?;
        Ok(())
    }

    /// After a compaction: a new thread syncs the new file (the old one stops at its next
    /// tick, its flag no longer shared). The new flag starts set, so the new file's first
    /// second is synced whatever the old flag held when it was dropped.
    fn follow(&mut self, file: &File) -> Result<(), String> {
        self.dirty = Arc::new(AtomicBool::new(true));
        self.spawn(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnolis() {
        // The check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
        // The instruction and the table agree, whatever the length and alignment.
        let bytes: Vec<u8> = (0..300u32).map(|i| (i * 37 + 11) as u8).collect();
        for start in 0..9 {
            for end in start..bytes.len() {
                assert_eq!(crc32c(&bytes[start..end]), crc32c_table(&bytes[start..end]));
            }
        }
    }

    #[test]
    fn a_record_is_a_line_with_its_checksum() {
        let mut out = Vec::new();
        frame(b"AT A +0.000000001 k +1+1 5", &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let line = &out[..out.len() - 1];
        assert_eq!(unframe(line), Some(&b"AT A +0.000000001 k +1+1 5"[..]));
        let mut damaged = line.to_vec();
        damaged[20] ^= 1;
        assert_eq!(unframe(&damaged), None);
        assert_eq!(unframe(b"short"), None);
    }

    fn file_of(records: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            frame(r, &mut out);
        }
        out
    }

    #[test]
    fn a_replay_cuts_a_torn_tail_and_refuses_damage_in_the_middle() {
        let a: &[u8] = b"AT A +0.000000001 a +1+1 5";
        let b: &[u8] = b"AT A +0.000000001 b +1+1 5";
        let whole = file_of(&[a, b]);
        let mut store = Store::default();
        let mut seen = Replayed {
            records: 0,
            stored: 0,
            cut: 0,
            refused: 0,
        };
        assert_eq!(replay_bytes(&whole, &mut store, &mut seen), Ok(whole.len()));
        assert_eq!((seen.records, store.len()), (2, 2));
        // Cut anywhere in the last record: the first is kept, the rest is a torn tail.
        let first = file_of(&[a]).len();
        for cut in first..whole.len() {
            let mut store = Store::default();
            let got = replay_bytes(&whole[..cut], &mut store, &mut seen);
            assert_eq!(got, Ok(first), "cut at {cut}");
            assert_eq!(store.len(), 1);
        }
        // A damaged last record is a torn tail too.
        let mut last = whole.clone();
        last[first + 15] ^= 1;
        assert_eq!(
            replay_bytes(&last, &mut Store::default(), &mut seen),
            Ok(first)
        );
        // A damaged record with a whole one after it: an error at its offset.
        let mut middle = whole;
        middle[3] ^= 1;
        assert_eq!(
            replay_bytes(&middle, &mut Store::default(), &mut seen),
            Err(0)
        );
    }
}
