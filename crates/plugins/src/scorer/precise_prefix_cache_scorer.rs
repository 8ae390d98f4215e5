//! `precise-prefix-cache-scorer`: prefers endpoints whose KV cache really holds the longest
//! prefix of the prompt, as the engines report it in their KV-cache events.
//!
//! ## Formula
//!
//! ```text
//! keys      = request block keys of the prompt's tokens (blockSize tokens per block)
//! held(e)   = the longest run k₀ … k_{m-1} of leading keys endpoint e holds (m = 0 if none)
//! score(e)  = Σ_{i<m} w(e, kᵢ) / |keys|        ∈ [0, 1]
//! w(e, k)   = weight of the best tier e holds k in: GPU 1.0, CPU 0.8 (kvCacheBackendConfigs);
//!             speculative entries (see below) count 1.0
//! ```
//!
//! 0 for every endpoint when the prompt has no full block (or could not be tokenized).
//!
//! ## Where the data comes from
//!
//! * **Tokens.** The prompt is tokenized as the engine will: chat `messages` are rendered
//!   with the chat template first (`add_generation_prompt = true`), completions prompts are
//!   taken as they are (the first of a list of strings; token-id prompts directly). The
//!   default tokenizer is the simulator's (`llmsched_tokenizer::SimTokenizer`) so the stack
//!   works without model files; `tokenizerPath` (a `tokenizer.json` or a directory holding
//!   one, plus `tokenizer_config.json` for the chat template) selects a Hugging Face
//!   tokenizer. Nothing is ever downloaded. Recent prompt prefixes are cached
//!   (`llmsched_tokenizer::PrefixTokenCache`) so repeated prefixes are not re-tokenized.
//! * **Keys.** `llmsched_kvindex::BlockKeyer` chains xxh3 over blocks of `blockSize` token
//!   ids, rooted at `hashSeed` and the request's target model (see `llmsched_kvindex::precise`).
//! * **Index.** `llmsched_kvindex::PreciseIndex`, fed by `BlockStored` / `BlockRemoved` /
//!   `AllBlocksCleared` events received by `llmsched_kvevents::KvEventSubscriber`: engine
//!   hashes are mapped to request keys as the events arrive (chaining from the parent).
//!   Events of a topic `kv@<ip>:<port>@<model>` belong to the endpoint `<ip>:<port>` (for a
//!   data-parallel rank `r > 0`, the endpoint `<ip>:<port + r>` when there is one): the
//!   topic names the publisher, whichever socket brought the message. Only when the topic
//!   names no endpoint of the pool are the events credited to the dialled address
//!   (`discoverPods`), and then only if exactly one endpoint lives there.
//! * **Speculation** (`speculativeIndexing`, default on). After the pick (pre-request hook)
//!   the request's keys are recorded for the chosen endpoint (and the prefill endpoint, if
//!   any) as speculative entries tied to the request: they count for that endpoint while the
//!   request waits in the engine's queue and is prefilled — however long that takes —, so
//!   the requests that share its prefix follow it instead of copying the prefix elsewhere.
//!   When the request's first token arrives (the engine has computed and reported its blocks)
//!   or the request ends, the entries end: those an event confirmed stay as confirmed
//!   entries, the others get `speculativeTTL` (default 2 s) for their confirming event, then
//!   expire. A `BlockRemoved` applies at once to confirmed entries; while the request is still
//!   queued its entry stays (the engine will recompute the block). `speculativeMaxLifetime`
//!   (default 10 min) bounds a request whose end is never seen. See
//!   `llmsched_kvindex::precise` for the exact lifecycle. (The reference expires speculative
//!   entries `speculativeTTL` after the routing decision; under load, requests wait in the
//!   engines' queues longer than that and their followers scattered.)
//! * **Endpoints leaving** are removed from the index (and their socket closed in
//!   `discoverPods` mode). With `discoverPods`, each distinct address
//!   `tcp://<endpoint ip>:<socketPort>` is dialled once, however many endpoints share it
//!   (several engines on one host publish each under its own topic).
//!
//! ## Parameters (reference structure; unknown names are an error)
//!
//! ```yaml
//! - type: precise-prefix-cache-scorer
//!   parameters:
//!     tokenProcessorConfig: { blockSize: 16, hashSeed: "" }      # also accepted inside indexerConfig
//!     indexerConfig:
//!       kvBlockIndexConfig:
//!         inMemoryConfig: { size: 100000000, podCacheSize: 10 }  # keys bound, endpoints per key
//!         enableMetrics: true                                    # accepted; metrics are always on
//!       kvCacheBackendConfigs: [{name: gpu, weight: 1.0}, {name: cpu, weight: 0.8}]
//!       tokenizersPoolConfig: { modelName: "" }                  # base model when topics carry none
//!     kvEventsConfig:
//!       zmqEndpoint: "tcp://*:5557"    # central mode: bind here, engines dial in
//!       topicFilter: "kv@"
//!       concurrency: 4                 # event workers
//!       discoverPods: false            # true: dial tcp://<endpoint ip>:<socketPort> per endpoint
//!       podDiscoveryConfig: { socketPort: 5557 }
//!       replayPort: 0                  # llmsched: publishers' replay ROUTER port (0 = off)
//!     # llmsched extensions:
//!     tokenizerPath: /models/qwen      # tokenizer.json file or directory (default: simulator)
//!     speculativeIndexing: true
//!     speculativeTTL: 2s              # grace after the request's first token / end
//!     speculativeMaxLifetime: 10m     # llmsched: bound on a pending request's entries
//! ```
//!
//! Other reference fields (`prefixStoreConfig`, `tokenizersPoolConfig.{workersCount,
//! minPrefixOverlapRatio, hf, local, uds}`, `kvBlockIndexConfig.metricsLoggingInterval`) are
//! accepted and ignored. Engines should publish with the same block size (vLLM: 16).
//!
//! ## Metrics
//!
//! The shared prefix-indexer gauges (`inference_extension_prefix_indexer_size` = entries,
//! `llmsched_prefix_indexer_memory_bytes` = index memory) are refreshed every second, and
//! [`PreciseMetrics`] counts messages, malformed messages, gaps, replays, restarts and events
//! of unknown endpoints.
//!
//! With the decision log on (see [`crate::prefix::decisions`]), each request's belief and
//! the engine's reported cached tokens are logged when its response completes.
//!
//! Category: affinity. A lookup takes each index shard's read lock at most once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use llmsched_core::Plugin;
use llmsched_core::cycle::{CycleState, PrefixCacheMatch};
use llmsched_core::endpoint::{Endpoint, EndpointId, EndpointSource};
use llmsched_core::metrics::PrefixIndexerMetrics;
use llmsched_core::plugin::{
    Candidate, DataProducer, EndpointListener, PreRequest, ResponseHooks, SchedulingContext,
    Scorer, ScorerCategory,
};
use llmsched_core::registry::{FactoryInput, PluginError};
use llmsched_core::replica::{DeltaOp, LocalDelta, Recorder, RemoteDelta, ReplicatedState};
use llmsched_core::request::{InferenceRequest, Prompt, ResponseInfo};
use llmsched_core::scheduler::SchedulingResult;
use llmsched_kvevents::subscriber::{topic_hostport, topic_model};
use llmsched_kvevents::{
    EventBatch, EventSink, KvEvent, KvEventSubscriber, Source, SubscriberConfig, SubscriberStats,
};
use llmsched_kvindex::{
    EndpointKey, PreciseIndex, PreciseIndexConfig, PreciseMatches, StoredBlocks,
};
use llmsched_tokenizer::{
    ChatTemplate, HfTokenizer, PrefixTokenCache, PrefixTokenCacheConfig, SimTokenizer, Tokenizer,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry as PromRegistry;
use smallvec::SmallVec;

use crate::common::{impl_plugin, invalid, opt_go_duration, params};
use crate::prefix::decisions::{self, Decision, DecisionLog};

/// Type name.
pub const TYPE: &str = "precise-prefix-cache-scorer";

/// `tokenProcessorConfig`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TokenProcessorConfig {
    /// Tokens per block (default 16, vLLM's).
    pub block_size: u32,
    /// Seed of the key chain (default "").
    pub hash_seed: String,
}

impl Default for TokenProcessorConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            hash_seed: String::new(),
        }
    }
}

/// `indexerConfig.kvBlockIndexConfig.inMemoryConfig`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct InMemoryConfig {
    /// Bound on distinct keys.
    pub size: usize,
    /// Bound on endpoints per key.
    pub pod_cache_size: usize,
}

impl Default for InMemoryConfig {
    fn default() -> Self {
        let d = PreciseIndexConfig::default();
        Self {
            size: d.max_keys,
            pod_cache_size: d.max_holders_per_key,
        }
    }
}

/// `indexerConfig.kvBlockIndexConfig`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct KvBlockIndexConfig {
    /// Index bounds.
    pub in_memory_config: InMemoryConfig,
    /// Accepted (metrics are always on).
    pub enable_metrics: Option<bool>,
    /// Accepted and ignored.
    pub metrics_logging_interval: Option<serde_json::Value>,
}

/// One `indexerConfig.kvCacheBackendConfigs` entry: a storage tier and its weight.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendConfig {
    /// Medium name as the engine reports it (`gpu`, `cpu`; case-insensitive).
    pub name: String,
    /// Weight in [0, 1].
    pub weight: f64,
}

/// `indexerConfig.tokenizersPoolConfig` (only `modelName` is used).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct TokenizersPoolConfig {
    /// Base model name, used for events whose topic names no model.
    pub model_name: Option<String>,
    /// Accepted and ignored.
    pub workers_count: Option<u32>,
    /// Accepted and ignored.
    pub min_prefix_overlap_ratio: Option<f64>,
    /// Accepted and ignored (no downloads).
    pub hf: Option<serde_json::Value>,
    /// Accepted and ignored (use `tokenizerPath`).
    pub local: Option<serde_json::Value>,
    /// Accepted and ignored.
    pub uds: Option<serde_json::Value>,
}

/// `indexerConfig`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct IndexerConfig {
    /// Older layout of `tokenProcessorConfig`.
    pub token_processor_config: Option<TokenProcessorConfig>,
    /// Index bounds.
    pub kv_block_index_config: KvBlockIndexConfig,
    /// Storage tiers (default gpu 1.0, cpu 0.8).
    pub kv_cache_backend_configs: Option<Vec<BackendConfig>>,
    /// Tokenizer pool settings.
    pub tokenizers_pool_config: TokenizersPoolConfig,
    /// Accepted and ignored (the prefix token cache has its own defaults).
    pub prefix_store_config: Option<serde_json::Value>,
}

/// `kvEventsConfig.podDiscoveryConfig`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct PodDiscoveryConfig {
    /// The engines' PUB port (vLLM default 5557).
    pub socket_port: u16,
}

impl Default for PodDiscoveryConfig {
    fn default() -> Self {
        Self { socket_port: 5557 }
    }
}

/// `kvEventsConfig`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct KvEventsConfig {
    /// Central SUB endpoint to bind (default `tcp://*:5557`).
    pub zmq_endpoint: String,
    /// Topic prefix (default `kv@`).
    pub topic_filter: String,
    /// Event workers (default 4).
    pub concurrency: usize,
    /// Dial every endpoint instead of binding.
    pub discover_pods: bool,
    /// Per-endpoint dialling settings.
    pub pod_discovery_config: PodDiscoveryConfig,
    /// llmsched: the publishers' replay port (0 = no replay).
    pub replay_port: u16,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self {
            zmq_endpoint: "tcp://*:5557".into(),
            topic_filter: "kv@".into(),
            concurrency: 4,
            discover_pods: false,
            pod_discovery_config: PodDiscoveryConfig::default(),
            replay_port: 0,
        }
    }
}

/// Parameters of the scorer.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Params {
    /// Block size and hash seed.
    pub token_processor_config: Option<TokenProcessorConfig>,
    /// Index settings.
    pub indexer_config: IndexerConfig,
    /// Event ingestion.
    pub kv_events_config: KvEventsConfig,
    /// llmsched: a local `tokenizer.json` (file or directory); default: the simulator's.
    pub tokenizer_path: Option<String>,
    /// llmsched: write speculative entries at routing time (default true).
    pub speculative_indexing: bool,
    /// Grace of speculative entries after their request's first token or end (default 2s).
    #[serde(rename = "speculativeTTL", deserialize_with = "opt_go_duration")]
    pub speculative_ttl: Option<Duration>,
    /// llmsched: longest life of a request's speculative entries (default 10m).
    #[serde(deserialize_with = "opt_go_duration")]
    pub speculative_max_lifetime: Option<Duration>,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            token_processor_config: None,
            indexer_config: IndexerConfig::default(),
            kv_events_config: KvEventsConfig::default(),
            tokenizer_path: None,
            speculative_indexing: true,
            speculative_ttl: None,
            speculative_max_lifetime: None,
        }
    }
}

/// Counters of the KV-event ingestion, exported as Prometheus metrics.
#[derive(Debug, Clone, Default)]
pub struct PreciseMetrics {
    /// `llmsched_kv_events_messages_total`.
    pub messages: Counter,
    /// `llmsched_kv_events_malformed_total`.
    pub malformed: Counter,
    /// `llmsched_kv_events_gaps_total`.
    pub gaps: Counter,
    /// `llmsched_kv_events_missed_total`.
    pub missed: Counter,
    /// `llmsched_kv_events_replayed_total`.
    pub replayed: Counter,
    /// `llmsched_kv_events_publisher_restarts_total`.
    pub restarts: Counter,
    /// `llmsched_kv_events_events_total`.
    pub events: Counter,
    /// `llmsched_kv_events_unknown_endpoint_total`: batches for endpoints not in the pool.
    pub unknown_endpoint: Counter,
    /// `llmsched_kv_events_dropped_blocks_total`: `BlockStored` events dropped (unknown
    /// parent or inconsistent).
    pub dropped_stores: Counter,
    /// `llmsched_kv_events_transport_errors_total{reason}`: KV-event connections closed for a
    /// ZMTP protocol violation or limit (`frame_too_large`, `handshake_timeout`, ...; see
    /// `llmsched_kvevents::zmtp::ErrorReason`).
    pub transport_errors: Family<[(&'static str, &'static str); 1], Counter>,
}

impl PreciseMetrics {
    /// Creates and registers the counters.
    pub fn register(registry: &mut PromRegistry) -> Self {
        let m = Self::default();
        let reg = |r: &mut PromRegistry, name: &str, help: &str, c: &Counter| {
            r.register(name, help, c.clone());
        };
        reg(
            registry,
            "llmsched_kv_events_messages",
            "KV-event messages received",
            &m.messages,
        );
        reg(
            registry,
            "llmsched_kv_events_malformed",
            "Malformed KV-event messages skipped",
            &m.malformed,
        );
        reg(
            registry,
            "llmsched_kv_events_gaps",
            "KV-event sequence gaps detected",
            &m.gaps,
        );
        reg(
            registry,
            "llmsched_kv_events_missed",
            "KV-event batches lost and not recovered",
            &m.missed,
        );
        reg(
            registry,
            "llmsched_kv_events_replayed",
            "KV-event batches recovered by replay",
            &m.replayed,
        );
        reg(
            registry,
            "llmsched_kv_events_publisher_restarts",
            "KV-event publisher restarts detected",
            &m.restarts,
        );
        reg(
            registry,
            "llmsched_kv_events_events",
            "KV events applied to the precise index",
            &m.events,
        );
        reg(
            registry,
            "llmsched_kv_events_unknown_endpoint",
            "KV-event batches of endpoints not in the pool",
            &m.unknown_endpoint,
        );
        reg(
            registry,
            "llmsched_kv_events_dropped_blocks",
            "BlockStored events dropped (unknown parent or inconsistent)",
            &m.dropped_stores,
        );
        registry.register(
            "llmsched_kv_events_transport_errors",
            "KV-event connections closed for a ZMTP protocol violation or limit, by reason",
            m.transport_errors.clone(),
        );
        // Every reason from the start, at 0, so the series exist before the first error.
        for r in llmsched_kvevents::zmtp::ErrorReason::ALL {
            let _ = m.transport_errors.get_or_create(&[("reason", r.label())]);
        }
        m
    }
}

/// Applies events to the index; shared by the subscriber and the scorer.
struct IndexSink {
    index: Arc<PreciseIndex>,
    endpoints: Option<Arc<dyn EndpointSource>>,
    /// `discoverPods`: dialled address → `<ip>:<port>` of the endpoints living there.
    dialled: parking_lot::RwLock<HashMap<String, Vec<String>>>,
    default_model: String,
    unknown_endpoint: AtomicU64,
    dropped_stores: AtomicU64,
}

impl IndexSink {
    /// The endpoint a batch belongs to: the topic's `<host>:<port>` (shifted by a
    /// data-parallel rank) when it is in the pool, else the dialled peer's endpoint when it
    /// is the only one at that address.
    fn resolve(&self, source: &Source<'_>) -> Option<u32> {
        let endpoints = self.endpoints.as_ref()?;
        let snap = endpoints.snapshot();
        let find = |hostport: &str| {
            if let Some(rank) = source.data_parallel_rank.filter(|&r| r > 0)
                && let Some((host, port)) = hostport.rsplit_once(':')
                && let Ok(port) = port.parse::<i64>()
                && let Some(e) = snap.by_hostport(&format!("{host}:{}", port + rank))
            {
                return Some(e.id().0);
            }
            snap.by_hostport(hostport).map(|e| e.id().0)
        };
        if let Some(ep) = topic_hostport(source.topic).and_then(find) {
            return Some(ep);
        }
        let peer = source.peer?;
        let dialled = self.dialled.read();
        match dialled.get(peer).map(Vec::as_slice) {
            Some([only]) => find(only),
            _ => None,
        }
    }
}

impl EventSink for IndexSink {
    fn apply(&self, source: &Source<'_>, batch: &EventBatch) {
        let Some(ep) = self.resolve(source) else {
            self.unknown_endpoint.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let model = topic_model(source.topic)
            .filter(|m| !m.is_empty())
            .unwrap_or(&self.default_model);
        for ev in &batch.events {
            match ev {
                KvEvent::BlockStored(s) => {
                    let out = self.index.block_stored(
                        ep,
                        &StoredBlocks {
                            engine_hashes: &s.block_hashes,
                            parent: s.parent_block_hash,
                            tokens: &s.token_ids,
                            engine_block_size: s.block_size,
                            model,
                            lora_name: s.lora_name.as_deref(),
                            medium: s.medium.as_deref(),
                        },
                    );
                    if !matches!(out, llmsched_kvindex::StoreOutcome::Stored(_)) {
                        self.dropped_stores.fetch_add(1, Ordering::Relaxed);
                    }
                }
                KvEvent::BlockRemoved(r) => {
                    self.index
                        .block_removed(ep, &r.block_hashes, r.medium.as_deref());
                }
                KvEvent::AllBlocksCleared => {
                    self.index.clear_endpoint(ep);
                }
                KvEvent::Unknown { .. } => {}
            }
        }
    }

    fn reset(&self, source: &Source<'_>) {
        if let Some(ep) = self.resolve(source) {
            self.index.clear_endpoint(ep);
        }
    }
}

/// Tokenizer, chat template and prefix token cache.
struct Tokenization {
    tokenizer: Box<dyn Tokenizer>,
    chat: ChatTemplate,
    cache: PrefixTokenCache,
}

impl Tokenization {
    fn load(path: Option<&str>) -> Result<Self, PluginError> {
        let (tokenizer, chat): (Box<dyn Tokenizer>, ChatTemplate) = match path {
            None => (Box::new(SimTokenizer::default()), ChatTemplate::sim()),
            Some(p) => {
                let p = std::path::Path::new(p);
                let tok = HfTokenizer::from_path(p)
                    .map_err(|e| PluginError::Parameters(format!("tokenizerPath: {e}")))?;
                let dir = if p.is_dir() {
                    p.to_path_buf()
                } else {
                    p.parent().map(|d| d.to_path_buf()).unwrap_or_default()
                };
                let cfg = dir.join("tokenizer_config.json");
                let chat = if cfg.exists() {
                    ChatTemplate::from_tokenizer_config(&cfg)
                        .map_err(|e| PluginError::Parameters(format!("tokenizerPath: {e}")))?
                        .unwrap_or_default()
                } else {
                    ChatTemplate::sim()
                };
                (Box::new(tok), chat)
            }
        };
        let cache = PrefixTokenCache::new(PrefixTokenCacheConfig::default(), tokenizer.name());
        Ok(Self {
            tokenizer,
            chat,
            cache,
        })
    }

    /// The prompt's token ids as the engine will see them (`None` without a prompt).
    fn tokens(&self, prompt: &Prompt, out: &mut Vec<u32>) -> Option<()> {
        match prompt {
            Prompt::None => None,
            Prompt::TokenIds(ids) => {
                out.extend_from_slice(ids);
                Some(())
            }
            Prompt::Text(s) => self.cache.encode(self.tokenizer.as_ref(), s, out).ok(),
            Prompt::Strings(v) => {
                let s = v.first()?;
                self.cache.encode(self.tokenizer.as_ref(), s, out).ok()
            }
            Prompt::Chat { messages, .. } => {
                let text = self
                    .chat
                    .render(
                        messages
                            .iter()
                            .map(|m| (m.role.as_str(), m.content.as_str())),
                        true,
                    )
                    .ok()?;
                self.cache.encode(self.tokenizer.as_ref(), &text, out).ok()
            }
        }
    }
}

/// The scorer's per-request output in the cycle.
#[derive(Debug, Clone, Default)]
pub struct PreciseState {
    /// Which scorer instance wrote it.
    pub owner: usize,
    /// The request's block keys.
    pub keys: Vec<u64>,
    /// Tier-weighted matched blocks per endpoint.
    pub matches: PreciseMatches,
    /// The prompt's tokens.
    pub prompt_tokens: u64,
    /// Per candidate with any: the estimated prompt tokens still to prefill of this EPP's
    /// requests on it that have not produced their first token (see
    /// `prefill-load-scorer`).
    pub pending_prefill: SmallVec<[(EndpointKey, u64); 8]>,
    /// Tokens per block of the keys.
    pub block_size: u32,
}

impl PreciseState {
    /// Prompt tokens `ep` would have to prefill: the prompt minus the blocks it holds.
    pub fn uncached_tokens(&self, ep: EndpointKey) -> u64 {
        let held = self
            .matches
            .iter()
            .find(|m| m.endpoint == ep)
            .map_or(0, |m| u64::from(m.blocks));
        self.prompt_tokens
            .saturating_sub(held * u64::from(self.block_size))
    }

    /// Pending prefill tokens on `ep`.
    pub fn pending_prefill(&self, ep: EndpointKey) -> u64 {
        self.pending_prefill
            .iter()
            .find(|(e, _)| *e == ep)
            .map_or(0, |(_, w)| *w)
    }
}

struct Inner {
    index: Arc<PreciseIndex>,
    sink: Arc<IndexSink>,
    tokenization: Tokenization,
    subscriber: Option<KvEventSubscriber>,
    discover_pods: bool,
    socket_port: u16,
    speculation: Option<Speculation>,
    /// Requests routed and not yet at their first token, by request id.
    inflight: parking_lot::Mutex<HashMap<String, InFlight>>,
    /// Σ estimated prefill tokens of those requests, per endpoint.
    pending_prefill: parking_lot::Mutex<HashMap<EndpointKey, u64>>,
    /// The same, summed over the EPP's other replicas (HA sync; swapped in whole).
    peer_pending_prefill: arc_swap::ArcSwap<HashMap<EndpointKey, u64>>,
    /// Speculation begun and ended here, for the other replicas (HA sync).
    recorder: Recorder,
    decisions: DecisionLog,
    prefix_metrics: PrefixIndexerMetrics,
}

/// Speculation settings.
#[derive(Debug, Clone, Copy)]
struct Speculation {
    grace: Duration,
    max_life: Duration,
}

/// A request whose speculative entries are live.
struct InFlight {
    targets: SmallVec<[EndpointKey; 2]>,
    /// Speculative keys (empty without speculation).
    keys: Vec<u64>,
    /// Estimated prefill tokens per target.
    work: SmallVec<[(EndpointKey, u64); 2]>,
    since: std::time::Instant,
}

impl Inner {
    /// Ends the speculation of `request_id`, if it has one.
    fn end_request(&self, request_id: &str) {
        let Some(f) = self.inflight.lock().remove(request_id) else {
            return;
        };
        self.end_inflight(f);
    }

    fn end_inflight(&self, f: InFlight) {
        if !f.keys.is_empty() {
            let grace = self.speculation.map_or(Duration::ZERO, |s| s.grace);
            for &ep in &f.targets {
                self.index.end_speculative(ep, &f.keys, grace);
                self.recorder.record(|| LocalDelta {
                    op: DeltaOp::SpeculateEnd,
                    endpoint: EndpointId(ep),
                    keys: f.keys.clone(),
                    ttl: grace,
                    at: std::time::Instant::now(),
                });
            }
        }
        let mut pending = self.pending_prefill.lock();
        for (ep, w) in f.work {
            if let Some(v) = pending.get_mut(&ep) {
                *v = v.saturating_sub(w);
                if *v == 0 {
                    pending.remove(&ep);
                }
            }
        }
    }

    /// Ends the speculation of requests older than the maximum lifetime.
    fn expire_inflight(&self) {
        let max_life = self
            .speculation
            .map_or(Duration::from_secs(600), |s| s.max_life);
        let stale: Vec<InFlight> = {
            let mut map = self.inflight.lock();
            let old: Vec<String> = map
                .iter()
                .filter(|(_, f)| f.since.elapsed() >= max_life)
                .map(|(k, _)| k.clone())
                .collect();
            old.iter().filter_map(|k| map.remove(k)).collect()
        };
        for f in stale {
            self.end_inflight(f);
        }
    }
}

/// The precise prefix-cache scorer.
pub struct PreciseScorer {
    name: String,
    inner: Arc<Inner>,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for PreciseScorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreciseScorer")
            .field("name", &self.name)
            .field("index", &self.inner.index)
            .finish()
    }
}

impl Drop for PreciseScorer {
    fn drop(&mut self) {
        if let Some(t) = &self.ticker {
            t.abort();
        }
    }
}

impl PreciseScorer {
    /// The index.
    pub fn index(&self) -> &Arc<PreciseIndex> {
        &self.inner.index
    }

    /// The event subscriber's counters, when it runs.
    pub fn subscriber_stats(&self) -> Option<&Arc<SubscriberStats>> {
        self.inner.subscriber.as_ref().map(|s| s.stats())
    }

    /// The bound central endpoint, when binding.
    pub fn events_endpoint(&self) -> Option<&str> {
        self.inner.subscriber.as_ref().and_then(|s| s.endpoint())
    }

    fn owner(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }
}

fn build_index_config(p: &Params) -> Result<PreciseIndexConfig, PluginError> {
    let tp = p
        .token_processor_config
        .clone()
        .or_else(|| p.indexer_config.token_processor_config.clone())
        .unwrap_or_default();
    if tp.block_size == 0 {
        return invalid!("tokenProcessorConfig.blockSize must be positive");
    }
    let mem = &p.indexer_config.kv_block_index_config.in_memory_config;
    if mem.size == 0 || mem.pod_cache_size == 0 {
        return invalid!(
            "indexerConfig.kvBlockIndexConfig.inMemoryConfig: size and podCacheSize must be positive"
        );
    }
    let mut cfg = PreciseIndexConfig {
        block_size: tp.block_size,
        hash_seed: tp.hash_seed,
        max_keys: mem.size,
        max_holders_per_key: mem.pod_cache_size,
        ..PreciseIndexConfig::default()
    };
    if let Some(tiers) = &p.indexer_config.kv_cache_backend_configs {
        if tiers.is_empty() || tiers.len() > 6 {
            return invalid!("indexerConfig.kvCacheBackendConfigs must list 1 to 6 tiers");
        }
        for t in tiers {
            if !(0.0..=1.0).contains(&t.weight) {
                return invalid!(
                    "indexerConfig.kvCacheBackendConfigs: weight of {} must be in [0, 1]",
                    t.name
                );
            }
        }
        cfg.tiers = tiers
            .iter()
            .map(|t| (t.name.to_ascii_lowercase(), t.weight))
            .collect();
    }
    Ok(cfg)
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    Ok(PreciseScorer::build(i)?)
}

impl PreciseScorer {
    /// Builds the scorer (and starts its event subscriber when a tokio runtime is available,
    /// from the handle's extensions or the current context).
    pub fn build(i: FactoryInput<'_>) -> Result<Arc<Self>, PluginError> {
        let p: Params = params(i.parameters)?;
        let index = Arc::new(PreciseIndex::new(build_index_config(&p)?));
        let ev = &p.kv_events_config;
        if ev.concurrency == 0 {
            return invalid!("kvEventsConfig.concurrency must be positive");
        }
        if ev.discover_pods && ev.pod_discovery_config.socket_port == 0 {
            return invalid!("kvEventsConfig.podDiscoveryConfig.socketPort must be set");
        }
        let tokenization = Tokenization::load(p.tokenizer_path.as_deref())?;
        let sink = Arc::new(IndexSink {
            index: index.clone(),
            endpoints: i.handle.endpoints.clone(),
            dialled: parking_lot::RwLock::new(HashMap::new()),
            default_model: p
                .indexer_config
                .tokenizers_pool_config
                .model_name
                .clone()
                .unwrap_or_default(),
            unknown_endpoint: AtomicU64::new(0),
            dropped_stores: AtomicU64::new(0),
        });
        let runtime = i
            .handle
            .extensions
            .get::<tokio::runtime::Handle>()
            .cloned()
            .or_else(|| tokio::runtime::Handle::try_current().ok());
        let sub_cfg = SubscriberConfig {
            topic_filter: ev.topic_filter.clone(),
            concurrency: ev.concurrency,
            replay_port: (ev.replay_port != 0).then_some(ev.replay_port),
            ..SubscriberConfig::default()
        };
        let subscriber = match &runtime {
            None => {
                tracing::warn!(scorer = %i.name, "no async runtime: KV events are not consumed (the index stays empty)");
                None
            }
            Some(rt) if ev.discover_pods => Some(KvEventSubscriber::dialing(
                sub_cfg,
                sink.clone(),
                rt.clone(),
            )),
            Some(rt) => Some(
                KvEventSubscriber::bind(sub_cfg, &ev.zmq_endpoint, sink.clone(), rt.clone())
                    .map_err(|e| PluginError::Other(format!("kvEventsConfig.zmqEndpoint: {e}")))?,
            ),
        };
        let metrics = i
            .handle
            .extensions
            .get::<PreciseMetrics>()
            .cloned()
            .unwrap_or_default();
        let inner = Arc::new(Inner {
            index,
            sink,
            tokenization,
            subscriber,
            discover_pods: ev.discover_pods,
            socket_port: ev.pod_discovery_config.socket_port,
            speculation: p.speculative_indexing.then(|| Speculation {
                grace: p.speculative_ttl.unwrap_or(Duration::from_secs(2)),
                max_life: p
                    .speculative_max_lifetime
                    .unwrap_or(Duration::from_secs(600)),
            }),
            inflight: parking_lot::Mutex::new(HashMap::new()),
            pending_prefill: parking_lot::Mutex::new(HashMap::new()),
            peer_pending_prefill: arc_swap::ArcSwap::from_pointee(HashMap::new()),
            recorder: Recorder::new(),
            decisions: DecisionLog::new(TYPE),
            prefix_metrics: i.handle.metrics.prefix.clone(),
        });
        let ticker = runtime.map(|rt| rt.spawn(tick(Arc::downgrade(&inner), metrics)));
        Ok(Arc::new(PreciseScorer {
            name: i.name.to_string(),
            inner,
            ticker,
        }))
    }

    /// Applies one event batch as if received from `topic` (for tests and tools).
    pub fn apply_events(&self, topic: &str, batch: &EventBatch) {
        self.inner.sink.apply(
            &Source {
                topic,
                peer: None,
                data_parallel_rank: batch.data_parallel_rank,
            },
            batch,
        );
    }
}

/// Copies the counters into the Prometheus metrics and refreshes the index gauges, every
/// second until the scorer is dropped.
async fn tick(inner: Weak<Inner>, m: PreciseMetrics) {
    let mut last = [0u64; 9];
    let mut last_transport = [0u64; llmsched_kvevents::zmtp::ErrorReason::ALL.len()];
    let mut iv = tokio::time::interval(Duration::from_secs(1));
    loop {
        iv.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.expire_inflight();
        let st = inner.index.stats();
        inner.prefix_metrics.size.set(st.entries as i64);
        inner
            .prefix_metrics
            .memory_bytes
            .set(st.memory_bytes as i64);
        let sink = &inner.sink;
        let mut now = [0u64; 9];
        now[7] = sink.unknown_endpoint.load(Ordering::Relaxed);
        now[8] = sink.dropped_stores.load(Ordering::Relaxed);
        if let Some(s) = inner.subscriber.as_ref().map(|s| s.stats()) {
            now[..7].copy_from_slice(&[
                s.messages(),
                s.malformed(),
                s.gaps(),
                s.missed(),
                s.replayed(),
                s.restarts(),
                s.events(),
            ]);
        }
        let counters = [
            &m.messages,
            &m.malformed,
            &m.gaps,
            &m.missed,
            &m.replayed,
            &m.restarts,
            &m.events,
            &m.unknown_endpoint,
            &m.dropped_stores,
        ];
        for ((c, n), l) in counters.iter().zip(now).zip(last.iter_mut()) {
            if n > *l {
                c.inc_by(n - *l);
                *l = n;
            }
        }
        if let Some(t) = inner.subscriber.as_ref().map(|s| s.stats().transport()) {
            for ((reason, n), l) in t.error_counts().into_iter().zip(last_transport.iter_mut()) {
                if n > *l {
                    m.transport_errors
                        .get_or_create(&[("reason", reason.label())])
                        .inc_by(n - *l);
                    *l = n;
                }
            }
        }
    }
}

impl_plugin!(
    PreciseScorer,
    TYPE,
    as_scorer => Scorer,
    as_data_producer => DataProducer,
    as_pre_request => PreRequest,
    as_response_hooks => ResponseHooks,
    as_endpoint_listener => EndpointListener,
    as_replicated => ReplicatedState,
);

/// How long a peer's speculative entries count at most without their end being heard (a
/// lost `SpeculateEnd` costs at most this; the engines' events confirm real blocks anyway).
pub const PEER_SPECULATION_LEASE: Duration = Duration::from_secs(30);
/// Upper bound of the grace a peer may ask for when its speculation ends.
const PEER_SPECULATION_GRACE_MAX: Duration = Duration::from_secs(10);

/// Shared with the EPP's other replicas: speculative entries (begun at routing, ended at the
/// request's first token or end) and the pending-prefill gauge `prefill-load-scorer` reads.
/// Confirmed entries come from the engines' KV events, which every replica subscribes to
/// itself, so they are not sent.
impl ReplicatedState for PreciseScorer {
    fn replica_kind(&self) -> &'static str {
        "precise-prefix"
    }

    fn start_recording(&self, capacity: usize) {
        self.inner.recorder.start(capacity);
    }

    fn drain_local(&self, out: &mut Vec<LocalDelta>, max: usize) -> usize {
        self.inner.recorder.drain(out, max)
    }

    fn dropped_local(&self) -> u64 {
        self.inner.recorder.dropped()
    }

    fn apply_remote(&self, deltas: &[RemoteDelta<'_>]) -> usize {
        if self.inner.speculation.is_none() {
            return 0;
        }
        let mut applied = 0;
        for d in deltas {
            let ep = d.endpoint.id().0;
            match d.op {
                DeltaOp::Speculate => {
                    self.inner
                        .index
                        .add_speculative(ep, d.keys, d.ttl.min(PEER_SPECULATION_LEASE));
                    applied += d.keys.len();
                }
                DeltaOp::SpeculateEnd => {
                    self.inner.index.expire_speculative(
                        ep,
                        d.keys,
                        d.ttl.min(PEER_SPECULATION_GRACE_MAX),
                    );
                    applied += d.keys.len();
                }
                DeltaOp::Blocks => {}
            }
        }
        applied
    }

    /// Nothing: speculative entries live seconds, and confirmed ones come from the engines.
    fn snapshot(&self, _out: &mut Vec<LocalDelta>, _max_keys: usize) {}

    fn local_gauges(&self, out: &mut Vec<(EndpointId, u64)>) {
        out.extend(
            self.inner
                .pending_prefill
                .lock()
                .iter()
                .map(|(&ep, &w)| (EndpointId(ep), w)),
        );
    }

    fn set_peer_gauges(&self, totals: &[(EndpointId, u64)]) {
        let map: HashMap<EndpointKey, u64> = totals
            .iter()
            .filter(|(_, w)| *w > 0)
            .map(|(e, w)| (e.0, *w))
            .collect();
        if map.is_empty() && self.inner.peer_pending_prefill.load().is_empty() {
            return;
        }
        self.inner.peer_pending_prefill.store(Arc::new(map));
    }
}

thread_local! {
    static TOKENS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl DataProducer for PreciseScorer {
    fn produce(
        &self,
        request: &InferenceRequest,
        cycle: &mut CycleState,
        candidates: &[Candidate<'_>],
    ) {
        let inner = &self.inner;
        let mut state = PreciseState {
            owner: self.owner(),
            ..PreciseState::default()
        };
        TOKENS.with(|t| {
            let mut tokens = t.borrow_mut();
            tokens.clear();
            if inner
                .tokenization
                .tokens(request.prompt(), &mut tokens)
                .is_some()
            {
                state.prompt_tokens = tokens.len() as u64;
                inner
                    .index
                    .keyer()
                    .prompt_keys(&request.target_model, &tokens, &mut state.keys);
            }
        });
        inner.index.longest_prefix(
            &state.keys,
            |ep| candidates.iter().any(|c| c.id().0 == ep),
            &mut state.matches,
        );
        state.block_size = inner.index.config().block_size;
        {
            let pending = inner.pending_prefill.lock();
            if !pending.is_empty() {
                for c in candidates {
                    if let Some(&w) = pending.get(&c.id().0) {
                        state.pending_prefill.push((c.id().0, w));
                    }
                }
            }
        }
        {
            // The other replicas' pending prefill (HA sync), lock-free.
            let peers = inner.peer_pending_prefill.load();
            if !peers.is_empty() {
                for c in candidates {
                    let ep = c.id().0;
                    let Some(&w) = peers.get(&ep) else { continue };
                    match state.pending_prefill.iter_mut().find(|(e, _)| *e == ep) {
                        Some((_, v)) => *v = v.saturating_add(w),
                        None => state.pending_prefill.push((ep, w)),
                    }
                }
            }
        }
        let total = state.keys.len();
        if total > 0 {
            let best = state
                .matches
                .iter()
                .map(|m| m.weighted)
                .fold(0.0f64, f64::max);
            inner.prefix_metrics.hit_ratio.observe(best / total as f64);
        }
        if cycle.get::<PrefixCacheMatch>().is_none() {
            let mut m = PrefixCacheMatch {
                total_blocks: u32::try_from(total).unwrap_or(u32::MAX),
                block_size: inner.index.config().block_size,
                prompt_tokens: state.prompt_tokens,
                block_tokens: f64::from(inner.index.config().block_size),
                ..PrefixCacheMatch::default()
            };
            for x in &state.matches {
                m.matched_blocks.insert(EndpointId(x.endpoint), x.weighted);
            }
            cycle.insert(m);
        }
        cycle.insert(state);
    }
}

/// `Σ weights of the leading held blocks / total` per candidate (see the module docs).
pub fn precise_scores(state: &PreciseState, candidates: &[Candidate<'_>], scores: &mut [f64]) {
    scores.fill(0.0);
    if state.keys.is_empty() {
        return;
    }
    let total = state.keys.len() as f64;
    for m in &state.matches {
        for (s, c) in scores.iter_mut().zip(candidates) {
            if c.id().0 == m.endpoint {
                *s = (m.weighted / total).clamp(0.0, 1.0);
            }
        }
    }
}

impl Scorer for PreciseScorer {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Affinity
    }

    fn score(&self, cx: &SchedulingContext<'_>, candidates: &[Candidate<'_>], scores: &mut [f64]) {
        match cx.cycle.get::<PreciseState>() {
            Some(st) if st.owner == self.owner() => precise_scores(st, candidates, scores),
            _ => scores.fill(0.0),
        }
    }
}

impl PreRequest for PreciseScorer {
    fn pre_request(
        &self,
        request: &InferenceRequest,
        cycle: &CycleState,
        result: &SchedulingResult,
        _headers_to_set: &mut Vec<(String, String)>,
    ) {
        let Some(st) = cycle
            .get::<PreciseState>()
            .filter(|s| s.owner == self.owner())
        else {
            return;
        };
        if st.keys.is_empty() {
            return;
        }
        let primary = result.targets().first();
        if decisions::enabled()
            && let Some(t) = primary
        {
            let names = self.inner.sink.endpoints.as_ref().map(|e| e.snapshot());
            self.inner.decisions.record(
                &request.request_id,
                Decision::from_matches(
                    t,
                    st.matches.iter().map(|m| (m.endpoint, m.weighted)),
                    st.keys.len(),
                    f64::from(self.inner.index.config().block_size),
                    names.as_deref(),
                ),
            );
        }
        let prefill = result
            .profiles
            .iter()
            .find(|(n, _)| n == "prefill" && *n != result.primary_profile)
            .and_then(|(_, r)| r.targets.first())
            .filter(|p| primary.is_none_or(|t| t.id() != p.id()));
        let mut targets = SmallVec::new();
        let mut work = SmallVec::new();
        for target in primary.into_iter().chain(prefill) {
            let ep = target.id().0;
            if let Some(spec) = self.inner.speculation {
                self.inner
                    .index
                    .begin_speculative(ep, &st.keys, spec.max_life);
                self.inner.recorder.record(|| LocalDelta {
                    op: DeltaOp::Speculate,
                    endpoint: target.id(),
                    keys: st.keys.clone(),
                    ttl: spec.max_life,
                    at: std::time::Instant::now(),
                });
            }
            targets.push(ep);
            work.push((ep, st.uncached_tokens(ep)));
        }
        {
            let mut pending = self.inner.pending_prefill.lock();
            for &(ep, w) in &work {
                *pending.entry(ep).or_insert(0) += w;
            }
        }
        let previous = self.inner.inflight.lock().insert(
            request.request_id.clone(),
            InFlight {
                targets,
                keys: if self.inner.speculation.is_some() {
                    st.keys.clone()
                } else {
                    Vec::new()
                },
                work,
                since: std::time::Instant::now(),
            },
        );
        // A reused request id: the earlier request's speculation ends now.
        if let Some(f) = previous {
            self.inner.end_inflight(f);
        }
    }
}

impl ResponseHooks for PreciseScorer {
    /// The first chunk of a streamed response is the first token: the engine has prefilled
    /// the prompt (and published its blocks).
    fn response_streaming(
        &self,
        request: &InferenceRequest,
        response: &ResponseInfo,
        chunk: &[u8],
        _target: &Endpoint,
    ) {
        if response.body_bytes == chunk.len() as u64 {
            self.inner.end_request(&request.request_id);
        }
    }

    fn response_complete(
        &self,
        request: &InferenceRequest,
        response: &ResponseInfo,
        target: &Endpoint,
    ) {
        self.inner.end_request(&request.request_id);
        if self.inner.decisions.open() > 0 {
            self.inner.decisions.complete(request, response, target);
        }
    }
}

impl PreciseScorer {
    /// `discoverPods`: the address dialled for `endpoint`.
    fn dial_target(&self, endpoint: &Endpoint) -> String {
        let ip = endpoint.meta().address;
        if ip.is_ipv6() {
            format!("tcp://[{ip}]:{}", self.inner.socket_port)
        } else {
            format!("tcp://{ip}:{}", self.inner.socket_port)
        }
    }
}

impl EndpointListener for PreciseScorer {
    /// `discoverPods`: dials the endpoint's address once (several endpoints on one host share
    /// one subscription; the topics tell their events apart).
    fn endpoint_added(&self, endpoint: &Arc<Endpoint>) {
        if !self.inner.discover_pods {
            return;
        }
        let target = self.dial_target(endpoint);
        {
            let mut dialled = self.inner.sink.dialled.write();
            let eps = dialled.entry(target.clone()).or_default();
            if !eps.iter().any(|h| h == endpoint.hostport()) {
                eps.push(endpoint.hostport().to_string());
            }
        }
        if let Some(sub) = &self.inner.subscriber {
            sub.add_peer(&target, &target);
        }
    }

    fn endpoint_removed(&self, id: EndpointId) {
        self.inner.index.clear_endpoint(id.0);
        if !self.inner.discover_pods {
            return;
        }
        // The addresses still in use, from the pool without `id`.
        let mut live: HashMap<String, Vec<String>> = HashMap::new();
        if let Some(e) = self.inner.sink.endpoints.as_ref() {
            for e in e.snapshot().endpoints.iter().filter(|e| e.id() != id) {
                live.entry(self.dial_target(e))
                    .or_default()
                    .push(e.hostport().to_string());
            }
        }
        {
            let mut dialled = self.inner.sink.dialled.write();
            dialled.retain(|target, eps| match live.get(target) {
                Some(now) => {
                    eps.retain(|h| now.contains(h));
                    !eps.is_empty()
                }
                None => false,
            });
        }
        if let Some(sub) = &self.inner.subscriber {
            for peer in sub.peers() {
                if !live.contains_key(&peer) {
                    sub.remove_peer(&peer);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::endpoint::EndpointSet;
    use llmsched_core::registry::PluginHandle;
    use llmsched_core::request::{ChatMessage, RequestBody};
    use llmsched_core::scheduler::ProfileRunResult;
    use llmsched_kvevents::{BlockRemoved, BlockStored};

    struct Fixed(Arc<EndpointSet>);
    impl EndpointSource for Fixed {
        fn snapshot(&self) -> Arc<EndpointSet> {
            self.0.clone()
        }
    }

    fn scorer(eps: &[Arc<Endpoint>], params: serde_json::Value) -> Arc<PreciseScorer> {
        let handle = PluginHandle {
            endpoints: Some(Arc::new(Fixed(Arc::new(EndpointSet {
                endpoints: eps.to_vec(),
                generation: 1,
                synced: true,
            })))),
            ..Default::default()
        };
        PreciseScorer::build(FactoryInput {
            name: TYPE,
            parameters: Some(&params),
            handle: &handle,
        })
        .unwrap()
    }

    fn with_prompt(prompt: Prompt) -> InferenceRequest {
        let mut r = request("m");
        r.body = Some(RequestBody {
            prompt,
            ..RequestBody::raw(bytes::Bytes::new())
        });
        r
    }

    fn run(
        p: &Arc<PreciseScorer>,
        req: &InferenceRequest,
        eps: &[Arc<Endpoint>],
    ) -> (CycleState, Vec<f64>) {
        let cands: Vec<Candidate<'_>> = eps.iter().collect();
        let mut cycle = CycleState::new();
        p.produce(req, &mut cycle, &cands);
        let s = scores(p.as_ref(), req, &cycle, eps);
        (cycle, s)
    }

    fn ids(text: &str) -> Vec<u32> {
        SimTokenizer::default().encode(text).unwrap()
    }

    fn stored(
        hashes: &[u64],
        parent: Option<u64>,
        tokens: &[u32],
        medium: Option<&str>,
    ) -> EventBatch {
        EventBatch {
            ts: 0.0,
            events: vec![KvEvent::BlockStored(BlockStored {
                block_hashes: hashes.to_vec(),
                parent_block_hash: parent,
                token_ids: tokens.to_vec(),
                block_size: 4,
                medium: medium.map(str::to_string),
                ..BlockStored::default()
            })],
            data_parallel_rank: None,
        }
    }

    fn batch(events: Vec<KvEvent>) -> EventBatch {
        EventBatch {
            ts: 0.0,
            events,
            data_parallel_rank: None,
        }
    }

    const PROMPT: &str = "a b c d e f g h i j k l";

    fn topic(id: u32) -> String {
        format!("kv@10.0.0.{id}:8000@m")
    }

    #[test]
    fn score_is_the_tier_weighted_leading_run_over_total() {
        let eps = [ep(1), ep(2), ep(3)];
        let p = scorer(
            &eps,
            serde_json::json!({"tokenProcessorConfig": {"blockSize": 4}}),
        );
        let t = ids(PROMPT);
        // Endpoint 1 holds all 3 blocks on GPU; endpoint 2 the first 2 on CPU; 3 nothing.
        p.apply_events(&topic(1), &stored(&[11, 12, 13], None, &t, None));
        p.apply_events(&topic(2), &stored(&[21, 22], None, &t[..8], Some("CPU")));
        let req = with_prompt(Prompt::Text(PROMPT.into()));
        let (_, s) = run(&p, &req, &eps);
        assert_close(&s, &[1.0, 2.0 * 0.8 / 3.0, 0.0]);
        // Only the leading run counts: endpoint 1 loses its middle block → 1 of 3.
        p.apply_events(
            &topic(1),
            &batch(vec![KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![12],
                ..BlockRemoved::default()
            })]),
        );
        assert_close(&run(&p, &req, &eps).1, &[1.0 / 3.0, 2.0 * 0.8 / 3.0, 0.0]);
        // A child stored under a parent the endpoint no longer maps is dropped.
        p.apply_events(&topic(1), &stored(&[14], Some(12), &t[8..], None));
        assert_close(&run(&p, &req, &eps).1, &[1.0 / 3.0, 2.0 * 0.8 / 3.0, 0.0]);
        // AllBlocksCleared empties an endpoint.
        p.apply_events(&topic(2), &batch(vec![KvEvent::AllBlocksCleared]));
        assert_close(&run(&p, &req, &eps).1, &[1.0 / 3.0, 0.0, 0.0]);
        // A partial trailing block has no key: 13 words = 3 blocks still.
        let longer = with_prompt(Prompt::Text(format!("{PROMPT} m")));
        let (cycle, _) = run(&p, &longer, &eps);
        assert_eq!(cycle.get::<PrefixCacheMatch>().unwrap().total_blocks, 3);
    }

    #[test]
    fn custom_tiers_and_chained_events() {
        let eps = [ep(1)];
        let p = scorer(
            &eps,
            serde_json::json!({
                "tokenProcessorConfig": {"blockSize": 4},
                "indexerConfig": {"kvCacheBackendConfigs": [{"name": "gpu", "weight": 1.0}, {"name": "cpu", "weight": 0.5}]},
            }),
        );
        let t = ids(PROMPT);
        // Three events chained through their parents, the last one on CPU.
        p.apply_events(&topic(1), &stored(&[1], None, &t[..4], None));
        p.apply_events(&topic(1), &stored(&[2], Some(1), &t[4..8], None));
        p.apply_events(&topic(1), &stored(&[3], Some(2), &t[8..], Some("cpu")));
        let req = with_prompt(Prompt::Text(PROMPT.into()));
        assert_close(&run(&p, &req, &eps).1, &[2.5 / 3.0]);
        // Another model's prompt shares nothing.
        let mut other = req.clone();
        other.target_model = "other".into();
        assert_close(&run(&p, &other, &eps).1, &[0.0]);
    }

    #[test]
    fn chat_prompts_are_rendered_like_the_simulator() {
        let eps = [ep(1), ep(2)];
        let p = scorer(
            &eps,
            serde_json::json!({"tokenProcessorConfig": {"blockSize": 4}}),
        );
        let messages = vec![
            ChatMessage {
                role: "system".into(),
                content: "you are a kind bot that helps".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "hi there".into(),
            },
        ];
        let text = llmsched_tokenizer::render_sim_chat(
            messages
                .iter()
                .map(|m| (m.role.as_str(), m.content.as_str())),
        );
        let t = ids(&text);
        let full = t.len() / 4 * 4;
        let hashes: Vec<u64> = (0..full as u64 / 4).map(|i| 100 + i).collect();
        p.apply_events(&topic(2), &stored(&hashes, None, &t[..full], None));
        let req = with_prompt(Prompt::Chat {
            messages,
            messages_json: String::new(),
        });
        assert_close(&run(&p, &req, &eps).1, &[0.0, 1.0]);
        // Token-id prompts are used as they are.
        let req = with_prompt(Prompt::TokenIds(t[..8].to_vec()));
        assert_close(&run(&p, &req, &eps).1, &[0.0, 1.0]);
    }

    fn routed_to(ep: &Arc<Endpoint>) -> SchedulingResult {
        SchedulingResult {
            primary_profile: "default".into(),
            profiles: vec![(
                "default".into(),
                ProfileRunResult {
                    targets: vec![ep.clone()],
                },
            )],
        }
    }

    fn with_id(mut r: InferenceRequest, id: &str) -> InferenceRequest {
        r.request_id = id.into();
        r
    }

    fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn speculation_lives_with_the_request_until_confirmed_or_its_grace_ends() {
        let eps = [ep(1), ep(2)];
        let p = scorer(
            &eps,
            serde_json::json!({"tokenProcessorConfig": {"blockSize": 4}, "speculativeTTL": "1ms"}),
        );
        let req = with_id(with_prompt(Prompt::Text(PROMPT.into())), "a");
        let (cycle, s) = run(&p, &req, &eps);
        assert_close(&s, &[0.0, 0.0]);
        // Added at dispatch: endpoint 2 counts as holding the prompt while the request waits
        // in its queue, however long (no clock runs until the request's first token).
        p.pre_request(&req, &cycle, &routed_to(&eps[1]), &mut Vec::new());
        assert_close(&run(&p, &req, &eps).1, &[0.0, 1.0]);
        std::thread::sleep(Duration::from_millis(20));
        assert_close(&run(&p, &req, &eps).1, &[0.0, 1.0]);
        // A follower sharing the prefix goes to endpoint 2 too and is pending there.
        let follower = with_id(req.clone(), "b");
        let (cycle_b, _) = run(&p, &follower, &eps);
        p.pre_request(&follower, &cycle_b, &routed_to(&eps[1]), &mut Vec::new());
        // The first request's first token: its entries end, the follower's still count.
        let info = ResponseInfo {
            status: 200,
            streaming: true,
            body_bytes: 5,
            ..ResponseInfo::default()
        };
        p.response_streaming(&req, &info, b"data:", &eps[1]);
        std::thread::sleep(Duration::from_millis(20));
        assert_close(&run(&p, &req, &eps).1, &[0.0, 1.0]);
        // Later chunks change nothing; the follower's end (no confirming event) starts the
        // 1 ms grace, then the entries are gone.
        let later = ResponseInfo {
            body_bytes: 50,
            ..info.clone()
        };
        p.response_streaming(&req, &later, b"data:", &eps[1]);
        p.response_complete(&follower, &later, &eps[1]);
        until("unconfirmed speculation expires", || {
            run(&p, &req, &eps).1 == [0.0, 0.0]
        });
        assert_eq!(p.inner.inflight.lock().len(), 0);

        // Confirmed by the engine's BlockStored: stays after the request ends, until a
        // BlockRemoved.
        let t = ids(PROMPT);
        let (cycle, _) = run(&p, &req, &eps);
        p.pre_request(&req, &cycle, &routed_to(&eps[0]), &mut Vec::new());
        p.apply_events(&topic(1), &stored(&[11, 12, 13], None, &t, None));
        p.response_complete(&req, &info, &eps[0]);
        std::thread::sleep(Duration::from_millis(20));
        assert_close(&run(&p, &req, &eps).1, &[1.0, 0.0]);
        p.apply_events(
            &topic(1),
            &batch(vec![KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![12],
                ..BlockRemoved::default()
            })]),
        );
        assert_close(&run(&p, &req, &eps).1, &[1.0 / 3.0, 0.0]);

        // Departure clears an endpoint's speculation too.
        let (cycle, _) = run(&p, &req, &eps);
        p.pre_request(&req, &cycle, &routed_to(&eps[1]), &mut Vec::new());
        assert_close(&run(&p, &req, &eps).1, &[1.0 / 3.0, 1.0]);
        p.endpoint_removed(EndpointId(2));
        assert_close(&run(&p, &req, &eps).1, &[1.0 / 3.0, 0.0]);
        // Without speculation nothing is written.
        let p = scorer(
            &eps,
            serde_json::json!({"tokenProcessorConfig": {"blockSize": 4}, "speculativeIndexing": false}),
        );
        let (cycle, _) = run(&p, &req, &eps);
        p.pre_request(&req, &cycle, &routed_to(&eps[1]), &mut Vec::new());
        assert_close(&run(&p, &req, &eps).1, &[0.0, 0.0]);
        assert_eq!(p.index().stats().entries, 0);
    }

    #[test]
    fn replicas_share_speculation_and_pending_prefill() {
        use llmsched_core::replica::RemoteDelta;
        let eps = [ep(1), ep(2)];
        let params =
            serde_json::json!({"tokenProcessorConfig": {"blockSize": 4}, "speculativeTTL": "1ms"});
        let a = scorer(&eps, params.clone());
        let b = scorer(&eps, params);
        a.start_recording(16);
        let req = with_id(with_prompt(Prompt::Text(PROMPT.into())), "a");
        let (cycle, _) = run(&a, &req, &eps);
        a.pre_request(&req, &cycle, &routed_to(&eps[1]), &mut Vec::new());
        // a's gauge: the prompt's prefill is pending on endpoint 2.
        let mut g = Vec::new();
        a.local_gauges(&mut g);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].0, EndpointId(2));
        assert!(g[0].1 > 0);
        let mut out = Vec::new();
        assert_eq!(a.drain_local(&mut out, 10), 1);
        assert_eq!(out[0].op, DeltaOp::Speculate);
        let to_remote = |out: &[LocalDelta]| -> Vec<(DeltaOp, Vec<u64>, Duration)> {
            out.iter().map(|d| (d.op, d.keys.clone(), d.ttl)).collect()
        };
        let apply = |b: &PreciseScorer, ds: &[(DeltaOp, Vec<u64>, Duration)]| {
            let remote: Vec<RemoteDelta<'_>> = ds
                .iter()
                .map(|(op, keys, ttl)| RemoteDelta {
                    op: *op,
                    endpoint: &eps[1],
                    keys,
                    ttl: *ttl,
                })
                .collect();
            b.apply_remote(&remote)
        };
        // b learns the speculation and the gauge: it sends the prompt to endpoint 2 too, and
        // prefill-load sees a's pending work there.
        assert!(apply(&b, &to_remote(&out)) > 0);
        assert_close(&run(&b, &req, &eps).1, &[0.0, 1.0]);
        b.set_peer_gauges(&g);
        let (cycle_b, _) = run(&b, &req, &eps);
        let st = cycle_b.get::<PreciseState>().unwrap();
        assert_eq!(st.pending_prefill(2), g[0].1);
        // a's request reaches its first token: the end travels too and b's entry expires
        // after the grace (1 ms).
        let info = ResponseInfo {
            status: 200,
            streaming: true,
            body_bytes: 5,
            ..ResponseInfo::default()
        };
        a.response_streaming(&req, &info, b"data:", &eps[1]);
        out.clear();
        assert_eq!(a.drain_local(&mut out, 10), 1);
        assert_eq!(out[0].op, DeltaOp::SpeculateEnd);
        apply(&b, &to_remote(&out));
        until("the peer's speculation ends on b", || {
            run(&b, &req, &eps).1 == [0.0, 0.0]
        });
        b.set_peer_gauges(&[]);
        let (cycle_b, _) = run(&b, &req, &eps);
        assert_eq!(cycle_b.get::<PreciseState>().unwrap().pending_prefill(2), 0);
    }

    #[test]
    fn events_of_unknown_endpoints_and_bad_events_do_not_poison_the_index() {
        let eps = [ep(1)];
        let p = scorer(
            &eps,
            serde_json::json!({"tokenProcessorConfig": {"blockSize": 4}}),
        );
        let t = ids(PROMPT);
        p.apply_events("kv@10.9.9.9:8000@m", &stored(&[1, 2, 3], None, &t, None));
        p.apply_events("garbage-topic", &stored(&[1, 2, 3], None, &t, None));
        // Token count inconsistent with the hashes.
        p.apply_events(&topic(1), &stored(&[1, 2, 3], None, &t[..5], None));
        assert_eq!(p.inner.sink.unknown_endpoint.load(Ordering::Relaxed), 2);
        assert_eq!(p.inner.sink.dropped_stores.load(Ordering::Relaxed), 1);
        let req = with_prompt(Prompt::Text(PROMPT.into()));
        assert_close(&run(&p, &req, &eps).1, &[0.0]);
        assert_eq!(p.index().stats().keys, 0);
    }

    #[test]
    fn events_belong_to_the_topic_publisher_not_to_every_endpoint_at_the_dialled_address() {
        // Four engines on one host (ports 8000-8003), dialled at one address.
        let eps: Vec<Arc<Endpoint>> = (0..4u16)
            .map(|i| {
                let meta = llmsched_core::endpoint::EndpointMeta::from_addr(
                    format!("10.0.0.9:{}", 8000 + i).parse().unwrap(),
                );
                Arc::new(Endpoint::new(EndpointId(u32::from(i) + 1), meta))
            })
            .collect();
        let p = scorer(
            &eps,
            serde_json::json!({"tokenProcessorConfig": {"blockSize": 4},
                               "kvEventsConfig": {"discoverPods": true, "podDiscoveryConfig": {"socketPort": 5557}}}),
        );
        for e in &eps {
            p.endpoint_added(e);
        }
        assert_eq!(
            p.inner.sink.dialled.read().len(),
            1,
            "one address, dialled once"
        );
        let t = ids(PROMPT);
        let peer = "tcp://10.0.0.9:5557";
        let b = stored(&[1, 2, 3], None, &t, None);
        p.inner.sink.apply(
            &Source {
                topic: "kv@10.0.0.9:8002@m",
                peer: Some(peer),
                data_parallel_rank: None,
            },
            &b,
        );
        let req = with_prompt(Prompt::Text(PROMPT.into()));
        assert_close(&run(&p, &req, &eps).1, &[0.0, 0.0, 1.0, 0.0]);
        // A topic naming no endpoint cannot be placed when four share the address.
        p.inner.sink.apply(
            &Source {
                topic: "kv-events",
                peer: Some(peer),
                data_parallel_rank: None,
            },
            &stored(&[1, 2, 3], None, &t, None),
        );
        assert_close(&run(&p, &req, &eps).1, &[0.0, 0.0, 1.0, 0.0]);
        assert_eq!(p.inner.sink.unknown_endpoint.load(Ordering::Relaxed), 1);
        // When only one endpoint lives at the address, its peer's events are its own.
        let left = [eps[1].clone()];
        // (A topic without a model: the base model comes from tokenizersPoolConfig.)
        let p2 = scorer(
            &left,
            serde_json::json!({"tokenProcessorConfig": {"blockSize": 4},
                               "indexerConfig": {"tokenizersPoolConfig": {"modelName": "m"}},
                               "kvEventsConfig": {"discoverPods": true, "podDiscoveryConfig": {"socketPort": 5557}}}),
        );
        p2.endpoint_added(&eps[1]);
        p2.inner.sink.apply(
            &Source {
                topic: "kv-events",
                peer: Some(peer),
                data_parallel_rank: None,
            },
            &stored(&[1, 2, 3], None, &t, None),
        );
        assert_close(&run(&p2, &req, &left).1, &[1.0]);
    }

    #[test]
    fn params_follow_the_reference_structure() {
        let ok = build(
            TYPE,
            Some(serde_json::json!({
                "tokenProcessorConfig": {"blockSize": 4, "hashSeed": "42"},
                "indexerConfig": {
                    "kvBlockIndexConfig": {"inMemoryConfig": {"size": 1000, "podCacheSize": 4}, "enableMetrics": true},
                    "tokenizersPoolConfig": {"modelName": "m", "workersCount": 8},
                },
                "kvEventsConfig": {"zmqEndpoint": "tcp://*:5557", "topicFilter": "kv@", "concurrency": 2,
                                   "discoverPods": false, "podDiscoveryConfig": {"socketPort": 5557}},
            })),
        );
        assert!(ok.is_ok(), "{:?}", ok.err());
        // The older layout: tokenProcessorConfig inside indexerConfig.
        assert!(build(TYPE, Some(serde_json::json!({"indexerConfig": {"tokenProcessorConfig": {"blockSize": 64}}}))).is_ok());
        let e = build_err(
            TYPE,
            serde_json::json!({"kvEventsConfig": {"zmqEndpiont": "x"}}),
        );
        assert!(e.contains("zmqEndpiont"), "{e}");
        let e = build_err(
            TYPE,
            serde_json::json!({"tokenProcessorConfig": {"blockSize": 0}}),
        );
        assert!(e.contains("blockSize"), "{e}");
        let e = build_err(
            TYPE,
            serde_json::json!({"tokenizerPath": "/nonexistent/tok"}),
        );
        assert!(e.contains("tokenizerPath"), "{e}");
        let e = build_err(
            TYPE,
            serde_json::json!({"indexerConfig": {"kvCacheBackendConfigs": [{"name": "gpu", "weight": 2.0}]}}),
        );
        assert!(e.contains("weight"), "{e}");
    }

    #[test]
    fn a_local_hf_tokenizer_is_loaded_from_a_directory() {
        let dir = std::env::temp_dir().join(format!("llmsched-precise-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        llmsched_tokenizer::testing::write_bpe_tokenizer(&dir, 300).unwrap();
        let eps = [ep(1)];
        let p = scorer(
            &eps,
            serde_json::json!({"tokenizerPath": dir.display().to_string()}),
        );
        let (cycle, _) = run(
            &p,
            &with_prompt(Prompt::Text("hello world ".repeat(40))),
            &eps,
        );
        assert!(cycle.get::<PreciseState>().unwrap().keys.len() > 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
