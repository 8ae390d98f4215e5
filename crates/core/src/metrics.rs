//! Scheduler-level Prometheus metrics, with the reference EPP's names, labels and buckets.
//!
//! * `inference_extension_scheduler_e2e_duration_seconds` — one scheduling decision.
//! * `inference_extension_scheduler_attempts_total{status, target_model_name, pod_name,
//!   namespace, port}` (`target_model_name` bounded: [`crate::labels`]).
//! * `inference_extension_plugin_duration_seconds{extension_point, plugin_type, plugin_name}`.
//! * `inference_extension_prefix_indexer_size`, `..._hit_ratio`, `..._hit_bytes` — recorded
//!   by the prefix-cache plugins through [`PrefixIndexerMetrics`].
//! * `llm_d_epp_pd_decision_total` / `llm_d_epp_disagg_decision_total{plugin_name,
//!   plugin_type, model_name, decision_type}` and their deprecated twins
//!   `llm_d_inference_scheduler_{pd,disagg}_decision_total{model_name, decision_type}` —
//!   P/D decisions, recorded by the P/D profile handlers through [`DisaggMetrics`].
//!
//! Per-plugin histograms are resolved once when a profile is built, so the request path
//! records a duration without hashing label sets.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::labels::KnownNames;

/// Buckets of the scheduler and plugin duration histograms (100 µs .. 100 ms).
pub const SCHEDULER_BUCKETS: [f64; 10] = [
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
];

/// Extension point label values.
pub mod point {
    /// Filters.
    pub const FILTER: &str = "Filter";
    /// Scorers.
    pub const SCORER: &str = "Scorer";
    /// Pickers.
    pub const PICKER: &str = "Picker";
    /// Profile handler, choosing profiles.
    pub const PROFILE_PICKER: &str = "ProfilePicker";
    /// Profile handler, combining results.
    pub const PROCESS_PROFILES_RESULTS: &str = "ProcessProfilesResults";
    /// Data producers.
    pub const DATA_PRODUCER: &str = "DataProducer";
    /// Admission plugins.
    pub const ADMIT_REQUEST: &str = "AdmitRequest";
    /// Pre-request hooks.
    pub const PRE_REQUEST: &str = "PreRequest";
    /// Response-received hooks.
    pub const RESPONSE_RECEIVED: &str = "ResponseReceived";
    /// Response-streaming hooks.
    pub const RESPONSE_STREAMING: &str = "ResponseStreaming";
    /// Response-complete hooks.
    pub const RESPONSE_COMPLETE: &str = "ResponseComplete";
}

/// Labels of the plugin duration histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// Extension point.
    pub extension_point: String,
    /// Plugin type name.
    pub plugin_type: String,
    /// Plugin instance name.
    pub plugin_name: String,
}

/// Labels of the scheduler attempts counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// `success` or `failure`.
    pub status: String,
    /// Target model.
    pub target_model_name: String,
    /// Chosen endpoint's name ("" on failure).
    pub pod_name: String,
    /// Chosen endpoint's namespace ("" without Kubernetes).
    pub namespace: String,
    /// Chosen endpoint's port ("" on failure).
    pub port: String,
}

fn scheduler_histogram() -> Histogram {
    Histogram::new(SCHEDULER_BUCKETS)
}

/// Metrics recorded by the scheduler and the plugins.
#[derive(Clone)]
pub struct SchedulerMetrics {
    /// End-to-end scheduling duration.
    pub e2e: Histogram,
    /// Attempts by outcome.
    pub attempts: Family<AttemptLabels, Counter>,
    /// Per-plugin durations.
    pub plugin_duration: Family<PluginLabels, Histogram, fn() -> Histogram>,
    /// Prefix indexer metrics.
    pub prefix: PrefixIndexerMetrics,
    /// Which model names may be label values (`target_model_name` of the attempts); the
    /// director shares its own with these so both agree (see [`crate::labels`]).
    pub known: KnownNames,
    /// P/D disaggregation decisions.
    pub disagg: DisaggMetrics,
    /// Profiles scheduled over endpoints held back as unhealthy, because none of the
    /// healthy candidates passed the profile's filters (see [`crate::scheduler::Scheduler`]).
    pub profile_fail_open: Family<ProfileLabel, Counter>,
}

/// `profile` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProfileLabel {
    /// Scheduling profile name.
    pub profile: String,
}

impl std::fmt::Debug for SchedulerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SchedulerMetrics")
    }
}

impl Default for SchedulerMetrics {
    fn default() -> Self {
        Self {
            e2e: scheduler_histogram(),
            attempts: Family::default(),
            plugin_duration: Family::new_with_constructor(scheduler_histogram),
            prefix: PrefixIndexerMetrics::default(),
            known: KnownNames::default(),
            disagg: DisaggMetrics::default(),
            profile_fail_open: Family::default(),
        }
    }
}

impl SchedulerMetrics {
    /// New metrics registered into `registry` (which should carry no prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "inference_extension_scheduler_e2e_duration_seconds",
            "End-to-end scheduling latency distribution in seconds",
            m.e2e.clone(),
        );
        registry.register(
            "inference_extension_scheduler_attempts",
            "Total number of scheduling attempts",
            m.attempts.clone(),
        );
        registry.register(
            "inference_extension_plugin_duration_seconds",
            "Plugin processing latency distribution in seconds for each extension point, plugin type and plugin name",
            m.plugin_duration.clone(),
        );
        registry.register(
            "llmsched_endpoint_health_profile_fail_open",
            "Scheduling profiles run over endpoints held back as unhealthy because no healthy candidate passed the profile's filters",
            m.profile_fail_open.clone(),
        );
        m.prefix.register(registry);
        m.disagg.register(registry);
        m
    }

    /// The histogram of one plugin at one extension point (resolve once, record often).
    pub fn plugin_timer(
        &self,
        extension_point: &str,
        plugin_type: &str,
        plugin_name: &str,
    ) -> PluginTimer {
        PluginTimer(Some(
            self.plugin_duration
                .get_or_create(&PluginLabels {
                    extension_point: extension_point.to_string(),
                    plugin_type: plugin_type.to_string(),
                    plugin_name: plugin_name.to_string(),
                })
                .clone(),
        ))
    }
}

/// A pre-resolved plugin duration histogram; records nothing when metrics are off.
#[derive(Clone, Default)]
pub struct PluginTimer(Option<Histogram>);

impl std::fmt::Debug for PluginTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PluginTimer")
    }
}

impl PluginTimer {
    /// Records one call's duration.
    pub fn record(&self, d: Duration) {
        if let Some(h) = &self.0 {
            h.observe(d.as_secs_f64());
        }
    }
}

/// Metrics of the prefix indexers (shared by the approximate and precise scorers).
#[derive(Clone)]
pub struct PrefixIndexerMetrics {
    /// Entries in the index.
    pub size: Gauge,
    /// Matched prefix length / prompt length, per lookup.
    pub hit_ratio: Histogram,
    /// Matched prefix length in bytes, per lookup.
    pub hit_bytes: Histogram,
    /// Index memory estimate in bytes (llmsched extension).
    pub memory_bytes: Gauge,
}

impl std::fmt::Debug for PrefixIndexerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrefixIndexerMetrics")
    }
}

impl Default for PrefixIndexerMetrics {
    fn default() -> Self {
        Self {
            size: Gauge::default(),
            hit_ratio: Histogram::new([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
            hit_bytes: Histogram::new([
                0.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
                16384.0, 32768.0, 65536.0,
            ]),
            memory_bytes: Gauge::default(),
        }
    }
}

impl PrefixIndexerMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "inference_extension_prefix_indexer_size",
            "Size of the prefix indexer",
            self.size.clone(),
        );
        registry.register(
            "inference_extension_prefix_indexer_hit_ratio",
            "Ratio of prefix length matched to total prefix length in the cache lookup",
            self.hit_ratio.clone(),
        );
        registry.register(
            "inference_extension_prefix_indexer_hit_bytes",
            "Length of the prefix match in number of bytes in the cache lookup",
            self.hit_bytes.clone(),
        );
        registry.register(
            "llmsched_prefix_indexer_memory_bytes",
            "Estimated memory held by the prefix indexer, in bytes",
            self.memory_bytes.clone(),
        );
    }
}

/// Labels of the P/D decision counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// Profile handler instance name.
    pub plugin_name: String,
    /// Profile handler type.
    pub plugin_type: String,
    /// Target model (`unknown` when empty).
    pub model_name: String,
    /// `decode-only` or `prefill-decode`.
    pub decision_type: String,
}

/// Labels of the deprecated P/D decision counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LegacyDecisionLabels {
    /// Target model (`unknown` when empty).
    pub model_name: String,
    /// `decode-only` or `prefill-decode`.
    pub decision_type: String,
}

/// P/D decision counters, named as the reference names them: `pd-profile-handler` counts
/// into the `pd_decision` pair, `disagg-profile-handler` into the `disagg_decision` pair.
#[derive(Clone, Default)]
pub struct DisaggMetrics {
    /// `llm_d_epp_pd_decision_total`.
    pub pd: Family<DecisionLabels, Counter>,
    /// `llm_d_inference_scheduler_pd_decision_total` (deprecated by the reference).
    pub pd_legacy: Family<LegacyDecisionLabels, Counter>,
    /// `llm_d_epp_disagg_decision_total`.
    pub disagg: Family<DecisionLabels, Counter>,
    /// `llm_d_inference_scheduler_disagg_decision_total` (deprecated by the reference).
    pub disagg_legacy: Family<LegacyDecisionLabels, Counter>,
}

impl std::fmt::Debug for DisaggMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DisaggMetrics")
    }
}

impl DisaggMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "llm_d_epp_pd_decision",
            "Total number of P/D disaggregation decisions made",
            self.pd.clone(),
        );
        registry.register(
            "llm_d_inference_scheduler_pd_decision",
            "[Deprecated: Use llm_d_epp_pd_decision_total] Total number of P/D disaggregation decisions made",
            self.pd_legacy.clone(),
        );
        registry.register(
            "llm_d_epp_disagg_decision",
            "Total number of disaggregation routing decisions made",
            self.disagg.clone(),
        );
        registry.register(
            "llm_d_inference_scheduler_disagg_decision",
            "[Deprecated: Use llm_d_epp_disagg_decision_total] Total number of disaggregation routing decisions made",
            self.disagg_legacy.clone(),
        );
    }

    /// Counts one decision. `legacy_pd` selects the `pd_decision` pair (`pd-profile-handler`)
    /// instead of the `disagg_decision` pair.
    pub fn record(
        &self,
        legacy_pd: bool,
        plugin_name: &str,
        plugin_type: &str,
        model_name: &str,
        decision_type: &str,
    ) {
        let model_name = if model_name.is_empty() {
            "unknown"
        } else {
            model_name
        };
        let labels = DecisionLabels {
            plugin_name: plugin_name.to_string(),
            plugin_type: plugin_type.to_string(),
            model_name: model_name.to_string(),
            decision_type: decision_type.to_string(),
        };
        let legacy = LegacyDecisionLabels {
            model_name: model_name.to_string(),
            decision_type: decision_type.to_string(),
        };
        if legacy_pd {
            self.pd.get_or_create(&labels).inc();
            self.pd_legacy.get_or_create(&legacy).inc();
        } else {
            self.disagg.get_or_create(&labels).inc();
            self.disagg_legacy.get_or_create(&legacy).inc();
        }
    }
}

/// Shared handle type for the scheduler metrics.
pub type SharedSchedulerMetrics = Arc<SchedulerMetrics>;

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn names_match_the_reference() {
        let mut reg = Registry::default();
        let m = SchedulerMetrics::register(&mut reg);
        m.e2e.observe(0.00015);
        m.plugin_timer(point::SCORER, "queue-scorer", "queue-scorer")
            .record(Duration::from_micros(3));
        m.attempts
            .get_or_create(&AttemptLabels {
                status: "success".into(),
                target_model_name: "m".into(),
                pod_name: "p".into(),
                namespace: String::new(),
                port: "8000".into(),
            })
            .inc();
        m.disagg
            .record(false, "h", "disagg-profile-handler", "", "prefill-decode");
        m.disagg
            .record(true, "p", "pd-profile-handler", "m", "decode-only");
        let mut out = String::new();
        encode(&mut out, &reg).unwrap();
        for name in [
            "llm_d_epp_disagg_decision_total{plugin_name=\"h\",plugin_type=\"disagg-profile-handler\",model_name=\"unknown\",decision_type=\"prefill-decode\"} 1",
            "llm_d_inference_scheduler_disagg_decision_total{model_name=\"unknown\",decision_type=\"prefill-decode\"} 1",
            "llm_d_epp_pd_decision_total{plugin_name=\"p\",plugin_type=\"pd-profile-handler\",model_name=\"m\",decision_type=\"decode-only\"} 1",
            "llm_d_inference_scheduler_pd_decision_total{model_name=\"m\",decision_type=\"decode-only\"} 1",
            "inference_extension_scheduler_e2e_duration_seconds_bucket{le=\"0.0002\"} 1",
            "inference_extension_scheduler_attempts_total{status=\"success\"",
            "inference_extension_plugin_duration_seconds_count{extension_point=\"Scorer\",plugin_type=\"queue-scorer\",plugin_name=\"queue-scorer\"} 1",
            "inference_extension_prefix_indexer_size",
            "inference_extension_prefix_indexer_hit_ratio_bucket",
        ] {
            assert!(out.contains(name), "missing {name} in\n{out}");
        }
    }
}
