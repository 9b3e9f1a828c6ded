//! The implementations the bench compares, and how each starts a server: the same arguments
//! (`NAME --config PATH`) and the same ready line for all of them.

use std::fmt;
use std::path::Path;
use std::process::Command;

use crate::config::manifest_dir;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    /// The Rust server, `herd serve`.
    Herd,
    /// The Python asyncio prototype.
    Prototype,
}

impl Impl {
    /// In the order every alternation runs them.
    pub const BOTH: [Impl; 2] = [Impl::Herd, Impl::Prototype];

    /// The command that runs server `name` of `config` (same arguments, same ready line).
    pub fn serve_command(self, name: &str, config: &Path) -> Command {
        let mut command = match self {
            Impl::Herd => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_herd"));
                c.arg("serve");
                c
            }
            Impl::Prototype => {
                let mut c = Command::new("python3");
                c.arg(manifest_dir().join("benches/prototype/herd_prototype.py"));
                c
            }
        };
        command.arg(name).arg("--config").arg(config);
        command
    }
}

impl fmt::Display for Impl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Impl::Herd => "herd",
            Impl::Prototype => "prototype",
        })
    }
}
