//! The [`Director`]: one request's way from bytes to a routing decision.
//!
//! ```text
//! route(headers, body, subset hint)
//!   parse (config's parser; Skip ⇒ random endpoint, body forwarded unchanged)
//!   → model check (400 "model not found in request body")
//!   → target model: x-llm-d-model-name-rewrite header, else InferenceModelRewrite choice
//!   → priority from x-llm-d-inference-objective (default 0)
//!   → admission: flow control when enabled, else shed priority < 0 when saturated (429)
//!   → candidates: subset hint, then endpoint health (unhealthy endpoints are left out,
//!     all of them come back when none is healthy; 503 when the hint leaves none)
//!   → data producers → admitters → scheduler (429 on failure) → pre-request hooks
//!   → in-flight accounting on the primary target → Routed
//! ```
//!
//! Everything transport-specific (ext_proc messages, HTTP proxying, chunking, header echo)
//! stays in the transports; both call the same `route` and drive the same [`Routed`].
//!
//! The request path takes no lock: configuration, objectives and endpoints are `ArcSwap`
//! snapshots, metrics are atomics (label families take a read lock inside
//! prometheus-client). The body is a `Bytes` handed to the parser without copying, and the
//! forwarded body is either that same buffer (model unchanged) or one splice of the model
//! value (`RequestBody::with_model`).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use llmsched_core::config::LoadedConfig;
use llmsched_core::endpoint::{Endpoint, EndpointId, EndpointSet, EndpointSource};
use llmsched_core::error::InferenceError;
use llmsched_core::health::HealthPolicy;
use llmsched_core::metrics::{PluginTimer, SchedulerMetrics, point};
use llmsched_core::objectives::Objectives;
use llmsched_core::plugin::{Candidate, ParseOutcome, ResponseHooks};
use llmsched_core::request::{Headers, InferenceRequest, Prompt, RequestBody, SloTargets, header};
use llmsched_core::{CycleState, SchedulingResult};
use rand::Rng;

use crate::flow::{DEFAULT_TICK, FlowController, FlowRequest, FlowTicket, SaturationProbe};
use crate::headers::{ensure_request_id, parse_ms};
use crate::health::{CandidateFilter, Candidates, HealthMetrics, now_ms};
use crate::metrics::{
    EppMetrics, ModelLabels, ModelNameLabel, Phase, PriorityLabels, ProfilePickLabels,
    RewriteLabels,
};
use crate::routed::{Retarget, RouteKind, Routed, RoutedParts};

/// Message of a request rejected because its body names no model.
pub const MSG_MODEL_NOT_FOUND: &str = "model not found in request body";
/// Message when the subset hint (or an empty pool) leaves no candidate.
pub const MSG_NO_CANDIDATES: &str = "failed to find endpoint candidates for serving the request";
/// Message when a header-only or unparsed request finds no endpoint.
pub const MSG_NO_PODS: &str = "no pods available in datastore";
/// Message when a sheddable request meets a saturated pool.
pub const MSG_SHED: &str = "system saturated, sheddable request dropped";

/// Parsers whose output is not an OpenAI JSON body: no model is required from them.
const MODEL_OPTIONAL_PARSERS: [&str; 2] = ["passthrough-parser", "vllmgrpc-parser"];

/// Whether [`Director::decide`] runs the admission plugins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    Run,
    Skip,
}

/// What [`Director::decide`] decided for a request.
struct Decision {
    cycle: CycleState,
    result: SchedulingResult,
    /// `ip:port[,...]` of the targets, or where a pre-request hook redirected the request.
    destination: String,
    headers_to_set: Vec<(String, String)>,
}

/// Director settings.
#[derive(Debug, Clone)]
pub struct DirectorOptions {
    /// Ignore the gateway's subset hint (`--disable-endpoint-subset-filter`).
    pub disable_endpoint_subset_filter: bool,
    /// Pool name used in flow-control metrics.
    pub pool_name: String,
    /// Flow-control dispatch tick (the reference's 1 ms).
    pub flow_control_tick: Duration,
    /// Endpoint health: which endpoints may become candidates.
    pub health: HealthPolicy,
}

impl Default for DirectorOptions {
    fn default() -> Self {
        Self {
            disable_endpoint_subset_filter: false,
            pool_name: String::new(),
            flow_control_tick: DEFAULT_TICK,
            health: HealthPolicy::default(),
        }
    }
}

/// What the transport collected of a request.
#[derive(Debug, Clone)]
pub struct IncomingRequest {
    /// Request headers (lowercase names); `x-request-id` is added when missing.
    pub headers: Headers,
    /// The complete body.
    pub body: Bytes,
    /// The gateway's subset hint: `None` = no hint (all endpoints); `Some(list)` = only
    /// endpoints whose IP is in the list (ports ignored), so an empty list matches nothing.
    pub subset_hint: Option<Vec<String>>,
    /// When the request's headers arrived (request duration is measured from here).
    pub received_at: Instant,
}

impl IncomingRequest {
    /// A request received now, without a subset hint.
    pub fn new(headers: Headers, body: Bytes) -> Self {
        Self {
            headers,
            body,
            subset_hint: None,
            received_at: Instant::now(),
        }
    }

    /// Sets the subset hint.
    pub fn with_subset_hint(mut self, hint: Option<Vec<String>>) -> Self {
        self.subset_hint = hint;
        self
    }

    /// Sets the arrival time.
    pub fn received_at(mut self, at: Instant) -> Self {
        self.received_at = at;
        self
    }
}

/// Response hooks with their duration histograms (resolved once per configuration).
pub(crate) struct HookSet {
    pub(crate) hooks: Vec<(Arc<dyn ResponseHooks>, [PluginTimer; 3])>,
}

/// A configuration plus what the director derives from it.
pub(crate) struct ActiveConfig {
    pub(crate) config: Arc<LoadedConfig>,
    pub(crate) hooks: Arc<HookSet>,
    pub(crate) flow: Option<FlowController>,
}

/// State shared by the director and every [`Routed`] it hands out.
pub(crate) struct Shared {
    pub(crate) metrics: EppMetrics,
    pub(crate) endpoints: Arc<dyn EndpointSource>,
    pub(crate) health: HealthPolicy,
    pub(crate) health_metrics: HealthMetrics,
    pub(crate) last_fail_open_log: AtomicU64,
}

/// The request lifecycle, shared by every transport. Cheap to share (`Arc<Director>`).
pub struct Director {
    /// The one configuration cell: the loaded configuration with what is derived from it.
    /// The flow controller's saturation probe reads it through a weak reference.
    active: Arc<ArcSwap<ActiveConfig>>,
    endpoints: Arc<dyn EndpointSource>,
    objectives: Arc<ArcSwap<Objectives>>,
    scheduler_metrics: Option<Arc<SchedulerMetrics>>,
    shared: Arc<Shared>,
    options: DirectorOptions,
}

impl std::fmt::Debug for Director {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Director")
            .field("config", &self.active.load().config)
            .field("options", &self.options)
            .finish()
    }
}

/// Builds a [`Director`].
pub struct DirectorBuilder {
    config: Arc<LoadedConfig>,
    endpoints: Arc<dyn EndpointSource>,
    objectives: Option<Arc<ArcSwap<Objectives>>>,
    metrics: Option<EppMetrics>,
    health_metrics: Option<HealthMetrics>,
    scheduler_metrics: Option<Arc<SchedulerMetrics>>,
    options: DirectorOptions,
}

impl DirectorBuilder {
    /// Health metrics (default: unregistered).
    pub fn health_metrics(mut self, metrics: HealthMetrics) -> Self {
        self.health_metrics = Some(metrics);
        self
    }

    /// Objectives and rewrites, shared with whoever reloads them.
    pub fn objectives(mut self, objectives: Arc<ArcSwap<Objectives>>) -> Self {
        self.objectives = Some(objectives);
        self
    }

    /// Metrics (default: unregistered metrics).
    pub fn metrics(mut self, metrics: EppMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The scheduler metrics the configuration was loaded with; used to time the response
    /// hooks (`inference_extension_plugin_duration_seconds{extension_point="Response*"}`).
    pub fn scheduler_metrics(mut self, metrics: Arc<SchedulerMetrics>) -> Self {
        self.scheduler_metrics = Some(metrics);
        self
    }

    /// Options.
    pub fn options(mut self, options: DirectorOptions) -> Self {
        self.options = options;
        self
    }

    /// The director.
    pub fn build(self) -> Director {
        let shared = Arc::new(Shared {
            metrics: self
                .metrics
                .unwrap_or_default()
                .sharing_known_names(self.scheduler_metrics.as_deref()),
            endpoints: self.endpoints.clone(),
            health: self.options.health.clone(),
            health_metrics: self.health_metrics.unwrap_or_default(),
            last_fail_open_log: AtomicU64::new(0),
        });
        let d = Director {
            active: Arc::new(ArcSwap::from_pointee(ActiveConfig {
                config: self.config.clone(),
                hooks: Arc::new(HookSet { hooks: Vec::new() }),
                flow: None,
            })),
            endpoints: self.endpoints,
            objectives: self
                .objectives
                .unwrap_or_else(|| Arc::new(ArcSwap::from_pointee(Objectives::default()))),
            scheduler_metrics: self.scheduler_metrics,
            shared,
            options: self.options,
        };
        let active = d.activate(self.config, None);
        d.active.store(Arc::new(active));
        d
    }
}

/// Saturation as the configuration in effect sees it (weak: the cell owns the controller
/// that owns this probe).
fn saturation_probe(
    active: std::sync::Weak<ArcSwap<ActiveConfig>>,
    endpoints: Arc<dyn EndpointSource>,
) -> SaturationProbe {
    Arc::new(move || {
        let Some(active) = active.upgrade() else {
            return 0.0;
        };
        let active = active.load();
        let Some(det) = &active.config.saturation_detector else {
            return 0.0;
        };
        let snap = endpoints.snapshot();
        let cands: Vec<Candidate<'_>> = snap.endpoints.iter().collect();
        det.saturation(&cands, Instant::now())
    })
}

impl Director {
    /// A builder over `config` and `endpoints`.
    pub fn builder(
        config: Arc<LoadedConfig>,
        endpoints: Arc<dyn EndpointSource>,
    ) -> DirectorBuilder {
        DirectorBuilder {
            config,
            endpoints,
            objectives: None,
            metrics: None,
            health_metrics: None,
            scheduler_metrics: None,
            options: DirectorOptions::default(),
        }
    }

    fn activate(&self, config: Arc<LoadedConfig>, previous: Option<&ActiveConfig>) -> ActiveConfig {
        let timer = |pt: &str, h: &Arc<dyn ResponseHooks>| {
            self.scheduler_metrics
                .as_ref()
                .map(|m| m.plugin_timer(pt, h.type_name(), h.name()))
                .unwrap_or_default()
        };
        let hooks = config
            .response_hooks
            .iter()
            .map(|h| {
                (
                    h.clone(),
                    [
                        timer(point::RESPONSE_RECEIVED, h),
                        timer(point::RESPONSE_STREAMING, h),
                        timer(point::RESPONSE_COMPLETE, h),
                    ],
                )
            })
            .collect();
        let flow = match (&config.flow_control, previous.and_then(|p| p.flow.as_ref())) {
            (None, _) => None,
            (Some(s), Some(prev)) if prev.settings() == s => Some(prev.clone()),
            (Some(s), _) => Some(FlowController::new(
                s.clone(),
                saturation_probe(Arc::downgrade(&self.active), self.endpoints.clone()),
                self.shared.metrics.clone(),
                self.options.pool_name.clone(),
                self.options.flow_control_tick,
            )),
        };
        if let Some(prev) = previous.and_then(|p| p.flow.as_ref())
            && flow
                .as_ref()
                .is_none_or(|f| f.settings() != prev.settings())
        {
            // Requests already queued there keep waiting on their TTL; new ones use the new
            // controller.
            prev.notify();
        }
        ActiveConfig {
            config,
            hooks: Arc::new(HookSet { hooks }),
            flow,
        }
    }

    /// Replaces the configuration (plugins, scheduler, flow control) with one atomic swap:
    /// requests routed from now on use it, requests in flight finish with the configuration
    /// they were routed with. A flow controller with unchanged settings carries over (its
    /// queues with it). Callers serialize their calls (`llmsched epp`'s reloader is one task).
    pub fn set_config(&self, config: Arc<LoadedConfig>) {
        let prev = self.active.load_full();
        let next = self.activate(config, Some(&prev));
        self.active.store(Arc::new(next));
    }

    /// The configuration in effect.
    pub fn config(&self) -> Arc<LoadedConfig> {
        self.active.load().config.clone()
    }

    /// The endpoint source.
    pub fn endpoints(&self) -> &Arc<dyn EndpointSource> {
        &self.endpoints
    }

    /// The objectives cell (store a new `Objectives` to reload).
    pub fn objectives(&self) -> &Arc<ArcSwap<Objectives>> {
        &self.objectives
    }

    /// The metrics.
    pub fn metrics(&self) -> &EppMetrics {
        &self.shared.metrics
    }

    /// The options.
    pub fn options(&self) -> &DirectorOptions {
        &self.options
    }

    /// The flow controller, when the `flowControl` gate is on.
    pub fn flow_controller(&self) -> Option<FlowController> {
        self.active.load().flow.clone()
    }

    /// A random candidate (healthy ones first, see [`Self::candidates`]).
    fn random_endpoint(&self, snap: &EndpointSet, exclude: &[EndpointId]) -> Option<Arc<Endpoint>> {
        let cands = self
            .candidates(snap, None, exclude, Instant::now())
            .routable;
        if cands.is_empty() {
            return None;
        }
        let i = rand::rng().random_range(0..cands.len());
        Some(cands[i].clone())
    }

    fn fallback(
        &self,
        active: &Arc<ActiveConfig>,
        mut headers: Headers,
        body: Option<Bytes>,
        received_at: Instant,
    ) -> Result<Routed, InferenceError> {
        let request_id = ensure_request_id(&mut headers);
        let snap = self.endpoints.snapshot();
        let Some(target) = self.random_endpoint(&snap, &[]) else {
            let e = InferenceError::internal(MSG_NO_PODS);
            self.shared.metrics.record_error("", "", e.code.as_str());
            return Err(e);
        };
        let forward_body = body.clone().unwrap_or_default();
        let request = InferenceRequest::new(
            request_id,
            headers,
            body.map(llmsched_core::request::RequestBody::raw),
        );
        Ok(Routed::new(RoutedParts {
            kind: RouteKind::Fallback,
            request,
            cycle: CycleState::new(),
            result: None,
            destination: target.hostport().to_string(),
            targets: vec![target],
            forward_body,
            headers_to_set: Vec::new(),
            received_at,
            subset_hint: None,
            labels: ModelLabels {
                model_name: String::new(),
                target_model_name: String::new(),
            },
            tokens: 0,
            flow_ticket: None,
            active: active.clone(),
            shared: self.shared.clone(),
        }))
    }

    /// A request without a body (headers with end of stream): a random endpoint, as the
    /// reference does; 500 `no pods available in datastore` when there is none. No scheduling,
    /// hooks or in-flight accounting.
    pub fn route_without_body(
        &self,
        headers: Headers,
        received_at: Instant,
    ) -> Result<Routed, InferenceError> {
        let active = self.active.load_full();
        self.fallback(&active, headers, None, received_at)
    }

    /// Routes a complete request (see the module documentation for the pipeline). Reads as
    /// the pipeline does: each step is one method below.
    pub async fn route(&self, incoming: IncomingRequest) -> Result<Routed, InferenceError> {
        let t_route = Instant::now();
        let metrics = &self.shared.metrics;
        let IncomingRequest {
            mut headers,
            body,
            subset_hint,
            received_at,
        } = incoming;
        let request_id = ensure_request_id(&mut headers);
        let active = self.active.load_full();

        let Some(parsed) = self.parse(&active.config, &headers, &body)? else {
            return self.fallback(&active, headers, Some(body), received_at);
        };
        let request = self.resolve_request(request_id, headers, parsed);
        // Label values, bounded (see `llmsched_core::labels`), fixed for the request's life.
        let labels = ModelLabels {
            model_name: self.model_label(&request.incoming_model),
            target_model_name: self.model_label(&request.target_model),
        };
        let fail = |e: InferenceError| {
            metrics.record_error(
                &labels.model_name,
                &labels.target_model_name,
                e.code.as_str(),
            );
            e
        };

        // Admission: flow control, then candidates, then shedding.
        let t = Instant::now();
        let admitted = self.wait_in_flow_control(&active, &request, &labels).await;
        let flow_ticket = admitted.map_err(|e| {
            metrics.observe_phase(Phase::Admission, t.elapsed());
            fail(e)
        })?;
        let snap = self.endpoints.snapshot();
        let candidates = self.candidates(&snap, subset_hint.as_deref(), &[], t);
        let kept = self.shed_when_saturated(&active, &request, &candidates.routable);
        metrics.observe_phase(Phase::Admission, t.elapsed());
        kept.map_err(fail)?;
        if candidates.routable.is_empty() {
            return Err(fail(InferenceError::service_unavailable(MSG_NO_CANDIDATES)));
        }

        // The decision: producers → admitters → scheduler → pre-request hooks.
        let t = Instant::now();
        let decided = self.decide(&active.config, &request, &candidates, Admission::Run);
        metrics.observe_phase(Phase::Scheduling, t.elapsed());
        let Decision {
            cycle,
            result,
            destination,
            headers_to_set,
        } = decided.map_err(fail)?;
        drop(candidates);

        let routed = self.dispatch(RoutedParts {
            kind: RouteKind::Scheduled,
            destination,
            targets: result.targets().to_vec(),
            forward_body: request.forward_body(),
            tokens: estimate_tokens(&request),
            request,
            cycle,
            result: Some(result),
            headers_to_set,
            received_at,
            subset_hint,
            labels,
            flow_ticket,
            active: active.clone(),
            shared: self.shared.clone(),
        });
        metrics.observe_phase(Phase::Route, t_route.elapsed());
        Ok(routed)
    }

    /// Parses the body with the configuration's parser; `None` when the parser skips it (the
    /// request is then forwarded unchanged to a random endpoint). A body without a model is
    /// refused (400) unless the parser's output is not an OpenAI body.
    fn parse(
        &self,
        config: &LoadedConfig,
        headers: &Headers,
        body: &Bytes,
    ) -> Result<Option<RequestBody>, InferenceError> {
        let metrics = &self.shared.metrics;
        let t = Instant::now();
        let parsed = config.parser.parse_request(body.clone(), headers);
        metrics.observe_phase(Phase::Parse, t.elapsed());
        let parsed = match parsed {
            Ok(ParseOutcome::Parsed(b)) => b,
            Ok(ParseOutcome::Skip) => return Ok(None),
            Err(e) => {
                metrics.record_error("", "", e.code.as_str());
                return Err(e);
            }
        };
        if parsed.model.is_empty()
            && parsed.model_span.is_none()
            && !MODEL_OPTIONAL_PARSERS.contains(&config.parser.type_name())
        {
            let e = InferenceError::bad_request(MSG_MODEL_NOT_FOUND);
            metrics.record_error("", "", e.code.as_str());
            return Err(e);
        }
        Ok(Some(parsed))
    }

    /// The request as the scheduler sees it: target model (rewrite header, then a matching
    /// `InferenceModelRewrite` rule, as the reference), priority from the objective, fairness
    /// id, SLO targets.
    fn resolve_request(
        &self,
        request_id: String,
        headers: Headers,
        parsed: RequestBody,
    ) -> InferenceRequest {
        let metrics = &self.shared.metrics;
        let mut request = InferenceRequest::new(request_id, headers, Some(parsed));
        let objectives = self.objectives.load();
        metrics.known.sync_objectives(&objectives);
        // As in the reference: the rewrite header sets the target, and a matching
        // InferenceModelRewrite rule (looked up by the requested model) overrides it.
        if let Some(rewrite) = request.headers.get_control(header::MODEL_NAME_REWRITE) {
            request.target_model = rewrite.to_string();
        }
        if let Some(rule) = objectives.rewrite_for(&request.incoming_model)
            && let Some(target) = rule.choose(rand::random::<u64>())
        {
            request.target_model = target.to_string();
            metrics
                .rewrite_decisions
                .get_or_create(&RewriteLabels {
                    model_rewrite_name: rule.rewrite_name.clone(),
                    model_name: self.model_label(&request.incoming_model),
                    target_model: request.target_model.clone(),
                })
                .inc();
        }
        if let Some(obj) = request.headers.get_control(header::OBJECTIVE) {
            request.priority = objectives.priority(obj).unwrap_or(0);
            request.objective = Some(obj.to_string());
        }
        drop(objectives);
        if let Some(f) = request.headers.get_control(header::FAIRNESS_ID) {
            request.fairness_id = f.to_string();
        }
        request.slo = SloTargets {
            ttft_ms: parse_ms(request.headers.get_control(header::SLO_TTFT_MS)),
            tpot_ms: parse_ms(request.headers.get_control(header::SLO_TPOT_MS)),
        };
        request
    }

    /// With flow control on, waits in the request's band and flow until dispatched (the
    /// ticket follows the request to its end); without it, admits at once.
    async fn wait_in_flow_control(
        &self,
        active: &ActiveConfig,
        request: &InferenceRequest,
        labels: &ModelLabels,
    ) -> Result<Option<FlowTicket>, InferenceError> {
        let Some(flow) = &active.flow else {
            return Ok(None);
        };
        let fr = FlowRequest {
            fairness_id: request.fairness_id.clone(),
            priority: request.priority,
            bytes: request.size_bytes as u64,
            prompt_tokens: estimate_prompt_tokens(request),
            max_tokens: request.body.as_ref().and_then(|b| b.max_tokens),
            model_name: labels.model_name.clone(),
            target_model_name: labels.target_model_name.clone(),
        };
        flow.enqueue_and_wait(&fr).await.map(Some)
    }

    /// Without flow control, a sheddable request (priority < 0) meeting a saturated pool is
    /// refused (429).
    fn shed_when_saturated(
        &self,
        active: &ActiveConfig,
        request: &InferenceRequest,
        candidates: &[Candidate<'_>],
    ) -> Result<(), InferenceError> {
        if active.flow.is_none()
            && request.priority < 0
            && let Some(det) = &active.config.saturation_detector
            && det.saturation(candidates, Instant::now()) >= 1.0
        {
            return Err(InferenceError::resource_exhausted(MSG_SHED));
        }
        Ok(())
    }

    /// Data producers, admission plugins (unless `admission` skips them: a reroute was
    /// admitted already), the scheduler (over the routable candidates, a profile falling back
    /// on the held-back ones when it finds none), then the pre-request hooks.
    fn decide(
        &self,
        config: &LoadedConfig,
        request: &InferenceRequest,
        candidates: &Candidates<'_>,
        admission: Admission,
    ) -> Result<Decision, InferenceError> {
        let routable = &candidates.routable;
        let mut cycle = CycleState::new();
        for (p, timer) in &config.data_producers {
            let t0 = Instant::now();
            p.produce(request, &mut cycle, routable);
            timer.record(t0.elapsed());
        }
        if admission == Admission::Run {
            let now = Instant::now();
            for (a, timer) in &config.admitters {
                let t0 = Instant::now();
                let r = a.admit(request, routable, now);
                timer.record(t0.elapsed());
                if let Err(e) = r {
                    tracing::debug!(plugin = a.name(), error = %e, "admission plugin rejected the request");
                    return Err(e);
                }
            }
        }
        let result = config.scheduler.schedule_with_held_back(
            request,
            &cycle,
            routable,
            &candidates.held_back,
        )?;
        let mut headers_to_set = Vec::new();
        for (h, timer) in &config.pre_request {
            let t0 = Instant::now();
            h.pre_request(request, &cycle, &result, &mut headers_to_set);
            timer.record(t0.elapsed());
        }
        // A pre-request hook may redirect the request (P/D's sidecar port).
        let destination = take_destination_override(&mut headers_to_set)
            .unwrap_or_else(|| join_hostports(result.targets()));
        let metrics = &self.shared.metrics;
        for (profile, r) in &result.profiles {
            if let Some(first) = r.targets.first() {
                metrics
                    .profile_picks
                    .get_or_create(&ProfilePickLabels {
                        profile: profile.clone(),
                        pod_name: first.name().to_string(),
                    })
                    .inc();
            }
        }
        Ok(Decision {
            cycle,
            result,
            destination,
            headers_to_set,
        })
    }

    /// The request goes out: request metrics (count, size, running requests), then the
    /// [`Routed`] that charges the primary target's in-flight counts.
    fn dispatch(&self, parts: RoutedParts) -> Routed {
        let metrics = &self.shared.metrics;
        let labels = &parts.labels;
        metrics
            .request_total
            .get_or_create(&PriorityLabels {
                model_name: labels.model_name.clone(),
                target_model_name: labels.target_model_name.clone(),
                priority: parts.request.priority.to_string(),
            })
            .inc();
        metrics
            .request_sizes
            .get_or_create(labels)
            .observe(parts.forward_body.len() as f64);
        if !labels.model_name.is_empty() {
            metrics
                .running_requests
                .get_or_create(&ModelNameLabel {
                    model_name: labels.model_name.clone(),
                })
                .inc();
        }
        tracing::debug!(
            request_id = %parts.request.request_id,
            model = %parts.request.incoming_model,
            target_model = %parts.request.target_model,
            priority = parts.request.priority,
            destination = %parts.destination,
            "request scheduled"
        );
        Routed::new(parts)
    }

    /// Candidate endpoints: those the subset hint allows (`None` ⇒ all), minus `exclude`,
    /// minus the unhealthy ones at `now` — unless that leaves none while some were allowed,
    /// then all allowed ones (fail-open; see [`crate::health`]).
    fn candidates<'a>(
        &self,
        snap: &'a EndpointSet,
        hint: Option<&[String]>,
        exclude: &[EndpointId],
        now: Instant,
    ) -> Candidates<'a> {
        let ips: Option<Vec<std::net::IpAddr>> = match hint {
            Some(list) if !self.options.disable_endpoint_subset_filter => {
                Some(list.iter().filter_map(|s| hint_ip(s)).collect())
            }
            _ => None,
        };
        CandidateFilter {
            policy: &self.shared.health,
            metrics: &self.shared.health_metrics,
            last_fail_open_log: &self.shared.last_fail_open_log,
        }
        .candidates(snap, ips.as_deref(), exclude, now_ms(now))
    }

    /// The health policy in effect.
    pub fn health_policy(&self) -> &HealthPolicy {
        &self.shared.health
    }

    /// Routes `routed` again because connecting to each endpoint in `failed` failed, so the
    /// request never reached a model server (a transport must never call this once the
    /// request may have been sent). The candidates are formed as for [`Self::route`] (same
    /// subset hint, healthy endpoints only) without `failed`; the request keeps its
    /// configuration, admission and metrics, the data producers run again over the new
    /// candidates, the scheduler and the pre-request hooks run again, and the in-flight
    /// charge moves to the new primary target. A request the parser skipped gets another
    /// random endpoint.
    ///
    /// Errors with 503 `failed to find endpoint candidates …` when no endpoint is left, or
    /// with the scheduler's error.
    pub fn reroute(
        &self,
        routed: &mut Routed,
        failed: &[EndpointId],
    ) -> Result<(), InferenceError> {
        let snap = self.endpoints.snapshot();
        let candidates = self.candidates(&snap, routed.subset_hint(), failed, Instant::now());
        if candidates.routable.is_empty() {
            return Err(InferenceError::service_unavailable(MSG_NO_CANDIDATES));
        }
        self.shared.health_metrics.reroutes.inc();
        if routed.kind() == RouteKind::Fallback {
            let routable = &candidates.routable;
            let target = routable[rand::rng().random_range(0..routable.len())].clone();
            drop(candidates);
            routed.retarget(Retarget {
                cycle: CycleState::new(),
                result: None,
                destination: join_hostports(std::slice::from_ref(&target)),
                targets: vec![target],
                headers_to_set: Vec::new(),
            });
            return Ok(());
        }
        let config = routed.config().clone();
        let Decision {
            cycle,
            result,
            destination,
            headers_to_set,
        } = self.decide(&config, routed.request(), &candidates, Admission::Skip)?;
        drop(candidates);
        routed.retarget(Retarget {
            cycle,
            targets: result.targets().to_vec(),
            result: Some(result),
            destination,
            headers_to_set,
        });
        Ok(())
    }
}

impl Director {
    /// The label value of model `name`: itself when known (objectives, rewrites, served
    /// before) or listed as a LoRA adapter by an endpoint (then remembered), else `other`.
    fn model_label(&self, name: &str) -> String {
        let known = &self.shared.metrics.known;
        if known.is_known(name) {
            return name.to_string();
        }
        let snap = self.endpoints.snapshot();
        let advertised = snap.endpoints.iter().any(|e| {
            let m = e.metrics();
            m.running_lora_adapters
                .iter()
                .chain(&m.waiting_lora_adapters)
                .any(|a| a == name)
        });
        if advertised {
            known.advertise(name);
            return name.to_string();
        }
        llmsched_core::labels::OTHER.to_string()
    }
}

/// The IP of a subset-hint entry (`ip:port`, `ip`, `[v6]:port` or `[v6]`); `None` for junk.
fn hint_ip(entry: &str) -> Option<std::net::IpAddr> {
    let s = entry.trim();
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    let host = match s.rfind(':') {
        Some(i) => &s[..i],
        None => s,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// A pre-request hook may redirect the request by setting the destination header (P/D's
/// `primaryPort`: the decode pick's address on its routing sidecar's port). The value is
/// taken out of the hook headers (the transport writes the destination itself); in-flight
/// accounting and the prefix index stay with the endpoints the scheduler chose. The last
/// non-empty value wins.
fn take_destination_override(headers_to_set: &mut Vec<(String, String)>) -> Option<String> {
    let mut found = None;
    headers_to_set.retain(|(k, v)| {
        if k.eq_ignore_ascii_case(header::DESTINATION_ENDPOINT) {
            if !v.trim().is_empty() {
                found = Some(v.trim().to_string());
            }
            false
        } else {
            true
        }
    });
    found
}

/// `ip:port[,ip:port...]`.
pub(crate) fn join_hostports(targets: &[Arc<Endpoint>]) -> String {
    let mut out = String::with_capacity(targets.len() * 22);
    for (i, t) in targets.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(t.hostport());
    }
    out
}

/// The prompt part of [`estimate_tokens`]: characters / 4, token ids counted exactly.
pub fn estimate_prompt_tokens(request: &InferenceRequest) -> u64 {
    match request.prompt() {
        Prompt::TokenIds(ids) => ids.len() as u64,
        p => (p.text_len() as u64).div_ceil(4),
    }
}

/// A rough token count for in-flight token accounting: prompt characters / 4 (token ids
/// counted exactly) plus `max_tokens` when given.
pub fn estimate_tokens(request: &InferenceRequest) -> u64 {
    let prompt = estimate_prompt_tokens(request);
    let max = request
        .body
        .as_ref()
        .and_then(|b| b.max_tokens)
        .unwrap_or(0);
    prompt.saturating_add(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_may_redirect_the_destination() {
        let mut h = vec![
            (
                "x-prefiller-host-port".to_string(),
                "10.0.0.1:8000".to_string(),
            ),
            (
                "X-Gateway-Destination-Endpoint".to_string(),
                "10.0.0.2:8200".to_string(),
            ),
            (
                "x-data-parallel-host-port".to_string(),
                "10.0.0.2:8001".to_string(),
            ),
        ];
        assert_eq!(
            take_destination_override(&mut h).as_deref(),
            Some("10.0.0.2:8200")
        );
        assert_eq!(h.len(), 2);
        assert!(h.iter().all(|(k, _)| !k.contains("destination")));
        let mut none = vec![(header::DESTINATION_ENDPOINT.to_string(), " ".to_string())];
        assert_eq!(take_destination_override(&mut none), None);
        assert!(none.is_empty());
    }

    #[test]
    fn subset_hint_entries() {
        assert_eq!(hint_ip("10.0.0.1:8000"), "10.0.0.1".parse().ok());
        assert_eq!(hint_ip("10.0.0.1"), "10.0.0.1".parse().ok());
        assert_eq!(hint_ip("[::1]:8000"), "::1".parse().ok());
        assert_eq!(hint_ip("[::1]"), "::1".parse().ok());
        assert_eq!(hint_ip("::1"), "::1".parse().ok());
        assert_eq!(hint_ip("pod-a:80"), None);
        assert_eq!(hint_ip(""), None);
    }
}
