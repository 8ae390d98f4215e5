//! Peer discovery of active-active EPP replicas (`--ha-mode=active-active` without
//! `--ha-peers`): the other pods of this EPP's own Deployment.
//!
//! This replica reads its own pod (env `POD_NAME` in env `NAMESPACE`, from the downward API
//! as the chart sets them), takes its labels as the selector — minus the labels that differ
//! per revision or per pod (`pod-template-hash`, `controller-revision-hash`,
//! `statefulset.kubernetes.io/pod-name`, `apps.kubernetes.io/pod-index`), so that during a
//! rolling update the old and the new ReplicaSet's pods sync with each other — and watches
//! the pods matching it. Every such pod with a pod IP that is not being deleted, other than
//! this one, is a peer at `podIP:port`. Pods that are not ready yet are peers too: a
//! starting replica must receive its peers' updates while it bootstraps.
//!
//! Nothing here blocks: while the own pod cannot be read (API server unreachable, RBAC
//! denial) the peer list stays empty, the failure is logged with a hint and counted in
//! `llmsched_kube_watch_errors_total{resource="pods"}`, and the read is retried with a
//! capped backoff; the watch re-lists as discovery's watches do.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::{ErrorReason, KubeMetrics};

/// Labels that differ between the pods of one Deployment (or StatefulSet) and are left out
/// of the peer selector.
pub const PER_POD_LABELS: [&str; 4] = [
    "pod-template-hash",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
];

/// Where to look for peers.
#[derive(Debug, Clone)]
pub struct PeerDiscoveryConfig {
    /// This replica's namespace.
    pub namespace: String,
    /// This replica's pod name.
    pub pod_name: String,
    /// The peers' sync port (`--ha-port`; all replicas use the same).
    pub port: u16,
    /// First retry after a failure (doubles up to 30 s).
    pub backoff_initial: Duration,
}

impl PeerDiscoveryConfig {
    /// Defaults for `pod_name` in `namespace`.
    pub fn new(namespace: impl Into<String>, pod_name: impl Into<String>, port: u16) -> Self {
        Self {
            namespace: namespace.into(),
            pod_name: pod_name.into(),
            port,
            backoff_initial: Duration::from_millis(500),
        }
    }
}

/// The label selector of the peers of a pod with `labels` (`k=v,...`, sorted), or `None`
/// when nothing is left once the per-pod labels are removed.
pub fn peer_selector(labels: &BTreeMap<String, String>) -> Option<String> {
    let parts: Vec<String> = labels
        .iter()
        .filter(|(k, _)| !PER_POD_LABELS.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

/// `podIP:port` of a pod that can be a peer (has an IP, is not being deleted), or `None`.
fn peer_addr(pod: &Pod, port: u16) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let ip = pod
        .status
        .as_ref()?
        .pod_ip
        .as_deref()
        .filter(|s| !s.is_empty())?;
    Some(if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    })
}

/// Starts the peer watch; `on_change` gets the sorted peer addresses each time they change
/// (first once the initial list is complete). Stops when `cancel` is cancelled.
pub fn start(
    client: Client,
    config: PeerDiscoveryConfig,
    metrics: KubeMetrics,
    on_change: Arc<dyn Fn(Vec<String>) + Send + Sync>,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = run(client, config, metrics, on_change) => {}
        }
    })
}

async fn run(
    client: Client,
    cfg: PeerDiscoveryConfig,
    metrics: KubeMetrics,
    on_change: Arc<dyn Fn(Vec<String>) + Send + Sync>,
) {
    let api: Api<Pod> = Api::namespaced(client, &cfg.namespace);
    // 1. This pod's labels.
    let mut backoff = cfg.backoff_initial;
    let mut last_reason: Option<ErrorReason> = None;
    let selector = loop {
        match api.get(&cfg.pod_name).await {
            Ok(pod) => {
                let labels = pod.metadata.labels.clone().unwrap_or_default();
                match peer_selector(&labels) {
                    Some(s) => break s,
                    None => {
                        tracing::warn!(pod = %cfg.pod_name, namespace = %cfg.namespace, "ha: this EPP's pod has no labels to find its peers by; running without peers (set --ha-peers or label the pods)");
                        return;
                    }
                }
            }
            Err(e) => {
                let reason = get_error_reason(&e);
                metrics.error("pods", reason);
                let hint = match reason {
                    ErrorReason::Forbidden => format!(
                        "RBAC denies get on pods in namespace {}: grant get, list, watch on pods to the EPP's service account",
                        cfg.namespace
                    ),
                    ErrorReason::NotFound => format!(
                        "no pod {} in namespace {}: env POD_NAME and NAMESPACE must name this EPP's pod (the chart sets them from the downward API)",
                        cfg.pod_name, cfg.namespace
                    ),
                    _ => "retrying".to_string(),
                };
                if last_reason != Some(reason) {
                    tracing::warn!(pod = %cfg.pod_name, namespace = %cfg.namespace, reason = reason.as_str(), error = %e, "ha: cannot read this EPP's own pod to find its peers: {hint}");
                    last_reason = Some(reason);
                } else {
                    tracing::debug!(error = %e, "ha: own pod still unreadable");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    };
    tracing::info!(selector = %selector, namespace = %cfg.namespace, port = cfg.port, "ha: finding peers among the pods of this EPP's Deployment");

    // 2. The pods it selects.
    let mut stream = watcher::watcher(api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .boxed();
    let mut pods: BTreeMap<String, String> = BTreeMap::new();
    let mut buffer: Option<BTreeMap<String, String>> = None;
    let mut last_sent: Option<Vec<String>> = None;
    let mut last_reason: Option<ErrorReason> = None;
    while let Some(ev) = stream.next().await {
        let changed = match ev {
            Err(e) => {
                let reason = crate::discovery::watch_error_reason(&e);
                metrics.error("pods", reason);
                if last_reason != Some(reason) {
                    tracing::warn!(reason = reason.as_str(), error = %e, "ha: peer pod watch failed; keeping the last known peers and retrying");
                    last_reason = Some(reason);
                }
                false
            }
            Ok(ev) => {
                last_reason = None;
                match ev {
                    Event::Init => {
                        buffer = Some(BTreeMap::new());
                        false
                    }
                    Event::InitApply(p) => {
                        if let (Some(b), Some(name)) = (buffer.as_mut(), p.metadata.name.clone())
                            && let Some(a) = peer_addr(&p, cfg.port)
                        {
                            b.insert(name, a);
                        }
                        false
                    }
                    Event::InitDone => {
                        pods = buffer.take().unwrap_or_default();
                        true
                    }
                    Event::Apply(p) => {
                        if let Some(name) = p.metadata.name.clone() {
                            match peer_addr(&p, cfg.port) {
                                Some(a) => pods.insert(name, a),
                                None => pods.remove(&name),
                            };
                        }
                        true
                    }
                    Event::Delete(p) => {
                        if let Some(name) = &p.metadata.name {
                            pods.remove(name);
                        }
                        true
                    }
                }
            }
        };
        if !changed {
            continue;
        }
        let mut peers: Vec<String> = pods
            .iter()
            .filter(|(name, _)| **name != cfg.pod_name)
            .map(|(_, a)| a.clone())
            .collect();
        peers.sort();
        peers.dedup();
        if last_sent.as_ref() != Some(&peers) {
            tracing::info!(peers = ?peers, "ha: peer replicas");
            on_change(peers.clone());
            last_sent = Some(peers);
        }
    }
}

fn get_error_reason(e: &kube::Error) -> ErrorReason {
    match e {
        kube::Error::Api(status) => ErrorReason::from_code(status.code),
        kube::Error::SerdeError(_) => ErrorReason::Malformed,
        kube::Error::HyperError(_) | kube::Error::Service(_) => ErrorReason::Unreachable,
        _ => ErrorReason::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_selector_drops_per_pod_labels() {
        let labels: BTreeMap<String, String> = [
            ("app", "epp"),
            ("pod-template-hash", "5d8f"),
            ("llm-d.ai/role", "epp"),
            ("controller-revision-hash", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            peer_selector(&labels).as_deref(),
            Some("app=epp,llm-d.ai/role=epp")
        );
        let only_hash: BTreeMap<String, String> =
            [("pod-template-hash".to_string(), "1".to_string())].into();
        assert_eq!(peer_selector(&only_hash), None);
        assert_eq!(peer_selector(&BTreeMap::new()), None);
    }
}
