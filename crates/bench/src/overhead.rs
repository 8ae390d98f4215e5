//! The load generator's own cost.
//!
//! The generator runs on one dedicated OS thread (a single-threaded tokio runtime), so its CPU
//! time is that thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`, nanosecond resolution) read at the
//! start and end of the load phase. A simulator or scheduler running in the same process on
//! other threads is not counted. On platforms without a thread CPU clock the CPU figures are
//! absent.

use serde::{Deserialize, Serialize};

/// CPU time of the calling thread in seconds, if the platform exposes it.
#[cfg(unix)]
pub fn thread_cpu_seconds() -> Option<f64> {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Some(t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9)
}

/// CPU time of the calling thread in seconds, if the platform exposes it.
#[cfg(not(unix))]
pub fn thread_cpu_seconds() -> Option<f64> {
    None
}

/// What generating the load cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GeneratorOverhead {
    /// CPU seconds used by the generator thread during the load phase.
    pub cpu_seconds: Option<f64>,
    /// Wall-clock seconds of the load phase.
    pub wall_seconds: f64,
    /// Requests completed (successes and failures).
    pub requests: u64,
    /// Content chunks received.
    pub chunks: u64,
    /// Most requests in flight at once (open streams).
    pub max_in_flight: u64,
    /// `cpu_seconds / wall_seconds`: the share of one core the generator used.
    pub cpu_utilization: Option<f64>,
    /// CPU milliseconds per request.
    pub cpu_ms_per_request: Option<f64>,
    /// CPU seconds per 1,000 requests.
    pub cpu_seconds_per_1k_requests: Option<f64>,
    /// CPU microseconds per received chunk.
    pub cpu_us_per_chunk: Option<f64>,
    /// How late requests were sent relative to their schedule, in wall-clock milliseconds
    /// (dispatcher lateness, excluding waits for an in-flight limit or a multi-turn session):
    /// 99th percentile.
    pub dispatch_lag_p99_ms: f64,
    /// Same, maximum.
    pub dispatch_lag_max_ms: f64,
}

impl GeneratorOverhead {
    /// Fills the derived ratios.
    pub fn finish(
        cpu_seconds: Option<f64>,
        wall_seconds: f64,
        requests: u64,
        chunks: u64,
        max_in_flight: u64,
        mut lags_ms: Vec<f64>,
    ) -> Self {
        lags_ms.sort_by(f64::total_cmp);
        let p99 = if lags_ms.is_empty() {
            0.0
        } else {
            crate::metrics::percentile_sorted(&lags_ms, 99.0)
        };
        let max = lags_ms.last().copied().unwrap_or(0.0);
        let per = |den: u64, mul: f64| {
            cpu_seconds
                .filter(|_| den > 0)
                .map(|c| c * mul / den as f64)
        };
        Self {
            cpu_seconds,
            wall_seconds,
            requests,
            chunks,
            max_in_flight,
            cpu_utilization: cpu_seconds
                .filter(|_| wall_seconds > 0.0)
                .map(|c| c / wall_seconds),
            cpu_ms_per_request: per(requests, 1e3),
            cpu_seconds_per_1k_requests: per(requests, 1e3),
            cpu_us_per_chunk: per(chunks, 1e6),
            dispatch_lag_p99_ms: p99,
            dispatch_lag_max_ms: max,
        }
    }

    /// One line for the terminal.
    pub fn describe(&self) -> String {
        let cpu = match (self.cpu_seconds, self.cpu_utilization) {
            (Some(c), Some(u)) => format!("{c:.3} CPU-s ({:.1}% of one core)", u * 100.0),
            _ => "CPU time unavailable on this platform".to_owned(),
        };
        let per = match (self.cpu_seconds_per_1k_requests, self.cpu_us_per_chunk) {
            (Some(r), Some(c)) => format!(", {r:.3} CPU-s per 1k requests, {c:.2} µs per chunk"),
            (Some(r), None) => format!(", {r:.3} CPU-s per 1k requests"),
            _ => String::new(),
        };
        format!(
            "generator overhead: {cpu}{per}; max {} streams in flight; dispatch lag p99 {:.2} ms, max {:.2} ms",
            self.max_in_flight, self.dispatch_lag_p99_ms, self.dispatch_lag_max_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_derived_from_totals() {
        let o = GeneratorOverhead::finish(Some(2.0), 8.0, 4000, 400_000, 123, vec![1.0, 3.0, 2.0]);
        assert_eq!(o.cpu_utilization, Some(0.25));
        assert_eq!(o.cpu_ms_per_request, Some(0.5));
        assert_eq!(o.cpu_seconds_per_1k_requests, Some(0.5));
        assert_eq!(o.cpu_us_per_chunk, Some(5.0));
        assert_eq!(o.dispatch_lag_max_ms, 3.0);
        let none = GeneratorOverhead::finish(None, 1.0, 0, 0, 0, Vec::new());
        assert_eq!(none.cpu_ms_per_request, None);
        assert!(none.describe().contains("unavailable"));
    }

    #[test]
    fn thread_cpu_time_advances_with_work() {
        let Some(a) = thread_cpu_seconds() else {
            return; // no thread CPU clock on this platform
        };
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        let b = thread_cpu_seconds().expect("still readable");
        assert!(b > a);
    }
}
