//! The EPP on Kubernetes: gRPC health per service name with and without leader election,
//! leader election between EPP replicas, and `/metrics` authentication.
//!
//! The cluster is `llmsched-kubetest`, a test API server speaking the real Kubernetes REST
//! protocol on loopback (no real kube-apiserver, k3s or envtest can run here; see that crate).
//! Each EPP is started exactly as `llmsched epp` starts (`llmsched_epp::start` with parsed
//! flags, a kubeconfig file, the real kube-rs client); health is asked with tonic-health's
//! real gRPC client, `/metrics` over real HTTP. Lease timings are shortened with the hidden
//! `--leader-election-*` flags (lease 2 s, renew deadline 1 s, retry 200 ms). Tests wait for
//! conditions with generous deadlines and never assert durations.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use llmsched_core::EndpointSource;
use llmsched_epp::{Args, EppHandle};
use llmsched_extproc::testing::*;
use llmsched_kubetest::{Permission, ResourceKind, TestApiServer, UserInfo, objects};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const NS: &str = "llm-d";
const POOL: &str = "gaie-inference-scheduling";
const DEADLINE: Duration = Duration::from_secs(60);
const SERVING: i32 = ServingStatus::Serving as i32;
const NOT_SERVING: i32 = ServingStatus::NotServing as i32;
const UNKNOWN: i32 = ServingStatus::ServiceUnknown as i32;
const EXT_PROC: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

/// A model server's `/metrics` (vLLM names) on 127.0.0.1, so the pool's pod is routable.
async fn model_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                let body = "vllm:num_requests_running{model_name=\"m\"} 0\n\
                            vllm:num_requests_waiting{model_name=\"m\"} 0\n\
                            vllm:kv_cache_usage_perc{model_name=\"m\"} 0.1\n";
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    addr
}

struct Cluster {
    server: TestApiServer,
    kubeconfig: std::path::PathBuf,
    model: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let server = TestApiServer::builder().start().await.unwrap();
        server.register_inference_extension_kinds();
        let model = model_server().await;
        server
            .create(
                &ResourceKind::pods(),
                objects::pod(NS, "vllm-0", &[("app", "vllm")], "127.0.0.1", true),
            )
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        server
            .kubeconfig()
            .namespace(NS)
            .write(&kubeconfig)
            .unwrap();
        Self {
            server,
            kubeconfig,
            model,
            _dir: dir,
        }
    }

    fn create_pool(&self) {
        self.server
            .create(
                &ResourceKind::inference_pools_v1(),
                objects::inference_pool_v1(NS, POOL, &[("app", "vllm")], &[self.model.port()]),
            )
            .unwrap();
    }

    /// The chart's arguments (multi-replica form when `election`), on ephemeral ports.
    fn args(&self, election: bool, extra: &[&str]) -> Args {
        let kubeconfig = format!("--kubeconfig={}", self.kubeconfig.display());
        let mut v = vec![
            "epp",
            "--pool-name",
            POOL,
            "--pool-namespace",
            NS,
            "--pool-group",
            "inference.networking.k8s.io",
            "--zap-encoder",
            "json",
            "--grpc-port=0",
            "--grpc-health-port=0",
            "--metrics-port=0",
            "--bind-address=127.0.0.1",
            "--secure-serving=false",
            "--refresh-metrics-interval=50ms",
            &kubeconfig,
        ];
        if election {
            v.extend_from_slice(&[
                "--ha-enable-leader-election",
                "--leader-election-lease-duration=2s",
                "--leader-election-renew-deadline=1s",
                "--leader-election-retry-period=200ms",
            ]);
        }
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    }

    fn holder(&self) -> Option<String> {
        self.server
            .get(
                &ResourceKind::leases(),
                NS,
                &llmsched_kube::leader::lease_name(NS, POOL),
            )
            .and_then(|l| {
                l.pointer("/spec/holderIdentity")
                    .and_then(|h| h.as_str())
                    .map(str::to_string)
            })
            .filter(|h| !h.is_empty())
    }
}

async fn health_client(addr: SocketAddr) -> HealthClient<tonic::transport::Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(ch)
}

async fn check(addr: SocketAddr, service: &str) -> i32 {
    health_client(addr)
        .await
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

async fn wait_for_status(addr: SocketAddr, service: &str, want: i32) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let got = check(addr, service).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service:?} on {addr}: still {got}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET `/metrics`; returns (status, body).
async fn scrape(addr: SocketAddr, token: Option<&str>) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        out.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}

/// Routes one completion through ext_proc; returns the destination header.
async fn route(epp: &EppHandle) -> Option<String> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", epp.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient::new(ch);
    let mut conv = Conv::open(&mut c).await;
    conv.send(headers_msg(&post(&[]), false)).await;
    let body =
        serde_json::to_vec(&serde_json::json!({"model": "m", "prompt": "hello", "max_tokens": 4}))
            .unwrap();
    conv.send_body(&body, 1).await;
    let first = conv.next().await;
    let (_, headers) = headers_of(&first)?;
    get(&headers, "x-gateway-destination-endpoint").map(str::to_string)
}

#[tokio::test]
async fn without_election_every_name_is_serving_once_the_pool_is_synced() {
    let cluster = Cluster::start().await;
    let epp = llmsched_epp::start(cluster.args(false, &["--health-checking"]))
        .await
        .unwrap();
    let names = [
        "inference-extension",
        "liveness",
        "readiness",
        "",
        EXT_PROC,
        "whatever",
    ];
    // No pool yet: everything, liveness included, is NOT_SERVING (as the reference).
    for name in names {
        assert_eq!(check(epp.health_addr, name).await, NOT_SERVING, "{name:?}");
    }
    cluster.create_pool();
    wait_for_status(epp.health_addr, "inference-extension", SERVING).await;
    for addr in [epp.health_addr, epp.grpc_addr] {
        for name in names {
            assert_eq!(check(addr, name).await, SERVING, "{name:?} on {addr}");
        }
    }
    // The pool deleted: not ready again.
    cluster
        .server
        .delete(&ResourceKind::inference_pools_v1(), NS, POOL)
        .unwrap();
    wait_for_status(epp.health_addr, "inference-extension", NOT_SERVING).await;
    assert_eq!(check(epp.grpc_addr, EXT_PROC).await, NOT_SERVING);
    epp.shutdown().await;
}

#[tokio::test]
async fn with_election_one_ready_leader_and_the_follower_takes_over() {
    let cluster = Cluster::start().await;
    cluster.create_pool();
    let a = llmsched_epp::start(cluster.args(true, &["--metrics-endpoint-auth=false"]))
        .await
        .unwrap();
    let b = llmsched_epp::start(cluster.args(true, &["--metrics-endpoint-auth=false"]))
        .await
        .unwrap();
    // Exactly one becomes the ready leader.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let (leader, follower) = loop {
        let (ra, rb) = (
            check(a.health_addr, "readiness").await,
            check(b.health_addr, "readiness").await,
        );
        assert!(
            !(ra == SERVING && rb == SERVING),
            "two ready replicas at once"
        );
        if ra == SERVING {
            break (a, b);
        }
        if rb == SERVING {
            break (b, a);
        }
        assert!(tokio::time::Instant::now() < deadline, "no ready leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(leader.is_leader(), Some(true));
    assert_eq!(follower.is_leader(), Some(false));
    for (addr, name, want) in [
        (leader.health_addr, "liveness", SERVING),
        (leader.health_addr, "", SERVING),
        (leader.health_addr, EXT_PROC, SERVING),
        (leader.health_addr, "inference-extension", UNKNOWN),
        (follower.health_addr, "liveness", SERVING),
        (follower.health_addr, "readiness", NOT_SERVING),
        (follower.health_addr, "", NOT_SERVING),
        (follower.health_addr, EXT_PROC, NOT_SERVING),
        (follower.health_addr, "inference-extension", UNKNOWN),
    ] {
        assert_eq!(check(addr, name).await, want, "{name:?} on {addr}");
    }
    // The follower keeps discovery running (its endpoint store is warm) and routes if asked.
    let f = follower.store().clone();
    eventually("the follower's store is synced", move || {
        let s = f.snapshot();
        s.synced && s.len() == 1
    })
    .await;
    assert_eq!(
        route(&follower).await.as_deref(),
        Some(cluster.model.to_string().as_str())
    );
    let page = scrape(follower.metrics_addr, None).await.1;
    assert!(page.contains("llmsched_leader 0"), "{page}");
    let page = scrape(leader.metrics_addr, None).await.1;
    assert!(page.contains("llmsched_leader 1"), "{page}");
    assert!(
        page.contains("llmsched_leader_transitions_total{event=\"acquired\"} 1"),
        "{page}"
    );

    // Graceful shutdown of the leader releases the Lease; the follower becomes ready.
    leader.shutdown().await;
    wait_for_status(follower.health_addr, "readiness", SERVING).await;
    assert_eq!(follower.is_leader(), Some(true));

    // A third replica joins; the current leader crashes (no release): the newcomer takes
    // over once the Lease expires.
    let c = llmsched_epp::start(cluster.args(true, &["--metrics-endpoint-auth=false"]))
        .await
        .unwrap();
    let cs = c.store().clone();
    eventually("the newcomer's store is synced", move || {
        cs.snapshot().synced
    })
    .await;
    assert_eq!(check(c.health_addr, "readiness").await, NOT_SERVING);
    let crashed_holder = cluster.holder();
    follower.abort_without_release();
    assert_eq!(cluster.holder(), crashed_holder, "a crash releases nothing");
    wait_for_status(c.health_addr, "readiness", SERVING).await;
    assert_ne!(cluster.holder(), crashed_holder);
    c.shutdown().await;
}

#[tokio::test]
async fn forbidden_leases_keep_the_replica_unready_and_are_counted() {
    let cluster = Cluster::start().await;
    cluster.create_pool();
    cluster.server.deny("*", "leases.coordination.k8s.io");
    let epp = llmsched_epp::start(cluster.args(true, &["--metrics-endpoint-auth=false"]))
        .await
        .unwrap();
    let st = epp.store().clone();
    eventually("pool synced", move || st.snapshot().synced).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let page = scrape(epp.metrics_addr, None).await.1;
        if page.contains(
            "llmsched_leader_election_errors_total{operation=\"get\",reason=\"forbidden\"}",
        ) {
            assert!(page.contains("llmsched_leader 0"), "{page}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no 403 counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(check(epp.health_addr, "readiness").await, NOT_SERVING);
    assert_eq!(check(epp.health_addr, "liveness").await, SERVING);
    // Scheduling is not blocked: the unready replica still routes.
    assert_eq!(
        route(&epp).await.as_deref(),
        Some(cluster.model.to_string().as_str())
    );
    cluster.server.clear_faults();
    wait_for_status(epp.health_addr, "readiness", SERVING).await;
    epp.shutdown().await;
}

#[tokio::test]
async fn metrics_auth_is_on_by_default_with_kubernetes() {
    let cluster = Cluster::start().await;
    cluster.create_pool();
    cluster.server.add_token(
        "prom-token",
        UserInfo::service_account("monitoring", "prometheus"),
    );
    cluster
        .server
        .add_token("dev-token", UserInfo::new("dev", &["developers"]));
    cluster.server.allow(Permission::non_resource(
        "system:serviceaccount:monitoring:prometheus",
        "get",
        "/metrics",
    ));
    let epp = llmsched_epp::start(cluster.args(false, &[])).await.unwrap();
    assert_eq!(scrape(epp.metrics_addr, None).await.0, 401);
    assert_eq!(scrape(epp.metrics_addr, Some("bogus")).await.0, 401);
    assert_eq!(scrape(epp.metrics_addr, Some("dev-token")).await.0, 403);
    let (code, page) = scrape(epp.metrics_addr, Some("prom-token")).await;
    assert_eq!(code, 200);
    assert!(
        page.contains("llmsched_metrics_auth_decisions_total{decision=\"denied\"} 1"),
        "{page}"
    );
    // The API server goes away: a new token cannot be reviewed (500), the cached one works.
    cluster.server.stop().await;
    cluster.server.add_token(
        "new-token",
        UserInfo::service_account("monitoring", "prometheus"),
    );
    assert_eq!(scrape(epp.metrics_addr, Some("prom-token")).await.0, 200);
    assert_eq!(scrape(epp.metrics_addr, Some("new-token")).await.0, 500);
    cluster.server.resume().await.unwrap();
    assert_eq!(scrape(epp.metrics_addr, Some("new-token")).await.0, 200);
    epp.shutdown().await;

    let off = llmsched_epp::start(cluster.args(false, &["--metrics-endpoint-auth=false"]))
        .await
        .unwrap();
    assert_eq!(scrape(off.metrics_addr, None).await.0, 200);
    off.shutdown().await;
}

#[tokio::test]
async fn metrics_auth_without_kubernetes() {
    let base = [
        "epp",
        "--endpoints=127.0.0.1:8000",
        "--grpc-port=0",
        "--grpc-health-port=0",
        "--metrics-port=0",
        "--bind-address=127.0.0.1",
        "--secure-serving=false",
    ];
    let with = |extra: &[&str]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    };
    // Static endpoints, flag unset: no Kubernetes client, so /metrics stays open.
    let epp = llmsched_epp::start(with(&[])).await.unwrap();
    assert_eq!(scrape(epp.metrics_addr, None).await.0, 200);
    epp.shutdown().await;
    // Explicitly asked for, without a usable kubeconfig: a clear startup error.
    let e = llmsched_epp::start(with(&[
        "--metrics-endpoint-auth=true",
        "--kubeconfig=/nonexistent/kubeconfig",
    ]))
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("--metrics-endpoint-auth=true"), "{e}");
    assert!(e.contains("/nonexistent/kubeconfig"), "{e}");
    assert!(e.contains("--metrics-endpoint-auth=false"), "{e}");
    // Explicitly asked for, with a kubeconfig: enforced even for static endpoints.
    let cluster = Cluster::start().await;
    let kc = format!("--kubeconfig={}", cluster.kubeconfig.display());
    let epp = llmsched_epp::start(with(&["--metrics-endpoint-auth", &kc]))
        .await
        .unwrap();
    assert_eq!(scrape(epp.metrics_addr, None).await.0, 401);
    epp.shutdown().await;
}
