//! Issue 12, "one packet kills the EPP": with the precise scorer binding its KV-event port, a
//! TCP connection sending a ZMTP greeting and a frame header announcing 2^62 bytes made the
//! process abort inside the old `zeromq` crate. Here the real EPP (`llmsched_epp::start`, in
//! process: an abort would kill the test) takes that packet, and other hostile connections,
//! over real loopback sockets while a simulator replica publishes real KV events to it: each
//! attack shows up in `llmsched_kv_events_transport_errors_total{reason}`, and the replica's
//! events keep arriving.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::time::{Duration, Instant};

use clap::Parser;
use llmsched_epp::{Args, EppHandle};
use llmsched_kvevents::ConnectMode;
use llmsched_sim::{ClusterConfig, KvEventsConfig, ReplicaConfig, SimCluster};

const MODEL: &str = "Qwen/Qwen3-32B";
const DEADLINE: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(zmq: u16) -> String {
    format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\n\
         kind: EndpointPickerConfig\n\
         plugins:\n\
         - type: precise-prefix-cache-scorer\n\
         \x20 parameters:\n\
         \x20   tokenProcessorConfig: {{blockSize: 16}}\n\
         \x20   kvEventsConfig: {{zmqEndpoint: \"tcp://127.0.0.1:{zmq}\"}}\n\
         schedulingProfiles:\n\
         - name: default\n\
         \x20 plugins:\n\
         \x20 - pluginRef: precise-prefix-cache-scorer\n"
    )
}

async fn start_epp(endpoint: SocketAddr, config: &str) -> EppHandle {
    let args = Args::try_parse_from([
        "epp".to_string(),
        "--secure-serving=false".into(),
        "--grpc-port=0".into(),
        "--grpc-health-port=0".into(),
        "--metrics-port=0".into(),
        "--bind-address=127.0.0.1".into(),
        "--refresh-metrics-interval=50ms".into(),
        format!("--endpoints={endpoint}"),
        format!("--config-text={config}"),
    ])
    .unwrap();
    llmsched_epp::start(args).await.unwrap()
}

async fn http(addr: SocketAddr, req: String) -> String {
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

/// A completion straight to the replica (it stores KV blocks and publishes events).
async fn complete(addr: SocketAddr, seed: u32) {
    let prompt: Vec<String> = (0..64).map(|i| format!("w{seed}x{i}")).collect();
    let body = serde_json::json!({
        "model": MODEL, "prompt": prompt.join(" "), "max_tokens": 2, "ignore_eos": true
    })
    .to_string();
    let r = http(
        addr,
        format!(
            "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}

async fn metric(epp: &EppHandle, name: &str) -> f64 {
    let addr = epp.metrics_addr;
    let text = http(
        addr,
        format!("GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"),
    )
    .await;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Sends completions to the replica until the EPP's applied-events counter passes `above`.
async fn events_arrive(epp: &EppHandle, replica: SocketAddr, above: f64, seed: &mut u32) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        *seed += 1;
        complete(replica, *seed).await;
        if metric(epp, "llmsched_kv_events_events_total").await > above {
            return;
        }
        assert!(Instant::now() < deadline, "the replica's events stopped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xFF;
    g[9] = 0x7F;
    g[10] = 3;
    g[11] = 1;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// Sends `bytes` on a new connection and waits until the EPP closes it.
fn attack(port: u16, bytes: &[u8]) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("the EPP kept the hostile connection open")
            }
            Err(_) => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_packet_no_longer_kills_the_epp() {
    let zmq = free_port();
    let mut kv = KvEventsConfig::new(format!("tcp://127.0.0.1:{zmq}"));
    kv.mode = ConnectMode::Connect;
    let replica = ReplicaConfig::from_profile("qwen3-32b-tp2-h100")
        .unwrap()
        .with_time_scale(50.0);
    let cluster = SimCluster::start(
        ClusterConfig::new(vec!["127.0.0.1:0".parse().unwrap()], replica).with_kv_events(kv),
    )
    .await
    .unwrap();
    let r = cluster.addrs()[0];
    let epp = start_epp(r, &config(zmq)).await;
    let mut seed = 0;
    events_arrive(&epp, r, 0.0, &mut seed).await;

    // The packet: a greeting and a frame header announcing 2^62 bytes, 4 times.
    let mut packet = greeting().to_vec();
    packet.push(0x02);
    packet.extend_from_slice(&(1u64 << 62).to_be_bytes());
    for _ in 0..4 {
        let p = packet.clone();
        tokio::task::spawn_blocking(move || attack(zmq, &p))
            .await
            .unwrap();
    }
    // Other hostile connections: not ZMTP, a wrong mechanism, 10,000 one-byte frames.
    let mut curve = greeting();
    curve[12..17].copy_from_slice(b"CURVE");
    let mut frames = greeting().to_vec();
    let mut ready = vec![0x04, 0, 5];
    ready.extend_from_slice(b"READY");
    ready.push(11);
    ready.extend_from_slice(b"Socket-Type");
    ready.extend_from_slice(&3u32.to_be_bytes());
    ready.extend_from_slice(b"PUB");
    ready[1] = (ready.len() - 2) as u8;
    frames.extend_from_slice(&ready);
    for i in 0..10_000 {
        frames.extend_from_slice(&[u8::from(i < 9_999), 1, b'x']);
    }
    for bytes in [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        curve.to_vec(),
        frames.clone(),
    ] {
        tokio::task::spawn_blocking(move || attack(zmq, &bytes))
            .await
            .unwrap();
    }

    let errors =
        |reason: &str| format!("llmsched_kv_events_transport_errors_total{{reason=\"{reason}\"}}");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let counts = [
            metric(&epp, &errors("frame_too_large")).await,
            metric(&epp, &errors("bad_greeting")).await,
            metric(&epp, &errors("bad_mechanism")).await,
            metric(&epp, &errors("too_many_frames")).await,
        ];
        if counts == [4.0, 1.0, 1.0, 1.0] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "transport errors not counted as expected: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nothing reached the event decoder, and the replica's connection is untouched.
    assert_eq!(
        metric(&epp, "llmsched_kv_events_malformed_total").await,
        0.0
    );
    let before = metric(&epp, "llmsched_kv_events_events_total").await;
    events_arrive(&epp, r, before, &mut seed).await;
    epp.shutdown().await;
    cluster.shutdown().await;
}
