//! gRPC health transitions, the `/metrics` endpoint and certificate loading/reload.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use llmsched_core::endpoint::{EndpointSet, EndpointSource};
use llmsched_director::testing::*;
use llmsched_extproc::testing::*;
use llmsched_extproc::tls::{CERT_FILE, KEY_FILE, generate_self_signed};
use llmsched_extproc::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// An endpoint source whose snapshot the test replaces.
struct Swappable(ArcSwap<EndpointSet>);

impl EndpointSource for Swappable {
    fn snapshot(&self) -> Arc<EndpointSet> {
        self.0.load_full()
    }
}

async fn check(
    client: &mut HealthClient<tonic::transport::Channel>,
    svc: &str,
) -> Result<i32, tonic::Code> {
    client
        .check(HealthCheckRequest {
            service: svc.to_string(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| s.code())
}

#[tokio::test]
async fn health_follows_endpoint_sync() {
    let src = Arc::new(Swappable(ArcSwap::from_pointee(EndpointSet::default())));
    let shutdown = CancellationToken::new();
    let handle = HealthHandle::new().await;
    spawn_readiness_watch(
        handle.clone(),
        src.clone(),
        Duration::from_millis(5),
        shutdown.clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_health(listener, handle.clone(), shutdown.clone()));
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(ch);
    let serving = ServingStatus::Serving as i32;
    let not_serving = ServingStatus::NotServing as i32;
    assert_eq!(check(&mut client, "liveness").await, Ok(serving));
    for s in [
        "readiness",
        "",
        "envoy.service.ext_proc.v3.ExternalProcessor",
    ] {
        assert_eq!(check(&mut client, s).await, Ok(not_serving), "{s}");
    }
    assert_eq!(check(&mut client, "nope").await, Err(tonic::Code::NotFound));
    src.0.store(Arc::new(EndpointSet {
        synced: true,
        ..Default::default()
    }));
    let h = handle.clone();
    eventually("ready", move || h.is_ready()).await;
    for s in [
        "readiness",
        "",
        "envoy.service.ext_proc.v3.ExternalProcessor",
        "liveness",
    ] {
        assert_eq!(check(&mut client, s).await, Ok(serving), "{s}");
    }
    handle.set_ready(false).await;
    assert_eq!(check(&mut client, "readiness").await, Ok(not_serving));
    assert_eq!(check(&mut client, "liveness").await, Ok(serving));
    shutdown.cancel();
}

#[tokio::test]
async fn metrics_endpoint_serves_the_shared_registry() {
    let epp = epp(basic_config(1, ""), endpoints(1)).start().await;
    // "m" was served before, so it is a label value of its own (llmsched_core::labels).
    epp.director.metrics().known.learn("m");
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    c.send_body(&completion_body("m", "p", false), 1).await;
    let _ = c.next().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_metrics(
        listener,
        epp.registry.clone(),
        shutdown.clone(),
    ));
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let page = get("/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("application/openmetrics-text"));
    assert!(page.contains("inference_objective_request_total{model_name=\"m\",target_model_name=\"m\",priority=\"0\"} 1"), "{page}");
    assert!(page.contains("inference_extension_info{commit=\"test\",build_ref=\"test\"} 1"));
    assert!(get("/other").await.starts_with("HTTP/1.1 404"));
    shutdown.cancel();
}

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
