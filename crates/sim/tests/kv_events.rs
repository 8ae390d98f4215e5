//! KV-cache events over real ZMQ: a SUB socket and a replay DEALER receive the simulator's
//! batches; the test decodes them with `rmpv` directly (not with the crate's decoder), replays
//! them into a set of block hashes and checks that set against the cache's actual contents.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use common::{client, fast, post, words};
use llmsched_kvevents::zmtp::{DealerSocket, Limits, SubSocket, TransportStats};
use llmsched_kvevents::{ConnectMode, EncodeOptions, Layout};
use llmsched_sim::{ClusterConfig, KvEventsConfig, SimCluster};
use rmpv::Value;

#[derive(Debug, Clone, PartialEq)]
enum Ev {
    Stored {
        hashes: Vec<u64>,
        parent: Option<u64>,
        tokens: Vec<u64>,
        block_size: u64,
        medium: Option<String>,
    },
    Removed(Vec<u64>),
    Cleared,
}

fn field<'a>(ev: &'a Value, pos: usize, name: &str) -> &'a Value {
    match ev {
        Value::Array(a) => &a[pos],
        Value::Map(m) => &m.iter().find(|(k, _)| k.as_str() == Some(name)).unwrap().1,
        _ => panic!("event is neither array nor map: {ev:?}"),
    }
}

fn hashes(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_u64().unwrap())
        .collect()
}

/// Decodes a payload by hand for the given layout.
fn decode(payload: &[u8], layout: Layout) -> Vec<Ev> {
    let v = rmpv::decode::read_value(&mut &payload[..]).unwrap();
    let (events, rank) = match layout {
        Layout::MapBatch => {
            let m = v.as_map().unwrap();
            assert_eq!(m[0].0.as_str(), Some("ts"));
            assert!(m[0].1.as_f64().unwrap() > 1.6e9, "ts is Unix seconds");
            (m[1].1.clone(), m[2].1.clone())
        }
        _ => {
            let a = v.as_array().unwrap();
            assert!(a[0].as_f64().unwrap() > 1.6e9, "ts is Unix seconds");
            (a[1].clone(), a[2].clone())
        }
    };
    assert_eq!(rank.as_u64(), Some(0), "data_parallel_rank");
    events
        .as_array()
        .unwrap()
        .iter()
        .map(|ev| {
            let tag = match (layout, ev) {
                (Layout::Array, Value::Array(a)) => a[0].as_str().unwrap().to_string(),
                (Layout::Map | Layout::MapBatch, Value::Map(m)) => {
                    assert_eq!(m[0].0.as_str(), Some("type"), "the tag comes first");
                    m[0].1.as_str().unwrap().to_string()
                }
                other => panic!("unexpected event shape {other:?}"),
            };
            match tag.as_str() {
                "BlockStored" => Ev::Stored {
                    hashes: hashes(field(ev, 1, "block_hashes")),
                    parent: field(ev, 2, "parent_block_hash").as_u64(),
                    tokens: field(ev, 3, "token_ids")
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|t| t.as_u64().unwrap())
                        .collect(),
                    block_size: field(ev, 4, "block_size").as_u64().unwrap(),
                    medium: field(ev, 6, "medium").as_str().map(str::to_string),
                },
                "BlockRemoved" => Ev::Removed(hashes(field(ev, 1, "block_hashes"))),
                "AllBlocksCleared" => Ev::Cleared,
                other => panic!("unknown tag {other}"),
            }
        })
        .collect()
}

/// Every buffered batch, from the replay socket: (seq, payload).
async fn replay(endpoint: &str) -> Vec<(u64, Bytes)> {
    let mut d = DealerSocket::connect(
        endpoint,
        Limits::default(),
        std::sync::Arc::new(TransportStats::default()),
    )
    .await
    .unwrap();
    d.send(&[Bytes::new(), Bytes::copy_from_slice(&0u64.to_be_bytes())])
        .await
        .unwrap();
    let mut out = Vec::new();
    loop {
        let f = tokio::time::timeout(Duration::from_secs(10), d.recv())
            .await
            .expect("replay timed out")
            .unwrap();
        assert_eq!(f.len(), 3, "[empty, seq, payload]");
        let seq = u64::from_be_bytes(f[1][..].try_into().unwrap());
        if seq == u64::MAX {
            assert!(f[2].is_empty());
            return out;
        }
        out.push((seq, f[2].clone()));
    }
}

async fn run(layout: Layout) {
    let mut kv = KvEventsConfig::new("tcp://127.0.0.1:0");
    kv.mode = ConnectMode::Bind;
    kv.replay_endpoint = Some("tcp://127.0.0.1:0".into());
    kv.encode = EncodeOptions {
        layout,
        hashes_as_bytes: false,
    };
    // 64 blocks of 16 tokens: a handful of 240-token requests forces evictions.
    let replica = fast(50.0).with_num_gpu_blocks(64).with_max_model_len(512);
    let cluster = SimCluster::start(
        ClusterConfig::new(vec!["127.0.0.1:0".parse().unwrap()], replica).with_kv_events(kv),
    )
    .await
    .unwrap();
    let r = &cluster.replicas()[0];
    let addr = r.addr();
    assert_eq!(
        r.kv_events_topic().unwrap(),
        format!("kv@127.0.0.1:{}@Qwen/Qwen3-32B", addr.port())
    );
    let mut sub = SubSocket::connect(
        r.kv_events_endpoint().unwrap(),
        &[b"kv@"],
        Limits::default(),
        std::sync::Arc::new(TransportStats::default()),
    )
    .await
    .unwrap();

    let c = client();
    let prompt = |i: u32| {
        format!(
            r#"{{"prompt":"{}","max_tokens":40,"ignore_eos":true}}"#,
            words(i * 1000, 200)
        )
    };
    for i in [0, 1, 0, 2, 3, 4, 5, 0] {
        assert_eq!(
            post(&c, addr, "/v1/completions", &prompt(i)).await.status,
            200
        );
    }
    assert!(r.metrics().evictions > 0, "the workload must evict");

    // Rebuild the cache from the event history until it matches (the publisher is async).
    let snapshot: BTreeSet<u64> = r
        .cache_snapshot()
        .await
        .unwrap()
        .cached_block_hashes
        .into_iter()
        .collect();
    let mut batches = Vec::new();
    let mut rebuilt = BTreeSet::new();
    for _ in 0..200 {
        batches = replay(r.kv_events_replay_endpoint().unwrap()).await;
        rebuilt.clear();
        for (_, payload) in &batches {
            for ev in decode(payload, layout) {
                match ev {
                    Ev::Stored { hashes, .. } => rebuilt.extend(hashes),
                    Ev::Removed(hs) => {
                        for h in hs {
                            assert!(rebuilt.remove(&h), "removed a block never stored");
                        }
                    }
                    Ev::Cleared => rebuilt.clear(),
                }
            }
        }
        if rebuilt == snapshot {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rebuilt, snapshot, "events replay into the cache's contents");
    assert!(!snapshot.is_empty());
    let seqs: Vec<u64> = batches.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (0..seqs.len() as u64).collect::<Vec<_>>(),
        "vLLM numbering from 0"
    );

    // The first event describes the first prompt's 12 full blocks (200 tokens → 12 × 16).
    let first = decode(&batches[0].1, layout);
    match &first[0] {
        Ev::Stored {
            hashes,
            parent,
            tokens,
            block_size,
            medium,
        } => {
            assert_eq!(*parent, None);
            assert_eq!(*block_size, 16);
            assert_eq!(medium.as_deref(), Some("GPU"));
            assert_eq!(hashes.len(), 12);
            assert_eq!(
                tokens,
                &(0..192).collect::<Vec<u64>>(),
                "token ids of the prompt"
            );
        }
        other => panic!("expected BlockStored, got {other:?}"),
    }

    // What the SUB socket received is byte-identical to the replayed batches.
    let mut received = 0;
    while let Ok(Ok(f)) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
        assert_eq!(f.len(), 3);
        assert_eq!(&f[0][..], r.kv_events_topic().unwrap().as_bytes());
        let seq = u64::from_be_bytes(f[1][..].try_into().unwrap());
        assert_eq!(f[2], batches[seq as usize].1);
        received += 1;
    }
    assert!(received > 0, "the subscriber saw live events");

    // Flushing the cache publishes AllBlocksCleared.
    assert_eq!(post(&c, addr, "/flush_cache", "").await.status, 200);
    let mut cleared = false;
    for _ in 0..200 {
        let b = replay(r.kv_events_replay_endpoint().unwrap()).await;
        if b.len() > batches.len() && decode(&b.last().unwrap().1, layout).contains(&Ev::Cleared) {
            cleared = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cleared);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_match_the_cache_positional_layout() {
    run(Layout::Array).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_match_the_cache_map_layout() {
    run(Layout::MapBatch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crate_decoder_agrees_with_the_hand_decoder() {
    let mut kv = KvEventsConfig::new("tcp://127.0.0.1:0");
    kv.mode = ConnectMode::Bind;
    kv.replay_endpoint = Some("tcp://127.0.0.1:0".into());
    kv.encode.layout = Layout::Map;
    let cluster = SimCluster::start(
        ClusterConfig::new(vec!["127.0.0.1:0".parse().unwrap()], fast(50.0)).with_kv_events(kv),
    )
    .await
    .unwrap();
    let r = &cluster.replicas()[0];
    let c = client();
    let body = format!(r#"{{"prompt":"{}","max_tokens":20}}"#, words(0, 64));
    assert_eq!(
        post(&c, r.addr(), "/v1/completions", &body).await.status,
        200
    );
    let mut batches = Vec::new();
    for _ in 0..200 {
        batches = replay(r.kv_events_replay_endpoint().unwrap()).await;
        if !batches.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, payload) = &batches[0];
    let typed = llmsched_kvevents::decode_batch(payload).unwrap();
    let hand = decode(payload, Layout::Map);
    assert_eq!(typed.events.len(), hand.len());
    match (&typed.events[0], &hand[0]) {
        (llmsched_kvevents::KvEvent::BlockStored(t), Ev::Stored { hashes, .. }) => {
            assert_eq!(&t.block_hashes, hashes);
            assert_eq!(t.block_size, 16);
        }
        other => panic!("{other:?}"),
    }
    cluster.shutdown().await;
}
