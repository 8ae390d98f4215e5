//! `--ha-mode=active-active`: the replica state sync (`llmsched-ha`) wired into the EPP.
//!
//! * The shared states are the configuration's plugins that implement
//!   [`llmsched_core::replica::ReplicatedState`] (re-read from the director every tick, so a
//!   configuration swap is followed), and the endpoints' in-flight counters.
//! * Peers: `--ha-peers`, else the other pods of this EPP's Deployment through the
//!   Kubernetes API (`llmsched_kube::peers`; env `POD_NAME` and `NAMESPACE`).
//! * The sync port (`--ha-port`) serves TLS whenever ext_proc does, with the same
//!   certificate. Peers are dialled pinned to that certificate when it comes from
//!   `--cert-path` (every replica mounts the same Secret); with self-signed certificates the
//!   connection is encrypted and the certificate not verified, as the gateway treats the
//!   EPP's.
//! * Readiness waits for the bootstrap from a peer's snapshot (bounded by
//!   `--ha-bootstrap-timeout`), see [`spawn_readiness`].

use std::sync::Arc;
use std::time::Duration;

use llmsched_core::EndpointSource;
use llmsched_datalayer::EndpointStore;
use llmsched_director::Director;
use llmsched_extproc::TlsConfig;
use llmsched_ha::{ClientTls, HaConfig, HaHandle, HaMetrics, NamedState, PeerSet, StateSource};
use llmsched_ops::HealthHandle;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::args::Args;
use crate::run::EppError;

/// The replicated states of the director's current configuration.
struct DirectorStates(Arc<Director>);

impl StateSource for DirectorStates {
    fn states(&self) -> Vec<NamedState> {
        self.0
            .config()
            .plugins
            .iter()
            .filter_map(|(name, p)| {
                p.clone().as_replicated().map(|state| NamedState {
                    name: name.clone(),
                    state,
                })
            })
            .collect()
    }
}

/// What [`start`] needs from the rest of the EPP.
pub(crate) struct HaInputs<'a> {
    pub args: &'a Args,
    pub director: &'a Arc<Director>,
    pub store: &'a Arc<EndpointStore>,
    pub tls: Option<&'a TlsConfig>,
    pub kube_client: Option<&'a llmsched_kube::Client>,
    pub kube_metrics: Option<llmsched_kube::metrics::KubeMetrics>,
    pub pool: String,
}

/// Starts the sync on `listener` and the peer discovery. Returns at once; call
/// [`spawn_readiness`] next.
pub(crate) async fn start(
    input: HaInputs<'_>,
    listener: TcpListener,
    registry: &mut Registry,
    cancel: CancellationToken,
) -> Result<Arc<HaHandle>, EppError> {
    let args = input.args;
    let client_tls = match input.tls {
        None => ClientTls::Plaintext,
        Some(t) if args.cert_path.is_some() && !args.enable_cert_reload => {
            ClientTls::pinned_pem(t.certificate_pem()).map_err(EppError::Ha)?
        }
        Some(_) => {
            if args.cert_path.is_some() {
                tracing::info!(
                    "ha: --enable-cert-reload: peers' certificates are not pinned (a rotation reaches replicas at different times); the sync is encrypted"
                );
            }
            ClientTls::Tls { pinned: None }
        }
    };
    let config = HaConfig {
        replica_id: llmsched_kube::leader::holder_identity(),
        pool: input.pool.clone(),
        sync_interval: args.ha_sync_interval,
        bootstrap_timeout: args.ha_bootstrap_timeout,
        client_tls,
        server_tls: input.tls.map(TlsConfig::server_config),
        ..HaConfig::default()
    };
    let metrics = HaMetrics::register(registry);
    let peers = match args.ha_peer_list() {
        Some(list) => PeerSet::fixed(list),
        None => kube_peers(&input, registry, cancel.clone()).await?,
    };
    let states: Arc<dyn StateSource> = Arc::new(DirectorStates(input.director.clone()));
    let handle = llmsched_ha::start(
        config,
        listener,
        peers,
        states,
        input.store.clone() as Arc<dyn EndpointSource>,
        metrics,
        cancel,
    )
    .map_err(|e| EppError::Ha(e.to_string()))?;
    Ok(Arc::new(handle))
}

/// Peers from the Kubernetes API: the pods of this EPP's Deployment.
async fn kube_peers(
    input: &HaInputs<'_>,
    registry: &mut Registry,
    cancel: CancellationToken,
) -> Result<PeerSet, EppError> {
    let args = input.args;
    let pod = std::env::var("POD_NAME").ok().filter(|s| !s.is_empty());
    let Some(pod) = pod else {
        return Err(EppError::Ha(
            "--ha-mode=active-active without --ha-peers finds its peers through Kubernetes and needs env POD_NAME (this EPP's pod, from the downward API) and NAMESPACE; pass --ha-peers host:port,... otherwise".into(),
        ));
    };
    let client = match input.kube_client {
        Some(c) => c.clone(),
        None => llmsched_kube::discovery::client(args.kubeconfig.as_deref())
            .await
            .map_err(|e| {
                EppError::Ha(format!(
                    "--ha-mode=active-active without --ha-peers finds its peers through Kubernetes, and no Kubernetes client can be configured ({e}); pass --ha-peers host:port,..."
                ))
            })?,
    };
    let metrics = match &input.kube_metrics {
        Some(m) => m.clone(),
        None => llmsched_kube::metrics::KubeMetrics::register(registry),
    };
    // This pod's own namespace (the pool's may be another one).
    let namespace = std::env::var("NAMESPACE")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| args.resolved_namespace(None));
    let (set, tx) = PeerSet::dynamic(Vec::new());
    llmsched_kube::peers::start(
        client,
        llmsched_kube::peers::PeerDiscoveryConfig::new(namespace, pod, args.ha_port),
        metrics,
        Arc::new(move |peers| {
            tx.send_replace(peers);
        }),
        cancel,
    );
    Ok(set)
}

/// Readiness in active-active mode: SERVING once the endpoints are synced and the start-up
/// bootstrap from a peer's snapshot finished (warm, or cold after `--ha-bootstrap-timeout`
/// or when no peer has state).
pub(crate) fn spawn_readiness(
    health: HealthHandle,
    store: Arc<EndpointStore>,
    ha: Arc<HaHandle>,
    cancel: CancellationToken,
) {
    {
        let ha = ha.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = ha.bootstrap() => {}
            }
        });
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            health.set_synced(store.snapshot().synced && ha.is_bootstrapped());
        }
    });
}
