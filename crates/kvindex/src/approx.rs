//! The approximate prefix index: block hash → endpoints, with a per-endpoint LRU.
//!
//! ## Model
//!
//! The scheduler splits every prompt into blocks and chains their hashes (`hᵢ` depends on all
//! blocks before `i`), so one hash identifies a whole prefix. After routing a request it calls
//! [`ApproxIndex::insert`] with the request's hashes and the chosen endpoint; before routing
//! the next one it calls [`ApproxIndex::longest_prefix`] to learn how many leading blocks each
//! endpoint is believed to hold. Each endpoint remembers at most `capacity` blocks (its LRU
//! stands in for the engine's KV cache); evicting a block from an endpoint's LRU removes that
//! endpoint from the block's entry, and [`ApproxIndex::remove_endpoint`] forgets an endpoint
//! altogether.
//!
//! Two deliberate refinements over the reference indexer:
//!
//! * **Insert order.** A request's blocks are recorded back to front, so its *first* block is
//!   the most recently used one. Under pressure an endpoint then loses the tails of old prompts
//!   before their heads — as the engine's own prefix cache does — instead of losing the head
//!   first, which would make the whole prefix unmatchable.
//! * **Per-endpoint prefixes, by binary search.** An endpoint's match is the length of the
//!   prefix it holds, found with `O(log n)` block lookups instead of one per block (see
//!   [`ApproxIndex::longest_prefix`]); the reference walks every block until the first block
//!   that *no* endpoint holds and counts, per endpoint, every block it holds on the way.
//!
//! ## Concurrency
//!
//! The index is split into `shards` (a power of two, default 32) by block hash, each behind
//! its own `parking_lot::RwLock`. A lookup takes one shard's read lock per probed block, briefly;
//! insert groups the request's blocks by shard and takes each shard's write lock once. Many
//! scheduling threads can therefore look up while pre-request hooks insert, and no lock is
//! held across shards (so there is no lock ordering to get wrong).
//!
//! Each shard keeps its own LRU per endpoint with capacity `⌈capacity / shards⌉`. Block hashes
//! are uniformly spread over shards, so the union of an endpoint's per-shard LRUs behaves like
//! one LRU of `capacity` blocks up to sampling noise (±√(capacity/shards) blocks per shard),
//! which is far below the approximation the index makes anyway (it never sees the engine's own
//! evictions). An endpoint may hold up to `capacity + shards − 1` blocks because of the
//! rounding. Use `shards: 1` for an exact LRU (tests, tiny capacities).
//!
//! ## Memory layout (what makes it < 64 bytes per indexed block)
//!
//! Per shard:
//!
//! * `table`: an open-addressing `hashbrown::HashTable<Slot>`; a `Slot` is 16 bytes: the
//!   block hash and either the single holder inline (endpoint + LRU node index, the common
//!   case) or the index of a sorted holder array for blocks several endpoints hold.
//! * `nodes`: the LRU nodes, 16 bytes each (hash + prev/next links as `u32` indices), stored in
//!   fixed-size chunks (no per-node allocation, no doubling slack) with a free list.
//! * `lrus`: per endpoint, the head/tail/length/capacity of its list.
//!
//! A block held by one endpoint costs 16 bytes of node plus one table bucket (17 bytes at a
//! load factor between 7/16 and 7/8): 35–55 bytes. A block held by `k` endpoints costs
//! `k × (16 + 8)` plus one bucket and a 16-byte array header. [`ApproxIndex::stats`] reports
//! the exact bytes of every allocation the index owns.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};

use hashbrown::hash_table::Entry;
use hashbrown::{HashMap, HashTable};
use parking_lot::RwLock;
use smallvec::SmallVec;

use crate::{EndpointKey, PrefixMatches};

/// Link value meaning "none".
const NIL: u32 = u32::MAX;
/// Set in [`Slot::b`] when the slot's holders live in a holder array.
const MULTI_BIT: u32 = 1 << 31;
/// LRU nodes per chunk (16 bytes each: 8 KiB chunks).
const CHUNK_SHIFT: u32 = 9;
const CHUNK: usize = 1 << CHUNK_SHIFT;
/// Upper bound on shards.
const MAX_SHARDS: usize = 256;

/// Construction parameters of an [`ApproxIndex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApproxIndexConfig {
    /// Number of shards (rounded up to a power of two, 1..=256). Default 32.
    pub shards: usize,
}

impl Default for ApproxIndexConfig {
    fn default() -> Self {
        Self { shards: 32 }
    }
}

impl ApproxIndexConfig {
    /// A shard count suited to a per-endpoint capacity: enough shards to spread contention,
    /// but at least ~512 blocks per endpoint per shard so the sharded LRU stays close to an
    /// exact one. Capacities below 1024 get a single (exact) shard.
    pub fn for_capacity(capacity: usize) -> Self {
        let per = capacity / 512;
        let shards = if per <= 1 {
            1
        } else {
            // Largest power of two not above `per`, capped at 32.
            (1usize << (usize::BITS - 1 - per.leading_zeros())).min(32)
        };
        Self { shards }
    }
}

/// Size figures of an index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexStats {
    /// Indexed blocks: `(block, endpoint)` pairs, i.e. the sum of all LRU lengths.
    pub entries: usize,
    /// Distinct block hashes.
    pub distinct_blocks: usize,
    /// Endpoints with at least one block.
    pub endpoints: usize,
    /// Bytes of every allocation the index owns (tables at their bucket counts, node chunks,
    /// holder arrays, per-endpoint records), plus the shard structs themselves.
    pub memory_bytes: usize,
}

impl IndexStats {
    /// Memory per indexed block (0 when empty).
    pub fn bytes_per_entry(&self) -> f64 {
        if self.entries == 0 {
            0.0
        } else {
            self.memory_bytes as f64 / self.entries as f64
        }
    }
}

/// One LRU node: a block held by the endpoint whose list the node is on.
#[derive(Debug, Clone, Copy)]
struct Node {
    hash: u64,
    /// Towards the most recently used end (`NIL` at the head).
    prev: u32,
    /// Towards the least recently used end (`NIL` at the tail); free-list link when free.
    next: u32,
}

const EMPTY_NODE: Node = Node {
    hash: 0,
    prev: NIL,
    next: NIL,
};

/// A table entry. `b & MULTI_BIT == 0`: one holder, endpoint `a`, LRU node `b`. Otherwise
/// the holders are the array `b & !MULTI_BIT` of the shard's holder sets (`a` unused).
#[derive(Debug, Clone, Copy)]
struct Slot {
    hash: u64,
    a: u32,
    b: u32,
}

impl Slot {
    fn single(hash: u64, ep: EndpointKey, node: u32) -> Self {
        Self {
            hash,
            a: ep,
            b: node,
        }
    }
    fn multi(hash: u64, set: u32) -> Self {
        Self {
            hash,
            a: 0,
            b: set | MULTI_BIT,
        }
    }
    fn set_index(&self) -> Option<usize> {
        (self.b & MULTI_BIT != 0).then_some((self.b & !MULTI_BIT) as usize)
    }
}

/// An endpoint holding a block, with its LRU node for that block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holder {
    ep: EndpointKey,
    node: u32,
}

/// An endpoint's LRU within one shard.
#[derive(Debug, Clone, Copy)]
struct Lru {
    /// Most recently used.
    head: u32,
    /// Least recently used.
    tail: u32,
    len: u32,
    cap: u32,
}

/// Chunked slab of LRU nodes with a free list.
#[derive(Debug, Default)]
struct Nodes {
    chunks: Vec<Box<[Node]>>,
    /// Nodes ever handed out (high-water mark).
    len: u32,
    /// Head of the free list (`NIL` when empty), linked through `next`.
    free: u32,
}

impl Nodes {
    fn new() -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
            free: NIL,
        }
    }

    #[inline]
    fn get(&self, i: u32) -> &Node {
        &self.chunks[(i >> CHUNK_SHIFT) as usize][i as usize & (CHUNK - 1)]
    }

    #[inline]
    fn get_mut(&mut self, i: u32) -> &mut Node {
        &mut self.chunks[(i >> CHUNK_SHIFT) as usize][i as usize & (CHUNK - 1)]
    }

    fn alloc(&mut self, hash: u64) -> u32 {
        let i = if self.free != NIL {
            let i = self.free;
            self.free = self.get(i).next;
            i
        } else {
            if self.len as usize == self.chunks.len() * CHUNK {
                self.chunks.push(vec![EMPTY_NODE; CHUNK].into_boxed_slice());
            }
            let i = self.len;
            self.len += 1;
            i
        };
        *self.get_mut(i) = Node {
            hash,
            prev: NIL,
            next: NIL,
        };
        i
    }

    fn release(&mut self, i: u32) {
        let free = self.free;
        *self.get_mut(i) = Node {
            hash: 0,
            prev: NIL,
            next: free,
        };
        self.free = i;
    }

    fn push_front(&mut self, lru: &mut Lru, i: u32) {
        let old = lru.head;
        {
            let n = self.get_mut(i);
            n.prev = NIL;
            n.next = old;
        }
        if old != NIL {
            self.get_mut(old).prev = i;
        } else {
            lru.tail = i;
        }
        lru.head = i;
        lru.len += 1;
    }

    /// Makes node `i` (already on `lru`) the most recently used.
    fn touch(&mut self, lru: &mut Lru, i: u32) {
        if lru.head != i {
            self.unlink(lru, i);
            self.push_front(lru, i);
        }
    }

    fn unlink(&mut self, lru: &mut Lru, i: u32) {
        let Node { prev, next, .. } = *self.get(i);
        if prev != NIL {
            self.get_mut(prev).next = next;
        } else {
            lru.head = next;
        }
        if next != NIL {
            self.get_mut(next).prev = prev;
        } else {
            lru.tail = prev;
        }
        lru.len -= 1;
    }

    fn bytes(&self) -> usize {
        self.chunks.len() * CHUNK * size_of::<Node>()
            + self.chunks.capacity() * size_of::<Box<[Node]>>()
    }
}

/// Holder arrays of blocks held by several endpoints (sorted by endpoint), with a free list.
#[derive(Debug, Default)]
struct Sets {
    sets: Vec<Option<Box<[Holder]>>>,
    free: Vec<u32>,
    /// Heap bytes of the arrays.
    heap: usize,
}

impl Sets {
    fn get(&self, i: usize) -> &[Holder] {
        self.sets.get(i).and_then(Option::as_deref).unwrap_or(&[])
    }

    fn store(&mut self, holders: Box<[Holder]>) -> u32 {
        self.heap += holders.len() * size_of::<Holder>();
        match self.free.pop() {
            Some(i) => {
                self.sets[i as usize] = Some(holders);
                i
            }
            None => {
                self.sets.push(Some(holders));
                // Shards never approach 2^31 holder arrays (each needs ≥ 2 live nodes).
                (self.sets.len() - 1) as u32
            }
        }
    }

    fn take(&mut self, i: usize) -> Box<[Holder]> {
        let b = self
            .sets
            .get_mut(i)
            .and_then(Option::take)
            .unwrap_or_default();
        self.heap -= b.len() * size_of::<Holder>();
        self.free.push(i as u32);
        b
    }

    fn replace(&mut self, i: usize, holders: Box<[Holder]>) {
        self.heap += holders.len() * size_of::<Holder>();
        if let Some(old) = self.sets.get_mut(i).and_then(|s| s.replace(holders)) {
            self.heap -= old.len() * size_of::<Holder>();
        }
    }

    fn bytes(&self) -> usize {
        self.sets.capacity() * size_of::<Option<Box<[Holder]>>>()
            + self.free.capacity() * size_of::<u32>()
            + self.heap
    }
}

/// Buckets hashbrown allocates for a table reporting `capacity`.
fn buckets(capacity: usize) -> usize {
    match capacity {
        0 => 0,
        c if c < 8 => c + 1,
        c => c / 7 * 8,
    }
}

/// Seeded mixing of a block hash into the hash the shard tables use (the block hashes come
/// from user-controlled text, so the table layout must not be predictable).
#[inline]
fn mix(seed: u64, h: u64) -> u64 {
    let x = (h ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 29)
}

/// One shard.
#[derive(Debug)]
struct Shard {
    seed: u64,
    table: HashTable<Slot>,
    nodes: Nodes,
    sets: Sets,
    lrus: HashMap<EndpointKey, Lru>,
    entries: usize,
    /// Memory as last reported to the index-wide counter.
    reported_memory: usize,
}

impl Shard {
    fn new(seed: u64) -> Self {
        Self {
            seed,
            table: HashTable::new(),
            nodes: Nodes::new(),
            sets: Sets::default(),
            lrus: HashMap::new(),
            entries: 0,
            reported_memory: 0,
        }
    }

    fn memory_bytes(&self) -> usize {
        buckets(self.table.capacity()) * (size_of::<Slot>() + 1)
            + self.nodes.bytes()
            + self.sets.bytes()
            + buckets(self.lrus.capacity()) * (size_of::<(EndpointKey, Lru)>() + 1)
    }

    /// Endpoints holding `hash` (sorted), as a slice borrowed from the shard or `one`.
    #[inline]
    fn holders<'a>(&'a self, slot: &Slot, one: &'a mut [Holder; 1]) -> &'a [Holder] {
        match slot.set_index() {
            None => {
                one[0] = Holder {
                    ep: slot.a,
                    node: slot.b,
                };
                &one[..]
            }
            Some(i) => self.sets.get(i),
        }
    }

    /// Records each `(hash, mixed hash)` of `blocks`, in order, as the most recently used
    /// block of `ep`, trimming `ep`'s LRU to `cap` after each. Returns the change in entries.
    fn insert_blocks(
        &mut self,
        ep: EndpointKey,
        cap: u32,
        blocks: impl Iterator<Item = (u64, u64)>,
    ) -> isize {
        let seed = self.seed;
        let Shard {
            table,
            nodes,
            sets,
            lrus,
            ..
        } = self;
        let lru = lrus.entry(ep).or_insert(Lru {
            head: NIL,
            tail: NIL,
            len: 0,
            cap,
        });
        lru.cap = cap;
        let mut delta = 0isize;
        for (hash, m) in blocks {
            // One probe for find-or-insert (a new block is the common case under a stream of
            // distinct prompts, and each probe is a likely cache miss in a large table).
            match table.entry(m, |s| s.hash == hash, |s| mix(seed, s.hash)) {
                Entry::Occupied(mut occupied) => {
                    let slot = occupied.get_mut();
                    match slot.set_index() {
                        None if slot.a == ep => nodes.touch(lru, slot.b),
                        None => {
                            let node = nodes.alloc(hash);
                            nodes.push_front(lru, node);
                            delta += 1;
                            let other = Holder {
                                ep: slot.a,
                                node: slot.b,
                            };
                            let mine = Holder { ep, node };
                            let pair: Box<[Holder]> = if other.ep < ep {
                                Box::new([other, mine])
                            } else {
                                Box::new([mine, other])
                            };
                            *slot = Slot::multi(hash, sets.store(pair));
                        }
                        Some(si) => {
                            let set = sets.get(si);
                            match set.binary_search_by_key(&ep, |h| h.ep) {
                                Ok(pos) => nodes.touch(lru, set[pos].node),
                                Err(pos) => {
                                    let node = nodes.alloc(hash);
                                    nodes.push_front(lru, node);
                                    delta += 1;
                                    let mut v = Vec::with_capacity(set.len() + 1);
                                    v.extend_from_slice(&set[..pos]);
                                    v.push(Holder { ep, node });
                                    v.extend_from_slice(&set[pos..]);
                                    sets.replace(si, v.into_boxed_slice());
                                }
                            }
                        }
                    }
                }
                Entry::Vacant(vacant) => {
                    let node = nodes.alloc(hash);
                    nodes.push_front(lru, node);
                    delta += 1;
                    vacant.insert(Slot::single(hash, ep, node));
                }
            }
            // Trim to capacity from the least recently used end.
            while lru.len > lru.cap {
                let victim = lru.tail;
                let vh = nodes.get(victim).hash;
                nodes.unlink(lru, victim);
                nodes.release(victim);
                remove_holder(table, sets, seed, vh, ep);
                delta -= 1;
            }
        }
        self.entries = self.entries.wrapping_add_signed(delta);
        delta
    }

    /// Forgets every block of `ep`. Returns the number of entries removed.
    fn remove_endpoint(&mut self, ep: EndpointKey) -> usize {
        let seed = self.seed;
        let Some(lru) = self.lrus.remove(&ep) else {
            return 0;
        };
        let mut i = lru.head;
        let mut removed = 0;
        while i != NIL {
            let Node { hash, next, .. } = *self.nodes.get(i);
            self.nodes.release(i);
            remove_holder(&mut self.table, &mut self.sets, seed, hash, ep);
            removed += 1;
            i = next;
        }
        self.entries -= removed;
        if self.lrus.is_empty() {
            // Nothing left: give the memory back.
            *self = Shard {
                reported_memory: self.reported_memory,
                ..Shard::new(seed)
            };
        }
        removed
    }
}

/// Removes `ep` from the holders of `hash` (no-op when absent).
fn remove_holder(table: &mut HashTable<Slot>, sets: &mut Sets, seed: u64, hash: u64, ep: u32) {
    let m = mix(seed, hash);
    let Ok(entry) = table.find_entry(m, |s| s.hash == hash) else {
        return;
    };
    let slot = *entry.get();
    match slot.set_index() {
        None => {
            if slot.a == ep {
                entry.remove();
            }
        }
        Some(si) => {
            let set = sets.get(si);
            let Ok(pos) = set.binary_search_by_key(&ep, |h| h.ep) else {
                return;
            };
            if set.len() <= 2 {
                let other = set[1 - pos];
                sets.take(si);
                *entry.into_mut() = Slot::single(hash, other.ep, other.node);
            } else {
                let mut v = Vec::with_capacity(set.len() - 1);
                v.extend_from_slice(&set[..pos]);
                v.extend_from_slice(&set[pos + 1..]);
                sets.replace(si, v.into_boxed_slice());
            }
        }
    }
}

/// Keeps each shard's lock on its own cache lines.
#[derive(Debug)]
#[repr(align(128))]
struct Padded<T>(T);

/// The approximate prefix index. Cheap to share (`Arc`); every method takes `&self`.
#[derive(Debug)]
pub struct ApproxIndex {
    shards: Box<[Padded<RwLock<Shard>>]>,
    mask: u64,
    seed: u64,
    entries: AtomicUsize,
    memory: AtomicUsize,
}

impl Default for ApproxIndex {
    fn default() -> Self {
        Self::new(ApproxIndexConfig::default())
    }
}

impl ApproxIndex {
    /// An empty index.
    pub fn new(config: ApproxIndexConfig) -> Self {
        let n = config.shards.clamp(1, MAX_SHARDS).next_power_of_two();
        let seed = std::hash::RandomState::new().hash_one(0x6c6c_6d73_6368_6564u64);
        let shards: Box<[_]> = (0..n)
            .map(|_| Padded(RwLock::new(Shard::new(seed))))
            .collect();
        let index = Self {
            shards,
            mask: (n - 1) as u64,
            seed,
            entries: AtomicUsize::new(0),
            memory: AtomicUsize::new(0),
        };
        let base = index.shards.len() * size_of::<Padded<RwLock<Shard>>>();
        index.memory.store(base, Ordering::Relaxed);
        index
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    #[inline]
    fn shard_of(&self, m: u64) -> usize {
        ((m >> 40) & self.mask) as usize
    }

    fn report(&self, shard: &mut Shard, delta_entries: isize) {
        if delta_entries > 0 {
            self.entries
                .fetch_add(delta_entries.unsigned_abs(), Ordering::Relaxed);
        } else if delta_entries < 0 {
            self.entries
                .fetch_sub(delta_entries.unsigned_abs(), Ordering::Relaxed);
        }
        let now = shard.memory_bytes();
        let before = std::mem::replace(&mut shard.reported_memory, now);
        if now >= before {
            self.memory.fetch_add(now - before, Ordering::Relaxed);
        } else {
            self.memory.fetch_sub(before - now, Ordering::Relaxed);
        }
    }

    /// Records that `endpoint` now holds the blocks `hashes` (in prompt order), with an LRU of
    /// `capacity` blocks. Earlier blocks become the more recently used ones. Blocks it already
    /// holds are refreshed. `capacity` 0 records nothing.
    pub fn insert(&self, endpoint: EndpointKey, capacity: usize, hashes: &[u64]) {
        if hashes.is_empty() || capacity == 0 {
            return;
        }
        let n_shards = self.shards.len();
        let per_shard = u32::try_from(capacity.div_ceil(n_shards)).unwrap_or(u32::MAX);
        let mixed: SmallVec<[u64; 256]> = hashes.iter().map(|&h| mix(self.seed, h)).collect();

        if n_shards == 1 {
            let mut shard = self.shards[0].0.write();
            let delta = shard.insert_blocks(
                endpoint,
                per_shard,
                hashes.iter().copied().zip(mixed.iter().copied()).rev(),
            );
            self.report(&mut shard, delta);
            return;
        }

        // Counting sort of block positions by shard; within a shard, last block first.
        let mut starts: SmallVec<[u32; 33]> = SmallVec::from_elem(0, n_shards + 1);
        for &m in &mixed {
            starts[self.shard_of(m) + 1] += 1;
        }
        for s in 0..n_shards {
            starts[s + 1] += starts[s];
        }
        let mut fill: SmallVec<[u32; 33]> = starts.clone();
        let mut order: SmallVec<[u32; 256]> = SmallVec::from_elem(0, hashes.len());
        for i in (0..hashes.len()).rev() {
            let s = self.shard_of(mixed[i]);
            order[fill[s] as usize] = i as u32;
            fill[s] += 1;
        }
        for s in 0..n_shards {
            let (lo, hi) = (starts[s] as usize, starts[s + 1] as usize);
            if lo == hi {
                continue;
            }
            let mut shard = self.shards[s].0.write();
            let delta = shard.insert_blocks(
                endpoint,
                per_shard,
                order[lo..hi]
                    .iter()
                    .map(|&i| (hashes[i as usize], mixed[i as usize])),
            );
            self.report(&mut shard, delta);
        }
    }

    /// Runs `f` on the (sorted) holders of `hash` under its shard's read lock; false when
    /// nobody holds it.
    #[inline]
    fn with_holders(&self, hash: u64, f: impl FnOnce(&[Holder])) -> bool {
        let m = mix(self.seed, hash);
        let shard = self.shards[self.shard_of(m)].0.read();
        let mut one = [Holder { ep: 0, node: 0 }];
        match shard.table.find(m, |s| s.hash == hash) {
            Some(slot) => {
                f(shard.holders(slot, &mut one));
                true
            }
            None => false,
        }
    }

    /// For each endpoint holding `hashes[0]`, the number of leading blocks of `hashes` it
    /// holds. Endpoints holding nothing are omitted; the order is unspecified.
    ///
    /// Found by binary search, `O(d · log n)` block lookups for `d` distinct match lengths
    /// (typically 1 + ⌈log₂ n⌉ = 9 lookups for a 256-block prompt) instead of one per block:
    /// it relies on an endpoint holding block `i` of a prompt also holding the blocks before
    /// `i`. That holds by construction — a chained hash is only recorded together with all
    /// the blocks before it, and an endpoint's blocks are evicted tail first — except at the
    /// edge of eviction, where the per-shard LRUs may evict a few blocks out of order; a gap
    /// there can make an endpoint's match look up to that edge longer.
    /// [`Self::longest_prefix_linear`] checks every block.
    pub fn longest_prefix(&self, hashes: &[u64]) -> PrefixMatches {
        type Set = SmallVec<[EndpointKey; 16]>;
        let mut out = PrefixMatches::new();
        let Some(&first) = hashes.first() else {
            return out;
        };
        let mut holders: Set = Set::new();
        if !self.with_holders(first, |h| holders.extend(h.iter().map(|x| x.ep))) {
            return out;
        }
        let n = u32::try_from(hashes.len()).unwrap_or(u32::MAX);
        // (endpoints, lo, hi): every endpoint holds block `lo`; its match is in lo+1..=hi.
        let mut stack: SmallVec<[(Set, u32, u32); 8]> = SmallVec::new();
        stack.push((holders, 0, n));
        while let Some((set, lo, hi)) = stack.pop() {
            if lo + 1 >= hi {
                out.extend(set.into_iter().map(|ep| (ep, hi)));
                continue;
            }
            let mid = lo + (hi - lo) / 2;
            // Which endpoints of `set` hold block `mid`: all (the common case, moved as a
            // whole), none, or a split.
            let mut split: Option<(Set, Set)> = None;
            let mut all = false;
            self.with_holders(hashes[mid as usize], |h| {
                let held = |j: &mut usize, ep: EndpointKey| {
                    while *j < h.len() && h[*j].ep < ep {
                        *j += 1;
                    }
                    *j < h.len() && h[*j].ep == ep
                };
                // Fast path: the same endpoints (e.g. a system prompt every endpoint holds).
                if h.len() == set.len() && h.iter().zip(&set).all(|(a, &b)| a.ep == b) {
                    all = true;
                    return;
                }
                // Both sorted: merge passes.
                let mut j = 0;
                let count = set.iter().filter(|&&ep| held(&mut j, ep)).count();
                if count == set.len() {
                    all = true;
                } else if count > 0 {
                    let (mut inside, mut outside) = (Set::new(), Set::new());
                    let mut j = 0;
                    for &ep in &set {
                        if held(&mut j, ep) {
                            inside.push(ep);
                        } else {
                            outside.push(ep);
                        }
                    }
                    split = Some((inside, outside));
                }
            });
            match split {
                Some((inside, outside)) => {
                    stack.push((inside, mid, hi));
                    stack.push((outside, lo, mid));
                }
                None if all => stack.push((set, mid, hi)),
                None => stack.push((set, lo, mid)),
            }
        }
        out
    }

    /// Like [`Self::longest_prefix`], but checks every block in order: the exact number of
    /// *consecutive* leading blocks each endpoint holds (one lookup per matched block).
    pub fn longest_prefix_linear(&self, hashes: &[u64]) -> PrefixMatches {
        let mut out = PrefixMatches::new();
        let mut alive: SmallVec<[EndpointKey; 16]> = SmallVec::new();
        let mut matched = 0u32;
        for (i, &h) in hashes.iter().enumerate() {
            let found = self.with_holders(h, |holders| {
                if i == 0 {
                    alive.extend(holders.iter().map(|x| x.ep));
                    return;
                }
                // Intersect the (sorted) survivors with the (sorted) holders of block i.
                let mut j = 0;
                let mut w = 0;
                for r in 0..alive.len() {
                    let ep = alive[r];
                    while j < holders.len() && holders[j].ep < ep {
                        j += 1;
                    }
                    if j < holders.len() && holders[j].ep == ep {
                        alive[w] = ep;
                        w += 1;
                        j += 1;
                    } else {
                        out.push((ep, matched));
                    }
                }
                alive.truncate(w);
            });
            if !found || alive.is_empty() {
                break;
            }
            matched = i as u32 + 1;
        }
        out.extend(alive.into_iter().map(|ep| (ep, matched)));
        out
    }

    /// The endpoints holding `hash`, sorted.
    pub fn holders(&self, hash: u64) -> SmallVec<[EndpointKey; 4]> {
        let mut out = SmallVec::new();
        self.with_holders(hash, |h| out.extend(h.iter().map(|x| x.ep)));
        out
    }

    /// True when `endpoint` holds `hash`.
    pub fn contains(&self, hash: u64, endpoint: EndpointKey) -> bool {
        self.holders(hash).contains(&endpoint)
    }

    /// Blocks `endpoint` holds.
    pub fn endpoint_len(&self, endpoint: EndpointKey) -> usize {
        self.shards
            .iter()
            .map(|s| s.0.read().lrus.get(&endpoint).map_or(0, |l| l.len as usize))
            .sum()
    }

    /// Forgets `endpoint`. Returns how many blocks it held.
    pub fn remove_endpoint(&self, endpoint: EndpointKey) -> usize {
        let mut removed = 0;
        for s in self.shards.iter() {
            let mut shard = s.0.write();
            let r = shard.remove_endpoint(endpoint);
            if r > 0 {
                removed += r;
                self.report(&mut shard, -(r as isize));
            }
        }
        removed
    }

    /// Forgets every endpoint for which `keep` is false. Returns how many were removed.
    pub fn retain_endpoints(&self, mut keep: impl FnMut(EndpointKey) -> bool) -> usize {
        let gone: Vec<EndpointKey> = self.endpoints().into_iter().filter(|&e| !keep(e)).collect();
        for &e in &gone {
            self.remove_endpoint(e);
        }
        gone.len()
    }

    /// At most `max` of the blocks `endpoint` holds, most recently used first (for a replica
    /// snapshot). Each shard's LRU is exact; the shards are interleaved rank by rank, which
    /// approximates the endpoint's overall recency order as closely as the sharded LRU
    /// itself does. Takes each shard's read lock once.
    pub fn endpoint_blocks(&self, endpoint: EndpointKey, max: usize) -> Vec<u64> {
        let n = self.shards.len();
        let per_shard = max.div_ceil(n.max(1));
        let mut lists: Vec<Vec<u64>> = Vec::with_capacity(n);
        for s in self.shards.iter() {
            let shard = s.0.read();
            let mut v = Vec::new();
            if let Some(lru) = shard.lrus.get(&endpoint) {
                v.reserve((lru.len as usize).min(per_shard));
                let mut i = lru.head;
                while i != NIL && v.len() < per_shard {
                    let node = shard.nodes.get(i);
                    v.push(node.hash);
                    i = node.next;
                }
            }
            lists.push(v);
        }
        let total: usize = lists.iter().map(Vec::len).sum();
        let mut out = Vec::with_capacity(total.min(max));
        let longest = lists.iter().map(Vec::len).max().unwrap_or(0);
        'ranks: for rank in 0..longest {
            for l in &lists {
                if let Some(&h) = l.get(rank) {
                    if out.len() == max {
                        break 'ranks;
                    }
                    out.push(h);
                }
            }
        }
        out
    }

    /// Endpoints holding at least one block, sorted.
    pub fn endpoints(&self) -> Vec<EndpointKey> {
        let mut v: Vec<EndpointKey> = Vec::new();
        for s in self.shards.iter() {
            v.extend(s.0.read().lrus.keys().copied());
        }
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Indexed blocks (sum of all LRU lengths); lock-free.
    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    /// True when nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the index owns, as of the last modification; lock-free.
    pub fn memory_bytes(&self) -> usize {
        self.memory.load(Ordering::Relaxed)
    }

    /// Exact figures (takes every shard's read lock once).
    pub fn stats(&self) -> IndexStats {
        let mut st = IndexStats {
            memory_bytes: self.shards.len() * size_of::<Padded<RwLock<Shard>>>(),
            ..Default::default()
        };
        let mut eps: Vec<EndpointKey> = Vec::new();
        for s in self.shards.iter() {
            let shard = s.0.read();
            st.entries += shard.entries;
            st.distinct_blocks += shard.table.len();
            st.memory_bytes += shard.memory_bytes();
            eps.extend(shard.lrus.keys().copied());
        }
        eps.sort_unstable();
        eps.dedup();
        st.endpoints = eps.len();
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact() -> ApproxIndex {
        ApproxIndex::new(ApproxIndexConfig { shards: 1 })
    }

    fn sorted(mut v: PrefixMatches) -> Vec<(u32, u32)> {
        v.sort_unstable();
        v.into_vec()
    }

    #[test]
    fn longest_prefix_counts_consecutive_blocks_per_endpoint() {
        let idx = exact();
        idx.insert(1, 100, &[10, 11, 12, 13]);
        idx.insert(2, 100, &[10, 11]);
        idx.insert(3, 100, &[20, 21]);
        // Endpoint 1 holds all four, endpoint 2 the first two, endpoint 3 none of them.
        assert_eq!(
            sorted(idx.longest_prefix(&[10, 11, 12, 13, 14])),
            vec![(1, 4), (2, 2)]
        );
        assert_eq!(sorted(idx.longest_prefix(&[20, 21, 22])), vec![(3, 2)]);
        assert!(idx.longest_prefix(&[99, 10]).is_empty());
        assert!(idx.longest_prefix(&[]).is_empty());
    }

    #[test]
    fn a_missing_block_ends_the_match() {
        let idx = exact();
        idx.insert(1, 100, &[1, 2, 3]);
        idx.insert(2, 100, &[1, 3]);
        // Endpoint 2 holds blocks 1 and 3 but not 2: its match is 1 (both searches).
        assert_eq!(sorted(idx.longest_prefix(&[1, 2, 3])), vec![(1, 3), (2, 1)]);
        assert_eq!(
            sorted(idx.longest_prefix_linear(&[1, 2, 3])),
            vec![(1, 3), (2, 1)]
        );
    }

    #[test]
    fn binary_search_assumes_held_prefixes_have_no_gaps() {
        // A gap that recording whole prompts and evicting tails first cannot produce:
        // endpoint 1 holds blocks 1, 3, 4 of [1, 2, 3, 4] but not 2.
        let idx = exact();
        idx.insert(1, 100, &[1, 3, 4]);
        assert_eq!(
            sorted(idx.longest_prefix_linear(&[1, 2, 3, 4])),
            vec![(1, 1)]
        );
        // The binary search probes blocks 3 and 4 only and reports the whole prompt.
        assert_eq!(sorted(idx.longest_prefix(&[1, 2, 3, 4])), vec![(1, 4)]);
    }

    #[test]
    fn binary_and_linear_searches_agree_on_recorded_prompts() {
        // Prompts sharing prefixes of various lengths, recorded whole on several endpoints.
        let idx = ApproxIndex::new(ApproxIndexConfig { shards: 8 });
        let base: Vec<u64> = (0..300u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
            .collect();
        for ep in 0..40u32 {
            let keep = (ep as usize * 7) % 300 + 1;
            let mut p = base[..keep].to_vec();
            p.extend((0..20u64).map(|i| (u64::from(ep) << 40) | (i + 1)));
            idx.insert(ep, 100_000, &p);
        }
        for len in [1usize, 2, 7, 64, 255, 256, 300] {
            let q = &base[..len];
            assert_eq!(
                sorted(idx.longest_prefix(q)),
                sorted(idx.longest_prefix_linear(q)),
                "len {len}"
            );
        }
        let m = sorted(idx.longest_prefix(&base));
        assert_eq!(m.len(), 40);
        for (ep, n) in m {
            assert_eq!(n as usize, (ep as usize * 7) % 300 + 1);
        }
    }

    #[test]
    fn lru_evicts_least_recent_and_unlinks_the_endpoint_from_the_block() {
        let idx = exact();
        // Capacity 4. Inserted back to front: after this, recency (most→least) is 1,2,3,4.
        idx.insert(7, 4, &[1, 2, 3, 4]);
        assert_eq!(idx.endpoint_len(7), 4);
        idx.insert(8, 4, &[4]);
        // New blocks 5 and 6 (5 most recent) evict the two least recent: 4 then 3.
        idx.insert(7, 4, &[5, 6]);
        assert_eq!(idx.endpoint_len(7), 4);
        assert!(idx.contains(1, 7) && idx.contains(2, 7));
        assert!(!idx.contains(3, 7));
        assert!(idx.holders(3).is_empty(), "block 3 had no other holder");
        // Block 4 is still held by endpoint 8 only.
        assert_eq!(idx.holders(4).as_slice(), &[8]);
        assert_eq!(idx.len(), 5);
    }

    #[test]
    fn reinserting_refreshes_recency() {
        let idx = exact();
        idx.insert(1, 3, &[1, 2, 3]); // recency 1,2,3
        idx.insert(1, 3, &[3]); // recency 3,1,2
        idx.insert(1, 3, &[4]); // evicts 2
        assert!(idx.contains(3, 1) && idx.contains(1, 1) && idx.contains(4, 1));
        assert!(!idx.contains(2, 1));
        assert_eq!(idx.len(), 3);
    }

    #[test]
    fn eviction_under_pressure_keeps_prefix_heads() {
        let idx = exact();
        // A long prompt larger than the capacity: only its first `cap` blocks survive.
        let hashes: Vec<u64> = (100..110).collect();
        idx.insert(1, 4, &hashes);
        assert_eq!(sorted(idx.longest_prefix(&hashes)), vec![(1, 4)]);
    }

    #[test]
    fn many_holders_are_kept_sorted_and_shrink_back_to_single() {
        let idx = exact();
        for ep in [5u32, 1, 9, 3] {
            idx.insert(ep, 10, &[42, 43]);
        }
        assert_eq!(idx.holders(42).as_slice(), &[1, 3, 5, 9]);
        assert_eq!(
            sorted(idx.longest_prefix(&[42, 43])),
            vec![(1, 2), (3, 2), (5, 2), (9, 2)]
        );
        for ep in [1u32, 9, 3] {
            assert_eq!(idx.remove_endpoint(ep), 2);
        }
        assert_eq!(idx.holders(42).as_slice(), &[5]);
        assert_eq!(idx.len(), 2);
        // Endpoint 5 can still refresh and extend its entries after the conversions.
        idx.insert(5, 10, &[42, 43, 44]);
        assert_eq!(sorted(idx.longest_prefix(&[42, 43, 44])), vec![(5, 3)]);
    }

    #[test]
    fn removing_an_endpoint_purges_it_everywhere() {
        let idx = ApproxIndex::new(ApproxIndexConfig { shards: 8 });
        let a: Vec<u64> = (0..200).map(|i| i * 7919).collect();
        idx.insert(1, 10_000, &a);
        idx.insert(2, 10_000, &a[..50]);
        assert_eq!(idx.len(), 250);
        assert_eq!(idx.endpoints(), vec![1, 2]);
        assert_eq!(idx.remove_endpoint(1), 200);
        assert_eq!(idx.remove_endpoint(1), 0);
        assert_eq!(idx.endpoints(), vec![2]);
        assert_eq!(sorted(idx.longest_prefix(&a)), vec![(2, 50)]);
        assert_eq!(idx.retain_endpoints(|e| e != 2), 1);
        assert!(idx.is_empty());
        assert_eq!(idx.stats().distinct_blocks, 0);
        // Memory returns to the empty baseline.
        assert_eq!(
            idx.memory_bytes(),
            ApproxIndex::new(ApproxIndexConfig { shards: 8 }).memory_bytes()
        );
    }

    #[test]
    fn sharded_capacity_is_split_per_shard() {
        let idx = ApproxIndex::new(ApproxIndexConfig { shards: 4 });
        let hashes: Vec<u64> = (0..10_000u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9))
            .collect();
        idx.insert(1, 1000, &hashes);
        // Each of the 4 shards keeps at most ⌈1000/4⌉ = 250 blocks of the endpoint.
        let n = idx.endpoint_len(1);
        assert!(n <= 1000, "{n}");
        // With 10k uniformly spread blocks every shard fills up.
        assert_eq!(n, 1000);
        assert_eq!(idx.len(), 1000);
    }

    #[test]
    fn capacity_zero_records_nothing() {
        let idx = exact();
        idx.insert(1, 0, &[1, 2]);
        assert!(idx.is_empty());
        assert!(idx.endpoints().is_empty());
    }

    #[test]
    fn shrinking_capacity_evicts_on_next_insert() {
        let idx = exact();
        idx.insert(1, 10, &[1, 2, 3, 4, 5]);
        idx.insert(1, 2, &[6]);
        assert_eq!(idx.endpoint_len(1), 2);
        assert!(idx.contains(6, 1) && idx.contains(1, 1));
    }

    #[test]
    fn counters_match_exact_stats() {
        let idx = ApproxIndex::new(ApproxIndexConfig { shards: 16 });
        for ep in 0..20u32 {
            let hs: Vec<u64> = (0..300u64)
                .map(|i| (i + u64::from(ep % 5) * 1000) * 31)
                .collect();
            idx.insert(ep, 200, &hs);
        }
        let st = idx.stats();
        assert_eq!(st.entries, idx.len());
        assert_eq!(st.memory_bytes, idx.memory_bytes());
        assert_eq!(st.endpoints, 20);
        // 5 distinct prompts of 300 blocks; each endpoint keeps ~200 of its prompt's blocks.
        assert!(st.distinct_blocks <= 1500);
    }

    #[test]
    fn memory_stays_under_64_bytes_per_block_when_full() {
        // 8 endpoints × 31,250 blocks, every block held by one endpoint (the worst case).
        let idx = ApproxIndex::default();
        let mut h = 0x1234_5678u64;
        for ep in 0..8u32 {
            for _ in 0..(40_000 / 250) {
                let hs: Vec<u64> = (0..250)
                    .map(|_| {
                        h = h
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        h
                    })
                    .collect();
                idx.insert(ep, 31_250, &hs);
            }
        }
        let st = idx.stats();
        assert!(st.entries >= 8 * 31_250 - 8 * 32, "{st:?}");
        assert!(st.entries <= 8 * (31_250 + 31), "{st:?}");
        assert!(
            st.bytes_per_entry() < 64.0,
            "{st:?} {}",
            st.bytes_per_entry()
        );
    }

    #[test]
    fn for_capacity_picks_shards() {
        assert_eq!(ApproxIndexConfig::for_capacity(100).shards, 1);
        assert_eq!(ApproxIndexConfig::for_capacity(1023).shards, 1);
        assert_eq!(ApproxIndexConfig::for_capacity(2048).shards, 4);
        assert_eq!(ApproxIndexConfig::for_capacity(31_250).shards, 32);
    }

    #[test]
    fn concurrent_lookups_and_inserts() {
        use std::sync::Arc;
        let idx = Arc::new(ApproxIndex::default());
        let prompts: Vec<Vec<u64>> = (0..16u64)
            .map(|p| {
                (0..64u64)
                    .map(|i| (p << 32 | i).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    .collect()
            })
            .collect();
        let prompts = Arc::new(prompts);
        let mut handles = Vec::new();
        for t in 0..4u32 {
            let idx = idx.clone();
            let prompts = prompts.clone();
            handles.push(std::thread::spawn(move || {
                for r in 0..500usize {
                    let p = &prompts[(r + t as usize) % prompts.len()];
                    let m = idx.longest_prefix(p);
                    for (_, n) in &m {
                        assert!(*n as usize <= p.len());
                    }
                    idx.insert(t, 2_000, p);
                    if r % 97 == 0 {
                        idx.remove_endpoint(t);
                    }
                }
            }));
        }
        for h in handles {
            h.join().unwrap();
        }
        let st = idx.stats();
        assert_eq!(st.entries, idx.len());
        assert_eq!(st.memory_bytes, idx.memory_bytes());
    }

    #[test]
    fn endpoint_blocks_export_recency_order_and_rebuild_the_same_matches() {
        // Exact LRU: most recently used first, capped.
        let idx = exact();
        idx.insert(1, 100, &[1, 2, 3]);
        idx.insert(1, 100, &[7, 8]);
        idx.insert(2, 100, &[9]);
        assert_eq!(idx.endpoint_blocks(1, 10), vec![7, 8, 1, 2, 3]);
        assert_eq!(idx.endpoint_blocks(1, 2), vec![7, 8]);
        assert!(idx.endpoint_blocks(5, 10).is_empty());
        // Sharded: the export re-inserted (least recent chunk first, as a snapshot is
        // applied) into another index gives the same prefix matches.
        let a = ApproxIndex::new(ApproxIndexConfig { shards: 8 });
        let prompts: Vec<Vec<u64>> = (0..40u64)
            .map(|p| (0..50u64).map(|b| p * 1000 + b).collect())
            .collect();
        for (i, p) in prompts.iter().enumerate() {
            a.insert((i % 3) as u32, 10_000, p);
        }
        let b = ApproxIndex::new(ApproxIndexConfig { shards: 8 });
        for ep in 0..3u32 {
            let blocks = a.endpoint_blocks(ep, usize::MAX);
            assert_eq!(blocks.len(), a.endpoint_len(ep));
            for chunk in blocks.rchunks(64) {
                b.insert(ep, 10_000, chunk);
            }
        }
        assert_eq!(b.len(), a.len());
        for p in &prompts {
            assert_eq!(sorted(a.longest_prefix(p)), sorted(b.longest_prefix(p)));
        }
    }
}
