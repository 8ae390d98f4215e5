//! Connection limits and timeouts of the ext_proc (plaintext and TLS), health and metrics
//! listeners, with real sockets and real clients: a client that connects and sends nothing
//! is disconnected, idle connections never starve real requests, a stream in flight is
//! never idle, and draining turns readiness off for good. Nothing is timed: each wait polls
//! for the expected state with a generous deadline.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use llmsched_director::testing::*;
use llmsched_extproc::testing::*;
use llmsched_extproc::*;
use llmsched_listener::CloseReason;
use llmsched_ops::{HealthHandle, serve_health_on, serve_metrics_on};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const DEADLINE: Duration = Duration::from_secs(30);

fn short() -> Limits {
    Limits {
        max_connections: 100,
        header_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(200),
    }
}

fn crowded() -> Limits {
    // Long timeouts: only the limit (and eviction) matters.
    Limits {
        max_connections: 8,
        header_timeout: Duration::from_secs(600),
        idle_timeout: Duration::from_secs(600),
    }
}

async fn bind(name: &'static str, limits: Limits, metrics: &ListenerMetrics) -> Listener {
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Listener::new(tcp, name, limits, metrics.clone())
}

/// True once the server closed the connection (EOF or reset).
async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// The three servers, each on its own listener with `limits`.
struct Servers {
    ext_proc: SocketAddr,
    ext_proc_tls: SocketAddr,
    tls_ca: Vec<u8>,
    health: SocketAddr,
    metrics: SocketAddr,
    handle: HealthHandle,
    listener_metrics: ListenerMetrics,
    shutdown: CancellationToken,
}

impl Servers {
    async fn start(limits: Limits) -> Self {
        let m = ListenerMetrics::default();
        let shutdown = CancellationToken::new();
        let director = Arc::new(
            llmsched_director::Director::builder(basic_config(1, ""), endpoints(2)).build(),
        );
        let (plain, tls_l, health_l, metrics_l) = (
            bind("ext_proc", limits, &m).await,
            bind("ext_proc_tls", limits, &m).await,
            bind("health", limits, &m).await,
            bind("metrics", limits, &m).await,
        );
        let (ext_proc, ext_proc_tls, health, metrics) = (
            plain.local_addr().unwrap(),
            tls_l.local_addr().unwrap(),
            health_l.local_addr().unwrap(),
            metrics_l.local_addr().unwrap(),
        );
        let tls = TlsConfig::self_signed().unwrap();
        let tls_ca = tls.certificate_pem().to_vec();
        let handle = HealthHandle::new();
        handle.set_ready(true);
        let registry = Arc::new(prometheus_client::registry::Registry::default());
        let s = shutdown.clone();
        tokio::spawn(serve_ext_proc_on(
            plain,
            director.clone(),
            None,
            None,
            ExtProcOptions::default(),
            s.clone(),
        ));
        tokio::spawn(serve_ext_proc_on(
            tls_l,
            director,
            Some(tls),
            None,
            ExtProcOptions::default(),
            s.clone(),
        ));
        tokio::spawn(serve_health_on(health_l, handle.clone(), s.clone()));
        tokio::spawn(serve_metrics_on(metrics_l, registry, None, s));
        Self {
            ext_proc,
            ext_proc_tls,
            tls_ca,
            health,
            metrics,
            handle,
            listener_metrics: m,
            shutdown,
        }
    }

    fn all(&self) -> [(&'static str, SocketAddr); 4] {
        [
            ("ext_proc", self.ext_proc),
            ("ext_proc_tls", self.ext_proc_tls),
            ("health", self.health),
            ("metrics", self.metrics),
        ]
    }

    /// A real request through each server must succeed.
    async fn real_requests_succeed(&self) {
        // ext_proc, plaintext and TLS: a request is routed.
        for tls in [false, true] {
            let ep = if tls {
                tonic::transport::Endpoint::from_shared(format!(
                    "https://localhost:{}",
                    self.ext_proc_tls.port()
                ))
                .unwrap()
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(&self.tls_ca))
                        .domain_name("localhost"),
                )
                .unwrap()
            } else {
                tonic::transport::Endpoint::from_shared(format!("http://{}", self.ext_proc))
                    .unwrap()
            };
            let mut client = envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient::new(
                ep.connect().await.unwrap(),
            );
            let mut c = Conv::open(&mut client).await;
            c.send(headers_msg(&post(&[]), false)).await;
            c.send_body(&completion_body("m", "p", false), 1).await;
            let first = c.next().await;
            assert!(headers_of(&first).is_some(), "tls={tls}: {first:?}");
        }
        // Health.
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", self.health))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let r = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: "liveness".into(),
            })
            .await
            .unwrap();
        assert_eq!(r.into_inner().status, ServingStatus::Serving as i32);
        // Metrics.
        let mut s = TcpStream::connect(self.metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_connects_and_sends_nothing_is_disconnected_on_every_listener() {
    let s = Servers::start(short()).await;
    for (name, addr) in s.all() {
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(closed_by_server(&mut silent).await, "{name}");
        // Half an HTTP/2 preface (or request head), then nothing.
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        assert!(closed_by_server(&mut stalled).await, "{name}");
    }
    eventually("the closes to be counted", || {
        s.all().iter().all(|(name, _)| {
            s.listener_metrics.closed(name, CloseReason::HeaderTimeout)
                + s.listener_metrics.closed(name, CloseReason::IdleTimeout)
                >= 1
        })
    })
    .await;
    // Still serving.
    s.real_requests_succeed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_never_starve_real_requests() {
    let s = Servers::start(crowded()).await;
    // Fill every listener with idle connections (twice its limit).
    let mut idle = Vec::new();
    for (_, addr) in s.all() {
        for _ in 0..16 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
    }
    eventually("every listener to be full", || {
        s.all()
            .iter()
            .all(|(name, _)| s.listener_metrics.open(name) >= 8)
    })
    .await;
    s.real_requests_succeed().await;
    for (name, _) in s.all() {
        assert!(
            s.listener_metrics.closed(name, CloseReason::Evicted) >= 8,
            "{name}: idle connections were closed to admit the others"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_in_flight_is_never_idle() {
    let s = Servers::start(short()).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", s.ext_proc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient::new(ch);
    let mut c = Conv::open(&mut client).await;
    c.send(headers_msg(&post(&[]), false)).await;
    // Meanwhile, an idle connection is closed: more than the idle timeout has passed.
    let mut probe = TcpStream::connect(s.ext_proc).await.unwrap();
    assert!(closed_by_server(&mut probe).await);
    // The stream, in flight all along, still works.
    c.send_body(&completion_body("m", "p", false), 1).await;
    let first = c.next().await;
    assert!(headers_of(&first).is_some(), "{first:?}");
}

#[tokio::test]
async fn draining_turns_readiness_off_for_good_and_keeps_liveness() {
    let s = Servers::start(short()).await;
    let check = |svc: &'static str| {
        let addr = s.health;
        async move {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: svc.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status
        }
    };
    let serving = ServingStatus::Serving as i32;
    let not_serving = ServingStatus::NotServing as i32;
    assert_eq!(check("readiness").await, serving);
    s.handle.set_draining();
    assert!(s.handle.is_draining());
    for svc in [
        "readiness",
        "",
        "envoy.service.ext_proc.v3.ExternalProcessor",
    ] {
        assert_eq!(check(svc).await, not_serving, "{svc}");
    }
    assert_eq!(check("liveness").await, serving);
    // The readiness watch cannot turn it back on.
    s.handle.set_ready(true);
    assert_eq!(check("readiness").await, not_serving);
}
