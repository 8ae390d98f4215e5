//! `by-label` (deprecated in the reference, still accepted): keeps endpoints whose label has
//! one of the allowed values. Also the engine of the role filters (`decode-filter`,
//! `prefill-filter`, `encode-filter`).
//!
//! ## Rule
//!
//! ```text
//! keep(e) ⇔ (e has no label `label` ∧ allowsNoLabel) ∨ value(e, label) ∈ validValues
//! ```
//!
//! (As in the reference, an endpoint without the label is also kept when `""` is one of the
//! valid values.) An empty result fails the profile, as for every filter.
//!
//! ## Parameters
//!
//! * `label` (string, required): the label key.
//! * `validValues` (list of strings, default empty): accepted values.
//! * `allowsNoLabel` (bool, default `false`): keep endpoints without the label.
//!
//! `validValues` empty and `allowsNoLabel` false is an error (the filter would drop
//! everything).

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::plugin::{Candidate, Filter, SchedulingContext};
use llmsched_core::registry::{FactoryInput, PluginError};
use serde::Deserialize;

use crate::common::{impl_plugin, invalid, params};

/// Type name.
pub const TYPE: &str = "by-label";

/// Parameters.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ByLabelParams {
    /// Label key.
    pub label: String,
    /// Accepted values.
    pub valid_values: Vec<String>,
    /// Keep endpoints without the label.
    pub allows_no_label: bool,
}

/// A filter on one label's value.
#[derive(Debug, Clone)]
pub struct ByLabel {
    type_name: &'static str,
    name: String,
    label: String,
    valid_values: Vec<String>,
    allows_no_label: bool,
}

impl ByLabel {
    /// A filter of type `type_name`.
    pub fn new(
        type_name: &'static str,
        name: impl Into<String>,
        label: impl Into<String>,
        allows_no_label: bool,
        valid_values: &[&str],
    ) -> Self {
        Self {
            type_name,
            name: name.into(),
            label: label.into(),
            valid_values: valid_values.iter().map(|s| s.to_string()).collect(),
            allows_no_label,
        }
    }

    /// True when `e` passes.
    pub fn accepts(&self, e: &llmsched_core::Endpoint) -> bool {
        match e.label(&self.label) {
            None => self.allows_no_label || self.valid_values.iter().any(String::is_empty),
            Some(v) => self.valid_values.iter().any(|x| x == v),
        }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    tracing::warn!(
        "plugin type 'by-label' is deprecated; use 'label-selector-filter', or 'decode-filter'/'prefill-filter'/'encode-filter' for roles"
    );
    let p: ByLabelParams = params(i.parameters)?;
    if p.label.is_empty() {
        return invalid!("invalid configuration for '{TYPE}' filter: 'label' must be specified");
    }
    if p.valid_values.is_empty() && !p.allows_no_label {
        return invalid!(
            "invalid configuration for '{TYPE}' filter: either 'validValues' must be non-empty or 'allowsNoLabel' must be true"
        );
    }
    Ok(Arc::new(ByLabel {
        type_name: TYPE,
        name: i.name.to_string(),
        label: p.label,
        valid_values: p.valid_values,
        allows_no_label: p.allows_no_label,
    }))
}

impl_plugin!(ByLabel, field, as_filter => Filter);

impl Filter for ByLabel {
    fn filter(&self, _cx: &SchedulingContext<'_>, candidates: &mut Vec<Candidate<'_>>) {
        candidates.retain(|e| self.accepts(e));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::cycle::CycleState;
    use std::time::Instant;

    /// Names of the endpoints `p` keeps out of `eps`.
    pub fn kept(p: &Arc<dyn Plugin>, eps: &[Arc<llmsched_core::Endpoint>]) -> Vec<String> {
        let f = p.clone().as_filter().unwrap();
        let req = request("m");
        let cycle = CycleState::new();
        let cx = SchedulingContext {
            request: &req,
            cycle: &cycle,
            now: Instant::now(),
        };
        let mut c: Vec<Candidate<'_>> = eps.iter().collect();
        f.filter(&cx, &mut c);
        c.iter().map(|e| e.name().to_string()).collect()
    }

    fn labelled(id: u32, labels: &[(&str, &str)]) -> Arc<llmsched_core::Endpoint> {
        ep_with(id, labels, load(0, 0, 0.0))
    }

    #[test]
    fn keeps_valid_values_and_optionally_unlabelled() {
        let eps = [
            labelled(1, &[("tier", "gold")]),
            labelled(2, &[("tier", "bronze")]),
            labelled(3, &[]),
            labelled(4, &[("tier", "silver")]),
        ];
        let p = build(
            TYPE,
            Some(serde_json::json!({"label": "tier", "validValues": ["gold", "silver"]})),
        )
        .unwrap();
        assert_eq!(kept(&p, &eps), vec!["pod-1", "pod-4"]);
        let p = build(TYPE, Some(serde_json::json!({"label": "tier", "validValues": ["gold"], "allowsNoLabel": true}))).unwrap();
        assert_eq!(kept(&p, &eps), vec!["pod-1", "pod-3"]);
        let p = build(
            TYPE,
            Some(serde_json::json!({"label": "tier", "allowsNoLabel": true})),
        )
        .unwrap();
        assert_eq!(kept(&p, &eps), vec!["pod-3"]);
    }

    #[test]
    fn bad_parameters() {
        assert!(
            build_err(TYPE, serde_json::json!({"validValues": ["a"]}))
                .contains("'label' must be specified")
        );
        assert!(
            build_err(TYPE, serde_json::json!({"label": "x"}))
                .contains("either 'validValues' must be non-empty")
        );
        assert!(
            build_err(TYPE, serde_json::json!({"label": "x", "validValues": "a"}))
                .contains("invalid type")
        );
        assert!(
            build_err(TYPE, serde_json::json!({"label": "x", "values": ["a"]}))
                .contains("unknown field")
        );
    }
}
