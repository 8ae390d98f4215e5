//! # llmsched-ha
//!
//! Replica state sync for the EPP: several `llmsched epp` replicas behind one gateway share
//! what only the replica that routed a request knows, so that each routes as one EPP that
//! saw every request would.
//!
//! What is shared (through [`llmsched_core::replica::ReplicatedState`], implemented by the
//! plugins that hold such state, and the endpoints' in-flight counters):
//!
//! * the approximate prefix index's inserts (a prompt's block hashes → the endpoint it was
//!   routed to);
//! * the precise index's speculative entries (begun at routing, ended at the first token);
//! * per-endpoint gauges: requests and tokens in flight (`active-request-scorer`,
//!   `token-load-scorer`), prefill tokens pending (`prefill-load-scorer`).
//!
//! How (the argument is in the repository's ARCHITECTURE.md):
//!
//! * **Deltas, batched.** Plugins push local changes into bounded lock-free buffers on the
//!   request path; a collector task drains them every `sync_interval` (10 ms), encodes one
//!   batch and offers it to every peer's queue (bounded in bytes; full → dropped and counted).
//!   A repeated insert (same endpoint, same blocks) is re-sent at most once a second.
//! * **Gauges as absolute values**, sent when they change and every heartbeat (1 s); the
//!   receiver sums the live peers' values.
//! * **Idempotent, safe to lose.** Applying a batch twice changes nothing; a lost batch is
//!   detected by its sequence number and repaired by pulling the sender's snapshot; a dead
//!   peer's gauges are dropped when its stream closes or it goes silent.
//! * **Snapshots** bootstrap a starting replica before it reports ready.
//! * **gRPC** (`proto/ha.proto`, messages written by hand) on its own port, TLS like the
//!   ext_proc port.

pub mod metrics;
pub mod proto;
mod server;
mod sync;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use llmsched_core::endpoint::EndpointSource;
use llmsched_core::replica::ReplicatedState;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use metrics::HaMetrics;
pub use sync::{Bootstrap, chunk_keys};
pub use tls::{ClientTls, ListenerLimits};

/// A plugin state with the name of its plugin instance.
#[derive(Clone)]
pub struct NamedState {
    /// The plugin's instance name (replicas exchange states of the same kind and name).
    pub name: String,
    /// The state.
    pub state: Arc<dyn ReplicatedState>,
}

impl std::fmt::Debug for NamedState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedState")
            .field("name", &self.name)
            .field("kind", &self.state.replica_kind())
            .finish()
    }
}

/// Where the sync finds the replicated states (re-read every tick, so a configuration
/// reload that swaps the plugins is followed).
pub trait StateSource: Send + Sync + 'static {
    /// The current states.
    fn states(&self) -> Vec<NamedState>;
}

/// A fixed list of states.
#[derive(Debug, Clone, Default)]
pub struct FixedStates(pub Vec<NamedState>);

impl StateSource for FixedStates {
    fn states(&self) -> Vec<NamedState> {
        self.0.clone()
    }
}

/// The peers to sync with: `host:port` addresses of their sync ports. A fixed list
/// (`--ha-peers`) or one that changes (Kubernetes discovery).
#[derive(Debug, Clone)]
pub struct PeerSet(watch::Receiver<Vec<String>>);

impl PeerSet {
    /// A fixed list.
    pub fn fixed(addrs: Vec<String>) -> Self {
        let (tx, rx) = watch::channel(addrs);
        // Keep the value forever: a dropped sender means "final".
        drop(tx);
        Self(rx)
    }

    /// A list its sender updates.
    pub fn dynamic(initial: Vec<String>) -> (Self, watch::Sender<Vec<String>>) {
        let (tx, rx) = watch::channel(initial);
        (Self(rx), tx)
    }

    /// The current addresses.
    pub fn current(&self) -> Vec<String> {
        self.0.borrow().clone()
    }
}

/// Settings of the sync.
#[derive(Debug, Clone)]
pub struct HaConfig {
    /// This replica's name (logs, peers' bookkeeping).
    pub replica_id: String,
    /// The pool routed: peers routing another pool are refused.
    pub pool: String,
    /// Collector period.
    pub sync_interval: Duration,
    /// Gauges are re-sent at least this often (and a peer silent for 3 heartbeats is
    /// considered gone).
    pub heartbeat: Duration,
    /// Bound on the start-up bootstrap.
    pub bootstrap_timeout: Duration,
    /// Dial and hello timeout.
    pub connect_timeout: Duration,
    /// Bytes queued per peer at most.
    pub max_peer_queue_bytes: usize,
    /// Local deltas buffered per state at most (between two collector ticks).
    pub buffer_deltas: usize,
    /// Keys in a snapshot at most.
    pub snapshot_max_keys: usize,
    /// How peers are dialled.
    pub client_tls: ClientTls,
    /// TLS of the sync port (`None`: plaintext).
    pub server_tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for HaConfig {
    fn default() -> Self {
        Self {
            replica_id: "llmsched-epp".into(),
            pool: "llmsched".into(),
            sync_interval: Duration::from_millis(10),
            heartbeat: Duration::from_secs(1),
            bootstrap_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            max_peer_queue_bytes: 16 << 20,
            buffer_deltas: 65_536,
            snapshot_max_keys: 4 << 20,
            client_tls: ClientTls::Plaintext,
            server_tls: None,
        }
    }
}

/// The sync could not start.
#[derive(Debug, thiserror::Error)]
pub enum HaError {
    /// The listener has no address.
    #[error("sync listener: {0}")]
    Listener(std::io::Error),
}

/// A running sync.
pub struct HaHandle {
    inner: Arc<sync::Inner>,
    peers: watch::Receiver<Vec<String>>,
    addr: std::net::SocketAddr,
    tasks: JoinSet<()>,
    ready: watch::Sender<bool>,
}

impl std::fmt::Debug for HaHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HaHandle")
            .field("replica_id", &self.inner.origin.replica_id)
            .field("addr", &self.addr)
            .finish()
    }
}

/// Starts the sync: serves the sync port on `listener`, dials the peers, runs the
/// collector. Call [`HaHandle::bootstrap`] next, before reporting ready.
pub fn start(
    config: HaConfig,
    listener: TcpListener,
    peers: PeerSet,
    states: Arc<dyn StateSource>,
    endpoints: Arc<dyn EndpointSource>,
    metrics: HaMetrics,
    cancel: CancellationToken,
) -> Result<HaHandle, HaError> {
    let addr = listener.local_addr().map_err(HaError::Listener)?;
    let origin = proto::Origin {
        replica_id: config.replica_id.clone(),
        incarnation: rand::random::<u64>() | 1,
        sync_port: u32::from(addr.port()),
    };
    let tls = config.server_tls.clone();
    // Record from now on (not from the collector's first tick): a decision made right after
    // start is shared too.
    for s in states.states() {
        s.state.start_recording(config.buffer_deltas);
    }
    let inner = Arc::new(sync::Inner::new(
        config, origin, states, endpoints, metrics, cancel,
    ));
    let mut tasks = JoinSet::new();
    {
        let (inner, shutdown) = (inner.clone(), inner.cancel.clone());
        tasks.spawn(async move {
            if let Err(e) = server::serve(listener, inner, tls, shutdown).await {
                tracing::error!(error = %e, "ha: sync server failed");
            }
        });
    }
    tasks.spawn(sync::collect_loop(inner.clone()));
    tasks.spawn(sync::maintenance_loop(inner.clone()));
    tasks.spawn(sync::peers_loop(inner.clone(), peers.0.clone()));
    let (ready, _) = watch::channel(false);
    tracing::info!(
        replica = %inner.origin.replica_id,
        addr = %addr,
        peers = ?peers.current(),
        "ha: replica sync started"
    );
    Ok(HaHandle {
        inner,
        peers: peers.0,
        addr,
        tasks,
        ready,
    })
}

impl HaHandle {
    /// The sync port's address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// This replica's id.
    pub fn replica_id(&self) -> &str {
        &self.inner.origin.replica_id
    }

    /// Waits until the endpoint set is known, then pulls a peer's snapshot (bounded by the
    /// configured bootstrap timeout), logs and counts the outcome, and marks the sync ready
    /// either way.
    pub async fn bootstrap(&self) -> Bootstrap {
        let outcome = self
            .inner
            .bootstrap(&self.peers, self.inner.cfg.bootstrap_timeout)
            .await;
        match &outcome {
            Bootstrap::Warm { from, keys } => {
                self.inner
                    .metrics
                    .bootstraps
                    .get_or_create(&metrics::Outcome { outcome: "warm" })
                    .inc();
                tracing::info!(peer = %from, keys, "ha: bootstrapped from a peer's snapshot (warm start)");
            }
            Bootstrap::Cold { reason } => {
                self.inner
                    .metrics
                    .bootstraps
                    .get_or_create(&metrics::Outcome { outcome: "cold" })
                    .inc();
                tracing::warn!(reason = %reason, timeout = ?self.inner.cfg.bootstrap_timeout, "ha: no peer snapshot; starting cold (this replica learns from its own decisions and its peers' from now on)");
            }
        }
        self.ready.send_replace(true);
        outcome
    }

    /// True once [`Self::bootstrap`] finished.
    pub fn is_bootstrapped(&self) -> bool {
        *self.ready.borrow()
    }

    /// A receiver that turns true once bootstrapped.
    pub fn bootstrapped(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Peers with an open push stream from this replica.
    pub fn connected_peers(&self) -> usize {
        self.inner.connected_peers()
    }

    /// Peer replicas with an open push stream to this replica.
    pub fn receiving_from(&self) -> usize {
        self.inner.remote_replicas()
    }

    /// The most bytes ever queued for one peer (bounded by `max_peer_queue_bytes`).
    pub fn peer_queue_high_water(&self) -> usize {
        self.inner
            .queue_high_water
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The metrics.
    pub fn metrics(&self) -> &HaMetrics {
        &self.inner.metrics
    }

    /// Runs one collector tick now (tests and benches; the collector task runs them on its
    /// own). Returns the encoded batch, if there was anything to send.
    pub fn collect_now(&self) -> Option<bytes::Bytes> {
        self.inner.collect_once(&mut sync::Collector::new())
    }

    /// Decodes and applies one encoded batch as if a peer had pushed it (benches and tests;
    /// peers' batches arrive through the sync port). Returns the keys applied.
    #[doc(hidden)]
    pub fn apply_encoded(&self, batch: &[u8]) -> Result<usize, String> {
        use prost::Message;
        let b = proto::SyncBatch::decode(batch).map_err(|e| e.to_string())?;
        self.inner
            .apply_batch(&b, &mut sync::Resolver::new(), sync::Source::Push)
            .map_err(|e| e.to_string())
    }

    /// Stops every task without waiting for them (peers see the streams close).
    pub fn stop(&self) {
        self.inner.cancel.cancel();
    }

    /// Stops every task.
    pub async fn shutdown(mut self) {
        self.inner.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

impl Drop for HaHandle {
    fn drop(&mut self) {
        self.inner.cancel.cancel();
    }
}
