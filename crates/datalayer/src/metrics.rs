//! The data layer's own Prometheus metrics, and the pool aggregates the EPP exports.
//!
//! Registered by [`register_metrics`] (into a registry without prefix):
//!
//! * `llmsched_datalayer_scrapes_total{endpoint}` — successful scrapes;
//! * `llmsched_datalayer_scrape_errors_total{endpoint, reason}` — failed scrapes, `reason`
//!   one of `connect`, `tls`, `timeout`, `http_status`, `body_too_large`, `body`, `parse`,
//!   `missing_metric`, `invalid_value`;
//! * `llmsched_datalayer_scrape_duration_seconds` — time per scrape attempt;
//! * `llmsched_datalayer_file_reloads_total{file, outcome}` — reloads of the endpoints and
//!   objectives files, `outcome` `applied` or `rejected`.
//!
//! Series of an endpoint are removed when it leaves the pool, so cardinality follows the
//! pool size.
//!
//! [`pool_stats`] computes the reference's `inference_pool_*` gauges from a snapshot; the
//! director registers those gauges.

use std::time::{Duration, Instant};

use llmsched_core::endpoint::EndpointSet;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Every `reason` label value of the scrape error counter.
pub const SCRAPE_ERROR_REASONS: [&str; 9] = [
    "connect",
    "tls",
    "timeout",
    "http_status",
    "body_too_large",
    "body",
    "parse",
    "missing_metric",
    "invalid_value",
];

/// Buckets of the scrape duration histogram (500 µs .. 2.5 s).
pub const SCRAPE_DURATION_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// Labels naming an endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// Endpoint name.
    pub endpoint: String,
}

/// Labels of the scrape error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScrapeErrorLabels {
    /// Endpoint name.
    pub endpoint: String,
    /// One of [`SCRAPE_ERROR_REASONS`].
    pub reason: String,
}

/// Labels of the file reload counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// The file's path.
    pub file: String,
    /// `applied` or `rejected`.
    pub outcome: String,
}

/// The data layer's metrics (cheap to clone; clones share the values).
#[derive(Clone, Debug)]
pub struct DataLayerMetrics {
    /// Successful scrapes per endpoint.
    pub scrapes: Family<EndpointLabels, Counter>,
    /// Failed scrapes per endpoint and reason.
    pub scrape_errors: Family<ScrapeErrorLabels, Counter>,
    /// Duration of scrape attempts.
    pub scrape_duration: Histogram,
    /// File reloads by file and outcome.
    pub file_reloads: Family<ReloadLabels, Counter>,
}

impl Default for DataLayerMetrics {
    fn default() -> Self {
        Self {
            scrapes: Family::default(),
            scrape_errors: Family::default(),
            scrape_duration: Histogram::new(SCRAPE_DURATION_BUCKETS),
            file_reloads: Family::default(),
        }
    }
}

impl DataLayerMetrics {
    /// Successful scrapes of `endpoint` so far.
    pub fn scrapes_of(&self, endpoint: &str) -> u64 {
        self.scrapes
            .get(&EndpointLabels {
                endpoint: endpoint.to_string(),
            })
            .map_or(0, |c| c.get())
    }

    /// Failed scrapes of `endpoint` so far, over all reasons.
    pub fn errors_of(&self, endpoint: &str) -> u64 {
        SCRAPE_ERROR_REASONS
            .iter()
            .map(|r| self.errors_of_reason(endpoint, r))
            .sum()
    }

    /// Failed scrapes of `endpoint` for one reason.
    pub fn errors_of_reason(&self, endpoint: &str, reason: &str) -> u64 {
        let labels = ScrapeErrorLabels {
            endpoint: endpoint.to_string(),
            reason: reason.to_string(),
        };
        // Reading must not create series for endpoints that never failed.
        self.scrape_errors.get(&labels).map_or(0, |c| c.get())
    }

    /// Drops the series of an endpoint that left the pool.
    pub(crate) fn forget_endpoint(&self, endpoint: &str) {
        self.scrapes.remove(&EndpointLabels {
            endpoint: endpoint.to_string(),
        });
        for r in SCRAPE_ERROR_REASONS {
            self.scrape_errors.remove(&ScrapeErrorLabels {
                endpoint: endpoint.to_string(),
                reason: r.to_string(),
            });
        }
    }
}

/// Creates the data layer's metrics and registers them into `registry`.
pub fn register_metrics(registry: &mut Registry) -> DataLayerMetrics {
    let m = DataLayerMetrics::default();
    registry.register(
        "llmsched_datalayer_scrapes",
        "Successful scrapes of model-server metrics, per endpoint.",
        m.scrapes.clone(),
    );
    registry.register(
        "llmsched_datalayer_scrape_errors",
        "Failed scrapes of model-server metrics, per endpoint and reason.",
        m.scrape_errors.clone(),
    );
    registry.register(
        "llmsched_datalayer_scrape_duration_seconds",
        "Duration of model-server metrics scrapes in seconds.",
        m.scrape_duration.clone(),
    );
    registry.register(
        "llmsched_datalayer_file_reloads",
        "Reloads of the endpoints and objectives files, by outcome.",
        m.file_reloads.clone(),
    );
    m
}

/// The reference's pool gauges, computed over endpoints with fresh metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolStats {
    /// `inference_pool_ready_pods`: endpoints whose metrics are not stale.
    pub ready_pods: usize,
    /// `inference_pool_average_kv_cache_utilization` (0..1); `None` without ready endpoints
    /// (the reference then leaves the gauge unchanged).
    pub average_kv_cache_utilization: Option<f64>,
    /// `inference_pool_average_queue_size`.
    pub average_queue_size: Option<f64>,
    /// `inference_pool_average_running_requests`.
    pub average_running_requests: Option<f64>,
}

/// Pool aggregates over the endpoints of `set` whose metrics are at most `staleness` old at
/// `now` (as the reference: stale endpoints count neither as ready nor in the averages).
pub fn pool_stats(set: &EndpointSet, now: Instant, staleness: Duration) -> PoolStats {
    let mut n = 0usize;
    let (mut kv, mut queue, mut running) = (0.0, 0.0, 0.0);
    for ep in &set.endpoints {
        let m = ep.metrics();
        if m.is_stale(now, staleness) {
            continue;
        }
        n += 1;
        kv += m.kv_cache_usage;
        queue += f64::from(m.waiting_queue_size);
        running += f64::from(m.running_requests);
    }
    let avg = |total: f64| (n > 0).then(|| total / n as f64);
    PoolStats {
        ready_pods: n,
        average_kv_cache_utilization: avg(kv),
        average_queue_size: avg(queue),
        average_running_requests: avg(running),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use llmsched_core::endpoint::{Endpoint, EndpointId, EndpointMeta, EndpointMetrics};
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn pool_stats_average_fresh_endpoints_only() {
        let now = Instant::now();
        let mk = |i: u32, q: u32, r: u32, kv: f64, age: Option<u64>| {
            let ep = Endpoint::new(
                EndpointId(i),
                EndpointMeta::from_addr(format!("127.0.0.1:{}", 1000 + i).parse().unwrap()),
            );
            ep.set_metrics(EndpointMetrics {
                waiting_queue_size: q,
                running_requests: r,
                kv_cache_usage: kv,
                updated_at: age.map(|a| now - Duration::from_millis(a)),
                ..Default::default()
            });
            Arc::new(ep)
        };
        let set = EndpointSet {
            endpoints: vec![
                mk(0, 2, 4, 0.2, Some(10)),
                mk(1, 4, 8, 0.6, Some(100)),
                mk(2, 100, 100, 1.0, Some(5_000)), // stale
                mk(3, 100, 100, 1.0, None),        // never scraped
            ],
            generation: 1,
            synced: true,
        };
        let s = pool_stats(&set, now, Duration::from_secs(2));
        assert_eq!(s.ready_pods, 2);
        assert!((s.average_kv_cache_utilization.unwrap() - 0.4).abs() < 1e-12);
        assert_eq!(s.average_queue_size, Some(3.0));
        assert_eq!(s.average_running_requests, Some(6.0));
        let empty = pool_stats(&EndpointSet::default(), now, Duration::from_secs(2));
        assert_eq!(empty.ready_pods, 0);
        assert_eq!(empty.average_queue_size, None);
    }

    #[test]
    fn registered_names_and_forgetting_an_endpoint() {
        let mut reg = Registry::default();
        let m = register_metrics(&mut reg);
        m.scrapes
            .get_or_create(&EndpointLabels {
                endpoint: "a".into(),
            })
            .inc();
        m.scrape_errors
            .get_or_create(&ScrapeErrorLabels {
                endpoint: "a".into(),
                reason: "timeout".into(),
            })
            .inc_by(2);
        assert_eq!(m.scrapes_of("a"), 1);
        assert_eq!(m.errors_of("a"), 2);
        assert_eq!(m.errors_of_reason("a", "timeout"), 2);
        let mut out = String::new();
        encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("llmsched_datalayer_scrapes_total{endpoint=\"a\"} 1"),
            "{out}"
        );
        assert!(
            out.contains(
                "llmsched_datalayer_scrape_errors_total{endpoint=\"a\",reason=\"timeout\"} 2"
            ),
            "{out}"
        );
        assert!(
            !out.contains("reason=\"connect\""),
            "reads create no series: {out}"
        );
        m.forget_endpoint("a");
        let mut out = String::new();
        encode(&mut out, &reg).unwrap();
        assert!(!out.contains("endpoint=\"a\""), "{out}");
    }
}
