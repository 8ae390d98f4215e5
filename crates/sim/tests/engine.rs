//! Engine behaviour observed through the API and the simulated clock: prefix-cache
//! accounting, isolation between models/adapters/salts, queueing at `max_num_seqs`,
//! preemption under KV pressure, chunked prefill and the step-time model.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

mod common;

use common::{client, fast, post, start, words};
use llmsched_sim::StepShape;

async fn cached_tokens(c: &common::HttpClient, addr: std::net::SocketAddr, body: &str) -> u64 {
    let r = post(c, addr, "/v1/completions", body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_prompts_report_their_full_blocks_cached() {
    let cluster = start(fast(50.0).with_lora(2, 2)).await;
    let addr = cluster.addrs()[0];
    let c = client();
    let prompt = words(7, 100); // 100 tokens = 6 full blocks + 4
    let body = |extra: &str| format!(r#"{{"prompt":"{prompt}","max_tokens":2{extra}}}"#);
    assert_eq!(cached_tokens(&c, addr, &body("")).await, 0);
    assert_eq!(cached_tokens(&c, addr, &body("")).await, 96);
    // Same prefix, different tail: the shared full blocks are found.
    let longer = format!(
        r#"{{"prompt":"{prompt} {}","max_tokens":2}}"#,
        words(5000, 40)
    );
    assert_eq!(cached_tokens(&c, addr, &longer).await, 96);
    // A cache salt changes the first block's hash, hence the whole chain.
    let salted = body(r#","cache_salt":"tenant-a""#);
    assert_eq!(cached_tokens(&c, addr, &salted).await, 0);
    assert_eq!(cached_tokens(&c, addr, &salted).await, 96);
    // A LoRA adapter never shares blocks with the base model, nor with another adapter.
    for name in ["a", "b"] {
        let r = post(
            &c,
            addr,
            "/v1/load_lora_adapter",
            &format!(r#"{{"lora_name":"{name}","lora_path":"/{name}"}}"#),
        )
        .await;
        assert_eq!(r.status, 200);
    }
    let lora = |n: &str| format!(r#"{{"model":"{n}","prompt":"{prompt}","max_tokens":2}}"#);
    assert_eq!(cached_tokens(&c, addr, &lora("a")).await, 0);
    assert_eq!(cached_tokens(&c, addr, &lora("b")).await, 0);
    assert_eq!(cached_tokens(&c, addr, &lora("a")).await, 96);
    // Flushing the cache forgets everything.
    assert_eq!(post(&c, addr, "/flush_cache", "").await.status, 200);
    assert_eq!(cached_tokens(&c, addr, &body("")).await, 0);
    // A prompt of exactly 6 blocks: at least one token is recomputed, so 5 blocks hit.
    let exact = format!(r#"{{"prompt":"{}","max_tokens":1}}"#, words(9000, 96));
    assert_eq!(cached_tokens(&c, addr, &exact).await, 0);
    assert_eq!(cached_tokens(&c, addr, &exact).await, 80);
    cluster.shutdown().await;

    // Another replica (same model, different process state) starts cold.
    let other = start(fast(50.0)).await;
    assert_eq!(cached_tokens(&c, other.addrs()[0], &body("")).await, 0);
    other.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_queue_once_max_num_seqs_run() {
    let cluster = start(fast(10.0).with_max_num_seqs(2)).await;
    let addr = cluster.addrs()[0];
    let replica = &cluster.replicas()[0];
    let c = client();
    let body = r#"{"prompt":"a b c d","max_tokens":200,"ignore_eos":true}"#;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            post(&c, addr, "/v1/completions", body).await
        }));
    }
    let mut saw_queue = false;
    for _ in 0..2000 {
        let s = replica.cache_snapshot().await.unwrap();
        assert!(s.running <= 2, "never more than max_num_seqs running");
        if s.running == 2 && s.waiting == 1 {
            saw_queue = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    assert!(saw_queue, "the third request should wait while two run");
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.json()["usage"]["completion_tokens"], 200);
    }
    // The waiting request was admitted only when a running one finished: its queue time is at
    // least 200 decode steps, each of which takes more than the step overhead.
    let m = replica.metrics();
    let t0 = replica.config().step.overhead_s;
    assert_eq!(m.queue.count(), 3);
    assert!(m.queue.sum() > 200.0 * t0, "queue time {}", m.queue.sum());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_pressure_preempts_and_every_request_still_completes() {
    // 40 blocks × 16 = 640 tokens; four requests need 4 × (100 + 400) tokens.
    let cfg = fast(50.0).with_num_gpu_blocks(40).with_max_model_len(600);
    let cluster = start(cfg).await;
    let addr = cluster.addrs()[0];
    let c = client();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let c = c.clone();
        let body = format!(
            r#"{{"prompt":"{}","max_tokens":400,"ignore_eos":true}}"#,
            words(1000 * (i + 1), 100)
        );
        tasks.push(tokio::spawn(async move {
            post(&c, addr, "/v1/completions", &body).await
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["usage"]["completion_tokens"], 400);
    }
    let m = cluster.replicas()[0].metrics();
    assert!(m.preemptions > 0, "the cache cannot hold all four");
    assert_eq!(m.success[1], 4);
    let snap = cluster.replicas()[0].cache_snapshot().await.unwrap();
    assert_eq!(snap.usage, 0.0, "all blocks released");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timings_follow_the_step_model_in_simulated_seconds() {
    // One request alone: prefill of 3,000 tokens in chunks of 1,024 (3 steps), then 1 decode
    // step per token. Reported timings are simulated seconds, whatever the time scale.
    let mut cfg = fast(20.0).with_max_num_batched_tokens(1024);
    cfg.frontend.overhead_s = 0.0;
    cfg.frontend.per_prompt_token_s = 0.0;
    let step = cfg.step;
    let cluster = start(cfg).await;
    let addr = cluster.addrs()[0];
    let c = client();
    let body = format!(
        r#"{{"prompt":"{}","max_tokens":50,"ignore_eos":true}}"#,
        words(0, 3000)
    );
    let r = post(&c, addr, "/v1/completions", &body).await;
    assert_eq!(r.status, 200);
    let chunk = |c: u64, n: u64| StepShape {
        prefill_tokens: n,
        prefill_attn_pairs: n as f64 * (c as f64 + n as f64 / 2.0),
        ..Default::default()
    };
    let prefill = step.step_time(&chunk(0, 1024))
        + step.step_time(&chunk(1024, 1024))
        + step.step_time(&chunk(2048, 952));
    let decode: f64 = (1..50)
        .map(|i| {
            step.step_time(&StepShape {
                decode_seqs: 1,
                decode_kv_tokens: 3000 + i,
                ..Default::default()
            })
        })
        .sum();
    let m = cluster.replicas()[0].metrics();
    let stats = cluster.replicas()[0].stats();
    // The engine's timeline is exact unless it had to re-synchronise with the wall clock.
    if stats.resyncs == 0 {
        assert!(
            (m.prefill.sum() - prefill).abs() < 1e-9,
            "{} vs {prefill}",
            m.prefill.sum()
        );
        assert!(
            (m.decode.sum() - decode).abs() < 1e-9,
            "{} vs {decode}",
            m.decode.sum()
        );
        assert!(m.ttft.sum() >= prefill);
    } else {
        assert!(m.prefill.sum() >= prefill && m.decode.sum() >= decode);
    }
    assert_eq!(m.itl.count(), 49);
    assert_eq!(m.iteration_tokens.count(), 3 + 49);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eos_mean_gives_variable_lengths_unless_ignore_eos() {
    let mut cfg = fast(50.0);
    cfg.eos_mean_tokens = 20;
    let cluster = start(cfg).await;
    let addr = cluster.addrs()[0];
    let c = client();
    let mut lengths = std::collections::BTreeSet::new();
    for i in 0..8 {
        let r = post(
            &c,
            addr,
            "/v1/completions",
            &format!(r#"{{"prompt":"{}","max_tokens":500}}"#, words(i * 10, 5)),
        )
        .await;
        let v = r.json();
        let n = v["usage"]["completion_tokens"].as_u64().unwrap();
        assert_eq!(
            v["choices"][0]["finish_reason"],
            if n < 500 { "stop" } else { "length" }
        );
        lengths.insert(n);
    }
    assert!(lengths.len() > 1, "{lengths:?}");
    let r = post(
        &c,
        addr,
        "/v1/completions",
        r#"{"prompt":"q","max_tokens":300,"ignore_eos":true}"#,
    )
    .await;
    assert_eq!(r.json()["usage"]["completion_tokens"], 300);
    cluster.shutdown().await;
}
