//! The EPP driven over a real gRPC socket the way Envoy drives it.

use std::sync::Arc;

use llmsched_core::endpoint::{EndpointMetrics, StaticEndpoints};
use llmsched_director::testing::*;
use llmsched_extproc::testing::*;

fn body_json(model: &str, prompt: &str, stream: bool) -> Vec<u8> {
    completion_body(model, prompt, stream).to_vec()
}

#[tokio::test]
async fn full_duplex_split_body_is_routed_echoed_and_answered() {
    let eps = endpoints(3);
    set_queue(&eps.0.endpoints[0], 4);
    set_queue(&eps.0.endpoints[1], 0);
    set_queue(&eps.0.endpoints[2], 2);
    let epp = epp(basic_config(1, ""), eps.clone()).start().await;
    // "m" was served before, so it is a label value of its own (llmsched_core::labels).
    epp.director.metrics().known.learn("m");
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    let body = body_json("m", "hello there, this is a prompt", false);
    let cl = body.len().to_string();
    let cl: &'static str = Box::leak(cl.into_boxed_str());
    c.send(headers_msg(
        &post(&[
            ("x-foo", "bar"),
            ("content-length", cl),
            ("x-llm-d-inference-objective", "unknown"),
            ("x-gateway-destination-endpoint", "1.2.3.4:1"),
        ]),
        false,
    ))
    .await;
    c.send_body(&body, 7).await;

    let r = c.next().await;
    assert!(is_request_headers(&r), "{r:?}");
    let (clear, set) = headers_of(&r).unwrap();
    assert!(clear);
    assert_eq!(
        set[0],
        (
            "x-gateway-destination-endpoint".into(),
            "10.0.0.2:8000".into()
        )
    );
    assert_eq!(set[1], ("Content-Length".into(), body.len().to_string()));
    assert_eq!(get(&set, "x-foo"), Some("bar"));
    assert_eq!(get(&set, "content-type"), Some("application/json"));
    assert_eq!(
        get(&set, "x-request-id").map(str::len),
        Some(36),
        "generated id echoed"
    );
    assert_eq!(
        get(&set, "x-test-target"),
        Some("10.0.0.2:8000"),
        "pre-request hook header"
    );
    assert_eq!(
        get(&set, "x-llm-d-inference-objective"),
        None,
        "control headers not echoed"
    );
    assert_eq!(
        set.iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("x-gateway-destination-endpoint"))
            .count(),
        1
    );
    assert_eq!(
        set.iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .count(),
        1
    );
    assert!(set.iter().all(|(k, _)| !k.starts_with(':')));
    assert_eq!(metadata_destination(&r).as_deref(), Some("10.0.0.2:8000"));
    let (forwarded, _) = c.read_request_body().await;
    assert_eq!(forwarded, body);
    assert_eq!(eps.0.endpoints[1].inflight_requests(), 1);

    // Response: headers, then a non-streaming body in two chunks.
    c.send(response_headers_msg(
        &[
            (":status", "200"),
            ("content-type", "application/json"),
            ("x-resp", "1"),
            ("content-length", "99"),
        ],
        false,
    ))
    .await;
    let r = c.next().await;
    assert!(is_response_headers(&r));
    let (_, set) = headers_of(&r).unwrap();
    assert_eq!(set[0], ("x-went-into-resp-headers".into(), "true".into()));
    assert_eq!(get(&set, "x-resp"), Some("1"));
    assert_eq!(get(&set, "x-test-hook"), Some("seen"));
    assert_eq!(get(&set, "content-length"), None);
    let resp = br#"{"model":"m","choices":[{"text":"hi"}],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#;
    c.send(response_body_msg(&resp[..30], false)).await;
    c.send(response_body_msg(&resp[30..], true)).await;
    let r = c.next().await;
    let (b, eos) = response_body_chunk(&r).unwrap();
    assert_eq!(b, resp);
    assert!(eos);
    // The request finished before its body was answered.
    assert_eq!(eps.0.endpoints[1].inflight_requests(), 0);
    let m = epp.metrics_text();
    assert!(
        m.contains(
            "inference_objective_input_tokens_sum{model_name=\"m\",target_model_name=\"m\"} 5"
        ),
        "{m}"
    );
    assert!(m.contains("inference_objective_request_total{model_name=\"m\",target_model_name=\"m\",priority=\"0\"} 1"), "{m}");
    assert!(
        m.contains("llmsched_request_processing_seconds_count{phase=\"body_buffering\"} 1"),
        "{m}"
    );
    drop(c);
}

#[tokio::test]
async fn large_bodies_are_rechunked_at_62000_and_content_length_follows_rewrites() {
    let eps = endpoints(1);
    let epp = epp(basic_config(1, ""), eps).start().await;
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    let prompt = "x".repeat(150_000);
    let body = body_json("small", &prompt, false);
    c.send(headers_msg(
        &post(&[("x-gateway-model-name-rewrite", "a-much-longer-target-model")]),
        false,
    ))
    .await;
    c.send_body(&body, 13).await;
    let r = c.next().await;
    let (_, set) = headers_of(&r).unwrap();
    let (forwarded, sizes) = c.read_request_body().await;
    assert_eq!(
        get(&set, "Content-Length"),
        Some(forwarded.len().to_string().as_str())
    );
    assert_eq!(
        forwarded.len(),
        body.len() + "a-much-longer-target-model".len() - "small".len()
    );
    assert_eq!(&sizes[..2], &[62_000, 62_000]);
    assert!(sizes.iter().all(|s| *s <= 62_000));
    let v: serde_json::Value = serde_json::from_slice(&forwarded).unwrap();
    assert_eq!(v["model"], "a-much-longer-target-model");
    assert_eq!(v["prompt"].as_str().map(str::len), Some(150_000));
}

#[tokio::test]
async fn fallback_destinations_with_max_num_of_endpoints() {
    let eps = endpoints(3);
    set_queue(&eps.0.endpoints[0], 9);
    set_queue(&eps.0.endpoints[1], 0);
    set_queue(&eps.0.endpoints[2], 1);
    let epp = epp(basic_config(3, ""), eps).start().await;
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    c.send_body(&body_json("m", "p", false), 1).await;
    let r = c.next().await;
    let (_, set) = headers_of(&r).unwrap();
    let want = "10.0.0.2:8000,10.0.0.3:8000,10.0.0.1:8000";
    assert_eq!(get(&set, "x-gateway-destination-endpoint"), Some(want));
    assert_eq!(metadata_destination(&r).as_deref(), Some(want));
}

#[tokio::test]
async fn subset_hints_match_miss_and_empty() {
    let eps = endpoints(3);
    set_queue(&eps.0.endpoints[2], 8);
    let epp = epp(basic_config(1, ""), eps).start().await;
    let mut client = epp.client().await;
    // Match, port ignored, hint on the headers message only.
    let mut c = Conv::open(&mut client).await;
    c.send(with_metadata(
        headers_msg(&post(&[]), false),
        subset_metadata(&["10.0.0.3:1234"]),
    ))
    .await;
    c.send_body(&body_json("m", "p", false), 2).await;
    let (_, set) = headers_of(&c.next().await).unwrap();
    assert_eq!(
        get(&set, "x-gateway-destination-endpoint"),
        Some("10.0.0.3:8000")
    );
    for hint in [&["10.9.9.9:8000"][..], &[][..]] {
        let mut c = Conv::open(&mut client).await;
        c.send(with_metadata(
            headers_msg(&post(&[]), false),
            subset_metadata(hint),
        ))
        .await;
        c.send_body(&body_json("m", "p", false), 1).await;
        let (status, body, _) = immediate(&c.next().await).expect("immediate response");
        assert_eq!(status, 503);
        assert_eq!(
            body,
            "inference error: ServiceUnavailable - failed to find endpoint candidates for serving the request"
        );
        assert!(c.end().await.is_ok());
    }
}

#[tokio::test]
async fn bad_json_and_missing_model_are_400() {
    let epp = epp(basic_config(1, ""), endpoints(1)).start().await;
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    c.send_body(b"{\"model\": \"m\", \"prompt\": ", 2).await;
    let (status, body, _) = immediate(&c.next().await).unwrap();
    assert_eq!(status, 400);
    assert!(
        body.starts_with("inference error: BadRequest - error unmarshaling request body"),
        "{body}"
    );
    assert!(c.end().await.is_ok());

    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    c.send_body(br#"{"prompt":"no model here"}"#, 3).await;
    let (status, body, _) = immediate(&c.next().await).unwrap();
    assert_eq!(status, 400);
    assert_eq!(
        body,
        "inference error: BadRequest - model not found in request body"
    );
    let m = epp.metrics_text();
    assert!(m.contains("inference_objective_request_error_total{model_name=\"\",target_model_name=\"\",error_code=\"BadRequest\"} 2"), "{m}");
}

#[tokio::test]
async fn no_endpoints_and_header_only_requests() {
    let empty = Arc::new(StaticEndpoints::from_addrs(&[]));
    let epp_empty = epp(basic_config(1, ""), empty).start().await;
    let mut client = epp_empty.client().await;
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    c.send_body(&body_json("m", "p", false), 1).await;
    assert_eq!(immediate(&c.next().await).unwrap().0, 503);
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(
        &[(":method", "GET"), (":path", "/v1/models")],
        true,
    ))
    .await;
    let (status, body, _) = immediate(&c.next().await).unwrap();
    assert_eq!(status, 500);
    assert_eq!(
        body,
        "inference error: Internal - no pods available in datastore"
    );

    // Header-only with endpoints: answered at once, no Content-Length, any endpoint.
    let eps = endpoints(2);
    let epp = epp(basic_config(1, ""), eps.clone()).start().await;
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(
        &[
            (":method", "GET"),
            (":path", "/v1/models"),
            ("x-request-id", "rid-1"),
        ],
        true,
    ))
    .await;
    let r = c.next().await;
    let (clear, set) = headers_of(&r).unwrap();
    assert!(clear);
    let dest = get(&set, "x-gateway-destination-endpoint")
        .unwrap()
        .to_string();
    assert!(eps.0.by_hostport(&dest).is_some());
    assert_eq!(get(&set, "content-length"), None);
    assert_eq!(get(&set, "x-request-id"), Some("rid-1"));
    assert_eq!(metadata_destination(&r), Some(dest));
    // The response still passes through.
    c.send(response_headers_msg(
        &[(":status", "200"), ("content-type", "application/json")],
        false,
    ))
    .await;
    assert!(is_response_headers(&c.next().await));
    c.send(response_body_msg(b"{\"data\":[]}", true)).await;
    assert_eq!(
        response_body_chunk(&c.next().await).unwrap().0,
        b"{\"data\":[]}"
    );
    assert!(eps.0.endpoints.iter().all(|e| e.inflight_requests() == 0));
}

const OBJECTIVES: &str = r#"
apiVersion: llm-d.ai/v1alpha1
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: critical}
spec: {priority: 7}
---
apiVersion: llm-d.ai/v1alpha1
kind: InferenceModelRewrite
metadata: {name: canary}
spec:
  rules:
  - matches: [{model: {value: food-review}}]
    targets: [{modelRewrite: food-review-v2, weight: 1}]
"#;

#[tokio::test]
async fn rewrites_by_header_and_objectives_with_the_response_rewritten_back() {
    let epp = epp(basic_config(1, ""), endpoints(1))
        .objectives(OBJECTIVES)
        .start()
        .await;
    let mut client = epp.client().await;
    // The header sets the target; as in the reference, a matching rewrite rule overrides it.
    for (extra, model, want) in [
        (
            vec![("x-llm-d-model-name-rewrite", "hdr-new")],
            "plain",
            "hdr-new",
        ),
        (
            vec![("x-gateway-model-name-rewrite", "hdr-old")],
            "plain",
            "hdr-old",
        ),
        (vec![], "food-review", "food-review-v2"),
        (
            vec![("x-llm-d-model-name-rewrite", "hdr-new")],
            "food-review",
            "food-review-v2",
        ),
    ] {
        let mut c = Conv::open(&mut client).await;
        c.send(headers_msg(&post(&extra), false)).await;
        c.send_body(&body_json(model, "p", true), 2).await;
        let (_, set) = headers_of(&c.next().await).unwrap();
        assert_eq!(get(&set, "x-llm-d-model-name-rewrite"), None);
        let (fwd, _) = c.read_request_body().await;
        let v: serde_json::Value = serde_json::from_slice(&fwd).unwrap();
        assert_eq!(v["model"], want);
        // Streamed response: each chunk passes at once, model name rewritten back.
        c.send(response_headers_msg(
            &[(":status", "200"), ("content-type", "text/event-stream")],
            false,
        ))
        .await;
        assert!(is_response_headers(&c.next().await));
        let chunk = format!("data: {{\"model\":\"{want}\",\"choices\":[{{\"text\":\"x\"}}]}}\n\n");
        c.send(response_body_msg(chunk.as_bytes(), false)).await;
        let r = c.next().await;
        let (b, eos) = response_body_chunk(&r).unwrap();
        assert!(!eos);
        assert_eq!(
            String::from_utf8_lossy(b),
            format!("data: {{\"model\":\"{model}\",\"choices\":[{{\"text\":\"x\"}}]}}\n\n")
        );
        c.send(response_body_msg(b"data: [DONE]\n\n", true)).await;
        let r = c.next().await;
        assert_eq!(
            response_body_chunk(&r).unwrap(),
            (&b"data: [DONE]\n\n"[..], true)
        );
    }
}

#[tokio::test]
async fn priorities_and_shedding() {
    let eps = endpoints(2);
    let cfg = basic_config(
        1,
        "- type: test-saturation-detector\n  parameters: {queueDepthThreshold: 1}\n",
    );
    let epp = epp(cfg, eps.clone()).objectives(OBJECTIVES).start().await;
    // "m" was served before, so it is a label value of its own (llmsched_core::labels).
    epp.director.metrics().known.learn("m");
    for e in &eps.0.endpoints {
        set_queue(e, 5);
    }
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(
        &post(&[("x-gateway-inference-objective", "batch")]),
        false,
    ))
    .await;
    c.send_body(&body_json("m", "p", false), 1).await;
    let (status, body, _) = immediate(&c.next().await).unwrap();
    assert_eq!(status, 429);
    assert_eq!(
        body,
        "inference error: ResourceExhausted - system saturated, sheddable request dropped"
    );
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(
        &post(&[("x-llm-d-inference-objective", "critical")]),
        false,
    ))
    .await;
    c.send_body(&body_json("m", "p", false), 1).await;
    assert!(is_request_headers(&c.next().await));
    let m = epp.metrics_text();
    assert!(m.contains("inference_objective_request_total{model_name=\"m\",target_model_name=\"m\",priority=\"7\"} 1"), "{m}");
    assert!(m.contains("error_code=\"ResourceExhausted\"} 1"), "{m}");
}

#[tokio::test]
async fn lora_affinity_routes_to_the_adapter() {
    let yaml = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: lora-affinity-scorer\n- type: queue-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: lora-affinity-scorer\n    weight: 3\n  - pluginRef: queue-scorer\n";
    let eps = endpoints(3);
    for (i, adapters) in [vec!["x"], vec!["sql-lora"], vec!["y"]]
        .into_iter()
        .enumerate()
    {
        eps.0.endpoints[i].set_metrics(EndpointMetrics {
            running_lora_adapters: adapters.into_iter().map(String::from).collect(),
            max_lora: 1,
            waiting_queue_size: if i == 1 { 3 } else { 0 },
            updated_at: Some(std::time::Instant::now()),
            ..Default::default()
        });
    }
    let epp = epp(load_config(yaml).unwrap(), eps).start().await;
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    c.send_body(&body_json("sql-lora", "p", false), 1).await;
    let (_, set) = headers_of(&c.next().await).unwrap();
    assert_eq!(
        get(&set, "x-gateway-destination-endpoint"),
        Some("10.0.0.2:8000")
    );
}

#[tokio::test]
async fn streaming_usage_split_across_chunks_is_accounted() {
    let eps = endpoints(1);
    let epp = epp(basic_config(1, ""), eps.clone()).start().await;
    // "m" was served before, so it is a label value of its own (llmsched_core::labels).
    epp.director.metrics().known.learn("m");
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[("x-request-id", "stream-1")]), false))
        .await;
    c.send_body(&body_json("m", "p", true), 3).await;
    let _ = c.next().await;
    let _ = c.read_request_body().await;
    c.send(response_headers_msg(
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
    ))
    .await;
    let _ = c.next().await;
    let sse = "data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":22,\"total_tokens\":33,\"prompt_tokens_details\":{\"cached_tokens\":6}}}\n\ndata: [DONE]\n\n";
    let cuts = [0, 45, 83, 120, sse.len()];
    for w in cuts.windows(2) {
        let last = w[1] == sse.len();
        c.send(response_body_msg(&sse.as_bytes()[w[0]..w[1]], last))
            .await;
        let r = c.next().await;
        let (b, eos) = response_body_chunk(&r).unwrap();
        assert_eq!(b, &sse.as_bytes()[w[0]..w[1]]);
        assert_eq!(eos, last);
    }
    assert_eq!(eps.0.endpoints[0].inflight_requests(), 0);
    let m = epp.metrics_text();
    for needle in [
        "inference_objective_output_tokens_sum{model_name=\"m\",target_model_name=\"m\"} 22",
        "inference_objective_prompt_cached_tokens_sum{model_name=\"m\",target_model_name=\"m\"} 6",
        "inference_objective_running_requests{model_name=\"m\"} 0",
    ] {
        assert!(m.contains(needle), "missing {needle}\n{m}");
    }
    let ev = hook_events("stream-1");
    assert_eq!(ev.first().map(String::as_str), Some("received:200"));
    assert_eq!(
        ev.last().map(String::as_str),
        Some("complete:200:22:10.0.0.1:8000")
    );
    assert_eq!(ev.iter().filter(|e| e.starts_with("chunk:")).count(), 4);
}

#[tokio::test]
async fn response_trailers_finish_a_buffered_response_and_errors_count() {
    let eps = endpoints(1);
    let epp = epp(basic_config(1, ""), eps.clone()).start().await;
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    c.send_body(&body_json("m", "p", false), 1).await;
    let _ = c.next().await;
    let _ = c.read_request_body().await;
    c.send(response_headers_msg(
        &[(":status", "503"), ("content-type", "application/json")],
        false,
    ))
    .await;
    let _ = c.next().await;
    c.send(response_body_msg(b"{\"error\":\"overloaded\"}", false))
        .await;
    c.send(response_trailers_msg()).await;
    let r = c.next().await;
    assert_eq!(
        response_body_chunk(&r).unwrap(),
        (&b"{\"error\":\"overloaded\"}"[..], false)
    );
    let r = c.next().await;
    assert!(matches!(
        r.response,
        Some(envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response::ResponseTrailers(_))
    ));
    assert_eq!(eps.0.endpoints[0].inflight_requests(), 0);
    assert!(
        epp.metrics_text()
            .contains("error_code=\"ModelServerError\"} 1")
    );
}

#[tokio::test]
async fn request_trailers_end_the_body() {
    let epp = epp(basic_config(1, ""), endpoints(1)).start().await;
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    let body = body_json("m", "p", false);
    c.send(headers_msg(&post(&[]), false)).await;
    c.send(body_msg(&body[..10], false)).await;
    c.send(body_msg(&body[10..], false)).await;
    c.send(request_trailers_msg()).await;
    assert!(is_request_headers(&c.next().await));
    let r = c.next().await;
    let (b, eos) = request_body_chunk(&r).unwrap();
    assert_eq!(b, &body[..]);
    assert!(!eos);
    assert!(matches!(
        c.next().await.response,
        Some(envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response::RequestTrailers(_))
    ));
}

#[tokio::test]
async fn skipped_bodies_are_forwarded_unchanged_and_the_stream_closes() {
    let eps = endpoints(2);
    let cfg = basic_config(
        1,
        "- type: test-skip-parser\nparser: {pluginRef: test-skip-parser}\n",
    );
    let epp = epp(cfg, eps.clone()).start().await;
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    let body = b"{\"anything\": true}".to_vec();
    c.send(headers_msg(&post(&[("x-test-parse", "skip")]), false))
        .await;
    c.send_body(&body, 2).await;
    let (_, set) = headers_of(&c.next().await).unwrap();
    assert!(
        eps.0
            .by_hostport(get(&set, "x-gateway-destination-endpoint").unwrap())
            .is_some()
    );
    assert_eq!(
        get(&set, "Content-Length"),
        Some(body.len().to_string().as_str())
    );
    assert_eq!(c.read_request_body().await.0, body);
    assert!(c.end().await.is_ok());
}

#[tokio::test]
async fn cancelled_streams_release_in_flight_counts() {
    let eps = endpoints(1);
    let epp = epp(basic_config(1, ""), eps.clone()).start().await;
    // "m" was served before, so it is a label value of its own (llmsched_core::labels).
    epp.director.metrics().known.learn("m");
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    c.send_body(&body_json("m", "p", true), 1).await;
    let _ = c.next().await;
    let _ = c.read_request_body().await;
    c.send(response_headers_msg(
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
    ))
    .await;
    let _ = c.next().await;
    assert_eq!(eps.0.endpoints[0].inflight_requests(), 1);
    drop(c); // Envoy resets the stream mid-response.
    let ep = eps.0.endpoints[0].clone();
    eventually("in-flight released", || ep.inflight_requests() == 0).await;
    let epp2 = &epp;
    eventually("running gauge back to 0", || {
        epp2.metrics_text()
            .contains("inference_objective_running_requests{model_name=\"m\"} 0")
    })
    .await;
}

#[tokio::test]
async fn served_endpoint_metadata_moves_the_accounting() {
    let eps = endpoints(2);
    set_queue(&eps.0.endpoints[1], 1);
    let epp = epp(basic_config(2, ""), eps.clone()).start().await;
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    c.send_body(&body_json("m", "p", false), 1).await;
    let _ = c.next().await;
    let _ = c.read_request_body().await;
    assert_eq!(eps.0.endpoints[0].inflight_requests(), 1);
    c.send(with_metadata(
        response_headers_msg(&[(":status", "200")], false),
        served_metadata("10.0.0.2:8000"),
    ))
    .await;
    let _ = c.next().await;
    assert_eq!(eps.0.endpoints[0].inflight_requests(), 0);
    assert_eq!(eps.0.endpoints[1].inflight_requests(), 1);
}

#[tokio::test]
async fn malformed_sequences_fail_the_stream_cleanly() {
    let epp = epp(basic_config(1, ""), endpoints(1)).start().await;
    let mut client = epp.client().await;
    let cases: Vec<(Vec<_>, &str)> = vec![
        (
            vec![body_msg(b"{}", true)],
            "request body received before request headers",
        ),
        (
            vec![
                headers_msg(&post(&[]), false),
                headers_msg(&post(&[]), false),
            ],
            "request headers received more than once",
        ),
        (
            vec![response_headers_msg(&[(":status", "200")], false)],
            "response headers received before the request was routed",
        ),
        (
            vec![headers_msg(&post(&[]), true), response_body_msg(b"x", true)],
            "response body received before response headers",
        ),
    ];
    for (msgs, want) in cases {
        let mut c = Conv::open(&mut client).await;
        let header_only = msgs.len() == 2
            && matches!(
                &msgs[0].request,
                Some(envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request::RequestHeaders(h)) if h.end_of_stream
            );
        for m in msgs {
            c.send(m).await;
        }
        if header_only {
            assert!(is_request_headers(&c.next().await));
        }
        let e = c.end().await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(e.message(), want);
    }
    // A truncated stream (Envoy hangs up mid-body) ends quietly; the server keeps serving.
    let c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    c.send(body_msg(b"{\"model\":", false)).await;
    drop(c);
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    c.send_body(&body_json("m", "p", false), 1).await;
    assert!(is_request_headers(&c.next().await));
}

#[tokio::test]
async fn tls_serving_with_a_self_signed_certificate() {
    let epp = epp(basic_config(1, ""), endpoints(1)).tls().start().await;
    let mut client = epp.client().await;
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    c.send_body(&body_json("m", "p", false), 1).await;
    let (_, set) = headers_of(&c.next().await).unwrap();
    assert_eq!(
        get(&set, "x-gateway-destination-endpoint"),
        Some("10.0.0.1:8000")
    );
    // A plaintext client cannot talk to the TLS port.
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{}", epp.addr)).unwrap();
    let plain = match ep.connect().await {
        Ok(ch) => {
            let mut cl = envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient::new(ch);
            let (_tx, rx) = tokio::sync::mpsc::channel(1);
            cl.process(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .is_ok()
        }
        Err(_) => false,
    };
    assert!(!plain);
}

#[tokio::test]
async fn flow_control_rejections_and_cancelled_waiters() {
    let yaml = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\nflowControl: {maxRequests: 1}\nplugins:\n- type: queue-scorer\n- type: test-saturation-detector\n  parameters: {queueDepthThreshold: 1}\n";
    let eps = endpoints(1);
    set_queue(&eps.0.endpoints[0], 3);
    let epp = epp(load_config(yaml).unwrap(), eps.clone()).start().await;
    let fc = epp.director.flow_controller().unwrap();
    let mut client = epp.client().await;
    // A waits in the queue (the pool is saturated).
    let a = Conv::open(&mut client).await;
    a.send(headers_msg(
        &post(&[("x-llm-d-inference-fairness-id", "tenant-a")]),
        false,
    ))
    .await;
    a.send_body(&body_json("m", "p", false), 2).await;
    let fc2 = fc.clone();
    eventually("A queued", move || fc2.queued() == 1).await;
    // B finds the queue full.
    let mut b = Conv::open(&mut client).await;
    b.send(headers_msg(&post(&[]), false)).await;
    b.send_body(&body_json("m", "p", false), 1).await;
    let (status, body, headers) = immediate(&b.next().await).unwrap();
    assert_eq!(status, 429);
    assert_eq!(
        body,
        "inference error: ResourceExhausted - request rejected pre-queue: queue at capacity"
    );
    assert_eq!(
        headers,
        vec![(
            "x-llm-d-request-dropped-reason".to_string(),
            "rejected-saturated".to_string()
        )]
    );
    // Envoy gives up on A: its slot is freed without ever being dispatched.
    drop(a);
    let fc2 = fc.clone();
    eventually("A left the queue", move || fc2.queued() == 0).await;
    assert_eq!(eps.0.endpoints[0].inflight_requests(), 0);
    // Once the pool drains, a queued request is released.
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    c.send_body(&body_json("m", "p", false), 1).await;
    let fc2 = fc.clone();
    eventually("C queued", move || fc2.queued() == 1).await;
    set_queue(&eps.0.endpoints[0], 0);
    let r = c.next().await;
    assert!(is_request_headers(&r), "{r:?}");
    assert!(epp.metrics_text().contains("inference_extension_flow_control_request_queue_duration_seconds_count{fairness_id=\"tenant-a\",priority=\"0\",outcome=\"EvictedContextCancelled\""));
}

#[tokio::test]
async fn health_can_share_the_ext_proc_port() {
    let director =
        Arc::new(llmsched_director::Director::builder(basic_config(1, ""), endpoints(1)).build());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let health = llmsched_ops::HealthHandle::new();
    health.set_ready(true);
    tokio::spawn(llmsched_extproc::serve_ext_proc(
        listener,
        director,
        None,
        Some(health),
        llmsched_extproc::ExtProcOptions::default(),
        shutdown.clone(),
    ));
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut hc = tonic_health::pb::health_client::HealthClient::new(ch);
    let s = hc
        .check(tonic_health::pb::HealthCheckRequest {
            service: "envoy.service.ext_proc.v3.ExternalProcessor".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        s,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    shutdown.cancel();
}
