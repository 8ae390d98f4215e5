//! `max-score-picker`: the highest-scoring endpoints, ties broken at random.
//!
//! ## Rule
//!
//! Candidates ordered by total score, highest first; among equal scores the order is
//! uniformly random (the reference shuffles, then sorts stably). The first
//! `maxNumOfEndpoints` are returned: the first is the destination, the rest the fallbacks.
//!
//! Implementation: for one endpoint, a single pass keeping the best score and replacing the
//! kept endpoint by the `k`-th tie with probability `1/k` (reservoir sampling: uniform among
//! ties, no shuffle, no allocation). For several, a shuffle followed by a selection of the
//! top `n` and a sort of those `n` — any comparison-based ordering of a uniformly shuffled
//! input leaves equal elements in uniformly random order.
//!
//! ## Parameters
//!
//! * `maxNumOfEndpoints` (integer, default `1`): endpoints returned; ≤ 0 falls back to 1.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::plugin::{Picked, Picker, SchedulingContext, ScoredEndpoint};
use llmsched_core::registry::{FactoryInput, PluginError};
use rand::Rng;
use rand::seq::SliceRandom;

use super::PickerParams;
use crate::common::{impl_plugin, params, with_rng};

/// Type name.
pub const TYPE: &str = "max-score-picker";

/// The max-score picker.
#[derive(Debug, Clone)]
pub struct MaxScorePicker {
    name: String,
    max_num: usize,
}

impl MaxScorePicker {
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
    Ok(Arc::new(MaxScorePicker::new(i.name, p.count(TYPE))))
}

impl_plugin!(MaxScorePicker, TYPE, as_picker => Picker);

impl Picker for MaxScorePicker {
    fn pick<'a>(
        &self,
        _cx: &SchedulingContext<'_>,
        scored: &mut [ScoredEndpoint<'a>],
    ) -> Picked<'a> {
        let n = self.max_num.min(scored.len());
        let mut out = Picked::new();
        if n == 0 {
            return out;
        }
        if n == 1 {
            let mut best = 0;
            let mut ties = 1u32;
            for i in 1..scored.len() {
                let s = scored[i].score;
                let b = scored[best].score;
                if s > b {
                    best = i;
                    ties = 1;
                } else if s == b {
                    ties += 1;
                    if with_rng(|r| r.random_range(0..ties)) == 0 {
                        best = i;
                    }
                }
            }
            out.push(scored[best].endpoint);
            return out;
        }
        with_rng(|r| scored.shuffle(r));
        let by_score_desc =
            |a: &ScoredEndpoint<'_>, b: &ScoredEndpoint<'_>| b.score.total_cmp(&a.score);
        if n < scored.len() {
            scored.select_nth_unstable_by(n - 1, by_score_desc);
        }
        scored[..n].sort_unstable_by(by_score_desc);
        out.extend(scored[..n].iter().map(|s| s.endpoint));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use crate::picker::testutil::*;

    #[test]
    fn picks_the_highest_score() {
        let p = build(TYPE, None).unwrap();
        let eps = endpoints(4);
        assert_eq!(pick(&p, &eps, &[0.1, 2.5, 0.7, 2.4]), vec![1]);
        assert_eq!(pick(&p, &eps[..1], &[0.0]), vec![0]);
        assert!(pick(&p, &[], &[]).is_empty());
    }

    #[test]
    fn several_endpoints_best_first() {
        let p = build(TYPE, Some(serde_json::json!({"maxNumOfEndpoints": 3}))).unwrap();
        let eps = endpoints(5);
        assert_eq!(pick(&p, &eps, &[0.5, 0.9, 0.1, 0.7, 0.3]), vec![1, 3, 0]);
        // More requested than available: all of them, best first.
        let p = build(TYPE, Some(serde_json::json!({"maxNumOfEndpoints": 10}))).unwrap();
        assert_eq!(pick(&p, &eps[..3], &[0.2, 0.1, 0.3]), vec![2, 0, 1]);
    }

    #[test]
    fn ties_are_broken_uniformly_at_random() {
        // Endpoints 1..=3 tie at the top; endpoint 0 is worse. Over 3000 picks each tied
        // endpoint is chosen about 1000 times; a fixed tie-break would give one of them 3000.
        let p = build(TYPE, None).unwrap();
        let eps = endpoints(4);
        let mut counts = [0u32; 4];
        for _ in 0..3000 {
            counts[pick(&p, &eps, &[0.5, 1.0, 1.0, 1.0])[0] as usize] += 1;
        }
        assert_eq!(counts[0], 0);
        for c in &counts[1..] {
            assert!((800..=1200).contains(c), "{counts:?}");
        }
        // Same with several endpoints: the first position is uniform among the tied.
        let p = build(TYPE, Some(serde_json::json!({"maxNumOfEndpoints": 2}))).unwrap();
        let mut first = [0u32; 4];
        for _ in 0..3000 {
            let got = pick(&p, &eps, &[1.0, 1.0, 1.0, 0.0]);
            assert_eq!(got.len(), 2);
            assert!(!got.contains(&3));
            first[got[0] as usize] += 1;
        }
        for c in &first[..3] {
            assert!((800..=1200).contains(c), "{first:?}");
        }
    }

    #[test]
    fn parameters() {
        // Non-positive counts fall back to 1, as in the reference.
        let p = build(TYPE, Some(serde_json::json!({"maxNumOfEndpoints": 0}))).unwrap();
        assert_eq!(pick(&p, &endpoints(3), &[0.1, 0.2, 0.3]).len(), 1);
        assert!(
            build_err(TYPE, serde_json::json!({"maxNumOfEndpoints": "2"})).contains("invalid type")
        );
        assert!(build_err(TYPE, serde_json::json!({"maxEndpoints": 2})).contains("unknown field"));
    }
}
