//! `concurrency-detector`: saturation from the EPP's own in-flight accounting.
//!
//! ## Formula
//!
//! With `c(e)` the endpoint's in-flight requests (mode `requests`) or in-flight tokens
//! (mode `tokens`) as dispatched by this EPP, and `max` = `maxConcurrency` or
//! `maxTokenConcurrency`:
//!
//! ```text
//! pool     = Σ c(e) / (n · max)          over the n candidates (no candidate → 1)
//! keep(e)  ⇔ c(e) < ⌊max · (1 + headroom)⌋           (filter; may keep nothing)
//! ```
//!
//! [`SaturationDetector::is_saturated`] is `¬keep(e)`. Unlike the utilization detector, the
//! filter does not fall back to all candidates when every endpoint is full (as the
//! reference).
//!
//! ## Parameters
//!
//! * `concurrencyMode` (`requests` | `tokens`, default `requests`).
//! * `maxConcurrency` (integer > 0, default `100`): requests per endpoint.
//! * `maxTokenConcurrency` (integer > 0, default `1000000`): tokens per endpoint.
//! * `headroom` (number ≥ 0, default `0`): filter burst allowance, as a fraction.

use std::sync::Arc;
use std::time::Instant;

use llmsched_core::Plugin;
use llmsched_core::endpoint::Endpoint;
use llmsched_core::plugin::{Candidate, Filter, SaturationDetector, SchedulingContext};
use llmsched_core::registry::{FactoryInput, PluginError};
use serde::Deserialize;

use crate::common::{InvalidParameter, impl_plugin, params};

/// Type name.
pub const TYPE: &str = "concurrency-detector";

/// Parameters.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ConcurrencyParams {
    /// Requests per endpoint (default 100).
    pub max_concurrency: Option<i64>,
    /// Filter burst allowance (default 0).
    pub headroom: Option<f64>,
    /// `requests` or `tokens` (default `requests`).
    pub concurrency_mode: Option<String>,
    /// Tokens per endpoint (default 1,000,000).
    pub max_token_concurrency: Option<i64>,
}

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConcurrencyMode {
    /// In-flight requests.
    Requests,
    /// In-flight tokens.
    Tokens,
}

/// The concurrency detector.
#[derive(Debug, Clone)]
pub struct ConcurrencyDetector {
    name: String,
    mode: ConcurrencyMode,
    max: u64,
    limit: u64,
}

impl ConcurrencyParams {
    fn resolve(&self) -> Result<(ConcurrencyMode, u64, f64), InvalidParameter> {
        let mut errs = Vec::new();
        let mc = self.max_concurrency.unwrap_or(100);
        if mc <= 0 {
            errs.push(format!(
                "maxConcurrency must be strictly positive, got {mc}"
            ));
        }
        let h = self.headroom.unwrap_or(0.0);
        if h.is_nan() || h < 0.0 {
            errs.push(format!("headroom must be a non-negative value, got {h}"));
        }
        let mt = self.max_token_concurrency.unwrap_or(1_000_000);
        if mt <= 0 {
            errs.push(format!(
                "maxTokenConcurrency must be strictly positive, got {mt}"
            ));
        }
        let mode = match self.concurrency_mode.as_deref() {
            None | Some("requests") => ConcurrencyMode::Requests,
            Some("tokens") => ConcurrencyMode::Tokens,
            Some(other) => {
                errs.push(format!("unsupported concurrencyMode: {other:?}"));
                ConcurrencyMode::Requests
            }
        };
        if !errs.is_empty() {
            return Err(InvalidParameter(format!(
                "invalid concurrency detector configuration: {}",
                errs.join("; ")
            )));
        }
        let max = match mode {
            ConcurrencyMode::Requests => mc,
            ConcurrencyMode::Tokens => mt,
        };
        Ok((mode, u64::try_from(max).unwrap_or(1), h))
    }
}

impl ConcurrencyDetector {
    /// A detector counting `mode` against `max` per endpoint.
    pub fn new(name: impl Into<String>, mode: ConcurrencyMode, max: u64, headroom: f64) -> Self {
        Self {
            name: name.into(),
            mode,
            max: max.max(1),
            limit: (max as f64 * (1.0 + headroom)) as u64,
        }
    }

    fn load(&self, e: &Endpoint) -> u64 {
        match self.mode {
            ConcurrencyMode::Requests => e.inflight_requests(),
            ConcurrencyMode::Tokens => e.inflight_tokens(),
        }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let p: ConcurrencyParams = params(i.parameters)?;
    let (mode, max, headroom) = p.resolve()?;
    Ok(Arc::new(ConcurrencyDetector::new(
        i.name, mode, max, headroom,
    )))
}

impl_plugin!(ConcurrencyDetector, TYPE, as_saturation_detector => SaturationDetector, as_filter => Filter);

impl SaturationDetector for ConcurrencyDetector {
    fn saturation(&self, candidates: &[Candidate<'_>], _now: Instant) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        let inflight: u64 = candidates.iter().map(|e| self.load(e)).sum();
        inflight as f64 / (self.max as f64 * candidates.len() as f64)
    }

    fn is_saturated(&self, endpoint: &Endpoint, _now: Instant) -> bool {
        self.load(endpoint) >= self.limit
    }
}

impl Filter for ConcurrencyDetector {
    fn filter(&self, _cx: &SchedulingContext<'_>, candidates: &mut Vec<Candidate<'_>>) {
        candidates.retain(|e| self.load(e) < self.limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use crate::filter::by_label::tests::kept;

    fn with_inflight(id: u32, requests: u32, tokens_each: u64) -> Arc<Endpoint> {
        let e = ep(id);
        for _ in 0..requests {
            e.dispatch(tokens_each);
        }
        e
    }

    fn sat(p: &Arc<dyn Plugin>, eps: &[Arc<Endpoint>]) -> f64 {
        let c: Vec<Candidate<'_>> = eps.iter().collect();
        p.clone()
            .as_saturation_detector()
            .unwrap()
            .saturation(&c, Instant::now())
    }

    #[test]
    fn request_mode() {
        let d = build(TYPE, Some(serde_json::json!({"maxConcurrency": 4}))).unwrap();
        let eps = [
            with_inflight(1, 1, 10),
            with_inflight(2, 4, 10),
            with_inflight(3, 7, 10),
        ];
        // (1 + 4 + 7) / (3 · 4) = 1
        assert!((sat(&d, &eps) - 1.0).abs() < 1e-9);
        assert_eq!(sat(&d, &[]), 1.0);
        assert_eq!(kept(&d, &eps), vec!["pod-1"]);
        // Everyone full: nothing kept (no fallback).
        assert!(kept(&d, &eps[1..]).is_empty());
        let det = d.clone().as_saturation_detector().unwrap();
        assert!(det.is_saturated(&eps[1], Instant::now()));
        assert!(!det.is_saturated(&eps[0], Instant::now()));
    }

    #[test]
    fn token_mode_and_headroom() {
        let d = build(TYPE, Some(serde_json::json!({"concurrencyMode": "tokens", "maxTokenConcurrency": 1000, "headroom": 0.5}))).unwrap();
        let eps = [with_inflight(1, 2, 700), with_inflight(2, 1, 100)];
        // (1400 + 100) / (2 · 1000) = 0.75; limit 1500: both kept.
        assert!((sat(&d, &eps) - 0.75).abs() < 1e-9);
        assert_eq!(kept(&d, &eps), vec!["pod-1", "pod-2"]);
        let full = [with_inflight(3, 3, 500)];
        assert!(kept(&d, &full).is_empty());
    }

    #[test]
    fn defaults_and_bad_parameters() {
        let d = build(TYPE, None).unwrap();
        assert!((sat(&d, &[with_inflight(1, 50, 1)]) - 0.5).abs() < 1e-9);
        for (p, needle) in [
            (
                serde_json::json!({"maxConcurrency": 0}),
                "maxConcurrency must be strictly positive",
            ),
            (
                serde_json::json!({"maxTokenConcurrency": -5}),
                "maxTokenConcurrency must be strictly positive",
            ),
            (
                serde_json::json!({"headroom": -1.0}),
                "headroom must be a non-negative value",
            ),
            (
                serde_json::json!({"concurrencyMode": "bytes"}),
                "unsupported concurrencyMode: \"bytes\"",
            ),
            (serde_json::json!({"maxConcurrency": "10"}), "invalid type"),
            (serde_json::json!({"limit": 10}), "unknown field"),
        ] {
            let e = build_err(TYPE, p.clone());
            assert!(e.contains(needle), "{p}: {e}");
        }
    }
}
