//! `metrics-data-source`: where the data layer scrapes each endpoint's Prometheus metrics.
//!
//! No scheduling role; the EPP hands the parameters to the data layer's scraper (one metrics
//! source per EPP, listed in `dataLayer.sources` or injected by default). A parameter the
//! configuration sets wins over the matching `--model-server-metrics-*` flag.
//!
//! ## Parameters
//!
//! * `scheme` (`http` | `https`, default `http`).
//! * `path` (string starting with `/`, default `/metrics`).
//! * `port` (1-65535, default: each endpoint's own port): scrape this port instead, on every
//!   endpoint (not for pools with several target ports, as in the reference).
//! * `insecureSkipVerify` (bool, default `true`): accept any server certificate for `https`.
//! * `caCertPath` (PEM file): verify the server certificate against these CAs (with
//!   `insecureSkipVerify: false`; without it the system roots are used).
//! * `clientCertPath`, `clientKeyPath` (PEM files, both or neither): client certificate for
//!   mutual TLS.
//! * `interval` (Go duration, default: every `--refresh-metrics-interval`): scrape period,
//!   rounded to the nearest multiple of `--refresh-metrics-interval` (at least one).

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
    /// Port scraped instead of each endpoint's own.
    pub port: Option<i64>,
    /// Skip TLS verification.
    pub insecure_skip_verify: bool,
    /// CA bundle verifying the server.
    pub ca_cert_path: String,
    /// Client certificate (mTLS).
    pub client_cert_path: String,
    /// Client key (mTLS).
    pub client_key_path: String,
    /// Scrape period (Go duration; empty: every refresh interval).
    pub interval: String,
}

impl Default for MetricsDataSourceParams {
    fn default() -> Self {
        Self {
            scheme: "http".into(),
            path: "/metrics".into(),
            port: None,
            insecure_skip_verify: true,
            ca_cert_path: String::new(),
            client_cert_path: String::new(),
            client_key_path: String::new(),
            interval: String::new(),
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
        if !p.path.starts_with('/')
            || p.path
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '#')
        {
            return invalid!(
                "path must start with '/' and be an absolute URL path, got '{}'",
                p.path
            );
        }
        if let Some(port) = p.port
            && !(1..=65535).contains(&port)
        {
            return invalid!("invalid port {port}: must be between 1 and 65535");
        }
        if p.client_cert_path.is_empty() != p.client_key_path.is_empty() {
            return invalid!("clientCertPath and clientKeyPath must be set together");
        }
        if p.scheme == "http" && (!p.ca_cert_path.is_empty() || !p.client_cert_path.is_empty()) {
            return invalid!(
                "caCertPath, clientCertPath and clientKeyPath need scheme 'https' (scheme is 'http')"
            );
        }
        p.interval()?;
        Ok(p)
    }

    /// The port as a `u16` (validated by [`Self::from_value`]).
    pub fn port(&self) -> Option<u16> {
        self.port.and_then(|p| u16::try_from(p).ok())
    }

    /// `interval` as a duration (`None`: empty, every refresh interval).
    pub fn interval(&self) -> Result<Option<std::time::Duration>, PluginError> {
        if self.interval.is_empty() {
            return Ok(None);
        }
        match llmsched_core::units::parse_go_duration(&self.interval) {
            Ok(d) if d.is_zero() => Ok(None),
            Ok(d) => Ok(Some(d)),
            Err(e) => invalid!("invalid interval '{}': {e}", self.interval),
        }
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
        assert!(build_err(TYPE, serde_json::json!({"prot": 9000})).contains("unknown field"));
        let p = MetricsDataSourceParams::from_value(Some(&serde_json::json!({
            "scheme": "https", "port": 9100, "caCertPath": "/ca.pem",
            "clientCertPath": "/c.pem", "clientKeyPath": "/k.pem", "interval": "1s"
        })))
        .unwrap();
        assert_eq!(p.port(), Some(9100));
        assert_eq!(
            p.interval().unwrap(),
            Some(std::time::Duration::from_secs(1))
        );
        for (bad, needle) in [
            (serde_json::json!({"port": 0}), "invalid port 0"),
            (serde_json::json!({"port": 70000}), "invalid port 70000"),
            (serde_json::json!({"port": "9000"}), "invalid type"),
            (
                serde_json::json!({"interval": "soon"}),
                "invalid interval 'soon'",
            ),
            (serde_json::json!({"interval": "-1s"}), "invalid interval"),
            (
                serde_json::json!({"scheme": "https", "clientCertPath": "/c.pem"}),
                "set together",
            ),
            (
                serde_json::json!({"caCertPath": "/ca.pem"}),
                "need scheme 'https'",
            ),
            (serde_json::json!({"path": "/a b"}), "absolute URL path"),
        ] {
            let e = build_err(TYPE, bad.clone());
            assert!(e.contains(needle), "{bad}: {e}");
        }
        assert!(
            build_err(TYPE, serde_json::json!({"insecureSkipVerify": "yes"}))
                .contains("invalid type")
        );
    }
}
