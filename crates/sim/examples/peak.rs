//! Peak-load check: one process, 8 replicas of `qwen3-32b-tp2-h100` at time scale 1, fed the
//! guide's peak stage — Poisson arrivals at 60 requests/s, shared-prefix prompts (150 groups ×
//! 5 prompts, 6,000 + 1,200 tokens), 1,000 output tokens each, streaming.
//!
//! ```text
//! cargo run --release -p llmsched-sim --example peak [-- --rate 60 --duration 60 --replicas 8]
//! ```
//!
//! The load generator runs in the same process on its own tokio runtime (threads `load-*`);
//! the simulator's runtime uses threads `sim-*`, so their CPU is reported separately (from
//! /proc/self/task). Requests are routed by prefix group (group mod replicas), as a prefix-aware
//! scheduler would. Reported: CPU cores used by each side, the simulator's step lag (how late
//! each simulated step ended on the wall clock) and clock re-synchronisations, tokens streamed,
//! and client-side latency summaries (time scale 1, so wall = simulated).
//!
//! With the faithful profile the modelled GPUs cannot serve 60 requests/s (neither could the
//! guide's real cluster: it completed 14.4 requests/s at that stage), so the simulator streams
//! only what eight such replicas produce. `--stress` removes that limit to measure the CPU cost
//! of the full 60,000 tokens/s: a flat 16 ms step whatever the batch (t0 = 16 ms, other terms
//! ≈ 0) and a 4× larger KV cache, so every request streams at ≈ 62 tokens/s from arrival and
//! ≈ 960 streams run concurrently in steady state. CPU is reported over the whole window and
//! over its steady-state part (after `--warmup` seconds).

#[path = "util/mod.rs"]
mod util;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use llmsched_sim::{ClusterConfig, ReplicaConfig, SimCluster};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use util::*;

struct Opts {
    rate: f64,
    duration: f64,
    warmup: f64,
    replicas: usize,
    output: usize,
    stress: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        rate: 60.0,
        duration: 60.0,
        warmup: 20.0,
        replicas: 8,
        output: 1000,
        stress: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--rate" => o.rate = v.parse().unwrap_or(o.rate),
            "--duration" => o.duration = v.parse().unwrap_or(o.duration),
            "--replicas" => o.replicas = v.parse().unwrap_or(o.replicas),
            "--output" => o.output = v.parse().unwrap_or(o.output),
            "--warmup" => o.warmup = v.parse().unwrap_or(o.warmup),
            "--stress" => {
                o.stress = true;
                i += 1;
                continue;
            }
            other => eprintln!("ignoring unknown argument {other}"),
        }
        i += 2;
    }
    o
}

/// CPU seconds (simulator, load generator, process), tokens streamed, and when.
type Snapshot = (f64, f64, f64, u64, Instant);

fn main() {
    let o = opts();
    let sim_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sim-worker")
        .enable_all()
        .build()
        .expect("sim runtime");
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("load-worker")
        .enable_all()
        .build()
        .expect("load runtime");

    // Replicas on 127.0.0.2, 127.0.0.3, … (distinct IPs, like pods), free ports.
    let mut replica = ReplicaConfig::from_profile("qwen3-32b-tp2-h100").expect("profile");
    if o.stress {
        replica.num_gpu_blocks *= 4;
        replica.max_num_seqs = 1024;
        replica.max_num_batched_tokens = 1 << 20;
        replica.step.overhead_s = 0.016;
        replica.step.prefill_per_token_s = 1e-9;
        replica.step.prefill_attn_per_pair_s = 0.0;
        replica.step.decode_per_seq_s = 0.0;
        replica.step.decode_attn_per_token_s = 0.0;
    }
    let addrs: Vec<SocketAddr> = (0..o.replicas)
        .map(|i| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8)), 0))
        .collect();
    let cluster = sim_rt
        .block_on(SimCluster::start(ClusterConfig::new(addrs, replica)))
        .expect("cluster starts");
    let addrs = cluster.addrs();

    // The guide's 750 prompts (150 groups × 5), shuffled once, replayed cyclically.
    eprintln!("building 750 prompts…");
    let mut rng = SmallRng::seed_from_u64(42);
    let mut prompts: Vec<(usize, Bytes)> = (0..150u64)
        .flat_map(|g| (0..5u64).map(move |q| (g, q)))
        .map(|(g, q)| {
            let p = guide_prompt(g, g * 5 + q, 6000, 1200);
            (g as usize, Bytes::from(body(&p, o.output)))
        })
        .collect();
    for i in (1..prompts.len()).rev() {
        let j = rng.random_range(0..=i);
        prompts.swap(i, j);
    }
    let prompts = Arc::new(prompts);

    let results: Arc<Mutex<Vec<Streamed>>> = Arc::new(Mutex::new(Vec::new()));
    let ttfts: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
    let tokens_before: u64 = cluster
        .replicas()
        .iter()
        .map(|r| r.stats().generation_tokens)
        .sum();
    let cpu0 = (
        thread_cpu_seconds("sim-"),
        thread_cpu_seconds("load-"),
        process_cpu_seconds(),
    );
    let start = Instant::now();
    eprintln!(
        "sending {} req/s for {} s to {} replicas…",
        o.rate, o.duration, o.replicas
    );
    let steady: Arc<Mutex<Option<Snapshot>>> = Arc::new(Mutex::new(None));
    let replica_stats = {
        let reps: Vec<_> = cluster.replicas().iter().collect();
        move || {
            reps.iter()
                .map(|r| r.stats().generation_tokens)
                .sum::<u64>()
        }
    };
    let sent = load_rt.block_on({
        let (prompts, results, addrs, steady, ttfts) = (
            prompts.clone(),
            results.clone(),
            addrs.clone(),
            steady.clone(),
            ttfts.clone(),
        );
        let replica_stats = &replica_stats;
        async move {
            let c = client();
            let mut t = 0.0f64;
            let mut i = 0usize;
            loop {
                let u: f64 = rng.random::<f64>().max(1e-12);
                t += -u.ln() / o.rate;
                if t >= o.duration {
                    break;
                }
                sleep_until(start + Duration::from_secs_f64(t)).await;
                if t >= o.warmup && steady.lock().is_none() {
                    *steady.lock() = Some((
                        thread_cpu_seconds("sim-"),
                        thread_cpu_seconds("load-"),
                        process_cpu_seconds(),
                        replica_stats(),
                        Instant::now(),
                    ));
                }
                let (g, b) = prompts[i % prompts.len()].clone();
                let addr = addrs[g % addrs.len()];
                let (c, results, ttfts) = (c.clone(), results.clone(), ttfts.clone());
                tokio::spawn(async move {
                    let s = stream_with(&c, addr, b, Some(&ttfts)).await;
                    results.lock().push(s);
                });
                i += 1;
            }
            sleep_until(start + Duration::from_secs_f64(o.duration)).await;
            i
        }
    });
    let wall = start.elapsed().as_secs_f64();
    let cpu1 = (
        thread_cpu_seconds("sim-"),
        thread_cpu_seconds("load-"),
        process_cpu_seconds(),
    );
    let stats: Vec<_> = cluster.replicas().iter().map(|r| r.stats()).collect();
    let tokens: u64 = stats.iter().map(|s| s.generation_tokens).sum::<u64>() - tokens_before;
    let done = results.lock().clone();

    println!();
    println!(
        "Peak check: {} replicas of qwen3-32b-tp2-h100{} in one process, time scale 1",
        o.replicas,
        if o.stress {
            " (--stress: flat 16 ms steps, 4x KV)"
        } else {
            ""
        }
    );
    println!(
        "load: Poisson {} req/s for {:.0} s ({} requests sent), guide prompts (6,000 + 1,200 tokens), {} output tokens",
        o.rate, wall, sent, o.output
    );
    println!();
    println!("| quantity | value |");
    println!("| --- | ---: |");
    println!(
        "| simulator CPU (threads sim-*) | {:.2} cores |",
        (cpu1.0 - cpu0.0) / wall
    );
    println!(
        "| load-generator CPU (threads load-*) | {:.2} cores |",
        (cpu1.1 - cpu0.1) / wall
    );
    println!(
        "| whole process CPU | {:.2} cores |",
        (cpu1.2 - cpu0.2) / wall
    );
    if let Some((s0, l0, p0, tok0, t0)) = *steady.lock() {
        let w = t0.elapsed().as_secs_f64();
        let tok1: u64 = cluster
            .replicas()
            .iter()
            .map(|r| r.stats().generation_tokens)
            .sum();
        println!(
            "| steady state (after {:.0} s): simulator / load generator / process CPU | {:.2} / {:.2} / {:.2} cores at {:.0} tokens/s |",
            o.warmup,
            (cpu1.0 - s0) / w,
            (cpu1.1 - l0) / w,
            (cpu1.2 - p0) / w,
            (tok1 - tok0) as f64 / w
        );
    }
    println!(
        "| tokens streamed (all replicas) | {} ({:.0} tokens/s) |",
        tokens,
        tokens as f64 / wall
    );
    let steps: u64 = stats.iter().map(|s| s.steps).sum();
    let mean_lag = stats
        .iter()
        .map(|s| s.mean_step_lag_s * s.steps as f64)
        .sum::<f64>()
        / steps.max(1) as f64;
    let max_lag = stats.iter().map(|s| s.max_step_lag_s).fold(0.0, f64::max);
    let resyncs: u64 = stats.iter().map(|s| s.resyncs).sum();
    println!("| engine steps (all replicas) | {steps} |");
    println!("| mean step lag | {:.3} ms |", mean_lag * 1e3);
    println!("| max step lag | {:.1} ms |", max_lag * 1e3);
    println!("| clock re-synchronisations (lag > 50 ms) | {resyncs} |");
    let running: usize = stats.iter().map(|s| s.running).sum();
    let waiting: usize = stats.iter().map(|s| s.waiting).sum();
    let preempt: u64 = stats.iter().map(|s| s.preemptions).sum();
    println!("| running / waiting at the end | {running} / {waiting} |");
    println!("| preemptions | {preempt} |");
    let kv: Vec<f64> = stats.iter().map(|s| s.kv_usage).collect();
    println!(
        "| KV usage at the end (min / max over replicas) | {:.2} / {:.2} |",
        kv.iter().copied().fold(1.0, f64::min),
        kv.iter().copied().fold(0.0, f64::max)
    );
    let finished: Vec<&Streamed> = done.iter().filter(|s| s.tokens == o.output).collect();
    let ttft: Vec<f64> = ttfts.lock().clone();
    let tpot: Vec<f64> = finished.iter().filter_map(|s| s.tpot()).collect();
    let errors = done
        .iter()
        .filter(|s| s.error.is_some() || s.status != 200)
        .count();
    println!("| requests completed in the window | {} |", finished.len());
    println!("| client errors | {errors} |");
    println!(
        "| TTFT, requests that got a first token in the window (n={}) | p50 {} · p90 {} |",
        ttft.len(),
        ms(percentile(&ttft, 50.0)),
        ms(percentile(&ttft, 90.0))
    );
    println!(
        "| TPOT of completed requests (n={}) | mean {} |",
        tpot.len(),
        ms(mean(&tpot))
    );
    sim_rt.block_on(cluster.shutdown());
}
