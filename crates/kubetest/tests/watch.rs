//! kube-rs watches and `kube::runtime::watcher` against `llmsched-kubetest`: events,
//! selector transitions, bookmarks, timeouts, 410 Gone and re-list, API-server restarts,
//! dropped connections.
//!
//! Why not a real API server: none can run here (kube-apiserver, k3s, kind and envtest are
//! not obtainable from the package registries; there is no container runtime). The test
//! server speaks the real watch protocol (chunked newline-delimited JSON events), so what
//! passes here is what kube-rs does against a cluster.

#![allow(clippy::unwrap_used)] // tests may unwrap (team rule: no unwrap outside tests)

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{client, eventually};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use llmsched_kubetest::{ResourceKind, TestApiServer, objects};
use parking_lot::Mutex;
use serde_json::json;

fn pod(name: &str, labels: &[(&str, &str)]) -> Pod {
    serde_json::from_value(objects::pod("llm-d", name, labels, "127.0.0.9", true)).unwrap()
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Apply(String),
    Delete(String),
    InitDone,
}

/// Runs a kube-rs watcher in the background and records what it yields.
fn record(
    api: Api<Pod>,
    cfg: watcher::Config,
) -> (Arc<Mutex<Vec<Seen>>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        let mut stream = watcher(api, cfg).boxed();
        while let Some(ev) = stream.next().await {
            let name = |p: &Pod| p.metadata.name.clone().unwrap_or_default();
            match ev {
                Ok(watcher::Event::Apply(p)) | Ok(watcher::Event::InitApply(p)) => {
                    s.lock().push(Seen::Apply(name(&p)))
                }
                Ok(watcher::Event::Delete(p)) => s.lock().push(Seen::Delete(name(&p))),
                Ok(watcher::Event::InitDone) => s.lock().push(Seen::InitDone),
                Ok(watcher::Event::Init) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    (seen, task)
}

/// A reflector store fed by a watcher with a short backoff, as a controller runs it.
fn reflect(api: Api<Pod>, cfg: watcher::Config) -> (Store<Pod>, tokio::task::JoinHandle<()>) {
    let (reader, writer) = reflector::store();
    let stream = watcher(api, cfg)
        .default_backoff()
        .reflect(writer)
        .touched_objects();
    let task = tokio::spawn(async move {
        stream.for_each(|_| async {}).await;
    });
    (reader, task)
}

fn names(store: &Store<Pod>) -> Vec<String> {
    let mut v: Vec<String> = store
        .state()
        .iter()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect();
    v.sort();
    v
}

/// Not a real API server (none can run here): kubetest speaks its watch protocol.
#[tokio::test]
async fn watcher_sees_added_modified_deleted_and_selector_exits() {
    let server = TestApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "llm-d");
    pods.create(&PostParams::default(), &pod("before", &[("app", "vllm")]))
        .await
        .unwrap();
    let (seen, task) = record(pods.clone(), watcher::Config::default().labels("app=vllm"));
    eventually("initial list done", || {
        seen.lock().contains(&Seen::InitDone)
    })
    .await;
    assert_eq!(
        seen.lock()[..2],
        [Seen::Apply("before".into()), Seen::InitDone]
    );
    eventually("watch open", || !server.watches().is_empty()).await;
    let w = &server.watches()[0];
    assert_eq!(w.label_selector, "app=vllm");
    assert!(w.bookmarks, "kube-rs asks for bookmarks");

    pods.create(&PostParams::default(), &pod("a", &[("app", "vllm")]))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("other", &[("app", "sglang")]))
        .await
        .unwrap();
    let relabel = |v: &str| json!({"metadata": {"labels": {"app": v}}});
    pods.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"annotations": {"x": "1"}}})),
    )
    .await
    .unwrap();
    // Leaving the selector reads as DELETED, entering it as ADDED, as the real server does.
    pods.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(&relabel("sglang")),
    )
    .await
    .unwrap();
    pods.patch(
        "other",
        &PatchParams::default(),
        &Patch::Merge(&relabel("vllm")),
    )
    .await
    .unwrap();
    pods.delete("before", &Default::default()).await.unwrap();
    let want = vec![
        Seen::Apply("before".into()),
        Seen::InitDone,
        Seen::Apply("a".into()),
        Seen::Apply("a".into()),
        Seen::Delete("a".into()),
        Seen::Apply("other".into()),
        Seen::Delete("before".into()),
    ];
    eventually("all events", || seen.lock().len() >= want.len()).await;
    assert_eq!(*seen.lock(), want);
    task.abort();
}

/// Not a real API server (none can run here): kubetest speaks its watch protocol.
#[tokio::test]
async fn raw_watch_events_bookmarks_and_timeout() {
    let server = TestApiServer::builder()
        .bookmark_interval(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "llm-d");
    let created = pods
        .create(&PostParams::default(), &pod("a", &[]))
        .await
        .unwrap();
    let rv = created.metadata.resource_version.unwrap();

    // From the create's resourceVersion: only later events, bookmarks, then the server
    // closes the stream after timeoutSeconds.
    let wp = WatchParams::default().timeout(2);
    let mut stream = pods.watch(&wp, &rv).await.unwrap().boxed();
    pods.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"labels": {"x": "y"}}})),
    )
    .await
    .unwrap();
    let mut modified = false;
    let mut bookmarks = 0;
    while let Some(ev) = stream.try_next().await.unwrap() {
        match ev {
            WatchEvent::Modified(p) => {
                assert_eq!(p.metadata.labels.unwrap()["x"], "y");
                modified = true;
            }
            WatchEvent::Bookmark(b) => {
                let brv: u64 = b.metadata.resource_version.parse().unwrap();
                assert!(brv >= rv.parse::<u64>().unwrap());
                bookmarks += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // The loop ended: the server closed the watch at timeoutSeconds.
    assert!(modified);
    assert!(bookmarks >= 1, "bookmarks were asked for");

    // resourceVersion "0": synthetic ADDED for what exists.
    let mut stream = pods
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Added(p)) => assert_eq!(p.metadata.name.as_deref(), Some("a")),
        other => panic!("{other:?}"),
    }

    // A too old resourceVersion: an ERROR event carrying 410 Expired.
    server.compact();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .unwrap()
        .boxed();
    match stream.try_next().await.unwrap() {
        Some(WatchEvent::Error(e)) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => panic!("{other:?}"),
    }
}

/// Not a real API server (none can run here): kubetest speaks its watch protocol.
#[tokio::test]
async fn watcher_relists_after_410_and_converges() {
    let server = TestApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "llm-d");
    pods.create(&PostParams::default(), &pod("a", &[]))
        .await
        .unwrap();
    let (store, task) = reflect(pods.clone(), watcher::Config::default());
    eventually("synced", || names(&store) == ["a"]).await;
    eventually("watching", || !server.watches().is_empty()).await;
    let lists = |s: &TestApiServer| {
        s.requests()
            .iter()
            .filter(|r| r.is_list_of("/namespaces/llm-d/pods"))
            .count()
    };
    assert_eq!(lists(&server), 1);

    // Changes the watcher would miss: written while its watch is ended with 410.
    server.expire_watches();
    server
        .create(
            &ResourceKind::pods(),
            objects::pod("llm-d", "b", &[], "127.0.0.2", true),
        )
        .unwrap();
    server.delete(&ResourceKind::pods(), "llm-d", "a").unwrap();
    eventually("converged after re-list", || names(&store) == ["b"]).await;
    assert_eq!(lists(&server), 2, "the 410 made the watcher re-list once");

    // A dropped connection plus a compaction: the watcher re-watches from its last
    // resourceVersion, gets 410 for it, and re-lists.
    eventually("watching again", || !server.watches().is_empty()).await;
    server.compact();
    server
        .create(
            &ResourceKind::pods(),
            objects::pod("llm-d", "c", &[], "127.0.0.3", true),
        )
        .unwrap();
    server.compact();
    server.drop_watches();
    eventually("converged after drop", || names(&store) == ["b", "c"]).await;
    eventually("re-listed", || lists(&server) == 3).await;
    let expired_watch = server.requests().iter().any(|r| {
        r.is_watch()
            && r.param("resourceVersion")
                .is_some_and(|v| !v.is_empty() && v != "0")
    });
    assert!(
        expired_watch,
        "the watcher tried to resume before re-listing"
    );
    task.abort();
}

/// Not a real API server (none can run here): kubetest speaks its watch protocol.
#[tokio::test]
async fn watcher_recovers_from_api_server_restarts() {
    let server = TestApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "llm-d");
    pods.create(&PostParams::default(), &pod("a", &[]))
        .await
        .unwrap();
    let (store, task) = reflect(pods.clone(), watcher::Config::default());
    eventually("synced", || names(&store) == ["a"]).await;

    // Restart keeping state: a change made while it was down arrives after the restart.
    server.stop().await;
    assert!(pods.list(&ListParams::default()).await.is_err(), "down");
    server
        .create(
            &ResourceKind::pods(),
            objects::pod("llm-d", "b", &[], "127.0.0.2", true),
        )
        .unwrap();
    server.resume().await.unwrap();
    eventually("sees the change made while down", || {
        names(&store) == ["a", "b"]
    })
    .await;

    // Restart wiping state (etcd lost): the watcher re-lists and follows the new world.
    eventually("watching", || !server.watches().is_empty()).await;
    server.restart(false).await.unwrap();
    server
        .create(
            &ResourceKind::pods(),
            objects::pod("llm-d", "z", &[], "127.0.0.26", true),
        )
        .unwrap();
    eventually("converged to the new state", || names(&store) == ["z"]).await;
    task.abort();
}

/// Not a real API server (none can run here): kubetest speaks its watch protocol.
#[tokio::test]
async fn streaming_list_initial_events_end_with_a_bookmark() {
    let server = TestApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "llm-d");
    for n in ["a", "b"] {
        pods.create(&PostParams::default(), &pod(n, &[]))
            .await
            .unwrap();
    }
    let (seen, task) = record(pods.clone(), watcher::Config::default().streaming_lists());
    eventually("initial events done", || {
        seen.lock().contains(&Seen::InitDone)
    })
    .await;
    assert_eq!(
        *seen.lock(),
        [
            Seen::Apply("a".into()),
            Seen::Apply("b".into()),
            Seen::InitDone
        ]
    );
    // No list request at all: the initial state came through the watch.
    assert!(!server.requests().iter().any(|r| r.verb == "list"));
    let w = server
        .requests()
        .into_iter()
        .find(|r| r.is_watch())
        .unwrap();
    assert_eq!(w.param("sendInitialEvents").as_deref(), Some("true"));
    pods.delete("a", &Default::default()).await.unwrap();
    eventually("delete seen", || {
        seen.lock().contains(&Seen::Delete("a".into()))
    })
    .await;
    task.abort();
}

/// Not a real API server (none can run here): kubetest speaks its watch protocol.
#[tokio::test]
async fn graceful_pod_deletion_is_seen_as_terminating_then_deleted() {
    let server = TestApiServer::builder()
        .pod_termination(Duration::from_millis(300))
        .start()
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "llm-d");
    pods.create(&PostParams::default(), &pod("a", &[]))
        .await
        .unwrap();
    let terminating = Arc::new(Mutex::new(Vec::new()));
    let t = terminating.clone();
    let api = pods.clone();
    let task = tokio::spawn(async move {
        let mut s = watcher(api, watcher::Config::default()).boxed();
        while let Some(ev) = s.next().await {
            match ev {
                Ok(watcher::Event::Apply(p)) => t.lock().push(format!(
                    "apply deleting={}",
                    p.metadata.deletion_timestamp.is_some()
                )),
                Ok(watcher::Event::Delete(_)) => t.lock().push("delete".to_string()),
                _ => {}
            }
        }
    });
    eventually("watching", || !server.watches().is_empty()).await;
    let deleted = pods.delete("a", &Default::default()).await.unwrap();
    let marked = deleted.left().expect("the pod, marked");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert_eq!(marked.metadata.deletion_grace_period_seconds, Some(1));
    eventually("terminating then gone", || terminating.lock().len() >= 2).await;
    assert_eq!(*terminating.lock(), ["apply deleting=true", "delete"]);
    assert!(server.get(&ResourceKind::pods(), "llm-d", "a").is_none());

    // gracePeriodSeconds=0 removes at once; the test-side helper marks without removing.
    pods.create(&PostParams::default(), &pod("b", &[]))
        .await
        .unwrap();
    server
        .begin_graceful_delete(&ResourceKind::pods(), "llm-d", "b", 30)
        .unwrap();
    let b = pods.get("b").await.unwrap();
    assert!(b.metadata.deletion_timestamp.is_some());
    pods.delete("b", &kube::api::DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    assert!(pods.get_opt("b").await.unwrap().is_none());
    task.abort();
}

/// Not a real API server (none can run here): kubetest speaks its watch protocol.
#[tokio::test]
async fn watch_object_follows_one_named_object() {
    let server = TestApiServer::start().await.unwrap();
    server.register_inference_extension_kinds();
    let ar = kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk("inference.networking.k8s.io", "v1", "InferencePool"),
        "inferencepools",
    );
    let pools: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client(&server).await, "llm-d", &ar);
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        let mut stream = watcher::watch_object(pools, "pool").boxed();
        while let Some(ev) = stream.next().await {
            if let Ok(obj) = ev {
                let ports = obj.map(|o| o.data["spec"]["targetPorts"].to_string());
                let mut v = s.lock();
                if v.last() != Some(&ports) {
                    v.push(ports);
                }
            }
        }
    });
    eventually("missing reported", || *seen.lock() == [None]).await;
    let w = server.watches();
    assert_eq!(w[0].field_selector, "metadata.name=pool");
    let kind = ResourceKind::inference_pools_v1();
    // Another pool in the namespace is not this one.
    server
        .create(
            &kind,
            objects::inference_pool_v1("llm-d", "other", &[("a", "b")], &[1]),
        )
        .unwrap();
    server
        .create(
            &kind,
            objects::inference_pool_v1("llm-d", "pool", &[("app", "vllm")], &[8000]),
        )
        .unwrap();
    server
        .merge_patch(
            &kind,
            "llm-d",
            "pool",
            &json!({"spec": {"targetPorts": [{"number": 8000}, {"number": 8001}]}}),
        )
        .unwrap();
    server.delete(&kind, "llm-d", "pool").unwrap();
    eventually("followed to deletion", || seen.lock().len() == 4).await;
    assert_eq!(
        *seen.lock(),
        [
            None,
            Some("[{\"number\":8000}]".to_string()),
            Some("[{\"number\":8000},{\"number\":8001}]".to_string()),
            None
        ]
    );
    task.abort();
}

/// Not a real API server (none can run here): kubetest speaks its watch protocol.
#[tokio::test]
async fn watcher_survives_garbage_events_and_forbidden_watches() {
    let server = TestApiServer::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "llm-d");
    pods.create(&PostParams::default(), &pod("a", &[]))
        .await
        .unwrap();

    // Watch denied (RBAC without the watch verb): the list works, the watch gets 403.
    server.deny("watch", "pods");
    let (store, task) = reflect(pods.clone(), watcher::Config::default());
    eventually("listed despite the denied watch", || names(&store) == ["a"]).await;
    eventually("the watch was refused", || {
        server
            .requests()
            .iter()
            .any(|r| r.is_watch() && r.status == 403)
    })
    .await;
    server.clear_faults();
    eventually("watching once allowed", || !server.watches().is_empty()).await;

    // Garbage on the watch stream: a decode error in the client for that event (the event is
    // lost, as with a real corrupt stream), the stream goes on, and a re-list repairs it.
    server.set_malformed("pods", true);
    pods.create(&PostParams::default(), &pod("b", &[]))
        .await
        .unwrap();
    eventually("a garbage event was sent", || {
        server.watches().iter().any(|w| w.garbage_sent >= 1)
    })
    .await;
    server.set_malformed("pods", false);
    pods.create(&PostParams::default(), &pod("c", &[]))
        .await
        .unwrap();
    eventually("later events still arrive", || {
        names(&store).contains(&"c".to_string())
    })
    .await;
    assert_eq!(
        names(&store),
        ["a", "c"],
        "the garbage event never reached the store"
    );
    server.expire_watches();
    eventually("a re-list repairs it", || names(&store) == ["a", "b", "c"]).await;
    task.abort();
}
