//! What an operator leaving a herd running relies on: logs that stay small and can
//! be rotated, SIGHUP that opens them again, a log that fails and comes back, the admin
//! endpoint (`/metrics` read by a real Prometheus, `/healthz`, `/status`), and `herd status`.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::herds::{
    admin_addr, await_log_line, free_ports, herd_2023, http_get, member, Herd, LINK_WAIT,
};
use common::*;

/// Bailey alone, with `extra` in its configuration.
fn lone(tag: &str, extra: &str) -> Herd {
    Herd::build(tag)
        .extra(extra)
        .start_retrying(|| vec![member("Bailey", free_ports(1)[0], &[]).with_admin()])
}

/// An idle herd writes under 1 KiB a minute per server: heartbeats and digests that
/// match are not logged line by line.
#[test]
fn an_idle_herd_writes_almost_nothing_to_its_logs() {
    let herd = Herd::build("idle-logs")
        .env(&[("HERD_SECRET", "idle-logs-herd-secret-0a1b2c3d4e5f")])
        .start_retrying(|| herd_2023(&free_ports(5)));
    herd.wait_linked();
    // Past the copy of the (empty) stores at link-up: a first digest round.
    thread::sleep(Duration::from_secs(4));
    let before: Vec<usize> = herd.servers.iter().map(|s| s.log_bytes().len()).collect();
    let window = Duration::from_secs(7); // two rounds of digests, seven of heartbeats
    thread::sleep(window);
    for (s, before) in herd.servers.iter().zip(before) {
        let grew = s.log_bytes().len() - before;
        let per_minute = grew as f64 * 60.0 / window.as_secs_f64();
        println!("{} idle: {grew} bytes in {window:?}", s.name);
        assert!(
            per_minute < 1024.0,
            "{} wrote {grew} bytes in {window:?} while idle:\n{}",
            s.name,
            String::from_utf8_lossy(&s.log_bytes()[before..])
        );
    }
}

/// SIGHUP opens the log again (logrotate moved it away) and stops nothing.
#[test]
fn sighup_opens_the_log_again_and_the_server_goes_on() {
    let herd = lone("sighup", "");
    let b = herd.get("Bailey");
    iamat_at(b, "before.cs.ucla.edu");
    let moved = b.log_path.with_extension("log.1");
    std::fs::rename(&b.log_path, &moved).expect("move the log away");
    b.signal(libc::SIGHUP);
    assert!(
        eventually(Duration::from_secs(5), || b.log_path.exists()),
        "no new log file after SIGHUP"
    );
    iamat_at(b, "after.cs.ucla.edu");
    await_log_line(b, "after.cs.ucla.edu", 0, Duration::from_secs(5));
    let old = std::fs::read_to_string(&moved).expect("the moved log");
    assert!(old.contains("before.cs.ucla.edu") && !old.contains("after.cs.ucla.edu"));
    assert!(b.log().contains("SIGHUP: log file opened again"));
}

/// With `log_max_bytes`, the log rotates by itself and keeps `log_keep` old files.
#[test]
fn a_log_past_its_size_cap_rotates_by_itself() {
    let dir = TestDir::new("log-rotate");
    let port = free_ports(1)[0];
    let top = format!(
        "{}log_max_bytes = 4096\nlog_keep = 2\n",
        common::herds::MEMORY_ONLY
    );
    let config = common::herds::write_config_with(&dir, &[member("Bailey", port, &[])], &top, "");
    let b = spawn_server(&config, "Bailey", &[]);
    let mut c = Client::connect(b.addr);
    for i in 0..400 {
        c.send(format!("IAMAT rotate-{i} {LOCATION} {}\n", now_secs_string()).as_bytes());
        let _ = c.read_line();
    }
    drop(c);
    let numbered = |n: u32| b.log_path.with_extension(format!("log.{n}"));
    assert!(
        eventually(Duration::from_secs(5), || numbered(2).exists()),
        "no {} after 400 IAMATs",
        numbered(2).display()
    );
    assert!(!numbered(3).exists(), "more than log_keep files are kept");
    for path in [numbered(1), numbered(2)] {
        let len = std::fs::metadata(&path).expect("a rotated log").len();
        // A file is rotated at the end of the turn that passed the cap.
        assert!(
            (4096..4096 + 64 * 1024).contains(&len),
            "{}: {len}",
            path.display()
        );
    }
}

/// A log that cannot be written is said once on standard error, not fatal, and
/// written again once it can be (the file is opened again at each flush until then).
#[test]
fn a_log_that_cannot_be_written_comes_back() {
    let dir = TestDir::new("log-fails");
    let port = free_ports(1)[0];
    let config = common::herds::write_config(&dir, &[member("Bailey", port, &[])], "");
    // The log is /dev/full until the test puts a file in its place: every write fails.
    std::fs::create_dir_all(dir.join("logs")).expect("a log directory");
    let log = dir.join("logs/Bailey.log");
    std::os::unix::fs::symlink("/dev/full", &log).expect("a link to /dev/full");
    let mut child = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(["serve", "Bailey", "--config"])
        .arg(&config)
        .env_remove("HERD_SECRET")
        .env_remove("RUST_LOG")
        .env_remove("GOOGLE_PLACES_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start herd serve");
    let stderr = child.stderr.take().expect("piped");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let collected = lines.clone();
    thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            collected.lock().unwrap().push(line);
        }
    });
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let answered = |client: &str| {
        eventually(Duration::from_secs(5), || {
            let line = format!("IAMAT {client} {LOCATION} {}\n", now_secs_string());
            std::net::TcpStream::connect(addr).is_ok()
                && exchange(addr, line.as_bytes()).starts_with(b"AT Bailey ")
        })
    };
    assert!(answered("while-failing-1"), "the server stopped answering");
    assert!(answered("while-failing-2"));
    std::fs::remove_file(&log).expect("remove the link");
    assert!(answered("after.cs.ucla.edu"));
    assert!(eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("after.cs.ucla.edu"))
    }));
    let _ = child.kill();
    let _ = child.wait();
    let said = lines.lock().unwrap().clone();
    let failures = said
        .iter()
        .filter(|l| l.contains("cannot write the log file"))
        .count();
    assert_eq!(failures, 1, "said once: {said:?}");
    assert!(
        said.iter()
            .any(|l| l.contains("the log file can be written again")),
        "{said:?}"
    );
}

/// The admin endpoint answers `/healthz`, `/status` and `/metrics`, keeps a
/// connection alive between requests, and refuses what is not a GET of a known path.
#[test]
fn the_admin_endpoint_answers_health_status_and_metrics() {
    let herd = lone("admin", "");
    let b = herd.get("Bailey");
    iamat_at(b, "kiwi.cs.ucla.edu");
    let admin = admin_addr(b);
    assert_eq!(http_get(admin, "/healthz"), (200, "ok\n".into()));
    let (status, body) = http_get(admin, "/status");
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(
        (json["name"].as_str(), json["records"].as_u64()),
        (Some("Bailey"), Some(1))
    );
    let (status, metrics) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("herd_records{server=\"Bailey\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("herd_commands_total{server=\"Bailey\",verb=\"IAMAT\",result=\"ok\"} 1\n")
    );
    assert_eq!(http_get(admin, "/nothing").0, 404);
    // Two requests on one connection.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = Vec::new();
    for _ in 0..2 {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .expect("send");
        let mut chunk = [0u8; 512];
        let n = s.read(&mut chunk).expect("read");
        got.push(String::from_utf8_lossy(&chunk[..n]).into_owned());
    }
    assert!(got
        .iter()
        .all(|r| r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("ok\n")));
    // A request head over the limit: 400, closed.
    let mut s = std::net::TcpStream::connect(admin).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let long = format!("GET /{} HTTP/1.1\r\n", "x".repeat(10_000));
    let _ = s.write_all(long.as_bytes());
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 400 "));
}

/// The admin endpoint as HTTP clients use it beyond one request at a time: requests pipelined
/// in one write are all answered, in order; a request followed by a half-close is answered
/// before the close; and more connections than its slots are all answered, the extra ones once
/// a slot frees, with a slot held by a client that sends nothing freed by its deadline.
#[test]
fn the_admin_endpoint_answers_pipelined_half_closed_and_queued_requests() {
    use std::io::{Read, Write};
    let herd = lone("admin-more", "");
    let admin = admin_addr(herd.get("Bailey"));
    let connect = || {
        let s = std::net::TcpStream::connect(admin).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s
    };
    let answers = |text: &str| text.matches("HTTP/1.1 200 OK\r\n").count();

    // Three requests in one write, the last asking to close: three answers, then the end.
    let mut s = connect();
    let one = "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
    let last = "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    s.write_all(format!("{one}{one}{last}").as_bytes())
        .expect("send");
    let mut got = String::new();
    s.read_to_string(&mut got).expect("read to the end");
    assert_eq!(answers(&got), 3, "{got}");
    assert!(got.ends_with("Connection: close\r\n\r\nok\n"), "{got}");

    // A head of 8 KiB is answered; one past it is a 400, also when it comes whole in one read.
    let padded = |total: usize| {
        let head = "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Pad: \r\n\r\n";
        let pad = "a".repeat(total - head.len());
        head.replace("X-Pad: ", &format!("X-Pad: {pad}"))
    };
    for (total, want) in [
        (herd::admin::MAX_HEAD_BYTES, "HTTP/1.1 200 OK\r\n"),
        (herd::admin::MAX_HEAD_BYTES + 1, "HTTP/1.1 400 "),
    ] {
        let mut s = connect();
        s.write_all(padded(total).as_bytes()).expect("send");
        let mut got = String::new();
        s.read_to_string(&mut got).expect("read to the end");
        assert!(got.starts_with(want), "a head of {total} bytes: {got}");
    }

    // Part of a head, then nothing: the server waits for the rest without spinning.
    let mut s = connect();
    s.write_all(b"GET /metrics HTTP/1.1\r\n").expect("send");
    let pid = herd.get("Bailey").pid();
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_seconds(pid) - before;
    assert!(
        spent < 0.2,
        "{spent:.2} s of CPU in 1 s waiting for the rest of a head"
    );
    s.write_all(b"Host: t\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut got = String::new();
    s.read_to_string(&mut got).expect("read to the end");
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");

    // A request, then the client's side closed: answered, then closed.
    let mut s = connect();
    s.write_all(one.as_bytes()).expect("send");
    s.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut got = String::new();
    s.read_to_string(&mut got).expect("read to the end");
    assert_eq!(answers(&got), 1, "{got}");

    // Every slot taken by a client that sends nothing, and more waiting behind them: each
    // waiting client is answered once the silent ones' first-request deadline frees a slot.
    let silent: Vec<_> = (0..herd::admin::MAX_CONNECTIONS)
        .map(|_| connect())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let mut s = connect();
            s.write_all(last.as_bytes()).expect("send");
            s
        })
        .collect();
    for mut s in waiting {
        let mut got = String::new();
        s.read_to_string(&mut got).expect("read to the end");
        assert_eq!(answers(&got), 1, "{got}");
    }
    drop(silent);
}

/// The CPU time process `pid` has used, user and system, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("its stat");
    // The fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf reads a constant of the system.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Where `promtool` and `prometheus` are: CI installs them; elsewhere the tests that need them
/// skip with a word, unless `HERD_REQUIRE_PROMETHEUS` is set.
fn prometheus_tools() -> Option<()> {
    let found = ["promtool", "prometheus"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    match (found, std::env::var_os("HERD_REQUIRE_PROMETHEUS")) {
        (true, _) => Some(()),
        (false, Some(_)) => panic!("promtool and prometheus are required here and missing"),
        (false, None) => {
            eprintln!("SKIPPED: promtool or prometheus is not installed");
            None
        }
    }
}

/// `/metrics` is what `promtool check metrics` accepts.
#[test]
fn metrics_pass_promtool() {
    if prometheus_tools().is_none() {
        return;
    }
    let herd = lone("promtool", "");
    let b = herd.get("Bailey");
    iamat_at(b, "kiwi.cs.ucla.edu");
    let (_, metrics) = http_get(admin_addr(b), "/metrics");
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    use std::io::Write;
    check
        .stdin
        .take()
        .expect("piped")
        .write_all(metrics.as_bytes())
        .expect("feed promtool");
    let out = check.wait_with_output().expect("promtool's verdict");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Prometheus server of the test's, killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` every second, its data in `dir`.
    fn start(dir: &Path, targets: &[SocketAddr]) -> Prometheus {
        let port = free_ports(1)[0];
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: herd\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let prometheus = Prometheus { child, addr };
        assert!(
            eventually(Duration::from_secs(20), || {
                std::net::TcpStream::connect(addr).is_ok() && http_get(addr, "/-/ready").0 == 200
            }),
            "prometheus did not become ready"
        );
        prometheus
    }

    /// The value of `query` now, if it has one.
    fn query(&self, query: &str) -> Option<f64> {
        let path = format!("/api/v1/query?query={}", query.replace(' ', "%20"));
        let (_, body) = http_get(self.addr, &path);
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

/// A real Prometheus scrapes a three-server herd, and its own query language sees the
/// herd's stores: the sum of `herd_records` is three times the clients sent.
#[test]
fn a_real_prometheus_scrapes_a_herd() {
    if prometheus_tools().is_none() {
        return;
    }
    let herd = Herd::build("prometheus").start_retrying(|| {
        let p = free_ports(3);
        vec![
            member("Hill", p[0], &["Smith", "Singleton"]).with_admin(),
            member("Smith", p[1], &["Hill", "Singleton"]).with_admin(),
            member("Singleton", p[2], &["Hill", "Smith"]).with_admin(),
        ]
    });
    herd.wait_linked();
    for i in 0..7 {
        iamat_at(herd.get("Hill"), &format!("scraped-{i}.cs.ucla.edu"));
    }
    let dir = TestDir::new("prometheus-data");
    let targets: Vec<SocketAddr> = herd.servers.iter().map(admin_addr).collect();
    let prometheus = Prometheus::start(&dir.path, &targets);
    let started = Instant::now();
    let mut last = None;
    let seen = eventually(Duration::from_secs(30), || {
        last = prometheus.query("sum(herd_records)");
        last == Some(21.0)
    });
    assert!(
        seen,
        "sum(herd_records) was {last:?} after {:?}",
        started.elapsed()
    );
    let up = prometheus.query("sum(up{job=\"herd\"})");
    assert_eq!(up, Some(3.0), "every target scraped");
}

/// `herd status` prints one row per server and exits 0 when all are up and agree,
/// 1 when one is down.
#[test]
fn herd_status_says_whether_the_herd_is_up_and_agrees() {
    let mut herd = Herd::build("status").start_retrying(|| {
        let p = free_ports(2);
        vec![
            member("Bailey", p[0], &["Bona"]).with_admin(),
            member("Bona", p[1], &["Bailey"]).with_admin(),
        ]
    });
    herd.wait_linked();
    iamat_at(herd.get("Bailey"), "kiwi.cs.ucla.edu");
    let status = |herd: &Herd| {
        let out = Command::new(env!("CARGO_BIN_EXE_herd"))
            .args(["status", "--config"])
            .arg(&herd.config)
            .output()
            .expect("run herd status");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let agreed = eventually(LINK_WAIT, || status(&herd).0 == Some(0));
    let (code, text) = status(&herd);
    assert!(agreed, "herd status: exit {code:?}:\n{text}");
    assert!(
        text.contains("every server is up; every store agrees"),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains(" yes ")).count(),
        2,
        "{text}"
    );
    // Stopped, its port still takes connections (the kernel's), but its loop answers nothing:
    // not up.
    herd.get("Bona").signal(libc::SIGSTOP);
    let (code, text) = status(&herd);
    herd.get("Bona").signal(libc::SIGCONT);
    assert_eq!(code, Some(1), "{text}");
    let bona = text.lines().find(|l| l.starts_with("Bona ")).unwrap_or("");
    assert!(bona.contains(" no "), "a stopped Bona is up:\n{text}");
    assert!(text.contains("not every server is up"), "{text}");
    herd.get_mut("Bona").kill();
    let (code, text) = status(&herd);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("not every server is up"), "{text}");
}
