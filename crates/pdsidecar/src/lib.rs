//! `llmsched-pdsidecar`: the decode-side routing sidecar of prefill/decode disaggregation
//! (llm-d's `pd-sidecar`, same flags and behaviour where it has them).
//!
//! The EPP picks a decode endpoint (this sidecar's pod) and, when it decides to disaggregate,
//! a prefill endpoint that it names in `x-prefiller-host-port`. The sidecar then runs vLLM's
//! NIXL protocol: the request goes to the prefiller with `max_tokens: 1`, `stream: false` and
//! `kv_transfer_params` asking for a remote decode; the prefiller's answer carries
//! `kv_transfer_params` saying where the prompt's KV blocks are; the original request goes to
//! the local decode replica with them, which reads the blocks and decodes. Without the header
//! the sidecar is a transparent proxy.
//!
//! * [`PdRouter`] is the core (one request in, one response out), usable in-process: the
//!   built-in proxy can call [`PdRouter::handle_with_decoder`] with the decode endpoint it
//!   picked, and the header its P/D profile set.
//! * [`server`] serves a router on a listener (plain or TLS), [`cli`] is `llmsched
//!   pd-sidecar`.
//!
//! Module map: [`header`] (parsing `x-prefiller-host-port`), [`allowlist`] (SSRF protection),
//! [`transform`] (the prefill and decode bodies), [`usage`] (cached-tokens rewrite),
//! [`client`] (upstream HTTP/TLS client), [`body`] (streamed response bodies), [`metrics`].

pub mod allowlist;
pub mod body;
pub mod cli;
pub mod client;
pub mod error;
pub mod header;
pub mod metrics;
pub mod router;
pub mod server;
pub mod tls;
pub mod transform;
pub mod usage;

pub use allowlist::Allowlist;
pub use body::ProxyBody;
pub use error::SidecarError;
pub use header::{PREFILLER_HOST_PORT, Target};
pub use metrics::SidecarMetrics;
pub use router::{METRICS_PATH, PdRouter, PdRouterConfig, Upstream};
