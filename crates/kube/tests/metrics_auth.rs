//! `/metrics` authentication and authorization (TokenReview + SubjectAccessReview) against
//! `llmsched-kubetest`, a test API server speaking the real Kubernetes REST protocol on
//! loopback, which answers the reviews from a token table and allow rules the test sets
//! (no real kube-apiserver can run here; see that crate's documentation). The EPP side is
//! the real `/metrics` server of `llmsched-ops` and the real kube-rs client.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use llmsched_kube::auth::{AuthCacheConfig, KubeMetricsAuthorizer, MetricsAuthMetrics};
use llmsched_kubetest::{Permission, TestApiServer, UserInfo};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const PROMETHEUS: &str = "system:serviceaccount:monitoring:prometheus";

struct Setup {
    server: TestApiServer,
    addr: SocketAddr,
    auth: Arc<KubeMetricsAuthorizer>,
    metrics: MetricsAuthMetrics,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn setup(config: AuthCacheConfig) -> Setup {
    let server = TestApiServer::builder().start().await.unwrap();
    server.add_token(
        "prom-token",
        UserInfo::service_account("monitoring", "prometheus"),
    );
    server.add_token("dev-token", UserInfo::new("dev", &["developers"]));
    server.allow(Permission::non_resource(PROMETHEUS, "get", "/metrics"));
    server.allow(Permission::non_resource("developers", "get", "/healthz"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.kubeconfig().write(&path).unwrap();
    let client = llmsched_kube::discovery::client(Some(&path)).await.unwrap();

    let mut registry = Registry::default();
    let page_marker = Counter::<u64>::default();
    page_marker.inc();
    registry.register("page_marker", "Present on every page.", page_marker);
    let metrics = MetricsAuthMetrics::register(&mut registry);
    let auth = Arc::new(KubeMetricsAuthorizer::with_config(
        client,
        metrics.clone(),
        config,
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    tokio::spawn(llmsched_ops::serve_metrics_with_auth(
        listener,
        Arc::new(registry),
        Some(auth.clone()),
        cancel.clone(),
    ));
    Setup {
        server,
        addr,
        auth,
        metrics,
        cancel,
        _dir: dir,
    }
}

/// One HTTP/1.1 request; returns (status, body).
async fn get(addr: SocketAddr, token: Option<&str>) -> (u16, String) {
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
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn reviews(server: &TestApiServer, plural: &str) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with(plural))
        .count()
}

fn fast_retries() -> AuthCacheConfig {
    AuthCacheConfig {
        attempts: 3,
        first_backoff: Duration::from_millis(50),
        review_timeout: Duration::from_secs(10),
        ..AuthCacheConfig::default()
    }
}

#[tokio::test]
async fn tokens_are_reviewed_and_access_is_checked() {
    let s = setup(fast_retries()).await;
    let (code, body) = get(s.addr, None).await;
    assert_eq!((code, body.trim()), (401, "Unauthorized"));
    assert_eq!(
        reviews(&s.server, "/tokenreviews"),
        0,
        "no token, no review"
    );

    let (code, _) = get(s.addr, Some("stolen-or-expired")).await;
    assert_eq!(code, 401, "a token the TokenReview rejects");

    let (code, body) = get(s.addr, Some("dev-token")).await;
    assert_eq!(code, 403);
    assert_eq!(body.trim(), "Authorization denied for user dev");

    let (code, body) = get(s.addr, Some("prom-token")).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("page_marker_total 1"), "{body}");

    // What the reviews asked: the token, then the user with `get` on `/metrics`.
    assert_eq!(reviews(&s.server, "/tokenreviews"), 3);
    assert_eq!(reviews(&s.server, "/subjectaccessreviews"), 2);
    assert_eq!(s.metrics.decisions("unauthenticated"), 1);
    assert_eq!(s.metrics.decisions("denied"), 1);
    assert_eq!(s.metrics.decisions("allowed"), 1);
}

#[tokio::test]
async fn decisions_are_cached_for_their_ttl() {
    let s = setup(AuthCacheConfig {
        token_ttl: Duration::from_millis(600),
        allow_ttl: Duration::from_millis(600),
        deny_ttl: Duration::from_millis(600),
        ..fast_retries()
    })
    .await;
    for _ in 0..5 {
        assert_eq!(get(s.addr, Some("prom-token")).await.0, 200);
        assert_eq!(get(s.addr, Some("dev-token")).await.0, 403);
        assert_eq!(get(s.addr, Some("nobody")).await.0, 401);
    }
    // Five scrapes each, but at most one review per token and per user: the rest came
    // from the cache (a slow machine may see one entry expire between two scrapes, hence
    // the margin).
    let tr = reviews(&s.server, "/tokenreviews");
    let sar = reviews(&s.server, "/subjectaccessreviews");
    assert!((3..=6).contains(&tr), "{tr} token reviews");
    assert!((2..=4).contains(&sar), "{sar} access reviews");
    assert_eq!(s.auth.cached(), (3, 2));

    // Access revoked: still allowed while cached, denied once the entry expires.
    s.server.clear_permissions();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, _) = get(s.addr, Some("prom-token")).await;
        if code == 403 {
            break;
        }
        assert_eq!(code, 200);
        assert!(
            tokio::time::Instant::now() < deadline,
            "revocation never seen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_epps_own_rbac_missing_is_a_500_with_the_cause_counted() {
    let s = setup(fast_retries()).await;
    s.server
        .deny("create", "tokenreviews.authentication.k8s.io");
    let (code, body) = get(s.addr, Some("prom-token")).await;
    assert_eq!((code, body.trim()), (500, "Authentication failed"));
    assert_eq!(
        reviews(&s.server, "/tokenreviews"),
        1,
        "a 403 is not retried"
    );
    assert_eq!(s.metrics.decisions("error"), 1);
    assert_eq!(s.metrics.reviews("TokenReview", "error"), 1);

    s.server.clear_faults();
    s.server
        .deny("create", "subjectaccessreviews.authorization.k8s.io");
    let (code, body) = get(s.addr, Some("prom-token")).await;
    assert_eq!(code, 500);
    assert_eq!(
        body.trim(),
        format!("Authorization for user {PROMETHEUS} failed")
    );
    // Failures are not cached: fixed RBAC works on the next scrape.
    s.server.clear_faults();
    assert_eq!(get(s.addr, Some("prom-token")).await.0, 200);
}

#[tokio::test]
async fn api_server_down_is_a_500_after_retries_and_cached_decisions_keep_working() {
    let s = setup(fast_retries()).await;
    assert_eq!(get(s.addr, Some("prom-token")).await.0, 200);
    s.server.stop().await;
    // A known scraper keeps scraping from the cache while the API server is away...
    assert_eq!(get(s.addr, Some("prom-token")).await.0, 200);
    // ...an unknown token cannot be reviewed: 500, as controller-runtime answers.
    let (code, body) = get(s.addr, Some("dev-token")).await;
    assert_eq!((code, body.trim()), (500, "Authentication failed"));
    assert_eq!(
        s.metrics.reviews("TokenReview", "error"),
        3,
        "retried (3 attempts in this test's settings)"
    );
    s.server.resume().await.unwrap();
    assert_eq!(get(s.addr, Some("dev-token")).await.0, 403);
}

#[tokio::test]
async fn transient_api_errors_are_retried() {
    let s = setup(fast_retries()).await;
    s.server.inject(llmsched_kubetest::FaultRule::fail(
        "create",
        "tokenreviews.authentication.k8s.io",
        // 500: kube-rs itself already retries 429, 503 and 504.
        llmsched_kubetest::ApiStatus::internal("etcdserver: request timed out"),
        Some(2),
    ));
    assert_eq!(get(s.addr, Some("prom-token")).await.0, 200);
    assert_eq!(s.metrics.reviews("TokenReview", "error"), 2);
    assert_eq!(s.metrics.reviews("TokenReview", "ok"), 1);
}
