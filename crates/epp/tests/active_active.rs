//! `--ha-mode=active-active` in the EPP: two `llmsched_epp::start` replicas (started exactly
//! as `llmsched epp` starts them, real sockets on loopback) with `--ha-peers`; requests go
//! through each replica's real ext_proc gRPC port as Envoy sends them. The model servers are
//! addresses nothing serves (`--endpoint-health-checks=false` keeps them candidates): only
//! the routing decisions matter here. Tests wait for conditions with generous deadlines.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clap::Parser;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use llmsched_epp::{Args, EppHandle};
use llmsched_extproc::testing::*;

const ENDPOINTS: &str = "127.0.0.21:8000,127.0.0.22:8000,127.0.0.23:8000";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start(ha_port: u16, peers: &[u16], extra: &[&str]) -> EppHandle {
    let peers: Vec<String> = peers.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut v: Vec<String> = [
        "epp",
        "--secure-serving=false",
        "--grpc-port=0",
        "--grpc-health-port=0",
        "--metrics-port=0",
        "--bind-address=127.0.0.1",
        "--endpoint-health-checks=false",
        "--drain-timeout=50ms",
        "--ha-handover-delay=0s",
        "--ha-mode=active-active",
        "--ha-bootstrap-timeout=2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("--endpoints={ENDPOINTS}"));
    v.push(format!("--ha-port={ha_port}"));
    v.push(format!("--ha-peers={}", peers.join(",")));
    v.extend(extra.iter().map(|s| s.to_string()));
    llmsched_epp::start(Args::try_parse_from(v).unwrap())
        .await
        .unwrap()
}

async fn route(epp: &EppHandle, prompt: &str) -> String {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", epp.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ExternalProcessorClient::new(ch);
    let mut conv = Conv::open(&mut c).await;
    conv.send(headers_msg(
        &[
            (":method", "POST"),
            (":path", "/v1/completions"),
            ("content-type", "application/json"),
        ],
        false,
    ))
    .await;
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "m", "prompt": prompt, "max_tokens": 4
    }))
    .unwrap();
    conv.send_body(&body, 1).await;
    let first = conv.next().await;
    let (_, headers) = headers_of(&first).expect("routed");
    let destination = get(&headers, "x-gateway-destination-endpoint")
        .expect("destination")
        .to_string();
    // The stream ends here: wait until the EPP released the request (it does so as it sees
    // the stream close), so the next request does not see this one's in-flight load.
    drop(conv);
    eventually("the request released", || {
        use llmsched_core::endpoint::EndpointSource;
        epp.store()
            .snapshot()
            .endpoints
            .iter()
            .all(|e| e.inflight_requests() == 0)
    })
    .await;
    destination
}

async fn metrics_text(epp: &EppHandle) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(epp.metrics_addr)
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn metric(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_metric(epp: &EppHandle, line_prefix: &str, ok: impl Fn(f64) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = metric(&metrics_text(epp).await, line_prefix);
        if ok(v) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting on {line_prefix} (now {v})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn long_prompt(tag: &str) -> String {
    format!("{tag} ").repeat(400)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_route_as_one_and_a_newcomer_is_warm_before_it_is_ready() {
    let (pa, pb) = (free_port(), free_port());
    let a = start(pa, &[pa, pb], &[]).await;
    // Nobody to bootstrap from: cold, then ready (after the bootstrap, not before).
    eventually("a ready", || a.health().is_ready()).await;
    assert!(a.ha().unwrap().is_bootstrapped());
    wait_metric(
        &a,
        "llmsched_ha_snapshot_bootstraps_total{outcome=\"cold\"}",
        |v| v == 1.0,
    )
    .await;

    // a routes prompts before b exists: b learns them from a's snapshot.
    let mut before = Vec::new();
    for i in 0..6 {
        let p = long_prompt(&format!("early{i}"));
        let d = route(&a, &p).await;
        before.push((p, d));
    }
    let b = start(pb, &[pa, pb], &[]).await;
    eventually("b ready", || b.health().is_ready()).await;
    wait_metric(
        &b,
        "llmsched_ha_snapshot_bootstraps_total{outcome=\"warm\"}",
        |v| v == 1.0,
    )
    .await;
    for (p, d) in &before {
        assert_eq!(
            &route(&b, &format!("{p} and more")).await,
            d,
            "b did not follow a's earlier decision"
        );
    }

    // From now on, each learns the other's decisions as they are made.
    wait_metric(&a, "llmsched_ha_peers{state=\"connected\"}", |v| v == 1.0).await;
    wait_metric(&b, "llmsched_ha_peers{state=\"connected\"}", |v| v == 1.0).await;
    // Both replicas hold the same index once every decision reached the other one: sizes
    // (`inference_extension_prefix_indexer_size`) equal. Counting sent and applied keys
    // instead would not do: a replica counts its keys as its sync task sends them, which may
    // be after the next round started.
    let size = |t: &str| metric(t, "inference_extension_prefix_indexer_size");
    for i in 0..6 {
        let (first, second) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let p = long_prompt(&format!("live{i}"));
        let before = size(&metrics_text(first).await);
        let d = route(first, &p).await;
        // The peer follows once it holds what the first replica holds (soft state: wait for
        // it, without routing on the peer meanwhile, which would record its own decision).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (mine, theirs) = (
                size(&metrics_text(first).await),
                size(&metrics_text(second).await),
            );
            if mine > before && theirs == mine {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "live{i}: index sizes {mine} here, {theirs} on the peer (before: {before})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The peer also learns the first replica's in-flight load (absolute gauges, sent when
        // they change): the request above was charged and released, and a peer that still
        // counts it would rightly weigh that load against the prefix match. Wait until the
        // release arrived too.
        eventually("the peer saw the request released", || {
            use llmsched_core::endpoint::EndpointSource;
            second
                .store()
                .snapshot()
                .endpoints
                .iter()
                .all(|e| e.peer_inflight_requests() == 0)
        })
        .await;
        assert_eq!(
            route(second, &format!("{p} again")).await,
            d,
            "the peer did not follow live{i}"
        );
    }
    let text = metrics_text(&a).await;
    assert!(metric(&text, "llmsched_ha_entries_total{origin=\"local\"}") > 0.0);
    assert!(metric(&text, "llmsched_ha_entries_total{origin=\"peer\"}") > 0.0);
    assert!(metric(&text, "llmsched_ha_sync_bytes_total{direction=\"sent\"}") > 0.0);

    // b leaves: a sees its peer gone and keeps routing on its own.
    b.shutdown().await;
    wait_metric(&a, "llmsched_ha_peers{state=\"connected\"}", |v| v == 0.0).await;
    assert!(a.health().is_ready());
    let _ = route(&a, &long_prompt("alone")).await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_active_without_peers_or_kubernetes_is_a_startup_error() {
    let v: Vec<String> = [
        "epp",
        "--secure-serving=false",
        "--grpc-port=0",
        "--grpc-health-port=0",
        "--metrics-port=0",
        "--ha-port=0",
        "--endpoints=127.0.0.1:8000",
        "--ha-mode=active-active",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // SAFETY of the env read: POD_NAME is not set in the test environment.
    assert!(std::env::var("POD_NAME").is_err());
    let e = llmsched_epp::start(Args::try_parse_from(v).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("POD_NAME") && e.contains("--ha-peers"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_port_serves_tls_when_ext_proc_does() {
    let (pa, pb) = (free_port(), free_port());
    let with_tls = ["--secure-serving=true"];
    let a = start(pa, &[pb], &with_tls).await;
    eventually("a ready", || a.health().is_ready()).await;
    let p = long_prompt("tls");
    let d = route_tls(&a, &p).await;
    let b = start(pb, &[pa], &with_tls).await;
    eventually("b ready", || b.health().is_ready()).await;
    wait_metric(
        &b,
        "llmsched_ha_snapshot_bootstraps_total{outcome=\"warm\"}",
        |v| v == 1.0,
    )
    .await;
    assert_eq!(route_tls(&b, &format!("{p} more")).await, d);
    b.shutdown().await;
    a.shutdown().await;
}

async fn route_tls(epp: &EppHandle, prompt: &str) -> String {
    // ext_proc over TLS with the EPP's self-signed certificate, as Envoy dials it.
    let pem = epp.tls_certificate_pem.clone().unwrap();
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pem))
        .domain_name("localhost");
    let ch = tonic::transport::Endpoint::from_shared(format!("https://{}", epp.grpc_addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ExternalProcessorClient::new(ch);
    let mut conv = Conv::open(&mut c).await;
    conv.send(headers_msg(
        &[
            (":method", "POST"),
            (":path", "/v1/completions"),
            ("content-type", "application/json"),
        ],
        false,
    ))
    .await;
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "m", "prompt": prompt, "max_tokens": 4
    }))
    .unwrap();
    conv.send_body(&body, 1).await;
    let first = conv.next().await;
    let (_, headers) = headers_of(&first).expect("routed");
    let destination = get(&headers, "x-gateway-destination-endpoint")
        .expect("destination")
        .to_string();
    // The stream ends here: wait until the EPP released the request (it does so as it sees
    // the stream close), so the next request does not see this one's in-flight load.
    drop(conv);
    eventually("the request released", || {
        use llmsched_core::endpoint::EndpointSource;
        epp.store()
            .snapshot()
            .endpoints
            .iter()
            .all(|e| e.inflight_requests() == 0)
    })
    .await;
    destination
}
