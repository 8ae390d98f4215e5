//! Endpoint health metrics, computed from the endpoints' atomics when Prometheus scrapes
//! (nothing is recorded on the request path, and series follow the pool: an endpoint that
//! leaves the pool leaves no series behind).
//!
//! * `llmsched_endpoint_healthy{endpoint}` — 1 when the endpoint is routable now, else 0
//!   (see [`llmsched_core::health`] for the rules);
//! * `llmsched_endpoint_health_transitions_total{endpoint, to}` — flips between healthy and
//!   unhealthy, `to` = `healthy` or `unhealthy`;
//! * `llmsched_endpoint_failures_total{endpoint, kind}` — failures reported by the
//!   transports and the scraper, `kind` = `connect`, `reset`, `timeout` or `gateway`.

use std::sync::Arc;
use std::time::Instant;

use llmsched_core::endpoint::EndpointSource;
use llmsched_core::health::{FailureKind, HealthPolicy};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Name of the health gauge.
pub const HEALTHY_METRIC: &str = "llmsched_endpoint_healthy";

type Labels = Vec<(&'static str, String)>;

/// Exposes the endpoints' health (see the module documentation).
pub struct HealthCollector {
    endpoints: Arc<dyn EndpointSource>,
    policy: HealthPolicy,
}

impl std::fmt::Debug for HealthCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthCollector")
            .field("policy", &self.policy)
            .finish()
    }
}

impl HealthCollector {
    /// A collector over `endpoints`, judging health with `policy`.
    pub fn new(endpoints: Arc<dyn EndpointSource>, policy: HealthPolicy) -> Self {
        Self { endpoints, policy }
    }

    /// Registers the collector into `registry`.
    pub fn register(self, registry: &mut Registry) {
        registry.register_collector(Box::new(self));
    }
}

impl Collector for HealthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snap = self.endpoints.snapshot();
        if snap.endpoints.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let healthy: Family<Labels, Gauge> = Family::default();
        let transitions: Family<Labels, Counter> = Family::default();
        let failures: Family<Labels, Counter> = Family::default();
        for e in &snap.endpoints {
            let name = e.name().to_string();
            healthy
                .get_or_create(&vec![("endpoint", name.clone())])
                .set(i64::from(e.health(now, &self.policy).is_healthy()));
            let c = e.health_counters();
            for (to, n) in [
                ("healthy", c.became_healthy),
                ("unhealthy", c.became_unhealthy),
            ] {
                transitions
                    .get_or_create(&vec![("endpoint", name.clone()), ("to", to.to_string())])
                    .inc_by(n);
            }
            for kind in FailureKind::ALL {
                failures
                    .get_or_create(&vec![
                        ("endpoint", name.clone()),
                        ("kind", kind.as_str().to_string()),
                    ])
                    .inc_by(c.failures[kind as usize]);
            }
        }
        healthy.encode(encoder.encode_descriptor(
            HEALTHY_METRIC,
            "1 when the endpoint is routable (scraped recently, no recent connection failure), else 0",
            None,
            healthy.metric_type(),
        )?)?;
        transitions.encode(encoder.encode_descriptor(
            "llmsched_endpoint_health_transitions",
            "Endpoint health flips, by the state entered (healthy or unhealthy)",
            None,
            transitions.metric_type(),
        )?)?;
        failures.encode(encoder.encode_descriptor(
            "llmsched_endpoint_failures",
            "Failures seen talking to the endpoint (connect, reset, timeout, gateway)",
            None,
            failures.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmsched_core::endpoint::{EndpointMetrics, StaticEndpoints};

    #[test]
    fn exports_health_transitions_and_failures_per_endpoint() {
        let src = Arc::new(StaticEndpoints::from_addrs(&[
            "10.0.0.1:8000".parse().unwrap(),
            "10.0.0.2:8000".parse().unwrap(),
        ]));
        let policy = HealthPolicy::default();
        let eps = src.snapshot();
        let now = Instant::now();
        for e in &eps.endpoints {
            e.set_metrics(EndpointMetrics {
                updated_at: Some(now),
                ..Default::default()
            });
            e.observe_health(now, &policy);
        }
        eps.endpoints[1].record_failure(FailureKind::Connect, now, &policy);
        let mut registry = Registry::default();
        HealthCollector::new(src.clone(), policy).register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "llmsched_endpoint_healthy{endpoint=\"10.0.0.1:8000\"} 1",
            "llmsched_endpoint_healthy{endpoint=\"10.0.0.2:8000\"} 0",
            "llmsched_endpoint_health_transitions_total{endpoint=\"10.0.0.2:8000\",to=\"unhealthy\"} 1",
            "llmsched_endpoint_health_transitions_total{endpoint=\"10.0.0.1:8000\",to=\"unhealthy\"} 0",
            "llmsched_endpoint_failures_total{endpoint=\"10.0.0.2:8000\",kind=\"connect\"} 1",
            "llmsched_endpoint_failures_total{endpoint=\"10.0.0.1:8000\",kind=\"connect\"} 0",
        ] {
            assert!(text.contains(line), "missing {line} in:\n{text}");
        }
    }
}
