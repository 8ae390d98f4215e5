//! End-to-end tests of the publisher over real ZMQ sockets on loopback: a SUB socket receives
//! `[topic, seq, payload]` messages, a DEALER replays buffered batches from the ROUTER.

use std::time::Duration;

use bytes::Bytes;
use llmsched_kvevents::wire::{encode_seq, parse_replay_reply};
use llmsched_kvevents::zmtp::{DealerSocket, Limits, SubSocket, TransportStats};
use llmsched_kvevents::{
    BlockRemoved, BlockStored, ConnectMode, EncodeOptions, EventBatch, KvEvent, KvEventPublisher,
    Layout, PublisherConfig, WireMessage,
};
use std::sync::Arc;

fn batch(i: u64) -> EventBatch {
    EventBatch {
        ts: 1000.0 + i as f64,
        events: vec![
            KvEvent::BlockStored(BlockStored {
                block_hashes: vec![i * 10 + 1, i * 10 + 2],
                parent_block_hash: (i > 0).then_some(i),
                token_ids: (0..32).collect(),
                block_size: 16,
                medium: Some("GPU".into()),
                ..Default::default()
            }),
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: vec![i],
                medium: Some("GPU".into()),
                group_idx: None,
            }),
        ],
        data_parallel_rank: Some(0),
    }
}

async fn recv_frames(sub: &mut SubSocket) -> Vec<Bytes> {
    tokio::time::timeout(Duration::from_secs(10), sub.recv())
        .await
        .expect("timed out waiting for a KV-event message")
        .expect("recv failed")
}

/// Publishes batches until the subscriber (which may still be joining) sees one.
async fn first_message(publisher: &KvEventPublisher, sub: &mut SubSocket) -> WireMessage {
    for i in 0..200 {
        publisher.publish(batch(i));
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(50), sub.recv()).await {
            return WireMessage::from_frames(&m).expect("valid message");
        }
    }
    panic!("subscriber never received a message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_receives_topic_seq_and_decodable_payloads() {
    for layout in [Layout::Array, Layout::Map, Layout::MapBatch] {
        let mut cfg = PublisherConfig::new("tcp://127.0.0.1:0");
        cfg.mode = ConnectMode::Bind;
        cfg.topic = "kv@127.0.0.1:8000@Qwen/Qwen3-32B".into();
        cfg.encode = EncodeOptions {
            layout,
            hashes_as_bytes: false,
        };
        let publisher = KvEventPublisher::start(cfg).await.unwrap();
        assert!(
            !publisher.endpoint().ends_with(":0"),
            "{}",
            publisher.endpoint()
        );

        let mut sub = SubSocket::connect(
            publisher.endpoint(),
            &[b"kv@"],
            Limits::default(),
            Arc::new(TransportStats::default()),
        )
        .await
        .unwrap();

        let first = first_message(&publisher, &mut sub).await;
        assert_eq!(&first.topic[..], b"kv@127.0.0.1:8000@Qwen/Qwen3-32B");
        let decoded = first.batch().unwrap();
        assert_eq!(decoded, batch(first.seq), "{layout:?}");

        // Once subscribed, every following batch arrives in order with consecutive seqs.
        let base = 1000;
        for i in 0..5 {
            publisher.publish(batch(base + i));
        }
        let mut seqs = Vec::new();
        loop {
            let msg = WireMessage::from_frames(&recv_frames(&mut sub).await).unwrap();
            let b = msg.batch().unwrap();
            if b.ts >= 1000.0 + base as f64 {
                assert_eq!(b, batch(b.ts as u64 - 1000));
                seqs.push(msg.seq);
            }
            if seqs.len() == 5 {
                break;
            }
        }
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        publisher.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_returns_buffered_batches_then_the_end_marker() {
    let mut cfg = PublisherConfig::new("tcp://127.0.0.1:0");
    cfg.mode = ConnectMode::Bind;
    cfg.replay_endpoint = Some("tcp://127.0.0.1:0".into());
    cfg.buffer_steps = 4;
    cfg.first_seq = 1;
    let publisher = KvEventPublisher::start(cfg).await.unwrap();
    for i in 0..6 {
        assert!(publisher.publish(batch(i)));
    }
    // Wait until the publisher task has processed all six batches.
    for _ in 0..200 {
        if publisher.stats().published() == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(publisher.stats().published(), 6);

    let mut dealer = DealerSocket::connect(
        publisher.replay_endpoint().unwrap(),
        Limits::default(),
        Arc::new(TransportStats::default()),
    )
    .await
    .unwrap();
    // Sequences 1..=6 were published; the buffer keeps the last 4 (3..=6). Ask from 4.
    dealer
        .send(&[Bytes::new(), Bytes::copy_from_slice(&encode_seq(4))])
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        let frames = tokio::time::timeout(Duration::from_secs(10), dealer.recv())
            .await
            .expect("replay timed out")
            .unwrap();
        let (seq, payload) = parse_replay_reply(&frames).unwrap();
        if seq == u64::MAX {
            assert!(payload.is_empty());
            break;
        }
        let b = llmsched_kvevents::decode_batch(&payload).unwrap();
        got.push((seq, b.ts as u64 - 1000));
    }
    // seq s carries batch(s - 1) because first_seq = 1.
    assert_eq!(got, vec![(4, 3), (5, 4), (6, 5)]);
    assert_eq!(publisher.stats().replays(), 1);
    publisher.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_mode_dials_a_binding_subscriber() {
    let mut sub = SubSocket::bind(
        "tcp://127.0.0.1:0",
        &[b""],
        Limits::default(),
        Arc::new(TransportStats::default()),
    )
    .await
    .unwrap();
    let ep = sub.endpoint().unwrap();
    let mut cfg = PublisherConfig::new(ep);
    cfg.topic = "kv@x@m".into();
    let publisher = KvEventPublisher::start(cfg).await.unwrap();
    let msg = first_message(&publisher, &mut sub).await;
    assert_eq!(&msg.topic[..], b"kv@x@m");
    assert!(msg.batch().is_ok());
    publisher.shutdown().await;
}

#[tokio::test]
async fn bad_endpoints_are_clear_errors() {
    let err = KvEventPublisher::start(PublisherConfig::new("localhost:5557"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("localhost:5557"), "{err}");
    let mut cfg = PublisherConfig::new("tcp://192.0.2.1:5557");
    cfg.mode = ConnectMode::Bind;
    let err = KvEventPublisher::start(cfg).await.unwrap_err();
    assert!(err.to_string().contains("192.0.2.1"), "{err}");
}
