//! The subscriber side: ZMQ SUB sockets receiving vLLM's KV-event messages and handing the
//! decoded batches, in order, to an [`EventSink`] (the precise prefix index).
//!
//! ## Two ways to connect
//!
//! * **Central** ([`KvEventSubscriber::bind`]): one SUB socket binds (e.g. `tcp://*:5557`)
//!   and every engine's PUB socket dials it (llm-d's simulator, or vLLM with
//!   `--kv-events-config '{"endpoint": "tcp://epp:5557", ...}'`). Sources are told apart by
//!   their topic, `kv@<ip>:<port>@<model>`.
//! * **Per endpoint** ([`KvEventSubscriber::dialing`] + [`KvEventSubscriber::add_peer`]): one
//!   SUB socket per discovered endpoint dials `tcp://<endpoint ip>:<socketPort>` (vLLM binds
//!   `tcp://*:5557` by default). A peer whose connection fails is re-dialled every
//!   [`SubscriberConfig::reconnect_interval`]; a peer removed with
//!   [`KvEventSubscriber::remove_peer`] is closed.
//!
//! Both subscribe to [`SubscriberConfig::topic_filter`] (a topic prefix, ZMQ semantics).
//!
//! ## Ordering, gaps, replay
//!
//! Messages are spread over [`SubscriberConfig::concurrency`] workers by source, so one
//! source's batches are always applied in arrival order by one worker while different sources
//! proceed in parallel. A worker keeps, per stream, the next expected sequence number. A
//! stream is one publisher identity: (dialled peer, the topic's `<host>:<port>` — or the
//! whole topic when it names none —, data-parallel rank).
//!
//! * `seq == next`: applied.
//! * The identity's topic changed (e.g. `kv@10.0.0.5:8000@old-model` →
//!   `kv@10.0.0.5:8000@new-model`): a new engine publishes under that address, a
//!   **restart** (see below).
//! * `seq > next + restart_window` ([`SubscriberConfig::restart_window`]): a jump no gap
//!   explains (beyond the publishers' replay buffers) — a publisher that restarted with a
//!   higher first sequence number, or a forged one: a **restart**, not a gap, so neither the
//!   dead engine's blocks survive nor `missed` moves by the jump.
//! * `seq > next` (a **gap**: messages were lost): when a replay port is configured, the
//!   missing batches are fetched from the publisher's replay ROUTER socket
//!   (`tcp://<source host>:<replayPort>`, request `[start_seq]`, replies `[seq, payload]` up
//!   to the end marker) and applied first; otherwise (or when replay fails) the missing
//!   numbers are remembered and the batch is applied.
//! * `seq < next`: a remembered missing number arriving late (reordering) is applied; a number
//!   already applied from a replay (the live copy arriving late) is dropped; any other
//!   backward jump means the publisher **restarted** with a fresh sequence.
//!
//! On a restart the sink is told to [`EventSink::reset`] the source (a restarted engine's
//! cache is empty), the stream starts over from the batch's number and the batch is applied.
//! Gap accounting is bounded: one gap adds at most `restart_window` to `missed`. At most
//! [`MAX_STREAMS`] streams are tracked per worker (a sender inventing topics cannot grow
//! memory without bound).
//!
//! ## Robustness
//!
//! Anything malformed (wrong frame count, bad sequence frame, undecodable payload) is counted
//! in [`SubscriberStats::malformed`], logged, and skipped; it never reaches the sink and never
//! stops the subscriber. A payload that cannot be decoded leaves the stream's sequence state
//! untouched, so the next message shows a gap and, with replay, the lost batch is fetched
//! again.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::wire::{EventBatch, WireMessage, decode_batch, encode_seq, parse_replay_reply};
use crate::zmtp::{DealerSocket, Limits, SubSocket, TransportStats};

/// Missing and replayed sequence numbers remembered per stream (for late arrivals and
/// duplicates).
const MISSING_CAP: usize = 1024;
/// Streams tracked per worker; beyond that an arbitrary one is forgotten.
pub const MAX_STREAMS: usize = 4096;

/// Errors raised when starting a subscriber.
#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    /// The endpoint is not `tcp://host:port`.
    #[error("invalid KV-event endpoint {0:?} (expected tcp://host:port)")]
    Endpoint(String),
    /// The SUB socket could not bind.
    #[error("cannot bind KV-event socket to {endpoint}: {message}")]
    Bind {
        /// The endpoint that was tried.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
}

/// Subscriber settings.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// Topic prefix to subscribe to (llm-d: `kv@`; empty = everything).
    pub topic_filter: String,
    /// Workers applying batches (sources are spread over them). Default 4.
    pub concurrency: usize,
    /// Port of the publishers' replay ROUTER sockets, on the source's host; `None` = no replay.
    pub replay_port: Option<u16>,
    /// How long one replay may take. Default 2 s.
    pub replay_timeout: Duration,
    /// Delay between attempts to dial a peer. Default 1 s.
    pub reconnect_interval: Duration,
    /// Messages queued per worker before receiving waits. Default 8192.
    pub queue_capacity: usize,
    /// Transport limits (frame and message sizes, frames per message, handshake timeout,
    /// connections). Defaults: 16 MiB, 16 MiB, 64, 10 s, 1024.
    pub limits: Limits,
    /// A forward sequence jump larger than this is a publisher restart, not a gap (and one
    /// gap counts at most this many missed batches). Default 10,000 (vLLM's replay buffer:
    /// a larger gap could not be replayed anyway).
    pub restart_window: u64,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        Self {
            topic_filter: "kv@".into(),
            concurrency: 4,
            replay_port: None,
            replay_timeout: Duration::from_secs(2),
            reconnect_interval: Duration::from_secs(1),
            queue_capacity: 8192,
            limits: Limits::default(),
            restart_window: 10_000,
        }
    }
}

/// Counters of a subscriber (monotonic).
#[derive(Debug, Default)]
pub struct SubscriberStats {
    messages: AtomicU64,
    batches: AtomicU64,
    events: AtomicU64,
    malformed: AtomicU64,
    gaps: AtomicU64,
    missed: AtomicU64,
    replayed: AtomicU64,
    replay_failures: AtomicU64,
    late: AtomicU64,
    duplicates: AtomicU64,
    restarts: AtomicU64,
    reconnects: AtomicU64,
    transport: Arc<TransportStats>,
}

macro_rules! getters {
    ($($(#[$m:meta])* $name:ident),* $(,)?) => {
        impl SubscriberStats {
            $(
                $(#[$m])*
                pub fn $name(&self) -> u64 {
                    self.$name.load(Ordering::Relaxed)
                }
            )*
        }
    };
}

getters!(
    /// Messages received.
    messages,
    /// Batches handed to the sink (live, late and replayed).
    batches,
    /// Events in those batches.
    events,
    /// Malformed messages (bad frames or payloads), skipped.
    malformed,
    /// Sequence gaps detected.
    gaps,
    /// Batches lost in gaps and not recovered.
    missed,
    /// Batches recovered from replay sockets.
    replayed,
    /// Replay attempts that failed.
    replay_failures,
    /// Missing batches that arrived late and were applied.
    late,
    /// Batches already applied, dropped.
    duplicates,
    /// Publisher restarts detected (sequence reset).
    restarts,
    /// Failed attempts to dial a peer.
    reconnects,
);

impl SubscriberStats {
    /// Transport errors (connections closed for a protocol violation or a limit, by reason).
    pub fn transport(&self) -> &Arc<TransportStats> {
        &self.transport
    }
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Where a batch came from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The topic frame (llm-d: `kv@<ip>:<port>@<model>`).
    pub topic: &'a str,
    /// The peer key given to [`KvEventSubscriber::add_peer`] (per-endpoint mode).
    pub peer: Option<&'a str>,
    /// The batch's data-parallel rank.
    pub data_parallel_rank: Option<i64>,
}

/// Receives decoded batches, per source in sequence order. Called from the workers; must not
/// block for long.
pub trait EventSink: Send + Sync + 'static {
    /// Applies one batch.
    fn apply(&self, source: &Source<'_>, batch: &EventBatch);
    /// The source's publisher restarted: forget what it reported before.
    fn reset(&self, source: &Source<'_>);
}

/// The host of a `kv@<host>:<port>@<model>` topic (brackets of IPv6 hosts removed).
pub fn topic_host(topic: &str) -> Option<&str> {
    let hostport = topic_hostport(topic)?;
    let (host, _) = hostport.rsplit_once(':')?;
    Some(host.trim_start_matches('[').trim_end_matches(']'))
}

/// The `<host>:<port>` of a `kv@<host>:<port>@<model>` topic.
pub fn topic_hostport(topic: &str) -> Option<&str> {
    let (_, rest) = topic.split_once('@')?;
    let (hostport, _) = rest.rsplit_once('@')?;
    (!hostport.is_empty()).then_some(hostport)
}

/// The `<model>` of a `kv@<host>:<port>@<model>` topic.
pub fn topic_model(topic: &str) -> Option<&str> {
    let (_, rest) = topic.split_once('@')?;
    rest.rsplit_once('@').map(|(_, m)| m)
}

/// The host of a `tcp://host:port` endpoint.
fn endpoint_host(endpoint: &str) -> Option<&str> {
    let rest = endpoint.split_once("://")?.1;
    let (host, _) = rest.rsplit_once(':')?;
    Some(host.trim_start_matches('[').trim_end_matches(']'))
}

struct Job {
    peer: Option<Arc<str>>,
    msg: WireMessage,
}

/// Per-stream state, keyed by (peer, publisher identity, data-parallel rank).
type Streams = HashMap<(Option<Arc<str>>, Bytes, Option<i64>), StreamState>;

#[derive(Default)]
struct StreamState {
    /// The topic the identity last published under.
    topic: Bytes,
    next: Option<u64>,
    missing: VecDeque<u64>,
    replayed: VecDeque<u64>,
}

/// The publisher identity of a topic: its `<host>:<port>` when it names one, else the whole
/// topic.
fn identity(topic: &Bytes) -> Bytes {
    match std::str::from_utf8(topic).ok().and_then(topic_hostport) {
        Some(hp) => Bytes::copy_from_slice(hp.as_bytes()),
        None => topic.clone(),
    }
}

struct Shared {
    cfg: SubscriberConfig,
    stats: Arc<SubscriberStats>,
    sink: Arc<dyn EventSink>,
    workers: Vec<mpsc::Sender<Job>>,
}

impl Shared {
    async fn dispatch(&self, peer: Option<Arc<str>>, frames: Vec<Bytes>) {
        inc(&self.stats.messages, 1);
        let msg = match WireMessage::from_frames(&frames) {
            Ok(m) => m,
            Err(e) => {
                self.malformed(peer.as_deref(), "", &e.to_string());
                return;
            }
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        peer.hash(&mut h);
        // By identity, so that a topic change of one publisher is seen by the same worker.
        identity(&msg.topic).hash(&mut h);
        let w = (h.finish() % self.workers.len() as u64) as usize;
        // A closed worker means we are shutting down.
        let _ = self.workers[w].send(Job { peer, msg }).await;
    }

    fn malformed(&self, peer: Option<&str>, topic: &str, error: &str) {
        let n = self.stats.malformed.fetch_add(1, Ordering::Relaxed) + 1;
        // Log the first ones, then one in a thousand: a garbling peer must not flood logs.
        if n <= 16 || n.is_multiple_of(1000) {
            tracing::warn!(
                peer = peer.unwrap_or("-"),
                topic,
                error,
                malformed_total = n,
                "malformed KV-event message skipped"
            );
        }
    }
}

/// A running subscriber. Dropping it stops every task.
pub struct KvEventSubscriber {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    endpoint: Option<String>,
    tasks: Vec<JoinHandle<()>>,
    peers: Mutex<HashMap<String, (String, JoinHandle<()>)>>,
}

impl std::fmt::Debug for KvEventSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvEventSubscriber")
            .field("endpoint", &self.endpoint)
            .field("peers", &self.peers.lock().len())
            .finish()
    }
}

impl KvEventSubscriber {
    fn new(
        cfg: SubscriberConfig,
        sink: Arc<dyn EventSink>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        let stats = Arc::new(SubscriberStats::default());
        let n = cfg.concurrency.clamp(1, 256);
        let mut senders = Vec::with_capacity(n);
        let mut receivers = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
            senders.push(tx);
            receivers.push(rx);
        }
        let shared = Arc::new(Shared {
            cfg,
            stats,
            sink,
            workers: senders,
        });
        let tasks = receivers
            .into_iter()
            .map(|rx| runtime.spawn(run_worker(Arc::downgrade(&shared), rx)))
            .collect();
        Self {
            shared,
            runtime,
            endpoint: None,
            tasks,
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// Central mode: binds a SUB socket to `endpoint` (`tcp://*:5557`, `tcp://127.0.0.1:0`…)
    /// synchronously (so a taken port fails here) and receives from every publisher that
    /// dials it. Must be called with a tokio runtime available through `runtime`.
    pub fn bind(
        cfg: SubscriberConfig,
        endpoint: &str,
        sink: Arc<dyn EventSink>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, SubscriberError> {
        let addr = endpoint
            .strip_prefix("tcp://")
            .ok_or_else(|| SubscriberError::Endpoint(endpoint.to_string()))?;
        let addr = addr.replacen('*', "0.0.0.0", 1);
        let listener =
            std::net::TcpListener::bind(addr.as_str()).map_err(|e| SubscriberError::Bind {
                endpoint: endpoint.to_string(),
                message: e.to_string(),
            })?;
        let local = listener.local_addr().map_err(|e| SubscriberError::Bind {
            endpoint: endpoint.to_string(),
            message: e.to_string(),
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| SubscriberError::Bind {
                endpoint: endpoint.to_string(),
                message: e.to_string(),
            })?;
        let mut me = Self::new(cfg, sink, runtime);
        me.endpoint = Some(format!("tcp://{local}"));
        let shared = me.shared.clone();
        let task = me.runtime.spawn(async move {
            let topics = [shared.cfg.topic_filter.as_bytes()];
            let mut socket = match SubSocket::from_std_listener(
                listener,
                &topics,
                shared.cfg.limits.clone(),
                shared.stats.transport.clone(),
            ) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for KV events");
                    return;
                }
            };
            tracing::info!(endpoint = %local, topic_filter = %shared.cfg.topic_filter, "KV-event subscriber bound");
            // One publisher's connection failing (or breaking the protocol) closes only that
            // connection; the socket stays bound and keeps receiving from the others.
            while let Ok(frames) = socket.recv().await {
                shared.dispatch(None, frames).await;
            }
        });
        me.tasks.push(task);
        Ok(me)
    }

    /// Per-endpoint mode: no socket until [`Self::add_peer`] is called.
    pub fn dialing(
        cfg: SubscriberConfig,
        sink: Arc<dyn EventSink>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self::new(cfg, sink, runtime)
    }

    /// The bound endpoint (central mode), with the real port.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<SubscriberStats> {
        &self.shared.stats
    }

    /// Dials `endpoint` (`tcp://ip:port`) as peer `key`, re-dialling on failure. Replaces a
    /// previous peer with the same key and a different endpoint.
    pub fn add_peer(&self, key: &str, endpoint: &str) {
        let mut peers = self.peers.lock();
        if let Some((ep, _)) = peers.get(key)
            && ep == endpoint
        {
            return;
        }
        let shared = self.shared.clone();
        let peer: Arc<str> = Arc::from(key);
        let target = endpoint.to_string();
        let task = self.runtime.spawn(run_peer(shared, peer, target));
        if let Some((_, old)) = peers.insert(key.to_string(), (endpoint.to_string(), task)) {
            old.abort();
        }
    }

    /// Stops dialling peer `key` and closes its socket.
    pub fn remove_peer(&self, key: &str) {
        if let Some((_, task)) = self.peers.lock().remove(key) {
            task.abort();
        }
    }

    /// Keys of the current peers.
    pub fn peers(&self) -> Vec<String> {
        self.peers.lock().keys().cloned().collect()
    }
}

impl Drop for KvEventSubscriber {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for (_, (_, t)) in self.peers.lock().drain() {
            t.abort();
        }
    }
}

async fn run_peer(shared: Arc<Shared>, peer: Arc<str>, endpoint: String) {
    loop {
        let topics = [shared.cfg.topic_filter.as_bytes()];
        match SubSocket::connect(
            &endpoint,
            &topics,
            shared.cfg.limits.clone(),
            shared.stats.transport.clone(),
        )
        .await
        {
            Ok(mut socket) => {
                tracing::info!(peer = %peer, %endpoint, "KV-event subscriber connected");
                loop {
                    match socket.recv().await {
                        Ok(frames) => shared.dispatch(Some(peer.clone()), frames).await,
                        Err(e) => {
                            tracing::info!(peer = %peer, %endpoint, error = %e, "KV-event publisher connection lost; re-dialling");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(peer = %peer, %endpoint, error = %e, "cannot dial KV-event publisher yet");
            }
        }
        inc(&shared.stats.reconnects, 1);
        tokio::time::sleep(shared.cfg.reconnect_interval).await;
    }
}

async fn run_worker(shared: std::sync::Weak<Shared>, mut rx: mpsc::Receiver<Job>) {
    let mut streams = Streams::new();
    while let Some(job) = rx.recv().await {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        process(&shared, &mut streams, job).await;
    }
}

fn apply(shared: &Shared, source: &Source<'_>, batch: &EventBatch) {
    inc(&shared.stats.batches, 1);
    inc(&shared.stats.events, batch.events.len() as u64);
    shared.sink.apply(source, batch);
}

async fn process(shared: &Shared, streams: &mut Streams, job: Job) {
    let Job { peer, msg } = job;
    let topic = std::str::from_utf8(&msg.topic).unwrap_or("");
    let batch = match decode_batch(&msg.payload) {
        Ok(b) => b,
        Err(e) => {
            shared.malformed(peer.as_deref(), topic, &e.to_string());
            return;
        }
    };
    let source = Source {
        topic,
        peer: peer.as_deref(),
        data_parallel_rank: batch.data_parallel_rank,
    };
    let key = (peer.clone(), identity(&msg.topic), batch.data_parallel_rank);
    if streams.len() >= MAX_STREAMS
        && !streams.contains_key(&key)
        && let Some(k) = streams.keys().next().cloned()
    {
        streams.remove(&k);
    }
    let st = streams.entry(key).or_default();
    let seq = msg.seq;
    let Some(next) = st.next else {
        st.topic = msg.topic.clone();
        st.next = Some(seq.wrapping_add(1));
        apply(shared, &source, &batch);
        return;
    };
    if st.topic != msg.topic {
        let old = String::from_utf8_lossy(&st.topic).into_owned();
        let old_source = Source {
            topic: &old,
            ..source
        };
        restart(shared, st, &old_source, seq, next, "topic changed");
        st.topic = msg.topic.clone();
        apply(shared, &source, &batch);
        return;
    }
    if seq == next {
        st.next = Some(seq.wrapping_add(1));
        apply(shared, &source, &batch);
        return;
    }
    if seq < next {
        if let Some(i) = st.missing.iter().position(|&m| m == seq) {
            st.missing.remove(i);
            inc(&shared.stats.late, 1);
            apply(shared, &source, &batch);
        } else if st.replayed.contains(&seq) {
            inc(&shared.stats.duplicates, 1);
        } else {
            restart(shared, st, &source, seq, next, "sequence went back");
            apply(shared, &source, &batch);
        }
        return;
    }
    if seq - next > shared.cfg.restart_window {
        restart(
            shared,
            st,
            &source,
            seq,
            next,
            "sequence jumped beyond the restart window",
        );
        apply(shared, &source, &batch);
        return;
    }
    // A gap: next < seq ≤ next + restart_window.
    inc(&shared.stats.gaps, 1);
    let mut from = next;
    let host = peer_host(peer.as_deref(), topic);
    if let (Some(port), Some(host)) = (shared.cfg.replay_port, host) {
        let endpoint = if host.contains(':') {
            format!("tcp://[{host}]:{port}")
        } else {
            format!("tcp://{host}:{port}")
        };
        match tokio::time::timeout(shared.cfg.replay_timeout, fetch_replay(&endpoint, next)).await {
            Ok(Ok(replies)) => {
                for (rseq, payload) in replies {
                    if rseq < from || rseq >= seq {
                        // Older than needed, or the live batch itself: applied once below.
                        continue;
                    }
                    match decode_batch(&payload) {
                        Ok(b) if b.data_parallel_rank == batch.data_parallel_rank => {
                            inc(&shared.stats.missed, rseq - from);
                            remember_range(st, from, rseq);
                            inc(&shared.stats.replayed, 1);
                            if st.replayed.len() == MISSING_CAP {
                                st.replayed.pop_front();
                            }
                            st.replayed.push_back(rseq);
                            apply(shared, &source, &b);
                            from = rseq + 1;
                        }
                        Ok(_) => {}
                        Err(e) => shared.malformed(
                            peer.as_deref(),
                            topic,
                            &format!("replayed seq {rseq}: {e}"),
                        ),
                    }
                }
            }
            Ok(Err(e)) => {
                inc(&shared.stats.replay_failures, 1);
                tracing::warn!(%endpoint, error = %e, "KV-event replay failed");
            }
            Err(_) => {
                inc(&shared.stats.replay_failures, 1);
                tracing::warn!(%endpoint, "KV-event replay timed out");
            }
        }
    }
    if seq > from {
        inc(&shared.stats.missed, seq - from);
        tracing::debug!(topic, from, to = seq, "KV-event batches missed");
        remember_range(st, from, seq);
    }
    st.next = Some(seq.wrapping_add(1));
    apply(shared, &source, &batch);
}

/// The stream's publisher restarted: the sink forgets what it reported (`source`), and the
/// stream starts over at `seq`.
fn restart(
    shared: &Shared,
    st: &mut StreamState,
    source: &Source<'_>,
    seq: u64,
    expected: u64,
    why: &'static str,
) {
    let n = shared.stats.restarts.fetch_add(1, Ordering::Relaxed) + 1;
    // Log the first ones, then one in a thousand: a forging sender must not flood logs.
    if n <= 16 || n.is_multiple_of(1000) {
        tracing::info!(
            topic = source.topic,
            peer = source.peer.unwrap_or("-"),
            seq,
            expected,
            why,
            restarts_total = n,
            "KV-event publisher restarted; resetting its state"
        );
    }
    st.missing.clear();
    st.replayed.clear();
    st.next = Some(seq.wrapping_add(1));
    shared.sink.reset(source);
}

/// Remembers the missing numbers `from..to` (only the last [`MISSING_CAP`] of a huge gap).
fn remember_range(st: &mut StreamState, from: u64, to: u64) {
    for seq in from.max(to.saturating_sub(MISSING_CAP as u64))..to {
        if st.missing.len() == MISSING_CAP {
            st.missing.pop_front();
        }
        st.missing.push_back(seq);
    }
}

fn peer_host(peer: Option<&str>, topic: &str) -> Option<String> {
    if let Some(p) = peer
        && let Some(h) = endpoint_host(p).or_else(|| p.rsplit_once(':').map(|(h, _)| h))
    {
        return Some(h.to_string());
    }
    topic_host(topic).map(str::to_string)
}

/// Most batches one replay may return (vLLM buffers 10,000).
const MAX_REPLAY_BATCHES: usize = 100_000;
/// Most payload bytes one replay may return.
const MAX_REPLAY_BYTES: usize = 512 << 20;

/// Asks a replay ROUTER for every buffered batch from `start`; returns `(seq, payload)` pairs
/// up to (not including) the end marker. A replier sending more than 100,000 batches or
/// 512 MiB is cut off with an error.
pub async fn fetch_replay(endpoint: &str, start: u64) -> Result<Vec<(u64, Bytes)>, String> {
    let stats = Arc::new(TransportStats::default());
    let mut dealer = DealerSocket::connect(endpoint, Limits::default(), stats)
        .await
        .map_err(|e| e.to_string())?;
    dealer
        .send(&[Bytes::new(), Bytes::copy_from_slice(&encode_seq(start))])
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    loop {
        let reply = dealer.recv().await.map_err(|e| e.to_string())?;
        let (seq, payload) = parse_replay_reply(&reply).map_err(|e| e.to_string())?;
        if seq == crate::wire::REPLAY_END_SEQ && payload.is_empty() {
            break;
        }
        bytes += payload.len();
        if out.len() >= MAX_REPLAY_BATCHES || bytes > MAX_REPLAY_BYTES {
            return Err(format!(
                "replay larger than {MAX_REPLAY_BATCHES} batches or {MAX_REPLAY_BYTES} bytes"
            ));
        }
        out.push((seq, payload));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_parse() {
        let t = "kv@10.0.0.5:8000@Qwen/Qwen3-32B";
        assert_eq!(topic_hostport(t), Some("10.0.0.5:8000"));
        assert_eq!(topic_host(t), Some("10.0.0.5"));
        assert_eq!(topic_model(t), Some("Qwen/Qwen3-32B"));
        assert_eq!(topic_host("kv@[::1]:80@m"), Some("::1"));
        assert_eq!(topic_hostport("garbage"), None);
        assert_eq!(endpoint_host("tcp://127.0.0.2:5557"), Some("127.0.0.2"));
    }
}
