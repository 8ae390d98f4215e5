//! `utilization-detector` (the default saturation detector): saturation from the engines'
//! queue length and KV-cache usage.
//!
//! ## Formula
//!
//! With `q(e)` the waiting queue, `kv(e)` the KV-cache usage and the parameters below:
//!
//! ```text
//! sat(e)  = 1                                               metrics older than metricsStalenessThreshold
//!                                                           (or never scraped)
//!         = max(q(e) / queueDepthThreshold, kv(e) / kvCacheUtilThreshold)   otherwise
//! pool    = mean of sat(e) over the candidates              (no candidate → 1)
//! ```
//!
//! The pool is saturated when `pool ≥ 1`.
//!
//! As a filter it keeps the endpoints with fresh metrics and
//! `q(e) < queueDepthThreshold · (1 + headroom)` and `kv(e) < kvCacheUtilThreshold · (1 +
//! headroom)`; if none qualifies it keeps every candidate (so it never fails a profile).
//! [`SaturationDetector::is_saturated`] is the negation of that per-endpoint test.
//!
//! ## Parameters
//!
//! * `queueDepthThreshold` (integer > 0, default `5`).
//! * `kvCacheUtilThreshold` (number in (0, 1], default `0.8`).
//! * `metricsStalenessThreshold` (Go duration > 0, default `200ms`).
//! * `headroom` (number ≥ 0, default `0`): burst allowance of the filter, as a fraction.
//!
//! Out-of-range values are errors, as in the reference.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmsched_core::Plugin;
use llmsched_core::endpoint::Endpoint;
use llmsched_core::plugin::{Candidate, Filter, SaturationDetector, SchedulingContext};
use llmsched_core::registry::{FactoryInput, PluginError};
use serde::Deserialize;

use crate::common::{InvalidParameter, impl_plugin, opt_go_duration, params};

/// Type name.
pub const TYPE: &str = "utilization-detector";

/// Parameters.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct UtilizationParams {
    /// Queue length at which an endpoint is saturated (default 5).
    pub queue_depth_threshold: Option<i64>,
    /// KV usage at which an endpoint is saturated (default 0.8).
    pub kv_cache_util_threshold: Option<f64>,
    /// Metrics older than this count as saturated (default 200ms).
    #[serde(deserialize_with = "opt_go_duration")]
    pub metrics_staleness_threshold: Option<Duration>,
    /// Filter burst allowance (default 0).
    pub headroom: Option<f64>,
}

/// Validated settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UtilizationConfig {
    /// Queue length at which an endpoint is saturated.
    pub queue_depth_threshold: f64,
    /// KV usage at which an endpoint is saturated.
    pub kv_cache_util_threshold: f64,
    /// Staleness limit.
    pub metrics_staleness_threshold: Duration,
    /// Filter burst allowance.
    pub headroom: f64,
}

impl Default for UtilizationConfig {
    fn default() -> Self {
        Self {
            queue_depth_threshold: 5.0,
            kv_cache_util_threshold: 0.8,
            metrics_staleness_threshold: Duration::from_millis(200),
            headroom: 0.0,
        }
    }
}

impl UtilizationParams {
    /// Validates the parameters.
    pub fn resolve(&self) -> Result<UtilizationConfig, InvalidParameter> {
        let d = UtilizationConfig::default();
        let mut errs = Vec::new();
        let q = self.queue_depth_threshold.unwrap_or(5);
        if q <= 0 {
            errs.push(format!(
                "queueDepthThreshold must be strictly positive, got {q}"
            ));
        }
        let kv = self
            .kv_cache_util_threshold
            .unwrap_or(d.kv_cache_util_threshold);
        if !(kv > 0.0 && kv <= 1.0) {
            errs.push(format!(
                "kvCacheUtilThreshold must be in (0.0, 1.0], got {kv}"
            ));
        }
        let st = self
            .metrics_staleness_threshold
            .unwrap_or(d.metrics_staleness_threshold);
        if st.is_zero() {
            errs.push("metricsStalenessThreshold must be strictly positive, got 0s".to_string());
        }
        let h = self.headroom.unwrap_or(0.0);
        if h.is_nan() || h < 0.0 {
            errs.push(format!("headroom must be a non-negative value, got {h}"));
        }
        if !errs.is_empty() {
            return Err(InvalidParameter(format!(
                "invalid utilization detector configuration: {}",
                errs.join("; ")
            )));
        }
        if h > 1.0 {
            tracing::warn!(
                headroom = h,
                "utilization-detector: unusually high headroom; it is a fraction, not a percentage"
            );
        }
        Ok(UtilizationConfig {
            queue_depth_threshold: q as f64,
            kv_cache_util_threshold: kv,
            metrics_staleness_threshold: st,
            headroom: h,
        })
    }
}

/// The utilization detector.
#[derive(Debug, Clone)]
pub struct UtilizationDetector {
    name: String,
    config: UtilizationConfig,
}

impl UtilizationDetector {
    /// A detector with validated settings.
    pub fn new(name: impl Into<String>, config: UtilizationConfig) -> Self {
        Self {
            name: name.into(),
            config,
        }
    }

    /// The settings.
    pub fn config(&self) -> &UtilizationConfig {
        &self.config
    }

    /// Saturation of one endpoint (1 when its metrics are stale).
    pub fn endpoint_saturation(&self, e: &Endpoint, now: Instant) -> f64 {
        let m = e.metrics();
        if m.is_stale(now, self.config.metrics_staleness_threshold) {
            return 1.0;
        }
        let q = f64::from(m.waiting_queue_size) / self.config.queue_depth_threshold;
        let kv = m.kv_cache_usage / self.config.kv_cache_util_threshold;
        q.max(kv)
    }

    fn has_room(&self, e: &Endpoint, now: Instant) -> bool {
        let m = e.metrics();
        if m.is_stale(now, self.config.metrics_staleness_threshold) {
            return false;
        }
        let grow = 1.0 + self.config.headroom;
        f64::from(m.waiting_queue_size) < self.config.queue_depth_threshold * grow
            && m.kv_cache_usage < self.config.kv_cache_util_threshold * grow
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let p: UtilizationParams = params(i.parameters)?;
    Ok(Arc::new(UtilizationDetector::new(i.name, p.resolve()?)))
}

impl_plugin!(UtilizationDetector, TYPE, as_saturation_detector => SaturationDetector, as_filter => Filter);

impl SaturationDetector for UtilizationDetector {
    fn saturation(&self, candidates: &[Candidate<'_>], now: Instant) -> f64 {
        if candidates.is_empty() {
            return 1.0;
        }
        let total: f64 = candidates
            .iter()
            .map(|e| self.endpoint_saturation(e, now))
            .sum();
        total / candidates.len() as f64
    }

    fn is_saturated(&self, endpoint: &Endpoint, now: Instant) -> bool {
        !self.has_room(endpoint, now)
    }
}

impl Filter for UtilizationDetector {
    fn filter(&self, cx: &SchedulingContext<'_>, candidates: &mut Vec<Candidate<'_>>) {
        if candidates.iter().any(|e| self.has_room(e, cx.now)) {
            candidates.retain(|e| self.has_room(e, cx.now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use crate::filter::by_label::tests::kept;
    use llmsched_core::endpoint::EndpointMetrics;

    fn detector(params: Option<serde_json::Value>) -> Arc<dyn Plugin> {
        build(TYPE, params).unwrap()
    }

    fn sat(p: &Arc<dyn Plugin>, eps: &[Arc<Endpoint>], now: Instant) -> f64 {
        let c: Vec<Candidate<'_>> = eps.iter().collect();
        p.clone()
            .as_saturation_detector()
            .unwrap()
            .saturation(&c, now)
    }

    #[test]
    fn pool_saturation_is_the_mean_of_max_ratios() {
        let d = detector(None);
        let now = Instant::now();
        let eps = [
            ep_with(1, &[], load(0, 0, 0.0)),  // 0
            ep_with(2, &[], load(5, 0, 0.4)),  // max(1, 0.5) = 1
            ep_with(3, &[], load(1, 0, 0.6)),  // max(0.2, 0.75) = 0.75
            ep_with(4, &[], load(10, 0, 1.0)), // max(2, 1.25) = 2
        ];
        // (0 + 1 + 0.75 + 2) / 4 = 0.9375
        assert!((sat(&d, &eps, now) - 0.9375).abs() < 1e-9);
        assert_eq!(sat(&d, &[], now), 1.0);
    }

    #[test]
    fn stale_or_never_scraped_counts_as_saturated() {
        let d = detector(Some(serde_json::json!({"metricsStalenessThreshold": "1s"})));
        let now = Instant::now();
        let old = EndpointMetrics {
            updated_at: Some(now - Duration::from_secs(2)),
            ..Default::default()
        };
        let never = EndpointMetrics::default();
        let eps = [
            ep_with(1, &[], old),
            ep_with(2, &[], never),
            ep_with(3, &[], load(0, 0, 0.0)),
        ];
        // (1 + 1 + 0) / 3
        assert!((sat(&d, &eps, now) - 2.0 / 3.0).abs() < 1e-9);
        let det = d.clone().as_saturation_detector().unwrap();
        assert!(det.is_saturated(&eps[0], now));
        assert!(det.is_saturated(&eps[1], now));
        assert!(!det.is_saturated(&eps[2], now));
    }

    #[test]
    fn custom_thresholds() {
        let d = detector(Some(
            serde_json::json!({"queueDepthThreshold": 10, "kvCacheUtilThreshold": 0.5}),
        ));
        let eps = [
            ep_with(1, &[], load(5, 0, 0.1)),
            ep_with(2, &[], load(0, 0, 0.4)),
        ];
        // max(0.5, 0.2) = 0.5; max(0, 0.8) = 0.8 → 0.65
        assert!((sat(&d, &eps, Instant::now()) - 0.65).abs() < 1e-9);
    }

    #[test]
    fn filter_keeps_endpoints_with_room_or_everything() {
        let d = detector(Some(serde_json::json!({"headroom": 0.2})));
        // Limits with headroom: queue < 6, kv < 0.96.
        let eps = [
            ep_with(1, &[], load(5, 0, 0.9)),
            ep_with(2, &[], load(6, 0, 0.1)),
            ep_with(3, &[], load(0, 0, 0.96)),
            ep_with(4, &[], EndpointMetrics::default()),
        ];
        assert_eq!(kept(&d, &eps), vec!["pod-1"]);
        assert_eq!(kept(&d, &eps[1..]), vec!["pod-2", "pod-3", "pod-4"]);
    }

    #[test]
    fn bad_parameters() {
        for (p, needle) in [
            (
                serde_json::json!({"queueDepthThreshold": 0}),
                "queueDepthThreshold must be strictly positive, got 0",
            ),
            (
                serde_json::json!({"kvCacheUtilThreshold": 1.5}),
                "kvCacheUtilThreshold must be in (0.0, 1.0]",
            ),
            (
                serde_json::json!({"kvCacheUtilThreshold": 0}),
                "kvCacheUtilThreshold must be in (0.0, 1.0]",
            ),
            (
                serde_json::json!({"metricsStalenessThreshold": "0s"}),
                "metricsStalenessThreshold must be strictly positive",
            ),
            (
                serde_json::json!({"metricsStalenessThreshold": "200"}),
                "missing unit",
            ),
            (
                serde_json::json!({"metricsStalenessThreshold": 200}),
                "invalid type",
            ),
            (
                serde_json::json!({"headroom": -0.1}),
                "headroom must be a non-negative value",
            ),
            (serde_json::json!({"queueDepth": 3}), "unknown field"),
        ] {
            let e = build_err(TYPE, p.clone());
            assert!(e.contains(needle), "{p}: {e}");
        }
    }
}
