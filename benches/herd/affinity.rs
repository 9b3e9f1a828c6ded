//! Where processes run: the servers on one CPU, the load generators, the probes and the fake
//! Places on another, so that client work never steals the server's core.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::thread;

/// Where processes run: servers on one CPU, everything that makes load on another.
#[derive(Clone, Copy)]
pub struct Cpus {
    pub server: Option<usize>,
    pub client: Option<usize>,
}

impl Cpus {
    pub fn detect() -> Cpus {
        let n = thread::available_parallelism().map_or(1, |n| n.get());
        if n >= 2 {
            Cpus {
                server: Some(0),
                client: Some(1),
            }
        } else {
            Cpus {
                server: None,
                client: None,
            }
        }
    }

    pub fn describe(&self) -> String {
        match (self.server, self.client) {
            (Some(s), Some(c)) => format!(
                "servers pinned to CPU {s}; load generators, probes and the fake Places to CPU {c}"
            ),
            _ => "one CPU: nothing pinned, servers and load share it".to_string(),
        }
    }
}

/// Restricts the calling process to one CPU.
pub fn set_affinity(cpu: usize) -> io::Result<()> {
    // SAFETY: all-zero is a valid (empty) `cpu_set_t`; CPU_SET writes inside the set it is
    // given, and sched_setaffinity only reads `size_of::<cpu_set_t>()` bytes of it.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes `command` start on `cpu` (the same as prefixing `taskset -c CPU`, without the extra
/// exec that would count in start-up times).
pub fn pin(command: &mut Command, cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        // SAFETY: the closure runs in the child between fork and exec, where only
        // async-signal-safe work is allowed: set_affinity makes one system call and allocates
        // nothing (a failure is an OS error code, not a boxed error).
        unsafe {
            command.pre_exec(move || set_affinity(cpu));
        }
    }
}
