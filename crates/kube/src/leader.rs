//! Leader election over a `coordination.k8s.io/v1` Lease (`--ha-enable-leader-election`).
//!
//! The reference EPP uses controller-runtime's leader election; this module follows the same
//! protocol (client-go's `leaderelection` with a Lease lock) so replicas of either agree:
//!
//! * the Lease is `epp-<pool-namespace>-<pool-name>.gateway-api-inference-extension.sigs.k8s.io`
//!   in the pool's namespace ([`lease_name`]); the holder identity is `POD_NAME`, else the
//!   host name plus a random suffix ([`holder_identity`]);
//! * a candidate reads the Lease every *retry period* (jittered by up to 1.2×). It takes the
//!   Lease when nobody holds it, or when the record has not changed for the record's
//!   `leaseDurationSeconds` as measured on this replica's clock (never comparing clocks with
//!   the holder). Writes carry the `resourceVersion` read, so of two candidates racing, one
//!   gets 409 Conflict and stays a follower;
//! * the leader renews every retry period; when no renewal succeeds for the *renew deadline*
//!   (API server unreachable, 403...) or another holder shows up, it stops leading: the health
//!   server reports it not ready and it becomes a candidate again (controller-runtime exits
//!   the process instead; staying up keeps the endpoint store warm for the next term);
//! * on shutdown the leader releases the Lease (empty holder, `leaseDurationSeconds: 1`), so a
//!   follower takes over on its next retry instead of waiting out the lease.
//!
//! Defaults are controller-runtime's: lease duration 15 s, renew deadline 10 s, retry period
//! 2 s. With them a crashed leader (no release) is replaced about 15-17 s after its last
//! renewal, a released lease within about one retry period.
//!
//! Errors never stop the loop and never block scheduling: every replica serves ext_proc
//! whatever its role. Each failed Lease call is counted in
//! `llmsched_leader_election_errors_total{operation,reason}` and logged once per distinct
//! cause (403 names the missing RBAC rule; an unreachable API server says so), then at debug
//! level until the cause changes or the call succeeds again.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// controller-runtime's default lease duration.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// controller-runtime's default renew deadline.
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// controller-runtime's default retry period.
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);
/// client-go's jitter factor for a candidate's retries.
const JITTER_FACTOR: f64 = 1.2;
/// The longest a release on shutdown may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// The reference's Lease name for a pool.
pub fn lease_name(pool_namespace: &str, pool_name: &str) -> String {
    format!("epp-{pool_namespace}-{pool_name}.gateway-api-inference-extension.sigs.k8s.io")
}

/// The Deployment name in a pod name made by a ReplicaSet (`<deployment>-<hash>-<suffix>`),
/// which names the Lease in `--endpoint-selector` mode (there is no pool), as the reference
/// derives it from `POD_NAME`.
pub fn deployment_of_pod(pod_name: &str) -> Option<&str> {
    let mut parts = pod_name.rsplitn(3, '-');
    let suffix = parts.next()?;
    let hash = parts.next()?;
    let deployment = parts.next()?;
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    (token(suffix) && token(hash) && !deployment.is_empty()).then_some(deployment)
}

/// This replica's identity in the Lease: env `POD_NAME` (the chart sets it from the downward
/// API), else the host name plus `_` and a random suffix, so two processes on one host differ.
pub fn holder_identity() -> String {
    identity_from(std::env::var("POD_NAME").ok())
}

fn identity_from(pod_name: Option<String>) -> String {
    if let Some(p) = pod_name.map(|p| p.trim().to_string())
        && !p.is_empty()
    {
        return p;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "llmsched-epp".to_string());
    format!("{host}_{:016x}", random_u64())
}

fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

/// `base` stretched by a random factor in `[1, 1 + JITTER_FACTOR)`, as client-go's
/// `wait.Jitter`.
fn jittered(base: Duration) -> Duration {
    let frac = (random_u64() >> 11) as f64 / (1u64 << 53) as f64;
    base.mul_f64(1.0 + JITTER_FACTOR * frac)
}

/// Leader election settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderElectionConfig {
    /// Namespace of the Lease (the pool's).
    pub namespace: String,
    /// Name of the Lease ([`lease_name`]).
    pub lease_name: String,
    /// This replica's identity ([`holder_identity`]).
    pub identity: String,
    /// How long a lease is valid after its last observed renewal.
    pub lease_duration: Duration,
    /// How long a leader keeps trying to renew before it steps down.
    pub renew_deadline: Duration,
    /// Time between attempts.
    pub retry_period: Duration,
}

impl LeaderElectionConfig {
    /// The reference's Lease for `pool_namespace/pool_name`, this replica's identity and
    /// controller-runtime's timings.
    pub fn for_pool(pool_namespace: &str, pool_name: &str) -> Self {
        Self {
            namespace: pool_namespace.to_string(),
            lease_name: lease_name(pool_namespace, pool_name),
            identity: holder_identity(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }

    /// client-go's rules: lease duration > renew deadline > 1.2 × retry period > 0, and a
    /// non-empty identity.
    pub fn validate(&self) -> Result<(), LeaderElectionError> {
        let bad = |m: String| Err(LeaderElectionError::Config(m));
        if self.identity.is_empty() {
            return bad("the holder identity is empty".into());
        }
        if self.lease_name.is_empty() || self.namespace.is_empty() {
            return bad("the Lease name and namespace must be set".into());
        }
        if self.retry_period.is_zero() {
            return bad("the retry period must be positive".into());
        }
        if self.lease_duration <= self.renew_deadline {
            return bad(format!(
                "the lease duration ({:?}) must be greater than the renew deadline ({:?})",
                self.lease_duration, self.renew_deadline
            ));
        }
        if self.renew_deadline <= self.retry_period.mul_f64(JITTER_FACTOR) {
            return bad(format!(
                "the renew deadline ({:?}) must be greater than {JITTER_FACTOR} x the retry period ({:?})",
                self.renew_deadline, self.retry_period
            ));
        }
        if self.lease_duration.as_secs() == 0 || self.lease_duration.subsec_nanos() != 0 {
            return bad(format!(
                "the lease duration ({:?}) must be a whole number of seconds (the Lease stores seconds)",
                self.lease_duration
            ));
        }
        Ok(())
    }
}

/// Leader election cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaderElectionError {
    /// The settings are inconsistent.
    #[error("leader election: {0}")]
    Config(String),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    operation: &'static str,
    reason: &'static str,
}

/// `llmsched_leader`, `llmsched_leader_transitions_total`,
/// `llmsched_leader_election_errors_total`.
#[derive(Debug, Clone, Default)]
pub struct LeaderMetrics {
    leader: Gauge,
    transitions: Family<TransitionLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
}

impl LeaderMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "llmsched_leader",
            "1 while this replica holds the leader Lease, else 0.",
            m.leader.clone(),
        );
        registry.register(
            "llmsched_leader_transitions",
            "Leadership changes of this replica: acquired, lost (renewal failed or another holder), released (shutdown).",
            m.transitions.clone(),
        );
        registry.register(
            "llmsched_leader_election_errors",
            "Failed Lease calls, by operation (get, create, update, release) and reason (forbidden, unauthorized, unreachable, timeout, conflict, api_error, malformed).",
            m.errors.clone(),
        );
        m
    }

    /// 1 while leader.
    pub fn leader(&self) -> i64 {
        self.leader.get()
    }

    /// Transitions of kind `event` (`acquired`, `lost`, `released`).
    pub fn transitions(&self, event: &'static str) -> u64 {
        self.transitions
            .get_or_create(&TransitionLabels { event })
            .get()
    }

    /// Failed Lease calls of `operation` for `reason`.
    pub fn errors(&self, operation: &'static str, reason: &'static str) -> u64 {
        self.errors
            .get_or_create(&ErrorLabels { operation, reason })
            .get()
    }
}

/// Why a Lease call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseErrorKind {
    /// 403: the service account may not use Leases.
    Forbidden,
    /// 401: the credentials are not accepted.
    Unauthorized,
    /// The API server cannot be reached.
    Unreachable,
    /// The call did not finish in time.
    Timeout,
    /// 409: someone else changed the Lease first (lost a race).
    Conflict,
    /// Another answer from the API server (5xx, 429, 404 on update...).
    ApiError,
    /// The answer could not be read.
    Malformed,
}

impl LeaseErrorKind {
    fn label(self) -> &'static str {
        match self {
            Self::Forbidden => "forbidden",
            Self::Unauthorized => "unauthorized",
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
            Self::Conflict => "conflict",
            Self::ApiError => "api_error",
            Self::Malformed => "malformed",
        }
    }

    fn classify(e: &kube::Error) -> Self {
        match e {
            kube::Error::Api(s) => match s.code {
                403 => Self::Forbidden,
                401 => Self::Unauthorized,
                409 => Self::Conflict,
                _ => Self::ApiError,
            },
            kube::Error::SerdeError(_) | kube::Error::FromUtf8(_) => Self::Malformed,
            _ => Self::Unreachable,
        }
    }
}

#[derive(Debug)]
struct LeaseError {
    op: &'static str,
    kind: LeaseErrorKind,
    message: String,
}

impl LeaseError {
    fn from_kube(op: &'static str, e: &kube::Error) -> Self {
        Self {
            op,
            kind: LeaseErrorKind::classify(e),
            message: e.to_string(),
        }
    }
}

/// The part of a Lease record that tells whether it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    lease_duration_seconds: Option<i32>,
    acquire_time: Option<MicroTime>,
    renew_time: Option<MicroTime>,
    transitions: Option<i32>,
}

impl Record {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        Self {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            lease_duration_seconds: spec.lease_duration_seconds,
            acquire_time: spec.acquire_time,
            renew_time: spec.renew_time,
            transitions: spec.lease_transitions,
        }
    }
}

/// What a candidate or leader does with the Lease it read.
#[derive(Debug, Clone, PartialEq)]
enum Plan {
    /// Another replica holds a valid lease.
    Follow { holder: String },
    /// Write this record (take over, or renew our own).
    Write(LeaseSpec),
}

/// The pure decision of one attempt (client-go's `tryAcquireOrRenew` after the read).
fn plan(
    me: &str,
    record: &Record,
    observed_for: Duration,
    default_duration: Duration,
    now: MicroTime,
) -> Plan {
    let duration = record
        .lease_duration_seconds
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s.unsigned_abs().into()))
        .unwrap_or(default_duration);
    let mine = record.holder.as_deref() == Some(me);
    if let Some(holder) = &record.holder
        && !mine
        && observed_for < duration
    {
        return Plan::Follow {
            holder: holder.clone(),
        };
    }
    let transitions = record.transitions.unwrap_or(0);
    let duration_seconds = i32::try_from(default_duration.as_secs()).unwrap_or(i32::MAX);
    Plan::Write(LeaseSpec {
        holder_identity: Some(me.to_string()),
        lease_duration_seconds: Some(duration_seconds),
        acquire_time: if mine {
            record.acquire_time.clone().or_else(|| Some(now.clone()))
        } else {
            Some(now.clone())
        },
        renew_time: Some(now),
        lease_transitions: Some(if mine {
            transitions
        } else {
            transitions.saturating_add(1)
        }),
        ..LeaseSpec::default()
    })
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// Called with `true` when this replica becomes leader and `false` when it stops, before the
/// Lease is released (so a replica is never ready after giving the Lease away).
pub type OnLeaderChange = Arc<dyn Fn(bool) + Send + Sync>;

/// A running election.
#[derive(Debug)]
pub struct LeaderElection {
    leader: watch::Receiver<bool>,
    task: Option<JoinHandle<()>>,
}

impl LeaderElection {
    /// True while this replica is the leader.
    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Leadership changes.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.leader.clone()
    }

    /// Waits for the election to finish after its shutdown token was cancelled (the Lease is
    /// released by then, when this replica held it).
    pub async fn stopped(mut self) {
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Stops at once without releasing the Lease, as a crash would (tests).
    pub fn abort(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Starts electing with `client` until `shutdown`; `on_change` learns every change.
pub fn spawn(
    client: kube::Client,
    config: LeaderElectionConfig,
    metrics: LeaderMetrics,
    on_change: OnLeaderChange,
    shutdown: CancellationToken,
) -> Result<LeaderElection, LeaderElectionError> {
    config.validate()?;
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let (tx, rx) = watch::channel(false);
    tracing::info!(
        lease = %config.lease_name,
        namespace = %config.namespace,
        identity = %config.identity,
        lease_duration = ?config.lease_duration,
        renew_deadline = ?config.renew_deadline,
        retry_period = ?config.retry_period,
        "leader election: starting"
    );
    let elector = Elector {
        api,
        config,
        metrics,
        on_change,
        tx,
        observed: None,
        resource_version: None,
        last_error: None,
    };
    let task = tokio::spawn(elector.run(shutdown));
    Ok(LeaderElection {
        leader: rx,
        task: Some(task),
    })
}

struct Elector {
    api: Api<Lease>,
    config: LeaderElectionConfig,
    metrics: LeaderMetrics,
    on_change: OnLeaderChange,
    tx: watch::Sender<bool>,
    /// The last record read or written, and when it last changed (our clock).
    observed: Option<(Record, Instant)>,
    /// resourceVersion of our last successful write (for the release).
    resource_version: Option<String>,
    /// The last error's (operation, kind), to log each cause once.
    last_error: Option<(&'static str, LeaseErrorKind)>,
}

/// Outcome of one attempt.
enum Attempt {
    Leader,
    Follower,
}

impl Elector {
    async fn run(mut self, shutdown: CancellationToken) {
        loop {
            // Candidate.
            loop {
                let outcome = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = self.attempt(self.config.renew_deadline) => r,
                };
                if matches!(outcome, Attempt::Leader) {
                    break;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(jittered(self.config.retry_period)) => {}
                }
            }
            self.set_leader(true, "acquired");
            // Leader.
            let mut last_renew = Instant::now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        self.set_leader(false, "released");
                        self.release().await;
                        return;
                    }
                    _ = tokio::time::sleep(self.config.retry_period) => {}
                }
                let left = self
                    .config
                    .renew_deadline
                    .saturating_sub(last_renew.elapsed())
                    .max(Duration::from_millis(100));
                let outcome = tokio::select! {
                    _ = shutdown.cancelled() => {
                        self.set_leader(false, "released");
                        self.release().await;
                        return;
                    }
                    r = self.attempt(left) => r,
                };
                match outcome {
                    Attempt::Leader => last_renew = Instant::now(),
                    Attempt::Follower
                        if self.observed.as_ref().is_some_and(|(r, _)| {
                            r.holder.is_some()
                                && r.holder.as_deref() != Some(self.config.identity.as_str())
                        }) =>
                    {
                        tracing::warn!(
                            lease = %self.config.lease_name,
                            holder = ?self.observed.as_ref().and_then(|(r, _)| r.holder.clone()),
                            "leader election: another replica holds the Lease; stepping down"
                        );
                        self.set_leader(false, "lost");
                        break;
                    }
                    Attempt::Follower => {}
                }
                if last_renew.elapsed() >= self.config.renew_deadline {
                    tracing::error!(
                        lease = %self.config.lease_name,
                        renew_deadline = ?self.config.renew_deadline,
                        "leader election: could not renew the Lease within the renew deadline; stepping down (not ready until leader again)"
                    );
                    self.set_leader(false, "lost");
                    break;
                }
            }
        }
    }

    fn set_leader(&self, leader: bool, event: &'static str) {
        if *self.tx.borrow() == leader {
            return;
        }
        // Health first: a replica must be unready before it gives the Lease away.
        (self.on_change)(leader);
        self.metrics.leader.set(i64::from(leader));
        self.metrics
            .transitions
            .get_or_create(&TransitionLabels { event })
            .inc();
        let _ = self.tx.send(leader);
        if leader {
            tracing::info!(lease = %self.config.lease_name, identity = %self.config.identity, "leader election: this replica is now the leader");
        } else {
            tracing::info!(lease = %self.config.lease_name, identity = %self.config.identity, event, "leader election: this replica is no longer the leader");
        }
    }

    /// One read-decide-write round, bounded by `budget`.
    async fn attempt(&mut self, budget: Duration) -> Attempt {
        match tokio::time::timeout(budget, self.try_acquire_or_renew()).await {
            Ok(Ok(a)) => {
                if let Some((op, kind)) = self.last_error.take()
                    && kind != LeaseErrorKind::Conflict
                {
                    tracing::info!(lease = %self.config.lease_name, after = op, "leader election: Lease calls succeed again");
                }
                a
            }
            Ok(Err(e)) => {
                self.record_error(e);
                Attempt::Follower
            }
            Err(_) => {
                self.record_error(LeaseError {
                    op: "get",
                    kind: LeaseErrorKind::Timeout,
                    message: format!("no answer within {budget:?}"),
                });
                Attempt::Follower
            }
        }
    }

    fn record_error(&mut self, e: LeaseError) {
        self.metrics
            .errors
            .get_or_create(&ErrorLabels {
                operation: e.op,
                reason: e.kind.label(),
            })
            .inc();
        let (lease, ns) = (&self.config.lease_name, &self.config.namespace);
        if e.kind == LeaseErrorKind::Conflict {
            tracing::debug!(%lease, op = e.op, "leader election: another replica changed the Lease first (409 Conflict)");
            return;
        }
        let first = self.last_error != Some((e.op, e.kind));
        self.last_error = Some((e.op, e.kind));
        if !first {
            tracing::debug!(%lease, op = e.op, error = %e.message, "leader election: Lease call failed again");
            return;
        }
        let verb = match e.op {
            "release" => "update",
            op => op,
        };
        match e.kind {
            LeaseErrorKind::Forbidden => tracing::error!(
                %lease, namespace = %ns, op = e.op, error = %e.message,
                "leader election: 403 Forbidden: the service account may not {verb} leases.coordination.k8s.io in namespace {ns}; grant get, create and update on leases (the chart's <release>-epp-leader-election Role). This replica stays a follower"
            ),
            LeaseErrorKind::Unauthorized => tracing::error!(
                %lease, op = e.op, error = %e.message,
                "leader election: 401 Unauthorized: the API server rejects this replica's credentials"
            ),
            LeaseErrorKind::Unreachable | LeaseErrorKind::Timeout => tracing::warn!(
                %lease, op = e.op, error = %e.message,
                "leader election: the Kubernetes API server is unreachable; retrying every retry period"
            ),
            LeaseErrorKind::Conflict | LeaseErrorKind::ApiError | LeaseErrorKind::Malformed => {
                tracing::warn!(%lease, op = e.op, error = %e.message, "leader election: Lease call failed")
            }
        }
    }

    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, LeaseError> {
        let me = self.config.identity.clone();
        let name = self.config.lease_name.clone();
        let current = self
            .api
            .get_opt(&name)
            .await
            .map_err(|e| LeaseError::from_kube("get", &e))?;
        let Some(lease) = current else {
            let spec = match plan(
                &me,
                &Record {
                    holder: None,
                    lease_duration_seconds: None,
                    acquire_time: None,
                    renew_time: None,
                    transitions: Some(-1),
                },
                Duration::ZERO,
                self.config.lease_duration,
                now(),
            ) {
                Plan::Write(spec) => spec,
                Plan::Follow { .. } => return Ok(Attempt::Follower),
            };
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            let created = self
                .api
                .create(&PostParams::default(), &lease)
                .await
                .map_err(|e| LeaseError::from_kube("create", &e))?;
            self.observe(&created);
            tracing::debug!(lease = %name, "leader election: created the Lease");
            return Ok(Attempt::Leader);
        };
        let record = Record::of(&lease);
        let observed_for = match &self.observed {
            Some((r, at)) if *r == record => at.elapsed(),
            _ => {
                self.observed = Some((record.clone(), Instant::now()));
                Duration::ZERO
            }
        };
        match plan(
            &me,
            &record,
            observed_for,
            self.config.lease_duration,
            now(),
        ) {
            Plan::Follow { holder } => {
                tracing::trace!(lease = %name, %holder, "leader election: Lease held by another replica");
                Ok(Attempt::Follower)
            }
            Plan::Write(spec) => {
                let taking_over = record.holder.as_deref() != Some(me.as_str());
                let mut updated = lease;
                updated.spec = Some(spec);
                let written = self
                    .api
                    .replace(&name, &PostParams::default(), &updated)
                    .await
                    .map_err(|e| LeaseError::from_kube("update", &e))?;
                self.observe(&written);
                if taking_over {
                    tracing::debug!(lease = %name, previous = ?record.holder, "leader election: took over the Lease");
                }
                Ok(Attempt::Leader)
            }
        }
    }

    fn observe(&mut self, lease: &Lease) {
        self.observed = Some((Record::of(lease), Instant::now()));
        self.resource_version = lease.metadata.resource_version.clone();
    }

    /// Gives the Lease back (client-go's release: empty holder, 1 s duration).
    async fn release(&mut self) {
        let Some(rv) = self.resource_version.clone() else {
            return;
        };
        let Some((record, _)) = self.observed.clone() else {
            return;
        };
        let t = now();
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.config.lease_name.clone()),
                namespace: Some(self.config.namespace.clone()),
                resource_version: Some(rv),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: None,
                lease_duration_seconds: Some(1),
                acquire_time: Some(t.clone()),
                renew_time: Some(t),
                lease_transitions: record.transitions,
                ..LeaseSpec::default()
            }),
        };
        let params = PostParams::default();
        let call = self.api.replace(&self.config.lease_name, &params, &lease);
        match tokio::time::timeout(RELEASE_TIMEOUT, call).await {
            Ok(Ok(_)) => {
                tracing::info!(lease = %self.config.lease_name, "leader election: released the Lease")
            }
            Ok(Err(e)) => {
                let e = LeaseError::from_kube("release", &e);
                self.last_error = None;
                self.record_error(e);
            }
            Err(_) => {
                self.last_error = None;
                self.record_error(LeaseError {
                    op: "release",
                    kind: LeaseErrorKind::Timeout,
                    message: format!("no answer within {RELEASE_TIMEOUT:?}"),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> MicroTime {
        MicroTime(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn rec(holder: Option<&str>, transitions: i32) -> Record {
        Record {
            holder: holder.map(str::to_string),
            lease_duration_seconds: Some(15),
            acquire_time: Some(t(100)),
            renew_time: Some(t(110)),
            transitions: Some(transitions),
        }
    }

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn lease_name_is_the_references() {
        assert_eq!(
            lease_name("llm-d", "gaie-inference-scheduling"),
            "epp-llm-d-gaie-inference-scheduling.gateway-api-inference-extension.sigs.k8s.io"
        );
    }

    #[test]
    fn deployment_names_come_from_replicaset_pod_names() {
        assert_eq!(deployment_of_pod("my-epp-7d9f8b6c5-x2x4z"), Some("my-epp"));
        assert_eq!(deployment_of_pod("epp-abc-def"), Some("epp"));
        assert_eq!(deployment_of_pod("epp-abc"), None);
        assert_eq!(deployment_of_pod("epp-ABC-def"), None);
        assert_eq!(deployment_of_pod("-abc-def"), None);
        assert_eq!(deployment_of_pod(""), None);
    }

    #[test]
    fn identity_prefers_pod_name_else_host_with_random_suffix() {
        assert_eq!(identity_from(Some("epp-0".into())), "epp-0");
        let a = identity_from(None);
        let b = identity_from(Some("  ".into()));
        assert!(a.contains('_'), "{a}");
        assert_ne!(a, b, "two processes on one host must differ");
    }

    #[test]
    fn a_valid_lease_of_another_holder_is_followed() {
        let p = plan(
            "me",
            &rec(Some("other"), 3),
            Duration::from_secs(14),
            D,
            t(200),
        );
        assert_eq!(
            p,
            Plan::Follow {
                holder: "other".into()
            }
        );
    }

    #[test]
    fn an_expired_lease_is_taken_over_with_one_more_transition() {
        let Plan::Write(spec) = plan("me", &rec(Some("other"), 3), D, D, t(200)) else {
            panic!("should take over");
        };
        assert_eq!(spec.holder_identity.as_deref(), Some("me"));
        assert_eq!(spec.lease_transitions, Some(4));
        assert_eq!(spec.acquire_time, Some(t(200)));
        assert_eq!(spec.renew_time, Some(t(200)));
        assert_eq!(spec.lease_duration_seconds, Some(15));
    }

    #[test]
    fn the_record_duration_decides_expiry() {
        // A released lease (1 s) of another holder that somehow kept its name expires fast.
        let mut r = rec(Some("other"), 1);
        r.lease_duration_seconds = Some(1);
        assert!(matches!(
            plan("me", &r, Duration::from_secs(1), D, t(200)),
            Plan::Write(_)
        ));
        assert!(matches!(
            plan("me", &r, Duration::from_millis(500), D, t(200)),
            Plan::Follow { .. }
        ));
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let Plan::Write(spec) = plan("me", &rec(None, 2), Duration::ZERO, D, t(200)) else {
            panic!("released lease should be taken");
        };
        assert_eq!(spec.lease_transitions, Some(3));
        let mut empty = rec(None, 2);
        empty.holder = None;
        assert!(matches!(
            plan("me", &empty, Duration::ZERO, D, t(200)),
            Plan::Write(_)
        ));
    }

    #[test]
    fn renewing_keeps_acquire_time_and_transitions() {
        let Plan::Write(spec) = plan("me", &rec(Some("me"), 5), Duration::ZERO, D, t(200)) else {
            panic!("own lease is renewed");
        };
        assert_eq!(spec.lease_transitions, Some(5));
        assert_eq!(spec.acquire_time, Some(t(100)));
        assert_eq!(spec.renew_time, Some(t(200)));
    }

    #[test]
    fn a_new_lease_starts_at_zero_transitions() {
        let r = Record {
            holder: None,
            lease_duration_seconds: None,
            acquire_time: None,
            renew_time: None,
            transitions: Some(-1),
        };
        let Plan::Write(spec) = plan("me", &r, Duration::ZERO, D, t(1)) else {
            panic!("creates");
        };
        assert_eq!(spec.lease_transitions, Some(0));
    }

    #[test]
    fn config_rules_are_client_gos() {
        let ok = LeaderElectionConfig {
            identity: "me".into(),
            ..LeaderElectionConfig::for_pool("ns", "pool")
        };
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.lease_duration, Duration::from_secs(15));
        assert_eq!(ok.renew_deadline, Duration::from_secs(10));
        assert_eq!(ok.retry_period, Duration::from_secs(2));
        let cases = [
            (
                LeaderElectionConfig {
                    renew_deadline: Duration::from_secs(15),
                    ..ok.clone()
                },
                "greater than the renew deadline",
            ),
            (
                LeaderElectionConfig {
                    retry_period: Duration::from_secs(9),
                    ..ok.clone()
                },
                "1.2 x the retry period",
            ),
            (
                LeaderElectionConfig {
                    retry_period: Duration::ZERO,
                    ..ok.clone()
                },
                "positive",
            ),
            (
                LeaderElectionConfig {
                    lease_duration: Duration::from_millis(15_500),
                    ..ok.clone()
                },
                "whole number of seconds",
            ),
            (
                LeaderElectionConfig {
                    identity: String::new(),
                    ..ok.clone()
                },
                "identity",
            ),
        ];
        for (cfg, needle) in cases {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    #[test]
    fn jitter_stays_within_client_gos_bounds() {
        let base = Duration::from_secs(2);
        for _ in 0..1000 {
            let j = jittered(base);
            assert!(j >= base && j < base.mul_f64(1.0 + JITTER_FACTOR), "{j:?}");
        }
    }
}
