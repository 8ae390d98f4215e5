//! The custom resources llmsched reads, as Rust types with the validation of the upstream
//! CRDs (field names, enums, bounds, patterns, defaults), and the CRD manifests generated
//! from them ([`crds`], [`all_crds_yaml`], `llmsched crds`).
//!
//! | kind | apiVersion | module |
//! |---|---|---|
//! | `InferencePool` | `inference.networking.k8s.io/v1` | [`v1`] |
//! | `InferencePool` (older shape) | `inference.networking.x-k8s.io/v1alpha2` | [`v1alpha2`] |
//! | `InferenceObjective`, `InferenceModelRewrite` | `inference.networking.x-k8s.io/v1alpha2` | [`v1alpha2`] |
//! | `InferenceObjective`, `InferenceModelRewrite` | `llm-d.ai/v1alpha2` | [`llmd`] |
//!
//! Discovery does not deserialize into these types directly: it reads pools and objectives
//! as dynamic objects and extracts what it needs leniently, so one malformed object is
//! reported and skipped instead of failing a whole list (see [`crate::pool`]).

use std::collections::BTreeMap;

use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// API group of the GA `InferencePool`.
pub const POOL_GROUP_V1: &str = "inference.networking.k8s.io";
/// API group of the experimental resources (`InferencePool` v1alpha2, objectives, rewrites).
pub const X_K8S_GROUP: &str = "inference.networking.x-k8s.io";
/// API group llm-d serves objectives and rewrites under (newer releases).
pub const LLMD_GROUP: &str = "llm-d.ai";

/// DNS-subdomain pattern of group fields (empty allowed).
const GROUP_PATTERN: &str = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// Pattern of kind fields.
const KIND_PATTERN: &str = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$";
/// Pattern of label values.
const LABEL_VALUE_PATTERN: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";

fn label_map_schema(min: Option<u32>, max: Option<u32>) -> schemars::Schema {
    let mut s = schemars::json_schema!({
        "type": "object",
        "additionalProperties": {
            "type": "string",
            "minLength": 0,
            "maxLength": 63,
            "pattern": LABEL_VALUE_PATTERN,
        }
    });
    if let Some(min) = min {
        s.insert("minProperties".into(), min.into());
    }
    if let Some(max) = max {
        s.insert("maxProperties".into(), max.into());
    }
    s
}

fn match_labels_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    label_map_schema(Some(1), Some(64))
}

fn flat_selector_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    label_map_schema(None, None)
}

/// A `metav1.Condition`, with the upstream validation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Last time the condition changed (RFC 3339).
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: String,
    /// Human-readable detail.
    #[schemars(length(max = 32768))]
    pub message: String,
    /// The `.metadata.generation` the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
    /// Machine-readable reason (CamelCase).
    #[schemars(
        length(min = 1, max = 1024),
        regex(pattern = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    )]
    pub reason: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// Condition type.
    #[serde(rename = "type")]
    #[schemars(
        length(max = 316),
        regex(
            pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
        )
    )]
    pub type_: String,
}

/// Status of a [`Condition`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known.
    Unknown,
}

/// `InferencePool` in `inference.networking.k8s.io/v1`.
pub mod v1 {
    use super::*;

    /// Spec of an `InferencePool`: which pods (by labels) and which ports serve the pool.
    #[derive(kube::CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
    #[kube(
        group = "inference.networking.k8s.io",
        version = "v1",
        kind = "InferencePool",
        plural = "inferencepools",
        shortname = "infpool",
        namespaced,
        status = "InferencePoolStatus"
    )]
    #[serde(rename_all = "camelCase")]
    pub struct InferencePoolSpec {
        /// Pods of the pool, by label (same namespace).
        pub selector: LabelSelector,
        /// Ports of each pod that serve inference; every port is a distinct endpoint.
        #[schemars(
            length(min = 1, max = 8),
            extend(
                "x-kubernetes-list-type" = "atomic",
                "x-kubernetes-validations" = [{
                    "message": "port number must be unique",
                    "rule": "self.all(p1, self.exists_one(p2, p1.number==p2.number))"
                }]
            )
        )]
        pub target_ports: Vec<Port>,
        /// Protocol the model servers speak (`http`, the default, or `kubernetes.io/h2c`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(extend("default" = "http"))]
        pub app_protocol: Option<AppProtocol>,
        /// The Endpoint Picker serving this pool.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub endpoint_picker_ref: Option<EndpointPickerRef>,
    }

    /// The pool's pod selector.
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct LabelSelector {
        /// Labels a pod must carry (1 to 64 entries).
        #[schemars(schema_with = "match_labels_schema")]
        pub match_labels: BTreeMap<String, String>,
    }

    /// A port number.
    #[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
    pub struct Port {
        /// 1-65535.
        #[schemars(range(min = 1, max = 65535))]
        pub number: i32,
    }

    /// Application protocol of the model servers.
    #[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
    pub enum AppProtocol {
        /// HTTP/1.1.
        #[serde(rename = "http")]
        Http,
        /// HTTP/2 over cleartext.
        #[serde(rename = "kubernetes.io/h2c")]
        H2c,
    }

    /// Reference to the Endpoint Picker (normally a Service).
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "message": "port is required when kind is 'Service' or unspecified (defaults to 'Service')",
        "rule": "self.kind != 'Service' || has(self.port)"
    }]))]
    pub struct EndpointPickerRef {
        /// API group of the referent (`""`: core).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(length(min = 0, max = 253), regex(pattern = GROUP_PATTERN), extend("default" = ""))]
        pub group: Option<String>,
        /// Kind of the referent (`Service`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(length(min = 1, max = 63), regex(pattern = KIND_PATTERN), extend("default" = "Service"))]
        pub kind: Option<String>,
        /// Name of the referent.
        #[schemars(length(min = 1, max = 253))]
        pub name: String,
        /// Port of the referent (required for a Service).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub port: Option<Port>,
        /// What the gateway does when the picker is unavailable.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(extend("default" = "FailClose"))]
        pub failure_mode: Option<FailureMode>,
    }

    /// Gateway behaviour when the Endpoint Picker fails.
    #[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
    pub enum FailureMode {
        /// Route without the picker.
        FailOpen,
        /// Fail the request.
        FailClose,
    }

    /// Observed state of the pool, per parent (Gateway).
    #[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
    pub struct InferencePoolStatus {
        /// One entry per parent (at most 32).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        #[schemars(length(max = 32), extend("x-kubernetes-list-type" = "atomic"))]
        pub parents: Vec<ParentStatus>,
    }

    /// Status of the pool for one parent.
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct ParentStatus {
        /// The parent.
        pub parent_ref: ParentReference,
        /// Controller that wrote this entry (`DOMAIN/PATH`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(
            length(min = 1, max = 253),
            regex(
                pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\/[A-Za-z0-9\/\-._~%!$&'()*+,;=:]+$"
            )
        )]
        pub controller_name: Option<String>,
        /// `Accepted`, `ResolvedRefs`, `Exported` (at most 8, keyed by type).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        #[schemars(
            length(max = 8),
            extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"])
        )]
        pub conditions: Vec<Condition>,
    }

    /// A parent (normally a Gateway).
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
    pub struct ParentReference {
        /// API group (`gateway.networking.k8s.io`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(
            length(min = 0, max = 253),
            regex(pattern = GROUP_PATTERN),
            extend("default" = "gateway.networking.k8s.io")
        )]
        pub group: Option<String>,
        /// Kind (`Gateway`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(length(min = 1, max = 63), regex(pattern = KIND_PATTERN), extend("default" = "Gateway"))]
        pub kind: Option<String>,
        /// Name.
        #[schemars(length(min = 1, max = 253))]
        pub name: String,
        /// Namespace (the pool's when unset).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(
            length(min = 1, max = 63),
            regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
        )]
        pub namespace: Option<String>,
    }
}

/// The objective and rewrite types of one API group. `$pool_group` is the CRD's default for
/// `spec.poolRef.group`.
macro_rules! objective_types {
    ($group:literal, $pool_group:literal) => {
        /// Spec of an `InferenceObjective`: the priority of requests naming it.
        #[derive(kube::CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
        #[kube(
            group = $group,
            version = "v1alpha2",
            kind = "InferenceObjective",
            plural = "inferenceobjectives",
            namespaced,
            status = "ObjectiveStatus",
            printcolumn = r#"{"name":"Inference Pool","type":"string","jsonPath":".spec.poolRef.name"}"#,
            printcolumn = r#"{"name":"Priority","type":"string","jsonPath":".spec.priority"}"#,
            printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
        )]
        #[serde(rename_all = "camelCase")]
        pub struct InferenceObjectiveSpec {
            /// Higher is more important; may be negative; unset means 0.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub priority: Option<i32>,
            /// The pool (same namespace) the objective applies to.
            pub pool_ref: PoolObjectReference,
        }

        /// Spec of an `InferenceModelRewrite`: rules rewriting the requested model.
        #[derive(kube::CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
        #[kube(
            group = $group,
            version = "v1alpha2",
            kind = "InferenceModelRewrite",
            plural = "inferencemodelrewrites",
            namespaced,
            status = "ObjectiveStatus",
            printcolumn = r#"{"name":"Inference Pool","type":"string","jsonPath":".spec.poolRef.name"}"#,
            printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
        )]
        #[serde(rename_all = "camelCase")]
        pub struct InferenceModelRewriteSpec {
            /// The pool (same namespace) the rewrite applies to.
            pub pool_ref: PoolObjectReference,
            /// Rules, in order: the first matching rule of the oldest resource wins, and an
            /// exact model match beats a rule without matches.
            pub rules: Vec<RewriteRule>,
        }

        /// Reference to an `InferencePool`.
        #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
        pub struct PoolObjectReference {
            /// API group of the pool.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            #[schemars(length(max = 253), regex(pattern = GROUP_PATTERN), extend("default" = $pool_group))]
            pub group: Option<String>,
            /// Kind (`InferencePool`).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            #[schemars(length(min = 1, max = 63), regex(pattern = KIND_PATTERN), extend("default" = "InferencePool"))]
            pub kind: Option<String>,
            /// Name of the pool.
            #[schemars(length(min = 1, max = 253))]
            pub name: String,
        }

        /// One rewrite rule.
        #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
        pub struct RewriteRule {
            /// Requests the rule applies to (none: every request).
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            pub matches: Vec<RewriteMatch>,
            /// Weighted target models (at least one).
            #[schemars(length(min = 1))]
            pub targets: Vec<RewriteTarget>,
        }

        /// A request match.
        #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
        pub struct RewriteMatch {
            /// The requested model.
            pub model: ModelMatch,
        }

        /// A match on the requested model name.
        #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
        pub struct ModelMatch {
            /// `Exact` (the only type).
            #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
            #[schemars(extend("default" = "Exact"))]
            pub type_: Option<MatchType>,
            /// The model name.
            #[schemars(length(min = 1))]
            pub value: String,
        }

        /// How a model name is matched.
        #[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
        pub enum MatchType {
            /// Equal strings.
            Exact,
        }

        /// A weighted rewrite target.
        #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
        #[serde(rename_all = "camelCase")]
        pub struct RewriteTarget {
            /// The model name sent to the model server.
            pub model_rewrite: String,
            /// Relative weight, 1-1,000,000 (set on all targets of a rule or on none).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            #[schemars(range(min = 1, max = 1_000_000))]
            pub weight: Option<i32>,
        }

        /// Observed state of an objective or rewrite.
        #[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
        pub struct ObjectiveStatus {
            /// Conditions (at most 8, keyed by type).
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            #[schemars(
                length(max = 8),
                extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"])
            )]
            pub conditions: Vec<Condition>,
        }
    };
}

/// The experimental group `inference.networking.x-k8s.io/v1alpha2`: the older
/// `InferencePool` shape, and `InferenceObjective` / `InferenceModelRewrite`.
pub mod v1alpha2 {
    use super::*;

    /// Spec of a v1alpha2 `InferencePool`: a flat selector and a single target port.
    #[derive(kube::CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
    #[kube(
        group = "inference.networking.x-k8s.io",
        version = "v1alpha2",
        kind = "InferencePool",
        plural = "inferencepools",
        shortname = "xinfpool",
        namespaced,
        status = "InferencePoolStatus"
    )]
    #[serde(rename_all = "camelCase")]
    pub struct InferencePoolSpec {
        /// Labels a pod must carry.
        #[schemars(schema_with = "flat_selector_schema")]
        pub selector: BTreeMap<String, String>,
        /// The port model servers listen on.
        #[schemars(range(min = 1, max = 65535))]
        pub target_port_number: i32,
        /// The Endpoint Picker serving this pool.
        pub extension_ref: ExtensionRef,
    }

    /// Reference to the Endpoint Picker (v1alpha2 shape).
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct ExtensionRef {
        /// API group of the referent (`""`: core).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(length(max = 253), regex(pattern = GROUP_PATTERN), extend("default" = ""))]
        pub group: Option<String>,
        /// Kind of the referent (`Service`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(length(min = 1, max = 63), regex(pattern = KIND_PATTERN), extend("default" = "Service"))]
        pub kind: Option<String>,
        /// Name of the referent.
        #[schemars(length(min = 1, max = 253))]
        pub name: String,
        /// Port of the referent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(range(min = 1, max = 65535))]
        pub port_number: Option<i32>,
        /// What the gateway does when the picker is unavailable.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        #[schemars(extend("default" = "FailClose"))]
        pub failure_mode: Option<super::v1::FailureMode>,
    }

    /// Observed state of a v1alpha2 pool.
    #[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
    pub struct InferencePoolStatus {
        /// One entry per parent (at most 32).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        #[schemars(length(max = 32))]
        pub parent: Vec<PoolParentStatus>,
    }

    /// Status of a v1alpha2 pool for one parent.
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
    #[serde(rename_all = "camelCase")]
    pub struct PoolParentStatus {
        /// The parent.
        pub parent_ref: super::v1::ParentReference,
        /// Conditions (at most 8, keyed by type).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        #[schemars(
            length(max = 8),
            extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"])
        )]
        pub conditions: Vec<Condition>,
    }

    objective_types!(
        "inference.networking.x-k8s.io",
        "inference.networking.k8s.io"
    );
}

/// `InferenceObjective` / `InferenceModelRewrite` under `llm-d.ai/v1alpha2` (newer llm-d
/// releases; preferred over the `inference.networking.x-k8s.io` group when both exist).
pub mod llmd {
    use super::*;

    objective_types!("llm-d.ai", "llm-d.ai");
}

/// Every CRD llmsched reads, in a stable order: `InferencePool` (v1, then v1alpha2), then
/// `InferenceObjective` and `InferenceModelRewrite` of `inference.networking.x-k8s.io`, then
/// of `llm-d.ai`.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        v1::InferencePool::crd(),
        v1alpha2::InferencePool::crd(),
        v1alpha2::InferenceObjective::crd(),
        v1alpha2::InferenceModelRewrite::crd(),
        llmd::InferenceObjective::crd(),
        llmd::InferenceModelRewrite::crd(),
    ]
}

/// A CRD as JSON, with integral `minimum`/`maximum` bounds written as integers (the typed
/// schema holds them as floats, `minimum: 1.0`; the upstream CRDs write `minimum: 1`).
pub fn crd_value(crd: &CustomResourceDefinition) -> Result<serde_json::Value, serde_json::Error> {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    if (k == "minimum" || k == "maximum")
                        && let Some(f) = child.as_f64()
                        && f.fract() == 0.0
                        && f.abs() < 9.0e15
                    {
                        *child = serde_json::Value::from(f as i64);
                    } else {
                        walk(child);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(crd)?;
    walk(&mut value);
    Ok(value)
}

/// [`crds`] as a multi-document YAML stream (`---` between documents), what `llmsched crds`
/// prints and the Helm chart ships.
pub fn all_crds_yaml() -> Result<String, CrdRenderError> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_norway::to_string(&crd_value(&crd)?)?);
    }
    Ok(out)
}

/// The CRDs cannot be rendered (a bug: the types are fixed).
#[derive(Debug, thiserror::Error)]
pub enum CrdRenderError {
    /// To JSON.
    #[error("cannot render a CRD as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// To YAML.
    #[error("cannot render a CRD as YAML: {0}")]
    Yaml(#[from] serde_norway::Error),
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn schema_of(crd: &CustomResourceDefinition) -> Value {
        let v = crd_value(crd).unwrap();
        v.pointer("/spec/versions/0/schema/openAPIV3Schema")
            .unwrap()
            .clone()
    }

    #[test]
    fn every_crd_is_rendered_with_the_upstream_names() {
        let all = crds();
        let names: Vec<_> = all
            .iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "inferencepools.inference.networking.k8s.io",
                "inferencepools.inference.networking.x-k8s.io",
                "inferenceobjectives.inference.networking.x-k8s.io",
                "inferencemodelrewrites.inference.networking.x-k8s.io",
                "inferenceobjectives.llm-d.ai",
                "inferencemodelrewrites.llm-d.ai",
            ]
        );
        for c in &all {
            assert_eq!(c.spec.scope, "Namespaced");
            let v = &c.spec.versions[0];
            assert!(v.served && v.storage);
            assert!(v.subresources.as_ref().unwrap().status.is_some());
        }
        assert_eq!(
            all[0].spec.names.short_names.as_deref(),
            Some(&["infpool".to_string()][..])
        );
        let yaml = all_crds_yaml().unwrap();
        assert_eq!(yaml.matches("kind: CustomResourceDefinition").count(), 6);
        assert!(yaml.starts_with("---\n"));
    }

    #[test]
    fn v1_pool_schema_carries_the_validation() {
        let s = schema_of(&v1::InferencePool::crd());
        let spec = s.pointer("/properties/spec").unwrap();
        let req: Vec<&str> = spec["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            req.contains(&"selector") && req.contains(&"targetPorts"),
            "{req:?}"
        );
        let tp = &spec["properties"]["targetPorts"];
        assert_eq!(tp["minItems"], 1);
        assert_eq!(tp["maxItems"], 8);
        assert_eq!(tp["x-kubernetes-list-type"], "atomic");
        assert!(
            tp["x-kubernetes-validations"][0]["rule"]
                .as_str()
                .unwrap()
                .contains("exists_one")
        );
        let num = &tp["items"]["properties"]["number"];
        assert_eq!(num["minimum"], 1);
        assert_eq!(num["maximum"], 65535);
        let ml = &spec["properties"]["selector"]["properties"]["matchLabels"];
        assert_eq!(ml["maxProperties"], 64);
        assert_eq!(ml["minProperties"], 1);
        assert_eq!(ml["additionalProperties"]["maxLength"], 63);
        let app = &spec["properties"]["appProtocol"];
        assert_eq!(app["default"], "http");
        let enums: Vec<&str> = app["enum"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(enums, ["http", "kubernetes.io/h2c"]);
        let epr = &spec["properties"]["endpointPickerRef"];
        assert_eq!(epr["properties"]["failureMode"]["default"], "FailClose");
        assert_eq!(epr["properties"]["kind"]["default"], "Service");
        assert_eq!(epr["required"][0], "name");
        assert!(
            epr["x-kubernetes-validations"][0]["rule"]
                .as_str()
                .unwrap()
                .contains("has(self.port)")
        );
        let cond = s
            .pointer("/properties/status/properties/parents/items/properties/conditions")
            .unwrap();
        assert_eq!(cond["maxItems"], 8);
        assert_eq!(cond["x-kubernetes-list-map-keys"][0], "type");
    }

    #[test]
    fn objective_and_rewrite_schemas() {
        for (crd, pool_group) in [
            (v1alpha2::InferenceObjective::crd(), POOL_GROUP_V1),
            (llmd::InferenceObjective::crd(), LLMD_GROUP),
        ] {
            let s = schema_of(&crd);
            let spec = s.pointer("/properties/spec").unwrap();
            assert_eq!(spec["required"][0], "poolRef");
            assert_eq!(spec["properties"]["priority"]["type"], "integer");
            assert_eq!(
                spec["properties"]["poolRef"]["properties"]["group"]["default"],
                pool_group
            );
            let cols = crd.spec.versions[0]
                .additional_printer_columns
                .as_ref()
                .unwrap();
            assert_eq!(cols[1].json_path, ".spec.priority");
        }
        let s = schema_of(&llmd::InferenceModelRewrite::crd());
        let rules = s
            .pointer("/properties/spec/properties/rules/items")
            .unwrap();
        let w = &rules["properties"]["targets"]["items"]["properties"]["weight"];
        assert_eq!(w["minimum"], 1);
        assert_eq!(w["maximum"], 1_000_000);
        assert_eq!(rules["properties"]["targets"]["minItems"], 1);
        let mt =
            &rules["properties"]["matches"]["items"]["properties"]["model"]["properties"]["type"];
        assert_eq!(mt["enum"][0], "Exact");
        assert_eq!(mt["default"], "Exact");
    }

    #[test]
    fn upstream_examples_deserialize() {
        let pool: v1::InferencePool = serde_json::from_value(serde_json::json!({
            "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": "p"},
            "spec": {"selector": {"matchLabels": {"app": "vllm"}},
                     "targetPorts": [{"number": 8000}],
                     "endpointPickerRef": {"name": "p-epp", "port": {"number": 9002}, "failureMode": "FailOpen"}}
        }))
        .unwrap();
        assert_eq!(pool.spec.target_ports[0].number, 8000);
        let rw: llmd::InferenceModelRewrite = serde_json::from_value(serde_json::json!({
            "apiVersion": "llm-d.ai/v1alpha2", "kind": "InferenceModelRewrite",
            "metadata": {"name": "r"},
            "spec": {"poolRef": {"name": "p"}, "rules": [{"matches": [{"model": {"value": "m"}}],
                     "targets": [{"modelRewrite": "m-v2", "weight": 10}]}]}
        }))
        .unwrap();
        assert_eq!(rw.spec.rules[0].targets[0].weight, Some(10));
    }
}
