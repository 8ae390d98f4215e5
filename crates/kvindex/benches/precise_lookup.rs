//! Lookup latency of the precise prefix index for an 8k-token prompt (512 blocks of 16
//! tokens) at 100 endpoints.
//!
//! The index is filled the way a pool serving the seed guide's workload fills it: every
//! endpoint holds about 20,000 blocks (320k tokens, the KV capacity of one replica) made of
//! 512-block prompts whose first 375 blocks (a 6,000-token system prompt) are shared by two
//! endpoints; one system prompt is held by ten endpoints (the `podCacheSize` bound).
//!
//! * A latency report first: 100,000 timed lookups per scenario, p50 / p90 / p99 / p99.9 /
//!   max, per call in wall-clock time and in the thread's CPU time (which excludes time the
//!   thread spent preempted on a shared machine; it includes ~0.1-0.3 µs of clock overhead). `full_hit_cold` cycles through 2,000 different fully held
//!   prompts (≈1 M keys touched), so most probes miss the CPU caches, as for a stream of
//!   distinct requests; the other scenarios repeat one prompt (cache-warm).
//! * Then criterion means: `full_hit` (the prompt is held in full by two endpoints),
//!   `shared_by_10` (375 blocks held by ten endpoints, then a new question), `miss`.
//!
//! Run: `cargo bench -p llmsched-kvindex --bench precise_lookup` (criterion times are the
//! benchmark thread's CPU time; `BENCH_CLOCK=wall` for wall-clock time).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::Measurement;
use criterion::{BenchmarkId, Criterion};
use llmsched_benchkit::Lcg;
use llmsched_kvindex::{PreciseIndex, PreciseIndexConfig, PreciseMatches, StoredBlocks};

const ENDPOINTS: u32 = 100;
const BLOCK: usize = 16;
const PROMPT_BLOCKS: usize = 512;
const SYSTEM_BLOCKS: usize = 375;
const BLOCKS_PER_ENDPOINT: usize = 20_000;

/// `n` random token ids.
fn tokens(rng: &mut Lcg, n: usize) -> Vec<u32> {
    (0..n).map(|_| (rng.next_u64() % 150_000) as u32).collect()
}

/// Stores `tokens` for `ep` as one engine would: events of 32 blocks chained by parent.
fn store(idx: &PreciseIndex, ep: u32, tokens: &[u32], rng: &mut Lcg) {
    let blocks = tokens.len() / BLOCK;
    let hashes: Vec<u64> = (0..blocks).map(|_| rng.next_u64()).collect();
    let mut parent = None;
    for (hs, ts) in hashes.chunks(32).zip(tokens.chunks(32 * BLOCK)) {
        idx.block_stored(
            ep,
            &StoredBlocks {
                engine_hashes: hs,
                parent,
                tokens: ts,
                engine_block_size: BLOCK as u32,
                model: "Qwen/Qwen3-32B",
                lora_name: None,
                medium: Some("GPU"),
            },
        );
        parent = hs.last().copied();
    }
}

struct Fixture {
    idx: PreciseIndex,
    /// Fully held prompts, for the cold-cache scenario.
    cold: Vec<Vec<u64>>,
    full_hit: Vec<u64>,
    shared: Vec<u64>,
    miss: Vec<u64>,
}

fn keys(idx: &PreciseIndex, tokens: &[u32]) -> Vec<u64> {
    let mut k = Vec::new();
    idx.keyer().prompt_keys("Qwen/Qwen3-32B", tokens, &mut k);
    k
}

fn fixture() -> Fixture {
    let idx = PreciseIndex::new(PreciseIndexConfig::default());
    let mut rng = Lcg(42);
    let mut full_hit_tokens = Vec::new();
    let mut cold_tokens = Vec::new();
    // Pairs of endpoints share system prompts.
    for pair in 0..ENDPOINTS / 2 {
        let mut held = 0;
        while held < BLOCKS_PER_ENDPOINT {
            let system = tokens(&mut rng, SYSTEM_BLOCKS * BLOCK);
            for _ in 0..4 {
                let mut p = system.clone();
                p.extend(tokens(&mut rng, (PROMPT_BLOCKS - SYSTEM_BLOCKS) * BLOCK));
                for ep in [2 * pair, 2 * pair + 1] {
                    store(&idx, ep, &p, &mut rng);
                }
                if full_hit_tokens.is_empty() {
                    full_hit_tokens = p.clone();
                }
                if cold_tokens.len() < 2_000 {
                    cold_tokens.push(p.clone());
                }
                held += PROMPT_BLOCKS - SYSTEM_BLOCKS;
            }
            held += SYSTEM_BLOCKS;
        }
    }
    // One system prompt held by ten endpoints.
    let system = tokens(&mut rng, SYSTEM_BLOCKS * BLOCK);
    for ep in 0..10 {
        let mut p = system.clone();
        p.extend(tokens(&mut rng, (PROMPT_BLOCKS - SYSTEM_BLOCKS) * BLOCK));
        store(&idx, ep * 7, &p, &mut rng);
    }
    let mut shared_tokens = system;
    shared_tokens.extend(tokens(&mut rng, (PROMPT_BLOCKS - SYSTEM_BLOCKS) * BLOCK));
    let miss_tokens = tokens(&mut rng, PROMPT_BLOCKS * BLOCK);
    Fixture {
        cold: cold_tokens.iter().map(|t| keys(&idx, t)).collect(),
        full_hit: keys(&idx, &full_hit_tokens),
        shared: keys(&idx, &shared_tokens),
        miss: keys(&idx, &miss_tokens),
        idx,
    }
}

fn percentiles(name: &str, f: &Fixture, prompts: &[&[u64]]) {
    let mut out = PreciseMatches::new();
    let mut samples = Vec::with_capacity(100_000);
    for i in 0..5_000 {
        f.idx
            .longest_prefix(prompts[i % prompts.len()], |_| true, &mut out);
    }
    let mut cpu = Vec::with_capacity(100_000);
    for i in 0..100_000 {
        let prompt = prompts[i % prompts.len()];
        let c = llmsched_benchkit::thread_cpu_ns();
        let t = Instant::now();
        f.idx.longest_prefix(black_box(prompt), |_| true, &mut out);
        samples.push(t.elapsed());
        cpu.push(Duration::from_nanos(llmsched_benchkit::thread_cpu_ns() - c));
        black_box(&out);
    }
    let best = out.iter().map(|m| m.blocks).max().unwrap_or(0);
    println!(
        "latency {name:<13} ({} endpoints match, best {best}/{} blocks)",
        out.len(),
        prompts[0].len(),
    );
    for (clock, mut s) in [("wall", samples), ("cpu ", cpu)] {
        s.sort_unstable();
        let p = |q: f64| s[((s.len() as f64 - 1.0) * q) as usize];
        println!(
            "  {clock}: p50 {:>8.2?}  p90 {:>8.2?}  p99 {:>8.2?}  p99.9 {:>8.2?}  max {:>8.2?}",
            p(0.5),
            p(0.9),
            p(0.99),
            p(0.999),
            s[s.len() - 1],
        );
    }
}

fn bench<M: Measurement>(c: &mut Criterion<M>, f: &Fixture) {
    let mut g = c.benchmark_group("precise_lookup_8k_tokens");
    let mut out = PreciseMatches::new();
    for (name, prompt) in [
        ("full_hit", &f.full_hit),
        ("shared_by_10", &f.shared),
        ("miss", &f.miss),
    ] {
        g.bench_with_input(BenchmarkId::new(name, ENDPOINTS), prompt, |b, p| {
            b.iter(|| {
                f.idx.longest_prefix(black_box(p), |_| true, &mut out);
                black_box(out.len())
            })
        });
    }
    for (name, prompt) in [("full_hit_b1", &f.full_hit), ("shared_by_10_b1", &f.shared)] {
        g.bench_with_input(BenchmarkId::new(name, ENDPOINTS), prompt, |b, p| {
            b.iter(|| {
                f.idx
                    .longest_prefix_batched::<1>(black_box(p), |_| true, &mut out);
                black_box(out.len())
            })
        });
    }
    g.bench_with_input(
        BenchmarkId::new("full_hit_b16", ENDPOINTS),
        &f.full_hit,
        |b, p| {
            b.iter(|| {
                f.idx
                    .longest_prefix_batched::<16>(black_box(p), |_| true, &mut out);
                black_box(out.len())
            })
        },
    );
    let mut i = 0;
    g.bench_function(BenchmarkId::new("full_hit_cold_b16", ENDPOINTS), |b| {
        b.iter(|| {
            i += 1;
            f.idx.longest_prefix_batched::<16>(
                black_box(&f.cold[i % f.cold.len()]),
                |_| true,
                &mut out,
            );
            black_box(out.len())
        })
    });
    let mut i = 0;
    g.bench_function(BenchmarkId::new("full_hit_cold_b32", ENDPOINTS), |b| {
        b.iter(|| {
            i += 1;
            f.idx.longest_prefix_batched::<32>(
                black_box(&f.cold[i % f.cold.len()]),
                |_| true,
                &mut out,
            );
            black_box(out.len())
        })
    });
    let mut i = 0;
    g.bench_function(BenchmarkId::new("full_hit_cold_b1", ENDPOINTS), |b| {
        b.iter(|| {
            i += 1;
            f.idx.longest_prefix_batched::<1>(
                black_box(&f.cold[i % f.cold.len()]),
                |_| true,
                &mut out,
            );
            black_box(out.len())
        })
    });
    let mut i = 0;
    g.bench_function(BenchmarkId::new("full_hit_cold", ENDPOINTS), |b| {
        b.iter(|| {
            i += 1;
            f.idx
                .longest_prefix(black_box(&f.cold[i % f.cold.len()]), |_| true, &mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

fn main() {
    let t = Instant::now();
    let f = fixture();
    let st = f.idx.stats();
    println!(
        "index: {ENDPOINTS} endpoints, {} keys, {} entries, {} engine mappings, {:.1} MiB ({:.0} B/entry), built in {:.1?}",
        st.keys,
        st.entries,
        st.engine_keys,
        st.memory_bytes as f64 / (1 << 20) as f64,
        st.memory_bytes as f64 / st.entries as f64,
        t.elapsed()
    );
    percentiles("full_hit", &f, &[&f.full_hit]);
    let cold: Vec<&[u64]> = f.cold.iter().map(Vec::as_slice).collect();
    percentiles("full_hit_cold", &f, &cold);
    percentiles("shared_by_10", &f, &[&f.shared]);
    percentiles("miss", &f, &[&f.miss]);
    llmsched_benchkit::run(
        llmsched_benchkit::config(Duration::from_secs(2)),
        &Lookup(&f),
    );
}

/// The lookup benchmarks over one fixture.
struct Lookup<'a>(&'a Fixture);

impl llmsched_benchkit::Suite for Lookup<'_> {
    fn run<M: Measurement>(&self, c: &mut Criterion<M>) {
        bench(c, self.0);
    }
}
