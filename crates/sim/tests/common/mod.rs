//! HTTP helpers shared by the integration tests: a real hyper client over loopback.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llmsched_sim::{ClusterConfig, ReplicaConfig, SimCluster};

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

pub async fn request(
    c: &HttpClient,
    method: &str,
    addr: SocketAddr,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut b = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp = c.request(req).await.expect("request failed");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

pub async fn post(c: &HttpClient, addr: SocketAddr, path: &str, body: &str) -> Reply {
    request(c, "POST", addr, path, body, &[]).await
}

pub async fn get(c: &HttpClient, addr: SocketAddr, path: &str) -> Reply {
    request(c, "GET", addr, path, "", &[]).await
}

/// SSE frames of a streamed body (the JSON after `data: `, `[DONE]` included).
pub fn frames(body: &[u8]) -> Vec<String> {
    let s = std::str::from_utf8(body).unwrap();
    assert!(
        s.ends_with("\n\n"),
        "stream must end with a blank line: {s:?}"
    );
    s.split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|f| {
            f.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("frame without `data: `: {f:?}"))
                .to_string()
        })
        .collect()
}

/// `n` words of the simulator vocabulary, starting at word id `start`.
pub fn words(start: u32, n: u32) -> String {
    let t = llmsched_tokenizer::SimTokenizer::default();
    let mut s = String::new();
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        t.write_word(start + i, &mut s);
    }
    s
}

/// A replica configuration fast enough for tests (time scale 50 unless given).
pub fn fast(scale: f64) -> ReplicaConfig {
    ReplicaConfig::from_profile("qwen3-32b-tp2-h100")
        .unwrap()
        .with_time_scale(scale)
}

pub async fn start(cfg: ReplicaConfig) -> SimCluster {
    SimCluster::start(ClusterConfig::new(
        vec!["127.0.0.1:0".parse().unwrap()],
        cfg,
    ))
    .await
    .expect("cluster starts")
}

/// Scrapes `/metrics` and validates it against the text exposition format (see `promtext`).
pub async fn scrape(c: &HttpClient, addr: SocketAddr) -> promtext::Exposition {
    let r = get(c, addr, "/metrics").await;
    assert_eq!(r.status, 200);
    let ct = r.headers.get("content-type").unwrap().to_str().unwrap();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    promtext::parse(&r.text()).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{}", r.text()))
}

pub mod promtext;
