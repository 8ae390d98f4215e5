//! A Kubernetes API server for tests.
//!
//! # Why not a real API server
//!
//! No real Kubernetes control plane can run on the machines this project is built and tested
//! on: kube-apiserver, k3s, kind node images and envtest binaries are not obtainable from the
//! package registries we may use, and there is no container runtime. So this crate serves the
//! **real Kubernetes REST wire protocol** on loopback (HTTP/1.1 and h2, plaintext or TLS with a
//! throw-away CA) and the real clients — kube-rs, client-go, kubectl — talk to it unchanged
//! through an ordinary kubeconfig. Everything a client can observe follows the real server:
//! paths, discovery documents, `Status` error bodies, resourceVersion semantics, watch event
//! streams, 409/410/403/401 behaviour. What it does not do: validation against OpenAPI
//! schemas (the `/openapi/v3` documents list operations, not schemas), admission, defaulting,
//! garbage collection, cascading namespace deletion, protobuf or CBOR request bodies (a clear
//! 415; kube-rs and `kubectl apply` send JSON), full server-side apply field ownership (apply
//! is a merge patch here), authorization of non-resource URLs. Namespaces exist once used:
//! `default`, `kube-system`, `kube-public` and `kube-node-lease` are seeded, others are
//! created on first write.
//!
//! # What it serves
//!
//! * Discovery: `/api`, `/api/v1`, `/apis`, `/apis/<group>`, `/apis/<group>/<version>`
//!   (also aggregated discovery v2 when asked through `Accept`), `/version`, `/healthz`,
//!   `/livez`, `/readyz`. A group or version that is not registered answers 404.
//! * Any registered [`ResourceKind`], namespaced or cluster-scoped: the built-ins (core pods,
//!   namespaces, services, configmaps, secrets, serviceaccounts, events, nodes; apps
//!   deployments; coordination leases; events.k8s.io events; CRDs) and any kind a test
//!   registers ([`TestApiServer::register`], [`ResourceKind::inference_extension_kinds`]) or
//!   declares by creating a `CustomResourceDefinition` through the API.
//! * get, list (label selectors with `=`, `==`, `!=`, `in`, `notin`, exists, `!`; field
//!   selectors on `metadata.name` / `metadata.namespace` and the pod fields; `limit` and
//!   `continue`; `resourceVersion` / `resourceVersionMatch`), create (409 AlreadyExists,
//!   `generateName`), update (409 Conflict on a stale `metadata.resourceVersion`), patch
//!   (merge, JSON patch, strategic merge treated as merge, apply), delete (preconditions,
//!   finalizers, grace periods), deletecollection, and the `/status` subresource.
//! * watch: newline-delimited JSON events streamed with chunked encoding; from a
//!   resourceVersion (replaying the bounded history), or with synthetic ADDED events for the
//!   current state (`""`/`"0"`, `sendInitialEvents=true` with its closing BOOKMARK);
//!   BOOKMARKs with `allowWatchBookmarks=true`; `timeoutSeconds`; selectors applied to
//!   events, an object that stops matching is sent as DELETED; 410 Expired as an `ERROR`
//!   event when the history no longer reaches back.
//! * `TokenReview` and `SubjectAccessReview`, answered from a table the test fills
//!   ([`TestApiServer::add_token`], [`TestApiServer::allow`]); `SelfSubjectAccessReview`
//!   and `SelfSubjectReview` for `kubectl auth can-i` / `whoami`.
//! * What kubectl needs besides: server-side tables (`as=Table`), `PartialObjectMetadata`,
//!   `/openapi/v3` (operations only), `dryRun=All`.
//! * Authentication: none (everyone is an administrator) or bearer tokens
//!   ([`ServerBuilder::require_token`]: 401 otherwise); optional RBAC-like authorization of
//!   every resource request from the permission table ([`ServerBuilder::authorize_requests`]).
//!
//! Manual runs: `cargo run -p llmsched-kubetest --example kube-apiserver -- --port 6443 --tls
//! --token admin --kubeconfig /tmp/kubetest.kubeconfig --inference-kinds --pods 2`.
//!
//! # Faults
//!
//! [`TestApiServer::deny`] / [`TestApiServer::inject`] (403 or any status per verb and
//! resource), [`TestApiServer::stop`] / [`TestApiServer::resume`] /
//! [`TestApiServer::restart`] (same port, state kept or wiped), [`TestApiServer::drop_watches`],
//! [`TestApiServer::expire_watches`], [`TestApiServer::compact`],
//! [`TestApiServer::set_delay`], [`TestApiServer::set_malformed`]. Every request is logged
//! ([`TestApiServer::requests`]) so a test can assert, e.g., that a client re-listed.
//!
//! ```no_run
//! use llmsched_kubetest::{ResourceKind, TestApiServer, objects};
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let server = TestApiServer::builder().tls(true).require_token("admin-token").start().await?;
//! server.register_inference_extension_kinds();
//! server.create(&ResourceKind::pods(), objects::pod("llm-d", "vllm-0", &[("app", "vllm")], "127.0.0.2", true))?;
//! let dir = tempfile_dir();
//! server.kubeconfig().namespace("llm-d").write(&dir.join("kubeconfig"))?;
//! // KUBECONFIG=<dir>/kubeconfig: kube::Client::try_default() now talks to this server.
//! # Ok(()) }
//! # fn tempfile_dir() -> std::path::PathBuf { std::env::temp_dir() }
//! ```

mod auth;
mod faults;
mod kubeconfig;
pub mod objects;
mod patch;
mod resource;
mod selector;
mod server;
mod status;
mod store;
mod tls;

pub use auth::{Permission, UserInfo};
pub use faults::FaultRule;
pub use kubeconfig::Kubeconfig;
pub use patch::{json_patch, merge_patch};
pub use resource::{ResourceKind, STANDARD_VERBS};
pub use selector::{FieldSelector, LabelSelector};
pub use server::{REQUEST_LOG_CAP, SERVER_MINOR, ServerBuilder, TestApiServer};
pub use status::ApiStatus;
pub use store::EventType;

/// Errors starting or restarting the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The port could not be bound.
    #[error("binding {0}: {1}")]
    Bind(std::net::SocketAddr, #[source] std::io::Error),
    /// Certificate generation or TLS configuration failed.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// Any other I/O error (writing a kubeconfig, socket options).
    #[error("I/O: {0}")]
    Io(#[source] std::io::Error),
    /// The server was stopped and could not be resumed.
    #[error("the server is stopped")]
    Stopped,
}

/// One request the server received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// URL path, e.g. `/api/v1/namespaces/llm-d/pods`.
    pub path: String,
    /// Raw query string (percent-encoded), e.g. `watch=true&resourceVersion=12`.
    pub query: String,
    /// The Kubernetes verb (get, list, watch, create, update, patch, delete,
    /// deletecollection), `""` when the request never got that far (401, 404 path).
    pub verb: String,
    /// Authenticated user name (`""` if authentication failed).
    pub user: String,
    /// HTTP status of the response (200 for a watch stream, even if it later ends in an
    /// ERROR event).
    pub status: u16,
    /// `User-Agent` header.
    pub user_agent: String,
}

impl RequestRecord {
    /// A decoded query parameter.
    pub fn param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k == name).then(|| server::decode(v))
        })
    }

    /// Whether this is a watch request.
    pub fn is_watch(&self) -> bool {
        self.verb == "watch"
    }

    /// Whether this is a list (not a watch) of a path ending in `resource_suffix`, e.g.
    /// `"/namespaces/llm-d/pods"`.
    pub fn is_list_of(&self, resource_suffix: &str) -> bool {
        self.verb == "list" && self.path.ends_with(resource_suffix)
    }
}

/// A watch currently open on the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchInfo {
    /// Server-assigned id, increasing.
    pub id: u64,
    /// `plural` or `plural.group`.
    pub resource: String,
    /// The version the client watches (`v1`, `inference.networking.k8s.io/v1`).
    pub api_version: String,
    /// Namespace, or `None` for all namespaces.
    pub namespace: Option<String>,
    /// `labelSelector` as sent.
    pub label_selector: String,
    /// `fieldSelector` as sent.
    pub field_selector: String,
    /// `resourceVersion` the watch started from, as sent.
    pub resource_version: String,
    /// Whether it asked for bookmarks.
    pub bookmarks: bool,
    /// The user who opened it.
    pub user: String,
    /// Events sent so far (bookmarks and errors included).
    pub events_sent: u64,
    /// Of those, how many were deliberately malformed ([`TestApiServer::set_malformed`]).
    pub garbage_sent: u64,
}
