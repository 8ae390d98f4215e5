//! The chart's standalone pod, run as the kubelet would run it, with nothing but what
//! `helm template` rendered: the init container's `llmsched envoy-config` command writes the
//! bootstrap, the Envoy container's args start a real Envoy on it, the EPP container's args
//! and env (plus a `KUBECONFIG`) start the built `llmsched`, and the EPP talks to the API
//! server as the chart's service account, allowed exactly what the rendered Roles,
//! ClusterRole and bindings grant.
//!
//! The API server is `llmsched-kubetest` (no kube-apiserver, k3s, kind or envtest can be
//! installed here): it speaks the real REST/watch protocol over TLS and authorizes every
//! request against a permission table filled from the rendered RBAC objects, as RBAC would.
//! The chart's own InferencePool object is created in it; simulated vLLM replicas on
//! 127.0.0.2-3 are its pods. Ports are the chart's values (`ports.*`, `envoy.*`) set to free
//! ones, so the test runs beside others.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap (team rule: no unwrap outside tests)

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use llmsched_kubetest::{Permission, ResourceKind, TestApiServer, UserInfo, objects};
use llmsched_sim::{ClusterConfig, ReplicaConfig, SimCluster};
use serde::Deserialize;
use serde_json::Value;
use support::{Tool, both, repo_root, run, tool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RELEASE: &str = "qwen";
const NS: &str = "llm-d";
const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
const DEADLINE: Duration = Duration::from_secs(90);
const SA_TOKEN: &str = "chart-service-account-token";

fn free_port(ip: [u8; 4]) -> u16 {
    std::net::TcpListener::bind(SocketAddr::from((ip, 0)))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// A plain HTTP/1.1 exchange: status and body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let mut s = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return (0, e.to_string()),
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, "write failed".into());
    }
    let mut out = Vec::new();
    if tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .is_err()
    {
        return (0, "timed out".into());
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chart_standalone_pod_routes_with_only_its_rbac() {
    let dir = tempfile::tempdir().unwrap();

    // Two model-server "pods": simulated vLLM replicas on their own loopback addresses.
    let port = free_port([127, 0, 0, 2]);
    let ips = ["127.0.0.2", "127.0.0.3"];
    let addrs: Vec<SocketAddr> = ips
        .iter()
        .map(|ip| format!("{ip}:{port}").parse().unwrap())
        .collect();
    let replica = ReplicaConfig::from_profile("llama3.1-8b-h100")
        .unwrap()
        .with_time_scale(100.0);
    let _sim = SimCluster::start(ClusterConfig::new(addrs, replica))
        .await
        .expect("simulator starts");

    // The chart, rendered for this test's free ports; two replicas, so the EPP runs with
    // leader election and the Lease Role is rendered (one replica runs here: it must lead).
    let (grpc, health, metrics, envoy_port, admin) = (
        free_port([127, 0, 0, 1]),
        free_port([127, 0, 0, 1]),
        free_port([127, 0, 0, 1]),
        free_port([127, 0, 0, 1]),
        free_port([127, 0, 0, 1]),
    );
    let out = run(std::process::Command::new(tool(Tool::Helm))
        .args(["template", RELEASE])
        .arg(repo_root().join("deploy/helm/llmsched"))
        .args([
            "--namespace",
            NS,
            "--set",
            "replicas=2",
            "--set",
            "inferencePool.create=true",
        ])
        .args([
            "--set-string",
            "inferencePool.modelServers.matchLabels.app=vllm",
        ])
        .arg(format!("--set=inferencePool.targetPorts[0].number={port}"))
        .arg(format!(
            "--set=ports.grpc={grpc},ports.health={health},ports.metrics={metrics}"
        ))
        .arg(format!(
            "--set=envoy.port={envoy_port},envoy.adminPort={admin}"
        )));
    assert!(out.status.success(), "helm template: {}", both(&out));
    let docs: Vec<Value> =
        serde_norway::Deserializer::from_str(&String::from_utf8(out.stdout).unwrap())
            .map(|d| Value::deserialize(d).unwrap())
            .filter(|v| !v.is_null())
            .collect();
    fn of_kind<'a>(docs: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> {
        docs.iter().filter(move |d| d["kind"] == kind)
    }
    let find = |kind: &'static str| of_kind(&docs, kind);
    let deployment = find("Deployment").next().unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let container = |name: &str| {
        pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
            .clone()
    };
    let sa = pod["serviceAccountName"].as_str().unwrap().to_string();
    let user = UserInfo::service_account(NS, &sa);

    // The API server: every request authorized; the service account may do what the
    // rendered RBAC grants it and nothing else.
    let api = TestApiServer::builder()
        .tls(true)
        .require_token("kubetest-admin-token")
        .authorize_requests(true)
        .start()
        .await
        .unwrap();
    api.register_inference_extension_kinds();
    api.add_token(SA_TOKEN, user.clone());
    let mut granted = 0;
    for binding in find("RoleBinding").chain(find("ClusterRoleBinding")) {
        let subject = &binding["subjects"][0];
        assert_eq!(subject["name"], sa.as_str());
        let role_kind = binding["roleRef"]["kind"].as_str().unwrap();
        let role = of_kind(&docs, role_kind)
            .find(|r| r["metadata"]["name"] == binding["roleRef"]["name"])
            .unwrap();
        let namespace = role["metadata"]["namespace"].as_str();
        for rule in role["rules"].as_array().unwrap() {
            for verb in strings(&rule["verbs"]) {
                for path in strings(&rule["nonResourceURLs"]) {
                    api.allow(Permission::non_resource(&user.username, &verb, &path));
                    granted += 1;
                }
                for group in strings(&rule["apiGroups"]) {
                    for resource in strings(&rule["resources"]) {
                        api.allow(match namespace {
                            Some(ns) => {
                                Permission::namespaced(&user.username, &verb, &group, &resource, ns)
                            }
                            None => Permission::resource(&user.username, &verb, &group, &resource),
                        });
                        granted += 1;
                    }
                }
            }
        }
    }
    assert!(granted >= 10, "only {granted} permissions rendered");

    // The cluster: the chart's InferencePool and two ready pods.
    let pool = find("InferencePool").next().unwrap().clone();
    api.create(&ResourceKind::inference_pools_v1(), pool)
        .unwrap();
    for (i, ip) in ips.iter().enumerate() {
        api.create(
            &ResourceKind::pods(),
            objects::pod(NS, &format!("vllm-{i}"), &[("app", "vllm")], ip, true),
        )
        .unwrap();
    }
    let kubeconfig = dir.path().join("kubeconfig");
    api.kubeconfig().token(SA_TOKEN).write(&kubeconfig).unwrap();

    // The ConfigMap mounted at /config.
    let config_map = find("ConfigMap")
        .find(|c| c["metadata"]["name"] == deployment["metadata"]["name"])
        .unwrap();
    let config_dir = dir.path().join("config");
    std::fs::create_dir(&config_dir).unwrap();
    for (key, content) in config_map["data"].as_object().unwrap() {
        std::fs::write(config_dir.join(key), content.as_str().unwrap()).unwrap();
    }
    let local = |p: &str, mount: &str, to: &Path| -> String {
        p.strip_prefix(mount).map_or_else(
            || p.to_string(),
            |rest| to.join(rest.trim_start_matches('/')).display().to_string(),
        )
    };

    // Init container: the bootstrap, into the shared volume (here a temporary folder).
    let envoy_dir = dir.path().join("envoy");
    std::fs::create_dir(&envoy_dir).unwrap();
    let init = &pod["initContainers"][0];
    let init_args: Vec<String> = strings(&init["args"])
        .iter()
        .map(|a| local(a, "/etc/envoy", &envoy_dir))
        .collect();
    let out = run(std::process::Command::new(env!("CARGO_BIN_EXE_llmsched"))
        .arg("envoy-config")
        .args(&init_args));
    assert!(out.status.success(), "init container: {}", both(&out));

    // The EPP container: its args and env (the downward API's values), and a KUBECONFIG.
    let epp_c = container("epp");
    let epp_args: Vec<String> = strings(&epp_c["args"])
        .iter()
        .map(|a| local(a, "/config", &config_dir))
        .collect();
    let epp_log = dir.path().join("epp.log");
    let mut epp = tokio::process::Command::new(env!("CARGO_BIN_EXE_llmsched"))
        .arg("epp")
        .args(&epp_args)
        .env("NAMESPACE", NS)
        .env("POD_NAME", format!("{RELEASE}-llmsched-5d9c7b8f4-abcde"))
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&epp_log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // The Envoy container: its args, the bootstrap path mapped to the folder.
    let envoy_args: Vec<String> = strings(&container("envoy")["args"])
        .iter()
        .map(|a| local(a, "/etc/envoy", &envoy_dir))
        .collect();
    let envoy_log = dir.path().join("envoy.log");
    let mut envoy = tokio::process::Command::new(tool(Tool::Envoy))
        .args(&envoy_args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&envoy_log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let tail = |p: &Path| {
        let t = std::fs::read_to_string(p).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    let front: SocketAddr = format!("127.0.0.1:{envoy_port}").parse().unwrap();
    let body = format!(r#"{{"model":"{MODEL}","prompt":"hello from the chart","max_tokens":2}}"#);
    let start = Instant::now();
    loop {
        let (status, _) = http(front, "POST", "/v1/completions", "", &body).await;
        if status == 200 {
            break;
        }
        if let Ok(Some(s)) = epp.try_wait() {
            panic!("the EPP exited ({s}):\n{}", tail(&epp_log));
        }
        if let Ok(Some(s)) = envoy.try_wait() {
            panic!("Envoy exited ({s}):\n{}", tail(&envoy_log));
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no request routed through the chart's pod (last status {status}):\nEPP:\n{}\nEnvoy:\n{}",
            tail(&epp_log),
            tail(&envoy_log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 0..10 {
        let body = format!(r#"{{"model":"{MODEL}","prompt":"request {i}","max_tokens":2}}"#);
        let (status, text) = http(front, "POST", "/v1/completions", "", &body).await;
        assert_eq!(status, 200, "request {i}: {text}\nEPP:\n{}", tail(&epp_log));
        assert!(text.contains("\"choices\""), "{text}");
    }

    // Authenticated /metrics: the account's own token may read it (the ClusterRole's
    // nonResourceURL rule, checked by the EPP with a SubjectAccessReview), no token may not.
    let metrics_addr: SocketAddr = format!("127.0.0.1:{metrics}").parse().unwrap();
    let (status, text) = http(
        metrics_addr,
        "GET",
        "/metrics",
        &format!("authorization: Bearer {SA_TOKEN}\r\n"),
        "",
    )
    .await;
    assert_eq!(status, 200, "{text}\nEPP:\n{}", tail(&epp_log));
    assert!(text.contains("# TYPE"), "{text}");
    let (status, _) = http(metrics_addr, "GET", "/metrics", "", "").await;
    assert_eq!(status, 401);

    // Everything the EPP asked the API server was allowed, and the parts the RBAC covers
    // were all exercised: the pool, the pods, the Lease, the reviews.
    let requests = api.requests();
    let mine: Vec<_> = requests
        .iter()
        .filter(|r| r.user == user.username)
        .collect();
    let denied: Vec<String> = mine
        .iter()
        .filter(|r| r.status == 403)
        .map(|r| format!("{} {} ({})", r.verb, r.path, r.status))
        .collect();
    assert!(denied.is_empty(), "the chart's RBAC denied: {denied:?}");
    for (what, path_part, verb) in [
        ("the pool", "/inferencepools", "watch"),
        ("the pods", "/pods", "watch"),
        ("the Lease", "/leases", "create"),
        ("a TokenReview", "/tokenreviews", "create"),
        ("a SubjectAccessReview", "/subjectaccessreviews", "create"),
    ] {
        assert!(
            mine.iter()
                .any(|r| r.path.contains(path_part) && r.verb == verb && r.status < 300),
            "the EPP never did {verb} on {what}: {:?}",
            mine.iter()
                .map(|r| format!("{} {} {}", r.verb, r.path, r.status))
                .collect::<Vec<_>>()
        );
    }

    epp.kill().await.unwrap();
    envoy.kill().await.unwrap();
}
