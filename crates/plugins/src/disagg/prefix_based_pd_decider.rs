//! `prefix-based-pd-decider`: disaggregate only when the part of the prompt the chosen decode
//! endpoint does not hold in its prefix cache is long enough to be worth a prefill hop.
//! Cached prompts (a conversation's next turn on the endpoint that served the last one)
//! skip the prefill endpoint.
//!
//! ## Rule
//!
//! ```text
//! nonCachedTokens = 0                         ⇒ no (the decider is off)
//! promptTokens > 0 and prompt < promptTokens  ⇒ no
//! prompt < nonCachedTokens                    ⇒ no
//! no prefix-cache match in the cycle          ⇒ no (logged: configure a prefix-cache plugin)
//! uncached = prompt − matched blocks(decode) × block tokens
//! yes ⇔ uncached ≥ nonCachedTokens
//! ```
//!
//! `prompt` is the prompt length in tokens as the prefix producer counted it: the precise
//! scorer's tokenizer, or the approximate producer's estimate (bytes / 4, the reference's
//! tokenizer-free `estimate`). Block tokens: the approximate producer's block characters / 4,
//! or the precise scorer's block size. The precise scorer's CPU-tier matches count 0.8 of a
//! block (llmsched keeps only the tier-weighted match), which can only overstate `uncached`.
//!
//! ## Parameters
//!
//! * `nonCachedTokens` (integer ≥ 0, default 0): uncached tokens from which to disaggregate;
//!   0 disables the decider (never disaggregates).
//! * `promptTokens` (integer ≥ 0, default 0): prompts shorter than this never disaggregate;
//!   0 = no such gate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use llmsched_core::Plugin;
use llmsched_core::cycle::PrefixCacheMatch;
use llmsched_core::endpoint::Endpoint;
use llmsched_core::plugin::{DisaggDecider, SchedulingContext};
use llmsched_core::registry::{FactoryInput, PluginError};
use serde::Deserialize;

use crate::common::{impl_plugin, params};
use crate::prefix::estimated_prompt_tokens;

/// Type name.
pub const TYPE: &str = "prefix-based-pd-decider";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct Params {
    non_cached_tokens: i64,
    prompt_tokens: i64,
}

/// The prefix-based P/D decider.
#[derive(Debug)]
pub struct PrefixBasedPdDecider {
    name: String,
    non_cached_tokens: u64,
    prompt_tokens: u64,
    warned: AtomicBool,
}

impl PrefixBasedPdDecider {
    /// A decider with the two thresholds.
    pub fn new(name: impl Into<String>, non_cached_tokens: u64, prompt_tokens: u64) -> Self {
        Self {
            name: name.into(),
            non_cached_tokens,
            prompt_tokens,
            warned: AtomicBool::new(false),
        }
    }

    /// The prompt's uncached tokens on `decode` (`None` without a prefix match).
    pub fn uncached_tokens(cx: &SchedulingContext<'_>, decode: &Endpoint) -> Option<f64> {
        let m = cx.cycle.get::<PrefixCacheMatch>()?;
        let prompt = prompt_tokens(cx, Some(m));
        Some((prompt as f64 - m.cached_tokens(decode.id())).max(0.0))
    }
}

fn prompt_tokens(cx: &SchedulingContext<'_>, m: Option<&PrefixCacheMatch>) -> u64 {
    m.map(|m| m.prompt_tokens)
        .filter(|&n| n > 0)
        .unwrap_or_else(|| estimated_prompt_tokens(cx.request))
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let p: Params = params(i.parameters)?;
    if p.non_cached_tokens < 0 {
        return Err(PluginError::Parameters(
            "nonCachedTokens parameter of prefix disaggregation decider cannot be negative".into(),
        ));
    }
    if p.prompt_tokens < 0 {
        return Err(PluginError::Parameters(
            "promptTokens parameter of prefix disaggregation decider cannot be negative".into(),
        ));
    }
    if p.non_cached_tokens == 0 {
        tracing::info!(
            decider = i.name,
            "prefix-based P/D disabled (nonCachedTokens=0)"
        );
    }
    Ok(Arc::new(PrefixBasedPdDecider::new(
        i.name,
        p.non_cached_tokens.unsigned_abs(),
        p.prompt_tokens.unsigned_abs(),
    )))
}

impl_plugin!(PrefixBasedPdDecider, TYPE, as_disagg_decider => DisaggDecider);

impl DisaggDecider for PrefixBasedPdDecider {
    fn disaggregate(&self, cx: &SchedulingContext<'_>, decode: &Endpoint) -> bool {
        if self.non_cached_tokens == 0 {
            return false;
        }
        let m = cx.cycle.get::<PrefixCacheMatch>();
        let prompt = prompt_tokens(cx, m);
        if self.prompt_tokens > 0 && prompt < self.prompt_tokens {
            return false;
        }
        if prompt < self.non_cached_tokens {
            return false;
        }
        let Some(m) = m else {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    decider = %self.name,
                    "prefix-based P/D decider: no prefix-cache match for this request (configure prefix-cache-scorer, approx-prefix-cache-producer or precise-prefix-cache-scorer); not disaggregating"
                );
            }
            return false;
        };
        let uncached = (prompt as f64 - m.cached_tokens(decode.id())).max(0.0);
        uncached >= self.non_cached_tokens as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::cycle::CycleState;
    use llmsched_core::endpoint::EndpointId;
    use std::time::Instant;

    fn decide(d: &PrefixBasedPdDecider, cycle: &CycleState, prompt_bytes: usize) -> bool {
        let mut req = request("m");
        req.body = Some(llmsched_core::request::RequestBody {
            prompt: llmsched_core::request::Prompt::Text("x".repeat(prompt_bytes)),
            ..llmsched_core::request::RequestBody::raw(bytes::Bytes::new())
        });
        let cx = SchedulingContext {
            request: &req,
            cycle,
            now: Instant::now(),
        };
        d.disaggregate(&cx, &ep(1))
    }

    fn matched(prompt_tokens: u64, blocks: f64, block_tokens: f64) -> CycleState {
        let mut c = CycleState::new();
        let mut m = PrefixCacheMatch {
            total_blocks: 100,
            block_size: 64,
            prompt_tokens,
            block_tokens,
            ..Default::default()
        };
        m.matched_blocks.insert(EndpointId(1), blocks);
        m.matched_blocks.insert(EndpointId(2), 99.0);
        c.insert(m);
        c
    }

    #[test]
    fn uncached_part_against_the_threshold() {
        let d = PrefixBasedPdDecider::new(TYPE, 256, 0);
        // 1000 tokens, 40 blocks × 16 tokens = 640 cached on the decode pick: 360 ≥ 256.
        assert!(decide(&d, &matched(1000, 40.0, 16.0), 0));
        // 50 blocks: 200 uncached < 256 — the cached prompt stays local.
        assert!(!decide(&d, &matched(1000, 50.0, 16.0), 0));
        // Exactly at the threshold: 1000 − 46.5×16 = 256 ⇒ yes.
        assert!(decide(&d, &matched(1000, 46.5, 16.0), 0));
        // Another endpoint's cache does not count (endpoint 2 holds 99 blocks).
        assert!(decide(&d, &matched(1000, 0.0, 16.0), 0));
        // Short prompt: below nonCachedTokens.
        assert!(!decide(&d, &matched(255, 0.0, 16.0), 0));
        // No prompt count from the producer: bytes / 4 (2000 bytes = 500 tokens, 0 cached).
        assert!(decide(&d, &matched(0, 0.0, 16.0), 2000));
        assert!(!decide(&d, &matched(0, 0.0, 16.0), 1000));
    }

    #[test]
    fn off_prompt_gate_and_missing_prefix_state() {
        assert!(!decide(
            &PrefixBasedPdDecider::new(TYPE, 0, 0),
            &matched(10_000, 0.0, 16.0),
            0
        ));
        let gated = PrefixBasedPdDecider::new(TYPE, 16, 2048);
        assert!(!decide(&gated, &matched(2047, 0.0, 16.0), 0));
        assert!(decide(&gated, &matched(2048, 0.0, 16.0), 0));
        // No prefix plugin ran: never disaggregate.
        let d = PrefixBasedPdDecider::new(TYPE, 16, 0);
        assert!(!decide(&d, &CycleState::new(), 100_000));
    }

    #[test]
    fn parameters() {
        assert!(build(TYPE, None).is_ok());
        assert!(
            build(
                TYPE,
                Some(serde_json::json!({"nonCachedTokens": 16, "promptTokens": 1024}))
            )
            .is_ok()
        );
        assert!(
            build_err(TYPE, serde_json::json!({"nonCachedTokens": -1}))
                .contains("cannot be negative")
        );
        assert!(build_err(TYPE, serde_json::json!({"promptTokens": -1})).contains("promptTokens"));
        assert!(build_err(TYPE, serde_json::json!({"threshold": 1})).contains("unknown field"));
        assert!(
            build_err(TYPE, serde_json::json!({"nonCachedTokens": "many"}))
                .contains("invalid type")
        );
    }
}
