//! `llmsched epp` on "Kubernetes", end to end, with every real part that can run here:
//!
//! * the real `llmsched` binary, started with the `inferencepool` chart's exact argument list
//!   and environment (`NAMESPACE`, `POD_NAME`) plus a `KUBECONFIG`; the only additions are
//!   the three port flags (free ports instead of 9002/9003/9090, which other tests may hold)
//!   and the config path (the chart mounts `/config/default-plugins.yaml`; here it is the
//!   chart's file in a temporary directory);
//! * `llmsched-kubetest` as the API server: no real kube-apiserver, k3s, kind or envtest can
//!   be installed here, so the test uses this server speaking the real Kubernetes REST/watch
//!   protocol over TLS, which the real kube-rs client inside the binary talks to;
//! * simulated vLLM replicas (`llmsched-sim`) on 127.0.0.2, 127.0.0.3, … as the pods' IPs;
//! * a real Envoy (`scripts/install-tools.sh envoy`) with the generated bootstrap, TLS to the
//!   EPP's ext_proc port, routing to the endpoint the EPP picks.
//!
//! Under continuous load, pods become ready, not ready, are deleted and added; the API
//! server expires every watch (410 Gone) and restarts. Routing must follow each change and
//! no request may fail. "Lost" is defined strictly: any response other than 200 (or a
//! transport error) counts. A not-ready or deleted pod's simulator keeps running (as a
//! terminating pod serves its in-flight requests), so a request dispatched just before a
//! change still completes; the EPP must simply stop choosing that pod.
//!
//! `real_cluster_discovery_routes` runs the same discovery against a real cluster when
//! `LLMSCHED_E2E_KUBECONFIG` is set (see its documentation).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use llmsched_gateway::bootstrap::UPSTREAM_HOST_HEADER;
use llmsched_gateway::{BootstrapConfig, Envoy, EnvoyOptions, EppTarget, Mode};
use llmsched_kubetest::{ResourceKind, TestApiServer, objects};
use llmsched_sim::{ClusterConfig, ReplicaConfig, SimCluster};
use parking_lot::Mutex;

const NS: &str = "llm-d";
const POOL: &str = "gaie-inference-scheduling";
const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
const DEADLINE: Duration = Duration::from_secs(60);
const LABELS: &[(&str, &str)] = &[
    ("llm-d.ai/inference-serving", "true"),
    ("llm-d.ai/role", "decode"),
];

/// The chart's argument list (GIE `inferencepool` v1.2/v1.3 with the guide's values), as
/// the container receives it.
fn chart_args(config_file: &Path) -> Vec<String> {
    [
        "--pool-name",
        POOL,
        "--pool-namespace",
        NS,
        "--pool-group",
        "inference.networking.k8s.io",
        "--zap-encoder",
        "json",
        "--config-file",
        &config_file.display().to_string(),
        "--kv-cache-usage-percentage-metric",
        "vllm:kv_cache_usage_perc",
        "--v",
        "1",
        "--tracing=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn free_port(ip: [u8; 4]) -> u16 {
    std::net::TcpListener::bind(SocketAddr::from((ip, 0)))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What the load generator saw.
#[derive(Default)]
struct Load {
    /// Upstream host of each successful response, in completion order.
    served: Mutex<Vec<String>>,
    ok: AtomicU64,
    failed: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Load {
    fn served_len(&self) -> usize {
        self.served.lock().len()
    }

    /// Waits until `host` served a response completed after `from`.
    async fn wait_served(&self, what: &str, host: &str, from: usize) {
        let start = Instant::now();
        loop {
            if self.served.lock()[from..].iter().any(|h| h == host) {
                return;
            }
            assert!(
                self.failed.lock().is_empty(),
                "failed: {:?}",
                self.failed.lock()
            );
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `n` consecutive responses completed after `from` avoided `host`, and
    /// returns the position after which `host` was never seen again.
    async fn wait_avoided(&self, what: &str, host: &str, from: usize, n: usize) -> usize {
        let start = Instant::now();
        loop {
            {
                let served = self.served.lock();
                let last = served[from..]
                    .iter()
                    .rposition(|h| h == host)
                    .map_or(from, |i| from + i + 1);
                if served.len() >= last + n {
                    return last;
                }
            }
            assert!(
                self.failed.lock().is_empty(),
                "failed: {:?}",
                self.failed.lock()
            );
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn load_worker(load: Arc<Load>, envoy: SocketAddr, worker: usize) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut i = 0u64;
    while !load.stop.load(Ordering::Relaxed) {
        i += 1;
        let body = format!(
            r#"{{"model":"{MODEL}","prompt":"worker {worker} request {i}: tell me about {}","max_tokens":4}}"#,
            i % 7
        );
        let req = http::Request::post(format!("http://{envoy}/v1/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        match client.request(req).await {
            Ok(resp) => {
                let status = resp.status();
                let host = resp
                    .headers()
                    .get(UPSTREAM_HOST_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                if status == 200 && body.is_ok() {
                    load.ok.fetch_add(1, Ordering::Relaxed);
                    load.served.lock().push(host);
                } else {
                    load.failed
                        .lock()
                        .push(format!("{status} from {host}: {body:?}"));
                }
            }
            Err(e) => load.failed.lock().push(format!("transport: {e}")),
        }
    }
}

struct Epp {
    child: tokio::process::Child,
    log: std::path::PathBuf,
}

impl Epp {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn charts_arguments_discover_the_pool_and_route_through_envoy_under_churn() {
    let dir = tempfile::tempdir().unwrap();

    // Five replicas on 127.0.0.2-6, one shared target port (as pods behind one pool).
    let port = free_port([127, 0, 0, 2]);
    let ips: Vec<String> = (2..=6).map(|i| format!("127.0.0.{i}")).collect();
    let addrs: Vec<SocketAddr> = ips
        .iter()
        .map(|ip| format!("{ip}:{port}").parse().unwrap())
        .collect();
    let replica = ReplicaConfig::from_profile("llama3.1-8b-h100")
        .unwrap()
        .with_time_scale(100.0);
    let sim = SimCluster::start(ClusterConfig::new(addrs, replica))
        .await
        .expect("simulator starts");
    let host = |i: usize| format!("{}:{port}", ips[i]);

    // The cluster: the pool, three ready pods, one not ready; vllm-4 comes later.
    let api = TestApiServer::builder().tls(true).start().await.unwrap();
    api.register_inference_extension_kinds();
    api.create(
        &ResourceKind::inference_pools_v1(),
        objects::inference_pool_v1(NS, POOL, &[("llm-d.ai/inference-serving", "true")], &[port]),
    )
    .unwrap();
    for (i, ready) in [true, true, true, false].into_iter().enumerate() {
        api.create(
            &ResourceKind::pods(),
            objects::pod(NS, &format!("vllm-{i}"), LABELS, &ips[i], ready),
        )
        .unwrap();
    }
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();

    // The chart's ConfigMap file.
    let config = dir.path().join("default-plugins.yaml");
    std::fs::copy(
        support::repo_root().join("deploy/helm/llmsched/files/default-plugins.yaml"),
        &config,
    )
    .unwrap();

    // The EPP: the chart's exact arguments and env.
    let (grpc, health, metrics) = (
        free_port([127, 0, 0, 1]),
        free_port([127, 0, 0, 1]),
        free_port([127, 0, 0, 1]),
    );
    let log = dir.path().join("epp.log");
    let mut args = chart_args(&config);
    args.extend([
        format!("--grpc-port={grpc}"),
        format!("--grpc-health-port={health}"),
        format!("--metrics-port={metrics}"),
    ]);
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_llmsched"))
        .arg("epp")
        .args(&args)
        .env("NAMESPACE", NS)
        .env("POD_NAME", "gaie-inference-scheduling-epp-7d4b9c8f6-x2x9z")
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut epp = Epp { child, log };

    // Envoy in front, TLS to ext_proc as the guide's standalone bootstrap.
    let envoy_cfg = BootstrapConfig {
        mode: Mode::Epp,
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        epp: EppTarget {
            host: "127.0.0.1".into(),
            grpc_port: grpc,
            health_port: health,
            tls: true,
        },
        upstream_host_header: true,
        health_check_interval: Duration::from_millis(500),
        ..BootstrapConfig::default()
    };
    let envoy = Envoy::start(
        &envoy_cfg,
        &EnvoyOptions::new(support::tool(support::Tool::Envoy)),
    )
    .await
    .expect("Envoy starts");
    let front = envoy.listener_addr();

    // Ready: the first request through Envoy succeeds (the EPP is ready once the pool and
    // its pods are listed).
    let probe: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let start = Instant::now();
    loop {
        let req = http::Request::post(format!("http://{front}/v1/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!(
                r#"{{"model":"{MODEL}","prompt":"hello","max_tokens":2}}"#
            ))))
            .unwrap();
        if let Ok(r) = probe.request(req).await
            && r.status() == 200
        {
            break;
        }
        if let Ok(Some(status)) = epp.child.try_wait() {
            panic!("the EPP exited ({status}):\n{}", epp.log_tail());
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the EPP never routed a request:\n{}",
            epp.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Continuous load.
    let load = Arc::new(Load::default());
    let workers: Vec<_> = (0..4)
        .map(|w| tokio::spawn(load_worker(load.clone(), front, w)))
        .collect();

    // The three ready pods serve; the not-ready one does not.
    for i in 0..3 {
        load.wait_served(&format!("{} to serve", host(i)), &host(i), 0)
            .await;
    }
    assert!(
        !load.served.lock().contains(&host(3)),
        "vllm-3 is not ready"
    );

    // vllm-3 becomes ready: routable.
    let from = load.served_len();
    api.set_pod_ready(NS, "vllm-3", true).unwrap();
    load.wait_served("vllm-3 ready to serve", &host(3), from)
        .await;

    // vllm-0 not ready: no longer chosen (its simulator keeps serving what it has).
    let from = load.served_len();
    api.set_pod_ready(NS, "vllm-0", false).unwrap();
    load.wait_avoided("vllm-0 to be avoided", &host(0), from, 60)
        .await;

    // vllm-1 deleted: no longer chosen.
    let from = load.served_len();
    api.delete(&ResourceKind::pods(), NS, "vllm-1").unwrap();
    load.wait_avoided("vllm-1 to be avoided", &host(1), from, 60)
        .await;

    // vllm-4 added, ready: routable.
    let from = load.served_len();
    api.create(
        &ResourceKind::pods(),
        objects::pod(NS, "vllm-4", LABELS, &ips[4], true),
    )
    .unwrap();
    load.wait_served("new pod vllm-4 to serve", &host(4), from)
        .await;

    // 410 Gone on every watch: routing goes on; a change after it is still followed.
    api.expire_watches();
    let from = load.served_len();
    api.set_pod_ready(NS, "vllm-0", true).unwrap();
    load.wait_served("vllm-0 ready again after 410", &host(0), from)
        .await;

    // API server restart (same state): routing goes on while it is down; a change after it
    // is still followed.
    api.stop().await;
    let from = load.served_len();
    let during = Instant::now();
    while load.served_len() < from + 40 {
        assert!(
            during.elapsed() < DEADLINE,
            "routing stalled while the API server was down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.resume().await.unwrap();
    let from = load.served_len();
    api.set_pod_ready(NS, "vllm-2", false).unwrap();
    load.wait_avoided("vllm-2 avoided after the restart", &host(2), from, 60)
        .await;

    load.stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let failed = load.failed.lock().clone();
    let ok = load.ok.load(Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "{} requests lost: {failed:?}",
        failed.len()
    );
    assert!(ok > 300, "only {ok} requests completed");
    let per_host: BTreeMap<String, usize> =
        load.served.lock().iter().fold(BTreeMap::new(), |mut m, h| {
            *m.entry(h.clone()).or_default() += 1;
            m
        });
    eprintln!("{ok} requests, none lost; served per pod: {per_host:?}");

    // The binary's JSON logs (the chart's --zap-encoder json) name the pool sync.
    let text = std::fs::read_to_string(&epp.log).unwrap();
    let first = text.lines().next().unwrap_or_default();
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok(),
        "logs are JSON lines: {first}"
    );
    assert!(text.contains("pool synced: ready"), "{}", epp.log_tail());

    epp.child.start_kill().unwrap();
    let _ = epp.child.wait().await;
    drop(envoy);
    sim.shutdown().await;
}

/// Discovery against a real cluster: set `LLMSCHED_E2E_KUBECONFIG` to a kubeconfig whose
/// user may create/delete pods and InferencePools in namespace `LLMSCHED_E2E_NAMESPACE`
/// (default `llmsched-e2e`, which must exist) with the InferencePool v1 CRD installed. The
/// test creates a pool and a pause-container pod (`LLMSCHED_E2E_POD_IMAGE`, default
/// `registry.k8s.io/pause:3.10`) with `kubectl`, starts `llmsched epp` with the chart's
/// arguments against that cluster, and follows its logs: the pool syncs, the pod is added
/// once Ready, removed when deleted, and the pool's deletion empties the store. Routing
/// through Envoy would need the pod IPs to be reachable from this machine, which a remote
/// cluster's usually are not, so this checks discovery only. Skipped (with a message) when
/// the variable is unset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cluster_discovery_routes() {
    let Some(kubeconfig) = std::env::var_os("LLMSCHED_E2E_KUBECONFIG") else {
        eprintln!(
            "skipped: set LLMSCHED_E2E_KUBECONFIG to run the Kubernetes end-to-end test against a real cluster"
        );
        return;
    };
    let ns = std::env::var("LLMSCHED_E2E_NAMESPACE").unwrap_or_else(|_| "llmsched-e2e".into());
    let image = std::env::var("LLMSCHED_E2E_POD_IMAGE")
        .unwrap_or_else(|_| "registry.k8s.io/pause:3.10".into());
    let kubectl = |args: &[&str], stdin: Option<String>| {
        let mut c = std::process::Command::new("kubectl");
        c.env("KUBECONFIG", &kubeconfig)
            .arg("-n")
            .arg(&ns)
            .args(args);
        if stdin.is_some() {
            c.stdin(Stdio::piped());
        }
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl on PATH");
        if let Some(s) = stdin {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let pool = "llmsched-e2e-pool";
    let manifest = format!(
        r#"{{"apiVersion":"v1","kind":"List","items":[
{{"apiVersion":"inference.networking.k8s.io/v1","kind":"InferencePool","metadata":{{"name":"{pool}"}},
 "spec":{{"selector":{{"matchLabels":{{"app":"llmsched-e2e"}}}},"targetPorts":[{{"number":8000}}],
          "endpointPickerRef":{{"name":"{pool}-epp","port":{{"number":9002}}}}}}}},
{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"llmsched-e2e-0","labels":{{"app":"llmsched-e2e"}}}},
 "spec":{{"containers":[{{"name":"pause","image":"{image}"}}]}}}}]}}"#
    );
    kubectl(&["apply", "-f", "-"], Some(manifest));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("default-plugins.yaml");
    std::fs::copy(
        support::repo_root().join("deploy/helm/llmsched/files/default-plugins.yaml"),
        &config,
    )
    .unwrap();
    let mut args = chart_args(&config);
    args[1] = pool.into();
    args[3] = ns.clone();
    let log = dir.path().join("epp.log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_llmsched"))
        .arg("epp")
        .args(&args)
        .args([
            "--grpc-port=0",
            "--grpc-health-port=0",
            "--metrics-port=0",
            "--v=4",
        ])
        .env("NAMESPACE", &ns)
        .env("POD_NAME", "llmsched-e2e-epp-7d4b9c8f6-x2x9z")
        .env("KUBECONFIG", &kubeconfig)
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let wait_log = |needle: String| {
        let log = log.clone();
        async move {
            let start = Instant::now();
            loop {
                if std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains(&needle)
                {
                    return;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(180),
                    "no '{needle}' in the EPP log"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    wait_log("pool synced: ready".into()).await;
    wait_log("llmsched-e2e-0".into()).await;
    kubectl(&["delete", "pod", "llmsched-e2e-0", "--wait=false"], None);
    wait_log("pod not ready: removed".into()).await;
    kubectl(&["delete", "inferencepool", pool], None);
    wait_log("InferencePool not found".into()).await;
    child.start_kill().unwrap();
    let _ = child.wait().await;
}
