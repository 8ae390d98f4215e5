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
//! * Within a band, the band's fairness policy (`fairnessPolicyRef`, a plugin) picks the
//!   flow and the band's ordering policy (`orderingPolicyRef`) orders each flow's queue; the
//!   policies and their per-band state are described in [`llmsched_core::flowcontrol`]. The
//!   controller reports every arrival, dispatch and completion to the band's fairness state,
//!   including requests that pass at once because nothing waits, so a policy that accounts
//!   service (`token-fair-share-fairness-policy`) sees all of it. A dispatched request
//!   carries a [`FlowTicket`]; completing it hands the response's usage back to the policy
//!   (dropping it unused means the request never reached a model server).
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
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use llmsched_core::config::{FlowControlSettings, PriorityBand};
use llmsched_core::error::{InferenceError, REQUEST_DROPPED_REASON_HEADER};
use llmsched_core::flowcontrol::{BandQueues, Charge, FairnessState, QueuedRequest};
use llmsched_core::request::Usage;
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

/// What a queued request is, for ordering, fairness and metrics.
#[derive(Debug, Clone)]
pub struct FlowRequest {
    /// Fairness id (flow key).
    pub fairness_id: String,
    /// Objective priority (band).
    pub priority: i32,
    /// Body size in bytes.
    pub bytes: u64,
    /// Prompt tokens as estimated before dispatch.
    pub prompt_tokens: u64,
    /// `max_tokens` of the request, if given.
    pub max_tokens: Option<u64>,
    /// Requested model, as a metrics label value (already bounded by the director).
    pub model_name: String,
    /// Target model, as a metrics label value (already bounded by the director).
    pub target_model_name: String,
}

/// A request flow control let through. [`FlowTicket::complete`] reports how it ended to the
/// band's fairness policy; dropping the ticket without completing it says the request never
/// reached a model server (the policy undoes its charge). Either way the dispatcher is woken,
/// since capacity may have freed up.
pub struct FlowTicket {
    shared: Arc<Shared>,
    priority: i32,
    flow: String,
    charge: Charge,
    done: bool,
}

impl std::fmt::Debug for FlowTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowTicket")
            .field("priority", &self.priority)
            .field("flow", &self.flow)
            .field("charge", &self.charge)
            .finish()
    }
}

impl FlowTicket {
    /// What the band's fairness policy charged at dispatch.
    pub fn charge(&self) -> Charge {
        self.charge
    }

    /// The request's response ended; `usage` as the model server reported it.
    pub fn complete(mut self, usage: Option<&Usage>) {
        self.done = true;
        self.shared
            .settle(self.priority, &self.flow, self.charge, Some(usage));
    }
}

impl Drop for FlowTicket {
    fn drop(&mut self) {
        if !self.done {
            self.shared
                .settle(self.priority, &self.flow, self.charge, None);
        }
    }
}

/// What the controller keeps of a waiting request besides its [`QueuedRequest`].
struct Waiter {
    tx: oneshot::Sender<FlowTicket>,
    labels: FlowQueueLabels,
}

struct Band {
    cfg: PriorityBand,
    max_bytes: u64,
    queues: BandQueues,
    fairness: Box<dyn FairnessState>,
    waiters: HashMap<u64, Waiter>,
}

impl Band {
    fn new(cfg: PriorityBand) -> Self {
        let max_bytes = cfg
            .max_bytes
            .filter(|b| *b > 0)
            .unwrap_or(DEFAULT_BAND_MAX_BYTES);
        let queues = BandQueues::new(cfg.priority, cfg.ordering.policy.clone());
        let fairness = cfg.fairness.policy.new_band_state();
        Self {
            cfg,
            max_bytes,
            queues,
            fairness,
            waiters: HashMap::new(),
        }
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

    fn band<'s>(&self, st: &'s mut State, priority: i32) -> &'s mut Band {
        st.bands
            .entry(Reverse(priority))
            .or_insert_with(|| Band::new(self.band_cfg(priority)))
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
        let band = self.band(st, priority);
        if band.queues.bytes() + bytes > band.max_bytes {
            return false;
        }
        if let Some(max) = band.cfg.max_requests.filter(|m| *m > 0)
            && band.queues.len() + 1 > max
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
    fn remove(
        &self,
        priority: i32,
        flow: &str,
        id: u64,
    ) -> Option<(QueuedRequest, FlowQueueLabels)> {
        let mut st = self.lock();
        let band = st.bands.get_mut(&Reverse(priority))?;
        let item = band.queues.remove(flow, id)?;
        let waiter = band.waiters.remove(&id);
        st.len -= 1;
        st.bytes -= item.bytes;
        drop(st);
        let labels = waiter.map(|w| w.labels)?;
        self.gauges(&labels, -1, -(item.bytes as i64));
        Some((item, labels))
    }

    /// Reports the end of a dispatched request to its band's fairness state (`usage`:
    /// `Some` when it was served, `None` when it never reached a model server) and wakes the
    /// dispatcher.
    fn settle(&self, priority: i32, flow: &str, charge: Charge, usage: Option<Option<&Usage>>) {
        {
            let mut st = self.lock();
            if let Some(band) = st.bands.get_mut(&Reverse(priority)) {
                match usage {
                    Some(u) => band.fairness.on_completion(flow, charge, u),
                    None => band.fairness.on_not_served(flow, charge),
                }
            }
        }
        self.wake.notify_one();
    }

    /// One dispatch cycle; true when an item was released.
    fn dispatch_cycle(self: &Arc<Self>) -> bool {
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
        let released = {
            let mut st = self.lock();
            let mut released = None;
            for band in st.bands.values_mut() {
                let Some(flow) = band.fairness.pick(&band.queues).map(str::to_owned) else {
                    continue;
                };
                let Some(item) = band.queues.pop(&flow) else {
                    continue;
                };
                let charge = band.fairness.on_dispatch(&band.queues, &flow, &item);
                let waiter = band.waiters.remove(&item.seq);
                released = Some((band.cfg.priority, flow, item, charge, waiter));
                break;
            }
            let Some(r) = released else {
                return false;
            };
            st.len -= 1;
            st.bytes -= r.2.bytes;
            r
        };
        let (priority, flow, item, charge, waiter) = released;
        let ticket = FlowTicket {
            shared: self.clone(),
            priority,
            flow,
            charge,
            done: false,
        };
        let Some(waiter) = waiter else {
            // Not reachable: every queued item has its waiter. The ticket's drop undoes the
            // charge.
            return true;
        };
        self.gauges(&waiter.labels, -1, -(item.bytes as i64));
        self.outcome(&waiter.labels, "Dispatched", item.enqueued.elapsed());
        // The waiter may have given up at this very moment; then the release is lost, which
        // is what the reference does too (the item is finalized either way), and the ticket
        // comes back and is dropped, undoing the charge.
        let _ = waiter.tx.send(ticket);
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
            && let Some((item, labels)) = self.shared.remove(self.priority, &self.flow, self.id)
        {
            self.shared
                .outcome(&labels, "EvictedContextCancelled", item.enqueued.elapsed());
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

    /// Runs one dispatch cycle now (tests drive releases one at a time with it).
    #[cfg(test)]
    pub(crate) fn dispatch_once(&self) -> bool {
        self.shared.dispatch_cycle()
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

    /// Enqueues the request and waits until it is dispatched, rejected or expired. On
    /// dispatch, the returned ticket must follow the request to its end (see [`FlowTicket`]).
    ///
    /// Must run inside a tokio runtime (the dispatcher is a background task started on the
    /// first call). Dropping the future removes the request from its queue.
    pub async fn enqueue_and_wait(&self, req: &FlowRequest) -> Result<FlowTicket, InferenceError> {
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
        let item = QueuedRequest {
            seq: id,
            enqueued: now,
            deadline: ttl.map(|t| now + t),
            bytes: req.bytes,
            prompt_tokens: req.prompt_tokens,
            max_tokens: req.max_tokens,
        };
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
                let band = shared.band(&mut st, req.priority);
                band.fairness
                    .on_arrival(&band.queues, &req.fairness_id, false);
                let charge = band
                    .fairness
                    .on_dispatch(&band.queues, &req.fairness_id, &item);
                drop(st);
                shared.outcome(&labels, "Dispatched", now.elapsed());
                return Ok(FlowTicket {
                    shared: self.shared.clone(),
                    priority: req.priority,
                    flow: req.fairness_id.clone(),
                    charge,
                    done: false,
                });
            }
            let band = shared.band(&mut st, req.priority);
            let backlogged = band.queues.flow(&req.fairness_id).is_some();
            band.fairness
                .on_arrival(&band.queues, &req.fairness_id, backlogged);
            band.queues.push(&req.fairness_id, item);
            band.waiters.insert(
                id,
                Waiter {
                    tx,
                    labels: labels.clone(),
                },
            );
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
        self.shared.dispatch_cycle();
        let mut rx = rx;
        let outcome = match ttl {
            Some(t) => tokio::time::timeout_at((now + t).into(), &mut rx)
                .await
                .ok(),
            None => Some((&mut rx).await),
        };
        match outcome {
            Some(Ok(ticket)) => {
                guard.armed = false;
                Ok(ticket)
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
                    Some((_, labels)) => {
                        shared.outcome(&labels, "EvictedTTL", now.elapsed());
                        Err(InferenceError::service_unavailable(MSG_TTL_EXPIRED)
                            .with_header(REQUEST_DROPPED_REASON_HEADER, REASON_TTL_EXPIRED))
                    }
                    None => match rx.try_recv() {
                        // Released concurrently with the expiry: it was dispatched.
                        Ok(ticket) => Ok(ticket),
                        Err(_) => Err(InferenceError::service_unavailable(MSG_TTL_EXPIRED)
                            .with_header(REQUEST_DROPPED_REASON_HEADER, REASON_TTL_EXPIRED)),
                    },
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
    use llmsched_core::config::PolicyRef;
    use llmsched_core::flowcontrol::{FairnessPolicy, OrderingPolicy};
    use llmsched_core::registry::{FactoryInput, PluginHandle};
    use std::sync::atomic::AtomicU64 as A;

    /// A policy plugin from the real registry.
    fn policy<P: ?Sized>(
        type_name: &str,
        parameters: Option<serde_json::Value>,
        cast: impl Fn(Arc<dyn llmsched_core::Plugin>) -> Option<Arc<P>>,
    ) -> PolicyRef<P> {
        let factory = llmsched_plugins::default_registry()
            .factory(type_name)
            .unwrap();
        let plugin = factory(FactoryInput {
            name: type_name,
            parameters: parameters.as_ref(),
            handle: &PluginHandle::default(),
        })
        .unwrap();
        let p = cast(plugin.clone()).unwrap();
        PolicyRef::new(&plugin, parameters, p)
    }

    fn fairness(type_name: &str) -> PolicyRef<dyn FairnessPolicy> {
        policy(type_name, None, |p| p.as_fairness_policy())
    }

    fn ordering(type_name: &str) -> PolicyRef<dyn OrderingPolicy> {
        policy(type_name, None, |p| p.as_ordering_policy())
    }

    /// A band with the default policies (global strict, FCFS).
    fn band(priority: i32) -> PriorityBand {
        PriorityBand::new(
            priority,
            fairness("global-strict-fairness-policy"),
            ordering("fcfs-ordering-policy"),
        )
    }

    fn settings() -> FlowControlSettings {
        FlowControlSettings {
            max_bytes: None,
            max_requests: None,
            default_request_ttl: None,
            bands: Vec::new(),
            default_band: band(0),
        }
    }

    fn probe(v: Arc<A>) -> SaturationProbe {
        Arc::new(move || f64::from_bits(v.load(Ordering::Relaxed)))
    }

    fn req(flow: &str, priority: i32, bytes: u64) -> FlowRequest {
        FlowRequest {
            fairness_id: flow.into(),
            priority,
            bytes,
            prompt_tokens: 100,
            max_tokens: None,
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
                max_bytes: Some(5),
                ..band(0)
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
                // Kept until the end: a completed ticket wakes the dispatcher, which would
                // release the next request behind the test's back.
                let ticket = fc2.enqueue_and_wait(&req(flow, prio, 1)).await.unwrap();
                order.lock().unwrap().push(i);
                ticket
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
            default_band: PriorityBand::new(
                0,
                fairness("round-robin-fairness-policy"),
                ordering("fcfs-ordering-policy"),
            ),
            ..settings()
        };
        let fc = ctl(s, &sat);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, flow) in ["a", "a", "a", "b", "b"].into_iter().enumerate() {
            let fc2 = fc.clone();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let ticket = fc2.enqueue_and_wait(&req(flow, 0, 1)).await.unwrap();
                order.lock().unwrap().push(flow);
                ticket
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

    fn token_fair_share_settings() -> FlowControlSettings {
        FlowControlSettings {
            default_band: PriorityBand::new(
                0,
                fairness("token-fair-share-fairness-policy"),
                ordering("fcfs-ordering-policy"),
            ),
            ..settings()
        }
    }

    type Waiting = Vec<(&'static str, tokio::task::JoinHandle<FlowTicket>)>;

    /// Queues a request of `flow` (the pool must be saturated) and waits until it is queued.
    async fn queue(fc: &FlowController, waiting: &mut Waiting, flow: &'static str) {
        let before = fc.queued();
        let fc2 = fc.clone();
        waiting.push((
            flow,
            tokio::spawn(async move { fc2.enqueue_and_wait(&req(flow, 0, 1)).await.unwrap() }),
        ));
        wait_queued(fc, before + 1).await;
    }

    /// Releases one request (the pool must not be saturated) and returns its flow and ticket.
    async fn release(fc: &FlowController, waiting: &mut Waiting) -> (&'static str, FlowTicket) {
        assert!(fc.dispatch_once());
        loop {
            if let Some(i) = waiting.iter().position(|(_, t)| t.is_finished()) {
                let (flow, t) = waiting.remove(i);
                return (flow, t.await.unwrap());
            }
            tokio::task::yield_now().await;
        }
    }

    fn usage(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            cached_tokens: 0,
        }
    }

    #[tokio::test]
    async fn token_fair_share_interleaves_a_light_flow_with_a_heavy_backlog() {
        let sat = Arc::new(A::new(1f64.to_bits()));
        let fc = ctl(token_fair_share_settings(), &sat);
        // The test releases requests itself.
        fc.close();
        let mut waiting = Waiting::new();
        for _ in 0..6 {
            queue(&fc, &mut waiting, "heavy").await;
        }
        for _ in 0..2 {
            queue(&fc, &mut waiting, "light").await;
        }
        sat.store(0f64.to_bits(), Ordering::Relaxed);
        let mut order = Vec::new();
        let mut tickets = Vec::new();
        for _ in 0..8 {
            let (flow, ticket) = release(&fc, &mut waiting).await;
            // Every request is charged 100 prompt + 256 default output tokens.
            assert_eq!(ticket.charge(), Charge(356.0));
            order.push(flow);
            tickets.push(ticket);
        }
        // Global strict FCFS would serve the six heavy requests first.
        assert_eq!(
            order,
            [
                "heavy", "light", "heavy", "light", "heavy", "heavy", "heavy", "heavy"
            ]
        );
    }

    #[tokio::test]
    async fn tickets_report_usage_and_unserved_requests_are_refunded() {
        let sat = Arc::new(A::new(1f64.to_bits()));
        let fc = ctl(token_fair_share_settings(), &sat);
        fc.close();
        let mut waiting = Waiting::new();
        for flow in ["a", "a", "b"] {
            queue(&fc, &mut waiting, flow).await;
        }
        sat.store(0f64.to_bits(), Ordering::Relaxed);
        let (flow, a1) = release(&fc, &mut waiting).await;
        assert_eq!(flow, "a");
        // a1 never reached a model server: its charge is undone, so "a" is level with "b"
        // again and its older head goes first (charged, "a" would wait behind "b").
        drop(a1);
        let (flow, a2) = release(&fc, &mut waiting).await;
        assert_eq!(flow, "a");
        // a2 produced 2,000 output tokens: "a" now has 2,100 tokens of service.
        a2.complete(Some(&usage(100, 2000)));
        sat.store(1f64.to_bits(), Ordering::Relaxed);
        queue(&fc, &mut waiting, "a").await;
        queue(&fc, &mut waiting, "b").await;
        sat.store(0f64.to_bits(), Ordering::Relaxed);
        let (flow, b1) = release(&fc, &mut waiting).await;
        assert_eq!(flow, "b");
        b1.complete(Some(&usage(100, 10)));
        // "b" (110 tokens) goes before "a" (2,100) although a's request is older; without
        // the usage both would stand at 356 and the older "a" would go first.
        let (flow, b2) = release(&fc, &mut waiting).await;
        assert_eq!(flow, "b");
        // b's estimate now uses its reported output: 100 + 10.
        assert_eq!(b2.charge(), Charge(110.0));
        let (flow, _a3) = release(&fc, &mut waiting).await;
        assert_eq!(flow, "a");
        assert!(waiting.is_empty());
    }
}
