//! The data layer as `llmsched epp` configures it: `--model-server-metrics-scheme=https`
//! (with `--model-server-metrics-https-insecure-skip-verify`) and the configuration's
//! `metrics-data-source` / `core-metrics-extractor` parameters reach the scraper, against
//! real TLS metrics servers on loopback; configurations the data layer cannot honour fail
//! the start with an error naming the field.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use llmsched_core::EndpointSource;
use llmsched_epp::{Args, EppHandle};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

fn page(waiting: u32, metric: &str) -> String {
    format!(
        "# TYPE {metric} gauge\n{metric}{{engine=\"0\"}} {waiting}\n\
         # TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 1\n\
         # TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc 0.5\n"
    )
}

/// A TLS server answering `path` with `body` (404 elsewhere).
async fn tls_server(
    ip: &str,
    cert_pem: &str,
    key_pem: &str,
    path: &'static str,
    body: String,
) -> SocketAddr {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let mut resp = hyper::Response::new(Full::new(Bytes::from(body.clone())));
                    if req.uri().path() != path {
                        *resp.status_mut() = hyper::StatusCode::NOT_FOUND;
                    }
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

fn args(extra: &[String]) -> Args {
    let mut v: Vec<String> = [
        "epp",
        "--secure-serving=false",
        "--grpc-port=0",
        "--grpc-health-port=0",
        "--metrics-port=0",
        "--bind-address=127.0.0.1",
        "--refresh-metrics-interval=10ms",
        "--drain-timeout=50ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend_from_slice(extra);
    Args::try_parse_from(v).unwrap()
}

async fn waiting_of(epp: &EppHandle, addr: SocketAddr, want: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let snap = epp.store().snapshot();
        let m = snap.by_hostport(&addr.to_string()).unwrap().metrics();
        if m.updated_at.is_some() && m.waiting_queue_size == want {
            return;
        }
        assert!(Instant::now() < deadline, "{addr} not scraped: {m:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn metrics_text(epp: &EppHandle) -> String {
    let stream = tokio::net::TcpStream::connect(epp.metrics_addr)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            hyper::Request::get("/metrics")
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    use http_body_util::BodyExt;
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_scraping_from_the_flags() {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.41".to_string()]).unwrap();
    let addr = tls_server(
        "127.0.0.41",
        &cert.cert.pem(),
        &cert.signing_key.serialize_pem(),
        "/metrics",
        page(6, "vllm:num_requests_waiting"),
    )
    .await;
    // The reference's defaults: https, any certificate accepted.
    let epp = llmsched_epp::start(args(&[
        format!("--endpoints={addr}"),
        "--model-server-metrics-scheme=https".into(),
    ]))
    .await
    .unwrap();
    waiting_of(&epp, addr, 6).await;
    epp.shutdown().await;

    // Verification on: a self-signed certificate is not trusted; the failures are counted
    // as `tls` and the endpoint keeps no metrics.
    let epp = llmsched_epp::start(args(&[
        format!("--endpoints={addr}"),
        "--model-server-metrics-scheme=https".into(),
        "--model-server-metrics-https-insecure-skip-verify=false".into(),
    ]))
    .await;
    match epp {
        Ok(epp) => {
            let series = format!(
                "llmsched_datalayer_scrape_errors_total{{endpoint=\"{addr}\",reason=\"tls\"}}"
            );
            let deadline = Instant::now() + Duration::from_secs(30);
            while !metrics_text(&epp).await.contains(&series) {
                assert!(Instant::now() < deadline, "no tls scrape error counted");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let snap = epp.store().snapshot();
            assert!(
                snap.by_hostport(&addr.to_string())
                    .unwrap()
                    .metrics()
                    .updated_at
                    .is_none()
            );
            epp.shutdown().await;
        }
        // A machine without any system root certificate: the start says so.
        Err(e) => assert!(e.to_string().contains("caCertPath"), "{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_data_source_and_extractor_parameters_reach_the_scraper() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.42".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    // The server answers on /custom/metrics only, with a metric only the configured engine
    // mapping knows.
    let addr = tls_server(
        "127.0.0.42",
        &leaf.pem(),
        &key.serialize_pem(),
        "/custom/metrics",
        page(9, "my_engine_queue"),
    )
    .await;
    let config = format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- name: scrape
  type: metrics-data-source
  parameters: {{scheme: https, path: /custom/metrics, insecureSkipVerify: false, caCertPath: {}}}
- name: read
  type: core-metrics-extractor
  parameters:
    defaultEngine: mine
    engineConfigs:
    - {{name: mine, queuedRequestsSpec: my_engine_queue, runningRequestsSpec: 'vllm:num_requests_running', kvUsageSpec: 'vllm:kv_cache_usage_perc'}}
dataLayer:
  sources:
  - pluginRef: scrape
    extractors: [{{pluginRef: read}}]
",
        ca_path.display()
    );
    let epp = llmsched_epp::start(args(&[
        format!("--endpoints={addr}"),
        format!("--config-text={config}"),
    ]))
    .await
    .unwrap();
    waiting_of(&epp, addr, 9).await;
    epp.shutdown().await;
}

#[tokio::test]
async fn data_layer_configurations_that_cannot_work_fail_the_start_naming_the_field() {
    let head = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n";
    let cases = [
        (
            format!("{head}- type: metrics-data-source\n  parameters: {{port: 0}}\n"),
            "invalid port 0",
        ),
        (
            format!("{head}- type: metrics-data-source\n  parameters: {{prot: 9000}}\n"),
            "unknown field `prot`",
        ),
        (
            format!("{head}- type: metrics-data-source\n  parameters: {{scheme: ftp}}\n"),
            "scheme must be 'http' or 'https'",
        ),
        (
            format!("{head}- type: metrics-data-source\n  parameters: {{interval: often}}\n"),
            "invalid interval 'often'",
        ),
        (
            format!(
                "{head}- type: metrics-data-source\n  parameters: {{scheme: https, insecureSkipVerify: false, caCertPath: /nonexistent/ca.pem}}\n"
            ),
            "caCertPath /nonexistent/ca.pem",
        ),
        (
            format!(
                "{head}dataLayer:\n  sources:\n  - pluginRef: queue-scorer\n    extractors: []\n"
            ),
            "plugin 'queue-scorer' (type queue-scorer) is not a data source",
        ),
        (
            format!("{head}dataLayer:\n  injectDefaults: false\n"),
            "injectDefaults is false",
        ),
        (
            format!(
                "{head}dataLayer:\n  sources:\n  - pluginRef: metrics-data-source\n    extractors: [{{pluginRef: core-metrics-extractor}}]\n  bogus: 1\n"
            ),
            "unknown field `bogus`",
        ),
        (
            format!(
                "{head}- type: core-metrics-extractor\n  parameters: {{defaultEngine: nope}}\n"
            ),
            "unknown default engine",
        ),
        (
            format!(
                "{head}- type: core-metrics-extractor\n  parameters:\n    engineConfigs: [{{name: x, customMetrics: [{{attributeKey: a, metricSpec: m}}]}}]\n"
            ),
            "customMetrics is not supported",
        ),
    ];
    for (config, needle) in cases {
        let e = llmsched_epp::start(args(&[
            "--endpoints=127.0.0.1:1".into(),
            format!("--config-text={config}"),
        ]))
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--config-text") && e.contains(needle),
            "{config}\nexpected '{needle}' in: {e}"
        );
    }
    // The scheme flag still refuses anything but http and https.
    let mut a = args(&["--endpoints=127.0.0.1:1".into()]);
    a.model_server_metrics_scheme = "ftp".into();
    let e = llmsched_epp::start(a).await.unwrap_err().to_string();
    assert!(e.contains("model-server-metrics-scheme"), "{e}");
}
