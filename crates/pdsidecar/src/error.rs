//! Errors of the sidecar library.

use std::net::SocketAddr;

/// Errors raised while configuring or starting the sidecar.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// A flag or configuration value is invalid.
    #[error("invalid pd-sidecar configuration: {0}")]
    Config(String),
    /// The TLS setup cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// A listening address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Any other I/O failure.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}
