//! `running-requests-size-scorer`: prefers endpoints running fewer requests.
//!
//! ## Formula
//!
//! With `r(e)` the endpoint's running requests (`vllm:num_requests_running`) and `min`/`max`
//! taken over the candidates:
//!
//! ```text
//! score(e) = (max − r(e)) / (max − min)        when max > min
//! score(e) = 1                                 when every candidate runs as many requests
//! ```
//!
//! ## Parameters
//!
//! None (`{}` or no `parameters`); any parameter is an error.
//!
//! Category: distribution.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::plugin::{Candidate, SchedulingContext, Scorer, ScorerCategory};
use llmsched_core::registry::{FactoryInput, PluginError};

use super::{NoParameters, invert_min_max};
use crate::common::{impl_plugin, params};

/// Type name.
pub const TYPE: &str = "running-requests-size-scorer";

/// The running-requests scorer.
#[derive(Debug, Clone)]
pub struct RunningRequestsSizeScorer {
    name: String,
}

impl RunningRequestsSizeScorer {
    /// A scorer named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(RunningRequestsSizeScorer::new(i.name)))
}

impl_plugin!(RunningRequestsSizeScorer, TYPE, as_scorer => Scorer);

impl Scorer for RunningRequestsSizeScorer {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Distribution
    }

    fn score(&self, _cx: &SchedulingContext<'_>, candidates: &[Candidate<'_>], scores: &mut [f64]) {
        for (s, e) in scores.iter_mut().zip(candidates) {
            *s = f64::from(e.metrics().running_requests);
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
    fn min_max_normalised_inverse_of_running() {
        let s = RunningRequestsSizeScorer::new(TYPE);
        let eps = [
            ep_with(1, &[], load(50, 2, 0.0)),
            ep_with(2, &[], load(0, 6, 0.0)),
            ep_with(3, &[], load(0, 4, 0.0)),
        ];
        // Waiting queues are ignored; running: min 2, max 6.
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &eps),
            &[1.0, 0.0, 0.5],
        );
        let eq = [
            ep_with(1, &[], load(0, 4, 0.0)),
            ep_with(2, &[], load(9, 4, 0.0)),
        ];
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &eq),
            &[1.0, 1.0],
        );
    }

    #[test]
    fn parameters_are_rejected() {
        assert!(build_err(TYPE, serde_json::json!({"x": true})).contains("unknown field `x`"));
    }
}
