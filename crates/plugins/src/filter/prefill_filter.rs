//! `prefill-filter`: keeps endpoints that can serve the prefill stage of P/D disaggregation.
//!
//! ## Rule
//!
//! ```text
//! keep(e) ⇔ label llm-d.ai/role of e ∈ {prefill, encode-prefill, prefill-decode, both, encode-prefill-decode}
//! ```
//!
//! and the label is required.
//!
//! ## Parameters
//!
//! None (`{}` or no `parameters`); any parameter is an error.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::endpoint::label;
use llmsched_core::registry::{FactoryInput, PluginError};

use super::by_label::ByLabel;
use super::role;
use crate::common::params;
use crate::scorer::NoParameters;

/// Type name.
pub const TYPE: &str = "prefill-filter";

/// The prefill role filter.
pub fn prefill_filter(name: impl Into<String>) -> ByLabel {
    ByLabel::new(
        TYPE,
        name,
        label::ROLE,
        false,
        &[
            role::PREFILL,
            role::ENCODE_PREFILL,
            role::PREFILL_DECODE,
            role::BOTH,
            role::ENCODE_PREFILL_DECODE,
        ],
    )
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(prefill_filter(i.name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use crate::filter::by_label::tests::kept;

    #[test]
    fn prefill_roles_pass_and_the_label_is_required() {
        let eps: Vec<_> = [
            ("decode", 1),
            ("prefill", 2),
            ("prefill-decode", 3),
            ("both", 4),
            ("encode", 5),
            ("encode-prefill", 6),
            ("encode-prefill-decode", 7),
            ("", 8),
        ]
        .iter()
        .map(|(r, i)| {
            if r.is_empty() {
                ep(*i)
            } else {
                ep_with(*i, &[(label::ROLE, r)], load(0, 0, 0.0))
            }
        })
        .collect();
        let p = build(TYPE, None).unwrap();
        assert_eq!(
            kept(&p, &eps),
            vec!["pod-2", "pod-3", "pod-4", "pod-6", "pod-7"]
        );
        assert!(build_err(TYPE, serde_json::json!({"x": 1})).contains("unknown field"));
    }
}
