//! Kubernetes discovery against `llmsched-kubetest`, a test API server speaking the real
//! Kubernetes REST/watch protocol on loopback (no real kube-apiserver, k3s or envtest can run
//! here; see that crate's documentation), with the real kube-rs client configured from a
//! kubeconfig file, as in a deployment.
//!
//! Each test drives the cluster state (pods becoming ready, pools changing, faults) and
//! waits, with generous deadlines, for the endpoint and objectives stores to follow.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use llmsched_core::EndpointSource;
use llmsched_datalayer::{EndpointStore, MetricsPort, ObjectivesStore};
use llmsched_kube::discovery::{self, DiscoveryConfig, KubeDiscovery, Sinks, Source};
use llmsched_kube::metrics::{ErrorLabels, KubeMetrics};
use llmsched_kube::pool::PoolView;
use llmsched_kubetest::{ResourceKind, TestApiServer, objects};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const NS: &str = "llm-d";
const POOL: &str = "gaie-inference-scheduling";
const DEADLINE: Duration = Duration::from_secs(30);
const V1: &str = "inference.networking.k8s.io";
const X: &str = "inference.networking.x-k8s.io";
const LLMD: &str = "llm-d.ai";

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

struct Harness {
    server: TestApiServer,
    store: Arc<EndpointStore>,
    objectives: Arc<ObjectivesStore>,
    metrics_port: MetricsPort,
    metrics: KubeMetrics,
    discovery: Option<KubeDiscovery>,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn server() -> TestApiServer {
        init_logs();
        let server = TestApiServer::builder().tls(true).start().await.unwrap();
        server.register_inference_extension_kinds();
        server
    }

    async fn start(server: TestApiServer, config: DiscoveryConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kc = dir.path().join("kubeconfig");
        server.write_kubeconfig(&kc).unwrap();
        let client = discovery::client(Some(&kc)).await.unwrap();
        let store = Arc::new(EndpointStore::new());
        let objectives = Arc::new(ObjectivesStore::default());
        let metrics_port = MetricsPort::default();
        let metrics = KubeMetrics::default();
        let d = discovery::start(
            client,
            config,
            Sinks {
                store: store.clone(),
                objectives: objectives.clone(),
                metrics_port: metrics_port.clone(),
            },
            metrics.clone(),
            CancellationToken::new(),
        );
        Self {
            server,
            store,
            objectives,
            metrics_port,
            metrics,
            discovery: Some(d),
            _dir: dir,
        }
    }

    fn names(&self) -> Vec<String> {
        self.store
            .snapshot()
            .endpoints
            .iter()
            .map(|e| format!("{}@{}", e.name(), e.meta().socket_addr()))
            .collect()
    }

    async fn wait(&self, what: &str, cond: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !cond(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; endpoints {:?}, synced {}",
                self.names(),
                self.store.is_synced()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_endpoints(&self, want: &[&str]) {
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        self.wait(&format!("endpoints {want:?}"), |h| {
            h.store.is_synced() && h.names() == want
        })
        .await;
    }

    fn errors(&self, resource: &str, reason: &str) -> u64 {
        self.metrics
            .watch_errors
            .get_or_create(&ErrorLabels {
                resource: resource.into(),
                reason: reason.into(),
            })
            .get()
    }

    fn add_pod(&self, name: &str, ip: &str, ready: bool, labels: &[(&str, &str)]) {
        self.server
            .create(
                &ResourceKind::pods(),
                objects::pod(NS, name, labels, ip, ready),
            )
            .unwrap();
    }

    async fn stop(mut self) {
        if let Some(d) = self.discovery.take() {
            d.shutdown().await;
        }
    }
}

fn pool_config() -> DiscoveryConfig {
    let mut c = DiscoveryConfig::new(
        NS,
        Source::Pool {
            name: POOL.into(),
            group: V1.into(),
        },
    );
    c.crd_check_interval = Duration::from_millis(200);
    c.backoff_max = Duration::from_millis(500);
    c
}

const APP: &[(&str, &str)] = &[("app", "vllm"), ("llm-d.ai/role", "decode")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_and_pods_drive_the_endpoints() {
    let server = Harness::server().await;
    let mut cfg = pool_config();
    cfg.model_server_metrics_port = 9100;
    let h = Harness::start(server, cfg).await;

    // No pool yet: nothing, not ready.
    assert!(
        h.server
            .wait_for_watches(DEADLINE, |w| w
                .iter()
                .any(|w| w.resource.starts_with("inferencepools")))
            .await
    );
    assert!(!h.store.is_synced());
    h.add_pod("vllm-0", "10.0.0.1", true, APP);
    h.add_pod("vllm-1", "10.0.0.2", true, APP);
    h.add_pod("vllm-2", "10.0.0.3", false, APP);
    h.add_pod("other", "10.0.0.9", true, &[("app", "other")]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!h.store.is_synced(), "no pool, no readiness");
    assert!(h.store.snapshot().is_empty());

    // The pool appears: its ready, selected pods become endpoints, labels copied.
    h.server
        .create(
            &ResourceKind::inference_pools_v1(),
            objects::inference_pool_v1(NS, POOL, &[("app", "vllm")], &[8000]),
        )
        .unwrap();
    h.wait_endpoints(&["vllm-0-rank-0@10.0.0.1:8000", "vllm-1-rank-0@10.0.0.2:8000"])
        .await;
    let snap = h.store.snapshot();
    let ep = snap.by_name("vllm-0-rank-0").unwrap();
    assert_eq!(ep.label("llm-d.ai/role"), Some("decode"));
    assert_eq!(ep.label("app"), Some("vllm"));
    assert_eq!(
        h.metrics_port.get(),
        Some(9100),
        "one target port: the flag"
    );
    assert_eq!(h.metrics.pool_synced.get(), 1);

    // Ready / not ready / deleted / added.
    h.server.set_pod_ready(NS, "vllm-2", true).unwrap();
    h.wait_endpoints(&[
        "vllm-0-rank-0@10.0.0.1:8000",
        "vllm-1-rank-0@10.0.0.2:8000",
        "vllm-2-rank-0@10.0.0.3:8000",
    ])
    .await;
    h.server.set_pod_ready(NS, "vllm-0", false).unwrap();
    h.wait_endpoints(&["vllm-1-rank-0@10.0.0.2:8000", "vllm-2-rank-0@10.0.0.3:8000"])
        .await;
    h.server
        .delete(&ResourceKind::pods(), NS, "vllm-1")
        .unwrap();
    h.wait_endpoints(&["vllm-2-rank-0@10.0.0.3:8000"]).await;
    h.add_pod("vllm-3", "10.0.0.4", true, APP);
    h.wait_endpoints(&["vllm-2-rank-0@10.0.0.3:8000", "vllm-3-rank-0@10.0.0.4:8000"])
        .await;
    // A pod being deleted (deletionTimestamp set, still Ready) stops being an endpoint.
    h.server
        .begin_graceful_delete(&ResourceKind::pods(), NS, "vllm-3", 30)
        .unwrap();
    h.wait_endpoints(&["vllm-2-rank-0@10.0.0.3:8000"]).await;

    // Target ports change: one endpoint per port, rank names; the metrics port follows.
    let mut pool = h
        .server
        .get(&ResourceKind::inference_pools_v1(), NS, POOL)
        .unwrap();
    pool["spec"]["targetPorts"] = json!([{"number": 8000}, {"number": 8001}]);
    h.server
        .replace(&ResourceKind::inference_pools_v1(), pool)
        .unwrap();
    h.wait_endpoints(&["vllm-2-rank-0@10.0.0.3:8000", "vllm-2-rank-1@10.0.0.3:8001"])
        .await;
    assert_eq!(
        h.metrics_port.get(),
        None,
        "several target ports: each its own"
    );

    // Selector change: the pods are re-listed with the new selector.
    let mut pool = h
        .server
        .get(&ResourceKind::inference_pools_v1(), NS, POOL)
        .unwrap();
    pool["spec"]["selector"]["matchLabels"] = json!({"app": "other"});
    pool["spec"]["targetPorts"] = json!([{"number": 8000}]);
    h.server
        .replace(&ResourceKind::inference_pools_v1(), pool)
        .unwrap();
    h.wait_endpoints(&["other-rank-0@10.0.0.9:8000"]).await;

    // Pool deleted: no endpoints, not ready. Recreated: back.
    h.server
        .delete(&ResourceKind::inference_pools_v1(), NS, POOL)
        .unwrap();
    h.wait("pool deletion to clear the store", |h| {
        !h.store.is_synced() && h.store.snapshot().is_empty()
    })
    .await;
    assert_eq!(h.metrics.pool_synced.get(), 0);
    h.server
        .create(
            &ResourceKind::inference_pools_v1(),
            objects::inference_pool_v1(NS, POOL, &[("app", "vllm")], &[8000]),
        )
        .unwrap();
    h.wait_endpoints(&["vllm-2-rank-0@10.0.0.3:8000"]).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_410_and_dropped_watches_keep_the_endpoints() {
    let server = Harness::server().await;
    server
        .create(
            &ResourceKind::inference_pools_v1(),
            objects::inference_pool_v1(NS, POOL, &[("app", "vllm")], &[8000]),
        )
        .unwrap();
    let h = Harness::start(server, pool_config()).await;
    h.add_pod("vllm-0", "10.0.0.1", true, APP);
    h.wait_endpoints(&["vllm-0-rank-0@10.0.0.1:8000"]).await;

    // API server down: the endpoints stay, readiness stays, errors are counted.
    h.server.stop().await;
    // Whichever of the two endpoint-side watches retries first counts the outage (a pod
    // watch between two long polls may not have retried yet on a loaded machine).
    h.wait("watch errors while the API server is down", |h| {
        ["pods", "inferencepools"]
            .iter()
            .any(|r| h.errors(r, "unreachable") + h.errors(r, "connection_lost") > 0)
    })
    .await;
    assert_eq!(h.names(), ["vllm-0-rank-0@10.0.0.1:8000"]);
    assert!(h.store.is_synced());
    // Back: changes made meanwhile are picked up by the re-list.
    h.add_pod("vllm-1", "10.0.0.2", true, APP);
    h.server.resume().await.unwrap();
    h.wait_endpoints(&["vllm-0-rank-0@10.0.0.1:8000", "vllm-1-rank-0@10.0.0.2:8000"])
        .await;

    // 410 Gone on every watch: re-list, same endpoints, later changes still seen.
    h.server.expire_watches();
    h.wait("410 counted", |h| h.errors("pods", "expired") > 0)
        .await;
    h.server.set_pod_ready(NS, "vllm-0", false).unwrap();
    h.wait_endpoints(&["vllm-1-rank-0@10.0.0.2:8000"]).await;

    // Dropped connections: re-watch.
    h.server.drop_watches();
    h.add_pod("vllm-2", "10.0.0.3", true, APP);
    h.wait_endpoints(&["vllm-1-rank-0@10.0.0.2:8000", "vllm-2-rank-0@10.0.0.3:8000"])
        .await;

    // Restart with a wiped store (etcd lost): the pool is gone, so no endpoints.
    h.server.restart(false).await.unwrap();
    h.wait("wiped cluster to clear the store", |h| {
        !h.store.is_synced() && h.store.snapshot().is_empty()
    })
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_denied_and_malformed_objects_are_reported_and_keep_what_is_known() {
    let server = Harness::server().await;
    server.deny("list", "pods");
    server
        .create(
            &ResourceKind::inference_pools_v1(),
            objects::inference_pool_v1(NS, POOL, &[("app", "vllm")], &[8000]),
        )
        .unwrap();
    server
        .create(
            &ResourceKind::pods(),
            objects::pod(NS, "vllm-0", APP, "10.0.0.1", true),
        )
        .unwrap();
    let h = Harness::start(server, pool_config()).await;
    h.wait("403 on pods counted", |h| h.errors("pods", "forbidden") > 0)
        .await;
    assert!(!h.store.is_synced(), "pods unknown: not ready");
    h.server.clear_faults();
    h.wait_endpoints(&["vllm-0-rank-0@10.0.0.1:8000"]).await;

    // A malformed pool update (no target ports) keeps the last known endpoints.
    let mut pool = h
        .server
        .get(&ResourceKind::inference_pools_v1(), NS, POOL)
        .unwrap();
    pool["spec"]["targetPorts"] = json!([]);
    h.server
        .replace(&ResourceKind::inference_pools_v1(), pool)
        .unwrap();
    h.wait("malformed pool counted", |h| {
        h.errors("inferencepools", "malformed") > 0
    })
    .await;
    assert_eq!(h.names(), ["vllm-0-rank-0@10.0.0.1:8000"]);
    assert!(h.store.is_synced());

    // Garbage on the wire for pods: counted, endpoints kept.
    h.server.set_malformed("pods", true);
    h.server.drop_watches();
    h.wait("garbage pods counted", |h| {
        h.errors("pods", "malformed") > 0
    })
    .await;
    assert_eq!(h.names(), ["vllm-0-rank-0@10.0.0.1:8000"]);
    h.server.set_malformed("pods", false);

    // RBAC withdrawn mid-run: counted, endpoints kept.
    h.server.deny("watch", "pods");
    h.server.deny("list", "pods");
    h.server.drop_watches();
    let before = h.errors("pods", "forbidden");
    h.wait("403 mid-run counted", |h| {
        h.errors("pods", "forbidden") > before
    })
    .await;
    assert_eq!(h.names(), ["vllm-0-rank-0@10.0.0.1:8000"]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_v1alpha2_pools_and_selector_mode() {
    let server = Harness::server().await;
    server
        .create(
            &ResourceKind::inference_pools_v1alpha2(),
            objects::inference_pool_v1alpha2(NS, POOL, &[("app", "vllm")], 8000),
        )
        .unwrap();
    server
        .create(
            &ResourceKind::pods(),
            objects::pod(NS, "vllm-0", APP, "10.0.0.1", true),
        )
        .unwrap();
    let mut cfg = pool_config();
    cfg.source = Source::Pool {
        name: POOL.into(),
        group: X.into(),
    };
    let h = Harness::start(server, cfg).await;
    h.wait_endpoints(&["vllm-0-rank-0@10.0.0.1:8000"]).await;
    let server = {
        let mut h = h;
        if let Some(d) = h.discovery.take() {
            d.shutdown().await;
        }
        h.server
    };

    // --endpoint-selector / --endpoint-target-ports: pods without a pool.
    let cfg = DiscoveryConfig::new(
        NS,
        Source::Selector(PoolView {
            selector: [("llm-d.ai/role".to_string(), "decode".to_string())].into(),
            target_ports: vec![8000, 8002],
        }),
    );
    let h = Harness::start(server, cfg).await;
    h.wait_endpoints(&["vllm-0-rank-0@10.0.0.1:8000", "vllm-0-rank-1@10.0.0.1:8002"])
        .await;
    h.server.set_pod_ready(NS, "vllm-0", false).unwrap();
    h.wait_endpoints(&[]).await;
    assert!(
        h.store.is_synced(),
        "no ready pods is a known, synced state"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objectives_follow_the_installed_crds() {
    init_logs();
    // Only the experimental group's CRDs installed at first.
    let server = TestApiServer::builder().tls(true).start().await.unwrap();
    server.register(ResourceKind::inference_pools_v1());
    server.register(ResourceKind::inference_objectives(X));
    server.register(ResourceKind::inference_model_rewrites(X));
    let objective = ResourceKind::inference_objectives(X);
    server
        .create(
            &objective,
            objects::inference_objective(X, NS, "critical", 10, POOL),
        )
        .unwrap();
    server
        .create(
            &objective,
            objects::inference_objective(X, NS, "elsewhere", 5, "another-pool"),
        )
        .unwrap();
    server
        .create(
            &objective,
            json!({"apiVersion": format!("{X}/v1alpha2"), "kind": "InferenceObjective",
                   "metadata": {"name": "broken", "namespace": NS},
                   "spec": {"priority": "high", "poolRef": {"name": POOL}}}),
        )
        .unwrap();
    server
        .create(
            &ResourceKind::inference_model_rewrites(X),
            json!({"apiVersion": format!("{X}/v1alpha2"), "kind": "InferenceModelRewrite",
                   "metadata": {"name": "canary", "namespace": NS},
                   "spec": {"poolRef": {"name": POOL}, "rules": [{
                       "matches": [{"model": {"type": "Exact", "value": "food-review"}}],
                       "targets": [{"modelRewrite": "food-review-v2", "weight": 1}]}]}}),
        )
        .unwrap();
    let h = Harness::start(server, pool_config()).await;
    h.wait("objectives from the cluster", |h| {
        let o = h.objectives.load();
        o.priority("critical") == Some(10) && o.rewrite_for("food-review").is_some()
    })
    .await;
    let o = h.objectives.load();
    assert_eq!(o.priority("elsewhere"), None, "another pool's objective");
    assert_eq!(o.priority("broken"), None);
    h.wait("malformed objective counted", |h| {
        h.errors("inferenceobjectives", "malformed") > 0
    })
    .await;

    // Updates and deletes follow.
    h.server
        .delete(&ResourceKind::inference_objectives(X), NS, "critical")
        .unwrap();
    h.wait("deleted objective gone", |h| {
        h.objectives.load().priority("critical").is_none()
    })
    .await;

    // The llm-d.ai CRDs get installed later: picked up, and they win over the legacy group.
    h.server.register(ResourceKind::inference_objectives(LLMD));
    h.server
        .register(ResourceKind::inference_model_rewrites(LLMD));
    h.server
        .create(
            &ResourceKind::inference_objectives(LLMD),
            json!({"apiVersion": "llm-d.ai/v1alpha2", "kind": "InferenceObjective",
                   "metadata": {"name": "premium", "namespace": NS},
                   "spec": {"priority": 100, "poolRef": {"name": POOL}}}),
        )
        .unwrap();
    h.wait("llm-d.ai objectives replace the legacy ones", |h| {
        let o = h.objectives.load();
        o.priority("premium") == Some(100) && o.rewrite_for("food-review").is_none()
    })
    .await;

    // The llm-d.ai CRDs removed: back to the legacy group.
    h.server.unregister(LLMD, "inferenceobjectives");
    h.server.unregister(LLMD, "inferencemodelrewrites");
    h.wait("back to the legacy group", |h| {
        let o = h.objectives.load();
        o.priority("premium").is_none() && o.rewrite_for("food-review").is_some()
    })
    .await;
    h.stop().await;
}

/// Discovery latency, pod Ready → endpoint in the store (what the scheduler reads): a
/// measurement, not a check (run it on purpose; it asserts nothing about time):
///
/// `cargo test --release -p llmsched-kube --test discovery -- --ignored --nocapture discovery_latency`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run with --ignored --nocapture"]
async fn discovery_latency() {
    let server = Harness::server().await;
    server
        .create(
            &ResourceKind::inference_pools_v1(),
            objects::inference_pool_v1(NS, POOL, &[("app", "vllm")], &[8000]),
        )
        .unwrap();
    let h = Harness::start(server, pool_config()).await;
    h.add_pod("vllm-0", "10.0.0.1", true, APP);
    h.add_pod("vllm-1", "10.0.0.2", false, APP);
    h.wait_endpoints(&["vllm-0-rank-0@10.0.0.1:8000"]).await;
    let mut ready = Vec::new();
    let mut unready = Vec::new();
    for _ in 0..200 {
        let t = std::time::Instant::now();
        h.server.set_pod_ready(NS, "vllm-1", true).unwrap();
        while h.store.snapshot().by_name("vllm-1-rank-0").is_none() {
            tokio::task::yield_now().await;
        }
        ready.push(t.elapsed());
        let t = std::time::Instant::now();
        h.server.set_pod_ready(NS, "vllm-1", false).unwrap();
        while h.store.snapshot().by_name("vllm-1-rank-0").is_some() {
            tokio::task::yield_now().await;
        }
        unready.push(t.elapsed());
    }
    for (what, mut v) in [
        ("ready -> routable", ready),
        ("not ready -> unroutable", unready),
    ] {
        v.sort();
        let q = |p: f64| v[((v.len() - 1) as f64 * p) as usize];
        println!(
            "{what}: n={} p50={:?} p90={:?} p99={:?} max={:?}",
            v.len(),
            q(0.5),
            q(0.9),
            q(0.99),
            v[v.len() - 1]
        );
    }
    h.stop().await;
}
