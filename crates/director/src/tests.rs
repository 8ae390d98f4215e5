//! Director behaviour tests with the test plugins of [`crate::testing`].

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use llmsched_core::endpoint::{EndpointMetrics, StaticEndpoints};
use llmsched_core::objectives::parse_manifests;
use llmsched_core::request::Headers;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

use crate::testing::*;
use crate::{Director, DirectorOptions, EppMetrics, IncomingRequest, RouteKind};

fn director(
    config: Arc<llmsched_core::config::LoadedConfig>,
    eps: Arc<StaticEndpoints>,
) -> Director {
    Director::builder(config, eps).build()
}

fn skip_config() -> Arc<llmsched_core::config::LoadedConfig> {
    basic_config(
        1,
        "- type: test-skip-parser\nparser: {pluginRef: test-skip-parser}\n",
    )
}

fn req(body: Bytes) -> IncomingRequest {
    IncomingRequest::new(post_headers("/v1/completions"), body)
}

#[tokio::test]
async fn routes_to_the_least_loaded_endpoint_without_copying_the_body() {
    let eps = endpoints(3);
    set_queue(&eps.0.endpoints[0], 5);
    set_queue(&eps.0.endpoints[1], 0);
    set_queue(&eps.0.endpoints[2], 3);
    let d = director(basic_config(1, ""), eps.clone());
    let body = completion_body("m", "hello", false);
    let routed = d.route(req(body.clone())).await.unwrap();
    assert_eq!(routed.kind(), RouteKind::Scheduled);
    assert_eq!(routed.destination(), "10.0.0.2:8000");
    assert_eq!(
        routed.forward_body().as_ptr(),
        body.as_ptr(),
        "zero-copy forward"
    );
    assert_eq!(
        routed.headers_to_set(),
        &[("x-test-target".to_string(), "10.0.0.2:8000".to_string())]
    );
    assert_eq!(routed.request_id().len(), 36, "generated request id");
    assert_eq!(
        routed.request().headers.get("x-request-id"),
        Some(routed.request_id())
    );
    assert_eq!(eps.0.endpoints[1].inflight_requests(), 1);
    assert!(eps.0.endpoints[1].inflight_tokens() > 0);
    routed.finish();
    assert_eq!(eps.0.endpoints[1].inflight_requests(), 0);
    assert_eq!(eps.0.endpoints[1].inflight_tokens(), 0);
}

#[tokio::test]
async fn deferred_hook_work_runs_once_after_dispatch_at_the_latest_before_the_response() {
    let eps = endpoints(2);
    let d = director(basic_config(1, ""), eps.clone());
    let routed_with = |id: &str| {
        let mut headers = post_headers("/v1/completions");
        headers.insert("x-request-id", id);
        d.route(IncomingRequest::new(
            headers,
            completion_body("m", "hello", false),
        ))
    };
    // The transport says when the request is on its way; repeated calls do nothing.
    let mut a = routed_with("dispatch-a").await.unwrap();
    assert_eq!(
        after_dispatch_runs("dispatch-a"),
        0,
        "not on the decision's path"
    );
    a.run_after_dispatch();
    a.run_after_dispatch();
    a.on_response_headers(200, &Headers::new());
    a.finish();
    assert_eq!(after_dispatch_runs("dispatch-a"), 1);
    // A transport that never says so: the response headers run it.
    let mut b = routed_with("dispatch-b").await.unwrap();
    b.on_response_headers(200, &Headers::new());
    assert_eq!(after_dispatch_runs("dispatch-b"), 1);
    b.finish();
    assert_eq!(after_dispatch_runs("dispatch-b"), 1);
    // A request that ends before any response (client gone): dropping it runs it.
    let c = routed_with("dispatch-c").await.unwrap();
    drop(c);
    assert_eq!(after_dispatch_runs("dispatch-c"), 1);
}

#[tokio::test]
async fn fallback_destinations_follow_max_num_of_endpoints() {
    let eps = endpoints(3);
    set_queue(&eps.0.endpoints[0], 9);
    set_queue(&eps.0.endpoints[1], 1);
    set_queue(&eps.0.endpoints[2], 0);
    let d = director(basic_config(2, ""), eps.clone());
    let routed = d
        .route(req(completion_body("m", "x", false)))
        .await
        .unwrap();
    assert_eq!(routed.destination(), "10.0.0.3:8000,10.0.0.2:8000");
    assert_eq!(routed.targets().len(), 2);
    // Only the primary is charged.
    assert_eq!(eps.0.endpoints[2].inflight_requests(), 1);
    assert_eq!(eps.0.endpoints[1].inflight_requests(), 0);
}

#[tokio::test]
async fn client_errors_have_the_reference_texts() {
    let d = director(basic_config(1, ""), endpoints(2));
    let e = d
        .route(req(Bytes::from_static(b"{not json")))
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 400);
    assert!(
        e.body()
            .starts_with("inference error: BadRequest - error unmarshaling request body"),
        "{}",
        e.body()
    );
    let e = d
        .route(req(Bytes::from_static(br#"{"prompt":"hi"}"#)))
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 400);
    assert_eq!(
        e.body(),
        "inference error: BadRequest - model not found in request body"
    );
    // A non-string model is no model either.
    let e = d
        .route(req(Bytes::from_static(br#"{"model":7,"prompt":"hi"}"#)))
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 400);
}

#[tokio::test]
async fn passthrough_parser_needs_no_model() {
    let cfg = basic_config(
        1,
        "- type: passthrough-parser\nparser: {pluginRef: passthrough-parser}\n",
    );
    let d = director(cfg, endpoints(1));
    let body = Bytes::from_static(b"\x00binary");
    let routed = d.route(req(body.clone())).await.unwrap();
    assert_eq!(routed.forward_body(), &body);
}

#[tokio::test]
async fn subset_hints_restrict_candidates_by_ip() {
    let eps = endpoints(3);
    set_queue(&eps.0.endpoints[0], 0);
    set_queue(&eps.0.endpoints[1], 1);
    set_queue(&eps.0.endpoints[2], 7);
    let d = director(basic_config(1, ""), eps.clone());
    let hint = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    // Match (port ignored): only .3 is allowed even though it is the busiest.
    let r = d
        .route(req(completion_body("m", "x", false)).with_subset_hint(hint(&["10.0.0.3:9999"])))
        .await
        .unwrap();
    assert_eq!(r.destination(), "10.0.0.3:8000");
    for h in [hint(&[]), hint(&["10.9.9.9:8000", "junk"])] {
        let e = d
            .route(req(completion_body("m", "x", false)).with_subset_hint(h))
            .await
            .unwrap_err();
        assert_eq!(e.http_status(), 503);
        assert_eq!(
            e.body(),
            "inference error: ServiceUnavailable - failed to find endpoint candidates for serving the request"
        );
    }
    // The flag turns hints off.
    let d = Director::builder(basic_config(1, ""), eps)
        .options(DirectorOptions {
            disable_endpoint_subset_filter: true,
            ..Default::default()
        })
        .build();
    let r = d
        .route(req(completion_body("m", "x", false)).with_subset_hint(hint(&[])))
        .await
        .unwrap();
    assert_eq!(r.destination(), "10.0.0.1:8000");
}

#[tokio::test]
async fn empty_pool_errors() {
    let eps = Arc::new(StaticEndpoints::from_addrs(&[]));
    let d = director(basic_config(1, ""), eps);
    let e = d
        .route(req(completion_body("m", "x", false)))
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 503);
    let e = d
        .route_without_body(post_headers("/v1/models"), std::time::Instant::now())
        .unwrap_err();
    assert_eq!(e.http_status(), 500);
    assert_eq!(
        e.body(),
        "inference error: Internal - no pods available in datastore"
    );
}

#[tokio::test]
async fn header_only_and_skipped_requests_go_to_a_random_endpoint_unaccounted() {
    let eps = endpoints(2);
    let d = director(skip_config(), eps.clone());
    let r = d
        .route_without_body(Headers::new(), std::time::Instant::now())
        .unwrap();
    assert_eq!(r.kind(), RouteKind::Fallback);
    assert!(eps.0.by_hostport(r.destination()).is_some());
    assert!(r.forward_body().is_empty());
    let mut h = post_headers("/v1/completions");
    h.insert("x-test-parse", "skip");
    let body = completion_body("m", "x", false);
    let r = d
        .route(IncomingRequest::new(h, body.clone()))
        .await
        .unwrap();
    assert_eq!(r.kind(), RouteKind::Fallback);
    assert_eq!(r.forward_body(), &body);
    assert!(eps.0.endpoints.iter().all(|e| e.inflight_requests() == 0));
}

fn objectives(yaml: &str) -> Arc<ArcSwap<llmsched_core::objectives::Objectives>> {
    Arc::new(ArcSwap::from_pointee(parse_manifests(yaml, "t").unwrap()))
}

const OBJECTIVES: &str = r#"
apiVersion: llm-d.ai/v1alpha1
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1}
---
apiVersion: llm-d.ai/v1alpha1
kind: InferenceObjective
metadata: {name: critical}
spec: {priority: 10}
---
apiVersion: llm-d.ai/v1alpha1
kind: InferenceModelRewrite
metadata: {name: canary}
spec:
  rules:
  - matches: [{model: {value: food-review}}]
    targets: [{modelRewrite: food-review-v2, weight: 100}, {modelRewrite: never, weight: 0}]
"#;

#[tokio::test]
async fn rewrites_splice_the_model_and_rules_override_the_header() {
    let mut reg = Registry::default();
    let metrics = EppMetrics::register(&mut reg, "c", "v");
    let d = Director::builder(basic_config(1, ""), endpoints(1))
        .objectives(objectives(OBJECTIVES))
        .metrics(metrics)
        .build();
    let body = completion_body("food-review", "the food-review prompt", false);
    let mut r = d.route(req(body.clone())).await.unwrap();
    assert_eq!(r.request().incoming_model, "food-review");
    assert_eq!(r.request().target_model, "food-review-v2");
    let v: serde_json::Value = serde_json::from_slice(r.forward_body()).unwrap();
    assert_eq!(v["model"], "food-review-v2");
    assert_eq!(v["prompt"], "the food-review prompt");
    // The response's model name goes back to what the client asked for.
    r.on_response_headers(200, &Headers::new());
    assert_eq!(
        &r.on_response_chunk(
            Bytes::from_static(br#"{"model":"food-review-v2","x":1}"#),
            true
        )[..],
        br#"{"model":"food-review","x":1}"#
    );
    drop(r);
    // The rewrite header sets the target for models without a rule...
    let plain = completion_body("plain-model", "a prompt", false);
    for name in ["x-llm-d-model-name-rewrite", "x-gateway-model-name-rewrite"] {
        let mut h = post_headers("/v1/completions");
        h.insert(name, "from-header");
        let r = d
            .route(IncomingRequest::new(h, plain.clone()))
            .await
            .unwrap();
        assert_eq!(r.request().target_model, "from-header", "{name}");
        let v: serde_json::Value = serde_json::from_slice(r.forward_body()).unwrap();
        assert_eq!(v["model"], "from-header");
    }
    // ...and, as in the reference, a matching InferenceModelRewrite rule overrides it.
    let mut h = post_headers("/v1/completions");
    h.insert("x-llm-d-model-name-rewrite", "from-header");
    let r = d
        .route(IncomingRequest::new(h, body.clone()))
        .await
        .unwrap();
    assert_eq!(r.request().target_model, "food-review-v2");
    drop(r);
    let mut out = String::new();
    encode(&mut out, &reg).unwrap();
    assert!(out.contains("inference_extension_model_rewrite_decisions_total{model_rewrite_name=\"canary\",model_name=\"food-review\",target_model=\"food-review-v2\"} 2"), "{out}");
}

fn saturated_config() -> Arc<llmsched_core::config::LoadedConfig> {
    basic_config(
        1,
        "- type: test-saturation-detector\n  parameters: {queueDepthThreshold: 2}\n",
    )
}

#[tokio::test]
async fn sheddable_requests_are_dropped_when_saturated() {
    let eps = endpoints(2);
    let d = Director::builder(saturated_config(), eps.clone())
        .objectives(objectives(OBJECTIVES))
        .build();
    let with_objective = |header: &str, name: &str| {
        let mut h = post_headers("/v1/completions");
        h.insert(header, name);
        IncomingRequest::new(h, completion_body("m", "x", false))
    };
    // Not saturated: everyone passes; priorities come from the objective.
    let r = d
        .route(with_objective("x-llm-d-inference-objective", "batch"))
        .await
        .unwrap();
    assert_eq!(r.request().priority, -1);
    assert_eq!(r.request().objective.as_deref(), Some("batch"));
    drop(r);
    let r = d
        .route(with_objective("x-gateway-inference-objective", "critical"))
        .await
        .unwrap();
    assert_eq!(r.request().priority, 10);
    drop(r);
    let r = d
        .route(with_objective("x-llm-d-inference-objective", "unknown"))
        .await
        .unwrap();
    assert_eq!(r.request().priority, 0);
    drop(r);
    for e in &eps.0.endpoints {
        set_queue(e, 4);
    }
    let e = d
        .route(with_objective("x-llm-d-inference-objective", "batch"))
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 429);
    assert_eq!(
        e.body(),
        "inference error: ResourceExhausted - system saturated, sheddable request dropped"
    );
    assert!(
        d.route(with_objective("x-llm-d-inference-objective", "critical"))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn admitter_rejections_and_scheduler_failures() {
    let d = director(
        basic_config(1, "- type: test-deny-admitter\n"),
        endpoints(1),
    );
    let mut h = post_headers("/v1/completions");
    h.insert("x-test-deny", "1");
    let e = d
        .route(IncomingRequest::new(h, completion_body("m", "x", false)))
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 403);
    assert_eq!(
        e.body(),
        "inference error: Forbidden - denied by test admitter"
    );
}

#[tokio::test]
async fn in_flight_counts_are_released_on_drop_and_follow_the_served_endpoint() {
    let eps = endpoints(2);
    set_queue(&eps.0.endpoints[1], 3);
    let d = director(basic_config(2, ""), eps.clone());
    let mut r = d
        .route(req(completion_body("m", "x", false)))
        .await
        .unwrap();
    assert_eq!(r.destination(), "10.0.0.1:8000,10.0.0.2:8000");
    assert_eq!(eps.0.endpoints[0].inflight_requests(), 1);
    r.set_served_endpoint("10.0.0.2:8000");
    assert_eq!(eps.0.endpoints[0].inflight_requests(), 0);
    assert_eq!(eps.0.endpoints[1].inflight_requests(), 1);
    assert_eq!(r.served_endpoint().unwrap().hostport(), "10.0.0.2:8000");
    r.set_served_endpoint("10.7.7.7:1");
    assert_eq!(eps.0.endpoints[1].inflight_requests(), 1);
    let id = r.request_id().to_string();
    drop(r);
    assert_eq!(eps.0.endpoints[1].inflight_requests(), 0);
    assert_eq!(eps.0.endpoints[1].inflight_tokens(), 0);
    // Response-complete hooks ran even though the request never finished.
    assert_eq!(hook_events(&id), vec!["complete:0:-:10.0.0.2:8000"]);
}

#[tokio::test]
async fn streaming_usage_split_across_chunks_and_hooks() {
    let mut reg = Registry::default();
    let metrics = EppMetrics::register(&mut reg, "c", "v");
    // A model the servers have served before: labelled as itself (see llmsched_core::labels).
    metrics.known.learn("m");
    let eps = endpoints(1);
    let d = Director::builder(basic_config(1, ""), eps)
        .metrics(metrics)
        .build();
    let mut r = d.route(req(completion_body("m", "x", true))).await.unwrap();
    assert!(r.is_streaming());
    let id = r.request_id().to_string();
    let h: Headers = [(":status", "200"), ("content-type", "text/event-stream")]
        .into_iter()
        .collect();
    assert_eq!(
        r.on_response_headers(200, &h),
        vec![("x-test-hook".to_string(), "seen".to_string())]
    );
    let sse = "data: {\"choices\":[{\"text\":\"a\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":30,\"total_tokens\":42,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\ndata: [DONE]\n\n";
    let (a, b) = sse.split_at(70);
    let _ = r.on_response_chunk(Bytes::copy_from_slice(a.as_bytes()), false);
    assert!(r.usage().is_none());
    let _ = r.on_response_chunk(Bytes::copy_from_slice(b.as_bytes()), true);
    let u = r.usage().unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
        (12, 30, 8)
    );
    r.finish();
    assert_eq!(
        hook_events(&id),
        vec![
            "received:200".to_string(),
            format!("chunk:{}", a.len()),
            format!("chunk:{}", b.len()),
            "complete:200:30:10.0.0.1:8000".to_string()
        ]
    );
    let mut out = String::new();
    encode(&mut out, &reg).unwrap();
    for needle in [
        "inference_objective_request_total{model_name=\"m\",target_model_name=\"m\",priority=\"0\"} 1",
        "inference_objective_input_tokens_sum{model_name=\"m\",target_model_name=\"m\"} 12",
        "inference_objective_output_tokens_sum{model_name=\"m\",target_model_name=\"m\"} 30",
        "inference_objective_prompt_cached_tokens_sum{model_name=\"m\",target_model_name=\"m\"} 8",
        "inference_objective_normalized_time_per_output_token_seconds_count{model_name=\"m\",target_model_name=\"m\"} 1",
        "inference_objective_request_duration_seconds_count{model_name=\"m\",target_model_name=\"m\"} 1",
        "inference_objective_response_sizes_sum{model_name=\"m\",target_model_name=\"m\"} ",
        "inference_objective_running_requests{model_name=\"m\"} 0",
    ] {
        assert!(out.contains(needle), "missing {needle} in\n{out}");
    }
}

#[tokio::test]
async fn non_streaming_usage_and_model_server_errors() {
    let mut reg = Registry::default();
    let metrics = EppMetrics::register(&mut reg, "c", "v");
    // A model the servers have served before: labelled as itself (see llmsched_core::labels).
    metrics.known.learn("m");
    let d = Director::builder(basic_config(1, ""), endpoints(1))
        .metrics(metrics)
        .build();
    let mut r = d
        .route(req(completion_body("m", "x", false)))
        .await
        .unwrap();
    assert!(!r.is_streaming());
    r.on_response_headers(
        200,
        &[("content-type", "application/json")].into_iter().collect(),
    );
    let body =
        br#"{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
    let _ = r.on_response_chunk(Bytes::from_static(&body[..20]), false);
    let _ = r.on_response_chunk(Bytes::from_static(&body[20..]), true);
    assert_eq!(r.usage().unwrap().total_tokens, 7);
    r.finish();
    // Not JSON: no usage, no panic; a 500 counts as a model-server error.
    let mut r = d
        .route(req(completion_body("m", "x", false)))
        .await
        .unwrap();
    r.on_response_headers(500, &Headers::new());
    let _ = r.on_response_chunk(Bytes::from_static(b"upstream exploded"), true);
    assert!(r.usage().is_none());
    r.finish();
    let mut out = String::new();
    encode(&mut out, &reg).unwrap();
    assert!(out.contains("inference_objective_request_error_total{model_name=\"m\",target_model_name=\"m\",error_code=\"ModelServerError\"} 1"), "{out}");
    assert!(
        out.contains(
            "inference_objective_output_tokens_sum{model_name=\"m\",target_model_name=\"m\"} 4"
        ),
        "{out}"
    );
    // No cached-token details were reported: nothing observed.
    assert!(
        !out.contains("inference_objective_prompt_cached_tokens_count{"),
        "{out}"
    );
}

#[tokio::test]
async fn lora_affinity_prefers_the_endpoint_running_the_adapter() {
    let yaml = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: lora-affinity-scorer\n- type: max-score-picker\n";
    let cfg = load_config(yaml).unwrap();
    let eps = endpoints(3);
    let lora = |e: &llmsched_core::Endpoint, running: &[&str], max: u32| {
        e.set_metrics(EndpointMetrics {
            running_lora_adapters: running.iter().map(|s| s.to_string()).collect(),
            max_lora: max,
            updated_at: Some(std::time::Instant::now()),
            ..Default::default()
        })
    };
    lora(&eps.0.endpoints[0], &["a", "b"], 2);
    lora(&eps.0.endpoints[1], &["sql-lora"], 2);
    lora(&eps.0.endpoints[2], &[], 0);
    let d = director(cfg, eps.clone());
    let r = d
        .route(req(completion_body("sql-lora", "x", false)))
        .await
        .unwrap();
    assert_eq!(r.destination(), "10.0.0.2:8000");
    drop(r);
    let r = d
        .route(req(completion_body("new-lora", "x", false)))
        .await
        .unwrap();
    assert_eq!(
        r.destination(),
        "10.0.0.2:8000",
        "room to load: first of the 0.8s"
    );
}

#[tokio::test]
async fn flow_control_rejects_over_capacity_and_expires_queued_requests() {
    tokio::time::pause();
    let yaml = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\nflowControl:\n  maxRequests: 1\n  defaultRequestTTL: 5s\nplugins:\n- type: queue-scorer\n- type: test-saturation-detector\n  parameters: {queueDepthThreshold: 1}\n";
    let eps = endpoints(1);
    let d = Arc::new(director(load_config(yaml).unwrap(), eps.clone()));
    // Unsaturated: straight through.
    assert!(d.route(req(completion_body("m", "x", false))).await.is_ok());
    set_queue(&eps.0.endpoints[0], 3);
    let d2 = d.clone();
    let queued = tokio::spawn(async move { d2.route(req(completion_body("m", "x", false))).await });
    let fc = d.flow_controller().unwrap();
    while fc.queued() != 1 {
        tokio::task::yield_now().await;
    }
    let e = d
        .route(req(completion_body("m", "x", false)))
        .await
        .unwrap_err();
    assert_eq!(e.http_status(), 429);
    assert_eq!(
        e.headers,
        vec![(
            "x-llm-d-request-dropped-reason".to_string(),
            "rejected-saturated".to_string()
        )]
    );
    let e = queued.await.unwrap().unwrap_err();
    assert_eq!(e.http_status(), 503);
    assert_eq!(e.headers[0].1, "rejected-ttl-expired");
    // Capacity frees up once the pool drains.
    set_queue(&eps.0.endpoints[0], 0);
    let d2 = d.clone();
    set_queue(&eps.0.endpoints[0], 3);
    let queued = tokio::spawn(async move { d2.route(req(completion_body("m", "x", false))).await });
    while fc.queued() != 1 {
        tokio::task::yield_now().await;
    }
    set_queue(&eps.0.endpoints[0], 0);
    fc.notify();
    let r = queued.await.unwrap().unwrap();
    assert_eq!(r.destination(), "10.0.0.1:8000");
    let _ = Duration::ZERO;
}

#[tokio::test]
async fn set_config_swaps_the_pipeline() {
    let eps = endpoints(2);
    let d = director(basic_config(1, ""), eps.clone());
    let r = d
        .route(req(completion_body("m", "x", false)))
        .await
        .unwrap();
    assert_eq!(r.targets().len(), 1);
    drop(r);
    d.set_config(basic_config(2, ""));
    let r = d
        .route(req(completion_body("m", "x", false)))
        .await
        .unwrap();
    assert_eq!(r.targets().len(), 2);
    assert_eq!(d.endpoints().snapshot().len(), 2);
}

/// The response's usage reaches the band's fairness policy when the `Routed` finishes: with
/// `token-fair-share-fairness-policy`, a flow whose response reported many output tokens
/// waits behind one whose response reported few.
#[tokio::test]
async fn flow_control_charges_reported_usage_to_the_fairness_policy() {
    let yaml = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\nflowControl:\n  defaultPriorityBand: {fairnessPolicyRef: fair}\nplugins:\n- type: queue-scorer\n- {type: token-fair-share-fairness-policy, name: fair}\n- type: test-saturation-detector\n  parameters: {queueDepthThreshold: 1}\n";
    let eps = endpoints(1);
    let d = Arc::new(director(load_config(yaml).unwrap(), eps.clone()));
    let fc = d.flow_controller().unwrap();
    // The test releases requests itself, one at a time.
    fc.close();
    set_queue(&eps.0.endpoints[0], 3);
    let mut waiting = Vec::new();
    for flow in ["a", "a", "b", "b"] {
        let mut r = req(completion_body("m", "x", false));
        r.headers.insert("x-gateway-inference-fairness-id", flow);
        let d2 = d.clone();
        waiting.push((
            flow,
            tokio::spawn(async move { d2.route(r).await.unwrap() }),
        ));
        while fc.queued() != waiting.len() as u64 {
            tokio::task::yield_now().await;
        }
    }
    let mut release = async || {
        set_queue(&eps.0.endpoints[0], 0);
        assert!(fc.dispatch_once());
        set_queue(&eps.0.endpoints[0], 3);
        loop {
            if let Some(i) = waiting.iter().position(|(_, t)| t.is_finished()) {
                let (flow, t) = waiting.remove(i);
                return (flow, t.await.unwrap());
            }
            tokio::task::yield_now().await;
        }
    };
    let finish = |mut r: crate::Routed, completion: u64| {
        r.on_response_headers(
            200,
            &[("content-type", "application/json")].into_iter().collect(),
        );
        let body = format!(
            r#"{{"usage":{{"prompt_tokens":1,"completion_tokens":{completion},"total_tokens":{}}}}}"#,
            completion + 1
        );
        let _ = r.on_response_chunk(Bytes::from(body), true);
        r.finish();
    };
    // Both start level: the older head ("a") first, then "b", which has less service.
    let (f1, a1) = release().await;
    let (f2, b1) = release().await;
    assert_eq!((f1, f2), ("a", "b"));
    finish(a1, 5000);
    finish(b1, 1);
    // Without the usage both flows would stand at one estimate each and the older "a"
    // request would go first.
    let (f3, _b2) = release().await;
    assert_eq!(f3, "b");
    let (f4, _a2) = release().await;
    assert_eq!(f4, "a");
}

/// A request for `model` rewritten to `target` by the rewrite header.
fn rewritten_req(model: &str, target: &str, stream: bool, id: &str) -> IncomingRequest {
    let mut h = post_headers("/v1/completions");
    h.insert("x-llm-d-model-name-rewrite", target);
    h.insert("x-request-id", id);
    IncomingRequest::new(h, completion_body(model, "hello", stream))
}

#[tokio::test]
async fn the_response_contract_rewrites_streamed_chunks_and_forwards_unchanged_ones_as_they_are() {
    let eps = endpoints(1);
    let d = director(basic_config(1, ""), eps.clone());
    let mut r = d
        .route(rewritten_req("m", "adapter", true, "contract-sse"))
        .await
        .unwrap();
    assert!(r.rewrites_response());
    let h: Headers = [("content-type", "text/event-stream")]
        .into_iter()
        .collect();
    r.on_response_headers(200, &h);
    assert!(!r.holds_response_body(), "a stream is never held");
    let first =
        Bytes::from_static(b"data: {\"model\":\"adapter\",\"choices\":[{\"text\":\"a\"}]}\n\n");
    assert_eq!(
        &r.on_response_chunk(first, false)[..],
        b"data: {\"model\":\"m\",\"choices\":[{\"text\":\"a\"}]}\n\n"
    );
    // Nothing to rewrite: the very same buffer comes back.
    let plain = Bytes::from_static(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":5,\"total_tokens\":7}}\n\ndata: [DONE]\n\n");
    let out = r.on_response_chunk(plain.clone(), true);
    assert_eq!(out.as_ptr(), plain.as_ptr());
    assert_eq!(r.usage().unwrap().completion_tokens, 5);
    assert_eq!(eps.0.endpoints[0].inflight_requests(), 1);
    assert!(r.finish_response().is_empty());
    assert_eq!(eps.0.endpoints[0].inflight_requests(), 0);
    assert_eq!(
        hook_events("contract-sse").last().map(String::as_str),
        Some("complete:200:5:10.0.0.1:8000")
    );
}

#[tokio::test]
async fn the_response_contract_holds_a_rewritten_body_to_its_end() {
    let d = director(basic_config(1, ""), endpoints(1));
    let body = br#"{"model":"adapter","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
    // Chunks: nothing goes out until the last one, then the whole body, rewritten (the
    // rewrite pattern is split across the two chunks).
    let mut r = d
        .route(rewritten_req("m", "adapter", false, "contract-held"))
        .await
        .unwrap();
    r.on_response_headers(200, &Headers::new());
    assert!(r.holds_response_body());
    assert!(
        r.on_response_chunk(Bytes::from_static(&body[..12]), false)
            .is_empty()
    );
    let out = r.on_response_chunk(Bytes::from_static(&body[12..]), true);
    assert_eq!(
        &out[..],
        br#"{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#
    );
    assert_eq!(r.usage().unwrap().total_tokens, 7);
    assert!(r.finish_response().is_empty());
    // The end comes without a last chunk (trailers): finishing hands over what is held.
    let mut r = d
        .route(rewritten_req("m", "adapter", false, "contract-trailers"))
        .await
        .unwrap();
    r.on_response_headers(200, &Headers::new());
    assert!(
        r.on_response_chunk(Bytes::from_static(body), false)
            .is_empty()
    );
    assert_eq!(
        &r.finish_response()[..],
        br#"{"model":"m","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#
    );
    assert_eq!(
        hook_events("contract-trailers").last().map(String::as_str),
        Some("complete:200:4:10.0.0.1:8000")
    );
    // Nothing to rewrite and the default buffering: relayed as it comes.
    let mut r = d
        .route(req(completion_body("m", "x", false)))
        .await
        .unwrap();
    r.on_response_headers(200, &Headers::new());
    assert!(!r.holds_response_body() && !r.rewrites_response());
    let chunk = Bytes::from_static(&body[..12]);
    assert_eq!(
        r.on_response_chunk(chunk.clone(), false).as_ptr(),
        chunk.as_ptr()
    );
    r.finish();
}

#[tokio::test]
async fn the_response_contract_passes_a_body_over_the_hold_limit_through_unchanged() {
    let d = director(basic_config(1, ""), endpoints(1));
    let mut r = d
        .route(rewritten_req("m", "adapter", false, "contract-over"))
        .await
        .unwrap();
    r.set_response_buffering(crate::ResponseBuffering {
        hold_all: true,
        limit: 40,
        prealloc: 16,
    });
    r.on_response_headers(200, &Headers::new());
    let body = br#"{"model":"adapter","text":"0123456789012345678901234567890123456789","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
    assert!(
        r.on_response_chunk(Bytes::from_static(&body[..30]), false)
            .is_empty()
    );
    // Crossing the limit: what was held and this chunk, unchanged.
    let out = r.on_response_chunk(Bytes::from_static(&body[30..60]), false);
    assert_eq!(&out[..], &body[..60]);
    assert!(!r.holds_response_body());
    // And the rest unchanged, the very same buffers.
    let rest = Bytes::from_static(&body[60..]);
    assert_eq!(
        r.on_response_chunk(rest.clone(), true).as_ptr(),
        rest.as_ptr()
    );
    // The director's own usage buffer saw it all.
    assert_eq!(r.usage().unwrap().total_tokens, 7);
    r.finish();
    // hold_all holds a body with nothing to rewrite too (ext_proc answers it in one piece).
    let mut r = d
        .route(req(completion_body("m", "x", false)))
        .await
        .unwrap();
    r.set_response_buffering(crate::ResponseBuffering {
        hold_all: true,
        ..Default::default()
    });
    r.on_response_headers(200, &Headers::new());
    assert!(r.holds_response_body());
    assert!(
        r.on_response_chunk(Bytes::from_static(b"{\"a\":"), false)
            .is_empty()
    );
    assert_eq!(
        &r.on_response_chunk(Bytes::from_static(b"1}"), true)[..],
        b"{\"a\":1}"
    );
    r.finish();
}

#[tokio::test]
async fn after_dispatch_yields_once_then_runs_the_deferred_work_once() {
    let d = director(basic_config(1, ""), endpoints(1));
    let mut h = post_headers("/v1/completions");
    h.insert("x-request-id", "dispatch-yield");
    let mut r = d
        .route(IncomingRequest::new(h, completion_body("m", "hi", false)))
        .await
        .unwrap();
    assert!(!r.is_dispatched());
    // First poll: pending (the transport's write goes first), nothing run yet.
    {
        let mut fut = std::pin::pin!(r.after_dispatch());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(after_dispatch_runs("dispatch-yield"), 0);
        assert!(fut.as_mut().poll(&mut cx).is_ready());
    }
    assert_eq!(after_dispatch_runs("dispatch-yield"), 1);
    assert!(r.is_dispatched());
    r.after_dispatch().await;
    r.finish();
    assert_eq!(after_dispatch_runs("dispatch-yield"), 1);
}

/// Endpoints `10.0.0.1`/`.2` labelled prefill, `.3`/`.4` labelled decode.
fn pd_endpoints() -> Arc<StaticEndpoints> {
    use llmsched_core::endpoint::{Endpoint, EndpointId, EndpointMeta, EndpointSet};
    let endpoints = (1..=4u8)
        .map(|i| {
            let mut meta =
                EndpointMeta::from_addr(std::net::SocketAddr::from(([10, 0, 0, i], 8000)));
            meta.labels.insert(
                "llm-d.ai/role".into(),
                if i <= 2 { "prefill" } else { "decode" }.into(),
            );
            let e = Endpoint::new(EndpointId(u32::from(i)), meta);
            e.set_metrics(EndpointMetrics {
                updated_at: Some(std::time::Instant::now()),
                ..Default::default()
            });
            Arc::new(e)
        })
        .collect();
    Arc::new(StaticEndpoints(Arc::new(EndpointSet {
        endpoints,
        generation: 1,
        synced: true,
    })))
}

fn pd_config(handler_params: &str) -> Arc<llmsched_core::config::LoadedConfig> {
    let yaml = format!(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: prefill-filter\n- type: decode-filter\n- type: prefix-cache-scorer\n- type: always-disagg-pd-decider\n- type: disagg-profile-handler\n  parameters: {handler_params}\nschedulingProfiles:\n- name: prefill\n  plugins:\n  - pluginRef: prefill-filter\n  - pluginRef: prefix-cache-scorer\n- name: decode\n  plugins:\n  - pluginRef: decode-filter\n  - pluginRef: prefix-cache-scorer\n"
    );
    load_config(&yaml).unwrap_or_else(|e| panic!("{e}"))
}

/// P/D through the director: the decode pick is the destination, the prefill pick travels in
/// `x-prefiller-host-port` and is charged (in flight) until the response headers arrive (the
/// sidecar answers after the prefill hop); each profile's pick is counted.
#[tokio::test]
async fn pd_decode_is_the_destination_and_prefill_is_charged_until_the_response_headers() {
    let eps = pd_endpoints();
    let mut reg = Registry::default();
    let metrics = EppMetrics::register(&mut reg, "c", "r");
    let d = Director::builder(
        pd_config("{deciders: {prefill: always-disagg-pd-decider}}"),
        eps.clone(),
    )
    .metrics(metrics)
    .build();
    let mut routed = d
        .route(req(completion_body("m", &"long prompt ".repeat(100), true)))
        .await
        .unwrap();
    let decode = routed.targets()[0].clone();
    assert_eq!(decode.label("llm-d.ai/role"), Some("decode"));
    assert_eq!(routed.destination(), decode.hostport());
    let prefill: Vec<_> = routed.stage_endpoints().cloned().collect();
    assert_eq!(prefill.len(), 1);
    assert_eq!(prefill[0].label("llm-d.ai/role"), Some("prefill"));
    assert_eq!(
        routed.headers_to_set(),
        &[(
            "x-prefiller-host-port".to_string(),
            prefill[0].hostport().to_string()
        )]
    );
    assert_eq!(prefill[0].inflight_requests(), 1);
    assert_eq!(prefill[0].dispatched_total(), 1);
    assert!(prefill[0].inflight_tokens() > 0);
    assert_eq!(decode.inflight_requests(), 1);
    let mut h = Headers::new();
    h.insert("content-type", "text/event-stream");
    routed.on_response_headers(200, &h);
    assert_eq!(
        prefill[0].inflight_requests(),
        0,
        "prefill done once decode answers"
    );
    assert_eq!(prefill[0].inflight_tokens(), 0);
    assert_eq!(decode.inflight_requests(), 1);
    routed.finish();
    assert_eq!(decode.inflight_requests(), 0);

    // A request dropped before any response releases both.
    let dropped = d
        .route(req(completion_body("m", "another one", false)))
        .await
        .unwrap();
    let p2: Vec<_> = dropped.stage_endpoints().cloned().collect();
    drop(dropped);
    assert_eq!(p2[0].inflight_requests(), 0);
    assert!(eps.0.endpoints.iter().all(|e| e.inflight_requests() == 0));

    let mut out = String::new();
    encode(&mut out, &reg).unwrap();
    // Two requests scheduled: two picks per profile, each on an endpoint of its role (which
    // endpoint the second request got is the scorers' business).
    let picks = |profile: &str| -> (u64, Vec<String>) {
        let prefix = format!("llmsched_profile_picks_total{{profile=\"{profile}\",pod_name=\"");
        let mut n = 0;
        let mut pods = Vec::new();
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix(&prefix) {
                let (pod, v) = rest.split_once("\"} ").unwrap();
                n += v.parse::<u64>().unwrap();
                pods.push(pod.to_string());
            }
        }
        (n, pods)
    };
    let role = |pod: &str| {
        eps.0
            .endpoints
            .iter()
            .find(|e| e.name() == pod)
            .and_then(|e| e.label("llm-d.ai/role").map(str::to_string))
    };
    let (n, pods) = picks("prefill");
    assert_eq!(n, 2, "{out}");
    assert!(pods.contains(&prefill[0].name().to_string()), "{out}");
    assert!(pods.iter().all(|p| role(p).as_deref() == Some("prefill")));
    let (n, pods) = picks("decode");
    assert_eq!(n, 2, "{out}");
    assert!(pods.contains(&decode.name().to_string()), "{out}");
    assert!(pods.iter().all(|p| role(p).as_deref() == Some("decode")));
}

/// Decoders not scraped yet while the prefillers are (a P/D pool starting up): the healthy
/// candidates are all prefillers, so the decode profile falls back on the held-back decoders
/// instead of failing with "failed to find available decode workers"; the whole request does
/// not fail open (the prefill profile still sees only healthy prefillers).
#[tokio::test]
async fn pd_decoders_not_yet_scraped_are_used_by_the_decode_profile_alone() {
    let eps = pd_endpoints();
    for e in &eps.0.endpoints[2..] {
        e.set_metrics(EndpointMetrics::default());
    }
    let handle = llmsched_core::registry::PluginHandle::default();
    let yaml = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: prefill-filter\n- type: decode-filter\n- type: prefix-cache-scorer\n- type: always-disagg-pd-decider\n- type: disagg-profile-handler\n  parameters: {deciders: {prefill: always-disagg-pd-decider}}\nschedulingProfiles:\n- name: prefill\n  plugins:\n  - pluginRef: prefill-filter\n  - pluginRef: prefix-cache-scorer\n- name: decode\n  plugins:\n  - pluginRef: decode-filter\n  - pluginRef: prefix-cache-scorer\n";
    let config = load_config_with(yaml, &handle).unwrap();
    let health = crate::HealthMetrics::default();
    let d = Director::builder(config, eps.clone())
        .health_metrics(health.clone())
        .build();
    let routed = d
        .route(req(completion_body("m", "a long prompt", false)))
        .await
        .unwrap();
    assert_eq!(routed.targets()[0].label("llm-d.ai/role"), Some("decode"));
    let prefill: Vec<_> = routed.stage_endpoints().cloned().collect();
    assert_eq!(prefill.len(), 1);
    assert_eq!(prefill[0].label("llm-d.ai/role"), Some("prefill"));
    assert_eq!(health.fail_open.get(), 0, "the request did not fail open");
    let fail_open = |profile: &str| {
        handle
            .metrics
            .profile_fail_open
            .get_or_create(&llmsched_core::metrics::ProfileLabel {
                profile: profile.into(),
            })
            .get()
    };
    assert_eq!(fail_open("decode"), 1);
    assert_eq!(fail_open("prefill"), 0);
    routed.finish();
    // Once the decoders are scraped, the decode profile stays on the healthy candidates.
    for e in &eps.0.endpoints[2..] {
        e.set_metrics(EndpointMetrics {
            updated_at: Some(std::time::Instant::now()),
            ..Default::default()
        });
    }
    d.route(req(completion_body("m", "another prompt", false)))
        .await
        .unwrap()
        .finish();
    assert_eq!(fail_open("decode"), 1);
}

/// A reroute after the decode pick could not be reached keeps P/D's accounting and headers:
/// the prefill charge moves to the new decision's prefill pick, `x-prefiller-host-port` names
/// it, and `primaryPort` still redirects the destination.
#[tokio::test]
async fn pd_reroute_moves_the_prefill_charge_and_keeps_the_destination_override() {
    let eps = pd_endpoints();
    let d = director(
        pd_config("{deciders: {prefill: always-disagg-pd-decider}, primaryPort: 8200}"),
        eps.clone(),
    );
    let mut routed = d
        .route(req(completion_body("m", "hello there", false)))
        .await
        .unwrap();
    let first_decode = routed.targets()[0].clone();
    let first_prefill: Vec<_> = routed.stage_endpoints().cloned().collect();
    assert_eq!(first_prefill[0].inflight_requests(), 1);
    d.reroute(&mut routed, &[first_decode.id(), first_prefill[0].id()])
        .unwrap();
    let decode = routed.targets()[0].clone();
    assert_ne!(decode.id(), first_decode.id());
    assert_eq!(decode.label("llm-d.ai/role"), Some("decode"));
    assert_eq!(
        routed.destination(),
        format!("{}:8200", decode.meta().address)
    );
    let prefill: Vec<_> = routed.stage_endpoints().cloned().collect();
    assert_eq!(prefill.len(), 1);
    assert_ne!(prefill[0].id(), first_prefill[0].id());
    assert_eq!(
        first_prefill[0].inflight_requests(),
        0,
        "old prefill released"
    );
    assert_eq!(prefill[0].inflight_requests(), 1);
    assert_eq!(first_decode.inflight_requests(), 0);
    assert_eq!(decode.inflight_requests(), 1);
    assert!(
        routed
            .headers_to_set()
            .iter()
            .any(|(k, v)| k == "x-prefiller-host-port" && *v == prefill[0].hostport()),
        "{:?}",
        routed.headers_to_set()
    );
    routed.finish();
    assert!(eps.0.endpoints.iter().all(|e| e.inflight_requests() == 0));
}

/// `primaryPort`: Envoy (and the proxy) go to the decode pick's address on the sidecar's
/// port; the accounting stays with the pick.
#[tokio::test]
async fn pd_primary_port_redirects_the_destination() {
    let eps = pd_endpoints();
    let d = director(pd_config("{primaryPort: 8200}"), eps.clone());
    let routed = d
        .route(req(completion_body("m", "hello", false)))
        .await
        .unwrap();
    let pick = routed.targets()[0].clone();
    assert_eq!(
        routed.destination(),
        format!("{}:8200", pick.meta().address)
    );
    assert_eq!(
        routed.headers_to_set(),
        &[(
            "x-data-parallel-host-port".to_string(),
            pick.hostport().to_string()
        )]
    );
    assert_eq!(pick.inflight_requests(), 1);
    assert_eq!(
        routed.stage_endpoints().count(),
        0,
        "no decider: no prefill"
    );
    routed.finish();
    assert_eq!(pick.inflight_requests(), 0);
}
