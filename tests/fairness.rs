//! Fair turns and back-pressure that holds, over real sockets: a client that never
//! reads runs no more commands than its unread replies allow; a greedy client does not keep
//! another's reply waiting beyond the next turn; a client closed for breaking a limit reads its
//! `?` line before the close, however much it was still sending.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::fake_places::{Behaviour, FakePlaces};
use common::herds::{admin_addr, free_ports, http_get, member, Herd};
use common::traced::{find, turn_of, Traced};
use common::*;

/// The server's high-water mark of unread replies (herd::herd::OUTPUT_HIGH_WATER, with the
/// default `client_output_bytes`), and its share of lines per turn (`turn_lines`).
const MARK: usize = 256 * 1024;
const TURN_LINES: usize = 512;

/// A connection whose kernel receive buffer is as small as the kernel allows, so that what the
/// server's replies fill is the server's, not the test's.
fn small_receiver(addr: SocketAddr) -> (TcpStream, usize) {
    let stream = connect_with_small_receive_buffer(addr);
    let size = receive_buffer(&stream);
    (stream, size)
}

/// The IAMATs the server has run, from its admin endpoint.
fn commands_run(admin: SocketAddr) -> u64 {
    let (_, metrics) = http_get(admin, "/metrics");
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("herd_commands_total{server=\"Bailey\",verb=\"IAMAT\",result=\"ok\"} ")
        })
        .and_then(|n| n.parse().ok())
        .expect("an IAMAT count")
}

/// A thread that pipelines `total` IAMATs (`greedy-000000` and on, at client time `time`) on
/// `stream`, reading nothing, until all are sent or the connection fails.
fn pipeline_greedy(stream: &TcpStream, total: usize, time: &str) -> thread::JoinHandle<()> {
    let mut stream = stream.try_clone().expect("clone");
    let time = time.to_owned();
    thread::spawn(move || {
        let mut out = std::io::BufWriter::with_capacity(1 << 16, &mut stream);
        for i in 0..total {
            let line = format!("IAMAT greedy-{i:06} {LOCATION} {time}\n");
            if out.write_all(line.as_bytes()).is_err() {
                return;
            }
        }
        let _ = out.flush();
    })
}

/// Reads the replies to [`pipeline_greedy`]'s IAMATs: every one, in order.
fn read_greedy_replies(reader: &mut BufReader<&TcpStream>, total: usize, time: &str) {
    let mut got = 0;
    let mut reply = Vec::new();
    while got < total {
        reply.clear();
        match reader.read_until(b'\n', &mut reply) {
            Ok(0) => break,
            Ok(_) => {
                assert!(
                    reply.starts_with(b"AT Bailey ")
                        && reply
                            .ends_with(format!("greedy-{got:06} {LOCATION} {time}\n").as_bytes()),
                    "reply {got}: {}",
                    show(&reply)
                );
                got += 1;
            }
            Err(e) => panic!("after {got} replies: {e}"),
        }
    }
    assert_eq!(got, total);
}

/// A client that pipelines 100,000 IAMATs and never reads has no more commands run
/// than its unread replies allow: the server's mark, what its own kernel holds for the client
/// under that mark, the client's receive buffer, and one turn's share. When it reads, the rest
/// are run and answered, every one.
#[test]
fn a_client_that_never_reads_has_only_the_marks_worth_of_commands_run() {
    let herd = Herd::build("back-pressure")
        .start_retrying(|| vec![member("Bailey", free_ports(1)[0], &[]).with_admin()]);
    let b = herd.get("Bailey");
    let admin = admin_addr(b);
    let (stream, rcvbuf) = small_receiver(b.addr);
    let time = now_secs_string();
    let reply_len = format!("AT Bailey +0.000000000 greedy-000000 {LOCATION} {time}\n").len();
    let total = 100_000;
    let writer = pipeline_greedy(&stream, total, &time);
    // Long enough for the server to have run all it would: it stops at once, at the mark.
    thread::sleep(Duration::from_secs(2));
    let run = commands_run(admin) as usize;
    // The mark counts what the server holds and what its kernel holds (its send buffer is kept
    // under half the mark); the client's receive buffer is outside the server's sight.
    let bound = (MARK + rcvbuf) / reply_len + TURN_LINES;
    println!(
        "a client that never read: {run} of {total} IAMATs run after 2 s (bound {bound}: \
         {MARK} B mark + {rcvbuf} B receive buffer, {reply_len} B replies, {TURN_LINES} lines a turn)"
    );
    assert!(
        run <= bound,
        "{run} commands were run for a client that never read"
    );
    assert!(
        run >= MARK / reply_len / 2,
        "only {run} commands ran before the mark"
    );
    // It reads: the rest are run, and every reply comes, in order.
    let mut reader = BufReader::new(&stream);
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("a read timeout");
    read_greedy_replies(&mut reader, total, &time);
    writer.join().expect("the writer");
}

/// The same client, but its first command a WHATSAT that Places takes 3 s to answer: every
/// reply after it is held in line behind the answer, and those held replies count against the
/// mark as much as unread ones, so the same bound holds while Places keeps it waiting.
#[test]
fn a_client_behind_a_slow_whatsat_has_only_the_marks_worth_of_commands_run() {
    let body = br#"{"html_attributions" : [], "results" : [], "status" : "ZERO_RESULTS"}"#;
    let fake = FakePlaces::start(Behaviour::ok(&body[..]).delayed(Duration::from_secs(3)));
    let herd = Herd::build("back-pressure-places")
        .env(&[("GOOGLE_PLACES_API_KEY", "fairness-test-key")])
        .extra(&fake.places_toml("legacy", 10_000))
        .start_retrying(|| vec![member("Bailey", free_ports(1)[0], &[]).with_admin()]);
    let b = herd.get("Bailey");
    let admin = admin_addr(b);
    let time = now_secs_string();
    let mut stream = TcpStream::connect(b.addr).expect("connect");
    let first = format!("IAMAT slow {LOCATION} {time}\nWHATSAT slow 10 1\n");
    stream.write_all(first.as_bytes()).expect("send");
    let reply_len = format!("AT Bailey +0.000000000 greedy-000000 {LOCATION} {time}\n").len();
    let total = 100_000;
    let writer = pipeline_greedy(&stream, total, &time);
    // Well inside Places' 3 s: nothing can have left for the client yet but the first AT.
    thread::sleep(Duration::from_millis(1500));
    let run = commands_run(admin) as usize - 1;
    let bound = MARK / reply_len + TURN_LINES;
    println!("behind a slow WHATSAT: {run} of {total} IAMATs run after 1.5 s (bound {bound})");
    assert!(
        run <= bound,
        "{run} commands were run behind a WHATSAT waiting on Places"
    );
    // Places answers; the client reads: every reply comes, in order.
    let mut reader = BufReader::new(&stream);
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("a read timeout");
    let mut reply = Vec::new();
    reader
        .read_until(b'\n', &mut reply)
        .expect("the IAMAT's reply");
    assert!(reply.starts_with(b"AT Bailey "), "{}", show(&reply));
    let mut whatsat = Vec::new();
    while !whatsat.ends_with(b"}\n\n") {
        let before = whatsat.len();
        reader
            .read_until(b'\n', &mut whatsat)
            .expect("the WHATSAT's reply");
        assert!(whatsat.len() > before, "the WHATSAT's reply ended early");
    }
    read_greedy_replies(&mut reader, total, &time);
    writer.join().expect("the writer");
}

/// A client closed for breaking a limit (an overlong line) gets its `?` line whole,
/// though it goes on sending: the server shuts its side and drains the rest (a lingering
/// close) rather than resetting the connection under the reply.
#[test]
fn a_client_closed_for_an_overlong_line_reads_its_answer_before_the_close() {
    let herd = Herd::build("linger")
        .extra("[limits]\nmax_line_bytes = 100\n")
        .start_retrying(|| vec![member("Bailey", free_ports(1)[0], &[])]);
    let addr = herd.get("Bailey").addr;
    for round in 0..5 {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let mut stream = stream.try_clone().expect("clone");
            let stop = stop.clone();
            thread::spawn(move || {
                let junk = vec![b'x'; 16 * 1024];
                let _ = stream.write_all(&junk[..200]); // the overlong line's start
                let deadline = Instant::now() + Duration::from_secs(1);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if stream.write_all(&junk).is_err() {
                        return;
                    }
                }
            })
        };
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        let mut reader = &stream;
        let outcome = loop {
            match reader.read(&mut buf) {
                Ok(0) => break "end of stream",
                Ok(n) => reply.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break "reset",
                Err(e) => panic!("round {round}: {e}"),
            }
        };
        stop.store(true, Ordering::Relaxed);
        let _ = writer.join();
        let want = format!("? {}... (line longer than 100 bytes)\n", "x".repeat(64));
        assert_eq!(
            show(&reply),
            show(want.as_bytes()),
            "round {round}: the answer before the {outcome}"
        );
    }
}

/// While one connection pipelines as fast as it can, another client's IAMAT is read
/// and its reply written in the same turn of the loop, or the next: counted in the server's own
/// trace.
#[test]
fn a_greedy_client_delays_another_clients_reply_by_a_turn_at_most() {
    let dir = TestDir::new("greedy-trace");
    let port = free_ports(1)[0];
    let config = common::herds::write_config(&dir, &[member("Bailey", port, &[])], "");
    let server = Traced::start(&config, "Bailey", &[]);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    assert!(eventually(Duration::from_secs(10), || TcpStream::connect(
        addr
    )
    .is_ok()));
    // The greedy connection: pipelines 200,000 IAMATs and reads its replies as they come.
    let greedy = TcpStream::connect(addr).expect("connect");
    let sender = {
        let mut greedy = greedy.try_clone().expect("clone");
        thread::spawn(move || {
            let time = now_secs_string();
            let mut out = std::io::BufWriter::with_capacity(1 << 16, &mut greedy);
            for i in 0..200_000 {
                if writeln!(out, "IAMAT g{i} {LOCATION} {time}").is_err() {
                    return;
                }
            }
            let _ = out.flush();
        })
    };
    let drain = {
        let mut greedy = greedy.try_clone().expect("clone");
        thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while matches!(greedy.read(&mut buf), Ok(n) if n > 0) {}
        })
    };
    thread::sleep(Duration::from_millis(300));
    let client = "polite.cs.ucla.edu";
    let at = iamat_at_addr(addr, client);
    assert!(at.starts_with("AT Bailey "), "{at}");
    thread::sleep(Duration::from_millis(300));
    let _ = greedy.shutdown(std::net::Shutdown::Both);
    let _ = sender.join();
    let _ = drain.join();
    let lines = server.lines();
    drop(server);
    // The polite client's connection: the one whose command names it.
    let asked = find(&lines, 0, &format!("< IAMAT {client} "))
        .expect("the polite client's command in the trace");
    let conn = lines[asked]
        .split_whitespace()
        .nth(2)
        .expect("the connection's name")
        .to_owned();
    let answered = find(&lines, asked, &format!(" {conn} > AT Bailey "))
        .expect("the polite client's reply in the trace");
    let (read_turn, reply_turn) = (turn_of(&lines, asked), turn_of(&lines, answered));
    println!("the polite client's command ran in turn {read_turn}, its reply went out in turn {reply_turn}");
    assert!(
        reply_turn <= read_turn + 1,
        "the reply went out {} turns after the command",
        reply_turn - read_turn
    );
}

/// `IAMAT CLIENT LOCATION NOW` at `addr` on its own connection; the reply without its `\n`.
fn iamat_at_addr(addr: SocketAddr, client: &str) -> String {
    let reply = exchange(
        addr,
        format!("IAMAT {client} {LOCATION} {}\n", now_secs_string()).as_bytes(),
    );
    String::from_utf8_lossy(&reply).trim_end().to_owned()
}
