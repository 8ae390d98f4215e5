//! The precise prefix index: which endpoint holds which KV block, as the engines report it in
//! their KV-cache events.
//!
//! ## Two key spaces
//!
//! Engines name blocks with their own hashes (vLLM: SHA-256 or xxh3-128 of a pickled or CBOR
//! tuple, seeded by `PYTHONHASHSEED`); reproducing them exactly is fragile. The index therefore
//! names blocks with its own **request keys**, computed by [`BlockKeyer`] from token ids:
//!
//! ```text
//! root(model)   = H(H(hashSeed), model)            model = LoRA adapter name when there is one
//! key₀          = H(root, tokens of block 0)
//! keyᵢ          = H(keyᵢ₋₁, tokens of block i)     H = xxh3-64, tokens as little-endian u32
//! ```
//!
//! and learns the **engine hash → request key** mapping from each `BlockStored` event, which
//! carries the blocks' token ids and the parent block's engine hash: the first stored block
//! chains from the request key the parent's engine hash maps to (or from `root(model)` when
//! there is no parent). An event whose parent is unknown is dropped
//! ([`StoreOutcome::UnknownParent`]), as llm-d's indexer does: its keys cannot be placed.
//! Engine mappings are kept per endpoint (engines may use different hash seeds).
//!
//! When the engine's block size differs from the index's, an event's blocks and keys are
//! paired by position ratio (engine block `i·E/n` ↔ request key `i·R/n`, `n = max(E, R)`): with
//! 16-token engine blocks and 64-token keys, four engine hashes map to one key; the reverse maps
//! one engine hash to several keys. Use the engine's block size (vLLM: 16) unless there is a
//! reason not to: keys can only be computed for whole blocks of the index's size inside one
//! event.
//!
//! ## Entries, tiers, speculation
//!
//! A request key maps to the endpoints holding it (at most `max_holders_per_key`, the
//! reference's `podCacheSize`; the oldest is dropped beyond that), each with a set of storage
//! tiers (`medium` of the event, lower-cased; `gpu` when absent). A holder's weight is the
//! highest weight among its tiers (default `gpu` 1.0, `cpu` 0.8; unknown media 1.0).
//! `BlockRemoved` clears one tier; a holder with no tier left is removed; a key with no holder
//! left is removed. `AllBlocksCleared` and an endpoint leaving remove the endpoint everywhere
//! ([`PreciseIndex::clear_endpoint`]).
//!
//! **Speculative** holders are written at routing time for the chosen endpoint and count with
//! weight 1.0, bridging the time between the routing decision and the engine's events. Their
//! life is tied to the request ([`PreciseIndex::begin_speculative`] at dispatch,
//! [`PreciseIndex::end_speculative`] once the engine has prefilled the request — its first
//! token — or the request ended):
//!
//! * while at least one request routed to the endpoint with that key is still **pending**
//!   (waiting in the engine's queue or being prefilled), the holder counts, however long the
//!   wait: the engine will compute those blocks when it schedules the request. A
//!   `BlockStored` confirms the holder (it is then a confirmed one too); a `BlockRemoved`
//!   clears the confirmed tier at once but leaves the pending speculation (the queued request
//!   will recompute the block);
//! * when the last pending request of the key ends, a confirmed holder is simply confirmed,
//!   and an unconfirmed one gets a **grace** period (the reference's `speculativeTTL`) for
//!   the confirming event to arrive, then expires; a `BlockRemoved` after that drops it at
//!   once;
//! * a safety lifetime (`max_life` of `begin_speculative`) bounds a pending holder whose end
//!   is never reported.
//!
//! [`PreciseIndex::add_speculative`] is the older, time-only form (the holder expires after a
//! TTL counted from the routing decision). Expired holders are ignored by lookups at once and
//! removed by [`PreciseIndex::sweep_expired`] (also run on every speculative write).
//!
//! ## Lookup
//!
//! [`PreciseIndex::longest_prefix`] walks the request's keys in order and gives, per endpoint,
//! the number of consecutive leading blocks it holds and their tier-weighted sum; the walk stops
//! at the first key no surviving endpoint holds. Each shard the keys live in is read-locked
//! once for the whole walk; keys are probed in rounds of 16 whose table probes are independent
//! (their cache misses overlap), the next round's slots being loaded while the current one is
//! matched; each surviving endpoint then walks the round's holder lists with its counters in
//! registers, finding itself at its position in the previous list (holder sets rarely change
//! from one block to the next). A probe reads one half cache line (see the `table` module); no
//! allocation unless more than 16 endpoints hold the first key (matches live in a
//! [`SmallVec`]).
//!
//! ## Concurrency and memory
//!
//! Keys are spread over `shards` (power of two) `parking_lot::RwLock`ed shards; no operation
//! holds two shard write locks at once (a lookup holds several read locks). Each shard bounds
//! its keys with an LRU (recency = last store or speculative write) of `⌈max_keys / shards⌉`
//! entries. Engine mappings live per endpoint in two generations bounded by
//! `max_engine_keys_per_endpoint` (a mapping unused for a whole generation is forgotten;
//! removal events normally delete mappings long before). A shard's table is a flat
//! open-addressing array of 32-byte slots (key and up to two holders inline; more holders
//! spill to the heap) at most 3/4 full, plus 4 bytes per slot for the LRU node;
//! [`PreciseIndex::stats`] reports the bytes of every table, node slab, spilled holder list
//! and engine map. Engine maps use hashbrown's default (foldhash) hasher.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hashbrown::HashMap as FastMap;
use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use smallvec::SmallVec;
use xxhash_rust::xxh3::{Xxh3, xxh3_64, xxh3_64_with_seed};

use crate::EndpointKey;

mod table;
use table::{KeyTable, TableView};

/// Keys probed per round by [`PreciseIndex::longest_prefix`].
const LOOKUP_BATCH: usize = 16;
/// Link value meaning "none".
const NIL: u32 = u32::MAX;
/// Tier bit of speculative holders.
const SPEC: u8 = 0x80;
/// Tier bits of confirmed holders.
const CONFIRMED: u8 = 0x7f;
/// Tiers that can be configured (bits 0..=5); bit 6 is the catch-all for unknown media.
const MAX_TIERS: usize = 6;
const OTHER_TIER: u8 = 6;
/// Expiry ticks are 24-bit, in units of 8 ms (wrap after ~37 hours; TTLs must stay far below).
const TICK_MS: u64 = 8;
const TICK_MASK: u32 = 0x00ff_ffff;
/// Tokens hashed from a stack buffer per block (longer blocks stream in chunks).
const STACK_TOKENS: usize = 256;

/// Construction parameters of a [`PreciseIndex`].
#[derive(Debug, Clone, PartialEq)]
pub struct PreciseIndexConfig {
    /// Tokens per block of the request keys. Default 16 (vLLM's default block size).
    pub block_size: u32,
    /// Seed of the request-key chain (the reference's `hashSeed`). Default "".
    pub hash_seed: String,
    /// Shards (rounded up to a power of two, 1..=1024). Default 64.
    pub shards: usize,
    /// Bound on distinct keys (the reference's `inMemoryConfig.size`). Default 100,000,000.
    pub max_keys: usize,
    /// Bound on endpoints per key (the reference's `podCacheSize`). Default 10.
    pub max_holders_per_key: usize,
    /// Bound on engine-hash mappings per endpoint. Default 1,048,576.
    pub max_engine_keys_per_endpoint: usize,
    /// Storage tiers and their weights, lower-case names (at most 6). Default `gpu` 1.0,
    /// `cpu` 0.8.
    pub tiers: Vec<(String, f64)>,
}

impl Default for PreciseIndexConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            hash_seed: String::new(),
            shards: 64,
            max_keys: 100_000_000,
            max_holders_per_key: 10,
            max_engine_keys_per_endpoint: 1 << 20,
            tiers: vec![("gpu".into(), 1.0), ("cpu".into(), 0.8)],
        }
    }
}

/// Computes request keys from token ids (see the module docs).
#[derive(Debug, Clone)]
pub struct BlockKeyer {
    block_size: usize,
    seed: u64,
}

impl BlockKeyer {
    /// A keyer for `block_size`-token blocks (0 is treated as 1) seeded by `hash_seed`.
    pub fn new(block_size: u32, hash_seed: &str) -> Self {
        Self {
            block_size: (block_size as usize).max(1),
            seed: xxh3_64(hash_seed.as_bytes()),
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The chain root of `model` (the LoRA adapter's name for adapter requests).
    pub fn root(&self, model: &str) -> u64 {
        xxh3_64_with_seed(model.as_bytes(), self.seed)
    }

    /// The key of one block whose predecessor's key is `parent`.
    #[inline]
    pub fn block_key(&self, parent: u64, tokens: &[u32]) -> u64 {
        let mut buf = [0u8; STACK_TOKENS * 4];
        if tokens.len() <= STACK_TOKENS {
            for (dst, t) in buf.chunks_exact_mut(4).zip(tokens) {
                dst.copy_from_slice(&t.to_le_bytes());
            }
            return xxh3_64_with_seed(&buf[..tokens.len() * 4], parent);
        }
        let mut h = Xxh3::with_seed(parent);
        for chunk in tokens.chunks(STACK_TOKENS) {
            for (dst, t) in buf.chunks_exact_mut(4).zip(chunk) {
                dst.copy_from_slice(&t.to_le_bytes());
            }
            h.update(&buf[..chunk.len() * 4]);
        }
        h.digest()
    }

    /// Appends the keys of the full blocks of `tokens`, chained from `parent`, to `out`
    /// (a trailing partial block has no key).
    pub fn extend(&self, parent: u64, tokens: &[u32], out: &mut Vec<u64>) {
        out.reserve(tokens.len() / self.block_size);
        let mut prev = parent;
        for block in tokens.chunks_exact(self.block_size) {
            prev = self.block_key(prev, block);
            out.push(prev);
        }
    }

    /// The keys of a prompt of `model`: [`Self::root`] then [`Self::extend`].
    pub fn prompt_keys(&self, model: &str, tokens: &[u32], out: &mut Vec<u64>) {
        self.extend(self.root(model), tokens, out);
    }
}

/// One endpoint's prefix match.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreciseMatch {
    /// The endpoint.
    pub endpoint: EndpointKey,
    /// Consecutive leading blocks it holds.
    pub blocks: u32,
    /// Their tier-weighted sum (≤ `blocks`).
    pub weighted: f64,
}

/// Per-endpoint matches of one lookup, endpoints with no match omitted.
pub type PreciseMatches = SmallVec<[PreciseMatch; 8]>;

/// A `BlockStored` event, as the index needs it.
#[derive(Debug, Clone, Copy)]
pub struct StoredBlocks<'a> {
    /// The engine's hashes of the stored blocks, in prefix order.
    pub engine_hashes: &'a [u64],
    /// The engine's hash of the block before the first one (`None` at a sequence's start).
    pub parent: Option<u64>,
    /// Token ids of all stored blocks, concatenated.
    pub tokens: &'a [u32],
    /// The engine's tokens per block.
    pub engine_block_size: u32,
    /// The model the blocks belong to (the topic's model name).
    pub model: &'a str,
    /// LoRA adapter name, which replaces `model` in the key chain.
    pub lora_name: Option<&'a str>,
    /// Storage medium (`GPU`, `CPU`, …); `None` means GPU.
    pub medium: Option<&'a str>,
}

/// What [`PreciseIndex::block_stored`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Keys recorded for the endpoint (0 when the tokens do not fill one index block).
    Stored(usize),
    /// The parent's engine hash is unknown for this endpoint: dropped.
    UnknownParent,
    /// Inconsistent event (e.g. token count ≠ blocks × block size): dropped.
    Invalid(&'static str),
}

/// Size figures of a [`PreciseIndex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PreciseStats {
    /// Distinct request keys.
    pub keys: usize,
    /// `(key, endpoint)` pairs, speculative ones included.
    pub entries: usize,
    /// Engine-hash mappings over all endpoints.
    pub engine_keys: usize,
    /// Endpoints with engine state.
    pub endpoints: usize,
    /// Bytes of the tables, node slabs, spilled holder lists and engine maps.
    pub memory_bytes: usize,
}

/// An endpoint holding a key. A slot's holders are sorted by endpoint, so a lookup
/// intersects them with its surviving endpoints in one merge pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holder {
    ep: EndpointKey,
    /// Tier bits (0..=6) and [`SPEC`].
    tiers: u8,
    /// 24-bit, little-endian: the expiry tick of a speculative holder, the shard's write
    /// clock at the last store of a confirmed one (for choosing whom to drop when a key has
    /// `max_holders_per_key` holders).
    expiry: [u8; 3],
}

impl Holder {
    #[inline]
    fn expiry(&self) -> u32 {
        u32::from_le_bytes([self.expiry[0], self.expiry[1], self.expiry[2], 0])
    }

    #[inline]
    fn set_expiry(&mut self, t: u32) {
        let b = (t & TICK_MASK).to_le_bytes();
        self.expiry = [b[0], b[1], b[2]];
    }

    /// Whether the holder counts at tick `now`.
    #[inline]
    fn alive(&self, now: u32) -> bool {
        self.tiers & CONFIRMED != 0 || (self.tiers & SPEC != 0 && tick_before(now, self.expiry()))
    }
}

/// An endpoint still matching every key so far during a lookup.
#[derive(Debug, Clone, Copy)]
struct Survivor {
    ep: EndpointKey,
    /// Its entry in the lookup's output.
    at: u32,
    /// Its position in the last holder list it was found in.
    hint: u32,
}

/// A set of shard indices (below 1024, the shard limit).
#[derive(Default)]
struct ShardSet([u64; 16]);

impl ShardSet {
    #[inline]
    fn insert(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }

    #[inline]
    fn contains(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// `a < b` on the 24-bit tick circle.
#[inline]
fn tick_before(a: u32, b: u32) -> bool {
    let d = b.wrapping_sub(a) & TICK_MASK;
    d != 0 && d < (TICK_MASK >> 1)
}

/// The holder to drop from a full key: a speculative one (the soonest to expire), else the
/// confirmed one stored longest ago.
fn victim(holders: &[Holder], clock: u32) -> usize {
    let mut best = 0;
    let mut best_rank = (false, 0u32);
    for (i, h) in holders.iter().enumerate() {
        let rank = if h.tiers & CONFIRMED == 0 {
            // Speculative: rank above every confirmed holder; sooner expiry first.
            (
                true,
                TICK_MASK - (h.expiry().wrapping_sub(clock) & TICK_MASK),
            )
        } else {
            (false, clock.wrapping_sub(h.expiry()) & TICK_MASK)
        };
        if i == 0 || rank > best_rank {
            best = i;
            best_rank = rank;
        }
    }
    best
}

/// The holders of one key, sorted by endpoint; two inline (24 bytes, so a table slot is 32).
type Holders = SmallVec<[Holder; 2]>;

/// A table slot must fit half a cache line (see [`table`]).
const _: () = assert!(size_of::<table::Slot<Holders>>() == 32);

#[derive(Debug, Clone, Copy)]
struct Node {
    key: u64,
    prev: u32,
    next: u32,
}

/// A shard: key table, LRU of keys (head = most recent), speculative expiry queue.
struct Shard {
    /// Key → holders; each entry's tag is its LRU node.
    table: KeyTable<Holders>,
    nodes: Vec<Node>,
    free: u32,
    head: u32,
    tail: u32,
    cap: usize,
    /// Holders in spilled (heap) lists, for memory accounting.
    spilled: usize,
    entries: usize,
    /// Write clock (24-bit), stamped on confirmed holders.
    clock: u32,
    /// (expiry in ticks since the index's epoch, key, endpoint) of speculative writes,
    /// earliest first.
    spec_queue: BinaryHeap<Reverse<(u64, u64, EndpointKey)>>,
    /// Pending requests per (key, endpoint) (see the module docs).
    pending: FastMap<(u64, EndpointKey), u32>,
}

impl Shard {
    fn new(cap: usize) -> Self {
        Self {
            table: KeyTable::new(),
            nodes: Vec::new(),
            free: NIL,
            head: NIL,
            tail: NIL,
            cap: cap.max(1),
            spilled: 0,
            entries: 0,
            clock: 0,
            spec_queue: BinaryHeap::new(),
            pending: FastMap::new(),
        }
    }

    fn alloc_node(&mut self, key: u64) -> u32 {
        let node = Node {
            key,
            prev: NIL,
            next: self.head,
        };
        let i = if self.free != NIL {
            let i = self.free;
            self.free = self.nodes[i as usize].next;
            self.nodes[i as usize] = node;
            i
        } else {
            self.nodes.push(node);
            // Bounded by `cap` (≤ max_keys / shards), far below u32::MAX.
            u32::try_from(self.nodes.len() - 1).unwrap_or(NIL - 1)
        };
        if self.head != NIL {
            self.nodes[self.head as usize].prev = i;
        } else {
            self.tail = i;
        }
        self.head = i;
        i
    }

    fn unlink(&mut self, i: u32) {
        let Node { prev, next, .. } = self.nodes[i as usize];
        if prev != NIL {
            self.nodes[prev as usize].next = next;
        } else {
            self.head = next;
        }
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        } else {
            self.tail = prev;
        }
    }

    fn touch(&mut self, i: u32) {
        if self.head == i {
            return;
        }
        self.unlink(i);
        let old = self.head;
        self.nodes[i as usize].prev = NIL;
        self.nodes[i as usize].next = old;
        if old != NIL {
            self.nodes[old as usize].prev = i;
        } else {
            self.tail = i;
        }
        self.head = i;
    }

    fn release_node(&mut self, i: u32) {
        self.unlink(i);
        self.nodes[i as usize] = Node {
            key: 0,
            prev: NIL,
            next: self.free,
        };
        self.free = i;
    }

    fn account_remove(&mut self, holders: &Holders) {
        self.entries -= holders.len();
        if holders.spilled() {
            self.spilled -= holders.capacity();
        }
    }

    /// Removes `key` entirely.
    fn remove_key(&mut self, key: u64) {
        if let Some((holders, node)) = self.table.remove(key) {
            self.account_remove(&holders);
            self.release_node(node);
        }
    }

    fn evict_over_capacity(&mut self) {
        while self.table.len() > self.cap && self.tail != NIL {
            let key = self.nodes[self.tail as usize].key;
            self.remove_key(key);
        }
    }

    /// Adds or updates `ep`'s holder of `key` with `bits`; a confirmed store clears the
    /// speculative bit, a speculative write never overrides a confirmed holder.
    fn upsert(&mut self, key: u64, ep: EndpointKey, bits: u8, expiry: u32, max_holders: usize) {
        self.clock = self.clock.wrapping_add(1) & TICK_MASK;
        let clock = self.clock;
        let stamp = if bits & SPEC != 0 { expiry } else { clock };
        let node = match self.table.get_mut(key) {
            Some((holders, node)) => {
                let was_spilled = holders.spilled();
                let old_cap = holders.capacity();
                match holders.binary_search_by_key(&ep, |h| h.ep) {
                    Ok(i) => {
                        let h = &mut holders[i];
                        if bits & SPEC != 0 {
                            if h.tiers & CONFIRMED == 0 {
                                h.tiers = SPEC;
                                if tick_before(h.expiry(), expiry) {
                                    h.set_expiry(expiry);
                                }
                            }
                        } else if h.tiers & SPEC != 0 && self.pending.contains_key(&(key, ep)) {
                            // Confirmed while requests are pending: keep their speculation
                            // (and its expiry) until they end.
                            h.tiers = (h.tiers & (CONFIRMED | SPEC)) | bits;
                        } else {
                            h.tiers = (h.tiers & CONFIRMED) | bits;
                            h.set_expiry(clock);
                        }
                    }
                    Err(mut at) => {
                        if holders.len() >= max_holders.max(1) {
                            let victim = victim(holders, clock);
                            holders.remove(victim);
                            self.entries -= 1;
                            if victim < at {
                                at -= 1;
                            }
                        }
                        let mut h = Holder {
                            ep,
                            tiers: bits,
                            expiry: [0; 3],
                        };
                        h.set_expiry(stamp);
                        holders.insert(at, h);
                        self.entries += 1;
                    }
                }
                let (now_spilled, new_cap) = (holders.spilled(), holders.capacity());
                if was_spilled {
                    self.spilled -= old_cap;
                }
                if now_spilled {
                    self.spilled += new_cap;
                }
                node
            }
            None => {
                let node = self.alloc_node(key);
                let mut h = Holder {
                    ep,
                    tiers: bits,
                    expiry: [0; 3],
                };
                h.set_expiry(stamp);
                let mut holders = Holders::new();
                holders.push(h);
                self.table.insert(key, node, holders);
                self.entries += 1;
                self.evict_over_capacity();
                return;
            }
        };
        self.touch(node);
    }

    /// Clears `mask` bits of `ep`'s holder of `key`; returns whether `ep` still holds it
    /// with a confirmed tier.
    fn clear_bits(&mut self, key: u64, ep: EndpointKey, mask: u8) -> bool {
        let Some((holders, node)) = self.table.get_mut(key) else {
            return false;
        };
        let Ok(i) = holders.binary_search_by_key(&ep, |h| h.ep) else {
            return false;
        };
        holders[i].tiers &= !mask;
        if holders[i].tiers & CONFIRMED != 0 {
            return true;
        }
        if holders[i].tiers & SPEC != 0 {
            return false;
        }
        let was_spilled = holders.spilled();
        let old_cap = holders.capacity();
        holders.remove(i);
        let now_empty = holders.is_empty();
        let now_spilled = holders.spilled();
        self.entries -= 1;
        if now_empty {
            self.table.remove(key);
            if was_spilled {
                self.spilled -= old_cap;
            }
            self.release_node(node);
        } else if was_spilled && !now_spilled {
            self.spilled -= old_cap;
        }
        false
    }

    /// One more pending request of `ep` with `key`: the holder is (also) speculative until
    /// at least `expiry`.
    fn begin_pending(&mut self, key: u64, ep: EndpointKey, expiry: u32, max_holders: usize) {
        *self.pending.entry((key, ep)).or_insert(0) += 1;
        if let Some((holders, node)) = self.table.get_mut(key)
            && let Ok(i) = holders.binary_search_by_key(&ep, |h| h.ep)
        {
            let h = &mut holders[i];
            if h.tiers & SPEC == 0 || tick_before(h.expiry(), expiry) {
                h.set_expiry(expiry);
            }
            h.tiers |= SPEC;
            self.touch(node);
            return;
        }
        self.upsert(key, ep, SPEC, expiry, max_holders);
    }

    /// A pending request of `ep` with `key` ended. When it was the last one, a confirmed
    /// holder drops its speculation and an unconfirmed one expires at `grace_until` (pushed
    /// on the sweep queue). Returns whether it was the last one.
    fn end_pending(&mut self, key: u64, ep: EndpointKey, grace_until: u64) -> bool {
        match self.pending.get_mut(&(key, ep)) {
            None => return false,
            Some(n) if *n > 1 => {
                *n -= 1;
                return false;
            }
            Some(_) => {
                self.pending.remove(&(key, ep));
            }
        }
        self.clock = self.clock.wrapping_add(1) & TICK_MASK;
        let clock = self.clock;
        let Some((holders, _)) = self.table.get_mut(key) else {
            return true;
        };
        let Ok(i) = holders.binary_search_by_key(&ep, |h| h.ep) else {
            return true;
        };
        let h = &mut holders[i];
        if h.tiers & SPEC == 0 {
            return true;
        }
        if h.tiers & CONFIRMED != 0 {
            h.tiers &= !SPEC;
            h.set_expiry(clock);
            return true;
        }
        let grace = (grace_until as u32) & TICK_MASK;
        if tick_before(grace, h.expiry()) {
            h.set_expiry(grace);
        }
        self.spec_queue.push(Reverse((grace_until, key, ep)));
        true
    }

    /// Ends the time-only speculation of `ep` on `key` early: an unconfirmed speculative
    /// holder with no pending request of this process expires at `until` when that is
    /// sooner than its current expiry. Returns whether it was shortened.
    fn shorten_speculation(&mut self, key: u64, ep: EndpointKey, until: u64) -> bool {
        if self.pending.contains_key(&(key, ep)) {
            return false;
        }
        let Some((holders, _)) = self.table.get_mut(key) else {
            return false;
        };
        let Ok(i) = holders.binary_search_by_key(&ep, |h| h.ep) else {
            return false;
        };
        let h = &mut holders[i];
        if h.tiers != SPEC {
            return false;
        }
        let t = (until as u32) & TICK_MASK;
        if !tick_before(t, h.expiry()) {
            return false;
        }
        h.set_expiry(t);
        self.spec_queue.push(Reverse((until, key, ep)));
        true
    }

    fn remove_endpoint(&mut self, ep: EndpointKey) -> usize {
        let mut removed = 0;
        let mut empty: Vec<(u64, u32)> = Vec::new();
        let mut spilled_delta = 0isize;
        for (key, node, holders) in self.table.iter_mut() {
            let before = holders.len();
            if !holders.iter().any(|h| h.ep == ep) {
                continue;
            }
            let (was, cap) = (holders.spilled(), holders.capacity());
            holders.retain(|h| h.ep != ep);
            removed += before - holders.len();
            if holders.is_empty() {
                empty.push((key, node));
            }
            if was && !holders.spilled() {
                spilled_delta -= cap as isize;
            }
        }
        self.entries -= removed;
        self.spilled = self.spilled.saturating_add_signed(spilled_delta);
        for (key, node) in empty {
            if let Some((holders, _)) = self.table.remove(key)
                && holders.spilled()
            {
                self.spilled -= holders.capacity();
            }
            self.release_node(node);
        }
        self.spec_queue.retain(|Reverse((_, _, e))| *e != ep);
        self.pending.retain(|(_, e), _| *e != ep);
        removed
    }

    fn sweep(&mut self, now: u64) -> usize {
        let now24 = (now as u32) & TICK_MASK;
        let mut removed = 0;
        while let Some(&Reverse((t, key, ep))) = self.spec_queue.peek() {
            if t > now {
                break;
            }
            self.spec_queue.pop();
            let expired = self
                .table
                .get(key)
                .and_then(|hs| hs.binary_search_by_key(&ep, |h| h.ep).ok().map(|i| hs[i]))
                .is_some_and(|h| h.tiers == SPEC && !tick_before(now24, h.expiry()));
            if expired {
                self.clear_bits(key, ep, SPEC);
                removed += 1;
            }
        }
        removed
    }

    fn memory_bytes(&self) -> usize {
        self.table.memory_bytes()
            + self.nodes.capacity() * size_of::<Node>()
            + self.spilled * size_of::<Holder>()
            + self.spec_queue.capacity() * size_of::<(u64, u64, EndpointKey)>()
            + self.pending.capacity() * (size_of::<((u64, EndpointKey), u32)>() + 1)
    }
}

/// Request keys an engine hash maps to (several when engine blocks are larger).
type EngineVal = SmallVec<[u64; 1]>;

/// One endpoint's engine-hash → request-key mappings, in two generations.
#[derive(Default)]
struct EngineMap {
    current: FastMap<u64, EngineVal>,
    old: FastMap<u64, EngineVal>,
}

impl EngineMap {
    fn get(&mut self, h: u64, cap: usize) -> Option<&EngineVal> {
        if !self.current.contains_key(&h) {
            let v = self.old.remove(&h)?;
            self.insert(h, v, cap);
        }
        self.current.get(&h)
    }

    fn insert(&mut self, h: u64, v: EngineVal, cap: usize) {
        if self.current.len() >= (cap / 2).max(1) && !self.current.contains_key(&h) {
            self.old = std::mem::take(&mut self.current);
        }
        self.old.remove(&h);
        self.current.insert(h, v);
    }

    fn remove(&mut self, h: u64) -> Option<EngineVal> {
        self.current.remove(&h).or_else(|| self.old.remove(&h))
    }

    fn len(&self) -> usize {
        self.current.len() + self.old.len()
    }

    fn memory_bytes(&self) -> usize {
        (self.current.capacity() + self.old.capacity()) * (size_of::<(u64, EngineVal)>() + 1)
    }
}

thread_local! {
    static KEYS: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// The precise prefix index. Shared by reference (`&self` everywhere); see the module docs.
pub struct PreciseIndex {
    cfg: PreciseIndexConfig,
    keyer: BlockKeyer,
    shards: Box<[RwLock<Shard>]>,
    mask: usize,
    engines: RwLock<FastMap<EndpointKey, Arc<Mutex<EngineMap>>>>,
    tier_names: Vec<String>,
    /// Weight of every tier-bit combination (max over the set bits).
    weights: [f64; 256],
    epoch: Instant,
    sweep_due: AtomicU32,
}

impl std::fmt::Debug for PreciseIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreciseIndex")
            .field("cfg", &self.cfg)
            .field("stats", &self.stats())
            .finish()
    }
}

impl PreciseIndex {
    /// An empty index.
    pub fn new(cfg: PreciseIndexConfig) -> Self {
        let shards = cfg.shards.clamp(1, 1024).next_power_of_two();
        let per_shard = cfg.max_keys.div_ceil(shards).max(1);
        let mut tier_names: Vec<String> = cfg
            .tiers
            .iter()
            .take(MAX_TIERS)
            .map(|(n, _)| n.to_ascii_lowercase())
            .collect();
        if tier_names.is_empty() {
            tier_names.push("gpu".into());
        }
        let mut tier_w = [1.0f64; 8];
        for (i, (_, w)) in cfg.tiers.iter().take(MAX_TIERS).enumerate() {
            tier_w[i] = w.clamp(0.0, 1.0);
        }
        let mut weights = [0.0f64; 256];
        for (mask, w) in weights.iter_mut().enumerate() {
            *w = (0..8)
                .filter(|b| mask & (1 << b) != 0)
                .map(|b| tier_w[b])
                .fold(0.0, f64::max);
        }
        Self {
            keyer: BlockKeyer::new(cfg.block_size, &cfg.hash_seed),
            shards: (0..shards)
                .map(|_| RwLock::new(Shard::new(per_shard)))
                .collect(),
            mask: shards - 1,
            engines: RwLock::new(FastMap::new()),
            tier_names,
            weights,
            epoch: Instant::now(),
            sweep_due: AtomicU32::new(0),
            cfg,
        }
    }

    /// The settings.
    pub fn config(&self) -> &PreciseIndexConfig {
        &self.cfg
    }

    /// The request-key scheme.
    pub fn keyer(&self) -> &BlockKeyer {
        &self.keyer
    }

    #[inline]
    fn shard(&self, key: u64) -> &RwLock<Shard> {
        &self.shards[self.shard_index(key)]
    }

    /// The tier bit of `medium` (`None` = GPU).
    fn tier_bit(&self, medium: Option<&str>) -> u8 {
        let m = medium.unwrap_or("gpu");
        let i = self
            .tier_names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(m))
            .map_or(OTHER_TIER, |i| i as u8);
        1 << i
    }

    /// Ticks since the index's epoch.
    fn now_ticks(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX) / TICK_MS
    }

    /// The current expiry tick (24-bit).
    fn now_tick(&self) -> u32 {
        (self.now_ticks() as u32) & TICK_MASK
    }

    fn engine_map(&self, ep: EndpointKey) -> Arc<Mutex<EngineMap>> {
        if let Some(m) = self.engines.read().get(&ep) {
            return m.clone();
        }
        self.engines.write().entry(ep).or_default().clone()
    }

    /// Applies a `BlockStored` event of endpoint `ep`.
    pub fn block_stored(&self, ep: EndpointKey, ev: &StoredBlocks<'_>) -> StoreOutcome {
        let n_engine = ev.engine_hashes.len();
        if n_engine == 0 {
            return StoreOutcome::Stored(0);
        }
        if ev.engine_block_size == 0 {
            return StoreOutcome::Invalid("block_size is 0");
        }
        if ev.tokens.len() != n_engine * ev.engine_block_size as usize {
            return StoreOutcome::Invalid("token_ids do not match block_hashes × block_size");
        }
        let cap = self.cfg.max_engine_keys_per_endpoint;
        let map = self.engine_map(ep);
        let mut map = map.lock();
        let parent_key = match ev.parent {
            Some(p) => match map.get(p, cap).and_then(|v| v.last().copied()) {
                Some(k) => k,
                None => return StoreOutcome::UnknownParent,
            },
            None => self.keyer.root(ev.lora_name.unwrap_or(ev.model)),
        };
        KEYS.with(|keys| {
            let mut keys = keys.borrow_mut();
            keys.clear();
            self.keyer.extend(parent_key, ev.tokens, &mut keys);
            let n_keys = keys.len();
            if n_keys == 0 {
                return StoreOutcome::Stored(0);
            }
            // Pair engine hashes with keys by position ratio (1:1 in the common case).
            let n = n_engine.max(n_keys);
            let mut i = 0;
            while i < n {
                let eh = ev.engine_hashes[i * n_engine / n];
                let mut val = EngineVal::new();
                while i < n && ev.engine_hashes[i * n_engine / n] == eh {
                    let k = keys[i * n_keys / n];
                    if val.last() != Some(&k) {
                        val.push(k);
                    }
                    i += 1;
                }
                map.insert(eh, val, cap);
            }
            drop(map);
            let bit = self.tier_bit(ev.medium);
            for &k in keys.iter() {
                self.shard(k)
                    .write()
                    .upsert(k, ep, bit, 0, self.cfg.max_holders_per_key);
            }
            StoreOutcome::Stored(n_keys)
        })
    }

    /// Applies a `BlockRemoved` event of endpoint `ep`; returns how many keys `ep` lost.
    pub fn block_removed(
        &self,
        ep: EndpointKey,
        engine_hashes: &[u64],
        medium: Option<&str>,
    ) -> usize {
        let Some(map) = self.engines.read().get(&ep).cloned() else {
            return 0;
        };
        let bit = self.tier_bit(medium);
        let mut map = map.lock();
        let mut lost = 0;
        for &eh in engine_hashes {
            let Some(keys) = map.remove(eh) else {
                continue;
            };
            let mut still_held = false;
            for &k in &keys {
                if self.shard(k).write().clear_bits(k, ep, bit) {
                    still_held = true;
                } else {
                    lost += 1;
                }
            }
            if still_held {
                // Another tier still holds the block: keep the mapping.
                map.insert(eh, keys, self.cfg.max_engine_keys_per_endpoint);
            }
        }
        lost
    }

    /// Forgets everything about `ep` (`AllBlocksCleared`, or the endpoint left); returns the
    /// entries removed.
    pub fn clear_endpoint(&self, ep: EndpointKey) -> usize {
        self.engines.write().remove(&ep);
        self.shards
            .iter()
            .map(|s| s.write().remove_endpoint(ep))
            .sum()
    }

    /// Forgets `ep`'s engine-hash mappings but keeps its entries (e.g. the event stream
    /// restarted and old hashes can no longer be resolved).
    pub fn forget_engine_keys(&self, ep: EndpointKey) {
        self.engines.write().remove(&ep);
    }

    /// Records that `ep` is expected to hold `keys` for `ttl` (routing-time speculation).
    /// Confirmed holders are left as they are.
    pub fn add_speculative(&self, ep: EndpointKey, keys: &[u64], ttl: Duration) {
        let now = self.now_ticks();
        let ticks = (u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX) / TICK_MS)
            .clamp(1, u64::from(TICK_MASK >> 2));
        let until = now + ticks;
        let expiry = (until as u32) & TICK_MASK;
        for &k in keys {
            let mut s = self.shard(k).write();
            s.upsert(k, ep, SPEC, expiry, self.cfg.max_holders_per_key);
            s.spec_queue.push(Reverse((until, k, ep)));
        }
        self.maybe_sweep((now as u32) & TICK_MASK);
    }

    /// Ticks of a duration (at least 1, at most a quarter of the tick circle).
    fn ticks(d: Duration) -> u64 {
        (u64::try_from(d.as_millis()).unwrap_or(u64::MAX) / TICK_MS)
            .clamp(1, u64::from(TICK_MASK >> 2))
    }

    /// A request routed to `ep` with `keys` is pending there (see the module docs): `ep`
    /// counts as holding `keys` until [`Self::end_speculative`] is called for the request, or
    /// at most `max_life`. Each call must be matched by one `end_speculative` with the same
    /// keys.
    pub fn begin_speculative(&self, ep: EndpointKey, keys: &[u64], max_life: Duration) {
        let now = self.now_ticks();
        let expiry = ((now + Self::ticks(max_life)) as u32) & TICK_MASK;
        for &k in keys {
            self.shard(k)
                .write()
                .begin_pending(k, ep, expiry, self.cfg.max_holders_per_key);
        }
        self.maybe_sweep((now as u32) & TICK_MASK);
    }

    /// The request begun with [`Self::begin_speculative`] was prefilled (or ended): its
    /// speculation on `ep` ends; keys no other pending request holds stay speculative for at
    /// most `grace` unless an event confirmed them (confirmed ones stay, as confirmed).
    /// Returns how many keys had no pending request left.
    pub fn end_speculative(&self, ep: EndpointKey, keys: &[u64], grace: Duration) -> usize {
        let now = self.now_ticks();
        let until = now + Self::ticks(grace);
        let mut last = 0;
        for &k in keys {
            last += usize::from(self.shard(k).write().end_pending(k, ep, until));
        }
        self.maybe_sweep((now as u32) & TICK_MASK);
        last
    }

    /// Another replica's speculation on `keys` for `ep` ended (see
    /// [`Self::add_speculative`], which is how a replica applies the peers' speculation): an
    /// unconfirmed speculative holder that no request of this process keeps pending now
    /// expires within `grace`. Confirmed holders and this process's own pending speculation
    /// are left alone. Returns how many holders were shortened.
    pub fn expire_speculative(&self, ep: EndpointKey, keys: &[u64], grace: Duration) -> usize {
        let now = self.now_ticks();
        let until = now + Self::ticks(grace);
        let mut n = 0;
        for &k in keys {
            n += usize::from(self.shard(k).write().shorten_speculation(k, ep, until));
        }
        self.maybe_sweep((now as u32) & TICK_MASK);
        n
    }

    /// `(key, endpoint)` pairs with pending requests (for tests and metrics).
    pub fn pending_entries(&self) -> usize {
        self.shards.iter().map(|s| s.read().pending.len()).sum()
    }

    /// Sweeps expired speculation at most every 32 ticks (256 ms).
    fn maybe_sweep(&self, now: u32) {
        let due = self.sweep_due.load(Ordering::Relaxed);
        if tick_before(now, due) {
            return;
        }
        let next = now.wrapping_add(32) & TICK_MASK;
        if self
            .sweep_due
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.sweep_expired();
        }
    }

    /// Removes expired speculative holders; returns how many.
    pub fn sweep_expired(&self) -> usize {
        let now = self.now_ticks();
        self.shards.iter().map(|s| s.write().sweep(now)).sum()
    }

    /// Per endpoint accepted by `accept`: the consecutive leading `keys` it holds and their
    /// tier-weighted sum, into `out` (cleared first), in endpoint order. See the module docs
    /// and [`Self::longest_prefix_batched`] for the algorithm.
    pub fn longest_prefix(
        &self,
        keys: &[u64],
        accept: impl Fn(EndpointKey) -> bool,
        out: &mut PreciseMatches,
    ) {
        self.longest_prefix_batched::<LOOKUP_BATCH>(keys, accept, out)
    }

    /// [`Self::longest_prefix`] with `BATCH` keys probed per round (public for benchmarks).
    ///
    /// 1. The first key's alive, accepted holders become the *survivors* (sorted by endpoint,
    ///    as holder lists are) and the entries of `out`.
    /// 2. Every shard holding one of the remaining keys is read-locked once (a bitset of shard
    ///    indices collects them), and the locks are kept to the end.
    /// 3. The remaining keys go in rounds of `BATCH`. A round loads the home slots of the next
    ///    round's keys (so that their cache misses overlap this round's work), then probes its
    ///    own keys, stopping at the first key nobody holds.
    /// 4. Each survivor then walks the round's holder lists on its own, with its count and
    ///    weight sum in registers: it finds itself at the position it had in the previous list
    ///    (holder sets rarely change from one block to the next) or by binary search, and stops
    ///    at the first block it does not hold or whose holder expired. A survivor that stopped
    ///    leaves the set; the lookup ends when the set is empty or the keys run out.
    ///
    /// No allocation unless more than 16 endpoints survive the first key or there are more
    /// than 64 shards (and `out` grows only beyond 8 matches).
    #[doc(hidden)]
    pub fn longest_prefix_batched<const BATCH: usize>(
        &self,
        keys: &[u64],
        accept: impl Fn(EndpointKey) -> bool,
        out: &mut PreciseMatches,
    ) {
        out.clear();
        let Some((&first, rest)) = keys.split_first() else {
            return;
        };
        const { assert!(BATCH > 0, "BATCH must be positive") };
        let now = self.now_tick();
        let first_shard = self.shard_index(first);
        let first_guard = self.shards[first_shard].read_recursive();
        let mut survivors: SmallVec<[Survivor; 16]> = SmallVec::new();
        let Some(holders) = first_guard.table.get(first) else {
            return;
        };
        for (i, h) in holders.iter().enumerate() {
            if h.alive(now) && accept(h.ep) {
                survivors.push(Survivor {
                    ep: h.ep,
                    at: out.len() as u32,
                    hint: i as u32,
                });
                out.push(PreciseMatch {
                    endpoint: h.ep,
                    blocks: 1,
                    weighted: self.weights[h.tiers as usize],
                });
            }
        }
        if survivors.is_empty() || rest.is_empty() {
            return;
        }
        // Read-lock every shard the keys live in, once, up front, and keep the locks to the
        // end: a long prompt touches every shard, one lock per shard beats one per block, and
        // the probes need no per-key lock bookkeeping. Recursive read locks cannot deadlock
        // with writers, which never hold two locks.
        let mut needed = ShardSet::default();
        for &key in rest {
            needed.insert(self.shard_index(key));
        }
        let mut first_guard = Some(first_guard);
        let guards: SmallVec<[Option<RwLockReadGuard<'_, Shard>>; 64]> = self
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| {
                if i == first_shard {
                    first_guard.take()
                } else {
                    needed.contains(i).then(|| s.read_recursive())
                }
            })
            .collect();
        let empty = KeyTable::new();
        let tables: SmallVec<[TableView<'_, Holders>; 64]> = guards
            .iter()
            .map(|g| g.as_deref().map_or(&empty, |s| &s.table).view())
            .collect();
        let table = |key: u64| tables[self.shard_index(key)];
        let touch = |keys: &[u64]| {
            let mut touched = 0u64;
            for &key in keys {
                touched ^= table(key).touch(key);
            }
            std::hint::black_box(touched);
        };
        touch(&rest[..BATCH.min(rest.len())]);
        for (r, round) in rest.chunks(BATCH).enumerate() {
            // Start the next round's cache misses now, so that they overlap this round's work.
            let from = ((r + 1) * BATCH).min(rest.len());
            touch(&rest[from..(from + BATCH).min(rest.len())]);
            // The holder lists of the round's leading held keys.
            let mut lists: [&[Holder]; BATCH] = [&[]; BATCH];
            let mut held = 0;
            for &key in round {
                match table(key).get(key) {
                    Some(h) => lists[held] = h,
                    None => break,
                }
                held += 1;
            }
            let lists = &lists[..held];
            let mut kept = 0;
            for r in 0..survivors.len() {
                let mut s = survivors[r];
                let (mut n, mut weighted) = (0, 0.0);
                for hs in lists {
                    let i = s.hint as usize;
                    let h = match hs.get(i) {
                        Some(h) if h.ep == s.ep => *h,
                        _ => match hs.binary_search_by_key(&s.ep, |h| h.ep) {
                            Ok(i) => {
                                s.hint = i as u32;
                                hs[i]
                            }
                            Err(_) => break,
                        },
                    };
                    if !h.alive(now) {
                        break;
                    }
                    weighted += self.weights[h.tiers as usize];
                    n += 1;
                }
                if let Some(m) = out.get_mut(s.at as usize) {
                    m.blocks += n;
                    m.weighted += weighted;
                }
                if n as usize == round.len() {
                    survivors[kept] = s;
                    kept += 1;
                }
            }
            survivors.truncate(kept);
            if survivors.is_empty() {
                return;
            }
        }
    }

    /// The shard `key` lives in.
    #[inline]
    fn shard_index(&self, key: u64) -> usize {
        (key >> 40) as usize & self.mask
    }

    /// The endpoints holding `key` (alive holders), with their weights; for tests and
    /// debugging.
    pub fn holders(&self, key: u64) -> Vec<(EndpointKey, f64)> {
        let now = self.now_tick();
        let shard = self.shard(key).read();
        shard
            .table
            .get(key)
            .map(|hs| {
                hs.iter()
                    .filter(|h| h.alive(now))
                    .map(|h| (h.ep, self.weights[h.tiers as usize]))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Sizes and memory.
    pub fn stats(&self) -> PreciseStats {
        let mut st = PreciseStats::default();
        for s in self.shards.iter() {
            let s = s.read();
            st.keys += s.table.len();
            st.entries += s.entries;
            st.memory_bytes += s.memory_bytes() + size_of::<RwLock<Shard>>();
        }
        let engines = self.engines.read();
        st.endpoints = engines.len();
        for m in engines.values() {
            let m = m.lock();
            st.engine_keys += m.len();
            st.memory_bytes += m.memory_bytes() + size_of::<Mutex<EngineMap>>();
        }
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> PreciseIndex {
        PreciseIndex::new(PreciseIndexConfig {
            block_size: 4,
            shards: 4,
            ..Default::default()
        })
    }

    fn tokens(n: usize, base: u32) -> Vec<u32> {
        (0..n as u32).map(|i| base + i).collect()
    }

    /// Engine hashes: anything unique works; use a different scheme than the index's keys.
    fn engine_hashes(n: usize, salt: u64) -> Vec<u64> {
        (0..n as u64).map(|i| (salt << 32) | (i + 1)).collect()
    }

    fn stored<'a>(
        hashes: &'a [u64],
        parent: Option<u64>,
        tokens: &'a [u32],
        medium: Option<&'a str>,
    ) -> StoredBlocks<'a> {
        StoredBlocks {
            engine_hashes: hashes,
            parent,
            tokens,
            engine_block_size: 4,
            model: "m",
            lora_name: None,
            medium,
        }
    }

    fn lookup(idx: &PreciseIndex, keys: &[u64]) -> Vec<(u32, u32, f64)> {
        let mut out = PreciseMatches::new();
        idx.longest_prefix(keys, |_| true, &mut out);
        let mut v: Vec<_> = out
            .iter()
            .map(|m| (m.endpoint, m.blocks, (m.weighted * 100.0).round() / 100.0))
            .collect();
        v.sort_by_key(|x| x.0);
        v
    }

    fn prompt_keys(idx: &PreciseIndex, t: &[u32]) -> Vec<u64> {
        let mut k = Vec::new();
        idx.keyer().prompt_keys("m", t, &mut k);
        k
    }

    #[test]
    fn keys_chain_and_depend_on_seed_model_and_block_size() {
        let k = BlockKeyer::new(4, "");
        let t = tokens(12, 0);
        let mut a = Vec::new();
        k.prompt_keys("m", &t, &mut a);
        assert_eq!(a.len(), 3);
        // Chained: the second key depends on the first block.
        let mut t2 = t.clone();
        t2[0] = 99;
        let mut b = Vec::new();
        k.prompt_keys("m", &t2, &mut b);
        assert_ne!(a[1], b[1]);
        assert_eq!(a[0], k.block_key(k.root("m"), &t[..4]));
        let mut c = Vec::new();
        BlockKeyer::new(4, "42").prompt_keys("m", &t, &mut c);
        assert_ne!(a, c);
        let mut d = Vec::new();
        k.prompt_keys("other", &t, &mut d);
        assert_ne!(a, d);
        // A partial trailing block has no key; long blocks stream.
        let mut e = Vec::new();
        k.prompt_keys("m", &t[..11], &mut e);
        assert_eq!(e, a[..2]);
        let big = BlockKeyer::new(1000, "");
        let long = tokens(2000, 5);
        let mut f = Vec::new();
        big.prompt_keys("m", &long, &mut f);
        assert_eq!(f.len(), 2);
        let mut bytes = Vec::new();
        for t in &long[..1000] {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
        assert_eq!(f[0], xxh3_64_with_seed(&bytes, big.root("m")));
    }

    #[test]
    fn stored_blocks_chain_through_parents_and_match_request_keys() {
        let idx = index();
        let t = tokens(16, 100);
        let eh = engine_hashes(4, 1);
        // Two events: blocks 0-1, then 2-3 with block 1 as parent.
        assert_eq!(
            idx.block_stored(7, &stored(&eh[..2], None, &t[..8], None)),
            StoreOutcome::Stored(2)
        );
        assert_eq!(
            idx.block_stored(7, &stored(&eh[2..], Some(eh[1]), &t[8..], Some("GPU"))),
            StoreOutcome::Stored(2)
        );
        let keys = prompt_keys(&idx, &t);
        assert_eq!(lookup(&idx, &keys), vec![(7, 4, 4.0)]);
        // A longer prompt with the same start matches 4 of its blocks.
        let mut longer = t.clone();
        longer.extend(tokens(8, 900));
        assert_eq!(lookup(&idx, &prompt_keys(&idx, &longer)), vec![(7, 4, 4.0)]);
        // Unknown parent: dropped, nothing recorded.
        let orphan = engine_hashes(1, 9);
        assert_eq!(
            idx.block_stored(7, &stored(&orphan, Some(12345), &t[..4], None)),
            StoreOutcome::UnknownParent
        );
        // Parents are per endpoint: endpoint 8 does not know endpoint 7's hashes.
        assert_eq!(
            idx.block_stored(8, &stored(&eh[2..], Some(eh[1]), &t[8..], None)),
            StoreOutcome::UnknownParent
        );
        assert!(matches!(
            idx.block_stored(7, &stored(&eh[..2], None, &t[..7], None)),
            StoreOutcome::Invalid(_)
        ));
        assert_eq!(idx.stats().keys, 4);
    }

    #[test]
    fn consecutive_prefix_per_endpoint_with_tier_weights() {
        let idx = index();
        let t = tokens(16, 0);
        let eh = engine_hashes(4, 1);
        idx.block_stored(1, &stored(&eh, None, &t, None));
        idx.block_stored(2, &stored(&eh[..2], None, &t[..8], Some("CPU")));
        idx.block_stored(3, &stored(&eh[..3], None, &t[..12], None));
        let keys = prompt_keys(&idx, &t);
        assert_eq!(
            lookup(&idx, &keys),
            vec![(1, 4, 4.0), (2, 2, 1.6), (3, 3, 3.0)]
        );
        // Endpoint 1 loses block 1: its prefix stops at 1 block even though it holds 2-3.
        assert_eq!(idx.block_removed(1, &eh[1..2], Some("GPU")), 1);
        assert_eq!(
            lookup(&idx, &keys),
            vec![(1, 1, 1.0), (2, 2, 1.6), (3, 3, 3.0)]
        );
        // A filter drops endpoints before they count.
        let mut out = PreciseMatches::new();
        idx.longest_prefix(&keys, |e| e == 2, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].blocks, 2);
        // Nothing for an unknown prompt or no keys.
        assert!(lookup(&idx, &prompt_keys(&idx, &tokens(8, 500))).is_empty());
        assert!(lookup(&idx, &[]).is_empty());
    }

    #[test]
    fn removal_is_tier_aware() {
        let idx = index();
        let t = tokens(8, 0);
        let eh = engine_hashes(2, 1);
        idx.block_stored(1, &stored(&eh, None, &t, Some("GPU")));
        idx.block_stored(1, &stored(&eh, None, &t, Some("CPU")));
        let keys = prompt_keys(&idx, &t);
        assert_eq!(lookup(&idx, &keys), vec![(1, 2, 2.0)]);
        // Evicted from GPU, still offloaded to CPU: weight 0.8.
        assert_eq!(idx.block_removed(1, &eh, Some("GPU")), 0);
        assert_eq!(lookup(&idx, &keys), vec![(1, 2, 1.6)]);
        assert_eq!(idx.block_removed(1, &eh, Some("cpu")), 2);
        assert!(lookup(&idx, &keys).is_empty());
        assert_eq!(idx.stats().keys, 0);
        assert_eq!(idx.stats().engine_keys, 0);
        // Removing unknown hashes or endpoints is harmless.
        assert_eq!(idx.block_removed(1, &[42], None), 0);
        assert_eq!(idx.block_removed(99, &[42], None), 0);
    }

    #[test]
    fn clear_endpoint_removes_only_that_endpoint() {
        let idx = index();
        let t = tokens(8, 0);
        let eh = engine_hashes(2, 1);
        idx.block_stored(1, &stored(&eh, None, &t, None));
        idx.block_stored(2, &stored(&eh, None, &t, None));
        let keys = prompt_keys(&idx, &t);
        assert_eq!(idx.clear_endpoint(1), 2);
        assert_eq!(lookup(&idx, &keys), vec![(2, 2, 2.0)]);
        // Endpoint 1's engine hashes are gone too: its next event chains from nothing.
        assert_eq!(
            idx.block_stored(1, &stored(&eh[1..], Some(eh[0]), &t[4..], None)),
            StoreOutcome::UnknownParent
        );
        assert_eq!(idx.clear_endpoint(2), 2);
        let st = idx.stats();
        assert_eq!((st.keys, st.entries, st.engine_keys), (0, 0, 0));
    }

    #[test]
    fn speculative_entries_count_until_they_expire_and_confirmation_replaces_them() {
        let idx = index();
        let t = tokens(8, 0);
        let keys = prompt_keys(&idx, &t);
        idx.add_speculative(5, &keys, Duration::from_secs(60));
        assert_eq!(lookup(&idx, &keys), vec![(5, 2, 2.0)]);
        // Confirmed by an event: survives the speculation's expiry, removable by events.
        let eh = engine_hashes(2, 1);
        idx.block_stored(5, &stored(&eh, None, &t, None));
        idx.add_speculative(6, &keys, Duration::from_millis(1));
        let deadline = Instant::now() + Duration::from_secs(10);
        while lookup(&idx, &keys).len() > 1 {
            assert!(Instant::now() < deadline, "speculation never expired");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(lookup(&idx, &keys), vec![(5, 2, 2.0)]);
        assert_eq!(idx.sweep_expired(), 2);
        assert_eq!(idx.stats().entries, 2);
        // A speculative write does not downgrade a confirmed holder.
        idx.add_speculative(5, &keys, Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(30));
        idx.sweep_expired();
        assert_eq!(lookup(&idx, &keys), vec![(5, 2, 2.0)]);
        assert_eq!(idx.block_removed(5, &eh, None), 2);
        assert!(lookup(&idx, &keys).is_empty());
    }

    /// Polls until `f` holds (speculation expiry runs on the wall clock).
    fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn request_speculation_lives_until_the_request_ends_then_for_the_grace() {
        let idx = index();
        let t = tokens(8, 0);
        let keys = prompt_keys(&idx, &t);
        // Added at dispatch: counts for as long as the request is pending (no TTL clock).
        idx.begin_speculative(5, &keys, Duration::from_secs(3600));
        assert_eq!(lookup(&idx, &keys), vec![(5, 2, 2.0)]);
        assert_eq!(idx.pending_entries(), 2);
        // A follower on the same endpoint: the first one's end leaves its entries.
        idx.begin_speculative(5, &keys, Duration::from_secs(3600));
        assert_eq!(idx.end_speculative(5, &keys, Duration::from_millis(1)), 0);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(idx.sweep_expired(), 0);
        assert_eq!(lookup(&idx, &keys), vec![(5, 2, 2.0)]);
        // The last one ends without a confirming event: the entries expire after the grace.
        assert_eq!(idx.end_speculative(5, &keys, Duration::from_millis(1)), 2);
        until("unconfirmed speculation expires after its grace", || {
            lookup(&idx, &keys).is_empty()
        });
        assert_eq!(idx.sweep_expired(), 2);
        assert_eq!((idx.stats().entries, idx.pending_entries()), (0, 0));
        // An end with no pending request (e.g. after the endpoint was cleared) is harmless.
        assert_eq!(idx.end_speculative(5, &keys, Duration::from_millis(1)), 0);
    }

    #[test]
    fn a_peers_speculation_ends_early_but_never_our_own_nor_confirmed_entries() {
        let idx = index();
        let t = tokens(8, 0);
        let keys = prompt_keys(&idx, &t);
        // A peer's speculation (time-only, long lease) on endpoint 5; our own pending
        // request on endpoint 6; a confirmed holder on endpoint 7.
        idx.add_speculative(5, &keys, Duration::from_secs(60));
        idx.add_speculative(6, &keys, Duration::from_secs(60));
        idx.begin_speculative(6, &keys, Duration::from_secs(3600));
        idx.block_stored(7, &stored(&engine_hashes(2, 1), None, &t, None));
        idx.add_speculative(7, &keys, Duration::from_secs(60));
        assert_eq!(
            idx.expire_speculative(5, &keys, Duration::from_millis(1)),
            2
        );
        assert_eq!(
            idx.expire_speculative(6, &keys, Duration::from_millis(1)),
            0
        );
        assert_eq!(
            idx.expire_speculative(7, &keys, Duration::from_millis(1)),
            0
        );
        until("the peer's speculation expires", || {
            lookup(&idx, &keys).iter().all(|m| m.0 != 5)
        });
        assert_eq!(
            lookup(&idx, &keys),
            vec![(6, 2, 2.0), (7, 2, 2.0)],
            "our own pending speculation and the confirmed holder stay"
        );
        // Unknown keys and endpoints are harmless.
        assert_eq!(
            idx.expire_speculative(9, &keys, Duration::from_millis(1)),
            0
        );
        assert_eq!(
            idx.expire_speculative(5, &[1, 2, 3], Duration::from_millis(1)),
            0
        );
    }

    #[test]
    fn request_speculation_is_confirmed_by_stores_and_dropped_by_removals_once_ended() {
        let idx = index();
        let t = tokens(8, 0);
        let keys = prompt_keys(&idx, &t);
        let eh = engine_hashes(2, 1);
        idx.begin_speculative(5, &keys, Duration::from_secs(3600));
        // Confirmed by the engine's BlockStored while the request is pending.
        idx.block_stored(5, &stored(&eh, None, &t, None));
        assert_eq!(lookup(&idx, &keys), vec![(5, 2, 2.0)]);
        // Ended (first token): confirmed entries stay however long the grace is…
        assert_eq!(idx.end_speculative(5, &keys, Duration::from_secs(3600)), 2);
        assert_eq!(lookup(&idx, &keys), vec![(5, 2, 2.0)]);
        // …and a BlockRemoved drops them at once.
        assert_eq!(idx.block_removed(5, &eh, None), 2);
        assert!(lookup(&idx, &keys).is_empty());
        assert_eq!(idx.stats().entries, 0);

        // Evicted while the request still waits in the engine's queue: the engine will
        // recompute the blocks for it, so its entries stay until it ends.
        idx.block_stored(6, &stored(&eh, None, &t, None));
        idx.begin_speculative(6, &keys, Duration::from_secs(3600));
        assert_eq!(idx.block_removed(6, &eh, None), 2);
        assert_eq!(lookup(&idx, &keys), vec![(6, 2, 2.0)]);
        assert_eq!(idx.end_speculative(6, &keys, Duration::from_millis(1)), 2);
        until("the evicted entries expire after the grace", || {
            lookup(&idx, &keys).is_empty()
        });

        // The safety lifetime bounds a request whose end never comes.
        idx.begin_speculative(7, &keys, Duration::from_millis(1));
        until("a pending entry expires at its maximum lifetime", || {
            lookup(&idx, &keys).is_empty()
        });
        // An endpoint that is cleared forgets its pending requests too.
        idx.begin_speculative(8, &keys, Duration::from_secs(3600));
        idx.clear_endpoint(8);
        assert!(lookup(&idx, &keys).is_empty());
        assert_eq!(
            idx.pending_entries(),
            2,
            "only the two keys of endpoint 7's never-ended request"
        );
    }

    #[test]
    fn long_prompts_match_the_same_in_any_round_size() {
        let idx = index();
        let t = tokens(4 * 100, 0);
        let eh = engine_hashes(100, 1);
        // Prefix lengths around round boundaries (16-key rounds after the first key).
        for (ep, len) in [(1u32, 100usize), (2, 16), (3, 17), (4, 33), (5, 64)] {
            idx.block_stored(ep, &stored(&eh[..len], None, &t[..4 * len], None));
        }
        idx.block_stored(6, &stored(&eh, None, &t, Some("CPU")));
        // Holds all 100 blocks but lost block 40: its prefix is 40 blocks.
        idx.block_stored(7, &stored(&eh, None, &t, None));
        assert_eq!(idx.block_removed(7, &eh[40..41], None), 1);
        let keys = prompt_keys(&idx, &t);
        let expect = vec![
            (1, 100, 100.0),
            (2, 16, 16.0),
            (3, 17, 17.0),
            (4, 33, 33.0),
            (5, 64, 64.0),
            (6, 100, 80.0),
            (7, 40, 40.0),
        ];
        assert_eq!(lookup(&idx, &keys), expect);
        let rounded = |out: &PreciseMatches| -> Vec<(u32, u32, f64)> {
            out.iter()
                .map(|m| (m.endpoint, m.blocks, (m.weighted * 100.0).round() / 100.0))
                .collect()
        };
        let mut out = PreciseMatches::new();
        idx.longest_prefix_batched::<1>(&keys, |_| true, &mut out);
        assert_eq!(rounded(&out), expect);
        idx.longest_prefix_batched::<7>(&keys, |_| true, &mut out);
        assert_eq!(rounded(&out), expect);
        idx.longest_prefix_batched::<32>(&keys, |_| true, &mut out);
        assert_eq!(rounded(&out), expect);
        // Fewer survivors: holder positions differ from the survivor positions.
        idx.longest_prefix(&keys, |e| e % 2 == 1, &mut out);
        assert_eq!(
            rounded(&out),
            vec![(1, 100, 100.0), (3, 17, 17.0), (5, 64, 64.0), (7, 40, 40.0)]
        );
    }

    #[test]
    fn shard_sets_hold_indices_up_to_the_shard_limit() {
        let mut set = ShardSet::default();
        for i in [0, 5, 63, 64, 700, 1023] {
            assert!(!set.contains(i));
            set.insert(i);
            assert!(set.contains(i));
        }
        assert!(!set.contains(1) && !set.contains(65) && !set.contains(1022));
        // Out of range: ignored, never contained.
        set.insert(1024);
        assert!(!set.contains(1024));
    }

    #[test]
    fn tick_comparison_wraps() {
        assert!(tick_before(1, 2));
        assert!(!tick_before(2, 1));
        assert!(!tick_before(5, 5));
        assert!(tick_before(TICK_MASK - 1, 3));
        assert!(!tick_before(3, TICK_MASK - 1));
    }

    #[test]
    fn lru_bounds_keys_and_holders_per_key() {
        let idx = PreciseIndex::new(PreciseIndexConfig {
            block_size: 4,
            shards: 1,
            max_keys: 8,
            max_holders_per_key: 3,
            ..Default::default()
        });
        for i in 0..10u32 {
            let t = tokens(8, i * 1000);
            let eh = engine_hashes(2, u64::from(i) + 1);
            idx.block_stored(1, &stored(&eh, None, &t, None));
        }
        let st = idx.stats();
        assert_eq!(st.keys, 8);
        // The most recent prompts survive, the oldest are gone.
        assert_eq!(lookup(&idx, &prompt_keys(&idx, &tokens(8, 9000))).len(), 1);
        assert!(lookup(&idx, &prompt_keys(&idx, &tokens(8, 0))).is_empty());
        // Five endpoints store the same block: only the last three are kept.
        let t = tokens(4, 77_777);
        for ep in 10..15 {
            idx.block_stored(ep, &stored(&[5], None, &t, None));
        }
        let mut holders: Vec<u32> = idx
            .holders(prompt_keys(&idx, &t)[0])
            .into_iter()
            .map(|h| h.0)
            .collect();
        holders.sort_unstable();
        assert_eq!(holders, vec![12, 13, 14]);
        assert_eq!(idx.stats().entries, 3 + 7);
    }

    #[test]
    fn full_keys_drop_speculation_before_confirmed_holders() {
        let idx = PreciseIndex::new(PreciseIndexConfig {
            block_size: 4,
            max_holders_per_key: 2,
            ..Default::default()
        });
        let t = tokens(4, 0);
        let keys = prompt_keys(&idx, &t);
        idx.block_stored(3, &stored(&[1], None, &t, None));
        idx.add_speculative(1, &keys, Duration::from_secs(60));
        // A third endpoint confirms: the speculative holder goes, the confirmed one stays.
        idx.block_stored(2, &stored(&[1], None, &t, None));
        assert_eq!(lookup(&idx, &keys), vec![(2, 1, 1.0), (3, 1, 1.0)]);
        // Refreshing endpoint 3 makes endpoint 2 the oldest.
        idx.block_stored(3, &stored(&[1], None, &t, None));
        idx.block_stored(4, &stored(&[1], None, &t, None));
        assert_eq!(lookup(&idx, &keys), vec![(3, 1, 1.0), (4, 1, 1.0)]);
    }

    #[test]
    fn concurrent_lookups_and_ingestion_do_not_block_each_other() {
        let idx = Arc::new(PreciseIndex::new(PreciseIndexConfig {
            block_size: 4,
            shards: 4,
            ..Default::default()
        }));
        let t = tokens(4 * 64, 0);
        let keys = prompt_keys(&idx, &t);
        let writers: Vec<_> = (0..3u32)
            .map(|ep| {
                let (idx, t) = (idx.clone(), t.clone());
                std::thread::spawn(move || {
                    let eh = engine_hashes(64, u64::from(ep) + 1);
                    for _ in 0..200 {
                        idx.block_stored(ep, &stored(&eh, None, &t, None));
                        idx.add_speculative(
                            ep + 10,
                            &prompt_keys(&idx, &t),
                            Duration::from_millis(1),
                        );
                        idx.block_removed(ep, &eh[32..], None);
                        if ep == 0 {
                            idx.clear_endpoint(ep);
                        }
                    }
                })
            })
            .collect();
        let mut out = PreciseMatches::new();
        for _ in 0..2000 {
            idx.longest_prefix(&keys, |_| true, &mut out);
            // Endpoints are reported in order with at most 64 blocks.
            assert!(out.windows(2).all(|w| w[0].endpoint < w[1].endpoint));
            assert!(out.iter().all(|m| m.blocks <= 64));
        }
        for w in writers {
            w.join().unwrap();
        }
        idx.longest_prefix(&keys, |e| e < 10, &mut out);
        let eps: Vec<u32> = out.iter().map(|m| m.endpoint).collect();
        assert_eq!(eps, vec![1, 2]);
        assert!(out.iter().all(|m| m.blocks == 32));
    }

    #[test]
    fn different_engine_block_sizes_pair_by_ratio() {
        // Index blocks of 4 tokens, engine blocks of 8: one engine hash ↔ two keys.
        let idx = index();
        let t = tokens(16, 0);
        let eh = engine_hashes(2, 1);
        let ev = StoredBlocks {
            engine_block_size: 8,
            ..stored(&eh, None, &t, None)
        };
        assert_eq!(idx.block_stored(1, &ev), StoreOutcome::Stored(4));
        let keys = prompt_keys(&idx, &t);
        assert_eq!(lookup(&idx, &keys), vec![(1, 4, 4.0)]);
        // Removing the second engine block removes keys 2 and 3.
        assert_eq!(idx.block_removed(1, &eh[1..], None), 2);
        assert_eq!(lookup(&idx, &keys), vec![(1, 2, 2.0)]);
        // Index blocks of 8 tokens, engine blocks of 4: two engine hashes ↔ one key.
        let idx = PreciseIndex::new(PreciseIndexConfig {
            block_size: 8,
            ..Default::default()
        });
        let eh = engine_hashes(4, 2);
        assert_eq!(
            idx.block_stored(1, &stored(&eh, None, &t, None)),
            StoreOutcome::Stored(2)
        );
        // Chaining from the last engine block continues from the last key.
        let more = tokens(8, 500);
        let eh2 = engine_hashes(2, 3);
        assert_eq!(
            idx.block_stored(1, &stored(&eh2, Some(eh[3]), &more, None)),
            StoreOutcome::Stored(1)
        );
        let mut all = t.clone();
        all.extend(&more);
        let mut keys = Vec::new();
        idx.keyer().prompt_keys("m", &all, &mut keys);
        assert_eq!(lookup(&idx, &keys), vec![(1, 3, 3.0)]);
        idx.block_removed(1, &eh[..1], None);
        assert!(lookup(&idx, &keys).is_empty());
    }

    #[test]
    fn lora_blocks_chain_from_the_adapter_name() {
        let idx = index();
        let t = tokens(8, 0);
        let eh = engine_hashes(2, 1);
        let ev = StoredBlocks {
            lora_name: Some("sql-lora"),
            ..stored(&eh, None, &t, None)
        };
        idx.block_stored(1, &ev);
        assert!(lookup(&idx, &prompt_keys(&idx, &t)).is_empty());
        let mut k = Vec::new();
        idx.keyer().prompt_keys("sql-lora", &t, &mut k);
        assert_eq!(lookup(&idx, &k), vec![(1, 2, 2.0)]);
    }

    #[test]
    fn memory_is_reported_and_engine_maps_are_bounded() {
        let idx = PreciseIndex::new(PreciseIndexConfig {
            block_size: 4,
            shards: 2,
            max_engine_keys_per_endpoint: 64,
            ..Default::default()
        });
        for i in 0..100u32 {
            let t = tokens(4, i * 10);
            idx.block_stored(1, &stored(&[u64::from(i) + 1], None, &t, None));
        }
        let st = idx.stats();
        assert_eq!(st.keys, 100);
        assert!(st.engine_keys <= 64, "{}", st.engine_keys);
        assert!(st.memory_bytes >= 100 * (size_of::<table::Slot<Holders>>() + size_of::<Node>()));
        // The most recent mappings are still resolvable.
        assert_eq!(idx.block_removed(1, &[100], None), 1);
    }
}
