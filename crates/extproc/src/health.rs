//! gRPC health (`grpc.health.v1.Health`) on its own port.
//!
//! Services: `liveness` is always SERVING; `readiness`, `""` (overall) and
//! `envoy.service.ext_proc.v3.ExternalProcessor` are NOT_SERVING until the endpoint set is
//! synced, then SERVING (see [`HealthHandle::set_ready`] and [`spawn_readiness_watch`]).
//! On shutdown [`HealthHandle::set_draining`] turns them NOT_SERVING for good (liveness stays
//! SERVING) while the servers drain, so Kubernetes and Envoy stop sending new work at once.
//! Unknown services answer `NOT_FOUND`, as the standard health service does.

use std::sync::Arc;
use std::time::Duration;

use llmsched_core::endpoint::EndpointSource;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use llmsched_listener::Listener;

use crate::server::{ServeError, default_listener, tcp_incoming};

/// Liveness service name.
pub const LIVENESS: &str = "liveness";
/// Readiness service name.
pub const READINESS: &str = "readiness";
/// The ext_proc service name (Envoy's health check uses it).
pub const EXT_PROC: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

/// Services that follow readiness.
pub const READY_SERVICES: [&str; 3] = [READINESS, "", EXT_PROC];

/// Controls the health statuses. Cheap to clone.
#[derive(Debug, Clone)]
pub struct HealthHandle {
    reporter: HealthReporter,
    ready: Arc<std::sync::atomic::AtomicBool>,
    draining: Arc<std::sync::atomic::AtomicBool>,
}

impl HealthHandle {
    /// Live, not ready.
    pub async fn new() -> Self {
        let reporter = HealthReporter::new();
        reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        for s in READY_SERVICES {
            reporter
                .set_service_status(s, ServingStatus::NotServing)
                .await;
        }
        Self {
            reporter,
            ready: Arc::default(),
            draining: Arc::default(),
        }
    }

    /// Flips readiness (`readiness`, `""` and the ext_proc service). Ignored once draining.
    pub async fn set_ready(&self, ready: bool) {
        if self.is_draining() {
            return;
        }
        let prev = self.ready.swap(ready, std::sync::atomic::Ordering::AcqRel);
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for s in READY_SERVICES {
            self.reporter.set_service_status(s, status).await;
        }
        if prev != ready {
            tracing::info!(ready, "health: readiness changed");
        }
    }

    /// True when ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The EPP is shutting down: readiness, `""` and the ext_proc service answer
    /// NOT_SERVING from now on (liveness stays SERVING: the process is fine, it is leaving).
    pub async fn set_draining(&self) {
        if self
            .draining
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        self.ready
            .store(false, std::sync::atomic::Ordering::Release);
        for s in READY_SERVICES {
            self.reporter
                .set_service_status(s, ServingStatus::NotServing)
                .await;
        }
        tracing::info!("health: draining, readiness NOT_SERVING");
    }

    /// True once [`Self::set_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A gRPC service answering from this handle (can be added to several servers).
    pub fn service(&self) -> HealthServer<HealthService> {
        HealthServer::new(HealthService::from_health_reporter(self.reporter.clone()))
    }
}

/// Serves gRPC health on `listener` (plaintext, as the reference) until `shutdown`, with the
/// default connection limits; see [`serve_health_on`].
pub async fn serve_health(
    listener: TcpListener,
    handle: HealthHandle,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    serve_health_on(default_listener(listener, "health"), handle, shutdown).await
}

/// [`serve_health`] on a listener with its own limits.
pub async fn serve_health_on(
    listener: Listener,
    handle: HealthHandle,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let incoming = tcp_incoming(listener, shutdown.clone());
    tonic::transport::Server::builder()
        .layer(llmsched_listener::InflightLayer)
        .add_service(handle.service())
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .map_err(ServeError::Transport)
}

/// Polls `endpoints` every `interval` and sets readiness from `EndpointSet::synced`.
pub fn spawn_readiness_watch(
    handle: HealthHandle,
    endpoints: Arc<dyn EndpointSource>,
    interval: Duration,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let synced = endpoints.snapshot().synced;
            if last != Some(synced) {
                handle.set_ready(synced).await;
                last = Some(synced);
            }
        }
    })
}
