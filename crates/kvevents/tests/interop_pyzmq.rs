//! Interoperability with the real libzmq, through pyzmq (what vLLM's KV-event publisher uses),
//! over loopback:
//!
//! * a pyzmq PUB (binding, as vLLM does by default, and connecting, as with
//!   `--kv-events-config '{"endpoint": "tcp://epp:5557"}'`) publishing vLLM's three-frame
//!   `[topic, seq (8 bytes BE), msgpack payload]` messages → our subscriber;
//! * our publisher (the simulator's) → a pyzmq SUB (connecting and binding);
//! * a pyzmq ROUTER serving vLLM's replay protocol → our DEALER (`fetch_replay`), and our
//!   replay ROUTER → a pyzmq DEALER.
//!
//! pyzmq and msgpack come from `scripts/install-tools.sh --python-path` (`./.tools`), found
//! through `LLMSCHED_PYTHONPATH` or the default `.tools` folder. Under `scripts/test.sh`
//! (`LLMSCHED_REQUIRE_PYZMQ=1`) a missing pyzmq fails these tests; elsewhere they print why
//! they skip.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use llmsched_kvevents::subscriber::fetch_replay;
use llmsched_kvevents::zmtp::ErrorReason;
use llmsched_kvevents::{
    BlockStored, ConnectMode, EncodeOptions, EventBatch, EventSink, KvEvent, KvEventPublisher,
    KvEventSubscriber, Layout, PublisherConfig, Source, SubscriberConfig,
};
use parking_lot::Mutex;

/// The directory holding `zmq` and `msgpack`, or `None` (after printing why) when the tests
/// may skip. Panics under `scripts/test.sh` when pyzmq is unavailable.
fn python_path() -> Option<String> {
    let required = std::env::var("LLMSCHED_REQUIRE_PYZMQ").is_ok_and(|v| v == "1");
    let candidates: Vec<String> = match std::env::var("LLMSCHED_PYTHONPATH") {
        Ok(p) if !p.is_empty() => vec![p],
        _ => {
            let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.tools");
            std::fs::read_dir(&tools)
                .map(|d| {
                    d.filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|p| {
                            p.file_name()
                                .is_some_and(|n| n.to_string_lossy().starts_with("python-pyzmq"))
                        })
                        .map(|p| p.to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        }
    };
    for dir in &candidates {
        let ok = Command::new("python3")
            .args(["-c", "import zmq, msgpack"])
            .env("PYTHONPATH", dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(dir.clone());
        }
    }
    let why = format!(
        "pyzmq/msgpack not importable (tried {candidates:?}); run `scripts/install-tools.sh --python-path` \
         and set LLMSCHED_PYTHONPATH to the directory it prints"
    );
    assert!(!required, "ZMQ interop tests need pyzmq: {why}");
    eprintln!("skipping pyzmq interop test: {why}");
    None
}

/// A Python helper process; killed when dropped. Its stdout lines arrive on `lines`.
struct Py {
    child: Child,
    lines: std_mpsc::Receiver<String>,
}

impl Py {
    fn spawn(pythonpath: &str, script: &str, args: &[&str]) -> Py {
        let mut child = Command::new("python3")
            .arg("-u")
            .arg("-c")
            .arg(script)
            .args(args)
            .env("PYTHONPATH", pythonpath)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Py { child, lines }
    }

    /// The next stdout line (generous deadline: a loaded machine starts Python slowly).
    fn line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(60))
            .expect("the Python helper printed nothing within 60 s (see its stderr above)")
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// vLLM's publisher: PUB socket, `[topic, seq, msgpack]`, seq from 0, a batch every 20 ms
/// (in the positional layout, or the map layout of newer vLLM), for at most 60 s.
const PY_PUB: &str = r#"
import sys, time, struct, zmq, msgpack
mode, endpoint, topic, layout = sys.argv[1:5]
ctx = zmq.Context()
s = ctx.socket(zmq.PUB)
if mode == "bind":
    port = s.bind_to_random_port("tcp://127.0.0.1")
    print(f"tcp://127.0.0.1:{port}", flush=True)
else:
    s.connect(endpoint)
    print("connected", flush=True)
def batch(seq):
    hashes = [seq * 100 + i for i in range(32)]
    tokens = [(seq * 7 + i) % 150000 for i in range(32 * 16)]
    parent = None if seq == 0 else seq * 100 - 1
    if layout == "map":
        ev = {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent,
              "token_ids": tokens, "block_size": 16, "lora_id": None, "medium": "GPU",
              "lora_name": None}
        return {"ts": time.time(), "events": [ev], "data_parallel_rank": 0}
    ev = ["BlockStored", hashes, parent, tokens, 16, None, "GPU", None]
    return [time.time(), [ev], 0]
deadline = time.time() + 60
seq = 0
while time.time() < deadline:
    s.send_multipart([topic.encode(), struct.pack(">Q", seq), msgpack.packb(batch(seq))])
    seq += 1
    time.sleep(0.02)
"#;

/// A SUB socket subscribed to `kv@`, printing one line per message:
/// `<frames> <topic> <seq> <first block hash> <events>`.
const PY_SUB: &str = r#"
import sys, struct, zmq, msgpack
mode, endpoint = sys.argv[1:3]
ctx = zmq.Context()
s = ctx.socket(zmq.SUB)
s.setsockopt(zmq.SUBSCRIBE, b"kv@")
s.setsockopt(zmq.RCVTIMEO, 60000)
if mode == "bind":
    port = s.bind_to_random_port("tcp://127.0.0.1")
    print(f"tcp://127.0.0.1:{port}", flush=True)
else:
    s.connect(endpoint)
    print("connected", flush=True)
while True:
    frames = s.recv_multipart()
    topic, seq, payload = frames[0], frames[1], frames[-1]
    b = msgpack.unpackb(payload, strict_map_key=False)
    events = b["events"] if isinstance(b, dict) else b[1]
    ev = events[0]
    hashes = ev["block_hashes"] if isinstance(ev, dict) else ev[1]
    print(len(frames), topic.decode(), struct.unpack(">Q", seq)[0], hashes[0], len(events), flush=True)
"#;

/// vLLM's replay service: ROUTER; `[id, b"", start]` → `[id, b"", seq, payload]` for each
/// buffered batch with seq >= start, then `[id, b"", END_SEQ, b""]`. Buffer: seqs 10..20.
const PY_ROUTER: &str = r#"
import struct, zmq, msgpack
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
port = s.bind_to_random_port("tcp://127.0.0.1")
print(f"tcp://127.0.0.1:{port}", flush=True)
tokens = list(range(16 * 20))
buf = [(seq, msgpack.packb([1.5, [["BlockStored", [seq * 1000 + i for i in range(20)], None, tokens, 16, None, "GPU", None]], 0]))
       for seq in range(10, 20)]
END = (-1).to_bytes(8, "big", signed=True)
while True:
    frame = s.recv_multipart()
    if len(frame) != 3:
        print("bad request", len(frame), flush=True)
        continue
    ident, _, start = frame
    start = int.from_bytes(start, "big")
    for seq, p in buf:
        if seq >= start:
            s.send_multipart((ident, b"", seq.to_bytes(8, "big"), p))
    s.send_multipart((ident, b"", END, b""))
    print("served", start, flush=True)
"#;

/// A DEALER asking a replay ROUTER for everything from `start`; prints `<seq> <first hash>`
/// per batch, then `end`.
const PY_DEALER: &str = r#"
import sys, struct, zmq, msgpack
endpoint, start = sys.argv[1], int(sys.argv[2])
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.setsockopt(zmq.RCVTIMEO, 60000)
s.connect(endpoint)
s.send_multipart([b"", struct.pack(">Q", start)])
while True:
    frames = s.recv_multipart()
    _, seq, payload = frames
    seq = struct.unpack(">Q", seq)[0]
    if seq == 2**64 - 1 and not payload:
        print("end", flush=True)
        break
    b = msgpack.unpackb(payload)
    print(seq, b[1][0][1][0], flush=True)
"#;

#[derive(Default)]
struct Recorder {
    applied: Mutex<Vec<(String, Option<String>, EventBatch)>>,
}

impl EventSink for Recorder {
    fn apply(&self, source: &Source<'_>, batch: &EventBatch) {
        self.applied.lock().push((
            source.topic.to_string(),
            source.peer.map(str::to_string),
            batch.clone(),
        ));
    }
    fn reset(&self, _source: &Source<'_>) {}
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the Python publisher's batch `seq` holds.
fn check_python_batch(batch: &EventBatch) {
    let [KvEvent::BlockStored(b)] = batch.events.as_slice() else {
        panic!("expected one BlockStored, got {:?}", batch.events);
    };
    let seq = b.block_hashes[0] / 100;
    assert_eq!(
        b.block_hashes,
        (0..32).map(|i| seq * 100 + i).collect::<Vec<_>>()
    );
    assert_eq!(b.token_ids.len(), 512);
    assert_eq!(b.token_ids[0], ((seq * 7) % 150_000) as u32);
    assert_eq!(b.block_size, 16);
    assert_eq!(b.medium.as_deref(), Some("GPU"));
    assert_eq!(batch.data_parallel_rank, Some(0));
}

/// Receives from the Python publisher until 10 consecutive batches arrived; checks their
/// content, that no gap or malformed message was seen and that the transport saw no error.
async fn expect_python_stream(sub: &KvEventSubscriber, sink: &Recorder, topic: &str) {
    until("10 batches from pyzmq", || sink.applied.lock().len() >= 10).await;
    let applied = sink.applied.lock().clone();
    for (t, _, b) in &applied {
        assert_eq!(t, topic);
        check_python_batch(b);
    }
    let firsts: Vec<u64> = applied
        .iter()
        .map(|(_, _, b)| match &b.events[0] {
            KvEvent::BlockStored(s) => s.block_hashes[0] / 100,
            _ => u64::MAX,
        })
        .collect();
    assert!(
        firsts.windows(2).all(|w| w[1] == w[0] + 1),
        "batches in order without loss: {firsts:?}"
    );
    let st = sub.stats();
    assert_eq!(st.malformed(), 0);
    assert_eq!(st.gaps(), 0);
    assert_eq!(st.transport().total_errors(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyzmq_pub_binding_to_our_dialling_subscriber() {
    let Some(pp) = python_path() else { return };
    for layout in ["array", "map"] {
        let topic = "kv@10.0.0.7:8000@Qwen/Qwen3-8B";
        let py = Py::spawn(&pp, PY_PUB, &["bind", "-", topic, layout]);
        let endpoint = py.line();
        let sink = Arc::new(Recorder::default());
        let sub = KvEventSubscriber::dialing(
            SubscriberConfig::default(),
            sink.clone(),
            tokio::runtime::Handle::current(),
        );
        sub.add_peer("10.0.0.7:8000", &endpoint);
        expect_python_stream(&sub, &sink, topic).await;
        assert_eq!(
            sink.applied.lock()[0].1.as_deref(),
            Some("10.0.0.7:8000"),
            "{layout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyzmq_pub_dialling_our_bound_subscriber() {
    let Some(pp) = python_path() else { return };
    let sink = Arc::new(Recorder::default());
    let sub = KvEventSubscriber::bind(
        SubscriberConfig::default(),
        "tcp://127.0.0.1:0",
        sink.clone(),
        tokio::runtime::Handle::current(),
    )
    .unwrap();
    let topic = "kv@10.0.0.8:8000@m";
    let py = Py::spawn(
        &pp,
        PY_PUB,
        &["connect", sub.endpoint().unwrap(), topic, "array"],
    );
    assert_eq!(py.line(), "connected");
    expect_python_stream(&sub, &sink, topic).await;
}

fn batch(i: u64) -> EventBatch {
    EventBatch {
        ts: 2.0,
        events: vec![KvEvent::BlockStored(BlockStored {
            block_hashes: (0..40).map(|k| i * 1000 + k).collect(),
            parent_block_hash: None,
            token_ids: (0..640).collect(),
            block_size: 16,
            medium: Some("GPU".into()),
            ..Default::default()
        })],
        data_parallel_rank: Some(0),
    }
}

/// Publishes numbered batches until the Python SUB printed 5 lines; returns them parsed as
/// `(frames, topic, seq, first hash, events)`.
async fn publish_until_python_reads(
    publisher: &KvEventPublisher,
    py: &Py,
) -> Vec<(usize, String, u64, u64, usize)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    while got.len() < 5 {
        assert!(Instant::now() < deadline, "pyzmq SUB received nothing");
        publisher.publish(batch(i));
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        while let Ok(line) = py.lines.try_recv() {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f.len(), 5, "{line}");
            got.push((
                f[0].parse().unwrap(),
                f[1].to_string(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
                f[4].parse().unwrap(),
            ));
        }
    }
    got
}

fn check_python_saw(got: &[(usize, String, u64, u64, usize)], topic: &str) {
    for (frames, t, seq, first, events) in got {
        assert_eq!(*frames, 3);
        assert_eq!(t, topic);
        // seq n carries batch(n) (first_seq 0), whose first hash is n * 1000.
        assert_eq!(*first, seq * 1000);
        assert_eq!(*events, 1);
    }
    assert!(got.windows(2).all(|w| w[1].2 == w[0].2 + 1), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_publisher_to_pyzmq_sub() {
    let Some(pp) = python_path() else { return };
    let topic = "kv@10.0.0.9:8000@m";
    // Our PUB binds, pyzmq connects (the simulator's default).
    let mut cfg = PublisherConfig::new("tcp://127.0.0.1:0");
    cfg.mode = ConnectMode::Bind;
    cfg.topic = topic.into();
    let publisher = KvEventPublisher::start(cfg).await.unwrap();
    let py = Py::spawn(&pp, PY_SUB, &["connect", publisher.endpoint()]);
    assert_eq!(py.line(), "connected");
    let got = publish_until_python_reads(&publisher, &py).await;
    check_python_saw(&got, topic);
    assert_eq!(publisher.stats().transport().total_errors(), 0);
    publisher.shutdown().await;

    // pyzmq binds, our PUB dials it (llm-d's simulator mode), with the map encoding.
    let py = Py::spawn(&pp, PY_SUB, &["bind", "-"]);
    let endpoint = py.line();
    let mut cfg = PublisherConfig::new(endpoint);
    cfg.mode = ConnectMode::Connect;
    cfg.topic = topic.into();
    cfg.encode = EncodeOptions {
        layout: Layout::MapBatch,
        hashes_as_bytes: false,
    };
    let publisher = KvEventPublisher::start(cfg).await.unwrap();
    let got = publish_until_python_reads(&publisher, &py).await;
    check_python_saw(&got, topic);
    publisher.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyzmq_replay_router_to_our_dealer() {
    let Some(pp) = python_path() else { return };
    let py = Py::spawn(&pp, PY_ROUTER, &[]);
    let endpoint = py.line();
    let replies = fetch_replay(&endpoint, 15).await.expect("replay");
    let seqs: Vec<u64> = replies.iter().map(|r| r.0).collect();
    assert_eq!(seqs, (15..20).collect::<Vec<_>>());
    for (seq, payload) in &replies {
        let b = llmsched_kvevents::decode_batch(payload).unwrap();
        let KvEvent::BlockStored(s) = &b.events[0] else {
            panic!("expected BlockStored");
        };
        assert_eq!(s.block_hashes[0], seq * 1000);
        assert_eq!(s.token_ids.len(), 320);
    }
    assert_eq!(py.line(), "served 15");
    // Beyond the buffer: only the end marker.
    assert!(fetch_replay(&endpoint, 100).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_replay_router_to_pyzmq_dealer() {
    let Some(pp) = python_path() else { return };
    let mut cfg = PublisherConfig::new("tcp://127.0.0.1:0");
    cfg.mode = ConnectMode::Bind;
    cfg.replay_endpoint = Some("tcp://127.0.0.1:0".into());
    let publisher = KvEventPublisher::start(cfg).await.unwrap();
    for i in 0..8 {
        assert!(publisher.publish(batch(i)));
    }
    until("8 published", || publisher.stats().published() == 8).await;
    let py = Py::spawn(&pp, PY_DEALER, &[publisher.replay_endpoint().unwrap(), "5"]);
    let mut lines = Vec::new();
    loop {
        let l = py.line();
        if l == "end" {
            break;
        }
        lines.push(l);
    }
    assert_eq!(lines, vec!["5 5000", "6 6000", "7 7000"]);
    assert_eq!(publisher.stats().replays(), 1);
    assert_eq!(
        publisher
            .stats()
            .transport()
            .errors(ErrorReason::SocketType),
        0
    );
    publisher.shutdown().await;
}
