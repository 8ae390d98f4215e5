//! Hostile peers against the KV-event sockets, over real TCP on loopback: each attack closes
//! only its own connection, is counted under its reason, and never stops a legitimate
//! publisher (on another connection) from delivering. Issue 12's reproduction — a greeting and
//! a frame header announcing 2^62 bytes, which made the `zeromq` crate abort the process on a
//! failed allocation — is the first test.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use llmsched_kvevents::zmtp::{
    self, Decoded, Decoder, ErrorReason, Limits, PubSocket, TransportStats,
};
use llmsched_kvevents::{
    BlockStored, ConnectMode, EventBatch, EventSink, KvEvent, KvEventPublisher, KvEventSubscriber,
    PublisherConfig, Source, SubscriberConfig,
};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Default)]
struct Recorder {
    hashes: Mutex<Vec<u64>>,
}

impl EventSink for Recorder {
    fn apply(&self, _source: &Source<'_>, batch: &EventBatch) {
        if let Some(KvEvent::BlockStored(s)) = batch.events.first() {
            self.hashes.lock().push(s.block_hashes[0]);
        }
    }
    fn reset(&self, _source: &Source<'_>) {}
}

fn batch(hash: u64) -> EventBatch {
    EventBatch {
        ts: 1.0,
        events: vec![KvEvent::BlockStored(BlockStored {
            block_hashes: vec![hash],
            token_ids: vec![1; 16],
            block_size: 16,
            ..BlockStored::default()
        })],
        data_parallel_rank: None,
    }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A bound subscriber with a legitimate publisher dialling it, already delivering.
struct Fixture {
    sub: KvEventSubscriber,
    sink: Arc<Recorder>,
    publisher: KvEventPublisher,
    next: u64,
}

impl Fixture {
    async fn new(limits: Limits) -> Self {
        let sink = Arc::new(Recorder::default());
        let cfg = SubscriberConfig {
            limits,
            ..SubscriberConfig::default()
        };
        let sub = KvEventSubscriber::bind(
            cfg,
            "tcp://127.0.0.1:0",
            sink.clone(),
            tokio::runtime::Handle::current(),
        )
        .unwrap();
        let mut pcfg = PublisherConfig::new(sub.endpoint().unwrap());
        pcfg.mode = ConnectMode::Connect;
        pcfg.topic = "kv@10.0.0.1:8000@m".into();
        let publisher = KvEventPublisher::start(pcfg).await.unwrap();
        let mut f = Fixture {
            sub,
            sink,
            publisher,
            next: 1,
        };
        f.still_delivers().await;
        f
    }

    /// Publishes a new batch until it has been applied.
    async fn still_delivers(&mut self) {
        let marker = 1_000_000 + self.next;
        self.next += 1;
        let sink = self.sink.clone();
        let publisher = &self.publisher;
        until("the legitimate publisher's batch", || {
            publisher.publish(batch(marker));
            sink.hashes.lock().contains(&marker)
        })
        .await;
    }

    fn endpoint(&self) -> String {
        self.sub
            .endpoint()
            .unwrap()
            .trim_start_matches("tcp://")
            .to_string()
    }

    fn errors(&self, reason: ErrorReason) -> u64 {
        self.sub.stats().transport().errors(reason)
    }

    async fn wait_error(&self, reason: ErrorReason) {
        until(&format!("a {reason} error"), || self.errors(reason) >= 1).await;
    }
}

/// Reads until the peer closes the connection (EOF or reset); fails after 30 s.
async fn closed_by_peer(s: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the hostile connection was not closed"),
        }
    }
}

fn ready(socket_type: &str) -> BytesMut {
    let mut props = BytesMut::new();
    props.put_u8(11);
    props.put_slice(b"Socket-Type");
    props.put_u32(socket_type.len() as u32);
    props.put_slice(socket_type.as_bytes());
    let mut out = BytesMut::new();
    zmtp::encode_command(b"READY", &props, &mut out);
    out
}

/// Connects and completes a real handshake as a `socket_type` peer.
async fn handshaken(endpoint: &str, socket_type: &str) -> TcpStream {
    let mut s = TcpStream::connect(endpoint).await.unwrap();
    s.write_all(&zmtp::greeting()).await.unwrap();
    s.write_all(&ready(socket_type)).await.unwrap();
    let mut g = [0u8; 64];
    s.read_exact(&mut g).await.unwrap();
    zmtp::parse_greeting(&g).unwrap();
    s
}

fn huge_frame_header() -> Vec<u8> {
    let mut h = vec![0x02u8];
    h.extend_from_slice(&(1u64 << 62).to_be_bytes());
    h
}

fn short_limits() -> Limits {
    Limits {
        handshake_timeout: Duration::from_millis(500),
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_12_greeting_then_a_2_pow_62_frame_is_a_counted_error_not_an_abort() {
    let mut f = Fixture::new(Limits::default()).await;
    // Exactly the issue's bytes: a greeting, then a frame header announcing 2^62 bytes.
    let mut s = TcpStream::connect(f.endpoint()).await.unwrap();
    s.write_all(&zmtp::greeting()).await.unwrap();
    s.write_all(&huge_frame_header()).await.unwrap();
    closed_by_peer(&mut s).await;
    f.wait_error(ErrorReason::FrameTooLarge).await;
    f.still_delivers().await;

    // The same after a complete handshake, and many times over: each one is counted.
    for _ in 0..20 {
        let mut s = handshaken(&f.endpoint(), "PUB").await;
        s.write_all(&huge_frame_header()).await.unwrap();
        closed_by_peer(&mut s).await;
    }
    until("21 frame_too_large errors", || {
        f.errors(ErrorReason::FrameTooLarge) >= 21
    })
    .await;
    f.still_delivers().await;
    assert_eq!(f.sub.stats().malformed(), 0, "nothing reached the decoder");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_wrong_greetings() {
    let mut f = Fixture::new(short_limits()).await;
    // Half a greeting, then the peer leaves.
    let mut s = TcpStream::connect(f.endpoint()).await.unwrap();
    s.write_all(&zmtp::greeting()[..20]).await.unwrap();
    drop(s);
    f.wait_error(ErrorReason::BadGreeting).await;
    // Half a greeting, then silence: the handshake deadline closes it.
    let mut s = TcpStream::connect(f.endpoint()).await.unwrap();
    s.write_all(&zmtp::greeting()[..20]).await.unwrap();
    closed_by_peer(&mut s).await;
    f.wait_error(ErrorReason::HandshakeTimeout).await;
    // Not ZMTP at all.
    let mut s = TcpStream::connect(f.endpoint()).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    closed_by_peer(&mut s).await;
    until("2 bad greetings", || {
        f.errors(ErrorReason::BadGreeting) >= 2
    })
    .await;
    // ZMTP 2.0.
    let mut s = TcpStream::connect(f.endpoint()).await.unwrap();
    let mut g = zmtp::greeting();
    g[10] = 1;
    s.write_all(&g).await.unwrap();
    closed_by_peer(&mut s).await;
    f.wait_error(ErrorReason::UnsupportedVersion).await;
    f.still_delivers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_mechanism_and_socket_type_and_oversized_command() {
    let mut f = Fixture::new(Limits::default()).await;
    let mut s = TcpStream::connect(f.endpoint()).await.unwrap();
    let mut g = zmtp::greeting();
    g[12..17].copy_from_slice(b"CURVE");
    s.write_all(&g).await.unwrap();
    closed_by_peer(&mut s).await;
    f.wait_error(ErrorReason::BadMechanism).await;

    // A ROUTER cannot talk to a SUB: we answer with an ERROR command and close.
    let mut s = handshaken(&f.endpoint(), "ROUTER").await;
    let mut buf = BytesMut::new();
    let mut d = Decoder::new(&Limits::default());
    let mut names = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            s.read_buf(&mut buf),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {
                while let Ok(Some(Decoded::Command(c))) = d.decode(&mut buf) {
                    names.push(String::from_utf8_lossy(&c.name).into_owned());
                }
            }
            Err(_) => panic!("not closed"),
        }
    }
    assert_eq!(names, vec!["READY", "ERROR"]);
    f.wait_error(ErrorReason::SocketType).await;

    // A READY command announcing 1 MiB (the cap is 64 KiB).
    let mut s = TcpStream::connect(f.endpoint()).await.unwrap();
    s.write_all(&zmtp::greeting()).await.unwrap();
    let mut h = vec![0x06u8];
    h.extend_from_slice(&(1u64 << 20).to_be_bytes());
    s.write_all(&h).await.unwrap();
    closed_by_peer(&mut s).await;
    f.wait_error(ErrorReason::CommandTooLarge).await;
    f.still_delivers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_ending_handshake_and_silent_connections_time_out() {
    let mut f = Fixture::new(short_limits()).await;
    // A greeting, then never a READY.
    let mut s = TcpStream::connect(f.endpoint()).await.unwrap();
    s.write_all(&zmtp::greeting()).await.unwrap();
    closed_by_peer(&mut s).await;
    f.wait_error(ErrorReason::HandshakeTimeout).await;
    // Connections that open and send nothing: closed at the deadline, each counted.
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(TcpStream::connect(f.endpoint()).await.unwrap());
    }
    for s in &mut silent {
        closed_by_peer(s).await;
    }
    until("6 handshake timeouts", || {
        f.errors(ErrorReason::HandshakeTimeout) >= 6
    })
    .await;
    // A connection that opens and closes without a byte (a TCP probe) is not an error.
    let before = f.sub.stats().transport().total_errors();
    drop(TcpStream::connect(f.endpoint()).await.unwrap());
    f.still_delivers().await;
    assert_eq!(f.sub.stats().transport().total_errors(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tiny_frames_hit_the_frame_count_cap() {
    let mut f = Fixture::new(Limits::default()).await;
    let mut s = handshaken(&f.endpoint(), "PUB").await;
    // One message of 10,000 one-byte frames (MORE on all but the last).
    let mut msg = Vec::with_capacity(30_000);
    for i in 0..10_000 {
        msg.extend_from_slice(&[u8::from(i < 9_999), 1, b'x']);
    }
    // The peer may close before everything is written.
    let _ = s.write_all(&msg).await;
    closed_by_peer(&mut s).await;
    f.wait_error(ErrorReason::TooManyFrames).await;
    // A message over the size cap, made of frames under the frame cap.
    let limits = Limits {
        max_message_bytes: 64 << 10,
        ..Limits::default()
    };
    let mut f2 = Fixture::new(limits).await;
    let mut s = handshaken(&f2.endpoint(), "PUB").await;
    let mut out = BytesMut::new();
    let big = vec![0u8; 40 << 10];
    zmtp::encode_message(&[&b"kv@x"[..], &big, &big], &mut out);
    let _ = s.write_all(&out).await;
    closed_by_peer(&mut s).await;
    f2.wait_error(ErrorReason::MessageTooLarge).await;
    f.still_delivers().await;
    f2.still_delivers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_closes_the_excess_with_a_count() {
    let limits = Limits {
        max_connections: 3,
        ..Limits::default()
    };
    // The legitimate publisher holds one of the three slots.
    let mut f = Fixture::new(limits).await;
    let _a = TcpStream::connect(f.endpoint()).await.unwrap();
    let _b = TcpStream::connect(f.endpoint()).await.unwrap();
    let mut c = TcpStream::connect(f.endpoint()).await.unwrap();
    closed_by_peer(&mut c).await;
    f.wait_error(ErrorReason::ConnectionLimit).await;
    f.still_delivers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_survives_hostile_subscribers() {
    let stats = Arc::new(TransportStats::default());
    let mut p = PubSocket::new(Limits::default(), stats.clone());
    let ep = p.bind("tcp://127.0.0.1:0").await.unwrap();
    let addr = ep.trim_start_matches("tcp://").to_string();
    let mut s = handshaken(&addr, "SUB").await;
    s.write_all(&huge_frame_header()).await.unwrap();
    closed_by_peer(&mut s).await;
    until("frame_too_large", || {
        stats.errors(ErrorReason::FrameTooLarge) >= 1
    })
    .await;
    // A subscriber subscribing to 2,000 distinct topics hits the subscription cap.
    let mut s = handshaken(&addr, "SUB").await;
    let mut out = BytesMut::new();
    for i in 0..2000 {
        zmtp::encode_command(b"SUBSCRIBE", format!("t{i}").as_bytes(), &mut out);
    }
    let _ = s.write_all(&out).await;
    closed_by_peer(&mut s).await;
    until("too_many_subscriptions", || {
        stats.errors(ErrorReason::TooManySubscriptions) >= 1
    })
    .await;
    // A well-behaved subscriber still gets messages.
    let mut sub = zmtp::SubSocket::connect(&ep, &[b"kv@"], Limits::default(), stats.clone())
        .await
        .unwrap();
    let frames = [Bytes::from_static(b"kv@a"), Bytes::from_static(b"x")];
    let got = loop {
        p.send(&frames);
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(50), sub.recv()).await {
            break m.unwrap();
        }
    };
    assert_eq!(got, frames.to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscriber_is_dropped_for_not_buffered() {
    // A subscriber that subscribes to everything and never reads: the PUB keeps at most
    // `send_queue` messages for it and drops the rest (libzmq's HWM), instead of growing.
    let stats = Arc::new(TransportStats::default());
    let limits = Limits {
        send_queue: 16,
        ..Limits::default()
    };
    let mut p = PubSocket::new(limits, stats.clone());
    let ep = p.bind("tcp://127.0.0.1:0").await.unwrap();
    let mut s = handshaken(ep.trim_start_matches("tcp://"), "SUB").await;
    let mut out = BytesMut::new();
    zmtp::encode_command(b"SUBSCRIBE", b"", &mut out);
    s.write_all(&out).await.unwrap();
    until("the subscription", || p.subscribed_count() == 1).await;
    let frames = [
        Bytes::from_static(b"kv@t"),
        Bytes::from(vec![0u8; 256 << 10]),
    ];
    // 256 MiB offered to a subscriber that reads nothing.
    for _ in 0..1024 {
        p.send(&frames);
        assert!(p.queued() <= 16, "queue bound exceeded: {}", p.queued());
        tokio::task::yield_now().await;
    }
    assert!(stats.hwm_drops() > 900, "drops: {}", stats.hwm_drops());
    drop(s);
}
