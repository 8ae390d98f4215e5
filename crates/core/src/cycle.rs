//! Per-request scratch space shared by the plugins of one scheduling cycle.
//!
//! Data producers write typed values before scheduling (e.g. the prefix match of every
//! candidate); filters, scorers, pickers and the pre-request hooks read them. The state lives
//! in the request's context for the whole request, so response hooks can read it too.
//! Values are keyed by their Rust type: each plugin defines its own type, and the types
//! shared between plugins (like [`PrefixCacheMatch`]) are defined here.

use std::any::{Any, TypeId};
use std::collections::HashMap;

use crate::endpoint::EndpointId;

/// Typed per-request storage.
#[derive(Default)]
pub struct CycleState {
    slots: Vec<(TypeId, Box<dyn Any + Send + Sync>)>,
}

impl std::fmt::Debug for CycleState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CycleState")
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl CycleState {
    /// Empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `value`, replacing any earlier value of the same type.
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        let id = TypeId::of::<T>();
        match self.slots.iter_mut().find(|(t, _)| *t == id) {
            Some(slot) => slot.1 = Box::new(value),
            None => self.slots.push((id, Box::new(value))),
        }
    }

    /// The stored value of type `T`.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        let id = TypeId::of::<T>();
        self.slots
            .iter()
            .find(|(t, _)| *t == id)
            .and_then(|(_, v)| v.downcast_ref())
    }

    /// The stored value of type `T`, mutably.
    pub fn get_mut<T: Any + Send + Sync>(&mut self) -> Option<&mut T> {
        let id = TypeId::of::<T>();
        self.slots
            .iter_mut()
            .find(|(t, _)| *t == id)
            .and_then(|(_, v)| v.downcast_mut())
    }

    /// Removes and returns the value of type `T`.
    pub fn remove<T: Any + Send + Sync>(&mut self) -> Option<T> {
        let id = TypeId::of::<T>();
        let pos = self.slots.iter().position(|(t, _)| *t == id)?;
        let (_, v) = self.slots.swap_remove(pos);
        v.downcast().ok().map(|b| *b)
    }
}

/// How much of the request's prefix each candidate endpoint is believed to hold.
///
/// Written by the prefix-cache plugins (approximate or precise) before scoring; read by their
/// scorers, by `no-hit-lru-scorer` (to recognise cold requests) and by P/D deciders.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrefixCacheMatch {
    /// Blocks the request's prompt was split into.
    pub total_blocks: u32,
    /// Size of one block, in the unit of the producer (characters or tokens).
    pub block_size: u32,
    /// Matched prefix length per endpoint, in blocks (tier-weighted for the precise scorer,
    /// hence a float). Endpoints absent from the map matched nothing.
    pub matched_blocks: HashMap<EndpointId, f64>,
    /// Prompt length in tokens as the producer counted it: the precise scorer's tokenizer,
    /// or the approximate producer's estimate (prompt bytes / 4, the reference's `estimate`
    /// tokenizer). 0 when unknown. Read by P/D deciders.
    pub prompt_tokens: u64,
    /// One block in tokens (the approximate producer: `block_size` characters / 4); 0 when
    /// unknown. Read by P/D deciders.
    pub block_tokens: f64,
}

impl PrefixCacheMatch {
    /// Matched blocks of `id` (0 when none).
    pub fn matched(&self, id: EndpointId) -> f64 {
        self.matched_blocks.get(&id).copied().unwrap_or(0.0)
    }

    /// Fraction of the prompt `id` holds, in [0, 1].
    pub fn ratio(&self, id: EndpointId) -> f64 {
        if self.total_blocks == 0 {
            return 0.0;
        }
        (self.matched(id) / f64::from(self.total_blocks)).clamp(0.0, 1.0)
    }

    /// True when no candidate holds any of the prompt.
    pub fn is_cold(&self) -> bool {
        self.matched_blocks.values().all(|&m| m <= 0.0)
    }

    /// Tokens of the prompt `id` holds: matched blocks × [`Self::block_tokens`].
    pub fn cached_tokens(&self, id: EndpointId) -> f64 {
        self.matched(id) * self.block_tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_slots() {
        let mut s = CycleState::new();
        assert!(s.get::<u32>().is_none());
        s.insert(5u32);
        s.insert("x".to_string());
        s.insert(7u32);
        assert_eq!(s.get::<u32>(), Some(&7));
        *s.get_mut::<String>().unwrap() += "y";
        assert_eq!(s.get::<String>().map(String::as_str), Some("xy"));
        assert_eq!(s.remove::<u32>(), Some(7));
        assert!(s.get::<u32>().is_none());
    }

    #[test]
    fn prefix_match_ratio() {
        let mut m = PrefixCacheMatch {
            total_blocks: 4,
            block_size: 64,
            ..Default::default()
        };
        assert!(m.is_cold());
        m.matched_blocks.insert(EndpointId(1), 3.0);
        assert_eq!(m.ratio(EndpointId(1)), 0.75);
        assert_eq!(m.ratio(EndpointId(2)), 0.0);
        assert!(!m.is_cold());
    }
}
