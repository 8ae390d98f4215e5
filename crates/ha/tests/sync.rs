//! Replicas syncing over real loopback sockets: what one routes, the others learn; loads add
//! up and vanish with their replica; a starting replica bootstraps from a peer's snapshot.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod support;

use std::time::Duration;

use llmsched_ha::Bootstrap;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_learn_each_others_routing_and_loads() {
    init_tracing();
    let (la, lb) = (listener().await, listener().await);
    let (aa, ab) = (
        la.local_addr().unwrap().to_string(),
        lb.local_addr().unwrap().to_string(),
    );
    let a = Node::start(config("a"), la, vec![ab.clone()]).await;
    let b = Node::start(config("b"), lb, vec![aa.clone()]).await;
    eventually("both push streams open", || {
        a.ha.connected_peers() == 1 && b.ha.connected_peers() == 1
    })
    .await;

    // a routes a prompt to endpoint 2; b has never seen it, yet soon scores endpoint 2 for it.
    let p = prompt("sys-a", 16);
    assert_eq!(b.scores(&p), vec![0.0; 4]);
    a.route(&p, 2);
    eventually("b learns a's decision", || b.scores(&p)[2] == 1.0).await;
    assert_eq!(b.scores(&p), vec![0.0, 0.0, 1.0, 0.0]);
    // And the other way round.
    let q = prompt("sys-b", 8);
    b.route(&q, 0);
    eventually("a learns b's decision", || a.scores(&q)[0] == 1.0).await;

    // In-flight requests on a are seen by b as its peers' load on that endpoint.
    let ep_a = a.endpoints.0.endpoints[3].clone();
    ep_a.dispatch(500);
    ep_a.dispatch(500);
    let ep_b = b.endpoints.0.endpoints[3].clone();
    eventually("b sees a's two requests in flight", || {
        ep_b.peer_inflight_requests() == 2 && ep_b.peer_inflight_tokens() == 1000
    })
    .await;
    assert_eq!(ep_b.fleet_inflight_requests(), 2);
    ep_a.complete(500);
    eventually("b sees one completed", || {
        ep_b.peer_inflight_requests() == 1
    })
    .await;

    // Metrics: sent, received, applied, entries by origin, lag observed, peers connected.
    assert!(a.metric("llmsched_ha_sync_messages_total{direction=\"sent\"}") >= 1.0);
    assert!(b.metric("llmsched_ha_sync_messages_total{direction=\"applied\"}") >= 1.0);
    assert!(b.metric("llmsched_ha_sync_bytes_total{direction=\"received\"}") > 0.0);
    assert_eq!(
        a.metric("llmsched_ha_entries_total{origin=\"local\"}"),
        16.0
    );
    assert_eq!(b.metric("llmsched_ha_entries_total{origin=\"peer\"}"), 16.0);
    assert_eq!(b.metric("llmsched_ha_entries_total{origin=\"local\"}"), 8.0);
    assert!(b.metric("llmsched_ha_sync_lag_seconds_count") >= 1.0);
    assert_eq!(a.metric("llmsched_ha_peers{state=\"connected\"}"), 1.0);

    // a goes away: b drops a's load at once (its stream closed) and keeps the prefix state.
    a.stop().await;
    eventually("a's in-flight figures are gone from b", || {
        ep_b.peer_inflight_requests() == 0
    })
    .await;
    assert_eq!(b.scores(&p)[2], 1.0);
    eventually("b sees its peer disconnected", || {
        b.ha.connected_peers() == 0
    })
    .await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_replica_is_warm_from_a_peers_snapshot() {
    init_tracing();
    let la = listener().await;
    let aa = la.local_addr().unwrap().to_string();
    let a = Node::start(config("a"), la, vec![]).await;
    // a routed 30 prompts over the four endpoints before c existed.
    let prompts: Vec<String> = (0..30).map(|i| prompt(&format!("p{i}"), 12)).collect();
    for (i, p) in prompts.iter().enumerate() {
        a.route(p, i % 4);
    }
    let c = Node::start(config("c"), listener().await, vec![aa.clone()]).await;
    let outcome = c.ha.bootstrap().await;
    assert_eq!(
        outcome,
        Bootstrap::Warm {
            from: "a".into(),
            keys: 30 * 12
        }
    );
    assert!(c.ha.is_bootstrapped());
    for (i, p) in prompts.iter().enumerate() {
        let s = c.scores(p);
        assert_eq!(s[i % 4], 1.0, "prompt {i} on endpoint {}", i % 4);
    }
    assert_eq!(
        c.metric("llmsched_ha_snapshot_bootstraps_total{outcome=\"warm\"}"),
        1.0
    );
    assert_eq!(
        c.metric("llmsched_ha_entries_total{origin=\"snapshot\"}"),
        360.0
    );
    assert_eq!(a.metric("llmsched_ha_snapshots_served_total"), 1.0);
    c.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_listed_among_its_own_peers_skips_itself() {
    init_tracing();
    let la = listener().await;
    let aa = la.local_addr().unwrap().to_string();
    let lb = listener().await;
    let ab = lb.local_addr().unwrap().to_string();
    // The same list for everyone, as a Deployment would pass it.
    let all = vec![aa.clone(), ab.clone()];
    let a = Node::start(config("a"), la, all.clone()).await;
    let b = Node::start(config("b"), lb, all).await;
    eventually("each syncs with the other only", || {
        a.ha.connected_peers() == 1 && b.ha.connected_peers() == 1
    })
    .await;
    assert_eq!(a.metric("llmsched_ha_peers{state=\"configured\"}"), 1.0);
    // A bootstrap does not pick itself.
    assert!(matches!(a.ha.bootstrap().await, Bootstrap::Warm { ref from, .. } if from == "b"));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_is_resynced_and_its_old_figures_forgotten() {
    init_tracing();
    let lb = listener().await;
    let ab = lb.local_addr().unwrap().to_string();
    let la = listener().await;
    let aa = la.local_addr().unwrap().to_string();
    let a = Node::start(config("a"), la, vec![ab.clone()]).await;
    let b = Node::start(config("b"), lb, vec![aa.clone()]).await;
    eventually("connected", || {
        b.ha.connected_peers() == 1 && a.ha.connected_peers() == 1
    })
    .await;
    let ep_b = b.endpoints.0.endpoints[1].clone();
    ep_b.dispatch(10);
    let ep_a = a.endpoints.0.endpoints[1].clone();
    eventually("a sees b's load", || ep_a.peer_inflight_requests() == 1).await;

    // b restarts on the same port: a new incarnation with nothing in flight.
    b.stop().await;
    eventually("a drops b's load", || ep_a.peer_inflight_requests() == 0).await;
    let lb2 = tokio::net::TcpListener::bind(&ab)
        .await
        .expect("rebind the same port");
    let b2 = Node::start(config("b"), lb2, vec![aa.clone()]).await;
    // b2 bootstraps from a (a knows what b routed before, too).
    let p = prompt("before", 8);
    a.route(&p, 3);
    assert!(matches!(b2.ha.bootstrap().await, Bootstrap::Warm { .. }));
    assert_eq!(b2.scores(&p)[3], 1.0);
    eventually("a reconnected to b2", || a.ha.connected_peers() == 1).await;
    let q = prompt("after", 8);
    a.route(&q, 1);
    eventually("b2 learns a's new decisions", || b2.scores(&q)[1] == 1.0).await;
    b2.endpoints.0.endpoints[2].dispatch(1);
    let ep_a2 = a.endpoints.0.endpoints[2].clone();
    eventually("a sees b2's load", || ep_a2.peer_inflight_requests() == 1).await;
    assert_eq!(
        ep_a.peer_inflight_requests(),
        0,
        "b's old figures stay forgotten"
    );
    a.stop().await;
    b2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_converge_on_the_union_of_their_decisions() {
    init_tracing();
    let ls = [listener().await, listener().await, listener().await];
    let addrs: Vec<String> = ls
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let mut nodes = Vec::new();
    for (i, l) in ls.into_iter().enumerate() {
        nodes.push(Node::start(config(&format!("r{i}")), l, addrs.clone()).await);
    }
    eventually("full mesh", || {
        nodes.iter().all(|n| n.ha.connected_peers() == 2)
    })
    .await;
    let prompts: Vec<String> = (0..60).map(|i| prompt(&format!("u{i}"), 10)).collect();
    for (i, p) in prompts.iter().enumerate() {
        nodes[i % 3].route(p, i % 4);
    }
    for (i, p) in prompts.iter().enumerate() {
        for n in &nodes {
            eventually("every replica knows every decision", || {
                n.scores(p)[i % 4] == 1.0
            })
            .await;
        }
    }
    let _ = Duration::ZERO;
    for n in nodes {
        n.stop().await;
    }
}
