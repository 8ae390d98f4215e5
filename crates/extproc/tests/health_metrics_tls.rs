//! gRPC health transitions, the `/metrics` endpoint and certificate loading/reload.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use llmsched_core::endpoint::{EndpointSet, EndpointSource};
use llmsched_director::testing::*;
use llmsched_extproc::testing::*;
use llmsched_extproc::tls::{CERT_FILE, KEY_FILE, generate_self_signed};
use llmsched_extproc::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

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
    let epp = epp(basic_config(1, ""), endpoints(1)).start().await;
    // "m" was served before, so it is a label value of its own (llmsched_core::labels).
    epp.director.metrics().known.learn("m");
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    c.send_body(&completion_body("m", "p", false), 1).await;
    let _ = c.next().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_metrics(
        listener,
        epp.registry.clone(),
        shutdown.clone(),
    ));
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
    assert!(page.contains("inference_objective_request_total{model_name=\"m\",target_model_name=\"m\",priority=\"0\"} 1"), "{page}");
    assert!(page.contains("inference_extension_info{commit=\"test\",build_ref=\"test\"} 1"));
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
    let epp = epp(basic_config(1, ""), endpoints(1)).start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let auth = Arc::new(TableAuth {
        calls: Default::default(),
    });
    tokio::spawn(serve_metrics_with_auth(
        listener,
        epp.registry.clone(),
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
            "inference_extension_info",
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

#[tokio::test]
async fn cert_dir_is_loaded_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let (c1, k1) = generate_self_signed().unwrap();
    std::fs::write(dir.path().join(CERT_FILE), &c1).unwrap();
    std::fs::write(dir.path().join(KEY_FILE), &k1).unwrap();
    let tls = TlsConfig::from_cert_dir(dir.path(), true).unwrap();
    assert_eq!(tls.certificate_pem(), c1.as_bytes());
    let director =
        Arc::new(llmsched_director::Director::builder(basic_config(1, ""), endpoints(1)).build());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_ext_proc(
        listener,
        director,
        Some(tls),
        None,
        ExtProcOptions::default(),
        shutdown.clone(),
    ));
    let connect = |ca: String| async move {
        let ep =
            tonic::transport::Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
                .unwrap()
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                        .domain_name("localhost"),
                )
                .unwrap();
        ep.connect().await.is_ok()
    };
    assert!(connect(c1.clone()).await);
    // Replace the pair; new connections get the new certificate.
    let (c2, k2) = generate_self_signed().unwrap();
    std::fs::write(dir.path().join(CERT_FILE), &c2).unwrap();
    std::fs::write(dir.path().join(KEY_FILE), &k2).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if connect(c2.clone()).await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "certificate never reloaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!connect(c1).await, "old certificate no longer served");
    shutdown.cancel();
}
