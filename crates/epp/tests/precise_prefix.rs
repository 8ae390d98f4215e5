//! Precise prefix-cache routing end to end: simulator replicas (`llmsched_sim`, in process)
//! publish real KV events over real ZMQ sockets on loopback; the EPP (`llmsched_epp::start`,
//! configured with `precise-prefix-cache-scorer`) consumes them; routing is asked over real
//! ext_proc gRPC, the way Envoy asks. Fault tests drive the EPP's subscriber with a real PUB
//! socket sending real msgpack batches — some garbled, dropped or reordered — and a real
//! replay ROUTER socket.
//!
//! Nothing asserts on time: each check polls until the expected routing shows up or a
//! generous deadline passes.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use llmsched_epp::{Args, EppHandle};
use llmsched_extproc::testing::*;
use llmsched_kvevents::wire::{EncodeOptions, Layout, encode_seq};
use llmsched_kvevents::zmtp::{Limits, PubSocket, RouterSocket, TransportStats};
use llmsched_kvevents::{
    BlockRemoved, BlockStored, ConnectMode, EventBatch, KvEvent, encode_batch,
};
use llmsched_sim::{ClusterConfig, KvEventsConfig, ReplicaConfig, SimCluster};
use llmsched_tokenizer::{SimTokenizer, Tokenizer};

const MODEL: &str = "Qwen/Qwen3-32B";
const DEADLINE: Duration = Duration::from_secs(30);

fn free_port(ip: &str) -> u16 {
    StdListener::bind(format!("{ip}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `n` distinct simulator words starting at `seed` (one token each).
fn words(seed: u32, n: u32) -> String {
    let t = SimTokenizer::default();
    let mut s = String::new();
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        t.write_word(seed * 7919 + i, &mut s);
    }
    s
}

fn replica() -> ReplicaConfig {
    ReplicaConfig::from_profile("qwen3-32b-tp2-h100")
        .unwrap()
        .with_time_scale(50.0)
        .with_num_gpu_blocks(64)
        .with_max_model_len(600)
}

/// Precise scorer only, so the pick follows the index alone; speculation off, so it follows
/// what the engines report.
fn precise_config(events: &str) -> String {
    format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\n\
         kind: EndpointPickerConfig\n\
         plugins:\n\
         - type: precise-prefix-cache-scorer\n\
         \x20 parameters:\n\
         \x20   tokenProcessorConfig: {{blockSize: 16}}\n\
         \x20   speculativeIndexing: false\n\
         \x20   kvEventsConfig: {events}\n\
         schedulingProfiles:\n\
         - name: default\n\
         \x20 plugins:\n\
         \x20 - pluginRef: precise-prefix-cache-scorer\n"
    )
}

async fn start_epp(endpoints: &[SocketAddr], config: &str) -> EppHandle {
    let eps: Vec<String> = endpoints.iter().map(|a| a.to_string()).collect();
    let args = Args::try_parse_from([
        "epp".to_string(),
        "--secure-serving=false".into(),
        "--grpc-port=0".into(),
        "--grpc-health-port=0".into(),
        "--metrics-port=0".into(),
        "--bind-address=127.0.0.1".into(),
        "--refresh-metrics-interval=50ms".into(),
        format!("--endpoints={}", eps.join(",")),
        format!("--config-text={config}"),
    ])
    .unwrap();
    llmsched_epp::start(args).await.unwrap()
}

/// Asks the EPP where a completion with `prompt` goes.
async fn route(epp: &EppHandle, prompt: &str) -> String {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", epp.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient::new(ch);
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
        "model": MODEL, "prompt": prompt, "max_tokens": 8
    }))
    .unwrap();
    conv.send_body(&body, 1).await;
    let first = conv.next().await;
    let (_, headers) = headers_of(&first).expect("a routing decision");
    get(&headers, "x-gateway-destination-endpoint")
        .expect("destination header")
        .to_string()
}

/// Polls until `prompt` routes to `want`.
async fn until_routed(epp: &EppHandle, prompt: &str, want: SocketAddr, what: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let got = route(epp, prompt).await;
        if got == want.to_string() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: routed to {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a completion straight to a replica (as Envoy would after the EPP's pick).
async fn complete(addr: SocketAddr, prompt: &str) {
    let body = serde_json::to_string(&serde_json::json!({
        "model": MODEL, "prompt": prompt, "max_tokens": 4, "ignore_eos": true
    }))
    .unwrap();
    let r = http_post(addr, "/v1/completions", &body).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

async fn http_post(addr: SocketAddr, path: &str, body: &str) -> String {
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .await
    .unwrap()
}

async fn metrics_text(epp: &EppHandle) -> String {
    let addr = epp.metrics_addr;
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(
            format!("GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .await
    .unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn until_metric(epp: &EppHandle, name: &str, at_least: f64) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let v = metric(&metrics_text(epp).await, name);
        if v >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} = {v}, expected ≥ {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until each replica's events reach the EPP (publishers connect in the background, and
/// ZMQ drops what is published before a subscriber is attached): sends short probe prompts
/// straight to the replica until the EPP routes them there.
async fn events_flowing(epp: &EppHandle, addrs: &[SocketAddr], seed: u32) {
    for (i, &a) in addrs.iter().enumerate() {
        let deadline = Instant::now() + DEADLINE;
        let mut k = 0;
        loop {
            let probe = words(seed + 1000 * i as u32 + k, 40);
            complete(a, &probe).await;
            // Ties are broken at random: only a consistent answer proves the events arrived.
            let mut all = true;
            for _ in 0..8 {
                all &= route(epp, &probe).await == a.to_string();
            }
            if all {
                break;
            }
            assert!(Instant::now() < deadline, "events of {a} never arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
            k += 1;
        }
    }
}

/// Replicas that dial the EPP's central SUB socket (llm-d's simulator convention).
async fn publishing_cluster(addrs: Vec<SocketAddr>, zmq_port: u16) -> SimCluster {
    let mut kv = KvEventsConfig::new(format!("tcp://127.0.0.1:{zmq_port}"));
    kv.mode = ConnectMode::Connect;
    SimCluster::start(ClusterConfig::new(addrs, replica()).with_kv_events(kv))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_to_the_replica_that_holds_the_prefix_and_follows_its_evictions() {
    let zmq = free_port("127.0.0.1");
    let sims = publishing_cluster(vec!["127.0.0.1:0".parse().unwrap(); 3], zmq).await;
    let addrs = sims.addrs();
    let epp = start_epp(
        &addrs,
        &precise_config(&format!(
            "{{zmqEndpoint: \"tcp://127.0.0.1:{zmq}\", concurrency: 2}}"
        )),
    )
    .await;
    let (x, y) = (addrs[0], addrs[2]);
    events_flowing(&epp, &addrs, 50_000).await;

    // The full loop: the EPP picks for a new prompt, the request runs there, and the next
    // request sharing the prefix goes to the same replica because its events say so.
    let fresh = words(1, 120);
    let first = route(&epp, &fresh).await;
    let first: SocketAddr = first.parse().unwrap();
    complete(first, &fresh).await;
    until_routed(
        &epp,
        &format!("{fresh} and a new question"),
        first,
        "after the first request",
    )
    .await;

    // X holds all of P (12+ blocks), Y only its first 96 tokens (6 blocks).
    let p = words(2, 200);
    let p_half: String = p.split(' ').take(96).collect::<Vec<_>>().join(" ");
    complete(y, &format!("{p_half} {}", words(3, 50))).await;
    complete(x, &p).await;
    until_routed(&epp, &p, x, "x holds the longest prefix").await;

    // Flood X with other prompts until the simulator evicts P's blocks; the index follows the
    // BlockRemoved events and P now goes to Y, which still holds the first half.
    for i in 0..6 {
        complete(x, &words(100 + i, 300)).await;
    }
    assert!(
        sims.replicas()[0].metrics().evictions > 0,
        "the flood must evict"
    );
    until_routed(&epp, &p, y, "after x evicted the prefix").await;

    until_metric(&epp, "llmsched_kv_events_events_total", 1.0).await;
    until_metric(&epp, "llmsched_prefix_indexer_memory_bytes", 1.0).await;
    assert_eq!(
        metric(
            &metrics_text(&epp).await,
            "llmsched_kv_events_malformed_total"
        ),
        0.0
    );
    epp.shutdown().await;
    sims.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endpoint_reset_clears_it_and_a_vanished_publisher_can_come_back() {
    let zmq = free_port("127.0.0.1");
    // X at a fixed address so it can come back as "the same pod".
    let x_addr: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let xs = publishing_cluster(vec![x_addr], zmq).await;
    let ys = publishing_cluster(vec!["127.0.0.1:0".parse().unwrap()], zmq).await;
    let y = ys.addrs()[0];
    let epp = start_epp(
        &[x_addr, y],
        &precise_config(&format!("{{zmqEndpoint: \"tcp://127.0.0.1:{zmq}\"}}")),
    )
    .await;
    events_flowing(&epp, &[x_addr, y], 50_000).await;

    let p = words(5, 200);
    let p_half: String = p.split(' ').take(96).collect::<Vec<_>>().join(" ");
    complete(y, &p_half).await;
    complete(x_addr, &p).await;
    until_routed(&epp, &p, x_addr, "x holds the longest prefix").await;

    // The engine's prefix cache is reset: AllBlocksCleared empties X in the index.
    let r = http_post(x_addr, "/reset_prefix_cache", "").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    until_routed(&epp, &p, y, "after x's reset").await;

    // X's publisher vanishes (the whole replica stops) and comes back with a fresh sequence;
    // ingestion goes on for it and for Y.
    complete(x_addr, &p).await;
    until_routed(&epp, &p, x_addr, "x holds the prefix again").await;
    xs.shutdown().await;
    let q = words(6, 120);
    complete(y, &q).await;
    until_routed(&epp, &q, y, "y's events still flow").await;
    let xs = publishing_cluster(vec![x_addr], zmq).await;
    events_flowing(&epp, &[x_addr], 60_000).await;
    let r = words(7, 200);
    complete(x_addr, &r).await;
    until_routed(&epp, &r, x_addr, "the restarted x's events are ingested").await;
    // The restarted engine's sequence went back to 0: detected as a restart.
    until_metric(&epp, "llmsched_kv_events_publisher_restarts_total", 1.0).await;

    epp.shutdown().await;
    xs.shutdown().await;
    ys.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn discover_pods_dials_every_endpoint() {
    // vLLM's convention: every engine binds the same port on its own address.
    let port = free_port("127.0.0.1");
    let mut clusters = Vec::new();
    for ip in ["127.0.0.2", "127.0.0.3"] {
        let mut kv = KvEventsConfig::new(format!("tcp://{ip}:{port}"));
        kv.mode = ConnectMode::Bind;
        clusters.push(
            SimCluster::start(
                ClusterConfig::new(vec![format!("{ip}:0").parse().unwrap()], replica())
                    .with_kv_events(kv),
            )
            .await
            .unwrap(),
        );
    }
    let addrs: Vec<SocketAddr> = clusters.iter().map(|c| c.addrs()[0]).collect();
    let epp = start_epp(
        &addrs,
        &precise_config(&format!(
            "{{discoverPods: true, podDiscoveryConfig: {{socketPort: {port}}}}}"
        )),
    )
    .await;
    events_flowing(&epp, &addrs, 50_000).await;
    for (i, &a) in addrs.iter().enumerate() {
        let p = words(10 + i as u32, 150);
        complete(a, &p).await;
        until_routed(&epp, &p, a, "events dialled from each endpoint").await;
    }
    epp.shutdown().await;
    for c in clusters {
        c.shutdown().await;
    }
}

/// A hand-driven publisher: real PUB socket dialling the EPP, real replay ROUTER.
struct FaultyPublisher {
    pub_socket: PubSocket,
    replay: std::sync::Arc<parking_lot::Mutex<Vec<(u64, Bytes)>>>,
    _router: tokio::task::JoinHandle<()>,
}

impl FaultyPublisher {
    async fn start(zmq_port: u16, replay_at: &str) -> Self {
        let stats = std::sync::Arc::new(TransportStats::default());
        let mut pub_socket = PubSocket::new(Limits::default(), stats.clone());
        pub_socket.connect(
            &format!("tcp://127.0.0.1:{zmq_port}"),
            Duration::from_millis(100),
        );
        let mut router = RouterSocket::bind(replay_at, Limits::default(), stats)
            .await
            .unwrap();
        let replay = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<(u64, Bytes)>::new()));
        let buf = replay.clone();
        let task = tokio::spawn(async move {
            while let Ok(f) = router.recv().await {
                let (id, start) = (
                    f[0].clone(),
                    u64::from_be_bytes(f[f.len() - 1][..8].try_into().unwrap()),
                );
                let items: Vec<(u64, Bytes)> = buf
                    .lock()
                    .iter()
                    .filter(|(s, _)| *s >= start)
                    .cloned()
                    .collect();
                for (s, p) in items.into_iter().chain([(u64::MAX, Bytes::new())]) {
                    let msg = [
                        id.clone(),
                        Bytes::new(),
                        Bytes::copy_from_slice(&encode_seq(s)),
                        p,
                    ];
                    if router.send(&msg).await.is_err() {
                        break;
                    }
                }
            }
        });
        Self {
            pub_socket,
            replay,
            _router: task,
        }
    }

    /// Buffers `batch` as `seq` for replay and, unless `drop`, publishes it.
    async fn publish(&mut self, topic: &str, seq: u64, batch: &EventBatch, drop: bool) {
        let payload = Bytes::from(encode_batch(
            batch,
            EncodeOptions {
                layout: Layout::Map,
                hashes_as_bytes: true,
            },
        ));
        self.replay.lock().push((seq, payload.clone()));
        if !drop {
            self.raw(vec![
                Bytes::from(topic.to_string()),
                Bytes::copy_from_slice(&encode_seq(seq)),
                payload,
            ])
            .await;
        }
    }

    async fn raw(&mut self, frames: Vec<Bytes>) {
        self.pub_socket.send(&frames);
    }
}

fn stored(hashes: std::ops::Range<u64>, parent: Option<u64>, tokens: &[u32]) -> EventBatch {
    EventBatch {
        ts: 0.0,
        events: vec![KvEvent::BlockStored(BlockStored {
            block_hashes: hashes.collect(),
            parent_block_hash: parent,
            token_ids: tokens.to_vec(),
            block_size: 16,
            ..BlockStored::default()
        })],
        data_parallel_rank: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbled_dropped_and_reordered_messages_do_not_poison_the_index() {
    let zmq = free_port("127.0.0.1");
    let replay_port = free_port("127.0.0.2");
    // Two idle replicas as the pool (their metrics are scraped; their events come from us).
    let a_sim = SimCluster::start(ClusterConfig::new(
        vec!["127.0.0.2:0".parse().unwrap()],
        replica(),
    ))
    .await
    .unwrap();
    let b_sim = SimCluster::start(ClusterConfig::new(
        vec!["127.0.0.3:0".parse().unwrap()],
        replica(),
    ))
    .await
    .unwrap();
    let (a, b) = (a_sim.addrs()[0], b_sim.addrs()[0]);
    let epp = start_epp(
        &[a, b],
        &precise_config(&format!(
            "{{zmqEndpoint: \"tcp://127.0.0.1:{zmq}\", replayPort: {replay_port}}}"
        )),
    )
    .await;
    let mut publisher =
        FaultyPublisher::start(zmq, &format!("tcp://127.0.0.2:{replay_port}")).await;
    let (ta, tb) = (format!("kv@{a}@{MODEL}"), format!("kv@{b}@{MODEL}"));
    let p = words(20, 192);
    let t = SimTokenizer::default().encode(&p).unwrap();

    // Garbage first: a payload that is not msgpack, a wrong frame count, a bad seq frame.
    // The subscriber may still be connecting, so repeat until they are counted.
    let deadline = Instant::now() + DEADLINE;
    loop {
        publisher
            .raw(vec![
                Bytes::from(ta.clone()),
                Bytes::copy_from_slice(&encode_seq(1_000)),
                Bytes::from_static(b"\xc1\xc1garbage"),
            ])
            .await;
        publisher
            .raw(vec![
                Bytes::from(ta.clone()),
                Bytes::from_static(b"only two"),
            ])
            .await;
        publisher
            .raw(vec![
                Bytes::from(ta.clone()),
                Bytes::from_static(b"123"),
                Bytes::from_static(b"\x90"),
            ])
            .await;
        let v = metric(
            &metrics_text(&epp).await,
            "llmsched_kv_events_malformed_total",
        );
        if v >= 3.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "malformed messages were not counted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // B holds 8 blocks of P. A stores all 12 in three batches, but batch 2 is lost on the
    // wire: the gap is detected at batch 3 and batch 2 is fetched from the replay socket.
    publisher
        .publish(&tb, 0, &stored(500..508, None, &t[..128]), false)
        .await;
    publisher
        .publish(&ta, 1, &stored(100..104, None, &t[..64]), false)
        .await;
    publisher
        .publish(&ta, 2, &stored(104..108, Some(103), &t[64..128]), true)
        .await;
    publisher
        .publish(&ta, 3, &stored(108..112, Some(107), &t[128..]), false)
        .await;
    until_routed(&epp, &p, a, "a's lost batch was replayed").await;
    until_metric(&epp, "llmsched_kv_events_replayed_total", 1.0).await;

    // Reordered: batch 5 (A drops blocks 4..12) arrives before batch 4 (an unrelated store).
    // Batch 4 is replayed at the gap, so the late copy is a duplicate; A keeps 4 blocks and
    // P goes to B.
    let other = SimTokenizer::default().encode(&words(21, 16)).unwrap();
    let removed = EventBatch {
        ts: 0.0,
        events: vec![KvEvent::BlockRemoved(BlockRemoved {
            block_hashes: (104..112).collect(),
            ..BlockRemoved::default()
        })],
        data_parallel_rank: None,
    };
    publisher
        .publish(&ta, 4, &stored(900..901, None, &other), true)
        .await;
    publisher.publish(&ta, 5, &removed, false).await;
    let late = publisher
        .replay
        .lock()
        .iter()
        .find(|(s, _)| *s == 4)
        .map(|(_, p)| p.clone())
        .unwrap();
    publisher
        .raw(vec![
            Bytes::from(ta.clone()),
            Bytes::copy_from_slice(&encode_seq(4)),
            late,
        ])
        .await;
    until_routed(&epp, &p, b, "a's removal applied in order").await;

    // A garbled payload mid-stream does not stop ingestion of what follows.
    publisher
        .raw(vec![
            Bytes::from(ta.clone()),
            Bytes::copy_from_slice(&encode_seq(6)),
            Bytes::from_static(b"\x93\xa1x"),
        ])
        .await;
    publisher
        .publish(&ta, 7, &stored(104..108, Some(103), &t[64..128]), false)
        .await;
    publisher
        .publish(&ta, 8, &stored(108..112, Some(107), &t[128..]), false)
        .await;
    until_routed(&epp, &p, a, "ingestion continues after a garbled batch").await;

    epp.shutdown().await;
    a_sim.shutdown().await;
    b_sim.shutdown().await;
}

#[test]
fn the_example_precise_configs_load() {
    let scorers = |file: &str| -> Vec<(String, f64)> {
        let path = format!("{}/../../config/epp/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(path).unwrap();
        let cfg = llmsched_core::config::load(
            &text,
            llmsched_core::config::ConfigSource::Text,
            &llmsched_plugins::default_registry(),
            &llmsched_core::registry::PluginHandle::default(),
        )
        .unwrap();
        cfg.scheduler.profiles()[0]
            .scorers()
            .iter()
            .map(|s| (s.scorer.type_name().to_string(), s.weight))
            .collect()
    };
    let named = |v: &[(&str, f64)]| -> Vec<(String, f64)> {
        v.iter().map(|(n, w)| (n.to_string(), *w)).collect()
    };
    assert_eq!(
        scorers("precise-prefix-cache.yaml"),
        named(&[
            ("precise-prefix-cache-scorer", 4.0),
            ("prefill-load-scorer", 4.0),
            ("kv-cache-utilization-scorer", 1.0),
            ("queue-scorer", 1.0)
        ])
    );
    // The reference guide's weights.
    assert_eq!(
        scorers("precise-prefix-cache-reference.yaml"),
        named(&[
            ("precise-prefix-cache-scorer", 3.0),
            ("kv-cache-utilization-scorer", 2.0),
            ("queue-scorer", 2.0)
        ])
    );
}
