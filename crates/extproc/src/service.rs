//! The `envoy.service.ext_proc.v3.ExternalProcessor/Process` service: one bidirectional
//! stream per HTTP request, request and response bodies in `FULL_DUPLEX_STREAMED` mode.
//!
//! Per stream, in order:
//!
//! 1. `request_headers`: headers collected (`x-request-id` generated when missing). With
//!    `end_of_stream` (no body) the director picks a random endpoint and the headers response
//!    goes out at once; otherwise nothing is sent until the body ends.
//! 2. `request_body` chunks are appended (the buffer pre-sized from `content-length`, at most
//!    [`ExtProcOptions::max_prealloc_bytes`], then grown as bytes arrive); at
//!    `end_of_stream` (or at `request_trailers`) the director routes the request and the
//!    stream answers with the headers response (destination header + `envoy.lb` metadata,
//!    `Content-Length`, echoed headers, hook headers) followed by the body re-chunked at
//!    62,000 bytes. A request the parser skipped is answered the same way and the stream then
//!    closes, as the reference does. Errors become an `ImmediateResponse` and end the stream.
//! 3. `response_headers`: answered with `x-went-into-resp-headers: true` plus the echoed
//!    headers and the response hooks' headers.
//! 4. `response_body`: streaming responses pass chunk by chunk (model name rewritten back);
//!    other bodies are buffered to the end and then sent (re-chunked). Usage is accounted.
//!    A non-streaming body that outgrows [`ExtProcOptions::max_request_body_bytes`] is not
//!    held any longer: what was buffered and the rest pass through unchanged (no model-name
//!    rewrite; usage only if the director's own bounded JSON buffer saw it all).
//! 5. `response_trailers` (or the response body's end) finishes the request.
//!
//! Request bodies are bounded by [`ExtProcOptions::max_request_body_bytes`]: a
//! `content-length` above it is answered at the headers, before any body is read; a body
//! that grows beyond it (chunked, or a lying `content-length`) is answered as soon as the
//! chunk that crosses the limit arrives, and its buffer is freed at once. Both answers are an
//! `ImmediateResponse` 413 with the body `inference error: PayloadTooLarge - request body is
//! larger than the limit of N bytes` (see [`InferenceError::payload_too_large`]) and the
//! stream closes. No buffer is ever sized by what the peer announces beyond
//! [`ExtProcOptions::max_prealloc_bytes`], and no buffer's capacity exceeds the limit.
//!
//! A stream that ends early (client gone, Envoy reset) drops its [`Routed`], which releases
//! the in-flight counts. Messages out of order (a body before headers, headers twice, a
//! response before the request was routed) end the stream with `INVALID_ARGUMENT`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::HeaderValueOption;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, processing_request,
};
use futures::Stream;
use llmsched_core::error::InferenceError;
use llmsched_core::request::Headers;
use llmsched_director::headers::is_system_owned;
use llmsched_director::{Director, IncomingRequest, Phase, RouteKind, Routed};
use tonic::{Request, Response, Status, Streaming};

use crate::messages::{
    Direction, body_responses, headers_from, immediate_response, request_headers_response,
    response_headers_response, served_endpoint, set_header, subset_hint, trailers_response,
};

/// Default of [`ExtProcOptions::max_request_body_bytes`]: 64 MiB, as the built-in proxy's.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: usize = 64 << 20;

/// Default of [`ExtProcOptions::max_prealloc_bytes`]: 16 KiB. Small on purpose: with mimalloc
/// and transparent huge pages a buffer's capacity is resident as soon as a few bytes are
/// written into it, so a stalled stream must cost what it sent, not what it announced.
pub const DEFAULT_MAX_PREALLOC_BYTES: usize = 16 << 10;

/// Options of the ext_proc service.
#[derive(Debug, Clone)]
pub struct ExtProcOptions {
    /// Largest request body the EPP buffers (`--max-request-body-bytes`): a larger one is
    /// answered `413` (`PayloadTooLarge`). Also the most of a non-streaming response held for
    /// the model-name rewrite; a larger response passes through unchanged. Default 64 MiB.
    pub max_request_body_bytes: usize,
    /// Upper bound of the body buffer pre-allocated from `content-length` (request and
    /// response): what a peer announces is only a hint, so a thousand streams announcing
    /// 64 MiB and stalling cost a thousand small buffers, not 64 GiB. Larger bodies grow the
    /// buffer as their bytes arrive (doubling, never beyond the limit). Default 16 KiB.
    pub max_prealloc_bytes: usize,
}

impl Default for ExtProcOptions {
    fn default() -> Self {
        Self {
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY_BYTES,
            max_prealloc_bytes: DEFAULT_MAX_PREALLOC_BYTES,
        }
    }
}

/// Appends `chunk` to `buf` unless the result would be longer than `limit` (then `buf` is
/// left as it is and `false` returned). The capacity grows by doubling but never beyond
/// `limit`, so a buffer never holds more memory than the limit allows.
fn append_capped(buf: &mut Vec<u8>, chunk: &[u8], limit: usize) -> bool {
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

/// The buffer for a body announced as `content-length` (absent or unparsable: empty).
fn presized(headers: &Headers, options: &ExtProcOptions) -> Vec<u8> {
    let cap = headers
        .get("content-length")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(options.max_prealloc_bytes)
        .min(options.max_request_body_bytes);
    Vec::with_capacity(cap)
}

/// The ext_proc service over a [`Director`].
#[derive(Debug, Clone)]
pub struct ExtProcService {
    director: Arc<Director>,
    options: ExtProcOptions,
}

impl ExtProcService {
    /// A service routing with `director`.
    pub fn new(director: Arc<Director>, options: ExtProcOptions) -> Self {
        Self { director, options }
    }
}

type Item = Result<ProcessingResponse, Status>;

/// The response stream of one `Process` call. The state machine runs inside it: tonic polls
/// it for the next response, it reads the next request message when it has nothing queued.
/// No task per stream, no channel hop; when Envoy resets the stream tonic drops it, and
/// with it any [`Routed`] (releasing in-flight counts) or flow-control wait.
pub type ProcessStream = Pin<Box<dyn Stream<Item = Item> + Send + 'static>>;

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = ProcessStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let handler = StreamHandler {
            director: self.director.clone(),
            options: self.options.clone(),
            out: VecDeque::new(),
            stage: Stage::AwaitHeaders,
            hint: None,
            done: false,
        };
        let stream = futures::stream::unfold(
            (handler, request.into_inner()),
            |(mut h, mut inbound)| async move {
                loop {
                    if let Some(item) = h.out.pop_front() {
                        return Some((item, (h, inbound)));
                    }
                    if h.done {
                        return None;
                    }
                    if matches!(&h.stage, Stage::Forwarded { routed: Some(r), .. } if !r.is_dispatched())
                    {
                        // The routing answer has been queued and sent to tonic: let it go out
                        // first (returning `Pending` once makes tonic hand the encoded
                        // responses to h2, and the connection task writes them before this
                        // task runs again), then do the hooks' bookkeeping while Envoy
                        // forwards the request.
                        tokio::task::yield_now().await;
                        if let Stage::Forwarded {
                            routed: Some(r), ..
                        } = &mut h.stage
                        {
                            r.run_after_dispatch();
                        }
                    }
                    let msg = match inbound.message().await {
                        Ok(Some(m)) => m,
                        Ok(None) => return None,
                        Err(s) => {
                            tracing::debug!(status = %s, "ext_proc stream ended");
                            return None;
                        }
                    };
                    match h.handle(msg).await {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Close) => h.done = true,
                        Err(status) => {
                            tracing::warn!(error = %status.message(), "ext_proc protocol error");
                            h.out.push_back(Err(status));
                            h.done = true;
                        }
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

/// A malformed message sequence: the stream fails with `INVALID_ARGUMENT`.
fn protocol(msg: &str) -> Status {
    Status::invalid_argument(msg.to_string())
}

enum Resp {
    AwaitHeaders,
    Streaming,
    Buffering(Vec<u8>),
    /// A non-streaming body too large to hold: passed through as it comes, unchanged.
    Passthrough,
    Done,
}

enum Stage {
    AwaitHeaders,
    Body {
        headers: Headers,
        buf: Vec<u8>,
        received_at: Instant,
    },
    Forwarded {
        // Boxed: a routed request is large and the other stages are small.
        routed: Option<Box<Routed>>,
        resp: Resp,
    },
}

struct StreamHandler {
    director: Arc<Director>,
    options: ExtProcOptions,
    out: VecDeque<Item>,
    stage: Stage,
    hint: Option<Vec<String>>,
    done: bool,
}

/// Whether the stream continues after a message.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

impl StreamHandler {
    fn send(&mut self, r: ProcessingResponse) {
        self.out.push_back(Ok(r));
    }

    fn send_all(&mut self, rs: impl Iterator<Item = ProcessingResponse>) {
        self.out.extend(rs.map(Ok));
    }

    async fn handle(&mut self, msg: ProcessingRequest) -> Result<Flow, Status> {
        let md = msg.metadata_context.as_ref();
        if let Some(h) = subset_hint(md) {
            self.hint = Some(h);
        }
        if let Some(served) = served_endpoint(md)
            && let Stage::Forwarded {
                routed: Some(r), ..
            } = &mut self.stage
        {
            r.set_served_endpoint(&served);
        }
        use processing_request::Request as R;
        match msg.request {
            Some(R::RequestHeaders(h)) => self.request_headers(h).await,
            Some(R::RequestBody(b)) => self.request_body(b).await,
            Some(R::RequestTrailers(_)) => self.request_trailers().await,
            Some(R::ResponseHeaders(h)) => self.response_headers(h).await,
            Some(R::ResponseBody(b)) => self.response_body(b).await,
            Some(R::ResponseTrailers(_)) => self.response_trailers().await,
            None => Ok(Flow::Continue),
        }
    }

    async fn request_headers(&mut self, h: HttpHeaders) -> Result<Flow, Status> {
        if !matches!(self.stage, Stage::AwaitHeaders) {
            return Err(protocol("request headers received more than once"));
        }
        let received_at = Instant::now();
        let headers = headers_from(h.headers.as_ref());
        if h.end_of_stream {
            return match self.director.route_without_body(headers, received_at) {
                Ok(routed) => {
                    let r = headers_response(&routed, 0);
                    self.stage = Stage::Forwarded {
                        routed: Some(Box::new(routed)),
                        resp: Resp::AwaitHeaders,
                    };
                    self.send(r);
                    Ok(Flow::Continue)
                }
                Err(e) => {
                    self.send(immediate_response(&e));
                    Ok(Flow::Close)
                }
            };
        }
        let limit = self.options.max_request_body_bytes;
        let announced = headers
            .get("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        if announced.is_some_and(|n| n > limit as u64) {
            return Ok(self.too_large(announced));
        }
        self.stage = Stage::Body {
            buf: presized(&headers, &self.options),
            headers,
            received_at,
        };
        Ok(Flow::Continue)
    }

    /// Answers 413 and ends the stream; whatever was buffered is freed now.
    fn too_large(&mut self, announced: Option<u64>) -> Flow {
        let limit = self.options.max_request_body_bytes;
        self.stage = Stage::AwaitHeaders;
        let e = InferenceError::payload_too_large(limit);
        tracing::debug!(limit, ?announced, "request body over the limit");
        self.director
            .metrics()
            .record_error("", "", e.code.as_str());
        self.send(immediate_response(&e));
        Flow::Close
    }

    async fn request_body(&mut self, b: HttpBody) -> Result<Flow, Status> {
        let limit = self.options.max_request_body_bytes;
        let Stage::Body { buf, .. } = &mut self.stage else {
            return Err(protocol(match self.stage {
                Stage::AwaitHeaders => "request body received before request headers",
                _ => "request body received after the request body ended",
            }));
        };
        let body = b.body;
        if !b.end_of_stream || !buf.is_empty() {
            if !append_capped(buf, &body, limit) {
                return Ok(self.too_large(None));
            }
            if !b.end_of_stream {
                return Ok(Flow::Continue);
            }
            let whole = std::mem::take(buf);
            return self.route(Bytes::from(whole), false).await;
        }
        // The whole body in one message: used as it is, no copy.
        if body.len() > limit {
            return Ok(self.too_large(None));
        }
        self.route(Bytes::from(body), false).await
    }

    async fn request_trailers(&mut self) -> Result<Flow, Status> {
        match &mut self.stage {
            Stage::Body { buf, .. } => {
                let whole = std::mem::take(buf);
                self.route(Bytes::from(whole), true).await
            }
            Stage::AwaitHeaders => {
                Err(protocol("request trailers received before request headers"))
            }
            Stage::Forwarded { .. } => {
                self.send(trailers_response(Direction::Request));
                Ok(Flow::Continue)
            }
        }
    }

    /// Routes the buffered request and sends the headers and body responses.
    async fn route(&mut self, body: Bytes, trailers: bool) -> Result<Flow, Status> {
        let Stage::Body {
            headers,
            received_at,
            ..
        } = std::mem::replace(&mut self.stage, Stage::AwaitHeaders)
        else {
            return Err(protocol("no request to route"));
        };
        self.director
            .metrics()
            .observe_phase(Phase::BodyBuffering, received_at.elapsed());
        let incoming = IncomingRequest {
            headers,
            body,
            subset_hint: self.hint.clone(),
            received_at,
        };
        // When Envoy gives up while the request waits (flow control), tonic drops this
        // stream and with it this future, which takes the request out of its queue.
        let result = self.director.route(incoming).await;
        let routed = match result {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "request rejected");
                self.send(immediate_response(&e));
                return Ok(Flow::Close);
            }
        };
        let body = routed.forward_body().clone();
        let skipped = routed.kind() == RouteKind::Fallback;
        self.send(headers_response(&routed, body.len()));
        self.stage = Stage::Forwarded {
            routed: Some(Box::new(routed)),
            resp: Resp::AwaitHeaders,
        };
        self.send_all(body_responses(Direction::Request, &body, !trailers));
        if trailers {
            self.send(trailers_response(Direction::Request));
        }
        if skipped {
            // As the reference: an unparsed request is handed back to Envoy and the stream
            // closes, so no response phase reaches the EPP.
            return Ok(Flow::Close);
        }
        Ok(Flow::Continue)
    }

    async fn response_headers(&mut self, h: HttpHeaders) -> Result<Flow, Status> {
        let Stage::Forwarded { routed, resp } = &mut self.stage else {
            return Err(protocol(
                "response headers received before the request was routed",
            ));
        };
        if !matches!(resp, Resp::AwaitHeaders) {
            return Err(protocol("response headers received more than once"));
        }
        let headers = headers_from(h.headers.as_ref());
        let status = headers
            .get(":status")
            .or_else(|| headers.get("status"))
            .and_then(|s| s.trim().parse::<u16>().ok())
            .unwrap_or(200);
        let Some(r) = routed.as_mut() else {
            return Err(protocol(
                "response headers received after the response completed",
            ));
        };
        let extra = r.on_response_headers(status, &headers);
        let mut set = echo(&headers);
        merge(&mut set, extra);
        let streaming = r.is_streaming();
        *resp = if h.end_of_stream {
            if let Some(r) = routed.take() {
                r.finish();
            }
            Resp::Done
        } else if streaming {
            Resp::Streaming
        } else {
            Resp::Buffering(presized(&headers, &self.options))
        };
        self.send(response_headers_response(set));
        Ok(Flow::Continue)
    }

    async fn response_body(&mut self, b: HttpBody) -> Result<Flow, Status> {
        let Stage::Forwarded { routed, resp } = &mut self.stage else {
            return Err(protocol(
                "response body received before the request was routed",
            ));
        };
        let Some(r) = routed.as_mut() else {
            return Err(protocol(
                "response body received after the response completed",
            ));
        };
        let eos = b.end_of_stream;
        match resp {
            Resp::Streaming => {
                r.on_response_body(&b.body, eos);
                let out = r.rewrite_response_model(&b.body).into_owned();
                if eos {
                    if let Some(r) = routed.take() {
                        r.finish();
                    }
                    *resp = Resp::Done;
                }
                self.send_all(body_responses(Direction::Response, &out, eos));
            }
            Resp::Buffering(buf) => {
                if buf.is_empty() && eos {
                    *buf = b.body;
                } else if !append_capped(buf, &b.body, self.options.max_request_body_bytes) {
                    // Too large to hold for the rewrite: pass it on unchanged from here.
                    let held = std::mem::take(buf);
                    tracing::debug!(
                        held = held.len(),
                        limit = self.options.max_request_body_bytes,
                        "response body over the buffering limit; passing it through"
                    );
                    r.on_response_body(&held, false);
                    r.on_response_body(&b.body, eos);
                    *resp = if eos {
                        if let Some(r) = routed.take() {
                            r.finish();
                        }
                        Resp::Done
                    } else {
                        Resp::Passthrough
                    };
                    self.send_all(body_responses(Direction::Response, &held, false));
                    self.send_all(body_responses(Direction::Response, &b.body, eos));
                    return Ok(Flow::Continue);
                }
                if !eos {
                    return Ok(Flow::Continue);
                }
                let whole = std::mem::take(buf);
                r.on_response_body(&whole, true);
                let out = r.rewrite_response_model(&whole).into_owned();
                if let Some(r) = routed.take() {
                    r.finish();
                }
                *resp = Resp::Done;
                self.send_all(body_responses(Direction::Response, &out, true));
            }
            Resp::Passthrough => {
                r.on_response_body(&b.body, eos);
                if eos {
                    if let Some(r) = routed.take() {
                        r.finish();
                    }
                    *resp = Resp::Done;
                }
                self.send_all(body_responses(Direction::Response, &b.body, eos));
            }
            Resp::AwaitHeaders => {
                return Err(protocol("response body received before response headers"));
            }
            Resp::Done => {
                return Err(protocol(
                    "response body received after the response completed",
                ));
            }
        }
        Ok(Flow::Continue)
    }

    async fn response_trailers(&mut self) -> Result<Flow, Status> {
        let Stage::Forwarded { routed, resp } = &mut self.stage else {
            return Err(protocol(
                "response trailers received before the request was routed",
            ));
        };
        let mut pending = None;
        if let Resp::Buffering(buf) = resp {
            let whole = std::mem::take(buf);
            if let Some(r) = routed.as_mut() {
                r.on_response_body(&whole, true);
                pending = Some(r.rewrite_response_model(&whole).into_owned());
            }
        }
        if let Some(r) = routed.take() {
            r.finish();
        }
        *resp = Resp::Done;
        if let Some(body) = pending {
            self.send_all(body_responses(Direction::Response, &body, false));
        }
        self.send(trailers_response(Direction::Response));
        Ok(Flow::Continue)
    }
}

/// Every header that is not system-owned, echoed back as a `set`.
fn echo(headers: &Headers) -> Vec<HeaderValueOption> {
    headers
        .iter()
        .filter(|(k, _)| !is_system_owned(k))
        .map(|(k, v)| set_header(k, v.as_bytes()))
        .collect()
}

/// Adds hook headers to `set`, replacing echoed values of the same name.
fn merge(set: &mut Vec<HeaderValueOption>, extra: Vec<(String, String)>) {
    for (k, v) in extra {
        let existing = set.iter_mut().find(|o| {
            o.header
                .as_ref()
                .is_some_and(|h| h.key.eq_ignore_ascii_case(&k))
        });
        match existing {
            Some(o) => *o = set_header(k, v.into_bytes()),
            None => set.push(set_header(k, v.into_bytes())),
        }
    }
}

fn headers_response(routed: &Routed, content_length: usize) -> ProcessingResponse {
    let mut set = echo(&routed.request().headers);
    merge(&mut set, routed.headers_to_set().to_vec());
    request_headers_response(routed.destination(), content_length, set)
}
