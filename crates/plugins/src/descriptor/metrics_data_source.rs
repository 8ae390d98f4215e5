//! `metrics-data-source`: where the data layer scrapes each endpoint's Prometheus metrics.
//!
//! No scheduling role; the data layer reads the parameters.
//!
//! ## Parameters
//!
//! * `scheme` (`http` | `https`, default `http`).
//! * `path` (string starting with `/`, default `/metrics`).
//! * `insecureSkipVerify` (bool, default `true`): skip TLS verification for `https`.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::registry::{FactoryInput, PluginError};
use serde::Deserialize;

use super::Descriptor;
use crate::common::{invalid, params};

/// Type name.
pub const TYPE: &str = "metrics-data-source";

/// Parameters.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct MetricsDataSourceParams {
    /// `http` or `https`.
    pub scheme: String,
    /// Metrics path.
    pub path: String,
    /// Skip TLS verification.
    pub insecure_skip_verify: bool,
}

impl Default for MetricsDataSourceParams {
    fn default() -> Self {
        Self {
            scheme: "http".into(),
            path: "/metrics".into(),
            insecure_skip_verify: true,
        }
    }
}

impl MetricsDataSourceParams {
    /// Parses and validates `parameters` (`None` gives the defaults).
    pub fn from_value(parameters: Option<&serde_json::Value>) -> Result<Self, PluginError> {
        let p: Self = params(parameters)?;
        if p.scheme != "http" && p.scheme != "https" {
            return invalid!("scheme must be 'http' or 'https', got '{}'", p.scheme);
        }
        if !p.path.starts_with('/') {
            return invalid!("path must start with '/', got '{}'", p.path);
        }
        Ok(p)
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    MetricsDataSourceParams::from_value(i.parameters)?;
    Ok(Arc::new(Descriptor::new(TYPE, i.name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;

    #[test]
    fn parameters() {
        assert_eq!(
            MetricsDataSourceParams::from_value(None).unwrap(),
            MetricsDataSourceParams::default()
        );
        let p = MetricsDataSourceParams::from_value(Some(
            &serde_json::json!({"scheme": "https", "path": "/m", "insecureSkipVerify": false}),
        ))
        .unwrap();
        assert_eq!(
            (p.scheme.as_str(), p.path.as_str(), p.insecure_skip_verify),
            ("https", "/m", false)
        );
        assert!(build_err(TYPE, serde_json::json!({"scheme": "ftp"})).contains("scheme must be"));
        assert!(
            build_err(TYPE, serde_json::json!({"path": "metrics"})).contains("path must start")
        );
        assert!(build_err(TYPE, serde_json::json!({"port": 9000})).contains("unknown field"));
        assert!(
            build_err(TYPE, serde_json::json!({"insecureSkipVerify": "yes"}))
                .contains("invalid type")
        );
    }
}
