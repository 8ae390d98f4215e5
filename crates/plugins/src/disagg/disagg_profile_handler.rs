//! `disagg-profile-handler`: runs the decode profile, then — when the prefill decider agrees,
//! looking at the decode pick — the prefill profile; decode is the primary result. Also a
//! pre-request hook: it sets `x-prefiller-host-port` itself (the reference's current form,
//! which made `disagg-headers-handler` unnecessary).
//!
//! ## Rule
//!
//! ```text
//! stageOrder decode-first (default):
//!   run decode                      (failed ⇒ 429 "failed to find available decode workers")
//!   if deciders.prefill is set and a profile named profiles.prefill exists
//!      and decider.disaggregate(request, decode pick): run prefill
//! stageOrder prefill-first:
//!   run prefill (when that profile exists), then decode     (no prefill decider allowed)
//! result: primary = decode; prefill's pick (when it ran and chose one) → x-prefiller-host-port
//! ```
//!
//! Without `deciders.prefill` every request is decode-only (a static choice, as in the
//! reference). Each decision increments `llm_d_epp_disagg_decision_total{plugin_name,
//! plugin_type, model_name, decision_type="decode-only"|"prefill-decode"}` (and the deprecated
//! `llm_d_inference_scheduler_disagg_decision_total`).
//!
//! ## Parameters
//!
//! Nested form (current):
//!
//! * `profiles.decode` (string, default `decode`), `profiles.prefill` (default `prefill`),
//!   `profiles.encode` (default `encode`; accepted, never run);
//! * `deciders.prefill` (string, default none): instance name of a decider plugin
//!   (`prefix-based-pd-decider`, `always-disagg-pd-decider`); it may be declared after the
//!   handler. Not a decider, or no such plugin ⇒ load error;
//! * `deciders.encode`: refused (E/P/D is not implemented);
//! * `stageOrder` (`decode-first` | `prefill-first`, default `decode-first`).
//!
//! Flat form (deprecated by the reference, still accepted; do not mix the two):
//! `decodeProfile`, `prefillProfile`, `encodeProfile`, `prefillDeciderPluginName`,
//! `deciderPluginName` (alias of the former, lower priority), `encodeDeciderPluginName`.
//!
//! `primaryPort` (integer, 0 = off, else 1-65535; llmsched accepts it here as on
//! `pd-profile-handler`): see [`crate::disagg`].
//!
//! The decode profile must be one of `schedulingProfiles` (load error otherwise).

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::cycle::CycleState;
use llmsched_core::plugin::{PluginLookup, PreRequest, ProfileHandler};
use llmsched_core::registry::{FactoryInput, PluginError};
use llmsched_core::request::InferenceRequest;
use llmsched_core::scheduler::SchedulingResult;
use serde::Deserialize;

use super::{
    DEFAULT_DECODE_PROFILE, DEFAULT_ENCODE_PROFILE, DEFAULT_PREFILL_PROFILE, ENCODE_UNSUPPORTED,
    Gate, StageOrder, Stages, prefill_header, primary_port,
};
use crate::common::params;

/// Type name.
pub const TYPE: &str = "disagg-profile-handler";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ProfileNames {
    decode: Option<String>,
    prefill: Option<String>,
    encode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DeciderNames {
    prefill: Option<String>,
    encode: Option<String>,
}

/// Parameters as written (both forms).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct Params {
    stage_order: Option<String>,
    profiles: Option<ProfileNames>,
    deciders: Option<DeciderNames>,
    decode_profile: Option<String>,
    prefill_profile: Option<String>,
    encode_profile: Option<String>,
    prefill_decider_plugin_name: Option<String>,
    encode_decider_plugin_name: Option<String>,
    decider_plugin_name: Option<String>,
    primary_port: i64,
}

/// Resolved settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisaggSettings {
    /// Decode profile name.
    pub decode_profile: String,
    /// Prefill profile name.
    pub prefill_profile: String,
    /// Encode profile name (never run).
    pub encode_profile: String,
    /// Prefill decider instance name.
    pub prefill_decider: Option<String>,
    /// Stage order.
    pub order: StageOrder,
    /// `primaryPort`.
    pub primary_port: Option<u16>,
}

fn nonempty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

impl Params {
    fn resolve(self) -> Result<DisaggSettings, PluginError> {
        let nested = self.profiles.is_some() || self.deciders.is_some();
        let flat = [
            &self.decode_profile,
            &self.prefill_profile,
            &self.encode_profile,
            &self.prefill_decider_plugin_name,
            &self.encode_decider_plugin_name,
            &self.decider_plugin_name,
        ]
        .iter()
        .any(|v| v.is_some());
        if nested && flat {
            return Err(PluginError::Parameters(
                "use one format exclusively: either nested profiles/deciders or the deprecated flat fields (decodeProfile, prefillProfile, encodeProfile, prefillDeciderPluginName, deciderPluginName, encodeDeciderPluginName)".into(),
            ));
        }
        let (decode, prefill, encode, prefill_decider, encode_decider) = if flat {
            tracing::info!("{TYPE}: flat parameters are deprecated; use profiles.* and deciders.*");
            (
                self.decode_profile,
                self.prefill_profile,
                self.encode_profile,
                nonempty(self.prefill_decider_plugin_name).or(self.decider_plugin_name),
                self.encode_decider_plugin_name,
            )
        } else {
            let p = self.profiles.unwrap_or_default();
            let d = self.deciders.unwrap_or_default();
            (p.decode, p.prefill, p.encode, d.prefill, d.encode)
        };
        if nonempty(encode_decider).is_some() {
            return Err(PluginError::Parameters(format!(
                "deciders.encode: {ENCODE_UNSUPPORTED}"
            )));
        }
        let order = StageOrder::parse(self.stage_order.as_deref().unwrap_or(""))?;
        let prefill_decider = nonempty(prefill_decider);
        if order == StageOrder::PrefillFirst && prefill_decider.is_some() {
            return Err(PluginError::Parameters(
                "prefill decider is not supported in prefill-first stage order".into(),
            ));
        }
        Ok(DisaggSettings {
            decode_profile: nonempty(decode).unwrap_or_else(|| DEFAULT_DECODE_PROFILE.into()),
            prefill_profile: nonempty(prefill).unwrap_or_else(|| DEFAULT_PREFILL_PROFILE.into()),
            encode_profile: nonempty(encode).unwrap_or_else(|| DEFAULT_ENCODE_PROFILE.into()),
            prefill_decider,
            order,
            primary_port: primary_port(self.primary_port)?,
        })
    }
}

/// The disaggregation profile handler.
#[derive(Debug)]
pub struct DisaggProfileHandler {
    stages: Stages,
    settings: DisaggSettings,
}

impl DisaggProfileHandler {
    /// A handler from resolved settings; `metrics` receives the decision counts.
    pub fn new(
        name: impl Into<String>,
        settings: DisaggSettings,
        metrics: llmsched_core::metrics::DisaggMetrics,
    ) -> Self {
        let gate = match (&settings.prefill_decider, settings.order) {
            (Some(d), _) => Gate::decider(d.clone(), "deciders.prefill"),
            (None, _) => Gate::never(),
        };
        Self {
            stages: Stages {
                name: name.into(),
                type_name: TYPE,
                decode_profile: settings.decode_profile.clone(),
                prefill_profile: settings.prefill_profile.clone(),
                order: settings.order,
                gate,
                primary_port: settings.primary_port,
                pd_metrics: false,
                metrics,
            },
            settings,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &DisaggSettings {
        &self.settings
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let p: Params = params(i.parameters)?;
    let settings = p.resolve()?;
    if settings.prefill_decider.is_none() && settings.order == StageOrder::DecodeFirst {
        tracing::info!(
            handler = i.name,
            "no deciders.prefill configured: P/D disaggregation disabled"
        );
    }
    Ok(Arc::new(DisaggProfileHandler::new(
        i.name,
        settings,
        i.handle.metrics.disagg.clone(),
    )))
}

impl Plugin for DisaggProfileHandler {
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
        Some(self)
    }
    fn resolve_references(&self, plugins: PluginLookup<'_>) -> Result<(), PluginError> {
        self.stages.resolve(plugins)
    }

    fn holds_references(&self) -> bool {
        self.stages.gate.names_a_decider()
    }
}

super::profile_handler_via_stages!(DisaggProfileHandler);

impl PreRequest for DisaggProfileHandler {
    fn pre_request(
        &self,
        request: &InferenceRequest,
        _cycle: &CycleState,
        result: &SchedulingResult,
        headers_to_set: &mut Vec<(String, String)>,
    ) {
        prefill_header(
            request,
            result,
            &self.stages.prefill_profile,
            headers_to_set,
        );
        self.stages.primary_port_headers(result, headers_to_set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;

    fn settings(v: serde_json::Value) -> Result<DisaggSettings, String> {
        let p: Params = params(Some(&v)).map_err(|e| e.to_string())?;
        p.resolve().map_err(|e| e.to_string())
    }

    #[test]
    fn nested_flat_and_defaults() {
        let d = settings(serde_json::json!({})).unwrap();
        assert_eq!(
            (d.decode_profile.as_str(), d.prefill_profile.as_str()),
            ("decode", "prefill")
        );
        assert_eq!(d.prefill_decider, None);
        assert_eq!(d.order, StageOrder::DecodeFirst);
        let n = settings(serde_json::json!({
            "profiles": {"decode": "d", "prefill": "p"},
            "deciders": {"prefill": "dec"},
            "stageOrder": "Decode_First",
        }))
        .unwrap();
        assert_eq!(
            (
                n.decode_profile.as_str(),
                n.prefill_profile.as_str(),
                n.prefill_decider.as_deref()
            ),
            ("d", "p", Some("dec"))
        );
        let f = settings(serde_json::json!({
            "decodeProfile": "d", "prefillProfile": "p", "deciderPluginName": "old",
        }))
        .unwrap();
        assert_eq!(f.prefill_decider.as_deref(), Some("old"));
        // prefillDeciderPluginName wins over the older alias.
        let f = settings(serde_json::json!({
            "prefillDeciderPluginName": "new", "deciderPluginName": "old",
        }))
        .unwrap();
        assert_eq!(f.prefill_decider.as_deref(), Some("new"));
        assert_eq!(
            settings(serde_json::json!({"primaryPort": 8000}))
                .unwrap()
                .primary_port,
            Some(8000)
        );
    }

    #[test]
    fn bad_parameters_are_named() {
        for (v, want) in [
            (
                serde_json::json!({"profiles": {"decode": "d"}, "decodeProfile": "d"}),
                "use one format exclusively",
            ),
            (
                serde_json::json!({"deciders": {"encode": "always-disagg-multimodal-decider"}}),
                "deciders.encode: E/P/D",
            ),
            (
                serde_json::json!({"encodeDeciderPluginName": "x"}),
                "deciders.encode: E/P/D",
            ),
            (
                serde_json::json!({"stageOrder": "sideways"}),
                "invalid stage order",
            ),
            (
                serde_json::json!({"stageOrder": "prefill-first", "deciders": {"prefill": "x"}}),
                "not supported in prefill-first",
            ),
            (
                serde_json::json!({"primaryPort": 70000}),
                "invalid primaryPort",
            ),
            (
                serde_json::json!({"primaryPort": -1}),
                "invalid primaryPort",
            ),
            (
                serde_json::json!({"profiles": {"decoder": "d"}}),
                "unknown field `decoder`",
            ),
            (
                serde_json::json!({"threshold": 3}),
                "unknown field `threshold`",
            ),
        ] {
            let e = settings(v.clone()).unwrap_err();
            assert!(e.contains(want), "{v}: {e}");
        }
        assert!(build_err(TYPE, serde_json::json!({"deciders": "x"})).contains("invalid type"));
    }
}
