//! Fault tests: the herd is broken on purpose and each test asserts the
//! promise that must hold anyway.
//!
//! 1. a middle server killed with SIGKILL under steady updates, then restarted;
//! 2. a link blackholed for 30 s by a proxy the test controls, then healed;
//! 3. equal-time conflicting updates at both ends of the herd;
//! 4. a neighbour stopped with SIGSTOP for 30 s under load; and a neighbour that heartbeats but
//!    stops reading, so that the peer output cap is what trips;
//! 5. forged peer traffic on the client port, with and without a herd secret; a handshake that
//!    takes too long or sends too long a line, either way; an acceptor that forges its
//!    challenge or its proof; two servers of different secrets, and a shared `secret_file`;
//! 6. 900 connections dripping a byte a second, a client that never reads its WHATSAT
//!    replies, and one connection over the limit;
//! 7. a Places that stalls, dribbles, sends 5 MiB, presents a bad certificate or answers 429;
//! 8. the API key and the herd secret in no log line, whatever fails (every test here also
//!    checks its own logs).
//! 9. a server restarted after its neighbours' backoff reached its cap, and a host unplugged
//!    silently between real hosts (network namespaces): the neighbours dial back as soon as it
//!    greets them.
//!
//! Convergence is checked with the store dumps a server writes on SIGUSR1 (`dump_store`): every
//! server's dump must be the same, and where the test knows what was acknowledged, exactly that.
//! Every figure README.md's "What the herd promises" quotes is asserted here at the bound the
//! README states, timed from the moment it names (the restart, the heal, SIGCONT, the first
//! byte); where the servers' own clocks tell the time better than the test's polling can, their
//! log stamps are used. The figures one run measured are printed (`-- --nocapture` shows them).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Barrier, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::fake_places::{toml_basic, Behaviour, Dribble, DribblePlaces, FakePlaces, Framing};
use common::herds::{
    assert_absent, assert_key_absent, await_converged, await_log_line, await_log_past,
    await_stored, bailey_and_bona_on_free_ports, conn_id, dump_store, free_ports, herd_2023,
    log_stamp, member, records, seconds_between, stored_clients, Env, Herd,
};
use common::links::{small_receive_buffer, Proxy, SlowNeighbour};
use common::load::{latest_records, rss_kb, summary, Load, Pinger, Updater, PROMPT};
use common::*;
use herd::peer::{self, Secret, Session};

/// The Places API key of every server here: distinctive, so that its absence from every log
/// means something.
const KEY: &str = "faultKEY-3b9d7e21c4a05f68";
/// The herd secret of the herds that authenticate their links.
const SECRET: &str = "fault-tests-herd-secret-4f1c9a";
/// Places for the tests that do not exercise it: a closed loopback port, so that anything that
/// does ask Places fails here, not on the Internet.
const NO_PLACES: &str =
    "[places]\nurl = \"https://127.0.0.1:9/maps/api/place/nearbysearch/json\"\ntimeout_ms = 2000\n";
/// `HERD_SECRET` is always given, empty for "no secret", so that the environment the tests run
/// in cannot leak one in.
const WITH_SECRET: &[(&str, &str)] = &[("GOOGLE_PLACES_API_KEY", KEY), ("HERD_SECRET", SECRET)];
const WITHOUT_SECRET: &[(&str, &str)] = &[("GOOGLE_PLACES_API_KEY", KEY), ("HERD_SECRET", "")];

/// A link silently blackholed for 30 seconds...
const BLACKHOLE: Duration = Duration::from_secs(30);
/// ...is found dead within six seconds...
const DETECT_WITHIN: Duration = Duration::from_secs(6);
/// ...and the herd converges within five seconds of the heal.
const CONVERGE_AFTER_HEAL: Duration = Duration::from_secs(5);
/// Equal-time conflicting updates at the two ends of the herd: every server holds the winner
/// within this of the first update's arrival, by the servers' log stamps.
const CONFLICT_CONVERGED_WITHIN: Duration = Duration::from_secs(1);
/// A neighbour stopped with SIGSTOP for 30 seconds.
const STOPPED: Duration = Duration::from_secs(30);
/// The peer output cap of the SIGSTOP test, small. At 2000 updates a second the kernel's
/// loopback socket buffers (4 MiB of send buffer) take the 5 s of floods before the stopped
/// neighbour is found silent, so there the link drops as silent; the slow-reader test, whose
/// neighbour heartbeats, is where the cap is what trips.
const PEER_OUTPUT_BYTES: u64 = 1 << 20;
/// What a server's memory may grow by beyond the output it holds for a neighbour that does
/// not keep up: the log's buffer of a turn (1 MiB, reserved at start and touched as the turns
/// grow), and with it the allocator's slack.
const MEMORY_SLACK: u64 = 1 << 20;

/// The most a server's resident memory may grow, in kB, while one neighbour does not keep up,
/// with the output for it capped at `cap` bytes.
fn growth_bound_kb(cap: u64) -> u64 {
    (cap + MEMORY_SLACK) / 1024
}
/// How often the server checks its connections' deadlines (line, idle, unread replies,
/// authentication): a connection is closed at most this long after its deadline...
const SWEEP: Duration = Duration::from_secs(1);
/// ...and this much later again on a shared machine, where a turn of the loop, or the test's
/// own poll, may come late.
const LATE: Duration = Duration::from_millis(500);
/// `line_timeout_ms` of the slow-drip test.
const LINE_TIMEOUT: Duration = Duration::from_secs(3);
const DRIPPERS: usize = 900;
/// `places.timeout_ms` of the Places fault tests, and how late after it a reply may come: the
/// deadline is the request's own (the loop wakes for it), so a reply past the timeout is late
/// by a turn of the loop, which may come late on a shared machine.
const PLACES_TIMEOUT: Duration = Duration::from_secs(2);
const REPLY_MARGIN: Duration = Duration::from_millis(250);
/// A server restarted empty after `kill -9` holds every update acknowledged before its restart
/// within this of the restart, while updates go on.
const CAUGHT_UP_WITHIN: Duration = Duration::from_secs(1);
/// ...and, the updates stopped once it has, every store holds exactly the latest acknowledged
/// records within this of the restart.
const RESTART_CONVERGED_WITHIN: Duration = Duration::from_secs(2);
/// The bound of other waits whose length the issue does not fix.
const SETTLE: Duration = Duration::from_secs(20);

/// Held by every test that starts a server, so that they run one at a time: each loads the
/// machine on purpose (a stopped neighbour under load, 900 drips, a flooded link), and a bound
/// asserted about a server must not depend on which other test shares the two cores with it.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Neither the API key nor the herd secret is in a log line of `servers` or in anything they
/// printed; each wrote a log.
fn assert_secrets_absent(servers: &[&ServerProc]) {
    assert_key_absent(servers, KEY);
    assert_absent(servers, SECRET, "the herd secret");
}

const UNKNOWN_ERROR_PREFIX: &[u8] =
    br#"{"html_attributions" : [], "results" : [], "status" : "UNKNOWN_ERROR", "error_message" : ""#;

// ---------------------------------------------------------------------------------------------
// The harness's own check

#[test]
fn log_stamps_parse() {
    let t = log_stamp("2021-05-19T22:53:47.959498Z c7 < IAMAT x");
    assert_eq!(t, UNIX_EPOCH + Duration::from_micros(1_621_464_827_959_498));
    let leap = log_stamp("2000-02-29T00:00:00.000000Z link Bona up");
    assert_eq!(leap, UNIX_EPOCH + Duration::from_secs(951_782_400));
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 a middle server under steady updates

/// Campbell, in the middle of the 2023 herd, killed with SIGKILL under steady updates and
/// restarted 2 s later, empty: within 1 s of its restart it holds every update acknowledged
/// before it, and (the updates stopped then) within 2 s of the restart every store holds exactly
/// the latest acknowledged records.
#[test]
fn a_killed_middle_server_restarts_and_every_server_holds_every_acknowledged_update() {
    let _alone = lock(&ONE_AT_A_TIME);
    let mut herd = Herd::build("kill9")
        .env(WITH_SECRET)
        .extra(NO_PLACES)
        .start_retrying(|| herd_2023(&free_ports(5)));
    herd.wait_linked();
    // Updates go only to servers that stay up; Campbell, in the middle, is killed.
    let targets = ["Bailey", "Bona", "Clark", "Jaquez"]
        .iter()
        .map(|n| (n.to_string(), herd.get(n).addr))
        .collect();
    let clients = (0..37).map(|i| format!("steady-{i}.cs.ucla.edu")).collect();
    let updater = Updater::start(targets, clients, Duration::from_millis(5));
    thread::sleep(Duration::from_secs(2));
    let campbell = herd.index("Campbell");
    herd.servers[campbell].kill(); // SIGKILL: no goodbye, no flush
    thread::sleep(Duration::from_secs(2));
    // The restart is the moment the process is started again; what was acknowledged by then is
    // what the restarted Campbell must catch up with, while the updates go on.
    let before = updater.snapshot();
    let restarted = Instant::now();
    herd.restart("Campbell");
    let caught_up = loop {
        let held: BTreeMap<String, String> = records(&dump_store(&herd.servers[campbell]))
            .into_iter()
            .filter_map(|r| {
                let f: Vec<&str> = r.split(' ').collect();
                (f.len() == 6).then(|| (f[3].to_owned(), f[5].to_owned()))
            })
            .collect();
        // Client times have the same width, so they compare as text.
        let behind = before.iter().any(|(client, (_, line))| {
            let time = line.rsplit(' ').next().unwrap_or_default();
            match held.get(client) {
                Some(t) => t.as_str() < time,
                None => true,
            }
        });
        let elapsed = restarted.elapsed();
        if !behind {
            break elapsed;
        }
        assert!(
            elapsed < CAUGHT_UP_WITHIN,
            "the restarted Campbell did not hold every update acknowledged before its restart \
             within {CAUGHT_UP_WITHIN:?}"
        );
        thread::sleep(Duration::from_millis(20));
    };
    // Updates stop once it has caught up: from then on, every store must hold exactly the
    // latest acknowledged records.
    let acked = updater.stop();
    let stopped = restarted.elapsed();
    let expected = latest_records(&acked);
    let updates = acked.values().map(|(n, _)| n + 1).max().unwrap_or(0);
    assert!(updates > 100, "only {updates} updates were acknowledged");
    let took = await_converged(
        &herd.all(),
        Some(&expected),
        restarted,
        RESTART_CONVERGED_WITHIN,
        "after Campbell's restart",
    );
    assert!(
        took <= RESTART_CONVERGED_WITHIN,
        "the five stores were identical {took:?} after Campbell's restart (bound \
         {RESTART_CONVERGED_WITHIN:?})"
    );
    println!(
        "kill -9: {updates} updates acknowledged for {} clients; the restarted Campbell held \
         everything acknowledged before its restart {caught_up:?} after it (bound \
         {CAUGHT_UP_WITHIN:?}); updates stopped {stopped:?} after the restart; all five stores \
         identical and holding every latest acknowledged record {took:?} after the restart \
         (bound {RESTART_CONVERGED_WITHIN:?})",
        expected.len(),
    );
    assert_secrets_absent(&herd.all());
}

/// As the course's grader does it: a server restarted after its neighbours' backoff
/// has reached its cap is dialled back as soon as it greets them, so an IAMAT sent at a
/// neighbour right after that greeting reaches it, and a WHATSAT at the restarted server
/// answers with the new record, not `?`.
#[test]
fn a_restarted_server_is_dialled_back_when_it_greets_and_misses_no_update() {
    let _alone = lock(&ONE_AT_A_TIME);
    let mut herd = Herd::build("greet-redial")
        .env(WITH_SECRET)
        .extra(NO_PLACES)
        .start_retrying(|| herd_2023(&free_ports(5)));
    herd.wait_linked();
    let neighbours = ["Bailey", "Bona", "Jaquez"];
    let killed: Vec<usize> = neighbours
        .iter()
        .map(|n| herd.get(n).log_bytes().len())
        .collect();
    let campbell = herd.index("Campbell");
    herd.servers[campbell].kill();
    // Down long enough for every neighbour's redial to wait the longest backoff.
    for (n, from) in neighbours.iter().zip(killed) {
        let capped = format!("retry in {} ms", link_max_retry().as_millis());
        let line = await_log_line(herd.get(n), &capped, from, SETTLE);
        assert!(line.contains("link Campbell down"), "{n}: {line}");
    }
    let from: Vec<usize> = neighbours
        .iter()
        .map(|n| herd.get(n).log_bytes().len())
        .collect();
    herd.restart("Campbell");
    let bailey = herd.get("Bailey");
    let greeted = await_log_line(bailey, "is peer Campbell", from[0], SETTLE);
    // No sleep: the IAMAT at the neighbour, then the WHATSAT at the restarted server.
    let client = "greet-redial.cs.ucla.edu";
    let at = iamat_at(bailey, client);
    let whatsat = format!("WHATSAT {client} 10 1\n");
    let mut reply = exchange(herd.get("Campbell").addr, whatsat.as_bytes());
    // The link came up because of the greeting, not the timer: at once, not after the backoff.
    let up = await_log_line(bailey, "link Campbell up", from[0], SETTLE);
    let redial = seconds_between(log_stamp(&greeted), log_stamp(&up));
    assert!(
        redial < 0.5,
        "Bailey's link to Campbell came up {redial:.3} s after Campbell's greeting:\n{greeted}\n{up}"
    );
    for (n, from) in neighbours.iter().zip(&from) {
        let line = await_log_line(
            herd.get(n),
            "link Campbell the neighbour greeted us",
            *from,
            SETTLE,
        );
        assert!(line.contains("dialling now"), "{n}: {line}");
    }
    if reply.starts_with(b"? ") {
        // Only an IAMAT that arrived while the redial was still shaking hands may miss the flood;
        // the copy of the store when the link came up carries it, and it must have.
        let iamat = await_log_line(bailey, &format!("< IAMAT {client}"), from[0], SETTLE);
        assert!(
            log_stamp(&iamat) <= log_stamp(&up),
            "Campbell answered {} though Bailey's link to it was up before the IAMAT:\n{up}\n{iamat}",
            show(&reply)
        );
        assert!(
            eventually(Duration::from_secs(1), || {
                reply = exchange(herd.get("Campbell").addr, whatsat.as_bytes());
                !reply.starts_with(b"? ")
            }),
            "the restarted Campbell never learned {client}"
        );
    }
    assert!(
        reply.starts_with(format!("{at}\n").as_bytes()),
        "WHATSAT at the restarted Campbell answered {}",
        show(&reply)
    );
    println!(
        "greeting redial: Bailey's link to the restarted Campbell was up {:.1} ms after its greeting",
        redial * 1000.0
    );
    assert_secrets_absent(&herd.all());
}

/// The 2023 herd on five hosts (network namespaces, real addresses), Campbell cut off
/// silently (no reset, no FIN) under steady updates until every redial on both sides waits the
/// longest backoff, then healed. Whichever side's redial gets through first greets the other,
/// which dials back at once: every store holds every acknowledged update within a greeting and
/// one resync, not after the other side's backoff.
#[test]
fn a_silent_cut_between_hosts_heals_within_a_greeting_and_a_resync() {
    let _alone = lock(&ONE_AT_A_TIME);
    let names = ["Bailey", "Bona", "Campbell", "Clark", "Jaquez", "client"];
    let Some(net) = netns::Net::or_skip("cut", &names) else {
        return;
    };
    // Each server on a host of its own, at the same port.
    let members = herd_2023(&[10000; 5])
        .into_iter()
        .map(|m| m.at(net.host(m.name).addr))
        .collect();
    let herd = Herd::build("silent-cut")
        .env(WITH_SECRET)
        .extra(NO_PLACES)
        .on(net)
        .start(members);
    herd.wait_linked();
    let net = herd.net();
    // The test's clients live on a host of their own.
    let _client = net.enter("client");
    let targets = ["Bailey", "Bona", "Clark", "Jaquez"]
        .iter()
        .map(|n| (n.to_string(), herd.get(n).addr))
        .collect();
    let clients = (0..41).map(|i| format!("cut-{i}.cs.ucla.edu")).collect();
    let updater = Updater::start(targets, clients, Duration::from_millis(5));
    thread::sleep(Duration::from_secs(1));
    let neighbours = ["Bailey", "Bona", "Jaquez"];
    let from: Vec<usize> = (herd.servers.iter()).map(|s| s.log_bytes().len()).collect();
    net.unplug("Campbell");
    let cut = Instant::now();
    // The neighbours hear nothing: silent for 5 s, then connects that time out and a backoff
    // that doubles. Campbell's own connects fail at once (no route), so its redials keep a
    // rhythm of their own.
    let capped = format!("retry in {} ms", link_max_retry().as_millis());
    let long = SETTLE + SETTLE;
    for n in neighbours {
        let i = herd.index(n);
        let line = await_log_line(herd.get(n), "link Campbell down: no answer", from[i], long);
        assert!(line.contains("within"), "{n}: {line}");
        let line = await_log_line(herd.get(n), &capped, from[i], long);
        assert!(line.contains("link Campbell down"), "{n}: {line}");
    }
    let campbell = herd.get("Campbell");
    await_log_line(campbell, &capped, from[herd.index("Campbell")], long);
    // Both sides lost each other at the same moment, and their redials stay in step (2 s of
    // backoff on Campbell's side, 2 s of connect and 2 s of backoff on theirs). Stopped for 3 s
    // from the start of one of its waits, Campbell redials late, and from then on a second out
    // of step, as hosts that fail apart are.
    let mark = campbell.log_bytes().len();
    await_log_line(campbell, &capped, mark, SETTLE);
    campbell.signal(libc::SIGSTOP);
    thread::sleep(Duration::from_secs(3));
    campbell.signal(libc::SIGCONT);
    // Healed just as the neighbours begin their longest wait: only Campbell's own redial, a
    // second away, can bring the links back before it ends.
    let marks: Vec<usize> = (herd.servers.iter()).map(|s| s.log_bytes().len()).collect();
    let fresh = format!(
        "link Campbell down: no answer within 2000 ms; retry in {} ms",
        link_max_retry().as_millis()
    );
    for n in neighbours {
        await_log_line(herd.get(n), &fresh, marks[herd.index(n)], SETTLE);
    }
    let healing: Vec<usize> = (herd.servers.iter()).map(|s| s.log_bytes().len()).collect();
    net.plug("Campbell");
    let healed = Instant::now();
    let healed_wall = SystemTime::now();
    let acked = updater.stop();
    let expected = latest_records(&acked);
    let took = await_converged(
        &herd.all(),
        Some(&expected),
        healed,
        SETTLE,
        "after the heal",
    );
    let converged = healed_wall + took;
    // Each neighbour's link to Campbell came up at once after Campbell's first greeting, or
    // before it (its own redial got through first); the stores were the same within one resync
    // of the first link back.
    let mut first_back = None::<SystemTime>;
    let mut links = Vec::new();
    for n in neighbours {
        let s = herd.get(n);
        let i = herd.index(n);
        let greeted = log_stamp(&await_log_line(s, "is peer Campbell", healing[i], SETTLE));
        let up = log_stamp(&await_log_line(s, "link Campbell up", healing[i], SETTLE));
        let after = seconds_between(greeted, up);
        assert!(
            after < 0.5,
            "{n}'s link to Campbell came up {after:.3} s after Campbell's greeting"
        );
        let back = greeted.min(up);
        first_back = Some(first_back.map_or(back, |b| b.min(back)));
        links.push(format!(
            "{n} greeted at +{:.3} s, its link up at +{:.3} s",
            seconds_between(healed_wall, greeted),
            seconds_between(healed_wall, up)
        ));
    }
    let first_back = first_back.unwrap_or(healed_wall);
    let resync = seconds_between(first_back, converged);
    assert!(
        resync < 1.5,
        "the stores were identical {resync:.3} s after the first link came back"
    );
    println!(
        "silent cut: Campbell cut for {:.1} s under {} updates, then healed: {}; all five stores \
         identical {:.3} s after the heal, {resync:.3} s after the first link came back",
        (healed - cut).as_secs_f64(),
        acked.values().map(|(n, _)| n + 1).max().unwrap_or(0),
        links.join("; "),
        took.as_secs_f64()
    );
    assert_secrets_absent(&herd.all());
}

/// The longest wait between redials (`link::MAX_RETRY`).
fn link_max_retry() -> Duration {
    herd::link::MAX_RETRY
}

// ---------------------------------------------------------------------------------------------
// 2. a blackholed link

/// Bailey and Bona, each behind a proxy: Bona dials Bailey through `to_bailey`, Bailey dials
/// Bona through `to_bona`, clients reach each directly. Blackholing both proxies partitions the
/// two completely, so the sides really diverge, and the heal has something to repair.
#[test]
fn a_blackholed_link_is_detected_within_6_s_and_the_herd_converges_within_5_s_of_the_heal() {
    let _alone = lock(&ONE_AT_A_TIME);
    let (herd, proxies) = Herd::build("blackhole")
        .env(WITH_SECRET)
        .extra(NO_PLACES)
        .start_retrying_with(|| {
            // The proxies are bound first, so that the private ports cannot be theirs.
            let (to_bailey, to_bona) = (Proxy::start(), Proxy::start());
            let p = free_ports(2);
            to_bailey.set_target(p[0]);
            to_bona.set_target(p[1]);
            let members = vec![
                member("Bailey", to_bailey.port(), &["Bona"]).listening_on(p[0]),
                member("Bona", to_bona.port(), &["Bailey"]).listening_on(p[1]),
            ];
            (members, [to_bailey, to_bona])
        });
    herd.wait_linked();
    let (bailey, bona) = (herd.get("Bailey"), herd.get("Bona"));
    for s in [bailey, bona] {
        assert!(
            s.log().contains("authenticated"),
            "{}'s link is not authenticated:\n{}",
            s.name,
            s.log()
        );
    }
    // Updates at both sides, before and during the partition; the same clients on both sides,
    // so that each side's latest records are partly the other's.
    let targets = vec![
        ("Bailey".to_owned(), bailey.addr),
        ("Bona".to_owned(), bona.addr),
    ];
    let clients = (0..15).map(|i| format!("split-{i}.cs.ucla.edu")).collect();
    let updater = Updater::start(targets, clients, Duration::from_millis(20));
    thread::sleep(Duration::from_secs(1));

    let marks = (bailey.log_bytes().len(), bona.log_bytes().len());
    let blackholed_at = SystemTime::now();
    for p in &proxies {
        p.blackhole();
    }
    let blackholed = Instant::now();

    // Detected on both sides, each within six seconds of the start, by the log's own clock.
    let mut detections = Vec::new();
    for (server, neighbour, mark) in [(bailey, "Bona", marks.0), (bona, "Bailey", marks.1)] {
        let needle = format!("link {neighbour} down: silent for 5 s");
        let line = await_log_line(server, &needle, mark, DETECT_WITHIN * 3);
        let after = seconds_between(blackholed_at, log_stamp(&line));
        assert!(
            after <= DETECT_WITHIN.as_secs_f64(),
            "{} detected the dead link {after:.3} s after the blackhole began (bound \
             {DETECT_WITHIN:?}): {line}",
            server.name
        );
        detections.push(format!("{} {after:.3} s", server.name));
    }

    thread::sleep(BLACKHOLE.saturating_sub(blackholed.elapsed()));
    let acked = updater.stop();
    let expected = latest_records(&acked);
    // The partition was real: each side has records the other lacks.
    let (west, east) = (records(&dump_store(bailey)), records(&dump_store(bona)));
    assert!(
        west != east && west != expected && east != expected,
        "the stores did not diverge during the blackhole ({} and {} records)",
        west.len(),
        east.len()
    );
    for p in &proxies {
        p.heal();
    }
    let healed = Instant::now();
    let took = await_converged(
        &[bailey, bona],
        Some(&expected),
        healed,
        SETTLE,
        "after the heal",
    );
    assert!(
        took <= CONVERGE_AFTER_HEAL,
        "the herd converged {took:?} after the heal (bound {CONVERGE_AFTER_HEAL:?})"
    );
    println!(
        "blackhole: dead link detected by {}; blackhole {:?}; {} clients' latest records \
         identical on both sides {took:?} after the heal",
        detections.join(" and "),
        healed - blackholed,
        expected.len()
    );
    drop(proxies);
    assert_secrets_absent(&herd.all());
}

// ---------------------------------------------------------------------------------------------
// 3. equal-time conflicting updates

/// For each (server, neighbour, record) of `records`, how many times the server received that
/// record on its inbound link from that neighbour (`peer NEIGHBOUR < RECORD` in its log).
fn receptions(herd: &Herd, records: &[&str]) -> BTreeMap<(String, String, usize), usize> {
    let mut counts = BTreeMap::new();
    for s in &herd.servers {
        for line in s.log().lines() {
            // STAMP peer NAME < PAYLOAD
            let mut parts = line.splitn(5, ' ');
            let (_, who, name, dir, payload) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            );
            if who != Some("peer") || dir != Some("<") {
                continue;
            }
            let (Some(name), Some(payload)) = (name, payload) else {
                continue;
            };
            if let Some(which) = records.iter().position(|r| *r == payload) {
                *counts
                    .entry((s.name.clone(), name.to_owned(), which))
                    .or_insert(0) += 1;
            }
        }
    }
    counts
}

/// Every log line that mentions `client`, over the whole herd.
fn lines_about(herd: &Herd, client: &str) -> usize {
    let needle = format!(" {client} ");
    herd.servers
        .iter()
        .map(|s| s.log().lines().filter(|l| l.contains(&needle)).count())
        .sum()
}

#[test]
fn equal_time_conflicting_updates_at_both_ends_pick_one_winner_and_do_not_ping_pong() {
    let _alone = lock(&ONE_AT_A_TIME);
    let herd = Herd::build("conflict")
        .env(WITHOUT_SECRET)
        .extra(NO_PLACES)
        .start_retrying(|| herd_2023(&free_ports(5)));
    herd.wait_linked();
    let client = "conflict.cs.ucla.edu";
    let time = now_secs_string();
    let barrier = Arc::new(Barrier::new(2));
    // Bailey and Jaquez are the two ends of the herd (three hops apart).
    let sides = [
        ("Bailey", "+34.068930-118.445127"),
        ("Jaquez", "-33.865143+151.209900"),
    ];
    let handles: Vec<JoinHandle<String>> = sides
        .iter()
        .map(|&(name, location)| {
            let addr = herd.get(name).addr;
            let barrier = Arc::clone(&barrier);
            let line = format!("IAMAT {client} {location} {time}\n");
            let tail = format!(" {client} {location} {time}\n");
            thread::spawn(move || {
                let mut c = Client::connect(addr);
                barrier.wait();
                c.send(line.as_bytes());
                let reply = String::from_utf8_lossy(&c.read_line()).into_owned();
                assert!(
                    reply.starts_with(&format!("AT {name} ")) && reply.ends_with(&tail),
                    "{line:?} at {name} was answered {reply:?}"
                );
                reply.trim_end().to_owned()
            })
        })
        .collect();
    let replies: Vec<String> = handles.into_iter().map(join).collect();
    // Same client time: the bytewise larger AT line wins ("AT Jaquez" > "AT Bailey").
    let winner = replies.iter().max().expect("two").clone();
    let loser = replies.iter().min().expect("two").clone();
    assert!(winner.starts_with("AT Jaquez "), "winner {winner:?}");
    // Every store holds the winner alone (the wait is the dumps', a liveness bound)...
    await_converged(
        &herd.all(),
        Some(&BTreeSet::from([winner.clone()])),
        Instant::now(),
        SETTLE,
        "after the conflicting updates",
    );
    // ...and, by the servers' own clocks, every server held it within the bound of the first
    // IAMAT's arrival: Jaquez when it ran its own, each other when the winner first reached it.
    let iamat = format!("< IAMAT {client} ");
    let stamp_of =
        |server: &ServerProc, needle: &str| log_stamp(&await_log_line(server, needle, 0, SETTLE));
    let first = [herd.get("Bailey"), herd.get("Jaquez")]
        .iter()
        .map(|s| stamp_of(s, &iamat))
        .min()
        .expect("two");
    let mut held_at = Vec::new();
    for s in &herd.servers {
        let at = match s.name.as_str() {
            "Jaquez" => stamp_of(s, &iamat),
            _ => stamp_of(s, &format!(" < {winner}")),
        };
        held_at.push((s.name.clone(), seconds_between(first, at)));
    }
    let took = held_at.iter().map(|(_, t)| *t).fold(0.0, f64::max);
    assert!(
        took <= CONFLICT_CONVERGED_WITHIN.as_secs_f64(),
        "the winner reached every server only {took:.3} s after the first IAMAT arrived (bound \
         {CONFLICT_CONVERGED_WITHIN:?}): {held_at:?}"
    );
    // No ping-pong: once converged, nothing more about the client is sent or received, through
    // more than one digest interval; and each server received each record at most once from
    // each neighbour (a server floods a record only when it changes its store, which happens at
    // most once per record).
    // Copies still in flight when the dumps agreed are logged a little later: the baseline is
    // taken once the logs stop changing, which a ping-pong never does.
    let snapshot = || {
        (
            receptions(&herd, &[&winner, &loser]),
            lines_about(&herd, client),
        )
    };
    let mut last = snapshot();
    let quiet = eventually(SETTLE, || {
        thread::sleep(Duration::from_millis(500));
        let now = snapshot();
        let same = now == last;
        last = now;
        same
    });
    assert!(
        quiet,
        "the logs never stopped growing with {client}'s records"
    );
    let (counts, lines) = last;
    thread::sleep(peer::DIGEST_INTERVAL + Duration::from_secs(1));
    assert_eq!(
        lines_about(&herd, client),
        lines,
        "the logs kept growing with {client}'s records after convergence"
    );
    assert_eq!(receptions(&herd, &[&winner, &loser]), counts);
    for ((server, neighbour, which), n) in &counts {
        assert!(
            *n <= 1,
            "{server} received {} from {neighbour} {n} times",
            [&winner, &loser][*which]
        );
    }
    // The winner reached every server but its own by a link.
    for s in herd.servers.iter().filter(|s| s.name != "Jaquez") {
        assert!(
            counts
                .keys()
                .any(|(server, _, which)| *server == s.name && *which == 0),
            "{} never received the winner from a neighbour: {counts:?}",
            s.name
        );
    }
    let total: usize = counts.values().sum();
    println!(
        "conflict: winner {winner:?} held by all five {:.1} ms after the first IAMAT arrived \
         (bound {CONFLICT_CONVERGED_WITHIN:?}); {total} receptions of the two records in all ({} \
         of the loser), none after convergence",
        took * 1000.0,
        counts
            .iter()
            .filter(|((_, _, w), _)| *w == 1)
            .map(|(_, n)| n)
            .sum::<usize>()
    );
    assert_secrets_absent(&herd.all());
}

// ---------------------------------------------------------------------------------------------
// 4. a neighbour stopped under load

/// Bona stopped with SIGSTOP for 30 s while Bailey, its neighbour, takes 2,000 updates a second
/// (the load ends just before SIGCONT): its neighbours' memory grows by at most their output cap
/// to it and the log's buffer, each drops its link to Bona as silent within 6 s of the stop,
/// and all five stores are identical within 5 s of SIGCONT.
#[test]
fn a_neighbour_stopped_for_30_s_under_load_costs_bounded_memory_and_the_herd_converges() {
    let _alone = lock(&ONE_AT_A_TIME);
    let extra = format!("{NO_PLACES}\n[limits]\npeer_output_bytes = {PEER_OUTPUT_BYTES}\n");
    let herd = Herd::build("sigstop")
        .env(WITH_SECRET)
        .extra(&extra)
        .start_retrying(|| herd_2023(&free_ports(5)));
    herd.wait_linked();
    let bona = herd.get("Bona");
    // 2000 IAMATs a second at Bailey, a neighbour of Bona, from a little before the stop to a
    // little before its end; every update is flooded towards Bona by Bailey, Campbell and Clark.
    const BEFORE: Duration = Duration::from_secs(3);
    const ENDS_BEFORE_SIGCONT: Duration = Duration::from_millis(1500);
    let warmup = Duration::from_millis(500);
    let window = (BEFORE + STOPPED).saturating_sub(warmup + ENDS_BEFORE_SIGCONT);
    let load = Load::start(
        herd.get("Bailey").addr,
        &format!(
            "-c 8 -p 8 --rate 2000 --clients 2000 --warmup-ms {} --duration-ms {}",
            warmup.as_millis(),
            window.as_millis()
        ),
    );
    thread::sleep(BEFORE);
    let others = ["Bailey", "Campbell", "Clark", "Jaquez"];
    // The store is full by now (2000 clients at 2000 a second): what grows from here is what
    // the stopped neighbour costs.
    let baseline: Vec<u64> = others.iter().map(|n| rss_kb(herd.get(n).pid())).collect();
    let marks: Vec<usize> = others
        .iter()
        .map(|n| herd.get(n).log_bytes().len())
        .collect();
    let stopped_wall = SystemTime::now();
    bona.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let mut peak = baseline.clone();
    while stopped.elapsed() < STOPPED {
        thread::sleep(Duration::from_secs(1).min(STOPPED.saturating_sub(stopped.elapsed())));
        for (i, n) in others.iter().enumerate() {
            peak[i] = peak[i].max(rss_kb(herd.get(n).pid()));
        }
    }
    // The load is over before Bona resumes, so that what follows SIGCONT is the resync alone.
    let report = load.finish(Duration::from_secs(20));
    bona.signal(libc::SIGCONT);
    let resumed = Instant::now();

    // Bounded memory: what may grow is each server's output to the stopped neighbour (capped
    // at peer_output_bytes, then the link is dropped), and allocator slack; the store is full.
    let mut figures = Vec::new();
    for (i, n) in others.iter().enumerate() {
        let grew = peak[i].saturating_sub(baseline[i]);
        assert!(
            grew <= growth_bound_kb(PEER_OUTPUT_BYTES),
            "{n}'s RSS grew by {grew} kB while Bona was stopped ({} → {} kB; bound {} kB: the \
             peer output cap and {} kB for the log's buffer)",
            baseline[i],
            peak[i],
            growth_bound_kb(PEER_OUTPUT_BYTES),
            MEMORY_SLACK / 1024
        );
        figures.push(format!("{n} +{grew} kB"));
    }
    // Bona's neighbours dropped their links to it as silent, within 6 s of the stop.
    let mut drops = Vec::new();
    for (i, n) in others.iter().enumerate() {
        if !["Bailey", "Campbell", "Clark"].contains(n) {
            continue;
        }
        let line = await_log_line(herd.get(n), "link Bona down:", marks[i], SETTLE);
        let after = seconds_between(stopped_wall, log_stamp(&line));
        assert!(
            line.contains("link Bona down: silent for 5 s") && after <= DETECT_WITHIN.as_secs_f64(),
            "{n} dropped its link to the stopped Bona {after:.3} s after the stop (bound \
             {DETECT_WITHIN:?}, as silent): {line}"
        );
        drops.push(format!("{n} {after:.3} s"));
    }

    let json: serde_json::Value = serde_json::from_str(report.trim())
        .unwrap_or_else(|e| panic!("herd load printed {report:?}: {e}"));
    assert_eq!(
        json["errors"].as_u64(),
        Some(0),
        "Bailey failed to answer some of the load: {report}"
    );
    let took = await_converged(
        &herd.all(),
        None,
        resumed,
        CONVERGE_AFTER_HEAL,
        "after SIGCONT",
    );
    assert!(
        took <= CONVERGE_AFTER_HEAL,
        "the stores were identical {took:?} after SIGCONT (bound {CONVERGE_AFTER_HEAL:?})"
    );
    let count = records(&dump_store(bona)).len();
    assert_eq!(
        count, 2000,
        "records in the converged stores: one per client of the load"
    );
    println!(
        "sigstop: RSS growth while Bona was stopped {} (bound {} kB); links to Bona dropped as \
         silent by {} after the stop; load {} requests, {}/s; all five stores identical ({count} \
         records) {took:?} after SIGCONT (bound {CONVERGE_AFTER_HEAL:?})",
        figures.join(", "),
        growth_bound_kb(PEER_OUTPUT_BYTES),
        drops.join(", "),
        json["requests"],
        json["per_second"],
    );
    assert_secrets_absent(&herd.all());
}

/// The cap on a link's unsent output, with a neighbour that is alive (it heartbeats) but stops
/// reading: the link is dropped at the cap, the server's memory grows by at most the cap and
/// the log's buffer, and once the neighbour reads again the resync on reconnect gives it
/// everything within 5 s, so nothing is lost.
#[test]
fn a_neighbour_that_heartbeats_but_never_reads_is_dropped_at_the_output_cap_and_resynced() {
    let _alone = lock(&ONE_AT_A_TIME);
    const CAP: u64 = 256 << 10;
    let extra = format!("{NO_PLACES}\n[limits]\npeer_output_bytes = {CAP}\n");
    let (herd, bona) = Herd::build("slow-reader")
        .env(WITHOUT_SECRET)
        .extra(&extra)
        .only(&["Bailey"])
        .start_retrying_with(|| {
            let bona = TcpListener::bind("127.0.0.1:0").expect("cannot bind a port for Bona");
            small_receive_buffer(&bona);
            let bona_port = bona.local_addr().expect("address").port();
            let members = vec![
                member("Bailey", free_ports(1)[0], &["Bona"]),
                member("Bona", bona_port, &["Bailey"]),
            ];
            (members, bona)
        });
    let bona = SlowNeighbour::start(bona);
    let bailey = herd.get("Bailey");
    assert!(
        bailey.wait_log("link Bona up", SETTLE),
        "Bailey never linked to Bona"
    );
    // First the same load for a second while Bona reads: the store fills with the load's 2000
    // clients, and the buffers of the load's connections and of the log reach their size.
    // What grows after is what a neighbour that does not read costs.
    bona.read_from_now_on();
    let warm = Load::start(
        bailey.addr,
        "-c 8 -p 16 --rate 20000 --clients 2000 --warmup-ms 0 --duration-ms 1000",
    );
    warm.finish(Duration::from_secs(20));
    let expected = records(&dump_store(bailey));
    let filled = eventually(SETTLE, || bona.records().is_superset(&expected));
    assert!(
        filled,
        "Bona never received all of Bailey's {} records",
        expected.len()
    );
    bona.stop_reading();
    thread::sleep(Duration::from_millis(200));
    let baseline = rss_kb(bailey.pid());
    let mark = bailey.log_bytes().len();
    // 20000 IAMATs a second for 6 s, each flooded to Bona: 2 MB a second, more than the
    // kernel's socket buffers hold for long.
    let load = Load::start(
        bailey.addr,
        "-c 8 -p 16 --rate 20000 --clients 2000 --warmup-ms 200 --duration-ms 6000",
    );
    let started = Instant::now();
    let mut peak = baseline;
    let needle = format!("link Bona down: over {CAP} bytes unsent");
    let mut dropped = None;
    while started.elapsed() < Duration::from_secs(7) {
        peak = peak.max(rss_kb(bailey.pid()));
        if dropped.is_none()
            && bailey.log_bytes()[mark..]
                .windows(needle.len())
                .any(|w| w == needle.as_bytes())
        {
            dropped = Some(started.elapsed());
        }
        thread::sleep(Duration::from_millis(100));
    }
    let report = load.finish(Duration::from_secs(20));
    // The first drop after the baseline is for the cap, nothing else.
    let line = await_log_line(bailey, "link Bona down:", mark, SETTLE);
    assert!(
        line.contains(&needle),
        "Bailey dropped its link to Bona: {line}"
    );
    let grew = peak.saturating_sub(baseline);
    assert!(
        grew <= growth_bound_kb(CAP),
        "Bailey's RSS grew by {grew} kB ({baseline} → {peak} kB; bound {} kB: the cap and {} kB \
         for the log's buffer)",
        growth_bound_kb(CAP),
        MEMORY_SLACK / 1024
    );
    let json: serde_json::Value = serde_json::from_str(report.trim())
        .unwrap_or_else(|e| panic!("herd load printed {report:?}: {e}"));
    assert_eq!(
        json["errors"].as_u64(),
        Some(0),
        "Bailey failed some of the load: {report}"
    );
    // Bona reads again: the resync of a later link brings it every latest record.
    let expected = records(&dump_store(bailey));
    bona.read_from_now_on();
    let resumed = Instant::now();
    let complete = eventually(CONVERGE_AFTER_HEAL, || {
        bona.records().is_superset(&expected)
    });
    let took = resumed.elapsed();
    let got = bona.records();
    assert!(
        complete && took <= CONVERGE_AFTER_HEAL,
        "Bona lacked {} of Bailey's {} latest records {took:?} after it read again (bound \
         {CONVERGE_AFTER_HEAL:?}), e.g. {:?}",
        expected.difference(&got).count(),
        expected.len(),
        expected.difference(&got).next()
    );
    println!(
        "slow reader: link dropped at its cap {:?} into the load ({}); Bailey's RSS grew by \
         {grew} kB (bound {} kB); load {} requests; every one of {} latest records at Bona \
         {took:?} after it read again (bound {CONVERGE_AFTER_HEAL:?})",
        dropped.unwrap_or_default(),
        line.split_once(' ').map_or("", |(_, l)| l),
        growth_bound_kb(CAP),
        json["requests"],
        expected.len(),
    );
    assert_secrets_absent(&herd.all());
}

// ---------------------------------------------------------------------------------------------
// 5. forged peer traffic

/// A record as neighbour Bona would flood it.
fn bona_record(client: &str) -> String {
    format!(
        "AT Bona +0.000000001 {client} {LOCATION} {}",
        now_secs_string()
    )
}

/// Greets Bailey at `addr` as its neighbour Bona with a fresh nonce and reads the CHALLENGE,
/// which holds Bailey's nonce and nothing that depends on the secret (Bailey proves itself only
/// to a dialler that has). Returns the connection and both nonces.
fn greet(addr: SocketAddr) -> (Client, Vec<u8>, Vec<u8>) {
    let nd = peer::nonce().expect("randomness");
    let mut c = Client::connect_quick(addr);
    let mut greeting = peer::greeting("Bona", Some(&nd));
    greeting.push(b'\n');
    c.send(&greeting);
    let line = c.read_line();
    let na = peer::parse_challenge(&line[..line.len() - 1])
        .unwrap_or_else(|| panic!("the greeting was answered {}", show(&line)));
    assert_eq!(
        line.len(),
        "CHALLENGE \n".len() + na.len(),
        "{}",
        show(&line)
    );
    let na = na.to_vec();
    (c, nd, na)
}

/// Reads Bailey's PROOF, sent once the dialler has proved itself, and checks it.
fn expect_server_proof(c: &mut Client, secret: &Secret, nd: &[u8], na: &[u8]) {
    let line = c.read_line();
    let proof = peer::parse_proof(&line[..line.len() - 1])
        .unwrap_or_else(|| panic!("a good PROOF was answered {}", show(&line)));
    assert!(
        secret.verify(proof, b"accept", b"Bona", b"Bailey", nd, na),
        "the server's PROOF does not prove the herd secret: {}",
        show(&line)
    );
}

fn proof_line(secret: &Secret, nd: &[u8], na: &[u8]) -> Vec<u8> {
    [
        &b"PROOF "[..],
        &secret.proof(b"dial", b"Bona", b"Bailey", nd, na),
        b"\n",
    ]
    .concat()
}

/// `PAYLOAD SEQ TAG\n`.
fn sealed(session: &mut Session, payload: &str) -> Vec<u8> {
    let mut out = Vec::new();
    peer::frame(Some(session), payload.as_bytes(), &mut out);
    out
}

/// Reads to the end of the stream (the server must close it) and checks that whatever came
/// after the handshake was only the server's sealed heartbeats.
fn expect_closed_after_pings(c: &mut Client, session: &mut Session, what: &str) {
    let rest = c.read_to_end();
    for line in rest.split_inclusive(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        assert_eq!(
            session.open(line).map(<[u8]>::to_vec),
            Ok(b"PING".to_vec()),
            "{what}: the server sent {} before closing",
            show(&rest)
        );
    }
}

/// Bailey alone, on a port from `free_ports`.
fn bailey_alone(tag: &str, env: Env, extra: &str) -> Herd {
    Herd::build(tag)
        .env(env)
        .extra(extra)
        .start_retrying(|| vec![member("Bailey", free_ports(1)[0], &[])])
}

/// Bailey, with neighbour Bona configured but not running.
fn bailey_and_bona(tag: &str, env: Env) -> Herd {
    Herd::build(tag)
        .env(env)
        .extra(NO_PLACES)
        .only(&["Bailey"])
        .start_retrying(bailey_and_bona_on_free_ports)
}

/// Bailey, with neighbour Bona configured but not running: the test plays Bona, or a forger
/// claiming to be Bona. Returns the herd and the one record Bailey holds (a client's).
fn forgery_target(tag: &str, env: Env) -> (Herd, String) {
    let herd = bailey_and_bona(tag, env);
    let seed = iamat_at(herd.get("Bailey"), "seed.cs.ucla.edu");
    (herd, seed)
}

/// No state change: the store holds exactly `expected`, none of the forged clients, and WHATSAT
/// does not know them; the server still answers; its log says why each connection was closed.
fn assert_unchanged(
    bailey: &ServerProc,
    expected: &BTreeSet<String>,
    forged: &[String],
    why: &[&str],
) {
    assert_eq!(
        records(&dump_store(bailey)),
        *expected,
        "the store after the forgeries"
    );
    let held = stored_clients(bailey);
    for client in forged {
        assert!(!held.contains(client), "{client} was stored");
    }
    for client in forged.iter().take(3) {
        let got = exchange(bailey.addr, format!("WHATSAT {client} 10 1\n").as_bytes());
        assert_eq!(
            show(&got),
            show(format!("? WHATSAT {client} 10 1\n").as_bytes())
        );
    }
    iamat_at(bailey, "still-serving.cs.ucla.edu");
    let log = bailey.log();
    for why in why {
        assert!(log.contains(why), "Bailey's log never says {why:?}:\n{log}");
    }
    assert_secrets_absent(&[bailey]);
}

/// A peer's line as a client's first line: `? LINE`, then the connection is closed, and the
/// command after it in the same write is not run.
#[test]
fn peer_lines_from_a_client_are_answered_as_invalid_and_the_client_disconnected() {
    let _alone = lock(&ONE_AT_A_TIME);
    let (herd, seed) = forgery_target("forged-client", WITH_SECRET);
    let bailey = herd.get("Bailey");
    let nonce = String::from_utf8(peer::nonce().expect("randomness")).expect("hex");
    let first_lines = [
        bona_record("forged-a0.cs.ucla.edu"),
        format!("PROOF {}", "0".repeat(64)),
        format!("CHALLENGE {} {}", "1".repeat(32), "2".repeat(64)),
        format!("PEER herd/1 Mallory {nonce}"), // not a neighbour: a client's invalid command
    ];
    let mut forged = vec!["forged-a0.cs.ucla.edu".to_owned()];
    let mut failures = Vec::new();
    for (i, line) in first_lines.iter().enumerate() {
        let mut c = Client::connect_quick(bailey.addr);
        let after = format!("after-a{i}.cs.ucla.edu");
        c.send(format!("{line}\nIAMAT {after} {LOCATION} {}\n", now_secs_string()).as_bytes());
        let want = (format!("? {line}\n").into_bytes(), true);
        let got = c.read_until_end();
        if got != want {
            failures.push(format!(
                "first line {line:?}: want {}; got {}",
                describe_end(&want),
                describe_end(&got)
            ));
        }
        forged.push(after);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_unchanged(
        bailey,
        &BTreeSet::from([seed]),
        &forged,
        &["closed: a client sent a peer's line"],
    );
}

/// A greeting with a nonce, then a wrong PROOF: closed with nothing more said, and the sealed
/// record sent after it not applied.
#[test]
fn a_wrong_proof_closes_the_connection_and_changes_nothing() {
    let _alone = lock(&ONE_AT_A_TIME);
    let (herd, seed) = forgery_target("forged-proof", WITH_SECRET);
    let bailey = herd.get("Bailey");
    let secret = Secret::new(SECRET.as_bytes());
    let wrong = Secret::new(b"not-the-herd-secret-at-all");
    let mut forged = Vec::new();
    for kind in [
        "another secret",
        "the challenge reflected",
        "another name",
        "not hex",
    ] {
        let (mut c, nd, na) = greet(bailey.addr);
        let proof = match kind {
            "another secret" => proof_line(&wrong, &nd, &na),
            "the challenge reflected" => [
                &b"PROOF "[..],
                &secret.proof(b"accept", b"Bona", b"Bailey", &nd, &na),
                b"\n",
            ]
            .concat(),
            "another name" => [
                &b"PROOF "[..],
                &secret.proof(b"dial", b"Clark", b"Bailey", &nd, &na),
                b"\n",
            ]
            .concat(),
            _ => format!("PROOF {}\n", "z".repeat(64)).into_bytes(),
        };
        let client = format!("forged-b{}.cs.ucla.edu", forged.len());
        let mut session = Session::new(&wrong, &nd, &na, true);
        let line = sealed(&mut session, &bona_record(&client));
        c.send(&[proof, line].concat());
        let rest = c.read_to_end();
        assert!(
            rest.is_empty(),
            "a PROOF made with {kind} was answered {}",
            show(&rest)
        );
        forged.push(client);
    }
    assert_unchanged(
        bailey,
        &BTreeSet::from([seed]),
        &forged,
        &["Bona failed to prove it knows the herd secret"],
    );
}

/// A proper handshake and a first sealed record (applied: the forger's sealing is right), then
/// a forged line in the slot of the second, followed by a valid second line sealed by a twin of
/// the session: the forged line closes the connection, so neither it nor the valid line after
/// it is applied.
#[test]
fn a_forged_or_replayed_sealed_line_closes_the_link_and_changes_nothing() {
    let _alone = lock(&ONE_AT_A_TIME);
    let (herd, seed) = forgery_target("forged-sealed", WITH_SECRET);
    let bailey = herd.get("Bailey");
    let addr = bailey.addr;
    let secret = Secret::new(SECRET.as_bytes());
    let wrong = Secret::new(b"not-the-herd-secret-at-all");
    let mut expected = BTreeSet::from([seed]);
    let mut forged_clients = vec!["honest-c1.cs.ucla.edu".to_owned()];
    let mut previous: Option<(Vec<u8>, Vec<u8>)> = None;
    let forgeries = [
        "a flipped tag",
        "an altered payload",
        "no sequence number or tag",
        "the first line replayed",
        "a line sealed for another connection",
        "a line sealed in the server's direction",
        "a line sealed with a session of another secret",
    ];
    for (i, kind) in forgeries.iter().enumerate() {
        let (mut c, nd, na) = greet(addr);
        let mut session = Session::new(&secret, &nd, &na, true);
        let mut twin = Session::new(&secret, &nd, &na, true);
        let first_record = bona_record(&format!("first-c{i}.cs.ucla.edu"));
        let first = sealed(&mut session, &first_record);
        let _ = sealed(&mut twin, &first_record);
        c.send(&[proof_line(&secret, &nd, &na), first.clone()].concat());
        expect_server_proof(&mut c, &secret, &nd, &na);
        await_stored(bailey, &first_record);
        expected.insert(first_record);

        let forged_client = format!("forged-c{i}.cs.ucla.edu");
        let forged_record = bona_record(&forged_client);
        // A session of the given kind, advanced past its first line.
        let advanced = |secret: &Secret, nd: &[u8], na: &[u8], dialler: bool| {
            let mut s = Session::new(secret, nd, na, dialler);
            let _ = sealed(&mut s, "PING");
            s
        };
        let forged = match i {
            0 => {
                let mut line = sealed(&mut session, &forged_record);
                let at = line.len() - 2; // the tag's last hex digit
                line[at] = if line[at] == b'0' { b'1' } else { b'0' };
                line
            }
            1 => {
                let honest = sealed(&mut session, &bona_record("honest-c1.cs.ucla.edu"));
                String::from_utf8(honest)
                    .expect("ASCII")
                    .replace("honest-c1", "forged-c1")
                    .into_bytes()
            }
            2 => format!("{forged_record}\n").into_bytes(),
            3 => first.clone(),
            4 => {
                let (pnd, pna) = previous.clone().expect("an earlier connection");
                sealed(&mut advanced(&secret, &pnd, &pna, true), &forged_record)
            }
            5 => sealed(&mut advanced(&secret, &nd, &na, false), &forged_record),
            _ => sealed(&mut advanced(&wrong, &nd, &na, true), &forged_record),
        };
        let after_client = format!("after-c{i}.cs.ucla.edu");
        let after = sealed(&mut twin, &bona_record(&after_client));
        c.send(&[forged, after].concat());
        expect_closed_after_pings(&mut c, &mut session, kind);
        forged_clients.push(forged_client);
        forged_clients.push(after_client);
        previous = Some((nd, na));
    }
    assert_unchanged(
        bailey,
        &expected,
        &forged_clients,
        &[
            "a peer line with a wrong tag",
            "a peer line out of sequence",
        ],
    );
}

/// A greeting without a nonce, when the server has a secret: closed with nothing said, and the
/// record after it not applied.
#[test]
fn a_greeting_without_a_nonce_is_refused_when_the_herd_has_a_secret() {
    let _alone = lock(&ONE_AT_A_TIME);
    let (herd, seed) = forgery_target("forged-greeting", WITH_SECRET);
    let bailey = herd.get("Bailey");
    let mut c = Client::connect_quick(bailey.addr);
    c.send(
        format!(
            "PEER herd/1 Bona\n{}\n",
            bona_record("forged-d.cs.ucla.edu")
        )
        .as_bytes(),
    );
    let rest = c.read_to_end();
    assert!(
        rest.is_empty(),
        "a greeting without a nonce was answered {}",
        show(&rest)
    );
    assert_unchanged(
        bailey,
        &BTreeSet::from([seed]),
        &["forged-d.cs.ucla.edu".to_owned()],
        &["Bona greeted without authenticating, but this herd has a secret"],
    );
}

#[test]
fn without_a_secret_a_client_still_cannot_inject_records() {
    let _alone = lock(&ONE_AT_A_TIME);
    let herd = bailey_and_bona("forged-open", WITHOUT_SECRET);
    let bailey = herd.get("Bailey");
    let before = dump_store(bailey);
    let line = bona_record("injected.cs.ucla.edu");
    let mut c = Client::connect_quick(bailey.addr);
    c.send(format!("IAMAT first.cs.ucla.edu {LOCATION} {}\n", now_secs_string()).as_bytes());
    let first = c.read_line();
    assert!(first.starts_with(b"AT Bailey "), "{}", show(&first));
    c.send(format!("{line}\n").as_bytes());
    let got = c.read_until_end();
    let want = (format!("? {line}\n").into_bytes(), true);
    assert!(
        got == want,
        "an AT line from a client: want {}; got {}",
        describe_end(&want),
        describe_end(&got)
    );
    let got = exchange(bailey.addr, b"WHATSAT injected.cs.ucla.edu 10 1\n");
    assert_eq!(show(&got), show(b"? WHATSAT injected.cs.ucla.edu 10 1\n"));
    let after = records(&dump_store(bailey));
    assert_eq!(
        after.len(),
        records(&before).len() + 1,
        "the store holds {after:?}"
    );
    assert!(!stored_clients(bailey).contains("injected.cs.ucla.edu"));
    assert_secrets_absent(&herd.all());
}

/// Bailey with neighbour Bona, whose port is a listener of the test: the test plays the Bona
/// that Bailey dials (and may dial Bailey as Bona too).
fn bailey_and_a_played_bona(tag: &str) -> (Herd, TcpListener) {
    Herd::build(tag)
        .env(WITH_SECRET)
        .extra(NO_PLACES)
        .only(&["Bailey"])
        .start_retrying_with(|| {
            let bona = TcpListener::bind("127.0.0.1:0").expect("cannot bind a port for Bona");
            let bona_port = bona.local_addr().expect("address").port();
            let members = vec![
                member("Bailey", free_ports(1)[0], &["Bona"]),
                member("Bona", bona_port, &["Bailey"]),
            ];
            (members, bona)
        })
}

/// The time between the first lines of `server`'s log (from byte `from`) that contain `first`
/// and then `then`, by the log's own stamps.
fn logged_between(server: &ServerProc, first: &str, then: &str, from: usize) -> f64 {
    let a = await_log_line(server, first, from, SETTLE);
    let b = await_log_line(server, then, from, SETTLE);
    seconds_between(log_stamp(&a), log_stamp(&b))
}

/// Before it has authenticated, a connection gets 5 s and lines of 1,024 bytes, both ways: an
/// acceptor closes a neighbour that greets and then says nothing, between 5 s and the next
/// check of its deadlines, and one whose proof line is longer than 1,024 bytes at once; a
/// dialler gives up on a neighbour that never sends its challenge 5 s after its greeting.
#[test]
fn a_handshake_must_end_within_5_s_in_lines_of_at_most_1024_bytes_either_way() {
    let _alone = lock(&ONE_AT_A_TIME);
    let (herd, bona) = bailey_and_a_played_bona("handshake-limits");
    let bailey = herd.get("Bailey");
    let timeout = peer::HANDSHAKE_TIMEOUT;
    let max = peer::MAX_HANDSHAKE_BYTES;
    // Bailey dials the test, greets, and hears nothing back (on a thread: it takes 5 s).
    let dialled = thread::spawn(move || {
        let mut link = Client::accept(&bona);
        let greeting = link.read_line();
        (greeting, link.read_to_end())
    });
    // Acceptor side: a proof line of exactly the limit is read as a (wrong) proof...
    let (mut c, _, _) = greet(bailey.addr);
    c.send(format!("PROOF {}\n", "a".repeat(max - "PROOF ".len())).as_bytes());
    assert_eq!(show(&c.read_to_end()), "", "a proof line of {max} bytes");
    await_log_line(
        bailey,
        "Bona failed to prove it knows the herd secret",
        0,
        SETTLE,
    );
    // ...and one byte more closes the connection at once, with nothing said.
    let (mut c, _, _) = greet(bailey.addr);
    c.send(format!("PROOF {}\n", "a".repeat(max + 1 - "PROOF ".len())).as_bytes());
    let told = c.read_to_end();
    assert_eq!(show(&told), "", "a proof line of {} bytes", max + 1);
    drop(c);
    await_log_line(
        bailey,
        &format!("closed: line longer than {max} bytes"),
        0,
        SETTLE,
    );
    // A greeting, then nothing: closed once its 5 s are up, with nothing said.
    let mark = bailey.log_bytes().len();
    let (mut c, _, _) = greet(bailey.addr);
    c.stream
        .set_read_timeout(Some(READ_TIMEOUT))
        .expect("a read timeout");
    assert_eq!(
        show(&c.read_to_end()),
        "",
        "a neighbour that never proves itself"
    );
    let id = await_log_line(bailey, "< PEER herd/1 Bona ", mark, SETTLE)
        .split(' ')
        .nth(1)
        .expect("STAMP cN < PEER")
        .to_owned();
    let acceptor_took = logged_between(
        bailey,
        &format!(" {id} < PEER herd/1 Bona "),
        &format!(" {id} closed: did not authenticate within 5 s"),
        mark,
    );
    let acceptor_bound = timeout + SWEEP + LATE;
    assert!(
        acceptor_took >= timeout.as_secs_f64() && acceptor_took <= acceptor_bound.as_secs_f64(),
        "a neighbour that did not prove itself was closed {acceptor_took:.3} s after its \
         greeting (bound {timeout:?}..{acceptor_bound:?})"
    );
    // Dialler side: the deadline is the link's own, exact to a turn of the loop.
    let (greeting, rest) = join(dialled);
    assert!(
        greeting.starts_with(b"PEER herd/1 Bailey "),
        "{}",
        show(&greeting)
    );
    assert_eq!(show(&rest), "", "after its greeting, Bailey sent");
    let dialler_took = logged_between(
        bailey,
        "link Bona > PEER herd/1 Bailey ",
        "link Bona down: no challenge within 5 s",
        0,
    );
    let dialler_bound = timeout + LATE;
    assert!(
        dialler_took >= timeout.as_secs_f64() && dialler_took <= dialler_bound.as_secs_f64(),
        "Bailey gave up on a neighbour that never sent its challenge {dialler_took:.3} s after \
         its greeting (bound {timeout:?}..{dialler_bound:?})"
    );
    println!(
        "handshake: a neighbour that never proved itself closed {acceptor_took:.3} s after its \
         greeting (bound {timeout:?}..{acceptor_bound:?}); a dialled neighbour that never \
         challenged given up {dialler_took:.3} s after the greeting (bound \
         {timeout:?}..{dialler_bound:?}); a proof line of {} bytes closed at once",
        max + 1
    );
    assert_secrets_absent(&herd.all());
}

/// The dialling side of the handshake, against an acceptor played by the test: a challenge
/// that is not one, or a proof that does not prove the herd secret, takes the link down with
/// nothing sent after the dialler's own proof (no record reaches a neighbour that has not
/// proved itself); a good proof brings it up, and the store follows.
#[test]
fn a_dialling_server_refuses_a_malformed_or_forged_challenge_and_a_wrong_proof() {
    let _alone = lock(&ONE_AT_A_TIME);
    let (herd, bona) = bailey_and_a_played_bona("forged-challenge");
    let bailey = herd.get("Bailey");
    let seed = iamat_at(bailey, "seed.cs.ucla.edu");
    let secret = Secret::new(SECRET.as_bytes());
    let wrong = Secret::new(b"not-the-herd-secret-at-all");
    let na = b"00112233445566778899aabbccddeeff".to_vec();
    let na_text = String::from_utf8(na.clone()).expect("hex");
    let other_nd = b"ffeeddccbbaa99887766554433221100".to_vec();
    type Proof = Box<dyn Fn(&[u8]) -> Vec<u8>>;
    let not_a_challenge = "the neighbour did not answer with a challenge";
    let wrong_proof = "the neighbour's proof is wrong";
    let cases: Vec<(&str, String, Option<Proof>, &str)> = vec![
        (
            "a challenge with a proof of its own",
            format!("CHALLENGE {na_text} {}", "ab".repeat(32)),
            None,
            not_a_challenge,
        ),
        (
            "a nonce a digit short",
            format!("CHALLENGE {}", &na_text[1..]),
            None,
            not_a_challenge,
        ),
        (
            "a proof where the challenge belongs",
            format!("PROOF {}", "cd".repeat(32)),
            None,
            not_a_challenge,
        ),
        (
            "a challenge line over 1,024 bytes",
            format!("CHALLENGE {}", "a".repeat(1100)),
            None,
            "the neighbour sent a line longer than 1024 bytes",
        ),
        (
            "a proof made with another secret",
            format!("CHALLENGE {na_text}"),
            Some(Box::new({
                let (wrong, na) = (wrong.clone(), na.clone());
                move |nd| wrong.proof(b"accept", b"Bailey", b"Bona", nd, &na)
            })),
            wrong_proof,
        ),
        (
            "the dialler's own proof sent back",
            format!("CHALLENGE {na_text}"),
            Some(Box::new({
                let (secret, na) = (secret.clone(), na.clone());
                move |nd| secret.proof(b"dial", b"Bailey", b"Bona", nd, &na)
            })),
            wrong_proof,
        ),
        (
            "a proof for another connection's nonces",
            format!("CHALLENGE {na_text}"),
            Some(Box::new({
                let (secret, na) = (secret.clone(), na.clone());
                move |_| secret.proof(b"accept", b"Bailey", b"Bona", &other_nd, &na)
            })),
            wrong_proof,
        ),
    ];
    let mut from = 0;
    // Everything Bailey sent on its links: the secret is never in it.
    let mut heard = Vec::new();
    for (what, challenge, proof, why) in &cases {
        let mut link = Client::accept(&bona);
        let greeting = link.read_line();
        heard.extend_from_slice(&greeting);
        let nd = peer::parse_greeting(&greeting[..greeting.len() - 1])
            .and_then(|g| g.nonce)
            .unwrap_or_else(|| panic!("{what}: Bailey greeted {}", show(&greeting)))
            .to_vec();
        link.send(format!("{challenge}\n").as_bytes());
        if let Some(proof) = proof {
            // Bailey proves itself first, and rightly.
            let line = link.read_line();
            heard.extend_from_slice(&line);
            let theirs = peer::parse_proof(&line[..line.len() - 1])
                .unwrap_or_else(|| panic!("{what}: Bailey answered {}", show(&line)));
            assert!(
                secret.verify(theirs, b"dial", b"Bailey", b"Bona", &nd, &na),
                "{what}: Bailey's proof does not prove the herd secret"
            );
            link.send(&[&b"PROOF "[..], &proof(&nd), b"\n"].concat());
        }
        let rest = link.read_to_end();
        assert_eq!(show(&rest), "", "{what}: after the handshake, Bailey sent");
        let line = await_log_line(bailey, "link Bona down: ", from, SETTLE);
        assert!(line.contains(why), "{what}: {line}");
        from = await_log_past(bailey, "link Bona down: ", from, SETTLE);
    }
    assert!(
        !bailey.log().contains("link Bona up"),
        "Bailey's link to Bona came up:\n{}",
        bailey.log()
    );
    // The same acceptor with the right proof: the link comes up, and Bailey's store follows.
    let mut link = Client::accept(&bona);
    let greeting = link.read_line();
    let nd = peer::parse_greeting(&greeting[..greeting.len() - 1])
        .and_then(|g| g.nonce)
        .expect("a nonce")
        .to_vec();
    link.send(format!("CHALLENGE {na_text}\n").as_bytes());
    let _ = link.read_line(); // Bailey's proof
    let ours = secret.proof(b"accept", b"Bailey", b"Bona", &nd, &na);
    link.send(&[&b"PROOF "[..], &ours, b"\n"].concat());
    let mut session = Session::new(&secret, &nd, &na, false);
    let record = loop {
        let line = link.read_line();
        let payload = session
            .open(&line[..line.len() - 1])
            .unwrap_or_else(|e| panic!("a line from Bailey does not open ({e}): {}", show(&line)))
            .to_vec();
        if payload.starts_with(b"AT ") {
            break payload;
        }
    };
    assert_eq!(show(&record), show(seed.as_bytes()), "the first record");
    assert!(
        !contains(&heard, SECRET.as_bytes()),
        "Bailey sent the herd secret on a link"
    );
    println!(
        "forged challenge: {} malformed or forged challenges and proofs refused by the dialler, \
         nothing sent after its proof; the right proof brought the link up",
        cases.len()
    );
    assert_secrets_absent(&herd.all());
}

/// A second herd secret, for a neighbour that does not share the first.
const OTHER_SECRET: &str = "a3c5e7092b4d6f81d3e5f7a9c1b3d5e7f9a1c3e5";
/// The secret of `secret_file`.
const FILE_SECRET: &str = "6f1d0c8e3a5b47e29c0d8f7a6b5e4d3c2b1a0f9e";

/// Two real servers: Bailey reads the herd secret from `secret_file`, Bona has a different one
/// in `HERD_SECRET`, which wins over the file. Each proves itself to the other with its own,
/// and fails: no link comes up either way, and each log says why. Bona started again without
/// `HERD_SECRET` reads the same file, and both links come up, authenticated. Neither secret
/// appears in a log.
#[test]
fn neighbours_with_different_secrets_never_link_and_a_shared_secret_file_links_them() {
    use std::os::unix::fs::PermissionsExt;
    let _alone = lock(&ONE_AT_A_TIME);
    let dir = TestDir::new("secret-file");
    let file = dir.join("herd.secret");
    std::fs::write(&file, format!("{FILE_SECRET}\n")).expect("the secret file");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let top = format!(
        "data_dir = \"\"\nsecret_file = {}\n",
        toml_basic(&file.display().to_string())
    );
    const KEY_ONLY: Env = &[("GOOGLE_PLACES_API_KEY", KEY)];
    let herd = Herd::build("secret-file")
        .env(KEY_ONLY)
        .top(&top)
        .extra(NO_PLACES)
        .only(&["Bailey"])
        .start_retrying(bailey_and_bona_on_free_ports);
    let bailey = herd.get("Bailey");
    let env = [
        ("GOOGLE_PLACES_API_KEY", KEY),
        ("HERD_SECRET", OTHER_SECRET),
    ];
    let mut bona = spawn_server(&herd.config, "Bona", &env);
    // Each dials the other, again and again, and fails to prove itself every time.
    for (s, other) in [(bailey, "Bona"), (&bona, "Bailey")] {
        let why = format!("{other} failed to prove it knows the herd secret");
        let mut from = 0;
        for _ in 0..3 {
            from = await_log_past(s, &why, from, SETTLE);
        }
    }
    let at = iamat_at(bailey, "apart.cs.ucla.edu");
    thread::sleep(Duration::from_millis(300));
    for (s, other) in [(bailey, "Bona"), (&bona, "Bailey")] {
        let log = s.log();
        for never in [format!("link {other} up"), format!("is peer {other}")] {
            assert!(
                !log.contains(&never),
                "{} linked with a neighbour of another secret: {never:?} in\n{log}",
                s.name
            );
        }
    }
    let got = exchange(bona.addr, b"WHATSAT apart.cs.ucla.edu 10 1\n");
    assert_eq!(
        show(&got),
        show(b"? WHATSAT apart.cs.ucla.edu 10 1\n"),
        "a record crossed between servers of different secrets"
    );
    bona.kill();
    let marks = (bailey.log_bytes().len(), bona.log_bytes().len());
    let bona = spawn_server(&herd.config, "Bona", KEY_ONLY);
    for (s, other, mark) in [(bailey, "Bona", marks.0), (&bona, "Bailey", marks.1)] {
        let up = await_log_line(s, &format!("link {other} up to "), mark, SETTLE);
        assert!(up.contains(", authenticated;"), "{}: {up}", s.name);
        await_log_line(s, &format!("is peer {other}, authenticated"), mark, SETTLE);
    }
    await_stored(&bona, &at);
    println!("secrets: different secrets never linked; a shared secret_file linked both ways");
    assert_key_absent(&[bailey, &bona], KEY);
    for secret in [FILE_SECRET, OTHER_SECRET] {
        assert_absent(&[bailey, &bona], secret, "a herd secret");
    }
}

// ---------------------------------------------------------------------------------------------
// 6. hostile clients: slow drips, a client that never reads, one connection too many

/// One connection sending a line a byte a second, never its end.
struct Drip {
    stream: TcpStream,
    first_at: Instant,
    last_at: Instant,
    sent: usize,
    closed_at: Option<Instant>,
    received: usize,
}

const DRIP_LINE: &[u8] = b"IAMAT drip.cs.ucla.edu +34.068930-118.445127 1621464827.959498503";

#[test]
fn slow_drips_are_closed_at_the_line_deadline_while_a_client_is_answered_promptly() {
    let _alone = lock(&ONE_AT_A_TIME);
    let extra = format!(
        "{NO_PLACES}\n[limits]\nline_timeout_ms = {}\n",
        LINE_TIMEOUT.as_millis()
    );
    let herd = bailey_alone("slowloris", WITHOUT_SECRET, &extra);
    let bailey = herd.get("Bailey");
    let pinger = Pinger::start(
        bailey.addr,
        "Bailey",
        "prompt.cs.ucla.edu",
        Duration::from_millis(100),
    );
    thread::sleep(Duration::from_millis(300));
    let mut drips: Vec<Drip> = (0..DRIPPERS)
        .map(|i| {
            let mut stream = TcpStream::connect(bailey.addr)
                .unwrap_or_else(|e| panic!("dripper {i} cannot connect: {e}"));
            stream.set_nodelay(true).expect("TCP_NODELAY");
            // Taken before the byte leaves: the server cannot have started its clock earlier.
            let now = Instant::now();
            stream.write_all(&DRIP_LINE[..1]).expect("first byte");
            stream.set_nonblocking(true).expect("non-blocking");
            Drip {
                stream,
                first_at: now,
                last_at: now,
                sent: 1,
                closed_at: None,
                received: 0,
            }
        })
        .collect();
    let connected = Instant::now();
    let give_up = connected + LINE_TIMEOUT + Duration::from_secs(15);
    let mut buf = [0u8; 4096];
    while drips.iter().any(|d| d.closed_at.is_none()) && Instant::now() < give_up {
        let open: Vec<usize> = (0..drips.len())
            .filter(|&i| drips[i].closed_at.is_none())
            .collect();
        let mut fds: Vec<libc::pollfd> = open
            .iter()
            .map(|&i| libc::pollfd {
                fd: drips[i].stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures for the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 20) };
        assert!(
            ready >= 0,
            "poll failed: {}",
            std::io::Error::last_os_error()
        );
        let now = Instant::now();
        for (k, fd) in fds.iter().enumerate() {
            if fd.revents == 0 {
                continue;
            }
            let d = &mut drips[open[k]];
            loop {
                match d.stream.read(&mut buf) {
                    Ok(0) => {
                        d.closed_at = Some(now);
                        break;
                    }
                    Ok(n) => d.received += n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        d.closed_at = Some(now); // reset: closed too
                        break;
                    }
                }
            }
        }
        for &i in &open {
            let d = &mut drips[i];
            if d.closed_at.is_some() || now.duration_since(d.last_at) < Duration::from_secs(1) {
                continue;
            }
            match d.stream.write(&DRIP_LINE[d.sent % DRIP_LINE.len()..][..1]) {
                Ok(_) => {
                    d.sent += 1;
                    d.last_at = now;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => d.closed_at = Some(now),
            }
        }
    }
    let rtts = pinger.stop("while 900 connections dripped");
    let lives: Vec<Duration> = drips
        .iter()
        .map(|d| d.closed_at.map_or(Duration::MAX, |at| at - d.first_at))
        .collect();
    let still_open = lives.iter().filter(|l| **l == Duration::MAX).count();
    assert_eq!(
        still_open,
        0,
        "{still_open} of {DRIPPERS} dripping connections were still open {:?} after the last \
         connected (line timeout {LINE_TIMEOUT:?})",
        give_up - connected
    );
    let (shortest, longest) = (
        *lives.iter().min().expect("some"),
        *lives.iter().max().expect("some"),
    );
    assert!(
        shortest >= LINE_TIMEOUT,
        "a dripping connection was closed {shortest:?} after its first byte, before the line \
         timeout {LINE_TIMEOUT:?}"
    );
    // The server looks for expired lines once a second, and a turn of the loop, or the test's
    // own, may come late on a shared machine.
    let bound = LINE_TIMEOUT + SWEEP + LATE;
    assert!(
        longest <= bound,
        "a dripping connection was closed only {longest:?} after its first byte (bound {bound:?})"
    );
    let bytes_back: usize = drips.iter().map(|d| d.received).sum();
    // A socket is closed before its line is logged, at the end of the same turn.
    let why = format!(
        "closed: a line not finished within {} ms",
        LINE_TIMEOUT.as_millis()
    );
    let mut closes = 0;
    eventually(Duration::from_secs(5), || {
        closes = bailey.log().matches(&why).count();
        closes >= DRIPPERS
    });
    assert_eq!(closes, DRIPPERS, "closes for the line deadline in the log");
    println!(
        "slowloris: {DRIPPERS} drips closed {shortest:?}..{longest:?} after their first byte \
         (bound {LINE_TIMEOUT:?}..{bound:?}; {} bytes sent to them); meanwhile {} (bound \
         {PROMPT:?})",
        bytes_back,
        summary(&rtts)
    );
    assert_secrets_absent(&herd.all());
}

#[test]
fn a_client_that_pipelines_whatsats_and_never_reads_is_disconnected_at_its_cap() {
    let _alone = lock(&ONE_AT_A_TIME);
    let fake = FakePlaces::start(
        Behaviour::ok(fixture("legacy_ok_20.json")).delayed(Duration::from_millis(200)),
    );
    // Four WHATSATs in flight at most: once its unread replies stop its commands (at a quarter
    // of the cap, 256 KiB), the four that complete later cannot take them past the cap, so the
    // soft limit is the one that trips.
    let extra = format!(
        "{}\n[limits]\nclient_output_soft_bytes = 65536\nclient_output_soft_ms = {}\n\
         client_output_bytes = 1048576\npending_replies = 4\n",
        fake.places_toml("legacy", 5000),
        SOFT_OUTPUT_TIME.as_millis()
    );
    let herd = bailey_alone("never-reads", WITHOUT_SECRET, &extra);
    let bailey = herd.get("Bailey");
    iamat_at(bailey, "kiwi.cs.ucla.edu");
    let pinger = Pinger::start(
        bailey.addr,
        "Bailey",
        "reader.cs.ucla.edu",
        Duration::from_millis(100),
    );
    // 2000 WHATSATs, each answered with about 36 kB, in one write; then nothing is read.
    let mut hog = TcpStream::connect(bailey.addr).expect("connect");
    hog.set_write_timeout(Some(READ_TIMEOUT)).expect("timeout");
    hog.write_all("WHATSAT kiwi.cs.ucla.edu 10 20\n".repeat(2000).as_bytes())
        .expect("the WHATSATs");
    let sent = Instant::now();
    let id = conn_id(bailey, hog.local_addr().expect("local address"));
    let line = await_log_line(bailey, &format!("{id} closed: "), 0, SETTLE);
    let cut_after = sent.elapsed();
    let soft = format!(
        "{id} closed: over 65536 bytes of replies unread for {} ms: the client does not read",
        SOFT_OUTPUT_TIME.as_millis()
    );
    assert!(
        line.ends_with(&soft),
        "the client that never reads was closed, but not by the soft output limit: {line:?}"
    );
    // Not before the soft limit's time, and within it, the time its replies take to pass the
    // limit (the first comes 200 ms after it asked), and the once-a-second check.
    let bound = SOFT_OUTPUT_TIME + SOFT_OUTPUT_FILL + SWEEP + LATE;
    assert!(
        cut_after >= SOFT_OUTPUT_TIME && cut_after <= bound,
        "the client that never reads was cut off {cut_after:?} after it sent its WHATSATs \
         (bound {SOFT_OUTPUT_TIME:?}..{bound:?})"
    );
    // The socket sees the end: what the kernel already holds, then end of stream (or a reset).
    hog.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match hog.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the cut-off client never saw the end ({got} bytes read): {e}"),
        }
    }
    let rtts = pinger.stop("while a client did not read");
    // Another client is unaffected: a whole WHATSAT reply.
    let mut other = Client::connect(bailey.addr);
    other.send(b"WHATSAT kiwi.cs.ucla.edu 10 1\n");
    let reply = other.read_whatsat_reply();
    assert!(reply.starts_with(b"AT Bailey "), "{}", show(&reply));
    println!(
        "never reads: cut off {cut_after:?} after sending (bound {bound:?}: {}), {got} bytes \
         were still readable; meanwhile {} (bound {PROMPT:?})",
        line.split_once(" closed: ").map_or("", |(_, why)| why),
        summary(&rtts)
    );
    assert_secrets_absent(&herd.all());
}

/// `client_output_soft_ms` of the test of a client that never reads...
const SOFT_OUTPUT_TIME: Duration = Duration::from_secs(1);
/// ...and how long its replies may take to pass the soft limit: the first comes after Places'
/// 200 ms, then four at a time, and the kernel's buffers of the connection fill first.
const SOFT_OUTPUT_FILL: Duration = Duration::from_secs(1);

const MAX_CONNECTIONS: usize = 20;

#[test]
fn over_the_connection_limit_the_extra_client_is_refused_and_peer_links_stay_up() {
    let _alone = lock(&ONE_AT_A_TIME);
    let extra = format!("{NO_PLACES}\n[limits]\nmax_connections = {MAX_CONNECTIONS}\n");
    let herd = Herd::build("max-connections")
        .env(WITHOUT_SECRET)
        .extra(&extra)
        .start_retrying(|| {
            let p = free_ports(3);
            vec![
                member("Bailey", p[0], &["Bona", "Campbell"]),
                member("Bona", p[1], &["Bailey", "Campbell"]),
                member("Campbell", p[2], &["Bailey", "Bona"]),
            ]
        });
    herd.wait_linked();
    let bailey = herd.get("Bailey");
    // Neighbours' links do not count against max_connections (each neighbour has a place of
    // its own): clients fill them all.
    let mut held: Vec<Client> = (0..MAX_CONNECTIONS)
        .map(|i| {
            let mut c = Client::connect(bailey.addr);
            iamat_on(&mut c, "Bailey", &format!("held-{i}.cs.ucla.edu"));
            c
        })
        .collect();
    let marks: Vec<usize> = herd.servers.iter().map(|s| s.log_bytes().len()).collect();
    let full_since = Instant::now();
    // An extra client takes one of the places kept for Bailey's two neighbours (two each), and
    // its command is answered `? server busy`, then the connection closed.
    for i in 0..3 {
        let mut extra = Client::connect_quick(bailey.addr);
        let line = format!("IAMAT extra-{i} {LOCATION} {}\n", now_secs_string());
        extra.send(line.as_bytes());
        let got = extra.read_to_end();
        assert_eq!(show(&got), show(b"? server busy\n"), "the extra client");
    }
    // Connections that say nothing hold those places for a handshake's time at most, and only
    // until a newcomer needs one: then the one silent longest is told the server is busy.
    let mut silent: Vec<Client> = (0..4).map(|_| Client::connect(bailey.addr)).collect();
    thread::sleep(Duration::from_millis(100));
    let newcomer = Client::connect(bailey.addr);
    let oldest = &mut silent[0];
    oldest
        .stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("a read timeout");
    let (got, ended) = oldest.read_until_end();
    assert_eq!(
        (show(&got), ended),
        (show(b"? server busy\n"), true),
        "the stranger silent longest"
    );
    drop((silent, newcomer));
    assert!(
        eventually(Duration::from_secs(5), || bailey
            .log()
            .contains("told the server is busy")),
        "no refusal in the log"
    );
    // Updates still cross the herd both ways while Bailey is full.
    let from_bailey = iamat_on(&mut held[0], "Bailey", "crossing-1.cs.ucla.edu");
    let to_bailey = iamat_at(herd.get("Campbell"), "crossing-2.cs.ucla.edu");
    let servers = herd.all();
    let everywhere = |record: &str| {
        eventually(Duration::from_secs(10), || {
            servers
                .iter()
                .all(|s| records(&dump_store(s)).contains(record))
        })
    };
    assert!(everywhere(&from_bailey), "{from_bailey:?} did not cross");
    assert!(everywhere(&to_bailey), "{to_bailey:?} did not cross");
    // And no link went down, for longer than a dead link takes to be noticed.
    thread::sleep((peer::DEAD_AFTER + Duration::from_secs(1)).saturating_sub(full_since.elapsed()));
    for (s, mark) in herd.servers.iter().zip(&marks) {
        let log = s.log_bytes();
        let text = String::from_utf8_lossy(&log[*mark..]).into_owned();
        if let Some(line) = text.lines().find(|l| {
            l.contains(" down: ") || l.contains("closed its link") || l.contains("silent for")
        }) {
            panic!(
                "{}'s peer link dropped while Bailey was full: {line}",
                s.name
            );
        }
    }
    let from_bailey = iamat_on(&mut held[1], "Bailey", "crossing-3.cs.ucla.edu");
    assert!(everywhere(&from_bailey), "{from_bailey:?} did not cross");
    // A client that leaves makes room, once the server has seen it go: a connection arriving
    // before that is refused, and the refusal can reset it while this side still writes.
    let leaving = held.pop().expect("clients held");
    let id = conn_id(bailey, leaving.stream.local_addr().expect("local address"));
    let mark = bailey.log_bytes().len();
    drop(leaving);
    await_log_line(
        bailey,
        &format!(" {id} closed: "),
        mark,
        Duration::from_secs(10),
    );
    let served = eventually(Duration::from_secs(5), || {
        let got = exchange(
            bailey.addr,
            format!("IAMAT room.cs.ucla.edu {LOCATION} {}\n", now_secs_string()).as_bytes(),
        );
        got.starts_with(b"AT Bailey ")
    });
    assert!(served, "no room after a client left");
    println!("max connections: 3 extra clients refused with `? server busy`, links up throughout");
    assert_secrets_absent(&herd.all());
}

// ---------------------------------------------------------------------------------------------
// 7. a Places that misbehaves

/// What a WHATSAT's body must be.
enum Expect {
    /// Google's error shape, said by the server: Places could not be asked or gave no answer.
    UnknownError,
    /// This body exactly (a relayed answer).
    Body(Vec<u8>),
}

/// A server with a Places of its own, and kiwi's location reported to it.
struct PlacesServer {
    herd: Herd,
    at_line: Vec<u8>,
}

impl PlacesServer {
    fn start(tag: &str, places: &str) -> PlacesServer {
        let herd = bailey_alone(tag, WITHOUT_SECRET, places);
        let at = iamat_at(herd.get("Bailey"), "kiwi.cs.ucla.edu");
        PlacesServer {
            herd,
            at_line: format!("{at}\n").into_bytes(),
        }
    }

    /// One WHATSAT while another connection sends IAMATs: the reply must be well formed, be
    /// `expect`, and come within the Places timeout and a margin; every IAMAT meanwhile must be
    /// answered promptly. Returns the time the reply took.
    fn whatsat(&self, what: &str, expect: &Expect) -> Duration {
        let bailey = self.herd.get("Bailey");
        let pinger = Pinger::start(
            bailey.addr,
            "Bailey",
            "meanwhile.cs.ucla.edu",
            // Often enough to fall inside even a 5 MiB body, which takes milliseconds.
            Duration::from_millis(1),
        );
        let mut c = Client::connect(bailey.addr);
        let asked = Instant::now();
        c.send(b"WHATSAT kiwi.cs.ucla.edu 10 5\n");
        let reply = c.read_whatsat_reply();
        let took = asked.elapsed();
        let rtts = pinger.stop(what);
        assert!(
            took <= PLACES_TIMEOUT + REPLY_MARGIN,
            "{what}: the reply took {took:?} (timeout {PLACES_TIMEOUT:?}, bound {:?})",
            PLACES_TIMEOUT + REPLY_MARGIN
        );
        assert!(
            reply.starts_with(&self.at_line) && reply.ends_with(b"\n\n"),
            "{what}: a malformed reply {}",
            show(&reply)
        );
        let body = &reply[self.at_line.len()..reply.len() - 2];
        assert!(
            !body.is_empty()
                && !body.ends_with(b"\n")
                && !body.windows(2).any(|w| w == b"\n\n")
                && serde_json::from_slice::<serde_json::Value>(body).is_ok(),
            "{what}: the body is not one JSON value under the newline rules: {}",
            show(body)
        );
        match expect {
            Expect::UnknownError => assert!(
                body.starts_with(UNKNOWN_ERROR_PREFIX) && body.ends_with(b"\"}"),
                "{what}: not an UNKNOWN_ERROR body: {}",
                show(body)
            ),
            Expect::Body(want) => assert_eq!(show(body), show(want), "{what}: the body"),
        }
        // Nothing more on the connection: the reply was whole and single.
        c.half_close();
        assert_eq!(show(&c.read_to_end()), "", "{what}: bytes after the reply");
        println!(
            "places: {what}: well-formed reply in {took:?} (bound {:?}); meanwhile {} (bound \
             {PROMPT:?})",
            PLACES_TIMEOUT + REPLY_MARGIN,
            summary(&rtts)
        );
        took
    }
}

/// A JSON body of about `size` bytes, in Google's legacy shape.
fn big_body(size: usize) -> Vec<u8> {
    let mut body = br#"{"html_attributions" : [], "results" : ["#.to_vec();
    let entry = format!(r#"{{"name" : "{}"}}"#, "x".repeat(1000));
    while body.len() < size {
        if !body.ends_with(b"[") {
            body.push(b',');
        }
        body.extend_from_slice(entry.as_bytes());
    }
    body.extend_from_slice(br#"], "status" : "OK"}"#);
    body
}

#[test]
fn places_that_stalls_drops_sends_5_mib_or_answers_429_still_gets_every_whatsat_answered() {
    let _alone = lock(&ONE_AT_A_TIME);
    let fake = FakePlaces::start(Behaviour::Stall);
    let server = PlacesServer::start(
        "places-faults",
        &fake.places_toml("legacy", PLACES_TIMEOUT.as_millis() as u64),
    );
    let five_mib = big_body(5 << 20);
    let throttled = fixture("legacy_over_query_limit.json");
    let cases = [
        ("a stall", Behaviour::Stall, Expect::UnknownError),
        (
            "a dropped connection",
            Behaviour::Drop,
            Expect::UnknownError,
        ),
        (
            "a 5 MiB body with Content-Length",
            Behaviour::ok(five_mib.clone()),
            Expect::UnknownError,
        ),
        (
            "a 5 MiB chunked body",
            Behaviour::framed(five_mib.clone(), Framing::Chunked(vec![64 * 1024])),
            Expect::UnknownError,
        ),
        (
            "a 5 MiB body to the end of the stream",
            Behaviour::framed(five_mib, Framing::Close),
            Expect::UnknownError,
        ),
        (
            "HTTP 429 with Google's OVER_QUERY_LIMIT body",
            Behaviour::status(429, throttled.clone()),
            Expect::Body(newline_rules(&throttled)),
        ),
        (
            "HTTP 502 with an HTML page",
            Behaviour::status(502, &b"<html><body>Bad Gateway</body></html>\n"[..]),
            Expect::UnknownError,
        ),
    ];
    for (what, behaviour, expect) in &cases {
        fake.set(behaviour.clone());
        let took = server.whatsat(what, expect);
        if matches!(behaviour, Behaviour::Stall) {
            assert!(
                took + Duration::from_millis(100) >= PLACES_TIMEOUT,
                "a stalled Places was given up after {took:?}, before the timeout"
            );
        }
    }
    // And Places that behaves again is answered normally.
    fake.set(Behaviour::ok(fixture("legacy_zero_results.json")));
    server.whatsat(
        "a normal answer after the faults",
        &Expect::Body(newline_rules(&fixture("legacy_zero_results.json"))),
    );
    assert!(
        fake.requests().iter().all(|r| r.target.contains(KEY)),
        "the requests did not carry the key"
    );
    assert_secrets_absent(&server.herd.all());
}

/// A whole HTTP response with this body and Content-Length.
fn http_response(body: &[u8]) -> Vec<u8> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=UTF-8\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    [head.as_bytes(), body].concat()
}

#[test]
fn places_that_dribbles_is_given_up_at_the_timeout_or_relayed_when_it_finishes_in_time() {
    let _alone = lock(&ONE_AT_A_TIME);
    let ok = fixture("legacy_ok_20.json");
    // 36 kB at 64 bytes every 50 ms would take half a minute.
    let fake = DribblePlaces::start(Dribble {
        response: http_response(&ok),
        step: 64,
        pause: Duration::from_millis(50),
    });
    let server = PlacesServer::start(
        "places-dribble",
        &fake.places_toml(PLACES_TIMEOUT.as_millis() as u64),
    );
    let took = server.whatsat("a dribble slower than the timeout", &Expect::UnknownError);
    assert!(
        took + Duration::from_millis(100) >= PLACES_TIMEOUT,
        "a dribbling Places was given up after {took:?}, before the timeout"
    );
    // A small answer dribbled over about half a second is still relayed whole (a quarter of the
    // timeout: the pauses may each oversleep on a loaded machine).
    let small = fixture("legacy_zero_results.json");
    let response = http_response(&small);
    let pause = Duration::from_millis(500 / (response.len() as u64 / 16));
    fake.set(Dribble {
        response,
        step: 16,
        pause,
    });
    server.whatsat(
        "a dribble that ends in time",
        &Expect::Body(newline_rules(&small)),
    );
    assert_secrets_absent(&server.herd.all());
}

#[test]
fn places_with_a_bad_certificate_gets_unknown_error() {
    let _alone = lock(&ONE_AT_A_TIME);
    let fake = FakePlaces::start_untrusted(Behaviour::ok(fixture("legacy_ok_20.json")));
    let server = PlacesServer::start(
        "places-bad-cert",
        &fake.places_toml("legacy", PLACES_TIMEOUT.as_millis() as u64),
    );
    server.whatsat("an untrusted certificate", &Expect::UnknownError);
    assert!(
        fake.requests().is_empty(),
        "a request went past a bad certificate"
    );
    assert_secrets_absent(&server.herd.all());
}

// ---------------------------------------------------------------------------------------------
// 8. the API key never appears in a log

/// The key from a file this time, and Places API (New), where it travels in a header: every
/// failure the fake can produce, and the key in none of the log, stdout or replies. (Every test
/// above also checks its own servers' logs for the key.)
#[test]
fn the_api_key_never_appears_in_any_log_whatever_fails() {
    let _alone = lock(&ONE_AT_A_TIME);
    let fake = FakePlaces::start(Behaviour::Stall);
    let dir = TestDir::new("key-file");
    let key_file = dir.join("places.key");
    std::fs::write(&key_file, format!("{KEY}\n")).expect("key file");
    // Owner-only, as the server requires of a key file.
    let owner_only = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600);
    std::fs::set_permissions(&key_file, owner_only).expect("chmod 600");
    let places = format!(
        "{}key_file = \"{}\"\n",
        fake.places_toml("new", PLACES_TIMEOUT.as_millis() as u64),
        key_file.display()
    );
    static KEY_FROM_FILE: &[(&str, &str)] = &[("HERD_SECRET", "")];
    let herd = bailey_alone("key-never-logged", KEY_FROM_FILE, &places);
    let bailey = herd.get("Bailey");
    iamat_at(bailey, "kiwi.cs.ucla.edu");
    let cases: Vec<(&str, Behaviour)> = vec![
        ("a stall", Behaviour::Stall),
        ("a dropped connection", Behaviour::Drop),
        ("a 5 MiB body", Behaviour::ok(big_body(5 << 20))),
        (
            "a body that is not JSON",
            Behaviour::ok(&b"<html>no</html>"[..]),
        ),
        (
            "a 403 error body",
            Behaviour::status(403, fixture("new_error_403.json")),
        ),
        ("HTTP 429", Behaviour::status(429, &b"{}"[..])),
        (
            "a malformed status line",
            Behaviour::Raw(b"HTTP/1.1 two hundred\r\n\r\n".to_vec()),
        ),
        (
            "a bad chunk size",
            Behaviour::Raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec()),
        ),
        (
            "a short body, then the end",
            Behaviour::Raw(
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{".to_vec(),
            ),
        ),
        ("a good answer", Behaviour::ok(fixture("new_ok_5.json"))),
    ];
    let mut replies = Vec::new();
    for (what, behaviour) in cases {
        fake.set(behaviour);
        let mut c = Client::connect(bailey.addr);
        c.send(b"WHATSAT kiwi.cs.ucla.edu 10 5\n");
        let reply = c.read_whatsat_reply();
        assert!(
            reply.starts_with(b"AT Bailey "),
            "{what}: {}",
            show(&reply[..reply.len().min(300)])
        );
        replies.push((what, reply));
    }
    let requests = fake.requests();
    assert!(
        !requests.is_empty()
            && requests
                .iter()
                .all(|r| r.header("x-goog-api-key") == Some(KEY.as_bytes())),
        "the requests did not carry the key from the file"
    );
    for (what, reply) in &replies {
        assert!(
            !reply.windows(KEY.len()).any(|w| w == KEY.as_bytes()),
            "{what}: the reply shows the key"
        );
    }
    assert_secrets_absent(&herd.all());
    let failures = bailey.log().matches("failed: ").count();
    println!(
        "api key: {} WHATSATs against a failing Places ({failures} failures logged), key in no \
         log line, reply or output",
        replies.len()
    );
}
