//! Tokenizers shared by the simulator, the load generator and the precise prefix scorer.
//!
//! Two implementations of one [`Tokenizer`] trait:
//!
//! * [`SimTokenizer`], the default everywhere. It needs no model files and is exact by
//!   construction: every whitespace-separated word is one token. The load generator builds its
//!   prompts from [`SimTokenizer::write_word`], so a prompt it calls "6,000 tokens" is 6,000
//!   tokens to the simulator and to the precise prefix scorer. The vocabulary is the set of
//!   lowercase words of one to four letters in bijective base 26 (`a`=0, `b`=1, …, `z`=25,
//!   `aa`=26, …); any other word (punctuation, capitals, longer words) is mapped to an id by
//!   hashing it (xxh3-64 modulo the vocabulary size), so arbitrary text still tokenizes
//!   deterministically. `encode(decode(ids)) == ids` for every id below the vocabulary size.
//! * [`HfTokenizer`], a Hugging Face `tokenizer.json` loaded from a local file (no downloads),
//!   for matching a real engine's tokenization.
//!
//! Around them, for the precise prefix scorer (which must tokenize every request exactly as
//! the engine will):
//!
//! * [`chat`] renders chat messages to the prompt text, with the model's Jinja chat template
//!   (`tokenizer_config.json`) or with the simulator's built-in format;
//! * [`cache`] remembers the token ids of recent prompt prefixes, so a long prompt that shares
//!   its beginning with an earlier one is only tokenized from where they differ.

use std::path::Path;

pub mod cache;
pub mod chat;
pub mod testing;

pub use cache::{CacheStats, PrefixTokenCache, PrefixTokenCacheConfig};
pub use chat::{ChatTemplate, ChatTemplateError, SIM_CHAT_TEMPLATE, render_sim_chat};

use xxhash_rust::xxh3::xxh3_64;

/// Errors raised while loading a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The `tokenizer.json` file could not be read or parsed.
    #[error("cannot load tokenizer from {path}: {message}")]
    Load {
        /// The file that was tried.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// Encoding failed inside the Hugging Face tokenizer.
    #[error("tokenization failed: {0}")]
    Encode(String),
}

/// Turns text into token ids.
pub trait Tokenizer: Send + Sync {
    /// Appends the token ids of `text` to `out`.
    fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError>;

    /// Appends the token ids of `text` to `ids` and, when the tokenizer can report them, the
    /// byte range of `text` each token came from to `offsets` (same length as the ids
    /// appended); returns whether offsets were written. The default reports none.
    fn encode_with_offsets(
        &self,
        text: &str,
        ids: &mut Vec<u32>,
        offsets: &mut Vec<(usize, usize)>,
    ) -> Result<bool, TokenizerError> {
        let _ = offsets;
        self.encode_into(text, ids)?;
        Ok(false)
    }

    /// The token ids of `text`.
    fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::new();
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    /// Text for `ids` (lossy for ids that came from hashed words).
    fn decode(&self, ids: &[u32]) -> String;

    /// Number of distinct token ids.
    fn vocab_size(&self) -> u32;

    /// Short human-readable name, for logs.
    fn name(&self) -> &str;
}

/// The deterministic word-per-token tokenizer used by the simulator and load generator.
#[derive(Debug, Clone, Copy)]
pub struct SimTokenizer {
    vocab_size: u32,
}

/// Number of ids expressible with one to four letters in bijective base 26.
const MAX_WORD_IDS: u32 = 26 + 26 * 26 + 26 * 26 * 26 + 26 * 26 * 26 * 26;

impl Default for SimTokenizer {
    fn default() -> Self {
        Self::new(Self::DEFAULT_VOCAB)
    }
}

impl SimTokenizer {
    /// The default vocabulary size.
    pub const DEFAULT_VOCAB: u32 = 32_000;

    /// A tokenizer with `vocab_size` ids; clamped to `1..=475,254` (the four-letter words).
    pub fn new(vocab_size: u32) -> Self {
        Self {
            vocab_size: vocab_size.clamp(1, MAX_WORD_IDS),
        }
    }

    /// Appends the word that encodes to `id` (taken modulo the vocabulary size) to `out`.
    pub fn write_word(&self, id: u32, out: &mut String) {
        let mut v = (id % self.vocab_size) + 1;
        let mut buf = [0u8; 4];
        let mut n = 0;
        while v > 0 {
            v -= 1;
            buf[n] = b'a' + (v % 26) as u8;
            v /= 26;
            n += 1;
        }
        for &b in buf[..n].iter().rev() {
            out.push(char::from(b));
        }
    }

    /// The id of one whitespace-free word.
    pub fn word_id(&self, word: &str) -> u32 {
        let bytes = word.as_bytes();
        if !bytes.is_empty() && bytes.len() <= 4 && bytes.iter().all(u8::is_ascii_lowercase) {
            let mut v: u32 = 0;
            for &b in bytes {
                v = v * 26 + u32::from(b - b'a') + 1;
            }
            let id = v - 1;
            if id < self.vocab_size {
                return id;
            }
        }
        (xxh3_64(bytes) % u64::from(self.vocab_size)) as u32
    }

    /// Number of tokens in `text` without materializing them.
    pub fn count(text: &str) -> usize {
        text.split_ascii_whitespace().count()
    }
}

impl Tokenizer for SimTokenizer {
    fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        out.extend(text.split_ascii_whitespace().map(|w| self.word_id(w)));
        Ok(())
    }

    fn encode_with_offsets(
        &self,
        text: &str,
        ids: &mut Vec<u32>,
        offsets: &mut Vec<(usize, usize)>,
    ) -> Result<bool, TokenizerError> {
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i].is_ascii_whitespace() {
                i += 1;
                continue;
            }
            let start = i;
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            // ASCII whitespace never occurs inside a multi-byte UTF-8 sequence, so both ends
            // are char boundaries and the slice cannot fail.
            let word = text.get(start..i).unwrap_or_default();
            ids.push(self.word_id(word));
            offsets.push((start, i));
        }
        Ok(true)
    }

    fn decode(&self, ids: &[u32]) -> String {
        let mut s = String::with_capacity(ids.len() * 5);
        for (i, &id) in ids.iter().enumerate() {
            if i > 0 {
                s.push(' ');
            }
            self.write_word(id, &mut s);
        }
        s
    }

    fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    fn name(&self) -> &str {
        "sim"
    }
}

/// A Hugging Face tokenizer loaded from a local `tokenizer.json`.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    name: String,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("name", &self.name)
            .finish()
    }
}

impl HfTokenizer {
    /// Loads `path`, which is either a `tokenizer.json` file or a directory holding one.
    pub fn from_path(path: &Path) -> Result<Self, TokenizerError> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| TokenizerError::Load {
            path: file.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Self {
            inner,
            name: file.display().to_string(),
        })
    }
}

impl Tokenizer for HfTokenizer {
    fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        out.extend_from_slice(enc.get_ids());
        Ok(())
    }

    fn encode_with_offsets(
        &self,
        text: &str,
        ids: &mut Vec<u32>,
        offsets: &mut Vec<(usize, usize)>,
    ) -> Result<bool, TokenizerError> {
        // `encode` (unlike `encode_fast`) tracks byte offsets; the ids are the same.
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        ids.extend_from_slice(enc.get_ids());
        offsets.extend_from_slice(enc.get_offsets());
        Ok(true)
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    fn vocab_size(&self) -> u32 {
        u32::try_from(self.inner.get_vocab_size(true)).unwrap_or(u32::MAX)
    }

    fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_for_every_id() {
        let t = SimTokenizer::default();
        let ids: Vec<u32> = (0..t.vocab_size()).collect();
        let text = t.decode(&ids);
        assert_eq!(t.encode(&text).unwrap(), ids);
    }

    #[test]
    fn first_words_are_bijective_base26() {
        let t = SimTokenizer::default();
        let w = |id| {
            let mut s = String::new();
            t.write_word(id, &mut s);
            s
        };
        assert_eq!(w(0), "a");
        assert_eq!(w(25), "z");
        assert_eq!(w(26), "aa");
        assert_eq!(w(27), "ab");
        assert_eq!(w(26 + 676), "aaa");
    }

    #[test]
    fn one_token_per_whitespace_separated_word() {
        let t = SimTokenizer::default();
        let ids = t.encode("  Hello, world!\n\tthe  cat ").unwrap();
        assert_eq!(ids.len(), 4);
        assert_eq!(SimTokenizer::count("  Hello, world!\n\tthe  cat "), 4);
        assert!(ids.iter().all(|&i| i < t.vocab_size()));
        // Hashed words are deterministic.
        assert_eq!(ids, t.encode("Hello, world! the cat").unwrap());
        assert!(t.encode("").unwrap().is_empty());
    }

    #[test]
    fn words_outside_a_small_vocab_are_hashed_into_it() {
        let t = SimTokenizer::new(100);
        let id = t.word_id("zzz");
        assert!(id < 100);
        // "cv" = (2+1)*26 + (21+1) - 1 = 99, the last id of a 100-word vocabulary.
        assert_eq!(t.word_id("cv"), 99);
    }

    #[test]
    fn sim_offsets_cover_each_word() {
        let t = SimTokenizer::default();
        let text = "  Hello, wörld!\n\tthe  cat ";
        let (mut ids, mut offsets) = (Vec::new(), Vec::new());
        assert!(t.encode_with_offsets(text, &mut ids, &mut offsets).unwrap());
        assert_eq!(ids, t.encode(text).unwrap());
        let words: Vec<&str> = offsets.iter().map(|&(s, e)| &text[s..e]).collect();
        assert_eq!(words, ["Hello,", "wörld!", "the", "cat"]);
    }

    #[test]
    fn missing_hf_tokenizer_file_is_a_clear_error() {
        let err = HfTokenizer::from_path(Path::new("/nonexistent/tokenizer.json")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/tokenizer.json"),
            "{err}"
        );
    }
}
