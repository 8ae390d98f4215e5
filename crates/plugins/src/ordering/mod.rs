//! Flow-control ordering policies: the order of requests *within* one flow's queue
//! ([`llmsched_core::flowcontrol::OrderingPolicy`]). A priority band names one with
//! `orderingPolicyRef` (default `fcfs-ordering-policy`).

pub mod edf_ordering_policy;
pub mod fcfs_ordering_policy;

use llmsched_core::registry::Registry;

pub use edf_ordering_policy::EdfOrderingPolicy;
pub use fcfs_ordering_policy::FcfsOrderingPolicy;

/// Registers every ordering policy.
pub fn register(r: &mut Registry) {
    r.register(fcfs_ordering_policy::TYPE, fcfs_ordering_policy::factory);
    r.register(edf_ordering_policy::TYPE, edf_ordering_policy::factory);
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Queued requests for the policies' tests.

    use std::time::{Duration, Instant};

    use llmsched_core::flowcontrol::QueuedRequest;

    /// Request `seq`, enqueued `at_ms` after `t0`, expiring `ttl_ms` after that (if any).
    pub fn queued(seq: u64, t0: Instant, at_ms: u64, ttl_ms: Option<u64>) -> QueuedRequest {
        let enqueued = t0 + Duration::from_millis(at_ms);
        QueuedRequest {
            seq,
            enqueued,
            deadline: ttl_ms.map(|t| enqueued + Duration::from_millis(t)),
            bytes: 100,
            prompt_tokens: 100,
            max_tokens: None,
        }
    }
}
