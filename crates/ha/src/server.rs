//! The `llmsched.ha.v1.ReplicaSync` gRPC service, written by hand in the shape tonic's
//! generated servers have (no protoc at build time), and the sync listener.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::server::{ClientStreamingService, NamedService, ServerStreamingService, UnaryService};
use tonic::{Request, Response, Status, Streaming};

use crate::proto::{self, HelloRequest, HelloResponse, PushSummary, SnapshotRequest, SyncBatch};
use crate::sync::{Inner, limits};
use crate::tls::{ListenerLimits, incoming};

/// The service (cheap to clone).
#[derive(Clone)]
pub(crate) struct ReplicaSyncServer {
    inner: Arc<Inner>,
}

impl NamedService for ReplicaSyncServer {
    const NAME: &'static str = proto::SERVICE;
}

struct HelloSvc(Arc<Inner>);
impl UnaryService<HelloRequest> for HelloSvc {
    type Response = HelloResponse;
    type Future = BoxFuture<Response<HelloResponse>, Status>;
    fn call(&mut self, req: Request<HelloRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.hello(req.get_ref()).map(Response::new) })
    }
}

struct PushSvc(Arc<Inner>);
impl ClientStreamingService<SyncBatch> for PushSvc {
    type Response = PushSummary;
    type Future = BoxFuture<Response<PushSummary>, Status>;
    fn call(&mut self, req: Request<Streaming<SyncBatch>>) -> Self::Future {
        let inner = self.0.clone();
        let from = req.remote_addr();
        Box::pin(async move {
            inner
                .serve_push(req.into_inner(), from)
                .await
                .map(Response::new)
        })
    }
}

struct SnapshotSvc(Arc<Inner>);
impl ServerStreamingService<SnapshotRequest> for SnapshotSvc {
    type Response = SyncBatch;
    type ResponseStream = ReceiverStream<Result<SyncBatch, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;
    fn call(&mut self, req: Request<SnapshotRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.serve_snapshot(req.get_ref()).map(Response::new) })
    }
}

fn grpc<Req: prost::Message + Default + Send + 'static, Resp: prost::Message + Send + 'static>()
-> tonic::server::Grpc<tonic_prost::ProstCodec<Resp, Req>> {
    tonic::server::Grpc::new(tonic_prost::ProstCodec::<Resp, Req>::default())
        .apply_max_message_size_config(Some(limits::MAX_MESSAGE), Some(limits::MAX_MESSAGE))
}

impl<B> Service<http::Request<B>> for ReplicaSyncServer
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        match req.uri().path() {
            proto::HELLO_PATH => Box::pin(async move {
                Ok(grpc::<HelloRequest, HelloResponse>()
                    .unary(HelloSvc(inner), req)
                    .await)
            }),
            proto::PUSH_PATH => Box::pin(async move {
                Ok(grpc::<SyncBatch, PushSummary>()
                    .client_streaming(PushSvc(inner), req)
                    .await)
            }),
            proto::SNAPSHOT_PATH => Box::pin(async move {
                Ok(grpc::<SnapshotRequest, SyncBatch>()
                    .server_streaming(SnapshotSvc(inner), req)
                    .await)
            }),
            _ => Box::pin(async move {
                let mut response = http::Response::new(Body::default());
                let headers = response.headers_mut();
                headers.insert(
                    Status::GRPC_STATUS,
                    (tonic::Code::Unimplemented as i32).into(),
                );
                headers.insert(
                    http::header::CONTENT_TYPE,
                    tonic::metadata::GRPC_CONTENT_TYPE,
                );
                Ok(response)
            }),
        }
    }
}

/// Serves the sync service on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    inner: Arc<Inner>,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let svc = ReplicaSyncServer {
        inner: inner.clone(),
    };
    let incoming = incoming(
        listener,
        tls,
        ListenerLimits::default(),
        inner.metrics.clone(),
        shutdown.clone(),
    );
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(32))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}
