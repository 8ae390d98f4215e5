//! `token-load-scorer`: prefers endpoints with fewer tokens in flight from this EPP.
//!
//! ## Formula
//!
//! With `t(e)` the estimated prompt+output tokens of the requests this EPP has in flight on
//! the endpoint (`Endpoint::inflight_tokens`, maintained by the director at dispatch and
//! completion; with HA sync, plus the latest figures of the EPP's other replicas,
//! `Endpoint::fleet_inflight_tokens`) and `T` the `queueThresholdTokens` parameter:
//!
//! ```text
//! score(e) = 1 − min(t(e), T) / T
//! ```
//!
//! (1 when idle, 0 at or above `T`.)
//!
//! ## Parameters
//!
//! * `queueThresholdTokens` (integer, default `4194304` = 128 requests × 32k tokens): the
//!   in-flight token count that scores 0. Values ≤ 0 fall back to the default.
//!
//! Category: distribution. Lock-free (atomic loads).

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::plugin::{Candidate, SchedulingContext, Scorer, ScorerCategory};
use llmsched_core::registry::{FactoryInput, PluginError};
use serde::Deserialize;

use crate::common::{impl_plugin, params};

/// Type name.
pub const TYPE: &str = "token-load-scorer";

/// Default `queueThresholdTokens`.
pub const DEFAULT_QUEUE_THRESHOLD_TOKENS: i64 = 4_194_304;

/// Parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TokenLoadParams {
    /// Tokens in flight that score 0.
    pub queue_threshold_tokens: i64,
}

impl Default for TokenLoadParams {
    fn default() -> Self {
        Self {
            queue_threshold_tokens: DEFAULT_QUEUE_THRESHOLD_TOKENS,
        }
    }
}

/// The token-load scorer.
#[derive(Debug, Clone)]
pub struct TokenLoadScorer {
    name: String,
    threshold: f64,
}

impl TokenLoadScorer {
    /// A scorer named `name`; a threshold ≤ 0 means the default.
    pub fn new(name: impl Into<String>, queue_threshold_tokens: i64) -> Self {
        let t = if queue_threshold_tokens <= 0 {
            DEFAULT_QUEUE_THRESHOLD_TOKENS
        } else {
            queue_threshold_tokens
        };
        Self {
            name: name.into(),
            threshold: t as f64,
        }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let p: TokenLoadParams = params(i.parameters)?;
    Ok(Arc::new(TokenLoadScorer::new(
        i.name,
        p.queue_threshold_tokens,
    )))
}

impl_plugin!(TokenLoadScorer, TYPE, as_scorer => Scorer);

impl Scorer for TokenLoadScorer {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Distribution
    }

    fn score(&self, _cx: &SchedulingContext<'_>, candidates: &[Candidate<'_>], scores: &mut [f64]) {
        for (s, e) in scores.iter_mut().zip(candidates) {
            let t = e.fleet_inflight_tokens() as f64;
            *s = 1.0 - t.min(self.threshold) / self.threshold;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::cycle::CycleState;

    fn run(params: Option<serde_json::Value>, tokens: &[u64]) -> Vec<f64> {
        let p = build(TYPE, params).unwrap();
        let s = p.as_scorer().unwrap();
        let eps: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let e = ep(i as u32);
                if t > 0 {
                    e.dispatch(t);
                }
                e
            })
            .collect();
        scores(s.as_ref(), &request("m"), &CycleState::new(), &eps)
    }

    #[test]
    fn linear_in_inflight_tokens() {
        let p = serde_json::json!({"queueThresholdTokens": 1000});
        // 0 → 1; 250 → 0.75; 1000 → 0; 5000 → 0 (capped).
        assert_close(&run(Some(p), &[0, 250, 1000, 5000]), &[1.0, 0.75, 0.0, 0.0]);
    }

    #[test]
    fn default_threshold() {
        // 1,048,576 of 4,194,304 → 0.75.
        assert_close(&run(None, &[1_048_576]), &[0.75]);
        assert_close(
            &run(
                Some(serde_json::json!({"queueThresholdTokens": 0})),
                &[1_048_576],
            ),
            &[0.75],
        );
        assert_close(
            &run(
                Some(serde_json::json!({"queueThresholdTokens": -1})),
                &[2_097_152],
            ),
            &[0.5],
        );
    }

    #[test]
    fn bad_parameters() {
        assert!(
            build_err(TYPE, serde_json::json!({"queueThresholdTokens": "1k"}))
                .contains("invalid type")
        );
        assert!(build_err(TYPE, serde_json::json!({"threshold": 5})).contains("unknown field"));
    }
}
