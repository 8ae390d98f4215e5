//! Synthetic shared-prefix prompts, generated as inference-perf's `SharedPrefixDataGenerator`
//! does.
//!
//! * Lengths are drawn first from a seeded RNG: one system prompt length per group, then per
//!   group the question lengths and output lengths of its prompts (fixed lengths draw nothing).
//! * Each group gets a system prompt of random tokens; each prompt appends a random question:
//!   `prompt = system + " " + question`. With the simulator's word tokenizer a token is a word
//!   ([`SimTokenizer::write_word`]), so lengths are exact token counts by construction. With a
//!   Hugging Face tokenizer, random ids are decoded and the text is re-tokenized and adjusted
//!   until it has the target length (up to 20 rounds, inference-perf's
//!   `converge_to_exact_length_text`); the question's first token starts a word so the
//!   boundary does not merge.
//! * The list is shuffled once with the same RNG; request `i` of a stage uses prompt
//!   `i mod N` (inference-perf restarts the data generator at every stage).

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution as _, LogNormal, Normal, Poisson, StandardNormal};

use llmsched_tokenizer::{HfTokenizer, SimTokenizer, Tokenizer};

use crate::config::{Distribution, DistributionType, SharedPrefixConfig};
use crate::error::BenchError;
use crate::tokens::TokenCounter;

/// inference-perf's `max_completion_tokens` default, used when a prompt's output length is 0.
pub const DEFAULT_MAX_TOKENS: u64 = 30;

/// One generated prompt.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// Full prompt text: system prompt, a space, the question.
    pub text: Arc<str>,
    /// The group (shared system prompt) it belongs to.
    pub group: u32,
    /// Client-side token count of `text`.
    pub input_tokens: u64,
    /// Tokens of the shared system prompt.
    pub system_tokens: u64,
    /// `max_tokens` to request.
    pub max_tokens: u64,
    /// Position before shuffling (`num_prompts_per_group × group + prompt`), which names the
    /// multi-turn session (`user_session_<n>`).
    pub origin_index: u64,
}

/// All prompts of a workload, in replay order (already shuffled).
#[derive(Debug, Clone, Default)]
pub struct PromptSet {
    /// The prompts; request `i` uses `prompts[i % len]`.
    pub prompts: Vec<Prompt>,
    /// Number of groups.
    pub num_groups: u64,
    /// Prompts per group.
    pub prompts_per_group: u64,
}

impl PromptSet {
    /// The prompt for data index `i` (cyclic replay).
    pub fn get(&self, i: u64) -> Option<&Prompt> {
        if self.prompts.is_empty() {
            return None;
        }
        self.prompts.get((i % self.prompts.len() as u64) as usize)
    }

    /// Number of prompts.
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    /// True when there are no prompts.
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }
}

/// Samples `count` integer lengths from `dist` (inference-perf's `sample_from_distribution`):
/// draw, clip to `[min, max]`, round half to even, clip again, floor at 0.
pub fn sample_lengths(dist: &Distribution, count: usize, rng: &mut impl Rng) -> Vec<u64> {
    let to_len = |x: f64| -> u64 {
        let clipped = x.clamp(dist.min as f64, dist.max as f64);
        let rounded = clipped
            .round_ties_even()
            .clamp(dist.min as f64, dist.max as f64);
        // Clamped to a non-negative integral value below i64::MAX, so the cast is exact.
        rounded.max(0.0) as u64
    };
    let std = dist.effective_std_dev();
    match dist.kind {
        // `int(mean)`: truncation toward zero.
        DistributionType::Fixed => vec![dist.mean.max(0.0) as u64; count],
        DistributionType::Normal => match Normal::new(dist.mean, std) {
            Ok(n) => (0..count).map(|_| to_len(n.sample(rng))).collect(),
            Err(_) => vec![to_len(dist.mean); count],
        },
        DistributionType::SkewNormal => {
            let delta = dist.skew / (1.0 + dist.skew * dist.skew).sqrt();
            let other = (1.0 - delta * delta).max(0.0).sqrt();
            (0..count)
                .map(|_| {
                    let u0: f64 = rng.sample(StandardNormal);
                    let v: f64 = rng.sample(StandardNormal);
                    let u1 = delta * u0 + other * v;
                    let z = if u0 >= 0.0 { u1 } else { -u1 };
                    to_len(dist.mean + std * z)
                })
                .collect()
        }
        DistributionType::Lognormal => {
            if std <= 0.0 {
                return vec![to_len(dist.mean); count];
            }
            let sigma_sq = (1.0 + (std / dist.mean).powi(2)).ln();
            let mu = dist.mean.ln() - sigma_sq / 2.0;
            match LogNormal::new(mu, sigma_sq.sqrt()) {
                Ok(d) => (0..count).map(|_| to_len(d.sample(rng))).collect(),
                Err(_) => vec![to_len(dist.mean); count],
            }
        }
        DistributionType::Uniform => {
            let (lo, hi) = (dist.min as f64, dist.max as f64 + 1.0);
            (0..count)
                .map(|_| to_len(lo + rng.random::<f64>() * (hi - lo)))
                .collect()
        }
        DistributionType::Poisson => {
            let lam = if dist.mean > 0.0 { dist.mean } else { 1.0 };
            match Poisson::new(lam) {
                Ok(d) => (0..count).map(|_| to_len(d.sample(rng))).collect(),
                Err(_) => vec![to_len(lam); count],
            }
        }
    }
}

/// Generates the shared-prefix prompt list.
pub fn generate_shared_prefix(
    cfg: &SharedPrefixConfig,
    seed: u64,
    tokenizer: &TokenCounter,
) -> Result<PromptSet, BenchError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let groups = usize::try_from(cfg.num_groups)
        .map_err(|_| BenchError::invalid("data.shared_prefix.num_groups", "too large"))?;
    let per_group = usize::try_from(cfg.num_prompts_per_group).map_err(|_| {
        BenchError::invalid("data.shared_prefix.num_prompts_per_group", "too large")
    })?;
    let total = groups
        .checked_mul(per_group)
        .filter(|&n| n <= 10_000_000)
        .ok_or_else(|| {
            BenchError::invalid(
                "data.shared_prefix",
                "num_groups × num_prompts_per_group is too large (limit 10,000,000 prompts)",
            )
        })?;

    let system_dist = cfg.system_prompt_len.resolve(None);
    let question_dist = cfg.question_len.resolve(cfg.question_distribution.as_ref());
    let output_dist = cfg.output_len.resolve(cfg.output_distribution.as_ref());

    let system_lens = sample_lengths(&system_dist, groups, &mut rng);
    let mut question_lens = Vec::with_capacity(groups);
    let mut output_lens = Vec::with_capacity(groups);
    for _ in 0..groups {
        question_lens.push(sample_lengths(&question_dist, per_group, &mut rng));
        output_lens.push(sample_lengths(&output_dist, per_group, &mut rng));
    }

    let mut textgen = TextGen::new(tokenizer)?;
    let mut prompts = Vec::with_capacity(total);
    for g in 0..groups {
        let system = textgen.system_text(system_lens[g], &mut rng)?;
        for p in 0..per_group {
            let question = textgen.question_text(question_lens[g][p], &mut rng)?;
            let text = textgen.join(&system, &question);
            let input_tokens = match tokenizer {
                TokenCounter::Sim(_) => system_lens[g] + question_lens[g][p],
                TokenCounter::Hf(_) => tokenizer.count(&text),
            };
            let max_tokens = match output_lens[g][p] {
                0 => DEFAULT_MAX_TOKENS,
                n => n,
            };
            prompts.push(Prompt {
                text: Arc::from(text),
                group: u32::try_from(g).unwrap_or(u32::MAX),
                input_tokens,
                system_tokens: system_lens[g],
                max_tokens,
                origin_index: (g * per_group + p) as u64,
            });
        }
    }
    prompts.shuffle(&mut rng);
    Ok(PromptSet {
        prompts,
        num_groups: cfg.num_groups,
        prompts_per_group: cfg.num_prompts_per_group,
    })
}

/// A generated piece of text and, for Hugging Face tokenizers, its token ids.
struct Piece {
    text: String,
    ids: Vec<u32>,
}

enum TextGen<'a> {
    Sim(SimTokenizer),
    Hf {
        tok: &'a HfTokenizer,
        valid: Vec<u32>,
        word_starts: Vec<u32>,
    },
}

impl<'a> TextGen<'a> {
    fn new(tokenizer: &'a TokenCounter) -> Result<Self, BenchError> {
        match tokenizer {
            TokenCounter::Sim(t) => Ok(Self::Sim(*t)),
            TokenCounter::Hf(t) => {
                let (valid, word_starts) = hf_vocab(t);
                if valid.is_empty() {
                    return Err(BenchError::invalid(
                        "--tokenizer",
                        "the tokenizer has no usable (non-special) tokens",
                    ));
                }
                Ok(Self::Hf {
                    tok: t,
                    valid,
                    word_starts,
                })
            }
        }
    }

    fn system_text(&mut self, len: u64, rng: &mut StdRng) -> Result<Piece, BenchError> {
        match self {
            Self::Sim(t) => Ok(Piece {
                text: sim_words(t, len, rng),
                ids: Vec::new(),
            }),
            Self::Hf { tok, valid, .. } => {
                let initial = random_ids(valid, len, rng);
                converge(tok, len, initial, rng, valid, false)
            }
        }
    }

    fn question_text(&mut self, len: u64, rng: &mut StdRng) -> Result<Piece, BenchError> {
        match self {
            Self::Sim(t) => Ok(Piece {
                text: sim_words(t, len, rng),
                ids: Vec::new(),
            }),
            Self::Hf {
                tok,
                valid,
                word_starts,
            } => {
                if len == 0 {
                    return Ok(Piece {
                        text: String::new(),
                        ids: Vec::new(),
                    });
                }
                let mut initial = vec![word_starts[rng.random_range(0..word_starts.len())]];
                initial.extend(random_ids(valid, len - 1, rng));
                converge(tok, len, initial, rng, valid, true)
            }
        }
    }

    fn join(&self, system: &Piece, question: &Piece) -> String {
        match self {
            Self::Sim(_) => match (system.text.is_empty(), question.text.is_empty()) {
                (true, _) => question.text.clone(),
                (false, true) => system.text.clone(),
                (false, false) => {
                    let mut s = String::with_capacity(system.text.len() + 1 + question.text.len());
                    s.push_str(&system.text);
                    s.push(' ');
                    s.push_str(&question.text);
                    s
                }
            },
            // As inference-perf: decode the concatenated ids so the boundary is the
            // tokenizer's own (the question starts with a word-start token).
            Self::Hf { tok, .. } => {
                let mut ids = system.ids.clone();
                ids.extend_from_slice(&question.ids);
                tok.decode(&ids)
            }
        }
    }
}

fn sim_words(t: &SimTokenizer, len: u64, rng: &mut StdRng) -> String {
    let vocab = t.vocab_size();
    let mut s = String::with_capacity(usize::try_from(len).unwrap_or(0).saturating_mul(5));
    for i in 0..len {
        if i > 0 {
            s.push(' ');
        }
        t.write_word(rng.random_range(0..vocab), &mut s);
    }
    s
}

fn random_ids(valid: &[u32], len: u64, rng: &mut StdRng) -> Vec<u32> {
    (0..len)
        .map(|_| valid[rng.random_range(0..valid.len())])
        .collect()
}

/// Usable ids (no special tokens) and the ids whose text starts with whitespace.
///
/// `HfTokenizer` does not expose its special tokens, so a token is treated as special when it
/// decodes to nothing or to a `<...>` / `[...]` marker; this matches the usual `<|endoftext|>`,
/// `<s>`, `[CLS]` conventions.
fn hf_vocab(tok: &HfTokenizer) -> (Vec<u32>, Vec<u32>) {
    let mut valid = Vec::new();
    let mut word_starts = Vec::new();
    for id in 0..tok.vocab_size() {
        let text = tok.decode(&[id]);
        let special = text.is_empty()
            || text.contains("<|")
            || (text.len() > 2
                && ((text.starts_with('<') && text.ends_with('>'))
                    || (text.starts_with('[') && text.ends_with(']')))
                && !text.contains(' '));
        if special {
            continue;
        }
        valid.push(id);
        if text.starts_with(char::is_whitespace) {
            word_starts.push(id);
        }
    }
    if word_starts.is_empty() {
        word_starts.clone_from(&valid);
    }
    (valid, word_starts)
}

/// inference-perf's `converge_to_exact_length_text`: decode, count, then append random ids or
/// truncate until the text has `target` tokens (at most 20 rounds).
fn converge(
    tok: &HfTokenizer,
    target: u64,
    mut ids: Vec<u32>,
    rng: &mut StdRng,
    valid: &[u32],
    keep_first: bool,
) -> Result<Piece, BenchError> {
    if target == 0 {
        return Ok(Piece {
            text: String::new(),
            ids: Vec::new(),
        });
    }
    let mut last = 0u64;
    for _ in 0..20 {
        let text = tok.decode(&ids);
        let n = tok.encode(&text)?.len() as u64;
        if n == target {
            return Ok(Piece { text, ids });
        }
        last = n;
        if n < target {
            ids.extend(random_ids(valid, target - n, rng));
        } else {
            let diff = usize::try_from(n - target).unwrap_or(usize::MAX);
            let floor = usize::from(keep_first);
            let keep = ids.len().saturating_sub(diff).max(floor);
            ids.truncate(keep);
        }
    }
    Err(BenchError::invalid(
        "--tokenizer",
        format!(
            "could not generate text of exactly {target} tokens after 20 attempts (got {last}); \
             does the tokenizer match the model the server runs?"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LengthSpec;

    fn cfg(groups: u64, per: u64, sys: u64, q: u64, out: u64) -> SharedPrefixConfig {
        SharedPrefixConfig {
            num_groups: groups,
            num_prompts_per_group: per,
            system_prompt_len: LengthSpec::Fixed(sys),
            question_len: LengthSpec::Fixed(q),
            output_len: LengthSpec::Fixed(out),
            ..SharedPrefixConfig::default()
        }
    }

    #[test]
    fn prompts_have_exact_token_counts_and_shared_prefixes() {
        let set = generate_shared_prefix(&cfg(3, 4, 50, 7, 9), 1, &TokenCounter::default())
            .expect("generate");
        assert_eq!(set.len(), 12);
        for p in &set.prompts {
            assert_eq!(SimTokenizer::count(&p.text), 57, "{}", p.text);
            assert_eq!(p.input_tokens, 57);
            assert_eq!(p.max_tokens, 9);
        }
        // Prompts of one group share exactly their first 50 words; groups differ.
        let prefix = |p: &Prompt| p.text.split(' ').take(50).collect::<Vec<_>>().join(" ");
        for a in &set.prompts {
            for b in &set.prompts {
                assert_eq!(a.group == b.group, prefix(a) == prefix(b));
            }
        }
        // Every group has 4 prompts with distinct questions.
        for g in 0..3 {
            let mut texts: Vec<_> = set
                .prompts
                .iter()
                .filter(|p| p.group == g)
                .map(|p| &p.text)
                .collect();
            assert_eq!(texts.len(), 4);
            texts.sort();
            texts.dedup();
            assert_eq!(texts.len(), 4);
        }
    }

    #[test]
    fn same_seed_same_prompts_different_seed_different() {
        let c = cfg(2, 3, 20, 5, 4);
        let a = generate_shared_prefix(&c, 7, &TokenCounter::default()).expect("a");
        let b = generate_shared_prefix(&c, 7, &TokenCounter::default()).expect("b");
        let d = generate_shared_prefix(&c, 8, &TokenCounter::default()).expect("d");
        let texts = |s: &PromptSet| {
            s.prompts
                .iter()
                .map(|p| p.text.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(texts(&a), texts(&b));
        assert_ne!(texts(&a), texts(&d));
    }

    #[test]
    fn replay_is_cyclic() {
        let set =
            generate_shared_prefix(&cfg(2, 2, 3, 3, 1), 0, &TokenCounter::default()).expect("g");
        for i in 0..12u64 {
            let p = set.get(i).expect("prompt");
            assert!(Arc::ptr_eq(&p.text, &set.prompts[(i % 4) as usize].text));
        }
    }

    #[test]
    fn zero_lengths_and_zero_output() {
        let set =
            generate_shared_prefix(&cfg(1, 2, 0, 4, 0), 0, &TokenCounter::default()).expect("g");
        for p in &set.prompts {
            assert_eq!(SimTokenizer::count(&p.text), 4);
            assert!(!p.text.starts_with(' '));
            assert_eq!(p.max_tokens, DEFAULT_MAX_TOKENS);
        }
        let set =
            generate_shared_prefix(&cfg(1, 1, 5, 0, 1), 0, &TokenCounter::default()).expect("g");
        assert_eq!(SimTokenizer::count(&set.prompts[0].text), 5);
        assert!(!set.prompts[0].text.ends_with(' '));
    }

    #[test]
    fn distributions_stay_in_bounds_and_fixed_is_exact() {
        let mut rng = StdRng::seed_from_u64(3);
        for kind in [
            DistributionType::Normal,
            DistributionType::SkewNormal,
            DistributionType::Lognormal,
            DistributionType::Uniform,
            DistributionType::Poisson,
        ] {
            let d = Distribution {
                min: 10,
                max: 40,
                mean: 25.0,
                std_dev: Some(8.0),
                total_count: None,
                kind,
                variance: None,
                skew: 2.0,
            };
            let v = sample_lengths(&d, 2000, &mut rng);
            assert!(v.iter().all(|&x| (10..=40).contains(&x)), "{kind:?}");
            let mean = v.iter().sum::<u64>() as f64 / v.len() as f64;
            assert!((15.0..35.0).contains(&mean), "{kind:?} mean {mean}");
            let distinct: std::collections::BTreeSet<_> = v.iter().collect();
            assert!(distinct.len() > 5, "{kind:?} should vary");
        }
        assert_eq!(
            sample_lengths(&Distribution::fixed(17), 3, &mut rng),
            vec![17, 17, 17]
        );
    }
}
