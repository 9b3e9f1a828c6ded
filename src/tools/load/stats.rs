//! The figures of a load: the latency histogram, the tallies, and the report printed as one
//! line of JSON.

use std::time::{Duration, Instant};

/// At or above this share of its one core, the generator is the limit, not the server.
pub(super) const CLIENT_BOUND_PERCENT: f64 = 90.0;

/// Latencies in nanoseconds, kept the way HdrHistogram keeps them: exact below 256 ns, then 128
/// buckets per power of two, so every value is known to within 1/128 (0.8%). Recording is an
/// increment; the whole thing is 30 KB however long the run.
pub(super) struct Histogram {
    pub(super) counts: Vec<u64>,
    pub(super) total: u64,
    pub(super) max_ns: u64,
}

/// log2 of the buckets per power of two.
pub(super) const SUB_BUCKET_BITS: u32 = 7;
/// Longer latencies are counted in the last bucket (the maximum stays exact).
pub(super) const MAX_TRACKED_NS: u64 = 60_000_000_000;

impl Histogram {
    /// An empty histogram, its buckets all made at once.
    pub(super) fn new() -> Histogram {
        Histogram {
            counts: vec![0; bucket_of(MAX_TRACKED_NS) + 1],
            total: 0,
            max_ns: 0,
        }
    }

    /// Counts one latency: an index computation and an increment.
    pub(super) fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(ns.min(MAX_TRACKED_NS))] += 1;
        self.total += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    /// The latency that `quantile` (0 to 1) of the values are at or below, in nanoseconds: the
    /// middle of its bucket, never above the maximum seen; the top rank is the maximum itself.
    /// 0 when nothing was recorded.
    pub(super) fn quantile_ns(&self, quantile: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((quantile * self.total as f64).ceil() as u64).clamp(1, self.total);
        if rank == self.total {
            return self.max_ns;
        }
        let mut seen = 0;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let (low, width) = bucket_range(index);
                return (low + width / 2).min(self.max_ns);
            }
        }
        self.max_ns
    }
}

/// The bucket of `ns`. Below `2 << SUB_BUCKET_BITS` a bucket holds one value; above, the top
/// `SUB_BUCKET_BITS + 1` bits of the value pick the bucket within its power of two.
pub(super) fn bucket_of(ns: u64) -> usize {
    let top_bit = 63 - ns.max(1).leading_zeros();
    if top_bit < SUB_BUCKET_BITS {
        return ns as usize;
    }
    let shift = top_bit - SUB_BUCKET_BITS;
    let power = shift + 1;
    ((power as usize) << SUB_BUCKET_BITS) + ((ns >> shift) as usize - (1 << SUB_BUCKET_BITS))
}

/// The lowest value of bucket `index` and how many values it holds.
pub(super) fn bucket_range(index: usize) -> (u64, u64) {
    let power = (index >> SUB_BUCKET_BITS) as u32;
    let sub = (index & ((1 << SUB_BUCKET_BITS) - 1)) as u64;
    if power == 0 {
        return (index as u64, 1);
    }
    let shift = power - 1;
    (((1 << SUB_BUCKET_BITS) + sub) << shift, 1 << shift)
}

/// The figures of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    /// Valid replies completed in the measured window.
    pub requests: u64,
    /// Commands without a valid reply, warm-up and drain included: errors are never hidden.
    pub errors: u64,
    /// Length of the measured window.
    pub seconds: f64,
    /// `requests` over `seconds`.
    pub per_second: f64,
    /// The median latency, in microseconds: from handing a command to the socket to parsing
    /// its whole reply (the connect included, one-shot), over the window's valid replies.
    pub p50_us: f64,
    /// The 90th percentile latency, in microseconds, within 1/128 ([`Histogram`]).
    pub p90_us: f64,
    /// The 99th percentile latency, in microseconds.
    pub p99_us: f64,
    /// The 99.9th percentile latency, in microseconds.
    pub p999_us: f64,
    /// The slowest valid reply in the window, in microseconds, exact.
    pub max_us: f64,
    /// The generator's own user and system CPU time over the window.
    pub cpu_seconds: f64,
    /// `cpu_seconds` over `seconds`, as a percentage of one core.
    pub cpu_percent: f64,
    /// The generator used 90% or more of its one core: the rate is its limit, not the server's.
    pub client_bound: bool,
    /// What the first error was, with the reply quoted if there was one; later errors are
    /// only counted.
    pub first_error: Option<String>,
}

impl LoadReport {
    /// One line of JSON, the figures rounded to what they can claim.
    pub fn to_json(&self) -> String {
        let round = |x: f64, places: i32| {
            let scale = 10f64.powi(places);
            (x * scale).round() / scale
        };
        serde_json::json!({
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "per_second": round(self.per_second, 1),
            "p50_us": round(self.p50_us, 1),
            "p90_us": round(self.p90_us, 1),
            "p99_us": round(self.p99_us, 1),
            "p999_us": round(self.p999_us, 1),
            "max_us": round(self.max_us, 1),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "cpu_percent": round(self.cpu_percent, 1),
            "client_bound": self.client_bound,
            "first_error": self.first_error,
        })
        .to_string()
    }
}

/// What the run has counted so far.
pub(super) struct Tally {
    /// Latencies of the valid replies completed in the measured window.
    pub(super) latency: Histogram,
    /// Valid replies completed in the measured window.
    pub(super) requests: u64,
    /// Replies parsed, valid or not, in any phase: priming watches it to see the server answer.
    pub(super) answered: u64,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    /// Commands sent and not yet answered, over all connections.
    pub(super) outstanding: usize,
}

impl Tally {
    /// Counts `count` errors; `why` is only called for the first.
    pub(super) fn error(&mut self, count: usize, why: impl FnOnce() -> String) {
        self.errors += count as u64;
        if self.first_error.is_none() {
            self.first_error = Some(why());
        }
    }

    /// The report of a run whose measured window was `window`.
    pub(super) fn report(&self, window: Measured) -> LoadReport {
        let us = |quantile: f64| self.latency.quantile_ns(quantile) as f64 / 1000.0;
        let per_second = |x: f64| match window.seconds > 0.0 {
            true => x / window.seconds,
            false => 0.0,
        };
        let cpu_percent = per_second(window.cpu_seconds) * 100.0;
        LoadReport {
            requests: self.requests,
            errors: self.errors,
            seconds: window.seconds,
            per_second: per_second(self.requests as f64),
            p50_us: us(0.5),
            p90_us: us(0.9),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: self.latency.max_ns as f64 / 1000.0,
            cpu_seconds: window.cpu_seconds,
            cpu_percent,
            client_bound: cpu_percent >= CLIENT_BOUND_PERCENT,
            first_error: self.first_error.clone(),
        }
    }
}

/// The measured window, once closed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Measured {
    pub(super) seconds: f64,
    pub(super) cpu_seconds: f64,
}

impl Measured {
    /// Closes a window opened at `from`, when the generator's CPU time was `cpu_from`.
    pub(super) fn close(from: Instant, cpu_from: Duration, now: Instant) -> Measured {
        Measured {
            seconds: now.saturating_duration_since(from).as_secs_f64(),
            cpu_seconds: cpu_time().saturating_sub(cpu_from).as_secs_f64(),
        }
    }
}

/// The generator's user and system CPU time so far: its thread's where the system counts
/// threads apart (Linux), so that a generator run inside a larger program counts its own.
pub(super) fn cpu_time() -> Duration {
    #[cfg(target_os = "linux")]
    const WHO: libc::c_int = libc::RUSAGE_THREAD;
    #[cfg(not(target_os = "linux"))]
    const WHO: libc::c_int = libc::RUSAGE_SELF;
    // SAFETY: getrusage only writes the struct passed in, which is plain integers.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(WHO, &mut usage) != 0 {
            return Duration::ZERO;
        }
        usage
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_is_exact_when_small_and_within_one_percent_above() {
        for ns in [
            0,
            1,
            127,
            128,
            255,
            256,
            257,
            1_000,
            123_456_789,
            MAX_TRACKED_NS,
        ] {
            let (low, width) = bucket_range(bucket_of(ns));
            assert!(low <= ns && ns < low + width, "{ns}: {low} + {width}");
            assert!(
                width == 1 || (width as f64) / (low as f64) <= 1.0 / 128.0,
                "{ns}"
            );
        }
        let mut h = Histogram::new();
        assert_eq!(h.quantile_ns(0.5), 0);
        for ns in 1..=100 {
            h.record(Duration::from_nanos(ns));
        }
        assert_eq!(h.quantile_ns(0.5), 50);
        assert_eq!(h.quantile_ns(0.99), 99);
        assert_eq!(h.quantile_ns(1.0), 100);

        let mut h = Histogram::new();
        for us in 1..=10_000 {
            h.record(Duration::from_micros(us));
        }
        for (quantile, exact) in [(0.5, 5_000_000.0), (0.9, 9_000_000.0), (0.999, 9_990_000.0)] {
            let got = h.quantile_ns(quantile) as f64;
            assert!((got - exact).abs() / exact < 0.01, "{quantile}: {got}");
        }
        assert_eq!(h.quantile_ns(1.0), 10_000_000);
        h.record(Duration::from_secs(100));
        assert_eq!(h.max_ns, 100_000_000_000);
        assert_eq!(h.quantile_ns(1.0), 100_000_000_000);
    }

    #[test]
    fn the_report_is_one_line_of_json() {
        let report = LoadReport {
            requests: 1000,
            errors: 1,
            seconds: 1.00049,
            per_second: 999.5101,
            p50_us: 12.3456,
            p90_us: 20.0,
            p99_us: 40.0,
            p999_us: 80.0,
            max_us: 100.0,
            cpu_seconds: 0.95,
            cpu_percent: 95.0,
            client_bound: true,
            first_error: Some("the \"server\" said ?".into()),
        };
        let json = report.to_json();
        assert!(!json.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["requests"], 1000);
        assert_eq!(value["p50_us"], 12.3);
        assert_eq!(value["per_second"], 999.5);
        assert_eq!(value["client_bound"], true);
        assert_eq!(value["first_error"], "the \"server\" said ?");
    }
}
