//! `core-metrics-extractor`: which Prometheus metrics give queue, running, KV usage, LoRA
//! and cache geometry, per engine type.
//!
//! No scheduling role; the EPP hands the parameters to the data layer's scraper.
//!
//! ## Parameters
//!
//! * `engineLabelKey` (string, default `llm-d.ai/engine-type`): endpoint label choosing the
//!   engine mapping.
//! * `defaultEngine` (string, default `vllm`): mapping for endpoints without the label.
//! * `engineConfigs` (list, default empty): extra or overriding mappings, each with `name`
//!   (required, not `default`) and the optional metric specs `queuedRequestsSpec`,
//!   `runningRequestsSpec`, `kvUsageSpec`, `loraSpec`, `cacheInfoSpec`,
//!   `cacheBlockSizeLabelName`, `cacheNumBlocksLabelName`, `cacheBlockSizeSpec`,
//!   `cacheNumBlocksSpec`. An entry replaces the built-in mapping of the same name as a whole
//!   (an empty spec disables that metric), as in the reference. Built-in mappings: `vllm`,
//!   `sglang`, `trtllm-serve`, `triton-tensorrt-llm`. The reference's `customMetrics` is
//!   refused: no llmsched plugin reads custom endpoint attributes.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::registry::{FactoryInput, PluginError};
use serde::Deserialize;

use super::Descriptor;
use crate::common::{invalid, params};

/// Type name.
pub const TYPE: &str = "core-metrics-extractor";

/// One engine mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct EngineConfig {
    /// Engine name (value of the engine label).
    pub name: String,
    /// Waiting queue metric.
    pub queued_requests_spec: String,
    /// Running requests metric.
    pub running_requests_spec: String,
    /// KV usage metric.
    pub kv_usage_spec: String,
    /// LoRA info metric.
    pub lora_spec: String,
    /// Cache config info metric.
    pub cache_info_spec: String,
    /// Label of the cache info metric holding the block size.
    pub cache_block_size_label_name: String,
    /// Label of the cache info metric holding the block count.
    pub cache_num_blocks_label_name: String,
    /// Metric holding the block size.
    pub cache_block_size_spec: String,
    /// Metric holding the block count.
    pub cache_num_blocks_spec: String,
    /// The reference's custom attributes (refused with a reason).
    pub custom_metrics: Option<serde_json::Value>,
}

/// Parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct CoreMetricsExtractorParams {
    /// Label choosing the engine mapping (empty: `llm-d.ai/engine-type`).
    pub engine_label_key: String,
    /// Mapping for unlabelled endpoints (empty: `vllm`).
    pub default_engine: String,
    /// Extra or overriding mappings.
    pub engine_configs: Vec<EngineConfig>,
}

impl CoreMetricsExtractorParams {
    /// Parses and validates `parameters`, filling the documented defaults.
    pub fn from_value(parameters: Option<&serde_json::Value>) -> Result<Self, PluginError> {
        let mut p: Self = params(parameters)?;
        if p.engine_label_key.is_empty() {
            p.engine_label_key = llmsched_core::endpoint::label::ENGINE_TYPE.to_string();
        }
        if p.default_engine.is_empty() {
            p.default_engine = "vllm".into();
        }
        for (i, e) in p.engine_configs.iter().enumerate() {
            if e.name.is_empty() {
                return invalid!("engineConfigs[{i}]: engine config name cannot be empty");
            }
            if e.name == "default" {
                return invalid!(
                    "engineConfigs[{i}]: engine config name cannot be \"default\" (reserved)"
                );
            }
            if e.custom_metrics.is_some() {
                return invalid!(
                    "engineConfigs[{i}] ('{}'): customMetrics is not supported by llmsched: no plugin reads custom endpoint attributes; remove it",
                    e.name
                );
            }
            if p.engine_configs[..i].iter().any(|o| o.name == e.name) {
                return invalid!(
                    "engineConfigs[{i}]: engine '{}' is configured twice",
                    e.name
                );
            }
        }
        Ok(p)
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    CoreMetricsExtractorParams::from_value(i.parameters)?;
    Ok(Arc::new(Descriptor::new(TYPE, i.name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;

    #[test]
    fn custom_metrics_and_duplicates_are_refused_with_a_reason() {
        let e = build_err(
            TYPE,
            serde_json::json!({"engineConfigs": [{"name": "x", "customMetrics": [{"attributeKey": "a", "metricSpec": "m"}]}]}),
        );
        assert!(e.contains("customMetrics is not supported"), "{e}");
        let e = build_err(
            TYPE,
            serde_json::json!({"engineConfigs": [{"name": "x"}, {"name": "x"}]}),
        );
        assert!(e.contains("configured twice"), "{e}");
    }

    #[test]
    fn parameters() {
        let d = CoreMetricsExtractorParams::from_value(None).unwrap();
        assert_eq!(
            (d.engine_label_key.as_str(), d.default_engine.as_str()),
            ("llm-d.ai/engine-type", "vllm")
        );
        let p = CoreMetricsExtractorParams::from_value(Some(&serde_json::json!({
            "engineConfigs": [{"name": "mine", "queuedRequestsSpec": "q", "kvUsageSpec": "kv"}]
        })))
        .unwrap();
        assert_eq!(p.engine_configs[0].kv_usage_spec, "kv");
        assert!(
            build_err(
                TYPE,
                serde_json::json!({"engineConfigs": [{"queuedRequestsSpec": "q"}]})
            )
            .contains("name cannot be empty")
        );
        assert!(
            build_err(
                TYPE,
                serde_json::json!({"engineConfigs": [{"name": "default"}]})
            )
            .contains("reserved")
        );
        assert!(
            build_err(
                TYPE,
                serde_json::json!({"engineConfigs": [{"name": "x", "queueSpec": "q"}]})
            )
            .contains("unknown field")
        );
        assert!(build_err(TYPE, serde_json::json!({"engineConfigs": {}})).contains("invalid type"));
    }
}
