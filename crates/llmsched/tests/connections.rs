//! The built-in proxy against hostile or broken peers, configured with `llmsched epp`'s
//! flags: idle connections never starve real requests (the case, with a small
//! `--max-connections`), a client that connects and sends nothing or stalls its body is
//! disconnected, a replica that accepts and never answers gets a 504 after
//! `--proxy-upstream-timeout`, and a response that stalls mid-stream is cut. Real sockets
//! and a real simulator process; nothing timed (each wait polls with a generous deadline).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// True once the server closed `s` (EOF or reset); what it sent before.
async fn read_until_closed(s: &mut TcpStream) -> Option<String> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&all).into_owned()),
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_and_stalled_clients_never_starve_real_requests() {
    init_logs();
    let sim = SimProc::start("127.0.0.81", 10.0).await;
    let epp = start_epp(
        &[sim.addr],
        &[
            "--max-connections=16",
            "--request-header-timeout=500ms",
            "--connection-idle-timeout=500ms",
            "--request-body-timeout=500ms",
        ],
    )
    .await;
    wait_until("the replica healthy", || healthy(&epp, sim.addr)).await;
    let proxy = epp.proxy_addr.unwrap();

    // Connects and sends nothing: disconnected.
    let mut silent = TcpStream::connect(proxy).await.unwrap();
    assert!(read_until_closed(&mut silent).await.is_some());
    // Sends its headers, then stalls its body: 408, then disconnected.
    let mut stalled = TcpStream::connect(proxy).await.unwrap();
    stalled
        .write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"model\":")
        .await
        .unwrap();
    let reply = read_until_closed(&mut stalled).await.expect("closed");
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");

    // Twice the limit of idle connections (the starvation case) ...
    let mut idle = Vec::new();
    for _ in 0..32 {
        idle.push(TcpStream::connect(proxy).await.unwrap());
    }
    // ... and real requests are still served, at once (idle ones make room).
    for i in 0..5 {
        let (status, body) = post_whole(
            proxy,
            completion(&unique_prompt(&format!("real-{i}")), 4, false),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let (_, m) = get(epp.metrics_addr, "/metrics").await.unwrap();
    assert!(
        metric(
            &m,
            "llmsched_listener_connections_closed_total{listener=\"proxy\",reason=\"evicted\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "llmsched_listener_connections_closed_total{listener=\"proxy\",reason=\"header_timeout\"}"
        ) + metric(
            &m,
            "llmsched_listener_connections_closed_total{listener=\"proxy\",reason=\"idle_timeout\"}"
        ) >= 1.0,
        "{m}"
    );
    drop(idle);
    epp.shutdown().await;
}

/// The case: an EPP limited to 256 file descriptors, 300 idle connections to its
/// proxy. Accepting fails (out of descriptors) and real requests used to wait until the
/// client gave up; now an idle connection is closed for each one that must get in. The
/// timeouts are made long so that only this can save the real requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_exhausting_file_descriptors_do_not_starve_real_requests() {
    init_logs();
    let sim = SimProc::start("127.0.0.84", 10.0).await;
    let epp = EppProc::start_limited(
        &[sim.addr],
        &[
            "--request-header-timeout=10m",
            "--connection-idle-timeout=10m",
        ],
        Some(256),
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(epp.proxy).await.unwrap());
    }
    for i in 0..5 {
        let (status, body) = tokio::time::timeout(
            DEADLINE,
            post_whole(
                epp.proxy,
                completion(&unique_prompt(&format!("fd-{i}")), 4, false),
                &[],
            ),
        )
        .await
        .expect("a real request is served while idle connections hold the descriptors")
        .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let (_, m) = get(epp.metrics, "/metrics").await.unwrap();
    assert!(
        metric(
            &m,
            "llmsched_listener_connections_rejected_total{listener=\"proxy\",reason=\"accept_error\"}"
        ) >= 1.0,
        "the descriptors ran out: {m}"
    );
    assert!(
        metric(
            &m,
            "llmsched_listener_connections_closed_total{listener=\"proxy\",reason=\"evicted\"}"
        ) >= 1.0,
        "{m}"
    );
    drop(idle);
}

/// A model server that serves `/metrics` (so it is healthy) and, for completions, either
/// never answers (`hang`) or sends its headers and one SSE event and then stalls.
async fn broken_replica(ip: &str, hang: bool) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let svc = hyper::service::service_fn(
                move |req: http::Request<hyper::body::Incoming>| async move {
                    if req.uri().path() == "/metrics" {
                        let page = "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine=\"0\"} 0\n# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{engine=\"0\"} 0\n# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine=\"0\"} 0\n";
                        let body = http_body_util::Full::new(Bytes::from(page))
                            .map_err(|e: Infallible| match e {})
                            .boxed();
                        return Ok::<_, Infallible>(http::Response::new(body));
                    }
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    let first = futures_like::once_then_pending(Bytes::from_static(
                        b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n",
                    ));
                    let mut resp = http::Response::new(first.boxed());
                    resp.headers_mut().insert(
                        "content-type",
                        http::HeaderValue::from_static("text/event-stream"),
                    );
                    Ok(resp)
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
            );
        }
    });
    addr
}

/// A body that yields one frame and then never ends.
mod futures_like {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use http_body::{Body, Frame};

    pub struct OnceThenPending(Option<Bytes>);

    pub fn once_then_pending(b: Bytes) -> OnceThenPending {
        OnceThenPending(Some(b))
    }

    impl Body for OnceThenPending {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.0.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Poll::Pending,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_never_answers_gets_504_and_a_stalled_stream_is_cut() {
    init_logs();
    let hung = broken_replica("127.0.0.82", true).await;
    let stalls = broken_replica("127.0.0.83", false).await;
    for (replica, streaming) in [(hung, false), (stalls, true)] {
        let epp = start_epp(&[replica], &["--proxy-upstream-timeout=500ms"]).await;
        wait_until("the replica healthy", || healthy(&epp, replica)).await;
        let proxy = epp.proxy_addr.unwrap();
        let body = completion("hello", 4, streaming);
        if !streaming {
            let (status, text) = post_whole(proxy, body, &[]).await.unwrap();
            assert_eq!((status, text.as_str()), (504, "upstream request timeout"));
        } else {
            let resp = post(proxy, body, &[]).await.unwrap();
            assert_eq!(resp.status(), 200);
            let collected = resp.into_body().collect().await;
            assert!(
                collected.is_err(),
                "the stalled stream is cut, not ended cleanly"
            );
        }
        // Either way the endpoint was reported failing (a timeout) and taken out.
        let (_, m) = get(epp.metrics_addr, "/metrics").await.unwrap();
        let e = format!("endpoint=\"{replica}\"");
        assert!(
            m.contains(&format!(
                "llmsched_endpoint_failures_total{{{e},kind=\"timeout\"}} 1"
            )),
            "{m}"
        );
        assert!(
            m.contains(&format!(
                "llmsched_endpoint_health_transitions_total{{{e},to=\"unhealthy\"}} 1"
            )),
            "{m}"
        );
        epp.shutdown().await;
    }
}
