//! `prefix-cache-scorer` (approximate): prefers endpoints believed to hold the longest
//! prefix of the prompt in their KV cache.
//!
//! ## Formula
//!
//! ```text
//! score(e) = matched(e) / total
//! ```
//!
//! `total` = blocks the prompt was split into (at most `maxPrefixBlocksToMatch`),
//! `matched(e)` = consecutive leading blocks endpoint `e` holds, both read from the cycle's
//! [`PrefixCacheMatch`]; 0 when there is no prompt text, no match or no producer ran.
//!
//! ## Hashing, index, recording
//!
//! The scorer carries the approximate prefix cache of [`crate::prefix`] (chained xxh64 block
//! hashes of the prompt, a sharded per-endpoint-LRU index, record after the pick, purge on
//! departure), so the configurations the reference's seed guide deploys work as written:
//!
//! ```yaml
//! - type: prefix-cache-scorer
//!   parameters: { blockSize: 64, maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 31250 }
//! ```
//!
//! When an `approx-prefix-cache-producer` is configured too (the newer reference's split),
//! the producer's data wins: the scorer sees the producer's state in the cycle, stops hashing
//! and recording itself, and only scores.
//!
//! ## Parameters
//!
//! `autoTune` (default `true`), `blockSizeTokens` (16), `blockSize` (deprecated, characters;
//! its older name `hashBlockSize` is accepted too, as 2025 P/D configurations write it),
//! `maxPrefixBlocksToMatch` (256), `maxPrefixTokensToMatch` (0 = off),
//! `lruCapacityPerServer` (31250): see [`crate::prefix`] for their exact meaning.
//!
//! With the decision log on (see [`crate::prefix::decisions`]), each request's belief and
//! the engine's reported cached tokens are logged when its response completes.
//!
//! Category: affinity. Scoring is lock-free; the producer step takes the index's shard read
//! locks, one per block looked up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use llmsched_core::Plugin;
use llmsched_core::cycle::{CycleState, PrefixCacheMatch};
use llmsched_core::endpoint::Endpoint;
use llmsched_core::endpoint::EndpointId;
use llmsched_core::plugin::{
    Candidate, DataProducer, EndpointListener, PreRequest, ResponseHooks, SchedulingContext,
    Scorer, ScorerCategory,
};
use llmsched_core::registry::{FactoryInput, PluginError};
use llmsched_core::request::{InferenceRequest, ResponseInfo};
use llmsched_core::scheduler::SchedulingResult;

use crate::common::impl_plugin;
use crate::prefix::decisions::{self, Decision, DecisionLog};
use crate::prefix::hashing::AVERAGE_CHARS_PER_TOKEN;
use crate::prefix::{ApproxPrefixCache, ApproxPrefixState, with_positions};

/// Type name.
pub const TYPE: &str = "prefix-cache-scorer";

/// The approximate prefix-cache scorer.
#[derive(Debug)]
pub struct PrefixCacheScorer {
    name: String,
    cache: ApproxPrefixCache,
    /// Set once another producer's state has been seen: from then on, only score.
    deferred: AtomicBool,
    decisions: DecisionLog,
}

impl PrefixCacheScorer {
    /// A scorer around `cache`.
    pub fn new(name: impl Into<String>, cache: ApproxPrefixCache) -> Self {
        Self {
            name: name.into(),
            cache,
            deferred: AtomicBool::new(false),
            decisions: DecisionLog::new(TYPE),
        }
    }

    /// The scorer's own prefix cache.
    pub fn cache(&self) -> &ApproxPrefixCache {
        &self.cache
    }

    fn defer(&self) {
        if !self.deferred.swap(true, Ordering::Relaxed) {
            tracing::info!(scorer = %self.name, "prefix-cache-scorer: another prefix producer is configured; scoring its data (this scorer's own hashing and index are unused)");
        }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let renamed = legacy_hash_block_size(i.parameters);
    let i = FactoryInput {
        parameters: renamed.as_ref().or(i.parameters),
        ..i
    };
    let cache = ApproxPrefixCache::from_input(&i)?;
    Ok(Arc::new(PrefixCacheScorer::new(i.name, cache)))
}

/// `hashBlockSize`, the scorer's block-size parameter until GIE renamed it `blockSize`
/// (2025-09), as P/D configurations of 2025 still write it: the parameters with it renamed
/// (`blockSize` wins when both are given), or `None` when it is absent.
fn legacy_hash_block_size(parameters: Option<&serde_json::Value>) -> Option<serde_json::Value> {
    let obj = parameters?.as_object()?;
    let v = obj.get("hashBlockSize")?;
    let mut out = obj.clone();
    out.remove("hashBlockSize");
    if !out.contains_key("blockSize") {
        tracing::warn!(
            "prefix-cache-scorer: 'hashBlockSize' is the old name of 'blockSize'; prefer 'blockSizeTokens'"
        );
        out.insert("blockSize".into(), v.clone());
    }
    Some(serde_json::Value::Object(out))
}

impl_plugin!(
    PrefixCacheScorer,
    TYPE,
    as_scorer => Scorer,
    as_data_producer => DataProducer,
    as_pre_request => PreRequest,
    as_response_hooks => ResponseHooks,
    as_endpoint_listener => EndpointListener,
    as_replicated => ReplicatedState,
);

crate::prefix::replicated_via_cache!(PrefixCacheScorer);

impl Scorer for PrefixCacheScorer {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Affinity
    }

    fn score(&self, cx: &SchedulingContext<'_>, candidates: &[Candidate<'_>], scores: &mut [f64]) {
        // Deferred to a producer that is no longer there (a configuration reload dropped it
        // and carried this scorer over): hash and record again from the next request.
        if self.deferred.load(Ordering::Relaxed) && cx.cycle.get::<ApproxPrefixState>().is_none() {
            self.deferred.store(false, Ordering::Relaxed);
            tracing::info!(scorer = %self.name, "prefix-cache-scorer: no other prefix producer ran; hashing and recording again");
        }
        score_prefix_match(cx.cycle, candidates, scores);
    }
}

/// `matched / total` per candidate from the cycle's [`PrefixCacheMatch`] (0 without one).
pub(crate) fn score_prefix_match(
    cycle: &CycleState,
    candidates: &[Candidate<'_>],
    scores: &mut [f64],
) {
    scores.fill(0.0);
    let Some(m) = cycle.get::<PrefixCacheMatch>() else {
        return;
    };
    if m.total_blocks == 0 || m.matched_blocks.is_empty() {
        return;
    }
    let total = f64::from(m.total_blocks);
    if m.matched_blocks.len() * candidates.len() <= 256 {
        for (id, &n) in &m.matched_blocks {
            for (s, c) in scores.iter_mut().zip(candidates) {
                if c.id() == *id {
                    *s = (n / total).clamp(0.0, 1.0);
                }
            }
        }
    } else {
        // Place the matches by candidate position: no hashing per candidate.
        with_positions(candidates, |pos| {
            for (id, &n) in &m.matched_blocks {
                if let Some(i) = pos.get(*id) {
                    scores[i] = (n / total).clamp(0.0, 1.0);
                }
            }
        });
    }
}

impl DataProducer for PrefixCacheScorer {
    fn produce(
        &self,
        request: &InferenceRequest,
        cycle: &mut CycleState,
        candidates: &[Candidate<'_>],
    ) {
        if self.deferred.load(Ordering::Relaxed) {
            return;
        }
        if let Some(s) = cycle.get::<ApproxPrefixState>()
            && s.owner != self.cache.id()
        {
            self.defer();
            return;
        }
        self.cache.produce(request, cycle, candidates);
    }
}

impl PreRequest for PrefixCacheScorer {
    fn pre_request(
        &self,
        request: &InferenceRequest,
        cycle: &CycleState,
        result: &SchedulingResult,
        _headers_to_set: &mut Vec<(String, String)>,
    ) {
        match cycle.get::<ApproxPrefixState>() {
            Some(s) if s.owner != self.cache.id() => self.defer(),
            _ => self.cache.observe(cycle, result),
        }
        if decisions::enabled()
            && let Some(s) = cycle.get::<ApproxPrefixState>()
            && let Some(t) = result.targets().first()
        {
            let names = self.cache.endpoint_set();
            self.decisions.record(
                &request.request_id,
                Decision::from_matches(
                    t,
                    s.matches.iter().map(|&(e, n)| (e, f64::from(n))),
                    s.hashes.len(),
                    s.block_chars as f64 / AVERAGE_CHARS_PER_TOKEN as f64,
                    names.as_deref(),
                ),
            );
        }
    }

    fn after_dispatch(
        &self,
        _request: &InferenceRequest,
        cycle: &CycleState,
        result: &SchedulingResult,
    ) {
        // Records nothing when another instance produced the state (`own_state`).
        self.cache.insert(cycle, result);
    }
}

impl ResponseHooks for PrefixCacheScorer {
    fn response_complete(
        &self,
        request: &InferenceRequest,
        response: &ResponseInfo,
        target: &Endpoint,
    ) {
        if self.decisions.open() > 0 {
            self.decisions.complete(request, response, target);
        }
    }
}

impl EndpointListener for PrefixCacheScorer {
    fn endpoint_removed(&self, id: EndpointId) {
        self.cache.purge(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use bytes::Bytes;
    use llmsched_core::request::{Prompt, RequestBody};
    use llmsched_core::scheduler::ProfileRunResult;
    use std::sync::Arc as StdArc;

    fn chat_request(text: &str) -> InferenceRequest {
        let mut r = request("llama");
        r.body = Some(RequestBody {
            prompt: Prompt::Text(text.to_string()),
            ..RequestBody::raw(Bytes::new())
        });
        r
    }

    fn result_for(e: &StdArc<llmsched_core::endpoint::Endpoint>) -> SchedulingResult {
        SchedulingResult {
            primary_profile: "default".into(),
            profiles: vec![(
                "default".into(),
                ProfileRunResult {
                    targets: vec![e.clone()],
                },
            )],
        }
    }

    fn scorer(params: Option<serde_json::Value>) -> StdArc<dyn Plugin> {
        build(TYPE, params).unwrap()
    }

    fn run_cycle(
        p: &StdArc<dyn Plugin>,
        req: &InferenceRequest,
        eps: &[StdArc<llmsched_core::endpoint::Endpoint>],
    ) -> (CycleState, Vec<f64>) {
        let cands: Vec<Candidate<'_>> = eps.iter().collect();
        let mut cycle = CycleState::new();
        p.clone()
            .as_data_producer()
            .unwrap()
            .produce(req, &mut cycle, &cands);
        let s = scores(p.clone().as_scorer().unwrap().as_ref(), req, &cycle, eps);
        (cycle, s)
    }

    /// Deferring to a producer, then the producer goes away (a reload dropped it and carried
    /// this scorer over): the scorer hashes and records by itself again.
    #[test]
    fn deferral_ends_when_the_producer_is_gone() {
        let p = scorer(Some(serde_json::json!({"blockSize": 4, "autoTune": false})));
        let producer = build(
            crate::producer::approx_prefix_cache_producer::TYPE,
            Some(serde_json::json!({"blockSizeTokens": 1, "autoTune": false})),
        )
        .unwrap();
        let eps = [ep(1)];
        let req = chat_request("aaaabbbb");
        let cands: Vec<Candidate<'_>> = eps.iter().collect();
        // With the producer: its state is in the cycle, the scorer defers.
        let mut cycle = CycleState::new();
        producer
            .clone()
            .as_data_producer()
            .unwrap()
            .produce(&req, &mut cycle, &cands);
        p.clone()
            .as_data_producer()
            .unwrap()
            .produce(&req, &mut cycle, &cands);
        scores(p.clone().as_scorer().unwrap().as_ref(), &req, &cycle, &eps);
        let (cycle, _) = run_cycle(&p, &req, &eps);
        assert!(
            cycle.get::<ApproxPrefixState>().is_none(),
            "deferred: no state of its own"
        );
        // Without it: the next request is hashed and recorded by the scorer again.
        let (cycle, _) = run_cycle(&p, &req, &eps);
        dispatch(&p, &req, &cycle, &result_for(&eps[0]));
        assert_close(&run_cycle(&p, &req, &eps).1, &[1.0]);
    }

    #[test]
    fn the_old_hash_block_size_name_is_block_size() {
        let renamed = |v: serde_json::Value| legacy_hash_block_size(Some(&v));
        assert_eq!(
            renamed(serde_json::json!({"hashBlockSize": 5, "lruCapacityPerServer": 9})),
            Some(serde_json::json!({"blockSize": 5, "lruCapacityPerServer": 9}))
        );
        assert_eq!(
            renamed(serde_json::json!({"hashBlockSize": 5, "blockSize": 7})),
            Some(serde_json::json!({"blockSize": 7}))
        );
        assert_eq!(renamed(serde_json::json!({"blockSize": 7})), None);
        assert!(build(TYPE, Some(serde_json::json!({"hashBlockSize": 5}))).is_ok());
        assert!(
            build_err(TYPE, serde_json::json!({"hashBlockSize": 0}))
                .contains("blockSize must be > 0")
        );
    }

    #[test]
    fn score_is_matched_over_total() {
        let p = scorer(Some(serde_json::json!({"blockSize": 4, "autoTune": false})));
        let eps = [ep(1), ep(2), ep(3)];
        // 16 chars of 4-char blocks = 4 blocks.
        let first = chat_request("aaaabbbbccccdddd");
        let (cycle, s) = run_cycle(&p, &first, &eps);
        assert_close(&s, &[0.0, 0.0, 0.0]);
        dispatch(&p, &first, &cycle, &result_for(&eps[1]));
        // Same first 3 blocks, different 4th and a 5th: endpoint 2 holds 3 of 5.
        let second = chat_request("aaaabbbbccccxxxxyyyy");
        let (cycle, s) = run_cycle(&p, &second, &eps);
        assert_close(&s, &[0.0, 0.6, 0.0]);
        dispatch(&p, &second, &cycle, &result_for(&eps[0]));
        // Endpoint 1 now holds all 5; endpoint 2 still 3; a 2-char tail adds a 6th block.
        let third = chat_request("aaaabbbbccccxxxxyyyyzz");
        let (_, s) = run_cycle(&p, &third, &eps);
        assert_close(&s, &[5.0 / 6.0, 0.5, 0.0]);
    }

    #[test]
    fn model_and_salt_isolate_prefixes() {
        let p = scorer(Some(serde_json::json!({"blockSize": 4})));
        let eps = [ep(1)];
        let req = chat_request("aaaabbbb");
        let (cycle, _) = run_cycle(&p, &req, &eps);
        dispatch(&p, &req, &cycle, &result_for(&eps[0]));
        let mut other_model = chat_request("aaaabbbb");
        other_model.target_model = "mistral".into();
        assert_close(&run_cycle(&p, &other_model, &eps).1, &[0.0]);
        let mut salted = chat_request("aaaabbbb");
        if let Some(b) = salted.body.as_mut() {
            b.cache_salt = Some("tenant-a".into());
        }
        assert_close(&run_cycle(&p, &salted, &eps).1, &[0.0]);
        assert_close(&run_cycle(&p, &req, &eps).1, &[1.0]);
    }

    #[test]
    fn no_prompt_text_scores_zero_and_reports_zero_blocks() {
        let p = scorer(None);
        let eps = [ep(1)];
        let (cycle, s) = run_cycle(&p, &request("m"), &eps);
        assert_close(&s, &[0.0]);
        let m = cycle.get::<PrefixCacheMatch>().unwrap();
        assert_eq!(m.total_blocks, 0);
        // Token-id prompts have no text either.
        let mut tok = request("m");
        tok.body = Some(RequestBody {
            prompt: Prompt::TokenIds(vec![1, 2, 3]),
            ..RequestBody::raw(Bytes::new())
        });
        assert_close(&run_cycle(&p, &tok, &eps).1, &[0.0]);
    }

    #[test]
    fn scores_without_producer_data_are_zero() {
        let p = scorer(None);
        let eps = [ep(1), ep(2)];
        let s = scores(
            p.clone().as_scorer().unwrap().as_ref(),
            &request("m"),
            &CycleState::new(),
            &eps,
        );
        assert_close(&s, &[0.0, 0.0]);
    }

    #[test]
    fn many_matching_endpoints_dense_and_sparse_ids() {
        // 30 × 30 > 256: placement by candidate position; the last set adds an id far above
        // the others, which switches to the sparse (hashed) positions.
        for extra in [None, Some(5_000_000u32)] {
            let mut eps: Vec<_> = (0..30).map(ep).collect();
            if let Some(id) = extra {
                eps.push(ep(id));
            }
            let mut m = PrefixCacheMatch {
                total_blocks: 10,
                block_size: 64,
                ..Default::default()
            };
            for e in &eps {
                m.matched_blocks.insert(e.id(), f64::from(e.id().0 % 11));
            }
            // A match for a non-candidate is ignored.
            m.matched_blocks.insert(EndpointId(31), 10.0);
            let mut cycle = CycleState::new();
            cycle.insert(m);
            let p = scorer(None);
            let s = scores(p.as_scorer().unwrap().as_ref(), &request("m"), &cycle, &eps);
            let want: Vec<f64> = eps
                .iter()
                .map(|e| f64::from(e.id().0 % 11) / 10.0)
                .collect();
            assert_close(&s, &want);
        }
    }

    #[test]
    fn the_index_is_updated_after_dispatch_not_in_pre_request() {
        let p = scorer(Some(serde_json::json!({"blockSize": 4})));
        let eps = [ep(1)];
        let req = chat_request("aaaabbbb");
        let (cycle, _) = run_cycle(&p, &req, &eps);
        let hook = p.clone().as_pre_request().unwrap();
        hook.pre_request(&req, &cycle, &result_for(&eps[0]), &mut vec![]);
        assert_close(&run_cycle(&p, &req, &eps).1, &[0.0]);
        hook.after_dispatch(&req, &cycle, &result_for(&eps[0]));
        assert_close(&run_cycle(&p, &req, &eps).1, &[1.0]);
    }

    #[test]
    fn departed_endpoints_are_purged() {
        let p = scorer(Some(serde_json::json!({"blockSize": 4})));
        let eps = [ep(1)];
        let req = chat_request("aaaabbbb");
        let (cycle, _) = run_cycle(&p, &req, &eps);
        dispatch(&p, &req, &cycle, &result_for(&eps[0]));
        assert_close(&run_cycle(&p, &req, &eps).1, &[1.0]);
        p.clone()
            .as_endpoint_listener()
            .unwrap()
            .endpoint_removed(EndpointId(1));
        assert_close(&run_cycle(&p, &req, &eps).1, &[0.0]);
    }

    #[test]
    fn replicas_share_routed_blocks_through_deltas_and_snapshots() {
        use llmsched_core::replica::RemoteDelta;
        let params = serde_json::json!({"blockSize": 4});
        let a = scorer(Some(params.clone()));
        let b = scorer(Some(params.clone()));
        let eps = [ep(1), ep(2)];
        let ra = a.clone().as_replicated().unwrap();
        let rb = b.clone().as_replicated().unwrap();
        assert_eq!(ra.replica_kind(), "approx-prefix");
        // Nothing is recorded before recording starts.
        let req = chat_request("aaaabbbbcccc");
        let (cycle, _) = run_cycle(&a, &req, &eps);
        dispatch(&a, &req, &cycle, &result_for(&eps[1]));
        let mut out = Vec::new();
        assert_eq!(ra.drain_local(&mut out, 100), 0);
        // Recording: the next decision is a delta naming endpoint 2 and the prompt's blocks.
        ra.start_recording(2);
        let req2 = chat_request("xxxxyyyy");
        let (cycle, _) = run_cycle(&a, &req2, &eps);
        dispatch(&a, &req2, &cycle, &result_for(&eps[1]));
        assert_eq!(ra.drain_local(&mut out, 100), 1);
        assert_eq!(out[0].endpoint, EndpointId(2));
        assert_eq!(out[0].keys.len(), 2);
        // Replica b applies it (endpoint resolved by the sync layer) and scores as a would.
        let remote: Vec<RemoteDelta<'_>> = out
            .iter()
            .map(|d| RemoteDelta {
                op: d.op,
                endpoint: &eps[1],
                keys: &d.keys,
                ttl: d.ttl,
            })
            .collect();
        assert_eq!(rb.apply_remote(&remote), 2);
        assert_close(&run_cycle(&b, &req2, &eps).1, &[0.0, 1.0]);
        // Applying twice changes nothing (idempotent).
        rb.apply_remote(&remote);
        assert_close(&run_cycle(&b, &req2, &eps).1, &[0.0, 1.0]);
        // The earlier, unrecorded decision reaches b through a's snapshot.
        assert_close(&run_cycle(&b, &req, &eps).1, &[0.0, 0.0]);
        let mut snap = Vec::new();
        ra.snapshot(&mut snap, 1000);
        assert_eq!(snap.iter().map(|d| d.keys.len()).sum::<usize>(), 5);
        let remote: Vec<RemoteDelta<'_>> = snap
            .iter()
            .map(|d| RemoteDelta {
                op: d.op,
                endpoint: eps.iter().find(|e| e.id() == d.endpoint).unwrap(),
                keys: &d.keys,
                ttl: d.ttl,
            })
            .collect();
        rb.apply_remote(&remote);
        assert_close(&run_cycle(&b, &req, &eps).1, &[0.0, 1.0]);
        // A full buffer drops and counts.
        for _ in 0..3 {
            let (cycle, _) = run_cycle(&a, &req2, &eps);
            dispatch(&a, &req2, &cycle, &result_for(&eps[0]));
        }
        assert_eq!(ra.dropped_local(), 1);
    }

    #[test]
    fn records_primary_and_prefill_targets_and_metrics() {
        let handle = llmsched_core::registry::PluginHandle::default();
        let p = build_with(TYPE, Some(serde_json::json!({"blockSize": 4})), &handle).unwrap();
        let eps = [ep(1), ep(2), ep(3)];
        let req = chat_request("aaaabbbbcccc");
        let (cycle, _) = run_cycle(&p, &req, &eps);
        let result = SchedulingResult {
            primary_profile: "decode".into(),
            profiles: vec![
                (
                    "decode".into(),
                    ProfileRunResult {
                        targets: vec![eps[0].clone(), eps[2].clone()],
                    },
                ),
                (
                    "prefill".into(),
                    ProfileRunResult {
                        targets: vec![eps[1].clone()],
                    },
                ),
            ],
        };
        dispatch(&p, &req, &cycle, &result);
        // Primary first target and the prefill target hold it; the fallback does not.
        assert_close(&run_cycle(&p, &req, &eps).1, &[1.0, 1.0, 0.0]);
        assert_eq!(handle.metrics.prefix.size.get(), 6);
        assert!(handle.metrics.prefix.memory_bytes.get() > 0);
    }
}
