//! Builders for the objects tests create most: pods (with IP and Ready condition),
//! InferencePools in both shapes, InferenceObjectives and Leases.

use serde_json::{Value, json};

use crate::store::now_rfc3339;

/// A pod in `ns` with `labels`, `status.podIP` = `ip` and a `Ready` condition.
/// Create it with [`crate::TestApiServer::create`] (status kept) — through the API a create
/// drops the status, as the real server does.
pub fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ip: &str, ready: bool) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let mut p = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "nodeName": "kubetest-node",
            "containers": [{"name": "vllm", "image": "vllm/vllm-openai:latest"}]
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "127.0.0.1",
            "conditions": []
        }
    });
    set_ready_condition(&mut p, ready);
    p
}

/// Sets `Ready` and `ContainersReady` to `ready` in `status.conditions`, keeping the others.
pub fn set_ready_condition(pod: &mut Value, ready: bool) {
    let status = if ready { "True" } else { "False" };
    let now = now_rfc3339();
    if !pod.get("status").is_some_and(Value::is_object) {
        pod["status"] = json!({});
    }
    let mut conds: Vec<Value> = pod
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    conds.retain(|c| {
        !matches!(
            c.get("type").and_then(Value::as_str),
            Some("Ready" | "ContainersReady")
        )
    });
    for t in ["ContainersReady", "Ready"] {
        conds.push(
            json!({"type": t, "status": status, "lastProbeTime": null, "lastTransitionTime": now}),
        );
    }
    pod["status"]["conditions"] = Value::Array(conds);
}

fn match_labels(labels: &[(&str, &str)]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect(),
    )
}

/// An `inference.networking.k8s.io/v1` InferencePool selecting `labels` on `target_ports`,
/// with its endpoint picker Service `<name>-epp:9002`.
pub fn inference_pool_v1(
    ns: &str,
    name: &str,
    labels: &[(&str, &str)],
    target_ports: &[u16],
) -> Value {
    let ports: Vec<Value> = target_ports.iter().map(|p| json!({"number": p})).collect();
    json!({
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": {"matchLabels": match_labels(labels)},
            "targetPorts": ports,
            "endpointPickerRef": {"group": "", "kind": "Service", "name": format!("{name}-epp"), "port": {"number": 9002}, "failureMode": "FailClose"}
        }
    })
}

/// An `inference.networking.x-k8s.io/v1alpha2` InferencePool (flat `selector`,
/// `targetPortNumber`, `extensionRef`).
pub fn inference_pool_v1alpha2(
    ns: &str,
    name: &str,
    labels: &[(&str, &str)],
    target_port: u16,
) -> Value {
    json!({
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": match_labels(labels),
            "targetPortNumber": target_port,
            "extensionRef": {"name": format!("{name}-epp"), "portNumber": 9002, "failureMode": "FailClose"}
        }
    })
}

/// An InferenceObjective (`group`: `inference.networking.x-k8s.io` or `llm-d.ai`) with
/// `priority`, referring to `pool` in the v1 group.
pub fn inference_objective(group: &str, ns: &str, name: &str, priority: i64, pool: &str) -> Value {
    json!({
        "apiVersion": format!("{group}/v1alpha2"),
        "kind": "InferenceObjective",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "priority": priority,
            "poolRef": {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": pool}
        }
    })
}

/// A `coordination.k8s.io/v1` Lease held by `holder` for `duration_secs`.
pub fn lease(ns: &str, name: &str, holder: &str, duration_secs: i64) -> Value {
    let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration_secs,
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": 0
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_condition_is_replaced_not_duplicated() {
        let mut p = pod("ns", "p", &[("app", "x")], "127.0.0.2", true);
        set_ready_condition(&mut p, false);
        let conds = p["status"]["conditions"].as_array().unwrap();
        assert_eq!(conds.len(), 2);
        assert!(conds.iter().all(|c| c["status"] == "False"));
        assert_eq!(p["status"]["podIP"], "127.0.0.2");
    }
}
