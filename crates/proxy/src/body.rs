//! Bodies: the request body read whole with a hard limit ([`read_request_body`]), and the
//! response body the proxy hands to hyper: either a small local body (errors, a rewritten
//! non-streaming response) or the upstream body relayed frame by frame.
//!
//! Reading a request body never trusts `content-length` for memory: a declared length over
//! the limit is refused at once (413), otherwise the buffer starts at most
//! [`MAX_PREALLOC_BYTES`] and grows as bytes arrive, its capacity never above the limit. So
//! a thousand connections announcing 64 MiB and stalling hold what they sent, not 64 GiB.
//!
//! Relaying holds no buffer of its own: each upstream frame is polled only when hyper polls
//! this body, which it does only when the client connection can take more bytes, so a slow
//! client slows the upstream read (TCP backpressure end to end). Every data frame goes
//! through [`Routed::on_response_chunk`] (usage, streaming hooks, the model name rewritten
//! back) and what it returns is sent on; the body's end goes through
//! [`Routed::finish_response`]. When the client goes away hyper drops this body: the upstream
//! response is dropped with it (hyper closes that upstream connection, which cancels the
//! request on the model server) and so is the [`Routed`], which releases the in-flight
//! counts.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use llmsched_core::endpoint::Endpoint;
use llmsched_core::error::InferenceError;
use llmsched_director::Routed;
use llmsched_director::routed::append_capped;

use crate::timeout::{BoxError, UpstreamBody};

/// Most of a request body's buffer allocated before its bytes arrive (from `content-length`).
/// Small on purpose: with mimalloc and transparent huge pages a buffer's capacity is
/// resident as soon as a few bytes are written into it (measured: a 1 MiB buffer holding
/// 8 KiB costs 1.1 MB of RSS, a 64 MiB one 2.2 MB), so a stalled upload must cost what it
/// sent, not what it announced.
pub const MAX_PREALLOC_BYTES: usize = 16 << 10;

/// Why a request body could not be read.
#[derive(Debug)]
pub(crate) enum ReadBodyError {
    /// Larger than the limit (declared or as it arrived): 413.
    TooLarge,
    /// The client's body failed (reset, malformed chunking): 400.
    Failed(String),
}

impl ReadBodyError {
    /// The client's answer, in the ext_proc path's error shape.
    pub(crate) fn to_inference_error(&self, limit: usize) -> InferenceError {
        match self {
            ReadBodyError::TooLarge => InferenceError::payload_too_large(limit),
            ReadBodyError::Failed(e) => {
                InferenceError::bad_request(format!("failed to read the request body: {e}"))
            }
        }
    }
}

/// A request body being collected: the first frame kept as is (a body in one frame is never
/// copied), later frames appended into a buffer that starts at `min(content-length,
/// MAX_PREALLOC_BYTES)` and grows with the data, its capacity never above the limit.
#[derive(Debug)]
pub(crate) struct BodyCollector {
    limit: usize,
    declared: Option<u64>,
    first: Option<Bytes>,
    buf: Option<Vec<u8>>,
}

impl BodyCollector {
    /// A collector for a body of at most `limit` bytes announced as `declared` bytes;
    /// refused at once when the announcement is over the limit.
    pub(crate) fn new(limit: usize, declared: Option<u64>) -> Result<Self, ReadBodyError> {
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ReadBodyError::TooLarge);
        }
        Ok(Self {
            limit,
            declared,
            first: None,
            buf: None,
        })
    }

    /// Adds the next frame's data.
    pub(crate) fn push(&mut self, data: Bytes) -> Result<(), ReadBodyError> {
        let limit = self.limit;
        if let Some(b) = self.buf.as_mut() {
            return append_capped(b, &data, limit)
                .then_some(())
                .ok_or(ReadBodyError::TooLarge);
        }
        let Some(f) = self.first.take() else {
            if data.len() > limit {
                return Err(ReadBodyError::TooLarge);
            }
            self.first = Some(data);
            return Ok(());
        };
        let hint = self
            .declared
            .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));
        let cap = hint
            .min(MAX_PREALLOC_BYTES)
            .max(f.len().saturating_add(data.len()))
            .min(limit);
        let mut b = Vec::with_capacity(cap);
        if !append_capped(&mut b, &f, limit) || !append_capped(&mut b, &data, limit) {
            return Err(ReadBodyError::TooLarge);
        }
        self.buf = Some(b);
        Ok(())
    }

    /// Bytes collected so far.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buf
            .as_ref()
            .map_or_else(|| self.first.as_ref().map_or(0, Bytes::len), Vec::len)
    }

    /// Memory held for the body (the buffer's capacity, or the first frame's length).
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.buf
            .as_ref()
            .map_or_else(|| self.first.as_ref().map_or(0, Bytes::len), Vec::capacity)
    }

    /// The whole body.
    pub(crate) fn finish(self) -> Bytes {
        match self.buf {
            Some(b) => Bytes::from(b),
            None => self.first.unwrap_or_default(),
        }
    }
}

/// Reads a whole request body of at most `limit` bytes with a [`BodyCollector`]. Request
/// trailers are dropped (OpenAI requests carry none).
pub(crate) async fn read_request_body<B>(
    headers: &HeaderMap,
    body: B,
    limit: usize,
) -> Result<Bytes, ReadBodyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut collector = BodyCollector::new(limit, declared)?;
    let mut body = std::pin::pin!(Limited::new(body, limit));
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                if e.is::<http_body_util::LengthLimitError>() {
                    return Err(ReadBodyError::TooLarge);
                }
                tracing::debug!(error = %e, "reading the request body failed");
                return Err(ReadBodyError::Failed(e.to_string()));
            }
        };
        if let Ok(data) = frame.into_data() {
            collector.push(data)?;
        }
    }
    Ok(collector.finish())
}

/// Where a relayed response comes from: the endpoint's connection, or the in-process P/D
/// router (whose decode hop relays the decode endpoint's body, with the usage rewrite).
pub(crate) enum Upstream {
    /// A response of the proxy's own client.
    Hyper(Incoming),
    /// A response of [`llmsched_pdsidecar::PdRouter`].
    Pd(llmsched_pdsidecar::ProxyBody),
}

impl Body for Upstream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Upstream::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Upstream::Pd(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Upstream::Hyper(b) => b.is_end_stream(),
            Upstream::Pd(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Upstream::Hyper(b) => b.size_hint(),
            Upstream::Pd(b) => b.size_hint(),
        }
    }
}

/// In-flight accounting of a baseline request: [`Endpoint::dispatch`] when created,
/// [`Endpoint::complete`] when dropped (response finished, client gone or upstream failed).
#[derive(Debug)]
pub(crate) struct InflightGuard(Arc<Endpoint>);

impl InflightGuard {
    pub(crate) fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.dispatch(0);
        Self(endpoint)
    }

    /// Moves the charge to `next` (a fallback served the request).
    pub(crate) fn move_to(&mut self, next: Arc<Endpoint>) {
        if Arc::ptr_eq(&self.0, &next) {
            return;
        }
        next.dispatch(0);
        let prev = std::mem::replace(&mut self.0, next);
        prev.complete(0);
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.complete(0);
    }
}

/// Who accounts for a relayed response.
pub(crate) enum Accounting {
    /// The director's routed request (response hooks, usage, metrics, in-flight).
    Routed(Box<Routed>),
    /// A baseline request: in-flight counts only.
    Baseline(InflightGuard),
}

struct Relay {
    upstream: UpstreamBody,
    accounting: Option<Accounting>,
    /// The body's length is the upstream's (no model-name rewrite).
    same_length: bool,
    /// Bytes to send before anything else (the start of a body that was held, then outgrew
    /// the limit).
    first: Option<Bytes>,
    /// Trailers to send after the bytes [`Routed::finish_response`] still held.
    trailers: Option<HeaderMap>,
}

impl Relay {
    /// The response ended: completes the accounting; returns what the director still held.
    fn finish(&mut self) -> Bytes {
        match self.accounting.take() {
            Some(Accounting::Routed(r)) => r.finish_response(),
            Some(Accounting::Baseline(g)) => {
                drop(g);
                Bytes::new()
            }
            None => Bytes::new(),
        }
    }
}

enum Kind {
    Full(Option<Bytes>),
    Relay(Box<Relay>),
}

/// The body of every response the proxy sends.
pub struct ProxyBody {
    kind: Kind,
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Full(b) => f
                .debug_struct("ProxyBody::Full")
                .field("len", &b.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Relay(_) => f.debug_struct("ProxyBody::Relay").finish(),
        }
    }
}

impl ProxyBody {
    /// A complete body.
    pub(crate) fn full(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        Self {
            kind: Kind::Full((!b.is_empty()).then_some(b)),
        }
    }

    /// The upstream body relayed frame by frame with `accounting`.
    pub(crate) fn relay(upstream: UpstreamBody, accounting: Accounting) -> Self {
        Self::relay_after(Bytes::new(), upstream, accounting)
    }

    /// `first`, then the upstream body relayed frame by frame with `accounting`.
    pub(crate) fn relay_after(
        first: Bytes,
        upstream: UpstreamBody,
        accounting: Accounting,
    ) -> Self {
        let same_length = match &accounting {
            Accounting::Routed(r) => !r.rewrites_response(),
            Accounting::Baseline(_) => true,
        };
        Self {
            kind: Kind::Relay(Box::new(Relay {
                upstream,
                accounting: Some(accounting),
                same_length: same_length && first.is_empty(),
                first: (!first.is_empty()).then_some(first),
                trailers: None,
            })),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let relay = match &mut self.kind {
            Kind::Full(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Relay(r) => r,
        };
        if let Some(first) = relay.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        if let Some(t) = relay.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        loop {
            if relay.accounting.is_none() && relay.upstream.is_end_stream() {
                return Poll::Ready(None);
            }
            let polled = ready!(Pin::new(&mut relay.upstream).poll_frame(cx));
            let data = match polled {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => {
                        // Trailers: the response ends; what the director still held goes
                        // first.
                        let rest = relay.finish();
                        if rest.is_empty() {
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        relay.trailers = frame.into_trailers().ok();
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                },
                Some(Err(e)) => {
                    // The model server broke the response off: the request did not complete.
                    // Dropping the accounting releases the in-flight counts without finishing.
                    tracing::debug!(error = %e, "upstream response body failed");
                    relay.accounting = None;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    let rest = relay.finish();
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
                }
            };
            // hyper knows the end from content-length (or the h2 end-of-stream flag): telling
            // the director now lets a whole non-streaming body be read in place, with no copy.
            let eos = relay.upstream.is_end_stream();
            let out = match &mut relay.accounting {
                Some(Accounting::Routed(r)) => {
                    let out = r.on_response_chunk(data, eos);
                    if !eos && r.holds_response_body() {
                        // Held by the director (the handler reads such bodies whole first, so
                        // this does not happen when it relays): read on.
                        continue;
                    }
                    out
                }
                _ => data,
            };
            if eos {
                let rest = relay.finish();
                debug_assert!(rest.is_empty(), "nothing is held after the end of stream");
            }
            return Poll::Ready(Some(Ok(Frame::data(out))));
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Relay(r) => {
                r.first.is_none()
                    && r.trailers.is_none()
                    && r.accounting.is_none()
                    && r.upstream.is_end_stream()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Relay(r) if r.same_length => r.upstream.size_hint(),
            Kind::Relay(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use llmsched_core::endpoint::{EndpointId, EndpointMeta};

    #[tokio::test]
    async fn full_bodies() {
        let b = ProxyBody::full("hello");
        assert_eq!(b.size_hint().exact(), Some(5));
        assert!(!b.is_end_stream());
        let got = b.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello");
        let e = ProxyBody::full(Bytes::new());
        assert!(e.is_end_stream());
    }

    #[test]
    fn a_collector_never_sizes_its_buffer_from_the_announced_length() {
        let limit = 64 << 20;
        // Announces 64 MiB, sends two small frames and stalls: what it sent is held, plus at
        // most the pre-allocation bound, never the announced 64 MiB.
        let mut c = BodyCollector::new(limit, Some(limit as u64)).unwrap();
        c.push(Bytes::from(vec![b'a'; 1000])).unwrap();
        c.push(Bytes::from(vec![b'b'; 1000])).unwrap();
        assert_eq!(c.len(), 2000);
        assert!(c.capacity() <= MAX_PREALLOC_BYTES, "{}", c.capacity());
        // Growing with the data: capacity at most twice what arrived (and never over the
        // limit), whatever was announced.
        let chunk = Bytes::from(vec![b'c'; 256 << 10]);
        while c.len() < 20 << 20 {
            c.push(chunk.clone()).unwrap();
            assert!(c.capacity() <= (2 * c.len()).max(MAX_PREALLOC_BYTES));
            assert!(c.capacity() <= limit);
        }
        // An announcement without bytes allocates nothing.
        let c = BodyCollector::new(limit, Some(limit as u64)).unwrap();
        assert_eq!(c.capacity(), 0);
    }

    #[test]
    fn a_collector_stops_at_the_limit() {
        assert!(matches!(
            BodyCollector::new(100, Some(101)),
            Err(ReadBodyError::TooLarge)
        ));
        let mut c = BodyCollector::new(100, None).unwrap();
        c.push(Bytes::from(vec![0u8; 60])).unwrap();
        c.push(Bytes::from(vec![0u8; 40])).unwrap();
        assert!(matches!(
            c.push(Bytes::from_static(b"x")),
            Err(ReadBodyError::TooLarge)
        ));
        assert!(c.capacity() <= 100);
        // A first frame alone over the limit.
        let mut c = BodyCollector::new(10, None).unwrap();
        assert!(matches!(
            c.push(Bytes::from(vec![0u8; 11])),
            Err(ReadBodyError::TooLarge)
        ));
        // Exactly the limit is fine.
        let mut c = BodyCollector::new(10, Some(10)).unwrap();
        c.push(Bytes::from_static(b"0123")).unwrap();
        c.push(Bytes::from_static(b"456789")).unwrap();
        assert_eq!(&c.finish()[..], b"0123456789");
    }

    #[tokio::test]
    async fn reading_bodies() {
        use http_body_util::{Full, StreamBody};
        type Frames = Vec<Result<Frame<Bytes>, std::convert::Infallible>>;
        let frames = |parts: &[&'static [u8]]| -> Frames {
            parts
                .iter()
                .map(|p| Ok(Frame::data(Bytes::from_static(p))))
                .collect()
        };
        let h = HeaderMap::new();
        // One frame: the same bytes, not a copy.
        let one = Bytes::from_static(b"{\"model\":\"m\"}");
        let got = read_request_body(&h, Full::new(one.clone()), 100)
            .await
            .unwrap();
        assert_eq!(got.as_ptr(), one.as_ptr());
        // Several frames, concatenated.
        let body = StreamBody::new(futures::stream::iter(frames(&[b"ab", b"cd", b"ef"])));
        let got = read_request_body(&h, body, 100).await.unwrap();
        assert_eq!(&got[..], b"abcdef");
        // Over the limit as it arrives (no content-length).
        let body = StreamBody::new(futures::stream::iter(frames(&[b"abcd", b"efgh"])));
        assert!(matches!(
            read_request_body(&h, body, 6).await,
            Err(ReadBodyError::TooLarge)
        ));
        // Announced over the limit: refused before reading.
        let mut big = HeaderMap::new();
        big.insert(header::CONTENT_LENGTH, "7".parse().unwrap());
        let body = StreamBody::new(futures::stream::pending::<
            Result<Frame<Bytes>, std::convert::Infallible>,
        >());
        assert!(matches!(
            read_request_body(&big, body, 6).await,
            Err(ReadBodyError::TooLarge)
        ));
        let e = ReadBodyError::TooLarge.to_inference_error(6);
        assert_eq!(e.http_status(), 413);
        assert_eq!(
            e.body(),
            "inference error: PayloadTooLarge - request body is larger than the limit of 6 bytes"
        );
    }

    #[test]
    fn inflight_guard_moves_and_releases() {
        let a = Arc::new(Endpoint::new(
            EndpointId(1),
            EndpointMeta::from_addr("10.0.0.1:8000".parse().unwrap()),
        ));
        let b = Arc::new(Endpoint::new(
            EndpointId(2),
            EndpointMeta::from_addr("10.0.0.2:8000".parse().unwrap()),
        ));
        let mut g = InflightGuard::new(a.clone());
        assert_eq!(a.inflight_requests(), 1);
        g.move_to(b.clone());
        assert_eq!((a.inflight_requests(), b.inflight_requests()), (0, 1));
        g.move_to(b.clone());
        assert_eq!(b.inflight_requests(), 1);
        drop(g);
        assert_eq!(b.inflight_requests(), 0);
        assert_eq!((a.dispatched_total(), b.dispatched_total()), (1, 1));
    }
}
