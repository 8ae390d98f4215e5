//! Bounded metric labels end to end: simulated vLLM replicas serving one base model and two
//! LoRA adapters, the EPP behind a real Envoy and its built-in proxy. Thousands of requests
//! naming made-up models (answered 404 by the replicas, as vLLM answers) are counted under
//! `model_name="other"` and never appear in `/metrics`; the base model and each adapter keep
//! their own series.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use support::*;

const ADAPTERS: [&str; 2] = ["sql-lora", "chat-lora"];

fn body(model: &str) -> String {
    serde_json::json!({"model": model, "prompt": "hello there", "max_tokens": 2}).to_string()
}

fn count_of(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn made_up_model_names_fold_into_other_and_adapters_keep_their_series() {
    let mut cfg = fast_replica().with_lora(2, 4);
    cfg.lora.modules = ADAPTERS
        .iter()
        .map(|a| (a.to_string(), format!("/adapters/{a}")))
        .collect();
    let stack = Stack::start(2, cfg, &[]).await;
    let real: Vec<&str> = std::iter::once(MODEL).chain(ADAPTERS).collect();

    // One request per real model first: a model is only known once a replica served it (or
    // lists it as a running adapter), so these may count as `other`.
    for m in &real {
        let r = post(
            stack.epp.proxy_addr.unwrap(),
            "/v1/completions",
            &[],
            &body(m),
        )
        .await;
        assert_eq!(r.status, 200, "{m}: {}", r.text());
    }
    // Made-up names through both front doors.
    let junk_per_door = [("envoy", 300u64), ("proxy", 2_000)];
    let c = client(false);
    for ((name, addr), (_, n)) in stack.doors().into_iter().zip(junk_per_door) {
        for i in 0..n {
            let h = [("content-type", "application/json")];
            let model = format!("made-up-{name}-{i}");
            let r = send(&c, "POST", addr, "/v1/completions", &h, full(body(&model))).await;
            assert_eq!(r.status, 404, "{name}: {}", r.text());
        }
    }
    // Five requests per real model and door.
    for (name, addr) in stack.doors() {
        for m in &real {
            for _ in 0..5 {
                let h = [("content-type", "application/json")];
                let r = send(&c, "POST", addr, "/v1/completions", &h, full(body(m))).await;
                assert_eq!(r.status, 200, "{name} {m}: {}", r.text());
            }
        }
    }

    let page = send(
        &c,
        "GET",
        stack.epp.metrics_addr,
        "/metrics",
        &[],
        full(Bytes::new()),
    )
    .await
    .text();
    assert!(page.len() < 1_000_000, "/metrics is {} bytes", page.len());
    assert!(!page.contains("made-up-"), "a made-up name leaked");
    let total = |m: &str, t: &str| {
        count_of(
            &page,
            &format!(
                "inference_objective_request_total{{model_name=\"{m}\",target_model_name=\"{t}\",priority=\"0\"}}"
            ),
        )
    };
    for m in &real {
        let n = total(m, m);
        assert!(
            (10..=11).contains(&n),
            "{m}: {n} requests under its own name\n{page}"
        );
    }
    let junk: u64 = junk_per_door.iter().map(|(_, n)| n).sum();
    let other = total("other", "other");
    assert!(
        (junk..=junk + real.len() as u64).contains(&other),
        "other = {other}, made-up requests = {junk}"
    );
    assert_eq!(
        count_of(
            &page,
            "inference_objective_request_error_total{model_name=\"other\",target_model_name=\"other\",error_code=\"ModelServerError\"}"
        ),
        junk
    );
    stack.shutdown().await;
}
