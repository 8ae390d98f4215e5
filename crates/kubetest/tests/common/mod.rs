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
