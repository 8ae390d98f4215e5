//! `edf-ordering-policy`: earliest deadline first within a flow.
//!
//! ## Formula
//!
//! With `deadline(r)` = enqueue time + the request's TTL (`defaultRequestTTL`), and requests
//! without a TTL after every request that has one:
//!
//! ```text
//! a before b  ⇔  (no_ttl(a), deadline(a), enqueue_time(a), seq(a))
//!                  < (no_ttl(b), deadline(b), enqueue_time(b), seq(b))
//! ```
//!
//! Ties (same deadline) fall back to FCFS. llmsched applies one TTL to every request (as the
//! reference does today), so within a flow EDF order is FCFS order; across flows,
//! `global-strict-fairness-policy` compares heads with this order.
//!
//! ## Parameters
//!
//! None (`{}` or no `parameters`); any parameter is an error.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::flowcontrol::{OrderingPolicy, QueuedRequest};
use llmsched_core::registry::{FactoryInput, PluginError};

use crate::common::{impl_plugin, params};
use crate::scorer::NoParameters;

/// Type name.
pub const TYPE: &str = "edf-ordering-policy";

/// The EDF ordering policy.
#[derive(Debug, Clone)]
pub struct EdfOrderingPolicy {
    name: String,
}

impl EdfOrderingPolicy {
    /// A policy named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(EdfOrderingPolicy::new(i.name)))
}

impl_plugin!(EdfOrderingPolicy, TYPE, as_ordering_policy => OrderingPolicy);

impl OrderingPolicy for EdfOrderingPolicy {
    fn less(&self, a: &QueuedRequest, b: &QueuedRequest) -> bool {
        let key = |r: &QueuedRequest| (r.deadline.is_none(), r.deadline, r.enqueued, r.seq);
        key(a) < key(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::{build, build_err};
    use crate::ordering::testutil::queued;
    use std::time::Instant;

    #[test]
    fn earliest_deadline_first_then_fcfs_and_no_ttl_last() {
        let p = EdfOrderingPolicy::new(TYPE);
        let t0 = Instant::now();
        // Enqueued later but due earlier: first.
        let (late_urgent, early_relaxed) =
            (queued(2, t0, 10, Some(5)), queued(1, t0, 0, Some(100)));
        assert!(p.less(&late_urgent, &early_relaxed) && !p.less(&early_relaxed, &late_urgent));
        // Same deadline: FCFS.
        let (a, b) = (queued(3, t0, 0, Some(20)), queued(4, t0, 10, Some(10)));
        assert!(p.less(&a, &b) && !p.less(&b, &a));
        // No TTL sorts after any deadline, however old.
        let none = queued(5, t0, 0, None);
        assert!(p.less(&late_urgent, &none) && !p.less(&none, &late_urgent));
        let none2 = queued(6, t0, 1, None);
        assert!(p.less(&none, &none2));
    }

    #[test]
    fn builds_through_the_registry_and_rejects_parameters() {
        let p = build(TYPE, None).unwrap();
        assert!(p.as_ordering_policy().is_some());
        assert!(build_err(TYPE, serde_json::json!({"x": 1})).contains("unknown field `x`"));
    }
}
