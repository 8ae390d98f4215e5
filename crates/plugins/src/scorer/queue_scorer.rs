//! `queue-scorer`: prefers endpoints with shorter waiting queues.
//!
//! ## Formula
//!
//! With `q(e)` the endpoint's waiting queue (`vllm:num_requests_waiting`) and `min`/`max`
//! taken over the candidates:
//!
//! ```text
//! score(e) = (max − q(e)) / (max − min)        when max > min
//! score(e) = 1                                 when every candidate has the same queue
//! ```
//!
//! So the shortest queue scores 1 and the longest 0, whatever the absolute lengths. The
//! implementation is the shared [`MinMaxScorer`] over the waiting queue.
//!
//! ## Parameters
//!
//! None (`{}` or no `parameters`); any parameter is an error.
//!
//! Category: distribution. Reads one metrics snapshot per candidate, no allocation.

use llmsched_core::endpoint::EndpointMetrics;

use super::min_max::{LoadMetric, MinMaxScorer};

/// Type name.
pub const TYPE: &str = "queue-scorer";

/// The waiting queue of an endpoint.
#[derive(Debug, Clone, Copy)]
pub struct WaitingQueue;

impl LoadMetric for WaitingQueue {
    const TYPE: &'static str = TYPE;
    fn value(metrics: &EndpointMetrics) -> f64 {
        f64::from(metrics.waiting_queue_size)
    }
}

/// The queue scorer.
pub type QueueScorer = MinMaxScorer<WaitingQueue>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::cycle::CycleState;

    #[test]
    fn min_max_normalised_inverse_of_the_queue() {
        let s = QueueScorer::new(TYPE);
        let eps = [
            ep_with(1, &[], load(0, 0, 0.0)),
            ep_with(2, &[], load(5, 0, 0.0)),
            ep_with(3, &[], load(10, 0, 0.0)),
            ep_with(4, &[], load(8, 0, 0.0)),
        ];
        // min 0, max 10: (10-0)/10, (10-5)/10, 0, (10-8)/10.
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &eps),
            &[1.0, 0.5, 0.0, 0.2],
        );
    }

    #[test]
    fn equal_queues_all_score_one() {
        let s = QueueScorer::new(TYPE);
        let eps = [
            ep_with(1, &[], load(3, 0, 0.0)),
            ep_with(2, &[], load(3, 9, 0.9)),
        ];
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &eps),
            &[1.0, 1.0],
        );
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &eps[..1]),
            &[1.0],
        );
    }

    #[test]
    fn offset_queues_are_relative() {
        let s = QueueScorer::new(TYPE);
        let eps = [
            ep_with(1, &[], load(100, 0, 0.0)),
            ep_with(2, &[], load(104, 0, 0.0)),
            ep_with(3, &[], load(101, 0, 0.0)),
        ];
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &eps),
            &[1.0, 0.0, 0.75],
        );
    }

    #[test]
    fn parameters_are_rejected() {
        assert!(build(TYPE, Some(serde_json::json!({}))).is_ok());
        assert!(
            build_err(TYPE, serde_json::json!({"threshold": 1}))
                .contains("unknown field `threshold`")
        );
        assert!(build_err(TYPE, serde_json::json!([1])).contains("invalid type"));
        assert!(build_err(TYPE, serde_json::json!("x")).contains("expected an object"));
    }
}
