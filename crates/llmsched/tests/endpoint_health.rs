//! The kill test, automated: three simulated replicas, each its own `llmsched sim`
//! process, one of them `kill -9`ed; the EPP (in process, started exactly as `llmsched epp`)
//! with its proxy, and a real Envoy in front of it. Asserted with counts (the EPP's own
//! per-endpoint dispatch counter), never times: after the first failed attempt, no new
//! request goes to the dead replica; through the proxy not even that attempt fails (it is
//! retried on another replica); a restarted replica is readmitted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::*;

/// Sends `n` short requests through `door` one after the other: their statuses (0 when the
/// connection failed) and bodies.
async fn send_many(door: SocketAddr, n: usize, tag: &str) -> Vec<(u16, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let body = completion(&unique_prompt(&format!("{tag}-{i}")), 4, false);
        out.push(
            post_whole(door, body, &[])
                .await
                .unwrap_or((0, String::new())),
        );
    }
    out
}

fn grown(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
    key: SocketAddr,
) -> u64 {
    let k = key.to_string();
    after[&k] - before[&k]
}

/// Passive detection only (scrapes are made rare, so the replicas' metrics never show the
/// death): the first request that meets the dead replica is what takes it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_the_first_failed_attempt_no_new_request_goes_to_a_dead_replica() {
    init_logs();
    let mut sims = [
        SimProc::start("127.0.0.61", 1.0).await,
        SimProc::start("127.0.0.62", 1.0).await,
        SimProc::start("127.0.0.63", 1.0).await,
    ];
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr).collect();
    let (a, b, c) = (addrs[0], addrs[1], addrs[2]);
    let epp = start_epp(
        &addrs,
        &[
            "--refresh-metrics-interval=1h",
            "--metrics-staleness-threshold=2h",
        ],
    )
    .await;
    wait_until("every replica scraped once", || {
        addrs.iter().all(|&e| healthy(&epp, e))
    })
    .await;
    let envoy = start_envoy(epp.grpc_addr, epp.health_addr).await;
    let (proxy, gateway) = (epp.proxy_addr.unwrap(), envoy.listener_addr());

    // Long generations keep b and c busy (two each); a is idle, so the default config's
    // active-request scorer rates it best: the setting.
    let mut streams = Vec::new();
    for (i, e) in [b, b, c, c].into_iter().enumerate() {
        streams.push((
            e,
            Stream::open(gateway, e, 20_000, &format!("busy-{i}")).await,
        ));
    }
    wait_until("the busy streams to be counted", || {
        inflight(&epp, b) == 2 && inflight(&epp, c) == 2
    })
    .await;

    // 1. Through the proxy: a dies while idle. The first request is sent there, the
    //    connection is refused, the request is scheduled again elsewhere and served; a is
    //    out from then on.
    sims[0].kill().await;
    let before = dispatched(&epp);
    let replies = send_many(proxy, 10, "proxy").await;
    assert!(
        replies.iter().all(|(s, _)| *s == 200),
        "through the proxy no request fails: {replies:?}"
    );
    assert_eq!(
        grown(&before, &dispatched(&epp), a),
        1,
        "exactly one attempt reached the dead replica (the first), then none"
    );
    assert!(!healthy(&epp, a));

    // 2. Through Envoy: b dies with its two streams (those are cut: unavoidable). Once its
    //    in-flight count is released b looks idle and best; Envoy's attempt to connect fails
    //    and its local reply reaches the EPP in the response phase: b is out.
    sims[1].kill().await;
    let mut cut = 0;
    let mut kept = Vec::new();
    for (e, s) in streams {
        if e == b {
            cut += usize::from(!s.finish().await);
        } else {
            kept.push(s);
        }
    }
    assert_eq!(cut, 2, "the dead replica's streams are cut");
    wait_until("b's streams to be released", || inflight(&epp, b) == 0).await;
    let before = dispatched(&epp);
    let replies = send_many(gateway, 10, "envoy").await;
    let failed: Vec<usize> = (0..replies.len())
        .filter(|&i| replies[i].0 != 200)
        .collect();
    assert_eq!(failed, [0], "only the first request fails: {replies:?}");
    assert_eq!(replies[0].0, 503);
    assert!(
        replies[0]
            .1
            .starts_with("upstream connect error or disconnect/reset before headers"),
        "{}",
        replies[0].1
    );
    let after = dispatched(&epp);
    assert_eq!(grown(&before, &after, b), 1, "one attempt, then none");
    assert_eq!(grown(&before, &after, a), 0, "a stays out");
    assert_eq!(grown(&before, &after, c), 9);
    assert!(!healthy(&epp, b));
    drop(kept);
    drop(envoy);
    epp.shutdown().await;
}

/// Default configuration: the scraper notices the death by itself (its connection is
/// refused), so not a single request is sent there; after a restart the replica is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replica_is_excluded_without_any_request_and_readmitted_after_restart() {
    init_logs();
    let mut sims = [
        SimProc::start("127.0.0.64", 10.0).await,
        SimProc::start("127.0.0.65", 10.0).await,
        SimProc::start("127.0.0.66", 10.0).await,
    ];
    let addrs: Vec<SocketAddr> = sims.iter().map(|s| s.addr).collect();
    let victim = addrs[0];
    let epp = start_epp(&addrs, &[]).await;
    wait_until("every replica healthy", || {
        addrs.iter().all(|&e| healthy(&epp, e))
    })
    .await;
    let envoy = start_envoy(epp.grpc_addr, epp.health_addr).await;
    let doors = [
        ("proxy", epp.proxy_addr.unwrap()),
        ("envoy", envoy.listener_addr()),
    ];

    sims[0].kill().await;
    wait_until("the scraper to take the dead replica out", || {
        !healthy(&epp, victim)
    })
    .await;
    for (name, door) in doors {
        let before = dispatched(&epp);
        let replies = send_many(door, 10, name).await;
        assert!(
            replies.iter().all(|(s, _)| *s == 200),
            "{name}: {replies:?}"
        );
        assert_eq!(grown(&before, &dispatched(&epp), victim), 0, "{name}");
    }

    sims[0].restart().await;
    wait_until("the restarted replica to be readmitted", || {
        healthy(&epp, victim)
    })
    .await;
    for (name, door) in doors {
        let before = dispatched(&epp);
        let mut sent = 0;
        while grown(&before, &dispatched(&epp), victim) == 0 {
            assert!(
                sent < 30,
                "{name}: the readmitted replica never got a request"
            );
            let (status, body) = post_whole(
                door,
                completion(&unique_prompt(&format!("{name}-back-{sent}")), 4, false),
                &[],
            )
            .await
            .unwrap();
            assert_eq!(status, 200, "{name}: {body}");
            sent += 1;
        }
    }
    drop(envoy);
    epp.shutdown().await;
}
