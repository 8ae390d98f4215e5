//! kube-rs over TLS through a kubeconfig file, as `KUBECONFIG` gives it to a process.
//!
//! Why not a real API server: none can run here (kube-apiserver, k3s, kind and envtest are
//! not obtainable from the package registries; there is no container runtime). The test
//! server serves HTTPS with a throw-away CA carried in `certificate-authority-data`, as a
//! cluster's kubeconfig does.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

mod common;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use llmsched_kubetest::{ResourceKind, TestApiServer, objects};

async fn client_from_file(path: &std::path::Path) -> Result<kube::Client, kube::Error> {
    let kc = Kubeconfig::read_from(path).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg)
}

/// Not a real API server (none can run here): kubetest serves the real protocol over TLS.
#[tokio::test]
async fn kube_rs_over_tls_with_a_written_kubeconfig() {
    let server = TestApiServer::builder()
        .tls(true)
        .require_token("s3cret")
        .start()
        .await
        .unwrap();
    assert!(server.url().starts_with("https://127.0.0.1:"));
    server
        .create(
            &ResourceKind::pods(),
            objects::pod("llm-d", "vllm-0", &[("app", "vllm")], "127.0.0.2", true),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    server.kubeconfig().namespace("llm-d").write(&path).unwrap();

    let client = client_from_file(&path).await.unwrap();
    assert_eq!(client.default_namespace(), "llm-d");
    let pods: Api<Pod> = Api::default_namespaced(client);
    let list = pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(
        list.items[0].status.as_ref().unwrap().pod_ip.as_deref(),
        Some("127.0.0.2")
    );
    let log = server.requests();
    assert_eq!(log.last().unwrap().user, "kubetest-admin");

    // The wrong token: 401 Unauthorized.
    let bad = dir.path().join("bad");
    server.kubeconfig().token("wrong").write(&bad).unwrap();
    let err = Api::<Pod>::all(client_from_file(&bad).await.unwrap())
        .list(&ListParams::default())
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => assert_eq!((s.code, s.reason.as_str()), (401, "Unauthorized")),
        other => panic!("{other:?}"),
    }

    // A kubeconfig trusting another CA: the TLS handshake fails, no request is served.
    let other = TestApiServer::builder().tls(true).start().await.unwrap();
    let foreign = dir.path().join("foreign");
    let mut kc = other.kubeconfig().token("s3cret");
    kc = kc.server(&server.url());
    kc.write(&foreign).unwrap();
    let served = server.requests().len();
    let err = Api::<Pod>::all(client_from_file(&foreign).await.unwrap())
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(
        common::api_code(&err).is_none(),
        "a TLS failure, not an API answer: {err:?}"
    );
    assert_eq!(server.requests().len(), served);

    // insecure-skip-tls-verify works without the CA.
    let insecure = dir.path().join("insecure");
    server
        .kubeconfig()
        .insecure_skip_tls_verify()
        .write(&insecure)
        .unwrap();
    Api::<Pod>::all(client_from_file(&insecure).await.unwrap())
        .list(&ListParams::default())
        .await
        .unwrap();

    // A stopped server: a connection error, not a hang.
    server.stop().await;
    let err = Api::<Pod>::all(client_from_file(&path).await.unwrap())
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(common::api_code(&err).is_none(), "{err:?}");
}
