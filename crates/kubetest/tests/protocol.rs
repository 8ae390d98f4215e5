//! The wire protocol itself, byte for byte where clients depend on it: `Status` bodies,
//! chunked watch streams, legacy watch paths, HTTP/2 (h2c and TLS ALPN), error codes.
//!
//! Why not a real API server: none can run here (kube-apiserver, k3s, kind and envtest are
//! not obtainable from the package registries; there is no container runtime). These tests pin
//! the parts of the real protocol that kube-rs, client-go and kubectl rely on.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use llmsched_kubetest::{ResourceKind, TestApiServer, objects};
use serde_json::{Value, json};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http1() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2c() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

async fn call(
    c: &HttpClient,
    server: &TestApiServer,
    method: Method,
    path: &str,
    content_type: &str,
    body: &str,
) -> (StatusCode, http::HeaderMap, Value) {
    let req = Request::builder()
        .method(method)
        .uri(format!("{}{path}", server.url()))
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, headers, v)
}

async fn get(c: &HttpClient, server: &TestApiServer, path: &str) -> (StatusCode, Value) {
    let (s, _, v) = call(c, server, Method::GET, path, "application/json", "").await;
    (s, v)
}

/// Not a real API server (none can run here): pins the real server's Status bodies.
#[tokio::test]
async fn status_bodies_are_shaped_as_the_real_server() {
    let server = TestApiServer::start().await.unwrap();
    let c = http1();

    let (s, v) = get(&c, &server, "/api/v1/namespaces/llm-d/pods/nope").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(
        v,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "pods \"nope\" not found", "reason": "NotFound",
            "details": {"name": "nope", "kind": "pods"}, "code": 404})
    );
    let (s, v) = get(
        &c,
        &server,
        "/apis/coordination.k8s.io/v1/namespaces/x/leases/l",
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["message"], "leases.coordination.k8s.io \"l\" not found");
    assert_eq!(v["details"]["group"], "coordination.k8s.io");

    // Unknown group, version, resource: the generic 404.
    for path in [
        "/apis/llm-d.ai",
        "/apis/llm-d.ai/v1alpha2",
        "/apis/llm-d.ai/v1alpha2/namespaces/x/inferenceobjectives",
        "/api/v2",
        "/api/v1/namespaces/x/widgets",
        "/nonsense/path",
    ] {
        let (s, v) = get(&c, &server, path).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            v["message"], "the server could not find the requested resource",
            "{path}"
        );
        assert_eq!(v["reason"], "NotFound");
    }
    // A namespaced kind's object without a namespace, a cluster kind with one: 404.
    assert_eq!(
        get(&c, &server, "/api/v1/pods/p").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&c, &server, "/api/v1/namespaces/x/nodes/n").await.0,
        StatusCode::NOT_FOUND
    );

    // Malformed JSON body: 400 BadRequest, nothing stored.
    let (s, _, v) = call(
        &c,
        &server,
        Method::POST,
        "/api/v1/namespaces/x/pods",
        "application/json",
        "{\"metadata\": {\"name\": ",
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["reason"], "BadRequest");
    assert!(server.list(&ResourceKind::pods(), None).is_empty());
    // Wrong kind in the body for the endpoint: 400.
    let (s, _, v) = call(
        &c,
        &server,
        Method::POST,
        "/api/v1/namespaces/x/pods",
        "application/json",
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}}).to_string(),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("does not match the expected kind")
    );
    // Missing name: 422 Invalid.
    let (s, _, v) = call(
        &c,
        &server,
        Method::POST,
        "/api/v1/namespaces/x/pods",
        "application/json",
        "{\"metadata\": {}}",
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        v["message"],
        "Pod \"\" is invalid: metadata.name: Required value: name or generateName is required"
    );
    // POST to a single object: 405.
    let (s, _, v) = call(
        &c,
        &server,
        Method::POST,
        "/api/v1/namespaces/x/pods/a",
        "application/json",
        "{}",
    )
    .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(v["reason"], "MethodNotAllowed");
    // A PATCH with an unknown content type: 415.
    server
        .create(
            &ResourceKind::pods(),
            objects::pod("x", "a", &[], "127.0.0.2", true),
        )
        .unwrap();
    let (s, _, v) = call(
        &c,
        &server,
        Method::PATCH,
        "/api/v1/namespaces/x/pods/a",
        "text/plain",
        "{}",
    )
    .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(v["reason"], "UnsupportedMediaType");
    // Apply without fieldManager: 422.
    let (s, _, _) = call(
        &c,
        &server,
        Method::PATCH,
        "/api/v1/namespaces/x/pods/a",
        "application/apply-patch+yaml",
        "{}",
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    // A JSON patch whose test fails: 422 and the object unchanged.
    let before = server.get(&ResourceKind::pods(), "x", "a").unwrap();
    let (s, _, _) = call(
        &c,
        &server,
        Method::PATCH,
        "/api/v1/namespaces/x/pods/a",
        "application/json-patch+json",
        &json!([{"op": "add", "path": "/metadata/labels/z", "value": "1"}, {"op": "test", "path": "/metadata/name", "value": "b"}]).to_string(),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(server.get(&ResourceKind::pods(), "x", "a").unwrap(), before);
    // Bad resourceVersion; one from the future.
    let (s, _) = get(&c, &server, "/api/v1/pods?resourceVersion=abc").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, v) = get(&c, &server, "/api/v1/pods?resourceVersion=999999").await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("Too large resource version")
    );
    // A garbage continue token: 400; one older than the history: 410.
    let (s, _) = get(&c, &server, "/api/v1/pods?limit=1&continue=garbage").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    server
        .create(
            &ResourceKind::pods(),
            objects::pod("x", "b", &[], "127.0.0.3", true),
        )
        .unwrap();
    let (s, page) = get(&c, &server, "/api/v1/pods?limit=1").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(page["metadata"]["remainingItemCount"], 1);
    let token = page["metadata"]["continue"].as_str().unwrap().to_string();
    server.set_pod_ready("x", "a", false).unwrap();
    server.compact();
    let (s, v) = get(
        &c,
        &server,
        &format!("/api/v1/pods?limit=1&continue={token}"),
    )
    .await;
    assert_eq!(s, StatusCode::GONE);
    assert_eq!(v["reason"], "Expired");
}

/// Not a real API server (none can run here): pins the watch stream framing.
#[tokio::test]
async fn watch_streams_are_chunked_json_lines_on_both_paths() {
    let server = TestApiServer::start().await.unwrap();
    server
        .create(
            &ResourceKind::pods(),
            objects::pod("x", "a", &[], "127.0.0.2", true),
        )
        .unwrap();
    let c = http1();
    let paths = [
        "/api/v1/namespaces/x/pods?watch=1&timeoutSeconds=1",
        "/api/v1/namespaces/x/pods?watch=true&timeoutSeconds=1",
        "/api/v1/watch/namespaces/x/pods?timeoutSeconds=1",
        "/api/v1/watch/namespaces/x/pods/a?timeoutSeconds=1",
    ];
    // All four at once: each ends when the server closes it at timeoutSeconds.
    let streams = paths.iter().map(|path| {
        let c = c.clone();
        let url = format!("{}{path}", server.url());
        async move {
            let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
            let resp = c.request(req).await.unwrap();
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, headers, String::from_utf8(body.to_vec()).unwrap())
        }
    });
    let results = futures::future::join_all(streams).await;
    for (path, (status, headers, text)) in paths.iter().zip(results) {
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers
                .get("transfer-encoding")
                .map(|v| v.to_str().unwrap()),
            Some("chunked"),
            "{path}"
        );
        assert_eq!(headers["content-type"], "application/json");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 1, "{path}: {text}");
        assert_eq!(lines[0]["type"], "ADDED");
        assert_eq!(lines[0]["object"]["kind"], "Pod");
        assert_eq!(lines[0]["object"]["apiVersion"], "v1");
        assert!(text.ends_with('\n'));
    }
    let watches: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.is_watch())
        .collect();
    assert_eq!(watches.len(), 4);
}

/// Not a real API server (none can run here): HTTP/2 as client-go negotiates it.
#[tokio::test]
async fn http2_cleartext_and_over_tls() {
    let server = TestApiServer::start().await.unwrap();
    let (s, v) = get(&h2c(), &server, "/version").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["major"], "1");

    // TLS with ALPN h2, trusting the server's CA.
    let tls = TestApiServer::builder().tls(true).start().await.unwrap();
    tls.create(
        &ResourceKind::pods(),
        objects::pod("x", "a", &[], "127.0.0.2", true),
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    let ca = tls.ca_pem().unwrap();
    let der = pem_to_der(ca);
    roots.add(der.into()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(tls.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("{}/api/v1/namespaces/x/pods", tls.url()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["kind"], "PodList");
    assert_eq!(v["items"][0]["metadata"]["name"], "a");
    // A watch over h2 streams too.
    let req = Request::get(format!(
        "{}/api/v1/namespaces/x/pods?watch=true&timeoutSeconds=1",
        tls.url()
    ))
    .body(Full::new(Bytes::new()))
    .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).starts_with("{\"type\":\"ADDED\""));
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

/// Not a real API server (none can run here): delays and discovery documents.
#[tokio::test]
async fn discovery_documents_and_delays() {
    let server = TestApiServer::start().await.unwrap();
    server.register_inference_extension_kinds();
    let c = http1();
    let (_, v) = get(&c, &server, "/api").await;
    assert_eq!(v["kind"], "APIVersions");
    assert_eq!(v["versions"], json!(["v1"]));
    let (_, v) = get(&c, &server, "/api/v1").await;
    assert_eq!(v["kind"], "APIResourceList");
    let pods = v["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "pods")
        .unwrap();
    assert_eq!(pods["namespaced"], true);
    assert_eq!(pods["kind"], "Pod");
    assert_eq!(pods["singularName"], "pod");
    assert!(
        v["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "pods/status")
    );
    let (_, v) = get(&c, &server, "/apis/inference.networking.x-k8s.io").await;
    assert_eq!(v["kind"], "APIGroup");
    assert_eq!(v["preferredVersion"]["version"], "v1alpha2");
    let (_, v) = get(&c, &server, "/apis").await;
    let groups: Vec<&str> = v["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    for g in [
        "inference.networking.k8s.io",
        "llm-d.ai",
        "coordination.k8s.io",
    ] {
        assert!(groups.contains(&g), "{g} in {groups:?}");
    }

    // A delay long enough that a client with a short timeout gives up, then no delay.
    server.set_delay(Some(Duration::from_secs(30)));
    let quick =
        tokio::time::timeout(Duration::from_millis(300), get(&c, &server, "/version")).await;
    assert!(quick.is_err(), "the delayed answer did not come early");
    server.set_delay(None);
    assert_eq!(get(&c, &server, "/version").await.0, StatusCode::OK);
}
