//! Whole herds from a configuration file: flooding across the graph, a server killed and
//! restarted, start-up errors, and `herd up`.
//!
//! No server here has a Places API key, so WHATSAT answers with the stored AT record and the
//! fixed REQUEST_DENIED body; what matters is the first line, the record that was flooded.
//! Convergence is waited for with a bounded `eventually`, never asserted as a duration.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::herds::{
    await_log_past, free_ports, herd_2023, herd_goloman, member, write_config, write_config_with,
    Herd, Member,
};
use common::up::{children_of, signal, Up};
use common::*;

const CONVERGE: Duration = Duration::from_secs(10);
const NO_KEY_BODY: &[u8] = br#"{"html_attributions" : [], "results" : [], "status" : "REQUEST_DENIED", "error_message" : "This server has no Google Places API key: set GOOGLE_PLACES_API_KEY or places.key_file."}"#;

/// The whole reply to `WHATSAT CLIENT 10 1` at `addr`.
fn whatsat(addr: SocketAddr, client: &str) -> Vec<u8> {
    exchange(addr, format!("WHATSAT {client} 10 1\n").as_bytes())
}

/// Waits (bounded) until `server` answers WHATSAT CLIENT with the record `at`, then checks the
/// whole reply.
fn await_record(server: &ServerProc, client: &str, at: &str, what: &str) {
    let at_line = &[at.as_bytes(), b"\n"].concat()[..];
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

#[test]
fn an_update_at_bailey_reaches_jaquez() {
    let herd = Herd::build("herd-2023").start_retrying(|| herd_2023(&free_ports(5)));
    let at = iamat_at(herd.get("Bailey"), "kiwi.cs.ucla.edu");
    await_record(
        herd.get("Jaquez"),
        "kiwi.cs.ucla.edu",
        &at,
        "IAMAT at Bailey",
    );
    // And every other server has it too.
    for name in ["Bona", "Campbell", "Clark"] {
        await_record(herd.get(name), "kiwi.cs.ucla.edu", &at, "IAMAT at Bailey");
    }
}

#[test]
fn a_restarted_server_resyncs_and_links_come_back() {
    let mut herd = Herd::build("herd-restart").start_retrying(|| herd_2023(&free_ports(5)));

    // Wait until the herd is linked up, so that the drop is a drop of a live link.
    await_log_past(herd.get("Bailey"), "link Campbell up", 0, CONVERGE);
    await_log_past(herd.get("Jaquez"), "link Campbell up", 0, CONVERGE);
    let bailey_mark = herd.get("Bailey").log_bytes().len();
    let jaquez_mark = herd.get("Jaquez").log_bytes().len();

    herd.get_mut("Campbell").kill();
    let bailey_down = await_log_past(
        herd.get("Bailey"),
        "link Campbell down",
        bailey_mark,
        CONVERGE,
    );
    let jaquez_down = await_log_past(
        herd.get("Jaquez"),
        "link Campbell down",
        jaquez_mark,
        CONVERGE,
    );

    // An update while Campbell is down still crosses the herd (Bailey - Bona - Clark - Jaquez).
    let first = iamat_at(herd.get("Bailey"), "kiwi.cs.ucla.edu");
    await_record(
        herd.get("Jaquez"),
        "kiwi.cs.ucla.edu",
        &first,
        "IAMAT at Bailey while Campbell is down",
    );

    // Campbell comes back, empty, on the same port.
    herd.restart("Campbell");
    await_log_past(
        herd.get("Bailey"),
        "link Campbell up",
        bailey_down,
        CONVERGE,
    );
    await_log_past(
        herd.get("Jaquez"),
        "link Campbell up",
        jaquez_down,
        CONVERGE,
    );
    // It learns what it missed from the sync on link-up.
    await_record(
        herd.get("Campbell"),
        "kiwi.cs.ucla.edu",
        &first,
        "the update made while Campbell was down",
    );

    // A later update at Bailey reaches Campbell and crosses to Jaquez.
    let second = iamat_at(herd.get("Bailey"), "kiwi.cs.ucla.edu");
    assert_ne!(first, second);
    await_record(
        herd.get("Campbell"),
        "kiwi.cs.ucla.edu",
        &second,
        "IAMAT at Bailey after Campbell's restart",
    );
    await_record(
        herd.get("Jaquez"),
        "kiwi.cs.ucla.edu",
        &second,
        "IAMAT at Bailey after Campbell's restart",
    );
}

#[test]
fn the_goloman_herd_converges() {
    let herd = Herd::build("herd-goloman").start_retrying(|| herd_goloman(&free_ports(5)));
    let at = iamat_at(herd.get("Welsh"), "kiwi.cs.ucla.edu");
    await_record(herd.get("Hands"), "kiwi.cs.ucla.edu", &at, "IAMAT at Welsh");
}

// ---------------------------------------------------------------------------------------------
// Start-up errors

/// `herd serve NAME --config CONFIG` exits with 2 and one line on stderr that contains each of
/// `needles`.
fn assert_startup_error(config: &Path, name: &str, needles: &[&str]) {
    assert_startup_error_env(config, name, &[], needles);
}

/// [`assert_startup_error`] with `env` in the server's environment.
fn assert_startup_error_env(config: &Path, name: &str, env: &[(&str, &str)], needles: &[&str]) {
    let config_arg = config.to_str().expect("UTF-8 path");
    let cwd = config.parent().expect("a directory");
    let args = ["serve", name, "--config", config_arg];
    let (status, stdout, stderr) = run_to_exit(&args, cwd, env);
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
        &[member("Bailey", p[0], &["Bona"]), member("Bona", p[1], &[])],
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
            member("Bailey", p[0], &["Zebra"]),
            member("Bona", p[1], &[]),
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
            member("Bailey", p[0], &[]),
            member("Bona", p[1], &[]),
            member("Bona", p[2], &[]),
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
            member("Bailey", p[0], &[]),
            member("Bona", p[1], &[]),
            member("Clark", p[1], &[]),
        ],
        "",
    );
    assert_startup_error(&config, "Bailey", &[&p[1].to_string()]);
}

/// A configuration of Bailey alone, on a port from `free_ports`.
fn lone_bailey_config(dir: &TestDir, extra: &str) -> PathBuf {
    write_config(dir, &[member("Bailey", free_ports(1)[0], &[])], extra)
}

#[test]
fn an_unreadable_ca_file_is_a_startup_error() {
    let dir = TestDir::new("err-ca-missing");
    let missing = dir.join("missing-ca.pem");
    let config = lone_bailey_config(
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
    let config = lone_bailey_config(
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
    let config = lone_bailey_config(&dir, "");
    assert_startup_error(&config, "Nobody", &["Nobody"]);
}

#[test]
fn a_missing_configuration_file_is_a_startup_error() {
    let dir = TestDir::new("err-no-config");
    assert_startup_error(&dir.join("absent.toml"), "Bailey", &["absent.toml"]);
}

/// A secret must carry 128 bits, and be random.
#[test]
fn a_weak_herd_secret_is_a_startup_error() {
    let dir = TestDir::new("err-weak-secret");
    let p = free_ports(2);
    let config = write_config(
        &dir,
        &[
            member("Bailey", p[0], &["Bona"]),
            member("Bona", p[1], &["Bailey"]),
        ],
        "",
    );
    for weak in [
        "aaaaaaaaaaaaaaaa",
        "0123456789abcdef",
        "abababababababababababababababababab",
    ] {
        let env = [("HERD_SECRET", weak)];
        assert_startup_error_env(&config, "Bailey", &env, &["herd secret", "openssl rand"]);
    }
}

/// A secret_file its owner does not keep to itself is refused.
#[test]
fn a_secret_file_others_can_read_is_a_startup_error() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new("err-secret-mode");
    let secret = dir.join("secret");
    std::fs::write(&secret, "5f0c8a1e9b3d47a6c2e8f1b0d9a7c3e5\n").expect("write");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let p = free_ports(1);
    let top = format!(
        "data_dir = \"\"\nsecret_file = {:?}\n",
        secret.display().to_string()
    );
    let config = write_config_with(&dir, &[member("Bailey", p[0], &[])], &top, "");
    assert_startup_error(&config, "Bailey", &["secret_file", "chmod 600"]);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let server = spawn_server(&config, "Bailey", &[]);
    drop(server);
}

/// A places.key_file its owner does not keep to itself is refused, as a secret_file is.
#[test]
fn a_key_file_others_can_read_is_a_startup_error() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new("err-key-mode");
    let key = dir.join("places.key");
    std::fs::write(&key, "AIzaSyExampleKey0123456789\n").expect("write");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let p = free_ports(1);
    let places = format!("[places]\nkey_file = {:?}\n", key.display().to_string());
    let config = write_config_with(
        &dir,
        &[member("Bailey", p[0], &[])],
        "data_dir = \"\"\n",
        &places,
    );
    assert_startup_error(
        &config,
        "Bailey",
        &["places.key_file", "mode 640", "chmod 600"],
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let server = spawn_server(&config, "Bailey", &[]);
    drop(server);
}

/// A server with neighbours and no herd secret says so at start, on
/// standard error and in its log; an empty HERD_SECRET is no secret.
#[test]
fn a_server_with_neighbours_and_no_secret_says_so_at_start() {
    let dir = TestDir::new("no-secret-warning");
    let p = free_ports(2);
    let config = write_config(
        &dir,
        &[
            member("Bailey", p[0], &["Bona"]),
            member("Bona", p[1], &["Bailey"]),
        ],
        "",
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args(["serve", "Bailey", "--config"])
        .arg(&config)
        .current_dir(&dir.path)
        .env("HERD_SECRET", "")
        .env_remove("GOOGLE_PLACES_API_KEY")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start herd serve");
    let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
    let mut first = String::new();
    let read = stderr.read_line(&mut first);
    let _ = child.kill();
    let _ = child.wait();
    assert!(read.is_ok_and(|n| n > 0), "nothing on stderr");
    assert!(
        first.contains("server Bailey has neighbours and no herd secret"),
        "{first:?}"
    );
}

/// Under a descriptor limit that leaves room for fewer clients than `max_connections`, the
/// server says so at start and lowers it: a client past the room is told `? server busy` and
/// closed, not left unanswered in the kernel's queue.
#[test]
fn a_descriptor_limit_below_max_connections_lowers_it_and_says_so() {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    const DESCRIPTORS: u64 = 100;
    let dir = TestDir::new("descriptor-limit");
    let p = free_ports(1);
    let config = write_config(&dir, &[member("Bailey", p[0], &[])], "");
    let mut command = Command::new(env!("CARGO_BIN_EXE_herd"));
    command
        .args(["serve", "Bailey", "--config"])
        .arg(&config)
        .current_dir(&dir.path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe, and only reads the struct passed in.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: DESCRIPTORS,
                rlim_max: DESCRIPTORS,
            };
            match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    let mut child = command.spawn().expect("cannot start herd serve");
    let mut stderr = BufReader::new(child.stderr.take().expect("piped"));
    let mut first = String::new();
    let _ = stderr.read_line(&mut first);
    let room: usize = first
        .split("leaves room for ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no word of the descriptor limit: {first:?}"));
    assert!(
        first.contains("max_connections lowered from 16384 to") && room < 100,
        "{first:?}"
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], p[0]));
    assert!(eventually(Duration::from_secs(10), || TcpStream::connect(
        addr
    )
    .is_ok()));
    let held: Vec<TcpStream> = (0..room)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    // Each taken (its first-line deadline is a minute away): the next one is told.
    assert!(eventually(Duration::from_secs(10), || {
        let mut s = TcpStream::connect(addr).expect("connect");
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        reply == b"? server busy\n"
    }));
    drop(held);
    let _ = child.kill();
    let _ = child.wait();
}

/// `herd up` with `HERD_SECRET` set but empty makes a secret for the herd
/// as if it were unset: a stranger's greeting without a nonce is refused, its record not stored.
#[test]
fn herd_up_with_an_empty_herd_secret_still_authenticates_its_links() {
    let mut attempt = 1;
    let (_dir, specs, _up) = loop {
        match try_start_up(&[("HERD_SECRET", "")]) {
            Ok(started) => break started,
            Err(_) if attempt < 3 => attempt += 1,
            Err(e) => panic!("{e}"),
        }
    };
    let hill = SocketAddr::from(([127, 0, 0, 1], specs[0].port));
    let forged = format!(
        "AT Smith +0.000000001 forged-up {LOCATION} {}",
        now_secs_string()
    );
    let mut c = Client::connect(hill);
    c.send(format!("PEER herd/1 Smith\n{forged}\n").as_bytes());
    let _ = c.read_to_end();
    let reply = exchange(hill, b"WHATSAT forged-up 10 1\n");
    assert_eq!(show(&reply), show(b"? WHATSAT forged-up 10 1\n"));
}

// ---------------------------------------------------------------------------------------------
// herd up

/// Starts `herd up` for a three-server herd on free ports and waits until it has printed where
/// each server listens. An `Err` carries what went wrong and what it printed.
fn try_start_up(env: &[(&str, &str)]) -> Result<(TestDir, [Member; 3], Up), String> {
    let dir = TestDir::new("herd-up");
    let ports = free_ports(3);
    let specs = [
        member("Hill", ports[0], &["Smith", "Singleton"]),
        member("Smith", ports[1], &["Hill", "Singleton"]),
        member("Singleton", ports[2], &["Hill", "Smith"]),
    ];
    let config = write_config(&dir, &specs, "");
    let up = Up::start(&dir.path, &config, &[], env, &specs)?;
    Ok((dir, specs, up))
}

/// `herd up` with no herd secret configured makes one for the herd it starts: each server has
/// it in its environment (256 bits, in hex, the same for all, never on a command line), every
/// link comes up authenticated with it both ways, and it is in no log line.
#[test]
fn herd_up_makes_a_herd_secret_and_every_link_authenticates_with_it() {
    let mut attempt = 1;
    let (dir, specs, up) = loop {
        match try_start_up(&[]) {
            Ok(started) => break started,
            Err(_) if attempt < 3 => attempt += 1,
            Err(e) => panic!("{e}"),
        }
    };
    let log_of = |name: &str| {
        std::fs::read_to_string(dir.join(&format!("logs/{name}.log"))).unwrap_or_default()
    };
    for spec in &specs {
        for n in spec.neighbors {
            let up_line = format!("link {n} up to ");
            let peer_line = format!("is peer {n}, authenticated");
            let linked = eventually(CONVERGE, || {
                let log = log_of(spec.name);
                log.lines()
                    .any(|l| l.contains(&up_line) && l.contains(", authenticated;"))
                    && log.contains(&peer_line)
            });
            assert!(
                linked,
                "{}'s link with {n} is not authenticated both ways:\n{}",
                spec.name,
                log_of(spec.name)
            );
        }
    }
    let mut secrets = Vec::new();
    for pid in children_of(up.child.id()) {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let secret = environ
            .split(|&b| b == 0)
            .find_map(|var| var.strip_prefix(b"HERD_SECRET="))
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .unwrap_or_else(|| panic!("server {pid} of herd up has no HERD_SECRET"));
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !contains(&cmdline, secret.as_bytes()),
            "the secret is on a server's command line"
        );
        secrets.push(secret);
    }
    assert_eq!(secrets.len(), specs.len(), "one server per member");
    let secret = &secrets[0];
    assert!(
        secret.len() == 64 && secret.bytes().all(|b| b.is_ascii_hexdigit()),
        "herd up made a secret of {} characters, not 256 bits in hex",
        secret.len()
    );
    assert!(
        secrets.iter().all(|s| s == secret),
        "the servers' secrets differ"
    );
    for spec in &specs {
        assert!(
            !log_of(spec.name).contains(secret.as_str()),
            "{}'s log shows the herd secret",
            spec.name
        );
    }
}

#[test]
fn herd_up_runs_every_server_and_sigterm_stops_them_all() {
    // A port taken by another test between `free_ports` and the bind is not the herd's fault:
    // try again on new ports, twice at most.
    let mut attempt = 1;
    let (_dir, specs, mut up) = loop {
        match try_start_up(&[]) {
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

    assert_eq!(up.stop(), Some(0), "herd up's exit code after SIGTERM");
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

/// `herd up` passes SIGHUP on to its servers, which open their logs again, and SIGUSR1, which
/// makes each write its store; it stops nothing.
#[test]
fn herd_up_passes_sighup_and_sigusr1_on_and_stops_nothing() {
    let mut attempt = 1;
    let (dir, specs, mut up) = loop {
        match try_start_up(&[]) {
            Ok(started) => break started,
            Err(_) if attempt < 3 => attempt += 1,
            Err(e) => panic!("{e}"),
        }
    };
    let logs: Vec<PathBuf> = specs
        .iter()
        .map(|s| dir.path.join(format!("logs/{}.log", s.name)))
        .collect();
    for log in &logs {
        std::fs::rename(log, log.with_extension("log.1")).expect("move a log away");
    }
    signal(up.child.id() as libc::pid_t, libc::SIGHUP);
    for log in &logs {
        assert!(
            eventually(Duration::from_secs(5), || std::fs::read_to_string(log)
                .is_ok_and(|t| t.contains("SIGHUP: log file opened again"))),
            "{} was not opened again",
            log.display()
        );
    }
    assert!(
        matches!(up.child.try_wait(), Ok(None)),
        "herd up stopped on SIGHUP"
    );
    signal(up.child.id() as libc::pid_t, libc::SIGUSR1);
    for spec in &specs {
        let dump = dir.path.join(format!("logs/{}.store", spec.name));
        assert!(
            eventually(Duration::from_secs(5), || std::fs::read_to_string(&dump)
                .is_ok_and(|t| t.starts_with("# "))),
            "{} was not written",
            dump.display()
        );
    }
    assert!(
        matches!(up.child.try_wait(), Ok(None)),
        "herd up stopped on SIGUSR1"
    );
    for spec in &specs {
        let addr = SocketAddr::from(([127, 0, 0, 1], spec.port));
        let reply = exchange(
            addr,
            format!("IAMAT kiwi {LOCATION} {}\n", now_secs_string()).as_bytes(),
        );
        assert!(reply.starts_with(format!("AT {} ", spec.name).as_bytes()));
    }
}

/// What a user mistyped is said plainly.
#[test]
fn a_missing_name_or_configuration_is_said_plainly() {
    let dir = TestDir::new("plain-errors");
    let (status, _, stderr) = run_to_exit(&["serve"], &dir.path, &[]);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("serve needs the NAME"), "{stderr:?}");
    // No herd.toml here (the test binary's directory has none either): a name cannot be found.
    let (status, _, stderr) = run_to_exit(&["iamat", "Bailey", "kiwi", "+1+1"], &dir.path, &[]);
    assert_eq!(status.code(), Some(2));
    assert!(
        stderr.contains("no herd.toml here or beside the program"),
        "{stderr:?}"
    );
}

/// A client command whose line is owed a reply and gets none (the other end read it and
/// closed) exits 1 and says so; a blank line, owed nothing, exits 0.
#[test]
fn a_client_command_without_a_reply_exits_1() {
    let dir = TestDir::new("no-reply");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let addr = listener.local_addr().expect("its address").to_string();
    let mute = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut s, _) = listener.accept().expect("accept");
            let mut line = Vec::new();
            let _ = std::io::Read::read_to_end(&mut s, &mut line);
        }
    });
    let (status, stdout, stderr) =
        run_to_exit(&["send", &addr, "IAMAT kiwi +1+1 1"], &dir.path, &[]);
    assert_eq!(status.code(), Some(1), "{stdout:?} {stderr:?}");
    assert!(stderr.contains("without a reply"), "{stderr:?}");
    let (status, _, stderr) = run_to_exit(&["send", &addr, " "], &dir.path, &[]);
    assert_eq!(status.code(), Some(0), "{stderr:?}");
    mute.join().expect("the mute server");
}

/// A server whose standard output and error cannot be written (here a file already past the
/// process's file size limit, where each write fails with EFBIG) still serves, and a failure
/// still ends with its own exit code, not a panic's.
#[test]
fn unwritable_standard_output_and_error_change_nothing_but_what_is_said() {
    use std::os::unix::process::CommandExt;
    let dir = TestDir::new("unwritable-stdio");
    let p = free_ports(1);
    let config = write_config_with(
        &dir,
        &[member("Bailey", p[0], &[])],
        "data_dir = \"\"\n",
        "",
    );
    let full = dir.join("full.out");
    std::fs::write(&full, vec![b'.'; 64 * 1024]).expect("write");
    let unwritable = |args: &[&str]| {
        let out = std::fs::OpenOptions::new()
            .append(true)
            .open(&full)
            .expect("open");
        let err = out.try_clone().expect("clone");
        let mut command = Command::new(env!("CARGO_BIN_EXE_herd"));
        command
            .args(args)
            .arg("--config")
            .arg(&config)
            .current_dir(&dir.path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: signal and setrlimit are async-signal-safe; neither touches memory of ours.
        unsafe {
            command.pre_exec(|| {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let limit = libc::rlimit {
                    rlim_cur: 4096,
                    rlim_max: 4096,
                };
                libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
                Ok(())
            });
        }
        command
    };
    let status = unwritable(&["serve", "Nobody"]).status().expect("run herd");
    assert_eq!(status.code(), Some(2), "a name not in the configuration");
    let mut child = unwritable(&["serve", "Bailey"])
        .spawn()
        .expect("start herd");
    let addr = SocketAddr::from(([127, 0, 0, 1], p[0]));
    let up = eventually(Duration::from_secs(10), || {
        TcpStream::connect(addr).is_ok() || matches!(child.try_wait(), Ok(Some(_)))
    });
    let exited = child.try_wait();
    assert!(
        up && matches!(exited, Ok(None)),
        "Bailey did not come up: {exited:?}"
    );
    let reply = exchange(
        addr,
        format!("IAMAT kiwi {LOCATION} {}\n", now_secs_string()).as_bytes(),
    );
    assert!(reply.starts_with(b"AT Bailey "), "{}", show(&reply));
    let _ = child.kill();
    let _ = child.wait();
}

/// A port in use is the same error, exit 2, under `serve` and `up`.
#[test]
fn a_port_in_use_exits_2_under_serve_and_under_up() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let port = taken.local_addr().expect("its address").port();
    let dir = TestDir::new("port-in-use");
    let config = write_config(&dir, &[member("Bailey", port, &[])], "");
    let config_arg = config.to_str().expect("UTF-8 path");
    let (serve, _, serve_err) =
        run_to_exit(&["serve", "Bailey", "--config", config_arg], &dir.path, &[]);
    let (up, _, up_err) = run_to_exit(&["up", "--config", config_arg], &dir.path, &[]);
    assert_eq!(serve.code(), Some(2), "{serve_err}");
    assert_eq!(up.code(), Some(2), "{up_err}");
    assert!(serve_err.contains("cannot listen") && up_err.contains("cannot listen"));
    drop(taken);
}
