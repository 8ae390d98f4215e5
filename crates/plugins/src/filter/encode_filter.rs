//! `encode-filter`: keeps endpoints that can serve the encode stage of P/D disaggregation.
//!
//! ## Rule
//!
//! ```text
//! keep(e) ⇔ label llm-d.ai/role of e ∈ {encode, encode-prefill, encode-prefill-decode}
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
pub const TYPE: &str = "encode-filter";

/// The encode role filter.
pub fn encode_filter(name: impl Into<String>) -> ByLabel {
    ByLabel::new(
        TYPE,
        name,
        label::ROLE,
        false,
        &[
            role::ENCODE,
            role::ENCODE_PREFILL,
            role::ENCODE_PREFILL_DECODE,
        ],
    )
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(encode_filter(i.name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use crate::filter::by_label::tests::kept;

    #[test]
    fn encode_roles_pass_and_the_label_is_required() {
        let eps: Vec<_> = [
            ("decode", 1),
            ("prefill", 2),
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
        assert_eq!(kept(&p, &eps), vec!["pod-5", "pod-6", "pod-7"]);
        assert!(build_err(TYPE, serde_json::json!({"x": 1})).contains("unknown field"));
    }
}
