//! The ext_proc gRPC server (TLS or plaintext) on its listener. Health and `/metrics` are
//! `llmsched-ops`'.
//!
//! Every listener runs under `llmsched-listener`'s limits: a connection limit (idle
//! connections make room for new ones), a header timeout (a connection that sends nothing,
//! or stalls in its TLS handshake or HTTP/2 preface, is closed) and an idle timeout (no
//! request in flight). The `*_on` functions take a configured
//! [`llmsched_listener::Listener`]; the plain ones wrap a `TcpListener` with the default
//! limits.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use llmsched_director::Director;
use llmsched_listener::{CloseReason, GuardedStream, InflightLayer, Listener};
use llmsched_ops::{HealthHandle, default_listener, incoming, tcp_incoming};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

pub use llmsched_ops::ServeError;

use crate::service::{ExtProcOptions, ExtProcService};
use crate::tls::TlsConfig;

/// Largest ext_proc message accepted from Envoy.
const MAX_MESSAGE: usize = 64 << 20;
/// A TLS handshake must finish within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted TLS connections; handshakes run concurrently, bounded by the connection's
/// header timeout (and at most 10 s); failures are only logged, timeouts also counted.
fn tls_incoming(
    listener: Listener,
    acceptor: TlsAcceptor,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<GuardedStream<TlsStream<TcpStream>>, std::io::Error>> {
    incoming(listener, shutdown, move |s, deadline| {
        let acceptor = acceptor.clone();
        let deadline = deadline.min(tokio::time::Instant::now() + HANDSHAKE_TIMEOUT);
        async move {
            match tokio::time::timeout_at(deadline, acceptor.accept(s)).await {
                Ok(Ok(tls)) => Ok(tls),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    Err(None)
                }
                Err(_) => Err(Some(CloseReason::HeaderTimeout)),
            }
        }
    })
}

/// Serves `envoy.service.ext_proc.v3.ExternalProcessor` on `listener` until `shutdown`:
/// over TLS when `tls` is given (the default of the EPP), else plaintext. With `health`, the
/// gRPC health service is served on this port too (the reference's `--health-checking`).
/// Default connection limits; see [`serve_ext_proc_on`].
pub async fn serve_ext_proc(
    listener: TcpListener,
    director: Arc<Director>,
    tls: Option<TlsConfig>,
    health: Option<HealthHandle>,
    options: ExtProcOptions,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let listener = default_listener(listener, "ext_proc");
    serve_ext_proc_on(listener, director, tls, health, options, shutdown).await
}

/// [`serve_ext_proc`] on a listener with its own limits. On `shutdown` it stops accepting
/// connections and streams (HTTP/2 GOAWAY) and returns once the open streams have finished.
pub async fn serve_ext_proc_on(
    listener: Listener,
    director: Arc<Director>,
    tls: Option<TlsConfig>,
    health: Option<HealthHandle>,
    options: ExtProcOptions,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let svc = ExternalProcessorServer::new(ExtProcService::new(director, options))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let mut builder = tonic::transport::Server::builder()
        .http2_adaptive_window(Some(true))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        // Streams in flight keep their connection from counting as idle.
        .layer(InflightLayer);
    let router = match health {
        Some(h) => builder
            .add_service(svc)
            .add_service(h.service(shutdown.clone())),
        None => builder.add_service(svc),
    };
    let signal = shutdown.clone().cancelled_owned();
    match tls {
        Some(tls) => {
            tls.spawn_reloader(shutdown.clone());
            let acceptor = TlsAcceptor::from(tls.server_config());
            router
                .serve_with_incoming_shutdown(tls_incoming(listener, acceptor, shutdown), signal)
                .await?
        }
        None => {
            router
                .serve_with_incoming_shutdown(tcp_incoming(listener, shutdown), signal)
                .await?
        }
    }
    Ok(())
}
