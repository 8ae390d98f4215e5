//! A whole standalone deployment on loopback for end-to-end tests: simulated vLLM replicas
//! on distinct loopback IPs, the EPP (in-process, `llmsched_epp::start`) with its built-in
//! proxy, and a real Envoy process in front of the EPP. Plus an HTTP client that sends
//! bodies in many chunks and helpers to compare responses.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llmsched_core::endpoint::EndpointSource;
use llmsched_epp::EppHandle;
use llmsched_gateway::{BootstrapConfig, Envoy, EnvoyOptions, EppTarget, Mode, find_envoy};
use llmsched_sim::{ClusterConfig, ReplicaConfig, SimCluster};

/// The simulated model.
pub const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

/// Polling deadline (generous: the suite shares two cores with other builds).
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Envoy binary (installed once per test binary when `LLMSCHED_ENVOY_BIN` is unset).
pub fn envoy_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match find_envoy(&repo_root()) {
        Ok(p) => p,
        Err(e) => panic!("cannot find or install Envoy: {e}"),
    })
    .clone()
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A fast replica: Llama-3.1-8B timings a hundred times faster than real time.
pub fn fast_replica() -> ReplicaConfig {
    ReplicaConfig::from_profile("llama3.1-8b-h100")
        .unwrap()
        .with_time_scale(100.0)
}

/// `n` replicas on 127.0.0.2, 127.0.0.3, … (free ports).
pub async fn start_sim(n: usize, cfg: ReplicaConfig) -> SimCluster {
    let addrs: Vec<SocketAddr> = (0..n)
        .map(|i| SocketAddr::from(([127, 0, 0, 2 + i as u8], 0)))
        .collect();
    SimCluster::start(ClusterConfig::new(addrs, cfg))
        .await
        .expect("simulator starts")
}

/// The EPP on loopback with free ports, the proxy on, plaintext unless `extra` says
/// otherwise.
pub async fn start_epp(endpoints: &str, extra: &[&str]) -> EppHandle {
    let mut argv: Vec<String> = [
        "epp",
        "--bind-address=127.0.0.1",
        "--grpc-port=0",
        "--grpc-health-port=0",
        "--metrics-port=0",
        "--proxy-port=0",
        "--refresh-metrics-interval=50ms",
        // Streams a test leaves open are cut soon on shutdown (tests of the drain override).
        "--drain-timeout=2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !endpoints.is_empty() {
        argv.push(format!("--endpoints={endpoints}"));
    }
    if !extra.iter().any(|a| a.starts_with("--secure-serving")) {
        argv.push("--secure-serving=false".into());
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    let args = llmsched_epp::Args::try_parse_from(&argv).expect("EPP flags parse");
    llmsched_epp::start(args).await.expect("EPP starts")
}

/// Envoy in front of `epp` (mode `epp`), with the test conveniences on: the subset-hint
/// header and the upstream-host response header; health checked every 0.5 s.
pub async fn start_envoy_for(epp: &EppHandle) -> Envoy {
    let config = BootstrapConfig {
        mode: Mode::Epp,
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        epp: EppTarget {
            host: "127.0.0.1".into(),
            grpc_port: epp.grpc_addr.port(),
            health_port: epp.health_addr.port(),
            tls: epp.tls_certificate_pem.is_some(),
        },
        subset_hint_header: true,
        upstream_host_header: true,
        health_check_interval: Duration::from_millis(500),
        ..BootstrapConfig::default()
    };
    start_envoy(&config).await
}

/// Envoy on `config` (one worker).
pub async fn start_envoy(config: &BootstrapConfig) -> Envoy {
    match Envoy::start(config, &EnvoyOptions::new(envoy_binary())).await {
        Ok(e) => e,
        Err(e) => panic!("Envoy does not start: {e}"),
    }
}

/// Sim + EPP (+ proxy) + Envoy.
pub struct Stack {
    pub sim: SimCluster,
    pub epp: EppHandle,
    pub envoy: Envoy,
}

impl Stack {
    pub async fn start(replicas: usize, cfg: ReplicaConfig, epp_extra: &[&str]) -> Stack {
        init_logs();
        let sim = start_sim(replicas, cfg).await;
        let endpoints = sim
            .addrs()
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let epp = start_epp(&endpoints, epp_extra).await;
        wait_until("the EPP to be ready", || epp.health().is_ready()).await;
        let envoy = start_envoy_for(&epp).await;
        Stack { sim, epp, envoy }
    }

    /// The two front doors: Envoy + EPP, and the built-in proxy.
    pub fn doors(&self) -> [(&'static str, SocketAddr); 2] {
        [
            ("envoy", self.envoy.listener_addr()),
            ("proxy", self.epp.proxy_addr.unwrap()),
        ]
    }

    /// `dispatched_total` of every endpoint the EPP knows, by `ip:port`.
    pub fn dispatched(&self) -> BTreeMap<String, u64> {
        dispatched(&self.epp)
    }

    /// Requests finished by each replica, by `ip:port`.
    pub fn finished(&self) -> BTreeMap<String, u64> {
        finished(&self.sim)
    }

    pub async fn shutdown(self) {
        let Stack { sim, epp, envoy } = self;
        drop(envoy);
        epp.shutdown().await;
        sim.shutdown().await;
    }
}

pub fn dispatched(epp: &EppHandle) -> BTreeMap<String, u64> {
    epp.store()
        .snapshot()
        .endpoints
        .iter()
        .map(|e| (e.hostport().to_string(), e.dispatched_total()))
        .collect()
}

pub fn inflight(epp: &EppHandle) -> u64 {
    epp.store()
        .snapshot()
        .endpoints
        .iter()
        .map(|e| e.inflight_requests())
        .sum()
}

pub fn finished(sim: &SimCluster) -> BTreeMap<String, u64> {
    sim.replicas()
        .iter()
        .map(|r| (r.addr().to_string(), r.stats().finished))
        .collect()
}

pub fn running(sim: &SimCluster) -> usize {
    sim.replicas()
        .iter()
        .map(|r| r.stats().running + r.stats().waiting)
        .sum()
}

/// The keys whose value grew, with the growth.
pub fn grown(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let b = before.get(k).copied().unwrap_or(0);
            (*v > b).then(|| (k.clone(), v - b))
        })
        .collect()
}

/// Polls `cond` until it holds (panics after [`DEADLINE`]).
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > DEADLINE {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub type Body = BoxBody<Bytes, Infallible>;

/// HTTP/1.1 client (`h2c = false`) or HTTP/2 prior-knowledge client.
pub fn client(h2c: bool) -> Client<HttpConnector, Body> {
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_max_idle_per_host(0);
    if h2c {
        b.http2_only(true);
    }
    b.build_http()
}

/// A body in one piece.
pub fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

/// A body streamed in `chunk`-byte frames (chunked transfer encoding: no content-length).
pub fn chunked(body: Bytes, chunk: usize) -> Body {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = (0..body.len().div_ceil(chunk))
        .map(|i| {
            let end = ((i + 1) * chunk).min(body.len());
            Ok(Frame::data(body.slice(i * chunk..end)))
        })
        .collect();
    StreamBody::new(futures::stream::iter(frames)).boxed()
}

/// A response, whole.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Sends a request and reads the whole response.
pub async fn send(
    c: &Client<HttpConnector, Body>,
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> Reply {
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = c
        .request(b.body(body).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{method} {path} to {addr}: {e:?}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

/// `POST path` with a JSON body in one piece.
pub async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    send(
        &client(false),
        "POST",
        addr,
        path,
        &h,
        full(body.to_string()),
    )
    .await
}

/// `n` distinct words, deterministic.
pub fn words(seed: u64, n: usize) -> String {
    let mut s = String::with_capacity(n * 8);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("w{:x}", x % 1_000_000));
    }
    s
}

/// A prompt of at least `bytes` bytes made of long words (few tokens per byte).
pub fn big_prompt(seed: u64, bytes: usize) -> String {
    let mut s = String::with_capacity(bytes + 64);
    let mut i = seed;
    while s.len() < bytes {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(&format!("{i:016x}"));
        s.push_str(&"abcdefghij".repeat(4));
        i += 1;
    }
    s
}

/// A completions body.
pub fn completion(prompt: &str, max_tokens: u32, stream: bool) -> String {
    with_stream(
        serde_json::json!({
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "ignore_eos": true,
        }),
        stream,
    )
}

/// Adds `stream` (and usage in the stream) to a body.
fn with_stream(mut v: serde_json::Value, stream: bool) -> String {
    v["stream"] = stream.into();
    if stream {
        v["stream_options"] = serde_json::json!({"include_usage": true});
    }
    v.to_string()
}

/// A chat body.
pub fn chat(content: &str, max_tokens: u32, stream: bool) -> String {
    with_stream(
        serde_json::json!({
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": content},
            ],
            "max_tokens": max_tokens,
            "ignore_eos": true,
        }),
        stream,
    )
}

/// `body` with what legitimately differs between two identical requests zeroed: the
/// `created` timestamps and `cached_tokens` (the second request hits the prefix cache).
pub fn normalize(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let mut out = String::with_capacity(s.len());
    let mut rest: &str = &s;
    loop {
        let next = ["\"created\":", "\"cached_tokens\":"]
            .iter()
            .filter_map(|k| rest.find(k).map(|i| (i, *k)))
            .min();
        let Some((i, key)) = next else {
            out.push_str(rest);
            return out;
        };
        out.push_str(&rest[..i + key.len()]);
        rest = &rest[i + key.len()..];
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        out.push('0');
        rest = &rest[digits..];
    }
}

/// Shared wrapper for tests that need an `Arc`.
pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}
