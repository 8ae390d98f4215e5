//! Idle timeouts on bodies, both ways:
//!
//! * [`UpstreamBody`] — a model server's response body: at most
//!   [`crate::ProxyOptions::upstream_timeout`] between two frames (a replica that stops
//!   sending mid-stream does not hold the client forever); a body that breaks off or stalls
//!   is reported to the endpoint's health (`reset` / `timeout`);
//! * [`IdleTimeout`] — a client's request body: at most
//!   [`crate::ProxyOptions::request_body_timeout`] between two frames (a client that sends
//!   headers and then stalls its body is answered 408 and disconnected).
//!
//! One timer per body, re-armed only when it fires early (a frame arrived since it was set),
//! so relaying a token stream costs one clock read per frame, not a timer-wheel update.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use llmsched_core::endpoint::Endpoint;
use llmsched_core::health::{FailureKind, HealthPolicy};
use tokio::time::{Instant, Sleep};

use crate::body::Upstream;

/// Errors of the bodies the proxy handles.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// No frame arrived for this long.
#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?}")]
pub struct IdleTimeoutError(pub Duration);

/// An idle timer: expires when no frame was seen for `idle`.
struct IdleTimer {
    idle: Duration,
    last: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimer {
    fn new(idle: Duration) -> Self {
        Self {
            idle,
            last: Instant::now(),
            sleep: None,
        }
    }

    fn touch(&mut self) {
        self.last = Instant::now();
    }

    /// True when the body has been idle for the whole timeout; otherwise registers `cx` to
    /// be woken when it may have.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = self.last + self.idle;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let deadline = self.last + self.idle;
            if Instant::now() >= deadline {
                return true;
            }
            sleep.as_mut().reset(deadline);
        }
    }
}

/// A body with an idle timeout between frames (none when `idle` is zero).
pub struct IdleTimeout<B> {
    inner: B,
    timer: Option<IdleTimer>,
    fired: Option<Arc<AtomicBool>>,
}

impl<B> IdleTimeout<B> {
    /// `inner` with at most `idle` between two frames (zero: no limit).
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            timer: (!idle.is_zero()).then(|| IdleTimer::new(idle)),
            fired: None,
        }
    }

    /// Sets `flag` when the timeout fires (for readers that only see a generic error).
    pub fn with_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.fired = Some(flag);
        self
    }
}

impl<B> Body for IdleTimeout<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(t) = &mut this.timer {
                    t.touch();
                }
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let expired = this.timer.as_mut().is_some_and(|t| t.poll_expired(cx));
                if !expired {
                    return Poll::Pending;
                }
                let idle = this.timer.take().map_or(Duration::ZERO, |t| t.idle);
                if let Some(f) = &this.fired {
                    f.store(true, Ordering::Release);
                }
                Poll::Ready(Some(Err(Box::new(IdleTimeoutError(idle)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// True when `e` (or a source of it) is an [`IdleTimeoutError`].
pub fn is_idle_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<IdleTimeoutError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A model server's response body (straight from its connection or through the in-process
/// P/D router): [`IdleTimeout`] plus health reports — a body that stalls
/// (`timeout`) or breaks off (`reset`) is a failure of the endpoint that sent it.
pub struct UpstreamBody {
    inner: IdleTimeout<Upstream>,
    report: Option<(Arc<Endpoint>, HealthPolicy)>,
}

impl UpstreamBody {
    /// `body` from `endpoint`, at most `idle` between frames.
    pub(crate) fn new(
        body: Upstream,
        idle: Duration,
        endpoint: Arc<Endpoint>,
        policy: HealthPolicy,
    ) -> Self {
        Self {
            inner: IdleTimeout::new(body, idle),
            report: Some((endpoint, policy)),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(e))) = &polled
            && let Some((endpoint, policy)) = self.report.take()
        {
            let kind = if e.is::<IdleTimeoutError>() {
                FailureKind::Timeout
            } else {
                FailureKind::Reset
            };
            // One warning per outage (the failure that takes the endpoint out); the other
            // requests cut by the same outage are logged at debug.
            if endpoint.record_failure(kind, std::time::Instant::now(), &policy) {
                tracing::warn!(endpoint = %endpoint.name(), error = %e, "upstream response body failed");
            } else {
                tracing::debug!(endpoint = %endpoint.name(), error = %e, "upstream response body failed");
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures::channel::mpsc;
    use http_body_util::{BodyExt, StreamBody};

    type Item = Result<Frame<Bytes>, std::convert::Infallible>;

    /// A body fed by the test, frame by frame.
    fn channel() -> (mpsc::Sender<Item>, StreamBody<mpsc::Receiver<Item>>) {
        let (tx, rx) = mpsc::channel(4);
        (tx, StreamBody::new(rx))
    }

    #[tokio::test(start_paused = true)]
    async fn frames_reset_the_idle_timer_and_silence_ends_the_body_with_an_error() {
        use futures::SinkExt;
        let (mut tx, rx) = channel();
        let mut body = IdleTimeout::new(rx, Duration::from_secs(10));
        // Frames 6 s apart never trip a 10 s idle timeout (the timer is re-armed lazily).
        for i in 0..5u8 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            tx.send(Ok(Frame::data(Bytes::from(vec![i]))))
                .await
                .unwrap();
            let f = body.frame().await.unwrap().unwrap();
            assert_eq!(f.into_data().unwrap(), Bytes::from(vec![i]));
        }
        // Then nothing: the body fails with the idle-timeout error.
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(is_idle_timeout(&*err), "{err}");
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_timeout_never_fires_and_the_end_passes_through() {
        use futures::SinkExt;
        let (mut tx, rx) = channel();
        let mut body = IdleTimeout::new(rx, Duration::ZERO);
        let t = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"late"))))
                .await
                .unwrap();
        });
        let f = body.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), Bytes::from_static(b"late"));
        t.await.unwrap();
        assert!(body.frame().await.is_none());
    }
}
