//! Active-active EPP replicas with real processes: three `llmsched epp --ha-mode=active-active`
//! processes (each its own process, sent real signals) behind one real Envoy whose EPP
//! cluster lists the three (as `llmsched envoy-config --epp a,b,c` renders it), two
//! `llmsched sim` replicas as the model servers. A steady load of requests goes through
//! Envoy while one replica is terminated (SIGTERM) or killed (SIGKILL).
//!
//! Asserted with outcomes, never times:
//! * SIGTERM: not one request fails; the replica exits by itself after its drain.
//! * SIGKILL: only requests already under way when it died (or sent before Envoy could know)
//!   may fail — they are counted and printed; every request started a second after the kill
//!   succeeds (the survivors take them). The replica restarted on the same ports reports
//!   ready again without any Lease, warm (bootstrapped from a peer's snapshot).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use llmsched_gateway::{BootstrapConfig, Envoy, EnvoyOptions, EppTarget, Mode, find_envoy};

const REPLICAS: usize = 3;
/// Concurrent clients of the load.
const WORKERS: usize = 6;

struct Replica {
    proc: Option<EppProc>,
    grpc: u16,
    health: u16,
    ha: u16,
}

struct Cluster {
    sims: Vec<SimProc>,
    replicas: Vec<Replica>,
    envoy: Envoy,
}

fn lo() -> IpAddr {
    "127.0.0.1".parse().unwrap()
}

impl Cluster {
    async fn start() -> Self {
        init_logs();
        let sims = vec![
            SimProc::start("127.0.0.61", 1.0).await,
            SimProc::start("127.0.0.62", 1.0).await,
        ];
        let mut replicas: Vec<Replica> = (0..REPLICAS)
            .map(|_| Replica {
                proc: None,
                grpc: free_port(lo()),
                health: free_port(lo()),
                ha: free_port(lo()),
            })
            .collect();
        let peers: Vec<String> = replicas
            .iter()
            .map(|r| format!("127.0.0.1:{}", r.ha))
            .collect();
        for r in replicas.iter_mut() {
            let p = Self::spawn(&sims, r, &peers).await;
            r.proc = Some(p);
        }
        let targets: Vec<EppTarget> = replicas
            .iter()
            .map(|r| EppTarget {
                host: "127.0.0.1".into(),
                grpc_port: r.grpc,
                health_port: r.health,
                tls: false,
            })
            .collect();
        let binary = find_envoy(&repo_root()).expect("Envoy (scripts/install-tools.sh)");
        let config = BootstrapConfig {
            mode: Mode::Epp,
            listen: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            epp: targets[0].clone(),
            extra_epps: targets[1..].to_vec(),
            // Below the replicas' --ha-handover-delay (2 s).
            health_check_interval: Duration::from_millis(500),
            ..BootstrapConfig::default()
        };
        let envoy = Envoy::start(&config, &EnvoyOptions::new(binary))
            .await
            .expect("Envoy starts");
        let c = Self {
            sims,
            replicas,
            envoy,
        };
        c.wait_envoy_healthy(REPLICAS).await;
        c
    }

    async fn spawn(sims: &[SimProc], r: &Replica, peers: &[String]) -> EppProc {
        let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr).collect();
        let flags = [
            "--ha-mode=active-active".to_string(),
            format!("--ha-port={}", r.ha),
            format!("--ha-peers={}", peers.join(",")),
            format!("--grpc-port={}", r.grpc),
            format!("--grpc-health-port={}", r.health),
            "--ha-handover-delay=2s".to_string(),
            "--ha-bootstrap-timeout=5s".to_string(),
            "--drain-timeout=60s".to_string(),
        ];
        let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
        let p = EppProc::start(&addrs, &refs).await;
        let start = Instant::now();
        while !ready(p.health).await {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "replica never ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p
    }

    /// Waits until Envoy sees `n` healthy EPP hosts.
    async fn wait_envoy_healthy(&self, n: usize) {
        let start = Instant::now();
        loop {
            let (_, clusters) = self.envoy.admin_get("/clusters").await.unwrap();
            let hosts: Vec<&str> = clusters
                .lines()
                .filter(|l| l.starts_with("llmsched_epp::") && l.contains("::health_flags::"))
                .collect();
            let healthy = hosts.iter().filter(|l| l.ends_with("::healthy")).count();
            if healthy == n {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "Envoy never saw {n} healthy EPPs: {hosts:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// gRPC health of the EPP's ext_proc service, read from its metrics-free health port with
/// the real tonic client.
async fn ready(health: SocketAddr) -> bool {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{health}"))
        .unwrap()
        .connect()
        .await
    else {
        return false;
    };
    HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: "envoy.service.ext_proc.v3.ExternalProcessor".into(),
        })
        .await
        .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
}

/// One request of the load: when it started and whether it succeeded.
#[derive(Debug, Clone)]
struct Outcome {
    started: Instant,
    ok: bool,
    detail: String,
}

/// A steady load through Envoy until stopped: `WORKERS` clients, each sending one request
/// after the other (shared system prompts, so the prefix state matters).
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
}

impl Load {
    fn start(door: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let tasks = (0..WORKERS)
            .map(|w| {
                let (stop, done) = (stop.clone(), done.clone());
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    let mut i = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let system = format!("system prompt {} ", (w + i) % 4).repeat(60);
                        let prompt = format!("{system} user {w} question {i}");
                        let started = Instant::now();
                        let r = post_whole(door, completion(&prompt, 24, true), &[]).await;
                        let (ok, detail) = match r {
                            Ok((200, body)) if body.ends_with("data: [DONE]\n\n") => {
                                (true, String::new())
                            }
                            Ok((s, body)) => (false, format!("{s}: {}", body.trim())),
                            Err(e) => (false, e),
                        };
                        out.push(Outcome {
                            started,
                            ok,
                            detail,
                        });
                        done.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                    out
                })
            })
            .collect();
        Self { stop, done, tasks }
    }

    async fn wait_done(&self, n: usize) {
        let start = Instant::now();
        while self.done.load(Ordering::Relaxed) < n {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the load made no progress"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.unwrap());
        }
        all
    }
}

fn metric(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_one_replica_under_load_fails_no_request() {
    let mut c = Cluster::start().await;
    let load = Load::start(c.envoy.listener_addr());
    load.wait_done(30).await;
    // Every replica takes part.
    for r in &c.replicas {
        let p = r.proc.as_ref().unwrap();
        let (_, m) = get(p.metrics, "/metrics").await.unwrap();
        assert!(
            metric(&m, "llmsched_ha_entries_total{origin=\"peer\"}") > 0.0,
            "replica {} learned nothing from its peers",
            r.grpc
        );
    }
    let victim = c.replicas[0].proc.as_mut().unwrap();
    victim.signal("SIGTERM");
    let status = victim.exited().await;
    assert!(status.success(), "drained replica exit status {status}");
    assert!(victim.log_contains("active-active handover"));
    let after_exit = load.done.load(Ordering::Relaxed);
    load.wait_done(after_exit + 30).await;
    let outcomes = load.finish().await;
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok).collect();
    println!(
        "SIGTERM under load: {} requests, {} failed",
        outcomes.len(),
        failed.len()
    );
    let details: Vec<&str> = failed.iter().map(|o| o.detail.as_str()).collect();
    assert!(failed.is_empty(), "failed requests: {details:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_fails_only_requests_under_way_and_a_restarted_replica_is_warm_at_once() {
    let mut c = Cluster::start().await;
    let load = Load::start(c.envoy.listener_addr());
    load.wait_done(30).await;
    let killed_at = Instant::now();
    {
        let victim = c.replicas[0].proc.as_mut().unwrap();
        victim.signal("SIGKILL");
        let _ = victim.exited().await;
    }
    c.replicas[0].proc = None;
    let after_kill = load.done.load(Ordering::Relaxed);
    load.wait_done(after_kill + 40).await;
    // Restart it on the same ports: ready without a Lease, warm from a peer's snapshot.
    let peers: Vec<String> = c
        .replicas
        .iter()
        .map(|r| format!("127.0.0.1:{}", r.ha))
        .collect();
    let restarted = Cluster::spawn(&c.sims, &c.replicas[0], &peers).await;
    let (_, m) = get(restarted.metrics, "/metrics").await.unwrap();
    assert_eq!(
        metric(
            &m,
            "llmsched_ha_snapshot_bootstraps_total{outcome=\"warm\"}"
        ),
        1.0,
        "{m}"
    );
    assert!(metric(&m, "llmsched_ha_entries_total{origin=\"snapshot\"}") > 0.0);
    c.replicas[0].proc = Some(restarted);
    c.wait_envoy_healthy(REPLICAS).await;
    let n = load.done.load(Ordering::Relaxed);
    load.wait_done(n + 30).await;
    let outcomes = load.finish().await;
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.ok).collect();
    let under_way = failed.iter().filter(|o| o.started < killed_at).count();
    let first_second = failed
        .iter()
        .filter(|o| o.started >= killed_at && o.started < killed_at + Duration::from_secs(1))
        .count();
    let later: Vec<&&Outcome> = failed
        .iter()
        .filter(|o| o.started >= killed_at + Duration::from_secs(1))
        .collect();
    println!(
        "SIGKILL under load: {} requests, {} failed ({} under way at the kill, {} sent within 1 s after it, {} later)",
        outcomes.len(),
        failed.len(),
        under_way,
        first_second,
        later.len()
    );
    for o in &failed {
        println!("  failed: {}", o.detail);
    }
    assert!(
        under_way <= WORKERS,
        "more failures than requests in flight"
    );
    assert!(
        later.is_empty(),
        "requests sent over a second after the kill failed: {later:?}"
    );
}
