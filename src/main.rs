//! The `herd` command: `serve` one server, bring a whole herd `up`, or explain itself.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use herd::config::Config;
use herd::peer::Secret;
use herd::server::Server;

/// What `herd --help` prints: every command, option, signal, variable and exit code.
const USAGE: &str = "\
herd: a proxy herd of location servers (UCLA CS131 protocol)

Usage:
  herd serve NAME [--config PATH] [--admin HOST:PORT]
                                    run the server NAME of the configuration
  herd up [--config PATH]           run every server of the configuration on this machine,
                                    until Ctrl-C or SIGTERM (SIGHUP, SIGUSR1: passed on)
  herd status [--config PATH]       ask every server of the configuration how it is; exit 0
                                    when all are up and every store agrees
  herd iamat SERVER CLIENT LOCATION  send IAMAT with the current time; print the reply
  herd whatsat SERVER CLIENT RADIUS BOUND
                                    send WHATSAT; print the reply
  herd send SERVER 'LINE'           send any line; print the reply
                                    (SERVER: a name in the configuration, or HOST:PORT)
  herd load --addr HOST:PORT [...]  generate load against any server of this protocol and
                                    print one line of JSON (herd load --help)
  herd trace-svg TRACE [-o FILE]    draw a saved trace as a sequence diagram
  herd --help | --version

Options:
  -c, --config PATH   the configuration (default: ./herd.toml, else herd.toml beside
                      this program)
  -t, --trace         serve, up: print on standard error what the loop does and what the
                      data does, line by line, time-stamped (up: merged in time order)
  --trace-svg FILE    up: also draw the trace as a sequence diagram when the herd stops
  --admin HOST:PORT   serve: the admin endpoint (/metrics, /healthz, /status), in place
                      of the configuration's; herd up gives each server one on a free port

Signals: SIGTERM, SIGINT stop (logs flushed, the store synced); SIGHUP opens the log file
again (logrotate's convention); SIGUSR1 writes the store to <log_dir>/<NAME>.store.

Environment:
  GOOGLE_PLACES_API_KEY   the Google Places API key for WHATSAT (or set places.key_file);
                          never taken from the command line
  HERD_SECRET             the herd secret peers authenticate with (or set secret_file);
                          herd up makes one for the herd it starts; empty counts as unset
  RUST_LOG                which diagnostics reach standard error (default: info; off, error,
                          warn silence the warnings); the log files are not affected

Exit codes: 0 stopped by SIGTERM or SIGINT, or a command that succeeded; 1 run-time failure
(herd status: a server down or the stores differ); 2 bad command line or configuration (the
message names the problem).
See README.md for the protocol, the configuration keys and the logs.";

/// A failure and the exit code it ends the program with.
struct Failure(u8, String);

/// A bad command line or configuration: exit code 2, as [`USAGE`] promises.
fn usage(message: impl Into<String>) -> Failure {
    Failure(2, message.into())
}

/// Runs the command line; a failure is printed as `herd: MESSAGE` on standard error, and
/// ends the program with its exit code.
fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, message)) => {
            // Not `eprintln!`, which panics when standard error cannot be written (closed, or
            // a file past the process's size limit): the exit code must still say why.
            let _ = writeln!(std::io::stderr(), "herd: {message}");
            ExitCode::from(code)
        }
    }
}

/// Runs the command that `args` (the command line without the program's name) asks for.
fn run(args: Vec<String>) -> Result<(), Failure> {
    // `herd load` has many options of its own, which the parser below would refuse as unknown:
    // it parses its arguments itself.
    if args.first().map(String::as_str) == Some("load") {
        init_logging(false);
        return load(&args[1..]);
    }
    let mut opts = getopts::Options::new();
    opts.optopt("c", "config", "configuration file", "PATH");
    opts.optflag("h", "help", "explain the commands");
    opts.optflag("V", "version", "print the version");
    opts.optflag("t", "trace", "print what the loop does, turn by turn");
    opts.optopt(
        "",
        "trace-svg",
        "up: draw the trace as a sequence diagram",
        "FILE",
    );
    opts.optopt("o", "output", "trace-svg: where the drawing goes", "FILE");
    opts.optopt("", "admin", "serve: the admin endpoint's HOST:PORT", "ADDR");
    let matches = opts
        .parse(&args)
        .map_err(|e| usage(format!("{e} (see herd --help)")))?;
    let trace = matches.opt_present("trace");
    init_logging(trace);
    if matches.opt_present("help") {
        println!("{USAGE}");
        return Ok(());
    }
    if matches.opt_present("version") {
        println!("herd {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    // The client commands need no configuration when given HOST:PORT.
    let found = config_path(matches.opt_str("config"));
    let config_path = found.as_ref().ok().cloned();
    let load = || -> Result<(PathBuf, Config), Failure> {
        let path = config_path.clone().ok_or_else(|| usage(NO_CONFIG))?;
        let config = Config::load(&path).map_err(usage)?;
        Ok((path, config))
    };
    match matches.free.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", name] => {
            let (_, mut config) = load()?;
            let key = api_key(&config).map_err(usage)?;
            let secret = herd_secret(&config).map_err(usage)?;
            // Before `bind`, which may start the fsync helper: `mallopt` must come before any
            // thread does.
            let descriptors = raise_descriptor_limit();
            fit_connections_to(descriptors, &mut config, name).map_err(usage)?;
            keep_freed_heap();
            let admin = matches.opt_str("admin");
            let mut server =
                Server::bind(&config, name, key, secret, admin.as_deref()).map_err(usage)?;
            server.run().map_err(|e| Failure(1, e))
        }
        ["up"] => {
            let (config_path, config) = load()?;
            let tracing = herd::tools::up::Tracing {
                on: trace,
                svg: matches.opt_str("trace-svg").map(PathBuf::from),
            };
            match herd::tools::up::run(&config_path, &config, &tracing) {
                Ok(0) => Ok(()),
                Ok(code) => Err(Failure(code as u8, "the herd stopped with an error".into())),
                Err(e) => Err(Failure(1, e)),
            }
        }
        ["iamat", server, client, location] => talk(
            server,
            &herd::tools::client::iamat_line(client, location),
            &config_path,
        ),
        ["whatsat", server, client, radius, bound] => talk(
            server,
            &format!("WHATSAT {client} {radius} {bound}"),
            &config_path,
        ),
        ["send", server, line] => talk(server, line, &config_path),
        ["trace-svg", trace] => trace_svg(trace, matches.opt_str("output")),
        ["status"] => {
            let (_, config) = load()?;
            match herd::tools::status::run(&config).map_err(usage)? {
                0 => Ok(()),
                code => Err(Failure(
                    code as u8,
                    "not every server is up and agreeing".into(),
                )),
            }
        }
        ["serve"] => Err(usage(
            "serve needs the NAME of a server of the configuration: herd serve NAME",
        )),
        [] => Err(usage("no command given (see herd --help)")),
        _ => Err(usage(format!(
            "unknown command line {:?} (see herd --help)",
            matches.free.join(" ")
        ))),
    }
}

/// `herd trace-svg TRACE [-o FILE]`: a saved trace drawn as a sequence diagram, into `FILE`
/// (default: the trace's name with `.svg`).
fn trace_svg(trace: &str, output: Option<String>) -> Result<(), Failure> {
    let text = std::fs::read_to_string(trace).map_err(|e| usage(format!("{trace}: {e}")))?;
    let output = output.map_or_else(|| Path::new(trace).with_extension("svg"), PathBuf::from);
    std::fs::write(&output, herd::tools::trace_svg::draw(&text))
        .map_err(|e| Failure(1, format!("cannot write {}: {e}", output.display())))?;
    println!("{}", output.display());
    Ok(())
}

/// Sends one line to `server` (a name in the configuration, or HOST:PORT) and prints the
/// reply exactly as it came.
fn talk(server: &str, line: &str, config_path: &Option<PathBuf>) -> Result<(), Failure> {
    let config = match config_path {
        Some(path) => Some(Config::load(path).map_err(usage)?),
        None => None,
    };
    let addr = herd::tools::client::server_address(server, config.as_ref()).map_err(usage)?;
    let reply = herd::tools::client::exchange(addr, line).map_err(|e| Failure(1, e))?;
    // Every line but a blank one is owed a reply (docs/protocol.md section 2).
    if reply.is_empty() && !line.trim().is_empty() {
        return Err(Failure(
            1,
            format!("{addr} closed the connection without a reply"),
        ));
    }
    std::io::stdout()
        .write_all(&reply)
        .and_then(|()| std::io::stdout().flush())
        .map_err(|e| Failure(1, format!("cannot print the reply: {e}")))
}

/// Diagnostics on standard error (`RUST_LOG`, default info); with `--trace`, the loop's trace
/// too, one plain line per step.
fn init_logging(trace: bool) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if trace {
        builder.filter_module(herd::trace::TARGET, log::LevelFilter::Trace);
    }
    builder.format(|out, record| {
        if record.target() == herd::trace::TARGET {
            writeln!(out, "{}", record.args())
        } else {
            writeln!(
                out,
                "[{} {}] {}",
                record.level(),
                record.target(),
                record.args()
            )
        }
    });
    builder.init();
}

/// `herd load`: its own options, one line of JSON on standard output.
fn load(args: &[String]) -> Result<(), Failure> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{}", herd::tools::load::USAGE);
        return Ok(());
    }
    let opts = herd::tools::load::parse_args(args).map_err(usage)?;
    raise_descriptor_limit(); // every connection of the load is one
    let report = herd::tools::load::run(&opts).map_err(|e| Failure(1, e))?;
    println!("{}", report.to_json());
    Ok(())
}

/// What a command that needs the configuration says when none was found.
const NO_CONFIG: &str = "no herd.toml here or beside the program: give --config PATH";

/// `--config`, else `./herd.toml`, else `herd.toml` beside the program.
fn config_path(given: Option<String>) -> Result<PathBuf, Failure> {
    if let Some(path) = given {
        return Ok(PathBuf::from(path));
    }
    let here = Path::new("herd.toml");
    if here.exists() {
        return Ok(here.to_path_buf());
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("herd.toml")));
    match beside {
        Some(path) if path.exists() => Ok(path),
        _ => Err(usage(
            "no herd.toml here or beside the program: give --config PATH",
        )),
    }
}

/// The key from `GOOGLE_PLACES_API_KEY`, else from `places.key_file`; `None` if neither is set.
/// Never from the command line, which any user of the machine can read (`ps`).
fn api_key(config: &Config) -> Result<Option<String>, String> {
    if let Some(key) = std::env::var("GOOGLE_PLACES_API_KEY")
        .ok()
        .filter(|k| !k.trim().is_empty())
    {
        return check_key(key.trim().to_owned()).map(Some);
    }
    let Some(path) = &config.places.key_file else {
        return Ok(None);
    };
    let key = read_owner_only(path, "places.key_file")?;
    check_key(key.trim().to_owned()).map(Some)
}

/// The herd secret from `HERD_SECRET`, else from `secret_file`; `None` if neither is set (then
/// peers identify by their greeting alone). A `HERD_SECRET` that is set but empty counts as not
/// set, here as in `herd up`.
fn herd_secret(config: &Config) -> Result<Option<Secret>, String> {
    let text = match herd::peer::secret_from_env() {
        Some(text) => text,
        None => match &config.secret_file {
            Some(path) => read_owner_only(path, "secret_file")?,
            None => return Ok(None),
        },
    };
    let text = text.trim();
    herd::peer::check_secret(text)?;
    Ok(Some(Secret::new(text.as_bytes())))
}

/// The text of `path` (the configuration's `key`: `secret_file` or `places.key_file`), which
/// only its owner may read: like ssh with a private key, a secret others can read is refused
/// rather than used.
fn read_owner_only(path: &Path, key: &str) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("{key} {shown}: {e}"))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{key} {shown} can be read or written by others (mode {:o}): chmod 600 it",
            mode & 0o777
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("{key} {shown}: {e}"))
}

/// A key goes into a request line and a header: it must be one printable token. Neither `&`
/// nor `#` either, which in a query string would start another parameter or a fragment.
fn check_key(key: String) -> Result<String, String> {
    if key
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'&' && b != b'#')
    {
        Ok(key)
    } else {
        Err("the Places API key has characters an API key cannot have".into())
    }
}

/// Lifts the soft limit on open descriptors to the hard limit: every client is one. Returns
/// the limit now in force, if there is one.
fn raise_descriptor_limit() -> Option<u64> {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max && libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
        (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
    }
}

/// Lowers `max_connections` to what `descriptors` leave for clients, as Redis lowers its
/// `maxclients`, saying so once: a client past the descriptors would wait in the kernel's
/// queue, unanswered, where one past `max_connections` is told `? server busy`. The server's
/// own descriptors come first: standard I/O, the poll, its waker and signal pipe, the
/// listeners, the admin endpoint's 8, the log and the store's files, two links and two kept
/// places per neighbour, and the Places pool.
fn fit_connections_to(
    descriptors: Option<u64>,
    config: &mut Config,
    name: &str,
) -> Result<(), String> {
    let Some(descriptors) = descriptors else {
        return Ok(());
    };
    let neighbours = config.server(name)?.neighbors.len();
    let own = 32 + 4 * neighbours + config.places.pool_size;
    let room = usize::try_from(descriptors)
        .unwrap_or(usize::MAX)
        .saturating_sub(own);
    let wanted = config.limits.max_connections;
    if room == 0 {
        return Err(format!(
            "the descriptor limit ({descriptors}) leaves no room for a client: raise it (ulimit -n, LimitNOFILE)"
        ));
    }
    if wanted > room {
        log::warn!(
            "the descriptor limit ({descriptors}) leaves room for {room} clients: max_connections lowered from {wanted} to {room} (raise it with ulimit -n or LimitNOFILE)"
        );
        config.limits.max_connections = room;
    }
    Ok(())
}

/// Keeps up to 8 MiB of freed memory at the top of the heap for reuse instead of handing it
/// back to the kernel (glibc; other C libraries keep their own policy). A WHATSAT's buffers
/// (Google's body, its TLS records, the cut reply, the log line) add up to more than glibc's
/// default trim threshold of 128 KiB, so with the default every WHATSAT grew the heap with
/// `brk`, faulted the new pages in zeroed, and shrank it again at the frees: 11% of a server's
/// time under WHATSAT load. Setting it also fixes glibc's mmap threshold at its 128 KiB
/// default: a single allocation that large is mapped and unmapped on its own, as before.
fn keep_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of the allocator, before any thread is started.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}
