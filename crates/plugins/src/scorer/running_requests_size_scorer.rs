//! `running-requests-size-scorer`: prefers endpoints running fewer requests.
//!
//! ## Formula
//!
//! With `r(e)` the endpoint's running requests (`vllm:num_requests_running`) and `min`/`max`
//! taken over the candidates:
//!
//! ```text
//! score(e) = (max − r(e)) / (max − min)        when max > min
//! score(e) = 1                                 when every candidate runs as many requests
//! ```
//!
//! The implementation is the shared [`MinMaxScorer`] over the running requests.
//!
//! ## Parameters
//!
//! None (`{}` or no `parameters`); any parameter is an error.
//!
//! Category: distribution.

use llmsched_core::endpoint::EndpointMetrics;

use super::min_max::{LoadMetric, MinMaxScorer};

/// Type name.
pub const TYPE: &str = "running-requests-size-scorer";

/// The requests an endpoint is running.
#[derive(Debug, Clone, Copy)]
pub struct RunningRequests;

impl LoadMetric for RunningRequests {
    const TYPE: &'static str = TYPE;
    fn value(metrics: &EndpointMetrics) -> f64 {
        f64::from(metrics.running_requests)
    }
}

/// The running-requests scorer.
pub type RunningRequestsSizeScorer = MinMaxScorer<RunningRequests>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::cycle::CycleState;

    #[test]
    fn min_max_normalised_inverse_of_running() {
        let s = RunningRequestsSizeScorer::new(TYPE);
        let eps = [
            ep_with(1, &[], load(50, 2, 0.0)),
            ep_with(2, &[], load(0, 6, 0.0)),
            ep_with(3, &[], load(0, 4, 0.0)),
        ];
        // Waiting queues are ignored; running: min 2, max 6.
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &eps),
            &[1.0, 0.0, 0.5],
        );
        let eq = [
            ep_with(1, &[], load(0, 4, 0.0)),
            ep_with(2, &[], load(9, 4, 0.0)),
        ];
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &eq),
            &[1.0, 1.0],
        );
    }

    #[test]
    fn parameters_are_rejected() {
        assert!(build_err(TYPE, serde_json::json!({"x": true})).contains("unknown field `x`"));
    }
}
