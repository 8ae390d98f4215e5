//! gRPC health (`grpc.health.v1.Health`) on its own port (and on the ext_proc port with
//! `--health-checking`), answering exactly as the reference EPP's health server does.
//!
//! Two facts drive every answer: whether the endpoint pool is **synced** (the data layer has
//! listed the pool) and whether this replica is the **leader** (always true without leader
//! election).
//!
//! * Without leader election (one replica; the chart's probes ask `inference-extension`):
//!   every service name, whatever it is, answers SERVING once synced and NOT_SERVING before.
//!   Liveness therefore fails too until the pool is synced, as in the reference.
//! * With leader election (`--ha-enable-leader-election`; the chart's probes ask `liveness`
//!   and `readiness`): `liveness` is always SERVING (a follower must not be restarted);
//!   `readiness`, `""` (overall) and `envoy.service.ext_proc.v3.ExternalProcessor` are
//!   SERVING only on the synced leader; any other name answers SERVICE_UNKNOWN.
//!
//! `Check` answers with a status, never a gRPC error (the reference answers SERVICE_UNKNOWN
//! rather than the standard NOT_FOUND). `Watch` (which the reference leaves unimplemented)
//! sends the current status at once and then every change, until the server shuts down.
//!
//! On shutdown [`HealthHandle::set_draining`] turns every name but `liveness` NOT_SERVING for
//! good (in both modes) while the servers drain, so Kubernetes and Envoy stop sending new work
//! at once; `liveness` stays SERVING (the process is fine, it is leaving).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use llmsched_core::endpoint::EndpointSource;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use llmsched_listener::Listener;

use crate::ServeError;
use crate::accept::{default_listener, tcp_incoming};

/// Liveness service name (the multi-replica chart's liveness probe).
pub const LIVENESS: &str = "liveness";
/// Readiness service name (the multi-replica chart's readiness probe).
pub const READINESS: &str = "readiness";
/// The ext_proc service name (Envoy's health check uses it).
pub const EXT_PROC: &str = "envoy.service.ext_proc.v3.ExternalProcessor";
/// The service name the single-replica chart's probes ask for.
pub const INFERENCE_EXTENSION: &str = "inference-extension";

/// Services that follow readiness (synced, and leader under leader election).
pub const READY_SERVICES: [&str; 3] = [READINESS, "", EXT_PROC];

/// What the health answers are computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HealthState {
    /// The endpoint pool has been listed (the data layer's `synced`).
    pub synced: bool,
    /// This replica holds the leader lease (ignored without leader election).
    pub leader: bool,
    /// The process is shutting down (set once, never cleared).
    pub draining: bool,
}

/// Controls the health answers. Cheap to clone; every clone shares the state.
#[derive(Debug, Clone)]
pub struct HealthHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    leader_election: bool,
    state: watch::Sender<HealthState>,
}

impl Default for HealthHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthHandle {
    /// Without leader election: not synced yet, so every service is NOT_SERVING.
    pub fn new() -> Self {
        Self::with_leader_election(false)
    }

    /// With `leader_election`, readiness also needs [`HealthHandle::set_leader`]`(true)`;
    /// without it this replica counts as the leader.
    pub fn with_leader_election(leader_election: bool) -> Self {
        let (state, _) = watch::channel(HealthState::default());
        Self {
            inner: Arc::new(Inner {
                leader_election,
                state,
            }),
        }
    }

    /// True when leader election decides readiness.
    pub fn leader_election(&self) -> bool {
        self.inner.leader_election
    }

    /// The current state.
    pub fn state(&self) -> HealthState {
        *self.inner.state.borrow()
    }

    /// Records whether the endpoint pool is synced.
    pub fn set_synced(&self, synced: bool) {
        self.update(|s| s.synced = synced);
    }

    /// Records whether this replica holds the leader lease.
    pub fn set_leader(&self, leader: bool) {
        self.update(|s| s.leader = leader);
    }

    /// The EPP is shutting down: every service but `liveness` answers NOT_SERVING from now on.
    pub fn set_draining(&self) {
        if !self.is_draining() {
            self.update(|s| s.draining = true);
            tracing::info!("health: draining, readiness NOT_SERVING");
        }
    }

    /// True once [`Self::set_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.state().draining
    }

    /// Alias of [`HealthHandle::set_synced`].
    pub fn set_ready(&self, synced: bool) {
        self.set_synced(synced);
    }

    fn update(&self, f: impl FnOnce(&mut HealthState)) {
        let before = self.is_ready();
        let changed = self.inner.state.send_if_modified(|s| {
            let old = *s;
            f(s);
            *s != old
        });
        if changed {
            let state = self.state();
            let ready = self.is_ready();
            if ready != before {
                tracing::info!(
                    ready,
                    synced = state.synced,
                    leader = state.leader,
                    leader_election = self.inner.leader_election,
                    "health: readiness changed"
                );
            }
        }
    }

    /// True when the `readiness` service answers SERVING.
    pub fn is_ready(&self) -> bool {
        status_for(self.inner.leader_election, self.state(), READINESS) == ServingStatus::Serving
    }

    /// The status `Check` answers for `service` right now.
    pub fn status(&self, service: &str) -> ServingStatus {
        status_for(self.inner.leader_election, self.state(), service)
    }

    /// A gRPC health service answering from this handle (can be added to several servers).
    /// Its `Watch` streams end when `shutdown` is cancelled, so they never hold up a graceful
    /// server shutdown.
    pub fn service(&self, shutdown: CancellationToken) -> HealthServer<HealthGrpc> {
        HealthServer::new(HealthGrpc {
            handle: self.clone(),
            shutdown,
        })
    }
}

/// The reference's answer for `service` in `state`.
pub fn status_for(leader_election: bool, state: HealthState, service: &str) -> ServingStatus {
    let serving = |ok: bool| {
        if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    if state.draining {
        return if service == LIVENESS {
            ServingStatus::Serving
        } else if leader_election && !matches!(service, READINESS | "" | EXT_PROC) {
            ServingStatus::ServiceUnknown
        } else {
            ServingStatus::NotServing
        };
    }
    if !leader_election {
        return serving(state.synced);
    }
    match service {
        LIVENESS => ServingStatus::Serving,
        READINESS | "" | EXT_PROC => serving(state.synced && state.leader),
        _ => ServingStatus::ServiceUnknown,
    }
}

/// `grpc.health.v1.Health` over a [`HealthHandle`].
#[derive(Debug, Clone)]
pub struct HealthGrpc {
    handle: HealthHandle,
    shutdown: CancellationToken,
}

type WatchStream =
    Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send + 'static>>;

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl Health for HealthGrpc {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let service = request.into_inner().service;
        let status = self.handle.status(&service);
        match status {
            ServingStatus::Serving => tracing::trace!(%service, "gRPC health check serving"),
            ServingStatus::ServiceUnknown => tracing::debug!(
                requested_service = %service,
                available_services = ?[LIVENESS, READINESS, EXT_PROC],
                "gRPC health check asked for an unknown service"
            ),
            _ => {
                let state = self.handle.state();
                tracing::debug!(
                    %service,
                    synced = state.synced,
                    leader = state.leader,
                    "gRPC health check not serving"
                );
            }
        }
        Ok(tonic::Response::new(response(status)))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let service = request.into_inner().service;
        let leader_election = self.handle.inner.leader_election;
        let rx = self.handle.inner.state.subscribe();
        let shutdown = self.shutdown.clone();
        // State: (receiver, last status sent).
        let stream = futures::stream::unfold((rx, None::<ServingStatus>), move |(mut rx, last)| {
            let service = service.clone();
            let shutdown = shutdown.clone();
            async move {
                loop {
                    let status = status_for(leader_election, *rx.borrow_and_update(), &service);
                    if last != Some(status) {
                        return Some((Ok(response(status)), (rx, Some(status))));
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        changed = rx.changed() => if changed.is_err() { return None },
                    }
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

/// Serves gRPC health on `listener` (plaintext, as the reference) until `shutdown`, with the
/// default connection limits; see [`serve_health_on`].
pub async fn serve_health(
    listener: TcpListener,
    handle: HealthHandle,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    serve_health_on(default_listener(listener, "health"), handle, shutdown).await
}

/// [`serve_health`] on a listener with its own limits.
pub async fn serve_health_on(
    listener: Listener,
    handle: HealthHandle,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let incoming = tcp_incoming(listener, shutdown.clone());
    tonic::transport::Server::builder()
        .layer(llmsched_listener::InflightLayer)
        .add_service(handle.service(shutdown.clone()))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .map_err(ServeError::Transport)
}

/// Polls `endpoints` every `interval` and records `EndpointSet::synced` in `handle`.
pub fn spawn_readiness_watch(
    handle: HealthHandle,
    endpoints: Arc<dyn EndpointSource>,
    interval: Duration,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            handle.set_synced(endpoints.snapshot().synced);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: [&str; 6] = [
        LIVENESS,
        READINESS,
        "",
        EXT_PROC,
        INFERENCE_EXTENSION,
        "anything-else",
    ];

    fn st(synced: bool, leader: bool) -> HealthState {
        HealthState {
            synced,
            leader,
            draining: false,
        }
    }

    #[test]
    fn draining_turns_all_but_liveness_not_serving_for_good() {
        for election in [false, true] {
            let h = HealthHandle::with_leader_election(election);
            h.set_synced(true);
            h.set_leader(true);
            assert!(h.is_ready());
            h.set_draining();
            assert!(h.is_draining());
            assert!(!h.is_ready());
            assert_eq!(h.status(LIVENESS), ServingStatus::Serving);
            for name in READY_SERVICES {
                assert_eq!(h.status(name), ServingStatus::NotServing, "{name:?}");
            }
            h.set_synced(true);
            h.set_leader(true);
            assert!(!h.is_ready(), "draining is never undone");
        }
    }

    #[test]
    fn without_election_every_name_follows_sync() {
        for name in NAMES {
            for leader in [false, true] {
                assert_eq!(
                    status_for(false, st(false, leader), name),
                    ServingStatus::NotServing,
                    "{name:?}"
                );
                assert_eq!(
                    status_for(false, st(true, leader), name),
                    ServingStatus::Serving,
                    "{name:?}"
                );
            }
        }
    }

    #[test]
    fn with_election_liveness_always_and_readiness_on_the_synced_leader() {
        for (synced, leader) in [(false, false), (true, false), (false, true), (true, true)] {
            let s = st(synced, leader);
            assert_eq!(status_for(true, s, LIVENESS), ServingStatus::Serving);
            let want = if synced && leader {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for name in READY_SERVICES {
                assert_eq!(status_for(true, s, name), want, "{name:?} {s:?}");
            }
            for name in [INFERENCE_EXTENSION, "anything-else", "Readiness"] {
                assert_eq!(
                    status_for(true, s, name),
                    ServingStatus::ServiceUnknown,
                    "{name:?}"
                );
            }
        }
    }

    #[test]
    fn handle_tracks_state_and_readiness() {
        let h = HealthHandle::with_leader_election(true);
        assert!(!h.is_ready());
        h.set_synced(true);
        assert!(!h.is_ready(), "synced follower is not ready");
        h.set_leader(true);
        assert!(h.is_ready());
        h.set_leader(false);
        assert!(!h.is_ready(), "losing the lease makes the replica unready");
        assert_eq!(h.status(LIVENESS), ServingStatus::Serving);

        let single = HealthHandle::new();
        assert!(!single.is_ready());
        assert_eq!(single.status(LIVENESS), ServingStatus::NotServing);
        single.set_ready(true);
        assert!(single.is_ready());
        assert_eq!(single.status(INFERENCE_EXTENSION), ServingStatus::Serving);
    }
}
