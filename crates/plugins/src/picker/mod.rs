//! Pickers: choose the target endpoint(s) from the scored candidates, best first. Every
//! picker takes `maxNumOfEndpoints` (default 1): the extra endpoints are the ordered fallback
//! list written into the destination header.

pub mod max_score_picker;
pub mod random_picker;
pub mod weighted_random_picker;

use llmsched_core::registry::Registry;
use serde::Deserialize;

pub use max_score_picker::MaxScorePicker;
pub use random_picker::RandomPicker;
pub use weighted_random_picker::WeightedRandomPicker;

/// Registers every picker.
pub fn register(r: &mut Registry) {
    r.register(max_score_picker::TYPE, max_score_picker::factory);
    r.register(random_picker::TYPE, random_picker::factory);
    r.register(
        weighted_random_picker::TYPE,
        weighted_random_picker::factory,
    );
}

/// Default `maxNumOfEndpoints`.
pub const DEFAULT_MAX_NUM_OF_ENDPOINTS: usize = 1;

/// Parameters shared by the pickers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PickerParams {
    /// Endpoints returned (primary + fallbacks); ≤ 0 falls back to 1, as in the reference.
    pub max_num_of_endpoints: i64,
}

impl Default for PickerParams {
    fn default() -> Self {
        Self {
            max_num_of_endpoints: DEFAULT_MAX_NUM_OF_ENDPOINTS as i64,
        }
    }
}

impl PickerParams {
    /// The effective count.
    pub fn count(&self, picker: &str) -> usize {
        if self.max_num_of_endpoints <= 0 {
            tracing::warn!(
                picker,
                value = self.max_num_of_endpoints,
                "maxNumOfEndpoints must be positive; using 1"
            );
            DEFAULT_MAX_NUM_OF_ENDPOINTS
        } else {
            usize::try_from(self.max_num_of_endpoints).unwrap_or(usize::MAX)
        }
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::sync::Arc;
    use std::time::Instant;

    use llmsched_core::cycle::CycleState;
    use llmsched_core::plugin::{SchedulingContext, ScoredEndpoint};
    use llmsched_core::{Endpoint, Plugin};

    use crate::common::testutil::*;

    /// Endpoints 0..n.
    pub fn endpoints(n: u32) -> Vec<Arc<Endpoint>> {
        (0..n).map(ep).collect()
    }

    /// Ids picked by `p` for the given scores (one score per endpoint of `eps`).
    pub fn pick(p: &Arc<dyn Plugin>, eps: &[Arc<Endpoint>], scores: &[f64]) -> Vec<u32> {
        let picker = p.clone().as_picker().unwrap();
        let req = request("m");
        let cycle = CycleState::new();
        let cx = SchedulingContext {
            request: &req,
            cycle: &cycle,
            now: Instant::now(),
        };
        let mut scored: Vec<ScoredEndpoint<'_>> = eps
            .iter()
            .zip(scores)
            .map(|(e, &score)| ScoredEndpoint { endpoint: e, score })
            .collect();
        picker
            .pick(&cx, &mut scored)
            .iter()
            .map(|e| e.id().0)
            .collect()
    }
}
