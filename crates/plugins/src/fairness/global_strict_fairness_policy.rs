//! `global-strict-fairness-policy`: one global order across the band's flows (the default).
//!
//! ## Formula
//!
//! ```text
//! next flow = the backlogged flow f whose head h(f) comes first under the band's ordering
//!             policy: ∀ g ≠ f, ¬ less(h(g), h(f)); ties go to the lowest flow id
//! ```
//!
//! With `fcfs-ordering-policy` this is plain FCFS across the band (the oldest request
//! anywhere goes first), so a flow's share of service follows its share of arrivals; with
//! `edf-ordering-policy`, the earliest deadline anywhere.
//!
//! ## Parameters
//!
//! None (`{}` or no `parameters`); any parameter is an error. Stateless.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::flowcontrol::{BandQueues, FairnessPolicy, FairnessState};
use llmsched_core::registry::{FactoryInput, PluginError};

use super::best_head;
use crate::common::{impl_plugin, params};
use crate::scorer::NoParameters;

/// Type name.
pub const TYPE: &str = "global-strict-fairness-policy";

/// The global strict fairness policy.
#[derive(Debug, Clone)]
pub struct GlobalStrictFairnessPolicy {
    name: String,
}

impl GlobalStrictFairnessPolicy {
    /// A policy named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(GlobalStrictFairnessPolicy::new(i.name)))
}

impl_plugin!(GlobalStrictFairnessPolicy, TYPE, as_fairness_policy => FairnessPolicy);

impl FairnessPolicy for GlobalStrictFairnessPolicy {
    fn new_band_state(&self) -> Box<dyn FairnessState> {
        Box::new(GlobalStrict)
    }
}

struct GlobalStrict;

impl FairnessState for GlobalStrict {
    fn pick<'a>(&mut self, band: &'a BandQueues) -> Option<&'a str> {
        best_head(band)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::{build, build_err};
    use crate::fairness::testutil::{band, dispatch, enqueue};

    #[test]
    fn the_oldest_head_across_flows_goes_first() {
        let mut st = GlobalStrictFairnessPolicy::new(TYPE).new_band_state();
        let mut b = band();
        for (seq, flow) in [(1, "b"), (2, "a"), (3, "b"), (4, "b"), (5, "a")] {
            enqueue(st.as_mut(), &mut b, flow, seq, 10, None);
        }
        let mut order = Vec::new();
        while let Some((flow, item, _)) = dispatch(st.as_mut(), &mut b) {
            order.push((flow, item.seq));
        }
        let want: Vec<(String, u64)> = [("b", 1), ("a", 2), ("b", 3), ("b", 4), ("a", 5)]
            .into_iter()
            .map(|(f, s)| (f.to_string(), s))
            .collect();
        assert_eq!(order, want);
        assert!(st.pick(&b).is_none());
    }

    #[test]
    fn builds_through_the_registry_and_rejects_parameters() {
        let p = build(TYPE, None).unwrap();
        assert!(p.as_fairness_policy().is_some());
        assert!(build_err(TYPE, serde_json::json!({"x": 1})).contains("unknown field `x`"));
    }
}
