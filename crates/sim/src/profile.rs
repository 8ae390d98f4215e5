//! The step-time model and the calibration profiles (`--profile`).
//!
//! # Step-time model
//!
//! vLLM runs one forward pass per engine step over the batch the scheduler built: every
//! decoding sequence contributes one token, prefilling sequences contribute a chunk of their
//! prompt. The simulator charges each step
//!
//! ```text
//! t_step = t0                                   fixed cost: weight reads, all-reduces, launch/CPU
//!        + a_prefill  · P                       P  = prompt tokens computed in the step
//!        + a_pattn    · Σ n_i · (c_i + n_i/2)   prefill attention: chunk n_i attends to its
//!                                               c_i already-computed tokens and to itself
//!        + a_decode   · D                       D  = sequences decoding one token
//!        + a_dattn    · Σ ctx_j                 decode attention: KV tokens read by decoders
//! ```
//!
//! The first token of a request leaves the step that completes its prefill; later tokens leave
//! one per step. Each request also pays a frontend latency before it reaches the scheduler,
//! `f0 + f1 · prompt_tokens` (HTTP, tokenization, the API-server → engine hop), which is where
//! vLLM spends the part of TTFT that is not GPU time.
//!
//! The terms follow the roofline of a dense transformer: at decode batch sizes the step is
//! bound by reading the weights once (`t0`) plus each sequence's KV cache (`a_dattn`, bytes of
//! KV per token ÷ effective HBM bandwidth); prefill is compute bound (`a_prefill` = 2 · params
//! FLOP per token ÷ effective FLOP/s; `a_pattn` = 4 · layers · heads · head_dim FLOP per
//! query-key pair ÷ effective FLOP/s).
//!
//! # Profiles
//!
//! Each profile documents its sources below; every number can be overridden by a flag.

/// Coefficients of the step-time model, in simulated seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTimeModel {
    /// `t0`: fixed cost of every step.
    pub overhead_s: f64,
    /// `a_prefill`: cost per prompt token computed.
    pub prefill_per_token_s: f64,
    /// `a_pattn`: cost per (prompt token × attended token) pair.
    pub prefill_attn_per_pair_s: f64,
    /// `a_decode`: cost per decoding sequence.
    pub decode_per_seq_s: f64,
    /// `a_dattn`: cost per KV-cache token read by a decoding sequence.
    pub decode_attn_per_token_s: f64,
}

/// What one engine step computes, as the step-time model sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepShape {
    /// Prompt (prefill) tokens computed.
    pub prefill_tokens: u64,
    /// Σ n · (c + n/2) over prefill chunks.
    pub prefill_attn_pairs: f64,
    /// Sequences decoding one token.
    pub decode_seqs: u64,
    /// KV-cache tokens attended by the decoding sequences.
    pub decode_kv_tokens: u64,
}

impl StepTimeModel {
    /// Duration of a step of the given shape, in simulated seconds.
    pub fn step_time(&self, s: &StepShape) -> f64 {
        self.overhead_s
            + self.prefill_per_token_s * s.prefill_tokens as f64
            + self.prefill_attn_per_pair_s * s.prefill_attn_pairs
            + self.decode_per_seq_s * s.decode_seqs as f64
            + self.decode_attn_per_token_s * s.decode_kv_tokens as f64
    }
}

/// Latency a request spends before the scheduler sees it (HTTP, tokenization, IPC).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrontendModel {
    /// `f0`: fixed latency per request.
    pub overhead_s: f64,
    /// `f1`: latency per prompt token.
    pub per_prompt_token_s: f64,
}

impl FrontendModel {
    /// Latency for a prompt of `tokens` tokens, in simulated seconds.
    pub fn latency(&self, tokens: usize) -> f64 {
        self.overhead_s + self.per_prompt_token_s * tokens as f64
    }
}

/// A named calibration: model, engine limits, KV-cache size and timings.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// The `--profile` name.
    pub name: &'static str,
    /// Served model name.
    pub model: &'static str,
    /// KV-cache blocks.
    pub num_gpu_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Maximum running sequences (vLLM `--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Token budget per step (vLLM `--max-num-batched-tokens`, chunked prefill).
    pub max_num_batched_tokens: usize,
    /// Maximum prompt + output length.
    pub max_model_len: usize,
    /// Step timings.
    pub step: StepTimeModel,
    /// Frontend timings.
    pub frontend: FrontendModel,
    /// One line shown by `--help`/logs.
    pub summary: &'static str,
}

/// Qwen3-32B (BF16) on two H100-80GB SXM with tensor parallelism 2: the replica of llm-d's
/// "intelligent inference scheduling" well-lit path, whose benchmark this project reproduces.
///
/// * KV cache: 307,328 tokens per replica as reported for that deployment → 19,208 blocks of
///   16. (Cross-check: Qwen3-32B has 64 layers × 8 KV heads × 128 dims × K,V × 2 bytes =
///   256 KiB per token, 128 KiB per GPU at TP=2; 307,328 tokens = 37.5 GiB per GPU, what is
///   left of 80 GB × 0.9 after 32.8 GB of weights and activations.)
/// * `max_num_seqs` 256 and `max_num_batched_tokens` 8,192: vLLM's defaults for the
///   OpenAI server with chunked prefill as used by the guide; `max_model_len` 40,960 (model
///   config).
/// * `t0` = 15.8 ms: one decode step at batch 1 reads 32.8 GB of weights per GPU (≈ 12 ms at
///   ≈ 2.7 TB/s effective) plus 128 all-reduces and CPU/launch overhead. Calibrated so that a
///   single stream decodes at ≈ 16 ms/token, the low end of the guide's figures (rate-10
///   stage: ITL p1 15.7 ms, lightest request's TPOT 16.9 ms).
/// * `a_dattn` = 55 ns per KV token: 128 KiB per token per GPU read at ≈ 2.4 TB/s effective.
///   With `a_decode` = 60 µs this gives ≈ 22–23 ms per token at ~16–18 streams of 7.5k-token
///   contexts, the guide's moderate-load figure (rate-10 stage: mean TPOT 23.5 ms, ITL p50
///   23.1 ms, at ≈ 18 streams per replica token-weighted).
/// * `a_prefill` = 62 µs per token (≈ 53 % MFU: 65.5 GFLOP per token over 2 × 989 TFLOP/s) and
///   `a_pattn` = 2.0 ns per pair (4 · 64 layers · 64 heads · 128 = 2.1 MFLOP per pair at
///   ≈ 50 % MFU). With them a 7.5k-token prompt whose 6k-token prefix is cached reaches its
///   first token in ≈ 0.11 s (guide: 50–140 ms at low load), and a cold 7,200-token prompt in
///   ≈ 0.52 s — NVIDIA's published TTFT for the closest analog (Llama-3.3-70B FP8 on 2×H100,
///   TP2, NIM 1.8.0: 407 ms for 5,000 input tokens at concurrency 1, a similar FLOP/token and
///   bytes/token budget) scales to ≈ 0.56 s at 7,200 tokens.
/// * Frontend: 2 ms + 1.5 µs per prompt token (HTTP, fast tokenizer, API-server → engine-core
///   hop); the guide's fully cached prompts reach their first token in ≈ 50 ms through the
///   gateway.
///
/// Sources: llm-d `guides/inference-scheduling/README.md` benchmark reports (rate-10 stage of
/// the first published guide, rate-60 stage of the current one); NVIDIA NIM LLM benchmarking
/// guide, "Performance" page (Llama-3.3-70B-Instruct, 2×H100, FP8 TP2, 5000/500 tokens).
pub const QWEN3_32B_TP2_H100: Profile = Profile {
    name: "qwen3-32b-tp2-h100",
    model: "Qwen/Qwen3-32B",
    num_gpu_blocks: 19_208,
    block_size: 16,
    max_num_seqs: 256,
    max_num_batched_tokens: 8192,
    max_model_len: 40_960,
    step: StepTimeModel {
        overhead_s: 15.8e-3,
        prefill_per_token_s: 62e-6,
        prefill_attn_per_pair_s: 2.0e-9,
        decode_per_seq_s: 60e-6,
        decode_attn_per_token_s: 55e-9,
    },
    frontend: FrontendModel {
        overhead_s: 2e-3,
        per_prompt_token_s: 1.5e-6,
    },
    summary: "Qwen3-32B BF16, TP=2 on 2×H100: 307,328 KV tokens, ~16 ms/token alone, ~23 ms at 16 streams",
};

/// Llama-3.1-8B-Instruct (BF16) on one H100-80GB SXM.
///
/// * `t0` = 5.75 ms, `a_prefill` = 17.3 µs per token, `a_decode` = 6.0 µs per sequence: the
///   step-time coefficients (β0, β1, β2) that llm-d's BLIS simulator (inference-sim) fitted to
///   vLLM 0.8.4 on this model and GPU at TP=1 (`defaults.yaml`), with its frontend term (α0 =
///   0.23 ms, α1 = 1.75 µs per input token).
/// * KV cache: 29,205 blocks of 16 (467,280 tokens), the same BLIS entry; cross-check: 32
///   layers × 8 KV heads × 128 × 2 × 2 bytes = 128 KiB per token, ≈ 57 GB of KV.
/// * Attention terms from the roofline, as for the 32B profile: `a_dattn` = 55 ns per KV
///   token (128 KiB per token at ≈ 2.4 TB/s), `a_pattn` = 1.1 ns per pair (0.52 MFLOP per
///   pair at ≈ 50 % of 989 TFLOP/s). BLIS's linear model has no context-length term; these
///   add what long contexts cost.
/// * Resulting figures: ≈ 6 ms/token alone, ≈ 11 ms at 32 streams of 2k tokens, TTFT ≈ 25 ms
///   for a 1k-token prompt — inside llm-d-inference-sim's reference ranges for this class of
///   model (ITL 10–15 ms under load, TTFT 60–120 ms including queueing, prefill 0.15–0.30 ms
///   per token under load) at the loaded end, and near NVIDIA's single-stream NIM figures
///   (≈ 4.6 ms/token with TRT-LLM) at the idle end.
/// * `max_model_len` 131,072 (model config), `max_num_seqs` 256, `max_num_batched_tokens`
///   8,192.
pub const LLAMA31_8B_H100: Profile = Profile {
    name: "llama3.1-8b-h100",
    model: "meta-llama/Llama-3.1-8B-Instruct",
    num_gpu_blocks: 29_205,
    block_size: 16,
    max_num_seqs: 256,
    max_num_batched_tokens: 8192,
    max_model_len: 131_072,
    step: StepTimeModel {
        overhead_s: 5.75e-3,
        prefill_per_token_s: 17.3e-6,
        prefill_attn_per_pair_s: 1.1e-9,
        decode_per_seq_s: 6.0e-6,
        decode_attn_per_token_s: 55e-9,
    },
    frontend: FrontendModel {
        overhead_s: 0.23e-3,
        per_prompt_token_s: 1.75e-6,
    },
    summary: "Llama-3.1-8B BF16 on 1×H100: 467,280 KV tokens, ~6 ms/token alone (BLIS coefficients)",
};

/// All built-in profiles.
pub const PROFILES: &[Profile] = &[QWEN3_32B_TP2_H100, LLAMA31_8B_H100];

/// The default profile.
pub const DEFAULT_PROFILE: &str = "qwen3-32b-tp2-h100";

/// Looks a profile up by name.
pub fn profile(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// Names of all profiles, comma-separated.
pub fn profile_names() -> String {
    PROFILES
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_consistent() {
        for p in PROFILES {
            assert!(
                p.num_gpu_blocks * p.block_size >= p.max_model_len,
                "{}",
                p.name
            );
            assert!(p.max_num_batched_tokens >= p.max_num_seqs, "{}", p.name);
            assert!(profile(p.name).is_some());
        }
        assert_eq!(QWEN3_32B_TP2_H100.num_gpu_blocks * 16, 307_328);
        assert!(profile("nope").is_none());
    }

    #[test]
    fn step_time_adds_its_terms() {
        let m = StepTimeModel {
            overhead_s: 1.0,
            prefill_per_token_s: 2.0,
            prefill_attn_per_pair_s: 3.0,
            decode_per_seq_s: 4.0,
            decode_attn_per_token_s: 5.0,
        };
        let s = StepShape {
            prefill_tokens: 10,
            prefill_attn_pairs: 100.0,
            decode_seqs: 7,
            decode_kv_tokens: 1000,
        };
        assert_eq!(m.step_time(&s), 1.0 + 20.0 + 300.0 + 28.0 + 5000.0);
        assert_eq!(m.step_time(&StepShape::default()), 1.0);
    }

    #[test]
    fn the_32b_profile_lands_on_the_guide_figures() {
        // Sanity bounds, not the fidelity check (that is examples/fidelity.rs): one stream with
        // a 7.2k context decodes in 15-18 ms; 16 such streams in 20-25 ms.
        let m = QWEN3_32B_TP2_H100.step;
        let one = m.step_time(&StepShape {
            decode_seqs: 1,
            decode_kv_tokens: 7_200,
            ..Default::default()
        });
        let sixteen = m.step_time(&StepShape {
            decode_seqs: 16,
            decode_kv_tokens: 16 * 7_700,
            ..Default::default()
        });
        assert!((0.015..0.018).contains(&one), "{one}");
        assert!((0.020..0.025).contains(&sixteen), "{sixteen}");
    }
}
