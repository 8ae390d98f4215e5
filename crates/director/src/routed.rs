//! [`Routed`]: a request that has a destination, from the routing decision to the end of its
//! response.
//!
//! The transport forwards [`Routed::forward_body`] to [`Routed::destination`] (setting
//! [`Routed::headers_to_set`]), then reports the response: [`Routed::on_response_headers`],
//! [`Routed::on_response_body`] for each chunk (or once with the whole body), optionally
//! [`Routed::set_served_endpoint`] when the gateway says a fallback served it, and finally
//! [`Routed::finish`]. Dropping a `Routed` without finishing it (client disconnect, stream
//! reset, error) still runs the response-complete hooks, releases the in-flight counts and
//! the running-requests gauge: the accounting can never leak.
//!
//! The response also feeds the endpoint's health: a response from the endpoint counts as a
//! success, and a gateway's local reply saying it could not reach the endpoint (Envoy's
//! `503 upstream connect error or disconnect/reset before headers …`, `504 upstream request
//! timeout`, seen in the ext_proc response phase) is reported as a failure, which takes the
//! endpoint out of the candidates at once.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use llmsched_core::config::LoadedConfig;
use llmsched_core::endpoint::Endpoint;
use llmsched_core::health::FailureKind;
use llmsched_core::request::{Headers, InferenceRequest, ResponseInfo, Usage};
use llmsched_core::{CycleState, SchedulingResult};

use crate::director::{ActiveConfig, Shared, join_hostports};
use crate::headers::is_event_stream;
use crate::health::is_gateway_failure;
use crate::metrics::{ModelLabels, ModelNameLabel};
use crate::usage::{ModelNameRewriter, ParsedUsage, SseUsageScanner, usage_from_json};

/// Error code label of responses whose status is not 200.
pub const MODEL_SERVER_ERROR: &str = "ModelServerError";

/// Largest non-streaming body the director buffers on its own to read usage (transports
/// that pass the whole body in one call are not limited).
const MAX_USAGE_BUFFER: usize = 16 << 20;

/// How the destination was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// Scheduled by the configured scheduler; hooks, metrics and in-flight accounting apply.
    Scheduled,
    /// A random endpoint (header-only request, or the parser skipped the body): forwarded
    /// unchanged, no hooks, no accounting, as the reference does.
    Fallback,
}

pub(crate) struct RoutedParts {
    pub(crate) kind: RouteKind,
    pub(crate) request: InferenceRequest,
    pub(crate) cycle: CycleState,
    pub(crate) result: Option<SchedulingResult>,
    pub(crate) destination: String,
    pub(crate) targets: Vec<Arc<Endpoint>>,
    pub(crate) forward_body: Bytes,
    pub(crate) headers_to_set: Vec<(String, String)>,
    pub(crate) received_at: Instant,
    pub(crate) subset_hint: Option<Vec<String>>,
    pub(crate) labels: ModelLabels,
    pub(crate) tokens: u64,
    pub(crate) active: Arc<ActiveConfig>,
    pub(crate) shared: Arc<Shared>,
}

/// A routed request and its response state.
pub struct Routed {
    kind: RouteKind,
    request: InferenceRequest,
    cycle: CycleState,
    result: Option<SchedulingResult>,
    destination: String,
    targets: Vec<Arc<Endpoint>>,
    forward_body: Bytes,
    headers_to_set: Vec<(String, String)>,
    received_at: Instant,
    subset_hint: Option<Vec<String>>,
    // Metric label values, bounded and fixed when the request was routed.
    labels: ModelLabels,
    active: Arc<ActiveConfig>,
    shared: Arc<Shared>,
    // In-flight accounting: the endpoint charged and the tokens charged to it.
    charged: Option<Arc<Endpoint>>,
    tokens: u64,
    // Response state.
    response: ResponseInfo,
    headers_seen: bool,
    streaming: bool,
    sse: SseUsageScanner,
    json_buf: Vec<u8>,
    json_overflow: bool,
    rewriter: Option<ModelNameRewriter>,
    cached_reported: bool,
    finalized: bool,
    dispatched: bool,
    // The status says the gateway may have failed to reach the endpoint: look at the body.
    gateway_check: bool,
}

impl std::fmt::Debug for Routed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routed")
            .field("kind", &self.kind)
            .field("request_id", &self.request.request_id)
            .field("destination", &self.destination)
            .field("target_model", &self.request.target_model)
            .finish()
    }
}

impl Routed {
    pub(crate) fn new(p: RoutedParts) -> Self {
        let charged = match p.kind {
            RouteKind::Scheduled => p.targets.first().cloned(),
            RouteKind::Fallback => None,
        };
        if let Some(e) = &charged {
            e.dispatch(p.tokens);
        }
        let rewriter = ModelNameRewriter::new(&p.request.target_model, &p.request.incoming_model);
        let streaming = p.request.is_streaming();
        // Without a scheduling result (fallbacks) there is no hook work to defer.
        let dispatched = p.result.is_none();
        Self {
            kind: p.kind,
            request: p.request,
            cycle: p.cycle,
            result: p.result,
            destination: p.destination,
            targets: p.targets,
            forward_body: p.forward_body,
            headers_to_set: p.headers_to_set,
            received_at: p.received_at,
            subset_hint: p.subset_hint,
            labels: p.labels,
            active: p.active,
            shared: p.shared,
            charged,
            tokens: p.tokens,
            response: ResponseInfo::default(),
            headers_seen: false,
            streaming,
            sse: SseUsageScanner::new(),
            json_buf: Vec::new(),
            json_overflow: false,
            rewriter,
            cached_reported: false,
            finalized: false,
            dispatched,
            gateway_check: false,
        }
    }

    /// The gateway's subset hint the request was routed with.
    pub fn subset_hint(&self) -> Option<&[String]> {
        self.subset_hint.as_deref()
    }

    /// The configuration the request was routed with.
    pub(crate) fn config(&self) -> &Arc<LoadedConfig> {
        &self.active.config
    }

    /// New targets after [`crate::Director::reroute`]: the in-flight charge moves to the new
    /// primary, the destination, hook headers and cycle data are replaced, and the hooks'
    /// deferred bookkeeping is due again (for the new result).
    pub(crate) fn retarget(
        &mut self,
        cycle: CycleState,
        result: Option<SchedulingResult>,
        targets: Vec<Arc<Endpoint>>,
        headers_to_set: Vec<(String, String)>,
    ) {
        if let (Some(old), Some(new)) = (self.charged.take(), targets.first()) {
            old.complete(self.tokens);
            new.dispatch(self.tokens);
            self.charged = Some(new.clone());
        }
        self.destination = join_hostports(&targets);
        self.targets = targets;
        self.dispatched = result.is_none();
        self.result = result;
        self.cycle = cycle;
        self.headers_to_set = headers_to_set;
    }

    /// The endpoint that answered (or should have): the charged one, else the primary.
    fn answering_endpoint(&self) -> Option<&Arc<Endpoint>> {
        self.charged.as_ref().or_else(|| self.targets.first())
    }

    /// How the destination was chosen.
    pub fn kind(&self) -> RouteKind {
        self.kind
    }

    /// The request (headers include a generated `x-request-id` when the client sent none).
    pub fn request(&self) -> &InferenceRequest {
        &self.request
    }

    /// The request id.
    pub fn request_id(&self) -> &str {
        &self.request.request_id
    }

    /// Data producers' output for this request.
    pub fn cycle(&self) -> &CycleState {
        &self.cycle
    }

    /// The scheduling result (`None` for fallbacks).
    pub fn result(&self) -> Option<&SchedulingResult> {
        self.result.as_ref()
    }

    /// `ip:port[,ip:port...]`: the primary target first, then fallbacks.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// The targets, primary first.
    pub fn targets(&self) -> &[Arc<Endpoint>] {
        &self.targets
    }

    /// The body to forward (model rewritten to the target model when it changed).
    pub fn forward_body(&self) -> &Bytes {
        &self.forward_body
    }

    /// Headers the pre-request hooks want set on the forwarded request.
    pub fn headers_to_set(&self) -> &[(String, String)] {
        &self.headers_to_set
    }

    /// True when the response is (or is expected to be) a server-sent-event stream: the
    /// request asked for `stream: true`, or the response's content type says so.
    pub fn is_streaming(&self) -> bool {
        self.streaming
    }

    /// What is known of the response so far.
    pub fn response(&self) -> &ResponseInfo {
        &self.response
    }

    /// Usage reported by the model server, once seen.
    pub fn usage(&self) -> Option<Usage> {
        self.response.usage
    }

    /// The endpoint the in-flight counts are charged to.
    pub fn served_endpoint(&self) -> Option<&Arc<Endpoint>> {
        self.charged.as_ref()
    }

    /// True once [`Self::run_after_dispatch`] has run (or had nothing to run).
    pub fn is_dispatched(&self) -> bool {
        self.dispatched
    }

    /// The request is on its way (the gateway has the routing answer, or the endpoint has
    /// the request): runs the pre-request hooks' deferred bookkeeping
    /// ([`PreRequest::after_dispatch`](llmsched_core::plugin::PreRequest::after_dispatch)).
    /// Idempotent; also run by [`Self::on_response_headers`] and on drop, so a transport
    /// that never calls it loses nothing, it only keeps the work on the request's path.
    pub fn run_after_dispatch(&mut self) {
        if std::mem::replace(&mut self.dispatched, true) {
            return;
        }
        let Some(result) = &self.result else {
            return;
        };
        for (h, _) in &self.active.config.pre_request {
            h.after_dispatch(&self.request, &self.cycle, result);
        }
    }

    /// Response headers arrived. Runs the response-received hooks and returns the headers
    /// they want added to the client's response. A status other than 200 is counted as a
    /// model-server error when the request finishes.
    pub fn on_response_headers(&mut self, status: u16, headers: &Headers) -> Vec<(String, String)> {
        self.run_after_dispatch();
        self.gateway_check = matches!(status, 502..=504);
        if !self.gateway_check
            && let Some(e) = self.answering_endpoint()
        {
            e.record_success(&self.shared.health);
        }
        self.headers_seen = true;
        if (200..300).contains(&status) && self.kind == RouteKind::Scheduled {
            // A model server served this model: from now on it is a label value of its own.
            self.shared.metrics.known.learn(&self.request.target_model);
        }
        self.response.status = status;
        self.response.headers = headers.clone();
        if headers.get("content-type").is_some_and(is_event_stream) {
            self.streaming = true;
        }
        self.response.streaming = self.streaming;
        if self.kind == RouteKind::Fallback {
            return Vec::new();
        }
        let Some(target) = self.charged.clone() else {
            return Vec::new();
        };
        let hooks = self.active.hooks.clone();
        for (h, timers) in &hooks.hooks {
            let t0 = Instant::now();
            h.response_received(&self.request, &mut self.response, &target);
            timers[0].record(t0.elapsed());
        }
        std::mem::take(&mut self.response.headers_to_set)
    }

    /// A chunk of the response body passed (`end_of_stream` on the last one). Streaming
    /// bodies are scanned for usage as they pass; non-streaming bodies are parsed as JSON at
    /// the end (pass the whole body in one call with `end_of_stream` to avoid any copy).
    /// A body that is not JSON simply yields no usage.
    pub fn on_response_body(&mut self, chunk: &[u8], end_of_stream: bool) {
        self.response.body_bytes += chunk.len() as u64;
        if self.gateway_check && (!chunk.is_empty() || end_of_stream) {
            self.gateway_check = false;
            if is_gateway_failure(self.response.status, chunk)
                && let Some(e) = self.answering_endpoint()
            {
                let opened =
                    e.record_failure(FailureKind::Gateway, Instant::now(), &self.shared.health);
                if opened {
                    tracing::warn!(
                        request_id = %self.request.request_id,
                        endpoint = %e.name(),
                        status = self.response.status,
                        "the gateway could not reach the endpoint"
                    );
                } else {
                    tracing::debug!(
                        request_id = %self.request.request_id,
                        endpoint = %e.name(),
                        "the gateway could not reach the endpoint (already failing)"
                    );
                }
            }
        }
        if self.kind == RouteKind::Fallback {
            return;
        }
        if self.streaming {
            self.sse.feed(chunk);
            if end_of_stream {
                self.sse.finish();
            }
            self.take_sse_usage();
            if let Some(target) = self.charged.clone() {
                let hooks = self.active.hooks.clone();
                for (h, timers) in &hooks.hooks {
                    let t0 = Instant::now();
                    h.response_streaming(&self.request, &self.response, chunk, &target);
                    timers[1].record(t0.elapsed());
                }
            }
            return;
        }
        if end_of_stream && self.json_buf.is_empty() && !self.json_overflow {
            self.set_usage(usage_from_json(chunk));
            return;
        }
        if !self.json_overflow {
            if self.json_buf.len() + chunk.len() > MAX_USAGE_BUFFER {
                self.json_overflow = true;
                self.json_buf = Vec::new();
            } else {
                self.json_buf.extend_from_slice(chunk);
            }
        }
        if end_of_stream && !self.json_overflow {
            let buf = std::mem::take(&mut self.json_buf);
            self.set_usage(usage_from_json(&buf));
        }
    }

    fn take_sse_usage(&mut self) {
        let u = self.sse.parsed();
        self.set_usage(u);
    }

    fn set_usage(&mut self, parsed: Option<ParsedUsage>) {
        if let Some(p) = parsed {
            self.response.usage = Some(p.usage);
            self.cached_reported = p.cached_reported;
        }
    }

    /// Rewrites `"model":"<target>"` back to the requested model name in a response chunk,
    /// as the reference does; borrowed when nothing changes.
    pub fn rewrite_response_model<'a>(&self, chunk: &'a [u8]) -> Cow<'a, [u8]> {
        match &self.rewriter {
            Some(r) if self.kind == RouteKind::Scheduled => r.apply(chunk),
            _ => Cow::Borrowed(chunk),
        }
    }

    /// The gateway reports which endpoint really served the request (a fallback from the
    /// destination list, or any `ip:port`): the in-flight counts move there.
    pub fn set_served_endpoint(&mut self, hostport: &str) {
        let hostport = hostport.trim();
        let Some(current) = &self.charged else {
            return;
        };
        if current.hostport() == hostport || hostport.is_empty() {
            return;
        }
        let next = self
            .targets
            .iter()
            .find(|t| t.hostport() == hostport)
            .cloned()
            .or_else(|| {
                self.shared
                    .endpoints
                    .snapshot()
                    .by_hostport(hostport)
                    .cloned()
            });
        let Some(next) = next else {
            tracing::debug!(request_id = %self.request.request_id, served = hostport, "served endpoint is not in the pool");
            return;
        };
        current.complete(self.tokens);
        next.dispatch(self.tokens);
        self.charged = Some(next);
    }

    /// The response completed: response-complete hooks, request metrics (duration, sizes,
    /// tokens, NTPOT), in-flight release.
    pub fn finish(mut self) {
        self.finalize(true);
    }

    fn finalize(&mut self, completed: bool) {
        if self.finalized {
            return;
        }
        self.run_after_dispatch();
        self.finalized = true;
        if self.kind == RouteKind::Fallback {
            return;
        }
        if completed && self.streaming {
            self.sse.finish();
            self.take_sse_usage();
        }
        let m = &self.shared.metrics;
        let labels = &self.labels;
        if let Some(ep) = self.charged.clone() {
            let hooks = self.active.hooks.clone();
            for (h, timers) in &hooks.hooks {
                let t0 = Instant::now();
                h.response_complete(&self.request, &self.response, &ep);
                timers[2].record(t0.elapsed());
            }
            ep.complete(self.tokens);
        }
        if self.headers_seen && self.response.status != 200 {
            m.record_error(
                &labels.model_name,
                &labels.target_model_name,
                MODEL_SERVER_ERROR,
            );
        }
        if !labels.model_name.is_empty() {
            m.running_requests
                .get_or_create(&ModelNameLabel {
                    model_name: labels.model_name.clone(),
                })
                .dec();
        }
        if completed {
            let elapsed = self.received_at.elapsed();
            if !elapsed.is_zero() {
                m.request_duration
                    .get_or_create(labels)
                    .observe(elapsed.as_secs_f64());
            }
            m.response_sizes
                .get_or_create(labels)
                .observe(self.response.body_bytes as f64);
            if let Some(u) = self.response.usage {
                if u.prompt_tokens > 0 {
                    m.input_tokens
                        .get_or_create(labels)
                        .observe(u.prompt_tokens as f64);
                }
                if u.completion_tokens > 0 {
                    m.output_tokens
                        .get_or_create(labels)
                        .observe(u.completion_tokens as f64);
                    if !elapsed.is_zero() {
                        m.ntpot
                            .get_or_create(labels)
                            .observe(elapsed.as_secs_f64() / u.completion_tokens as f64);
                    }
                }
                if self.cached_reported {
                    m.prompt_cached_tokens
                        .get_or_create(labels)
                        .observe(u.cached_tokens as f64);
                }
            }
        }
        if let Some(flow) = &self.active.flow {
            flow.notify();
        }
    }
}

impl Drop for Routed {
    fn drop(&mut self) {
        self.finalize(false);
    }
}
