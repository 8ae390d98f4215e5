//! Prompt generation with a Hugging Face `tokenizer.json` (a small word-level tokenizer written
//! by the test, since nothing may be downloaded).

use llmsched_bench::TokenCounter;
use llmsched_bench::config::{LengthSpec, SharedPrefixConfig};
use llmsched_bench::datagen::generate_shared_prefix;

fn word_level_tokenizer(dir: &std::path::Path) -> std::path::PathBuf {
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), 0.into());
    let words = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra",
        "tango",
    ];
    for (i, w) in words.iter().enumerate() {
        vocab.insert((*w).into(), (i + 1).into());
    }
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "[UNK]", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_string()).expect("write tokenizer");
    path
}

#[test]
fn hf_prompts_have_exact_lengths() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = word_level_tokenizer(dir.path());
    let tok = TokenCounter::hf(&path).expect("load");
    let cfg = SharedPrefixConfig {
        num_groups: 2,
        num_prompts_per_group: 3,
        system_prompt_len: LengthSpec::Fixed(20),
        question_len: LengthSpec::Fixed(5),
        output_len: LengthSpec::Fixed(4),
        ..SharedPrefixConfig::default()
    };
    let set = generate_shared_prefix(&cfg, 11, &tok).expect("generate");
    assert_eq!(set.len(), 6);
    for p in &set.prompts {
        assert_eq!(tok.count(&p.text), 25, "{}", p.text);
        assert_eq!(p.input_tokens, 25);
        assert!(
            !p.text.contains("[UNK]"),
            "special tokens are not sampled: {}",
            p.text
        );
    }
    // Loading the directory works too; a missing file is a clear error.
    assert!(TokenCounter::hf(dir.path()).is_ok());
    let err = TokenCounter::hf(&dir.path().join("nope.json")).expect_err("missing");
    assert!(err.to_string().contains("nope.json"));
}
