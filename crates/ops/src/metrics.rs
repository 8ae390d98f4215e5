//! The Prometheus `/metrics` endpoint: `GET` (or `HEAD`) `/metrics` answers the OpenMetrics
//! text of the shared registry over HTTP/1.1, under the listener's limits (its header
//! timeout is also the HTTP/1.1 header read timeout). With an authorizer
//! (`--metrics-endpoint-auth`), every request is reviewed first: see [`crate::metrics_auth`].

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use llmsched_listener::{GuardedBody, GuardedStream, Listener};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ServeError;
use crate::accept::default_listener;
use crate::metrics_auth::{
    MetricsAuthDecision, MetricsAuthRequest, MetricsAuthorizer, bearer_token,
};

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
