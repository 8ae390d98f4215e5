//! # llmsched-datalayer
//!
//! What the EPP knows about its model servers, kept current in the background:
//!
//! * [`store`] — [`EndpointStore`], the pool membership as lock-free `EndpointSet`
//!   snapshots (implements `llmsched_core::EndpointSource`), with listener notifications and
//!   a `watch` for tasks that manage per-endpoint work;
//! * [`discovery`] — endpoints without Kubernetes: `--endpoints` and `--endpoints-file`;
//! * [`objectives`] — [`ObjectivesStore`], `InferenceObjective`/`InferenceModelRewrite`
//!   manifests from `--objectives-file`;
//! * [`scraper`] — one task per endpoint polling its Prometheus `/metrics`;
//! * [`mapping`] — metric names per engine (vLLM, SGLang, TensorRT-LLM, Triton) and the
//!   deprecated override flags;
//! * [`prom`] — a strict, allocation-light exposition-format parser;
//! * [`metrics`] — scrape-health counters and the pool aggregates;
//! * [`health`] — the endpoints' health as Prometheus metrics ([`HealthCollector`]).
//!
//! [`start`] wires it all from a [`DataLayerConfig`] the flag layer fills in:
//!
//! | flag | field |
//! |---|---|
//! | `--refresh-metrics-interval` (50ms) | [`DataLayerConfig::refresh_interval`] |
//! | `--metrics-staleness-threshold` (2s) | [`DataLayerConfig::staleness_threshold`] |
//! | `--endpoints` | [`DataLayerConfig::static_endpoints`] via [`discovery::parse_endpoints_flag`] |
//! | `--endpoints-file` | [`DataLayerConfig::endpoints_file`] |
//! | `--endpoint-target-ports` | [`DataLayerConfig::target_ports`] |
//! | `--objectives-file` | [`DataLayerConfig::objectives_file`] |
//! | `--model-server-metrics-scheme` | [`DataLayerConfig::metrics_scheme`] |
//! | `--model-server-metrics-https-insecure-skip-verify` | [`DataLayerConfig::tls`] |
//! | `--model-server-metrics-path` | [`DataLayerConfig::metrics_path`] |
//! | `--model-server-metrics-port` | [`DataLayerConfig::metrics_port`] |
//! | `--total-queued-requests-metric`, `--total-running-requests-metric`, `--kv-cache-usage-percentage-metric`, `--lora-info-metric`, `--cache-info-metric` | [`DataLayerConfig::metric_overrides`] |
//!
//! The configuration file's `metrics-data-source` and `core-metrics-extractor` parameters
//! land in the same fields (the EPP resolves them; see `llmsched-epp`), plus
//! [`DataLayerConfig::engine_configs`] for `engineConfigs`.

pub mod discovery;
pub mod health;
pub mod mapping;
pub mod metrics;
pub mod objectives;
pub mod prom;
pub mod scraper;
pub mod store;
pub mod tls;
mod watch;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmsched_core::endpoint::{EndpointMeta, EndpointSource, label};
use llmsched_core::objectives::{Objectives, parse_manifests};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use discovery::{DiscoveryError, parse_endpoints_file, parse_endpoints_flag};
pub use health::HealthCollector;
pub use mapping::{EngineMapping, MetricMappings, MetricOverrides, MetricSpec};
pub use metrics::{DataLayerMetrics, PoolStats, pool_stats, register_metrics};
pub use objectives::ObjectivesStore;
pub use scraper::{MetricsPort, ScrapeSettings};
pub use store::{EndpointStore, MembershipChange, StoreError};
pub use tls::{MetricsScheme, ScrapeTls, ScrapeTlsError};

/// Everything the data layer needs; [`Default`] gives the reference's defaults.
#[derive(Debug, Clone)]
pub struct DataLayerConfig {
    /// Time between scrapes of one endpoint (`--refresh-metrics-interval`, 50ms).
    pub refresh_interval: Duration,
    /// Age after which metrics count as stale (`--metrics-staleness-threshold`, 2s); used
    /// by [`DataLayerHandle::pool_stats`]. Scheduling plugins read it from their own config.
    pub staleness_threshold: Duration,
    /// Bound on one scrape, connect to last body byte (1s, the reference's per-poll timeout).
    pub scrape_timeout: Duration,
    /// Longest wait between attempts while an endpoint keeps failing (1s).
    pub max_backoff: Duration,
    /// Largest accepted `/metrics` body (8 MiB; a vLLM page is 50-300 KiB).
    pub max_body_bytes: usize,
    /// `http` or `https` (`--model-server-metrics-scheme`, `http`).
    pub metrics_scheme: MetricsScheme,
    /// How `https` servers are verified, and the client certificate
    /// (`--model-server-metrics-https-insecure-skip-verify`, true).
    pub tls: ScrapeTls,
    /// Path scraped on each endpoint (`--model-server-metrics-path`, `/metrics`).
    pub metrics_path: String,
    /// Port scraped instead of each endpoint's own (`--model-server-metrics-port`); only
    /// meaningful with one port per address, as in the reference.
    pub metrics_port: Option<u16>,
    /// The deprecated metric-name flags (applied to the vLLM mapping).
    pub metric_overrides: MetricOverrides,
    /// Engine mappings added or replaced by name (`engineConfigs` of
    /// `core-metrics-extractor`), applied after [`Self::metric_overrides`].
    pub engine_configs: Vec<(String, EngineMapping)>,
    /// Engine for endpoints without an engine label (`vllm`).
    pub default_engine: String,
    /// Label naming an endpoint's engine (`llm-d.ai/engine-type`).
    pub engine_label_key: String,
    /// Endpoints from `--endpoints` (see [`parse_endpoints_flag`]).
    pub static_endpoints: Vec<EndpointMeta>,
    /// `--endpoints-file`, reloaded on change.
    pub endpoints_file: Option<PathBuf>,
    /// `--endpoint-target-ports`: expands file entries without a port.
    pub target_ports: Vec<u16>,
    /// `--objectives-file`, reloaded on change.
    pub objectives_file: Option<PathBuf>,
    /// How often watched files are checked (1s).
    pub file_poll_interval: Duration,
    /// Endpoint health rules (scrapes are its active signal and half-open probe).
    pub health: llmsched_core::health::HealthPolicy,
}

impl Default for DataLayerConfig {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_millis(50),
            staleness_threshold: Duration::from_secs(2),
            scrape_timeout: Duration::from_secs(1),
            max_backoff: Duration::from_secs(1),
            max_body_bytes: 8 << 20,
            metrics_scheme: MetricsScheme::Http,
            tls: ScrapeTls::default(),
            metrics_path: "/metrics".into(),
            metrics_port: None,
            metric_overrides: MetricOverrides::default(),
            engine_configs: Vec::new(),
            default_engine: mapping::engine::VLLM.into(),
            engine_label_key: label::ENGINE_TYPE.into(),
            static_endpoints: Vec::new(),
            endpoints_file: None,
            target_ports: Vec::new(),
            objectives_file: None,
            file_poll_interval: Duration::from_secs(1),
            health: Default::default(),
        }
    }
}

/// The data layer cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DataLayerError {
    /// A setting is out of range.
    #[error("invalid data-layer setting: {0}")]
    Config(String),
    /// A metric specification or engine name is invalid.
    #[error(transparent)]
    Spec(#[from] mapping::SpecError),
    /// The `https` settings are unusable (a certificate file, the system roots).
    #[error("model-server metrics over https: {0}")]
    Tls(#[from] ScrapeTlsError),
    /// The endpoints are unusable.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The endpoints conflict (e.g. the same address in `--endpoints` and the file).
    #[error("{source_name}: {error}")]
    Store {
        /// Where the endpoints came from.
        source_name: String,
        /// The conflict.
        error: StoreError,
    },
    /// The objectives file is unusable.
    #[error(transparent)]
    Objectives(#[from] objectives::ObjectivesFileError),
}

impl DataLayerConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), DataLayerError> {
        let bad = |s: String| Err(DataLayerError::Config(s));
        if self.refresh_interval.is_zero() {
            return bad("refresh interval must be positive".into());
        }
        if self.scrape_timeout.is_zero() {
            return bad("scrape timeout must be positive".into());
        }
        if self.file_poll_interval.is_zero() {
            return bad("file poll interval must be positive".into());
        }
        if self.max_body_bytes == 0 {
            return bad("maximum body size must be positive".into());
        }
        if !self.metrics_path.starts_with('/')
            || self
                .metrics_path
                .parse::<http::uri::PathAndQuery>()
                .is_err()
        {
            return bad(format!(
                "metrics path '{}' must be an absolute URL path",
                self.metrics_path
            ));
        }
        if self.metrics_port == Some(0) {
            return bad("metrics port must be between 1 and 65535".into());
        }
        if self.target_ports.contains(&0) {
            return bad("target ports must be between 1 and 65535".into());
        }
        Ok(())
    }

    /// The metric mappings: built-ins, the deprecated flags on vLLM, then
    /// [`Self::engine_configs`]; fails on a bad specification or an unknown default engine.
    pub fn metric_mappings(&self) -> Result<MetricMappings, DataLayerError> {
        Ok(MetricMappings::with_engines(
            &self.default_engine,
            &self.engine_label_key,
            &self.metric_overrides,
            &self.engine_configs,
        )?)
    }

    /// The TLS client settings of `https` scraping (`None` for `http`); reads the
    /// certificate files.
    pub fn tls_client_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, DataLayerError> {
        match self.metrics_scheme {
            MetricsScheme::Http => Ok(None),
            MetricsScheme::Https => Ok(Some(Arc::new(tls::client_config(&self.tls)?))),
        }
    }

    fn scrape_settings(
        &self,
        metrics_port: MetricsPort,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> ScrapeSettings {
        ScrapeSettings {
            interval: self.refresh_interval,
            timeout: self.scrape_timeout,
            max_backoff: self.max_backoff,
            max_body_bytes: self.max_body_bytes,
            scheme: self.metrics_scheme,
            tls,
            path: self.metrics_path.clone(),
            metrics_port,
            health: self.health.clone(),
        }
    }
}

/// The running data layer. Dropping it (or cancelling the token given to [`start`]) stops
/// every task; [`Self::shutdown`] also waits for them.
#[derive(Debug)]
pub struct DataLayerHandle {
    store: Arc<EndpointStore>,
    objectives: Arc<ObjectivesStore>,
    metrics_port: MetricsPort,
    staleness_threshold: Duration,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl DataLayerHandle {
    /// The endpoint store (also the director's `EndpointSource`).
    pub fn store(&self) -> &Arc<EndpointStore> {
        &self.store
    }

    /// The objectives in effect.
    pub fn objectives(&self) -> &Arc<ObjectivesStore> {
        &self.objectives
    }

    /// The scraped metrics port, for a discovery source that changes it while running
    /// (starts as [`DataLayerConfig::metrics_port`]).
    pub fn metrics_port(&self) -> &MetricsPort {
        &self.metrics_port
    }

    /// Pool aggregates now, with the configured staleness threshold.
    pub fn pool_stats(&self) -> PoolStats {
        pool_stats(
            &self.store.snapshot(),
            Instant::now(),
            self.staleness_threshold,
        )
    }

    /// Stops every task and waits for them to finish.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for DataLayerHandle {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn merge(static_eps: &[EndpointMeta], file_eps: Vec<EndpointMeta>) -> Vec<EndpointMeta> {
    let mut all = static_eps.to_vec();
    all.extend(file_eps);
    all
}

/// Starts the data layer: loads the endpoints (flag and file) and objectives, marks the
/// store synced when a discovery source was configured, and spawns the file watchers and
/// the scraper. Listeners may be added to `store` before or after. Without `--endpoints` or
/// `--endpoints-file`, the store is left for another discovery source (Kubernetes) to fill
/// and mark synced; the scraper follows it either way.
///
/// Fails, before spawning anything, when a setting, a metric specification, the endpoints
/// or the objectives file is invalid. Must be called within a Tokio runtime.
pub async fn start(
    config: DataLayerConfig,
    store: Arc<EndpointStore>,
    metrics: DataLayerMetrics,
    cancel: CancellationToken,
) -> Result<DataLayerHandle, DataLayerError> {
    config.validate()?;
    let mappings = Arc::new(config.metric_mappings()?);
    let tls = config.tls_client_config()?;
    let cancel = cancel.child_token();
    let tasks = TaskTracker::new();

    // Objectives.
    let objectives = Arc::new(ObjectivesStore::default());
    let mut objectives_watch = None;
    if let Some(path) = &config.objectives_file {
        let name = path.display().to_string();
        let (text, hash) = watch::read_text(path)
            .map_err(|e| objectives::ObjectivesFileError(format!("{name}: {e}")))?;
        let parsed = parse_manifests(&text, &name)
            .map_err(|e| objectives::ObjectivesFileError(e.to_string()))?;
        log_objectives(&name, &parsed);
        objectives.replace(parsed);
        let target = objectives.clone();
        objectives_watch = Some(watch::FileWatcher {
            path: path.clone(),
            interval: config.file_poll_interval,
            applied: Some(hash),
            apply: move |text: &str| {
                let parsed = parse_manifests(text, &name).map_err(|e| e.to_string())?;
                log_objectives(&name, &parsed);
                target.replace(parsed);
                Ok(())
            },
            metrics: metrics.clone(),
        });
    }

    // Endpoints.
    let mut endpoints_watch = None;
    if let Some(path) = &config.endpoints_file {
        let name = path.display().to_string();
        let (text, hash) = watch::read_text(path).map_err(|e| DiscoveryError::File {
            source_name: name.clone(),
            detail: e,
        })?;
        let file_eps = parse_endpoints_file(&text, &name, &config.target_ports)?;
        store
            .update(merge(&config.static_endpoints, file_eps))
            .map_err(|error| DataLayerError::Store {
                source_name: format!("--endpoints and {name}"),
                error,
            })?;
        store.set_synced();
        let target = store.clone();
        let static_eps = config.static_endpoints.clone();
        let ports = config.target_ports.clone();
        endpoints_watch = Some(watch::FileWatcher {
            path: path.clone(),
            interval: config.file_poll_interval,
            applied: Some(hash),
            apply: move |text: &str| {
                let file_eps =
                    parse_endpoints_file(text, &name, &ports).map_err(|e| e.to_string())?;
                let change = target
                    .update(merge(&static_eps, file_eps))
                    .map_err(|e| format!("{name}: {e}"))?;
                tracing::info!(
                    file = %name,
                    added = change.added.len(),
                    removed = change.removed.len(),
                    endpoints = target.snapshot().len(),
                    "endpoints reloaded"
                );
                Ok(())
            },
            metrics: metrics.clone(),
        });
    } else if !config.static_endpoints.is_empty() {
        store
            .update(config.static_endpoints.clone())
            .map_err(|error| DataLayerError::Store {
                source_name: "--endpoints".into(),
                error,
            })?;
        store.set_synced();
    }

    if let Some(w) = objectives_watch {
        tasks.spawn(w.run(cancel.clone()));
    }
    if let Some(w) = endpoints_watch {
        tasks.spawn(w.run(cancel.clone()));
    }
    let metrics_port = MetricsPort::new(config.metrics_port);
    tasks.spawn(scraper::run_scraper(
        store.clone(),
        mappings,
        config.scrape_settings(metrics_port.clone(), tls),
        metrics,
        cancel.clone(),
    ));
    tracing::info!(
        endpoints = store.snapshot().len(),
        interval = ?config.refresh_interval,
        scheme = %config.metrics_scheme,
        path = %config.metrics_path,
        "data layer started"
    );
    Ok(DataLayerHandle {
        store,
        objectives,
        metrics_port,
        staleness_threshold: config.staleness_threshold,
        cancel,
        tasks,
    })
}

fn log_objectives(source: &str, o: &Objectives) {
    tracing::info!(
        file = %source,
        objectives = o.objective_count(),
        rewrites = o.rewrite_count(),
        "objectives loaded"
    );
}
