//! Files and configurations: the bench's temporary directories, the herds' shapes
//! (topologies), free ports, the `herd.toml` every server of a run reads, where the servers log,
//! and the Google Places sample answers the fake serves.

use std::fmt::Write as _;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::fake_places::FakePlaces;

pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh directory under the system temporary directory, removed with its contents when
/// dropped.
pub struct TempDir {
    pub path: PathBuf,
}

static TEMP_DIRS: AtomicUsize = AtomicUsize::new(0);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = TEMP_DIRS.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("herd-bench-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path); // a leftover of a recycled pid
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A herd's shape: each server's name and the servers it talks with (docs/protocol.md section 1).
pub type Topology = &'static [(&'static str, &'static [&'static str])];

/// One server, no neighbours: nothing but the protocol, the store and the log.
pub const LONE: Topology = &[("Bailey", &[])];

/// The course's herd from 2023 on. Jaquez is two hops from Bailey.
pub const HERD_2023: Topology = &[
    ("Bailey", &["Bona", "Campbell"]),
    ("Bona", &["Bailey", "Campbell", "Clark"]),
    ("Campbell", &["Bailey", "Bona", "Jaquez"]),
    ("Clark", &["Bona", "Jaquez"]),
    ("Jaquez", &["Campbell", "Clark"]),
];

/// An earlier year's herd. Hands is three hops from Welsh (Welsh-Holiday-Goloman-Hands).
pub const HERD_GOLOMAN: Topology = &[
    ("Goloman", &["Hands", "Holiday", "Wilkes"]),
    ("Hands", &["Goloman", "Wilkes"]),
    ("Holiday", &["Goloman", "Welsh", "Wilkes"]),
    ("Welsh", &["Holiday"]),
    ("Wilkes", &["Goloman", "Hands", "Holiday"]),
];

/// Ports that were free a moment ago: `n` listeners bound at once (so they differ), then
/// closed. Another process could take one in between; a bench accepts that small risk.
pub fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| format!("cannot bind 127.0.0.1:0: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| e.to_string())
}

/// Where the servers of a run keep their store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// In memory only (`data_dir = ""`): every comparison row, since the prototypes keep no
    /// store on disk. Like with like.
    Memory,
    /// On disk under `data` in the run's directory, with this `[store] fsync` policy
    /// (`"always"`, `"everysec"` or `"no"`): the herd only.
    Disk(&'static str),
}

/// What a run's configuration says beyond the herd's shape: the store, the per-turn budget,
/// and the limits the bench's own loads would otherwise cross.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub store: Store,
    /// The herd's per-connection budget per turn as it ships (`turn_lines`, `turn_read_bytes`
    /// at their defaults), or off (both 0).
    pub budget: bool,
    /// `max_clients`: at least the memory scenario's stored clients, with room for markers.
    pub max_clients: u64,
}

/// The data directory of a run on disk, in the run's directory.
pub const DATA_DIR: &str = "data";

/// Writes `<dir>/herd.toml`: logs in `<dir>/logs`, the store as `settings` say, every server on
/// 127.0.0.1 at its port, the fake as Places when there is one, and the limits. The bench's
/// loads come from one address (`max_connections_per_address = 0`: the memory scenario alone
/// holds 10,000 idle connections from 127.0.0.1) and store up to a million clients. The
/// prototypes ignore the keys they do not know.
pub fn write_config(
    dir: &TempDir,
    topology: Topology,
    ports: &[u16],
    places: Option<&FakePlaces>,
    settings: &Settings,
) -> Result<PathBuf, String> {
    let mut text = format!("# Written by benches/herd.\nlog_dir = \"{LOG_DIR}\"\n");
    match settings.store {
        Store::Memory => text.push_str("data_dir = \"\"\n"),
        Store::Disk(fsync) => {
            let _ = write!(
                text,
                "data_dir = \"{DATA_DIR}\"\n\n[store]\nfsync = \"{fsync}\"\n"
            );
        }
    }
    for ((name, neighbours), port) in topology.iter().zip(ports) {
        let neighbours: Vec<String> = neighbours.iter().map(|n| format!("\"{n}\"")).collect();
        let _ = write!(
            text,
            "\n[[server]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\n\
             neighbors = [{}]\n",
            neighbours.join(", ")
        );
    }
    if let Some(fake) = places {
        text.push('\n');
        text.push_str(&fake.places_toml("legacy", 5000));
    }
    let _ = write!(
        text,
        "\n[limits]\nmax_connections_per_address = 0\nmax_clients = {}\n",
        settings.max_clients
    );
    if !settings.budget {
        text.push_str("turn_lines = 0\nturn_read_bytes = 0\n");
    }
    let path = dir.join("herd.toml");
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

/// The servers' log directory, in the cluster's directory.
const LOG_DIR: &str = "logs";

/// Where the servers of a cluster log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logs {
    /// Files in the cluster's directory, as a herd runs.
    Files,
    /// `/dev/null`: every line is still formatted and written, but the kernel keeps nothing.
    Discarded,
}

/// Makes each server's log file a link to `/dev/null` before the servers open it for appending.
pub fn discard_logs(dir: &TempDir, topology: Topology) -> Result<(), String> {
    let logs = dir.join(LOG_DIR);
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
    for (name, _) in topology {
        let path = logs.join(format!("{name}.log"));
        std::os::unix::fs::symlink("/dev/null", &path)
            .map_err(|e| format!("cannot link {} to /dev/null: {e}", path.display()))?;
    }
    Ok(())
}

/// A Google Places sample answer of `tests/data/places`.
pub fn fixture(name: &str) -> Result<Vec<u8>, String> {
    let path = manifest_dir().join("tests/data/places").join(name);
    std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target"))
}
