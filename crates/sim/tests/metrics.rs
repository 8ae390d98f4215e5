//! `/metrics`: valid Prometheus text with vLLM's names, types and labels, moving as requests
//! are served.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

mod common;

use common::{client, fast, post, scrape, start, words};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_traffic() {
    let cluster = start(fast(50.0)).await;
    let addr = cluster.addrs()[0];
    let c = client();
    let m0 = scrape(&c, addr).await;
    let lbl = [("model_name", "Qwen/Qwen3-32B"), ("engine", "0")];
    for (family, kind) in [
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("vllm:prefix_cache_queries_total", "counter"),
        ("vllm:prefix_cache_hits_total", "counter"),
        ("vllm:prompt_tokens_total", "counter"),
        ("vllm:generation_tokens_total", "counter"),
        ("vllm:num_preemptions_total", "counter"),
        ("vllm:request_success_total", "counter"),
        ("vllm:time_to_first_token_seconds", "histogram"),
        ("vllm:inter_token_latency_seconds", "histogram"),
        ("vllm:e2e_request_latency_seconds", "histogram"),
        ("vllm:request_queue_time_seconds", "histogram"),
        ("vllm:request_prefill_time_seconds", "histogram"),
        ("vllm:request_decode_time_seconds", "histogram"),
        ("vllm:request_prompt_tokens", "histogram"),
        ("vllm:request_generation_tokens", "histogram"),
        ("vllm:cache_config_info", "gauge"),
    ] {
        assert_eq!(m0.kind(family), Some(kind), "{family}");
    }
    assert_eq!(m0.value("vllm:num_requests_running", &lbl), 0.0);
    assert_eq!(m0.value("vllm:generation_tokens_total", &lbl), 0.0);
    let info = m0.labels("vllm:cache_config_info");
    assert_eq!(info["block_size"], "16");
    assert_eq!(info["num_gpu_blocks"], "19208");
    assert_eq!(info["engine"], "0");
    assert!(!info.contains_key("model_name"));
    assert!(
        m0.kind("vllm:lora_requests_info").is_none(),
        "absent without LoRA"
    );
    // vLLM's TTFT bucket boundaries.
    let les: Vec<String> = m0
        .samples
        .iter()
        .filter(|s| s.name == "vllm:time_to_first_token_seconds_bucket")
        .map(|s| s.labels["le"].clone())
        .collect();
    assert_eq!(les.first().map(String::as_str), Some("0.001"));
    assert!(les.contains(&"2560.0".to_string()) && les.len() == 23);

    // Two identical requests of 50 prompt tokens and 10 output tokens.
    let body = format!(
        r#"{{"prompt":"{}","max_tokens":10,"ignore_eos":true}}"#,
        words(3, 50)
    );
    for _ in 0..2 {
        assert_eq!(post(&c, addr, "/v1/completions", &body).await.status, 200);
    }
    let m1 = scrape(&c, addr).await;
    assert_eq!(m1.value("vllm:prompt_tokens_total", &lbl), 100.0);
    assert_eq!(m1.value("vllm:generation_tokens_total", &lbl), 20.0);
    assert_eq!(m1.value("vllm:prefix_cache_queries_total", &lbl), 100.0);
    assert_eq!(m1.value("vllm:prefix_cache_hits_total", &lbl), 48.0);
    assert_eq!(
        m1.value(
            "vllm:request_success_total",
            &[("finished_reason", "length")]
        ),
        2.0
    );
    assert_eq!(
        m1.value("vllm:request_success_total", &[("finished_reason", "stop")]),
        0.0
    );
    assert_eq!(m1.histogram("vllm:time_to_first_token_seconds").0, 2.0);
    assert_eq!(m1.histogram("vllm:inter_token_latency_seconds").0, 18.0);
    assert_eq!(m1.histogram("vllm:request_generation_tokens"), (2.0, 20.0));
    assert_eq!(m1.histogram("vllm:request_prompt_tokens"), (2.0, 100.0));
    let (n, e2e) = m1.histogram("vllm:e2e_request_latency_seconds");
    assert_eq!(n, 2.0);
    // Ten steps of at least the step overhead each, in simulated seconds.
    assert!(e2e > 2.0 * 10.0 * 0.015, "{e2e}");
    assert_eq!(m1.value("vllm:kv_cache_usage_perc", &lbl), 0.0);
    assert!(m1.value("llmsched_sim_steps_total", &[]) >= 20.0);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_show_running_waiting_and_kv_usage_mid_flight() {
    let cluster = start(fast(5.0).with_max_num_seqs(1)).await;
    let addr = cluster.addrs()[0];
    let c = client();
    let body = format!(
        r#"{{"prompt":"{}","max_tokens":4000,"ignore_eos":true,"stream":true}}"#,
        words(0, 320)
    );
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (c, body) = (c.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            post(&c, addr, "/v1/completions", &body).await
        }));
    }
    let lbl = [("model_name", "Qwen/Qwen3-32B"), ("engine", "0")];
    let mut seen = false;
    for _ in 0..2000 {
        let m = scrape(&c, addr).await;
        if m.value("vllm:num_requests_running", &lbl) == 1.0
            && m.value("vllm:num_requests_waiting", &lbl) == 1.0
        {
            let usage = m.value("vllm:kv_cache_usage_perc", &lbl);
            // At least the 320-token prompt's 20 blocks of 19,208 are in use.
            assert!((20.0 / 19_208.0..0.01).contains(&usage), "{usage}");
            assert_eq!(
                m.value("vllm:kv_cache_usage_perc", &lbl),
                m.value("vllm:gpu_cache_usage_perc", &lbl)
            );
            seen = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(seen);
    for t in tasks {
        t.abort();
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_requests_info_reports_adapters_and_time() {
    let mut cfg = fast(5.0).with_lora(2, 2);
    cfg.lora.modules = vec![("sql".into(), "/sql".into())];
    let cluster = start(cfg).await;
    let addr = cluster.addrs()[0];
    let c = client();
    let body =
        r#"{"model":"sql","prompt":"a b","max_tokens":3000,"ignore_eos":true,"stream":true}"#;
    let task = {
        let c = c.clone();
        tokio::spawn(async move { post(&c, addr, "/v1/completions", body).await })
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let mut seen = false;
    for _ in 0..2000 {
        let m = scrape(&c, addr).await;
        let l = m.labels("vllm:lora_requests_info");
        if l["running_lora_adapters"] == "sql" {
            assert_eq!(l["max_lora"], "2");
            assert_eq!(l["waiting_lora_adapters"], "");
            let v = m.value("vllm:lora_requests_info", &[]);
            assert!(
                (v - now).abs() < 600.0,
                "value is the Unix time of the update: {v}"
            );
            seen = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(seen);
    task.abort();
    cluster.shutdown().await;
}
