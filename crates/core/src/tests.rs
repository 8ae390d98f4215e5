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
use crate::flowcontrol::{FairnessPolicy, FairnessState, OrderingPolicy, QueuedRequest};
use crate::plugin::*;
use crate::registry::{FactoryInput, PluginError, PluginHandle, Registry, parse_params};
use crate::request::{Headers, InferenceRequest, RequestBody};
use crate::scheduler::{ProfileResults, SchedulerProfile, SchedulingError, SchedulingResult};

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
    ) -> Result<SchedulingResult, SchedulingError> {
        let (_, name, r) = results
            .entries
            .into_iter()
            .next()
            .ok_or_else(|| SchedulingError::Handler("no profile".into()))?;
        let r = r.ok_or(SchedulingError::ProfileFailed(name.clone()))?;
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

/// A flow-control policy that only carries its type (the real ones live in
/// `llmsched-plugins`); `kind` says which role it has.
struct TestPolicy {
    type_name: &'static str,
    name: String,
    fairness: bool,
}
impl Plugin for TestPolicy {
    fn type_name(&self) -> &'static str {
        self.type_name
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn as_fairness_policy(self: Arc<Self>) -> Option<Arc<dyn FairnessPolicy>> {
        if self.fairness { Some(self) } else { None }
    }
    fn as_ordering_policy(self: Arc<Self>) -> Option<Arc<dyn OrderingPolicy>> {
        if self.fairness { None } else { Some(self) }
    }
}
struct NoState;
impl FairnessState for NoState {
    fn pick<'a>(&mut self, band: &'a crate::flowcontrol::BandQueues) -> Option<&'a str> {
        band.flows().next().map(|(k, _)| k)
    }
}
impl FairnessPolicy for TestPolicy {
    fn new_band_state(&self) -> Box<dyn FairnessState> {
        Box::new(NoState)
    }
}
impl OrderingPolicy for TestPolicy {
    fn less(&self, a: &QueuedRequest, b: &QueuedRequest) -> bool {
        a.seq < b.seq
    }
}

fn policy_factory(type_name: &'static str) -> crate::registry::Factory {
    macro_rules! f {
        ($t:literal, $fairness:literal) => {{
            fn make(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
                #[derive(Debug, Default, Deserialize)]
                #[serde(deny_unknown_fields, rename_all = "camelCase", default)]
                struct Params {
                    weight: Option<f64>,
                }
                let _: Params = parse_params(i.parameters)?;
                Ok(Arc::new(TestPolicy {
                    type_name: $t,
                    name: i.name.to_string(),
                    fairness: $fairness,
                }))
            }
            make
        }};
    }
    match type_name {
        "global-strict-fairness-policy" => f!("global-strict-fairness-policy", true),
        "round-robin-fairness-policy" => f!("round-robin-fairness-policy", true),
        "fcfs-ordering-policy" => f!("fcfs-ordering-policy", false),
        _ => f!("edf-ordering-policy", false),
    }
}

fn registry() -> Registry {
    let mut r = Registry::new();
    for t in [
        "global-strict-fairness-policy",
        "round-robin-fairness-policy",
        "fcfs-ordering-policy",
        "edf-ordering-policy",
    ] {
        r.register(t, policy_factory(t));
    }
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
    assert_eq!(fc.bands[0].ordering.type_name, "edf-ordering-policy");
    assert_eq!(
        fc.bands[0].fairness.type_name,
        "round-robin-fairness-policy"
    );
    assert_eq!(fc.bands[1].max_requests, Some(10));
    // Unset references get the reference's defaults, instantiated under their type names.
    assert_eq!(
        fc.bands[1].fairness.type_name,
        "global-strict-fairness-policy"
    );
    assert_eq!(fc.bands[1].ordering.type_name, "fcfs-ordering-policy");
    assert_eq!(
        fc.default_band.fairness.name,
        "global-strict-fairness-policy"
    );
    assert_eq!(fc.default_band.ordering.name, "fcfs-ordering-policy");
}

#[test]
fn policy_references_resolve_declared_instances_first() {
    let base =
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\n";
    // A declared instance under its own name, with parameters; bands share it.
    let c = load_text(&format!(
        "{base}plugins:\n- {{type: round-robin-fairness-policy, name: fair, parameters: {{weight: 2}}}}\n- {{type: edf-ordering-policy, name: deadline}}\nflowControl:\n  defaultPriorityBand: {{fairnessPolicyRef: fair, orderingPolicyRef: deadline}}\n  priorityBands:\n  - {{priority: 1, fairnessPolicyRef: fair}}\n"
    ))
    .unwrap();
    let fc = c.flow_control.unwrap();
    let d = &fc.default_band;
    assert_eq!(
        (d.fairness.name.as_str(), d.fairness.type_name),
        ("fair", "round-robin-fairness-policy")
    );
    assert_eq!(
        d.fairness.parameters,
        Some(serde_json::json!({"weight": 2}))
    );
    assert_eq!(
        (d.ordering.name.as_str(), d.ordering.type_name),
        ("deadline", "edf-ordering-policy")
    );
    assert!(Arc::ptr_eq(
        &d.fairness.policy,
        &fc.bands[0].fairness.policy
    ));
    // The band's unset ordering gets the default type, added once under its own name.
    assert_eq!(fc.bands[0].ordering.type_name, "fcfs-ordering-policy");
    let names: Vec<&str> = c.plugins.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "fcfs-ordering-policy")
            .count(),
        1,
        "{names:?}"
    );

    // The same configuration loaded twice compares equal (the director keeps its flow
    // controller); other parameters do not.
    let again = |w: u32| {
        load_text(&format!(
            "{base}plugins:\n- {{type: round-robin-fairness-policy, name: fair, parameters: {{weight: {w}}}}}\nflowControl:\n  defaultPriorityBand: {{fairnessPolicyRef: fair}}\n"
        ))
        .unwrap()
        .flow_control
        .unwrap()
    };
    assert_eq!(again(2), again(2));
    assert_ne!(again(2), again(3));

    for (text, needle) in [
        (
            format!("{base}flowControl:\n  defaultPriorityBand: {{fairnessPolicyRef: nope}}\n"),
            "flowControl.defaultPriorityBand.fairnessPolicyRef: 'nope' is not a declared plugin, and as a type: unknown plugin type 'nope'",
        ),
        (
            format!(
                "{base}plugins:\n- type: queue-scorer\nflowControl:\n  priorityBands:\n  - {{priority: 2, orderingPolicyRef: queue-scorer}}\n"
            ),
            "flowControl.priorityBands[0].orderingPolicyRef: plugin 'queue-scorer' (type queue-scorer) is not an ordering policy",
        ),
        (
            format!(
                "{base}flowControl:\n  priorityBands:\n  - {{priority: 2, fairnessPolicyRef: fcfs-ordering-policy}}\n"
            ),
            "is not a fairness policy",
        ),
        (
            format!(
                "{base}plugins:\n- {{type: round-robin-fairness-policy, parameters: {{bogus: 1}}}}\n"
            ),
            "unknown field `bogus`",
        ),
    ] {
        let err = match load_text(&text) {
            Ok(_) => panic!("config should fail ({needle}):\n{text}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(needle), "expected '{needle}' in: {err}");
    }
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

/// A profile whose filters leave none of the candidates runs again over the held-back
/// (unhealthy) endpoints, and that is counted per profile; a profile that finds candidates
/// never looks at the held-back ones.
#[test]
fn a_profile_left_without_candidates_falls_back_on_the_held_back_endpoints() {
    let text = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: drop-filter\n- type: queue-scorer\n";
    let handle = PluginHandle::default();
    let c = load(text, ConfigSource::Text, &registry(), &handle).unwrap();
    let set = StaticEndpoints::from_addrs(&[
        "127.0.0.2:9999".parse().unwrap(),
        "127.0.0.3:8000".parse().unwrap(),
        "127.0.0.4:8000".parse().unwrap(),
    ]);
    set_queue(&set.0.endpoints[1], 5);
    set_queue(&set.0.endpoints[2], 1);
    let req = InferenceRequest::new("r1", Headers::new(), None);
    let routable = [&set.0.endpoints[0]];
    let held_back = [&set.0.endpoints[1], &set.0.endpoints[2]];
    let counted = || {
        handle
            .metrics
            .profile_fail_open
            .get_or_create(&crate::metrics::ProfileLabel {
                profile: "default".into(),
            })
            .get()
    };
    // Without held-back endpoints: the reference's 429.
    assert!(
        c.scheduler
            .schedule(&req, &CycleState::new(), &routable)
            .is_err()
    );
    assert_eq!(counted(), 0);
    // With them: the profile's usual scoring over the held-back ones.
    let r = c
        .scheduler
        .schedule_with_held_back(&req, &CycleState::new(), &routable, &held_back)
        .unwrap();
    assert_eq!(r.targets()[0].hostport(), "127.0.0.4:8000");
    assert_eq!(counted(), 1);
    // A candidate that passes the filters wins over any held-back endpoint.
    let routable = [&set.0.endpoints[1]];
    let held_back = [&set.0.endpoints[2]];
    let r = c
        .scheduler
        .schedule_with_held_back(&req, &CycleState::new(), &routable, &held_back)
        .unwrap();
    assert_eq!(r.targets()[0].hostport(), "127.0.0.3:8000");
    assert_eq!(counted(), 1);
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
