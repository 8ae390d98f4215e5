//! `active-request-scorer`: prefers endpoints with fewer requests in flight *from this EPP*
//! (and, with HA sync, from its replicas).
//!
//! Unlike the queue scorers, which read the engine's metrics (scraped every 50 ms), this one
//! reads the EPP's own dispatch accounting (`Endpoint::inflight_requests`, incremented when a
//! request is sent and decremented when it completes), so bursts are seen immediately. With
//! several EPP replicas synced (`--ha-mode=active-active`), the other replicas' latest
//! in-flight counts are added (`Endpoint::fleet_inflight_requests`), so the replicas balance
//! as one EPP would.
//!
//! ## Formula
//!
//! With `c(e)` the endpoint's in-flight requests (this EPP's plus its synced replicas') and
//! `max` the largest `c` over the candidates:
//!
//! ```text
//! score(e) = 1                                   when c(e) ≤ idleThreshold
//! score(e) = (max − c(e)) / max · maxBusyScore   otherwise
//! ```
//!
//! ## Parameters
//!
//! * `idleThreshold` (integer, default `0`): endpoints with at most this many requests in
//!   flight count as idle and score 1. Negative values fall back to 0.
//! * `maxBusyScore` (number in [0, 1], default `1`): the best score a busy endpoint can get;
//!   below 1 it makes every idle endpoint beat every busy one. Values outside [0, 1] fall back
//!   to 1.
//! * `requestTimeout` (Go duration string, deprecated): accepted and ignored — in-flight
//!   requests are released when they complete, as in the reference.
//!
//! Category: distribution. Lock-free (atomic loads).

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::plugin::{Candidate, SchedulingContext, Scorer, ScorerCategory};
use llmsched_core::registry::{FactoryInput, PluginError};
use serde::Deserialize;

use crate::common::{impl_plugin, opt_go_duration, params};

/// Type name.
pub const TYPE: &str = "active-request-scorer";

/// Parameters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ActiveRequestParams {
    /// In-flight count at or below which an endpoint is idle.
    pub idle_threshold: i64,
    /// Best score of a busy endpoint.
    pub max_busy_score: f64,
    /// Deprecated, ignored.
    #[serde(deserialize_with = "opt_go_duration")]
    pub request_timeout: Option<std::time::Duration>,
}

impl Default for ActiveRequestParams {
    fn default() -> Self {
        Self {
            idle_threshold: 0,
            max_busy_score: 1.0,
            request_timeout: None,
        }
    }
}

/// The active-request scorer.
#[derive(Debug, Clone)]
pub struct ActiveRequestScorer {
    name: String,
    idle_threshold: u64,
    max_busy_score: f64,
}

impl ActiveRequestScorer {
    /// A scorer from its parameters (out-of-range values replaced as documented).
    pub fn new(name: impl Into<String>, p: &ActiveRequestParams) -> Self {
        if p.request_timeout.is_some() {
            tracing::warn!(
                "active-request-scorer: requestTimeout is deprecated and ignored; requests are released when they complete"
            );
        }
        let idle_threshold = u64::try_from(p.idle_threshold).unwrap_or(0);
        let max_busy_score = if (0.0..=1.0).contains(&p.max_busy_score) {
            p.max_busy_score
        } else {
            tracing::warn!(
                max_busy_score = p.max_busy_score,
                "active-request-scorer: maxBusyScore must be in [0, 1], using 1"
            );
            1.0
        };
        Self {
            name: name.into(),
            idle_threshold,
            max_busy_score,
        }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let p: ActiveRequestParams = params(i.parameters)?;
    Ok(Arc::new(ActiveRequestScorer::new(i.name, &p)))
}

impl_plugin!(ActiveRequestScorer, TYPE, as_scorer => Scorer);

impl Scorer for ActiveRequestScorer {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Distribution
    }

    fn score(&self, _cx: &SchedulingContext<'_>, candidates: &[Candidate<'_>], scores: &mut [f64]) {
        let mut max = 0u64;
        for (s, e) in scores.iter_mut().zip(candidates) {
            let c = e.fleet_inflight_requests();
            max = max.max(c);
            *s = c as f64;
        }
        let maxf = max as f64;
        for s in scores.iter_mut() {
            // Exact: counts are far below 2^53.
            let c = *s;
            *s = if c <= self.idle_threshold as f64 {
                1.0
            } else {
                (maxf - c) / maxf * self.max_busy_score
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::cycle::CycleState;

    fn run(params: Option<serde_json::Value>, inflight: &[u64]) -> Vec<f64> {
        let p = build(TYPE, params).unwrap();
        let s = p.as_scorer().unwrap();
        let eps: Vec<_> = inflight
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let e = ep(i as u32);
                for _ in 0..n {
                    e.dispatch(10);
                }
                e
            })
            .collect();
        scores(s.as_ref(), &request("m"), &CycleState::new(), &eps)
    }

    #[test]
    fn defaults_idle_zero_busy_linear() {
        // max 4: 0 → idle 1; 1 → 3/4; 2 → 1/2; 4 → 0.
        assert_close(&run(None, &[0, 1, 2, 4]), &[1.0, 0.75, 0.5, 0.0]);
        // Nobody busy: all idle.
        assert_close(&run(None, &[0, 0]), &[1.0, 1.0]);
    }

    #[test]
    fn idle_threshold_and_max_busy_score() {
        let p = serde_json::json!({"idleThreshold": 1, "maxBusyScore": 0.5});
        // max 5: 0,1 idle → 1; 3 → (5−3)/5·0.5 = 0.2; 5 → 0.
        assert_close(&run(Some(p), &[0, 1, 3, 5]), &[1.0, 1.0, 0.2, 0.0]);
    }

    #[test]
    fn completed_requests_are_released() {
        let p = build(TYPE, None).unwrap();
        let s = p.as_scorer().unwrap();
        let (a, b) = (ep(1), ep(2));
        a.dispatch(5);
        a.dispatch(5);
        b.dispatch(5);
        a.complete(5);
        a.complete(5);
        // a: 0 in flight → 1; b: 1 = max → 0.
        assert_close(
            &scores(s.as_ref(), &request("m"), &CycleState::new(), &[a, b]),
            &[1.0, 0.0],
        );
    }

    #[test]
    fn out_of_range_values_fall_back_and_deprecated_timeout_is_accepted() {
        let p =
            serde_json::json!({"idleThreshold": -3, "maxBusyScore": 7.0, "requestTimeout": "2m"});
        assert_close(&run(Some(p), &[0, 2, 4]), &[1.0, 0.5, 0.0]);
    }

    #[test]
    fn synced_replicas_in_flight_counts_add_up() {
        let p = build(TYPE, None).unwrap();
        let s = p.as_scorer().unwrap();
        let (a, b) = (ep(1), ep(2));
        a.dispatch(5);
        // The other replicas have 3 in flight on b: b is the busier one.
        b.set_peer_inflight(3, 30);
        // max 3: a (1) → 2/3; b (3) → 0.
        assert_close(
            &scores(s.as_ref(), &request("m"), &CycleState::new(), &[a, b]),
            &[2.0 / 3.0, 0.0],
        );
    }

    #[test]
    fn bad_parameters() {
        assert!(
            build_err(TYPE, serde_json::json!({"requestTimeout": "soon"}))
                .contains("invalid duration")
        );
        assert!(build_err(TYPE, serde_json::json!({"maxBusyScore": "x"})).contains("invalid type"));
        assert!(build_err(TYPE, serde_json::json!({"idle": 1})).contains("unknown field `idle`"));
    }
}
