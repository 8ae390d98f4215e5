//! # llmsched-plugins
//!
//! Every plugin of the reference EPP that llmsched implements, registered under the
//! reference's type names with the reference's parameter names:
//!
//! | kind | types |
//! | --- | --- |
//! | scorers | `queue-scorer`, `running-requests-size-scorer`, `kv-cache-utilization-scorer`, `load-aware-scorer`, `active-request-scorer`, `token-load-scorer`, `lora-affinity-scorer`, `session-affinity-scorer`, `prefix-cache-scorer`, `precise-prefix-cache-scorer`, `no-hit-lru-scorer` |
//! | data producers | `approx-prefix-cache-producer` (also built into `prefix-cache-scorer`) |
//! | filters | `decode-filter`, `prefill-filter`, `encode-filter`, `label-selector-filter` (alias `by-label-selector`), `by-label` |
//! | pickers | `max-score-picker`, `random-picker`, `weighted-random-picker` |
//! | profile handlers | `single-profile-handler`, `disagg-profile-handler`, `pd-profile-handler` (P/D, see [`disagg`]) |
//! | P/D deciders | `prefix-based-pd-decider`, `always-disagg-pd-decider` |
//! | P/D header hooks | `disagg-headers-handler`, `prefill-header-handler` |
//! | request parsers | `openai-parser`, `passthrough-parser` |
//! | saturation detectors (also filters) | `utilization-detector`, `concurrency-detector` |
//! | admission | `probabilistic-admitter` |
//! | flow-control fairness policies | `global-strict-fairness-policy`, `round-robin-fairness-policy`, `token-fair-share-fairness-policy` |
//! | flow-control ordering policies | `fcfs-ordering-policy`, `edf-ordering-policy` |
//! | descriptors (accepted, read by the runtime) | `metrics-data-source`, `core-metrics-extractor`, `inflight-load-producer` |
//!
//! Every other type name the reference registers is registered as *unsupported*
//! ([`unsupported::register`]), so configuring one fails with "not supported by llmsched
//! yet" rather than "unknown plugin type".
//!
//! Unknown parameters are an error (every parameter struct denies unknown fields). Each
//! plugin's module documents its formula and every parameter with its default.
//!
//! ```
//! let registry = llmsched_plugins::default_registry();
//! assert!(registry.supports("prefix-cache-scorer"));
//! ```

pub mod admitter;
mod common;
pub mod descriptor;
pub mod disagg;
pub mod fairness;
pub mod filter;
pub mod ordering;
pub mod parser;
pub mod picker;
pub mod prefix;
pub mod producer;
pub mod profile;
pub mod saturation;
pub mod scorer;
pub mod unsupported;

use llmsched_core::registry::Registry;

pub use common::InvalidParameter;

/// Registers every plugin of this crate (and the unsupported reference types) into
/// `registry`. Supported types override earlier registrations of the same name.
pub fn register_all(registry: &mut Registry) {
    unsupported::register(registry);

    scorer::register(registry);
    producer::register(registry);
    filter::register(registry);
    picker::register(registry);
    profile::register(registry);
    disagg::register(registry);
    parser::register(registry);
    saturation::register(registry);
    admitter::register(registry);
    fairness::register(registry);
    ordering::register(registry);
    descriptor::register(registry);
}

/// A registry with every plugin of this crate.
pub fn default_registry() -> Registry {
    let mut r = Registry::new();
    register_all(&mut r);
    r
}

#[cfg(test)]
mod tests {
    use llmsched_core::config::{ConfigSource, load, load_default};
    use llmsched_core::registry::PluginHandle;

    use super::*;

    #[test]
    fn the_default_config_loads_with_the_real_plugins() {
        let c = load_default(&default_registry(), &PluginHandle::default()).unwrap();
        let p = &c.scheduler.profiles()[0];
        let scorers: Vec<(&str, f64)> = p
            .scorers()
            .iter()
            .map(|s| (s.scorer.type_name(), s.weight))
            .collect();
        assert_eq!(
            scorers,
            vec![
                ("queue-scorer", 1.0),
                ("kv-cache-utilization-scorer", 1.0),
                ("prefix-cache-scorer", 3.0),
                ("active-request-scorer", 3.0)
            ]
        );
        assert_eq!(p.picker().type_name(), "max-score-picker");
        assert_eq!(c.scheduler.handler().type_name(), "single-profile-handler");
        assert_eq!(c.parser.type_name(), "openai-parser");
        assert_eq!(
            c.saturation_detector.as_ref().map(|d| d.type_name()),
            Some("utilization-detector")
        );
        // The prefix scorer hashes (data producer), records (pre-request) and purges
        // (endpoint listener).
        assert_eq!(c.data_producers.len(), 1);
        assert_eq!(c.pre_request.len(), 1);
        assert_eq!(c.endpoint_listeners.len(), 1);
    }

    #[test]
    fn reference_configs_load() {
        let configs = [
            // The seed guide.
            "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n- type: kv-cache-utilization-scorer\n- type: prefix-cache-scorer\n  parameters: { blockSize: 64, maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 31250 }\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: queue-scorer\n    weight: 2\n  - pluginRef: kv-cache-utilization-scorer\n    weight: 2\n  - pluginRef: prefix-cache-scorer\n    weight: 3\n",
            // The reference's estimate-prefix sample (new style: no parameters on the scorer).
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: single-profile-handler\n- type: decode-filter\n- type: prefix-cache-scorer\n- type: load-aware-scorer\n- type: max-score-picker\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: decode-filter\n  - pluginRef: prefix-cache-scorer\n    weight: 1.0\n  - pluginRef: load-aware-scorer\n    weight: 1.0\n  - pluginRef: max-score-picker\n",
            // Split producer + scorer, data layer, detector, parsers.
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: approx-prefix-cache-producer\n  parameters: {autoTune: false, blockSizeTokens: 32, lruCapacityPerServer: 1000}\n- type: prefix-cache-scorer\n- type: metrics-data-source\n  parameters: {scheme: https, path: /metrics, insecureSkipVerify: true}\n- type: core-metrics-extractor\n  parameters: {engineLabelKey: llm-d.ai/engine-type, defaultEngine: vllm}\n- type: utilization-detector\n  parameters: {queueDepthThreshold: 10, metricsStalenessThreshold: 500ms}\n- type: passthrough-parser\n- type: weighted-random-picker\n  parameters: {maxNumOfEndpoints: 2}\nsaturationDetector: {pluginRef: utilization-detector}\nrequestHandler: {parsers: [{pluginRef: passthrough-parser}]}\ndataLayer:\n  sources:\n  - pluginRef: metrics-data-source\n    extractors: [{pluginRef: core-metrics-extractor}]\nschedulingProfiles:\n- name: default\n  plugins:\n  - pluginRef: prefix-cache-scorer\n  - pluginRef: weighted-random-picker\n",
        ];
        for text in configs {
            let c = load(
                text,
                ConfigSource::Text,
                &default_registry(),
                &PluginHandle::default(),
            );
            assert!(c.is_ok(), "{:?}\n{text}", c.err());
        }
    }

    #[test]
    fn flow_control_policies_resolve_through_the_registry() {
        // The README's example: a declared instance with parameters, referenced by name.
        let text = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nfeatureGates: [flowControl]\nplugins:\n- type: token-fair-share-fairness-policy\n  name: tenants\n  parameters: {outputTokenWeight: 2}\nflowControl:\n  defaultRequestTTL: 30s\n  defaultPriorityBand: {fairnessPolicyRef: tenants}\n  priorityBands:\n  - {priority: 5, fairnessPolicyRef: round-robin-fairness-policy, orderingPolicyRef: edf-ordering-policy}\n";
        let c = load(
            text,
            ConfigSource::Text,
            &default_registry(),
            &PluginHandle::default(),
        )
        .unwrap();
        let fc = c.flow_control.unwrap();
        let d = &fc.default_band;
        assert_eq!(d.fairness.name, "tenants");
        assert_eq!(d.fairness.type_name, "token-fair-share-fairness-policy");
        assert_eq!(d.ordering.type_name, "fcfs-ordering-policy");
        let b = &fc.bands[0];
        assert_eq!(b.fairness.type_name, "round-robin-fairness-policy");
        assert_eq!(b.ordering.type_name, "edf-ordering-policy");
        // Bad parameters of a declared policy name the plugin and the field.
        let bad = text.replace("outputTokenWeight: 2", "outputTokenWeight: -2");
        let e = load(
            &bad,
            ConfigSource::Text,
            &default_registry(),
            &PluginHandle::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("plugin 'tenants' (type token-fair-share-fairness-policy)")
                && e.contains("outputTokenWeight must be"),
            "{e}"
        );
        // Reference types llmsched does not implement say so.
        let e = load(
            &text.replace("edf-ordering-policy", "slo-deadline-ordering-policy"),
            ConfigSource::Text,
            &default_registry(),
            &PluginHandle::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("not supported by llmsched yet"), "{e}");
    }

    #[test]
    fn end_to_end_prefix_affinity_with_the_default_config() {
        use bytes::Bytes;
        use llmsched_core::cycle::CycleState;
        use llmsched_core::plugin::{Candidate, ParseOutcome};
        use llmsched_core::request::{Headers, InferenceRequest};

        let c = load_default(&default_registry(), &PluginHandle::default()).unwrap();
        // Four endpoints with identical load: only the prefix scorer can tell them apart.
        let eps: Vec<_> = (1..=4)
            .map(|i| common::testutil::ep_with(i, &[], common::testutil::load(1, 2, 0.5)))
            .collect();
        let cands: Vec<Candidate<'_>> = eps.iter().collect();
        let headers: Headers = [(":path", "/v1/chat/completions")].into_iter().collect();
        let system = "You are a helpful assistant. ".repeat(40);
        let body = |q: &str| {
            Bytes::from(
                serde_json::to_vec(&serde_json::json!({
                    "model": "llama",
                    "messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
                }))
                .unwrap(),
            )
        };
        let route = |b: Bytes| {
            let ParseOutcome::Parsed(parsed) = c.parser.parse_request(b, &headers).unwrap() else {
                panic!("skipped")
            };
            let req = InferenceRequest::new("r", headers.clone(), Some(parsed));
            let mut cycle = CycleState::new();
            for (p, _) in &c.data_producers {
                p.produce(&req, &mut cycle, &cands);
            }
            let result = c.scheduler.schedule(&req, &cycle, &cands).unwrap();
            for (p, _) in &c.pre_request {
                p.pre_request(&req, &cycle, &result, &mut Vec::new());
                p.after_dispatch(&req, &cycle, &result);
            }
            result.targets()[0].id()
        };
        let first = route(body("What is a KV cache?"));
        // Same system prompt, different question: the endpoint that holds the prefix wins.
        for q in [
            "Explain prefix caching.",
            "What is a KV cache?",
            "Why route by prefix?",
        ] {
            assert_eq!(route(body(q)), first, "{q}");
        }
    }

    /// The shipped precise configuration under a burst, with no KV events yet (the engines
    /// have not scheduled anything): cold prefixes spread over the endpoints, and the
    /// followers of a new prefix follow its first request (its speculative entries) instead
    /// of copying the prefix onto every endpoint.
    #[test]
    fn the_shipped_precise_config_spreads_cold_bursts_and_keeps_followers_together() {
        use bytes::Bytes;
        use llmsched_core::cycle::CycleState;
        use llmsched_core::plugin::{Candidate, ParseOutcome};
        use llmsched_core::request::{Headers, InferenceRequest};
        use llmsched_tokenizer::SimTokenizer;

        let text = include_str!("../../../config/epp/precise-prefix-cache.yaml");
        let c = load(
            text,
            ConfigSource::Text,
            &default_registry(),
            &PluginHandle::default(),
        )
        .unwrap();
        let eps: Vec<_> = (1..=4)
            .map(|i| common::testutil::ep_with(i, &[], common::testutil::load(0, 0, 0.1)))
            .collect();
        let cands: Vec<Candidate<'_>> = eps.iter().collect();
        let headers: Headers = [(":path", "/v1/completions")].into_iter().collect();
        let words = |seed: u32, n: u32| {
            let t = SimTokenizer::default();
            let mut s = String::new();
            for i in 0..n {
                s.push(' ');
                t.write_word(seed * 7919 + i, &mut s);
            }
            s
        };
        let mut n = 0;
        let mut route = |prompt: String| {
            let body = Bytes::from(
                serde_json::to_vec(&serde_json::json!({"model": "m", "prompt": prompt})).unwrap(),
            );
            let ParseOutcome::Parsed(parsed) = c.parser.parse_request(body, &headers).unwrap()
            else {
                panic!("skipped")
            };
            n += 1;
            let req = InferenceRequest::new(format!("r{n}"), headers.clone(), Some(parsed));
            let mut cycle = CycleState::new();
            for (p, _) in &c.data_producers {
                p.produce(&req, &mut cycle, &cands);
            }
            let result = c.scheduler.schedule(&req, &cycle, &cands).unwrap();
            for (p, _) in &c.pre_request {
                p.pre_request(&req, &cycle, &result, &mut Vec::new());
                p.after_dispatch(&req, &cycle, &result);
            }
            // In flight until the end of the test (the engines are busy with the burst).
            let target = result.targets()[0].clone();
            target.dispatch(0);
            target.id().0
        };
        // A burst of 8 new, different prefixes: two per endpoint.
        let mut per = [0; 5];
        for g in 0..8 {
            per[route(format!("{}{}", words(100 + g, 400), words(900 + g, 20))) as usize] += 1;
        }
        assert_eq!(&per[1..], &[2, 2, 2, 2], "cold prefixes spread evenly");
        // A burst of 6 requests sharing a new prefix (different questions): all follow the
        // first one, though it is still queued and nothing was reported yet.
        let prefix = words(7, 400);
        let first = route(format!("{prefix}{}", words(50, 20)));
        for q in 0..5 {
            assert_eq!(
                route(format!("{prefix}{}", words(51 + q, 20))),
                first,
                "follower {q}"
            );
        }
    }

    #[test]
    fn unknown_and_unsupported_types_are_distinguished() {
        let r = default_registry();
        let e = r
            .factory("always-disagg-multimodal-decider")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not supported by llmsched yet"), "{e}");
        let e = r.factory("no-such-plugin").unwrap_err().to_string();
        assert!(e.contains("unknown plugin type"), "{e}");
        for t in [
            "queue-scorer",
            "running-requests-size-scorer",
            "kv-cache-utilization-scorer",
            "load-aware-scorer",
            "active-request-scorer",
            "token-load-scorer",
            "lora-affinity-scorer",
            "session-affinity-scorer",
            "prefix-cache-scorer",
            "precise-prefix-cache-scorer",
            "approx-prefix-cache-producer",
            "no-hit-lru-scorer",
            "decode-filter",
            "prefill-filter",
            "encode-filter",
            "label-selector-filter",
            "by-label-selector",
            "by-label",
            "max-score-picker",
            "random-picker",
            "weighted-random-picker",
            "single-profile-handler",
            "disagg-profile-handler",
            "pd-profile-handler",
            "prefix-based-pd-decider",
            "always-disagg-pd-decider",
            "disagg-headers-handler",
            "prefill-header-handler",
            "openai-parser",
            "passthrough-parser",
            "utilization-detector",
            "concurrency-detector",
            "probabilistic-admitter",
            "metrics-data-source",
            "core-metrics-extractor",
            "global-strict-fairness-policy",
            "round-robin-fairness-policy",
            "token-fair-share-fairness-policy",
            "fcfs-ordering-policy",
            "edf-ordering-policy",
        ] {
            assert!(r.supports(t), "{t} should be supported");
        }
    }

    #[test]
    fn every_supported_type_rejects_unknown_parameters() {
        let r = default_registry();
        for t in r.supported_types() {
            let f = r.factory(t).unwrap();
            let params = serde_json::json!({"noSuchParameter": 1});
            let res = f(llmsched_core::registry::FactoryInput {
                name: t,
                parameters: Some(&params),
                handle: &PluginHandle::default(),
            });
            match res {
                Ok(_) => panic!("{t} accepted an unknown parameter"),
                Err(e) => assert!(e.to_string().contains("noSuchParameter"), "{t}: {e}"),
            }
        }
    }

    #[test]
    fn every_supported_type_builds_with_defaults_and_keeps_its_name() {
        let r = default_registry();
        for t in r.supported_types() {
            // by-label needs parameters; everything else builds from none.
            if t == "by-label" {
                continue;
            }
            let f = r.factory(t).unwrap();
            let p = f(llmsched_core::registry::FactoryInput {
                name: "custom-name",
                parameters: None,
                handle: &PluginHandle::default(),
            })
            .unwrap_or_else(|e| panic!("{t}: {e}"));
            assert_eq!(p.name(), "custom-name");
            assert_eq!(p.type_name(), t, "type name of {t}");
        }
    }
}
