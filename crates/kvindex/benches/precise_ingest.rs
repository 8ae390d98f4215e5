//! Event ingestion rate of the precise prefix index, in block events per second on one core.
//!
//! A stream like a busy vLLM engine's: every batch carries one `BlockStored` of 32 blocks
//! (512 tokens) chained to the previous batch's last block, and one `BlockRemoved` of 32
//! older blocks, so the index stays at a steady ~20,000 blocks per endpoint. One block
//! stored or removed is one block event (a batch is 64).
//!
//! * `apply`: the index alone (`block_stored` + `block_removed`);
//! * `decode_apply/<layout>`: the msgpack payload decoded with `llmsched_kvevents::decode_batch`
//!   (positional and map layouts, int hashes), then applied — what the subscriber does per
//!   message.
//!
//! Run: `cargo bench -p llmsched-kvindex --bench precise_ingest` (CPU time of the benchmark
//! thread; `BENCH_CLOCK=wall` for wall-clock time).

use std::collections::VecDeque;
use std::hint::black_box;

use criterion::measurement::Measurement;
use criterion::{BenchmarkId, Criterion, Throughput};
use llmsched_benchkit::Lcg;
use llmsched_kvevents::{
    BlockRemoved, BlockStored, EncodeOptions, EventBatch, KvEvent, Layout, decode_batch,
    encode_batch,
};
use llmsched_kvindex::{PreciseIndex, PreciseIndexConfig, StoredBlocks};

const BLOCK: usize = 16;
const PER_BATCH: usize = 32;
const RESIDENT: usize = 20_000;

/// An engine's event stream: stored runs chained by parent, evictions of the oldest blocks.
struct Engine {
    rng: Lcg,
    parent: Option<u64>,
    resident: VecDeque<u64>,
}

impl Engine {
    fn new(seed: u64) -> Self {
        Self {
            rng: Lcg(seed),
            parent: None,
            resident: VecDeque::new(),
        }
    }

    fn next(&mut self) -> u64 {
        let x = self.rng.step();
        x ^ (x >> 29)
    }

    fn batch(&mut self) -> EventBatch {
        let hashes: Vec<u64> = (0..PER_BATCH).map(|_| self.next()).collect();
        let tokens: Vec<u32> = (0..PER_BATCH * BLOCK)
            .map(|_| (self.next() % 150_000) as u32)
            .collect();
        // Every 16th run starts a new sequence.
        let parent = if self.rng.0.is_multiple_of(16) {
            None
        } else {
            self.parent
        };
        self.parent = hashes.last().copied();
        self.resident.extend(&hashes);
        let mut events = vec![KvEvent::BlockStored(BlockStored {
            block_hashes: hashes,
            parent_block_hash: parent,
            token_ids: tokens,
            block_size: BLOCK as u32,
            medium: Some("GPU".into()),
            ..Default::default()
        })];
        if self.resident.len() > RESIDENT {
            let evicted: Vec<u64> = self.resident.drain(..PER_BATCH).collect();
            events.push(KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: evicted,
                medium: Some("GPU".into()),
                group_idx: None,
            }));
        }
        EventBatch {
            ts: 1.0,
            events,
            data_parallel_rank: Some(0),
        }
    }
}

/// What the scorer's ingestion does with a decoded batch.
fn apply(idx: &PreciseIndex, ep: u32, batch: &EventBatch) -> usize {
    let mut blocks = 0;
    for ev in &batch.events {
        match ev {
            KvEvent::BlockStored(b) => {
                idx.block_stored(
                    ep,
                    &StoredBlocks {
                        engine_hashes: &b.block_hashes,
                        parent: b.parent_block_hash,
                        tokens: &b.token_ids,
                        engine_block_size: b.block_size,
                        model: "Qwen/Qwen3-32B",
                        lora_name: b.lora_name.as_deref(),
                        medium: b.medium.as_deref(),
                    },
                );
                blocks += b.block_hashes.len();
            }
            KvEvent::BlockRemoved(r) => {
                idx.block_removed(ep, &r.block_hashes, r.medium.as_deref());
                blocks += r.block_hashes.len();
            }
            KvEvent::AllBlocksCleared => {
                idx.clear_endpoint(ep);
            }
            KvEvent::Unknown { .. } => {}
        }
    }
    blocks
}

/// An index at steady state for 8 endpoints, and a pre-generated stream for endpoint 0.
fn warm() -> (PreciseIndex, Vec<EventBatch>) {
    let idx = PreciseIndex::new(PreciseIndexConfig::default());
    for ep in 1..8 {
        let mut e = Engine::new(u64::from(ep));
        for _ in 0..(RESIDENT / PER_BATCH + 50) {
            apply(&idx, ep, &e.batch());
        }
    }
    let mut e = Engine::new(0);
    for _ in 0..(RESIDENT / PER_BATCH + 50) {
        apply(&idx, 0, &e.batch());
    }
    // The measured stream continues endpoint 0's engine (steady state: 1 store + 1 removal).
    let stream: Vec<EventBatch> = (0..4096).map(|_| e.batch()).collect();
    (idx, stream)
}

fn bench<M: Measurement>(c: &mut Criterion<M>) {
    let (idx, stream) = warm();
    let st = idx.stats();
    println!(
        "index: {} keys, {} entries, {} engine mappings, {:.1} MiB",
        st.keys,
        st.entries,
        st.engine_keys,
        st.memory_bytes as f64 / (1 << 20) as f64
    );
    let per_batch = (2 * PER_BATCH) as u64;
    let mut g = c.benchmark_group("precise_ingest");
    g.throughput(Throughput::Elements(per_batch));
    let mut i = 0;
    g.bench_function("apply", |b| {
        b.iter(|| {
            let batch = &stream[i % stream.len()];
            i += 1;
            black_box(apply(&idx, 0, batch))
        })
    });
    for layout in [Layout::Array, Layout::MapBatch] {
        let payloads: Vec<Vec<u8>> = stream
            .iter()
            .map(|b| {
                encode_batch(
                    b,
                    EncodeOptions {
                        layout,
                        hashes_as_bytes: false,
                    },
                )
            })
            .collect();
        let mut j = 0;
        g.bench_with_input(
            BenchmarkId::new("decode_apply", format!("{layout:?}")),
            &payloads,
            |b, payloads| {
                b.iter(|| {
                    let p = &payloads[j % payloads.len()];
                    j += 1;
                    let batch = decode_batch(black_box(p)).unwrap_or_default();
                    black_box(apply(&idx, 0, &batch))
                })
            },
        );
    }
    g.finish();
}

llmsched_benchkit::bench_main!(bench, seconds = 3);
