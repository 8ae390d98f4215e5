//! Prefill/decode disaggregation: a prefill replica holds a finished prefill's blocks, a decode
//! replica reads them over the prefill replica's side channel (real HTTP on loopback between
//! two simulated clusters) and decodes without recomputing the prompt; unread blocks expire and
//! a late read fails (or is recomputed, per policy).

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

mod common;

use std::time::{Duration, Instant};

use common::{HttpClient, client, fast, frames, post, request, scrape, start, words};
use llmsched_sim::pd::{LoadFailurePolicy, Role};
use llmsched_sim::{ReplicaConfig, SimCluster};
use serde_json::{Value, json};

const LBL: [(&str, &str); 2] = [("model_name", "Qwen/Qwen3-32B"), ("engine", "0")];
/// Qwen3-32B: 64 layers × 8 KV heads × 128 × 2 × 2 bytes per token, 16-token blocks.
const BLOCK_BYTES: f64 = 16.0 * 262_144.0;

fn role(cfg: ReplicaConfig, r: Role) -> ReplicaConfig {
    let mut cfg = cfg.with_role(r);
    cfg.pd.side_channel_port = 0;
    cfg
}

fn prefill_body(prompt: &str) -> String {
    json!({
        "prompt": prompt,
        "max_tokens": 1,
        "stream": false,
        "kv_transfer_params": {
            "do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
            "remote_block_ids": null, "remote_host": null, "remote_port": null
        }
    })
    .to_string()
}

fn decode_body(prompt: &str, max_tokens: u32, stream: bool, kv: &Value) -> String {
    let mut b = json!({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true, "stream": stream, "kv_transfer_params": kv});
    if stream {
        b["stream_options"] = json!({"include_usage": true});
    }
    b.to_string()
}

async fn metric(c: &HttpClient, cluster: &SimCluster, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape(c, cluster.addrs()[0]).await.value(name, labels)
}

/// Polls `/metrics` until `name` reaches `want` (generous deadline; nothing timed).
async fn wait_metric(c: &HttpClient, cluster: &SimCluster, name: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = metric(c, cluster, name, &[]).await;
        if v == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stuck at {v}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_holds_blocks_and_the_decoder_reads_them_instead_of_recomputing() {
    let p = start(role(fast(50.0), Role::Prefill)).await;
    let d = start(role(fast(50.0), Role::Decode)).await;
    let c = client();
    let prompt = words(0, 200);

    // 1. Prefill: one token, blocks held, kv_transfer_params returned.
    let r = post(&c, p.addrs()[0], "/v1/completions", &prefill_body(&prompt)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    let kv = body["kv_transfer_params"].clone();
    assert_eq!(kv["do_remote_prefill"], true);
    assert_eq!(kv["do_remote_decode"], false);
    assert_eq!(kv["remote_block_ids"].as_array().unwrap().len(), 13); // ceil(200 / 16)
    let ph = &p.replicas()[0];
    assert_eq!(kv["remote_engine_id"], ph.engine_id().unwrap());
    assert_eq!(kv["remote_host"], "127.0.0.1");
    assert_eq!(
        kv["remote_port"].as_u64().unwrap(),
        u64::from(ph.side_channel_addr().unwrap().port())
    );
    assert_eq!(kv["tp_size"], 2);
    assert!(kv["remote_request_id"].as_str().is_some());
    // vLLM's dict order.
    let text = r.text();
    let keys: Vec<&str> = text
        .split("\"kv_transfer_params\":{")
        .nth(1)
        .unwrap()
        .split(',')
        .filter_map(|f| f.split('"').nth(1))
        .filter(|k| k.starts_with("do_") || k.starts_with("remote_") || *k == "tp_size")
        .collect();
    assert_eq!(
        keys,
        [
            "do_remote_prefill",
            "do_remote_decode",
            "remote_block_ids",
            "remote_engine_id",
            "remote_request_id",
            "remote_host",
            "remote_port",
            "tp_size"
        ]
    );
    assert_eq!(body["usage"]["completion_tokens"], 1);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let pm = scrape(&c, p.addrs()[0]).await;
    assert_eq!(
        pm.value("llmsched_sim_kv_transfer_held_requests", &LBL),
        1.0
    );
    assert_eq!(pm.value("llmsched_sim_kv_transfer_held_blocks", &LBL), 13.0);
    // Held blocks are allocated, not free: usage stays above zero after the request ended.
    assert!(pm.value("vllm:kv_cache_usage_perc", &LBL) > 0.0);
    assert_eq!(pm.value("vllm:num_requests_running", &LBL), 0.0);
    assert_eq!(
        pm.value(
            "vllm:prompt_tokens_by_source_total",
            &[("source", "local_compute")]
        ),
        200.0
    );
    assert_eq!(
        pm.labels("llmsched_sim_info")["role"],
        "prefill",
        "role label"
    );

    // 2. Decode with those params: the prompt is read, not computed.
    let r = post(
        &c,
        d.addrs()[0],
        "/v1/completions",
        &decode_body(&prompt, 20, false, &kv),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["usage"]["prompt_tokens"], 200);
    assert_eq!(body["usage"]["completion_tokens"], 20);
    // vLLM: everything not computed locally counts as cached (transferred + local hits).
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 199);
    assert_eq!(body["kv_transfer_params"], Value::Null);
    let dm = scrape(&c, d.addrs()[0]).await;
    assert_eq!(dm.histogram("vllm:nixl_xfer_time_seconds").0, 1.0);
    assert_eq!(
        dm.histogram("vllm:nixl_bytes_transferred"),
        (1.0, 13.0 * BLOCK_BYTES)
    );
    assert_eq!(
        dm.histogram("vllm:nixl_num_descriptors"),
        (1.0, 13.0 * 2.0 * 64.0)
    );
    let (_, secs) = dm.histogram("vllm:nixl_xfer_time_seconds");
    // rdma-400g: 1 ms + 54.5 MB / (2 × 23.75 GB/s).
    assert!(
        (secs - (1e-3 + 13.0 * BLOCK_BYTES / 47.5e9)).abs() < 1e-9,
        "{secs}"
    );
    for (source, want) in [
        ("local_compute", 1.0),
        ("local_cache_hit", 0.0),
        ("external_kv_transfer", 199.0),
    ] {
        assert_eq!(
            dm.value("vllm:prompt_tokens_by_source_total", &[("source", source)]),
            want,
            "{source}"
        );
    }
    assert_eq!(dm.value("vllm:prompt_tokens_total", &LBL), 200.0);
    assert_eq!(
        dm.value("vllm:external_prefix_cache_queries_total", &LBL),
        200.0
    );
    assert_eq!(
        dm.value("vllm:external_prefix_cache_hits_total", &LBL),
        200.0
    );
    assert_eq!(dm.value("vllm:nixl_num_failed_transfers_total", &LBL), 0.0);
    assert_eq!(dm.value("vllm:generation_tokens_total", &LBL), 20.0);

    // 3. The prefill replica freed the blocks on the decoder's notification (sent after the
    //    decoder has the data, without waiting for an answer, as NIXL's).
    wait_metric(&c, &p, "llmsched_sim_kv_transfer_served_total", 1.0).await;
    let pm = scrape(&c, p.addrs()[0]).await;
    assert_eq!(
        pm.value("llmsched_sim_kv_transfer_held_requests", &LBL),
        0.0
    );
    assert_eq!(pm.value("llmsched_sim_kv_transfer_served_total", &LBL), 1.0);
    assert_eq!(pm.value("vllm:kv_cache_usage_perc", &LBL), 0.0);

    // 4. The transferred blocks are in the decoder's prefix cache.
    let plain = json!({"prompt": prompt, "max_tokens": 2, "ignore_eos": true}).to_string();
    let r = post(&c, d.addrs()[0], "/v1/completions", &plain).await;
    assert_eq!(
        r.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        192
    );
    p.shutdown().await;
    d.shutdown().await;
}

/// A decoder's read and its completion notification do not wait for the prefill replica's
/// current step: NIXL reads are one-sided and vLLM answers its side channel from another
/// thread, so a prefill replica busy with a long prompt still serves held blocks at once.
/// The prefill replica runs 10× slower than real time here, so its step for an 8,000-token
/// prompt lasts seconds of wall time; the decode of an earlier prefill (read, transferred,
/// decoded, blocks freed) completes while that step is still running (ordering, not timing:
/// with reads queued behind the step, the decode could not finish before the step does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_notifications_are_served_during_a_prefill_step() {
    let p = start(role(fast(0.1), Role::Prefill)).await;
    let d = start(role(fast(50.0), Role::Decode)).await;
    let c = client();
    let prompt = words(0, 64);
    let r = post(&c, p.addrs()[0], "/v1/completions", &prefill_body(&prompt)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let kv = r.json()["kv_transfer_params"].clone();

    // A long prompt occupies the prefill replica for one long step.
    let long = {
        let (c, addr, body) = (c.clone(), p.addrs()[0], prefill_body(&words(10_000, 8_000)));
        tokio::spawn(async move { post(&c, addr, "/v1/completions", &body).await })
    };
    wait_metric(&c, &p, "vllm:num_requests_running", 1.0).await;

    let r = post(
        &c,
        d.addrs()[0],
        "/v1/completions",
        &decode_body(&prompt, 4, false, &kv),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 4);
    let dm = scrape(&c, d.addrs()[0]).await;
    assert_eq!(dm.histogram("vllm:nixl_xfer_time_seconds").0, 1.0);
    wait_metric(&c, &p, "llmsched_sim_kv_transfer_served_total", 1.0).await;
    // The long prompt's step has not ended yet: it is still running, not answered.
    assert!(!long.is_finished(), "the 8,000-token prefill ended first");
    assert_eq!(metric(&c, &p, "vllm:num_requests_running", &LBL).await, 1.0);
    let r = long.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decoder_reads_only_what_its_prefix_cache_lacks() {
    let p = start(role(fast(50.0), Role::Prefill)).await;
    let d = start(role(fast(50.0), Role::Decode)).await;
    let c = client();
    let prefix = words(0, 200);
    let long = format!("{prefix} {}", words(500, 100));
    // The decoder already holds the first 12 full blocks (192 tokens) of the prompt.
    let plain = json!({"prompt": prefix, "max_tokens": 1}).to_string();
    assert_eq!(
        post(&c, d.addrs()[0], "/v1/completions", &plain)
            .await
            .status,
        200
    );

    let r = post(&c, p.addrs()[0], "/v1/completions", &prefill_body(&long)).await;
    let kv = r.json()["kv_transfer_params"].clone();
    assert_eq!(kv["remote_block_ids"].as_array().unwrap().len(), 19); // ceil(300 / 16)
    let r = post(
        &c,
        d.addrs()[0],
        "/v1/completions",
        &decode_body(&long, 5, false, &kv),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        299
    );
    let dm = scrape(&c, d.addrs()[0]).await;
    // 19 blocks minus the 12 found locally.
    assert_eq!(
        dm.histogram("vllm:nixl_bytes_transferred"),
        (1.0, 7.0 * BLOCK_BYTES)
    );
    let src = |s: &str| dm.value("vllm:prompt_tokens_by_source_total", &[("source", s)]);
    // The first (plain) request computed 200; this one 1, hit 192, got 107 by transfer.
    assert_eq!(src("local_compute"), 201.0);
    assert_eq!(src("local_cache_hit"), 192.0);
    assert_eq!(src("external_kv_transfer"), 107.0);
    assert_eq!(
        dm.value("vllm:external_prefix_cache_hits_total", &LBL),
        108.0
    );
    assert_eq!(dm.value("vllm:prompt_tokens_cached_total", &LBL), 299.0);
    wait_metric(&c, &p, "llmsched_sim_kv_transfer_held_requests", 0.0).await;
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_blocks_expire_and_a_late_read_errors_or_recomputes_per_policy() {
    let mut pcfg = role(fast(50.0), Role::Prefill);
    pcfg.pd.abort_timeout_s = 1.0;
    let p = start(pcfg).await;
    let d_fail = start(role(fast(50.0), Role::Decode)).await;
    let mut rcfg = role(fast(50.0), Role::Decode);
    rcfg.pd.failure_policy = LoadFailurePolicy::Recompute;
    let d_re = start(rcfg).await;
    let c = client();
    let prompt = words(7, 200);

    let r = post(&c, p.addrs()[0], "/v1/completions", &prefill_body(&prompt)).await;
    let kv = r.json()["kv_transfer_params"].clone();
    // Nobody reads them: the abort timeout frees them.
    wait_metric(&c, &p, "llmsched_sim_kv_transfer_expired_total", 1.0).await;
    let pm = scrape(&c, p.addrs()[0]).await;
    assert_eq!(pm.value("llmsched_sim_kv_transfer_held_blocks", &LBL), 0.0);
    assert_eq!(pm.value("vllm:kv_cache_usage_perc", &LBL), 0.0);

    // Policy fail (vLLM's default): HTTP 500, finish reason error.
    let r = post(
        &c,
        d_fail.addrs()[0],
        "/v1/completions",
        &decode_body(&prompt, 5, false, &kv),
    )
    .await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("could not be loaded"), "{}", r.text());
    let dm = scrape(&c, d_fail.addrs()[0]).await;
    assert_eq!(dm.value("vllm:nixl_num_failed_transfers_total", &LBL), 1.0);
    assert_eq!(
        dm.value("llmsched_sim_kv_transfer_errored_total", &LBL),
        1.0
    );
    assert_eq!(
        dm.value(
            "vllm:request_success_total",
            &[("finished_reason", "error")]
        ),
        1.0
    );
    assert_eq!(dm.value("vllm:num_requests_waiting", &LBL), 0.0);
    assert_eq!(dm.value("vllm:kv_cache_usage_perc", &LBL), 0.0);
    // Streaming: an error frame, then [DONE].
    let r = post(
        &c,
        d_fail.addrs()[0],
        "/v1/completions",
        &decode_body(&prompt, 5, true, &kv),
    )
    .await;
    assert_eq!(r.status, 200);
    let f = frames(&r.body);
    assert_eq!(f.len(), 2, "{f:?}");
    let err: Value = serde_json::from_str(&f[0]).unwrap();
    assert_eq!(err["error"]["code"], 500);
    assert_eq!(f[1], "[DONE]");

    // Policy recompute: served, the prompt computed locally.
    let r = post(
        &c,
        d_re.addrs()[0],
        "/v1/completions",
        &decode_body(&prompt, 5, false, &kv),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        0
    );
    assert_eq!(r.json()["usage"]["completion_tokens"], 5);
    let dm = scrape(&c, d_re.addrs()[0]).await;
    assert_eq!(dm.value("vllm:nixl_num_failed_transfers_total", &LBL), 1.0);
    assert_eq!(
        dm.value("llmsched_sim_kv_transfer_recomputed_total", &LBL),
        1.0
    );
    assert_eq!(
        dm.value(
            "vllm:prompt_tokens_by_source_total",
            &[("source", "local_compute")]
        ),
        200.0
    );
    p.shutdown().await;
    d_fail.shutdown().await;
    d_re.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_prefill_replica_fails_the_transfer() {
    let mut cfg = role(fast(50.0), Role::Decode);
    cfg.pd.failure_policy = LoadFailurePolicy::Recompute;
    let d = start(cfg).await;
    let c = client();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let kv = json!({"do_remote_prefill": true, "do_remote_decode": false, "remote_block_ids": [1, 2],
        "remote_engine_id": "e", "remote_request_id": "r", "remote_host": "127.0.0.1",
        "remote_port": dead, "tp_size": 2});
    let prompt = words(0, 20);
    let r = post(
        &c,
        d.addrs()[0],
        "/v1/completions",
        &decode_body(&prompt, 3, false, &kv),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let dm = scrape(&c, d.addrs()[0]).await;
    assert_eq!(dm.value("vllm:nixl_num_failed_transfers_total", &LBL), 1.0);
    assert_eq!(
        dm.value("llmsched_sim_kv_transfer_recomputed_total", &LBL),
        1.0
    );
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_side_channel_rejects_bad_input_with_reasons() {
    let p = start(role(fast(50.0), Role::Prefill)).await;
    let c = client();
    let side = p.replicas()[0].side_channel_addr().unwrap();
    let r = request(&c, "POST", side, "/nixl/read", "{not json", &[]).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("bad read request"), "{}", r.text());
    let unknown =
        json!({"remote_request_id": "nope", "remote_engine_id": "x", "num_blocks": 1}).to_string();
    let r = request(&c, "POST", side, "/nixl/read", &unknown, &[]).await;
    assert_eq!(r.status, 404);
    assert!(r.text().contains("no blocks held"), "{}", r.text());
    let r = request(&c, "GET", side, "/", "", &[]).await;
    assert_eq!(r.status, 404);
    let r = request(
        &c,
        "POST",
        side,
        "/nixl/notify",
        r#"{"remote_request_id":"nope"}"#,
        &[],
    )
    .await;
    assert_eq!(r.status, 404);

    let r = post(
        &c,
        p.addrs()[0],
        "/v1/completions",
        &prefill_body(&words(0, 40)),
    )
    .await;
    let kv = r.json()["kv_transfer_params"].clone();
    let wrong = json!({"remote_request_id": kv["remote_request_id"], "remote_engine_id": "other", "num_blocks": 1}).to_string();
    let r = request(&c, "POST", side, "/nixl/read", &wrong, &[]).await;
    assert_eq!(r.status, 409, "{}", r.text());
    // The right engine id reads the last blocks.
    let right = json!({"remote_request_id": kv["remote_request_id"], "remote_engine_id": kv["remote_engine_id"], "num_blocks": 2}).to_string();
    let r = request(&c, "POST", side, "/nixl/read", &right, &[]).await;
    assert_eq!(r.status, 200);
    let ids = kv["remote_block_ids"].as_array().unwrap();
    assert_eq!(
        r.json()["block_ids"].as_array().unwrap()[..],
        ids[ids.len() - 2..]
    );
    assert_eq!(r.json()["block_bytes"].as_f64().unwrap(), BLOCK_BYTES);
    let notify = json!({"remote_request_id": kv["remote_request_id"]}).to_string();
    let r = request(&c, "POST", side, "/nixl/notify", &notify, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["freed_blocks"], 3);
    let r = request(&c, "POST", side, "/nixl/notify", &notify, &[]).await;
    assert_eq!(r.status, 404);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_connector_kv_params_are_ignored_and_malformed_ones_rejected() {
    let both = start(fast(50.0)).await;
    let c = client();
    let prompt = words(0, 40);
    let r = post(
        &c,
        both.addrs()[0],
        "/v1/completions",
        &prefill_body(&prompt),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["kv_transfer_params"], Value::Null);
    let m = scrape(&c, both.addrs()[0]).await;
    assert_eq!(m.value("vllm:kv_cache_usage_perc", &LBL), 0.0);
    assert!(m.kind("llmsched_sim_kv_transfer_held_blocks").is_none());
    assert!(m.kind("vllm:nixl_xfer_time_seconds").is_none());
    let info = m.labels("llmsched_sim_info");
    assert_eq!(
        (info["role"].as_str(), info["kv_connector"].as_str()),
        ("both", "none")
    );
    for bad in [r#""yes""#, "[1]", "3"] {
        let body = format!(r#"{{"prompt":"a b","kv_transfer_params":{bad}}}"#);
        let r = post(&c, both.addrs()[0], "/v1/completions", &body).await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json()["error"]["param"], "kv_transfer_params");
    }
    both.shutdown().await;

    // A decoder given do_remote_prefill without the remote fields serves it locally.
    let d = start(role(fast(50.0), Role::Decode)).await;
    let kv = json!({"do_remote_prefill": true});
    let r = post(
        &c,
        d.addrs()[0],
        "/v1/completions",
        &decode_body(&prompt, 2, false, &kv),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let dm = scrape(&c, d.addrs()[0]).await;
    assert_eq!(
        dm.value(
            "vllm:prompt_tokens_by_source_total",
            &[("source", "local_compute")]
        ),
        40.0
    );
    assert_eq!(dm.histogram("vllm:nixl_xfer_time_seconds").0, 0.0);
    d.shutdown().await;
}
