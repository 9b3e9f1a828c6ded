//! The store on disk (`src/aof.rs`): what a server acknowledged is still there after the whole
//! herd stops and starts, after a `kill -9` under load, and after a `kill -9` at any moment of a
//! write or a compaction; a torn tail is cut and a damaged record in the middle stops start-up;
//! `data_dir = ""` writes nothing, the file is its owner's alone, and every fsync policy keeps
//! the store across a SIGTERM.
//!
//! "Acknowledged" is every AT reply a client received, also the ones still arriving after the
//! kill: a reply leaves only once its record is in the file (and on the disk with
//! `fsync = "always"`). After a restart each client must hold its latest acknowledged line or a
//! newer one by the herd's order (a later client time, then the bytewise larger line): the
//! server may have written a record whose reply the kill destroyed.
//!
//! The kills at random moments print their seed; `HERD_TEST_SEED=N` runs those moments again.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::herds::{
    await_converged, await_log_line, dump_store, free_ports, herd_2023, lone_bailey, member,
    records, write_config_with, Herd,
};
use common::load::{latest_records, Updater};
use common::*;

/// The store on disk, under the configuration's directory.
const DATA: &str = "data_dir = \"data\"\n";
const ALWAYS: &str = "[store]\nfsync = \"always\"\n";
/// A client's replies are held back past 16 KB unread (a quarter of this): the back-pressure
/// that holds a pipelining client's lines runs all the time under load.
const SMALL_OUTPUT: &str = "[limits]\nclient_output_bytes = 65536\n";
const CONVERGE: Duration = Duration::from_secs(20);
const LOG_WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// What the tests share

/// `<NAME>.aof` under the herd's `data/`.
fn aof_path(herd: &Herd, name: &str) -> PathBuf {
    data_dir(herd).join(format!("{name}.aof"))
}

fn data_dir(herd: &Herd) -> PathBuf {
    herd.config.parent().expect("a directory").join("data")
}

/// A lone Bailey keeping its store in `data/`, with `store` as its configuration's tail.
fn lone(tag: &str, store: &str) -> Herd {
    Herd::build(tag).top(DATA).extra(store).start(lone_bailey())
}

/// The client time of an AT line (its sixth field), in nanoseconds.
fn client_time(line: &str) -> i128 {
    let time = line
        .split(' ')
        .nth(5)
        .unwrap_or_else(|| panic!("no time in {line:?}"));
    let (secs, frac) = time.split_once('.').unwrap_or((time, ""));
    let bad = || panic!("a client time that is not SECS.FRACTION: {line:?}");
    let (negative, secs) = match secs.strip_prefix('-') {
        Some(s) => (true, s),
        None => (false, secs.strip_prefix('+').unwrap_or(secs)),
    };
    let secs: i128 = secs.parse().unwrap_or_else(|_| bad());
    let mut nanos = frac.chars().take(9).collect::<String>();
    while nanos.len() < 9 {
        nanos.push('0');
    }
    let nanos: i128 = nanos.parse().unwrap_or_else(|_| bad());
    let ns = secs * 1_000_000_000 + nanos;
    if negative {
        -ns
    } else {
        ns
    }
}

/// The client of an AT line (its fourth field).
fn client_of(line: &str) -> &str {
    line.split(' ')
        .nth(3)
        .unwrap_or_else(|| panic!("no client in {line:?}"))
}

/// Whether `held` is `acked` or newer by the herd's order: a later client time, then the
/// bytewise larger line.
fn same_or_newer(held: &str, acked: &str) -> bool {
    (client_time(held), held.as_bytes()) >= (client_time(acked), acked.as_bytes())
}

/// Each client's newest acknowledged AT line.
type Acks = BTreeMap<String, String>;

/// Notes an acknowledged line, keeping the newer of it and what its client had.
fn note(acks: &mut Acks, line: &str) {
    match acks.get_mut(client_of(line)) {
        Some(held) if same_or_newer(held, line) => {}
        Some(held) => *held = line.to_owned(),
        None => {
            acks.insert(client_of(line).to_owned(), line.to_owned());
        }
    }
}

fn merge_acks(into: &mut Acks, from: &Acks) {
    for line in from.values() {
        note(into, line);
    }
}

/// Each client's record in `server`'s store.
fn stored(server: &ServerProc) -> HashMap<String, String> {
    records(&dump_store(server))
        .into_iter()
        .map(|line| (client_of(&line).to_owned(), line))
        .collect()
}

/// Every acknowledged client, one by one: `server` holds its acknowledged line or a newer one.
fn assert_holds(server: &ServerProc, acks: &Acks, what: &str) {
    let held = stored(server);
    let mut lost = Vec::new();
    for (client, acked) in acks {
        match held.get(client) {
            Some(line) if same_or_newer(line, acked) => {}
            Some(line) => lost.push(format!("{client}: holds {line:?}, acknowledged {acked:?}")),
            None => lost.push(format!("{client}: missing, acknowledged {acked:?}")),
        }
    }
    assert!(
        lost.is_empty(),
        "{what}: {} of {} acknowledged clients lost their record ({} stored), e.g.:\n  {}",
        lost.len(),
        acks.len(),
        held.len(),
        lost[..lost.len().min(5)].join("\n  ")
    );
}

/// `HERD_TEST_SEED`, or one from the clock; printed, so that a failure can be run again.
fn seed(what: &str) -> u64 {
    let seed = match std::env::var("HERD_TEST_SEED") {
        Ok(text) => text.parse().expect("HERD_TEST_SEED is a number"),
        Err(_) => now_ns() as u64,
    };
    eprintln!("{what}: seed {seed} (HERD_TEST_SEED={seed} repeats it)");
    seed
}

/// Client times for a test: strictly increasing, a microsecond apart, from an hour ago (never
/// too far ahead of the server's clock, however many updates a test sends).
#[derive(Clone)]
struct Clock {
    base_ns: i128,
    ticks: Arc<AtomicU64>,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            base_ns: now_ns() - 3_600_000_000_000,
            ticks: Arc::new(AtomicU64::new(0)),
        }
    }

    fn next(&self) -> String {
        let ns = self.base_ns + i128::from(self.ticks.fetch_add(1, Ordering::Relaxed)) * 1000;
        format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
    }
}

/// How a [`Pipeline`] sends.
#[derive(Clone, Copy)]
struct Plan {
    /// IAMATs per write.
    batch: usize,
    /// How many IAMATs in all; `None`: until stopped.
    lines: Option<u64>,
    /// The reader waits a while before its first read, so that replies pile up at the server
    /// and its lines wait behind them.
    slow: bool,
}

/// One client connection pipelining IAMATs at a server: a writer thread sends them in batches
/// over its clients round robin, a reader thread takes every reply and remembers each client's
/// latest acknowledged line, until the end of the stream (or its count of replies).
struct Pipeline {
    stream: TcpStream,
    plan: Plan,
    stop: Arc<AtomicBool>,
    replies: Arc<AtomicU64>,
    writer: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<Acks>>,
}

impl Pipeline {
    fn start(server: &ServerProc, clients: Vec<String>, clock: &Clock, plan: Plan) -> Pipeline {
        let stream = TcpStream::connect_timeout(&server.addr, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", server.addr));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .expect("a read timeout");
        stream
            .set_write_timeout(Some(READ_TIMEOUT))
            .expect("a write timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(AtomicU64::new(0));
        let writer = {
            let mut out = stream.try_clone().expect("a second handle");
            let (stop, clock) = (Arc::clone(&stop), clock.clone());
            thread::spawn(move || {
                let mut sent: u64 = 0;
                let mut batch = String::new();
                while !stop.load(Ordering::SeqCst) && plan.lines.map_or(true, |n| sent < n) {
                    batch.clear();
                    let n = plan
                        .lines
                        .map_or(plan.batch as u64, |n| (n - sent).min(plan.batch as u64));
                    for _ in 0..n {
                        let client = &clients[(sent % clients.len() as u64) as usize];
                        let time = clock.next();
                        batch.push_str(&format!("IAMAT {client} {LOCATION} {time}\n"));
                        sent += 1;
                    }
                    // The server was killed: what it acknowledged is the reader's business.
                    if out.write_all(batch.as_bytes()).is_err() {
                        return;
                    }
                }
            })
        };
        let reader = {
            let mut input = stream.try_clone().expect("a second handle");
            let replies = Arc::clone(&replies);
            let prefix = format!("AT {} ", server.name);
            thread::spawn(move || {
                let mut acks = Acks::new();
                let mut buf: Vec<u8> = Vec::new();
                let mut chunk = vec![0u8; 1 << 20];
                if plan.slow {
                    thread::sleep(Duration::from_millis(150));
                }
                loop {
                    let n = match input.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                        Err(e) => panic!("reading replies: {e}"),
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let whole = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                    for line in buf[..whole]
                        .split(|&b| b == b'\n')
                        .filter(|l| !l.is_empty())
                    {
                        let line = std::str::from_utf8(line).expect("an ASCII reply");
                        assert!(
                            line.starts_with(&prefix) && line.split(' ').count() == 6,
                            "an IAMAT was answered {line:?}"
                        );
                        note(&mut acks, line);
                        replies.fetch_add(1, Ordering::SeqCst);
                    }
                    buf.drain(..whole);
                    if plan.lines == Some(replies.load(Ordering::SeqCst)) {
                        break;
                    }
                }
                acks
            })
        };
        Pipeline {
            stream,
            plan,
            stop,
            replies,
            writer: Some(writer),
            reader: Some(reader),
        }
    }

    /// Replies received so far.
    fn replies(&self) -> u64 {
        self.replies.load(Ordering::SeqCst)
    }

    /// Stops sending, and returns what was acknowledged once the replies end: at the end of the
    /// stream (a killed server's, or a live one's after the last reply), or at the count of a
    /// [`Plan`] with one.
    fn finish(mut self) -> Acks {
        if self.plan.lines.is_none() {
            self.stop.store(true, Ordering::SeqCst);
        }
        join(self.writer.take().expect("a writer"));
        if self.plan.lines.is_none() {
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        join(self.reader.take().expect("a reader"))
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(handle) = self.writer.take() {
            let _ = handle.join();
        }
        if let Some(handle) = self.reader.take() {
            let _ = handle.join();
        }
    }
}

/// `n` client ids for pipeline `k`.
fn clients(tag: &str, k: usize, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{tag}-{k}-{i:05}")).collect()
}

/// Waits until `pipelines` have had `n` replies between them (bounded).
fn await_replies(pipelines: &[Pipeline], n: u64, what: &str) {
    let seen = eventually(Duration::from_secs(15), || {
        pipelines.iter().map(Pipeline::replies).sum::<u64>() >= n
    });
    assert!(seen, "{what}: fewer than {n} replies within 15 s");
}

/// Polls for `path` every 100 µs (a compaction's new file may be there for a few turns only);
/// returns whether it appeared within `limit`.
fn await_file(path: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_micros(100));
    }
    true
}

/// Restarts `name`, which must load its file and come up (a server that exits fails here).
fn restart(herd: &mut Herd, name: &str, what: &str) {
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| herd.restart(name)));
    if let Err(failure) = outcome {
        let message = failure
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| failure.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("{what}: {name} did not come up again: {message}");
    }
}

// ---------------------------------------------------------------------------------------------
// The whole herd stopped and started

/// The 2023 herd with its stores on disk: updates acknowledged at four of its servers, the herd
/// converged, every server stopped with SIGTERM, then all started again. Each replays every
/// client from its own file (no server was up to resend anything), every store holds exactly
/// the latest acknowledged records, and a WHATSAT at any server answers with a client's record.
#[test]
fn a_whole_herd_stopped_and_started_keeps_every_acknowledged_record() {
    let mut herd = Herd::build("durable-herd")
        .top(DATA)
        .start_retrying(|| herd_2023(&free_ports(5)));
    herd.wait_linked();
    let names: Vec<String> = herd.members.iter().map(|m| m.name.to_owned()).collect();
    let targets = ["Bailey", "Bona", "Clark", "Jaquez"]
        .iter()
        .map(|n| (n.to_string(), herd.get(n).addr))
        .collect();
    let clients: Vec<String> = (0..40)
        .map(|i| format!("herd-{i:02}.cs.ucla.edu"))
        .collect();
    let updater = Updater::start(targets, clients.clone(), Duration::from_millis(1));
    thread::sleep(Duration::from_millis(600));
    let acked = updater.stop();
    assert_eq!(acked.len(), clients.len(), "every client was acknowledged");
    let expected = latest_records(&acked);
    let all = herd.all();
    await_converged(
        &all,
        Some(&expected),
        Instant::now(),
        CONVERGE,
        "before the stop",
    );

    for name in &names {
        let status = herd.get_mut(name).terminate();
        assert!(
            status.success(),
            "{name} stopped by SIGTERM exited {status}"
        );
    }
    let marks: Vec<usize> = names
        .iter()
        .map(|n| herd.get(n).log_bytes().len())
        .collect();
    for name in &names {
        assert!(aof_path(&herd, name).is_file(), "{name} has no record file");
        restart(&mut herd, name, "after the whole herd stopped");
    }
    for (name, mark) in names.iter().zip(marks) {
        let line = await_log_line(herd.get(name), "store replayed", mark, LOG_WAIT);
        assert!(
            line.contains(&format!("into {} clients", clients.len())),
            "{name} did not replay every client from its own file: {line}"
        );
    }
    let all = herd.all();
    await_converged(
        &all,
        Some(&expected),
        Instant::now(),
        CONVERGE,
        "after the start",
    );
    for (i, name) in names.iter().enumerate() {
        let client = &clients[i * 7];
        let (_, record) = &acked[client];
        let reply = exchange(
            herd.get(name).addr,
            format!("WHATSAT {client} 10 1\n").as_bytes(),
        );
        assert!(
            reply.starts_with(format!("{record}\n").as_bytes()),
            "WHATSAT {client} at {name} after the restart was answered {}; its record is {record:?}",
            show(&reply)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// kill -9 of a lone server under load

/// `kill -9` of a lone server with `fsync = "always"` while concurrent clients pipeline IAMATs
/// at it loses nothing acknowledged, client by client: at a moment in the middle of the load,
/// and at once after the last reply of a pipeline whose replies piled up at the server (its
/// last lines ran when the back-pressure let them, and then the loop had nothing left to do).
#[test]
fn kill_9_under_load_with_fsync_always_loses_nothing_acknowledged() {
    let mut herd = lone("durable-kill-load", &format!("{ALWAYS}{SMALL_OUTPUT}"));
    let clock = Clock::new();
    let mut acks = Acks::new();

    // In the middle of the load: six connections, half of them slow to read.
    let pipelines: Vec<Pipeline> = (0..6)
        .map(|k| {
            let plan = Plan {
                batch: 200,
                lines: None,
                slow: k % 2 == 1,
            };
            Pipeline::start(herd.get("Bailey"), clients("mid", k, 300), &clock, plan)
        })
        .collect();
    await_replies(&pipelines, 20_000, "load before the kill");
    herd.get_mut("Bailey").kill();
    for p in pipelines {
        merge_acks(&mut acks, &p.finish());
    }
    restart(
        &mut herd,
        "Bailey",
        "after the kill in the middle of the load",
    );
    assert_holds(
        herd.get("Bailey"),
        &acks,
        "kill -9 in the middle of the load",
    );

    // At once after the last reply: the replies pile up behind a reader that waits, then the
    // rest runs as the reader takes them.
    for (round, lines) in [3000, 4500, 6000, 7500, 9000].into_iter().enumerate() {
        let plan = Plan {
            batch: 500,
            lines: Some(lines),
            slow: true,
        };
        let clients = clients("end", round, 1000);
        let last = Pipeline::start(herd.get("Bailey"), clients, &clock, plan).finish();
        herd.get_mut("Bailey").kill();
        assert_eq!(
            last.len(),
            1000,
            "every client of round {round} was answered"
        );
        merge_acks(&mut acks, &last);
        let what = format!("kill -9 at once after the last reply of round {round}");
        restart(&mut herd, "Bailey", &what);
        assert_holds(herd.get("Bailey"), &acks, &what);
    }
}

// ---------------------------------------------------------------------------------------------
// kill -9 at random moments of writes and compactions

/// 50 `kill -9`s of a lone server with `fsync = "always"` under load, at random moments: half
/// at any moment of the writes, half while a compaction is under way (the store is over a
/// compaction's slice, so one takes several turns, and `compact_min_bytes` is small, so they
/// come one after another). After each kill the server must come up again, replaying its file
/// (a compaction cut short leaves its new file beside the old, whole, one), and its store must
/// hold every record acknowledged before the kill.
#[test]
fn kill_9_at_random_moments_of_writes_and_compactions_loses_nothing() {
    const KILLS: usize = 50;
    let seed = seed("kill -9 at random moments");
    let mut rng = Rng::new(seed);
    let store = format!("{ALWAYS}compact_min_bytes = 65536\n");
    let mut herd = lone("durable-kill-moments", &store);
    let compact = data_dir(&herd).join("Bailey.aof.compact");
    let clock = Clock::new();
    let mut acks = Acks::new();
    let (mut in_compaction, mut cut) = (0, 0);
    for kill in 0..KILLS {
        let what = format!("kill {kill} of {KILLS} (seed {seed})");
        let mark = herd.get("Bailey").log_bytes().len();
        let pipelines: Vec<Pipeline> = (0..2)
            .map(|k| {
                let plan = Plan {
                    batch: 250,
                    lines: None,
                    slow: false,
                };
                Pipeline::start(herd.get("Bailey"), clients("kill", k, 2000), &clock, plan)
            })
            .collect();
        await_replies(&pipelines, 1, &what);
        if kill % 2 == 0 {
            thread::sleep(Duration::from_micros(rng.below(40_000)));
        } else {
            let begun = await_file(&compact, Duration::from_secs(10));
            assert!(begun, "{what}: no compaction began within 10 s");
            thread::sleep(Duration::from_micros(rng.below(1_000)));
        }
        herd.get_mut("Bailey").kill();
        in_compaction += usize::from(compact.exists());
        for p in pipelines {
            merge_acks(&mut acks, &p.finish());
        }
        restart(&mut herd, "Bailey", &what);
        let server = herd.get("Bailey");
        let replayed = await_log_line(server, "store replayed", mark, LOG_WAIT);
        let log = String::from_utf8_lossy(&server.log_bytes()[mark..]).into_owned();
        if let Some(line) = log.lines().find(|l| l.contains("store cut ")) {
            cut += 1;
            assert!(line.contains("torn last record"), "{what}: {line}");
        }
        assert_holds(server, &acks, &format!("{what}, {replayed}"));
    }
    eprintln!(
        "{KILLS} kills: {in_compaction} during a compaction, {cut} with a torn last record; \
         {} clients",
        acks.len()
    );
    assert!(
        in_compaction >= KILLS / 10,
        "only {in_compaction} of {KILLS} kills came while a compaction was under way (seed {seed})"
    );
}

// ---------------------------------------------------------------------------------------------
// A torn tail, and damage in the middle

/// CRC-32C (Castagnoli), bit by bit: the checksum of a record in the file, computed here from
/// its definition rather than by the server's table.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The file of records `lines`: each its CRC-32C in eight hex digits, a space, the line, `\n`.
fn file_of(lines: &[String]) -> Vec<u8> {
    lines
        .iter()
        .flat_map(|l| format!("{:08x} {l}\n", crc32c(l.as_bytes())).into_bytes())
        .collect()
}

/// Runs `herd serve NAME --config CONFIG` to its exit (10 s at most); returns its exit code,
/// stdout and stderr.
fn serve_to_exit(config: &Path, name: &str) -> (Option<i32>, String, String) {
    let config_arg = config.to_str().expect("a UTF-8 path");
    let cwd = config.parent().expect("a directory");
    let (status, stdout, stderr) = run_to_exit(&["serve", name, "--config", config_arg], cwd, &[]);
    (status.code(), stdout, stderr)
}

/// Stops `name` with SIGTERM, which must end it with status 0.
fn stop(herd: &mut Herd, name: &str) {
    let status = herd.get_mut(name).terminate();
    assert!(
        status.success(),
        "{name} stopped by SIGTERM exited {status}"
    );
}

/// A file cut in the middle of its last record, and a file with bytes and no newline after its
/// last record: the server starts, says in its log how many bytes it cut, cuts the file to its
/// last whole record (and appends after it), and its store holds the whole records. A record
/// damaged by one flipped byte with whole records after it: `herd serve` exits 2 with one line
/// naming the file and the record's offset, and leaves the file as it was.
#[test]
fn a_torn_tail_is_cut_and_a_damaged_record_in_the_middle_stops_start_up() {
    let mut herd = lone("durable-torn", ALWAYS);
    let path = aof_path(&herd, "Bailey");
    let shown = path.display().to_string();
    let mut lines: Vec<String> = (0..20)
        .map(|i| iamat_at(herd.get("Bailey"), &format!("torn-{i:02}.cs.ucla.edu")))
        .collect();
    stop(&mut herd, "Bailey");
    let whole = std::fs::read(&path).expect("the record file");
    assert_eq!(
        show(&whole),
        show(&file_of(&lines)),
        "the file holds each acknowledged record as CRC-32C, space, AT line, newline"
    );

    // Cut in the middle of the last record.
    let last = file_of(&lines[19..]).len();
    let kept = whole.len() - last;
    let torn = kept + last / 2;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    file.set_len(torn as u64).expect("truncate");
    drop(file);
    let mark = herd.get("Bailey").log_bytes().len();
    restart(
        &mut herd,
        "Bailey",
        "a file cut in the middle of its last record",
    );
    let said = format!(
        "store cut {} bytes of a torn last record off {shown}",
        torn - kept
    );
    await_log_line(herd.get("Bailey"), &said, mark, LOG_WAIT);
    lines.pop();
    assert_eq!(std::fs::read(&path).expect("read"), file_of(&lines));
    let want: BTreeSet<String> = lines.iter().cloned().collect();
    assert_eq!(records(&dump_store(herd.get("Bailey"))), want);
    stop(&mut herd, "Bailey");

    // Bytes without a newline after the last record; then an update goes after the cut.
    let garbage = b"0badf00d AT Bailey +0.000000001 no-newline";
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open");
    file.write_all(garbage).expect("append");
    drop(file);
    let mark = herd.get("Bailey").log_bytes().len();
    restart(
        &mut herd,
        "Bailey",
        "a file with bytes and no newline at its end",
    );
    let said = format!(
        "store cut {} bytes of a torn last record off {shown}",
        garbage.len()
    );
    await_log_line(herd.get("Bailey"), &said, mark, LOG_WAIT);
    assert_eq!(std::fs::read(&path).expect("read"), file_of(&lines));
    assert_eq!(records(&dump_store(herd.get("Bailey"))), want);
    lines.push(iamat_at(herd.get("Bailey"), "after-the-cut.cs.ucla.edu"));
    stop(&mut herd, "Bailey");
    assert_eq!(
        show(&std::fs::read(&path).expect("read")),
        show(&file_of(&lines)),
        "a record appended after the cut follows the last whole record"
    );

    // One byte flipped in the sixth record, inside its AT line, with whole records after it.
    let offset = file_of(&lines[..5]).len();
    let mut damaged = std::fs::read(&path).expect("read");
    damaged[offset + 30] ^= 0x01;
    std::fs::write(&path, &damaged).expect("write");
    let (code, stdout, stderr) = serve_to_exit(&herd.config, "Bailey");
    assert_eq!(
        code,
        Some(2),
        "herd serve with a damaged record in the middle: stdout {stdout:?}, stderr {stderr:?}"
    );
    assert!(
        stderr.ends_with('\n') && stderr.matches('\n').count() == 1,
        "the error is not one line: {stderr:?}"
    );
    for needle in [shown.as_str(), &format!("at byte {offset},")] {
        assert!(
            stderr.contains(needle),
            "the error {stderr:?} does not name {needle:?}"
        );
    }
    assert!(!stdout.contains("listening"), "it listened: {stdout:?}");
    assert_eq!(
        std::fs::read(&path).expect("read"),
        damaged,
        "start-up changed a damaged file"
    );
}

// ---------------------------------------------------------------------------------------------
// Memory only, the file's mode, and the other fsync policies

/// Every file and directory under `dir`, recursively.
fn all_paths(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(all_paths(&path));
        }
        out.push(path);
    }
    out
}

/// `data_dir = ""`: no `data/` beside the configuration and no record file anywhere under it,
/// and a restarted server starts empty.
#[test]
fn data_dir_empty_keeps_the_store_in_memory_only() {
    let mut herd = Herd::build("durable-memory")
        .top("data_dir = \"\"\n")
        .start(lone_bailey());
    for i in 0..5 {
        iamat_at(herd.get("Bailey"), &format!("memory-{i}.cs.ucla.edu"));
    }
    stop(&mut herd, "Bailey");
    let dir = herd.config.parent().expect("a directory").to_path_buf();
    assert!(!dir.join("data").exists(), "data/ was made");
    let files: Vec<PathBuf> = all_paths(&dir)
        .into_iter()
        .filter(|p| {
            let name = p.to_string_lossy();
            name.ends_with(".aof") || name.ends_with(".compact")
        })
        .collect();
    assert!(files.is_empty(), "record files were written: {files:?}");
    restart(&mut herd, "Bailey", "memory only");
    assert_eq!(records(&dump_store(herd.get("Bailey"))), BTreeSet::new());
}

/// The record file is its owner's alone (mode 0600), as made at start and as put in place by a
/// compaction.
#[test]
fn the_record_file_is_mode_0600_also_after_a_compaction() {
    let mut herd = lone("durable-mode", "[store]\ncompact_min_bytes = 1024\n");
    let path = aof_path(&herd, "Bailey");
    let mode = |path: &Path| {
        std::fs::metadata(path)
            .expect("the record file")
            .permissions()
            .mode()
            & 0o777
    };
    let mut c = Client::connect(herd.get("Bailey").addr);
    let mut latest = iamat_on(&mut c, "Bailey", "mode.cs.ucla.edu");
    assert_eq!(mode(&path), 0o600, "the record file as made");
    // One client updated again and again: the file passes 1024 bytes and twice its one record.
    for _ in 0..30 {
        latest = iamat_on(&mut c, "Bailey", "mode.cs.ucla.edu");
    }
    await_log_line(herd.get("Bailey"), "store compacted", 0, LOG_WAIT);
    assert_eq!(mode(&path), 0o600, "the record file after a compaction");
    stop(&mut herd, "Bailey");
    restart(&mut herd, "Bailey", "after a compaction");
    assert_eq!(
        records(&dump_store(herd.get("Bailey"))),
        BTreeSet::from([latest])
    );
}

/// With `fsync = "everysec"` and `"no"`, a SIGTERM (which writes and syncs what is pending)
/// and a start keep every acknowledged record, client by client.
#[test]
fn everysec_and_no_keep_the_store_across_a_sigterm_restart() {
    for policy in ["everysec", "no"] {
        let store = format!("[store]\nfsync = \"{policy}\"\n");
        let mut herd = lone(&format!("durable-{policy}"), &store);
        let clock = Clock::new();
        let plan = Plan {
            batch: 300,
            lines: Some(3000),
            slow: false,
        };
        let acks =
            Pipeline::start(herd.get("Bailey"), clients(policy, 0, 1000), &clock, plan).finish();
        assert_eq!(acks.len(), 1000, "{policy}: every client was acknowledged");
        stop(&mut herd, "Bailey");
        restart(&mut herd, "Bailey", policy);
        assert_holds(herd.get("Bailey"), &acks, &format!("fsync = {policy:?}"));
        let held = stored(herd.get("Bailey"));
        assert_eq!(
            held.len(),
            acks.len(),
            "{policy}: clients after the restart"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// A write that fails part way

/// Sets `server`'s limit on the size of a file it writes (RLIMIT_FSIZE), `None`: no limit.
fn limit_file_size(server: &ServerProc, bytes: Option<u64>) {
    let limit = libc::rlimit {
        rlim_cur: bytes.unwrap_or(libc::RLIM_INFINITY),
        rlim_max: libc::RLIM_INFINITY,
    };
    let pid = libc::pid_t::try_from(server.pid()).expect("pid fits pid_t");
    // SAFETY: prlimit reads one rlimit through a valid pointer and writes nothing (null).
    let done = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
    assert_eq!(done, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// A write of the turn's records that fails part way (the file may grow no further) leaves
/// part of a record at the end of the file: the server cuts it back to its last whole record
/// and stops (exit 1) without answering the IAMAT whose record failed. The next start loads
/// the file, and appends after its last whole record.
#[test]
fn a_write_that_fails_part_way_leaves_a_file_that_loads() {
    // A write past the limit fails with EFBIG instead of killing the server with SIGXFSZ; the
    // servers this test process starts inherit the ignored signal (no other sets the limit).
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let mut herd = lone("durable-write-fails", ALWAYS);
    let path = aof_path(&herd, "Bailey");
    let mut lines: Vec<String> = ["before-1", "before-2"]
        .iter()
        .map(|c| iamat_at(herd.get("Bailey"), c))
        .collect();
    let size = std::fs::metadata(&path).expect("the record file").len();
    limit_file_size(herd.get("Bailey"), Some(size + 40));
    let addr = herd.get("Bailey").addr;
    let mut stream = TcpStream::connect(addr).expect("connect");
    let line = format!("IAMAT while-full {LOCATION} {}\n", now_secs_string());
    stream.write_all(line.as_bytes()).expect("send");
    let _ = stream.shutdown(Shutdown::Write);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    assert_eq!(
        show(&reply),
        "",
        "an IAMAT whose record failed was answered"
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = herd.get_mut("Bailey").try_status() {
            break status;
        }
        assert!(started.elapsed() < LOG_WAIT, "Bailey did not stop");
        thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(1), "Bailey's exit");
    assert_eq!(
        show(&std::fs::read(&path).expect("read")),
        show(&file_of(&lines)),
        "after a write that failed part way, the file ends with its last whole record"
    );
    restart(&mut herd, "Bailey", "after a write that failed part way");
    lines.push(iamat_at(herd.get("Bailey"), "after"));
    stop(&mut herd, "Bailey");
    assert_eq!(
        show(&std::fs::read(&path).expect("read")),
        show(&file_of(&lines)),
        "every record whole, after a write that failed part way"
    );
    restart(&mut herd, "Bailey", "after a write that failed part way");
    let want: BTreeSet<String> = lines.into_iter().collect();
    assert_eq!(records(&dump_store(herd.get("Bailey"))), want);
}

/// A full disk: with `fsync = "always"`, the server whose store's file cannot take a turn's
/// records stops with exit 1 and one line naming the file, before that turn's answers leave, so
/// every IAMAT it answered is in the file. The file is on a 64 KiB tmpfs, mounted in a mount
/// namespace of the server's own (`unshare --mount`): nothing outside the test sees it, and it
/// goes when the server does; the file is copied out first. That needs root, as CI has; without
/// it the test says so and passes, unless `HERD_REQUIRE_NETNS` is set (CI sets it for every
/// test that needs root).
#[test]
fn a_server_whose_file_cannot_be_written_stops_before_answering() {
    let dir = TestDir::new("full-disk");
    let small = dir.join("small");
    let out = dir.join("out");
    for d in [&small, &out] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let port = free_ports(1)[0];
    let top = format!("data_dir = {:?}\n", small.display().to_string());
    let config = write_config_with(&dir, &[member("Bailey", port, &[])], &top, ALWAYS);
    let script = "mount -t tmpfs -o size=65536,mode=0700 herd-test-full \"$1\" || exit 97; \
                  \"$2\" serve Bailey --config \"$3\"; rc=$?; cp \"$1\"/Bailey.aof \"$4\"/; exit $rc";
    let mut command = std::process::Command::new("unshare");
    command
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&small)
        .arg(env!("CARGO_BIN_EXE_herd"))
        .arg(&config)
        .arg(&out)
        .current_dir(&dir.path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // A group of its own: the server is the shell's child, and goes with it if the test fails.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    for var in SERVER_ENV {
        command.env_remove(var);
    }
    let child = command.spawn().expect("cannot run unshare");
    let mut child = KillGroupOnDrop(Some(child));
    let child_ref = child.0.as_mut().expect("spawned");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    // Listening, or gone: without root the mount fails (97) or unshare does (1).
    let started = Instant::now();
    let listening = loop {
        if TcpStream::connect(addr).is_ok() {
            break true;
        }
        if let Ok(Some(_)) = child_ref.try_wait() {
            break false;
        }
        assert!(started.elapsed() < LOG_WAIT, "the server did not listen");
        thread::sleep(Duration::from_millis(20));
    };
    if !listening {
        let output = child.take().wait_with_output().expect("wait");
        let why = String::from_utf8_lossy(&output.stderr).into_owned();
        if std::env::var_os("HERD_REQUIRE_NETNS").is_some() {
            panic!("cannot mount a small file system in a mount namespace: {why}");
        }
        eprintln!(
            "SKIPPED: cannot mount a small file system in a mount namespace ({why}); run as root"
        );
        return;
    }
    // One IAMAT per connection, each for a client of its own, until one goes unanswered.
    let mut answered = Vec::new();
    let mut unanswered = 0;
    for i in 0..5_000 {
        let line = format!("IAMAT full-{i:04} {LOCATION} {}\n", now_secs_string());
        let mut stream = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(_) => break, // stopped: the port is closed
        };
        let _ = stream.set_read_timeout(Some(LOG_WAIT));
        let mut reply = Vec::new();
        let sent = stream.write_all(line.as_bytes()).is_ok();
        let _ = stream.shutdown(Shutdown::Write);
        let _ = stream.read_to_end(&mut reply);
        if sent && reply.starts_with(b"AT Bailey ") && reply.ends_with(b"\n") {
            answered.push(String::from_utf8_lossy(&reply[..reply.len() - 1]).into_owned());
        } else {
            unanswered += 1;
            break;
        }
    }
    // It must have stopped by itself (the group is killed on the way out if not).
    let stopped = Instant::now();
    while child_ref.try_wait().ok().flatten().is_none() {
        assert!(
            stopped.elapsed() < LOG_WAIT,
            "the server still runs after {} answers to a full disk",
            answered.len()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let output = child.take().wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(
        output.status.code(),
        Some(1),
        "exit status; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("cannot write data file") && stderr.contains("Bailey.aof"),
        "stderr does not name the file that failed:\n{stderr}"
    );
    assert!(
        answered.len() > 100 && unanswered == 1,
        "{} answered, {unanswered} unanswered before the server stopped",
        answered.len()
    );
    let file = std::fs::read_to_string(out.join("Bailey.aof")).expect("the copied file");
    let kept: BTreeSet<&str> = file.lines().filter_map(|l| l.get(9..)).collect();
    let lost: Vec<&String> = answered
        .iter()
        .filter(|a| !kept.contains(a.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} answered IAMATs are not in the file, the first: {:?}",
        lost.len(),
        answered.len(),
        lost.first()
    );
    let log = std::fs::read_to_string(dir.join("logs").join("Bailey.log")).unwrap_or_default();
    assert!(
        log.contains("stopped: cannot write data file"),
        "the log does not say why it stopped:\n{log}"
    );
}

/// A child process whose whole process group is killed when it is dropped still running.
struct KillGroupOnDrop(Option<std::process::Child>);

impl KillGroupOnDrop {
    fn take(&mut self) -> std::process::Child {
        self.0.take().expect("taken once")
    }
}

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // SAFETY: a signal to the group this test made for the child; no memory is touched.
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}
