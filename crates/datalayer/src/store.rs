//! [`EndpointStore`]: the pool's membership, published as lock-free [`EndpointSet`] snapshots.
//!
//! Discovery (flags, the endpoints file, later Kubernetes) calls [`EndpointStore::update`]
//! with the complete list of endpoints; the store diffs it against the current snapshot:
//!
//! * an endpoint whose **name, address, port and labels** are unchanged keeps its
//!   `Arc<Endpoint>` — its id, metrics and in-flight counters carry over;
//! * anything else is new: a fresh [`EndpointId`] (ids are never reused). In particular a
//!   **label change replaces the endpoint** (remove + add): endpoint metadata is immutable in
//!   `llmsched-core`, and plugins may have derived per-id state from labels (role, engine,
//!   context range), so a new id guarantees nobody keeps acting on old labels. The last
//!   scraped metrics are copied to the replacement (same server, still valid), so the change
//!   costs no staleness gap; in-flight counts stay with the old `Arc`, where the requests
//!   already dispatched will complete.
//!
//! The snapshot keeps a stable order (by name), `generation` increases on every membership
//! change, and [`EndpointStore::set_synced`] marks the first complete list (readiness).
//!
//! [`EndpointListener`]s are told about additions and removals **outside any lock**, in the
//! order the updates happened: updates append events to a queue, and whichever caller finds
//! the queue idle delivers them (so a listener may even call back into the store). A listener
//! registered late first receives `endpoint_added` for the endpoints present at registration.
//! Tasks that manage per-endpoint work (the scraper, a KV-event subscriber) use
//! [`EndpointStore::subscribe`], a `tokio::sync::watch` of the generation that also fires when
//! the store becomes synced.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use arc_swap::ArcSwap;
use llmsched_core::endpoint::{Endpoint, EndpointId, EndpointMeta, EndpointSet, EndpointSource};
use llmsched_core::plugin::EndpointListener;
use parking_lot::Mutex;
use tokio::sync::watch;

/// An endpoint list the store refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Two endpoints share a name.
    #[error("duplicate endpoint name '{0}'")]
    DuplicateName(String),
    /// Two endpoints share an address and port.
    #[error("duplicate endpoint address {address} (endpoints '{first}' and '{second}')")]
    DuplicateAddress {
        /// `ip:port`.
        address: String,
        /// First endpoint with it.
        first: String,
        /// Second endpoint with it.
        second: String,
    },
    /// Ids are exhausted (more than 4 billion endpoints have come and gone).
    #[error("endpoint ids exhausted")]
    IdsExhausted,
}

/// What an update changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MembershipChange {
    /// Endpoints added (including replacements), by id.
    pub added: Vec<EndpointId>,
    /// Endpoints removed (including replaced ones), by id.
    pub removed: Vec<EndpointId>,
    /// The generation after the update (unchanged when nothing changed).
    pub generation: u64,
}

impl MembershipChange {
    /// True when membership did not change.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

type Listeners = Arc<[Arc<dyn EndpointListener>]>;

enum EventKind {
    Added(Vec<Arc<Endpoint>>),
    Removed(Vec<EndpointId>),
}

struct Event {
    listeners: Listeners,
    kind: EventKind,
}

struct State {
    next_id: u32,
    listeners: Listeners,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<Event>,
    draining: bool,
}

/// The endpoint set, updated by discovery and read lock-free by every scheduling cycle.
pub struct EndpointStore {
    snapshot: ArcSwap<EndpointSet>,
    state: Mutex<State>,
    queue: Mutex<Queue>,
    changes: watch::Sender<u64>,
}

impl std::fmt::Debug for EndpointStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.snapshot.load();
        f.debug_struct("EndpointStore")
            .field("endpoints", &s.len())
            .field("generation", &s.generation)
            .field("synced", &s.synced)
            .finish()
    }
}

impl Default for EndpointStore {
    fn default() -> Self {
        Self::new()
    }
}

impl EndpointSource for EndpointStore {
    fn snapshot(&self) -> Arc<EndpointSet> {
        self.snapshot.load_full()
    }
}

impl EndpointStore {
    /// An empty, not yet synced store.
    pub fn new() -> Self {
        let (changes, _) = watch::channel(0);
        Self {
            snapshot: ArcSwap::from_pointee(EndpointSet::default()),
            state: Mutex::new(State {
                next_id: 0,
                listeners: Arc::from(Vec::new()),
            }),
            queue: Mutex::new(Queue::default()),
            changes,
        }
    }

    /// The current snapshot (same as [`EndpointSource::snapshot`]).
    pub fn current(&self) -> Arc<EndpointSet> {
        self.snapshot.load_full()
    }

    /// True after [`Self::set_synced`] (until [`Self::set_unsynced`]).
    pub fn is_synced(&self) -> bool {
        self.snapshot.load().synced
    }

    /// A receiver that sees the generation after every membership change (and a
    /// notification, with the same generation, when the store becomes synced).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Registers a listener; it is first told about the endpoints present now.
    pub fn add_listener(&self, listener: Arc<dyn EndpointListener>) {
        {
            let mut state = self.state.lock();
            let mut all: Vec<_> = state.listeners.iter().cloned().collect();
            all.push(listener.clone());
            state.listeners = Arc::from(all);
            let current = self.snapshot.load();
            if !current.is_empty() {
                self.queue.lock().events.push_back(Event {
                    listeners: Arc::from(vec![listener]),
                    kind: EventKind::Added(current.endpoints.clone()),
                });
            }
        }
        self.deliver();
    }

    /// Unregisters `listener` (the same `Arc`, compared by address): it is told about no
    /// later change (events already queued for it may still arrive). Returns whether it was
    /// registered. A configuration reload removes the listeners of plugins it dropped.
    pub fn remove_listener(&self, listener: &Arc<dyn EndpointListener>) -> bool {
        let mut state = self.state.lock();
        let target = Arc::as_ptr(listener).cast::<()>();
        let before = state.listeners.len();
        let kept: Vec<_> = state
            .listeners
            .iter()
            .filter(|l| Arc::as_ptr(l).cast::<()>() != target)
            .cloned()
            .collect();
        let removed = kept.len() != before;
        state.listeners = Arc::from(kept);
        removed
    }

    /// Marks the store synced: discovery has produced its first complete list.
    pub fn set_synced(&self) {
        {
            let _state = self.state.lock();
            let cur = self.snapshot.load_full();
            if cur.synced {
                return;
            }
            self.snapshot.store(Arc::new(EndpointSet {
                endpoints: cur.endpoints.clone(),
                generation: cur.generation,
                synced: true,
            }));
            // Sent under the lock so receivers never see generations out of order.
            self.changes.send_replace(cur.generation);
        }
    }

    /// Marks the store not synced (readiness drops): the discovery source lost its view of
    /// the pool, e.g. the Kubernetes `InferencePool` was deleted. The endpoints are left as
    /// they are; the caller empties them with [`Self::update`] when that is what it means.
    /// Notifies subscribers like [`Self::set_synced`]; a no-op when not synced.
    pub fn set_unsynced(&self) {
        let _state = self.state.lock();
        let cur = self.snapshot.load_full();
        if !cur.synced {
            return;
        }
        self.snapshot.store(Arc::new(EndpointSet {
            endpoints: cur.endpoints.clone(),
            generation: cur.generation,
            synced: false,
        }));
        self.changes.send_replace(cur.generation);
    }

    /// Replaces the membership with `metas` (the complete list). Names must be unique, and
    /// so must `ip:port` pairs. See the module documentation for what is kept.
    pub fn update(&self, mut metas: Vec<EndpointMeta>) -> Result<MembershipChange, StoreError> {
        metas.sort_by(|a, b| a.name.cmp(&b.name));
        validate(&metas)?;
        let change = {
            let mut state = self.state.lock();
            let cur = self.snapshot.load_full();
            let mut by_name: HashMap<&str, &Arc<Endpoint>> =
                cur.endpoints.iter().map(|e| (e.name(), e)).collect();
            let mut endpoints = Vec::with_capacity(metas.len());
            let mut added = Vec::new();
            let mut added_eps = Vec::new();
            let mut next_id = state.next_id;
            for meta in metas {
                if let Some(existing) = by_name.get(meta.name.as_str())
                    && *existing.meta() == meta
                {
                    endpoints.push(Arc::clone(existing));
                    by_name.remove(meta.name.as_str());
                    continue;
                }
                let id = EndpointId(next_id);
                next_id = next_id.checked_add(1).ok_or(StoreError::IdsExhausted)?;
                let ep = Arc::new(Endpoint::new(id, meta));
                // A replacement (same name and address, new labels) inherits the metrics.
                if let Some(old) = by_name.get(ep.name())
                    && old.meta().socket_addr() == ep.meta().socket_addr()
                {
                    ep.set_metrics((**old.metrics()).clone());
                }
                added.push(id);
                added_eps.push(ep.clone());
                endpoints.push(ep);
            }
            let kept: HashSet<EndpointId> = endpoints.iter().map(|e| e.id()).collect();
            let removed: Vec<EndpointId> = cur
                .endpoints
                .iter()
                .map(|e| e.id())
                .filter(|id| !kept.contains(id))
                .collect();
            if added.is_empty() && removed.is_empty() {
                return Ok(MembershipChange {
                    generation: cur.generation,
                    ..Default::default()
                });
            }
            state.next_id = next_id;
            let generation = cur.generation + 1;
            self.snapshot.store(Arc::new(EndpointSet {
                endpoints,
                generation,
                synced: cur.synced,
            }));
            // Enqueue under the state lock so events keep the order of updates.
            let mut q = self.queue.lock();
            if !removed.is_empty() {
                q.events.push_back(Event {
                    listeners: state.listeners.clone(),
                    kind: EventKind::Removed(removed.clone()),
                });
            }
            if !added_eps.is_empty() {
                q.events.push_back(Event {
                    listeners: state.listeners.clone(),
                    kind: EventKind::Added(added_eps),
                });
            }
            drop(q);
            self.changes.send_replace(generation);
            MembershipChange {
                added,
                removed,
                generation,
            }
        };
        self.deliver();
        Ok(change)
    }

    /// Delivers queued events unless another caller is already doing so.
    fn deliver(&self) {
        {
            let mut q = self.queue.lock();
            if q.draining {
                return;
            }
            q.draining = true;
        }
        loop {
            let event = {
                let mut q = self.queue.lock();
                match q.events.pop_front() {
                    Some(e) => e,
                    None => {
                        q.draining = false;
                        return;
                    }
                }
            };
            // No lock is held while listeners run.
            for l in event.listeners.iter() {
                match &event.kind {
                    EventKind::Added(eps) => {
                        for ep in eps {
                            l.endpoint_added(ep);
                        }
                    }
                    EventKind::Removed(ids) => {
                        for id in ids {
                            l.endpoint_removed(*id);
                        }
                    }
                }
            }
        }
    }
}

fn validate(sorted: &[EndpointMeta]) -> Result<(), StoreError> {
    for w in sorted.windows(2) {
        if w[0].name == w[1].name {
            return Err(StoreError::DuplicateName(w[0].name.clone()));
        }
    }
    let mut seen: HashMap<std::net::SocketAddr, &str> = HashMap::with_capacity(sorted.len());
    for m in sorted {
        if let Some(first) = seen.insert(m.socket_addr(), &m.name) {
            return Err(StoreError::DuplicateAddress {
                address: m.socket_addr().to_string(),
                first: first.to_string(),
                second: m.name.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use llmsched_core::endpoint::EndpointMetrics;
    use llmsched_core::plugin::Plugin;

    use super::*;

    fn meta(name: &str, addr: &str) -> EndpointMeta {
        let a: std::net::SocketAddr = addr.parse().unwrap();
        EndpointMeta {
            name: name.into(),
            address: a.ip(),
            port: a.port(),
            labels: BTreeMap::new(),
        }
    }

    #[derive(Default)]
    pub(crate) struct Recorder {
        pub events: Mutex<Vec<String>>,
    }

    impl Plugin for Recorder {
        fn type_name(&self) -> &'static str {
            "recorder"
        }
        fn name(&self) -> &str {
            "recorder"
        }
    }

    impl EndpointListener for Recorder {
        fn endpoint_added(&self, endpoint: &Arc<Endpoint>) {
            self.events
                .lock()
                .push(format!("+{}{}", endpoint.name(), endpoint.id()));
        }
        fn endpoint_removed(&self, id: EndpointId) {
            self.events.lock().push(format!("-{id}"));
        }
    }

    #[test]
    fn removed_listeners_hear_of_no_later_change() {
        let store = EndpointStore::new();
        let kept = Arc::new(Recorder::default());
        let gone = Arc::new(Recorder::default());
        store.add_listener(kept.clone());
        let gone_dyn: Arc<dyn EndpointListener> = gone.clone();
        store.add_listener(gone_dyn.clone());
        store.update(vec![meta("a", "10.0.0.1:8000")]).unwrap();
        assert!(store.remove_listener(&gone_dyn));
        assert!(!store.remove_listener(&gone_dyn), "already removed");
        store.update(vec![meta("b", "10.0.0.2:8000")]).unwrap();
        assert_eq!(*kept.events.lock(), ["+a#0", "-#0", "+b#1"]);
        assert_eq!(*gone.events.lock(), ["+a#0"]);
    }

    #[test]
    fn update_keeps_unchanged_members_and_assigns_fresh_ids() {
        let store = EndpointStore::new();
        let rec = Arc::new(Recorder::default());
        store.add_listener(rec.clone());
        let mut rx = store.subscribe();

        let c = store
            .update(vec![meta("b", "127.0.0.1:2"), meta("a", "127.0.0.1:1")])
            .unwrap();
        assert_eq!(c.added, vec![EndpointId(0), EndpointId(1)]);
        assert_eq!(c.generation, 1);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 1);
        let s1 = store.snapshot();
        assert_eq!(
            s1.endpoints.iter().map(|e| e.name()).collect::<Vec<_>>(),
            ["a", "b"],
            "sorted by name"
        );
        let a = s1.by_name("a").unwrap().clone();
        a.dispatch(10);
        a.set_metrics(EndpointMetrics {
            waiting_queue_size: 7,
            ..Default::default()
        });

        // Same list again: nothing changes, no generation bump, no notification.
        let c = store
            .update(vec![meta("a", "127.0.0.1:1"), meta("b", "127.0.0.1:2")])
            .unwrap();
        assert!(c.is_empty());
        assert_eq!(c.generation, 1);
        assert!(!rx.has_changed().unwrap());

        // b removed, c added, a kept (same Arc, counters and metrics intact).
        let c = store
            .update(vec![meta("a", "127.0.0.1:1"), meta("c", "127.0.0.1:3")])
            .unwrap();
        assert_eq!(c.added, vec![EndpointId(2)]);
        assert_eq!(c.removed, vec![EndpointId(1)]);
        let s2 = store.snapshot();
        assert_eq!(s2.generation, 2);
        assert!(Arc::ptr_eq(s2.by_name("a").unwrap(), &a));
        assert_eq!(a.inflight_requests(), 1);
        // The old snapshot is untouched.
        assert_eq!(s1.by_name("b").unwrap().id(), EndpointId(1));

        // b comes back: a new id, never a reused one.
        let c = store
            .update(vec![
                meta("a", "127.0.0.1:1"),
                meta("b", "127.0.0.1:2"),
                meta("c", "127.0.0.1:3"),
            ])
            .unwrap();
        assert_eq!(c.added, vec![EndpointId(3)]);

        // Moving an endpoint to another port replaces it (and drops the metrics).
        let c = store
            .update(vec![
                meta("a", "127.0.0.1:9"),
                meta("b", "127.0.0.1:2"),
                meta("c", "127.0.0.1:3"),
            ])
            .unwrap();
        assert_eq!(c.added, vec![EndpointId(4)]);
        assert_eq!(c.removed, vec![EndpointId(0)]);
        assert_eq!(
            store.snapshot().by_name("a").unwrap().metrics().updated_at,
            None
        );

        assert_eq!(
            *rec.events.lock(),
            ["+a#0", "+b#1", "-#1", "+c#2", "+b#3", "-#0", "+a#4"]
        );
    }

    #[test]
    fn label_change_replaces_the_endpoint_but_keeps_its_metrics() {
        let store = EndpointStore::new();
        store.update(vec![meta("a", "127.0.0.1:1")]).unwrap();
        let old = store.snapshot().by_name("a").unwrap().clone();
        old.set_metrics(EndpointMetrics {
            kv_cache_usage: 0.5,
            updated_at: Some(std::time::Instant::now()),
            ..Default::default()
        });
        let mut m = meta("a", "127.0.0.1:1");
        m.labels.insert("llm-d.ai/role".into(), "decode".into());
        let c = store.update(vec![m]).unwrap();
        assert_eq!(c.removed, vec![old.id()]);
        assert_eq!(c.added, vec![EndpointId(1)]);
        let new = store.snapshot().by_name("a").unwrap().clone();
        assert_eq!(new.label("llm-d.ai/role"), Some("decode"));
        assert_eq!(*new.metrics(), *old.metrics());
    }

    #[test]
    fn duplicates_are_rejected_and_nothing_changes() {
        let store = EndpointStore::new();
        store.update(vec![meta("a", "127.0.0.1:1")]).unwrap();
        let e = store
            .update(vec![meta("x", "127.0.0.1:1"), meta("x", "127.0.0.1:2")])
            .unwrap_err();
        assert_eq!(e, StoreError::DuplicateName("x".into()));
        let e = store
            .update(vec![meta("x", "127.0.0.1:1"), meta("y", "127.0.0.1:1")])
            .unwrap_err();
        assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
        assert!(e.to_string().contains("'x' and 'y'"), "{e}");
        assert_eq!(store.snapshot().generation, 1);
        assert_eq!(store.snapshot().by_name("a").unwrap().id(), EndpointId(0));
    }

    #[test]
    fn synced_flag_notifies_without_bumping_generation() {
        let store = EndpointStore::new();
        let mut rx = store.subscribe();
        assert!(!store.is_synced());
        store.set_synced();
        assert!(store.is_synced());
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 0);
        store.set_synced();
        assert!(!rx.has_changed().unwrap(), "second call is a no-op");
        store.update(vec![meta("a", "127.0.0.1:1")]).unwrap();
        assert!(store.snapshot().synced, "synced survives updates");
        rx.borrow_and_update();
        store.set_unsynced();
        assert!(!store.is_synced());
        assert!(rx.has_changed().unwrap(), "unsynced notifies");
        assert_eq!(store.snapshot().len(), 1, "endpoints are kept");
        rx.borrow_and_update();
        store.set_unsynced();
        assert!(!rx.has_changed().unwrap(), "second call is a no-op");
        store.set_synced();
        assert!(store.is_synced(), "can be synced again");
    }

    #[test]
    fn late_listener_gets_current_endpoints_first() {
        let store = EndpointStore::new();
        store
            .update(vec![meta("a", "127.0.0.1:1"), meta("b", "127.0.0.1:2")])
            .unwrap();
        let rec = Arc::new(Recorder::default());
        store.add_listener(rec.clone());
        store.update(vec![meta("b", "127.0.0.1:2")]).unwrap();
        assert_eq!(*rec.events.lock(), ["+a#0", "+b#1", "-#0"]);
    }

    /// A listener that updates the store from inside a callback must not deadlock, and
    /// its events are delivered after the current ones.
    #[test]
    fn reentrant_listener_does_not_deadlock() {
        struct Reentrant {
            store: Arc<EndpointStore>,
            rec: Recorder,
        }
        impl Plugin for Reentrant {
            fn type_name(&self) -> &'static str {
                "reentrant"
            }
            fn name(&self) -> &str {
                "reentrant"
            }
        }
        impl EndpointListener for Reentrant {
            fn endpoint_added(&self, endpoint: &Arc<Endpoint>) {
                self.rec.endpoint_added(endpoint);
                if endpoint.name() == "a" {
                    self.store.update(vec![meta("z", "127.0.0.1:26")]).unwrap();
                }
            }
            fn endpoint_removed(&self, id: EndpointId) {
                self.rec.endpoint_removed(id);
            }
        }
        let store = Arc::new(EndpointStore::new());
        let l = Arc::new(Reentrant {
            store: store.clone(),
            rec: Recorder::default(),
        });
        store.add_listener(l.clone());
        store.update(vec![meta("a", "127.0.0.1:1")]).unwrap();
        assert_eq!(*l.rec.events.lock(), ["+a#0", "-#0", "+z#1"]);
    }

    #[test]
    fn concurrent_updates_deliver_events_in_update_order() {
        let store = Arc::new(EndpointStore::new());
        let rec = Arc::new(Recorder::default());
        store.add_listener(rec.clone());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..200u16 {
                        let addr = format!("127.0.0.{}:{}", t + 1, i + 1);
                        let _ = store.update(vec![meta(&format!("n{t}-{i}"), &addr)]);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Every id is added exactly once before it is removed at most once.
        let events = rec.events.lock();
        let mut live = HashSet::new();
        for e in events.iter() {
            let id = e.rsplit('#').next().unwrap().to_string();
            if e.starts_with('+') {
                assert!(live.insert(id), "added twice: {e}");
            } else {
                assert!(live.remove(&id), "removed before added: {e}");
            }
        }
        let current: HashSet<String> = store
            .snapshot()
            .endpoints
            .iter()
            .map(|e| e.id().0.to_string())
            .collect();
        assert_eq!(live, current);
    }
}
