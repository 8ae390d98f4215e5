//! A ZMQ PUB publisher for KV-cache events, with vLLM's replay ROUTER socket.
//!
//! Behaviour follows vLLM's `ZmqEventPublisher`:
//! * every [`EventBatch`] handed to [`KvEventPublisher::publish`] gets the next sequence number
//!   (starting at [`PublisherConfig::first_seq`], 0 like vLLM; llm-d's simulator starts at 1) and
//!   is sent as `[topic, seq (8 bytes BE), msgpack payload]`;
//! * the PUB socket binds when the endpoint contains `*` or `::` or is `ipc://`/`inproc://`,
//!   and connects otherwise (vLLM's heuristic; [`ConnectMode`] can force either). Binding to
//!   `tcp://*:port` listens on all interfaces; port 0 picks a free port, and
//!   [`KvEventPublisher::endpoint`] reports the one chosen;
//! * the last [`PublisherConfig::buffer_steps`] batches are kept; a client sending
//!   `[start_seq (8 bytes BE)]` (after the usual empty delimiter frame, as a DEALER or REQ does)
//!   to the replay ROUTER receives one `[seq, payload]` message per buffered batch with
//!   `seq >= start_seq`, then the end marker `[u64::MAX, empty]`.
//!
//! Publishing never blocks the caller: batches go through a bounded queue and are dropped (and
//! counted) when it is full. Encoding happens on the publisher task, off the caller's path.
//! Each subscriber connection has its own bounded queue ([`Limits::send_queue`] messages,
//! libzmq's HWM); a subscriber that does not keep up misses messages (counted in
//! [`TransportStats::hwm_drops`]) instead of growing memory. A connecting publisher re-dials
//! every second while the subscriber is unreachable or after it went away.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::wire::{EncodeOptions, EventBatch, REPLAY_END_SEQ, encode_batch, encode_seq};
use crate::zmtp::{Limits, PubSocket, RouterSocket, TransportStats};

/// Errors raised when starting the publisher.
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    /// The PUB or ROUTER socket could not bind.
    #[error("cannot bind KV-event socket to {endpoint}: {message}")]
    Bind {
        /// The endpoint that was tried.
        endpoint: String,
        /// The ZMQ error.
        message: String,
    },
    /// The endpoint is not a ZMQ endpoint this publisher supports.
    #[error("invalid KV-event endpoint {0:?} (expected tcp://host:port)")]
    Endpoint(String),
}

/// Whether the PUB socket binds or connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConnectMode {
    /// vLLM's heuristic: bind if the endpoint has `*` or `::` or is ipc/inproc, else connect.
    #[default]
    Auto,
    /// Always bind (listen); subscribers connect to us.
    Bind,
    /// Always connect (dial out to a subscriber that binds, as llm-d's simulator does).
    Connect,
}

impl std::str::FromStr for ConnectMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(ConnectMode::Auto),
            "bind" => Ok(ConnectMode::Bind),
            "connect" => Ok(ConnectMode::Connect),
            other => Err(format!(
                "unknown KV-event socket mode {other:?} (expected auto, bind or connect)"
            )),
        }
    }
}

/// Publisher settings.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// PUB endpoint, e.g. `tcp://*:5557` (bind) or `tcp://10.0.0.5:5557` (connect).
    pub endpoint: String,
    /// Bind or connect.
    pub mode: ConnectMode,
    /// Optional ROUTER endpoint for replay requests (always bound).
    pub replay_endpoint: Option<String>,
    /// Topic frame of every message.
    pub topic: String,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// Batches that may wait for the publisher task before new ones are dropped.
    pub queue_capacity: usize,
    /// Sequence number of the first batch.
    pub first_seq: u64,
    /// Payload encoding.
    pub encode: EncodeOptions,
    /// Transport limits of the PUB and replay sockets.
    pub limits: Limits,
}

impl PublisherConfig {
    /// vLLM's defaults for `endpoint`: replay off, 10,000 buffered batches, sequence from 0.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            mode: ConnectMode::Auto,
            replay_endpoint: None,
            topic: String::new(),
            buffer_steps: 10_000,
            queue_capacity: 100_000,
            first_seq: 0,
            encode: EncodeOptions::default(),
            limits: Limits::default(),
        }
    }

    fn binds(&self) -> bool {
        match self.mode {
            ConnectMode::Bind => true,
            ConnectMode::Connect => false,
            ConnectMode::Auto => {
                self.endpoint.contains('*')
                    || self.endpoint.contains("::")
                    || self.endpoint.starts_with("ipc://")
                    || self.endpoint.starts_with("inproc://")
            }
        }
    }
}

/// Counters of a running publisher.
#[derive(Debug, Default)]
pub struct PublisherStats {
    published: AtomicU64,
    dropped: AtomicU64,
    replays: AtomicU64,
    transport: Arc<TransportStats>,
}

impl PublisherStats {
    /// Batches sent on the PUB socket.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Batches dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Replay requests served.
    pub fn replays(&self) -> u64 {
        self.replays.load(Ordering::Relaxed)
    }

    /// Transport counters: subscribers' protocol errors, messages dropped for slow
    /// subscribers ([`TransportStats::hwm_drops`]).
    pub fn transport(&self) -> &Arc<TransportStats> {
        &self.transport
    }
}

type ReplayBuffer = Arc<Mutex<VecDeque<(u64, Bytes)>>>;

/// A running publisher. Dropping it stops publishing; [`KvEventPublisher::shutdown`] also
/// flushes the queue first.
pub struct KvEventPublisher {
    tx: Option<mpsc::Sender<EventBatch>>,
    endpoint: String,
    replay_endpoint: Option<String>,
    stats: Arc<PublisherStats>,
    pub_task: Option<JoinHandle<()>>,
    replay_task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for KvEventPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvEventPublisher")
            .field("endpoint", &self.endpoint)
            .field("replay_endpoint", &self.replay_endpoint)
            .finish()
    }
}

/// Delay between attempts to dial a subscriber (connect mode).
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

/// How long one replay request may take to send (a client that stops reading is dropped).
const REPLAY_SEND_TIMEOUT: Duration = Duration::from_secs(10);

impl KvEventPublisher {
    /// Starts the publisher. Binding happens here (so errors surface and port 0 is resolved);
    /// connecting happens in the background with retries, so a subscriber that is not up yet
    /// does not block the caller.
    pub async fn start(cfg: PublisherConfig) -> Result<Self, PublisherError> {
        if !cfg.endpoint.contains("://") {
            return Err(PublisherError::Endpoint(cfg.endpoint.clone()));
        }
        let binds = cfg.binds();
        let stats = Arc::new(PublisherStats::default());
        let mut pub_socket = PubSocket::new(cfg.limits.clone(), stats.transport.clone());
        let endpoint = if binds {
            pub_socket
                .bind(&cfg.endpoint)
                .await
                .map_err(|e| PublisherError::Bind {
                    endpoint: cfg.endpoint.clone(),
                    message: e.to_string(),
                })?
        } else {
            crate::zmtp::parse_endpoint(&cfg.endpoint)
                .map_err(|_| PublisherError::Endpoint(cfg.endpoint.clone()))?;
            pub_socket.connect(&cfg.endpoint, RECONNECT_INTERVAL);
            cfg.endpoint.clone()
        };

        let buffer: ReplayBuffer = Arc::new(Mutex::new(VecDeque::new()));

        let (replay_endpoint, replay_task) = match &cfg.replay_endpoint {
            Some(ep) => {
                let router = RouterSocket::bind(ep, cfg.limits.clone(), stats.transport.clone())
                    .await
                    .map_err(|e| PublisherError::Bind {
                        endpoint: ep.clone(),
                        message: e.to_string(),
                    })?;
                let bound = router.endpoint();
                let task = tokio::spawn(serve_replay(router, buffer.clone(), stats.clone()));
                (Some(bound), Some(task))
            }
            None => (None, None),
        };

        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let pub_task = tokio::spawn(run_publisher(pub_socket, rx, buffer, stats.clone(), cfg));
        tracing::info!(%endpoint, replay = ?replay_endpoint, bound = binds, "KV-event publisher started");
        Ok(Self {
            tx: Some(tx),
            endpoint,
            replay_endpoint,
            stats,
            pub_task: Some(pub_task),
            replay_task,
        })
    }

    /// Queues `batch` for publication; returns `false` if it was dropped (queue full or closed).
    pub fn publish(&self, batch: EventBatch) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        match tx.try_send(batch) {
            Ok(()) => true,
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// The PUB endpoint: the resolved bound address (port 0 replaced by the real port) when
    /// binding, the target when connecting.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bound replay ROUTER endpoint, if replay is enabled.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }

    /// Publication counters.
    pub fn stats(&self) -> &PublisherStats {
        &self.stats
    }

    /// Publishes what is queued, then closes the sockets.
    pub async fn shutdown(mut self) {
        self.tx = None;
        if let Some(task) = self.pub_task.take() {
            let _ = task.await;
        }
        if let Some(task) = self.replay_task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for KvEventPublisher {
    fn drop(&mut self) {
        if let Some(task) = &self.replay_task {
            task.abort();
        }
    }
}

async fn run_publisher(
    socket: PubSocket,
    mut rx: mpsc::Receiver<EventBatch>,
    buffer: ReplayBuffer,
    stats: Arc<PublisherStats>,
    cfg: PublisherConfig,
) {
    let topic = Bytes::from(cfg.topic.clone().into_bytes());
    let mut seq = cfg.first_seq;
    while let Some(batch) = rx.recv().await {
        let payload = Bytes::from(encode_batch(&batch, cfg.encode));
        let frames = [
            topic.clone(),
            Bytes::copy_from_slice(&encode_seq(seq)),
            payload.clone(),
        ];
        // Never blocks: subscribers whose queue is full miss it (counted), like libzmq.
        socket.send(&frames);
        stats.published.fetch_add(1, Ordering::Relaxed);
        {
            let mut buf = buffer.lock();
            buf.push_back((seq, payload));
            while buf.len() > cfg.buffer_steps {
                buf.pop_front();
            }
        }
        seq = seq.wrapping_add(1);
    }
    // Give the connections a moment to flush what was queued before the socket closes.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while socket.queued() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Closed before `shutdown` returns: a publisher started again on the same port binds.
    socket.close().await;
}

async fn serve_replay(mut router: RouterSocket, buffer: ReplayBuffer, stats: Arc<PublisherStats>) {
    loop {
        let frames = match router.recv().await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "KV-event replay socket closed");
                return;
            }
        };
        // [identity, empty, start_seq] from a DEALER/REQ; tolerate a missing delimiter.
        let (identity, delimited, start) = match frames.as_slice() {
            [id, empty, start] if empty.is_empty() => (id.clone(), true, start.clone()),
            [id, start] => (id.clone(), false, start.clone()),
            other => {
                tracing::warn!(frames = other.len(), "invalid KV-event replay request");
                continue;
            }
        };
        let Ok(start) = <[u8; 8]>::try_from(&start[..]).map(u64::from_be_bytes) else {
            tracing::warn!(len = start.len(), "invalid KV-event replay start sequence");
            continue;
        };
        stats.replays.fetch_add(1, Ordering::Relaxed);
        let batches: Vec<(u64, Bytes)> = buffer
            .lock()
            .iter()
            .filter(|(seq, _)| *seq >= start)
            .cloned()
            .collect();
        let reply = |seq: u64, payload: Bytes| {
            let mut f = vec![identity.clone()];
            if delimited {
                f.push(Bytes::new());
            }
            f.push(Bytes::copy_from_slice(&encode_seq(seq)));
            f.push(payload);
            f
        };
        let send_all = async {
            for (seq, payload) in batches.into_iter().chain([(REPLAY_END_SEQ, Bytes::new())]) {
                if let Err(e) = router.send(&reply(seq, payload)).await {
                    tracing::debug!(error = %e, "KV-event replay client went away");
                    return;
                }
            }
        };
        if tokio::time::timeout(REPLAY_SEND_TIMEOUT, send_all)
            .await
            .is_err()
        {
            tracing::warn!("KV-event replay client stopped reading; replay abandoned");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_bind_heuristic() {
        assert!(PublisherConfig::new("tcp://*:5557").binds());
        assert!(PublisherConfig::new("tcp://[::]:5557").binds());
        assert!(PublisherConfig::new("ipc:///tmp/kv").binds());
        assert!(!PublisherConfig::new("tcp://10.0.0.1:5557").binds());
        let mut forced = PublisherConfig::new("tcp://127.0.0.1:0");
        forced.mode = ConnectMode::Bind;
        assert!(forced.binds());
    }

    #[test]
    fn modes_parse() {
        assert_eq!("bind".parse::<ConnectMode>(), Ok(ConnectMode::Bind));
        assert!("sideways".parse::<ConnectMode>().is_err());
    }
}
