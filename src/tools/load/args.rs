//! `herd load`'s command line: its options, their defaults and limits, and `--help`.

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Client ids are a prefix and a number: `load-0`, `load-1`, ... unless `--id-prefix` says.
pub(super) const CLIENT_PREFIX: &str = "load-";

/// What `herd load` was asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// The server to load (`--addr`), resolved once, IPv4 first.
    pub addr: SocketAddr,
    /// Connections open at once (one-shot: connections under way at once).
    pub connections: usize,
    /// Commands each pipelined connection keeps outstanding.
    pub in_flight: usize,
    /// Length of the measured window.
    pub duration: Duration,
    /// Load before the window opens, not counted.
    pub warmup: Duration,
    /// Which commands make up the load (`--mix`).
    pub mix: Mix,
    /// One command per connection, as the course's test clients send them.
    pub one_shot: bool,
    /// Distinct client ids, `load-0` to `load-<clients - 1>`.
    pub clients: usize,
    /// WHATSAT radius, sent byte for byte as given.
    pub radius_km: String,
    /// WHATSAT bound.
    pub bound: usize,
    /// Client ids are this prefix and a number.
    pub id_prefix: String,
    /// Commands per second across all connections, sent on schedule whatever the replies do
    /// (open loop); `None`: as fast as the connections' in-flight limits allow.
    pub rate: Option<f64>,
    /// Stop after this many load commands (the window closes when all are answered).
    pub requests: Option<u64>,
    /// Loopback source addresses connections are spread over, from 127.0.0.2 up; 1: the
    /// kernel's choice. See [`Sources`].
    pub sources: usize,
}

/// Which commands make up the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// IAMAT only: the store and the flood, no Places.
    Iamat,
    /// WHATSAT only, about clients primed first: the Places path (or the server's answer
    /// without a key).
    Whatsat,
    /// This many WHATSAT in every hundred commands, evenly spread; IAMAT for the rest.
    Mixed {
        /// 0 to 100.
        whatsat_percent: u8,
    },
}

/// The help text of `herd load`.
pub const USAGE: &str = "\
herd load: generate load against a server of the proxy herd protocol and print one line of JSON

Usage:
  herd load --addr HOST:PORT [options]

Options:
  --addr HOST:PORT       the server to load (required)
  -c, --connections N    connections open at once (default 50)
  -p, --in-flight N      commands each connection keeps outstanding, pipelined (default 1)
  -d, --duration-ms MS   length of the measured window (default 5000)
  --warmup-ms MS         load before the window opens, not counted (default 500)
  --mix KIND             iamat, whatsat, or mixed:N for N% WHATSAT (default iamat)
  --one-shot             one command per connection, as the course's test clients do:
                         connect, send, half-close, read to the end, close
  --clients N            distinct client ids load-0 .. load-(N-1) (default 10000, or 1000
                         when the mix has WHATSAT: each id is sent one IAMAT before the load
                         starts, so that every WHATSAT asks about a known client)
  --radius KM            WHATSAT radius, sent as given (default 10)
  --bound N              WHATSAT bound (default 5)
  --rate N               send N commands per second in all, on schedule whatever the replies
                         do (open loop), as long as -c × -p allow: a command due when all
                         are outstanding waits for a reply; default: as fast as -c and -p allow
  --requests N           stop after N load commands; the window closes when all are answered
  --id-prefix TEXT       client ids are TEXT0, TEXT1, ... (default load-)
  --sources N            connect from N loopback addresses, 127.0.0.2 and up, in turn
                         (Linux, a server on 127.x.x.x; default 1: the kernel chooses). Each
                         address has its own ephemeral ports, so a long --one-shot run does
                         not run out of ports that are not in TIME_WAIT

Every reply is checked against the command it answers. The JSON says:
  requests, per_second   valid replies completed in the measured window, and their rate
  p50_us .. max_us       latency, from handing a command to the socket to parsing its whole
                         reply (with --one-shot, the connect is included)
  errors, first_error    commands without a valid reply (a ? reply, a mismatch, a lost
                         connection, a reply still missing 2 s after the end), warm-up included
  cpu_seconds, cpu_percent
                         this generator's own CPU time over the window, and its share of a core
  client_bound           true when cpu_percent is 90 or more: the generator's one core is
                         saturated, so the rate is the generator's limit, not the server's";

/// Parses the arguments that follow `herd load`.
pub fn parse_args(args: &[String]) -> Result<LoadOptions, String> {
    let mut opts = getopts::Options::new();
    opts.optopt("", "addr", "the server to load", "HOST:PORT");
    opts.optopt("c", "connections", "connections open at once", "N");
    opts.optopt("p", "in-flight", "commands outstanding per connection", "N");
    opts.optopt("d", "duration-ms", "length of the measured window", "MS");
    opts.optopt("", "warmup-ms", "load before the window opens", "MS");
    opts.optopt("", "mix", "iamat, whatsat or mixed:N", "KIND");
    opts.optflag("", "one-shot", "one command per connection");
    opts.optopt("", "clients", "distinct client ids", "N");
    opts.optopt("", "radius", "WHATSAT radius", "KM");
    opts.optopt("", "bound", "WHATSAT bound", "N");
    opts.optopt("", "rate", "commands per second in all", "N");
    opts.optopt("", "requests", "stop after this many commands", "N");
    opts.optopt("", "id-prefix", "what client ids start with", "TEXT");
    opts.optopt("", "sources", "loopback source addresses", "N");
    let m = opts
        .parse(args)
        .map_err(|e| format!("{e} (see herd load --help)"))?;
    if let Some(extra) = m.free.first() {
        return Err(format!(
            "unexpected argument {extra:?} (see herd load --help)"
        ));
    }
    let number = |name: &str, default: usize| -> Result<usize, String> {
        match m.opt_str(name) {
            None => Ok(default),
            Some(text) => text
                .parse()
                .map_err(|_| format!("--{name} {text:?}: not a whole number")),
        }
    };
    let positive = |name: &str, default: usize| -> Result<usize, String> {
        match number(name, default)? {
            0 => Err(format!("--{name} must be at least 1")),
            n => Ok(n),
        }
    };
    let addr = m
        .opt_str("addr")
        .ok_or("--addr HOST:PORT is required (see herd load --help)")?;
    let mix = match m.opt_str("mix") {
        None => Mix::Iamat,
        Some(text) => parse_mix(&text)?,
    };
    let in_flight = positive("in-flight", 1)?;
    let one_shot = m.opt_present("one-shot");
    if one_shot && in_flight > 1 {
        return Err(
            "--in-flight is for pipelined connections: --one-shot sends one command \
                    per connection (use -c for more at once)"
                .into(),
        );
    }
    // WHATSAT asks about known clients only, and each must be sent an IAMAT first.
    let default_clients = if mix == Mix::Iamat { 10_000 } else { 1_000 };
    let radius_km = m.opt_str("radius").unwrap_or_else(|| "10".into());
    if radius_km.is_empty() || radius_km.bytes().any(crate::protocol::is_space) {
        // A space would add a field and turn every WHATSAT into a `?`.
        return Err(format!("--radius {radius_km:?}: one field, no white space"));
    }
    let id_prefix = m
        .opt_str("id-prefix")
        .unwrap_or_else(|| CLIENT_PREFIX.into());
    if id_prefix.bytes().any(crate::protocol::is_space) {
        return Err(format!("--id-prefix {id_prefix:?}: no white space"));
    }
    let addr = resolve(&addr)?;
    let sources = positive("sources", 1)?;
    if sources > 1 {
        Sources::check(sources, addr)?;
    }
    Ok(LoadOptions {
        addr,
        connections: positive("connections", 50)?,
        in_flight,
        duration: Duration::from_millis(positive("duration-ms", 5000)? as u64),
        warmup: Duration::from_millis(number("warmup-ms", 500)? as u64),
        mix,
        one_shot,
        clients: positive("clients", default_clients)?,
        radius_km,
        bound: number("bound", 5)?,
        id_prefix,
        rate: match m.opt_str("rate") {
            None => None,
            Some(text) => match text.parse::<f64>() {
                Ok(rate) if rate > 0.0 && rate.is_finite() => Some(rate),
                _ => {
                    return Err(format!(
                        "--rate {text:?}: a number of commands per second above 0"
                    ))
                }
            },
        },
        requests: match m.opt_str("requests") {
            None => None,
            Some(_) => Some(positive("requests", 1)? as u64),
        },
        sources,
    })
}

/// `iamat`, `whatsat` or `mixed:N`.
pub(super) fn parse_mix(text: &str) -> Result<Mix, String> {
    match text {
        "iamat" => Ok(Mix::Iamat),
        "whatsat" => Ok(Mix::Whatsat),
        _ => match text.strip_prefix("mixed:").map(str::parse::<u8>) {
            Some(Ok(whatsat_percent)) if whatsat_percent <= 100 => {
                Ok(Mix::Mixed { whatsat_percent })
            }
            _ => Err(format!(
                "--mix {text:?}: expected iamat, whatsat or mixed:N with N from 0 to 100"
            )),
        },
    }
}

/// Resolves `HOST:PORT`, preferring IPv4: `localhost` often resolves to `::1` first, and the
/// herd listens on `127.0.0.1` by default. Before the loop starts, so blocking is allowed.
pub(super) fn resolve(text: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("--addr {text:?}: {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("--addr {text:?}: no address"))
}

/// The source addresses connections take in turn (`--sources`).
///
/// A client that closes first keeps each connection's port in TIME_WAIT for a minute, and one
/// source address has about 28,000 ephemeral ports: a one-shot run soon has every `connect()`
/// searching the port range for one the kernel may recycle, and the generator's core, not the
/// server, sets the rate. The whole of 127.0.0.0/8 is loopback on Linux, and each address has
/// its own ports.
pub(super) struct Sources {
    pub(super) addrs: Vec<Ipv4Addr>,
    pub(super) next: usize,
}

impl Sources {
    /// The most `--sources` may ask for: 127.0.0.2 to 127.0.0.254.
    pub(super) const MAX: usize = 253;

    /// `count` addresses from 127.0.0.2 up, at most [`Sources::MAX`]; none for 0 or 1 (the
    /// kernel chooses).
    pub(super) fn new(count: usize) -> Sources {
        let addrs = match count {
            0 | 1 => Vec::new(),
            n => (0..n.min(Sources::MAX))
                .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8))
                .collect(),
        };
        Sources { addrs, next: 0 }
    }

    /// Whether `count` sources can be used to reach `addr`.
    pub(super) fn check(count: usize, addr: SocketAddr) -> Result<(), String> {
        if !cfg!(target_os = "linux") {
            return Err(
                "--sources: binding to a loopback address per connection needs Linux".into(),
            );
        }
        if count > Sources::MAX {
            return Err(format!("--sources {count}: at most {}", Sources::MAX));
        }
        match addr {
            SocketAddr::V4(v4) if v4.ip().is_loopback() => Ok(()),
            _ => Err(format!(
                "--sources: the server must be at an IPv4 loopback address, not {addr}"
            )),
        }
    }

    /// The address for the next connection; `None`: the kernel's choice.
    pub(super) fn next(&mut self) -> Option<Ipv4Addr> {
        let addr = *self.addrs.get(self.next)?;
        self.next = (self.next + 1) % self.addrs.len();
        Some(addr)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn arguments_have_defaults_and_limits() {
        let opts = parse_args(&args("--addr 127.0.0.1:10000")).unwrap();
        assert_eq!(
            opts,
            LoadOptions {
                addr: "127.0.0.1:10000".parse().unwrap(),
                connections: 50,
                in_flight: 1,
                duration: Duration::from_millis(5000),
                warmup: Duration::from_millis(500),
                mix: Mix::Iamat,
                one_shot: false,
                clients: 10_000,
                radius_km: "10".into(),
                bound: 5,
                id_prefix: CLIENT_PREFIX.into(),
                rate: None,
                requests: None,
                sources: 1,
            }
        );
        let opts = parse_args(&args(
            "--addr localhost:10001 -c 8 -p 32 -d 100 --warmup-ms 0 --mix mixed:10 --radius 2.5 --bound 20",
        ))
        .unwrap();
        assert_eq!(opts.addr, "127.0.0.1:10001".parse().unwrap());
        assert_eq!((opts.connections, opts.in_flight), (8, 32));
        assert_eq!(
            (opts.duration, opts.warmup),
            (Duration::from_millis(100), Duration::ZERO)
        );
        assert_eq!(
            opts.mix,
            Mix::Mixed {
                whatsat_percent: 10
            }
        );
        assert_eq!(
            (opts.clients, opts.radius_km.as_str(), opts.bound),
            (1000, "2.5", 20)
        );
        let opts = parse_args(&args(
            "--addr 127.0.0.1:1 --mix whatsat --clients 7 --one-shot",
        ))
        .unwrap();
        assert_eq!(
            (opts.mix, opts.clients, opts.one_shot),
            (Mix::Whatsat, 7, true)
        );
        for bad in [
            "",
            "--addr 127.0.0.1:1 -c 0",
            "--addr 127.0.0.1:1 -p x",
            "--addr 127.0.0.1:1 --mix mixed:101",
            "--addr 127.0.0.1:1 --mix sometimes",
            "--addr 127.0.0.1:1 --one-shot -p 2",
            "--addr 127.0.0.1:1 extra",
            "--addr nowhere",
            "--addr 127.0.0.1:1 --frobnicate",
            "--addr 127.0.0.1:1 --sources 0",
            "--addr 127.0.0.1:1 --sources 254",
            "--addr [::1]:1 --sources 2",
        ] {
            assert!(parse_args(&args(bad)).is_err(), "{bad}");
        }
    }
}
