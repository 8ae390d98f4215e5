//! Flow control (feature gate `flowControl`): requests wait in priority-banded queues and are
//! released while the pool is not saturated.
//!
//! Semantics follow the reference's flow controller:
//!
//! * Every request is enqueued into the band of its priority (an explicitly configured band,
//!   else one provisioned from `defaultPriorityBand`), in the queue of its flow (the fairness
//!   id). Capacity is checked first: the global `maxBytes`/`maxRequests`, then the band's
//!   (`maxBytes` defaults to 1 GB per band as in the reference; `maxRequests` unlimited unless
//!   set). Over capacity ⇒ 429 `request rejected pre-queue: queue at capacity` with
//!   `x-llm-d-request-dropped-reason: rejected-saturated`.
//! * A dispatch cycle releases at most one request: it reads the pool saturation (the
//!   configured saturation detector over all endpoints; no detector ⇒ never saturated) and,
//!   when it is below 1.0, walks the bands from the highest priority down and releases the
//!   first band's selected item. When saturated it stops (head-of-line blocking, so lower
//!   bands never overtake a higher one). Cycles run when a request is enqueued, when a
//!   request completes, and every `tick` (1 ms, as the reference) while anything is queued.
//! * Within a band, `global-strict-fairness-policy` (default) picks the flow whose head is the
//!   oldest (FCFS) or has the earliest deadline (EDF); `round-robin-fairness-policy` cycles
//!   through the flows in key order, skipping empty ones.
//! * A request waits at most the default TTL (`defaultRequestTTL`; none ⇒ until the client
//!   goes away): expiry ⇒ 503 `request timed out in queue: request evicted from queue:
//!   request TTL expired` with `x-llm-d-request-dropped-reason: rejected-ttl-expired`. A
//!   client that disconnects drops its waiting future, which removes the item.
//!
//! Not implemented: per-request TTLs (the reference itself only uses the default, which is
//! also why EDF order equals FCFS order within one flow: every deadline is enqueue time +
//! the same TTL), usage-limit policies other than the static 1.0 ceiling, sharding, flow
//! garbage-collection timers (empty flow queues are dropped at once), eviction of dispatched
//! requests.
//!
//! The queues sit behind one mutex held for a few hundred nanoseconds per operation; flow
//! control is opt-in, and without it the request path takes no lock.

use std::cmp::Reverse;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use llmsched_core::config::{FlowControlSettings, PriorityBand};
use llmsched_core::error::{InferenceError, REQUEST_DROPPED_REASON_HEADER};
use tokio::sync::{Notify, oneshot};

use crate::metrics::{EppMetrics, FlowOutcomeLabels, FlowQueueLabels, PoolLabel};

/// Reason header value for capacity rejections.
pub const REASON_SATURATED: &str = "rejected-saturated";
/// Reason header value for TTL expiry.
pub const REASON_TTL_EXPIRED: &str = "rejected-ttl-expired";
/// Message of capacity rejections.
pub const MSG_AT_CAPACITY: &str = "request rejected pre-queue: queue at capacity";
/// Message of TTL expiry.
pub const MSG_TTL_EXPIRED: &str =
    "request timed out in queue: request evicted from queue: request TTL expired";
/// Default per-band byte cap (the reference's 1 GB).
pub const DEFAULT_BAND_MAX_BYTES: u64 = 1_000_000_000;
/// Default dispatch tick.
pub const DEFAULT_TICK: Duration = Duration::from_millis(1);

/// Reads the pool's current saturation (≥ 1.0 means saturated).
pub type SaturationProbe = Arc<dyn Fn() -> f64 + Send + Sync>;

/// What a queued request is, for ordering and metrics.
#[derive(Debug, Clone)]
pub struct FlowRequest {
    /// Fairness id (flow key).
    pub fairness_id: String,
    /// Objective priority (band).
    pub priority: i32,
    /// Body size in bytes.
    pub bytes: u64,
    /// Requested model, as a metrics label value (already bounded by the director).
    pub model_name: String,
    /// Target model, as a metrics label value (already bounded by the director).
    pub target_model_name: String,
}

struct Item {
    id: u64,
    bytes: u64,
    enqueued: Instant,
    deadline: Option<Instant>,
    tx: oneshot::Sender<()>,
    labels: FlowQueueLabels,
}

struct Band {
    cfg: PriorityBand,
    max_bytes: u64,
    flows: BTreeMap<String, VecDeque<Item>>,
    len: u64,
    bytes: u64,
    rr_last: Option<String>,
}

impl Band {
    fn new(cfg: PriorityBand) -> Self {
        let max_bytes = cfg
            .max_bytes
            .filter(|b| *b > 0)
            .unwrap_or(DEFAULT_BAND_MAX_BYTES);
        Self {
            cfg,
            max_bytes,
            flows: BTreeMap::new(),
            len: 0,
            bytes: 0,
            rr_last: None,
        }
    }

    /// Key of the flow to serve next.
    fn select_flow(&self) -> Option<String> {
        if self.cfg.round_robin_fairness {
            let after = self.rr_last.as_deref();
            let next = match after {
                Some(last) => self
                    .flows
                    .range::<str, _>((std::ops::Bound::Excluded(last), std::ops::Bound::Unbounded))
                    .find(|(_, q)| !q.is_empty())
                    .or_else(|| self.flows.iter().find(|(_, q)| !q.is_empty())),
                None => self.flows.iter().find(|(_, q)| !q.is_empty()),
            };
            return next.map(|(k, _)| k.clone());
        }
        // Global strict: the best head across flows.
        let edf = self.cfg.edf_ordering;
        self.flows
            .iter()
            .filter_map(|(k, q)| q.front().map(|it| (k, it)))
            .min_by_key(|(_, it)| {
                let deadline = if edf { it.deadline } else { None };
                // `None` deadlines sort last under EDF (Reverse(false) < Reverse(true) is
                // avoided by mapping to a tuple).
                (deadline.is_none(), deadline, it.enqueued, it.id)
            })
            .map(|(k, _)| k.clone())
    }
}

#[derive(Default)]
struct State {
    bands: BTreeMap<Reverse<i32>, Band>,
    len: u64,
    bytes: u64,
}

struct Shared {
    settings: FlowControlSettings,
    state: Mutex<State>,
    wake: Notify,
    probe: SaturationProbe,
    metrics: EppMetrics,
    pool: String,
    tick: Duration,
    closed: AtomicBool,
    dispatcher: AtomicBool,
    next_id: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the queues inconsistent in a way that
        // matters more than stopping service; recover the guard.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn band_cfg(&self, priority: i32) -> PriorityBand {
        self.settings
            .bands
            .iter()
            .find(|b| b.priority == priority)
            .cloned()
            .unwrap_or_else(|| PriorityBand {
                priority,
                ..self.settings.default_band.clone()
            })
    }

    fn has_capacity(&self, st: &mut State, priority: i32, bytes: u64) -> bool {
        if let Some(max) = self.settings.max_bytes.filter(|m| *m > 0)
            && st.bytes + bytes > max
        {
            return false;
        }
        if let Some(max) = self.settings.max_requests.filter(|m| *m > 0)
            && st.len + 1 > max
        {
            return false;
        }
        let band = st
            .bands
            .entry(Reverse(priority))
            .or_insert_with(|| Band::new(self.band_cfg(priority)));
        if band.bytes + bytes > band.max_bytes {
            return false;
        }
        if let Some(max) = band.cfg.max_requests.filter(|m| *m > 0)
            && band.len + 1 > max
        {
            return false;
        }
        true
    }

    fn gauges(&self, labels: &FlowQueueLabels, len: i64, bytes: i64) {
        self.metrics
            .flow_queue_size
            .get_or_create(labels)
            .inc_by(len);
        self.metrics
            .flow_queue_bytes
            .get_or_create(labels)
            .inc_by(bytes);
    }

    fn outcome(&self, labels: &FlowQueueLabels, outcome: &str, waited: Duration) {
        self.metrics
            .flow_queue_duration
            .get_or_create(&FlowOutcomeLabels {
                fairness_id: labels.fairness_id.clone(),
                priority: labels.priority.clone(),
                outcome: outcome.to_string(),
                inference_pool: labels.inference_pool.clone(),
                model_name: labels.model_name.clone(),
                target_model_name: labels.target_model_name.clone(),
            })
            .observe(waited.as_secs_f64());
    }

    /// Removes a queued item; `None` when it is no longer queued (already dispatched).
    fn remove(&self, priority: i32, flow: &str, id: u64) -> Option<Item> {
        let mut st = self.lock();
        let band = st.bands.get_mut(&Reverse(priority))?;
        let q = band.flows.get_mut(flow)?;
        let pos = q.iter().position(|it| it.id == id)?;
        let item = q.remove(pos)?;
        if q.is_empty() {
            band.flows.remove(flow);
        }
        band.len -= 1;
        band.bytes -= item.bytes;
        st.len -= 1;
        st.bytes -= item.bytes;
        drop(st);
        self.gauges(&item.labels, -1, -(item.bytes as i64));
        Some(item)
    }

    /// One dispatch cycle; true when an item was released.
    fn dispatch_cycle(&self) -> bool {
        let saturation = (self.probe)();
        self.metrics
            .flow_pool_saturation
            .get_or_create(&PoolLabel {
                inference_pool: self.pool.clone(),
            })
            .set(saturation);
        if saturation >= 1.0 {
            return false;
        }
        let item = {
            let mut st = self.lock();
            let mut picked = None;
            for (key, band) in st.bands.iter_mut() {
                let Some(flow) = band.select_flow() else {
                    continue;
                };
                let Some(q) = band.flows.get_mut(&flow) else {
                    continue;
                };
                let Some(item) = q.pop_front() else {
                    continue;
                };
                if q.is_empty() {
                    band.flows.remove(&flow);
                }
                band.len -= 1;
                band.bytes -= item.bytes;
                band.rr_last = Some(flow);
                picked = Some((key.0, item));
                break;
            }
            let Some((_, item)) = picked else {
                return false;
            };
            st.len -= 1;
            st.bytes -= item.bytes;
            item
        };
        self.gauges(&item.labels, -1, -(item.bytes as i64));
        self.outcome(&item.labels, "Dispatched", item.enqueued.elapsed());
        // The waiter may have given up at this very moment; then the release is lost, which
        // is what the reference does too (the item is finalized either way).
        let _ = item.tx.send(());
        true
    }
}

/// Removes the item from its queue if the waiting future is dropped (client gone).
struct QueuedGuard<'a> {
    shared: &'a Shared,
    priority: i32,
    flow: String,
    id: u64,
    armed: bool,
}

impl Drop for QueuedGuard<'_> {
    fn drop(&mut self) {
        if self.armed
            && let Some(item) = self.shared.remove(self.priority, &self.flow, self.id)
        {
            self.shared.outcome(
                &item.labels,
                "EvictedContextCancelled",
                item.enqueued.elapsed(),
            );
        }
    }
}

/// The flow controller. Cheap to clone.
#[derive(Clone)]
pub struct FlowController {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FlowController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowController")
            .field("settings", &self.shared.settings)
            .finish()
    }
}

impl FlowController {
    /// A controller with `settings`, reading saturation from `probe`.
    pub fn new(
        settings: FlowControlSettings,
        probe: SaturationProbe,
        metrics: EppMetrics,
        pool_name: impl Into<String>,
        tick: Duration,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                settings,
                state: Mutex::new(State::default()),
                wake: Notify::new(),
                probe,
                metrics,
                pool: pool_name.into(),
                tick: if tick.is_zero() { DEFAULT_TICK } else { tick },
                closed: AtomicBool::new(false),
                dispatcher: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// The settings in effect.
    pub fn settings(&self) -> &FlowControlSettings {
        &self.shared.settings
    }

    /// Requests currently queued.
    pub fn queued(&self) -> u64 {
        self.shared.lock().len
    }

    /// Bytes currently queued.
    pub fn queued_bytes(&self) -> u64 {
        self.shared.lock().bytes
    }

    /// Signals that capacity may have freed up (a request completed).
    pub fn notify(&self) {
        self.shared.wake.notify_one();
    }

    /// Stops the background dispatcher (queued requests then wait for their TTL or client).
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }

    fn ensure_dispatcher(&self) {
        if self.shared.dispatcher.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            loop {
                let Some(shared) = weak.upgrade() else { break };
                if shared.closed.load(Ordering::Acquire) {
                    break;
                }
                let queued = shared.lock().len > 0;
                if queued {
                    tokio::select! {
                        _ = shared.wake.notified() => {}
                        _ = tokio::time::sleep(shared.tick) => {}
                    }
                } else {
                    // Bounded idle wait, so a dropped controller lets the task end.
                    tokio::select! {
                        _ = shared.wake.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
                if shared.closed.load(Ordering::Acquire) {
                    break;
                }
                shared.dispatch_cycle();
            }
        });
    }

    /// Enqueues the request and waits until it is dispatched, rejected or expired.
    ///
    /// Must run inside a tokio runtime (the dispatcher is a background task started on the
    /// first call). Dropping the future removes the request from its queue.
    pub async fn enqueue_and_wait(&self, req: &FlowRequest) -> Result<(), InferenceError> {
        let shared = &*self.shared;
        let labels = FlowQueueLabels {
            // The queue is keyed by the real id; only the label is bounded.
            fairness_id: shared.metrics.known.fairness(&req.fairness_id).to_string(),
            priority: req.priority.to_string(),
            inference_pool: shared.pool.clone(),
            model_name: req.model_name.clone(),
            target_model_name: req.target_model_name.clone(),
        };
        let now = Instant::now();
        let saturation = (shared.probe)();
        let ttl = shared.settings.default_request_ttl;
        let (tx, rx) = oneshot::channel();
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = shared.lock();
            if !shared.has_capacity(&mut st, req.priority, req.bytes) {
                drop(st);
                shared.outcome(&labels, "RejectedCapacity", now.elapsed());
                return Err(InferenceError::resource_exhausted(MSG_AT_CAPACITY)
                    .with_header(REQUEST_DROPPED_REASON_HEADER, REASON_SATURATED));
            }
            // Fast path: nothing waits and the pool has room, so this request is the one a
            // dispatch cycle would release at once.
            if st.len == 0 && saturation < 1.0 {
                drop(st);
                shared.outcome(&labels, "Dispatched", now.elapsed());
                return Ok(());
            }
            let band = st
                .bands
                .entry(Reverse(req.priority))
                .or_insert_with(|| Band::new(shared.band_cfg(req.priority)));
            band.flows
                .entry(req.fairness_id.clone())
                .or_default()
                .push_back(Item {
                    id,
                    bytes: req.bytes,
                    enqueued: now,
                    deadline: ttl.map(|t| now + t),
                    tx,
                    labels: labels.clone(),
                });
            band.len += 1;
            band.bytes += req.bytes;
            st.len += 1;
            st.bytes += req.bytes;
        }
        shared.gauges(&labels, 1, req.bytes as i64);
        let mut guard = QueuedGuard {
            shared,
            priority: req.priority,
            flow: req.fairness_id.clone(),
            id,
            armed: true,
        };
        self.ensure_dispatcher();
        shared.dispatch_cycle();
        let mut rx = rx;
        let outcome = match ttl {
            Some(t) => tokio::time::timeout_at((now + t).into(), &mut rx)
                .await
                .ok(),
            None => Some((&mut rx).await),
        };
        match outcome {
            Some(Ok(())) => {
                guard.armed = false;
                Ok(())
            }
            Some(Err(_)) => {
                // The sender was dropped without a release: the controller was torn down.
                guard.armed = false;
                Err(InferenceError::internal(
                    "internal flow control error: request evicted from queue: flow controller is not running",
                ))
            }
            None => {
                guard.armed = false;
                match shared.remove(req.priority, &req.fairness_id, id) {
                    Some(item) => {
                        shared.outcome(&item.labels, "EvictedTTL", now.elapsed());
                        Err(InferenceError::service_unavailable(MSG_TTL_EXPIRED)
                            .with_header(REQUEST_DROPPED_REASON_HEADER, REASON_TTL_EXPIRED))
                    }
                    // Released concurrently with the expiry: it was dispatched.
                    None if rx.try_recv().is_ok() => Ok(()),
                    None => Err(InferenceError::service_unavailable(MSG_TTL_EXPIRED)
                        .with_header(REQUEST_DROPPED_REASON_HEADER, REASON_TTL_EXPIRED)),
                }
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64 as A;

    fn settings() -> FlowControlSettings {
        FlowControlSettings::default()
    }

    fn probe(v: Arc<A>) -> SaturationProbe {
        Arc::new(move || f64::from_bits(v.load(Ordering::Relaxed)))
    }

    fn req(flow: &str, priority: i32, bytes: u64) -> FlowRequest {
        FlowRequest {
            fairness_id: flow.into(),
            priority,
            bytes,
            model_name: "m".into(),
            target_model_name: "m".into(),
        }
    }

    fn ctl(s: FlowControlSettings, sat: &Arc<A>) -> FlowController {
        // A long tick: these tests drive dispatch through `notify` and completions only.
        FlowController::new(
            s,
            probe(sat.clone()),
            EppMetrics::default(),
            "pool",
            Duration::from_secs(3600),
        )
    }

    async fn wait_queued(fc: &FlowController, n: u64) {
        while fc.queued() != n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn unsaturated_requests_pass_at_once() {
        let sat = Arc::new(A::new(0f64.to_bits()));
        let fc = ctl(settings(), &sat);
        fc.enqueue_and_wait(&req("a", 0, 10)).await.unwrap();
        assert_eq!(fc.queued(), 0);
    }

    #[tokio::test]
    async fn capacity_rejects_with_reason_header() {
        let sat = Arc::new(A::new(2f64.to_bits()));
        let s = FlowControlSettings {
            max_requests: Some(1),
            ..settings()
        };
        let fc = ctl(s, &sat);
        let fc2 = fc.clone();
        let waiting = tokio::spawn(async move { fc2.enqueue_and_wait(&req("a", 0, 10)).await });
        wait_queued(&fc, 1).await;
        let e = fc.enqueue_and_wait(&req("b", 0, 10)).await.unwrap_err();
        assert_eq!(e.http_status(), 429);
        assert_eq!(
            e.body(),
            "inference error: ResourceExhausted - request rejected pre-queue: queue at capacity"
        );
        assert_eq!(
            e.headers,
            vec![(
                "x-llm-d-request-dropped-reason".to_string(),
                "rejected-saturated".to_string()
            )]
        );
        // Byte caps per band too.
        let s = FlowControlSettings {
            bands: vec![PriorityBand {
                priority: 0,
                max_bytes: Some(5),
                ..Default::default()
            }],
            ..settings()
        };
        let fc_b = ctl(s, &sat);
        assert!(fc_b.enqueue_and_wait(&req("a", 0, 6)).await.is_err());
        sat.store(0f64.to_bits(), Ordering::Relaxed);
        fc.notify();
        fc.shared.dispatch_cycle();
        waiting.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn ttl_expiry_gives_503_and_frees_the_slot() {
        tokio::time::pause();
        let sat = Arc::new(A::new(1f64.to_bits()));
        let s = FlowControlSettings {
            default_request_ttl: Some(Duration::from_secs(2)),
            ..settings()
        };
        let fc = ctl(s, &sat);
        let e = fc.enqueue_and_wait(&req("a", 0, 10)).await.unwrap_err();
        assert_eq!(e.http_status(), 503);
        assert_eq!(
            e.body(),
            "inference error: ServiceUnavailable - request timed out in queue: request evicted from queue: request TTL expired"
        );
        assert_eq!(e.headers[0].1, "rejected-ttl-expired");
        assert_eq!(fc.queued(), 0);
        assert_eq!(fc.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn bands_high_to_low_and_fcfs_within() {
        let sat = Arc::new(A::new(1f64.to_bits()));
        let fc = ctl(settings(), &sat);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, (flow, prio)) in [("a", 0), ("a", 0), ("b", 5), ("c", -1), ("b", 5)]
            .into_iter()
            .enumerate()
        {
            let fc2 = fc.clone();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                fc2.enqueue_and_wait(&req(flow, prio, 1)).await.unwrap();
                order.lock().unwrap().push(i);
            }));
            wait_queued(&fc, i as u64 + 1).await;
        }
        sat.store(0f64.to_bits(), Ordering::Relaxed);
        for n in (0..5u64).rev() {
            assert!(fc.shared.dispatch_cycle());
            wait_queued(&fc, n).await;
            while order.lock().unwrap().len() as u64 != 5 - n {
                tokio::task::yield_now().await;
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![2, 4, 0, 1, 3]);
    }

    #[tokio::test]
    async fn round_robin_alternates_flows() {
        let sat = Arc::new(A::new(1f64.to_bits()));
        let s = FlowControlSettings {
            default_band: PriorityBand {
                round_robin_fairness: true,
                ..Default::default()
            },
            ..settings()
        };
        let fc = ctl(s, &sat);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, flow) in ["a", "a", "a", "b", "b"].into_iter().enumerate() {
            let fc2 = fc.clone();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                fc2.enqueue_and_wait(&req(flow, 0, 1)).await.unwrap();
                order.lock().unwrap().push(flow);
            }));
            wait_queued(&fc, i as u64 + 1).await;
        }
        sat.store(0f64.to_bits(), Ordering::Relaxed);
        for n in (0..5u64).rev() {
            assert!(fc.shared.dispatch_cycle());
            while order.lock().unwrap().len() as u64 != 5 - n {
                tokio::task::yield_now().await;
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec!["a", "b", "a", "b", "a"]);
    }

    #[tokio::test]
    async fn saturated_pool_blocks_and_cancelled_waiters_leave_the_queue() {
        let sat = Arc::new(A::new(1f64.to_bits()));
        let fc = ctl(settings(), &sat);
        let fc2 = fc.clone();
        let t = tokio::spawn(async move { fc2.enqueue_and_wait(&req("a", 0, 7)).await });
        wait_queued(&fc, 1).await;
        assert!(!fc.shared.dispatch_cycle());
        assert_eq!(fc.queued_bytes(), 7);
        t.abort();
        let _ = t.await;
        assert_eq!(fc.queued(), 0);
        assert_eq!(fc.queued_bytes(), 0);
    }

    #[tokio::test]
    async fn the_dispatcher_releases_on_notify() {
        let sat = Arc::new(A::new(1f64.to_bits()));
        let fc = ctl(settings(), &sat);
        let fc2 = fc.clone();
        let t = tokio::spawn(async move { fc2.enqueue_and_wait(&req("a", 0, 7)).await });
        wait_queued(&fc, 1).await;
        sat.store(0f64.to_bits(), Ordering::Relaxed);
        fc.notify();
        t.await.unwrap().unwrap();
        fc.close();
    }
}
