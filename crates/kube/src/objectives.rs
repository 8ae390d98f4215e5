//! `InferenceObjective` / `InferenceModelRewrite` objects from the cluster into the same
//! [`Objectives`] `--objectives-file` fills, through `llmsched_core::objectives` (one parser,
//! one set of rules).
//!
//! An object applies to the pool when `spec.poolRef.name` is the pool's name and
//! `spec.poolRef.group` is the pool's group, unset, or its CRD's default (`llm-d.ai` for
//! the `llm-d.ai` CRDs, `inference.networking.k8s.io` for the experimental group), so an
//! object written without a group applies as its author meant. Rewrites are ordered oldest
//! first (`metadata.creationTimestamp`, then name): the reference's tie-break between
//! rules of equal precedence. An object the parser refuses is reported and skipped; the
//! others still apply.

use llmsched_core::objectives::{Objectives, parse_manifests};
use serde_json::Value;

use crate::crd::{LLMD_GROUP, POOL_GROUP_V1, X_K8S_GROUP};

/// The two kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `InferenceObjective`.
    Objective,
    /// `InferenceModelRewrite`.
    Rewrite,
}

impl Kind {
    /// Both kinds.
    pub const ALL: [Kind; 2] = [Kind::Objective, Kind::Rewrite];

    /// The resource kind.
    pub fn kind(self) -> &'static str {
        match self {
            Kind::Objective => "InferenceObjective",
            Kind::Rewrite => "InferenceModelRewrite",
        }
    }

    /// The plural (the REST resource name and the metrics label).
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Objective => "inferenceobjectives",
            Kind::Rewrite => "inferencemodelrewrites",
        }
    }
}

/// The API groups serving objectives and rewrites, preferred first: the newer `llm-d.ai`
/// group wins when both CRDs are installed.
pub const GROUPS: [&str; 2] = [LLMD_GROUP, X_K8S_GROUP];

/// The version read in both groups.
pub const VERSION: &str = "v1alpha2";

/// Which pool objects must reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRef {
    /// Pool name.
    pub name: String,
    /// Pool API group.
    pub group: String,
}

fn default_pool_group(object_group: &str) -> &'static str {
    if object_group == LLMD_GROUP {
        LLMD_GROUP
    } else {
        POOL_GROUP_V1
    }
}

/// True when `obj` (of API group `object_group`) references `pool`.
pub fn references_pool(obj: &Value, object_group: &str, pool: &PoolRef) -> bool {
    let Some(r) = obj.pointer("/spec/poolRef") else {
        return false;
    };
    if r.get("name").and_then(Value::as_str) != Some(pool.name.as_str()) {
        return false;
    }
    match r.get("group").and_then(Value::as_str) {
        None | Some("") => true,
        Some(g) => g == pool.group || g == default_pool_group(object_group),
    }
}

fn creation(obj: &Value) -> (&str, &str) {
    (
        obj.pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str)
            .unwrap_or(""),
        obj.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or(""),
    )
}

/// One object the parser refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// `Kind/name`.
    pub object: String,
    /// Why.
    pub error: String,
}

/// The result of [`build`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Built {
    /// What applies.
    pub objectives: Objectives,
    /// Objects applied (per kind: objectives, rewrites).
    pub applied: [usize; 2],
    /// Objects skipped because they reference another pool.
    pub other_pool: usize,
    /// Objects the parser refused (skipped).
    pub rejected: Vec<Rejected>,
}

/// Builds the objectives from the objects of both kinds (`objects[0]` objectives,
/// `objects[1]` rewrites), each paired with the API group it was read from. Objects must be
/// full resources as JSON; `apiVersion` and `kind` are set from the group and kind, since
/// list items may lack them.
pub fn build(objects: [&[(String, Value)]; 2], pool: &PoolRef) -> Built {
    let mut out = Built::default();
    let mut docs: Vec<String> = Vec::new();
    for (ki, kind) in Kind::ALL.iter().enumerate() {
        let mut selected: Vec<(&str, Value)> = Vec::new();
        for (group, obj) in objects[ki] {
            if !references_pool(obj, group, pool) {
                out.other_pool += 1;
                continue;
            }
            let mut obj = obj.clone();
            if let Some(map) = obj.as_object_mut() {
                map.insert(
                    "apiVersion".into(),
                    Value::String(format!("{group}/{VERSION}")),
                );
                map.insert("kind".into(), Value::String(kind.kind().into()));
            }
            selected.push((group, obj));
        }
        selected.sort_by(|a, b| creation(&a.1).cmp(&creation(&b.1)));
        for (_, obj) in selected {
            let text = obj.to_string();
            let name = format!("{}/{}", kind.kind(), creation(&obj).1);
            match parse_manifests(&text, &name) {
                Ok(_) => {
                    out.applied[ki] += 1;
                    docs.push(text);
                }
                Err(e) => out.rejected.push(Rejected {
                    object: name,
                    error: e.detail,
                }),
            }
        }
    }
    // Every document parsed alone, so the stream parses too; JSON is YAML.
    out.objectives = parse_manifests(&docs.join("\n---\n"), "cluster").unwrap_or_default();
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pool() -> PoolRef {
        PoolRef {
            name: "pool".into(),
            group: POOL_GROUP_V1.into(),
        }
    }

    fn objective(name: &str, priority: i64, pool_ref: Value) -> (String, Value) {
        (
            X_K8S_GROUP.to_string(),
            json!({"metadata": {"name": name, "namespace": "ns",
                                "creationTimestamp": "2026-01-01T00:00:00Z",
                                "resourceVersion": "5", "managedFields": []},
                   "spec": {"priority": priority, "poolRef": pool_ref},
                   "status": {"conditions": []}}),
        )
    }

    fn rewrite(group: &str, name: &str, created: &str, target: &str) -> (String, Value) {
        (
            group.to_string(),
            json!({"metadata": {"name": name, "creationTimestamp": created},
                   "spec": {"poolRef": {"name": "pool"},
                            "rules": [{"matches": [{"model": {"type": "Exact", "value": "m"}}],
                                       "targets": [{"modelRewrite": target}]}]}}),
        )
    }

    #[test]
    fn objectives_of_this_pool_apply() {
        let objs = vec![
            objective("a", 10, json!({"name": "pool", "group": POOL_GROUP_V1})),
            objective("b", -2, json!({"name": "pool"})),
            objective("c", 3, json!({"name": "other-pool"})),
            objective("d", 4, json!({"name": "pool", "group": "example.com"})),
        ];
        let b = build([&objs, &[]], &pool());
        assert_eq!(b.objectives.priority("a"), Some(10));
        assert_eq!(b.objectives.priority("b"), Some(-2));
        assert_eq!(b.objectives.priority("c"), None);
        assert_eq!(b.objectives.priority("d"), None);
        assert_eq!(b.applied, [2, 0]);
        assert_eq!(b.other_pool, 2);
        assert!(b.rejected.is_empty());
    }

    #[test]
    fn llmd_objects_default_their_pool_group_to_llmd() {
        let o = (
            LLMD_GROUP.to_string(),
            json!({"metadata": {"name": "x"}, "spec": {"priority": 1,
                   "poolRef": {"name": "pool", "group": "llm-d.ai", "kind": "InferencePool"}}}),
        );
        let b = build([&[o], &[]], &pool());
        assert_eq!(b.objectives.priority("x"), Some(1));
    }

    #[test]
    fn the_oldest_rewrite_wins_whatever_the_order_of_events() {
        let rws = vec![
            rewrite(X_K8S_GROUP, "newer", "2026-02-01T00:00:00Z", "from-newer"),
            rewrite(X_K8S_GROUP, "older", "2026-01-01T00:00:00Z", "from-older"),
        ];
        let b = build([&[], &rws], &pool());
        let r = b.objectives.rewrite_for("m").unwrap();
        assert_eq!(r.rewrite_name, "older");
        assert_eq!(r.targets[0].0, "from-older");
        assert_eq!(b.applied, [0, 2]);
    }

    #[test]
    fn a_malformed_object_is_skipped_and_the_others_apply() {
        let objs = vec![
            objective("good", 1, json!({"name": "pool"})),
            (
                X_K8S_GROUP.to_string(),
                json!({"metadata": {"name": "bad"},
                       "spec": {"priority": "high", "poolRef": {"name": "pool"}}}),
            ),
        ];
        let rws = vec![(
            X_K8S_GROUP.to_string(),
            json!({"metadata": {"name": "half-weighted"}, "spec": {"poolRef": {"name": "pool"},
                   "rules": [{"targets": [{"modelRewrite": "a", "weight": 1}, {"modelRewrite": "b"}]}]}}),
        )];
        let b = build([&objs, &rws], &pool());
        assert_eq!(b.objectives.priority("good"), Some(1));
        assert_eq!(b.objectives.priority("bad"), None);
        assert_eq!(b.rejected.len(), 2);
        assert_eq!(b.rejected[0].object, "InferenceObjective/bad");
        assert!(b.rejected[0].error.contains("priority"), "{:?}", b.rejected);
        assert!(
            b.rejected[1].error.contains("must be set for all"),
            "{:?}",
            b.rejected
        );
        assert_eq!(b.applied, [1, 0]);
    }
}
