//! Filters: keep the candidates that may serve the request (order preserved).

pub mod by_label;
pub mod decode_filter;
pub mod encode_filter;
pub mod label_selector_filter;
pub mod prefill_filter;

use llmsched_core::registry::Registry;

pub use by_label::ByLabel;
pub use label_selector_filter::{LabelSelector, LabelSelectorFilter};

/// Registers every filter.
pub fn register(r: &mut Registry) {
    r.register(by_label::TYPE, by_label::factory);
    r.register(decode_filter::TYPE, decode_filter::factory);
    r.register(prefill_filter::TYPE, prefill_filter::factory);
    r.register(encode_filter::TYPE, encode_filter::factory);
    r.register(label_selector_filter::TYPE, label_selector_filter::factory);
    r.register(
        label_selector_filter::ALIAS_TYPE,
        label_selector_filter::alias_factory,
    );
}

/// P/D roles (values of the `llm-d.ai/role` label).
pub mod role {
    /// Prefill only.
    pub const PREFILL: &str = "prefill";
    /// Decode only.
    pub const DECODE: &str = "decode";
    /// Encode only (multimodal encoders).
    pub const ENCODE: &str = "encode";
    /// Prefill and decode.
    pub const PREFILL_DECODE: &str = "prefill-decode";
    /// Encode and prefill.
    pub const ENCODE_PREFILL: &str = "encode-prefill";
    /// Encode, prefill and decode.
    pub const ENCODE_PREFILL_DECODE: &str = "encode-prefill-decode";
    /// Deprecated spelling of `prefill-decode`.
    pub const BOTH: &str = "both";
}
