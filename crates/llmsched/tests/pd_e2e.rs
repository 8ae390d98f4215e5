//! Prefill/decode disaggregation end to end, every part real and in its own process where a
//! user runs it so: a real Envoy (from `scripts/install-tools.sh`) with ext_proc to `llmsched
//! epp` loaded with `config/epp/pd-sim-epp-config.yaml` (the plugin types and parameter values
//! of the reference's simulator P/D example), two `llmsched sim --role prefill` replicas, two `llmsched sim --role decode`
//! replicas, each behind its own `llmsched pd-sidecar`. The endpoints file labels the prefill
//! replicas `llm-d.ai/role: prefill` and the sidecars `llm-d.ai/role: decode`, as the llm-d
//! guide's pods are labelled (the pool's port on a decode pod is the sidecar's).
//!
//! What happened is read from the replicas' own `/metrics` (prompt tokens by source, NIXL
//! transfers, generated tokens), the sidecars' `/pd-sidecar/metrics` and the EPP's decision
//! counters; the response header `x-llmsched-upstream-host` says where Envoy sent a request.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap (team rule)

mod support;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llmsched_gateway::{BootstrapConfig, Envoy, EnvoyOptions, EppTarget, Mode};
use serde_json::{Value, json};
use support::{Tool, repo_root, tool};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const MODEL: &str = "Qwen/Qwen3-32B";
const PROFILE: &str = "qwen3-32b-tp2-h100";
/// Generous: the suite shares two cores with other builds.
const DEADLINE: Duration = Duration::from_secs(90);

/// A child process killed (and reaped) when the test ends, whatever happens.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, dir: &Path, args: &[String]) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_llmsched"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Panics with the logs if the process has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}):\n{}", self.name, self.logs());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A free port on `ip` (bound, then released for the process that takes it).
fn free_port(ip: [u8; 4]) -> u16 {
    TcpListener::bind(SocketAddr::from((ip, 0)))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Reply {
    status: u16,
    headers: http::HeaderMap,
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
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn http(c: &HttpClient, method: &str, addr: SocketAddr, path: &str, body: &str) -> Reply {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = c.request(req).await.unwrap();
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

/// A GET that may fail (the server is still starting): the body of a 200, else `None`.
async fn try_get(c: &HttpClient, addr: SocketAddr, path: &str) -> Option<String> {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), c.request(req))
        .await
        .ok()?
        .ok()?;
    if resp.status() != 200 {
        return None;
    }
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&body).into_owned())
}

/// Polls until `f` holds.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    buf.starts_with(b"HTTP/1.1 200")
}

/// Sum of the samples named `name` whose labels include `labels` (0 when there is none: a
/// labelled counter appears with its first increment).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
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
            sum += v.parse::<f64>().unwrap();
        }
    }
    sum
}

/// What a replica's `/metrics` says about the P/D path.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Replica {
    computed: f64,
    cache_hit: f64,
    transferred: f64,
    generated: f64,
    transfers: f64,
    failed_transfers: f64,
    served: f64,
}

async fn replica(c: &HttpClient, addr: SocketAddr) -> Replica {
    let r = http(c, "GET", addr, "/metrics", "").await;
    assert_eq!(r.status, 200, "{addr}/metrics: {}", r.text());
    let t = r.text();
    let src = |s| sample(&t, "vllm:prompt_tokens_by_source_total", &[("source", s)]);
    Replica {
        computed: src("local_compute"),
        cache_hit: src("local_cache_hit"),
        transferred: src("external_kv_transfer"),
        generated: sample(&t, "vllm:generation_tokens_total", &[]),
        transfers: sample(&t, "vllm:nixl_xfer_time_seconds_count", &[]),
        failed_transfers: sample(&t, "vllm:nixl_num_failed_transfers_total", &[]),
        served: sample(&t, "llmsched_sim_kv_transfer_served_total", &[]),
    }
}

/// `n` distinct words: `n` tokens for the simulator's tokenizer, ~9n bytes for the EPP.
fn words(seed: &str, n: usize) -> String {
    (0..n)
        .map(|i| format!("{seed}{i:04}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn completion(prompt: &str, max_tokens: u32, stream: bool) -> String {
    let mut b = json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true, "stream": stream});
    if stream {
        b["stream_options"] = json!({"include_usage": true});
    }
    b.to_string()
}

/// The `data:` payloads of an SSE body.
fn frames(body: &[u8]) -> Vec<String> {
    std::str::from_utf8(body)
        .unwrap()
        .split("\n\n")
        .filter(|f| !f.trim().is_empty())
        .map(|f| {
            f.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data frame: {f:?}"))
                .to_string()
        })
        .collect()
}

/// A stream's text chunks and its final usage (asserting it ends with `[DONE]`).
fn stream_parts(r: &Reply) -> (usize, Value) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type").starts_with("text/event-stream"),
        "{:?}",
        r.headers
    );
    let f = frames(&r.body);
    assert_eq!(f.last().map(String::as_str), Some("[DONE]"), "{f:?}");
    let chunks: Vec<Value> = f[..f.len() - 1]
        .iter()
        .map(|x| serde_json::from_str(x).unwrap())
        .collect();
    let text = chunks
        .iter()
        .filter(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty()))
        .count();
    let usage = chunks
        .iter()
        .rev()
        .find(|c| !c["usage"].is_null())
        .map(|c| c["usage"].clone())
        .unwrap_or_else(|| panic!("no usage chunk in {f:?}"));
    (text, usage)
}

struct Deployment {
    _dir: tempfile::TempDir,
    prefill_addrs: Vec<SocketAddr>,
    decode_addrs: Vec<SocketAddr>,
    sidecar_addrs: Vec<SocketAddr>,
    epp_metrics: SocketAddr,
    prefill: Proc,
    _decode: Proc,
    sidecars: Vec<Proc>,
    epp: Proc,
    envoy: Envoy,
}

impl Deployment {
    async fn start() -> Deployment {
        let envoy_bin = tool(Tool::Envoy);
        let dir = tempfile::tempdir().unwrap();
        let prefill_addrs: Vec<SocketAddr> = [[127, 0, 0, 2], [127, 0, 0, 3]]
            .into_iter()
            .map(|ip| SocketAddr::from((ip, free_port(ip))))
            .collect();
        let decode_ips = [[127, 0, 0, 4], [127, 0, 0, 5]];
        let decode_addrs: Vec<SocketAddr> = decode_ips
            .into_iter()
            .map(|ip| SocketAddr::from((ip, free_port(ip))))
            .collect();
        let sidecar_addrs: Vec<SocketAddr> = decode_ips
            .into_iter()
            .map(|ip| SocketAddr::from((ip, free_port(ip))))
            .collect();
        let join = |a: &[SocketAddr]| {
            a.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let sim = |role: &str, addrs: &[SocketAddr]| -> Vec<String> {
            [
                "sim",
                "--profile",
                PROFILE,
                "--time-scale",
                "20",
                "--role",
                role,
                "--kv-side-channel-port",
                "0",
                "--addrs",
                &join(addrs),
            ]
            .map(String::from)
            .to_vec()
        };
        let prefill = Proc::spawn("sim-prefill", dir.path(), &sim("prefill", &prefill_addrs));
        let decode = Proc::spawn("sim-decode", dir.path(), &sim("decode", &decode_addrs));
        let sidecars: Vec<Proc> = sidecar_addrs
            .iter()
            .zip(&decode_addrs)
            .enumerate()
            .map(|(i, (s, d))| {
                Proc::spawn(
                    &format!("pd-sidecar-{i}"),
                    dir.path(),
                    &[
                        "pd-sidecar".into(),
                        format!("--listen-address={}", s.ip()),
                        format!("--port={}", s.port()),
                        format!("--vllm-host={}", d.ip()),
                        format!("--vllm-port={}", d.port()),
                        "--secure-proxy=false".into(),
                        "--prefill-max-retries=1".into(),
                        "--prefill-retry-backoff=20ms".into(),
                    ],
                )
            })
            .collect();
        let mut endpoints = String::from("endpoints:\n");
        for (i, a) in prefill_addrs.iter().enumerate() {
            endpoints.push_str(&format!(
                "- {{name: prefill-{i}, address: {}, port: {}, labels: {{llm-d.ai/role: prefill}}}}\n",
                a.ip(),
                a.port()
            ));
        }
        for (i, a) in sidecar_addrs.iter().enumerate() {
            endpoints.push_str(&format!(
                "- {{name: decode-{i}, address: {}, port: {}, labels: {{llm-d.ai/role: decode}}}}\n",
                a.ip(),
                a.port()
            ));
        }
        let endpoints_file = dir.path().join("endpoints.yaml");
        std::fs::write(&endpoints_file, endpoints).unwrap();
        let lo = [127, 0, 0, 1];
        let (grpc, health, metrics) = (free_port(lo), free_port(lo), free_port(lo));
        let epp = Proc::spawn(
            "epp",
            dir.path(),
            &[
                "epp".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--grpc-port={grpc}"),
                format!("--grpc-health-port={health}"),
                format!("--metrics-port={metrics}"),
                "--secure-serving=false".into(),
                "--refresh-metrics-interval=50ms".into(),
                // The P/D hops and the sidecar's own fallback for a dead prefiller are under
                // test; with endpoint health checks the EPP stops naming a dead or not yet
                // scraped endpoint, which endpoint_health.rs covers.
                "--endpoint-health-checks=false".into(),
                format!("--endpoints-file={}", endpoints_file.display()),
                format!(
                    "--config-file={}",
                    repo_root()
                        .join("config/epp/pd-sim-epp-config.yaml")
                        .display()
                ),
            ],
        );
        let mut d = Deployment {
            prefill_addrs,
            decode_addrs,
            sidecar_addrs,
            epp_metrics: SocketAddr::from((lo, metrics)),
            prefill,
            _decode: decode,
            sidecars,
            epp,
            envoy: Envoy::start(
                &BootstrapConfig {
                    mode: Mode::Epp,
                    listen: "127.0.0.1:0".parse().unwrap(),
                    admin: "127.0.0.1:0".parse().unwrap(),
                    epp: EppTarget {
                        host: "127.0.0.1".into(),
                        grpc_port: grpc,
                        health_port: health,
                        tls: false,
                    },
                    upstream_host_header: true,
                    health_check_interval: Duration::from_millis(500),
                    ..BootstrapConfig::default()
                },
                &EnvoyOptions::new(envoy_bin),
            )
            .await
            .unwrap_or_else(|e| panic!("Envoy does not start: {e}")),
            _dir: dir,
        };
        let all: Vec<SocketAddr> = d
            .prefill_addrs
            .iter()
            .chain(&d.decode_addrs)
            .chain(&d.sidecar_addrs)
            .copied()
            .collect();
        for a in all {
            d.assert_running();
            eventually(&format!("{a} to answer /health"), || healthy(a)).await;
        }
        // The EPP has scraped all four endpoints (through the sidecars for the decoders) ...
        let c = client();
        let start = Instant::now();
        loop {
            d.epp.assert_running();
            if let Some(text) = try_get(&c, d.epp_metrics, "/metrics").await
                && sample(&text, "inference_pool_ready_pods", &[]) == 4.0
            {
                break;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "the EPP never saw four ready endpoints:\n{}",
                d.epp.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // ... and Envoy health-checks it.
        eventually("Envoy to see the EPP healthy", || async {
            let (_, clusters) = d.envoy.admin_get("/clusters").await.unwrap();
            clusters
                .lines()
                .any(|l| l.starts_with("llmsched_epp::") && l.ends_with("::health_flags::healthy"))
        })
        .await;
        d
    }

    fn assert_running(&mut self) {
        self.prefill.assert_running();
        for s in &mut self.sidecars {
            s.assert_running();
        }
        self.epp.assert_running();
    }

    async fn send(&self, c: &HttpClient, body: &str) -> Reply {
        http(
            c,
            "POST",
            self.envoy.listener_addr(),
            "/v1/completions",
            body,
        )
        .await
    }

    /// Which decode sidecar Envoy sent the request to.
    fn decode_index(&self, r: &Reply) -> usize {
        let host = r.header(llmsched_gateway::bootstrap::UPSTREAM_HOST_HEADER);
        self.sidecar_addrs
            .iter()
            .position(|a| a.to_string() == host)
            .unwrap_or_else(|| {
                panic!(
                    "upstream host {host:?} is not a decode sidecar ({:?})",
                    self.sidecar_addrs
                )
            })
    }

    async fn prefills(&self, c: &HttpClient) -> Vec<Replica> {
        let mut v = Vec::new();
        for a in &self.prefill_addrs {
            v.push(replica(c, *a).await);
        }
        v
    }

    async fn decodes(&self, c: &HttpClient) -> Vec<Replica> {
        let mut v = Vec::new();
        for a in &self.decode_addrs {
            v.push(replica(c, *a).await);
        }
        v
    }

    async fn sidecar_metrics(&self, c: &HttpClient, i: usize) -> String {
        http(c, "GET", self.sidecar_addrs[i], "/pd-sidecar/metrics", "")
            .await
            .text()
    }

    async fn epp_decisions(&self, c: &HttpClient, decision: &str) -> f64 {
        let t = http(c, "GET", self.epp_metrics, "/metrics", "")
            .await
            .text();
        sample(
            &t,
            "llm_d_epp_disagg_decision_total",
            &[("decision_type", decision)],
        )
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in [&self.prefill, &self.epp]
                .into_iter()
                .chain(self.sidecars.iter())
            {
                eprintln!("--- {} log\n{}", p.name, p.logs());
            }
        }
    }
}

/// Waits until the decode replicas' metrics show `n` finished generations in total (the
/// counters are updated when a request ends, which may trail the last byte slightly).
async fn wait_generated(d: &Deployment, c: &HttpClient, want: f64) -> Vec<Replica> {
    let start = Instant::now();
    loop {
        let last = d.decodes(c).await;
        if last.iter().map(|r| r.generated).sum::<f64>() >= want {
            return last;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "decoders never reached {want} generated tokens: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the prefill replicas until `want` held prompts were read and freed in all (the
/// decoder's completion notification is asynchronous, as NIXL's).
async fn wait_served(d: &Deployment, c: &HttpClient, want: f64) -> Vec<Replica> {
    let start = Instant::now();
    loop {
        let last = d.prefills(c).await;
        if last.iter().map(|r| r.served).sum::<f64>() >= want {
            return last;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "prefill replicas never had {want} held prompts read: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncached_prompts_are_prefilled_remotely_cached_ones_are_not_and_a_dead_prefiller_is_survived()
 {
    let mut d = Deployment::start().await;
    let c = client();
    const N: usize = 600;

    // 1. An uncached long prompt: prefilled on a prefill replica, decoded on a decode replica
    //    that reads the blocks instead of computing them.
    let doc = words("doc", N);
    let r = d.send(&c, &completion(&doc, 20, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["usage"]["prompt_tokens"], N, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 20, "{body}");
    // The sidecar reports the prefill replica's cached tokens (none: the prompt was new).
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let k = d.decode_index(&r);
    let dec = wait_generated(&d, &c, 20.0).await;
    let pre = wait_served(&d, &c, 1.0).await;
    let p = pre
        .iter()
        .position(|x| x.computed > 0.0)
        .unwrap_or_else(|| panic!("no prefill replica computed the prompt: {pre:?}"));
    assert_eq!(pre[p].computed, N as f64, "{pre:?}");
    assert_eq!(pre[p].generated, 1.0, "the prefill hop asks for one token");
    assert_eq!(pre[p].served, 1.0, "the decoder read the held blocks");
    assert_eq!(pre[1 - p], Replica::default(), "{pre:?}");
    assert_eq!(dec[k].transfers, 1.0, "{dec:?}");
    assert_eq!(dec[k].transferred, (N - 1) as f64, "{dec:?}");
    assert_eq!(
        dec[k].computed, 1.0,
        "only the last prompt token is recomputed"
    );
    assert_eq!(dec[k].generated, 20.0);
    assert_eq!(dec[1 - k], Replica::default(), "{dec:?}");
    let sm = d.sidecar_metrics(&c, k).await;
    assert_eq!(
        sample(
            &sm,
            "llmsched_pd_sidecar_requests_total",
            &[("route", "pd")]
        ),
        1.0,
        "{sm}"
    );
    assert_eq!(d.epp_decisions(&c, "prefill-decode").await, 1.0);

    // 2. The same prompt again, streamed: the decode replica that holds it is chosen and the
    //    prefill hop is skipped (nothing new on the prefill replicas, no new transfer).
    let r = d.send(&c, &completion(&doc, 12, true)).await;
    let (text, usage) = stream_parts(&r);
    assert_eq!(text, 12, "{}", r.text());
    assert_eq!(usage["prompt_tokens"], N);
    assert_eq!(usage["completion_tokens"], 12);
    assert_eq!(
        d.decode_index(&r),
        k,
        "prefix affinity to the decode replica"
    );
    let dec2 = wait_generated(&d, &c, 32.0).await;
    assert_eq!(
        d.prefills(&c).await,
        pre,
        "no prefill hop for a cached prompt"
    );
    assert_eq!(dec2[k].transfers, 1.0, "{dec2:?}");
    assert!(
        dec2[k].cache_hit >= (N - 16) as f64,
        "served from the decoder's own prefix cache: {dec2:?}"
    );
    assert!(dec2[k].computed - dec[k].computed <= 16.0, "{dec2:?}");
    // The sidecar passed it through (its passthrough count also has the EPP's scrapes).
    let sm = d.sidecar_metrics(&c, k).await;
    assert_eq!(
        sample(
            &sm,
            "llmsched_pd_sidecar_requests_total",
            &[("route", "pd")]
        ),
        1.0,
        "{sm}"
    );
    assert_eq!(d.epp_decisions(&c, "decode-only").await, 1.0);

    // 3. Another uncached prompt, streamed: disaggregated, and the stream and its usage come
    //    through the sidecar intact.
    let before = d.prefills(&c).await;
    let r = d.send(&c, &completion(&words("other", N), 15, true)).await;
    let (text, usage) = stream_parts(&r);
    assert_eq!(text, 15, "{}", r.text());
    assert_eq!(usage["prompt_tokens"], N);
    assert_eq!(usage["completion_tokens"], 15);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    let k3 = d.decode_index(&r);
    let dec3 = wait_generated(&d, &c, 47.0).await;
    let after = d.prefills(&c).await;
    let computed = |v: &[Replica]| v.iter().map(|x| x.computed).sum::<f64>();
    assert_eq!(computed(&after) - computed(&before), N as f64);
    assert_eq!(dec3[k3].transfers - dec2[k3].transfers, 1.0, "{dec3:?}");
    assert_eq!(d.epp_decisions(&c, "prefill-decode").await, 2.0);

    // 4. The prefill replicas die. The EPP still lists them (static endpoints, last metrics
    //    kept), so it keeps disaggregating; the sidecar cannot reach the prefiller, retries,
    //    and prefills locally: the request succeeds, the fallback is logged and counted.
    d.prefill.kill();
    let r = d.send(&c, &completion(&words("late", N), 10, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["usage"]["prompt_tokens"], N, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 10, "{body}");
    let k4 = d.decode_index(&r);
    let dec4 = wait_generated(&d, &c, 57.0).await;
    assert_eq!(
        dec4[k4].computed - dec3[k4].computed,
        N as f64,
        "prefilled locally: {dec4:?}"
    );
    assert_eq!(dec4[k4].transfers, dec3[k4].transfers, "no transfer");
    assert_eq!(
        dec4.iter().map(|x| x.failed_transfers).sum::<f64>(),
        0.0,
        "the decoder was never asked to read from a dead replica"
    );
    let sm = d.sidecar_metrics(&c, k4).await;
    assert_eq!(
        sample(
            &sm,
            "llmsched_pd_sidecar_prefill_fallbacks_total",
            &[("reason", "connect")]
        ),
        1.0,
        "{sm}"
    );
    assert_eq!(
        sample(&sm, "llmsched_pd_sidecar_prefill_retries_total", &[]),
        1.0,
        "{sm}"
    );
    assert_eq!(d.epp_decisions(&c, "prefill-decode").await, 3.0);
    // Logged where an operator looks.
    let log = d.sidecars[k4].logs();
    assert!(
        log.contains("prefilling locally") && log.contains("connect"),
        "{log}"
    );
}

/// Standalone mode, no sidecar process: `llmsched epp --proxy-port` (default
/// `--proxy-pd-routing in-process`) in front of one `llmsched sim --role prefill` and one
/// `llmsched sim --role decode` process, the decode endpoint being the decode replica itself.
/// The proxy runs the pd-sidecar's router in process: an uncached prompt is prefilled on the
/// prefill replica and read by the decoder (the replicas' own metrics), streamed back with its
/// usage intact; the same prompt again skips the prefill hop; with the prefill replica dead the
/// request still succeeds (local prefill, counted on the proxy's `/pd-sidecar/metrics`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_in_proxy_runs_the_prefill_hop_in_process() {
    const N: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    let prefill_addr = SocketAddr::from(([127, 0, 0, 6], free_port([127, 0, 0, 6])));
    let decode_addr = SocketAddr::from(([127, 0, 0, 7], free_port([127, 0, 0, 7])));
    let sim = |role: &str, addr: SocketAddr| -> Vec<String> {
        [
            "sim",
            "--profile",
            PROFILE,
            "--time-scale",
            "20",
            "--role",
            role,
            "--kv-side-channel-port",
            "0",
            "--addrs",
            &addr.to_string(),
        ]
        .map(String::from)
        .to_vec()
    };
    let mut prefill = Proc::spawn("sim-prefill", dir.path(), &sim("prefill", prefill_addr));
    let mut decode = Proc::spawn("sim-decode", dir.path(), &sim("decode", decode_addr));
    let endpoints = format!(
        "endpoints:\n- {{name: prefill-0, address: {}, port: {}, labels: {{llm-d.ai/role: prefill}}}}\n\
         - {{name: decode-0, address: {}, port: {}, labels: {{llm-d.ai/role: decode}}}}\n",
        prefill_addr.ip(),
        prefill_addr.port(),
        decode_addr.ip(),
        decode_addr.port()
    );
    let endpoints_file = dir.path().join("endpoints.yaml");
    std::fs::write(&endpoints_file, endpoints).unwrap();
    let lo = [127, 0, 0, 1];
    let (grpc, health, metrics, proxy) =
        (free_port(lo), free_port(lo), free_port(lo), free_port(lo));
    let mut epp = Proc::spawn(
        "epp",
        dir.path(),
        &[
            "epp".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--grpc-port={grpc}"),
            format!("--grpc-health-port={health}"),
            format!("--metrics-port={metrics}"),
            format!("--proxy-port={proxy}"),
            "--secure-serving=false".into(),
            "--refresh-metrics-interval=50ms".into(),
            // The P/D hops and the sidecar's own fallback for a dead prefiller are under
            // test; with endpoint health checks the EPP stops naming a dead or not yet
            // scraped endpoint, which endpoint_health.rs covers.
            "--endpoint-health-checks=false".into(),
            format!("--endpoints-file={}", endpoints_file.display()),
            format!(
                "--config-file={}",
                repo_root()
                    .join("config/epp/pd-sim-epp-config.yaml")
                    .display()
            ),
        ],
    );
    let proxy = SocketAddr::from((lo, proxy));
    let c = client();
    for a in [prefill_addr, decode_addr] {
        eventually(&format!("{a} to answer /health"), || healthy(a)).await;
    }
    let start = Instant::now();
    while try_get(&c, proxy, "/pd-sidecar/metrics").await.is_none() {
        epp.assert_running();
        assert!(
            start.elapsed() < DEADLINE,
            "the proxy never answered:\n{}",
            epp.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pd_metric = |name: &'static str, labels: &'static [(&'static str, &'static str)]| {
        let c = c.clone();
        async move {
            let t = http(&c, "GET", proxy, "/pd-sidecar/metrics", "")
                .await
                .text();
            sample(&t, name, labels)
        }
    };
    let send = |body: String| {
        let c = c.clone();
        async move { http(&c, "POST", proxy, "/v1/completions", &body).await }
    };
    let wait_decoded = |want: f64| {
        let c = c.clone();
        async move {
            let start = Instant::now();
            loop {
                let r = replica(&c, decode_addr).await;
                if r.generated >= want {
                    return r;
                }
                assert!(start.elapsed() < DEADLINE, "decoder stuck: {r:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // 1. Uncached, streamed: prefill hop in the proxy, KV read by the decoder.
    let doc = words("inproc", N);
    let r = send(completion(&doc, 20, true)).await;
    let (text, usage) = stream_parts(&r);
    assert_eq!(text, 20, "{}", r.text());
    assert_eq!(usage["prompt_tokens"], N);
    assert_eq!(usage["completion_tokens"], 20);
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"], 0,
        "the prefill replica's"
    );
    let dec = wait_decoded(20.0).await;
    eventually("the prefill replica to free the read blocks", || async {
        replica(&c, prefill_addr).await.served == 1.0
    })
    .await;
    let pre = replica(&c, prefill_addr).await;
    assert_eq!(pre.computed, N as f64, "{pre:?}");
    assert_eq!(pre.generated, 1.0, "the prefill hop asks for one token");
    assert_eq!(dec.transfers, 1.0, "{dec:?}");
    assert_eq!(dec.transferred, (N - 1) as f64, "{dec:?}");
    assert_eq!(
        dec.computed, 1.0,
        "only the last prompt token is recomputed"
    );
    assert_eq!(
        pd_metric("llmsched_pd_sidecar_requests_total", &[("route", "pd")]).await,
        1.0
    );
    assert_eq!(
        pd_metric("llmsched_pd_sidecar_prefill_duration_seconds_count", &[]).await,
        1.0
    );

    // 2. The same prompt: cached on the decoder, no prefill hop.
    let r = send(completion(&doc, 20, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 20);
    let dec2 = wait_decoded(40.0).await;
    assert_eq!(
        replica(&c, prefill_addr).await.computed,
        N as f64,
        "no second prefill"
    );
    assert_eq!(dec2.transfers, 1.0, "{dec2:?}");
    assert!(dec2.cache_hit >= (N - 16) as f64, "{dec2:?}");
    assert_eq!(
        pd_metric("llmsched_pd_sidecar_requests_total", &[("route", "pd")]).await,
        1.0
    );

    // 3. The prefill replica dies: the proxy retries, then prefills on the decoder.
    prefill.kill();
    let r = send(completion(&words("alone", N), 10, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 10);
    let dec3 = wait_decoded(50.0).await;
    assert_eq!(
        dec3.computed - dec2.computed,
        N as f64,
        "prefilled locally: {dec3:?}"
    );
    assert_eq!(dec3.transfers, 1.0, "{dec3:?}");
    assert_eq!(
        pd_metric(
            "llmsched_pd_sidecar_prefill_fallbacks_total",
            &[("reason", "connect")]
        )
        .await,
        1.0
    );
    assert_eq!(
        pd_metric("llmsched_pd_sidecar_prefill_retries_total", &[]).await,
        2.0
    );
    let log = epp.logs();
    assert!(log.contains("prefilling locally"), "{log}");
    decode.assert_running();
    epp.assert_running();
}

/// `llmsched pd-sidecar` refuses bad flags with a message that names them, before binding.
#[test]
fn pd_sidecar_rejects_bad_flags_clearly() {
    for (args, want) in [
        (vec!["--kv-connector", "lmcache"], "must be one of"),
        (vec!["--vllm-port", "http"], "http"),
        (vec!["--enable-ssrf-protection"], "--ssrf-allowlist"),
        (vec!["--prefill-timeout", "soon"], "soon"),
    ] {
        let out = support::run(
            Command::new(env!("CARGO_BIN_EXE_llmsched"))
                .arg("pd-sidecar")
                .args(&args),
        );
        assert!(!out.status.success(), "{args:?}: {}", support::both(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
