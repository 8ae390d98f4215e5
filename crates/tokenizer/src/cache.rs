//! A bounded cache of recent prompt prefixes → token ids.
//!
//! Prompts routed by a prefix-aware scheduler share long beginnings (system prompts, few-shot
//! examples, conversation history). Tokenizing the whole prompt on every request repeats the
//! same work; this cache lets a prompt reuse the tokens of an earlier prompt's prefix and
//! tokenize only the rest.
//!
//! ## Model
//!
//! The text is cut into chunks of `chunk_bytes` bytes (each cut moved forward to a character
//! boundary) and the cuts are identified by a chained hash: `h₁ = H(seed, chunk₁)`,
//! `hₖ = H(hₖ₋₁, chunkₖ)`, so `hₖ` names the whole prefix up to cut `k`. After a full
//! tokenization, the cache records, for every cut, how many leading tokens lie entirely before
//! it — minus a safety margin of `overlap` tokens — and the byte offset where the next token
//! starts (the *resume* point). A later prompt looks its cuts up from the last one down; at
//! the first hit it copies the recorded tokens and tokenizes only `text[resume..]`.
//!
//! ## Exactness
//!
//! Splicing is exact when the tokenizer does not look across the resume point. That holds by
//! construction for the simulator's word tokenizer, and almost always for BPE tokenizers
//! (pre-tokenizers cut at word boundaries); to be safe the cache *verifies* every splice: the
//! re-tokenized suffix must start with the `overlap` tokens the full tokenization produced
//! after the resume point. If it does not, the prompt is tokenized in full instead (counted
//! in [`CacheStats::unverified`]), so the result always equals a full tokenization up to that
//! check. Resume points are also moved back to a clean token boundary (the next token starts
//! at or after the end of the previous one), so byte-fallback tokens of one character are
//! never split.
//!
//! ## Bounds
//!
//! Entries live in two generations: new and refreshed entries go to the current one; when its
//! size reaches half of `capacity_bytes`, it becomes the old generation and the previous old
//! one is dropped. Lookups promote hits from the old generation. Memory is therefore bounded
//! by about `capacity_bytes`, and prefixes in use stay.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::{Tokenizer, TokenizerError};

/// Cache settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixTokenCacheConfig {
    /// Bytes per chunk (the reuse granularity). Default 1024.
    pub chunk_bytes: usize,
    /// Tokens re-tokenized before each cut and compared, to verify a splice. Default 8.
    pub overlap: usize,
    /// Approximate memory bound in bytes. Default 64 MiB.
    pub capacity_bytes: usize,
}

impl Default for PrefixTokenCacheConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: 1024,
            overlap: 8,
            capacity_bytes: 64 << 20,
        }
    }
}

/// Counters of a cache.
#[derive(Debug, Default)]
pub struct CacheStats {
    hits: AtomicU64,
    misses: AtomicU64,
    unverified: AtomicU64,
    reused_tokens: AtomicU64,
}

impl CacheStats {
    /// Encodings that reused a cached prefix.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Encodings that found no usable prefix.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Splices rejected by verification (then tokenized in full).
    pub fn unverified(&self) -> u64 {
        self.unverified.load(Ordering::Relaxed)
    }

    /// Tokens copied from the cache instead of being tokenized.
    pub fn reused_tokens(&self) -> u64 {
        self.reused_tokens.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct Entry {
    /// The full tokenization the entry was cut from (shared by all cuts of one prompt).
    tokens: Arc<[u32]>,
    /// Tokens reusable before `resume`.
    keep: u32,
    /// Tokens of `tokens` after `keep` that must reappear when re-tokenizing from `resume`.
    verify: u32,
    /// Byte offset where tokenization resumes.
    resume: u32,
}

const ENTRY_COST: usize = 64;

#[derive(Default)]
struct Generations {
    current: HashMap<u64, Entry>,
    current_bytes: usize,
    old: HashMap<u64, Entry>,
}

impl Generations {
    fn insert(&mut self, key: u64, entry: Entry, cost: usize, capacity: usize) {
        if self.current_bytes + cost > capacity / 2 && !self.current.is_empty() {
            self.old = std::mem::take(&mut self.current);
            self.current_bytes = 0;
        }
        self.current_bytes += cost;
        self.current.insert(key, entry);
    }

    fn get(&mut self, key: u64, capacity: usize) -> Option<Entry> {
        if let Some(e) = self.current.get(&key) {
            return Some(e.clone());
        }
        let e = self.old.remove(&key)?;
        // Promote, charging the shared token array again (an upper bound).
        let cost = ENTRY_COST + e.tokens.len() * 4;
        self.insert(key, e.clone(), cost, capacity);
        Some(e)
    }

    fn len(&self) -> usize {
        self.current.len() + self.old.len()
    }
}

/// The prefix → tokens cache. Cheap to share (`&self` everywhere); one short lock per call.
pub struct PrefixTokenCache {
    cfg: PrefixTokenCacheConfig,
    seed: u64,
    inner: Mutex<Generations>,
    stats: CacheStats,
}

impl std::fmt::Debug for PrefixTokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixTokenCache")
            .field("cfg", &self.cfg)
            .field("entries", &self.inner.lock().len())
            .finish()
    }
}

impl PrefixTokenCache {
    /// A cache for one tokenizer. `tokenizer_id` (e.g. its name) seeds the prefix hashes, so
    /// caches of different tokenizers never mix even if shared by mistake.
    pub fn new(cfg: PrefixTokenCacheConfig, tokenizer_id: &str) -> Self {
        let cfg = PrefixTokenCacheConfig {
            chunk_bytes: cfg.chunk_bytes.max(16),
            overlap: cfg.overlap,
            capacity_bytes: cfg.capacity_bytes.max(1 << 16),
        };
        Self {
            cfg,
            seed: xxh3_64_with_seed(tokenizer_id.as_bytes(), 0x746f_6b63_6163_6865),
            inner: Mutex::new(Generations::default()),
            stats: CacheStats::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Number of cached cut points.
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cut positions and their chained hashes for `text`.
    fn cuts(&self, text: &str) -> Vec<(usize, u64)> {
        let mut out = Vec::with_capacity(text.len() / self.cfg.chunk_bytes);
        let mut h = self.seed;
        let mut prev = 0;
        let mut pos = self.cfg.chunk_bytes;
        while pos <= text.len() {
            let mut cut = pos;
            while cut < text.len() && !text.is_char_boundary(cut) {
                cut += 1;
            }
            h = xxh3_64_with_seed(&text.as_bytes()[prev..cut], h);
            out.push((cut, h));
            prev = cut;
            pos = cut + self.cfg.chunk_bytes;
        }
        out
    }

    /// Appends the token ids of `text` (as `tokenizer` would produce them) to `out`, reusing a
    /// cached prefix when possible.
    pub fn encode(
        &self,
        tokenizer: &dyn Tokenizer,
        text: &str,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let cuts = self.cuts(text);
        if cuts.is_empty() {
            return tokenizer.encode_into(text, out);
        }
        let hit = {
            let mut g = self.inner.lock();
            cuts.iter()
                .rev()
                .find_map(|&(_, h)| g.get(h, self.cfg.capacity_bytes))
        };
        if let Some(e) = hit
            && let Some(suffix) = text.get(e.resume as usize..)
        {
            let base = out.len();
            let keep = e.keep as usize;
            out.extend_from_slice(&e.tokens[..keep]);
            tokenizer.encode_into(suffix, out)?;
            let expect = &e.tokens[keep..keep + e.verify as usize];
            if out[base + keep..].starts_with(expect) {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .reused_tokens
                    .fetch_add(keep as u64, Ordering::Relaxed);
                return Ok(());
            }
            out.truncate(base);
            self.stats.unverified.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
        }
        self.encode_and_remember(tokenizer, text, &cuts, out)
    }

    fn encode_and_remember(
        &self,
        tokenizer: &dyn Tokenizer,
        text: &str,
        cuts: &[(usize, u64)],
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let mut ids = Vec::with_capacity(text.len() / 4);
        let mut offsets = Vec::with_capacity(text.len() / 4);
        if !tokenizer.encode_with_offsets(text, &mut ids, &mut offsets)?
            || offsets.len() != ids.len()
        {
            out.extend_from_slice(&ids);
            return Ok(());
        }
        out.extend_from_slice(&ids);
        let tokens: Arc<[u32]> = Arc::from(ids);
        let mut entries = Vec::with_capacity(cuts.len());
        let mut before = 0usize; // tokens ending at or before the cut
        for &(cut, h) in cuts {
            while before < offsets.len() && offsets[before].1 <= cut {
                before += 1;
            }
            let mut keep = before.saturating_sub(self.cfg.overlap);
            // Resume at a clean boundary: the token starts at or after the previous one's end.
            while keep > 0 && offsets[keep].0 < offsets[keep - 1].1 {
                keep -= 1;
            }
            if keep == 0 || keep >= offsets.len() {
                continue;
            }
            let (Ok(keep32), Ok(verify), Ok(resume)) = (
                u32::try_from(keep),
                u32::try_from(before - keep),
                u32::try_from(offsets[keep].0),
            ) else {
                continue;
            };
            entries.push((
                h,
                Entry {
                    tokens: tokens.clone(),
                    keep: keep32,
                    verify,
                    resume,
                },
            ));
        }
        if entries.is_empty() {
            return Ok(());
        }
        let mut g = self.inner.lock();
        let mut first = true;
        for (h, e) in entries {
            // The shared token array is charged once per prompt.
            let cost = ENTRY_COST + if first { tokens.len() * 4 } else { 0 };
            first = false;
            g.insert(h, e, cost, self.cfg.capacity_bytes);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SimTokenizer;

    fn words(n: usize, salt: u32) -> String {
        let t = SimTokenizer::default();
        let mut s = String::new();
        for i in 0..n {
            if i > 0 {
                s.push(if i % 17 == 0 { '\n' } else { ' ' });
            }
            t.write_word((i as u32).wrapping_mul(2654435761) ^ salt, &mut s);
        }
        s
    }

    fn cache(chunk: usize) -> PrefixTokenCache {
        PrefixTokenCache::new(
            PrefixTokenCacheConfig {
                chunk_bytes: chunk,
                ..Default::default()
            },
            "sim",
        )
    }

    #[test]
    fn shared_prefixes_are_reused_and_results_equal_full_tokenization() {
        let t = SimTokenizer::default();
        let c = cache(256);
        let system = words(3000, 1);
        let q1 = format!("{system} {}", words(200, 2));
        let q2 = format!("{system} {}", words(300, 3));
        let mut out = Vec::new();
        c.encode(&t, &q1, &mut out).unwrap();
        assert_eq!(out, t.encode(&q1).unwrap());
        assert_eq!((c.stats().hits(), c.stats().misses()), (0, 1));
        out.clear();
        c.encode(&t, &q2, &mut out).unwrap();
        assert_eq!(out, t.encode(&q2).unwrap());
        assert_eq!(c.stats().hits(), 1);
        // Almost all of the 3000 shared words came from the cache.
        assert!(
            c.stats().reused_tokens() > 2900,
            "{}",
            c.stats().reused_tokens()
        );
        // Appending to the previous output works (out is not cleared).
        let mut prefixed = vec![7, 7];
        c.encode(&t, &q1, &mut prefixed).unwrap();
        assert_eq!(&prefixed[2..], &t.encode(&q1).unwrap()[..]);
    }

    #[test]
    fn cuts_inside_words_and_multibyte_text_stay_exact() {
        let t = SimTokenizer::default();
        let c = cache(16);
        // Cut points land inside words and inside multi-byte characters.
        let base = "héllo wörld ünïcode ".repeat(40);
        for tail in ["x", " y z", "zzzz", "ünï", ""] {
            let text = format!("{base}{tail}");
            let mut out = Vec::new();
            c.encode(&t, &text, &mut out).unwrap();
            assert_eq!(out, t.encode(&text).unwrap(), "{tail:?}");
        }
        assert!(c.stats().hits() >= 3);
        // A prompt that diverges in the middle of a word reuses only what precedes it.
        let diverged = format!("{}Q{}", &base[..100], &base[101..]);
        let mut out = Vec::new();
        c.encode(&t, &diverged, &mut out).unwrap();
        assert_eq!(out, t.encode(&diverged).unwrap());
    }

    /// A tokenizer whose tokens depend on what precedes the resume point: every token is the
    /// running count of words so far. Splicing is wrong for it; verification must catch it.
    struct Contextual;

    impl Tokenizer for Contextual {
        fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
            out.extend((0..text.split_ascii_whitespace().count() as u32).map(|i| i + 1));
            Ok(())
        }
        fn encode_with_offsets(
            &self,
            text: &str,
            ids: &mut Vec<u32>,
            offsets: &mut Vec<(usize, usize)>,
        ) -> Result<bool, TokenizerError> {
            SimTokenizer::default().encode_with_offsets(text, &mut Vec::new(), offsets)?;
            ids.extend((0..offsets.len() as u32).map(|i| i + 1));
            Ok(true)
        }
        fn decode(&self, _: &[u32]) -> String {
            String::new()
        }
        fn vocab_size(&self) -> u32 {
            u32::MAX
        }
        fn name(&self) -> &str {
            "contextual"
        }
    }

    #[test]
    fn splices_that_do_not_verify_fall_back_to_full_tokenization() {
        let c = cache(64);
        let text = words(500, 9);
        let mut out = Vec::new();
        c.encode(&Contextual, &text, &mut out).unwrap();
        let longer = format!("{text} more words");
        out.clear();
        c.encode(&Contextual, &longer, &mut out).unwrap();
        assert_eq!(out, Contextual.encode(&longer).unwrap());
        assert_eq!(c.stats().hits(), 0);
        assert_eq!(c.stats().unverified(), 1);
    }

    #[test]
    fn memory_is_bounded_by_generations() {
        let t = SimTokenizer::default();
        let c = PrefixTokenCache::new(
            PrefixTokenCacheConfig {
                chunk_bytes: 64,
                overlap: 4,
                capacity_bytes: 1 << 16,
            },
            "sim",
        );
        for i in 0..200 {
            let text = words(400, 1000 + i);
            let mut out = Vec::new();
            c.encode(&t, &text, &mut out).unwrap();
            assert_eq!(out, t.encode(&text).unwrap());
        }
        // 64 KiB at ≥ 64 bytes per entry: a few thousand entries at most.
        let g = c.inner.lock();
        assert!(g.current_bytes <= (1 << 16) / 2 + 400 * 4 + ENTRY_COST);
        assert!(g.len() < 2048, "{}", g.len());
    }

    #[test]
    fn byte_level_bpe_splices_are_exact() {
        let dir = std::env::temp_dir().join(format!("llmsched-bpe-{}", std::process::id()));
        crate::testing::write_bpe_tokenizer(&dir, 400).unwrap();
        let t = crate::HfTokenizer::from_path(&dir).unwrap();
        let c = cache(128);
        let corpus = crate::testing::corpus(300);
        let system = corpus[..200].join(" ");
        let mut hits = 0;
        for (i, q) in corpus[200..].iter().enumerate() {
            // Shared system prompt, then a question; sometimes a cut lands in an emoji.
            let text = if i % 3 == 0 {
                format!("{system}🙂{q}")
            } else {
                format!("{system} {q}")
            };
            let mut out = Vec::new();
            c.encode(&t, &text, &mut out).unwrap();
            assert_eq!(out, t.encode(&text).unwrap(), "prompt {i}");
            hits = c.stats().hits();
        }
        assert!(
            hits >= 90,
            "hits {hits}, unverified {}",
            c.stats().unverified()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn short_texts_bypass_the_cache() {
        let t = SimTokenizer::default();
        let c = cache(1024);
        let mut out = Vec::new();
        c.encode(&t, "a b c", &mut out).unwrap();
        assert_eq!(out, vec![0, 1, 2]);
        assert!(c.is_empty());
        assert_eq!(c.stats().misses(), 0);
    }
}
