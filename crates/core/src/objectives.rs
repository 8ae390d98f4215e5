//! `InferenceObjective` and `InferenceModelRewrite`: priorities and model rewrites, from the
//! same manifests users apply to a cluster.
//!
//! [`parse_manifests`] reads a multi-document YAML stream; documents of other kinds are
//! skipped, so a user can point llmsched at the very file they `kubectl apply`. Both API
//! groups are accepted: `inference.networking.x-k8s.io/*` and `llm-d.ai/*`.
//!
//! Rewrite precedence follows the reference: a rule with an exact model match beats a generic
//! rule (no `matches`); among equals, the earlier resource in the file wins (the stand-in for
//! "oldest creation timestamp"), and within a resource the first matching rule wins.

use std::collections::HashMap;

use serde::Deserialize;

/// API groups accepted for objectives and rewrites.
pub const API_GROUPS: [&str; 2] = ["inference.networking.x-k8s.io", "llm-d.ai"];

/// A manifest file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: document {doc}: {detail}")]
pub struct ObjectivesError {
    /// File name (or other source).
    pub source_name: String,
    /// 1-based document index in the stream.
    pub doc: usize,
    /// What is wrong.
    pub detail: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

#[derive(Debug, Deserialize, Default)]
struct Metadata {
    #[serde(default)]
    name: String,
}

#[derive(Debug, Deserialize)]
struct ObjectiveDoc {
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: ObjectiveSpec,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ObjectiveSpec {
    #[serde(default)]
    priority: Option<i32>,
    #[serde(default)]
    pool_ref: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct RewriteDoc {
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: RewriteSpec,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RewriteSpec {
    #[serde(default)]
    pool_ref: Option<serde_json::Value>,
    #[serde(default)]
    rules: Vec<RewriteRule>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RewriteRule {
    #[serde(default)]
    matches: Vec<Match>,
    #[serde(default)]
    targets: Vec<Target>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Match {
    model: Option<ModelMatch>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelMatch {
    #[serde(default, rename = "type")]
    match_type: Option<String>,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Target {
    #[serde(default)]
    weight: Option<i64>,
    model_rewrite: String,
}

/// Weighted target models of one rewrite rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewriteTargets {
    /// Name of the `InferenceModelRewrite` the rule came from.
    pub rewrite_name: String,
    /// `(model, weight)`; all weights 0 means an even split.
    pub targets: Vec<(String, u32)>,
}

impl RewriteTargets {
    /// Chooses a target with probability weight / Σ weights, using `random` (any u64) as the
    /// source of randomness; an even split when all weights are 0.
    pub fn choose(&self, random: u64) -> Option<&str> {
        if self.targets.is_empty() {
            return None;
        }
        let total: u64 = self.targets.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            let i = (random % self.targets.len() as u64) as usize;
            return Some(&self.targets[i].0);
        }
        let mut r = random % total;
        for (m, w) in &self.targets {
            let w = u64::from(*w);
            if r < w {
                return Some(m);
            }
            r -= w;
        }
        self.targets.last().map(|(m, _)| m.as_str())
    }
}

/// Objectives and rewrites in effect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Objectives {
    priorities: HashMap<String, i32>,
    exact: HashMap<String, RewriteTargets>,
    generic: Option<RewriteTargets>,
}

impl Objectives {
    /// Priority of the named objective: `None` when unknown; 0 when it sets none.
    pub fn priority(&self, objective: &str) -> Option<i32> {
        self.priorities.get(objective).copied()
    }

    /// The rewrite rule applying to requests for `model`.
    pub fn rewrite_for(&self, model: &str) -> Option<&RewriteTargets> {
        self.exact.get(model).or(self.generic.as_ref())
    }

    /// Every model name the rewrites mention: the models they match and the targets they
    /// rewrite to (with repeats). Used to decide which model names are metric label values.
    pub fn model_names(&self) -> impl Iterator<Item = &str> {
        let targets = self
            .exact
            .values()
            .chain(self.generic.iter())
            .flat_map(|r| r.targets.iter().map(|(m, _)| m.as_str()));
        self.exact.keys().map(String::as_str).chain(targets)
    }

    /// Number of objectives.
    pub fn objective_count(&self) -> usize {
        self.priorities.len()
    }

    /// Number of models with an exact rewrite rule (plus one for a generic rule).
    pub fn rewrite_count(&self) -> usize {
        self.exact.len() + usize::from(self.generic.is_some())
    }

    /// Adds an objective (for tests and programmatic use).
    pub fn insert_objective(&mut self, name: impl Into<String>, priority: i32) {
        self.priorities.insert(name.into(), priority);
    }
}

/// Deserializes `value`, prefixing errors with the path of the offending field.
pub(crate) fn from_value_with_path<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("{path}: {}", e.inner())
        }
    })
}

fn group_ok(api_version: &str) -> bool {
    let group = api_version.split('/').next().unwrap_or_default();
    API_GROUPS.contains(&group)
}

/// Parses a multi-document YAML stream of manifests.
pub fn parse_manifests(text: &str, source_name: &str) -> Result<Objectives, ObjectivesError> {
    let mut out = Objectives::default();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let doc_no = i + 1;
        let fail = |detail: String| ObjectivesError {
            source_name: source_name.to_string(),
            doc: doc_no,
            detail,
        };
        let value = serde_json::Value::deserialize(de).map_err(|e| fail(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let header: Header =
            serde_json::from_value(value.clone()).map_err(|e| fail(e.to_string()))?;
        let kind = header.kind.as_str();
        if kind != "InferenceObjective" && kind != "InferenceModelRewrite" {
            tracing::debug!(
                source = source_name,
                doc = doc_no,
                kind,
                "skipping manifest of another kind"
            );
            continue;
        }
        if !group_ok(&header.api_version) {
            return Err(fail(format!(
                "{kind} has apiVersion '{}'; expected a group of {}",
                header.api_version,
                API_GROUPS.join(" or ")
            )));
        }
        if kind == "InferenceObjective" {
            let d: ObjectiveDoc = from_value_with_path(value)
                .map_err(|e| fail(format!("InferenceObjective: {e}")))?;
            if d.metadata.name.is_empty() {
                return Err(fail("InferenceObjective: metadata.name is required".into()));
            }
            let _ = d.spec.pool_ref;
            out.priorities
                .insert(d.metadata.name, d.spec.priority.unwrap_or(0));
        } else {
            let d: RewriteDoc = from_value_with_path(value)
                .map_err(|e| fail(format!("InferenceModelRewrite: {e}")))?;
            let _ = d.spec.pool_ref;
            let name = d.metadata.name;
            for (ri, rule) in d.spec.rules.into_iter().enumerate() {
                let weighted = rule.targets.iter().filter(|t| t.weight.is_some()).count();
                if weighted != 0 && weighted != rule.targets.len() {
                    return Err(fail(format!(
                        "InferenceModelRewrite '{name}': rules[{ri}]: if a weight is set for any target, it must be set for all targets"
                    )));
                }
                let mut targets = Vec::with_capacity(rule.targets.len());
                for (ti, t) in rule.targets.into_iter().enumerate() {
                    if t.model_rewrite.is_empty() {
                        return Err(fail(format!(
                            "InferenceModelRewrite '{name}': rules[{ri}].targets[{ti}].modelRewrite is empty"
                        )));
                    }
                    let w = t.weight.unwrap_or(0);
                    let w = u32::try_from(w).map_err(|_| {
                        fail(format!(
                            "InferenceModelRewrite '{name}': rules[{ri}].targets[{ti}].weight must be between 0 and {}, got {w}",
                            u32::MAX
                        ))
                    })?;
                    targets.push((t.model_rewrite, w));
                }
                if targets.is_empty() {
                    continue;
                }
                let rt = RewriteTargets {
                    rewrite_name: name.clone(),
                    targets,
                };
                if rule.matches.is_empty() {
                    if out.generic.is_none() {
                        out.generic = Some(rt);
                    }
                    continue;
                }
                for (mi, m) in rule.matches.iter().enumerate() {
                    let Some(mm) = &m.model else {
                        return Err(fail(format!(
                            "InferenceModelRewrite '{name}': rules[{ri}].matches[{mi}].model is required"
                        )));
                    };
                    if let Some(t) = mm.match_type.as_deref().filter(|t| *t != "Exact") {
                        return Err(fail(format!(
                            "InferenceModelRewrite '{name}': rules[{ri}].matches[{mi}].model.type '{t}' is not supported (only Exact)"
                        )));
                    }
                    out.exact
                        .entry(mm.value.clone())
                        .or_insert_with(|| rt.clone());
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: critical}
spec: {priority: 10, poolRef: {name: pool}}
---
apiVersion: llm-d.ai/v1alpha1
kind: InferenceObjective
metadata: {name: batch}
spec: {priority: -1}
---
apiVersion: v1
kind: Service
metadata: {name: ignored}
spec: {ports: [{port: 80}]}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceObjective
metadata: {name: plain}
spec: {}
---
apiVersion: inference.networking.x-k8s.io/v1alpha2
kind: InferenceModelRewrite
metadata: {name: canary}
spec:
  rules:
  - matches: [{model: {type: Exact, value: food-review}}]
    targets:
    - {modelRewrite: food-review-v1, weight: 90}
    - {modelRewrite: food-review-v2, weight: 10}
  - targets: [{modelRewrite: base}]
---
"#;

    #[test]
    fn objectives_and_rewrites_from_a_mixed_file() {
        let o = parse_manifests(FILE, "obj.yaml").unwrap();
        assert_eq!(o.priority("critical"), Some(10));
        assert_eq!(o.priority("batch"), Some(-1));
        assert_eq!(o.priority("plain"), Some(0));
        assert_eq!(o.priority("ignored"), None);
        let r = o.rewrite_for("food-review").unwrap();
        assert_eq!(r.rewrite_name, "canary");
        assert_eq!(r.targets.len(), 2);
        // Generic rule for everything else.
        assert_eq!(o.rewrite_for("other").unwrap().targets[0].0, "base");
    }

    #[test]
    fn weighted_choice_follows_weights() {
        let rt = RewriteTargets {
            rewrite_name: "r".into(),
            targets: vec![("a".into(), 90), ("b".into(), 10)],
        };
        let n = 10_000u64;
        let a = (0..n)
            .filter(|i| rt.choose(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) == Some("a"))
            .count();
        assert!((8_700..9_300).contains(&a), "a chosen {a} times");
        // Deterministic boundaries.
        assert_eq!(rt.choose(89), Some("a"));
        assert_eq!(rt.choose(90), Some("b"));
        let even = RewriteTargets {
            rewrite_name: "r".into(),
            targets: vec![("a".into(), 0), ("b".into(), 0)],
        };
        assert_eq!(even.choose(0), Some("a"));
        assert_eq!(even.choose(1), Some("b"));
    }

    #[test]
    fn broken_manifests_are_rejected_with_location() {
        let cases = [
            (
                "kind: InferenceObjective\napiVersion: example.com/v1\nmetadata: {name: x}\n",
                "apiVersion",
            ),
            (
                "apiVersion: llm-d.ai/v1alpha1\nkind: InferenceObjective\nmetadata: {name: x}\nspec: {priority: high}\n",
                "priority",
            ),
            (
                "apiVersion: llm-d.ai/v1alpha1\nkind: InferenceObjective\nmetadata: {name: x}\nspec: {prio: 1}\n",
                "prio",
            ),
            (
                "apiVersion: llm-d.ai/v1alpha1\nkind: InferenceObjective\nspec: {}\n",
                "metadata.name",
            ),
            (
                "apiVersion: llm-d.ai/v1alpha1\nkind: InferenceModelRewrite\nmetadata: {name: r}\nspec:\n  rules:\n  - targets: [{modelRewrite: a, weight: 1}, {modelRewrite: b}]\n",
                "must be set for all",
            ),
            (
                "apiVersion: llm-d.ai/v1alpha1\nkind: InferenceModelRewrite\nmetadata: {name: r}\nspec:\n  rules:\n  - matches: [{model: {type: Regex, value: a}}]\n    targets: [{modelRewrite: b}]\n",
                "only Exact",
            ),
            ("a: [1, 2\n", "document 1"),
        ];
        for (text, needle) in cases {
            let e = parse_manifests(text, "f.yaml").unwrap_err().to_string();
            assert!(e.contains(needle), "expected '{needle}' in: {e}");
            assert!(e.starts_with("f.yaml: document"), "{e}");
        }
    }

    #[test]
    fn exact_rules_beat_generic_ones_and_first_wins() {
        let text = r#"
apiVersion: llm-d.ai/v1alpha1
kind: InferenceModelRewrite
metadata: {name: first}
spec:
  rules:
  - targets: [{modelRewrite: generic-1}]
---
apiVersion: llm-d.ai/v1alpha1
kind: InferenceModelRewrite
metadata: {name: second}
spec:
  rules:
  - targets: [{modelRewrite: generic-2}]
  - matches: [{model: {value: m}}]
    targets: [{modelRewrite: exact-2}]
  - matches: [{model: {value: m}}]
    targets: [{modelRewrite: exact-3}]
"#;
        let o = parse_manifests(text, "f").unwrap();
        assert_eq!(o.rewrite_for("m").unwrap().targets[0].0, "exact-2");
        assert_eq!(o.rewrite_for("z").unwrap().targets[0].0, "generic-1");
    }
}
