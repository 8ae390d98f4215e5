//! `queue-scorer`: prefers endpoints with shorter waiting queues.
//!
//! ## Formula
//!
//! With `q(e)` the endpoint's waiting queue (`vllm:num_requests_waiting`) and `min`/`max`
//! taken over the candidates:
//!
//! ```text
//! score(e) = (max − q(e)) / (max − min)        when max > min
//! score(e) = 1                                 when every candidate has the same queue
//! ```
//!
//! So the shortest queue scores 1 and the longest 0, whatever the absolute lengths.
//!
//! ## Parameters
//!
//! None (`{}` or no `parameters`); any parameter is an error.
//!
//! Category: distribution. Reads one metrics snapshot per candidate, no allocation.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::plugin::{Candidate, SchedulingContext, Scorer, ScorerCategory};
use llmsched_core::registry::{FactoryInput, PluginError};

use super::{NoParameters, invert_min_max};
use crate::common::{impl_plugin, params};

/// Type name.
pub const TYPE: &str = "queue-scorer";

/// The queue scorer.
#[derive(Debug, Clone)]
pub struct QueueScorer {
    name: String,
}

impl QueueScorer {
    /// A scorer named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(QueueScorer::new(i.name)))
}

impl_plugin!(QueueScorer, TYPE, as_scorer => Scorer);

impl Scorer for QueueScorer {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Distribution
    }

    fn score(&self, _cx: &SchedulingContext<'_>, candidates: &[Candidate<'_>], scores: &mut [f64]) {
        for (s, e) in scores.iter_mut().zip(candidates) {
            *s = f64::from(e.metrics().waiting_queue_size);
        }
        invert_min_max(scores);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::cycle::CycleState;

    #[test]
    fn min_max_normalised_inverse_of_the_queue() {
        let s = QueueScorer::new(TYPE);
        let eps = [
            ep_with(1, &[], load(0, 0, 0.0)),
            ep_with(2, &[], load(5, 0, 0.0)),
            ep_with(3, &[], load(10, 0, 0.0)),
            ep_with(4, &[], load(8, 0, 0.0)),
        ];
        // min 0, max 10: (10-0)/10, (10-5)/10, 0, (10-8)/10.
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &eps),
            &[1.0, 0.5, 0.0, 0.2],
        );
    }

    #[test]
    fn equal_queues_all_score_one() {
        let s = QueueScorer::new(TYPE);
        let eps = [
            ep_with(1, &[], load(3, 0, 0.0)),
            ep_with(2, &[], load(3, 9, 0.9)),
        ];
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &eps),
            &[1.0, 1.0],
        );
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &eps[..1]),
            &[1.0],
        );
    }

    #[test]
    fn offset_queues_are_relative() {
        let s = QueueScorer::new(TYPE);
        let eps = [
            ep_with(1, &[], load(100, 0, 0.0)),
            ep_with(2, &[], load(104, 0, 0.0)),
            ep_with(3, &[], load(101, 0, 0.0)),
        ];
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &eps),
            &[1.0, 0.0, 0.75],
        );
    }

    #[test]
    fn parameters_are_rejected() {
        assert!(build(TYPE, Some(serde_json::json!({}))).is_ok());
        assert!(
            build_err(TYPE, serde_json::json!({"threshold": 1}))
                .contains("unknown field `threshold`")
        );
        assert!(build_err(TYPE, serde_json::json!([1])).contains("invalid type"));
        assert!(build_err(TYPE, serde_json::json!("x")).contains("expected an object"));
    }
}
