//! The object store: what etcd plus the API server's registry do for the real server.
//!
//! Every write takes the next value of one global, monotonically increasing resourceVersion
//! (as etcd's revision) and appends an event to a bounded history that watches replay from.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::resource::{ResourceKind, version_priority};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiStatus;

/// (group, plural): objects are stored once per group and resource, whatever the version.
pub(crate) type ResKey = (String, String);

pub(crate) fn res_key(kind: &ResourceKind) -> ResKey {
    (kind.group.clone(), kind.plural.clone())
}

/// A watch event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// `ADDED`
    Added,
    /// `MODIFIED`
    Modified,
    /// `DELETED`
    Deleted,
}

impl EventType {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One write in the history.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub rv: u64,
    pub key: ResKey,
    pub namespace: String,
    pub etype: EventType,
    /// The object after the write (for DELETED: the last state, with the deletion's rv).
    pub object: Arc<Value>,
    /// The object before the write (MODIFIED only), to turn selector transitions into
    /// ADDED/DELETED as the real server does.
    pub old: Option<Arc<Value>>,
}

/// How an update treats `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UpdateMode {
    /// PUT/PATCH on the resource: a kind with a status subresource keeps its old status.
    Main,
    /// PUT/PATCH on `/status`: only the status changes.
    Status,
    /// Test-side write: everything the caller gives is kept (except uid and creation time).
    Raw,
}

/// DELETE preconditions (`DeleteOptions.preconditions`).
#[derive(Clone, Debug, Default)]
pub(crate) struct Preconditions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// What a delete did.
pub(crate) enum Deleted {
    /// Removed; the final object.
    Gone(Value),
    /// Marked with a deletionTimestamp (finalizers or a grace period); the object.
    Marked(Value),
}

#[derive(Clone)]
pub(crate) struct Store {
    pub rv: u64,
    pub kinds: Vec<ResourceKind>,
    pub objects: HashMap<ResKey, BTreeMap<(String, String), Arc<Value>>>,
    pub history: VecDeque<Event>,
    /// A watch can resume from any resourceVersion >= this; older ones get 410 Expired.
    pub oldest: u64,
    pub history_limit: usize,
}

pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn rfc3339_after(secs: i64) -> String {
    let t = SystemTime::now() + Duration::from_secs(secs.max(0).unsigned_abs());
    humantime::format_rfc3339_seconds(t).to_string()
}

pub(crate) fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
}

fn meta_mut(obj: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    let Value::Object(top) = obj else {
        unreachable!("replaced by an object above")
    };
    let meta = top.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    let Value::Object(m) = meta else {
        unreachable!("replaced by an object above")
    };
    m
}

/// Sets `kind` and `apiVersion` for the version the client asked for.
pub(crate) fn render(obj: &Value, kind: &ResourceKind) -> Value {
    let mut v = obj.clone();
    if let Value::Object(m) = &mut v {
        m.insert("kind".into(), json!(kind.kind));
        m.insert("apiVersion".into(), json!(kind.api_version()));
    }
    v
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Everything but metadata and status: a change here bumps `metadata.generation`.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Value::Object(m) = &mut v {
        m.remove("metadata");
        m.remove("status");
        m.remove("kind");
        m.remove("apiVersion");
    }
    v
}

fn without_rv(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(Value::Object(m)) = v.get_mut("metadata") {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    if let Value::Object(m) = &mut v {
        m.remove("kind");
        m.remove("apiVersion");
    }
    v
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4()
        .as_bytes()
        .iter()
        .take(5)
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

fn validate_metadata(obj: &Value, kind: &ResourceKind, name: &str) -> Result<(), ApiStatus> {
    if !is_dns_subdomain(name) {
        return Err(ApiStatus::invalid(
            &kind.kind,
            &kind.group,
            name,
            &format!(
                "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            ),
        ));
    }
    if let Some(labels) = obj.pointer("/metadata/labels") {
        let Some(map) = labels.as_object() else {
            return Err(ApiStatus::bad_request(
                "metadata.labels: must be a map of strings",
            ));
        };
        for (k, v) in map {
            let Some(v) = v.as_str() else {
                return Err(ApiStatus::bad_request(format!(
                    "metadata.labels[{k}]: must be a string"
                )));
            };
            let probe = format!("{k}={v}");
            if LabelSelector::parse(&probe).is_err() {
                return Err(ApiStatus::invalid(
                    &kind.kind,
                    &kind.group,
                    name,
                    &format!(
                        "metadata.labels: Invalid value: \"{v}\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
                    ),
                ));
            }
        }
    }
    if let Some(ann) = obj.pointer("/metadata/annotations")
        && !ann
            .as_object()
            .is_some_and(|m| m.values().all(Value::is_string))
    {
        return Err(ApiStatus::bad_request(
            "metadata.annotations: must be a map of strings",
        ));
    }
    Ok(())
}

impl Store {
    pub fn new(kinds: Vec<ResourceKind>, history_limit: usize) -> Self {
        Self {
            rv: 1,
            kinds,
            objects: HashMap::new(),
            history: VecDeque::new(),
            oldest: 1,
            history_limit: history_limit.max(1),
        }
    }

    /// A fresh store that keeps the kinds and continues the resourceVersion sequence (so that
    /// clients holding older versions get 410 and re-list, as after an etcd wipe).
    pub fn wiped(&self) -> Self {
        Self {
            rv: self.rv + 1,
            kinds: self.kinds.clone(),
            objects: HashMap::new(),
            history: VecDeque::new(),
            oldest: self.rv + 1,
            history_limit: self.history_limit,
        }
    }

    /// Creates the Namespace object for `ns` if a namespaced write goes there and it does
    /// not exist yet (this server creates namespaces on first use rather than refusing).
    pub fn ensure_namespace(&mut self, kind: &ResourceKind, ns: &str) {
        if !kind.namespaced || ns.is_empty() {
            return;
        }
        let nk = ResourceKind::namespaces();
        if self.get(&nk, "", ns).is_some() {
            return;
        }
        let obj = json!({
            "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}
        });
        let _ = self.create(&nk, "", obj, UpdateMode::Raw);
    }

    /// The namespaces a fresh cluster has.
    pub fn seed_namespaces(&mut self) {
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            self.ensure_namespace(&ResourceKind::pods(), ns);
        }
    }

    pub fn register(&mut self, kind: ResourceKind) {
        self.kinds.retain(|k| {
            !(k.group == kind.group && k.version == kind.version && k.plural == kind.plural)
        });
        self.kinds.push(kind);
    }

    pub fn unregister(&mut self, group: &str, plural: &str) {
        self.kinds
            .retain(|k| !(k.group == group && k.plural == plural));
        self.objects
            .remove(&(group.to_string(), plural.to_string()));
    }

    pub fn find_kind(&self, group: &str, version: &str, plural: &str) -> Option<ResourceKind> {
        self.kinds
            .iter()
            .find(|k| k.group == group && k.version == version && k.plural == plural)
            .cloned()
    }

    /// Groups with their versions, preferred (highest priority) first.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for k in &self.kinds {
            let vs = map.entry(k.group.clone()).or_default();
            if !vs.contains(&k.version) {
                vs.push(k.version.clone());
            }
        }
        map.into_iter()
            .map(|(g, mut vs)| {
                vs.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
                (g, vs)
            })
            .collect()
    }

    fn push_event(&mut self, ev: Event) {
        self.history.push_back(ev);
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.oldest = old.rv;
            }
        }
    }

    /// Drops the history: watches from any resourceVersion older than now get 410.
    pub fn compact(&mut self) {
        self.history.clear();
        self.oldest = self.rv;
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub fn get(&self, kind: &ResourceKind, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.objects
            .get(&res_key(kind))
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .cloned()
    }

    /// Objects of a kind in a namespace (`None`: all namespaces) matching the selectors,
    /// sorted by namespace and name.
    pub fn list(
        &self,
        kind: &ResourceKind,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Vec<Arc<Value>> {
        let Some(m) = self.objects.get(&res_key(kind)) else {
            return Vec::new();
        };
        m.iter()
            .filter(|((ons, _), _)| ns.is_none_or(|n| n == ons))
            .filter(|(_, o)| labels.matches(o) && fields.matches(o))
            .map(|(_, o)| o.clone())
            .collect()
    }

    /// Creates an object. `mode` Main drops `status` for a kind with a status subresource.
    pub fn create(
        &mut self,
        kind: &ResourceKind,
        ns: &str,
        mut obj: Value,
        mode: UpdateMode,
    ) -> Result<Value, ApiStatus> {
        if !obj.is_object() {
            return Err(ApiStatus::bad_request(
                "the object provided is unrecognized (must be a JSON object)",
            ));
        }
        let mut name = meta_str(&obj, "name").unwrap_or_default().to_string();
        if name.is_empty() {
            match meta_str(&obj, "generateName") {
                Some(prefix) if !prefix.is_empty() => {
                    name = format!("{prefix}{}", random_suffix());
                }
                _ => {
                    return Err(ApiStatus::invalid(
                        &kind.kind,
                        &kind.group,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            }
        }
        validate_metadata(&obj, kind, &name)?;
        if let Some(body_ns) = meta_str(&obj, "namespace")
            && !body_ns.is_empty()
            && body_ns != ns
        {
            return Err(ApiStatus::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let key = res_key(kind);
        if self
            .objects
            .get(&key)
            .is_some_and(|m| m.contains_key(&(ns.to_string(), name.clone())))
        {
            return Err(ApiStatus::already_exists(&kind.group, &kind.plural, &name));
        }
        if mode == UpdateMode::Main
            && kind.status_subresource
            && let Value::Object(m) = &mut obj
        {
            m.remove("status");
        }
        let rv = self.next_rv();
        let meta = meta_mut(&mut obj);
        meta.insert("name".into(), json!(name));
        if kind.namespaced {
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        meta.insert("generation".into(), json!(1));
        if mode != UpdateMode::Raw {
            meta.remove("deletionTimestamp");
            meta.remove("deletionGracePeriodSeconds");
        }
        let stored = Arc::new(render(&obj, kind));
        self.objects
            .entry(key.clone())
            .or_default()
            .insert((ns.to_string(), name), stored.clone());
        self.push_event(Event {
            rv,
            key,
            namespace: ns.to_string(),
            etype: EventType::Added,
            object: stored.clone(),
            old: None,
        });
        Ok((*stored).clone())
    }

    /// Replaces an object with `new` (already patched by the caller, if a patch).
    /// `metadata.resourceVersion` in `new`, when set, must equal the stored one (409).
    pub fn update(
        &mut self,
        kind: &ResourceKind,
        ns: &str,
        name: &str,
        mut new: Value,
        mode: UpdateMode,
    ) -> Result<Value, ApiStatus> {
        if !new.is_object() {
            return Err(ApiStatus::bad_request(
                "the object provided is unrecognized (must be a JSON object)",
            ));
        }
        let key = res_key(kind);
        let old = self
            .get(kind, ns, name)
            .ok_or_else(|| ApiStatus::not_found(&kind.group, &kind.plural, name))?;
        if let Some(body_name) = meta_str(&new, "name")
            && body_name != name
        {
            return Err(ApiStatus::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if kind.namespaced
            && let Some(body_ns) = meta_str(&new, "namespace")
            && !body_ns.is_empty()
            && body_ns != ns
        {
            return Err(ApiStatus::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        if let Some(want) = meta_str(&new, "resourceVersion")
            && !want.is_empty()
            && Some(want) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiStatus::conflict(&kind.group, &kind.plural, name));
        }
        if let Some(uid) = meta_str(&new, "uid")
            && !uid.is_empty()
            && Some(uid) != meta_str(&old, "uid")
        {
            return Err(ApiStatus::conflict_msg(
                &kind.group,
                &kind.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid").unwrap_or_default()
                ),
            ));
        }
        validate_metadata(&new, kind, name)?;
        // What the kind's strategy lets this request change.
        new = match mode {
            UpdateMode::Status => {
                let mut merged = (*old).clone();
                if let Value::Object(m) = &mut merged {
                    match new.get("status") {
                        Some(s) => m.insert("status".into(), s.clone()),
                        None => m.remove("status"),
                    };
                }
                merged
            }
            UpdateMode::Main if kind.status_subresource => {
                if let Value::Object(m) = &mut new {
                    match old.get("status") {
                        Some(s) => m.insert("status".into(), s.clone()),
                        None => m.remove("status"),
                    };
                }
                new
            }
            _ => new,
        };
        let old_meta = old.get("metadata").cloned().unwrap_or_else(|| json!({}));
        {
            let meta = meta_mut(&mut new);
            for f in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "generation",
            ] {
                match old_meta.get(f) {
                    Some(v) => meta.insert(f.into(), v.clone()),
                    None => meta.remove(f),
                };
            }
            if mode != UpdateMode::Raw {
                for f in ["deletionTimestamp", "deletionGracePeriodSeconds"] {
                    match old_meta.get(f) {
                        Some(v) => meta.insert(f.into(), v.clone()),
                        None => meta.remove(f),
                    };
                }
            }
            meta.insert(
                "resourceVersion".into(),
                old_meta
                    .get("resourceVersion")
                    .cloned()
                    .unwrap_or(Value::Null),
            );
        }
        let new = render(&new, kind);
        if without_rv(&new) == without_rv(&old) {
            // A no-op write does not bump the resourceVersion (nor wake watches).
            return Ok((*old).clone());
        }
        let mut new = new;
        if spec_part(&new) != spec_part(&old) {
            let g = old_meta
                .get("generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            meta_mut(&mut new).insert("generation".into(), json!(g + 1));
        }
        let rv = self.next_rv();
        meta_mut(&mut new).insert("resourceVersion".into(), json!(rv.to_string()));
        let finalizers_done = new
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty);
        // Marked for deletion with no grace period left: the last finalizer going removes it
        // (an object in a grace period stays until the period ends, as a terminating pod).
        let deleting = new.pointer("/metadata/deletionTimestamp").is_some()
            && new
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                == 0;
        let stored = Arc::new(new);
        let map = self.objects.entry(key.clone()).or_default();
        let etype = if deleting && finalizers_done {
            map.remove(&(ns.to_string(), name.to_string()));
            EventType::Deleted
        } else {
            map.insert((ns.to_string(), name.to_string()), stored.clone());
            EventType::Modified
        };
        self.push_event(Event {
            rv,
            key,
            namespace: ns.to_string(),
            etype,
            object: stored.clone(),
            old: (etype == EventType::Modified).then_some(old),
        });
        Ok((*stored).clone())
    }

    /// Deletes an object: removed at once, or marked with a deletionTimestamp when it has
    /// finalizers or `grace_secs` > 0.
    pub fn delete(
        &mut self,
        kind: &ResourceKind,
        ns: &str,
        name: &str,
        pre: &Preconditions,
        grace_secs: i64,
    ) -> Result<Deleted, ApiStatus> {
        let old = self
            .get(kind, ns, name)
            .ok_or_else(|| ApiStatus::not_found(&kind.group, &kind.plural, name))?;
        if let Some(uid) = &pre.uid
            && Some(uid.as_str()) != meta_str(&old, "uid")
        {
            return Err(ApiStatus::conflict_msg(
                &kind.group,
                &kind.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid").unwrap_or_default()
                ),
            ));
        }
        if let Some(rv) = &pre.resource_version
            && Some(rv.as_str()) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiStatus::conflict_msg(
                &kind.group,
                &kind.plural,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    meta_str(&old, "resourceVersion").unwrap_or_default()
                ),
            ));
        }
        let has_finalizers = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        let already_marked = old.pointer("/metadata/deletionTimestamp").is_some();
        if has_finalizers || (grace_secs > 0 && !already_marked) {
            if already_marked {
                return Ok(Deleted::Marked((*old).clone()));
            }
            let grace = if has_finalizers { 0 } else { grace_secs };
            let mut new = (*old).clone();
            {
                let meta = meta_mut(&mut new);
                meta.insert("deletionTimestamp".into(), json!(rfc3339_after(grace)));
                meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
            }
            let v = self.update(kind, ns, name, new, UpdateMode::Raw)?;
            return Ok(Deleted::Marked(v));
        }
        let key = res_key(kind);
        let rv = self.next_rv();
        let mut last = (*old).clone();
        meta_mut(&mut last).insert("resourceVersion".into(), json!(rv.to_string()));
        let last = Arc::new(last);
        if let Some(m) = self.objects.get_mut(&key) {
            m.remove(&(ns.to_string(), name.to_string()));
        }
        self.push_event(Event {
            rv,
            key,
            namespace: ns.to_string(),
            etype: EventType::Deleted,
            object: last.clone(),
            old: None,
        });
        Ok(Deleted::Gone((*last).clone()))
    }

    /// Events for `key` after `since`, or `Err(oldest)` when the history no longer reaches
    /// back that far.
    pub fn events_since(&self, key: &ResKey, since: u64) -> Result<Vec<Event>, u64> {
        if since < self.oldest {
            return Err(self.oldest);
        }
        let start = self.history.partition_point(|e| e.rv <= since);
        Ok(self
            .history
            .iter()
            .skip(start)
            .filter(|e| &e.key == key)
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> Value {
        json!({"metadata": {"name": name, "labels": {"app": "x"}}, "spec": {"containers": []}, "status": {"phase": "Running"}})
    }

    #[test]
    fn create_assigns_metadata_and_drops_status_of_status_kinds() {
        let mut s = Store::new(ResourceKind::builtin(), 100);
        let k = ResourceKind::pods();
        let o = s.create(&k, "ns", pod("a"), UpdateMode::Main).unwrap();
        assert_eq!(o["metadata"]["resourceVersion"], "2");
        assert_eq!(o["metadata"]["namespace"], "ns");
        assert_eq!(o["metadata"]["generation"], 1);
        assert_eq!(o["kind"], "Pod");
        assert!(o.get("status").is_none());
        assert!(meta_str(&o, "uid").is_some_and(|u| u.len() == 36));
        assert_eq!(
            s.create(&k, "ns", pod("a"), UpdateMode::Main)
                .unwrap_err()
                .code,
            409
        );
        let raw = s.create(&k, "ns", pod("b"), UpdateMode::Raw).unwrap();
        assert_eq!(raw["status"]["phase"], "Running");
    }

    #[test]
    fn update_checks_resource_version_and_bumps_generation_on_spec_only() {
        let mut s = Store::new(ResourceKind::builtin(), 100);
        let k = ResourceKind::leases();
        let o = s
            .create(
                &k,
                "ns",
                json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}}),
                UpdateMode::Main,
            )
            .unwrap();
        let mut stale = o.clone();
        stale["spec"]["holderIdentity"] = json!("b");
        let updated = s
            .update(&k, "ns", "l", stale.clone(), UpdateMode::Main)
            .unwrap();
        assert_eq!(updated["metadata"]["generation"], 2);
        assert_eq!(updated["metadata"]["resourceVersion"], "3");
        // The same stale version again: conflict.
        stale["spec"]["holderIdentity"] = json!("c");
        let err = s
            .update(&k, "ns", "l", stale, UpdateMode::Main)
            .unwrap_err();
        assert_eq!((err.code, err.reason.as_str()), (409, "Conflict"));
        // Labels only: no generation bump. No-op: no rv bump.
        let mut lab = updated.clone();
        lab["metadata"]["labels"] = json!({"x": "y"});
        let l2 = s.update(&k, "ns", "l", lab, UpdateMode::Main).unwrap();
        assert_eq!(l2["metadata"]["generation"], 2);
        let same = s
            .update(&k, "ns", "l", l2.clone(), UpdateMode::Main)
            .unwrap();
        assert_eq!(
            same["metadata"]["resourceVersion"],
            l2["metadata"]["resourceVersion"]
        );
    }

    #[test]
    fn history_is_bounded_and_compaction_expires_old_versions() {
        let mut s = Store::new(ResourceKind::builtin(), 3);
        let k = ResourceKind::config_maps();
        for i in 0..5 {
            s.create(
                &k,
                "ns",
                json!({"metadata": {"name": format!("c{i}")}}),
                UpdateMode::Main,
            )
            .unwrap();
        }
        // rvs 2..=6; the window keeps 4,5,6 so resuming needs since >= 3.
        let key = res_key(&k);
        assert_eq!(s.events_since(&key, 2).unwrap_err(), 3);
        assert_eq!(s.events_since(&key, 3).unwrap().len(), 3);
        s.compact();
        assert_eq!(s.events_since(&key, 5).unwrap_err(), 6);
        assert!(s.events_since(&key, 6).unwrap().is_empty());
    }

    #[test]
    fn finalizers_hold_deletion_until_removed() {
        let mut s = Store::new(ResourceKind::builtin(), 100);
        let k = ResourceKind::config_maps();
        s.create(
            &k,
            "ns",
            json!({"metadata": {"name": "c", "finalizers": ["x/y"]}}),
            UpdateMode::Main,
        )
        .unwrap();
        let Deleted::Marked(m) = s
            .delete(&k, "ns", "c", &Preconditions::default(), 0)
            .unwrap()
        else {
            panic!("should be marked")
        };
        assert!(m.pointer("/metadata/deletionTimestamp").is_some());
        let mut cleared = m.clone();
        cleared["metadata"]["finalizers"] = json!([]);
        s.update(&k, "ns", "c", cleared, UpdateMode::Main).unwrap();
        assert!(s.get(&k, "ns", "c").is_none());
        let kinds: Vec<_> = s.history.iter().map(|e| e.etype).collect();
        assert_eq!(
            kinds,
            vec![EventType::Added, EventType::Modified, EventType::Deleted]
        );
    }

    #[test]
    fn delete_preconditions() {
        let mut s = Store::new(ResourceKind::builtin(), 100);
        let k = ResourceKind::config_maps();
        s.create(
            &k,
            "ns",
            json!({"metadata": {"name": "c"}}),
            UpdateMode::Main,
        )
        .unwrap();
        let pre = Preconditions {
            uid: Some("nope".into()),
            resource_version: None,
        };
        assert_eq!(
            s.delete(&k, "ns", "c", &pre, 0).err().map(|e| e.code),
            Some(409)
        );
        assert!(matches!(
            s.delete(&k, "ns", "c", &Preconditions::default(), 0),
            Ok(Deleted::Gone(_))
        ));
        assert_eq!(
            s.delete(&k, "ns", "c", &Preconditions::default(), 0)
                .err()
                .map(|e| e.code),
            Some(404)
        );
    }

    #[test]
    fn invalid_names_and_labels_are_refused() {
        let mut s = Store::new(ResourceKind::builtin(), 100);
        let k = ResourceKind::pods();
        for bad in [
            json!({"metadata": {"name": "Upper"}}),
            json!({"metadata": {}}),
            json!({"metadata": {"name": "ok", "labels": {"a": "not ok"}}}),
            json!({"metadata": {"name": "ok", "labels": {"a": 1}}}),
            json!([1, 2]),
        ] {
            let e = s
                .create(&k, "ns", bad.clone(), UpdateMode::Main)
                .unwrap_err();
            assert!(e.code == 422 || e.code == 400, "{bad}: {e}");
        }
        let g = s
            .create(
                &k,
                "ns",
                json!({"metadata": {"generateName": "w-"}}),
                UpdateMode::Main,
            )
            .unwrap();
        assert!(meta_str(&g, "name").is_some_and(|n| n.starts_with("w-") && n.len() == 7));
    }
}
