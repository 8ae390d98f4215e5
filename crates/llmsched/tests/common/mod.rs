//! Real processes for the hardening tests: `llmsched sim` replicas (one per process, so one
//! can be `kill -9`ed), `llmsched epp` (so it can be sent SIGTERM), a real Envoy in front of
//! an EPP, and an HTTP client. Nothing here waits a fixed time: every wait polls a
//! condition with a generous deadline.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llmsched_core::EndpointSource;
use llmsched_gateway::{BootstrapConfig, Envoy, EnvoyOptions, EppTarget, Mode, find_envoy};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Deadline of every wait (generous: two cores shared with builds).
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The simulated model.
pub const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `cond` until it holds.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A port free on `ip` now (bound and released; loopback IPs are private to the test).
pub fn free_port(ip: IpAddr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One simulated vLLM replica in its own `llmsched sim` process.
pub struct SimProc {
    pub addr: SocketAddr,
    time_scale: f64,
    child: Option<Child>,
}

impl SimProc {
    /// A replica on `ip` (a free port) with the Llama-3.1-8B profile at `time_scale`.
    pub async fn start(ip: &str, time_scale: f64) -> Self {
        let ip: IpAddr = ip.parse().unwrap();
        let addr = SocketAddr::new(ip, free_port(ip));
        let mut s = Self {
            addr,
            time_scale,
            child: None,
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_llmsched"))
            .args(["sim", "--replicas", "1", "--profile", "llama3.1-8b-h100"])
            .args(["--address", &self.addr.ip().to_string()])
            .args(["--base-port", &self.addr.port().to_string()])
            .args(["--time-scale", &self.time_scale.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        while get(self.addr, "/health").await.map(|(s, _)| s) != Some(200) {
            assert!(
                start.elapsed() < DEADLINE,
                "replica {} never came up",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `kill -9`, and wait for the process to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.start_kill().unwrap();
            c.wait().await.unwrap();
        }
    }

    /// Starts it again on the same address.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }
}

/// `GET path` on a new connection: `(status, body)`, `None` when it fails.
pub async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// An HTTP/1.1 client with no connection reuse (each request is a new connection).
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    let mut b = Client::builder(TokioExecutor::new());
    b.pool_max_idle_per_host(0);
    b.build_http()
}

/// A completions body: `max_tokens` tokens of output (always, `ignore_eos`).
pub fn completion(prompt: &str, max_tokens: u32, stream: bool) -> String {
    serde_json::json!({
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": stream,
    })
    .to_string()
}

/// A prompt nobody sent before (no prefix-cache affinity between two of them).
pub fn unique_prompt(tag: &str) -> String {
    format!("{tag} {}", "question about something new ".repeat(8))
}

/// `POST /v1/completions` to `addr` with `headers`; the response with its body unread.
pub async fn post(
    addr: SocketAddr,
    body: String,
    headers: &[(&str, &str)],
) -> Result<http::Response<Incoming>, String> {
    let mut b = http::Request::post(format!("http://{addr}/v1/completions"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    client()
        .request(b.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .map_err(|e| format!("{e:?}"))
}

/// A whole response: status and body (`Err` when the connection or the body failed).
pub async fn post_whole(
    addr: SocketAddr,
    body: String,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let resp = post(addr, body, headers).await?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e:?}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// A streaming request in progress: the first SSE data arrived.
pub struct Stream {
    pub body: Incoming,
}

impl Stream {
    /// Starts a long stream through `door`, pinned to `endpoint` with the subset-hint
    /// header, and waits for its first token.
    pub async fn open(door: SocketAddr, endpoint: SocketAddr, tokens: u32, tag: &str) -> Self {
        let pin = endpoint.to_string();
        let resp = post(
            door,
            completion(&unique_prompt(tag), tokens, true),
            &[("x-gateway-destination-endpoint-subset", &pin)],
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), 200, "stream {tag}");
        let mut body = resp.into_body();
        loop {
            let f = body.frame().await.expect("a first frame").unwrap();
            if f.into_data().is_ok_and(|d| !d.is_empty()) {
                break;
            }
        }
        Self { body }
    }

    /// Reads to the end: true when the stream completed (`data: [DONE]`), false when it was
    /// cut (error or end without `[DONE]`).
    pub async fn finish(mut self) -> bool {
        let mut tail = Vec::new();
        loop {
            match self.body.frame().await {
                None => break,
                Some(Err(_)) => return false,
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        tail.extend_from_slice(&d);
                        if tail.len() > 64 {
                            tail.drain(..tail.len() - 64);
                        }
                    }
                }
            }
        }
        tail.ends_with(b"data: [DONE]\n\n")
    }
}

/// `dispatched_total` of every endpoint of an in-process EPP, by `ip:port`.
pub fn dispatched(epp: &llmsched_epp::EppHandle) -> BTreeMap<String, u64> {
    epp.store()
        .snapshot()
        .endpoints
        .iter()
        .map(|e| (e.hostport().to_string(), e.dispatched_total()))
        .collect()
}

/// In-flight requests of an endpoint of an in-process EPP.
pub fn inflight(epp: &llmsched_epp::EppHandle, endpoint: SocketAddr) -> u64 {
    epp.store()
        .snapshot()
        .by_hostport(&endpoint.to_string())
        .map_or(0, |e| e.inflight_requests())
}

/// True when the in-process EPP considers `endpoint` routable.
pub fn healthy(epp: &llmsched_epp::EppHandle, endpoint: SocketAddr) -> bool {
    let policy = epp.director().health_policy();
    epp.store()
        .snapshot()
        .by_hostport(&endpoint.to_string())
        .is_some_and(|e| e.health(Instant::now(), policy).is_healthy())
}

/// An in-process EPP (as `llmsched epp` starts it) on loopback with the proxy on.
pub async fn start_epp(endpoints: &[SocketAddr], extra: &[&str]) -> llmsched_epp::EppHandle {
    use clap::Parser;
    let eps: Vec<String> = endpoints.iter().map(|a| a.to_string()).collect();
    let mut argv: Vec<String> = [
        "epp",
        "--bind-address=127.0.0.1",
        "--grpc-port=0",
        "--grpc-health-port=0",
        "--metrics-port=0",
        "--proxy-port=0",
        "--secure-serving=false",
        "--drain-timeout=2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.push(format!("--endpoints={}", eps.join(",")));
    argv.extend(extra.iter().map(|s| s.to_string()));
    let args = llmsched_epp::Args::try_parse_from(&argv).expect("EPP flags parse");
    let epp = llmsched_epp::start(args).await.expect("EPP starts");
    wait_until("the EPP to be ready", || epp.health().is_ready()).await;
    epp
}

/// Envoy (mode `epp`) in front of an EPP at `grpc`/`health` (plaintext), with the
/// subset-hint header turned into metadata.
pub async fn start_envoy(grpc: SocketAddr, health: SocketAddr) -> Envoy {
    let binary = find_envoy(&repo_root()).expect("Envoy (scripts/install-tools.sh)");
    let config = BootstrapConfig {
        mode: Mode::Epp,
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        epp: EppTarget {
            host: grpc.ip().to_string(),
            grpc_port: grpc.port(),
            health_port: health.port(),
            tls: false,
        },
        subset_hint_header: true,
        upstream_host_header: true,
        health_check_interval: Duration::from_millis(500),
        ..BootstrapConfig::default()
    };
    Envoy::start(&config, &EnvoyOptions::new(binary))
        .await
        .expect("Envoy starts")
}

/// `llmsched epp` as a process (so it can be sent signals); its addresses are read from its
/// startup log line.
pub struct EppProc {
    pub child: Child,
    pub grpc: SocketAddr,
    pub health: SocketAddr,
    pub metrics: SocketAddr,
    pub proxy: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl EppProc {
    pub async fn start(endpoints: &[SocketAddr], extra: &[&str]) -> Self {
        Self::start_limited(endpoints, extra, None).await
    }

    /// [`Self::start`] with at most `nofile` open file descriptors (`prlimit`).
    pub async fn start_limited(
        endpoints: &[SocketAddr],
        extra: &[&str],
        nofile: Option<u32>,
    ) -> Self {
        let eps: Vec<String> = endpoints.iter().map(|a| a.to_string()).collect();
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_llmsched"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_llmsched")),
        };
        let mut child = cmd
            .args([
                "epp",
                "--bind-address=127.0.0.1",
                "--grpc-port=0",
                "--grpc-health-port=0",
                "--metrics-port=0",
                "--proxy-port=0",
                "--secure-serving=false",
            ])
            .arg(format!("--endpoints={}", eps.join(",")))
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let l = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                l.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let started = tokio::time::timeout(DEADLINE, async {
            while let Some(line) = rx.recv().await {
                if line.contains("llmsched EPP started") {
                    return Some(line);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("the EPP did not start: {:?}", log.lock().unwrap()));
        let field = |name: &str| -> SocketAddr {
            let at = started
                .find(&format!("{name}="))
                .unwrap_or_else(|| panic!("no {name} in {started}"));
            let rest = &started[at + name.len() + 1..];
            let rest = rest.trim_start_matches("Some(");
            let end = rest.find([' ', ')']).unwrap_or(rest.len());
            rest[..end].parse().unwrap()
        };
        let p = Self {
            grpc: field("grpc"),
            health: field("health"),
            metrics: field("metrics"),
            proxy: field("proxy"),
            child,
            log,
        };
        let start = Instant::now();
        loop {
            let m = get(p.metrics, "/metrics")
                .await
                .map(|(_, b)| b)
                .unwrap_or_default();
            let healthy = m
                .lines()
                .filter(|l| l.starts_with("llmsched_endpoint_healthy{") && l.ends_with(" 1"))
                .count();
            if healthy == endpoints.len() {
                break;
            }
            assert!(start.elapsed() < DEADLINE, "endpoints never healthy:\n{m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p
    }

    /// Sends `signal` (e.g. `SIGTERM`) with the `kill` command.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args(["-s", signal, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {signal} {pid}");
    }

    /// Waits for the process to exit (within the deadline); its exit status.
    pub async fn exited(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the EPP exits")
            .unwrap()
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}
