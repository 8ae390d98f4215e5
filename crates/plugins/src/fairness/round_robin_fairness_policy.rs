//! `round-robin-fairness-policy`: the band's backlogged flows take turns.
//!
//! ## Formula
//!
//! With `last` the flow served last in this band (none at first):
//!
//! ```text
//! next flow = the first backlogged flow whose id sorts after `last`,
//!             else the first backlogged flow (ids in ascending order)
//! ```
//!
//! One dispatch per turn, whatever the request's size: each backlogged flow gets an equal
//! share of *requests*. A flow that empties loses its turn; `last` keeps its place in the id
//! order even when its flow is gone.
//!
//! ## Parameters
//!
//! None (`{}` or no `parameters`); any parameter is an error. State per band: `last`.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::flowcontrol::{BandQueues, FairnessPolicy, FairnessState};
use llmsched_core::registry::{FactoryInput, PluginError};

use crate::common::{impl_plugin, params};
use crate::scorer::NoParameters;

/// Type name.
pub const TYPE: &str = "round-robin-fairness-policy";

/// The round-robin fairness policy.
#[derive(Debug, Clone)]
pub struct RoundRobinFairnessPolicy {
    name: String,
}

impl RoundRobinFairnessPolicy {
    /// A policy named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(RoundRobinFairnessPolicy::new(i.name)))
}

impl_plugin!(RoundRobinFairnessPolicy, TYPE, as_fairness_policy => FairnessPolicy);

impl FairnessPolicy for RoundRobinFairnessPolicy {
    fn new_band_state(&self) -> Box<dyn FairnessState> {
        Box::new(Cursor { last: None })
    }
}

/// The flow served last in one band.
struct Cursor {
    last: Option<String>,
}

impl FairnessState for Cursor {
    fn pick<'a>(&mut self, band: &'a BandQueues) -> Option<&'a str> {
        let next = match self.last.as_deref() {
            Some(last) => band
                .flows_after(last)
                .next()
                .or_else(|| band.flows().next()),
            None => band.flows().next(),
        };
        let (id, _) = next?;
        match &mut self.last {
            Some(last) => {
                last.clear();
                last.push_str(id);
            }
            None => self.last = Some(id.to_string()),
        }
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::{build, build_err};
    use crate::fairness::testutil::{band, dispatch, enqueue};

    #[test]
    fn flows_take_turns_in_id_order() {
        let mut st = RoundRobinFairnessPolicy::new(TYPE).new_band_state();
        let mut b = band();
        for (seq, flow) in [(1, "c"), (2, "c"), (3, "c"), (4, "a"), (5, "b"), (6, "a")] {
            enqueue(st.as_mut(), &mut b, flow, seq, 10, None);
        }
        let mut order = Vec::new();
        while let Some((flow, item, _)) = dispatch(st.as_mut(), &mut b) {
            order.push(format!("{flow}{}", item.seq));
        }
        assert_eq!(order, vec!["a4", "b5", "c1", "a6", "c2", "c3"]);
    }

    #[test]
    fn a_departed_flow_keeps_the_cursor_in_place() {
        let mut st = RoundRobinFairnessPolicy::new(TYPE).new_band_state();
        let mut b = band();
        for (seq, flow) in [(1, "a"), (2, "b"), (3, "c")] {
            enqueue(st.as_mut(), &mut b, flow, seq, 10, None);
        }
        assert_eq!(dispatch(st.as_mut(), &mut b).unwrap().0, "a");
        assert_eq!(dispatch(st.as_mut(), &mut b).unwrap().0, "b");
        // "b" is gone; "a" comes back: the turn is "c"'s, then "a"'s.
        enqueue(st.as_mut(), &mut b, "a", 4, 10, None);
        assert_eq!(dispatch(st.as_mut(), &mut b).unwrap().0, "c");
        assert_eq!(dispatch(st.as_mut(), &mut b).unwrap().0, "a");
        assert!(dispatch(st.as_mut(), &mut b).is_none());
    }

    #[test]
    fn builds_through_the_registry_and_rejects_parameters() {
        let p = build(TYPE, None).unwrap();
        assert!(p.as_fairness_policy().is_some());
        assert!(build_err(TYPE, serde_json::json!({"x": 1})).contains("unknown field `x`"));
    }
}
