//! The composition root of `llmsched epp`: loads the configuration, starts the data layer,
//! builds the director and serves ext_proc, health, metrics (and the proxy, when asked).
//!
//! [`start`] binds every listener before returning, so callers (tests, the demo) learn the
//! real addresses, including ephemeral ports (`--grpc-port=0`). [`run`] is the subcommand:
//! start, then wait for Ctrl-C or a server failure, then shut down cleanly.
//!
//! Shutdown drains ([`EppHandle::shutdown`]): readiness turns NOT_SERVING at once (liveness
//! stays SERVING), the ext_proc and proxy listeners stop accepting connections and streams,
//! and requests in flight (long generations included) get `--drain-timeout` to finish; then
//! whatever is left is cut and the health and metrics servers stop. A second SIGTERM or
//! Ctrl-C ends the drain at once.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use llmsched_core::EndpointSource;
use llmsched_core::config::{self, ConfigSource, LoadedConfig};
use llmsched_core::health::HealthPolicy;
use llmsched_core::metrics::SchedulerMetrics;
use llmsched_core::objectives::Objectives;
use llmsched_core::registry::{Extensions, PluginHandle};
use llmsched_datalayer::{
    DataLayerConfig, DataLayerHandle, EndpointStore, HealthCollector, MetricOverrides,
    MetricsScheme, ScrapeTls, parse_endpoints_flag,
};
use llmsched_director::{Director, DirectorOptions, EppMetrics, HealthMetrics, PoolCollector};
use llmsched_extproc::{ExtProcOptions, TlsConfig, serve_ext_proc_on};
use llmsched_ops::{
    HealthHandle, Limits, Listener, ListenerMetrics, ServeError, serve_health_on, serve_metrics_on,
    spawn_readiness_watch,
};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::args::{Args, ArgsError, Discovery, HaMode};
use crate::data_sources::DataLayerPlan;
use crate::reload::{ConfigMetrics, Reloader};
use llmsched_kube::discovery::{DiscoveryConfig, Sinks, Source};

/// Why the EPP cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EppError {
    /// A flag combination is invalid.
    #[error(transparent)]
    Args(#[from] ArgsError),
    /// The configuration file cannot be read.
    #[error("cannot read config file {path}: {error}")]
    ConfigRead {
        /// The file.
        path: String,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Endpoints, objectives or scraping settings are invalid.
    #[error(transparent)]
    DataLayer(#[from] llmsched_datalayer::DataLayerError),
    /// `--endpoints` is malformed.
    #[error("--endpoints: {0}")]
    Endpoints(#[from] llmsched_datalayer::DiscoveryError),
    /// TLS material is unusable.
    #[error("secure serving: {0}")]
    Tls(#[from] llmsched_extproc::TlsError),
    /// A port cannot be bound.
    #[error("cannot listen on {addr} (--{flag}): {error}")]
    Bind {
        /// The flag naming the port.
        flag: &'static str,
        /// The address.
        addr: String,
        /// The I/O error.
        error: std::io::Error,
    },
    /// Kubernetes discovery cannot start (no usable kubeconfig or service account).
    #[error(transparent)]
    Kube(#[from] llmsched_kube::discovery::ClientError),
    /// Leader election cannot start (bad timings, no pool or POD_NAME to name the Lease).
    #[error(transparent)]
    LeaderElection(#[from] llmsched_kube::leader::LeaderElectionError),
    /// `--ha-mode=active-active` cannot start (no peers source, bad TLS material).
    #[error("--ha-mode=active-active: {0}")]
    Ha(String),
    /// `--metrics-endpoint-auth=true` without a usable Kubernetes client.
    #[error("--metrics-endpoint-auth=true: {0}")]
    MetricsAuth(String),
    /// A server failed while running.
    #[error("{server} server failed: {error}")]
    Serve {
        /// Which server.
        server: &'static str,
        /// Why.
        error: String,
    },
}

/// The running EPP.
#[derive(Debug)]
pub struct EppHandle {
    /// ext_proc gRPC address.
    pub grpc_addr: SocketAddr,
    /// gRPC health address.
    pub health_addr: SocketAddr,
    /// Prometheus metrics address.
    pub metrics_addr: SocketAddr,
    /// Built-in proxy address, when `--proxy-port` was given.
    pub proxy_addr: Option<SocketAddr>,
    /// PEM of the ext_proc server certificate, when serving TLS.
    pub tls_certificate_pem: Option<Vec<u8>>,
    /// Replica state sync address (`--ha-mode=active-active`).
    pub ha_addr: Option<SocketAddr>,
    ha: Option<Arc<llmsched_ha::HaHandle>>,
    director: Arc<Director>,
    store: Arc<EndpointStore>,
    health: HealthHandle,
    cancel: CancellationToken,
    /// Stops the ext_proc and proxy listeners (they then finish what is in flight).
    drain: CancellationToken,
    drain_timeout: Duration,
    /// Active-active: how long new streams are still taken after SIGTERM.
    handover_delay: Duration,
    /// ext_proc and proxy: drained first.
    draining: Servers,
    /// health and metrics: up until the drain is over.
    servers: Servers,
    datalayer: Option<DataLayerHandle>,
    kube: Option<llmsched_kube::discovery::KubeDiscovery>,
    leader: Option<llmsched_kube::leader::LeaderElection>,
    reload_trigger: Arc<Notify>,
}

type Servers = JoinSet<(&'static str, Result<(), String>)>;

impl EppHandle {
    /// The director (shared by every transport).
    pub fn director(&self) -> &Arc<Director> {
        &self.director
    }

    /// The endpoint store.
    pub fn store(&self) -> &Arc<EndpointStore> {
        &self.store
    }

    /// The health handle.
    pub fn health(&self) -> &HealthHandle {
        &self.health
    }

    /// Reloads `--config-file` now, as SIGHUP does (no-op without a file or with
    /// `--config-reload=false`). The outcome is logged and counted in
    /// `llmsched_config_reloads_total`.
    pub fn reload_config(&self) {
        self.reload_trigger.notify_one();
    }

    /// The replica state sync (`--ha-mode=active-active`).
    pub fn ha(&self) -> Option<&llmsched_ha::HaHandle> {
        self.ha.as_deref()
    }

    /// Whether this replica holds the leader Lease (`None` without leader election).
    pub fn is_leader(&self) -> Option<bool> {
        self.leader.as_ref().map(|l| l.is_leader())
    }

    /// Stops everything at once without releasing the leader Lease, as a crash would (the
    /// other replicas wait for the Lease to expire). For tests.
    #[doc(hidden)]
    pub fn abort_without_release(mut self) {
        if let Some(l) = self.leader.take() {
            l.abort();
        }
        self.cancel.cancel();
        self.drain.cancel();
        self.draining.abort_all();
        self.servers.abort_all();
    }

    /// Waits until a server stops on its own (an error) or `shutdown` is cancelled.
    pub async fn wait(&mut self, shutdown: CancellationToken) -> Result<(), EppError> {
        let joined = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            Some(j) = self.draining.join_next() => j,
            Some(j) = self.servers.join_next() => j,
        };
        let (server, outcome) = match joined {
            Ok(v) => v,
            Err(e) => ("(task)", Err(e.to_string())),
        };
        match outcome {
            Ok(()) => Err(EppError::Serve {
                server,
                error: "stopped unexpectedly".into(),
            }),
            Err(error) => Err(EppError::Serve { server, error }),
        }
    }

    /// The drain timeout (`--drain-timeout`).
    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout
    }

    /// Drains and stops (see the module documentation): health NOT_SERVING, no new
    /// connections or streams on ext_proc and the proxy, requests in flight get
    /// `--drain-timeout` to finish, then every server and background task stops.
    pub async fn shutdown(self) {
        self.shutdown_until(CancellationToken::new()).await;
    }

    /// [`Self::shutdown`], cutting the drain short when `force` is cancelled (a second
    /// signal).
    pub async fn shutdown_until(mut self, force: CancellationToken) {
        let started = Instant::now();
        tracing::info!(
            drain_timeout = ?self.drain_timeout,
            "draining: readiness NOT_SERVING, no new connections or streams; requests in flight may finish"
        );
        self.health.set_draining();
        // Active-active: the other replicas take the new requests once the gateway's health
        // check sees NOT_SERVING; until then this one keeps taking them (closing the
        // listener first would fail the requests the gateway still sends here).
        if self.ha.is_some() && !self.handover_delay.is_zero() {
            tracing::info!(handover_delay = ?self.handover_delay, "active-active handover: still accepting ext_proc streams while the gateway's health check moves new requests to the other replicas");
            tokio::select! {
                () = tokio::time::sleep(self.handover_delay) => {}
                () = force.cancelled() => {}
            }
        }
        self.drain.cancel();
        // The leader gives its Lease back first (its election stops with the drain token), so
        // a follower takes over while this replica's requests in flight finish.
        if let Some(l) = self.leader.take() {
            l.stopped().await;
        }
        let draining = &mut self.draining;
        tokio::select! {
            () = async { while draining.join_next().await.is_some() {} } => {
                tracing::info!(elapsed = ?started.elapsed(), "drained: every request in flight finished");
            }
            () = tokio::time::sleep(self.drain_timeout) => {
                tracing::warn!(drain_timeout = ?self.drain_timeout, "requests still in flight at the drain timeout: cutting them");
            }
            () = force.cancelled() => {
                tracing::warn!("second signal: cutting the drain short");
            }
        }
        self.draining.abort_all();
        while self.draining.join_next().await.is_some() {}
        // Active-active: the sync ran through the drain (the peers kept seeing this
        // replica's in-flight figures fall); closing its streams now makes them drop its
        // figures at once.
        if let Some(ha) = self.ha.take() {
            ha.stop();
        }
        self.cancel.cancel();
        // Health and metrics hold no long requests: a moment for their connections to close
        // gracefully, then they are cut.
        let servers = &mut self.servers;
        let closed = tokio::time::timeout(Duration::from_secs(2), async {
            while servers.join_next().await.is_some() {}
        })
        .await;
        if closed.is_err() {
            self.servers.abort_all();
            while self.servers.join_next().await.is_some() {}
        }
        if let Some(k) = self.kube.take() {
            k.shutdown().await;
        }
        if let Some(dl) = self.datalayer.take() {
            dl.shutdown().await;
        }
    }
}

impl Drop for EppHandle {
    fn drop(&mut self) {
        self.drain.cancel();
        self.cancel.cancel();
    }
}

/// `--config-file`, unless empty (an empty value means unset, as pflag's empty string does).
pub fn config_file(args: &Args) -> Option<&Path> {
    args.config_file
        .as_deref()
        .filter(|p| !p.as_os_str().is_empty())
}

/// Where the configuration comes from.
pub fn config_source(args: &Args) -> ConfigSource {
    match (config_file(args), &args.config_text) {
        (Some(path), _) => ConfigSource::File(path.display().to_string()),
        (None, Some(_)) => ConfigSource::Text,
        (None, None) => ConfigSource::Default,
    }
}

/// The configuration text named by the flags (file, text, or the built-in default).
pub fn config_text(args: &Args) -> Result<String, EppError> {
    if let Some(path) = config_file(args) {
        return std::fs::read_to_string(path).map_err(|error| EppError::ConfigRead {
            path: path.display().to_string(),
            error,
        });
    }
    Ok(args
        .config_text
        .clone()
        .unwrap_or_else(|| config::DEFAULT_CONFIG_YAML.to_string()))
}

/// Loads the configuration named by the flags (file, text, or the built-in default).
pub fn load_config(args: &Args, handle: &PluginHandle) -> Result<LoadedConfig, EppError> {
    let registry = llmsched_plugins::default_registry();
    let text = config_text(args)?;
    Ok(config::load(&text, config_source(args), &registry, handle)?)
}

/// The data layer's settings: the flags, then what the configuration's `dataLayer` and
/// `metrics-data-source` / `core-metrics-extractor` parameters say (see
/// [`crate::data_sources`]). Errors name the configuration's source, as load errors do.
pub fn resolve_data_layer(
    args: &Args,
    config: &LoadedConfig,
) -> Result<(DataLayerPlan, DataLayerConfig), EppError> {
    let fail = |detail: String| config::ConfigError {
        origin: config_source(args),
        detail,
    };
    let plan = DataLayerPlan::resolve(config).map_err(fail)?;
    let dl = plan.apply(data_layer_config(args)?).map_err(fail)?;
    Ok((plan, dl))
}

fn data_layer_config(args: &Args) -> Result<DataLayerConfig, EppError> {
    let static_endpoints = match &args.endpoints {
        Some(s) => parse_endpoints_flag(s, &args.endpoint_target_ports)?,
        None => Vec::new(),
    };
    let changed = |value: &str, default: &str| (value != default).then(|| value.to_string());
    Ok(DataLayerConfig {
        refresh_interval: args.refresh_metrics_interval,
        staleness_threshold: args.metrics_staleness_threshold,
        metrics_scheme: MetricsScheme::parse(&args.model_server_metrics_scheme).unwrap_or_default(),
        tls: ScrapeTls {
            insecure_skip_verify: args.model_server_metrics_https_insecure_skip_verify,
            ..ScrapeTls::default()
        },
        metrics_path: args.model_server_metrics_path.clone(),
        metrics_port: (args.model_server_metrics_port != 0)
            .then_some(args.model_server_metrics_port),
        metric_overrides: MetricOverrides {
            total_queued_requests: changed(
                &args.total_queued_requests_metric,
                "vllm:num_requests_waiting",
            ),
            total_running_requests: changed(
                &args.total_running_requests_metric,
                "vllm:num_requests_running",
            ),
            kv_cache_usage_percentage: changed(
                &args.kv_cache_usage_percentage_metric,
                "vllm:kv_cache_usage_perc",
            ),
            lora_info: changed(&args.lora_info_metric, "vllm:lora_requests_info"),
            cache_info: changed(&args.cache_info_metric, "vllm:cache_config_info"),
        },
        static_endpoints,
        endpoints_file: args.endpoints_file.clone(),
        target_ports: args.endpoint_target_ports.clone(),
        objectives_file: args.objectives_file.clone(),
        health: health_policy(args, args.refresh_metrics_interval),
        ..DataLayerConfig::default()
    })
}

/// Endpoint health from the flags, for metrics scraped every `refresh` (the flag's, or the
/// configured source's `interval`). Metrics count as stale after
/// `--metrics-staleness-threshold`, but never sooner than two refresh intervals plus a
/// scrape timeout, so a long refresh interval cannot make every endpoint look stale between
/// two scrapes.
pub fn health_policy(args: &Args, refresh: Duration) -> HealthPolicy {
    let floor = refresh
        .saturating_mul(2)
        .saturating_add(DataLayerConfig::default().scrape_timeout);
    HealthPolicy {
        enabled: args.endpoint_health_checks,
        staleness: args.metrics_staleness_threshold.max(floor),
        ..HealthPolicy::default()
    }
}

/// Connection limits of every listener, from the flags.
pub fn listener_limits(args: &Args) -> Limits {
    Limits {
        max_connections: args.max_connections,
        header_timeout: args.request_header_timeout,
        idle_timeout: args.connection_idle_timeout,
    }
}

async fn bind(args: &Args, port: u16, flag: &'static str) -> Result<TcpListener, EppError> {
    let addr = format!("{}:{port}", bracket(&args.bind_address));
    TcpListener::bind(&addr)
        .await
        .map_err(|error| EppError::Bind { flag, addr, error })
}

fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

fn local_addr(l: &TcpListener, flag: &'static str) -> Result<SocketAddr, EppError> {
    l.local_addr().map_err(|error| EppError::Bind {
        flag,
        addr: "?".into(),
        error,
    })
}

fn tls_config(args: &Args) -> Result<Option<TlsConfig>, EppError> {
    if !args.secure_serving {
        return Ok(None);
    }
    Ok(Some(match &args.cert_path {
        Some(dir) => TlsConfig::from_cert_dir(Path::new(dir), args.enable_cert_reload)?,
        None => TlsConfig::self_signed()?,
    }))
}

/// Starts the EPP: every listener is bound and every task spawned when this returns.
pub async fn start(args: Args) -> Result<EppHandle, EppError> {
    args.validate()?;
    for w in args.compatibility_warnings() {
        tracing::warn!("{w}");
    }
    let cancel = CancellationToken::new();
    let kube_source = kube_source(&args.discovery(std::env::var("NAMESPACE").ok().as_deref())?);
    // The Kubernetes client (configuration only; nothing is contacted yet).
    let kube_client = match &kube_source {
        None => None,
        Some(_) => Some(llmsched_kube::discovery::client(args.kubeconfig.as_deref()).await?),
    };

    // Metrics registry shared by scheduler, plugins, director and data layer.
    let mut registry = Registry::default();
    let scheduler_metrics = Arc::new(SchedulerMetrics::register(&mut registry));
    let epp_metrics = EppMetrics::register(
        &mut registry,
        option_env!("LLMSCHED_COMMIT").unwrap_or("unknown"),
        env!("CARGO_PKG_VERSION"),
    );
    let dl_metrics = llmsched_datalayer::register_metrics(&mut registry);
    let kube_metrics = kube_client
        .as_ref()
        .map(|_| llmsched_kube::metrics::KubeMetrics::register(&mut registry));
    let ha_kube_metrics = kube_metrics.clone();
    // --metrics-endpoint-auth and --ha-enable-leader-election (both need the client).
    let metrics_auth = metrics_authorizer(&args, kube_client.as_ref(), &mut registry).await?;
    let election = leader_election(&args, kube_client.as_ref(), &mut registry)?;
    let health_metrics = HealthMetrics::register(&mut registry);
    let listener_metrics = ListenerMetrics::register(&mut registry);
    let config_metrics = ConfigMetrics::register(&mut registry);

    // Configuration (plugins see the store and the runtime).
    let store = Arc::new(EndpointStore::new());
    let mut extensions = Extensions::default();
    extensions.insert(tokio::runtime::Handle::current());
    // KV-event ingestion counters of the precise prefix-cache scorer.
    extensions.insert(llmsched_plugins::scorer::PreciseMetrics::register(
        &mut registry,
    ));
    let handle = PluginHandle {
        metrics: scheduler_metrics.clone(),
        endpoints: Some(store.clone() as Arc<dyn EndpointSource>),
        extensions,
    };
    let plugin_registry = llmsched_plugins::default_registry();
    let text = config_text(&args)?;
    let config_hash = crate::reload::content_hash(&text);
    let config = Arc::new(config::load(
        &text,
        config_source(&args),
        &plugin_registry,
        &handle,
    )?);
    let (dl_plan, mut dl_config) = resolve_data_layer(&args, &config)?;
    config_metrics.loaded(&config_source(&args), config_hash, false);
    let health_policy = health_policy(&args, dl_config.refresh_interval);
    dl_config.health = health_policy.clone();
    for listener in &config.endpoint_listeners {
        store.add_listener(listener.clone());
    }
    tracing::info!(
        profiles = ?config.scheduler.profiles().iter().map(|p| p.name()).collect::<Vec<_>>(),
        plugins = ?config.plugins.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        parser = config.parser.name(),
        source = %config_source(&args),
        hash = %crate::reload::hash_hex(config_hash),
        "configuration loaded"
    );

    // TLS before binding anything, so a bad certificate fails fast.
    let tls = tls_config(&args)?;
    let tls_certificate_pem = tls.as_ref().map(|t| t.certificate_pem().to_vec());

    // Listeners.
    let grpc = bind(&args, args.grpc_port, "grpc-port").await?;
    let health_l = bind(&args, args.grpc_health_port, "grpc-health-port").await?;
    let metrics_l = bind(&args, args.metrics_port, "metrics-port").await?;
    let proxy_l = match args.proxy_port {
        Some(p) => Some(bind(&args, p, "proxy-port").await?),
        None => None,
    };
    let active_active = args.resolved_ha_mode() == Some(HaMode::ActiveActive);
    let ha_l = if active_active {
        Some(bind(&args, args.ha_port, "ha-port").await?)
    } else {
        None
    };
    let grpc_addr = local_addr(&grpc, "grpc-port")?;
    let health_addr = local_addr(&health_l, "grpc-health-port")?;
    let metrics_addr = local_addr(&metrics_l, "metrics-port")?;
    let proxy_addr = proxy_l
        .as_ref()
        .map(|l| local_addr(l, "proxy-port"))
        .transpose()?;

    // Data layer: endpoints, objectives, scraping.
    let dl =
        llmsched_datalayer::start(dl_config, store.clone(), dl_metrics, cancel.clone()).await?;
    let objectives: Arc<ArcSwap<Objectives>> = dl.objectives().shared();
    let kube = match (&kube_client, kube_metrics, kube_source) {
        (Some(client), Some(metrics), Some((namespace, source))) => Some(start_kube_discovery(
            client.clone(),
            &args,
            DiscoveryConfig::new(namespace, source),
            &dl,
            metrics,
            cancel.clone(),
        )),
        _ => None,
    };

    let pool_name = args.pool_name.clone().unwrap_or_else(|| "llmsched".into());
    PoolCollector::new(
        store.clone() as Arc<dyn EndpointSource>,
        pool_name.clone(),
        args.metrics_staleness_threshold,
    )
    .register(&mut registry);
    HealthCollector::new(
        store.clone() as Arc<dyn EndpointSource>,
        health_policy.clone(),
    )
    .register(&mut registry);

    let director = Arc::new(
        Director::builder(config, store.clone() as Arc<dyn EndpointSource>)
            .objectives(objectives)
            .metrics(epp_metrics)
            .health_metrics(health_metrics)
            .scheduler_metrics(scheduler_metrics)
            .options(DirectorOptions {
                disable_endpoint_subset_filter: args.disable_endpoint_subset_filter,
                pool_name,
                health: health_policy,
                ..DirectorOptions::default()
            })
            .build(),
    );
    let reload_trigger = Arc::new(Notify::new());
    match (config_file(&args), args.config_reload) {
        (Some(path), true) => {
            let reloader = Reloader {
                path: path.to_path_buf(),
                source: config_source(&args),
                registry: plugin_registry,
                handle,
                director: director.clone(),
                store: store.clone(),
                plan: dl_plan,
                metrics: config_metrics,
                interval: args.config_reload_interval,
                applied: config_hash,
                trigger: reload_trigger.clone(),
            };
            tokio::spawn(reloader.run(cancel.clone()));
        }
        (Some(_), false) => {
            tracing::info!("--config-reload=false: the configuration file is read once");
        }
        (None, _) => {}
    }

    // Active-active: the replica state sync (its sync port serves at once; readiness waits
    // for its bootstrap).
    let ha = match ha_l {
        Some(listener) => Some(
            crate::ha::start(
                crate::ha::HaInputs {
                    args: &args,
                    director: &director,
                    store: &store,
                    tls: tls.as_ref(),
                    kube_client: kube_client.as_ref(),
                    kube_metrics: ha_kube_metrics,
                    pool: args.pool_name.clone().unwrap_or_else(|| "llmsched".into()),
                },
                listener,
                &mut registry,
                cancel.child_token(),
            )
            .await?,
        ),
        None => None,
    };
    let ha_addr = ha.as_ref().map(|h| h.addr());

    // Servers.
    let registry = Arc::new(registry);
    let health = HealthHandle::with_leader_election(args.leader_election());
    // Cancelled first on shutdown: stops the ext_proc and proxy listeners and the election.
    let drain = CancellationToken::new();
    let leader = match election {
        Some((client, config, metrics)) => {
            let h = health.clone();
            Some(llmsched_kube::leader::spawn(
                client,
                config,
                metrics,
                Arc::new(move |leader| h.set_leader(leader)),
                drain.clone(),
            )?)
        }
        None => None,
    };
    match &ha {
        Some(ha) => {
            crate::ha::spawn_readiness(health.clone(), store.clone(), ha.clone(), cancel.clone())
        }
        None => {
            spawn_readiness_watch(
                health.clone(),
                store.clone() as Arc<dyn EndpointSource>,
                Duration::from_millis(100),
                cancel.clone(),
            );
        }
    }
    let limits = listener_limits(&args);
    let listener = |tcp: TcpListener, name: &'static str| {
        Listener::new(tcp, name, limits, listener_metrics.clone())
    };
    let (grpc, health_l, metrics_l) = (
        listener(grpc, "ext_proc"),
        listener(health_l, "health"),
        listener(metrics_l, "metrics"),
    );
    let mut draining = JoinSet::new();
    let mut servers = JoinSet::new();
    let err = |e: ServeError| e.to_string();
    {
        let (d, c, h) = (director.clone(), drain.clone(), health.clone());
        let health_on_grpc = args.health_checking.then_some(h);
        let options = ExtProcOptions {
            max_request_body_bytes: args.max_request_body_bytes,
            ..ExtProcOptions::default()
        };
        draining.spawn(async move {
            let r = serve_ext_proc_on(grpc, d, tls, health_on_grpc, options, c).await;
            ("ext_proc", r.map_err(err))
        });
    }
    {
        let (h, c) = (health.clone(), cancel.clone());
        servers.spawn(async move {
            let r = serve_health_on(health_l, h, c).await;
            ("health", r.map_err(err))
        });
    }
    {
        let (r, c) = (registry.clone(), cancel.clone());
        servers.spawn(async move {
            let served = serve_metrics_on(metrics_l, r, metrics_auth, c).await;
            ("metrics", served.map_err(err))
        });
    }
    if let Some(listener) = proxy_l {
        crate::proxy::spawn(
            &mut draining,
            listener,
            director.clone(),
            &args,
            listener_metrics.clone(),
            drain.clone(),
        );
    }

    tracing::info!(
        grpc = %grpc_addr,
        health = %health_addr,
        metrics = %metrics_addr,
        proxy = ?proxy_addr,
        ha = ?ha_addr,
        secure_serving = args.secure_serving,
        endpoints = store.snapshot().len(),
        "llmsched EPP started"
    );
    Ok(EppHandle {
        grpc_addr,
        health_addr,
        metrics_addr,
        proxy_addr,
        tls_certificate_pem,
        ha_addr,
        ha,
        director,
        store,
        health,
        cancel,
        drain,
        drain_timeout: args.drain_timeout,
        handover_delay: args.ha_handover_delay,
        draining,
        servers,
        datalayer: Some(dl),
        kube,
        leader,
        reload_trigger,
    })
}

/// Resolves `--metrics-endpoint-auth`: explicit `false` is off; explicit `true` needs a
/// Kubernetes client (the discovery one, else one built from the kubeconfig) or the EPP does
/// not start; unset is on when endpoints come from Kubernetes and off otherwise (static
/// endpoints: there is nobody to ask, and /metrics must stay usable).
async fn metrics_authorizer(
    args: &Args,
    kube_client: Option<&llmsched_kube::Client>,
    registry: &mut Registry,
) -> Result<Option<Arc<dyn llmsched_ops::MetricsAuthorizer>>, EppError> {
    let client = match (args.metrics_endpoint_auth, kube_client) {
        (Some(false), _) => {
            tracing::info!("/metrics is served without authentication (--metrics-endpoint-auth=false)");
            return Ok(None);
        }
        (_, Some(client)) => client.clone(),
        (Some(true), None) => llmsched_kube::discovery::client(args.kubeconfig.as_deref())
            .await
            .map_err(|e| {
                EppError::MetricsAuth(format!(
                    "TokenReview and SubjectAccessReview need a Kubernetes client, and none can be configured ({e}); pass --kubeconfig, run in a cluster, or use --metrics-endpoint-auth=false"
                ))
            })?,
        (None, None) => {
            tracing::info!(
                "/metrics is served without authentication: --metrics-endpoint-auth defaults to on only when endpoints come from Kubernetes (--pool-name or --endpoint-selector); pass --metrics-endpoint-auth=true with a kubeconfig to require bearer tokens"
            );
            return Ok(None);
        }
    };
    tracing::info!(
        "/metrics requires a bearer token allowed by a TokenReview and a SubjectAccessReview (get /metrics); --metrics-endpoint-auth=false turns this off"
    );
    let metrics = llmsched_kube::auth::MetricsAuthMetrics::register(registry);
    Ok(Some(Arc::new(
        llmsched_kube::auth::KubeMetricsAuthorizer::new(client, metrics),
    )))
}

type Election = (
    llmsched_kube::Client,
    llmsched_kube::leader::LeaderElectionConfig,
    llmsched_kube::leader::LeaderMetrics,
);

/// The Lease of `--ha-enable-leader-election`: the pool's (`epp-<ns>-<pool>...`), or in
/// `--endpoint-selector` mode the Deployment's named by `POD_NAME`, as the reference.
fn leader_election(
    args: &Args,
    kube_client: Option<&llmsched_kube::Client>,
    registry: &mut Registry,
) -> Result<Option<Election>, EppError> {
    use llmsched_kube::leader::{LeaderElectionConfig, LeaderElectionError, LeaderMetrics};
    if !args.leader_election() {
        return Ok(None);
    }
    let Some(client) = kube_client else {
        // validate() already refuses election without Kubernetes discovery.
        return Err(LeaderElectionError::Config(
            "--ha-enable-leader-election needs Kubernetes discovery".into(),
        )
        .into());
    };
    let ns_env = std::env::var("NAMESPACE").ok();
    let namespace = args.resolved_namespace(ns_env.as_deref());
    let target = match args.discovery(ns_env.as_deref())? {
        Discovery::Pool { name, .. } => name,
        _ => {
            let pod = std::env::var("POD_NAME").unwrap_or_default();
            llmsched_kube::leader::deployment_of_pod(&pod)
                .map(str::to_string)
                .ok_or_else(|| {
                    LeaderElectionError::Config(format!(
                        "with --endpoint-selector the Lease is named after the EPP's Deployment, read from env POD_NAME (<deployment>-<hash>-<suffix>); got {pod:?}"
                    ))
                })?
        }
    };
    let config = LeaderElectionConfig {
        lease_duration: args.leader_election_lease_duration,
        renew_deadline: args.leader_election_renew_deadline,
        retry_period: args.leader_election_retry_period,
        ..LeaderElectionConfig::for_pool(&namespace, &target)
    };
    config.validate()?;
    let metrics = LeaderMetrics::register(registry);
    Ok(Some((client.clone(), config, metrics)))
}

/// The Kubernetes source of `discovery` and its namespace (`None`: no Kubernetes).
fn kube_source(discovery: &Discovery) -> Option<(String, Source)> {
    match discovery {
        Discovery::Static => None,
        Discovery::Pool {
            name,
            namespace,
            group,
        } => Some((
            namespace.clone(),
            Source::Pool {
                name: name.clone(),
                group: group.clone(),
            },
        )),
        Discovery::Selector {
            labels,
            target_ports,
            namespace,
        } => Some((
            namespace.clone(),
            Source::Selector(llmsched_kube::pool::PoolView {
                selector: labels.clone(),
                target_ports: target_ports.clone(),
            }),
        )),
    }
}

/// Starts the InferencePool / pod / objectives watches feeding the data layer's stores.
fn start_kube_discovery(
    client: llmsched_kube::Client,
    args: &Args,
    mut config: DiscoveryConfig,
    dl: &DataLayerHandle,
    metrics: llmsched_kube::metrics::KubeMetrics,
    cancel: CancellationToken,
) -> llmsched_kube::discovery::KubeDiscovery {
    config.model_server_metrics_port = args.model_server_metrics_port;
    if args.objectives_file.is_some() {
        tracing::info!(
            "--objectives-file is set: objectives and rewrites come from the file, not from the cluster"
        );
        config.watch_objectives = false;
    }
    llmsched_kube::discovery::start(
        client,
        config,
        Sinks {
            store: dl.store().clone(),
            objectives: dl.objectives().clone(),
            metrics_port: dl.metrics_port().clone(),
        },
        metrics,
        cancel,
    )
}

/// `llmsched epp`: runs until SIGTERM or Ctrl-C (or a server fails), then drains
/// ([`EppHandle::shutdown`]); a second signal cuts the drain short.
pub async fn run(args: Args) -> Result<(), EppError> {
    let mut epp = start(args).await?;
    let first = CancellationToken::new();
    let second = CancellationToken::new();
    {
        let (first, second) = (first.clone(), second.clone());
        tokio::spawn(async move {
            let mut signals = Signals::new();
            signals.next().await;
            first.cancel();
            signals.next().await;
            second.cancel();
        });
    }
    let outcome = epp.wait(first).await;
    tracing::info!("shutting down (a second SIGTERM or Ctrl-C exits at once)");
    epp.shutdown_until(second).await;
    outcome
}

/// SIGTERM and SIGINT (Ctrl-C), registered once so that none is missed between two waits.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        Self {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok(),
        }
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(term) = self.term.as_mut() {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}
