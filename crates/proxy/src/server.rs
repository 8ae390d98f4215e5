//! The listener: HTTP/1.1 and h2c (prior knowledge) on one port, one task per connection,
//! connection limits and timeouts (`llmsched-listener`), graceful shutdown.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use llmsched_director::Director;
use llmsched_listener::{GuardedBody, GuardedStream, Listener};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::handler::Proxy;
use crate::{ProxyError, ProxyOptions};

pub(crate) async fn serve(
    listener: TcpListener,
    director: Arc<Director>,
    options: ProxyOptions,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    let addr = listener.local_addr()?;
    let grace = options.shutdown_grace;
    let baseline = options.baseline;
    let listener = Listener::new(
        listener,
        "proxy",
        options.limits,
        options.listener_metrics.clone(),
    );
    let proxy = Arc::new(Proxy::new(director, options));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(listener.limits().header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .max_concurrent_streams(1024)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let graceful = GracefulShutdown::new();
    let mut conns = JoinSet::new();
    tracing::info!(%addr, ?baseline, limits = ?listener.limits(), "OpenAI proxy listening");
    loop {
        let (stream, peer, slot) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let conn_handle = slot.handle();
        let proxy = proxy.clone();
        let svc = service_fn(move |req| {
            // The request is in flight (never idle) until its response body ends.
            let guard = conn_handle.request_started();
            let proxy = proxy.clone();
            async move {
                let resp = proxy.handle(req).await;
                Ok::<_, Infallible>(resp.map(|b| GuardedBody::new(b, Some(guard))))
            }
        });
        let conn = builder
            .serve_connection(TokioIo::new(GuardedStream::new(stream, slot)), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        conns.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "proxy connection ended with an error");
            }
        });
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    tracing::info!(open = graceful.count(), grace = ?grace, "OpenAI proxy draining: no new connections; open requests may finish");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace = ?grace, "proxy connections still open after the drain timeout; closing them");
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    Ok(())
}
