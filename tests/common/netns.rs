//! Hosts for tests that cross a real network: one Linux network namespace per host, each with
//! its own address, joined through veth pairs to a bridge that lives in a namespace of its own.
//! Servers run inside their host's namespace (`ip netns exec`), so neighbours dial each other at
//! real addresses, never over loopback, and a host can be cut off silently: its port leaves the
//! bridge, and every packet to or from it is dropped with no reset and no FIN, as in a
//! partition between machines; or its cable can be unplugged ([`Net::unplug`]), which the host
//! itself notices and the others do not. The neighbours' link-layer addresses are written in as permanent
//! entries, so that a cut host's packets are dropped on the wire rather than failing address
//! resolution.
//!
//! Everything is named `herd-t-<pid>-<tag>-...` and is removed when the [`Net`] is dropped, also
//! while a failed test unwinds. A watcher process, started first, removes it too if the test
//! process dies without unwinding (killed, or interrupted with Ctrl-C), and then exits. Only
//! namespaces of this naming whose process is gone are ever removed by anyone else's start.
//!
//! Creating namespaces needs root. Where it fails, [`Net::new`] says why; [`Net::or_skip`] then
//! skips the test with that reason printed, unless `HERD_REQUIRE_NETNS` is set (as CI sets it),
//! where it fails the test instead: a test that cannot run there must not pass.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The subnet every test network uses: the namespaces keep it apart from anything else.
const SUBNET: [u8; 3] = [10, 131, 0];

/// One host: its namespace and address, and its port on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// The network namespace the host's processes run in.
    pub ns: String,
    pub addr: Ipv4Addr,
    /// The veth end on the bridge's side (in the bridge's namespace).
    port: String,
}

impl Host {
    /// Moves the calling thread into this host's namespace until the guard is dropped (see
    /// [`Net::enter`]); for threads that outlive a borrow of the [`Net`].
    pub fn enter(&self) -> Entered {
        Entered::new(&self.ns)
    }
}

/// A network of hosts on one bridge, removed when dropped.
pub struct Net {
    /// The namespace that holds the bridges.
    bridge_ns: String,
    pub hosts: Vec<Host>,
    /// Each host's link-layer address, in the order of `hosts`.
    macs: Vec<String>,
    /// Removes everything if this process dies first.
    watcher: Option<Child>,
}

/// Runs `ip` with `args`; the error names the command and what `ip` said.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether process `pid` is alive.
fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Kills whatever runs in namespace `ns`, then removes it (and with it its interfaces).
fn remove_namespace(ns: &str) {
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    let _ = ip(&["netns", "del", ns]);
}

/// Removes the namespaces of this naming left by test processes that no longer run.
fn remove_leftovers() {
    let Ok(list) = ip(&["netns", "list"]) else {
        return;
    };
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = ns.strip_prefix("herd-t-") else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !alive(pid)) {
            remove_namespace(ns);
        }
    }
}

impl Net {
    /// Hosts named `names` on one bridge, at 10.131.0.1, .2, ... in order. `tag` names the test.
    pub fn new(tag: &str, names: &[&str]) -> Result<Net, String> {
        if names.len() > 200 {
            return Err("at most 200 hosts".into());
        }
        remove_leftovers();
        let prefix = format!("herd-t-{}-{tag}", std::process::id());
        let mut net = Net {
            bridge_ns: format!("{prefix}-br"),
            hosts: Vec::new(),
            macs: Vec::new(),
            watcher: None,
        };
        let namespaces: Vec<String> = std::iter::once(net.bridge_ns.clone())
            .chain(names.iter().map(|n| format!("{prefix}-{n}")))
            .collect();
        net.watcher = Some(watcher(&namespaces)?);
        net.build(names, &namespaces[1..])?;
        Ok(net)
    }

    /// Like [`Net::new`], but where namespaces cannot be made, `None` after saying why, unless
    /// `HERD_REQUIRE_NETNS` is set: then the test fails.
    pub fn or_skip(tag: &str, names: &[&str]) -> Option<Net> {
        match Net::new(tag, names) {
            Ok(net) => Some(net),
            Err(why) if std::env::var_os("HERD_REQUIRE_NETNS").is_some() => {
                panic!("cannot create the test's network namespaces: {why}")
            }
            Err(why) => {
                eprintln!("SKIPPED: cannot create network namespaces ({why}); run as root");
                None
            }
        }
    }

    fn build(&mut self, names: &[&str], namespaces: &[String]) -> Result<(), String> {
        let br = self.bridge_ns.clone();
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        for bridge in ["br0", "br1"] {
            ip(&["-n", &br, "link", "add", bridge, "type", "bridge"])?;
            ip(&["-n", &br, "link", "set", bridge, "up"])?;
        }
        for (i, (name, ns)) in names.iter().zip(namespaces).enumerate() {
            let port = format!("p{i}");
            let addr = Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], i as u8 + 1);
            ip(&["netns", "add", ns])?;
            ip(&[
                "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                ns,
            ])?;
            ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            self.hosts.push(Host {
                name: name.to_string(),
                ns: ns.clone(),
                addr,
                port,
            });
        }
        self.macs = self
            .hosts
            .iter()
            .map(|h| mac_of(&h.ns))
            .collect::<Result<_, _>>()?;
        for i in 0..self.hosts.len() {
            self.pin_neighbours(i)?;
        }
        Ok(())
    }

    /// Permanent neighbour entries in host `i` for every other host: a cut host's packets are
    /// then dropped on the wire, not refused for want of an address.
    fn pin_neighbours(&self, i: usize) -> Result<(), String> {
        let host = &self.hosts[i];
        for (other, mac) in self.hosts.iter().zip(&self.macs) {
            if other.ns != host.ns {
                let addr = other.addr.to_string();
                let args = ["neigh", "replace", &addr, "lladdr", mac, "dev", "eth0"];
                ip(&[&["-n", &host.ns][..], &args, &["nud", "permanent"]].concat())?;
            }
        }
        Ok(())
    }

    /// Unplugs `name`'s cable: its interface goes down. The host itself knows (its connects fail
    /// at once: no route); the others hear nothing, no reset and no FIN.
    pub fn unplug(&self, name: &str) {
        ip(&["-n", &self.host(name).ns, "link", "set", "eth0", "down"])
            .unwrap_or_else(|e| panic!("cannot unplug {name}: {e}"));
    }

    /// Plugs `name`'s cable back in.
    pub fn plug(&self, name: &str) {
        let i = (self.hosts.iter().position(|h| h.name == name))
            .unwrap_or_else(|| panic!("no host {name}"));
        ip(&["-n", &self.hosts[i].ns, "link", "set", "eth0", "up"])
            .and_then(|_| self.pin_neighbours(i))
            .unwrap_or_else(|e| panic!("cannot plug {name} back in: {e}"));
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Cuts `name` off silently: its bridge port leaves the bridge, and whatever it sends or is
    /// sent is dropped, with nothing said to either side.
    pub fn cut(&self, name: &str) {
        let port = &self.host(name).port;
        ip(&["-n", &self.bridge_ns, "link", "set", port, "nomaster"])
            .unwrap_or_else(|e| panic!("cannot cut {name}: {e}"));
    }

    /// Puts `name` back on the main bridge.
    pub fn heal(&self, name: &str) {
        let port = &self.host(name).port;
        ip(&["-n", &self.bridge_ns, "link", "set", port, "master", "br0"])
            .unwrap_or_else(|e| panic!("cannot heal {name}: {e}"));
    }

    /// Splits the bridge in two: `side` moves to a second bridge, where its hosts reach only
    /// each other. [`Net::heal`] on each, or [`Net::join`], puts them back.
    pub fn split(&self, side: &[&str]) {
        for name in side {
            let port = &self.host(name).port;
            ip(&["-n", &self.bridge_ns, "link", "set", port, "master", "br1"])
                .unwrap_or_else(|e| panic!("cannot move {name}: {e}"));
        }
    }

    /// Every host back on the main bridge.
    pub fn join(&self) {
        for host in &self.hosts {
            self.heal(&host.name);
        }
    }

    /// `command`, to be run inside host `name`'s namespace.
    pub fn command_in(&self, name: &str, command: &Command) -> Command {
        let mut inside = Command::new("ip");
        inside
            .args(["netns", "exec", &self.host(name).ns])
            .arg(command.get_program())
            .args(command.get_args());
        inside
    }

    /// Moves the calling thread into host `name`'s namespace until the guard is dropped: the
    /// sockets it makes meanwhile are that host's, and so are those of threads it starts.
    pub fn enter(&self, name: &str) -> Entered {
        Entered::new(&self.host(name).ns)
    }

    /// A TCP connection made from host `from` to `to`.
    pub fn connect(&self, from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
        let _inside = self.enter(from);
        TcpStream::connect_timeout(&to, Duration::from_secs(5))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for host in &self.hosts {
            remove_namespace(&host.ns);
        }
        remove_namespace(&self.bridge_ns);
        if let Some(mut watcher) = self.watcher.take() {
            let _ = watcher.kill();
            let _ = watcher.wait();
        }
    }
}

/// The link-layer address of `eth0` in namespace `ns`.
fn mac_of(ns: &str) -> Result<String, String> {
    let text = ip(&["-n", ns, "link", "show", "eth0"])?;
    text.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .map(str::to_owned)
        .ok_or_else(|| format!("no link-layer address for eth0 in {ns}: {text}"))
}

/// A shell that waits for this process to end, then removes `namespaces` (killing what runs in
/// them) and exits. In a process group of its own, so a terminal's Ctrl-C does not stop it.
fn watcher(namespaces: &[String]) -> Result<Child, String> {
    let script = "while kill -0 \"$1\" 2>/dev/null; do sleep 0.5; done; shift; \
                  for ns in \"$@\"; do ip netns pids \"$ns\" 2>/dev/null | xargs -r kill -9; \
                  ip netns del \"$ns\" 2>/dev/null; done";
    use std::os::unix::process::CommandExt;
    Command::new("sh")
        .args(["-c", script, "herd-netns-watcher"])
        .arg(std::process::id().to_string())
        .args(namespaces)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the namespaces' watcher: {e}"))
}

/// The calling thread inside another network namespace, until dropped.
pub struct Entered {
    home: std::fs::File,
}

impl Entered {
    fn new(ns: &str) -> Entered {
        let home = std::fs::File::open("/proc/thread-self/ns/net")
            .unwrap_or_else(|e| panic!("cannot open this thread's namespace: {e}"));
        let target = std::fs::File::open(format!("/var/run/netns/{ns}"))
            .unwrap_or_else(|e| panic!("cannot open namespace {ns}: {e}"));
        // SAFETY: setns(2) on descriptors this function owns; it changes only this thread.
        let done = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            done,
            0,
            "cannot enter namespace {ns}: {}",
            std::io::Error::last_os_error()
        );
        Entered { home }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        // SAFETY: as in `new`, back to the namespace the thread came from.
        unsafe {
            libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET);
        }
    }
}
