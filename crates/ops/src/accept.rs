//! Accepted connections under a [`Listener`]'s limits, as the stream tonic's
//! `serve_with_incoming_shutdown` takes: each connection is prepared on its own task (a TLS
//! handshake, bounded by the connection's header deadline) so a slow client never holds up
//! the others.

use std::sync::Arc;

use llmsched_listener::{CloseReason, GuardedStream, Limits, Listener, ListenerMetrics};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// `tcp` under the default limits, named `name`.
pub fn default_listener(tcp: TcpListener, name: &'static str) -> Listener {
    Listener::new(tcp, name, Limits::default(), ListenerMetrics::default())
}

/// Connections accepted on `listener` until `shutdown` (or the stream is dropped), each
/// turned into a `T` by `wrap(socket, header_deadline)` on its own task. `wrap` failing with
/// `Some(reason)` records why the connection was closed; with `None` it is only logged.
pub fn incoming<F, Fut, T>(
    listener: Listener,
    shutdown: CancellationToken,
    wrap: F,
) -> ReceiverStream<Result<GuardedStream<T>, std::io::Error>>
where
    F: Fn(TcpStream, tokio::time::Instant) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<T, Option<CloseReason>>> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(accept_loop(listener, shutdown, tx, wrap));
    ReceiverStream::new(rx)
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

/// Accepted plaintext connections, under `listener`'s limits.
pub fn tcp_incoming(
    listener: Listener,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<GuardedStream<TcpStream>, std::io::Error>> {
    incoming(listener, shutdown, |s, _| async move { Ok(s) })
}
