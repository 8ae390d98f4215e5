//! Helpers shared by the integration tests.
//!
//! Every test here runs the real kube-rs client against `llmsched-kubetest`, not a real
//! kube-apiserver: none can run on this machine (kube-apiserver, k3s, kind and envtest are not
//! obtainable from the package registries and there is no container runtime), so the test
//! server speaks the real REST/watch wire protocol instead.
#![allow(dead_code)]

use std::time::Duration;

use llmsched_kubetest::{Kubeconfig, TestApiServer};

/// Generous deadline for conditions on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A kube-rs client configured from a kubeconfig for `server` (admin token if any).
pub async fn client(server: &TestApiServer) -> kube::Client {
    client_with(server.kubeconfig()).await
}

/// A kube-rs client from a kubeconfig, read the way `KUBECONFIG` files are read.
pub async fn client_with(kc: Kubeconfig) -> kube::Client {
    let kc = kube::config::Kubeconfig::from_yaml(&kc.to_yaml()).expect("kubeconfig parses");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .expect("kubeconfig is usable");
    kube::Client::try_from(cfg).expect("client builds")
}

/// Polls `f` until it holds or the deadline passes.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `kube::Error::Api` status code, if that is what `e` is.
pub fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// The real kubectl: `$LLMSCHED_KUBECTL_BIN` (set by `scripts/test.sh` from
/// `scripts/install-tools.sh --env`), else installed by `scripts/install-tools.sh kubectl`
/// into `.tools/`. A missing tool fails the test; it never turns into a skipped check.
pub fn kubectl() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(p) = std::env::var_os("LLMSCHED_KUBECTL_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "$LLMSCHED_KUBECTL_BIN is {} but that is not a file",
            p.display()
        );
        return p;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root");
    let tools = std::env::var_os("LLMSCHED_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".tools"));
    std::fs::create_dir_all(&tools).expect("tools dir");
    // The same lock file the other test binaries take around installs.
    let lock = std::fs::File::create(tools.join(".install.lock")).expect("lock file");
    lock.lock().expect("install lock");
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/install-tools.sh"))
        .arg("kubectl")
        .current_dir(&root)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run scripts/install-tools.sh kubectl");
    drop(lock);
    assert!(
        out.status.success(),
        "scripts/install-tools.sh kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap_or(""),
    );
    assert!(path.is_file(), "install-tools.sh printed {path:?}");
    path
}
