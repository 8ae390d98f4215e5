//! Flow-control policy interfaces and the queues they act on.
//!
//! With the `flowControl` feature gate, requests wait in *priority bands* (one per priority
//! level); inside a band every *flow* (fairness id, `x-gateway-inference-fairness-id`) has its
//! own queue. Two kinds of plugins decide the order of service, as in the reference:
//!
//! * an [`OrderingPolicy`] orders the requests *within* one flow's queue (its head is the
//!   request that flow sends next): `fcfs-ordering-policy`, `edf-ordering-policy`;
//! * a [`FairnessPolicy`] picks *which flow* of a band is served next:
//!   `global-strict-fairness-policy`, `round-robin-fairness-policy`,
//!   `token-fair-share-fairness-policy`.
//!
//! A band names its policies with `fairnessPolicyRef` / `orderingPolicyRef`, resolved like
//! every `pluginRef` (see [`crate::config`]). One policy instance may serve several bands, so
//! a fairness policy keeps no per-band state itself: [`FairnessPolicy::new_band_state`]
//! creates a [`FairnessState`] that the band owns and hands back on every decision and every
//! event of the band's requests (arrival, dispatch, completion). The band is locked while the
//! state runs, so the state needs no synchronisation of its own; it must not block.
//!
//! [`BandQueues`] is the band's set of flow queues, kept in flow-id order with each queue
//! sorted by the band's ordering policy. It is pure data: the controller (in
//! `llmsched-director`) adds capacity limits, waiting, TTLs and metrics around it.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Instant;

use crate::plugin::Plugin;
use crate::request::Usage;

/// A queued request, as the policies see it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedRequest {
    /// Enqueue sequence number: unique, increasing with enqueue order.
    pub seq: u64,
    /// When it was enqueued.
    pub enqueued: Instant,
    /// When it expires (enqueue time + TTL), if it has a TTL.
    pub deadline: Option<Instant>,
    /// Body size in bytes.
    pub bytes: u64,
    /// Prompt tokens as estimated before dispatch (token ids counted exactly, text as
    /// characters / 4).
    pub prompt_tokens: u64,
    /// The request's `max_tokens` / `max_completion_tokens`, if given.
    pub max_tokens: Option<u64>,
}

/// Orders the requests within one flow's queue.
pub trait OrderingPolicy: Plugin {
    /// True when `a` must be dispatched before `b`. Must be a strict weak order; ties keep
    /// enqueue order.
    fn less(&self, a: &QueuedRequest, b: &QueuedRequest) -> bool;
}

/// Picks which flow of a band is served next. See the [module documentation](self).
pub trait FairnessPolicy: Plugin {
    /// Fresh state for one band.
    fn new_band_state(&self) -> Box<dyn FairnessState>;
}

/// Service charged to a flow for one dispatched request, in the policy's own unit; handed
/// back to [`FairnessState::on_completion`] so the policy can correct an estimate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Charge(pub f64);

/// One band's fairness state, owned by the band. Every method runs with the band locked.
pub trait FairnessState: Send + 'static {
    /// The flow whose head request is dispatched next, among the band's backlogged flows;
    /// `None` when none may go. The caller dispatches that flow's head right after.
    fn pick<'a>(&mut self, band: &'a BandQueues) -> Option<&'a str>;

    /// A request of `flow` arrived, before it is queued (or dispatched at once when nothing
    /// waits). `was_backlogged`: the flow already had requests queued in this band.
    fn on_arrival(&mut self, _band: &BandQueues, _flow: &str, _was_backlogged: bool) {}

    /// `request` of `flow` was dispatched (already removed from `band`). Returns the service
    /// charged, given back on completion.
    fn on_dispatch(&mut self, _band: &BandQueues, _flow: &str, _request: &QueuedRequest) -> Charge {
        Charge::default()
    }

    /// A dispatched request of `flow` finished; `usage` is what the model server reported
    /// (`None` when it reported nothing, or the request failed or was cancelled after it was
    /// sent).
    fn on_completion(&mut self, _flow: &str, _charge: Charge, _usage: Option<&Usage>) {}

    /// A dispatched request of `flow` never reached a model server (no endpoint could take
    /// it, or its client left at the moment it was released): undo [`Self::on_dispatch`].
    fn on_not_served(&mut self, _flow: &str, _charge: Charge) {}
}

/// One flow's queue, sorted by the band's ordering policy (head first).
#[derive(Debug, Clone, Default)]
pub struct FlowQueue {
    items: VecDeque<QueuedRequest>,
    bytes: u64,
}

impl FlowQueue {
    /// Requests queued.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes queued.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The request this flow sends next.
    pub fn head(&self) -> Option<&QueuedRequest> {
        self.items.front()
    }

    /// The requests, head first.
    pub fn iter(&self) -> impl Iterator<Item = &QueuedRequest> {
        self.items.iter()
    }
}

/// The flow queues of one priority band. Only backlogged flows are present: a queue that
/// empties is dropped.
pub struct BandQueues {
    priority: i32,
    ordering: Arc<dyn OrderingPolicy>,
    flows: BTreeMap<String, FlowQueue>,
    len: u64,
    bytes: u64,
}

impl std::fmt::Debug for BandQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BandQueues")
            .field("priority", &self.priority)
            .field("ordering", &self.ordering.name())
            .field("flows", &self.flows)
            .finish()
    }
}

impl BandQueues {
    /// Empty queues for the band of `priority`, ordered by `ordering`.
    pub fn new(priority: i32, ordering: Arc<dyn OrderingPolicy>) -> Self {
        Self {
            priority,
            ordering,
            flows: BTreeMap::new(),
            len: 0,
            bytes: 0,
        }
    }

    /// The band's priority.
    pub fn priority(&self) -> i32 {
        self.priority
    }

    /// The band's ordering policy.
    pub fn ordering(&self) -> &Arc<dyn OrderingPolicy> {
        &self.ordering
    }

    /// Requests queued in the band.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes queued in the band.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Number of backlogged flows.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// The backlogged flows in ascending id order.
    pub fn flows(&self) -> impl Iterator<Item = (&str, &FlowQueue)> {
        self.flows.iter().map(|(k, q)| (k.as_str(), q))
    }

    /// The backlogged flows whose id sorts after `id`, in ascending order.
    pub fn flows_after<'a>(&'a self, id: &str) -> impl Iterator<Item = (&'a str, &'a FlowQueue)> {
        self.flows
            .range::<str, _>((Bound::Excluded(id), Bound::Unbounded))
            .map(|(k, q)| (k.as_str(), q))
    }

    /// The queue of `flow`, when it is backlogged.
    pub fn flow(&self, flow: &str) -> Option<&FlowQueue> {
        self.flows.get(flow)
    }

    /// Queues `request` in `flow`'s queue at its place under the ordering policy (after
    /// every request it does not precede). Returns true when the flow was not backlogged.
    pub fn push(&mut self, flow: &str, request: QueuedRequest) -> bool {
        self.len += 1;
        self.bytes += request.bytes;
        let ordering = &self.ordering;
        let newly = !self.flows.contains_key(flow);
        let q = self.flows.entry(flow.to_string()).or_default();
        q.bytes += request.bytes;
        // Usually the new request goes last (FCFS, or EDF with one TTL): check that first.
        let at = match q.items.back() {
            Some(last) if ordering.less(&request, last) => {
                q.items.partition_point(|x| !ordering.less(&request, x))
            }
            _ => q.items.len(),
        };
        q.items.insert(at, request);
        newly
    }

    /// Removes and returns the head of `flow`'s queue.
    pub fn pop(&mut self, flow: &str) -> Option<QueuedRequest> {
        let q = self.flows.get_mut(flow)?;
        let item = q.items.pop_front()?;
        self.account_removal(flow, &item);
        Some(item)
    }

    /// Removes the request `seq` from `flow`'s queue (expired or cancelled).
    pub fn remove(&mut self, flow: &str, seq: u64) -> Option<QueuedRequest> {
        let q = self.flows.get_mut(flow)?;
        let pos = q.items.iter().position(|it| it.seq == seq)?;
        let item = q.items.remove(pos)?;
        self.account_removal(flow, &item);
        Some(item)
    }

    fn account_removal(&mut self, flow: &str, item: &QueuedRequest) {
        self.len -= 1;
        self.bytes -= item.bytes;
        if let Some(q) = self.flows.get_mut(flow) {
            q.bytes -= item.bytes;
            if q.items.is_empty() {
                self.flows.remove(flow);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Fcfs;
    impl Plugin for Fcfs {
        fn type_name(&self) -> &'static str {
            "fcfs-ordering-policy"
        }
        fn name(&self) -> &str {
            "fcfs"
        }
    }
    impl OrderingPolicy for Fcfs {
        fn less(&self, a: &QueuedRequest, b: &QueuedRequest) -> bool {
            (a.enqueued, a.seq) < (b.enqueued, b.seq)
        }
    }

    /// Smallest byte size first: an ordering that reorders.
    struct Smallest;
    impl Plugin for Smallest {
        fn type_name(&self) -> &'static str {
            "smallest"
        }
        fn name(&self) -> &str {
            "smallest"
        }
    }
    impl OrderingPolicy for Smallest {
        fn less(&self, a: &QueuedRequest, b: &QueuedRequest) -> bool {
            a.bytes < b.bytes
        }
    }

    fn item(seq: u64, bytes: u64, t0: Instant) -> QueuedRequest {
        QueuedRequest {
            seq,
            enqueued: t0 + Duration::from_millis(seq),
            deadline: None,
            bytes,
            prompt_tokens: 0,
            max_tokens: None,
        }
    }

    #[test]
    fn queues_follow_the_ordering_policy_and_keep_ties_in_order() {
        let t0 = Instant::now();
        let mut b = BandQueues::new(0, Arc::new(Smallest));
        assert!(b.push("a", item(1, 30, t0)));
        assert!(!b.push("a", item(2, 10, t0)));
        assert!(!b.push("a", item(3, 20, t0)));
        assert!(!b.push("a", item(4, 10, t0)));
        let order: Vec<u64> = b.flow("a").unwrap().iter().map(|i| i.seq).collect();
        assert_eq!(order, vec![2, 4, 3, 1]);
        assert_eq!((b.len(), b.bytes()), (4, 70));
        assert_eq!(b.flow("a").unwrap().bytes(), 70);
    }

    #[test]
    fn empty_flows_are_dropped_and_counts_follow() {
        let t0 = Instant::now();
        let mut b = BandQueues::new(3, Arc::new(Fcfs));
        b.push("b", item(1, 5, t0));
        b.push("a", item(2, 7, t0));
        b.push("b", item(3, 1, t0));
        let ids: Vec<&str> = b.flows().map(|(k, _)| k).collect();
        assert_eq!(ids, vec!["a", "b"]);
        let after: Vec<&str> = b.flows_after("a").map(|(k, _)| k).collect();
        assert_eq!(after, vec!["b"]);
        assert_eq!(b.pop("a").map(|i| i.seq), Some(2));
        assert!(b.flow("a").is_none());
        assert_eq!(b.remove("b", 3).map(|i| i.seq), Some(3));
        assert_eq!(b.remove("b", 3), None);
        assert_eq!((b.len(), b.bytes(), b.flow_count()), (1, 5, 1));
        assert_eq!(b.pop("b").map(|i| i.seq), Some(1));
        assert!(b.is_empty() && b.flow_count() == 0 && b.bytes() == 0);
        assert_eq!(b.pop("b"), None);
        assert_eq!(b.priority(), 3);
    }
}
