//! `always-disagg-pd-decider`: disaggregate every request.
//!
//! ## Rule
//!
//! ```text
//! disaggregate(request, decode pick) = yes
//! ```
//!
//! ## Parameters
//!
//! None (`{}` or no `parameters`); any parameter is an error.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::endpoint::Endpoint;
use llmsched_core::plugin::{DisaggDecider, SchedulingContext};
use llmsched_core::registry::{FactoryInput, PluginError};

use crate::common::{impl_plugin, params};
use crate::scorer::NoParameters;

/// Type name.
pub const TYPE: &str = "always-disagg-pd-decider";

/// The always-disaggregate decider.
#[derive(Debug, Clone)]
pub struct AlwaysDisaggPdDecider {
    name: String,
}

impl AlwaysDisaggPdDecider {
    /// A decider named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(AlwaysDisaggPdDecider::new(i.name)))
}

impl_plugin!(AlwaysDisaggPdDecider, TYPE, as_disagg_decider => DisaggDecider);

impl DisaggDecider for AlwaysDisaggPdDecider {
    fn disaggregate(&self, _cx: &SchedulingContext<'_>, _decode: &Endpoint) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::cycle::CycleState;
    use std::time::Instant;

    #[test]
    fn always_yes_and_no_parameters() {
        let p = build(TYPE, None).unwrap();
        let d = p.as_disagg_decider().unwrap();
        let req = request("m");
        let cycle = CycleState::new();
        let cx = SchedulingContext {
            request: &req,
            cycle: &cycle,
            now: Instant::now(),
        };
        assert!(d.disaggregate(&cx, &ep(1)));
        assert!(build_err(TYPE, serde_json::json!({"always": true})).contains("unknown field"));
    }
}
