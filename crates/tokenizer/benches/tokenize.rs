//! Tokenization cost per request for the precise prefix scorer, reported separately from the
//! index lookup: an ~8k-token prompt through the simulator's tokenizer and a real byte-level
//! BPE `tokenizer.json` (trained in-process, see `llmsched_tokenizer::testing`), each in full
//! and through the prefix token cache when only the last ~10% of the prompt is new (the
//! shared-system-prompt case), plus chat-template rendering.
//!
//! `cargo bench -p llmsched-tokenizer --bench tokenize -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use llmsched_tokenizer::testing::{corpus, write_bpe_tokenizer};
use llmsched_tokenizer::{
    ChatTemplate, HfTokenizer, PrefixTokenCache, PrefixTokenCacheConfig, SIM_CHAT_TEMPLATE,
    SimTokenizer, Tokenizer,
};

/// Text of about `words` words from the toy corpus, plus a distinct tail per `variant`.
fn prompt(words: usize, variant: usize) -> String {
    let mut s = String::new();
    for sentence in corpus(words / 12 + 1) {
        s.push_str(&sentence);
        s.push(' ');
    }
    // A new question (~10% of the prompt) per variant.
    let tail: Vec<String> = corpus(words / 120 + 1 + variant)
        .into_iter()
        .skip(variant)
        .collect();
    s.push_str(&format!("question {variant}: "));
    s.push_str(&tail.join(" "));
    s
}

fn bench_tokenizer(c: &mut Criterion, name: &str, tok: &dyn Tokenizer, prompts: &[String]) {
    let tokens = tok.encode(&prompts[0]).unwrap_or_default().len();
    let mut g = c.benchmark_group(format!("tokenize_{name}"));
    g.throughput(Throughput::Elements(tokens as u64));
    g.bench_function(format!("full_{tokens}_tokens"), |b| {
        let mut out = Vec::with_capacity(tokens + 64);
        b.iter(|| {
            out.clear();
            tok.encode_into(black_box(&prompts[0]), &mut out).ok();
            out.len()
        })
    });
    let cache = PrefixTokenCache::new(PrefixTokenCacheConfig::default(), tok.name());
    let mut out = Vec::new();
    cache.encode(tok, &prompts[0], &mut out).ok();
    let mut i = 0usize;
    g.bench_function(format!("cached_prefix_{tokens}_tokens"), |b| {
        let mut out = Vec::with_capacity(tokens + 64);
        b.iter(|| {
            i = (i + 1) % prompts.len();
            out.clear();
            cache.encode(tok, black_box(&prompts[i]), &mut out).ok();
            out.len()
        })
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    // Sim: one token per word, so 8,000 words.
    let sim_prompts: Vec<String> = (0..8).map(|v| prompt(8000, v)).collect();
    bench_tokenizer(&mut c, "sim", &SimTokenizer::default(), &sim_prompts);

    let dir = std::env::temp_dir().join(format!("llmsched-tok-bench-{}", std::process::id()));
    if write_bpe_tokenizer(&dir, 2000).is_ok()
        && let Ok(hf) = HfTokenizer::from_path(&dir)
    {
        // Byte-level BPE on this corpus: about 1.3 tokens per word.
        let hf_prompts: Vec<String> = (0..8).map(|v| prompt(6000, v)).collect();
        bench_tokenizer(&mut c, "hf_bpe", &hf, &hf_prompts);
    }
    let _ = std::fs::remove_dir_all(&dir);

    let messages: Vec<(String, String)> = vec![
        ("system".into(), prompt(2000, 0)),
        ("user".into(), "What does the cache hold?".into()),
        ("assistant".into(), "Keys and values.".into()),
        ("user".into(), "For which tokens?".into()),
    ];
    let mut g = c.benchmark_group("chat_render");
    for (name, t) in [
        ("sim_builtin", ChatTemplate::sim()),
        (
            "jinja",
            ChatTemplate::from_source(SIM_CHAT_TEMPLATE, "", "").unwrap_or_default(),
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                t.render(messages.iter().map(|(r, m)| (r.as_str(), m.as_str())), true)
                    .map(|s| s.len())
                    .unwrap_or(0)
            })
        });
    }
    g.finish();
    c.final_summary();
}
