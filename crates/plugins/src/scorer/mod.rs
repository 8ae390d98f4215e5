//! Scorers: each writes a score in [0, 1] per candidate (higher is better); the profile
//! multiplies it by the scorer's weight.

pub mod active_request_scorer;
pub mod kv_cache_utilization_scorer;
pub mod load_aware_scorer;
pub mod lora_affinity_scorer;
pub mod no_hit_lru_scorer;
pub mod precise_prefix_cache_scorer;
pub mod prefill_load_scorer;
pub mod prefix_cache_scorer;
pub mod queue_scorer;
pub mod running_requests_size_scorer;
pub mod session_affinity_scorer;
pub mod token_load_scorer;

use llmsched_core::registry::Registry;

pub use active_request_scorer::ActiveRequestScorer;
pub use kv_cache_utilization_scorer::KvCacheUtilizationScorer;
pub use load_aware_scorer::LoadAwareScorer;
pub use lora_affinity_scorer::LoraAffinityScorer;
pub use no_hit_lru_scorer::NoHitLruScorer;
pub use precise_prefix_cache_scorer::{PreciseMetrics, PreciseScorer};
pub use prefill_load_scorer::PrefillLoadScorer;
pub use prefix_cache_scorer::PrefixCacheScorer;
pub use queue_scorer::QueueScorer;
pub use running_requests_size_scorer::RunningRequestsSizeScorer;
pub use session_affinity_scorer::SessionAffinityScorer;
pub use token_load_scorer::TokenLoadScorer;

/// Registers every scorer.
pub fn register(r: &mut Registry) {
    r.register(queue_scorer::TYPE, queue_scorer::factory);
    r.register(
        running_requests_size_scorer::TYPE,
        running_requests_size_scorer::factory,
    );
    r.register(
        kv_cache_utilization_scorer::TYPE,
        kv_cache_utilization_scorer::factory,
    );
    r.register(load_aware_scorer::TYPE, load_aware_scorer::factory);
    r.register(active_request_scorer::TYPE, active_request_scorer::factory);
    r.register(token_load_scorer::TYPE, token_load_scorer::factory);
    r.register(lora_affinity_scorer::TYPE, lora_affinity_scorer::factory);
    r.register(
        session_affinity_scorer::TYPE,
        session_affinity_scorer::factory,
    );
    r.register(prefix_cache_scorer::TYPE, prefix_cache_scorer::factory);
    r.register(no_hit_lru_scorer::TYPE, no_hit_lru_scorer::factory);
    r.register(
        precise_prefix_cache_scorer::TYPE,
        precise_prefix_cache_scorer::factory,
    );
    r.register(prefill_load_scorer::TYPE, prefill_load_scorer::factory);
}

/// Parameters of plugins that take none: only `{}` or `null` is accepted.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoParameters {}

/// Min-max normalisation shared by the queue and running-requests scorers: `values` holds
/// the raw per-candidate values on entry and `(max − v) / (max − min)` on exit (all equal →
/// 1).
pub(crate) fn invert_min_max(values: &mut [f64]) {
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    for &v in values.iter() {
        min = min.min(v);
        max = max.max(v);
    }
    if values.is_empty() || max == min {
        values.fill(1.0);
        return;
    }
    let span = max - min;
    for v in values.iter_mut() {
        *v = (max - *v) / span;
    }
}
