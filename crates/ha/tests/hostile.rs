//! The sync survives peers that are unreachable, slow, lossy, hostile or speak garbage:
//! each gets a log line and a metric, never a stalled routing decision, never unbounded
//! memory. Real sockets on loopback throughout.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use llmsched_core::replica::LocalDelta;
use llmsched_ha::proto::{
    self, Delta, HelloRequest, HelloResponse, Origin, PreEncodedCodec, PushSummary, StateDeltas,
    SyncBatch,
};
use llmsched_ha::tls::dial;
use llmsched_ha::{Bootstrap, ClientTls, HaConfig};
use prost::Message;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A port nothing listens on.
async fn closed_port() -> String {
    let l = listener().await;
    let a = l.local_addr().unwrap().to_string();
    drop(l);
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_peer_costs_a_metric_and_a_cold_start_never_a_stall() {
    init_tracing();
    let dead = closed_port().await;
    let cfg = HaConfig {
        bootstrap_timeout: Duration::from_millis(800),
        ..config("a")
    };
    let a = Node::start(cfg, listener().await, vec![dead.clone()]).await;
    match a.ha.bootstrap().await {
        Bootstrap::Cold { reason } => assert!(reason.contains(&dead), "{reason}"),
        w => panic!("expected a cold start, got {w:?}"),
    }
    assert!(a.ha.is_bootstrapped(), "cold is still ready");
    assert_eq!(
        a.metric("llmsched_ha_snapshot_bootstraps_total{outcome=\"cold\"}"),
        1.0
    );
    // Routing goes on: thousands of decisions, each a push into a bounded buffer.
    for i in 0..2000 {
        a.route(&prompt(&format!("x{i}"), 32), i % 4);
    }
    eventually("batches for the dead peer are dropped and counted", || {
        a.metric("llmsched_ha_dropped_total{reason=\"peer_unavailable\"}") > 0.0
    })
    .await;
    eventually("the local buffer drains", || {
        a.metric("llmsched_ha_entries_total{origin=\"local\"}") == 2000.0 * 32.0
    })
    .await;
    assert!(a.metric("llmsched_ha_peer_errors_total{reason=\"connect\"}") >= 1.0);
    assert_eq!(
        a.metric("llmsched_ha_dropped_total{reason=\"local_buffer_full\"}"),
        0.0
    );
    assert_eq!(
        a.ha.peer_queue_high_water(),
        0,
        "nothing queues for a dead peer"
    );
    a.stop().await;
}

/// A TCP proxy that can stop moving bytes (a peer that stops reading).
struct PauseProxy {
    addr: String,
    paused: Arc<AtomicBool>,
}

impl PauseProxy {
    async fn start(upstream: String) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let paused = Arc::new(AtomicBool::new(false));
        let p = paused.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = l.accept().await {
                let Ok(up) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(pump(dr, uw, p.clone()));
                tokio::spawn(pump(ur, dw, p.clone()));
            }
        });
        Self { addr, paused }
    }
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    paused: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while paused.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_peer_fills_a_bounded_queue_and_is_resynced_by_snapshot_afterwards() {
    init_tracing();
    let (la, lb) = (listener().await, listener().await);
    let (aa, ab) = (
        la.local_addr().unwrap().to_string(),
        lb.local_addr().unwrap().to_string(),
    );
    let proxy = PauseProxy::start(ab.clone()).await;
    let cap = 64 * 1024;
    let cfg_a = HaConfig {
        max_peer_queue_bytes: cap,
        ..config("a")
    };
    // a pushes to b through the proxy; b dials a directly (for its resync).
    let a = Node::start(cfg_a, la, vec![proxy.addr.clone()]).await;
    let b = Node::start(config("b"), lb, vec![aa.clone()]).await;
    eventually("a pushes to b", || a.ha.connected_peers() == 1).await;
    let warm = prompt("warm", 8);
    a.route(&warm, 0);
    eventually("b learns through the proxy", || b.scores(&warm)[0] == 1.0).await;

    // b stops reading: a keeps routing, its queue for b hits the cap and drops.
    proxy.paused.store(true, Ordering::Relaxed);
    let during: Vec<String> = (0..400).map(|i| prompt(&format!("slow{i}"), 256)).collect();
    for (i, p) in during.iter().enumerate() {
        a.route(p, i % 4);
        if i % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }
    eventually("a drops what b cannot take", || {
        a.metric("llmsched_ha_dropped_total{reason=\"peer_queue_full\"}") > 0.0
    })
    .await;
    assert!(
        a.ha.peer_queue_high_water() <= cap,
        "queue {} over its cap {cap}",
        a.ha.peer_queue_high_water()
    );
    assert_eq!(
        a.metric("llmsched_ha_dropped_total{reason=\"local_buffer_full\"}"),
        0.0
    );

    // b reads again: the next batches show a gap, b pulls a's snapshot and knows everything.
    proxy.paused.store(false, Ordering::Relaxed);
    let after = prompt("after", 8);
    a.route(&after, 2);
    eventually("b sees the gap and resyncs", || {
        b.metric("llmsched_ha_snapshot_resyncs_total") >= 1.0
    })
    .await;
    assert!(b.metric("llmsched_ha_dropped_total{reason=\"missed\"}") > 0.0);
    for (i, p) in during.iter().enumerate() {
        assert_eq!(
            b.scores(p)[i % 4],
            1.0,
            "prompt {i} routed while b was slow"
        );
    }
    eventually("and a's later decisions", || b.scores(&after)[2] == 1.0).await;
    a.stop().await;
    b.stop().await;
}

fn origin(id: &str) -> Origin {
    Origin {
        replica_id: id.into(),
        incarnation: 7,
        sync_port: 0,
    }
}

async fn push_raw(addr: &str, messages: Vec<Bytes>) -> Result<PushSummary, tonic::Status> {
    let ch = dial(addr, &ClientTls::Plaintext, Duration::from_secs(5))
        .await
        .expect("dial");
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.expect("ready");
    g.client_streaming::<_, _, PushSummary, _>(
        tonic::Request::new(tokio_stream::iter(messages)),
        http::uri::PathAndQuery::from_static(proto::PUSH_PATH),
        PreEncodedCodec,
    )
    .await
    .map(|r| r.into_inner())
}

fn batch(seq: u64, endpoints: Vec<&str>, states: Vec<StateDeltas>) -> SyncBatch {
    SyncBatch {
        origin: Some(origin("mallory")),
        seq,
        endpoints: endpoints.into_iter().map(String::from).collect(),
        states,
        ..SyncBatch::default()
    }
}

fn blocks(endpoint: u32, keys: Vec<u64>) -> StateDeltas {
    StateDeltas {
        kind: "approx-prefix".into(),
        name: "prefix-cache-scorer".into(),
        deltas: vec![Delta {
            op: 1,
            endpoint,
            ttl_ms: 0,
            keys,
        }],
        gauge_values: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_hostile_batches_are_refused_and_the_port_keeps_serving() {
    init_tracing();
    let la = listener().await;
    let aa = la.local_addr().unwrap().to_string();
    let a = Node::start(config("a"), la, vec![]).await;

    // 1. Not HTTP/2 at all: the connection is closed.
    let mut s = TcpStream::connect(&aa).await.unwrap();
    let junk: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = s.write_all(&junk).await;
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the server closes a garbage connection");

    // 2. gRPC, but the message is not protobuf.
    let r = push_raw(&aa, vec![Bytes::from_static(&[0xff; 64])]).await;
    assert!(r.is_err(), "undecodable batch accepted: {r:?}");
    eventually("counted as a decode error", || {
        a.metric("llmsched_ha_peer_errors_total{reason=\"decode\"}") >= 1.0
    })
    .await;

    // 3. Protobuf with out-of-range references, unknown ops, too many keys.
    let bad = [
        batch(1, vec!["10.0.0.1:8000"], vec![blocks(5, vec![1, 2])]),
        batch(
            1,
            vec!["10.0.0.1:8000"],
            vec![StateDeltas {
                deltas: vec![Delta {
                    op: 99,
                    endpoint: 0,
                    ttl_ms: 0,
                    keys: vec![1],
                }],
                ..blocks(0, vec![])
            }],
        ),
        batch(1, vec!["10.0.0.1:8000"], vec![blocks(0, vec![7; 70_000])]),
        SyncBatch {
            origin: None,
            ..SyncBatch::default()
        },
    ];
    for b in bad {
        let r = push_raw(&aa, vec![Bytes::from(b.encode_to_vec())]).await;
        assert_eq!(
            r.expect_err("hostile batch accepted").code(),
            tonic::Code::InvalidArgument
        );
    }
    assert_eq!(
        a.metric("llmsched_ha_dropped_total{reason=\"invalid\"}"),
        4.0
    );

    // 4. Larger than the message cap (4 MiB).
    let huge = batch(1, vec!["10.0.0.1:8000"], vec![blocks(0, vec![3; 600_000])]);
    assert!(
        push_raw(&aa, vec![Bytes::from(huge.encode_to_vec())])
            .await
            .is_err()
    );

    // 5. Well-formed but about states and endpoints this replica does not have: counted,
    // not applied.
    let unknown = batch(
        1,
        vec!["10.9.9.9:1", "10.0.0.1:8000"],
        vec![
            blocks(0, vec![11, 12]),
            StateDeltas {
                kind: "approx-prefix".into(),
                name: "someone-elses-plugin".into(),
                ..blocks(1, vec![13])
            },
        ],
    );
    let r = push_raw(&aa, vec![Bytes::from(unknown.encode_to_vec())]).await;
    assert_eq!(r.expect("well-formed batch").batches, 1);
    assert_eq!(
        a.metric("llmsched_ha_dropped_total{reason=\"unknown_endpoint\"}"),
        1.0
    );
    assert_eq!(
        a.metric("llmsched_ha_dropped_total{reason=\"unknown_state\"}"),
        1.0
    );
    assert_eq!(a.metric("llmsched_ha_entries_total{origin=\"peer\"}"), 0.0);

    // 6. A flood of valid keys stays within the index's own bounds (31,250 blocks per
    // endpoint by default), whatever the peer sends.
    let flood: Vec<Bytes> = (0..40u64)
        .map(|i| {
            let keys: Vec<u64> = (0..60_000u64).map(|k| i * 1_000_000 + k).collect();
            Bytes::from(batch(i + 1, vec!["10.0.0.1:8000"], vec![blocks(0, keys)]).encode_to_vec())
        })
        .collect();
    assert_eq!(push_raw(&aa, flood).await.expect("valid").batches, 40);
    let mut snap: Vec<LocalDelta> = Vec::new();
    a.plugin
        .clone()
        .as_replicated()
        .unwrap()
        .snapshot(&mut snap, usize::MAX);
    let held: usize = snap.iter().map(|d| d.keys.len()).sum();
    assert!(held <= 31_250 + 64, "index grew to {held} blocks");
    assert!(held >= 30_000, "the flood did land ({held})");

    // 7. Hello from an incompatible protocol version: refused with a reason.
    let ch = dial(&aa, &ClientTls::Plaintext, Duration::from_secs(5))
        .await
        .unwrap();
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.unwrap();
    let r = g
        .unary::<_, HelloResponse, _>(
            tonic::Request::new(HelloRequest {
                origin: Some(origin("old")),
                protocol: 99,
                pool: "llmsched".into(),
            }),
            http::uri::PathAndQuery::from_static(proto::HELLO_PATH),
            tonic_prost::ProstCodec::<HelloRequest, HelloResponse>::default(),
        )
        .await;
    assert_eq!(r.unwrap_err().code(), tonic::Code::FailedPrecondition);

    // After all this, a real peer still syncs.
    let b = Node::start(config("b"), listener().await, vec![aa.clone()]).await;
    let p = prompt("still", 8);
    b.route(&p, 1);
    eventually("a still applies a real peer's batches", || {
        a.scores(&p)[1] == 1.0
    })
    .await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_answering_garbage_is_an_error_not_a_crash() {
    init_tracing();
    // Something that is not an EPP: writes junk to whoever connects.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let junk_addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\n\r\nthis is not grpc\n")
                    .await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    let cfg = HaConfig {
        bootstrap_timeout: Duration::from_millis(800),
        connect_timeout: Duration::from_millis(500),
        ..config("a")
    };
    let a = Node::start(cfg, listener().await, vec![junk_addr.clone()]).await;
    assert!(matches!(a.ha.bootstrap().await, Bootstrap::Cold { .. }));
    eventually("the failures are counted", || {
        a.metric("llmsched_ha_peer_errors_total") >= 2.0
    })
    .await;
    a.route(&prompt("fine", 8), 0);
    assert_eq!(a.scores(&prompt("fine", 8))[0], 1.0);
    assert_eq!(a.ha.connected_peers(), 0);
    a.stop().await;
}

fn tls_server(pem: &(String, String)) -> Arc<rustls::ServerConfig> {
    llmsched_extproc::TlsConfig::from_pem(pem.0.as_bytes(), pem.1.as_bytes())
        .expect("tls")
        .server_config()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_peers_with_a_pinned_certificate_and_strangers_refused() {
    init_tracing();
    let shared = llmsched_extproc::tls::generate_self_signed().unwrap();
    let other = llmsched_extproc::tls::generate_self_signed().unwrap();
    let pinned = ClientTls::pinned_pem(shared.0.as_bytes()).unwrap();
    let with = |id: &str, server: &(String, String), client: ClientTls| HaConfig {
        server_tls: Some(tls_server(server)),
        client_tls: client,
        bootstrap_timeout: Duration::from_millis(800),
        ..config(id)
    };
    let la = listener().await;
    let aa = la.local_addr().unwrap().to_string();
    let a = Node::start(with("a", &shared, pinned.clone()), la, vec![]).await;
    // Same certificate: syncs.
    let b = Node::start(
        with("b", &shared, pinned.clone()),
        listener().await,
        vec![aa.clone()],
    )
    .await;
    let p = prompt("tls", 8);
    b.route(&p, 2);
    eventually("a learns over TLS", || a.scores(&p)[2] == 1.0).await;
    // A replica serving another certificate is refused by a pinned client.
    let lc = listener().await;
    let ac = lc.local_addr().unwrap().to_string();
    let c = Node::start(
        with("c", &other, ClientTls::Tls { pinned: None }),
        lc,
        vec![],
    )
    .await;
    let d = Node::start(
        with("d", &shared, pinned.clone()),
        listener().await,
        vec![ac.clone()],
    )
    .await;
    assert!(matches!(d.ha.bootstrap().await, Bootstrap::Cold { .. }));
    assert!(d.metric("llmsched_ha_peer_errors_total{reason=\"handshake\"}") >= 1.0);
    // Without a pin (self-signed certificates), the connection is encrypted and accepted.
    let e = Node::start(
        with("e", &other, ClientTls::Tls { pinned: None }),
        listener().await,
        vec![ac.clone()],
    )
    .await;
    assert!(matches!(e.ha.bootstrap().await, Bootstrap::Warm { .. }));
    // A plaintext client cannot talk to a TLS port.
    let f = Node::start(
        HaConfig {
            bootstrap_timeout: Duration::from_millis(800),
            connect_timeout: Duration::from_millis(500),
            ..config("f")
        },
        listener().await,
        vec![aa.clone()],
    )
    .await;
    assert!(matches!(f.ha.bootstrap().await, Bootstrap::Cold { .. }));
    for n in [a, b, c, d, e, f] {
        n.stop().await;
    }
}
