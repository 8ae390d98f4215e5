//! Flow-control policies the configuration loader implements by name
//! (`fairnessPolicyRef` / `orderingPolicyRef` of a priority band): declaring them as plugins
//! is accepted, as in the reference.
//!
//! * `global-strict-fairness-policy`, `round-robin-fairness-policy`;
//! * `fcfs-ordering-policy`, `edf-ordering-policy`.
//!
//! ## Parameters
//!
//! None (`{}` or no `parameters`); any parameter is an error.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::registry::{Factory, FactoryInput, PluginError};

use super::Descriptor;
use crate::common::params;
use crate::scorer::NoParameters;

fn make(i: &FactoryInput<'_>, type_name: &'static str) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(Descriptor::new(type_name, i.name)))
}

/// `(type name, factory)` of each policy.
pub const TYPES: [(&str, Factory); 4] = [
    ("global-strict-fairness-policy", |i| {
        make(&i, "global-strict-fairness-policy")
    }),
    ("round-robin-fairness-policy", |i| {
        make(&i, "round-robin-fairness-policy")
    }),
    ("fcfs-ordering-policy", |i| make(&i, "fcfs-ordering-policy")),
    ("edf-ordering-policy", |i| make(&i, "edf-ordering-policy")),
];
