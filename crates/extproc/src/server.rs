//! Listeners: the ext_proc gRPC server (TLS or plaintext) and the Prometheus `/metrics`
//! endpoint.
//!
//! Every listener runs under `llmsched-listener`'s limits: a connection limit (idle
//! connections make room for new ones), a header timeout (a connection that sends nothing,
//! or stalls in its TLS handshake or HTTP/2 preface, is closed) and an idle timeout (no
//! request in flight). The `*_on` functions take a configured
//! [`llmsched_listener::Listener`]; the plain ones wrap a `TcpListener` with the default
//! limits.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use llmsched_director::Director;
use llmsched_listener::{
    CloseReason, GuardedBody, GuardedStream, InflightLayer, Limits, Listener, ListenerMetrics,
};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::health::HealthHandle;
use crate::metrics_auth::{
    MetricsAuthDecision, MetricsAuthRequest, MetricsAuthorizer, bearer_token,
};
use crate::service::{ExtProcOptions, ExtProcService};
use crate::tls::TlsConfig;

/// Largest ext_proc message accepted from Envoy.
const MAX_MESSAGE: usize = 64 << 20;
/// A TLS handshake must finish within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// `tcp` under the default limits, named `name`.
pub(crate) fn default_listener(tcp: TcpListener, name: &'static str) -> Listener {
    Listener::new(tcp, name, Limits::default(), ListenerMetrics::default())
}

async fn accept_loop<F, Fut, T>(
    listener: Listener,
    shutdown: CancellationToken,
    tx: tokio::sync::mpsc::Sender<Result<GuardedStream<T>, std::io::Error>>,
    wrap: F,
) where
    F: Fn(TcpStream, tokio::time::Instant) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<T, Option<CloseReason>>> + Send + 'static,
    T: Send + 'static,
{
    let wrap = Arc::new(wrap);
    loop {
        let (sock, peer, slot) = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tx.closed() => return,
            a = listener.accept() => a,
        };
        let tx = tx.clone();
        let wrap = wrap.clone();
        tokio::spawn(async move {
            match wrap(sock, slot.header_deadline()).await {
                Ok(conn) => {
                    let _ = tx.send(Ok(GuardedStream::new(conn, slot))).await;
                }
                Err(reason) => {
                    if let Some(r) = reason {
                        slot.closed_for(r);
                    }
                    tracing::debug!(%peer, "connection dropped before serving");
                }
            }
        });
    }
}

/// Accepted plaintext connections (TCP_NODELAY set), under `listener`'s limits.
pub(crate) fn tcp_incoming(
    listener: Listener,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<GuardedStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(accept_loop(
        listener,
        shutdown,
        tx,
        |s, _| async move { Ok(s) },
    ));
    ReceiverStream::new(rx)
}

/// Accepted TLS connections; handshakes run concurrently, bounded by the connection's
/// header timeout (and at most 10 s); failures are only logged, timeouts also counted.
fn tls_incoming(
    listener: Listener,
    acceptor: TlsAcceptor,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<GuardedStream<TlsStream<TcpStream>>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(accept_loop(listener, shutdown, tx, move |s, deadline| {
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
    }));
    ReceiverStream::new(rx)
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

/// Content type of the OpenMetrics text exposition.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn reply(
    status: StatusCode,
    ctype: &str,
    body: String,
) -> Result<Response<Full<bytes::Bytes>>, Infallible> {
    let mut r = Response::new(Full::new(bytes::Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    Ok(r)
}

/// Applies `--metrics-endpoint-auth`: `None` lets the request through, `Some` is the answer.
async fn check_auth(
    auth: &dyn MetricsAuthorizer,
    req: &Request<Incoming>,
) -> Option<Result<Response<Full<bytes::Bytes>>, Infallible>> {
    let text = "text/plain; charset=utf-8";
    let Some(token) = bearer_token(req.headers().get(http::header::AUTHORIZATION)) else {
        tracing::debug!(path = req.uri().path(), "metrics: no bearer token: 401");
        return Some(reply(
            StatusCode::UNAUTHORIZED,
            text,
            "Unauthorized\n".into(),
        ));
    };
    let verb = req.method().as_str().to_ascii_lowercase();
    let request = MetricsAuthRequest {
        token,
        verb: &verb,
        path: req.uri().path(),
    };
    match auth.authorize(request).await {
        Ok(MetricsAuthDecision::Allowed { user }) => {
            tracing::trace!(%user, "metrics: request allowed");
            None
        }
        Ok(MetricsAuthDecision::Unauthenticated) => {
            tracing::debug!("metrics: bearer token not authenticated: 401");
            Some(reply(
                StatusCode::UNAUTHORIZED,
                text,
                "Unauthorized\n".into(),
            ))
        }
        Ok(MetricsAuthDecision::Denied { user, reason }) => {
            tracing::debug!(%user, %reason, verb, path = request.path, "metrics: authorization denied: 403");
            Some(reply(
                StatusCode::FORBIDDEN,
                text,
                format!("Authorization denied for user {user}\n"),
            ))
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics: cannot review the request's bearer token: 500");
            let body = match &e {
                crate::metrics_auth::MetricsAuthError::Authentication(_) => {
                    "Authentication failed\n".to_string()
                }
                crate::metrics_auth::MetricsAuthError::Authorization { user, .. } => {
                    format!("Authorization for user {user} failed\n")
                }
            };
            Some(reply(StatusCode::INTERNAL_SERVER_ERROR, text, body))
        }
    }
}

async fn metrics_handler(
    registry: Arc<Registry>,
    auth: Option<Arc<dyn MetricsAuthorizer>>,
    req: Request<Incoming>,
) -> Result<Response<Full<bytes::Bytes>>, Infallible> {
    if let Some(auth) = &auth
        && let Some(answer) = check_auth(auth.as_ref(), &req).await
    {
        return answer;
    }
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
    }
    let mut out = String::with_capacity(16 * 1024);
    match prometheus_client::encoding::text::encode(&mut out, &registry) {
        Ok(()) => reply(StatusCode::OK, OPENMETRICS_CONTENT_TYPE, out),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("encoding metrics failed: {e}\n"),
        ),
    }
}

/// Serves `GET /metrics` (OpenMetrics text of `registry`) over HTTP/1.1 on `listener` until
/// `shutdown`, to anyone, with the default connection limits; see [`serve_metrics_on`].
pub async fn serve_metrics(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    serve_metrics_with_auth(listener, registry, None, shutdown).await
}

/// [`serve_metrics`], with every request reviewed by `auth` when given
/// (`--metrics-endpoint-auth`; see [`crate::metrics_auth`] for the answers).
pub async fn serve_metrics_with_auth(
    listener: TcpListener,
    registry: Arc<Registry>,
    auth: Option<Arc<dyn MetricsAuthorizer>>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    serve_metrics_on(
        default_listener(listener, "metrics"),
        registry,
        auth,
        shutdown,
    )
    .await
}

/// [`serve_metrics_with_auth`] on a listener with its own limits (its header timeout is also
/// the HTTP/1.1 header read timeout).
pub async fn serve_metrics_on(
    listener: Listener,
    registry: Arc<Registry>,
    auth: Option<Arc<dyn MetricsAuthorizer>>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let header_timeout = listener.limits().header_timeout;
    loop {
        let (sock, _, slot) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            a = listener.accept() => a,
        };
        let registry = registry.clone();
        let auth = auth.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let conn_handle = slot.handle();
            let svc = hyper::service::service_fn(move |req| {
                let guard = conn_handle.request_started();
                let registry = registry.clone();
                let auth = auth.clone();
                async move {
                    let resp = metrics_handler(registry, auth, req).await?;
                    Ok::<_, Infallible>(resp.map(|b| GuardedBody::new(b, Some(guard))))
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(
                hyper_util::rt::TokioIo::new(GuardedStream::new(sock, slot)),
                svc,
            );
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "metrics connection failed");
                },
                _ = shutdown.cancelled() => {}
            }
        });
    }
}
