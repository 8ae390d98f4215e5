//! Errors of the simulator library.

use std::net::SocketAddr;

/// Errors raised while configuring or starting simulated replicas.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// `--profile` names no built-in profile.
    #[error("unknown profile {name:?}; available profiles: {available}")]
    UnknownProfile {
        /// The name that was asked for.
        name: String,
        /// The names that exist, comma-separated.
        available: String,
    },
    /// A parameter is out of range or inconsistent with another.
    #[error("invalid simulator configuration: {0}")]
    Config(String),
    /// A replica's HTTP address could not be bound.
    #[error("cannot bind replica HTTP server to {addr}: {source}")]
    Bind {
        /// The address that was tried.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The Hugging Face tokenizer could not be loaded.
    #[error(transparent)]
    Tokenizer(#[from] llmsched_tokenizer::TokenizerError),
    /// The model's chat template could not be loaded.
    #[error(transparent)]
    ChatTemplate(#[from] llmsched_tokenizer::ChatTemplateError),
    /// The KV-event publisher could not start.
    #[error(transparent)]
    KvEvents(#[from] llmsched_kvevents::PublisherError),
    /// Any other I/O failure (e.g. waiting for Ctrl-C).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}
