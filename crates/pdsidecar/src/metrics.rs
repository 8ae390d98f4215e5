//! The sidecar's own Prometheus metrics (the reference exports none; it has traces only).
//!
//! | metric | type | meaning |
//! | --- | --- | --- |
//! | `llmsched_pd_sidecar_requests_total{route}` | counter | requests by route: `pd` (disaggregated: a prefiller was named), `passthrough` (forwarded untouched), `rejected` (answered by the sidecar with an error) |
//! | `llmsched_pd_sidecar_rejected_total{reason}` | counter | requests refused: `bad_header`, `ssrf`, `bad_json`, `body_too_large`, `bad_body` |
//! | `llmsched_pd_sidecar_prefill_duration_seconds` | histogram | prefill hop latency (successful hops, retries included) |
//! | `llmsched_pd_sidecar_prefill_retries_total` | counter | prefill attempts repeated after a connect error or a 5xx |
//! | `llmsched_pd_sidecar_prefill_fallbacks_total{reason}` | counter | requests decoded with a local prefill because the prefill hop failed: `connect`, `server_error` (5xx), `timeout`, `transport`, `invalid_response`, `missing_kv_transfer_params` |
//! | `llmsched_pd_sidecar_prefill_client_errors_total` | counter | prefill answers 4xx relayed to the client (no fallback, as the reference) |
//! | `llmsched_pd_sidecar_decoder_errors_total{reason}` | counter | decode replica unreachable (`connect`) or failing mid-request (`transport`) |
//! | `llmsched_pd_sidecar_inflight_requests` | gauge | requests being served (until their response body ends or the client goes away) |

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// Prefill-hop latency buckets (seconds): 5 ms to 2 min.
const PREFILL_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 120.0,
];

/// The sidecar's counters.
#[derive(Debug)]
pub struct SidecarMetrics {
    registry: Registry,
    requests: Family<Route, Counter>,
    rejected: Family<Reason, Counter>,
    prefill_duration: Histogram,
    retries: Counter,
    fallbacks: Family<Reason, Counter>,
    client_errors: Counter,
    decoder_errors: Family<Reason, Counter>,
    inflight: Gauge<i64, AtomicI64>,
}

impl Default for SidecarMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl SidecarMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Route, Counter>::default();
        let rejected = Family::<Reason, Counter>::default();
        let prefill_duration = Histogram::new(PREFILL_BUCKETS);
        let retries = Counter::default();
        let fallbacks = Family::<Reason, Counter>::default();
        let client_errors = Counter::default();
        let decoder_errors = Family::<Reason, Counter>::default();
        let inflight = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "llmsched_pd_sidecar_requests",
            "Requests by route: pd (a prefiller was named), passthrough, rejected",
            requests.clone(),
        );
        registry.register(
            "llmsched_pd_sidecar_rejected",
            "Requests refused by the sidecar, by reason",
            rejected.clone(),
        );
        registry.register(
            "llmsched_pd_sidecar_prefill_duration_seconds",
            "Prefill hop latency (successful hops, retries included)",
            prefill_duration.clone(),
        );
        registry.register(
            "llmsched_pd_sidecar_prefill_retries",
            "Prefill attempts repeated after a connect error or a 5xx",
            retries.clone(),
        );
        registry.register(
            "llmsched_pd_sidecar_prefill_fallbacks",
            "Requests decoded with a local prefill because the prefill hop failed, by reason",
            fallbacks.clone(),
        );
        registry.register(
            "llmsched_pd_sidecar_prefill_client_errors",
            "Prefill 4xx answers relayed to the client",
            client_errors.clone(),
        );
        registry.register(
            "llmsched_pd_sidecar_decoder_errors",
            "Decode replica unreachable (connect) or failing mid-request (transport)",
            decoder_errors.clone(),
        );
        registry.register(
            "llmsched_pd_sidecar_inflight_requests",
            "Requests being served",
            inflight.clone(),
        );
        for r in ["pd", "passthrough", "rejected"] {
            let _ = requests.get_or_create(&Route { route: r });
        }
        Self {
            registry,
            requests,
            rejected,
            prefill_duration,
            retries,
            fallbacks,
            client_errors,
            decoder_errors,
            inflight,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if prometheus_client::encoding::text::encode(&mut s, &self.registry).is_err() {
            s.clear();
        }
        s
    }

    pub(crate) fn request(&self, route: &'static str) {
        self.requests.get_or_create(&Route { route }).inc();
    }

    pub(crate) fn reject(&self, reason: &'static str) {
        self.request("rejected");
        self.rejected.get_or_create(&Reason { reason }).inc();
    }

    pub(crate) fn prefill_done(&self, seconds: f64) {
        self.prefill_duration.observe(seconds);
    }

    pub(crate) fn retry(&self) {
        self.retries.inc();
    }

    pub(crate) fn fallback(&self, reason: &'static str) {
        self.fallbacks.get_or_create(&Reason { reason }).inc();
    }

    pub(crate) fn client_error(&self) {
        self.client_errors.inc();
    }

    pub(crate) fn decoder_error(&self, reason: &'static str) {
        self.decoder_errors.get_or_create(&Reason { reason }).inc();
    }

    pub(crate) fn inflight(&self, delta: i64) {
        self.inflight.inc_by(delta);
    }
}
