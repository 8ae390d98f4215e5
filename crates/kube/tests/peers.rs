//! Peer discovery of active-active EPP replicas against `llmsched-kubetest`, a test API
//! server speaking the real Kubernetes REST/watch protocol on loopback (no real
//! kube-apiserver can run here; see that crate), with the real kube-rs client configured from
//! a kubeconfig file. Tests wait for conditions with generous deadlines.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use llmsched_kube::discovery;
use llmsched_kube::metrics::{ErrorLabels, KubeMetrics};
use llmsched_kube::peers::{self, PeerDiscoveryConfig};
use llmsched_kubetest::{ResourceKind, TestApiServer, objects};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

const NS: &str = "llm-d";
const DEADLINE: Duration = Duration::from_secs(30);
const EPP: &[(&str, &str)] = &[("app", "epp"), ("pod-template-hash", "aaa")];
const EPP_NEW_REVISION: &[(&str, &str)] = &[("app", "epp"), ("pod-template-hash", "bbb")];
const OTHER: &[(&str, &str)] = &[("app", "vllm")];

struct Harness {
    server: TestApiServer,
    seen: Arc<Mutex<Option<Vec<String>>>>,
    metrics: KubeMetrics,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(server: TestApiServer, pod: &str) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let kc = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kc).unwrap();
        let client = discovery::client(Some(&kc)).await.unwrap();
        let seen: Arc<Mutex<Option<Vec<String>>>> = Arc::default();
        let metrics = KubeMetrics::default();
        let cancel = CancellationToken::new();
        let s = seen.clone();
        let mut cfg = PeerDiscoveryConfig::new(NS, pod, 9004);
        cfg.backoff_initial = Duration::from_millis(50);
        peers::start(
            client,
            cfg,
            metrics.clone(),
            Arc::new(move |p| *s.lock() = Some(p)),
            cancel.clone(),
        );
        Self {
            server,
            seen,
            metrics,
            cancel,
            _dir: dir,
        }
    }

    fn add_pod(&self, name: &str, ip: &str, labels: &[(&str, &str)], ready: bool) {
        self.server
            .create(
                &ResourceKind::pods(),
                objects::pod(NS, name, labels, ip, ready),
            )
            .unwrap();
    }

    async fn wait_peers(&self, want: &[&str]) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        loop {
            if self.seen.lock().as_ref() == Some(&want) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for peers {want:?}; have {:?}",
                self.seen.lock()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn errors(&self, reason: &str) -> u64 {
        self.metrics
            .watch_errors
            .get_or_create(&ErrorLabels {
                resource: "pods".into(),
                reason: reason.into(),
            })
            .get()
    }
}

fn pod(server: &TestApiServer, name: &str, ip: &str, labels: &[(&str, &str)]) {
    server
        .create(
            &ResourceKind::pods(),
            objects::pod(NS, name, labels, ip, true),
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_are_the_other_pods_of_the_deployment_across_revisions() {
    let server = TestApiServer::builder().tls(true).start().await.unwrap();
    pod(&server, "epp-aaa-0", "10.1.0.1", EPP);
    pod(&server, "epp-aaa-1", "10.1.0.2", EPP);
    pod(&server, "vllm-0", "10.2.0.1", OTHER);
    let h = Harness::start(server, "epp-aaa-0").await;
    // Itself and the model server are not peers.
    h.wait_peers(&["10.1.0.2:9004"]).await;
    // A new revision's pod (another pod-template-hash) is a peer, ready or not yet.
    h.add_pod("epp-bbb-0", "10.1.0.3", EPP_NEW_REVISION, false);
    h.wait_peers(&["10.1.0.2:9004", "10.1.0.3:9004"]).await;
    // A pod without an IP yet is not.
    h.add_pod("epp-bbb-1", "", EPP_NEW_REVISION, false);
    // A terminating pod leaves the list at once; a deleted one too.
    h.server
        .begin_graceful_delete(&ResourceKind::pods(), NS, "epp-aaa-1", 30)
        .unwrap();
    h.wait_peers(&["10.1.0.3:9004"]).await;
    h.server
        .delete(&ResourceKind::pods(), NS, "epp-bbb-0")
        .unwrap();
    h.wait_peers(&[]).await;
    h.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_own_pod_is_reported_and_retried() {
    let server = TestApiServer::builder().tls(true).start().await.unwrap();
    server.deny("get", "pods");
    pod(&server, "epp-aaa-1", "10.1.0.2", EPP);
    // Not there yet, and RBAC denies the read: counted, no peers, retried.
    let h = Harness::start(server, "epp-aaa-0").await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while h.errors("forbidden") == 0 {
        assert!(tokio::time::Instant::now() < deadline, "403 not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        *h.seen.lock(),
        None,
        "no peers while the own pod is unknown"
    );
    h.server.clear_faults();
    while h.errors("not_found") == 0 {
        assert!(tokio::time::Instant::now() < deadline, "404 not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The pod appears (POD_NAME was right, the API server was just early): peers found.
    pod(&h.server, "epp-aaa-0", "10.1.0.1", EPP);
    h.wait_peers(&["10.1.0.2:9004"]).await;
    h.cancel.cancel();
}
