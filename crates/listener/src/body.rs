//! Request accounting for servers: [`GuardedBody`] keeps a request in flight until its
//! response body ends; [`InflightLayer`] does it for a tower HTTP service whose requests
//! carry the connection's [`ConnHandle`] (tonic puts a stream's `Connected::ConnectInfo` into
//! every request's extensions).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};

use crate::{ConnHandle, RequestGuard};

/// A response body that holds its request's [`RequestGuard`] until it ends (or is dropped).
#[derive(Debug)]
pub struct GuardedBody<B> {
    inner: B,
    guard: Option<RequestGuard>,
}

impl<B> GuardedBody<B> {
    /// `inner`, keeping `guard` until the end.
    pub fn new(inner: B, guard: Option<RequestGuard>) -> Self {
        Self { inner, guard }
    }
}

impl<B: Body + Unpin> Body for GuardedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = &polled {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Tower layer counting each request as in flight on its connection until its response
/// body ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct InflightLayer;

impl<S> tower::Layer<S> for InflightLayer {
    type Service = InflightService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InflightService { inner }
    }
}

/// See [`InflightLayer`].
#[derive(Debug, Clone)]
pub struct InflightService<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for InflightService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ReqBody: 'static,
    ResBody: Body + Unpin + Send + 'static,
{
    type Response = http::Response<GuardedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let guard = req
            .extensions()
            .get::<ConnHandle>()
            .map(ConnHandle::request_started);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|b| GuardedBody::new(b, guard)))
        })
    }
}
