//! `weighted-random-picker`: endpoints sampled with probability proportional to their
//! score, without replacement.
//!
//! ## Rule
//!
//! Weighted reservoir sampling (Efraimidis–Spirakis, as the reference): each candidate with
//! score `s > 0` draws `u ~ U(0, 1]` and gets the key `u^(1/s)`; candidates with `s ≤ 0` get
//! key 0. The `maxNumOfEndpoints` largest keys are returned, largest first. For a single
//! pick, `P(e) = s(e) / Σ s`. When every score is ≤ 0 the choice is uniform (as
//! `random-picker`).
//!
//! Implementation: the keys are compared as `ln(u) / s` (a monotone transform of
//! `u^(1/s)`: one logarithm instead of a power per candidate), and a single pick uses the
//! equivalent roulette wheel (one random number and a running sum).
//!
//! ## Parameters
//!
//! * `maxNumOfEndpoints` (integer, default `1`): endpoints returned; ≤ 0 falls back to 1.

use std::cell::RefCell;
use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::plugin::{Picked, Picker, SchedulingContext, ScoredEndpoint};
use llmsched_core::registry::{FactoryInput, PluginError};

use super::PickerParams;
use super::random_picker::sample_front;
use crate::common::{impl_plugin, params, random_unit};

/// Type name.
pub const TYPE: &str = "weighted-random-picker";

/// The weighted random picker.
#[derive(Debug, Clone)]
pub struct WeightedRandomPicker {
    name: String,
    max_num: usize,
}

impl WeightedRandomPicker {
    /// A picker returning up to `max_num` endpoints.
    pub fn new(name: impl Into<String>, max_num: usize) -> Self {
        Self {
            name: name.into(),
            max_num: max_num.max(1),
        }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let p: PickerParams = params(i.parameters)?;
    Ok(Arc::new(WeightedRandomPicker::new(i.name, p.count(TYPE))))
}

impl_plugin!(WeightedRandomPicker, TYPE, as_picker => Picker);

/// `ln(u^(1/s))` for `u ~ U(0, 1]`; `-∞` for non-positive scores (always last).
fn log_key(score: f64) -> f64 {
    if score > 0.0 {
        // `1 − u` lies in (0, 1], so the logarithm is finite.
        (1.0 - random_unit()).ln() / score
    } else {
        f64::NEG_INFINITY
    }
}

thread_local! {
    /// (key, index) scratch reused across calls.
    static KEYS: RefCell<Vec<(f64, u32)>> = const { RefCell::new(Vec::new()) };
}

impl Picker for WeightedRandomPicker {
    fn pick<'a>(
        &self,
        _cx: &SchedulingContext<'_>,
        scored: &mut [ScoredEndpoint<'a>],
    ) -> Picked<'a> {
        let n = self.max_num.min(scored.len());
        if n == 0 {
            return Picked::new();
        }
        if !scored.iter().any(|s| s.score > 0.0) {
            sample_front(scored, n);
            return scored[..n].iter().map(|s| s.endpoint).collect();
        }
        if n == 1 {
            // Roulette wheel: P(e) = s(e) / Σ s, the distribution of the largest key.
            let total: f64 = scored.iter().map(|s| s.score.max(0.0)).sum();
            let mut r = random_unit() * total;
            let mut last = 0;
            for (i, s) in scored.iter().enumerate() {
                if s.score > 0.0 {
                    last = i;
                    if r < s.score {
                        break;
                    }
                    r -= s.score;
                }
            }
            let mut out = Picked::new();
            out.push(scored[last].endpoint);
            return out;
        }
        KEYS.with(|keys| {
            let mut keys = keys.borrow_mut();
            keys.clear();
            keys.extend(
                scored
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (log_key(s.score), u32::try_from(i).unwrap_or(u32::MAX))),
            );
            let desc = |a: &(f64, u32), b: &(f64, u32)| b.0.total_cmp(&a.0);
            if n < keys.len() {
                keys.select_nth_unstable_by(n - 1, desc);
            }
            keys[..n].sort_unstable_by(desc);
            keys[..n]
                .iter()
                .map(|&(_, i)| scored[i as usize].endpoint)
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use crate::picker::testutil::*;

    #[test]
    fn probability_proportional_to_score() {
        // Scores 3 : 1 : 0 → P = 0.75, 0.25, 0. With 20,000 draws the standard error of the
        // first frequency is 0.003; the bound 0.02 is ~6 standard errors.
        let p = build(TYPE, None).unwrap();
        let eps = endpoints(3);
        let mut counts = [0u32; 3];
        let n = 20_000;
        for _ in 0..n {
            counts[pick(&p, &eps, &[3.0, 1.0, 0.0])[0] as usize] += 1;
        }
        let f0 = f64::from(counts[0]) / f64::from(n);
        assert!((f0 - 0.75).abs() < 0.02, "{counts:?}");
        assert_eq!(counts[2], 0);
    }

    #[test]
    fn without_replacement_and_zero_scores_last() {
        let p = build(TYPE, Some(serde_json::json!({"maxNumOfEndpoints": 3}))).unwrap();
        let eps = endpoints(4);
        for _ in 0..500 {
            let got = pick(&p, &eps, &[1.0, 2.0, 0.0, 0.5]);
            assert_eq!(got.len(), 3);
            // The zero-score endpoint has key 0 and can only come after the three positive.
            assert!(!got.contains(&2), "{got:?}");
        }
        // Second position frequencies: with scores 1:1 for two endpoints the first is
        // uniform between them.
        let mut first = [0u32; 2];
        let p2 = build(TYPE, Some(serde_json::json!({"maxNumOfEndpoints": 2}))).unwrap();
        for _ in 0..4000 {
            let got = pick(&p2, &eps[..2], &[1.0, 1.0]);
            assert_eq!(got.len(), 2);
            first[got[0] as usize] += 1;
        }
        assert!((1700..=2300).contains(&first[0]), "{first:?}");
    }

    #[test]
    fn several_picks_follow_the_key_distribution() {
        // Two picks from scores 3 : 1 : 0: the first position is the single-pick
        // distribution (3/4 vs 1/4) and the zero score comes last.
        let p = build(TYPE, Some(serde_json::json!({"maxNumOfEndpoints": 3}))).unwrap();
        let eps = endpoints(3);
        let n = 20_000;
        let mut first0 = 0u32;
        for _ in 0..n {
            let got = pick(&p, &eps, &[3.0, 1.0, 0.0]);
            assert_eq!(got[2], 2);
            if got[0] == 0 {
                first0 += 1;
            }
        }
        let f = f64::from(first0) / f64::from(n);
        assert!((f - 0.75).abs() < 0.02, "{f}");
    }

    #[test]
    fn all_zero_scores_are_uniform() {
        let p = build(TYPE, None).unwrap();
        let eps = endpoints(3);
        let mut counts = [0u32; 3];
        for _ in 0..3000 {
            counts[pick(&p, &eps, &[0.0, 0.0, 0.0])[0] as usize] += 1;
        }
        for c in counts {
            assert!((800..=1200).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn parameters() {
        let p = build(TYPE, Some(serde_json::json!({"maxNumOfEndpoints": 0}))).unwrap();
        assert_eq!(pick(&p, &endpoints(3), &[1.0, 1.0, 1.0]).len(), 1);
        assert!(build_err(TYPE, serde_json::json!({"x": 1})).contains("unknown field"));
        assert!(
            build_err(TYPE, serde_json::json!({"maxNumOfEndpoints": [1]})).contains("invalid type")
        );
    }
}
