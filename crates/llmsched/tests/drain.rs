//! Graceful drain with real processes: `llmsched epp` (its own process, sent real signals),
//! two `llmsched sim` replicas and a real Envoy in front of the EPP. Streams are opened
//! through both front doors (the built-in proxy and Envoy + ext_proc), then the EPP gets
//! SIGTERM. Asserted with outcomes, never times: with a drain timeout longer than the
//! streams, every stream completes (`data: [DONE]`), readiness turns NOT_SERVING (Envoy's
//! health check sees it), no new connection is accepted, and the process exits by itself;
//! with a shorter one the streams are cut and the process exits; a second signal ends the
//! drain at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

/// Streams per front door.
const STREAMS: usize = 3;

struct Setup {
    _sims: Vec<SimProc>,
    epp: EppProc,
    envoy: llmsched_gateway::Envoy,
}

impl Setup {
    async fn start(ips: [&str; 2], drain: &str) -> Self {
        init_logs();
        let sims = vec![
            SimProc::start(ips[0], 1.0).await,
            SimProc::start(ips[1], 1.0).await,
        ];
        let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr).collect();
        let epp = EppProc::start(&addrs, &[&format!("--drain-timeout={drain}")]).await;
        let envoy = start_envoy(epp.grpc, epp.health).await;
        Self {
            _sims: sims,
            epp,
            envoy,
        }
    }

    /// `STREAMS` streams of `tokens` tokens through each door, all generating.
    async fn open_streams(&self, tokens: u32) -> Vec<(&'static str, Stream)> {
        let mut out = Vec::new();
        for (door, addr) in [
            ("proxy", self.epp.proxy),
            ("envoy", self.envoy.listener_addr()),
        ] {
            for i in 0..STREAMS {
                let target = self._sims[i % 2].addr;
                out.push((
                    door,
                    Stream::open(addr, target, tokens, &format!("{door}-{i}")).await,
                ));
            }
        }
        out
    }

    /// Envoy's view of the EPP: true once its health check fails.
    async fn envoy_sees_epp_unhealthy(&self) -> bool {
        let (_, clusters) = self.envoy.admin_get("/clusters").await.unwrap();
        clusters.lines().any(|l| {
            l.starts_with("llmsched_epp::")
                && l.contains("::health_flags::")
                && l.contains("failed_active_hc")
        })
    }
}

async fn outcomes(streams: Vec<(&'static str, Stream)>) -> Vec<(&'static str, bool)> {
    let mut tasks = Vec::new();
    for (door, s) in streams {
        tasks.push(tokio::spawn(async move { (door, s.finish().await) }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_every_stream_in_flight_finish_when_the_drain_timeout_allows() {
    let mut s = Setup::start(["127.0.0.71", "127.0.0.72"], "60s").await;
    // ~1,500 tokens at ≥ 6 ms each: longer than the old fixed 5-s drain.
    let streams = s.open_streams(1_500).await;
    s.epp.signal("TERM");
    let results = tokio::spawn(outcomes(streams));
    // Readiness goes NOT_SERVING at once: Envoy's health check of the EPP fails.
    let start = std::time::Instant::now();
    while !s.envoy_sees_epp_unhealthy().await {
        assert!(
            start.elapsed() < DEADLINE,
            "Envoy never saw the EPP NOT_SERVING"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // No new connection is accepted by the proxy.
    let start = std::time::Instant::now();
    while tokio::net::TcpStream::connect(s.epp.proxy).await.is_ok() {
        assert!(
            start.elapsed() < DEADLINE,
            "the proxy still accepts connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let results = results.await.unwrap();
    let cut: Vec<_> = results.iter().filter(|(_, ok)| !ok).collect();
    assert!(cut.is_empty(), "streams cut during the drain: {cut:?}");
    let status = s.epp.exited().await;
    assert!(status.success(), "{status:?}");
    assert!(
        s.epp
            .log_contains("drained: every request in flight finished")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_outliving_the_drain_timeout_are_cut_and_the_epp_exits() {
    let mut s = Setup::start(["127.0.0.73", "127.0.0.74"], "1s").await;
    // Far longer than the drain timeout.
    let streams = s.open_streams(50_000).await;
    s.epp.signal("TERM");
    let results = outcomes(streams).await;
    assert!(
        results.iter().all(|(_, ok)| !ok),
        "every stream is cut at the timeout: {results:?}"
    );
    assert!(s.epp.exited().await.success());
    assert!(
        s.epp
            .log_contains("requests still in flight at the drain timeout")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_signal_ends_the_drain_at_once() {
    let mut s = Setup::start(["127.0.0.75", "127.0.0.76"], "10m").await;
    let streams = s.open_streams(50_000).await;
    s.epp.signal("TERM");
    let start = std::time::Instant::now();
    while !s.epp.log_contains("draining: readiness NOT_SERVING") {
        assert!(start.elapsed() < DEADLINE, "the drain never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.epp.signal("INT");
    assert!(s.epp.exited().await.success());
    assert!(s.epp.log_contains("second signal: cutting the drain short"));
    let results = outcomes(streams).await;
    assert!(results.iter().all(|(_, ok)| !ok), "{results:?}");
}
