//! Request bodies over `--max-request-body-bytes` through a real gRPC socket, driven the way
//! Envoy drives the stream: answered 413 `PayloadTooLarge` at once (at the headers when
//! `content-length` says so, else at the chunk that crosses the limit), the stream closed,
//! nothing routed; and non-streaming responses over the limit passed through unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use llmsched_director::testing::*;
use llmsched_extproc::ExtProcOptions;
use llmsched_extproc::testing::*;

const LIMIT: usize = 4096;

fn options() -> ExtProcOptions {
    ExtProcOptions {
        max_request_body_bytes: LIMIT,
        ..ExtProcOptions::default()
    }
}

fn body_of_len(n: usize) -> Vec<u8> {
    let head = br#"{"model":"m","prompt":""#;
    let tail = br#""}"#;
    let mut b = head.to_vec();
    b.resize(n - tail.len(), b'x');
    b.extend_from_slice(tail);
    assert_eq!(b.len(), n);
    b
}

fn assert_413(r: &envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse) {
    let (status, body, _) =
        immediate(r).unwrap_or_else(|| panic!("not an immediate response: {r:?}"));
    assert_eq!(status, 413);
    assert_eq!(
        body,
        format!(
            "inference error: PayloadTooLarge - request body is larger than the limit of {LIMIT} bytes"
        )
    );
}

#[tokio::test]
async fn an_announced_length_over_the_limit_is_refused_before_the_body() {
    let eps = endpoints(2);
    let epp = epp(basic_config(1, ""), eps.clone())
        .options(options())
        .start()
        .await;
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    let cl = (LIMIT + 1).to_string();
    c.send(headers_msg(&post(&[("content-length", cl.leak())]), false))
        .await;
    // Answered without a single body byte.
    assert_413(&c.next().await);
    c.end().await.unwrap();
    assert_eq!(
        eps.0
            .endpoints
            .iter()
            .map(|e| e.dispatched_total())
            .sum::<u64>(),
        0
    );
    assert!(
        epp.metrics_text()
            .contains("error_code=\"PayloadTooLarge\"} 1"),
        "{}",
        epp.metrics_text()
    );
}

#[tokio::test]
async fn a_body_growing_over_the_limit_is_refused_at_the_crossing_chunk() {
    let eps = endpoints(2);
    let epp = epp(basic_config(1, ""), eps.clone())
        .options(options())
        .start()
        .await;
    let mut client = epp.client().await;

    // No content-length (chunked upload): three chunks fit, the fourth crosses.
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    for _ in 0..3 {
        c.send(body_msg(&[b'x'; 1024], false)).await;
    }
    c.send(body_msg(&[b'x'; 1025], false)).await;
    assert_413(&c.next().await);
    c.end().await.unwrap();

    // A content-length that lies (says 10, sends more than the limit).
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[("content-length", "10")]), false))
        .await;
    c.send(body_msg(&[b'x'; LIMIT], false)).await;
    c.send(body_msg(b"y", true)).await;
    assert_413(&c.next().await);
    c.end().await.unwrap();

    // The whole body in one message, one byte over.
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    c.send(body_msg(&body_of_len(LIMIT + 1), true)).await;
    assert_413(&c.next().await);
    c.end().await.unwrap();

    assert_eq!(
        eps.0
            .endpoints
            .iter()
            .map(|e| e.dispatched_total())
            .sum::<u64>(),
        0,
        "nothing over the limit is routed"
    );
    assert!(
        epp.metrics_text()
            .contains("error_code=\"PayloadTooLarge\"} 3")
    );

    // The EPP still serves: a body of exactly the limit, in pieces and in one message.
    for pieces in [5, 1] {
        let body = body_of_len(LIMIT);
        let mut c = Conv::open(&mut client).await;
        let cl = LIMIT.to_string();
        c.send(headers_msg(&post(&[("content-length", cl.leak())]), false))
            .await;
        c.send_body(&body, pieces).await;
        let r = c.next().await;
        assert!(is_request_headers(&r), "{r:?}");
        let (forwarded, _) = c.read_request_body().await;
        assert_eq!(forwarded, body);
    }
}

#[tokio::test]
async fn a_response_over_the_limit_passes_through_unchanged() {
    let eps = endpoints(1);
    let epp = epp(basic_config(1, ""), eps.clone())
        .options(options())
        .start()
        .await;
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    // Rewritten model: a buffered response would get `"model":"target"` turned back to "m".
    c.send(headers_msg(
        &post(&[("x-llm-d-model-name-rewrite", "target")]),
        false,
    ))
    .await;
    c.send_body(&body_json("m"), 1).await;
    assert!(is_request_headers(&c.next().await));
    let _ = c.read_request_body().await;
    c.send(response_headers_msg(
        &[(":status", "200"), ("content-type", "application/json")],
        false,
    ))
    .await;
    assert!(is_response_headers(&c.next().await));
    let mut sent = br#"{"model":"target","data":""#.to_vec();
    sent.resize(LIMIT * 3, b'z');
    sent.extend_from_slice(br#""}"#);
    let pieces: Vec<&[u8]> = sent.chunks(1500).collect();
    for (i, p) in pieces.iter().enumerate() {
        c.send(response_body_msg(p, i + 1 == pieces.len())).await;
    }
    let mut got = Vec::new();
    loop {
        let r = c.next().await;
        let (b, eos) = response_body_chunk(&r).unwrap_or_else(|| panic!("{r:?}"));
        got.extend_from_slice(b);
        if eos {
            break;
        }
    }
    assert_eq!(got, sent, "passed through byte for byte");
    assert_eq!(eps.0.endpoints[0].inflight_requests(), 0, "finished");

    // A response under the limit is still rewritten back.
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(
        &post(&[("x-llm-d-model-name-rewrite", "target")]),
        false,
    ))
    .await;
    c.send_body(&body_json("m"), 1).await;
    let _ = c.next().await;
    let _ = c.read_request_body().await;
    c.send(response_headers_msg(&[(":status", "200")], false))
        .await;
    let _ = c.next().await;
    c.send(response_body_msg(br#"{"model":"tar"#, false)).await;
    c.send(response_body_msg(br#"get"}"#, true)).await;
    let r = c.next().await;
    assert_eq!(
        response_body_chunk(&r).unwrap(),
        (&br#"{"model":"m"}"#[..], true)
    );
}

fn body_json(model: &str) -> Vec<u8> {
    completion_body(model, "hello", false).to_vec()
}
