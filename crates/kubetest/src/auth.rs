//! Test-configurable authentication (token → user) and authorization (RBAC-like allow rules),
//! used for the server's own bearer-token check, for `TokenReview` and `SubjectAccessReview`,
//! and (optionally) to authorize every API request.

use std::collections::HashMap;

use serde_json::{Value, json};

/// An authenticated user, as a `TokenReview` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserInfo {
    /// `user.username`, e.g. `system:serviceaccount:monitoring:prometheus`.
    pub username: String,
    /// `user.uid`.
    pub uid: String,
    /// `user.groups`.
    pub groups: Vec<String>,
}

impl UserInfo {
    /// A user with a derived uid.
    pub fn new(username: &str, groups: &[&str]) -> Self {
        Self {
            username: username.to_string(),
            uid: format!("uid-{username}"),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    /// `system:serviceaccount:<ns>:<name>` in the service-account groups.
    pub fn service_account(namespace: &str, name: &str) -> Self {
        Self::new(
            &format!("system:serviceaccount:{namespace}:{name}"),
            &[
                "system:serviceaccounts",
                &format!("system:serviceaccounts:{namespace}"),
                "system:authenticated",
            ],
        )
    }

    pub(crate) fn admin() -> Self {
        Self::new(
            "kubetest-admin",
            &["system:masters", "system:authenticated"],
        )
    }

    pub(crate) fn is_admin(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }
}

/// An allow rule (RBAC has no deny rules). `"*"` matches anything in any field; `subject`
/// matches a username or a group; a non-resource `path` ending in `*` matches a prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Permission {
    /// `verb` on `resource` (plural, or `plural/subresource`) in API `group`, in `namespace`
    /// (`None`: every namespace and cluster scope).
    Resource {
        /// User name or group.
        subject: String,
        /// get, list, watch, create, update, patch, delete, ...
        verb: String,
        /// API group (`""` core).
        group: String,
        /// Resource plural.
        resource: String,
        /// Namespace, or `None` for all.
        namespace: Option<String>,
    },
    /// `verb` on a non-resource URL such as `/metrics`.
    NonResource {
        /// User name or group.
        subject: String,
        /// Usually `get`.
        verb: String,
        /// URL path; a trailing `*` matches a prefix.
        path: String,
    },
}

impl Permission {
    /// A resource rule valid in every namespace.
    pub fn resource(subject: &str, verb: &str, group: &str, resource: &str) -> Self {
        Self::Resource {
            subject: subject.into(),
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: None,
        }
    }

    /// A resource rule limited to one namespace (a Role rather than a ClusterRole).
    pub fn namespaced(subject: &str, verb: &str, group: &str, resource: &str, ns: &str) -> Self {
        Self::Resource {
            subject: subject.into(),
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: Some(ns.into()),
        }
    }

    /// A non-resource URL rule.
    pub fn non_resource(subject: &str, verb: &str, path: &str) -> Self {
        Self::NonResource {
            subject: subject.into(),
            verb: verb.into(),
            path: path.into(),
        }
    }
}

/// What is being authorized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Attributes {
    Resource {
        verb: String,
        group: String,
        resource: String,
        subresource: String,
        namespace: String,
    },
    NonResource {
        verb: String,
        path: String,
    },
}

fn any_or(pattern: &str, value: &str) -> bool {
    pattern == "*" || pattern == value
}

fn subject_matches(subject: &str, user: &str, groups: &[String]) -> bool {
    subject == "*" || subject == user || groups.iter().any(|g| g == subject)
}

#[derive(Default)]
pub(crate) struct AuthTable {
    pub tokens: HashMap<String, UserInfo>,
    pub permissions: Vec<Permission>,
}

impl AuthTable {
    pub fn allowed(&self, user: &str, groups: &[String], attrs: &Attributes) -> bool {
        if groups.iter().any(|g| g == "system:masters") {
            return true;
        }
        self.permissions.iter().any(|p| match (p, attrs) {
            (
                Permission::Resource {
                    subject,
                    verb,
                    group,
                    resource,
                    namespace,
                },
                Attributes::Resource {
                    verb: v,
                    group: g,
                    resource: r,
                    subresource: sr,
                    namespace: ns,
                },
            ) => {
                let full = if sr.is_empty() {
                    r.clone()
                } else {
                    format!("{r}/{sr}")
                };
                subject_matches(subject, user, groups)
                    && any_or(verb, v)
                    && any_or(group, g)
                    && (resource == "*" || *resource == full)
                    && namespace.as_ref().is_none_or(|n| n == ns)
            }
            (
                Permission::NonResource {
                    subject,
                    verb,
                    path,
                },
                Attributes::NonResource { verb: v, path: p },
            ) => {
                let path_ok = match path.strip_suffix('*') {
                    Some(prefix) => p.starts_with(prefix),
                    None => path == p,
                };
                subject_matches(subject, user, groups) && any_or(verb, v) && path_ok
            }
            _ => false,
        })
    }

    /// Answers a `TokenReview`: the request body with `status` filled in.
    pub fn token_review(&self, body: &Value) -> Result<Value, String> {
        let token = body
            .pointer("/spec/token")
            .and_then(Value::as_str)
            .ok_or("spec.token: Required value")?;
        let mut out = body.clone();
        let status = match self.tokens.get(token) {
            Some(u) => json!({
                "authenticated": true,
                "user": {"username": u.username, "uid": u.uid, "groups": u.groups},
                "audiences": body.pointer("/spec/audiences").cloned().unwrap_or_else(|| json!([])),
            }),
            None => json!({"authenticated": false, "user": {}, "error": "invalid bearer token"}),
        };
        if let Value::Object(m) = &mut out {
            m.insert("status".into(), status);
            m.insert("apiVersion".into(), json!("authentication.k8s.io/v1"));
            m.insert("kind".into(), json!("TokenReview"));
            m.entry("metadata").or_insert_with(|| json!({}));
        }
        Ok(out)
    }

    /// Answers a `SubjectAccessReview`: the request body with `status` filled in.
    pub fn subject_access_review(&self, body: &Value) -> Result<Value, String> {
        let spec = body.get("spec").ok_or("spec: Required value")?;
        let user = spec.get("user").and_then(Value::as_str).unwrap_or_default();
        let groups: Vec<String> = spec
            .get("groups")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        if user.is_empty() && groups.is_empty() {
            return Err(
                "spec.user: Invalid value: at least one of user or group must be specified".into(),
            );
        }
        let s = |v: &Value, f: &str| {
            v.get(f)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let attrs = match (spec.get("resourceAttributes"), spec.get("nonResourceAttributes")) {
            (Some(ra), None) => Attributes::Resource {
                verb: s(ra, "verb"),
                group: s(ra, "group"),
                resource: s(ra, "resource"),
                subresource: s(ra, "subresource"),
                namespace: s(ra, "namespace"),
            },
            (None, Some(na)) => Attributes::NonResource {
                verb: s(na, "verb"),
                path: s(na, "path"),
            },
            _ => return Err("spec.resourceAttributes: Invalid value: exactly one of nonResourceAttributes or resourceAttributes must be specified".into()),
        };
        let allowed = self.allowed(user, &groups, &attrs);
        let mut out = body.clone();
        let status = if allowed {
            json!({"allowed": true, "reason": "allowed by kubetest permission table"})
        } else {
            json!({"allowed": false})
        };
        if let Value::Object(m) = &mut out {
            m.insert("status".into(), status);
            m.insert("apiVersion".into(), json!("authorization.k8s.io/v1"));
            m.insert("kind".into(), json!("SubjectAccessReview"));
            m.entry("metadata").or_insert_with(|| json!({}));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_user_group_verb_and_path() {
        let t = AuthTable {
            tokens: HashMap::new(),
            permissions: vec![
                Permission::non_resource("prom", "get", "/metrics"),
                Permission::non_resource("system:monitoring", "get", "/debug/*"),
                Permission::namespaced("epp", "get", "", "pods", "llm-d"),
                Permission::resource("epp", "*", "coordination.k8s.io", "leases"),
            ],
        };
        let nr = |v: &str, p: &str| Attributes::NonResource {
            verb: v.into(),
            path: p.into(),
        };
        let res = |v: &str, g: &str, r: &str, ns: &str| Attributes::Resource {
            verb: v.into(),
            group: g.into(),
            resource: r.into(),
            subresource: String::new(),
            namespace: ns.into(),
        };
        assert!(t.allowed("prom", &[], &nr("get", "/metrics")));
        assert!(!t.allowed("prom", &[], &nr("post", "/metrics")));
        assert!(!t.allowed("other", &[], &nr("get", "/metrics")));
        assert!(t.allowed(
            "x",
            &["system:monitoring".into()],
            &nr("get", "/debug/pprof")
        ));
        assert!(t.allowed("epp", &[], &res("get", "", "pods", "llm-d")));
        assert!(!t.allowed("epp", &[], &res("get", "", "pods", "other")));
        assert!(!t.allowed("epp", &[], &res("list", "", "pods", "llm-d")));
        assert!(t.allowed(
            "epp",
            &[],
            &res("update", "coordination.k8s.io", "leases", "a")
        ));
        assert!(t.allowed(
            "anyone",
            &["system:masters".into()],
            &res("delete", "", "nodes", "")
        ));
    }

    #[test]
    fn reviews_need_their_fields() {
        let mut t = AuthTable::default();
        t.tokens.insert("tok".into(), UserInfo::new("u", &["g"]));
        let ok = t
            .token_review(&json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": "tok"}}))
            .unwrap();
        assert_eq!(ok["status"]["authenticated"], true);
        assert_eq!(ok["status"]["user"]["username"], "u");
        let bad = t.token_review(&json!({"spec": {"token": "nope"}})).unwrap();
        assert_eq!(bad["status"]["authenticated"], false);
        assert!(t.token_review(&json!({"spec": {}})).is_err());
        assert!(
            t.subject_access_review(&json!({"spec": {"user": "u"}}))
                .is_err()
        );
        assert!(
            t.subject_access_review(
                &json!({"spec": {"nonResourceAttributes": {"path": "/metrics", "verb": "get"}}})
            )
            .is_err()
        );
        let denied = t
            .subject_access_review(&json!({"spec": {"user": "u", "nonResourceAttributes": {"path": "/metrics", "verb": "get"}}}))
            .unwrap();
        assert_eq!(denied["status"]["allowed"], false);
    }
}
