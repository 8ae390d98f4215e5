//! `session-affinity-scorer`: sends a session's requests back to the endpoint that served
//! its first one.
//!
//! ## Formula
//!
//! ```text
//! score(e) = 1   when the request header x-session-token is base64(name of e)
//! score(e) = 0   otherwise (no header, undecodable header, unknown endpoint)
//! ```
//!
//! Standard base64 with padding, as the reference. The endpoint name is the pod name (or
//! `ip:port` when endpoints are given without names).
//!
//! As a response hook ([`ResponseHooks::response_received`]) it sets `x-session-token:
//! base64(name of the serving endpoint)` on the response, so a client that echoes the header
//! sticks to that endpoint.
//!
//! ## Parameters
//!
//! None (`{}` or no `parameters`); any parameter is an error.
//!
//! Category: affinity.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use llmsched_core::Plugin;
use llmsched_core::endpoint::Endpoint;
use llmsched_core::plugin::{Candidate, ResponseHooks, SchedulingContext, Scorer, ScorerCategory};
use llmsched_core::registry::{FactoryInput, PluginError};
use llmsched_core::request::{InferenceRequest, ResponseInfo, header};

use super::NoParameters;
use crate::common::{impl_plugin, params};

/// Type name.
pub const TYPE: &str = "session-affinity-scorer";

/// The session affinity scorer.
#[derive(Debug, Clone)]
pub struct SessionAffinityScorer {
    name: String,
}

impl SessionAffinityScorer {
    /// A scorer named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// Factory.
pub fn factory(i: FactoryInput<'_>) -> Result<Arc<dyn Plugin>, PluginError> {
    let _: NoParameters = params(i.parameters)?;
    Ok(Arc::new(SessionAffinityScorer::new(i.name)))
}

impl_plugin!(SessionAffinityScorer, TYPE, as_scorer => Scorer, as_response_hooks => ResponseHooks);

impl Scorer for SessionAffinityScorer {
    fn category(&self) -> ScorerCategory {
        ScorerCategory::Affinity
    }

    fn score(&self, cx: &SchedulingContext<'_>, candidates: &[Candidate<'_>], scores: &mut [f64]) {
        scores.fill(0.0);
        let Some(token) = cx
            .request
            .headers
            .get(header::SESSION_TOKEN)
            .filter(|t| !t.is_empty())
        else {
            return;
        };
        let name = match STANDARD.decode(token) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "session-affinity-scorer: undecodable x-session-token");
                return;
            }
        };
        for (s, e) in scores.iter_mut().zip(candidates) {
            if e.name().as_bytes() == name.as_slice() {
                *s = 1.0;
            }
        }
    }
}

impl ResponseHooks for SessionAffinityScorer {
    fn response_received(
        &self,
        _request: &InferenceRequest,
        response: &mut ResponseInfo,
        target: &Endpoint,
    ) {
        response.headers_to_set.push((
            header::SESSION_TOKEN.to_string(),
            STANDARD.encode(target.name()),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testutil::*;
    use llmsched_core::cycle::CycleState;

    fn with_token(token: &str) -> InferenceRequest {
        let mut r = request("m");
        r.headers.insert(header::SESSION_TOKEN, token);
        r
    }

    #[test]
    fn the_named_endpoint_scores_one() {
        let s = SessionAffinityScorer::new(TYPE);
        let eps = [ep(1), ep(2), ep(3)];
        // base64("pod-2") = "cG9kLTI="
        assert_close(
            &scores(&s, &with_token("cG9kLTI="), &CycleState::new(), &eps),
            &[0.0, 1.0, 0.0],
        );
    }

    #[test]
    fn missing_bad_or_unknown_tokens_score_zero() {
        let s = SessionAffinityScorer::new(TYPE);
        let eps = [ep(1), ep(2)];
        for req in [
            request("m"),
            with_token(""),
            with_token("%%%not base64"),
            with_token("cG9kLTk="),
        ] {
            assert_close(&scores(&s, &req, &CycleState::new(), &eps), &[0.0, 0.0]);
        }
    }

    #[test]
    fn response_carries_the_token_of_the_serving_endpoint() {
        let s = SessionAffinityScorer::new(TYPE);
        let mut resp = ResponseInfo::default();
        s.response_received(&request("m"), &mut resp, &ep(7));
        assert_eq!(
            resp.headers_to_set,
            vec![("x-session-token".to_string(), "cG9kLTc=".to_string())]
        );
        // And that token routes back to pod-7.
        let eps = [ep(6), ep(7)];
        assert_close(
            &scores(
                &s,
                &with_token(&resp.headers_to_set[0].1),
                &CycleState::new(),
                &eps,
            ),
            &[0.0, 1.0],
        );
    }

    #[test]
    fn parameters_are_rejected() {
        assert!(build_err(TYPE, serde_json::json!({"header": "x"})).contains("unknown field"));
    }
}
