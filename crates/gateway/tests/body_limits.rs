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
