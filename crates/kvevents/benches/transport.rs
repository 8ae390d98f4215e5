//! Receive path of the KV-event transport: messages per second from a PUB socket to a SUB
//! socket over loopback, `[topic, seq, payload]` messages as vLLM publishes them.
//!
//! Everything (both sockets, both connections' tasks) runs on one current-thread tokio
//! runtime on the benchmark thread, so the default CPU-time measurement counts the whole
//! transport cost (user and kernel time) of sending and receiving, on one core.
//!
//! Run: `cargo bench -p llmsched-kvevents --bench transport`.
//!
//! Measured against the `zeromq` crate (0.7) it replaced, in the same run, before removal
//! (see README): 2.3 KB batches 1.10 M msg/s vs 0.84 M, 64-byte payloads 2.10 M vs 1.32 M.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::measurement::Measurement;
use criterion::{BenchmarkId, Criterion, Throughput};
use llmsched_kvevents::wire::encode_seq;
use llmsched_kvevents::{
    BlockRemoved, BlockStored, EncodeOptions, EventBatch, KvEvent, encode_batch,
};

/// Messages per measured iteration.
const PER_ITER: usize = 1000;
/// Messages sent before the receiver catches up (below every implementation's queue bound).
const WINDOW: usize = 100;
const TOPIC: &str = "kv@10.0.0.1:8000@Qwen/Qwen3-32B";

/// A vLLM-like step: 32 blocks of 16 tokens stored, 32 removed (about 2.3 KB of msgpack).
fn batch_payload() -> Bytes {
    let batch = EventBatch {
        ts: 1_700_000_000.5,
        events: vec![
            KvEvent::BlockStored(BlockStored {
                block_hashes: (0..32u64)
                    .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
                    .collect(),
                parent_block_hash: Some(7),
                token_ids: (0..512u32).map(|i| i * 291 % 150_000).collect(),
                block_size: 16,
                medium: Some("GPU".into()),
                ..Default::default()
            }),
            KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: (0..32u64)
                    .map(|i| i.wrapping_mul(0x2545_f491_4f6c_dd1d))
                    .collect(),
                medium: Some("GPU".into()),
                group_idx: None,
            }),
        ],
        data_parallel_rank: Some(0),
    };
    Bytes::from(encode_batch(&batch, EncodeOptions::default()))
}

fn frames(seq: u64, payload: &Bytes) -> Vec<Bytes> {
    vec![
        Bytes::from_static(TOPIC.as_bytes()),
        Bytes::copy_from_slice(&encode_seq(seq)),
        payload.clone(),
    ]
}

mod ours {
    use super::*;
    use llmsched_kvevents::zmtp::{Limits, PubSocket, SubSocket, TransportStats};
    use std::sync::Arc;

    pub struct Pair {
        p: PubSocket,
        s: SubSocket,
        seq: u64,
    }

    pub async fn setup(payload: &Bytes) -> Pair {
        let stats = Arc::new(TransportStats::default());
        let mut p = PubSocket::new(Limits::default(), stats.clone());
        let ep = p.bind("tcp://127.0.0.1:0").await.expect("bind");
        let mut s = SubSocket::connect(&ep, &[b"kv@"], Limits::default(), stats)
            .await
            .expect("connect");
        let mut seq = 0;
        loop {
            p.send(&frames(seq, payload));
            seq += 1;
            if tokio::time::timeout(Duration::from_millis(20), s.recv())
                .await
                .is_ok()
            {
                break;
            }
        }
        while tokio::time::timeout(Duration::from_millis(50), s.recv())
            .await
            .is_ok()
        {}
        Pair { p, s, seq }
    }

    pub async fn round(pair: &mut Pair, payload: &Bytes) -> usize {
        let mut got = 0;
        for _ in 0..PER_ITER / WINDOW {
            for _ in 0..WINDOW {
                pair.p.send(&frames(pair.seq, payload));
                pair.seq += 1;
            }
            for _ in 0..WINDOW {
                let m = pair.s.recv().await.expect("recv");
                got += black_box(m.len());
            }
        }
        got
    }
}

fn bench<M: Measurement>(c: &mut Criterion<M>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("transport_recv");
    g.throughput(Throughput::Elements(PER_ITER as u64));
    for (name, payload) in [
        ("batch_2k", batch_payload()),
        ("small_64b", Bytes::from(vec![0x90u8; 64])),
    ] {
        let mut pair = rt.block_on(ours::setup(&payload));
        g.bench_with_input(BenchmarkId::new("zmtp", name), &payload, |b, payload| {
            b.iter(|| rt.block_on(ours::round(&mut pair, payload)))
        });
    }
    g.finish();
}

struct Transport;

impl llmsched_benchkit::Suite for Transport {
    fn run<M: Measurement>(&self, c: &mut Criterion<M>) {
        bench(c);
    }
}

fn main() {
    let config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    llmsched_benchkit::run(config, &Transport);
}
