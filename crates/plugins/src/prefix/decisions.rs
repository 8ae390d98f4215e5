//! The prefix scorers' decision log: for every request, what the index believed when it was
//! routed and what the engine then reported as cached, as one `tracing` event per request
//! (target [`TARGET`], level DEBUG, message `prefix decision`).
//!
//! Off unless that target is enabled, e.g.
//! `RUST_LOG=info,llmsched_decisions=debug llmsched epp --log-format json ...`; then each
//! completed request logs:
//!
//! | field | meaning |
//! | --- | --- |
//! | `request_id` | the request's `x-request-id` |
//! | `scorer` | `precise-prefix-cache-scorer` or `prefix-cache-scorer` |
//! | `target` | the endpoint the request was routed to (`ip:port`) |
//! | `believed_tokens` | prompt tokens the index believed `target` held (matched blocks × tokens per block) |
//! | `best_endpoint`, `best_tokens` | the endpoint the index believed held the most, and how much |
//! | `holders` | endpoints believed to hold at least one block |
//! | `total_tokens` | prompt tokens the index hashed (whole blocks) |
//! | `status` | the model server's HTTP status |
//! | `prompt_tokens`, `cached_tokens` | the engine's `usage` (`prompt_tokens_details.cached_tokens`): what it really served from its cache |
//!
//! The approximate index counts 64-character blocks (about 16 tokens); its token figures are
//! blocks × `block size / 4`. Records wait in a bounded map between the decision and the
//! response (at most [`MAX_OPEN`]; beyond that new decisions are not logged).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use llmsched_core::endpoint::{Endpoint, EndpointSet};
use llmsched_core::request::{InferenceRequest, ResponseInfo};
use parking_lot::Mutex;

/// The `tracing` target of the decision log.
pub const TARGET: &str = "llmsched_decisions";
/// Decisions waiting for their response, at most.
pub const MAX_OPEN: usize = 100_000;
/// A decision whose response never came is dropped after this long.
const STALE: Duration = Duration::from_secs(600);

/// True when the decision log is enabled.
pub fn enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::DEBUG)
}

/// What the index believed when a request was routed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// The chosen endpoint.
    pub target: String,
    /// Tokens believed held by the target.
    pub believed_tokens: f64,
    /// The endpoint believed to hold the most, and how much.
    pub best_endpoint: String,
    /// Tokens believed held by `best_endpoint`.
    pub best_tokens: f64,
    /// Endpoints believed to hold at least one block.
    pub holders: usize,
    /// Prompt tokens hashed.
    pub total_tokens: f64,
}

impl Decision {
    /// From the chosen endpoint and the matched blocks per endpoint id; `names` gives the
    /// endpoints' `ip:port` (ids it does not know are logged as `#<id>`).
    pub fn from_matches(
        target: &Endpoint,
        matches: impl IntoIterator<Item = (u32, f64)>,
        total_blocks: usize,
        tokens_per_block: f64,
        names: Option<&EndpointSet>,
    ) -> Self {
        let mut d = Decision {
            target: target.hostport().to_string(),
            total_tokens: total_blocks as f64 * tokens_per_block,
            ..Decision::default()
        };
        let mut best: Option<(u32, f64)> = None;
        for (id, blocks) in matches {
            if blocks <= 0.0 {
                continue;
            }
            d.holders += 1;
            if id == target.id().0 {
                d.believed_tokens = blocks * tokens_per_block;
            }
            if best.is_none_or(|(_, b)| blocks > b) {
                best = Some((id, blocks));
            }
        }
        if let Some((id, blocks)) = best {
            d.best_tokens = blocks * tokens_per_block;
            d.best_endpoint = names
                .and_then(|s| s.endpoints.iter().find(|e| e.id().0 == id))
                .map_or_else(|| format!("#{id}"), |e| e.hostport().to_string());
        }
        d
    }
}

/// Decisions waiting for their responses.
#[derive(Debug)]
pub struct DecisionLog {
    scorer: &'static str,
    open: Mutex<HashMap<String, (Decision, Instant)>>,
}

impl DecisionLog {
    /// A log for the scorer type `scorer`.
    pub fn new(scorer: &'static str) -> Self {
        Self {
            scorer,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Keeps `decision` until the request's response completes.
    pub fn record(&self, request_id: &str, decision: Decision) {
        let mut open = self.open.lock();
        if open.len() >= MAX_OPEN {
            let now = Instant::now();
            open.retain(|_, (_, at)| now.duration_since(*at) < STALE);
            if open.len() >= MAX_OPEN {
                return;
            }
        }
        open.insert(request_id.to_string(), (decision, Instant::now()));
    }

    /// Logs the request's decision with what the engine reported; returns it (for tests).
    pub fn complete(
        &self,
        request: &InferenceRequest,
        response: &ResponseInfo,
        served: &Endpoint,
    ) -> Option<Decision> {
        let (d, _) = self.open.lock().remove(&request.request_id)?;
        let usage = response.usage.unwrap_or_default();
        tracing::debug!(
            target: TARGET,
            request_id = %request.request_id,
            scorer = self.scorer,
            target = %d.target,
            served = %served.hostport(),
            believed_tokens = d.believed_tokens,
            best_endpoint = %d.best_endpoint,
            best_tokens = d.best_tokens,
            holders = d.holders,
            total_tokens = d.total_tokens,
            status = response.status,
            prompt_tokens = usage.prompt_tokens,
            cached_tokens = usage.cached_tokens,
            "prefix decision"
        );
        Some(d)
    }

    /// Decisions waiting for a response.
    pub fn open(&self) -> usize {
        self.open.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::request::Usage;

    #[test]
    fn a_decision_waits_for_its_response_and_is_bounded() {
        let log = DecisionLog::new("prefix-cache-scorer");
        let mut r = request("m");
        r.request_id = "r1".into();
        let d = Decision {
            target: "10.0.0.1:8000".into(),
            believed_tokens: 96.0,
            best_endpoint: "10.0.0.1:8000".into(),
            best_tokens: 96.0,
            holders: 1,
            total_tokens: 128.0,
        };
        log.record("r1", d.clone());
        assert_eq!(log.open(), 1);
        let resp = ResponseInfo {
            status: 200,
            usage: Some(Usage {
                prompt_tokens: 130,
                cached_tokens: 96,
                ..Usage::default()
            }),
            ..ResponseInfo::default()
        };
        assert_eq!(log.complete(&r, &resp, &ep(1)), Some(d.clone()));
        assert_eq!(log.open(), 0);
        // Unknown requests log nothing.
        assert_eq!(log.complete(&r, &resp, &ep(1)), None);
        for i in 0..MAX_OPEN + 10 {
            log.record(&format!("x{i}"), d.clone());
        }
        assert_eq!(log.open(), MAX_OPEN);
    }
}
