//! Kubernetes discovery: watches that feed the data layer's [`EndpointStore`] and
//! [`ObjectivesStore`] (the same stores `--endpoints-file` and `--objectives-file` fill).
//!
//! * **Pool** (`--pool-name`): the `InferencePool` is watched with a field selector on its
//!   name. Found ⇒ its pods are watched with its `matchLabels` as the label selector; a
//!   selector change restarts the pod watch (a re-list); a target-port change rebuilds the
//!   endpoints. Missing or deleted ⇒ no endpoints and not ready
//!   ([`EndpointStore::set_unsynced`]).
//! * **Selector** (`--endpoint-selector`): the pods alone, with the flags' selector and ports.
//! * **Objectives**: `InferenceObjective` and `InferenceModelRewrite` in the namespace, from the
//!   `llm-d.ai` group when its CRD is installed, else `inference.networking.x-k8s.io`, else
//!   none; API discovery is repeated every [`DiscoveryConfig::crd_check_interval`], so a CRD
//!   installed later is picked up.
//!
//! The store is synced (ready) once the pool is known and the first complete pod list is in.
//! Watches re-list after 410 Gone, a dropped connection or an API-server restart (kube-rs's
//! watcher), with a capped exponential backoff between failed attempts. Nothing here blocks
//! scheduling: while the API server is unreachable the store keeps the last known endpoints;
//! a re-list replaces them only once complete. Every failure is logged (at `warn` when the
//! kind of failure changes, at `debug` while it repeats) and counted in
//! `llmsched_kube_watch_errors_total{resource,reason}`.

use std::collections::BTreeMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, utils::Backoff};
use kube::{Client, Config};
use llmsched_core::endpoint::{EndpointMeta, EndpointSource};
use llmsched_datalayer::{EndpointStore, MetricsPort, ObjectivesStore};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::crd::X_K8S_GROUP;
use crate::metrics::{ErrorReason, KubeMetrics};
use crate::objectives::{self, Kind, PoolRef};
use crate::pool::{self, PoolView, Skip};

/// The Kubernetes client cannot be configured.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No kubeconfig and not in a cluster, or a broken kubeconfig.
    #[error(
        "no usable Kubernetes configuration (tried KUBECONFIG, ~/.kube/config and the in-cluster service account): {0}"
    )]
    Infer(String),
    /// The kubeconfig given with `--kubeconfig` is unusable.
    #[error("kubeconfig {path}: {error}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// Why.
        error: String,
    },
    /// The client cannot be built from the configuration.
    #[error("cannot build the Kubernetes client: {0}")]
    Build(String),
}

/// A client configured as users expect: `kubeconfig` when given, else env `KUBECONFIG`, else
/// `~/.kube/config`, else the in-cluster service account. Contacts nothing: an unreachable
/// API server shows up later, as watch errors.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let fail = |error: String| ClientError::Kubeconfig {
                path: path.display().to_string(),
                error,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| fail(e.to_string()))?;
            Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| fail(e.to_string()))?
        }
        None => Config::infer()
            .await
            .map_err(|e| ClientError::Infer(e.to_string()))?,
    };
    tracing::info!(server = %config.cluster_url, namespace = %config.default_namespace, "Kubernetes client configured");
    Client::try_from(config).map_err(|e| ClientError::Build(e.to_string()))
}

/// What to discover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The pods of an `InferencePool`.
    Pool {
        /// Pool name.
        name: String,
        /// Pool API group: `inference.networking.k8s.io` (v1) or
        /// `inference.networking.x-k8s.io` (v1alpha2).
        group: String,
    },
    /// Pods by label, without a pool.
    Selector(PoolView),
}

/// Discovery settings.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// Namespace of the pool, pods, objectives and rewrites.
    pub namespace: String,
    /// What to discover.
    pub source: Source,
    /// `--model-server-metrics-port` (0: unset); applied while the pool has one target port.
    pub model_server_metrics_port: u16,
    /// Watch objectives and rewrites (pool mode without `--objectives-file`).
    pub watch_objectives: bool,
    /// How often API discovery looks for the objective CRDs (30 s).
    pub crd_check_interval: Duration,
    /// First wait after a failed list or watch (200 ms); doubles per failure.
    pub backoff_initial: Duration,
    /// Longest wait between attempts (5 s).
    pub backoff_max: Duration,
    /// `timeoutSeconds` of each watch request (290 s, kube-rs's default); the watch is
    /// resumed from the last resourceVersion when it ends.
    pub watch_timeout_secs: u32,
}

impl DiscoveryConfig {
    /// Defaults for `source` in `namespace`.
    pub fn new(namespace: impl Into<String>, source: Source) -> Self {
        Self {
            namespace: namespace.into(),
            source,
            model_server_metrics_port: 0,
            watch_objectives: true,
            crd_check_interval: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            watch_timeout_secs: 290,
        }
    }
}

/// Where discovery writes.
#[derive(Debug, Clone)]
pub struct Sinks {
    /// The endpoints.
    pub store: Arc<EndpointStore>,
    /// The objectives and rewrites.
    pub objectives: Arc<ObjectivesStore>,
    /// The scraped metrics port.
    pub metrics_port: MetricsPort,
}

/// Running discovery; dropping it stops the watches.
#[derive(Debug)]
pub struct KubeDiscovery {
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl KubeDiscovery {
    /// Stops the watches and waits for them.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for KubeDiscovery {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Starts discovery in the background (see the module documentation). Returns at once;
/// the store becomes synced when the pool and its pods are known.
pub fn start(
    client: Client,
    config: DiscoveryConfig,
    sinks: Sinks,
    metrics: KubeMetrics,
    cancel: CancellationToken,
) -> KubeDiscovery {
    let cancel = cancel.child_token();
    let tasks = TaskTracker::new();
    let pool_ref = match &config.source {
        Source::Pool { name, group } => Some(PoolRef {
            name: name.clone(),
            group: group.clone(),
        }),
        Source::Selector(_) => None,
    };
    tracing::info!(namespace = %config.namespace, source = ?config.source, objectives = config.watch_objectives && pool_ref.is_some(), "Kubernetes discovery starting");
    tasks.spawn(
        EndpointsTask::new(
            client.clone(),
            config.clone(),
            sinks.clone(),
            metrics.clone(),
        )
        .run(cancel.clone()),
    );
    if let (true, Some(pool_ref)) = (config.watch_objectives, pool_ref) {
        tasks.spawn(
            ObjectivesTask::new(client, config, sinks.objectives, metrics, pool_ref)
                .run(cancel.clone()),
        );
    }
    KubeDiscovery { cancel, tasks }
}

/// Capped exponential backoff (no jitter: one client per process), reset on success.
struct CappedBackoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl CappedBackoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }
}

impl Iterator for CappedBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let cur = self.next;
        self.next = (cur * 2).min(self.max);
        Some(cur)
    }
}

impl Backoff for CappedBackoff {
    fn reset(&mut self) {
        self.next = self.initial;
    }
}

type EventStream<K> = Pin<Box<dyn Stream<Item = Result<Event<K>, watcher::Error>> + Send>>;

fn watch_stream<K>(api: Api<K>, wc: watcher::Config, cfg: &DiscoveryConfig) -> EventStream<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    kube::runtime::watcher(api, wc.timeout(cfg.watch_timeout_secs))
        .backoff(CappedBackoff::new(cfg.backoff_initial, cfg.backoff_max))
        .boxed()
}

async fn next_event<K>(s: &mut Option<EventStream<K>>) -> Option<Result<Event<K>, watcher::Error>> {
    match s {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// The reason of a client error.
fn client_reason(e: &kube::Error, established: bool) -> ErrorReason {
    match e {
        kube::Error::Api(status) => ErrorReason::from_code(status.code),
        kube::Error::SerdeError(_) => ErrorReason::Malformed,
        kube::Error::ReadEvents(_) | kube::Error::LinesCodecMaxLineLengthExceeded => {
            ErrorReason::ConnectionLost
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) => {
            if established {
                ErrorReason::ConnectionLost
            } else {
                ErrorReason::Unreachable
            }
        }
        _ => ErrorReason::Other,
    }
}

/// The reason of a watcher error.
pub fn watch_error_reason(e: &watcher::Error) -> ErrorReason {
    match e {
        watcher::Error::InitialListFailed(e) | watcher::Error::WatchStartFailed(e) => {
            client_reason(e, false)
        }
        watcher::Error::WatchFailed(e) => client_reason(e, true),
        watcher::Error::WatchError(status) => ErrorReason::from_code(status.code),
        watcher::Error::NoResourceVersion => ErrorReason::Malformed,
    }
}

fn hint(reason: ErrorReason, resource: &str, namespace: &str) -> String {
    match reason {
        ErrorReason::Forbidden => format!(
            "RBAC denies list/watch of {resource} in namespace {namespace}: grant get, list, watch on it to the EPP's service account"
        ),
        ErrorReason::Unauthorized => "the API server refuses the credentials".into(),
        ErrorReason::Unreachable => {
            "the API server is unreachable; retrying (known endpoints are kept)".into()
        }
        ErrorReason::ConnectionLost => "the watch broke off; re-watching".into(),
        ErrorReason::Expired => "resourceVersion expired (410 Gone); re-listing".into(),
        ErrorReason::NotFound => format!("{resource} is not served (is its CRD installed?)"),
        _ => "retrying".into(),
    }
}

/// Logs an error once per change of reason, counts every one.
#[derive(Debug, Default)]
struct ErrorLog {
    last: Option<ErrorReason>,
}

impl ErrorLog {
    fn report(
        &mut self,
        metrics: &KubeMetrics,
        resource: &str,
        namespace: &str,
        reason: ErrorReason,
        error: &dyn std::fmt::Display,
    ) {
        metrics.error(resource, reason);
        if self.last != Some(reason) {
            tracing::warn!(resource, namespace, reason = reason.as_str(), error = %error, "Kubernetes watch failed: {}", hint(reason, resource, namespace));
            self.last = Some(reason);
        } else {
            tracing::debug!(resource, reason = reason.as_str(), error = %error, "Kubernetes watch failed again");
        }
    }

    fn ok(&mut self, metrics: &KubeMetrics, resource: &str) {
        metrics.synced_now(resource);
        if let Some(reason) = self.last.take() {
            tracing::info!(
                resource,
                after = reason.as_str(),
                "Kubernetes watch recovered"
            );
        }
    }
}

const PODS: &str = "pods";
const POOLS: &str = "inferencepools";

fn pool_resource(group: &str) -> ApiResource {
    let version = if group == X_K8S_GROUP {
        "v1alpha2"
    } else {
        "v1"
    };
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, "InferencePool"),
        POOLS,
    )
}

/// The endpoint side: pool and pods.
struct EndpointsTask {
    client: Client,
    cfg: DiscoveryConfig,
    sinks: Sinks,
    metrics: KubeMetrics,
    /// The pool in effect (from the flags in selector mode).
    pool: Option<PoolView>,
    /// Pods of the current selector, by name (complete once `pods_listed`).
    pods: BTreeMap<String, Pod>,
    pods_listed: bool,
    pod_buffer: Option<BTreeMap<String, Pod>>,
    pool_buffer: Option<Option<DynamicObject>>,
    pods_stream: Option<EventStream<Pod>>,
    pool_errors: ErrorLog,
    pod_errors: ErrorLog,
    /// Pods giving endpoints at the last rebuild, with why others do not (for logging
    /// transitions only).
    last_state: BTreeMap<String, Result<(), Skip>>,
    pool_seen: Option<bool>,
}

impl EndpointsTask {
    fn new(client: Client, cfg: DiscoveryConfig, sinks: Sinks, metrics: KubeMetrics) -> Self {
        Self {
            client,
            cfg,
            sinks,
            metrics,
            // Set by `run` (from the flags in selector mode, from the pool otherwise).
            pool: None,
            pods: BTreeMap::new(),
            pods_listed: false,
            pod_buffer: None,
            pool_buffer: None,
            pods_stream: None,
            pool_errors: ErrorLog::default(),
            pod_errors: ErrorLog::default(),
            last_state: BTreeMap::new(),
            pool_seen: None,
        }
    }

    fn pool_name(&self) -> String {
        match &self.cfg.source {
            Source::Pool { name, .. } => format!("{}/{name}", self.cfg.namespace),
            Source::Selector(v) => format!("selector {}", v.label_selector()),
        }
    }

    async fn run(mut self, cancel: CancellationToken) {
        let mut pool_stream = self.pool_stream();
        if let Source::Selector(view) = &self.cfg.source {
            let view = view.clone();
            self.apply_pool_view(view);
        }
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                ev = next_event(&mut pool_stream) => match ev {
                    Some(Ok(ev)) => self.on_pool_event(ev),
                    Some(Err(e)) => {
                        let reason = watch_error_reason(&e);
                        let ns = self.cfg.namespace.clone();
                        self.pool_errors.report(&self.metrics, POOLS, &ns, reason, &e);
                    }
                    None => {
                        tracing::error!("InferencePool watch ended; restarting it");
                        pool_stream = self.pool_stream();
                    }
                },
                ev = next_event(&mut self.pods_stream) => match ev {
                    Some(Ok(ev)) => self.on_pod_event(ev),
                    Some(Err(e)) => {
                        let reason = watch_error_reason(&e);
                        let ns = self.cfg.namespace.clone();
                        self.pod_errors.report(&self.metrics, PODS, &ns, reason, &e);
                    }
                    None => {
                        tracing::error!("pod watch ended; restarting it");
                        if let Some(view) = self.pool.clone() {
                            self.start_pod_watch(&view);
                        }
                    }
                },
            }
        }
    }

    /// The pool watch (none in selector mode).
    fn pool_stream(&self) -> Option<EventStream<DynamicObject>> {
        let Source::Pool { name, group } = &self.cfg.source else {
            return None;
        };
        let ar = pool_resource(group);
        let api =
            Api::<DynamicObject>::namespaced_with(self.client.clone(), &self.cfg.namespace, &ar);
        let wc = watcher::Config::default().fields(&format!("metadata.name={name}"));
        Some(watch_stream(api, wc, &self.cfg))
    }

    fn on_pool_event(&mut self, ev: Event<DynamicObject>) {
        // `Init` comes before the list is attempted: not a sign of recovery.
        if !matches!(ev, Event::Init) {
            self.pool_errors.ok(&self.metrics, POOLS);
        }
        match ev {
            Event::Init => self.pool_buffer = Some(None),
            Event::InitApply(obj) => {
                if let Some(buf) = &mut self.pool_buffer {
                    *buf = Some(obj);
                }
            }
            Event::InitDone => {
                let obj = self.pool_buffer.take().flatten();
                self.apply_pool(obj);
            }
            Event::Apply(obj) => self.apply_pool(Some(obj)),
            Event::Delete(_) => self.apply_pool(None),
        }
    }

    fn apply_pool(&mut self, obj: Option<DynamicObject>) {
        let Source::Pool { group, .. } = &self.cfg.source else {
            return;
        };
        let Some(obj) = obj else {
            if self.pool_seen != Some(false) {
                tracing::warn!(pool = %self.pool_name(), group = %group, "InferencePool not found (missing or deleted): no endpoints, not ready");
            }
            self.pool_seen = Some(false);
            self.metrics.set_objects(POOLS, 0);
            self.pool = None;
            self.pods.clear();
            self.pods_listed = false;
            self.pod_buffer = None;
            self.pods_stream = None;
            self.metrics.set_objects(PODS, 0);
            self.publish(Vec::new());
            self.sinks.store.set_unsynced();
            self.metrics.pool_synced.set(0);
            return;
        };
        self.pool_seen = Some(true);
        self.metrics.set_objects(POOLS, 1);
        let value = match serde_json::to_value(&obj) {
            Ok(v) => v,
            Err(e) => {
                self.metrics.error(POOLS, ErrorReason::Malformed);
                tracing::error!(pool = %self.pool_name(), error = %e, "InferencePool cannot be read; keeping the last known endpoints");
                return;
            }
        };
        match PoolView::from_object(group, &value) {
            Ok(view) => self.apply_pool_view(view),
            Err(e) => {
                self.metrics.error(POOLS, ErrorReason::Malformed);
                tracing::error!(error = %e, "InferencePool is malformed; keeping the last known endpoints until it is fixed");
            }
        }
    }

    fn apply_pool_view(&mut self, view: PoolView) {
        let old = self.pool.replace(view.clone());
        self.sinks.metrics_port.set(pool::metrics_port(
            &view,
            self.cfg.model_server_metrics_port,
        ));
        match old {
            Some(old) if old == view => {}
            Some(old) if old.selector == view.selector => {
                tracing::info!(pool = %self.pool_name(), target_ports = ?view.target_ports, "InferencePool target ports changed; rebuilding endpoints");
                self.rebuild();
            }
            _ => {
                tracing::info!(pool = %self.pool_name(), selector = %view.label_selector(), target_ports = ?view.target_ports, "InferencePool selector set; listing pods");
                self.start_pod_watch(&view);
            }
        }
    }

    /// (Re)starts the pod watch for `view`'s selector. The current endpoints stay until the
    /// new list is complete.
    fn start_pod_watch(&mut self, view: &PoolView) {
        let api = Api::<Pod>::namespaced(self.client.clone(), &self.cfg.namespace);
        let wc = watcher::Config::default().labels(&view.label_selector());
        self.pods_listed = false;
        self.pod_buffer = None;
        self.pods_stream = Some(watch_stream(api, wc, &self.cfg));
    }

    fn on_pod_event(&mut self, ev: Event<Pod>) {
        // `Init` comes before the list is attempted: not a sign of recovery.
        if !matches!(ev, Event::Init) {
            self.pod_errors.ok(&self.metrics, PODS);
        }
        match ev {
            Event::Init => self.pod_buffer = Some(BTreeMap::new()),
            Event::InitApply(p) => {
                if let (Some(buf), Some(name)) = (&mut self.pod_buffer, p.metadata.name.clone()) {
                    buf.insert(name, p);
                }
            }
            Event::InitDone => {
                self.pods = self.pod_buffer.take().unwrap_or_default();
                let first = !self.pods_listed;
                self.pods_listed = true;
                if first {
                    tracing::info!(pool = %self.pool_name(), pods = self.pods.len(), "pods listed");
                }
                self.rebuild();
            }
            Event::Apply(p) => {
                if let Some(name) = p.metadata.name.clone() {
                    self.pods.insert(name, p);
                    self.rebuild();
                }
            }
            Event::Delete(p) => {
                if let Some(name) = &p.metadata.name
                    && self.pods.remove(name).is_some()
                {
                    self.rebuild();
                }
            }
        }
    }

    /// Recomputes the endpoints from the pods and the pool and publishes them; marks the
    /// store synced once the pool is known and the pods listed.
    fn rebuild(&mut self) {
        let Some(view) = self.pool.clone() else {
            return;
        };
        if !self.pods_listed {
            return;
        }
        let mut per_pod: Vec<Vec<EndpointMeta>> = Vec::with_capacity(self.pods.len());
        let mut state: BTreeMap<String, Result<(), Skip>> = BTreeMap::new();
        for (name, p) in &self.pods {
            match pool::pod_endpoints(p, &view) {
                Ok(eps) => {
                    per_pod.push(eps);
                    state.insert(name.clone(), Ok(()));
                }
                Err(skip) => {
                    if let Skip::BadAddress(why) = &skip
                        && self.last_state.get(name) != Some(&Err(skip.clone()))
                    {
                        self.metrics.error(PODS, ErrorReason::Malformed);
                        tracing::warn!(pod = %name, reason = %why, "pod is ready but unusable; skipped");
                    }
                    state.insert(name.clone(), Err(skip));
                }
            }
        }
        for (name, s) in &state {
            let before = self.last_state.get(name);
            match (before.map(Result::is_ok), s.is_ok()) {
                (Some(true), true) | (Some(false) | None, false) => {}
                (_, true) => tracing::info!(pod = %name, "pod ready: added"),
                (Some(true), false) => {
                    tracing::info!(pod = %name, why = ?s, "pod not ready: removed")
                }
            }
        }
        for name in self.last_state.keys() {
            if !state.contains_key(name) && self.last_state.get(name).is_some_and(Result::is_ok) {
                tracing::info!(pod = %name, "pod gone: removed");
            }
        }
        self.last_state = state;
        self.metrics.set_objects(PODS, self.pods.len());
        let (eps, dropped) = pool::pool_endpoints(per_pod.iter());
        if !dropped.is_empty() {
            self.metrics.error(PODS, ErrorReason::Malformed);
            tracing::warn!(endpoints = ?dropped, "endpoints share an address with another pod's; skipped");
        }
        self.publish(eps);
        if !self.sinks.store.is_synced() {
            tracing::info!(pool = %self.pool_name(), endpoints = self.sinks.store.snapshot().len(), "pool synced: ready");
        }
        self.sinks.store.set_synced();
        self.metrics.pool_synced.set(1);
    }

    fn publish(&self, eps: Vec<EndpointMeta>) {
        match self.sinks.store.update(eps) {
            Ok(change) if !change.is_empty() => tracing::debug!(
                added = change.added.len(),
                removed = change.removed.len(),
                endpoints = self.sinks.store.snapshot().len(),
                "endpoints updated"
            ),
            Ok(_) => {}
            Err(e) => {
                self.metrics.error(PODS, ErrorReason::Malformed);
                tracing::error!(error = %e, "endpoints refused by the store; keeping the last known ones");
            }
        }
    }
}

/// Objectives and rewrites.
struct ObjectivesTask {
    client: Client,
    cfg: DiscoveryConfig,
    store: Arc<ObjectivesStore>,
    metrics: KubeMetrics,
    pool: PoolRef,
    /// Per kind: the group watched, its stream, its objects (by name) and the init buffer.
    kinds: [KindWatch; 2],
    discovery_errors: ErrorLog,
    last_rejected: Vec<objectives::Rejected>,
}

#[derive(Default)]
struct KindWatch {
    group: Option<&'static str>,
    stream: Option<EventStream<DynamicObject>>,
    objects: BTreeMap<String, Value>,
    buffer: Option<BTreeMap<String, Value>>,
    listed: bool,
    errors: ErrorLog,
}

/// Whether `group/VERSION` serves `plural`: `Ok(false)` when the group version is not
/// served (404).
async fn serves(client: &Client, group: &str, plural: &str) -> Result<bool, kube::Error> {
    match client
        .list_api_group_resources(&format!("{group}/{}", objectives::VERSION))
        .await
    {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == plural)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

impl ObjectivesTask {
    fn new(
        client: Client,
        cfg: DiscoveryConfig,
        store: Arc<ObjectivesStore>,
        metrics: KubeMetrics,
        pool: PoolRef,
    ) -> Self {
        Self {
            client,
            cfg,
            store,
            metrics,
            pool,
            kinds: Default::default(),
            discovery_errors: ErrorLog::default(),
            last_rejected: Vec::new(),
        }
    }

    async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.cfg.crd_check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (k0, k1) = self.kinds.split_at_mut(1);
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                _ = tick.tick() => self.check_crds().await,
                ev = next_event(&mut k0[0].stream) => self.on_event(0, ev),
                ev = next_event(&mut k1[0].stream) => self.on_event(1, ev),
            }
        }
    }

    /// API discovery: picks the group per kind (`llm-d.ai` first) and (re)starts watches.
    async fn check_crds(&mut self) {
        for (ki, kind) in Kind::ALL.iter().enumerate() {
            let mut chosen = None;
            for group in objectives::GROUPS {
                match serves(&self.client, group, kind.plural()).await {
                    Ok(true) => {
                        chosen = Some(group);
                        break;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        let reason = client_reason(&e, false);
                        let ns = self.cfg.namespace.clone();
                        self.discovery_errors
                            .report(&self.metrics, "discovery", &ns, reason, &e);
                        // Unknown: keep whatever is watched now.
                        return;
                    }
                }
            }
            self.discovery_errors.ok(&self.metrics, "discovery");
            if chosen == self.kinds[ki].group {
                continue;
            }
            let w = &mut self.kinds[ki];
            match chosen {
                Some(group) => {
                    tracing::info!(kind = kind.kind(), group, namespace = %self.cfg.namespace, "watching {} in group {group}", kind.plural());
                    let ar = ApiResource::from_gvk_with_plural(
                        &GroupVersionKind::gvk(group, objectives::VERSION, kind.kind()),
                        kind.plural(),
                    );
                    let api = Api::<DynamicObject>::namespaced_with(
                        self.client.clone(),
                        &self.cfg.namespace,
                        &ar,
                    );
                    w.stream = Some(watch_stream(api, watcher::Config::default(), &self.cfg));
                }
                None => {
                    tracing::info!(
                        kind = kind.kind(),
                        "no {} CRD is installed (groups {}); none apply until one is",
                        kind.kind(),
                        objectives::GROUPS.join(", ")
                    );
                    w.stream = None;
                }
            }
            w.group = chosen;
            w.objects.clear();
            w.buffer = None;
            w.listed = false;
            if chosen.is_none() {
                self.apply();
            }
        }
    }

    fn on_event(&mut self, ki: usize, ev: Option<Result<Event<DynamicObject>, watcher::Error>>) {
        let resource = Kind::ALL[ki].plural();
        let w = &mut self.kinds[ki];
        let ev = match ev {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => {
                let reason = watch_error_reason(&e);
                w.errors
                    .report(&self.metrics, resource, &self.cfg.namespace, reason, &e);
                return;
            }
            None => {
                w.stream = None;
                w.group = None; // picked up again by the next discovery check
                return;
            }
        };
        if !matches!(ev, Event::Init) {
            w.errors.ok(&self.metrics, resource);
        }
        let to_value = |o: DynamicObject| -> Option<(String, Value)> {
            let name = o.metadata.name.clone()?;
            serde_json::to_value(&o).ok().map(|v| (name, v))
        };
        match ev {
            Event::Init => w.buffer = Some(BTreeMap::new()),
            Event::InitApply(o) => {
                if let (Some(buf), Some((n, v))) = (&mut w.buffer, to_value(o)) {
                    buf.insert(n, v);
                }
            }
            Event::InitDone => {
                w.objects = w.buffer.take().unwrap_or_default();
                w.listed = true;
                self.apply();
            }
            Event::Apply(o) => {
                if let Some((n, v)) = to_value(o) {
                    w.objects.insert(n, v);
                    if w.listed {
                        self.apply();
                    }
                }
            }
            Event::Delete(o) => {
                if let Some(n) = &o.metadata.name
                    && w.objects.remove(n).is_some()
                    && w.listed
                {
                    self.apply();
                }
            }
        }
    }

    fn apply(&mut self) {
        let lists: Vec<Vec<(String, Value)>> = self
            .kinds
            .iter()
            .map(|w| match w.group {
                Some(g) => w
                    .objects
                    .values()
                    .map(|v| (g.to_string(), v.clone()))
                    .collect(),
                None => Vec::new(),
            })
            .collect();
        let built = objectives::build([&lists[0], &lists[1]], &self.pool);
        for r in &built.rejected {
            if !self.last_rejected.contains(r) {
                let resource = if r.object.starts_with("InferenceObjective/") {
                    Kind::Objective.plural()
                } else {
                    Kind::Rewrite.plural()
                };
                self.metrics.error(resource, ErrorReason::Malformed);
                tracing::error!(object = %r.object, error = %r.error, "malformed object skipped; the others apply");
            }
        }
        self.last_rejected = built.rejected.clone();
        self.metrics
            .set_objects(Kind::Objective.plural(), built.applied[0]);
        self.metrics
            .set_objects(Kind::Rewrite.plural(), built.applied[1]);
        if *self.store.load() != built.objectives {
            tracing::info!(
                objectives = built.objectives.objective_count(),
                rewrites = built.objectives.rewrite_count(),
                other_pools = built.other_pool,
                "objectives updated from the cluster"
            );
            self.store.replace(built.objectives);
        }
    }
}
