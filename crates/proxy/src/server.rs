//! The listener: HTTP/1.1 and h2c (prior knowledge) on one port, one task per connection,
//! graceful shutdown.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use llmsched_director::Director;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::handler::Proxy;
use crate::{ProxyError, ProxyOptions};

/// A client must send its request headers within this time (slow-loris protection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) async fn serve(
    listener: TcpListener,
    director: Arc<Director>,
    options: ProxyOptions,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    let addr = listener.local_addr()?;
    let grace = options.shutdown_grace;
    let baseline = options.baseline;
    let proxy = Arc::new(Proxy::new(director, options));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .max_concurrent_streams(1024)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let graceful = GracefulShutdown::new();
    let mut conns = JoinSet::new();
    tracing::info!(%addr, ?baseline, "OpenAI proxy listening");
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly, keep serving.
                    tracing::warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let svc = service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
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
    tracing::info!(open = graceful.count(), "OpenAI proxy shutting down");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace = ?grace, "proxy connections still open after the grace period; closing them");
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    Ok(())
}
