//! `prefill-load-scorer` (llmsched): prefers the endpoint that would reach this request's
//! first token soonest, counting the prefill work already queued there by this EPP and the
//! part of the prompt the endpoint would have to compute.
//!
//! ## Formula
//!
//! ```text
//! cost(e)  = pending(e) + uncached(e)
//! pending(e)  = Σ over this EPP's requests routed to e that have not produced their first
//!               token of the prompt tokens e had to compute for them (estimated when they
//!               were routed)
//! uncached(e) = prompt tokens − blocks of the prompt e holds × block size
//! score(e) = (min cost + 1) / (cost(e) + 1)                 min over the candidates
//! ```
//!
//! (1 for the cheapest candidate; an endpoint twice as far from this request's first token
//! scores about ½.) The ratio, unlike a min-max normalisation, does not turn a 2 % difference
//! into a full point: combined with `precise-prefix-cache-scorer` at a lower weight, a
//! follower of a prefix stays with the endpoint computing it unless that endpoint's queue
//! makes it markedly slower.
//!
//! A chunked-prefill engine spends most of a request's time to first token computing the
//! prompts ahead of it and then its own uncached part; queue lengths (`queue-scorer`) and
//! in-flight counts (`active-request-scorer`) weigh a 16k-token cold prompt and a 400-token
//! warm one alike, this scorer does not. Unlike `queue-scorer` it sees a request the moment
//! it is routed, not a metrics refresh later.
//!
//! ## Data
//!
//! Both terms come from `precise-prefix-cache-scorer` (which must be configured in the same
//! profile; it tracks the requests until their first token and knows what each endpoint
//! holds, from the engines' KV events and its speculative entries). Without its data (no
//! precise scorer, a prompt that could not be tokenized) every candidate scores 1.
//!
//! No parameters. Category: distribution.

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::plugin::{Candidate, SchedulingContext, Scorer, ScorerCategory};
use llmsched_core::registry::{FactoryInput, PluginError};

use super::NoParameters;
use super::precise_prefix_cache_scorer::PreciseState;
use crate::common::{impl_plugin, params};

/// Type name.
pub const TYPE: &str = "prefill-load-scorer";

/// The scorer.
#[derive(Debug)]
pub struct PrefillLoadScorer {
    name: String,
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(PrefillLoadScorer {
        name: i.name.to_string(),
    }))
}

impl_plugin!(PrefillLoadScorer, TYPE, as_scorer => Scorer);

/// `(min + 1) / (cost + 1)` per candidate (see the module docs).
pub fn prefill_load_scores(state: &PreciseState, candidates: &[Candidate<'_>], scores: &mut [f64]) {
    let mut min = f64::INFINITY;
    for (s, c) in scores.iter_mut().zip(candidates) {
        let ep = c.id().0;
        *s = (state.pending_prefill(ep) + state.uncached_tokens(ep)) as f64;
        min = min.min(*s);
    }
    for s in scores.iter_mut() {
        *s = (min + 1.0) / (*s + 1.0);
    }
}

impl Scorer for PrefillLoadScorer {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Distribution
    }

    fn score(&self, cx: &SchedulingContext<'_>, candidates: &[Candidate<'_>], scores: &mut [f64]) {
        match cx.cycle.get::<PreciseState>() {
            Some(st) if st.prompt_tokens > 0 => prefill_load_scores(st, candidates, scores),
            _ => scores.fill(1.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::cycle::CycleState;
    use llmsched_kvindex::PreciseMatch;

    #[test]
    fn cost_is_queued_prefill_plus_own_uncached_part_min_max_inverted() {
        let eps = [ep(1), ep(2), ep(3)];
        let mut st = PreciseState {
            prompt_tokens: 1000,
            block_size: 16,
            ..PreciseState::default()
        };
        // Endpoint 1 holds 50 blocks (800 tokens) but has 900 tokens queued: cost 1100.
        // Endpoint 2 holds nothing, nothing queued: cost 1000. Endpoint 3: 1000 + 500.
        st.matches.push(PreciseMatch {
            endpoint: 1,
            blocks: 50,
            weighted: 50.0,
        });
        st.pending_prefill.push((1, 900));
        st.pending_prefill.push((3, 500));
        let mut cycle = CycleState::new();
        cycle.insert(st.clone());
        let p = PrefillLoadScorer { name: TYPE.into() };
        assert!(build(TYPE, None).is_ok());
        let s = scores(&p, &request("m"), &cycle, &eps);
        assert_close(&s, &[1001.0 / 1101.0, 1.0, 1001.0 / 1501.0]);
        // Nothing queued: the holder is cheapest, the others 5 times as far.
        st.pending_prefill.clear();
        let mut cycle = CycleState::new();
        cycle.insert(st);
        assert_close(
            &scores(&p, &request("m"), &cycle, &eps),
            &[1.0, 201.0 / 1001.0, 201.0 / 1001.0],
        );
        // Without the precise scorer's data, no preference.
        let empty = CycleState::new();
        assert_close(&scores(&p, &request("m"), &empty, &eps), &[1.0, 1.0, 1.0]);
        assert!(build_err(TYPE, serde_json::json!({"x": 1})).contains("x"));
    }
}
