//! What an attacker could do to a server, each tried here and refused: fill its
//! memory with new client ids, take the places its neighbours need, pin a client's record with
//! a time far in the future, learn anything from a handshake, forge a line into the log or a
//! terminal escape into the store dump, learn the server's internals from a Places error, or
//! run up the bill of a paid Places key.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use common::herds::{
    await_converged, await_log_line, bailey_and_bona_on_free_ports, dump_store, free_ports, member,
    records, Herd, MEMORY_ONLY,
};
use common::load::rss_kb;
use common::*;
use herd::peer::{self, Secret, Session};

/// Held by the tests that measure memory or time, so that they do not share the two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const SECRET: &str = "hardening-herd-secret-7c2e91b4d05a";
const WITH_SECRET: &[(&str, &str)] = &[("HERD_SECRET", SECRET)];
const NO_PLACES: &str =
    "[places]\nurl = \"https://127.0.0.1:9/maps/api/place/nearbysearch/json\"\ntimeout_ms = 2000\n";

fn bailey(tag: &str, extra: &str) -> Herd {
    Herd::build(tag)
        .extra(extra)
        .start_retrying(|| vec![member("Bailey", free_ports(1)[0], &[])])
}

/// Bailey, with neighbour Bona configured but not running: the test plays Bona.
fn bailey_with_bona(tag: &str, env: common::herds::Env, extra: &str) -> Herd {
    Herd::build(tag)
        .env(env)
        .extra(extra)
        .only(&["Bailey"])
        .start_retrying(bailey_and_bona_on_free_ports)
}

/// Sends `lines` on one connection while a thread reads the replies; returns them.
fn pipelined(addr: SocketAddr, lines: impl Iterator<Item = Vec<u8>>) -> Vec<Vec<u8>> {
    let stream = TcpStream::connect(addr).expect("connect");
    let reader = stream.try_clone().expect("clone");
    let collector = thread::spawn(move || {
        let mut replies = Vec::new();
        for line in BufReader::new(reader).split(b'\n') {
            match line {
                Ok(line) => replies.push(line),
                Err(_) => break,
            }
        }
        replies
    });
    let mut writer = std::io::BufWriter::new(&stream);
    for line in lines {
        writer.write_all(&line).expect("write");
    }
    writer.flush().expect("flush");
    drop(writer);
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    collector.join().expect("the reader")
}

/// New client ids are bounded in length and in number, so a flood of them costs a
/// bounded amount of memory (it took a server from 3.7 MB to 325 MB in a second).
#[test]
fn a_flood_of_new_client_ids_costs_bounded_memory() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let herd = bailey("id-flood", "[limits]\nmax_clients = 1000\n");
    let b = herd.get("Bailey");
    let before = rss_kb(b.pid());
    let time = now_secs_string();
    // Ids of 4,000 bytes: longer than max_client_id_bytes (256), each an invalid command.
    let long = pipelined(
        b.addr,
        (0..10_000)
            .map(|i| format!("IAMAT {i:04}{} {LOCATION} {time}\n", "x".repeat(3996)).into_bytes()),
    );
    assert_eq!(long.len(), 10_000);
    assert!(long.iter().all(|r| r.starts_with(b"? IAMAT ")));
    // 40,000 short new ids: the first thousand are stored, the rest refused.
    let short = pipelined(
        b.addr,
        (0..40_000).map(|i| format!("IAMAT flood-{i} {LOCATION} {time}\n").into_bytes()),
    );
    let stored = short
        .iter()
        .filter(|r| r.starts_with(b"AT Bailey "))
        .count();
    let refused = short.iter().filter(|r| r.starts_with(b"? IAMAT ")).count();
    assert_eq!((stored, refused), (1000, 39_000));
    assert!(b
        .log()
        .contains("refused a new client: the store holds 1000 clients"));
    // A client already held is still updated.
    let again = exchange(
        b.addr,
        format!("IAMAT flood-7 {LOCATION} {}\n", now_secs_string()).as_bytes(),
    );
    assert!(again.starts_with(b"AT Bailey "), "{}", show(&again));
    let after = rss_kb(b.pid());
    println!("a flood of 50,000 new ids: resident {before} kB -> {after} kB");
    assert!(
        after <= before + 16 * 1024,
        "the flood grew the server from {before} kB to {after} kB"
    );
}

/// Two servers that each took a new client while apart, both at `max_clients`, take each
/// other's when they meet again (a neighbour's records have a margin past the bound), so their
/// stores agree, instead of each refusing the other's for good and copying the difference
/// again at every comparison.
#[test]
fn servers_full_at_once_take_each_others_new_clients_and_agree() {
    let mut herd = linked_pair("full-at-once", "data_dir = \"data\"\n", "max_clients = 10");
    for i in 0..9 {
        iamat_at(herd.get("Bailey"), &format!("held-{i}"));
    }
    let both = |herd: &Herd| {
        let servers = [herd.get("Bailey"), herd.get("Bona")];
        await_converged(&servers, None, Instant::now(), SETTLE, "the two servers")
    };
    both(&herd);
    // Apart: each takes its tenth client, its last place.
    let _ = herd.get_mut("Bona").terminate();
    iamat_at(herd.get("Bailey"), "tenth-at-bailey");
    let _ = herd.get_mut("Bailey").terminate();
    herd.restart("Bona");
    iamat_at(herd.get("Bona"), "tenth-at-bona");
    let refused = exchange(
        herd.get("Bona").addr,
        format!("IAMAT eleventh {LOCATION} {}\n", now_secs_string()).as_bytes(),
    );
    assert!(
        refused.starts_with(b"? IAMAT "),
        "a client past max_clients: {}",
        show(&refused)
    );
    // Together again: eleven clients each, the same.
    herd.restart("Bailey");
    both(&herd);
    assert_eq!(records(&dump_store(herd.get("Bailey"))).len(), 11);
}

/// The largest record a client can make (an id of `max_client_id_bytes`, a location and a time
/// of 64 bytes each) costs a server at most 900 bytes of memory: the README's bound on a store,
/// about 0.8 GB at the default `max_clients`. A location or a time one byte longer is invalid.
#[test]
fn the_largest_records_cost_a_bounded_amount_of_memory() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const N: usize = 40_000;
    let herd = bailey("largest-records", "");
    let b = herd.get("Bailey");
    let now = now_secs();
    let location = format!("+1.{}+2", "0".repeat(59));
    let time = |n: usize| format!("{now}.{}", "1".repeat(n - 11));
    assert_eq!((location.len(), time(64).len()), (64, 64));
    for line in [
        format!("IAMAT one {location}0 {}\n", time(64)),
        format!("IAMAT one {location} {}\n", time(65)),
    ] {
        let reply = exchange(b.addr, line.as_bytes());
        assert_eq!(show(&reply), show(format!("? {line}").as_bytes()));
    }
    let before = rss_kb(b.pid());
    let replies = pipelined(
        b.addr,
        (0..N).map(|i| {
            let id = format!("{i:06}{}", "x".repeat(250));
            format!("IAMAT {id} {location} {}\n", time(64)).into_bytes()
        }),
    );
    let stored = replies
        .iter()
        .filter(|r| r.starts_with(b"AT Bailey "))
        .count();
    assert_eq!(stored, N);
    let after = rss_kb(b.pid());
    let per_client = (after.saturating_sub(before) * 1024) as f64 / N as f64;
    println!("{N} of the largest records: {per_client:.0} bytes each");
    assert!(
        per_client <= 900.0,
        "the largest records cost {per_client:.0} bytes each"
    );
}

/// A client time far in the future is invalid from a client and refused from a
/// neighbour, so it cannot pin a client's record for the whole herd.
#[test]
fn a_far_future_client_time_cannot_pin_a_record() {
    let herd = bailey_with_bona("far-future", &[], NO_PLACES);
    let b = herd.get("Bailey");
    let line = format!("IAMAT kiwi +0+0 {}\n", now_secs() + 86_400);
    assert_eq!(
        show(&exchange(b.addr, line.as_bytes())),
        show(format!("? {line}").as_bytes())
    );
    // From a neighbour: refused, and said in the log.
    let mut bona = Client::connect(b.addr);
    let far = format!("AT Bona +0.000000001 kiwi +0+0 {}", now_secs() + 86_400);
    bona.send(format!("PEER herd/1 Bona\n{far}\n").as_bytes());
    await_log_line(
        b,
        "refused a record whose client time lies too far ahead",
        0,
        SETTLE,
    );
    // A legitimate IAMAT is stored, everywhere it goes.
    let at = iamat_at(b, "kiwi");
    let reply = exchange(b.addr, b"WHATSAT kiwi 10 1\n");
    assert!(
        reply.starts_with(format!("{at}\n").as_bytes()),
        "{}",
        show(&reply)
    );
}

/// With a herd secret, the acceptor says nothing that depends on the secret until
/// the dialler has proved itself, and no proof is written to the log.
#[test]
fn the_acceptor_proves_itself_only_to_a_dialler_that_has_and_no_proof_is_logged() {
    let herd = bailey_with_bona("prove-first", WITH_SECRET, NO_PLACES);
    let b = herd.get("Bailey");
    let secret = Secret::new(SECRET.as_bytes());
    let nd = peer::nonce().expect("randomness");
    let mut c = Client::connect(b.addr);
    c.send(&[&peer::greeting("Bona", Some(&nd))[..], b"\n"].concat());
    let challenge = c.read_line();
    let na = peer::parse_challenge(&challenge[..challenge.len() - 1])
        .expect("a challenge")
        .to_vec();
    assert_eq!(
        challenge.len(),
        "CHALLENGE \n".len() + na.len(),
        "nothing but a nonce"
    );
    let ours = secret.proof(b"dial", b"Bona", b"Bailey", &nd, &na);
    c.send(&[&b"PROOF "[..], &ours, b"\n"].concat());
    let theirs = c.read_line();
    let proof = peer::parse_proof(&theirs[..theirs.len() - 1]).expect("its proof");
    assert!(secret.verify(proof, b"accept", b"Bona", b"Bailey", &nd, &na));
    await_log_line(b, "is peer Bona, authenticated", 0, SETTLE);
    let log = b.log();
    for proof in [&ours[..], proof] {
        let hex = String::from_utf8_lossy(proof);
        assert!(!log.contains(&*hex), "a proof is in the log:\n{log}");
    }
    assert!(!log.contains(SECRET));
}

/// A line whose tag fails is never logged as the neighbour's.
#[test]
fn a_forged_peer_line_never_appears_in_the_log_as_the_neighbours() {
    let herd = bailey_with_bona("forged-log", WITH_SECRET, NO_PLACES);
    let b = herd.get("Bailey");
    let secret = Secret::new(SECRET.as_bytes());
    let nd = peer::nonce().expect("randomness");
    let mut c = Client::connect(b.addr);
    c.send(&[&peer::greeting("Bona", Some(&nd))[..], b"\n"].concat());
    let challenge = c.read_line();
    let na = peer::parse_challenge(&challenge[..challenge.len() - 1])
        .expect("a challenge")
        .to_vec();
    let ours = secret.proof(b"dial", b"Bona", b"Bailey", &nd, &na);
    c.send(&[&b"PROOF "[..], &ours, b"\n"].concat());
    let _ = c.read_line();
    let mut session = Session::new(
        &Secret::new(b"another-secret-entirely-0000"),
        &nd,
        &na,
        true,
    );
    let mut forged = Vec::new();
    let record = format!("AT Bona +0.000000001 forged-log {LOCATION} {}", now_secs());
    peer::frame(Some(&mut session), record.as_bytes(), &mut forged);
    c.send(&forged);
    let _ = c.read_to_end();
    await_log_line(b, "a peer line with a wrong tag", 0, SETTLE);
    let log = b.log();
    assert!(
        !log.contains("forged-log"),
        "the forged line is in the log:\n{log}"
    );
}

/// Bytes a client sent are escaped in the store dump as in the log.
#[test]
fn control_bytes_in_client_ids_are_escaped_in_the_store_dump() {
    let herd = bailey("dump-escapes", "");
    let b = herd.get("Bailey");
    let time = now_secs_string();
    let reply = exchange(
        b.addr,
        format!("IAMAT esc\x1b[31m\u{0}id {LOCATION} {time}\n").as_bytes(),
    );
    assert!(reply.starts_with(b"AT Bailey "), "{}", show(&reply));
    let dump = dump_store(b);
    assert!(dump.contains("esc\\x1b[31m\\x00id"), "{dump}");
    assert!(!dump.contains('\x1b'));
}

/// The log and the store dump are their owner's alone.
#[test]
fn log_files_and_the_store_dump_are_the_owners_alone() {
    let herd = bailey("owner-only", "");
    let b = herd.get("Bailey");
    iamat_at(b, "kiwi");
    let _ = dump_store(b);
    for path in [b.log_path.clone(), b.store_path()] {
        let mode = std::fs::metadata(&path)
            .expect("a file")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }
}

/// A client is told what kind of failure Places was, the log keeps the detail.
#[test]
fn a_client_is_told_the_kind_of_a_places_failure_and_the_log_keeps_the_detail() {
    let herd = Herd::build("places-detail")
        .env(&[("GOOGLE_PLACES_API_KEY", "hardening-key")])
        .extra(NO_PLACES)
        .start_retrying(|| vec![member("Bailey", free_ports(1)[0], &[])]);
    let b = herd.get("Bailey");
    iamat_at(b, "kiwi");
    let reply = String::from_utf8_lossy(&exchange(b.addr, b"WHATSAT kiwi 10 1\n")).into_owned();
    assert!(reply.contains("\"status\" : \"UNKNOWN_ERROR\""), "{reply}");
    assert!(
        reply.contains("Google Places could not be reached"),
        "{reply}"
    );
    assert!(
        !reply.contains("127.0.0.1"),
        "the reply names an address: {reply}"
    );
    await_log_line(b, "cannot connect to 127.0.0.1:9", 0, SETTLE);
}

/// With `whatsat_per_minute`, a client address gets that many WHATSATs a minute,
/// and then Google's own answer for a quota spent.
#[test]
fn whatsat_per_minute_limits_one_client_address() {
    let herd = Herd::build("whatsat-allowance")
        .extra("[limits]\nwhatsat_per_minute = 2\n")
        .start_retrying(|| vec![member("Bailey", free_ports(1)[0], &[])]);
    let b = herd.get("Bailey");
    iamat_at(b, "kiwi");
    for _ in 0..2 {
        let reply = String::from_utf8_lossy(&exchange(b.addr, b"WHATSAT kiwi 10 1\n")).into_owned();
        assert!(reply.contains("REQUEST_DENIED"), "{reply}");
    }
    let third = String::from_utf8_lossy(&exchange(b.addr, b"WHATSAT kiwi 10 1\n")).into_owned();
    assert!(third.starts_with("AT Bailey "), "{third}");
    assert!(
        third.contains("\"status\" : \"OVER_QUERY_LIMIT\""),
        "{third}"
    );
    assert!(third.contains("at most 2 WHATSATs a minute"), "{third}");
}

/// Bailey and Bona, linked with a secret and no Places, with `top` at the head of their
/// configuration and `limit` in its `[limits]`.
fn linked_pair(tag: &str, top: &str, limit: &str) -> Herd {
    let herd = Herd::build(tag)
        .env(WITH_SECRET)
        .top(top)
        .extra(&format!("{NO_PLACES}\n[limits]\n{limit}\n"))
        .start_retrying(bailey_and_bona_on_free_ports);
    herd.wait_linked();
    herd
}

/// Bailey and Bona, linked with a secret, and Bailey's `max_connections` (10) held by clients
/// that each sent an IAMAT: only the places kept for Bona are left.
fn full_bailey_with_bona(tag: &str) -> (Herd, Vec<Client>) {
    let herd = linked_pair(tag, MEMORY_ONLY, "max_connections = 10");
    let addr = herd.get("Bailey").addr;
    let held = (0..10)
        .map(|i| {
            let mut c = Client::connect(addr);
            c.send(format!("IAMAT held-{i} {LOCATION} {}\n", now_secs_string()).as_bytes());
            let _ = c.read_line();
            c
        })
        .collect();
    (herd, held)
}

/// Kills and restarts Bona, and asserts that its link to Bailey is up within 3 s; returns
/// where Bailey's log stood before.
fn bona_restarted_gets_in(herd: &mut Herd) -> usize {
    let mark = herd.get("Bailey").log_bytes().len();
    herd.get_mut("Bona").kill();
    herd.restart("Bona");
    let restarted = Instant::now();
    await_log_line(
        herd.get("Bailey"),
        "is peer Bona, authenticated",
        mark,
        SETTLE,
    );
    let took = restarted.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the restarted Bona's link came up {took:?} after its restart"
    );
    mark
}

/// A neighbour always gets a place, however many clients hold the others: a restarted
/// neighbour's link comes up at once.
#[test]
fn a_restarted_neighbour_gets_in_while_clients_hold_every_place() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (mut herd, held) = full_bailey_with_bona("peer-places");
    let addr = herd.get("Bailey").addr;
    // Strangers who say nothing take what is left, and are refused once it is gone.
    let strangers: Vec<TcpStream> = (0..4)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    bona_restarted_gets_in(&mut herd);
    drop(strangers);
    drop(held);
}

/// Strangers that greet as the neighbour, and can never prove it, hold the places kept for it
/// only until someone needs them: a claim not yet proved is evicted like silence, oldest
/// first, and the real neighbour, which proves itself within a round trip, gets in.
#[test]
fn strangers_claiming_to_be_the_neighbour_cannot_keep_it_out() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (mut herd, held) = full_bailey_with_bona("peer-places-claims");
    let addr = herd.get("Bailey").addr;
    // Both places kept for Bona, taken by strangers greeting as Bona: each is challenged, and
    // waits with no proof to give.
    let claims: Vec<Client> = (0..2)
        .map(|_| {
            let mut c = Client::connect(addr);
            c.send(b"PEER herd/1 Bona 000102030405060708090a0b0c0d0e0f\n");
            let challenge = c.read_line();
            assert!(challenge.starts_with(b"CHALLENGE "), "{}", show(&challenge));
            c
        })
        .collect();
    let mark = bona_restarted_gets_in(&mut herd);
    let log = String::from_utf8_lossy(&herd.get("Bailey").log_bytes()[mark..]).into_owned();
    assert!(
        log.contains("held a place kept for neighbours"),
        "no claim was evicted:\n{log}"
    );
    drop((claims, held));
}

/// A neighbour that shares its address with clients (here, the whole herd on 127.0.0.1) gets in
/// when those clients have reached `max_connections_per_address`: past the cap, a connection from
/// a neighbour's address takes a place kept for neighbours instead of being refused, and a
/// client there is told the server is busy. A stranger who spoke from such a place and was told
/// so is closing, and gives the place up to the neighbour rather than linger in it.
#[test]
fn a_neighbour_gets_in_past_the_per_address_cap_its_clients_reached() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const CAP: usize = 6;
    let limit = format!("max_connections_per_address = {CAP}");
    let mut herd = linked_pair("per-address-neighbour", MEMORY_ONLY, &limit);
    let addr = herd.get("Bailey").addr;
    let client = |i: usize| {
        let mut c = Client::connect(addr);
        c.send(format!("IAMAT held-{i} {LOCATION} {}\n", now_secs_string()).as_bytes());
        let reply = c.read_line();
        (c, reply)
    };
    // Clients take the whole cap (a neighbour's link, once proved, is not counted in it).
    let held: Vec<Client> = (0..CAP).map(|i| client(i).0).collect();
    // Past the cap: a place kept for neighbours, and a client in it is told the server is busy
    // (and kept in it while it lingers: two such strangers take both places kept for Bona).
    let (busy_a, reply_a) = client(100);
    let (busy_b, reply_b) = client(101);
    assert_eq!(show(&reply_a), show(b"? server busy\n"));
    assert_eq!(show(&reply_b), show(b"? server busy\n"));
    // The restarted Bona dials from the capped address, with both places kept for it held by
    // strangers who were told the server is busy: it gets in all the same.
    let mark = herd.get("Bailey").log_bytes().len();
    herd.get_mut("Bona").kill();
    herd.restart("Bona");
    await_log_line(
        herd.get("Bailey"),
        "is peer Bona, authenticated",
        mark,
        SETTLE,
    );
    drop((busy_a, busy_b, held));
}

fn now_secs() -> u64 {
    (now_ns() / 1_000_000_000) as u64
}

/// The bound of the waits whose length the findings do not fix.
const SETTLE: Duration = Duration::from_secs(20);
