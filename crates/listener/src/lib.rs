//! # llmsched-listener
//!
//! The EPP's listeners (proxy, ext_proc, health, metrics) with bounds a hostile or broken
//! client cannot get around:
//!
//! * **connection limit** ([`Limits::max_connections`]) per listener. When a new connection
//!   arrives at the limit, the connection idle the longest (no request in flight) is closed
//!   to make room; only when every connection is busy is the new one refused (closed at
//!   once). Running out of file descriptors (`accept` failing) also closes an idle
//!   connection, of another listener of the process when this one has none (descriptors
//!   are shared: idle proxy clients must not make the health port unreachable). So idle
//!   connections can never starve real requests;
//! * **header timeout** ([`Limits::header_timeout`]): a connection must start its first
//!   request within this long (a client that connects and sends nothing, or stalls in its
//!   TLS handshake, HTTP/2 preface or request head, is closed);
//! * **idle timeout** ([`Limits::idle_timeout`]): a connection with no request in flight
//!   for this long is closed (keep-alive idle). A request in flight — however long, e.g. a
//!   20-minute generation streamed back — never counts as idle.
//!
//! Every forced close and refusal is counted and logged (refusals at `warn`, at most every
//! 10 s per listener and reason; timeouts at `debug`). Metrics ([`ListenerMetrics`]):
//!
//! * `llmsched_listener_connections{listener}` — open connections;
//! * `llmsched_listener_connections_accepted_total{listener}`;
//! * `llmsched_listener_connections_closed_total{listener, reason}` — connections closed
//!   by the listener: `header_timeout`, `idle_timeout`, `evicted` (to admit a new one);
//! * `llmsched_listener_connections_rejected_total{listener, reason}` — `limit` (refused:
//!   every connection busy), `accept_error` (e.g. out of file descriptors).
//!
//! How the pieces fit:
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use llmsched_listener::{GuardedStream, Limits, Listener, ListenerMetrics};
//! let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let listener = Listener::new(tcp, "proxy", Limits::default(), ListenerMetrics::default());
//! loop {
//!     let (tcp, _peer, slot) = listener.accept().await;
//!     let conn = slot.handle();
//!     let io = GuardedStream::new(tcp, slot);
//!     // serve `io`; for each request hold `conn.request_started()` until its response ends
//!     // (`GuardedBody` does it for a response body, `InflightLayer` for a tower service).
//!     # drop((io, conn)); break;
//! }
//! # Ok(()) }
//! ```
//!
//! Enforcement lives in [`GuardedStream`]: while its reader waits for bytes, a timer checks
//! the connection's deadline; closing makes reads and writes fail, which ends the
//! connection in whatever protocol stack runs on top (hyper, h2, tonic, TLS).

mod body;
mod stream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures::task::AtomicWaker;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

pub use body::{GuardedBody, InflightLayer, InflightService};
pub use stream::GuardedStream;

/// Bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most (`--max-connections`, 10,000).
    pub max_connections: usize,
    /// A new connection must start a request within this (`--request-header-timeout`,
    /// 30 s); HTTP/1.1 servers also use it as hyper's header read timeout.
    pub header_timeout: Duration,
    /// A connection with no request in flight is closed after this
    /// (`--connection-idle-timeout`, 60 s).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Why the listener closed or refused a connection (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// No request started within the header timeout.
    HeaderTimeout = 1,
    /// No request in flight for the idle timeout.
    IdleTimeout = 2,
    /// Closed (idle) to admit a new connection at the limit or when out of descriptors.
    Evicted = 3,
}

impl CloseReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Evicted => "evicted",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => CloseReason::HeaderTimeout,
            2 => CloseReason::IdleTimeout,
            3 => CloseReason::Evicted,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    listener: &'static str,
    reason: &'static str,
}

/// The listeners' metrics (see the crate documentation). Cheap to clone; [`Default`] gives
/// unregistered ones.
#[derive(Clone, Debug, Default)]
pub struct ListenerMetrics {
    open: Family<ListenerLabel, Gauge>,
    accepted: Family<ListenerLabel, Counter>,
    closed: Family<ReasonLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
}

impl ListenerMetrics {
    /// Registers the metrics into `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "llmsched_listener_connections",
            "Open connections per listener",
            m.open.clone(),
        );
        registry.register(
            "llmsched_listener_connections_accepted",
            "Connections accepted per listener",
            m.accepted.clone(),
        );
        registry.register(
            "llmsched_listener_connections_closed",
            "Connections closed by the listener (header_timeout, idle_timeout, evicted)",
            m.closed.clone(),
        );
        registry.register(
            "llmsched_listener_connections_rejected",
            "Connections refused (limit: every connection busy) or lost (accept_error)",
            m.rejected.clone(),
        );
        m
    }

    /// Open connections of `listener` now.
    pub fn open(&self, listener: &'static str) -> i64 {
        self.open.get_or_create(&ListenerLabel { listener }).get()
    }

    /// Connections of `listener` closed for `reason` so far.
    pub fn closed(&self, listener: &'static str, reason: CloseReason) -> u64 {
        self.closed
            .get_or_create(&ReasonLabels {
                listener,
                reason: reason.as_str(),
            })
            .get()
    }

    /// Connections of `listener` refused at the limit so far.
    pub fn rejected_at_limit(&self, listener: &'static str) -> u64 {
        self.rejected
            .get_or_create(&ReasonLabels {
                listener,
                reason: "limit",
            })
            .get()
    }
}

/// At most one log line per `every`.
#[derive(Debug)]
struct RateLimit {
    last: AtomicU64,
    every_ms: u64,
}

impl RateLimit {
    fn new(every: Duration) -> Self {
        Self {
            last: AtomicU64::new(0),
            every_ms: u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
        }
    }

    fn allow(&self, now_ms: u64) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        (last == 0 || now_ms.saturating_sub(last) >= self.every_ms)
            && self
                .last
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// One connection's state, shared by its stream, its slot and its request guards.
#[derive(Debug)]
pub(crate) struct ConnState {
    id: u64,
    inflight: AtomicU32,
    requests: AtomicU64,
    /// Milliseconds since the listener's origin when the connection last became idle.
    idle_since: AtomicU64,
    close: AtomicU8,
    pub(crate) waker: AtomicWaker,
    shared: Arc<Shared>,
}

impl ConnState {
    /// Asks the connection to close (its stream fails from now on).
    fn request_close(&self, reason: CloseReason) -> bool {
        let won = self
            .close
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if won {
            self.waker.wake();
        }
        won
    }

    pub(crate) fn close_reason(&self) -> Option<CloseReason> {
        CloseReason::from_u8(self.close.load(Ordering::Acquire))
    }

    /// When the connection must be closed if it stays idle: `None` while a request is in
    /// flight.
    pub(crate) fn deadline(&self) -> Option<(Instant, CloseReason)> {
        if self.inflight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = self.shared.instant(self.idle_since.load(Ordering::Acquire));
        let limits = &self.shared.limits;
        Some(if self.requests.load(Ordering::Acquire) == 0 {
            (since + limits.header_timeout, CloseReason::HeaderTimeout)
        } else {
            (since + limits.idle_timeout, CloseReason::IdleTimeout)
        })
    }

    /// The stream decided to close for `reason`: count and log it once.
    pub(crate) fn closing(&self, reason: CloseReason) {
        if self.request_close(reason) || self.close_reason() == Some(reason) {
            self.shared.count_close(reason);
        }
    }

    pub(crate) fn idle_check_interval(&self) -> Duration {
        let l = &self.shared.limits;
        l.idle_timeout
            .min(l.header_timeout)
            .max(Duration::from_millis(10))
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    name: &'static str,
    limits: Limits,
    metrics: ListenerMetrics,
    origin: Instant,
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    limit_log: RateLimit,
    error_log: RateLimit,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    fn instant(&self, ms: u64) -> Instant {
        self.origin + Duration::from_millis(ms.saturating_sub(1))
    }

    fn label(&self) -> ListenerLabel {
        ListenerLabel {
            listener: self.name,
        }
    }

    fn count_close(&self, reason: CloseReason) {
        self.metrics
            .closed
            .get_or_create(&ReasonLabels {
                listener: self.name,
                reason: reason.as_str(),
            })
            .inc();
        tracing::debug!(
            listener = self.name,
            reason = reason.as_str(),
            "closing connection"
        );
    }

    fn count_rejected(&self, reason: &'static str) {
        self.metrics
            .rejected
            .get_or_create(&ReasonLabels {
                listener: self.name,
                reason,
            })
            .inc();
    }

    /// Closes the connection idle the longest, if it has been idle for `min_idle` at least;
    /// false when there is none.
    fn evict_idle(&self, min_idle: Duration) -> bool {
        let newest = self
            .now_ms()
            .saturating_sub(u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX));
        let victim = {
            let conns = self.conns.lock();
            conns
                .values()
                .filter(|c| c.close.load(Ordering::Acquire) == 0)
                .filter(|c| c.inflight.load(Ordering::Acquire) == 0)
                .filter(|c| c.idle_since.load(Ordering::Acquire) <= newest)
                .min_by_key(|c| c.idle_since.load(Ordering::Acquire))
                .cloned()
        };
        match victim {
            Some(c) => {
                if c.request_close(CloseReason::Evicted) {
                    self.count_close(CloseReason::Evicted);
                }
                true
            }
            None => false,
        }
    }
}

/// Every live listener of the process: file descriptors are shared by all of them, so a
/// listener that runs out of them may close an idle connection of another (a flood of idle
/// connections on the proxy must not make the health or metrics port unreachable).
static LISTENERS: Mutex<Vec<std::sync::Weak<Shared>>> = Mutex::new(Vec::new());

fn register_listener(shared: &Arc<Shared>) {
    let mut all = LISTENERS.lock();
    all.retain(|w| w.strong_count() > 0);
    all.push(Arc::downgrade(shared));
}

/// How long a connection must have been idle before running out of file descriptors closes
/// it. Linux's `accept` fails for want of a descriptor even when no client is waiting, so
/// an accept error is no proof that someone needs the room; this keeps a client that has
/// just connected (and is about to send its request) from being taken for an idle one.
const FD_EVICTION_MIN_IDLE: Duration = Duration::from_secs(1);

/// Closes an idle connection (idle for [`FD_EVICTION_MIN_IDLE`] at least) of `own` or, when
/// it has none, of another listener of the process. False when there is none.
fn evict_idle_anywhere(own: &Shared) -> bool {
    if own.evict_idle(FD_EVICTION_MIN_IDLE) {
        return true;
    }
    let others: Vec<Arc<Shared>> = LISTENERS
        .lock()
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .collect();
    for other in others {
        if !std::ptr::eq(Arc::as_ptr(&other), own) && other.evict_idle(FD_EVICTION_MIN_IDLE) {
            return true;
        }
    }
    false
}

/// Out of file descriptors elsewhere in the process (an outgoing connection failed with
/// `EMFILE`): closes the connection idle the longest (idle for a second at least) of any
/// listener, so that the caller can try again. False when there is none to close.
pub fn free_descriptor() -> bool {
    let all: Vec<Arc<Shared>> = LISTENERS
        .lock()
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .collect();
    all.iter().any(|l| l.evict_idle(FD_EVICTION_MIN_IDLE))
}

/// A TCP listener with the limits of this crate.
#[derive(Debug)]
pub struct Listener {
    tcp: TcpListener,
    shared: Arc<Shared>,
}

impl Listener {
    /// Wraps `tcp`; `name` is the `listener` label (`proxy`, `ext_proc`, `health`,
    /// `metrics`).
    pub fn new(
        tcp: TcpListener,
        name: &'static str,
        limits: Limits,
        metrics: ListenerMetrics,
    ) -> Self {
        let limits = Limits {
            max_connections: limits.max_connections.max(1),
            ..limits
        };
        // The gauge exists (at 0) from the start.
        let _ = metrics
            .open
            .get_or_create(&ListenerLabel { listener: name });
        let shared = Arc::new(Shared {
            name,
            limits,
            metrics,
            origin: Instant::now(),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            limit_log: RateLimit::new(Duration::from_secs(10)),
            error_log: RateLimit::new(Duration::from_secs(10)),
        });
        register_listener(&shared);
        Self { tcp, shared }
    }

    /// The listener's name.
    pub fn name(&self) -> &'static str {
        self.shared.name
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Open connections now.
    pub fn open_connections(&self) -> usize {
        self.shared.conns.lock().len()
    }

    /// The next connection, within the limit (TCP_NODELAY set). Never fails: accept errors
    /// (out of file descriptors …) are counted, logged at most every 10 s, answered by
    /// closing an idle connection, and retried after a short pause.
    pub async fn accept(&self) -> (TcpStream, SocketAddr, Slot) {
        let s = &self.shared;
        loop {
            let (stream, peer) = match self.tcp.accept().await {
                Ok(a) => a,
                Err(e) => {
                    s.count_rejected("accept_error");
                    let evicted = evict_idle_anywhere(s);
                    if s.error_log.allow(s.now_ms()) {
                        tracing::warn!(
                            listener = s.name,
                            error = %e,
                            open = self.open_connections(),
                            closed_an_idle_connection = evicted,
                            "accept failed (out of file descriptors?); retrying (logged at most every 10 s, counted in llmsched_listener_connections_rejected_total{{reason=\"accept_error\"}})"
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let open = s.conns.lock().len();
            // A client is waiting here: the longest-idle connection makes room, however
            // recently it connected.
            if open >= s.limits.max_connections && !s.evict_idle(Duration::ZERO) {
                s.count_rejected("limit");
                if s.limit_log.allow(s.now_ms()) {
                    tracing::warn!(
                        listener = s.name,
                        %peer,
                        max_connections = s.limits.max_connections,
                        "connection limit reached and every connection is busy: refusing new connections (logged at most every 10 s, counted in llmsched_listener_connections_rejected_total{{reason=\"limit\"}}; raise --max-connections)"
                    );
                }
                drop(stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            return (stream, peer, self.register());
        }
    }

    fn register(&self) -> Slot {
        let s = &self.shared;
        let state = Arc::new(ConnState {
            id: s.next_id.fetch_add(1, Ordering::Relaxed),
            inflight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            idle_since: AtomicU64::new(s.now_ms()),
            close: AtomicU8::new(0),
            waker: AtomicWaker::new(),
            shared: s.clone(),
        });
        s.conns.lock().insert(state.id, state.clone());
        s.metrics.open.get_or_create(&s.label()).inc();
        s.metrics.accepted.get_or_create(&s.label()).inc();
        Slot { state }
    }
}

/// A connection's place under the limit; released when dropped (with the stream that owns
/// it).
#[derive(Debug)]
pub struct Slot {
    state: Arc<ConnState>,
}

impl Slot {
    /// A handle for request accounting (cheap to clone).
    pub fn handle(&self) -> ConnHandle {
        ConnHandle(self.state.clone())
    }

    pub(crate) fn state(&self) -> &Arc<ConnState> {
        &self.state
    }

    /// The deadline for the connection's first request (accept time + header timeout):
    /// bound work done before a [`GuardedStream`] exists, such as a TLS handshake.
    pub fn header_deadline(&self) -> Instant {
        self.state.deadline().map_or_else(Instant::now, |(d, _)| d)
    }

    /// Reports that the connection is being closed for `reason` by its owner (e.g. its TLS
    /// handshake ran past [`Self::header_deadline`]): counted and logged as the listener's
    /// own closes are.
    pub fn closed_for(&self, reason: CloseReason) {
        self.state.closing(reason);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let s = &self.state.shared;
        s.conns.lock().remove(&self.state.id);
        s.metrics.open.get_or_create(&s.label()).dec();
    }
}

/// Request accounting of a connection: requests in flight keep it from being idle.
#[derive(Debug, Clone)]
pub struct ConnHandle(Arc<ConnState>);

impl ConnHandle {
    /// A request started on this connection; it is in flight until the guard drops.
    pub fn request_started(&self) -> RequestGuard {
        self.0.inflight.fetch_add(1, Ordering::AcqRel);
        self.0.requests.fetch_add(1, Ordering::AcqRel);
        RequestGuard(self.0.clone())
    }

    /// Requests in flight now.
    pub fn inflight(&self) -> u32 {
        self.0.inflight.load(Ordering::Acquire)
    }
}

/// A request in flight on a connection (see [`ConnHandle::request_started`]).
#[derive(Debug)]
pub struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The stream's timer re-reads the deadline when it fires (at most one check
            // interval from now), so no wake-up is needed here.
            self.0
                .idle_since
                .store(self.0.shared.now_ms(), Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests;
