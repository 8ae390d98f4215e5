//! The response body the proxy hands to hyper: either a small local body (errors, a
//! rewritten non-streaming response) or the upstream body relayed frame by frame.
//!
//! Relaying holds no buffer of its own: each upstream frame is polled only when hyper polls
//! this body, which it does only when the client connection can take more bytes, so a slow
//! client slows the upstream read (TCP backpressure end to end). Every data frame is shown to
//! the director ([`Routed::on_response_body`]: usage, streaming hooks) and, when the model
//! was rewritten, has `"model":"<target>"` turned back into the requested name. When the
//! client goes away hyper drops this body: the upstream response is dropped with it (hyper
//! closes that upstream connection, which cancels the request on the model server) and so
//! is the [`Routed`], which releases the in-flight counts.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use llmsched_core::endpoint::Endpoint;
use llmsched_director::Routed;

/// Errors of relayed bodies.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    upstream: Upstream,
    accounting: Option<Accounting>,
    /// Rewrite the model name back in each chunk (the length may change).
    rewrite: bool,
    /// The director was told about the end of the body.
    body_ended: bool,
}

impl Relay {
    /// Tells the director the response ended and releases the accounting.
    fn finish(&mut self) {
        match self.accounting.take() {
            Some(Accounting::Routed(mut r)) => {
                if !self.body_ended {
                    r.on_response_body(&[], true);
                    self.body_ended = true;
                }
                r.finish();
            }
            Some(Accounting::Baseline(g)) => drop(g),
            None => {}
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
    pub(crate) fn relay(upstream: Upstream, accounting: Accounting, rewrite: bool) -> Self {
        Self {
            kind: Kind::Relay(Box::new(Relay {
                upstream,
                accounting: Some(accounting),
                rewrite,
                body_ended: false,
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
        let polled = ready!(Pin::new(&mut relay.upstream).poll_frame(cx));
        match polled {
            Some(Ok(frame)) => {
                let data = match frame.into_data() {
                    Ok(data) => data,
                    Err(trailers) => {
                        relay.finish();
                        return Poll::Ready(Some(Ok(trailers)));
                    }
                };
                // hyper knows the end from content-length (or the h2 end-of-stream flag):
                // telling the director now lets a whole non-streaming body be read in
                // place, with no copy.
                let eos = relay.upstream.is_end_stream();
                let mut out = data;
                if let Some(Accounting::Routed(r)) = &mut relay.accounting {
                    r.on_response_body(&out, eos);
                    relay.body_ended = eos;
                    if relay.rewrite
                        && let Cow::Owned(v) = r.rewrite_response_model(&out)
                    {
                        out = Bytes::from(v);
                    }
                }
                if eos {
                    relay.finish();
                }
                Poll::Ready(Some(Ok(Frame::data(out))))
            }
            Some(Err(e)) => {
                // The model server broke the response off: the request did not complete.
                // Dropping the accounting releases the in-flight counts without finishing.
                tracing::debug!(error = %e, "upstream response body failed");
                relay.accounting = None;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                relay.finish();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Relay(r) => r.accounting.is_none() && r.upstream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Relay(r) if !r.rewrite => r.upstream.size_hint(),
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
