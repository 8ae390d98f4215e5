//! The endpoint model: one model-server port the scheduler can pick.
//!
//! An [`Endpoint`] is shared (`Arc`) between the data layer, which writes its metrics, and
//! every scheduling cycle, which reads them. Writes never block reads: the latest scraped
//! [`EndpointMetrics`] are swapped in atomically (`arc-swap`), and the EPP's own in-flight
//! counts are plain atomics. The set of endpoints is itself an immutable [`EndpointSet`]
//! snapshot, replaced wholesale when discovery changes it.
//!
//! Each endpoint also carries its health ([`crate::health`]): whether it may be routed to,
//! decided from scrapes and from the failures the transports report, with atomics only.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::health::{
    FailureKind, Health, HealthCounters, HealthPolicy, HealthState, Transition, clock_ms,
};

/// Well-known endpoint labels.
pub mod label {
    /// P/D role: `prefill`, `decode`, `prefill-decode`, `both`, `encode`.
    pub const ROLE: &str = "llm-d.ai/role";
    /// Which metric-name mapping to use: `vllm` (default), `sglang`, `trtllm`, `triton`.
    pub const ENGINE_TYPE: &str = "llm-d.ai/engine-type";
    /// `min-max` token range the endpoint is meant for.
    pub const CONTEXT_LENGTH_RANGE: &str = "llm-d.ai/context-length-range";
}

/// Process-unique, never reused id of an endpoint; plugins key their per-endpoint state on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u32);

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Static facts about an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointMeta {
    /// Name (pod name, or `ip:port` when none was given).
    pub name: String,
    /// IP address.
    pub address: IpAddr,
    /// Port.
    pub port: u16,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

impl EndpointMeta {
    /// Metadata with no labels, named `ip:port`.
    pub fn from_addr(addr: SocketAddr) -> Self {
        Self {
            name: addr.to_string(),
            address: addr.ip(),
            port: addr.port(),
            labels: BTreeMap::new(),
        }
    }

    /// The socket address.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

/// The latest metrics scraped from an endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointMetrics {
    /// Requests waiting in the engine's queue (`vllm:num_requests_waiting`).
    pub waiting_queue_size: u32,
    /// Requests running in the engine (`vllm:num_requests_running`).
    pub running_requests: u32,
    /// KV-cache usage, 0..1 (`vllm:kv_cache_usage_perc`).
    pub kv_cache_usage: f64,
    /// LoRA adapters running (`vllm:lora_requests_info{running_lora_adapters}`).
    pub running_lora_adapters: Vec<String>,
    /// LoRA adapters waiting (`vllm:lora_requests_info{waiting_lora_adapters}`).
    pub waiting_lora_adapters: Vec<String>,
    /// Maximum adapters loaded at once (`vllm:lora_requests_info{max_lora}`); 0 when unknown.
    pub max_lora: u32,
    /// Engine KV block size in tokens (`vllm:cache_config_info{block_size}`).
    pub block_size: Option<u32>,
    /// Engine KV blocks (`vllm:cache_config_info{num_gpu_blocks}`).
    pub num_gpu_blocks: Option<u64>,
    /// When these values were scraped; `None` before the first successful scrape.
    pub updated_at: Option<Instant>,
}

impl Default for EndpointMetrics {
    fn default() -> Self {
        Self {
            waiting_queue_size: 0,
            running_requests: 0,
            kv_cache_usage: 0.0,
            running_lora_adapters: Vec::new(),
            waiting_lora_adapters: Vec::new(),
            max_lora: 0,
            block_size: None,
            num_gpu_blocks: None,
            updated_at: None,
        }
    }
}

impl EndpointMetrics {
    /// True when never scraped or older than `threshold` at `now`.
    pub fn is_stale(&self, now: Instant, threshold: Duration) -> bool {
        match self.updated_at {
            None => true,
            Some(t) => now.saturating_duration_since(t) > threshold,
        }
    }
}

/// One endpoint: metadata, latest metrics and the EPP's own in-flight accounting.
#[derive(Debug)]
pub struct Endpoint {
    id: EndpointId,
    meta: EndpointMeta,
    hostport: String,
    metrics: ArcSwap<EndpointMetrics>,
    /// In-flight counts of the EPP's other replicas (HA sync), absolute.
    peer_load: PeerLoad,
    inflight_requests: AtomicI64,
    inflight_tokens: AtomicI64,
    dispatched_total: AtomicU64,
    health: HealthState,
}

impl Endpoint {
    /// A new endpoint with default (never scraped) metrics.
    pub fn new(id: EndpointId, meta: EndpointMeta) -> Self {
        let hostport = meta.socket_addr().to_string();
        Self {
            id,
            meta,
            hostport,
            metrics: ArcSwap::from_pointee(EndpointMetrics::default()),
            peer_load: PeerLoad::default(),
            inflight_requests: AtomicI64::new(0),
            inflight_tokens: AtomicI64::new(0),
            dispatched_total: AtomicU64::new(0),
            health: HealthState::new(),
        }
    }

    /// Process-unique id.
    pub fn id(&self) -> EndpointId {
        self.id
    }

    /// Metadata.
    pub fn meta(&self) -> &EndpointMeta {
        &self.meta
    }

    /// Name.
    pub fn name(&self) -> &str {
        &self.meta.name
    }

    /// `ip:port` (IPv6 in brackets), as written into the destination header.
    pub fn hostport(&self) -> &str {
        &self.hostport
    }

    /// A label's value.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.meta.labels.get(key).map(String::as_str)
    }

    /// The latest metrics (a cheap, lock-free load).
    pub fn metrics(&self) -> arc_swap::Guard<Arc<EndpointMetrics>> {
        self.metrics.load()
    }

    /// Replaces the metrics. Their `updated_at` is the endpoint's last successful scrape
    /// for its health (the active signal and the half-open probe).
    pub fn set_metrics(&self, metrics: EndpointMetrics) {
        self.health.set_scraped(metrics.updated_at);
        self.metrics.store(Arc::new(metrics));
    }

    /// The endpoint's health at `now`.
    pub fn health(&self, now: Instant, policy: &HealthPolicy) -> Health {
        self.health.health_at(clock_ms(now), policy)
    }

    /// True when the endpoint may be routed to at `now_ms` ([`clock_ms`]): the request
    /// path's check, a few relaxed atomic loads.
    #[inline]
    pub fn is_routable_at(&self, now_ms: u64, policy: &HealthPolicy) -> bool {
        self.health.is_routable_at(now_ms, policy)
    }

    /// Reports a failure seen while talking to the endpoint (opens its circuit breaker at
    /// once) and logs the health transition it causes. Returns true when this failure
    /// opened the circuit.
    pub fn record_failure(&self, kind: FailureKind, now: Instant, policy: &HealthPolicy) -> bool {
        let now_ms = clock_ms(now);
        let opened = self.health.record_failure(kind, now_ms, policy);
        if opened {
            tracing::debug!(
                endpoint = %self.name(),
                failure = kind.as_str(),
                backoff = ?policy.backoff_for(self.health.level()),
                "circuit opened"
            );
        }
        self.observe_health_at(now_ms, policy);
        opened
    }

    /// Reports a response received through the endpoint (resets the backoff once the
    /// endpoint is healthy). One relaxed load (no clock read) when there is nothing to reset.
    #[inline]
    pub fn record_success(&self, policy: &HealthPolicy) {
        if self.health.level() != 0 {
            self.health.record_success(clock_ms(Instant::now()), policy);
        }
    }

    /// Logs and counts the endpoint's health transition since the last observation, if
    /// any: `warn` when it becomes unhealthy, `info` when it is healthy again, `debug` for
    /// a change of reason only. Called after every scrape and every reported failure.
    pub fn observe_health(&self, now: Instant, policy: &HealthPolicy) -> Option<Transition> {
        self.observe_health_at(clock_ms(now), policy)
    }

    fn observe_health_at(&self, now_ms: u64, policy: &HealthPolicy) -> Option<Transition> {
        let t = self.health.observe(now_ms, policy)?;
        let from = t.from.map_or("unknown", Health::as_str);
        if t.flipped() && t.to.is_healthy() && t.from == Some(Health::NeverScraped) {
            tracing::info!(endpoint = %self.name(), "endpoint is healthy (first successful scrape): routable");
        } else if t.flipped() && t.to.is_healthy() {
            tracing::info!(endpoint = %self.name(), from, "endpoint is healthy again: routable");
        } else if t.flipped() {
            tracing::warn!(
                endpoint = %self.name(),
                reason = t.to.as_str(),
                retry_after = ?policy.backoff_for(self.health.level().max(1)),
                "endpoint is unhealthy: not routable until a scrape succeeds"
            );
        } else {
            tracing::debug!(endpoint = %self.name(), from, to = t.to.as_str(), "endpoint health changed");
        }
        Some(t)
    }

    /// Health transition and failure counters.
    pub fn health_counters(&self) -> HealthCounters {
        self.health.counters()
    }

    /// Requests the EPP has sent to this endpoint that have not completed.
    pub fn inflight_requests(&self) -> u64 {
        self.inflight_requests.load(Ordering::Relaxed).max(0) as u64
    }

    /// Estimated prompt+output tokens of those requests.
    pub fn inflight_tokens(&self) -> u64 {
        self.inflight_tokens.load(Ordering::Relaxed).max(0) as u64
    }

    /// Requests ever dispatched here.
    pub fn dispatched_total(&self) -> u64 {
        self.dispatched_total.load(Ordering::Relaxed)
    }

    /// Records a dispatch of a request of about `tokens` tokens. Pair with [`Self::complete`].
    pub fn dispatch(&self, tokens: u64) {
        self.inflight_requests.fetch_add(1, Ordering::Relaxed);
        self.inflight_tokens
            .fetch_add(i64::try_from(tokens).unwrap_or(i64::MAX), Ordering::Relaxed);
        self.dispatched_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the completion of a request dispatched with `tokens`.
    pub fn complete(&self, tokens: u64) {
        self.inflight_requests.fetch_sub(1, Ordering::Relaxed);
        self.inflight_tokens
            .fetch_sub(i64::try_from(tokens).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// Sets the requests and tokens the EPP's other replicas have in flight here (the HA
    /// sync's sum of their latest reports; absolute values, not increments).
    pub fn set_peer_inflight(&self, requests: u64, tokens: u64) {
        self.peer_load.requests.store(requests, Ordering::Relaxed);
        self.peer_load.tokens.store(tokens, Ordering::Relaxed);
    }

    /// Requests the EPP's other replicas have in flight here (0 without HA sync).
    pub fn peer_inflight_requests(&self) -> u64 {
        self.peer_load.requests.load(Ordering::Relaxed)
    }

    /// Tokens the EPP's other replicas have in flight here (0 without HA sync).
    pub fn peer_inflight_tokens(&self) -> u64 {
        self.peer_load.tokens.load(Ordering::Relaxed)
    }

    /// Requests in flight here from this EPP and its synced replicas: what the load scorers
    /// read, so that replicas behind one gateway balance as one EPP would.
    #[inline]
    pub fn fleet_inflight_requests(&self) -> u64 {
        self.inflight_requests()
            .saturating_add(self.peer_inflight_requests())
    }

    /// Tokens in flight here from this EPP and its synced replicas.
    #[inline]
    pub fn fleet_inflight_tokens(&self) -> u64 {
        self.inflight_tokens()
            .saturating_add(self.peer_inflight_tokens())
    }
}

/// The other replicas' in-flight figures for one endpoint.
#[derive(Debug, Default)]
struct PeerLoad {
    requests: AtomicU64,
    tokens: AtomicU64,
}

/// An immutable snapshot of the pool's endpoints.
#[derive(Debug, Default)]
pub struct EndpointSet {
    /// The endpoints, in a stable order (by name).
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Incremented on every change of membership.
    pub generation: u64,
    /// True once discovery has produced its first complete list (drives readiness).
    pub synced: bool,
}

impl EndpointSet {
    /// Endpoint by `ip:port`.
    pub fn by_hostport(&self, hostport: &str) -> Option<&Arc<Endpoint>> {
        self.endpoints.iter().find(|e| e.hostport() == hostport)
    }

    /// Endpoint by name.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Endpoint>> {
        self.endpoints.iter().find(|e| e.name() == name)
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

/// Where the director gets the current endpoints from (implemented by the data layer).
pub trait EndpointSource: Send + Sync {
    /// The current snapshot.
    fn snapshot(&self) -> Arc<EndpointSet>;
}

/// A fixed endpoint set; handy for tests and benchmarks.
#[derive(Debug)]
pub struct StaticEndpoints(pub Arc<EndpointSet>);

impl StaticEndpoints {
    /// Endpoints at `addrs`, ids assigned in order from 0.
    pub fn from_addrs(addrs: &[SocketAddr]) -> Self {
        let endpoints = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| {
                Arc::new(Endpoint::new(
                    EndpointId(u32::try_from(i).unwrap_or(u32::MAX)),
                    EndpointMeta::from_addr(*a),
                ))
            })
            .collect();
        Self(Arc::new(EndpointSet {
            endpoints,
            generation: 1,
            synced: true,
        }))
    }
}

impl EndpointSource for StaticEndpoints {
    fn snapshot(&self) -> Arc<EndpointSet> {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflight_counts_pair_up_and_never_go_negative() {
        let e = Endpoint::new(
            EndpointId(0),
            EndpointMeta::from_addr("127.0.0.2:8000".parse().unwrap()),
        );
        assert_eq!(e.hostport(), "127.0.0.2:8000");
        e.dispatch(100);
        e.dispatch(50);
        assert_eq!(e.inflight_requests(), 2);
        assert_eq!(e.inflight_tokens(), 150);
        e.complete(100);
        assert_eq!(e.inflight_requests(), 1);
        assert_eq!(e.inflight_tokens(), 50);
        e.complete(50);
        e.complete(50);
        assert_eq!(e.inflight_requests(), 0);
        assert_eq!(e.dispatched_total(), 2);
    }

    #[test]
    fn fleet_counts_add_the_peers_absolute_figures() {
        let e = Endpoint::new(
            EndpointId(0),
            EndpointMeta::from_addr("127.0.0.2:8000".parse().unwrap()),
        );
        e.dispatch(100);
        assert_eq!(
            (e.fleet_inflight_requests(), e.fleet_inflight_tokens()),
            (1, 100)
        );
        e.set_peer_inflight(3, 900);
        assert_eq!(
            (e.fleet_inflight_requests(), e.fleet_inflight_tokens()),
            (4, 1000)
        );
        // Absolute: a later report replaces the earlier one.
        e.set_peer_inflight(1, 10);
        assert_eq!(
            (e.fleet_inflight_requests(), e.fleet_inflight_tokens()),
            (2, 110)
        );
        assert_eq!(e.inflight_requests(), 1);
        assert_eq!(e.peer_inflight_requests(), 1);
    }

    #[test]
    fn ipv6_hostport_is_bracketed() {
        let e = Endpoint::new(
            EndpointId(1),
            EndpointMeta::from_addr("[::1]:9000".parse().unwrap()),
        );
        assert_eq!(e.hostport(), "[::1]:9000");
    }

    #[test]
    fn staleness() {
        let now = Instant::now();
        let mut m = EndpointMetrics::default();
        assert!(m.is_stale(now, Duration::from_secs(2)));
        m.updated_at = Some(now);
        assert!(!m.is_stale(now + Duration::from_secs(1), Duration::from_secs(2)));
        assert!(m.is_stale(now + Duration::from_secs(3), Duration::from_secs(2)));
    }
}
