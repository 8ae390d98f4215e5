//! The sync engine: the local collector (drains this replica's deltas, batches and fans them
//! out), the per-peer links (one push stream each), the receiver (validates and applies the
//! peers' batches, sums their gauges) and snapshots (served, pulled at start and after loss).

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::uri::PathAndQuery;
use llmsched_core::endpoint::{Endpoint, EndpointId, EndpointSource};
use llmsched_core::replica::{DeltaOp, LocalDelta, RemoteDelta, ReplicatedState};
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::metrics::{HaMetrics, PeerState};
use crate::proto::{
    self, Delta, EndpointLoad, Gauge, HelloRequest, HelloResponse, Origin, PreEncodedCodec,
    PushSummary, SnapshotRequest, StateDeltas, SyncBatch,
};
use crate::tls::dial;
use crate::{HaConfig, NamedState, StateSource};

/// Bounds on what a peer may send in one batch (beyond the 4 MiB message cap).
pub(crate) mod limits {
    /// Endpoint names per batch.
    pub const MAX_ENDPOINTS: usize = 4096;
    /// Bytes per endpoint name, state kind or name, replica id.
    pub const MAX_NAME: usize = 253;
    /// States per batch.
    pub const MAX_STATES: usize = 64;
    /// Deltas per state per batch.
    pub const MAX_DELTAS: usize = 65_536;
    /// Keys per delta.
    pub const MAX_KEYS_PER_DELTA: usize = 65_536;
    /// Gauge entries per state (or loads) per batch.
    pub const MAX_GAUGES: usize = 65_536;
    /// Largest message accepted.
    pub const MAX_MESSAGE: usize = 4 << 20;
}

/// Deltas drained from one state per tick (the rest waits for the next tick).
const MAX_DELTAS_PER_TICK: usize = 8192;
/// Batches queued per peer (besides the byte cap).
const PEER_QUEUE_MESSAGES: usize = 1024;
/// A repeated insert (same endpoint, same blocks) is re-sent at most this often.
const REFRESH_WINDOW: Duration = Duration::from_secs(1);
/// Dedupe memory bound.
const DEDUPE_MAX: usize = 65_536;
/// Keys per snapshot chunk.
const SNAPSHOT_CHUNK_KEYS: usize = 65_536;
/// Snapshots served at once.
const SNAPSHOT_CONCURRENCY: usize = 2;
/// The answer of a replica asked for a snapshot while it bootstraps itself.
const BOOTSTRAPPING: &str = "this replica is bootstrapping itself";
/// Minimum time between two loss-triggered snapshot pulls from the same replica.
const RESYNC_MIN_INTERVAL: Duration = Duration::from_secs(10);

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A peer address's link, as the collector sees it.
#[derive(Debug, Default)]
pub(crate) struct Link {
    /// The push stream's queue, while connected.
    tx: Mutex<Option<mpsc::Sender<Bytes>>>,
    /// Bytes queued and not yet handed to the transport.
    queued: Arc<AtomicUsize>,
    /// The replica behind the address, once it said hello.
    replica_id: Mutex<Option<String>>,
    /// The address is this replica itself.
    is_self: AtomicBool,
    connected: AtomicBool,
    /// The current outage has been logged at warn level.
    outage_logged: AtomicBool,
    cancel: CancellationToken,
}

/// What this replica knows of a peer replica that pushes to it.
#[derive(Debug)]
struct Remote {
    incarnation: u64,
    last_seq: Option<u64>,
    /// Open push streams from it.
    streams: usize,
    last_heard: Instant,
    /// In-flight (requests, tokens) per endpoint name.
    loads: HashMap<String, (u64, u64)>,
    /// Gauge values per (state kind, state name), per endpoint name.
    gauges: HashMap<(String, String), HashMap<String, u64>>,
    last_resync: Option<Instant>,
    /// Where its sync server is (source address of its stream + its advertised port).
    addr: Option<String>,
}

impl Remote {
    fn new(incarnation: u64) -> Self {
        Self {
            incarnation,
            last_seq: None,
            streams: 0,
            last_heard: Instant::now(),
            loads: HashMap::new(),
            gauges: HashMap::new(),
            last_resync: None,
            addr: None,
        }
    }
}

/// Shared by every task of the sync.
pub(crate) struct Inner {
    pub(crate) cfg: HaConfig,
    pub(crate) origin: Origin,
    pub(crate) states: Arc<dyn StateSource>,
    pub(crate) endpoints: Arc<dyn EndpointSource>,
    pub(crate) metrics: HaMetrics,
    seq: AtomicU64,
    links: Mutex<HashMap<String, Arc<Link>>>,
    remotes: Mutex<HashMap<String, Remote>>,
    resync_wanted: Mutex<HashSet<String>>,
    snapshot_permits: Arc<Semaphore>,
    /// Most bytes ever queued for one peer.
    pub(crate) queue_high_water: AtomicUsize,
    /// A peer's snapshot was applied at start.
    bootstrapped_warm: AtomicBool,
    /// This replica is pulling its own start-up snapshot (it refuses to serve one meanwhile:
    /// it has nothing worth sending yet).
    bootstrapping: AtomicBool,
    pub(crate) cancel: CancellationToken,
}

impl Inner {
    pub(crate) fn new(
        cfg: HaConfig,
        origin: Origin,
        states: Arc<dyn StateSource>,
        endpoints: Arc<dyn EndpointSource>,
        metrics: HaMetrics,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            cfg,
            origin,
            states,
            endpoints,
            metrics,
            seq: AtomicU64::new(0),
            links: Mutex::new(HashMap::new()),
            remotes: Mutex::new(HashMap::new()),
            resync_wanted: Mutex::new(HashSet::new()),
            snapshot_permits: Arc::new(Semaphore::new(SNAPSHOT_CONCURRENCY)),
            queue_high_water: AtomicUsize::new(0),
            bootstrapped_warm: AtomicBool::new(false),
            bootstrapping: AtomicBool::new(false),
            cancel,
        }
    }

    /// Connected peers.
    pub(crate) fn connected_peers(&self) -> usize {
        self.links
            .lock()
            .values()
            .filter(|l| l.connected.load(Ordering::Relaxed))
            .count()
    }

    /// Peer replicas currently pushing to this one.
    pub(crate) fn remote_replicas(&self) -> usize {
        self.remotes
            .lock()
            .values()
            .filter(|r| r.streams > 0)
            .count()
    }

    fn update_peer_gauges(&self) {
        let links = self.links.lock();
        let configured = links
            .values()
            .filter(|l| !l.is_self.load(Ordering::Relaxed))
            .count();
        let connected = links
            .values()
            .filter(|l| l.connected.load(Ordering::Relaxed))
            .count();
        drop(links);
        self.metrics
            .peers
            .get_or_create(&PeerState {
                state: "configured",
            })
            .set(i64::try_from(configured).unwrap_or(i64::MAX));
        self.metrics
            .peers
            .get_or_create(&PeerState { state: "connected" })
            .set(i64::try_from(connected).unwrap_or(i64::MAX));
    }
}

// ---------------------------------------------------------------------------------------
// Collector: this replica's deltas and gauges → one encoded batch → every peer's queue.
// ---------------------------------------------------------------------------------------

/// The collector's memory between ticks.
pub(crate) struct Collector {
    buf: Vec<LocalDelta>,
    dedupe: HashMap<u64, Instant>,
    last_gauges: Option<GaugeSet>,
    last_heartbeat: Instant,
    dropped_seen: HashMap<(String, &'static str), u64>,
}

/// One state's gauges: (instance name, kind, values by endpoint name).
type StateGauges = (String, &'static str, Vec<(String, u64)>);

/// Gauge figures by endpoint name, comparable between ticks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct GaugeSet {
    loads: Vec<(String, u64, u64)>,
    states: Vec<StateGauges>,
}

impl Collector {
    pub(crate) fn new() -> Self {
        Self {
            buf: Vec::new(),
            dedupe: HashMap::new(),
            last_gauges: None,
            last_heartbeat: Instant::now(),
            dropped_seen: HashMap::new(),
        }
    }
}

fn dedupe_key(state: &str, d: &LocalDelta) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    state.hash(&mut h);
    d.endpoint.hash(&mut h);
    d.keys.len().hash(&mut h);
    d.keys.first().hash(&mut h);
    d.keys.last().hash(&mut h);
    h.finish()
}

/// Builds the names table of a batch on demand.
struct Names<'a> {
    by_id: HashMap<EndpointId, &'a Arc<Endpoint>>,
    index: HashMap<EndpointId, u32>,
    names: Vec<String>,
}

impl<'a> Names<'a> {
    fn new(set: &'a llmsched_core::EndpointSet) -> Self {
        Self {
            by_id: set.endpoints.iter().map(|e| (e.id(), e)).collect(),
            index: HashMap::new(),
            names: Vec::new(),
        }
    }

    fn idx(&mut self, id: EndpointId) -> Option<u32> {
        if let Some(&i) = self.index.get(&id) {
            return Some(i);
        }
        let e = self.by_id.get(&id)?;
        let i = u32::try_from(self.names.len()).ok()?;
        self.names.push(e.name().to_string());
        self.index.insert(id, i);
        Some(i)
    }
}

fn ttl_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl Inner {
    /// One collector tick: returns the encoded batch it fanned out, if any.
    pub(crate) fn collect_once(&self, c: &mut Collector) -> Option<Bytes> {
        let states = self.states.states();
        let set = self.endpoints.snapshot();
        let mut names = Names::new(&set);
        let now = Instant::now();
        let mut out_states = Vec::new();
        let mut oldest: Option<Instant> = None;
        if c.dedupe.len() > DEDUPE_MAX {
            c.dedupe
                .retain(|_, t| now.duration_since(*t) < REFRESH_WINDOW);
            if c.dedupe.len() > DEDUPE_MAX {
                c.dedupe.clear();
            }
        }
        for NamedState { name, state } in &states {
            state.start_recording(self.cfg.buffer_deltas);
            let kind = state.replica_kind();
            let dropped = state.dropped_local();
            let seen = c.dropped_seen.entry((name.clone(), kind)).or_insert(0);
            if dropped > *seen {
                self.metrics.drop_n("local_buffer_full", dropped - *seen);
                *seen = dropped;
            }
            c.buf.clear();
            state.drain_local(&mut c.buf, MAX_DELTAS_PER_TICK);
            let mut deltas = Vec::new();
            for d in c.buf.drain(..) {
                if d.op != DeltaOp::SpeculateEnd {
                    self.metrics.entries("local", d.keys.len() as u64);
                }
                if d.op == DeltaOp::Blocks {
                    let key = dedupe_key(name, &d);
                    match c.dedupe.get(&key) {
                        Some(t) if now.duration_since(*t) < REFRESH_WINDOW => continue,
                        _ => {
                            c.dedupe.insert(key, now);
                        }
                    }
                }
                let Some(ep) = names.idx(d.endpoint) else {
                    self.metrics.drop_n("endpoint_gone", 1);
                    continue;
                };
                oldest = Some(oldest.map_or(d.at, |o| o.min(d.at)));
                deltas.push(Delta {
                    op: d.op.as_u32(),
                    endpoint: ep,
                    ttl_ms: ttl_ms(d.ttl),
                    keys: d.keys,
                });
            }
            if !deltas.is_empty() {
                out_states.push(StateDeltas {
                    kind: kind.to_string(),
                    name: name.clone(),
                    deltas,
                    gauge_values: Vec::new(),
                });
            }
        }

        // Gauges: absolute, sent when they change and with every heartbeat.
        let mut gauges = GaugeSet::default();
        for e in &set.endpoints {
            let (r, t) = (e.inflight_requests(), e.inflight_tokens());
            if r > 0 || t > 0 {
                gauges.loads.push((e.name().to_string(), r, t));
            }
        }
        let mut tmp = Vec::new();
        for NamedState { name, state } in &states {
            tmp.clear();
            state.local_gauges(&mut tmp);
            let mut v: Vec<(String, u64)> = tmp
                .iter()
                .filter(|(_, x)| *x > 0)
                .filter_map(|(id, x)| names.by_id.get(id).map(|e| (e.name().to_string(), *x)))
                .collect();
            v.sort_unstable();
            gauges.states.push((name.clone(), state.replica_kind(), v));
        }
        let heartbeat = now.duration_since(c.last_heartbeat) >= self.cfg.heartbeat;
        let send_gauges = heartbeat || c.last_gauges.as_ref() != Some(&gauges);
        if out_states.is_empty() && !send_gauges {
            return None;
        }
        let mut batch = SyncBatch {
            origin: Some(self.origin.clone()),
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            sent_unix_ms: unix_ms(),
            oldest_unix_ms: 0,
            endpoints: Vec::new(),
            states: out_states,
            gauges: send_gauges,
            loads: Vec::new(),
            last: false,
        };
        if let Some(o) = oldest {
            batch.oldest_unix_ms = batch
                .sent_unix_ms
                .saturating_sub(u64::try_from(now.duration_since(o).as_millis()).unwrap_or(0));
        }
        if send_gauges {
            let mut idx_by_name: HashMap<String, u32> = HashMap::new();
            for e in &set.endpoints {
                if let Some(i) = names.idx(e.id()) {
                    idx_by_name.insert(e.name().to_string(), i);
                }
            }
            for (n, r, t) in &gauges.loads {
                if let Some(&i) = idx_by_name.get(n) {
                    batch.loads.push(EndpointLoad {
                        endpoint: i,
                        requests: *r,
                        tokens: *t,
                    });
                }
            }
            for (name, kind, v) in &gauges.states {
                let values: Vec<Gauge> = v
                    .iter()
                    .filter_map(|(n, x)| {
                        idx_by_name.get(n).map(|&i| Gauge {
                            endpoint: i,
                            value: *x,
                        })
                    })
                    .collect();
                match batch
                    .states
                    .iter_mut()
                    .find(|s| s.name == *name && s.kind == *kind)
                {
                    Some(s) => s.gauge_values = values,
                    None => batch.states.push(StateDeltas {
                        kind: kind.to_string(),
                        name: name.clone(),
                        deltas: Vec::new(),
                        gauge_values: values,
                    }),
                }
            }
            c.last_gauges = Some(gauges);
            c.last_heartbeat = now;
        }
        batch.endpoints = names.names;
        let bytes = Bytes::from(batch.encode_to_vec());
        self.fan_out(&bytes);
        Some(bytes)
    }

    fn fan_out(&self, bytes: &Bytes) {
        let links: Vec<Arc<Link>> = self.links.lock().values().cloned().collect();
        let len = bytes.len();
        for l in links {
            if l.is_self.load(Ordering::Relaxed) {
                continue;
            }
            let tx = l.tx.lock().clone();
            let Some(tx) = tx else {
                self.metrics.drop_n("peer_unavailable", 1);
                continue;
            };
            if l.queued.load(Ordering::Relaxed) + len > self.cfg.max_peer_queue_bytes {
                self.metrics.drop_n("peer_queue_full", 1);
                continue;
            }
            let now = l.queued.fetch_add(len, Ordering::Relaxed) + len;
            self.queue_high_water.fetch_max(now, Ordering::Relaxed);
            if tx.try_send(bytes.clone()).is_err() {
                l.queued.fetch_sub(len, Ordering::Relaxed);
                self.metrics.drop_n("peer_queue_full", 1);
            }
        }
    }
}

/// Runs the collector every `sync_interval` until cancelled.
pub(crate) async fn collect_loop(inner: Arc<Inner>) {
    let mut c = Collector::new();
    let mut iv = tokio::time::interval(inner.cfg.sync_interval.max(Duration::from_millis(1)));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = iv.tick() => {}
        }
        inner.collect_once(&mut c);
    }
}

// ---------------------------------------------------------------------------------------
// Links: one per peer address; dial, hello, push stream; reconnect with backoff.
// ---------------------------------------------------------------------------------------

fn grpc(channel: tonic::transport::Channel) -> tonic::client::Grpc<tonic::transport::Channel> {
    tonic::client::Grpc::new(channel).max_decoding_message_size(limits::MAX_MESSAGE)
}

/// Why a peer could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    #[error(transparent)]
    Dial(#[from] crate::tls::DialError),
    #[error("hello: {0}")]
    Hello(String),
    #[error("{0}")]
    Incompatible(String),
    #[error("this is the replica itself")]
    IsSelf,
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("the peer is starting too (bootstrapping itself)")]
    Starting,
}

impl PeerError {
    fn reason(&self) -> &'static str {
        match self {
            PeerError::Dial(d) => d.reason(),
            PeerError::Hello(_) => "hello",
            PeerError::Incompatible(_) => "incompatible",
            PeerError::IsSelf => "self",
            PeerError::Snapshot(_) => "snapshot",
            PeerError::Starting => "starting",
        }
    }
}

impl Inner {
    /// Dials `addr` and exchanges hellos: the channel and the peer's origin.
    async fn connect(&self, addr: &str) -> Result<(tonic::transport::Channel, Origin), PeerError> {
        let ch = dial(addr, &self.cfg.client_tls, self.cfg.connect_timeout).await?;
        let mut g = grpc(ch.clone());
        let req = HelloRequest {
            origin: Some(self.origin.clone()),
            protocol: proto::PROTOCOL,
            pool: self.cfg.pool.clone(),
        };
        let call = async {
            g.ready()
                .await
                .map_err(|e| PeerError::Hello(e.to_string()))?;
            g.unary::<_, HelloResponse, _>(
                tonic::Request::new(req),
                PathAndQuery::from_static(proto::HELLO_PATH),
                tonic_prost::ProstCodec::<HelloRequest, HelloResponse>::default(),
            )
            .await
            .map_err(|s| PeerError::Hello(format!("{}: {}", s.code(), s.message())))
        };
        let resp = tokio::time::timeout(self.cfg.connect_timeout, call)
            .await
            .map_err(|_| PeerError::Hello("timed out".into()))??
            .into_inner();
        let origin = resp
            .origin
            .ok_or_else(|| PeerError::Hello("no origin in the answer".into()))?;
        if origin.incarnation == self.origin.incarnation {
            return Err(PeerError::IsSelf);
        }
        if resp.protocol != proto::PROTOCOL {
            return Err(PeerError::Incompatible(format!(
                "peer speaks sync protocol {}, this replica {}",
                resp.protocol,
                proto::PROTOCOL
            )));
        }
        if resp.pool != self.cfg.pool {
            return Err(PeerError::Incompatible(format!(
                "peer routes pool '{}', this replica '{}'",
                resp.pool, self.cfg.pool
            )));
        }
        Ok((ch, origin))
    }

    /// Keeps a push stream open to `addr` until the link is cancelled.
    pub(crate) async fn link_loop(self: Arc<Self>, addr: String, link: Arc<Link>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if link.cancel.is_cancelled() {
                return;
            }
            let attempt = async {
                let (ch, origin) = self.connect(&addr).await?;
                Ok::<_, PeerError>((ch, origin))
            };
            let outcome = tokio::select! {
                _ = link.cancel.cancelled() => return,
                o = attempt => o,
            };
            match outcome {
                Err(PeerError::IsSelf) => {
                    link.is_self.store(true, Ordering::Relaxed);
                    self.update_peer_gauges();
                    tracing::info!(peer = %addr, "ha: this peer address is this replica; not syncing with it");
                    link.cancel.cancelled().await;
                    return;
                }
                Err(e) => {
                    self.metrics.error(e.reason());
                    self.log_link_failure(&addr, &link, &e.to_string());
                }
                Ok((ch, origin)) => {
                    backoff = Duration::from_millis(100);
                    *link.replica_id.lock() = Some(origin.replica_id.clone());
                    let (tx, rx) = mpsc::channel::<Bytes>(PEER_QUEUE_MESSAGES);
                    link.queued.store(0, Ordering::Relaxed);
                    *link.tx.lock() = Some(tx);
                    link.connected.store(true, Ordering::Relaxed);
                    self.update_peer_gauges();
                    if link.outage_logged.swap(false, Ordering::Relaxed) {
                        tracing::info!(peer = %addr, replica = %origin.replica_id, "ha: peer reachable again; syncing");
                    } else {
                        tracing::info!(peer = %addr, replica = %origin.replica_id, "ha: syncing with peer");
                    }
                    let queued = link.queued.clone();
                    let metrics = self.metrics.clone();
                    let stream = ReceiverStream::new(rx).map(move |b: Bytes| {
                        queued.fetch_sub(b.len(), Ordering::Relaxed);
                        metrics.msg("sent", b.len() as u64);
                        b
                    });
                    let mut g = grpc(ch);
                    let push = async {
                        g.ready()
                            .await
                            .map_err(|e| Status::unavailable(e.to_string()))?;
                        g.client_streaming::<_, _, PushSummary, _>(
                            tonic::Request::new(stream),
                            PathAndQuery::from_static(proto::PUSH_PATH),
                            PreEncodedCodec,
                        )
                        .await
                    };
                    let r = tokio::select! {
                        _ = link.cancel.cancelled() => Ok(None),
                        r = push => r.map(Some),
                    };
                    *link.tx.lock() = None;
                    link.connected.store(false, Ordering::Relaxed);
                    let lost = link.queued.swap(0, Ordering::Relaxed);
                    if lost > 0 {
                        self.metrics.drop_n("peer_unavailable", 1);
                    }
                    self.update_peer_gauges();
                    match r {
                        Ok(None) => return,
                        Ok(Some(_)) => {
                            self.log_link_failure(&addr, &link, "push stream closed by the peer")
                        }
                        Err(s) => {
                            self.metrics.error("stream");
                            self.log_link_failure(
                                &addr,
                                &link,
                                &format!("push stream failed: {}: {}", s.code(), s.message()),
                            );
                        }
                    }
                }
            }
            let jitter = Duration::from_millis(u64::from(rand::random::<u8>()));
            tokio::select! {
                _ = link.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff + jitter) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn log_link_failure(&self, addr: &str, link: &Link, what: &str) {
        if !link.outage_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(peer = %addr, error = %what, "ha: peer unreachable; routing goes on with this replica's own state, retrying in the background");
        } else {
            tracing::debug!(peer = %addr, error = %what, "ha: peer still unreachable");
        }
    }

    /// Starts and stops links so that they match `addrs`.
    pub(crate) fn reconcile_links(self: &Arc<Self>, addrs: &[String]) {
        let mut links = self.links.lock();
        let wanted: HashSet<&String> = addrs.iter().collect();
        links.retain(|a, l| {
            let keep = wanted.contains(a);
            if !keep {
                l.cancel.cancel();
                tracing::info!(peer = %a, "ha: peer removed");
            }
            keep
        });
        for a in addrs {
            if links.contains_key(a) {
                continue;
            }
            let link = Arc::new(Link {
                cancel: self.cancel.child_token(),
                ..Link::default()
            });
            links.insert(a.clone(), link.clone());
            tokio::spawn(self.clone().link_loop(a.clone(), link));
        }
        drop(links);
        self.update_peer_gauges();
    }
}

/// Follows the peer set.
pub(crate) async fn peers_loop(inner: Arc<Inner>, mut peers: watch::Receiver<Vec<String>>) {
    loop {
        let addrs = peers.borrow_and_update().clone();
        inner.reconcile_links(&addrs);
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            r = peers.changed() => if r.is_err() {
                // The sender is gone: the set is final.
                inner.cancel.cancelled().await;
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Receiver: validate, resolve endpoints, apply, sum gauges.
// ---------------------------------------------------------------------------------------

/// Why a batch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Invalid(pub String);

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<(), Invalid> {
    if cond { Ok(()) } else { Err(Invalid(what())) }
}

/// Checks every bound of a batch before anything is applied.
pub(crate) fn validate(b: &SyncBatch) -> Result<&Origin, Invalid> {
    let origin = b
        .origin
        .as_ref()
        .ok_or_else(|| Invalid("batch without origin".into()))?;
    check(
        !origin.replica_id.is_empty() && origin.replica_id.len() <= limits::MAX_NAME,
        || "origin replica id empty or too long".into(),
    )?;
    check(b.endpoints.len() <= limits::MAX_ENDPOINTS, || {
        format!(
            "{} endpoint names (max {})",
            b.endpoints.len(),
            limits::MAX_ENDPOINTS
        )
    })?;
    check(
        b.endpoints.iter().all(|n| n.len() <= limits::MAX_NAME),
        || "endpoint name too long".into(),
    )?;
    let n = b.endpoints.len();
    check(b.states.len() <= limits::MAX_STATES, || {
        format!("{} states (max {})", b.states.len(), limits::MAX_STATES)
    })?;
    check(b.loads.len() <= limits::MAX_GAUGES, || {
        "too many loads".into()
    })?;
    check(b.loads.iter().all(|l| (l.endpoint as usize) < n), || {
        "load refers to an endpoint index out of range".into()
    })?;
    for s in &b.states {
        check(
            s.kind.len() <= limits::MAX_NAME && s.name.len() <= limits::MAX_NAME,
            || "state kind or name too long".into(),
        )?;
        check(s.deltas.len() <= limits::MAX_DELTAS, || {
            format!(
                "{} deltas in one state (max {})",
                s.deltas.len(),
                limits::MAX_DELTAS
            )
        })?;
        check(s.gauge_values.len() <= limits::MAX_GAUGES, || {
            "too many gauge values".into()
        })?;
        check(
            s.gauge_values.iter().all(|g| (g.endpoint as usize) < n),
            || "gauge refers to an endpoint index out of range".into(),
        )?;
        for d in &s.deltas {
            check((d.endpoint as usize) < n, || {
                format!("delta refers to endpoint {} of {n}", d.endpoint)
            })?;
            check(DeltaOp::from_u32(d.op).is_some(), || {
                format!("unknown delta op {}", d.op)
            })?;
            check(d.keys.len() <= limits::MAX_KEYS_PER_DELTA, || {
                format!(
                    "{} keys in one delta (max {})",
                    d.keys.len(),
                    limits::MAX_KEYS_PER_DELTA
                )
            })?;
        }
    }
    Ok(origin)
}

/// Endpoint names → this process's endpoints, rebuilt when the endpoint set changes.
pub(crate) struct Resolver {
    generation: u64,
    ptr: usize,
    map: HashMap<String, Arc<Endpoint>>,
}

impl Resolver {
    pub(crate) fn new() -> Self {
        Self {
            generation: u64::MAX,
            ptr: 0,
            map: HashMap::new(),
        }
    }

    fn refresh(&mut self, endpoints: &dyn EndpointSource) {
        let set = endpoints.snapshot();
        let ptr = Arc::as_ptr(&set) as usize;
        if set.generation == self.generation && ptr == self.ptr {
            return;
        }
        self.generation = set.generation;
        self.ptr = ptr;
        self.map.clear();
        for e in &set.endpoints {
            // By name; `ip:port` as well, for peers that name endpoints by address.
            self.map.insert(e.hostport().to_string(), e.clone());
            self.map.insert(e.name().to_string(), e.clone());
        }
    }

    fn get(&self, name: &str) -> Option<&Arc<Endpoint>> {
        self.map.get(name)
    }
}

/// Where an applied batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Push,
    Snapshot,
}

impl Inner {
    fn local_states(&self) -> HashMap<(String, String), Arc<dyn ReplicatedState>> {
        self.states
            .states()
            .into_iter()
            .map(|s| ((s.state.replica_kind().to_string(), s.name), s.state))
            .collect()
    }

    /// Validates and applies one batch from a peer. Returns keys applied.
    pub(crate) fn apply_batch(
        &self,
        b: &SyncBatch,
        resolver: &mut Resolver,
        source: Source,
    ) -> Result<usize, Invalid> {
        let origin = validate(b)?;
        if origin.incarnation == self.origin.incarnation {
            return Err(Invalid("a batch from this replica itself".into()));
        }
        resolver.refresh(self.endpoints.as_ref());
        let eps: Vec<Option<&Arc<Endpoint>>> =
            b.endpoints.iter().map(|n| resolver.get(n)).collect();
        let unknown = eps.iter().filter(|e| e.is_none()).count();
        let states = self.local_states();
        let mut applied = 0usize;
        let mut skipped_unknown_endpoint = 0u64;
        let mut remote: Vec<RemoteDelta<'_>> = Vec::new();
        for s in &b.states {
            if s.deltas.is_empty() {
                continue;
            }
            let Some(state) = states.get(&(s.kind.clone(), s.name.clone())) else {
                self.metrics.drop_n("unknown_state", s.deltas.len() as u64);
                continue;
            };
            remote.clear();
            for d in &s.deltas {
                let (Some(op), Some(Some(ep))) =
                    (DeltaOp::from_u32(d.op), eps.get(d.endpoint as usize))
                else {
                    skipped_unknown_endpoint += 1;
                    continue;
                };
                remote.push(RemoteDelta {
                    op,
                    endpoint: ep,
                    keys: &d.keys,
                    ttl: Duration::from_millis(u64::from(d.ttl_ms)),
                });
            }
            if !remote.is_empty() {
                applied += state.apply_remote(&remote);
            }
        }
        self.metrics
            .drop_n("unknown_endpoint", skipped_unknown_endpoint);
        if unknown > 0 {
            tracing::debug!(
                unknown,
                "ha: batch names endpoints this replica does not know"
            );
        }
        let label = match source {
            Source::Push => "peer",
            Source::Snapshot => "snapshot",
        };
        self.metrics.entries(label, applied as u64);
        if source == Source::Push && b.oldest_unix_ms > 0 {
            let lag = unix_ms().saturating_sub(b.oldest_unix_ms);
            self.metrics.lag.observe(lag as f64 / 1000.0);
        }
        if source == Source::Push && b.gauges {
            self.record_gauges(origin, b);
        }
        Ok(applied)
    }

    /// A push batch arrived from `origin` with sequence `seq`: tracks restarts and gaps.
    fn note_seq(&self, origin: &Origin, seq: u64) {
        let mut remotes = self.remotes.lock();
        let r = remotes
            .entry(origin.replica_id.clone())
            .or_insert_with(|| Remote::new(origin.incarnation));
        if r.incarnation != origin.incarnation {
            tracing::info!(replica = %origin.replica_id, "ha: peer restarted (new incarnation); its earlier figures are forgotten");
            let streams = r.streams;
            *r = Remote::new(origin.incarnation);
            r.streams = streams;
        }
        r.last_heard = Instant::now();
        let missed = match r.last_seq {
            Some(last) => seq.saturating_sub(last + 1),
            // First contact: what it sent before is covered by the snapshot this replica
            // started from, if it started warm.
            None if !self.bootstrapped_warm.load(Ordering::Relaxed) => seq.saturating_sub(1),
            None => 0,
        };
        if missed > 0 {
            self.metrics.drop_n("missed", missed);
            tracing::debug!(replica = %origin.replica_id, missed, "ha: batches from peer were lost; a snapshot will resync");
            self.resync_wanted.lock().insert(origin.replica_id.clone());
        }
        r.last_seq = Some(r.last_seq.map_or(seq, |l| l.max(seq)));
    }

    fn record_gauges(&self, origin: &Origin, b: &SyncBatch) {
        {
            let mut remotes = self.remotes.lock();
            let r = remotes
                .entry(origin.replica_id.clone())
                .or_insert_with(|| Remote::new(origin.incarnation));
            r.loads.clear();
            for l in &b.loads {
                if let Some(n) = b.endpoints.get(l.endpoint as usize) {
                    r.loads.insert(n.clone(), (l.requests, l.tokens));
                }
            }
            r.gauges.clear();
            for s in &b.states {
                let m: HashMap<String, u64> = s
                    .gauge_values
                    .iter()
                    .filter_map(|g| {
                        b.endpoints
                            .get(g.endpoint as usize)
                            .map(|n| (n.clone(), g.value))
                    })
                    .collect();
                r.gauges.insert((s.kind.clone(), s.name.clone()), m);
            }
        }
        self.apply_gauge_totals();
    }

    /// Sums the gauges of the live peer replicas and sets them on the endpoints and states.
    pub(crate) fn apply_gauge_totals(&self) {
        let (loads, gauges) = {
            let remotes = self.remotes.lock();
            let mut loads: HashMap<String, (u64, u64)> = HashMap::new();
            let mut gauges: HashMap<(String, String), HashMap<String, u64>> = HashMap::new();
            for r in remotes.values() {
                for (n, (q, t)) in &r.loads {
                    let e = loads.entry(n.clone()).or_default();
                    e.0 = e.0.saturating_add(*q);
                    e.1 = e.1.saturating_add(*t);
                }
                for (k, m) in &r.gauges {
                    let g = gauges.entry(k.clone()).or_default();
                    for (n, v) in m {
                        let e = g.entry(n.clone()).or_default();
                        *e = e.saturating_add(*v);
                    }
                }
            }
            (loads, gauges)
        };
        let set = self.endpoints.snapshot();
        let lookup = |e: &Endpoint| -> Option<&(u64, u64)> {
            loads.get(e.name()).or_else(|| loads.get(e.hostport()))
        };
        for e in &set.endpoints {
            let (q, t) = lookup(e).copied().unwrap_or((0, 0));
            e.set_peer_inflight(q, t);
        }
        for NamedState { name, state } in self.states.states() {
            let key = (state.replica_kind().to_string(), name);
            let totals: Vec<(EndpointId, u64)> = match gauges.get(&key) {
                None => Vec::new(),
                Some(m) => set
                    .endpoints
                    .iter()
                    .filter_map(|e| {
                        m.get(e.name())
                            .or_else(|| m.get(e.hostport()))
                            .map(|v| (e.id(), *v))
                    })
                    .collect(),
            };
            state.set_peer_gauges(&totals);
        }
    }

    /// Forgets the gauges of replicas whose streams all closed or that went silent.
    pub(crate) fn expire_remotes(&self) {
        let silent = self.cfg.heartbeat * 3 + Duration::from_secs(1);
        let mut changed = false;
        {
            let mut remotes = self.remotes.lock();
            for (id, r) in remotes.iter_mut() {
                let stale = r.streams == 0 || r.last_heard.elapsed() > silent;
                if stale && (!r.loads.is_empty() || !r.gauges.is_empty()) {
                    tracing::debug!(replica = %id, "ha: peer gone or silent; its in-flight figures are dropped");
                    r.loads.clear();
                    r.gauges.clear();
                    changed = true;
                }
            }
        }
        if changed {
            self.apply_gauge_totals();
        }
    }

    /// The receiving side of one `Push` stream.
    pub(crate) async fn serve_push(
        self: Arc<Self>,
        mut stream: tonic::Streaming<SyncBatch>,
        from_addr: Option<std::net::SocketAddr>,
    ) -> Result<PushSummary, Status> {
        let mut resolver = Resolver::new();
        let mut from: Option<Origin> = None;
        let mut batches = 0u64;
        let outcome = loop {
            let msg = tokio::select! {
                _ = self.cancel.cancelled() => break Ok(()),
                m = stream.message() => m,
            };
            let b = match msg {
                Ok(Some(b)) => b,
                Ok(None) => break Ok(()),
                Err(s) => {
                    self.metrics.error("decode");
                    break Err(s);
                }
            };
            self.metrics.msg("received", b.encoded_len() as u64);
            let origin = match validate(&b) {
                Ok(o) => o.clone(),
                Err(e) => {
                    self.metrics.drop_n("invalid", 1);
                    break Err(Status::invalid_argument(format!("invalid sync batch: {e}")));
                }
            };
            match &from {
                None => {
                    let mut remotes = self.remotes.lock();
                    let r = remotes
                        .entry(origin.replica_id.clone())
                        .or_insert_with(|| Remote::new(origin.incarnation));
                    r.streams += 1;
                    if let (Some(a), Ok(port)) = (from_addr, u16::try_from(origin.sync_port))
                        && port != 0
                    {
                        r.addr = Some(std::net::SocketAddr::new(a.ip(), port).to_string());
                    }
                    from = Some(origin.clone());
                }
                Some(f) if f != &origin => {
                    self.metrics.drop_n("invalid", 1);
                    break Err(Status::invalid_argument(
                        "the origin changed within one push stream",
                    ));
                }
                Some(_) => {}
            }
            self.note_seq(&origin, b.seq);
            match self.apply_batch(&b, &mut resolver, Source::Push) {
                Ok(_) => {
                    batches += 1;
                    self.metrics
                        .messages
                        .get_or_create(&crate::metrics::Direction {
                            direction: "applied",
                        })
                        .inc();
                }
                Err(e) => {
                    self.metrics.drop_n("invalid", 1);
                    break Err(Status::invalid_argument(format!("invalid sync batch: {e}")));
                }
            }
        };
        if let Some(o) = &from {
            {
                let mut remotes = self.remotes.lock();
                if let Some(r) = remotes.get_mut(&o.replica_id) {
                    r.streams = r.streams.saturating_sub(1);
                    if r.streams == 0 {
                        r.loads.clear();
                        r.gauges.clear();
                    }
                }
            }
            self.apply_gauge_totals();
        }
        match outcome {
            Ok(()) => Ok(PushSummary { batches }),
            Err(s) => {
                let who = from.as_ref().map_or("?", |o| o.replica_id.as_str());
                tracing::warn!(replica = %who, code = ?s.code(), error = %s.message(), "ha: push stream from a peer failed; its figures are dropped until it reconnects");
                Err(s)
            }
        }
    }

    /// Answers `Hello`.
    pub(crate) fn hello(&self, req: &HelloRequest) -> Result<HelloResponse, Status> {
        if req.protocol != proto::PROTOCOL {
            self.metrics.error("incompatible");
            return Err(Status::failed_precondition(format!(
                "sync protocol {} is not supported (this replica speaks {})",
                req.protocol,
                proto::PROTOCOL
            )));
        }
        Ok(HelloResponse {
            origin: Some(self.origin.clone()),
            protocol: proto::PROTOCOL,
            pool: self.cfg.pool.clone(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Snapshots.
// ---------------------------------------------------------------------------------------

impl Inner {
    /// The chunks of a snapshot of every state (at most `max_keys` keys).
    pub(crate) fn build_snapshot(&self, max_keys: usize) -> Vec<SyncBatch> {
        let states = self.states.states();
        let set = self.endpoints.snapshot();
        let seq = self.seq.load(Ordering::Relaxed);
        let per_state = max_keys / states.len().max(1);
        let mut chunks = Vec::new();
        let mut deltas = Vec::new();
        for NamedState { name, state } in &states {
            deltas.clear();
            state.snapshot(&mut deltas, per_state);
            let kind = state.replica_kind();
            let mut names = Names::new(&set);
            let mut current: Vec<Delta> = Vec::new();
            let mut keys = 0usize;
            let flush =
                |names: &mut Names<'_>, current: &mut Vec<Delta>, chunks: &mut Vec<SyncBatch>| {
                    if current.is_empty() {
                        return;
                    }
                    chunks.push(SyncBatch {
                        origin: Some(self.origin.clone()),
                        seq,
                        sent_unix_ms: unix_ms(),
                        endpoints: std::mem::take(&mut names.names),
                        states: vec![StateDeltas {
                            kind: kind.to_string(),
                            name: name.clone(),
                            deltas: std::mem::take(current),
                            gauge_values: Vec::new(),
                        }],
                        ..SyncBatch::default()
                    });
                    names.index.clear();
                };
            for d in deltas.drain(..) {
                if keys + d.keys.len() > SNAPSHOT_CHUNK_KEYS && !current.is_empty() {
                    flush(&mut names, &mut current, &mut chunks);
                    keys = 0;
                }
                let Some(ep) = names.idx(d.endpoint) else {
                    continue;
                };
                keys += d.keys.len();
                current.push(Delta {
                    op: d.op.as_u32(),
                    endpoint: ep,
                    ttl_ms: ttl_ms(d.ttl),
                    keys: d.keys,
                });
            }
            flush(&mut names, &mut current, &mut chunks);
        }
        match chunks.last_mut() {
            Some(c) => c.last = true,
            None => chunks.push(SyncBatch {
                origin: Some(self.origin.clone()),
                seq,
                sent_unix_ms: unix_ms(),
                last: true,
                ..SyncBatch::default()
            }),
        }
        chunks
    }

    /// Serves `Snapshot`: at most two at a time.
    pub(crate) fn serve_snapshot(
        self: Arc<Self>,
        req: &SnapshotRequest,
    ) -> Result<ReceiverStream<Result<SyncBatch, Status>>, Status> {
        if self.bootstrapping.load(Ordering::Relaxed) {
            return Err(Status::unavailable(BOOTSTRAPPING));
        }
        let permit = self
            .snapshot_permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many snapshots in progress"))?;
        let max = usize::try_from(req.max_keys)
            .unwrap_or(usize::MAX)
            .min(self.cfg.snapshot_max_keys);
        let max = if max == 0 {
            self.cfg.snapshot_max_keys
        } else {
            max
        };
        let who = req
            .origin
            .as_ref()
            .map_or_else(|| "?".to_string(), |o| o.replica_id.clone());
        let (tx, rx) = mpsc::channel(2);
        let inner = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let chunks = {
                let inner = inner.clone();
                match tokio::task::spawn_blocking(move || inner.build_snapshot(max)).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                }
            };
            let keys: usize = chunks
                .iter()
                .flat_map(|c| &c.states)
                .flat_map(|s| &s.deltas)
                .map(|d| d.keys.len())
                .sum();
            for c in chunks {
                if tx.send(Ok(c)).await.is_err() {
                    return;
                }
            }
            inner.metrics.snapshots_served.inc();
            tracing::info!(replica = %who, keys, "ha: snapshot sent to a peer");
        });
        Ok(ReceiverStream::new(rx))
    }

    /// Pulls and applies a snapshot from `addr`. Returns the peer and the keys applied.
    pub(crate) async fn pull_snapshot(&self, addr: &str) -> Result<(String, usize), PeerError> {
        let (ch, origin) = self.connect(addr).await?;
        let mut g = grpc(ch);
        g.ready()
            .await
            .map_err(|e| PeerError::Snapshot(e.to_string()))?;
        let req = SnapshotRequest {
            origin: Some(self.origin.clone()),
            max_keys: self.cfg.snapshot_max_keys as u64,
        };
        let mut stream = g
            .server_streaming::<_, SyncBatch, _>(
                tonic::Request::new(req),
                PathAndQuery::from_static(proto::SNAPSHOT_PATH),
                tonic_prost::ProstCodec::<SnapshotRequest, SyncBatch>::default(),
            )
            .await
            .map_err(|s| {
                if s.code() == tonic::Code::Unavailable && s.message() == BOOTSTRAPPING {
                    PeerError::Starting
                } else {
                    PeerError::Snapshot(format!("{}: {}", s.code(), s.message()))
                }
            })?
            .into_inner();
        let mut resolver = Resolver::new();
        let mut keys = 0usize;
        let mut seq: Option<u64> = None;
        loop {
            match stream.message().await {
                Ok(Some(b)) => {
                    self.metrics.msg("received", b.encoded_len() as u64);
                    if b.origin.as_ref().map(|o| o.incarnation) != Some(origin.incarnation) {
                        return Err(PeerError::Snapshot(
                            "a chunk from another replica than the one greeted".into(),
                        ));
                    }
                    seq = Some(seq.map_or(b.seq, |s| s.max(b.seq)));
                    keys += self
                        .apply_batch(&b, &mut resolver, Source::Snapshot)
                        .map_err(|e| PeerError::Snapshot(e.to_string()))?;
                    if b.last {
                        break;
                    }
                }
                Ok(None) => {
                    return Err(PeerError::Snapshot("ended before its last chunk".into()));
                }
                Err(s) => {
                    return Err(PeerError::Snapshot(format!(
                        "{}: {}",
                        s.code(),
                        s.message()
                    )));
                }
            }
        }
        if let Some(seq) = seq {
            let mut remotes = self.remotes.lock();
            let r = remotes
                .entry(origin.replica_id.clone())
                .or_insert_with(|| Remote::new(origin.incarnation));
            if r.incarnation == origin.incarnation {
                r.last_seq = Some(r.last_seq.map_or(seq, |l| l.max(seq)));
            }
        }
        Ok((origin.replica_id, keys))
    }

    /// Pulls snapshots from replicas whose batches were lost (at most every 10 s each).
    pub(crate) async fn resync_due(self: &Arc<Self>) {
        let wanted: Vec<String> = self.resync_wanted.lock().drain().collect();
        for replica in wanted {
            {
                let mut remotes = self.remotes.lock();
                if let Some(r) = remotes.get_mut(&replica) {
                    if r.last_resync
                        .is_some_and(|t| t.elapsed() < RESYNC_MIN_INTERVAL)
                    {
                        // Too soon: ask again later.
                        drop(remotes);
                        self.resync_wanted.lock().insert(replica);
                        continue;
                    }
                    r.last_resync = Some(Instant::now());
                }
            }
            let addr = self
                .links
                .lock()
                .iter()
                .find(|(_, l)| l.replica_id.lock().as_deref() == Some(replica.as_str()))
                .map(|(a, _)| a.clone())
                .or_else(|| {
                    self.remotes
                        .lock()
                        .get(&replica)
                        .and_then(|r| r.addr.clone())
                });
            let Some(addr) = addr else {
                tracing::debug!(replica = %replica, "ha: lost batches from a replica whose sync address is unknown; it converges through later traffic");
                continue;
            };
            let inner = self.clone();
            tokio::spawn(async move {
                match inner.pull_snapshot(&addr).await {
                    Ok((from, keys)) => {
                        inner.metrics.resyncs.inc();
                        tracing::info!(replica = %from, keys, "ha: resynced from a peer's snapshot after lost batches");
                    }
                    Err(e) => {
                        inner.metrics.error(e.reason());
                        tracing::warn!(peer = %addr, error = %e, "ha: resync snapshot failed");
                    }
                }
            });
        }
    }
}

/// Once a second: expire silent peers, resync after losses, catch endpoints that joined.
pub(crate) async fn maintenance_loop(inner: Arc<Inner>) {
    let mut iv = tokio::time::interval(Duration::from_secs(1));
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.cancel.cancelled() => return,
            _ = iv.tick() => {}
        }
        inner.expire_remotes();
        inner.apply_gauge_totals();
        inner.resync_due().await;
    }
}

/// The outcome of the start-up bootstrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// A peer's snapshot was applied.
    Warm {
        /// The peer replica.
        from: String,
        /// Keys applied.
        keys: usize,
    },
    /// No snapshot: this replica starts with its own (empty) state.
    Cold {
        /// Why.
        reason: String,
    },
}

impl Inner {
    /// Waits for the endpoint set, then pulls a snapshot from the first peer that answers,
    /// trying the peers in turn until `timeout`.
    pub(crate) async fn bootstrap(
        &self,
        peers: &watch::Receiver<Vec<String>>,
        timeout: Duration,
    ) -> Bootstrap {
        // Peers name endpoints: their snapshot is of use once this replica knows the
        // endpoints (it is not ready before anyway). The timeout runs from then.
        while !self.endpoints.snapshot().synced {
            tokio::select! {
                _ = self.cancel.cancelled() => return Bootstrap::Cold { reason: "shutting down".into() },
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        self.bootstrapping.store(true, Ordering::Relaxed);
        let outcome = self.bootstrap_rounds(peers, deadline).await;
        self.bootstrapping.store(false, Ordering::Relaxed);
        outcome
    }

    async fn bootstrap_rounds(
        &self,
        peers: &watch::Receiver<Vec<String>>,
        deadline: tokio::time::Instant,
    ) -> Bootstrap {
        let mut last_error = String::from("no peers configured or discovered");
        let mut round = 0u64;
        loop {
            let mut addrs = peers.borrow().clone();
            // Start at a different peer each round (spreads the load of a rolling restart).
            if !addrs.is_empty() {
                let shift = (self.origin.incarnation.wrapping_add(round) as usize) % addrs.len();
                addrs.rotate_left(shift);
            }
            // Peers that answered "starting too" this round, and peers that answered at all.
            let (mut starting, mut answered) = (0usize, 0usize);
            for addr in &addrs {
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                if remaining.is_zero() {
                    break;
                }
                match tokio::time::timeout(remaining, self.pull_snapshot(addr)).await {
                    Ok(Ok((from, keys))) => {
                        self.bootstrapped_warm.store(true, Ordering::Relaxed);
                        return Bootstrap::Warm { from, keys };
                    }
                    Ok(Err(PeerError::IsSelf)) => {}
                    Ok(Err(PeerError::Starting)) => {
                        starting += 1;
                        answered += 1;
                        last_error = format!("{addr}: starting too");
                    }
                    Ok(Err(e)) => {
                        self.metrics.error(e.reason());
                        tracing::debug!(peer = %addr, error = %e, "ha: bootstrap from peer failed");
                        last_error = format!("{addr}: {e}");
                    }
                    Err(_) => last_error = format!("{addr}: timed out"),
                }
            }
            round += 1;
            if answered > 0 && starting == answered {
                // Every peer that answered is starting too: nobody has state to give, and
                // waiting for each other would only delay readiness.
                return Bootstrap::Cold {
                    reason: format!("every reachable peer is starting too ({last_error})"),
                };
            }
            if tokio::time::Instant::now() + Duration::from_millis(250) >= deadline {
                return Bootstrap::Cold { reason: last_error };
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Keys in a list of chunks (for logs and tests).
pub fn chunk_keys(chunks: &[SyncBatch]) -> usize {
    chunks
        .iter()
        .flat_map(|c| &c.states)
        .flat_map(|s| &s.deltas)
        .map(|d| d.keys.len())
        .sum()
}
