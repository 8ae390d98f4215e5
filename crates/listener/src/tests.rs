//! Real sockets on loopback, a real hyper HTTP/1.1 server on guarded streams. Nothing is
//! timed: each test waits for the expected state with a generous deadline.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// A server on `listener`: `GET /slow` waits for a permit of `gate`, anything else answers
/// at once.
fn serve(listener: Listener, gate: Arc<Semaphore>) -> Arc<Listener> {
    let listener = Arc::new(listener);
    let l = listener.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _, slot) = l.accept().await;
            let conn = slot.handle();
            let io = GuardedStream::new(tcp, slot);
            let gate = gate.clone();
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let guard = conn.request_started();
                let gate = gate.clone();
                async move {
                    if req.uri().path() == "/slow" {
                        let _permit = gate.acquire().await.unwrap();
                    }
                    Ok::<_, Infallible>(http::Response::new(GuardedBody::new(
                        Full::new(Bytes::from_static(b"ok")),
                        Some(guard),
                    )))
                }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(l.limits().header_timeout);
            tokio::spawn(b.serve_connection(TokioIo::new(io), svc));
        }
    });
    listener
}

async fn start(limits: Limits) -> (Arc<Listener>, ListenerMetrics, Arc<Semaphore>) {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = ListenerMetrics::default();
    let gate = Arc::new(Semaphore::new(0));
    let l = serve(
        Listener::new(tcp, "test", limits, metrics.clone()),
        gate.clone(),
    );
    (l, metrics, gate)
}

/// Sends `GET path` on a new connection and returns it once the response head arrived
/// (`/slow` returns before any response: its request is in flight).
async fn request(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    if path != "/slow" {
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    }
    s
}

/// True once the server closed `s` (EOF or reset), reading and discarding what it sent.
async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed_and_counted() {
    let limits = Limits {
        max_connections: 100,
        header_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(300),
    };
    let (l, m, _gate) = start(limits).await;
    let addr = l.local_addr().unwrap();
    // Connects and sends nothing.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Sends half a request head and stalls.
    let mut slow_head = TcpStream::connect(addr).await.unwrap();
    slow_head.write_all(b"GET / HTTP/1.1\r\nhos").await.unwrap();
    // A whole request, then keep-alive idle.
    let mut idle = request(addr, "/").await;
    assert!(closed_by_server(&mut silent).await);
    assert!(closed_by_server(&mut slow_head).await);
    assert!(closed_by_server(&mut idle).await);
    wait_for("the closes to be counted", || {
        m.closed("test", CloseReason::HeaderTimeout) >= 1 && m.open("test") == 0
    })
    .await;
    assert_eq!(l.open_connections(), 0);
}

#[tokio::test]
async fn a_request_in_flight_is_never_idle() {
    let limits = Limits {
        max_connections: 100,
        header_timeout: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(100),
    };
    let (l, m, gate) = start(limits).await;
    let mut busy = request(l.local_addr().unwrap(), "/slow").await;
    // Several idle timeouts pass while the request waits (the timer re-checks each one).
    let idle_closes = || m.closed("test", CloseReason::IdleTimeout);
    let probe = request(l.local_addr().unwrap(), "/").await;
    let mut probe = probe;
    assert!(
        closed_by_server(&mut probe).await,
        "the idle probe is closed"
    );
    wait_for("the probe's close to be counted", || idle_closes() >= 1).await;
    gate.add_permits(1);
    let mut buf = [0u8; 1024];
    let n = busy.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
}

#[tokio::test]
async fn at_the_limit_idle_connections_make_room_and_busy_ones_do_not() {
    let limits = Limits {
        max_connections: 2,
        header_timeout: Duration::from_secs(600),
        idle_timeout: Duration::from_secs(600),
    };
    let (l, m, gate) = start(limits).await;
    let addr = l.local_addr().unwrap();
    // Two idle connections fill the listener; a third client is still served.
    let _a = TcpStream::connect(addr).await.unwrap();
    let _b = TcpStream::connect(addr).await.unwrap();
    wait_for("two open connections", || l.open_connections() == 2).await;
    let _c = request(addr, "/").await;
    assert_eq!(m.closed("test", CloseReason::Evicted), 1);
    // Two requests in flight fill it with busy connections: a third is refused.
    drop((_a, _b, _c));
    wait_for("the others to go", || l.open_connections() == 0).await;
    let mut busy1 = request(addr, "/slow").await;
    let mut busy2 = request(addr, "/slow").await;
    wait_for("two requests in flight", || l.open_connections() == 2).await;
    let start = std::time::Instant::now();
    while l
        .shared
        .conns
        .lock()
        .values()
        .map(|c| c.inflight.load(Ordering::Acquire))
        .sum::<u32>()
        < 2
    {
        assert!(start.elapsed() < DEADLINE);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut refused = TcpStream::connect(addr).await.unwrap();
    let _ = refused
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    assert!(closed_by_server(&mut refused).await);
    wait_for("the refusal to be counted", || {
        m.rejected_at_limit("test") == 1
    })
    .await;
    // The busy ones finish normally.
    gate.add_permits(2);
    for s in [&mut busy1, &mut busy2] {
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
}
