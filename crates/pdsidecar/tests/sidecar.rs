//! The sidecar between real simulated replicas on loopback: a prefill replica (`--role
//! prefill`), a decode replica (`--role decode`), the sidecar in front of the decoder. What
//! happened is asserted from the replicas' own `/metrics` and the sidecar's.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

/// The simulator's strict exposition-format parser, shared (it validates what it parses).
#[path = "../../sim/tests/common/promtext.rs"]
#[allow(dead_code)]
mod promtext;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use llmsched_pdsidecar::server::serve;
use llmsched_pdsidecar::{Allowlist, PdRouter, PdRouterConfig, SidecarMetrics, Upstream};
use llmsched_sim::pd::Role;
use llmsched_sim::{ClusterConfig, ReplicaConfig, SimCluster};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const LBL: [(&str, &str); 2] = [("model_name", "Qwen/Qwen3-32B"), ("engine", "0")];

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn replica(role: Role, scale: f64) -> ReplicaConfig {
    let mut c = ReplicaConfig::from_profile("qwen3-32b-tp2-h100")
        .unwrap()
        .with_time_scale(scale)
        .with_role(role);
    c.pd.side_channel_port = 0;
    c
}

async fn sim(cfg: ReplicaConfig) -> SimCluster {
    SimCluster::start(ClusterConfig::new(
        vec!["127.0.0.1:0".parse().unwrap()],
        cfg,
    ))
    .await
    .unwrap()
}

struct Sidecar {
    addr: SocketAddr,
    router: Arc<PdRouter>,
    stop: CancellationToken,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn router_cfg(decoder: SocketAddr) -> PdRouterConfig {
    let mut c = PdRouterConfig::new(&decoder.to_string()).unwrap();
    c.prefill_retry_backoff = Duration::from_millis(1);
    c
}

async fn sidecar(cfg: PdRouterConfig, tls: Option<tokio_rustls::TlsAcceptor>) -> Sidecar {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Arc::new(PdRouter::new(cfg, Arc::new(SidecarMetrics::new())).unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, router.clone(), tls, stop.clone()));
    Sidecar { addr, router, stop }
}

struct Reply {
    status: u16,
    body: Vec<u8>,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

fn req(
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

async fn send(
    c: &HttpClient,
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let resp = c
        .request(req(method, addr, path, body, headers))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Reply { status, body }
}

async fn scrape(c: &HttpClient, cluster: &SimCluster) -> promtext::Exposition {
    let r = send(c, "GET", cluster.addrs()[0], "/metrics", "", &[]).await;
    promtext::parse(&r.text()).unwrap()
}

/// A sample of the sidecar's own metrics (0 when the series does not exist yet).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((lhs, v)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = lhs.split_once('{').unwrap_or((lhs, ""));
        if n == name
            && labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        {
            return v.parse().unwrap();
        }
    }
    0.0
}

fn sidecar_metric(s: &Sidecar, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(&s.router.metrics().render(), name, labels)
}

/// `n` distinct words: `n` tokens for the simulator's word-per-token tokenizer.
fn words(start: u32, n: u32) -> String {
    (start..start + n)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn completion(prompt: &str, max_tokens: u32, stream: bool) -> String {
    let mut b = json!({"model": "Qwen/Qwen3-32B", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true, "stream": stream});
    if stream {
        b["stream_options"] = json!({"include_usage": true});
    }
    b.to_string()
}

fn frames(body: &[u8]) -> Vec<String> {
    std::str::from_utf8(body)
        .unwrap()
        .split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|f| f.strip_prefix("data: ").unwrap().to_string())
        .collect()
}

/// Polls until `f` holds (generous deadline; nothing timed).
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn hdr(addr: SocketAddr) -> String {
    addr.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_the_header_is_prefilled_remotely_and_decoded_locally() {
    let p = sim(replica(Role::Prefill, 20.0)).await;
    let d = sim(replica(Role::Decode, 20.0)).await;
    let s = sidecar(router_cfg(d.addrs()[0]), None).await;
    let c = client();
    let prompt = words(0, 200);
    let h = hdr(p.addrs()[0]);
    let r = send(
        &c,
        "POST",
        s.addr,
        "/v1/completions",
        &completion(&prompt, 30, false),
        &[("x-prefiller-host-port", &h)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["usage"]["prompt_tokens"], 200);
    assert_eq!(body["usage"]["completion_tokens"], 30);
    // The prefill replica's cache hit (none), not the decoder's 199 transferred tokens.
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        body["choices"][0]["text"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count(),
        30
    );

    // The prefill replica computed the prompt and produced one token; its blocks were read
    // (the decoder's completion notification is asynchronous, as NIXL's).
    eventually(
        "the decoder's notification to free the held blocks",
        || async {
            scrape(&c, &p)
                .await
                .value("llmsched_sim_kv_transfer_served_total", &LBL)
                == 1.0
        },
    )
    .await;
    let pm = scrape(&c, &p).await;
    let psrc = |m: &promtext::Exposition, s: &str| {
        m.value("vllm:prompt_tokens_by_source_total", &[("source", s)])
    };
    assert_eq!(psrc(&pm, "local_compute"), 200.0);
    assert_eq!(pm.value("vllm:generation_tokens_total", &LBL), 1.0);
    assert_eq!(pm.value("llmsched_sim_kv_transfer_served_total", &LBL), 1.0);
    assert_eq!(pm.value("llmsched_sim_kv_transfer_held_blocks", &LBL), 0.0);
    // The decoder read the blocks and computed only the last prompt token.
    let dm = scrape(&c, &d).await;
    assert_eq!(dm.histogram("vllm:nixl_xfer_time_seconds").0, 1.0);
    assert_eq!(psrc(&dm, "local_compute"), 1.0);
    assert_eq!(psrc(&dm, "external_kv_transfer"), 199.0);
    assert_eq!(dm.value("vllm:generation_tokens_total", &LBL), 30.0);
    assert_eq!(
        sidecar_metric(&s, "llmsched_pd_sidecar_requests_total", &[("route", "pd")]),
        1.0
    );
    assert_eq!(
        sidecar_metric(
            &s,
            "llmsched_pd_sidecar_prefill_duration_seconds_count",
            &[]
        ),
        1.0
    );
    assert_eq!(
        sidecar_metric(&s, "llmsched_pd_sidecar_inflight_requests", &[]),
        0.0
    );

    // Again: the prefill replica now holds the prefix, and usage says so.
    let r = send(
        &c,
        "POST",
        s.addr,
        "/v1/completions",
        &completion(&prompt, 5, false),
        &[("x-prefiller-host-port", &h)],
    )
    .await;
    assert_eq!(
        r.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        192
    );

    // Chat goes the same way.
    let chat = json!({"messages": [{"role": "user", "content": words(900, 100)}], "max_completion_tokens": 7, "ignore_eos": true}).to_string();
    let r = send(
        &c,
        "POST",
        s.addr,
        "/v1/chat/completions",
        &chat,
        &[("x-prefiller-host-port", &h)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 7);
    assert_eq!(
        scrape(&c, &d)
            .await
            .histogram("vllm:nixl_xfer_time_seconds")
            .0,
        3.0
    );
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_stay_streams_with_usage_intact() {
    let p = sim(replica(Role::Prefill, 10.0)).await;
    let d = sim(replica(Role::Decode, 10.0)).await;
    let s = sidecar(router_cfg(d.addrs()[0]), None).await;
    let c = client();
    let h = hdr(p.addrs()[0]);
    let prompt = words(0, 300);
    let resp = c
        .request(req(
            "POST",
            s.addr,
            "/v1/completions",
            &completion(&prompt, 80, true),
            &[("x-prefiller-host-port", &h)],
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = resp.into_body();
    // The first token arrives while the decoder is still generating: chunk by chunk.
    let first = loop {
        let f = body.frame().await.unwrap().unwrap();
        if let Ok(d) = f.into_data()
            && !d.is_empty()
        {
            break d;
        }
    };
    assert!(first.starts_with(b"data: {"), "{first:?}");
    let running = scrape(&c, &d)
        .await
        .value("vllm:num_requests_running", &LBL);
    assert_eq!(running, 1.0, "the stream must flow before the request ends");
    let mut all = first.to_vec();
    all.extend_from_slice(&body.collect().await.unwrap().to_bytes());
    let f = frames(&all);
    assert_eq!(f.last().unwrap(), "[DONE]");
    let tokens = f.iter().filter(|x| x.contains("\"text\"")).count();
    assert_eq!(tokens, 80);
    let usage: Value = serde_json::from_str(&f[f.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["prompt_tokens"], 300);
    assert_eq!(usage["usage"]["completion_tokens"], 80);
    assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    // Field order of vLLM's frames survives the rewrite.
    assert!(
        f[f.len() - 2].starts_with("{\"id\":\"cmpl-"),
        "{}",
        f[f.len() - 2]
    );
    let dm = scrape(&c, &d).await;
    assert_eq!(
        dm.value(
            "vllm:prompt_tokens_by_source_total",
            &[("source", "external_kv_transfer")]
        ),
        299.0
    );
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_header_everything_passes_through_untouched() {
    let d = sim(replica(Role::Decode, 20.0)).await;
    let s = sidecar(router_cfg(d.addrs()[0]), None).await;
    let c = client();
    let body = completion(&words(0, 50), 12, true);
    let direct = send(
        &c,
        "POST",
        d.addrs()[0],
        "/v1/completions",
        &body,
        &[("x-request-id", "a")],
    )
    .await;
    let via = send(
        &c,
        "POST",
        s.addr,
        "/v1/completions",
        &body,
        &[("x-request-id", "a")],
    )
    .await;
    assert_eq!(via.status, 200);
    let strip = |f: Vec<String>| -> Vec<Value> {
        f.into_iter()
            .map(|x| {
                let mut v: Value = serde_json::from_str(&x).unwrap_or(Value::String(x));
                if let Some(o) = v.as_object_mut() {
                    o.remove("created");
                }
                v
            })
            .collect()
    };
    // Same frames (the second request hits the prefix cache, so usage differs only there).
    let (mut a, mut b) = (strip(frames(&direct.body)), strip(frames(&via.body)));
    assert_eq!(a.len(), b.len());
    let n = a.len();
    a[n - 2]["usage"]["prompt_tokens_details"] = Value::Null;
    b[n - 2]["usage"]["prompt_tokens_details"] = Value::Null;
    assert_eq!(a, b);
    // Blank header entries mean no disaggregation, as in the reference.
    let r = send(
        &c,
        "POST",
        s.addr,
        "/v1/completions",
        &completion("a b c", 2, false),
        &[("x-prefiller-host-port", " , ")],
    )
    .await;
    assert_eq!(r.status, 200);
    // Other paths go to the decoder; /health is the sidecar's own.
    let m = send(&c, "GET", s.addr, "/metrics", "", &[]).await;
    assert!(m.text().contains("vllm:num_requests_running"));
    let models = send(&c, "GET", s.addr, "/v1/models", "", &[]).await;
    assert_eq!(models.json()["data"][0]["id"], "Qwen/Qwen3-32B");
    assert_eq!(
        send(&c, "GET", s.addr, "/health", "", &[]).await.status,
        200
    );
    // Malformed JSON without the header: the decoder's own error.
    let bad = send(&c, "POST", s.addr, "/v1/completions", "{nope", &[]).await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("JSON decode error")
    );
    let own = send(&c, "GET", s.addr, "/pd-sidecar/metrics", "", &[]).await;
    assert_eq!(
        sample(
            &own.text(),
            "llmsched_pd_sidecar_requests_total",
            &[("route", "passthrough")]
        ),
        5.0
    );
    assert_eq!(
        scrape(&c, &d)
            .await
            .histogram("vllm:nixl_xfer_time_seconds")
            .0,
        0.0
    );
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_prefiller_falls_back_to_a_local_prefill() {
    let d = sim(replica(Role::Decode, 20.0)).await;
    let s = sidecar(router_cfg(d.addrs()[0]), None).await;
    let c = client();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let r = send(
        &c,
        "POST",
        s.addr,
        "/v1/completions",
        &completion(&words(0, 100), 4, true),
        &[("x-prefiller-host-port", &hdr(dead))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let f = frames(&r.body);
    assert_eq!(f.last().unwrap(), "[DONE]");
    assert_eq!(f.iter().filter(|x| x.contains("\"text\"")).count(), 4);
    let dm = scrape(&c, &d).await;
    assert_eq!(
        dm.value(
            "vllm:prompt_tokens_by_source_total",
            &[("source", "local_compute")]
        ),
        100.0
    );
    assert_eq!(
        sidecar_metric(
            &s,
            "llmsched_pd_sidecar_prefill_fallbacks_total",
            &[("reason", "connect")]
        ),
        1.0
    );
    assert_eq!(
        sidecar_metric(&s, "llmsched_pd_sidecar_prefill_retries_total", &[]),
        2.0
    );
    d.shutdown().await;
}

/// A real HTTP server in front of the prefill replica that answers 503 to the first `fail`
/// requests and forwards the rest (a transient overload).
async fn flaky(upstream: SocketAddr, fail: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        let c = client();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (c, count) = (c.clone(), count.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r: http::Request<Incoming>| {
                    let (c, count) = (c.clone(), count.clone());
                    async move {
                        let n = count.fetch_add(1, Ordering::SeqCst);
                        let (parts, body) = r.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        if n < fail {
                            let mut resp = http::Response::new(Full::new(Bytes::from_static(
                                b"{\"error\":\"overloaded\"}",
                            )));
                            *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                            return Ok::<_, Infallible>(resp);
                        }
                        let mut fwd = http::Request::new(Full::new(body));
                        *fwd.method_mut() = parts.method;
                        *fwd.uri_mut() = format!("http://{upstream}{}", parts.uri.path())
                            .parse()
                            .unwrap();
                        *fwd.headers_mut() = parts.headers;
                        let resp = c.request(fwd).await.unwrap();
                        let (parts, body) = resp.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        Ok(http::Response::from_parts(parts, Full::new(body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_503_from_the_prefiller_is_retried() {
    let p = sim(replica(Role::Prefill, 20.0)).await;
    let d = sim(replica(Role::Decode, 20.0)).await;
    let s = sidecar(router_cfg(d.addrs()[0]), None).await;
    let c = client();
    let (front, seen) = flaky(p.addrs()[0], 1).await;
    let r = send(
        &c,
        "POST",
        s.addr,
        "/v1/completions",
        &completion(&words(0, 100), 3, false),
        &[("x-prefiller-host-port", &hdr(front))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    assert_eq!(
        sidecar_metric(&s, "llmsched_pd_sidecar_prefill_retries_total", &[]),
        1.0
    );
    assert_eq!(
        sidecar_metric(
            &s,
            "llmsched_pd_sidecar_prefill_fallbacks_total",
            &[("reason", "server_error")]
        ),
        0.0
    );
    let dm = scrape(&c, &d).await;
    assert_eq!(dm.histogram("vllm:nixl_xfer_time_seconds").0, 1.0);
    assert_eq!(
        dm.value(
            "vllm:prompt_tokens_by_source_total",
            &[("source", "local_compute")]
        ),
        1.0
    );

    // A prefiller that keeps failing: retries exhausted, local prefill.
    let (front, seen) = flaky(p.addrs()[0], usize::MAX).await;
    let r = send(
        &c,
        "POST",
        s.addr,
        "/v1/completions",
        &completion(&words(500, 100), 3, false),
        &[("x-prefiller-host-port", &hdr(front))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen.load(Ordering::SeqCst), 3);
    assert_eq!(
        sidecar_metric(
            &s,
            "llmsched_pd_sidecar_prefill_fallbacks_total",
            &[("reason", "server_error")]
        ),
        1.0
    );
    assert_eq!(
        sidecar_metric(&s, "llmsched_pd_sidecar_prefill_retries_total", &[]),
        3.0
    );
    let dm = scrape(&c, &d).await;
    assert_eq!(
        dm.value(
            "vllm:prompt_tokens_by_source_total",
            &[("source", "local_compute")]
        ),
        101.0
    );
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_4xx_is_relayed_and_bad_input_gets_clear_errors() {
    let p = sim(replica(Role::Prefill, 20.0)).await;
    let d = sim(replica(Role::Decode, 20.0)).await;
    let mut cfg = router_cfg(d.addrs()[0]);
    cfg.max_body_bytes = 10_000;
    let s = sidecar(cfg, None).await;
    let c = client();
    let h = hdr(p.addrs()[0]);
    let with = [("x-prefiller-host-port", h.as_str())];

    // Unknown model: the prefiller's 404, as it is; the decoder never sees it.
    let body = json!({"model": "nope", "prompt": "a b", "max_tokens": 3}).to_string();
    let r = send(&c, "POST", s.addr, "/v1/completions", &body, &with).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("nope"));
    assert_eq!(
        sidecar_metric(&s, "llmsched_pd_sidecar_prefill_client_errors_total", &[]),
        1.0
    );

    for (headers, body, status, needle, reason) in [
        (
            vec![("x-prefiller-host-port", "127.0.0.1")],
            completion("a", 2, false),
            400,
            "missing port",
            "bad_header",
        ),
        (
            vec![("x-prefiller-host-port", "127.0.0.1:99999")],
            completion("a", 2, false),
            400,
            "1-65535",
            "bad_header",
        ),
        (
            vec![("x-prefiller-host-port", "fd00::1:80")],
            completion("a", 2, false),
            400,
            "brackets",
            "bad_header",
        ),
        (
            with.to_vec(),
            "{nope".to_string(),
            400,
            "JSON decode error",
            "bad_json",
        ),
        (
            with.to_vec(),
            "[1, 2]".to_string(),
            400,
            "JSON object",
            "bad_json",
        ),
        (
            with.to_vec(),
            completion(&"x ".repeat(6000), 2, false),
            413,
            "exceeds 10000 bytes",
            "body_too_large",
        ),
    ] {
        let r = send(&c, "POST", s.addr, "/v1/completions", &body, &headers).await;
        assert_eq!(r.status, status, "{headers:?}: {}", r.text());
        let e = r.json();
        assert_eq!(e["object"], "error");
        assert_eq!(e["code"], status);
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{}",
            r.text()
        );
        assert!(
            sidecar_metric(
                &s,
                "llmsched_pd_sidecar_rejected_total",
                &[("reason", reason)]
            ) >= 1.0
        );
    }
    let dm = scrape(&c, &d).await;
    assert_eq!(dm.value("vllm:prompt_tokens_total", &LBL), 0.0);
    assert_eq!(
        dm.value(
            "vllm:request_success_total",
            &[("finished_reason", "length")]
        ),
        0.0
    );

    // SSRF protection: a prefiller outside the allowlist is refused without being called.
    let mut cfg = router_cfg(d.addrs()[0]);
    cfg.ssrf_allowlist = Some(Allowlist::parse(["10.0.0.0/8"]).unwrap());
    let guarded = sidecar(cfg, None).await;
    let r = send(
        &c,
        "POST",
        guarded.addr,
        "/v1/completions",
        &completion("a b", 2, false),
        &with,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("SSRF"), "{}", r.text());
    assert_eq!(
        sidecar_metric(
            &guarded,
            "llmsched_pd_sidecar_rejected_total",
            &[("reason", "ssrf")]
        ),
        1.0
    );
    let pm = scrape(&c, &p).await;
    assert_eq!(pm.value("vllm:prompt_tokens_total", &LBL), 0.0);
    let mut cfg = router_cfg(d.addrs()[0]);
    cfg.ssrf_allowlist = Some(Allowlist::parse(["127.0.0.1"]).unwrap());
    let allowed = sidecar(cfg, None).await;
    let r = send(
        &c,
        "POST",
        allowed.addr,
        "/v1/completions",
        &completion("a b", 2, false),
        &with,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_cancels_the_decode() {
    let p = sim(replica(Role::Prefill, 10.0)).await;
    let d = sim(replica(Role::Decode, 10.0)).await;
    let s = sidecar(router_cfg(d.addrs()[0]), None).await;
    let c = client();
    let h = hdr(p.addrs()[0]);
    let resp = c
        .request(req(
            "POST",
            s.addr,
            "/v1/completions",
            &completion(&words(0, 100), 5000, true),
            &[("x-prefiller-host-port", &h)],
        ))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let f = body.frame().await.unwrap().unwrap();
    assert!(f.is_data());
    assert_eq!(
        scrape(&c, &d)
            .await
            .value("vllm:num_requests_running", &LBL),
        1.0
    );
    drop(body);
    eventually("the decoder to abort the request", || async {
        let m = scrape(&c, &d).await;
        m.value("vllm:num_requests_running", &LBL) == 0.0
            && m.value(
                "vllm:request_success_total",
                &[("finished_reason", "abort")],
            ) == 1.0
    })
    .await;
    eventually("the sidecar to drop the request", || async {
        sidecar_metric(&s, "llmsched_pd_sidecar_inflight_requests", &[]) == 0.0
    })
    .await;
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_during_the_prefill_hop_cancels_the_prefill() {
    // One sequence at a time on the prefiller, taken by a long request: ours waits there.
    let p = sim(replica(Role::Prefill, 10.0).with_max_num_seqs(1)).await;
    let d = sim(replica(Role::Decode, 10.0)).await;
    let s = sidecar(router_cfg(d.addrs()[0]), None).await;
    let c = client();
    let blocker = c
        .request(req(
            "POST",
            p.addrs()[0],
            "/v1/completions",
            &completion("x y z", 10_000, true),
            &[],
        ))
        .await
        .unwrap();
    let h = hdr(p.addrs()[0]);
    let (c2, addr) = (c.clone(), s.addr);
    let pd = tokio::spawn(async move {
        send(
            &c2,
            "POST",
            addr,
            "/v1/completions",
            &completion(&words(0, 100), 10, false),
            &[("x-prefiller-host-port", &h)],
        )
        .await
    });
    eventually("the prefill request to queue on the prefiller", || async {
        scrape(&c, &p)
            .await
            .value("vllm:num_requests_waiting", &LBL)
            == 1.0
    })
    .await;
    pd.abort();
    eventually("the sidecar to drop the request", || async {
        sidecar_metric(&s, "llmsched_pd_sidecar_inflight_requests", &[]) == 0.0
    })
    .await;
    drop(blocker);
    eventually("the prefiller to abort both requests", || async {
        let m = scrape(&c, &p).await;
        m.value(
            "vllm:request_success_total",
            &[("finished_reason", "abort")],
        ) == 2.0
            && m.value("vllm:num_requests_waiting", &LBL) == 0.0
    })
    .await;
    let pm = scrape(&c, &p).await;
    assert_eq!(
        pm.value("llmsched_sim_kv_transfer_held_requests", &LBL),
        0.0
    );
    let dm = scrape(&c, &d).await;
    assert_eq!(
        dm.value("vllm:prompt_tokens_total", &LBL),
        0.0,
        "the decode hop never started"
    );
    assert_eq!(dm.value("vllm:num_requests_waiting", &LBL), 0.0);
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_runs_in_process_with_a_decoder_per_call() {
    let p = sim(replica(Role::Prefill, 20.0)).await;
    let d1 = sim(replica(Role::Decode, 20.0)).await;
    let d2 = sim(replica(Role::Decode, 20.0)).await;
    // Configured for d1, asked for d2: what the built-in proxy does after picking d2.
    let router = PdRouter::new(router_cfg(d1.addrs()[0]), Arc::new(SidecarMetrics::new())).unwrap();
    let request = http::Request::post("/v1/completions")
        .header("x-prefiller-host-port", p.addrs()[0].to_string())
        .body(Full::new(Bytes::from(completion(&words(0, 64), 3, false))))
        .unwrap();
    let resp = router
        .handle_with_decoder(
            request,
            &Upstream::parse(&d2.addrs()[0].to_string()).unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 3);
    let c = client();
    assert_eq!(
        scrape(&c, &d2)
            .await
            .histogram("vllm:nixl_xfer_time_seconds")
            .0,
        1.0
    );
    assert_eq!(
        scrape(&c, &d1)
            .await
            .value("vllm:prompt_tokens_total", &LBL),
        0.0
    );
    p.shutdown().await;
    d1.shutdown().await;
    d2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_the_listener_and_to_the_prefiller() {
    let p = sim(replica(Role::Prefill, 20.0)).await;
    let d = sim(replica(Role::Decode, 20.0)).await;
    // A TLS sidecar (self-signed) in front of the prefill replica stands for a TLS prefiller.
    let tls_front = sidecar(
        router_cfg(p.addrs()[0]),
        Some(llmsched_pdsidecar::tls::self_signed().unwrap()),
    )
    .await;
    let mut cfg = router_cfg(d.addrs()[0]);
    cfg.prefill_tls = true;
    cfg.prefill_insecure_skip_verify = true;
    let s = sidecar(cfg, None).await;
    let c = client();
    let h = hdr(tls_front.addr);
    let r = send(
        &c,
        "POST",
        s.addr,
        "/v1/completions",
        &completion(&words(0, 64), 3, false),
        &[("x-prefiller-host-port", &h)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        scrape(&c, &d)
            .await
            .histogram("vllm:nixl_xfer_time_seconds")
            .0,
        1.0
    );
    assert_eq!(
        sidecar_metric(
            &tls_front,
            "llmsched_pd_sidecar_requests_total",
            &[("route", "passthrough")]
        ),
        1.0
    );
    // Verifying the self-signed certificate fails: the hop falls back to a local prefill.
    let mut cfg = router_cfg(d.addrs()[0]);
    cfg.prefill_tls = true;
    cfg.prefill_max_retries = 0;
    let strict = sidecar(cfg, None).await;
    let r = send(
        &c,
        "POST",
        strict.addr,
        "/v1/completions",
        &completion(&words(100, 64), 3, false),
        &[("x-prefiller-host-port", &h)],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        sidecar_metric(
            &strict,
            "llmsched_pd_sidecar_prefill_fallbacks_total",
            &[("reason", "connect")]
        ),
        1.0
    );
    p.shutdown().await;
    d.shutdown().await;
}
