//! Helpers for tests and benchmarks that need a real Hugging Face tokenizer without model
//! files: a small byte-level BPE tokenizer trained in-process on generated text.

use std::path::Path;

use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use crate::TokenizerError;

/// Sentences of an English-like toy language (deterministic), used as training text.
pub fn corpus(sentences: usize) -> Vec<String> {
    const WORDS: [&str; 24] = [
        "the", "cache", "holds", "keys", "and", "values", "for", "every", "token", "of", "prompt",
        "routing", "sends", "requests", "to", "replicas", "which", "already", "have", "prefix",
        "blocks", "évité", "naïve", "🙂",
    ];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..sentences)
        .map(|_| {
            let mut s = String::new();
            for i in 0..12 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i > 0 {
                    s.push(if x.is_multiple_of(11) { '\n' } else { ' ' });
                }
                s.push_str(WORDS[(x % WORDS.len() as u64) as usize]);
                if x.is_multiple_of(7) {
                    s.push(',');
                }
            }
            s.push('.');
            s
        })
        .collect()
}

/// Trains a byte-level BPE tokenizer (vocabulary of about `vocab_size`) on [`corpus`] and
/// writes it to `dir/tokenizer.json`.
pub fn write_bpe_tokenizer(dir: &Path, vocab_size: usize) -> Result<(), TokenizerError> {
    let err = |message: String| TokenizerError::Load {
        path: dir.display().to_string(),
        message,
    };
    let mut tokenizer = tokenizers::Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default()));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tokenizer
        .train(&mut trainer, corpus(2000).into_iter())
        .map_err(|e| err(e.to_string()))?;
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| err(e.to_string()))?;
    Ok(())
}
