//! `probabilistic-admitter`: sheds sheddable requests (priority < 0) with a probability that
//! grows steeply with pool saturation, instead of all at once at saturation 1.
//!
//! ## Formula
//!
//! ```text
//! sat(e)  = 1                                                    never scraped
//!         = max(q(e) / queueDepthThreshold, kv(e) / kvCacheUtilThreshold)   otherwise
//! sat     = mean of sat(e) over the candidates
//! P(shed) = min(sat^power · k, 1)                                priority < 0 only
//! ```
//!
//! Requests with priority ≥ 0, and requests with no candidate, are always admitted. A shed
//! request gets 429 `probabilistic-admitter: rejected, saturation=<sat> prob=<P>`. With the
//! defaults, P reaches 1 at sat ≈ 0.32 (300 · 0.32⁵ ≈ 1).
//!
//! ## Parameters
//!
//! * `queueDepthThreshold` (integer > 0, default `5`).
//! * `kvCacheUtilThreshold` (number > 0, default `0.8`).
//! * `power` (number > 0, default `5`).
//! * `k` (number > 0, default `300`).

use std::sync::Arc;
use std::time::Instant;

use llmsched_core::Plugin;
use llmsched_core::error::InferenceError;
use llmsched_core::plugin::{Admitter, Candidate};
use llmsched_core::registry::{FactoryInput, PluginError};
use llmsched_core::request::InferenceRequest;
use serde::Deserialize;

use crate::common::{impl_plugin, invalid, params, random_unit};

/// Type name.
pub const TYPE: &str = "probabilistic-admitter";

/// Parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ProbabilisticAdmitterParams {
    /// Queue length counted as saturation 1.
    pub queue_depth_threshold: i64,
    /// KV usage counted as saturation 1.
    pub kv_cache_util_threshold: f64,
    /// Exponent.
    pub power: f64,
    /// Scale.
    pub k: f64,
}

impl Default for ProbabilisticAdmitterParams {
    fn default() -> Self {
        Self {
            queue_depth_threshold: 5,
            kv_cache_util_threshold: 0.8,
            power: 5.0,
            k: 300.0,
        }
    }
}

/// The probabilistic admitter.
#[derive(Debug, Clone)]
pub struct ProbabilisticAdmitter {
    name: String,
    queue_depth_threshold: f64,
    kv_cache_util_threshold: f64,
    power: f64,
    k: f64,
    rand: fn() -> f64,
}

impl ProbabilisticAdmitter {
    /// An admitter from validated parameters.
    pub fn new(name: impl Into<String>, p: &ProbabilisticAdmitterParams) -> Self {
        Self {
            name: name.into(),
            queue_depth_threshold: p.queue_depth_threshold as f64,
            kv_cache_util_threshold: p.kv_cache_util_threshold,
            power: p.power,
            k: p.k,
            rand: random_unit,
        }
    }

    /// Replaces the uniform [0, 1) source (tests).
    pub fn with_rand(mut self, rand: fn() -> f64) -> Self {
        self.rand = rand;
        self
    }

    /// Mean saturation of the candidates.
    pub fn saturation(&self, candidates: &[Candidate<'_>]) -> f64 {
        if candidates.is_empty() {
            return 0.0;
        }
        let total: f64 = candidates
            .iter()
            .map(|e| {
                let m = e.metrics();
                if m.updated_at.is_none() {
                    return 1.0;
                }
                let q = f64::from(m.waiting_queue_size) / self.queue_depth_threshold;
                let kv = m.kv_cache_usage / self.kv_cache_util_threshold;
                q.max(kv)
            })
            .sum();
        total / candidates.len() as f64
    }

    /// Shedding probability at saturation `sat`.
    pub fn probability(&self, sat: f64) -> f64 {
        (sat.powf(self.power) * self.k).min(1.0)
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let p: ProbabilisticAdmitterParams = params(i.parameters)?;
    if p.queue_depth_threshold <= 0 {
        return invalid!(
            "plugin '{TYPE}': queueDepthThreshold must be > 0, got {}",
            p.queue_depth_threshold
        );
    }
    if p.kv_cache_util_threshold.is_nan() || p.kv_cache_util_threshold <= 0.0 {
        return invalid!(
            "plugin '{TYPE}': kvCacheUtilThreshold must be > 0, got {}",
            p.kv_cache_util_threshold
        );
    }
    if p.power.is_nan() || p.power <= 0.0 {
        return invalid!("plugin '{TYPE}': power must be > 0, got {}", p.power);
    }
    if p.k.is_nan() || p.k <= 0.0 {
        return invalid!("plugin '{TYPE}': k must be > 0, got {}", p.k);
    }
    Ok(Arc::new(ProbabilisticAdmitter::new(i.name, &p)))
}

impl_plugin!(ProbabilisticAdmitter, TYPE, as_admitter => Admitter);

impl Admitter for ProbabilisticAdmitter {
    fn admit(
        &self,
        request: &InferenceRequest,
        candidates: &[Candidate<'_>],
        _now: Instant,
    ) -> Result<(), InferenceError> {
        if request.priority >= 0 || candidates.is_empty() {
            return Ok(());
        }
        let sat = self.saturation(candidates);
        let prob = self.probability(sat);
        if (self.rand)() < prob {
            return Err(InferenceError::resource_exhausted(format!(
                "probabilistic-admitter: rejected, saturation={sat:.3} prob={prob:.2}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::endpoint::{Endpoint, EndpointMetrics};

    fn admitter(rand: fn() -> f64) -> ProbabilisticAdmitter {
        ProbabilisticAdmitter::new(TYPE, &ProbabilisticAdmitterParams::default()).with_rand(rand)
    }

    fn sheddable() -> InferenceRequest {
        let mut r = request("m");
        r.priority = -1;
        r
    }

    fn admit(
        a: &ProbabilisticAdmitter,
        r: &InferenceRequest,
        eps: &[Arc<Endpoint>],
    ) -> Result<(), InferenceError> {
        let c: Vec<Candidate<'_>> = eps.iter().collect();
        a.admit(r, &c, Instant::now())
    }

    #[test]
    fn probability_formula() {
        let a = admitter(random_unit);
        // 0.2^5 · 300 = 0.096; 0.3^5 · 300 = 0.729; 0.5 → capped at 1.
        assert!((a.probability(0.2) - 0.096).abs() < 1e-12);
        assert!((a.probability(0.3) - 0.729).abs() < 1e-12);
        assert_eq!(a.probability(0.5), 1.0);
        assert_eq!(a.probability(0.0), 0.0);
    }

    #[test]
    fn saturation_is_the_mean_of_max_ratios() {
        let a = admitter(random_unit);
        let eps = [
            ep_with(1, &[], load(1, 0, 0.4)),
            ep_with(2, &[], load(0, 0, 0.0)),
            ep_with(3, &[], EndpointMetrics::default()),
        ];
        let c: Vec<Candidate<'_>> = eps.iter().collect();
        // max(0.2, 0.5) = 0.5; 0; never scraped = 1 → 0.5.
        assert!((a.saturation(&c) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn sheds_only_sheddable_requests_below_the_drawn_probability() {
        // Saturation 0.2 → P = 0.096.
        let eps = [ep_with(1, &[], load(1, 0, 0.0))];
        assert!(admit(&admitter(|| 0.09), &sheddable(), &eps).is_err());
        assert!(admit(&admitter(|| 0.1), &sheddable(), &eps).is_ok());
        // Priority ≥ 0 is never shed, even when P = 1.
        let hot = [ep_with(1, &[], load(50, 0, 1.0))];
        assert!(admit(&admitter(|| 0.0), &request("m"), &hot).is_ok());
        let e = admit(&admitter(|| 0.99), &sheddable(), &hot).unwrap_err();
        assert_eq!(e.http_status(), 429);
        assert_eq!(
            e.message,
            "probabilistic-admitter: rejected, saturation=10.000 prob=1.00"
        );
        // No candidates: admitted.
        assert!(admit(&admitter(|| 0.0), &sheddable(), &[]).is_ok());
    }

    #[test]
    fn bad_parameters() {
        for (p, needle) in [
            (
                serde_json::json!({"queueDepthThreshold": 0}),
                "queueDepthThreshold must be > 0",
            ),
            (
                serde_json::json!({"kvCacheUtilThreshold": 0.0}),
                "kvCacheUtilThreshold must be > 0",
            ),
            (serde_json::json!({"power": -1}), "power must be > 0"),
            (serde_json::json!({"k": 0}), "k must be > 0"),
            (serde_json::json!({"k": "300"}), "invalid type"),
            (serde_json::json!({"K": 3}), "unknown field"),
        ] {
            let e = build_err(TYPE, p.clone());
            assert!(e.contains(needle), "{p}: {e}");
        }
        assert!(build(TYPE, Some(serde_json::json!({"power": 2, "k": 10}))).is_ok());
    }
}
