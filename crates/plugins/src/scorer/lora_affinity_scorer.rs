//! `lora-affinity-scorer`: prefers endpoints that already run (or can load) the request's
//! LoRA adapter.
//!
//! ## Formula
//!
//! The adapter is the request's target model (after rewrites). From the endpoint's
//! `vllm:lora_requests_info` sample (`running_lora_adapters`, `waiting_lora_adapters`,
//! `max_lora`):
//!
//! ```text
//! score(e) = 1.0   the adapter is running on e
//!          = 0.8   otherwise, when |running| + |waiting| < max_lora (room to load it)
//!          = 0.6   otherwise, when the adapter is waiting on e
//!          = 0.0   otherwise
//! ```
//!
//! A request for the base model matches no adapter, so it gets 0.8 on endpoints with
//! adapter slots free and 0 elsewhere — exactly as the reference. Endpoints that do not
//! report LoRA metrics (`max_lora` 0) score 0 unless they report the adapter running or
//! waiting.
//!
//! ## Parameters
//!
//! None (`{}` or no `parameters`); any parameter is an error.
//!
//! Category: affinity.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::plugin::{Candidate, SchedulingContext, Scorer, ScorerCategory};
use llmsched_core::registry::{FactoryInput, PluginError};

use super::NoParameters;
use crate::common::{impl_plugin, params};

/// Type name.
pub const TYPE: &str = "lora-affinity-scorer";

/// The LoRA affinity scorer.
#[derive(Debug, Clone)]
pub struct LoraAffinityScorer {
    name: String,
}

impl LoraAffinityScorer {
    /// A scorer named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(LoraAffinityScorer::new(i.name)))
}

impl_plugin!(LoraAffinityScorer, TYPE, as_scorer => Scorer);

impl Scorer for LoraAffinityScorer {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Affinity
    }

    fn score(&self, cx: &SchedulingContext<'_>, candidates: &[Candidate<'_>], scores: &mut [f64]) {
        let adapter = cx.request.target_model.as_str();
        for (s, e) in scores.iter_mut().zip(candidates) {
            let m = e.metrics();
            let active = m.running_lora_adapters.iter().any(|a| a == adapter);
            *s = if active {
                1.0
            } else if m.running_lora_adapters.len() + m.waiting_lora_adapters.len()
                < m.max_lora as usize
            {
                0.8
            } else if m.waiting_lora_adapters.iter().any(|a| a == adapter) {
                0.6
            } else {
                0.0
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::cycle::CycleState;
    use llmsched_core::endpoint::EndpointMetrics;

    fn lora(running: &[&str], waiting: &[&str], max: u32) -> EndpointMetrics {
        EndpointMetrics {
            running_lora_adapters: running.iter().map(|s| s.to_string()).collect(),
            waiting_lora_adapters: waiting.iter().map(|s| s.to_string()).collect(),
            max_lora: max,
            ..load(0, 0, 0.0)
        }
    }

    #[test]
    fn tiers() {
        let s = LoraAffinityScorer::new(TYPE);
        let eps = [
            ep_with(1, &[], lora(&["sql"], &[], 1)), // running → 1
            ep_with(2, &[], lora(&["a"], &[], 4)),   // room: 1 + 0 < 4 → 0.8
            ep_with(3, &[], lora(&["a", "b"], &["sql"], 3)), // full (3 ≥ 3), waiting → 0.6
            ep_with(4, &[], lora(&["a", "b"], &["c"], 3)), // full, absent → 0
            ep_with(5, &[], lora(&[], &["sql"], 4)), // room beats waiting → 0.8
            ep_with(6, &[], lora(&[], &[], 0)),      // no LoRA metrics → 0
        ];
        assert_close(
            &scores(&s, &request("sql"), &CycleState::new(), &eps),
            &[1.0, 0.8, 0.6, 0.0, 0.8, 0.0],
        );
    }

    #[test]
    fn base_model_requests_only_get_the_room_tier() {
        let s = LoraAffinityScorer::new(TYPE);
        let eps = [
            ep_with(1, &[], lora(&["a"], &[], 2)),
            ep_with(2, &[], lora(&["a", "b"], &[], 2)),
        ];
        assert_close(
            &scores(&s, &request("llama-3"), &CycleState::new(), &eps),
            &[0.8, 0.0],
        );
    }

    #[test]
    fn parameters_are_rejected() {
        assert!(build_err(TYPE, serde_json::json!({"maxLora": 2})).contains("unknown field"));
    }
}
