//! [`Routed`]: a request that has a destination, from the routing decision to the end of its
//! response.
//!
//! `Routed` owns the response contract, so a transport is a thin loop over it:
//!
//! 1. forward [`Routed::forward_body`] to [`Routed::destination`] (setting
//!    [`Routed::headers_to_set`]) and, while the request is on its way, await
//!    [`Routed::after_dispatch`]: it lets the routing answer go out first, then runs the
//!    pre-request hooks' deferred bookkeeping;
//! 2. [`Routed::on_response_headers`] when the response's headers arrive (the headers to add
//!    come back);
//! 3. [`Routed::on_response_chunk`] for each chunk of the response body: it accounts the
//!    chunk (usage, streaming hooks, gateway failures) and returns the bytes to forward now,
//!    with the model name rewritten back where a rewrite changed it. A non-streaming body
//!    that must be rewritten (or every non-streaming body, when the transport asks for it
//!    with [`Routed::set_response_buffering`]) is held and comes back whole with its last
//!    chunk; one that outgrows the transport's limit is passed on unchanged from there;
//! 4. [`Routed::finish_response`] at the end (trailers, or the body's end): it returns what
//!    is still held, to forward before the end, and completes the request.
//!
//! [`Routed::set_served_endpoint`] moves the accounting when the gateway says a fallback
//! served the request. Dropping a `Routed` without finishing it (client disconnect, stream
//! reset, error) still runs the response-complete hooks, releases the in-flight counts and
//! the running-requests gauge: the accounting can never leak.
//!
//! The response also feeds the endpoint's health: a response from the endpoint counts as a
//! success, and a gateway's local reply saying it could not reach the endpoint (Envoy's
//! `503 upstream connect error or disconnect/reset before headers …`, `504 upstream request
//! timeout`, seen in the ext_proc response phase) is reported as a failure, which takes the
//! endpoint out of the candidates at once.
//!
//! With several profiles (P/D disaggregation), the first target of every profile other than
//! the primary one (the prefill endpoint) is charged too, with the prompt's estimated tokens,
//! from the routing decision until the response headers arrive: the decode endpoint's
//! routing sidecar answers only once the prefill hop is over, so that is when the prefill
//! endpoint's work for this request ends.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use llmsched_core::config::LoadedConfig;
use llmsched_core::endpoint::Endpoint;
use llmsched_core::health::FailureKind;
use llmsched_core::request::{Headers, InferenceRequest, ResponseInfo, Usage};
use llmsched_core::{CycleState, SchedulingResult};

use crate::director::{ActiveConfig, Shared};
use crate::flow::FlowTicket;
use crate::headers::is_event_stream;
use crate::health::is_gateway_failure;
use crate::metrics::{ModelLabels, ModelNameLabel};
use crate::usage::{ModelNameRewriter, ParsedUsage, SseUsageScanner, usage_from_json};

/// Error code label of responses whose status is not 200.
pub const MODEL_SERVER_ERROR: &str = "ModelServerError";

/// Largest non-streaming body the director buffers on its own to read usage (transports
/// that pass the whole body in one call are not limited).
const MAX_USAGE_BUFFER: usize = 16 << 20;

/// How a transport wants non-streaming response bodies held (see
/// [`Routed::set_response_buffering`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseBuffering {
    /// Hold every non-streaming body to its end (ext_proc: Envoy gets the body in one piece,
    /// as the reference EPP sends it), not only those whose model name is rewritten back
    /// (the proxy, which relays everything else as it comes).
    pub hold_all: bool,
    /// Most bytes held: a body that grows beyond it is passed on unchanged from the chunk
    /// that crosses it (no rewrite; usage only when the director's own bounded usage buffer
    /// saw it all). Default 64 MiB.
    pub limit: usize,
    /// Upper bound of the buffer pre-allocated from the response's `content-length` (a peer's
    /// announcement is only a hint; the buffer grows as bytes arrive, doubling, never beyond
    /// `limit`). Default 16 KiB.
    pub prealloc: usize,
}

impl Default for ResponseBuffering {
    fn default() -> Self {
        Self {
            hold_all: false,
            limit: 64 << 20,
            prealloc: 16 << 10,
        }
    }
}

/// Where the response body is.
#[derive(Debug)]
enum BodyState {
    /// Headers not seen yet, or a body relayed chunk by chunk.
    Relay,
    /// A non-streaming body held to its end.
    Held(Vec<u8>),
    /// A held body outgrew the limit: passed on unchanged from there.
    Passthrough,
    /// The body ended (end of stream seen).
    Ended,
}

/// Appends `chunk` to `buf` unless the result would be longer than `limit` (then `buf` is
/// left as it is and `false` returned). The capacity grows by doubling but never beyond
/// `limit`, so a buffer never holds more memory than the limit allows. (The transports
/// collect request bodies with it too.)
pub fn append_capped(buf: &mut Vec<u8>, chunk: &[u8], limit: usize) -> bool {
    let Some(need) = buf.len().checked_add(chunk.len()) else {
        return false;
    };
    if need > limit {
        return false;
    }
    if need > buf.capacity() {
        let target = buf.capacity().saturating_mul(2).max(need).min(limit);
        buf.reserve_exact(target - buf.len());
    }
    buf.extend_from_slice(chunk);
    true
}

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
    pub(crate) flow_ticket: Option<FlowTicket>,
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
    // Flow control's ticket: completed with the response's usage.
    flow_ticket: Option<FlowTicket>,
    // Other stages' endpoints (P/D prefill) and their tokens, until the response headers.
    stage_charges: Vec<(Arc<Endpoint>, u64)>,
    // Response state.
    response: ResponseInfo,
    headers_seen: bool,
    streaming: bool,
    sse: SseUsageScanner,
    json_buf: Vec<u8>,
    json_overflow: bool,
    rewriter: Option<ModelNameRewriter>,
    buffering: ResponseBuffering,
    body: BodyState,
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

/// A new decision for a request whose targets could not be reached (see
/// [`crate::Director::reroute`]).
pub(crate) struct Retarget {
    pub(crate) cycle: CycleState,
    pub(crate) result: Option<SchedulingResult>,
    pub(crate) targets: Vec<Arc<Endpoint>>,
    pub(crate) destination: String,
    pub(crate) headers_to_set: Vec<(String, String)>,
}

/// Charges (in flight) the first pick of every profile other than the primary one (P/D's
/// prefill endpoint), once per endpoint and never the primary target again; released when
/// the response headers arrive.
fn charge_stages(
    result: &SchedulingResult,
    charged: Option<&Arc<Endpoint>>,
    request: &InferenceRequest,
) -> Vec<(Arc<Endpoint>, u64)> {
    let mut stage_charges: Vec<(Arc<Endpoint>, u64)> = Vec::new();
    let prompt_tokens = crate::director::estimate_prompt_tokens(request);
    for (name, r) in &result.profiles {
        let Some(first) = r.targets.first() else {
            continue;
        };
        if *name == result.primary_profile
            || charged.is_some_and(|c| c.id() == first.id())
            || stage_charges.iter().any(|(e, _)| e.id() == first.id())
        {
            continue;
        }
        first.dispatch(prompt_tokens);
        stage_charges.push((first.clone(), prompt_tokens));
    }
    stage_charges
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
        let stage_charges = match (p.kind, &p.result) {
            (RouteKind::Scheduled, Some(result)) => {
                charge_stages(result, charged.as_ref(), &p.request)
            }
            _ => Vec::new(),
        };
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
            flow_ticket: p.flow_ticket,
            stage_charges,
            response: ResponseInfo::default(),
            headers_seen: false,
            streaming,
            sse: SseUsageScanner::new(),
            json_buf: Vec::new(),
            json_overflow: false,
            rewriter,
            buffering: ResponseBuffering::default(),
            body: BodyState::Relay,
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
    pub(crate) fn retarget(&mut self, decision: Retarget) {
        let Retarget {
            cycle,
            result,
            targets,
            destination,
            headers_to_set,
        } = decision;
        if let (Some(old), Some(new)) = (self.charged.take(), targets.first()) {
            old.complete(self.tokens);
            new.dispatch(self.tokens);
            self.charged = Some(new.clone());
        }
        self.release_stage_charges();
        if let Some(r) = &result {
            self.stage_charges = charge_stages(r, self.charged.as_ref(), &self.request);
        }
        self.destination = destination;
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

    /// The request has been handed to the transport's connection: await this while it goes
    /// out. It yields to the runtime once, so the task that writes the routing answer (or the
    /// request) runs first, then runs [`Self::run_after_dispatch`] — the pre-request hooks'
    /// bookkeeping stays off the decision's latency, as the reference keeps it. Returns at
    /// once when that work already ran (or there is none).
    pub async fn after_dispatch(&mut self) {
        if self.dispatched {
            return;
        }
        tokio::task::yield_now().await;
        self.run_after_dispatch();
    }

    /// Sets how non-streaming response bodies are held (before the response's headers; the
    /// default holds only bodies whose model name is rewritten back, up to 64 MiB).
    pub fn set_response_buffering(&mut self, buffering: ResponseBuffering) {
        self.buffering = buffering;
    }

    /// True when the response body forwarded may differ from the one received (the model
    /// name is rewritten back), so the upstream's `content-length` must not be forwarded.
    pub fn rewrites_response(&self) -> bool {
        self.kind == RouteKind::Scheduled && self.rewriter.is_some()
    }

    /// True while the response body is held (see [`Self::on_response_chunk`]).
    pub fn holds_response_body(&self) -> bool {
        matches!(self.body, BodyState::Held(_))
    }

    /// Response headers arrived. Runs the response-received hooks and returns the headers
    /// they want added to the client's response. A status other than 200 is counted as a
    /// model-server error when the request finishes. Decides whether the body is held (see
    /// [`Self::on_response_chunk`]).
    pub fn on_response_headers(&mut self, status: u16, headers: &Headers) -> Vec<(String, String)> {
        self.run_after_dispatch();
        self.release_stage_charges();
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
        if !self.streaming && (self.buffering.hold_all || self.rewrites_response()) {
            let announced = headers
                .get("content-length")
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let cap = announced
                .min(self.buffering.prealloc)
                .min(self.buffering.limit);
            self.body = BodyState::Held(Vec::with_capacity(cap));
        }
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

    /// One chunk of the response body (`end_of_stream` on the last one, when the transport
    /// knows it). Accounts it and returns the bytes to forward now:
    ///
    /// * a body relayed as it comes (streaming, or nothing to rewrite and not held): the
    ///   chunk, with `"model":"<target>"` turned back into the requested name when a rewrite
    ///   changed the model (the same buffer when nothing changes);
    /// * a held body: nothing until its last chunk, then the whole body, rewritten (a body
    ///   in one chunk is used as it is, no copy);
    /// * a held body that outgrows the limit: what was held plus this chunk, unchanged, and
    ///   every later chunk unchanged.
    ///
    /// Streaming bodies are scanned for usage as they pass; non-streaming bodies are parsed
    /// as JSON at the end. A body that is not JSON simply yields no usage.
    pub fn on_response_chunk(&mut self, chunk: Bytes, end_of_stream: bool) -> Bytes {
        match &mut self.body {
            BodyState::Held(buf) => {
                if buf.is_empty() && end_of_stream {
                    self.body = BodyState::Ended;
                    self.account_body(&chunk, true);
                    return self.rewrite(chunk);
                }
                if append_capped(buf, &chunk, self.buffering.limit) {
                    if !end_of_stream {
                        return Bytes::new();
                    }
                    let whole = Bytes::from(std::mem::take(buf));
                    self.body = BodyState::Ended;
                    self.account_body(&whole, true);
                    return self.rewrite(whole);
                }
                // Too large to hold: on unchanged from here.
                let mut held = std::mem::take(buf);
                tracing::debug!(
                    request_id = %self.request.request_id,
                    held = held.len(),
                    limit = self.buffering.limit,
                    "response body over the buffering limit; passing it through"
                );
                self.account_body(&held, false);
                self.account_body(&chunk, end_of_stream);
                self.body = if end_of_stream {
                    BodyState::Ended
                } else {
                    BodyState::Passthrough
                };
                held.reserve_exact(chunk.len());
                held.extend_from_slice(&chunk);
                Bytes::from(held)
            }
            BodyState::Passthrough => {
                if end_of_stream {
                    self.body = BodyState::Ended;
                }
                self.account_body(&chunk, end_of_stream);
                chunk
            }
            BodyState::Relay | BodyState::Ended => {
                if end_of_stream {
                    self.body = BodyState::Ended;
                }
                self.account_body(&chunk, end_of_stream);
                self.rewrite(chunk)
            }
        }
    }

    /// The response ended (its trailers arrived, or its body ended without a chunk marked
    /// `end_of_stream`): returns what is still held, rewritten (forward it before the end),
    /// then completes the request as [`Self::finish`] does.
    pub fn finish_response(mut self) -> Bytes {
        let out = match std::mem::replace(&mut self.body, BodyState::Ended) {
            BodyState::Held(buf) => {
                let whole = Bytes::from(buf);
                self.account_body(&whole, true);
                self.rewrite(whole)
            }
            BodyState::Relay | BodyState::Passthrough if self.headers_seen => {
                self.end_body();
                Bytes::new()
            }
            _ => Bytes::new(),
        };
        self.finalize(true);
        out
    }

    /// `chunk` with the model name rewritten back, when a rewrite changed it.
    fn rewrite(&self, chunk: Bytes) -> Bytes {
        match &self.rewriter {
            Some(r) if self.kind == RouteKind::Scheduled => match r.apply(&chunk) {
                Cow::Borrowed(_) => chunk,
                Cow::Owned(v) => Bytes::from(v),
            },
            _ => chunk,
        }
    }

    /// The body ended without a chunk saying so: a non-streaming body's buffered JSON is
    /// parsed now (a streaming body's scanner is flushed when the request finishes).
    fn end_body(&mut self) {
        if self.kind == RouteKind::Fallback || self.streaming {
            return;
        }
        if !self.json_overflow && !self.json_buf.is_empty() {
            let buf = std::mem::take(&mut self.json_buf);
            self.set_usage(usage_from_json(&buf));
        }
    }

    /// Accounts a chunk of the response body: gateway failures, usage, streaming hooks.
    /// Streaming bodies are scanned for usage as they pass; non-streaming bodies are parsed
    /// as JSON at the end (the whole body in one call with `end_of_stream` costs no copy).
    fn account_body(&mut self, chunk: &[u8], end_of_stream: bool) {
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

    /// Endpoints of the other stages (P/D prefill) charged for this request, until the
    /// response headers arrive.
    pub fn stage_endpoints(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.stage_charges.iter().map(|(e, _)| e)
    }

    fn release_stage_charges(&mut self) {
        for (e, tokens) in self.stage_charges.drain(..) {
            e.complete(tokens);
        }
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
        self.release_stage_charges();
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
        match self.flow_ticket.take() {
            Some(ticket) => ticket.complete(self.response.usage.as_ref()),
            None => {
                if let Some(flow) = &self.active.flow {
                    flow.notify();
                }
            }
        }
    }
}

impl Drop for Routed {
    fn drop(&mut self) {
        self.finalize(false);
    }
}
