//! The pool/pod contract, as pure functions: what an `InferencePool` says (selector, target
//! ports), which pods are endpoints, and the endpoints a pod becomes.
//!
//! * **Pool** ([`PoolView::from_object`]): `inference.networking.k8s.io/v1` reads
//!   `spec.selector.matchLabels` and `spec.targetPorts[].number` (1 to 8, unique);
//!   `inference.networking.x-k8s.io/v1alpha2` reads the flat `spec.selector` and
//!   `spec.targetPortNumber`. Anything else wrong is an error naming the field.
//! * **Pod** ([`pod_endpoints`]): an endpoint while its `Ready` condition is `True`, it has no
//!   `deletionTimestamp` and it has a `status.podIP` (a ready pod always has one); one
//!   endpoint per target port, named `<pod>-rank-<i>`, at `podIP:<port>`, with the pod's
//!   labels.
//! * **Metrics port** ([`metrics_port`]): `--model-server-metrics-port` when the pool has
//!   exactly one target port, else each endpoint's own port.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use llmsched_core::endpoint::EndpointMeta;
use serde_json::Value;

use crate::crd::{POOL_GROUP_V1, X_K8S_GROUP};

/// What discovery needs from an `InferencePool` (or from `--endpoint-selector` /
/// `--endpoint-target-ports`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    /// Labels a pod must carry (equality).
    pub selector: BTreeMap<String, String>,
    /// Target ports, in order; endpoint `<pod>-rank-<i>` uses `target_ports[i]`.
    pub target_ports: Vec<u16>,
}

/// An `InferencePool` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("InferencePool {name}: {detail}")]
pub struct PoolError {
    /// `namespace/name`.
    pub name: String,
    /// What is wrong, with the field.
    pub detail: String,
}

fn port_of(v: &Value, field: &str) -> Result<u16, String> {
    let n = v
        .as_i64()
        .ok_or_else(|| format!("{field}: expected an integer, got {v}"))?;
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{field}: {n} is not a port (1-65535)"))
}

fn string_map(v: &Value, field: &str) -> Result<BTreeMap<String, String>, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("{field}: expected a map of labels, got {v}"))?;
    obj.iter()
        .map(|(k, v)| {
            v.as_str()
                .map(|s| (k.clone(), s.to_string()))
                .ok_or_else(|| format!("{field}.{k}: expected a string, got {v}"))
        })
        .collect()
}

impl PoolView {
    /// Reads a pool object (the full JSON of the resource) of API group `group`.
    pub fn from_object(group: &str, obj: &Value) -> Result<Self, PoolError> {
        let name = format!(
            "{}/{}",
            obj.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or(""),
            obj.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("?")
        );
        Self::from_spec(group, obj.get("spec").unwrap_or(&Value::Null))
            .map_err(|detail| PoolError { name, detail })
    }

    fn from_spec(group: &str, spec: &Value) -> Result<Self, String> {
        if !spec.is_object() {
            return Err("spec: missing".into());
        }
        let (selector, target_ports) = if group == X_K8S_GROUP {
            let sel = spec.get("selector").ok_or("spec.selector: missing")?;
            let port = spec
                .get("targetPortNumber")
                .ok_or("spec.targetPortNumber: missing")?;
            (
                string_map(sel, "spec.selector")?,
                vec![port_of(port, "spec.targetPortNumber")?],
            )
        } else if group == POOL_GROUP_V1 {
            let sel = spec
                .pointer("/selector/matchLabels")
                .ok_or("spec.selector.matchLabels: missing")?;
            let ports = spec
                .get("targetPorts")
                .and_then(Value::as_array)
                .ok_or("spec.targetPorts: missing (a list of {number})")?;
            let mut out = Vec::with_capacity(ports.len());
            for (i, p) in ports.iter().enumerate() {
                let field = format!("spec.targetPorts[{i}].number");
                let n = p.get("number").ok_or(format!("{field}: missing"))?;
                let n = port_of(n, &field)?;
                if out.contains(&n) {
                    return Err(format!("{field}: port {n} is listed twice"));
                }
                out.push(n);
            }
            (string_map(sel, "spec.selector.matchLabels")?, out)
        } else {
            return Err(format!("unknown API group '{group}'"));
        };
        if selector.is_empty() {
            return Err("the selector is empty (it would select every pod)".into());
        }
        if target_ports.is_empty() || target_ports.len() > 8 {
            return Err(format!(
                "spec.targetPorts: {} ports (expected 1 to 8)",
                target_ports.len()
            ));
        }
        Ok(Self {
            selector,
            target_ports,
        })
    }

    /// The selector as a Kubernetes label selector string (`k=v,k2=v2`, sorted).
    pub fn label_selector(&self) -> String {
        self.selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// True when `labels` carry every selector label.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// The port scraped for every endpoint of a pool: `flag` (`--model-server-metrics-port`,
/// 0 = unset) only when the pool has exactly one target port.
pub fn metrics_port(pool: &PoolView, flag: u16) -> Option<u16> {
    (pool.target_ports.len() == 1 && flag != 0).then_some(flag)
}

/// True when the pod counts as an endpoint: `Ready` is `True` and no `deletionTimestamp`.
pub fn pod_is_ready(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// Why a pod gives no endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// Not ready, or being deleted (normal).
    NotReady,
    /// Its labels do not match the pool's selector (normal after a selector change).
    NotSelected,
    /// Ready but without a usable `status.podIP` (malformed).
    BadAddress(String),
}

/// The endpoints `pod` gives for `pool` (see the module documentation).
pub fn pod_endpoints(pod: &Pod, pool: &PoolView) -> Result<Vec<EndpointMeta>, Skip> {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    if !pool.matches(&labels) {
        return Err(Skip::NotSelected);
    }
    if !pod_is_ready(pod) {
        return Err(Skip::NotReady);
    }
    let name = pod.metadata.name.clone().unwrap_or_default();
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .unwrap_or("");
    let address: IpAddr = ip.parse().map_err(|_| {
        Skip::BadAddress(if ip.is_empty() {
            "ready but no status.podIP".into()
        } else {
            format!("status.podIP '{ip}' is not an IP address")
        })
    })?;
    Ok(pool
        .target_ports
        .iter()
        .enumerate()
        .map(|(rank, &port)| EndpointMeta {
            name: format!("{name}-rank-{rank}"),
            address,
            port,
            labels: labels.clone(),
        })
        .collect())
}

/// The endpoints of all `pods` (sorted by pod name for determinism), dropping any endpoint
/// whose `ip:port` an earlier pod already has (two pods cannot really share one; the store
/// would refuse the whole list). Returns the endpoints and the pods dropped that way.
pub fn pool_endpoints<'a>(
    pods: impl IntoIterator<Item = &'a Vec<EndpointMeta>>,
) -> (Vec<EndpointMeta>, Vec<String>) {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut dropped = Vec::new();
    for eps in pods {
        for ep in eps {
            if seen.insert(ep.socket_addr()) {
                out.push(ep.clone());
            } else {
                dropped.push(ep.name.clone());
            }
        }
    }
    (out, dropped)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use serde_json::json;

    use super::*;

    fn pod(name: &str, ip: &str, ready: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                pod_ip: (!ip.is_empty()).then(|| ip.to_string()),
                conditions: Some(vec![
                    PodCondition {
                        type_: "PodScheduled".into(),
                        status: "True".into(),
                        ..Default::default()
                    },
                    PodCondition {
                        type_: "Ready".into(),
                        status: ready.into(),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
        }
    }

    fn v1_pool(ports: &[i64]) -> Value {
        json!({
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {
                "selector": {"matchLabels": {"app": "vllm"}},
                "targetPorts": ports.iter().map(|n| json!({"number": n})).collect::<Vec<_>>(),
                "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}
            }
        })
    }

    #[test]
    fn v1_and_v1alpha2_pools_are_read() {
        let v = PoolView::from_object(POOL_GROUP_V1, &v1_pool(&[8000, 8001])).unwrap();
        assert_eq!(v.target_ports, [8000, 8001]);
        assert_eq!(v.label_selector(), "app=vllm");
        let old = json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"selector": {"app": "vllm", "tier": "a"}, "targetPortNumber": 8000,
                     "extensionRef": {"name": "epp"}}
        });
        let v = PoolView::from_object(X_K8S_GROUP, &old).unwrap();
        assert_eq!(v.target_ports, [8000]);
        assert_eq!(v.label_selector(), "app=vllm,tier=a");
    }

    #[test]
    fn malformed_pools_name_the_field() {
        let cases = [
            (
                json!({"metadata": {"name": "p", "namespace": "ns"}}),
                "spec: missing",
            ),
            (
                json!({"metadata": {"name": "p"}, "spec": {"targetPorts": [{"number": 1}]}}),
                "spec.selector.matchLabels: missing",
            ),
            (v1_pool(&[]), "0 ports"),
            (v1_pool(&[1, 2, 3, 4, 5, 6, 7, 8, 9]), "9 ports"),
            (v1_pool(&[8000, 8000]), "listed twice"),
            (v1_pool(&[0]), "not a port"),
            (v1_pool(&[70000]), "not a port"),
            (
                json!({"metadata": {"name": "p"}, "spec": {"selector": {"matchLabels": {"a": 1}},
                        "targetPorts": [{"number": 1}]}}),
                "spec.selector.matchLabels.a: expected a string",
            ),
            (
                json!({"metadata": {"name": "p"}, "spec": {"selector": {"matchLabels": {}},
                        "targetPorts": [{"number": 1}]}}),
                "selector is empty",
            ),
            (
                json!({"metadata": {"name": "p"}, "spec": {"selector": {"matchLabels": {"a": "b"}},
                        "targetPorts": [{"port": 1}]}}),
                "spec.targetPorts[0].number: missing",
            ),
        ];
        for (obj, needle) in cases {
            let e = PoolView::from_object(POOL_GROUP_V1, &obj)
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{obj}: {e}");
            assert!(e.starts_with("InferencePool "), "{e}");
        }
        let e = PoolView::from_object(
            X_K8S_GROUP,
            &json!({"metadata": {"name": "p"}, "spec": {"selector": {"a": "b"}}}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("targetPortNumber: missing"), "{e}");
    }

    #[test]
    fn one_endpoint_per_target_port_with_rank_names_and_labels() {
        let pool = PoolView {
            selector: [("app".to_string(), "vllm".to_string())].into(),
            target_ports: vec![8000, 8001],
        };
        let p = pod(
            "vllm-0",
            "10.0.0.5",
            "True",
            &[("app", "vllm"), ("llm-d.ai/role", "decode")],
        );
        let eps = pod_endpoints(&p, &pool).unwrap();
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].name, "vllm-0-rank-0");
        assert_eq!(eps[0].socket_addr().to_string(), "10.0.0.5:8000");
        assert_eq!(eps[1].name, "vllm-0-rank-1");
        assert_eq!(eps[1].port, 8001);
        assert_eq!(eps[1].labels.get("llm-d.ai/role").unwrap(), "decode");
        assert_eq!(eps[1].labels.len(), 2);
    }

    #[test]
    fn only_ready_selected_live_pods_with_an_ip_are_endpoints() {
        let pool = PoolView {
            selector: [("app".to_string(), "vllm".to_string())].into(),
            target_ports: vec![8000],
        };
        let sel = [("app", "vllm")];
        assert_eq!(
            pod_endpoints(&pod("a", "10.0.0.1", "False", &sel), &pool),
            Err(Skip::NotReady)
        );
        assert_eq!(
            pod_endpoints(&pod("a", "10.0.0.1", "Unknown", &sel), &pool),
            Err(Skip::NotReady)
        );
        assert_eq!(
            pod_endpoints(&pod("a", "10.0.0.1", "True", &[("app", "other")]), &pool),
            Err(Skip::NotSelected)
        );
        let mut deleting = pod("a", "10.0.0.1", "True", &sel);
        deleting.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_eq!(pod_endpoints(&deleting, &pool), Err(Skip::NotReady));
        let mut no_conditions = pod("a", "10.0.0.1", "True", &sel);
        no_conditions.status.as_mut().unwrap().conditions = None;
        assert_eq!(pod_endpoints(&no_conditions, &pool), Err(Skip::NotReady));
        assert!(matches!(
            pod_endpoints(&pod("a", "", "True", &sel), &pool),
            Err(Skip::BadAddress(m)) if m.contains("no status.podIP")
        ));
        assert!(matches!(
            pod_endpoints(&pod("a", "not-an-ip", "True", &sel), &pool),
            Err(Skip::BadAddress(m)) if m.contains("not-an-ip")
        ));
        assert_eq!(
            pod_endpoints(&pod("a", "fd00::1", "True", &sel), &pool).unwrap()[0]
                .socket_addr()
                .to_string(),
            "[fd00::1]:8000"
        );
    }

    #[test]
    fn metrics_port_only_with_a_single_target_port() {
        let one = PoolView {
            selector: BTreeMap::new(),
            target_ports: vec![8000],
        };
        let two = PoolView {
            target_ports: vec![8000, 8001],
            ..one.clone()
        };
        assert_eq!(metrics_port(&one, 9100), Some(9100));
        assert_eq!(metrics_port(&one, 0), None);
        assert_eq!(metrics_port(&two, 9100), None);
    }

    #[test]
    fn duplicate_addresses_keep_the_first_pod() {
        let pool = PoolView {
            selector: [("app".to_string(), "x".to_string())].into(),
            target_ports: vec![8000],
        };
        let a = pod_endpoints(&pod("a", "10.0.0.1", "True", &[("app", "x")]), &pool).unwrap();
        let b = pod_endpoints(&pod("b", "10.0.0.1", "True", &[("app", "x")]), &pool).unwrap();
        let (eps, dropped) = pool_endpoints([&a, &b]);
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].name, "a-rank-0");
        assert_eq!(dropped, ["b-rank-0"]);
    }
}
