//! A paged KV cache with prefix caching, modelled on vLLM v1's block pool.
//!
//! * The cache has `num_gpu_blocks` blocks of `block_size` tokens. A sequence holds a list of
//!   blocks; each block has a reference count.
//! * A *full* block is identified by a chained hash of (parent block's hash, the block's token
//!   ids, extra keys). See [`block_hash`]: the extra keys are the LoRA adapter (every block) and
//!   the request's `cache_salt` (first block only, so it changes the whole chain), and the
//!   chain starts from a root derived from the model name, so different models or adapters
//!   never share blocks.
//! * When a block's reference count drops to 0 it keeps its hash and stays reusable; it joins
//!   the tail of a free queue. Allocation takes blocks from the head of that queue, evicting
//!   the cached content (a `BlockRemoved` event) of the least recently freed block. A
//!   sequence's blocks are freed last-block first, so the tail of a prompt is evicted before
//!   its prefix (vLLM frees in reverse order for the same reason).
//! * A new request reuses the longest prefix of its full blocks found in the cache; reused
//!   blocks that were free leave the free queue.
//! * Newly full blocks are registered under their hash (a `BlockStored` event), unless another
//!   block already holds that hash (two requests computing the same prefix at once); the
//!   duplicate then stays anonymous.
//!
//! Usage is `1 - free / total`, as vLLM reports it: free cached blocks count as free.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use llmsched_kvevents::{BlockRemoved, BlockStored, KvEvent, MEDIUM_GPU};
use xxhash_rust::xxh3::xxh3_64_with_seed;

const NIL: u32 = u32::MAX;

/// Block hashes are already uniformly distributed: use them as their own hash.
#[derive(Default)]
pub(crate) struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type HashIndex = HashMap<u64, u32, BuildHasherDefault<IdentityHasher>>;

/// The chain root for `model`: every block hash of that model descends from it.
pub fn root_hash(model: &str) -> u64 {
    xxh3_64_with_seed(model.as_bytes(), 0x6c6c_6d73_6368_6564)
}

/// Hash of one full block: `H(parent, extra, token ids)` (xxh3-64, little-endian token bytes).
pub fn block_hash(parent: u64, extra: u64, tokens: &[u32], scratch: &mut Vec<u8>) -> u64 {
    scratch.clear();
    scratch.extend_from_slice(&extra.to_le_bytes());
    for t in tokens {
        scratch.extend_from_slice(&t.to_le_bytes());
    }
    xxh3_64_with_seed(scratch, parent)
}

/// Extra key of a request's blocks: its LoRA adapter name, if any (0 for the base model).
pub fn lora_key(lora: Option<&str>) -> u64 {
    lora.map_or(0, |name| xxh3_64_with_seed(name.as_bytes(), 0x4c6f_5241))
}

/// Extra key folded into the first block only: the request's `cache_salt`, if any.
pub fn salt_key(salt: Option<&str>) -> u64 {
    salt.map_or(0, |s| xxh3_64_with_seed(s.as_bytes(), 0x5361_6c74))
}

#[derive(Debug, Clone, Copy)]
struct Block {
    ref_cnt: u32,
    hash: u64,
    cached: bool,
    in_free: bool,
    prev: u32,
    next: u32,
}

/// LoRA identity attached to `BlockStored` events.
#[derive(Debug, Clone, Copy)]
pub struct EventLora<'a> {
    /// vLLM's integer LoRA id.
    pub id: i64,
    /// Adapter name.
    pub name: &'a str,
}

/// The block pool.
#[derive(Debug)]
pub struct KvCache {
    block_size: usize,
    blocks: Vec<Block>,
    free_head: u32,
    free_tail: u32,
    free_len: usize,
    index: HashIndex,
    events: Option<Vec<KvEvent>>,
    evictions: u64,
}

impl KvCache {
    /// `num_blocks` empty blocks of `block_size` tokens; `events` turns event recording on.
    pub fn new(num_blocks: usize, block_size: usize, events: bool) -> Self {
        let n = u32::try_from(num_blocks).unwrap_or(NIL - 1);
        let blocks = (0..n)
            .map(|i| Block {
                ref_cnt: 0,
                hash: 0,
                cached: false,
                in_free: true,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i + 1 == n { NIL } else { i + 1 },
            })
            .collect::<Vec<_>>();
        Self {
            block_size,
            free_head: if n == 0 { NIL } else { 0 },
            free_tail: if n == 0 { NIL } else { n - 1 },
            free_len: blocks.len(),
            blocks,
            index: HashIndex::default(),
            events: events.then(Vec::new),
            evictions: 0,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks with no reference (cached or not).
    pub fn num_free(&self) -> usize {
        self.free_len
    }

    /// Fraction of blocks referenced by sequences (vLLM's `kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.free_len as f64 / self.blocks.len() as f64
    }

    /// Cached contents evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Number of leading `hashes` present in the cache.
    pub fn longest_prefix(&self, hashes: &[u64]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.index.contains_key(h))
            .count()
    }

    /// Hashes of all cached blocks (free or in use), sorted.
    pub fn cached_hashes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.index.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Blocks currently free, in eviction order (first = next to be evicted): their hashes,
    /// `None` for uncached blocks.
    pub fn eviction_order(&self) -> Vec<Option<u64>> {
        let mut out = Vec::with_capacity(self.free_len);
        let mut cur = self.free_head;
        while cur != NIL {
            let b = &self.blocks[cur as usize];
            out.push(b.cached.then_some(b.hash));
            cur = b.next;
        }
        out
    }

    /// Takes the events recorded since the last call.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn unlink(&mut self, id: u32) {
        let Block { prev, next, .. } = self.blocks[id as usize];
        if prev == NIL {
            self.free_head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.free_tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let b = &mut self.blocks[id as usize];
        b.in_free = false;
        b.prev = NIL;
        b.next = NIL;
        self.free_len -= 1;
    }

    fn push_free_tail(&mut self, id: u32) {
        let tail = self.free_tail;
        {
            let b = &mut self.blocks[id as usize];
            b.in_free = true;
            b.prev = tail;
            b.next = NIL;
        }
        if tail == NIL {
            self.free_head = id;
        } else {
            self.blocks[tail as usize].next = id;
        }
        self.free_tail = id;
        self.free_len += 1;
    }

    fn uncache(&mut self, id: u32) {
        let b = &mut self.blocks[id as usize];
        if !b.cached {
            return;
        }
        b.cached = false;
        let h = b.hash;
        if self.index.get(&h) == Some(&id) {
            self.index.remove(&h);
        }
        self.evictions += 1;
        if let Some(events) = &mut self.events {
            match events.last_mut() {
                Some(KvEvent::BlockRemoved(r)) => r.block_hashes.push(h),
                _ => events.push(KvEvent::BlockRemoved(BlockRemoved {
                    block_hashes: vec![h],
                    medium: Some(MEDIUM_GPU.to_string()),
                    group_idx: None,
                })),
            }
        }
    }

    /// Appends to `seq_blocks` the cached blocks of `hits` (which must all be cached: the
    /// caller got them from [`KvCache::longest_prefix`]) followed by `n_new` fresh blocks.
    /// Returns `false`, changing nothing, if there is not enough free space.
    pub fn allocate(&mut self, seq_blocks: &mut Vec<u32>, hits: &[u64], n_new: usize) -> bool {
        let mut hit_ids = Vec::with_capacity(hits.len());
        let mut hits_in_free = 0;
        for h in hits {
            let Some(&id) = self.index.get(h) else {
                return false;
            };
            if self.blocks[id as usize].in_free {
                hits_in_free += 1;
            }
            hit_ids.push(id);
        }
        if n_new + hits_in_free > self.free_len {
            return false;
        }
        for id in hit_ids {
            if self.blocks[id as usize].in_free {
                self.unlink(id);
            }
            self.blocks[id as usize].ref_cnt += 1;
            seq_blocks.push(id);
        }
        for _ in 0..n_new {
            let id = self.free_head;
            // free_len ≥ n_new was checked above, so the queue is not empty here.
            if id == NIL {
                return false;
            }
            self.unlink(id);
            self.uncache(id);
            self.blocks[id as usize].ref_cnt = 1;
            seq_blocks.push(id);
        }
        true
    }

    /// Registers `seq_blocks[from..to]` (now full) under `hashes[from..to]`; `tokens` are the
    /// sequence's tokens. Records `BlockStored` events for the blocks actually registered.
    pub fn commit(
        &mut self,
        seq_blocks: &[u32],
        hashes: &[u64],
        from: usize,
        to: usize,
        tokens: &[u32],
        lora: Option<EventLora<'_>>,
    ) {
        let bs = self.block_size;
        let mut run: Option<BlockStored> = None;
        for i in from..to.min(seq_blocks.len()).min(hashes.len()) {
            let id = seq_blocks[i];
            let h = hashes[i];
            let b = &mut self.blocks[id as usize];
            let newly = !b.cached
                && match self.index.entry(h) {
                    std::collections::hash_map::Entry::Occupied(_) => false,
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(id);
                        b.cached = true;
                        b.hash = h;
                        true
                    }
                };
            if self.events.is_none() {
                continue;
            }
            if newly {
                let r = run.get_or_insert_with(|| BlockStored {
                    parent_block_hash: i.checked_sub(1).map(|p| hashes[p]),
                    block_size: u32::try_from(bs).unwrap_or(u32::MAX),
                    lora_id: lora.map(|l| l.id),
                    medium: Some(MEDIUM_GPU.to_string()),
                    lora_name: lora.map(|l| l.name.to_string()),
                    ..Default::default()
                });
                r.block_hashes.push(h);
                r.token_ids
                    .extend_from_slice(&tokens[i * bs..((i + 1) * bs).min(tokens.len())]);
            } else if let Some(r) = run.take()
                && let Some(ev) = &mut self.events
            {
                ev.push(KvEvent::BlockStored(r));
            }
        }
        if let Some(r) = run
            && let Some(ev) = &mut self.events
        {
            ev.push(KvEvent::BlockStored(r));
        }
    }

    /// Releases a sequence's blocks, last block first.
    pub fn free(&mut self, seq_blocks: &[u32]) {
        for &id in seq_blocks.iter().rev() {
            let b = &mut self.blocks[id as usize];
            b.ref_cnt = b.ref_cnt.saturating_sub(1);
            if b.ref_cnt == 0 && !b.in_free {
                self.push_free_tail(id);
            }
        }
    }

    /// Forgets every cached hash (vLLM's `reset_prefix_cache`); blocks in use stay allocated.
    pub fn reset(&mut self) {
        for b in &mut self.blocks {
            b.cached = false;
        }
        self.index.clear();
        if let Some(ev) = &mut self.events {
            ev.push(KvEvent::AllBlocksCleared);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes_for(tokens: &[u32], bs: usize, extra: u64, root: u64) -> Vec<u64> {
        let mut scratch = Vec::new();
        let mut parent = root;
        tokens
            .chunks_exact(bs)
            .map(|c| {
                parent = block_hash(parent, extra, c, &mut scratch);
                parent
            })
            .collect()
    }

    /// Allocates and commits `tokens` as one sequence; returns (blocks, hashes).
    fn store(kv: &mut KvCache, tokens: &[u32]) -> (Vec<u32>, Vec<u64>) {
        let bs = kv.block_size();
        let hashes = hashes_for(tokens, bs, 0, 1);
        let mut blocks = Vec::new();
        let hit = kv.longest_prefix(&hashes);
        let need = tokens.len().div_ceil(bs) - hit;
        assert!(kv.allocate(&mut blocks, &hashes[..hit], need));
        kv.commit(&blocks, &hashes, hit, hashes.len(), tokens, None);
        (blocks, hashes)
    }

    #[test]
    fn chained_hashes_depend_on_prefix_extra_keys_and_root() {
        let a: Vec<u32> = (0..32).collect();
        let mut b = a.clone();
        b[0] = 99;
        let ha = hashes_for(&a, 16, 0, 1);
        let hb = hashes_for(&b, 16, 0, 1);
        // Same second block tokens, different first block → different second hash.
        assert_ne!(ha[1], hb[1]);
        assert_ne!(ha, hashes_for(&a, 16, lora_key(Some("x")), 1));
        assert_ne!(ha, hashes_for(&a, 16, 0, root_hash("other-model")));
        assert_eq!(ha, hashes_for(&a, 16, 0, 1));
        assert_eq!(lora_key(None), 0);
        assert_ne!(salt_key(Some("s")), 0);
    }

    #[test]
    fn a_repeated_prefix_hits_and_refcounts_are_shared() {
        let mut kv = KvCache::new(8, 4, true);
        let tokens: Vec<u32> = (0..10).collect(); // 2 full blocks + 2 tokens
        let (blocks, hashes) = store(&mut kv, &tokens);
        assert_eq!(blocks.len(), 3);
        assert_eq!(kv.num_free(), 5);
        // A second sequence with the same 8-token prefix reuses both full blocks.
        assert_eq!(kv.longest_prefix(&hashes), 2);
        let mut b2 = Vec::new();
        assert!(kv.allocate(&mut b2, &hashes, 1));
        assert_eq!(&b2[..2], &blocks[..2]);
        assert_eq!(kv.num_free(), 4);
        kv.free(&blocks);
        // Still referenced by the second sequence: only the first's private block is free.
        assert_eq!(kv.num_free(), 5);
        kv.free(&b2);
        assert_eq!(kv.num_free(), 8);
        assert_eq!(kv.usage(), 0.0);
        // Free blocks keep their content.
        assert_eq!(kv.longest_prefix(&hashes), 2);
        let events = kv.take_events();
        assert_eq!(events.len(), 1);
        let KvEvent::BlockStored(s) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(s.block_hashes, hashes);
        assert_eq!(s.parent_block_hash, None);
        assert_eq!(s.token_ids, (0..8).collect::<Vec<u32>>());
    }

    #[test]
    fn eviction_is_lru_and_tail_blocks_go_first() {
        let mut kv = KvCache::new(6, 2, true);
        let (a, ha) = store(&mut kv, &[1, 2, 3, 4, 5, 6]); // 3 blocks
        let (b, hb) = store(&mut kv, &[7, 8, 9, 10, 11, 12]); // 3 blocks
        kv.free(&a);
        kv.free(&b);
        // a was freed first (tail block first), then b.
        let order: Vec<u64> = kv.eviction_order().into_iter().flatten().collect();
        assert_eq!(order, vec![ha[2], ha[1], ha[0], hb[2], hb[1], hb[0]]);
        let _ = kv.take_events();
        // Reusing a's prefix pulls its blocks out of the free queue; freeing them again puts
        // them behind b, so b is now evicted first.
        let mut a2 = Vec::new();
        assert!(kv.allocate(&mut a2, &ha[..2], 0));
        kv.free(&a2);
        let mut fresh = Vec::new();
        assert!(kv.allocate(&mut fresh, &[], 3));
        // The three oldest free blocks: a's tail block, then b's tail two.
        let evicted: Vec<u64> = kv
            .take_events()
            .into_iter()
            .flat_map(|e| match e {
                KvEvent::BlockRemoved(r) => r.block_hashes,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(evicted, vec![ha[2], hb[2], hb[1]]);
        assert_eq!(kv.longest_prefix(&ha), 2);
        assert_eq!(kv.longest_prefix(&hb), 1);
    }

    #[test]
    fn allocation_fails_atomically_when_full() {
        let mut kv = KvCache::new(4, 2, false);
        let (a, ha) = store(&mut kv, &[1, 2, 3, 4, 5, 6]);
        let mut b = Vec::new();
        assert!(!kv.allocate(&mut b, &[], 2));
        assert!(b.is_empty());
        assert_eq!(kv.num_free(), 1);
        kv.free(&a);
        // Hits that are free count against the space needed.
        let mut c = Vec::new();
        assert!(!kv.allocate(&mut c, &ha, 2));
        assert!(kv.allocate(&mut c, &ha, 1));
        assert_eq!(kv.num_free(), 0);
    }

    #[test]
    fn duplicate_content_is_registered_once_and_reset_clears_all() {
        let mut kv = KvCache::new(8, 2, true);
        let tokens = [1, 2, 3, 4];
        let hashes = hashes_for(&tokens, 2, 0, 1);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        assert!(kv.allocate(&mut x, &[], 2));
        assert!(kv.allocate(&mut y, &[], 2));
        kv.commit(&x, &hashes, 0, 2, &tokens, None);
        kv.commit(&y, &hashes, 0, 2, &tokens, None);
        assert_eq!(kv.cached_hashes().len(), 2);
        let stored = kv
            .take_events()
            .iter()
            .filter(|e| matches!(e, KvEvent::BlockStored(_)))
            .count();
        assert_eq!(stored, 1);
        kv.reset();
        assert!(kv.cached_hashes().is_empty());
        assert_eq!(kv.take_events(), vec![KvEvent::AllBlocksCleared]);
        kv.free(&x);
        kv.free(&y);
        assert_eq!(kv.num_free(), 8);
    }
}
