//! # llmsched-director
//!
//! The request lifecycle of the EPP, independent of the transport: the Envoy ext_proc server
//! (`llmsched-extproc`) and the built-in OpenAI proxy share this one code path for parsing,
//! rewrites, objectives, admission and flow control, scheduling, hooks, usage accounting and
//! metrics; only the way bytes arrive and leave differs.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use llmsched_director::{Director, IncomingRequest};
//! # async fn demo(config: Arc<llmsched_core::config::LoadedConfig>,
//! #     endpoints: Arc<dyn llmsched_core::EndpointSource>,
//! #     headers: llmsched_core::Headers, body: bytes::Bytes) {
//! let director = Director::builder(config, endpoints).build();
//! match director.route(IncomingRequest::new(headers, body)).await {
//!     Ok(mut routed) => {
//!         // forward routed.forward_body() to routed.destination(), then:
//!         let extra = routed.on_response_headers(200, &llmsched_core::Headers::new());
//!         routed.on_response_body(br#"{"usage":{"prompt_tokens":3}}"#, true);
//!         routed.finish();
//!         # let _ = extra;
//!     }
//!     Err(e) => { /* reply e.http_status() with body e.body() and headers e.headers */ }
//! }
//! # }
//! ```
//!
//! * [`director`] — [`Director`], [`IncomingRequest`], [`DirectorOptions`];
//! * [`routed`] — [`Routed`], the response side and the in-flight guard;
//! * [`flow`] — the flow controller (feature gate `flowControl`);
//! * [`metrics`] — the reference's request, pool and flow-control metrics plus overhead
//!   histograms;
//! * [`usage`] — usage extraction (JSON and SSE) and the response model-name rewrite;
//! * [`headers`] — request id and system-owned headers;
//! * [`health`] — endpoint health on the request path: candidate formation (fail-open),
//!   gateway failure reports, health metrics.

pub mod director;
pub mod flow;
pub mod headers;
pub mod health;
pub mod metrics;
pub mod routed;
pub mod usage;

#[cfg(any(test, feature = "test-util"))]
pub mod testing;

#[cfg(test)]
mod tests;

pub use director::{Director, DirectorBuilder, DirectorOptions, IncomingRequest, estimate_tokens};
pub use flow::FlowController;
pub use headers::{ensure_request_id, is_system_owned};
pub use health::HealthMetrics;
pub use metrics::{EppMetrics, Phase, PoolCollector};
pub use routed::{RouteKind, Routed};
