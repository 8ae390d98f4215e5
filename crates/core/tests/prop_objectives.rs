//! Property tests of the `InferenceObjective` / `InferenceModelRewrite` manifest parser
//! (`--objectives-file`, the YAML users `kubectl apply`): arbitrary text never panics;
//! generated multi-document streams (other kinds mixed in) parse to the priorities and
//! rewrite rules written, with the reference's precedence; a fault in one document fails
//! with an error naming the document and the field; an alias bomb is refused.
//!
//! Case count: `PROPTEST_CASES` (default 256 per property).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::type_complexity
)]

use std::collections::{BTreeMap, BTreeSet};

use llmsched_core::objectives::parse_manifests;
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

#[derive(Debug, Clone)]
enum Doc {
    Objective(String, Option<i32>),
    /// Rewrite name, rules: (exact models matched, targets with weights).
    Rewrite(String, Vec<(Vec<String>, Vec<(String, Option<u32>)>)>),
    Other(Value),
}

fn group() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("inference.networking.x-k8s.io/v1alpha2"),
        Just("llm-d.ai/v1alpha1"),
    ]
}

fn model() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9./-]{0,10}"
}

fn doc() -> impl Strategy<Value = Doc> {
    prop_oneof![
        ("[a-z][a-z0-9-]{0,8}", proptest::option::of(any::<i32>()))
            .prop_map(|(n, p)| Doc::Objective(n, p)),
        (
            "[a-z][a-z0-9-]{0,8}",
            proptest::collection::vec(
                (
                    proptest::collection::vec(model(), 0..3),
                    (
                        proptest::collection::vec(model(), 1..4),
                        any::<bool>(),
                        proptest::collection::vec(0u32..1000, 4),
                    )
                        .prop_map(|(ms, weighted, ws)| {
                            ms.into_iter()
                                .enumerate()
                                .map(|(i, m)| (m, weighted.then(|| ws[i % 4])))
                                .collect()
                        }),
                ),
                0..3
            )
        )
            .prop_map(|(n, rules)| Doc::Rewrite(n, rules)),
        prop_oneof![
            Just(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}})),
            Just(json!({"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "spec": {"selector": {}}})),
            Just(Value::Null),
        ]
        .prop_map(Doc::Other),
    ]
}

fn to_json(d: &Doc, api: &str) -> Value {
    match d {
        Doc::Objective(n, p) => {
            let mut spec = json!({"poolRef": {"name": "pool"}});
            if let Some(p) = p {
                spec["priority"] = json!(p);
            }
            json!({"apiVersion": api, "kind": "InferenceObjective", "metadata": {"name": n}, "spec": spec})
        }
        Doc::Rewrite(n, rules) => json!({
            "apiVersion": api,
            "kind": "InferenceModelRewrite",
            "metadata": {"name": n},
            "spec": {"rules": rules.iter().map(|(matches, targets)| json!({
                "matches": matches.iter().map(|m| json!({"model": {"type": "Exact", "value": m}})).collect::<Vec<_>>(),
                "targets": targets.iter().map(|(m, w)| {
                    let mut t = json!({"modelRewrite": m});
                    if let Some(w) = w { t["weight"] = json!(w); }
                    t
                }).collect::<Vec<_>>(),
            })).collect::<Vec<_>>()},
        }),
        Doc::Other(v) => v.clone(),
    }
}

fn stream(docs: &[(Doc, &str)]) -> String {
    docs.iter()
        .map(|(d, api)| serde_norway::to_string(&to_json(d, api)).unwrap())
        .collect::<Vec<_>>()
        .join("---\n")
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text_never_panics(text in "(?s)\\PC{0,300}") {
        if let Err(e) = parse_manifests(&text, "o.yaml") {
            prop_assert!(e.to_string().starts_with("o.yaml: document "), "{e}");
        }
    }

    #[test]
    fn valid_streams_parse_to_what_was_written(docs in proptest::collection::vec((doc(), group()), 0..8)) {
        let text = stream(&docs);
        let o = parse_manifests(&text, "o.yaml").unwrap_or_else(|e| panic!("{e}\n{text}"));
        // Objectives: the last definition of a name wins (a later apply replaces it).
        let mut priorities: BTreeMap<&str, i32> = BTreeMap::new();
        // Rewrites: the first rule matching a model exactly wins; the first generic one.
        let mut exact: BTreeMap<&str, (&str, Vec<(String, u32)>)> = BTreeMap::new();
        let mut generic: Option<(&str, Vec<(String, u32)>)> = None;
        for (d, _) in &docs {
            match d {
                Doc::Objective(n, p) => { priorities.insert(n, p.unwrap_or(0)); }
                Doc::Rewrite(n, rules) => {
                    for (matches, targets) in rules {
                        let t: Vec<(String, u32)> = targets.iter().map(|(m, w)| (m.clone(), w.unwrap_or(0))).collect();
                        if matches.is_empty() {
                            if generic.is_none() { generic = Some((n, t)); }
                        } else {
                            for m in matches {
                                exact.entry(m).or_insert_with(|| (n, t.clone()));
                            }
                        }
                    }
                }
                Doc::Other(_) => {}
            }
        }
        prop_assert_eq!(o.objective_count(), priorities.len());
        for (n, p) in &priorities {
            prop_assert_eq!(o.priority(n), Some(*p));
        }
        for (m, (n, t)) in &exact {
            let r = o.rewrite_for(m).unwrap();
            prop_assert_eq!(&r.rewrite_name, n);
            prop_assert_eq!(&r.targets, t);
        }
        let other = "not-a-model-any-rule-matches!";
        match (&generic, o.rewrite_for(other)) {
            (None, None) => {}
            (Some((n, t)), Some(r)) => {
                prop_assert_eq!(&r.rewrite_name, n);
                prop_assert_eq!(&r.targets, t);
            }
            (g, r) => prop_assert!(false, "generic rule: expected {g:?}, got {r:?}"),
        }
        // Every model the rules mention is a known name for the metrics' labels.
        let names: BTreeSet<&str> = o.model_names().collect();
        for m in exact.keys() {
            prop_assert!(names.contains(m));
        }
    }

    #[test]
    fn a_fault_names_the_document_and_the_field(
        docs in proptest::collection::vec((doc(), group()), 1..5),
        which in any::<prop::sample::Index>(),
        key in "[a-z]{3,9}Field",
    ) {
        let mut values: Vec<Value> = docs.iter().map(|(d, api)| to_json(d, api)).collect();
        let i = which.index(values.len());
        // An unknown spec field, in a document of a kind that is read.
        values[i] = json!({
            "apiVersion": "llm-d.ai/v1alpha1",
            "kind": if i % 2 == 0 { "InferenceObjective" } else { "InferenceModelRewrite" },
            "metadata": {"name": "x"},
            "spec": {key.as_str(): 1},
        });
        let text = values
            .iter()
            .map(|v| serde_norway::to_string(v).unwrap())
            .collect::<Vec<_>>()
            .join("---\n");
        let e = parse_manifests(&text, "o.yaml").unwrap_err().to_string();
        prop_assert!(e.starts_with(&format!("o.yaml: document {}", i + 1)), "{e}");
        prop_assert!(e.contains(&key), "{e}");
    }
}

#[test]
fn an_alias_bomb_is_refused() {
    let mut text = String::from("apiVersion: v1\nkind: ConfigMap\ndata:\n  a0: &a0 [\"lol\"]\n");
    for i in 1..10 {
        let refs: Vec<String> = (0..10).map(|_| format!("*a{}", i - 1)).collect();
        text.push_str(&format!("  a{i}: &a{i} [{}]\n", refs.join(",")));
    }
    let e = parse_manifests(&text, "o.yaml").unwrap_err().to_string();
    assert!(e.starts_with("o.yaml: document 1"), "{e}");
}
