//! Property tests of the `EndpointPickerConfig` loader with every plugin of this crate
//! (`--config-file` / `--config-text` are user input): arbitrary text and arbitrary YAML
//! built from the configuration's own vocabulary never panic (nor abort on a huge
//! allocation), and a valid configuration with one fault injected fails with an error that
//! names the offending field (and the plugin, where there is one).
//!
//! `precise-prefix-cache-scorer` is left out of the generated documents: its factory opens
//! ZMQ sockets and starts tokenizers; its parameters are tested with it.
//!
//! Case count: `PROPTEST_CASES` (default 256 per property).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use llmsched_core::config::{ConfigSource, load};
use llmsched_core::registry::{PluginHandle, Registry};
use proptest::prelude::*;
use serde_json::{Value, json};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const TYPES: &[&str] = &[
    "queue-scorer",
    "kv-cache-utilization-scorer",
    "prefix-cache-scorer",
    "active-request-scorer",
    "load-aware-scorer",
    "lora-affinity-scorer",
    "session-affinity-scorer",
    "no-hit-lru-scorer",
    "running-requests-size-scorer",
    "token-load-scorer",
    "max-score-picker",
    "random-picker",
    "weighted-random-picker",
    "single-profile-handler",
    "decode-filter",
    "prefill-filter",
    "encode-filter",
    "label-selector-filter",
    "by-label",
    "openai-parser",
    "passthrough-parser",
    "utilization-detector",
    "concurrency-detector",
    "probabilistic-admitter",
    "inflight-load-producer",
    "approx-prefix-cache-producer",
    "metrics-data-source",
    "core-metrics-extractor",
    "no-such-plugin",
];

const TOP_LEVEL: [&str; 6] = [
    "flowControl",
    "saturationDetector",
    "dataLayer",
    "parser",
    "requestHandler",
    "metadata",
];

const KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "featureGates",
    "plugins",
    "schedulingProfiles",
    "saturationDetector",
    "dataLayer",
    "flowControl",
    "parser",
    "requestHandler",
    "type",
    "name",
    "parameters",
    "pluginRef",
    "weight",
    "parsers",
    "sources",
    "extractors",
    "maxBytes",
    "maxRequests",
    "defaultRequestTTL",
    "priorityBands",
    "defaultPriorityBand",
    "priority",
    "blockSize",
    "blockSizeTokens",
    "maxPrefixBlocksToMatch",
    "maxPrefixTokensToMatch",
    "lruCapacityPerServer",
    "autoTune",
    "maxNumOfEndpoints",
    "idleThreshold",
    "maxBusyScore",
    "requestTimeout",
    "threshold",
    "queueThreshold",
    "kvCacheThreshold",
    "matchLabels",
    "matchExpressions",
    "label",
    "validValues",
    "allowsNoLabel",
    "capacity",
    "bogus",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(64),
            Just(i64::MAX),
            Just(1 << 40)
        ]
        .prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        prop_oneof![
            Just("1Gi"),
            Just("5s"),
            Just("-3"),
            Just(""),
            Just("llm-d.ai/v1alpha1"),
            Just("EndpointPickerConfig"),
            Just("flowControl"),
            Just("queue-scorer"),
            Just("1e999"),
            Just("~"),
        ]
        .prop_map(|s| json!(s)),
        "\\PC{0,12}".prop_map(|s| json!(s)),
    ]
}

/// Any YAML-able value whose keys are mostly the configuration's own.
fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::vec(
                (
                    prop_oneof![
                        4 => proptest::sample::select(KEYS).prop_map(str::to_string),
                        1 => "[a-zA-Z]{1,8}",
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn plugin() -> impl Strategy<Value = Value> {
    (
        proptest::sample::select(TYPES),
        proptest::option::of("[a-z]{1,6}"),
        proptest::option::of(value()),
    )
        .prop_map(|(t, name, params)| {
            let mut p = json!({"type": t});
            if let Some(n) = name {
                p["name"] = json!(n);
            }
            if let Some(v) = params {
                p["parameters"] = v;
            }
            p
        })
}

/// A document shaped like a configuration, with random plugins, profiles and extras.
fn document() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec(plugin(), 0..6),
        proptest::collection::vec(
            (
                "[a-z]{0,5}",
                proptest::collection::vec(
                    (
                        proptest::sample::select(TYPES),
                        proptest::option::of(prop_oneof![
                            3 => (0.0f64..10.0).prop_map(|w| json!(w)),
                            1 => scalar(),
                        ]),
                    ),
                    0..4,
                ),
            ),
            0..3,
        ),
        proptest::collection::vec(
            (
                prop_oneof![
                    4 => proptest::sample::select(&TOP_LEVEL[..]),
                    1 => proptest::sample::select(KEYS),
                ],
                value(),
            ),
            0..3,
        ),
        any::<bool>(),
    )
        .prop_map(|(plugins, profiles, extras, gates)| {
            let mut doc = json!({
                "apiVersion": "llm-d.ai/v1alpha1",
                "kind": "EndpointPickerConfig",
                "plugins": plugins,
            });
            if !profiles.is_empty() {
                doc["schedulingProfiles"] = Value::Array(
                    profiles
                        .into_iter()
                        .map(|(name, refs)| {
                            json!({
                                "name": name,
                                "plugins": refs.into_iter().map(|(r, w)| {
                                    let mut e = json!({"pluginRef": r});
                                    if let Some(w) = w { e["weight"] = w; }
                                    e
                                }).collect::<Vec<_>>(),
                            })
                        })
                        .collect(),
                );
            }
            if gates {
                doc["featureGates"] = json!(["flowControl"]);
            }
            for (k, v) in extras {
                doc[k] = v;
            }
            doc
        })
}

fn registry() -> Registry {
    llmsched_plugins::default_registry()
}

/// Loads `text` inside a runtime (plugin factories may start background tasks, as they do
/// in `llmsched epp`).
fn try_load(text: &str) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    load(
        text,
        ConfigSource::Text,
        &registry(),
        &PluginHandle::default(),
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

fn yaml(v: &Value) -> String {
    serde_norway::to_string(v).unwrap()
}

/// A configuration that loads, to inject one fault into.
fn valid() -> Value {
    json!({
        "apiVersion": "inference.networking.x-k8s.io/v1alpha1",
        "kind": "EndpointPickerConfig",
        "featureGates": ["flowControl"],
        "flowControl": {"maxBytes": "1Gi", "defaultRequestTTL": "5s"},
        "plugins": [
            {"type": "queue-scorer"},
            {"type": "prefix-cache-scorer", "name": "prefix", "parameters": {"blockSize": 64, "maxPrefixBlocksToMatch": 256}},
            {"type": "max-score-picker", "parameters": {"maxNumOfEndpoints": 1}},
            {"type": "active-request-scorer", "parameters": {"idleThreshold": 1}},
        ],
        "schedulingProfiles": [
            {"name": "default", "plugins": [
                {"pluginRef": "queue-scorer", "weight": 2},
                {"pluginRef": "prefix", "weight": 3},
                {"pluginRef": "active-request-scorer"},
                {"pluginRef": "max-score-picker"},
            ]},
        ],
    })
}

#[derive(Debug, Clone)]
enum Fault {
    TopLevelKey(String),
    PluginKey(usize, String),
    ParamKey(usize, String),
    ParamType(usize),
    Weight(usize),
    UndefinedRef(String),
    UnknownType(usize, String),
    ApiVersion(String),
    FlowQuantity(String),
    ProfileKey(String),
}

fn fault() -> impl Strategy<Value = Fault> {
    let key = "[a-z][a-zA-Z]{2,10}".prop_filter("not a real key", |k| !KEYS.contains(&k.as_str()));
    prop_oneof![
        key.clone().prop_map(Fault::TopLevelKey),
        (0usize..4, key.clone()).prop_map(|(i, k)| Fault::PluginKey(i, k)),
        (1usize..4, key.clone()).prop_map(|(i, k)| Fault::ParamKey(i, k)),
        (1usize..4).prop_map(Fault::ParamType),
        (0usize..2).prop_map(Fault::Weight),
        "[a-z]{3,8}-undefined".prop_map(Fault::UndefinedRef),
        (0usize..4, "[a-z]{3,8}-type").prop_map(|(i, t)| Fault::UnknownType(i, t)),
        "[a-z]{2,6}/v[0-9]".prop_map(Fault::ApiVersion),
        "[a-z]{2,6}".prop_map(Fault::FlowQuantity),
        key.prop_map(Fault::ProfileKey),
    ]
}

/// Applies `f`; returns the words the error must contain.
fn inject(doc: &mut Value, f: &Fault) -> Vec<String> {
    let plugin_name = |doc: &Value, i: usize| -> String {
        let p = &doc["plugins"][i];
        p["name"]
            .as_str()
            .or(p["type"].as_str())
            .unwrap()
            .to_string()
    };
    match f {
        Fault::TopLevelKey(k) => {
            doc[k.as_str()] = json!(1);
            vec![k.clone()]
        }
        Fault::PluginKey(i, k) => {
            doc["plugins"][*i][k.as_str()] = json!("x");
            vec![k.clone()]
        }
        Fault::ParamKey(i, k) => {
            doc["plugins"][*i]["parameters"][k.as_str()] = json!(1);
            vec![k.clone(), plugin_name(doc, *i)]
        }
        Fault::ParamType(i) => {
            let field = match *i {
                1 => "blockSize",
                2 => "maxNumOfEndpoints",
                _ => "idleThreshold",
            };
            doc["plugins"][*i]["parameters"][field] = json!({"not": "a number"});
            vec![field.to_string(), plugin_name(doc, *i)]
        }
        Fault::Weight(j) => {
            doc["schedulingProfiles"][0]["plugins"][*j]["weight"] = json!("heavy");
            vec!["weight".into()]
        }
        Fault::UndefinedRef(n) => {
            doc["schedulingProfiles"][0]["plugins"][0]["pluginRef"] = json!(n);
            vec![n.clone()]
        }
        Fault::UnknownType(i, t) => {
            doc["plugins"][*i]["type"] = json!(t);
            vec![t.clone()]
        }
        Fault::ApiVersion(v) => {
            doc["apiVersion"] = json!(v);
            vec!["apiVersion".into(), v.clone()]
        }
        Fault::FlowQuantity(q) => {
            doc["flowControl"]["maxBytes"] = json!(q);
            vec!["maxBytes".into()]
        }
        Fault::ProfileKey(k) => {
            doc["schedulingProfiles"][0][k.as_str()] = json!([]);
            vec![k.clone()]
        }
    }
}

#[test]
fn the_valid_configuration_loads() {
    try_load(&yaml(&valid())).unwrap();
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s)\\PC{0,300}") {
        let _ = try_load(&text);
    }

    #[test]
    fn arbitrary_configuration_shaped_yaml_never_panics(doc in document()) {
        let text = yaml(&doc);
        let _ = try_load(&text);
    }

    #[test]
    fn errors_name_the_field(f in fault()) {
        let mut doc = valid();
        let words = inject(&mut doc, &f);
        let text = yaml(&doc);
        let e = match try_load(&text) {
            Ok(()) => panic!("{f:?} loaded:\n{text}"),
            Err(e) => e,
        };
        for w in &words {
            prop_assert!(e.contains(w.as_str()), "{f:?}: error does not name '{w}': {e}");
        }
    }
}

#[test]
fn huge_numbers_in_parameters_do_not_allocate() {
    // Sizes come from the user: an absurd one must be an error or a lazily used bound, never
    // an up-front allocation (which would abort the process).
    for (t, field) in [
        ("prefix-cache-scorer", "lruCapacityPerServer"),
        ("prefix-cache-scorer", "maxPrefixBlocksToMatch"),
        ("prefix-cache-scorer", "blockSize"),
        ("approx-prefix-cache-producer", "lruCapacityPerServer"),
        ("max-score-picker", "maxNumOfEndpoints"),
        ("random-picker", "maxNumOfEndpoints"),
        ("no-hit-lru-scorer", "lruSize"),
        ("token-load-scorer", "queueThresholdTokens"),
        ("load-aware-scorer", "threshold"),
        ("probabilistic-admitter", "queueDepthThreshold"),
    ] {
        for n in [i64::MAX, 1 << 40, -1] {
            let doc = json!({
                "apiVersion": "llm-d.ai/v1alpha1",
                "kind": "EndpointPickerConfig",
                "plugins": [{"type": t, "parameters": {field: n}}, {"type": "queue-scorer"}],
            });
            if let Err(e) = try_load(&yaml(&doc)) {
                // Refused for its value, not as an unknown field of a misspelt test.
                assert!(!e.contains("unknown field"), "{t}.{field}: {e}");
                assert!(e.contains(field), "{t}.{field}={n}: {e}");
            }
        }
    }
}

#[test]
fn a_yaml_alias_bomb_is_refused_without_expanding_it() {
    // "Billion laughs": nine levels of ten aliases would expand to 10^9 strings.
    let mut text = String::from(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nmetadata:\n  a0: &a0 [\"lol\"]\n",
    );
    for i in 1..10 {
        let refs: Vec<String> = (0..10).map(|_| format!("*a{}", i - 1)).collect();
        text.push_str(&format!("  a{i}: &a{i} [{}]\n", refs.join(",")));
    }
    text.push_str("plugins: [{type: queue-scorer}]\n");
    let e = try_load(&text).unwrap_err();
    assert!(e.contains("--config-text"), "{e}");
}
