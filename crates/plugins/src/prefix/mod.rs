//! The approximate prefix cache shared by `prefix-cache-scorer` and
//! `approx-prefix-cache-producer`: prompt hashing, the index lookup before scheduling and
//! the index update after it.
//!
//! ## What it does per request
//!
//! 1. *Produce* (before scheduling): hash the prompt text ([`llmsched_core::Prompt::prefix_text`]: the
//!    completions prompt, string arrays joined with a space, or the JSON of chat `messages`)
//!    into chained block hashes ([`hashing`]), look up in the [`ApproxIndex`] how many leading
//!    blocks each endpoint holds, and write into the cycle state a [`PrefixCacheMatch`] (for
//!    the candidates that match) and an [`ApproxPrefixState`] (the hashes, for step 2).
//! 2. *Record* (pre-request, after the pick): insert the hashes for the primary profile's
//!    first target, and for the first target of a profile named `prefill` when present
//!    (P/D). Only the first target: the others are retry fallbacks that will most likely
//!    never see the request, and claiming they hold the prefix would attract the next
//!    requests to endpoints without it.
//! 3. *Purge*: endpoints that leave the pool are removed from the index (endpoint listener),
//!    and every two minutes the index is reconciled with the data layer's endpoint set when
//!    the runtime provides one.
//!
//! ## Parameters (both type names)
//!
//! * `autoTune` (bool, default `true`): when an endpoint reports `vllm:cache_config_info`,
//!   use `4 × block_size` characters per block (of the first candidate) and `num_gpu_blocks`
//!   as the LRU capacity (of the endpoint being recorded); otherwise the values below.
//! * `blockSizeTokens` (integer > 0, default `16`): block size in tokens; a block is
//!   `4 × blockSizeTokens` characters (64 by default). `0` is accepted with `autoTune` (the
//!   default then applies when no metrics are available).
//! * `blockSize` (integer > 0, deprecated): block size in *characters*, as the older
//!   `prefix-cache-scorer` took it; used when `blockSizeTokens` is not given.
//! * `maxPrefixBlocksToMatch` (integer > 0, default `256`): at most this many blocks are
//!   hashed; longer prompts are cut.
//! * `maxPrefixTokensToMatch` (integer ≥ 0, default `0` = off): when > 0, the block cap is
//!   `max(1, maxPrefixTokensToMatch / block size in tokens)` instead.
//! * `lruCapacityPerServer` (integer > 0, default `31250`): blocks remembered per endpoint
//!   (31,250 = an 8B model on an 80 GB GPU with 16-token blocks).
//!
//! Deviation from the reference, on purpose: the reference sizes an endpoint's LRU with the
//! constant 31,250 when auto-tuning has no metrics, ignoring `lruCapacityPerServer`; here the
//! parameter is the fallback. The index also differs in two documented ways (insert order,
//! per-endpoint prefix lengths found by binary search): see [`llmsched_kvindex::approx`].
//! Chat prompts are hashed from the `messages` JSON exactly as received (the reference
//! re-serializes them), so only completions prompts hash to the reference's values.

pub mod decisions;
pub mod hashing;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use llmsched_core::cycle::{CycleState, PrefixCacheMatch};
use llmsched_core::endpoint::{Endpoint, EndpointId, EndpointSource};
use llmsched_core::metrics::PrefixIndexerMetrics;
use llmsched_core::plugin::Candidate;
use llmsched_core::registry::{FactoryInput, PluginError};
use llmsched_core::replica::{DeltaOp, LocalDelta, Recorder, RemoteDelta, ReplicatedState};
use llmsched_core::request::InferenceRequest;
use llmsched_core::scheduler::SchedulingResult;
use llmsched_kvindex::{ApproxIndex, ApproxIndexConfig, PrefixMatches};
use serde::Deserialize;

use crate::common::{InvalidParameter, invalid, params};
use hashing::AVERAGE_CHARS_PER_TOKEN;

/// Default block size in tokens.
pub const DEFAULT_BLOCK_SIZE_TOKENS: usize = 16;
/// Default cap on hashed blocks.
pub const DEFAULT_MAX_PREFIX_BLOCKS: usize = 256;
/// Default LRU capacity per endpoint.
pub const DEFAULT_LRU_CAPACITY_PER_SERVER: usize = 31_250;
/// Profile name whose target is also recorded (P/D disaggregation).
pub const PREFILL_PROFILE: &str = "prefill";
/// How often the index is reconciled with the data layer's endpoints.
const SWEEP_INTERVAL_MS: u64 = 120_000;

/// Parameters of the approximate prefix plugins, as written in the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ApproxPrefixParams {
    /// Tune block size and LRU capacity from engine metrics.
    pub auto_tune: bool,
    /// Block size in tokens.
    pub block_size_tokens: Option<i64>,
    /// Deprecated block size in characters.
    pub block_size: Option<i64>,
    /// Cap on hashed blocks.
    pub max_prefix_blocks_to_match: i64,
    /// Cap on hashed tokens (0 = off).
    pub max_prefix_tokens_to_match: i64,
    /// LRU capacity per endpoint.
    pub lru_capacity_per_server: i64,
}

impl Default for ApproxPrefixParams {
    fn default() -> Self {
        Self {
            auto_tune: true,
            block_size_tokens: None,
            block_size: None,
            max_prefix_blocks_to_match: DEFAULT_MAX_PREFIX_BLOCKS as i64,
            max_prefix_tokens_to_match: 0,
            lru_capacity_per_server: DEFAULT_LRU_CAPACITY_PER_SERVER as i64,
        }
    }
}

/// Validated settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApproxPrefixConfig {
    /// Tune from engine metrics.
    pub auto_tune: bool,
    /// Block size in characters when not tuned.
    pub block_chars: usize,
    /// Cap on hashed blocks.
    pub max_blocks: usize,
    /// Cap on hashed tokens (0 = off).
    pub max_tokens: usize,
    /// LRU capacity per endpoint when not tuned.
    pub lru_capacity: usize,
}

impl Default for ApproxPrefixConfig {
    fn default() -> Self {
        Self {
            auto_tune: true,
            block_chars: DEFAULT_BLOCK_SIZE_TOKENS * AVERAGE_CHARS_PER_TOKEN,
            max_blocks: DEFAULT_MAX_PREFIX_BLOCKS,
            max_tokens: 0,
            lru_capacity: DEFAULT_LRU_CAPACITY_PER_SERVER,
        }
    }
}

impl ApproxPrefixParams {
    /// Validates and resolves the parameters.
    pub fn resolve(&self) -> Result<ApproxPrefixConfig, InvalidParameter> {
        let block_chars = match (self.block_size_tokens, self.block_size) {
            (Some(t), _) if t < 0 || (t == 0 && !self.auto_tune) => {
                return invalid!(
                    "blockSizeTokens must be > 0 when autoTune is disabled (current value: {t})"
                );
            }
            (Some(0), _) => DEFAULT_BLOCK_SIZE_TOKENS * AVERAGE_CHARS_PER_TOKEN,
            (Some(t), _) => usize::try_from(t)
                .ok()
                .and_then(|t| t.checked_mul(AVERAGE_CHARS_PER_TOKEN))
                .ok_or_else(|| InvalidParameter(format!("blockSizeTokens {t} is too large")))?,
            (None, Some(c)) if c <= 0 => {
                return invalid!("blockSize must be > 0 (current value: {c})");
            }
            (None, Some(c)) => {
                tracing::warn!(
                    block_size = c,
                    "prefix cache: 'blockSize' (characters) is deprecated; use 'blockSizeTokens'"
                );
                usize::try_from(c).unwrap_or(usize::MAX)
            }
            (None, None) => DEFAULT_BLOCK_SIZE_TOKENS * AVERAGE_CHARS_PER_TOKEN,
        };
        if self.max_prefix_tokens_to_match < 0 {
            return invalid!(
                "maxPrefixTokensToMatch must be >= 0 (current value: {})",
                self.max_prefix_tokens_to_match
            );
        }
        if self.max_prefix_blocks_to_match <= 0 && self.max_prefix_tokens_to_match == 0 {
            return invalid!(
                "maxPrefixBlocksToMatch must be > 0 (current value: {})",
                self.max_prefix_blocks_to_match
            );
        }
        if self.lru_capacity_per_server <= 0 {
            return invalid!(
                "lruCapacityPerServer must be > 0 (current value: {})",
                self.lru_capacity_per_server
            );
        }
        Ok(ApproxPrefixConfig {
            auto_tune: self.auto_tune,
            block_chars,
            max_blocks: usize::try_from(self.max_prefix_blocks_to_match).unwrap_or(0),
            max_tokens: usize::try_from(self.max_prefix_tokens_to_match).unwrap_or(0),
            lru_capacity: usize::try_from(self.lru_capacity_per_server).unwrap_or(usize::MAX),
        })
    }
}

/// What the approximate prefix plugins keep in the cycle state between producing and
/// recording.
#[derive(Debug, Clone, PartialEq)]
pub struct ApproxPrefixState {
    /// The [`ApproxPrefixCache`] instance that produced it (only that one records it).
    pub owner: u64,
    /// Chained block hashes of the prompt.
    pub hashes: Vec<u64>,
    /// Block size used, in characters.
    pub block_chars: usize,
    /// Consecutive leading blocks held, per endpoint (every endpoint of the index).
    pub matches: PrefixMatches,
}

impl ApproxPrefixState {
    /// Blocks `id` holds.
    pub fn matched(&self, id: EndpointId) -> u32 {
        self.matches
            .iter()
            .find(|(e, _)| *e == id.0)
            .map_or(0, |(_, n)| *n)
    }
}

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// Hashing, index and metrics of one approximate prefix plugin instance.
pub struct ApproxPrefixCache {
    id: u64,
    config: ApproxPrefixConfig,
    index: ApproxIndex,
    metrics: PrefixIndexerMetrics,
    endpoints: Option<Arc<dyn EndpointSource>>,
    start: Instant,
    next_sweep_ms: AtomicU64,
    /// Local inserts for the EPP's other replicas (HA sync), once recording started.
    recorder: Recorder,
}

impl std::fmt::Debug for ApproxPrefixCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApproxPrefixCache")
            .field("id", &self.id)
            .field("config", &self.config)
            .field("entries", &self.index.len())
            .finish()
    }
}

impl ApproxPrefixCache {
    /// A cache from validated settings.
    pub fn new(
        config: ApproxPrefixConfig,
        metrics: PrefixIndexerMetrics,
        endpoints: Option<Arc<dyn EndpointSource>>,
    ) -> Self {
        Self {
            id: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            index: ApproxIndex::new(ApproxIndexConfig::for_capacity(config.lru_capacity)),
            config,
            metrics,
            endpoints,
            start: Instant::now(),
            next_sweep_ms: AtomicU64::new(SWEEP_INTERVAL_MS),
            recorder: Recorder::new(),
        }
    }

    /// A cache from a factory input (parameters validated).
    pub fn from_input(i: &FactoryInput<'_>) -> Result<Self, PluginError> {
        let p: ApproxPrefixParams = params(i.parameters)?;
        let config = p.resolve()?;
        Ok(Self::new(
            config,
            i.handle.metrics.prefix.clone(),
            i.handle.endpoints.clone(),
        ))
    }

    /// Instance id (the `owner` of the states it produces).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The data layer's current endpoints, when the runtime provides them.
    pub fn endpoint_set(&self) -> Option<Arc<llmsched_core::endpoint::EndpointSet>> {
        self.endpoints.as_ref().map(|e| e.snapshot())
    }

    /// The settings.
    pub fn config(&self) -> &ApproxPrefixConfig {
        &self.config
    }

    /// The index.
    pub fn index(&self) -> &ApproxIndex {
        &self.index
    }

    /// Block size in characters for a request whose first candidate is `first`.
    pub fn block_chars(&self, first: Option<&Endpoint>) -> usize {
        if self.config.auto_tune
            && let Some(bs) = first
                .and_then(|e| e.metrics().block_size)
                .filter(|&b| b > 0)
        {
            return bs as usize * AVERAGE_CHARS_PER_TOKEN;
        }
        self.config.block_chars
    }

    /// LRU capacity of `endpoint`.
    pub fn capacity(&self, endpoint: &Endpoint) -> usize {
        if self.config.auto_tune
            && let Some(n) = endpoint.metrics().num_gpu_blocks.filter(|&n| n > 0)
        {
            return usize::try_from(n).unwrap_or(usize::MAX);
        }
        self.config.lru_capacity
    }

    fn max_blocks(&self, block_chars: usize) -> usize {
        if self.config.max_tokens > 0 {
            let block_tokens = (block_chars / AVERAGE_CHARS_PER_TOKEN).max(1);
            (self.config.max_tokens / block_tokens).max(1)
        } else {
            self.config.max_blocks
        }
    }

    /// Hashes the request's prompt and writes [`ApproxPrefixState`] and [`PrefixCacheMatch`]
    /// (candidates with a match only) into `cycle`.
    pub fn produce(
        &self,
        request: &InferenceRequest,
        cycle: &mut CycleState,
        candidates: &[Candidate<'_>],
    ) {
        let block_chars = self.block_chars(candidates.first().map(|e| e.as_ref()));
        let mut hashes = Vec::new();
        if let Some(text) = request.prompt().prefix_text() {
            let seed = hashing::seed_hash(&request.target_model, request.cache_salt());
            hashing::hash_blocks(
                seed,
                text.as_bytes(),
                block_chars,
                self.max_blocks(block_chars),
                &mut hashes,
            );
        }
        let matches = if hashes.is_empty() {
            PrefixMatches::new()
        } else {
            self.index.longest_prefix(&hashes)
        };
        let mut m = PrefixCacheMatch {
            total_blocks: u32::try_from(hashes.len()).unwrap_or(u32::MAX),
            block_size: u32::try_from(block_chars).unwrap_or(u32::MAX),
            prompt_tokens: estimated_prompt_tokens(request),
            block_tokens: block_chars as f64 / AVERAGE_CHARS_PER_TOKEN as f64,
            ..Default::default()
        };
        if !matches.is_empty() {
            m.matched_blocks
                .reserve(matches.len().min(candidates.len()));
            if matches.len() * candidates.len() <= 256 {
                for &(ep, n) in &matches {
                    if candidates.iter().any(|c| c.id().0 == ep) {
                        m.matched_blocks.insert(EndpointId(ep), f64::from(n));
                    }
                }
            } else {
                with_positions(candidates, |pos| {
                    for &(ep, n) in &matches {
                        if pos.get(EndpointId(ep)).is_some() {
                            m.matched_blocks.insert(EndpointId(ep), f64::from(n));
                        }
                    }
                });
            }
        }
        cycle.insert(m);
        cycle.insert(ApproxPrefixState {
            owner: self.id,
            hashes,
            block_chars,
            matches,
        });
    }

    /// The match metrics of the decision (cheap; runs in `pre_request`).
    pub fn observe(&self, cycle: &CycleState, result: &SchedulingResult) {
        let Some(state) = self.own_state(cycle) else {
            return;
        };
        if let Some(t) = result.targets().first() {
            let matched = state.matched(t.id());
            let total = state.hashes.len();
            self.metrics
                .hit_ratio
                .observe(f64::from(matched) / total as f64);
            self.metrics
                .hit_bytes
                .observe((matched as usize * state.block_chars) as f64);
        }
    }

    /// Records the request's hashes for the chosen endpoint(s) — the primary target and a
    /// distinct prefill target. This is the costly part (a table probe per block, and as
    /// many evictions once an endpoint's LRU is full), so the hooks run it in
    /// `after_dispatch`, off the decision's latency.
    pub fn insert(&self, cycle: &CycleState, result: &SchedulingResult) {
        let Some(state) = self.own_state(cycle) else {
            return;
        };
        let primary = result.targets().first();
        let prefill = result
            .profile(PREFILL_PROFILE)
            .and_then(|r| r.targets.first())
            .filter(|p| primary.is_none_or(|t| t.id() != p.id()));
        for target in primary.into_iter().chain(prefill) {
            self.index
                .insert(target.id().0, self.capacity(target), &state.hashes);
            self.recorder.record(|| LocalDelta {
                op: DeltaOp::Blocks,
                endpoint: target.id(),
                keys: state.hashes.clone(),
                ttl: std::time::Duration::ZERO,
                at: Instant::now(),
            });
        }
        self.publish_size();
        self.maybe_sweep();
    }

    /// The cycle's prefix state when this instance produced it and it has blocks.
    fn own_state<'a>(&self, cycle: &'a CycleState) -> Option<&'a ApproxPrefixState> {
        cycle
            .get::<ApproxPrefixState>()
            .filter(|s| s.owner == self.id && !s.hashes.is_empty())
    }

    /// Forgets an endpoint.
    pub fn purge(&self, id: EndpointId) {
        let n = self.index.remove_endpoint(id.0);
        if n > 0 {
            tracing::debug!(endpoint = %id, blocks = n, "prefix cache: forgot departed endpoint");
        }
        self.publish_size();
    }

    fn publish_size(&self) {
        self.metrics
            .size
            .set(i64::try_from(self.index.len()).unwrap_or(i64::MAX));
        self.metrics
            .memory_bytes
            .set(i64::try_from(self.index.memory_bytes()).unwrap_or(i64::MAX));
    }

    /// Reconciles the index with the data layer's endpoints every two minutes.
    fn maybe_sweep(&self) {
        let Some(src) = &self.endpoints else {
            return;
        };
        let now_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let due = self.next_sweep_ms.load(Ordering::Relaxed);
        if now_ms < due
            || self
                .next_sweep_ms
                .compare_exchange(
                    due,
                    now_ms + SWEEP_INTERVAL_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        let snapshot = src.snapshot();
        let mut alive: Vec<u32> = snapshot.endpoints.iter().map(|e| e.id().0).collect();
        alive.sort_unstable();
        let removed = self
            .index
            .retain_endpoints(|e| alive.binary_search(&e).is_ok());
        if removed > 0 {
            tracing::debug!(
                removed,
                "prefix cache: removed endpoints no longer in the pool"
            );
            self.publish_size();
        }
    }
}

/// The prompt's length in tokens as the reference's tokenizer-free `estimate` counts it:
/// token ids exactly, text as bytes / 4 (rounded up).
pub fn estimated_prompt_tokens(request: &InferenceRequest) -> u64 {
    match request.prompt() {
        llmsched_core::Prompt::TokenIds(ids) => ids.len() as u64,
        p => (p.text_len() as u64).div_ceil(AVERAGE_CHARS_PER_TOKEN as u64),
    }
}

/// Blocks per snapshot delta.
const SNAPSHOT_CHUNK: usize = 4096;

/// The index is shared with the EPP's other replicas as `Blocks` deltas: every local insert
/// (the request's hashes and the endpoint it went to) is recorded, and a peer's insert is
/// applied as if this replica had routed the request — with this replica's own LRU
/// capacity for the endpoint, so a peer cannot grow the index beyond its bounds.
impl ReplicatedState for ApproxPrefixCache {
    fn replica_kind(&self) -> &'static str {
        "approx-prefix"
    }

    fn start_recording(&self, capacity: usize) {
        self.recorder.start(capacity);
    }

    fn drain_local(&self, out: &mut Vec<LocalDelta>, max: usize) -> usize {
        self.recorder.drain(out, max)
    }

    fn dropped_local(&self) -> u64 {
        self.recorder.dropped()
    }

    fn apply_remote(&self, deltas: &[RemoteDelta<'_>]) -> usize {
        let mut applied = 0;
        for d in deltas {
            if d.op != DeltaOp::Blocks || d.keys.is_empty() {
                continue;
            }
            self.index
                .insert(d.endpoint.id().0, self.capacity(d.endpoint), d.keys);
            applied += d.keys.len();
        }
        if applied > 0 {
            self.publish_size();
        }
        applied
    }

    /// Per endpoint, its blocks least recently used chunk first (each chunk most recent
    /// first, as a prompt is recorded), so applying the chunks in order leaves the most
    /// recent blocks the most recent ones. `max_keys` is split evenly over the endpoints.
    fn snapshot(&self, out: &mut Vec<LocalDelta>, max_keys: usize) {
        let endpoints = self.index.endpoints();
        if endpoints.is_empty() {
            return;
        }
        let per_endpoint = max_keys / endpoints.len();
        let now = Instant::now();
        for ep in endpoints {
            let blocks = self.index.endpoint_blocks(ep, per_endpoint);
            for chunk in blocks.rchunks(SNAPSHOT_CHUNK) {
                out.push(LocalDelta {
                    op: DeltaOp::Blocks,
                    endpoint: EndpointId(ep),
                    keys: chunk.to_vec(),
                    ttl: std::time::Duration::ZERO,
                    at: now,
                });
            }
        }
    }
}

/// Implements [`ReplicatedState`] for a plugin by forwarding to its `cache` field.
macro_rules! replicated_via_cache {
    ($ty:ty) => {
        impl llmsched_core::replica::ReplicatedState for $ty {
            fn replica_kind(&self) -> &'static str {
                self.cache.replica_kind()
            }
            fn start_recording(&self, capacity: usize) {
                self.cache.start_recording(capacity)
            }
            fn drain_local(
                &self,
                out: &mut Vec<llmsched_core::replica::LocalDelta>,
                max: usize,
            ) -> usize {
                self.cache.drain_local(out, max)
            }
            fn dropped_local(&self) -> u64 {
                self.cache.dropped_local()
            }
            fn apply_remote(&self, deltas: &[llmsched_core::replica::RemoteDelta<'_>]) -> usize {
                self.cache.apply_remote(deltas)
            }
            fn snapshot(&self, out: &mut Vec<llmsched_core::replica::LocalDelta>, max_keys: usize) {
                self.cache.snapshot(out, max_keys)
            }
        }
    };
}
pub(crate) use replicated_via_cache;

/// True when some candidate holds at least one block according to `m`.
pub(crate) fn any_candidate_matched(m: &PrefixCacheMatch, candidates: &[Candidate<'_>]) -> bool {
    if m.matched_blocks.is_empty() {
        return false;
    }
    if m.matched_blocks.len() * candidates.len() <= 256 {
        return m
            .matched_blocks
            .iter()
            .any(|(id, &n)| n > 0.0 && candidates.iter().any(|c| c.id() == *id));
    }
    with_positions(candidates, |pos| {
        m.matched_blocks
            .iter()
            .any(|(id, &n)| n > 0.0 && pos.get(*id).is_some())
    })
}

/// Candidate positions by endpoint id, to place per-endpoint data without hashing.
pub(crate) enum Positions<'a> {
    /// `table[id]` = position, `u32::MAX` when not a candidate.
    Dense(&'a [u32]),
    /// Ids too sparse for a table.
    Sparse(hashbrown::HashMap<u32, u32>),
}

impl Positions<'_> {
    /// Position of `id` among the candidates.
    #[inline]
    pub(crate) fn get(&self, id: EndpointId) -> Option<usize> {
        match self {
            Positions::Dense(t) => t
                .get(id.0 as usize)
                .copied()
                .filter(|&p| p != u32::MAX)
                .map(|p| p as usize),
            Positions::Sparse(m) => m.get(&id.0).map(|&p| p as usize),
        }
    }
}

thread_local! {
    static POSITIONS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with the positions of `candidates` (a reused per-thread table when ids are dense,
/// which they are: ids are assigned in order as endpoints appear). Not reentrant: `f` must
/// not call it again.
pub(crate) fn with_positions<R>(
    candidates: &[Candidate<'_>],
    f: impl FnOnce(&Positions<'_>) -> R,
) -> R {
    let max = candidates
        .iter()
        .map(|c| c.id().0 as usize)
        .max()
        .unwrap_or(0);
    if max > 4 * candidates.len() + 4096 {
        let sparse = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id().0, u32::try_from(i).unwrap_or(u32::MAX)))
            .collect();
        return f(&Positions::Sparse(sparse));
    }
    POSITIONS.with(|t| {
        let mut t = t.borrow_mut();
        t.clear();
        t.resize(max + 1, u32::MAX);
        for (i, c) in candidates.iter().enumerate() {
            t[c.id().0 as usize] = u32::try_from(i).unwrap_or(u32::MAX);
        }
        f(&Positions::Dense(&t))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::endpoint::EndpointMetrics;
    use llmsched_core::scheduler::ProfileRunResult;

    fn params(v: serde_json::Value) -> Result<ApproxPrefixConfig, String> {
        let p: ApproxPrefixParams = crate::common::params(Some(&v)).map_err(|e| e.to_string())?;
        p.resolve().map_err(|e| e.to_string())
    }

    #[test]
    fn parameter_resolution() {
        let d = params(serde_json::json!({})).unwrap();
        assert_eq!(d, ApproxPrefixConfig::default());
        assert_eq!(d.block_chars, 64);
        assert_eq!(
            params(serde_json::json!({"blockSize": 128}))
                .unwrap()
                .block_chars,
            128
        );
        // blockSizeTokens wins over the deprecated blockSize.
        assert_eq!(
            params(serde_json::json!({"blockSize": 128, "blockSizeTokens": 8}))
                .unwrap()
                .block_chars,
            32
        );
        assert_eq!(
            params(serde_json::json!({"blockSizeTokens": 0}))
                .unwrap()
                .block_chars,
            64
        );
        let e = params(serde_json::json!({"blockSizeTokens": 0, "autoTune": false})).unwrap_err();
        assert!(e.contains("blockSizeTokens must be > 0"), "{e}");
        assert!(
            params(serde_json::json!({"blockSize": 0}))
                .unwrap_err()
                .contains("blockSize must be > 0")
        );
        assert!(
            params(serde_json::json!({"maxPrefixBlocksToMatch": 0}))
                .unwrap_err()
                .contains("maxPrefixBlocksToMatch")
        );
        assert!(
            params(serde_json::json!({"maxPrefixTokensToMatch": -1}))
                .unwrap_err()
                .contains("maxPrefixTokensToMatch")
        );
        assert!(
            params(serde_json::json!({"lruCapacityPerServer": 0}))
                .unwrap_err()
                .contains("lruCapacityPerServer")
        );
        assert!(
            params(serde_json::json!({"autoTune": "yes"}))
                .unwrap_err()
                .contains("invalid type")
        );
        assert!(
            params(serde_json::json!({"blocksize": 64}))
                .unwrap_err()
                .contains("unknown field `blocksize`")
        );
    }

    fn tuned(id: u32, block_size: Option<u32>, gpu_blocks: Option<u64>) -> Arc<Endpoint> {
        ep_with(
            id,
            &[],
            EndpointMetrics {
                block_size,
                num_gpu_blocks: gpu_blocks,
                ..load(0, 0, 0.0)
            },
        )
    }

    #[test]
    fn auto_tune_uses_engine_block_size_and_gpu_blocks() {
        let c = ApproxPrefixCache::new(
            ApproxPrefixConfig::default(),
            PrefixIndexerMetrics::default(),
            None,
        );
        let e = tuned(1, Some(32), Some(5000));
        assert_eq!(c.block_chars(Some(&e)), 128);
        assert_eq!(c.capacity(&e), 5000);
        let plain = tuned(2, None, None);
        assert_eq!(c.block_chars(Some(&plain)), 64);
        assert_eq!(c.capacity(&plain), 31_250);
        assert_eq!(c.block_chars(None), 64);
        let off = ApproxPrefixCache::new(
            ApproxPrefixConfig {
                auto_tune: false,
                lru_capacity: 77,
                ..Default::default()
            },
            PrefixIndexerMetrics::default(),
            None,
        );
        assert_eq!(off.block_chars(Some(&e)), 64);
        assert_eq!(off.capacity(&e), 77);
    }

    #[test]
    fn max_prefix_tokens_overrides_blocks() {
        let c = ApproxPrefixCache::new(
            ApproxPrefixConfig {
                max_tokens: 100,
                ..Default::default()
            },
            PrefixIndexerMetrics::default(),
            None,
        );
        // 64-char blocks = 16 tokens: 100 / 16 = 6 blocks.
        assert_eq!(c.max_blocks(64), 6);
        assert_eq!(c.max_blocks(4096), 1);
    }

    #[test]
    fn produce_then_record_then_match() {
        let c = ApproxPrefixCache::new(
            ApproxPrefixConfig::default(),
            PrefixIndexerMetrics::default(),
            None,
        );
        let eps = [ep(1), ep(2)];
        let cands: Vec<_> = eps.iter().collect();
        let mut req = request("m");
        req.body = Some(llmsched_core::request::RequestBody {
            prompt: llmsched_core::request::Prompt::Text("p".repeat(64 * 3 + 10)),
            ..llmsched_core::request::RequestBody::raw(bytes::Bytes::new())
        });
        let mut cycle = CycleState::new();
        c.produce(&req, &mut cycle, &cands);
        let m = cycle.get::<PrefixCacheMatch>().unwrap();
        assert_eq!((m.total_blocks, m.block_size), (4, 64));
        assert!(m.is_cold());
        let result = SchedulingResult {
            primary_profile: "default".into(),
            profiles: vec![(
                "default".into(),
                ProfileRunResult {
                    targets: vec![eps[1].clone()],
                },
            )],
        };
        c.observe(&cycle, &result);
        c.insert(&cycle, &result);
        assert_eq!(c.index().len(), 4);
        let mut cycle2 = CycleState::new();
        c.produce(&req, &mut cycle2, &cands);
        let m = cycle2.get::<PrefixCacheMatch>().unwrap();
        assert_eq!(m.matched(EndpointId(2)), 4.0);
        assert_eq!(m.matched(EndpointId(1)), 0.0);
        // Not a candidate this time: no entry.
        let mut cycle3 = CycleState::new();
        c.produce(&req, &mut cycle3, &cands[..1]);
        assert!(
            cycle3
                .get::<PrefixCacheMatch>()
                .unwrap()
                .matched_blocks
                .is_empty()
        );
        c.purge(EndpointId(2));
        assert!(c.index().is_empty());
    }
}
