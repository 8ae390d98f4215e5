//! The OpenAI API as clients see it, over real HTTP on loopback: exact SSE bytes, usage,
//! errors, failure injection, LoRA management and the endpoints peer routers probe.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

mod common;

use common::{client, fast, frames, get, post, request, start, words};
use llmsched_sim::engine::output_token;
use llmsched_sim::{ClusterConfig, SimCluster};
use llmsched_tokenizer::SimTokenizer;

const VOCAB: u32 = SimTokenizer::DEFAULT_VOCAB;

fn word(id: u32) -> String {
    let mut s = String::new();
    SimTokenizer::default().write_word(id, &mut s);
    s
}

fn created_of(frame: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(frame).unwrap();
    v["created"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_stream_is_byte_exact_and_reports_cached_tokens() {
    let cluster = start(fast(50.0)).await;
    let addr = cluster.addrs()[0];
    let c = client();
    let prompt = words(100, 40);
    let body = format!(
        r#"{{"model":"Qwen/Qwen3-32B","prompt":"{prompt}","max_tokens":4,"stream":true,"ignore_eos":true,"seed":7,"stream_options":{{"include_usage":true}}}}"#
    );
    for (round, cached) in [(0, 0), (1, 32)] {
        let id = format!("req{round}");
        let r = request(
            &c,
            "POST",
            addr,
            "/v1/completions",
            &body,
            &[("x-request-id", &id)],
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.headers.get("content-type").unwrap(),
            "text/event-stream; charset=utf-8"
        );
        let created = created_of(&frames(&r.body)[0]);
        let head = format!(
            "data: {{\"id\":\"cmpl-{id}\",\"object\":\"text_completion\",\"created\":{created},\"model\":\"Qwen/Qwen3-32B\""
        );
        let mut expected = String::new();
        for i in 0..4 {
            let finish = if i == 3 { "\"length\"" } else { "null" };
            expected.push_str(&format!(
                "{head},\"choices\":[{{\"index\":0,\"text\":\" {}\",\"logprobs\":null,\"finish_reason\":{finish},\"stop_reason\":null,\"prompt_token_ids\":null,\"token_ids\":null}}]}}\n\n",
                word(output_token(7, i, VOCAB))
            ));
        }
        // 40 prompt tokens: the repeat reuses floor((40 - 1) / 16) = 2 full blocks.
        expected.push_str(&format!(
            "{head},\"choices\":[],\"usage\":{{\"prompt_tokens\":40,\"total_tokens\":44,\"completion_tokens\":4,\"prompt_tokens_details\":{{\"cached_tokens\":{cached}}}}}}}\n\n"
        ));
        expected.push_str("data: [DONE]\n\n");
        assert_eq!(r.text(), expected, "round {round}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_is_byte_exact() {
    let cluster = start(fast(50.0)).await;
    let addr = cluster.addrs()[0];
    let c = client();
    let body = r#"{"model":"Qwen/Qwen3-32B","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hello there"}],"max_tokens":3,"stream":true,"seed":11,"stream_options":{}}"#;
    let r = request(
        &c,
        "POST",
        addr,
        "/v1/chat/completions",
        body,
        &[("x-request-id", "c1")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let created = created_of(&frames(&r.body)[0]);
    let head = format!(
        "data: {{\"id\":\"chatcmpl-c1\",\"object\":\"chat.completion.chunk\",\"created\":{created},\"model\":\"Qwen/Qwen3-32B\""
    );
    let mut expected = format!(
        "{head},\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}],\"prompt_token_ids\":null,\"prompt_text\":null}}\n\n"
    );
    for i in 0..3 {
        let text = if i == 0 {
            word(output_token(11, i, VOCAB))
        } else {
            format!(" {}", word(output_token(11, i, VOCAB)))
        };
        let finish = if i == 2 {
            "\"length\",\"stop_reason\":null"
        } else {
            "null"
        };
        expected.push_str(&format!(
            "{head},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\"logprobs\":null,\"finish_reason\":{finish},\"token_ids\":null}}]}}\n\n"
        ));
    }
    // "system be brief\nuser hello there\nassistant" = 7 tokens; stream_options {} means
    // include_usage = true, as in vLLM.
    expected.push_str(&format!(
        "{head},\"choices\":[],\"usage\":{{\"prompt_tokens\":7,\"total_tokens\":10,\"completion_tokens\":3,\"prompt_tokens_details\":{{\"cached_tokens\":0}}}}}}\n\n"
    ));
    expected.push_str("data: [DONE]\n\n");
    assert_eq!(r.text(), expected);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_responses_carry_text_and_usage() {
    let cluster = start(fast(50.0)).await;
    let addr = cluster.addrs()[0];
    let c = client();
    let r = post(
        &c,
        addr,
        "/v1/completions",
        r#"{"prompt":[1,2,3,4,5],"max_tokens":6,"seed":3}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let text = v["choices"][0]["text"].as_str().unwrap();
    let expected: String = (0..6)
        .map(|i| format!(" {}", word(output_token(3, i, VOCAB))))
        .collect();
    assert_eq!(text, expected);
    assert_eq!(
        SimTokenizer::count(text),
        6,
        "the text re-tokenizes to completion_tokens"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["completion_tokens"], 6);
    assert_eq!(v["usage"]["total_tokens"], 11);
    // Default max_tokens for completions is 16, as in vLLM.
    let r = post(&c, addr, "/v1/completions", r#"{"prompt":"x y z"}"#).await;
    assert_eq!(r.json()["usage"]["completion_tokens"], 16);

    let r = post(
        &c,
        addr,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}],"max_completion_tokens":2}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        SimTokenizer::count(v["choices"][0]["message"]["content"].as_str().unwrap()),
        2
    );
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_vllm_shaped_errors() {
    let cluster = start(fast(50.0).with_max_model_len(64)).await;
    let addr = cluster.addrs()[0];
    let c = client();
    let check = |r: common::Reply, status: u16, needle: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        let v = r.json();
        assert_eq!(v["error"]["code"], status);
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
        assert!(v["error"]["type"].as_str().unwrap().ends_with("Error"));
    };
    check(
        post(&c, addr, "/v1/completions", "{\"prompt\": ").await,
        400,
        "JSON decode error",
    );
    check(
        post(&c, addr, "/v1/completions", r#"{"model":"Qwen/Qwen3-32B"}"#).await,
        400,
        "prompt",
    );
    check(
        post(
            &c,
            addr,
            "/v1/chat/completions",
            r#"{"model":"Qwen/Qwen3-32B"}"#,
        )
        .await,
        400,
        "messages",
    );
    let long = format!(r#"{{"prompt":"{}"}}"#, words(0, 64));
    check(
        post(&c, addr, "/v1/completions", &long).await,
        400,
        "maximum context length is 64",
    );
    let big = format!(r#"{{"prompt":"{}","max_tokens":40}}"#, words(0, 30));
    check(
        post(&c, addr, "/v1/completions", &big).await,
        400,
        "too large: 40",
    );
    check(
        post(
            &c,
            addr,
            "/v1/completions",
            r#"{"model":"gpt-x","prompt":"a"}"#,
        )
        .await,
        404,
        "`gpt-x` does not exist",
    );
    check(
        post(
            &c,
            addr,
            "/v1/completions",
            r#"{"prompt":"a","max_tokens":-3}"#,
        )
        .await,
        400,
        "at least 1",
    );
    let r = get(&c, addr, "/v1/completions").await;
    assert_eq!(r.status, 405);
    let r = get(&c, addr, "/nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["detail"], "Not Found");
    // Bad requests never reach the engine.
    assert_eq!(cluster.replicas()[0].stats().finished, 0);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_can_be_injected_by_header_and_by_rate() {
    let cluster = start(fast(50.0)).await;
    let addr = cluster.addrs()[0];
    let c = client();
    let body = r#"{"prompt":"a b","max_tokens":1}"#;
    let r = request(
        &c,
        "POST",
        addr,
        "/v1/completions",
        body,
        &[("x-sim-return-error", "503")],
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], 503);
    let r = request(
        &c,
        "POST",
        addr,
        "/v1/completions",
        body,
        &[("x-return-error", "429")],
    )
    .await;
    assert_eq!(r.status, 429);
    let r = request(
        &c,
        "POST",
        addr,
        "/v1/completions",
        body,
        &[("x-sim-return-error", "200")],
    )
    .await;
    assert_eq!(r.status, 400, "only 4xx/5xx can be injected");
    let r = request(
        &c,
        "POST",
        addr,
        "/v1/completions",
        body,
        &[("x-sim-extra-latency-ms", "abc")],
    )
    .await;
    assert_eq!(r.status, 400);
    // Extra latency shows up in simulated TTFT: 500 ms more than the frontend + one step.
    let r = request(
        &c,
        "POST",
        addr,
        "/v1/completions",
        body,
        &[("x-sim-extra-latency-ms", "500")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = cluster.replicas()[0].metrics();
    assert_eq!(m.ttft.count(), 1);
    assert!(m.ttft.sum() >= 0.5, "ttft {}", m.ttft.sum());
    cluster.shutdown().await;

    let mut cfg = fast(50.0);
    cfg.failure.rate = 1.0;
    cfg.failure.statuses = vec![500, 429];
    let cluster = start(cfg).await;
    let addr = cluster.addrs()[0];
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let r = post(&c, addr, "/v1/completions", body).await;
        seen.insert(r.status);
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Injected")
        );
    }
    assert_eq!(seen, [429, 500].into_iter().collect());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_and_peer_router_endpoints() {
    let cluster = start(fast(50.0)).await;
    let addr = cluster.addrs()[0];
    let c = client();
    assert_eq!(get(&c, addr, "/health").await.status, 200);
    assert_eq!(get(&c, addr, "/health_generate").await.status, 200);
    let v = get(&c, addr, "/v1/models").await.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "Qwen/Qwen3-32B");
    assert_eq!(v["data"][0]["owned_by"], "vllm");
    assert_eq!(v["data"][0]["max_model_len"], 40_960);
    let v = get(&c, addr, "/get_model_info").await.json();
    assert_eq!(v["model_path"], "Qwen/Qwen3-32B");
    assert_eq!(v["is_generation"], true);
    let v = get(&c, addr, "/get_server_info").await.json();
    assert_eq!(v["max_total_num_tokens"], 307_328);
    assert_eq!(v["page_size"], 16);
    let v = post(&c, addr, "/tokenize", r#"{"prompt":"a b c"}"#)
        .await
        .json();
    assert_eq!(v["count"], 3);
    assert_eq!(v["tokens"], serde_json::json!([0, 1, 2]));
    assert_eq!(post(&c, addr, "/flush_cache", "").await.status, 200);
    assert!(get(&c, addr, "/version").await.json()["version"].is_string());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_waiting_queue_answers_429() {
    // One sequence at a time, one request may wait: the third concurrent request is refused.
    let cfg = fast(1.0).with_max_num_seqs(1).with_max_waiting(1);
    let cluster = start(cfg).await;
    let addr = cluster.addrs()[0];
    let c = client();
    let long = r#"{"prompt":"a b c","max_tokens":5000,"ignore_eos":true,"stream":true}"#;
    let mut streams = Vec::new();
    for _ in 0..2 {
        let c = c.clone();
        streams.push(tokio::spawn(async move {
            post(&c, addr, "/v1/completions", long).await
        }));
    }
    // Wait until one runs and one waits (a condition, not a timing).
    let replica = &cluster.replicas()[0];
    loop {
        let s = replica.cache_snapshot().await.unwrap();
        if s.running == 1 && s.waiting == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let r = post(
        &c,
        addr,
        "/v1/completions",
        r#"{"prompt":"a","max_tokens":1}"#,
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("waiting")
    );
    for s in &streams {
        s.abort();
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_bind_distinct_loopback_ips() {
    let cfg = ClusterConfig::new(
        vec![
            "127.0.0.2:0".parse().unwrap(),
            "127.0.0.3:0".parse().unwrap(),
        ],
        fast(50.0),
    );
    let cluster = SimCluster::start(cfg).await.unwrap();
    let addrs = cluster.addrs();
    assert_eq!(addrs[0].ip().to_string(), "127.0.0.2");
    assert_eq!(addrs[1].ip().to_string(), "127.0.0.3");
    assert!(addrs.iter().all(|a| a.port() != 0));
    let c = client();
    for a in addrs {
        let r = post(
            &c,
            a,
            "/v1/completions",
            r#"{"prompt":"hi","max_tokens":2}"#,
        )
        .await;
        assert_eq!(r.status, 200);
    }
    // Each replica has its own engine.
    assert!(cluster.replicas().iter().all(|r| r.stats().finished == 1));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_adapters_load_serve_and_unload() {
    let cluster = start(fast(50.0).with_lora(1, 2)).await;
    let addr = cluster.addrs()[0];
    let c = client();
    let sql_req = r#"{"model":"sql","prompt":"select all","max_tokens":2}"#;
    assert_eq!(post(&c, addr, "/v1/completions", sql_req).await.status, 404);
    let r = post(
        &c,
        addr,
        "/v1/load_lora_adapter",
        r#"{"lora_name":"sql","lora_path":"/adapters/sql"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("added successfully"));
    let r = post(
        &c,
        addr,
        "/v1/load_lora_adapter",
        r#"{"lora_name":"sql","lora_path":"/x"}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    let r = post(&c, addr, "/v1/load_lora_adapter", r#"{"lora_name":"chat"}"#).await;
    assert_eq!(r.status, 400, "lora_path is required");
    assert_eq!(
        post(
            &c,
            addr,
            "/v1/load_lora_adapter",
            r#"{"lora_name":"chat","lora_path":"/c"}"#
        )
        .await
        .status,
        200
    );
    let r = post(
        &c,
        addr,
        "/v1/load_lora_adapter",
        r#"{"lora_name":"third","lora_path":"/t"}"#,
    )
    .await;
    assert_eq!(r.status, 400, "max_cpu_loras = 2");
    let models = get(&c, addr, "/v1/models").await.json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["Qwen/Qwen3-32B", "sql", "chat"]);
    assert_eq!(models["data"][1]["parent"], "Qwen/Qwen3-32B");
    assert_eq!(models["data"][1]["root"], "/adapters/sql");
    let r = post(&c, addr, "/v1/completions", sql_req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], "sql");
    assert_eq!(
        post(
            &c,
            addr,
            "/v1/unload_lora_adapter",
            r#"{"lora_name":"sql"}"#
        )
        .await
        .status,
        200
    );
    assert_eq!(
        post(
            &c,
            addr,
            "/v1/unload_lora_adapter",
            r#"{"lora_name":"sql"}"#
        )
        .await
        .status,
        404
    );
    assert_eq!(post(&c, addr, "/v1/completions", sql_req).await.status, 404);
    cluster.shutdown().await;

    // Without --enable-lora the management API refuses politely.
    let cluster = start(fast(50.0)).await;
    let r = post(
        &c,
        cluster.addrs()[0],
        "/v1/load_lora_adapter",
        r#"{"lora_name":"a","lora_path":"/a"}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("not enabled"));
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_missing_hf_tokenizer_is_a_startup_error() {
    let mut cfg = fast(50.0);
    cfg.tokenizer = llmsched_sim::TokenizerChoice::HuggingFace("/nonexistent/tok.json".into());
    let err = SimCluster::start(ClusterConfig::new(
        vec!["127.0.0.1:0".parse().unwrap()],
        cfg,
    ))
    .await
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/tok.json"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hf_tokenizer_and_its_chat_template_are_used_for_prompts() {
    use llmsched_tokenizer::{ChatTemplate, HfTokenizer, Tokenizer};
    let dir = tempfile::tempdir().unwrap();
    llmsched_tokenizer::testing::write_bpe_tokenizer(dir.path(), 400).unwrap();
    let template = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({ "chat_template": template }).to_string(),
    )
    .unwrap();
    let mut cfg = fast(50.0);
    cfg.tokenizer = llmsched_sim::TokenizerChoice::HuggingFace(dir.path().to_path_buf());
    let cluster = start(cfg).await;
    let addr = cluster.addrs()[0];
    let c = client();
    let hf = HfTokenizer::from_path(dir.path()).unwrap();
    let rendered = ChatTemplate::from_source(template, "", "")
        .unwrap()
        .render(
            [
                ("system", "be brief"),
                ("user", "what is the capital of France?"),
            ],
            true,
        )
        .unwrap();
    let expected = hf.encode(&rendered).unwrap().len();
    let r = post(
        &c,
        addr,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"what is the capital of France?"}],"max_tokens":3}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["prompt_tokens"], expected);
    let text = "the quick brown fox";
    let r = post(
        &c,
        addr,
        "/v1/completions",
        &format!(r#"{{"prompt":"{text}","max_tokens":2}}"#),
    )
    .await;
    assert_eq!(
        r.json()["usage"]["prompt_tokens"],
        hf.encode(text).unwrap().len()
    );
    cluster.shutdown().await;
}
