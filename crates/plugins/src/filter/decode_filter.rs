//! `decode-filter`: keeps endpoints that can serve the decode stage of P/D disaggregation.
//!
//! ## Rule
//!
//! ```text
//! keep(e) ⇔ label llm-d.ai/role of e ∈ {decode, prefill-decode, both, encode-prefill-decode}
//! ```
//!
//! and unlabelled endpoints pass.
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
pub const TYPE: &str = "decode-filter";

/// The decode role filter.
pub fn decode_filter(name: impl Into<String>) -> ByLabel {
    ByLabel::new(
        TYPE,
        name,
        label::ROLE,
        true,
        &[
            role::DECODE,
            role::PREFILL_DECODE,
            role::BOTH,
            role::ENCODE_PREFILL_DECODE,
        ],
    )
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(decode_filter(i.name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use crate::filter::by_label::tests::kept;

    #[test]
    fn decode_roles_and_unlabelled_pass() {
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
            vec!["pod-1", "pod-3", "pod-4", "pod-7", "pod-8"]
        );
        assert!(build_err(TYPE, serde_json::json!({"role": "decode"})).contains("unknown field"));
    }
}
