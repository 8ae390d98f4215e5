//! Benchmarks of the approximate prefix index at realistic sizes.
//!
//! * `lookup/*`: `longest_prefix` of a 256-block prompt (an 8k-token prompt at 16 tokens per
//!   block, truncated to the default `maxPrefixBlocksToMatch`) against an index filled to
//!   capacity (`endpoints × 31,250` blocks): a full hit on one endpoint, a hit on a 32-block
//!   system prompt shared by every endpoint, and a miss.
//! * `insert/*`: recording a 256-block request for one endpoint (refresh of known blocks and
//!   brand-new blocks that evict).
//! * Before the timed runs, the memory report: bytes per indexed block from the index's own
//!   accounting and, as a sanity check, from a counting global allocator.
//!
//! Run: `cargo bench -p llmsched-kvindex --bench approx_index` (times are the benchmark
//! thread's CPU time; `BENCH_CLOCK=wall` for wall-clock time).

// The counting allocator below needs `unsafe impl GlobalAlloc`; it only forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicIsize, Ordering};

use criterion::measurement::Measurement;
use criterion::{BenchmarkId, Criterion};
use llmsched_benchkit::Lcg;
use llmsched_kvindex::{ApproxIndex, ApproxIndexConfig};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call forwards to the system allocator with the caller's arguments; the
// counter is a side effect only.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CAPACITY: usize = 31_250;
const PROMPT_BLOCKS: usize = 256;

/// `n` random block hashes.
fn prompt(rng: &mut Lcg, n: usize) -> Vec<u64> {
    (0..n).map(|_| rng.next_u64()).collect()
}

/// An index where every endpoint holds `CAPACITY` blocks: a shared 32-block system prompt
/// plus its own distinct prompts. Returns the index, a prompt endpoint 0 holds in full, and
/// the system prompt.
fn filled(endpoints: u32) -> (ApproxIndex, Vec<u64>, Vec<u64>) {
    let idx = ApproxIndex::new(ApproxIndexConfig::for_capacity(CAPACITY));
    let mut rng = Lcg(42);
    let system = prompt(&mut rng, 32);
    let mut held = Vec::new();
    for ep in 0..endpoints {
        let mut stored = 0;
        while stored < CAPACITY + CAPACITY / 8 {
            let mut p = system.clone();
            p.extend(prompt(&mut rng, PROMPT_BLOCKS - 32));
            idx.insert(ep, CAPACITY, &p);
            stored += p.len();
            if ep == 0 {
                held = p;
            }
        }
    }
    (idx, held, system)
}

fn memory_report() {
    for endpoints in [8u32, 32] {
        let before = LIVE.load(Ordering::Relaxed);
        let (idx, _, _) = filled(endpoints);
        let after = LIVE.load(Ordering::Relaxed);
        let st = idx.stats();
        // Subtract the two prompts `filled` returns (2 × 256 × 8 bytes plus headers).
        let alloc = (after - before) as f64 - 2.0 * (PROMPT_BLOCKS * 8) as f64;
        println!(
            "memory: {endpoints} endpoints, {} blocks indexed ({} distinct): own accounting {:.1} B/block, allocator {:.1} B/block",
            st.entries,
            st.distinct_blocks,
            st.bytes_per_entry(),
            alloc / st.entries as f64,
        );
    }
}

fn bench<M: Measurement>(c: &mut Criterion<M>) {
    memory_report();

    let mut g = c.benchmark_group("lookup");
    for endpoints in [8u32, 100] {
        let (idx, held, system) = filled(endpoints);
        let mut miss = prompt(&mut Lcg(7), PROMPT_BLOCKS);
        miss[0] ^= 1;
        let mut shared = system.clone();
        shared.extend(prompt(&mut Lcg(9), PROMPT_BLOCKS - 32));
        g.bench_with_input(BenchmarkId::new("full_hit", endpoints), &held, |b, p| {
            b.iter(|| black_box(idx.longest_prefix(black_box(p))))
        });
        g.bench_with_input(
            BenchmarkId::new("shared_system_prompt", endpoints),
            &shared,
            |b, p| b.iter(|| black_box(idx.longest_prefix(black_box(p)))),
        );
        g.bench_with_input(BenchmarkId::new("miss", endpoints), &miss, |b, p| {
            b.iter(|| black_box(idx.longest_prefix(black_box(p))))
        });
        g.bench_with_input(
            BenchmarkId::new("full_hit_linear", endpoints),
            &held,
            |b, p| b.iter(|| black_box(idx.longest_prefix_linear(black_box(p)))),
        );
    }
    g.finish();

    let mut g = c.benchmark_group("insert");
    let (idx, held, _) = filled(8);
    g.bench_function("refresh_256_blocks", |b| {
        b.iter(|| idx.insert(0, CAPACITY, black_box(&held)))
    });
    let mut rng = Lcg(99);
    g.bench_function("new_256_blocks_with_eviction", |b| {
        b.iter_batched(
            || prompt(&mut rng, PROMPT_BLOCKS),
            |p| idx.insert(1, CAPACITY, &p),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

llmsched_benchkit::bench_main!(bench);
