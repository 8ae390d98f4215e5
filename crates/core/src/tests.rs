//! Framework tests: config loading rules and the scheduler's arithmetic, exercised with small
//! test plugins defined here (the real plugins live in `llmsched-plugins` and are tested
//! there against their formulas).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use smallvec::SmallVec;

use crate::config::{ConfigSource, LoadedConfig, load, load_default};
use crate::cycle::CycleState;
use crate::endpoint::{Endpoint, EndpointMetrics, StaticEndpoints};
use crate::error::{ErrorCode, InferenceError};
use crate::plugin::*;
use crate::registry::{FactoryInput, PluginError, PluginHandle, Registry, parse_params};
use crate::request::{Headers, InferenceRequest, RequestBody};
use crate::scheduler::{ProfileResults, SchedulerProfile, SchedulingResult};

/// Scores each endpoint by its waiting queue: 1 / (1 + q), or a constant.
struct TestScorer {
    type_name: &'static str,
    name: String,
    constant: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct TestScorerParams {
    constant: Option<f64>,
    block_size: Option<u32>,
    max_prefix_blocks_to_match: Option<u32>,
    lru_capacity_per_server: Option<u32>,
}

impl Plugin for TestScorer {
    fn type_name(&self) -> &'static str {
        self.type_name
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn as_scorer(self: Arc<Self>) -> Option<Arc<dyn Scorer>> {
        Some(self)
    }
}

impl Scorer for TestScorer {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Balance
    }
    fn score(&self, _cx: &SchedulingContext<'_>, c: &[Candidate<'_>], out: &mut [f64]) {
        for (e, s) in c.iter().zip(out.iter_mut()) {
            *s = self
                .constant
                .unwrap_or_else(|| 1.0 / (1.0 + f64::from(e.metrics().waiting_queue_size)));
        }
    }
}

fn scorer_factory(type_name: &'static str) -> crate::registry::Factory {
    macro_rules! f {
        ($t:literal) => {{
            fn make(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
                let p: TestScorerParams = parse_params(i.parameters)?;
                Ok(Arc::new(TestScorer {
                    type_name: $t,
                    name: i.name.to_string(),
                    constant: p.constant,
                }))
            }
            make
        }};
    }
    match type_name {
        "queue-scorer" => f!("queue-scorer"),
        "kv-cache-utilization-scorer" => f!("kv-cache-utilization-scorer"),
        _ => f!("prefix-cache-scorer"),
    }
}

/// Keeps endpoints whose name is not `drop`.
struct DropFilter(String);
impl Plugin for DropFilter {
    fn type_name(&self) -> &'static str {
        "drop-filter"
    }
    fn name(&self) -> &str {
        &self.0
    }
    fn as_filter(self: Arc<Self>) -> Option<Arc<dyn Filter>> {
        Some(self)
    }
}
impl Filter for DropFilter {
    fn filter(&self, _cx: &SchedulingContext<'_>, c: &mut Vec<Candidate<'_>>) {
        c.retain(|e| e.meta().port != 9999);
    }
}

/// Deterministic max picker (first of the best).
struct MaxPicker(String);
impl Plugin for MaxPicker {
    fn type_name(&self) -> &'static str {
        "max-score-picker"
    }
    fn name(&self) -> &str {
        &self.0
    }
    fn as_picker(self: Arc<Self>) -> Option<Arc<dyn Picker>> {
        Some(self)
    }
}
impl Picker for MaxPicker {
    fn pick<'a>(&self, _cx: &SchedulingContext<'_>, s: &mut [ScoredEndpoint<'a>]) -> Picked<'a> {
        s.sort_by(|a, b| b.score.total_cmp(&a.score));
        s.iter().take(1).map(|x| x.endpoint).collect()
    }
}

struct Single(String);
impl Plugin for Single {
    fn type_name(&self) -> &'static str {
        "single-profile-handler"
    }
    fn name(&self) -> &str {
        &self.0
    }
    fn as_profile_handler(self: Arc<Self>) -> Option<Arc<dyn ProfileHandler>> {
        Some(self)
    }
}
impl ProfileHandler for Single {
    fn pick_profiles(
        &self,
        _cx: &SchedulingContext<'_>,
        profiles: &[Arc<SchedulerProfile>],
        results: &ProfileResults,
    ) -> SmallVec<[usize; 2]> {
        (0..profiles.len())
            .filter(|i| !results.has_run(*i))
            .collect()
    }
    fn process_results(
        &self,
        _cx: &SchedulingContext<'_>,
        results: ProfileResults,
    ) -> Result<SchedulingResult, String> {
        let (_, name, r) = results.entries.into_iter().next().ok_or("no profile")?;
        let r = r.ok_or_else(|| format!("failed to run scheduler profile '{name}'"))?;
        Ok(SchedulingResult {
            primary_profile: name.clone(),
            profiles: vec![(name, r)],
        })
    }
}

struct TestParser(String);
impl Plugin for TestParser {
    fn type_name(&self) -> &'static str {
        "openai-parser"
    }
    fn name(&self) -> &str {
        &self.0
    }
    fn as_parser(self: Arc<Self>) -> Option<Arc<dyn Parser>> {
        Some(self)
    }
}
impl Parser for TestParser {
    fn parse_request(&self, body: Bytes, _h: &Headers) -> Result<ParseOutcome, InferenceError> {
        Ok(ParseOutcome::Parsed(RequestBody::raw(body)))
    }
}

fn registry() -> Registry {
    let mut r = Registry::new();
    for t in [
        "queue-scorer",
        "kv-cache-utilization-scorer",
        "prefix-cache-scorer",
        "active-request-scorer",
    ] {
        r.register(t, scorer_factory(t));
    }
    r.register("drop-filter", |i| Ok(Arc::new(DropFilter(i.name.into()))));
    r.register("max-score-picker", |i| {
        Ok(Arc::new(MaxPicker(i.name.into())))
    });
    r.register("single-profile-handler", |i| {
        Ok(Arc::new(Single(i.name.into())))
    });
    r.register("openai-parser", |i| Ok(Arc::new(TestParser(i.name.into()))));
    r.register_unsupported(
        "disagg-profile-handler",
        "P/D disaggregation is not implemented",
    );
    r
}

fn load_text(text: &str) -> Result<LoadedConfig, crate::config::ConfigError> {
    load(
        text,
        ConfigSource::File("test.yaml".into()),
        &registry(),
        &PluginHandle::default(),
    )
}

/// The seed guide's file, as deployed.
const SEED_GUIDE_CONFIG: &str = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
  parameters: { blockSize: 64, maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 31250 }
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
    weight: 2
  - pluginRef: kv-cache-utilization-scorer
    weight: 2
  - pluginRef: prefix-cache-scorer
    weight: 3
"#;

#[test]
fn seed_guide_config_loads_with_defaults_injected() {
    let c = load_text(SEED_GUIDE_CONFIG).unwrap();
    let profiles = c.scheduler.profiles();
    assert_eq!(profiles.len(), 1);
    assert_eq!(profiles[0].name(), "default");
    let weights: Vec<(&str, f64)> = profiles[0]
        .scorers()
        .iter()
        .map(|s| (s.scorer.name(), s.weight))
        .collect();
    assert_eq!(
        weights,
        vec![
            ("queue-scorer", 2.0),
            ("kv-cache-utilization-scorer", 2.0),
            ("prefix-cache-scorer", 3.0)
        ]
    );
    assert_eq!(profiles[0].picker().type_name(), "max-score-picker");
    assert_eq!(c.scheduler.handler().type_name(), "single-profile-handler");
    assert_eq!(c.parser.type_name(), "openai-parser");
    // No saturation detector is registered in this test registry.
    assert!(c.saturation_detector.is_none());
}

#[test]
fn default_config_adds_in_flight_balancing_to_the_reference_scorers() {
    let c = load_default(&registry(), &PluginHandle::default()).unwrap();
    let w: Vec<f64> = c.scheduler.profiles()[0]
        .scorers()
        .iter()
        .map(|s| s.weight)
        .collect();
    assert_eq!(w, vec![1.0, 1.0, 3.0, 3.0]);
    let reference = load_text(crate::config::REFERENCE_DEFAULT_CONFIG_YAML).unwrap();
    let w: Vec<f64> = reference.scheduler.profiles()[0]
        .scorers()
        .iter()
        .map(|s| s.weight)
        .collect();
    assert_eq!(w, vec![2.0, 2.0, 3.0]);
}

#[test]
fn missing_profiles_weights_and_picker_are_defaulted() {
    let c = load_text(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: drop-filter\n- type: queue-scorer\n- type: prefix-cache-scorer\n  name: prefix\n",
    )
    .unwrap();
    let p = &c.scheduler.profiles()[0];
    assert_eq!(p.name(), "default");
    assert_eq!(p.filters().count(), 1);
    assert_eq!(
        p.scorers()
            .iter()
            .map(|s| (s.scorer.name(), s.weight))
            .collect::<Vec<_>>(),
        vec![("queue-scorer", 1.0), ("prefix", 1.0)]
    );
    assert_eq!(p.picker().name(), "max-score-picker");
}

#[test]
fn broken_configs_name_source_plugin_and_field() {
    let base = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n";
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "empty"),
        ("plugins: [".into(), "test.yaml"),
        (
            "apiVersion: v9\nkind: EndpointPickerConfig\n".into(),
            "apiVersion 'v9'",
        ),
        (
            "apiVersion: llm-d.ai/v1alpha1\nkind: Other\n".into(),
            "kind 'Other'",
        ),
        (
            format!("{base}plugins:\n- type: no-such-scorer\n"),
            "unknown plugin type 'no-such-scorer'",
        ),
        (
            format!("{base}plugins:\n- type: disagg-profile-handler\n"),
            "not supported by llmsched yet",
        ),
        (
            format!(
                "{base}plugins:\n- type: prefix-cache-scorer\n  parameters: {{blockSise: 64}}\n"
            ),
            "plugin 'prefix-cache-scorer' (type prefix-cache-scorer): parameters: blockSise: unknown field `blockSise`",
        ),
        (
            format!(
                "{base}plugins:\n- type: prefix-cache-scorer\n  parameters: {{blockSize: big}}\n"
            ),
            "invalid type",
        ),
        (
            format!("{base}plugins:\n- name: x\n"),
            "plugins[0] ('x'): missing 'type'",
        ),
        (
            format!("{base}plugins:\n- type: queue-scorer\n- type: queue-scorer\n"),
            "duplicate plugin name 'queue-scorer'",
        ),
        (
            format!(
                "{base}plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: missing\n"
            ),
            "references undefined plugin 'missing'",
        ),
        (
            format!(
                "{base}plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n- name: b\n"
            ),
            "need a profile handler",
        ),
        (
            format!(
                "{base}plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: queue-scorer\n    weight: -1\n"
            ),
            "non-negative",
        ),
        (
            format!(
                "{base}plugins:\n- type: max-score-picker\n- type: max-score-picker\n  name: p2\nschedulingProfiles:\n- name: a\n  plugins:\n  - pluginRef: max-score-picker\n  - pluginRef: p2\n"
            ),
            "more than one picker",
        ),
        (
            format!("{base}featureGates: [warpDrive]\n"),
            "'warpDrive' is unknown",
        ),
        (
            format!("{base}unknownKey: 1\n"),
            "unknown field `unknownKey`",
        ),
        (
            format!("{base}parser: {{pluginRef: nope}}\n"),
            "parser references undefined plugin 'nope'",
        ),
        (
            format!("{base}plugins:\n- type: queue-scorer\nparser: {{pluginRef: queue-scorer}}\n"),
            "is not a parser",
        ),
        (
            format!("{base}featureGates: [flowControl]\nflowControl: {{maxBytes: 12Q}}\n"),
            "flowControl.maxBytes",
        ),
        (
            format!(
                "{base}featureGates: [flowControl]\nflowControl: {{defaultRequestTTL: soon}}\n"
            ),
            "flowControl.defaultRequestTTL",
        ),
        (
            format!("{base}dataLayer: {{discovery: {{pluginRef: file}}}}\n"),
            "dataLayer.discovery",
        ),
    ];
    for (text, needle) in cases {
        let err = match load_text(&text) {
            Ok(_) => panic!("config should fail ({needle}):\n{text}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(needle), "expected '{needle}' in: {err}");
        assert!(err.starts_with("config file test.yaml"), "{err}");
    }
}

#[test]
fn flow_control_settings_are_resolved() {
    let c = load_text(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\nflowControl:\n  maxBytes: 1Gi\n  maxRequests: 1k\n  defaultRequestTTL: 30s\n  priorityBands:\n  - {priority: 0, maxRequests: 10}\n  - {priority: 10, orderingPolicyRef: edf-ordering-policy, fairnessPolicyRef: round-robin-fairness-policy}\n",
    )
    .unwrap();
    let fc = c.flow_control.unwrap();
    assert_eq!(fc.max_bytes, Some(1 << 30));
    assert_eq!(fc.max_requests, Some(1000));
    assert_eq!(
        fc.default_request_ttl,
        Some(std::time::Duration::from_secs(30))
    );
    assert_eq!(fc.bands[0].priority, 10);
    assert!(fc.bands[0].edf_ordering && fc.bands[0].round_robin_fairness);
    assert_eq!(fc.bands[1].max_requests, Some(10));
}

fn eps(n: usize) -> StaticEndpoints {
    let addrs: Vec<SocketAddr> = (0..n)
        .map(|i| format!("127.0.0.{}:8000", i + 2).parse().unwrap())
        .collect();
    StaticEndpoints::from_addrs(&addrs)
}

fn set_queue(e: &Endpoint, q: u32) {
    e.set_metrics(EndpointMetrics {
        waiting_queue_size: q,
        ..Default::default()
    });
}

#[test]
fn scheduler_picks_by_weighted_clamped_sum() {
    let text = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: prefix-cache-scorer\n  name: big\n  parameters: {constant: 7.5}\nschedulingProfiles:\n- name: p\n  plugins:\n  - pluginRef: queue-scorer\n    weight: 2\n  - pluginRef: big\n    weight: 3\n";
    let c = load_text(text).unwrap();
    let set = eps(3);
    set_queue(&set.0.endpoints[0], 3);
    set_queue(&set.0.endpoints[1], 0);
    set_queue(&set.0.endpoints[2], 1);
    let req = InferenceRequest::new("r1", Headers::new(), None);
    let cands: Vec<_> = set.0.endpoints.iter().collect();
    let r = c
        .scheduler
        .schedule(&req, &CycleState::new(), &cands)
        .unwrap();
    assert_eq!(r.primary_profile, "p");
    assert_eq!(r.targets()[0].hostport(), "127.0.0.3:8000");
}

#[test]
fn filters_removing_everything_give_the_reference_429() {
    let text = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: drop-filter\n- type: queue-scorer\n";
    let c = load_text(text).unwrap();
    let set = StaticEndpoints::from_addrs(&["127.0.0.2:9999".parse().unwrap()]);
    let req = InferenceRequest::new("r1", Headers::new(), None);
    let cands: Vec<_> = set.0.endpoints.iter().collect();
    let e = c
        .scheduler
        .schedule(&req, &CycleState::new(), &cands)
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ResourceExhausted);
    assert_eq!(
        e.body(),
        "inference error: ResourceExhausted - failed to find target endpoint: failed to run scheduler profile 'default'"
    );
}

#[test]
fn nan_and_out_of_range_scores_are_clamped() {
    assert_eq!(crate::scheduler::clamp_score(f64::NAN), 0.0);
    assert_eq!(crate::scheduler::clamp_score(-2.0), 0.0);
    assert_eq!(crate::scheduler::clamp_score(7.0), 1.0);
    assert_eq!(crate::scheduler::clamp_score(0.25), 0.25);
}

fn named(c: &LoadedConfig, name: &str) -> Arc<dyn Plugin> {
    c.plugins
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p.clone())
        .unwrap_or_else(|| panic!("no plugin {name}"))
}

/// A reload (`load_reusing`) carries unchanged instances over (same `Arc`, so their state,
/// e.g. a prefix index, survives) and builds changed or new ones.
#[test]
fn reload_carries_over_unchanged_plugin_instances() {
    let doc = |plugins: &str, refs: &str| {
        format!(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n{plugins}schedulingProfiles:\n- name: default\n  plugins:\n{refs}"
        )
    };
    let first = load_text(&doc(
        "- name: keep\n  type: prefix-cache-scorer\n  parameters: {blockSize: 64}\n- name: tweak\n  type: queue-scorer\n  parameters: {constant: 0.5}\n- name: retype\n  type: queue-scorer\n",
        "  - {pluginRef: keep, weight: 1}\n  - {pluginRef: tweak}\n  - {pluginRef: retype}\n",
    ))
    .unwrap();
    let second = crate::config::load_reusing(
        &doc(
            "- name: keep\n  type: prefix-cache-scorer\n  parameters: {blockSize: 64}\n- name: tweak\n  type: queue-scorer\n  parameters: {constant: 0.25}\n- name: retype\n  type: kv-cache-utilization-scorer\n- name: added\n  type: queue-scorer\n",
            "  - {pluginRef: keep, weight: 5}\n  - {pluginRef: tweak}\n  - {pluginRef: retype}\n  - {pluginRef: added}\n",
        ),
        ConfigSource::File("test.yaml".into()),
        &registry(),
        &PluginHandle::default(),
        &first,
    )
    .unwrap();
    assert!(Arc::ptr_eq(&named(&first, "keep"), &named(&second, "keep")));
    assert!(!Arc::ptr_eq(
        &named(&first, "tweak"),
        &named(&second, "tweak")
    ));
    assert!(!Arc::ptr_eq(
        &named(&first, "retype"),
        &named(&second, "retype")
    ));
    assert_eq!(
        named(&second, "retype").type_name(),
        "kv-cache-utilization-scorer"
    );
    // Defaults the loader added are carried over too.
    for name in [
        "max-score-picker",
        "single-profile-handler",
        "openai-parser",
    ] {
        assert!(
            Arc::ptr_eq(&named(&first, name), &named(&second, name)),
            "{name}"
        );
    }
    // The new weights are in effect.
    let weights: Vec<(String, f64)> = second.scheduler.profiles()[0]
        .scorers()
        .iter()
        .map(|w| (w.scorer.name().to_string(), w.weight))
        .collect();
    assert!(weights.contains(&("keep".to_string(), 5.0)), "{weights:?}");
    assert_eq!(weights.len(), 4, "{weights:?}");
}

/// A broken reload fails with the error a first load gives.
#[test]
fn a_broken_reload_fails_like_a_first_load() {
    let good = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n";
    let first = load_text(good).unwrap();
    for broken in [
        format!("{good}schedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: missing\n"),
        good.replace("queue-scorer", "no-such-scorer"),
        format!("{good}  parameters: {{constant: 'x'}}\n"),
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins: [".to_string(),
        String::new(),
    ] {
        let at_start = load_text(&broken).unwrap_err();
        let on_reload = crate::config::load_reusing(
            &broken,
            ConfigSource::File("test.yaml".into()),
            &registry(),
            &PluginHandle::default(),
            &first,
        )
        .unwrap_err();
        assert_eq!(at_start, on_reload, "{broken}");
        assert!(
            on_reload.to_string().starts_with("config file test.yaml: "),
            "{on_reload}"
        );
    }
}
