//! Arrival schedules, as inference-perf's load timers produce them.
//!
//! All offsets are in seconds from the stage start, in the config's (unscaled) time; the
//! runner divides them by the time scale.
//!
//! * `constant` (`ConstantLoadTimer`): `n = int(rate × duration)` gaps drawn from an
//!   exponential distribution and rescaled so that they sum to `duration`; request `k` is sent
//!   at the sum of the first `k + 1` gaps (the last one exactly at `duration`). "Constant" is
//!   the average rate, not even spacing.
//! * `poisson` (`PoissonLoadTimer`): time is cut into 1-s windows; each window draws
//!   `k ~ Poisson(rate)`; an empty window is skipped; otherwise its `k` requests are spread over
//!   the window like a constant timer with rate `k` and duration 1. The stage sends exactly
//!   `int(rate × duration)` requests (inference-perf enqueues that many and takes their times
//!   from the timer), so it can end a little before or after `duration`.
//! * `concurrent`: inference-perf turns a stage into a constant timer with
//!   `rate = num_requests`, `duration = 1` (everything is released within the first second)
//!   and caps requests in flight at `concurrency_level`.

use rand::Rng;
use rand_distr::{Distribution as _, Exp1, Poisson};

use crate::config::{LoadStage, LoadType};

/// Request send offsets of one stage, in seconds from its start (non-decreasing).
pub fn stage_offsets(kind: LoadType, stage: &LoadStage, rng: &mut impl Rng) -> Vec<f64> {
    match (*stage, kind) {
        (LoadStage::Concurrent { num_requests, .. }, _) => {
            constant_offsets(num_requests, 1.0, 0.0, rng)
        }
        (LoadStage::Rate { rate, .. }, LoadType::Poisson) => {
            poisson_offsets(rate, stage.num_requests(), rng)
        }
        (LoadStage::Rate { duration, .. }, _) => {
            constant_offsets(stage.num_requests(), duration, 0.0, rng)
        }
    }
}

/// `n` times in `(start, start + duration]`: exponential gaps normalized to sum to `duration`.
pub fn constant_offsets(n: u64, duration: f64, start: f64, rng: &mut impl Rng) -> Vec<f64> {
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    if n == 0 {
        return Vec::new();
    }
    let gaps: Vec<f64> = (0..n).map(|_| Exp1.sample(rng)).collect();
    let total: f64 = gaps.iter().sum();
    let scale = if total > 0.0 { duration / total } else { 0.0 };
    let mut t = start;
    let mut out = Vec::with_capacity(n);
    for (i, g) in gaps.iter().enumerate() {
        t += g * scale;
        // Pin the last one to the window end, free of rounding drift.
        out.push(if i + 1 == n { start + duration } else { t });
    }
    out
}

/// The first `n` arrivals of inference-perf's windowed Poisson process with rate `rate`.
pub fn poisson_offsets(rate: f64, n: u64, rng: &mut impl Rng) -> Vec<f64> {
    let n_usize = usize::try_from(n).unwrap_or(usize::MAX);
    let mut out = Vec::with_capacity(n_usize);
    let Ok(poisson) = Poisson::new(rate) else {
        return out;
    };
    let mut window_start = 0.0;
    while out.len() < n_usize {
        let k_f: f64 = poisson.sample(rng);
        // A Poisson sample is a non-negative integer-valued float.
        let k = k_f as u64;
        if k > 0 {
            for t in constant_offsets(k, 1.0, window_start, rng) {
                if out.len() == n_usize {
                    break;
                }
                out.push(t);
            }
        }
        window_start += 1.0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn constant_spreads_n_requests_ending_at_duration() {
        let mut rng = StdRng::seed_from_u64(1);
        let stage = LoadStage::Rate {
            rate: 2.5,
            duration: 4.0,
        };
        let t = stage_offsets(LoadType::Constant, &stage, &mut rng);
        assert_eq!(t.len(), 10);
        assert!(t.windows(2).all(|w| w[0] <= w[1]));
        assert!(t[0] > 0.0);
        assert_eq!(*t.last().expect("last"), 4.0);
    }

    #[test]
    fn truncates_rate_times_duration() {
        let mut rng = StdRng::seed_from_u64(1);
        let stage = LoadStage::Rate {
            rate: 0.7,
            duration: 2.0,
        };
        assert_eq!(stage_offsets(LoadType::Constant, &stage, &mut rng).len(), 1);
        assert_eq!(stage_offsets(LoadType::Poisson, &stage, &mut rng).len(), 1);
    }

    #[test]
    fn poisson_windows_end_on_whole_seconds_and_average_the_rate() {
        let mut rng = StdRng::seed_from_u64(9);
        let t = poisson_offsets(20.0, 20_000, &mut rng);
        assert_eq!(t.len(), 20_000);
        assert!(t.windows(2).all(|w| w[0] <= w[1]));
        // Every non-empty window's last request is at its end (an integer second).
        let mut per_window = std::collections::BTreeMap::<u64, Vec<f64>>::new();
        for &x in &t {
            // A request exactly at the end of window w belongs to w (offsets are in (w, w+1]).
            let w = (x.ceil() as u64).saturating_sub(1);
            per_window.entry(w).or_default().push(x);
        }
        let last_window = *per_window.keys().last().expect("windows");
        for (w, xs) in &per_window {
            if *w != last_window {
                assert_eq!(*xs.last().expect("x"), (*w + 1) as f64);
            }
        }
        // 20,000 requests at 20/s take about 1,000 windows.
        let span = t.last().expect("last") - t[0];
        assert!((950.0..1050.0).contains(&span), "span {span}");
    }

    #[test]
    fn concurrent_releases_everything_within_one_second() {
        let mut rng = StdRng::seed_from_u64(2);
        let stage = LoadStage::Concurrent {
            num_requests: 50,
            concurrency: 4,
        };
        let t = stage_offsets(LoadType::Concurrent, &stage, &mut rng);
        assert_eq!(t.len(), 50);
        assert!(t.iter().all(|&x| x > 0.0 && x <= 1.0));
    }
}
