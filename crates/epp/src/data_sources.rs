//! The configuration's data layer: `dataLayer.sources` and the `metrics-data-source` /
//! `core-metrics-extractor` parameters, resolved into the scraper's settings.
//!
//! llmsched scrapes one Prometheus source per endpoint with one extractor. Which plugin
//! instances play those roles:
//!
//! * `dataLayer.sources` lists them: exactly one source, of type `metrics-data-source`, with
//!   exactly one extractor, of type `core-metrics-extractor`;
//! * no sources listed: the instances named `metrics-data-source` and
//!   `core-metrics-extractor` when declared (the names the reference injects by default),
//!   else both with default parameters;
//! * `dataLayer.injectDefaults: false` with no source would turn scraping off, which
//!   llmsched cannot run without (scheduling and endpoint health read the metrics): refused.
//!
//! Anything else is refused at load with the reason: a second source, a source or extractor
//! of another type, a source without extractor, an instance of either type declared but not
//! used. A parameter the configuration sets wins over the matching flag
//! (`scheme` over `--model-server-metrics-scheme`, `insecureSkipVerify` over
//! `--model-server-metrics-https-insecure-skip-verify`, `path`, `port`); parameters left out
//! keep the flag's value. TLS files are read here, so a missing or malformed file fails the
//! load (or the reload) with its name.

use std::path::PathBuf;
use std::time::Duration;

use llmsched_core::config::LoadedConfig;
use llmsched_datalayer::mapping::{MetricSpec, VLLM_KV_USAGE, VLLM_KV_USAGE_OLD};
use llmsched_datalayer::{DataLayerConfig, EngineMapping, MetricsScheme};
use llmsched_plugins::descriptor::{
    CoreMetricsExtractorParams, EngineConfig, MetricsDataSourceParams,
};

/// Type of the metrics source.
pub const SOURCE_TYPE: &str = "metrics-data-source";
/// Type of the metrics extractor.
pub const EXTRACTOR_TYPE: &str = "core-metrics-extractor";

/// What the configuration says about scraping (fields it leaves out are `None`). Compared
/// on reload: the running scraper keeps its settings, so a change needs a restart.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DataLayerPlan {
    /// Name of the source instance, when one is configured.
    pub source: Option<String>,
    /// Name of the extractor instance, when one is configured.
    pub extractor: Option<String>,
    /// `scheme`.
    pub scheme: Option<MetricsScheme>,
    /// `path`.
    pub path: Option<String>,
    /// `port`.
    pub port: Option<u16>,
    /// `interval`.
    pub interval: Option<Duration>,
    /// `insecureSkipVerify`.
    pub insecure_skip_verify: Option<bool>,
    /// `caCertPath`.
    pub ca_cert_path: Option<PathBuf>,
    /// `clientCertPath`.
    pub client_cert_path: Option<PathBuf>,
    /// `clientKeyPath`.
    pub client_key_path: Option<PathBuf>,
    /// `engineLabelKey` (with its default).
    pub engine_label_key: Option<String>,
    /// `defaultEngine` (with its default).
    pub default_engine: Option<String>,
    /// `engineConfigs`.
    pub engine_configs: Vec<(String, EngineMapping)>,
}

fn spec_of(engine: &str, field: &str, value: &str) -> Result<Option<MetricSpec>, String> {
    MetricSpec::parse(value).map_err(|e| format!("engineConfigs '{engine}': {field}: {e}"))
}

/// An `engineConfigs` entry as a mapping: it replaces the engine's mapping as a whole, an
/// empty spec disables that metric.
pub fn engine_mapping(e: &EngineConfig) -> Result<EngineMapping, String> {
    let n = e.name.as_str();
    let kv_usage = match spec_of(n, "kvUsageSpec", &e.kv_usage_spec)? {
        None => Vec::new(),
        // Naming vLLM's current metric keeps the fallback to its older name.
        Some(s) if s == MetricSpec::named(VLLM_KV_USAGE) => {
            vec![s, MetricSpec::named(VLLM_KV_USAGE_OLD)]
        }
        Some(s) => vec![s],
    };
    let label = |v: &str, default: &str| {
        if v.is_empty() {
            default.to_string()
        } else {
            v.to_string()
        }
    };
    Ok(EngineMapping {
        queued_requests: spec_of(n, "queuedRequestsSpec", &e.queued_requests_spec)?,
        running_requests: spec_of(n, "runningRequestsSpec", &e.running_requests_spec)?,
        kv_usage,
        lora_info: spec_of(n, "loraSpec", &e.lora_spec)?,
        cache_info: spec_of(n, "cacheInfoSpec", &e.cache_info_spec)?,
        cache_block_size_label: label(&e.cache_block_size_label_name, "block_size"),
        cache_num_blocks_label: label(&e.cache_num_blocks_label_name, "num_gpu_blocks"),
        cache_block_size: spec_of(n, "cacheBlockSizeSpec", &e.cache_block_size_spec)?,
        cache_num_blocks: spec_of(n, "cacheNumBlocksSpec", &e.cache_num_blocks_spec)?,
    })
}

/// The type of plugin `name` and its `parameters`, as configured.
fn instance<'a>(
    config: &'a LoadedConfig,
    name: &str,
) -> Option<(&'static str, Option<&'a serde_json::Value>)> {
    let (_, p) = config.plugins.iter().find(|(n, _)| n == name)?;
    let params = config
        .document
        .plugins
        .iter()
        .find(|s| s.name.as_deref() == Some(name))
        .and_then(|s| s.parameters.as_ref());
    Some((p.type_name(), params))
}

fn has_key(params: Option<&serde_json::Value>, key: &str) -> bool {
    params
        .and_then(|p| p.get(key))
        .is_some_and(|v| !v.is_null())
}

impl DataLayerPlan {
    /// Resolves the configuration's data layer (see the module documentation).
    pub fn resolve(config: &LoadedConfig) -> Result<Self, String> {
        let declared = |t: &str| -> Vec<String> {
            config
                .plugins
                .iter()
                .filter(|(_, p)| p.type_name() == t)
                .map(|(n, _)| n.clone())
                .collect()
        };
        let (source, extractor) = match &config.data_layer {
            Some(dl) if !dl.sources.is_empty() => {
                if dl.sources.len() > 1 {
                    return Err(format!(
                        "dataLayer.sources lists {} sources: llmsched scrapes one metrics source ({SOURCE_TYPE}) per endpoint",
                        dl.sources.len()
                    ));
                }
                let s = &dl.sources[0];
                match instance(config, &s.plugin_ref) {
                    Some((SOURCE_TYPE, _)) => {}
                    Some((t, _)) => {
                        return Err(format!(
                            "dataLayer.sources[0]: plugin '{}' (type {t}) is not a data source llmsched supports (type {SOURCE_TYPE})",
                            s.plugin_ref
                        ));
                    }
                    None => {
                        return Err(format!(
                            "dataLayer.sources[0] references undefined plugin '{}'",
                            s.plugin_ref
                        ));
                    }
                }
                let ex = match s.extractors.as_slice() {
                    [] => {
                        return Err(format!(
                            "dataLayer.sources[0] ('{}') has no extractors: its metrics would be scraped and discarded; add {{pluginRef: {EXTRACTOR_TYPE}}}",
                            s.plugin_ref
                        ));
                    }
                    [e] => e,
                    more => {
                        return Err(format!(
                            "dataLayer.sources[0] ('{}') lists {} extractors: llmsched reads the metrics with one {EXTRACTOR_TYPE}",
                            s.plugin_ref,
                            more.len()
                        ));
                    }
                };
                match instance(config, &ex.plugin_ref) {
                    Some((EXTRACTOR_TYPE, _)) => {}
                    Some((t, _)) => {
                        return Err(format!(
                            "dataLayer.sources[0].extractors[0]: plugin '{}' (type {t}) is not an extractor llmsched supports (type {EXTRACTOR_TYPE})",
                            ex.plugin_ref
                        ));
                    }
                    None => {
                        return Err(format!(
                            "dataLayer.sources[0].extractors[0] references undefined plugin '{}'",
                            ex.plugin_ref
                        ));
                    }
                }
                (Some(s.plugin_ref.clone()), Some(ex.plugin_ref.clone()))
            }
            Some(dl) if dl.inject_defaults == Some(false) => {
                return Err(format!(
                    "dataLayer.injectDefaults is false and no source is listed, which turns metrics scraping off: llmsched schedules and judges endpoint health on the model servers' metrics; list a {SOURCE_TYPE} in dataLayer.sources or drop injectDefaults: false"
                ));
            }
            _ => {
                let by_name = |n: &str, t: &str| {
                    instance(config, n)
                        .filter(|(ty, _)| *ty == t)
                        .map(|_| n.to_string())
                };
                (
                    by_name(SOURCE_TYPE, SOURCE_TYPE),
                    by_name(EXTRACTOR_TYPE, EXTRACTOR_TYPE),
                )
            }
        };
        for (t, used) in [(SOURCE_TYPE, &source), (EXTRACTOR_TYPE, &extractor)] {
            if let Some(unused) = declared(t)
                .into_iter()
                .find(|n| used.as_deref() != Some(n.as_str()))
            {
                return Err(format!(
                    "plugin '{unused}' (type {t}) is declared but not used: llmsched reads one {t}, the one listed in dataLayer.sources (or, without sources, the one named '{t}')"
                ));
            }
        }

        let mut plan = DataLayerPlan {
            source: source.clone(),
            extractor: extractor.clone(),
            ..DataLayerPlan::default()
        };
        if let Some(name) = &source {
            let raw = instance(config, name).and_then(|(_, p)| p);
            let fail = |e: String| format!("plugin '{name}' (type {SOURCE_TYPE}): {e}");
            let p = MetricsDataSourceParams::from_value(raw).map_err(|e| fail(e.to_string()))?;
            let path = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
            if has_key(raw, "scheme") {
                plan.scheme = MetricsScheme::parse(&p.scheme);
            }
            if has_key(raw, "path") {
                plan.path = Some(p.path.clone());
            }
            if has_key(raw, "insecureSkipVerify") {
                plan.insecure_skip_verify = Some(p.insecure_skip_verify);
            }
            plan.port = p.port();
            plan.interval = p.interval().map_err(|e| fail(e.to_string()))?;
            plan.ca_cert_path = path(&p.ca_cert_path);
            plan.client_cert_path = path(&p.client_cert_path);
            plan.client_key_path = path(&p.client_key_path);
        }
        if let Some(name) = &extractor {
            let raw = instance(config, name).and_then(|(_, p)| p);
            let fail = |e: String| format!("plugin '{name}' (type {EXTRACTOR_TYPE}): {e}");
            let p = CoreMetricsExtractorParams::from_value(raw).map_err(|e| fail(e.to_string()))?;
            plan.engine_label_key = Some(p.engine_label_key.clone());
            plan.default_engine = Some(p.default_engine.clone());
            for e in &p.engine_configs {
                plan.engine_configs
                    .push((e.name.clone(), engine_mapping(e).map_err(fail)?));
            }
        }
        Ok(plan)
    }

    /// Applies the plan over the flags' settings, then checks the result as the data layer
    /// will (metric specifications, default engine, TLS files).
    pub fn apply(&self, mut dl: DataLayerConfig) -> Result<DataLayerConfig, String> {
        let origin = || match &self.source {
            Some(n) => format!("plugin '{n}' (type {SOURCE_TYPE})"),
            None => "model-server metrics flags".to_string(),
        };
        if let Some(s) = self.scheme {
            dl.metrics_scheme = s;
        }
        if let Some(p) = &self.path {
            dl.metrics_path = p.clone();
        }
        if let Some(p) = self.port {
            dl.metrics_port = Some(p);
        }
        if let Some(v) = self.insecure_skip_verify {
            dl.tls.insecure_skip_verify = v;
        }
        if self.ca_cert_path.is_some() {
            dl.tls.ca_cert_path = self.ca_cert_path.clone();
        }
        if self.client_cert_path.is_some() {
            dl.tls.client_cert_path = self.client_cert_path.clone();
            dl.tls.client_key_path = self.client_key_path.clone();
        }
        if let Some(i) = self.interval {
            // The reference rounds a source's interval to the nearest multiple of the base
            // refresh interval.
            let base = dl.refresh_interval.as_nanos().max(1);
            let n = ((i.as_nanos() + base / 2) / base).max(1);
            dl.refresh_interval = Duration::from_nanos(u64::try_from(n * base).unwrap_or(u64::MAX));
        }
        if let Some(k) = &self.engine_label_key {
            dl.engine_label_key = k.clone();
        }
        if let Some(e) = &self.default_engine {
            dl.default_engine = e.clone();
        }
        dl.engine_configs = self.engine_configs.clone();
        if dl.engine_configs.iter().any(|(n, _)| n == "vllm") && !dl.metric_overrides.is_empty() {
            tracing::warn!(
                "core-metrics-extractor configures the vllm engine: the deprecated metric-name flags (--total-queued-requests-metric ...) are overridden by it"
            );
        }
        let name = self
            .extractor
            .as_deref()
            .map(|n| format!("plugin '{n}' (type {EXTRACTOR_TYPE})"))
            .unwrap_or_else(|| "metric flags".into());
        dl.metric_mappings().map_err(|e| format!("{name}: {e}"))?;
        dl.validate().map_err(|e| format!("{}: {e}", origin()))?;
        dl.tls_client_config()
            .map_err(|e| format!("{}: {e}", origin()))?;
        Ok(dl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmsched_core::config::{ConfigSource, load};
    use llmsched_core::registry::PluginHandle;

    fn loaded(yaml: &str) -> LoadedConfig {
        load(
            yaml,
            ConfigSource::Text,
            &llmsched_plugins::default_registry(),
            &PluginHandle::default(),
        )
        .unwrap()
    }

    fn plan(body: &str) -> Result<DataLayerPlan, String> {
        DataLayerPlan::resolve(&loaded(&format!(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n{body}"
        )))
    }

    #[test]
    fn no_data_layer_section_keeps_the_flags() {
        let p = plan("plugins:\n- type: queue-scorer\n").unwrap();
        assert_eq!(p, DataLayerPlan::default());
        let base = DataLayerConfig {
            metrics_scheme: MetricsScheme::Https,
            metrics_path: "/m".into(),
            ..DataLayerConfig::default()
        };
        let dl = p.apply(base).unwrap();
        assert_eq!(dl.metrics_scheme, MetricsScheme::Https);
        assert_eq!(dl.metrics_path, "/m");
    }

    #[test]
    fn listed_source_parameters_win_over_the_flags_field_by_field() {
        let p = plan(
            "plugins:\n- type: queue-scorer\n- name: scrape\n  type: metrics-data-source\n  parameters: {scheme: https, path: /custom, port: 9100, interval: 120ms}\n- name: read\n  type: core-metrics-extractor\n  parameters:\n    defaultEngine: mine\n    engineLabelKey: example.com/engine\n    engineConfigs:\n    - {name: mine, queuedRequestsSpec: 'q{kind=\"wait\"}', runningRequestsSpec: r, kvUsageSpec: kv}\ndataLayer:\n  sources:\n  - pluginRef: scrape\n    extractors: [{pluginRef: read}]\n",
        )
        .unwrap();
        assert_eq!(p.scheme, Some(MetricsScheme::Https));
        assert_eq!(
            p.insecure_skip_verify, None,
            "not written: the flag's value stays"
        );
        let dl = p
            .apply(DataLayerConfig {
                refresh_interval: Duration::from_millis(50),
                ..DataLayerConfig::default()
            })
            .unwrap();
        assert_eq!(dl.metrics_scheme, MetricsScheme::Https);
        assert_eq!(dl.metrics_path, "/custom");
        assert_eq!(dl.metrics_port, Some(9100));
        assert!(dl.tls.insecure_skip_verify);
        assert_eq!(
            dl.refresh_interval,
            Duration::from_millis(100),
            "rounded to 2 × 50ms"
        );
        assert_eq!(dl.engine_label_key, "example.com/engine");
        assert_eq!(dl.default_engine, "mine");
        let (name, m) = &dl.engine_configs[0];
        assert_eq!(name, "mine");
        assert_eq!(
            m.queued_requests,
            Some(MetricSpec::with_labels("q", &[("kind", "wait")]))
        );
        assert_eq!(m.lora_info, None, "empty spec: disabled");
    }

    #[test]
    fn the_default_named_instances_are_used_without_sources() {
        let p = plan(
            "plugins:\n- type: metrics-data-source\n  parameters: {insecureSkipVerify: false, scheme: https}\n- type: core-metrics-extractor\n",
        )
        .unwrap();
        assert_eq!(p.source.as_deref(), Some(SOURCE_TYPE));
        assert_eq!(p.extractor.as_deref(), Some(EXTRACTOR_TYPE));
        assert_eq!(p.insecure_skip_verify, Some(false));
    }

    #[test]
    fn unusable_data_layer_sections_are_refused_with_the_reason() {
        let src = "- name: s\n  type: metrics-data-source\n";
        let ex = "- name: e\n  type: core-metrics-extractor\n";
        let cases: Vec<(String, &str)> = vec![
            (
                format!("plugins:\n{src}{ex}- name: s2\n  type: metrics-data-source\ndataLayer:\n  sources:\n  - {{pluginRef: s, extractors: [{{pluginRef: e}}]}}\n  - {{pluginRef: s2, extractors: [{{pluginRef: e}}]}}\n"),
                "lists 2 sources",
            ),
            (
                format!("plugins:\n{src}{ex}- type: queue-scorer\ndataLayer:\n  sources:\n  - {{pluginRef: queue-scorer, extractors: [{{pluginRef: e}}]}}\n"),
                "plugin 'queue-scorer' (type queue-scorer) is not a data source",
            ),
            (
                format!("plugins:\n{src}{ex}- type: queue-scorer\ndataLayer:\n  sources:\n  - {{pluginRef: s, extractors: [{{pluginRef: queue-scorer}}]}}\n"),
                "is not an extractor",
            ),
            (
                format!("plugins:\n{src}{ex}dataLayer:\n  sources:\n  - {{pluginRef: s}}\n"),
                "has no extractors",
            ),
            (
                format!("plugins:\n{src}{ex}- name: e2\n  type: core-metrics-extractor\ndataLayer:\n  sources:\n  - {{pluginRef: s, extractors: [{{pluginRef: e}}, {{pluginRef: e2}}]}}\n"),
                "lists 2 extractors",
            ),
            (
                "plugins:\n- type: queue-scorer\ndataLayer:\n  injectDefaults: false\n".to_string(),
                "injectDefaults is false",
            ),
            (
                format!("plugins:\n{src}- type: queue-scorer\n"),
                "plugin 's' (type metrics-data-source) is declared but not used",
            ),
            (
                format!("plugins:\n{src}{ex}- name: other\n  type: core-metrics-extractor\ndataLayer:\n  sources:\n  - {{pluginRef: s, extractors: [{{pluginRef: e}}]}}\n"),
                "plugin 'other' (type core-metrics-extractor) is declared but not used",
            ),
            (
                "plugins:\n- type: core-metrics-extractor\n  parameters:\n    engineConfigs: [{name: x, queuedRequestsSpec: 'q{'}]\n".to_string(),
                "engineConfigs 'x': queuedRequestsSpec",
            ),
        ];
        for (body, needle) in cases {
            let e = plan(&body).unwrap_err();
            assert!(e.contains(needle), "{body}\nexpected '{needle}' in: {e}");
        }
    }

    #[test]
    fn unknown_default_engine_and_missing_tls_files_fail_when_applied() {
        let p =
            plan("plugins:\n- type: core-metrics-extractor\n  parameters: {defaultEngine: nope}\n")
                .unwrap();
        let e = p.apply(DataLayerConfig::default()).unwrap_err();
        assert!(
            e.contains("core-metrics-extractor") && e.contains("unknown default engine"),
            "{e}"
        );
        let p = plan(
            "plugins:\n- type: metrics-data-source\n  parameters: {scheme: https, insecureSkipVerify: false, caCertPath: /nonexistent/ca.pem}\n",
        )
        .unwrap();
        let e = p.apply(DataLayerConfig::default()).unwrap_err();
        assert!(e.contains("caCertPath /nonexistent/ca.pem"), "{e}");
    }
}
