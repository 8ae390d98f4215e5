//! The P/D part of the fidelity check (`fidelity -- --pd`): the simulator's prefill/decode
//! path (`--role prefill|decode`, NIXL-like KV transfer) against published P/D figures.
//!
//! ```text
//! cargo run --release -p llmsched-sim --example fidelity -- --pd [--pd-requests 200] [--samples 5]
//! ```
//!
//! The example is its own router, as vLLM's toy P/D proxy: it sends a request to the prefill
//! replica with `max_tokens: 1` and `kv_transfer_params` asking for a remote decode, then the
//! same prompt to the decode replica with the returned `kv_transfer_params`, streaming. TTFT
//! runs from the prefill request's send to the decode replica's first token frame; TPOT is
//! (last − first token frame) / (tokens − 1), as vLLM's `benchmark_serving.py` computes it.
//! The KV transfer time is read from the decode replica's own `vllm:nixl_xfer_time_seconds`.
//! Replicas: profile `llama3.1-8b-h100` (Llama-3.1-8B-Instruct BF16, TP 1, 16-token blocks),
//! link preset `nvlink-h100`, one prefill and one decode replica (1P1D), time scale 1 unless
//! `--pd-time-scale` says otherwise (wall-clock measurements are scaled back).
//!
//! Published figures (every one with its setup):
//! * LMCache blog, "Bringing State-Of-The-Art PD Speed to vLLM v1 with LMCache" (2025-04-29,
//!   <https://blog.lmcache.ai/2025-04-29-pdbench/>): NVIDIA Dynamo takes 20 ms to transfer the
//!   KV cache of a 7,500-token input over NVLink with vLLM's 16-token pages, 8 ms with
//!   128-token pages. The post's benchmark set-up is Llama-3.1-8B-Instruct on one 8×H100 node
//!   with NVLink; it does not restate the model next to these two figures.
//! * vLLM pull request 18242 ("An native implementation of xPyD based on P2P NCCL"), benchmark
//!   comment of 2025-06-16 (<https://github.com/vllm-project/vllm/pull/18242>): 1P1D on an
//!   8×H100 node, Llama-3.1-8B-Instruct, `benchmark_serving.py` random dataset, 8,000 input /
//!   200 output tokens, 200 prompts at 3.6 requests/s (burstiness 100), `--ignore-eos`, the
//!   P2P-NCCL connector: TTFT mean 309.84 ms, median 298.10 ms, p95 359.73 ms; TPOT mean
//!   10.45 ms, median 10.37 ms, p95 11.34 ms; "~30ms overhead for 10000 tokens" (the author's
//!   summary of what P/D adds).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use llmsched_sim::pd::{Role, link};
use llmsched_sim::{ClusterConfig, ReplicaConfig, SimCluster};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::util::*;

const PROFILE: &str = "llama3.1-8b-h100";
const MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
const LINK: &str = "nvlink-h100";
const LMCACHE: &str = "LMCache blog 2025-04-29 (Dynamo, NVLink, H100)";
const PR18242: &str = "vLLM PR 18242 (P2P NCCL 1P1D, 8×H100, 8000/200 @ 3.6 req/s)";

/// Options of the P/D part.
pub struct PdOpts {
    /// Requests of the loaded run (the published run sent 200).
    pub requests: usize,
    /// Idle samples per single-request measure.
    pub samples: usize,
    /// Time scale of the loaded run.
    pub time_scale: f64,
}

/// A row of the table.
pub struct PdRow {
    pub measure: String,
    pub sim: f64,
    pub reference: Option<f64>,
    pub source: &'static str,
}

fn replica(role: Role, scale: f64, block_size: usize) -> ReplicaConfig {
    let mut cfg = ReplicaConfig::from_profile(PROFILE)
        .expect("profile exists")
        .with_time_scale(scale)
        .with_block_size(block_size)
        .with_role(role);
    cfg.pd.side_channel_port = 0;
    let l = link(LINK).expect("link preset exists");
    cfg.pd.transfer.link_bytes_per_s = l.bytes_per_s;
    cfg.pd.transfer.latency_s = l.latency_s;
    cfg
}

async fn start(role: Role, scale: f64, block_size: usize) -> SimCluster {
    SimCluster::start(ClusterConfig::new(
        vec!["127.0.0.1:0".parse().expect("addr")],
        replica(role, scale, block_size),
    ))
    .await
    .expect("simulator starts")
}

async fn post_json(c: &HttpClient, addr: SocketAddr, body: String) -> Result<Value, String> {
    let req = http::Request::post(format!("http://{addr}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = c.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
    }
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

fn decode_body(prompt: &str, max_tokens: usize, kv: Option<Value>) -> String {
    let mut b = json!({
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true,
        "stream": true, "stream_options": {"include_usage": true},
    });
    if let Some(kv) = kv {
        b["kv_transfer_params"] = kv;
    }
    b.to_string()
}

/// One disaggregated request: the prefill hop, then the decode hop (streamed). `sent` is the
/// prefill request's send time.
async fn pd_request(
    c: &HttpClient,
    prefill: SocketAddr,
    decode: SocketAddr,
    prompt: &str,
    max_tokens: usize,
) -> Streamed {
    let t0 = Instant::now();
    let pre = json!({
        "model": MODEL, "prompt": prompt, "max_tokens": 1, "stream": false,
        "kv_transfer_params": {
            "do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
            "remote_block_ids": null, "remote_host": null, "remote_port": null
        }
    });
    let kv = match post_json(c, prefill, pre.to_string()).await {
        Ok(v) => v["kv_transfer_params"].clone(),
        Err(e) => {
            return Streamed {
                error: Some(format!("prefill hop: {e}")),
                ..Streamed::default()
            };
        }
    };
    let mut s = stream(c, decode, decode_body(prompt, max_tokens, Some(kv))).await;
    s.sent = Some(t0);
    s
}

/// Sum over label sets of a sample `name` in a replica's `/metrics`.
async fn metric(c: &HttpClient, addr: SocketAddr, name: &str) -> f64 {
    let Ok(req) =
        http::Request::get(format!("http://{addr}/metrics")).body(Full::new(Bytes::new()))
    else {
        return f64::NAN;
    };
    let Ok(resp) = c.request(req).await else {
        return f64::NAN;
    };
    let Ok(body) = resp.into_body().collect().await else {
        return f64::NAN;
    };
    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Mean KV transfer time (simulated seconds) and transfer count on a decode replica.
async fn xfer_mean(c: &HttpClient, decode: SocketAddr) -> (f64, f64) {
    let sum = metric(c, decode, "vllm:nixl_xfer_time_seconds_sum").await;
    let n = metric(c, decode, "vllm:nixl_xfer_time_seconds_count").await;
    (sum / n, n)
}

/// numpy's default (linear) percentile, as `benchmark_serving.py` reports it.
fn pctl(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let x = p / 100.0 * (s.len() - 1) as f64;
    let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (x - lo as f64)
}

fn prompt(seed: u64, tokens: usize) -> String {
    let mut p = String::with_capacity(tokens * 6);
    random_words(seed, tokens, &mut p);
    p
}

/// Idle KV transfer of a 7,500-token prompt with `block_size`-token pages.
async fn transfer_7500(o: &PdOpts, block_size: usize, seed: u64) -> f64 {
    let (p, d) = (
        start(Role::Prefill, 1.0, block_size).await,
        start(Role::Decode, 1.0, block_size).await,
    );
    let c = client();
    for s in 0..o.samples as u64 {
        let r = pd_request(&c, p.addrs()[0], d.addrs()[0], &prompt(seed + s, 7500), 2).await;
        assert!(
            r.error.is_none() && r.tokens == 2,
            "P/D request failed: {r:?}"
        );
    }
    let (mean_s, n) = xfer_mean(&c, d.addrs()[0]).await;
    assert_eq!(
        n, o.samples as f64,
        "every request must transfer its KV once"
    );
    p.shutdown().await;
    d.shutdown().await;
    mean_s
}

/// What P/D adds to an idle 10,000-token request's TTFT: P/D TTFT − aggregated TTFT.
async fn overhead_10k(o: &PdOpts) -> (f64, f64, f64) {
    let agg = start(Role::Both, 1.0, 16).await;
    let (p, d) = (
        start(Role::Prefill, 1.0, 16).await,
        start(Role::Decode, 1.0, 16).await,
    );
    let c = client();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for s in 0..o.samples as u64 {
        let text = prompt(700_000 + s, 10_000);
        let r = stream(&c, agg.addrs()[0], decode_body(&text, 2, None)).await;
        a.extend(r.ttft());
        let r = pd_request(&c, p.addrs()[0], d.addrs()[0], &text, 2).await;
        assert!(r.error.is_none(), "P/D request failed: {r:?}");
        b.extend(r.ttft());
    }
    let (xfer, _) = xfer_mean(&c, d.addrs()[0]).await;
    for cl in [agg, p, d] {
        cl.shutdown().await;
    }
    (mean(&a), mean(&b), xfer)
}

/// Gamma(shape, scale) by summing `shape` exponentials (shape is an integer here).
fn gamma(rng: &mut SmallRng, shape: u32, scale: f64) -> f64 {
    (0..shape)
        .map(|_| -(1.0 - rng.random::<f64>()).ln() * scale)
        .sum()
}

/// The published 1P1D run: 8,000 in / 200 out at 3.6 requests/s, burstiness 100.
async fn loaded(o: &PdOpts) -> (Vec<f64>, Vec<f64>, f64, usize) {
    let scale = o.time_scale;
    let (p, d) = (
        start(Role::Prefill, scale, 16).await,
        start(Role::Decode, scale, 16).await,
    );
    let (pa, da) = (p.addrs()[0], d.addrs()[0]);
    let c = client();
    let (rate, burstiness) = (3.6, 100u32);
    let mut rng = SmallRng::seed_from_u64(18_242);
    let begin = Instant::now();
    let mut at = 0.0f64;
    let mut tasks = Vec::with_capacity(o.requests);
    for i in 0..o.requests {
        // benchmark_serving.py: gamma inter-arrival times, shape = burstiness, mean 1/rate.
        at += gamma(&mut rng, burstiness, 1.0 / (rate * f64::from(burstiness)));
        let text = Arc::new(prompt(900_000 + i as u64, 8000));
        let when = begin + Duration::from_secs_f64(at / scale);
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            sleep_until(when).await;
            pd_request(&c, pa, da, &text, 200).await
        }));
    }
    let (mut ttft, mut tpot, mut failed) = (Vec::new(), Vec::new(), 0usize);
    for t in tasks {
        match t.await {
            Ok(s) if s.error.is_none() && s.tokens == 200 => {
                ttft.extend(s.ttft().map(|v| v * scale));
                tpot.extend(s.tpot().map(|v| v * scale));
            }
            other => {
                failed += 1;
                eprintln!("request failed: {other:?}");
            }
        }
    }
    let (xfer, _) = xfer_mean(&c, da).await;
    let stats = (p.replicas()[0].stats(), d.replicas()[0].stats());
    eprintln!(
        "loaded run: {} requests, {failed} failed, resyncs prefill {} decode {}, mean step lag {:.2} / {:.2} ms",
        o.requests,
        stats.0.resyncs,
        stats.1.resyncs,
        stats.0.mean_step_lag_s * 1e3,
        stats.1.mean_step_lag_s * 1e3
    );
    p.shutdown().await;
    d.shutdown().await;
    (ttft, tpot, xfer, failed)
}

/// Runs every P/D measure and returns the table's rows.
pub async fn run(o: &PdOpts) -> Vec<PdRow> {
    let mut rows = Vec::new();
    let x16 = transfer_7500(o, 16, 500_000).await;
    let x128 = transfer_7500(o, 128, 600_000).await;
    rows.push(PdRow {
        measure: "KV transfer, 7,500-token prompt, NVLink, 16-token pages".into(),
        sim: x16,
        reference: Some(0.020),
        source: LMCACHE,
    });
    rows.push(PdRow {
        measure: "KV transfer, 7,500-token prompt, NVLink, 128-token pages".into(),
        sim: x128,
        reference: Some(0.008),
        source: LMCACHE,
    });
    let (agg, pd, xfer10k) = overhead_10k(o).await;
    eprintln!(
        "idle 10,000-token prompt: TTFT aggregated {}, P/D {}, of which KV transfer {}",
        ms(agg),
        ms(pd),
        ms(xfer10k)
    );
    rows.push(PdRow {
        measure: "TTFT added by P/D, idle, 10,000-token prompt".into(),
        sim: pd - agg,
        reference: Some(0.030),
        source: "vLLM PR 18242: \"~30ms overhead for 10000 tokens\" (P2P NCCL, 8×H100)",
    });
    let (ttft, tpot, xfer, failed) = loaded(o).await;
    let n = format!("{} req", ttft.len());
    for (what, v, published) in [
        ("TTFT mean", mean(&ttft), 0.30984),
        ("TTFT median", pctl(&ttft, 50.0), 0.29810),
        ("TTFT p95", pctl(&ttft, 95.0), 0.35973),
        ("TPOT mean", mean(&tpot), 0.01045),
        ("TPOT median", pctl(&tpot, 50.0), 0.01037),
        ("TPOT p95", pctl(&tpot, 95.0), 0.01134),
    ] {
        rows.push(PdRow {
            measure: format!("1P1D, 8,000 in / 200 out, 3.6 req/s ({n}): {what}"),
            sim: v,
            reference: Some(published),
            source: PR18242,
        });
    }
    rows.push(PdRow {
        measure: "1P1D loaded run: mean KV transfer (8,000 tokens)".into(),
        sim: xfer,
        reference: None,
        source: "not published for this run",
    });
    if failed > 0 {
        eprintln!("{failed} requests of the loaded run failed");
    }
    rows
}
