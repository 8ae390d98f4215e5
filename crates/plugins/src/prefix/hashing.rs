//! Chained block hashes of a prompt, byte-compatible with the reference EPP.
//!
//! ```text
//! h₀ = xxh64(model ‖ cache_salt)                      (salt omitted when empty)
//! hᵢ = xxh64(blockᵢ ‖ le64(hᵢ₋₁))        i = 1 … n    (blockᵢ: the i-th run of `block` bytes)
//! ```
//!
//! xxh64 with seed 0 (the reference's `cespare/xxhash`), previous hash appended as 8
//! little-endian bytes. The text is cut at `max_blocks × block` bytes; texts shorter than one
//! block give no hashes; a trailing partial block is hashed like a full one. Returned are
//! `h₁ … hₙ` (h₀ only seeds the chain), so two prompts share a hash at position `i` exactly
//! when they share model, salt and the first `i` blocks.
//!
//! No allocation per block: each block and the previous hash are copied into a stack buffer
//! and hashed in one shot (blocks above 1 KiB use the streaming hasher instead).

use xxhash_rust::xxh64::{Xxh64, xxh64};

/// Characters per token assumed when converting token block sizes to characters.
pub const AVERAGE_CHARS_PER_TOKEN: usize = 4;

/// Blocks up to this size are hashed from a stack buffer.
const STACK_BLOCK: usize = 1024;

/// The seed hash `h₀` of a request.
pub fn seed_hash(model: &str, cache_salt: Option<&str>) -> u64 {
    let mut h = Xxh64::new(0);
    h.update(model.as_bytes());
    if let Some(salt) = cache_salt.filter(|s| !s.is_empty()) {
        h.update(salt.as_bytes());
    }
    h.digest()
}

/// Appends the chained hashes of `text` to `out` (see the module documentation). Returns the
/// number of hashes appended.
pub fn hash_blocks(
    seed: u64,
    text: &[u8],
    block: usize,
    max_blocks: usize,
    out: &mut Vec<u64>,
) -> usize {
    if block == 0 || text.len() < block || max_blocks == 0 {
        return 0;
    }
    let text = &text[..text.len().min(block.saturating_mul(max_blocks))];
    out.reserve(text.len().div_ceil(block));
    let mut prev = seed;
    let mut n = 0;
    if block <= STACK_BLOCK {
        let mut buf = [0u8; STACK_BLOCK + 8];
        for chunk in text.chunks(block) {
            let len = chunk.len();
            buf[..len].copy_from_slice(chunk);
            buf[len..len + 8].copy_from_slice(&prev.to_le_bytes());
            prev = xxh64(&buf[..len + 8], 0);
            out.push(prev);
            n += 1;
        }
    } else {
        for chunk in text.chunks(block) {
            let mut h = Xxh64::new(0);
            h.update(chunk);
            h.update(&prev.to_le_bytes());
            prev = h.digest();
            out.push(prev);
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chain written out naively, as the reference computes it.
    fn reference(model: &str, salt: &str, text: &[u8], block: usize, max: usize) -> Vec<u64> {
        if text.len() < block {
            return vec![];
        }
        let text = &text[..text.len().min(block * max)];
        let mut seed = model.as_bytes().to_vec();
        seed.extend_from_slice(salt.as_bytes());
        let mut prev = xxh64(&seed, 0);
        let mut out = vec![];
        let mut i = 0;
        while i < text.len() {
            let end = (i + block).min(text.len());
            let mut b = text[i..end].to_vec();
            b.extend_from_slice(&prev.to_le_bytes());
            prev = xxh64(&b, 0);
            out.push(prev);
            i = end;
        }
        out
    }

    fn hashes(model: &str, salt: Option<&str>, text: &str, block: usize, max: usize) -> Vec<u64> {
        let mut v = vec![];
        hash_blocks(seed_hash(model, salt), text.as_bytes(), block, max, &mut v);
        v
    }

    #[test]
    fn matches_the_reference_layout() {
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
        for (block, max) in [(4, 1000), (64, 256), (64, 3), (7, 50)] {
            assert_eq!(
                hashes("llama", Some("s1"), &text, block, max),
                reference("llama", "s1", text.as_bytes(), block, max)
            );
        }
        // Large blocks take the streaming path and must agree.
        let big = "x".repeat(5000);
        assert_eq!(
            hashes("m", None, &big, 2048, 256),
            reference("m", "", big.as_bytes(), 2048, 256)
        );
    }

    #[test]
    fn known_value_of_the_seed() {
        // xxh64("") with seed 0 is the well-known 0xEF46DB3751D8E999.
        assert_eq!(seed_hash("", None), 0xEF46_DB37_51D8_E999);
        assert_eq!(seed_hash("", Some("")), 0xEF46_DB37_51D8_E999);
        assert_eq!(seed_hash("ab", None), seed_hash("a", Some("b")));
    }

    #[test]
    fn block_counts_truncation_and_partial_tail() {
        let t = "a".repeat(130);
        // 130 chars / 64 → 2 full blocks + a 2-char tail.
        assert_eq!(hashes("m", None, &t, 64, 256).len(), 3);
        // Capped at 2 blocks (128 chars): no tail.
        assert_eq!(hashes("m", None, &t, 64, 2).len(), 2);
        // Shorter than one block: nothing.
        assert!(hashes("m", None, &t[..63], 64, 256).is_empty());
        assert!(hashes("m", None, &t, 0, 256).is_empty());
        assert!(hashes("m", None, &t, 64, 0).is_empty());
    }

    #[test]
    fn prefixes_share_hashes_and_model_or_salt_isolate() {
        let a = "x".repeat(64) + &"y".repeat(64) + &"z".repeat(64);
        let b = "x".repeat(64) + &"y".repeat(64) + &"w".repeat(64);
        let ha = hashes("m", None, &a, 64, 256);
        let hb = hashes("m", None, &b, 64, 256);
        assert_eq!(ha[..2], hb[..2]);
        assert_ne!(ha[2], hb[2]);
        // Identical blocks at different positions hash differently (chaining).
        let same = "x".repeat(128);
        let hs = hashes("m", None, &same, 64, 256);
        assert_ne!(hs[0], hs[1]);
        assert_ne!(hashes("m2", None, &a, 64, 256)[0], ha[0]);
        assert_ne!(hashes("m", Some("salt"), &a, 64, 256)[0], ha[0]);
    }
}
