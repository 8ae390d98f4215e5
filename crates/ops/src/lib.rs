//! # llmsched-ops
//!
//! What operators and orchestrators talk to, whatever the transport serving requests (the
//! Envoy ext_proc server, the built-in proxy, or both): gRPC health with the reference's
//! answers (liveness, readiness, leader-aware), readiness following the endpoint store, and
//! the Prometheus `/metrics` HTTP server with its authorization seam. The composition root
//! (`llmsched-epp`) wires it; `llmsched-extproc` only borrows the health service to also
//! serve it on the ext_proc port (`--health-checking`), and `llmsched-kube` implements
//! [`MetricsAuthorizer`].
//!
//! ```no_run
//! # use std::sync::Arc;
//! # async fn demo(endpoints: Arc<dyn llmsched_core::EndpointSource>,
//! #     registry: Arc<prometheus_client::registry::Registry>) -> Result<(), Box<dyn std::error::Error>> {
//! use llmsched_ops::*;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let health = HealthHandle::new(); // with_leader_election(true) under --ha-enable-leader-election
//! spawn_readiness_watch(health.clone(), endpoints, std::time::Duration::from_millis(100), shutdown.clone());
//! let hl = tokio::net::TcpListener::bind("0.0.0.0:9003").await?;
//! let ml = tokio::net::TcpListener::bind("0.0.0.0:9090").await?;
//! tokio::try_join!(
//!     serve_health(hl, health, shutdown.clone()),
//!     serve_metrics(ml, registry, shutdown.clone()),
//! )?;
//! # Ok(()) }
//! ```
//!
//! * [`health`] — `grpc.health.v1.Health` and the readiness watch;
//! * [`metrics`] — the `/metrics` server;
//! * [`metrics_auth`] — the `/metrics` authorization seam (`--metrics-endpoint-auth`);
//! * [`accept`] — accepted connections under `llmsched-listener`'s limits, as a stream for
//!   tonic servers (also used by the ext_proc server).

pub mod accept;
pub mod health;
pub mod metrics;
pub mod metrics_auth;

pub use accept::{default_listener, incoming, tcp_incoming};
pub use health::{HealthHandle, HealthState, serve_health, serve_health_on, spawn_readiness_watch};
pub use llmsched_listener::{Limits, Listener, ListenerMetrics};
pub use metrics::{
    OPENMETRICS_CONTENT_TYPE, serve_metrics, serve_metrics_on, serve_metrics_with_auth,
};
pub use metrics_auth::{
    MetricsAuthDecision, MetricsAuthError, MetricsAuthRequest, MetricsAuthorizer,
};

/// A server that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The gRPC transport failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Socket trouble.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}
