//! `--max-request-body-bytes` end to end: a real Envoy in front of the EPP (ext_proc in
//! full-duplex streamed mode) and the EPP's built-in proxy answer a body over the limit with
//! 413 `inference error: PayloadTooLarge - ...`, whether `content-length` announces it or it
//! arrives chunked, route nothing, and keep serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use bytes::Bytes;
use support::*;

const LIMIT: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_over_the_limit_are_413_on_both_front_doors() {
    let limit = format!("--max-request-body-bytes={LIMIT}");
    let stack = Stack::start(2, fast_replica(), &[limit.as_str()]).await;
    let over = Bytes::from(completion(&big_prompt(3, LIMIT + 10_000), 4, false));
    let under = Bytes::from(completion(&big_prompt(4, LIMIT - 10_000), 4, false));
    assert!(over.len() > LIMIT && under.len() < LIMIT);
    let expected = format!(
        "inference error: PayloadTooLarge - request body is larger than the limit of {LIMIT} bytes"
    );
    for door in stack.doors() {
        let (name, addr) = door;
        let before = stack.dispatched();
        for (how, body) in [
            ("content-length", full(over.clone())),
            ("chunked", chunked(over.clone(), 64 * 1024)),
        ] {
            let h = [("content-type", "application/json")];
            let r = send(&client(false), "POST", addr, "/v1/completions", &h, body).await;
            assert_eq!(r.status, 413, "{name} {how}: {}", r.text());
            assert_eq!(r.text(), expected, "{name} {how}");
        }
        assert_eq!(
            grown(&before, &stack.dispatched()),
            Default::default(),
            "{name}: nothing over the limit is routed"
        );
        // Still serving, just under the limit, in one piece and chunked.
        for body in [full(under.clone()), chunked(under.clone(), 64 * 1024)] {
            let h = [("content-type", "application/json")];
            let r = send(&client(false), "POST", addr, "/v1/completions", &h, body).await;
            assert_eq!(r.status, 200, "{name}: {}", r.text());
        }
    }
    let metrics = send(
        &client(false),
        "GET",
        stack.epp.metrics_addr,
        "/metrics",
        &[],
        full(Bytes::new()),
    )
    .await
    .text();
    assert!(
        metrics.contains("error_code=\"PayloadTooLarge\"} 4"),
        "two refusals per front door:\n{metrics}"
    );
    stack.shutdown().await;
}

/// A response whose model name must be rewritten back is held for the rewrite only up to the
/// limit: a larger one reaches the client whole and unchanged through both front doors
/// (Envoy + ext_proc, and the built-in proxy, which used to answer 503 here), and a small
/// one is still rewritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rewritten_response_over_the_limit_passes_through_unchanged_on_both_front_doors() {
    const SMALL_LIMIT: usize = 4096;
    let limit = format!("--max-request-body-bytes={SMALL_LIMIT}");
    let mut replica = fast_replica().with_lora(1, 1);
    replica.lora.modules = vec![("adapter-x".into(), "/adapters/x".into())];
    let stack = Stack::start(1, replica, &[limit.as_str()]).await;
    let h = [
        ("content-type", "application/json"),
        ("x-llm-d-model-name-rewrite", "adapter-x"),
    ];
    let mut large = Vec::new();
    for door in stack.doors() {
        let (name, addr) = door;
        let body = completion(&words(21, 20), 1500, false);
        // The same request id both times: the simulator derives the response id from it.
        let mut h = h.to_vec();
        h.push(("x-request-id", "rewrite-large"));
        let r = send(
            &client(false),
            "POST",
            addr,
            "/v1/completions",
            &h,
            full(body),
        )
        .await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert!(r.body.len() > SMALL_LIMIT, "{name}: {} bytes", r.body.len());
        let v = r.json();
        assert_eq!(v["model"], "adapter-x", "{name}: passed through unchanged");
        assert_eq!(v["usage"]["completion_tokens"], 1500, "{name}");
        large.push(normalize(&r.body));

        let body = completion(&words(22, 20), 4, false);
        let r = send(
            &client(false),
            "POST",
            addr,
            "/v1/completions",
            &h[..2],
            full(body),
        )
        .await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_eq!(r.json()["model"], MODEL, "{name}: rewritten back");
    }
    assert_eq!(large[0], large[1], "both front doors pass the same bytes");
    stack.shutdown().await;
}
