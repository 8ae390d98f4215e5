//! Fault injection controlled by the test.

use std::collections::HashSet;
use std::time::Duration;

use crate::status::ApiStatus;

/// A rule that makes matching requests fail. `verb` and `resource` accept `"*"`; `resource`
/// is the plural for the core group or `plural.group` (`leases.coordination.k8s.io`).
#[derive(Clone, Debug)]
pub struct FaultRule {
    /// get, list, watch, create, update, patch, delete, deletecollection, or `*`.
    pub verb: String,
    /// `pods`, `inferencepools.inference.networking.k8s.io`, or `*`.
    pub resource: String,
    /// Only in this namespace, if set.
    pub namespace: Option<String>,
    /// The failure; `None` answers 403 Forbidden worded as RBAC words it.
    pub status: Option<ApiStatus>,
    /// Fail this many matching requests and then stop; `None`: until cleared.
    pub remaining: Option<usize>,
}

impl FaultRule {
    /// 403 Forbidden for `verb` on `resource` until cleared.
    pub fn deny(verb: &str, resource: &str) -> Self {
        Self {
            verb: verb.into(),
            resource: resource.into(),
            namespace: None,
            status: None,
            remaining: None,
        }
    }

    /// Fails `verb` on `resource` with `status`, `times` times (`None`: until cleared).
    pub fn fail(verb: &str, resource: &str, status: ApiStatus, times: Option<usize>) -> Self {
        Self {
            verb: verb.into(),
            resource: resource.into(),
            namespace: None,
            status: Some(status),
            remaining: times,
        }
    }

    /// Restricts the rule to one namespace.
    pub fn in_namespace(mut self, ns: &str) -> Self {
        self.namespace = Some(ns.into());
        self
    }

    fn matches(&self, verb: &str, resource: &str, ns: &str) -> bool {
        (self.verb == "*" || self.verb == verb)
            && (self.resource == "*" || self.resource == resource)
            && self.namespace.as_ref().is_none_or(|n| n == ns)
    }
}

#[derive(Default)]
pub(crate) struct Faults {
    pub rules: Vec<FaultRule>,
    pub delay: Option<Duration>,
    pub malformed: HashSet<String>,
}

/// What a fault rule decided.
pub(crate) enum Injected {
    /// 403 in RBAC's words.
    Forbidden,
    /// This failure.
    Status(ApiStatus),
}

impl Faults {
    /// The first matching rule, consuming one use of a counted rule.
    pub fn check(&mut self, verb: &str, resource: &str, ns: &str) -> Option<Injected> {
        let idx = self
            .rules
            .iter()
            .position(|r| r.matches(verb, resource, ns) && r.remaining != Some(0))?;
        let rule = &mut self.rules[idx];
        if let Some(n) = &mut rule.remaining {
            *n -= 1;
        }
        let out = match &rule.status {
            None => Injected::Forbidden,
            Some(s) => Injected::Status(s.clone()),
        };
        self.rules.retain(|r| r.remaining != Some(0));
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_rules_run_out() {
        let mut f = Faults::default();
        f.rules.push(FaultRule::fail(
            "list",
            "pods",
            ApiStatus::internal("boom"),
            Some(2),
        ));
        f.rules
            .push(FaultRule::deny("*", "leases.coordination.k8s.io").in_namespace("a"));
        assert!(matches!(
            f.check("list", "pods", "x"),
            Some(Injected::Status(_))
        ));
        assert!(f.check("watch", "pods", "x").is_none());
        assert!(matches!(
            f.check("list", "pods", "x"),
            Some(Injected::Status(_))
        ));
        assert!(f.check("list", "pods", "x").is_none());
        assert!(matches!(
            f.check("update", "leases.coordination.k8s.io", "a"),
            Some(Injected::Forbidden)
        ));
        assert!(
            f.check("update", "leases.coordination.k8s.io", "b")
                .is_none()
        );
    }
}
