//! Leader election against `llmsched-kubetest`, a test API server speaking the real
//! Kubernetes REST protocol on loopback (Leases with resourceVersion and 409 Conflict, 403
//! injection, stop/resume). No real kube-apiserver, k3s or envtest can run here (see that
//! crate's documentation); the client is the real kube-rs client built from a kubeconfig
//! file, as in a deployment.
//!
//! Lease timings are shortened (lease 2 s, renew deadline 1 s, retry 100-200 ms) so the
//! tests are quick; the protocol is the same as with the defaults. Tests wait for
//! conditions with generous deadlines and never assert durations.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use llmsched_kube::leader::{self, LeaderElection, LeaderElectionConfig, LeaderMetrics};
use llmsched_kubetest::{ResourceKind, TestApiServer};
use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

const NS: &str = "llm-d";
const POOL: &str = "gaie-inference-scheduling";
const DEADLINE: Duration = Duration::from_secs(60);

/// Log lines written while a test runs (tests run on one thread each, so a thread-local
/// subscriber sees every task of the test).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> (Logs, tracing::subscriber::DefaultGuard) {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("llmsched_kube=debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

struct Cluster {
    server: TestApiServer,
    client: kube::Client,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let server = TestApiServer::builder().start().await.unwrap();
        let client = Self::client_for(&server).await;
        let dir = tempfile::tempdir().unwrap();
        Self {
            server,
            client,
            _dir: dir,
        }
    }

    async fn client_for(server: &TestApiServer) -> kube::Client {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        server.kubeconfig().namespace(NS).write(&path).unwrap();
        llmsched_kube::discovery::client(Some(&path)).await.unwrap()
    }

    fn lease(&self) -> Option<serde_json::Value> {
        self.server
            .get(&ResourceKind::leases(), NS, &leader::lease_name(NS, POOL))
    }

    fn holder(&self) -> Option<String> {
        self.lease()
            .and_then(|l| l.pointer("/spec/holderIdentity").cloned())
            .and_then(|h| h.as_str().map(str::to_string))
            .filter(|h| !h.is_empty())
    }

    fn transitions(&self) -> i64 {
        self.lease()
            .and_then(|l| l.pointer("/spec/leaseTransitions").and_then(|v| v.as_i64()))
            .unwrap_or(-1)
    }
}

fn fast(identity: &str) -> LeaderElectionConfig {
    LeaderElectionConfig {
        identity: identity.to_string(),
        lease_duration: Duration::from_secs(2),
        renew_deadline: Duration::from_secs(1),
        retry_period: Duration::from_millis(150),
        ..LeaderElectionConfig::for_pool(NS, POOL)
    }
}

struct Candidate {
    name: String,
    election: Option<LeaderElection>,
    metrics: LeaderMetrics,
    health: Arc<Mutex<Vec<bool>>>,
    cancel: CancellationToken,
}

impl Candidate {
    fn start(client: &kube::Client, config: LeaderElectionConfig) -> Self {
        let mut registry = Registry::default();
        let metrics = LeaderMetrics::register(&mut registry);
        let health: Arc<Mutex<Vec<bool>>> = Arc::default();
        let h = health.clone();
        let cancel = CancellationToken::new();
        let name = config.identity.clone();
        let election = leader::spawn(
            client.clone(),
            config,
            metrics.clone(),
            Arc::new(move |leader| h.lock().push(leader)),
            cancel.clone(),
        )
        .unwrap();
        Self {
            name,
            election: Some(election),
            metrics,
            health,
            cancel,
        }
    }

    fn is_leader(&self) -> bool {
        self.election.as_ref().is_some_and(|e| e.is_leader())
    }

    /// Graceful shutdown: the lease is released before this returns.
    async fn shutdown(&mut self) {
        self.cancel.cancel();
        if let Some(e) = self.election.take() {
            e.stopped().await;
        }
    }

    /// A crash: no release.
    fn crash(&mut self) {
        if let Some(e) = self.election.take() {
            e.abort();
        }
    }
}

impl Drop for Candidate {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for a leader among `cs`, checking on every poll that there is never more than one.
async fn one_leader<'a>(cluster: &Cluster, cs: &'a [&'a Candidate]) -> &'a Candidate {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let leaders: Vec<_> = cs.iter().filter(|c| c.is_leader()).collect();
        assert!(
            leaders.len() <= 1,
            "two leaders at once: {:?}",
            leaders.iter().map(|c| &c.name).collect::<Vec<_>>()
        );
        if let [l] = leaders.as_slice()
            && cluster.holder().as_deref() == Some(l.name.as_str())
        {
            return l;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader elected (holder {:?})",
            cluster.holder()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn exactly_one_leader_and_a_graceful_release_hands_over_at_once() {
    let cluster = Cluster::start().await;
    let mut a = Candidate::start(&cluster.client, fast("epp-a"));
    let mut b = Candidate::start(&cluster.client, fast("epp-b"));
    let first = one_leader(&cluster, &[&a, &b]).await.name.clone();
    assert_eq!(
        cluster.transitions(),
        0,
        "a new lease starts at 0 transitions"
    );
    // Stays one leader through many renewals.
    for _ in 0..20 {
        let _ = one_leader(&cluster, &[&a, &b]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (leader, follower) = if first == a.name {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert_eq!(leader.metrics.leader(), 1);
    assert_eq!(follower.metrics.leader(), 0);
    assert_eq!(leader.metrics.transitions("acquired"), 1);
    assert_eq!(*leader.health.lock(), vec![true]);
    assert!(follower.health.lock().is_empty());

    leader.shutdown().await;
    // Released: the holder is cleared before the follower takes over.
    assert_eq!(leader.metrics.transitions("released"), 1);
    assert_eq!(leader.metrics.leader(), 0);
    assert_eq!(*leader.health.lock(), vec![true, false]);
    let lease = cluster.lease().unwrap();
    let holder = lease
        .pointer("/spec/holderIdentity")
        .and_then(|h| h.as_str());
    assert!(
        holder.is_none_or(|h| h == follower.name),
        "released lease still names {holder:?}"
    );
    wait_until("the follower to take over", || follower.is_leader()).await;
    assert_eq!(cluster.holder().as_deref(), Some(follower.name.as_str()));
    assert_eq!(cluster.transitions(), 1);
    assert_eq!(follower.metrics.transitions("acquired"), 1);
}

#[tokio::test]
async fn a_crashed_leader_is_replaced_once_its_lease_expires() {
    let cluster = Cluster::start().await;
    let mut a = Candidate::start(&cluster.client, fast("epp-a"));
    let _ = one_leader(&cluster, &[&a]).await;
    let b = Candidate::start(&cluster.client, fast("epp-b"));
    // b observes a valid lease and follows.
    cluster
        .server
        .wait_for_requests(DEADLINE, |r| {
            r.iter()
                .filter(|r| r.path.contains("/leases/") && r.method == "GET")
                .count()
                > 10
        })
        .await;
    assert!(!b.is_leader());
    a.crash();
    assert_eq!(
        cluster.holder().as_deref(),
        Some("epp-a"),
        "a crash releases nothing"
    );
    wait_until("b to take over the expired lease", || b.is_leader()).await;
    assert_eq!(cluster.holder().as_deref(), Some("epp-b"));
    assert_eq!(cluster.transitions(), 1);
}

#[tokio::test]
async fn racing_candidates_get_409_and_exactly_one_wins() {
    let cluster = Cluster::start().await;
    // Every answer is delayed, so all candidates read "no lease" before any create lands:
    // all of them create, the API server accepts one and answers 409 to the others. (Longer
    // timings here, so that the slow answers do not cost the winner its renew deadline.)
    cluster.server.set_delay(Some(Duration::from_secs(1)));
    let slow = |name: String| LeaderElectionConfig {
        lease_duration: Duration::from_secs(20),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_millis(200),
        ..fast(&name)
    };
    let cs: Vec<Candidate> = (0..4)
        .map(|i| Candidate::start(&cluster.client, slow(format!("epp-{i}"))))
        .collect();
    let refs: Vec<&Candidate> = cs.iter().collect();
    let winner = one_leader(&cluster, &refs).await.name.clone();
    cluster.server.set_delay(None);
    let conflicts: u64 = cs
        .iter()
        .map(|c| c.metrics.errors("create", "conflict"))
        .sum();
    assert_eq!(conflicts, 3, "every losing create got 409");
    let creates_409 = cluster
        .server
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/leases") && r.status == 409)
        .count();
    assert_eq!(creates_409, 3);
    // The losers keep following.
    for _ in 0..10 {
        let l = one_leader(&cluster, &refs).await;
        assert_eq!(l.name, winner);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn forbidden_leases_are_logged_counted_and_leave_a_follower_until_granted() {
    let (logs, _guard) = capture_logs();
    let cluster = Cluster::start().await;
    cluster.server.deny("*", "leases.coordination.k8s.io");
    let a = Candidate::start(&cluster.client, fast("epp-a"));
    wait_until("403s to be counted", || {
        a.metrics.errors("get", "forbidden") >= 3
    })
    .await;
    assert!(!a.is_leader());
    let text = logs.text();
    assert!(text.contains("403 Forbidden"), "{text}");
    assert!(
        text.contains("may not get leases.coordination.k8s.io in namespace llm-d"),
        "{text}"
    );
    assert_eq!(
        text.matches("403 Forbidden").count(),
        1,
        "the same cause is logged once, then at debug level only: {text}"
    );
    // RBAC fixed: the candidate becomes leader without a restart.
    cluster.server.clear_faults();
    wait_until("leadership once leases are allowed", || a.is_leader()).await;
    assert!(logs.text().contains("Lease calls succeed again"));
}

#[tokio::test(flavor = "current_thread")]
async fn losing_the_api_server_steps_the_leader_down_and_it_recovers() {
    let (logs, _guard) = capture_logs();
    let cluster = Cluster::start().await;
    let a = Candidate::start(&cluster.client, fast("epp-a"));
    let _ = one_leader(&cluster, &[&a]).await;
    cluster.server.stop().await;
    wait_until("the leader to step down", || !a.is_leader()).await;
    assert_eq!(
        *a.health.lock(),
        vec![true, false],
        "unready once the lease is lost"
    );
    assert_eq!(a.metrics.transitions("lost"), 1);
    assert!(a.metrics.errors("get", "unreachable") >= 1);
    let text = logs.text();
    assert!(text.contains("API server is unreachable"), "{text}");
    assert!(
        text.contains("could not renew the Lease within the renew deadline"),
        "{text}"
    );
    cluster.server.resume().await.unwrap();
    wait_until("leadership after the API server is back", || a.is_leader()).await;
    assert_eq!(a.metrics.transitions("acquired"), 2);
    assert_eq!(*a.health.lock(), vec![true, false, true]);
}

#[tokio::test]
async fn a_leader_that_sees_another_holder_steps_down() {
    let cluster = Cluster::start().await;
    let a = Candidate::start(&cluster.client, fast("epp-a"));
    let _ = one_leader(&cluster, &[&a]).await;
    // Someone else (an operator, a replica with a skewed view) writes itself in.
    let mut lease = cluster.lease().unwrap();
    lease["spec"]["holderIdentity"] = "intruder".into();
    lease["spec"]["leaseDurationSeconds"] = 3600.into();
    cluster
        .server
        .replace(&ResourceKind::leases(), lease)
        .unwrap();
    wait_until("the leader to step down", || !a.is_leader()).await;
    assert_eq!(a.metrics.transitions("lost"), 1);
    assert_eq!(cluster.holder().as_deref(), Some("intruder"));
}

#[tokio::test]
async fn bad_settings_are_refused() {
    let cluster = Cluster::start().await;
    let cfg = LeaderElectionConfig {
        renew_deadline: Duration::from_secs(5),
        ..fast("x")
    };
    let e = leader::spawn(
        cluster.client.clone(),
        cfg,
        LeaderMetrics::default(),
        Arc::new(|_| {}),
        CancellationToken::new(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("greater than the renew deadline"),
        "{e}"
    );
}
