//! [`PdRouter`]: the sidecar's request handling, usable in-process.
//!
//! For `POST /v1/completions`, `/v1/chat/completions` and `/v1/responses` carrying
//! `x-prefiller-host-port`:
//!
//! 1. the header is parsed (400 if malformed) and checked against the SSRF allowlist (403);
//! 2. the body is read (413 beyond `max_body_bytes`) and parsed (400 unless a JSON object);
//! 3. the **prefill hop** sends [`prefill_body`] to the prefiller (same path, the client's
//!    headers, an `x-request-id` shared by both hops). Connect errors and 5xx answers are
//!    retried `prefill_max_retries` times with exponential backoff; a 4xx (400–451) is relayed
//!    to the client as it is (the request is wrong, not the prefiller); anything else that
//!    fails — retries exhausted, timeout, a 2xx without usable `kv_transfer_params` — falls
//!    back to a local prefill on the decoder (logged, counted by reason);
//! 4. the **decode hop** sends the original body with the returned `kv_transfer_params` to
//!    the decode replica and relays its answer frame by frame (streams stay streams), with
//!    `usage.prompt_tokens_details.cached_tokens` set to the prefill replica's value (as the
//!    reference does; see [`crate::usage`]).
//!
//! Everything else — other paths and methods, requests without the header — is passed to the
//! decode replica untouched, bodies streamed in both directions. `GET /health` is answered by
//! the sidecar itself (as the reference) and `GET /pd-sidecar/metrics` returns its own
//! metrics (`/metrics` is the decode replica's, for the EPP's scraper).
//!
//! A client that goes away cancels everything: the handler future is dropped with the
//! connection, which drops an in-flight prefill request or the decode stream, and the
//! replicas see their connection close (vLLM and the simulator then abort the request).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use rand::Rng;
use serde_json::{Map, Value};

use crate::allowlist::Allowlist;
use crate::body::{InflightGuard, ProxyBody, Rewrite};
use crate::client::{self, BoxError, ReqBody, UpstreamClient};
use crate::error::SidecarError;
use crate::header::{self as prefiller, PREFILLER_HOST_PORT, Target};
use crate::metrics::SidecarMetrics;
use crate::transform::{ApiKind, cached_tokens, decode_body, prefill_body};
use crate::usage::SseRewriter;

/// Path of the sidecar's own metrics on its main port.
pub const METRICS_PATH: &str = "/pd-sidecar/metrics";

/// Largest prefill answer read.
const MAX_PREFILL_RESPONSE: usize = 16 << 20;

const REQUEST_ID: &str = "x-request-id";

/// Hop-by-hop headers (RFC 9110 §7.6.1): never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Where the decode replica is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// `host:port`.
    pub authority: Authority,
}

impl Upstream {
    /// Parses `http://host:port`, `https://host:port` or `host:port` (plain HTTP).
    pub fn parse(s: &str) -> Result<Self, SidecarError> {
        let with_scheme = if s.contains("://") {
            s.to_string()
        } else {
            format!("http://{s}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|e| SidecarError::Config(format!("invalid upstream {s:?}: {e}")))?;
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(SidecarError::Config(format!(
                "upstream {s:?}: the scheme must be http or https"
            )));
        }
        let authority = uri
            .authority()
            .cloned()
            .filter(|a| a.port_u16().is_some())
            .ok_or_else(|| SidecarError::Config(format!("upstream {s:?} needs host:port")))?;
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(SidecarError::Config(format!(
                "upstream {s:?} must not have a path"
            )));
        }
        Ok(Self { scheme, authority })
    }
}

/// Settings of a [`PdRouter`].
#[derive(Debug, Clone)]
pub struct PdRouterConfig {
    /// The decode replica this sidecar fronts.
    pub decoder: Upstream,
    /// Call prefillers over TLS (`--enable-tls prefiller`).
    pub prefill_tls: bool,
    /// Do not verify prefillers' certificates.
    pub prefill_insecure_skip_verify: bool,
    /// Do not verify the decoder's certificate.
    pub decoder_insecure_skip_verify: bool,
    /// Extra prefill attempts after a connect error or a 5xx.
    pub prefill_max_retries: u32,
    /// Wait before the first retry; doubled for each next one.
    pub prefill_retry_backoff: Duration,
    /// Give up on the prefill hop (and prefill locally) after this long.
    pub prefill_timeout: Option<Duration>,
    /// Pick a random candidate of `x-prefiller-host-port` instead of the first.
    pub enable_prefiller_sampling: bool,
    /// When set, only these prefill hosts may be called (SSRF protection).
    pub ssrf_allowlist: Option<Allowlist>,
    /// Largest request body read on the P/D path.
    pub max_body_bytes: usize,
    /// TCP (and TLS) connect timeout for both hops.
    pub connect_timeout: Duration,
    /// Idle keep-alive connections kept per upstream.
    pub max_idle_conns_per_host: usize,
}

impl PdRouterConfig {
    /// Defaults for a router that is given its decode replica with every call
    /// ([`PdRouter::handle_with_decoder`]), as the built-in proxy uses it; `decoder` is then
    /// only what [`PdRouter::handle`] would use (`127.0.0.1:0`, which refuses connections).
    pub fn per_call_decoder() -> Self {
        Self::with_upstream(Upstream {
            scheme: Scheme::HTTP,
            authority: Authority::from_static("127.0.0.1:0"),
        })
    }

    /// Defaults in front of `decoder` (`host:port` or an `http(s)://` URL).
    pub fn new(decoder: &str) -> Result<Self, SidecarError> {
        Ok(Self::with_upstream(Upstream::parse(decoder)?))
    }

    fn with_upstream(decoder: Upstream) -> Self {
        Self {
            decoder,
            prefill_tls: false,
            prefill_insecure_skip_verify: false,
            decoder_insecure_skip_verify: false,
            prefill_max_retries: 2,
            prefill_retry_backoff: Duration::from_millis(50),
            prefill_timeout: None,
            enable_prefiller_sampling: false,
            ssrf_allowlist: None,
            max_body_bytes: 64 << 20,
            connect_timeout: Duration::from_secs(5),
            max_idle_conns_per_host: 1024,
        }
    }
}

/// Why the prefill hop did not produce `kv_transfer_params`.
enum PrefillOutcome {
    /// Prefilled: the params for the decoder and the prefill replica's cached tokens.
    Ready { kv: Value, cached: u64 },
    /// The prefiller refused the request (4xx): relay its answer.
    Refused(Response<ProxyBody>),
    /// Decode locally instead.
    Fallback(&'static str, String),
}

/// The P/D routing core: in front of one decode replica (or any, per call), prefilling on the
/// replica each request names.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use llmsched_pdsidecar::{PdRouter, PdRouterConfig, SidecarMetrics};
/// let router = PdRouter::new(
///     PdRouterConfig::new("127.0.0.1:8200")?,
///     Arc::new(SidecarMetrics::new()),
/// )?;
/// let req = http::Request::post("/v1/completions")
///     .header("x-prefiller-host-port", "127.0.0.1:8100")
///     .body(http_body_util::Full::new(bytes::Bytes::from(r#"{"prompt":"hi","max_tokens":5}"#)))?;
/// let resp = router.handle(req).await; // prefilled on :8100, decoded on :8200
/// # let _ = resp;
/// # Ok(()) }
/// ```
pub struct PdRouter {
    cfg: PdRouterConfig,
    prefill_client: UpstreamClient,
    decode_client: UpstreamClient,
    metrics: Arc<SidecarMetrics>,
}

impl std::fmt::Debug for PdRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PdRouter").field("cfg", &self.cfg).finish()
    }
}

/// The reference sidecar's error body (`{"object":"error",…}`).
fn error_response(status: StatusCode, kind: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "object": "error",
        "message": message,
        "type": kind,
        "param": null,
        "code": status.as_u16(),
    });
    let mut r = Response::new(ProxyBody::full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The client's headers minus hop-by-hop ones, `host`, `content-length` and the prefiller
/// header.
fn forward_headers(from: &HeaderMap) -> HeaderMap {
    let listed: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(from.len());
    for (k, v) in from {
        let n = k.as_str();
        if HOP_BY_HOP.contains(&n)
            || listed.iter().any(|l| l == n)
            || k == header::HOST
            || k == header::CONTENT_LENGTH
            || n == PREFILLER_HOST_PORT
        {
            continue;
        }
        out.append(k.clone(), v.clone());
    }
    out
}

fn upstream_uri(
    scheme: &Scheme,
    authority: &str,
    pq: Option<&PathAndQuery>,
) -> Result<Uri, String> {
    Uri::builder()
        .scheme(scheme.clone())
        .authority(authority)
        .path_and_query(pq.map_or("/", PathAndQuery::as_str))
        .build()
        .map_err(|e| format!("cannot build upstream URI for {authority}: {e}"))
}

fn full_body(b: Bytes) -> ReqBody {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}

impl PdRouter {
    /// A router with its own connection pools.
    pub fn new(cfg: PdRouterConfig, metrics: Arc<SidecarMetrics>) -> Result<Self, SidecarError> {
        let prefill_client = client::build(
            cfg.prefill_insecure_skip_verify,
            cfg.connect_timeout,
            cfg.max_idle_conns_per_host,
        )?;
        let decode_client = client::build(
            cfg.decoder_insecure_skip_verify,
            cfg.connect_timeout,
            cfg.max_idle_conns_per_host,
        )?;
        Ok(Self {
            cfg,
            prefill_client,
            decode_client,
            metrics,
        })
    }

    /// The router's metrics.
    pub fn metrics(&self) -> &Arc<SidecarMetrics> {
        &self.metrics
    }

    /// The configuration.
    pub fn config(&self) -> &PdRouterConfig {
        &self.cfg
    }

    /// Serves one request in front of the configured decode replica.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let decoder = self.cfg.decoder.clone();
        self.handle_with_decoder(req, &decoder).await
    }

    /// Serves one request with `decoder` as the decode replica: what an in-process router
    /// (the built-in proxy) calls after picking the decode endpoint itself.
    pub async fn handle_with_decoder<B>(
        &self,
        req: Request<B>,
        decoder: &Upstream,
    ) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let guard = InflightGuard::new(self.metrics.clone());
        let resp = self.route(req, decoder).await;
        resp.map(|b| b.with_guard(guard))
    }

    async fn route<B>(&self, req: Request<B>, decoder: &Upstream) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        if method == Method::GET && path == "/health" {
            return Response::new(ProxyBody::full(Bytes::new()));
        }
        if method == Method::GET && path == METRICS_PATH {
            let mut r = Response::new(ProxyBody::full(self.metrics.render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            return r;
        }
        let api = (method == Method::POST)
            .then(|| ApiKind::of_path(&path))
            .flatten();
        let Some(api) = api else {
            self.metrics.request("passthrough");
            return self.passthrough(req, decoder).await;
        };
        let candidates = match prefiller::candidates(req.headers()) {
            Ok(c) => c,
            Err(e) => return self.reject(StatusCode::BAD_REQUEST, "bad_header", &e),
        };
        if candidates.is_empty() {
            self.metrics.request("passthrough");
            return self.passthrough(req, decoder).await;
        }
        let pick = if self.cfg.enable_prefiller_sampling && candidates.len() > 1 {
            rand::rng().random_range(0..candidates.len())
        } else {
            0
        };
        let target = match prefiller::parse_target(&candidates[pick]) {
            Ok(t) => t,
            Err(e) => return self.reject(StatusCode::BAD_REQUEST, "bad_header", &e),
        };
        if let Some(list) = &self.cfg.ssrf_allowlist
            && !list.allows(&target.host)
        {
            tracing::error!(target = %target, "SSRF protection: prefill target not in allowlist");
            return self.reject(
                StatusCode::FORBIDDEN,
                "ssrf",
                &format!("Forbidden: prefill target {target} not allowed by SSRF protection"),
            );
        }
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, self.cfg.max_body_bytes).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    return self.reject(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        &format!("request body exceeds {} bytes", self.cfg.max_body_bytes),
                    );
                }
                return self.reject(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    &format!("cannot read the request body: {e}"),
                );
            }
        };
        let map: Map<String, Value> = match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                return self.reject(
                    StatusCode::BAD_REQUEST,
                    "bad_json",
                    "the request body must be a JSON object",
                );
            }
            Err(e) => {
                return self.reject(
                    StatusCode::BAD_REQUEST,
                    "bad_json",
                    &format!("JSON decode error: {e}"),
                );
            }
        };
        self.metrics.request("pd");
        let mut headers = forward_headers(&parts.headers);
        if !headers.contains_key(REQUEST_ID)
            && let Ok(v) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
        {
            headers.insert(HeaderName::from_static(REQUEST_ID), v);
        }
        let pq = parts.uri.path_and_query().cloned();
        match self
            .prefill(&target, api, &map, &headers, pq.as_ref())
            .await
        {
            PrefillOutcome::Ready { kv, cached } => {
                let body = match serde_json::to_vec(&decode_body(&map, kv)) {
                    Ok(b) => Bytes::from(b),
                    Err(e) => {
                        return error_response(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "InternalServerError",
                            &e.to_string(),
                        );
                    }
                };
                self.decode(
                    &parts.method,
                    headers,
                    pq.as_ref(),
                    full_body(body),
                    decoder,
                    Some(cached),
                )
                .await
            }
            PrefillOutcome::Refused(resp) => resp,
            PrefillOutcome::Fallback(reason, why) => {
                tracing::warn!(prefiller = %target, %reason, error = %why, "prefill hop failed; prefilling locally on the decoder");
                self.metrics.fallback(reason);
                self.decode(
                    &parts.method,
                    headers,
                    pq.as_ref(),
                    full_body(body),
                    decoder,
                    None,
                )
                .await
            }
        }
    }

    fn reject(
        &self,
        status: StatusCode,
        reason: &'static str,
        message: &str,
    ) -> Response<ProxyBody> {
        self.metrics.reject(reason);
        let kind = match status {
            StatusCode::FORBIDDEN => "Forbidden",
            StatusCode::PAYLOAD_TOO_LARGE => "PayloadTooLargeError",
            _ => "BadRequestError",
        };
        error_response(status, kind, message)
    }

    async fn prefill(
        &self,
        target: &Target,
        api: ApiKind,
        map: &Map<String, Value>,
        headers: &HeaderMap,
        pq: Option<&PathAndQuery>,
    ) -> PrefillOutcome {
        let body = match serde_json::to_vec(&prefill_body(map, api)) {
            Ok(b) => Bytes::from(b),
            Err(e) => return PrefillOutcome::Fallback("invalid_response", e.to_string()),
        };
        let scheme = if self.cfg.prefill_tls {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let uri = match upstream_uri(&scheme, &target.authority(), pq) {
            Ok(u) => u,
            Err(e) => return PrefillOutcome::Fallback("connect", e),
        };
        let start = Instant::now();
        let mut attempt = 0u32;
        loop {
            let mut req = Request::new(full_body(body.clone()));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = uri.clone();
            *req.headers_mut() = headers.clone();
            req.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            let call = self.prefill_client.request(req);
            let result = match self.cfg.prefill_timeout {
                Some(t) => match tokio::time::timeout(t, call).await {
                    Ok(r) => r,
                    Err(_) => {
                        return PrefillOutcome::Fallback(
                            "timeout",
                            format!("no answer within {}", humantime::format_duration(t)),
                        );
                    }
                },
                None => call.await,
            };
            let (reason, why) = match result {
                Err(e) if e.is_connect() => {
                    ("connect", format!("cannot connect: {}", error_chain(&e)))
                }
                Err(e) => return PrefillOutcome::Fallback("transport", error_chain(&e)),
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_server_error() {
                        let body = read_limited(resp.into_body(), 4096).await;
                        (
                            "server_error",
                            format!("{status}: {}", String::from_utf8_lossy(&body)),
                        )
                    } else if (400..=451).contains(&status.as_u16()) {
                        // The request is wrong, not the prefiller: tell the client (reference).
                        self.metrics.client_error();
                        let (parts, body) = resp.into_parts();
                        let body = read_limited(body, MAX_PREFILL_RESPONSE).await;
                        let mut r = Response::new(ProxyBody::full(body));
                        *r.status_mut() = status;
                        for (k, v) in &parts.headers {
                            if k != header::CONTENT_LENGTH && !HOP_BY_HOP.contains(&k.as_str()) {
                                r.headers_mut().append(k.clone(), v.clone());
                            }
                        }
                        return PrefillOutcome::Refused(r);
                    } else if !status.is_success() {
                        return PrefillOutcome::Fallback(
                            "invalid_response",
                            format!("unexpected status {status}"),
                        );
                    } else {
                        let body = match Limited::new(resp.into_body(), MAX_PREFILL_RESPONSE)
                            .collect()
                            .await
                        {
                            Ok(b) => b.to_bytes(),
                            Err(e) => return PrefillOutcome::Fallback("transport", e.to_string()),
                        };
                        self.metrics.prefill_done(start.elapsed().as_secs_f64());
                        let v: Value = match serde_json::from_slice(&body) {
                            Ok(v @ Value::Object(_)) => v,
                            _ => {
                                return PrefillOutcome::Fallback(
                                    "invalid_response",
                                    "the prefill answer is not a JSON object".into(),
                                );
                            }
                        };
                        return match v.get("kv_transfer_params") {
                            Some(kv @ Value::Object(_)) => PrefillOutcome::Ready {
                                kv: kv.clone(),
                                cached: cached_tokens(&v),
                            },
                            _ => PrefillOutcome::Fallback(
                                "missing_kv_transfer_params",
                                "the prefill answer has no kv_transfer_params (is the prefiller's KV connector on?)".into(),
                            ),
                        };
                    }
                }
            };
            if attempt >= self.cfg.prefill_max_retries {
                return PrefillOutcome::Fallback(
                    reason,
                    format!("{why} (after {} attempts)", attempt + 1),
                );
            }
            let wait = self
                .cfg
                .prefill_retry_backoff
                .saturating_mul(1 << attempt.min(16));
            attempt += 1;
            self.metrics.retry();
            tracing::debug!(prefiller = %target, %reason, attempt, "retrying the prefill hop in {wait:?}: {why}");
            tokio::time::sleep(wait).await;
        }
    }

    async fn decode(
        &self,
        method: &Method,
        headers: HeaderMap,
        pq: Option<&PathAndQuery>,
        body: ReqBody,
        decoder: &Upstream,
        cached: Option<u64>,
    ) -> Response<ProxyBody> {
        let uri = match upstream_uri(&decoder.scheme, decoder.authority.as_str(), pq) {
            Ok(u) => u,
            Err(e) => return error_response(StatusCode::BAD_GATEWAY, "BadGateway", &e),
        };
        let mut req = Request::new(body);
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        let resp = match self.decode_client.request(req).await {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                tracing::error!(decoder = %decoder.authority, error = %error_chain(&e), "failed to connect to the vLLM decoder");
                self.metrics.decoder_error("connect");
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    "The decode node is not ready. Please check that the vLLM service is running and the port configuration is correct.",
                );
            }
            Err(e) => {
                tracing::error!(decoder = %decoder.authority, error = %error_chain(&e), "proxy error");
                self.metrics.decoder_error("transport");
                return error_response(StatusCode::BAD_GATEWAY, "BadGateway", &error_chain(&e));
            }
        };
        let (mut parts, body) = resp.into_parts();
        for h in HOP_BY_HOP {
            parts.headers.remove(h);
        }
        let rewrite = match cached {
            Some(cached) if parts.status.is_success() => {
                let ct = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if ct.contains("text/event-stream") {
                    Rewrite::Sse(SseRewriter::new(cached))
                } else if ct.contains("json") {
                    Rewrite::Json {
                        cached,
                        buf: Default::default(),
                        overflow: false,
                    }
                } else {
                    Rewrite::None
                }
            }
            _ => Rewrite::None,
        };
        if !matches!(rewrite, Rewrite::None) {
            // The rewrite may change the length.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        Response::from_parts(parts, ProxyBody::upstream(body, rewrite))
    }

    async fn passthrough<B>(&self, req: Request<B>, decoder: &Upstream) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        let mut headers = forward_headers(&parts.headers);
        if let Some(len) = parts.headers.get(header::CONTENT_LENGTH) {
            headers.insert(header::CONTENT_LENGTH, len.clone());
        }
        let body = body.map_err(Into::into).boxed_unsync();
        self.decode(
            &parts.method,
            headers,
            parts.uri.path_and_query(),
            body,
            decoder,
            None,
        )
        .await
    }
}

async fn read_limited<B>(body: B, limit: usize) -> Bytes
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    Limited::new(body, limit)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default()
}

/// An error and its causes, `: `-joined (hyper's top-level messages are terse).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_parse() {
        let u = Upstream::parse("localhost:8001").unwrap();
        assert_eq!(
            (u.scheme.as_str(), u.authority.as_str()),
            ("http", "localhost:8001")
        );
        let u = Upstream::parse("https://[::1]:8443").unwrap();
        assert_eq!(u.scheme, Scheme::HTTPS);
        assert!(
            Upstream::parse("localhost")
                .unwrap_err()
                .to_string()
                .contains("host:port")
        );
        assert!(
            Upstream::parse("ftp://a:1")
                .unwrap_err()
                .to_string()
                .contains("http or https")
        );
        assert!(
            Upstream::parse("http://a:1/x")
                .unwrap_err()
                .to_string()
                .contains("path")
        );
    }

    #[test]
    fn forwarded_headers_drop_hop_by_hop_and_the_prefiller() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(header::HOST, HeaderValue::from_static("sidecar:8000"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        h.insert(PREFILLER_HOST_PORT, HeaderValue::from_static("10.0.0.1:1"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        let f = forward_headers(&h);
        assert_eq!(f.len(), 3);
        assert_eq!(f.get(header::AUTHORIZATION).unwrap(), "Bearer x");
        assert_eq!(f.get_all("x-multi").iter().count(), 2);
    }

    #[test]
    fn error_bodies_have_the_reference_shape() {
        let r = error_response(StatusCode::FORBIDDEN, "Forbidden", "no");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }
}
