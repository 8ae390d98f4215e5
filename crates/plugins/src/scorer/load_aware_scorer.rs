//! `load-aware-scorer`: prefers endpoints with an empty waiting queue, then short ones.
//!
//! ## Formula
//!
//! With `w(e)` the endpoint's waiting queue and `thr` the `threshold` parameter:
//!
//! ```text
//! score(e) = 0.5                                   when w(e) = 0
//! score(e) = 0.5 · (1 − min(w(e), thr) / thr)      otherwise
//! ```
//!
//! An idle queue scores 0.5 (not 1) so the scorer never dominates an affinity scorer of the
//! same weight; a queue of `thr` or more scores 0.
//!
//! ## Parameters
//!
//! * `threshold` (integer, default `128`): queue length that scores 0. A value ≤ 0 falls back
//!   to 128 with a warning, as the reference does.
//!
//! Category: distribution.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::plugin::{Candidate, SchedulingContext, Scorer, ScorerCategory};
use llmsched_core::registry::{FactoryInput, PluginError};
use serde::Deserialize;

use crate::common::{impl_plugin, params};

/// Type name.
pub const TYPE: &str = "load-aware-scorer";

/// Default `threshold`.
pub const DEFAULT_THRESHOLD: i64 = 128;

/// Parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct LoadAwareParams {
    /// Queue length that scores 0.
    pub threshold: i64,
}

impl Default for LoadAwareParams {
    fn default() -> Self {
        Self {
            threshold: DEFAULT_THRESHOLD,
        }
    }
}

/// The load-aware scorer.
#[derive(Debug, Clone)]
pub struct LoadAwareScorer {
    name: String,
    threshold: f64,
}

impl LoadAwareScorer {
    /// A scorer named `name`; `threshold` ≤ 0 means the default.
    pub fn new(name: impl Into<String>, threshold: i64) -> Self {
        let threshold = if threshold <= 0 {
            tracing::warn!(
                threshold,
                default = DEFAULT_THRESHOLD,
                "load-aware-scorer: threshold must be positive, using the default"
            );
            DEFAULT_THRESHOLD
        } else {
            threshold
        };
        Self {
            name: name.into(),
            threshold: threshold as f64,
        }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let p: LoadAwareParams = params(i.parameters)?;
    Ok(Arc::new(LoadAwareScorer::new(i.name, p.threshold)))
}

impl_plugin!(LoadAwareScorer, TYPE, as_scorer => Scorer);

impl Scorer for LoadAwareScorer {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Distribution
    }

    fn score(&self, _cx: &SchedulingContext<'_>, candidates: &[Candidate<'_>], scores: &mut [f64]) {
        for (s, e) in scores.iter_mut().zip(candidates) {
            let w = f64::from(e.metrics().waiting_queue_size);
            *s = if w == 0.0 {
                0.5
            } else {
                0.5 * (1.0 - w.min(self.threshold) / self.threshold)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::cycle::CycleState;

    fn run(threshold: Option<i64>, queues: &[u32]) -> Vec<f64> {
        let params = threshold.map(|t| serde_json::json!({ "threshold": t }));
        let p = build(TYPE, params).unwrap();
        let s = p.as_scorer().unwrap();
        let eps: Vec<_> = queues
            .iter()
            .enumerate()
            .map(|(i, &q)| ep_with(i as u32, &[], load(q, 0, 0.0)))
            .collect();
        scores(s.as_ref(), &request("m"), &CycleState::new(), &eps)
    }

    #[test]
    fn default_threshold_128() {
        // 0 → 0.5; 32 → 0.5·(1 − 32/128) = 0.375; 64 → 0.25; 128 and beyond → 0.
        assert_close(
            &run(None, &[0, 32, 64, 128, 500]),
            &[0.5, 0.375, 0.25, 0.0, 0.0],
        );
    }

    #[test]
    fn custom_threshold() {
        // threshold 10: 1 → 0.45, 5 → 0.25, 10 → 0.
        assert_close(&run(Some(10), &[0, 1, 5, 10]), &[0.5, 0.45, 0.25, 0.0]);
    }

    #[test]
    fn non_positive_threshold_falls_back_to_default() {
        assert_close(&run(Some(0), &[64]), &[0.25]);
        assert_close(&run(Some(-5), &[64]), &[0.25]);
    }

    #[test]
    fn bad_parameters() {
        assert!(build_err(TYPE, serde_json::json!({"threshold": "high"})).contains("invalid type"));
        assert!(
            build_err(TYPE, serde_json::json!({"treshold": 3}))
                .contains("unknown field `treshold`")
        );
        assert!(build_err(TYPE, serde_json::json!({"threshold": 1.5})).contains("invalid type"));
    }
}
