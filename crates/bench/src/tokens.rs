//! Token counting for prompts and streamed output.
//!
//! Two tokenizers, as in `llmsched-tokenizer`: the simulator's [`SimTokenizer`] (one token per
//! whitespace-separated word, the default) and a Hugging Face `tokenizer.json`.

use std::sync::Arc;

use llmsched_tokenizer::{HfTokenizer, SimTokenizer, Tokenizer};

/// The tokenizer used to build prompts and count output tokens.
#[derive(Clone, Debug)]
pub enum TokenCounter {
    /// Word-per-token tokenizer of the llmsched simulator.
    Sim(SimTokenizer),
    /// A Hugging Face tokenizer loaded from a local file.
    Hf(Arc<HfTokenizer>),
}

impl Default for TokenCounter {
    fn default() -> Self {
        Self::Sim(SimTokenizer::default())
    }
}

impl TokenCounter {
    /// Loads a Hugging Face `tokenizer.json` (or a directory holding one).
    pub fn hf(path: &std::path::Path) -> Result<Self, llmsched_tokenizer::TokenizerError> {
        Ok(Self::Hf(Arc::new(HfTokenizer::from_path(path)?)))
    }

    /// Number of tokens in `text`.
    pub fn count(&self, text: &str) -> u64 {
        match self {
            Self::Sim(_) => SimTokenizer::count(text) as u64,
            Self::Hf(t) => match t.encode(text) {
                Ok(ids) => ids.len() as u64,
                Err(e) => {
                    tracing::warn!(error = %e, "tokenization failed; counting 0 tokens");
                    0
                }
            },
        }
    }

    /// Whether counting the whole output needs the whole text (true for Hugging Face
    /// tokenizers; the word counter works incrementally, see [`WordJoin`]).
    pub fn needs_full_text(&self) -> bool {
        matches!(self, Self::Hf(_))
    }

    /// Short name for reports.
    pub fn name(&self) -> String {
        match self {
            Self::Sim(_) => "sim (one token per word)".to_owned(),
            Self::Hf(t) => t.name().to_owned(),
        }
    }
}

/// Tracks word boundaries across streamed chunks so that the word count of the concatenated
/// output equals the sum of per-chunk counts minus the words split between two chunks.
#[derive(Debug, Default, Clone, Copy)]
pub struct WordJoin {
    /// The previous chunk ended inside a word.
    open_word: bool,
    /// Words in the concatenation so far.
    total: u64,
}

impl WordJoin {
    /// Adds a chunk whose own word count is `chunk_words`.
    pub fn push(&mut self, text: &str, chunk_words: u64) {
        if text.is_empty() {
            return;
        }
        let starts_in_word = !text.as_bytes()[0].is_ascii_whitespace();
        let merged = self.open_word && starts_in_word && chunk_words > 0;
        self.total += chunk_words - u64::from(merged);
        let last = text.as_bytes()[text.len() - 1];
        self.open_word = if chunk_words == 0 {
            // Whitespace-only chunk closes any open word.
            false
        } else {
            !last.is_ascii_whitespace()
        };
    }

    /// Words in the concatenated text.
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_join_matches_count_of_concatenation() {
        let chunks = [" hel", "lo wor", "ld", " ", "again ", "x", "", "  y z"];
        let mut join = WordJoin::default();
        let mut all = String::new();
        for c in chunks {
            join.push(c, SimTokenizer::count(c) as u64);
            all.push_str(c);
        }
        assert_eq!(join.total(), SimTokenizer::count(&all) as u64);
        assert_eq!(join.total(), 6, "{all:?}");
    }
}
