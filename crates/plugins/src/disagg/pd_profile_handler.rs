//! `pd-profile-handler`: the older P/D profile handler, as most P/D configurations written
//! in 2025 use it (with `prefill-header-handler` setting the header). It is not a
//! pre-request hook for the prefill header — pair it with `prefill-header-handler` or
//! `disagg-headers-handler`, as those configurations do — but it is one for `primaryPort`.
//!
//! ## Rule
//!
//! ```text
//! run decode                      (failed ⇒ 429 "failed to find available decode workers")
//! disaggregate? — decided on the decode pick by, in this order:
//!   deciderPluginName set       ⇒ that decider plugin (must exist)
//!   threshold/hashBlockSize set ⇒ the built-in rule:
//!        threshold = 0 ⇒ yes
//!        else yes ⇔ prompt bytes − matched blocks(decode) × hashBlockSize ≥ threshold
//!   neither                     ⇒ the plugin named `prefix-based-pd-decider` when one is
//!                                 configured (the reference's current default), else the
//!                                 built-in rule with threshold 0 (always, the 2025 default)
//! yes and a profile named prefillProfile exists ⇒ run prefill
//! result: primary = decode (+ prefill's pick)
//! ```
//!
//! Prompt bytes are the completions prompt or the JSON of chat `messages` (what the
//! approximate prefix index hashes); matched blocks come from the prefix-cache producer
//! (none configured ⇒ 0). The reference subtracted one leading "model" block from its match
//! count; llmsched's index has no such block. Each decision increments
//! `llm_d_epp_pd_decision_total{plugin_name, plugin_type, model_name, decision_type}` and the
//! deprecated `llm_d_inference_scheduler_pd_decision_total{model_name, decision_type}`.
//!
//! ## Parameters
//!
//! * `threshold` (integer ≥ 0, default 0): uncached prompt characters from which to
//!   disaggregate; 0 = every request.
//! * `hashBlockSize` (integer > 0, default 64): characters per prefix block (match the
//!   prefix-cache scorer's block size).
//! * `decodeProfile` (default `decode`), `prefillProfile` (default `prefill`).
//! * `primaryPort` (integer, 0 = off, else 1-65535): see [`crate::disagg`].
//! * `deciderPluginName` (string): a decider plugin's instance name (may be declared later).
//!   Not allowed together with `threshold`/`hashBlockSize`.
//! * `prefixPluginType`, `prefixPluginName`, `prefixMatchInfoProducerName`: accepted for
//!   compatibility and unused (llmsched keeps one prefix match per request, whichever prefix
//!   plugin produced it).

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::cycle::CycleState;
use llmsched_core::plugin::{PluginLookup, PreRequest, ProfileHandler};
use llmsched_core::registry::{FactoryInput, PluginError};
use llmsched_core::request::InferenceRequest;
use llmsched_core::scheduler::SchedulingResult;
use serde::Deserialize;

use super::{
    DEFAULT_DECODE_PROFILE, DEFAULT_PREFILL_PROFILE, Gate, StageOrder, Stages, ThresholdRule,
    prefix_based_pd_decider, primary_port,
};
use crate::common::params;
use crate::prefix::DEFAULT_BLOCK_SIZE_TOKENS;
use crate::prefix::hashing::AVERAGE_CHARS_PER_TOKEN;

/// Type name.
pub const TYPE: &str = "pd-profile-handler";

/// Default `hashBlockSize`: 16 tokens × 4 characters.
pub const DEFAULT_HASH_BLOCK_SIZE: u64 =
    (DEFAULT_BLOCK_SIZE_TOKENS * AVERAGE_CHARS_PER_TOKEN) as u64;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct Params {
    threshold: Option<i64>,
    hash_block_size: Option<i64>,
    decode_profile: Option<String>,
    prefill_profile: Option<String>,
    prefix_plugin_type: Option<String>,
    prefix_plugin_name: Option<String>,
    prefix_match_info_producer_name: Option<String>,
    primary_port: i64,
    decider_plugin_name: Option<String>,
}

/// The older P/D profile handler.
#[derive(Debug)]
pub struct PdProfileHandler {
    stages: Stages,
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let p: Params = params(i.parameters)?;
    let _ = (
        &p.prefix_plugin_type,
        &p.prefix_plugin_name,
        &p.prefix_match_info_producer_name,
    );
    let threshold = match p.threshold {
        None => None,
        Some(t) if t < 0 => {
            return Err(PluginError::Parameters(format!(
                "invalid threshold: must be >= 0, got {t}"
            )));
        }
        Some(t) => Some(t.unsigned_abs()),
    };
    let hash_block_size = match p.hash_block_size {
        None => None,
        Some(b) if b <= 0 => {
            return Err(PluginError::Parameters(format!(
                "invalid hashBlockSize: must be > 0, got {b}"
            )));
        }
        Some(b) => Some(b.unsigned_abs()),
    };
    let decider = p.decider_plugin_name.filter(|d| !d.is_empty());
    let legacy = threshold.is_some() || hash_block_size.is_some();
    let rule = ThresholdRule {
        threshold: threshold.unwrap_or(0),
        hash_block_size: hash_block_size.unwrap_or(DEFAULT_HASH_BLOCK_SIZE),
    };
    let gate = match (decider, legacy) {
        (Some(_), true) => {
            return Err(PluginError::Parameters(
                "deciderPluginName cannot be combined with threshold/hashBlockSize: the decider decides (set its nonCachedTokens instead)".into(),
            ));
        }
        (Some(d), false) => Gate::decider(d, "deciderPluginName"),
        (None, true) => Gate::threshold(rule, None),
        (None, false) => Gate::threshold(rule, Some(prefix_based_pd_decider::TYPE)),
    };
    Ok(Arc::new(PdProfileHandler {
        stages: Stages {
            name: i.name.to_string(),
            type_name: TYPE,
            decode_profile: p
                .decode_profile
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_DECODE_PROFILE.into()),
            prefill_profile: p
                .prefill_profile
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_PREFILL_PROFILE.into()),
            order: StageOrder::DecodeFirst,
            gate,
            primary_port: primary_port(p.primary_port)?,
            pd_metrics: true,
            metrics: i.handle.metrics.disagg.clone(),
        },
    }))
}

impl Plugin for PdProfileHandler {
    fn type_name(&self) -> &'static str {
        TYPE
    }
    fn name(&self) -> &str {
        &self.stages.name
    }
    fn as_profile_handler(self: Arc<Self>) -> Option<Arc<dyn ProfileHandler>> {
        Some(self)
    }
    fn as_pre_request(self: Arc<Self>) -> Option<Arc<dyn PreRequest>> {
        self.stages.primary_port.is_some().then_some(self)
    }
    fn resolve_references(&self, plugins: PluginLookup<'_>) -> Result<(), PluginError> {
        self.stages.resolve(plugins)
    }

    fn holds_references(&self) -> bool {
        self.stages.gate.names_a_decider()
    }
}

super::profile_handler_via_stages!(PdProfileHandler);

impl PreRequest for PdProfileHandler {
    fn pre_request(
        &self,
        _request: &InferenceRequest,
        _cycle: &CycleState,
        result: &SchedulingResult,
        headers_to_set: &mut Vec<(String, String)>,
    ) {
        self.stages.primary_port_headers(result, headers_to_set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;

    #[test]
    fn parameters() {
        // Every parameter the 2025 configurations write is accepted.
        build(
            TYPE,
            Some(serde_json::json!({
                "threshold": 10, "hashBlockSize": 5, "decodeProfile": "decode",
                "prefillProfile": "prefill", "prefixPluginType": "prefix-cache-scorer",
                "prefixPluginName": "prefix-cache-scorer", "primaryPort": 8000,
            })),
        )
        .unwrap();
        build(
            TYPE,
            Some(serde_json::json!({"deciderPluginName": "d", "prefixMatchInfoProducerName": "x"})),
        )
        .unwrap();
        for (v, want) in [
            (serde_json::json!({"threshold": -1}), "invalid threshold"),
            (
                serde_json::json!({"hashBlockSize": 0}),
                "invalid hashBlockSize",
            ),
            (
                serde_json::json!({"primaryPort": 65536}),
                "invalid primaryPort",
            ),
            (
                serde_json::json!({"primaryPort": "${PRIMARY_PORT}"}),
                "invalid type",
            ),
            (
                serde_json::json!({"threshold": 5, "deciderPluginName": "d"}),
                "cannot be combined",
            ),
            (
                serde_json::json!({"tresholds": 5}),
                "unknown field `tresholds`",
            ),
        ] {
            let e = build_err(TYPE, v.clone());
            assert!(e.contains(want), "{v}: {e}");
        }
    }
}
