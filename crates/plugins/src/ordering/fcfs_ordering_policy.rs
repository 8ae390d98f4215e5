//! `fcfs-ordering-policy`: first come, first served within a flow (the default).
//!
//! ## Formula
//!
//! ```text
//! a before b  ⇔  (enqueue_time(a), seq(a)) < (enqueue_time(b), seq(b))
//! ```
//!
//! `seq` is the enqueue sequence number, so requests enqueued at the same instant keep their
//! arrival order.
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
pub const TYPE: &str = "fcfs-ordering-policy";

/// The FCFS ordering policy.
#[derive(Debug, Clone)]
pub struct FcfsOrderingPolicy {
    name: String,
}

impl FcfsOrderingPolicy {
    /// A policy named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(FcfsOrderingPolicy::new(i.name)))
}

impl_plugin!(FcfsOrderingPolicy, TYPE, as_ordering_policy => OrderingPolicy);

impl OrderingPolicy for FcfsOrderingPolicy {
    fn less(&self, a: &QueuedRequest, b: &QueuedRequest) -> bool {
        (a.enqueued, a.seq) < (b.enqueued, b.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::{build, build_err};
    use crate::ordering::testutil::queued;
    use std::time::Instant;

    #[test]
    fn earlier_enqueue_first_then_sequence() {
        let p = FcfsOrderingPolicy::new(TYPE);
        let t0 = Instant::now();
        let (a, b) = (queued(2, t0, 0, None), queued(1, t0, 5, Some(1)));
        // Deadlines do not matter: a was enqueued first.
        assert!(p.less(&a, &b) && !p.less(&b, &a));
        let (c, d) = (queued(3, t0, 7, None), queued(4, t0, 7, None));
        assert!(p.less(&c, &d) && !p.less(&d, &c));
        assert!(!p.less(&c, &c));
    }

    #[test]
    fn builds_through_the_registry_and_rejects_parameters() {
        let p = build(TYPE, None).unwrap();
        assert!(p.as_ordering_policy().is_some());
        assert!(build_err(TYPE, serde_json::json!({"x": 1})).contains("unknown field `x`"));
    }
}
