//! Starting and stopping simulated replicas in-process.
//!
//! Every replica is its own HTTP server on its own address plus its own engine task; all share
//! the process's tokio runtime and one [`SimClock`]. A replica binds exactly the address it is
//! given, so replicas can sit on distinct loopback IPs (127.0.0.2, 127.0.0.3, …) as the
//! scheduler expects of separate pods; port 0 picks a free port ([`SimCluster::addrs`] reports
//! the real ones).
//!
//! The engines of a cluster run on one dedicated thread (`sim-engine`, a current-thread tokio
//! runtime) rather than on the runtime that serves HTTP: an engine does little work per step,
//! but its step timer must fire on time, and on the shared runtime it would queue behind the
//! thousands of connection tasks each step wakes. HTTP handlers and the engines talk through
//! channels.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use llmsched_kvevents::{KvEventPublisher, PublisherConfig};
use llmsched_tokenizer::{ChatTemplate, HfTokenizer, SimTokenizer, Tokenizer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::clock::SimClock;
use crate::config::{ClusterConfig, KvEventsConfig, ReplicaConfig, TokenizerChoice};
use crate::engine::{CacheSnapshot, Engine, EngineShared};
use crate::error::SimError;
use crate::metrics::Metrics;
use crate::pd::{EnginePd, HeldBlocks, KvGeometry, Puller, engine_id, serve_side_channel};
use crate::server::{ReplicaShared, Tokenizers, handle, snapshot};

/// Counters describing how a replica's simulation went.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaStats {
    /// Engine steps run.
    pub steps: u64,
    /// Mean wall-clock lateness of step ends, seconds.
    pub mean_step_lag_s: f64,
    /// Largest lateness, seconds.
    pub max_step_lag_s: f64,
    /// Re-synchronisations after falling > 50 ms behind.
    pub resyncs: u64,
    /// Running requests now.
    pub running: usize,
    /// Waiting requests now.
    pub waiting: usize,
    /// KV-cache usage now.
    pub kv_usage: f64,
    /// Tokens generated so far.
    pub generation_tokens: u64,
    /// Preemptions so far.
    pub preemptions: u64,
    /// Requests finished so far (any reason).
    pub finished: u64,
}

/// A running replica.
pub struct ReplicaHandle {
    addr: SocketAddr,
    shared: Arc<ReplicaShared>,
    kv_endpoint: Option<String>,
    kv_replay_endpoint: Option<String>,
    kv_topic: Option<String>,
    side_channel: Option<(SocketAddr, String)>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<()>,
    engine: JoinHandle<()>,
    side_channel_task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ReplicaHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaHandle")
            .field("addr", &self.addr)
            .field("kv_endpoint", &self.kv_endpoint)
            .finish()
    }
}

impl ReplicaHandle {
    /// The bound HTTP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The KV-event PUB endpoint (resolved when bound), if events are on.
    pub fn kv_events_endpoint(&self) -> Option<&str> {
        self.kv_endpoint.as_deref()
    }

    /// The replay ROUTER endpoint, if enabled.
    pub fn kv_events_replay_endpoint(&self) -> Option<&str> {
        self.kv_replay_endpoint.as_deref()
    }

    /// The topic of this replica's KV events.
    pub fn kv_events_topic(&self) -> Option<&str> {
        self.kv_topic.as_deref()
    }

    /// The NIXL side channel's bound address (what decoders read blocks from), when the
    /// connector is on.
    pub fn side_channel_addr(&self) -> Option<SocketAddr> {
        self.side_channel.as_ref().map(|(a, _)| *a)
    }

    /// The engine id advertised as `remote_engine_id`, when the connector is on.
    pub fn engine_id(&self) -> Option<&str> {
        self.side_channel.as_ref().map(|(_, id)| id.as_str())
    }

    /// The replica's configuration.
    pub fn config(&self) -> &ReplicaConfig {
        &self.shared.cfg
    }

    /// Simulation counters.
    pub fn stats(&self) -> ReplicaStats {
        let m = self.shared.engine.metrics.lock();
        ReplicaStats {
            steps: m.steps,
            mean_step_lag_s: m.step_lag.mean(),
            max_step_lag_s: m.lag_max,
            resyncs: m.resyncs,
            running: m.running,
            waiting: m.waiting,
            kv_usage: m.kv_usage,
            generation_tokens: m.generation_tokens,
            preemptions: m.preemptions,
            finished: m.success.iter().sum(),
        }
    }

    /// A copy of the replica's metrics state.
    pub fn metrics(&self) -> Metrics {
        self.shared.engine.metrics.lock().clone()
    }

    /// The KV cache's contents (asks the engine; `None` if it has stopped).
    pub async fn cache_snapshot(&self) -> Option<CacheSnapshot> {
        snapshot(&self.shared).await
    }

    /// Stops the server and the engine (in-flight requests are aborted).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.server.await;
        let _ = self.engine.await;
        if let Some(t) = self.side_channel_task {
            let _ = t.await;
        }
    }
}

/// The thread all engines of a cluster run on.
#[derive(Debug)]
struct EngineThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EngineThread {
    fn start() -> Result<Self, SimError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sim-engine".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stop_rx.await;
                });
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

/// A set of replicas running in this process.
#[derive(Debug)]
pub struct SimCluster {
    replicas: Vec<ReplicaHandle>,
    clock: SimClock,
    engines: EngineThread,
}

/// The prompt tokenizer, the vocabulary of generated words, and the chat template: the
/// simulator's format with the word-per-token tokenizer; with a Hugging Face tokenizer, the
/// `chat_template` of the `tokenizer_config.json` next to it when there is one.
fn build_tokenizer(cfg: &ReplicaConfig) -> Result<Tokenizers, SimError> {
    match &cfg.tokenizer {
        TokenizerChoice::Sim { vocab_size } => {
            let t = SimTokenizer::new(*vocab_size);
            Ok(Tokenizers {
                prompt: Arc::new(t),
                words: t,
                chat: Arc::new(ChatTemplate::sim()),
            })
        }
        TokenizerChoice::HuggingFace(path) => {
            let tokenizer = HfTokenizer::from_path(path)?;
            let dir = if path.is_dir() {
                Some(path.as_path())
            } else {
                path.parent()
            };
            let config = dir.map(|d| d.join("tokenizer_config.json"));
            let template = match config.filter(|c| c.is_file()) {
                Some(c) => ChatTemplate::from_tokenizer_config(&c)?.unwrap_or_else(|| {
                    tracing::info!(config = %c.display(), "no chat_template; using the simulator's chat format");
                    ChatTemplate::sim()
                }),
                None => ChatTemplate::sim(),
            };
            Ok(Tokenizers {
                prompt: Arc::new(tokenizer),
                words: SimTokenizer::default(),
                chat: Arc::new(template),
            })
        }
    }
}

impl SimCluster {
    /// Starts one replica per address in `cfg.addrs`.
    pub async fn start(cfg: ClusterConfig) -> Result<Self, SimError> {
        cfg.replica.validate()?;
        if cfg.addrs.is_empty() {
            return Err(SimError::Config("no replica addresses given".into()));
        }
        let clock = SimClock::new(cfg.replica.time_scale);
        let replica = Arc::new(cfg.replica.clone());
        let text = build_tokenizer(&replica)?;
        let engines = EngineThread::start()?;
        let parts = ReplicaParts {
            cfg: replica.clone(),
            clock,
            text,
            kv: cfg.kv_events.as_ref(),
            engine_rt: &engines.handle,
        };
        let mut replicas = Vec::with_capacity(cfg.addrs.len());
        for (i, addr) in cfg.addrs.iter().enumerate() {
            match start_replica(i, *addr, &parts).await {
                Ok(r) => replicas.push(r),
                Err(e) => {
                    for r in replicas {
                        r.shutdown().await;
                    }
                    engines.stop().await;
                    return Err(e);
                }
            }
        }
        Ok(Self {
            replicas,
            clock,
            engines,
        })
    }

    /// The bound addresses, in configuration order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.replicas.iter().map(ReplicaHandle::addr).collect()
    }

    /// The replicas.
    pub fn replicas(&self) -> &[ReplicaHandle] {
        &self.replicas
    }

    /// The shared simulated clock.
    pub fn clock(&self) -> SimClock {
        self.clock
    }

    /// Stops every replica.
    pub async fn shutdown(self) {
        for r in self.replicas {
            r.shutdown().await;
        }
        self.engines.stop().await;
    }
}

/// What every replica of a cluster shares.
struct ReplicaParts<'a> {
    cfg: Arc<ReplicaConfig>,
    clock: SimClock,
    text: Tokenizers,
    kv: Option<&'a KvEventsConfig>,
    engine_rt: &'a tokio::runtime::Handle,
}

async fn start_replica(
    index: usize,
    addr: SocketAddr,
    parts: &ReplicaParts<'_>,
) -> Result<ReplicaHandle, SimError> {
    let ReplicaParts {
        cfg,
        clock,
        text,
        kv,
        engine_rt,
    } = parts;
    let (cfg, clock, kv) = (cfg.clone(), *clock, *kv);
    let (text, words) = (text.clone(), text.words);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| SimError::Bind { addr, source })?;
    let addr = listener.local_addr()?;

    let (publisher, kv_topic) = match kv {
        Some(k) => {
            let topic = k.topic_for(addr, &cfg.model);
            let mut pc =
                PublisherConfig::new(if k.mode == llmsched_kvevents::ConnectMode::Connect {
                    k.endpoint.clone()
                } else {
                    KvEventsConfig::offset_endpoint(&k.endpoint, index)?
                });
            pc.mode = k.mode;
            pc.replay_endpoint = k
                .replay_endpoint
                .as_deref()
                .map(|e| KvEventsConfig::offset_endpoint(e, index))
                .transpose()?;
            pc.topic = topic.clone();
            pc.encode = k.encode;
            pc.buffer_steps = k.buffer_steps;
            pc.first_seq = k.first_seq;
            (Some(KvEventPublisher::start(pc).await?), Some(topic))
        }
        None => (None, None),
    };
    let kv_endpoint = publisher.as_ref().map(|p| p.endpoint().to_string());
    let kv_replay_endpoint = publisher
        .as_ref()
        .and_then(|p| p.replay_endpoint().map(str::to_string));

    let engine_shared = Arc::new(EngineShared {
        queued: Default::default(),
        metrics: parking_lot::Mutex::new(Metrics::new(cfg.max_model_len)),
    });
    let (engine_tx, engine_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(
        ReplicaShared::new(
            cfg.clone(),
            clock,
            engine_tx,
            engine_shared.clone(),
            text,
            addr,
        )
        .map_err(|e| SimError::Config(e.message))?,
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (pd, side_channel, side_listener) = if cfg.pd.connector {
        // vLLM's NIXL side channel: VLLM_NIXL_SIDE_CHANNEL_HOST / _PORT (+ rank).
        let host = cfg.pd.side_channel_host.unwrap_or(addr.ip());
        let port = if cfg.pd.side_channel_port == 0 {
            0
        } else {
            u16::try_from(usize::from(cfg.pd.side_channel_port) + index).map_err(|_| {
                SimError::Config(format!(
                    "side-channel port {} + {index} overflows",
                    cfg.pd.side_channel_port
                ))
            })?
        };
        let bind = SocketAddr::new(host, port);
        let side = TcpListener::bind(bind)
            .await
            .map_err(|source| SimError::Bind { addr: bind, source })?;
        let side_addr = side.local_addr()?;
        let advertised = if host.is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host
        };
        let id = engine_id(addr, &cfg.model);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let layers = KvGeometry::for_profile(&cfg.profile).map_or(32, |g| g.layers);
        let puller = Puller::new(
            tokio::runtime::Handle::current(),
            clock,
            cfg.pd.transfer,
            layers,
            done_tx,
            engine_shared.clone(),
        );
        let pd = EnginePd {
            cfg: cfg.pd.clone(),
            engine_id: id.clone(),
            side_host: advertised.to_string(),
            side_port: side_addr.port(),
            held: HeldBlocks::default(),
            puller,
            done_rx,
        };
        (Some(pd), Some((side_addr, id)), Some(side))
    } else {
        (None, None, None)
    };
    let side_channel_task = side_listener.map(|l| {
        tokio::spawn(serve_side_channel(
            l,
            shared.engine_tx.clone(),
            shutdown_rx.clone(),
        ))
    });
    let engine = Engine::new(
        cfg.clone(),
        clock,
        words.vocab_size(),
        engine_rx,
        engine_shared,
        publisher,
        pd,
    );
    let engine_task = engine_rt.spawn(engine.run(shutdown_rx.clone()));
    let server_task = tokio::spawn(serve(listener, shared.clone(), shutdown_rx));
    tracing::info!(%addr, model = %cfg.model, kv_events = ?kv_endpoint, role = %cfg.pd.role, side_channel = ?side_channel.as_ref().map(|s| s.0), "simulated vLLM replica started");
    Ok(ReplicaHandle {
        addr,
        shared,
        kv_endpoint,
        kv_replay_endpoint,
        kv_topic,
        side_channel,
        shutdown: shutdown_tx,
        server: server_task,
        engine: engine_task,
        side_channel_task,
    })
}

async fn serve(
    listener: TcpListener,
    shared: Arc<ReplicaShared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| handle(shared.clone(), req));
                    let builder = auto::Builder::new(TokioExecutor::new());
                    if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
                while conns.try_join_next().is_some() {}
            }
            _ = shutdown.changed() => break,
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}
