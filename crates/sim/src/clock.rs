//! The simulated clock and `--time-scale`.
//!
//! Simulated time is wall time multiplied by the time scale `F`: a step the model says takes
//! 20 ms lasts 20 ms / F on the wall clock. Everything the simulator *reports* — Prometheus
//! histograms, request timings — is in simulated seconds, so a run at `F = 10` reports the same
//! latencies as a run at `F = 1`, ten times sooner.
//!
//! Clients measure wall time. A load generator driving a simulator at scale `F` must therefore
//! (1) compress its own schedule by `F` (a 1 req/s Poisson stream becomes `F` req/s on the wall
//! clock) and (2) multiply the latencies it measures by `F`. `llmsched bench` is expected to do
//! both when given the same `--time-scale`.
//!
//! The engine keeps its own *virtual* timeline (see `engine.rs`): step `k + 1` starts exactly
//! when step `k` ends in simulated time, and the engine sleeps until the wall instant that
//! corresponds to that end. Timer jitter therefore never accumulates into the simulated
//! timeline; only a CPU that cannot keep up makes the simulation fall behind, which the engine
//! detects and reports as step lag.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Maps wall time to simulated seconds for one simulation (all replicas of a cluster share one).
#[derive(Debug, Clone, Copy)]
pub struct SimClock {
    origin: Instant,
    origin_unix: f64,
    scale: f64,
}

impl SimClock {
    /// A clock starting now, running `scale` times faster than the wall clock.
    pub fn new(scale: f64) -> Self {
        let origin_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Self {
            origin: Instant::now(),
            origin_unix,
            scale,
        }
    }

    /// The time scale `F`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Simulated seconds since the clock started.
    pub fn now(&self) -> f64 {
        self.origin.elapsed().as_secs_f64() * self.scale
    }

    /// The wall instant at which simulated time reaches `sim` seconds.
    pub fn wall_at(&self, sim: f64) -> Instant {
        self.origin + self.wall_duration(sim)
    }

    /// The wall duration of `sim` simulated seconds.
    pub fn wall_duration(&self, sim: f64) -> Duration {
        Duration::from_secs_f64((sim / self.scale).max(0.0))
    }

    /// Wall-clock Unix time in seconds (for `created` fields and event timestamps).
    pub fn unix_now(&self) -> f64 {
        self.origin_unix + self.origin.elapsed().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulated_durations_shrink_by_the_scale() {
        let c = SimClock::new(10.0);
        assert_eq!(c.wall_duration(1.0), Duration::from_millis(100));
        assert_eq!(c.wall_duration(-1.0), Duration::ZERO);
        assert_eq!(c.wall_at(2.0) - c.wall_at(1.0), Duration::from_millis(100));
        let t0 = c.now();
        std::thread::sleep(Duration::from_millis(20));
        // At least 20 ms of wall time passed, i.e. at least 0.2 simulated seconds.
        assert!(c.now() - t0 >= 0.2);
    }
}
