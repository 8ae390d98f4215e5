//! Reference plugin types llmsched does not implement (yet). Registering them makes a
//! configuration that uses one fail with `plugin type 'X' is not supported by llmsched yet:
//! <reason>` instead of `unknown plugin type`.
//!
//! The list covers every type name registered by the reference's `register.go` and its
//! runner, minus the ones this crate implements.

use llmsched_core::registry::Registry;

const EPD: &str =
    "E/P/D (encode) disaggregation is not implemented yet; P/D is (disagg-profile-handler)";
const LATENCY: &str = "latency prediction / SLO-aware scheduling is not implemented yet";
const PD_SLO: &str = "SLO-aware P/D (joint prefill/decode pair choice from TTFT/TPOT predictors) \
     is not implemented yet; use disagg-profile-handler with prefix-based-pd-decider";
const TOPOLOGY: &str = "topology-aware P/D (preferring a prefill endpoint close to the decode pick) \
     is not implemented yet; the prefill profile scores endpoints without regard to placement";

/// `(type name, reason)` of every unsupported reference type.
pub const UNSUPPORTED: &[(&str, &str)] = &[
    // Profile handlers and deciders.
    ("always-disagg-multimodal-decider", EPD),
    ("pd-slo-profile-handler", PD_SLO),
    ("pd-slo-pair-optimizer", PD_SLO),
    (
        "data-parallel-profile-handler",
        "data-parallel profile handling is not implemented yet",
    ),
    // Scorers and filters.
    (
        "context-length-aware",
        "context-length-aware scoring is not implemented yet",
    ),
    (
        "prefix-cache-affinity-filter",
        "the prefix-cache affinity filter is not implemented yet",
    ),
    ("slo-headroom-tier-filter", LATENCY),
    ("proximity-scorer", TOPOLOGY),
    ("topology-affinity-filter", TOPOLOGY),
    ("topology-affinity-scorer", TOPOLOGY),
    ("topology-extractor", TOPOLOGY),
    ("latency-scorer", LATENCY),
    // Request control.
    ("latency-slo-admitter", LATENCY),
    ("predicted-latency-producer", LATENCY),
    (
        "token-producer",
        "request tokenization as a data producer is not implemented yet",
    ),
    (
        "tokenizer",
        "request tokenization as a data producer is not implemented yet",
    ),
    (
        "request-attribute-reporter",
        "request attribute reporting is not implemented yet",
    ),
    // Parsers.
    (
        "vllmgrpc-parser",
        "the vLLM gRPC parser is not implemented yet; use openai-parser",
    ),
    (
        "vertexai-parser",
        "the Vertex AI parser is not implemented yet; use openai-parser",
    ),
    // Data layer.
    (
        "models-data-source",
        "the models data source is not implemented yet",
    ),
    (
        "models-data-extractor",
        "the models data extractor is not implemented yet",
    ),
    (
        "k8s-notification-source",
        "Kubernetes notification sources are not implemented yet",
    ),
    (
        "endpoint-notification-source",
        "endpoint notification sources are not implemented yet",
    ),
    // Flow control.
    (
        "slo-deadline-ordering-policy",
        "SLO-deadline ordering is not implemented yet; use fcfs-ordering-policy or edf-ordering-policy",
    ),
    (
        "static-usage-limit-policy",
        "usage-limit policies are not implemented yet",
    ),
    (
        "sheddable-eviction-filter",
        "flow-control eviction is not implemented yet",
    ),
    (
        "priority-then-time-eviction-order-policy",
        "flow-control eviction is not implemented yet",
    ),
    // Conformance-test helpers.
    (
        "header-based-testing-filter",
        "reference conformance-test plugin",
    ),
    (
        "destination-endpoint-served-verifier",
        "reference conformance-test plugin",
    ),
];

/// Registers every unsupported type.
pub fn register(r: &mut Registry) {
    for (t, reason) in UNSUPPORTED {
        r.register_unsupported(t, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_reports_unsupported_and_none_shadows_a_supported_type() {
        let r = crate::default_registry();
        for (t, reason) in UNSUPPORTED {
            let e = r.factory(t).unwrap_err().to_string();
            assert!(
                e.contains("not supported by llmsched yet") && e.contains(reason),
                "{t}: {e}"
            );
        }
    }
}
