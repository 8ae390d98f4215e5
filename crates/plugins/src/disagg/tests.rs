//! P/D through the configuration loader and the scheduler, as the director runs them:
//! producers → scheduler → pre-request hooks → after-dispatch bookkeeping. The shipped P/D
//! configurations (`config/epp/pd-*.yaml`: our own files with the plugin types and parameter
//! values of the reference's examples) load and route as the reference documents.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use llmsched_core::config::{ConfigSource, LoadedConfig, load as load_config};
use llmsched_core::cycle::CycleState;
use llmsched_core::endpoint::{Endpoint, label};
use llmsched_core::plugin::{Candidate, ParseOutcome};
use llmsched_core::registry::PluginHandle;
use llmsched_core::request::{Headers, InferenceRequest, header};

use super::*;
use crate::common::testutil::*;

fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config/epp")
}

/// A shipped configuration, with `${VAR}` replaced as the reference's deploy script does.
fn shipped(file: &str, vars: &[(&str, &str)]) -> String {
    let mut text =
        std::fs::read_to_string(config_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    for (k, v) in vars {
        text = text.replace(&format!("${{{k}}}"), v);
    }
    text
}

fn load_with(text: &str, handle: &PluginHandle) -> Result<LoadedConfig, String> {
    load_config(text, ConfigSource::Text, &crate::default_registry(), handle)
        .map_err(|e| e.to_string())
}

fn load_ok(text: &str) -> LoadedConfig {
    load_with(text, &PluginHandle::default()).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Two prefill endpoints (ids 1, 2) and two decode endpoints (ids 3, 4), idle.
fn pool() -> Vec<Arc<Endpoint>> {
    (1..=4)
        .map(|i| {
            let role = if i <= 2 { "prefill" } else { "decode" };
            ep_with(i, &[(label::ROLE, role)], load(0, 0, 0.1))
        })
        .collect()
}

struct Routed {
    decode: String,
    prefill: Option<String>,
    headers: Vec<(String, String)>,
}

impl Routed {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn completion(prompt: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&serde_json::json!({"model": "m", "prompt": prompt, "max_tokens": 8}))
            .unwrap(),
    )
}

/// Routes `body` over `eps` the way the director does; the pre-request hooks' headers are
/// returned with the decision.
fn route_with(
    c: &LoadedConfig,
    eps: &[Arc<Endpoint>],
    body: Bytes,
    client_headers: &[(&str, &str)],
) -> Result<Routed, String> {
    let cands: Vec<Candidate<'_>> = eps.iter().collect();
    let mut headers: Headers = [(":path", "/v1/completions")].into_iter().collect();
    for (k, v) in client_headers {
        headers.insert(*k, *v);
    }
    let ParseOutcome::Parsed(parsed) = c.parser.parse_request(body, &headers).unwrap() else {
        panic!("skipped")
    };
    let mut req = InferenceRequest::new("r", headers, Some(parsed));
    req.target_model = req.incoming_model.clone();
    let mut cycle = CycleState::new();
    for (p, _) in &c.data_producers {
        p.produce(&req, &mut cycle, &cands);
    }
    let result = c
        .scheduler
        .schedule(&req, &cycle, &cands)
        .map_err(|e| e.to_string())?;
    let mut headers = Vec::new();
    for (p, _) in &c.pre_request {
        p.pre_request(&req, &cycle, &result, &mut headers);
    }
    for (p, _) in &c.pre_request {
        p.after_dispatch(&req, &cycle, &result);
    }
    Ok(Routed {
        decode: result.targets()[0].name().to_string(),
        prefill: result
            .profile("prefill")
            .map(|r| r.targets[0].name().to_string()),
        headers,
    })
}

fn route(c: &LoadedConfig, eps: &[Arc<Endpoint>], prompt: &str) -> Routed {
    route_with(c, eps, completion(prompt), &[]).unwrap()
}

fn role_of(eps: &[Arc<Endpoint>], name: &str) -> String {
    eps.iter()
        .find(|e| e.name() == name)
        .and_then(|e| e.label(label::ROLE))
        .unwrap_or_default()
        .to_string()
}

fn hostport(eps: &[Arc<Endpoint>], name: &str) -> String {
    eps.iter()
        .find(|e| e.name() == name)
        .unwrap()
        .hostport()
        .to_string()
}

/// Words of ~6 bytes: `n` words ≈ 1.5·n estimated tokens.
fn prompt(seed: &str, words: usize) -> String {
    (0..words)
        .map(|i| format!("{seed}{i:04}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn every_shipped_pd_config_loads_unchanged() {
    let files = [
        ("pd-epp-config.yaml", "disagg-profile-handler"),
        ("pd-sim-epp-config.yaml", "disagg-profile-handler"),
        ("pd-headers-handler.yaml", "disagg-profile-handler"),
        ("pd-decider-profile-handler.yaml", "pd-profile-handler"),
        ("pd-threshold-profile-handler.yaml", "pd-profile-handler"),
        ("pd-guide-always.yaml", "pd-profile-handler"),
    ];
    for (file, handler) in files {
        let c = load_ok(&shipped(file, &[("PRIMARY_PORT", "0")]));
        assert_eq!(c.scheduler.handler().type_name(), handler, "{file}");
        let names: Vec<&str> = c.scheduler.profiles().iter().map(|p| p.name()).collect();
        assert_eq!(names, ["prefill", "decode"], "{file}");
    }
    // Without the deploy script's substitution the placeholder is refused, naming the field.
    let e = load_with(
        &shipped("pd-threshold-profile-handler.yaml", &[]),
        &PluginHandle::default(),
    )
    .unwrap_err();
    assert!(
        e.contains("primaryPort") && e.contains("invalid type"),
        "{e}"
    );
}

/// The reference's current example (`pd-epp-config.yaml`): an uncached prompt is prefilled on
/// a prefill endpoint and decoded on a decode endpoint; sent again, the decode endpoint holds
/// it and it stays there without a prefill hop; a follow-up that shares the prefix goes to the
/// prefill endpoint that holds it; short prompts never disaggregate.
#[test]
fn prefix_based_decider_skips_the_prefill_hop_for_cached_prompts() {
    let handle = PluginHandle::default();
    let c = load_with(&shipped("pd-epp-config.yaml", &[]), &handle).unwrap();
    let eps = pool();
    let long = prompt("doc", 400);

    let first = route(&c, &eps, &long);
    assert_eq!(role_of(&eps, &first.decode), "decode");
    let p = first
        .prefill
        .clone()
        .expect("an uncached long prompt is disaggregated");
    assert_eq!(role_of(&eps, &p), "prefill");
    assert_eq!(
        first.header(PREFILLER_HOST_PORT),
        Some(hostport(&eps, &p).as_str())
    );

    // The same prompt: the decode endpoint that holds it wins and needs no prefill.
    let again = route(&c, &eps, &long);
    assert_eq!(again.decode, first.decode);
    assert_eq!(again.prefill, None);
    assert_eq!(again.header(PREFILLER_HOST_PORT), None);

    // The prefix plus a new question of ≥ 16 tokens: disaggregated again, and the prefill
    // profile's prefix scorer finds the prefill endpoint that computed the prefix.
    let follow = route(&c, &eps, &format!("{long} {}", prompt("question", 60)));
    assert_eq!(follow.decode, first.decode);
    assert_eq!(follow.prefill.as_deref(), Some(p.as_str()));

    // Short prompts (< 16 estimated tokens) never disaggregate.
    let short = route(&c, &eps, "hi there");
    assert_eq!(short.prefill, None);

    // The handler counted into the handle's metrics: 2 disaggregated, 2 local.
    let counts = &handle.metrics.disagg.disagg;
    let get = |d: &str| {
        counts
            .get_or_create(&llmsched_core::metrics::DecisionLabels {
                plugin_name: "disagg-profile-handler".into(),
                plugin_type: "disagg-profile-handler".into(),
                model_name: "m".into(),
                decision_type: d.into(),
            })
            .get()
    };
    assert_eq!(get(DECISION_PREFILL_DECODE), 2);
    assert_eq!(get(DECISION_DECODE_ONLY), 2);
}

/// A reload that changes the decider's parameters takes effect: the handler that names the
/// decider is built anew and resolves the new instance (carrying it over would keep the old
/// decider), while plugins without references are still carried over with their state.
#[test]
fn a_reload_that_rebuilds_the_decider_rebuilds_the_handler_that_holds_it() {
    let handle = PluginHandle::default();
    let text = shipped("pd-epp-config.yaml", &[]);
    let c = load_with(&text, &handle).unwrap();
    let eps = pool();
    assert!(route(&c, &eps, &prompt("doc", 400)).prefill.is_some());
    let reloaded = |text: &str, previous: &LoadedConfig| {
        llmsched_core::config::load_reusing(
            text,
            ConfigSource::Text,
            &crate::default_registry(),
            &handle,
            previous,
        )
        .unwrap()
    };
    let instance = |c: &LoadedConfig, name: &str| {
        c.plugins
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.clone())
            .unwrap()
    };
    // Unchanged text: the handler is rebuilt all the same (it holds the decider), the
    // others are the same instances.
    let same = reloaded(&text, &c);
    assert!(!Arc::ptr_eq(
        &instance(&c, "disagg-profile-handler"),
        &instance(&same, "disagg-profile-handler")
    ));
    for name in [
        "prefix-based-pd-decider",
        "prefix-cache-scorer",
        "decode-filter",
    ] {
        assert!(
            Arc::ptr_eq(&instance(&c, name), &instance(&same, name)),
            "{name} carried over"
        );
    }
    // The decider's threshold raised beyond any prompt: nothing is disaggregated any more.
    let raised = reloaded(
        &text.replace("{nonCachedTokens: 16}", "{nonCachedTokens: 1000000}"),
        &same,
    );
    assert!(!Arc::ptr_eq(
        &instance(&same, "prefix-based-pd-decider"),
        &instance(&raised, "prefix-based-pd-decider")
    ));
    assert_eq!(route(&raised, &eps, &prompt("other", 400)).prefill, None);
    // The configuration it replaced keeps its own decider.
    assert!(route(&same, &eps, &prompt("third", 400)).prefill.is_some());
}

/// The prefix index records the prompt on the decode endpoint and, when disaggregated, on the
/// prefill endpoint — and only there.
#[test]
fn prefix_state_is_recorded_per_profile() {
    let c = load_ok(&shipped("pd-sim-epp-config.yaml", &[]));
    let eps = pool();
    let long = prompt("ctx", 300);
    let r = route(&c, &eps, &long);
    let p = r.prefill.clone().unwrap();
    // Produce again and read what the index believes each endpoint holds.
    let cands: Vec<Candidate<'_>> = eps.iter().collect();
    let headers: Headers = [(":path", "/v1/completions")].into_iter().collect();
    let ParseOutcome::Parsed(parsed) = c.parser.parse_request(completion(&long), &headers).unwrap()
    else {
        panic!()
    };
    let req = InferenceRequest::new("r2", headers, Some(parsed));
    let mut cycle = CycleState::new();
    for (prod, _) in &c.data_producers {
        prod.produce(&req, &mut cycle, &cands);
    }
    let m = cycle
        .get::<llmsched_core::cycle::PrefixCacheMatch>()
        .unwrap();
    for e in &eps {
        let held = m.matched(e.id());
        if e.name() == r.decode || e.name() == p {
            assert_eq!(held, f64::from(m.total_blocks), "{}", e.name());
        } else {
            assert_eq!(held, 0.0, "{}", e.name());
        }
    }
    // 16-token blocks (64 characters), as the config sets; prompt counted as bytes / 4.
    assert_eq!(m.block_tokens, 16.0);
    assert_eq!(m.prompt_tokens, (long.len() as u64).div_ceil(4));
}

/// The 2025 form: `pd-profile-handler` with `threshold: 10, hashBlockSize: 5` and
/// `prefill-header-handler`; the prefix scorer's `hashBlockSize: 5` is the old name of its
/// block size.
#[test]
fn threshold_profile_handler_with_prefill_header_handler() {
    let c = load_ok(&shipped(
        "pd-threshold-profile-handler.yaml",
        &[("PRIMARY_PORT", "0")],
    ));
    let eps = pool();
    let text = prompt("q", 50);
    let first = route(&c, &eps, &text);
    let p = first.prefill.clone().expect("uncached ≥ 10 characters");
    assert_eq!(
        first.header(PREFILLER_HOST_PORT),
        Some(hostport(&eps, &p).as_str())
    );
    assert_eq!(first.header(header::DESTINATION_ENDPOINT), None);
    // Fully cached on the decode endpoint: fewer than 5 uncached characters < 10.
    let again = route(&c, &eps, &text);
    assert_eq!(again.decode, first.decode);
    assert_eq!(again.prefill, None);
    // Nine characters: below the threshold even uncached.
    assert_eq!(route(&c, &eps, "abcdefghi").prefill, None);
    // Ten: at the threshold.
    assert!(route(&c, &eps, "jklmnopqrs").prefill.is_some());
}

/// llm-d's P/D guide: threshold 0, no prefix plugin — every request is disaggregated.
#[test]
fn guide_config_always_disaggregates() {
    let c = load_ok(&shipped("pd-guide-always.yaml", &[]));
    let eps = pool();
    for text in ["a", "hello", &prompt("x", 100), "a"] {
        let r = route(&c, &eps, text);
        assert_eq!(role_of(&eps, &r.decode), "decode");
        assert_eq!(role_of(&eps, r.prefill.as_deref().unwrap()), "prefill");
        assert!(r.header(PREFILLER_HOST_PORT).is_some());
    }
}

/// `pd-profile-handler` naming its decider (declared earlier or later), and the March 2026
/// form with `disagg-headers-handler` next to `disagg-profile-handler` (both set the same
/// header; the last value wins).
#[test]
fn decider_by_name_and_separate_headers_handler() {
    for file in ["pd-decider-profile-handler.yaml", "pd-headers-handler.yaml"] {
        let c = load_ok(&shipped(file, &[]));
        let eps = pool();
        let long = prompt("z", 200);
        let r = route(&c, &eps, &long);
        let p = r.prefill.clone().unwrap_or_else(|| panic!("{file}"));
        let values: Vec<&str> = r
            .headers
            .iter()
            .filter(|(k, _)| k == PREFILLER_HOST_PORT)
            .map(|(_, v)| v.as_str())
            .collect();
        assert!(!values.is_empty(), "{file}");
        assert!(
            values.iter().all(|v| *v == hostport(&eps, &p)),
            "{file}: {values:?}"
        );
        assert_eq!(route(&c, &eps, &long).prefill, None, "{file}");
    }
}

const BASE: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n";
const PROFILES: &str = "schedulingProfiles:\n- name: prefill\n  plugins:\n  - pluginRef: prefill-filter\n- name: decode\n  plugins:\n  - pluginRef: decode-filter\n";

fn with_plugins(plugins: &str) -> String {
    format!("{BASE}plugins:\n- type: prefill-filter\n- type: decode-filter\n{plugins}{PROFILES}")
}

/// The reference's P/D samples llmsched does not support are refused at load with the plugin
/// type and the reason: the SLO-aware pair optimizer (with its handler declared under a
/// separate `profileHandler:` key, as that sample does) and node-proximity scoring of the
/// prefill pick. Small configurations of our own using those type names.
#[test]
fn unsupported_pd_variants_are_refused_naming_type_and_reason() {
    let slo_handler = format!(
        "{BASE}plugins:\n- type: prefill-filter\n- type: decode-filter\n\
         profileHandler:\n  type: pd-slo-profile-handler\n  parameters: {{hashBlockSize: 16}}\n{PROFILES}"
    );
    let slo_scorer = with_plugins(
        "- type: pd-profile-handler\n- type: pd-slo-pair-optimizer\n  parameters: {ttftWeight: 0.5}\n",
    );
    let proximity = with_plugins(
        "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: always-disagg-pd-decider}}\n\
         - type: always-disagg-pd-decider\n- type: proximity-scorer\n",
    );
    for (text, type_name, why) in [
        (slo_handler, "pd-slo-profile-handler", "SLO-aware P/D"),
        (slo_scorer, "pd-slo-pair-optimizer", "SLO-aware P/D"),
        (proximity, "proximity-scorer", "topology-aware P/D"),
    ] {
        let e = load_with(&text, &PluginHandle::default()).unwrap_err();
        assert!(
            e.contains(&format!("'{type_name}'"))
                && e.contains("not supported by llmsched")
                && e.contains(why),
            "{type_name}: {e}"
        );
    }
    // A supported handler under `profileHandler:` loads as a plugin entry.
    let c = load_ok(&format!(
        "{BASE}plugins:\n- type: prefill-filter\n- type: decode-filter\n\
         profileHandler:\n  type: pd-profile-handler\n  parameters: {{threshold: 0, hashBlockSize: 5}}\n{PROFILES}"
    ));
    assert_eq!(c.scheduler.handler().type_name(), "pd-profile-handler");
}

#[test]
fn references_and_profiles_are_checked_at_load() {
    // A decider declared after the handler resolves.
    load_ok(&with_plugins(
        "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: late}}\n- type: always-disagg-pd-decider\n  name: late\n",
    ));
    for (plugins, want) in [
        (
            "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: nobody}}\n",
            "plugin 'disagg-profile-handler' (type disagg-profile-handler): deciders.prefill: no plugin named 'nobody' is configured",
        ),
        (
            "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: decode-filter}}\n",
            "deciders.prefill: plugin 'decode-filter' (type decode-filter) is not a P/D decider",
        ),
        (
            "- type: pd-profile-handler\n  parameters: {deciderPluginName: nobody}\n",
            "deciderPluginName: no plugin named 'nobody'",
        ),
        (
            "- type: disagg-profile-handler\n  parameters: {profiles: {decode: main}}\n",
            "the decode profile 'main' is not among schedulingProfiles (prefill, decode)",
        ),
        (
            "- type: disagg-profile-handler\n  parameters: {profiles: {prefill: decode}}\n",
            "must differ",
        ),
        (
            "- type: always-disagg-multimodal-decider\n",
            "not supported by llmsched yet",
        ),
    ] {
        let e = load_with(&with_plugins(plugins), &PluginHandle::default()).unwrap_err();
        assert!(e.contains(want), "{plugins}: {e}");
    }
}

#[test]
fn without_a_decider_or_prefill_endpoints_requests_stay_on_decode() {
    let eps = pool();
    // No decider: decode-only, statically.
    let c = load_ok(&with_plugins("- type: disagg-profile-handler\n"));
    let r = route(&c, &eps, &prompt("a", 300));
    assert_eq!(role_of(&eps, &r.decode), "decode");
    assert_eq!(r.prefill, None);
    // Always-disaggregate, but no prefill endpoint left: the prefill profile fails and the
    // request is decoded with a local prefill; a client's header is cleared.
    let c = load_ok(&with_plugins(
        "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: always-disagg-pd-decider}}\n- type: always-disagg-pd-decider\n",
    ));
    let decode_only: Vec<_> = eps[2..].to_vec();
    let r = route_with(
        &c,
        &decode_only,
        completion("hello"),
        &[(PREFILLER_HOST_PORT, "198.51.100.7:8000")],
    )
    .unwrap();
    assert_eq!(r.prefill, None);
    assert_eq!(r.header(PREFILLER_HOST_PORT), Some(""));
    // No decode endpoint: 429 with the reference's message.
    let e = route_with(&c, &eps[..2], completion("hello"), &[])
        .err()
        .unwrap();
    assert!(
        e.contains("ResourceExhausted") && e.contains(NO_DECODE_WORKERS_MSG),
        "{e}"
    );
}

#[test]
fn prefill_first_stage_order() {
    let c = load_ok(&with_plugins(
        "- type: disagg-profile-handler\n  parameters: {stageOrder: prefill-first}\n",
    ));
    let eps = pool();
    let r = route(&c, &eps, "hi");
    assert_eq!(role_of(&eps, &r.decode), "decode");
    assert_eq!(role_of(&eps, r.prefill.as_deref().unwrap()), "prefill");
}

/// `primaryPort`: the destination is the decode pick's address on the sidecar's port, the
/// pick itself travels in `x-data-parallel-host-port`.
#[test]
fn primary_port_rewrites_the_destination() {
    let c = load_ok(&shipped(
        "pd-threshold-profile-handler.yaml",
        &[("PRIMARY_PORT", "8200")],
    ));
    let eps = pool();
    let r = route(&c, &eps, &prompt("dp", 40));
    let chosen = eps.iter().find(|e| e.name() == r.decode).unwrap();
    assert_eq!(r.header(DATA_PARALLEL_HOST_PORT), Some(chosen.hostport()));
    assert_eq!(
        r.header(header::DESTINATION_ENDPOINT),
        Some(format!("{}:8200", chosen.meta().address).as_str())
    );
    let c = load_ok(&with_plugins(
        "- type: disagg-profile-handler\n  parameters: {primaryPort: 9000}\n",
    ));
    let r = route(&c, &pool(), "x");
    assert!(
        r.header(header::DESTINATION_ENDPOINT)
            .unwrap()
            .ends_with(":9000")
    );
}

#[test]
fn threshold_rule_formula() {
    let rule = ThresholdRule {
        threshold: 100,
        hash_block_size: 10,
    };
    let mut req = request("m");
    req.body = Some(llmsched_core::request::RequestBody {
        prompt: llmsched_core::request::Prompt::Text("x".repeat(250)),
        ..llmsched_core::request::RequestBody::raw(Bytes::new())
    });
    let mut cycle = CycleState::new();
    let mut m = llmsched_core::cycle::PrefixCacheMatch::default();
    let decode = ep(3);
    // 250 − 15×10 = 100 ≥ 100 ⇒ yes; 16 blocks ⇒ 90 < 100 ⇒ no.
    m.matched_blocks.insert(decode.id(), 15.0);
    cycle.insert(m.clone());
    let cx = llmsched_core::plugin::SchedulingContext {
        request: &req,
        cycle: &cycle,
        now: std::time::Instant::now(),
    };
    assert!(rule.disaggregate(&cx, &decode));
    m.matched_blocks.insert(decode.id(), 16.0);
    cycle.insert(m);
    let cx = llmsched_core::plugin::SchedulingContext {
        request: &req,
        cycle: &cycle,
        now: std::time::Instant::now(),
    };
    assert!(!rule.disaggregate(&cx, &decode));
    // No prefix state: nothing cached, 250 ≥ 100.
    let empty = CycleState::new();
    let cx = llmsched_core::plugin::SchedulingContext {
        request: &req,
        cycle: &empty,
        now: std::time::Instant::now(),
    };
    assert!(rule.disaggregate(&cx, &decode));
    assert!(
        ThresholdRule {
            threshold: 0,
            hash_block_size: 1
        }
        .disaggregate(&cx, &decode)
    );
}

#[test]
fn stage_order_parsing() {
    for (s, want) in [
        ("", StageOrder::DecodeFirst),
        ("decode-first", StageOrder::DecodeFirst),
        ("DECODE", StageOrder::DecodeFirst),
        ("prefill_first", StageOrder::PrefillFirst),
        ("Prefill", StageOrder::PrefillFirst),
    ] {
        assert_eq!(StageOrder::parse(s).unwrap(), want, "{s}");
    }
    assert!(StageOrder::parse("both").is_err());
}
