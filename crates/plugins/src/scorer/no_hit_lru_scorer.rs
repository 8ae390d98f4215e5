//! `no-hit-lru-scorer`: spreads *cold* requests (no prefix-cache hit anywhere) over the
//! endpoints that least recently received a cold request, so new prefixes are distributed
//! instead of piling onto one endpoint.
//!
//! ## Formula
//!
//! A request is cold when no candidate holds any of its prefix according to the cycle's
//! [`PrefixCacheMatch`] (or when no prefix producer ran). For a warm request every candidate
//! scores 0.5 (neutral). For a cold one, with `n` candidates:
//!
//! ```text
//! n = 1:                 score = 1
//! never-used endpoints:  score = 1 − i / (n − 1)             i = 0, 1, … in candidate order
//! used endpoints:        score = max(0, 1 − (u + p) / (n − 1))
//! ```
//!
//! where `u` is the number of never-used candidates and `p` the endpoint's position in the
//! LRU of cold-request recipients, 0 = least recently used (positions count every endpoint
//! in the LRU, candidate or not, as in the reference).
//!
//! After the pick (pre-request), if the request was cold, the primary profile's first target
//! — and the `prefill` profile's first target when present — becomes the most recently used.
//! Coldness there is judged over all of the cycle's candidates (the reference judges it over
//! the candidates the scorer saw; they differ only when filters removed every endpoint with
//! a hit).
//!
//! ## Parameters
//!
//! * `lruSize` (integer, default `1024`): endpoints remembered; values ≤ 0 fall back to 1024.
//! * `prefixPluginType`, `prefixPluginName` (strings, default `prefix-cache-scorer`):
//!   accepted for compatibility. The match data is read from the cycle state, whichever
//!   plugin produced it.
//!
//! Category: distribution. Scoring reads an immutable snapshot (lock-free); the pre-request
//! hook of a cold request takes a mutex and publishes a new snapshot.

use std::sync::Arc;

use arc_swap::ArcSwap;
use llmsched_core::Plugin;
use llmsched_core::cycle::{CycleState, PrefixCacheMatch};
use llmsched_core::endpoint::EndpointId;
use llmsched_core::plugin::{Candidate, PreRequest, SchedulingContext, Scorer, ScorerCategory};
use llmsched_core::registry::{FactoryInput, PluginError};
use llmsched_core::request::InferenceRequest;
use llmsched_core::scheduler::SchedulingResult;
use parking_lot::Mutex;
use serde::Deserialize;

use crate::common::{impl_plugin, params};
use crate::prefix::{PREFILL_PROFILE, any_candidate_matched};

/// Type name.
pub const TYPE: &str = "no-hit-lru-scorer";

/// Default `lruSize`.
pub const DEFAULT_LRU_SIZE: usize = 1024;

/// Parameters.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct NoHitLruParams {
    /// Accepted for compatibility.
    pub prefix_plugin_type: String,
    /// Accepted for compatibility.
    pub prefix_plugin_name: String,
    /// Endpoints remembered (≤ 0: 1024).
    pub lru_size: i64,
}

/// Positions of the LRU, oldest first.
#[derive(Debug, Default)]
struct Snapshot {
    position: hashbrown::HashMap<EndpointId, u32>,
}

#[derive(Debug, Default)]
struct Recency {
    seq: u64,
    last: hashbrown::HashMap<EndpointId, u64>,
}

/// The no-hit LRU scorer.
#[derive(Debug)]
pub struct NoHitLruScorer {
    name: String,
    lru_size: usize,
    recency: Mutex<Recency>,
    snapshot: ArcSwap<Snapshot>,
}

impl NoHitLruScorer {
    /// A scorer remembering `lru_size` endpoints.
    pub fn new(name: impl Into<String>, lru_size: usize) -> Self {
        Self {
            name: name.into(),
            lru_size: lru_size.max(1),
            recency: Mutex::new(Recency::default()),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
        }
    }

    /// Marks `id` as the most recent recipient of a cold request.
    pub fn touch(&self, id: EndpointId) {
        let mut r = self.recency.lock();
        r.seq += 1;
        let seq = r.seq;
        r.last.insert(id, seq);
        if r.last.len() > self.lru_size
            && let Some((&oldest, _)) = r.last.iter().min_by_key(|(_, s)| **s)
        {
            r.last.remove(&oldest);
        }
        let mut order: Vec<(u64, EndpointId)> = r.last.iter().map(|(e, s)| (*s, *e)).collect();
        order.sort_unstable();
        let position = order
            .into_iter()
            .enumerate()
            .map(|(i, (_, e))| (e, u32::try_from(i).unwrap_or(u32::MAX)))
            .collect();
        self.snapshot.store(Arc::new(Snapshot { position }));
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let p: NoHitLruParams = params(i.parameters)?;
    let size = if p.lru_size > 0 {
        usize::try_from(p.lru_size).unwrap_or(DEFAULT_LRU_SIZE)
    } else {
        DEFAULT_LRU_SIZE
    };
    Ok(Arc::new(NoHitLruScorer::new(i.name, size)))
}

impl_plugin!(NoHitLruScorer, TYPE, as_scorer => Scorer, as_pre_request => PreRequest);

fn is_cold(cycle: &CycleState, candidates: &[Candidate<'_>]) -> bool {
    cycle
        .get::<PrefixCacheMatch>()
        .is_none_or(|m| !any_candidate_matched(m, candidates))
}

impl Scorer for NoHitLruScorer {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Distribution
    }

    fn score(&self, cx: &SchedulingContext<'_>, candidates: &[Candidate<'_>], scores: &mut [f64]) {
        if !is_cold(cx.cycle, candidates) {
            scores.fill(0.5);
            return;
        }
        let n = candidates.len();
        if n <= 1 {
            scores.fill(1.0);
            return;
        }
        let denom = (n - 1) as f64;
        let snap = self.snapshot.load();
        // First pass: never-used endpoints by candidate order; remember used ones' positions.
        let mut never_used = 0usize;
        for (s, c) in scores.iter_mut().zip(candidates) {
            match snap.position.get(&c.id()) {
                None => {
                    *s = 1.0 - never_used as f64 / denom;
                    never_used += 1;
                }
                // Marked negative until the number of never-used endpoints is known.
                Some(&p) => *s = -1.0 - f64::from(p),
            }
        }
        for s in scores.iter_mut() {
            if *s < 0.0 {
                let p = -1.0 - *s;
                *s = (1.0 - (never_used as f64 + p) / denom).max(0.0);
            }
        }
    }
}

impl PreRequest for NoHitLruScorer {
    fn pre_request(
        &self,
        _request: &InferenceRequest,
        cycle: &CycleState,
        result: &SchedulingResult,
        _headers_to_set: &mut Vec<(String, String)>,
    ) {
        if cycle
            .get::<PrefixCacheMatch>()
            .is_some_and(|m| !m.is_cold())
        {
            return;
        }
        if let Some(t) = result.targets().first() {
            self.touch(t.id());
        }
        if let Some(p) = result
            .profile(PREFILL_PROFILE)
            .and_then(|r| r.targets.first())
        {
            self.touch(p.id());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::scheduler::ProfileRunResult;

    fn result(primary: &Arc<llmsched_core::endpoint::Endpoint>) -> SchedulingResult {
        SchedulingResult {
            primary_profile: "default".into(),
            profiles: vec![(
                "default".into(),
                ProfileRunResult {
                    targets: vec![primary.clone()],
                },
            )],
        }
    }

    fn scorer() -> NoHitLruScorer {
        NoHitLruScorer::new(TYPE, DEFAULT_LRU_SIZE)
    }

    #[test]
    fn cold_request_without_history_ranks_by_candidate_order() {
        let s = scorer();
        let eps = [ep(1), ep(2), ep(3), ep(4), ep(5)];
        // n = 5: 1 − i/4.
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &eps),
            &[1.0, 0.75, 0.5, 0.25, 0.0],
        );
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &eps[..1]),
            &[1.0],
        );
    }

    #[test]
    fn recently_used_endpoints_rank_last_oldest_first() {
        let s = scorer();
        let eps = [ep(1), ep(2), ep(3), ep(4)];
        let cold = CycleState::new();
        // Cold requests went to 3, then 1 (1 is most recent).
        s.pre_request(&request("m"), &cold, &result(&eps[2]), &mut vec![]);
        s.pre_request(&request("m"), &cold, &result(&eps[0]), &mut vec![]);
        // Never used: 2, 4 → 1 − 0/3 = 1, 1 − 1/3. Used: 3 (pos 0) → 1 − (2+0)/3 = 1/3;
        // 1 (pos 1) → 1 − (2+1)/3 = 0.
        assert_close(
            &scores(&s, &request("m"), &cold, &eps),
            &[0.0, 1.0, 1.0 / 3.0, 2.0 / 3.0],
        );
    }

    #[test]
    fn positions_count_non_candidates_and_clamp_at_zero() {
        let s = scorer();
        let all: Vec<_> = (1..=5).map(ep).collect();
        for e in &all {
            s.touch(e.id());
        }
        // Candidates 4 and 5 only: positions 3 and 4; n = 2: 1 − 3/1 < 0 → 0.
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &all[3..]),
            &[0.0, 0.0],
        );
        // Candidates 1 and 2: positions 0 and 1 → 1 and 0.
        assert_close(
            &scores(&s, &request("m"), &CycleState::new(), &all[..2]),
            &[1.0, 0.0],
        );
    }

    #[test]
    fn warm_requests_are_neutral_and_not_recorded() {
        let s = scorer();
        let eps = [ep(1), ep(2)];
        let mut warm = CycleState::new();
        let mut m = PrefixCacheMatch {
            total_blocks: 4,
            block_size: 64,
            ..Default::default()
        };
        m.matched_blocks.insert(EndpointId(2), 3.0);
        warm.insert(m);
        assert_close(&scores(&s, &request("m"), &warm, &eps), &[0.5, 0.5]);
        s.pre_request(&request("m"), &warm, &result(&eps[0]), &mut vec![]);
        assert!(s.snapshot.load().position.is_empty());
        // A match that is not among the candidates does not warm the request up.
        assert_close(&scores(&s, &request("m"), &warm, &eps[..1]), &[1.0]);
        // An empty match (producer ran, nothing held) is cold.
        let mut empty = CycleState::new();
        empty.insert(PrefixCacheMatch {
            total_blocks: 4,
            block_size: 64,
            ..Default::default()
        });
        s.pre_request(&request("m"), &empty, &result(&eps[0]), &mut vec![]);
        assert_eq!(s.snapshot.load().position.get(&EndpointId(1)), Some(&0));
    }

    #[test]
    fn lru_size_bounds_memory() {
        let s = NoHitLruScorer::new(TYPE, 2);
        for i in 1..=3 {
            s.touch(EndpointId(i));
        }
        let snap = s.snapshot.load();
        assert_eq!(snap.position.len(), 2);
        assert_eq!(snap.position.get(&EndpointId(2)), Some(&0));
        assert_eq!(snap.position.get(&EndpointId(3)), Some(&1));
    }

    #[test]
    fn parameters() {
        assert!(build(TYPE, Some(serde_json::json!({"lruSize": 0, "prefixPluginName": "p", "prefixPluginType": "prefix-cache-scorer"}))).is_ok());
        assert!(build_err(TYPE, serde_json::json!({"lruSize": "big"})).contains("invalid type"));
        assert!(build_err(TYPE, serde_json::json!({"size": 3})).contains("unknown field"));
    }
}
