//! # llmsched-kvindex
//!
//! Prefix-cache indexes: which endpoint is believed to hold which KV block, keyed by the
//! chained block hashes the scheduler computes for every prompt.
//!
//! * [`approx`] — the *approximate* index of the reference's `prefix-cache-scorer`: it learns
//!   only from the scheduler's own decisions (after a request is routed, its block hashes are
//!   recorded for the chosen endpoint) and forgets through a per-endpoint LRU whose capacity
//!   stands in for the engine's KV-cache size.
//! * [`precise`] — the *precise* index of the reference's `precise-prefix-cache-scorer`: fed by
//!   the engines' KV-cache events (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`), keyed by
//!   its own chained block keys computed from token ids, with storage tiers and speculative
//!   entries. Both answer the same question — "how many leading blocks of this prompt does
//!   each endpoint hold?".
//!
//! Endpoints are identified by a plain `u32` ([`EndpointKey`]) so this crate stays free of the
//! scheduling framework; `llmsched-core`'s `EndpointId` is a `u32` newtype.

pub mod approx;
pub mod precise;

pub use approx::{ApproxIndex, ApproxIndexConfig, IndexStats};
pub use precise::{
    BlockKeyer, PreciseIndex, PreciseIndexConfig, PreciseMatch, PreciseMatches, PreciseStats,
    StoreOutcome, StoredBlocks,
};

/// Identifies an endpoint inside an index (the value of `llmsched_core::EndpointId`).
pub type EndpointKey = u32;

/// Per-endpoint prefix match: `(endpoint, consecutive leading blocks held)`, endpoints with
/// no match omitted. Inline for the common case of a handful of matching endpoints.
pub type PrefixMatches = smallvec::SmallVec<[(EndpointKey, u32); 8]>;
