//! `label-selector-filter` (alias `by-label-selector`): keeps endpoints whose labels match a
//! Kubernetes label selector.
//!
//! ## Rule
//!
//! Kubernetes `metav1.LabelSelector` semantics: an endpoint is kept when it satisfies every
//! `matchLabels` pair and every `matchExpressions` requirement:
//!
//! ```text
//! matchLabels k: v          label k present and equal to v
//! {key, In, values}         label key present and its value ∈ values
//! {key, NotIn, values}      label key absent, or its value ∉ values
//! {key, Exists}             label key present
//! {key, DoesNotExist}       label key absent
//! ```
//!
//! An empty selector keeps every endpoint.
//!
//! ## Parameters
//!
//! * `matchLabels` (map of string to string, default empty).
//! * `matchExpressions` (list of `{key, operator, values}`, default empty): `operator` one of
//!   `In`, `NotIn`, `Exists`, `DoesNotExist`; `values` must be non-empty for `In`/`NotIn` and
//!   empty for `Exists`/`DoesNotExist`; `key` must be non-empty.

use std::collections::BTreeMap;
use std::sync::Arc;

use llmsched_core::plugin::{Candidate, Filter, SchedulingContext};
use llmsched_core::registry::{FactoryInput, PluginError};
use llmsched_core::{Endpoint, Plugin};
use serde::Deserialize;

use crate::common::{InvalidParameter, impl_plugin, invalid, params};

/// Type name.
pub const TYPE: &str = "label-selector-filter";
/// Deprecated alias.
pub const ALIAS_TYPE: &str = "by-label-selector";

/// One `matchExpressions` entry, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LabelSelectorRequirement {
    /// Label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    /// Values for `In`/`NotIn`.
    pub values: Vec<String>,
}

/// Parameters: a `metav1.LabelSelector`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct LabelSelectorParams {
    /// Exact matches.
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements.
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A compiled label selector.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector {
    reqs: Vec<Requirement>,
}

impl LabelSelector {
    /// Validates and compiles a selector.
    pub fn compile(p: &LabelSelectorParams) -> Result<Self, InvalidParameter> {
        let mut reqs = Vec::with_capacity(p.match_labels.len() + p.match_expressions.len());
        for (k, v) in &p.match_labels {
            if k.is_empty() {
                return invalid!("matchLabels: key must not be empty");
            }
            reqs.push(Requirement::In(k.clone(), vec![v.clone()]));
        }
        for (i, e) in p.match_expressions.iter().enumerate() {
            if e.key.is_empty() {
                return invalid!("matchExpressions[{i}]: key must not be empty");
            }
            let r = match e.operator.as_str() {
                "In" | "NotIn" if e.values.is_empty() => {
                    return invalid!(
                        "matchExpressions[{i}]: values: Invalid value: []: for 'in', 'notin' operators, values set can't be empty"
                    );
                }
                "Exists" | "DoesNotExist" if !e.values.is_empty() => {
                    return invalid!(
                        "matchExpressions[{i}]: values: Invalid value: {:?}: values set must be empty for exists and does not exist",
                        e.values
                    );
                }
                "In" => Requirement::In(e.key.clone(), e.values.clone()),
                "NotIn" => Requirement::NotIn(e.key.clone(), e.values.clone()),
                "Exists" => Requirement::Exists(e.key.clone()),
                "DoesNotExist" => Requirement::DoesNotExist(e.key.clone()),
                other => {
                    return invalid!(
                        "matchExpressions[{i}]: {other:?} is not a valid label selector operator"
                    );
                }
            };
            reqs.push(r);
        }
        Ok(Self { reqs })
    }

    /// True when `e`'s labels satisfy every requirement.
    pub fn matches(&self, e: &Endpoint) -> bool {
        self.reqs.iter().all(|r| match r {
            Requirement::In(k, vs) => e.label(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            Requirement::NotIn(k, vs) => e.label(k).is_none_or(|v| vs.iter().all(|x| x != v)),
            Requirement::Exists(k) => e.label(k).is_some(),
            Requirement::DoesNotExist(k) => e.label(k).is_none(),
        })
    }
}

/// The label selector filter.
#[derive(Debug, Clone)]
pub struct LabelSelectorFilter {
    type_name: &'static str,
    name: String,
    selector: LabelSelector,
}

impl LabelSelectorFilter {
    /// A filter with a compiled selector.
    pub fn new(name: impl Into<String>, selector: LabelSelector) -> Self {
        Self {
            type_name: TYPE,
            name: name.into(),
            selector,
        }
    }
}

fn build(i: &FactoryInput<'_>, type_name: &'static str) -> Result<Arc<dyn Plugin>, PluginError> {
    let p: LabelSelectorParams = params(i.parameters)?;
    let selector = LabelSelector::compile(&p)?;
    Ok(Arc::new(LabelSelectorFilter {
        type_name,
        name: i.name.to_string(),
        selector,
    }))
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    build(&i, TYPE)
}

/// Factory of the deprecated `by-label-selector` name.
pub fn alias_factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    tracing::warn!("plugin type 'by-label-selector' is deprecated; use 'label-selector-filter'");
    build(&i, ALIAS_TYPE)
}

impl_plugin!(LabelSelectorFilter, field, as_filter => Filter);

impl Filter for LabelSelectorFilter {
    fn filter(&self, _cx: &SchedulingContext<'_>, candidates: &mut Vec<Candidate<'_>>) {
        candidates.retain(|e| self.selector.matches(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::{build as build_plugin, build_err, ep_with, load};
    use crate::filter::by_label::tests::kept;

    fn eps() -> Vec<Arc<Endpoint>> {
        vec![
            ep_with(1, &[("zone", "a"), ("gpu", "h100")], load(0, 0, 0.0)),
            ep_with(2, &[("zone", "b"), ("gpu", "a100")], load(0, 0, 0.0)),
            ep_with(3, &[("zone", "a")], load(0, 0, 0.0)),
            ep_with(4, &[], load(0, 0, 0.0)),
        ]
    }

    fn run(params: serde_json::Value) -> Vec<String> {
        kept(&build_plugin(TYPE, Some(params)).unwrap(), &eps())
    }

    #[test]
    fn match_labels_and_each_operator() {
        assert_eq!(
            run(serde_json::json!({"matchLabels": {"zone": "a"}})),
            vec!["pod-1", "pod-3"]
        );
        assert_eq!(
            run(
                serde_json::json!({"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100", "l4"]}]})
            ),
            vec!["pod-2"]
        );
        // NotIn keeps endpoints without the label.
        assert_eq!(
            run(
                serde_json::json!({"matchExpressions": [{"key": "gpu", "operator": "NotIn", "values": ["h100"]}]})
            ),
            vec!["pod-2", "pod-3", "pod-4"]
        );
        assert_eq!(
            run(serde_json::json!({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]})),
            vec!["pod-1", "pod-2"]
        );
        assert_eq!(
            run(
                serde_json::json!({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]})
            ),
            vec!["pod-3", "pod-4"]
        );
        // Conjunction.
        assert_eq!(
            run(
                serde_json::json!({"matchLabels": {"zone": "a"}, "matchExpressions": [{"key": "gpu", "operator": "Exists"}]})
            ),
            vec!["pod-1"]
        );
        // Empty selector: everything.
        assert_eq!(
            run(serde_json::json!({})),
            vec!["pod-1", "pod-2", "pod-3", "pod-4"]
        );
    }

    #[test]
    fn alias_keeps_its_type_name_and_semantics() {
        let p = build_plugin(
            ALIAS_TYPE,
            Some(serde_json::json!({"matchLabels": {"zone": "b"}})),
        )
        .unwrap();
        assert_eq!(p.type_name(), ALIAS_TYPE);
        assert_eq!(kept(&p, &eps()), vec!["pod-2"]);
    }

    #[test]
    fn bad_parameters() {
        assert!(
            build_err(
                TYPE,
                serde_json::json!({"matchExpressions": [{"key": "a", "operator": "Has"}]})
            )
            .contains("not a valid label selector operator")
        );
        assert!(
            build_err(
                TYPE,
                serde_json::json!({"matchExpressions": [{"key": "a", "operator": "In"}]})
            )
            .contains("can't be empty")
        );
        assert!(build_err(TYPE, serde_json::json!({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]})).contains("must be empty"));
        assert!(
            build_err(
                TYPE,
                serde_json::json!({"matchExpressions": [{"operator": "Exists"}]})
            )
            .contains("key must not be empty")
        );
        assert!(
            build_err(TYPE, serde_json::json!({"matchLabels": ["a"]})).contains("invalid type")
        );
        assert!(build_err(TYPE, serde_json::json!({"selector": {}})).contains("unknown field"));
        assert!(build_err(TYPE, serde_json::json!({"matchExpressions": [{"key": "a", "operator": "Exists", "op": 1}]})).contains("unknown field"));
    }
}
