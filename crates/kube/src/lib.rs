//! # llmsched-kube
//!
//! llmsched as a Kubernetes citizen. This crate holds everything that needs kube-rs, so
//! `core` and `datalayer` stay free of it:
//!
//! * [`crd`] — `InferencePool` (v1 and v1alpha2), `InferenceObjective` and
//!   `InferenceModelRewrite` (both groups) as Rust types, and the CRD manifests generated
//!   from them (`llmsched crds`);
//! * [`pool`] — the pool/pod contract: which pods are endpoints and what endpoints they give;
//! * [`objectives`] — cluster objectives and rewrites into `llmsched_core` `Objectives`;
//! * [`discovery`] — the watches feeding the data layer's endpoint and objectives stores;
//! * [`metrics`] — `llmsched_kube_*` metrics;
//! * [`leader`] — leader election over a `coordination.k8s.io/v1` Lease
//!   (`--ha-enable-leader-election`);
//! * [`peers`] — the other pods of this EPP's Deployment, the peers of active-active
//!   replicas (`--ha-mode=active-active` without `--ha-peers`);
//! * [`auth`] — `/metrics` authentication and authorization with TokenReview and
//!   SubjectAccessReview (`--metrics-endpoint-auth`), behind `llmsched-ops`'
//!   `MetricsAuthorizer` seam.
pub mod auth;
pub mod crd;
pub mod discovery;
pub mod leader;
pub mod metrics;
pub mod objectives;
pub mod peers;
pub mod pool;

/// The kube-rs client type discovery (and leader election) use.
pub use kube::Client;
