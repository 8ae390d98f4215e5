//! `llmsched-sim`: a vLLM simulator faithful enough to measure scheduling on, without GPUs.
//!
//! From the outside a replica is a vLLM OpenAI server: the same endpoints, SSE frames, usage
//! accounting (including `prompt_tokens_details.cached_tokens`), Prometheus metrics and
//! KV-cache events. Inside, each replica runs vLLM v1's scheduling — continuous batching under
//! `max_num_seqs` and a per-step token budget with chunked prefill, a paged KV cache with
//! prefix caching, LRU eviction and preemption — and advances a simulated clock by a
//! calibrated step-time model ([`profile`]).
//!
//! Many replicas run in one process, each on its own address:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use llmsched_sim::{ClusterConfig, ReplicaConfig, SimCluster};
//! let replica = ReplicaConfig::from_profile("qwen3-32b-tp2-h100")?.with_time_scale(10.0);
//! let cluster = SimCluster::start(ClusterConfig::new(
//!     vec!["127.0.0.2:0".parse()?, "127.0.0.3:0".parse()?],
//!     replica,
//! ))
//! .await?;
//! let addrs = cluster.addrs(); // the bound ports
//! # let _ = addrs;
//! cluster.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Module map: [`config`] (parameters), [`profile`] (step-time model and calibrations),
//! [`clock`] (time scale), [`kvcache`] (block pool), [`engine`] (scheduler and step loop),
//! [`protocol`] (request parsing and vLLM's exact response bytes), [`server`] (HTTP routes and
//! failure injection), [`metrics`] (Prometheus text), [`cluster`] (starting replicas),
//! [`cli`] (`llmsched sim` flags).

pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod error;
pub mod kvcache;
pub mod metrics;
pub mod pd;
pub mod profile;
pub mod protocol;
pub mod server;

pub use clock::SimClock;
pub use cluster::{ReplicaHandle, ReplicaStats, SimCluster};
pub use config::{
    ClusterConfig, FailureConfig, KvEventsConfig, LoraConfig, ReplicaConfig, TokenizerChoice,
};
pub use engine::CacheSnapshot;
pub use error::SimError;
pub use profile::{FrontendModel, PROFILES, Profile, StepShape, StepTimeModel};
