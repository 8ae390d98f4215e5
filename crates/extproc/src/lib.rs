//! # llmsched-extproc
//!
//! The EPP's Envoy-facing side: the `envoy.service.ext_proc.v3.ExternalProcessor` gRPC
//! service (tonic + `envoy-types`) over a [`llmsched_director::Director`], TLS for it
//! (self-signed by default, `--cert-path` with optional reload), the gRPC health service and
//! a small Prometheus `/metrics` HTTP server.
//!
//! The EPP runtime wires it like this:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # async fn demo(director: Arc<llmsched_director::Director>,
//! #     endpoints: Arc<dyn llmsched_core::EndpointSource>,
//! #     registry: Arc<prometheus_client::registry::Registry>) -> Result<(), Box<dyn std::error::Error>> {
//! use llmsched_extproc::*;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let health = HealthHandle::new(); // with_leader_election(true) under --ha-enable-leader-election
//! spawn_readiness_watch(health.clone(), endpoints, std::time::Duration::from_millis(100), shutdown.clone());
//! let tls = Some(TlsConfig::self_signed()?); // or from_cert_dir(path, reload), or None
//! let grpc = tokio::net::TcpListener::bind("0.0.0.0:9002").await?;
//! let hl = tokio::net::TcpListener::bind("0.0.0.0:9003").await?;
//! let ml = tokio::net::TcpListener::bind("0.0.0.0:9090").await?;
//! tokio::try_join!(
//!     serve_ext_proc(grpc, director, tls, None, ExtProcOptions::default(), shutdown.clone()),
//!     serve_health(hl, health, shutdown.clone()),
//!     serve_metrics(ml, registry, shutdown.clone()),
//! )?;
//! # Ok(()) }
//! ```
//!
//! * [`service`] — the ext_proc stream state machine;
//! * [`messages`] — building and reading ext_proc messages (chunking at 62,000 bytes,
//!   immediate responses, metadata);
//! * [`tls`], [`health`], [`server`], [`metrics_auth`] (the `/metrics` auth seam).

pub mod health;
pub mod messages;
pub mod metrics_auth;
pub mod server;
pub mod service;
pub mod tls;

#[cfg(feature = "test-util")]
pub mod testing;

pub use health::{HealthHandle, HealthState, serve_health, serve_health_on, spawn_readiness_watch};
pub use llmsched_listener::{Limits, Listener, ListenerMetrics};
pub use metrics_auth::{
    MetricsAuthDecision, MetricsAuthError, MetricsAuthRequest, MetricsAuthorizer,
};
pub use server::{
    ServeError, serve_ext_proc, serve_ext_proc_on, serve_metrics, serve_metrics_on,
    serve_metrics_with_auth,
};
pub use service::{ExtProcOptions, ExtProcService};
pub use tls::{TlsConfig, TlsError};
