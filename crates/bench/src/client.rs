//! The HTTP side: one pooled hyper client, one request → one [`Exchange`].
//!
//! Failures are classified with inference-perf's error types so they get the same labels:
//! `ClientConnectorError` (cannot connect), `ServerDisconnectedError` (the connection broke
//! before a response), `HTTP Error <code>` (non-200 status, with the body as message),
//! `TimeoutError` (`load.request_timeout` expired), `ClientPayloadError` (the body broke off or
//! a stream ended without `data: [DONE]`) and `JSONDecodeError` (a non-streamed body that is
//! not JSON). Non-JSON `data:` payloads inside a stream are skipped and counted, as
//! inference-perf skips them.

use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::{Instant, timeout_at};

use crate::config::{ApiType, BenchConfig};
use crate::error::BenchError;
use crate::metrics::{ChunkMark, RequestError};
use crate::sse::{SseData, SseLines, Usage, parse_chunk};
use crate::tokens::{TokenCounter, WordJoin};

/// Longest error body kept in a failure message.
const MAX_ERROR_BODY: usize = 4096;

/// A pooled client bound to one server.
#[derive(Clone, Debug)]
pub struct HttpTarget {
    client: Client<HttpConnector, Full<Bytes>>,
    base_url: String,
    completions: Uri,
    chat: Uri,
    headers: HeaderMap,
}

/// The outcome of one request.
#[derive(Debug)]
pub struct Exchange {
    /// When the request was handed to the connection pool.
    pub start: Instant,
    /// When the response finished (`[DONE]` or end of body) or failed.
    pub end: Instant,
    /// Content-bearing chunks (streaming), offsets already multiplied by the time scale.
    pub chunks: Vec<ChunkMark>,
    /// Client-side token count of the output.
    pub output_tokens: u64,
    /// Merged server usage.
    pub usage: Option<Usage>,
    /// The output text, when requested.
    pub text: Option<String>,
    /// Skipped non-JSON payloads.
    pub invalid_chunks: u32,
    /// The failure, if any.
    pub error: Option<RequestError>,
}

/// How to read one response.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions<'a> {
    /// Streamed (SSE) or one JSON body.
    pub streaming: bool,
    /// Counts tokens of chunks and of the whole output.
    pub counter: &'a TokenCounter,
    /// Keep the output text (multi-turn context).
    pub keep_text: bool,
    /// Give up this long after sending (`TimeoutError`).
    pub timeout: Option<Duration>,
    /// Multiplier from wall-clock to simulated seconds for chunk offsets.
    pub time_scale: f64,
}

impl HttpTarget {
    /// A client for `config.server` (base URL, API key, extra headers).
    pub fn new(config: &BenchConfig) -> Result<Self, BenchError> {
        let server = config.server.as_ref().ok_or_else(|| {
            BenchError::invalid(
                "server.base_url",
                "no server configured: set server.base_url or pass --base-url",
            )
        })?;
        let base_url = server.base_url.trim().trim_end_matches('/').to_owned();
        let parse = |route: &str| -> Result<Uri, BenchError> {
            let uri: Uri = format!("{base_url}{route}").parse().map_err(|e| {
                BenchError::invalid(
                    "server.base_url",
                    format!("'{}' is not a valid URL: {e}", server.base_url),
                )
            })?;
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                return Err(BenchError::invalid(
                    "server.base_url",
                    format!("'{}' must be an http:// URL with a host", server.base_url),
                ));
            }
            Ok(uri)
        };
        let completions = parse("/v1/completions")?;
        let chat = parse("/v1/chat/completions")?;

        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(key) = &server.api_key {
            let v = HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| BenchError::invalid("server.api_key", "not a valid header value"))?;
            headers.insert(AUTHORIZATION, v);
        }
        for (k, v) in config.api.headers.iter().flatten() {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
                BenchError::invalid(format!("api.headers.{k}"), "not a valid header name")
            })?;
            let value = HeaderValue::from_str(v).map_err(|_| {
                BenchError::invalid(format!("api.headers.{k}"), "not a valid header value")
            })?;
            headers.insert(name, value);
        }

        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Ok(Self {
            client,
            base_url,
            completions,
            chat,
            headers,
        })
    }

    /// The base URL without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `GET /v1/models` and the first model's id (inference-perf's model discovery).
    pub async fn discover_model(&self) -> Result<String, BenchError> {
        let url = format!("{}/v1/models", self.base_url);
        let err = |message: String| BenchError::Server {
            url: url.clone(),
            message,
        };
        let uri: Uri = url.parse().map_err(|e| err(format!("{e}")))?;
        let mut req = Request::builder().method(Method::GET).uri(uri);
        for (k, v) in &self.headers {
            if k != CONTENT_TYPE {
                req = req.header(k, v);
            }
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| err(e.to_string()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let resp = timeout_at(deadline, self.client.request(req))
            .await
            .map_err(|_| err("timed out after 10 s".into()))?
            .map_err(|e| err(describe_hyper_util_error(&e)))?;
        let status = resp.status();
        let body = timeout_at(deadline, resp.into_body().collect())
            .await
            .map_err(|_| err("timed out after 10 s".into()))?
            .map_err(|e| err(e.to_string()))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(err(format!("HTTP {status}: {}", lossy_prefix(&body))));
        }
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| err(format!("invalid JSON from /v1/models: {e}")))?;
        v.get("data")
            .and_then(|d| d.as_array())
            .and_then(|d| d.first())
            .and_then(|m| m.get("id"))
            .and_then(|id| id.as_str())
            .map(str::to_owned)
            .ok_or_else(|| err("no model listed by /v1/models; set server.model_name".into()))
    }

    /// Sends one request and reads the whole response.
    pub async fn send(
        &self,
        api: ApiType,
        body: Bytes,
        extra_header: Option<&(HeaderName, HeaderValue)>,
        opts: ReadOptions<'_>,
    ) -> Exchange {
        let uri = match api {
            ApiType::Chat => self.chat.clone(),
            _ => self.completions.clone(),
        };
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        *req.headers_mut() = self.headers.clone();
        if let Some((k, v)) = extra_header {
            req.headers_mut().insert(k.clone(), v.clone());
        }

        let start = Instant::now();
        let deadline = opts.timeout.map(|t| start + t);
        let mut ex = Exchange {
            start,
            end: start,
            chunks: Vec::new(),
            output_tokens: 0,
            usage: None,
            text: None,
            invalid_chunks: 0,
            error: None,
        };
        let fail = |ex: &mut Exchange, error_type: &str, msg: String| {
            ex.end = Instant::now();
            ex.error = Some(RequestError {
                error_type: error_type.to_owned(),
                error_msg: msg,
            });
        };

        let resp = match with_deadline(deadline, self.client.request(req)).await {
            None => {
                fail(&mut ex, "TimeoutError", "Request timed out".into());
                return ex;
            }
            Some(Err(e)) => {
                let kind = if e.is_connect() {
                    "ClientConnectorError"
                } else {
                    "ServerDisconnectedError"
                };
                let msg = describe_hyper_util_error(&e);
                let msg = if e.is_connect() {
                    format!("Cannot connect to host {}: {msg}", self.base_url)
                } else {
                    msg
                };
                fail(&mut ex, kind, msg);
                return ex;
            }
            Some(Ok(r)) => r,
        };

        let status = resp.status();
        let mut body = resp.into_body();
        if status != StatusCode::OK {
            let mut buf = Vec::new();
            loop {
                match with_deadline(deadline, body.frame()).await {
                    None => {
                        fail(&mut ex, "TimeoutError", "Request timed out".into());
                        return ex;
                    }
                    Some(Some(Ok(frame))) => {
                        if let Some(d) = frame.data_ref()
                            && buf.len() < MAX_ERROR_BODY
                        {
                            buf.extend_from_slice(d);
                        }
                    }
                    Some(Some(Err(_))) | Some(None) => break,
                }
            }
            fail(
                &mut ex,
                &format!("HTTP Error {}", status.as_u16()),
                lossy_prefix(&buf),
            );
            return ex;
        }

        if opts.streaming {
            read_stream(&mut ex, &mut body, opts, deadline).await;
        } else {
            read_unary(&mut ex, &mut body, opts, deadline).await;
        }
        ex
    }
}

async fn read_stream(
    ex: &mut Exchange,
    body: &mut hyper::body::Incoming,
    opts: ReadOptions<'_>,
    deadline: Option<Instant>,
) {
    let mut lines = SseLines::new();
    let mut words = WordJoin::default();
    let mut text = (opts.keep_text || opts.counter.needs_full_text()).then(String::new);
    let mut done = false;
    let mut usage: Option<Usage> = None;
    let mut invalid = 0u32;
    let mut failure: Option<RequestError> = None;
    let start = ex.start;
    while !done {
        let frame = match with_deadline(deadline, body.frame()).await {
            None => {
                failure = Some(RequestError {
                    error_type: "TimeoutError".into(),
                    error_msg: "Request timed out".into(),
                });
                break;
            }
            Some(None) => {
                let tail = if lines.pending() > 0 {
                    " (stopped mid-line)"
                } else {
                    ""
                };
                failure = Some(RequestError {
                    error_type: "ClientPayloadError".into(),
                    error_msg: format!(
                        "Response payload is not completed: stream ended before `data: [DONE]`{tail}"
                    ),
                });
                break;
            }
            Some(Some(Err(e))) => {
                failure = Some(payload_error(&e));
                break;
            }
            Some(Some(Ok(frame))) => frame,
        };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        let offset = now.saturating_duration_since(start).as_secs_f64() * opts.time_scale;
        lines.feed(data, |d| match d {
            SseData::Done => done = true,
            SseData::Payload(_) if done => {}
            SseData::Payload(p) => match parse_chunk(p) {
                Ok(chunk) => {
                    if let Some(u) = chunk.usage {
                        usage.get_or_insert_with(Usage::default).merge(&u);
                    }
                    if let Some(t) = chunk.text
                        && !t.is_empty()
                    {
                        let n = opts.counter.count(&t);
                        words.push(&t, n);
                        if let Some(buf) = text.as_mut() {
                            buf.push_str(&t);
                        }
                        ex.chunks
                            .push(ChunkMark::at(offset, u32::try_from(n).unwrap_or(u32::MAX)));
                    }
                }
                Err(_) => invalid = invalid.saturating_add(1),
            },
        });
        if done {
            ex.end = now;
        }
    }
    if done {
        // Let the connection go back to the pool if the body ends right away (it normally
        // does: `[DONE]` is the last event); otherwise it is dropped with the body.
        let drain = async { while let Some(Ok(_)) = body.frame().await {} };
        let _ = tokio::time::timeout(Duration::from_millis(100), drain).await;
    } else {
        ex.end = Instant::now();
    }
    ex.error = failure;
    ex.usage = usage;
    ex.invalid_chunks = invalid;
    ex.output_tokens = match (&text, opts.counter.needs_full_text()) {
        (Some(t), true) => opts.counter.count(t),
        _ => words.total(),
    };
    ex.text = if opts.keep_text { text } else { None };
}

async fn read_unary(
    ex: &mut Exchange,
    body: &mut hyper::body::Incoming,
    opts: ReadOptions<'_>,
    deadline: Option<Instant>,
) {
    let mut buf = Vec::new();
    loop {
        match with_deadline(deadline, body.frame()).await {
            None => {
                ex.end = Instant::now();
                ex.error = Some(RequestError {
                    error_type: "TimeoutError".into(),
                    error_msg: "Request timed out".into(),
                });
                return;
            }
            Some(None) => break,
            Some(Some(Err(e))) => {
                ex.end = Instant::now();
                ex.error = Some(payload_error(&e));
                return;
            }
            Some(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    buf.extend_from_slice(d);
                }
            }
        }
    }
    ex.end = Instant::now();
    match parse_chunk(&buf) {
        Ok(chunk) => {
            ex.usage = chunk.usage;
            let t = chunk.text.unwrap_or_default();
            ex.output_tokens = opts.counter.count(&t);
            if opts.keep_text {
                ex.text = Some(t.into_owned());
            }
        }
        Err(e) => {
            ex.error = Some(RequestError {
                error_type: "JSONDecodeError".into(),
                error_msg: format!("{e}: {}", lossy_prefix(&buf)),
            });
        }
    }
}

/// The body broke off. The message names the cause without hyper's wording ("error reading a
/// body from connection"), which inference-perf's labels would file under "Connection Error";
/// the detail goes to the debug log.
fn payload_error(e: &hyper::Error) -> RequestError {
    tracing::debug!(error = %e, source = ?std::error::Error::source(e), "response body broke off");
    let what = if e.is_incomplete_message() {
        "the body ended before the message was complete"
    } else if e.is_timeout() {
        "reading the body timed out"
    } else {
        "the body broke off mid-stream"
    };
    RequestError {
        error_type: "ClientPayloadError".into(),
        error_msg: format!("Response payload is not completed: {what}"),
    }
}

/// Awaits `fut`, or returns `None` at `deadline`.
async fn with_deadline<F: std::future::Future>(
    deadline: Option<Instant>,
    fut: F,
) -> Option<F::Output> {
    match deadline {
        Some(d) => timeout_at(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

fn lossy_prefix(bytes: &[u8]) -> String {
    let cut = bytes.len().min(MAX_ERROR_BODY);
    String::from_utf8_lossy(&bytes[..cut]).into_owned()
}

fn describe_hyper_util_error(e: &hyper_util::client::legacy::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}
