//! gRPC health transitions (real tonic client and server on loopback) and the `/metrics`
//! endpoint with its authorization answers (raw HTTP/1.1 on a socket).

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use llmsched_core::endpoint::{EndpointSet, EndpointSource};
use llmsched_ops::*;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Polls `cond` until it holds (generous deadline; no fixed sleeps in assertions).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A registry with one counter at 3.
fn registry() -> Arc<Registry> {
    let mut r = Registry::default();
    let c: Counter = Counter::default();
    c.inc_by(3);
    r.register("inference_extension_test_requests", "Requests seen", c);
    Arc::new(r)
}

/// An endpoint source whose snapshot the test replaces.
struct Swappable(ArcSwap<EndpointSet>);

impl EndpointSource for Swappable {
    fn snapshot(&self) -> Arc<EndpointSet> {
        self.0.load_full()
    }
}

async fn check(
    client: &mut HealthClient<tonic::transport::Channel>,
    svc: &str,
) -> Result<i32, tonic::Code> {
    client
        .check(HealthCheckRequest {
            service: svc.to_string(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| s.code())
}

async fn health_client(
    handle: HealthHandle,
    shutdown: &CancellationToken,
) -> HealthClient<tonic::transport::Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_health(listener, handle, shutdown.clone()));
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(ch)
}

const SERVING: i32 = ServingStatus::Serving as i32;
const NOT_SERVING: i32 = ServingStatus::NotServing as i32;
const UNKNOWN: i32 = ServingStatus::ServiceUnknown as i32;

/// Every name a probe or Envoy may ask, plus names nobody defined.
const ALL_NAMES: [&str; 7] = [
    "liveness",
    "readiness",
    "",
    "envoy.service.ext_proc.v3.ExternalProcessor",
    "inference-extension",
    "nope",
    "grpc.health.v1.Health",
];

#[tokio::test]
async fn without_election_every_service_name_follows_endpoint_sync() {
    let src = Arc::new(Swappable(ArcSwap::from_pointee(EndpointSet::default())));
    let shutdown = CancellationToken::new();
    let handle = HealthHandle::new();
    spawn_readiness_watch(
        handle.clone(),
        src.clone(),
        Duration::from_millis(5),
        shutdown.clone(),
    );
    let mut client = health_client(handle.clone(), &shutdown).await;
    // Before the pool is synced even liveness fails, as in the reference.
    for s in ALL_NAMES {
        assert_eq!(check(&mut client, s).await, Ok(NOT_SERVING), "{s:?}");
    }
    src.0.store(Arc::new(EndpointSet {
        synced: true,
        ..Default::default()
    }));
    let h = handle.clone();
    eventually("ready", move || h.is_ready()).await;
    for s in ALL_NAMES {
        assert_eq!(check(&mut client, s).await, Ok(SERVING), "{s:?}");
    }
    src.0.store(Arc::new(EndpointSet::default()));
    let h = handle.clone();
    eventually("unready", move || !h.is_ready()).await;
    assert_eq!(
        check(&mut client, "inference-extension").await,
        Ok(NOT_SERVING)
    );
    shutdown.cancel();
}

#[tokio::test]
async fn with_election_readiness_needs_the_synced_leader() {
    let shutdown = CancellationToken::new();
    let handle = HealthHandle::with_leader_election(true);
    let mut client = health_client(handle.clone(), &shutdown).await;
    let ready_names = [
        "readiness",
        "",
        "envoy.service.ext_proc.v3.ExternalProcessor",
    ];
    let expect = |client: &mut HealthClient<tonic::transport::Channel>, ready: i32| {
        let mut client = client.clone();
        async move {
            assert_eq!(check(&mut client, "liveness").await, Ok(SERVING));
            for s in ready_names {
                assert_eq!(check(&mut client, s).await, Ok(ready), "{s:?}");
            }
            for s in ["inference-extension", "nope", "Liveness"] {
                assert_eq!(check(&mut client, s).await, Ok(UNKNOWN), "{s:?}");
            }
        }
    };
    expect(&mut client, NOT_SERVING).await;
    handle.set_synced(true);
    expect(&mut client, NOT_SERVING).await; // a synced follower
    handle.set_leader(true);
    expect(&mut client, SERVING).await;
    handle.set_leader(false); // lease lost
    expect(&mut client, NOT_SERVING).await;
    handle.set_leader(true);
    handle.set_synced(false); // pool deleted
    expect(&mut client, NOT_SERVING).await;
    shutdown.cancel();
}

async fn next(s: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>) -> Option<i32> {
    use futures::StreamExt;
    tokio::time::timeout(Duration::from_secs(30), s.next())
        .await
        .expect("a watch update")
        .map(|r| r.unwrap().status)
}

#[tokio::test]
async fn watch_streams_every_change_and_ends_on_shutdown() {
    let shutdown = CancellationToken::new();
    let handle = HealthHandle::with_leader_election(true);
    let client = health_client(handle.clone(), &shutdown).await;
    let watch = |svc: &str| {
        let mut client = client.clone();
        let svc = svc.to_string();
        async move {
            client
                .watch(HealthCheckRequest { service: svc })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let mut ready = watch("readiness").await;
    let mut live = watch("liveness").await;
    let mut unknown = watch("inference-extension").await;
    assert_eq!(next(&mut ready).await, Some(NOT_SERVING));
    assert_eq!(next(&mut live).await, Some(SERVING));
    assert_eq!(next(&mut unknown).await, Some(UNKNOWN));
    handle.set_synced(true);
    handle.set_leader(true);
    assert_eq!(next(&mut ready).await, Some(SERVING));
    handle.set_leader(false);
    assert_eq!(next(&mut ready).await, Some(NOT_SERVING));
    // Liveness did not change, so its stream only ends (on shutdown), with no update.
    shutdown.cancel();
    assert_eq!(next(&mut live).await, None);
    assert_eq!(next(&mut ready).await, None);
}

#[tokio::test]
async fn metrics_endpoint_serves_the_shared_registry() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_metrics(listener, registry(), shutdown.clone()));
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let page = get("/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("application/openmetrics-text"));
    assert!(
        page.contains("inference_extension_test_requests_total 3"),
        "{page}"
    );
    assert!(page.contains("# EOF"), "{page}");
    assert!(get("/other").await.starts_with("HTTP/1.1 404"));
    shutdown.cancel();
}

/// A table of tokens standing in for the Kubernetes reviews (those are tested against the
/// Kubernetes API in `llmsched-kube`); here only the HTTP mapping of each decision is checked.
struct TableAuth {
    calls: std::sync::atomic::AtomicUsize,
}

impl MetricsAuthorizer for TableAuth {
    fn authorize<'a>(
        &'a self,
        r: MetricsAuthRequest<'a>,
    ) -> futures::future::BoxFuture<'a, Result<MetricsAuthDecision, MetricsAuthError>> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out = match (r.token, r.verb, r.path) {
            ("prometheus", "get", "/metrics") => Ok(MetricsAuthDecision::Allowed {
                user: "system:serviceaccount:monitoring:prometheus".into(),
            }),
            ("prometheus", _, _) => Ok(MetricsAuthDecision::Denied {
                user: "system:serviceaccount:monitoring:prometheus".into(),
                reason: "only get /metrics".into(),
            }),
            ("intruder", _, _) => Ok(MetricsAuthDecision::Denied {
                user: "intruder".into(),
                reason: "no RBAC".into(),
            }),
            ("down", _, _) => Err(MetricsAuthError::Authentication(
                "API server unreachable".into(),
            )),
            _ => Ok(MetricsAuthDecision::Unauthenticated),
        };
        Box::pin(async move { out })
    }
}

#[tokio::test]
async fn metrics_auth_answers_401_403_500_or_the_page() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let auth = Arc::new(TableAuth {
        calls: Default::default(),
    });
    tokio::spawn(serve_metrics_with_auth(
        listener,
        registry(),
        Some(auth.clone()),
        shutdown.clone(),
    ));
    let get = |method: &'static str, path: &'static str, authz: Option<&'static str>| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let header = authz
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        s.write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{header}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let cases: &[(&str, Option<&str>, &str, &str)] = &[
        ("GET", None, "HTTP/1.1 401", "Unauthorized"),
        (
            "GET",
            Some("Basic cHJvbWV0aGV1czp4"),
            "HTTP/1.1 401",
            "Unauthorized",
        ),
        ("GET", Some("Bearer "), "HTTP/1.1 401", "Unauthorized"),
        (
            "GET",
            Some("Bearer stranger"),
            "HTTP/1.1 401",
            "Unauthorized",
        ),
        (
            "GET",
            Some("Bearer intruder"),
            "HTTP/1.1 403",
            "Authorization denied for user intruder",
        ),
        ("HEAD", Some("Bearer prometheus"), "HTTP/1.1 403", ""),
        (
            "GET",
            Some("Bearer down"),
            "HTTP/1.1 500",
            "Authentication failed",
        ),
        (
            "GET",
            Some("bearer prometheus"),
            "HTTP/1.1 200",
            "inference_extension_test_requests_total 3",
        ),
    ];
    for (method, authz, status, body) in cases {
        let page = get(method, "/metrics", *authz).await;
        assert!(page.starts_with(status), "{method} {authz:?}: {page}");
        assert!(page.contains(body), "{method} {authz:?}: {page}");
    }
    // No token: answered without asking the authorizer.
    let before = auth.calls.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        get("GET", "/metrics", None)
            .await
            .starts_with("HTTP/1.1 401")
    );
    assert_eq!(
        auth.calls.load(std::sync::atomic::Ordering::Relaxed),
        before
    );
    // Other paths are reviewed first, then not found.
    assert!(get("GET", "/other", None).await.starts_with("HTTP/1.1 401"));
    shutdown.cancel();
}
