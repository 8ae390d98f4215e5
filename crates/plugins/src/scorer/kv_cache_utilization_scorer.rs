//! `kv-cache-utilization-scorer`: prefers endpoints with free KV cache.
//!
//! ## Formula
//!
//! ```text
//! score(e) = 1 − kv(e)
//! ```
//!
//! where `kv(e)` ∈ [0, 1] is the endpoint's KV-cache usage (`vllm:kv_cache_usage_perc`, or
//! `vllm:gpu_cache_usage_perc` on older vLLM). Out-of-range usages are clamped by the profile.
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

use super::NoParameters;
use crate::common::{impl_plugin, params};

/// Type name.
pub const TYPE: &str = "kv-cache-utilization-scorer";

/// The KV-cache utilization scorer.
#[derive(Debug, Clone)]
pub struct KvCacheUtilizationScorer {
    name: String,
}

impl KvCacheUtilizationScorer {
    /// A scorer named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(KvCacheUtilizationScorer::new(i.name)))
}

impl_plugin!(KvCacheUtilizationScorer, TYPE, as_scorer => Scorer);

impl Scorer for KvCacheUtilizationScorer {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Distribution
    }

    fn score(&self, _cx: &SchedulingContext<'_>, candidates: &[Candidate<'_>], scores: &mut [f64]) {
        for (s, e) in scores.iter_mut().zip(candidates) {
            *s = 1.0 - e.metrics().kv_cache_usage;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::cycle::CycleState;

    #[test]
    fn one_minus_usage() {
        let s = KvCacheUtilizationScorer::new(TYPE);
        let eps = [
            ep_with(1, &[], load(0, 0, 0.0)),
            ep_with(2, &[], load(0, 0, 0.25)),
            ep_with(3, &[], load(0, 0, 1.0)),
        ];
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &eps),
            &[1.0, 0.75, 0.0],
        );
    }

    #[test]
    fn parameters_are_rejected() {
        assert!(
            build_err(TYPE, serde_json::json!({"weight": 2})).contains("unknown field `weight`")
        );
    }
}
