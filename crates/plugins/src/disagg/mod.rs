//! Prefill/decode (P/D) disaggregation: the profile handlers that run a `decode` profile and,
//! when a decider says so, a `prefill` profile; the deciders; and the pre-request hooks that
//! tell the decode endpoint's routing sidecar where to prefill (`x-prefiller-host-port`).
//!
//! | type | role |
//! | --- | --- |
//! | `disagg-profile-handler` | profile handler + pre-request hook (sets the P/D headers itself) |
//! | `pd-profile-handler` | the older profile handler (`threshold`, `hashBlockSize`, `primaryPort`, `deciderPluginName`) |
//! | `prefix-based-pd-decider` | disaggregate when the prompt's part not cached on the chosen decode endpoint ≥ `nonCachedTokens` |
//! | `always-disagg-pd-decider` | disaggregate every request |
//! | `disagg-headers-handler`, `prefill-header-handler` | pre-request hooks setting `x-prefiller-host-port` |
//!
//! ## One request
//!
//! 1. The handler runs the decode profile (filters such as `decode-filter`, scorers, picker).
//! 2. It asks its gate (a decider, or `pd-profile-handler`'s built-in threshold rule) about
//!    the chosen decode endpoint. Yes ⇒ it runs the prefill profile (`prefill-filter` …).
//! 3. The result's primary profile is `decode`: its targets become
//!    `x-gateway-destination-endpoint`. The prefill target, when there is one, goes into
//!    `x-prefiller-host-port: ip:port`. A client-sent `x-prefiller-host-port` is cleared
//!    (set empty) when the EPP decided not to disaggregate, so clients cannot pick a
//!    prefiller themselves.
//! 4. The prefix-cache plugins record the prompt's blocks on the decode target and on the
//!    prefill target (the profile named `prefill`, as in the reference): after a
//!    disaggregated request both hold the prompt (the prefill replica computed it; the
//!    decode replica received it over NIXL and keeps it in its prefix cache).
//!
//! With `primaryPort` set (the reference's vLLM data-parallel workaround), the destination
//! is every decode target with its port replaced by `primaryPort` (where the sidecar
//! listens), and `x-data-parallel-host-port` carries the chosen `ip:port` so the sidecar can
//! forward to that rank. The scheduler's accounting (in-flight counts, prefix index) stays on
//! the endpoint that was chosen.
//!
//! Stages of encode (E/P/D) are not implemented: an encode decider is refused at load.

pub mod always_disagg_pd_decider;
pub mod disagg_headers_handler;
pub mod disagg_profile_handler;
pub mod pd_profile_handler;
pub mod prefix_based_pd_decider;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use llmsched_core::cycle::PrefixCacheMatch;
use llmsched_core::endpoint::Endpoint;
use llmsched_core::metrics::DisaggMetrics;
use llmsched_core::plugin::{DisaggDecider, PluginLookup, SchedulingContext};
use llmsched_core::registry::{PluginError, Registry};
use llmsched_core::request::{InferenceRequest, header};
use llmsched_core::scheduler::{
    ProfileResults, SchedulerProfile, SchedulingError, SchedulingResult,
};
use smallvec::SmallVec;

pub use always_disagg_pd_decider::AlwaysDisaggPdDecider;
pub use disagg_headers_handler::DisaggHeadersHandler;
pub use disagg_profile_handler::DisaggProfileHandler;
pub use pd_profile_handler::PdProfileHandler;
pub use prefix_based_pd_decider::PrefixBasedPdDecider;

/// Default name of the decode profile.
pub const DEFAULT_DECODE_PROFILE: &str = "decode";
/// Default name of the prefill profile.
pub const DEFAULT_PREFILL_PROFILE: &str = "prefill";
/// Default name of the encode profile.
pub const DEFAULT_ENCODE_PROFILE: &str = "encode";
/// Header naming the prefill endpoint (`ip:port`) for the decode endpoint's sidecar.
pub const PREFILLER_HOST_PORT: &str = header::PREFILLER_HOST_PORT;
/// Header naming the data-parallel rank (`ip:port`) the sidecar forwards to when
/// `primaryPort` is set.
pub const DATA_PARALLEL_HOST_PORT: &str = "x-data-parallel-host-port";
/// Decision label: the decode endpoint prefills itself.
pub const DECISION_DECODE_ONLY: &str = "decode-only";
/// Decision label: a prefill endpoint prefills, the decode endpoint decodes.
pub const DECISION_PREFILL_DECODE: &str = "prefill-decode";
/// Error when the decode profile chose nothing (the reference's message).
pub const NO_DECODE_WORKERS_MSG: &str = "failed to find available decode workers";
/// Why encode stages are refused.
pub const ENCODE_UNSUPPORTED: &str = "E/P/D (encode) disaggregation is not supported by llmsched yet: the routing sidecar has no encoder hop";

/// Registers the P/D plugins.
pub fn register(r: &mut Registry) {
    r.register(
        disagg_profile_handler::TYPE,
        disagg_profile_handler::factory,
    );
    r.register(pd_profile_handler::TYPE, pd_profile_handler::factory);
    r.register(
        prefix_based_pd_decider::TYPE,
        prefix_based_pd_decider::factory,
    );
    r.register(
        always_disagg_pd_decider::TYPE,
        always_disagg_pd_decider::factory,
    );
    r.register(
        disagg_headers_handler::TYPE,
        disagg_headers_handler::factory,
    );
    r.register(
        disagg_headers_handler::PREFILL_HEADER_HANDLER_TYPE,
        disagg_headers_handler::prefill_header_handler_factory,
    );
}

/// Order of the stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StageOrder {
    /// Decode, then (if the gate agrees, looking at the decode pick) prefill. The default.
    #[default]
    DecodeFirst,
    /// Prefill (whenever a prefill profile exists), then decode.
    PrefillFirst,
}

impl StageOrder {
    /// Parses `decode-first` / `prefill-first` (also `decode`, `prefill`, any case, `_` or
    /// `-` ignored, as the reference does); empty is the default.
    pub fn parse(s: &str) -> Result<Self, PluginError> {
        let norm: String = s
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .flat_map(char::to_lowercase)
            .collect();
        match norm.as_str() {
            "" | "decodefirst" | "decode" => Ok(Self::DecodeFirst),
            "prefillfirst" | "prefill" => Ok(Self::PrefillFirst),
            _ => Err(PluginError::Parameters(format!(
                "stageOrder: invalid stage order \"{s}\", must be \"decode-first\" or \"prefill-first\""
            ))),
        }
    }
}

/// `pd-profile-handler`'s built-in rule (before deciders existed).
///
/// ```text
/// threshold = 0                                   ⇒ disaggregate
/// uncached = prompt bytes − matched blocks(decode) × hashBlockSize
/// disaggregate ⇔ uncached ≥ threshold
/// ```
///
/// Prompt bytes are the completions prompt or the JSON of chat `messages` (what the
/// approximate prefix index hashes); matched blocks come from the prefix-cache producer
/// (none configured ⇒ 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThresholdRule {
    /// Uncached prompt characters from which to disaggregate (0 = always).
    pub threshold: u64,
    /// Characters per prefix block.
    pub hash_block_size: u64,
}

impl ThresholdRule {
    /// The rule's decision for `decode`.
    pub fn disaggregate(&self, cx: &SchedulingContext<'_>, decode: &Endpoint) -> bool {
        if self.threshold == 0 {
            return true;
        }
        let len = cx.request.prompt().text_len() as f64;
        let hit = cx.cycle.get::<PrefixCacheMatch>().map_or(0.0, |m| {
            m.matched(decode.id()) * self.hash_block_size as f64
        });
        (len - hit).max(0.0) >= self.threshold as f64
    }
}

/// Whether the prefill stage runs: a decider plugin (resolved by name after the
/// configuration is loaded), else the built-in threshold rule, else never.
pub(crate) struct Gate {
    /// The decider's instance name.
    decider_name: Option<String>,
    /// A missing decider is a load error (else the threshold rule applies).
    decider_required: bool,
    /// Where the referenced parameter is written, for errors.
    decider_param: &'static str,
    decider: OnceLock<Arc<dyn DisaggDecider>>,
    threshold: Option<ThresholdRule>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("decider", &self.decider_name)
            .field(
                "resolved",
                &self.decider.get().map(|d| d.name().to_string()),
            )
            .field("threshold", &self.threshold)
            .finish()
    }
}

impl Gate {
    /// No prefill stage at all.
    pub(crate) fn never() -> Self {
        Self {
            decider_name: None,
            decider_required: false,
            decider_param: "",
            decider: OnceLock::new(),
            threshold: None,
        }
    }

    /// The named decider, which must exist.
    pub(crate) fn decider(name: String, param: &'static str) -> Self {
        Self {
            decider_name: Some(name),
            decider_required: true,
            decider_param: param,
            ..Self::never()
        }
    }

    /// The threshold rule, or the named decider when one of that name is configured.
    pub(crate) fn threshold(rule: ThresholdRule, optional_decider: Option<&str>) -> Self {
        Self {
            decider_name: optional_decider.map(str::to_string),
            threshold: Some(rule),
            ..Self::never()
        }
    }

    fn resolve(&self, plugins: PluginLookup<'_>) -> Result<(), PluginError> {
        let Some(name) = &self.decider_name else {
            return Ok(());
        };
        match plugins(name) {
            Some(p) => {
                let t = p.type_name();
                let d = p.as_disagg_decider().ok_or_else(|| {
                    PluginError::Other(format!(
                        "{}: plugin '{name}' (type {t}) is not a P/D decider",
                        self.decider_param
                    ))
                })?;
                // A configuration is loaded once; a second resolve keeps the first.
                let _ = self.decider.set(d);
                Ok(())
            }
            None if self.decider_required => Err(PluginError::Other(format!(
                "{}: no plugin named '{name}' is configured",
                self.decider_param
            ))),
            None => Ok(()),
        }
    }

    /// True when a decider is named (resolved to another plugin instance).
    pub(crate) fn names_a_decider(&self) -> bool {
        self.decider_name.is_some()
    }

    /// True when the prefill stage may ever run.
    pub(crate) fn enabled(&self) -> bool {
        self.decider_name.is_some() || self.threshold.is_some()
    }

    fn disaggregate(&self, cx: &SchedulingContext<'_>, decode: &Endpoint) -> bool {
        if let Some(d) = self.decider.get() {
            return d.disaggregate(cx, decode);
        }
        self.threshold.is_some_and(|r| r.disaggregate(cx, decode))
    }
}

/// Implements `ProfileHandler` for a P/D handler type by forwarding to its `stages` field:
/// `disagg-profile-handler` and `pd-profile-handler` differ only in how they read their
/// parameters into [`Stages`].
macro_rules! profile_handler_via_stages {
    ($ty:ty) => {
        impl llmsched_core::plugin::ProfileHandler for $ty {
            fn pick_profiles(
                &self,
                cx: &llmsched_core::plugin::SchedulingContext<'_>,
                profiles: &[std::sync::Arc<llmsched_core::scheduler::SchedulerProfile>],
                results: &llmsched_core::scheduler::ProfileResults,
            ) -> smallvec::SmallVec<[usize; 2]> {
                self.stages.pick(cx, profiles, results)
            }

            fn process_results(
                &self,
                _cx: &llmsched_core::plugin::SchedulingContext<'_>,
                results: llmsched_core::scheduler::ProfileResults,
            ) -> Result<
                llmsched_core::scheduler::SchedulingResult,
                llmsched_core::scheduler::SchedulingError,
            > {
                self.stages.process(results)
            }

            fn check_profiles(
                &self,
                profiles: &[&str],
            ) -> Result<(), llmsched_core::registry::PluginError> {
                self.stages.check_profiles(profiles)
            }
        }
    };
}
pub(crate) use profile_handler_via_stages;

/// The state machine shared by `disagg-profile-handler` and `pd-profile-handler`.
#[derive(Debug)]
pub(crate) struct Stages {
    pub(crate) name: String,
    pub(crate) type_name: &'static str,
    pub(crate) decode_profile: String,
    pub(crate) prefill_profile: String,
    pub(crate) order: StageOrder,
    pub(crate) gate: Gate,
    pub(crate) primary_port: Option<u16>,
    /// Count into the `pd_decision` metrics (`pd-profile-handler`) instead of
    /// `disagg_decision`.
    pub(crate) pd_metrics: bool,
    pub(crate) metrics: DisaggMetrics,
}

fn index_of(profiles: &[Arc<SchedulerProfile>], name: &str) -> Option<usize> {
    profiles.iter().position(|p| p.name() == name)
}

impl Stages {
    pub(crate) fn resolve(&self, plugins: PluginLookup<'_>) -> Result<(), PluginError> {
        self.gate.resolve(plugins)
    }

    pub(crate) fn check_profiles(&self, profiles: &[&str]) -> Result<(), PluginError> {
        if !profiles.contains(&self.decode_profile.as_str()) {
            return Err(PluginError::Other(format!(
                "the decode profile '{}' is not among schedulingProfiles ({})",
                self.decode_profile,
                profiles.join(", ")
            )));
        }
        if self.decode_profile == self.prefill_profile {
            return Err(PluginError::Other(format!(
                "the decode and prefill profiles must differ (both '{}')",
                self.decode_profile
            )));
        }
        let has_prefill = profiles.contains(&self.prefill_profile.as_str());
        if !has_prefill && self.gate.enabled() {
            tracing::warn!(
                handler = %self.name,
                prefill_profile = %self.prefill_profile,
                "P/D: no scheduling profile of that name; every request is decoded without a separate prefill"
            );
        }
        if let Some(extra) = profiles
            .iter()
            .find(|p| **p != self.decode_profile && **p != self.prefill_profile)
        {
            tracing::warn!(handler = %self.name, profile = %extra, "P/D: this profile never runs");
        }
        Ok(())
    }

    fn record(&self, cx: &SchedulingContext<'_>, results: &ProfileResults, prefill: Option<usize>) {
        let prefilled = prefill.is_some_and(|_| {
            results
                .get(&self.prefill_profile)
                .is_some_and(|r| !r.targets.is_empty())
        });
        self.metrics.record(
            self.pd_metrics,
            &self.name,
            self.type_name,
            &cx.request.target_model,
            if prefilled {
                DECISION_PREFILL_DECODE
            } else {
                DECISION_DECODE_ONLY
            },
        );
    }

    pub(crate) fn pick(
        &self,
        cx: &SchedulingContext<'_>,
        profiles: &[Arc<SchedulerProfile>],
        results: &ProfileResults,
    ) -> SmallVec<[usize; 2]> {
        let Some(decode) = index_of(profiles, &self.decode_profile) else {
            return SmallVec::new();
        };
        let prefill = index_of(profiles, &self.prefill_profile);
        let decode_target = || {
            results
                .get(&self.decode_profile)
                .and_then(|r| r.targets.first())
        };
        match self.order {
            StageOrder::DecodeFirst => {
                if !results.has_run(decode) {
                    return SmallVec::from_slice(&[decode]);
                }
                // Decode failed: nothing more to run (processing reports the error).
                let Some(target) = decode_target() else {
                    return SmallVec::new();
                };
                if let Some(p) = prefill
                    && !results.has_run(p)
                    && self.gate.disaggregate(cx, target)
                {
                    return SmallVec::from_slice(&[p]);
                }
                self.record(cx, results, prefill);
                SmallVec::new()
            }
            StageOrder::PrefillFirst => {
                if let Some(p) = prefill
                    && !results.has_run(p)
                {
                    return SmallVec::from_slice(&[p]);
                }
                if !results.has_run(decode) {
                    return SmallVec::from_slice(&[decode]);
                }
                if decode_target().is_some() {
                    self.record(cx, results, prefill);
                }
                SmallVec::new()
            }
        }
    }

    pub(crate) fn process(
        &self,
        results: ProfileResults,
    ) -> Result<SchedulingResult, SchedulingError> {
        let mut decode = None;
        let mut prefill = None;
        for (_, name, r) in results.entries {
            let Some(r) = r.filter(|r| !r.targets.is_empty()) else {
                continue;
            };
            if name == self.decode_profile {
                decode = Some((name, r));
            } else if name == self.prefill_profile {
                prefill = Some((name, r));
            }
        }
        let decode =
            decode.ok_or_else(|| SchedulingError::Handler(NO_DECODE_WORKERS_MSG.to_string()))?;
        let primary_profile = decode.0.clone();
        let mut profiles = Vec::with_capacity(2);
        profiles.push(decode);
        profiles.extend(prefill);
        Ok(SchedulingResult {
            primary_profile,
            profiles,
        })
    }

    /// The `primaryPort` headers: the destination rewritten to the sidecar's port and the
    /// chosen rank in `x-data-parallel-host-port`.
    pub(crate) fn primary_port_headers(
        &self,
        result: &SchedulingResult,
        headers_to_set: &mut Vec<(String, String)>,
    ) {
        let Some(port) = self.primary_port else {
            return;
        };
        let targets = result.targets();
        let Some(first) = targets.first() else {
            return;
        };
        headers_to_set.push((
            DATA_PARALLEL_HOST_PORT.to_string(),
            first.hostport().to_string(),
        ));
        let destination = targets
            .iter()
            .map(|t| SocketAddr::new(t.meta().address, port).to_string())
            .collect::<Vec<_>>()
            .join(",");
        headers_to_set.push((header::DESTINATION_ENDPOINT.to_string(), destination));
    }
}

/// Sets `x-prefiller-host-port` to the first target of `prefill_profile`, or clears a
/// client-sent value when there is none (the EPP decided to decode without a separate
/// prefill).
pub(crate) fn prefill_header(
    request: &InferenceRequest,
    result: &SchedulingResult,
    prefill_profile: &str,
    headers_to_set: &mut Vec<(String, String)>,
) {
    match result
        .profile(prefill_profile)
        .and_then(|r| r.targets.first())
    {
        Some(p) => headers_to_set.push((PREFILLER_HOST_PORT.to_string(), p.hostport().to_string())),
        None if request.headers.get(PREFILLER_HOST_PORT).is_some() => {
            headers_to_set.push((PREFILLER_HOST_PORT.to_string(), String::new()));
        }
        None => {}
    }
}

/// Validates a `primaryPort` parameter: 0 = off, else 1-65535.
pub(crate) fn primary_port(v: i64) -> Result<Option<u16>, PluginError> {
    match v {
        0 => Ok(None),
        1..=65535 => Ok(u16::try_from(v).ok()),
        _ => Err(PluginError::Parameters(format!(
            "invalid primaryPort: must be between 1 and 65535, got {v}"
        ))),
    }
}
