//! Does the approximate prefix index (`llmsched_kvindex::ApproxIndex`, what
//! `prefix-cache-scorer` believes) forget prefixes in the order the engine evicts them?
//!
//! The simulator's block pool (`llmsched_sim::kvcache::KvCache`, vLLM's: LRU over freed
//! blocks, a request's blocks freed last block first) and the index with the same capacity
//! (the engine's `num_gpu_blocks`, as `autoTune` sizes it from `vllm:cache_config_info`) see
//! the same requests, one after the other, under heavy pressure (a working set of several
//! times the capacity). After every request both are asked how much of each group's prefix
//! they hold: they must agree exactly — the index neither keeps a prefix the engine has
//! evicted (which would make the scorer chase it) nor forgets one the engine still has.
//!
//! What this does not cover, by construction: blocks pinned by running requests (the engine
//! evicts around them) and blocks of generated tokens (the engine caches them, the index does
//! not count them) make the engine's reusable cache smaller than `num_gpu_blocks` under
//! concurrency; there the index is optimistic, which is what the precise scorer's events fix.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

use llmsched_kvindex::{ApproxIndex, ApproxIndexConfig};
use llmsched_sim::kvcache::KvCache;

const EP: u32 = 7;

/// Chained "hashes" of a prompt: the group's prefix blocks, then the question's.
fn prompt(group: u64, prefix_blocks: u64, question: u64, question_blocks: u64) -> Vec<u64> {
    let mut h = Vec::new();
    let mut prev = group.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for i in 0..prefix_blocks + question_blocks {
        let salt = if i < prefix_blocks { 0 } else { question };
        prev = (prev ^ (i + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ salt.rotate_left(17))
            .wrapping_mul(0x94D0_49BB_1331_11EB);
        h.push(prev);
    }
    h
}

/// One request through the block pool, start to end (prefill, then its blocks are freed).
fn serve(kv: &mut KvCache, hashes: &[u64]) -> usize {
    let hit = kv.longest_prefix(hashes);
    let mut blocks = Vec::new();
    assert!(kv.allocate(&mut blocks, &hashes[..hit], hashes.len() - hit));
    let tokens = vec![1u32; hashes.len() * kv.block_size()];
    kv.commit(&blocks, hashes, hit, hashes.len(), &tokens, None);
    kv.free(&blocks);
    hit
}

#[test]
fn the_approximate_index_forgets_prefixes_in_the_engines_eviction_order() {
    let capacity = 256;
    let mut kv = KvCache::new(capacity, 16, false);
    let index = ApproxIndex::new(ApproxIndexConfig { shards: 1 });
    // 12 groups of 40 prefix blocks + 8 question blocks each: 2.25× the capacity.
    let (groups, prefix, question) = (12u64, 40, 8);
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut evicting = false;
    for req in 0..2_000u64 {
        // A skewed pick (low groups are hot) so some prefixes survive and others do not.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let g = (rng % groups).min((rng >> 8) % groups);
        let hashes = prompt(g, prefix, req + 1, question);
        let believed = index
            .longest_prefix(&hashes)
            .iter()
            .find(|(e, _)| *e == EP)
            .map_or(0, |(_, n)| *n as usize);
        let engine = kv.longest_prefix(&hashes);
        assert_eq!(
            believed, engine,
            "request {req} (group {g}): index believes {believed} blocks, engine holds {engine}"
        );
        serve(&mut kv, &hashes);
        index.insert(EP, capacity, &hashes);
        evicting |= kv.evictions() > 0;
    }
    assert!(evicting, "the workload must force evictions");
    // Every group's prefix: held by both or by neither.
    for g in 0..groups {
        let hashes = prompt(g, prefix, u64::MAX, question);
        let believed = index
            .longest_prefix(&hashes)
            .iter()
            .find(|(e, _)| *e == EP)
            .map_or(0, |(_, n)| *n as usize);
        assert_eq!(believed, kv.longest_prefix(&hashes), "group {g}");
    }
}
