//! One request through the proxy: collect, route with the director (or a baseline), forward
//! with fallbacks, relay the response.
//!
//! Every failure seen on the way to an endpoint is reported to its health: a refused
//! connection (`connect`: the next target is tried, and when the targets run out the request
//! is scheduled again without them, [`ProxyOptions::max_reroutes`] times), a connection that
//! broke before the response (`reset`), no response headers within
//! [`ProxyOptions::upstream_timeout`] (`timeout`: 504). A request is never sent again once it
//! may have reached a model server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use llmsched_core::endpoint::{Endpoint, EndpointId};
use llmsched_core::error::InferenceError;
use llmsched_core::health::{FailureKind, is_local_resource_error};
use llmsched_core::request::header as names;
use llmsched_director::{Director, IncomingRequest, Phase, ResponseBuffering, RouteKind, Routed};
use llmsched_pdsidecar::{PREFILLER_HOST_PORT, PdRouter, Upstream as PdUpstream};
use rand::Rng;

use crate::body::{
    Accounting, InflightGuard, MAX_PREALLOC_BYTES, ProxyBody, Upstream, read_request_body,
};
use crate::headers::{director_headers, response_headers, set, strip_hop_by_hop, subset_hint};
use crate::timeout::{IdleTimeout, UpstreamBody};
use crate::{Baseline, ProxyOptions, UpstreamProtocol};

/// Retries of an upstream connection that failed for want of a local file descriptor (each
/// after closing an idle client connection).
const FD_RETRIES: u32 = 3;

type UpstreamClient = Client<HttpConnector, Full<Bytes>>;

/// Shared state of the proxy: the director, the upstream connection pools and options.
pub(crate) struct Proxy {
    director: Arc<Director>,
    client: UpstreamClient,
    options: ProxyOptions,
    next: AtomicUsize,
}

/// Why forwarding failed before a response arrived.
struct UpstreamFailure {
    /// Every target tried.
    tried: Vec<String>,
    /// The last error.
    error: String,
    /// Only connections were refused: the request reached no model server.
    connect_only: bool,
    /// No response headers within the upstream timeout.
    timed_out: bool,
}

impl Proxy {
    pub(crate) fn new(director: Arc<Director>, options: ProxyOptions) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(options.connect_timeout));
        connector.enforce_http(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(options.pool_idle_timeout)
            .pool_max_idle_per_host(options.pool_max_idle_per_host)
            // The proxy sets `host` itself (the client's authority, as Envoy forwards it).
            .set_host(false);
        if options.upstream_protocol == UpstreamProtocol::H2c {
            builder
                .http2_only(true)
                .http2_adaptive_window(true)
                .http2_keep_alive_interval(Some(std::time::Duration::from_secs(30)));
        }
        Self {
            client: builder.build(connector),
            director,
            options,
            next: AtomicUsize::new(0),
        }
    }

    /// Serves one request. Never fails: every error becomes a response.
    pub(crate) async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let received_at = Instant::now();
        let (mut parts, body) = req.into_parts();
        let header_only = body.is_end_stream();
        let hint = if self.options.subset_hint_header {
            subset_hint(&parts.headers)
        } else {
            None
        };
        parts.headers.remove(names::DESTINATION_ENDPOINT_SUBSET);

        if let Some(b) = self.options.baseline {
            return self.baseline(b, parts, body, header_only).await;
        }
        if let Some(pd) = &self.options.pd_router
            && header_only
            && parts.method == http::Method::GET
            && parts.uri.path() == llmsched_pdsidecar::METRICS_PATH
        {
            // The in-process P/D router's own metrics, where a sidecar serves them.
            let mut r = Response::new(ProxyBody::full(pd.metrics().render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            return r;
        }

        let headers = director_headers(&parts);
        if header_only {
            // As the ext_proc path: no body, no parsing; a random endpoint.
            return match self.director.route_without_body(headers, received_at) {
                Ok(routed) => self.forward(parts, routed, false).await,
                Err(e) => error_response(&e),
            };
        }
        let body = match self.read_body(&parts.headers, body).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        self.director
            .metrics()
            .observe_phase(Phase::BodyBuffering, received_at.elapsed());
        let incoming = IncomingRequest {
            headers,
            body,
            subset_hint: hint,
            received_at,
        };
        // A client that disconnects while the request waits (flow control) drops this
        // future, which takes the request out of the queue.
        match self.director.route(incoming).await {
            Ok(routed) => self.forward(parts, routed, true).await,
            Err(e) => {
                tracing::debug!(error = %e, "request rejected");
                error_response(&e)
            }
        }
    }

    /// Reads the whole request body within the size limit ([`crate::body::read_request_body`]:
    /// nothing pre-sized from `content-length`); errors become the client's answer.
    async fn read_body(
        &self,
        headers: &HeaderMap,
        body: Incoming,
    ) -> Result<Bytes, Response<ProxyBody>> {
        let limit = self.options.max_body_bytes;
        let stalled = Arc::new(AtomicBool::new(false));
        let body =
            IdleTimeout::new(body, self.options.request_body_timeout).with_flag(stalled.clone());
        read_request_body(headers, body, limit).await.map_err(|e| {
            if stalled.load(Ordering::Acquire) {
                return request_timeout(self.options.request_body_timeout);
            }
            let e = e.to_inference_error(limit);
            if self.options.baseline.is_none() {
                self.director
                    .metrics()
                    .record_error("", "", e.code.as_str());
            }
            error_response(&e)
        })
    }

    /// Forwards a routed request to its targets in order (the next one only when connecting
    /// to the previous one failed; when all of them refused, the director schedules it again
    /// without them) and relays the response.
    async fn forward(
        &self,
        mut parts: Parts,
        mut routed: Routed,
        has_body: bool,
    ) -> Response<ProxyBody> {
        let body = routed.forward_body().clone();
        prepare_request_headers(&mut parts, has_body.then_some(body.len()));
        let targets: Vec<Arc<Endpoint>> = routed.targets().to_vec();
        if let Some(pd) = &self.options.pd_router
            && let Some(decoder) = targets.first()
        {
            let mut headers = parts.headers.clone();
            set_routing_headers(&mut headers, &routed);
            if headers.contains_key(PREFILLER_HOST_PORT) {
                parts.headers = headers;
                return self.forward_pd(pd, parts, body, decoder, routed).await;
            }
        }
        let mut failed: Vec<EndpointId> = Vec::new();
        let mut tried: Vec<String> = Vec::new();
        let mut reroutes = 0;
        loop {
            let mut headers = parts.headers.clone();
            set_routing_headers(&mut headers, &routed);
            let targets: Vec<Arc<Endpoint>> = routed.targets().to_vec();
            // The hooks' deferred bookkeeping runs while the endpoint works on the request:
            // the send is polled first (handing the request to its connection), then
            // `Routed` yields so the connection writes it, then the bookkeeping runs.
            let (sent, ()) = tokio::join!(
                self.send(&parts.method, &parts.uri, headers, &body, &targets),
                routed.after_dispatch()
            );
            let mut f = match sent {
                Ok((resp, served)) => {
                    if served > 0
                        && let Some(t) = targets.get(served)
                    {
                        routed.set_served_endpoint(t.hostport());
                    }
                    if !tried.is_empty() {
                        tracing::info!(
                            request_id = %routed.request_id(),
                            served = %routed.destination(),
                            refused = ?tried,
                            "rescheduled after connection failures: served"
                        );
                    }
                    let served = targets.get(served).cloned();
                    // A request the parser skipped has no response phase in the ext_proc
                    // path (the stream closes after routing), hence no marker header there.
                    let marker = !(has_body && routed.kind() == RouteKind::Fallback);
                    return self
                        .relay(resp.map(Upstream::Hyper), routed, marker, served)
                        .await;
                }
                Err(f) => f,
            };
            tried.append(&mut f.tried);
            f.tried = tried.clone();
            if !f.connect_only || reroutes >= self.options.max_reroutes {
                return upstream_failure(&f);
            }
            failed.extend(targets.iter().map(|t| t.id()));
            if let Err(e) = self.director.reroute(&mut routed, &failed) {
                tracing::debug!(error = %e, refused = ?tried, "no endpoint left to reschedule on");
                return upstream_failure(&f);
            }
            reroutes += 1;
        }
    }

    /// A disaggregated decision (the P/D profile set `x-prefiller-host-port`): the sidecar's
    /// [`PdRouter`] runs in process — prefill hop on the named prefill endpoint, then the
    /// decode hop on the decode pick with the returned `kv_transfer_params` — and its answer
    /// is relayed like any other (response hooks, usage, in-flight accounting). A prefiller
    /// that fails is retried and then replaced by a local prefill on the decoder, as the
    /// sidecar does; a decode endpoint that cannot be reached is the router's 503.
    async fn forward_pd(
        &self,
        pd: &PdRouter,
        parts: Parts,
        body: Bytes,
        decoder: &Arc<Endpoint>,
        mut routed: Routed,
    ) -> Response<ProxyBody> {
        let upstream = match PdUpstream::parse(decoder.hostport()) {
            Ok(u) => u,
            Err(e) => {
                return upstream_failure(&UpstreamFailure {
                    tried: vec![decoder.hostport().to_string()],
                    error: e.to_string(),
                    connect_only: false,
                    timed_out: false,
                });
            }
        };
        let req = Request::from_parts(parts, Full::new(body));
        let (resp, ()) = tokio::join!(pd.handle_with_decoder(req, &upstream), async {
            tokio::task::yield_now().await;
            routed.run_after_dispatch();
        });
        let decoder = Some(decoder.clone());
        self.relay(resp.map(Upstream::Pd), routed, true, decoder)
            .await
    }

    /// A baseline request: an endpoint in turn or at random, the body forwarded unchanged.
    async fn baseline(
        &self,
        baseline: Baseline,
        mut parts: Parts,
        body: Incoming,
        header_only: bool,
    ) -> Response<ProxyBody> {
        let snap = self.director.endpoints().snapshot();
        if snap.endpoints.is_empty() {
            return error_response(&InferenceError::service_unavailable(
                llmsched_director::director::MSG_NO_CANDIDATES,
            ));
        }
        let n = snap.endpoints.len();
        let first = match baseline {
            Baseline::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            Baseline::Random => rand::rng().random_range(0..n),
        };
        let body = if header_only {
            Bytes::new()
        } else {
            match self.read_body(&parts.headers, body).await {
                Ok(b) => b,
                Err(resp) => return resp,
            }
        };
        prepare_request_headers(&mut parts, (!header_only).then_some(body.len()));
        // Connect failures move on to the following endpoints, as a load balancer retries.
        let targets: Vec<Arc<Endpoint>> = (0..n.min(self.options.baseline_attempts.max(1)))
            .map(|i| snap.endpoints[(first + i) % n].clone())
            .collect();
        let mut guard = InflightGuard::new(targets[0].clone());
        match self
            .send(&parts.method, &parts.uri, parts.headers, &body, &targets)
            .await
        {
            Ok((resp, served)) => {
                let served = targets.get(served).unwrap_or(&targets[0]).clone();
                guard.move_to(served.clone());
                let (mut rparts, incoming) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                Response::from_parts(
                    rparts,
                    ProxyBody::relay(
                        self.upstream_body(Upstream::Hyper(incoming), served),
                        Accounting::Baseline(guard),
                    ),
                )
            }
            Err(f) => upstream_failure(&f),
        }
    }

    /// Sends the request to `targets` in order until one accepts the connection. Every
    /// failure is reported to the endpoint's health; after a failure that is not a refused
    /// connection the request may have reached the model server, so no other target is
    /// tried.
    async fn send(
        &self,
        method: &Method,
        uri: &Uri,
        mut headers: HeaderMap,
        body: &Bytes,
        targets: &[Arc<Endpoint>],
    ) -> Result<(Response<Incoming>, usize), UpstreamFailure> {
        let pq = uri.path_and_query();
        let policy = self.director.health_policy();
        let mut tried = Vec::new();
        let mut last = String::from("no endpoint to send to");
        for (i, target) in targets.iter().enumerate() {
            let uri = match upstream_uri(target.hostport(), pq) {
                Ok(u) => u,
                Err(e) => {
                    last = format!("invalid upstream address {}: {e}", target.hostport());
                    tried.push(target.hostport().to_string());
                    continue;
                }
            };
            let mut fd_retries = 0;
            let outcome = loop {
                let mut req = Request::new(Full::new(body.clone()));
                *req.method_mut() = method.clone();
                *req.uri_mut() = uri.clone();
                // The headers are kept only while a fallback or a retry may still need them.
                *req.headers_mut() = if i + 1 < targets.len() || fd_retries < FD_RETRIES {
                    headers.clone()
                } else {
                    std::mem::take(&mut headers)
                };
                if !req.headers().contains_key(header::HOST)
                    && let Ok(v) = HeaderValue::from_str(target.hostport())
                {
                    req.headers_mut().insert(header::HOST, v);
                }
                let outcome =
                    with_timeout(self.options.upstream_timeout, self.client.request(req)).await;
                // Out of file descriptors: the process's listeners close an idle client
                // connection to make room, and the same endpoint is tried again (it is not
                // at fault, and the request has not left this process).
                if let Some(Err(e)) = &outcome
                    && e.is_connect()
                    && is_local_resource_error(e)
                    && fd_retries < FD_RETRIES
                    && llmsched_listener::free_descriptor()
                {
                    fd_retries += 1;
                    tracing::debug!(
                        endpoint = target.hostport(),
                        "out of descriptors for an upstream connection: closed an idle client connection, retrying"
                    );
                    tokio::task::yield_now().await;
                    continue;
                }
                break outcome;
            };
            tried.push(target.hostport().to_string());
            let e = match outcome {
                Some(Ok(resp)) => {
                    tried.pop();
                    if i > 0 {
                        tracing::info!(served = target.hostport(), failed = ?tried, "a fallback endpoint served the request");
                    }
                    return Ok((resp, i));
                }
                Some(Err(e)) => e,
                None => {
                    tracing::warn!(
                        endpoint = target.hostport(),
                        timeout = ?self.options.upstream_timeout,
                        "no response headers from the endpoint in time"
                    );
                    target.record_failure(FailureKind::Timeout, Instant::now(), policy);
                    return Err(UpstreamFailure {
                        tried,
                        error: format!(
                            "no response headers within {:?}",
                            self.options.upstream_timeout
                        ),
                        connect_only: false,
                        timed_out: true,
                    });
                }
            };
            last = error_chain(&e);
            if e.is_connect() {
                tracing::warn!(endpoint = target.hostport(), error = %last, "cannot connect to the endpoint");
                // Out of descriptors or ports here is not the endpoint's fault.
                if !is_local_resource_error(&e) {
                    target.record_failure(FailureKind::Connect, Instant::now(), policy);
                }
                continue;
            }
            // The request may have reached the model server: never resend it.
            tracing::warn!(endpoint = target.hostport(), error = %last, "upstream request failed");
            target.record_failure(FailureKind::Reset, Instant::now(), policy);
            return Err(UpstreamFailure {
                tried,
                error: last,
                connect_only: false,
                timed_out: false,
            });
        }
        Err(UpstreamFailure {
            tried,
            error: last,
            connect_only: true,
            timed_out: false,
        })
    }

    /// The upstream response body with the idle timeout and health reports.
    fn upstream_body(&self, incoming: Upstream, endpoint: Arc<Endpoint>) -> UpstreamBody {
        UpstreamBody::new(
            incoming,
            self.options.upstream_timeout,
            endpoint,
            self.director.health_policy().clone(),
        )
    }

    /// Relays the response of a routed request: response hooks on the headers, then the
    /// body frame by frame through [`Routed::on_response_chunk`]. A body the director holds
    /// (non-streaming, its model name rewritten back) is read whole first, so the client gets
    /// it with its exact `content-length`; one that outgrows the limit is relayed unchanged
    /// from there.
    async fn relay(
        &self,
        resp: Response<Upstream>,
        mut routed: Routed,
        marker: bool,
        served: Option<Arc<Endpoint>>,
    ) -> Response<ProxyBody> {
        let (mut parts, incoming) = resp.into_parts();
        let Some(served) = served.or_else(|| routed.targets().first().cloned()) else {
            return upstream_failure(&UpstreamFailure {
                tried: Vec::new(),
                error: "no endpoint".into(),
                connect_only: false,
                timed_out: false,
            });
        };
        let mut incoming = self.upstream_body(incoming, served);
        routed.set_response_buffering(ResponseBuffering {
            hold_all: false,
            limit: self.options.max_body_bytes,
            prealloc: MAX_PREALLOC_BYTES,
        });
        let status = parts.status.as_u16();
        let extra = routed.on_response_headers(status, &response_headers(status, &parts.headers));
        strip_hop_by_hop(&mut parts.headers);
        if marker {
            parts.headers.insert(
                names::WENT_INTO_RESP_HEADERS,
                HeaderValue::from_static("true"),
            );
        }
        for (k, v) in &extra {
            set(&mut parts.headers, k, v);
        }
        if routed.rewrites_response() {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        if !routed.holds_response_body() {
            let body = ProxyBody::relay(incoming, Accounting::Routed(Box::new(routed)));
            return Response::from_parts(parts, body);
        }
        let mut whole = Bytes::new();
        while let Some(frame) = incoming.frame().await {
            let data = match frame.map(Frame::into_data) {
                Ok(Ok(data)) => data,
                // Trailers of a non-streaming response: dropped, as a whole body has none.
                Ok(Err(_)) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the upstream response failed");
                    return upstream_failure(&UpstreamFailure {
                        tried: vec![routed.destination().to_string()],
                        error: e.to_string(),
                        connect_only: false,
                        timed_out: crate::timeout::is_idle_timeout(&*e),
                    });
                }
            };
            let eos = incoming.is_end_stream();
            let out = routed.on_response_chunk(data, eos);
            if eos {
                whole = out;
                break;
            }
            if !routed.holds_response_body() {
                // Too large to hold: what was held and the rest go on unchanged.
                let body =
                    ProxyBody::relay_after(out, incoming, Accounting::Routed(Box::new(routed)));
                return Response::from_parts(parts, body);
            }
        }
        let rest = routed.finish_response();
        if whole.is_empty() {
            whole = rest;
        }
        if let Ok(v) = HeaderValue::from_str(&whole.len().to_string()) {
            parts.headers.insert(header::CONTENT_LENGTH, v);
        }
        Response::from_parts(parts, ProxyBody::full(whole))
    }
}

/// Headers of the forwarded request: hop-by-hop removed, `host` kept (or taken from the
/// HTTP/2 `:authority`), `content-length` of the forwarded body.
fn prepare_request_headers(parts: &mut Parts, body_len: Option<usize>) {
    let authority = crate::headers::authority(parts).map(str::to_string);
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::EXPECT);
    if !parts.headers.contains_key(header::HOST)
        && let Some(a) = authority.and_then(|a| HeaderValue::from_str(&a).ok())
    {
        parts.headers.insert(header::HOST, a);
    }
    match body_len {
        Some(n) => {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        None => {
            parts.headers.remove(header::CONTENT_LENGTH);
        }
    }
}

/// What the ext_proc path sets on the request: the request id (generated when missing),
/// the destination header and the pre-request hooks' headers.
fn set_routing_headers(headers: &mut HeaderMap, routed: &Routed) {
    if !headers.contains_key(names::REQUEST_ID) {
        set(headers, names::REQUEST_ID, routed.request_id());
    }
    set(headers, names::DESTINATION_ENDPOINT, routed.destination());
    for (k, v) in routed.headers_to_set() {
        set(headers, k, v);
    }
}

fn upstream_uri(hostport: &str, pq: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(Authority::try_from(hostport)?)
        .path_and_query(
            pq.cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        )
        .build()
}

/// `error` and its sources, joined with `: `.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut s = error.to_string();
    let mut cur = error.source();
    while let Some(e) = cur {
        let msg = e.to_string();
        if !s.ends_with(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = e.source();
    }
    s
}

/// The client stalled its request body: 408, and the connection is closed.
fn request_timeout(idle: Duration) -> Response<ProxyBody> {
    let mut r = text_response(
        StatusCode::REQUEST_TIMEOUT,
        format!("request body timeout: no data for {idle:?}"),
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// `fut`, bounded by `limit` (zero: unbounded); `None` when the time ran out.
async fn with_timeout<F: std::future::Future>(limit: Duration, fut: F) -> Option<F::Output> {
    if limit.is_zero() {
        return Some(fut.await);
    }
    tokio::time::timeout(limit, fut).await.ok()
}

fn text_response(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// The response of an [`InferenceError`]: its status, body
/// `inference error: <Code> - <message>` and headers, exactly as the ext_proc path's
/// immediate response.
pub(crate) fn error_response(e: &InferenceError) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = text_response(status, e.body());
    for (k, v) in &e.headers {
        set(r.headers_mut(), k, v);
    }
    r
}

/// No endpoint answered: 503, as Envoy answers when its upstream connection fails; 504
/// `upstream request timeout`, Envoy's answer, when no response came in time.
fn upstream_failure(f: &UpstreamFailure) -> Response<ProxyBody> {
    if f.timed_out {
        return text_response(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream request timeout".to_string(),
        );
    }
    text_response(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "upstream connect error or disconnect/reset before headers: endpoints tried: [{}]: {}",
            f.tried.join(", "),
            f.error
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_responses_match_the_ext_proc_path() {
        let e = InferenceError::resource_exhausted("queue full")
            .with_header("x-llm-d-request-dropped-reason", "rejected-saturated");
        let r = error_response(&e);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            r.headers()["x-llm-d-request-dropped-reason"],
            "rejected-saturated"
        );
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/plain");
        assert_eq!(
            r.body().size_hint().exact(),
            Some("inference error: ResourceExhausted - queue full".len() as u64)
        );
    }

    #[test]
    fn upstream_uris() {
        let pq = PathAndQuery::from_static("/v1/models?x=1");
        let u = upstream_uri("10.0.0.1:8000", Some(&pq)).unwrap();
        assert_eq!(u.to_string(), "http://10.0.0.1:8000/v1/models?x=1");
        let u = upstream_uri("[::1]:8000", None).unwrap();
        assert_eq!(u.to_string(), "http://[::1]:8000/");
        assert!(upstream_uri("not a host", None).is_err());
    }

    #[test]
    fn forwarded_request_headers() {
        let (mut p, ()) = http::Request::post("/v1/completions")
            .header("host", "gw")
            .header("content-length", "10")
            .header("expect", "100-continue")
            .header("transfer-encoding", "chunked")
            .body(())
            .unwrap()
            .into_parts();
        prepare_request_headers(&mut p, Some(42));
        assert_eq!(p.headers[header::CONTENT_LENGTH], "42");
        assert_eq!(p.headers[header::HOST], "gw");
        assert!(!p.headers.contains_key(header::EXPECT));
        assert!(!p.headers.contains_key(header::TRANSFER_ENCODING));
        let (mut p, ()) = http::Request::get("http://gw2/v1/models")
            .version(http::Version::HTTP_2)
            .body(())
            .unwrap()
            .into_parts();
        prepare_request_headers(&mut p, None);
        assert_eq!(p.headers[header::HOST], "gw2");
        assert!(!p.headers.contains_key(header::CONTENT_LENGTH));
    }
}
