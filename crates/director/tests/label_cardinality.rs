//! Bounded label cardinality: model names nobody vouches for (no objective or rewrite names
//! them, no endpoint advertises them, no model server has served them) are counted under
//! `model_name="other"`, so a flood of made-up names cannot grow `/metrics` or memory, while
//! real models (a base model and its LoRA adapters) keep their own series.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use llmsched_core::endpoint::{EndpointMetrics, StaticEndpoints};
use llmsched_core::metrics::SchedulerMetrics;
use llmsched_core::objectives::parse_manifests;
use llmsched_core::registry::PluginHandle;
use llmsched_core::request::Headers;
use llmsched_director::testing::*;
use llmsched_director::{Director, EppMetrics, IncomingRequest};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

const CONFIG: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: max-score-picker\n";

const REWRITES: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: InferenceModelRewrite\nmetadata: {name: canary}\nspec:\n  rules:\n  - matches: [{model: {value: food-review}}]\n    targets: [{modelRewrite: food-review-v2}]\n";

struct Setup {
    director: Director,
    registry: Registry,
    eps: Arc<StaticEndpoints>,
}

/// A director wired as `llmsched epp` wires it: EPP and scheduler metrics in one registry,
/// sharing their known names; objectives with one rewrite.
fn setup() -> Setup {
    let mut registry = Registry::default();
    let scheduler = Arc::new(SchedulerMetrics::register(&mut registry));
    let handle = PluginHandle {
        metrics: scheduler.clone(),
        ..PluginHandle::default()
    };
    let config = load_config_with(CONFIG, &handle).unwrap();
    let metrics = EppMetrics::register(&mut registry, "test", "test");
    let eps = endpoints(2);
    let director = Director::builder(config, eps.clone())
        .metrics(metrics)
        .scheduler_metrics(scheduler)
        .objectives(Arc::new(ArcSwap::from_pointee(
            parse_manifests(REWRITES, "test").unwrap(),
        )))
        .build();
    Setup {
        director,
        registry,
        eps,
    }
}

fn metrics_text(reg: &Registry) -> String {
    let mut out = String::new();
    encode(&mut out, reg).unwrap();
    out
}

/// One request for `model` answered with `status` (the whole life of a request).
async fn serve(d: &Director, model: &str, status: u16) {
    let mut r = d
        .route(IncomingRequest::new(
            post_headers("/v1/completions"),
            completion_body(model, "hello", false),
        ))
        .await
        .unwrap();
    let h: Headers = [("content-type", "application/json")].into_iter().collect();
    r.on_response_headers(status, &h);
    let body = if status == 200 {
        br#"{"usage":{"prompt_tokens":3,"completion_tokens":2}}"#.to_vec()
    } else {
        br#"{"error":{"message":"The model does not exist."}}"#.to_vec()
    };
    r.on_response_body(&body, true);
    r.finish();
}

fn count_of(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
}

/// 100,000 requests with unique model names (answered 404, as vLLM answers a model it does
/// not serve): `/metrics` stays under 1 MB and the `other` series counts every one of them;
/// the served base model, an advertised LoRA adapter and a rewritten model keep their own.
#[tokio::test]
async fn a_flood_of_unique_model_names_folds_into_other() {
    let s = setup();
    let d = &s.director;
    // The base model is served once; an endpoint lists a LoRA adapter.
    serve(d, "base", 200).await;
    let mut m = EndpointMetrics::clone(&s.eps.0.endpoints[1].metrics());
    m.running_lora_adapters = vec!["sql-lora".into()];
    m.updated_at = Some(Instant::now());
    s.eps.0.endpoints[1].set_metrics(m);

    let n: u64 = std::env::var("LABEL_FLOOD_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    for i in 0..n {
        serve(d, &format!("made-up-model-{i}"), 404).await;
    }
    serve(d, "base", 200).await;
    serve(d, "sql-lora", 200).await;
    serve(d, "food-review", 200).await;

    let text = metrics_text(&s.registry);
    assert!(
        text.len() < 1_000_000,
        "/metrics is {} bytes after {n} unique model names",
        text.len()
    );
    assert!(!text.contains("made-up-model"), "no made-up name leaks");
    let total = "inference_objective_request_total";
    assert_eq!(
        count_of(
            &text,
            &format!("{total}{{model_name=\"other\",target_model_name=\"other\",priority=\"0\"}}")
        ),
        Some(n + 1),
        "the flood, plus the base model's first request (routed before it was ever served)"
    );
    assert_eq!(
        count_of(
            &text,
            "inference_objective_request_error_total{model_name=\"other\",target_model_name=\"other\",error_code=\"ModelServerError\"}"
        ),
        Some(n)
    );
    // Scheduler attempts carry endpoint labels too: sum the `other` lines.
    let attempts: u64 = text
        .lines()
        .filter(|l| {
            l.starts_with(
                "inference_extension_scheduler_attempts_total{status=\"success\",target_model_name=\"other\"",
            )
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(attempts, n + 1, "scheduler attempts fold the same way");
    // Real models keep their series. "base" was served before the flood (learned); its
    // first request, routed before any response, counts under `other` (one of n + 1).
    assert_eq!(
        count_of(
            &text,
            &format!("{total}{{model_name=\"base\",target_model_name=\"base\",priority=\"0\"}}")
        ),
        Some(1)
    );
    assert_eq!(
        count_of(
            &text,
            &format!(
                "{total}{{model_name=\"sql-lora\",target_model_name=\"sql-lora\",priority=\"0\"}}"
            )
        ),
        Some(1),
        "an advertised adapter is its own series from its first request"
    );
    assert_eq!(
        count_of(
            &text,
            &format!(
                "{total}{{model_name=\"food-review\",target_model_name=\"food-review-v2\",priority=\"0\"}}"
            )
        ),
        Some(1),
        "a rewritten model and its target are named by the rewrite"
    );
    assert_eq!(
        count_of(
            &text,
            "inference_objective_running_requests{model_name=\"other\"}"
        ),
        Some(0)
    );
}

/// A model learned while one of its requests is in flight: the in-flight request keeps the
/// label it was routed with, so the running-requests gauge goes back to 0 on both series.
#[tokio::test]
async fn labels_are_fixed_for_a_requests_life() {
    let s = setup();
    let d = &s.director;
    let first = d
        .route(IncomingRequest::new(
            post_headers("/v1/completions"),
            completion_body("new-model", "a", false),
        ))
        .await
        .unwrap();
    let text = metrics_text(&s.registry);
    assert_eq!(
        count_of(
            &text,
            "inference_objective_running_requests{model_name=\"other\"}"
        ),
        Some(1)
    );
    serve(d, "new-model", 200).await; // routed as `other` too, then learned
    serve(d, "new-model", 200).await; // its own series
    first.finish();
    let text = metrics_text(&s.registry);
    assert_eq!(
        count_of(
            &text,
            "inference_objective_running_requests{model_name=\"other\"}"
        ),
        Some(0)
    );
    assert_eq!(
        count_of(
            &text,
            "inference_objective_running_requests{model_name=\"new-model\"}"
        ),
        Some(0)
    );
    assert_eq!(
        count_of(
            &text,
            "inference_objective_request_total{model_name=\"new-model\",target_model_name=\"new-model\",priority=\"0\"}"
        ),
        Some(1)
    );
}

/// The rewrite header is the client's: an unknown target folds too, and a target served
/// with 2xx becomes known.
#[tokio::test]
async fn client_chosen_targets_fold() {
    let s = setup();
    let d = &s.director;
    serve(d, "base", 200).await;
    for i in 0..50 {
        let mut h = post_headers("/v1/completions");
        let target = format!("junk-target-{i}");
        h.insert("x-llm-d-model-name-rewrite", target.as_str());
        let r = d
            .route(IncomingRequest::new(h, completion_body("base", "x", false)))
            .await
            .unwrap();
        drop(r);
    }
    let text = metrics_text(&s.registry);
    assert!(!text.contains("junk-target"), "{text}");
    assert_eq!(
        count_of(
            &text,
            "inference_objective_request_total{model_name=\"base\",target_model_name=\"other\",priority=\"0\"}"
        ),
        Some(50)
    );
}

/// Fairness ids come from a header: the first 64 keep their label in the flow-control
/// metrics, later ones count under `other`; the queues still key on the real ids.
#[tokio::test]
async fn fairness_ids_in_flow_control_metrics_are_bounded() {
    let mut registry = Registry::default();
    let metrics = EppMetrics::register(&mut registry, "test", "test");
    let yaml = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\nplugins:\n- type: queue-scorer\n- type: max-score-picker\n";
    let d = Director::builder(load_config(yaml).unwrap(), endpoints(1))
        .metrics(metrics)
        .build();
    for i in 0..200 {
        let mut h = post_headers("/v1/completions");
        let id = format!("tenant-{i}");
        h.insert("x-llm-d-inference-fairness-id", id.as_str());
        let r = d
            .route(IncomingRequest::new(h, completion_body("m", "x", false)))
            .await
            .unwrap();
        r.finish();
    }
    let text = metrics_text(&registry);
    let ids: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("inference_extension_flow_control_request_queue_duration_seconds_count")
        })
        .filter_map(|l| l.split("fairness_id=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(ids.len(), 65, "{ids:?}");
    assert!(ids.contains("other") && ids.contains("tenant-0") && !ids.contains("tenant-199"));
    assert_eq!(
        count_of(
            &text,
            "inference_extension_flow_control_request_queue_duration_seconds_count{fairness_id=\"other\",priority=\"0\",outcome=\"Dispatched\",inference_pool=\"\",model_name=\"other\",target_model_name=\"other\"}"
        ),
        Some(136)
    );
}
