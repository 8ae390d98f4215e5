//! # llmsched-core
//!
//! The scheduling framework of llmsched, free of I/O: everything here is plain data and
//! synchronous logic, so it can be tested and benchmarked in isolation and shared by the
//! Envoy ext_proc server and the built-in proxy.
//!
//! * [`request`] — the request model (`InferenceRequest`, parsed body, headers, usage);
//! * [`endpoint`] — endpoints with lock-free metrics snapshots and in-flight counters;
//! * [`health`] — endpoint health (scrape freshness and a circuit breaker fed by transport
//!   failures), atomics only;
//! * [`plugin`] — the extension points (filters, scorers, pickers, profile handlers, data
//!   producers, admission, pre-request and response hooks, parsers);
//! * [`scheduler`] — profiles (filters → weighted scorers → picker), the scheduler and its
//!   typed errors;
//! * [`flowcontrol`] — flow-control policy traits (fairness between flows, ordering within
//!   a flow) and the band queues they act on;
//! * [`registry`] — plugin factories keyed by the reference's type names;
//! * [`replica`] — plugin state shared between EPP replicas (the hooks the HA sync uses);
//! * [`config`] — the `EndpointPickerConfig` loader and its defaults;
//! * [`objectives`] — `InferenceObjective` / `InferenceModelRewrite` manifests;
//! * [`metrics`] — scheduler-level Prometheus metrics with the reference's names;
//! * [`labels`] — bounded label values for client-controlled names (unknown models → `other`);
//! * [`error`] — the client-facing error model (`inference error: <Code> - <message>`);
//! * [`units`] — Go durations and Kubernetes quantities.

pub mod config;
pub mod cycle;
pub mod endpoint;
pub mod error;
pub mod flowcontrol;
pub mod health;
pub mod labels;
pub mod metrics;
pub mod objectives;
pub mod plugin;
pub mod registry;
pub mod replica;
pub mod request;
pub mod scheduler;
pub mod units;

#[cfg(test)]
mod tests;

pub use cycle::{CycleState, PrefixCacheMatch};
pub use endpoint::{
    Endpoint, EndpointId, EndpointMeta, EndpointMetrics, EndpointSet, EndpointSource,
};
pub use error::{ErrorCode, InferenceError};
pub use health::{FailureKind, Health, HealthPolicy};
pub use plugin::{Candidate, Plugin, SchedulingContext};
pub use request::{Headers, InferenceRequest, Prompt, RequestBody, ResponseInfo, Usage};
pub use scheduler::{Scheduler, SchedulerProfile, SchedulingResult};
