//! Response bodies: the sidecar's own answers, and upstream bodies relayed frame by frame
//! (SSE streams stay streams), optionally with the cached-tokens rewrite of [`crate::usage`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::client::BoxError;
use crate::metrics::SidecarMetrics;
use crate::usage::{SseRewriter, rewrite_json};

/// Largest non-streamed JSON body buffered for the usage rewrite; larger ones pass unchanged.
const MAX_REWRITE_BYTES: usize = 64 << 20;

/// Counts a request in flight until its response body is dropped (finished or abandoned by
/// the client).
#[derive(Debug)]
pub struct InflightGuard(Arc<SidecarMetrics>);

impl InflightGuard {
    /// Counts one more request in flight.
    pub fn new(metrics: Arc<SidecarMetrics>) -> Self {
        metrics.inflight(1);
        Self(metrics)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight(-1);
    }
}

/// How an upstream body is changed on the way.
#[derive(Debug)]
pub enum Rewrite {
    /// Not at all.
    None,
    /// SSE: cached tokens set line by line.
    Sse(SseRewriter),
    /// One JSON document: buffered, cached tokens set at the end.
    Json {
        /// The value to set.
        cached: u64,
        /// The document so far.
        buf: BytesMut,
        /// Too large to buffer: passed through as it came.
        overflow: bool,
    },
}

enum Kind {
    Full(Option<Bytes>),
    Upstream {
        body: Incoming,
        rewrite: Rewrite,
        done: bool,
    },
}

/// A response body of the sidecar.
pub struct ProxyBody {
    kind: Kind,
    _guard: Option<InflightGuard>,
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyBody").finish_non_exhaustive()
    }
}

impl ProxyBody {
    /// A complete body.
    pub fn full(b: impl Into<Bytes>) -> Self {
        Self {
            kind: Kind::Full(Some(b.into())),
            _guard: None,
        }
    }

    /// An upstream body relayed as it arrives.
    pub fn upstream(body: Incoming, rewrite: Rewrite) -> Self {
        Self {
            kind: Kind::Upstream {
                body,
                rewrite,
                done: false,
            },
            _guard: None,
        }
    }

    /// Keeps `guard` alive as long as the body.
    pub fn with_guard(mut self, guard: InflightGuard) -> Self {
        self._guard = Some(guard);
        self
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let (body, rewrite, done) = match &mut this.kind {
            Kind::Full(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream {
                body,
                rewrite,
                done,
            } => (body, rewrite, done),
        };
        loop {
            if *done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => data,
                        Err(other) => return Poll::Ready(Some(Ok(other))),
                    };
                    match rewrite {
                        Rewrite::None => return Poll::Ready(Some(Ok(Frame::data(frame)))),
                        Rewrite::Sse(r) => {
                            let out = r.push(&frame);
                            if !out.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                        }
                        Rewrite::Json { buf, overflow, .. } => {
                            if *overflow {
                                return Poll::Ready(Some(Ok(Frame::data(frame))));
                            }
                            buf.extend_from_slice(&frame);
                            if buf.len() > MAX_REWRITE_BYTES {
                                *overflow = true;
                                return Poll::Ready(Some(Ok(Frame::data(buf.split().freeze()))));
                            }
                        }
                    }
                }
                Poll::Ready(None) => {
                    *done = true;
                    let tail = match rewrite {
                        Rewrite::None => Bytes::new(),
                        Rewrite::Sse(r) => r.finish(),
                        Rewrite::Json {
                            cached,
                            buf,
                            overflow,
                        } => {
                            let doc = buf.split().freeze();
                            if *overflow {
                                doc
                            } else {
                                rewrite_json(&doc, *cached).map_or(doc, Bytes::from)
                            }
                        }
                    };
                    if !tail.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(tail))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream { done, .. } => *done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream {
                body,
                rewrite: Rewrite::None,
                ..
            } => body.size_hint(),
            Kind::Upstream { .. } => SizeHint::default(),
        }
    }
}
