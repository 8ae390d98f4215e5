//! Helpers for tests of the director and its transports (feature `test-util`): the real
//! plugins of `llmsched-plugins` plus a few test-only plugin types (a pre-request header
//! hook, a response-hook recorder, a deterministic saturation detector, a denying admitter
//! and a parser that can skip), configs, endpoints and bodies.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use llmsched_core::config::{ConfigSource, LoadedConfig, load};
use llmsched_core::endpoint::{Endpoint, EndpointMetrics, StaticEndpoints};
use llmsched_core::error::InferenceError;
use llmsched_core::plugin::*;
use llmsched_core::registry::{FactoryInput, PluginError, PluginHandle, Registry, parse_params};
use llmsched_core::request::{Headers, InferenceRequest};
use llmsched_core::{CycleState, SchedulingResult};
use serde::Deserialize;

macro_rules! named {
    ($t:ident, $type_name:literal, $($role:ident => $tr:ident),*) => {
        impl Plugin for $t {
            fn type_name(&self) -> &'static str {
                $type_name
            }
            fn name(&self) -> &str {
                &self.name
            }
            $(fn $role(self: Arc<Self>) -> Option<Arc<dyn $tr>> {
                Some(self)
            })*
        }
    };
}

/// `test-skip-parser`: the real `openai-parser`, except that requests carrying
/// `x-test-parse: skip` are skipped (forwarded unparsed to a random endpoint).
pub struct SkipParser {
    name: String,
    inner: Arc<dyn Parser>,
}
named!(SkipParser, "test-skip-parser", as_parser => Parser);

impl Parser for SkipParser {
    fn parse_request(
        &self,
        body: Bytes,
        headers: &Headers,
    ) -> Result<ParseOutcome, InferenceError> {
        if headers.get("x-test-parse") == Some("skip") {
            return Ok(ParseOutcome::Skip);
        }
        self.inner.parse_request(body, headers)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct SaturationParams {
    queue_depth_threshold: u32,
}

impl Default for SaturationParams {
    fn default() -> Self {
        Self {
            queue_depth_threshold: 5,
        }
    }
}

/// `test-saturation-detector{queueDepthThreshold=5}`: pool saturation = average of
/// waiting / threshold; an endpoint is saturated at the threshold.
pub struct QueueSaturation {
    name: String,
    threshold: u32,
}
named!(QueueSaturation, "test-saturation-detector", as_saturation_detector => SaturationDetector);

impl SaturationDetector for QueueSaturation {
    fn saturation(&self, c: &[Candidate<'_>], _: Instant) -> f64 {
        if c.is_empty() {
            return 1.0;
        }
        let t = f64::from(self.threshold.max(1));
        c.iter()
            .map(|e| f64::from(e.metrics().waiting_queue_size) / t)
            .sum::<f64>()
            / c.len() as f64
    }
    fn is_saturated(&self, e: &Endpoint, _: Instant) -> bool {
        e.metrics().waiting_queue_size >= self.threshold
    }
}

/// `test-pre-request`: sets `x-test-target: <primary hostport>` on the forwarded request.
pub struct TargetHeaderHook {
    name: String,
}
named!(TargetHeaderHook, "test-pre-request", as_pre_request => PreRequest);

impl PreRequest for TargetHeaderHook {
    fn pre_request(
        &self,
        _: &InferenceRequest,
        _: &CycleState,
        result: &SchedulingResult,
        headers: &mut Vec<(String, String)>,
    ) {
        if let Some(t) = result.targets().first() {
            headers.push(("x-test-target".into(), t.hostport().to_string()));
        }
    }

    fn after_dispatch(&self, request: &InferenceRequest, _: &CycleState, _: &SchedulingResult) {
        let mut seen = AFTER_DISPATCH
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *seen.entry(request.request_id.clone()).or_default() += 1;
    }
}

/// How often `test-pre-request`'s `after_dispatch` ran per request id.
static AFTER_DISPATCH: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

/// How many times `test-pre-request`'s `after_dispatch` ran for `request_id`.
pub fn after_dispatch_runs(request_id: &str) -> usize {
    AFTER_DISPATCH
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(request_id)
        .copied()
        .unwrap_or(0)
}

/// `test-deny-admitter`: rejects requests carrying `x-test-deny` with 403.
pub struct DenyAdmitter {
    name: String,
}
named!(DenyAdmitter, "test-deny-admitter", as_admitter => Admitter);

impl Admitter for DenyAdmitter {
    fn admit(
        &self,
        request: &InferenceRequest,
        _: &[Candidate<'_>],
        _: Instant,
    ) -> Result<(), InferenceError> {
        if request.headers.get("x-test-deny").is_some() {
            return Err(InferenceError::new(
                llmsched_core::ErrorCode::Forbidden,
                "denied by test admitter",
            ));
        }
        Ok(())
    }
}

static EVENTS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// Response hook events recorded for `request_id`, in order: `received:<status>`,
/// `chunk:<len>`, `complete:<status>:<completion tokens or ->`.
pub fn hook_events(request_id: &str) -> Vec<String> {
    EVENTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(id, _)| id == request_id)
        .map(|(_, e)| e.clone())
        .collect()
}

fn record(request_id: &str, event: String) {
    EVENTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((request_id.to_string(), event));
}

/// `test-recorder`: records response-hook calls (see [`hook_events`]) and adds
/// `x-test-hook: seen` to responses.
pub struct RecordingHooks {
    name: String,
}
named!(RecordingHooks, "test-recorder", as_response_hooks => ResponseHooks);

impl ResponseHooks for RecordingHooks {
    fn response_received(
        &self,
        request: &InferenceRequest,
        response: &mut llmsched_core::ResponseInfo,
        _: &Endpoint,
    ) {
        record(&request.request_id, format!("received:{}", response.status));
        response
            .headers_to_set
            .push(("x-test-hook".into(), "seen".into()));
    }
    fn response_streaming(
        &self,
        request: &InferenceRequest,
        _: &llmsched_core::ResponseInfo,
        chunk: &[u8],
        _: &Endpoint,
    ) {
        record(&request.request_id, format!("chunk:{}", chunk.len()));
    }
    fn response_complete(
        &self,
        request: &InferenceRequest,
        response: &llmsched_core::ResponseInfo,
        target: &Endpoint,
    ) {
        let tokens = response
            .usage
            .map_or("-".to_string(), |u| u.completion_tokens.to_string());
        record(
            &request.request_id,
            format!(
                "complete:{}:{}:{}",
                response.status,
                tokens,
                target.hostport()
            ),
        );
    }
}

fn name_of(i: &FactoryInput<'_>) -> String {
    i.name.to_string()
}

/// The real plugins (`llmsched_plugins::default_registry`) plus the test-only types above.
pub fn test_registry() -> Registry {
    let mut r = llmsched_plugins::default_registry();
    r.register("test-skip-parser", |i| {
        let real = llmsched_plugins::default_registry();
        let make = real
            .factory("openai-parser")
            .map_err(|e| PluginError::Other(e.to_string()))?;
        let inner = make(FactoryInput {
            name: "openai-parser",
            parameters: None,
            handle: i.handle,
        })?
        .as_parser()
        .ok_or_else(|| PluginError::Other("openai-parser is not a parser".into()))?;
        Ok(Arc::new(SkipParser {
            name: name_of(&i),
            inner,
        }))
    });
    r.register("test-saturation-detector", |i| {
        let p: SaturationParams = parse_params(i.parameters)?;
        Ok(Arc::new(QueueSaturation {
            name: name_of(&i),
            threshold: p.queue_depth_threshold,
        }))
    });
    r.register("test-pre-request", |i| {
        Ok(Arc::new(TargetHeaderHook { name: name_of(&i) }))
    });
    r.register("test-deny-admitter", |i| {
        Ok(Arc::new(DenyAdmitter { name: name_of(&i) }))
    });
    r.register("test-recorder", |i| {
        Ok(Arc::new(RecordingHooks { name: name_of(&i) }))
    });
    r
}

/// Loads `yaml` (an `EndpointPickerConfig`) with the test registry.
pub fn load_config(yaml: &str) -> Result<Arc<LoadedConfig>, llmsched_core::config::ConfigError> {
    load_config_with(yaml, &PluginHandle::default())
}

/// Loads `yaml` with the test registry and `handle`.
pub fn load_config_with(
    yaml: &str,
    handle: &PluginHandle,
) -> Result<Arc<LoadedConfig>, llmsched_core::config::ConfigError> {
    load(yaml, ConfigSource::Text, &test_registry(), handle).map(Arc::new)
}

/// A config: queue scorer + max-score picker (`max_endpoints` targets), the pre-request
/// header hook and the recorder, plus `extra` appended to the `plugins:` list.
pub fn basic_config(max_endpoints: usize, extra: &str) -> Arc<LoadedConfig> {
    let yaml = format!(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: max-score-picker\n  parameters: {{maxNumOfEndpoints: {max_endpoints}}}\n- type: test-pre-request\n- type: test-recorder\n{extra}"
    );
    match load_config(&yaml) {
        Ok(c) => c,
        Err(e) => panic!("test config does not load: {e}\n{yaml}"),
    }
}

/// Endpoints `10.0.0.{1..=n}:8000` with fresh, empty metrics.
pub fn endpoints(n: usize) -> Arc<StaticEndpoints> {
    let addrs: Vec<SocketAddr> = (1..=n)
        .map(|i| SocketAddr::from(([10, 0, 0, i as u8], 8000)))
        .collect();
    let eps = StaticEndpoints::from_addrs(&addrs);
    for e in &eps.0.endpoints {
        e.set_metrics(EndpointMetrics {
            updated_at: Some(Instant::now()),
            ..Default::default()
        });
    }
    Arc::new(eps)
}

/// Sets an endpoint's waiting queue (fresh metrics).
pub fn set_queue(e: &Endpoint, waiting: u32) {
    let mut m = EndpointMetrics::clone(&e.metrics());
    m.waiting_queue_size = waiting;
    m.updated_at = Some(Instant::now());
    e.set_metrics(m);
}

/// A completions body for `model` with `prompt`.
pub fn completion_body(model: &str, prompt: &str, stream: bool) -> Bytes {
    Bytes::from(
        serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 16, "stream": stream})
            .to_string(),
    )
}

/// Headers of a POST to `path`.
pub fn post_headers(path: &str) -> Headers {
    [
        (":method", "POST"),
        (":path", path),
        (":authority", "gateway"),
        ("content-type", "application/json"),
    ]
    .into_iter()
    .collect()
}
