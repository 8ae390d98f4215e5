//! Plugin traits: the extension points of the request pipeline.
//!
//! ```text
//! parse ─▶ rewrite ─▶ priority ─▶ admission ─▶ candidates ─▶ data producers
//!   ─▶ profile handler picks profiles ─▶ per profile: filters ─▶ weighted scorers ─▶ picker
//!   ─▶ pre-request hooks ─▶ (request sent) ─▶ response hooks
//! ```
//!
//! A plugin instance is created once from the configuration by its factory (see
//! [`crate::registry`]) and may serve several extension points: the approximate prefix
//! scorer, for instance, is a data producer (hashes the prompt, looks up matches), a scorer,
//! a pre-request hook (records what was sent where) and an endpoint listener (forgets
//! departed endpoints). Each role is exposed through an `as_*` method returning the plugin as
//! that trait object; the defaults return `None`.
//!
//! Flow-control policies ([`FairnessPolicy`], [`OrderingPolicy`]) are plugins too, resolved
//! by the priority bands' `fairnessPolicyRef` / `orderingPolicyRef`; their traits live in
//! [`crate::flowcontrol`].
//!
//! Everything on the scheduling path is synchronous and must not block or do I/O: it runs on
//! every request. Plugins that need background work (event ingestion) do it on their own
//! tasks and publish results through lock-free structures.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use smallvec::SmallVec;

use crate::cycle::CycleState;
use crate::endpoint::{Endpoint, EndpointId};
use crate::error::InferenceError;
pub use crate::flowcontrol::{FairnessPolicy, OrderingPolicy};
use crate::registry::PluginError;
pub use crate::replica::ReplicatedState;
use crate::request::{Headers, InferenceRequest, RequestBody, ResponseInfo};
use crate::scheduler::{ProfileResults, SchedulerProfile, SchedulingError, SchedulingResult};

/// A candidate endpoint during a scheduling cycle (borrowed from the cycle's snapshot).
pub type Candidate<'a> = &'a Arc<Endpoint>;

/// Common to every plugin.
pub trait Plugin: Send + Sync + 'static {
    /// The registered type name, e.g. `queue-scorer`.
    fn type_name(&self) -> &'static str;
    /// The instance name from the configuration (defaults to the type name).
    fn name(&self) -> &str;

    /// This plugin as a filter.
    fn as_filter(self: Arc<Self>) -> Option<Arc<dyn Filter>> {
        None
    }
    /// This plugin as a scorer.
    fn as_scorer(self: Arc<Self>) -> Option<Arc<dyn Scorer>> {
        None
    }
    /// This plugin as a picker.
    fn as_picker(self: Arc<Self>) -> Option<Arc<dyn Picker>> {
        None
    }
    /// This plugin as a profile handler.
    fn as_profile_handler(self: Arc<Self>) -> Option<Arc<dyn ProfileHandler>> {
        None
    }
    /// This plugin as a data producer.
    fn as_data_producer(self: Arc<Self>) -> Option<Arc<dyn DataProducer>> {
        None
    }
    /// This plugin as an admission plugin.
    fn as_admitter(self: Arc<Self>) -> Option<Arc<dyn Admitter>> {
        None
    }
    /// This plugin as a saturation detector.
    fn as_saturation_detector(self: Arc<Self>) -> Option<Arc<dyn SaturationDetector>> {
        None
    }
    /// This plugin as a pre-request hook.
    fn as_pre_request(self: Arc<Self>) -> Option<Arc<dyn PreRequest>> {
        None
    }
    /// This plugin as a set of response hooks.
    fn as_response_hooks(self: Arc<Self>) -> Option<Arc<dyn ResponseHooks>> {
        None
    }
    /// This plugin as a request parser.
    fn as_parser(self: Arc<Self>) -> Option<Arc<dyn Parser>> {
        None
    }
    /// This plugin as an endpoint-membership listener.
    fn as_endpoint_listener(self: Arc<Self>) -> Option<Arc<dyn EndpointListener>> {
        None
    }
    /// This plugin as a flow-control fairness policy.
    fn as_fairness_policy(self: Arc<Self>) -> Option<Arc<dyn FairnessPolicy>> {
        None
    }
    /// This plugin as a flow-control ordering policy.
    fn as_ordering_policy(self: Arc<Self>) -> Option<Arc<dyn OrderingPolicy>> {
        None
    }
    /// This plugin as a disaggregation decider (P/D: run the prefill stage or not).
    fn as_disagg_decider(self: Arc<Self>) -> Option<Arc<dyn DisaggDecider>> {
        None
    }

    /// Resolves the plugins this one names in its parameters (the reference's `pluginRef`
    /// parameters, e.g. a profile handler's decider). Called once by the configuration
    /// loader after every `plugins[]` entry is built, so a reference may point to an entry
    /// declared later; an error fails the load and names this plugin.
    fn resolve_references(&self, _plugins: PluginLookup<'_>) -> Result<(), PluginError> {
        Ok(())
    }

    /// True when this instance holds other instances it resolved in
    /// [`Self::resolve_references`]. A configuration reload never carries such an instance
    /// over (what it holds may have been rebuilt); it is built anew and resolves again.
    fn holds_references(&self) -> bool {
        false
    }

    /// This plugin's state shared with the EPP's other replicas (see [`crate::replica`]).
    fn as_replicated(self: Arc<Self>) -> Option<Arc<dyn ReplicatedState>> {
        None
    }
}

/// Looks a configured plugin up by instance name (see [`Plugin::resolve_references`]).
pub type PluginLookup<'a> = &'a dyn Fn(&str) -> Option<Arc<dyn Plugin>>;

/// What filters, scorers and pickers see of the current cycle.
#[derive(Debug, Clone, Copy)]
pub struct SchedulingContext<'a> {
    /// The request.
    pub request: &'a InferenceRequest,
    /// Data producers' output.
    pub cycle: &'a CycleState,
    /// The cycle's start (for staleness checks).
    pub now: Instant,
}

/// Removes candidates that cannot serve the request.
pub trait Filter: Plugin {
    /// Keeps only the acceptable endpoints in `candidates` (preserving order).
    fn filter(&self, cx: &SchedulingContext<'_>, candidates: &mut Vec<Candidate<'_>>);
}

/// How a scorer's preference behaves, for documentation and profile validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScorerCategory {
    /// Prefers endpoints that already hold state for the request (prefix, session, LoRA).
    Affinity,
    /// Spreads requests out.
    Distribution,
    /// Balances load.
    Balance,
}

/// Scores candidates in [0, 1] (higher is better); the profile multiplies by the weight.
pub trait Scorer: Plugin {
    /// The scorer's category.
    fn category(&self) -> ScorerCategory;
    /// Writes one score per candidate into `scores` (same length and order as `candidates`).
    /// Values outside [0, 1] are clamped by the profile; NaN counts as 0.
    fn score(&self, cx: &SchedulingContext<'_>, candidates: &[Candidate<'_>], scores: &mut [f64]);
}

/// A candidate with its weighted total score.
#[derive(Debug, Clone, Copy)]
pub struct ScoredEndpoint<'a> {
    /// The endpoint.
    pub endpoint: Candidate<'a>,
    /// Σ weight · clamp(score, 0, 1) over the profile's scorers.
    pub score: f64,
}

/// Targets picked by a picker, best first.
pub type Picked<'a> = SmallVec<[Candidate<'a>; 4]>;

/// Chooses the target endpoint(s) from the scored candidates.
pub trait Picker: Plugin {
    /// Returns the chosen endpoints, best first (at most the picker's `maxNumOfEndpoints`).
    /// `scored` may be reordered in place. Must return at least one endpoint when `scored`
    /// is non-empty.
    fn pick<'a>(&self, cx: &SchedulingContext<'_>, scored: &mut [ScoredEndpoint<'a>])
    -> Picked<'a>;
}

/// Decides which profiles run, and which profile's result is the primary one.
pub trait ProfileHandler: Plugin {
    /// Indices (into `profiles`) of the profiles to run next, given the results so far.
    /// Called repeatedly until it returns no index.
    fn pick_profiles(
        &self,
        cx: &SchedulingContext<'_>,
        profiles: &[Arc<SchedulerProfile>],
        results: &ProfileResults,
    ) -> SmallVec<[usize; 2]>;

    /// Turns the profiles' results into the scheduling result.
    fn process_results(
        &self,
        cx: &SchedulingContext<'_>,
        results: ProfileResults,
    ) -> Result<SchedulingResult, SchedulingError>;

    /// Checks, when the configuration is loaded, that the profiles this handler needs exist
    /// (`profiles` = the names in `schedulingProfiles`, in order).
    fn check_profiles(&self, _profiles: &[&str]) -> Result<(), PluginError> {
        Ok(())
    }
}

/// Computes per-request data before scheduling (e.g. prompt hashes and prefix matches).
pub trait DataProducer: Plugin {
    /// Writes its output into `cycle`. Must not fail the request: on trouble, write nothing.
    fn produce(
        &self,
        request: &InferenceRequest,
        cycle: &mut CycleState,
        candidates: &[Candidate<'_>],
    );
}

/// Decides whether a request may be scheduled now.
pub trait Admitter: Plugin {
    /// `Err` rejects the request with that error.
    fn admit(
        &self,
        request: &InferenceRequest,
        candidates: &[Candidate<'_>],
        now: Instant,
    ) -> Result<(), InferenceError>;
}

/// Estimates how saturated the pool is (drives shedding and flow control).
pub trait SaturationDetector: Plugin {
    /// Pool saturation: ≥ 1.0 means saturated.
    fn saturation(&self, candidates: &[Candidate<'_>], now: Instant) -> f64;
    /// True when this one endpoint is saturated (used to filter it out).
    fn is_saturated(&self, endpoint: &Endpoint, now: Instant) -> bool;
}

/// Runs after the target is chosen, before the request is forwarded.
pub trait PreRequest: Plugin {
    /// Observe the decision (e.g. record prefix ownership) and add request headers.
    fn pre_request(
        &self,
        request: &InferenceRequest,
        cycle: &CycleState,
        result: &SchedulingResult,
        headers_to_set: &mut Vec<(String, String)>,
    );

    /// Bookkeeping that needs the decision but need not delay the request (e.g. recording
    /// the prompt's blocks in a prefix index). The transport runs it once the request is on
    /// its way — after the routing answer went to the gateway, or after the request went to
    /// the endpoint — and always before the request's response is processed; a request that
    /// ends earlier runs it when it is dropped. So a client's next request (sent after this
    /// response) always sees it, while the decision's own latency does not include it: the
    /// reference updates its prefix index asynchronously for the same reason.
    fn after_dispatch(
        &self,
        _request: &InferenceRequest,
        _cycle: &CycleState,
        _result: &SchedulingResult,
    ) {
    }
}

/// Observes the response.
pub trait ResponseHooks: Plugin {
    /// Response headers arrived; may add headers to the client's response.
    fn response_received(
        &self,
        _request: &InferenceRequest,
        _response: &mut ResponseInfo,
        _target: &Endpoint,
    ) {
    }
    /// A chunk of a streamed response passed through.
    fn response_streaming(
        &self,
        _request: &InferenceRequest,
        _response: &ResponseInfo,
        _chunk: &[u8],
        _target: &Endpoint,
    ) {
    }
    /// The response completed (or the request ended abnormally; `response.status` tells).
    fn response_complete(
        &self,
        _request: &InferenceRequest,
        _response: &ResponseInfo,
        _target: &Endpoint,
    ) {
    }
}

/// Outcome of parsing a request body.
#[derive(Debug, Clone)]
pub enum ParseOutcome {
    /// Parsed; schedule it.
    Parsed(RequestBody),
    /// Not for this parser: forward unchanged to a random endpoint.
    Skip,
}

/// Turns a request body into a [`RequestBody`].
pub trait Parser: Plugin {
    /// Parses the complete body. Errors are client errors (400).
    fn parse_request(&self, body: Bytes, headers: &Headers)
    -> Result<ParseOutcome, InferenceError>;
}

/// Decides, per request, whether a disaggregated stage runs (the reference's decider
/// plugins: `prefix-based-pd-decider`, `always-disagg-pd-decider`). Consulted by the P/D
/// profile handlers after the decode profile picked `endpoint`.
pub trait DisaggDecider: Plugin {
    /// True to run the stage (e.g. prefill on a separate endpoint) for this request.
    fn disaggregate(&self, cx: &SchedulingContext<'_>, endpoint: &Endpoint) -> bool;
}

/// Notified when endpoints join or leave the pool.
pub trait EndpointListener: Plugin {
    /// An endpoint joined.
    fn endpoint_added(&self, _endpoint: &Arc<Endpoint>) {}
    /// An endpoint left; forget everything about it.
    fn endpoint_removed(&self, id: EndpointId);
}
