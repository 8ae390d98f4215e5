//! The subscriber against the real publisher, over real ZMQ sockets on loopback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llmsched_kvevents::{
    BlockStored, ConnectMode, EventBatch, EventSink, KvEvent, KvEventPublisher, KvEventSubscriber,
    PublisherConfig, Source, SubscriberConfig,
};
use parking_lot::Mutex;

#[derive(Default)]
struct Recorder {
    applied: Mutex<Vec<(String, Option<String>, u64)>>,
    resets: Mutex<Vec<String>>,
}

impl EventSink for Recorder {
    fn apply(&self, source: &Source<'_>, batch: &EventBatch) {
        let first = match batch.events.first() {
            Some(KvEvent::BlockStored(s)) => s.block_hashes[0],
            _ => 0,
        };
        self.applied.lock().push((
            source.topic.to_string(),
            source.peer.map(str::to_string),
            first,
        ));
    }

    fn reset(&self, source: &Source<'_>) {
        self.resets.lock().push(source.topic.to_string());
    }
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
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_mode_receives_in_order_from_dialling_publishers() {
    let sink = Arc::new(Recorder::default());
    let sub = KvEventSubscriber::bind(
        SubscriberConfig::default(),
        "tcp://127.0.0.1:0",
        sink.clone(),
        tokio::runtime::Handle::current(),
    )
    .unwrap();
    let ep = sub.endpoint().unwrap().to_string();
    let mut cfg = PublisherConfig::new(ep);
    cfg.mode = ConnectMode::Connect;
    cfg.topic = "kv@10.0.0.1:8000@m".into();
    let publisher = KvEventPublisher::start(cfg).await.unwrap();
    // Publish until the subscription is established, then a numbered run.
    until("first batch", || {
        publisher.publish(batch(0));
        !sink.applied.lock().is_empty()
    })
    .await;
    let base = sink.applied.lock().len();
    for h in 1..=200 {
        publisher.publish(batch(h));
    }
    until("all batches", || sink.applied.lock().len() >= base + 200).await;
    // (Extra copies of the probe batch 0 may still have been in flight.)
    let got: Vec<u64> = sink.applied.lock()[base..]
        .iter()
        .map(|a| a.2)
        .filter(|&h| h != 0)
        .collect();
    assert_eq!(got, (1..=200).collect::<Vec<_>>());
    assert_eq!(sub.stats().malformed(), 0);
    assert_eq!(sub.stats().gaps(), 0);
    // Wrong-topic traffic is filtered by the subscription.
    assert!(
        sink.applied
            .lock()
            .iter()
            .all(|a| a.0 == "kv@10.0.0.1:8000@m")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialling_mode_reconnects_to_a_publisher_that_comes_back() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sink = Arc::new(Recorder::default());
    let scfg = SubscriberConfig {
        reconnect_interval: Duration::from_millis(100),
        ..SubscriberConfig::default()
    };
    let sub = KvEventSubscriber::dialing(scfg, sink.clone(), tokio::runtime::Handle::current());
    // Dialling before the publisher exists is fine: it retries.
    sub.add_peer("10.0.0.1:8000", &format!("tcp://127.0.0.1:{port}"));
    let start = |first_seq| {
        let mut cfg = PublisherConfig::new(format!("tcp://127.0.0.1:{port}"));
        cfg.mode = ConnectMode::Bind;
        cfg.topic = "kv@10.0.0.1:8000@m".into();
        cfg.first_seq = first_seq;
        KvEventPublisher::start(cfg)
    };
    let p = start(0).await.unwrap();
    until("first publisher", || {
        p.publish(batch(7));
        !sink.applied.lock().is_empty()
    })
    .await;
    assert_eq!(sink.applied.lock()[0].1.as_deref(), Some("10.0.0.1:8000"));
    // A long first life, so the restarted publisher's numbers are well below it.
    let before = sink.applied.lock().len();
    for _ in 0..500 {
        p.publish(batch(8));
    }
    until("first life", || sink.applied.lock().len() >= before + 500).await;
    p.shutdown().await;
    // The publisher restarts (sequence from 0 again): reconnected, detected as a restart.
    let p = start(0).await.unwrap();
    let before = sink.applied.lock().len();
    until("second publisher", || {
        p.publish(batch(9));
        sink.applied.lock()[before..].iter().any(|a| a.2 == 9)
    })
    .await;
    until("restart detected", || !sink.resets.lock().is_empty()).await;
    sub.remove_peer("10.0.0.1:8000");
    assert!(sub.peers().is_empty());
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wild_sequence_numbers_and_garbage_neither_hang_nor_stop_the_subscriber() {
    use bytes::Bytes;
    use llmsched_kvevents::wire::{EncodeOptions, encode_batch, encode_seq};
    use llmsched_kvevents::zmtp::{Limits, PubSocket, TransportStats};

    let sink = Arc::new(Recorder::default());
    let sub = KvEventSubscriber::bind(
        SubscriberConfig::default(),
        "tcp://127.0.0.1:0",
        sink.clone(),
        tokio::runtime::Handle::current(),
    )
    .unwrap();
    let mut p = PubSocket::new(Limits::default(), Arc::new(TransportStats::default()));
    p.connect(sub.endpoint().unwrap(), Duration::from_millis(100));
    let topic = Bytes::from_static(b"kv@10.0.0.1:8000@m");
    let msg = |seq: u64, payload: Bytes| {
        vec![
            topic.clone(),
            Bytes::copy_from_slice(&encode_seq(seq)),
            payload,
        ]
    };
    let good = |h| Bytes::from(encode_batch(&batch(h), EncodeOptions::default()));
    // Numbered probes until the subscription is up.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seq = 0;
    while sink.applied.lock().is_empty() {
        assert!(Instant::now() < deadline, "no batch arrived");
        p.send(&msg(seq, good(5)));
        seq += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = sink.applied.lock().len();
    p.send(&msg(seq, Bytes::from_static(b"\xc1 not msgpack")));
    p.send(&msg(u64::MAX - 10, good(77)));
    p.send(&msg(u64::MAX - 9, good(78)));
    until("batches after a huge gap", || {
        sink.applied.lock()[before..].iter().any(|a| a.2 == 78)
    })
    .await;
    assert!(sub.stats().malformed() >= 1);
    // A jump of ~2^64 is beyond the restart window: a publisher restart (the source is
    // reset), not a gap of 2^64 missed batches.
    assert!(sub.stats().restarts() >= 1);
    assert!(sub.stats().missed() <= SubscriberConfig::default().restart_window);
    assert!(!sink.resets.lock().is_empty());
}
