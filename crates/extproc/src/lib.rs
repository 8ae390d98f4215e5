//! # llmsched-extproc
//!
//! The EPP's Envoy-facing side: the `envoy.service.ext_proc.v3.ExternalProcessor` gRPC
//! service (tonic + `envoy-types`) over a [`llmsched_director::Director`] and TLS for it
//! (self-signed by default, `--cert-path` with optional reload). Health, readiness and
//! `/metrics` live in `llmsched-ops`; with `--health-checking` the ext_proc port also serves
//! `llmsched-ops`' gRPC health service.
//!
//! The EPP runtime wires it like this:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # async fn demo(director: Arc<llmsched_director::Director>) -> Result<(), Box<dyn std::error::Error>> {
//! use llmsched_extproc::*;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let tls = Some(TlsConfig::self_signed()?); // or from_cert_dir(path, reload), or None
//! let grpc = tokio::net::TcpListener::bind("0.0.0.0:9002").await?;
//! // Some(health handle) also serves gRPC health on this port (--health-checking).
//! serve_ext_proc(grpc, director, tls, None, ExtProcOptions::default(), shutdown.clone()).await?;
//! # Ok(()) }
//! ```
//!
//! * [`service`] — the ext_proc stream state machine;
//! * [`messages`] — building and reading ext_proc messages (chunking at 62,000 bytes,
//!   immediate responses, metadata);
//! * [`tls`], [`server`].

pub mod messages;
pub mod server;
pub mod service;
pub mod tls;

#[cfg(feature = "test-util")]
pub mod testing;

pub use llmsched_listener::{Limits, Listener, ListenerMetrics};
pub use server::{ServeError, serve_ext_proc, serve_ext_proc_on};
pub use service::{ExtProcOptions, ExtProcService};
pub use tls::{TlsConfig, TlsError};
