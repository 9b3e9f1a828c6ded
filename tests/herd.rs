//! Whole herds from a configuration file: flooding across the graph, a server killed and
//! restarted, start-up errors, and `herd up`.
//!
//! No server here has a Places API key, so WHATSAT answers with the stored AT record and the
//! fixed REQUEST_DENIED body; what matters is the first line, the record that was flooded.
//! Convergence is waited for with a bounded `eventually`, never asserted as a duration.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const CONVERGE: Duration = Duration::from_secs(10);
const LOCATION: &str = "+34.068930-118.445127";
const NO_KEY_BODY: &[u8] = br#"{"html_attributions" : [], "results" : [], "status" : "REQUEST_DENIED", "error_message" : "This server has no Google Places API key: set GOOGLE_PLACES_API_KEY or places.key_file."}"#;

/// The 2023 herd (docs/protocol.md section 1) on the given five ports.
fn herd_2023(ports: &[u16]) -> Vec<ServerSpec<'static>> {
    vec![
        ServerSpec {
            name: "Bailey",
            port: ports[0],
            neighbors: &["Bona", "Campbell"],
        },
        ServerSpec {
            name: "Bona",
            port: ports[1],
            neighbors: &["Bailey", "Campbell", "Clark"],
        },
        ServerSpec {
            name: "Campbell",
            port: ports[2],
            neighbors: &["Bailey", "Bona", "Jaquez"],
        },
        ServerSpec {
            name: "Clark",
            port: ports[3],
            neighbors: &["Bona", "Jaquez"],
        },
        ServerSpec {
            name: "Jaquez",
            port: ports[4],
            neighbors: &["Campbell", "Clark"],
        },
    ]
}

/// The Goloman herd of earlier years (docs/protocol.md section 1).
fn herd_goloman(ports: &[u16]) -> Vec<ServerSpec<'static>> {
    vec![
        ServerSpec {
            name: "Goloman",
            port: ports[0],
            neighbors: &["Hands", "Holiday", "Wilkes"],
        },
        ServerSpec {
            name: "Hands",
            port: ports[1],
            neighbors: &["Goloman", "Wilkes"],
        },
        ServerSpec {
            name: "Holiday",
            port: ports[2],
            neighbors: &["Goloman", "Welsh", "Wilkes"],
        },
        ServerSpec {
            name: "Welsh",
            port: ports[3],
            neighbors: &["Holiday"],
        },
        ServerSpec {
            name: "Wilkes",
            port: ports[4],
            neighbors: &["Goloman", "Hands", "Holiday"],
        },
    ]
}

fn spawn_all(config: &Path, specs: &[ServerSpec]) -> Vec<ServerProc> {
    specs
        .iter()
        .map(|s| spawn_server(config, s.name, &[]))
        .collect()
}

/// A herd of `make(ports)` on free ports in a new directory, every server started.
/// `free_ports` can race with other tests (a port taken between the check and the bind makes a
/// server exit with "address already in use"), so a herd that fails to start is tried again,
/// in a fresh directory on new ports, twice at most; a server that never starts still fails
/// the test.
fn start_herd(
    tag: &str,
    make: fn(&[u16]) -> Vec<ServerSpec<'static>>,
) -> (TestDir, Vec<ServerSpec<'static>>, PathBuf, Vec<ServerProc>) {
    let mut attempt = 1;
    loop {
        let dir = TestDir::new(tag);
        let specs = make(&free_ports(5));
        let config = write_config(&dir, &specs, "");
        match panic::catch_unwind(AssertUnwindSafe(|| spawn_all(&config, &specs))) {
            Ok(servers) => return (dir, specs, config, servers),
            Err(_) if attempt < 3 => attempt += 1,
            Err(failure) => panic::resume_unwind(failure),
        }
    }
}

fn by_name<'a>(servers: &'a [ServerProc], name: &str) -> &'a ServerProc {
    servers
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no server {name}"))
}

/// Sends `IAMAT CLIENT +34.068930-118.445127 NOW` to `server` and returns its AT line (with
/// `\n`), after checking its shape.
fn iamat(server: &ServerProc, client: &str) -> Vec<u8> {
    let time = now_secs_string();
    let reply = exchange(
        server.addr,
        format!("IAMAT {client} {LOCATION} {time}\n").as_bytes(),
    );
    let head = format!("AT {} ", server.name);
    let tail = format!(" {client} {LOCATION} {time}\n");
    assert!(
        reply.starts_with(head.as_bytes())
            && reply.ends_with(tail.as_bytes())
            && reply.iter().filter(|&&b| b == b'\n').count() == 1,
        "IAMAT {client} {LOCATION} {time} at {} was answered {}",
        server.name,
        show(&reply)
    );
    reply
}

/// The whole reply to `WHATSAT CLIENT 10 1` at `addr`.
fn whatsat(addr: SocketAddr, client: &str) -> Vec<u8> {
    exchange(addr, format!("WHATSAT {client} 10 1\n").as_bytes())
}

/// Waits (bounded) until `server` answers WHATSAT CLIENT with the record `at_line`, then
/// checks the whole reply.
fn await_record(server: &ServerProc, client: &str, at_line: &[u8], what: &str) {
    let mut last = Vec::new();
    let seen = eventually(CONVERGE, || {
        last = whatsat(server.addr, client);
        last.starts_with(at_line)
    });
    assert!(
        seen,
        "{what}: within {CONVERGE:?}, {} never answered WHATSAT {client} with {}; last reply: {}",
        server.name,
        show(at_line),
        show(&last)
    );
    let want = [at_line, NO_KEY_BODY, b"\n\n"].concat();
    assert_eq!(
        show(&last),
        show(&want),
        "{what}: the whole WHATSAT reply at {}",
        server.name
    );
}

fn find_from(haystack: &[u8], needle: &str, from: usize) -> Option<usize> {
    let from = from.min(haystack.len());
    haystack[from..]
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .map(|i| from + i)
}

/// Waits (bounded) until `server`'s log has `needle` at or after byte `from`; returns where.
fn await_log_from(server: &ServerProc, needle: &str, from: usize) -> usize {
    let mut at = None;
    let seen = eventually(CONVERGE, || {
        at = find_from(&server.log_bytes(), needle, from);
        at.is_some()
    });
    assert!(
        seen,
        "{}'s log has no {needle:?} after byte {from} within {CONVERGE:?}; from there it is:\n{}",
        server.name,
        String::from_utf8_lossy(&server.log_bytes()[from.min(server.log_bytes().len())..])
    );
    at.expect("seen")
}

#[test]
fn an_update_at_bailey_reaches_jaquez() {
    let (_dir, _, _, servers) = start_herd("herd-2023", herd_2023);
    let at = iamat(by_name(&servers, "Bailey"), "kiwi.cs.ucla.edu");
    await_record(
        by_name(&servers, "Jaquez"),
        "kiwi.cs.ucla.edu",
        &at,
        "IAMAT at Bailey",
    );
    // And every other server has it too.
    for name in ["Bona", "Campbell", "Clark"] {
        await_record(
            by_name(&servers, name),
            "kiwi.cs.ucla.edu",
            &at,
            "IAMAT at Bailey",
        );
    }
}

#[test]
fn a_restarted_server_resyncs_and_links_come_back() {
    let (_dir, specs, config, mut servers) = start_herd("herd-restart", herd_2023);
    let campbell = specs
        .iter()
        .position(|s| s.name == "Campbell")
        .expect("Campbell");

    // Wait until the herd is linked up, so that the drop is a drop of a live link.
    await_log_from(by_name(&servers, "Bailey"), "link Campbell up", 0);
    await_log_from(by_name(&servers, "Jaquez"), "link Campbell up", 0);
    let bailey_mark = by_name(&servers, "Bailey").log_bytes().len();
    let jaquez_mark = by_name(&servers, "Jaquez").log_bytes().len();

    servers[campbell].kill();
    let bailey_down = await_log_from(
        by_name(&servers, "Bailey"),
        "link Campbell down",
        bailey_mark,
    );
    let jaquez_down = await_log_from(
        by_name(&servers, "Jaquez"),
        "link Campbell down",
        jaquez_mark,
    );

    // An update while Campbell is down still crosses the herd (Bailey - Bona - Clark - Jaquez).
    let first = iamat(by_name(&servers, "Bailey"), "kiwi.cs.ucla.edu");
    await_record(
        by_name(&servers, "Jaquez"),
        "kiwi.cs.ucla.edu",
        &first,
        "IAMAT at Bailey while Campbell is down",
    );

    // Campbell comes back, empty, on the same port.
    servers[campbell] = spawn_server(&config, "Campbell", &[]);
    await_log_from(by_name(&servers, "Bailey"), "link Campbell up", bailey_down);
    await_log_from(by_name(&servers, "Jaquez"), "link Campbell up", jaquez_down);
    // It learns what it missed from the sync on link-up.
    await_record(
        &servers[campbell],
        "kiwi.cs.ucla.edu",
        &first,
        "the update made while Campbell was down",
    );

    // A later update at Bailey reaches Campbell and crosses to Jaquez.
    let second = iamat(by_name(&servers, "Bailey"), "kiwi.cs.ucla.edu");
    assert_ne!(first, second);
    await_record(
        &servers[campbell],
        "kiwi.cs.ucla.edu",
        &second,
        "IAMAT at Bailey after Campbell's restart",
    );
    await_record(
        by_name(&servers, "Jaquez"),
        "kiwi.cs.ucla.edu",
        &second,
        "IAMAT at Bailey after Campbell's restart",
    );
}

#[test]
fn the_goloman_herd_converges() {
    let (_dir, _, _, servers) = start_herd("herd-goloman", herd_goloman);
    let at = iamat(by_name(&servers, "Welsh"), "kiwi.cs.ucla.edu");
    await_record(
        by_name(&servers, "Hands"),
        "kiwi.cs.ucla.edu",
        &at,
        "IAMAT at Welsh",
    );
}

// ---------------------------------------------------------------------------------------------
// Start-up errors

/// Runs `herd ARGS` to its exit, at most 10 s (then kills it and panics). Returns the status,
/// stdout and stderr.
fn run_bounded(args: &[&str], cwd: &Path) -> (ExitStatus, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(args)
        .current_dir(cwd)
        .env_remove("GOOGLE_PLACES_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start herd");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut out = Vec::new();
            let _ = pipe.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("herd {args:?} did not exit within 10 s");
            }
        }
    };
    (
        status,
        stdout.join().expect("stdout reader"),
        stderr.join().expect("stderr reader"),
    )
}

/// `herd serve NAME --config CONFIG` exits with 2 and one line on stderr that contains each of
/// `needles`.
fn assert_startup_error(config: &Path, name: &str, needles: &[&str]) {
    let config_arg = config.to_str().expect("UTF-8 path");
    let cwd = config.parent().expect("a directory");
    let (status, stdout, stderr) = run_bounded(&["serve", name, "--config", config_arg], cwd);
    let config_text = std::fs::read_to_string(config).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(2),
        "herd serve {name}: exit {status}; stdout {stdout:?}; stderr {stderr:?}; config:\n{config_text}"
    );
    assert!(
        stderr.ends_with('\n') && stderr.matches('\n').count() == 1 && stderr.len() > 1,
        "herd serve {name}: stderr is not one line: {stderr:?}; config:\n{config_text}"
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "herd serve {name}: the error {stderr:?} does not name {needle:?}; config:\n{config_text}"
        );
    }
}

#[test]
fn a_link_named_on_one_side_only_is_a_startup_error() {
    let dir = TestDir::new("err-one-sided");
    let p = free_ports(2);
    let config = write_config(
        &dir,
        &[
            ServerSpec {
                name: "Bailey",
                port: p[0],
                neighbors: &["Bona"],
            },
            ServerSpec {
                name: "Bona",
                port: p[1],
                neighbors: &[],
            },
        ],
        "",
    );
    assert_startup_error(&config, "Bailey", &["Bailey", "Bona"]);
}

#[test]
fn an_unknown_neighbour_is_a_startup_error() {
    let dir = TestDir::new("err-unknown-neighbour");
    let p = free_ports(2);
    let config = write_config(
        &dir,
        &[
            ServerSpec {
                name: "Bailey",
                port: p[0],
                neighbors: &["Zebra"],
            },
            ServerSpec {
                name: "Bona",
                port: p[1],
                neighbors: &[],
            },
        ],
        "",
    );
    assert_startup_error(&config, "Bailey", &["Zebra"]);
}

#[test]
fn a_duplicate_name_is_a_startup_error() {
    let dir = TestDir::new("err-duplicate-name");
    let p = free_ports(3);
    let config = write_config(
        &dir,
        &[
            ServerSpec {
                name: "Bailey",
                port: p[0],
                neighbors: &[],
            },
            ServerSpec {
                name: "Bona",
                port: p[1],
                neighbors: &[],
            },
            ServerSpec {
                name: "Bona",
                port: p[2],
                neighbors: &[],
            },
        ],
        "",
    );
    assert_startup_error(&config, "Bailey", &["Bona"]);
}

#[test]
fn a_duplicate_port_is_a_startup_error() {
    let dir = TestDir::new("err-duplicate-port");
    let p = free_ports(2);
    let config = write_config(
        &dir,
        &[
            ServerSpec {
                name: "Bailey",
                port: p[0],
                neighbors: &[],
            },
            ServerSpec {
                name: "Bona",
                port: p[1],
                neighbors: &[],
            },
            ServerSpec {
                name: "Clark",
                port: p[1],
                neighbors: &[],
            },
        ],
        "",
    );
    assert_startup_error(&config, "Bailey", &[&p[1].to_string()]);
}

fn lone_bailey(dir: &TestDir, extra: &str) -> PathBuf {
    let p = free_ports(1);
    write_config(
        dir,
        &[ServerSpec {
            name: "Bailey",
            port: p[0],
            neighbors: &[],
        }],
        extra,
    )
}

#[test]
fn an_unreadable_ca_file_is_a_startup_error() {
    let dir = TestDir::new("err-ca-missing");
    let missing = dir.join("missing-ca.pem");
    let config = lone_bailey(
        &dir,
        &format!(
            "[places]\nca_file = \"{}\"\n",
            missing.to_str().expect("UTF-8 path")
        ),
    );
    assert_startup_error(&config, "Bailey", &["missing-ca.pem"]);
}

#[test]
fn a_ca_file_without_certificates_is_a_startup_error() {
    let dir = TestDir::new("err-ca-garbage");
    let garbage = dir.join("not-a-cert.pem");
    std::fs::write(&garbage, "this is not a PEM certificate\n").expect("write");
    let config = lone_bailey(
        &dir,
        &format!(
            "[places]\nca_file = \"{}\"\n",
            garbage.to_str().expect("UTF-8 path")
        ),
    );
    assert_startup_error(&config, "Bailey", &["not-a-cert.pem"]);
}

#[test]
fn an_unknown_server_name_is_a_startup_error() {
    let dir = TestDir::new("err-unknown-name");
    let config = lone_bailey(&dir, "");
    assert_startup_error(&config, "Nobody", &["Nobody"]);
}

#[test]
fn a_missing_configuration_file_is_a_startup_error() {
    let dir = TestDir::new("err-no-config");
    assert_startup_error(&dir.join("absent.toml"), "Bailey", &["absent.toml"]);
}

// ---------------------------------------------------------------------------------------------
// herd up

/// `herd up`, started in a process group of its own. Dropping it kills whatever is left: the
/// children of `herd up` (found in /proc while it still runs), `herd up` itself, and the whole
/// process group, so no server survives a failed test.
struct Up {
    child: Child,
}

/// The pids whose parent is `pid`.
fn children_of(pid: u32) -> Vec<libc::pid_t> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|child| {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(pid)
        })
        .collect()
}

fn signal(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // Only while `herd up` is not reaped is its pid surely its own.
        if let Ok(None) = self.child.try_wait() {
            for child in children_of(self.child.id()) {
                signal(child, libc::SIGKILL);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // The group id is `herd up`'s pid; the group outlives it while members remain.
        signal(-(self.child.id() as libc::pid_t), libc::SIGKILL);
    }
}

/// Starts `herd up` for a three-server herd on free ports and waits (10 s at most) until it
/// has printed where each server listens. An `Err` carries what went wrong and what it printed.
fn try_start_up() -> Result<(TestDir, [ServerSpec<'static>; 3], Up), String> {
    let dir = TestDir::new("herd-up");
    let ports = free_ports(3);
    let specs = [
        ServerSpec {
            name: "Hill",
            port: ports[0],
            neighbors: &["Smith", "Singleton"],
        },
        ServerSpec {
            name: "Smith",
            port: ports[1],
            neighbors: &["Hill", "Singleton"],
        },
        ServerSpec {
            name: "Singleton",
            port: ports[2],
            neighbors: &["Hill", "Smith"],
        },
    ];
    let config = write_config(&dir, &specs, "");
    let mut child = Command::new(env!("CARGO_BIN_EXE_herd"))
        .arg("up")
        .arg("--config")
        .arg(&config)
        .current_dir(&dir.path)
        .env_remove("GOOGLE_PLACES_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .expect("cannot start herd up");
    let stdout_pipe = child.stdout.take().expect("piped");
    let mut up = Up { child };

    let printed = Arc::new(Mutex::new(String::new()));
    {
        let printed = Arc::clone(&printed);
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout_pipe);
            let mut line = String::new();
            while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                printed.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
    }
    let listens = |text: &str, spec: &ServerSpec| {
        text.lines()
            .any(|l| l.contains(spec.name) && l.contains(&format!("127.0.0.1:{}", spec.port)))
    };
    let all_listen = eventually(Duration::from_secs(10), || {
        specs.iter().all(|s| listens(&printed.lock().unwrap(), s))
            || matches!(up.child.try_wait(), Ok(Some(_)))
    }) && specs.iter().all(|s| listens(&printed.lock().unwrap(), s));
    if all_listen {
        return Ok((dir, specs, up));
    }
    let status = up.child.try_wait();
    Err(format!(
        "herd up did not print where each server listens within 10 s (exit status {status:?}); \
         it printed:\n{}",
        printed.lock().unwrap()
    ))
}

#[test]
fn herd_up_runs_every_server_and_sigterm_stops_them_all() {
    // A port taken by another test between `free_ports` and the bind is not the herd's fault:
    // try again on new ports, twice at most.
    let mut attempt = 1;
    let (_dir, specs, mut up) = loop {
        match try_start_up() {
            Ok(started) => break started,
            Err(_) if attempt < 3 => attempt += 1,
            Err(e) => panic!("{e}"),
        }
    };

    for spec in &specs {
        let addr = SocketAddr::from(([127, 0, 0, 1], spec.port));
        let time = now_secs_string();
        let reply = exchange(addr, format!("IAMAT kiwi {LOCATION} {time}\n").as_bytes());
        let head = format!("AT {} ", spec.name);
        assert!(
            reply.starts_with(head.as_bytes())
                && reply.ends_with(format!(" kiwi {LOCATION} {time}\n").as_bytes()),
            "{} (started by herd up) answered IAMAT with {}",
            spec.name,
            show(&reply)
        );
    }

    signal(up.child.id() as libc::pid_t, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match up.child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => panic!("herd up did not exit within 10 s of SIGTERM"),
        }
    };
    assert_eq!(status.code(), Some(0), "herd up after SIGTERM: {status}");
    for spec in &specs {
        let addr = SocketAddr::from(([127, 0, 0, 1], spec.port));
        assert!(
            eventually(Duration::from_secs(10), || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
            }),
            "{} still accepts connections on {addr} after herd up was stopped",
            spec.name
        );
    }
}
