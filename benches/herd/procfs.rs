//! What `/proc` tells of the servers and the machine: resident size, open descriptors, CPU
//! time (and what else ran on a server's CPU), and the sockets in TIME_WAIT.

use std::time::Instant;

/// Other processes' share of the servers' CPU above which a run counts as disturbed. Below
/// it, it is the kernel's own work (timers, network softirqs in process context).
pub const OTHER_WORK_PERCENT: f64 = 10.0;

/// Resident set size of process `pid`, in bytes (`VmRSS`).
pub fn rss_bytes(pid: u32) -> Result<f64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in {path}"))?;
    Ok(kib * 1024.0)
}

/// How many file descriptors process `pid` has open.
pub fn open_fds(pid: u32) -> Result<usize, String> {
    let path = format!("/proc/{pid}/fd");
    std::fs::read_dir(&path)
        .map(|dir| dir.count())
        .map_err(|e| format!("cannot list {path}: {e}"))
}

/// How many TCP sockets of this machine are in TIME_WAIT (state 06 of /proc/net/tcp).
pub fn time_wait_sockets() -> Option<usize> {
    let mut count = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).ok()?;
        count += text
            .lines()
            .skip(1)
            .filter(|line| line.split_whitespace().nth(3) == Some("06"))
            .count();
    }
    Some(count)
}

/// CPU time (user and system) process `pid` has used so far, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    cpu_split(pid).map(|[user, system]| user + system)
}

/// CPU time process `pid` has used so far, in seconds: `[user, system]`.
pub fn cpu_split(pid: u32) -> Option<[f64; 2]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which is in parentheses and may hold spaces, the fields go on
    // from the third: utime and stime are the 14th and 15th.
    let (_, fields) = stat.rsplit_once(')')?;
    let mut fields = fields.split_whitespace().skip(11);
    let mut seconds = || Some(fields.next()?.parse::<f64>().ok()? / ticks_per_second());
    Some([seconds()?, seconds()?])
}

/// Busy time (user, nice and system; not interrupts) of one CPU so far, in clock ticks.
fn cpu_busy_ticks(cpu: usize) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&format!("cpu{cpu}")))?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(3)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    Some(fields.iter().sum())
}

/// The share of one core a process used over a stretch of time, and what else ran on its CPU.
#[derive(Clone, Copy, Debug)]
pub struct CpuShare {
    /// Percent of one core the process used.
    pub process: f64,
    /// Percent of the process's CPU that other processes used: on a CPU the bench keeps for its
    /// servers, that is someone else's work (this machine may be shared), and a figure of that
    /// run is lower than it should be.
    pub others: Option<f64>,
}

/// Measures a process's [`CpuShare`]: tells whether the server was the limit of a run, or
/// something else (the client, the round trips to Places, another tenant of the machine) was.
pub struct CpuMeter {
    pub pid: u32,
    /// The CPU the process is pinned to, if it is.
    pub cpu: Option<usize>,
    process_seconds: Option<f64>,
    cpu_ticks: Option<f64>,
    pub since: Instant,
}

/// The kernel's CPU clock ticks per second.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

impl CpuMeter {
    pub fn start(pid: u32, cpu: Option<usize>) -> CpuMeter {
        CpuMeter {
            pid,
            cpu,
            process_seconds: cpu_seconds(pid),
            cpu_ticks: cpu.and_then(cpu_busy_ticks),
            since: Instant::now(),
        }
    }

    /// The share since the start; `None` over less than a few of the kernel's CPU clock ticks
    /// (10 ms each), which would make it mostly rounding.
    pub fn read(&self) -> Option<CpuShare> {
        let elapsed = self.since.elapsed().as_secs_f64();
        if elapsed < 0.1 {
            return None;
        }
        let used = cpu_seconds(self.pid)? - self.process_seconds?;
        let others = self.cpu.and_then(|cpu| {
            let busy = (cpu_busy_ticks(cpu)? - self.cpu_ticks?) / ticks_per_second();
            Some((100.0 * (busy - used) / elapsed).max(0.0))
        });
        Some(CpuShare {
            process: 100.0 * used / elapsed,
            others,
        })
    }
}
