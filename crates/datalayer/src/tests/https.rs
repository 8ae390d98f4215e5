//! `https` scraping against real TLS servers on loopback (tokio-rustls with rcgen
//! certificates): skip-verify, a CA bundle, an untrusted certificate, mutual TLS.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use super::*;
use crate::{MetricsScheme, ScrapeTls};

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate for `sans` with `usage`; (certificate PEM, key PEM).
    fn leaf(&self, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A TLS `/metrics` server with `cert`/`key`, requiring a client certificate signed by
/// `client_ca` when given. Counts completed TLS handshakes.
async fn serve_tls(
    ip: &str,
    cert: &str,
    key: &str,
    client_ca: Option<&str>,
    page: String,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key).unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let s = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, page, s) = (acceptor.clone(), page.clone(), s.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    s.fetch_add(1, Ordering::SeqCst);
                    let status = if req.uri().path() == "/metrics" {
                        StatusCode::OK
                    } else {
                        StatusCode::NOT_FOUND
                    };
                    let page = page.clone();
                    async move {
                        let mut resp = Response::new(Full::new(Bytes::from(page)));
                        *resp.status_mut() = status;
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, served)
}

fn https_config(addr: SocketAddr, tls: ScrapeTls) -> DataLayerConfig {
    DataLayerConfig {
        static_endpoints: parse_endpoints_flag(&addr.to_string(), &[]).unwrap(),
        metrics_scheme: MetricsScheme::Https,
        tls,
        ..test_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_insecure_skip_verify_scrapes_a_self_signed_server() {
    let self_signed = rcgen::generate_simple_self_signed(vec!["127.0.0.2".to_string()]).unwrap();
    let (addr, served) = serve_tls(
        "127.0.0.2",
        &self_signed.cert.pem(),
        &self_signed.signing_key.serialize_pem(),
        None,
        vllm_page(4, 2, 0.5, "vllm:kv_cache_usage_perc"),
    )
    .await;
    let (h, metrics) = start_with(https_config(addr, ScrapeTls::default())).await;
    let ep = endpoint(&h, &addr.to_string());
    wait_for("https scrape", || ep.metrics().updated_at.is_some()).await;
    assert_eq!(ep.metrics().waiting_queue_size, 4);
    assert_eq!(ep.metrics().kv_cache_usage, 0.5);
    assert!(served.load(Ordering::SeqCst) >= 1);
    assert_eq!(metrics.errors_of(&addr.to_string()), 0);
    h.shutdown().await;

    // The same server scraped over plain http fails: it speaks TLS only.
    let (h, metrics) = start_with(DataLayerConfig {
        metrics_scheme: MetricsScheme::Http,
        ..https_config(addr, ScrapeTls::default())
    })
    .await;
    let name = addr.to_string();
    wait_for("plain http refused by a TLS server", || {
        metrics.errors_of(&name) >= 1
    })
    .await;
    assert!(endpoint(&h, &name).metrics().updated_at.is_none());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_verifies_against_the_ca_bundle_and_refuses_an_untrusted_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("metrics CA");
    let (cert, key) = ca.leaf(&["127.0.0.2"], ExtendedKeyUsagePurpose::ServerAuth);
    let (addr, _) = serve_tls(
        "127.0.0.2",
        &cert,
        &key,
        None,
        vllm_page(7, 1, 0.25, "vllm:kv_cache_usage_perc"),
    )
    .await;
    let name = addr.to_string();

    // Verified against the CA that signed the server certificate.
    let trusted = write(dir.path(), "ca.pem", &ca.pem());
    let (h, metrics) = start_with(https_config(
        addr,
        ScrapeTls {
            insecure_skip_verify: false,
            ca_cert_path: Some(trusted),
            ..ScrapeTls::default()
        },
    ))
    .await;
    let ep = endpoint(&h, &name);
    wait_for("verified https scrape", || {
        ep.metrics().updated_at.is_some()
    })
    .await;
    assert_eq!(ep.metrics().waiting_queue_size, 7);
    assert_eq!(metrics.errors_of(&name), 0);
    h.shutdown().await;

    // A bundle holding another CA: the handshake fails, counted as `tls`, and the endpoint
    // is not reported as failing (only its metrics are missing).
    let other = write(dir.path(), "other.pem", &Ca::new("someone else").pem());
    let (h, metrics) = start_with(https_config(
        addr,
        ScrapeTls {
            insecure_skip_verify: false,
            ca_cert_path: Some(other),
            ..ScrapeTls::default()
        },
    ))
    .await;
    wait_for("tls error counted", || {
        metrics.errors_of_reason(&name, "tls") >= 2
    })
    .await;
    let ep = endpoint(&h, &name);
    assert!(ep.metrics().updated_at.is_none());
    assert_eq!(ep.health_counters().failures, [0; 4]);
    assert_eq!(
        metrics.errors_of(&name),
        metrics.errors_of_reason(&name, "tls")
    );
    h.shutdown().await;

    // A certificate for another address is refused even by its own CA.
    let (wrong_cert, wrong_key) = ca.leaf(&["10.9.9.9"], ExtendedKeyUsagePurpose::ServerAuth);
    let (wrong_addr, _) = serve_tls(
        "127.0.0.3",
        &wrong_cert,
        &wrong_key,
        None,
        vllm_page(1, 1, 0.1, "vllm:kv_cache_usage_perc"),
    )
    .await;
    let trusted = write(dir.path(), "ca2.pem", &ca.pem());
    let (h, metrics) = start_with(https_config(
        wrong_addr,
        ScrapeTls {
            insecure_skip_verify: false,
            ca_cert_path: Some(trusted),
            ..ScrapeTls::default()
        },
    ))
    .await;
    let wrong_name = wrong_addr.to_string();
    wait_for("name mismatch refused", || {
        metrics.errors_of_reason(&wrong_name, "tls") >= 1
    })
    .await;
    assert!(endpoint(&h, &wrong_name).metrics().updated_at.is_none());
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_presents_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("pool CA");
    let (cert, key) = ca.leaf(&["127.0.0.2"], ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = ca.leaf(&["llmsched-epp"], ExtendedKeyUsagePurpose::ClientAuth);
    let (addr, served) = serve_tls(
        "127.0.0.2",
        &cert,
        &key,
        Some(&ca.pem()),
        vllm_page(3, 3, 0.75, "vllm:kv_cache_usage_perc"),
    )
    .await;
    let name = addr.to_string();
    let ca_path = write(dir.path(), "ca.pem", &ca.pem());
    let cert_path = write(dir.path(), "client.crt", &client_cert);
    let key_path = write(dir.path(), "client.key", &client_key);

    // Without a client certificate the server ends the handshake.
    let (h, metrics) = start_with(https_config(
        addr,
        ScrapeTls {
            insecure_skip_verify: false,
            ca_cert_path: Some(ca_path.clone()),
            ..ScrapeTls::default()
        },
    ))
    .await;
    wait_for("scrape without a client certificate fails", || {
        metrics.errors_of(&name) >= 2
    })
    .await;
    assert!(endpoint(&h, &name).metrics().updated_at.is_none());
    assert_eq!(served.load(Ordering::SeqCst), 0, "no request got through");
    h.shutdown().await;

    // With it, scrapes succeed.
    let (h, metrics) = start_with(https_config(
        addr,
        ScrapeTls {
            insecure_skip_verify: false,
            ca_cert_path: Some(ca_path),
            client_cert_path: Some(cert_path),
            client_key_path: Some(key_path),
        },
    ))
    .await;
    let ep = endpoint(&h, &name);
    wait_for("mTLS scrape", || ep.metrics().updated_at.is_some()).await;
    assert_eq!(ep.metrics().kv_cache_usage, 0.75);
    assert_eq!(metrics.errors_of(&name), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn unusable_tls_files_stop_the_start_with_their_name() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = write(dir.path(), "ca.pem", "-----BEGIN NONSENSE-----\n");
    let e = start(
        https_config(
            "127.0.0.2:1".parse().unwrap(),
            ScrapeTls {
                insecure_skip_verify: false,
                ca_cert_path: Some(garbage),
                ..ScrapeTls::default()
            },
        ),
        Arc::new(EndpointStore::new()),
        DataLayerMetrics::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("caCertPath") && e.contains("ca.pem"), "{e}");
}
