//! Endpoint health on the request path: which endpoints become candidates, what a gateway's
//! answer says about an endpoint, and the director's health metrics.
//!
//! Candidates are formed once per request, before data producers, filters, scorers and
//! pickers run, so every plugin and every profile sees only routable endpoints
//! ([`llmsched_core::health`] says which). When not a single endpoint (of those the subset
//! hint allows) is routable, the request fails open: every endpoint is a candidate again, as
//! in the reference, and `llmsched_endpoint_health_fail_open_total` counts it. An outage of
//! the EPP's own view (metrics port blocked, wrong `--model-server-metrics-path`, a network
//! partition between the EPP and the pods but not between the gateway and the pods) then
//! degrades to the reference's behaviour instead of failing every request with 503.
//!
//! Registered metrics ([`HealthMetrics::register`]):
//!
//! * `llmsched_endpoint_health_fail_open_total` — requests scheduled over every endpoint
//!   because none was healthy;
//! * `llmsched_reroutes_total` — requests scheduled again because connecting to their
//!   targets failed (the built-in proxy's retry; see [`crate::Director::reroute`]).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use llmsched_core::endpoint::{Endpoint, EndpointId, EndpointSet};
use llmsched_core::health::{HealthPolicy, clock_ms};
use llmsched_core::plugin::Candidate;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

/// How often the fail-open warning is logged at most.
const FAIL_OPEN_LOG_EVERY_MS: u64 = 10_000;

/// Body prefixes of Envoy's local replies when it got no response from the upstream it
/// connected to (or tried to): connection refused, reset or timed out before headers, or
/// the route's timeout. Another proxy in between (a mesh sidecar) answers the same way.
pub const GATEWAY_FAILURE_BODIES: [&[u8]; 2] = [
    b"upstream connect error or disconnect/reset before headers",
    b"upstream request timeout",
];

/// True when a response with `status` and a body starting with `body` is a gateway's report
/// that it could not reach the endpoint (not the model server's own answer).
pub fn is_gateway_failure(status: u16, body: &[u8]) -> bool {
    matches!(status, 502..=504) && GATEWAY_FAILURE_BODIES.iter().any(|p| body.starts_with(p))
}

/// The director's health metrics (unregistered by default; cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct HealthMetrics {
    /// Requests scheduled over every endpoint because none was healthy.
    pub fail_open: Counter,
    /// Requests scheduled again after connecting to their targets failed.
    pub reroutes: Counter,
}

impl HealthMetrics {
    /// Registers the metrics into `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "llmsched_endpoint_health_fail_open",
            "Requests scheduled over every endpoint because none was healthy",
            m.fail_open.clone(),
        );
        registry.register(
            "llmsched_reroutes",
            "Requests scheduled again because connecting to their targets failed",
            m.reroutes.clone(),
        );
        m
    }
}

/// Forms candidates: subset hint, exclusions, health (with the fail-open rule).
pub(crate) struct CandidateFilter<'p> {
    pub(crate) policy: &'p HealthPolicy,
    pub(crate) metrics: &'p HealthMetrics,
    pub(crate) last_fail_open_log: &'p AtomicU64,
}

/// A request's candidates: the routable endpoints, and those the subset hint allows but that
/// are held back as unhealthy (the scheduler falls back on them per profile, see
/// [`llmsched_core::scheduler::Scheduler::schedule_with_held_back`]).
pub(crate) struct Candidates<'a> {
    pub(crate) routable: Vec<Candidate<'a>>,
    pub(crate) held_back: Vec<Candidate<'a>>,
}

impl CandidateFilter<'_> {
    /// Endpoints of `snap` whose IP is in `hint_ips` (all when `None`) and not in `exclude`:
    /// those routable at `now_ms` as candidates, the others held back; all of them as
    /// candidates when none is routable (fail-open).
    pub(crate) fn candidates<'a>(
        &self,
        snap: &'a EndpointSet,
        hint_ips: Option<&[IpAddr]>,
        exclude: &[EndpointId],
        now_ms: u64,
    ) -> Candidates<'a> {
        let allowed = |e: &Endpoint| {
            hint_ips.is_none_or(|ips| ips.contains(&e.meta().address)) && !exclude.contains(&e.id())
        };
        if !self.policy.enabled {
            return Candidates {
                routable: snap.endpoints.iter().filter(|e| allowed(e)).collect(),
                held_back: Vec::new(),
            };
        }
        let mut routable = Vec::with_capacity(snap.endpoints.len());
        let mut held_back = Vec::new();
        for e in &snap.endpoints {
            if allowed(e) {
                if e.is_routable_at(now_ms, self.policy) {
                    routable.push(e);
                } else {
                    held_back.push(e);
                }
            }
        }
        if routable.is_empty() && !held_back.is_empty() {
            // Every allowed endpoint is held back: they are all candidates.
            self.fail_open(snap, now_ms);
            return Candidates {
                routable: held_back,
                held_back: Vec::new(),
            };
        }
        Candidates {
            routable,
            held_back,
        }
    }

    fn fail_open(&self, snap: &EndpointSet, now_ms: u64) {
        self.metrics.fail_open.inc();
        let last = self.last_fail_open_log.load(Ordering::Relaxed);
        if (last == 0 || now_ms.saturating_sub(last) >= FAIL_OPEN_LOG_EVERY_MS)
            && self
                .last_fail_open_log
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                endpoints = snap.len(),
                "no endpoint is healthy (never scraped, stale metrics or failing): scheduling over all of them (fail-open; logged at most every 10 s, counted in llmsched_endpoint_health_fail_open_total)"
            );
        }
    }
}

/// The current time on the health clock.
pub(crate) fn now_ms(now: std::time::Instant) -> u64 {
    clock_ms(now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use llmsched_core::endpoint::EndpointSource;
    use llmsched_core::endpoint::{EndpointMetrics, StaticEndpoints};
    use llmsched_core::health::FailureKind;
    use std::time::Instant;

    #[test]
    fn gateway_failures_are_recognised_by_status_and_body() {
        let refused = b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure";
        assert!(is_gateway_failure(503, refused));
        assert!(is_gateway_failure(504, b"upstream request timeout"));
        assert!(!is_gateway_failure(200, refused));
        assert!(!is_gateway_failure(503, b"{\"error\":\"overloaded\"}"));
        assert!(!is_gateway_failure(500, refused));
    }

    #[test]
    fn unhealthy_endpoints_are_not_candidates_unless_none_is_healthy() {
        let eps = StaticEndpoints::from_addrs(&[
            "10.0.0.1:8000".parse().unwrap(),
            "10.0.0.2:8000".parse().unwrap(),
            "10.0.0.3:8000".parse().unwrap(),
        ]);
        let snap = eps.snapshot();
        let policy = HealthPolicy::default();
        let metrics = HealthMetrics::default();
        let last = AtomicU64::new(0);
        let f = CandidateFilter {
            policy: &policy,
            metrics: &metrics,
            last_fail_open_log: &last,
        };
        let now = Instant::now();
        let names =
            |c: &[Candidate<'_>]| c.iter().map(|e| e.name().to_string()).collect::<Vec<_>>();
        // Nothing scraped yet: fail open.
        assert_eq!(
            f.candidates(&snap, None, &[], now_ms(now)).routable.len(),
            3
        );
        assert_eq!(metrics.fail_open.get(), 1);
        for e in &snap.endpoints[..2] {
            e.set_metrics(EndpointMetrics {
                updated_at: Some(now),
                ..Default::default()
            });
        }
        assert_eq!(
            names(&f.candidates(&snap, None, &[], now_ms(now)).routable),
            ["10.0.0.1:8000", "10.0.0.2:8000"]
        );
        snap.endpoints[0].record_failure(FailureKind::Connect, now, &policy);
        let c = f.candidates(&snap, None, &[], now_ms(now));
        assert_eq!(names(&c.routable), ["10.0.0.2:8000"]);
        assert_eq!(
            names(&c.held_back),
            ["10.0.0.1:8000", "10.0.0.3:8000"],
            "unhealthy ones are held back for the profiles' fail-open"
        );
        // Exclusions and hints narrow first; fail-open never brings back an exclusion.
        let ip2: [IpAddr; 1] = ["10.0.0.2".parse().unwrap()];
        assert_eq!(
            names(
                &f.candidates(&snap, Some(&ip2), &[snap.endpoints[1].id()], now_ms(now))
                    .routable
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            names(
                &f.candidates(&snap, None, &[snap.endpoints[1].id()], now_ms(now))
                    .routable
            ),
            ["10.0.0.1:8000", "10.0.0.3:8000"],
            "no healthy one left: fail open over the rest"
        );
        assert_eq!(metrics.fail_open.get(), 2);
        // Off: every endpoint, as the reference.
        let off = HealthPolicy {
            enabled: false,
            ..policy.clone()
        };
        let f = CandidateFilter { policy: &off, ..f };
        assert_eq!(
            f.candidates(&snap, None, &[], now_ms(now)).routable.len(),
            3
        );
    }

    fn req(prompt: &str) -> crate::IncomingRequest {
        crate::IncomingRequest::new(
            crate::testing::post_headers("/v1/completions"),
            crate::testing::completion_body("m", prompt, false),
        )
    }

    #[tokio::test]
    async fn the_director_never_schedules_onto_an_unhealthy_endpoint() {
        use crate::testing::*;
        let eps = endpoints(3);
        // .1 is the least loaded and would win; it fails.
        set_queue(&eps.0.endpoints[1], 3);
        set_queue(&eps.0.endpoints[2], 5);
        let d = crate::Director::builder(basic_config(1, ""), eps.clone()).build();
        let r = d.route(req("a")).await.unwrap();
        assert_eq!(r.destination(), "10.0.0.1:8000");
        drop(r);
        eps.0.endpoints[0].record_failure(FailureKind::Connect, Instant::now(), d.health_policy());
        for i in 0..5 {
            let r = d.route(req(&format!("p{i}"))).await.unwrap();
            assert_eq!(r.destination(), "10.0.0.2:8000");
        }
        // Header-only requests (random endpoint) avoid it too.
        for _ in 0..20 {
            let r = d
                .route_without_body(post_headers("/v1/models"), Instant::now())
                .unwrap();
            assert_ne!(r.destination(), "10.0.0.1:8000");
        }
    }

    #[tokio::test]
    async fn reroute_moves_the_request_and_its_accounting_to_another_endpoint() {
        use crate::testing::*;
        let eps = endpoints(3);
        set_queue(&eps.0.endpoints[1], 3);
        set_queue(&eps.0.endpoints[2], 5);
        let metrics = HealthMetrics::default();
        let d = crate::Director::builder(basic_config(1, ""), eps.clone())
            .health_metrics(metrics.clone())
            .build();
        let mut r = d.route(req("a")).await.unwrap();
        assert_eq!(r.destination(), "10.0.0.1:8000");
        assert_eq!(
            r.headers_to_set(),
            [("x-test-target".to_string(), "10.0.0.1:8000".to_string())]
        );
        r.run_after_dispatch();
        let e = &eps.0.endpoints;
        assert_eq!(e[0].inflight_requests(), 1);
        // Connecting to .1 failed: .2 is next best.
        let failed = [e[0].id()];
        e[0].record_failure(FailureKind::Connect, Instant::now(), d.health_policy());
        d.reroute(&mut r, &failed).unwrap();
        assert_eq!(r.destination(), "10.0.0.2:8000");
        assert_eq!(
            r.headers_to_set(),
            [("x-test-target".to_string(), "10.0.0.2:8000".to_string())]
        );
        assert!(
            !r.is_dispatched(),
            "the hooks' bookkeeping is due for the new target"
        );
        assert_eq!((e[0].inflight_requests(), e[1].inflight_requests()), (0, 1));
        assert_eq!(metrics.reroutes.get(), 1);
        // Even when every other endpoint is unhealthy, an excluded one never comes back.
        e[1].record_failure(FailureKind::Connect, Instant::now(), d.health_policy());
        d.reroute(&mut r, &[e[0].id(), e[1].id()]).unwrap();
        assert_eq!(r.destination(), "10.0.0.3:8000");
        let err = d
            .reroute(&mut r, &[e[0].id(), e[1].id(), e[2].id()])
            .unwrap_err();
        assert_eq!(err.http_status(), 503);
        r.finish();
        assert!(e.iter().all(|x| x.inflight_requests() == 0));
        assert_eq!(e[2].dispatched_total(), 1);
    }

    #[tokio::test]
    async fn a_gateway_local_reply_marks_the_endpoint_failing_and_a_model_server_503_does_not() {
        use crate::testing::*;
        let eps = endpoints(2);
        set_queue(&eps.0.endpoints[1], 3);
        let d = crate::Director::builder(basic_config(1, ""), eps.clone()).build();
        let policy = d.health_policy().clone();
        let e = &eps.0.endpoints;
        // The model server's own 503 says nothing about reachability.
        let mut r = d.route(req("a")).await.unwrap();
        r.on_response_headers(503, &post_headers("/"));
        let _ = r.on_response_chunk(Bytes::from_static(br#"{"error":"overloaded"}"#), true);
        r.finish();
        assert!(e[0].health(Instant::now(), &policy).is_healthy());
        // Envoy could not connect: its local reply goes through the response phase.
        let mut r = d.route(req("b")).await.unwrap();
        assert_eq!(r.destination(), "10.0.0.1:8000");
        r.on_response_headers(503, &post_headers("/"));
        let _ = r.on_response_chunk(
            Bytes::from_static(b"upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"),
            true,
        );
        r.finish();
        assert_eq!(
            e[0].health(Instant::now(), &policy),
            llmsched_core::health::Health::Failing
        );
        assert_eq!(
            e[0].health_counters().failures[FailureKind::Gateway as usize],
            1
        );
        let r = d.route(req("c")).await.unwrap();
        assert_eq!(r.destination(), "10.0.0.2:8000");
    }
}
