//! Resource kinds the server serves: what discovery lists and what the REST paths address.

use serde_json::Value;

/// The verbs of an ordinary stored resource.
pub const STANDARD_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// One served resource: group/version, plural, kind, scope, verbs and whether it has a
/// `/status` subresource. Register it with [`crate::TestApiServer::register`] (the equivalent
/// of installing a CRD) or by creating a `CustomResourceDefinition` through the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceKind {
    /// API group, `""` for the core group.
    pub group: String,
    /// Version, e.g. `v1`, `v1alpha2`.
    pub version: String,
    /// Plural resource name used in paths (`pods`, `inferencepools`).
    pub plural: String,
    /// Singular name (`pod`).
    pub singular: String,
    /// Kind (`Pod`).
    pub kind: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Verbs discovery advertises and the server allows.
    pub verbs: Vec<String>,
    /// Short names (`po`, `infpool`).
    pub short_names: Vec<String>,
    /// Whether `/status` is a subresource: the main resource then ignores status changes and
    /// create drops the status, as the real server does.
    pub status_subresource: bool,
    /// Objects of this kind are not stored (TokenReview, SubjectAccessReview): create only.
    pub(crate) virtual_create_only: bool,
}

impl ResourceKind {
    /// A namespaced or cluster-scoped stored kind with the standard verbs, singular = kind
    /// lower-cased. `api_version` is `v1` for core or `group/version`.
    pub fn new(api_version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        let (group, version) = split_api_version(api_version);
        Self {
            group: group.to_string(),
            version: version.to_string(),
            plural: plural.to_string(),
            singular: kind.to_lowercase(),
            kind: kind.to_string(),
            namespaced,
            verbs: STANDARD_VERBS.iter().map(|s| s.to_string()).collect(),
            short_names: Vec::new(),
            status_subresource: false,
            virtual_create_only: false,
        }
    }

    /// Adds a `/status` subresource.
    pub fn with_status(mut self) -> Self {
        self.status_subresource = true;
        self
    }

    /// Sets the short names.
    pub fn with_short_names(mut self, names: &[&str]) -> Self {
        self.short_names = names.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Replaces the verbs.
    pub fn with_verbs(mut self, verbs: &[&str]) -> Self {
        self.verbs = verbs.iter().map(|s| s.to_string()).collect();
        self
    }

    /// `v1` for core, `group/version` otherwise.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `plural` or `plural.group`, the name RBAC messages and `kubectl` use.
    pub fn qualified_name(&self) -> String {
        crate::status::qualified(&self.group, &self.plural)
    }

    /// The list kind (`PodList`).
    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    pub(crate) fn allows(&self, verb: &str) -> bool {
        self.verbs.iter().any(|v| v == verb)
    }

    /// core/v1 `pods` (with `/status`).
    pub fn pods() -> Self {
        Self::new("v1", "Pod", "pods", true)
            .with_status()
            .with_short_names(&["po"])
    }

    /// core/v1 `namespaces` (cluster-scoped).
    pub fn namespaces() -> Self {
        Self::new("v1", "Namespace", "namespaces", false)
            .with_status()
            .with_short_names(&["ns"])
            .with_verbs(&[
                "create", "delete", "get", "list", "patch", "update", "watch",
            ])
    }

    /// core/v1 `services`.
    pub fn services() -> Self {
        Self::new("v1", "Service", "services", true)
            .with_status()
            .with_short_names(&["svc"])
    }

    /// core/v1 `configmaps`.
    pub fn config_maps() -> Self {
        Self::new("v1", "ConfigMap", "configmaps", true).with_short_names(&["cm"])
    }

    /// core/v1 `secrets`.
    pub fn secrets() -> Self {
        Self::new("v1", "Secret", "secrets", true)
    }

    /// core/v1 `serviceaccounts`.
    pub fn service_accounts() -> Self {
        Self::new("v1", "ServiceAccount", "serviceaccounts", true).with_short_names(&["sa"])
    }

    /// core/v1 `events`.
    pub fn events() -> Self {
        Self::new("v1", "Event", "events", true).with_short_names(&["ev"])
    }

    /// core/v1 `nodes` (cluster-scoped).
    pub fn nodes() -> Self {
        Self::new("v1", "Node", "nodes", false)
            .with_status()
            .with_short_names(&["no"])
    }

    /// apps/v1 `deployments`.
    pub fn deployments() -> Self {
        Self::new("apps/v1", "Deployment", "deployments", true)
            .with_status()
            .with_short_names(&["deploy"])
    }

    /// coordination.k8s.io/v1 `leases` (leader election).
    pub fn leases() -> Self {
        Self::new("coordination.k8s.io/v1", "Lease", "leases", true)
    }

    /// events.k8s.io/v1 `events`.
    pub fn events_v1() -> Self {
        Self::new("events.k8s.io/v1", "Event", "events", true).with_short_names(&["ev"])
    }

    /// apiextensions.k8s.io/v1 `customresourcedefinitions`: creating one registers its kinds.
    pub fn custom_resource_definitions() -> Self {
        Self::new(
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
        )
        .with_status()
        .with_short_names(&["crd", "crds"])
    }

    /// authentication.k8s.io/v1 `tokenreviews` (create only, answered from the token table).
    pub fn token_reviews() -> Self {
        let mut k = Self::new(
            "authentication.k8s.io/v1",
            "TokenReview",
            "tokenreviews",
            false,
        )
        .with_verbs(&["create"]);
        k.virtual_create_only = true;
        k
    }

    /// authorization.k8s.io/v1 `subjectaccessreviews` (create only, answered from the
    /// permission table).
    pub fn subject_access_reviews() -> Self {
        let mut k = Self::new(
            "authorization.k8s.io/v1",
            "SubjectAccessReview",
            "subjectaccessreviews",
            false,
        )
        .with_verbs(&["create"]);
        k.virtual_create_only = true;
        k
    }

    /// authorization.k8s.io/v1 `selfsubjectaccessreviews` (`kubectl auth can-i`), answered for
    /// the requesting user from the permission table.
    pub fn self_subject_access_reviews() -> Self {
        let mut k = Self::new(
            "authorization.k8s.io/v1",
            "SelfSubjectAccessReview",
            "selfsubjectaccessreviews",
            false,
        )
        .with_verbs(&["create"]);
        k.virtual_create_only = true;
        k
    }

    /// authentication.k8s.io/v1 `selfsubjectreviews` (`kubectl auth whoami`).
    pub fn self_subject_reviews() -> Self {
        let mut k = Self::new(
            "authentication.k8s.io/v1",
            "SelfSubjectReview",
            "selfsubjectreviews",
            false,
        )
        .with_verbs(&["create"]);
        k.virtual_create_only = true;
        k
    }

    /// `inference.networking.k8s.io/v1` `inferencepools` (GIE v1).
    pub fn inference_pools_v1() -> Self {
        Self::new(
            "inference.networking.k8s.io/v1",
            "InferencePool",
            "inferencepools",
            true,
        )
        .with_status()
        .with_short_names(&["infpool"])
    }

    /// `inference.networking.x-k8s.io/v1alpha2` `inferencepools` (the older shape).
    pub fn inference_pools_v1alpha2() -> Self {
        Self::new(
            "inference.networking.x-k8s.io/v1alpha2",
            "InferencePool",
            "inferencepools",
            true,
        )
        .with_status()
        .with_short_names(&["infpool"])
    }

    /// `InferenceObjective` in `group` (`inference.networking.x-k8s.io` or `llm-d.ai`),
    /// version v1alpha2.
    pub fn inference_objectives(group: &str) -> Self {
        Self::new(
            &format!("{group}/v1alpha2"),
            "InferenceObjective",
            "inferenceobjectives",
            true,
        )
        .with_status()
    }

    /// `InferenceModelRewrite` in `group` (`inference.networking.x-k8s.io` or `llm-d.ai`),
    /// version v1alpha2.
    pub fn inference_model_rewrites(group: &str) -> Self {
        Self::new(
            &format!("{group}/v1alpha2"),
            "InferenceModelRewrite",
            "inferencemodelrewrites",
            true,
        )
        .with_status()
    }

    /// Every Gateway API Inference Extension / llm-d kind: v1 and v1alpha2 InferencePools,
    /// InferenceObjectives and InferenceModelRewrites in both groups.
    pub fn inference_extension_kinds() -> Vec<Self> {
        let mut v = vec![Self::inference_pools_v1(), Self::inference_pools_v1alpha2()];
        for g in ["inference.networking.x-k8s.io", "llm-d.ai"] {
            v.push(Self::inference_objectives(g));
            v.push(Self::inference_model_rewrites(g));
        }
        v
    }

    /// The kinds a fresh server serves: core pods, services, endpoints... (see the crate docs).
    pub fn builtin() -> Vec<Self> {
        vec![
            Self::pods(),
            Self::namespaces(),
            Self::services(),
            Self::config_maps(),
            Self::secrets(),
            Self::service_accounts(),
            Self::events(),
            Self::nodes(),
            Self::deployments(),
            Self::leases(),
            Self::events_v1(),
            Self::custom_resource_definitions(),
            Self::token_reviews(),
            Self::subject_access_reviews(),
            Self::self_subject_access_reviews(),
            Self::self_subject_reviews(),
        ]
    }

    /// The kinds a `CustomResourceDefinition` object declares (one per served version).
    pub fn from_crd(crd: &Value) -> Result<Vec<Self>, String> {
        let spec = crd.get("spec").ok_or("spec: Required value")?;
        let group = spec
            .get("group")
            .and_then(Value::as_str)
            .ok_or("spec.group: Required value")?;
        let names = spec.get("names").ok_or("spec.names: Required value")?;
        let plural = names
            .get("plural")
            .and_then(Value::as_str)
            .ok_or("spec.names.plural: Required value")?;
        let kind = names
            .get("kind")
            .and_then(Value::as_str)
            .ok_or("spec.names.kind: Required value")?;
        let singular = names
            .get("singular")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| kind.to_lowercase());
        let short: Vec<&str> = names
            .get("shortNames")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let namespaced = match spec.get("scope").and_then(Value::as_str) {
            Some("Namespaced") => true,
            Some("Cluster") => false,
            _ => return Err("spec.scope: Unsupported value: must be Namespaced or Cluster".into()),
        };
        if let Some(name) = crd.pointer("/metadata/name").and_then(Value::as_str)
            && name != format!("{plural}.{group}")
        {
            return Err(format!(
                "metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
            ));
        }
        let versions = spec
            .get("versions")
            .and_then(Value::as_array)
            .ok_or("spec.versions: Required value")?;
        let mut out = Vec::new();
        for v in versions {
            if v.get("served").and_then(Value::as_bool) == Some(false) {
                continue;
            }
            let name = v
                .get("name")
                .and_then(Value::as_str)
                .ok_or("spec.versions[].name: Required value")?;
            let mut k = Self::new(&format!("{group}/{name}"), kind, plural, namespaced)
                .with_short_names(&short);
            k.singular = singular.clone();
            k.status_subresource = v.pointer("/subresources/status").is_some();
            out.push(k);
        }
        if out.is_empty() {
            return Err(
                "spec.versions: Invalid value: must have at least one served version".into(),
            );
        }
        Ok(out)
    }
}

/// `v1` → (`""`, `v1`); `apps/v1` → (`apps`, `v1`).
pub(crate) fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}

/// Kubernetes version priority: GA > beta > alpha, higher numbers first; others last.
pub(crate) fn version_priority(v: &str) -> (u8, u32, u32) {
    let Some(rest) = v.strip_prefix('v') else {
        return (0, 0, 0);
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let Ok(major) = digits.parse::<u32>() else {
        return (0, 0, 0);
    };
    let tail = &rest[digits.len()..];
    if tail.is_empty() {
        return (3, major, 0);
    }
    let (level, num) = if let Some(n) = tail.strip_prefix("beta") {
        (2, n)
    } else if let Some(n) = tail.strip_prefix("alpha") {
        (1, n)
    } else {
        return (0, 0, 0);
    };
    match num.parse::<u32>() {
        Ok(n) => (level, major, n),
        Err(_) => (0, 0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn version_priority_orders_as_kubernetes() {
        let mut v = vec![
            "v1alpha1", "v1beta2", "v2", "v1", "v1alpha2", "foo", "v1beta1",
        ];
        v.sort_by_key(|s| std::cmp::Reverse(version_priority(s)));
        assert_eq!(
            v,
            vec![
                "v2", "v1", "v1beta2", "v1beta1", "v1alpha2", "v1alpha1", "foo"
            ]
        );
    }

    #[test]
    fn crd_declares_served_versions() {
        let crd = json!({
            "metadata": {"name": "widgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [
                    {"name": "v1", "served": true, "storage": true, "subresources": {"status": {}}},
                    {"name": "v1beta1", "served": false, "storage": false}
                ]}
        });
        let kinds = ResourceKind::from_crd(&crd).unwrap();
        assert_eq!(kinds.len(), 1);
        assert_eq!(kinds[0].api_version(), "example.com/v1");
        assert!(kinds[0].status_subresource);
        assert_eq!(kinds[0].singular, "widget");
        assert_eq!(kinds[0].short_names, vec!["wd"]);
    }

    #[test]
    fn crd_with_wrong_name_or_scope_is_refused() {
        let mut crd = json!({
            "metadata": {"name": "gadgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget"},
                "versions": [{"name": "v1", "served": true}]}
        });
        assert!(
            ResourceKind::from_crd(&crd)
                .unwrap_err()
                .contains("metadata.name")
        );
        crd["metadata"]["name"] = json!("widgets.example.com");
        crd["spec"]["scope"] = json!("Galaxy");
        assert!(
            ResourceKind::from_crd(&crd)
                .unwrap_err()
                .contains("spec.scope")
        );
    }
}
