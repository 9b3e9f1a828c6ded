//! The ladder of `examples/`, each run as a learner would run it: built, started on a free port,
//! talked to over real sockets, its replies checked byte for byte, and stopped.
//!
//! The examples are built by this test, with `cargo build --examples` in the profile and the
//! target directory of the test binary itself (`<target>/<profile>/deps/examples-*`, so the
//! examples land in `<target>/<profile>/examples/`). A plain `cargo test` builds the examples
//! anyway, but `cargo test --test examples` does not, and a test that ran a stale example would
//! prove nothing; when they are up to date, the build is a no-op.
//!
//! Every wait is bounded, and every example is killed when its test ends, failing or not.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use common::fake_places::{Behaviour, FakePlaces};
use common::herds::{free_ports, herd_2023, http_get, write_config, Member};
use common::up::Up;
use common::{eventually, exchange, now_secs_string, show, TestDir, LOCATION};

/// The longest any one step may take before the test fails.
const WAIT: Duration = Duration::from_secs(20);

/// Builds the examples, once per test run, and returns the directory that holds them.
fn examples_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test binary has a path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary lives in <target>/<profile>/deps");
        let target_dir = profile_dir.parent().expect("a target directory");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(name) => name,
            None => panic!("no profile directory in {}", exe.display()),
        };
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args([
                "build",
                "--examples",
                "--profile",
                profile,
                "--manifest-path",
            ])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", target_dir);
        // Cargo runs this test with the package's variables set (CARGO_MANIFEST_DIR, ...). A
        // build that saw them would differ from an ordinary one (a build script of a dependency
        // watches CARGO_MANIFEST_DIR), and the two would rebuild each other's crates in turn.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            let package = [
                "CARGO_PKG_",
                "CARGO_BIN_EXE_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
            ];
            if package.iter().any(|prefix| name.starts_with(prefix)) {
                cargo.env_remove(&*name);
            }
        }
        let output = cargo.output().expect("cannot run cargo");
        assert!(
            output.status.success(),
            "building the examples failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        profile_dir.join("examples")
    })
}

/// A running example. Dropping it kills the process and waits for it, so none outlives its
/// test; if the test is failing, what the example wrote on stderr is shown.
struct Example {
    name: &'static str,
    child: Child,
    /// The lines of its stdout, each with its `\n`, as they come.
    stdout: Receiver<Vec<u8>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Example {
    fn start(name: &'static str, args: &[&str]) -> Example {
        let path = examples_dir().join(name);
        let mut child = Command::new(&path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
        let (lines, stdout) = mpsc::channel();
        let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
        thread::spawn(move || loop {
            let mut line = Vec::new();
            match out.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if lines.send(line).is_err() => return,
                Ok(_) => {}
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (mut err, sink) = (child.stderr.take().expect("piped stderr"), stderr.clone());
        thread::spawn(move || {
            let mut chunk = [0; 4096];
            while let Ok(n @ 1..) = err.read(&mut chunk) {
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Example {
            name,
            child,
            stdout,
            stderr,
        }
    }

    /// The next line it prints, `\n` included; `None` once it has exited.
    fn line(&self) -> Option<String> {
        match self.stdout.recv_timeout(WAIT) {
            Ok(line) => Some(String::from_utf8(line).expect("stdout is UTF-8")),
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => panic!("{} printed nothing for {WAIT:?}", self.name),
        }
    }

    /// The address in its next line, which must be `[NAME ]listening on ADDR`.
    fn address(&self) -> SocketAddr {
        let line = self.line().expect("a listening line");
        let (_, addr) = line
            .trim_end()
            .split_once("listening on ")
            .unwrap_or_else(|| panic!("{} printed {line:?}, not where it listens", self.name));
        addr.parse().expect("an address")
    }

    /// Waits for it to exit by itself, and says how it did.
    fn exit_status(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("cannot wait") {
                return status;
            }
            assert!(start.elapsed() < WAIT, "{} did not exit", self.name);
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- {} wrote on stderr:\n{}", self.name, self.stderr());
        }
    }
}

/// A client connection whose every read gives up after [`WAIT`].
fn connect(addr: SocketAddr) -> TcpStream {
    let stream =
        TcpStream::connect(addr).unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
}

fn send(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).expect("write failed");
}

/// Reads exactly `n` bytes.
fn receive(stream: &mut TcpStream, n: usize) -> String {
    let mut bytes = vec![0; n];
    stream.read_exact(&mut bytes).expect("no reply in time");
    String::from_utf8(bytes).expect("a UTF-8 reply")
}

/// Reads one line, `\n` included, a byte at a time (nothing past it is consumed).
fn receive_line(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0];
    while line.last() != Some(&b'\n') {
        match stream.read(&mut byte) {
            Ok(0) => panic!(
                "the connection closed after {:?}",
                String::from_utf8_lossy(&line)
            ),
            Ok(_) => line.push(byte[0]),
            Err(e) => panic!("no whole line in time: {e}, after {line:?}"),
        }
    }
    String::from_utf8(line).expect("a UTF-8 line")
}

/// Reads until the server closes the connection.
fn receive_to_end(stream: &mut TcpStream) -> String {
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .expect("the server did not close in time");
    String::from_utf8(bytes).expect("a UTF-8 reply")
}

/// Whether a reply is already waiting on `stream`, without waiting for one.
fn has_reply(stream: &mut TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let outcome = stream.peek(&mut [0]);
    stream.set_nonblocking(false).unwrap();
    match outcome {
        Ok(_) => true,
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(e) => panic!("peek failed: {e}"),
    }
}

// 01_blocking ---------------------------------------------------------------------------------

#[test]
fn blocking_answers_each_line_upper_cased() {
    let server = Example::start("01_blocking", &["--port", "0"]);
    let mut client = connect(server.address());
    send(&mut client, b"hello\nkiwi.cs.ucla.edu\n");
    assert_eq!(receive(&mut client, 23), "HELLO\nKIWI.CS.UCLA.EDU\n");
}

#[test]
fn blocking_serves_one_client_at_a_time() {
    let server = Example::start("01_blocking", &["--port", "0"]);
    let addr = server.address();
    let mut first = connect(addr);
    send(&mut first, b"first\n");
    assert_eq!(receive_line(&mut first), "FIRST\n");
    // The kernel completes the second client's handshake, and takes its line...
    let mut second = connect(addr);
    send(&mut second, b"second\n");
    // ...but the server's one thread is blocked reading the first client: it answers the first
    // client again, and has not even accepted the second.
    send(&mut first, b"still first\n");
    assert_eq!(receive_line(&mut first), "STILL FIRST\n");
    assert!(!has_reply(&mut second), "the second client was answered");
    // Only when the first client leaves is the second one served.
    drop(first);
    assert_eq!(receive_line(&mut second), "SECOND\n");
}

#[test]
fn blocking_with_threads_serves_clients_side_by_side() {
    let server = Example::start("01_blocking", &["--port", "0", "--threads"]);
    let addr = server.address();
    let mut first = connect(addr);
    send(&mut first, b"first\n");
    assert_eq!(receive_line(&mut first), "FIRST\n");
    let mut second = connect(addr);
    send(&mut second, b"second\n");
    assert_eq!(receive_line(&mut second), "SECOND\n");
    send(&mut first, b"first again\n");
    assert_eq!(receive_line(&mut first), "FIRST AGAIN\n");
}

// 02_poll --------------------------------------------------------------------------------------

#[test]
fn poll_serves_clients_side_by_side() {
    let server = Example::start("02_poll", &["--port", "0"]);
    let addr = server.address();
    let mut first = connect(addr);
    let mut second = connect(addr);
    send(&mut first, b"first\n");
    send(&mut second, b"second\n");
    assert_eq!(receive_line(&mut second), "SECOND\n");
    assert_eq!(receive_line(&mut first), "FIRST\n");
    // A client that sends half a line holds up no one.
    send(&mut first, b"half a ");
    send(&mut second, b"whole\n");
    assert_eq!(receive_line(&mut second), "WHOLE\n");
    send(&mut first, b"line\n");
    assert_eq!(receive_line(&mut first), "HALF A LINE\n");
}

#[test]
fn poll_answers_lines_cut_anywhere_and_closes_after_the_last_reply() {
    let server = Example::start("02_poll", &["--port", "0"]);
    let mut client = connect(server.address());
    for piece in [
        &b"iamat ki"[..],
        b"wi\nwhat",
        b"sat kiwi 10 5\n",
        b"no newline at the end",
    ] {
        send(&mut client, piece);
        thread::sleep(Duration::from_millis(20));
    }
    client.shutdown(Shutdown::Write).unwrap();
    let replies = receive_to_end(&mut client);
    assert_eq!(
        replies,
        "IAMAT KIWI\nWHATSAT KIWI 10 5\nNO NEWLINE AT THE END\n"
    );
}

#[test]
fn poll_keeps_what_the_socket_would_not_take_and_writes_it_later() {
    let server = Example::start("02_poll", &["--port", "0"]);
    let mut client = connect(server.address());
    // Far more than the kernel's buffers hold, sent before a byte is read: the server's writes
    // hit `WouldBlock`, it keeps the rest, and stops reading until WRITABLE lets it write.
    let line = b"abcdefghijklmnopqrstuvwxyz 0123456789\n";
    let count = 100_000;
    let mut writer = client.try_clone().unwrap();
    let sender = thread::spawn(move || {
        for _ in 0..count {
            writer.write_all(line).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    thread::sleep(Duration::from_millis(200));
    let replies = receive_to_end(&mut client);
    sender.join().unwrap();
    assert_eq!(replies.len(), line.len() * count);
    assert!(replies
        .lines()
        .all(|l| l == "ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789"));
}

#[test]
fn poll_closes_a_client_whose_line_never_ends() {
    let server = Example::start("02_poll", &["--port", "0"]);
    let mut client = connect(server.address());
    send(&mut client, &[b'x'; 5000]);
    let mut rest = Vec::new();
    match client.read_to_end(&mut rest) {
        Ok(_) => assert_eq!(rest, b""),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
    }
}

// 03_deadlines ---------------------------------------------------------------------------------

#[test]
fn deadlines_close_a_quiet_client_after_its_idle_time() {
    let server = Example::start("03_deadlines", &["--port", "0", "--idle-ms", "300"]);
    let mut client = connect(server.address());
    let sent = Instant::now();
    send(&mut client, b"hi\n");
    assert_eq!(receive_line(&mut client), "HI\n");
    assert_eq!(receive_to_end(&mut client), "BYE idle for 300 ms\n");
    assert!(sent.elapsed() >= Duration::from_millis(300));
}

#[test]
fn deadlines_are_pushed_back_by_each_line() {
    let server = Example::start("03_deadlines", &["--port", "0", "--idle-ms", "1000"]);
    let mut client = connect(server.address());
    let start = Instant::now();
    let mut last = start;
    // Twice the idle time in all, never more than a tenth of it quiet.
    while start.elapsed() < Duration::from_millis(2000) {
        last = Instant::now();
        send(&mut client, b"still here\n");
        assert_eq!(receive_line(&mut client), "STILL HERE\n");
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(receive_to_end(&mut client), "BYE idle for 1000 ms\n");
    assert!(last.elapsed() >= Duration::from_millis(1000));
}

#[test]
fn deadlines_leave_each_client_its_own() {
    let server = Example::start("03_deadlines", &["--port", "0", "--idle-ms", "400"]);
    let addr = server.address();
    let connected = Instant::now();
    let mut quiet = connect(addr);
    let mut talking = connect(addr);
    thread::sleep(Duration::from_millis(200));
    let talked = Instant::now();
    send(&mut talking, b"a\n");
    assert_eq!(receive_line(&mut talking), "A\n");
    assert_eq!(receive_to_end(&mut quiet), "BYE idle for 400 ms\n");
    assert!(connected.elapsed() >= Duration::from_millis(400));
    assert_eq!(receive_to_end(&mut talking), "BYE idle for 400 ms\n");
    assert!(talked.elapsed() >= Duration::from_millis(400));
}

// 04_tls_pump ----------------------------------------------------------------------------------

/// Runs the example to its end and returns what it printed, its listening line apart.
fn fetch_over_tls(args: &[&str]) -> String {
    let mut example = Example::start("04_tls_pump", args);
    let addr = example.address();
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    let mut printed = String::new();
    while let Some(line) = example.line() {
        printed.push_str(&line);
    }
    let status = example.exit_status();
    assert!(status.success(), "{status}:\n{}", example.stderr());
    printed
}

#[test]
fn tls_pump_fetches_a_page_from_its_own_https_server() {
    let body = "hello over TLS, you asked: GET / HTTP/1.1\n";
    let expected = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(fetch_over_tls(&["--port", "0"]), expected);
}

#[test]
fn tls_pump_asks_for_the_path_it_is_given() {
    let printed = fetch_over_tls(&["--port", "0", "--path", "/maps/api/place/nearbysearch/json"]);
    let (head, body) = printed.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head:?}");
    assert_eq!(
        body,
        "hello over TLS, you asked: GET /maps/api/place/nearbysearch/json HTTP/1.1\n"
    );
}

// 05_tiny_herd ---------------------------------------------------------------------------------

/// Starts a herd of `servers` and returns it with each server's address, in name order.
fn herd(servers: usize) -> (Example, Vec<SocketAddr>) {
    let example = Example::start(
        "05_tiny_herd",
        &["--port", "0", "--servers", &servers.to_string()],
    );
    let addrs = (0..servers)
        .map(|i| {
            let name = char::from(b'A' + i as u8);
            let line = example.line().expect("a listening line");
            assert!(
                line.starts_with(&format!("{name} listening on ")),
                "{line:?}"
            );
            line.trim_end().rsplit(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    (example, addrs)
}

/// One request on a fresh connection, as `echo LINE | nc` would send it.
fn ask(addr: SocketAddr, line: &str) -> String {
    let mut client = connect(addr);
    send(&mut client, format!("{line}\n").as_bytes());
    receive_line(&mut client)
}

/// Asks `GET key` at `addr` until the answer is no longer `? GET key` (the flood is on its
/// way), for up to [`WAIT`].
fn eventually_get(addr: SocketAddr, key: &str, want: &str) {
    let start = Instant::now();
    loop {
        let got = ask(addr, &format!("GET {key}"));
        if got == format!("{want}\n") {
            return;
        }
        assert!(start.elapsed() < WAIT, "{addr} still answers {got:?}");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn tiny_herd_a_set_at_one_server_is_answered_at_the_other() {
    let (_herd, addrs) = herd(2);
    assert_eq!(ask(addrs[0], "GET kiwi"), "? GET kiwi\n");
    assert_eq!(ask(addrs[0], "SET kiwi +34.068930-118.445127"), "OK\n");
    assert_eq!(ask(addrs[0], "GET kiwi"), "+34.068930-118.445127\n");
    eventually_get(addrs[1], "kiwi", "+34.068930-118.445127");
    // And back: the newer value wins at both.
    assert_eq!(ask(addrs[1], "SET kiwi +34.070000-118.440000"), "OK\n");
    eventually_get(addrs[0], "kiwi", "+34.070000-118.440000");
    assert_eq!(ask(addrs[0], "DEL kiwi"), "? DEL kiwi\n");
}

#[test]
fn tiny_herd_floods_around_a_ring_once() {
    let (herd, addrs) = herd(5);
    assert_eq!(ask(addrs[0], "SET kiwi first value"), "OK\n");
    for &addr in &addrs {
        eventually_get(addr, "kiwi", "first value");
    }
    assert_eq!(ask(addrs[2], "SET kiwi second value"), "OK\n");
    for &addr in &addrs {
        eventually_get(addr, "kiwi", "second value");
    }
    // Each server kept each record once, however many of its neighbours sent it: a record
    // already held is not sent on, so the flood ends instead of circling the ring.
    thread::sleep(Duration::from_millis(100));
    let stderr = herd.stderr();
    for name in ["A", "B", "C", "D", "E"] {
        for value in ["first value", "second value"] {
            let kept = stderr
                .lines()
                .filter(|l| l.starts_with(&format!("{name}: kept: kiwi ")) && l.ends_with(value))
                .count();
            assert_eq!(kept, 1, "{name} kept {value:?} {kept} times:\n{stderr}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Then watch the real thing: `herd up --trace-svg`

/// Where the guide's picture lives: one IAMAT and one WHATSAT across the 2023 herd, drawn by
/// `herd up --trace-svg` from a real run (the test below makes it again when
/// `HERD_SAVE_TRACE_SVG` names a file: `HERD_SAVE_TRACE_SVG=$PWD/docs/one-iamat-one-whatsat.svg
/// cargo test --release --test examples herd_up_draws`).
const GUIDE_PICTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/docs/one-iamat-one-whatsat.svg"
);

/// What a drawing shows: its lanes, left to right, and the label of each arrow.
struct Drawing {
    lanes: Vec<String>,
    arrows: Vec<String>,
}

/// Reads a drawing, or says why it is not well-formed SVG.
fn read_drawing(svg: &str) -> Result<Drawing, String> {
    let doc = roxmltree::Document::parse(svg).map_err(|e| format!("not well-formed: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "svg"
        || root.tag_name().namespace() != Some("http://www.w3.org/2000/svg")
    {
        return Err(format!("the root element is {:?}", root.tag_name()));
    }
    let texts_of = |class: &str| -> Vec<String> {
        root.descendants()
            .filter(|n| n.has_tag_name("g") && n.attribute("class") == Some(class))
            .map(|g| {
                g.descendants()
                    .find(|n| n.has_tag_name("text"))
                    .and_then(|t| t.text())
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    Ok(Drawing {
        lanes: texts_of("lane"),
        arrows: texts_of("arrow"),
    })
}

/// The lanes of one IAMAT at Bailey and one WHATSAT at Jaquez across the 2023 herd: a lane per
/// server, one per client connection, and Places. Client lanes are named `c<id>@<server>`, with
/// ids that vary from run to run, so they are given as `c@<server>`.
fn assert_2023_picture(drawing: &Drawing) {
    let mut lanes: Vec<String> = (drawing.lanes.iter())
        .map(|lane| match lane.split_once('@') {
            Some((conn, server)) if conn.starts_with('c') => format!("c@{server}"),
            _ => lane.clone(),
        })
        .collect();
    lanes.sort();
    assert_eq!(
        lanes,
        ["Bailey", "Bona", "Campbell", "Clark", "Jaquez", "Places", "c@Bailey", "c@Jaquez"],
        "lanes drawn: {:?}",
        drawing.lanes
    );
    // An arrow per line: the IAMAT and its reply; the record, sent once on every link but the
    // one it came in on (2 from Bailey, then 2 + 2 + 1 + 1 from the others: 8, whichever way
    // the flood runs); the WHATSAT, the request to Places, its answer, and the reply.
    let count = |prefix: &str| {
        drawing
            .arrows
            .iter()
            .filter(|a| a.starts_with(prefix))
            .count()
    };
    assert_eq!(
        drawing.arrows.len(),
        14,
        "arrows drawn: {:#?}",
        drawing.arrows
    );
    assert_eq!(count("IAMAT kiwi "), 1, "{:#?}", drawing.arrows);
    assert_eq!(count("WHATSAT kiwi 10 1"), 1, "{:#?}", drawing.arrows);
    assert_eq!(
        count("GET /maps/api/place/nearbysearch/json?"),
        1,
        "{:#?}",
        drawing.arrows
    );
    let answers = drawing
        .arrows
        .iter()
        .filter(|a| a.ends_with(" bytes"))
        .count();
    assert_eq!(answers, 1, "Places' answer: {:#?}", drawing.arrows);
    // The IAMAT's reply, the eight records and the WHATSAT's reply: the same AT line, ten times.
    assert_eq!(count("AT Bailey "), 10, "{:#?}", drawing.arrows);
}

#[test]
fn herd_up_draws_one_iamat_and_one_whatsat_across_the_2023_herd() {
    let places = FakePlaces::start(Behaviour::ok(
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/places/legacy_ok_20.json"
        ))
        .expect("the Places fixture"),
    ));
    let dir = TestDir::new("trace-svg");
    let svg_path = dir.join("herd.svg");
    let svg_arg = svg_path.to_str().expect("a UTF-8 path");
    // A port taken by another test between `free_ports` and the bind is not the herd's fault:
    // try again on new ports, twice at most.
    let mut attempt = 1;
    let (mut up, members) = loop {
        let members = herd_2023(&free_ports(5));
        let config = write_config(&dir, &members, &places.places_toml("legacy", 5000));
        let key = [("GOOGLE_PLACES_API_KEY", "test-key")];
        match Up::start(
            &dir.path,
            &config,
            &["--trace-svg", svg_arg],
            &key,
            &members,
        ) {
            Ok(up) => break (up, members),
            Err(_) if attempt < 3 => attempt += 1,
            Err(e) => panic!("{e}"),
        }
    };
    let addr = |name: &str| {
        let port = members
            .iter()
            .find(|m| m.name == name)
            .expect("a member")
            .port;
        SocketAddr::from(([127, 0, 0, 1], port))
    };
    // The admin endpoint `herd up` gave each server says how it is.
    let status = |name: &str| -> serde_json::Value {
        let file = dir.join(&format!("logs/{name}.admin"));
        let Some(admin) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|text| text.trim().parse::<SocketAddr>().ok())
        else {
            return serde_json::Value::Null;
        };
        let (_, body) = http_get(admin, "/status");
        serde_json::from_str(&body).unwrap_or_default()
    };
    let every = |what: &dyn Fn(&Member, &serde_json::Value) -> bool| {
        eventually(WAIT, || members.iter().all(|m| what(m, &status(m.name))))
    };
    assert!(
        every(&|m, s| s["links_up"] == m.neighbors.len()),
        "the herd's links did not all come up"
    );

    let time = now_secs_string();
    let reply = exchange(
        addr("Bailey"),
        format!("IAMAT kiwi {LOCATION} {time}\n").as_bytes(),
    );
    assert!(reply.starts_with(b"AT Bailey "), "{}", show(&reply));
    assert!(
        every(&|_, s| s["records"] == 1),
        "the record did not reach every server"
    );
    let reply = exchange(addr("Jaquez"), b"WHATSAT kiwi 10 1\n");
    assert!(
        reply.starts_with(b"AT Bailey ") && reply.ends_with(b"\n\n"),
        "{}",
        show(&reply)
    );
    assert_eq!(up.stop(), Some(0), "herd up's exit code after SIGTERM");

    let svg = std::fs::read_to_string(&svg_path).expect("herd up drew the trace");
    let drawing = read_drawing(&svg).unwrap_or_else(|e| panic!("{e}:\n{svg}"));
    assert_2023_picture(&drawing);
    if let Some(path) = std::env::var_os("HERD_SAVE_TRACE_SVG") {
        std::fs::write(&path, &svg).expect("save the drawing");
    }
}

/// The picture in the guide is such a drawing, whole.
#[test]
fn the_guides_picture_is_a_drawing_of_one_iamat_and_one_whatsat() {
    let svg = std::fs::read_to_string(GUIDE_PICTURE).expect("the guide's picture");
    let drawing = read_drawing(&svg).unwrap_or_else(|e| panic!("{GUIDE_PICTURE}: {e}"));
    assert_2023_picture(&drawing);
}
