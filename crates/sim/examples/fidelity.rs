//! Fidelity check of the `qwen3-32b-tp2-h100` profile against published figures.
//!
//! ```text
//! cargo run --release -p llmsched-sim --example fidelity [-- --time-scale 10 --rounds 3 --samples 5]
//! ```
//!
//! Everything is measured from the client over HTTP, like a benchmark would: TTFT = first token
//! frame − request sent; TPOT = (last − first token frame) / (tokens − 1). TTFTs are measured at
//! time scale 1 (they are short); the TPOT runs at `--time-scale` (default 10) and scale their
//! wall-clock measurements back to simulated seconds.
//!
//! Workloads:
//! * TTFT cold: one request with a 7,200-token prompt on an idle replica with nothing cached;
//! * TTFT cached: the same 6,000-token prefix with a new 1,200-token question (6,000 cached);
//! * TTFT repeated: that same prompt again (all but its last block cached);
//! * TPOT at N streams: N closed-loop clients sending the guide's requests (6,000-token shared
//!   prefix from 4 groups + 1,200-token question, 1,000 output tokens, ignore_eos); the first
//!   round is warm-up;
//! * NIM-like: 50 closed-loop clients with unique 5,000-token prompts and 500 output tokens,
//!   the shape of NVIDIA's published Llama-3.3-70B FP8 TP2 measurements.
//!
//! Published figures:
//! * llm-d "intelligent inference scheduling" guide (Qwen3-32B, TP2, H100, vLLM), rate-10
//!   stage report: TPOT mean 23.5 ms (≈ 18 streams per replica, token-weighted), TPOT min
//!   16.9 ms (lightest-load request), TTFT 50–140 ms at low load for a 7.5k-token prompt whose
//!   6k-token prefix is cached (min 51.7 ms, p50 136 ms);
//! * NVIDIA NIM LLM benchmarking guide, Llama-3.3-70B-Instruct FP8 TP2 on 2×H100 (NIM 1.8.0),
//!   5,000 input / 500 output tokens: TTFT 406.77 ms at concurrency 1; ITL 59.73 ms at
//!   concurrency 50. Its FLOP and byte budget per token is close to Qwen3-32B BF16 (0.93×
//!   the FLOP per token), so it stands in where no Qwen3-32B figure is published; the cold
//!   7,200-token reference is 406.77 ms × 7,200 / 5,000 × 0.93 ≈ 545 ms.
//!
//! `--pd` runs the prefill/decode part instead (`fidelity_pd/mod.rs`: profile
//! `llama3.1-8b-h100`, one prefill and one decode replica, against published P/D figures);
//! `--pd-requests N` (200) and `--pd-time-scale F` (1) size its loaded run.

#[path = "util/mod.rs"]
mod util;

#[path = "fidelity_pd/mod.rs"]
mod fidelity_pd;

use std::net::SocketAddr;
use std::sync::Arc;

use llmsched_sim::{ClusterConfig, ReplicaConfig, SimCluster};
use util::*;

struct Opts {
    time_scale: f64,
    rounds: usize,
    samples: usize,
    pd: bool,
    pd_requests: usize,
    pd_time_scale: f64,
}

fn opts() -> Opts {
    let mut o = Opts {
        time_scale: 10.0,
        rounds: 3,
        samples: 5,
        pd: false,
        pd_requests: 200,
        pd_time_scale: 1.0,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        if args[i] == "--pd" {
            o.pd = true;
            i += 1;
            continue;
        }
        match args[i].as_str() {
            "--time-scale" => o.time_scale = v.parse().unwrap_or(o.time_scale),
            "--rounds" => o.rounds = v.parse().unwrap_or(o.rounds).max(2),
            "--samples" => o.samples = v.parse().unwrap_or(o.samples).max(1),
            "--pd-requests" => o.pd_requests = v.parse().unwrap_or(o.pd_requests).max(1),
            "--pd-time-scale" => o.pd_time_scale = v.parse().unwrap_or(o.pd_time_scale),
            other => eprintln!("ignoring unknown argument {other}"),
        }
        i += 2;
    }
    o
}

async fn cluster(scale: f64) -> SimCluster {
    let cfg = ReplicaConfig::from_profile("qwen3-32b-tp2-h100")
        .expect("profile exists")
        .with_time_scale(scale);
    SimCluster::start(ClusterConfig::new(
        vec!["127.0.0.1:0".parse().expect("addr")],
        cfg,
    ))
    .await
    .expect("simulator starts")
}

/// N closed-loop clients, `rounds` requests each; returns per-request (round, tpot, ttft) in
/// simulated seconds.
async fn closed_loop(
    addr: SocketAddr,
    scale: f64,
    n: usize,
    rounds: usize,
    make: Arc<dyn Fn(usize, usize) -> String + Send + Sync>,
) -> Vec<(usize, f64, f64)> {
    let c = client();
    let mut tasks = Vec::new();
    for w in 0..n {
        let (c, make) = (c.clone(), make.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for r in 0..rounds {
                let s = stream(&c, addr, make(w, r)).await;
                if let (Some(tpot), Some(ttft)) = (s.tpot(), s.ttft()) {
                    out.push((r, tpot * scale, ttft * scale));
                } else {
                    eprintln!("request failed: {s:?}");
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all
}

fn main() {
    let o = opts();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if o.pd {
        rt.block_on(run_pd(&o));
    } else {
        rt.block_on(run(o));
    }
}

async fn run_pd(o: &Opts) {
    let rows = fidelity_pd::run(&fidelity_pd::PdOpts {
        requests: o.pd_requests,
        samples: o.samples,
        time_scale: o.pd_time_scale,
    })
    .await;
    println!();
    println!(
        "P/D fidelity: profile llama3.1-8b-h100, link nvlink-h100, 1 prefill + 1 decode replica (loaded run at time scale {}):",
        o.pd_time_scale
    );
    println!();
    println!("| measure | simulated | published | diff | source |");
    println!("| --- | ---: | ---: | ---: | --- |");
    for r in rows {
        let (reference, diff) = match r.reference {
            Some(v) => (ms(v), format!("{:+.1} %", pct_diff(r.sim, v))),
            None => ("—".into(), "—".into()),
        };
        println!(
            "| {} | {} | {} | {} | {} |",
            r.measure,
            ms(r.sim),
            reference,
            diff,
            r.source
        );
    }
}

struct Row {
    measure: String,
    sim: f64,
    reference: Option<f64>,
    source: &'static str,
}

async fn run(o: Opts) {
    let mut rows: Vec<Row> = Vec::new();

    // --- TTFT at time scale 1 -------------------------------------------------------------
    let ttft_cluster = cluster(1.0).await;
    let addr = ttft_cluster.addrs()[0];
    let c = client();
    let (mut cold, mut cached, mut full, mut cold5k) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for s in 0..o.samples as u64 {
        let g = 1000 + s;
        let a = stream(&c, addr, body(&guide_prompt(g, 0, 6000, 1200), 2)).await;
        let b = stream(&c, addr, body(&guide_prompt(g, 1, 6000, 1200), 2)).await;
        assert_eq!(
            a.cached_tokens,
            Some(0),
            "cold request must not hit the cache"
        );
        assert_eq!(
            b.cached_tokens,
            Some(6000),
            "the 6,000-token prefix must hit"
        );
        let again = stream(&c, addr, body(&guide_prompt(g, 1, 6000, 1200), 2)).await;
        assert_eq!(
            again.cached_tokens,
            Some(7184),
            "a repeat hits all but the last block"
        );
        cold.extend(a.ttft());
        cached.extend(b.ttft());
        full.extend(again.ttft());
        let mut p = String::new();
        random_words(99_000 + s, 5000, &mut p);
        cold5k.extend(stream(&c, addr, body(&p, 2)).await.ttft());
    }
    ttft_cluster.shutdown().await;
    rows.push(Row {
        measure: "TTFT, 7,200-token prompt, cold".into(),
        sim: mean(&cold),
        reference: Some(0.40677 * 7200.0 / 5000.0 * 0.93),
        source: "NIM analog (406.77 ms @ 5,000 tok) × 7,200/5,000 × 0.93",
    });
    rows.push(Row {
        measure: "TTFT, 7,200-token prompt, 6,000 cached".into(),
        sim: mean(&cached),
        reference: Some(0.095),
        source: "seed guide: 50–140 ms at low load (midpoint)",
    });
    rows.push(Row {
        measure: "TTFT, 7,200-token prompt repeated (7,184 cached)".into(),
        sim: mean(&full),
        reference: Some(0.0517),
        source: "seed guide: min TTFT 51.7 ms (rate 10; includes the gateway hop)",
    });
    rows.push(Row {
        measure: "TTFT, 5,000-token prompt, cold".into(),
        sim: mean(&cold5k),
        reference: Some(0.40677 * 0.93),
        source: "NIM analog (406.77 ms) × 0.93",
    });

    // --- TPOT at --time-scale ---------------------------------------------------------------
    let guide = |groups: u64| -> Arc<dyn Fn(usize, usize) -> String + Send + Sync> {
        Arc::new(move |w: usize, r: usize| {
            let g = w as u64 % groups;
            body(
                &guide_prompt(g, (w * 1000 + r) as u64 + 10, 6000, 1200),
                1000,
            )
        })
    };
    for (n, reference, source) in [
        (
            1usize,
            Some(0.0169),
            "seed guide: lightest-load request TPOT 16.9 ms (rate 10)",
        ),
        (
            16,
            Some(0.0235),
            "seed guide: mean TPOT 23.5 ms (rate 10, ≈18 streams)",
        ),
        (64, None, "no published Qwen3-32B figure at 64 streams"),
    ] {
        let cl = cluster(o.time_scale).await;
        let res = closed_loop(cl.addrs()[0], o.time_scale, n, o.rounds, guide(4)).await;
        let stats = cl.replicas()[0].stats();
        cl.shutdown().await;
        let tpots: Vec<f64> = res.iter().filter(|x| x.0 > 0).map(|x| x.1).collect();
        eprintln!(
            "{n} streams: {} requests measured, preemptions {}, resyncs {}, mean step lag {:.2} ms",
            tpots.len(),
            stats.preemptions,
            stats.resyncs,
            stats.mean_step_lag_s * 1e3
        );
        rows.push(Row {
            measure: format!(
                "TPOT, {n} stream{} (guide requests)",
                if n > 1 { "s" } else { "" }
            ),
            sim: mean(&tpots),
            reference,
            source,
        });
    }
    let nim = Arc::new(|w: usize, r: usize| {
        let mut p = String::new();
        random_words((w * 1000 + r) as u64 + 555_555, 5000, &mut p);
        body(&p, 500)
    });
    let cl = cluster(o.time_scale).await;
    let res = closed_loop(cl.addrs()[0], o.time_scale, 50, o.rounds.min(3), nim).await;
    cl.shutdown().await;
    let itl: Vec<f64> = res.iter().filter(|x| x.0 > 0).map(|x| x.1).collect();
    rows.push(Row {
        measure: "ITL, 50 streams, unique 5,000 in / 500 out".into(),
        sim: mean(&itl),
        reference: Some(0.05973),
        source: "NIM analog: Llama-3.3-70B FP8 TP2, concurrency 50",
    });

    println!();
    println!(
        "Fidelity of profile qwen3-32b-tp2-h100 (TTFT at time scale 1, TPOT at {}):",
        o.time_scale
    );
    println!();
    println!("| measure | simulated | published | diff | source |");
    println!("| --- | ---: | ---: | ---: | --- |");
    for r in rows {
        let (reference, diff) = match r.reference {
            Some(v) => (ms(v), format!("{:+.1} %", pct_diff(r.sim, v))),
            None => ("—".into(), "—".into()),
        };
        println!(
            "| {} | {} | {} | {} | {} |",
            r.measure,
            ms(r.sim),
            reference,
            diff,
            r.source
        );
    }
    let cached_in_range = (0.050..=0.140).contains(&mean(&cached));
    println!();
    println!(
        "cached-prefix TTFT {} the published 50–140 ms range",
        if cached_in_range {
            "is inside"
        } else {
            "is OUTSIDE"
        }
    );
}
