//! `approx-prefix-cache-producer`: the data-producing half of the approximate prefix cache,
//! as the newer reference configures it next to a parameterless `prefix-cache-scorer`.
//!
//! ## What it produces
//!
//! Before scheduling, the prompt's chained block hashes and, for every candidate that holds
//! a prefix of them, the number of consecutive leading blocks it holds
//! ([`llmsched_core::PrefixCacheMatch`]: `total_blocks`, `block_size` in characters,
//! `matched_blocks`). After the pick it records the hashes for the chosen endpoint (and the
//! `prefill` profile's endpoint), and it purges departed endpoints. Consumers:
//! `prefix-cache-scorer` (score = matched / total) and `no-hit-lru-scorer` (cold requests).
//!
//! When both this producer and a `prefix-cache-scorer` are configured, this producer owns the
//! hashing and the index; the scorer defers to it.
//!
//! ## Parameters
//!
//! `autoTune` (default `true`), `blockSizeTokens` (16), `blockSize` (deprecated, characters),
//! `maxPrefixBlocksToMatch` (256), `maxPrefixTokensToMatch` (0 = off),
//! `lruCapacityPerServer` (31250): see [`crate::prefix`].

use std::sync::Arc;

use llmsched_core::Plugin;
use llmsched_core::cycle::CycleState;
use llmsched_core::endpoint::EndpointId;
use llmsched_core::plugin::{Candidate, DataProducer, EndpointListener, PreRequest};
use llmsched_core::registry::{FactoryInput, PluginError};
use llmsched_core::request::InferenceRequest;
use llmsched_core::scheduler::SchedulingResult;

use crate::common::impl_plugin;
use crate::prefix::ApproxPrefixCache;

/// Type name.
pub const TYPE: &str = "approx-prefix-cache-producer";

/// The approximate prefix-cache producer.
#[derive(Debug)]
pub struct ApproxPrefixCacheProducer {
    name: String,
    cache: ApproxPrefixCache,
}

impl ApproxPrefixCacheProducer {
    /// A producer around `cache`.
    pub fn new(name: impl Into<String>, cache: ApproxPrefixCache) -> Self {
        Self {
            name: name.into(),
            cache,
        }
    }

    /// The prefix cache.
    pub fn cache(&self) -> &ApproxPrefixCache {
        &self.cache
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let cache = ApproxPrefixCache::from_input(&i)?;
    Ok(Arc::new(ApproxPrefixCacheProducer::new(i.name, cache)))
}

impl_plugin!(
    ApproxPrefixCacheProducer,
    TYPE,
    as_data_producer => DataProducer,
    as_pre_request => PreRequest,
    as_endpoint_listener => EndpointListener,
    as_replicated => ReplicatedState,
);

crate::prefix::replicated_via_cache!(ApproxPrefixCacheProducer);

impl DataProducer for ApproxPrefixCacheProducer {
    fn produce(
        &self,
        request: &InferenceRequest,
        cycle: &mut CycleState,
        candidates: &[Candidate<'_>],
    ) {
        self.cache.produce(request, cycle, candidates);
    }
}

impl PreRequest for ApproxPrefixCacheProducer {
    fn pre_request(
        &self,
        _request: &InferenceRequest,
        cycle: &CycleState,
        result: &SchedulingResult,
        _headers_to_set: &mut Vec<(String, String)>,
    ) {
        self.cache.observe(cycle, result);
    }

    fn after_dispatch(
        &self,
        _request: &InferenceRequest,
        cycle: &CycleState,
        result: &SchedulingResult,
    ) {
        self.cache.insert(cycle, result);
    }
}

impl EndpointListener for ApproxPrefixCacheProducer {
    fn endpoint_removed(&self, id: EndpointId) {
        self.cache.purge(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use bytes::Bytes;
    use llmsched_core::cycle::PrefixCacheMatch;
    use llmsched_core::request::{Prompt, RequestBody};
    use llmsched_core::scheduler::ProfileRunResult;

    fn req(text: &str) -> InferenceRequest {
        let mut r = request("m");
        r.body = Some(RequestBody {
            prompt: Prompt::Text(text.into()),
            ..RequestBody::raw(Bytes::new())
        });
        r
    }

    /// Runs the declared producers in order, scores with the scorer, records with all.
    fn cycle_with(
        producers: &[Arc<dyn Plugin>],
        scorer: &Arc<dyn Plugin>,
        r: &InferenceRequest,
        eps: &[Arc<llmsched_core::endpoint::Endpoint>],
        target: usize,
    ) -> Vec<f64> {
        let cands: Vec<Candidate<'_>> = eps.iter().collect();
        let mut cycle = CycleState::new();
        for p in producers {
            p.clone()
                .as_data_producer()
                .unwrap()
                .produce(r, &mut cycle, &cands);
        }
        let s = scores(scorer.clone().as_scorer().unwrap().as_ref(), r, &cycle, eps);
        let result = SchedulingResult {
            primary_profile: "default".into(),
            profiles: vec![(
                "default".into(),
                ProfileRunResult {
                    targets: vec![eps[target].clone()],
                },
            )],
        };
        for p in producers {
            dispatch(p, r, &cycle, &result);
        }
        s
    }

    #[test]
    fn split_configuration_uses_the_producers_parameters_in_either_order() {
        for producer_first in [true, false] {
            let producer = build(
                TYPE,
                Some(serde_json::json!({"blockSizeTokens": 1, "autoTune": false})),
            )
            .unwrap();
            let scorer = build(crate::scorer::prefix_cache_scorer::TYPE, None).unwrap();
            let order = if producer_first {
                vec![producer.clone(), scorer.clone()]
            } else {
                vec![scorer.clone(), producer.clone()]
            };
            let eps = [ep(1), ep(2)];
            // 1-token blocks = 4 chars: 12 chars → 3 blocks.
            let r = req("aaaabbbbcccc");
            assert_close(&cycle_with(&order, &scorer, &r, &eps, 0), &[0.0, 0.0]);
            assert_close(&cycle_with(&order, &scorer, &r, &eps, 0), &[1.0, 0.0]);
            let r2 = req("aaaabbbbdddd");
            assert_close(
                &cycle_with(&order, &scorer, &r2, &eps, 1),
                &[2.0 / 3.0, 0.0],
            );
            // Only the producer's index holds blocks.
            let prod = producer.clone();
            let cands: Vec<Candidate<'_>> = eps.iter().collect();
            let mut c = CycleState::new();
            prod.as_data_producer().unwrap().produce(&r, &mut c, &cands);
            assert_eq!(c.get::<PrefixCacheMatch>().unwrap().block_size, 4);
        }
    }

    #[test]
    fn bad_parameters() {
        assert!(
            build_err(TYPE, serde_json::json!({"lruCapacityPerServer": -1}))
                .contains("lruCapacityPerServer must be > 0")
        );
        assert!(
            build_err(TYPE, serde_json::json!({"maxPrefixBlocksToMatch": "many"}))
                .contains("invalid type")
        );
        assert!(build_err(TYPE, serde_json::json!({"hashBlockSize": 4})).contains("unknown field"));
    }
}
