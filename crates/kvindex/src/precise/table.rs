//! A flat open-addressing table keyed by request keys, built for the lookup's access pattern.
//!
//! ## Why not a general-purpose hash map
//!
//! A lookup of an 8k-token prompt probes 512 keys in a table far larger than the CPU caches,
//! so its cost is the number of cache misses per key and how many of them can be in flight at
//! once. A SwissTable (`hashbrown`) keeps control bytes and entries in two arrays: a probe
//! reads a control group, then (dependent on it) the entry, two misses in a row. Here a probe
//! reads one 32-byte, 32-byte-aligned [`Slot`] holding the key and its value (two slots per
//! cache line), so a hit usually costs one miss, and probes of different keys are independent
//! loads the CPU overlaps.
//!
//! ## Layout and algorithm
//!
//! * Capacity is a power of two; a key's home slot is the first slot of cache line
//!   `key mod (capacity / 2)`, so a key displaced by one slot is still in the line the probe
//!   loaded first. Keys are already uniformly distributed 64-bit hashes (xxh3), so they are
//!   placed by a seeded multiplicative mix of themselves (see [`home`]; the shard selector
//!   uses bits 40 and up of the raw key).
//! * **Linear probing**: a key lives in the first slot at or after its home whose key is equal
//!   or [`EMPTY`]; a probe stops at the key or at the first empty slot. The load factor stays
//!   at most 3/4 (the table doubles beyond), so a hit probes ~1.5–2.5 slots on average, and the
//!   miss that ends a lookup ~2.5–8.5.
//! * **Backward-shift deletion** instead of tombstones: after a removal, the following entries
//!   of the probe run move back into the hole when that keeps them at or after their home, so
//!   probe runs never accumulate dead slots.
//! * Key `0` marks an empty slot; a real key `0` (probability 2⁻⁶⁴ per key) lives in a
//!   dedicated side slot.
//! * Each entry also carries a caller `u32` (the shard's LRU node) in a parallel array, read
//!   and written only by mutations, so the slots the lookups read stay 32 bytes.

use std::hash::BuildHasher;
use std::mem;
use std::sync::OnceLock;

/// Key value of an empty slot.
const EMPTY: u64 = 0;
/// Smallest non-zero capacity.
const MIN_CAPACITY: usize = 16;

/// One table slot: a key and its value, 32-byte aligned so that a slot never straddles two
/// cache lines (when the value fits in 24 bytes).
#[repr(C, align(32))]
#[derive(Default)]
pub(super) struct Slot<V> {
    key: u64,
    val: V,
}

/// Per-process random seed of the slot placement.
fn seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| std::hash::RandomState::new().hash_one(0x7072_6563_6973_6531u64))
}

/// The home slot of `key` in a table of `mask + 1` slots: the first slot of a cache line
/// (capacity ≥ 2), so that a key displaced by one slot is still in the line the probe loads.
///
/// The key is mixed with a per-process random seed first: keys are hashes of prompt text
/// under a seed users configure (`hashSeed`, often the default), so without it a client could
/// craft prompts whose keys share their low bits and turn the linear probe runs into long
/// scans. One multiply; the well-mixed high half of the product picks the line.
#[inline]
fn home(key: u64, mask: usize) -> usize {
    let h = (key ^ seed()).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h.rotate_left(32) as usize & (mask >> 1)) << 1
}

/// A read-only view of a [`KeyTable`], for lookups (see [`KeyTable::view`]).
pub(super) struct TableView<'a, V> {
    slots: &'a [Slot<V>],
    mask: usize,
    zero: Option<&'a V>,
}

impl<V> Clone for TableView<'_, V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<V> Copy for TableView<'_, V> {}

impl<'a, V> TableView<'a, V> {
    /// The value of `key`.
    #[inline]
    pub(super) fn get(self, key: u64) -> Option<&'a V> {
        if key == EMPTY {
            return self.zero;
        }
        if self.slots.is_empty() {
            return None;
        }
        let mut i = home(key, self.mask);
        loop {
            let s = self.slots.get(i)?;
            if s.key == key {
                return Some(&s.val);
            }
            if s.key == EMPTY {
                return None;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Loads the cache line `key`'s probe starts at, so that a later [`Self::get`] of it hits
    /// the cache. Returns the home slot's key (feed it to `std::hint::black_box` or fold it
    /// into a value that is used, so the load is not optimised away).
    #[inline]
    pub(super) fn touch(self, key: u64) -> u64 {
        self.slots.get(home(key, self.mask)).map_or(0, |s| s.key)
    }
}

/// An open-addressing `u64 → V` table with a `u32` tag per entry (see the module docs).
pub(super) struct KeyTable<V> {
    slots: Vec<Slot<V>>,
    /// The tag of the entry in the same position of `slots` (meaningless for empty slots).
    tags: Vec<u32>,
    /// Entries in `slots` (the side slot not included).
    len: usize,
    /// The entry of key [`EMPTY`].
    zero: Option<(V, u32)>,
}

impl<V: Default> Default for KeyTable<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: Default> KeyTable<V> {
    /// An empty table (allocates on the first insertion).
    pub(super) fn new() -> Self {
        Self {
            slots: Vec::new(),
            tags: Vec::new(),
            len: 0,
            zero: None,
        }
    }

    /// Entries.
    pub(super) fn len(&self) -> usize {
        self.len + usize::from(self.zero.is_some())
    }

    /// Bytes of the slot and tag arrays (values' own heap memory not included).
    pub(super) fn memory_bytes(&self) -> usize {
        self.slots.capacity() * mem::size_of::<Slot<V>>()
            + self.tags.capacity() * mem::size_of::<u32>()
    }

    #[inline]
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    #[inline]
    fn home(key: u64, mask: usize) -> usize {
        home(key, mask)
    }

    /// The position of `key` (not [`EMPTY`]) in `slots`, if present.
    #[inline]
    fn position(&self, key: u64) -> Option<usize> {
        let mask = self.mask();
        if self.slots.is_empty() {
            return None;
        }
        let mut i = Self::home(key, mask);
        loop {
            let k = self.slots[i].key;
            if k == key {
                return Some(i);
            }
            if k == EMPTY {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// The value of `key`.
    #[inline]
    pub(super) fn get(&self, key: u64) -> Option<&V> {
        self.view().get(key)
    }

    /// The value of `key`, mutable, and its tag.
    pub(super) fn get_mut(&mut self, key: u64) -> Option<(&mut V, u32)> {
        if key == EMPTY {
            return self.zero.as_mut().map(|(v, t)| (v, *t));
        }
        let i = self.position(key)?;
        Some((&mut self.slots[i].val, self.tags[i]))
    }

    /// See [`TableView::touch`].
    #[cfg(test)]
    fn touch(&self, key: u64) -> u64 {
        self.view().touch(key)
    }

    /// A read-only view for lookups: the slot array and mask in one `Copy` value, so a probe
    /// does not go through the table's fields.
    #[inline]
    pub(super) fn view(&self) -> TableView<'_, V> {
        TableView {
            slots: &self.slots,
            mask: self.mask(),
            zero: self.zero.as_ref().map(|(v, _)| v),
        }
    }

    /// Inserts or replaces the entry of `key`; returns the replaced value and tag.
    pub(super) fn insert(&mut self, key: u64, tag: u32, val: V) -> Option<(V, u32)> {
        if key == EMPTY {
            return self.zero.replace((val, tag));
        }
        if let Some(i) = self.position(key) {
            let old_tag = mem::replace(&mut self.tags[i], tag);
            return Some((mem::replace(&mut self.slots[i].val, val), old_tag));
        }
        if (self.len + 1) * 4 > self.slots.len() * 3 {
            self.grow();
        }
        let i = self.vacancy(key);
        self.slots[i] = Slot { key, val };
        self.tags[i] = tag;
        self.len += 1;
        None
    }

    /// The first empty slot of `key`'s probe run (the table has one: load ≤ 3/4).
    fn vacancy(&self, key: u64) -> usize {
        let mask = self.mask();
        let mut i = Self::home(key, mask);
        while self.slots[i].key != EMPTY {
            i = (i + 1) & mask;
        }
        i
    }

    fn grow(&mut self) {
        let cap = (self.slots.len() * 2).max(MIN_CAPACITY);
        let mut slots = Vec::with_capacity(cap);
        slots.resize_with(cap, Slot::default);
        let old_slots = mem::replace(&mut self.slots, slots);
        let old_tags = mem::replace(&mut self.tags, vec![0; cap]);
        for (s, tag) in old_slots.into_iter().zip(old_tags) {
            if s.key != EMPTY {
                let i = self.vacancy(s.key);
                self.tags[i] = tag;
                self.slots[i] = s;
            }
        }
    }

    /// Removes the entry of `key`; returns its value and tag.
    pub(super) fn remove(&mut self, key: u64) -> Option<(V, u32)> {
        if key == EMPTY {
            return self.zero.take();
        }
        let mut hole = self.position(key)?;
        let removed = mem::take(&mut self.slots[hole]);
        let tag = self.tags[hole];
        self.len -= 1;
        // Backward shift: move each later entry of the run into the hole when the hole lies
        // between its home and its current position (cyclically).
        let mask = self.mask();
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let k = self.slots[j].key;
            if k == EMPTY {
                break;
            }
            let home = Self::home(k, mask);
            if j.wrapping_sub(home) & mask >= j.wrapping_sub(hole) & mask {
                self.slots.swap(hole, j);
                self.tags[hole] = self.tags[j];
                hole = j;
            }
        }
        Some((removed.val, tag))
    }

    /// Every entry, value mutable: `(key, tag, value)`.
    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (u64, u32, &mut V)> {
        self.slots
            .iter_mut()
            .zip(&self.tags)
            .filter(|(s, _)| s.key != EMPTY)
            .map(|(s, &t)| (s.key, t, &mut s.val))
            .chain(self.zero.as_mut().map(|(v, t)| (EMPTY, *t, v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Keys whose home slots collide in a 16-slot table (same low 4 bits).
    fn colliding(n: u64) -> Vec<u64> {
        (1..=n).map(|i| (i << 20) | 5).collect()
    }

    #[test]
    fn insert_get_replace_remove() {
        let mut t: KeyTable<String> = KeyTable::new();
        assert_eq!(t.len(), 0);
        assert!(t.get(7).is_none());
        assert!(t.remove(7).is_none());
        assert!(t.insert(7, 1, "a".into()).is_none());
        assert_eq!(t.get(7).map(String::as_str), Some("a"));
        assert_eq!(t.insert(7, 2, "b".into()), Some(("a".into(), 1)));
        assert_eq!(t.len(), 1);
        if let Some((v, tag)) = t.get_mut(7) {
            assert_eq!(tag, 2);
            v.push('!');
        }
        assert_eq!(t.remove(7), Some(("b!".into(), 2)));
        assert!(t.get(7).is_none());
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn key_zero_is_an_ordinary_key() {
        let mut t: KeyTable<u32> = KeyTable::new();
        assert!(t.get(0).is_none());
        t.insert(0, 9, 10);
        t.insert(16, 1, 11);
        assert_eq!(t.get(0), Some(&10));
        assert_eq!(t.get_mut(0).map(|(v, tag)| (*v, tag)), Some((10, 9)));
        assert_eq!(t.len(), 2);
        let mut seen: Vec<(u64, u32, u32)> = t.iter_mut().map(|(k, g, v)| (k, g, *v)).collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![(0, 9, 10), (16, 1, 11)]);
        assert_eq!(t.remove(0), Some((10, 9)));
        assert!(t.get(0).is_none());
        assert_eq!(t.get(16), Some(&11));
    }

    #[test]
    fn colliding_keys_stay_reachable_through_removals() {
        let mut t: KeyTable<u64> = KeyTable::new();
        let keys = colliding(10);
        for (i, &k) in keys.iter().enumerate() {
            t.insert(k, i as u32, k + 1);
        }
        // Remove from the middle of the probe run: the entries after it move back.
        for &k in keys.iter().step_by(3) {
            assert_eq!(t.remove(k).map(|(v, _)| v), Some(k + 1));
        }
        for (i, &k) in keys.iter().enumerate() {
            let expect = (i % 3 != 0).then_some(k + 1);
            assert_eq!(t.get(k).copied(), expect, "key {k:#x}");
            if let Some((_, tag)) = t.get_mut(k) {
                assert_eq!(tag, i as u32);
            }
        }
        assert_eq!(t.len(), 6);
    }

    #[test]
    fn probe_runs_wrap_around_the_end() {
        let mut t: KeyTable<u64> = KeyTable::new();
        // Home slot 14 of 16: the run wraps to slots 0, 1, …; then keys homed at 0 and 2.
        let wrapping: Vec<u64> = (1..=4).map(|i| (i << 20) | 15).collect();
        let low = [1 << 20, (1 << 20) | 1];
        for &k in wrapping.iter().chain(&low) {
            t.insert(k, 0, k);
        }
        t.remove(wrapping[0]);
        t.remove(low[0]);
        for &k in wrapping[1..].iter().chain(&low[1..]) {
            assert_eq!(t.get(k), Some(&k));
        }
        assert!(t.get(wrapping[0]).is_none());
        assert!(t.get(low[0]).is_none());
    }

    #[test]
    fn grows_and_bounds_its_load() {
        let mut t: KeyTable<u64> = KeyTable::new();
        for k in 1..=1000u64 {
            t.insert(k.wrapping_mul(0x9e37_79b9_7f4a_7c15), k as u32, k);
        }
        assert_eq!(t.len(), 1000);
        assert!(t.slots.len() * 3 >= 1000 * 4, "load above 3/4");
        for k in 1..=1000u64 {
            let key = k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            assert_eq!(t.get(key), Some(&k));
            assert_ne!(t.touch(key), 0);
        }
        assert!(t.memory_bytes() >= t.slots.len() * 36);
    }

    #[test]
    fn matches_a_hash_map_under_random_operations() {
        let mut t: KeyTable<u64> = KeyTable::new();
        let mut reference: HashMap<u64, (u64, u32)> = HashMap::new();
        let mut x = 0x1234_5678_u64;
        for step in 0..50_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Few distinct keys with colliding low bits, so runs are long and removals shift.
            let key = (x % 300) << 3 | (x >> 60);
            match x % 4 {
                0 | 1 => {
                    let old = t.insert(key, step, x);
                    assert_eq!(old, reference.insert(key, (x, step)));
                }
                2 => assert_eq!(t.remove(key), reference.remove(&key)),
                _ => assert_eq!(t.get(key), reference.get(&key).map(|(v, _)| v)),
            }
            assert_eq!(t.len(), reference.len());
        }
        let mut all: Vec<(u64, u32, u64)> = t.iter_mut().map(|(k, g, v)| (k, g, *v)).collect();
        all.sort_unstable();
        let mut expect: Vec<(u64, u32, u64)> =
            reference.iter().map(|(&k, &(v, g))| (k, g, v)).collect();
        expect.sort_unstable();
        assert_eq!(all, expect);
    }
}
