//! [`GuardedStream`]: a connection's byte stream that enforces its listener's deadlines.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::{CloseReason, ConnHandle, ConnState, Slot};

/// A connection (TCP, or TLS over TCP) that closes itself when its listener says so: when it
/// has been idle past its deadline (checked by a timer while its reader waits), or when the
/// listener evicts it. Reads and writes then fail, which ends the connection in the
/// protocol stack on top. Dropping it releases its [`Slot`].
#[derive(Debug)]
pub struct GuardedStream<T> {
    inner: T,
    slot: Slot,
    timer: Pin<Box<Sleep>>,
}

fn closed_error(reason: CloseReason) -> io::Error {
    let kind = match reason {
        CloseReason::HeaderTimeout | CloseReason::IdleTimeout => io::ErrorKind::TimedOut,
        CloseReason::Evicted => io::ErrorKind::ConnectionAborted,
    };
    io::Error::new(
        kind,
        format!("connection closed by the listener: {}", reason.as_str()),
    )
}

impl<T> GuardedStream<T> {
    /// `inner` (accepted with `slot`) under its listener's limits.
    pub fn new(inner: T, slot: Slot) -> Self {
        let first = slot
            .state()
            .deadline()
            .map_or_else(Instant::now, |(d, _)| d);
        Self {
            inner,
            slot,
            timer: Box::pin(tokio::time::sleep_until(first)),
        }
    }

    /// The connection's request accounting.
    pub fn handle(&self) -> ConnHandle {
        self.slot.handle()
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn state(&self) -> &Arc<ConnState> {
        self.slot.state()
    }

    /// Runs the deadline timer; `Some` when the connection must close now.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Option<CloseReason> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return None;
            }
            let state = self.slot.state().clone();
            let now = Instant::now();
            match state.deadline() {
                None => {
                    let next = now + state.idle_check_interval();
                    self.timer.as_mut().reset(next);
                }
                Some((deadline, reason)) if now >= deadline => {
                    state.closing(reason);
                    return Some(reason);
                }
                Some((deadline, _)) => self.timer.as_mut().reset(deadline),
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedStream<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(reason) = self.state().close_reason() {
            return Poll::Ready(Err(closed_error(reason)));
        }
        self.state().waker.register(cx.waker());
        if let Poll::Ready(r) = Pin::new(&mut self.inner).poll_read(cx, buf) {
            return Poll::Ready(r);
        }
        match self.poll_deadline(cx) {
            Some(reason) => Poll::Ready(Err(closed_error(reason))),
            None => Poll::Pending,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedStream<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(reason) = self.state().close_reason() {
            return Poll::Ready(Err(closed_error(reason)));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(reason) = self.state().close_reason() {
            return Poll::Ready(Err(closed_error(reason)));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(feature = "tonic")]
impl<T> tonic::transport::server::Connected for GuardedStream<T> {
    type ConnectInfo = ConnHandle;

    fn connect_info(&self) -> ConnHandle {
        self.handle()
    }
}
