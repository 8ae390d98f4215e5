//! The HTTP side: listener, TLS, routing, the REST verbs and watch streams.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::auth::{Attributes, AuthTable, Permission, UserInfo};
use crate::faults::{FaultRule, Faults, Injected};
use crate::resource::ResourceKind;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::{self, ApiStatus};
use crate::store::{
    Deleted, EventType, Preconditions, Store, UpdateMode, meta_str, render, res_key,
};
use crate::tls::{self, TlsMaterial};
use crate::{Error, RequestRecord, WatchInfo};

type Body = BoxBody<Bytes, io::Error>;

/// The body of a deliberately malformed response.
const GARBAGE: &str =
    "{\"kind\":\"PodList\",\"items\":[{\"metadata\":{\"name\": <<malformed by kubetest>>";

/// The request log keeps about this many of the newest requests (long soak tests).
pub const REQUEST_LOG_CAP: usize = 200_000;

/// Server version reported at `/version`.
pub const SERVER_MINOR: &str = "34";

/// How watch streams are told to end: counters bumped by [`TestApiServer::drop_watches`]
/// (abort the connection mid-stream) and [`TestApiServer::expire_watches`] (an `ERROR` event
/// with 410 Expired). A watch acts on a bump newer than its start before sending anything
/// written after the bump.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct WatchCtl {
    drops: u64,
    expires: u64,
}

pub(crate) struct Options {
    pub admin_token: Option<String>,
    pub authorize_requests: bool,
    pub bookmark_interval: Duration,
    pub pod_termination: Option<Duration>,
}

pub(crate) struct Shared {
    pub store: Mutex<Store>,
    rv_tx: watch::Sender<u64>,
    pub auth: Mutex<AuthTable>,
    pub faults: Mutex<Faults>,
    pub log: Mutex<Vec<RequestRecord>>,
    pub watches: Mutex<HashMap<u64, WatchInfo>>,
    next_watch: AtomicU64,
    watch_ctl: watch::Sender<WatchCtl>,
    pub options: Options,
}

impl Shared {
    /// Runs a write against the store, or against a scratch copy for `dryRun=All` (nothing
    /// persists, no watch sees it), then wakes the watches.
    fn write<T>(&self, dry_run: bool, f: impl FnOnce(&mut Store) -> T) -> T {
        let mut store = self.store.lock();
        if dry_run {
            let mut scratch = store.clone();
            drop(store);
            return f(&mut scratch);
        }
        let r = f(&mut store);
        drop(store);
        self.notify();
        r
    }

    /// Appends to the request log, keeping the newest [`REQUEST_LOG_CAP`] entries.
    fn log_request(&self, r: RequestRecord) {
        let mut log = self.log.lock();
        if log.len() >= REQUEST_LOG_CAP {
            log.drain(..REQUEST_LOG_CAP / 2);
        }
        log.push(r);
    }

    pub fn notify(&self) {
        let rv = self.store.lock().rv;
        self.rv_tx.send_replace(rv);
    }
}

/// Builder for [`TestApiServer`].
#[derive(Clone, Debug)]
pub struct ServerBuilder {
    tls: bool,
    admin_token: Option<String>,
    authorize_requests: bool,
    history_limit: usize,
    bookmark_interval: Duration,
    port: u16,
    kinds: Vec<ResourceKind>,
    pod_termination: Option<Duration>,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        Self {
            tls: false,
            admin_token: None,
            authorize_requests: false,
            history_limit: 1000,
            bookmark_interval: Duration::from_secs(1),
            port: 0,
            kinds: ResourceKind::builtin(),
            pod_termination: None,
        }
    }
}

impl ServerBuilder {
    /// Serve HTTPS with a fresh self-signed CA (see [`TestApiServer::ca_pem`]).
    pub fn tls(mut self, on: bool) -> Self {
        self.tls = on;
        self
    }

    /// Require `Authorization: Bearer <token>` (this admin token, or one registered with
    /// [`TestApiServer::add_token`]); anything else gets 401.
    pub fn require_token(mut self, admin_token: &str) -> Self {
        self.admin_token = Some(admin_token.to_string());
        self
    }

    /// Authorize every API request against the permission table ([`TestApiServer::allow`]),
    /// as RBAC would; the admin token bypasses it. Off by default (everything is allowed).
    pub fn authorize_requests(mut self, on: bool) -> Self {
        self.authorize_requests = on;
        self
    }

    /// How many write events the watch history keeps (the watch cache window). Resuming a
    /// watch from a resourceVersion older than the window gets 410 Expired.
    pub fn history_limit(mut self, n: usize) -> Self {
        self.history_limit = n;
        self
    }

    /// Interval between BOOKMARK events on watches that asked for them (real: ~1 min).
    pub fn bookmark_interval(mut self, d: Duration) -> Self {
        self.bookmark_interval = d;
        self
    }

    /// Listen on this port of 127.0.0.1 (default 0: any free port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Serve these kinds as well as the built-in ones (like CRDs installed before start).
    pub fn with_kinds(mut self, kinds: impl IntoIterator<Item = ResourceKind>) -> Self {
        self.kinds.extend(kinds);
        self
    }

    /// Pod DELETEs without `gracePeriodSeconds: 0` mark the pod terminating
    /// (deletionTimestamp, MODIFIED) and remove it after `d`, as a kubelet would. Default:
    /// pods are removed at once (as the real server does for pods not bound to a node).
    pub fn pod_termination(mut self, d: Duration) -> Self {
        self.pod_termination = Some(d);
        self
    }

    /// Binds and starts serving.
    pub async fn start(self) -> Result<TestApiServer, Error> {
        let tls = if self.tls {
            Some(tls::generate(&[])?)
        } else {
            None
        };
        let mut store = Store::new(self.kinds.clone(), self.history_limit);
        store.seed_namespaces();
        let (rv_tx, _) = watch::channel(store.rv);
        let (watch_ctl, _) = watch::channel(WatchCtl::default());
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            rv_tx,
            auth: Mutex::new(AuthTable::default()),
            faults: Mutex::new(Faults::default()),
            log: Mutex::new(Vec::new()),
            watches: Mutex::new(HashMap::new()),
            next_watch: AtomicU64::new(1),
            watch_ctl,
            options: Options {
                admin_token: self.admin_token.clone(),
                authorize_requests: self.authorize_requests,
                bookmark_interval: self.bookmark_interval,
                pod_termination: self.pod_termination,
            },
        });
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], self.port))).await?;
        let addr = listener.local_addr().map_err(Error::Io)?;
        let server = TestApiServer {
            shared,
            addr,
            tls,
            running: Mutex::new(None),
        };
        server.serve(listener);
        Ok(server)
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    let socket = TcpSocket::new_v4().map_err(Error::Io)?;
    socket.set_reuseaddr(true).map_err(Error::Io)?;
    socket.bind(addr).map_err(|e| Error::Bind(addr, e))?;
    socket.listen(1024).map_err(|e| Error::Bind(addr, e))
}

struct Running {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// A Kubernetes API server for tests, on 127.0.0.1.
///
/// It speaks the real REST and watch protocol (JSON), so kube-rs, client-go and kubectl work
/// against it unchanged; it is not a real kube-apiserver because none can run on this
/// machine (see the crate docs). Dropping it stops it.
pub struct TestApiServer {
    pub(crate) shared: Arc<Shared>,
    addr: SocketAddr,
    tls: Option<TlsMaterial>,
    running: Mutex<Option<Running>>,
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        if let Some(r) = self.running.lock().take() {
            r.cancel.cancel();
            r.task.abort();
        }
    }
}

impl TestApiServer {
    /// A plaintext server with no authentication on a free port.
    pub async fn start() -> Result<Self, Error> {
        ServerBuilder::default().start().await
    }

    /// A builder for TLS, tokens, RBAC, history window, bookmark interval, port.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// `http://127.0.0.1:<port>` or `https://...`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The listening address (the same across [`Self::restart`]).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA certificate (PEM) a client must trust, when serving TLS.
    pub fn ca_pem(&self) -> Option<&str> {
        self.tls.as_ref().map(|t| t.ca_pem.as_str())
    }

    /// The admin bearer token, if the server requires one.
    pub fn admin_token(&self) -> Option<&str> {
        self.shared.options.admin_token.as_deref()
    }

    /// A kubeconfig for this server; see [`crate::Kubeconfig`].
    pub fn kubeconfig(&self) -> crate::Kubeconfig {
        crate::Kubeconfig::new(
            self.url(),
            self.ca_pem().map(str::to_string),
            self.admin_token().map(str::to_string),
        )
    }

    /// Writes a kubeconfig (admin token if any, namespace `default`) to `path`.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), Error> {
        self.kubeconfig().write(path)
    }

    fn serve(&self, listener: TcpListener) {
        let cancel = CancellationToken::new();
        let shared = self.shared.clone();
        let tls = self
            .tls
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.server.clone()));
        let c = cancel.clone();
        let task = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = c.cancelled() => break,
                    a = listener.accept() => a,
                };
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(error = %e, "kubetest: accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let tls = tls.clone();
                let c = c.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acceptor) => {
                            let tls_stream = tokio::select! {
                                _ = c.cancelled() => return,
                                s = acceptor.accept(stream) => match s {
                                    Ok(s) => s,
                                    Err(e) => {
                                        debug!(error = %e, "kubetest: TLS handshake failed");
                                        return;
                                    }
                                },
                            };
                            let conn = builder.serve_connection(TokioIo::new(tls_stream), svc);
                            tokio::select! {
                                _ = c.cancelled() => {},
                                r = conn => if let Err(e) = r { debug!(error = %e, "kubetest: connection ended"); },
                            }
                        }
                        None => {
                            let conn = builder.serve_connection(TokioIo::new(stream), svc);
                            tokio::select! {
                                _ = c.cancelled() => {},
                                r = conn => if let Err(e) = r { debug!(error = %e, "kubetest: connection ended"); },
                            }
                        }
                    }
                });
            }
        });
        *self.running.lock() = Some(Running { cancel, task });
    }

    /// Stops serving: closes the listener and every open connection (watches included), as
    /// an API server that went away. Clients get connection refused until [`Self::resume`]
    /// or [`Self::restart`].
    pub async fn stop(&self) {
        let running = self.running.lock().take();
        if let Some(r) = running {
            r.cancel.cancel();
            let _ = r.task.await;
        }
        // Give the aborted connections' watch tasks a moment to notice.
        tokio::task::yield_now().await;
    }

    /// Whether the server is currently accepting connections.
    pub fn is_running(&self) -> bool {
        self.running.lock().is_some()
    }

    /// Starts serving again on the same port after [`Self::stop`], keeping all state.
    pub async fn resume(&self) -> Result<(), Error> {
        if self.is_running() {
            return Ok(());
        }
        // The port is ours; retry briefly in case the old socket is still closing.
        let mut last = None;
        for _ in 0..100 {
            match bind(self.addr).await {
                Ok(l) => {
                    self.serve(l);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(last.unwrap_or(Error::Stopped))
    }

    /// An API server restart on the same port: stop, then start again. With
    /// `keep_state == false` every object and the watch history are dropped (an etcd wipe;
    /// registered kinds stay) and the resourceVersion sequence continues, so clients resuming
    /// a watch get 410 Expired and must re-list.
    pub async fn restart(&self, keep_state: bool) -> Result<(), Error> {
        self.stop().await;
        if !keep_state {
            let mut s = self.shared.store.lock();
            *s = s.wiped();
            s.seed_namespaces();
        }
        self.shared.notify();
        self.resume().await
    }

    // ----- kinds -----

    /// Serves a kind (the equivalent of installing a CRD). Replaces an equal
    /// group/version/plural.
    pub fn register(&self, kind: ResourceKind) {
        self.shared.store.lock().register(kind);
    }

    /// Serves every Gateway API Inference Extension / llm-d kind
    /// ([`ResourceKind::inference_extension_kinds`]).
    pub fn register_inference_extension_kinds(&self) {
        let mut s = self.shared.store.lock();
        for k in ResourceKind::inference_extension_kinds() {
            s.register(k);
        }
    }

    /// Stops serving a group's resource in every version (the CRD was deleted) and drops
    /// its objects. Discovery no longer lists it; requests get 404.
    pub fn unregister(&self, group: &str, plural: &str) {
        self.shared.store.lock().unregister(group, plural);
        self.shared.notify();
    }

    /// The kinds currently served.
    pub fn kinds(&self) -> Vec<ResourceKind> {
        self.shared.store.lock().kinds.clone()
    }

    // ----- direct store access (test side; bypasses authn/authz/faults) -----

    fn ns_of(kind: &ResourceKind, obj: &Value) -> String {
        if kind.namespaced {
            meta_str(obj, "namespace")
                .filter(|s| !s.is_empty())
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        }
    }

    /// Creates an object as a controller would: everything given is kept, `status`
    /// included. Namespace from `metadata.namespace` (default `default`).
    pub fn create(&self, kind: &ResourceKind, obj: Value) -> Result<Value, ApiStatus> {
        let ns = Self::ns_of(kind, &obj);
        self.shared.write(false, |s| {
            s.ensure_namespace(kind, &ns);
            s.create(kind, &ns, obj, UpdateMode::Raw)
        })
    }

    /// Replaces an object (status included). `metadata.resourceVersion`, when set, must be
    /// current.
    pub fn replace(&self, kind: &ResourceKind, obj: Value) -> Result<Value, ApiStatus> {
        let ns = Self::ns_of(kind, &obj);
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        let r = self
            .shared
            .store
            .lock()
            .update(kind, &ns, &name, obj, UpdateMode::Raw);
        self.shared.notify();
        r
    }

    /// Applies a JSON merge patch to an object (status included).
    pub fn merge_patch(
        &self,
        kind: &ResourceKind,
        ns: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Value, ApiStatus> {
        let r = {
            let mut s = self.shared.store.lock();
            let cur = s
                .get(kind, ns, name)
                .ok_or_else(|| ApiStatus::not_found(&kind.group, &kind.plural, name))?;
            let mut new = (*cur).clone();
            crate::patch::merge_patch(&mut new, patch);
            s.update(kind, ns, name, new, UpdateMode::Raw)
        };
        self.shared.notify();
        r
    }

    /// One object, if it exists.
    pub fn get(&self, kind: &ResourceKind, ns: &str, name: &str) -> Option<Value> {
        self.shared
            .store
            .lock()
            .get(kind, ns, name)
            .map(|o| render(&o, kind))
    }

    /// All objects of a kind in `ns` (`None`: all namespaces).
    pub fn list(&self, kind: &ResourceKind, ns: Option<&str>) -> Vec<Value> {
        self.shared
            .store
            .lock()
            .list(
                kind,
                ns,
                &LabelSelector::default(),
                &FieldSelector::default(),
            )
            .iter()
            .map(|o| render(o, kind))
            .collect()
    }

    /// Removes an object at once (no grace period; finalizers still hold it).
    pub fn delete(&self, kind: &ResourceKind, ns: &str, name: &str) -> Result<(), ApiStatus> {
        let r = self
            .shared
            .store
            .lock()
            .delete(kind, ns, name, &Preconditions::default(), 0)
            .map(|_| ());
        self.shared.notify();
        r
    }

    /// Starts a graceful deletion: sets `deletionTimestamp` (now + `grace_secs`) and
    /// `deletionGracePeriodSeconds`, like a pod entering Terminating; the object stays until
    /// [`Self::delete`] (or its finalizers are removed).
    pub fn begin_graceful_delete(
        &self,
        kind: &ResourceKind,
        ns: &str,
        name: &str,
        grace_secs: i64,
    ) -> Result<Value, ApiStatus> {
        let r = self
            .shared
            .store
            .lock()
            .delete(kind, ns, name, &Preconditions::default(), grace_secs.max(1))
            .map(|d| match d {
                Deleted::Gone(v) | Deleted::Marked(v) => v,
            });
        self.shared.notify();
        r
    }

    /// Sets a pod's `Ready` condition (and `ContainersReady`), keeping other conditions.
    pub fn set_pod_ready(&self, ns: &str, name: &str, ready: bool) -> Result<Value, ApiStatus> {
        let kind = ResourceKind::pods();
        let r = {
            let mut s = self.shared.store.lock();
            let cur = s
                .get(&kind, ns, name)
                .ok_or_else(|| ApiStatus::not_found("", "pods", name))?;
            let mut new = (*cur).clone();
            crate::objects::set_ready_condition(&mut new, ready);
            s.update(&kind, ns, name, new, UpdateMode::Raw)
        };
        self.shared.notify();
        r
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().rv
    }

    // ----- auth -----

    /// Maps a bearer token to a user: the server accepts it (when tokens are required) and
    /// `TokenReview` authenticates it.
    pub fn add_token(&self, token: &str, user: UserInfo) {
        self.shared
            .auth
            .lock()
            .tokens
            .insert(token.to_string(), user);
    }

    /// Removes a token.
    pub fn remove_token(&self, token: &str) {
        self.shared.auth.lock().tokens.remove(token);
    }

    /// Adds an allow rule: `SubjectAccessReview` answers from these, and so does request
    /// authorization when [`ServerBuilder::authorize_requests`] is on.
    pub fn allow(&self, p: Permission) {
        self.shared.auth.lock().permissions.push(p);
    }

    /// Removes every allow rule.
    pub fn clear_permissions(&self) {
        self.shared.auth.lock().permissions.clear();
    }

    // ----- faults -----

    /// 403 Forbidden (RBAC-worded) for `verb` on `resource` (`pods`,
    /// `leases.coordination.k8s.io`, `*`) until [`Self::clear_faults`].
    pub fn deny(&self, verb: &str, resource: &str) {
        self.inject(FaultRule::deny(verb, resource));
    }

    /// Adds any fault rule (see [`FaultRule`]).
    pub fn inject(&self, rule: FaultRule) {
        self.shared.faults.lock().rules.push(rule);
    }

    /// Removes every fault rule, the delay and the malformed resources.
    pub fn clear_faults(&self) {
        let mut f = self.shared.faults.lock();
        f.rules.clear();
        f.delay = None;
        f.malformed.clear();
    }

    /// Delays every response (`None`: no delay).
    pub fn set_delay(&self, d: Option<Duration>) {
        self.shared.faults.lock().delay = d;
    }

    /// Answers get/list with a garbage JSON body and sends garbage lines on watches of
    /// `resource` (`pods`, `inferencepools.inference.networking.k8s.io`), or stops.
    pub fn set_malformed(&self, resource: &str, on: bool) {
        let mut f = self.shared.faults.lock();
        if on {
            f.malformed.insert(resource.to_string());
        } else {
            f.malformed.remove(resource);
        }
    }

    /// Aborts every open watch connection mid-stream (a dropped connection).
    pub fn drop_watches(&self) {
        self.shared.watch_ctl.send_modify(|c| c.drops += 1);
    }

    /// Compacts the history and ends every open watch with an `ERROR` event carrying a 410
    /// Expired status, as when the watch cache drops a watcher: clients must re-list.
    pub fn expire_watches(&self) {
        self.compact();
        self.shared.watch_ctl.send_modify(|c| c.expires += 1);
    }

    /// Forgets the watch history (an etcd compaction): a watch asking to resume from an
    /// older resourceVersion gets 410 Expired. Open, caught-up watches are unaffected.
    pub fn compact(&self) {
        self.shared.store.lock().compact();
    }

    // ----- observation -----

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.log.lock().clone()
    }

    /// Empties the request log.
    pub fn clear_requests(&self) {
        self.shared.log.lock().clear();
    }

    /// The watches currently open.
    pub fn watches(&self) -> Vec<WatchInfo> {
        let mut v: Vec<_> = self.shared.watches.lock().values().cloned().collect();
        v.sort_by_key(|w| w.id);
        v
    }

    /// Waits until `pred` holds for the open watches, or `timeout` passes; returns whether it
    /// held. (A polling helper: tests wait for conditions rather than sleeping.)
    pub async fn wait_for_watches(
        &self,
        timeout: Duration,
        pred: impl Fn(&[WatchInfo]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(&self.watches()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `pred` holds for the request log, or `timeout` passes.
    pub async fn wait_for_requests(
        &self,
        timeout: Duration,
        pred: impl Fn(&[RequestRecord]) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(&self.shared.log.lock()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ======================= request handling =======================

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    raw_response(code, "application/json", body)
}

fn raw_response(code: u16, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).unwrap_or(HeaderValue::from_static("application/json")),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    if let Ok(v) = HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()) {
        h.insert("audit-id", v);
    }
    r
}

fn status_response(s: &ApiStatus) -> Response<Body> {
    json_response(s.code, &s.to_json())
}

/// Percent-decoding of a query component (`+` is a space, as Go's `url.ParseQuery`).
pub(crate) fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

struct Req {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    headers: http::HeaderMap,
    body: Bytes,
    user: UserInfo,
}

impl Req {
    fn q(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.q(name), Some("true" | "1" | "True" | "TRUE"))
    }

    fn accept(&self) -> &str {
        self.headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

enum Route {
    Root,
    Version,
    Health,
    CoreGroup,
    CoreVersion(String),
    Groups,
    Group(String),
    GroupVersion(String, String),
    Resource(ResPath),
    OpenApiRoot,
    OpenApiDoc(String),
    NotFound,
}

struct ResPath {
    group: String,
    version: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    sub: Option<String>,
    watch_path: bool,
}

fn route(path: &str) -> Route {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match segs.as_slice() {
        [] => Route::Root,
        ["version"] => Route::Version,
        ["healthz" | "livez" | "readyz", ..] => Route::Health,
        ["api"] => Route::CoreGroup,
        ["api", v] => Route::CoreVersion(v.to_string()),
        ["api", v, rest @ ..] => res_route("", v, rest),
        ["openapi", "v3"] => Route::OpenApiRoot,
        ["openapi", "v3", rest @ ..] => Route::OpenApiDoc(rest.join("/")),
        ["apis"] => Route::Groups,
        ["apis", g] => Route::Group(g.to_string()),
        ["apis", g, v] => Route::GroupVersion(g.to_string(), v.to_string()),
        ["apis", g, v, rest @ ..] => res_route(g, v, rest),
        _ => Route::NotFound,
    }
}

fn res_route(group: &str, version: &str, mut rest: &[&str]) -> Route {
    let mut watch_path = false;
    if rest.first() == Some(&"watch") {
        watch_path = true;
        rest = &rest[1..];
    }
    let mut namespace = None;
    if rest.len() >= 3
        && rest[0] == "namespaces"
        && !(rest.len() == 3 && (rest[2] == "status" || rest[2] == "finalize"))
    {
        namespace = Some(rest[1].to_string());
        rest = &rest[2..];
    }
    match rest {
        [plural] => Route::Resource(ResPath {
            group: group.into(),
            version: version.into(),
            namespace,
            plural: plural.to_string(),
            name: None,
            sub: None,
            watch_path,
        }),
        [plural, name] => Route::Resource(ResPath {
            group: group.into(),
            version: version.into(),
            namespace,
            plural: plural.to_string(),
            name: Some(name.to_string()),
            sub: None,
            watch_path,
        }),
        [plural, name, sub] => Route::Resource(ResPath {
            group: group.into(),
            version: version.into(),
            namespace,
            plural: plural.to_string(),
            name: Some(name.to_string()),
            sub: Some(sub.to_string()),
            watch_path,
        }),
        _ => Route::NotFound,
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let raw_query = parts.uri.query().unwrap_or("").to_string();
    let mut record = RequestRecord {
        method: parts.method.to_string(),
        path: path.clone(),
        query: raw_query.clone(),
        verb: String::new(),
        user: String::new(),
        status: 0,
        user_agent: parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
    };
    let delay = shared.faults.lock().delay;
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let s = ApiStatus::bad_request(format!("reading the request body: {e}"));
            record.status = s.code;
            shared.log_request(record);
            return status_response(&s);
        }
    };
    let user = match authenticate(&shared, &parts.headers) {
        Ok(u) => u,
        Err(s) => {
            record.status = s.code;
            shared.log_request(record);
            return status_response(&s);
        }
    };
    record.user = user.username.clone();
    let req = Req {
        method: parts.method,
        path,
        query: parse_query(&raw_query),
        headers: parts.headers,
        body,
        user,
    };
    let (resp, verb) = dispatch(&shared, &req).await;
    record.verb = verb;
    record.status = resp.status().as_u16();
    shared.log_request(record);
    resp
}

fn authenticate(shared: &Shared, headers: &http::HeaderMap) -> Result<UserInfo, ApiStatus> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let from_table = token.and_then(|t| shared.auth.lock().tokens.get(t).cloned());
    match (&shared.options.admin_token, token) {
        (Some(admin), Some(t)) if t == admin => Ok(UserInfo::admin()),
        (Some(_), _) => from_table.ok_or_else(ApiStatus::unauthorized),
        // No authentication configured: a known token is its user, anyone else is an
        // administrator.
        (None, _) => Ok(from_table.unwrap_or_else(UserInfo::admin)),
    }
}

async fn dispatch(shared: &Arc<Shared>, req: &Req) -> (Response<Body>, String) {
    let get_only = |resp: Response<Body>| {
        if req.method == Method::GET {
            (resp, "get".to_string())
        } else {
            (
                status_response(&ApiStatus::method_not_allowed()),
                String::new(),
            )
        }
    };
    match route(&req.path) {
        Route::Root => get_only(json_response(
            200,
            &json!({"paths": ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/readyz", "/version"]}),
        )),
        Route::Version => get_only(json_response(
            200,
            &json!({
                "major": "1",
                "minor": SERVER_MINOR,
                "emulationMajor": "1",
                "emulationMinor": SERVER_MINOR,
                "gitVersion": format!("v1.{SERVER_MINOR}.0-kubetest"),
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.24.0",
                "compiler": "gc",
                "platform": "linux/amd64"
            }),
        )),
        Route::Health => get_only(raw_response(200, "text/plain; charset=utf-8", "ok")),
        Route::CoreGroup => get_only(core_group(shared, req)),
        Route::CoreVersion(v) => get_only(resource_list(shared, "", &v)),
        Route::Groups => get_only(groups(shared, req)),
        Route::Group(g) => get_only(group(shared, &g)),
        Route::GroupVersion(g, v) => get_only(resource_list(shared, &g, &v)),
        Route::Resource(rp) => resource_request(shared, req, rp).await,
        Route::OpenApiRoot => get_only(openapi_root(shared)),
        Route::OpenApiDoc(gv) => get_only(openapi_doc(shared, &gv)),
        Route::NotFound => (status_response(&ApiStatus::no_such_path()), String::new()),
    }
}

const AGGREGATED: &str = "apidiscovery.k8s.io";

fn wants_aggregated(req: &Req) -> bool {
    req.accept().contains(AGGREGATED)
}

fn discovery_resource(k: &ResourceKind) -> Value {
    let mut r = json!({
        "name": k.plural,
        "singularName": k.singular,
        "namespaced": k.namespaced,
        "kind": k.kind,
        "verbs": k.verbs,
    });
    if !k.short_names.is_empty()
        && let Value::Object(m) = &mut r
    {
        m.insert("shortNames".into(), json!(k.short_names));
    }
    r
}

fn resource_list(shared: &Shared, group: &str, version: &str) -> Response<Body> {
    let store = shared.store.lock();
    let kinds: Vec<&ResourceKind> = store
        .kinds
        .iter()
        .filter(|k| k.group == group && k.version == version)
        .collect();
    if kinds.is_empty() {
        return status_response(&ApiStatus::no_such_path());
    }
    let mut resources = Vec::new();
    for k in &kinds {
        resources.push(discovery_resource(k));
        if k.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", k.plural),
                "singularName": "",
                "namespaced": k.namespaced,
                "kind": k.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json_response(
        200,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

fn aggregated_group(store: &Store, group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| {
            let resources: Vec<Value> = store
                .kinds
                .iter()
                .filter(|k| k.group == group && &k.version == v)
                .map(|k| {
                    let mut r = json!({
                        "resource": k.plural,
                        "responseKind": {"group": k.group, "version": k.version, "kind": k.kind},
                        "scope": if k.namespaced { "Namespaced" } else { "Cluster" },
                        "singularResource": k.singular,
                        "verbs": k.verbs,
                    });
                    if let Value::Object(m) = &mut r {
                        if !k.short_names.is_empty() {
                            m.insert("shortNames".into(), json!(k.short_names));
                        }
                        if k.status_subresource {
                            m.insert(
                                "subresources".into(),
                                json!([{
                                    "subresource": "status",
                                    "responseKind": {"group": k.group, "version": k.version, "kind": k.kind},
                                    "verbs": ["get", "patch", "update"],
                                }]),
                            );
                        }
                    }
                    r
                })
                .collect();
            json!({"version": v, "resources": resources, "freshness": "Current"})
        })
        .collect();
    json!({"metadata": {"name": group, "creationTimestamp": null}, "versions": vs})
}

fn aggregated_list(items: Vec<Value>) -> Response<Body> {
    let mut r = json_response(
        200,
        &json!({
            "kind": "APIGroupDiscoveryList",
            "apiVersion": "apidiscovery.k8s.io/v2",
            "metadata": {},
            "items": items,
        }),
    );
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
        ),
    );
    r
}

fn core_group(shared: &Shared, req: &Req) -> Response<Body> {
    let store = shared.store.lock();
    let versions: Vec<String> = store
        .groups()
        .into_iter()
        .find(|(g, _)| g.is_empty())
        .map(|(_, v)| v)
        .unwrap_or_default();
    if wants_aggregated(req) {
        return aggregated_list(vec![aggregated_group(&store, "", &versions)]);
    }
    json_response(
        200,
        &json!({
            "kind": "APIVersions",
            "versions": versions,
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:443"}],
        }),
    )
}

fn group_json(group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": vs,
        "preferredVersion": vs.first().cloned().unwrap_or(Value::Null),
    })
}

fn groups(shared: &Shared, req: &Req) -> Response<Body> {
    let store = shared.store.lock();
    let groups: Vec<(String, Vec<String>)> = store
        .groups()
        .into_iter()
        .filter(|(g, _)| !g.is_empty())
        .collect();
    if wants_aggregated(req) {
        return aggregated_list(
            groups
                .iter()
                .map(|(g, vs)| aggregated_group(&store, g, vs))
                .collect(),
        );
    }
    let list: Vec<Value> = groups.iter().map(|(g, vs)| group_json(g, vs)).collect();
    json_response(
        200,
        &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": list}),
    )
}

fn group(shared: &Shared, group: &str) -> Response<Body> {
    let store = shared.store.lock();
    match store.groups().into_iter().find(|(g, _)| g == group) {
        Some((g, vs)) if !g.is_empty() => {
            let mut v = group_json(&g, &vs);
            if let Value::Object(m) = &mut v {
                m.insert("kind".into(), json!("APIGroup"));
                m.insert("apiVersion".into(), json!("v1"));
            }
            json_response(200, &v)
        }
        _ => status_response(&ApiStatus::no_such_path()),
    }
}

/// `/openapi/v3`: one entry per group-version, as the real server lists them.
fn openapi_root(shared: &Shared) -> Response<Body> {
    let store = shared.store.lock();
    let mut paths = serde_json::Map::new();
    for k in &store.kinds {
        let p = if k.group.is_empty() {
            format!("api/{}", k.version)
        } else {
            format!("apis/{}/{}", k.group, k.version)
        };
        let url = format!("/openapi/v3/{p}?hash=kubetest{}", store.kinds.len());
        paths.insert(p, json!({"serverRelativeURL": url}));
    }
    json_response(200, &json!({"paths": paths}))
}

/// `/openapi/v3/apis/<group>/<version>`: the operations of each resource, with the query
/// parameters clients probe for (kubectl checks `fieldValidation` on PATCH to decide that
/// the server validates). No schemas: this server does not validate against them.
fn openapi_doc(shared: &Shared, gv: &str) -> Response<Body> {
    let store = shared.store.lock();
    let (group, version) = match gv.split('/').collect::<Vec<_>>().as_slice() {
        ["api", v] => (String::new(), v.to_string()),
        ["apis", g, v] => (g.to_string(), v.to_string()),
        _ => return status_response(&ApiStatus::no_such_path()),
    };
    let kinds: Vec<&ResourceKind> = store
        .kinds
        .iter()
        .filter(|k| k.group == group && k.version == version)
        .collect();
    if kinds.is_empty() {
        return status_response(&ApiStatus::no_such_path());
    }
    let param = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    let mut paths = serde_json::Map::new();
    for k in kinds {
        let prefix = if group.is_empty() {
            format!("/api/{version}")
        } else {
            format!("/apis/{group}/{version}")
        };
        let base = if k.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}", k.plural)
        } else {
            format!("{prefix}/{}", k.plural)
        };
        let gvk = json!({"group": k.group, "version": k.version, "kind": k.kind});
        let op = |action: &str, params: Vec<Value>| {
            json!({
                "operationId": format!("{action}{}", k.kind),
                "x-kubernetes-action": action,
                "x-kubernetes-group-version-kind": gvk,
                "parameters": params,
                "responses": {"200": {"description": "OK"}},
            })
        };
        let write_params = || {
            vec![
                param("dryRun"),
                param("fieldManager"),
                param("fieldValidation"),
            ]
        };
        paths.insert(
            base.clone(),
            json!({
                "get": op("list", vec![param("labelSelector"), param("fieldSelector"), param("resourceVersion"), param("watch")]),
                "post": op("post", write_params()),
            }),
        );
        paths.insert(
            format!("{base}/{{name}}"),
            json!({
                "get": op("get", vec![]),
                "put": op("put", write_params()),
                "patch": op("patch", {
                    let mut p = write_params();
                    p.push(param("force"));
                    p
                }),
                "delete": op("delete", vec![param("dryRun"), param("gracePeriodSeconds")]),
            }),
        );
    }
    json_response(
        200,
        &json!({
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": format!("v1.{SERVER_MINOR}.0")},
            "paths": paths,
            "components": {"schemas": {}},
        }),
    )
}

/// `dryRun=All`: validate and answer, persist nothing.
fn dry_run(req: &Req) -> bool {
    req.query.iter().any(|(k, v)| k == "dryRun" && v == "All")
}

fn parse_body(req: &Req) -> Result<Value, ApiStatus> {
    let ct = req
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.starts_with("application/vnd.kubernetes.protobuf") || ct.starts_with("application/cbor") {
        return Err(ApiStatus::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (kubetest does not decode {ct}; send JSON)"
            ),
        ));
    }
    if req.body.is_empty() {
        return Err(ApiStatus::bad_request("the request body is empty"));
    }
    serde_json::from_slice(&req.body)
        .or_else(|e| {
            // kubectl sends YAML for server-side apply; JSON is the common case.
            serde_norway::from_slice::<Value>(&req.body).map_err(|_| e)
        })
        .map_err(|e| ApiStatus::bad_request(format!("error decoding the request body: {e}")))
}

/// The body's kind/apiVersion must match the endpoint when given.
fn check_type(kind: &ResourceKind, body: &Value) -> Result<(), ApiStatus> {
    if let Some(av) = body.get("apiVersion").and_then(Value::as_str)
        && av != kind.api_version()
    {
        return Err(ApiStatus::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({})",
            kind.api_version()
        )));
    }
    if let Some(k) = body.get("kind").and_then(Value::as_str)
        && k != kind.kind
    {
        return Err(ApiStatus::bad_request(format!(
            "the kind in the data ({k}) does not match the expected kind ({})",
            kind.kind
        )));
    }
    Ok(())
}

fn verb_of(req: &Req, rp: &ResPath) -> Option<&'static str> {
    let watch = rp.watch_path || req.flag("watch");
    match (&req.method, rp.name.is_some()) {
        (&Method::GET, _) if watch => Some("watch"),
        (&Method::GET, true) => Some("get"),
        (&Method::GET, false) => Some("list"),
        (&Method::POST, false) => Some("create"),
        (&Method::PUT, true) => Some("update"),
        (&Method::PATCH, true) => Some("patch"),
        (&Method::DELETE, true) => Some("delete"),
        (&Method::DELETE, false) => Some("deletecollection"),
        _ => None,
    }
}

async fn resource_request(
    shared: &Arc<Shared>,
    req: &Req,
    rp: ResPath,
) -> (Response<Body>, String) {
    let kind = shared
        .store
        .lock()
        .find_kind(&rp.group, &rp.version, &rp.plural);
    let Some(kind) = kind else {
        return (status_response(&ApiStatus::no_such_path()), String::new());
    };
    // A namespaced kind's single objects live under namespaces/<ns>/; a cluster-scoped kind
    // has no namespace in its path.
    if (!kind.namespaced && rp.namespace.is_some())
        || (kind.namespaced && rp.namespace.is_none() && rp.name.is_some())
    {
        return (status_response(&ApiStatus::no_such_path()), String::new());
    }
    let Some(verb) = verb_of(req, &rp) else {
        return (
            status_response(&ApiStatus::method_not_allowed()),
            String::new(),
        );
    };
    let subresource = rp.sub.clone().unwrap_or_default();
    if !subresource.is_empty() && (subresource != "status" || !kind.status_subresource) {
        return (status_response(&ApiStatus::no_such_path()), verb.into());
    }
    if !subresource.is_empty() && !matches!(verb, "get" | "update" | "patch") {
        return (
            status_response(&ApiStatus::method_not_allowed()),
            verb.into(),
        );
    }
    let ns = rp.namespace.clone().unwrap_or_default();
    let name = rp.name.clone().unwrap_or_default();
    let qualified = kind.qualified_name();
    let user = &req.user;

    // Injected faults first (a test asked for them), then RBAC when enforced.
    let injected = shared.faults.lock().check(verb, &qualified, &ns);
    match injected {
        Some(Injected::Forbidden) => {
            let s = ApiStatus::forbidden(
                &user.username,
                verb,
                &kind.group,
                &kind.plural,
                rp.namespace.as_deref(),
                &name,
            );
            return (status_response(&s), verb.into());
        }
        Some(Injected::Status(s)) => return (status_response(&s), verb.into()),
        None => {}
    }
    if shared.options.authorize_requests && !user.is_admin() {
        let attrs = Attributes::Resource {
            verb: verb.to_string(),
            group: kind.group.clone(),
            resource: kind.plural.clone(),
            subresource: subresource.clone(),
            namespace: ns.clone(),
        };
        if !shared
            .auth
            .lock()
            .allowed(&user.username, &user.groups, &attrs)
        {
            let plural = if subresource.is_empty() {
                kind.plural.clone()
            } else {
                format!("{}/{subresource}", kind.plural)
            };
            let s = ApiStatus::forbidden(
                &user.username,
                verb,
                &kind.group,
                &plural,
                rp.namespace.as_deref(),
                &name,
            );
            return (status_response(&s), verb.into());
        }
    }
    if !kind.allows(verb) {
        return (
            status_response(&ApiStatus::method_not_allowed()),
            verb.into(),
        );
    }
    // Create-only review kinds.
    if kind.virtual_create_only {
        return (review(shared, req, &kind), verb.into());
    }
    let malformed = shared.faults.lock().malformed.contains(&qualified);
    if malformed && matches!(verb, "get" | "list") {
        return (raw_response(200, "application/json", GARBAGE), verb.into());
    }
    let ns_opt = rp.namespace.as_deref();
    let resp = match verb {
        "get" => get(shared, &kind, &ns, &name, req),
        "list" => list(shared, &kind, ns_opt, req),
        "watch" => watch(shared, &kind, ns_opt, rp.name.as_deref(), req),
        "create" => {
            if kind.namespaced && ns_opt.is_none() {
                status_response(&ApiStatus::method_not_allowed())
            } else {
                create(shared, &kind, &ns, req)
            }
        }
        "update" => update(shared, &kind, &ns, &name, &subresource, req),
        "patch" => patch(shared, &kind, &ns, &name, &subresource, req),
        "delete" => delete(shared, &kind, &ns, &name, req),
        "deletecollection" => delete_collection(shared, &kind, ns_opt, req),
        _ => status_response(&ApiStatus::method_not_allowed()),
    };
    (resp, verb.into())
}

fn review(shared: &Shared, req: &Req, kind: &ResourceKind) -> Response<Body> {
    let body = match parse_body(req).and_then(|b| check_type(kind, &b).map(|()| b)) {
        Ok(b) => b,
        Err(s) => return status_response(&s),
    };
    let auth = shared.auth.lock();
    let answer = match kind.plural.as_str() {
        "tokenreviews" => auth.token_review(&body),
        "subjectaccessreviews" => auth.subject_access_review(&body),
        "selfsubjectaccessreviews" => {
            // The requesting user asks about themself.
            let mut sar = body.clone();
            sar["spec"]["user"] = json!(req.user.username);
            sar["spec"]["groups"] = json!(req.user.groups);
            auth.subject_access_review(&sar).map(|mut v| {
                v["apiVersion"] = json!(kind.api_version());
                v["kind"] = json!(kind.kind);
                if let Some(spec) = v.get_mut("spec").and_then(Value::as_object_mut) {
                    spec.remove("user");
                    spec.remove("groups");
                }
                v
            })
        }
        _ => Ok(json!({
            "apiVersion": kind.api_version(),
            "kind": kind.kind,
            "metadata": {"creationTimestamp": null},
            "status": {"userInfo": {
                "username": req.user.username,
                "uid": req.user.uid,
                "groups": req.user.groups,
            }},
        })),
    };
    match answer {
        Ok(v) => json_response(201, &v),
        Err(msg) => status_response(&ApiStatus::invalid(&kind.kind, &kind.group, "", &msg)),
    }
}

/// `as=PartialObjectMetadata` / `as=Table` negotiation (what metadata watchers and kubectl
/// ask for).
fn accept_as(req: &Req) -> Option<&'static str> {
    let a = req.accept();
    if a.contains("as=PartialObjectMetadataList") {
        Some("PartialObjectMetadataList")
    } else if a.contains("as=PartialObjectMetadata") {
        Some("PartialObjectMetadata")
    } else if a.contains("as=Table") {
        Some("Table")
    } else {
        None
    }
}

fn partial(obj: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

/// An object's age as kubectl prints it (`42s`, `5m`, `3h`, `2d`).
fn age(obj: &Value) -> String {
    let Some(t) = meta_str(obj, "creationTimestamp").and_then(|t| humantime::parse_rfc3339(t).ok())
    else {
        return "<unknown>".into();
    };
    let secs = std::time::SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 3 * 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// The server-side table kubectl prints: Name and Age, plus Ready/Status/Restarts/IP/Node
/// for pods.
fn table(kind: &ResourceKind, objs: &[Value], rv: &str) -> Value {
    let is_pod = kind.group.is_empty() && kind.plural == "pods";
    let col = |name: &str, ty: &str, priority: u8| json!({"name": name, "type": ty, "format": if name == "Name" { "name" } else { "" }, "description": name, "priority": priority});
    let columns = if is_pod {
        vec![
            col("Name", "string", 0),
            col("Ready", "string", 0),
            col("Status", "string", 0),
            col("Restarts", "string", 0),
            col("Age", "string", 0),
            col("IP", "string", 1),
            col("Node", "string", 1),
        ]
    } else {
        vec![col("Name", "string", 0), col("Age", "string", 0)]
    };
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            let name = meta_str(o, "name").unwrap_or_default();
            let cells = if is_pod {
                let ready = o
                    .pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                    .is_some_and(|c| c["status"] == "True");
                let containers = o
                    .pointer("/spec/containers")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                let status = if o.pointer("/metadata/deletionTimestamp").is_some() {
                    "Terminating".to_string()
                } else {
                    o.pointer("/status/phase")
                        .and_then(Value::as_str)
                        .unwrap_or("Pending")
                        .to_string()
                };
                json!([
                    name,
                    format!("{}/{containers}", if ready { containers } else { 0 }),
                    status,
                    "0",
                    age(o),
                    o.pointer("/status/podIP")
                        .and_then(Value::as_str)
                        .unwrap_or("<none>"),
                    o.pointer("/spec/nodeName")
                        .and_then(Value::as_str)
                        .unwrap_or("<none>"),
                ])
            } else {
                json!([name, age(o)])
            };
            json!({"cells": cells, "object": partial(o)})
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": columns,
        "rows": rows,
    })
}

fn get(shared: &Shared, kind: &ResourceKind, ns: &str, name: &str, req: &Req) -> Response<Body> {
    let obj = shared.store.lock().get(kind, ns, name);
    match obj {
        Some(o) => {
            let o = render(&o, kind);
            match accept_as(req) {
                Some("PartialObjectMetadata" | "PartialObjectMetadataList") => {
                    json_response(200, &partial(&o))
                }
                Some("Table") => json_response(
                    200,
                    &table(
                        kind,
                        std::slice::from_ref(&o),
                        meta_str(&o, "resourceVersion").unwrap_or_default(),
                    ),
                ),
                _ => json_response(200, &o),
            }
        }
        None => status_response(&ApiStatus::not_found(&kind.group, &kind.plural, name)),
    }
}

fn selectors(kind: &ResourceKind, req: &Req) -> Result<(LabelSelector, FieldSelector), ApiStatus> {
    let l = LabelSelector::parse(req.q("labelSelector").unwrap_or(""))
        .map_err(ApiStatus::bad_request)?;
    let f = FieldSelector::parse(req.q("fieldSelector").unwrap_or(""), &kind.kind)
        .map_err(ApiStatus::bad_request)?;
    Ok((l, f))
}

fn parse_rv(s: Option<&str>) -> Result<Option<u64>, ApiStatus> {
    match s {
        None | Some("") => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            ApiStatus::bad_request(format!(
                "resourceVersion: Invalid value: \"{v}\": must be a non-negative integer"
            ))
        }),
    }
}

fn list(shared: &Shared, kind: &ResourceKind, ns: Option<&str>, req: &Req) -> Response<Body> {
    let (labels, fields) = match selectors(kind, req) {
        Ok(s) => s,
        Err(s) => return status_response(&s),
    };
    let asked = match parse_rv(req.q("resourceVersion")) {
        Ok(v) => v,
        Err(s) => return status_response(&s),
    };
    let limit = req
        .q("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let store = shared.store.lock();
    let current = store.rv;
    if let Some(n) = asked
        && n > current
    {
        return status_response(&ApiStatus::too_large_resource_version(n, current));
    }
    if req.q("resourceVersionMatch") == Some("Exact")
        && let Some(n) = asked
        && n != current
    {
        return status_response(&ApiStatus::new(
            410,
            "Expired",
            format!("too old resource version: {n} ({current})"),
        ));
    }
    // continue = base64(JSON {rv, after: [ns, name]}): items after that key, at that rv.
    let (list_rv, after) = match req.q("continue").filter(|c| !c.is_empty()) {
        None => (current, None),
        Some(c) => match decode_continue(c) {
            Some((rv, key)) if rv >= store.oldest => (rv, Some(key)),
            Some(_) => {
                return status_response(&ApiStatus::new(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                ));
            }
            None => {
                return status_response(&ApiStatus::bad_request(
                    "continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
                ));
            }
        },
    };
    let mut items: Vec<Value> = store
        .list(kind, ns, &labels, &fields)
        .into_iter()
        .filter(|o| {
            let key = (
                meta_str(o, "namespace").unwrap_or_default().to_string(),
                meta_str(o, "name").unwrap_or_default().to_string(),
            );
            after.as_ref().is_none_or(|a| key > *a)
        })
        .map(|o| render(&o, kind))
        .collect();
    drop(store);
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if let Some(l) = limit
        && items.len() > l
    {
        let remaining = items.len() - l;
        items.truncate(l);
        if let Some(last) = items.last() {
            let key = (
                meta_str(last, "namespace").unwrap_or_default().to_string(),
                meta_str(last, "name").unwrap_or_default().to_string(),
            );
            metadata["continue"] = json!(encode_continue(list_rv, &key));
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    match accept_as(req) {
        Some("Table") => json_response(200, &table(kind, &items, &list_rv.to_string())),
        Some("PartialObjectMetadataList" | "PartialObjectMetadata") => json_response(
            200,
            &json!({
                "kind": "PartialObjectMetadataList",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": metadata,
                "items": items.iter().map(partial).collect::<Vec<_>>(),
            }),
        ),
        _ => json_response(
            200,
            &json!({
                "kind": kind.list_kind(),
                "apiVersion": kind.api_version(),
                "metadata": metadata,
                "items": items,
            }),
        ),
    }
}

fn encode_continue(rv: u64, key: &(String, String)) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(json!({"v": "meta.k8s.io/v1", "rv": rv, "start": [key.0, key.1]}).to_string())
}

fn decode_continue(c: &str) -> Option<(u64, (String, String))> {
    let raw = base64::engine::general_purpose::STANDARD.decode(c).ok()?;
    let v: Value = serde_json::from_slice(&raw).ok()?;
    let rv = v.get("rv")?.as_u64()?;
    let start = v.get("start")?.as_array()?;
    Some((
        rv,
        (
            start.first()?.as_str()?.to_string(),
            start.get(1)?.as_str()?.to_string(),
        ),
    ))
}

fn create(shared: &Arc<Shared>, kind: &ResourceKind, ns: &str, req: &Req) -> Response<Body> {
    let body = match parse_body(req).and_then(|b| check_type(kind, &b).map(|()| b)) {
        Ok(b) => b,
        Err(s) => return status_response(&s),
    };
    let is_crd = kind.group == "apiextensions.k8s.io" && kind.plural == "customresourcedefinitions";
    let mut body = body;
    let mut crd_kinds = Vec::new();
    if is_crd {
        match ResourceKind::from_crd(&body) {
            Ok(k) => crd_kinds = k,
            Err(msg) => {
                return status_response(&ApiStatus::invalid(
                    &kind.kind,
                    &kind.group,
                    meta_str(&body, "name").unwrap_or_default(),
                    &msg,
                ));
            }
        }
        // The real server reports an accepted, established CRD right away.
        let names = body.pointer("/spec/names").cloned().unwrap_or(Value::Null);
        let storage: Vec<Value> = body
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .map(|vs| {
                vs.iter()
                    .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                    .filter_map(|v| v.get("name").cloned())
                    .collect()
            })
            .unwrap_or_default();
        let now = crate::store::now_rfc3339();
        body["status"] = json!({
            "acceptedNames": names,
            "storedVersions": storage,
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now}
            ]
        });
    }
    let mode = if is_crd {
        UpdateMode::Raw
    } else {
        UpdateMode::Main
    };
    let r = shared.write(dry_run(req), |store| {
        store.ensure_namespace(kind, ns);
        let r = store.create(kind, ns, body, mode);
        if r.is_ok() {
            for k in crd_kinds {
                store.register(k);
            }
        }
        r
    });
    match r {
        Ok(v) => json_response(201, &v),
        Err(s) => status_response(&s),
    }
}

fn update(
    shared: &Arc<Shared>,
    kind: &ResourceKind,
    ns: &str,
    name: &str,
    sub: &str,
    req: &Req,
) -> Response<Body> {
    let body = match parse_body(req).and_then(|b| check_type(kind, &b).map(|()| b)) {
        Ok(b) => b,
        Err(s) => return status_response(&s),
    };
    let mode = if sub == "status" {
        UpdateMode::Status
    } else {
        UpdateMode::Main
    };
    let r = shared.write(dry_run(req), |store| {
        store.update(kind, ns, name, body, mode)
    });
    match r {
        Ok(v) => json_response(200, &v),
        Err(s) => status_response(&s),
    }
}

/// Drops strategic-merge-patch directives (`$patch`, `$setElementOrder/...`, ...): the server
/// applies strategic merge patches as merge patches.
fn strip_directives(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| !k.starts_with('$'));
            for x in m.values_mut() {
                strip_directives(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

fn patch(
    shared: &Arc<Shared>,
    kind: &ResourceKind,
    ns: &str,
    name: &str,
    sub: &str,
    req: &Req,
) -> Response<Body> {
    let ct = req
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let mut body = match parse_body(req) {
        Ok(b) => b,
        Err(s) => return status_response(&s),
    };
    let mode = if sub == "status" {
        UpdateMode::Status
    } else {
        UpdateMode::Main
    };
    let r = shared.write(dry_run(req), |store| {
        let current = store.get(kind, ns, name);
        match ct.as_str() {
            "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                if ct.starts_with("application/strategic") {
                    strip_directives(&mut body);
                }
                if !body.is_object() {
                    Err(ApiStatus::bad_request(
                        "a merge patch must be a JSON object",
                    ))
                } else {
                    match current {
                        None => Err(ApiStatus::not_found(&kind.group, &kind.plural, name)),
                        Some(cur) => {
                            let mut new = (*cur).clone();
                            crate::patch::merge_patch(&mut new, &body);
                            store.update(kind, ns, name, new, mode)
                        }
                    }
                }
            }
            "application/json-patch+json" => match current {
                None => Err(ApiStatus::not_found(&kind.group, &kind.plural, name)),
                Some(cur) => {
                    let mut new = (*cur).clone();
                    match crate::patch::json_patch(&mut new, &body) {
                        Ok(()) => store.update(kind, ns, name, new, mode),
                        Err(msg) => Err(ApiStatus::new(
                            422,
                            "Invalid",
                            format!(
                                "the server rejected our request due to an error in our request: {msg}"
                            ),
                        )),
                    }
                }
            },
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                if req.q("fieldManager").is_none_or(str::is_empty) {
                    Err(ApiStatus::new(
                        422,
                        "Invalid",
                        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                    ))
                } else if let Err(s) = check_type(kind, &body) {
                    Err(s)
                } else {
                    match current {
                        None if mode == UpdateMode::Status => {
                            Err(ApiStatus::not_found(&kind.group, &kind.plural, name))
                        }
                        None => {
                            if meta_str(&body, "name").is_some_and(|n| n != name) {
                                Err(ApiStatus::bad_request(format!(
                                    "the name of the object ({}) does not match the name on the URL ({name})",
                                    meta_str(&body, "name").unwrap_or_default()
                                )))
                            } else {
                                let mut b = body.clone();
                                crate::patch::merge_patch(
                                    &mut b,
                                    &json!({"metadata": {"name": name}}),
                                );
                                store.ensure_namespace(kind, ns);
                                store.create(kind, ns, b, UpdateMode::Main)
                            }
                        }
                        Some(cur) => {
                            let mut new = (*cur).clone();
                            crate::patch::merge_patch(&mut new, &body);
                            store.update(kind, ns, name, new, mode)
                        }
                    }
                }
            }
            other => Err(ApiStatus::unsupported_media_type(other)),
        }
    });
    match r {
        Ok(v) => json_response(200, &v),
        Err(s) => status_response(&s),
    }
}

fn delete_options(req: &Req) -> Result<(Preconditions, Option<i64>), ApiStatus> {
    let mut pre = Preconditions::default();
    let mut grace = req
        .q("gracePeriodSeconds")
        .and_then(|g| g.parse::<i64>().ok());
    if !req.body.is_empty() {
        let b: Value = serde_json::from_slice(&req.body)
            .map_err(|e| ApiStatus::bad_request(format!("error decoding DeleteOptions: {e}")))?;
        pre.uid = b
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            .map(str::to_string);
        pre.resource_version = b
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(g) = b.get("gracePeriodSeconds").and_then(Value::as_i64) {
            grace = Some(g);
        }
    }
    Ok((pre, grace))
}

fn delete_one(
    shared: &Arc<Shared>,
    kind: &ResourceKind,
    ns: &str,
    name: &str,
    pre: &Preconditions,
    grace: Option<i64>,
    dry: bool,
) -> Result<Value, ApiStatus> {
    let termination = if kind.group.is_empty() && kind.plural == "pods" {
        shared.options.pod_termination
    } else {
        None
    };
    let grace_secs = match (grace, termination) {
        (Some(g), _) => g,
        (None, Some(d)) => i64::try_from(d.as_secs().max(1)).unwrap_or(30),
        (None, None) => 0,
    };
    let r = shared.write(dry, |store| {
        let r = store.delete(kind, ns, name, pre, grace_secs);
        if kind.plural == "customresourcedefinitions"
            && let Ok(Deleted::Gone(v)) = &r
            && let Ok(kinds) = ResourceKind::from_crd(v)
            && let Some(k) = kinds.first()
        {
            store.unregister(&k.group, &k.plural);
        }
        r
    });
    match r? {
        Deleted::Gone(v) => Ok(v),
        Deleted::Marked(v) => {
            // The "kubelet" finishes the termination after the configured delay.
            if let (Some(d), true, false) = (termination, grace_secs > 0, dry) {
                let uid = meta_str(&v, "uid").unwrap_or_default().to_string();
                let shared = shared.clone();
                let kind = kind.clone();
                let (ns, name) = (ns.to_string(), name.to_string());
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    let pre = Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    };
                    let _ = shared.store.lock().delete(&kind, &ns, &name, &pre, 0);
                    shared.notify();
                });
            }
            Ok(v)
        }
    }
}

fn delete(
    shared: &Arc<Shared>,
    kind: &ResourceKind,
    ns: &str,
    name: &str,
    req: &Req,
) -> Response<Body> {
    let (pre, grace) = match delete_options(req) {
        Ok(x) => x,
        Err(s) => return status_response(&s),
    };
    match delete_one(shared, kind, ns, name, &pre, grace, dry_run(req)) {
        Ok(v) => {
            if kind.group == "apiextensions.k8s.io" {
                let uid = meta_str(&v, "uid").unwrap_or_default().to_string();
                json_response(200, &status::success(&kind.group, &kind.plural, name, &uid))
            } else {
                json_response(200, &v)
            }
        }
        Err(s) => status_response(&s),
    }
}

fn delete_collection(
    shared: &Arc<Shared>,
    kind: &ResourceKind,
    ns: Option<&str>,
    req: &Req,
) -> Response<Body> {
    let (labels, fields) = match selectors(kind, req) {
        Ok(s) => s,
        Err(s) => return status_response(&s),
    };
    let (_, grace) = match delete_options(req) {
        Ok(x) => x,
        Err(s) => return status_response(&s),
    };
    let targets: Vec<(String, String)> = shared
        .store
        .lock()
        .list(kind, ns, &labels, &fields)
        .iter()
        .map(|o| {
            (
                meta_str(o, "namespace").unwrap_or_default().to_string(),
                meta_str(o, "name").unwrap_or_default().to_string(),
            )
        })
        .collect();
    let mut items = Vec::new();
    for (ons, name) in targets {
        if let Ok(v) = delete_one(
            shared,
            kind,
            &ons,
            &name,
            &Preconditions::default(),
            grace,
            dry_run(req),
        ) {
            items.push(v);
        }
    }
    let rv = shared.store.lock().rv;
    json_response(
        200,
        &json!({"kind": kind.list_kind(), "apiVersion": kind.api_version(), "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
    )
}

// ----- watch -----

enum Start {
    /// Synthetic ADDED events for the current state, then changes (`resourceVersion` unset,
    /// `""` or `"0"`); with `initial_bookmark`, a BOOKMARK marks the end of the initial
    /// events (`sendInitialEvents=true`).
    Initial { initial_bookmark: bool },
    /// Changes after this resourceVersion.
    From(u64),
}

struct WatchGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.shared.watches.lock().remove(&self.id);
    }
}

fn watch(
    shared: &Arc<Shared>,
    kind: &ResourceKind,
    ns: Option<&str>,
    single_name: Option<&str>,
    req: &Req,
) -> Response<Body> {
    let (labels, mut fields) = match selectors(kind, req) {
        Ok(s) => s,
        Err(s) => return status_response(&s),
    };
    if let Some(n) = single_name {
        // /watch/namespaces/ns/pods/<name>: a watch on one object.
        match FieldSelector::parse(&format!("metadata.name={n}"), &kind.kind) {
            Ok(f) => fields = f,
            Err(m) => return status_response(&ApiStatus::bad_request(m)),
        }
    }
    let asked = match parse_rv(req.q("resourceVersion")) {
        Ok(v) => v,
        Err(s) => return status_response(&s),
    };
    let send_initial = req.flag("sendInitialEvents");
    let start = match asked {
        _ if send_initial => Start::Initial {
            initial_bookmark: true,
        },
        None | Some(0) => Start::Initial {
            initial_bookmark: false,
        },
        Some(n) => Start::From(n),
    };
    let bookmarks = req.flag("allowWatchBookmarks");
    let timeout = req
        .q("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .map(Duration::from_secs);
    let id = shared.next_watch.fetch_add(1, Ordering::Relaxed);
    let info = WatchInfo {
        id,
        resource: kind.qualified_name(),
        api_version: kind.api_version(),
        namespace: ns.map(str::to_string),
        label_selector: req.q("labelSelector").unwrap_or("").to_string(),
        field_selector: req.q("fieldSelector").unwrap_or("").to_string(),
        resource_version: req.q("resourceVersion").unwrap_or("").to_string(),
        bookmarks,
        user: req.user.username.clone(),
        events_sent: 0,
        garbage_sent: 0,
    };
    shared.watches.lock().insert(id, info);
    let guard = WatchGuard {
        shared: shared.clone(),
        id,
    };
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, io::Error>>(256);
    let task = WatchTask {
        shared: shared.clone(),
        kind: kind.clone(),
        ns: ns.map(str::to_string),
        labels,
        fields,
        bookmarks,
        timeout,
        tx,
        ctl: shared.watch_ctl.subscribe(),
        ctl_seen: *shared.watch_ctl.borrow(),
        rv_rx: shared.rv_tx.subscribe(),
        guard,
    };
    tokio::spawn(task.run(start));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    resp
}

struct WatchTask {
    shared: Arc<Shared>,
    kind: ResourceKind,
    ns: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    bookmarks: bool,
    timeout: Option<Duration>,
    tx: mpsc::Sender<Result<Frame<Bytes>, io::Error>>,
    ctl: watch::Receiver<WatchCtl>,
    ctl_seen: WatchCtl,
    rv_rx: watch::Receiver<u64>,
    guard: WatchGuard,
}

impl WatchTask {
    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// Sends one event line; false when the client has gone.
    async fn send(&self, etype: &str, object: &Value) -> bool {
        let malformed = self
            .shared
            .faults
            .lock()
            .malformed
            .contains(&self.kind.qualified_name());
        let mut line = if malformed {
            format!("{{\"type\":\"{etype}\",\"object\":{GARBAGE}").into_bytes()
        } else {
            // `type` first, as the real server writes it.
            let obj = serde_json::to_string(object).unwrap_or_default();
            format!("{{\"type\":\"{etype}\",\"object\":{obj}}}").into_bytes()
        };
        line.push(b'\n');
        if let Some(w) = self.shared.watches.lock().get_mut(&self.guard.id) {
            w.events_sent += 1;
            if malformed {
                w.garbage_sent += 1;
            }
        }
        self.tx
            .send(Ok(Frame::data(Bytes::from(line))))
            .await
            .is_ok()
    }

    async fn bookmark(&self, rv: u64, initial_end: bool) -> bool {
        let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = json!({"kind": self.kind.kind, "apiVersion": self.kind.api_version(), "metadata": meta});
        self.send("BOOKMARK", &obj).await
    }

    async fn expire(&self, asked: u64, oldest: u64) {
        let s = ApiStatus::expired(asked, oldest).to_json();
        let _ = self.send("ERROR", &s).await;
    }

    async fn run(mut self, start: Start) {
        let key = res_key(&self.kind);
        let mut last = match start {
            Start::Initial { initial_bookmark } => {
                self.rv_rx.borrow_and_update();
                let (objs, rv) = {
                    let store = self.shared.store.lock();
                    (
                        store.list(&self.kind, self.ns.as_deref(), &self.labels, &self.fields),
                        store.rv,
                    )
                };
                for o in objs {
                    if !self.send("ADDED", &render(&o, &self.kind)).await {
                        return;
                    }
                }
                if initial_bookmark && !self.bookmark(rv, true).await {
                    return;
                }
                rv
            }
            Start::From(n) => n,
        };
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        let mut tick = tokio::time::interval(self.shared.options.bookmark_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let ctl = *self.ctl.borrow_and_update();
            if ctl.drops != self.ctl_seen.drops {
                let _ = self
                    .tx
                    .send(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "kubetest: watch dropped",
                    )))
                    .await;
                return;
            }
            if ctl.expires != self.ctl_seen.expires {
                let oldest = self.shared.store.lock().oldest;
                self.expire(last, oldest).await;
                return;
            }
            self.rv_rx.borrow_and_update();
            let (events, current) = {
                let store = self.shared.store.lock();
                (store.events_since(&key, last), store.rv)
            };
            match events {
                Err(oldest) => {
                    self.expire(last, oldest).await;
                    return;
                }
                Ok(evs) => {
                    for e in evs {
                        if let Some(ns) = &self.ns
                            && &e.namespace != ns
                        {
                            continue;
                        }
                        let now = self.matches(&e.object);
                        let etype = match e.etype {
                            EventType::Added => now.then_some("ADDED"),
                            EventType::Deleted => now.then_some("DELETED"),
                            EventType::Modified => {
                                let before = e.old.as_ref().is_some_and(|o| self.matches(o));
                                match (before, now) {
                                    (true, true) => Some("MODIFIED"),
                                    (true, false) => Some("DELETED"),
                                    (false, true) => Some("ADDED"),
                                    (false, false) => None,
                                }
                            }
                        };
                        if let Some(t) = etype
                            && !self.send(t, &render(&e.object, &self.kind)).await
                        {
                            return;
                        }
                    }
                    last = last.max(current);
                }
            }
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.rv_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tick.tick(), if self.bookmarks => {
                    if !self.bookmark(last, false).await {
                        return;
                    }
                }
                _ = sleep => return,
                changed = self.ctl.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = self.tx.closed() => return,
            }
        }
    }
}
