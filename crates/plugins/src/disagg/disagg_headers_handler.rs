//! `disagg-headers-handler` and its older name `prefill-header-handler`: pre-request hooks
//! that tell the decode endpoint's routing sidecar which endpoint prefills the request.
//! (`disagg-profile-handler` sets the same header itself; these are for configurations that
//! pair `pd-profile-handler` with a header handler, and are harmless next to
//! `disagg-profile-handler`.)
//!
//! ## Rule
//!
//! ```text
//! the scheduling result has a profile named prefillProfile with a target
//!     ⇒ x-prefiller-host-port: <ip:port of its first target>
//! otherwise, and the client sent x-prefiller-host-port
//!     ⇒ x-prefiller-host-port: ""   (cleared: the EPP decided to decode without a prefill hop)
//! ```
//!
//! The encode header (`x-encoder-hosts-ports`) is never set: no encode stage runs in llmsched.
//!
//! ## Parameters
//!
//! * `prefillProfile` (string, default `prefill`);
//! * `encodeProfile` (string, default `encode`; accepted, unused).

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::cycle::CycleState;
use llmsched_core::plugin::PreRequest;
use llmsched_core::registry::{FactoryInput, PluginError};
use llmsched_core::request::InferenceRequest;
use llmsched_core::scheduler::SchedulingResult;
use serde::Deserialize;

use super::{DEFAULT_PREFILL_PROFILE, prefill_header};
use crate::common::{impl_plugin, params};

/// Type name.
pub const TYPE: &str = "disagg-headers-handler";
/// The older type name.
pub const PREFILL_HEADER_HANDLER_TYPE: &str = "prefill-header-handler";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct Params {
    prefill_profile: Option<String>,
    encode_profile: Option<String>,
}

/// The P/D header hook.
#[derive(Debug, Clone)]
pub struct DisaggHeadersHandler {
    name: String,
    type_name: &'static str,
    prefill_profile: String,
}

impl DisaggHeadersHandler {
    /// A hook reading the profile `prefill_profile`.
    pub fn new(
        type_name: &'static str,
        name: impl Into<String>,
        prefill_profile: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            type_name,
            prefill_profile: prefill_profile.into(),
        }
    }
}

fn make(type_name: &'static str, i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let p: Params = params(i.parameters)?;
    let _ = p.encode_profile;
    tracing::info!(
        plugin = i.name,
        "{type_name} is deprecated by the reference; disagg-profile-handler sets the P/D headers itself"
    );
    Ok(Arc::new(DisaggHeadersHandler::new(
        type_name,
        i.name,
        p.prefill_profile
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_PREFILL_PROFILE.into()),
    )))
}

/// Factory of `disagg-headers-handler`.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    make(TYPE, i)
}

/// Factory of `prefill-header-handler`.
pub fn prefill_header_handler_factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    make(PREFILL_HEADER_HANDLER_TYPE, i)
}

impl_plugin!(DisaggHeadersHandler, field, as_pre_request => PreRequest);

impl PreRequest for DisaggHeadersHandler {
    fn pre_request(
        &self,
        request: &InferenceRequest,
        _cycle: &CycleState,
        result: &SchedulingResult,
        headers_to_set: &mut Vec<(String, String)>,
    ) {
        prefill_header(request, result, &self.prefill_profile, headers_to_set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use crate::disagg::PREFILLER_HOST_PORT;
    use llmsched_core::scheduler::ProfileRunResult;

    fn result(prefill: Option<u32>, name: &str) -> SchedulingResult {
        let mut profiles = vec![(
            "decode".to_string(),
            ProfileRunResult {
                targets: vec![ep(1)],
            },
        )];
        if let Some(p) = prefill {
            profiles.push((
                name.to_string(),
                ProfileRunResult {
                    targets: vec![ep(p), ep(9)],
                },
            ));
        }
        SchedulingResult {
            primary_profile: "decode".into(),
            profiles,
        }
    }

    fn headers(
        p: &Arc<dyn Plugin>,
        req: &InferenceRequest,
        r: &SchedulingResult,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        p.clone()
            .as_pre_request()
            .unwrap()
            .pre_request(req, &CycleState::new(), r, &mut out);
        out
    }

    #[test]
    fn prefill_target_becomes_the_header_or_a_client_value_is_cleared() {
        for t in [TYPE, PREFILL_HEADER_HANDLER_TYPE] {
            let p = build_with_name(t, None);
            assert_eq!(p.type_name(), t);
            let req = request("m");
            assert_eq!(
                headers(&p, &req, &result(Some(2), "prefill")),
                vec![(PREFILLER_HOST_PORT.to_string(), "10.0.0.2:8000".to_string())]
            );
            assert!(headers(&p, &req, &result(None, "prefill")).is_empty());
            let mut spoofed = request("m");
            spoofed
                .headers
                .insert(PREFILLER_HOST_PORT, "169.254.169.254:80");
            assert_eq!(
                headers(&p, &spoofed, &result(None, "prefill")),
                vec![(PREFILLER_HOST_PORT.to_string(), String::new())]
            );
            // A custom profile name.
            let custom = build_with_name(
                t,
                Some(serde_json::json!({"prefillProfile": "p2", "encodeProfile": "e"})),
            );
            assert!(headers(&custom, &req, &result(Some(2), "prefill")).is_empty());
            assert_eq!(
                headers(&custom, &req, &result(Some(3), "p2"))[0].1,
                "10.0.0.3:8000"
            );
            assert!(build_err(t, serde_json::json!({"profile": "x"})).contains("unknown field"));
        }
    }

    fn build_with_name(t: &str, v: Option<serde_json::Value>) -> Arc<dyn Plugin> {
        crate::common::testutil::build(t, v).unwrap()
    }
}
