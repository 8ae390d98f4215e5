//! Flow-control fairness policies: which flow of a priority band is served next
//! ([`llmsched_core::flowcontrol::FairnessPolicy`]). A priority band names one with
//! `fairnessPolicyRef` (default `global-strict-fairness-policy`).

pub mod global_strict_fairness_policy;
pub mod round_robin_fairness_policy;
pub mod token_fair_share_fairness_policy;

use llmsched_core::flowcontrol::BandQueues;
use llmsched_core::registry::Registry;

pub use global_strict_fairness_policy::GlobalStrictFairnessPolicy;
pub use round_robin_fairness_policy::RoundRobinFairnessPolicy;
pub use token_fair_share_fairness_policy::{TokenFairShareFairnessPolicy, TokenFairShareParams};

/// Registers every fairness policy.
pub fn register(r: &mut Registry) {
    r.register(
        global_strict_fairness_policy::TYPE,
        global_strict_fairness_policy::factory,
    );
    r.register(
        round_robin_fairness_policy::TYPE,
        round_robin_fairness_policy::factory,
    );
    r.register(
        token_fair_share_fairness_policy::TYPE,
        token_fair_share_fairness_policy::factory,
    );
}

/// The backlogged flow whose head comes first under the band's ordering policy (ties: the
/// lowest flow id).
pub(crate) fn best_head(band: &BandQueues) -> Option<&str> {
    let ordering = band.ordering();
    let mut best: Option<(&str, &llmsched_core::flowcontrol::QueuedRequest)> = None;
    for (id, q) in band.flows() {
        let Some(head) = q.head() else { continue };
        match best {
            Some((_, b)) if !ordering.less(head, b) => {}
            _ => best = Some((id, head)),
        }
    }
    best.map(|(id, _)| id)
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Bands and a dispatch loop for the policies' tests.

    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use llmsched_core::flowcontrol::{BandQueues, Charge, FairnessState, QueuedRequest};

    use crate::ordering::FcfsOrderingPolicy;

    /// An empty FCFS band.
    pub fn band() -> BandQueues {
        BandQueues::new(0, Arc::new(FcfsOrderingPolicy::new("fcfs")))
    }

    /// Enqueues a request as the flow controller does: arrival event, then queued.
    pub fn enqueue(
        state: &mut dyn FairnessState,
        band: &mut BandQueues,
        flow: &str,
        seq: u64,
        prompt_tokens: u64,
        max_tokens: Option<u64>,
    ) {
        let was = band.flow(flow).is_some();
        state.on_arrival(band, flow, was);
        band.push(
            flow,
            QueuedRequest {
                seq,
                enqueued: base() + Duration::from_micros(seq),
                deadline: None,
                bytes: 1,
                prompt_tokens,
                max_tokens,
            },
        );
    }

    /// One dispatch as the flow controller does: pick, pop, dispatch event. Returns the
    /// flow, the request and the charge.
    pub fn dispatch(
        state: &mut dyn FairnessState,
        band: &mut BandQueues,
    ) -> Option<(String, QueuedRequest, Charge)> {
        let flow = state.pick(band)?.to_string();
        let item = band.pop(&flow)?;
        let charge = state.on_dispatch(band, &flow, &item);
        Some((flow, item, charge))
    }

    fn base() -> Instant {
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *BASE.get_or_init(Instant::now)
    }
}
