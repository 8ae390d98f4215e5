//! ext_proc TLS: the certificate pair in `--cert-path` is loaded and, with
//! `--enable-cert-reload`, replaced for new connections when the files change.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

use std::sync::Arc;
use std::time::Duration;

use llmsched_director::testing::*;
use llmsched_extproc::tls::{CERT_FILE, KEY_FILE, generate_self_signed};
use llmsched_extproc::*;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn cert_dir_is_loaded_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let (c1, k1) = generate_self_signed().unwrap();
    std::fs::write(dir.path().join(CERT_FILE), &c1).unwrap();
    std::fs::write(dir.path().join(KEY_FILE), &k1).unwrap();
    let tls = TlsConfig::from_cert_dir(dir.path(), true).unwrap();
    assert_eq!(tls.certificate_pem(), c1.as_bytes());
    let director =
        Arc::new(llmsched_director::Director::builder(basic_config(1, ""), endpoints(1)).build());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_ext_proc(
        listener,
        director,
        Some(tls),
        None,
        ExtProcOptions::default(),
        shutdown.clone(),
    ));
    let connect = |ca: String| async move {
        let ep =
            tonic::transport::Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
                .unwrap()
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                        .domain_name("localhost"),
                )
                .unwrap();
        ep.connect().await.is_ok()
    };
    assert!(connect(c1.clone()).await);
    // Replace the pair; new connections get the new certificate.
    let (c2, k2) = generate_self_signed().unwrap();
    std::fs::write(dir.path().join(CERT_FILE), &c2).unwrap();
    std::fs::write(dir.path().join(KEY_FILE), &k2).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if connect(c2.clone()).await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "certificate never reloaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!connect(c1).await, "old certificate no longer served");
    shutdown.cancel();
}
